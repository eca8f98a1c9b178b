/* test_quant.c — block formats, SIMD vs reference kernels, quantized GEMM, fp16 helpers.
 *
 * Budgets (normalised MSE of quantize_row_ref -> dequantize on the test data below, which mixes
 * uniform and roughly Gaussian blocks with per-block magnitudes over 4 decades):
 *   F32 0, F16 < 1e-6, BF16 < 3e-5, Q8_0 < 1e-4, Q6_K < 1e-3, Q5_0/Q5_1/Q5_K < 4e-3,
 *   Q4_0/Q4_1/Q4_K < 1.5e-2, Q3_K < 6e-2, Q2_K < 0.15.
 * Dequantization: SIMD == reference within 1e-6 relative (in practice bit-exact).
 * Activation quantizers (Q8_0/Q8_1/Q8_K): SIMD output bytes == reference bytes.
 * Dot products: |simd - ref| and |ref - dot(dequant w, dequant x)| <= 2e-5 * sum|w_i x_i| + 1e-6
 *   (the only differences are float summation order and the fp16-rounded scale products), plus,
 *   for Q4_1/Q5_1 (Q8_1 activations), 2^-10 * sum_blocks |m_w * s_x|: s = d*sum(q) is stored in
 *   fp16, so the min term carries its rounding (inherent to the format, as in ggml).
 * GEMM: every Y element == quant_vec_dot_ref within the same budget; elements outside the
 *   requested rows stay untouched (Y is pre-filled with NaN); and the result is bit-identical to
 *   quant_vec_dot and to the same GEMM done token by token with another row split (so a forward
 *   pass does not depend on batch size or thread count).
 */
#include <stdint.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "quant.h"
#include "quant_internal.h" /* block layouts: to bound the fp16 rounding of Q8_1's s */
#include "testutil.h"

static const int WTYPES[] = {QT_F32,  QT_F16,  QT_BF16, QT_Q4_0, QT_Q4_1, QT_Q5_0, QT_Q5_1,
                             QT_Q8_0, QT_Q2_K, QT_Q3_K, QT_Q4_K, QT_Q5_K, QT_Q6_K};
#define NWT ((int)(sizeof WTYPES / sizeof WTYPES[0]))

static double nmse_budget(int t) {
    switch (t) {
    case QT_F32: return 1e-12;
    case QT_F16: return 1e-6;
    case QT_BF16: return 3e-5;
    case QT_Q8_0: return 1e-4;
    case QT_Q6_K: return 1e-3;
    case QT_Q5_0: return 6e-3;
    case QT_Q5_1: case QT_Q5_K: return 4e-3;
    case QT_Q4_0: case QT_Q4_1: case QT_Q4_K: return 1.5e-2;
    case QT_Q3_K: return 6e-2;
    case QT_Q2_K: return 0.15;
    default: return 0;
    }
}

static float gauss(void) { return (tu_randf() + tu_randf() + tu_randf() + tu_randf()) * 0.8660254f; }

/* test data: per 32-element stretch a random magnitude 1e-2..1e2, uniform or Gaussian, sometimes
 * with an outlier */
static void fill_data(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i += 32) {
        float mag = powf(10.0f, 2.0f * tu_randf());
        int kind = (int)(tu_rand_u64() % 4);
        for (int64_t j = i; j < i + 32 && j < n; j++) x[j] = mag * (kind == 0 ? tu_randf() : gauss());
        if (kind == 3 && i + 32 <= n) x[i + (int64_t)(tu_rand_u64() % 32)] *= 4.0f;
    }
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(2); }
    return p;
}

static bool all_finite(const float *a, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(a[i])) return false;
    return true;
}

/* ---- traits ------------------------------------------------------------------------------ */

