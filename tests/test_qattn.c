/* test_qattn.c — the fused low-bit attention kernels (ops_qattn_*): each scalar reference against
 * a plain dequantize-then-dot computed here with kv_quant.h (in double), and the AVX2 versions
 * against the references (skipped, not failed, without AVX2), for 2/3/4/8-bit codes (3-bit:
 * AVX2 per-token kernels; blk_scores falls back to the reference), value rows in groups of 8, 32
 * or hd channels (and 4: the AVX2 fallback), awkward token counts (tails, zero), byte strides
 * above the minimum and unaligned rows. Buffers are allocated to the exact
 * byte the kernels may read, so ASan catches any over-read; S padding beyond n must stay
 * untouched, P padding holds NaN (must not be read), O must be added to.
 * Budget: |error| <= 1e-5 of the sum of absolute terms. */
#include "base.h"
#include "kv/kv_quant.h"
#include "ops.h"
#include "quant.h"
#include "testutil.h"

#include <stdint.h>

static const int BITS[] = {2, 3, 4, 8}; /* 3: per-token kernels in AVX2, blk_scores falls back */
static const int GS[] = {1, 3, 8, 20};
static const int DS[] = {8, 40, 64, 128, 256};
static const int NS[] = {0, 1, 7, 8, 31, 32, 33, 100};
static const int VGS[] = {8, 32, 0}; /* value group sizes tried where they divide hd; 0 = hd */
#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))

static const double TOL = 1e-5;
static double worst_ref, worst_avx2, worst_q8; /* largest error / budget scale seen */

static int rand_int(int n) { return (int)(tu_rand_u64() % (unsigned long long)n); }

/* the worst case of the int8 forms' 16-bit sums: every code at its maximum, every query, scale
 * and weight equal, so every int8 factor is 127 and every pair sum is at its largest */
static bool extreme;

/* codes for `rows` rows of `row_bytes` bytes each, `stride` apart, starting at a random odd
 * offset inside the allocation; the allocation ends exactly at the last byte of the last row */
typedef struct {
    uint8_t *base, *codes;
} Codes;

static Codes make_codes(int rows, size_t row_bytes, size_t stride) {
    size_t off = 1 + (size_t)rand_int(31);
    size_t bytes = rows > 0 ? (size_t)(rows - 1) * stride + row_bytes : 0;
    Codes c;
    c.base = malloc(off + bytes);
    c.codes = c.base + off;
    for (size_t i = 0; i < off + bytes; i++) c.base[i] = extreme ? 0xFF : (uint8_t)tu_rand_u64();
    return c;
}

/* per-group (scale, min): every fifth scale 0 (a constant group), the rest in [0, 0.5); the
 * kernels read them as fp16 (hs, hm), the expected values use the same numbers widened */
static void make_scales(float *scale, float *min, uint16_t *hs, uint16_t *hm, int n) {
    for (int i = 0; i < n; i++) {
        hs[i] = quant_f32_to_f16(extreme ? 0.25f : rand_int(5) == 0 ? 0.0f : 0.25f * (tu_randf() + 1.0f));
        hm[i] = quant_f32_to_f16(tu_randf());
        scale[i] = quant_f16_to_f32(hs[i]), min[i] = quant_f16_to_f32(hm[i]);
    }
}
static uint16_t *halloc(int n) { return malloc(sizeof(uint16_t) * (size_t)(n > 0 ? n : 1)); }

/* exact-size float array (n may be 0) so that reading past n trips ASan */
static float *falloc(int n) { return malloc(sizeof(float) * (size_t)(n > 0 ? n : 1)); }

static void fill_nan(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = NAN;
}

/* S rows of g x lds: entries t < n against want (double) with per-entry budget, padding NaN */
static int check_scores(const char *what, const float *S, const double *want, const double *mag,
                        int g, int n, int lds, double *worst) {
    int bad = 0;
    for (int qi = 0; qi < g; qi++) {
        for (int t = 0; t < n; t++) {
            double e = fabs((double)S[qi * lds + t] - want[qi * n + t]);
            double r = e / (mag[qi * n + t] + 1e-30);
            if (r > *worst || r != r) *worst = r != r ? INFINITY : r;
            if (!(e <= TOL * mag[qi * n + t] + 1e-30)) {
                if (!bad)
                    fprintf(stderr, "%s: S[%d][%d] = %.9g, want %.9g (budget %g)\n", what, qi, t,
                            S[qi * lds + t], want[qi * n + t], TOL * mag[qi * n + t]);
                bad++;
            }
        }
        for (int t = n; t < lds; t++)
            if (!isnan(S[qi * lds + t])) {
                if (!bad) fprintf(stderr, "%s: padding S[%d][%d] written\n", what, qi, t);
                bad++;
            }
    }
    return bad;
}

