/* quant_avx2.c — AVX2/FMA/F16C kernels (this file alone is compiled with -mavx2 -mfma -mf16c;
 * quant.c calls quant_avx2_register only after checking the CPU).
 *
 * Contents: fp16 rows; activation quantizers Q8_0/Q8_1/Q8_K (bit-identical to the reference);
 * dequantization; "horizontal" dot products (one weight row x one activation row, used by
 * quant_vec_dot and by quant_gemm for very few tokens); and the tiled GEMM.
 *
 * Tiled GEMM ("row-interleaved" layout). A tile of 8 weight rows is unpacked to one byte per
 * weight and stored so that one 32-byte vector holds 4 consecutive weights (a "k-group") of each
 * of the 8 rows: [r0 k..k+3, r1 k..k+3, ..., r7 k..k+3]. For a token, the matching 4 activation
 * bytes are broadcast to all 8 lanes (one vpbroadcastd from memory), and one maddubs computes
 * partial dot products for all 8 rows at once. The int16 results of a whole block stay in one
 * register (no horizontal reductions, no per-(row,token) shuffles); per block and token there is
 * a single int->float conversion and two FMAs for 8 rows. Each unpacked weight vector is reused
 * for 4 tokens from registers, and the unpacked tile (L1-resident) for every token.
 */
#include <immintrin.h>
#include <stdbool.h>
#include "quant_internal.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* ---- small helpers ------------------------------------------------------------------------ */

ALWAYS_INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

ALWAYS_INLINE int hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

ALWAYS_INLINE float hmax_ps(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

ALWAYS_INLINE float h2f(uint16_t h) { return _cvtsh_ss(h); }

ALWAYS_INLINE __m256i bcast32(const void *p) {
    int v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

ALWAYS_INLINE __m256i loadu256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* 16 bytes of packed nibbles -> 32 bytes: [low nibbles (elements 0..15) | high (16..31)] */
ALWAYS_INLINE __m256i unpack_nib32(const uint8_t *qs) {
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    v = _mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4));
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

/* the 32 bits of a Q5 qh field -> 32 bytes, 0x10 where the bit is set */
ALWAYS_INLINE __m256i q5_hbits(const uint8_t *qh4) {
    __m256i v = bcast32(qh4);
    v = _mm256_shuffle_epi8(v, _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

/* four vectors of 8 int32 (each in -128..127) -> 32 int8 in order */
ALWAYS_INLINE __m256i pack_i32x4(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
    __m256i r = _mm256_packs_epi16(ab, cd);
    return _mm256_permutevar8x32_epi32(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* 32 u8 -> 4 x 8 floats: y = (q - off) * d  (int subtraction, exact) */
ALWAYS_INLINE void store_u8x32_scaled(__m256i q, int off, __m256 d, float *y) {
    __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int k = 0; k < 4; k++) {
        __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[k]), _mm256_set1_epi32(off));
        _mm256_storeu_ps(y + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(v), d));
    }
}
/* y = q * d + m, or with sub: y = d*q - m */
ALWAYS_INLINE void store_u8x32_affine(__m256i q, __m256 d, __m256 m, bool sub, float *y) {
    __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int k = 0; k < 4; k++) {
        __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[k])), d);
        _mm256_storeu_ps(y + 8 * k, sub ? _mm256_sub_ps(v, m) : _mm256_add_ps(v, m));
    }
}

/* ---- fp16 rows ---------------------------------------------------------------------------- */

static void f16_to_f32_row(const uint16_t *s, float *d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    for (; i < n; i++) d[i] = h2f(s[i]);
}

static void f32_to_f16_row(const float *s, uint16_t *d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) d[i] = _cvtss_sh(s[i], _MM_FROUND_TO_NEAREST_INT);
}

static void deq_f16(const void *src, float *y, int64_t n) { f16_to_f32_row(src, y, n); }
static void qnt_f16(const float *x, void *dst, int64_t n) { f32_to_f16_row(x, dst, n); }

static void deq_bf16(const void *src, float *y, int64_t n) {
    const uint16_t *s = src;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i)));
        _mm256_storeu_ps(y + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
    for (; i < n; i++) y[i] = qi_bf16_to_f32(s[i]);
}

/* ---- activation quantizers (bit-identical to quant.c's reference) ------------------------ */

ALWAYS_INLINE __m256i round_to_i32(__m256 v) {
    return _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* one block of 32: returns the int8 vector, sets *dout and the int sum */
ALWAYS_INLINE __m256i q8_block(const float *x, float *dout, int *sum, bool want_sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
    __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
    __m256 am = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                              _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    float amax = hmax_ps(am);
    float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
    __m256 mul = _mm256_set1_ps(id);
    __m256i q0 = round_to_i32(_mm256_mul_ps(v0, mul)), q1 = round_to_i32(_mm256_mul_ps(v1, mul));
    __m256i q2 = round_to_i32(_mm256_mul_ps(v2, mul)), q3 = round_to_i32(_mm256_mul_ps(v3, mul));
    if (want_sum)
        *sum = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3)));
    *dout = d;
    return pack_i32x4(q0, q1, q2, q3);
}

static void qnt_q8_0(const float *x, void *dst, int64_t n) {
    blk_q8_0 *b = dst;
    for (int64_t i = 0; i < n / QK32; i++, x += QK32) {
        float d;
        int s;
        __m256i q = q8_block(x, &d, &s, false);
        b[i].d = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_si256((__m256i *)b[i].qs, q);
    }
}

