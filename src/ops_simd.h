/* ops_simd.h — small AVX2 helpers shared by the attention kernel files (ops_qattn_avx2.c,
 * ops_qattn8_avx2.c). Only for files compiled with -mavx2 -mfma -mf16c. */
#ifndef KVS_OPS_SIMD_H
#define KVS_OPS_SIMD_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define UNROLL _Pragma("GCC unroll 16")

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* 8 fp16 scales or minima (the store keeps them in half precision) as floats */
ALWAYS_INLINE __m256 cvt8h(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
/* n fp16 values as floats */
ALWAYS_INLINE void widen(const uint16_t *p, int n, float *out) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, cvt8h(p + i));
    for (; i < n; i++) out[i] = _cvtsh_ss(p[i]);
}

/* 8 rows of ng floats (row-major) -> ng vectors, vector k holding column k of rows 0..7.
 * Reads exactly the 8 * ng floats. */
ALWAYS_INLINE void cols8(const float *v, int ng, __m256 *t) {
    if (ng == 1) {
        t[0] = _mm256_loadu_ps(v);
    } else if (ng == 2) {
        __m256 a = _mm256_loadu_ps(v), b = _mm256_loadu_ps(v + 8);
        /* even (odd) lanes: [a0 a2 b0 b2 | a4 a6 b4 b6], then 64-bit lanes in the order 0 2 1 3 */
        __m256d e = _mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88));
        __m256d o = _mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD));
        t[0] = _mm256_castpd_ps(_mm256_permute4x64_pd(e, 0xD8));
        t[1] = _mm256_castpd_ps(_mm256_permute4x64_pd(o, 0xD8));
    } else if (ng == 4) {
        __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
               v3 = _mm256_loadu_ps(v + 24);
        __m256 t0 = _mm256_unpacklo_ps(v0, v1), t1 = _mm256_unpackhi_ps(v0, v1);
        __m256 t2 = _mm256_unpacklo_ps(v2, v3), t3 = _mm256_unpackhi_ps(v2, v3);
        /* rows in the order 0 2 4 6 1 3 5 7 */
        const __m256i ord = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        t[0] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t0, t2, 0x44), ord);
        t[1] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t0, t2, 0xEE), ord);
        t[2] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t1, t3, 0x44), ord);
        t[3] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t1, t3, 0xEE), ord);
    } else if (ng % 8 == 0) {
        for (int k = 0; k < ng; k += 8) { /* 8x8 transposes */
            __m256 r[8], u[8];
            UNROLL for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(v + i * ng + k);
            UNROLL for (int i = 0; i < 8; i += 2)
                u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]),
                u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
            UNROLL for (int i = 0; i < 8; i += 4) {
                r[i] = _mm256_shuffle_ps(u[i], u[i + 2], 0x44);
                r[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], 0xEE);
                r[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0x44);
                r[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0xEE);
            }
            UNROLL for (int i = 0; i < 4; i++) {
                t[k + i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
                t[k + i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
            }
        }
    } else {
        const __m256i ix = _mm256_setr_epi32(0, ng, 2 * ng, 3 * ng, 4 * ng, 5 * ng, 6 * ng, 7 * ng);
        for (int k = 0; k < ng; k++) t[k] = _mm256_i32gather_ps(v + k, ix, 4);
    }
}

/* A key block's query folded with its channel scales: qs[c] = q[c] * sf[c] for c < kd (a
 * multiple of 8); returns the bias sum_c q[c] * mf[c] (8 lanes, then hsum8). */
ALWAYS_INLINE float fold_query(const float *q, const float *sf, const float *mf, int kd, float *qs) {
    __m256 b = _mm256_setzero_ps();
    for (int c = 0; c < kd; c += 8) {
        __m256 qv = _mm256_loadu_ps(q + c);
        _mm256_storeu_ps(qs + c, _mm256_mul_ps(qv, _mm256_loadu_ps(sf + c)));
        b = _mm256_fmadd_ps(qv, _mm256_loadu_ps(mf + c), b);
    }
    return hsum8(b);
}

/* The partial last tile of a channel-major key block (tokens full..nt-1 of each of the kd
 * channels, `bits` per code) copied to tail, channel c at tail + c * tstride, zero-padded to
 * tstride bytes, so that a tile kernel never reads past the codes. Nothing when nt == full. */
ALWAYS_INLINE void tail_tile(const uint8_t *codes, size_t cstride, int kd, int full, int nt,
                             int bits, size_t tstride, uint8_t *tail) {
    if (full >= nt) return;
    size_t off = (size_t)full * bits / 8, nbytes = ((size_t)nt * bits + 7) / 8 - off;
    for (int c = 0; c < kd; c++) {
        memcpy(tail + (size_t)c * tstride, codes + (size_t)c * cstride + off, nbytes);
        memset(tail + (size_t)c * tstride + nbytes, 0, tstride - nbytes);
    }
}

/* Register blocks of near-equal size: the size of block k of nblk over the qn - i0 queries
 * still left (blocks k..nblk-1 share them). */
static inline int reg_block(int qn, int i0, int nblk, int k) {
    return (qn - i0 + (nblk - k) - 1) / (nblk - k);
}

#endif
