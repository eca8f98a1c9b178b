/* kv_attn.h — the two inner loops of attention over one KV head of a view, whatever the entries'
 * storage: fp16 hot rows through ops_attn_*, packed entries through the fused low-bit kernels
 * (ops_qattn_*) or fp16 rows of the kept ThinK channels. Entries are addressed by their index in
 * the view, [from, to); packed ones come first (kv_view.h). Does not: mask (callers pass only
 * visible ranges), softmax, or know about policies.
 */
#ifndef KVS_KV_ATTN_H
#define KVS_KV_ATTN_H

#include "kv_view.h"

/* floats of scratch kv_attn_* need for g query rows */
size_t kv_attn_scratch_floats(int g, int head_dim);

/* S[qi * lds + (j - from)] = sc * q_qi · k_j for j in [from, to); Q is (g, head_dim). */
void kv_attn_scores(const struct kv_view_head *vh, int hd, const float *Q, int g, int32_t from,
                    int32_t to, float sc, float *S, int lds, float *scratch);
/* O[qi] = sum_j P[qi * lds + (j - from)] v_j over [from, to); O is (g, head_dim), overwritten. */
void kv_attn_accum(const struct kv_view_head *vh, int hd, const float *P, int g, int32_t from,
                   int32_t to, int lds, float *O, float *scratch);

#endif
