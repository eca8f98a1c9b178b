/* sched.c — the inference thread of `kvsieve serve`: continuous batching over kvs_step, KV-byte
 * admission control, preemption by recompute, and the prefix cache (token blocks of 64 keyed by a
 * chained xxh3 hash, nodes reference counted, LRU eviction within --prefix-mem). Only this
 * thread touches the context, its sequences and prefix nodes. */
#include "server/server.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

#define BLOCK 64
#define PC_BUCKETS 4096

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* ---- prefix cache ---------------------------------------------------------------------- */

struct pnode {
    uint64_t key;
    bool compressed; /* a standalone node made by kvs_prefix_compress; key includes the spec */
    kvs_prefix *p;   /* the tree's reference */
    uint64_t last_used, bytes, checksum0; /* checksum0: at insertion */
    char *spec;      /* compressed nodes: their spec */
    struct pnode *hnext;
};

struct pcache {
    struct pnode *b[PC_BUCKETS];
    uint64_t bytes, clock;
    int n;
};

static struct pnode *pc_find(struct pcache *pc, uint64_t key, bool compressed) {
    for (struct pnode *n = pc->b[key % PC_BUCKETS]; n; n = n->hnext)
        if (n->key == key && n->compressed == compressed) return n;
    return NULL;
}

static void pc_insert(struct pcache *pc, uint64_t key, bool compressed, kvs_prefix *p,
                      const char *spec) {
    struct pnode *n = calloc(1, sizeof *n);
    if (!n) {
        kvs_prefix_unref(p);
        return;
    }
    n->key = key;
    n->compressed = compressed;
    n->p = p;
    n->bytes = kvs_prefix_bytes(p);
    n->checksum0 = kvs_prefix_checksum(p);
    n->spec = spec ? strdup(spec) : NULL;
    n->last_used = ++pc->clock;
    n->hnext = pc->b[key % PC_BUCKETS];
    pc->b[key % PC_BUCKETS] = n;
    pc->bytes += n->bytes;
    pc->n++;
}

/* evict unreferenced nodes (only the tree holds them), least recently used first, until the
 * cache fits `limit` bytes */
static uint64_t pc_evict(struct pcache *pc, uint64_t limit) {
    uint64_t evicted = 0;
    while (pc->bytes > limit) {
        struct pnode **best = NULL;
        for (int i = 0; i < PC_BUCKETS; i++)
            for (struct pnode **pp = &pc->b[i]; *pp; pp = &(*pp)->hnext)
                if (kvs_prefix_refcount((*pp)->p) == 1 &&
                    (!best || (*pp)->last_used < (*best)->last_used))
                    best = pp;
        if (!best) break;
        struct pnode *n = *best;
        *best = n->hnext;
        pc->bytes -= n->bytes;
        pc->n--;
        kvs_prefix_unref(n->p);
        free(n->spec);
        free(n);
        evicted++;
    }
    return evicted;
}

static void pc_free(struct pcache *pc) {
    /* children hold their parents: release leaves first by evicting everything repeatedly */
    pc_evict(pc, 0);
    for (int i = 0; i < PC_BUCKETS; i++)
        for (struct pnode *n = pc->b[i], *nx; n; n = nx) {
            nx = n->hnext;
            kvs_prefix_unref(n->p);
            free(n->spec);
            free(n);
        }
    memset(pc, 0, sizeof *pc);
}

static uint64_t block_key(const int32_t *toks, uint64_t parent) {
    return XXH3_64bits_withSeed(toks, BLOCK * sizeof *toks, parent ^ 0x6b7673696576ULL);
}
static uint64_t spec_key(const char *spec, uint64_t chain) {
    return XXH3_64bits_withSeed(spec, strlen(spec), chain);
}

/* ---- running requests ------------------------------------------------------------------ */

enum { MAX_OCC = 7 }; /* chunks per request the store handles (15 recording bounds) */

/* a chunk in a prompt: placed from a record (node), computed and cached (cache), or neither */
struct occ {
    int a, b;
    uint64_t id;
    kvs_prefix *node;  /* reuse: our reference to the record's KV */
    int32_t *sel_pos, *sel_tok;
    int n_sel;
    bool cache;
    bool blend;        /* CacheBlend: the n_sel tokens are chosen after placement, by deviation */
};

/* placed chunks whose tokens CacheBlend picks before this tick's step: the tokens [a, b) of a
 * run, whose selections go to rc_pos/rc_tok from offset off, chunk by chunk */
struct blend_job {
    struct job *j;
    int a, b, off, k0, k1; /* occ indices [k0, k1) */
};

struct run {
    kvs_sequence *seq;
    kvs_sampler *smp;
    int32_t *toks; /* prompt then generated tokens */
    int n_toks, cap_toks, n_fed;
    bool prompt_done;
    int64_t reserved;
    int max_past;
    struct kvs_detok dt;
    char *gen;     /* generated text */
    size_t gen_len, gen_cap, committed;
    double t_start, t_prompt_end;
    uint64_t order; /* admission order (youngest = largest) */
    /* prefix cache */
    int hold_end;        /* prompt tokens fed in whole blocks with .hold and published */
    uint64_t chain_key;  /* key of the last block fed (published or found) */
    kvs_prefix *last;    /* our reference to the node ending at n_fed (or NULL) */
    const char *pkv;     /* compressed-prefix spec or NULL */
    bool recompute;      /* preempted: fed again from its tokens */
    /* chunk store */
    struct occ *occ;
    int n_occ, i_occ;
    int32_t bounds[2 * MAX_OCC];
    int n_bounds;
    int32_t *rc_pos, *rc_tok; /* one recompute item over adjacent placed chunks */
};

struct sched {
    struct srv *srv;
    struct job **slots; /* n_parallel */
    struct job *waiting, *waiting_tail;
    int64_t reserved;
    uint64_t order;
    struct pcache pc;
    float *logits;      /* 64 rows */
    kvs_sequence *probe;
    int n_vocab, step_tokens;
    struct restored { /* POST /slots/{id}?action=restore: a saved cache and its tokens */
        char *path;
        int32_t *toks;
        int n;
    } *restored; /* n_parallel */
};

static void occ_free(struct run *r) {
    for (int i = 0; i < r->n_occ; i++) {
        if (r->occ[i].node) kvs_prefix_unref(r->occ[i].node);
        free(r->occ[i].sel_pos);
        free(r->occ[i].sel_tok);
    }
    free(r->occ);
    r->occ = NULL;
    free(r->rc_pos);
    free(r->rc_tok);
    r->rc_pos = r->rc_tok = NULL;
    r->n_occ = r->i_occ = r->n_bounds = 0;
}

static void run_free(struct sched *S, struct run *r) {
    if (!r) return;
    occ_free(r);
    if (r->seq) kvs_seq_free(S->srv->ctx, r->seq);
    if (r->last) kvs_prefix_unref(r->last);
    kvs_sampler_free(r->smp);
    free(r->toks);
    free(r->gen);
    free(r);
}

