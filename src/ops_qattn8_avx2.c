/* ops_qattn8_avx2.c — the int8 forms of the KIVI attention kernels (ops_qattn_blk_scores_q8,
 * ops_qattn_tok_accum_q8; their contract and error bounds are in ops.h). 2- and 4-bit codes are
 * multiplied as unsigned bytes against 8-bit signed factors with vpmaddubsw, which sums pairs of
 * adjacent byte products into 16-bit lanes: the two codes of a pair are placed side by side
 * (two key channels of one token, two value rows of one channel), so one instruction does 32
 * multiply-adds where the float kernels (ops_qattn_avx2.c) convert each code and do 8. The
 * 16-bit lanes are widened to 32 bits before they can overflow (a pair is at most
 * 2 * 15 * 127 = 3810 for 4-bit codes: 8 pairs; 762 for 2-bit: 32 pairs); the integer sums are
 * exact, so the results equal the _q8_ref ones but for the order of the float bias sums.
 * (Value weights at M = 63 would let 16 pairs of 4-bit rows sum in 16 bits, 11% faster here,
 * but raised SmolLM2's KIVI-4 KL against the full cache from 0.0050 to 0.0059; at M = 127 it is
 * 0.0052.)
 *
 * Placing the codes: for two code streams x and y (two channels of a key block, two rows of
 * values), unpacking the bytes of x and y interleaved puts byte k of both side by side. 4-bit:
 * the low nibbles (mask) and the high nibbles (16-bit shift by 4, mask) give lanes j = codes 2j
 * and 2j + 1 of the stream. 2-bit: the 16 interleaved bytes are broadcast to both halves and
 * shifted by 0/2 (lanes 0-7 / 8-15) and 4/6 bits (32-bit shifts: what leaks in from the next
 * byte lands above the 2-bit mask). So a tile of 32 tokens (keys) or 32 channels (values)
 * comes out in four vectors of 8 lanes in a fixed order, undone once per tile (unperm32).
 * Compiled with -mavx2 -mfma -mf16c; called only after ops_init() has seen those features. */
#include "ops.h"
#include "ops_simd.h"

#include <immintrin.h>
#include <string.h>

enum {
    Q8_MAXD = 256, /* kd, hd at most this */
    Q8_T = 32,     /* tokens of a key tile, channels of a value tile */
    Q8_QC = 16,    /* queries prepared at once (their int8 copies live on the stack) */
    Q8_QB = 4,     /* queries whose accumulators live in registers at once (2 * 4 + 6 <= 16) */
};

static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* q8 of n floats (n a multiple of 8) with the reference's arithmetic (ops.c q8_quantize): the
 * maximum is exact in any order, and vcvtps2dq rounds half to even like lrintf */
ALWAYS_INLINE float q8_row(const float *v, int n, int8_t *r) {
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(v + i), absm));
    float amax = hmax8(mx);
    if (!(amax > 0.0f)) {
        memset(r, 0, (size_t)n);
        return 0.0f;
    }
    const __m256 id = _mm256_set1_ps(127.0f / amax);
    for (int i = 0; i < n; i += 8) {
        __m256i x = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + i), id));
        __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
        _mm_storel_epi64((__m128i *)(r + i), _mm_packs_epi16(w, w));
    }
    return amax / 127.0f;
}

/* the weights' int8 copy of OPS_Q8_ROWS floats (w[0..3], 8 each) into r: q8_row's arithmetic
 * on values already in registers */
ALWAYS_INLINE float q8_rows(const __m256 w[4], int8_t *r) {
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(w[0], absm), _mm256_and_ps(w[1], absm)),
                              _mm256_max_ps(_mm256_and_ps(w[2], absm), _mm256_and_ps(w[3], absm)));
    float amax = hmax8(mx);
    if (!(amax > 0.0f)) {
        memset(r, 0, 32);
        return 0.0f;
    }
    const __m256 id = _mm256_set1_ps(127.0f / amax);
    __m256i x[4];
    UNROLL for (int k = 0; k < 4; k++) x[k] = _mm256_cvtps_epi32(_mm256_mul_ps(w[k], id));
    /* packs works within 128-bit halves: [a 0-3, b 0-3 | a 4-7, b 4-7], so the int16 vectors
     * hold 0-3 8-11 4-7 12-15 (and 16-31 alike); the byte pack of the two keeps that order,
     * which one 32-bit permute undoes */
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(x[0], x[1]), _mm256_packs_epi32(x[2], x[3]));
    b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)r, b);
    return amax / 127.0f;
}