static void qnt_q8_1(const float *x, void *dst, int64_t n) {
    blk_q8_1 *b = dst;
    for (int64_t i = 0; i < n / QK32; i++, x += QK32) {
        float d;
        int s = 0;
        __m256i q = q8_block(x, &d, &s, true);
        b[i].d = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
        b[i].s = _cvtss_sh(d * (float)s, _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_si256((__m256i *)b[i].qs, q);
    }
}

static void qnt_q8_K(const float *x, void *dst, int64_t n) {
    blk_q8_K *b = dst;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K) {
        __m256 am = _mm256_setzero_ps();
        for (int k = 0; k < 32; k++) am = _mm256_max_ps(am, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8 * k)));
        float amax = hmax_ps(am);
        if (amax == 0) {
            memset(&b[i], 0, sizeof b[i]);
            continue;
        }
        __m256 va = _mm256_set1_ps(amax);
        int found = 0;
        for (int k = 0; k < 32; k++)
            found |= _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + 8 * k), va, _CMP_EQ_OQ));
        float mx = found ? amax : -amax;
        float iscale = -127.0f / mx;
        __m256 mul = _mm256_set1_ps(iscale);
        const __m256i lim = _mm256_set1_epi32(127);
        const __m256i ones8 = _mm256_set1_epi8(1);
        const __m256i ones16 = _mm256_set1_epi16(1);
        for (int k = 0; k < 8; k++) {
            const float *xk = x + 32 * k;
            __m256i q0 = _mm256_min_epi32(round_to_i32(_mm256_mul_ps(_mm256_loadu_ps(xk), mul)), lim);
            __m256i q1 = _mm256_min_epi32(round_to_i32(_mm256_mul_ps(_mm256_loadu_ps(xk + 8), mul)), lim);
            __m256i q2 = _mm256_min_epi32(round_to_i32(_mm256_mul_ps(_mm256_loadu_ps(xk + 16), mul)), lim);
            __m256i q3 = _mm256_min_epi32(round_to_i32(_mm256_mul_ps(_mm256_loadu_ps(xk + 24), mul)), lim);
            __m256i q = pack_i32x4(q0, q1, q2, q3);
            _mm256_storeu_si256((__m256i *)(b[i].qs + 32 * k), q);
            /* sums of 16: [0..15] in the low lane, [16..31] in the high lane */
            __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, q), ones16);
            s = _mm256_hadd_epi32(s, s);
            s = _mm256_hadd_epi32(s, s);
            b[i].bsums[2 * k] = (int16_t)_mm256_extract_epi32(s, 0);
            b[i].bsums[2 * k + 1] = (int16_t)_mm256_extract_epi32(s, 4);
        }
        b[i].d = 1.0f / iscale;
    }
}

/* ---- dequantization ----------------------------------------------------------------------- */

static void deq_q4_0(const void *src, float *y, int64_t n) {
    const blk_q4_0 *b = src;
    for (int64_t i = 0; i < n / QK32; i++, y += QK32)
        store_u8x32_scaled(unpack_nib32(b[i].qs), 8, _mm256_set1_ps(h2f(b[i].d)), y);
}

static void deq_q4_1(const void *src, float *y, int64_t n) {
    const blk_q4_1 *b = src;
    for (int64_t i = 0; i < n / QK32; i++, y += QK32)
        store_u8x32_affine(unpack_nib32(b[i].qs), _mm256_set1_ps(h2f(b[i].d)),
                           _mm256_set1_ps(h2f(b[i].m)), false, y);
}

static void deq_q5_0(const void *src, float *y, int64_t n) {
    const blk_q5_0 *b = src;
    for (int64_t i = 0; i < n / QK32; i++, y += QK32) {
        __m256i q = _mm256_or_si256(unpack_nib32(b[i].qs), q5_hbits(b[i].qh));
        store_u8x32_scaled(q, 16, _mm256_set1_ps(h2f(b[i].d)), y);
    }
}

static void deq_q5_1(const void *src, float *y, int64_t n) {
    const blk_q5_1 *b = src;
    for (int64_t i = 0; i < n / QK32; i++, y += QK32) {
        __m256i q = _mm256_or_si256(unpack_nib32(b[i].qs), q5_hbits(b[i].qh));
        store_u8x32_affine(q, _mm256_set1_ps(h2f(b[i].d)), _mm256_set1_ps(h2f(b[i].m)), false, y);
    }
}

static void deq_q8_0(const void *src, float *y, int64_t n) {
    const blk_q8_0 *b = src;
    for (int64_t i = 0; i < n / QK32; i++, y += QK32) {
        __m256 d = _mm256_set1_ps(h2f(b[i].d));
        for (int k = 0; k < 4; k++) {
            __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b[i].qs + 8 * k)));
            _mm256_storeu_ps(y + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(v), d));
        }
    }
}

/* K-quant unpackers: 256 weights -> 8 vectors of 32 u8 in natural order */
ALWAYS_INLINE void q4k_unpack_u8(const blk_q4_K *b, __m256i v[8]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; c++) {
        __m256i q = loadu256(b->qs + 32 * c);
        v[2 * c] = _mm256_and_si256(q, m4);
        v[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
    }
}

ALWAYS_INLINE void q5k_unpack_u8(const blk_q5_K *b, __m256i v[8]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), b4 = _mm256_set1_epi8(0x10);
    __m256i qh = loadu256(b->qh);
    for (int c = 0; c < 4; c++) {
        __m256i q = loadu256(b->qs + 32 * c);
        __m256i h0 = _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * c), 4), b4);
        __m256i h1 = _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * c + 1), 4), b4);
        v[2 * c] = _mm256_or_si256(_mm256_and_si256(q, m4), h0);
        v[2 * c + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), h1);
    }
}

/* Q6_K: unsigned 6-bit values 0..63 (the -32 is applied by the caller) */
ALWAYS_INLINE void q6k_unpack_u8(const blk_q6_K *b, __m256i v[8]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
    for (int h = 0; h < 2; h++) {
        __m256i l0 = loadu256(b->ql + 64 * h), l1 = loadu256(b->ql + 64 * h + 32);
        __m256i qh = loadu256(b->qh + 32 * h);
        v[4 * h + 0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2));
        v[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2));
        v[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(qh, m2));
        v[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                       _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2));
    }
}

static void deq_q4_K(const void *src, float *y, int64_t n) {
    const blk_q4_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {
        uint8_t sc[8], mn[8];
        qi_unpack_k4_scales(b[i].scales, sc, mn);
        float d = h2f(b[i].d), dmin = h2f(b[i].dmin);
        __m256i v[8];
        q4k_unpack_u8(&b[i], v);
        for (int g = 0; g < 8; g++)
            store_u8x32_affine(v[g], _mm256_set1_ps(d * (float)sc[g]),
                               _mm256_set1_ps(dmin * (float)mn[g]), true, y + 32 * g);
    }
}

