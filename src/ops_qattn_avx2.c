/* ops_qattn_avx2.c — AVX2/FMA versions of the fused low-bit attention kernels (ops_qattn_*, see
 * ops.h). They read the packed 2/4/8-bit codes (and 3-bit per-token rows) of the KV payload
 * directly: codes are masked and converted to floats in registers (or, for per-token keys, into
 * an 8-row L1 block that the g query heads of a KV head share); the cache is never dequantized
 * to memory. Compiled with -mavx2 -mfma -mf16c; called only after ops_init() has seen those
 * features.
 * Reads never go past the bytes that hold the requested codes (a partial tail of a key block is
 * copied to a zero-padded scratch first), and only S[qi * lds + t] for t < n is written.
 * Results match the references to float rounding (FMA, summation order), not bit for bit. */
#include "ops.h"
#include "ops_simd.h"

#include <immintrin.h>
#include <string.h>


enum {
    QA_MAXD = 256, /* kd, hd at most this (and multiples of 8), else the reference runs */
    TOK_QC = 16,   /* queries per pass of the per-token kernels (their scratch is per query) */
    BLK_T = 16,    /* tokens per tile of blk_scores: two vectors of codes per channel */
    BLK_QS = 16,   /* queries whose folded q * scale are prepared at once */
    BLK_QB = 6,    /* queries whose accumulators live in registers at once (2 * 6 + 3 <= 16) */
};

/* blk_scores reads 2, 4 and 8 bits (KIVI); the per-token kernels (MiKV) also 3 */
static inline int bits_ok(int bits) { return bits == 2 || bits == 4 || bits == 8; }
static inline int tok_bits_ok(int bits) { return bits_ok(bits) || bits == 3; }


/* Unpacking without per-lane shifts. A code stays at its bit position inside its byte (or its
 * 16-bit word), is masked out and converted, so lane i holds code * 2^k_i: the lane scale
 * (a power of two, so the rescaling is exact short of overflow/underflow far outside attention
 * magnitudes) is undone once per tile, per query or per output instead of per code. Broadcast
 * and byte shuffle do the placing, which leaves the vector ALU ports to the FMAs.
 *  2-bit: 8 codes = one 16-bit word; lane i masks bits 2i, 2i+1: scale 4^i.
 *  4-bit: 8 codes = 4 bytes; lane i takes byte i/2 and its low or high nibble: scale 1 or 16.
 *  8-bit: zero-extended bytes, scale 1.
 *  3-bit: 8 codes = 3 bytes, one 24-bit word shifted right by 3i in lane i (variable shift: the
 *         codes do not sit on byte or word boundaries), scale 1.
 * Only the bytes that hold the requested codes are read. */
ALWAYS_INLINE __m256 lane_inv(int bits) {
    if (bits == 2)
        return _mm256_setr_ps(1.0f, 0x1p-2f, 0x1p-4f, 0x1p-6f, 0x1p-8f, 0x1p-10f, 0x1p-12f, 0x1p-14f);
    if (bits == 4) return _mm256_setr_ps(1.0f, 0x1p-4f, 1.0f, 0x1p-4f, 1.0f, 0x1p-4f, 1.0f, 0x1p-4f);
    return _mm256_set1_ps(1.0f);
}

ALWAYS_INLINE __m256 lane_scale(int bits) {
    if (bits == 2)
        return _mm256_setr_ps(1.0f, 0x1p2f, 0x1p4f, 0x1p6f, 0x1p8f, 0x1p10f, 0x1p12f, 0x1p14f);
    if (bits == 4) return _mm256_setr_ps(1.0f, 0x1p4f, 1.0f, 0x1p4f, 1.0f, 0x1p4f, 1.0f, 0x1p4f);
    return _mm256_set1_ps(1.0f);
}
static inline __m256i mask2(void) {
    return _mm256_setr_epi32(3, 3 << 2, 3 << 4, 3 << 6, 3 << 8, 3 << 10, 3 << 12, 3 << 14);
}
static inline __m256i mask4(void) { return _mm256_setr_epi32(15, 240, 15, 240, 15, 240, 15, 240); }
/* 4-bit: lane i gets byte `base + i/2` in its low byte (the rest zero) */
static inline __m256i spread4(int base) {
    const char z = (char)0x80;
    char b0 = (char)base, b1 = (char)(base + 1), b2 = (char)(base + 2), b3 = (char)(base + 3);
    return _mm256_setr_epi8(b0, z, z, z, b0, z, z, z, b1, z, z, z, b1, z, z, z, b2, z, z, z, b2, z,
                            z, z, b3, z, z, z, b3, z, z, z);
}

