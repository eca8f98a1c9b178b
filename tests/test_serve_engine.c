/* test_serve_engine.c — the engine side of serving, on the real SmolLM2 model:
 *   kvs_step: 16 sequences with their own KV policies (full, H2O, SnapKV, KIVI, streaming, TOVA),
 *     prompt chunks and decode steps mixed in every step, give each sequence the same logits,
 *     bit for bit, and the same greedy tokens as that sequence stepped alone;
 *   KV bytes never exceed kvs_kv_bytes_bound;
 *   shared prefixes: a sequence started from a published chain (prefix-cache hit) gives the
 *     bits of the sequence that computed the prefix itself; a compressed prefix node gives the
 *     bits of copy + kvs_seq_compress; shared nodes' checksums never change while compressing
 *     sequences read them; reference counts; and the errors of each call.
 */
#include "kvsieve.h"
#include "engine.h" /* the store's positions, for the pinning check */
#include "testutil.h"

#include <stdint.h>

static kvs_model *model;       /* with packed weights (kvs_model_params.pack), as the server */
static kvs_model *model_plain; /* the same file without: "alone" runs on it */
static int n_vocab, mi_layers, mi_heads_kv;

enum { G = 6 /* greedy decode steps per sequence */, MAXS = 16 };

static kvs_context *new_ctx_on(kvs_model *m, int n_seq, int batch) {
    struct kvs_context_params p = kvs_context_params_default();
    p.n_ctx = 512;
    p.n_threads = 2;
    p.n_batch = batch;
    p.n_seq_max = n_seq;
    p.keep_stats = true;
    kvs_context *c = NULL;
    CHECKF(kvs_context_new(m, &p, &c) == KVS_OK, "%s", kvs_last_error());
    return c;
}
static kvs_context *new_ctx(int n_seq, int batch) { return new_ctx_on(model, n_seq, batch); }

static int argmax(const float *l) {
    int b = 0;
    for (int i = 1; i < n_vocab; i++)
        if (l[i] > l[b]) b = i;
    return b;
}

/* One sequence's work: its prompt fed in chunks of `chunk` tokens, then G greedy steps. Logits
 * of the prompt's last token and of every decode step are kept (G + 1 rows). */
struct job {
    const char *spec;
    const int32_t *toks;
    int n, chunk;
    kvs_sequence *s;
    int fed, steps;
    int32_t next;
    float *logits;      /* (G + 1, n_vocab) */
    int32_t gen[G + 1];
    uint64_t peak_bytes, peak_after; /* KV bytes: highest, highest after the prompt */
};

/* Run jobs [0, n_jobs) together: every step carries each unfinished job's next chunk or decode
 * token. */
static void run_jobs(kvs_context *c, struct job *jobs, int n_jobs) {
    for (int i = 0; i < n_jobs; i++) {
        struct job *j = &jobs[i];
        CHECKF(kvs_seq_new(c, &j->s) == KVS_OK, "%s", kvs_last_error());
        CHECKF(kvs_seq_set_kv(c, j->s, j->spec) == KVS_OK, "%s: %s", j->spec, kvs_last_error());
        j->fed = j->steps = 0;
        j->peak_bytes = j->peak_after = 0;
    }
    for (;;) {
        struct kvs_batch_item it[MAXS];
        int k = 0, room = kvs_context_step_tokens(c), left = 0;
        bool in[MAXS] = {0};
        for (int i = 0; i < n_jobs; i++) {
            struct job *j = &jobs[i];
            if (j->steps > G) continue;
            left++;
            int m = j->fed < j->n ? (j->n - j->fed < j->chunk ? j->n - j->fed : j->chunk) : 1;
            if (m > room) continue; /* waits for the next step */
            room -= m;
            in[i] = true;
            if (j->fed < j->n) {
                it[k] = (struct kvs_batch_item){.seq = j->s, .tokens = j->toks + j->fed, .n = m,
                                                .prompt_end = j->fed + m == j->n,
                                                .logits = j->fed + m == j->n ? j->logits : NULL};
            } else {
                it[k] = (struct kvs_batch_item){.seq = j->s, .tokens = &j->next, .n = 1, .decode = true,
                                                .logits = j->logits + (size_t)j->steps * n_vocab};
            }
            k++;
        }
        if (!left) break;
        enum kvs_status st = kvs_step(c, it, k);
        CHECKF(st == KVS_OK, "%s", kvs_last_error());
        if (st != KVS_OK) break;
        for (int i = 0, q = 0; i < n_jobs; i++) {
            struct job *j = &jobs[i];
            if (!in[i]) continue;
            if (j->fed < j->n) j->fed += it[q].n;
            if (j->fed == j->n && it[q].logits) {
                j->next = j->gen[j->steps] = argmax(it[q].logits);
                j->steps++;
            }
            uint64_t b = kvs_seq_kv_bytes(j->s);
            if (b > j->peak_bytes) j->peak_bytes = b;
            if (j->steps > 0 && b > j->peak_after) j->peak_after = b;
            q++;
        }
    }
}

