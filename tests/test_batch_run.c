/* test_batch_run.c — the BatchLLM runner (src/batch/runner.c) on the real SmolLM2 model: a batch
 * of questions over shared documents, run grouped and reordered, ungrouped, and under a KV memory
 * limit, gives every request the greedy tokens it gets alone; shared prefixes are computed once
 * (prompt tokens computed < logical); a request whose cache can never fit, or with a bad spec,
 * fails alone while the rest of the batch runs. */
#include "kvsieve.h"
#include "batch/runner.h"
#include "testutil.h"

enum { NR = 14, MAXG = 16 };

static kvs_model *model;
static int n_vocab;
static int32_t got[NR][MAXG];
static int n_got[NR], finished[NR], computed[NR];
static int nr = NR; /* requests run: fewer under the sanitizers */
static enum brun_finish why[NR];

static bool on_token(void *u, int i, int32_t t) {
    (void)u;
    if (n_got[i] < MAXG) got[i][n_got[i]] = t;
    n_got[i]++;
    return true;
}
static void on_done(void *u, int i, enum brun_finish w, const char *err, int n_gen, int pc) {
    (void)u, (void)err;
    finished[i]++;
    why[i] = w;
    computed[i] = pc;
    CHECK(w == BRUN_ERROR || n_gen == n_got[i]);
}

static kvs_context *new_ctx(int n_seq) {
    struct kvs_context_params p = kvs_context_params_default();
    p.n_ctx = 512;
    p.n_threads = 2;
    p.n_batch = 64;
    p.n_seq_max = n_seq;
    p.keep_stats = true;
    kvs_context *c = NULL;
    CHECKF(kvs_context_new(model, &p, &c) == KVS_OK, "%s", kvs_last_error());
    return c;
}

/* greedy tokens of one request alone */
static int alone(const struct brun_req *q, int32_t *out) {
    kvs_context *c = new_ctx(1);
    kvs_sequence *s;
    CHECK(kvs_seq_new(c, &s) == KVS_OK);
    if (q->kv) CHECK(kvs_seq_set_kv(c, s, q->kv) == KVS_OK);
    float *l = malloc(sizeof(float) * n_vocab);
    CHECK(kvs_eval(c, s, q->prompt, q->n_prompt, false, l, NULL, NULL) == KVS_OK);
    int n = 0;
    while (n < q->max_tokens) {
        int32_t t = 0;
        for (int v = 1; v < n_vocab; v++) t = l[v] > l[t] ? v : t;
        if (kvs_token_is_eog(model, t)) break;
        out[n++] = t;
        if (n == q->max_tokens) break;
        CHECK(kvs_eval(c, s, &t, 1, false, l, NULL, NULL) == KVS_OK);
    }
    free(l);
    kvs_context_free(c);
    return n;
}

static void run(kvs_context *c, struct brun_req *rq, const struct brun_opts *o, struct brun_stats *st) {
    memset(n_got, 0, sizeof n_got), memset(finished, 0, sizeof finished);
    struct brun_cb cb = {.token = on_token, .done = on_done};
    CHECKF(brun_run(c, model, rq, nr, o, &cb, st) == KVS_OK, "%s", kvs_last_error());
    for (int i = 0; i < nr; i++) CHECKF(finished[i] == 1, "request %d finished %d times", i, finished[i]);
}