static void test_blk_scores(int bits, int g, int kd, int nt, bool avx2) {
    size_t rb = kvq_code_bytes(bits, nt), cstride = rb + 1 + (size_t)rand_int(13);
    Codes cd = make_codes(kd, rb, cstride);
    float *Q = falloc(g * kd), *scale = falloc(kd), *min = falloc(kd);
    uint16_t *hs = halloc(kd), *hm = halloc(kd);
    for (int i = 0; i < g * kd; i++) Q[i] = extreme ? 1.5f : 2.0f * tu_randf();
    make_scales(scale, min, hs, hm, kd);
    int lds = nt + 1 + rand_int(9);
    float sc = 0.125f;
    float *S = falloc(g * lds);
    double *want = malloc(sizeof(double) * (size_t)(g * nt + 1));
    double *mag = malloc(sizeof(double) * (size_t)(g * nt + 1));
    double *qmag = calloc((size_t)(g * nt + 1), sizeof(double));
    /* independent: dequantize each channel, then dot in double */
    float *xh = falloc(kd * nt);
    for (int c = 0; c < kd; c++)
        kvq_dequant_group(cd.codes + (size_t)c * cstride, nt, bits, scale[c], min[c], xh + c * nt);
    for (int qi = 0; qi < g; qi++)
        for (int t = 0; t < nt; t++) {
            double w = 0, m = 0;
            for (int c = 0; c < kd; c++) {
                double q = Q[qi * kd + c];
                w += q * xh[c * nt + t];
                m += fabs(q * scale[c] * kvq_code(cd.codes + (size_t)c * cstride, bits, t)) +
                     fabs(q * min[c]);
            }
            want[qi * nt + t] = sc * w;
            mag[qi * nt + t] = sc * m;
        }
    /* the int8 form's budget: the bound of ops.h (d / 2 per code) on top of the float budget;
     * only 2-bit and 4-bit codes are quantized */
    for (int qi = 0; qi < g; qi++) {
        double amax = 0;
        for (int c = 0; c < kd; c++) amax = fmax(amax, fabs((double)(Q[qi * kd + c] * scale[c])));
        double half = amax / 127.0 / 2.0;
        for (int t = 0; t < nt; t++) {
            double codes = 0;
            for (int c = 0; c < kd; c++) codes += kvq_code(cd.codes + (size_t)c * cstride, bits, t);
            qmag[qi * nt + t] = ops_qattn_q8_bits(bits) ? sc * half * codes * (1 + 1e-6) / TOL + mag[qi * nt + t]
                                                        : mag[qi * nt + t];
        }
    }
    /* each form: its reference against the exact sums, then its AVX2 version against the
     * reference's own output (within the float budget) */
    typedef void (*blk_fn)(const float *, int, int, const uint8_t *, size_t, const uint16_t *,
                           const uint16_t *, int, int, float, float *, int);
    const struct {
        const char *name;
        blk_fn ref, fast;
        const double *budget;
        double *worst;
    } form[2] = {{"blk_scores", ops_qattn_blk_scores_ref, ops_qattn_blk_scores_avx2, mag, &worst_ref},
                 {"blk_scores_q8", ops_qattn_blk_scores_q8_ref, ops_qattn_blk_scores_q8_avx2, qmag, &worst_q8}};
    double *exact = malloc(sizeof(double) * (size_t)(g * nt + 1));
    memcpy(exact, want, sizeof(double) * (size_t)(g * nt));
    for (int f = 0; f < 2; f++) {
        char what[96];
        memcpy(want, exact, sizeof(double) * (size_t)(g * nt));
        snprintf(what, sizeof what, "%s_ref b%d g%d kd%d nt%d", form[f].name, bits, g, kd, nt);
        fill_nan(S, (size_t)g * lds);
        form[f].ref(Q, g, kd, cd.codes, cstride, hs, hm, nt, bits, sc, S, lds);
        CHECKF(check_scores(what, S, want, form[f].budget, g, nt, lds, form[f].worst) == 0, "%s", what);
        if (!avx2) continue;
        for (int qi = 0; qi < g; qi++)
            for (int t = 0; t < nt; t++) want[qi * nt + t] = S[qi * lds + t];
        fill_nan(S, (size_t)g * lds);
        form[f].fast(Q, g, kd, cd.codes, cstride, hs, hm, nt, bits, sc, S, lds);
        snprintf(what, sizeof what, "%s_avx2 b%d g%d kd%d nt%d", form[f].name, bits, g, kd, nt);
        CHECKF(check_scores(what, S, want, mag, g, nt, lds, &worst_avx2) == 0, "%s", what);
    }
    free(exact);
    free(qmag);
    free(cd.base), free(Q), free(scale), free(min), free(hs), free(hm), free(S), free(want), free(mag), free(xh);
}

