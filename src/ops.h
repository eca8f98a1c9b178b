/* ops.h — the float kernels of the forward pass that are not weight matmuls (those are
 * quant_gemm): RMSNorm, RoPE, SwiGLU, and the two inner loops of attention over an fp16 KV
 * view. Each has a scalar reference (ops.c); ops_init() swaps in AVX2/FMA/F16C versions
 * (ops_avx2.c) when the CPU has them. Does not: know about the KV cache or the model.
 */
#ifndef KVS_OPS_H
#define KVS_OPS_H

#include <stdbool.h>
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

/* AVX2 versions (ops_avx2.c); only called when the CPU supports them. */
void ops_attn_scores_avx2(const float *Q, int g, const uint16_t *K, int n, int hd, float scale,
                          float *S, int lds);
void ops_softmax_partial_avx2(float *S, int g, int n, int lds, float *m, float *l);
void ops_attn_accum_avx2(const float *P, int g, int n, int lds, const uint16_t *V, int hd,
                         float *O);

#endif
