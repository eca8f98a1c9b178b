/* quant_avx2.c — AVX2/FMA/F16C kernels (this file alone is compiled with -mavx2 -mfma -mf16c;
 * quant.c calls quant_avx2_register only after checking the CPU).
 *
 * Contents: fp16 rows; activation quantizers Q8_0/Q8_1/Q8_K (bit-identical to the reference);
 * dequantization; dot products (one weight row x one activation row); the one-token GEMV; the
 * tiled GEMM. quant_gemm picks: n_tok < 4 -> the one-token kernels token by token, else tiled.
 *
 * Tiled GEMM ("row-interleaved" layout). A tile of 8 weight rows is unpacked to one byte per
 * weight and stored so that one 32-byte vector holds 4 consecutive weights (a "k-group") of each
 * of the 8 rows: [r0 k..k+3, r1 k..k+3, ..., r7 k..k+3]. For a token, the matching 4 activation
 * bytes are broadcast to all 8 lanes (one vpbroadcastd from memory), and one maddubs computes
 * partial dot products for all 8 rows at once. The int16 results of a whole block stay in one
 * register (no horizontal reductions, no per-(row,token) shuffles); per block and token there is
 * a single int->float conversion and two FMAs for 8 rows. Each unpacked weight vector is reused
 * for 4 tokens from registers, and the unpacked tile (L1-resident) for every token. The tile is
 * rebuilt once per 128 tokens (the activation scales of 128 tokens are converted to float once).
 *
 * One-token GEMV (legacy formats): the same layout, built in registers per block for 8 rows
 * (in-lane dword transposes of 16-byte loads), with the row scales fetched by one gather and a
 * software prefetch running ahead (8 interleaved short row streams defeat the hardware
 * prefetcher). K-quants decode with per-row dot products plus the same prefetch.
 *
 * All paths compute every output with the same float operations in the same order (see "bit-
 * identical accumulation" below): results do not depend on the batch size, the thread split, or
 * quant_vec_dot vs quant_gemm.
 *
 * Stack use: at most ~48 KB (tiled legacy GEMM: tile 10 KB + activation scales 34 KB).
 */
#include <immintrin.h>
#include <stdbool.h>
#include <stdint.h>
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

/* a*b + c with one rounding (the scalar twin of _mm256_fmadd_ps) */
ALWAYS_INLINE float fma1(float a, float b, float c) {
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}

ALWAYS_INLINE __m256i bcast32(const void *p) {
    int v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

ALWAYS_INLINE __m256i loadu256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* prefetch base + off (integer arithmetic: the address may lie past the end of the tensor, and
 * prefetches never fault) */
ALWAYS_INLINE void prefetch_at(const void *base, size_t off) {
    _mm_prefetch((const char *)((uintptr_t)base + off), _MM_HINT_T0);
}

/* The one-token kernels over packed weights read one contiguous stream; the hardware prefetcher
 * alone leaves it at half the machine's streaming rate (Qwen2.5's Q4_K matrices, one core:
 * 6.8 GB/s, 9.3 with this). Each block asks for the lines of the block PF_PACKED (PF_PACKED32)
 * bytes ahead (integer arithmetic, past the end is harmless); the distances were tuned on the
 * 2-core machine among 0, 1024, 2048, 4096 and 8192. */
#define PF_PACKED 4096   /* K-quants (1216/2208-byte blocks) */
#define PF_PACKED32 1024 /* Q4_0/Q4_1/Q8_0 (160/288-byte blocks) */
ALWAYS_INLINE void prefetch_block(const void *base, size_t off, size_t len, size_t dist) {
    for (size_t o = 0; o < len; o += 64) prefetch_at(base, off + dist + o);
}

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

/* ---- bit-identical accumulation ----------------------------------------------------------
 * Every path (tiled GEMM, one-token GEMV, these dot products) computes each output with the
 * same float operations in the same order, so results do not depend on the number of tokens in
 * a call, on the thread split, or on quant_vec_dot vs quant_gemm:
 *   legacy formats, per block b (exact integer isum = sum q*x, q unsigned for Q4/Q5):
 *       acc = fma(isum, d_w*d_x, acc);  acc = fma(m_w, e_x, acc)   (no second step for Q8_0)
 *     with m_w = d_w for Q4_0/Q5_0 and e_x = s_x (Q8_1) or off*d_x*sum(x) (off = -8/-16);
 *   K-quants, per super-block (exact integers isum and msum):
 *       acc = fma(isum, d_w*d_x, acc);  acc = fma(-msum, dmin_w*d_x, acc)   (Q4_K/Q5_K)
 *       acc = fma(isum - 32*bsum, d_w*d_x, acc)                             (Q6_K)
 *   accumulated in chunks of KB32 blocks / KSB super-blocks: total = c0 + c1 + c2 ... */
#define KB32 32   /* legacy blocks per K-chunk (1024 weights) */
#define KSB 4     /* K-quant super-blocks per K-chunk (1024 weights) */

/* exact sum of q*x over one block (q unsigned for Q4/Q5, signed for Q8_0) */
ALWAYS_INLINE int legacy_block_isum(int kind, const void *wb, const int8_t *xq) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i qx = loadu256(xq);
    __m256i p;
    if (kind == 4) {
        __m256i qw = loadu256(((const blk_q8_0 *)wb)->qs);
        p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw)), ones);
    } else {
        __m256i qw;
        if (kind == 0) qw = unpack_nib32(((const blk_q4_0 *)wb)->qs);
        else if (kind == 1) qw = unpack_nib32(((const blk_q4_1 *)wb)->qs);
        else if (kind == 2) qw = _mm256_or_si256(unpack_nib32(((const blk_q5_0 *)wb)->qs), q5_hbits(((const blk_q5_0 *)wb)->qh));
        else qw = _mm256_or_si256(unpack_nib32(((const blk_q5_1 *)wb)->qs), q5_hbits(((const blk_q5_1 *)wb)->qh));
        p = _mm256_madd_epi16(_mm256_maddubs_epi16(qw, qx), ones);
    }
    return hsum_epi32(p);
}

/* exact sum of the 32 int8 of an activation block */
ALWAYS_INLINE int q8_block_sum(const int8_t *q8) {
    __m256i q = loadu256(q8);
    __m256i lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q));
    __m256i hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1));
    return hsum_epi32(_mm256_madd_epi16(_mm256_add_epi16(lo, hi), _mm256_set1_epi16(1)));
}

/* kind: 0 = Q4_0, 1 = Q4_1, 2 = Q5_0, 3 = Q5_1, 4 = Q8_0 (same order as the L_* ids) */
ALWAYS_INLINE float dot_legacy(int kind, int64_t n, const void *w, const void *x) {
    const size_t wbs = kind == 0 ? sizeof(blk_q4_0) : kind == 1 ? sizeof(blk_q4_1)
                     : kind == 2 ? sizeof(blk_q5_0) : kind == 3 ? sizeof(blk_q5_1) : sizeof(blk_q8_0);
    const bool q81 = kind == 1 || kind == 3;
    const size_t xbs = q81 ? sizeof(blk_q8_1) : sizeof(blk_q8_0);
    const size_t xqo = q81 ? 4 : 2;
    const float off = kind == 0 ? -8.0f : kind == 2 ? -16.0f : 0.0f;
    const uint8_t *pw = w, *px = x;
    const int64_t nb = n / QK32;
    float total = 0, acc = 0;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *wb = pw + i * wbs, *xb = px + i * xbs;
        uint16_t hw[2], hx[2];
        memcpy(hw, wb, 4);
        memcpy(hx, xb, 4);
        const float dw = h2f(hw[0]), dx = h2f(hx[0]);
        const int is = legacy_block_isum(kind, wb, (const int8_t *)(xb + xqo));
        acc = fma1((float)is, dw * dx, acc);
        if (q81) acc = fma1(h2f(hw[1]), h2f(hx[1]), acc);
        else if (kind != 4) acc = fma1(dw, off * dx * (float)q8_block_sum((const int8_t *)(xb + xqo)), acc);
        if ((i + 1) % KB32 == 0 || i + 1 == nb) {
            total = i < KB32 ? acc : acc + total;
            acc = 0;
        }
    }
    return total;
}

static float dot_q4_0(int64_t n, const void *w, const void *x) { return dot_legacy(0, n, w, x); }
static float dot_q4_1(int64_t n, const void *w, const void *x) { return dot_legacy(1, n, w, x); }
static float dot_q5_0(int64_t n, const void *w, const void *x) { return dot_legacy(2, n, w, x); }
static float dot_q5_1(int64_t n, const void *w, const void *x) { return dot_legacy(3, n, w, x); }
static float dot_q8_0(int64_t n, const void *w, const void *x) { return dot_legacy(4, n, w, x); }

