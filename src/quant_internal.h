/* quant_internal.h — ggml block layouts and the kernel table shared by quant.c (scalar reference
 * code, dispatch) and quant_avx2.c (AVX2/FMA/F16C kernels, compiled with those flags).
 *
 * Dependencies go one way: quant.c includes this header and calls quant_avx2_register;
 * quant_avx2.c includes only this header (types, inline helpers) and calls nothing in quant.c.
 *
 * Block layouts are byte-exact copies of the ggml formats stored in GGUF files; every struct has a
 * _Static_assert on its size. fp16 fields are stored as raw uint16_t bits.
 */
#ifndef KVS_QUANT_INTERNAL_H
#define KVS_QUANT_INTERNAL_H

#include <stdint.h>
#include <string.h>
#include "quant.h"

#define QK32 32  /* elements per block of the legacy formats (Q4_0 .. Q8_1) */
#define QK_K 256 /* elements per super-block of the K-quants */

typedef struct { uint16_t d; uint8_t qs[16]; } blk_q4_0;                 /* x = d*(q-8)        */
typedef struct { uint16_t d, m; uint8_t qs[16]; } blk_q4_1;              /* x = d*q + m        */
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; } blk_q5_0;  /* x = d*(q-16)       */
typedef struct { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; } blk_q5_1; /* x = d*q + m      */
typedef struct { uint16_t d; int8_t qs[32]; } blk_q8_0;                  /* x = d*q            */
typedef struct { uint16_t d, s; int8_t qs[32]; } blk_q8_1;               /* s = d*sum(q)       */

/* Q2_K: 16 groups of 16; scales[j] = scale(low 4 bits) | min(high 4 bits);
 * x = d*sc*q - dmin*m, q in 0..3 */
typedef struct { uint8_t scales[16]; uint8_t qs[64]; uint16_t d, dmin; } blk_q2_K;
/* Q3_K: 16 groups of 16, 6-bit scales (biased by 32) packed in 12 bytes; q in -4..3, its high
 * bit in hmask (set = no -4 offset) */
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint16_t d; } blk_q3_K;
/* Q4_K: 8 groups of 32, 6-bit scales and mins packed in 12 bytes; x = d*sc*q - dmin*m */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } blk_q4_K;
/* Q5_K: as Q4_K plus the 5th bit of every q in qh */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } blk_q5_K;
/* Q6_K: 16 groups of 16, int8 scales; x = d*sc*(q-32), q = 4 low bits (ql) | 2 high bits (qh) */
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } blk_q6_K;
/* Q8_K (activations): float d, q in -127..127, bsums[j] = sum of q[16j..16j+16) */
typedef struct { float d; int8_t qs[256]; int16_t bsums[16]; } blk_q8_K;

_Static_assert(sizeof(blk_q4_0) == 18, "block_q4_0 size");
_Static_assert(sizeof(blk_q4_1) == 20, "block_q4_1 size");
_Static_assert(sizeof(blk_q5_0) == 22, "block_q5_0 size");
_Static_assert(sizeof(blk_q5_1) == 24, "block_q5_1 size");
_Static_assert(sizeof(blk_q8_0) == 34, "block_q8_0 size");
_Static_assert(sizeof(blk_q8_1) == 36, "block_q8_1 size");
_Static_assert(sizeof(blk_q2_K) == 84, "block_q2_K size");
_Static_assert(sizeof(blk_q3_K) == 110, "block_q3_K size");
_Static_assert(sizeof(blk_q4_K) == 144, "block_q4_K size");
_Static_assert(sizeof(blk_q5_K) == 176, "block_q5_K size");
_Static_assert(sizeof(blk_q6_K) == 210, "block_q6_K size");
_Static_assert(sizeof(blk_q8_K) == 292, "block_q8_K size");

/* ---- scalar fp16 / bf16 (exact; NaN results are quiet NaNs, like F16C) ------------------- */

static inline float qi_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t qi_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float qi_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    if (exp == 0) { /* zero or subnormal: mant * 2^-24, exact in float */
        float f = (float)mant * 0x1p-24f;
        return qi_bits_f32(qi_f32_bits(f) | sign);
    }
    if (exp == 31) /* inf, or NaN made quiet with its payload kept */
        return qi_bits_f32(sign | 0x7F800000u | (mant ? 0x400000u | (mant << 13) : 0));
    return qi_bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

/* round to nearest even; overflow -> inf; NaN -> quiet NaN keeping the top payload bits */
static inline uint16_t qi_f32_to_f16(float f) {
    uint32_t x = qi_f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));
    if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* >= 65520 rounds to inf */
    if (ax < 0x38800000u) { /* < 2^-14: f16 subnormal (or zero); 1024 means the smallest normal */
        float v = qi_bits_f32(ax) * 0x1p24f + 0x1p23f; /* the add rounds to an integer (RNE) */
        return (uint16_t)(sign | (qi_f32_bits(v) - 0x4B000000u));
    }
    uint32_t r = ax - 0x38000000u; /* rebias exponent 127 -> 15 */
    r = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
    return (uint16_t)(sign | r);
}