/* finish a job (under mu): reason or error; releases the scheduler's reference */
static void job_finish(struct sched *S, struct job *j, enum finish_reason fin,
                       const struct srv_error *err) {
    struct srv *srv = S->srv;
    struct run *r = j->run;
    if (r && r->seq) {
        S->reserved -= r->reserved;
        r->reserved = 0;
    }
    if (err) {
        j->failed = true;
        j->err = *err;
        srv->st.failed++;
    } else {
        j->finish = fin;
        srv->st.predicted_tokens += (uint64_t)j->n_gen;
        srv->st.predicted_ms += j->predicted_ms;
    }
    j->state = J_DONE;
    j->checked = true;
    if (j->slot >= 0) {
        S->slots[j->slot] = NULL;
        srv->slots[j->slot].used = false;
        srv->st.running--;
    }
    run_free(S, r);
    j->run = NULL;
    job_release(j);
    pthread_cond_broadcast(&srv->cv_out);
}

static void fail(struct sched *S, struct job *j, int status, const char *type, const char *param,
                 const char *msg) {
    struct srv_error e;
    srv_error_set(&e, status, type, param, NULL, "%s", msg);
    job_finish(S, j, FIN_NONE, &e);
}

static const char *job_kv(struct sched *S, const struct job *j) {
    return j->p.kv ? j->p.kv : S->srv->cfg.kv;
}

/* validate a newly submitted job against the context (under mu) */
static bool check_job(struct sched *S, struct job *j) {
    struct srv *srv = S->srv;
    const char *kv = job_kv(S, j);
    char msg[600];
    if (S->probe) {
        if (kvs_seq_set_kv(srv->ctx, S->probe, kv) != KVS_OK) {
            snprintf(msg, sizeof msg, "'kv': %s", kvs_last_error());
            fail(S, j, 400, "invalid_request_error", "kv", msg);
            return false;
        }
        int maxp = kvs_seq_max_tokens(srv->ctx, S->probe);
        kvs_seq_set_kv(srv->ctx, S->probe, NULL);
        if (j->n_prompt >= maxp) {
            snprintf(msg, sizeof msg, "the prompt has %d tokens, but the context holds %d (the "
                     "server's -c; shorten the prompt or use a 'kv' policy that bounds the "
                     "cache)", j->n_prompt, maxp);
            fail(S, j, 400, "invalid_request_error", j->p.kind == SRV_CHAT ? "messages" : "prompt", msg);
            return false;
        }
    }
    int64_t need = kvs_kv_bytes_bound(srv->ctx, kv, j->n_prompt + j->p.max_tokens);
    if (need < 0) {
        fail(S, j, 400, "invalid_request_error", "kv", "'kv': invalid KV spec");
        return false;
    }
    if (need > srv->cfg.kv_mem) {
        snprintf(msg, sizeof msg, "this request needs up to %lld KV bytes (%d prompt tokens + "
                 "max_tokens %d under '%s'), more than the server's --kv-mem of %lld: lower "
                 "max_tokens, shorten the prompt or choose a smaller 'kv' budget",
                 (long long)need, j->n_prompt, j->p.max_tokens, kv, (long long)srv->cfg.kv_mem);
        fail(S, j, 400, "invalid_request_error", "max_tokens", msg);
        return false;
    }
    return true;
}

static void push_tok(struct run *r, int32_t t) {
    if (r->n_toks == r->cap_toks) {
        r->cap_toks = r->cap_toks ? r->cap_toks * 2 : 256;
        r->toks = realloc(r->toks, sizeof *r->toks * (size_t)r->cap_toks);
    }
    r->toks[r->n_toks++] = t;
}

/* ---- chunk store ------------------------------------------------------------------------ */

struct cand {
    int a, b;
    uint64_t id;
};
struct scan_arg {
    struct cand *c;
    int n, cap, lim, max;
};
static void on_found(void *arg, struct chunk_rec *rec, int at) {
    struct scan_arg *sa = arg;
    if (sa->n < sa->cap && at + rec->n <= sa->lim && rec->n <= sa->max)
        sa->c[sa->n++] = (struct cand){at, at + rec->n, rec->id};
}

static void sort_cands(struct cand *c, int n) { /* by position (insertion: n is small) */
    for (int x = 1; x < n; x++)
        for (int y = x; y > 0 && c[y].a < c[y - 1].a; y--) {
            struct cand t = c[y];
            c[y] = c[y - 1], c[y - 1] = t;
        }
}

static int range_of(const struct run *r, int x) {
    int k = 0;
    while (k < r->n_bounds && r->bounds[k] <= x) k++;
    return k;
}

/* the chunks of j's prompt (the texts it named, then registered chunks recognised by their
 * tokens), and for each the decision: place its record and recompute a selection, or compute
 * and cache it. Called at admission, before the prefix cache attaches anything. */
static void plan_chunks(struct sched *S, struct job *j) {
    struct srv *srv = S->srv;
    struct run *r = j->run;
    struct chunk_store *cs = srv->chunks;
    occ_free(r);
    if (!cs || j->p.chunk_reuse == SRV_CR_OFF || r->recompute || r->n_fed) return;
    const struct chunk_cfg *cc = chunk_store_cfg(cs);
    int lim = j->chunk_register ? j->n_prompt : j->n_prompt - 1; /* the last token is computed */
    int maxn = cc->max_tokens < S->step_tokens ? cc->max_tokens : S->step_tokens;
    struct cand c[SRV_MAX_CHUNKS + 2 * MAX_OCC];
    int n = 0;
    for (int k = 0; k < j->n_chunk_at; k++) {
        int a = j->chunk_at[k][0], b = j->chunk_at[k][1];
        if (b - a >= cc->min_tokens && b - a <= maxn && b <= lim)
            c[n++] = (struct cand){a, b, chunk_id(j->toks + a, b - a)};
    }
    sort_cands(c, n);
    if (!j->chunk_register) { /* recognition in the gaps */
        struct scan_arg sa = {c, n, (int)(sizeof c / sizeof c[0]), lim, maxn};
        int from = 0, n_expl = n;
        for (int k = 0; k <= n_expl; k++) {
            int to = k < n_expl ? c[k].a : lim;
            if (to > from) chunk_scan(cs, j->toks, from, to, on_found, &sa);
            if (k < n_expl) from = c[k].b;
        }
        n = sa.n;
        sort_cands(c, n);
    }
    if (n > MAX_OCC) n = MAX_OCC;
    if (!n) return;
    r->occ = calloc((size_t)n, sizeof *r->occ);
    uint64_t parts[CHUNK_MAX_CTX];
    int np = 0;
    if (c[0].a > 0) parts[np++] = chunk_id(j->toks, c[0].a);
    int32_t *sel = malloc(sizeof *sel * (size_t)maxn);
    for (int k = 0; k < n; k++) {
        struct occ *o = &r->occ[r->n_occ++];
        o->a = c[k].a, o->b = c[k].b, o->id = c[k].id;
        int m = o->b - o->a;
        struct chunk_rec *rec = chunk_get(cs, o->id, j->toks + o->a, m);
        if (rec && j->chunk_register) j->chunks_found++;
        else if (rec) {
            int ns = 0;
            double cfo = 0;
            if (j->p.chunk_reuse == SRV_CR_ALL) {
                for (int t = 0; t < m; t++) sel[t] = t;
                ns = m;
            } else if (j->p.chunk_reuse == SRV_CR_CACHECRAFT) {
                ns = chunk_plan(cs, rec, parts, np, o->a, j->p.recompute_ratio, sel, &cfo);
            } else if (j->p.chunk_reuse == SRV_CR_CACHEBLEND) {
                double ratio = j->p.recompute_ratio >= 0 ? j->p.recompute_ratio : 0.15;
                ns = (int)ceil(ratio * m - 1e-9);
                for (int t = 0; t < ns; t++) sel[t] = t; /* chosen after placement */
                o->blend = ns > 0;
            }
            if (ns >= 0) {
                o->node = rec->node;
                kvs_prefix_ref(o->node);
                o->n_sel = ns;
                o->sel_pos = malloc(sizeof *o->sel_pos * (size_t)(ns ? ns : 1));
                o->sel_tok = malloc(sizeof *o->sel_tok * (size_t)(ns ? ns : 1));
                for (int t = 0; t < ns; t++) {
                    o->sel_pos[t] = o->a + sel[t];
                    o->sel_tok[t] = j->toks[o->a + sel[t]];
                }
            }
        } else o->cache = true;
        if (np < CHUNK_MAX_CTX) parts[np++] = o->id;
    }
    free(sel);
    for (int k = 0; k < r->n_occ; k++) { /* recording bounds: every chunk's edges */
        int e[2] = {r->occ[k].a, r->occ[k].b};
        for (int q = 0; q < 2; q++)
            if (e[q] > 0 && (!r->n_bounds || r->bounds[r->n_bounds - 1] < e[q]))
                r->bounds[r->n_bounds++] = e[q];
    }
}

