/* test_kv_quant.c — the KIVI quantizer (src/kv/kv_quant.c) against plain arithmetic:
 *  - round trip: every element within half a step (scale / 2) of its input, plus the fp16
 *    rounding of the stored min and scale, codes in range; the scale is (hi - lo) / (2^b - 1)
 *    to fp16 precision and the min is lo rounded to fp16; the error power is step^2 / 12
 *    and the relative RMS error within a budget per bit width;
 *  - constant groups reconstruct exactly, with scale 0 and no NaN;
 *  - extremes are near exact (to the fp16 rounding of min and scale);
 *  - fused key scores and value accumulation equal dequantize-then-compute (to float rounding).
 * No model needed. */
#include "ops.h"
#include "quant.h"
#include "testutil.h"
#include "kv/kv_quant.h"

#include <stdint.h>
#include <string.h>

static float gauss(void) { /* sum of uniforms: roughly normal, unit variance */
    float s = 0;
    for (int i = 0; i < 12; i++) s += tu_randf() * 0.5f;
    return s;
}

/* The rounding error of a uniform quantizer is about uniform on [-step/2, step/2]: its mean
 * square should be near step^2 / 12 (checked for 3, 4 and 8 bits; 2 bits has too few levels for
 * that); every element must be within half a step. */
static void test_round_trip(int bits) {
    enum { N = 64 };
    float x[N], y[N];
    uint8_t codes[N];
    double err2 = 0, ref2 = 0, theo = 0;
    for (int trial = 0; trial < 200; trial++) {
        float amp = (float)(trial % 7 + 1) * 0.37f, off = tu_randf() * 3;
        for (int i = 0; i < N; i++) x[i] = off + amp * gauss();
        if (trial % 10 == 0) x[trial % N] *= 20; /* an outlier */
        uint16_t hs, hm;
        kvq_quant_group(x, N, 1, bits, codes, &hs, &hm);
        float s = quant_f16_to_f32(hs), m = quant_f16_to_f32(hm);
        kvq_dequant_group(codes, N, bits, s, m, y);
        theo += N * (double)s * s / 12;
        float lo = x[0], hi = x[0];
        for (int i = 0; i < N; i++) lo = x[i] < lo ? x[i] : lo, hi = x[i] > hi ? x[i] : hi;
        int qmax = (1 << bits) - 1;
        /* fp16 keeps 11 significant bits: min within half an ulp of lo, scale within half an ulp
         * of (hi - m) / qmax */
        double ulp_m = fabs(lo) * 0x1p-11, s_want = (hi - m) / qmax;
        CHECKF(fabs(m - lo) <= ulp_m, "b=%d: min %g for lo %g", bits, m, lo);
        CHECKF(fabs(s - s_want) <= s_want * 0x1p-11, "b=%d: scale %g, (hi - lo) / qmax = %g", bits,
               s, s_want);
        /* half a step, plus what the rounded min and scale move the ends by */
        double tol = s * 0.5 + ulp_m + qmax * s_want * 0x1p-11 + 1e-6;
        for (int i = 0; i < N; i++) {
            CHECK(kvq_code(codes, bits, i) <= qmax);
            CHECKF(fabsf(y[i] - x[i]) <= tol, "b=%d: |%g - %g| > %g", bits, y[i], x[i], tol);
            err2 += (double)(y[i] - x[i]) * (y[i] - x[i]);
            ref2 += (double)(x[i] - off) * (x[i] - off);
        }
        /* the extremes are representable up to that rounding */
        for (int i = 0; i < N; i++)
            if (x[i] == lo || x[i] == hi) CHECK(fabsf(y[i] - x[i]) <= tol - s * 0.5);
    }
    double rel = sqrt(err2 / ref2), ratio = err2 / theo;
    if (bits >= 3) CHECKF(ratio > 0.7 && ratio < 1.3, "b=%d: error power %.3f of step^2/12", bits, ratio);
    /* relative RMS error budget per bit width: measured 0.0081 (8 bits), 0.134 (4), 0.284 (3),
     * 0.559 (2) on this data (seeded), budget 1.2x that */
    double budget = bits == 8 ? 0.0097 : bits == 4 ? 0.161 : bits == 3 ? 0.341 : 0.671;
    CHECKF(rel < budget, "b=%d: relative RMS error %.4f (budget %.4f)", bits, rel, budget);
    fprintf(stderr, "  b=%d: relative RMS error %.4f (budget %.4f), error power %.3f of "
            "step^2/12\n", bits, rel, budget, ratio);
}

static void test_constant(int bits) {
    float x[33], y[33];
    uint8_t codes[33];
    for (int i = 0; i < 33; i++) x[i] = -2.5f;
    uint16_t s = 1, m = 0;
    kvq_quant_group(x, 33, 1, bits, codes, &s, &m);
    CHECK(s == 0 && quant_f16_to_f32(m) == -2.5f);
    kvq_dequant_group(codes, 33, bits, quant_f16_to_f32(s), quant_f16_to_f32(m), y);
    for (int i = 0; i < 33; i++) CHECK(y[i] == -2.5f && !isnan(y[i]));
    /* a single element group */
    s = 1;
    kvq_quant_group(x, 1, 1, bits, codes, &s, &m);
    CHECK(s == 0 && quant_f16_to_f32(m) == -2.5f);
}

