/* test_engine.c — the forward pass on the real SmolLM2 model, by metamorphic relations:
 *   one-chunk prefill ≡ chunks of 1, 7 and 64 tokens (every position's logits);
 *   1 thread ≡ 2 threads;
 *   a batched decode step of two sequences ≡ each sequence stepped alone;
 *   a reset sequence ≡ a fresh one (bit-exact), and KV bytes are accounted and freed.
 * Golden logits from the independent numpy reference are checked in test_golden.c. */
#include "kvsieve.h"
#include "testutil.h"

static kvs_model *model;
static int n_vocab;

static const char *g_spec = "full"; /* KV policy of the contexts the tests create */

static kvs_context *ctx(int threads, int batch, int n_seq) {
    struct kvs_context_params p = kvs_context_params_default();
    p.kv_spec = g_spec;
    p.n_ctx = 512;
    p.n_threads = threads;
    p.n_batch = batch;
    p.n_seq_max = n_seq;
    kvs_context *c = NULL;
    CHECKF(kvs_context_new(model, &p, &c) == KVS_OK, "%s", kvs_last_error());
    return c;
}

/* all-position logits of tokens[0..n) evaluated with the given chunk size and threads */
static float *eval_all(const int32_t *toks, int n, int threads, int batch) {
    kvs_context *c = ctx(threads, batch, 1);
    kvs_sequence *s;
    CHECK(kvs_seq_new(c, &s) == KVS_OK);
    float *l = malloc(sizeof(float) * (size_t)n * n_vocab);
    for (size_t i = 0; i < (size_t)n * n_vocab; i++) l[i] = NAN;
    CHECKF(kvs_eval(c, s, toks, n, true, l, NULL, NULL) == KVS_OK, "%s", kvs_last_error());
    CHECK(kvs_seq_n_past(s) == n);
    kvs_context_free(c);
    return l;
}

static void test_chunking_and_threads(const int32_t *toks, int n) {
    float *ref = eval_all(toks, n, 2, 512);
    int chunks[] = {1, 7, 64};
    for (int i = 0; i < 3; i++) {
        float *l = eval_all(toks, n, 2, chunks[i]);
        double e = tu_nmse(l, ref, (long)n * n_vocab), md = tu_max_abs_diff(l, ref, (long)n * n_vocab);
        /* chunking changes only the order of float sums inside the GEMM tiles */
        CHECKF(e < 1e-9 && md < 1e-3, "chunk %d: nmse %.3g, max abs diff %.3g", chunks[i], e, md);
        fprintf(stderr, "chunk %2d vs one chunk: nmse %.3g, max |diff| %.3g\n", chunks[i], e, md);
        free(l);
    }
    float *l1 = eval_all(toks, n, 1, 512);
    double e = tu_nmse(l1, ref, (long)n * n_vocab), md = tu_max_abs_diff(l1, ref, (long)n * n_vocab);
    CHECKF(e < 1e-9 && md < 1e-3, "1 thread vs 2: nmse %.3g, max abs diff %.3g", e, md);
    fprintf(stderr, "1 thread vs 2 threads: nmse %.3g, max |diff| %.3g\n", e, md);
    free(l1);
    free(ref);
}

static void test_batched(const int32_t *a, int na, const int32_t *b, int nb) {
    /* reference: each sequence alone, prompt then 4 greedy decode steps */
    float *solo[2][4];
    int32_t next[2][4];
    const int32_t *p[2] = {a, b};
    int np[2] = {na, nb};
    for (int k = 0; k < 2; k++) {
        kvs_context *c = ctx(2, 512, 1);
        kvs_sequence *s;
        kvs_seq_new(c, &s);
        float *l = malloc(sizeof(float) * n_vocab);
        kvs_eval(c, s, p[k], np[k], false, l, NULL, NULL);
        for (int step = 0; step < 4; step++) {
            int best = 0;
            for (int v = 1; v < n_vocab; v++) best = l[v] > l[best] ? v : best;
            next[k][step] = best;
            CHECK(kvs_eval(c, s, &next[k][step], 1, false, l, NULL, NULL) == KVS_OK);
            solo[k][step] = malloc(sizeof(float) * n_vocab);
            memcpy(solo[k][step], l, sizeof(float) * n_vocab);
        }
        free(l);
        kvs_context_free(c);
    }
    /* batched: both prompts prefilled, then the same tokens stepped together */
    kvs_context *c = ctx(2, 512, 2);
    kvs_sequence *s[2];
    float *l = malloc(sizeof(float) * 2 * n_vocab);
    for (int k = 0; k < 2; k++) {
        CHECK(kvs_seq_new(c, &s[k]) == KVS_OK);
        kvs_eval(c, s[k], p[k], np[k], false, l, NULL, NULL);
    }
    double worst = 0;
    for (int step = 0; step < 4; step++) {
        int32_t t[2] = {next[0][step], next[1][step]};
        CHECKF(kvs_eval_batch(c, s, t, 2, l) == KVS_OK, "%s", kvs_last_error());
        for (int k = 0; k < 2; k++) {
            double e = tu_nmse(l + (size_t)k * n_vocab, solo[k][step], n_vocab);
            worst = e > worst ? e : worst;
            CHECKF(e < 1e-9, "step %d seq %d: nmse %.3g", step, k, e);
            free(solo[k][step]);
        }
    }
    fprintf(stderr, "batched vs one-by-one decode (%s): worst nmse %.3g\n", g_spec, worst);
    /* the same sequence twice in one batch is refused */
    kvs_sequence *dup[2] = {s[0], s[0]};
    int32_t t2[2] = {1, 1};
    CHECK(kvs_eval_batch(c, dup, t2, 2, l) == KVS_ERR_INVALID_ARG);
    free(l);
    kvs_context_free(c);
}

