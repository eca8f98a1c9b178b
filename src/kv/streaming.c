/* streaming.c — StreamingLLM scorer (Xiao et al., "Efficient Streaming Language Models with
 * Attention Sinks", arXiv 2309.17453): keep the first `sinks` entries (attention sinks) and the
 * most recent ones. Scores are positions, the sinks are pinned with +inf, so the shared top-k
 * keeps sinks + the newest budget - sinks entries.
 * Positions: with pos=cache (default) the store re-rotates the survivors' keys by their position
 * delta when entries are evicted, so the kept entries sit at 0..n-1 and generation can run past
 * the trained context (the paper rotates pre-RoPE keys at every read instead; same keys).
 * pos=abs keeps original positions. */
#include "kv_policy.h"

#include <math.h>

static void score_pos(const struct kv_policy *p, int il, int ih, const int32_t *pos, int32_t n, float *out) {
    (void)il, (void)ih;
    int32_t sinks = p->spec.sinks;
    for (int32_t j = 0; j < n; j++) out[j] = pos[j] < sinks ? INFINITY : (float)pos[j];
}

static void score(const struct kv_score_args *a, int ih, float *out) {
    const struct kv_head_store *h = kv_seq_head(a->s, a->il, ih);
    score_pos(a->p, a->il, ih, h->pos, h->n, out);
}

const struct kv_scorer_i kv_scorer_streaming = {
    .api_version = KV_POLICY_API_VERSION, .method = KV_STREAMING, .needs = 0, .score = score,
    .protect = NULL, .score_pos = score_pos,
};
