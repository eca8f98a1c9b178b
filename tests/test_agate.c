/* test_agate.c — Attention-Gate (issue 14): weight files, the gate's kernel, in-context eviction.
 *   files: a valid method-2 KVSLRN01 file loads; damaged variants (method, activation, gate
 *     shape, size, checksum) are refused with their reason; kv_learned_find tells a gate file
 *     from a Locret file of the same model;
 *   kernel: kv_agate_project + kv_agate_score against a float64 reference written here;
 *   on the real model with the shipped gate (weights/agate-*.lrn):
 *     - tau=0 keeps every entry and is bit-identical to full (prompt in chunks, then decode);
 *     - the gate's scores (tau=0) agree with PyTorch's on the same tokens
 *       (tests/golden/agate-*.ref.bin, tools/train/agate.py) within the stated budget, and the
 *       flags they give agree;
 *     - the gated model (tau=0.5) has the perplexity PyTorch's gated forward has on those tokens,
 *       within the budget stated below, and keeps about the rate PyTorch reports;
 *     - chunked prefill (64, 7 and 1 tokens a call) gives the same logits bit for bit and the
 *       same entries: the visibility rule, not eviction timing, decides what a query sees;
 *     - every entry held scores >= tau, or is position 0, or lies within the window of the
 *       newest token; the gate's cache holds every token and is counted in the KV bytes;
 *     - a budget caps every head; a copy continues exactly like its source; cache files,
 *       copies from a sequence without the gate and compressions of one are refused. */
#include "kv/kv_cache.h"
#include "kv/learned.h"
#include "kvsieve.h"
#include "engine.h"
#include "ops.h"
#include "quant.h"
#include "testutil.h"

#include <math.h>
#include <xxhash.h>

static kvs_model *M;
static struct kvs_model_info MI;

static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)v), put32(p + 4, (uint32_t)(v >> 32)); }

/* a random gate file: D = H * hd inputs, gh heads of gd channels, window win */
static size_t make_gate(uint8_t **out, uint64_t fp, int L, int H, int KV, int hd, int gh, int gd, int win) {
    size_t D = (size_t)H * hd, W = (size_t)gh * gd, per = 3 * (W * D + W) + (size_t)KV * (W + 1);
    size_t n = 128 + (size_t)L * per * 2 + 8;
    uint8_t *b = calloc(1, n);
    memcpy(b, "KVSLRN01", 8);
    put32(b + 8, 1), put32(b + 12, 2), put64(b + 16, fp);
    put32(b + 24, (uint32_t)L), put32(b + 28, (uint32_t)H), put32(b + 32, (uint32_t)KV), put32(b + 36, (uint32_t)hd);
    put32(b + 40, (uint32_t)gh), put32(b + 44, 2), put32(b + 48, 3), put32(b + 52, 0);
    memcpy(b + 56, "test", 4);
    put32(b + 120, (uint32_t)gd), put32(b + 124, (uint32_t)win);
    uint16_t *w = (uint16_t *)(b + 128);
    for (size_t i = 0; i < (size_t)L * per; i++) w[i] = quant_f32_to_f16(tu_randf() * 0.5f);
    put64(b + n - 8, XXH64(b, n - 8, 0));
    *out = b;
    return n;
}

static void write_file(const char *path, const uint8_t *b, size_t n) {
    FILE *f = fopen(path, "wb");
    CHECK(f && fwrite(b, 1, n, f) == n);
    if (f) fclose(f);
}

static enum kvs_status load_bytes(const uint8_t *b, size_t n, uint32_t method, uint64_t fp, struct kv_learned **l) {
    write_file("/tmp/kvs_test_agate.lrn", b, n);
    return kv_learned_load("/tmp/kvs_test_agate.lrn", method, fp, 2, 4, 2, 8, l);
}