/* the int16 pair (r[i], r[i + 1]) in every 16-bit lane */
ALWAYS_INLINE __m256i pair16(const int8_t *r) {
    int16_t w;
    memcpy(&w, r, 2);
    return _mm256_set1_epi16(w);
}

/* the codes of two streams side by side (see the top): *a and *b hold lanes for stream
 * positions as unperm32 expects. x and y point at 16 bytes (4-bit) or 8 bytes (2-bit). */
ALWAYS_INLINE void place(__m128i vx, __m128i vy, const int bits, __m256i *a, __m256i *b) {
    if (bits == 4) {
        const __m256i m = _mm256_set1_epi8(0x0F);
        __m256i z = _mm256_set_m128i(_mm_unpackhi_epi8(vx, vy), _mm_unpacklo_epi8(vx, vy));
        *a = _mm256_and_si256(z, m);
        *b = _mm256_and_si256(_mm256_srli_epi16(z, 4), m);
    } else {
        const __m256i m = _mm256_set1_epi8(0x03);
        __m256i z = _mm256_broadcastsi128_si256(_mm_unpacklo_epi8(vx, vy));
        *a = _mm256_and_si256(_mm256_srlv_epi32(z, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), m);
        *b = _mm256_and_si256(_mm256_srlv_epi32(z, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), m);
    }
}
ALWAYS_INLINE __m128i load_codes(const uint8_t *p, const int bits) {
    return bits == 4 ? _mm_loadu_si128((const __m128i *)p) : _mm_loadl_epi64((const __m128i *)p);
}

/* the 16-bit lanes of a and b (from place) widened into 4 int32 vectors f[0..3] */
ALWAYS_INLINE void widen16(__m256i a, __m256i b, __m256i f[4]) {
    f[0] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a));
    f[1] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a, 1));
    f[2] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(b));
    f[3] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(b, 1));
}

/* f[0..3] in widen16's order -> out[0..31] in stream order.
 * 4-bit: f0 = positions 0,2,..,14, f1 = 16,..,30, f2 = 1,..,15, f3 = 17,..,31.
 * 2-bit: f0 = 4j, f1 = 4j+1, f2 = 4j+2, f3 = 4j+3 (j = 0..7). */
ALWAYS_INLINE void unperm32(const __m256 f[4], const int bits, __m256 out[4]) {
    if (bits == 4) {
        UNROLL for (int h = 0; h < 2; h++) {
            __m256 lo = _mm256_unpacklo_ps(f[h], f[h + 2]), hi = _mm256_unpackhi_ps(f[h], f[h + 2]);
            out[2 * h] = _mm256_permute2f128_ps(lo, hi, 0x20);
            out[2 * h + 1] = _mm256_permute2f128_ps(lo, hi, 0x31);
        }
    } else {
        __m256 a = _mm256_unpacklo_ps(f[0], f[1]), b = _mm256_unpacklo_ps(f[2], f[3]);
        __m256 c = _mm256_unpackhi_ps(f[0], f[1]), d = _mm256_unpackhi_ps(f[2], f[3]);
        __m256 e0 = _mm256_shuffle_ps(a, b, 0x44), e1 = _mm256_shuffle_ps(a, b, 0xEE);
        __m256 e2 = _mm256_shuffle_ps(c, d, 0x44), e3 = _mm256_shuffle_ps(c, d, 0xEE);
        out[0] = _mm256_permute2f128_ps(e0, e1, 0x20);
        out[1] = _mm256_permute2f128_ps(e2, e3, 0x20);
        out[2] = _mm256_permute2f128_ps(e0, e1, 0x31);
        out[3] = _mm256_permute2f128_ps(e2, e3, 0x31);
    }
}

/* The integer core of both kernels: n code streams (stream j at p + j * stride: a key channel
 * or a value row), taken in pairs, against QB rows of int8 factors (row i at w + i * wstride,
 * factor j for stream j), summed into s32[i][0..3] (in widen16's order). The 16-bit sums are
 * widened every `flush` streams, before they can overflow. A missing last stream of an odd n
 * reads as zeros. */