/* 8 codes at p (a group of 8 starts on a byte for every b), lane-scaled; reads b bytes */
ALWAYS_INLINE __m256 xcodes8(const uint8_t *p, int bits) {
    if (bits == 3) {
        /* composed in a register: a 3-byte memcpy into a 4-byte word would be a store-forwarding
         * stall on every 8 codes */
        uint16_t lo;
        memcpy(&lo, p, 2);
        uint32_t w = (uint32_t)lo | (uint32_t)p[2] << 16;
        __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32((int)w),
                                      _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21));
        return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(7)));
    }
    if (bits == 8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    if (bits == 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)w), spread4(0));
        return _mm256_cvtepi32_ps(_mm256_and_si256(v, mask4()));
    }
    uint16_t h;
    memcpy(&h, p, 2);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_set1_epi16((short)h), mask2()));
}

/* 16 codes at p (2 b bytes), lane-scaled, as two vectors */
ALWAYS_INLINE void xcodes16(const uint8_t *p, int bits, __m256 *x0, __m256 *x1) {
    if (bits == 3) {
        *x0 = xcodes8(p, 3);
        *x1 = xcodes8(p + 3, 3);
    } else if (bits == 8) {
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        *x0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
        *x1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(v, v)));
    } else if (bits == 4) {
        uint64_t w;
        memcpy(&w, p, 8);
        __m256i v = _mm256_set1_epi64x((long long)w), m = mask4();
        *x0 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_shuffle_epi8(v, spread4(0)), m));
        *x1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_shuffle_epi8(v, spread4(4)), m));
    } else {
        /* one 32-bit word holds all 16 codes; the upper half moves down by a byte shuffle */
        uint32_t w;
        memcpy(&w, p, 4);
        const char z = (char)0x80;
        const __m256i hi = _mm256_setr_epi8(2, 3, z, z, 2, 3, z, z, 2, 3, z, z, 2, 3, z, z, 2, 3,
                                            z, z, 2, 3, z, z, 2, 3, z, z, 2, 3, z, z);
        __m256i v = _mm256_set1_epi32((int)w), m = mask2();
        *x0 = _mm256_cvtepi32_ps(_mm256_and_si256(v, m));
        *x1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_shuffle_epi8(v, hi), m));
    }
}

/* n codes (a multiple of 8) of one row, lane-scaled, into dst. Wide steps first: 16 bytes are
 * broadcast to both halves once and one byte shuffle per 8 codes places them. */
ALWAYS_INLINE void xcodes_row(const uint8_t *p, int n, int bits, float *dst) {
    int i = 0;
    if (bits == 2) {
        const __m256i m = mask2();
        for (; i + 64 <= n; i += 64, p += 16) {
            __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
            UNROLL for (int k = 0; k < 8; k++) {
                /* codes 8k..8k+7 are bytes 2k, 2k+1: into the low 16 bits of every lane */
                __m256i ctl = _mm256_set1_epi32((int)(2u * k | (2u * k + 1) << 8 | 0x80800000u));
                __m256i x = _mm256_and_si256(_mm256_shuffle_epi8(v, ctl), m);
                _mm256_store_ps(dst + i + 8 * k, _mm256_cvtepi32_ps(x));
            }
        }
    } else if (bits == 4) {
        const __m256i m = mask4();
        for (; i + 32 <= n; i += 32, p += 16) {
            __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
            UNROLL for (int k = 0; k < 4; k++) {
                __m256i x = _mm256_and_si256(_mm256_shuffle_epi8(v, spread4(4 * k)), m);
                _mm256_store_ps(dst + i + 8 * k, _mm256_cvtepi32_ps(x));
            }
        }
    }
    for (; i + 16 <= n; i += 16, p += 2 * bits) {
        __m256 x0, x1;
        xcodes16(p, bits, &x0, &x1);
        _mm256_store_ps(dst + i, x0);
        _mm256_store_ps(dst + i + 8, x1);
    }
    if (i < n) _mm256_store_ps(dst + i, xcodes8(p, bits));
}

/* ---- blk_scores: channel-major codes, one (scale, min) per channel ----
 * S[qi][t] = sc * (bias_qi + sum_c qs[qi][c] * code(c, t)), qs = q * scale, bias = sum_c q * min.
 * One tile = 16 tokens x QB queries: the 2 * QB accumulators stay in registers over all kd
 * channels; each channel's 16 codes are unpacked once and feed QB broadcast FMAs. */