static void test_files_and_kernel(void) {
    uint8_t *b;
    uint64_t fp = 0x1234567890abcdefull;
    size_t n = make_gate(&b, fp, 2, 4, 2, 8, 2, 16, 16);
    struct kv_learned *l = NULL;
    CHECKF(load_bytes(b, n, 2, fp, &l) == KVS_OK, "valid gate file: %s", kvs_last_error());
    CHECK(l && l->method == 2 && l->hidden == 2 && l->gd == 16 && l->gw == 32 && l->window == 16 && l->d_in == 32);
    /* kernel against float64: T tokens, token t attends to rows 0..t of the gate's cache */
    if (l) {
        enum { T = 9 };
        int W = l->gw, D = l->d_in, K = l->n_head_kv;
        float X[T * 32], qkv[T * 96], kv[T * 64];
        for (int i = 0; i < T * D; i++) X[i] = tu_randf() * 2.0f;
        kv_agate_project(l, 1, X, D, T, qkv);
        double maxd = 0;
        for (int t = 0; t < T; t++)
            for (int m = 0; m < 3 * W; m++) {
                double z = l->gb[(size_t)1 * 3 * W + m];
                for (int i = 0; i < D; i++) z += (double)l->gqkv[((size_t)1 * 3 * W + m) * D + i] * X[t * D + i];
                maxd = fmax(maxd, fabs(z - qkv[t * 3 * W + m]));
            }
        CHECKF(maxd < 1e-4, "kv_agate_project: max |diff| %g", maxd);
        /* the cache as the store holds it: fp16 planes (keys of each head, then values) */
        uint16_t planes[4][T * 16];
        for (int t = 0; t < T; t++)
            for (int i = 0; i < 2 * W; i++) {
                uint16_t hv = quant_f32_to_f16(qkv[t * 3 * W + W + i]);
                kv[t * 2 * W + i] = quant_f16_to_f32(hv);
                planes[i / l->gd][t * l->gd + i % l->gd] = hv;
            }
        const uint16_t *Kp[2] = {planes[0], planes[1]}, *Vp[2] = {planes[2], planes[3]};
        float S[8 * T], O[2 * 8 * 32 + 64], got[T * 2];
        /* tokens 0..T-1 in blocks of 1, 3 and 8: every blocking gives the same bits */
        int blocks[3] = {1, 3, 8};
        float first[T * 2];
        bool same = true;
        for (int bi = 0; bi < 3; bi++) {
            for (int t0 = 0; t0 < T; t0 += blocks[bi]) {
                int nt = T - t0 < blocks[bi] ? T - t0 : blocks[bi];
                kv_agate_score(l, 1, qkv + t0 * 3 * W, 3 * W, nt, Kp, Vp, t0 + nt, got + t0 * K, S, O);
            }
            if (bi == 0) memcpy(first, got, sizeof first);
            else same = same && !memcmp(first, got, sizeof first);
        }
        CHECKF(same, "kv_agate_score: blocks of 3 or 8 tokens change the scores");
        maxd = 0;
        for (int t = 0; t < T; t++) {
            const float *out = got + t * K;
            double o[32] = {0};
            for (int h = 0; h < l->hidden; h++) {
                double a[T], m = -1e300, s = 0;
                for (int j = 0; j <= t; j++) {
                    double d = 0;
                    for (int c = 0; c < l->gd; c++) d += (double)qkv[t * 3 * W + h * l->gd + c] * kv[j * 2 * W + h * l->gd + c];
                    a[j] = d / sqrt((double)l->gd);
                    m = fmax(m, a[j]);
                }
                for (int j = 0; j <= t; j++) s += exp(a[j] - m);
                for (int j = 0; j <= t; j++)
                    for (int c = 0; c < l->gd; c++) o[h * l->gd + c] += exp(a[j] - m) / s * kv[j * 2 * W + W + h * l->gd + c];
            }
            for (int k = 0; k < K; k++) {
                double z = l->gbg[(size_t)1 * K + k];
                for (int c = 0; c < W; c++) z += (double)l->gg[((size_t)1 * K + k) * W + c] * o[c];
                maxd = fmax(maxd, fabs(1.0 / (1.0 + exp(-z)) - out[k]));
            }
        }
        CHECKF(maxd < 1e-5, "kv_agate_score: max |diff| %g against float64", maxd);
    }
    kv_learned_free(l);
    struct { const char *what, *msg; size_t off; uint8_t val; int cut; bool fix_sum; uint32_t method; } bad[] = {
        {"asked as locret", "not Locret", 0, 0, 0, false, 1},
        {"unknown method", "not Attention-Gate", 12, 9, 0, true, 2},
        {"activation", "sigmoid", 44, 1, 0, true, 2},
        {"gate dim", "out of range", 120, 0, 0, true, 2},
        {"checksum", "checksum mismatch", 300, 0x55, 0, false, 2},
        {"truncated", "truncated or damaged", 0, 0, 10, false, 2},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint8_t *c = malloc(n);
        memcpy(c, b, n);
        if (bad[i].off || bad[i].val) c[bad[i].off] = bad[i].val;
        if (bad[i].fix_sum) put64(c + n - 8, XXH64(c, n - 8, 0));
        l = NULL;
        enum kvs_status st = load_bytes(c, n - (size_t)bad[i].cut, bad[i].method, fp, &l);
        CHECKF(st != KVS_OK && !l, "%s: damaged file accepted", bad[i].what);
        CHECKF(strstr(kvs_last_error(), bad[i].msg), "%s: message '%s' lacks '%s'", bad[i].what,
               kvs_last_error(), bad[i].msg);
        free(c);
    }
    /* find tells the methods apart: a Locret-looking file sorts first but is not a gate */
    CHECK(system("rm -rf /tmp/kvs_agate_dir && mkdir -p /tmp/kvs_agate_dir") == 0);
    uint8_t *o = malloc(n);
    memcpy(o, b, n);
    put32(o + 12, 1);
    write_file("/tmp/kvs_agate_dir/a-locret.lrn", o, n);
    write_file("/tmp/kvs_agate_dir/b-gate.lrn", b, n);
    char path[1024];
    CHECK(kv_learned_find("/tmp/kvs_agate_dir", 2, fp, 2, 4, 2, 8, path, sizeof path) == KVS_OK);
    CHECKF(strstr(path, "b-gate.lrn"), "found %s", path);
    CHECK(kv_learned_find("/tmp/kvs_agate_dir", 1, fp, 2, 4, 2, 8, path, sizeof path) == KVS_OK);
    CHECKF(strstr(path, "a-locret.lrn"), "found %s", path);
    free(o);
    free(b);
}