/* j's chunk o was just fed (with .hold, attention recorded): make its record */
static void publish_chunk(struct sched *S, struct job *j, struct occ *o) {
    struct srv *srv = S->srv;
    struct run *r = j->run;
    kvs_prefix *node;
    if (kvs_chunk_publish(srv->ctx, r->seq, o->a, srv->cfg.chunk_kv, &node) != KVS_OK) {
        fprintf(stderr, "kvsieve serve: chunk not cached: %s\n", kvs_last_error());
        return;
    }
    int m = o->b - o->a, H = srv->mi.n_head_kv, nr = r->n_bounds + 1;
    struct chunk_rec *rec = calloc(1, sizeof *rec);
    float *sh = malloc(sizeof *sh * (size_t)m * (size_t)H * (size_t)nr);
    double *per = calloc((size_t)nr, sizeof *per);
    rec->toks = malloc(sizeof *rec->toks * (size_t)m);
    rec->outside = calloc((size_t)m, sizeof *rec->outside);
    rec->id = o->id, rec->n = m, rec->n0 = o->a, rec->node = node;
    memcpy(rec->toks, j->toks + o->a, sizeof *rec->toks * (size_t)m);
    int own = range_of(r, o->a);
    if (kvs_seq_recorded_attention(r->seq, o->a, m, sh) == nr) {
        for (int t = 0; t < m; t++) {
            double in = 0;
            for (int h = 0; h < H; h++)
                for (int q = 0; q < nr; q++) {
                    double x = sh[((size_t)t * H + h) * nr + q] / H;
                    per[q] += x;
                    if (q == own) in += x;
                }
            rec->outside[t] = (float)(1.0 - in);
        }
        rec->intra = (float)per[own];
        /* the context it was cached in: the text before the first chunk, the earlier chunks */
        if (r->occ[0].a > 0 && rec->n_ctx < CHUNK_MAX_CTX)
            rec->ctx[rec->n_ctx++] = (struct chunk_part){chunk_id(j->toks, r->occ[0].a),
                                                         r->occ[0].a, (float)per[0]};
        for (struct occ *q = r->occ; q < o && rec->n_ctx < CHUNK_MAX_CTX; q++)
            rec->ctx[rec->n_ctx++] = (struct chunk_part){q->id, q->b - q->a,
                                                         (float)per[range_of(r, q->a)]};
    } else rec->intra = (float)m;
    free(sh);
    free(per);
    chunk_put(srv->chunks, rec);
    j->chunks_cached++;
}

static void compress_prefix(struct sched *S, struct job *j);
static void prefix_attach(struct sched *S, struct job *j, bool may_hold);

/* try to admit waiting job j into a free slot (under mu); false when it does not fit now */
static bool admit(struct sched *S, struct job *j, int slot) {
    struct srv *srv = S->srv;
    const char *kv = job_kv(S, j);
    struct run *r = j->run;
    int n_total = r ? r->n_toks : j->n_prompt;
    int64_t need = kvs_kv_bytes_bound(srv->ctx, kv, j->n_prompt + j->p.max_tokens);
    if (need < 0) need = 0;
    /* publishing prompt blocks keeps them exact (.hold) until the prompt's tail: reserve the
     * whole prompt uncompressed; only when the prompt fits the context's attention rows */
    bool may_hold = !(r && r->recompute) && j->p.cache_prompt && srv->cfg.prefix_mem > 0 &&
                    j->n_prompt < srv->cfg.n_ctx && (j->n_prompt - 1) / BLOCK > 0;
    if (may_hold) {
        int64_t h = kvs_kv_bytes_bound(srv->ctx, "full", j->n_prompt);
        if (h > need) need = h;
    }
    if (S->reserved + need > srv->cfg.kv_mem && S->reserved > 0) return false;
    if (!r) {
        r = j->run = calloc(1, sizeof *r);
        struct kvs_sampler_params sp = kvs_sampler_params_default();
        sp.temp = j->p.temperature;
        sp.top_k = j->p.top_k;
        sp.top_p = j->p.top_p;
        sp.min_p = j->p.min_p;
        sp.repeat_penalty = j->p.repeat_penalty;
        sp.presence_penalty = j->p.presence_penalty;
        sp.frequency_penalty = j->p.frequency_penalty;
        if (j->p.has_seed) sp.seed = j->p.seed;
        else {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            sp.seed = XXH3_64bits(&ts, sizeof ts) ^ (uint64_t)(uintptr_t)j;
        }
        if (kvs_sampler_new(&sp, S->n_vocab, &r->smp) != KVS_OK) {
            fail(S, j, 500, "server_error", NULL, kvs_last_error());
            return true;
        }
        for (int i = 0; i < j->n_prompt; i++) {
            push_tok(r, j->toks[i]);
            kvs_sampler_accept(r->smp, j->toks[i]);
        }
        r->t_start = now_ms();
        r->pkv = j->p.prefix_kv ? j->p.prefix_kv : srv->cfg.prefix_kv;
    }
    (void)n_total;
    r->n_fed = 0;
    enum kvs_status st = kvs_seq_new(srv->ctx, &r->seq);
    if (st == KVS_OK) st = kvs_seq_set_kv(srv->ctx, r->seq, kv);
    /* statistics for compressing its prefix under prefix_kv later; without one the sequence
     * keeps only what its own policy needs, so greedy output equals `kvsieve run`'s */
    if (st == KVS_OK && r->pkv) st = kvs_seq_keep_stats(srv->ctx, r->seq, true);
    if (st != KVS_OK) {
        fail(S, j, st == KVS_ERR_INVALID_ARG ? 400 : 500,
             st == KVS_ERR_INVALID_ARG ? "invalid_request_error" : "server_error",
             st == KVS_ERR_INVALID_ARG ? "kv" : NULL, kvs_last_error());
        return true;
    }
    r->max_past = kvs_seq_max_tokens(srv->ctx, r->seq);
    /* a cache restored into this slot, whose tokens start the prompt: continue from it */
    struct restored *rs = j->p.id_slot == slot ? &S->restored[slot] : NULL;
    if (rs && rs->path && !r->recompute && rs->n < j->n_prompt &&
        !memcmp(rs->toks, j->toks, sizeof *rs->toks * (size_t)rs->n)) {
        if (kvs_seq_load(srv->ctx, r->seq, rs->path) == KVS_OK && kvs_seq_n_past(r->seq) == rs->n) {
            r->n_fed = rs->n;
            j->n_cached = rs->n;
        } else kvs_seq_reset(srv->ctx, r->seq);
    }
    kvs_seq_pin(srv->ctx, r->seq, j->n_pin); /* after a load or a reset, which unpin */
    if (j->n_prompt >= r->max_past) {
        char msg[300];
        snprintf(msg, sizeof msg, "the prompt has %d tokens, but the context holds %d",
                 j->n_prompt, r->max_past);
        fail(S, j, 400, "invalid_request_error", j->p.kind == SRV_CHAT ? "messages" : "prompt", msg);
        return true;
    }
    r->reserved = need;
    S->reserved += need;
    r->prompt_done = false;
    r->order = ++S->order;
    r->hold_end = 0;
    r->chain_key = 0;
    if (r->last) kvs_prefix_unref(r->last);
    r->last = NULL;
    j->slot = slot;
    j->state = J_RUNNING;
    S->slots[slot] = j;
    srv->st.running++;
    srv->slots[slot].used = true;
    snprintf(srv->slots[slot].request_id, sizeof srv->slots[slot].request_id, "%s", j->id);
    snprintf(srv->slots[slot].kv, sizeof srv->slots[slot].kv, "%s",
             kvs_seq_kv(srv->ctx, r->seq));

    plan_chunks(S, j);
    if (j->chunk_register && j->chunks_found) { /* POST /v1/chunks: the record exists */
        job_finish(S, j, FIN_LENGTH, NULL);
        return true;
    }
    prefix_attach(S, j, may_hold);
    /* chunks to cache: record where their tokens' attention goes (Cache-Craft's metadata) */
    bool rec_on = false;
    for (int k = 0; k < r->n_occ; k++) {
        if (r->occ[k].a < r->n_fed) r->occ[k].cache = false; /* covered by a prefix hit */
        rec_on |= r->occ[k].cache;
    }
    while (r->i_occ < r->n_occ && r->occ[r->i_occ].a < r->n_fed) r->i_occ++;
    if (rec_on && kvs_seq_record_attention(srv->ctx, r->seq, r->bounds, r->n_bounds) != KVS_OK)
        for (int k = 0; k < r->n_occ; k++) r->occ[k].cache = false;
    return true;
}

