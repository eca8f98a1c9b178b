/* test_chunk_reuse.c — chunk caches reused at another position (Cache-Craft's engine side), on
 * the real SmolLM2 model:
 *   re-rotation: keys placed at a new position equal RoPE applied there from scratch (within fp16
 *     rounding), for random raw keys through the store;
 *   a chunk cached after context A, placed after context B with 100% of its tokens recomputed,
 *     gives the bits of prefilling B + chunk + question (then the same greedy tokens);
 *   0% recomputed differs, and so does recomputing the 30% of tokens that attended most to the
 *     other passage when the chunk was cached (the recorded attention): KL to the prefill reported;
 *   recorded attention shares sum to 1 per query and head;
 *   compressed records (kvs_chunk_publish with a spec): KIVI-4 and SnapKV-evicted records round
 *     trip through bytes, are smaller, and 100% recomputed a KIVI record gives the prefill's bits
 *     again; the low-bit re-rotation (dequantise, rotate, round) keeps each key's quantisation
 *     error (rotation is orthogonal), and that error is compared with quantising the keys at
 *     the new position from scratch.
 */
#include "kvsieve.h"
#include "engine.h"
#include "ops.h"
#include <xxhash.h>
#include "testutil.h"

#include <math.h>

static kvs_model *model;
static int n_vocab;

static kvs_context *new_ctx(bool keep_stats) {
    struct kvs_context_params p = kvs_context_params_default();
    p.keep_stats = keep_stats; /* saved queries: a record compressed by SnapKV */
    p.n_ctx = 512;
    p.n_threads = 2;
    p.n_batch = 128;
    p.n_seq_max = 8;
    kvs_context *c = NULL;
    CHECKF(kvs_context_new(model, &p, &c) == KVS_OK, "%s", kvs_last_error());
    return c;
}

static void feed(kvs_context *c, kvs_sequence *s, const int32_t *t, int n, float *logits) {
    struct kvs_batch_item it = {.seq = s, .tokens = t, .n = n, .logits = logits};
    CHECKF(kvs_step(c, &it, 1) == KVS_OK, "%s", kvs_last_error());
}

static double kl(const float *p_logits, const float *q_logits) { /* KL(p || q) of the softmaxes */
    double mp = -INFINITY, mq = -INFINITY, zp = 0, zq = 0, d = 0;
    for (int i = 0; i < n_vocab; i++) mp = fmax(mp, p_logits[i]), mq = fmax(mq, q_logits[i]);
    for (int i = 0; i < n_vocab; i++) zp += exp(p_logits[i] - mp), zq += exp(q_logits[i] - mq);
    for (int i = 0; i < n_vocab; i++) {
        double lp = p_logits[i] - mp - log(zp), lq = q_logits[i] - mq - log(zq);
        d += exp(lp) * (lp - lq);
    }
    return d;
}

static int argmax(const float *l) {
    int b = 0;
    for (int i = 1; i < n_vocab; i++)
        if (l[i] > l[b]) b = i;
    return b;
}