static kvs_context *ctx(const char *spec, int batch) {
    struct kvs_context_params p = kvs_context_params_default();
    p.n_ctx = 1024;
    p.n_batch = batch;
    p.kv_spec = spec;
    p.n_seq_max = 4;
    kvs_context *c = NULL;
    CHECKF(kvs_context_new(M, &p, &c) == KVS_OK, "%s: %s", spec, kvs_last_error());
    return c;
}

/* logits of every prompt position + n_dec decode rows, prompt fed `batch` tokens a call */
static float *run(const char *spec, int batch, const int32_t *toks, int n, int n_dec, kvs_context **kc, kvs_sequence **ks) {
    kvs_context *c = ctx(spec, batch);
    if (!c) return NULL;
    kvs_sequence *s;
    kvs_seq_new(c, &s);
    float *l = malloc(sizeof(float) * (size_t)(n + n_dec) * MI.n_vocab);
    for (int i = 0; i < n; i += batch) {
        int m = n - i < batch ? n - i : batch;
        CHECKF(kvs_eval(c, s, toks + i, m, true, l + (size_t)i * MI.n_vocab, NULL, NULL) == KVS_OK, "%s: %s", spec, kvs_last_error());
    }
    for (int i = 0; i < n_dec; i++)
        CHECK(kvs_eval(c, s, &toks[i], 1, false, l + (size_t)(n + i) * MI.n_vocab, NULL, NULL) == KVS_OK);
    if (kc) *kc = c, *ks = s;
    else kvs_context_free(c);
    return l;
}

static double mean_nll(const float *lg, const int32_t *ids, int n) {
    double s = 0;
    size_t V = (size_t)MI.n_vocab;
    for (int i = 0; i + 1 < n; i++) {
        const float *r = lg + (size_t)i * V;
        double m = r[0], z = 0;
        for (size_t v = 1; v < V; v++) m = fmax(m, r[v]);
        for (size_t v = 0; v < V; v++) z += exp(r[v] - m);
        s += m + log(z) - r[ids[i + 1]];
    }
    return s / (n - 1);
}

