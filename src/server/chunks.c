/* chunks.c — the chunk store's record format, tiers and Cache-Craft's reuse decision (chunks.h).
 *
 * Record format (little-endian; one file on disk, one Redis value):
 *   0   char[8] "KVSCHNK1"
 *   8   u32 version (1)
 *   12  u32 meta bytes M (the header, parts, tokens, outside shares and the meta checksum)
 *   16  u64 model fingerprint (kvs_model_fingerprint)
 *   24  u64 chunk id (chunk_id of the tokens)
 *   32  i32 n tokens, i32 n0 first position when cached, i32 n_ctx parts, f32 intra
 *   48  n_ctx x {u64 part id, i32 part length, f32 inter}
 *       i32 tokens[n], f32 outside[n]
 *   M-8 u64 xxh64 of bytes [0, M-8)        (lets the disk index be rebuilt from headers alone)
 *   M   the KV: kvs_prefix_serialize's bytes (own magic, shape, fingerprint, xxh64)
 *   end-8 u64 xxh64 of every byte before it
 * Any mismatch (magic, version, sizes, fingerprint, checksums, id against the tokens, the KV's
 * own checks) refuses the record: it is counted as corrupt, deleted where it was found, and the
 * chunk is computed again.
 *
 * Tiers. RAM holds records with their KV as prefix nodes, one page each of a src/page/ policy
 * (its capacity in records); the discard bit of each access comes from the online reuse-distance
 * predictor. Disk (--chunk-dir) and Redis (--redis) are written through when a record is made;
 * a RAM eviction drops the KV (the record stays known while a lower tier holds it); a hit below
 * RAM is promoted to RAM (and to disk, from Redis). The disk tier deletes its least recently
 * used files beyond --chunk-disk. Redis errors close the connection; it is retried after a
 * backoff of 100 ms doubling to 5 s, and meanwhile the local tiers serve. */
#include "server/chunks.h"
#include "page/page.h"

#include <dirent.h>
#include <errno.h>
#include <hiredis/hiredis.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#define MAPB 1024
#define MAGIC "KVSCHNK1"
enum { VERSION = 1, HDR = 48, WTOK = 16 };

struct chunk_store {
    struct chunk_cfg cfg;
    char *dir, *rhost;
    int rport;
    kvs_context *ctx;
    const kvs_model *m;
    uint64_t fp;
    struct chunk_rec *map[MAPB], *wmap[MAPB];
    int w; /* tokens hashed for recognition */
    struct page_cache *pc;
    struct page_predictor *pred;
    FILE *trace;
    struct chunk_stats st;
    uint64_t clock;
    redisContext *rc;
    double r_next, r_backoff;
    bool r_was_up;
};

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

uint64_t chunk_id(const int32_t *toks, int n) {
    return XXH3_64bits_withSeed(toks, sizeof *toks * (size_t)n, 0x63686e6b) & (UINT64_MAX >> 1);
}

void chunk_id_str(uint64_t id, char *buf) { sprintf(buf, "chunk-%016llx", (unsigned long long)id); }

bool chunk_id_parse(const char *s, uint64_t *id) {
    if (strncmp(s, "chunk-", 6) || strlen(s) != 22) return false;
    uint64_t x = 0;
    for (int i = 6; i < 22; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return false;
        x = x << 4 | (uint64_t)d;
    }
    if (x >> 63) return false;
    *id = x;
    return true;
}

void chunk_rec_free(struct chunk_rec *r) {
    if (!r) return;
    if (r->node) kvs_prefix_unref(r->node);
    free(r->toks);
    free(r->outside);
    free(r);
}

const struct chunk_cfg *chunk_store_cfg(const struct chunk_store *cs) { return &cs->cfg; }

/* ---- maps ------------------------------------------------------------------------------- */

static struct chunk_rec *find(const struct chunk_store *cs, uint64_t id) {
    for (struct chunk_rec *r = cs->map[id % MAPB]; r; r = r->hnext)
        if (r->id == id) return r;
    return NULL;
}

static void index_add(struct chunk_store *cs, struct chunk_rec *r) {
    r->hnext = cs->map[r->id % MAPB];
    cs->map[r->id % MAPB] = r;
    r->wkey = XXH3_64bits(r->toks, sizeof *r->toks * (size_t)cs->w);
    r->wnext = cs->wmap[r->wkey % MAPB];
    cs->wmap[r->wkey % MAPB] = r;
}