static void test_tok_scores(int bits, int g, int kd, int n, bool avx2) {
    size_t rb = kvq_code_bytes(bits, kd), rstride = rb + 1 + (size_t)rand_int(13);
    Codes cd = make_codes(n, rb, rstride);
    float *Q = falloc(g * kd), *scale = falloc(n), *min = falloc(n);
    uint16_t *hs = halloc(n), *hm = halloc(n);
    for (int i = 0; i < g * kd; i++) Q[i] = 2.0f * tu_randf();
    make_scales(scale, min, hs, hm, n);
    int lds = n + 1 + rand_int(9);
    float sc = 0.0883883f;
    float *S = falloc(g * lds), *xh = falloc(kd);
    double *want = malloc(sizeof(double) * (size_t)(g * n + 1));
    double *mag = malloc(sizeof(double) * (size_t)(g * n + 1));
    for (int t = 0; t < n; t++) {
        const uint8_t *row = cd.codes + (size_t)t * rstride;
        kvq_dequant_group(row, kd, bits, scale[t], min[t], xh);
        for (int qi = 0; qi < g; qi++) {
            double w = 0, m = 0;
            for (int c = 0; c < kd; c++) {
                double q = Q[qi * kd + c];
                w += q * xh[c];
                m += fabs(q * scale[t] * kvq_code(row, bits, c)) + fabs(q * min[t]);
            }
            want[qi * n + t] = sc * w;
            mag[qi * n + t] = sc * m;
        }
    }
    char what[96];
    snprintf(what, sizeof what, "tok_scores_ref b%d g%d kd%d n%d", bits, g, kd, n);
    fill_nan(S, (size_t)g * lds);
    ops_qattn_tok_scores_ref(Q, g, kd, cd.codes, rstride, hs, hm, n, bits, sc, S, lds);
    CHECKF(check_scores(what, S, want, mag, g, n, lds, &worst_ref) == 0, "%s", what);
    if (avx2) {
        for (int qi = 0; qi < g; qi++)
            for (int t = 0; t < n; t++) want[qi * n + t] = S[qi * lds + t];
        fill_nan(S, (size_t)g * lds);
        ops_qattn_tok_scores_avx2(Q, g, kd, cd.codes, rstride, hs, hm, n, bits, sc, S, lds);
        snprintf(what, sizeof what, "tok_scores_avx2 b%d g%d kd%d n%d", bits, g, kd, n);
        CHECKF(check_scores(what, S, want, mag, g, n, lds, &worst_avx2) == 0, "%s", what);
    }
    free(cd.base), free(Q), free(scale), free(min), free(hs), free(hm), free(S), free(want), free(mag), free(xh);
}

static int check_accum(const char *what, const float *O, const double *want, const double *mag,
                       int len, double *worst) {
    int bad = 0;
    for (int i = 0; i < len; i++) {
        double e = fabs((double)O[i] - want[i]);
        double r = e / (mag[i] + 1e-30);
        if (r > *worst || r != r) *worst = r != r ? INFINITY : r;
        if (!(e <= TOL * mag[i] + 1e-30)) {
            if (!bad)
                fprintf(stderr, "%s: O[%d] = %.9g, want %.9g (budget %g)\n", what, i, O[i],
                        want[i], TOL * mag[i]);
            bad++;
        }
    }
    return bad;
}

