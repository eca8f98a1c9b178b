/* ops_avx2.c — AVX2/FMA/F16C versions of the attention inner loops (see ops.h). Compiled with
 * -mavx2 -mfma -mf16c; called only after ops_init() has seen those features. */
#include "ops.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 load_f16x8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* e^x for x <= 0 mostly (softmax); valid on [-87, 88], relative error ~2e-7. Range reduction
 * x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for accuracy), then a degree-6 polynomial. */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.0f);
    x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* 8 dot products in, one vector of their sums out: a[i] holds the partial sums of key i. */
static inline __m256 reduce8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5,
                             __m256 a6, __m256 a7) {
    __m256 t0 = _mm256_hadd_ps(a0, a1), t1 = _mm256_hadd_ps(a2, a3);
    __m256 t2 = _mm256_hadd_ps(a4, a5), t3 = _mm256_hadd_ps(a6, a7);
    t0 = _mm256_hadd_ps(t0, t1); /* (k0 k1 k2 k3 | k0 k1 k2 k3) halves */
    t2 = _mm256_hadd_ps(t2, t3); /* (k4 k5 k6 k7 | ...) */
    __m256 lo = _mm256_permute2f128_ps(t0, t2, 0x20), hi = _mm256_permute2f128_ps(t0, t2, 0x31);
    return _mm256_add_ps(lo, hi);
}

/* Scores of g query heads against n fp16 keys. Keys are converted to fp32 8 at a time into an L1
 * block (each key converted once, whatever g), and 8 dot products are reduced together, which
 * keeps long-context decode close to memory speed. */
static void scores_blk8(const float *Q, int g, const uint16_t *K, int n, int hd, float scale,
                        float *S, int lds) {
    if (hd % 8 != 0 || hd > 256) {
        ops_attn_scores_ref(Q, g, K, n, hd, scale, S, lds);
        return;
    }
    float kb[8 * 256] __attribute__((aligned(32)));
    const __m256 vs = _mm256_set1_ps(scale);
    /* every key goes through the same 8-key block and reduction tree, the last partial block
     * zero-padded, so a key's score does not depend on n (tiling over queries stays exact) */
    for (int j = 0; j < n; j += 8) {
        const uint16_t *k = K + (size_t)j * hd;
        int nb = n - j < 8 ? n - j : 8;
        for (int i = 0; i < nb * hd; i += 8) _mm256_store_ps(kb + i, load_f16x8(k + i));
        for (int i = nb * hd; i < 8 * hd; i += 8) _mm256_store_ps(kb + i, _mm256_setzero_ps());
        for (int qi = 0; qi < g; qi++) {
            const float *q = Q + (size_t)qi * hd;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,
                   a6 = a0, a7 = a0;
            for (int d = 0; d < hd; d += 8) {
                __m256 qv = _mm256_loadu_ps(q + d);
                a0 = _mm256_fmadd_ps(qv, _mm256_load_ps(kb + 0 * hd + d), a0);
                a1 = _mm256_fmadd_ps(qv, _mm256_load_ps(kb + 1 * hd + d), a1);
                a2 = _mm256_fmadd_ps(qv, _mm256_load_ps(kb + 2 * hd + d), a2);
                a3 = _mm256_fmadd_ps(qv, _mm256_load_ps(kb + 3 * hd + d), a3);
                a4 = _mm256_fmadd_ps(qv, _mm256_load_ps(kb + 4 * hd + d), a4);
                a5 = _mm256_fmadd_ps(qv, _mm256_load_ps(kb + 5 * hd + d), a5);
                a6 = _mm256_fmadd_ps(qv, _mm256_load_ps(kb + 6 * hd + d), a6);
                a7 = _mm256_fmadd_ps(qv, _mm256_load_ps(kb + 7 * hd + d), a7);
            }
            __m256 r = _mm256_mul_ps(reduce8(a0, a1, a2, a3, a4, a5, a6, a7), vs);
            if (nb == 8) {
                _mm256_storeu_ps(S + (size_t)qi * lds + j, r);
            } else {
                float tmp[8];
                _mm256_storeu_ps(tmp, r);
                memcpy(S + (size_t)qi * lds + j, tmp, sizeof(float) * nb);
            }
        }
    }
}