/* Keys rotated at position a, stored, moved by delta: equal to rotating the raw keys at a + delta. */
static void test_rerotation(kvs_context *c) {
    const struct hparams *hp = &c->m->hp;
    int hd = hp->head_dim, H = hp->n_head_kv;
    bool neox = c->m->arch->rope == ROPE_NEOX;
    struct kv_seq *src, *dst;
    CHECK(kv_seq_new(&c->kv, &src) == KVS_OK && kv_seq_new(&c->kv, &dst) == KVS_OK);
    const int n = 16, a = 37, delta = 211;
    float *raw = malloc(sizeof(float) * (size_t)n * H * hd), *k = malloc(sizeof(float) * (size_t)H * hd);
    float *cs = malloc(sizeof(float) * (size_t)hd);
    for (int i = 0; i < n * H * hd; i++) raw[i] = 3.0f * tu_randf();
    CHECK(kv_seq_reserve(src, 0, n) == KVS_OK);
    for (int t = 0; t < n; t++) {
        for (int i = 0; i < hd / 2; i++) {
            double ang = (double)(a + t) * c->inv_freq[i];
            cs[2 * i] = (float)cos(ang), cs[2 * i + 1] = (float)sin(ang);
        }
        memcpy(k, raw + (size_t)t * H * hd, sizeof(float) * (size_t)H * hd);
        ops_rope(k, H, hd, cs, neox);
        kv_seq_append(src, 0, a + t, k, k);
    }
    CHECK(kv_seq_append_range(dst, src, 0, 0, delta) == KVS_OK);
    double worst = 0;
    for (int t = 0; t < n; t++) {
        for (int i = 0; i < hd / 2; i++) {
            double ang = (double)(a + delta + t) * c->inv_freq[i];
            cs[2 * i] = (float)cos(ang), cs[2 * i + 1] = (float)sin(ang);
        }
        memcpy(k, raw + (size_t)t * H * hd, sizeof(float) * (size_t)H * hd);
        ops_rope(k, H, hd, cs, neox);
        for (int ih = 0; ih < H; ih++) {
            const struct kv_head_store *h = kv_seq_head(dst, 0, ih);
            CHECK(h->pos[t] == a + delta + t);
            float got[512];
            kv_seq_key(dst, 0, ih, t, got);
            double mx = 0, e = 0; /* error against the row's largest component */
            for (int d = 0; d < hd; d++) mx = fmax(mx, fabs(k[ih * hd + d]));
            for (int d = 0; d < hd; d++) e = fmax(e, fabs(got[d] - k[ih * hd + d]) / mx);
            if (e > worst) worst = e;
        }
    }
    /* two fp16 roundings (2^-11 each, stored at a and again after turning) and float trigonometry */
    CHECKF(worst < 2e-3, "re-rotated keys vs rotation from scratch: worst error %.3g of the row's largest", worst);
    fprintf(stderr, "re-rotation by %d (%s RoPE) vs rotation from scratch: worst error %.2g of the row's largest component\n",
            delta, neox ? "neox" : "normal", worst);
    kv_seq_free(src), kv_seq_free(dst);
    free(raw), free(k), free(cs);
}