static void index_del(struct chunk_store *cs, struct chunk_rec *r) {
    for (struct chunk_rec **pp = &cs->map[r->id % MAPB]; *pp; pp = &(*pp)->hnext)
        if (*pp == r) {
            *pp = r->hnext;
            break;
        }
    for (struct chunk_rec **pp = &cs->wmap[r->wkey % MAPB]; *pp; pp = &(*pp)->wnext)
        if (*pp == r) {
            *pp = r->wnext;
            break;
        }
}

/* ---- the record format ---------------------------------------------------------------- */

static void w32(uint8_t *p, uint32_t x) { memcpy(p, &x, 4); }
static void w64(uint8_t *p, uint64_t x) { memcpy(p, &x, 8); }
static uint32_t r32(const uint8_t *p) {
    uint32_t x;
    memcpy(&x, p, 4);
    return x;
}
static uint64_t r64(const uint8_t *p) {
    uint64_t x;
    memcpy(&x, p, 8);
    return x;
}

static size_t meta_bytes(int n_ctx, int n) { return HDR + 16 * (size_t)n_ctx + 8 * (size_t)n + 8; }

static uint8_t *rec_serialize(const struct chunk_store *cs, const struct chunk_rec *r, size_t *len) {
    uint8_t *kv = NULL;
    size_t nkv = 0;
    if (kvs_prefix_serialize(r->node, &kv, &nkv) != KVS_OK) return NULL;
    size_t M = meta_bytes(r->n_ctx, r->n), size = M + nkv + 8;
    uint8_t *b = malloc(size);
    if (!b) {
        free(kv);
        return NULL;
    }
    memcpy(b, MAGIC, 8);
    w32(b + 8, VERSION);
    w32(b + 12, (uint32_t)M);
    w64(b + 16, cs->fp);
    w64(b + 24, r->id);
    w32(b + 32, (uint32_t)r->n);
    w32(b + 36, (uint32_t)r->n0);
    w32(b + 40, (uint32_t)r->n_ctx);
    memcpy(b + 44, &r->intra, 4);
    uint8_t *p = b + HDR;
    for (int i = 0; i < r->n_ctx; i++, p += 16) {
        w64(p, r->ctx[i].id);
        w32(p + 8, (uint32_t)r->ctx[i].len);
        memcpy(p + 12, &r->ctx[i].inter, 4);
    }
    memcpy(p, r->toks, 4 * (size_t)r->n), p += 4 * (size_t)r->n;
    memcpy(p, r->outside, 4 * (size_t)r->n), p += 4 * (size_t)r->n;
    w64(p, XXH64(b, M - 8, 0));
    memcpy(b + M, kv, nkv);
    free(kv);
    w64(b + size - 8, XXH64(b, size - 8, 0));
    *len = size;
    return b;
}

/* the record's metadata from its first bytes (at least HDR; *need = the meta bytes wanted) */
static struct chunk_rec *meta_parse(const struct chunk_store *cs, const uint8_t *b, size_t len,
                                    size_t *need, const char **why) {
    *why = "too short";
    if (len < HDR) return NULL;
    *why = "not a chunk record";
    if (memcmp(b, MAGIC, 8)) return NULL;
    *why = "unsupported version";
    if (r32(b + 8) != VERSION) return NULL;
    *why = "made by another model";
    if (r64(b + 16) != cs->fp) return NULL;
    int32_t n = (int32_t)r32(b + 32), n0 = (int32_t)r32(b + 36), n_ctx = (int32_t)r32(b + 40);
    *why = "bad sizes";
    if (n < 1 || n > (1 << 20) || n0 < 0 || n_ctx < 0 || n_ctx > CHUNK_MAX_CTX ||
        r32(b + 12) != meta_bytes(n_ctx, n))
        return NULL;
    size_t M = meta_bytes(n_ctx, n);
    *need = M;
    if (len < M) return NULL;
    *why = "metadata checksum mismatch";
    if (XXH64(b, M - 8, 0) != r64(b + M - 8)) return NULL;
    struct chunk_rec *r = calloc(1, sizeof *r);
    *why = "out of memory";
    if (!r) return NULL;
    r->id = r64(b + 24);
    r->n = n, r->n0 = n0, r->n_ctx = n_ctx;
    memcpy(&r->intra, b + 44, 4);
    const uint8_t *p = b + HDR;
    for (int i = 0; i < n_ctx; i++, p += 16) {
        r->ctx[i].id = r64(p);
        r->ctx[i].len = (int32_t)r32(p + 8);
        memcpy(&r->ctx[i].inter, p + 12, 4);
    }
    r->toks = malloc(4 * (size_t)n);
    r->outside = malloc(4 * (size_t)n);
    if (!r->toks || !r->outside) {
        chunk_rec_free(r);
        return NULL;
    }
    memcpy(r->toks, p, 4 * (size_t)n), p += 4 * (size_t)n;
    memcpy(r->outside, p, 4 * (size_t)n);
    *why = "id does not match the tokens";
    if (chunk_id(r->toks, n) != r->id || n < cs->w) {
        chunk_rec_free(r);
        return NULL;
    }
    return r;
}

