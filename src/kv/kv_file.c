/* kv_file.c — save and restore one sequence's KV cache (kvs_seq_save / kvs_seq_load), so that a
 * long document is prefilled (and compressed) once and then questioned many times.
 *
 * What is saved is everything that decides how the sequence continues: its position (n_past),
 * its RoPE shift (streaming pos=cache), the per-sequence scorer state, every entry of every
 * (layer, KV head) run with its position, weight and accumulated attention, and the ring of saved
 * queries of each layer. A restored sequence therefore continues bit-identically to the one that
 * was saved, decode-time compression included, when the loading context runs the same policy.
 *
 * Format, version 1. All integers and floats are little-endian (the host order; big-endian hosts
 * are refused at compile time); keys and values are IEEE binary16 rows exactly as the store holds
 * them (keys after RoPE).
 *
 *   offset size  field
 *        0    8  magic "KVSCACHE"
 *        8    4  u32 format version (1)
 *       12    4  u32 header bytes (368: where the body starts)
 *       16    8  u64 file bytes (the whole file, checksum included)
 *                -- model fingerprint: a cache is only loaded into the model that made it --
 *       24   32  architecture name, NUL-padded ("llama", "qwen2")
 *       56    4  u32 n_layer       60  4  u32 n_head      64  4  u32 n_head_kv
 *       68    4  u32 head_dim      72  4  u32 n_vocab     76  4  u32 n_embd
 *       80    8  u64 model hash: FNV-1a 64 over the GGUF tensor directory (per tensor in file
 *                order: name bytes and a NUL, u32 type, u32 n_dims, i64 ne[n_dims]) followed by
 *                the first 4 KiB of token_embd data, so another model or quantisation differs
 *                -- the sequence --
 *       88    4  i32 n_past        (next absolute position; > every stored position)
 *       92    4  i32 pos_shift     (0 <= pos_shift <= n_past)
 *       96    8  u64 rng           (per-sequence state of the random scorer)
 *      104    4  u32 flags         (bit 0: the statistic slot stored per entry; bit 1: it
 *                                   holds learned scores (locret) rather than attention)
 *      108    4  u32 qwin          (capacity of the saved-queries ring; 0 = no queries saved)
 *      112  256  KV spec text the cache was produced under, NUL-terminated (informational)
 *      368       body:
 *                for each layer il, for each KV head ih (layer-major):
 *                    u32 n; i32 pos[n] (strictly ascending); f32 w[n];
 *                    f32 acc[n] (only when flags bit 0); u16 k[n * head_dim]; u16 v[n * head_dim]
 *                when qwin > 0, for each layer il:
 *                    u32 q_n (<= qwin); i32 q_pos[q_n]; f32 q[q_n * n_head * head_dim],
 *                    oldest query first
 *   file-8       u64 CRC-64/XZ of every byte before it
 *
 * Loading maps the file and validates all of it before the sequence is touched, in this order:
 * magic, version, size (shorter than the header says: truncated), checksum (corrupted), model
 * fingerprint, sequence fields and the context's limits, then every count against the bytes that
 * follow and every position (ascending, below n_past). Only then is a new store built (capacity
 * through kv_seq_reserve, so byte accounting stays exact) and swapped in for the old one; any
 * failure leaves the sequence as it was.
 *
 * Policies: the spec text is informational. A cache made under one policy may be loaded into a
 * context running another; only the statistic slots are adapted: accumulated attention the
 * context needs but the file lacks starts at 0 (and is dropped in the other case), and the
 * newest min(file qwin, context qwin) saved queries of each layer are kept. Two policies assume
 * a shape of the cache that another policy may not leave, and such a file is refused
 * (KVS_ERR_INVALID_ARG) rather than continued wrongly: layer-wise scorers (TOVA) need the KV
 * heads of a layer to hold the same positions, and streaming pos=cache needs every head to hold
 * exactly n_past - pos_shift entries (keys rotated at their slot).
 */
#include "kv_file.h"
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kv_file.c writes the host's integer and float layout: little-endian hosts only"
#endif

/* ---- hashes ------------------------------------------------------------------------------ */