static void test_reuse(kvs_context *c, const int32_t *ctx_a, int na, const int32_t *ctx_b, int nb,
                       const int32_t *chunk, int m, const int32_t *q, int nq) {
    float *ref = malloc(sizeof(float) * n_vocab), *got = malloc(sizeof(float) * n_vocab);
    /* the chunk cached after context A, its attention recorded (ranges: before the chunk, the chunk) */
    kvs_sequence *x, *z, *y;
    CHECK(kvs_seq_new(c, &x) == KVS_OK && kvs_seq_new(c, &z) == KVS_OK);
    /* ranges: the first token (the attention sink every query visits), the rest of the
     * context, the chunk itself */
    int32_t bounds[2] = {1, na}, bound = na;
    CHECKF(kvs_seq_record_attention(c, x, bounds, 2) == KVS_OK, "%s", kvs_last_error());
    feed(c, x, ctx_a, na, NULL);
    kvs_prefix *pa = NULL, *node = NULL;
    CHECKF(kvs_prefix_publish(c, x, NULL, &pa) == KVS_OK, "%s", kvs_last_error());
    feed(c, x, chunk, m, NULL);
    CHECKF(kvs_prefix_publish(c, x, pa, &node) == KVS_OK, "%s", kvs_last_error());
    int H = c->m->hp.n_head_kv;
    float *shares = malloc(sizeof(float) * (size_t)m * H * 3), *outside = calloc((size_t)m, sizeof(float));
    CHECK(kvs_seq_recorded_attention(x, na, m, shares) == 3);
    double worst_sum = 0;
    for (int t = 0; t < m; t++)
        for (int h = 0; h < H; h++) {
            const float *r = shares + (size_t)(t * H + h) * 3;
            worst_sum = fmax(worst_sum, fabs(r[0] + r[1] + r[2] - 1.0));
            outside[t] += r[1] / (float)H; /* attention to the other passage, sink excluded */
        }
    CHECKF(worst_sum < 1e-3, "recorded shares sum to 1 within %.3g", worst_sum);
    CHECK(kvs_seq_recorded_attention(x, na - 1 + 2 * m, 2, shares) == -1);
    {   /* recording stopped: nothing recorded any more, the accumulated-attention slot freed */
        kvs_sequence *w;
        CHECK(kvs_seq_new(c, &w) == KVS_OK);
        CHECK(kvs_seq_record_attention(c, w, bounds, 2) == KVS_OK);
        feed(c, w, ctx_a, na, NULL);
        uint64_t before = c->kv.bytes;
        CHECK(w->kv->with_acc && kvs_seq_recorded_attention(w, 0, 1, shares) == 3);
        kvs_seq_record_stop(c, w, false);
        CHECK(!w->kv->with_acc && kvs_seq_recorded_attention(w, 0, 1, shares) == -1);
        CHECKF(c->kv.bytes < before, "store bytes %llu -> %llu", (unsigned long long)before,
               (unsigned long long)c->kv.bytes);
        float *lg = malloc(sizeof(float) * n_vocab);
        feed(c, w, chunk, m, lg); /* continues on the faster paths */
        CHECK(kvs_seq_n_past(w) == na + m && isfinite(lg[0]));
        free(lg);
        kvs_seq_free(c, w);
    }

    /* reference: B + chunk + question, prefilled */
    feed(c, z, ctx_b, nb, NULL);
    feed(c, z, chunk, m, NULL);
    feed(c, z, q, nq, ref);
    int32_t ref_tok[4];
    for (int i = 0; i < 4; i++) {
        ref_tok[i] = argmax(ref);
        struct kvs_batch_item it = {.seq = z, .tokens = &ref_tok[i], .n = 1, .decode = true, .logits = ref};
        CHECK(kvs_step(c, &it, 1) == KVS_OK);
    }
    kvs_seq_reset(c, z);
    feed(c, z, ctx_b, nb, NULL);
    feed(c, z, chunk, m, NULL);
    feed(c, z, q, nq, ref);

    /* placed after B with a share of its tokens recomputed: all (bits of z), none, the most
     * outward-looking ones */
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)m), *sel = malloc(sizeof(int32_t) * (size_t)m);
    int32_t *toks = malloc(sizeof(int32_t) * (size_t)m);
    double kls[3];
    const char *names[3] = {"100%", "0%", "top 30% by recorded outside attention"};
    for (int mode = 0; mode < 3; mode++) {
        CHECK(kvs_seq_new(c, &y) == KVS_OK);
        feed(c, y, ctx_b, nb, NULL);
        CHECKF(kvs_seq_place_chunk(c, y, node) == KVS_OK, "%s", kvs_last_error());
        CHECK(kvs_seq_n_past(y) == nb + m);
        int k = 0;
        if (mode == 0) {
            for (int t = 0; t < m; t++) sel[k++] = t;
        } else if (mode == 2) {
            int want = (3 * m + 9) / 10;
            bool *taken = calloc((size_t)m, 1);
            for (int i = 0; i < want; i++) {
                int best = -1;
                for (int t = 0; t < m; t++)
                    if (!taken[t] && (best < 0 || outside[t] > outside[best])) best = t;
                taken[best] = true;
            }
            for (int t = 0; t < m; t++)
                if (taken[t]) sel[k++] = t;
            free(taken);
        }
        for (int i = 0; i < k; i++) pos[i] = nb + sel[i], toks[i] = chunk[sel[i]];
        if (k) {
            struct kvs_batch_item it = {.seq = y, .tokens = toks, .n = k, .recompute = true, .pos = pos};
            CHECKF(kvs_step(c, &it, 1) == KVS_OK, "%s", kvs_last_error());
            CHECK(kvs_seq_n_past(y) == nb + m);
        }
        feed(c, y, q, nq, got);
        kls[mode] = kl(ref, got);
        if (mode == 0) {
            bool eq = !memcmp(got, ref, sizeof(float) * n_vocab);
            CHECKF(eq, "100%% recomputed vs prefilled: max |diff| %.3g", tu_max_abs_diff(got, ref, n_vocab));
            int32_t tk;
            bool same = true;
            for (int i = 0; i < 4; i++) {
                tk = argmax(got);
                same &= tk == ref_tok[i];
                struct kvs_batch_item it = {.seq = y, .tokens = &tk, .n = 1, .decode = true, .logits = got};
                CHECK(kvs_step(c, &it, 1) == KVS_OK);
            }
            CHECK(same);
        }
        fprintf(stderr, "chunk of %d placed after %d other tokens, %-38s recomputed: KL to prefill %.3g\n",
                m, nb, names[mode], kls[mode]);
        kvs_seq_free(c, y);
    }
    CHECK(kls[0] == 0.0);
    CHECK(kls[1] > 0.0 && kls[2] > 0.0); /* the partial ones are approximations: reported */

    /* CacheBlend: values at the check layer recomputed for every token, the ones that deviate
     * most recomputed through all layers. Layer 0's values depend on the token alone: no
     * deviation there. With every token selected: the prefill's bits. */
    float *dev = malloc(sizeof(float) * (size_t)m);
    for (int t = 0; t < m; t++) pos[t] = nb + t;
    CHECK(kvs_seq_new(c, &y) == KVS_OK);
    feed(c, y, ctx_b, nb, NULL);
    CHECK(kvs_seq_place_chunk(c, y, node) == KVS_OK);
    CHECKF(kvs_seq_chunk_deviation(c, y, chunk, pos, m, 0, dev) == KVS_OK, "%s", kvs_last_error());
    double d0 = 0;
    for (int t = 0; t < m; t++) d0 = fmax(d0, dev[t]);
    CHECKF(d0 == 0.0, "layer 0 value deviation %.3g", d0);
    CHECK(kvs_seq_chunk_deviation(c, y, chunk, pos, m, c->m->hp.n_layer, dev) == KVS_ERR_INVALID_ARG);
    kvs_seq_free(c, y);
    for (int frac = 15; frac <= 100; frac += 85) {
        CHECK(kvs_seq_new(c, &y) == KVS_OK);
        feed(c, y, ctx_b, nb, NULL);
        CHECK(kvs_seq_place_chunk(c, y, node) == KVS_OK);
        for (int t = 0; t < m; t++) pos[t] = nb + t;
        CHECKF(kvs_seq_chunk_deviation(c, y, chunk, pos, m, 1, dev) == KVS_OK, "%s", kvs_last_error());
        double dsum = 0;
        for (int t = 0; t < m; t++) dsum += dev[t];
        CHECK(dsum > 0);
        int want = (frac * m + 99) / 100, k = 0;
        bool *taken = calloc((size_t)m, 1);
        for (int i = 0; i < want; i++) {
            int best = -1;
            for (int t = 0; t < m; t++)
                if (!taken[t] && (best < 0 || dev[t] > dev[best])) best = t;
            taken[best] = true;
        }
        for (int t = 0; t < m; t++)
            if (taken[t]) pos[k] = nb + t, toks[k++] = chunk[t];
        free(taken);
        struct kvs_batch_item it = {.seq = y, .tokens = toks, .n = k, .recompute = true, .pos = pos};
        CHECKF(kvs_step(c, &it, 1) == KVS_OK, "%s", kvs_last_error());
        feed(c, y, q, nq, got);
        double d = kl(ref, got);
        if (frac == 100)
            CHECKF(!memcmp(got, ref, sizeof(float) * n_vocab), "CacheBlend, every token: max |diff| %.3g",
                   tu_max_abs_diff(got, ref, n_vocab));
        fprintf(stderr, "chunk of %d placed after %d other tokens, CacheBlend top %3d%% by layer-1 "
                "value deviation recomputed: KL to prefill %.3g\n", m, nb, frac, d);
        kvs_seq_free(c, y);
    }
    free(dev);

    /* errors */
    CHECK(kvs_seq_new(c, &y) == KVS_OK);
    feed(c, y, ctx_b, nb, NULL);
    int32_t bad = nb + 3, tk = chunk[0];
    struct kvs_batch_item it = {.seq = y, .tokens = &tk, .n = 1, .recompute = true, .pos = &bad};
    CHECK(kvs_step(c, &it, 1) == KVS_ERR_INVALID_ARG); /* no entry at that position */
    CHECK(kvs_seq_record_attention(c, y, &bound, 1) == KVS_ERR_INVALID_ARG); /* holds entries */
    kvs_seq_free(c, y);

    /* a chunk record through bytes: kvs_chunk_publish (standalone, no parent), serialise,
     * read back; placed and fully recomputed, the bits of the prefill again; any flipped byte,
     * truncation or another model's fingerprint is refused */
    kvs_prefix *solo = NULL, *back = NULL;
    CHECK(kvs_seq_new(c, &y) == KVS_OK);
    feed(c, y, ctx_a, na, NULL);
    struct kvs_batch_item hi = {.seq = y, .tokens = chunk, .n = m, .hold = true};
    CHECK(kvs_step(c, &hi, 1) == KVS_OK);
    CHECKF(kvs_chunk_publish(c, y, na, NULL, &solo) == KVS_OK, "%s", kvs_last_error());
    CHECK(kvs_prefix_first(solo) == na && kvs_prefix_n_tokens(solo) == na + m);
    CHECK(kvs_chunk_publish(c, y, na + m, NULL, &back) == KVS_ERR_INVALID_ARG); /* nothing after it */
    kvs_seq_free(c, y);
    uint8_t *bytes = NULL;
    size_t nbytes = 0;
    CHECKF(kvs_prefix_serialize(solo, &bytes, &nbytes) == KVS_OK, "%s", kvs_last_error());
    CHECKF(kvs_prefix_deserialize(c, bytes, nbytes, &back) == KVS_OK, "%s", kvs_last_error());
    CHECK(kvs_prefix_checksum(back) == kvs_prefix_checksum(solo));
    CHECK(kvs_prefix_checksum(solo) == kvs_prefix_checksum(node)); /* same entries as publish's */
    CHECK(kvs_seq_new(c, &y) == KVS_OK);
    CHECK(kvs_seq_attach_prefix(c, y, back) == KVS_ERR_INVALID_ARG); /* placed, never attached */
    feed(c, y, ctx_b, nb, NULL);
    CHECKF(kvs_seq_place_chunk(c, y, back) == KVS_OK, "%s", kvs_last_error());
    for (int t = 0; t < m; t++) pos[t] = nb + t, toks[t] = chunk[t];
    struct kvs_batch_item ri = {.seq = y, .tokens = toks, .n = m, .recompute = true, .pos = pos};
    CHECK(kvs_step(c, &ri, 1) == KVS_OK);
    feed(c, y, q, nq, got);
    CHECKF(!memcmp(got, ref, sizeof(float) * n_vocab), "a record read back, 100%% recomputed vs "
           "prefilled: max |diff| %.3g", tu_max_abs_diff(got, ref, n_vocab));
    kvs_seq_free(c, y);
    int refused = 0, tries = 0;
    for (size_t off = 0; off < nbytes; off += 1 + nbytes / 97, tries++) { /* flipped bytes */
        bytes[off] ^= 0x40;
        kvs_prefix *bad = NULL;
        enum kvs_status st = kvs_prefix_deserialize(c, bytes, nbytes, &bad);
        refused += st == KVS_ERR_FORMAT && !bad;
        if (bad) kvs_prefix_unref(bad);
        bytes[off] ^= 0x40;
    }
    CHECKF(refused == tries, "flipped bytes refused: %d of %d", refused, tries);
    kvs_prefix *badp = NULL;
    CHECK(kvs_prefix_deserialize(c, bytes, nbytes - 9, &badp) == KVS_ERR_FORMAT && !badp);
    bytes[24] ^= 1; /* another model's fingerprint, checksum made right again */
    uint64_t crc = XXH64(bytes, nbytes - 8, 0);
    memcpy(bytes + nbytes - 8, &crc, 8);
    CHECK(kvs_prefix_deserialize(c, bytes, nbytes, &badp) == KVS_ERR_FORMAT && !badp);
    CHECK(strstr(kvs_last_error(), "another model") != NULL);
    fprintf(stderr, "chunk record of %d tokens: %zu bytes; read back and recomputed = prefill bits; "
            "%d flipped bytes, a truncation and a foreign fingerprint refused\n", m, nbytes, tries);
    free(bytes);
    kvs_prefix_unref(back);
    kvs_prefix_unref(solo);
    kvs_prefix_unref(node);
    kvs_prefix_unref(pa);
    kvs_seq_free(c, x), kvs_seq_free(c, z);
    free(ref), free(got), free(shares), free(outside), free(pos), free(sel), free(toks);
}