/* a whole record: metadata and KV; NULL and *why on any mismatch */
static struct chunk_rec *rec_parse(struct chunk_store *cs, const uint8_t *b, size_t len,
                                   const char **why) {
    size_t M = 0;
    if (len < HDR + 16) {
        *why = "too short";
        return NULL;
    }
    if (XXH64(b, len - 8, 0) != r64(b + len - 8)) {
        *why = "checksum mismatch";
        return NULL;
    }
    struct chunk_rec *r = meta_parse(cs, b, len, &M, why);
    if (!r) return NULL;
    if (M + 8 > len) {
        *why = "truncated";
        chunk_rec_free(r);
        return NULL;
    }
    if (kvs_prefix_deserialize(cs->ctx, b + M, len - 8 - M, &r->node) != KVS_OK) {
        *why = kvs_last_error();
        chunk_rec_free(r);
        return NULL;
    }
    if (kvs_prefix_first(r->node) != r->n0 || kvs_prefix_n_tokens(r->node) != r->n0 + r->n) {
        *why = "the KV's token range does not match the record";
        chunk_rec_free(r);
        return NULL;
    }
    r->bytes = len;
    return r;
}

/* ---- disk tier ------------------------------------------------------------------------ */

static void disk_path(const struct chunk_store *cs, uint64_t id, char *buf, size_t n) {
    snprintf(buf, n, "%s/%016llx.kvchunk", cs->dir, (unsigned long long)id);
}

static void drop_rec(struct chunk_store *cs, struct chunk_rec *r) {
    index_del(cs, r);
    chunk_rec_free(r);
}

static void disk_remove(struct chunk_store *cs, struct chunk_rec *r) {
    char path[4200];
    disk_path(cs, r->id, path, sizeof path);
    unlink(path);
    if (r->on_disk) {
        cs->st.disk_records--;
        cs->st.disk_bytes -= (int64_t)r->bytes;
    }
    r->on_disk = false;
}

static void disk_trim(struct chunk_store *cs, const struct chunk_rec *keep) {
    while (cs->st.disk_bytes > cs->cfg.disk) {
        struct chunk_rec *best = NULL;
        for (int b = 0; b < MAPB; b++)
            for (struct chunk_rec *r = cs->map[b]; r; r = r->hnext)
                if (r->on_disk && r != keep && (!best || r->last_used < best->last_used)) best = r;
        if (!best) break;
        disk_remove(cs, best);
        cs->st.evictions_disk++;
        if (!best->node) drop_rec(cs, best);
    }
}

static void disk_write(struct chunk_store *cs, struct chunk_rec *r, const uint8_t *b, size_t len) {
    if (!cs->dir || r->on_disk) return;
    char path[4200], tmp[4300];
    disk_path(cs, r->id, path, sizeof path);
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        fprintf(stderr, "kvsieve serve: cannot write %s: %s\n", tmp, strerror(errno));
        return;
    }
    bool ok = fwrite(b, 1, len, f) == len;
    ok &= fflush(f) == 0;
    ok &= fclose(f) == 0;
    if (!ok || rename(tmp, path) != 0) {
        fprintf(stderr, "kvsieve serve: cannot write %s: %s\n", path, strerror(errno));
        unlink(tmp);
        return;
    }
    r->on_disk = true;
    cs->st.disk_records++;
    cs->st.disk_bytes += (int64_t)len;
    disk_trim(cs, r);
}

