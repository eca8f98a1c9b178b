/* test_chunk_reuse.c — chunk caches reused at another position (Cache-Craft's engine side), on
 * the real SmolLM2 model:
 *   re-rotation: keys placed at a new position equal RoPE applied there from scratch (within fp16
 *     rounding), for random raw keys through the store;
 *   a chunk cached after context A, placed after context B with 100% of its tokens recomputed,
 *     gives the bits of prefilling B + chunk + question (then the same greedy tokens);
 *   0% recomputed differs, and so does recomputing the 30% of tokens that attended most to the
 *     other passage when the chunk was cached (the recorded attention): KL to the prefill reported;
 *   recorded attention shares sum to 1 per query and head.
 */
#include "kvsieve.h"
#include "engine.h"
#include "ops.h"
#include <xxhash.h>
#include "testutil.h"

#include <math.h>

static kvs_model *model;
static int n_vocab;

static kvs_context *new_ctx(void) {
    struct kvs_context_params p = kvs_context_params_default();
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
    CHECKF(kvs_chunk_publish(c, y, na, &solo) == KVS_OK, "%s", kvs_last_error());
    CHECK(kvs_prefix_first(solo) == na && kvs_prefix_n_tokens(solo) == na + m);
    CHECK(kvs_chunk_publish(c, y, na + m, &back) == KVS_ERR_INVALID_ARG); /* nothing after it */
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
    kvs_context *c = new_ctx();
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
    kvs_model_free(model);
    return tu_finish("test_chunk_reuse");
}
