/* learned.c — KVSLRN01 weight files of the learned scorers, and their forward (see learned.h). */
#include "learned.h"
#include "ops.h"
#include "quant.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

enum { LRN_HEADER = 128 };

static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t rd64(const uint8_t *p) { return rd32(p) | (uint64_t)rd32(p + 4) << 32; }

static enum kvs_status read_all(const char *path, uint8_t **buf, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return kvs_fail(KVS_ERR_IO, "cannot open learned-eviction weights '%s': %s", path, strerror(errno));
    uint8_t *b = NULL;
    size_t cap = 0, len = 0;
    for (;;) {
        if (len == cap) {
            size_t nc = cap ? cap * 2 : 1 << 20;
            if (nc > (size_t)1 << 30) { free(b); fclose(f); return kvs_fail(KVS_ERR_FORMAT, "'%s': larger than 1 GiB, not a weight file", path); }
            uint8_t *nb = realloc(b, nc);
            if (!nb) { free(b); fclose(f); return kvs_fail(KVS_ERR_NOMEM, "out of memory reading '%s'", path); }
            b = nb, cap = nc;
        }
        size_t r = fread(b + len, 1, cap - len, f);
        len += r;
        if (r == 0) break;
    }
    bool err = ferror(f);
    fclose(f);
    if (err) { free(b); return kvs_fail(KVS_ERR_IO, "error reading '%s'", path); }
    *buf = b, *n = len;
    return KVS_OK;
}

/* Header checks shared by load and find; sets the shapes. */
static enum kvs_status check_header(const char *path, const uint8_t *b, size_t n, uint32_t method,
                                    uint64_t fp, int n_layer, int n_head, int n_kv, int hd,
                                    struct kv_learned *l) {
    static const char *names[3] = {"?", "Locret (1)", "Attention-Gate (2)"};
    if (n < LRN_HEADER + 8 || memcmp(b, "KVSLRN01", 8))
        return kvs_fail(KVS_ERR_FORMAT, "'%s' is not a kvsieve learned-eviction file (magic KVSLRN01)", path);
    if (rd32(b + 8) != 1) return kvs_fail(KVS_ERR_FORMAT, "'%s': version %u, this kvsieve reads version 1", path, rd32(b + 8));
    l->method = rd32(b + 12);
    if (l->method != method)
        return kvs_fail(l->method == 1 || l->method == 2 ? KVS_ERR_INVALID_ARG : KVS_ERR_FORMAT,
                        "'%s': method %u, not %s", path, l->method, names[method < 3 ? method : 0]);
    l->fingerprint = rd64(b + 16);
    l->n_layer = (int)rd32(b + 24), l->n_head = (int)rd32(b + 28), l->n_head_kv = (int)rd32(b + 32);
    l->head_dim = (int)rd32(b + 36), l->hidden = (int)rd32(b + 40);
    l->labels = rd32(b + 48), l->n_train = rd32(b + 52);
    memcpy(l->name, b + 56, 63);
    l->name[63] = 0;
    uint32_t act = method == 1 ? 1 : 2;
    if (rd32(b + 44) != act)
        return kvs_fail(KVS_ERR_FORMAT, "'%s': activation %u, %s", path, rd32(b + 44),
                        method == 1 ? "only SiLU (1) is known" : "the gate is a sigmoid (2)");
    if (l->fingerprint != fp || l->n_layer != n_layer || l->n_head != n_head || l->n_head_kv != n_kv || l->head_dim != hd)
        return kvs_fail(KVS_ERR_INVALID_ARG,
                        "'%s' was trained for another model (%s: fingerprint 0x%016llx, %d layers, %d/%d "
                        "heads, head dim %d; this model: 0x%016llx, %d layers, %d/%d heads, head dim %d; "
                        "`kvsieve info` prints a model's fingerprint)", path, l->name,
                        (unsigned long long)l->fingerprint, l->n_layer, l->n_head, l->n_head_kv, l->head_dim,
                        (unsigned long long)fp, n_layer, n_head, n_kv, hd);
    if (l->hidden < 1 || l->hidden > 65536)
        return kvs_fail(KVS_ERR_FORMAT, "'%s': hidden width %d out of range", path, l->hidden);
    uint64_t per;
    if (method == 1) {
        l->d_in = (n_head + 2 * n_kv) * hd;
        per = (uint64_t)l->hidden * (uint64_t)l->d_in + (uint64_t)l->hidden + (uint64_t)n_kv * (uint64_t)l->hidden;
    } else {
        uint32_t gd = rd32(b + 120), win = rd32(b + 124);
        if (gd < 1 || gd > 256 || (uint64_t)gd * (uint64_t)l->hidden > 4096 || win > (1u << 20))
            return kvs_fail(KVS_ERR_FORMAT, "'%s': gate of %d heads x %u channels, window %u: out of range",
                            path, l->hidden, gd, win);
        l->gd = (int)gd, l->gw = (int)gd * l->hidden, l->window = (int)win;
        l->d_in = n_head * hd;
        per = 3 * ((uint64_t)l->gw * (uint64_t)l->d_in + (uint64_t)l->gw) + (uint64_t)n_kv * ((uint64_t)l->gw + 1);
    }
    uint64_t want = LRN_HEADER + (uint64_t)n_layer * per * 2 + 8;
    if (n != want)
        return kvs_fail(KVS_ERR_FORMAT, "'%s': %zu bytes, the header's shapes need %llu (truncated or damaged)",
                        path, n, (unsigned long long)want);
    uint64_t sum = XXH64(b, n - 8, 0);
    if (sum != rd64(b + n - 8))
        return kvs_fail(KVS_ERR_FORMAT, "'%s': checksum mismatch (damaged file)", path);
    return KVS_OK;
}