void ops_softmax_partial_avx2(float *S, int g, int n, int lds, float *m, float *l) {
    for (int qi = 0; qi < g; qi++) {
        float *s = S + (size_t)qi * lds;
        __m256 vmx = _mm256_set1_ps(-INFINITY);
        int j = 0;
        for (; j + 8 <= n; j += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(s + j));
        __m128 t = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
        t = _mm_max_ps(t, _mm_movehl_ps(t, t));
        t = _mm_max_ss(t, _mm_movehdup_ps(t));
        float mx = _mm_cvtss_f32(t);
        for (; j < n; j++) mx = s[j] > mx ? s[j] : mx;
        __m256 vm = _mm256_set1_ps(mx), vsum = _mm256_setzero_ps();
        for (j = 0; j + 8 <= n; j += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
            _mm256_storeu_ps(s + j, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hsum8(vsum);
        for (; j < n; j++) {
            s[j] = expf(s[j] - mx);
            sum += s[j];
        }
        m[qi] = mx;
        l[qi] = sum;
    }
}

/* O[qi] = sum_j P[qi][j] V[j]: values converted 8 rows at a time into an L1 block, then each
 * output chunk of 8 floats is loaded once, takes 8 FMAs (one per row) and is stored once. */
static void accum_blk8(const float *P, int g, int n, int lds, const uint16_t *V, int hd, float *O,
                       bool add) {
    if (hd % 8 != 0 || hd > 256) {
        (add ? ops_attn_accum_add_ref : ops_attn_accum_ref)(P, g, n, lds, V, hd, O);
        return;
    }
    if (!add) memset(O, 0, sizeof(float) * (size_t)g * hd);
    float vb[8 * 256] __attribute__((aligned(32)));
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const uint16_t *v = V + (size_t)j * hd;
        for (int i = 0; i < 8 * hd; i += 8) _mm256_store_ps(vb + i, load_f16x8(v + i));
        for (int qi = 0; qi < g; qi++) {
            const float *p = P + (size_t)qi * lds + j;
            __m256 p0 = _mm256_set1_ps(p[0]), p1 = _mm256_set1_ps(p[1]), p2 = _mm256_set1_ps(p[2]),
                   p3 = _mm256_set1_ps(p[3]), p4 = _mm256_set1_ps(p[4]), p5 = _mm256_set1_ps(p[5]),
                   p6 = _mm256_set1_ps(p[6]), p7 = _mm256_set1_ps(p[7]);
            float *o = O + (size_t)qi * hd;
            for (int d = 0; d < hd; d += 8) {
                __m256 acc = _mm256_loadu_ps(o + d);
                acc = _mm256_fmadd_ps(p0, _mm256_load_ps(vb + 0 * hd + d), acc);
                acc = _mm256_fmadd_ps(p1, _mm256_load_ps(vb + 1 * hd + d), acc);
                acc = _mm256_fmadd_ps(p2, _mm256_load_ps(vb + 2 * hd + d), acc);
                acc = _mm256_fmadd_ps(p3, _mm256_load_ps(vb + 3 * hd + d), acc);
                acc = _mm256_fmadd_ps(p4, _mm256_load_ps(vb + 4 * hd + d), acc);
                acc = _mm256_fmadd_ps(p5, _mm256_load_ps(vb + 5 * hd + d), acc);
                acc = _mm256_fmadd_ps(p6, _mm256_load_ps(vb + 6 * hd + d), acc);
                acc = _mm256_fmadd_ps(p7, _mm256_load_ps(vb + 7 * hd + d), acc);
                _mm256_storeu_ps(o + d, acc);
            }
        }
    }
    for (; j < n; j++) {
        const uint16_t *v = V + (size_t)j * hd;
        for (int qi = 0; qi < g; qi++) {
            __m256 p = _mm256_set1_ps(P[(size_t)qi * lds + j]);
            float *o = O + (size_t)qi * hd;
            for (int d = 0; d < hd; d += 8)
                _mm256_storeu_ps(o + d, _mm256_fmadd_ps(p, load_f16x8(v + d), _mm256_loadu_ps(o + d)));
        }
    }
}

/* ---- register-blocked decode/prefill kernels (head_dim a multiple of 32) -----------------
 * The kernels above stage 8 converted rows in an L1 block and reload them for every query head;
 * on machines that split 256-bit operations that costs more than the FMAs. These keep up to 3
 * heads x 4 keys (scores) or 3 heads x 32 output channels (accum) in registers and convert each
 * fp16 row straight from the cache. Every score and every output channel goes through the same
 * float operations in the same order as scores_blk8/accum_blk8 (8-lane FMA chains over d, the
 * same hadd tree; FMA chains over j in order), so results are bit-identical with them. */
#define AI static inline __attribute__((always_inline))

/* a[c] += x * y_c (x first, as the 8-row kernels multiply) */
AI void fma4(__m256 a[4], __m256 x, __m256 y0, __m256 y1, __m256 y2, __m256 y3) {
    a[0] = _mm256_fmadd_ps(x, y0, a[0]);
    a[1] = _mm256_fmadd_ps(x, y1, a[1]);
    a[2] = _mm256_fmadd_ps(x, y2, a[2]);
    a[3] = _mm256_fmadd_ps(x, y3, a[3]);
}

/* scores of GH heads against 4 keys (rows of hd halves at K), stored for the first nb keys */
AI void score_4keys(int GH, const float *Q, const uint16_t *K, int hd, __m128 vs, float *S,
                    int lds, int nb) {
    __m256 a[3][4];
    #pragma GCC unroll 4
    for (int h = 0; h < GH; h++)
        #pragma GCC unroll 4
        for (int k = 0; k < 4; k++) a[h][k] = _mm256_setzero_ps();
    for (int d = 0; d < hd; d += 8) {
        const __m256 k0 = load_f16x8(K + d), k1 = load_f16x8(K + hd + d),
                     k2 = load_f16x8(K + 2 * hd + d), k3 = load_f16x8(K + 3 * hd + d);
        #pragma GCC unroll 4
        for (int h = 0; h < GH; h++) fma4(a[h], _mm256_loadu_ps(Q + (size_t)h * hd + d), k0, k1, k2, k3);
    }
    #pragma GCC unroll 4
    for (int h = 0; h < GH; h++) {
        /* reduce8's tree restricted to 4 keys: the same additions in the same order */
        const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[h][0], a[h][1]), _mm256_hadd_ps(a[h][2], a[h][3]));
        const __m128 r = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)), vs);
        float *o = S + (size_t)h * lds;
        if (nb == 4) {
            _mm_storeu_ps(o, r);
        } else {
            float tmp[4];
            _mm_storeu_ps(tmp, r);
            memcpy(o, tmp, sizeof(float) * (size_t)nb);
        }
    }
}