/* prefix cache: attach the longest cached chain of whole blocks (one prompt token at least is
 * left to evaluate; none past the first chunk of the prompt), then feed the following whole
 * blocks with .hold and publish them */
static void prefix_attach(struct sched *S, struct job *j, bool may_hold) {
    struct srv *srv = S->srv;
    struct run *r = j->run;
    if (r->recompute || r->n_fed || !j->p.cache_prompt || srv->cfg.prefix_mem <= 0) return;
    int nb = (j->n_prompt - 1) / BLOCK;
    if (r->n_occ && nb > r->occ[0].a / BLOCK) nb = r->occ[0].a / BLOCK;
    if (nb <= 0) return;
    uint64_t key = 0, best_key = 0;
    int best = 0;
    struct pnode *bn = NULL, *cn = NULL;
    for (int b = 0; b < nb; b++) {
        key = block_key(j->toks + b * BLOCK, key);
        if (r->pkv) {
            struct pnode *c = pc_find(&S->pc, spec_key(r->pkv, key), true);
            if (c) cn = c;
        }
        if (best == b) {
            struct pnode *n = pc_find(&S->pc, key, false);
            if (n) {
                bn = n;
                best = b + 1;
                best_key = key;
            }
        }
    }
    if (cn) { /* a compressed copy of a prefix under this request's prefix_kv */
        if (kvs_seq_attach_prefix(srv->ctx, r->seq, cn->p) == KVS_OK) {
            cn->last_used = ++S->pc.clock;
            r->n_fed = kvs_prefix_n_tokens(cn->p);
            j->n_cached = r->n_fed;
            srv->st.prefix_hits++;
            srv->st.prefix_tokens_reused += (uint64_t)r->n_fed;
        }
        return; /* nothing is published after a compressed prefix */
    }
    if (bn) {
        if (kvs_seq_attach_prefix(srv->ctx, r->seq, bn->p) != KVS_OK) return;
        /* touch the chain */
        uint64_t k2 = 0;
        for (int b = 0; b < best; b++) {
            k2 = block_key(j->toks + b * BLOCK, k2);
            struct pnode *n = pc_find(&S->pc, k2, false);
            if (n) n->last_used = ++S->pc.clock;
        }
        r->n_fed = best * BLOCK;
        j->n_cached = r->n_fed;
        r->chain_key = best_key;
        r->last = bn->p;
        kvs_prefix_ref(r->last);
        srv->st.prefix_hits++;
        srv->st.prefix_tokens_reused += (uint64_t)r->n_fed;
    }
    r->hold_end = may_hold ? nb * BLOCK : 0;
    if (may_hold && r->n_fed == r->hold_end) compress_prefix(S, j);
}

/* the sequence holds exactly the prompt's whole blocks (attached or fed with .hold): compress
 * that prefix once under the request's prefix_kv, for later requests with the same spec */
static void compress_prefix(struct sched *S, struct job *j) {
    struct run *r = j->run;
    if (!r->pkv || r->n_fed == 0) return;
    uint64_t ck = spec_key(r->pkv, r->chain_key);
    if (pc_find(&S->pc, ck, true)) return;
    kvs_prefix *cp;
    enum kvs_status st = kvs_prefix_compress(S->srv->ctx, r->seq, r->pkv, &cp);
    if (st != KVS_OK) {
        fprintf(stderr, "kvsieve serve: prefix_kv '%s' not applied: %s\n", r->pkv, kvs_last_error());
        return;
    }
    pc_insert(&S->pc, ck, true, cp, r->pkv);
    S->srv->st.prefix_evictions += pc_evict(&S->pc, (uint64_t)S->srv->cfg.prefix_mem);
}

/* after a prompt chunk with .hold ends on a block boundary: publish the block */
static void publish_block(struct sched *S, struct job *j) {
    struct srv *srv = S->srv;
    struct run *r = j->run;
    int b = r->n_fed / BLOCK - 1;
    uint64_t key = block_key(r->toks + b * BLOCK, r->chain_key);
    r->chain_key = key;
    struct pnode *have = pc_find(&S->pc, key, false);
    if (have) { /* published meanwhile by another request: stop publishing this one */
        r->hold_end = r->n_fed;
        return;
    }
    kvs_prefix *p;
    if (kvs_prefix_publish(srv->ctx, r->seq, r->last, &p) != KVS_OK) {
        r->hold_end = r->n_fed;
        return;
    }
    pc_insert(&S->pc, key, false, p, NULL);
    kvs_prefix_ref(p);
    if (r->last) kvs_prefix_unref(r->last);
    r->last = p;
    srv->st.prefix_evictions += pc_evict(&S->pc, (uint64_t)srv->cfg.prefix_mem);
    if (r->n_fed == r->hold_end) compress_prefix(S, j);
}