/* n halves at p into dst (checked finite); advances p */
static bool read_halves(const uint8_t **p, float *dst, size_t n) {
    const uint8_t *q = *p;
    for (size_t i = 0; i < n; i++) {
        float x = quant_f16_to_f32((uint16_t)(q[2 * i] | q[2 * i + 1] << 8));
        if (!isfinite(x)) return false;
        dst[i] = x;
    }
    *p = q + 2 * n;
    return true;
}

enum kvs_status kv_learned_load(const char *path, uint32_t method, uint64_t fp, int n_layer, int n_head,
                                int n_kv, int hd, struct kv_learned **out) {
    *out = NULL;
    uint8_t *b = NULL;
    size_t n = 0;
    enum kvs_status st = read_all(path, &b, &n);
    if (st != KVS_OK) return st;
    st = kv_learned_parse(path, b, n, method, fp, n_layer, n_head, n_kv, hd, out);
    free(b);
    return st;
}

enum kvs_status kv_learned_parse(const char *path, const uint8_t *b, size_t n, uint32_t method, uint64_t fp,
                                 int n_layer, int n_head, int n_kv, int hd, struct kv_learned **out) {
    *out = NULL;
    struct kv_learned *l = calloc(1, sizeof *l);
    if (!l) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    enum kvs_status st = check_header(path, b, n, method, fp, n_layer, n_head, n_kv, hd, l);
    if (st != KVS_OK) { free(l); return st; }
    snprintf(l->path, sizeof l->path, "%s", path);
    size_t H = (size_t)l->hidden, D = (size_t)l->d_in, K = (size_t)n_kv, L = (size_t)n_layer;
    size_t W = (size_t)l->gw;
    if (method == 1) {
        l->w1 = malloc(sizeof(float) * L * H * D);
        l->b1 = malloc(sizeof(float) * L * H);
        l->w2 = malloc(sizeof(float) * L * K * H);
    } else {
        l->gqkv = malloc(sizeof(float) * L * 3 * W * D);
        l->gb = malloc(sizeof(float) * L * 3 * W);
        l->gg = malloc(sizeof(float) * L * K * W);
        l->gbg = malloc(sizeof(float) * L * K);
    }
    if (method == 1 ? (!l->w1 || !l->b1 || !l->w2) : (!l->gqkv || !l->gb || !l->gg || !l->gbg)) {
        kv_learned_free(l);
        return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    }
    const uint8_t *p = b + LRN_HEADER;
    bool ok = true;
    for (size_t il = 0; il < L && ok; il++) {
        if (method == 1) {
            ok = read_halves(&p, l->w1 + il * H * D, H * D) && read_halves(&p, l->b1 + il * H, H) &&
                 read_halves(&p, l->w2 + il * K * H, K * H);
        } else {
            for (size_t m = 0; m < 3 && ok; m++) /* q', k', v': weight rows then bias */
                ok = read_halves(&p, l->gqkv + (il * 3 + m) * W * D, W * D) &&
                     read_halves(&p, l->gb + (il * 3 + m) * W, W);
            ok = ok && read_halves(&p, l->gg + il * K * W, K * W) && read_halves(&p, l->gbg + il * K, K);
        }
    }
    if (!ok) { kv_learned_free(l); return kvs_fail(KVS_ERR_FORMAT, "'%s': a weight is not finite", path); }
    *out = l;
    return KVS_OK;
}