AI void scores_heads(int GH, const float *Q, const uint16_t *K, int n, int hd, __m128 vs, float *S,
                     int lds) {
    int j = 0;
    for (; j + 4 <= n; j += 4) score_4keys(GH, Q, K + (size_t)j * hd, hd, vs, S + j, lds, 4);
    if (j < n) { /* the last keys zero-padded, as scores_blk8 pads its last block */
        uint16_t kt[4 * 256] __attribute__((aligned(32)));
        memset(kt, 0, sizeof kt);
        memcpy(kt, K + (size_t)j * hd, sizeof(uint16_t) * (size_t)(n - j) * (size_t)hd);
        score_4keys(GH, Q, kt, hd, vs, S + j, lds, n - j);
    }
}

void ops_attn_scores_avx2(const float *Q, int g, const uint16_t *K, int n, int hd, float scale,
                          float *S, int lds) {
    if (hd % 32 != 0 || hd > 256) {
        scores_blk8(Q, g, K, n, hd, scale, S, lds);
        return;
    }
    const __m128 vs = _mm_set1_ps(scale);
    int h = 0;
    for (; h + 3 <= g; h += 3) scores_heads(3, Q + (size_t)h * hd, K, n, hd, vs, S + (size_t)h * lds, lds);
    if (g - h == 2) scores_heads(2, Q + (size_t)h * hd, K, n, hd, vs, S + (size_t)h * lds, lds);
    else if (g - h == 1) scores_heads(1, Q + (size_t)h * hd, K, n, hd, vs, S + (size_t)h * lds, lds);
}

