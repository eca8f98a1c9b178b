/* test_cache_file.c — kvs_seq_save / kvs_seq_load on the real SmolLM2 model:
 *   a saved and restored sequence (in the same context and in a fresh one) continues
 *   bit-identically to the original — prefill chunks and decode steps, under full and under
 *   compressing policies (h2o: accumulated attention; snapkv + adakv: saved queries, unequal
 *   heads; streaming: RoPE shift), and saving the continued sequences gives identical files;
 *   KV byte accounting after a load equals the original's;
 *   a cache loads under another policy (statistic slots adapted);
 *   corrupted, truncated, foreign-model, wrong-version and invalid files are refused with the
 *   right message and leave the target sequence unchanged.
 * Skips (77, a SKIP line) when the model file is missing. */
#include "kvsieve.h"
#include "engine.h"
#include "kv/kv_file.h"
#include "testutil.h"

#include <dirent.h>
#include <stdint.h>
#include <unistd.h>

static kvs_model *model;
static int n_vocab;
static char dir[64];

static const char *TEXT =
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. \"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard "
    "that Netherfield Park is let at last?\" Mr. Bennet replied that he had not. \"But it is,\" "
    "returned she; \"for Mrs. Long has just been here, and she told me all about it.\" Mr. "
    "Bennet made no answer. \"Do you not want to know who has taken it?\" cried his wife "
    "impatiently. \"You want to tell me, and I have no objection to hearing it.\" This was "
    "invitation enough. \"Why, my dear, you must know, Mrs. Long says that Netherfield is taken "
    "by a young man of large fortune from the north of England; that he came down on Monday in "
    "a chaise and four to see the place, and was so much delighted with it, that he agreed with "
    "Mr. Morris immediately.\"";

/* 100 prompt tokens, then 20 more as one prefill (two chunks of 16), then 24 decode steps: the
 * compressing policies (budget 32, every 16) compress after each chunk and once while decoding */
enum { N_PROMPT = 100, N_CONT = 20, N_DEC = 24, N_TOK = N_PROMPT + N_CONT + N_DEC };

static kvs_context *mkctx(const char *spec, int n_ctx, int n_seq) {
    struct kvs_context_params p = kvs_context_params_default();
    p.n_ctx = n_ctx;
    p.n_threads = 2;
    p.n_batch = 16;
    p.n_seq_max = n_seq;
    p.kv_spec = spec;
    kvs_context *c = NULL;
    CHECKF(kvs_context_new(model, &p, &c) == KVS_OK, "%s: %s", spec, kvs_last_error());
    return c;
}

static uint64_t kv_bytes(const kvs_context *c) {
    struct kvs_mem_stats ms;
    kvs_context_mem(c, &ms);
    return ms.kv_bytes;
}

static char *path_of(const char *name) {
    static char buf[8][512];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, 512, "%.63s/%.255s", dir, name);
    return p;
}

static unsigned char *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)sz + 1);
    *n = fread(b, 1, (size_t)sz, f);
    fclose(f);
    return b;
}

static void write_all(const char *path, const void *b, size_t n) {
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (!f) return;
    CHECK(fwrite(b, 1, n, f) == n);
    fclose(f);
}