/* pshufb index that broadcasts int16 element e (0..7) of each 128-bit lane */
ALWAYS_INLINE __m256i bcast16_idx(int e) { return _mm256_set1_epi16((short)(0x0100 * (2 * e + 1) + 2 * e)); }
/* ... element a in the low lane and element b in the high lane */
ALWAYS_INLINE __m256i bcast16_idx2(int a, int b) {
    return _mm256_setr_m128i(_mm_set1_epi16((short)(0x0100 * (2 * a + 1) + 2 * a)),
                             _mm_set1_epi16((short)(0x0100 * (2 * b + 1) + 2 * b)));
}

/* pf: software prefetch distance in bytes ahead of the block being read (0: none) */
ALWAYS_INLINE float dot_k45(bool five, int64_t n, const void *w, const void *x, size_t pf) {
    const blk_q8_K *b = x;
    const int64_t nb = n / QK_K;
    const size_t wbs = five ? sizeof(blk_q5_K) : sizeof(blk_q4_K);
    float acc = 0, total = 0;
    for (int64_t i = 0; i < nb; i++) {
        if (pf)
            for (size_t o = 0; o < wbs; o += 64) prefetch_at(w, (size_t)i * wbs + pf + o);
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
        /* 16 bytes [sc0..7 | mn0..7] -> int16 */
        uint32_t u0 = qi_load_u32(scales), u1 = qi_load_u32(scales + 4), u2 = qi_load_u32(scales + 8);
        uint32_t sa = u0 & 0x3F3F3F3Fu, ma = u1 & 0x3F3F3F3Fu;
        uint32_t sb = (u2 & 0x0F0F0F0Fu) | (((u0 >> 6) & 0x03030303u) << 4);
        uint32_t mb = ((u2 >> 4) & 0x0F0F0F0Fu) | (((u1 >> 6) & 0x03030303u) << 4);
        __m256i s16 = _mm256_cvtepu8_epi16(_mm_setr_epi32((int)sa, (int)sb, (int)ma, (int)mb));
        __m256i sc = _mm256_permute2x128_si256(s16, s16, 0x00);
        __m256i mdup = _mm256_permute4x64_epi64(s16, 0xFA); /* [mn0..3 mn0..3 | mn4..7 mn4..7] */
        mdup = _mm256_unpacklo_epi16(mdup, mdup);
        __m256i mv = _mm256_madd_epi16(loadu256(b[i].bsums), mdup);
        __m256i s0 = _mm256_setzero_si256(), s1 = s0;
#pragma GCC unroll 4
        for (int g = 0; g < 8; g += 2) {
            __m256i p0 = _mm256_maddubs_epi16(v[g], loadu256(b[i].qs + 32 * g));
            __m256i p1 = _mm256_maddubs_epi16(v[g + 1], loadu256(b[i].qs + 32 * g + 32));
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(p0, _mm256_shuffle_epi8(sc, bcast16_idx(g))));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(p1, _mm256_shuffle_epi8(sc, bcast16_idx(g + 1))));
        }
        const float xd = b[i].d;
        acc = fma1((float)hsum_epi32(_mm256_add_epi32(s0, s1)), h2f(dh) * xd, acc);
        acc = fma1(-(float)hsum_epi32(mv), h2f(dminh) * xd, acc);
        if ((i + 1) % KSB == 0 || i + 1 == nb) {
            total = i < KSB ? acc : acc + total;
            acc = 0;
        }
    }
    return total;
}

static float dot_q4_K(int64_t n, const void *w, const void *x) { return dot_k45(false, n, w, x, 0); }
static float dot_q5_K(int64_t n, const void *w, const void *x) { return dot_k45(true, n, w, x, 0); }

ALWAYS_INLINE float dot_q6k_impl(int64_t n, const void *w, const void *x, size_t pf) {
    const blk_q6_K *a = w;
    const blk_q8_K *b = x;
    const int64_t nb = n / QK_K;
    float acc = 0, total = 0;
    for (int64_t i = 0; i < nb; i++) {
        if (pf)
            for (size_t o = 0; o < sizeof(blk_q6_K); o += 64) prefetch_at(a, (size_t)i * sizeof(blk_q6_K) + pf + o);
        __m256i v[8];
        q6k_unpack_u8(&a[i], v);
        __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)a[i].scales));
        __m256i bias = _mm256_madd_epi16(loadu256(b[i].bsums), sc16);
        __m256i slo = _mm256_permute2x128_si256(sc16, sc16, 0x00), shi = _mm256_permute2x128_si256(sc16, sc16, 0x11);
        __m256i s0 = _mm256_setzero_si256(), s1 = s0;
#pragma GCC unroll 4
        for (int s = 0; s < 8; s += 2) {
            /* v[s] holds groups 2s (low lane) and 2s+1 (high lane) */
            __m256i c0 = _mm256_shuffle_epi8(s < 4 ? slo : shi, bcast16_idx2((2 * s) & 7, (2 * s + 1) & 7));
            __m256i c1 = _mm256_shuffle_epi8(s < 4 ? slo : shi, bcast16_idx2((2 * s + 2) & 7, (2 * s + 3) & 7));
            __m256i p0 = _mm256_maddubs_epi16(v[s], loadu256(b[i].qs + 32 * s));
            __m256i p1 = _mm256_maddubs_epi16(v[s + 1], loadu256(b[i].qs + 32 * s + 32));
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(p0, c0));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(p1, c1));
        }
        __m256i tot = _mm256_sub_epi32(_mm256_add_epi32(s0, s1), _mm256_slli_epi32(bias, 5));
        acc = fma1((float)hsum_epi32(tot), h2f(a[i].d) * b[i].d, acc);
        if ((i + 1) % KSB == 0 || i + 1 == nb) {
            total = i < KSB ? acc : acc + total;
            acc = 0;
        }
    }
    return total;
}

static float dot_q6_K(int64_t n, const void *w, const void *x) { return dot_q6k_impl(n, w, x, 0); }

/* one token, K-quants: row by row (the rows of a tensor are contiguous, so a fixed prefetch
 * distance runs ahead across row ends) */
#define PF_BYTES 12288 /* software prefetch distance of the one-token kernels */
ALWAYS_INLINE void gemv_kq_rows(int t, const void *W, size_t wrb, int64_t n_cols, int r0, int r1,
                               const void *X, float *Y, size_t pf) {
    for (int r = r0; r < r1; r++) {
        const uint8_t *w = (const uint8_t *)W + (size_t)r * wrb;
        Y[r] = t == QT_Q4_K ? dot_k45(false, n_cols, w, X, pf)
             : t == QT_Q5_K ? dot_k45(true, n_cols, w, X, pf) : dot_q6k_impl(n_cols, w, X, pf);
    }
}

static void gemv_kq(int t, const void *W, size_t wrb, int64_t n_cols, int r0, int r1,
                    const void *X, float *Y) {
    /* prefetch across row ends only when the rows are packed back to back */
    const size_t blk = t == QT_Q4_K ? sizeof(blk_q4_K) : t == QT_Q5_K ? sizeof(blk_q5_K) : sizeof(blk_q6_K);
    const size_t pf = n_cols % QK_K == 0 && (size_t)(n_cols / QK_K) * blk == wrb ? PF_BYTES : 0;
    if (t == QT_Q4_K) gemv_kq_rows(QT_Q4_K, W, wrb, n_cols, r0, r1, X, Y, pf);
    else if (t == QT_Q5_K) gemv_kq_rows(QT_Q5_K, W, wrb, n_cols, r0, r1, X, Y, pf);
    else gemv_kq_rows(QT_Q6_K, W, wrb, n_cols, r0, r1, X, Y, pf);
}

/* ---- tiled GEMM ---------------------------------------------------------------------------- */

#define TR 8      /* weight rows per tile (one per int32 lane) */
#define TT 4      /* tokens per register tile */
#define TCH 128   /* tokens per activation-scale chunk */
#define GEMV_MAX_TOK 4 /* fewer tokens: one-token kernels, token by token */

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

/* activation scales of a token chunk: [0] = d_x, [1] = second term (s_x, or off*d_x*sum(q)) */
#define XS_ROWS (TCH + TT)
typedef struct {
    _Alignas(32) float v[2][XS_ROWS][KB32];
} xscale_t;