static void test_traits(void) {
    CHECK(quant_get_traits(QT_Q4_1) && quant_get_traits(QT_Q4_1)->type_size == 20);
    CHECK(quant_get_traits(QT_Q4_0)->type_size == 18 && quant_get_traits(QT_Q5_0)->type_size == 22);
    CHECK(quant_get_traits(QT_Q5_1)->type_size == 24 && quant_get_traits(QT_Q8_0)->type_size == 34);
    CHECK(quant_get_traits(QT_Q8_1)->type_size == 36 && quant_get_traits(QT_Q2_K)->type_size == 84);
    CHECK(quant_get_traits(QT_Q3_K)->type_size == 110 && quant_get_traits(QT_Q4_K)->type_size == 144);
    CHECK(quant_get_traits(QT_Q5_K)->type_size == 176 && quant_get_traits(QT_Q6_K)->type_size == 210);
    CHECK(quant_get_traits(QT_Q8_K)->type_size == 292 && quant_get_traits(QT_BF16)->type_size == 2);
    CHECK(quant_get_traits(4) == NULL && quant_get_traits(-1) == NULL && quant_get_traits(QT_COUNT) == NULL);
    CHECK(quant_get_traits(QT_Q4_1)->vec_dot_type == QT_Q8_1);
    CHECK(quant_get_traits(QT_Q4_0)->vec_dot_type == QT_Q8_0);
    CHECK(quant_get_traits(QT_Q6_K)->vec_dot_type == QT_Q8_K);
    CHECK(quant_get_traits(QT_F16)->vec_dot_type == QT_F32);
    CHECK(!quant_get_traits(QT_Q8_K)->is_weight_type && quant_get_traits(QT_Q4_K)->is_weight_type);
    CHECK(quant_row_bytes(QT_Q4_1, 576) == 18 * 20);
    CHECK(quant_row_bytes(QT_Q4_1, 577) == 0);
    CHECK(quant_row_bytes(QT_Q6_K, 512) == 420);
    CHECK(quant_row_bytes(QT_F16, 7) == 14);
    CHECK(quant_row_bytes(5, 32) == 0);
}

/* ---- fp16 -------------------------------------------------------------------------------- */

static void test_fp16(void) {
    static uint16_t h[65536], h2[65536];
    static float f_ref[65536], f_simd[65536];
    for (int i = 0; i < 65536; i++) h[i] = (uint16_t)i;
    for (int i = 0; i < 65536; i++) f_ref[i] = quant_f16_to_f32(h[i]);
    quant_f16_to_f32_row(h, f_simd, 65536);
    int bad_rt = 0, bad_simd = 0, bad_nan = 0, bad_row = 0;
    for (int i = 0; i < 65536; i++) {
        bool is_nan = ((i >> 10) & 31) == 31 && (i & 1023);
        uint32_t a, b;
        memcpy(&a, &f_ref[i], 4);
        memcpy(&b, &f_simd[i], 4);
        if (a != b) bad_simd++;
        uint16_t back = quant_f32_to_f16(f_ref[i]);
        if (is_nan) {
            if (!isnan(f_ref[i]) || ((back >> 10) & 31) != 31 || !(back & 1023)) bad_nan++;
        } else if (back != h[i]) {
            bad_rt++;
        }
    }
    quant_f32_to_f16_row(f_ref, h2, 65536);
    for (int i = 0; i < 65536; i++)
        if (h2[i] != quant_f32_to_f16(f_ref[i])) bad_row++;
    CHECKF(bad_rt == 0, "%d f16 values do not round-trip", bad_rt);
    CHECKF(bad_nan == 0, "%d NaNs lost", bad_nan);
    CHECKF(bad_simd == 0, "%d f16->f32 differ between row (SIMD) and scalar", bad_simd);
    CHECKF(bad_row == 0, "%d f32->f16 differ between row (SIMD) and scalar", bad_row);
    /* known values */
    CHECK(quant_f16_to_f32(0x3C00) == 1.0f && quant_f16_to_f32(0xC000) == -2.0f);
    CHECK(quant_f16_to_f32(0x0001) == 0x1p-24f && quant_f16_to_f32(0x7BFF) == 65504.0f);
    CHECK(isinf(quant_f16_to_f32(0x7C00)) && quant_f16_to_f32(0xFC00) < 0);
    CHECK(quant_f32_to_f16(65519.0f) == 0x7BFF && quant_f32_to_f16(65520.0f) == 0x7C00);
    CHECK(quant_f32_to_f16(1e-8f) == 0x0000 && quant_f32_to_f16(0x1p-25f) == 0x0000);
    CHECK(quant_f32_to_f16(0x1.8p-25f) == 0x0001 && quant_f32_to_f16(-0.0f) == 0x8000);
    CHECK(quant_f32_to_f16(1.0f + 0x1p-11f) == 0x3C00);      /* tie -> even */
    CHECK(quant_f32_to_f16(1.0f + 3 * 0x1p-11f) == 0x3C02);  /* tie -> even (up) */
    /* f32 -> f16 on random bit patterns (incl. NaN/inf/subnormal/overflow): row (SIMD) == scalar */
    enum { NR = 1 << 16 };
    static float fr[NR];
    static uint16_t hr[NR];
    for (int i = 0; i < NR; i++) {
        uint32_t u = (uint32_t)tu_rand_u64();
        if (i % 4 == 1) u = (u & 0x807FFFFFu) | ((uint32_t)(100 + (tu_rand_u64() % 50)) << 23);
        if (i % 4 == 2) u = (u & 0x80001FFFu) | 0x38000000u | ((u & 0x3FFu) << 13) | 0x1000u;
        memcpy(&fr[i], &u, 4);
    }
    quant_f32_to_f16_row(fr, hr, NR);
    int bad = 0;
    for (int i = 0; i < NR; i++) {
        uint16_t s = quant_f32_to_f16(fr[i]);
        if (s != hr[i]) {
            uint32_t u;
            memcpy(&u, &fr[i], 4);
            if (bad < 5) fprintf(stderr, "f32 %08x: scalar %04x simd %04x\n", u, s, hr[i]);
            bad++;
        }
    }
    CHECKF(bad == 0, "%d random f32->f16 differ", bad);
}

