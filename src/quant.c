/* quant.c — type traits, scalar reference kernels (the oracle), dispatch, fp16 helpers.
 *
 * Reference semantics (shared with quant_avx2.c, which must agree):
 *  - activation quantizers Q8_0/Q8_1/Q8_K round half to even (qi_nearest_int) so that the AVX2
 *    versions (_mm256_round_ps) are bit-identical;
 *  - weight quantizers are plain round-to-nearest with per-block scales (K-quants: a few rounds of
 *    least-squares refinement per group); they exist to build test data and for tools;
 *  - vec_dot: exact integer sums per block, scaled and accumulated in double.
 */
#include <math.h>
#include <pthread.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <stdbool.h>
#include "base.h"
#include "quant_internal.h"

/* ---- traits ------------------------------------------------------------------------------ */

static const struct quant_traits traits_tab[QT_COUNT] = {
    [QT_F32] = {"F32", 1, 4, QT_F32, true},
    [QT_F16] = {"F16", 1, 2, QT_F32, true},
    [QT_BF16] = {"BF16", 1, 2, QT_F32, true},
    [QT_Q4_0] = {"Q4_0", QK32, sizeof(blk_q4_0), QT_Q8_0, true},
    [QT_Q4_1] = {"Q4_1", QK32, sizeof(blk_q4_1), QT_Q8_1, true},
    [QT_Q5_0] = {"Q5_0", QK32, sizeof(blk_q5_0), QT_Q8_0, true},
    [QT_Q5_1] = {"Q5_1", QK32, sizeof(blk_q5_1), QT_Q8_1, true},
    [QT_Q8_0] = {"Q8_0", QK32, sizeof(blk_q8_0), QT_Q8_0, true},
    [QT_Q8_1] = {"Q8_1", QK32, sizeof(blk_q8_1), QT_Q8_1, false},
    [QT_Q2_K] = {"Q2_K", QK_K, sizeof(blk_q2_K), QT_Q8_K, true},
    [QT_Q3_K] = {"Q3_K", QK_K, sizeof(blk_q3_K), QT_Q8_K, true},
    [QT_Q4_K] = {"Q4_K", QK_K, sizeof(blk_q4_K), QT_Q8_K, true},
    [QT_Q5_K] = {"Q5_K", QK_K, sizeof(blk_q5_K), QT_Q8_K, true},
    [QT_Q6_K] = {"Q6_K", QK_K, sizeof(blk_q6_K), QT_Q8_K, true},
    [QT_Q8_K] = {"Q8_K", QK_K, sizeof(blk_q8_K), QT_Q8_K, false},
};

const struct quant_traits *quant_get_traits(int t) {
    if (t < 0 || t >= QT_COUNT || !traits_tab[t].name) return NULL;
    return &traits_tab[t];
}

size_t quant_row_bytes(int t, int64_t n) {
    const struct quant_traits *tr = quant_get_traits(t);
    if (!tr || n < 0 || n % tr->block_size) return 0;
    return (size_t)(n / tr->block_size) * tr->type_size;
}

/* ---- fp16 ------------------------------------------------------------------------------- */

float quant_f16_to_f32(uint16_t h) { return qi_f16_to_f32(h); }
uint16_t quant_f32_to_f16(float f) { return qi_f32_to_f16(f); }

static void f16_to_f32_row_ref(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = qi_f16_to_f32(src[i]);
}
static void f32_to_f16_row_ref(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = qi_f32_to_f16(src[i]);
}

#define F16(x) qi_f16_to_f32(x)

/* ---- reference dequantization ------------------------------------------------------------ */

static void deq_f32(const void *src, float *y, int64_t n) { memcpy(y, src, (size_t)n * 4); }
static void deq_f16(const void *src, float *y, int64_t n) {
    const uint16_t *s = src;
    for (int64_t i = 0; i < n; i++) y[i] = qi_f16_to_f32(s[i]);
}
static void deq_bf16(const void *src, float *y, int64_t n) {
    const uint16_t *s = src;
    for (int64_t i = 0; i < n; i++) y[i] = qi_bf16_to_f32(s[i]);
}

static void deq_q4_0(const void *src, float *y, int64_t n) {
    const blk_q4_0 *b = src;
    for (int64_t i = 0; i < n / QK32; i++, y += QK32) {
        float d = F16(b[i].d);
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((b[i].qs[j] & 15) - 8) * d;
            y[j + 16] = (float)((b[i].qs[j] >> 4) - 8) * d;
        }
    }
}

static void deq_q4_1(const void *src, float *y, int64_t n) {
    const blk_q4_1 *b = src;
    for (int64_t i = 0; i < n / QK32; i++, y += QK32) {
        float d = F16(b[i].d), m = F16(b[i].m);
        for (int j = 0; j < 16; j++) {
            y[j] = (float)(b[i].qs[j] & 15) * d + m;
            y[j + 16] = (float)(b[i].qs[j] >> 4) * d + m;
        }
    }
}

/* 5-bit values of a Q5_0/Q5_1 block, natural order */
static void q5_unpack(const uint8_t qh4[4], const uint8_t qs[16], int q[32]) {
    uint32_t qh = qi_load_u32(qh4);
    for (int j = 0; j < 16; j++) {
        q[j] = (qs[j] & 15) | (int)(((qh >> j) & 1u) << 4);
        q[j + 16] = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
    }
}