/* values in groups of vgs channels per row, each group with its own (scale, min) */
static void test_tok_accum(int bits, int g, int hd, int vgs, int n, bool avx2) {
    size_t rb = kvq_code_bytes(bits, hd), rstride = rb + 1 + (size_t)rand_int(13);
    int ng = hd / vgs;
    Codes cd = make_codes(n, rb, rstride);
    float *scale = falloc(n * ng), *min = falloc(n * ng);
    uint16_t *hs = halloc(n * ng), *hm = halloc(n * ng);
    make_scales(scale, min, hs, hm, n * ng);
    int lds = n + 1 + rand_int(9);
    /* P is a probability-like row per query; its padding is NaN and must not be used */
    float *P = falloc(g * lds);
    fill_nan(P, (size_t)g * lds);
    for (int qi = 0; qi < g; qi++)
        for (int t = 0; t < n; t++) P[qi * lds + t] = extreme ? 0.75f : 0.5f * (tu_randf() + 1.0f);
    /* O starts non-zero: the kernels add to it */
    float *O0 = falloc(g * hd), *O = falloc(g * hd), *xh = falloc(hd);
    for (int i = 0; i < g * hd; i++) O0[i] = 4.0f * tu_randf();
    double *want = malloc(sizeof(double) * (size_t)(g * hd));
    double *mag = malloc(sizeof(double) * (size_t)(g * hd));
    for (int i = 0; i < g * hd; i++) want[i] = O0[i], mag[i] = fabs(O0[i]);
    for (int t = 0; t < n; t++) {
        const uint8_t *row = cd.codes + (size_t)t * rstride;
        /* code by code: group k starts at bit k * vgs * bits, not on a byte for 3-bit codes
         * when vgs is not a multiple of 8 */
        for (int c = 0; c < hd; c++)
            xh[c] = (float)kvq_code(row, bits, c) * scale[t * ng + c / vgs] + min[t * ng + c / vgs];
        for (int qi = 0; qi < g; qi++) {
            double p = P[qi * lds + t];
            for (int c = 0; c < hd; c++) {
                int k = t * ng + c / vgs;
                want[qi * hd + c] += p * xh[c];
                mag[qi * hd + c] += fabs(p * scale[k] * kvq_code(row, bits, c)) + fabs(p * min[k]);
            }
        }
    }
    /* the int8 form's budget (ops.h): per block of OPS_Q8_ROWS rows the weights p * scale move
     * by at most half their step, on top of the float budget */
    bool q8 = ops_qattn_q8_bits(bits) && vgs % 32 == 0;
    double *qmag = calloc((size_t)(g * hd), sizeof(double));
    for (int qi = 0; qi < g; qi++)
        for (int j0 = 0; j0 < n; j0 += OPS_Q8_ROWS) {
            int j1 = j0 + OPS_Q8_ROWS < n ? j0 + OPS_Q8_ROWS : n;
            double amax[256] = {0}; /* per value group */
            for (int t = j0; t < j1; t++)
                for (int k = 0; k < ng; k++)
                    amax[k] = fmax(amax[k], fabs((double)(P[qi * lds + t] * scale[t * ng + k])));
            for (int t = j0; t < j1; t++)
                for (int c = 0; c < hd; c++)
                    qmag[qi * hd + c] += amax[c / vgs] / 127.0 / 2.0 * kvq_code(cd.codes + (size_t)t * rstride, bits, c);
        }
    for (int i = 0; i < g * hd; i++) qmag[i] = q8 ? qmag[i] * (1 + 1e-6) / TOL + mag[i] : mag[i];
    /* each form: its reference against the exact sums, then its AVX2 version against the
     * reference's own output (within the float budget); n == 0 must leave O as it was */
    typedef void (*acc_fn)(const float *, int, int, int, const uint8_t *, size_t, const uint16_t *,
                           const uint16_t *, int, int, int, float *);
    const struct {
        const char *name;
        acc_fn ref, fast;
        const double *budget;
        double *worst;
    } form[2] = {{"tok_accum", ops_qattn_tok_accum_ref, ops_qattn_tok_accum_avx2, mag, &worst_ref},
                 {"tok_accum_q8", ops_qattn_tok_accum_q8_ref, ops_qattn_tok_accum_q8_avx2, qmag, &worst_q8}};
    double *exact = malloc(sizeof(double) * (size_t)(g * hd));
    memcpy(exact, want, sizeof(double) * (size_t)(g * hd));
    for (int f = 0; f < 2; f++) {
        char what[96];
        memcpy(want, exact, sizeof(double) * (size_t)(g * hd));
        snprintf(what, sizeof what, "%s_ref b%d g%d hd%d gs%d n%d", form[f].name, bits, g, hd, vgs, n);
        memcpy(O, O0, sizeof(float) * (size_t)(g * hd));
        form[f].ref(P, g, n, lds, cd.codes, rstride, hs, hm, hd, vgs, bits, O);
        CHECKF(check_accum(what, O, want, form[f].budget, g * hd, form[f].worst) == 0, "%s", what);
        if (n == 0) CHECK(memcmp(O, O0, sizeof(float) * (size_t)(g * hd)) == 0);
        if (!avx2) continue;
        for (int i = 0; i < g * hd; i++) want[i] = O[i];
        memcpy(O, O0, sizeof(float) * (size_t)(g * hd));
        form[f].fast(P, g, n, lds, cd.codes, rstride, hs, hm, hd, vgs, bits, O);
        snprintf(what, sizeof what, "%s_avx2 b%d g%d hd%d gs%d n%d", form[f].name, bits, g, hd, vgs, n);
        CHECKF(check_accum(what, O, want, mag, g * hd, &worst_avx2) == 0, "%s", what);
        if (n == 0) CHECK(memcmp(O, O0, sizeof(float) * (size_t)(g * hd)) == 0);
    }
    free(exact);
    free(qmag);
    free(cd.base), free(scale), free(min), free(hs), free(hm), free(P), free(O0), free(O), free(xh), free(want),
        free(mag);
}