static bool same_file(const char *a, const char *b) {
    size_t na, nb;
    unsigned char *x = read_all(a, &na), *y = read_all(b, &nb);
    bool same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

/* Continue a sequence with toks[N_PROMPT..]: N_CONT tokens as one prefill (chunks of 16), then
 * n_dec single-token decode steps; returns every logit row produced. */
static float *cont(kvs_context *c, kvs_sequence *s, const int32_t *toks, int n_dec) {
    float *l = malloc(sizeof(float) * (size_t)(N_CONT + n_dec) * n_vocab);
    CHECKF(kvs_eval(c, s, toks + N_PROMPT, N_CONT, true, l, NULL, NULL) == KVS_OK, "%s",
           kvs_last_error());
    for (int i = 0; i < n_dec; i++)
        CHECKF(kvs_eval(c, s, toks + N_PROMPT + N_CONT + i, 1, false,
                        l + (size_t)(N_CONT + i) * n_vocab, NULL, NULL) == KVS_OK, "%s",
               kvs_last_error());
    CHECK(kvs_seq_n_past(s) == N_PROMPT + N_CONT + n_dec);
    return l;
}

/* Prefill N_PROMPT tokens under `spec`, save, restore into a fresh sequence of the same
 * context and into a used sequence of a fresh context, continue all three: bit-identical. */
static void test_roundtrip(const char *spec, const char *file, const int32_t *toks) {
    kvs_context *c1 = mkctx(spec, 512, 2), *c2 = mkctx(spec, 512, 1);
    if (!c1 || !c2) return;
    kvs_sequence *s1, *s1b, *s2;
    CHECK(kvs_seq_new(c1, &s1) == KVS_OK);
    CHECK(kvs_eval(c1, s1, toks, N_PROMPT, false, NULL, NULL, NULL) == KVS_OK);
    uint64_t bytes = kv_bytes(c1);
    int32_t max_n = kv_seq_max_entries(s1->kv);
    CHECKF(kvs_seq_save(c1, s1, path_of(file)) == KVS_OK, "%s", kvs_last_error());
    CHECK(kv_bytes(c1) == bytes);
    CHECK(kvs_seq_n_past(s1) == N_PROMPT);

    /* a fresh sequence of the same context */
    CHECK(kvs_seq_new(c1, &s1b) == KVS_OK);
    CHECKF(kvs_seq_load(c1, s1b, path_of(file)) == KVS_OK, "%s", kvs_last_error());
    CHECK(kvs_seq_n_past(s1b) == N_PROMPT);
    CHECKF(kv_bytes(c1) == 2 * bytes, "%s: %llu != 2 x %llu", spec,
           (unsigned long long)kv_bytes(c1), (unsigned long long)bytes);
    CHECK(kv_seq_check(s1b->kv));
    CHECK(s1b->pos_shift == s1->pos_shift);

    /* a sequence of a fresh context that already holds other tokens: replaced */
    CHECK(kvs_seq_new(c2, &s2) == KVS_OK);
    CHECK(kvs_eval(c2, s2, toks + 3, 37, false, NULL, NULL, NULL) == KVS_OK);
    CHECKF(kvs_seq_load(c2, s2, path_of(file)) == KVS_OK, "%s", kvs_last_error());
    CHECK(kvs_seq_n_past(s2) == N_PROMPT);
    CHECKF(kv_bytes(c2) == bytes, "%s: %llu != %llu", spec, (unsigned long long)kv_bytes(c2),
           (unsigned long long)bytes);
    CHECK(kv_seq_max_entries(s2->kv) == max_n);

    float *ref = cont(c1, s1, toks, N_DEC), *a = cont(c1, s1b, toks, N_DEC),
          *b = cont(c2, s2, toks, N_DEC);
    size_t nb = sizeof(float) * (size_t)(N_CONT + N_DEC) * n_vocab;
    CHECKF(memcmp(ref, a, nb) == 0, "%s: restored (same context) differs, max |diff| %.3g", spec,
           tu_max_abs_diff(a, ref, (long)(nb / 4)));
    CHECKF(memcmp(ref, b, nb) == 0, "%s: restored (fresh context) differs, max |diff| %.3g",
           spec, tu_max_abs_diff(b, ref, (long)(nb / 4)));
    CHECK(kv_bytes(c1) == 2 * kv_bytes(c2));
    /* the whole state still agrees after decode-time compression: the saved files are equal */
    CHECK(kvs_seq_save(c1, s1, path_of("after_a.kvc")) == KVS_OK);
    CHECK(kvs_seq_save(c1, s1b, path_of("after_b.kvc")) == KVS_OK);
    CHECK(kvs_seq_save(c2, s2, path_of("after_c.kvc")) == KVS_OK);
    CHECKF(same_file(path_of("after_a.kvc"), path_of("after_b.kvc")), "%s", spec);
    CHECKF(same_file(path_of("after_a.kvc"), path_of("after_c.kvc")), "%s", spec);
    size_t fsz;
    unsigned char *fb = read_all(path_of(file), &fsz);
    fprintf(stderr, "%-40s file %7zu bytes, kv %8llu bytes, largest head %3d entries: %s\n", spec,
            fsz, (unsigned long long)bytes, max_n,
            memcmp(ref, a, nb) || memcmp(ref, b, nb) ? "DIFFERS" : "continues bit-identically");
    free(fb);
    free(ref);
    free(a);
    free(b);
    kvs_context_free(c1);
    kvs_context_free(c2);
}

/* A cache made under one policy, continued under another. */
static void test_cross_policy(const char *file, const char *spec, const int32_t *toks) {
    kvs_context *c = mkctx(spec, 512, 1);
    if (!c) return;
    kvs_sequence *s;
    CHECK(kvs_seq_new(c, &s) == KVS_OK);
    CHECKF(kvs_seq_load(c, s, path_of(file)) == KVS_OK, "%s into %s: %s", file, spec,
           kvs_last_error());
    CHECK(kvs_seq_n_past(s) == N_PROMPT);
    CHECK(kv_seq_check(s->kv));
    struct kv_cache *kc = &c->kv;
    if (kc->with_acc) { /* present: copied; absent: zero */
        const struct kv_head_store *h = kv_seq_head(s->kv, 0, 0);
        bool file_acc = strstr(file, "h2o") != NULL;
        float sum = 0;
        for (int j = 0; j < h->n; j++) sum += h->acc[j];
        CHECKF(file_acc ? sum > 0 : sum == 0, "%s into %s: acc sum %g", file, spec, sum);
    }
    if (kc->qwin) { /* the newest min(file, context) queries, newest last */
        int want = strstr(file, "snapkv") ? (kc->qwin < 32 ? kc->qwin : 32) : 0;
        CHECKF(s->kv->q_n[0] == want, "%s into %s: %d saved queries, want %d", file, spec,
               s->kv->q_n[0], want);
        if (want) {
            int newest = (s->kv->q_head[0] - 1 + kc->qwin) % kc->qwin;
            CHECK(s->kv->q_pos[newest] == N_PROMPT - 1);
        }
    }
    free(cont(c, s, toks, 4));
    CHECK(kv_seq_check(s->kv));
    kvs_context_free(c);
}

/* ... unless the context's policy cannot continue the cache's shape */
static void test_cross_refused(const char *file, const char *spec, const char *msg) {
    kvs_context *c = mkctx(spec, 512, 1);
    if (!c) return;
    kvs_sequence *s;
    CHECK(kvs_seq_new(c, &s) == KVS_OK);
    enum kvs_status st = kvs_seq_load(c, s, path_of(file));
    CHECKF(st == KVS_ERR_INVALID_ARG && strstr(kvs_last_error(), msg),
           "%s into %s: status %d, '%s' (want '%s')", file, spec, st, kvs_last_error(), msg);
    CHECK(kvs_seq_n_past(s) == 0 && kv_seq_max_entries(s->kv) == 0);
    fprintf(stderr, "refused %s into %s: %s\n", file, spec, kvs_last_error());
    kvs_context_free(c);
}

/* ---- refusals --------------------------------------------------------------------------- */

static kvs_context *tc;
static kvs_sequence *ts;

static void refused(const char *what, const void *data, size_t n, enum kvs_status want,
                    const char *msg) {
    int32_t n_past = kvs_seq_n_past(ts);
    uint64_t bytes = kv_bytes(tc);
    int32_t max_n = kv_seq_max_entries(ts->kv);
    const char *p = path_of("bad.kvc");
    if (data) write_all(p, data, n);
    else unlink(p);
    enum kvs_status st = kvs_seq_load(tc, ts, p);
    CHECKF(st == want && strstr(kvs_last_error(), msg) && strstr(kvs_last_error(), p),
           "%s: status %d (want %d), message '%s' (want '%s')", what, st, want, kvs_last_error(),
           msg);
    CHECKF(kvs_seq_n_past(ts) == n_past && kv_bytes(tc) == bytes &&
           kv_seq_max_entries(ts->kv) == max_n, "%s: the sequence changed", what);
    fprintf(stderr, "refused %-28s %s\n", what, kvs_last_error());
}

static void fix_crc(unsigned char *b, size_t n) {
    uint64_t crc = kv_file_crc64(0, b, n - 8);
    memcpy(b + n - 8, &crc, 8);
}

static void test_refusals(const char *good_file, const int32_t *toks) {
    tc = mkctx("full", 512, 1);
    if (!tc) return;
    CHECK(kvs_seq_new(tc, &ts) == KVS_OK);
    CHECK(kvs_eval(tc, ts, toks, 10, false, NULL, NULL, NULL) == KVS_OK);
    size_t n;
    unsigned char *good = read_all(path_of(good_file), &n), *b = malloc(n + 16);
    CHECK(good && n > KV_FILE_HEADER_BYTES + 8);
    if (!good) return;

    const char *check_value = "123456789";
    CHECK(kv_file_crc64(0, check_value, 9) == 0x995DC9BBDF1939FAull);
    CHECK(kv_file_crc64(kv_file_crc64(0, good, 1000), good + 1000, n - 1000) ==
          kv_file_crc64(0, good, n));

    refused("missing file", NULL, 0, KVS_ERR_IO, "cannot open");
    size_t offs[] = {n / 2, KV_FILE_HEADER_BYTES + 5, KV_FILE_OFF_N_PAST, n - 1};
    for (int i = 0; i < 4; i++) {
        memcpy(b, good, n);
        b[offs[i]] ^= 0x10;
        char what[64];
        snprintf(what, sizeof what, "byte %zu flipped", offs[i]);
        refused(what, b, n, KVS_ERR_FORMAT, "corrupted cache file");
    }
    size_t cuts[] = {0, 5, 11, 100, KV_FILE_HEADER_BYTES, KV_FILE_HEADER_BYTES + 8,
                     KV_FILE_HEADER_BYTES + 9, n / 3, n - 8, n - 1};
    for (int i = 0; i < 10; i++) {
        char what[64];
        snprintf(what, sizeof what, "truncated at %zu", cuts[i]);
        refused(what, good, cuts[i], KVS_ERR_FORMAT, "truncated cache file");
    }
    memcpy(b, good, n);
    b[n] = 0;
    refused("trailing byte", b, n + 1, KVS_ERR_FORMAT, "corrupted cache file");
    memcpy(b, good, n);
    b[7] = 'X';
    refused("bad magic", b, n, KVS_ERR_FORMAT, "not a kvsieve cache file");
    refused("text file", "hello, world\n", 13, KVS_ERR_FORMAT, "not a kvsieve cache file");
    memcpy(b, good, n);
    b[KV_FILE_OFF_VERSION] = 99;
    refused("version 99", b, n, KVS_ERR_FORMAT, "unsupported cache version 99");
    fix_crc(b, n);
    refused("version 99, checksum fixed", b, n, KVS_ERR_FORMAT, "unsupported cache version 99");

    /* fingerprint edits with the checksum fixed */
    memcpy(b, good, n);
    b[KV_FILE_OFF_MODEL_HASH + 3] ^= 1;
    fix_crc(b, n);
    refused("model hash", b, n, KVS_ERR_INVALID_ARG, "cache was made with another model");
    memcpy(b, good, n);
    b[KV_FILE_OFF_N_LAYER] = 24;
    fix_crc(b, n);
    refused("n_layer", b, n, KVS_ERR_INVALID_ARG, "cache was made with another model");
    memcpy(b, good, n);
    memcpy(b + KV_FILE_OFF_ARCH, "qwen2", 6);
    fix_crc(b, n);
    refused("architecture", b, n, KVS_ERR_INVALID_ARG, "cache was made with another model");

    /* content edits with the checksum fixed */
    int32_t v;
    memcpy(b, good, n);
    memcpy(&v, b + KV_FILE_HEADER_BYTES + 4, 4); /* layer 0 head 0: pos[0] := pos[1] */
    memcpy(b + KV_FILE_HEADER_BYTES + 4, b + KV_FILE_HEADER_BYTES + 8, 4);
    fix_crc(b, n);
    refused("positions not ascending", b, n, KVS_ERR_FORMAT, "not strictly ascending");
    memcpy(b, good, n);
    v = N_PROMPT / 2;
    memcpy(b + KV_FILE_OFF_N_PAST, &v, 4);
    fix_crc(b, n);
    refused("n_past below positions", b, n, KVS_ERR_FORMAT, "outside 0..49");
    memcpy(b, good, n);
    v = 1000;
    memcpy(b + KV_FILE_HEADER_BYTES, &v, 4); /* layer 0 head 0 claims 1000 entries */
    fix_crc(b, n);
    refused("count beyond the body", b, n, KVS_ERR_INVALID_ARG, "more than the context size");
    memcpy(b, good, n);
    v = 5; /* bit 2 is not defined */
    memcpy(b + KV_FILE_OFF_FLAGS, &v, 4);
    fix_crc(b, n);
    refused("unknown flags", b, n, KVS_ERR_FORMAT, "unknown flags");
    memcpy(b, good, n);
    v = 2; /* learned scores without the slot */
    memcpy(b + KV_FILE_OFF_FLAGS, &v, 4);
    fix_crc(b, n);
    refused("learned flag without slot", b, n, KVS_ERR_FORMAT, "unknown flags");

    /* a context too small for the cache */
    kvs_context *small = mkctx("full", 64, 1);
    kvs_sequence *ss;
    CHECK(kvs_seq_new(small, &ss) == KVS_OK);
    CHECK(kvs_seq_load(small, ss, path_of(good_file)) == KVS_ERR_INVALID_ARG);
    CHECKF(strstr(kvs_last_error(), "more than the context size 64"), "%s", kvs_last_error());
    CHECK(kvs_seq_n_past(ss) == 0 && kv_bytes(small) == 0);
    kvs_context_free(small);

    /* a cache of another real model, when it is there */
    const char *qpath = "models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";
    kvs_model *qm = NULL;
    bool slow_ok = !getenv("KVS_SANITIZE") || getenv("KVS_SLOW"); /* 1.5B under ASan: slow */
    if (!slow_ok)
        tu_skip("test_cache_file foreign-model cache", "the 1.5B model under the sanitizers is "
                "slow: KVS_SLOW=1 runs it; checked by edited fingerprints only");
    else if (access(qpath, R_OK) != 0)
        tu_skip("test_cache_file foreign-model cache", "%s not found: make models-large; "
                "checked by edited fingerprints only", qpath);
    else
        CHECKF(kvs_model_load(qpath, NULL, &qm) == KVS_OK, "%s: %s", qpath, kvs_last_error());
    if (qm) {
        struct kvs_context_params p = kvs_context_params_default();
        p.n_ctx = 64;
        p.n_threads = 2;
        kvs_context *qc = NULL;
        kvs_sequence *qs;
        int32_t qt[8];
        int nq = kvs_tokenize(qm, "The capital of France", 21, false, false, qt, 8);
        CHECK(kvs_context_new(qm, &p, &qc) == KVS_OK && kvs_seq_new(qc, &qs) == KVS_OK);
        CHECK(nq > 0 && kvs_eval(qc, qs, qt, nq, false, NULL, NULL, NULL) == KVS_OK);
        CHECK(kvs_seq_save(qc, qs, path_of("qwen.kvc")) == KVS_OK);
        size_t qn;
        unsigned char *qb = read_all(path_of("qwen.kvc"), &qn);
        refused("qwen2 cache", qb, qn, KVS_ERR_INVALID_ARG, "cache was made with another model");
        free(qb);
        kvs_context_free(qc);
        kvs_model_free(qm);
    }

    /* saving where it cannot be written */
    CHECK(kvs_seq_save(tc, ts, "/nonexistent-dir/x.kvc") == KVS_ERR_IO);
    CHECKF(strstr(kvs_last_error(), "/nonexistent-dir/x.kvc"), "%s", kvs_last_error());

    /* and the good file still loads into the same sequence */
    CHECKF(kvs_seq_load(tc, ts, path_of(good_file)) == KVS_OK, "%s", kvs_last_error());
    CHECK(kvs_seq_n_past(ts) == N_PROMPT);
    free(good);
    free(b);
    kvs_context_free(tc);
}

static void cleanup(void) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    int tmp_left = 0;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        if (strstr(e->d_name, ".tmp.")) tmp_left++;
        unlink(path_of(e->d_name));
    }
    closedir(d);
    CHECKF(tmp_left == 0, "%d temporary files left behind", tmp_left);
    rmdir(dir);
}