static void deq_q5_K(const void *src, float *y, int64_t n) {
    const blk_q5_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {
        uint8_t sc[8], mn[8];
        qi_unpack_k4_scales(b[i].scales, sc, mn);
        float d = h2f(b[i].d), dmin = h2f(b[i].dmin);
        __m256i v[8];
        q5k_unpack_u8(&b[i], v);
        for (int g = 0; g < 8; g++)
            store_u8x32_affine(v[g], _mm256_set1_ps(d * (float)sc[g]),
                               _mm256_set1_ps(dmin * (float)mn[g]), true, y + 32 * g);
    }
}

static void deq_q6_K(const void *src, float *y, int64_t n) {
    const blk_q6_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {
        float d = h2f(b[i].d);
        __m256i v[8];
        q6k_unpack_u8(&b[i], v);
        for (int s = 0; s < 8; s++) {
            __m128i lo = _mm256_castsi256_si128(v[s]), hi = _mm256_extracti128_si256(v[s], 1);
            __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int k = 0; k < 4; k++) {
                __m256 dl = _mm256_set1_ps(d * (float)b[i].scales[2 * s + (k >> 1)]);
                __m256i q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[k]), _mm256_set1_epi32(32));
                _mm256_storeu_ps(y + 32 * s + 8 * k, _mm256_mul_ps(dl, _mm256_cvtepi32_ps(q)));
            }
        }
    }
}

/* ---- horizontal dot products ------------------------------------------------------------- */