/* The contract's own words on one tiny case computed by hand: 2-bit, one channel/row. */
static void test_by_hand(void) {
    /* codes 0..3 then 3,2,1,0 for 8 tokens: bytes 0b11100100, 0b00011011 */
    const uint8_t codes[2] = {0xE4, 0x1B};
    const float q[1] = {2.0f};
    const uint16_t scale[1] = {0x3800 /* 0.5 */}, min[1] = {0xBC00 /* -1 */};
    float S[8];
    ops_qattn_blk_scores_ref(q, 1, 1, codes, 2, scale, min, 8, 2, 0.5f, S, 8);
    const float want[8] = {-1.0f, -0.5f, 0.0f, 0.5f, 0.5f, 0.0f, -0.5f, -1.0f};
    CHECK(memcmp(S, want, sizeof S) == 0);
}

int main(void) {
    ops_init();
    bool avx2 = kvs_cpu_has_avx2();
    if (avx2) {
        CHECK(ops_qattn_blk_scores == ops_qattn_blk_scores_q8_avx2);
        CHECK(ops_qattn_tok_scores == ops_qattn_tok_scores_avx2);
        CHECK(ops_qattn_tok_accum == ops_qattn_tok_accum_q8_avx2);
    } else {
        fprintf(stderr, "test_qattn: no AVX2, checking the references only\n");
    }
    ops_force_ref(true);
    CHECK(ops_qattn_blk_scores == ops_qattn_blk_scores_ref);
    CHECK(ops_qattn_tok_scores == ops_qattn_tok_scores_ref);
    CHECK(ops_qattn_tok_accum == ops_qattn_tok_accum_ref);
    ops_force_ref(false);
    test_by_hand();
    for (int b = 0; b < COUNT(BITS); b++)
        for (int gi = 0; gi < COUNT(GS); gi++)
            for (int d = 0; d < COUNT(DS); d++)
                for (int k = 0; k < COUNT(NS); k++) {
                    test_blk_scores(BITS[b], GS[gi], DS[d], NS[k], avx2);
                    test_tok_scores(BITS[b], GS[gi], DS[d], NS[k], avx2);
                    for (int v = 0; v < COUNT(VGS); v++) {
                        int vgs = VGS[v] ? VGS[v] : DS[d];
                        if (DS[d] % vgs == 0 && (VGS[v] == 0 || vgs != DS[d]))
                            test_tok_accum(BITS[b], GS[gi], DS[d], vgs, NS[k], avx2);
                    }
                }
    /* a group size that is not a multiple of 8: the AVX2 version falls back to the reference */
    for (int b = 0; b < COUNT(BITS); b++) test_tok_accum(BITS[b], 3, 40, 4, 33, avx2);
    /* a long KIVI block and many rows: several tiles, query blocks of 16 and 6 */
    for (int b = 0; b < COUNT(BITS); b++) {
        test_blk_scores(BITS[b], 64, 64, 257, avx2);
        test_tok_scores(BITS[b], 64, 128, 301, avx2);
        test_tok_accum(BITS[b], 64, 128, 128, 301, avx2);
        test_tok_accum(BITS[b], 64, 128, 32, 301, avx2);
    }
    /* the int8 forms' widest sums: 256 channels, 301 rows, all at their maximum */
    extreme = true;
    for (int b = 0; b < COUNT(BITS); b++) {
        test_blk_scores(BITS[b], 5, 256, 257, avx2);
        test_tok_accum(BITS[b], 5, 256, 256, 301, avx2);
        test_tok_accum(BITS[b], 5, 256, 32, 301, avx2);
    }
    extreme = false;
    fprintf(stderr, "test_qattn: worst error / budget scale: ref %.3g, avx2 %.3g (limit %g)%s; "
            "int8 forms against the exact sums %.3g of their bound\n",
            worst_ref, worst_avx2, TOL, avx2 ? "" : " (avx2 skipped)", worst_q8 / TOL);
    return tu_finish("test_qattn");
}