/* ---- per-type tests ---------------------------------------------------------------------- */

static double dot_tol(const float *w, const float *x, int64_t n) {
    double l1 = 0;
    for (int64_t i = 0; i < n; i++) l1 += fabs((double)w[i] * x[i]);
    return 2e-5 * l1 + 1e-6;
}

/* extra tolerance for the fp16-rounded s of Q8_1 activations */
static double q81_tol(int t, const uint8_t *w, const uint8_t *xq, int64_t n) {
    double e = 0;
    for (int64_t b = 0; b < n / 32; b++) {
        const blk_q8_1 *xb = (const blk_q8_1 *)xq + b;
        uint16_t m;
        if (t == QT_Q4_1) m = ((const blk_q4_1 *)w)[b].m;
        else if (t == QT_Q5_1) m = ((const blk_q5_1 *)w)[b].m;
        else return 0;
        e += fabs((double)quant_f16_to_f32(m) * quant_f16_to_f32(xb->s)) * 0x1p-10;
    }
    return e;
}

static void test_type(int t) {
    const struct quant_traits *tr = quant_get_traits(t);
    const int bs = tr->block_size;
    const int vt = tr->vec_dot_type;
    const int blocks_list[] = {1, 3, 31, 33, 127, 300};
    double worst_nmse = 0;
    for (size_t bi = 0; bi < sizeof blocks_list / sizeof blocks_list[0]; bi++) {
        /* K-quant rows are 256-wide: scale the count so sizes stay reasonable */
        int64_t nblk = blocks_list[bi];
        int64_t n = nblk * (bs == 1 ? 32 : bs);
        if (bs == 256 && nblk > 33) n = 40 * 256;
        float *x = xmalloc((size_t)n * 4), *y_ref = xmalloc((size_t)n * 4), *y_simd = xmalloc((size_t)n * 4);
        float *a = xmalloc((size_t)n * 4), *ad = xmalloc((size_t)n * 4);
        size_t wb = quant_row_bytes(t, n), xb = quant_row_bytes(vt, n);
        uint8_t *w = xmalloc(wb), *w2 = xmalloc(wb), *xq = xmalloc(xb), *xq_ref = xmalloc(xb);
        fill_data(x, n);
        quant_quantize_row_ref(t, x, w, n);
        quant_quantize_row(t, x, w2, n);
        CHECKF(memcmp(w, w2, wb) == 0, "%s: quantize_row differs from ref (n=%ld)", tr->name, (long)n);
        quant_dequantize_row_ref(t, w, y_ref, n);
        quant_dequantize_row(t, w, y_simd, n);
        /* (a) SIMD dequantization == reference */
        int64_t bad = 0;
        for (int64_t i = 0; i < n; i++)
            if (!(fabsf(y_ref[i] - y_simd[i]) <= 1e-6f * fabsf(y_ref[i]))) bad++;
        CHECKF(bad == 0, "%s: %ld dequantized values differ from ref (n=%ld)", tr->name, (long)bad, (long)n);
        /* (b) round trip */
        double e = tu_nmse(y_ref, x, n);
        if (e > worst_nmse) worst_nmse = e;
        CHECKF(e < nmse_budget(t), "%s: round-trip nmse %.3g >= %.3g (n=%ld)", tr->name, e, nmse_budget(t), (long)n);
        CHECK(all_finite(y_ref, n));
        /* (c) dot products */
        fill_data(a, n);
        if (vt == QT_F32) {
            memcpy(xq, a, xb);
            memcpy(ad, a, (size_t)n * 4);
        } else {
            quant_quantize_row_ref(vt, a, xq_ref, n);
            quant_quantize_row(vt, a, xq, n);
            CHECKF(memcmp(xq, xq_ref, xb) == 0, "%s: SIMD activation quantization differs from ref", quant_get_traits(vt)->name);
            quant_dequantize_row_ref(vt, xq, ad, n);
            double ea = tu_nmse(ad, a, n);
            /* Q8_K has one scale per 256, and the data's magnitudes vary per 32 */
            CHECKF(ea < (vt == QT_Q8_K ? 1e-3 : 1e-4), "activation %s nmse %.3g", quant_get_traits(vt)->name, ea);
        }
        double exact = 0;
        for (int64_t i = 0; i < n; i++) exact += (double)y_ref[i] * ad[i];
        float d_ref = quant_vec_dot_ref(t, n, w, xq);
        float d_simd = quant_vec_dot(t, n, w, xq);
        double tol = dot_tol(y_ref, ad, n) + q81_tol(t, w, xq, n);
        CHECKF(fabs(d_ref - exact) <= tol, "%s: vec_dot_ref %.9g vs dequantized dot %.9g (tol %.3g, n=%ld)", tr->name, d_ref, exact, tol, (long)n);
        CHECKF(fabs(d_simd - d_ref) <= tol, "%s: vec_dot %.9g vs ref %.9g (tol %.3g, n=%ld)", tr->name, d_simd, d_ref, tol, (long)n);
        free(x); free(y_ref); free(y_simd); free(a); free(ad); free(w); free(w2); free(xq); free(xq_ref);
    }
    fprintf(stderr, "  %-5s worst round-trip nmse %.3g (budget %.3g)\n", tr->name, worst_nmse, nmse_budget(t));
}