/* earliest position >= from where a stop string occurs in full (*full) or may start (return) */
static size_t stop_scan(const struct job *j, const char *t, size_t len, size_t from,
                        long *full) {
    size_t hold = len;
    *full = -1;
    for (int k = 0; k < j->p.n_stops; k++) {
        const char *s = j->p.stops[k];
        size_t m = strlen(s);
        if (len - from >= m) {
            const char *f = memmem(t + from, len - from, s, m);
            if (f && (*full < 0 || f - t < *full)) *full = f - t;
        }
        size_t p0 = len >= m ? len - m + 1 : 0;
        if (p0 < from) p0 = from;
        for (size_t p = p0; p < len; p++)
            if (!memcmp(t + p, s, len - p)) {
                if (p < hold) hold = p;
                break;
            }
    }
    return hold;
}

static void gen_append(struct run *r, const char *s, size_t n) {
    if (r->gen_len + n + 1 > r->gen_cap) {
        r->gen_cap = (r->gen_len + n + 1) * 2;
        r->gen = realloc(r->gen, r->gen_cap);
    }
    memcpy(r->gen + r->gen_len, s, n);
    r->gen_len += n;
    r->gen[r->gen_len] = 0;
}

/* commit generated text to the client: up to a stop string (finishing) or up to what may be the
 * start of one. Returns true when a stop string was found. */
static bool commit_text(struct job *j, bool final) {
    struct run *r = j->run;
    long full;
    size_t hold = stop_scan(j, r->gen, r->gen_len, r->committed, &full);
    size_t upto = full >= 0 ? (size_t)full : final ? r->gen_len : hold;
    if (upto > r->committed) {
        job_append_out(j, r->gen + r->committed, upto - r->committed);
        r->committed = upto;
    }
    return full >= 0;
}

static void logprobs_of(struct job *j, const float *lg, int n_vocab, int32_t tok) {
    if (j->n_lps == j->cap_lps) {
        j->cap_lps = j->cap_lps ? j->cap_lps * 2 : 64;
        j->lps = realloc(j->lps, sizeof *j->lps * (size_t)j->cap_lps);
    }
    struct lp_entry *e = &j->lps[j->n_lps++];
    float mx = lg[0];
    for (int i = 1; i < n_vocab; i++) mx = lg[i] > mx ? lg[i] : mx;
    double sum = 0;
    for (int i = 0; i < n_vocab; i++) sum += exp((double)lg[i] - mx);
    float lse = mx + (float)log(sum);
    e->tok = tok;
    e->lp = lg[tok] - lse;
    e->n_top = 0;
    int k = j->p.top_logprobs;
    for (int i = 0; i < n_vocab && k > 0; i++) { /* insertion into the k best */
        float v = lg[i] - lse;
        if (e->n_top == k && v <= e->top[k - 1].lp) continue;
        int at = e->n_top < k ? e->n_top++ : k - 1;
        while (at > 0 && e->top[at - 1].lp < v) {
            e->top[at] = e->top[at - 1];
            at--;
        }
        e->top[at] = (struct lp_top){i, v};
    }
}

/* a sampled position: logits row lg for job j (under mu) */
static void on_logits(struct sched *S, struct job *j, const float *lg) {
    struct srv *srv = S->srv;
    struct run *r = j->run;
    double t = now_ms();
    if (!r->prompt_done) {
        r->prompt_done = true;
        r->t_prompt_end = t;
        if (!r->recompute) {
            j->prompt_ms = t - r->t_start;
            j->prompt_computed = j->n_prompt - j->n_cached - j->chunk_tokens_reused +
                                 j->chunk_tokens_recomputed;
            srv->st.prompt_tokens += (uint64_t)j->prompt_computed;
            srv->st.prompt_ms += j->prompt_ms;
        }
        int64_t dec = kvs_kv_bytes_bound_decode(srv->ctx, job_kv(S, j), j->n_prompt,
                                                j->p.max_tokens);
        if (dec >= 0 && dec < r->reserved) {
            S->reserved -= r->reserved - dec;
            r->reserved = dec;
        }
    }
    if (j->p.max_tokens == 0) {
        job_finish(S, j, FIN_LENGTH, NULL);
        return;
    }
    int32_t tok = kvs_sampler_sample(r->smp, lg);
    if (j->p.logprobs && !kvs_token_is_eog(srv->model, tok)) logprobs_of(j, lg, S->n_vocab, tok);
    j->predicted_ms = t - r->t_prompt_end;
    if (kvs_token_is_eog(srv->model, tok)) {
        char buf[16];
        size_t k = kvs_detok_flush(&r->dt, buf, sizeof buf);
        gen_append(r, buf, k < sizeof buf ? k : sizeof buf);
        commit_text(j, true);
        job_finish(S, j, FIN_STOP, NULL);
        return;
    }
    push_tok(r, tok);
    j->n_gen++;
    char buf[512];
    size_t k = kvs_detok_push(srv->model, &r->dt, tok, buf, sizeof buf);
    gen_append(r, buf, k < sizeof buf ? k : sizeof buf);
    bool done_len = j->n_gen >= j->p.max_tokens || r->n_toks > r->max_past ||
                    (srv->cfg.timeout_s > 0 && t - j->t_arrive > srv->cfg.timeout_s * 1e3);
    if (done_len) {
        k = kvs_detok_flush(&r->dt, buf, sizeof buf);
        gen_append(r, buf, k < sizeof buf ? k : sizeof buf);
    }
    if (commit_text(j, done_len)) {
        job_finish(S, j, FIN_STOP, NULL);
        return;
    }
    if (done_len) job_finish(S, j, FIN_LENGTH, NULL);
    else pthread_cond_broadcast(&srv->cv_out);
}

/* drop the youngest running job's cache and queue it again at the head, to be recomputed */
static bool preempt_youngest(struct sched *S) {
    struct srv *srv = S->srv;
    struct job *y = NULL;
    for (int i = 0; i < srv->cfg.n_parallel; i++)
        if (S->slots[i] && (!y || S->slots[i]->run->order > y->run->order)) y = S->slots[i];
    if (!y) return false;
    struct run *r = y->run;
    S->reserved -= r->reserved;
    r->reserved = 0;
    kvs_seq_free(srv->ctx, r->seq);
    r->seq = NULL;
    if (r->last) kvs_prefix_unref(r->last);
    r->last = NULL;
    r->recompute = true;
    r->prompt_done = false;
    occ_free(r);
    S->slots[y->slot] = NULL;
    srv->slots[y->slot].used = false;
    srv->st.running--;
    y->slot = -1;
    y->state = J_WAITING;
    y->next = S->waiting;
    S->waiting = y;
    if (!S->waiting_tail) S->waiting_tail = y;
    srv->n_queued++;
    fprintf(stderr, "kvsieve serve: out of KV memory: request %s preempted (recomputed later)\n",
            y->id);
    return true;
}