static void test_batch_invariance(const int32_t *toks, int n) {
    static const char *specs[] = {"full", "h2o:budget=40,every=4", "snapkv:ratio=0.5",
                                  "full+kivi:bits=4", "streaming:budget=48", "tova:budget=40",
                                  "agate"};
    const int n_specs = (int)(sizeof specs / sizeof specs[0]);
    struct job alone[MAXS], batch[MAXS];
    /* KVS_SERVE_SEQS (6..16, default 16): fewer sequences for the 1.5B model in CI */
    const char *ev = getenv("KVS_SERVE_SEQS");
    int ns = ev ? atoi(ev) : MAXS;
    if (ns < 6 || ns > MAXS) ns = MAXS;
    for (int i = 0; i < ns; i++) {
        int off = (i * 7) % 40, len = 60 + (i * 23) % (n - 60 - off);
        alone[i] = (struct job){.spec = specs[i % n_specs], .toks = toks + off, .n = len,
                                .chunk = 16 + 8 * (i % 5)};
        alone[i].logits = malloc(sizeof(float) * (G + 1) * n_vocab);
        batch[i] = alone[i];
        batch[i].logits = malloc(sizeof(float) * (G + 1) * n_vocab);
    }
    /* alone: plain weights (one-token kernels, tiles built per product); batched: packed tiles */
    kvs_context *c = new_ctx(MAXS, 128), *ca = new_ctx_on(model_plain, MAXS, 128);
    for (int i = 0; i < ns; i++) {
        run_jobs(ca, &alone[i], 1);
        kvs_seq_free(ca, alone[i].s);
    }
    kvs_context_free(ca);
    run_jobs(c, batch, ns);
    int same = 0;
    for (int i = 0; i < ns; i++) {
        bool eq = !memcmp(alone[i].logits, batch[i].logits, sizeof(float) * (G + 1) * n_vocab);
        bool geq = !memcmp(alone[i].gen, batch[i].gen, sizeof alone[i].gen);
        CHECKF(eq && geq, "sequence %d (%s, %d prompt tokens in chunks of %d): batched logits %s, "
               "greedy tokens %s (max |diff| %.3g)", i, alone[i].spec, alone[i].n, alone[i].chunk,
               eq ? "equal" : "differ", geq ? "equal" : "differ",
               tu_max_abs_diff(batch[i].logits, alone[i].logits, (long)(G + 1) * n_vocab));
        same += eq && geq;
        int64_t bound = kvs_kv_bytes_bound(c, alone[i].spec, alone[i].n + G + 1);
        CHECKF(bound > 0 && batch[i].peak_bytes <= (uint64_t)bound,
               "%s: peak KV bytes %llu above the bound %lld", alone[i].spec,
               (unsigned long long)batch[i].peak_bytes, (long long)bound);
        int64_t dbound = kvs_kv_bytes_bound_decode(c, alone[i].spec, alone[i].n, G + 1);
        CHECKF(dbound > 0 && dbound <= bound && batch[i].peak_after <= (uint64_t)dbound,
               "%s: KV bytes after the prompt %llu above the bound %lld", alone[i].spec,
               (unsigned long long)batch[i].peak_after, (long long)dbound);
        if (i < n_specs)
            fprintf(stderr, "  %-24s prompt %3d, chunks of %2d: peak KV %7llu B (bound %7lld B), "
                    "after the prompt %7llu B (bound %7lld B)\n", alone[i].spec, alone[i].n,
                    alone[i].chunk, (unsigned long long)batch[i].peak_bytes, (long long)bound,
                    (unsigned long long)batch[i].peak_after, (long long)dbound);
    }
    struct kvs_model_info pmi;
    kvs_model_get_info(model, &pmi);
    fprintf(stderr, "%d sequences, %d policies, mixed steps, batched on packed weights (%.1f MB): %d "
            "of %d bit-identical to alone on plain weights\n", ns, ns < n_specs ? ns : n_specs, pmi.packed_bytes / 1e6, same, ns);
    /* the policies really ran: a budgeted sequence holds fewer entries than the full one */
    CHECK(kvs_seq_entries_per_head(batch[1].s) < kvs_seq_entries_per_head(batch[0].s));
    CHECK(kvs_seq_entries_per_head(batch[1].s) <= 40 + 4 + 1);
    CHECK(!strcmp(kvs_seq_kv(c, batch[0].s), "full"));

    /* errors: nothing evaluated on an invalid step */
    kvs_sequence *s0 = batch[0].s;
    int before = kvs_seq_n_past(s0);
    int32_t t = toks[0];
    struct kvs_batch_item dup[2] = {{.seq = s0, .tokens = &t, .n = 1, .decode = true},
                                    {.seq = s0, .tokens = &t, .n = 1, .decode = true}};
    CHECK(kvs_step(c, dup, 2) == KVS_ERR_INVALID_ARG);
    CHECK(kvs_seq_n_past(s0) == before);
    struct kvs_batch_item big = {.seq = s0, .tokens = toks, .n = 129};
    CHECK(kvs_step(c, &big, 1) == KVS_ERR_INVALID_ARG);
    struct kvs_batch_item two = {.seq = s0, .tokens = toks, .n = 2, .decode = true};
    CHECK(kvs_step(c, &two, 1) == KVS_ERR_INVALID_ARG);
    CHECK(kvs_seq_set_kv(c, s0, "h2o:budget=8") == KVS_ERR_INVALID_ARG); /* not empty */
    CHECK(strstr(kvs_last_error(), "empty") != NULL);
    kvs_sequence *e;
    if (ns == MAXS) CHECK(kvs_seq_new(c, &e) == KVS_ERR_INVALID_ARG); /* all 16 slots in use */
    CHECK(kvs_seq_set_kv(c, batch[1].s, "h2o:ratio=7") == KVS_ERR_INVALID_ARG);
    CHECK(kvs_kv_bytes_bound(c, "nonsense", 10) == -1);
    /* a bounded policy's bound does not grow with the tokens; full's does */
    CHECK(kvs_kv_bytes_bound(c, "h2o:budget=40", 400) == kvs_kv_bytes_bound(c, "h2o:budget=40", 4000));
    CHECK(kvs_kv_bytes_bound(c, "full", 400) > kvs_kv_bytes_bound(c, "full", 100));
    CHECK(kvs_kv_bytes_bound(c, "full+kivi:bits=2", 500) < kvs_kv_bytes_bound(c, "full", 500));
    kvs_context_free(c);
    for (int i = 0; i < ns; i++) free(alone[i].logits), free(batch[i].logits);
}