static float dot_f32(int64_t n, const void *w, const void *x) {
    const float *a = w, *b = x;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

ALWAYS_INLINE __m256 ld_f16x8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
ALWAYS_INLINE __m256 ld_bf16x8(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

static float dot_f16(int64_t n, const void *w, const void *x) {
    const uint16_t *a = w;
    const float *b = x;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(ld_f16x8(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(ld_f16x8(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(ld_f16x8(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(ld_f16x8(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(ld_f16x8(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++) s += h2f(a[i]) * b[i];
    return s;
}

static float dot_bf16(int64_t n, const void *w, const void *x) {
    const uint16_t *a = w;
    const float *b = x;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(ld_bf16x8(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(ld_bf16x8(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(ld_bf16x8(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum_ps(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += qi_bf16_to_f32(a[i]) * b[i];
    return s;
}

/* [d_w, m_w] (two fp16 at pw) times [d_x, s_x] (two fp16 at px): lane 0 = dw*dx, lane 1 = mw*sx */
ALWAYS_INLINE __m128 scale_pair(const void *pw, const void *px) {
    __m128i h = _mm_insert_epi32(_mm_cvtsi32_si128((int)qi_load_u32(pw)), (int)qi_load_u32(px), 1);
    __m128 f = _mm_cvtph_ps(h); /* [dw, mw, dx, sx] */
    return _mm_mul_ps(f, _mm_movehl_ps(f, f));
}

/* The legacy-format dots, two blocks per iteration (independent accumulators). kind: 0 = Q4_0,
 * 1 = Q4_1, 2 = Q5_0, 3 = Q5_1, 4 = Q8_0. */
ALWAYS_INLINE __m256i legacy_block_isum(int kind, const void *wb, const int8_t *xq) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i qx = loadu256(xq);
    if (kind == 4) {
        __m256i qw = loadu256(((const blk_q8_0 *)wb)->qs);
        __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw));
        return _mm256_madd_epi16(p, ones);
    }
    __m256i qw;
    if (kind == 0) qw = unpack_nib32(((const blk_q4_0 *)wb)->qs);
    else if (kind == 1) qw = unpack_nib32(((const blk_q4_1 *)wb)->qs);
    else if (kind == 2) qw = _mm256_or_si256(unpack_nib32(((const blk_q5_0 *)wb)->qs), q5_hbits(((const blk_q5_0 *)wb)->qh));
    else qw = _mm256_or_si256(unpack_nib32(((const blk_q5_1 *)wb)->qs), q5_hbits(((const blk_q5_1 *)wb)->qh));
    __m256i p = _mm256_maddubs_epi16(qw, qx);
    if (kind == 0) p = _mm256_sub_epi16(p, _mm256_maddubs_epi16(_mm256_set1_epi8(8), qx));
    if (kind == 2) p = _mm256_sub_epi16(p, _mm256_maddubs_epi16(_mm256_set1_epi8(16), qx));
    return _mm256_madd_epi16(p, ones);
}

ALWAYS_INLINE float dot_legacy(int kind, int64_t n, const void *w, const void *x) {
    const size_t wbs = kind == 0 ? sizeof(blk_q4_0) : kind == 1 ? sizeof(blk_q4_1)
                     : kind == 2 ? sizeof(blk_q5_0) : kind == 3 ? sizeof(blk_q5_1) : sizeof(blk_q8_0);
    const bool x1 = kind == 1 || kind == 3; /* activations are Q8_1 */
    const size_t xbs = x1 ? sizeof(blk_q8_1) : sizeof(blk_q8_0);
    const size_t xqo = x1 ? 4 : 2;
    const uint8_t *pw = w, *px = x;
    const int64_t nb = n / QK32;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    __m128 ms0 = _mm_setzero_ps(), ms1 = ms0;
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        const uint8_t *w0 = pw + i * wbs, *x0 = px + i * xbs;
        const uint8_t *w1 = w0 + wbs, *x1p = x0 + xbs;
        __m256i s0 = legacy_block_isum(kind, w0, (const int8_t *)(x0 + xqo));
        __m256i s1 = legacy_block_isum(kind, w1, (const int8_t *)(x1p + xqo));
        if (x1) {
            __m128 f0 = scale_pair(w0, x0), f1 = scale_pair(w1, x1p);
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_broadcastss_ps(f0), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_broadcastss_ps(f1), acc1);
            ms0 = _mm_add_ps(ms0, f0);
            ms1 = _mm_add_ps(ms1, f1);
        } else {
            float d0 = h2f(*(const uint16_t *)w0) * h2f(*(const uint16_t *)x0);
            float d1 = h2f(*(const uint16_t *)w1) * h2f(*(const uint16_t *)x1p);
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_set1_ps(d0), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_set1_ps(d1), acc1);
        }
    }
    for (; i < nb; i++) {
        const uint8_t *w0 = pw + i * wbs, *x0 = px + i * xbs;
        __m256i s0 = legacy_block_isum(kind, w0, (const int8_t *)(x0 + xqo));
        if (x1) {
            __m128 f0 = scale_pair(w0, x0);
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_broadcastss_ps(f0), acc0);
            ms0 = _mm_add_ps(ms0, f0);
        } else {
            float d0 = h2f(*(const uint16_t *)w0) * h2f(*(const uint16_t *)x0);
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_set1_ps(d0), acc0);
        }
    }
    float r = hsum_ps(_mm256_add_ps(acc0, acc1));
    if (x1) {
        __m128 ms = _mm_add_ps(ms0, ms1);
        r += _mm_cvtss_f32(_mm_shuffle_ps(ms, ms, 1));
    }
    return r;
}

static float dot_q4_0(int64_t n, const void *w, const void *x) { return dot_legacy(0, n, w, x); }
static float dot_q4_1(int64_t n, const void *w, const void *x) { return dot_legacy(1, n, w, x); }
static float dot_q5_0(int64_t n, const void *w, const void *x) { return dot_legacy(2, n, w, x); }
static float dot_q5_1(int64_t n, const void *w, const void *x) { return dot_legacy(3, n, w, x); }
static float dot_q8_0(int64_t n, const void *w, const void *x) { return dot_legacy(4, n, w, x); }

/* int16 vector with scale sc[a] in the low 128-bit lane and sc[b] in the high lane */
ALWAYS_INLINE __m256i sc_pair16(int a, int b) {
    return _mm256_setr_m128i(_mm_set1_epi16((short)a), _mm_set1_epi16((short)b));
}

ALWAYS_INLINE float dot_k45(bool five, int64_t n, const void *w, const void *x) {
    const blk_q8_K *b = x;
    const int64_t nb = n / QK_K;
    __m256 acc = _mm256_setzero_ps();
    float summ = 0;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *scales;
        uint16_t dh, dminh;
        __m256i v[8];
        if (five) {
            const blk_q5_K *a = (const blk_q5_K *)w + i;
            scales = a->scales; dh = a->d; dminh = a->dmin;
            q5k_unpack_u8(a, v);
        } else {
            const blk_q4_K *a = (const blk_q4_K *)w + i;
            scales = a->scales; dh = a->d; dminh = a->dmin;
            q4k_unpack_u8(a, v);
        }
        uint8_t sc[8], mn[8];
        qi_unpack_k4_scales(scales, sc, mn);
        /* mins: sum_j mn[j] * (bsums[2j] + bsums[2j+1]) */
        __m128i m8 = _mm_loadl_epi64((const __m128i *)mn);
        __m128i m16 = _mm_cvtepu8_epi16(m8);
        __m256i mdup = _mm256_setr_m128i(_mm_unpacklo_epi16(m16, m16), _mm_unpackhi_epi16(m16, m16));
        int msum = hsum_epi32(_mm256_madd_epi16(loadu256(b[i].bsums), mdup));
        __m256i s0 = _mm256_setzero_si256(), s1 = s0;
        for (int g = 0; g < 8; g += 2) {
            __m256i p0 = _mm256_maddubs_epi16(v[g], loadu256(b[i].qs + 32 * g));
            __m256i p1 = _mm256_maddubs_epi16(v[g + 1], loadu256(b[i].qs + 32 * g + 32));
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(p0, _mm256_set1_epi16((short)sc[g])));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(p1, _mm256_set1_epi16((short)sc[g + 1])));
        }
        float d = b[i].d * h2f(dh), dmin = b[i].d * h2f(dminh);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)), _mm256_set1_ps(d), acc);
        summ += dmin * (float)msum;
    }
    return hsum_ps(acc) - summ;
}

static float dot_q4_K(int64_t n, const void *w, const void *x) { return dot_k45(false, n, w, x); }
static float dot_q5_K(int64_t n, const void *w, const void *x) { return dot_k45(true, n, w, x); }

static float dot_q6_K(int64_t n, const void *w, const void *x) {
    const blk_q6_K *a = w;
    const blk_q8_K *b = x;
    const int64_t nb = n / QK_K;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m256i v[8];
        q6k_unpack_u8(&a[i], v);
        __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)a[i].scales));
        __m256i bias = _mm256_madd_epi16(loadu256(b[i].bsums), sc16);
        __m256i s0 = _mm256_setzero_si256(), s1 = s0;
        for (int s = 0; s < 8; s += 2) {
            __m256i p0 = _mm256_maddubs_epi16(v[s], loadu256(b[i].qs + 32 * s));
            __m256i p1 = _mm256_maddubs_epi16(v[s + 1], loadu256(b[i].qs + 32 * s + 32));
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(p0, sc_pair16(a[i].scales[2 * s], a[i].scales[2 * s + 1])));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(p1, sc_pair16(a[i].scales[2 * s + 2], a[i].scales[2 * s + 3])));
        }
        __m256i tot = _mm256_sub_epi32(_mm256_add_epi32(s0, s1), _mm256_slli_epi32(bias, 5));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tot), _mm256_set1_ps(b[i].d * h2f(a[i].d)), acc);
    }
    return hsum_ps(acc);
}

/* ---- tiled GEMM ---------------------------------------------------------------------------- */

#define TR 8      /* weight rows per tile (one per int32 lane) */
#define TT 4      /* tokens per register tile */
#define KB32 32   /* legacy blocks per K-chunk (1024 weights) */
#define TCH 128   /* tokens per activation-scale chunk */
#define KSB 4     /* K-quant super-blocks per K-chunk (1024 weights) */
#define GEMM_MIN_TOK 2 /* fewer tokens: horizontal dots */