static void snapshot(struct sched *S) {
    struct srv *srv = S->srv;
    srv->st.kv_bytes = 0;
    srv->st.kv_fp16_bytes = 0;
    srv->st.n_policy = 0;
    for (int i = 0; i < srv->cfg.n_parallel; i++) {
        struct job *j = S->slots[i];
        struct slot_info *si = &srv->slots[i];
        if (!j) {
            si->used = false;
            continue;
        }
        struct run *r = j->run;
        si->used = true;
        si->n_past = kvs_seq_n_past(r->seq);
        si->n_prompt = j->n_prompt;
        si->n_gen = j->n_gen;
        si->entries = kvs_seq_entries_per_head(r->seq);
        si->kv_bytes = kvs_seq_kv_bytes(r->seq);
        si->decoding = r->prompt_done;
        srv->st.kv_bytes += si->kv_bytes;
        int own = si->n_past - j->n_cached;
        srv->st.kv_fp16_bytes += (uint64_t)(own > 0 ? own : 0) * srv->mi.kv_bytes_per_token;
        int k = 0;
        while (k < srv->st.n_policy && strcmp(srv->st.by_policy[k], si->kv)) k++;
        if (k == srv->st.n_policy && k < 8) {
            snprintf(srv->st.by_policy[k], sizeof srv->st.by_policy[k], "%s", si->kv);
            srv->st.by_policy_bytes[k] = 0;
            srv->st.n_policy++;
        }
        if (k < 8) srv->st.by_policy_bytes[k] += si->kv_bytes;
    }
    /* nodes a finished request held are evictable now: keep the cache within --prefix-mem */
    if (S->pc.bytes > (uint64_t)srv->cfg.prefix_mem)
        srv->st.prefix_evictions += pc_evict(&S->pc, (uint64_t)srv->cfg.prefix_mem);
    srv->st.prefix_bytes = S->pc.bytes;
    if (srv->chunks) {
        chunk_tick(srv->chunks);
        chunk_stats(srv->chunks, &srv->st.chunks);
        srv->st.chunks_on = true;
    }
    srv->st.prefix_nodes = (uint64_t)S->pc.n;
    int w = 0;
    for (struct job *j = S->waiting; j; j = j->next) w++;
    srv->st.waiting = w;
}

/* the tokens of a saved cache, beside it in PATH.tokens: "KVSTOK1\n", count, int32 ids */
static void save_tokens(const char *path, const int32_t *toks, int n) {
    char p[4200];
    snprintf(p, sizeof p, "%s.tokens", path);
    FILE *f = fopen(p, "wb");
    if (!f) return;
    int32_t n32 = n;
    fwrite("KVSTOK1\n", 1, 8, f);
    fwrite(&n32, sizeof n32, 1, f);
    fwrite(toks, sizeof *toks, (size_t)n, f);
    fclose(f);
}

static int32_t *load_tokens(const char *path, int *n) {
    char p[4200], magic[8];
    snprintf(p, sizeof p, "%s.tokens", path);
    FILE *f = fopen(p, "rb");
    if (!f) return NULL;
    int32_t n32 = 0;
    int32_t *t = NULL;
    if (fread(magic, 1, 8, f) == 8 && !memcmp(magic, "KVSTOK1\n", 8) &&
        fread(&n32, sizeof n32, 1, f) == 1 && n32 > 0 && n32 <= (1 << 24)) {
        t = malloc(sizeof *t * (size_t)n32);
        if (t && fread(t, sizeof *t, (size_t)n32, f) != (size_t)n32) {
            free(t);
            t = NULL;
        }
    }
    fclose(f);
    *n = n32;
    return t;
}

static void run_cmds(struct sched *S) {
    struct srv *srv = S->srv;
    while (srv->cmds) {
        struct slot_cmd *c = srv->cmds;
        srv->cmds = c->next;
        struct job *j = c->slot >= 0 && c->slot < srv->cfg.n_parallel ? S->slots[c->slot] : NULL;
        c->status = 200;
        enum kvs_status st;
        if (c->action == 0) { /* save */
            if (!j) {
                c->status = 400;
                snprintf(c->msg, sizeof c->msg, "slot %d has no running sequence to save", c->slot);
            } else if ((st = kvs_seq_save(srv->ctx, j->run->seq, c->path)) != KVS_OK) {
                c->status = st == KVS_ERR_INVALID_ARG ? 400 : 500; /* e.g. a shared prefix */
                snprintf(c->msg, sizeof c->msg, "%s", kvs_last_error());
            } else snprintf(c->msg, sizeof c->msg, "%d", kvs_seq_n_past(j->run->seq));
            if (c->status == 200) save_tokens(c->path, j->run->toks, j->run->n_fed);
        } else if (c->action == 3) { /* list the prefix cache (checksums computed now) */
            size_t cap = 256 + (size_t)S->pc.n * 256, len = 0;
            char *o = malloc(cap);
            len += (size_t)snprintf(o + len, cap - len, "[");
            for (int b = 0; b < PC_BUCKETS; b++)
                for (struct pnode *n = S->pc.b[b]; n; n = n->hnext)
                    len += (size_t)snprintf(o + len, cap - len,
                        "%s{\"block\":\"%016llx\",\"tokens\":%d,\"bytes\":%llu,\"refs\":%d,"
                        "\"compressed\":%s,\"kv\":\"%.100s\",\"checksum\":\"%016llx\","
                        "\"checksum_at_insert\":\"%016llx\"}", len > 1 ? "," : "",
                        (unsigned long long)n->key, kvs_prefix_n_tokens(n->p),
                        (unsigned long long)n->bytes, kvs_prefix_refcount(n->p),
                        n->compressed ? "true" : "false", n->spec ? n->spec : "full",
                        (unsigned long long)kvs_prefix_checksum(n->p),
                        (unsigned long long)n->checksum0);
            snprintf(o + len, cap - len, "]");
            c->out = o;
        } else if (c->action == 4) { /* list the chunk store */
            c->out = srv->chunks ? chunk_list_json(srv->chunks) : strdup("[]");
        } else if (c->action == 2) { /* erase */
            struct restored *rs = &S->restored[c->slot];
            int n = rs->path ? 1 : 0;
            free(rs->path);
            free(rs->toks);
            memset(rs, 0, sizeof *rs);
            if (j) fail(S, j, 500, "server_error", NULL, "the slot was erased (POST /slots)");
            snprintf(c->msg, sizeof c->msg, "%d", n + (j ? 1 : 0));
        } else { /* restore: check the file now, load it when a request names the slot */
            int n = 0;
            int32_t *toks = load_tokens(c->path, &n);
            if (!S->probe) {
                c->status = 501;
                snprintf(c->msg, sizeof c->msg, "restore needs -np below 64");
            } else if (!toks) {
                c->status = 400;
                snprintf(c->msg, sizeof c->msg, "cannot read %.300s.tokens (the tokens saved beside "
                         "the cache by action=save)", c->path);
            } else if (kvs_seq_load(srv->ctx, S->probe, c->path) != KVS_OK) {
                c->status = 400;
                snprintf(c->msg, sizeof c->msg, "%s", kvs_last_error());
            } else if (kvs_seq_n_past(S->probe) != n) {
                c->status = 400;
                snprintf(c->msg, sizeof c->msg, "the cache holds %d tokens but its .tokens file "
                         "%d", kvs_seq_n_past(S->probe), n);
            } else {
                struct restored *rs = &S->restored[c->slot];
                free(rs->path);
                free(rs->toks);
                rs->path = strdup(c->path);
                rs->toks = toks;
                rs->n = n;
                toks = NULL;
                snprintf(c->msg, sizeof c->msg, "%d", n);
            }
            if (S->probe) kvs_seq_reset(srv->ctx, S->probe);
            free(toks);
        }
        c->done = true;
    }
    pthread_cond_broadcast(&srv->cv_out);
}