int main(void) {
    const char *path = tu_model_path();
    if (!path) {
        tu_skip("test_batch_run", "model %s not found: make models", tu_model_name());
        return 77;
    }
    if (kvs_model_load(path, NULL, &model) != KVS_OK) {
        fprintf(stderr, "%s\n", kvs_last_error());
        return 1;
    }
    struct kvs_model_info mi;
    kvs_model_get_info(model, &mi);
    n_vocab = mi.n_vocab;
    if (getenv("KVS_SANITIZE")) nr = 8; /* 3 documents still shared; about 3x faster */
    const int never = nr == NR ? 12 : nr - 1; /* the request whose cache can never fit */
    const char *docs[3] = {
        "Document: The lighthouse on the northern island was built in 1821. Its keeper, Ada Lund, "
        "kept a logbook of every ship that passed and of the weather each morning for forty years.",
        "Document: Honey bees tell each other where flowers are by dancing. The angle of the waggle "
        "run shows the direction relative to the sun, and its length shows the distance.",
        "Document: The old stone bridge over the river Wen has three arches. A mason named Tobias "
        "Reed carved his initials under the middle arch when the bridge was finished in 1731."};
    const char *qs[4] = {" Question: when was it built? Answer:", " Question: who is named? Answer:",
                         " Question: summarise it in five words. Answer:", " Question: what is it about? Answer:"};
    static int32_t toks[NR][256];
    struct brun_req rq[NR];
    char buf[600];
    for (int i = 0; i < NR; i++) {
        if (i < 12) snprintf(buf, sizeof buf, "%s%s", docs[i % 3], qs[i / 3]);
        else snprintf(buf, sizeof buf, i == 12 ? "Write a haiku about rain." : "List three colours:");
        int n = kvs_tokenize(model, buf, strlen(buf), true, false, toks[i], 256);
        CHECK(n >= 4);
        rq[i] = (struct brun_req){.prompt = toks[i], .n_prompt = n, .max_tokens = 4 + (i * 5) % 12,
                                  .sp = kvs_sampler_params_default()};
        rq[i].sp.temp = 0;
    }
    rq[13].kv = "snapkv:ratio=0.5"; /* a compressing request in the batch (alone: no shared prefix) */
    int32_t ref[NR][MAXG];
    int n_ref[NR];
    for (int i = 0; i < nr; i++) n_ref[i] = alone(&rq[i], ref[i]);

    kvs_context *c = new_ctx(6);
    struct brun_stats st;
    const char *names[3] = {"grouped, decode-first", "ungrouped, input order", "grouped, KV limit"};
    int64_t limit = kvs_kv_bytes_bound(c, NULL, 120 + 16) * 2; /* room for about two sequences */
    for (int mode = 0; mode < 3; mode++) {
        struct brun_opts o = {.group = mode != 1, .reorder = mode != 1, .kv_mem = mode == 2 ? limit : 0,
                              .min_share = 16};
        run(c, rq, &o, &st);
        int same = 0;
        for (int i = 0; i < nr; i++) {
            bool eq = n_got[i] == n_ref[i] && !memcmp(got[i], ref[i], sizeof(int32_t) * (size_t)n_ref[i]);
            CHECKF(eq, "%s: request %d: %d tokens, alone %d", names[mode], i, n_got[i], n_ref[i]);
            CHECK(why[i] == (n_ref[i] < rq[i].max_tokens ? BRUN_STOP : BRUN_LENGTH));
            same += eq;
        }
        CHECK(st.n_done == nr && st.n_errors == 0 && st.n_requests == nr);
        if (mode == 1) CHECK(st.prompt_computed == st.prompt_logical && st.n_shared_groups == 0);
        else CHECK(st.prompt_computed < st.prompt_logical && st.n_shared_groups == 3);
        if (mode == 2) CHECKF(st.kv_peak <= limit, "KV peak %lld above the limit %lld", (long long)st.kv_peak,
                              (long long)limit);
        fprintf(stderr, "%-24s %2d of %d requests identical to alone; prompt tokens computed %lld of "
                "%lld; %d groups (%d shared); at most %d running; KV peak %lld B (limit %lld)\n", names[mode], same, nr,
                (long long)st.prompt_computed, (long long)st.prompt_logical, st.n_groups,
                st.n_shared_groups, st.max_running, (long long)st.kv_peak, mode == 2 ? (long long)limit : 0LL);
    }
    /* failures stay with their request */
    rq[5].kv = "h2o:ratio=7";
    struct brun_opts o = {.group = true, .reorder = true, .kv_mem = limit, .min_share = 16};
    int keep_max = rq[never].max_tokens;
    rq[never].max_tokens = 100000; /* its bound can never fit the limit */
    run(c, rq, &o, &st);
    CHECK(why[5] == BRUN_ERROR && why[never] == BRUN_ERROR && st.n_errors == 2 && st.n_done == nr - 2);
    for (int i = 0; i < nr; i++)
        if (i != 5 && i != never)
            CHECKF(n_got[i] == n_ref[i] && !memcmp(got[i], ref[i], sizeof(int32_t) * (size_t)n_ref[i]),
                   "request %d after the failures", i);
    /* resume: skipped requests are not run */
    for (int i = 0; i < nr; i++) rq[i].skip = i % 2 == 0;
    rq[5].kv = NULL, rq[never].max_tokens = keep_max;
    memset(n_got, 0, sizeof n_got), memset(finished, 0, sizeof finished);
    struct brun_cb cb = {.token = on_token, .done = on_done};
    CHECK(brun_run(c, model, rq, nr, &o, &cb, &st) == KVS_OK);
    for (int i = 0; i < nr; i++) CHECK(finished[i] == (i % 2 == 0 ? 0 : 1));
    CHECK(st.n_requests == nr / 2);
    struct kvs_mem_stats ms;
    kvs_context_mem(c, &ms);
    CHECKF(ms.kv_bytes == 0, "%llu KV bytes left after the batches", (unsigned long long)ms.kv_bytes);
    kvs_context_free(c);
    kvs_model_free(model);
    return tu_finish("test_batch_run");
}