ALWAYS_INLINE void transpose8x8_epi32(__m256i v[8]) {
    __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    __m256i t4 = _mm256_unpacklo_epi32(v[4], v[5]), t5 = _mm256_unpackhi_epi32(v[4], v[5]);
    __m256i t6 = _mm256_unpacklo_epi32(v[6], v[7]), t7 = _mm256_unpackhi_epi32(v[6], v[7]);
    __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    v[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
    v[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
    v[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
    v[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
    v[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
    v[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
    v[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
    v[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

ALWAYS_INLINE __m256i row_mask(int nr) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(nr), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* Y[row0 .. row0+nr) of one token (+)= v */
ALWAYS_INLINE void store_rows(float *y, __m256 v, int nr, bool accumulate) {
    if (nr == TR) {
        if (accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(y));
        _mm256_storeu_ps(y, v);
    } else {
        __m256i m = row_mask(nr);
        if (accumulate) v = _mm256_add_ps(v, _mm256_maskload_ps(y, m));
        _mm256_maskstore_ps(y, m, v);
    }
}

/* ----- legacy formats (32-weight blocks) ----- */

enum { L_Q4_0, L_Q4_1, L_Q5_0, L_Q5_1, L_Q8_0 };

typedef struct {
    _Alignas(32) uint8_t q[KB32][8][32]; /* [block][k-group][row*4 + byte] */
    _Alignas(32) float d[KB32][TR];
    _Alignas(32) float m[KB32][TR];
} tile32_t;

ALWAYS_INLINE __m256i legacy_unpack(int kind, const uint8_t *blk) {
    switch (kind) {
    case L_Q4_0: return unpack_nib32(((const blk_q4_0 *)blk)->qs);
    case L_Q4_1: return unpack_nib32(((const blk_q4_1 *)blk)->qs);
    case L_Q5_0: return _mm256_or_si256(unpack_nib32(((const blk_q5_0 *)blk)->qs), q5_hbits(((const blk_q5_0 *)blk)->qh));
    case L_Q5_1: return _mm256_or_si256(unpack_nib32(((const blk_q5_1 *)blk)->qs), q5_hbits(((const blk_q5_1 *)blk)->qh));
    default: return loadu256(((const blk_q8_0 *)blk)->qs);
    }
}

ALWAYS_INLINE size_t legacy_wbs(int kind) {
    return kind == L_Q4_0 ? sizeof(blk_q4_0) : kind == L_Q4_1 ? sizeof(blk_q4_1)
         : kind == L_Q5_0 ? sizeof(blk_q5_0) : kind == L_Q5_1 ? sizeof(blk_q5_1) : sizeof(blk_q8_0);
}

ALWAYS_INLINE void repack32(int kind, const uint8_t *W, size_t wrb, int nr, int nbk, tile32_t *S) {
    const size_t wbs = legacy_wbs(kind);
    for (int b = 0; b < nbk; b++) {
        __m256i v[8];
        for (int r = 0; r < TR; r++)
            v[r] = r < nr ? legacy_unpack(kind, W + (size_t)r * wrb + (size_t)b * wbs) : _mm256_setzero_si256();
        transpose8x8_epi32(v);
        for (int g = 0; g < 8; g++) _mm256_store_si256((__m256i *)S->q[b][g], v[g]);
        for (int r = 0; r < TR; r++) {
            const uint8_t *blk = W + (size_t)r * wrb + (size_t)b * wbs;
            float d = 0, m = 0;
            if (r < nr) {
                uint16_t h[2];
                memcpy(h, blk, 4);
                d = h2f(h[0]);
                m = (kind == L_Q4_1 || kind == L_Q5_1) ? h2f(h[1]) : d;
            }
            S->d[b][r] = d;
            S->m[b][r] = m;
        }
    }
}

/* T tokens x 8 rows over nbk blocks. xq[t]: first activation block of the chunk for token t. */
ALWAYS_INLINE void kern32(int kind, int T, const tile32_t *S, int nbk, const uint8_t *const *xq,
                          const float *const *xa, const float *const *xb, __m256 *acc) {
    const bool x1 = kind == L_Q4_1 || kind == L_Q5_1;
    const size_t xbs = x1 ? sizeof(blk_q8_1) : sizeof(blk_q8_0);
    const size_t xqo = x1 ? 4 : 2;
    const bool has_m = kind != L_Q8_0;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nbk; b++) {
        __m256i s[TT], p[TT];
        const size_t xo = (size_t)b * xbs + xqo;
        if (kind == L_Q4_0 || kind == L_Q4_1) {
            /* 4-bit: 8 maddubs (each <= 2*15*127) fit one int16 accumulator */
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) {
                __m256i w = _mm256_load_si256((const __m256i *)S->q[b][g]);
#pragma GCC unroll 4
                for (int t = 0; t < T; t++) {
                    __m256i m = _mm256_maddubs_epi16(w, bcast32(xq[t] + xo + 4 * g));
                    p[t] = g ? _mm256_add_epi16(p[t], m) : m;
                }
            }
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) s[t] = _mm256_madd_epi16(p[t], ones);
        } else if (kind == L_Q5_0 || kind == L_Q5_1) {
            /* 5-bit: 4 maddubs per int16 accumulator */
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
#pragma GCC unroll 4
                for (int g = 4 * h; g < 4 * h + 4; g++) {
                    __m256i w = _mm256_load_si256((const __m256i *)S->q[b][g]);
#pragma GCC unroll 4
                    for (int t = 0; t < T; t++) {
                        __m256i m = _mm256_maddubs_epi16(w, bcast32(xq[t] + xo + 4 * g));
                        p[t] = (g & 3) ? _mm256_add_epi16(p[t], m) : m;
                    }
                }
#pragma GCC unroll 4
                for (int t = 0; t < T; t++) {
                    __m256i m = _mm256_madd_epi16(p[t], ones);
                    s[t] = h ? _mm256_add_epi32(s[t], m) : m;
                }
            }
        } else {
            /* signed 8-bit: |w| * sign(x, w), widened every step */
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) {
                __m256i w = _mm256_load_si256((const __m256i *)S->q[b][g]);
                __m256i aw = _mm256_sign_epi8(w, w);
#pragma GCC unroll 4
                for (int t = 0; t < T; t++) {
                    __m256i m = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast32(xq[t] + xo + 4 * g), w));
                    m = _mm256_madd_epi16(m, ones);
                    s[t] = g ? _mm256_add_epi32(s[t], m) : m;
                }
            }
        }
        __m256 dw = _mm256_load_ps(S->d[b]);
#pragma GCC unroll 4
        for (int t = 0; t < T; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), _mm256_mul_ps(dw, _mm256_broadcast_ss(xa[t] + b)), acc[t]);
        if (has_m) {
            __m256 mw = _mm256_load_ps(S->m[b]);
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) acc[t] = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(xb[t] + b), acc[t]);
        }
    }
}