static inline float qi_bf16_to_f32(uint16_t h) { return qi_bits_f32((uint32_t)h << 16); }
static inline uint16_t qi_f32_to_bf16(float f) {
    uint32_t x = qi_f32_bits(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x40u);
    return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

/* round to nearest, ties to even, for |x| < 2^22 (all uses here are small) */
static inline int qi_nearest_int(float x) {
    float v = x + 12582912.0f; /* 1.5 * 2^23 */
    return (int)(qi_f32_bits(v) & 0x007FFFFFu) - 0x00400000;
}

static inline uint32_t qi_load_u32(const void *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* Unpack the 12-byte 6-bit scale/min field of Q4_K/Q5_K into 8 scales and 8 mins. */
static inline void qi_unpack_k4_scales(const uint8_t s[12], uint8_t sc[8], uint8_t mn[8]) {
    uint32_t u0 = qi_load_u32(s), u1 = qi_load_u32(s + 4), u2 = qi_load_u32(s + 8);
    uint32_t a = u0 & 0x3F3F3F3Fu;
    uint32_t b = u1 & 0x3F3F3F3Fu;
    uint32_t c = (u2 & 0x0F0F0F0Fu) | (((u0 >> 6) & 0x03030303u) << 4);
    uint32_t e = ((u2 >> 4) & 0x0F0F0F0Fu) | (((u1 >> 6) & 0x03030303u) << 4);
    memcpy(sc, &a, 4); memcpy(sc + 4, &c, 4);
    memcpy(mn, &b, 4); memcpy(mn + 4, &e, 4);
}

/* Unpack the 12-byte field of Q3_K into 16 scales in -32..31. */
static inline void qi_unpack_q3k_scales(const uint8_t s[12], int8_t sc[16]) {
    for (int j = 0; j < 16; j++) {
        int lo = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
        int hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
        sc[j] = (int8_t)((lo | (hi << 4)) - 32);
    }
}

/* ---- kernel table ------------------------------------------------------------------------ */

typedef void (*qk_dequant_fn)(const void *src, float *dst, int64_t n);
typedef void (*qk_quant_fn)(const float *src, void *dst, int64_t n);
typedef float (*qk_dot_fn)(int64_t n, const void *w, const void *x);
typedef void (*qk_gemm_fn)(int t, const void *W, size_t w_row_bytes, int64_t n_cols, int r0,
                           int r1, const void *X, size_t x_row_bytes, int n_tok, float *Y,
                           int64_t ldy);

struct quant_kernels {
    qk_dequant_fn dequant[QT_COUNT];
    qk_quant_fn quant[QT_COUNT];
    qk_dot_fn dot[QT_COUNT];
    qk_gemm_fn gemm[QT_COUNT];
    void (*f16_to_f32_row)(const uint16_t *src, float *dst, int64_t n);
    void (*f32_to_f16_row)(const float *src, uint16_t *dst, int64_t n);
    /* pre-packed weights (quant_pack, quant.h): NULL where the table has none */
    size_t (*pack_bytes)(int t, int64_t n_rows, int64_t n_cols);
    void (*pack)(int t, const void *W, size_t w_row_bytes, int64_t n_rows, int64_t n_cols,
                 void *dst);
    bool (*gemm_packed)(int t, const void *P, int64_t n_cols, int r0, int r1, const void *X,
                        size_t x_row_bytes, int n_tok, float *Y, int64_t ldy);
};

/* Generic gemm = loop over a table's dot (types without a tiled kernel). Inline here so that
 * quant_avx2.c needs nothing from quant.c: quant.c (dispatch) calls quant_avx2_register, and
 * the kernels file calls nothing back. */
static inline void qi_gemm_loop(qk_dot_fn dot, const void *W, size_t w_row_bytes, int64_t n_cols,
                                int r0, int r1, const void *X, size_t x_row_bytes, int n_tok,
                                float *Y, int64_t ldy) {
    const uint8_t *w = W, *x = X;
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < n_tok; t++)
            Y[(int64_t)t * ldy + r] = dot(n_cols, w + (size_t)r * w_row_bytes,
                                          x + (size_t)t * x_row_bytes);
}

/* quant.c: the reference table (every entry set; gemm = loop over dot). */
extern const struct quant_kernels quant_ref_kernels;

/* quant_avx2.c: overwrite the entries it implements. Call only when the CPU has AVX2+FMA+F16C. */
void quant_avx2_register(struct quant_kernels *k);

#endif
