/* pack.c — the decisions behind packed storage, made once per (sequence, layer, KV head) before
 * its first entry is packed (the store then applies them to every later pack):
 *  - ThinK (Xu et al., arXiv 2407.21018; shared/methods/think.md): channel c of a KV head scores
 *    mean_t q_t[c]^2 * mean_j k_j[c]^2 over the last 32 saved queries of the head's query group
 *    (GQA: the query energies are averaged over the group, as kvpress does) and the entries
 *    held; the kd best channels are kept, in ascending order. The ranking equals the paper's
 *    |Q[:, c]| |K[:, c]| criterion.
 *  - MiKV's key transform (Yang et al., arXiv 2402.18096; shared/methods/kivi-mikv.md):
 *    demoted keys are stored per token as (k - mu) * b, with mu_c the mean of channel c over
 *    the entries held at the first demotion, and attention adds q · mu back once per query
 *    (kv_attn.c), so q · k is unchanged before rounding. [D] The centring is ours: Qwen2.5's
 *    K projection has a bias, so a few post-RoPE channels carry a large, nearly constant
 *    offset; one (scale, min) per token then spends its whole range on those channels and
 *    4-bit keys lose the others (perplexity 8.0 -> 151 on 1024 tokens of prose). Centred,
 *    those channels hold only their variation. b is the paper's outlier balancer
 *    b_c = sqrt(max |q_c| / max |k_c - mu_c|) over the same queries (clamped to [1e-3, 1e3],
 *    1 where either maximum is 0), queries divided by b; off by default (balance=0, b = 1):
 *    measured on the centred keys it halves Qwen2.5's 2-bit KL but triples SmolLM2's.
 *    [D] computed once, from the saved window, not from every prefill query.
 */
#include "kv_policy.h"
#include "quant.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { THINK_WINDOW = 32 };

static _Thread_local const float *g_ch_score;
static int cmp_ch(const void *a, const void *b) {
    uint8_t i = *(const uint8_t *)a, j = *(const uint8_t *)b;
    float x = g_ch_score[i], y = g_ch_score[j];
    if (x != y) return x > y ? -1 : 1;
    return (i > j) - (i < j);
}
static int cmp_u8(const void *a, const void *b) {
    return (int)*(const uint8_t *)a - (int)*(const uint8_t *)b;
}

void kv_pack_prepare(struct kv_seq *s, int il) {
    const struct kv_pack_cfg *pc = &s->pack;
    const struct kv_cache *c = s->owner;
    int hd = c->head_dim, g = c->n_head / c->n_head_kv;
    bool need_ch = pc->think, need_bal = pc->mikv;
    if (!need_ch && !need_bal) return;
    int nq = c->qwin ? s->q_n[il] : 0, q0 = nq > THINK_WINDOW ? nq - THINK_WINDOW : 0;
    for (int ih = 0; ih < c->n_head_kv; ih++) {
        struct kv_head_store *h = kv_seq_head(s, il, ih);
        if ((!need_ch || h->ch) && (!need_bal || h->bal)) continue;
        if (h->nc) continue; /* decided already (a copy of a packed head) */
        float qe[512] = {0}, ke[512] = {0}, qm[512] = {0}, ks[512] = {0};
        for (int qi = q0; qi < nq; qi++) {
            int slot = (s->q_head[il] - nq + qi + c->qwin) % c->qwin;
            const float *Q = s->q + ((size_t)il * c->qwin + slot) * c->n_head * hd + (size_t)ih * g * hd;
            for (int r = 0; r < g; r++)
                for (int d = 0; d < hd; d++) {
                    float x = Q[(size_t)r * hd + d];
                    qe[d] += x * x;
                    qm[d] = fabsf(x) > qm[d] ? fabsf(x) : qm[d];
                }
        }
        for (int32_t j = 0; j < h->n - h->nc; j++)
            for (int d = 0; d < hd; d++) {
                float x = quant_f16_to_f32(h->k[(size_t)j * hd + d]);
                ke[d] += x * x;
                ks[d] += x;
            }
        if (need_ch && !h->ch) {
            float sc[512];
            uint8_t idx[512];
            for (int d = 0; d < hd; d++) sc[d] = qe[d] * ke[d], idx[d] = (uint8_t)d;
            g_ch_score = sc;
            qsort(idx, (size_t)hd, 1, cmp_ch);
            qsort(idx, (size_t)pc->f.kd, 1, cmp_u8);
            kv_seq_set_channels(s, il, ih, idx);
        }
        if (need_bal && !h->bal) {
            /* centres: the mean key of the entries held; the balancer (optional) on the
             * centred keys */
            float b[512], mu[512], cm[512] = {0};
            int32_t nh = h->n - h->nc;
            for (int d = 0; d < hd; d++) mu[d] = nh > 0 ? ks[d] / (float)nh : 0.0f;
            for (int32_t j = 0; pc->balance && j < nh; j++) /* centred maxima: balancer only */
                for (int d = 0; d < hd; d++) {
                    float x = fabsf(quant_f16_to_f32(h->k[(size_t)j * hd + d]) - mu[d]);
                    cm[d] = x > cm[d] ? x : cm[d];
                }
            for (int d = 0; d < hd; d++) {
                float x = (pc->balance && qm[d] > 0 && cm[d] > 0) ? sqrtf(qm[d] / cm[d]) : 1.0f;
                b[d] = x < 1e-3f ? 1e-3f : x > 1e3f ? 1e3f : x;
            }
            kv_seq_set_balance(s, il, ih, b, mu);
        }
    }
}