ALWAYS_INLINE void blk_tile(const uint8_t *p, size_t cstride, int kd, const float *qs, int qstride,
                            const float *bias, const int QB, const int bits, float sc, float *S,
                            int lds, int nb) {
    /* accumulate in the lane-scaled domain (bias scaled to match), unscale once at the end:
     * scaling by powers of two is exact, so this rounds exactly like plain codes would */
    __m256 a[BLK_QB][2];
    const __m256 ls = lane_scale(bits);
    UNROLL for (int i = 0; i < QB; i++) a[i][0] = a[i][1] = _mm256_mul_ps(_mm256_set1_ps(bias[i]), ls);
    for (int c = 0; c < kd; c++, p += cstride, qs++) {
        __m256 x0, x1;
        xcodes16(p, bits, &x0, &x1);
        UNROLL for (int i = 0; i < QB; i++) {
            __m256 q = _mm256_broadcast_ss(qs + (size_t)i * qstride);
            a[i][0] = _mm256_fmadd_ps(q, x0, a[i][0]);
            a[i][1] = _mm256_fmadd_ps(q, x1, a[i][1]);
        }
    }
    const __m256 vsc = _mm256_mul_ps(lane_inv(bits), _mm256_set1_ps(sc));
    UNROLL for (int i = 0; i < QB; i++) {
        float *s = S + (size_t)i * lds;
        __m256 r0 = _mm256_mul_ps(a[i][0], vsc), r1 = _mm256_mul_ps(a[i][1], vsc);
        if (nb == BLK_T) {
            _mm256_storeu_ps(s, r0);
            _mm256_storeu_ps(s + 8, r1);
        } else {
            float tmp[BLK_T];
            _mm256_storeu_ps(tmp, r0);
            _mm256_storeu_ps(tmp + 8, r1);
            memcpy(s, tmp, sizeof(float) * (size_t)nb);
        }
    }
}

#define BLK_CASE(QB, B)                                                                        \
    case (QB) * 16 + (B):                                                                      \
        blk_tile(p, cstride, kd, qs, qstride, bias, QB, B, sc, S, lds, nb);                    \
        break;
#define BLK_CASES(QB) BLK_CASE(QB, 2) BLK_CASE(QB, 4) BLK_CASE(QB, 8)

static void blk_tile_any(const uint8_t *p, size_t cstride, int kd, const float *qs, int qstride,
                         const float *bias, int qb, int bits, float sc, float *S, int lds,
                         int nb) {
    switch (qb * 16 + bits) {
        BLK_CASES(1) BLK_CASES(2) BLK_CASES(3) BLK_CASES(4) BLK_CASES(5) BLK_CASES(6)
    default: break;
    }
}

void ops_qattn_blk_scores_avx2(const float *Q, int g, int kd, const uint8_t *codes,
                               size_t cstride, const uint16_t *scale, const uint16_t *min, int nt,
                               int bits, float sc, float *S, int lds) {
    if (nt <= 0 || g <= 0) return;
    if (kd <= 0 || kd % 8 != 0 || kd > QA_MAXD || !bits_ok(bits)) {
        ops_qattn_blk_scores_ref(Q, g, kd, codes, cstride, scale, min, nt, bits, sc, S, lds);
        return;
    }
    float qs[QA_MAXD * BLK_QS] __attribute__((aligned(32)));
    float bias[BLK_QS];
    float sf[QA_MAXD], mf[QA_MAXD]; /* the block's fp16 scales and minima, widened once */
    widen(scale, kd, sf);
    widen(min, kd, mf);
    /* the last partial tile reads a zero-padded copy of its bytes (never past the row's end) */
    uint8_t tail[QA_MAXD * 2 * 8];
    const size_t tstride = 2 * 8; /* bytes of 16 codes at 8 bits, the most a tile reads */
    int full = nt / BLK_T * BLK_T;
    tail_tile(codes, cstride, kd, full, nt, bits, tstride, tail);
    for (int q0 = 0; q0 < g; q0 += BLK_QS) {
        int qn = g - q0 < BLK_QS ? g - q0 : BLK_QS;
        for (int j = 0; j < qn; j++) bias[j] = fold_query(Q + (size_t)(q0 + j) * kd, sf, mf, kd, qs + j * kd);
        for (int t0 = 0; t0 < nt; t0 += BLK_T) {
            int nb = nt - t0 < BLK_T ? nt - t0 : BLK_T;
            const uint8_t *p = nb == BLK_T ? codes + (size_t)t0 * bits / 8 : tail;
            size_t cs = nb == BLK_T ? cstride : tstride;
            /* split the qn queries into register blocks of near-equal size (<= BLK_QB) */
            int nblk = (qn + BLK_QB - 1) / BLK_QB;
            for (int i0 = 0, k = 0; k < nblk; k++) {
                int qb = reg_block(qn, i0, nblk, k);
                blk_tile_any(p, cs, kd, qs + i0 * kd, kd, bias + i0, qb, bits, sc,
                             S + (size_t)(q0 + i0) * lds + t0, lds, nb);
                i0 += qb;
            }
        }
    }
}