ALWAYS_INLINE void dot_streams(const uint8_t *p, size_t stride, int n, const int8_t *w,
                               size_t wstride, const int QB, const int bits, __m256i s32[][4]) {
    const int flush = bits == 4 ? 16 : 64;
    UNROLL for (int i = 0; i < QB; i++) UNROLL for (int k = 0; k < 4; k++) s32[i][k] = _mm256_setzero_si256();
    for (int j0 = 0; j0 < n; j0 += flush) {
        int j1 = j0 + flush < n ? j0 + flush : n;
        __m256i a[Q8_QB][2];
        UNROLL for (int i = 0; i < QB; i++) a[i][0] = a[i][1] = _mm256_setzero_si256();
        for (int j = j0; j < j1; j += 2) {
            const uint8_t *x = p + (size_t)j * stride;
            __m128i vy = j + 1 < n ? load_codes(x + stride, bits) : _mm_setzero_si128();
            __m256i lo, hi;
            place(load_codes(x, bits), vy, bits, &lo, &hi);
            UNROLL for (int i = 0; i < QB; i++) {
                __m256i f = pair16(w + (size_t)i * wstride + j);
                a[i][0] = _mm256_add_epi16(a[i][0], _mm256_maddubs_epi16(lo, f));
                a[i][1] = _mm256_add_epi16(a[i][1], _mm256_maddubs_epi16(hi, f));
            }
        }
        UNROLL for (int i = 0; i < QB; i++) {
            __m256i f[4];
            widen16(a[i][0], a[i][1], f);
            UNROLL for (int k = 0; k < 4; k++) s32[i][k] = _mm256_add_epi32(s32[i][k], f[k]);
        }
    }
}

/* ---- keys: one tile of 32 tokens x QB queries over all kd channels ---- */
ALWAYS_INLINE void key_tile(const uint8_t *p, size_t cs, int kd, const int8_t *qr, const float *dq,
                            const float *bias, const int QB, const int bits, float sc, float *S,
                            int lds, int nb) {
    __m256i s32[Q8_QB][4];
    dot_streams(p, cs, kd, qr, Q8_MAXD, QB, bits, s32);
    const __m256 vsc = _mm256_set1_ps(sc);
    UNROLL for (int i = 0; i < QB; i++) {
        __m256 f[4], o[4];
        const __m256 d = _mm256_set1_ps(dq[i]), b = _mm256_set1_ps(bias[i]);
        UNROLL for (int k = 0; k < 4; k++)
            f[k] = _mm256_mul_ps(vsc, _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s32[i][k]), b));
        unperm32(f, bits, o);
        float *s = S + (size_t)i * lds;
        if (nb == Q8_T) {
            UNROLL for (int k = 0; k < 4; k++) _mm256_storeu_ps(s + 8 * k, o[k]);
        } else {
            float tmp[Q8_T];
            UNROLL for (int k = 0; k < 4; k++) _mm256_storeu_ps(tmp + 8 * k, o[k]);
            memcpy(s, tmp, sizeof(float) * (size_t)nb);
        }
    }
}

#define KEY_CASE(QB, B)                                                                        \
    case (QB) * 16 + (B):                                                                      \
        key_tile(p, cs, kd, qr, dq, bias, QB, B, sc, S, lds, nb);                              \
        break;
static void key_tile_any(const uint8_t *p, size_t cs, int kd, const int8_t *qr, const float *dq,
                         const float *bias, int qb, int bits, float sc, float *S, int lds, int nb) {
    switch (qb * 16 + bits) {
        KEY_CASE(1, 2) KEY_CASE(2, 2) KEY_CASE(3, 2) KEY_CASE(4, 2)
        KEY_CASE(1, 4) KEY_CASE(2, 4) KEY_CASE(3, 4) KEY_CASE(4, 4)
    default: break;
    }
}