/* keeps the compiler from re-associating the int16 sums into a tree (which spills) */
#define BARRIER4(a, b, c, d) __asm__("" : "+x"(a), "+x"(b), "+x"(c), "+x"(d))

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
            float d = 0, m = 0;
            if (r < nr) {
                uint16_t h[2];
                memcpy(h, W + (size_t)r * wrb + (size_t)b * wbs, 4);
                d = h2f(h[0]);
                m = (kind == L_Q4_1 || kind == L_Q5_1) ? h2f(h[1]) : d;
            }
            S->d[b][r] = d;
            S->m[b][r] = m;
        }
    }
}

/* ----- pre-packed legacy weights (quant_pack): the tiles of repack32, made once ----- */

/* A packed tensor is a run of row tiles (8 rows; the last one padded with zero rows), each the
 * n_cols/32 blocks of its rows in order; one block (pk_bs bytes, a multiple of 32) holds the
 * transposed quants, then the 8 rows' d (fp16), then (Q4_1) the 8 rows' m (fp16):
 *   Q4_0/Q4_1: 4 x 32 bytes, vector g' lane r = bytes 4g'..4g'+3 of row r's qs (low nibbles:
 *              k-group g', high nibbles: k-group g'+4), 16 bytes d, 16 bytes m (zero for Q4_0)
 *   Q8_0:      8 x 32 bytes, vector g lane r = qs bytes 4g..4g+3 of row r, 16 bytes d, 16 pad
 * (160 bytes, as many as 8 Q4_1 blocks; Q4_0 1.11x; Q8_0 1.06x). The packed kernel computes what
 * kern32x4 computes on repack32's tiles, in the same float order, so results are bit-identical
 * with the unpacked path and the one-token kernels. */
ALWAYS_INLINE int pk_kind(int t) {
    return t == QT_Q4_0 ? L_Q4_0 : t == QT_Q4_1 ? L_Q4_1 : t == QT_Q8_0 ? L_Q8_0 : -1;
}
ALWAYS_INLINE size_t pk_qbytes(int kind) { return kind == L_Q8_0 ? 256 : 128; }
ALWAYS_INLINE size_t pk_bs(int kind) { return pk_qbytes(kind) + 32; }

/* kern32x4's weight sources: repack32's tile S (packed = false) or a packed run P */
ALWAYS_INLINE __m256i w32(int kind, bool packed, const tile32_t *S, const uint8_t *P, int b, int g) {
    if (!packed) return _mm256_load_si256((const __m256i *)S->q[b][g]);
    const uint8_t *blk = P + (size_t)b * pk_bs(kind);
    if (kind == L_Q8_0) return _mm256_load_si256((const __m256i *)(blk + 32 * g));
    const __m256i v = _mm256_load_si256((const __m256i *)(blk + 32 * (g & 3)));
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    return g < 4 ? _mm256_and_si256(v, m4) : _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
}
ALWAYS_INLINE __m256 d32(int kind, bool packed, const tile32_t *S, const uint8_t *P, int b) {
    if (!packed) return _mm256_load_ps(S->d[b]);
    return _mm256_cvtph_ps(_mm_load_si128((const __m128i *)(P + (size_t)b * pk_bs(kind) + pk_qbytes(kind))));
}
ALWAYS_INLINE __m256 m32(int kind, bool packed, const tile32_t *S, const uint8_t *P, int b) {
    if (!packed) return _mm256_load_ps(S->m[b]);
    if (kind != L_Q4_1) return d32(kind, packed, S, P, b); /* Q4_0: the offset term scales by d */
    return _mm256_cvtph_ps(_mm_load_si128((const __m128i *)(P + (size_t)b * pk_bs(kind) + pk_qbytes(kind) + 16)));
}

/* 4 tokens x 8 rows over nbk blocks. x0..x3: first activation block of the chunk of each token;
 * xs: the scale rows of token 0 (tokens 1..3 follow at +KB32). Results in out[0..3]. */
ALWAYS_INLINE void kern32x4(int kind, bool packed, const tile32_t *S, const uint8_t *P, int nbk, const uint8_t *x0,
                            const uint8_t *x1, const uint8_t *x2, const uint8_t *x3,
                            const float *xs, __m256 out[4]) {
    const bool q81 = kind == L_Q4_1 || kind == L_Q5_1;
    const size_t xbs = q81 ? sizeof(blk_q8_1) : sizeof(blk_q8_0);
    const size_t xqo = q81 ? 4 : 2;
    const bool has_m = kind != L_Q8_0;
    const __m256i ones = _mm256_set1_epi16(1);
    const float *xb = xs + XS_ROWS * KB32;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int b = 0; b < nbk; b++) {
        const size_t xo = (size_t)b * xbs + xqo;
        const uint8_t *y0 = x0 + xo, *y1 = x1 + xo, *y2 = x2 + xo, *y3 = x3 + xo;
        __m256i s0, s1, s2, s3;
        if (kind == L_Q4_0 || kind == L_Q4_1 || kind == L_Q5_0 || kind == L_Q5_1) {
            /* 4-bit: 8 maddubs (each <= 2*15*127) fit an int16 sum; 5-bit: 4 */
            const int per = (kind == L_Q4_0 || kind == L_Q4_1) ? 8 : 4;
            __m256i p0 = _mm256_setzero_si256(), p1 = p0, p2 = p0, p3 = p0;
            s0 = s1 = s2 = s3 = p0;
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) {
                __m256i w = w32(kind, packed, S, P, b, g);
                __m256i m0 = _mm256_maddubs_epi16(w, bcast32(y0 + 4 * g));
                __m256i m1 = _mm256_maddubs_epi16(w, bcast32(y1 + 4 * g));
                __m256i m2 = _mm256_maddubs_epi16(w, bcast32(y2 + 4 * g));
                __m256i m3 = _mm256_maddubs_epi16(w, bcast32(y3 + 4 * g));
                if (g % per == 0) {
                    p0 = m0; p1 = m1; p2 = m2; p3 = m3;
                } else {
                    p0 = _mm256_add_epi16(p0, m0); p1 = _mm256_add_epi16(p1, m1);
                    p2 = _mm256_add_epi16(p2, m2); p3 = _mm256_add_epi16(p3, m3);
                }
                BARRIER4(p0, p1, p2, p3);
                if (g % per == per - 1) {
                    s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(p0, ones));
                    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(p1, ones));
                    s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(p2, ones));
                    s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(p3, ones));
                }
            }
        } else {
            /* signed 8-bit: |w| * sign(x, w), widened every step */
            s0 = s1 = s2 = s3 = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) {
                __m256i w = w32(kind, packed, S, P, b, g);
                __m256i aw = _mm256_sign_epi8(w, w);
                s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast32(y0 + 4 * g), w)), ones));
                s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast32(y1 + 4 * g), w)), ones));
                s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast32(y2 + 4 * g), w)), ones));
                s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast32(y3 + 4 * g), w)), ones));
                BARRIER4(s0, s1, s2, s3);
            }
        }
        __m256 dw = d32(kind, packed, S, P, b);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(dw, _mm256_broadcast_ss(xs + b)), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(dw, _mm256_broadcast_ss(xs + KB32 + b)), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s2), _mm256_mul_ps(dw, _mm256_broadcast_ss(xs + 2 * KB32 + b)), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s3), _mm256_mul_ps(dw, _mm256_broadcast_ss(xs + 3 * KB32 + b)), a3);
        if (has_m) {
            __m256 mw = m32(kind, packed, S, P, b);
            a0 = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(xb + b), a0);
            a1 = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(xb + KB32 + b), a1);
            a2 = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(xb + 2 * KB32 + b), a2);
            a3 = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(xb + 3 * KB32 + b), a3);
        }
    }
    out[0] = a0; out[1] = a1; out[2] = a2; out[3] = a3;
}

/* One token x 8 rows over a packed run: kern32x4's arithmetic for one token (the one-token
 * product of a packed tensor, memory-bound: one contiguous stream instead of 8 rows) */
