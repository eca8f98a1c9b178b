/* agate.c — Attention-Gate scorer (Zeng et al., "In-context KV-Cache Eviction for LLMs via
 * Attention-Gate", arXiv 2410.12876). forward() runs the layer's gate (learned.c) on every new
 * token and stores its keep score in the entry's statistic slot (kv_seq.acc_learned); the views
 * hide an entry scoring below tau from queries `window` or more positions later, and the planner
 * (kv_policy.c) evicts it once no later query can see it. Under a budget the kept entries
 * compete by the same score, the newest `window` always kept. */
#include "kv_policy.h"

#include <string.h>

static void score(const struct kv_score_args *a, int ih, float *out) {
    const struct kv_head_store *h = kv_seq_head(a->s, a->il, ih);
    KVS_ASSERT(h->acc && a->s->acc_learned && a->s->gate_w);
    memcpy(out, h->acc, sizeof(float) * (size_t)h->n);
}

const struct kv_scorer_i kv_scorer_agate = {
    .api_version = KV_POLICY_API_VERSION, .method = KV_AGATE, .needs = KV_NEED_LEARNED,
    .score = score, .protect = NULL,
};