void ops_qattn_blk_scores_q8_avx2(const float *Q, int g, int kd, const uint8_t *codes,
                                  size_t cstride, const uint16_t *scale, const uint16_t *min,
                                  int nt, int bits, float sc, float *S, int lds) {
    if (nt <= 0 || g <= 0) return;
    if (!ops_qattn_q8_bits(bits)) {
        ops_qattn_blk_scores_avx2(Q, g, kd, codes, cstride, scale, min, nt, bits, sc, S, lds);
        return;
    }
    if (kd <= 0 || kd % 8 != 0 || kd > Q8_MAXD) {
        ops_qattn_blk_scores_q8_ref(Q, g, kd, codes, cstride, scale, min, nt, bits, sc, S, lds);
        return;
    }
    float sf[Q8_MAXD], mf[Q8_MAXD], qs[Q8_MAXD];
    widen(scale, kd, sf);
    widen(min, kd, mf);
    /* a partial last tile reads a zero-padded copy of its bytes (never past the codes) */
    const size_t tb = (size_t)Q8_T * bits / 8;
    uint8_t tail[Q8_MAXD * Q8_T / 2];
    int full = nt / Q8_T * Q8_T;
    tail_tile(codes, cstride, kd, full, nt, bits, tb, tail);
    int8_t qr[Q8_QC * Q8_MAXD];
    float dq[Q8_QC], bias[Q8_QC];
    for (int q0 = 0; q0 < g; q0 += Q8_QC) {
        int qn = g - q0 < Q8_QC ? g - q0 : Q8_QC;
        for (int j = 0; j < qn; j++) {
            bias[j] = fold_query(Q + (size_t)(q0 + j) * kd, sf, mf, kd, qs);
            dq[j] = q8_row(qs, kd, qr + (size_t)j * Q8_MAXD);
        }
        int nblk = (qn + Q8_QB - 1) / Q8_QB;
        for (int t0 = 0; t0 < nt; t0 += Q8_T) {
            int nb = nt - t0 < Q8_T ? nt - t0 : Q8_T;
            const uint8_t *p = nb == Q8_T ? codes + (size_t)t0 * bits / 8 : tail;
            size_t cs = nb == Q8_T ? cstride : tb;
            for (int i0 = 0, k = 0; k < nblk; k++) {
                int qb = reg_block(qn, i0, nblk, k);
                key_tile_any(p, cs, kd, qr + (size_t)i0 * Q8_MAXD, dq + i0, bias + i0, qb, bits, sc,
                             S + (size_t)(q0 + i0) * lds + t0, lds, nb);
                i0 += qb;
            }
        }
    }
}

/* ---- values: OPS_Q8_ROWS rows x 32 channels x QB queries ----
 * acc (per query Q8_MAXD floats, each 32-channel tile in widen16's order) += d * sums */
ALWAYS_INLINE void val_tile(const uint8_t *rows, size_t rstride, int nr, const int8_t *wr,
                            const float *dw, const int QB, const int bits, float *acc) {
    __m256i s32[Q8_QB][4];
    dot_streams(rows, rstride, nr, wr, OPS_Q8_ROWS, QB, bits, s32);
    UNROLL for (int i = 0; i < QB; i++) {
        const __m256 d = _mm256_set1_ps(dw[i]);
        float *o = acc + (size_t)i * Q8_MAXD;
        UNROLL for (int k = 0; k < 4; k++)
            _mm256_storeu_ps(o + 8 * k, _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s32[i][k]), _mm256_loadu_ps(o + 8 * k)));
    }
}

#define VAL_CASE(QB, B)                                                                        \
    case (QB) * 16 + (B):                                                                      \
        val_tile(rows, rstride, nr, wr, dw, QB, B, acc);                                       \
        break;
static void val_tile_any(const uint8_t *rows, size_t rstride, int nr, const int8_t *wr,
                         const float *dw, int qb, int bits, float *acc) {
    switch (qb * 16 + bits) {
        VAL_CASE(1, 2) VAL_CASE(2, 2) VAL_CASE(3, 2) VAL_CASE(4, 2)
        VAL_CASE(1, 4) VAL_CASE(2, 4) VAL_CASE(3, 4) VAL_CASE(4, 4)
    default: break;
    }
}

/* rows j0..j0+31 of an (n, ng) fp16 array as vectors: v[r][k] holds column k of rows
 * 8r..8r+7; rows past nr are 0 (and not read) */
ALWAYS_INLINE void cols32(const uint16_t *a, int ng, int j0, int nr, __m256 v[4][Q8_MAXD / Q8_T]) {
    float f[OPS_Q8_ROWS * Q8_MAXD / Q8_T];
    if (nr == OPS_Q8_ROWS) {
        widen(a + (size_t)j0 * ng, OPS_Q8_ROWS * ng, f);
    } else {
        uint16_t t[OPS_Q8_ROWS * Q8_MAXD / Q8_T] = {0};
        memcpy(t, a + (size_t)j0 * ng, sizeof(uint16_t) * (size_t)(nr * ng));
        widen(t, OPS_Q8_ROWS * ng, f);
    }
    UNROLL for (int r = 0; r < 4; r++) cols8(f + 8 * r * ng, ng, v[r]);
}