/* O[h][d0..d0+32) += sum_j P[h][j] V[j][d0..d0+32) for GH heads over rows [j0, j1) */
AI void accum_32ch(int GH, const float *P, int lds, const uint16_t *V, int hd, int d0, int j0,
                   int j1, float *O) {
    __m256 a[3][4];
    #pragma GCC unroll 4
    for (int h = 0; h < GH; h++)
        #pragma GCC unroll 4
        for (int c = 0; c < 4; c++) a[h][c] = _mm256_loadu_ps(O + (size_t)h * hd + d0 + 8 * c);
    for (int j = j0; j < j1; j++) {
        const uint16_t *v = V + (size_t)j * hd + d0;
        const __m256 v0 = load_f16x8(v), v1 = load_f16x8(v + 8), v2 = load_f16x8(v + 16),
                     v3 = load_f16x8(v + 24);
        #pragma GCC unroll 4
        for (int h = 0; h < GH; h++) fma4(a[h], _mm256_broadcast_ss(P + (size_t)h * lds + j), v0, v1, v2, v3);
    }
    #pragma GCC unroll 4
    for (int h = 0; h < GH; h++)
        #pragma GCC unroll 4
        for (int c = 0; c < 4; c++) _mm256_storeu_ps(O + (size_t)h * hd + d0 + 8 * c, a[h][c]);
}

enum { ACC_JB = 64 }; /* rows per block: every (head group, channel group) pass reads them from L1 */

AI void accum_heads(int GH, const float *P, int lds, const uint16_t *V, int hd, int j0, int j1, float *O) {
    for (int d0 = 0; d0 < hd; d0 += 32) accum_32ch(GH, P, lds, V, hd, d0, j0, j1, O);
}

static void accum(const float *P, int g, int n, int lds, const uint16_t *V, int hd, float *O,
                  bool add) {
    if (hd % 32 != 0 || hd > 256) {
        accum_blk8(P, g, n, lds, V, hd, O, add);
        return;
    }
    if (!add) memset(O, 0, sizeof(float) * (size_t)g * hd);
    for (int j0 = 0; j0 < n; j0 += ACC_JB) {
        const int j1 = n - j0 < ACC_JB ? n : j0 + ACC_JB;
        int h = 0;
        for (; h + 3 <= g; h += 3) accum_heads(3, P + (size_t)h * lds, lds, V, hd, j0, j1, O + (size_t)h * hd);
        if (g - h == 2) accum_heads(2, P + (size_t)h * lds, lds, V, hd, j0, j1, O + (size_t)h * hd);
        else if (g - h == 1) accum_heads(1, P + (size_t)h * lds, lds, V, hd, j0, j1, O + (size_t)h * hd);
    }
}

void ops_attn_accum_avx2(const float *P, int g, int n, int lds, const uint16_t *V, int hd,
                         float *O) {
    accum(P, g, n, lds, V, hd, O, false);
}

void ops_attn_accum_add_avx2(const float *P, int g, int n, int lds, const uint16_t *V, int hd,
                             float *O) {
    accum(P, g, n, lds, V, hd, O, true);
}

/* Four tokens share each pass over a weight row (the row stays in L1); cols must be a multiple of
 * 8, else the reference runs. Summation order differs from the reference (8 lanes, then a
 * horizontal sum), so results agree to rounding. */
void ops_linear_f32_avx2(float *Y, int ldy, const float *X, int ldx, int T, const float *W,
                         const float *b, int rows, int cols) {
    if (cols % 8) {
        ops_linear_f32_ref(Y, ldy, X, ldx, T, W, b, rows, cols);
        return;
    }
    int t = 0;
    for (; t + 4 <= T; t += 4) {
        const float *x0 = X + (size_t)t * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
        for (int r = 0; r < rows; r++) {
            const float *w = W + (size_t)r * cols;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int c = 0; c < cols; c += 8) {
                __m256 wv = _mm256_loadu_ps(w + c);
                a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + c), a0);
                a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1 + c), a1);
                a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2 + c), a2);
                a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x3 + c), a3);
            }
            float bb = b ? b[r] : 0.0f;
            Y[(size_t)t * ldy + r] = hsum8(a0) + bb;
            Y[(size_t)(t + 1) * ldy + r] = hsum8(a1) + bb;
            Y[(size_t)(t + 2) * ldy + r] = hsum8(a2) + bb;
            Y[(size_t)(t + 3) * ldy + r] = hsum8(a3) + bb;
        }
    }
    for (; t < T; t++) {
        const float *x = X + (size_t)t * ldx;
        for (int r = 0; r < rows; r++) {
            const float *w = W + (size_t)r * cols;
            __m256 a = _mm256_setzero_ps();
            for (int c = 0; c < cols; c += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + c), _mm256_loadu_ps(x + c), a);
            Y[(size_t)t * ldy + r] = hsum8(a) + (b ? b[r] : 0.0f);
        }
    }
}