/* (e) constant and all-zero blocks */
static void test_degenerate(int t) {
    const struct quant_traits *tr = quant_get_traits(t);
    const int64_t n = 512;
    const int vt = tr->vec_dot_type;
    float x[512], y[512], y2[512];
    uint8_t w[512 * 4], xq[512 * 4];
    const float consts[] = {0.0f, 1.0f, -3.5f, 1e-3f, 100.0f};
    for (size_t c = 0; c < sizeof consts / sizeof consts[0]; c++) {
        for (int i = 0; i < n; i++) x[i] = consts[c];
        quant_quantize_row_ref(t, x, w, n);
        quant_dequantize_row_ref(t, w, y, n);
        quant_dequantize_row(t, w, y2, n);
        CHECKF(all_finite(y, n) && all_finite(y2, n), "%s: non-finite dequantization of constant %g", tr->name, consts[c]);
        double err = tu_max_abs_diff(y, x, n);
        /* constant blocks are representable up to scale rounding (Q3_K/Q6_K/Q*_0 are symmetric) */
        /* (tiny constants hit fp16-subnormal super-block scales in Q6_K/Q3_K: absolute floor) */
        CHECKF(err <= 0.02 * fabs(consts[c]) + 1e-4, "%s: constant %g reconstructed with error %g", tr->name, consts[c], err);
        if (vt == QT_F32) memcpy(xq, x, n * 4);
        else quant_quantize_row(vt, x, xq, n);
        float d0 = quant_vec_dot(t, n, w, xq), d1 = quant_vec_dot_ref(t, n, w, xq);
        CHECKF(isfinite(d0) && isfinite(d1), "%s: non-finite dot on constant %g", tr->name, consts[c]);
        if (consts[c] == 0) CHECK(d0 == 0 && d1 == 0);
    }
}

