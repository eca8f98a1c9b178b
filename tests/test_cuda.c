/* test_cuda.c — the CUDA backend against the CPU path (`make test-cuda` on a GPU machine).
 *
 * Without CUDA compiled in (the default build) it checks that --device cuda fails with a clear
 * message and skips the rest. With CUDA but no usable GPU it skips (fails under
 * KVS_REQUIRE_GPU=1, which make test-cuda sets). On a GPU:
 *  1. matmul, every weight type, GEMV (1..8 tokens) and tiled (more) paths: each output within
 *     the rigorous fp32 summation bound (n + 2) * 2^-24 * sum |w x| of a double-precision
 *     product of the CPU reference dequantization;
 *  2. the whole model (SmolLM2 by default, KVS_TEST_MODEL): a 700-token prompt in chunks of 256,
 *     every position's logits against a CPU context with fp32 activations (act_f32, as the GPU
 *     keeps them): mean and max KL, top-1 agreement;
 *  3. greedy decoding of 48 tokens on both: identical, or the first divergence at a near tie of
 *     the CPU's two best logits;
 *  4. metamorphic: budget-free identities on the device itself — chunked prefill against token by
 *     token (within a KL budget: the GEMV and tiled sums differ in order), a batch of decode
 *     tokens of several sequences bit-identical to each alone, reset then recompute bit-identical;
 *  5. device memory: the context's KV bytes equal 2 * layers * KV heads * capacity * hd * 2.
 */
#include "testutil.h"
#include "../src/cuda/cuda.h"
#include "../src/engine.h"
#include "../src/quant.h"
#include "../include/kvsieve.h"

#include <stdint.h>

static kvs_model *model;
static int n_vocab;