static double norm_diff(const float *a, const float *b, int n) {
    double e = 0;
    for (int i = 0; i < n; i++) e += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    return sqrt(e);
}

/* s's own entries from position p0 on, layer by layer: the same positions in every head of a
 * and b (both exact-shaped) */
static void key_errors(const kvs_sequence *a, const kvs_sequence *b, int32_t p0, int m, double *err,
                       double *keynorm, double *vdiff) {
    const struct kv_cache *kc = a->kv->owner;
    int hd = kc->head_dim, n = 0;
    *vdiff = 0;
    for (int il = 0; il < kc->n_layer; il++)
        for (int ih = 0; ih < kc->n_head_kv; ih++) {
            const struct kv_head_store *ha = kv_seq_head(a->kv, il, ih), *hb = kv_seq_head(b->kv, il, ih);
            CHECK(ha->n == hb->n);
            for (int32_t j = ha->n - m; j < ha->n; j++) {
                CHECK(ha->pos[j] == hb->pos[j] && ha->pos[j] >= p0);
                float ka[512], kb[512], va[512], vb[512];
                kv_seq_key(a->kv, il, ih, j, ka), kv_seq_key(b->kv, il, ih, j, kb);
                kv_seq_value(a->kv, il, ih, j, va), kv_seq_value(b->kv, il, ih, j, vb);
                err[n] = norm_diff(ka, kb, hd);
                double z = 0;
                for (int d = 0; d < hd; d++) z += (double)kb[d] * kb[d];
                keynorm[n++] = sqrt(z);
                *vdiff = fmax(*vdiff, norm_diff(va, vb, hd));
            }
        }
}