/* feed toks[0..n) to s in chunks (hold: entries stay exact), logits of the last token */
static void feed(kvs_context *c, kvs_sequence *s, const int32_t *toks, int n, int chunk, bool hold,
                 float *logits) {
    for (int d = 0; d < n;) {
        int m = n - d < chunk ? n - d : chunk;
        struct kvs_batch_item it = {.seq = s, .tokens = toks + d, .n = m, .hold = hold,
                                    .prompt_end = !hold && d + m == n,
                                    .logits = d + m == n ? logits : NULL};
        CHECKF(kvs_step(c, &it, 1) == KVS_OK, "%s", kvs_last_error());
        d += m;
    }
}

/* G greedy steps from logits l (n_vocab floats, overwritten); all logits into out */
static void decode(kvs_context *c, kvs_sequence *s, float *l, float *out) {
    for (int i = 0; i < G; i++) {
        int32_t t = argmax(l);
        struct kvs_batch_item it = {.seq = s, .tokens = &t, .n = 1, .decode = true, .logits = l};
        CHECKF(kvs_step(c, &it, 1) == KVS_OK, "%s", kvs_last_error());
        memcpy(out + (size_t)i * n_vocab, l, sizeof(float) * n_vocab);
    }
}

static void test_prefixes(const int32_t *toks, int n) {
    kvs_context *c = new_ctx(8, 64);
    size_t rows = (size_t)(G + 1) * n_vocab;
    float *ref = malloc(sizeof(float) * rows), *got = malloc(sizeof(float) * rows);
    const int B = 64, np = 2 * B, tail = n - np;
    CHECK(tail > 8);

    /* P computes the prefix itself, publishing a node per block of 64 */
    kvs_sequence *p;
    CHECK(kvs_seq_new(c, &p) == KVS_OK);
    kvs_prefix *n1 = NULL, *n2 = NULL, *bad = NULL;
    feed(c, p, toks, B, B, true, NULL);
    CHECKF(kvs_prefix_publish(c, p, NULL, &n1) == KVS_OK, "%s", kvs_last_error());
    feed(c, p, toks + B, B, B, true, NULL);
    CHECKF(kvs_prefix_publish(c, p, n1, &n2) == KVS_OK, "%s", kvs_last_error());
    CHECK(kvs_prefix_publish(c, p, n2, &bad) == KVS_ERR_INVALID_ARG); /* nothing after n2 */
    CHECK(kvs_prefix_n_tokens(n1) == B && kvs_prefix_n_tokens(n2) == np);
    CHECK(kvs_prefix_refcount(n1) == 2 && kvs_prefix_refcount(n2) == 1);
    uint64_t ck1 = kvs_prefix_checksum(n1), ck2 = kvs_prefix_checksum(n2);
    CHECK(kvs_prefix_bytes(n1) > 0 && kvs_prefix_bytes(n2) > 0);
    feed(c, p, toks + np, tail, 16, false, ref);
    memcpy(ref + (size_t)G * n_vocab, ref, sizeof(float) * n_vocab); /* keep the prompt's row */
    decode(c, p, ref, ref);

    /* Q starts from the chain (a prefix-cache hit): the same bits */
    kvs_sequence *q;
    CHECK(kvs_seq_new(c, &q) == KVS_OK);
    CHECKF(kvs_seq_attach_prefix(c, q, n2) == KVS_OK, "%s", kvs_last_error());
    CHECK(kvs_seq_n_past(q) == np && kvs_prefix_refcount(n2) == 2);
    CHECK(kvs_seq_kv_bytes(q) == 0); /* the chain is not q's */
    feed(c, q, toks + np, tail, 16, false, got);
    memcpy(got + (size_t)G * n_vocab, got, sizeof(float) * n_vocab);
    decode(c, q, got, got);
    bool eq = !memcmp(got, ref, sizeof(float) * rows);
    CHECKF(eq, "prefix hit vs recomputed: max |diff| %.3g", tu_max_abs_diff(got, ref, (long)rows));
    fprintf(stderr, "prefix hit (2 blocks of %d, then %d tokens, %d steps) vs recomputed: %s\n", B,
            tail, G, eq ? "bit-identical" : "DIFFER");
    CHECK(kvs_seq_attach_prefix(c, q, n1) == KVS_ERR_INVALID_ARG); /* not empty */
    kvs_seq_free(c, q);
    CHECK(kvs_prefix_refcount(n2) == 1);

    /* compressing sequences read the chain; it never changes */
    kvs_sequence *w[3];
    const char *wspec[3] = {"h2o:budget=32,every=1", "snapkv:budget=24", "full+kivi:bits=2"};
    for (int i = 0; i < 3; i++) {
        CHECK(kvs_seq_new(c, &w[i]) == KVS_OK);
        CHECKF(kvs_seq_set_kv(c, w[i], wspec[i]) == KVS_OK, "%s", kvs_last_error());
        CHECKF(kvs_seq_attach_prefix(c, w[i], i == 1 ? n1 : n2) == KVS_OK, "%s", kvs_last_error());
        int at = i == 1 ? B : np;
        feed(c, w[i], toks + at, n - at, 16, false, got);
        decode(c, w[i], got, got + n_vocab);
        CHECKF(kvs_seq_entries_per_head(w[i]) > 0, "%s", wspec[i]);
    }
    CHECKF(kvs_seq_entries_per_head(w[0]) <= 32 + 1 + 1, "h2o on a prefix: %.1f own entries",
           kvs_seq_entries_per_head(w[0]));
    CHECK(kvs_prefix_checksum(n1) == ck1 && kvs_prefix_checksum(n2) == ck2);
    fprintf(stderr, "shared blocks after 3 compressing sequences: checksums %s\n",
            kvs_prefix_checksum(n1) == ck1 && kvs_prefix_checksum(n2) == ck2 ? "unchanged" : "CHANGED");
    /* a sequence whose policy compressed cannot publish its entries */
    CHECK(kvs_prefix_publish(c, w[0], n2, &bad) == KVS_ERR_INVALID_ARG);
    CHECK(strstr(kvs_last_error(), "exact") != NULL);
    for (int i = 0; i < 3; i++) kvs_seq_free(c, w[i]);

    /* a compressed prefix node ≡ copy + kvs_seq_compress */
    kvs_sequence *h, *b, *a;
    CHECK(kvs_seq_new(c, &h) == KVS_OK && kvs_seq_new(c, &b) == KVS_OK && kvs_seq_new(c, &a) == KVS_OK);
    feed(c, h, toks, np, 32, true, NULL);
    kvs_prefix *k = NULL;
    CHECKF(kvs_prefix_compress(c, h, "snapkv:ratio=0.5", &k) == KVS_OK, "%s", kvs_last_error());
    CHECK(kvs_prefix_n_tokens(k) == np);
    CHECKF(kvs_prefix_bytes(k) * 10 < (kvs_prefix_bytes(n1) + kvs_prefix_bytes(n2)) * 6,
           "compressed node %llu B vs the chain's %llu B", (unsigned long long)kvs_prefix_bytes(k),
           (unsigned long long)(kvs_prefix_bytes(n1) + kvs_prefix_bytes(n2)));
    CHECK(kvs_seq_copy(c, b, c, h) == KVS_OK);
    CHECKF(kvs_seq_compress(c, b, "snapkv:ratio=0.5") == KVS_OK, "%s", kvs_last_error());
    feed(c, b, toks + np, tail, 16, false, ref);
    decode(c, b, ref, ref + n_vocab);
    CHECKF(kvs_seq_attach_prefix(c, a, k) == KVS_OK, "%s", kvs_last_error());
    feed(c, a, toks + np, tail, 16, false, got);
    decode(c, a, got, got + n_vocab);
    eq = !memcmp(got, ref, sizeof(float) * rows);
    CHECKF(eq, "compressed prefix vs copy+compress: max |diff| %.3g", tu_max_abs_diff(got, ref, (long)rows));
    fprintf(stderr, "compressed prefix (snapkv:ratio=0.5: %llu B, chain %llu B) vs copy + compress: %s\n",
            (unsigned long long)kvs_prefix_bytes(k),
            (unsigned long long)(kvs_prefix_bytes(n1) + kvs_prefix_bytes(n2)),
            eq ? "bit-identical" : "DIFFER");
    CHECK(kvs_prefix_compress(c, h, "nonsense", &bad) == KVS_ERR_INVALID_ARG);

    /* releases: the chain lives while a holder does */
    struct kvs_mem_stats m0, m1;
    kvs_context_mem(c, &m0);
    kvs_prefix_unref(n1); /* n2 still holds n1 */
    CHECK(kvs_prefix_refcount(n2) == 1 && kvs_prefix_checksum(n1) == ck1);
    kvs_prefix_unref(n2); /* frees n2, then n1 */
    kvs_prefix_unref(k);  /* a holds it */
    kvs_seq_free(c, a);   /* frees k */
    kvs_context_mem(c, &m1);
    CHECKF(m1.kv_bytes < m0.kv_bytes, "KV bytes %llu -> %llu after releasing the nodes",
           (unsigned long long)m0.kv_bytes, (unsigned long long)m1.kv_bytes);
    kvs_seq_free(c, b);
    kvs_seq_free(c, h);
    kvs_seq_free(c, p);
    kvs_context_mem(c, &m1);
    CHECKF(m1.kv_bytes == 0, "%llu KV bytes left with no sequence and no node",
           (unsigned long long)m1.kv_bytes);
    kvs_context_free(c);
    free(ref), free(got);
}