static void deq_q5_0(const void *src, float *y, int64_t n) {
    const blk_q5_0 *b = src;
    int q[32];
    for (int64_t i = 0; i < n / QK32; i++, y += QK32) {
        float d = F16(b[i].d);
        q5_unpack(b[i].qh, b[i].qs, q);
        for (int j = 0; j < 32; j++) y[j] = (float)(q[j] - 16) * d;
    }
}

static void deq_q5_1(const void *src, float *y, int64_t n) {
    const blk_q5_1 *b = src;
    int q[32];
    for (int64_t i = 0; i < n / QK32; i++, y += QK32) {
        float d = F16(b[i].d), m = F16(b[i].m);
        q5_unpack(b[i].qh, b[i].qs, q);
        for (int j = 0; j < 32; j++) y[j] = (float)q[j] * d + m;
    }
}

static void deq_q8_0(const void *src, float *y, int64_t n) {
    const blk_q8_0 *b = src;
    for (int64_t i = 0; i < n / QK32; i++, y += QK32) {
        float d = F16(b[i].d);
        for (int j = 0; j < 32; j++) y[j] = (float)b[i].qs[j] * d;
    }
}

static void deq_q8_1(const void *src, float *y, int64_t n) {
    const blk_q8_1 *b = src;
    for (int64_t i = 0; i < n / QK32; i++, y += QK32) {
        float d = F16(b[i].d);
        for (int j = 0; j < 32; j++) y[j] = (float)b[i].qs[j] * d;
    }
}

/* K-quant unpackers: q values in natural element order plus per-group scales. */
static void q2k_unpack(const blk_q2_K *b, uint8_t q[256]) {
    for (int e = 0; e < 256; e++) {
        int n = e >> 7, j = (e & 127) >> 5, l = e & 31;
        q[e] = (b->qs[32 * n + l] >> (2 * j)) & 3;
    }
}
static void q3k_unpack(const blk_q3_K *b, int8_t q[256], int8_t sc[16]) {
    for (int e = 0; e < 256; e++) {
        int n = e >> 7, j = (e & 127) >> 5, l = e & 31;
        int lo = (b->qs[32 * n + l] >> (2 * j)) & 3;
        int hi = (b->hmask[l] >> (4 * n + j)) & 1;
        q[e] = (int8_t)(lo + 4 * hi - 4);
    }
    qi_unpack_q3k_scales(b->scales, sc);
}
static void q4k_unpack(const blk_q4_K *b, uint8_t q[256]) {
    for (int e = 0; e < 256; e++) {
        int c = e >> 6, l = e & 63;
        q[e] = l < 32 ? (b->qs[32 * c + l] & 15) : (b->qs[32 * c + l - 32] >> 4);
    }
}
static void q5k_unpack(const blk_q5_K *b, uint8_t q[256]) {
    for (int e = 0; e < 256; e++) {
        int c = e >> 6, l = e & 63;
        int lo = l < 32 ? (b->qs[32 * c + l] & 15) : (b->qs[32 * c + l - 32] >> 4);
        int hi = (b->qh[l & 31] >> (2 * c + (l >> 5))) & 1;
        q[e] = (uint8_t)(lo | (hi << 4));
    }
}
static void q6k_unpack(const blk_q6_K *b, int8_t q[256]) {
    for (int e = 0; e < 256; e++) {
        int n = e >> 7, k = (e & 127) >> 5, l = e & 31;
        const uint8_t *ql = b->ql + 64 * n, *qh = b->qh + 32 * n;
        int lo = (k & 1) ? ql[l + 32] : ql[l];
        lo = (k & 2) ? lo >> 4 : lo & 15;
        int hi = (qh[l] >> (2 * k)) & 3;
        q[e] = (int8_t)((lo | (hi << 4)) - 32);
    }
}

static void deq_q2_K(const void *src, float *y, int64_t n) {
    const blk_q2_K *b = src;
    uint8_t q[256];
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {
        float d = F16(b[i].d), dmin = F16(b[i].dmin);
        q2k_unpack(&b[i], q);
        for (int g = 0; g < 16; g++) {
            float dl = d * (float)(b[i].scales[g] & 15), ml = dmin * (float)(b[i].scales[g] >> 4);
            for (int l = 0; l < 16; l++) y[16 * g + l] = dl * (float)q[16 * g + l] - ml;
        }
    }
}

static void deq_q3_K(const void *src, float *y, int64_t n) {
    const blk_q3_K *b = src;
    int8_t q[256], sc[16];
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {
        float d = F16(b[i].d);
        q3k_unpack(&b[i], q, sc);
        for (int g = 0; g < 16; g++) {
            float dl = d * (float)sc[g];
            for (int l = 0; l < 16; l++) y[16 * g + l] = dl * (float)q[16 * g + l];
        }
    }
}

static void deq_q4_K(const void *src, float *y, int64_t n) {
    const blk_q4_K *b = src;
    uint8_t q[256], sc[8], mn[8];
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {
        float d = F16(b[i].d), dmin = F16(b[i].dmin);
        q4k_unpack(&b[i], q);
        qi_unpack_k4_scales(b[i].scales, sc, mn);
        for (int g = 0; g < 8; g++) {
            float dl = d * (float)sc[g], ml = dmin * (float)mn[g];
            for (int l = 0; l < 32; l++) y[32 * g + l] = dl * (float)q[32 * g + l] - ml;
        }
    }
}

