/* bench_quant.c — single-thread microbenchmark of quant_gemm (not built by make).
 *
 * Build:  cc -std=c11 -D_GNU_SOURCE -O2 -Iinclude -Isrc -c src/quant.c -o /tmp/quant.o
 *         cc -std=c11 -D_GNU_SOURCE -O2 -Iinclude -Isrc -mavx2 -mfma -mf16c -c src/quant_avx2.c -o /tmp/quant_avx2.o
 *         cc -std=c11 -D_GNU_SOURCE -O2 -Iinclude -Isrc -c src/base.c -o /tmp/base.o
 *         cc -std=c11 -D_GNU_SOURCE -O2 -Iinclude -Isrc bench/bench_quant.c /tmp/quant.o /tmp/quant_avx2.o /tmp/base.o -o /tmp/bench_quant -lm -pthread
 * Run:    /tmp/bench_quant [type...]      (default: Q4_1; names as in quant_traits, e.g. Q4_K)
 *
 * For each shape (rows x cols = output features x input features):
 *   n_tok = 512: GFLOP/s = 2*rows*cols*512 / time
 *   n_tok = 1:   GB/s of weights streamed; "hot" reuses one matrix (cache-resident when small),
 *                "cold" cycles through copies totalling >= 512 MB (DRAM bandwidth).
 * Timing: thread CPU time, best of many short trials (the figure a quiet machine gives; on a
 * shared machine, wall-clock medians swing by 2x with other processes' load).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "quant.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* best rate (units per second) of `trials` trials of at least `min_s` each */
typedef void (*work_fn)(void *ctx);
static double best_rate(work_fn fn, void *ctx, double units_per_call, int trials, double min_s) {
    double best = 0;
    for (int k = 0; k < trials; k++) {
        int it = 0;
        double t0 = now_s(), el;
        do {
            fn(ctx);
            it++;
            el = now_s() - t0;
        } while (el < min_s);
        double r = units_per_call * it / el;
        if (r > best) best = r;
    }
    return best;
}

struct gemm_ctx {
    int t, rows, cols, n_tok, ncopy, next;
    uint8_t **W;
    size_t wrb, xrb;
    const uint8_t *X;
    float *Y;
};
static void run_gemm(void *p) {
    struct gemm_ctx *c = p;
    quant_gemm(c->t, c->W[c->next], c->wrb, c->cols, 0, c->rows, c->X, c->xrb, c->n_tok, c->Y, c->rows);
    if (++c->next == c->ncopy) c->next = 0;
}

static uint64_t rng = 88172645463325252ull;
static float frand(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (float)((rng >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}

static void *xalloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64)) { fprintf(stderr, "oom\n"); exit(1); }
    return p;
}

static void bench_shape(int t, int rows, int cols) {
    const struct quant_traits *tr = quant_get_traits(t);
    const int vt = tr->vec_dot_type;
    size_t wrb = quant_row_bytes(t, cols), xrb = quant_row_bytes(vt, cols);
    if (!wrb || !xrb) { printf("%-5s %6d x %-5d: unsupported width\n", tr->name, rows, cols); return; }
    size_t wbytes = wrb * (size_t)rows;
    uint8_t *W = xalloc(wbytes);
    float *tmp = xalloc((size_t)cols * 4);
    for (int r = 0; r < rows; r++) {
        for (int c = 0; c < cols; c++) tmp[c] = frand();
        quant_quantize_row(t, tmp, W + (size_t)r * wrb, cols);
    }
    const int NT = 512;
    uint8_t *X = xalloc(xrb * NT);
    for (int k = 0; k < NT; k++) {
        for (int c = 0; c < cols; c++) tmp[c] = frand();
        if (vt == QT_F32) memcpy(X + (size_t)k * xrb, tmp, xrb);
        else quant_quantize_row(vt, tmp, X + (size_t)k * xrb, cols);
    }
    float *Y = xalloc((size_t)rows * NT * 4);

    struct gemm_ctx c = {t, rows, cols, NT, 1, 0, &W, wrb, xrb, X, Y};
    /* prefill-shaped */
    run_gemm(&c);
    double gflops = best_rate(run_gemm, &c, 2.0 * rows * cols * NT * 1e-9, 8, 0.15);
    /* decode, hot */
    c.n_tok = 1;
    double gbs_hot = best_rate(run_gemm, &c, (double)wbytes * 1e-9, 20, 0.05);
    /* decode, cold: cycle through copies */
    int ncopy = (int)((512u << 20) / wbytes) + 1;
    uint8_t **cp = malloc(sizeof(uint8_t *) * (size_t)ncopy);
    for (int k = 0; k < ncopy; k++) {
        cp[k] = xalloc(wbytes);
        memcpy(cp[k], W, wbytes);
    }
    c.W = cp;
    c.ncopy = ncopy;
    double gbs_cold = best_rate(run_gemm, &c, (double)wbytes * 1e-9, 10, 0.1);
    for (int k = 0; k < ncopy; k++) free(cp[k]);
    free(cp);

    printf("%-5s %6d x %-5d  n_tok=512: %7.1f GFLOP/s   n_tok=1: %6.1f GB/s hot, %5.1f GB/s cold (%.1f MB)\n",
           tr->name, rows, cols, gflops, gbs_hot, gbs_cold, wbytes / 1e6);
    fflush(stdout);
    free(W); free(X); free(Y); free(tmp);
}

static void bench_memread(void) {
    size_t n = (size_t)1 << 29; /* 512 MB */
    uint64_t *a = xalloc(n);
    memset(a, 1, n);
    double best = 0;
    for (int rep = 0; rep < 6; rep++) {
        double t0 = now_s();
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (size_t i = 0; i < n / 8; i += 4) { s0 += a[i]; s1 += a[i + 1]; s2 += a[i + 2]; s3 += a[i + 3]; }
        double el = now_s() - t0;
        if (n / el * 1e-9 > best) best = n / el * 1e-9;
        if (s0 + s1 + s2 + s3 == 42) printf(" ");
    }
    printf("plain read bandwidth (1 thread, 512 MB): %.1f GB/s\n", best);
    free(a);
}

int main(int argc, char **argv) {
    quant_init();
    printf("SIMD: %s\n", quant_has_avx2() ? "AVX2" : "none");
    bench_memread();
    static const int shapes[][2] = {{576, 576}, {1536, 576}, {576, 1536}, {49152, 576}};
    int types[16], nt = 0;
    for (int i = 1; i < argc && nt < 16; i++)
        for (int t = 0; t < QT_COUNT; t++) {
            const struct quant_traits *tr = quant_get_traits(t);
            if (tr && tr->is_weight_type && !strcmp(tr->name, argv[i])) types[nt++] = t;
        }
    if (!nt) types[nt++] = QT_Q4_1;
    for (int k = 0; k < nt; k++) {
        const struct quant_traits *tr = quant_get_traits(types[k]);
        for (int s = 0; s < 4; s++) {
            int rows = shapes[s][0], cols = shapes[s][1];
            if (tr->block_size == 256 && cols % 256) cols = cols == 576 ? 512 : cols; /* K-quants */
            bench_shape(types[k], rows, cols);
        }
    }
    return 0;
}