void kv_learned_free(struct kv_learned *l) {
    if (!l) return;
    free(l->w1);
    free(l->b1);
    free(l->w2);
    free(l->gqkv);
    free(l->gb);
    free(l->gg);
    free(l->gbg);
    free(l);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

enum kvs_status kv_learned_find(const char *dir, uint32_t method, uint64_t fp, int n_layer, int n_head, int n_kv,
                                int hd, char *out, size_t n) {
    DIR *d = opendir(dir);
    if (!d) return kvs_fail(KVS_ERR_IO, "no folder '%s'", dir);
    char *names[1024];
    int nn = 0;
    for (struct dirent *e; (e = readdir(d)) && nn < 1024;) {
        size_t len = strlen(e->d_name);
        if (len > 4 && !strcmp(e->d_name + len - 4, ".lrn") && (names[nn] = strdup(e->d_name))) nn++;
    }
    closedir(d);
    qsort(names, (size_t)nn, sizeof names[0], cmp_str);
    enum kvs_status st = kvs_fail(KVS_ERR_IO, "no learned-eviction file for this model in '%s'", dir);
    for (int i = 0; i < nn; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        uint8_t hdr[LRN_HEADER];
        FILE *f = fopen(path, "rb");
        bool ok = f && fread(hdr, 1, sizeof hdr, f) == sizeof hdr;
        if (f) fclose(f);
        if (st != KVS_OK && ok && !memcmp(hdr, "KVSLRN01", 8) && rd32(hdr + 12) == method && rd64(hdr + 16) == fp &&
            rd32(hdr + 24) == (uint32_t)n_layer && rd32(hdr + 28) == (uint32_t)n_head &&
            rd32(hdr + 32) == (uint32_t)n_kv && rd32(hdr + 36) == (uint32_t)hd) {
            snprintf(out, n, "%s", path);
            st = KVS_OK;
        }
    }
    for (int i = 0; i < nn; i++) free(names[i]);
    return st;
}

void kv_learned_score(const struct kv_learned *l, int il, const float *X, int ldx, int T, float *out,
                      float *scratch) {
    size_t H = (size_t)l->hidden, D = (size_t)l->d_in, K = (size_t)l->n_head_kv;
    ops_linear_f32(scratch, (int)H, X, ldx, T, l->w1 + (size_t)il * H * D, l->b1 + (size_t)il * H, (int)H, (int)D);
    for (size_t i = 0; i < (size_t)T * H; i++) {
        float x = scratch[i];
        scratch[i] = x / (1.0f + expf(-x));
    }
    ops_linear_f32(out, (int)K, scratch, (int)H, T, l->w2 + (size_t)il * K * H, NULL, (int)K, (int)H);
}

void kv_agate_project(const struct kv_learned *l, int il, const float *X, int ldx, int T, float *out) {
    size_t W3 = 3 * (size_t)l->gw, D = (size_t)l->d_in;
    ops_linear_f32(out, (int)W3, X, ldx, T, l->gqkv + (size_t)il * W3 * D, l->gb + (size_t)il * W3, (int)W3, (int)D);
}

void kv_agate_score(const struct kv_learned *l, int il, const float *Q, int ldq, int nt,
                    const uint16_t *const *K, const uint16_t *const *V, int n, float *out, float *S,
                    float *O) {
    int gd = l->gd, W = l->gw, nkv = l->n_head_kv;
    KVS_ASSERT(nt >= 1 && nt <= 8 && n >= nt);
    float scale = 1.0f / sqrtf((float)gd), m, sum[8];
    float *Qh = O + (size_t)nt * W, *Oh = Qh + (size_t)nt * gd;
    for (int h = 0; h < l->hidden; h++) {
        for (int i = 0; i < nt; i++) memcpy(Qh + (size_t)i * gd, Q + (size_t)i * ldq + (size_t)h * gd, sizeof(float) * (size_t)gd);
        ops_attn_scores(Qh, nt, K[h], n, gd, scale, S, n);
        for (int i = 0; i < nt; i++) { /* token i sees n - nt + 1 + i rows; the rest add 0 */
            int nv = n - nt + 1 + i;
            float *row = S + (size_t)i * n;
            ops_softmax_partial(row, 1, nv, n, &m, &sum[i]);
            for (int j = nv; j < n; j++) row[j] = 0.0f;
        }
        ops_attn_accum(S, nt, n, n, V[h], gd, Oh);
        for (int i = 0; i < nt; i++)
            for (int c = 0; c < gd; c++) O[(size_t)i * W + (size_t)h * gd + c] = Oh[(size_t)i * gd + c] / sum[i];
    }
    const float *G = l->gg + (size_t)il * nkv * W, *bg = l->gbg + (size_t)il * nkv;
    for (int i = 0; i < nt; i++)
        for (int k = 0; k < nkv; k++) {
            float z = bg[k];
            for (int c = 0; c < W; c++) z += G[(size_t)k * W + c] * O[(size_t)i * W + c];
            out[(size_t)i * nkv + k] = 1.0f / (1.0f + expf(-z));
        }
}