static uint8_t *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    uint8_t *b = NULL;
    if (fseek(f, 0, SEEK_END) == 0) {
        long n = ftell(f);
        if (n > 0 && fseek(f, 0, SEEK_SET) == 0 && (b = malloc((size_t)n)) &&
            fread(b, 1, (size_t)n, f) != (size_t)n) {
            free(b);
            b = NULL;
        }
        *len = (size_t)(n > 0 ? n : 0);
    }
    fclose(f);
    return b;
}

/* rebuild the index from the directory: every *.kvchunk whose metadata checks out */
static void disk_scan(struct chunk_store *cs) {
    DIR *d = opendir(cs->dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t L = strlen(e->d_name);
        char path[4200];
        snprintf(path, sizeof path, "%s/%s", cs->dir, e->d_name);
        if (strstr(e->d_name, ".kvchunk.tmp.")) { /* a write that never finished */
            unlink(path);
            continue;
        }
        if (L < 8 || strcmp(e->d_name + L - 8, ".kvchunk")) continue;
        FILE *f = fopen(path, "rb");
        if (!f) continue;
        uint8_t head[HDR];
        struct chunk_rec *r = NULL;
        const char *why = "too short";
        size_t need = HDR;
        struct stat sb;
        if (fread(head, 1, HDR, f) == HDR && fstat(fileno(f), &sb) == 0) {
            r = meta_parse(cs, head, HDR, &need, &why);
            if (!r && need > HDR && need < (size_t)sb.st_size) {
                uint8_t *m = malloc(need);
                if (m && fseek(f, 0, SEEK_SET) == 0 && fread(m, 1, need, f) == need)
                    r = meta_parse(cs, m, need, &need, &why);
                free(m);
            }
        }
        char want[64];
        if (r) snprintf(want, sizeof want, "%016llx.kvchunk", (unsigned long long)r->id);
        if (r && (strcmp(want, e->d_name) || find(cs, r->id))) {
            why = "file name does not match the record's id";
            chunk_rec_free(r);
            r = NULL;
        }
        if (!r) {
            fprintf(stderr, "kvsieve serve: %s: %s: deleted\n", path, why);
            cs->st.corrupt++;
            fclose(f);
            unlink(path);
            continue;
        }
        r->on_disk = true;
        r->bytes = (uint64_t)sb.st_size;
        r->last_used = ++cs->clock;
        index_add(cs, r);
        cs->st.disk_records++;
        cs->st.disk_bytes += (int64_t)r->bytes;
        fclose(f);
    }
    closedir(d);
    disk_trim(cs, NULL);
}

/* ---- Redis tier ----------------------------------------------------------------------- */

static void redis_key(const struct chunk_store *cs, uint64_t id, char *buf, size_t n) {
    snprintf(buf, n, "kvsieve:chunk:%016llx:%016llx", (unsigned long long)cs->fp,
             (unsigned long long)id);
}

static void redis_down(struct chunk_store *cs, const char *why) {
    cs->st.redis_errors++;
    if (cs->st.redis_up || cs->rc)
        fprintf(stderr, "kvsieve serve: redis %s:%d: %s; serving from the local tiers, retrying\n",
                cs->rhost, cs->rport, why);
    if (cs->rc) redisFree(cs->rc);
    cs->rc = NULL;
    cs->st.redis_up = false;
    cs->r_next = now_ms() + cs->r_backoff;
    cs->r_backoff = cs->r_backoff * 2 > 5000 ? 5000 : cs->r_backoff * 2;
}

static bool redis_ok(struct chunk_store *cs) {
    if (!cs->rhost) return false;
    if (cs->rc) return true;
    if (now_ms() < cs->r_next) return false;
    struct timeval tv = {0, 300000};
    redisContext *c = redisConnectWithTimeout(cs->rhost, cs->rport, tv);
    if (!c || c->err) {
        char why[300];
        snprintf(why, sizeof why, "cannot connect: %s", c ? c->errstr : "out of memory");
        if (c) redisFree(c);
        cs->st.redis_errors++;
        cs->r_next = now_ms() + cs->r_backoff;
        cs->r_backoff = cs->r_backoff * 2 > 5000 ? 5000 : cs->r_backoff * 2;
        return false;
    }
    redisSetTimeout(c, (struct timeval){1, 0});
    cs->rc = c;
    cs->r_backoff = 100;
    cs->st.redis_up = true;
    if (cs->r_was_up) {
        cs->st.redis_reconnects++;
        fprintf(stderr, "kvsieve serve: redis %s:%d: reconnected\n", cs->rhost, cs->rport);
    }
    cs->r_was_up = true;
    return true;
}