/* (d) gemm vs a loop of vec_dot_ref on awkward shapes */
static int gemm_case(int t, int64_t n_cols, int r0, int r1, int n_tok, bool verbose) {
    const struct quant_traits *tr = quant_get_traits(t);
    const int vt = tr->vec_dot_type;
    const int rows = r1 + 2;
    const int64_t ldy = rows + 3;
    size_t wrb = quant_row_bytes(t, n_cols), xrb = quant_row_bytes(vt, n_cols);
    float *tmp = xmalloc((size_t)n_cols * 4), *wd = xmalloc((size_t)n_cols * rows * 4);
    float *xd = xmalloc((size_t)n_cols * n_tok * 4);
    uint8_t *W = xmalloc(wrb * rows), *X = xmalloc(xrb * n_tok);
    float *Y = xmalloc((size_t)ldy * n_tok * 4);
    for (int r = 0; r < rows; r++) {
        fill_data(tmp, n_cols);
        quant_quantize_row_ref(t, tmp, W + (size_t)r * wrb, n_cols);
        quant_dequantize_row_ref(t, W + (size_t)r * wrb, wd + (size_t)r * n_cols, n_cols);
    }
    for (int k = 0; k < n_tok; k++) {
        fill_data(tmp, n_cols);
        if (vt == QT_F32) memcpy(X + (size_t)k * xrb, tmp, xrb);
        else quant_quantize_row(vt, tmp, X + (size_t)k * xrb, n_cols);
        if (vt == QT_F32) memcpy(xd + (size_t)k * n_cols, tmp, xrb);
        else quant_dequantize_row_ref(vt, X + (size_t)k * xrb, xd + (size_t)k * n_cols, n_cols);
    }
    for (int64_t i = 0; i < ldy * n_tok; i++) Y[i] = NAN;
    quant_gemm(t, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy);
    int bad = 0, untouched_bad = 0;
    for (int k = 0; k < n_tok; k++)
        for (int64_t r = 0; r < ldy; r++) {
            float y = Y[k * ldy + r];
            if (r < r0 || r >= r1) {
                if (!isnan(y)) untouched_bad++;
                continue;
            }
            float ref = quant_vec_dot_ref(t, n_cols, W + (size_t)r * wrb, X + (size_t)k * xrb);
            double tol = dot_tol(wd + (size_t)r * n_cols, xd + (size_t)k * n_cols, n_cols) +
                         q81_tol(t, W + (size_t)r * wrb, X + (size_t)k * xrb, n_cols);
            if (!(fabs(y - ref) <= tol)) {
                if (bad < 3 && verbose)
                    fprintf(stderr, "  %s gemm cols=%ld rows=[%d,%d) tok=%d: Y[%d][%ld]=%.8g ref %.8g\n",
                            tr->name, (long)n_cols, r0, r1, n_tok, k, (long)r, y, ref);
                bad++;
            }
        }
    /* determinism: the same bits token by token, with another row split, and from vec_dot */
    float *Y1 = xmalloc((size_t)ldy * n_tok * 4);
    for (int64_t i = 0; i < ldy * n_tok; i++) Y1[i] = NAN;
    const int mid = r0 + (r1 - r0) / 2 + 1 < r1 ? r0 + (r1 - r0) / 2 + 1 : r1;
    for (int k = 0; k < n_tok; k++) {
        quant_gemm(t, W, wrb, n_cols, r0, mid, X + (size_t)k * xrb, xrb, 1, Y1 + k * ldy, ldy);
        quant_gemm(t, W, wrb, n_cols, mid, r1, X + (size_t)k * xrb, xrb, 1, Y1 + k * ldy, ldy);
    }
    int nondet = 0;
    for (int k = 0; k < n_tok; k++)
        for (int r = r0; r < r1; r++) {
            float y = Y[k * ldy + r], v = quant_vec_dot(t, n_cols, W + (size_t)r * wrb, X + (size_t)k * xrb);
            if (!(y == Y1[k * ldy + r] && y == v)) { /* exact (+0 and -0 count as equal) */
                if (nondet < 3 && verbose)
                    fprintf(stderr, "  %s cols=%ld tok=%d/%d row %d: gemm %.9g, one token %.9g, vec_dot %.9g\n",
                            tr->name, (long)n_cols, k, n_tok, r, y, Y1[k * ldy + r], v);
                nondet++;
            }
        }
    free(Y1);
    free(tmp); free(wd); free(xd); free(W); free(X); free(Y);
    return bad + untouched_bad + nondet;
}