ALWAYS_INLINE void run32(int kind, int T, const tile32_t *S, int nbk, const uint8_t *X,
                         size_t xrb, size_t xoff, int tok, const float *xa, const float *xb,
                         int tloc, float *Y, int64_t ldy, int row, int nr, bool accum) {
    const uint8_t *xq[TT];
    const float *pa[TT], *pb[TT];
    __m256 acc[TT];
    for (int t = 0; t < T; t++) {
        xq[t] = X + (size_t)(tok + t) * xrb + xoff;
        pa[t] = xa + (size_t)(tloc + t) * KB32;
        pb[t] = xb + (size_t)(tloc + t) * KB32;
    }
    kern32(kind, T, S, nbk, xq, pa, pb, acc);
    for (int t = 0; t < T; t++) store_rows(Y + (int64_t)(tok + t) * ldy + row, acc[t], nr, accum);
}

ALWAYS_INLINE void gemm32(int kind, const void *W, size_t wrb, int64_t n_cols, int r0, int r1,
                          const void *X, size_t xrb, int n_tok, float *Y, int64_t ldy) {
    const bool x1 = kind == L_Q4_1 || kind == L_Q5_1;
    const size_t xbs = x1 ? sizeof(blk_q8_1) : sizeof(blk_q8_0);
    const size_t wbs = legacy_wbs(kind);
    const float off = kind == L_Q4_0 ? -8.0f : kind == L_Q5_0 ? -16.0f : 0.0f;
    const int nb = (int)(n_cols / QK32);
    tile32_t S;
    _Alignas(32) float xa[TCH * KB32], xb[TCH * KB32];
    for (int kb0 = 0; kb0 < nb; kb0 += KB32) {
        const int nbk = nb - kb0 < KB32 ? nb - kb0 : KB32;
        for (int t0 = 0; t0 < n_tok; t0 += TCH) {
            const int nt = n_tok - t0 < TCH ? n_tok - t0 : TCH;
            /* activation scales of this chunk as floats */
            for (int t = 0; t < nt; t++) {
                const uint8_t *xr = (const uint8_t *)X + (size_t)(t0 + t) * xrb + (size_t)kb0 * xbs;
                for (int b = 0; b < nbk; b++) {
                    const uint8_t *blk = xr + (size_t)b * xbs;
                    uint16_t h[2];
                    memcpy(h, blk, 4);
                    float d = h2f(h[0]);
                    xa[t * KB32 + b] = d;
                    if (x1) {
                        xb[t * KB32 + b] = h2f(h[1]);
                    } else if (off != 0) {
                        __m256i q = loadu256(blk + 2);
                        __m256i lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q));
                        __m256i hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1));
                        int sum = hsum_epi32(_mm256_madd_epi16(_mm256_add_epi16(lo, hi), _mm256_set1_epi16(1)));
                        xb[t * KB32 + b] = off * d * (float)sum;
                    } else {
                        xb[t * KB32 + b] = 0;
                    }
                }
            }
            for (int row = r0; row < r1; row += TR) {
                const int nr = r1 - row < TR ? r1 - row : TR;
                repack32(kind, (const uint8_t *)W + (size_t)row * wrb + (size_t)kb0 * wbs, wrb, nr, nbk, &S);
                const size_t xoff = (size_t)kb0 * xbs;
                const bool accum = kb0 > 0;
                int tt = 0;
                for (; tt + TT <= nt; tt += TT)
                    run32(kind, TT, &S, nbk, X, xrb, xoff, t0 + tt, xa, xb, tt, Y, ldy, row, nr, accum);
                switch (nt - tt) {
                case 3: run32(kind, 3, &S, nbk, X, xrb, xoff, t0 + tt, xa, xb, tt, Y, ldy, row, nr, accum); break;
                case 2: run32(kind, 2, &S, nbk, X, xrb, xoff, t0 + tt, xa, xb, tt, Y, ldy, row, nr, accum); break;
                case 1: run32(kind, 1, &S, nbk, X, xrb, xoff, t0 + tt, xa, xb, tt, Y, ldy, row, nr, accum); break;
                default: break;
                }
            }
        }
    }
}

/* ----- K-quants (256-weight super-blocks) ----- */

enum { K_Q4, K_Q5, K_Q6 };

typedef struct {
    _Alignas(32) uint8_t q[KSB][64][32]; /* [super-block][k-group][row*4 + byte] */
    _Alignas(32) int16_t sc[KSB][16][16]; /* per group: the scale of row r in int16 lanes 2r, 2r+1 */
    _Alignas(32) int16_t mp[KSB][8][16];  /* Q4/Q5_K: [min_j, min_j]; Q6_K: [sc_2j, sc_2j+1] */
    _Alignas(32) float d[KSB][TR];
    _Alignas(32) float dmin[KSB][TR];
} tileK_t;

ALWAYS_INLINE size_t kq_wbs(int kind) {
    return kind == K_Q4 ? sizeof(blk_q4_K) : kind == K_Q5 ? sizeof(blk_q5_K) : sizeof(blk_q6_K);
}