/* ---- tok_scores: per-token rows, one (scale, min) per row ----
 * 8 rows are unpacked into an L1 block (each row once, whatever g), then each query takes 8 dot
 * products over kd, reduced together; S = sc * (scale_t * dot + min_t * sum(q)). */

/* lane i of the result = sum of the 8 lanes of v[i] */
static inline __m256 sum8x8(const __m256 v[8]) {
    __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
    __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
    /* lanes (per 128-bit half): 0..3 = partial sums of rows 0..3, 4..7 of rows 4..7 */
    __m256 q0 = _mm256_hadd_ps(h01, h23), q1 = _mm256_hadd_ps(h45, h67);
    __m256 lo = _mm256_permute2f128_ps(q0, q1, 0x20), hi = _mm256_permute2f128_ps(q0, q1, 0x31);
    return _mm256_add_ps(lo, hi);
}

/* queries [0, g) of one chunk (g <= TOK_QC). The rows hold lane-scaled codes; the queries are
 * scaled by the inverse lane scale instead (exact), so the dots come out in plain units. */
ALWAYS_INLINE void tok_scores_impl(const float *Q, int g, int kd, const uint8_t *codes,
                                   size_t rstride, const uint16_t *scale, const uint16_t *min, int n,
                                   const int bits, float sc, float *S, int lds) {
    float kb[8 * QA_MAXD] __attribute__((aligned(32)));
    float qx[TOK_QC * QA_MAXD] __attribute__((aligned(32)));
    float qsum[TOK_QC];
    const __m256 inv = lane_inv(bits);
    for (int qi = 0; qi < g; qi++) {
        const float *q = Q + (size_t)qi * kd;
        float s = 0.0f;
        for (int c = 0; c < kd; c++) s += q[c];
        qsum[qi] = s;
        for (int d = 0; d < kd; d += 8)
            _mm256_store_ps(qx + qi * kd + d, _mm256_mul_ps(_mm256_loadu_ps(q + d), inv));
    }
    const __m256 vsc = _mm256_set1_ps(sc);
    for (int j = 0; j < n; j += 8) {
        int nb = n - j < 8 ? n - j : 8;
        for (int r = 0; r < nb; r++) xcodes_row(codes + (size_t)(j + r) * rstride, kd, bits, kb + r * kd);
        for (int i = nb * kd; i < 8 * kd; i += 8) _mm256_store_ps(kb + i, _mm256_setzero_ps());
        __m256 vs, vm;
        if (nb == 8) {
            vs = cvt8h(scale + j);
            vm = cvt8h(min + j);
        } else {
            uint16_t ts[8] = {0}, tm[8] = {0};
            memcpy(ts, scale + j, sizeof(uint16_t) * (size_t)nb);
            memcpy(tm, min + j, sizeof(uint16_t) * (size_t)nb);
            vs = cvt8h(ts);
            vm = cvt8h(tm);
        }
        for (int qi = 0; qi < g; qi++) {
            const float *q = qx + qi * kd;
            __m256 a[8];
            UNROLL for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
#pragma GCC unroll 4
            for (int d = 0; d < kd; d += 8) {
                __m256 qv = _mm256_load_ps(q + d);
                UNROLL for (int r = 0; r < 8; r++)
                    a[r] = _mm256_fmadd_ps(qv, _mm256_load_ps(kb + r * kd + d), a[r]);
            }
            __m256 dot = sum8x8(a);
            __m256 res = _mm256_fmadd_ps(vs, dot, _mm256_mul_ps(vm, _mm256_set1_ps(qsum[qi])));
            res = _mm256_mul_ps(res, vsc);
            float *s = S + (size_t)qi * lds + j;
            if (nb == 8) {
                _mm256_storeu_ps(s, res);
            } else {
                float tmp[8];
                _mm256_storeu_ps(tmp, res);
                memcpy(s, tmp, sizeof(float) * (size_t)nb);
            }
        }
    }
}

