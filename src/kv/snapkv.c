/* snapkv.c — SnapKV scorer (Li et al., "SnapKV: LLM Knows What You are Looking for Before
 * Generation", arXiv 2404.14469): the attention that the last `window` queries pay to each entry
 * (causally masked inside the window), summed over those queries, aggregated over the query
 * heads of the KV head (mean, or max with agg=max), then pooled over `kernel` neighbouring
 * entries (max pooling as in the shipped LongBench configs, or avg with zero padding counted,
 * PyTorch's default). The window's own entries are always kept. Rows are recomputed at plan
 * time from the saved window queries. Deviation: with when=chunk (the default here) the window
 * is the last `window` queries seen so far, at every chunk, not only at the end of the prompt. */
#include "kv_policy.h"

#include <math.h>

void kv_snapkv_pool(const struct kv_policy *p, float *row, int32_t n, float *tmp) {
    int k = p->spec.kernel, r = k / 2;
    if (p->spec.pool == KV_POOL_NONE || k <= 1) return;
    for (int32_t j = 0; j < n; j++) tmp[j] = row[j];
    for (int32_t j = 0; j < n; j++) {
        float acc = p->spec.pool == KV_POOL_MAX ? -INFINITY : 0.0f;
        for (int32_t t = j - r; t <= j + r; t++) {
            float v = (t >= 0 && t < n) ? tmp[t] : 0.0f; /* zero padding */
            if (p->spec.pool == KV_POOL_MAX) acc = v > acc ? v : acc;
            else acc += v;
        }
        row[j] = p->spec.pool == KV_POOL_MAX ? acc : acc / (float)k;
    }
}

static void score(const struct kv_score_args *a, int ih, float *out) {
    const struct kv_head_store *h = kv_seq_head(a->s, a->il, ih);
    kv_score_query_attention(a, ih, false, out);
    /* pool in place through a copy in scratch (row 0 is free again after the attention) */
    kv_snapkv_pool(a->p, out, h->n, a->scratch);
}

static int32_t protect(const struct kv_policy *p, int32_t budget) {
    return p->spec.obs_window < budget ? p->spec.obs_window : budget;
}

const struct kv_scorer_i kv_scorer_snapkv = {
    .api_version = KV_POLICY_API_VERSION, .method = KV_SNAPKV, .needs = KV_NEED_QUERIES | KV_PAR_HEADS,
    .score = score, .protect = protect,
};