static void redis_set(struct chunk_store *cs, uint64_t id, const uint8_t *b, size_t len) {
    if (!redis_ok(cs)) return;
    char key[80];
    redis_key(cs, id, key, sizeof key);
    redisReply *rp = redisCommand(cs->rc, "SET %s %b", key, b, len);
    if (!rp) return redis_down(cs, cs->rc->errstr);
    if (rp->type == REDIS_REPLY_ERROR) {
        fprintf(stderr, "kvsieve serve: redis SET %s: %s\n", key, rp->str);
        cs->st.redis_errors++;
    }
    freeReplyObject(rp);
}

static void redis_del(struct chunk_store *cs, uint64_t id) {
    if (!redis_ok(cs)) return;
    char key[80];
    redis_key(cs, id, key, sizeof key);
    redisReply *rp = redisCommand(cs->rc, "DEL %s", key);
    if (!rp) return redis_down(cs, cs->rc->errstr);
    freeReplyObject(rp);
}

static uint8_t *redis_get(struct chunk_store *cs, uint64_t id, size_t *len) {
    if (!redis_ok(cs)) return NULL;
    char key[80];
    redis_key(cs, id, key, sizeof key);
    redisReply *rp = redisCommand(cs->rc, "GET %s", key);
    if (!rp) {
        redis_down(cs, cs->rc->errstr);
        return NULL;
    }
    uint8_t *b = NULL;
    if (rp->type == REDIS_REPLY_STRING && rp->len > 0 && (b = malloc(rp->len))) {
        memcpy(b, rp->str, rp->len);
        *len = rp->len;
    } else if (rp->type == REDIS_REPLY_ERROR) {
        fprintf(stderr, "kvsieve serve: redis GET %s: %s\n", key, rp->str);
        cs->st.redis_errors++;
    }
    freeReplyObject(rp);
    return b;
}

/* ---- RAM tier ------------------------------------------------------------------------- */

/* one access of rec's page: the policy may evict another record's KV from RAM */
static void ram_access(struct chunk_store *cs, struct chunk_rec *r) {
    int64_t page = (int64_t)r->id;
    int bit = page_predict(cs->pred, page);
    if (bit < 0) bit = 1;
    if (cs->trace) fprintf(cs->trace, "%lld %d\n", (long long)page, bit);
    struct page_req rq = {.page = page, .size = 1, .bit = (uint8_t)bit};
    struct page_result res;
    r->last_used = ++cs->clock;
    if (page_access(cs->pc, &rq, &res) != KVS_OK) return;
    if (!res.evicted) return;
    struct chunk_rec *v = find(cs, (uint64_t)res.victim);
    if (!v || v == r || !v->node) return;
    kvs_prefix_unref(v->node);
    v->node = NULL;
    cs->st.ram_records--;
    cs->st.ram_bytes -= (int64_t)v->bytes;
    cs->st.evictions_ram++;
    if (!v->on_disk) drop_rec(cs, v); /* nowhere local: Redis (if any) still has it */
}

static void ram_hold(struct chunk_store *cs, struct chunk_rec *r) {
    cs->st.ram_records++;
    cs->st.ram_bytes += (int64_t)r->bytes;
}

/* ---- the store ------------------------------------------------------------------------ */