static void test_gemm(int t) {
    const struct quant_traits *tr = quant_get_traits(t);
    const int bs = tr->block_size == 1 ? 32 : tr->block_size;
    const int row_list[] = {1, 3, 5, 17};
    const int tok_list[] = {1, 2, 3, 5, 7, 33};
    /* two widths: one small, one spanning several K-chunks of the tiled kernels */
    const int64_t cols_list[] = {bs == 256 ? 256 : 64, bs == 256 ? 256 * 9 : 32 * 70};
    int fails = 0;
    for (size_t c = 0; c < 2; c++)
        for (size_t ri = 0; ri < 4; ri++)
            for (size_t ti = 0; ti < 6; ti++) {
                int r0 = (int)(ri & 1) * 2;
                int f = gemm_case(t, cols_list[c], r0, r0 + row_list[ri], tok_list[ti], fails == 0);
                CHECKF(f == 0, "%s: gemm cols=%ld rows=%d tok=%d: %d wrong elements", tr->name,
                       (long)cols_list[c], row_list[ri], tok_list[ti], f);
                fails += f;
            }
    /* more tokens than one activation chunk, more rows than a few tiles */
    int f = gemm_case(t, cols_list[0], 1, 42, 131, true);
    CHECKF(f == 0, "%s: gemm 41 rows x 131 tokens: %d wrong", tr->name, f);
    /* very long rows (several K-chunks of the one-token path too) */
    for (int nt = 1; nt <= 5; nt += 4) {
        f = gemm_case(t, bs == 256 ? 256 * 36 : 32 * 300, 3, 20, nt, true);
        CHECKF(f == 0, "%s: gemm 17 rows x %d tokens, long rows: %d wrong", tr->name, nt, f);
    }
}

/* (d2) pre-packed weights (quant_pack): quant_gemm_packed gives quant_gemm's bits exactly, for
 * rows starting on a tile or not (then it falls back), partial last tiles, one and many K-chunks,
 * and token counts on both sides of the one-token threshold and past one activation chunk */