static const char *tu_model_path_or_default(void) {
    const char *p = getenv("KVS_TEST_MODEL");
    return p && *p ? p : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

static float frand(void) { return (float)((double)(tu_rand_u64() >> 11) / 9007199254740992.0 * 2.0 - 1.0); }

static void test_matmul(void) {
    const int types[] = {QT_F32, QT_F16, QT_BF16, QT_Q4_0, QT_Q4_1, QT_Q5_0, QT_Q5_1, QT_Q8_0, QT_Q4_K, QT_Q6_K};
    /* T tokens, the first n_lone through the GEMV (8 a launch), the rest through the tiles */
    const int Ts[] = {1, 3, 8, 9, 70, 1, 3, 8, 9, 70}, lone[] = {1, 3, 8, 9, 20, 0, 0, 0, 0, 70};
    const int rows = 203, cols = 512;
    float *wf = malloc(sizeof(float) * rows * cols), *wd = malloc(sizeof(float) * rows * cols);
    float *x = malloc(sizeof(float) * 70 * cols), *y = malloc(sizeof(float) * 70 * rows);
    for (int i = 0; i < 70 * cols; i++) x[i] = frand();
    for (size_t ti = 0; ti < sizeof types / sizeof *types; ti++) {
        int type = types[ti];
        size_t rb = quant_row_bytes(type, cols);
        uint8_t *W = malloc(rb * rows);
        for (int i = 0; i < rows * cols; i++) wf[i] = frand() * (1.0f + (float)(i % 7));
        for (int r = 0; r < rows; r++) {
            quant_quantize_row_ref(type, wf + (size_t)r * cols, W + r * rb, cols);
            quant_dequantize_row_ref(type, W + r * rb, wd + (size_t)r * cols, cols);
        }
        for (size_t k = 0; k < sizeof Ts / sizeof *Ts; k++) {
            int T = Ts[k];
            enum kvs_status st = cuda_test_matmul(type, W, rb, rows, cols, x, T, lone[k], y);
            CHECKF(st == KVS_OK, "%s", kvs_last_error());
            int bad = 0;
            double worst = 0;
            for (int t = 0; t < T; t++)
                for (int r = 0; r < rows; r++) {
                    double s = 0, a = 0;
                    for (int c = 0; c < cols; c++) {
                        double p = (double)wd[(size_t)r * cols + c] * x[(size_t)t * cols + c];
                        s += p, a += fabs(p);
                    }
                    double err = fabs(y[(size_t)t * rows + r] - s), bound = (cols + 2) * 0x1p-24 * a;
                    if (err / bound > worst) worst = err / bound;
                    if (!(err <= bound)) bad++;
                }
            CHECKF(bad == 0, "%s T=%d (%d by GEMV): %d outputs beyond the fp32 bound (worst %.2f of it)",
                   quant_get_traits(type)->name, T, lone[k], bad, worst);
            printf("matmul %-5s T=%-3d (%2d by GEMV) worst error %.3f of the bound\n", quant_get_traits(type)->name,
                   T, lone[k], worst);
        }
        free(W);
    }
    free(wf), free(wd), free(x), free(y);
}

/* the kernels' dequantisation of 8 elements, run on the host (no GPU needed, so CI runs it too):
 * every type, every unit and quarter of random rows put in the upload's planes layout, against
 * quant.c's reference dequantiser, with no load misaligned */
static void test_deq8_host(void) {
    const int types[] = {QT_F32, QT_F16, QT_BF16, QT_Q4_0, QT_Q4_1, QT_Q5_0, QT_Q5_1, QT_Q8_0, QT_Q4_K, QT_Q6_K};
    const int rows = 3, cols = 768; /* an odd number of 256-element superblocks */
    float *wf = malloc(sizeof(float) * rows * cols), *wd = malloc(sizeof(float) * rows * cols);
    for (size_t ti = 0; ti < sizeof types / sizeof *types; ti++) {
        int type = types[ti], bad = 0, errs = 0;
        size_t rb = quant_row_bytes(type, cols);
        uint8_t *W = malloc(rb * rows);
        for (int i = 0; i < rows * cols; i++) wf[i] = frand() * (1.0f + (float)(i % 7)) + (i % 5 == 0 ? 0.7f : 0.0f);
        double worst = 0;
        for (int r = 0; r < rows; r++) {
            quant_quantize_row_ref(type, wf + (size_t)r * cols, W + r * rb, cols);
            quant_dequantize_row_ref(type, W + r * rb, wd + (size_t)r * cols, cols);
            for (int u = 0; u < cols / 32; u++)
                for (int p = 0; p < 4; p++) {
                    float o[8];
                    if (cuda_host_deq8(type, W + r * rb, rb, cols, u, p, o) != KVS_OK) {
                        if (!errs++) fprintf(stderr, "deq8 %s: %s\n", quant_get_traits(type)->name, kvs_last_error());
                        continue;
                    }
                    for (int i = 0; i < 8; i++) {
                        double want = wd[(size_t)r * cols + u * 32 + p * 8 + i];
                        double e = fabs(o[i] - want) / (fabs(want) + 1e-30);
                        if (e > worst) worst = e;
                        if (!(fabs(o[i] - want) <= 4e-7 * fabs(want))) bad++;
                    }
                }
        }
        CHECKF(bad == 0 && errs == 0, "deq8 %s: %d elements differ from the reference (worst relative %.2e), "
               "%d calls failed", quant_get_traits(type)->name, bad, worst, errs);
        free(W);
    }
    printf("GEMV dequantisation on the host: %zu types, every unit and quarter equal to the reference\n",
           sizeof types / sizeof *types);
    free(wf), free(wd);
}

static kvs_context *ctx_kv(int device, int n_seq, const char *kv) {
    struct kvs_context_params p = kvs_context_params_default();
    p.kv_spec = kv;
    p.n_ctx = 2048;
    p.n_batch = 256;
    p.n_seq_max = n_seq;
    p.device = device;
    /* the CPU oracle keeps activations in fp32, as the GPU does (its default quantizes them to
     * 8 bits: on Qwen2.5's first position, whose activations are huge, that alone moves the
     * logits by a KL of 5.5 while the fp32 paths agree to 1e-6) */
    p.act_f32 = device == KVS_DEVICE_CPU;
    kvs_context *c = NULL;
    if (kvs_context_new(model, &p, &c) != KVS_OK) {
        fprintf(stderr, "context: %s\n", kvs_last_error());
        exit(1);
    }
    return c;
}
static kvs_context *ctx(int device, int n_seq) { return ctx_kv(device, n_seq, NULL); }

/* KL(p || q) of the softmaxes of two logit rows */
static double kl_rows(const float *a, const float *b, int n) {
    double ma = -1e30, mb = -1e30, za = 0, zb = 0, kl = 0;
    for (int i = 0; i < n; i++) ma = fmax(ma, a[i]), mb = fmax(mb, b[i]);
    for (int i = 0; i < n; i++) za += exp(a[i] - ma), zb += exp(b[i] - mb);
    for (int i = 0; i < n; i++) {
        double pa = exp(a[i] - ma) / za;
        if (pa > 0) kl += pa * ((a[i] - ma - log(za)) - (b[i] - mb - log(zb)));
    }
    return kl;
}

static int argmax(const float *a, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (a[i] > a[b]) b = i;
    return b;
}

/* the test prompt: a 700-token text of repeated facts */
static int prompt_tokens(int32_t *tok, int cap) {
    char text[20000] = "";
    const char *para = "The history of the lighthouse keeper's family began in 1852, when Thomas Avery "
                       "took the post on the northern rock. He kept a log of every ship, every storm and "
                       "every visitor; his daughter Margaret later added the weather at noon and the "
                       "price of coal. ";
    for (int i = 0; i < 12; i++) {
        strcat(text, para);
        char num[64];
        snprintf(num, sizeof num, "In year %d the log counted %d ships. ", 1852 + 7 * i, 31 * i + 5);
        strcat(text, num);
    }
    int n = kvs_tokenize(model, text, strlen(text), true, false, tok, cap);
    CHECK(n > 600);
    return n > 700 ? 700 : n;
}

static void test_model(void) {
    int32_t tok[4096];
    int n = prompt_tokens(tok, 4096);
    kvs_context *cc = ctx(KVS_DEVICE_CPU, 1), *gc = ctx(KVS_DEVICE_CUDA, 5);
    kvs_sequence *cs, *gs;
    CHECK(kvs_seq_new(cc, &cs) == KVS_OK && kvs_seq_new(gc, &gs) == KVS_OK);
    float *lc = malloc(sizeof(float) * (size_t)n * n_vocab), *lg = malloc(sizeof(float) * (size_t)n * n_vocab);
    CHECK(kvs_eval(cc, cs, tok, n, true, lc, NULL, NULL) == KVS_OK);
    enum kvs_status st = kvs_eval(gc, gs, tok, n, true, lg, NULL, NULL);
    CHECKF(st == KVS_OK, "%s", kvs_last_error());
    double kl_sum = 0, kl_max = 0;
    int agree = 0;
    for (int t = 0; t < n; t++) {
        double kl = kl_rows(lc + (size_t)t * n_vocab, lg + (size_t)t * n_vocab, n_vocab);
        kl_sum += kl, kl_max = fmax(kl_max, kl);
        if (kl > 0.05) printf("  position %d (token %d): KL %.3g\n", t, tok[t], kl);
        agree += argmax(lc + (size_t)t * n_vocab, n_vocab) == argmax(lg + (size_t)t * n_vocab, n_vocab);
    }
    printf("prompt of %d tokens (chunks of 256): KL(cpu fp32||gpu) mean %.2e max %.2e, top-1 agreement %d/%d\n",
           n, kl_sum / n, kl_max, agree, n);
    /* measured on an H100: SmolLM2 mean 6.2e-8 max 2.3e-6, Qwen2.5 1.3e-8 / 1.3e-6 (700/700
     * top-1 each); the budgets leave 16x and 40x (the sums differ only in order) */
    CHECKF(kl_sum / n < 1e-6 && kl_max < 1e-4, "mean %g max %g", kl_sum / n, kl_max);
    CHECK(agree >= n * 99 / 100);

    /* greedy decoding on both */
    enum { ND = 48 };
    int32_t tc[ND], tg[ND];
    float *rc = malloc(sizeof(float) * n_vocab), *rg = malloc(sizeof(float) * n_vocab);
    memcpy(rc, lc + (size_t)(n - 1) * n_vocab, sizeof(float) * n_vocab);
    memcpy(rg, lg + (size_t)(n - 1) * n_vocab, sizeof(float) * n_vocab);
    int first_div = -1;
    double margin = 0;
    for (int i = 0; i < ND; i++) {
        tc[i] = argmax(rc, n_vocab), tg[i] = argmax(rg, n_vocab);
        if (tc[i] != tg[i] && first_div < 0) {
            first_div = i;
            float b1 = rc[tc[i]], b2 = rc[tg[i]];
            margin = b1 - b2;
        }
        CHECK(kvs_eval(cc, cs, &tc[i], 1, false, rc, NULL, NULL) == KVS_OK);
        CHECK(kvs_eval(gc, gs, &tg[i], 1, false, rg, NULL, NULL) == KVS_OK);
    }
    if (first_div < 0) printf("greedy: %d tokens identical on CPU and GPU\n", ND);
    else printf("greedy: first divergence at token %d, CPU's logit margin there %.4f\n", first_div, margin);
    CHECKF(first_div < 0 || margin < 0.05, "divergence at %d with margin %.4f (not a near tie)", first_div, margin);

    /* a decode step replayed as a CUDA graph equals the same step launched kernel by kernel
     * (the graph's attention grid is wider; the splits it adds do nothing) */
    {
        kvs_sequence *cp;
        CHECK(kvs_seq_new(gc, &cp) == KVS_OK);
        CHECK(kvs_seq_copy(gc, cp, gc, gs) == KVS_OK && kvs_seq_n_past(cp) == kvs_seq_n_past(gs));
        int32_t nx = tg[ND - 1];
        cuda_use_graphs(gc->gpu, true);
        CHECK(kvs_eval(gc, gs, &nx, 1, false, rg, NULL, NULL) == KVS_OK);
        cuda_use_graphs(gc->gpu, false);
        CHECK(kvs_eval(gc, cp, &nx, 1, false, rc, NULL, NULL) == KVS_OK);
        cuda_use_graphs(gc->gpu, true);
        CHECKF(memcmp(rg, rc, sizeof(float) * n_vocab) == 0, "graph and eager decode differ (max %g)",
               tu_max_abs_diff(rg, rc, n_vocab));
        printf("decode step as a CUDA graph: bit-identical to eager launches (after a device copy of the cache)\n");
        kvs_seq_free(gc, cp);
    }

    /* chunked prefill against token by token, on the device */
    kvs_sequence *g2;
    CHECK(kvs_seq_new(gc, &g2) == KVS_OK);
    int n1 = 300;
    double kl_tt = 0;
    for (int t = 0; t < n1; t++) {
        CHECK(kvs_eval(gc, g2, &tok[t], 1, false, rg, NULL, NULL) == KVS_OK);
        kl_tt = fmax(kl_tt, kl_rows(lg + (size_t)t * n_vocab, rg, n_vocab));
    }
    printf("token by token vs chunked prefill (%d positions): max KL %.2e\n", n1, kl_tt);
    CHECK(kl_tt < 1e-3);

    /* a batch of decode tokens of several sequences is bit-identical to each alone */
    kvs_sequence *b[3] = {g2, NULL, NULL};
    CHECK(kvs_seq_new(gc, &b[1]) == KVS_OK && kvs_seq_new(gc, &b[2]) == KVS_OK);
    CHECK(kvs_eval(gc, b[1], tok, 100, false, NULL, NULL, NULL) == KVS_OK);
    CHECK(kvs_eval(gc, b[2], tok + 50, 200, false, NULL, NULL, NULL) == KVS_OK);
    int32_t nt[3] = {tok[n1], tok[100], tok[250]};
    float *lb = malloc(sizeof(float) * 3 * n_vocab), *la = malloc(sizeof(float) * n_vocab);
    CHECK(kvs_eval_batch(gc, b, nt, 3, lb) == KVS_OK);
    for (int i = 0; i < 3; i++) {
        /* the same step alone: reset and recompute the sequence on the device */
        kvs_seq_reset(gc, b[i]);
        int start = i == 0 ? 0 : i == 1 ? 0 : 50, len = i == 0 ? n1 : i == 1 ? 100 : 200;
        if (i == 0)
            for (int t = 0; t < n1; t++) CHECK(kvs_eval(gc, b[i], &tok[t], 1, false, NULL, NULL, NULL) == KVS_OK);
        else CHECK(kvs_eval(gc, b[i], tok + start, len, false, NULL, NULL, NULL) == KVS_OK);
        CHECK(kvs_eval(gc, b[i], &nt[i], 1, false, la, NULL, NULL) == KVS_OK);
        CHECKF(memcmp(la, lb + (size_t)i * n_vocab, sizeof(float) * n_vocab) == 0,
               "sequence %d: batched decode differs from alone (max diff %g)", i,
               tu_max_abs_diff(la, lb + (size_t)i * n_vocab, n_vocab));
    }
    printf("batch of 3 decode tokens: bit-identical to each alone after a reset and recompute\n");

    /* device memory accounting */
    struct kvs_mem_stats ms;
    kvs_context_mem(gc, &ms);
    struct kvs_model_info mi;
    kvs_model_get_info(model, &mi);
    uint64_t sum = 0;
    kvs_sequence *all[4] = {gs, b[0], b[1], b[2]};
    for (int i = 0; i < 4; i++) sum += kvs_seq_kv_bytes(all[i]);
    CHECK(ms.kv_bytes == sum && ms.kv_bytes_peak >= sum);
    printf("device KV bytes %llu (peak %llu) = the sum over sequences\n", (unsigned long long)ms.kv_bytes,
           (unsigned long long)ms.kv_bytes_peak);

    /* the device's own count: a new sequence of 1024 tokens takes what the accounting says,
     * up to the allocator's 2 MiB pages (one K and one V allocation) */
    {
        kvs_sequence *ns;
        CHECK(kvs_seq_new(gc, &ns) == KVS_OK);
        uint64_t free0 = cuda_device_free_bytes();
        int32_t many[1024];
        for (int i = 0; i < 1024; i++) many[i] = tok[i % n];
        CHECK(kvs_eval(gc, ns, many, 1024, false, NULL, NULL, NULL) == KVS_OK);
        uint64_t used = free0 - cuda_device_free_bytes(), acc = kvs_seq_kv_bytes(ns);
        printf("a 1024-token sequence: %llu device bytes accounted, cudaMemGetInfo saw %llu\n",
               (unsigned long long)acc, (unsigned long long)used);
        CHECKF(acc > 0 && used >= acc && used <= acc + (4u << 20), "accounted %llu, used %llu",
               (unsigned long long)acc, (unsigned long long)used);
        kvs_seq_free(gc, ns);
    }

    /* a mixed pass (kvs_step, as the server runs it): 11 decode tokens of 11 sequences (two GEMV
     * launches) with a 40-token prompt chunk of a 12th placed among them; every item's logits
     * bit-identical to the same item alone (kvsieve.h promises it: the matmul and the attention
     * split follow from whether a token is its sequence's only one in the pass, nothing else) */
    {
        enum { NS = 12 };
        kvs_context *mc = ctx(KVS_DEVICE_CUDA, NS);
        kvs_sequence *sq[NS];
        int32_t dt[NS];
        float *lm = malloc(sizeof(float) * NS * n_vocab);
        struct kvs_batch_item it[NS];
        for (int i = 0; i < NS; i++) CHECK(kvs_seq_new(mc, &sq[i]) == KVS_OK);
        for (int i = 0; i < NS - 1; i++) {
            CHECK(kvs_eval(mc, sq[i], tok + 7 * i, 20 + 9 * i, false, NULL, NULL, NULL) == KVS_OK);
            dt[i] = tok[300 + i];
        }
        for (int i = 0, k = 0; i < NS; i++) {
            int s_ = i < 5 ? i : i == 5 ? NS - 1 : i - 1; /* decode 0..4, the prompt, decode 5..10 */
            it[k++] = s_ == NS - 1 ? (struct kvs_batch_item){.seq = sq[s_], .tokens = tok + 400, .n = 40,
                                                            .prompt_end = true, .logits = lm + (size_t)s_ * n_vocab}
                                  : (struct kvs_batch_item){.seq = sq[s_], .tokens = &dt[s_], .n = 1,
                                                            .decode = true, .logits = lm + (size_t)s_ * n_vocab};
        }
        CHECK(kvs_step(mc, it, NS) == KVS_OK);
        int same = 0;
        for (int i = 0; i < NS; i++) {
            kvs_seq_reset(mc, sq[i]);
            if (i < NS - 1) {
                CHECK(kvs_eval(mc, sq[i], tok + 7 * i, 20 + 9 * i, false, NULL, NULL, NULL) == KVS_OK);
                CHECK(kvs_eval(mc, sq[i], &dt[i], 1, false, la, NULL, NULL) == KVS_OK);
            } else CHECK(kvs_eval(mc, sq[i], tok + 400, 40, false, la, NULL, NULL) == KVS_OK);
            bool eq = memcmp(la, lm + (size_t)i * n_vocab, sizeof(float) * n_vocab) == 0;
            CHECKF(eq, "mixed pass, item %d (%s): differs from alone (max diff %g)", i,
                   i < NS - 1 ? "decode" : "prompt", tu_max_abs_diff(la, lm + (size_t)i * n_vocab, n_vocab));
            same += eq;
        }
        printf("mixed pass of 11 decode tokens and a 40-token prompt chunk: %d of %d items bit-identical "
               "to alone\n", same, NS);
        free(lm);
        kvs_context_free(mc);
    }

    /* batched decode of 16 sequences (one GEMV launch of 16 tokens, replayed as a CUDA graph) and
     * of 47 (launches of 32, 8 and 7 tokens, no graph): the staged GEMVs of 8, 16 and 32 tokens
     * give each sequence the same bits as decoding it alone (one-token GEMV) */
    for (int round = 0; round < 2; round++) {
        int NB = round ? 47 : 16, same = 0;
        kvs_context *bc = ctx(KVS_DEVICE_CUDA, NB);
        kvs_sequence **bs = malloc(sizeof *bs * NB);
        int32_t *bt = malloc(sizeof(int32_t) * NB);
        float *bl = malloc(sizeof(float) * (size_t)NB * n_vocab);
        for (int i = 0; i < NB; i++) {
            CHECK(kvs_seq_new(bc, &bs[i]) == KVS_OK);
            CHECK(kvs_eval(bc, bs[i], tok + 3 * i, 10 + 5 * i, false, NULL, NULL, NULL) == KVS_OK);
            bt[i] = tok[350 + i];
        }
        CHECK(kvs_eval_batch(bc, bs, bt, NB, bl) == KVS_OK);
        for (int i = 0; i < NB; i++) {
            kvs_seq_reset(bc, bs[i]);
            CHECK(kvs_eval(bc, bs[i], tok + 3 * i, 10 + 5 * i, false, NULL, NULL, NULL) == KVS_OK);
            CHECK(kvs_eval(bc, bs[i], &bt[i], 1, false, la, NULL, NULL) == KVS_OK);
            bool eq = memcmp(la, bl + (size_t)i * n_vocab, sizeof(float) * n_vocab) == 0;
            CHECKF(eq, "batch of %d, sequence %d: differs from alone (max diff %g)", NB, i,
                   tu_max_abs_diff(la, bl + (size_t)i * n_vocab, n_vocab));
            same += eq;
        }
        printf("decode batch of %d sequences: %d of %d bit-identical to each alone\n", NB, same, NB);
        free(bs), free(bt), free(bl);
        kvs_context_free(bc);
    }

    /* what the GPU does not run yet fails clearly */
    CHECK(kvs_seq_compress(gc, gs, "h2o:budget=64") == KVS_ERR_UNSUPPORTED);
    CHECK(strstr(kvs_last_error(), "--device cuda") != NULL);
    free(la), free(lb), free(rc), free(rg), free(lc), free(lg);
    kvs_context_free(cc);
    kvs_context_free(gc);
}

/* On the host (CI too): planning a layer from scores computed elsewhere (kv_policy_plan_scored,
 * as the GPU path does, each policy's scores made as the GPU path makes them from the same
 * store) keeps what kv_policy_plan_layer keeps, pinned positions included. */
static void test_plan_scored(void) {
    int32_t tok[4096];
    CHECK(prompt_tokens(tok, 4096) >= 300);
    /* (a context keeping every statistic: saved queries and accumulated attention) */
    struct kvs_context_params cp = kvs_context_params_default();
    cp.n_ctx = 2048, cp.n_batch = 256, cp.keep_stats = true, cp.act_f32 = true;
    kvs_context *c = NULL;
    CHECK(kvs_context_new(model, &cp, &c) == KVS_OK);
    kvs_sequence *s;
    CHECK(kvs_seq_new(c, &s) == KVS_OK);
    s->kv->pin = 5;
    CHECK(kvs_eval(c, s, tok, 300, false, NULL, NULL, NULL) == KVS_OK);
    const struct hparams *hp = &c->m->hp;
    const char *specs[] = {"snapkv:budget=64,kernel=5", "snapkv:budget=64+alloc=pyramid", "tova:budget=64", "h2o:budget=64",
                           "streaming:budget=64", "streaming:budget=64,sinks=8,pos=abs", "random:budget=64,seed=3",
                           "knorm:budget=64"};
    for (size_t si = 0; si < sizeof specs / sizeof *specs; si++) {
        struct kv_spec spec;
        CHECK(kv_spec_parse(specs[si], &spec) == KVS_OK);
        struct kv_policy *p = NULL;
        CHECK(kv_policy_new(&spec, hp->n_layer, hp->n_head, hp->n_head_kv, hp->head_dim, c->n_ctx + c->t_max + KV_CAP_STEP,
                            kv_spec_entry_bytes(hp, &spec), &p) == KVS_OK && kv_policy_scored_elsewhere(&spec));
        enum kv_score_src src = kv_policy_score_src(&spec);
        int32_t *ka = malloc(sizeof(int32_t) * KV_VIEW_MAX_HEADS * p->cap_max), na[KV_VIEW_MAX_HEADS];
        float *tmp = malloc(sizeof(float) * p->cap_max);
        int same = 0, layers = 0;
        for (int il = 0; il < hp->n_layer; il++) {
            struct kv_plan a, b;
            CHECK(kv_policy_plan_layer(p, s->kv, il, 300, 0, false, &a));
            int32_t budget = p->planned;
            for (int ih = 0; ih < hp->n_head_kv; ih++) {
                na[ih] = a.n_keep[ih];
                memcpy(ka + (size_t)ih * p->cap_max, a.keep[ih], sizeof(int32_t) * na[ih]);
            }
            struct kv_score_args sa = {.p = p, .s = s->kv, .il = il, .n_seen = 300, .scratch = p->scratch,
                                       .ascratch = p->ascratch};
            int32_t nh[KV_VIEW_MAX_HEADS];
            const int32_t *pos[KV_VIEW_MAX_HEADS];
            for (int ih = 0; ih < hp->n_head_kv; ih++) {
                const struct kv_head_store *h = kv_seq_head(s->kv, il, ih);
                float *row = p->score + (size_t)ih * p->cap_max;
                nh[ih] = h->n, pos[ih] = h->pos;
                switch (src) {
                case KV_SRC_WINDOW: /* the window's attention (the device's k_win_score), pooled on the host */
                    kv_score_query_attention(&sa, ih, false, row);
                    kv_snapkv_pool(p, row, h->n, tmp);
                    break;
                case KV_SRC_LAST: kv_score_query_attention(&sa, ih, true, row); break;
                case KV_SRC_ACC: memcpy(row, h->acc, sizeof(float) * h->n); break; /* (cuda_seq_acc's copy) */
                case KV_SRC_POS: kv_policy_score_pos(p, il, ih, h->pos, h->n, row); break;
                case KV_SRC_KNORM: /* k_key_sq's sum: squares rounded, added in order; the root on the host */
                    for (int32_t j = 0; j < h->n; j++) {
                        float ss = 0.0f;
                        for (int d = 0; d < hp->head_dim; d++) {
                            float y = quant_f16_to_f32(h->k[(size_t)j * hp->head_dim + d]), y2 = y * y;
                            ss = ss + y2;
                        }
                        row[j] = -sqrtf(ss);
                    }
                    break;
                default: CHECK(0);
                }
            }
            CHECK(!kv_policy_over(p, il, 300, 300, 300) && kv_policy_over(p, il, 300, 0, 300));
            CHECK(kv_policy_plan_scored(p, il, 300, 0, nh, pos, s->kv->pin, &b));
            bool eq = true;
            for (int ih = 0; ih < hp->n_head_kv; ih++) {
                eq = eq && b.n_keep[ih] == na[ih] && b.n_keep[ih] == budget &&
                     !memcmp(b.keep[ih], ka + (size_t)ih * p->cap_max, sizeof(int32_t) * na[ih]);
                /* the pinned positions (where the budget has room for them beside the protected window) */
                for (int j = 0; j < 5 && budget >= 64; j++) eq = eq && b.keep[ih][j] == j;
            }
            same += eq, layers++;
        }
        CHECKF(same == layers, "%s: %d of %d layers", specs[si], same, layers);
        printf("%s planned from outside scores: %d of %d layers keep what the CPU planner keeps\n", specs[si], same,
               layers);
        free(ka), free(tmp);
        kv_policy_free(p);
    }
    kvs_context_free(c);
}

/* the entries every (layer, head) of a GPU sequence keeps, against a CPU sequence's */
static double kept_overlap(kvs_sequence *gs, kvs_sequence *cs, int *most) {
    const struct kv_cache *kc = cs->kv->owner;
    int64_t common = 0, total = 0;
    *most = 0;
    for (int il = 0; il < kc->n_layer; il++) {
        int ng = cuda_seq_layer_entries(gs->gpu, gs->slot, il);
        *most = ng > *most ? ng : *most;
        for (int ih = 0; ih < kc->n_head_kv; ih++) {
            const struct kv_head_store *h = kv_seq_head(cs->kv, il, ih);
            const int32_t *gp = cuda_seq_positions(gs->gpu, gs->slot, il, ih);
            for (int i = 0, j = 0; i < ng && j < h->n;) {
                if (gp[i] == h->pos[j]) common++, i++, j++;
                else if (gp[i] < h->pos[j]) i++;
                else j++;
            }
            total += h->n > ng ? h->n : ng;
        }
    }
    return total ? (double)common / (double)total : 1.0;
}

/* budget >= length is the full cache on the device: every logit bit-identical, prompt and
 * decoding (nd steps) */
static void identity_full(const char *spec, const int32_t *tok, int n, int nd, float *la, float *lb) {
    kvs_context *fc = ctx(KVS_DEVICE_CUDA, 1), *bc = ctx_kv(KVS_DEVICE_CUDA, 1, spec);
    kvs_sequence *fs, *bs;
    CHECK(kvs_seq_new(fc, &fs) == KVS_OK && kvs_seq_new(bc, &bs) == KVS_OK);
    CHECK(kvs_eval(fc, fs, tok, n, false, la, NULL, NULL) == KVS_OK);
    enum kvs_status st = kvs_eval(bc, bs, tok, n, false, lb, NULL, NULL);
    CHECKF(st == KVS_OK, "%s: %s", spec, kvs_last_error());
    int same = !memcmp(la, lb, sizeof(float) * n_vocab);
    for (int i = 0; i < nd; i++) {
        int32_t t = argmax(la, n_vocab);
        CHECK(kvs_eval(fc, fs, &t, 1, false, la, NULL, NULL) == KVS_OK);
        CHECK(kvs_eval(bc, bs, &t, 1, false, lb, NULL, NULL) == KVS_OK);
        same += !memcmp(la, lb, sizeof(float) * n_vocab);
    }
    CHECKF(same == nd + 1, "%s: %d of %d", spec, same, nd + 1);
    printf("%s on a %d-token prompt + %d steps: %d of %d logit rows bit-identical to full\n", spec, n, nd, same,
           nd + 1);
    kvs_context_free(fc);
    kvs_context_free(bc);
}

/* The CPU store as the oracle: the same spec (its budget `budget`) keeps the same entries, or
 * nearly (min_ov of the CPU's kept positions, then min_ov - 0.05 after 40 decode steps; 1 for
 * policies that score from positions alone, whose logits then stay within max_kl of the CPU's
 * on average: a wrong RoPE shift or a wrong gather would not), compressing after every
 * 256-token chunk and every `every` decode steps; logits close. */
static void oracle(const char *spec, int budget, double min_ov, double max_kl, const int32_t *tok, int n, float *la,
                   float *lb) {
    kvs_context *cc = ctx_kv(KVS_DEVICE_CPU, 1, spec), *gc = ctx_kv(KVS_DEVICE_CUDA, 1, spec);
    kvs_sequence *cs, *gs;
    CHECK(kvs_seq_new(cc, &cs) == KVS_OK && kvs_seq_new(gc, &gs) == KVS_OK);
    CHECK(kvs_eval(cc, cs, tok, n, false, la, NULL, NULL) == KVS_OK);
    enum kvs_status st = kvs_eval(gc, gs, tok, n, false, lb, NULL, NULL);
    CHECKF(st == KVS_OK, "%s: %s", spec, kvs_last_error());
    int most;
    double ov = kept_overlap(gs, cs, &most);
    double kl = kl_rows(la, lb, n_vocab);
    printf("%s after a %d-token prompt: GPU keeps %d entries a head (budget %d), %.4f of the CPU's kept "
           "positions; last row KL(cpu||gpu) %.2e, top-1 %s\n", spec, n, most, budget, ov, kl,
           argmax(la, n_vocab) == argmax(lb, n_vocab) ? "equal" : "differs");
    CHECKF(most == budget, "%s: %d entries", spec, most);
    CHECKF(ov >= min_ov, "%s: overlap %.4f", spec, ov);
    CHECKF(kl < 0.05, "%s: KL %g", spec, kl);
    int agree = 0, over = 0, every = gc->base.spec.every;
    double kl_sum = 0;
    for (int i = 0; i < 40; i++) {
        int32_t t = argmax(la, n_vocab);
        agree += t == argmax(lb, n_vocab);
        CHECK(kvs_eval(cc, cs, &t, 1, false, la, NULL, NULL) == KVS_OK);
        CHECK(kvs_eval(gc, gs, &t, 1, false, lb, NULL, NULL) == KVS_OK);
        kl_sum += kl_rows(la, lb, n_vocab);
        for (int il = 0; il < gc->m->hp.n_layer; il++)
            over += cuda_seq_layer_entries(gc->gpu, gs->slot, il) > budget + (every > 0 ? every : 0);
    }
    ov = kept_overlap(gs, cs, &most);
    printf("  40 decode steps (the CPU's tokens fed to both): top-1 agreement %d/40, mean KL(cpu||gpu) %.2e, no "
           "layer over budget + every (%d over), kept positions in common %.4f\n", agree, kl_sum / 40, over, ov);
    CHECKF(over == 0 && agree >= 36 && ov >= (min_ov < 1 ? min_ov - 0.05 : 1.0), "%s", spec);
    CHECKF(kl_sum / 40 < max_kl, "%s: mean KL %g", spec, kl_sum / 40);
    /* memory: the compressed sequence's device bytes, against a full one's */
    kvs_context *fc = ctx(KVS_DEVICE_CUDA, 1);
    kvs_sequence *fs;
    CHECK(kvs_seq_new(fc, &fs) == KVS_OK && kvs_eval(fc, fs, tok, n, false, NULL, NULL, NULL) == KVS_OK);
    printf("  device KV bytes: %llu under %s (query window included), %llu full\n",
           (unsigned long long)kvs_seq_kv_bytes(gs), spec, (unsigned long long)kvs_seq_kv_bytes(fs));
    CHECK(kvs_seq_kv_bytes(gs) < kvs_seq_kv_bytes(fs));
    kvs_context_free(fc);
    kvs_context_free(cc);
    kvs_context_free(gc);
}

/* H2O's statistic on the device: with nothing evicted, every (layer, head)'s accumulated
 * attention sums to the number of queries (each query's probabilities, averaged over its group,
 * sum to 1), and each entry's equals the CPU store's within 1e-3 of the largest */
static void test_acc(const int32_t *tok, int n) {
    const char *spec = "h2o:budget=4096";
    kvs_context *cc = ctx_kv(KVS_DEVICE_CPU, 1, spec), *gc = ctx_kv(KVS_DEVICE_CUDA, 1, spec);
    kvs_sequence *cs, *gs;
    CHECK(kvs_seq_new(cc, &cs) == KVS_OK && kvs_seq_new(gc, &gs) == KVS_OK);
    CHECK(kvs_eval(cc, cs, tok, n, false, NULL, NULL, NULL) == KVS_OK);
    CHECK(kvs_eval(gc, gs, tok, n, false, NULL, NULL, NULL) == KVS_OK);
    int32_t t = 42;
    CHECK(kvs_eval(cc, cs, &t, 1, false, NULL, NULL, NULL) == KVS_OK); /* and one decode step */
    CHECK(kvs_eval(gc, gs, &t, 1, false, NULL, NULL, NULL) == KVS_OK);
    const struct hparams *hp = &gc->m->hp;
    int nkv = hp->n_head_kv, m = n + 1;
    float *a = malloc(sizeof(float) * nkv * m);
    double worst_sum = 0, worst = 0;
    for (int il = 0; il < hp->n_layer; il++) {
        CHECK(cuda_seq_layer_entries(gc->gpu, gs->slot, il) == m);
        enum kvs_status st = cuda_seq_acc(gc->gpu, gs->slot, 1, &il, a, (size_t)m);
        CHECKF(st == KVS_OK, "%s", kvs_last_error());
        for (int ih = 0; ih < nkv; ih++) {
            const struct kv_head_store *h = kv_seq_head(cs->kv, il, ih);
            CHECK(h->n == m);
            double sum = 0, big = 0, diff = 0;
            for (int j = 0; j < m; j++) {
                sum += a[(size_t)ih * m + j];
                big = fmax(big, fabs(h->acc[j]));
                diff = fmax(diff, fabs(a[(size_t)ih * m + j] - h->acc[j]));
            }
            worst_sum = fmax(worst_sum, fabs(sum - m) / m);
            worst = fmax(worst, diff / big);
        }
    }
    printf("%s: accumulated attention of %d queries, the sum of each (layer, head) within %.2e of %d (relative); "
           "entries against the CPU store's: worst %.2e of the head's largest\n", spec, m, worst_sum, m, worst);
    CHECKF(worst_sum < 1e-4, "sum off by %g", worst_sum);
    CHECKF(worst < 1e-3, "acc off by %g", worst);
    free(a);
    kvs_context_free(cc);
    kvs_context_free(gc);
}

/* One full prefill, many methods, on the device (what `eval sweep --device cuda` does): in a
 * keep_stats GPU context, a copy of the prefilled sequence compressed now (kvs_seq_compress)
 * keeps exactly the entries a context running the spec keeps at the end of the same prompt, and
 * decodes bit-identically to it until the latter's next compression; a copy of it into a plain
 * GPU context (another cuda_ctx) decodes bit-identically too. */
static void test_fork(const int32_t *tok, int n) {
    const char *specs[] = {"snapkv:budget=128,when=prefill", "h2o:budget=128,when=prefill",
                           "tova:budget=128,when=prefill", "streaming:budget=128,when=prefill",
                           "knorm:budget=128,when=prefill", "random:budget=128,when=prefill"};
    struct kvs_context_params p = kvs_context_params_default();
    p.n_ctx = 2048, p.n_batch = 256, p.n_seq_max = 3, p.device = KVS_DEVICE_CUDA, p.keep_stats = true;
    kvs_context *kc = NULL, *plain = ctx(KVS_DEVICE_CUDA, 1);
    CHECK(kvs_context_new(model, &p, &kc) == KVS_OK);
    kvs_sequence *A, *F, *P;
    CHECK(kvs_seq_new(kc, &A) == KVS_OK && kvs_seq_new(kc, &F) == KVS_OK && kvs_seq_new(plain, &P) == KVS_OK);
    CHECK(kvs_eval(kc, A, tok, n, false, NULL, NULL, NULL) == KVS_OK);
    float *la = malloc(sizeof(float) * n_vocab), *lb = malloc(sizeof(float) * n_vocab),
          *lc = malloc(sizeof(float) * n_vocab);
    for (size_t i = 0; i < sizeof specs / sizeof *specs; i++) {
        kvs_context *dc = ctx_kv(KVS_DEVICE_CUDA, 1, specs[i]);
        kvs_sequence *D;
        CHECK(kvs_seq_new(dc, &D) == KVS_OK);
        CHECK(kvs_eval(dc, D, tok, n, false, la, NULL, NULL) == KVS_OK);
        CHECK(kvs_seq_copy(kc, F, kc, A) == KVS_OK);
        enum kvs_status st = kvs_seq_compress(kc, F, specs[i]);
        CHECKF(st == KVS_OK, "%s: %s", specs[i], kvs_last_error());
        /* the same positions in every (layer, head) */
        const struct hparams *hp = &kc->m->hp;
        int most = 0, heads = 0, equal = 0;
        for (int il = 0; il < hp->n_layer; il++) {
            int nf = cuda_seq_layer_entries(kc->gpu, F->slot, il), nd = cuda_seq_layer_entries(dc->gpu, D->slot, il);
            most = nf > most ? nf : most;
            for (int ih = 0; ih < hp->n_head_kv; ih++, heads++) {
                const int32_t *pf = cuda_seq_positions(kc->gpu, F->slot, il, ih), *pd = cuda_seq_positions(dc->gpu, D->slot, il, ih);
                equal += nf == nd && pf && pd && !memcmp(pf, pd, sizeof(int32_t) * nf);
            }
        }
        double ov = (double)equal / heads;
        CHECK(kvs_seq_copy(plain, P, kc, F) == KVS_OK);
        int same = 0, psame = 0;
        for (int k = 0; k < 8; k++) {
            int32_t t = argmax(la, n_vocab);
            CHECK(kvs_eval(dc, D, &t, 1, false, la, NULL, NULL) == KVS_OK);
            CHECK(kvs_eval(kc, F, &t, 1, false, lb, NULL, NULL) == KVS_OK);
            CHECK(kvs_eval(plain, P, &t, 1, false, lc, NULL, NULL) == KVS_OK);
            same += !memcmp(la, lb, sizeof(float) * n_vocab);
            psame += !memcmp(la, lc, sizeof(float) * n_vocab);
        }
        printf("%s: compressed after one shared prefill, %d entries a head, the direct run's kept positions in "
               "%.4f of the heads; 8 decode steps bit-identical to it: %d, and copied to another context: %d\n", specs[i],
               most, ov, same, psame);
        CHECKF(ov == 1.0 && most == 128 && same == 8 && psame == 8, "%s", specs[i]);
        kvs_context_free(dc);
    }
    /* the plain context keeps no positions: compressing its copy, or copying it back into a slot
     * that keeps them, is refused (its entry i is no longer position i) */
    CHECK(kvs_seq_compress(plain, P, "streaming:budget=64") == KVS_ERR_INVALID_ARG);
    CHECK(kvs_seq_copy(kc, F, plain, P) == KVS_ERR_INVALID_ARG && kvs_seq_n_past(F) == 0);
    printf("a compressed copy without positions: compressing it or copying it into a slot with positions refused "
           "('%s')\n", kvs_last_error());
    free(la), free(lb), free(lc);
    kvs_context_free(kc);
    kvs_context_free(plain);
}

/* The policies on the device: the identities, the CPU store as the oracle of what is kept, and
 * the memory that really shrinks */
static void test_policy(void) {
    int32_t tok[4096];
    int n = prompt_tokens(tok, 4096);
    enum { ND = 24 };
    float *la = malloc(sizeof(float) * n_vocab), *lb = malloc(sizeof(float) * n_vocab);

    /* 1. budget >= length is the full cache */
    const char *big[] = {"snapkv:budget=4096", "h2o:budget=4096", "tova:budget=4096", "streaming:budget=4096",
                         "knorm:budget=4096", "random:budget=4096"};
    for (size_t i = 0; i < sizeof big / sizeof *big; i++) identity_full(big[i], tok, n, ND, la, lb);

    /* 2. the CPU store as the oracle (positions-only scorers: the very same entries) */
    oracle("snapkv:budget=128", 128, 0.95, 0.05, tok, n, la, lb);
    oracle("tova:budget=128", 128, 0.9, 0.05, tok, n, la, lb); /* (one query: near ties) */
    oracle("h2o:budget=128", 128, 0.95, 0.05, tok, n, la, lb);
    test_acc(tok, n);
    test_fork(tok, n);
    oracle("knorm:budget=128", 128, 0.9, 0.05, tok, n, la, lb);
    oracle("streaming:budget=128", 128, 1.0, 1e-3, tok, n, la, lb);
    oracle("streaming:budget=128,pos=abs", 128, 1.0, 1e-3, tok, n, la, lb);
    oracle("random:budget=128", 128, 1.0, 1e-3, tok, n, la, lb);

    /* 3. batched = alone, and a copy = the original, under compression (streaming: two
     * sequences whose RoPE shifts differ in one pass) */
    const char *small[] = {"snapkv:budget=96,every=4", "streaming:budget=96,every=4", "h2o:budget=96,every=4"};
    for (size_t si = 0; si < sizeof small / sizeof *small; si++) {
        const char *spec = small[si];
        kvs_context *gc = ctx_kv(KVS_DEVICE_CUDA, 4, spec);
        kvs_sequence *b[2], *cp;
        CHECK(kvs_seq_new(gc, &b[0]) == KVS_OK && kvs_seq_new(gc, &b[1]) == KVS_OK && kvs_seq_new(gc, &cp) == KVS_OK);
        float *lbat = malloc(sizeof(float) * 2 * n_vocab), *lone = malloc(sizeof(float) * 2 * ND * n_vocab);
        int32_t tb[2][ND + 1];
        int lens[2] = {n, 333};
        for (int i = 0; i < 2; i++) { /* alone: prompt, then ND greedy steps */
            CHECK(kvs_eval(gc, b[i], tok + i * 50, lens[i] - i * 50, false, la, NULL, NULL) == KVS_OK);
            tb[i][0] = argmax(la, n_vocab);
            for (int k = 0; k < ND; k++) {
                CHECK(kvs_eval(gc, b[i], &tb[i][k], 1, false, lone + ((size_t)k * 2 + i) * n_vocab, NULL, NULL) == KVS_OK);
                tb[i][k + 1] = argmax(lone + ((size_t)k * 2 + i) * n_vocab, n_vocab);
            }
            kvs_seq_reset(gc, b[i]);
        }
        for (int i = 0; i < 2; i++) CHECK(kvs_eval(gc, b[i], tok + i * 50, lens[i] - i * 50, false, NULL, NULL, NULL) == KVS_OK);
        CHECK(kvs_seq_copy(gc, cp, gc, b[1]) == KVS_OK);
        int same = 0, csame = 0;
        for (int k = 0; k < ND; k++) {
            int32_t t2[2] = {tb[0][k], tb[1][k]};
            CHECK(kvs_eval_batch(gc, b, t2, 2, lbat) == KVS_OK);
            same += !memcmp(lbat, lone + (size_t)k * 2 * n_vocab, sizeof(float) * 2 * n_vocab);
            CHECK(kvs_eval(gc, cp, &tb[1][k], 1, false, la, NULL, NULL) == KVS_OK);
            csame += !memcmp(la, lone + ((size_t)k * 2 + 1) * n_vocab, sizeof(float) * n_vocab);
        }
        CHECKF(same == ND && csame == ND, "batched %d, copy %d of %d", same, csame, ND);
        printf("%s: %d of %d batched steps of 2 sequences bit-identical to each alone; a copy made after the "
               "prompt: %d of %d\n", spec, same, ND, csame, ND);
        free(lbat), free(lone);
        kvs_context_free(gc);
    }

    /* 4. the device's own count of a compressed sequence: what the accounting says */
    {
        kvs_context *gc = ctx_kv(KVS_DEVICE_CUDA, 1, "snapkv:ratio=0.1");
        kvs_sequence *ns;
        CHECK(kvs_seq_new(gc, &ns) == KVS_OK);
        int32_t many[2000];
        for (int i = 0; i < 2000; i++) many[i] = tok[i % n];
        /* once first, so the context's planning scratch exists before the count starts */
        CHECK(kvs_eval(gc, ns, many, 2000, false, NULL, NULL, NULL) == KVS_OK);
        kvs_seq_reset(gc, ns);
        uint64_t free0 = cuda_device_free_bytes();
        CHECK(kvs_eval(gc, ns, many, 2000, false, NULL, NULL, NULL) == KVS_OK);
        uint64_t used = free0 - cuda_device_free_bytes(), acc = kvs_seq_kv_bytes(ns);
        double held = kvs_seq_entries_per_head(ns);
        printf("snapkv:ratio=0.1 over 2000 tokens: %.0f entries a head, %llu device bytes accounted, cudaMemGetInfo "
               "saw %llu\n", held, (unsigned long long)acc, (unsigned long long)used);
        /* (the budget is ceil(0.1f * 2000) = 201: the ratio is held as a float) */
        CHECKF(held == kv_policy_budget(gc->base.policy, 0, 2000), "%.1f entries, budget %d", held,
               kv_policy_budget(gc->base.policy, 0, 2000));
        CHECKF(acc > 0 && used >= acc && used <= acc + (8u << 20), "accounted %llu, used %llu",
               (unsigned long long)acc, (unsigned long long)used);
        kvs_context_free(gc);
    }
    free(la), free(lb);
}

int main(void) {
    quant_init();
    const char *path = tu_model_path_or_default();
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    if (f && kvs_model_load(path, NULL, &model) != KVS_OK) {
        fprintf(stderr, "%s\n", kvs_last_error());
        return 1;
    }
    if (model) {
        struct kvs_model_info mi;
        kvs_model_get_info(model, &mi);
        n_vocab = mi.n_vocab;
        test_plan_scored();
    }
    if (!cuda_built()) {
        if (model) {
            struct kvs_context_params p = kvs_context_params_default();
            p.device = KVS_DEVICE_CUDA;
            p.n_ctx = 256;
            kvs_context *c = NULL;
            CHECK(kvs_context_new(model, &p, &c) == KVS_ERR_UNSUPPORTED && strstr(kvs_last_error(), "make cuda"));
            printf("without CUDA: '%s'\n", kvs_last_error());
            kvs_model_free(model);
        }
        CHECK(cuda_test_matmul(QT_F32, NULL, 0, 0, 0, NULL, 1, 1, NULL) == KVS_ERR_UNSUPPORTED);
        printf("SKIP test_cuda GPU parts (this build has no CUDA backend: make cuda, then make test-cuda on a GPU machine)\n");
        printf("%d checks, %d failed\n", tu_checks, tu_failures);
        return tu_failures ? 1 : 0;
    }
    test_deq8_host();
    float w32[32], y = 0.0f;
    for (int i = 0; i < 32; i++) w32[i] = 1.0f;
    if (cuda_test_matmul(QT_F32, w32, sizeof w32, 1, 32, w32, 1, 1, &y) != KVS_OK) {
        printf("%s\n", kvs_last_error());
        if (getenv("KVS_REQUIRE_GPU")) return 1;
        printf("SKIP test_cuda GPU parts (no usable GPU here)\n");
        printf("%d checks, %d failed\n", tu_checks, tu_failures);
        kvs_model_free(model);
        return tu_failures ? 1 : 77;
    }
    CHECK(y == 32.0f);
    test_matmul();
    if (!model) {
        printf("SKIP test_cuda model parts (model %s not found: make models)\n", path);
        if (getenv("KVS_REQUIRE_GPU")) tu_failures++;
    } else {
        struct kvs_model_info mi;
        kvs_model_get_info(model, &mi);
        n_vocab = mi.n_vocab;
        /* a policy the GPU does not run is refused at creation, with the reason */
        struct kvs_context_params p = kvs_context_params_default();
        p.device = KVS_DEVICE_CUDA;
        p.kv_spec = "d2o:ratio=0.1";
        kvs_context *c = NULL;
        CHECK(kvs_context_new(model, &p, &c) == KVS_ERR_UNSUPPORTED && strstr(kvs_last_error(), "runs the KV policies full, snapkv"));
        test_model();
        test_policy();
        kvs_model_free(model);
    }
    printf("%d checks, %d failed\n", tu_checks, tu_failures);
    return tu_failures ? 1 : 0;
}