static void deq_q5_K(const void *src, float *y, int64_t n) {
    const blk_q5_K *b = src;
    uint8_t q[256], sc[8], mn[8];
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {
        float d = F16(b[i].d), dmin = F16(b[i].dmin);
        q5k_unpack(&b[i], q);
        qi_unpack_k4_scales(b[i].scales, sc, mn);
        for (int g = 0; g < 8; g++) {
            float dl = d * (float)sc[g], ml = dmin * (float)mn[g];
            for (int l = 0; l < 32; l++) y[32 * g + l] = dl * (float)q[32 * g + l] - ml;
        }
    }
}

static void deq_q6_K(const void *src, float *y, int64_t n) {
    const blk_q6_K *b = src;
    int8_t q[256];
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {
        float d = F16(b[i].d);
        q6k_unpack(&b[i], q);
        for (int g = 0; g < 16; g++) {
            float dl = d * (float)b[i].scales[g];
            for (int l = 0; l < 16; l++) y[16 * g + l] = dl * (float)q[16 * g + l];
        }
    }
}

static void deq_q8_K(const void *src, float *y, int64_t n) {
    const blk_q8_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K)
        for (int j = 0; j < QK_K; j++) y[j] = b[i].d * (float)b[i].qs[j];
}

/* ---- reference quantization -------------------------------------------------------------- */

static void qnt_f32(const float *x, void *dst, int64_t n) { memcpy(dst, x, (size_t)n * 4); }
static void qnt_f16(const float *x, void *dst, int64_t n) { f32_to_f16_row_ref(x, dst, n); }
static void qnt_bf16(const float *x, void *dst, int64_t n) {
    uint16_t *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = qi_f32_to_bf16(x[i]);
}

/* the element of largest magnitude; on a tie the positive one (order-independent) */
static float signed_absmax(const float *x, int n) {
    float amax = 0;
    for (int j = 0; j < n; j++) amax = fmaxf(amax, fabsf(x[j]));
    for (int j = 0; j < n; j++)
        if (x[j] == amax) return amax;
    return -amax;
}

static int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