static uint64_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void) {
    const uint64_t poly = 0xC96C5795D7870F42ull; /* ECMA-182, reflected */
    for (int i = 0; i < 256; i++) {
        uint64_t c = (uint64_t)i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ poly : c >> 1;
        crc_table[0][i] = c;
    }
    for (int i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = crc_table[0][crc_table[t - 1][i] & 0xff] ^ (crc_table[t - 1][i] >> 8);
}

uint64_t kv_file_crc64(uint64_t crc, const void *data, size_t n) {
    pthread_once(&crc_once, crc_init);
    const uint8_t *p = data;
    crc = ~crc;
    for (; n >= 8; n -= 8, p += 8) { /* slicing-by-8 */
        uint64_t x;
        memcpy(&x, p, 8);
        crc ^= x;
        crc = crc_table[7][crc & 0xff] ^ crc_table[6][(crc >> 8) & 0xff] ^
              crc_table[5][(crc >> 16) & 0xff] ^ crc_table[4][(crc >> 24) & 0xff] ^
              crc_table[3][(crc >> 32) & 0xff] ^ crc_table[2][(crc >> 40) & 0xff] ^
              crc_table[1][(crc >> 48) & 0xff] ^ crc_table[0][crc >> 56];
    }
    for (; n; n--) crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

uint64_t kv_file_model_hash(const struct kvs_model *m) { return kvs_model_fingerprint(m); }

/* ---- shared helpers ------------------------------------------------------------------------ */

static uint32_t rd_u32(const uint8_t *p) { uint32_t x; memcpy(&x, p, 4); return x; }
static int32_t rd_i32(const uint8_t *p) { int32_t x; memcpy(&x, p, 4); return x; }
static uint64_t rd_u64(const uint8_t *p) { uint64_t x; memcpy(&x, p, 8); return x; }
static void wr_u32(uint8_t *p, uint32_t x) { memcpy(p, &x, 4); }
static void wr_u64(uint8_t *p, uint64_t x) { memcpy(p, &x, 8); }

static bool seq_of(const kvs_context *c, const kvs_sequence *s) {
    return s->slot >= 0 && s->slot < c->p.n_seq_max && c->seqs[s->slot] == s;
}

/* bytes of one entry in the body: pos, w, [acc], k row, v row */
static size_t entry_file_bytes(int head_dim, bool acc) {
    return 4 + 4 + (acc ? 4 : 0) + (size_t)head_dim * 2 * 2;
}

static void fill_fingerprint(uint8_t *hdr, const struct kvs_model *m) {
    const struct hparams *hp = &m->hp;
    memcpy(hdr + KV_FILE_OFF_ARCH, m->arch->name, strnlen(m->arch->name, 31));
    uint32_t f[6] = {(uint32_t)hp->n_layer, (uint32_t)hp->n_head, (uint32_t)hp->n_head_kv,
                     (uint32_t)hp->head_dim, (uint32_t)hp->n_vocab, (uint32_t)hp->n_embd};
    for (int i = 0; i < 6; i++) wr_u32(hdr + KV_FILE_OFF_N_LAYER + 4 * i, f[i]);
    wr_u64(hdr + KV_FILE_OFF_MODEL_HASH, kv_file_model_hash(m));
}

/* ---- save ------------------------------------------------------------------------------- */

struct writer {
    int fd;
    uint8_t buf[1 << 16];
    size_t n;
    uint64_t crc, total;
    int err; /* errno of the first failed write, 0 if none */
};

static void w_flush(struct writer *w) {
    w->crc = kv_file_crc64(w->crc, w->buf, w->n);
    for (size_t off = 0; off < w->n && !w->err;) {
        ssize_t r = write(w->fd, w->buf + off, w->n - off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) w->err = r < 0 ? errno : EIO;
        else off += (size_t)r;
    }
    w->n = 0;
}

static void w_put(struct writer *w, const void *data, size_t n) {
    const uint8_t *p = data;
    w->total += n;
    while (n) {
        size_t k = sizeof w->buf - w->n < n ? sizeof w->buf - w->n : n;
        memcpy(w->buf + w->n, p, k);
        w->n += k;
        p += k;
        n -= k;
        if (w->n == sizeof w->buf) w_flush(w);
    }
}

static void w_u32(struct writer *w, uint32_t x) { w_put(w, &x, 4); }

enum kvs_status kvs_seq_save(kvs_context *c, const kvs_sequence *s, const char *path) {
    enum kvs_status gst_ = kvs_gpu_refuse(c, "saving a KV cache file");
    if (gst_ != KVS_OK) return gst_;
    if (!c || !s || !path || !*path)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_save: missing context, sequence or path");
    if (!seq_of(c, s))
        return kvs_fail(KVS_ERR_INVALID_ARG, "%s: the sequence does not belong to this context",
                        path);
    if (s->kv->gate_w)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "%s: cache files do not hold Attention-Gate's own cache "
                        "yet; an agate sequence cannot be saved", path);
    const struct kv_cache *kc = &c->kv;
    const struct kv_seq *ks = s->kv;
    const int L = kc->n_layer, H = kc->n_head_kv, hd = kc->head_dim, qwin = kc->qwin;
    const size_t qsz = (size_t)kc->n_head * hd;
    const bool acc = ks->with_acc;
    if (s->prefix)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "%s: the sequence starts from a shared prefix, which "
                        "the cache file format does not store yet", path);
    for (int i = 0; i < L * H; i++)
        if (ks->h[i].nc)
            return kvs_fail(KVS_ERR_UNSUPPORTED, "%s: the cache holds packed entries (think, "
                            "kivi or mikv storage), which the cache file format does not store "
                            "yet; save it under a spec without storage parts", path);

    uint64_t size = KV_FILE_HEADER_BYTES + 8;
    for (int i = 0; i < L * H; i++) size += 4 + (uint64_t)ks->h[i].n * entry_file_bytes(hd, acc);
    if (qwin)
        for (int il = 0; il < L; il++) size += 4 + (uint64_t)ks->q_n[il] * (4 + qsz * 4);

    uint8_t hdr[KV_FILE_HEADER_BYTES] = {0};
    memcpy(hdr + KV_FILE_OFF_MAGIC, KV_FILE_MAGIC, 8);
    wr_u32(hdr + KV_FILE_OFF_VERSION, KV_FILE_VERSION);
    wr_u32(hdr + KV_FILE_OFF_HEADER, KV_FILE_HEADER_BYTES);
    wr_u64(hdr + KV_FILE_OFF_SIZE, size);
    fill_fingerprint(hdr, c->m);
    wr_u32(hdr + KV_FILE_OFF_N_PAST, (uint32_t)s->n_past);
    wr_u32(hdr + KV_FILE_OFF_POS_SHIFT, (uint32_t)s->pos_shift);
    wr_u64(hdr + KV_FILE_OFF_RNG, ks->rng);
    wr_u32(hdr + KV_FILE_OFF_FLAGS, (acc ? KV_FILE_FLAG_ACC : 0) | (acc && ks->acc_learned ? KV_FILE_FLAG_LEARNED : 0));
    wr_u32(hdr + KV_FILE_OFF_QWIN, (uint32_t)qwin);
    memcpy(hdr + KV_FILE_OFF_SPEC, s->prof->spec.text, strnlen(s->prof->spec.text, 255));

    /* write a sibling temp file, then rename it over `path` (atomic on POSIX file systems) */
    static atomic_uint counter;
    size_t tlen = strlen(path) + 48;
    char *tmp = malloc(tlen);
    struct writer *w = malloc(sizeof *w);
    if (!tmp || !w) {
        free(tmp);
        free(w);
        return kvs_fail(KVS_ERR_NOMEM, "%s: out of memory", path);
    }
    snprintf(tmp, tlen, "%s.tmp.%ld.%u", path, (long)getpid(), atomic_fetch_add(&counter, 1));
    w->fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (w->fd < 0) {
        enum kvs_status st = kvs_fail(KVS_ERR_IO, "%s: cannot create the file: %s", path,
                                      strerror(errno));
        free(tmp);
        free(w);
        return st;
    }
    w->n = 0;
    w->crc = 0;
    w->total = 0;
    w->err = 0;

    w_put(w, hdr, sizeof hdr);
    for (int il = 0; il < L; il++)
        for (int ih = 0; ih < H; ih++) {
            const struct kv_head_store *h = kv_seq_head(ks, il, ih);
            size_t n = (size_t)h->n;
            w_u32(w, (uint32_t)n);
            if (!n) continue;
            w_put(w, h->pos, n * 4);
            w_put(w, h->w, n * 4);
            if (acc) w_put(w, h->acc, n * 4);
            w_put(w, h->k, n * hd * 2);
            w_put(w, h->v, n * hd * 2);
        }
    if (qwin)
        for (int il = 0; il < L; il++) {
            int nq = ks->q_n[il];
            w_u32(w, (uint32_t)nq);
            for (int qi = 0; qi < nq; qi++) { /* oldest first */
                int slot = (ks->q_head[il] - nq + qi + qwin) % qwin;
                w_put(w, &ks->q_pos[il * qwin + slot], 4);
            }
            for (int qi = 0; qi < nq; qi++) {
                int slot = (ks->q_head[il] - nq + qi + qwin) % qwin;
                w_put(w, ks->q + ((size_t)il * qwin + slot) * qsz, qsz * 4);
            }
        }
    w_flush(w);
    uint64_t crc = w->crc;
    w_put(w, &crc, 8);
    w_flush(w);
    KVS_ASSERT(w->err || w->total == size);

    int err = w->err;
    if (!err && fsync(w->fd) != 0) err = errno;
    if (close(w->fd) != 0 && !err) err = errno;
    if (!err && rename(tmp, path) != 0) err = errno;
    enum kvs_status st = KVS_OK;
    if (err) {
        unlink(tmp);
        st = kvs_fail(KVS_ERR_IO, "%s: cannot write the cache: %s", path, strerror(err));
    }
    free(tmp);
    free(w);
    return st;
}