void ops_qattn_tok_scores_avx2(const float *Q, int g, int kd, const uint8_t *codes,
                               size_t rstride, const uint16_t *scale, const uint16_t *min, int n,
                               int bits, float sc, float *S, int lds) {
    if (n <= 0 || g <= 0) return;
    if (kd <= 0 || kd % 8 != 0 || kd > QA_MAXD || !tok_bits_ok(bits)) {
        ops_qattn_tok_scores_ref(Q, g, kd, codes, rstride, scale, min, n, bits, sc, S, lds);
        return;
    }
    for (int q0 = 0; q0 < g; q0 += TOK_QC) {
        int qn = g - q0 < TOK_QC ? g - q0 : TOK_QC;
        const float *q = Q + (size_t)q0 * kd;
        float *s = S + (size_t)q0 * lds;
        if (bits == 2) tok_scores_impl(q, qn, kd, codes, rstride, scale, min, n, 2, sc, s, lds);
        else if (bits == 3) tok_scores_impl(q, qn, kd, codes, rstride, scale, min, n, 3, sc, s, lds);
        else if (bits == 4) tok_scores_impl(q, qn, kd, codes, rstride, scale, min, n, 4, sc, s, lds);
        else tok_scores_impl(q, qn, kd, codes, rstride, scale, min, n, 8, sc, s, lds);
    }
}

/* ---- tok_accum: O[qi, group k] += sum_t (p_t scale_tk) code_t + (sum_t p_t min_tk) ----
 * Blocks of 8 value rows. Per block, the (8, ng) scales and mins are turned into one vector of
 * the 8 rows per group (with one group per row they already are), and every query's 8
 * p * scale per group are stored; the min terms are summed per (group, query), lane r from row
 * r. Then for each 8-channel chunk (it lies in one group: gs is a multiple of 8), the chunk's
 * codes of the 8 rows are unpacked into registers once and feed every query (8 FMAs into the
 * query's accumulator chunk, one load and one store of it, the p * scale broadcast from the
 * chunk's group). The accumulator is in the lane-scaled domain of the codes; at the end it is
 * unscaled (exact) and added to O together with the min sums of its group. Queries [0, g) of
 * one chunk (g <= TOK_QC); `one`: gs == hd (a single group per row), as a constant. */