/* Compressed chunk records: KIVI-4 (every 32 tokens packed) and SnapKV at half the entries. */
static void test_compressed(kvs_context *c, const int32_t *ctx_a, int na, const int32_t *ctx_b,
                            int nb, const int32_t *chunk, int m, const int32_t *q, int nq) {
    float *ref = malloc(sizeof(float) * n_vocab), *got = malloc(sizeof(float) * n_vocab);
    kvs_sequence *y, *z;
    kvs_prefix *ex = NULL, *kq = NULL, *ev = NULL, *scratch = NULL;
    const char *KIVI = "kivi:bits=4,group=16,resid=0", *SNAP = "snapkv:ratio=0.5,window=8";
    CHECK(kvs_seq_new(c, &y) == KVS_OK);
    feed(c, y, ctx_a, na, NULL);
    struct kvs_batch_item hi = {.seq = y, .tokens = chunk, .n = m, .hold = true};
    CHECK(kvs_step(c, &hi, 1) == KVS_OK);
    CHECKF(kvs_chunk_publish(c, y, na, NULL, &ex) == KVS_OK, "%s", kvs_last_error());
    CHECKF(kvs_chunk_publish(c, y, na, KIVI, &kq) == KVS_OK, "%s", kvs_last_error());
    CHECKF(kvs_chunk_publish(c, y, na, SNAP, &ev) == KVS_OK, "%s", kvs_last_error());
    kvs_prefix *no = NULL;
    CHECK(kvs_chunk_publish(c, y, na, "h2o:ratio=0.5", &no) == KVS_ERR_INVALID_ARG && !no);
    CHECK(kvs_chunk_publish(c, y, na, "streaming:budget=8,pos=cache", &no) == KVS_ERR_INVALID_ARG);
    CHECK(kvs_chunk_publish(c, y, na, "kivi:bits=5", &no) == KVS_ERR_INVALID_ARG);
    CHECK(!strcmp(kvs_prefix_spec(ex), "") && strstr(kvs_prefix_spec(kq), "kivi"));
    kvs_seq_free(c, y);
    /* through bytes */
    kvs_prefix *recs[3] = {ex, kq, ev};
    size_t sizes[3];
    for (int r = 0; r < 3; r++) {
        uint8_t *b = NULL;
        size_t nbytes = 0;
        kvs_prefix *back = NULL;
        CHECKF(kvs_prefix_serialize(recs[r], &b, &nbytes) == KVS_OK, "%s", kvs_last_error());
        CHECKF(kvs_prefix_deserialize(c, b, nbytes, &back) == KVS_OK, "%s", kvs_last_error());
        CHECK(kvs_prefix_checksum(back) == kvs_prefix_checksum(recs[r]));
        CHECK(!strcmp(kvs_prefix_spec(back), kvs_prefix_spec(recs[r])));
        int refused = 0, tries = 0;
        for (size_t off = 0; off < nbytes; off += 1 + nbytes / 61, tries++) {
            b[off] ^= 0x10;
            kvs_prefix *bad = NULL;
            refused += kvs_prefix_deserialize(c, b, nbytes, &bad) == KVS_ERR_FORMAT && !bad;
            if (bad) kvs_prefix_unref(bad);
            b[off] ^= 0x10;
        }
        CHECKF(refused == tries, "record %d: flipped bytes refused %d of %d", r, refused, tries);
        sizes[r] = nbytes;
        kvs_prefix_unref(back);
        free(b);
    }
    CHECKF(sizes[1] * 2 < sizes[0] && sizes[2] * 10 < sizes[0] * 6, "record bytes: exact %zu, "
           "KIVI-4 %zu, SnapKV 0.5 %zu", sizes[0], sizes[1], sizes[2]);
    fprintf(stderr, "compressed chunk records of %d tokens: exact %zu bytes, %s %zu (%.2fx), "
            "%s %zu (%.2fx); each read back with the same checksum, flipped bytes refused\n", m,
            sizes[0], KIVI, sizes[1], (double)sizes[0] / sizes[1], SNAP, sizes[2],
            (double)sizes[0] / sizes[2]);

    /* re-rotation of low-bit keys: kq and ex placed at their own positions (after A) and moved
     * (after B); the quantisation error of each key keeps its norm when turned */
    kvs_sequence *pa_x, *pa_q, *pb_x, *pb_q, *pb_s;
    CHECK(kvs_seq_new(c, &pa_x) == KVS_OK && kvs_seq_new(c, &pa_q) == KVS_OK);
    CHECK(kvs_seq_new(c, &pb_x) == KVS_OK && kvs_seq_new(c, &pb_q) == KVS_OK);
    /* after B and A: moved by nb positions */
    feed(c, pa_x, ctx_a, na, NULL), feed(c, pa_q, ctx_a, na, NULL);
    feed(c, pb_x, ctx_b, nb, NULL), feed(c, pb_q, ctx_b, nb, NULL);
    feed(c, pb_x, ctx_a + 1, na - 1, NULL), feed(c, pb_q, ctx_a + 1, na - 1, NULL);
    CHECK(kvs_seq_place_chunk(c, pa_x, ex) == KVS_OK && kvs_seq_place_chunk(c, pa_q, kq) == KVS_OK);
    CHECK(kvs_seq_place_chunk(c, pb_x, ex) == KVS_OK && kvs_seq_place_chunk(c, pb_q, kq) == KVS_OK);
    /* from scratch: the exact keys moved after B, then quantised there */
    int nm = nb + na - 1;
    CHECKF(kvs_chunk_publish(c, pb_x, nm, KIVI, &scratch) == KVS_OK, "%s", kvs_last_error());
    CHECK(kvs_seq_new(c, &pb_s) == KVS_OK);
    feed(c, pb_s, ctx_b, nb, NULL), feed(c, pb_s, ctx_a + 1, na - 1, NULL);
    CHECK(kvs_seq_place_chunk(c, pb_s, scratch) == KVS_OK);
    const struct kv_cache *kc = &c->kv;
    int ne = kc->n_layer * kc->n_head_kv * m;
    double *e_here = malloc(sizeof(double) * ne), *e_moved = malloc(sizeof(double) * ne),
           *e_scr = malloc(sizeof(double) * ne), *kn = malloc(sizeof(double) * ne);
    double vd_here, vd_moved, vd_scr;
    key_errors(pa_q, pa_x, na, m, e_here, kn, &vd_here);
    key_errors(pb_q, pb_x, nm, m, e_moved, kn, &vd_moved);
    key_errors(pb_s, pb_x, nm, m, e_scr, kn, &vd_scr);
    double worst = 0, s_here = 0, s_moved = 0, s_scr = 0, s_norm = 0;
    for (int i = 0; i < ne; i++) {
        /* fp16 rounding of the turned row (2^-11 relative per component) on both sides */
        worst = fmax(worst, fabs(e_moved[i] - e_here[i]) / kn[i]);
        s_here += e_here[i], s_moved += e_moved[i], s_scr += e_scr[i], s_norm += kn[i];
    }
    CHECKF(worst < 3e-3, "low-bit keys: |error moved - error in place| up to %.3g of the key's norm", worst);
    CHECKF(s_here > 0 && s_moved < 1.5 * s_scr && s_scr < 1.5 * s_moved,
           "dequantise-rotate vs quantise from scratch: mean key error %.4g vs %.4g",
           s_moved / ne, s_scr / ne);
    CHECKF(vd_here > 0 && vd_moved == vd_here, "values (never turned): largest error %.3g in "
           "place, %.3g moved", vd_here, vd_moved);
    fprintf(stderr, "KIVI-4 keys moved by %d: quantisation error kept within %.2g of the key norm; "
            "mean key error %.4g (relative %.4f) vs quantised at the new position from scratch "
            "%.4g (%.4f)\n", nm - na, worst, s_moved / ne, s_moved / s_norm, s_scr / ne,
            s_scr / s_norm);
    free(e_here), free(e_moved), free(e_scr), free(kn);
    kvs_seq_free(c, pa_x), kvs_seq_free(c, pa_q), kvs_seq_free(c, pb_x), kvs_seq_free(c, pb_q);
    kvs_seq_free(c, pb_s);

    /* quality: reference B + chunk + question prefilled; each record placed after B with 0% and
     * 100% of its tokens recomputed */
    CHECK(kvs_seq_new(c, &z) == KVS_OK);
    feed(c, z, ctx_b, nb, NULL);
    feed(c, z, chunk, m, NULL);
    feed(c, z, q, nq, ref);
    kvs_seq_free(c, z);
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)m);
    const char *names[3] = {"exact", "KIVI-4", "SnapKV 0.5"};
    for (int r = 0; r < 3; r++)
        for (int all = 0; all < 2; all++) {
            CHECK(kvs_seq_new(c, &y) == KVS_OK);
            feed(c, y, ctx_b, nb, NULL);
            CHECKF(kvs_seq_place_chunk(c, y, recs[r]) == KVS_OK, "%s", kvs_last_error());
            CHECK(kvs_seq_n_past(y) == nb + m);
            if (r == 2) CHECK(kvs_seq_entries_per_head(y) < nb + 0.75 * m);
            if (all) {
                for (int t = 0; t < m; t++) pos[t] = nb + t;
                struct kvs_batch_item ri = {.seq = y, .tokens = chunk, .n = m, .recompute = true, .pos = pos};
                CHECKF(kvs_step(c, &ri, 1) == KVS_OK, "%s", kvs_last_error());
            }
            feed(c, y, q, nq, got);
            double d = kl(ref, got);
            if (all && r < 2)
                CHECKF(!memcmp(got, ref, sizeof(float) * n_vocab), "%s record, 100%% recomputed vs "
                       "prefilled: max |diff| %.3g", names[r], tu_max_abs_diff(got, ref, n_vocab));
            if (!all && r > 0) CHECK(d > 0);
            fprintf(stderr, "%-10s record placed after B, %3d%% recomputed: KL to prefill %.4g\n",
                    names[r], all ? 100 : 0, d);
            kvs_seq_free(c, y);
        }
    free(pos);
    kvs_prefix_unref(ex), kvs_prefix_unref(kq), kvs_prefix_unref(ev), kvs_prefix_unref(scratch);
    free(ref), free(got);
}