static void qnt_q4_0(const float *x, void *dst, int64_t n) {
    blk_q4_0 *b = dst;
    for (int64_t i = 0; i < n / QK32; i++, x += QK32) {
        float mx = signed_absmax(x, 32);
        b[i].d = qi_f32_to_f16(mx / -8.0f);
        float d = F16(b[i].d), id = d != 0 ? 1.0f / d : 0.0f;
        for (int j = 0; j < 16; j++) {
            int q0 = clampi(qi_nearest_int(x[j] * id) + 8, 0, 15);
            int q1 = clampi(qi_nearest_int(x[j + 16] * id) + 8, 0, 15);
            b[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static void qnt_q4_1(const float *x, void *dst, int64_t n) {
    blk_q4_1 *b = dst;
    for (int64_t i = 0; i < n / QK32; i++, x += QK32) {
        float mn = x[0], mx = x[0];
        for (int j = 1; j < 32; j++) { mn = fminf(mn, x[j]); mx = fmaxf(mx, x[j]); }
        b[i].d = qi_f32_to_f16((mx - mn) / 15.0f);
        b[i].m = qi_f32_to_f16(mn);
        float d = F16(b[i].d), m = F16(b[i].m), id = d != 0 ? 1.0f / d : 0.0f;
        for (int j = 0; j < 16; j++) {
            int q0 = clampi(qi_nearest_int((x[j] - m) * id), 0, 15);
            int q1 = clampi(qi_nearest_int((x[j + 16] - m) * id), 0, 15);
            b[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static void q5_pack(const int q[32], uint8_t qh4[4], uint8_t qs[16]) {
    uint32_t qh = 0;
    for (int j = 0; j < 16; j++) {
        qs[j] = (uint8_t)((q[j] & 15) | ((q[j + 16] & 15) << 4));
        qh |= (uint32_t)((q[j] >> 4) & 1) << j;
        qh |= (uint32_t)((q[j + 16] >> 4) & 1) << (j + 16);
    }
    memcpy(qh4, &qh, 4);
}

static void qnt_q5_0(const float *x, void *dst, int64_t n) {
    blk_q5_0 *b = dst;
    int q[32];
    for (int64_t i = 0; i < n / QK32; i++, x += QK32) {
        float mx = signed_absmax(x, 32);
        b[i].d = qi_f32_to_f16(mx / -16.0f);
        float d = F16(b[i].d), id = d != 0 ? 1.0f / d : 0.0f;
        for (int j = 0; j < 32; j++) q[j] = clampi(qi_nearest_int(x[j] * id) + 16, 0, 31);
        q5_pack(q, b[i].qh, b[i].qs);
    }
}

static void qnt_q5_1(const float *x, void *dst, int64_t n) {
    blk_q5_1 *b = dst;
    int q[32];
    for (int64_t i = 0; i < n / QK32; i++, x += QK32) {
        float mn = x[0], mx = x[0];
        for (int j = 1; j < 32; j++) { mn = fminf(mn, x[j]); mx = fmaxf(mx, x[j]); }
        b[i].d = qi_f32_to_f16((mx - mn) / 31.0f);
        b[i].m = qi_f32_to_f16(mn);
        float d = F16(b[i].d), m = F16(b[i].m), id = d != 0 ? 1.0f / d : 0.0f;
        for (int j = 0; j < 32; j++) q[j] = clampi(qi_nearest_int((x[j] - m) * id), 0, 31);
        q5_pack(q, b[i].qh, b[i].qs);
    }
}

/* Activation quantizers: the AVX2 versions reproduce these bit for bit. */
static void qnt_q8_0(const float *x, void *dst, int64_t n) {
    blk_q8_0 *b = dst;
    for (int64_t i = 0; i < n / QK32; i++, x += QK32) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
        b[i].d = qi_f32_to_f16(d);
        for (int j = 0; j < 32; j++) b[i].qs[j] = (int8_t)qi_nearest_int(x[j] * id);
    }
}

static void qnt_q8_1(const float *x, void *dst, int64_t n) {
    blk_q8_1 *b = dst;
    for (int64_t i = 0; i < n / QK32; i++, x += QK32) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            int q = qi_nearest_int(x[j] * id);
            b[i].qs[j] = (int8_t)q;
            sum += q;
        }
        b[i].d = qi_f32_to_f16(d);
        b[i].s = qi_f32_to_f16(d * (float)sum);
    }
}

static void qnt_q8_K(const float *x, void *dst, int64_t n) {
    blk_q8_K *b = dst;
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K) {
        float mx = signed_absmax(x, QK_K);
        if (mx == 0) {
            memset(&b[i], 0, sizeof b[i]);
            continue;
        }
        float iscale = -127.0f / mx;
        for (int j = 0; j < QK_K; j++) {
            int q = qi_nearest_int(iscale * x[j]);
            b[i].qs[j] = (int8_t)(q > 127 ? 127 : q);
        }
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += b[i].qs[16 * g + l];
            b[i].bsums[g] = (int16_t)s;
        }
        b[i].d = 1.0f / iscale;
    }
}

/* Fit x ~ s*q + m with q in 0..nmax, s >= 0, m <= 0 (the K-quant group model). Starts from the
 * min/max fit and refines with a few least-squares rounds; returns s and -m (>= 0). */
static void fit_affine(const float *x, int n, int nmax, float *scale, float *negmin) {
    float mn = 0, mx = x[0];
    for (int j = 0; j < n; j++) { mn = fminf(mn, x[j]); mx = fmaxf(mx, x[j]); }
    if (mx <= mn) { *scale = 0; *negmin = -mn; return; }
    float best_s = (mx - mn) / (float)nmax, best_m = mn, best_err = INFINITY;
    float s = best_s, m = mn;
    for (int it = 0; it < 6; it++) {
        double sq = 0, sqq = 0, sx = 0, sxq = 0, err = 0;
        float is = s > 0 ? 1.0f / s : 0.0f;
        for (int j = 0; j < n; j++) {
            int q = clampi(qi_nearest_int((x[j] - m) * is), 0, nmax);
            double r = x[j] - (s * (float)q + m);
            err += r * r;
            sq += q; sqq += (double)q * q; sx += x[j]; sxq += (double)x[j] * q;
        }
        if (err < best_err) { best_err = (float)err; best_s = s; best_m = m; }
        /* least squares for (s, m) given q, keeping m <= 0 */
        double det = n * sqq - sq * sq;
        if (det <= 0) break;
        double ns = (n * sxq - sq * sx) / det, nm = (sx - ns * sq) / n;
        if (nm > 0) { nm = 0; ns = sqq > 0 ? sxq / sqq : 0; }
        if (ns <= 0) break;
        s = (float)ns; m = (float)nm;
    }
    *scale = best_s;
    *negmin = -best_m;
}

/* Quantize non-negative group parameters v[0..n) to integers 0..qmax with a shared fp16 factor;
 * returns the fp16 factor bits. */
static uint16_t quant_params(const float *v, int n, int qmax, uint8_t *out) {
    float mx = 0;
    for (int j = 0; j < n; j++) mx = fmaxf(mx, v[j]);
    uint16_t dh = qi_f32_to_f16(mx / (float)qmax);
    float d = F16(dh), id = d > 0 ? 1.0f / d : 0.0f;
    for (int j = 0; j < n; j++) out[j] = (uint8_t)clampi(qi_nearest_int(v[j] * id), 0, qmax);
    return dh;
}

/* symmetric: q in [-nneg, nneg-1]; scale maps the signed extreme to -nneg, then least squares */
static float fit_symmetric(const float *x, int n, int nneg) {
    float mx = signed_absmax(x, n);
    if (mx == 0) return 0;
    float s = mx / (float)-nneg, best_s = s, best_err = INFINITY;
    for (int it = 0; it < 4; it++) {
        double sxq = 0, sqq = 0, err = 0;
        for (int j = 0; j < n; j++) {
            int q = clampi(qi_nearest_int(x[j] / s), -nneg, nneg - 1);
            double r = x[j] - s * (float)q;
            err += r * r; sxq += (double)x[j] * q; sqq += (double)q * q;
        }
        if (err < best_err) { best_err = (float)err; best_s = s; }
        if (sqq <= 0 || sxq == 0) break;
        s = (float)(sxq / sqq);
    }
    return best_s;
}

static void qnt_q2_K(const float *x, void *dst, int64_t n) {
    blk_q2_K *b = dst;
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K) {
        float sc[16], mn[16];
        uint8_t qs[16], qm[16], q[256];
        for (int g = 0; g < 16; g++) fit_affine(x + 16 * g, 16, 3, &sc[g], &mn[g]);
        b[i].d = quant_params(sc, 16, 15, qs);
        b[i].dmin = quant_params(mn, 16, 15, qm);
        float d = F16(b[i].d), dmin = F16(b[i].dmin);
        for (int g = 0; g < 16; g++) {
            b[i].scales[g] = (uint8_t)(qs[g] | (qm[g] << 4));
            float dl = d * (float)qs[g], ml = dmin * (float)qm[g], il = dl > 0 ? 1.0f / dl : 0;
            for (int l = 0; l < 16; l++)
                q[16 * g + l] = (uint8_t)clampi(qi_nearest_int((x[16 * g + l] + ml) * il), 0, 3);
        }
        memset(b[i].qs, 0, sizeof b[i].qs);
        for (int e = 0; e < 256; e++) {
            int nn = e >> 7, j = (e & 127) >> 5, l = e & 31;
            b[i].qs[32 * nn + l] |= (uint8_t)(q[e] << (2 * j));
        }
    }
}

static void qnt_q3_K(const float *x, void *dst, int64_t n) {
    blk_q3_K *b = dst;
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K) {
        float sc[16];
        for (int g = 0; g < 16; g++) sc[g] = fit_symmetric(x + 16 * g, 16, 4);
        float mx = signed_absmax(sc, 16);
        b[i].d = qi_f32_to_f16(mx / -32.0f);
        float d = F16(b[i].d), id = d != 0 ? 1.0f / d : 0;
        int8_t s6[16];
        memset(b[i].scales, 0, 12);
        for (int g = 0; g < 16; g++) {
            int v = clampi(qi_nearest_int(sc[g] * id), -32, 31);
            s6[g] = (int8_t)v;
            int u = v + 32;
            if (g < 8) b[i].scales[g] |= (uint8_t)(u & 15);
            else b[i].scales[g - 8] |= (uint8_t)((u & 15) << 4);
            b[i].scales[8 + (g & 3)] |= (uint8_t)((u >> 4) << (2 * (g >> 2)));
        }
        memset(b[i].qs, 0, sizeof b[i].qs);
        memset(b[i].hmask, 0, sizeof b[i].hmask);
        for (int e = 0; e < 256; e++) {
            float dl = d * (float)s6[e >> 4];
            int q = dl != 0 ? clampi(qi_nearest_int(x[e] / dl), -4, 3) : 0;
            int u = q + 4, nn = e >> 7, j = (e & 127) >> 5, l = e & 31;
            b[i].qs[32 * nn + l] |= (uint8_t)((u & 3) << (2 * j));
            if (u & 4) b[i].hmask[l] |= (uint8_t)(1u << (4 * nn + j));
        }
    }
}

static void pack_k4_scales(const uint8_t sc[8], const uint8_t mn[8], uint8_t s[12]) {
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        s[j + 4] = (uint8_t)((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
        s[j + 8] = (uint8_t)((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
    }
}

/* Q4_K and Q5_K share the group model; bits = 4 or 5 */
static void qnt_k45(const float *x, uint16_t *dh, uint16_t *dminh, uint8_t scales[12],
                    uint8_t q[256], int bits) {
    int nmax = (1 << bits) - 1;
    float sc[8], mn[8];
    uint8_t qs[8], qm[8];
    for (int g = 0; g < 8; g++) fit_affine(x + 32 * g, 32, nmax, &sc[g], &mn[g]);
    *dh = quant_params(sc, 8, 63, qs);
    *dminh = quant_params(mn, 8, 63, qm);
    pack_k4_scales(qs, qm, scales);
    float d = F16(*dh), dmin = F16(*dminh);
    for (int g = 0; g < 8; g++) {
        float dl = d * (float)qs[g], ml = dmin * (float)qm[g], il = dl > 0 ? 1.0f / dl : 0;
        for (int l = 0; l < 32; l++)
            q[32 * g + l] = (uint8_t)clampi(qi_nearest_int((x[32 * g + l] + ml) * il), 0, nmax);
    }
}

static void qnt_q4_K(const float *x, void *dst, int64_t n) {
    blk_q4_K *b = dst;
    uint8_t q[256];
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K) {
        qnt_k45(x, &b[i].d, &b[i].dmin, b[i].scales, q, 4);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                b[i].qs[32 * c + l] = (uint8_t)(q[64 * c + l] | (q[64 * c + 32 + l] << 4));
    }
}

static void qnt_q5_K(const float *x, void *dst, int64_t n) {
    blk_q5_K *b = dst;
    uint8_t q[256];
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K) {
        qnt_k45(x, &b[i].d, &b[i].dmin, b[i].scales, q, 5);
        memset(b[i].qh, 0, sizeof b[i].qh);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                uint8_t a = q[64 * c + l], h = q[64 * c + 32 + l];
                b[i].qs[32 * c + l] = (uint8_t)((a & 15) | ((h & 15) << 4));
                b[i].qh[l] |= (uint8_t)(((a >> 4) << (2 * c)) | ((h >> 4) << (2 * c + 1)));
            }
    }
}

static void qnt_q6_K(const float *x, void *dst, int64_t n) {
    blk_q6_K *b = dst;
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K) {
        float sc[16];
        for (int g = 0; g < 16; g++) sc[g] = fit_symmetric(x + 16 * g, 16, 32);
        float mx = signed_absmax(sc, 16);
        b[i].d = qi_f32_to_f16(mx / -128.0f);
        float d = F16(b[i].d), id = d != 0 ? 1.0f / d : 0;
        for (int g = 0; g < 16; g++)
            b[i].scales[g] = (int8_t)clampi(qi_nearest_int(sc[g] * id), -128, 127);
        memset(b[i].ql, 0, sizeof b[i].ql);
        memset(b[i].qh, 0, sizeof b[i].qh);
        for (int e = 0; e < 256; e++) {
            float dl = d * (float)b[i].scales[e >> 4];
            int q = dl != 0 ? clampi(qi_nearest_int(x[e] / dl), -32, 31) : 0;
            int u = q + 32, nn = e >> 7, k = (e & 127) >> 5, l = e & 31;
            uint8_t *ql = b[i].ql + 64 * nn, *qh = b[i].qh + 32 * nn;
            int li = (k & 1) ? l + 32 : l;
            ql[li] |= (uint8_t)((u & 15) << ((k & 2) ? 4 : 0));
            qh[l] |= (uint8_t)((u >> 4) << (2 * k));
        }
    }
}