ALWAYS_INLINE __m256 kern32px1(int kind, const uint8_t *P, int nbk, const uint8_t *x0, const float *xs) {
    const bool q81 = kind == L_Q4_1;
    const size_t xbs = q81 ? sizeof(blk_q8_1) : sizeof(blk_q8_0);
    const size_t xqo = q81 ? 4 : 2;
    const __m256i ones = _mm256_set1_epi16(1);
    const float *xb = xs + XS_ROWS * KB32;
    __m256 a0 = _mm256_setzero_ps();
    for (int b = 0; b < nbk; b++) {
        const uint8_t *y0 = x0 + (size_t)b * xbs + xqo;
        __m256i s0 = _mm256_setzero_si256();
        prefetch_block(P, (size_t)b * pk_bs(kind), pk_bs(kind), PF_PACKED32);
        if (kind != L_Q8_0) {
            __m256i p0 = s0;
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++)
                p0 = _mm256_add_epi16(p0, _mm256_maddubs_epi16(w32(kind, true, NULL, P, b, g), bcast32(y0 + 4 * g)));
            s0 = _mm256_madd_epi16(p0, ones);
        } else {
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) {
                __m256i w = w32(kind, true, NULL, P, b, g);
                s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(bcast32(y0 + 4 * g), w)), ones));
            }
        }
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(d32(kind, true, NULL, P, b), _mm256_broadcast_ss(xs + b)), a0);
        if (kind != L_Q8_0) a0 = _mm256_fmadd_ps(m32(kind, true, NULL, P, b), _mm256_broadcast_ss(xb + b), a0);
    }
    return a0;
}

ALWAYS_INLINE void prefetch_rows(const float *y) { _mm_prefetch((const char *)y, _MM_HINT_T0); }

/* Many tokens: a packed run expanded into repack32's tile once (cheaper than unpacking it for
 * every 4 tokens); the same tile as repack32 builds from the original rows */
#define EXPAND_TOK 16   /* K-quants */
#define EXPAND32_TOK 32 /* legacy formats */
ALWAYS_INLINE void expand32(int kind, const uint8_t *P, int nbk, tile32_t *S) {
    for (int b = 0; b < nbk; b++) {
        for (int g = 0; g < 8; g++) _mm256_store_si256((__m256i *)S->q[b][g], w32(kind, true, NULL, P, b, g));
        _mm256_store_ps(S->d[b], d32(kind, true, NULL, P, b));
        _mm256_store_ps(S->m[b], m32(kind, true, NULL, P, b));
    }
}

/* packed: Pk is quant_pack's copy of W (r0 a multiple of TR) and tiles are read, not built */
ALWAYS_INLINE void gemm32(int kind, bool packed, const uint8_t *Pk, const void *W, size_t wrb,
                          int64_t n_cols, int r0, int r1, const void *X, size_t xrb, int n_tok,
                          float *Y, int64_t ldy) {
    const bool q81 = kind == L_Q4_1 || kind == L_Q5_1;
    const size_t xbs = q81 ? sizeof(blk_q8_1) : sizeof(blk_q8_0);
    const size_t wbs = legacy_wbs(kind);
    const float off = kind == L_Q4_0 ? -8.0f : kind == L_Q5_0 ? -16.0f : 0.0f;
    const int nb = (int)(n_cols / QK32);
    tile32_t S;
    xscale_t XS;
    const bool expand = packed && n_tok >= EXPAND32_TOK;
    for (int kb0 = 0; kb0 < nb; kb0 += KB32) {
        const int nbk = nb - kb0 < KB32 ? nb - kb0 : KB32;
        const size_t xoff = (size_t)kb0 * xbs;
        for (int t0 = 0; t0 < n_tok; t0 += TCH) {
            const int nt = n_tok - t0 < TCH ? n_tok - t0 : TCH;
            /* activation scales of this chunk as floats; rows nt..nt+3 repeat the last token */
            for (int t = 0; t < nt + TT - 1; t++) {
                const int tt = t < nt ? t : nt - 1;
                const uint8_t *xr = (const uint8_t *)X + (size_t)(t0 + tt) * xrb + xoff;
                for (int b = 0; b < nbk; b++) {
                    const uint8_t *blk = xr + (size_t)b * xbs;
                    uint16_t h[2];
                    memcpy(h, blk, 4);
                    float d = h2f(h[0]), e = 0;
                    if (q81) {
                        e = h2f(h[1]);
                    } else if (off != 0) {
                        e = off * d * (float)q8_block_sum((const int8_t *)(blk + 2));
                    }
                    XS.v[0][t][b] = d;
                    XS.v[1][t][b] = e;
                }
            }
            for (int row = r0; row < r1; row += TR) {
                const int nr = r1 - row < TR ? r1 - row : TR;
                const uint8_t *P = NULL;
                if (packed) P = Pk + ((size_t)(row / TR) * (size_t)nb + (size_t)kb0) * pk_bs(kind);
                if (packed && expand) expand32(kind, P, nbk, &S);
                else if (!packed) repack32(kind, (const uint8_t *)W + (size_t)row * wrb + (size_t)kb0 * wbs, wrb, nr, nbk, &S);
                const bool accum = kb0 > 0;
                for (int tt = 0; tt < nt; tt += TT) {
                    const int nv = nt - tt < TT ? nt - tt : TT;
                    const uint8_t *xp[TT];
                    float *yp[TT];
                    for (int t = 0; t < TT; t++) {
                        int tk = t0 + tt + (t < nv ? t : nv - 1);
                        xp[t] = (const uint8_t *)X + (size_t)tk * xrb + xoff;
                        yp[t] = Y + (int64_t)tk * ldy + row;
                        prefetch_rows(yp[t]);
                    }
                    __m256 acc[TT];
                    if (packed && !expand && nv == 1) acc[0] = kern32px1(kind, P, nbk, xp[0], &XS.v[0][tt][0]);
                    else if (packed && !expand) kern32x4(kind, true, &S, P, nbk, xp[0], xp[1], xp[2], xp[3], &XS.v[0][tt][0], acc);
                    else kern32x4(kind, false, &S, NULL, nbk, xp[0], xp[1], xp[2], xp[3], &XS.v[0][tt][0], acc);
                    for (int t = 0; t < nv; t++) store_rows(yp[t], acc[t], nr, accum);
                }
            }
        }
    }
}

/* ----- decode GEMV (one token) for the legacy formats ----- */

/* Eight rows at a time, weights transposed in registers per block (nothing stored): lanes hold
 * rows [0 1 4 5 2 3 6 7] (the order in which two fp16 pairs per row deinterleave cheaply); the
 * activation's scales are converted once per call. */
#define GV_KB 256 /* blocks per K-chunk of the activation-scale buffer */

ALWAYS_INLINE __m256i loadu2_128(const void *hi, const void *lo) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)lo)),
                                   _mm_loadu_si128((const __m128i *)hi), 1);
}

/* The 16-bit values at base + idx[i] (8 lanes; every address even) through 4-byte-aligned
 * gathers only: a gathered dword that straddles a cache line makes vpgatherdd very slow. */
ALWAYS_INLINE __m256i gather_u16(const uint8_t *base, __m256i idx) {
    const uintptr_t a = (uintptr_t)base;
    const int *P = (const int *)(const void *)(base - (a & 3));
    __m256i ix = _mm256_add_epi32(idx, _mm256_set1_epi32((int)(a & 3)));
    __m256i g = _mm256_i32gather_epi32(P, _mm256_and_si256(ix, _mm256_set1_epi32(~3)), 1);
    __m256i sh = _mm256_slli_epi32(_mm256_and_si256(ix, _mm256_set1_epi32(2)), 3);
    return _mm256_and_si256(_mm256_srlv_epi32(g, sh), _mm256_set1_epi32(0xFFFF));
}

