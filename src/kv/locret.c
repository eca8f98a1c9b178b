/* locret.c — Locret scorer (Huang et al., "Locret: Enhancing Eviction in Long-Context LLM
 * Inference with Trained Retaining Heads", arXiv 2410.01805). forward() runs the layer's
 * retaining head (learned.c) on every new token's q, k, v before RoPE and stores the predicted
 * importance in the entry's statistic slot (kv_seq.acc_learned); a token's score is fixed once
 * computed, as in the paper. Scoring is reading those slots. The newest `window` entries are
 * kept (the paper's stabilisers; default a quarter of the budget). */
#include "kv_policy.h"

#include <string.h>

static void score(const struct kv_score_args *a, int ih, float *out) {
    const struct kv_head_store *h = kv_seq_head(a->s, a->il, ih);
    KVS_ASSERT(h->acc && a->s->acc_learned);
    memcpy(out, h->acc, sizeof(float) * (size_t)h->n);
}

static int32_t protect(const struct kv_policy *p, int32_t budget) {
    int32_t w = p->spec.obs_window >= 0 ? p->spec.obs_window : budget / 4;
    return w < budget ? w : budget;
}

const struct kv_scorer_i kv_scorer_locret = {
    .api_version = KV_POLICY_API_VERSION, .method = KV_LOCRET, .needs = KV_NEED_LEARNED,
    .score = score, .protect = protect,
};
