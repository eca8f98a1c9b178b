/* knorm.c — key-norm scorer (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV
 * Cache Compression", arXiv 2406.11430; kvpress KnormPress): keys with a small L2 norm tend to
 * receive high attention, so the score is minus the norm of the stored fp16 key. */
#include "kv_policy.h"
#include "quant.h"

#include <math.h>

static void score(const struct kv_score_args *a, int ih, float *out) {
    const struct kv_head_store *h = kv_seq_head(a->s, a->il, ih);
    int hd = a->p->head_dim;
    float x[512];
    for (int32_t j = 0; j < h->n; j++) {
        float ss = 0.0f;
        if (j < h->nc) { /* packed: dequantized (ThinK: the kept channels only) */
            kv_seq_key(a->s, a->il, ih, j, x);
            for (int d = 0; d < hd; d++) ss += x[d] * x[d];
        } else {
            for (int d = 0; d < hd; d++) {
                float y = quant_f16_to_f32(h->k[(size_t)(j - h->nc) * hd + d]);
                ss += y * y;
            }
        }
        out[j] = -sqrtf(ss);
    }
}

const struct kv_scorer_i kv_scorer_knorm = {
    .api_version = KV_POLICY_API_VERSION, .method = KV_KNORM, .needs = 0, .score = score,
    .protect = NULL,
};