static void test_fused(int bits) {
    enum { G = 32, HD = 64 };
    float k[G * HD], v[HD], q[HD], kh[G * HD], vh[HD], ref[G], got[G];
    uint8_t kc[HD * G], vc[HD];
    uint16_t ks[HD], km[HD], vs, vm;
    for (int i = 0; i < G * HD; i++) k[i] = gauss() * (i % HD == 5 ? 8.0f : 1.0f); /* an outlier channel */
    for (int i = 0; i < HD; i++) q[i] = gauss(), v[i] = gauss();
    kvq_quant_keys(k, G, HD, bits, kvq_code_bytes(bits, G), kc, ks, km);
    /* dequantize channel by channel, then plain dot products */
    size_t cb = kvq_code_bytes(bits, G);
    for (int c = 0; c < HD; c++) {
        float col[G];
        kvq_dequant_group(kc + c * cb, G, bits, quant_f16_to_f32(ks[c]), quant_f16_to_f32(km[c]), col);
        for (int t = 0; t < G; t++) kh[t * HD + c] = col[t];
    }
    for (int t = 0; t < G; t++) {
        double s = 0;
        for (int c = 0; c < HD; c++) s += (double)q[c] * kh[t * HD + c];
        ref[t] = (float)s;
    }
    ops_qattn_blk_scores_ref(q, 1, HD, kc, cb, ks, km, G, bits, 1.0f, got, G);
    for (int t = 0; t < G; t++)
        CHECKF(fabsf(got[t] - ref[t]) <= 1e-4f * (fabsf(ref[t]) + 1), "b=%d t=%d: %g vs %g", bits,
               t, got[t], ref[t]);
    /* per-channel grouping bounds each key element by its own channel's half step (plus the
     * fp16 rounding of its min and scale) */
    for (int t = 0; t < G; t++)
        for (int c = 0; c < HD; c++) {
            float sc = quant_f16_to_f32(ks[c]), mn = quant_f16_to_f32(km[c]);
            CHECK(fabsf(kh[t * HD + c] - k[t * HD + c]) <=
                  sc * 0.5001f + fabsf(mn) * 0x1p-11f + sc * ((1 << bits) - 1) * 0x1p-11f + 1e-6f);
        }
    /* values */
    kvq_quant_group(v, HD, 1, bits, vc, &vs, &vm);
    kvq_dequant_group(vc, HD, bits, quant_f16_to_f32(vs), quant_f16_to_f32(vm), vh);
    float o1[HD] = {0}, o2[HD] = {0};
    float p[2] = {0.3f, 0.7f};
    uint16_t sv[2] = {vs, vs}, mv[2] = {vm, vm};
    uint8_t vc2[2 * HD];
    memcpy(vc2, vc, kvq_code_bytes(bits, HD)), memcpy(vc2 + kvq_code_bytes(bits, HD), vc, kvq_code_bytes(bits, HD));
    ops_qattn_tok_accum_ref(p, 1, 2, 2, vc2, kvq_code_bytes(bits, HD), sv, mv, HD, HD, bits, o1);
    for (int c = 0; c < HD; c++) o2[c] = vh[c]; /* 0.3 + 0.7 = 1 */
    for (int c = 0; c < HD; c++) CHECK(fabsf(o1[c] - o2[c]) <= 1e-5f * (fabsf(o2[c]) + 1));
    CHECK(kvq_code_bytes(bits, G) * 8 == (size_t)G * bits);
}

/* the bit stream: every code reads back what was put, at every offset, including the 3-bit
 * codes that cross a byte, and putting one code leaves its neighbours alone */
static void test_bitstream(int bits) {
    enum { N = 67 };
    uint8_t codes[N + 1];
    int want[N];
    memset(codes, 0, sizeof codes);
    size_t nb = kvq_code_bytes(bits, N);
    codes[nb] = 0xA5; /* a guard byte after the stream */
    for (int i = 0; i < N; i++) {
        want[i] = (int)(tu_rand_u64() % (1u << bits));
        kvq_put(codes, bits, i, want[i]);
        for (int j = 0; j <= i; j++) CHECKF(kvq_code(codes, bits, j) == want[j], "b=%d put %d read %d", bits, i, j);
    }
    CHECK(codes[nb] == 0xA5);
    /* the layout: code i at bits [i b, i b + b) of the little-endian stream */
    for (int i = 0; i < N; i++) {
        int v = 0;
        for (int k = 0; k < bits; k++) {
            size_t bit = (size_t)i * bits + k;
            v |= ((codes[bit / 8] >> (bit % 8)) & 1) << k;
        }
        CHECK(v == want[i]);
    }
}

int main(void) {
    test_round_trip(8);
    test_round_trip(4);
    test_round_trip(3);
    test_round_trip(2);
    static const int all[] = {2, 3, 4, 8};
    for (int i = 0; i < 4; i++) {
        test_bitstream(all[i]);
        test_constant(all[i]);
        test_fused(all[i]);
    }
    CHECK(kvq_bits_ok(2) && kvq_bits_ok(3) && kvq_bits_ok(4) && kvq_bits_ok(8) && !kvq_bits_ok(5) &&
          !kvq_bits_ok(1));
    return tu_finish("test_kv_quant");
}