ALWAYS_INLINE void gemv_legacy(int kind, const void *W, size_t wrb, int64_t n_cols, int r0,
                               int r1, const void *X, float *Y) {
    const bool q81 = kind == L_Q4_1 || kind == L_Q5_1;
    const bool five = kind == L_Q5_0 || kind == L_Q5_1;
    const size_t xbs = q81 ? sizeof(blk_q8_1) : sizeof(blk_q8_0);
    const size_t xqo = q81 ? 4 : 2;
    const size_t wbs = legacy_wbs(kind);
    const size_t qso = kind == L_Q4_0 ? 2 : kind == L_Q4_1 ? 4 : kind == L_Q5_0 ? 6 : kind == L_Q5_1 ? 8 : 2;
    const size_t qho = kind == L_Q5_0 ? 2 : 4;
    const float off = kind == L_Q4_0 ? -8.0f : kind == L_Q5_0 ? -16.0f : 0.0f;
    const bool has_m = kind != L_Q8_0;
    const int nb = (int)(n_cols / QK32);
    const int rfull = r0 + (r1 - r0) / TR * TR;
    const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0F);
    /* gather offsets from row 0, natural row order */
    const __m256i gidx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)wrb));
    const size_t s1 = wrb, s3 = 3 * wrb;
    _Alignas(32) float xd[GV_KB], xe[GV_KB];
    const bool pf_ok = nb <= GV_KB && (size_t)nb * wbs == wrb;
    const int pf_groups = (int)(PF_BYTES / (TR * wrb)) > 1 ? (int)(PF_BYTES / (TR * wrb)) : 1;
    for (int kb0 = 0; kb0 < nb; kb0 += GV_KB) {
        const int nbk = nb - kb0 < GV_KB ? nb - kb0 : GV_KB;
        const uint8_t *xr = (const uint8_t *)X + (size_t)kb0 * xbs;
        for (int b = 0; b < nbk; b++) {
            const uint8_t *blk = xr + (size_t)b * xbs;
            uint16_t h[2];
            memcpy(h, blk, 4);
            float d = h2f(h[0]), e = 0;
            if (q81) {
                e = h2f(h[1]);
            } else if (off != 0) {
                e = off * d * (float)q8_block_sum((const int8_t *)(blk + 2));
            }
            xd[b] = d;
            xe[b] = e;
        }
        /* the first row groups: no earlier group prefetched them */
        if (pf_ok)
            for (size_t o = 0; o < (size_t)pf_groups * TR * wrb && (size_t)r0 * wrb + o < (size_t)r1 * wrb; o += 64)
                prefetch_at(W, (size_t)r0 * wrb + o);
        for (int row = r0; row < rfull; row += TR) {
            /* rows 0..3 at w0 + {0,1,2,3}*wrb, rows 4..7 at w4 + the same */
            const uint8_t *w0 = (const uint8_t *)W + (size_t)row * wrb + (size_t)kb0 * wbs;
            const uint8_t *w4 = w0 + 4 * wrb;
            const uint8_t *xq = xr + xqo;
            /* software prefetch of the row group pf_groups ahead: its 8 rows are one contiguous
             * region when the chunk spans whole rows (8 short interleaved streams defeat the
             * hardware prefetcher); 8*wbs bytes per block step cover it */
            size_t pf = (size_t)(row + pf_groups * TR) * wrb;
            const bool do_pf = pf_ok && row + (pf_groups + 1) * TR <= r1;
            /* running total over K-chunks (lane order), continued from Y after the first
             * activation-scale chunk */
            __m256 acc = _mm256_setzero_ps(), tot = acc;
            if (kb0 > 0) tot = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_loadu_ps(Y + row)), 0xD8));
            for (int b = 0; b < nbk; b++, w0 += wbs, w4 += wbs, xq += xbs, pf += TR * wbs) {
                __m256i isum;
                if (do_pf)
                    for (size_t o = 0; o < TR * wbs; o += 64) prefetch_at(W, pf + o);
                __m256 dvq50 = _mm256_setzero_ps();
                if (kind == L_Q8_0) {
                    __m256i v[8] = {loadu256(w0 + 2), loadu256(w0 + s1 + 2), loadu256(w4 + 2),
                                    loadu256(w4 + s1 + 2), loadu256(w0 + 2 * s1 + 2), loadu256(w0 + s3 + 2),
                                    loadu256(w4 + 2 * s1 + 2), loadu256(w4 + s3 + 2)};
                    transpose8x8_epi32(v);
                    isum = _mm256_setzero_si256();
#pragma GCC unroll 8
                    for (int g = 0; g < 8; g++) {
                        __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(v[g], v[g]), _mm256_sign_epi8(bcast32(xq + 4 * g), v[g]));
                        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, ones));
                    }
                } else {
                    /* pairs (row a | row b): lane 0 gets rows 0,1,4,5, lane 1 rows 2,3,6,7 */
                    __m256i A0 = loadu2_128(w0 + 2 * s1 + qso, w0 + qso);
                    __m256i A1 = loadu2_128(w0 + s3 + qso, w0 + s1 + qso);
                    __m256i A2 = loadu2_128(w4 + 2 * s1 + qso, w4 + qso);
                    __m256i A3 = loadu2_128(w4 + s3 + qso, w4 + s1 + qso);
                    __m256i t0 = _mm256_unpacklo_epi32(A0, A1), t1 = _mm256_unpackhi_epi32(A0, A1);
                    __m256i t2 = _mm256_unpacklo_epi32(A2, A3), t3 = _mm256_unpackhi_epi32(A2, A3);
                    __m256i T[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                                    _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
                    /* Q5: qh of the 8 rows (lane order) from 16-byte loads at the qh offset */
                    __m256i H = _mm256_setzero_si256(), H4 = H;
                    if (kind == L_Q5_1) {
                        __m256i B0 = loadu2_128(w0 + 2 * s1 + qho, w0 + qho);
                        __m256i B1 = loadu2_128(w0 + s3 + qho, w0 + s1 + qho);
                        __m256i B2 = loadu2_128(w4 + 2 * s1 + qho, w4 + qho);
                        __m256i B3 = loadu2_128(w4 + s3 + qho, w4 + s1 + qho);
                        H = _mm256_unpacklo_epi64(_mm256_unpacklo_epi32(B0, B1), _mm256_unpacklo_epi32(B2, B3));
                    } else if (kind == L_Q5_0) {
                        /* the first 8 bytes of each block: d (2), qh (4), ... -> d and qh together */
                        __m256i B0 = loadu2_128(w0 + 2 * s1, w0), B1 = loadu2_128(w0 + s3, w0 + s1);
                        __m256i B2 = loadu2_128(w4 + 2 * s1, w4), B3 = loadu2_128(w4 + s3, w4 + s1);
                        __m256i u0 = _mm256_unpacklo_epi32(B0, B1), u1 = _mm256_unpacklo_epi32(B2, B3);
                        __m256i D0 = _mm256_unpacklo_epi64(u0, u1), D1 = _mm256_unpackhi_epi64(u0, u1);
                        H = _mm256_or_si256(_mm256_srli_epi32(D0, 16), _mm256_slli_epi32(D1, 16));
                        /* d of the 8 rows (lane order) as 8 halves in the low 128 bits */
                        __m256i dd = _mm256_shuffle_epi8(D0, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                                                              0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1));
                        dvq50 = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(dd, 0x08)));
                    }
                    if (five) H4 = _mm256_srli_epi32(H, 4);
                    __m256i p = _mm256_setzero_si256(), p2 = p;
#pragma GCC unroll 8
                    for (int k = 0; k < 8; k++) {
                        __m256i w = k < 4 ? _mm256_and_si256(T[k], m4) : _mm256_and_si256(_mm256_srli_epi16(T[k - 4], 4), m4);
                        if (five) {
                            /* bits 4k..4k+3 of each row's qh -> 0x10 in bytes 0..3 of its dword */
                            const int sb = k >> 1;
                            const __m256i rep = _mm256_setr_epi8(sb, sb, sb, sb, 4 + sb, 4 + sb, 4 + sb, 4 + sb, 8 + sb, 8 + sb, 8 + sb, 8 + sb,
                                                                 12 + sb, 12 + sb, 12 + sb, 12 + sb, sb, sb, sb, sb, 4 + sb, 4 + sb, 4 + sb, 4 + sb,
                                                                 8 + sb, 8 + sb, 8 + sb, 8 + sb, 12 + sb, 12 + sb, 12 + sb, 12 + sb);
                            const __m256i bm = _mm256_set1_epi32(0x08040201);
                            const __m256i lut = _mm256_setr_epi8(0, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16,
                                                                 0, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16);
                            __m256i hb = _mm256_and_si256(_mm256_shuffle_epi8((k & 1) ? H4 : H, rep), bm);
                            w = _mm256_or_si256(w, _mm256_shuffle_epi8(lut, hb));
                        }
                        __m256i m = _mm256_maddubs_epi16(w, bcast32(xq + 4 * k));
                        if (five && k >= 4) p2 = _mm256_add_epi16(p2, m);
                        else p = _mm256_add_epi16(p, m);
                    }
                    isum = _mm256_madd_epi16(p, ones);
                    if (five) isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p2, ones));
                }
                /* scales of the 8 rows: [d | m<<16] (or just d) in natural row order */
                __m256 f0 = dvq50, f1 = dvq50, dv = dvq50;
                if (kind != L_Q5_0) {
                    __m256i dm = q81 ? _mm256_i32gather_epi32((const int *)(const void *)w0, gidx, 1)
                                     : gather_u16(w0, gidx);
                    f0 = _mm256_cvtph_ps(_mm256_castsi256_si128(dm));
                    f1 = _mm256_cvtph_ps(_mm256_extracti128_si256(dm, 1));
                    dv = _mm256_shuffle_ps(f0, f1, 0x88); /* rows 0 1 4 5 | 2 3 6 7 */
                }
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dv, _mm256_broadcast_ss(xd + b)), acc);
                if (has_m) {
                    __m256 mv = q81 ? _mm256_shuffle_ps(f0, f1, 0xDD) : dv;
                    acc = _mm256_fmadd_ps(mv, _mm256_broadcast_ss(xe + b), acc);
                }
                const int gb = kb0 + b; /* K-chunks of KB32 blocks, as in the tiled GEMM */
                if ((gb + 1) % KB32 == 0 || gb + 1 == nb) {
                    tot = gb < KB32 ? acc : _mm256_add_ps(acc, tot);
                    acc = _mm256_setzero_ps();
                }
            }
            _mm256_storeu_ps(Y + row, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(tot), 0xD8)));
        }
    }
    /* leftover rows: dot products (same arithmetic) */
    for (int r = rfull; r < r1; r++) Y[r] = dot_legacy(kind, n_cols, (const uint8_t *)W + (size_t)r * wrb, X);
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
            const uint8_t *blk = W + (size_t)(r < nr ? r : 0) * wrb + (size_t)sb * wbs;
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

