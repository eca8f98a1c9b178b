/* h2o.c — H2O scorer (Zhang et al., "H2O: Heavy-Hitter Oracle", arXiv 2306.14048): an entry's
 * score is the attention probability it has accumulated from every query since it entered the
 * cache (the attention kernel adds each query's probabilities, averaged over the query heads of
 * the KV head, to the entry's `acc` slot; compaction moves the slot with the entry). The newest
 * `recent` x budget entries are always kept; heavy hitters fill the rest, chosen only among
 * older entries, as in the authors' real-drop code. Decisions are per KV head (GQA: mean over
 * its query heads), not per query head as in the reference, which only supports MHA. */
#include "kv_policy.h"

static void score(const struct kv_score_args *a, int ih, float *out) {
    const struct kv_head_store *h = kv_seq_head(a->s, a->il, ih);
    for (int32_t j = 0; j < h->n; j++) out[j] = h->acc[j];
}

static int32_t protect(const struct kv_policy *p, int32_t budget) {
    return (int32_t)(p->spec.recent * budget + 0.5f);
}

const struct kv_scorer_i kv_scorer_h2o = {
    .api_version = KV_POLICY_API_VERSION, .method = KV_H2O, .needs = KV_NEED_ACC,
    .score = score, .protect = protect,
};