static void test_model(const char *lrn, const char *refpath) {
    FILE *f = fopen(refpath, "rb");
    if (!f) { tu_skip("agate on the model", "%s not found", refpath); return; }
    int32_t hdr[3];
    CHECK(fread(hdr, 4, 3, f) == 3);
    int nt = hdr[0], L = hdr[1], KV = hdr[2];
    CHECK(L == MI.n_layer && KV == MI.n_head_kv && nt > 64 && nt <= 1024);
    int32_t *ids = malloc(sizeof(int32_t) * nt);
    float *ref = malloc(sizeof(float) * (size_t)nt * L * KV), tail[3];
    CHECK(fread(ids, 4, (size_t)nt, f) == (size_t)nt && fread(ref, 4, (size_t)nt * L * KV, f) == (size_t)nt * L * KV);
    CHECK(fread(tail, 4, 3, f) == 3);
    fclose(f);
    /* under the sanitizers memory safety is the point: the first 160 tokens (the window is passed,
     * so entries are hidden and evicted), without the 512-token perplexity and keep-rate figures */
    bool quick = getenv("KVS_SANITIZE") != NULL;
    int nt_ref = nt;
    if (quick && nt > 160) nt = 160;
    size_t V = (size_t)MI.n_vocab;
    char spec[512];
    enum { ND = 4 };

    /* tau=0: every entry kept, bit-identical to full; the scores against PyTorch's */
    float *full = run("full", 64, ids, nt, ND, NULL, NULL);
    snprintf(spec, sizeof spec, "agate:tau=0,file=%s", lrn);
    kvs_context *c0;
    kvs_sequence *s0;
    float *all = run(spec, 64, ids, nt, ND, &c0, &s0);
    CHECKF(full && all && !memcmp(full, all, sizeof(float) * (nt + ND) * V), "agate:tau=0 is not bit-identical to full");
    double maxd = 0, sumd = 0;
    long agree = 0, cnt = 0;
    for (int il = 0; il < L; il++)
        for (int ih = 0; ih < KV; ih++) {
            const struct kv_head_store *h = kv_seq_head(s0->kv, il, ih);
            CHECK(h->n == nt + ND);
            for (int j = 1; j < nt; j++) {
                float r = ref[((size_t)j * L + il) * KV + ih]; /* (rows of nt_ref tokens) */
                maxd = fmax(maxd, fabs(h->acc[j] - r));
                sumd += fabs(h->acc[j] - r);
                agree += (h->acc[j] >= 0.5f) == (r >= 0.5f), cnt++;
            }
        }
    fprintf(stderr, "agate %s: scores C vs PyTorch over %d tokens: mean |diff| %.4f, max %.4f, flags agree %.4f\n",
            lrn, nt, sumd / cnt, maxd, (double)agree / cnt);
    /* budget: C runs 8-bit activations on the quantized weights and an fp16 gate cache, PyTorch
     * float32 on dequantized weights, and the sigmoid is steep; measured 2026-12-06 (mean, max,
     * flags agreeing: SmolLM2 0.0043, 0.42, 0.992; Qwen2.5 0.0064, 0.66, 0.987), bounds with room */
    CHECKF(sumd / cnt <= 0.03, "mean |C - PyTorch| score %.4f", sumd / cnt);
    CHECKF(maxd <= 0.8, "max |C - PyTorch| score %.4f", maxd);
    CHECKF((double)agree / cnt >= 0.97, "flags agree on %.4f only", (double)agree / cnt);
    CHECK(kv_seq_gate_bytes(s0->kv) > 0 && s0->kv->gate_n[0] == nt + ND);

    /* tau=0.5: the gated perplexity and keep rate against PyTorch's gated forward */
    snprintf(spec, sizeof spec, "agate:file=%s", lrn);
    kvs_context *c1;
    kvs_sequence *s1;
    float *g64 = run(spec, 64, ids, nt, 0, &c1, &s1);
    double nll_c = mean_nll(g64, ids, nt), nll_full_c = mean_nll(full, ids, nt);
    long held = 0, outside = 0, bad = 0;
    for (int il = 0; il < L; il++)
        for (int ih = 0; ih < KV; ih++) {
            const struct kv_head_store *h = kv_seq_head(s1->kv, il, ih);
            int32_t newest = h->pos[h->n - 1];
            held += h->n;
            for (int j = 0; j < h->n; j++) {
                bool near = newest + 1 - h->pos[j] < s1->kv->gate_win;
                outside += !near && h->pos[j] > 0;
                bad += !near && h->pos[j] > 0 && h->acc[j] < 0.5f;
            }
        }
    double keep = (double)outside / ((double)L * KV * (nt - 1 - s1->kv->gate_win));
    fprintf(stderr, "agate %s: gated NLL C %.4f vs PyTorch %.4f (full: C %.4f, PyTorch %.4f); keep rate "
            "C %.3f vs PyTorch %.3f; %ld entries held of %ld\n", lrn, nll_c, tail[0], nll_full_c, tail[1],
            keep, tail[2], held, (long)L * KV * nt);
    CHECKF(bad == 0, "%ld held entries score below tau outside the window", bad);
    if (!quick) {
        /* budget: the gated-minus-full gap of C within 0.03 nats of PyTorch's (measured
         * 2026-12-06: SmolLM2 0.008, Qwen2.5 0.007) */
        CHECKF(fabs((nll_c - nll_full_c) - (tail[0] - tail[1])) <= 0.03, "gated NLL gap C %.4f vs PyTorch %.4f",
               nll_c - nll_full_c, tail[0] - tail[1]);
        CHECKF(fabs(keep - tail[2]) <= 0.03, "keep rate C %.3f vs PyTorch %.3f", keep, tail[2]);
    }
    (void)nt_ref;
    CHECK(held < (long)L * KV * nt * 0.8);
    CHECK(c1->kv.bytes == kv_seq_bytes(s1->kv));

    /* chunking: 7 and 1 tokens a call give the same logits and entries as 64 */
    int chunks[] = {7, 1};
    /* one token a call is slow under the sanitizers and on Qwen2.5: chunks of 7 there */
    int n_chunks = getenv("KVS_SANITIZE") || !strcmp(MI.arch, "qwen2") ? 1 : 2;
    for (int k = 0; k < n_chunks; k++) {
        kvs_context *c2;
        kvs_sequence *s2;
        float *g = run(spec, chunks[k], ids, nt, 0, &c2, &s2);
        int first = nt;
        for (int i = 0; g && i < nt && first == nt; i++)
            if (memcmp(g + (size_t)i * V, g64 + (size_t)i * V, sizeof(float) * V)) first = i;
        long same = 0, tot = 0;
        for (int i = 0; i < L * KV; i++) {
            const struct kv_head_store *a = &s1->kv->h[i], *b = &s2->kv->h[i];
            for (int x = 0, y = 0; x < a->n && y < b->n;) /* entries held by both */
                if (a->pos[x] == b->pos[y]) same++, x++, y++;
                else if (a->pos[x] < b->pos[y]) x++;
                else y++;
            tot += a->n > b->n ? a->n : b->n;
        }
        double nll = g ? mean_nll(g, ids, nt) : 1e9;
        fprintf(stderr, "agate: chunks of %d vs 64: first differing row %d, NLL %.4f vs %.4f, %.4f of the "
                "entries held by both\n", chunks[k], first, nll, nll_c, (double)same / tot);
        /* Hidden entries (-inf scores) and evicted ones (absent) round the softmax's sums
         * differently, and a flag near tau then flips: bit-identical only until the first key
         * is hidden (tau=0 above is bit-identical in any chunking); after that the same model
         * within a small NLL budget (measured 2026-12-06: |diff| <= 0.011, 0.99 same entries) */
        CHECKF(first >= s1->kv->gate_win, "agate: chunks of %d differ at row %d, before any key is hidden", chunks[k], first);
        CHECKF(fabs(nll - nll_c) <= 0.02, "agate: chunks of %d: NLL %.4f vs %.4f", chunks[k], nll, nll_c);
        CHECKF((double)same / tot >= 0.97, "agate: chunks of %d hold other entries (%.4f in common)", chunks[k], (double)same / tot);
        free(g);
        kvs_context_free(c2);
    }

    /* a copy decodes like its source; files, foreign copies and compressions are refused */
    kvs_sequence *s3;
    CHECK(kvs_seq_new(c1, &s3) == KVS_OK);
    CHECKF(kvs_seq_copy(c1, s3, c1, s1) == KVS_OK, "copy: %s", kvs_last_error());
    float *d1 = malloc(sizeof(float) * V * ND), *d3 = malloc(sizeof(float) * V * ND);
    for (int i = 0; i < ND; i++) {
        CHECK(kvs_eval(c1, s1, &ids[i], 1, false, d1 + i * V, NULL, NULL) == KVS_OK);
        CHECK(kvs_eval(c1, s3, &ids[i], 1, false, d3 + i * V, NULL, NULL) == KVS_OK);
    }
    CHECKF(!memcmp(d1, d3, sizeof(float) * V * ND), "agate: a copy decodes differently");
    CHECK(kvs_seq_save(c1, s1, "/tmp/kvs_test_agate.kvc") == KVS_ERR_UNSUPPORTED);
    kvs_context *cf = ctx("full", 64);
    kvs_sequence *sf, *s4;
    kvs_seq_new(cf, &sf);
    CHECK(kvs_eval(cf, sf, ids, 32, false, NULL, NULL, NULL) == KVS_OK);
    CHECK(kvs_seq_new(c1, &s4) == KVS_OK);
    CHECK(kvs_seq_copy(c1, s4, cf, sf) == KVS_ERR_INVALID_ARG);
    CHECK(kvs_seq_compress(cf, sf, spec) == KVS_ERR_INVALID_ARG);
    CHECK(kvs_seq_compress(c1, s1, "snapkv:ratio=0.5") == KVS_ERR_INVALID_ARG);
    kvs_context_free(cf);

    /* a budget caps every layer (pooled over its heads), and takes the best scores of any head
     * beyond each head's newest window */
    snprintf(spec, sizeof spec, "agate:budget=40,file=%s", lrn);
    kvs_context *c5;
    kvs_sequence *s5;
    free(run(spec, 64, ids, nt, 0, &c5, &s5));
    int worst = 0;
    bool uneven = false;
    for (int il = 0; il < L; il++) {
        int sum = 0;
        for (int ih = 0; ih < KV; ih++) sum += kv_seq_head(s5->kv, il, ih)->n, uneven = uneven || kv_seq_head(s5->kv, il, ih)->n != 40;
        worst = sum > worst ? sum : worst;
    }
    CHECKF(worst <= 40 * KV, "agate:budget=40 holds %d in a layer of %d heads", worst, KV);
    CHECK(uneven);
    CHECK(s5->kv->gate_win == 32);
    kvs_sequence *s6;
    CHECK(kvs_seq_new(c5, &s6) == KVS_OK);
    snprintf(spec, sizeof spec, "agate:window=100,file=%s", lrn);
    CHECKF(kvs_seq_set_kv(c5, s6, spec) == KVS_OK, "window=: %s", kvs_last_error());
    CHECK(s6->kv->gate_win == 100 && s6->kv->gate_w > 0);
    kvs_context_free(c5);

    free(d1), free(d3), free(g64), free(all), free(full), free(ids), free(ref);
    kvs_context_free(c0);
    kvs_context_free(c1);
}

int main(void) {
    quant_init();
    ops_init();
    test_files_and_kernel();
    const char *path = tu_model_path();
    if (!path) {
        fprintf(stderr, "SKIP test_agate on the model (run `make models`)\n");
        return tu_failures ? 1 : 77;
    }
    if (kvs_model_load(path, NULL, &M) != KVS_OK) {
        fprintf(stderr, "cannot load %s: %s\n", path, kvs_last_error());
        return 1;
    }
    kvs_model_get_info(M, &MI);
    const char *name = !strcmp(MI.arch, "qwen2") ? "qwen2.5-1.5b" : "smollm2-135m";
    char lrn[256], refp[256];
    snprintf(lrn, sizeof lrn, "weights/agate-%s.lrn", name);
    snprintf(refp, sizeof refp, "tests/golden/agate-%s.ref.bin", name);
    test_model(lrn, refp);
    kvs_model_free(M);
    return tu_finish("test_agate");
}