/* Packed K-quants (quant_pack): per row tile and super-block, repackK's tile made compact:
 *   Q4_K: 32 x 32 bytes of nibble pairs (vector 8j+g: low nibbles k-group 16j+g, high 16j+8+g),
 *         the 8 scales and 8 mins of each row as bytes ([8][8] each), d and dmin as floats;
 *   Q6_K: the 64 x 32 bytes of 6-bit values, the 16 scales of each row as int8 ([16][8]), d.
 * 1216 bytes for 8 Q4_K super-blocks (1152), 2208 for 8 Q6_K (1680); Q5_K is not packed. */
ALWAYS_INLINE size_t pkK_qbytes(int kind) { return kind == K_Q6 ? 2048 : 1024; }
ALWAYS_INLINE size_t pkK_bs(int kind) { return kind == K_Q6 ? 2048 + 128 + 32 : 1024 + 128 + 64; }

/* kernKx4's sources: repackK's tile S (packed = false) or a packed run P */
ALWAYS_INLINE __m256i wK(int kind, bool packed, const tileK_t *S, const uint8_t *P, int sb, int kg) {
    if (!packed) return _mm256_load_si256((const __m256i *)S->q[sb][kg]);
    const uint8_t *blk = P + (size_t)sb * pkK_bs(kind);
    if (kind == K_Q6) return _mm256_load_si256((const __m256i *)(blk + 32 * kg));
    const int w = kg & 15;
    const __m256i v = _mm256_load_si256((const __m256i *)(blk + 32 * ((kg >> 4) * 8 + (w & 7))));
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    return w < 8 ? _mm256_and_si256(v, m4) : _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
}
/* 8 per-row bytes -> 16 int16 lanes, row r in lanes 2r and 2r+1 (signed for Q6_K) */
ALWAYS_INLINE __m256i pairs16(int kind, __m128i x) {
    x = _mm_unpacklo_epi8(x, x);
    return kind == K_Q6 ? _mm256_cvtepi8_epi16(x) : _mm256_cvtepu8_epi16(x);
}
ALWAYS_INLINE __m256i scK(int kind, bool packed, const tileK_t *S, const uint8_t *P, int sb, int j) {
    if (!packed) return _mm256_load_si256((const __m256i *)S->sc[sb][j]);
    const uint8_t *sc = P + (size_t)sb * pkK_bs(kind) + pkK_qbytes(kind);
    return pairs16(kind, _mm_loadl_epi64((const __m128i *)(sc + 8 * j)));
}
ALWAYS_INLINE __m256i mpK(int kind, bool packed, const tileK_t *S, const uint8_t *P, int sb, int j) {
    if (!packed) return _mm256_load_si256((const __m256i *)S->mp[sb][j]);
    const uint8_t *sc = P + (size_t)sb * pkK_bs(kind) + pkK_qbytes(kind);
    if (kind != K_Q6) return pairs16(kind, _mm_loadl_epi64((const __m128i *)(sc + 64 + 8 * j)));
    /* Q6_K: row r's scales 2j and 2j+1 in lanes 2r, 2r+1 */
    return _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)(sc + 16 * j)),
                                                  _mm_loadl_epi64((const __m128i *)(sc + 16 * j + 8))));
}
ALWAYS_INLINE __m256 dK(int kind, bool packed, const tileK_t *S, const uint8_t *P, int sb, bool min) {
    if (!packed) return _mm256_load_ps(min ? S->dmin[sb] : S->d[sb]);
    return _mm256_load_ps((const float *)(P + (size_t)sb * pkK_bs(kind) + pkK_qbytes(kind) +
                                          (kind == K_Q6 ? 128 : 128 + 32 * min)));
}

/* 4 tokens x 8 rows over nsb super-blocks; x0..x3: the chunk's first Q8_K block per token */
ALWAYS_INLINE void kernKx4(int kind, bool packed, const tileK_t *S, const uint8_t *P, int nsb, const blk_q8_K *x0,
                           const blk_q8_K *x1, const blk_q8_K *x2, const blk_q8_K *x3,
                           __m256 out[4]) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int sb = 0; sb < nsb; sb++) {
        const int8_t *q0 = x0[sb].qs, *q1 = x1[sb].qs, *q2 = x2[sb].qs, *q3 = x3[sb].qs;
        __m256i i0 = _mm256_setzero_si256(), i1 = i0, i2 = i0, i3 = i0;
        /* groups of `gk` k-groups share a scale; `per` maddubs fit an int16 sum */
        const int ngroups = kind == K_Q6 ? 16 : 8;
        const int gk = kind == K_Q6 ? 4 : 8;
        const int per = kind == K_Q4 ? 8 : kind == K_Q5 ? 4 : 2;
#pragma GCC unroll 1
        for (int j = 0; j < ngroups; j++) {
            __m256i scv = scK(kind, packed, S, P, sb, j);
            __m256i p0 = _mm256_setzero_si256(), p1 = p0, p2 = p0, p3 = p0;
#pragma GCC unroll 8
            for (int g = 0; g < gk; g++) {
                const int kg = gk * j + g;
                __m256i w = wK(kind, packed, S, P, sb, kg);
                __m256i m0 = _mm256_maddubs_epi16(w, bcast32(q0 + 4 * kg));
                __m256i m1 = _mm256_maddubs_epi16(w, bcast32(q1 + 4 * kg));
                __m256i m2 = _mm256_maddubs_epi16(w, bcast32(q2 + 4 * kg));
                __m256i m3 = _mm256_maddubs_epi16(w, bcast32(q3 + 4 * kg));
                if (g % per == 0) {
                    p0 = m0; p1 = m1; p2 = m2; p3 = m3;
                } else {
                    p0 = _mm256_add_epi16(p0, m0); p1 = _mm256_add_epi16(p1, m1);
                    p2 = _mm256_add_epi16(p2, m2); p3 = _mm256_add_epi16(p3, m3);
                }
                BARRIER4(p0, p1, p2, p3);
                if (g % per == per - 1) {
                    i0 = _mm256_add_epi32(i0, _mm256_madd_epi16(p0, scv));
                    i1 = _mm256_add_epi32(i1, _mm256_madd_epi16(p1, scv));
                    i2 = _mm256_add_epi32(i2, _mm256_madd_epi16(p2, scv));
                    i3 = _mm256_add_epi32(i3, _mm256_madd_epi16(p3, scv));
                }
            }
        }
        /* mins (Q4/Q5_K) or the -32 offset (Q6_K) through the activation group sums */
        __m256i n0 = _mm256_setzero_si256(), n1 = n0, n2 = n0, n3 = n0;
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            __m256i mv = mpK(kind, packed, S, P, sb, j);
            n0 = _mm256_add_epi32(n0, _mm256_madd_epi16(mv, bcast32(x0[sb].bsums + 2 * j)));
            n1 = _mm256_add_epi32(n1, _mm256_madd_epi16(mv, bcast32(x1[sb].bsums + 2 * j)));
            n2 = _mm256_add_epi32(n2, _mm256_madd_epi16(mv, bcast32(x2[sb].bsums + 2 * j)));
            n3 = _mm256_add_epi32(n3, _mm256_madd_epi16(mv, bcast32(x3[sb].bsums + 2 * j)));
        }
        __m256 dv = dK(kind, packed, S, P, sb, false);
        __m256 e0 = _mm256_broadcast_ss(&x0[sb].d), e1 = _mm256_broadcast_ss(&x1[sb].d);
        __m256 e2 = _mm256_broadcast_ss(&x2[sb].d), e3 = _mm256_broadcast_ss(&x3[sb].d);
        if (kind == K_Q6) {
            i0 = _mm256_sub_epi32(i0, _mm256_slli_epi32(n0, 5));
            i1 = _mm256_sub_epi32(i1, _mm256_slli_epi32(n1, 5));
            i2 = _mm256_sub_epi32(i2, _mm256_slli_epi32(n2, 5));
            i3 = _mm256_sub_epi32(i3, _mm256_slli_epi32(n3, 5));
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(dv, e0), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_mul_ps(dv, e1), a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i2), _mm256_mul_ps(dv, e2), a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i3), _mm256_mul_ps(dv, e3), a3);
        } else {
            __m256 mv = dK(kind, packed, S, P, sb, true);
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(dv, e0), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_mul_ps(dv, e1), a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i2), _mm256_mul_ps(dv, e2), a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i3), _mm256_mul_ps(dv, e3), a3);
            a0 = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(n0), _mm256_mul_ps(mv, e0), a0);
            a1 = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(n1), _mm256_mul_ps(mv, e1), a1);
            a2 = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(n2), _mm256_mul_ps(mv, e2), a2);
            a3 = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(n3), _mm256_mul_ps(mv, e3), a3);
        }
    }
    out[0] = a0; out[1] = a1; out[2] = a2; out[3] = a3;
}