static void test_gemm_packed(int t) {
    const struct quant_traits *tr = quant_get_traits(t);
    const int vt = tr->vec_dot_type;
    const bool expect = quant_has_avx2() && (t == QT_Q4_0 || t == QT_Q4_1 || t == QT_Q8_0 || t == QT_Q4_K || t == QT_Q6_K);
    const int rows = 37;
    const int bs = tr->block_size == 1 ? 32 : tr->block_size;
    const int64_t cols_list[] = {bs == 256 ? 256 : 64, bs == 256 ? 256 * 9 : 32 * 70};
    for (size_t c = 0; c < 2; c++) {
        const int64_t n_cols = cols_list[c];
        size_t pb = quant_pack_bytes(t, rows, n_cols);
        CHECKF((pb > 0) == expect, "%s: quant_pack_bytes %zu (packed layout expected: %d)", tr->name, pb, expect);
        if (!pb) continue;
        CHECKF(pb >= quant_row_bytes(t, n_cols) * rows, "%s: %zu packed bytes for %zu", tr->name, pb,
               quant_row_bytes(t, n_cols) * rows);
        size_t wrb = quant_row_bytes(t, n_cols), xrb = quant_row_bytes(vt, n_cols);
        float *tmp = xmalloc((size_t)n_cols * 4);
        uint8_t *W = xmalloc(wrb * rows);
        void *P = aligned_alloc(64, (pb + 63) / 64 * 64);
        for (int r = 0; r < rows; r++) {
            fill_data(tmp, n_cols);
            quant_quantize_row_ref(t, tmp, W + (size_t)r * wrb, n_cols);
        }
        quant_pack(t, W, wrb, rows, n_cols, P);
        const int tok_list[] = {1, 3, 4, 5, 17, 131};
        const int r_list[][2] = {{0, 37}, {8, 24}, {16, 37}, {3, 20}, {32, 37}};
        for (size_t ti = 0; ti < sizeof tok_list / sizeof *tok_list; ti++) {
            const int n_tok = tok_list[ti];
            const int64_t ldy = rows + 3;
            uint8_t *X = xmalloc(xrb * (size_t)n_tok);
            float *Y = xmalloc((size_t)ldy * n_tok * 4), *Yp = xmalloc((size_t)ldy * n_tok * 4);
            for (int k = 0; k < n_tok; k++) {
                fill_data(tmp, n_cols);
                quant_quantize_row(vt, tmp, X + (size_t)k * xrb, n_cols);
            }
            for (size_t ri = 0; ri < sizeof r_list / sizeof *r_list; ri++) {
                const int r0 = r_list[ri][0], r1 = r_list[ri][1];
                for (int64_t i = 0; i < ldy * n_tok; i++) Y[i] = Yp[i] = NAN;
                quant_gemm(t, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy);
                quant_gemm_packed(t, W, P, wrb, n_cols, r0, r1, X, xrb, n_tok, Yp, ldy);
                int diff = 0;
                for (int64_t i = 0; i < ldy * n_tok; i++)
                    diff += memcmp(&Y[i], &Yp[i], sizeof(float)) != 0 && !(isnan(Y[i]) && isnan(Yp[i]));
                CHECKF(diff == 0, "%s packed: cols=%ld rows=[%d,%d) tok=%d: %d elements differ from quant_gemm",
                       tr->name, (long)n_cols, r0, r1, n_tok, diff);
            }
            free(X); free(Y); free(Yp);
        }
        free(tmp); free(W); free(P);
    }
}

/* (e) quant_gemm_f32 (float activations, act_f32) against the reference dequantization and a
 * float64 dot, on awkward shapes; budget: |y - ref| <= 1e-6 * sum |w x| (fp32 summation). */
static void test_gemm_f32(int t) {
    const struct quant_traits *tr = quant_get_traits(t);
    const int64_t bs = tr->block_size == 1 ? 32 : tr->block_size;
    const int64_t cols_list[] = {bs, bs * 3, bs == 256 ? 256 * 9 : 32 * 70};
    const int tok_list[] = {1, 3, 33};
    for (size_t c = 0; c < 3; c++)
        for (size_t ti = 0; ti < 3; ti++) {
            int64_t n = cols_list[c];
            int n_tok = tok_list[ti], r0 = 1, r1 = 6, rows = 7;
            int64_t ldx = n + 5, ldy = rows + 2;
            size_t wrb = quant_row_bytes(t, n);
            uint8_t *W = xmalloc(wrb * rows);
            float *tmp = xmalloc((size_t)n * 4), *wd = xmalloc((size_t)n * rows * 4);
            float *X = xmalloc((size_t)ldx * n_tok * 4), *Y = xmalloc((size_t)ldy * n_tok * 4);
            float *row = xmalloc((size_t)n * 4);
            for (int r = 0; r < rows; r++) {
                fill_data(tmp, n);
                quant_quantize_row_ref(t, tmp, W + (size_t)r * wrb, n);
                quant_dequantize_row_ref(t, W + (size_t)r * wrb, wd + (size_t)r * n, n);
            }
            for (int k = 0; k < n_tok; k++) fill_data(X + (size_t)k * ldx, n);
            for (int64_t i = 0; i < ldy * n_tok; i++) Y[i] = NAN;
            quant_gemm_f32(t, W, wrb, n, r0, r1, X, ldx, n_tok, Y, ldy, row);
            int bad = 0;
            for (int k = 0; k < n_tok; k++)
                for (int r = 0; r < ldy; r++) {
                    float y = Y[k * ldy + r];
                    if (r < r0 || r >= r1) {
                        bad += !isnan(y);
                        continue;
                    }
                    double ref = 0, mag = 0;
                    for (int64_t i = 0; i < n; i++) {
                        double p = (double)wd[(size_t)r * n + i] * X[(size_t)k * ldx + i];
                        ref += p, mag += fabs(p);
                    }
                    bad += !(fabs(y - ref) <= 1e-6 * mag + 1e-30);
                }
            CHECKF(bad == 0, "%s: gemm_f32 cols=%ld tok=%d: %d wrong elements", tr->name, (long)n,
                   n_tok, bad);
            free(W); free(tmp); free(wd); free(X); free(Y); free(row);
        }
}