/* ---- load ------------------------------------------------------------------------------- */

#define BAD(...) kvs_fail(KVS_ERR_FORMAT, __VA_ARGS__)

/* printable copy of a fixed-size, NUL-padded name from the file */
static void file_name(char *out, const uint8_t *p, size_t n) {
    size_t i = 0;
    for (; i < n && p[i]; i++) out[i] = (p[i] >= 0x20 && p[i] < 0x7f) ? (char)p[i] : '?';
    out[i] = 0;
}

/* Validate the whole mapped file against context c (nothing is modified). */
static enum kvs_status validate(const kvs_context *c, const struct kv_profile *prof, const char *path, const uint8_t *map,
                                size_t size) {
    static const size_t min_size = KV_FILE_HEADER_BYTES + 8;
    const bool s_learned = kv_policy_needs(&prof->spec) & KV_NEED_LEARNED;
    if (size == 0) return BAD("%s: truncated cache file (empty)", path);
    if (memcmp(map, KV_FILE_MAGIC, size < 8 ? size : 8) != 0)
        return BAD("%s: not a kvsieve cache file (bad magic)", path);
    if (size < 12) return BAD("%s: truncated cache file (%zu bytes)", path, size);
    uint32_t version = rd_u32(map + KV_FILE_OFF_VERSION);
    if (version != KV_FILE_VERSION)
        return BAD("%s: unsupported cache version %u (this build reads version %d)", path,
                   version, KV_FILE_VERSION);
    if (size < min_size)
        return BAD("%s: truncated cache file (%zu bytes; the header alone needs %zu)", path, size,
                   min_size);
    uint64_t want = rd_u64(map + KV_FILE_OFF_SIZE);
    if (kv_file_crc64(0, map, size - 8) != rd_u64(map + size - 8)) {
        if (want > size)
            return BAD("%s: truncated cache file (%zu of %llu bytes)", path, size,
                       (unsigned long long)want);
        return BAD("%s: corrupted cache file (checksum mismatch)", path);
    }
    if (want != size || rd_u32(map + KV_FILE_OFF_HEADER) != KV_FILE_HEADER_BYTES)
        return BAD("%s: corrupted cache file (inconsistent header)", path);

    /* model fingerprint */
    const struct kvs_model *m = c->m;
    const struct hparams *hp = &m->hp;
    uint8_t mine[KV_FILE_HEADER_BYTES] = {0};
    fill_fingerprint(mine, m);
    if (memcmp(map + KV_FILE_OFF_ARCH, mine + KV_FILE_OFF_ARCH,
               KV_FILE_OFF_MODEL_HASH + 8 - KV_FILE_OFF_ARCH) != 0) {
        char arch[33];
        file_name(arch, map + KV_FILE_OFF_ARCH, 32);
        const uint8_t *f = map + KV_FILE_OFF_N_LAYER;
        return kvs_fail(KVS_ERR_INVALID_ARG,
                        "%s: cache was made with another model (file: %s, %u layers, %u/%u "
                        "heads of %u, vocab %u, fingerprint %016llx; this model: %s, %d layers, "
                        "%d/%d heads of %d, vocab %d, fingerprint %016llx)", path, arch,
                        rd_u32(f), rd_u32(f + 4), rd_u32(f + 8), rd_u32(f + 12), rd_u32(f + 16),
                        (unsigned long long)rd_u64(map + KV_FILE_OFF_MODEL_HASH), m->arch->name,
                        hp->n_layer, hp->n_head, hp->n_head_kv, hp->head_dim, hp->n_vocab,
                        (unsigned long long)rd_u64(mine + KV_FILE_OFF_MODEL_HASH));
    }

    /* sequence fields */
    int32_t n_past = rd_i32(map + KV_FILE_OFF_N_PAST);
    int32_t pos_shift = rd_i32(map + KV_FILE_OFF_POS_SHIFT);
    uint32_t flags = rd_u32(map + KV_FILE_OFF_FLAGS), qwin = rd_u32(map + KV_FILE_OFF_QWIN);
    if ((flags & ~(uint32_t)(KV_FILE_FLAG_ACC | KV_FILE_FLAG_LEARNED)) ||
        ((flags & KV_FILE_FLAG_LEARNED) && !(flags & KV_FILE_FLAG_ACC)))
        return BAD("%s: invalid cache file (unknown flags 0x%x)", path, flags);
    if (s_learned && !(flags & KV_FILE_FLAG_LEARNED))
        return kvs_fail(KVS_ERR_INVALID_ARG, "%s: this sequence runs locret, whose scores are made "
                        "when tokens are computed, and the file has none (save it from a locret run; "
                        "locret:ratio=1 keeps every entry)", path);
    if (n_past < 0 || pos_shift < 0 || pos_shift > n_past)
        return BAD("%s: invalid cache file (n_past %d, pos_shift %d)", path, n_past, pos_shift);
    if (n_past > c->n_ctx)
        return kvs_fail(KVS_ERR_INVALID_ARG, "%s: the cache holds %d tokens, more than the "
                        "context size %d", path, n_past, c->n_ctx);
    if (qwin > (1u << 20)) return BAD("%s: invalid cache file (qwin %u)", path, qwin);
    if (!memchr(map + KV_FILE_OFF_SPEC, 0, 256))
        return BAD("%s: invalid cache file (unterminated spec text)", path);

    /* body: counts against the bytes present, positions ascending and below n_past; and what
     * the sequence's policy assumes of a cache it continues */
    const char *spec = (const char *)map + KV_FILE_OFF_SPEC;
    const bool layerwise = kv_policy_needs(&prof->spec) & KV_NEED_LAYERWISE;
    const int hd = hp->head_dim;
    const size_t ent = entry_file_bytes(hd, flags & KV_FILE_FLAG_ACC);
    const size_t qsz = (size_t)hp->n_head * hd, end = size - 8;
    size_t off = KV_FILE_HEADER_BYTES;
    for (int il = 0; il < hp->n_layer; il++) {
        size_t head0 = off + 4; /* layer il's first head: its count, then its positions */
        for (int ih = 0; ih < hp->n_head_kv; ih++) {
            if (end - off < 4) return BAD("%s: corrupted cache file (body too short)", path);
            uint32_t n = rd_u32(map + off);
            off += 4;
            if (n > (uint32_t)c->n_ctx)
                return kvs_fail(KVS_ERR_INVALID_ARG, "%s: layer %d head %d holds %u entries, more "
                                "than the context size %d", path, il, ih, n, c->n_ctx);
            if ((end - off) / ent < n)
                return BAD("%s: corrupted cache file (body too short)", path);
            for (uint32_t j = 0; j < n; j++) {
                int32_t p = rd_i32(map + off + 4 * (size_t)j);
                if (p < 0 || p >= n_past)
                    return BAD("%s: invalid cache file (layer %d head %d: position %d outside "
                               "0..%d)", path, il, ih, p, n_past - 1);
                if (j && p <= rd_i32(map + off + 4 * (size_t)(j - 1)))
                    return BAD("%s: invalid cache file (layer %d head %d: positions not "
                               "strictly ascending at entry %u)", path, il, ih, j);
            }
            if (layerwise && (n != rd_u32(map + head0 - 4) ||
                              memcmp(map + off, map + head0, (size_t)n * 4) != 0))
                return kvs_fail(KVS_ERR_INVALID_ARG, "%s: the KV heads of layer %d hold "
                                "different entries (cache made under %s), but the sequence's "
                                "policy %s scores a layer's heads together", path, il, spec,
                                prof->spec.text);
            if (prof->spec.reindex && (int64_t)n != (int64_t)n_past - pos_shift)
                return kvs_fail(KVS_ERR_INVALID_ARG, "%s: layer %d head %d holds %u entries for "
                                "%d in-cache positions (cache made under %s); the sequence's "
                                "policy %s needs contiguous ones (use pos=abs)", path, il, ih, n,
                                n_past - pos_shift, spec, prof->spec.text);
            off += n * ent;
        }
    }
    if (qwin)
        for (int il = 0; il < hp->n_layer; il++) {
            if (end - off < 4) return BAD("%s: corrupted cache file (body too short)", path);
            uint32_t nq = rd_u32(map + off);
            off += 4;
            if (nq > qwin)
                return BAD("%s: invalid cache file (layer %d: %u saved queries, ring of %u)",
                           path, il, nq, qwin);
            if ((end - off) / (4 + qsz * 4) < nq)
                return BAD("%s: corrupted cache file (body too short)", path);
            for (uint32_t j = 0; j < nq; j++) {
                int32_t p = rd_i32(map + off + 4 * (size_t)j);
                if (p < 0 || p >= n_past || (j && p <= rd_i32(map + off + 4 * (size_t)(j - 1))))
                    return BAD("%s: invalid cache file (layer %d: saved query positions)", path,
                               il);
            }
            off += nq * (4 + qsz * 4);
        }
    if (off != end)
        return BAD("%s: corrupted cache file (%zu unexpected bytes after the body)", path,
                   end - off);
    return KVS_OK;
}