ALWAYS_INLINE void expandK(int kind, const uint8_t *P, int nsb, tileK_t *S) {
    for (int sb = 0; sb < nsb; sb++) {
        for (int kg = 0; kg < 64; kg++) _mm256_store_si256((__m256i *)S->q[sb][kg], wK(kind, true, NULL, P, sb, kg));
        for (int j = 0; j < (kind == K_Q6 ? 16 : 8); j++)
            _mm256_store_si256((__m256i *)S->sc[sb][j], scK(kind, true, NULL, P, sb, j));
        for (int j = 0; j < 8; j++) _mm256_store_si256((__m256i *)S->mp[sb][j], mpK(kind, true, NULL, P, sb, j));
        _mm256_store_ps(S->d[sb], dK(kind, true, NULL, P, sb, false));
        if (kind != K_Q6) _mm256_store_ps(S->dmin[sb], dK(kind, true, NULL, P, sb, true));
        else _mm256_store_ps(S->dmin[sb], _mm256_setzero_ps());
    }
}

/* kernKx4's arithmetic for one token over a packed run */
ALWAYS_INLINE __m256 kernKpx1(int kind, const uint8_t *P, int nsb, const blk_q8_K *x0) {
    __m256 a0 = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int sb = 0; sb < nsb; sb++) {
        const int8_t *q0 = x0[sb].qs;
        __m256i i0 = _mm256_setzero_si256();
        prefetch_block(P, (size_t)sb * pkK_bs(kind), pkK_bs(kind), PF_PACKED);
        if (kind == K_Q4) {
            /* vectors 8c..8c+7: low nibbles are scale group 2c, high nibbles group 2c+1 */
            const uint8_t *blk = P + (size_t)sb * pkK_bs(kind);
#pragma GCC unroll 1
            for (int c = 0; c < 4; c++) {
                __m256i pl = _mm256_setzero_si256(), ph = pl;
#pragma GCC unroll 8
                for (int g = 0; g < 8; g++) {
                    const __m256i v = _mm256_load_si256((const __m256i *)(blk + 32 * (8 * c + g)));
                    pl = _mm256_add_epi16(pl, _mm256_maddubs_epi16(_mm256_and_si256(v, m4), bcast32(q0 + 4 * (16 * c + g))));
                    ph = _mm256_add_epi16(ph, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                                                                   bcast32(q0 + 4 * (16 * c + 8 + g))));
                }
                i0 = _mm256_add_epi32(i0, _mm256_madd_epi16(pl, scK(kind, true, NULL, P, sb, 2 * c)));
                i0 = _mm256_add_epi32(i0, _mm256_madd_epi16(ph, scK(kind, true, NULL, P, sb, 2 * c + 1)));
            }
        } else {
            /* Q6_K: 16 scale groups of 4 k-groups; 2 maddubs fit an int16 sum */
#pragma GCC unroll 1
            for (int j = 0; j < 16; j++) {
                const __m256i scv = scK(kind, true, NULL, P, sb, j);
#pragma GCC unroll 2
                for (int h = 0; h < 2; h++) {
                    const int kg = 4 * j + 2 * h;
                    const __m256i p0 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(wK(kind, true, NULL, P, sb, kg), bcast32(q0 + 4 * kg)),
                        _mm256_maddubs_epi16(wK(kind, true, NULL, P, sb, kg + 1), bcast32(q0 + 4 * kg + 4)));
                    i0 = _mm256_add_epi32(i0, _mm256_madd_epi16(p0, scv));
                }
            }
        }
        __m256i n0 = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++)
            n0 = _mm256_add_epi32(n0, _mm256_madd_epi16(mpK(kind, true, NULL, P, sb, j), bcast32(x0[sb].bsums + 2 * j)));
        const __m256 dv = dK(kind, true, NULL, P, sb, false), e0 = _mm256_broadcast_ss(&x0[sb].d);
        if (kind == K_Q6) {
            i0 = _mm256_sub_epi32(i0, _mm256_slli_epi32(n0, 5));
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(dv, e0), a0);
        } else {
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(dv, e0), a0);
            a0 = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(n0), _mm256_mul_ps(dK(kind, true, NULL, P, sb, true), e0), a0);
        }
    }
    return a0;
}

ALWAYS_INLINE void gemmK(int kind, bool packed, const uint8_t *Pk, const void *W, size_t wrb,
                         int64_t n_cols, int r0, int r1, const void *X, size_t xrb, int n_tok,
                         float *Y, int64_t ldy) {
    const size_t wbs = kq_wbs(kind);
    const int nb = (int)(n_cols / QK_K);
    tileK_t S;
    const int n_rt = (r1 - r0 + TR - 1) / TR, n_kc = (nb + KSB - 1) / KSB;
    /* few tokens (their activations stay in L2): a packed tile's chunks in turn */
    const bool row_outer = packed && (size_t)n_tok * xrb <= ((size_t)256 << 10);
    const bool expand = packed && n_tok >= EXPAND_TOK;
    for (int u = 0; u < n_rt * n_kc; u++) {
        /* row_outer: each row tile's K-chunks in turn (one contiguous stream per tile); else each
         * K-chunk over every tile (a chunk's activations reused, its tile built once). Per output
         * the chunks add up in the same order either way. */
        const int ic = row_outer ? u % n_kc : u / n_rt, ir = row_outer ? u / n_kc : u % n_rt;
        const int sb0 = ic * KSB, row = r0 + ir * TR;
        const int nsb = nb - sb0 < KSB ? nb - sb0 : KSB;
        const bool accum = sb0 > 0;
        {
            const int nr = r1 - row < TR ? r1 - row : TR;
            const uint8_t *P = NULL;
            if (packed) P = Pk + ((size_t)(row / TR) * (size_t)nb + (size_t)sb0) * pkK_bs(kind);
            if (packed && expand) expandK(kind, P, nsb, &S);
            else if (!packed) repackK(kind, (const uint8_t *)W + (size_t)row * wrb + (size_t)sb0 * wbs, wrb, nr, nsb, &S);
            for (int tt = 0; tt < n_tok; tt += TT) {
                const int nv = n_tok - tt < TT ? n_tok - tt : TT;
                const blk_q8_K *xp[TT];
                float *yp[TT];
                for (int t = 0; t < TT; t++) {
                    int tk = tt + (t < nv ? t : nv - 1);
                    xp[t] = (const blk_q8_K *)((const uint8_t *)X + (size_t)tk * xrb) + sb0;
                    yp[t] = Y + (int64_t)tk * ldy + row;
                    prefetch_rows(yp[t]);
                }
                __m256 acc[TT];
                if (packed && !expand && nv == 1) acc[0] = kernKpx1(kind, P, nsb, xp[0]);
                else if (packed && !expand) kernKx4(kind, true, &S, P, nsb, xp[0], xp[1], xp[2], xp[3], acc);
                else kernKx4(kind, false, &S, NULL, nsb, xp[0], xp[1], xp[2], xp[3], acc);
                for (int t = 0; t < nv; t++) store_rows(yp[t], acc[t], nr, accum);
            }
        }
    }
}