/* CacheBlend (arXiv 2405.16444): the placed chunks' tokens run through layers 0..check layer
 * (their entries there replaced), and each chunk's n_sel tokens whose values deviate most at
 * the check layer from the placed ones are recomputed through every layer by this tick's
 * recompute item. Runs outside the lock, before the step, on the inference thread. */
static void blend_select(struct sched *S, const struct blend_job *bj) {
    struct srv *srv = S->srv;
    struct job *j = bj->j;
    struct run *r = j->run;
    int n = bj->b - bj->a;
    float *dev = malloc(sizeof *dev * (size_t)n);
    int32_t *pos = malloc(sizeof *pos * (size_t)n);
    bool ok = dev && pos;
    for (int t = 0; ok && t < n; t++) pos[t] = bj->a + t;
    if (ok && kvs_seq_chunk_deviation(srv->ctx, r->seq, j->toks + bj->a, pos, n,
                                      srv->cfg.chunk_check_layer, dev) != KVS_OK) {
        fprintf(stderr, "kvsieve serve: CacheBlend check failed (%s); recomputing the chunks' "
                "first tokens instead\n", kvs_last_error());
        ok = false;
    }
    int off = 0; /* the recompute item lists the chunks' selections in order */
    for (int k = bj->k0; k < bj->k1; k++) {
        struct occ *o = &r->occ[k];
        int m = o->b - o->a, ns = o->n_sel;
        if (ok) { /* the ns largest deviations of the chunk, in position order */
            const float *d = dev + (o->a - bj->a);
            bool *take = calloc((size_t)m, 1);
            for (int i = 0; take && i < ns; i++) {
                int best = -1;
                for (int t = 0; t < m; t++)
                    if (!take[t] && (best < 0 || d[t] > d[best])) best = t;
                take[best] = true;
            }
            for (int t = 0, q = 0; take && t < m; t++)
                if (take[t]) r->rc_pos[off + q] = o->a + t, r->rc_tok[off + q++] = j->toks[o->a + t];
            free(take);
        }
        if (getenv("KVS_CHUNK_DEBUG"))
            fprintf(stderr, "chunk %016llx at %d: CacheBlend recomputes %d of %d tokens (check "
                    "layer %d)\n", (unsigned long long)o->id, o->a, ns, m, srv->cfg.chunk_check_layer);
        off += ns;
    }
    free(dev), free(pos);
}