ALWAYS_INLINE void repackK(int kind, const uint8_t *W, size_t wrb, int nr, int nsb, tileK_t *S) {
    const size_t wbs = kq_wbs(kind);
    for (int sb = 0; sb < nsb; sb++) {
        _Alignas(32) uint8_t tmp[TR][256];
        for (int r = 0; r < TR; r++) {
            __m256i v[8];
            const uint8_t *blk = W + (size_t)r * wrb + (size_t)sb * wbs;
            if (r >= nr) {
                for (int s = 0; s < 8; s++) v[s] = _mm256_setzero_si256();
                for (int j = 0; j < 16; j++) { S->sc[sb][j][2 * r] = 0; S->sc[sb][j][2 * r + 1] = 0; }
                for (int j = 0; j < 8; j++) { S->mp[sb][j][2 * r] = 0; S->mp[sb][j][2 * r + 1] = 0; }
                S->d[sb][r] = 0;
                S->dmin[sb][r] = 0;
            } else if (kind == K_Q6) {
                const blk_q6_K *a = (const blk_q6_K *)blk;
                q6k_unpack_u8(a, v);
                for (int j = 0; j < 16; j++) { S->sc[sb][j][2 * r] = a->scales[j]; S->sc[sb][j][2 * r + 1] = a->scales[j]; }
                for (int j = 0; j < 8; j++) { S->mp[sb][j][2 * r] = a->scales[2 * j]; S->mp[sb][j][2 * r + 1] = a->scales[2 * j + 1]; }
                S->d[sb][r] = h2f(a->d);
                S->dmin[sb][r] = 0;
            } else {
                const uint8_t *scales;
                uint16_t dh, dminh;
                if (kind == K_Q5) {
                    const blk_q5_K *a = (const blk_q5_K *)blk;
                    q5k_unpack_u8(a, v);
                    scales = a->scales; dh = a->d; dminh = a->dmin;
                } else {
                    const blk_q4_K *a = (const blk_q4_K *)blk;
                    q4k_unpack_u8(a, v);
                    scales = a->scales; dh = a->d; dminh = a->dmin;
                }
                uint8_t sc[8], mn[8];
                qi_unpack_k4_scales(scales, sc, mn);
                for (int j = 0; j < 8; j++) {
                    S->sc[sb][j][2 * r] = sc[j]; S->sc[sb][j][2 * r + 1] = sc[j];
                    S->mp[sb][j][2 * r] = mn[j]; S->mp[sb][j][2 * r + 1] = mn[j];
                }
                S->d[sb][r] = h2f(dh);
                S->dmin[sb][r] = h2f(dminh);
            }
            for (int s = 0; s < 8; s++) _mm256_store_si256((__m256i *)(tmp[r] + 32 * s), v[s]);
        }
        for (int s = 0; s < 8; s++) {
            __m256i v[8];
            for (int r = 0; r < TR; r++) v[r] = _mm256_load_si256((const __m256i *)(tmp[r] + 32 * s));
            transpose8x8_epi32(v);
            for (int g = 0; g < 8; g++) _mm256_store_si256((__m256i *)S->q[sb][8 * s + g], v[g]);
        }
    }
}

ALWAYS_INLINE void kernK(int kind, int T, const tileK_t *S, int nsb, const blk_q8_K *const *xk,
                         __m256 *acc) {
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int sb = 0; sb < nsb; sb++) {
        __m256i is[TT], p[TT];
        if (kind == K_Q6) {
            /* 16 groups of 16 weights (4 k-groups); maddubs <= 2*63*127, two per int16 sum */
#pragma GCC unroll 1
            for (int j = 0; j < 16; j++) {
                __m256i scv = _mm256_load_si256((const __m256i *)S->sc[sb][j]);
#pragma GCC unroll 2
                for (int h = 0; h < 2; h++) {
#pragma GCC unroll 2
                    for (int g = 0; g < 2; g++) {
                        const int kg = 4 * j + 2 * h + g;
                        __m256i w = _mm256_load_si256((const __m256i *)S->q[sb][kg]);
#pragma GCC unroll 4
                        for (int t = 0; t < T; t++) {
                            __m256i m = _mm256_maddubs_epi16(w, bcast32(xk[t][sb].qs + 4 * kg));
                            p[t] = g ? _mm256_add_epi16(p[t], m) : m;
                        }
                    }
#pragma GCC unroll 4
                    for (int t = 0; t < T; t++) {
                        __m256i m = _mm256_madd_epi16(p[t], scv);
                        is[t] = (j | h) ? _mm256_add_epi32(is[t], m) : m;
                    }
                }
            }
        } else {
            /* 8 groups of 32 weights (8 k-groups) */
#pragma GCC unroll 1
            for (int j = 0; j < 8; j++) {
                __m256i scv = _mm256_load_si256((const __m256i *)S->sc[sb][j]);
                const int per = kind == K_Q4 ? 8 : 4; /* maddubs per int16 accumulator */
#pragma GCC unroll 2
                for (int h = 0; h < 8 / per; h++) {
#pragma GCC unroll 8
                    for (int g = 0; g < per; g++) {
                        const int kg = 8 * j + per * h + g;
                        __m256i w = _mm256_load_si256((const __m256i *)S->q[sb][kg]);
#pragma GCC unroll 4
                        for (int t = 0; t < T; t++) {
                            __m256i m = _mm256_maddubs_epi16(w, bcast32(xk[t][sb].qs + 4 * kg));
                            p[t] = g ? _mm256_add_epi16(p[t], m) : m;
                        }
                    }
#pragma GCC unroll 4
                    for (int t = 0; t < T; t++) {
                        __m256i m = _mm256_madd_epi16(p[t], scv);
                        is[t] = (j | h) ? _mm256_add_epi32(is[t], m) : m;
                    }
                }
            }
        }
        /* mins (Q4/Q5_K) or the -32 offset (Q6_K) through the activation group sums */
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            __m256i mv = _mm256_load_si256((const __m256i *)S->mp[sb][j]);
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) {
                __m256i m = _mm256_madd_epi16(mv, bcast32(xk[t][sb].bsums + 2 * j));
                p[t] = j ? _mm256_add_epi32(p[t], m) : m;
            }
        }
        __m256 dv = _mm256_load_ps(S->d[sb]);
        if (kind == K_Q6) {
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) {
                __m256i tot = _mm256_sub_epi32(is[t], _mm256_slli_epi32(p[t], 5));
                __m256 xd = _mm256_broadcast_ss(&xk[t][sb].d);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tot), _mm256_mul_ps(dv, xd), acc[t]);
            }
        } else {
            __m256 dmv = _mm256_load_ps(S->dmin[sb]);
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) {
                __m256 xd = _mm256_broadcast_ss(&xk[t][sb].d);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[t]), _mm256_mul_ps(dv, xd), acc[t]);
                acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(p[t]), _mm256_mul_ps(dmv, xd), acc[t]);
            }
        }
    }
}