/* Pinned positions survive a budget far below the tokens seen; unpinned, some of them go. */
static void test_pin(const int32_t *toks, int n) {
    kvs_context *c = new_ctx(2, 32);
    const int pin = 20;
    int kept[2];
    for (int pinned = 0; pinned < 2; pinned++) {
        kvs_sequence *s;
        CHECK(kvs_seq_new(c, &s) == KVS_OK);
        CHECK(kvs_seq_set_kv(c, s, pinned ? "tova:budget=32,every=1" : "tova:budget=32,every=1") == KVS_OK);
        if (pinned) kvs_seq_pin(c, s, pin);
        feed(c, s, toks, n, 32, false, NULL);
        int all = 1, some = 0;
        for (int il = 0; il < mi_layers; il++)
            for (int ih = 0; ih < mi_heads_kv; ih++) {
                const struct kv_head_store *h = kv_seq_head(s->kv, il, ih);
                int k = 0;
                for (int j = 0; j < h->n; j++) k += h->pos[j] < pin;
                all &= k == pin;
                some += k;
            }
        kept[pinned] = some;
        if (pinned) CHECKF(all, "pinned: %d of %d pinned entries kept", some, pin * mi_layers * mi_heads_kv);
        kvs_seq_free(c, s);
    }
    CHECKF(kept[0] < kept[1], "unpinned kept %d, pinned %d of the first %d positions", kept[0], kept[1], pin);
    fprintf(stderr, "pin %d of %d tokens under tova:budget=32: first positions kept %d (unpinned %d) of %d\n",
            pin, n, kept[1], kept[0], pin * mi_layers * mi_heads_kv);
    kvs_context_free(c);
}