/* activation quantizers on exact ties (x*scale = k + 0.5) and on +-amax ties: SIMD == ref */
static void test_act_ties(void) {
    float x[256];
    uint8_t a[300 * 2], b[300 * 2];
    for (int i = 0; i < 256; i++) x[i] = (float)((i % 64) - 32) + 0.5f;
    for (int i = 0; i < 256; i += 32) x[i] = 127.0f; /* scale 1 for Q8_0/Q8_1 */
    const int types[] = {QT_Q8_0, QT_Q8_1, QT_Q8_K};
    for (int k = 0; k < 3; k++) {
        size_t nb = quant_row_bytes(types[k], 256);
        quant_quantize_row(types[k], x, a, 256);
        quant_quantize_row_ref(types[k], x, b, 256);
        CHECKF(memcmp(a, b, nb) == 0, "%s: SIMD and reference differ on ties", quant_get_traits(types[k])->name);
    }
    x[5] = -127.0f; /* +-amax tie within a Q8_K super-block */
    quant_quantize_row(QT_Q8_K, x, a, 256);
    quant_quantize_row_ref(QT_Q8_K, x, b, 256);
    CHECK(memcmp(a, b, quant_row_bytes(QT_Q8_K, 256)) == 0);
    /* zero columns: gemm writes zeros */
    float y[4] = {NAN, NAN, NAN, NAN};
    quant_gemm(QT_Q4_1, a, 0, 0, 0, 2, b, 0, 2, y, 2);
    CHECK(y[0] == 0 && y[1] == 0 && y[2] == 0 && y[3] == 0);
}

static void test_force_ref(void) {
    /* quant_force_ref(true) routes the public entry points to the reference code */
    const int64_t n = 256;
    float x[256], a[256];
    uint8_t w[256 * 2], xq[300 * 2];
    fill_data(x, n);
    fill_data(a, n);
    quant_quantize_row_ref(QT_Q4_K, x, w, n);
    quant_quantize_row_ref(QT_Q8_K, a, xq, n);
    quant_force_ref(true);
    float d = quant_vec_dot(QT_Q4_K, n, w, xq);
    float y = NAN;
    quant_gemm(QT_Q4_K, w, quant_row_bytes(QT_Q4_K, n), n, 0, 1, xq, quant_row_bytes(QT_Q8_K, n), 1, &y, 1);
    quant_force_ref(false);
    float dr = quant_vec_dot_ref(QT_Q4_K, n, w, xq);
    CHECK(d == dr && y == dr);
}

int main(void) {
    quant_init();
    fprintf(stderr, "test_quant: SIMD path %s\n", quant_has_avx2() ? "AVX2" : "not available (reference only)");
    test_traits();
    test_fp16();
    for (int i = 0; i < NWT; i++) test_type(WTYPES[i]);
    for (int i = 0; i < NWT; i++) test_degenerate(WTYPES[i]);
    for (int i = 0; i < NWT; i++) test_gemm(WTYPES[i]);
    for (int i = 0; i < NWT; i++) test_gemm_packed(WTYPES[i]);
    for (int i = 0; i < NWT; i++) test_gemm_f32(WTYPES[i]);
    test_act_ties();
    test_force_ref();
    return tu_finish("test_quant");
}
