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

static void score(const struct kv_score_args *a, int ih, float *out) {
    const struct kv_head_store *h = kv_seq_head(a->s, a->il, ih);
    int32_t sinks = a->p->spec.sinks;
    for (int32_t j = 0; j < h->n; j++)
        out[j] = h->pos[j] < sinks ? INFINITY : (float)h->pos[j];
}

const struct kv_scorer_i kv_scorer_streaming = {
    .api_version = KV_POLICY_API_VERSION, .method = KV_STREAMING, .needs = 0, .score = score,
    .protect = NULL,
};
