/* test_kv.c — the KV store, the --kv spec and the eviction policies.
 *   spec: accepted and refused strings, error text names the bad key and the accepted ones;
 *   scorers/selection on hand-made caches: H2O keeps the heaviest older entries + the recent
 *     window, StreamingLLM sinks + window, SnapKV max-pooling spreads a hit to its neighbours,
 *     TOVA keeps the same entries in every head, AdaKV honours its per-head floor;
 *   property: thousands of random plans applied with invariants, payloads and bytes checked;
 *   real model: every method with a budget >= the sequence gives logits bit-identical to full,
 *     also with budgets exactly the sequence's length and the planner forced to run (a plan
 *     that keeps everything, counted),
 *     and bounded prefill keeps kv_bytes_peak within budget + one chunk of one layer. */
#include "kv/kv_cache.h"
#include "kv/kv_policy.h"
#include "kv/kv_spec.h"
#include "kvsieve.h"
#include "engine.h"
#include "ops.h"
#include "quant.h"
#include "testutil.h"

/* ---- spec ------------------------------------------------------------------------------ */

static void test_spec(void) {
    struct kv_spec s;
    CHECK(kv_spec_parse("full", &s) == KVS_OK && s.method == KV_FULL);
    CHECK(kv_spec_parse(NULL, &s) == KVS_OK && s.method == KV_FULL);
    CHECK(kv_spec_parse("", &s) == KVS_OK && s.method == KV_FULL); /* empty = default */
    CHECK(kv_spec_parse("h2o:budget=512,recent=0.25", &s) == KVS_OK && s.method == KV_H2O &&
          s.budget == 512 && s.recent == 0.25f);
    CHECK(kv_spec_parse("streaming:sinks=4,window=1020", &s) == KVS_OK && s.budget == 1024 &&
          s.reindex);
    CHECK(kv_spec_parse("streaming:budget=64,pos=abs", &s) == KVS_OK && !s.reindex);
    CHECK(kv_spec_parse("h2o:budget=64", &s) == KVS_OK && !s.reindex);
    CHECK(kv_spec_parse("snapkv:ratio=0.25,window=16,kernel=5,pool=avg", &s) == KVS_OK &&
          s.ratio == 0.25f && s.obs_window == 16 && s.kernel == 5 && s.pool == KV_POOL_AVG);
    CHECK(kv_spec_parse("tova:ratio=0.1+alloc=adakv+floor=0.3", &s) == KVS_OK &&
          s.alloc == KV_ALLOC_ADAKV && s.adakv_floor == 0.3f);
    CHECK(kv_spec_parse("knorm:mem=64M", &s) == KVS_OK && s.mem_bytes == 64ull << 20);
    CHECK(kv_spec_parse("h2o:budget=64,when=prefill,every=0", &s) == KVS_OK &&
          s.when == KV_WHEN_PREFILL && s.every == 0);
    const char *bad[] = {"nonsense", "h2o", "h2o:budget=0", "h2o:budget=10,ratio=0.5",
                         "h2o:ratio=1.5", "h2o:budget=abc", "snapkv:budget=8,kernel=4",
                         "full:budget=3", "h2o:budget=8+alloc=magic", "h2o:budget=8,,",
                         "h2o:budget=8+snapkv:budget=3", "streaming:sinks=4,window=8,budget=20",
                         "h2o:=3", "knorm:mem=-1", "random:budget=4,seed=x", "h2o:budget=8,",
                         "h2o:budget=8+", "+h2o:budget=8", "h2o:"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECKF(kv_spec_parse(bad[i], &s) == KVS_ERR_INVALID_ARG, "accepted '%s'", bad[i]);
    kv_spec_parse("h2o:budget=8,kernel=3", &s);
    CHECKF(strstr(kvs_last_error(), "unknown key 'kernel' for h2o") &&
           strstr(kvs_last_error(), "accepted: budget, ratio"), "%s", kvs_last_error());
    kv_spec_parse("bogus:budget=8", &s);
    CHECKF(strstr(kvs_last_error(), "unknown method 'bogus'"), "%s", kvs_last_error());
    /* a fuzz-ish sweep: random strings from the alphabet of the grammar never crash */
    const char alpha[] = "h2o:snapkv=budget,ratio+0.15x";
    char buf[40];
    for (int it = 0; it < 20000; it++) {
        int n = (int)(tu_rand_u64() % 39);
        for (int i = 0; i < n; i++) buf[i] = alpha[tu_rand_u64() % (sizeof alpha - 1)];
        buf[n] = 0;
        kv_spec_parse(buf, &s);
    }
}

/* ---- hand-made caches -------------------------------------------------------------------- */

enum { HD = 8 };

/* a one-layer cache with n entries per head at positions 0..n-1; keys all zero */
static struct kv_seq *make_seq(struct kv_cache *c, int n_head, int n_kv, int n, bool acc, int qwin) {
    kv_cache_init(c, 1, n_kv, n_head, HD, acc, qwin);
    struct kv_seq *s;
    CHECK(kv_seq_new(c, &s) == KVS_OK);
    CHECK(kv_seq_reserve(s, 0, n) == KVS_OK);
    float k[64 * HD] = {0}, v[64 * HD] = {0};
    for (int t = 0; t < n; t++) kv_seq_append(s, 0, t, k, v);
    return s;
}

static struct kv_policy *make_policy(const char *spec, const struct kv_cache *c) {
    struct kv_spec sp;
    CHECKF(kv_spec_parse(spec, &sp) == KVS_OK, "%s", kvs_last_error());
    struct kv_policy *p = NULL;
    CHECK(kv_policy_new(&sp, c->n_layer, c->n_head, c->n_head_kv, HD, 256,
                        kv_cache_entry_bytes(c), &p) == KVS_OK);
    return p;
}

static bool kept_is(const struct kv_seq *s, int ih, const int *want, int n) {
    const struct kv_head_store *h = kv_seq_head(s, 0, ih);
    if (h->n != n) return false;
    for (int i = 0; i < n; i++)
        if (h->pos[i] != want[i]) return false;
    return true;
}

static void plan_apply(struct kv_policy *p, struct kv_seq *s, int64_t n_seen) {
    struct kv_plan plan = {0};
    if (kv_policy_plan_layer(p, s, 0, n_seen, 0, false, &plan)) kv_seq_apply_plan(s, 0, &plan, false);
    CHECKF(kv_seq_check(s), "%s", kvs_last_error());
}

static void test_h2o(void) {
    struct kv_cache c;
    struct kv_seq *s = make_seq(&c, 2, 1, 12, true, 0);
    float acc[12] = {5, 0.1f, 0.2f, 9, 0.3f, 7, 0.1f, 0.1f, 0.1f, 0.1f, 0.1f, 0.1f};
    memcpy(kv_seq_head(s, 0, 0)->acc, acc, sizeof acc);
    struct kv_policy *p = make_policy("h2o:budget=6,recent=0.5", &c);
    plan_apply(p, s, 12);
    int want[] = {0, 3, 5, 9, 10, 11}; /* heavy {3, 5, 0} + recent 3 */
    CHECK(kept_is(s, 0, want, 6));
    const float *a = kv_seq_head(s, 0, 0)->acc;
    CHECK(a[0] == 5 && a[1] == 9 && a[2] == 7); /* statistics moved with their entries */
    kv_policy_free(p);
    kv_seq_free(s);
}

static void test_streaming(void) {
    struct kv_cache c;
    struct kv_seq *s = make_seq(&c, 1, 1, 20, false, 0);
    struct kv_policy *p = make_policy("streaming:sinks=2,window=3", &c);
    plan_apply(p, s, 20);
    int want[] = {0, 1, 17, 18, 19};
    CHECK(kept_is(s, 0, want, 5));
    kv_policy_free(p);
    kv_seq_free(s);
}

static void test_snapkv_pooling(void) {
    struct kv_cache c;
    struct kv_seq *s = make_seq(&c, 1, 1, 16, false, 1);
    /* entry 5's key points along the saved query: attention concentrates there */
    struct kv_head_store *h = kv_seq_head(s, 0, 0);
    for (int d = 0; d < HD; d++) h->k[5 * HD + d] = quant_f32_to_f16(d == 0 ? 8.0f : 0.0f);
    float q[HD] = {8, 0, 0, 0, 0, 0, 0, 0};
    kv_seq_save_query(s, 0, 15, q);
    struct kv_policy *p = make_policy("snapkv:budget=4,window=1,kernel=3,pool=max", &c);
    plan_apply(p, s, 16);
    int want[] = {4, 5, 6, 15}; /* the hit and its pooled neighbours + the window */
    CHECK(kept_is(s, 0, want, 4));
    kv_policy_free(p);
    kv_seq_free(s);
    /* without pooling only the hit stands out; ties among the rest go to later positions */
    s = make_seq(&c, 1, 1, 16, false, 1);
    h = kv_seq_head(s, 0, 0);
    for (int d = 0; d < HD; d++) h->k[5 * HD + d] = quant_f32_to_f16(d == 0 ? 8.0f : 0.0f);
    kv_seq_save_query(s, 0, 15, q);
    p = make_policy("snapkv:budget=4,window=1,pool=none", &c);
    plan_apply(p, s, 16);
    int want2[] = {5, 13, 14, 15};
    CHECK(kept_is(s, 0, want2, 4));
    kv_policy_free(p);
    kv_seq_free(s);
}

/* kv_snapkv_pool (8 entries at a time away from the edges) against the definition, one entry
 * at a time: every value bit-identical, max and average, kernels 1..15, rows 0..600 long */
static void test_snapkv_pool_reference(void) {
    struct kv_cache c;
    struct kv_seq *s = make_seq(&c, 1, 1, 16, false, 1);
    struct kv_policy *p = make_policy("snapkv:budget=4,kernel=3,pool=max", &c);
    enum { N = 600 };
    float row[N], ref[N], tmp[N];
    int differ = 0, cases = 0;
    for (int it = 0; it < 3000; it++) {
        int n = (int)(tu_rand_u64() % (N + 1)), k = 1 + (int)(tu_rand_u64() % 15), r = k / 2;
        p->spec.kernel = k, p->spec.pool = tu_rand_u64() % 2 ? KV_POOL_MAX : KV_POOL_AVG;
        for (int j = 0; j < n; j++) row[j] = (float)(tu_rand_u64() % 1000000) * (tu_rand_u64() % 2 ? 1e-9f : 1e-6f);
        for (int j = 0; j < n; j++) {
            float acc = p->spec.pool == KV_POOL_MAX ? -INFINITY : 0.0f;
            for (int t = j - r; t <= j + r; t++) {
                float v = t >= 0 && t < n ? row[t] : 0.0f;
                acc = p->spec.pool == KV_POOL_MAX ? (v > acc ? v : acc) : acc + v;
            }
            ref[j] = k <= 1 ? row[j] : p->spec.pool == KV_POOL_MAX ? acc : acc / (float)k;
        }
        kv_snapkv_pool(p, row, n, tmp);
        differ += memcmp(row, ref, sizeof(float) * n) != 0, cases++;
    }
    CHECKF(differ == 0, "%d of %d rows differ from the one-at-a-time pooling", differ, cases);
    kv_policy_free(p);
    kv_seq_free(s);
}

static void test_tova_layerwise(void) {
    struct kv_cache c;
    struct kv_seq *s = make_seq(&c, 4, 2, 16, false, 1);
    /* head 0 is drawn to entry 3, head 1 to entry 9: the layer-wise score keeps both in both */
    for (int ih = 0; ih < 2; ih++) {
        struct kv_head_store *h = kv_seq_head(s, 0, ih);
        int hit = ih ? 9 : 3;
        h->k[hit * HD] = quant_f32_to_f16(8.0f);
    }
    float q[4 * HD] = {0};
    for (int qh = 0; qh < 4; qh++) q[qh * HD] = 8.0f;
    kv_seq_save_query(s, 0, 15, q);
    struct kv_policy *p = make_policy("tova:budget=3", &c);
    plan_apply(p, s, 16);
    const struct kv_head_store *h0 = kv_seq_head(s, 0, 0), *h1 = kv_seq_head(s, 0, 1);
    CHECK(h0->n == 3 && h1->n == 3 && memcmp(h0->pos, h1->pos, 3 * sizeof(int32_t)) == 0);
    CHECK(h0->pos[0] == 3 && h0->pos[1] == 9);
    kv_policy_free(p);
    kv_seq_free(s);
}

static void test_adakv_floor(void) {
    struct kv_cache c;
    struct kv_seq *s = make_seq(&c, 2, 2, 12, true, 0);
    /* head 0: every entry heavy; head 1: every entry light */
    for (int j = 0; j < 12; j++) {
        kv_seq_head(s, 0, 0)->acc[j] = 10.0f + j;
        kv_seq_head(s, 0, 1)->acc[j] = 0.01f * j;
    }
    struct kv_policy *p = make_policy("h2o:budget=4,recent=0+alloc=adakv+floor=0.5", &c);
    plan_apply(p, s, 12);
    /* layer budget 8: head 1 keeps its floor of 2 (its best: positions 10, 11), head 0 the
     * other 6 (its 6 heaviest: 6..11) */
    int w0[] = {6, 7, 8, 9, 10, 11}, w1[] = {10, 11};
    CHECK(kept_is(s, 0, w0, 6));
    CHECK(kept_is(s, 1, w1, 2));
    kv_policy_free(p);
    kv_seq_free(s);
}

/* reindexing plans re-rotate keys: a key stored rotated at slot j and moved to slot i equals the
 * unrotated key rotated at i (fp16 storage: tolerance 2e-3 relative) */
static void rotate(float *x, int hd, double pos, const float *inv_freq) {
    for (int i = 0; i < hd / 2; i++) {
        double a = pos * inv_freq[i];
        float c = (float)cos(a), s = (float)sin(a), x0 = x[i], x1 = x[i + hd / 2];
        x[i] = x0 * c - x1 * s;
        x[i + hd / 2] = x0 * s + x1 * c;
    }
}

static void test_reindex(void) {
    struct kv_cache c;
    kv_cache_init(&c, 1, 1, 1, HD, false, 0);
    float inv_freq[HD / 2];
    for (int i = 0; i < HD / 2; i++) inv_freq[i] = (float)pow(10000.0, -2.0 * i / HD);
    c.rope_inv_freq = inv_freq;
    c.rope_neox = true;
    struct kv_seq *s;
    kv_seq_new(&c, &s);
    kv_seq_reserve(s, 0, 40);
    float raw[40][HD];
    for (int t = 0; t < 40; t++) {
        float k[HD], v[HD] = {0};
        for (int d = 0; d < HD; d++) raw[t][d] = k[d] = tu_randf();
        rotate(k, HD, t, inv_freq);
        kv_seq_append(s, 0, t, k, v);
    }
    int32_t keep[] = {0, 1, 30, 35, 39};
    struct kv_plan plan = {.keep = {keep}, .n_keep = {5}};
    kv_seq_apply_plan(s, 0, &plan, true);
    const struct kv_head_store *h = kv_seq_head(s, 0, 0);
    double worst = 0;
    for (int i = 0; i < 5; i++) {
        float want[HD], got[HD];
        memcpy(want, raw[keep[i]], sizeof want);
        rotate(want, HD, i, inv_freq);
        quant_f16_to_f32_row(h->k + i * HD, got, HD);
        double e = tu_max_abs_diff(got, want, HD);
        worst = e > worst ? e : worst;
    }
    CHECKF(worst < 2e-3, "re-rotated keys off by %g", worst);
    kv_seq_free(s);
}

/* ---- property: random plans -------------------------------------------------------------- */

static void test_random_plans(void) {
    struct kv_cache c;
    kv_cache_init(&c, 2, 2, 4, HD, true, 0);
    struct kv_seq *s;
    CHECK(kv_seq_new(&c, &s) == KVS_OK);
    int32_t next_pos = 0, bad = 0;
    int32_t keep_buf[2][600];
    for (int it = 0; it < 3000; it++) {
        int il = (int)(tu_rand_u64() % 2);
        /* append a random number of tokens, each key row tagged with its position */
        int add = (int)(tu_rand_u64() % 40);
        for (int l = 0; l < 2; l++) CHECK(kv_seq_reserve(s, l, add) == KVS_OK);
        for (int t = 0; t < add; t++) {
            float k[2 * HD], v[2 * HD];
            for (int i = 0; i < 2 * HD; i++) k[i] = (float)(next_pos % 2048), v[i] = -(float)(next_pos % 2048);
            for (int l = 0; l < 2; l++) kv_seq_append(s, l, next_pos, k, v);
            next_pos++;
        }
        /* a random plan for layer il: each entry kept with probability 0.7, budget cap 300 */
        struct kv_plan plan = {0};
        for (int ih = 0; ih < 2; ih++) {
            const struct kv_head_store *h = kv_seq_head(s, il, ih);
            int nk = 0;
            for (int j = 0; j < h->n && nk < 300; j++)
                if (tu_rand_u64() % 10 < 7) keep_buf[ih][nk++] = j;
            plan.keep[ih] = keep_buf[ih];
            plan.n_keep[ih] = nk;
        }
        int32_t want_pos[2][600];
        for (int ih = 0; ih < 2; ih++)
            for (int i = 0; i < plan.n_keep[ih]; i++)
                want_pos[ih][i] = kv_seq_head(s, il, ih)->pos[plan.keep[ih][i]];
        kv_seq_apply_plan(s, il, &plan, false);
        if (!kv_seq_check(s)) bad++;
        for (int ih = 0; ih < 2; ih++) {
            const struct kv_head_store *h = kv_seq_head(s, il, ih);
            if (h->n != plan.n_keep[ih] || h->n > 300) bad++;
            for (int i = 0; i < h->n; i++) {
                /* payload moved with its position */
                if (h->pos[i] != want_pos[ih][i] ||
                    quant_f16_to_f32(h->k[i * HD]) != (float)(h->pos[i] % 2048) ||
                    quant_f16_to_f32(h->v[i * HD + HD - 1]) != -(float)(h->pos[i] % 2048))
                    bad++;
            }
            if (h->cap > (int32_t)kvs_pad((size_t)h->n, KV_CAP_STEP)) bad++; /* memory given back */
        }
        if (c.bytes != kv_seq_bytes(s)) bad++;
    }
    CHECKF(bad == 0, "%d violations in random plans", bad);
    kv_seq_free(s);
    CHECK(c.bytes == 0);
}

/* ---- the real model ---------------------------------------------------------------------- */

/* Logits of n prompt tokens then 8 decode steps under spec. plan_always: the policy plans every
 * layer after every chunk and decode step even when no head is over budget, and *n_plans
 * receives the number of plans it made. */
static float *run_logits_planned(kvs_model *m, const char *spec, const int32_t *toks, int n,
                                 int batch, int n_vocab, struct kvs_mem_stats *ms,
                                 bool plan_always, uint64_t *n_plans) {
    struct kvs_context_params p = kvs_context_params_default();
    p.n_ctx = 1024;
    p.n_batch = batch;
    p.kv_spec = spec;
    kvs_context *c;
    if (kvs_context_new(m, &p, &c) != KVS_OK) {
        CHECKF(0, "%s: %s", spec ? spec : "(null)", kvs_last_error());
        return NULL;
    }
    if (c->base.policy) c->base.policy->plan_always = plan_always;
    kvs_sequence *s;
    kvs_seq_new(c, &s);
    float *l = malloc(sizeof(float) * (size_t)(n + 8) * n_vocab);
    CHECK(kvs_eval(c, s, toks, n, true, l, NULL, NULL) == KVS_OK);
    /* then 8 decode steps of fixed tokens: compression during decode must not differ either */
    for (int i = 0; i < 8; i++)
        CHECK(kvs_eval(c, s, &toks[i], 1, false, l + (size_t)(n + i) * n_vocab, NULL, NULL) == KVS_OK);
    if (ms) kvs_context_mem(c, ms);
    if (n_plans) *n_plans = c->base.policy ? c->base.policy->n_plans : 0;
    kvs_context_free(c);
    return l;
}

static float *run_logits(kvs_model *m, const char *spec, const int32_t *toks, int n, int batch,
                         int n_vocab, struct kvs_mem_stats *ms) {
    return run_logits_planned(m, spec, toks, n, batch, n_vocab, ms, false, NULL);
}

static void test_identity_and_bounds(void) {
    const char *path = tu_model_path();
    if (!path) {
        tu_skip("test_kv real-model identity and bounds", "model %s not found: make models",
                tu_model_name());
        return;
    }
    kvs_model *m;
    if (kvs_model_load(path, NULL, &m) != KVS_OK) {
        CHECKF(0, "%s: %s", path, kvs_last_error());
        return;
    }
    struct kvs_model_info mi;
    kvs_model_get_info(m, &mi);
    const char *text =
        "It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. However little known the feelings or views of such "
        "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
        "minds of the surrounding families, that he is considered the rightful property of some "
        "one or other of their daughters.";
    int32_t toks[256];
    int n = kvs_tokenize(m, text, strlen(text), true, false, toks, 256);
    size_t nl = (size_t)(n + 8) * mi.n_vocab;
    float *ref = run_logits(m, "full", toks, n, 512, mi.n_vocab, NULL);
    float *none = run_logits(m, NULL, toks, n, 512, mi.n_vocab, NULL);
    CHECK(ref && none && memcmp(ref, none, nl * sizeof(float)) == 0);
    const char *same[] = {"streaming:budget=4096", "h2o:budget=4096", "tova:budget=4096",
                          "snapkv:budget=4096", "knorm:budget=4096", "random:budget=4096",
                          "h2o:ratio=1", "snapkv:budget=4096+alloc=adakv",
                          "tova:budget=4096+alloc=pyramid+beta=1", "knorm:mem=1G",
                          "d2o:budget=4096", "ems:budget=4096", "kvmerger:budget=4096",
                          "elastic:budget=4096", "h2o:budget=4096+mikv:low=2",
                          "snapkv:budget=4096+merge=kvmerger"};
    for (size_t i = 0; i < sizeof same / sizeof same[0]; i++) {
        float *l = run_logits(m, same[i], toks, n, 16, mi.n_vocab, NULL);
        CHECKF(l && ref && memcmp(l, ref, nl * sizeof(float)) == 0,
               "%s is not bit-identical to full", same[i]);
        free(l);
    }
    /* The same with the planner made to run: budgets exactly equal to the sequence's length
     * (prompt and decode steps) and plan_always, so every chunk and decode step scores, plans
     * and applies a plan that keeps everything; the logits must still be bit-identical, and the
     * planner must have run (the specs above return before scoring: nothing is over budget).
     * D2O keeps 4096: its layer allocator gives attention-dense layers less than the mean
     * budget, so at budget = length its plan evicts by design. */
    const char *exact[] = {"streaming:budget=%d", "h2o:budget=%d", "tova:budget=%d",
                           "snapkv:budget=%d", "knorm:budget=%d", "random:budget=%d",
                           "h2o:ratio=1", "snapkv:budget=%d+alloc=adakv",
                           "tova:budget=%d+alloc=pyramid+beta=1", "d2o:budget=4096",
                           "ems:budget=%d", "kvmerger:budget=%d", "elastic:budget=%d",
                           "h2o:budget=%d+mikv:low=2", "snapkv:budget=%d+merge=kvmerger",
                           "h2o:budget=%d,when=chunk"};
    for (size_t i = 0; i < sizeof exact / sizeof exact[0]; i++) {
        char spec[128];
        snprintf(spec, sizeof spec, exact[i], n + 8);
        uint64_t n_plans = 0;
        float *l = run_logits_planned(m, spec, toks, n, 16, mi.n_vocab, NULL, true, &n_plans);
        CHECKF(n_plans >= (uint64_t)mi.n_layer, "%s: the planner ran %llu times", spec,
               (unsigned long long)n_plans);
        CHECKF(l && ref && memcmp(l, ref, nl * sizeof(float)) == 0,
               "%s (planner forced, %llu plans) is not bit-identical to full", spec,
               (unsigned long long)n_plans);
        free(l);
    }
    /* H2O's statistic: every query adds one probability distribution (mean over the KV head's
     * query heads), so each head's accumulated attention sums to the number of queries */
    {
        struct kvs_context_params cp = kvs_context_params_default();
        cp.n_ctx = 512;
        cp.n_batch = 16;
        cp.kv_spec = "h2o:budget=4096";
        kvs_context *c;
        kvs_context_new(m, &cp, &c);
        kvs_sequence *sq;
        kvs_seq_new(c, &sq);
        kvs_eval(c, sq, toks, n, false, NULL, NULL, NULL);
        for (int i = 0; i < 5; i++) kvs_eval(c, sq, &toks[i], 1, false, NULL, NULL, NULL);
        double worst = 0;
        for (int il = 0; il < mi.n_layer; il++)
            for (int ih = 0; ih < mi.n_head_kv; ih++) {
                const struct kv_head_store *h = kv_seq_head(sq->kv, il, ih);
                double sum = 0;
                for (int j = 0; j < h->n; j++) sum += h->acc[j];
                double e = fabs(sum - (n + 5)) / (n + 5);
                worst = e > worst ? e : worst;
            }
        CHECKF(worst < 1e-4, "accumulated attention off by %.3g (relative)", worst);
        /* and the first token, seen by every query, holds more than a uniform share */
        const struct kv_head_store *h0 = kv_seq_head(sq->kv, 0, 0);
        CHECK(h0->acc[0] > (double)(n + 5) / h0->n);
        kvs_context_free(c);
    }
    /* bounded prefill: budget 32, chunks of 16: after every chunk each layer holds <= 32 entries
     * (capacity rounds up to 64), so the peak is the budget of every layer plus one layer's
     * chunk; decode compresses once a head is `every` (16) entries over */
    struct kvs_mem_stats ms;
    float *l = run_logits(m, "h2o:budget=32", toks, n, 16, mi.n_vocab, &ms);
    uint64_t eb = (uint64_t)mi.head_dim * 4 + 12;
    uint64_t bound = ((uint64_t)mi.n_layer * 64 + 64) * mi.n_head_kv * eb;
    CHECKF(ms.kv_bytes_peak <= bound && ms.kv_bytes <= (uint64_t)mi.n_layer * 64 * mi.n_head_kv * eb,
           "peak %llu, bound %llu", (unsigned long long)ms.kv_bytes_peak, (unsigned long long)bound);
    fprintf(stderr, "h2o budget 32 over %d tokens: kv_bytes %llu, peak %llu (bound %llu)\n", n + 8,
            (unsigned long long)ms.kv_bytes, (unsigned long long)ms.kv_bytes_peak,
            (unsigned long long)bound);
    /* and a compressed run really differs from full (the test could not pass vacuously) */
    CHECK(l && memcmp(l, ref, nl * sizeof(float)) != 0);
    free(l);
    free(ref);
    free(none);
    kvs_model_free(m);
}

int main(void) {
    quant_init();
    ops_init();
    test_spec();
    test_h2o();
    test_streaming();
    test_snapkv_pooling();
    test_snapkv_pool_reference();
    test_tova_layerwise();
    test_adakv_floor();
    test_random_plans();
    test_reindex();
    test_identity_and_bounds();
    return tu_finish("test_kv");
}