struct chunk_store *chunk_store_new(const struct chunk_cfg *cfg, kvs_context *ctx,
                                    const kvs_model *m, char *err, size_t errlen) {
    struct chunk_store *cs = calloc(1, sizeof *cs);
    if (!cs) return NULL;
    cs->cfg = *cfg;
    cs->ctx = ctx;
    cs->m = m;
    cs->fp = kvs_model_fingerprint(m);
    cs->w = cfg->min_tokens < WTOK ? cfg->min_tokens : WTOK;
    cs->r_backoff = 100;
    struct kvs_model_info mi;
    kvs_model_get_info(m, &mi);
    int64_t k = cfg->slots;
    if (k <= 0) {
        double rec = (double)mi.n_layer * mi.n_head_kv * (8.0 + 4.0 * mi.head_dim) * cfg->max_tokens;
        int64_t b = cfg->kv ? kvs_kv_bytes_bound_decode(ctx, cfg->kv, cfg->max_tokens, 0) : -1;
        if (b > 0) rec = (double)b; /* a compressed record of --chunk-max tokens */
        k = (int64_t)((double)cfg->mem / rec);
        if (k < 1) k = 1;
    }
    int kind = page_kind_parse(cfg->policy ? cfg->policy : "pred+lru");
    if (kind < 0 || kind == PAGE_OPT || kind == PAGE_PHASE) {
        snprintf(err, errlen, "--chunk-policy '%s': choose lru, lfu, arc, marking, pred or pred+lru",
                 cfg->policy);
        free(cs);
        return NULL;
    }
    struct page_cfg pcf = {.kind = (enum page_kind)kind, .capacity = k, .seed = 1};
    if (page_cache_new(&pcf, &cs->pc) != KVS_OK || page_predictor_new(k, &cs->pred) != KVS_OK) {
        snprintf(err, errlen, "chunk store: %s", kvs_last_error());
        chunk_store_free(cs);
        return NULL;
    }
    cs->cfg.slots = k;
    if (cfg->dir) {
        cs->dir = strdup(cfg->dir);
        mkdir(cfg->dir, 0755);
        struct stat sb;
        if (stat(cfg->dir, &sb) != 0 || !S_ISDIR(sb.st_mode) || access(cfg->dir, W_OK) != 0) {
            snprintf(err, errlen, "--chunk-dir %s: not a writable directory", cfg->dir);
            chunk_store_free(cs);
            return NULL;
        }
        disk_scan(cs);
    }
    if (cfg->redis) {
        const char *c = strrchr(cfg->redis, ':');
        char *end = NULL;
        long port = c ? strtol(c + 1, &end, 10) : 0;
        if (!c || c == cfg->redis || !end || *end || port < 1 || port > 65535) {
            snprintf(err, errlen, "--redis '%s': expected HOST:PORT", cfg->redis);
            chunk_store_free(cs);
            return NULL;
        }
        cs->rhost = strndup(cfg->redis, (size_t)(c - cfg->redis));
        cs->rport = (int)port;
        if (!redis_ok(cs))
            fprintf(stderr, "kvsieve serve: redis %s unreachable for now; serving from the local "
                    "tiers and retrying\n", cfg->redis);
    }
    if (cfg->trace) {
        cs->trace = fopen(cfg->trace, "a");
        if (!cs->trace) {
            snprintf(err, errlen, "--chunk-trace %s: %s", cfg->trace, strerror(errno));
            chunk_store_free(cs);
            return NULL;
        }
        setvbuf(cs->trace, NULL, _IOLBF, 0);
    }
    return cs;
}

void chunk_store_free(struct chunk_store *cs) {
    if (!cs) return;
    for (int b = 0; b < MAPB; b++)
        for (struct chunk_rec *r = cs->map[b], *nx; r; r = nx) {
            nx = r->hnext;
            chunk_rec_free(r);
        }
    if (cs->pc) page_cache_free(cs->pc);
    if (cs->pred) page_predictor_free(cs->pred);
    if (cs->rc) redisFree(cs->rc);
    if (cs->trace) fclose(cs->trace);
    free(cs->dir);
    free(cs->rhost);
    free(cs);
}

static bool same_toks(const struct chunk_rec *r, const int32_t *toks, int n) {
    return !toks || (r->n == n && !memcmp(r->toks, toks, sizeof *toks * (size_t)n));
}