ALWAYS_INLINE void tok_accum_impl(const float *P, int g, int n, int lds, const uint8_t *codes,
                                  size_t rstride, const uint16_t *scale, const uint16_t *min, int hd,
                                  int gs, const int bits, const int one, float *O) {
    const int ng = one ? 1 : hd / gs; /* groups per row: ng * 8 <= hd */
    if (one) gs = hd;
    float acc[TOK_QC * QA_MAXD] __attribute__((aligned(32)));
    float ps[TOK_QC * QA_MAXD] __attribute__((aligned(32))); /* (group, query, row) */
    float vb[QA_MAXD] __attribute__((aligned(32)));
    __m256 biasv[TOK_QC * QA_MAXD / 8]; /* (group, query): min terms, lane r from row r of blocks */
    float bias[TOK_QC * QA_MAXD / 8];   /* (group, query): min terms of the tail rows */
    __m256 st[QA_MAXD / 8], mt[QA_MAXD / 8];
    int kof[QA_MAXD / 8]; /* chunk -> its group's offset in ps */
    for (int d = 0; d < hd; d += 8) kof[d / 8] = d / gs * g * 8;
    for (int i = 0; i < g * ng; i++) biasv[i] = _mm256_setzero_ps(), bias[i] = 0.0f;
    memset(acc, 0, sizeof(float) * (size_t)g * hd);
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        if (one) {
            st[0] = cvt8h(scale + j), mt[0] = cvt8h(min + j);
        } else { /* 8 rows of ng fp16 scales (minima), widened, then transposed */
            float wf[QA_MAXD];
            widen(scale + (size_t)j * ng, 8 * ng, wf);
            cols8(wf, ng, st);
            widen(min + (size_t)j * ng, 8 * ng, wf);
            cols8(wf, ng, mt);
        }
        for (int k = 0; k < ng; k++) {
            for (int qi = 0; qi < g; qi++) {
                const __m256 p = _mm256_loadu_ps(P + (size_t)qi * lds + j);
                __m256 *b = biasv + k * g + qi;
                *b = _mm256_fmadd_ps(p, mt[k], *b);
                _mm256_store_ps(ps + (k * g + qi) * 8, _mm256_mul_ps(p, st[k]));
            }
        }
        const uint8_t *row = codes + (size_t)j * rstride;
        for (int d = 0; d < hd; d += 8) {
            const uint8_t *c = row + (size_t)d * bits / 8;
            const float *wk = ps + (one ? 0 : kof[d / 8]);
            __m256 x[8];
            UNROLL for (int r = 0; r < 8; r++) x[r] = xcodes8(c + (size_t)r * rstride, bits);
            for (int qi = 0; qi < g; qi++) {
                float *a = acc + qi * hd + d;
                const float *w = wk + qi * 8;
                __m256 y = _mm256_load_ps(a);
                UNROLL for (int r = 0; r < 8; r++)
                    y = _mm256_fmadd_ps(_mm256_broadcast_ss(w + r), x[r], y);
                _mm256_store_ps(a, y);
            }
        }
    }
    for (; j < n; j++) {
        xcodes_row(codes + (size_t)j * rstride, hd, bits, vb);
        float sj[QA_MAXD / 8], mj[QA_MAXD / 8];
        widen(scale + (size_t)j * ng, ng, sj);
        widen(min + (size_t)j * ng, ng, mj);
        for (int qi = 0; qi < g; qi++) {
            float p = P[(size_t)qi * lds + j];
            float *a = acc + qi * hd;
            for (int k = 0, d = 0; k < ng; k++) {
                bias[k * g + qi] += p * mj[k];
                __m256 w = _mm256_set1_ps(p * sj[k]);
                for (int e = 0; e < gs; e += 8, d += 8) {
                    __m256 y = _mm256_fmadd_ps(w, _mm256_load_ps(vb + d), _mm256_load_ps(a + d));
                    _mm256_store_ps(a + d, y);
                }
            }
        }
    }
    const __m256 inv = lane_inv(bits);
    for (int qi = 0; qi < g; qi++) {
        float *o = O + (size_t)qi * hd;
        const float *a = acc + qi * hd;
        for (int k = 0, d = 0; k < ng; k++) {
            __m256 b = _mm256_set1_ps(hsum8(biasv[k * g + qi]) + bias[k * g + qi]);
            for (int e = 0; e < gs; e += 8, d += 8) {
                __m256 x = _mm256_fmadd_ps(_mm256_load_ps(a + d), inv, _mm256_loadu_ps(o + d));
                _mm256_storeu_ps(o + d, _mm256_add_ps(x, b));
            }
        }
    }
}

void ops_qattn_tok_accum_avx2(const float *P, int g, int n, int lds, const uint8_t *codes,
                              size_t rstride, const uint16_t *scale, const uint16_t *min, int hd,
                              int gs, int bits, float *O) {
    if (n <= 0 || g <= 0) return;
    if (hd <= 0 || hd % 8 != 0 || hd > QA_MAXD || gs <= 0 || gs % 8 != 0 || hd % gs != 0 ||
        !tok_bits_ok(bits)) {
        ops_qattn_tok_accum_ref(P, g, n, lds, codes, rstride, scale, min, hd, gs, bits, O);
        return;
    }
    for (int q0 = 0; q0 < g; q0 += TOK_QC) {
        int qn = g - q0 < TOK_QC ? g - q0 : TOK_QC;
        const float *p = P + (size_t)q0 * lds;
        float *o = O + (size_t)q0 * hd;
#define TOK_ACCUM(b, one) tok_accum_impl(p, qn, n, lds, codes, rstride, scale, min, hd, gs, b, one, o)
        if (gs == hd) {
            if (bits == 2) TOK_ACCUM(2, 1);
            else if (bits == 3) TOK_ACCUM(3, 1);
            else if (bits == 4) TOK_ACCUM(4, 1);
            else TOK_ACCUM(8, 1);
        } else {
            if (bits == 2) TOK_ACCUM(2, 0);
            else if (bits == 3) TOK_ACCUM(3, 0);
            else if (bits == 4) TOK_ACCUM(4, 0);
            else TOK_ACCUM(8, 0);
        }
#undef TOK_ACCUM
    }
}
