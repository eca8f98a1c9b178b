/* random.c — uniform random scores (the kvpress RandomPress baseline). Seeded from the spec and
 * the entry's position, layer and head, so a run is reproducible and independent of chunking. */
#include "kv_policy.h"

static uint64_t mix(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void score_pos(const struct kv_policy *p, int il, int ih, const int32_t *pos, int32_t n, float *out) {
    uint64_t base = mix(p->spec.seed ^ ((uint64_t)il << 40) ^ ((uint64_t)ih << 32));
    for (int32_t j = 0; j < n; j++) out[j] = (float)(mix(base ^ (uint64_t)(uint32_t)pos[j]) >> 40) / (float)(1 << 24);
}

static void score(const struct kv_score_args *a, int ih, float *out) {
    const struct kv_head_store *h = kv_seq_head(a->s, a->il, ih);
    score_pos(a->p, a->il, ih, h->pos, h->n, out);
}

const struct kv_scorer_i kv_scorer_random = {
    .api_version = KV_POLICY_API_VERSION, .method = KV_RANDOM, .needs = 0, .score = score,
    .protect = NULL, .score_pos = score_pos,
};