struct chunk_rec *chunk_get(struct chunk_store *cs, uint64_t id, const int32_t *toks, int n) {
    struct chunk_rec *r = find(cs, id);
    if (r && !same_toks(r, toks, n)) r = NULL; /* a hash collision: not this chunk */
    if (r && r->node) {
        cs->st.hits_ram++;
        r->hits++;
        ram_access(cs, r);
        return r;
    }
    if (r && r->on_disk) {
        char path[4200];
        disk_path(cs, id, path, sizeof path);
        size_t len = 0;
        uint8_t *b = read_file(path, &len);
        const char *why = "cannot read it";
        struct chunk_rec *x = b ? rec_parse(cs, b, len, &why) : NULL;
        free(b);
        if (x && x->id == id && same_toks(x, r->toks, r->n)) {
            r->node = x->node;
            x->node = NULL;
            chunk_rec_free(x);
            cs->st.hits_disk++;
            r->hits++;
            ram_hold(cs, r);
            ram_access(cs, r);
            return r;
        }
        chunk_rec_free(x);
        fprintf(stderr, "kvsieve serve: %s: %s: deleted, the chunk is computed again\n", path, why);
        cs->st.corrupt++;
        disk_remove(cs, r);
        drop_rec(cs, r);
        r = NULL;
    }
    if (cs->rhost) {
        size_t len = 0;
        uint8_t *b = redis_get(cs, id, &len);
        if (b) {
            const char *why = "";
            struct chunk_rec *x = rec_parse(cs, b, len, &why);
            if (x && x->id == id && same_toks(x, toks, n) && !find(cs, id)) {
                cs->st.hits_redis++;
                x->hits = 1;
                index_add(cs, x);
                ram_hold(cs, x);
                disk_write(cs, x, b, len);
                free(b);
                ram_access(cs, x);
                return x;
            }
            if (!x) {
                fprintf(stderr, "kvsieve serve: redis record chunk-%016llx: %s: deleted, the chunk "
                        "is computed again\n", (unsigned long long)id, why);
                cs->st.corrupt++;
                redis_del(cs, id);
            }
            chunk_rec_free(x);
            free(b);
        }
    }
    cs->st.misses++;
    return NULL;
}

void chunk_put(struct chunk_store *cs, struct chunk_rec *rec) {
    struct chunk_rec *have = find(cs, rec->id);
    if (have) { /* made meanwhile by another request */
        if (!have->node && same_toks(have, rec->toks, rec->n)) {
            have->node = rec->node;
            rec->node = NULL;
            ram_hold(cs, have);
            ram_access(cs, have);
        }
        chunk_rec_free(rec);
        return;
    }
    size_t len = 0;
    uint8_t *b = rec_serialize(cs, rec, &len);
    if (!b) {
        fprintf(stderr, "kvsieve serve: chunk not stored: %s\n", kvs_last_error());
        chunk_rec_free(rec);
        return;
    }
    rec->bytes = len;
    index_add(cs, rec);
    cs->st.created++;
    ram_hold(cs, rec);
    disk_write(cs, rec, b, len);
    redis_set(cs, rec->id, b, len);
    free(b);
    ram_access(cs, rec);
}

void chunk_scan(struct chunk_store *cs, const int32_t *toks, int from, int to,
                void (*f)(void *arg, struct chunk_rec *rec, int at), void *arg) {
    int w = cs->w;
    for (int i = from; i + w <= to;) {
        uint64_t h = XXH3_64bits(toks + i, sizeof *toks * (size_t)w);
        struct chunk_rec *hit = NULL;
        for (struct chunk_rec *r = cs->wmap[h % MAPB]; r && !hit; r = r->wnext)
            if (r->wkey == h && r->n <= to - i &&
                !memcmp(r->toks, toks + i, sizeof *toks * (size_t)r->n))
                hit = r;
        if (hit) {
            f(arg, hit, i);
            i += hit->n;
        } else i++;
    }
}