/* ---- reference dot products ------------------------------------------------------------- */

static float dot_f32(int64_t n, const void *w, const void *x) {
    const float *a = w, *b = x;
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return (float)s;
}
static float dot_f16(int64_t n, const void *w, const void *x) {
    const uint16_t *a = w;
    const float *b = x;
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)qi_f16_to_f32(a[i]) * b[i];
    return (float)s;
}
static float dot_bf16(int64_t n, const void *w, const void *x) {
    const uint16_t *a = w;
    const float *b = x;
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)qi_bf16_to_f32(a[i]) * b[i];
    return (float)s;
}

static float dot_q4_0(int64_t n, const void *w, const void *x) {
    const blk_q4_0 *a = w;
    const blk_q8_0 *b = x;
    double s = 0;
    for (int64_t i = 0; i < n / QK32; i++) {
        int is = 0;
        for (int j = 0; j < 16; j++)
            is += ((a[i].qs[j] & 15) - 8) * b[i].qs[j] + ((a[i].qs[j] >> 4) - 8) * b[i].qs[j + 16];
        s += (double)is * F16(a[i].d) * F16(b[i].d);
    }
    return (float)s;
}

static float dot_q4_1(int64_t n, const void *w, const void *x) {
    const blk_q4_1 *a = w;
    const blk_q8_1 *b = x;
    double s = 0;
    for (int64_t i = 0; i < n / QK32; i++) {
        int is = 0;
        for (int j = 0; j < 16; j++)
            is += (a[i].qs[j] & 15) * b[i].qs[j] + (a[i].qs[j] >> 4) * b[i].qs[j + 16];
        s += (double)is * F16(a[i].d) * F16(b[i].d) + (double)F16(a[i].m) * F16(b[i].s);
    }
    return (float)s;
}

