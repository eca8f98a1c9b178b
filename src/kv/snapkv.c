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
    bool mx = p->spec.pool == KV_POOL_MAX;
    for (int32_t j = 0; j < n; j++) tmp[j] = row[j];
    /* entry j pools tmp[j - r .. j + r] in that order, zeros outside 0..n-1. Away from the
     * edges, 8 entries at a time in fixed-size arrays (the compiler vectorises them); each entry
     * still takes its values in the same order, so the results are the same bits as one entry at
     * a time (the planner's choices, and the CPU and GPU paths, do not move) */
    int32_t j = 0;
    for (; j < n; j++) {
        if (j >= r && j + 8 + r <= n) {
            float acc[8];
            for (int e = 0; e < 8; e++) acc[e] = mx ? -INFINITY : 0.0f;
            for (int t = -r; t <= r; t++) {
                const float *v = tmp + j + t;
                if (mx)
                    for (int e = 0; e < 8; e++) acc[e] = v[e] > acc[e] ? v[e] : acc[e];
                else
                    for (int e = 0; e < 8; e++) acc[e] += v[e];
            }
            for (int e = 0; e < 8; e++) row[j + e] = mx ? acc[e] : acc[e] / (float)k;
            j += 7;
            continue;
        }
        float acc = mx ? -INFINITY : 0.0f;
        for (int32_t t = j - r; t <= j + r; t++) {
            float v = (t >= 0 && t < n) ? tmp[t] : 0.0f; /* zero padding */
            acc = mx ? (v > acc ? v : acc) : acc + v;
        }
        row[j] = mx ? acc : acc / (float)k;
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