void *sched_main(void *arg) {
    struct srv *srv = arg;
    struct sched S0 = {0}, *S = &S0;
    S->srv = srv;
    int np = srv->cfg.n_parallel;
    S->slots = calloc((size_t)np, sizeof *S->slots);
    S->restored = calloc((size_t)np, sizeof *S->restored);
    S->n_vocab = srv->mi.n_vocab;
    S->step_tokens = kvs_context_step_tokens(srv->ctx);
    int budget = srv->cfg.batch_tokens > 0 && srv->cfg.batch_tokens < S->step_tokens
                     ? srv->cfg.batch_tokens : S->step_tokens;
    if (budget < np) budget = np;
    S->logits = malloc(sizeof(float) * (size_t)S->n_vocab * 64);
    if (np < 64 && kvs_seq_new(srv->ctx, &S->probe) != KVS_OK) S->probe = NULL;
    struct kvs_batch_item *items = calloc((size_t)np, sizeof *items);
    struct job **item_job = calloc((size_t)np, sizeof *item_job);
    int *item_kind = calloc((size_t)np, sizeof *item_kind); /* 0 prompt/decode, 1 recompute, 2 chunk */
    bool *skip = calloc((size_t)np, sizeof *skip);
    struct blend_job *blend = calloc((size_t)np, sizeof *blend);
    int n_blend = 0;

    pthread_mutex_lock(&srv->mu);
    for (;;) {
        /* new submissions: check against the context, then wait for admission */
        while (srv->submitted) {
            struct job *j = srv->submitted;
            srv->submitted = j->next;
            if (!srv->submitted) srv->submitted_tail = NULL;
            j->next = NULL;
            srv->n_queued--;
            if (srv->stopping || j->cancel) {
                fail(S, j, 503, "unavailable_error", NULL, "the server is shutting down");
                continue;
            }
            if (!check_job(S, j)) continue;
            j->checked = true;
            j->state = J_WAITING;
            srv->n_queued++;
            if (S->waiting_tail) S->waiting_tail->next = j;
            else S->waiting = j;
            S->waiting_tail = j;
            pthread_cond_broadcast(&srv->cv_out);
        }
        run_cmds(S);
        /* cancellations and shutdown */
        for (int i = 0; i < np; i++)
            if (S->slots[i] && (S->slots[i]->cancel || srv->stopping)) {
                if (srv->stopping)
                    fail(S, S->slots[i], 503, "unavailable_error", NULL,
                         "the server is shutting down");
                else job_finish(S, S->slots[i], FIN_STOP, NULL);
            }
        for (struct job **pp = &S->waiting; *pp;) {
            struct job *j = *pp;
            if (!j->cancel && !srv->stopping && srv->cfg.timeout_s > 0 && !j->run &&
                now_ms() - j->t_arrive > srv->cfg.timeout_s * 1e3) {
                *pp = j->next;
                srv->n_queued--;
                struct srv_error e;
                srv_error_set(&e, 503, "unavailable_error", NULL, "timeout", "the request waited "
                              "in the queue longer than the server's --timeout of %d s",
                              srv->cfg.timeout_s);
                job_finish(S, j, FIN_NONE, &e);
            } else if (j->cancel || srv->stopping) {
                *pp = j->next;
                srv->n_queued--;
                fail(S, j, 503, "unavailable_error", NULL, j->cancel ? "cancelled" :
                     "the server is shutting down");
            } else pp = &j->next;
        }
        S->waiting_tail = NULL;
        for (struct job *j = S->waiting; j; j = j->next) S->waiting_tail = j;
        if (srv->stopping) break;
        /* admission, first come first served */
        while (S->waiting) {
            int free_slot = -1;
            struct job *j = S->waiting;
            int want = j->p.id_slot;
            if (want >= 0 && want < np && S->restored[want].path && !j->run) {
                if (S->slots[want]) break; /* wait for the slot its cache was restored to */
                free_slot = want;
            }
            for (int i = 0; i < np && free_slot < 0; i++)
                if (!S->slots[i]) free_slot = i;
            if (free_slot < 0) break;
            S->waiting = j->next;
            if (!S->waiting) S->waiting_tail = NULL;
            j->next = NULL;
            srv->n_queued--;
            if (!admit(S, j, free_slot)) { /* back at the head; admit frees nothing then */
                j->next = S->waiting;
                S->waiting = j;
                if (!S->waiting_tail) S->waiting_tail = j;
                srv->n_queued++;
                break;
            }
        }
        /* the batch: decode tokens first, then prompt chunks in admission order */
        int n_items = 0, left = budget;
        for (int i = 0; i < np; i++) {
            struct job *j = S->slots[i];
            if (!j || !j->run->prompt_done) continue;
            struct run *r = j->run;
            items[n_items] = (struct kvs_batch_item){.seq = r->seq, .tokens = r->toks + r->n_fed,
                                                     .n = 1, .decode = true};
            item_kind[n_items] = 0;
            item_job[n_items++] = j;
            left--;
        }
        memset(skip, 0, sizeof *skip * (size_t)np);
        for (;;) {
            struct job *best = NULL;
            for (int i = 0; i < np; i++) {
                struct job *j = S->slots[i];
                bool queued = skip[i];
                for (int k = 0; k < n_items; k++) queued |= item_job[k] == j;
                if (j && !j->run->prompt_done && !queued &&
                    (!best || j->run->order < best->run->order))
                    best = j;
            }
            if (!best || left <= 0) break;
            struct run *r = best->run;
            struct occ *o = r->i_occ < r->n_occ ? &r->occ[r->i_occ] : NULL;
            while (o && !o->cache && !o->node && r->n_fed >= o->a) /* prefilled like the rest */
                o = ++r->i_occ < r->n_occ ? &r->occ[r->i_occ] : NULL;
            if (o && o->node && r->n_fed == o->a) {
                /* cached chunks: place their records here (adjacent ones together), then
                 * recompute the selected tokens of all of them in one item */
                if (o->n_sel > left) {
                    skip[best->slot] = true; /* next tick, with room for the recomputation */
                    continue;
                }
                if (!r->rc_pos) {
                    r->rc_pos = malloc(sizeof *r->rc_pos * (size_t)best->n_prompt);
                    r->rc_tok = malloc(sizeof *r->rc_tok * (size_t)best->n_prompt);
                }
                int nsel = 0, k0 = r->i_occ, a0 = r->n_fed;
                while (o && o->node && r->n_fed == o->a && nsel + o->n_sel <= left) {
                    enum kvs_status pst = kvs_seq_place_chunk(srv->ctx, r->seq, o->node);
                    kvs_prefix_unref(o->node);
                    o->node = NULL;
                    if (pst != KVS_OK) break; /* (context full) prefilled instead */
                    int m = o->b - o->a;
                    memcpy(r->rc_pos + nsel, o->sel_pos, sizeof *o->sel_pos * (size_t)o->n_sel);
                    memcpy(r->rc_tok + nsel, o->sel_tok, sizeof *o->sel_tok * (size_t)o->n_sel);
                    nsel += o->n_sel;
                    r->n_fed = o->b;
                    best->chunks_reused++;
                    best->chunk_tokens_reused += m;
                    best->chunk_tokens_recomputed += o->n_sel;
                    chunk_note_reuse(srv->chunks, m, o->n_sel);
                    o = ++r->i_occ < r->n_occ ? &r->occ[r->i_occ] : NULL;
                }
                if (r->i_occ > k0 && r->occ[k0].blend && n_blend < np) {
                    blend[n_blend++] = (struct blend_job){best, a0, r->n_fed, 0, k0, r->i_occ};
                    best->chunk_tokens_checked += r->n_fed - a0;
                    chunk_note_checked(srv->chunks, r->n_fed - a0);
                }
                if (nsel) {
                    items[n_items] = (struct kvs_batch_item){.seq = r->seq, .tokens = r->rc_tok,
                                                             .n = nsel, .recompute = true,
                                                             .pos = r->rc_pos};
                    item_kind[n_items] = 1;
                    item_job[n_items++] = best;
                    left -= nsel;
                }
                continue;
            }
            int n = r->n_toks - r->n_fed;
            bool hold = false;
            int kind = 0;
            if (r->n_fed < r->hold_end) {
                int to_block = BLOCK - r->n_fed % BLOCK;
                n = to_block;
                hold = true;
            }
            if (o && o->cache && r->n_fed >= o->a) { /* a chunk to cache: exact until published */
                n = o->b - r->n_fed;
                hold = true;
                kind = 2;
            } else if (o && r->n_fed < o->a && n > o->a - r->n_fed) n = o->a - r->n_fed;
            if (n > left) n = left;
            bool end = r->n_fed + n == r->n_toks;
            items[n_items] = (struct kvs_batch_item){.seq = r->seq, .tokens = r->toks + r->n_fed,
                                                     .n = n, .prompt_end = end, .hold = hold};
            item_kind[n_items] = kind;
            item_job[n_items++] = best;
            left -= n;
        }
        if (n_items == 0) {
            snapshot(S);
            pthread_cond_wait(&srv->cv_sched, &srv->mu);
            continue;
        }
        int n_out = 0;
        for (int k = 0; k < n_items; k++)
            if (items[k].decode || items[k].prompt_end)
                items[k].logits = S->logits + (size_t)(n_out++) * (size_t)S->n_vocab;
        pthread_mutex_unlock(&srv->mu);
        for (int b = 0; b < n_blend; b++) blend_select(S, &blend[b]);
        n_blend = 0;
        enum kvs_status st = kvs_step(srv->ctx, items, n_items);
        pthread_mutex_lock(&srv->mu);
        if (st == KVS_ERR_NOMEM && preempt_youngest(S)) continue;
        if (st != KVS_OK) {
            char msg[600];
            snprintf(msg, sizeof msg, "inference failed: %s", kvs_last_error());
            fprintf(stderr, "kvsieve serve: %s\n", msg);
            for (int k = 0; k < n_items; k++)
                if (item_job[k]->state == J_RUNNING) fail(S, item_job[k], 500, "server_error", NULL, msg);
            continue;
        }
        for (int k = 0; k < n_items; k++) {
            struct job *j = item_job[k];
            struct run *r = j->run;
            if (!r) continue;
            if (item_kind[k] == 1) continue; /* recomputed chunk tokens: n_fed already past them */
            r->n_fed += items[k].n;
            if (item_kind[k] == 2) {
                struct occ *o = &r->occ[r->i_occ];
                if (r->n_fed == o->b) {
                    publish_chunk(S, j, o);
                    r->i_occ++;
                    bool more = false; /* another chunk of this prompt to cache */
                    for (int q = r->i_occ; q < r->n_occ; q++) more |= r->occ[q].cache;
                    if (!more) kvs_seq_record_stop(srv->ctx, r->seq, r->pkv != NULL);
                }
            } else if (items[k].hold && r->n_fed % BLOCK == 0) publish_block(S, j);
            if (items[k].logits) on_logits(S, j, items[k].logits);
        }
        snapshot(S);
    }
    /* shutdown: every job has been failed above */
    snapshot(S);
    pthread_mutex_unlock(&srv->mu);
    pc_free(&S->pc);
    if (S->probe) kvs_seq_free(srv->ctx, S->probe);
    free(items);
    free(item_job);
    free(item_kind);
    free(skip);
    free(blend);
    free(S->logits);
    for (int i = 0; i < np; i++) {
        free(S->restored[i].path);
        free(S->restored[i].toks);
    }
    free(S->restored);
    free(S->slots);
    return NULL;
}