static float dot_q5_0(int64_t n, const void *w, const void *x) {
    const blk_q5_0 *a = w;
    const blk_q8_0 *b = x;
    double s = 0;
    int q[32];
    for (int64_t i = 0; i < n / QK32; i++) {
        q5_unpack(a[i].qh, a[i].qs, q);
        int is = 0;
        for (int j = 0; j < 32; j++) is += (q[j] - 16) * b[i].qs[j];
        s += (double)is * F16(a[i].d) * F16(b[i].d);
    }
    return (float)s;
}

static float dot_q5_1(int64_t n, const void *w, const void *x) {
    const blk_q5_1 *a = w;
    const blk_q8_1 *b = x;
    double s = 0;
    int q[32];
    for (int64_t i = 0; i < n / QK32; i++) {
        q5_unpack(a[i].qh, a[i].qs, q);
        int is = 0;
        for (int j = 0; j < 32; j++) is += q[j] * b[i].qs[j];
        s += (double)is * F16(a[i].d) * F16(b[i].d) + (double)F16(a[i].m) * F16(b[i].s);
    }
    return (float)s;
}

static float dot_q8_0(int64_t n, const void *w, const void *x) {
    const blk_q8_0 *a = w;
    const blk_q8_0 *b = x;
    double s = 0;
    for (int64_t i = 0; i < n / QK32; i++) {
        int is = 0;
        for (int j = 0; j < 32; j++) is += a[i].qs[j] * b[i].qs[j];
        s += (double)is * F16(a[i].d) * F16(b[i].d);
    }
    return (float)s;
}

static float dot_q2_K(int64_t n, const void *w, const void *x) {
    const blk_q2_K *a = w;
    const blk_q8_K *b = x;
    double s = 0;
    uint8_t q[256];
    for (int64_t i = 0; i < n / QK_K; i++) {
        q2k_unpack(&a[i], q);
        int isum = 0, msum = 0;
        for (int g = 0; g < 16; g++) {
            int gs = 0;
            for (int l = 0; l < 16; l++) gs += q[16 * g + l] * b[i].qs[16 * g + l];
            isum += (a[i].scales[g] & 15) * gs;
            msum += (a[i].scales[g] >> 4) * b[i].bsums[g];
        }
        s += (double)b[i].d * ((double)F16(a[i].d) * isum - (double)F16(a[i].dmin) * msum);
    }
    return (float)s;
}

static float dot_q3_K(int64_t n, const void *w, const void *x) {
    const blk_q3_K *a = w;
    const blk_q8_K *b = x;
    double s = 0;
    int8_t q[256], sc[16];
    for (int64_t i = 0; i < n / QK_K; i++) {
        q3k_unpack(&a[i], q, sc);
        int isum = 0;
        for (int g = 0; g < 16; g++) {
            int gs = 0;
            for (int l = 0; l < 16; l++) gs += q[16 * g + l] * b[i].qs[16 * g + l];
            isum += sc[g] * gs;
        }
        s += (double)b[i].d * F16(a[i].d) * isum;
    }
    return (float)s;
}

