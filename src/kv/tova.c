/* tova.c — TOVA scorer (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104): the
 * attention row of the last query, averaged over all query heads of the layer; one decision per
 * layer shared by every KV head (the paper found layer-wise better than head-wise). The row is
 * recomputed at plan time from the saved last query (no probabilities are kept by attention). */
#include "kv_policy.h"

static void score(const struct kv_score_args *a, int ih, float *out) {
    kv_score_query_attention(a, ih, true, out);
}

const struct kv_scorer_i kv_scorer_tova = {
    .api_version = KV_POLICY_API_VERSION, .method = KV_TOVA,
    .needs = KV_NEED_QUERIES | KV_NEED_LAYERWISE | KV_PAR_HEADS, .score = score, .protect = NULL,
};