/* Build a new store from a validated file; NULL (and the last error) when out of memory. */
static struct kv_seq *build(kvs_context *c, const char *path, const uint8_t *map, bool acc, bool learned) {
    struct kv_cache *kc = &c->kv;
    struct kv_seq *ns;
    if (kv_seq_new(kc, &ns) != KVS_OK) {
        kvs_fail(KVS_ERR_NOMEM, "%s: out of memory for the KV cache", path);
        return NULL;
    }
    kv_seq_set_acc(ns, acc);
    ns->acc_learned = acc && learned;
    const int H = kc->n_head_kv, hd = kc->head_dim;
    const uint32_t fl = rd_u32(map + KV_FILE_OFF_FLAGS);
    const bool facc = fl & KV_FILE_FLAG_ACC;
    /* a slot of the other kind (attention vs learned score) is not carried over */
    const bool same_kind = !(fl & KV_FILE_FLAG_LEARNED) == !ns->acc_learned;
    const size_t ent = entry_file_bytes(hd, facc), qsz = (size_t)kc->n_head * hd;
    size_t off = KV_FILE_HEADER_BYTES;
    for (int il = 0; il < kc->n_layer; il++) {
        size_t at[KV_VIEW_MAX_HEADS];
        int32_t cnt[KV_VIEW_MAX_HEADS], most = 0;
        for (int ih = 0; ih < H; ih++) {
            cnt[ih] = (int32_t)rd_u32(map + off);
            at[ih] = off + 4;
            off += 4 + (size_t)cnt[ih] * ent;
            if (cnt[ih] > most) most = cnt[ih];
        }
        if (most && kv_seq_reserve(ns, il, most) != KVS_OK) {
            kv_seq_free(ns);
            kvs_fail(KVS_ERR_NOMEM, "%s: out of memory for the KV cache", path);
            return NULL;
        }
        for (int ih = 0; ih < H; ih++) {
            struct kv_head_store *h = kv_seq_head(ns, il, ih);
            size_t n = (size_t)cnt[ih];
            const uint8_t *p = map + at[ih];
            h->n = cnt[ih];
            if (!n) continue;
            memcpy(h->pos, p, n * 4), p += n * 4;
            memcpy(h->w, p, n * 4), p += n * 4;
            if (facc) {
                if (h->acc && same_kind) memcpy(h->acc, p, n * 4);
                else if (h->acc) memset(h->acc, 0, n * 4);
                p += n * 4;
            } else if (h->acc) {
                memset(h->acc, 0, n * 4);
            }
            memcpy(h->k, p, n * hd * 2), p += n * hd * 2;
            memcpy(h->v, p, n * hd * 2);
        }
        kv_seq_fit(ns, il); /* heads below the layer's largest give back the extra steps */
    }
    uint32_t fq = rd_u32(map + KV_FILE_OFF_QWIN);
    for (int il = 0; fq && il < kc->n_layer; il++) {
        uint32_t nq = rd_u32(map + off);
        const uint8_t *qpos = map + off + 4, *q = qpos + (size_t)nq * 4;
        off += 4 + (size_t)nq * (4 + qsz * 4);
        if (!kc->qwin) continue;
        uint32_t take = nq < (uint32_t)kc->qwin ? nq : (uint32_t)kc->qwin, skip = nq - take;
        for (uint32_t i = 0; i < take; i++) {
            ns->q_pos[il * kc->qwin + (int)i] = rd_i32(qpos + 4 * (size_t)(skip + i));
            memcpy(ns->q + ((size_t)il * kc->qwin + i) * qsz, q + (size_t)(skip + i) * qsz * 4,
                   qsz * 4);
        }
        ns->q_n[il] = (int32_t)take;
        ns->q_head[il] = (int32_t)(take % (uint32_t)kc->qwin);
    }
    ns->rng = rd_u64(map + KV_FILE_OFF_RNG);
    return ns;
}