static void test_reset_and_memory(const int32_t *toks, int n) {
    kvs_context *c = ctx(2, 512, 1);
    kvs_sequence *s;
    kvs_seq_new(c, &s);
    float *l1 = malloc(sizeof(float) * n_vocab), *l2 = malloc(sizeof(float) * n_vocab);
    kvs_eval(c, s, toks, n, false, l1, NULL, NULL);
    struct kvs_mem_stats ms;
    kvs_context_mem(c, &ms);
    struct kvs_model_info mi;
    kvs_model_get_info(model, &mi);
    /* held bytes: whole capacity steps of 64 entries, fp16 K+V plus position and weight */
    uint64_t per_entry = (uint64_t)mi.head_dim * 4 + 8;
    uint64_t want = (uint64_t)mi.n_layer * mi.n_head_kv * ((n + 63) / 64 * 64) * per_entry;
    CHECKF(ms.kv_bytes == want, "kv_bytes %llu, expected %llu", (unsigned long long)ms.kv_bytes,
           (unsigned long long)want);
    kvs_seq_reset(c, s);
    kvs_context_mem(c, &ms);
    CHECK(ms.kv_bytes == 0 && ms.kv_bytes_peak == want);
    kvs_eval(c, s, toks, n, false, l2, NULL, NULL);
    CHECK(memcmp(l1, l2, sizeof(float) * n_vocab) == 0);
    /* the context limit is enforced */
    struct kvs_context_params p = kvs_context_params_default();
    p.n_ctx = 8;
    kvs_context *small;
    kvs_context_new(model, &p, &small);
    kvs_sequence *ss;
    kvs_seq_new(small, &ss);
    CHECK(kvs_eval(small, ss, toks, 9, false, l1, NULL, NULL) == KVS_ERR_CONTEXT_FULL);
    int32_t bad = n_vocab;
    CHECK(kvs_eval(small, ss, &bad, 1, false, l1, NULL, NULL) == KVS_ERR_INVALID_ARG);
    kvs_context_free(small);
    free(l1);
    free(l2);
    kvs_context_free(c);
}

int main(void) {
    const char *path = tu_model_path();
    if (!path) {
        tu_skip("test_engine", "model %s not found: make models", tu_model_name());
        return 77;
    }
    if (kvs_model_load(path, NULL, &model) != KVS_OK) {
        fprintf(stderr, "%s\n", kvs_last_error());
        return 1;
    }
    struct kvs_model_info mi;
    kvs_model_get_info(model, &mi);
    n_vocab = mi.n_vocab;
    const char *text =
        "The quick brown fox jumps over the lazy dog. In 1859, Charles Darwin published On the "
        "Origin of Species, which argued that populations evolve over generations through "
        "natural selection. The book was written for non-specialist readers and attracted "
        "widespread interest upon its publication.";
    int32_t toks[256];
    int n = kvs_tokenize(model, text, strlen(text), true, false, toks, 256);
    CHECK(n > 40 && n < 256);
    test_chunking_and_threads(toks, n);
    const char *t2 = "Once upon a time, in a small village by the sea,";
    int32_t toks2[64];
    int n2 = kvs_tokenize(model, t2, strlen(t2), true, false, toks2, 64);
    test_batched(toks, n, toks2, n2);
    /* the same with policies that compress during these steps (budget below the prompt) */
    const char *specs[] = {"h2o:budget=24,every=1", "snapkv:budget=24,window=8,every=1",
                           "streaming:budget=24,every=1"};
    for (int i = 0; i < 3; i++) {
        g_spec = specs[i];
        test_batched(toks, n, toks2, n2);
    }
    g_spec = "full";
    test_reset_and_memory(toks, n);
    kvs_model_free(model);
    return tu_finish("test_engine");
}