void ops_qattn_tok_accum_q8_avx2(const float *P, int g, int n, int lds, const uint8_t *codes,
                                 size_t rstride, const uint16_t *scale, const uint16_t *min, int hd,
                                 int gs, int bits, float *O) {
    if (n <= 0 || g <= 0) return;
    if (!ops_qattn_q8_bits(bits) || gs <= 0 || gs % Q8_T != 0 || hd % gs != 0) {
        ops_qattn_tok_accum_avx2(P, g, n, lds, codes, rstride, scale, min, hd, gs, bits, O);
        return;
    }
    if (hd > Q8_MAXD) {
        ops_qattn_tok_accum_q8_ref(P, g, n, lds, codes, rstride, scale, min, hd, gs, bits, O);
        return;
    }
    enum { R = OPS_Q8_ROWS, MAXG = Q8_MAXD / Q8_T };
    const int ng = hd / gs;
    const size_t tb = (size_t)Q8_T * bits / 8;       /* bytes of a 32-channel tile of one row */
    float acc[Q8_QC * Q8_MAXD] __attribute__((aligned(32)));
    int8_t wr[MAXG * Q8_QC * R]; /* (group, query, row) */
    float dw[MAXG * Q8_QC];      /* (group, query) */
    __m256 bv[MAXG * Q8_QC];     /* (group, query): the min terms, 8 lanes */
    for (int q0 = 0; q0 < g; q0 += Q8_QC) {
        int qn = g - q0 < Q8_QC ? g - q0 : Q8_QC;
        for (int i = 0; i < ng * qn; i++) bv[i] = _mm256_setzero_ps();
        for (int i = 0; i < qn; i++) memset(acc + (size_t)i * Q8_MAXD, 0, sizeof(float) * (size_t)hd);
        int nblk = (qn + Q8_QB - 1) / Q8_QB;
        for (int j0 = 0; j0 < n; j0 += R) {
            int nr = n - j0 < R ? n - j0 : R;
            __m256 sv[4][MAXG], mv[4][MAXG];
            cols32(scale, ng, j0, nr, sv);
            cols32(min, ng, j0, nr, mv);
            for (int i = 0; i < qn; i++) {
                const float *p = P + (size_t)(q0 + i) * lds + j0;
                float tp[R];
                if (nr < R) { /* never read P past row n (its padding may be anything) */
                    memset(tp, 0, sizeof tp);
                    memcpy(tp, p, sizeof(float) * (size_t)nr);
                    p = tp;
                }
                __m256 pv[4];
                UNROLL for (int r = 0; r < 4; r++) pv[r] = _mm256_loadu_ps(p + 8 * r);
                for (int k = 0; k < ng; k++) {
                    __m256 w[4], b = bv[k * qn + i];
                    UNROLL for (int r = 0; r < 4; r++) {
                        b = _mm256_fmadd_ps(pv[r], mv[r][k], b);
                        w[r] = _mm256_mul_ps(pv[r], sv[r][k]);
                    }
                    bv[k * qn + i] = b;
                    dw[k * qn + i] = q8_rows(w, wr + (k * qn + i) * R);
                }
            }
            const uint8_t *rows = codes + (size_t)j0 * rstride;
            for (int h = 0; h < hd; h += Q8_T) {
                int k = h / gs;
                for (int i0 = 0, b = 0; b < nblk; b++) {
                    int qb = reg_block(qn, i0, nblk, b);
                    val_tile_any(rows + (size_t)h / Q8_T * tb, rstride, nr, wr + (k * qn + i0) * R,
                                 dw + k * qn + i0, qb, bits, acc + (size_t)i0 * Q8_MAXD + h);
                    i0 += qb;
                }
            }
        }
        for (int i = 0; i < qn; i++) {
            float *o = O + (size_t)(q0 + i) * hd;
            for (int h = 0; h < hd; h += Q8_T) {
                const __m256 b = _mm256_set1_ps(hsum8(bv[h / gs * qn + i]));
                __m256 f[4], v[4];
                UNROLL for (int k = 0; k < 4; k++) f[k] = _mm256_load_ps(acc + (size_t)i * Q8_MAXD + h + 8 * k);
                unperm32(f, bits, v);
                UNROLL for (int k = 0; k < 4; k++)
                    _mm256_storeu_ps(o + h + 8 * k, _mm256_add_ps(_mm256_loadu_ps(o + h + 8 * k), _mm256_add_ps(v[k], b)));
            }
        }
    }
}
