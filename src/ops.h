/* ops.h — the float kernels of the forward pass that are not weight matmuls (those are
 * quant_gemm): RMSNorm, RoPE, SwiGLU, and the two inner loops of attention over an fp16 KV
 * view. Each has a scalar reference (ops.c); ops_init() swaps in AVX2/FMA/F16C versions
 * (ops_avx2.c) when the CPU has them. Does not: know about the KV cache or the model.
 */
#ifndef KVS_OPS_H
#define KVS_OPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

void ops_init(void);
void ops_force_ref(bool on);

/* out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i]; out may alias x. */
void ops_rmsnorm(float *out, const float *x, const float *w, int n, float eps);

/* Rotate n_heads heads of head_dim floats in place. cs holds (head_dim/2) (cos, sin) pairs for
 * this token's position. neox: pairs (i, i + hd/2); else adjacent pairs (2i, 2i+1). */
void ops_rope(float *x, int n_heads, int head_dim, const float *cs, bool neox);

/* g[i] = silu(g[i]) * u[i] */
void ops_swiglu(float *g, const float *u, int n);

/* Y (T, rows) = X (T, cols) W^T + b: a small float32 linear layer (the learned scorers' heads).
 * W is (rows, cols) row-major, b may be NULL; ldx and ldy are the row strides of X and Y. */
extern void (*ops_linear_f32)(float *Y, int ldy, const float *X, int ldx, int T, const float *W,
                              const float *b, int rows, int cols);
void ops_linear_f32_ref(float *Y, int ldy, const float *X, int ldx, int T, const float *W,
                        const float *b, int rows, int cols);
void ops_linear_f32_avx2(float *Y, int ldy, const float *X, int ldx, int T, const float *W,
                         const float *b, int rows, int cols);

/* Attention inner loops for one KV head and a group of `g` query heads sharing it (GQA).
 * scores: S[qi * lds + j] = scale * dot(Q[qi], K[j]) for j in [0, n); Q is (g, hd) float,
 *         K is (n, hd) fp16.
 * softmax_partial: for each qi, m = max_j S, p_j = exp(S_j - m) written back into S, returns
 *         sums l[qi] and maxima m[qi].
 * accum:  O[qi] = sum_j P[qi * lds + j] * V[j] for V (n, hd) fp16; O is (g, hd), overwritten. */
extern void (*ops_attn_scores)(const float *Q, int g, const uint16_t *K, int n, int hd,
                               float scale, float *S, int lds);
extern void (*ops_softmax_partial)(float *S, int g, int n, int lds, float *m, float *l);
extern void (*ops_attn_accum)(const float *P, int g, int n, int lds, const uint16_t *V, int hd,
                              float *O);

void ops_attn_scores_ref(const float *Q, int g, const uint16_t *K, int n, int hd, float scale,
                         float *S, int lds);
void ops_softmax_partial_ref(float *S, int g, int n, int lds, float *m, float *l);
void ops_attn_accum_ref(const float *P, int g, int n, int lds, const uint16_t *V, int hd,
                        float *O);
extern void (*ops_attn_accum_add)(const float *P, int g, int n, int lds, const uint16_t *V,
                                  int hd, float *O);
void ops_attn_accum_add_ref(const float *P, int g, int n, int lds, const uint16_t *V, int hd,
                            float *O);
void ops_attn_accum_add_avx2(const float *P, int g, int n, int lds, const uint16_t *V, int hd,
                             float *O);

/* AVX2 versions (ops_avx2.c); only called when the CPU supports them. */
void ops_attn_scores_avx2(const float *Q, int g, const uint16_t *K, int n, int hd, float scale,
                          float *S, int lds);
void ops_softmax_partial_avx2(float *S, int g, int n, int lds, float *m, float *l);
void ops_attn_accum_avx2(const float *P, int g, int n, int lds, const uint16_t *V, int hd,
                         float *O);

/* Attention over low-bit KV payloads (the KIVI / MiKV storage of src/kv/kv_quant.h), fused: the
 * kernels read the packed codes directly, never a dequantized copy of the cache. Codes are b-bit,
 * b in {2, 3, 4, 8}, a little-endian bit stream (code i at bits i b .. i b + b - 1; 3-bit codes
 * cross bytes, 8 of them fill 3); a code x dequantizes to
 * x * scale + min, scale and min fp16 (the store's layout). Q is (g, kd) floats (query rows of one KV head, any number, already gathered to the
 * kd stored key channels); sc is the softmax scale (1/sqrt(original head_dim)).
 * qattn_blk_scores: one KIVI key block, per channel: the codes of channel c for tokens 0..nt-1
 *     start at codes + c * cstride (cstride >= bytes of nt codes); one (scale, min) per channel.
 *     S[qi * lds + t] = sc * sum_{c < kd} Q[qi * kd + c] * (code(c, t) * scale[c] + min[c]).
 * qattn_tok_scores: n per-token rows (MiKV keys): row t's kd codes start at codes + t * rstride;
 *     one (scale, min) per row: S[qi * lds + t] = sc * sum_c Q[qi * kd + c] * x̂(t, c).
 * qattn_tok_accum: n per-token value rows of hd codes (row stride rstride), quantized in groups
 *     of gs consecutive channels (gs divides hd; gs == hd: one group per row), each group with
 *     its own (scale, min): scale and min are (n, hd / gs) row-major, group k of row t is
 *     channels k * gs .. k * gs + gs - 1 with scale[t * (hd / gs) + k], min[t * (hd / gs) + k]:
 *     O[qi * hd + c] += sum_{t < n} P[qi * lds + t] * (code(t, c) * scale[t, c / gs]
 *     + min[t, c / gs]). Adds to O. */