int main(void) {
    const char *path = tu_model_path();
    if (!path) {
        tu_skip("test_chunk_reuse", "model %s not found: make models", tu_model_name());
        return 77;
    }
    if (kvs_model_load(path, NULL, &model) != KVS_OK) {
        fprintf(stderr, "%s\n", kvs_last_error());
        return 1;
    }
    struct kvs_model_info mi;
    kvs_model_get_info(model, &mi);
    n_vocab = mi.n_vocab;
    kvs_context *c = new_ctx(false);
    test_rerotation(c);
    const char *a = "Passage one. The lighthouse keeper on the northern island kept a logbook of every "
                    "ship that passed, and in the winter of 1887 he counted forty-one vessels.";
    const char *b = "Passage two. Bees communicate the direction of flowers through a waggle dance. "
                    "Passage three. The recipe calls for two eggs, flour, and a pinch of salt.";
    const char *ch = " Passage four. The old bridge over the river was built of red stone in 1731 by a "
                     "mason named Tobias Reed, who carved his initials under the third arch.";
    const char *qq = " Question: who built the old bridge, and when? Answer:";
    int32_t ta[128], tb[128], tc[128], tq[64];
    int na = kvs_tokenize(model, a, strlen(a), true, false, ta, 128);
    int nb = kvs_tokenize(model, b, strlen(b), true, false, tb, 128);
    int m = kvs_tokenize(model, ch, strlen(ch), false, false, tc, 128);
    int nq = kvs_tokenize(model, qq, strlen(qq), false, false, tq, 64);
    CHECK(na > 10 && nb > 10 && m > 20 && nq > 5 && na != nb);
    test_reuse(c, ta, na, tb, nb, tc, m, tq, nq);
    kvs_context_free(c);
    c = new_ctx(true);
    test_compressed(c, ta, na, tb, nb, tc, m, tq, nq);
    kvs_context_free(c);
    kvs_model_free(model);
    return tu_finish("test_chunk_reuse");
}