enum kvs_status kvs_seq_load(kvs_context *c, kvs_sequence *s, const char *path) {
    enum kvs_status gst_ = kvs_gpu_refuse(c, "loading a KV cache file");
    if (gst_ != KVS_OK) return gst_;
    if (!c || !s || !path || !*path)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_load: missing context, sequence or path");
    if (!seq_of(c, s))
        return kvs_fail(KVS_ERR_INVALID_ARG, "%s: the sequence does not belong to this context",
                        path);
    if (s->kv->gate_w)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "%s: cache files do not hold Attention-Gate's own cache "
                        "yet; a sequence running agate cannot load one", path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return kvs_fail(KVS_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return kvs_fail(KVS_ERR_IO, "%s: cannot read: %s", path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return kvs_fail(KVS_ERR_IO, "%s: not a regular file", path);
    }
    size_t size = (size_t)sb.st_size;
    const uint8_t *map = NULL;
    if (size) {
        void *p = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            close(fd);
            return kvs_fail(KVS_ERR_IO, "%s: cannot map: %s", path, strerror(e));
        }
        map = p;
    }
    close(fd);

    enum kvs_status st = validate(c, s->prof, path, map, size);
    struct kv_seq *ns = st == KVS_OK ? build(c, path, map, s->kv->with_acc, s->kv->acc_learned) : NULL;
    if (st == KVS_OK && !ns) st = KVS_ERR_NOMEM;
    if (ns) {
        const char *spec = (const char *)map + KV_FILE_OFF_SPEC;
        if (strcmp(spec, s->prof->spec.text) != 0)
            kvs_log(3, "%s: cache made under --kv %s, continued under %s", path, spec,
                    s->prof->spec.text);
        kv_seq_free(s->kv);
        s->kv = ns;
        kv_seq_set_pack(ns, &s->prof->pack); /* later entries pack as the sequence's spec says */
        kvs_seq_drop_prefix(s);
        s->n_past = rd_i32(map + KV_FILE_OFF_N_PAST);
        s->pos_shift = rd_i32(map + KV_FILE_OFF_POS_SHIFT);
    }
    if (map) munmap((void *)map, size);
    return st;
}