int main(void) {
    const char *path = tu_model_path();
    if (!path) {
        tu_skip("test_serve_engine", "model %s not found: make models", tu_model_name());
        return 77;
    }
    struct kvs_model_params mp = kvs_model_params_default();
    mp.pack = true;
    struct kvs_model_params mp_plain = kvs_model_params_default();
    mp_plain.pack = false;
    if (kvs_model_load(path, &mp, &model) != KVS_OK || kvs_model_load(path, &mp_plain, &model_plain) != KVS_OK) {
        fprintf(stderr, "%s\n", kvs_last_error());
        return 1;
    }
    struct kvs_model_info mi;
    kvs_model_get_info(model, &mi);
    n_vocab = mi.n_vocab;
    mi_layers = mi.n_layer, mi_heads_kv = mi.n_head_kv;
    const char *text =
        "It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. However little known the feelings or views of such "
        "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
        "minds of the surrounding families, that he is considered the rightful property of some "
        "one or other of their daughters. My dear Mr. Bennet, said his lady to him one day, have "
        "you heard that Netherfield Park is let at last? Mr. Bennet replied that he had not. But "
        "it is, returned she; for Mrs. Long has just been here, and she told me all about it. Mr. "
        "Bennet made no answer. Do you not want to know who has taken it? cried his wife "
        "impatiently. You want to tell me, and I have no objection to hearing it. This was "
        "invitation enough.";
    int32_t toks[512];
    int n = kvs_tokenize(model, text, strlen(text), true, false, toks, 512);
    CHECKF(n > 180 && n < 512, "%d tokens", n);
    test_batch_invariance(toks, n);
    test_prefixes(toks, n);
    test_pin(toks, n);
    kvs_model_free(model);
    kvs_model_free(model_plain);
    return tu_finish("test_serve_engine");
}
