/* kv_score.c — a helper the scorers share: attention probabilities of a layer's saved queries
 * against one KV head's entries, recomputed at plan time (the attention kernel keeps no
 * probabilities). SnapKV, TOVA and the merging scorers (merge.c) call it; it calls only the
 * store (kv_cache), the view readers (kv_attn) and the ops, never the planner in kv_policy.c,
 * so dependencies run one way: kv_policy.c -> scorers and merge.c -> kv_score.c -> store.
 * Does not: allocate (scratch comes from the policy) or decide anything.
 */
#include "kv_policy.h"
#include "ops.h"
#include "kv_attn.h"

#include <math.h>

void kv_score_query_attention(const struct kv_score_args *a, int ih, bool last_only, float *out) {
    const struct kv_policy *p = a->p;
    const struct kv_seq *s = a->s;
    const struct kv_cache *c = s->owner;
    const struct kv_head_store *h = kv_seq_head(s, a->il, ih);
    int g = p->n_head / p->n_head_kv, hd = p->head_dim;
    int32_t n = h->n;
    float scale = 1.0f / sqrtf((float)hd);
    float *S = a->scratch;                            /* (g, cap_max) probabilities */
    float *agg = a->scratch + (size_t)g * p->cap_max; /* (cap_max) this query's group score */
    for (int32_t j = 0; j < n; j++) out[j] = 0.0f;
    int nq = s->q_n[a->il];
    /* the newest `window` queries: a store that keeps more (a context with keep_stats) then
     * scores exactly as one made for this spec */
    int want = p->qwin;
    int q0 = last_only ? nq - 1 : nq > want ? nq - want : 0;
    if (q0 < 0) q0 = 0; /* no saved query (a copy from a context that kept none): all zero */
    struct kv_view view;
    if (h->nc) kv_seq_view(s, a->il, &view);
    for (int qi = q0; qi < nq && n > 0; qi++) {
        int slot = (s->q_head[a->il] - nq + qi + c->qwin) % c->qwin; /* qi-th oldest */
        int32_t qpos = s->q_pos[a->il * c->qwin + slot];
        const float *Q = s->q + ((size_t)a->il * c->qwin + slot) * p->n_head * hd + (size_t)ih * g * hd;
        /* causal: the query sees entries at positions <= its own; packed entries may be newer
         * than an old saved query, so they are masked one by one */
        int32_t nv = h->nc, vis = 0;
        while (nv < n && h->pos[nv] <= qpos) nv++;
        for (int32_t j = 0; j < nv; j++) vis += h->pos[j] <= qpos;
        if (vis == 0) continue;
        float m[64], l[64];
        if (h->nc) {
            kv_attn_scores(&view.h[ih], hd, Q, g, 0, nv, scale, S, p->cap_max, a->ascratch);
            for (int32_t j = 0; j < h->nc; j++)
                if (h->pos[j] > qpos)
                    for (int gi = 0; gi < g; gi++) S[(size_t)gi * p->cap_max + j] = -INFINITY;
        } else {
            ops_attn_scores(Q, g, h->k, nv, hd, scale, S, p->cap_max);
        }
        ops_softmax_partial(S, g, nv, p->cap_max, m, l);
        for (int32_t j = 0; j < nv; j++) agg[j] = 0.0f;
        for (int gi = 0; gi < g; gi++) {
            const float *row = S + (size_t)gi * p->cap_max;
            float inv = 1.0f / l[gi];
            for (int32_t j = 0; j < nv; j++) {
                float pr = row[j] * inv;
                if (p->spec.agg == KV_AGG_MAX) agg[j] = pr > agg[j] ? pr : agg[j];
                else agg[j] += pr / (float)g;
            }
        }
        for (int32_t j = 0; j < nv; j++) out[j] += agg[j];
    }
}