static double dot_k45_block(const uint8_t q[256], const uint8_t scales[12], uint16_t dh,
                            uint16_t dminh, const blk_q8_K *b) {
    uint8_t sc[8], mn[8];
    qi_unpack_k4_scales(scales, sc, mn);
    int isum = 0, msum = 0;
    for (int g = 0; g < 8; g++) {
        int gs = 0;
        for (int l = 0; l < 32; l++) gs += q[32 * g + l] * b->qs[32 * g + l];
        isum += sc[g] * gs;
        msum += mn[g] * (b->bsums[2 * g] + b->bsums[2 * g + 1]);
    }
    return (double)b->d * ((double)F16(dh) * isum - (double)F16(dminh) * msum);
}

static float dot_q4_K(int64_t n, const void *w, const void *x) {
    const blk_q4_K *a = w;
    const blk_q8_K *b = x;
    double s = 0;
    uint8_t q[256];
    for (int64_t i = 0; i < n / QK_K; i++) {
        q4k_unpack(&a[i], q);
        s += dot_k45_block(q, a[i].scales, a[i].d, a[i].dmin, &b[i]);
    }
    return (float)s;
}

static float dot_q5_K(int64_t n, const void *w, const void *x) {
    const blk_q5_K *a = w;
    const blk_q8_K *b = x;
    double s = 0;
    uint8_t q[256];
    for (int64_t i = 0; i < n / QK_K; i++) {
        q5k_unpack(&a[i], q);
        s += dot_k45_block(q, a[i].scales, a[i].d, a[i].dmin, &b[i]);
    }
    return (float)s;
}

static float dot_q6_K(int64_t n, const void *w, const void *x) {
    const blk_q6_K *a = w;
    const blk_q8_K *b = x;
    double s = 0;
    int8_t q[256];
    for (int64_t i = 0; i < n / QK_K; i++) {
        q6k_unpack(&a[i], q);
        int isum = 0;
        for (int g = 0; g < 16; g++) {
            int gs = 0;
            for (int l = 0; l < 16; l++) gs += q[16 * g + l] * b[i].qs[16 * g + l];
            isum += a[i].scales[g] * gs;
        }
        s += (double)b[i].d * F16(a[i].d) * isum;
    }
    return (float)s;
}

/* ---- gemm as a loop over dot (qi_gemm_loop, quant_internal.h) --------------------------- */

static void gemm_ref(int t, const void *W, size_t w_row_bytes, int64_t n_cols, int r0, int r1,
                     const void *X, size_t x_row_bytes, int n_tok, float *Y, int64_t ldy) {
    qi_gemm_loop(quant_ref_kernels.dot[t], W, w_row_bytes, n_cols, r0, r1, X, x_row_bytes,
                    n_tok, Y, ldy);
}

/* ---- tables and dispatch ----------------------------------------------------------------- */

#define WEIGHT_ENTRIES(Q, D, N, T)                                                            \
    .dequant[Q] = D, .quant[Q] = N, .dot[Q] = T, .gemm[Q] = gemm_ref

const struct quant_kernels quant_ref_kernels = {
    WEIGHT_ENTRIES(QT_F32, deq_f32, qnt_f32, dot_f32),
    WEIGHT_ENTRIES(QT_F16, deq_f16, qnt_f16, dot_f16),
    WEIGHT_ENTRIES(QT_BF16, deq_bf16, qnt_bf16, dot_bf16),
    WEIGHT_ENTRIES(QT_Q4_0, deq_q4_0, qnt_q4_0, dot_q4_0),
    WEIGHT_ENTRIES(QT_Q4_1, deq_q4_1, qnt_q4_1, dot_q4_1),
    WEIGHT_ENTRIES(QT_Q5_0, deq_q5_0, qnt_q5_0, dot_q5_0),
    WEIGHT_ENTRIES(QT_Q5_1, deq_q5_1, qnt_q5_1, dot_q5_1),
    WEIGHT_ENTRIES(QT_Q8_0, deq_q8_0, qnt_q8_0, dot_q8_0),
    WEIGHT_ENTRIES(QT_Q2_K, deq_q2_K, qnt_q2_K, dot_q2_K),
    WEIGHT_ENTRIES(QT_Q3_K, deq_q3_K, qnt_q3_K, dot_q3_K),
    WEIGHT_ENTRIES(QT_Q4_K, deq_q4_K, qnt_q4_K, dot_q4_K),
    WEIGHT_ENTRIES(QT_Q5_K, deq_q5_K, qnt_q5_K, dot_q5_K),
    WEIGHT_ENTRIES(QT_Q6_K, deq_q6_K, qnt_q6_K, dot_q6_K),
    .dequant[QT_Q8_1] = deq_q8_1, .quant[QT_Q8_1] = qnt_q8_1,
    .dequant[QT_Q8_K] = deq_q8_K, .quant[QT_Q8_K] = qnt_q8_K,
    .f16_to_f32_row = f16_to_f32_row_ref,
    .f32_to_f16_row = f32_to_f16_row_ref,
};

static struct quant_kernels g_fast;   /* chosen at quant_init; a copy of the ref table before */
static const struct quant_kernels *g_active = &quant_ref_kernels;
static const struct quant_kernels *g_chosen = &quant_ref_kernels;
static bool g_has_avx2;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void init_once(void) {
    g_fast = quant_ref_kernels;
    g_has_avx2 = kvs_cpu_has_avx2(); /* base.c: cpuid + xgetbv, same on gcc and clang */
    if (g_has_avx2) quant_avx2_register(&g_fast);
    g_chosen = &g_fast;
    __atomic_store_n(&g_active, g_chosen, __ATOMIC_RELEASE);
}