static void pack32(int t, const void *W, size_t wrb, int64_t n_rows, int64_t n_cols, void *dst) {
    const int kind = pk_kind(t);
    const size_t wbs = legacy_wbs(kind), bs = pk_bs(kind), qb = pk_qbytes(kind);
    const size_t qso = kind == L_Q4_1 ? 4 : 2; /* qs offset in a block: after d (and m) */
    const int64_t nb = n_cols / QK32, ng = (int64_t)qb / 32;
    uint8_t *o = dst;
    for (int64_t row = 0; row < n_rows; row += TR)
        for (int64_t b = 0; b < nb; b++, o += bs) {
            memset(o, 0, bs);
            for (int r = 0; r < TR && row + r < n_rows; r++) {
                const uint8_t *blk = (const uint8_t *)W + (size_t)(row + r) * wrb + (size_t)b * wbs;
                for (int64_t g = 0; g < ng; g++) memcpy(o + 32 * g + 4 * r, blk + qso + 4 * g, 4);
                memcpy(o + qb + 2 * r, blk, 2);                                   /* d */
                if (kind == L_Q4_1) memcpy(o + qb + 16 + 2 * r, blk + 2, 2);      /* m */
            }
        }
}

ALWAYS_INLINE int pkK_kind(int t) { return t == QT_Q4_K ? K_Q4 : t == QT_Q6_K ? K_Q6 : -1; }

static void packK(int t, const void *W, size_t wrb, int64_t n_rows, int64_t n_cols, void *dst) {
    const int kind = pkK_kind(t);
    const size_t wbs = kq_wbs(kind), bs = pkK_bs(kind), qb = pkK_qbytes(kind);
    const int64_t nb = n_cols / QK_K;
    tileK_t S; /* one super-block of repackK's tile at a time */
    uint8_t *o = dst;
    for (int64_t row = 0; row < n_rows; row += TR) {
        const int nr = n_rows - row < TR ? (int)(n_rows - row) : TR;
        for (int64_t sb = 0; sb < nb; sb++, o += bs) {
            repackK(kind, (const uint8_t *)W + (size_t)row * wrb + (size_t)sb * wbs, wrb, nr, 1, &S);
            memset(o, 0, bs);
            if (kind == K_Q6) {
                memcpy(o, S.q[0], 2048);
                for (int j = 0; j < 16; j++)
                    for (int r = 0; r < TR; r++) o[qb + 8 * j + r] = (uint8_t)(int8_t)S.sc[0][j][2 * r];
                memcpy(o + qb + 128, S.d[0], 32);
            } else {
                for (int c = 0; c < 4; c++)
                    for (int g = 0; g < 8; g++) {
                        const __m256i lo = _mm256_load_si256((const __m256i *)S.q[0][16 * c + g]);
                        const __m256i hi = _mm256_load_si256((const __m256i *)S.q[0][16 * c + 8 + g]);
                        _mm256_storeu_si256((__m256i *)(o + 32 * (8 * c + g)),
                                            _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4))); /* values < 16 */
                    }
                for (int j = 0; j < 8; j++)
                    for (int r = 0; r < TR; r++) {
                        o[qb + 8 * j + r] = (uint8_t)S.sc[0][j][2 * r];
                        o[qb + 64 + 8 * j + r] = (uint8_t)S.mp[0][j][2 * r];
                    }
                memcpy(o + qb + 128, S.d[0], 32);
                memcpy(o + qb + 160, S.dmin[0], 32);
            }
        }
    }
}

/* row tiles x blocks x the packed block's bytes; 0 for a type without a packed layout */
static size_t pack_bytes(int t, int64_t n_rows, int64_t n_cols) {
    const int kk = pkK_kind(t), kl = pk_kind(t);
    const int64_t bw = kk >= 0 ? QK_K : QK32;
    const size_t bs = kk >= 0 ? pkK_bs(kk) : kl >= 0 ? pk_bs(kl) : 0;
    if (!bs || n_rows <= 0 || n_cols <= 0 || n_cols % bw) return 0;
    return (size_t)((n_rows + TR - 1) / TR) * (size_t)(n_cols / bw) * bs;
}

static void pack(int t, const void *W, size_t wrb, int64_t n_rows, int64_t n_cols, void *dst) {
    if (pkK_kind(t) >= 0) packK(t, W, wrb, n_rows, n_cols, dst);
    else pack32(t, W, wrb, n_rows, n_cols, dst);
}

/* false: not for this call (rows not starting on a tile): quant_gemm does it */
static bool gemm_packed(int t, const void *P, int64_t n_cols, int r0, int r1, const void *X,
                        size_t xrb, int n_tok, float *Y, int64_t ldy) {
    if (r0 % TR) return false;
    switch (t) {
    case QT_Q4_0: gemm32(L_Q4_0, true, P, NULL, 0, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); return true;
    case QT_Q4_1: gemm32(L_Q4_1, true, P, NULL, 0, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); return true;
    case QT_Q8_0: gemm32(L_Q8_0, true, P, NULL, 0, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); return true;
    case QT_Q4_K: gemmK(K_Q4, true, P, NULL, 0, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); return true;
    case QT_Q6_K: gemmK(K_Q6, true, P, NULL, 0, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); return true;
    default: return false;
    }
}

/* ----- dispatch ----- */

static qk_dot_fn g_dot[QT_COUNT];

static void gemm_dots(int t, const void *W, size_t wrb, int64_t n_cols, int r0, int r1,
                      const void *X, size_t xrb, int n_tok, float *Y, int64_t ldy) {
    qi_gemm_loop(g_dot[t], W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy);
}

static void gemm_tiled(int t, const void *W, size_t wrb, int64_t n_cols, int r0, int r1,
                       const void *X, size_t xrb, int n_tok, float *Y, int64_t ldy) {
    const bool legacy = t == QT_Q4_0 || t == QT_Q4_1 || t == QT_Q5_0 || t == QT_Q5_1 || t == QT_Q8_0;
    if (n_tok < GEMV_MAX_TOK) {
        /* few tokens: one-token kernels (their scale gathers assume even addresses, true for any
         * real tensor; otherwise the horizontal dots) */
        if (t == QT_Q4_K || t == QT_Q5_K || t == QT_Q6_K) {
            for (int k = 0; k < n_tok; k++)
                gemv_kq(t, W, wrb, n_cols, r0, r1, (const uint8_t *)X + (size_t)k * xrb, Y + (int64_t)k * ldy);
            return;
        }
        if (!legacy || (((uintptr_t)W | wrb) & 1) || wrb > (size_t)INT32_MAX / TR) {
            gemm_dots(t, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy);
            return;
        }
        for (int k = 0; k < n_tok; k++) {
            const void *x = (const uint8_t *)X + (size_t)k * xrb;
            float *y = Y + (int64_t)k * ldy;
            switch (t) {
            case QT_Q4_0: gemv_legacy(L_Q4_0, W, wrb, n_cols, r0, r1, x, y); break;
            case QT_Q4_1: gemv_legacy(L_Q4_1, W, wrb, n_cols, r0, r1, x, y); break;
            case QT_Q5_0: gemv_legacy(L_Q5_0, W, wrb, n_cols, r0, r1, x, y); break;
            case QT_Q5_1: gemv_legacy(L_Q5_1, W, wrb, n_cols, r0, r1, x, y); break;
            default: gemv_legacy(L_Q8_0, W, wrb, n_cols, r0, r1, x, y); break;
            }
        }
        return;
    }
    switch (t) {
    case QT_Q4_0: gemm32(L_Q4_0, false, NULL, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    case QT_Q4_1: gemm32(L_Q4_1, false, NULL, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    case QT_Q5_0: gemm32(L_Q5_0, false, NULL, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    case QT_Q5_1: gemm32(L_Q5_1, false, NULL, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    case QT_Q8_0: gemm32(L_Q8_0, false, NULL, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    case QT_Q4_K: gemmK(K_Q4, false, NULL, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    case QT_Q5_K: gemmK(K_Q5, false, NULL, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
    case QT_Q6_K: gemmK(K_Q6, false, NULL, W, wrb, n_cols, r0, r1, X, xrb, n_tok, Y, ldy); break;
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

    k->pack_bytes = pack_bytes;
    k->pack = pack;
    k->gemm_packed = gemm_packed;

    for (int t = 0; t < QT_COUNT; t++) {
        g_dot[t] = k->dot[t];
        if (k->dot[t]) k->gemm[t] = gemm_tiled;
    }
}