extern void (*ops_qattn_blk_scores)(const float *Q, int g, int kd, const uint8_t *codes,
                                    size_t cstride, const uint16_t *scale, const uint16_t *min, int nt,
                                    int bits, float sc, float *S, int lds);
extern void (*ops_qattn_tok_scores)(const float *Q, int g, int kd, const uint8_t *codes,
                                    size_t rstride, const uint16_t *scale, const uint16_t *min, int n,
                                    int bits, float sc, float *S, int lds);
extern void (*ops_qattn_tok_accum)(const float *P, int g, int n, int lds, const uint8_t *codes,
                                   size_t rstride, const uint16_t *scale, const uint16_t *min, int hd,
                                   int gs, int bits, float *O);
void ops_qattn_blk_scores_ref(const float *Q, int g, int kd, const uint8_t *codes, size_t cstride,
                              const uint16_t *scale, const uint16_t *min, int nt, int bits, float sc,
                              float *S, int lds);
void ops_qattn_tok_scores_ref(const float *Q, int g, int kd, const uint8_t *codes, size_t rstride,
                              const uint16_t *scale, const uint16_t *min, int n, int bits, float sc,
                              float *S, int lds);
void ops_qattn_tok_accum_ref(const float *P, int g, int n, int lds, const uint8_t *codes,
                             size_t rstride, const uint16_t *scale, const uint16_t *min, int hd,
                             int gs, int bits, float *O);
void ops_qattn_blk_scores_avx2(const float *Q, int g, int kd, const uint8_t *codes,
                               size_t cstride, const uint16_t *scale, const uint16_t *min, int nt,
                               int bits, float sc, float *S, int lds);
void ops_qattn_tok_scores_avx2(const float *Q, int g, int kd, const uint8_t *codes,
                               size_t rstride, const uint16_t *scale, const uint16_t *min, int n,
                               int bits, float sc, float *S, int lds);
void ops_qattn_tok_accum_avx2(const float *P, int g, int n, int lds, const uint8_t *codes,
                              size_t rstride, const uint16_t *scale, const uint16_t *min, int hd,
                              int gs, int bits, float *O);
/* The int8 forms of qattn_blk_scores and qattn_tok_accum: what the fast path runs for 2- and
 * 4-bit codes (ops_init points ops_qattn_blk_scores / ops_qattn_tok_accum at the _q8_avx2
 * versions). The codes are multiplied as integers against an 8-bit copy of the other operand
 * (as llama.cpp's quantized-KV dot products do with q8 activations), so the sums are exact
 * integers and the one approximation is that copy:
 *   q8(v[0..n)): d = max|v| / 127, r_i = round-half-even(v_i * (127 / max|v|)) in [-127, 127]
 *   (all zero, d = 0, when max|v| = 0); v_i ~ d r_i, |v_i - d r_i| <= d / 2.
 * blk_scores_q8: per query, v = q_c * scale_c over the kd channels of the block (kd <= 256),
 *     S[qi * lds + t] = sc * fma(d, (float)sum_c r_c code(c, t), bias), bias =
 *     sum_c q_c min_c.
 * tok_accum_q8 (gs a multiple of 32, hd <= 256): per query, value group k and OPS_Q8_ROWS rows
 *     from the first row of the call, v = p_t * scale[t, k] over the block's rows;
 *     per block acc_c = fma(d, (float)sum_t r_t code(t, c), acc_c) in block order; at the end
 *     O[c] += acc_c + sum_t p_t min[t, k].
 * Other bit widths and group sizes take the float kernels above (same results as theirs).
 * Against the exact forms, a score moves by at most sc * (d / 2) * sum_c code(c, t) and an
 * output by at most sum over blocks of (d / 2) * sum_t code(t, c) (tests/test_qattn.c checks
 * both bounds, and the AVX2 versions against the _q8_ref ones to 1e-5 of the summed terms). */
enum { OPS_Q8_ROWS = 32 };
void ops_qattn_blk_scores_q8_ref(const float *Q, int g, int kd, const uint8_t *codes,
                                 size_t cstride, const uint16_t *scale, const uint16_t *min, int nt,
                                 int bits, float sc, float *S, int lds);
void ops_qattn_tok_accum_q8_ref(const float *P, int g, int n, int lds, const uint8_t *codes,
                                size_t rstride, const uint16_t *scale, const uint16_t *min, int hd,
                                int gs, int bits, float *O);
void ops_qattn_blk_scores_q8_avx2(const float *Q, int g, int kd, const uint8_t *codes,
                                  size_t cstride, const uint16_t *scale, const uint16_t *min,
                                  int nt, int bits, float sc, float *S, int lds);
void ops_qattn_tok_accum_q8_avx2(const float *P, int g, int n, int lds, const uint8_t *codes,
                                 size_t rstride, const uint16_t *scale, const uint16_t *min, int hd,
                                 int gs, int bits, float *O);
/* whether the _q8 forms quantize for these codes (else they are the float kernels) */
static inline bool ops_qattn_q8_bits(int bits) { return bits == 2 || bits == 4; }

/* code i of a b-bit code stream (the layout of the kernels above) */
static inline int ops_qcode(const uint8_t *codes, int bits, int i) {
    size_t bit = (size_t)i * (size_t)bits;
    unsigned sh = (unsigned)(bit & 7), w = codes[bit >> 3];
    if (sh + (unsigned)bits > 8) w |= (unsigned)codes[(bit >> 3) + 1] << 8;
    return (int)((w >> sh) & ((1u << bits) - 1));
}

#endif