int main(void) {
    const char *mp = tu_model_path();
    if (!mp) {
        tu_skip("test_cache_file", "model %s not found: make models", tu_model_name());
        return 77;
    }
    if (kvs_model_load(mp, NULL, &model) != KVS_OK) {
        fprintf(stderr, "cannot load %s: %s\n", mp, kvs_last_error());
        return 1;
    }
    struct kvs_model_info mi;
    kvs_model_get_info(model, &mi);
    n_vocab = mi.n_vocab;
    snprintf(dir, sizeof dir, "/tmp/kvs_cache_test.XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    int32_t toks[512];
    int n = kvs_tokenize(model, TEXT, strlen(TEXT), true, false, toks, 512);
    CHECKF(n >= N_TOK, "the text has %d tokens, the test needs %d", n, N_TOK);
    if (n < N_TOK) return tu_finish("test_cache_file");

    test_roundtrip("full", "full.kvc", toks);
    test_roundtrip("h2o:budget=32", "h2o.kvc", toks);
    /* window 32 > the first continuation chunk: its plan scores with restored queries too */
    test_roundtrip("snapkv:budget=48,window=32+alloc=adakv", "snapkv.kvc", toks);
    test_roundtrip("streaming:budget=32", "streaming.kvc", toks);

    test_cross_policy("full.kvc", "h2o:budget=32", toks);
    test_cross_policy("snapkv.kvc", "h2o:budget=32", toks);
    test_cross_policy("h2o.kvc", "full", toks);
    test_cross_policy("h2o.kvc", "snapkv:budget=32,window=8", toks);
    test_cross_policy("snapkv.kvc", "snapkv:budget=32,window=4", toks);
    test_cross_policy("snapkv.kvc", "snapkv:budget=64,window=48", toks);
    test_cross_policy("full.kvc", "tova:budget=48", toks);
    test_cross_policy("full.kvc", "streaming:budget=32", toks);
    test_cross_policy("streaming.kvc", "full", toks);
    test_cross_policy("streaming.kvc", "streaming:budget=48", toks);
    test_cross_refused("snapkv.kvc", "tova:budget=48", "scores a layer's heads together");
    test_cross_refused("h2o.kvc", "tova:budget=48", "scores a layer's heads together");
    test_cross_refused("h2o.kvc", "streaming:budget=32", "needs contiguous ones");

    test_refusals("full.kvc", toks);
    cleanup();
    kvs_model_free(model);
    return tu_finish("test_cache_file");
}