void quant_init(void) { pthread_once(&g_once, init_once); }

void quant_force_ref(bool on) {
    quant_init();
    __atomic_store_n(&g_active, on ? &quant_ref_kernels : g_chosen, __ATOMIC_RELEASE);
}

bool quant_has_avx2(void) {
    quant_init();
    return g_has_avx2;
}

static inline const struct quant_kernels *K(void) {
    return __atomic_load_n(&g_active, __ATOMIC_ACQUIRE);
}

static void check_type(int t, bool need_weight) {
    const struct quant_traits *tr = quant_get_traits(t);
    KVS_ASSERT(tr != NULL);
    if (need_weight) KVS_ASSERT(tr->is_weight_type);
}

void quant_dequantize_row(int t, const void *src, float *dst, int64_t n) {
    check_type(t, false);
    KVS_ASSERT(n % traits_tab[t].block_size == 0);
    K()->dequant[t](src, dst, n);
}
void quant_dequantize_row_ref(int t, const void *src, float *dst, int64_t n) {
    check_type(t, false);
    KVS_ASSERT(n % traits_tab[t].block_size == 0);
    quant_ref_kernels.dequant[t](src, dst, n);
}

void quant_quantize_row(int t, const float *src, void *dst, int64_t n) {
    check_type(t, false);
    KVS_ASSERT(n % traits_tab[t].block_size == 0);
    K()->quant[t](src, dst, n);
}
void quant_quantize_row_ref(int t, const float *src, void *dst, int64_t n) {
    check_type(t, false);
    KVS_ASSERT(n % traits_tab[t].block_size == 0);
    quant_ref_kernels.quant[t](src, dst, n);
}

float quant_vec_dot(int t, int64_t n, const void *w_row, const void *x_row) {
    check_type(t, true);
    KVS_ASSERT(n % traits_tab[t].block_size == 0);
    return K()->dot[t](n, w_row, x_row);
}
float quant_vec_dot_ref(int t, int64_t n, const void *w_row, const void *x_row) {
    check_type(t, true);
    KVS_ASSERT(n % traits_tab[t].block_size == 0);
    return quant_ref_kernels.dot[t](n, w_row, x_row);
}

void quant_gemm(int t, const void *W, size_t w_row_bytes, int64_t n_cols, int r0, int r1,
                const void *X, size_t x_row_bytes, int n_tok, float *Y, int64_t ldy) {
    check_type(t, true);
    KVS_ASSERT(n_cols % traits_tab[t].block_size == 0);
    KVS_ASSERT(r0 >= 0 && r0 <= r1 && n_tok >= 0);
    if (r0 == r1 || n_tok == 0) return;
    if (n_cols == 0) { /* empty dot products */
        for (int k = 0; k < n_tok; k++)
            for (int r = r0; r < r1; r++) Y[(int64_t)k * ldy + r] = 0.0f;
        return;
    }
    K()->gemm[t](t, W, w_row_bytes, n_cols, r0, r1, X, x_row_bytes, n_tok, Y, ldy);
}

size_t quant_pack_bytes(int t, int64_t n_rows, int64_t n_cols) {
    const struct quant_kernels *k = K();
    return k->pack_bytes && k->gemm_packed ? k->pack_bytes(t, n_rows, n_cols) : 0;
}

void quant_pack(int t, const void *W, size_t w_row_bytes, int64_t n_rows, int64_t n_cols, void *dst) {
    KVS_ASSERT(quant_pack_bytes(t, n_rows, n_cols) > 0 && ((uintptr_t)dst & 31) == 0);
    K()->pack(t, W, w_row_bytes, n_rows, n_cols, dst);
}

void quant_gemm_packed(int t, const void *W, const void *P, size_t w_row_bytes, int64_t n_cols,
                       int r0, int r1, const void *X, size_t x_row_bytes, int n_tok, float *Y,
                       int64_t ldy) {
    const struct quant_kernels *k = K();
    if (P && k->gemm_packed && r0 < r1 && n_tok > 0 && n_cols > 0 &&
        k->gemm_packed(t, P, n_cols, r0, r1, X, x_row_bytes, n_tok, Y, ldy))
        return;
    quant_gemm(t, W, w_row_bytes, n_cols, r0, r1, X, x_row_bytes, n_tok, Y, ldy);
}

void quant_gemm_f32(int t, const void *W, size_t w_row_bytes, int64_t n_cols, int r0, int r1,
                    const float *X, int64_t ldx, int n_tok, float *Y, int64_t ldy, float *row) {
    check_type(t, true);
    KVS_ASSERT(n_cols % traits_tab[t].block_size == 0);
    KVS_ASSERT(r0 >= 0 && r0 <= r1 && n_tok >= 0);
    const struct quant_kernels *k = K();
    const uint8_t *w = W;
    for (int r = r0; r < r1; r++) {
        k->dequant[t](w + (size_t)r * w_row_bytes, row, n_cols);
        for (int it = 0; it < n_tok; it++)
            Y[(int64_t)it * ldy + r] = k->dot[QT_F32](n_cols, row, X + (size_t)it * (size_t)ldx);
    }
}

void quant_f16_to_f32_row(const uint16_t *src, float *dst, int64_t n) {
    K()->f16_to_f32_row(src, dst, n);
}
void quant_f32_to_f16_row(const float *src, uint16_t *dst, int64_t n) {
    K()->f32_to_f16_row(src, dst, n);
}