ALWAYS_INLINE void runK(int kind, int T, const tileK_t *S, int nsb, const uint8_t *X, size_t xrb,
                        int sb0, int tok, float *Y, int64_t ldy, int row, int nr, bool accum) {
    const blk_q8_K *xk[TT];
    __m256 acc[TT];
    for (int t = 0; t < T; t++) xk[t] = (const blk_q8_K *)(X + (size_t)(tok + t) * xrb) + sb0;
    kernK(kind, T, S, nsb, xk, acc);
    for (int t = 0; t < T; t++) store_rows(Y + (int64_t)(tok + t) * ldy + row, acc[t], nr, accum);
}

ALWAYS_INLINE void gemmK(int kind, const void *W, size_t wrb, int64_t n_cols, int r0, int r1,
                         const void *X, size_t xrb, int n_tok, float *Y, int64_t ldy) {
    const size_t wbs = kq_wbs(kind);
    const int nb = (int)(n_cols / QK_K);
    tileK_t S;
    for (int sb0 = 0; sb0 < nb; sb0 += KSB) {
        const int nsb = nb - sb0 < KSB ? nb - sb0 : KSB;
        const bool accum = sb0 > 0;
        for (int row = r0; row < r1; row += TR) {
            const int nr = r1 - row < TR ? r1 - row : TR;
            repackK(kind, (const uint8_t *)W + (size_t)row * wrb + (size_t)sb0 * wbs, wrb, nr, nsb, &S);
            int tt = 0;
            for (; tt + TT <= n_tok; tt += TT)
                runK(kind, TT, &S, nsb, X, xrb, sb0, tt, Y, ldy, row, nr, accum);
            switch (n_tok - tt) {
            case 3: runK(kind, 3, &S, nsb, X, xrb, sb0, tt, Y, ldy, row, nr, accum); break;
            case 2: runK(kind, 2, &S, nsb, X, xrb, sb0, tt, Y, ldy, row, nr, accum); break;
            case 1: runK(kind, 1, &S, nsb, X, xrb, sb0, tt, Y, ldy, row, nr, accum); break;
            default: break;
            }
        }
    }
}

/* ----- dispatch ----- */

static qk_dot_fn g_dot[QT_COUNT];

static void gemm_dots(int t, const void *W, size_t wrb, int64_t n_cols, int r0, int r1,
                      const void *X, size_t xrb, int n_tok, float *Y, int64_t ldy) {
    quant_gemm_loop(g_dot[t], W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy);
}

static void gemm_tiled(int t, const void *W, size_t wrb, int64_t n_cols, int r0, int r1,
                       const void *X, size_t xrb, int n_tok, float *Y, int64_t ldy) {
    if (n_tok < GEMM_MIN_TOK) {
        gemm_dots(t, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy);
        return;
    }
    switch (t) {
    case QT_Q4_0: gemm32(L_Q4_0, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    case QT_Q4_1: gemm32(L_Q4_1, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    case QT_Q5_0: gemm32(L_Q5_0, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    case QT_Q5_1: gemm32(L_Q5_1, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    case QT_Q8_0: gemm32(L_Q8_0, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    case QT_Q4_K: gemmK(K_Q4, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    case QT_Q5_K: gemmK(K_Q5, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    case QT_Q6_K: gemmK(K_Q6, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    default: gemm_dots(t, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    }
}

void quant_avx2_register(struct quant_kernels *k) {
    k->f16_to_f32_row = f16_to_f32_row;
    k->f32_to_f16_row = f32_to_f16_row;

    k->quant[QT_Q8_0] = qnt_q8_0;
    k->quant[QT_Q8_1] = qnt_q8_1;
    k->quant[QT_Q8_K] = qnt_q8_K;
    k->quant[QT_F16] = qnt_f16;

    k->dequant[QT_F16] = deq_f16;
    k->dequant[QT_BF16] = deq_bf16;
    k->dequant[QT_Q4_0] = deq_q4_0;
    k->dequant[QT_Q4_1] = deq_q4_1;
    k->dequant[QT_Q5_0] = deq_q5_0;
    k->dequant[QT_Q5_1] = deq_q5_1;
    k->dequant[QT_Q8_0] = deq_q8_0;
    k->dequant[QT_Q4_K] = deq_q4_K;
    k->dequant[QT_Q5_K] = deq_q5_K;
    k->dequant[QT_Q6_K] = deq_q6_K;

    k->dot[QT_F32] = dot_f32;
    k->dot[QT_F16] = dot_f16;
    k->dot[QT_BF16] = dot_bf16;
    k->dot[QT_Q4_0] = dot_q4_0;
    k->dot[QT_Q4_1] = dot_q4_1;
    k->dot[QT_Q5_0] = dot_q5_0;
    k->dot[QT_Q5_1] = dot_q5_1;
    k->dot[QT_Q8_0] = dot_q8_0;
    k->dot[QT_Q4_K] = dot_q4_K;
    k->dot[QT_Q5_K] = dot_q5_K;
    k->dot[QT_Q6_K] = dot_q6_K;

    for (int t = 0; t < QT_COUNT; t++) {
        g_dot[t] = k->dot[t];
        if (k->dot[t]) k->gemm[t] = gemm_tiled;
    }
}