int chunk_plan(const struct chunk_store *cs, const struct chunk_rec *r, const uint64_t *new_ids,
               int n_new, int at, double ratio, int32_t *sel, double *cfo_out) {
    int n = r->n;
    double cfo;
    if (ratio >= 0) cfo = ratio;
    else if (n_new == 0 && r->n_ctx == 0) cfo = 0; /* first in both contexts: nothing changed */
    else {
        /* Cache-Craft (arXiv 2502.15734, Eq. 3-11 as the method notes give them):
         * a = sum_j inter_j / (|C| |C_j|), b = intra / |C|^2, CCI = sigmoid(a / b);
         * beta = attention-weighted share of the old context present now; gamma = normalised
         * Kendall tau distance of the common parts' order; CFO = alpha CCI (1 - beta (1 - gamma)) */
        double a = 0, tot = 0, common = 0;
        for (int j = 0; j < r->n_ctx; j++) {
            if (r->ctx[j].len > 0) a += r->ctx[j].inter / ((double)n * r->ctx[j].len);
            tot += r->ctx[j].inter;
        }
        double b = r->intra / ((double)n * n);
        double cci = b > 0 ? 1.0 / (1.0 + exp(-a / b)) : 1.0;
        int oi[CHUNK_MAX_CTX], ni[CHUNK_MAX_CTX], m = 0; /* common parts: old and new index */
        for (int j = 0; j < r->n_ctx; j++)
            for (int q = 0; q < n_new; q++)
                if (new_ids[q] == r->ctx[j].id && m < CHUNK_MAX_CTX) {
                    common += r->ctx[j].inter;
                    oi[m] = j, ni[m] = q, m++;
                    break;
                }
        double beta = tot > 0 ? common / tot : 0;
        int disc = 0, pairs = m * (m - 1) / 2;
        for (int x = 0; x < m; x++)
            for (int y = x + 1; y < m; y++) disc += (oi[x] < oi[y]) != (ni[x] < ni[y]);
        double gamma = pairs ? (double)disc / pairs : 0;
        cfo = cs->cfg.alpha * cci * (1.0 - beta * (1.0 - gamma));
        if (getenv("KVS_CHUNK_DEBUG"))
            fprintf(stderr, "chunk-%016llx at %d: a %.4g b %.4g CCI %.3f beta %.3f gamma %.3f "
                    "CFO %.3f (parts old %d new %d common %d)\n", (unsigned long long)r->id, at,
                    a, b, cci, beta, gamma, cfo, r->n_ctx, n_new, m);
        if (cfo > cs->cfg.miss) {
            *cfo_out = cfo;
            return -1;
        }
    }
    if (cfo > 1) cfo = 1;
    *cfo_out = cfo;
    int want = (int)ceil(cfo * n - 1e-9);
    bool *take = calloc((size_t)n, 1);
    if (!take) return -1;
    int k = 0;
    /* a chunk cached at position 0 holds the attention sink in its first token: always redo it */
    if (r->n0 == 0 && at > 0 && want < n) take[0] = true, k = 1, want += want < n;
    while (k < want) { /* most outward-looking first */
        int best = -1;
        for (int t = 0; t < n; t++)
            if (!take[t] && (best < 0 || r->outside[t] > r->outside[best])) best = t;
        if (best < 0) break;
        take[best] = true;
        k++;
    }
    int c = 0;
    for (int t = 0; t < n; t++)
        if (take[t]) sel[c++] = t;
    free(take);
    return c;
}

void chunk_note_reuse(struct chunk_store *cs, int reused, int recomputed) {
    cs->st.tokens_reused += (uint64_t)reused;
    cs->st.tokens_recomputed += (uint64_t)recomputed;
}

void chunk_note_checked(struct chunk_store *cs, int tokens) { cs->st.tokens_checked += (uint64_t)tokens; }

void chunk_stats(const struct chunk_store *cs, struct chunk_stats *out) { *out = cs->st; }

char *chunk_list_json(const struct chunk_store *cs) {
    size_t cap = 64, len = 0;
    for (int b = 0; b < MAPB; b++)
        for (struct chunk_rec *r = cs->map[b]; r; r = r->hnext) cap += 160;
    char *o = malloc(cap);
    if (!o) return NULL;
    len += (size_t)snprintf(o, cap, "[");
    for (int b = 0; b < MAPB; b++)
        for (struct chunk_rec *r = cs->map[b]; r; r = r->hnext) {
            char id[32];
            chunk_id_str(r->id, id);
            len += (size_t)snprintf(o + len, cap - len,
                                    "%s{\"id\":\"%s\",\"object\":\"chunk\",\"n_tokens\":%d,"
                                    "\"tiers\":[%s%s%s],\"hits\":%llu,\"bytes\":%llu}",
                                    len > 1 ? "," : "", id, r->n, r->node ? "\"ram\"" : "",
                                    r->node && r->on_disk ? "," : "", r->on_disk ? "\"disk\"" : "",
                                    (unsigned long long)r->hits, (unsigned long long)r->bytes);
        }
    snprintf(o + len, cap - len, "]");
    return o;
}

void chunk_tick(struct chunk_store *cs) {
    if (cs->rhost && !cs->rc) redis_ok(cs);
}
