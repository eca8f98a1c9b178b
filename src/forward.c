/* forward.c — the transformer forward pass over a batch of tokens (a prefill chunk of one
 * sequence, or one decode token for each of several sequences).
 *
 *   x = embed(tokens)                                   (T, n_embd)
 *   per layer: xn = rmsnorm(x) * attn_norm
 *              q, k, v = xn Wq^T (+bq), xn Wk^T (+bk), xn Wv^T (+bv)
 *              rope(q, k) at each token's absolute position
 *              append k, v to the token's sequence cache (fp16, through the store)
 *              o = attention(q, view of the cache), causal by position
 *              x += o Wo^T
 *              xn = rmsnorm(x) * ffn_norm; x += (silu(xn Wg^T) * (xn Wu^T)) Wd^T
 *   logits = rmsnorm(x[rows]) * output_norm  Wout^T
 *
 * Weight matmuls use quant_gemm on activations quantized once per distinct vec_dot_type;
 * every parallel step is one threadpool job split by rows (matmuls) or by (token, KV head,
 * key split) units (attention). No allocation happens here: all buffers are the context's.
 */
#include "engine.h"
#include "ops.h"
#include "quant.h"
#include "kv/learned.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* ---- activation quantization ---------------------------------------------------------- */

static int act_slot(int vdt) {
    switch (vdt) {
    case QT_Q8_0: return 1;
    case QT_Q8_1: return 2;
    case QT_Q8_K: return 3;
    default: return 0; /* F32: used in place */
    }
}

struct quant_job { const float *x; int64_t ldx, n_cols; int T, vdt; uint8_t *dst; size_t rb; };

static void quant_worker(void *arg, int ith, int nth) {
    struct quant_job *j = arg;
    int lo, hi;
    threadpool_split(j->T, ith, nth, &lo, &hi);
    for (int t = lo; t < hi; t++)
        quant_quantize_row(j->vdt, j->x + (size_t)t * j->ldx, j->dst + (size_t)t * j->rb, j->n_cols);
}

/* Activation rows x (T, ldx) prepared for a weight of type wtype: returns the row pointer base
 * and row stride in bytes. Quantizes into the slot of wtype's vec_dot_type unless `fresh` says
 * that slot already holds this x. With act_f32, x is used in place for every weight type
 * (f32: matmul takes quant_gemm_f32). */
struct act { const void *p; size_t rb; bool f32; };

static struct act prep_act(struct kvs_context *c, const float *x, int64_t ldx, int T,
                           int64_t n_cols, int wtype, unsigned *fresh_mask) {
    if (c->p.act_f32) return (struct act){x, (size_t)ldx * sizeof(float), true};
    int vdt = quant_get_traits(wtype)->vec_dot_type;
    int slot = act_slot(vdt);
    if (slot == 0) return (struct act){x, (size_t)ldx * sizeof(float), false};
    size_t rb = quant_row_bytes(vdt, n_cols);
    if (!(*fresh_mask & (1u << slot))) {
        struct quant_job j = {x, ldx, n_cols, T, vdt, c->act[slot], rb};
        if (T >= 8) threadpool_run(c->tp, quant_worker, &j);
        else quant_worker(&j, 0, 1);
        *fresh_mask |= 1u << slot;
    }
    return (struct act){c->act[slot], rb, false};
}

/* ---- matmul: up to three weights sharing one input, split by rows ---------------------- */

struct mm { const struct weight *w; struct act x; float *y; int64_t ldy; };
struct mm_job { struct mm mm[3]; int n_mm, T; float *wrow; size_t wrow_n; };

enum { MM_ROW_ALIGN = 16 };

static void mm_worker(void *arg, int ith, int nth) {
    struct mm_job *j = arg;
    int64_t total = 0;
    for (int i = 0; i < j->n_mm; i++) total += j->mm[i].w->n_rows;
    int nb = (int)((total + MM_ROW_ALIGN - 1) / MM_ROW_ALIGN), blo, bhi;
    threadpool_split(nb, ith, nth, &blo, &bhi);
    int64_t lo = (int64_t)blo * MM_ROW_ALIGN, hi = (int64_t)bhi * MM_ROW_ALIGN;
    if (hi > total) hi = total;
    int64_t base = 0;
    for (int i = 0; i < j->n_mm && lo < hi; i++) {
        const struct mm *m = &j->mm[i];
        int64_t r0 = lo - base, r1 = hi - base;
        if (r0 < 0) r0 = 0;
        if (r1 > m->w->n_rows) r1 = m->w->n_rows;
        if (r0 < r1 && m->x.f32)
            quant_gemm_f32(m->w->type, m->w->data, m->w->row_bytes, m->w->n_cols, (int)r0,
                           (int)r1, m->x.p, (int64_t)(m->x.rb / sizeof(float)), j->T, m->y,
                           m->ldy, j->wrow + (size_t)ith * j->wrow_n);
        else if (r0 < r1)
            quant_gemm_packed(m->w->type, m->w->data, m->w->packed, m->w->row_bytes,
                              m->w->n_cols, (int)r0, (int)r1, m->x.p, m->x.rb, j->T, m->y, m->ldy);
        base += m->w->n_rows;
    }
}

static void matmul(struct kvs_context *c, struct mm_job *j) {
    j->wrow = c->wrow, j->wrow_n = c->wrow_n;
    if (c->tp && threadpool_n_threads(c->tp) > 1) threadpool_run(c->tp, mm_worker, j);
    else mm_worker(j, 0, 1);
}

/* ---- attention ------------------------------------------------------------------------- */

/* One unit of attention work (kinds below); the list is built per forward from each
 * sequence's own tokens and cache alone, so a sequence's result never depends on its batch. */

struct att_job {
    struct kvs_context *c;
    int T, n_views, n_units;
    const struct att_unit_desc *units;
    const int *tsplit;     /* key splits of each token (1 unless a lone decode token) */
    const int *poff;       /* each token's first partial in att_part: poff[t] + h * tsplit[t] + s */
    const int32_t *pos;
    struct kv_view *views; /* one per distinct sequence in the batch; views[vi[t]] */
    const int *vi;
    kvs_sequence *const *seq; /* seq[t]: for attention recording */
    _Atomic int next;
};

/* Number of keys token t may see in head h: entries with position <= its own. */
static int n_visible(const struct kv_view_head *h, int32_t pos) {
    int lo = h->nc, hi = h->n; /* first index with pos > p; packed entries are all visible */
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (h->pos[mid] <= pos) lo = mid + 1;
        else hi = mid;
    }
    return h->nsh + lo; /* shared prefix entries are all visible */
}

/* Attention-Gate's visibility rule (kv_view.h) on one row of scores over keys [k0, k0 + n): an
 * own hot entry scoring below tau is hidden from a query at position p once p is `win` or more
 * positions past it (flagged entries are evicted as soon as no later query sees them, so only
 * the last few of a head are ever hidden; the scan is cheap beside the dot products). */
static void gate_hide(const struct kv_view *v, const struct kv_view_head *vh, int32_t p, float *row,
                      int k0, int n) {
    int lo = k0 > vh->nsh ? k0 : vh->nsh;
    for (int k = k0 + n - 1; k >= lo; k--) {
        int j = k - vh->nsh;
        if (j < vh->nc) break;
        int32_t d = p - vh->pos[j];
        if (d >= v->gate_win && vh->gate[j] < v->gate_tau) row[k - k0] = -INFINITY;
    }
}

/* Attention of token t's query heads of KV head h over key split s of its visible entries;
 * writes the unnormalised partial (o, m, l) for att_combine. With acc, also adds each entry's
 * probability (mean over the group) to its acc slot; then n_split is 1 and probabilities are
 * exact (p / l). */
static void att_unit(struct att_job *j, int t, int h, int s, float *S, float *X) {
    struct kvs_context *c = j->c;
    const struct hparams *hp = &c->m->hp;
    int hd = hp->head_dim, n_kv = hp->n_head_kv, g = hp->n_head / n_kv;
    float scale = 1.0f / sqrtf((float)hd);
    float m[64], l[64];
    const struct kv_view_head *vh = &j->views[j->vi[t]].h[h];
    int nvis = n_visible(vh, j->pos[t]), ns = j->tsplit[t];
    int k0 = (int)((int64_t)nvis * s / ns), k1 = (int)((int64_t)nvis * (s + 1) / ns);
    const float *Q = c->q + (size_t)t * hp->n_head * hd + (size_t)h * g * hd;
    int n = k1 - k0;
    int u = j->poff[t] + h * ns + s;
    (void)n_kv;
    float *part = c->att_part + (size_t)u * g * (hd + 2);
    if (n > 0) {
        kv_attn_scores(vh, hd, Q, g, k0, k1, scale, S, c->n_ctx, X);
        if (vh->gate)
            for (int qi = 0; qi < g; qi++) gate_hide(&j->views[j->vi[t]], vh, j->pos[t], S + (size_t)qi * c->n_ctx, k0, n);
        int i0 = vh->nsh > k0 ? vh->nsh - k0 : 0; /* first own entry of the range */
        if (vh->w)
            for (int qi = 0; qi < g; qi++)
                for (int i = i0; i < n; i++) S[qi * c->n_ctx + i] += logf(vh->w[k0 + i - vh->nsh]);
        ops_softmax_partial(S, g, n, c->n_ctx, m, l);
        kv_attn_accum(vh, hd, S, g, k0, k1, c->n_ctx, part, X);
        if (vh->acc)
            for (int qi = 0; qi < g; qi++) {
                float f = 1.0f / (l[qi] * (float)g);
                for (int i = i0; i < n; i++) vh->acc[k0 + i - vh->nsh] += S[qi * c->n_ctx + i] * f;
            }
        struct att_rec *rec = j->seq[t]->rec;
        if (rec && vh->acc && j->pos[t] >= rec->from) {
            /* the share of this query's attention in each recorded range of positions, averaged
             * over the query heads and layers (shared prefix entries: the first range) */
            float *out = rec->mass + ((size_t)h * rec->cap + (size_t)(j->pos[t] - rec->from)) * (rec->n_bounds + 1);
            float f = 1.0f / ((float)g * (float)hp->n_layer);
            for (int qi = 0; qi < g; qi++) {
                float fq = f / l[qi];
                int b = 0;
                for (int i = 0; i < n; i++) {
                    int32_t ki = k0 + i;
                    if (ki >= vh->nsh) {
                        int32_t p = vh->pos[ki - vh->nsh];
                        while (b < rec->n_bounds && p >= rec->bounds[b]) b++;
                    }
                    out[b] += S[qi * c->n_ctx + i] * fq;
                }
            }
        }
    } else {
        memset(part, 0, sizeof(float) * (size_t)g * hd);
        for (int qi = 0; qi < g; qi++) m[qi] = -INFINITY, l[qi] = 0.0f;
    }
    float *ml = part + (size_t)g * hd;
    for (int qi = 0; qi < g; qi++) ml[2 * qi] = m[qi], ml[2 * qi + 1] = l[qi];
}

/* Prefill: the query heads of up to ATT_TB consecutive tokens of one sequence share each pass
 * over KV head h, so every key is converted and streamed once per block instead of once per
 * token. Rows beyond a token's causal limit get probability 0, which adds exactly nothing, and
 * each score uses the same reduction whatever the block: results equal att_unit's bit for bit. */
static void att_block(struct att_job *j, int t0, int nt, int h, float *S, float *Qb, float *Ob,
                      float *X) {
    struct kvs_context *c = j->c;
    const struct hparams *hp = &c->m->hp;
    int hd = hp->head_dim, n_kv = hp->n_head_kv, g = hp->n_head / n_kv, R = nt * g;
    float scale = 1.0f / sqrtf((float)hd);
    const struct kv_view_head *vh = &j->views[j->vi[t0]].h[h];
    int nvis[ATT_TB], n_max = 0;
    for (int i = 0; i < nt; i++) {
        nvis[i] = n_visible(vh, j->pos[t0 + i]);
        n_max = nvis[i] > n_max ? nvis[i] : n_max;
        memcpy(Qb + (size_t)i * g * hd, c->q + (size_t)(t0 + i) * hp->n_head * hd + (size_t)h * g * hd,
               sizeof(float) * (size_t)g * hd);
    }
    float m[ATT_TB * 64], l[ATT_TB * 64];
    if (n_max > 0) kv_attn_scores(vh, hd, Qb, R, 0, n_max, scale, S, c->n_ctx, X);
    for (int r = 0; r < R; r++) {
        int nv = nvis[r / g];
        float *row = S + (size_t)r * c->n_ctx;
        if (vh->gate && nv > 0) gate_hide(&j->views[j->vi[t0]], vh, j->pos[t0 + r / g], row, 0, nv);
        if (nv > 0) ops_softmax_partial(row, 1, nv, c->n_ctx, &m[r], &l[r]);
        else m[r] = -INFINITY, l[r] = 0.0f;
        for (int k = nv; k < n_max; k++) row[k] = 0.0f;
    }
    if (n_max > 0) kv_attn_accum(vh, hd, S, R, 0, n_max, c->n_ctx, Ob, X);
    for (int i = 0; i < nt; i++) {
        int u = j->poff[t0 + i] + h;
        float *part = c->att_part + (size_t)u * g * (hd + 2), *ml = part + (size_t)g * hd;
        if (nvis[i] > 0) memcpy(part, Ob + (size_t)i * g * hd, sizeof(float) * (size_t)g * hd);
        else memset(part, 0, sizeof(float) * (size_t)g * hd);
        for (int qi = 0; qi < g; qi++) ml[2 * qi] = m[i * g + qi], ml[2 * qi + 1] = l[i * g + qi];
    }
}

static void att_worker(void *arg, int ith, int nth) {
    (void)nth;
    struct att_job *j = arg;
    struct kvs_context *c = j->c;
    int n_kv = c->m->hp.n_head_kv, g = c->m->hp.n_head / n_kv;
    float *S = c->att_s + (size_t)ith * ATT_TB * g * c->n_ctx;
    float *Qb = c->att_qo + (size_t)ith * 2 * ATT_TB * g * c->m->hp.head_dim;
    float *Ob = Qb + (size_t)ATT_TB * g * c->m->hp.head_dim;
    float *X = c->att_x + (size_t)ith * kv_attn_scratch_floats(ATT_TB * g, c->m->hp.head_dim);
    for (;;) {
        int u = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (u >= j->n_units) break;
        const struct att_unit_desc *d = &j->units[u];
        if (d->kind == AU_ACC) { /* one unit owns a (sequence, KV head): no two threads add to one slot */
            for (int t = 0; t < j->T; t++)
                if (j->vi[t] == d->a) att_unit(j, t, d->h, 0, S, X);
        } else if (d->kind == AU_BLOCK) {
            att_block(j, d->a, d->b, d->h, S, Qb, Ob, X);
        } else {
            att_unit(j, d->a, d->h, d->b, S, X);
        }
    }
}

/* Merge the key-split partials into xn (T, n_head*hd): o = sum_s e^{m_s-M} o_s / sum_s e^{m_s-M} l_s */
static void att_combine(struct kvs_context *c, int T, const int *tsplit, const int *poff, float *out) {
    const struct hparams *hp = &c->m->hp;
    int hd = hp->head_dim, n_kv = hp->n_head_kv, g = hp->n_head / n_kv;
    for (int t = 0; t < T; t++)
        for (int h = 0; h < n_kv; h++)
            for (int qi = 0; qi < g; qi++) {
                int n_split = tsplit[t], u0 = poff[t] + h * n_split;
                float *o = out + (size_t)t * hp->n_head * hd + (size_t)(h * g + qi) * hd;
                float M = -INFINITY;
                for (int s = 0; s < n_split; s++) {
                    const float *ml = c->att_part + ((size_t)(u0 + s) * g) * (hd + 2) + (size_t)g * hd;
                    if (ml[2 * qi] > M) M = ml[2 * qi];
                }
                float L = 0.0f;
                for (int d = 0; d < hd; d++) o[d] = 0.0f;
                for (int s = 0; s < n_split; s++) {
                    const float *part = c->att_part + ((size_t)(u0 + s) * g) * (hd + 2);
                    const float *ml = part + (size_t)g * hd;
                    if (ml[2 * qi + 1] == 0.0f) continue;
                    float f = expf(ml[2 * qi] - M);
                    L += f * ml[2 * qi + 1];
                    for (int d = 0; d < hd; d++) o[d] += f * part[(size_t)qi * hd + d];
                }
                float inv = L > 0.0f ? 1.0f / L : 0.0f;
                for (int d = 0; d < hd; d++) o[d] *= inv;
            }
}

/* ---- compression hook ------------------------------------------------------------------ */

/* After layer il has attended for this batch, let the policy plan that layer of sequence s and
 * the store apply it. when=chunk compresses after every prefill chunk (so peak memory is the
 * budget plus one chunk of one layer); when=prefill only after the last chunk of a prompt;
 * decoding compresses once a head is `every` entries over budget. */
static void compress_layer(struct kvs_context *c, kvs_sequence *s, int il, enum fwd_phase phase,
                           const int32_t *pos, const int *vi, int T, int v) {
    if (phase == FWD_HOLD || phase == FWD_RECOMPUTE) return; /* a held chunk stays exact */
    const struct kv_profile *pr = s->prof;
    const struct kv_spec *sp = &pr->spec;
    /* Attention-Gate evicts in context: after every chunk and every step */
    bool gate = sp->method == KV_AGATE && s->kv->gate_w;
    bool prompt = phase == FWD_PREFILL_LAST || (phase == FWD_PREFILL && ((sp->when & KV_WHEN_CHUNK) || gate));
    if (s->kv->pack.on && (prompt || phase == FWD_DECODE)) kv_pack_prepare(s->kv, il);
    int32_t slack = -1;
    /* a MiKV policy's demotions need its storage: a sequence given another one (by
     * kvs_seq_compress) is not planned by this policy */
    if (!pr->policy || (sp->mikv_low && !s->kv->pack.mikv)) slack = -1;
    else if (phase == FWD_DECODE) slack = sp->every > 0 ? sp->every : gate ? INT32_MAX / 2 : -1;
    else if (prompt) slack = 0;
    if (slack >= 0) {
        int64_t n_seen = 0;
        for (int t = 0; t < T; t++)
            if (vi[t] == v && pos[t] + 1 > n_seen) n_seen = pos[t] + 1;
        int32_t before = kv_seq_head(s->kv, il, 0)->n;
        double t0 = kvs_time_ms();
        bool planned = kv_policy_plan_layer(pr->policy, s->kv, il, n_seen, slack, phase == FWD_DECODE, &c->plan);
        if (planned) {
            kv_seq_apply_plan(s->kv, il, &c->plan, sp->reindex);
            /* the store's bound: no head above its budget (AdaKV: the layer's) */
            KVS_ASSERT(kv_policy_check_budget(pr->policy, s->kv, il, n_seen));
            /* in-cache positions: every layer evicts the same entries (streaming), so the shift
             * is the same for all; it takes effect from the next forward() */
            if (sp->reindex && il == c->m->hp.n_layer - 1)
                s->pos_shift += before - kv_seq_head(s->kv, il, 0)->n;
            c->plan_layers++;
        }
        c->plan_s += (kvs_time_ms() - t0) / 1e3;
    }
    if (s->kv->pack.on && (prompt || phase == FWD_DECODE)) {
        enum kvs_status st = kv_seq_pack_layer(s->kv, il, prompt);
        KVS_ASSERT(st == KVS_OK);
    }
}

/* ---- the pass -------------------------------------------------------------------------- */

struct norm_job { const float *x; float *out; const float *w; int n, T; float eps; int64_t ld; };
static void norm_worker(void *arg, int ith, int nth) {
    struct norm_job *j = arg;
    int lo, hi;
    threadpool_split(j->T, ith, nth, &lo, &hi);
    for (int t = lo; t < hi; t++) ops_rmsnorm(j->out + (size_t)t * j->ld, j->x + (size_t)t * j->n, j->w, j->n, j->eps);
}

struct swiglu_job { float *g; const float *u; int n, T; };
static void swiglu_worker(void *arg, int ith, int nth) {
    struct swiglu_job *j = arg;
    int lo, hi;
    threadpool_split(j->T, ith, nth, &lo, &hi);
    for (int t = lo; t < hi; t++) ops_swiglu(j->g + (size_t)t * j->n, j->u + (size_t)t * j->n, j->n);
}

static void run_rows(struct kvs_context *c, threadpool_fn fn, void *arg, int T) {
    if (T >= 8) threadpool_run(c->tp, fn, arg);
    else fn(arg, 0, 1);
}

/* Locret: the layer's retaining head on rows of c->lrn_x, scores into c->lrn_s */
struct lrn_job { struct kvs_context *c; int il, n; };
static void lrn_worker(void *arg, int ith, int nth) {
    struct lrn_job *j = arg;
    const struct kv_learned *l = j->c->learned;
    int lo, hi;
    threadpool_split(j->n, ith, nth, &lo, &hi);
    if (hi > lo)
        kv_learned_score(l, j->il, j->c->lrn_x + (size_t)lo * l->d_in, l->d_in, hi - lo,
                         j->c->lrn_s + (size_t)lo * l->n_head_kv, j->c->lrn_h + (size_t)lo * l->hidden);
}

/* ---- Attention-Gate ----------------------------------------------------------------------- */

/* units: runs of up to 8 tokens of one gated sequence in consecutive rows of the batch */
struct gate_job { struct kvs_context *c; struct kv_seq *ks; int il, n_units; const int *tok, *nrows, *u0; _Atomic int next; };
static void gate_worker(void *arg, int ith, int nth) {
    (void)nth;
    struct gate_job *j = arg;
    struct kvs_context *c = j->c;
    const struct kv_learned *l = c->agate;
    int W = l->gw;
    float *S = c->ag_sc + (size_t)ith * c->ag_sc_n, *O = S + (size_t)8 * c->ag_cap;
    uint16_t *const *pl = kv_seq_gate_planes(j->ks, j->il);
    for (;;) {
        int ui = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (ui >= j->n_units) break;
        int u = j->u0[ui], nt = j->u0[ui + 1] - u, t = j->tok[u];
        kv_agate_score(l, j->il, c->ag_qkv + (size_t)t * 3 * W, 3 * W, nt, (const uint16_t *const *)pl,
                       (const uint16_t *const *)(pl + l->hidden), j->nrows[u + nt - 1], c->ag_s + (size_t)t * l->n_head_kv, S, O);
    }
}

/* The gate of layer il (its input is c->xn): every gated sequence's new tokens append their k',
 * v' to the gate's cache and get their keep scores in c->ag_s (position 0, the sink, scores 1). */
static enum kvs_status gate_layer(struct kvs_context *c, int il, const int32_t *pos, const uint8_t *phase,
                                  int T, kvs_sequence *const *vseq, int n_views, const int *vi) {
    const struct kv_learned *l = c->agate;
    int W = l->gw, d = c->m->hp.n_embd, nkv = l->n_head_kv;
    kv_agate_project(l, il, c->xn, d, T, c->ag_qkv);
    int tok[KVS_T_MAX], nr[KVS_T_MAX], u0[KVS_T_MAX + 1];
    for (int i = 0; i < n_views; i++) {
        struct kv_seq *ks = vseq[i]->kv;
        if (!ks->gate_w || !ks->acc_learned) continue;
        int m = 0;
        for (int t = 0; t < T; t++) {
            if (vi[t] != i || phase[t] == FWD_RECOMPUTE) continue;
            if (ks->gate_n[il] >= c->ag_cap)
                return kvs_fail(KVS_ERR_CONTEXT_FULL, "agate: the gate keeps every token the sequence "
                                "has seen, and it has seen %d (the context's limit)", ks->gate_n[il]);
            enum kvs_status st = kv_seq_gate_append(ks, il, c->ag_qkv + (size_t)t * 3 * W + W);
            if (st != KVS_OK) return st;
            tok[m] = t, nr[m++] = ks->gate_n[il];
        }
        if (!m) continue;
        int nu = 0; /* the kernel reads a unit's rows t..t+nt-1 of ag_qkv and writes those of ag_s */
        for (int k = 0; k < m; k++)
            if (k == 0 || k - u0[nu - 1] == 8 || tok[k] != tok[k - 1] + 1) u0[nu++] = k;
        u0[nu] = m;
        struct gate_job gj = {.c = c, .ks = ks, .il = il, .n_units = nu, .tok = tok, .nrows = nr, .u0 = u0};
        atomic_init(&gj.next, 0);
        if (nu > 1 && c->tp) threadpool_run(c->tp, gate_worker, &gj);
        else gate_worker(&gj, 0, 1);
        for (int k = 0; k < m; k++)
            if (pos[tok[k]] == 0)
                for (int h = 0; h < nkv; h++) c->ag_s[(size_t)tok[k] * nkv + h] = 1.0f;
    }
    return KVS_OK;
}

/* --device cuda: a policy on the GPU (kv_policy_score_src: SnapKV, TOVA, H2O, StreamingLLM,
 * random, key norm) after a pass in which sequence s took tokens of `phase` and has seen n_seen.
 * When compress_layer() would plan a layer, its scores come from the device (cuda_seq_score_window:
 * the saved queries, each masked to the entries at or before its position; cuda_seq_acc: the
 * attention the entries accumulated; cuda_seq_key_sq: the keys' squares) or from the entries' positions on the host, are finished (SnapKV's pooling, the
 * norm's root) and planned by the CPU policy's code, and the kept entries of every planned layer
 * are gathered on the device in one move. A layer is planned after its attention in both paths,
 * and only its own attention reads it, so planning after the whole pass is the same as the CPU's
 * planning inside it. */
static enum kvs_status gpu_compress(struct kvs_context *c, kvs_sequence *s, enum fwd_phase phase, int64_t n_seen) {
    const struct kv_profile *pr = s->prof;
    const struct kv_spec *sp = &pr->spec;
    if (!pr->policy || phase == FWD_HOLD || phase == FWD_RECOMPUTE) return KVS_OK;
    bool prompt = phase == FWD_PREFILL_LAST || (phase == FWD_PREFILL && (sp->when & KV_WHEN_CHUNK));
    int32_t slack = phase == FWD_DECODE ? (sp->every > 0 ? sp->every : -1) : prompt ? 0 : -1;
    if (slack < 0) return KVS_OK;
    return kvs_gpu_plan(c, s, pr->policy, sp, slack, n_seen);
}

int kvs_gpu_spec_qwin(const struct kv_spec *sp) {
    if (kv_policy_score_src(sp) == KV_SRC_LAST) return 1;
    return (kv_policy_needs(sp) & KV_NEED_QUERIES) ? kv_policy_qwin(sp) : 0;
}

enum kvs_status kvs_gpu_plan(struct kvs_context *c, kvs_sequence *s, struct kv_policy *p, const struct kv_spec *sp,
                             int32_t slack, int64_t n_seen) {
    const struct hparams *hp = &c->m->hp;
    int nl = hp->n_layer, nkv = hp->n_head_kv, lay[1024], n_lay = 0;
    for (int il = 0; il < nl; il++)
        if (kv_policy_over(p, il, n_seen, slack, cuda_seq_layer_entries(c->gpu, s->slot, il))) lay[n_lay++] = il;
    if (!n_lay) return KVS_OK;
    enum kv_score_src src = kv_policy_score_src(sp);
    bool attn = src == KV_SRC_WINDOW || src == KV_SRC_LAST;
    double t0 = kvs_time_ms();
    int32_t *keep_l[1024] = {0}, n_keep[1024];
    int32_t *store = malloc(sizeof(int32_t) * (size_t)n_lay * nkv * p->cap_max);
    float *sc = malloc(sizeof(float) * (size_t)n_lay * nkv * p->cap_max), *tmp = malloc(sizeof(float) * (size_t)p->cap_max);
    int32_t *vis = malloc(sizeof(int32_t) * (size_t)n_lay * nkv * (p->qwin + 1)), *qpos = malloc(sizeof(int32_t) * (p->qwin + 1));
    enum kvs_status st = store && sc && tmp && vis && qpos ? KVS_OK : kvs_fail(KVS_ERR_NOMEM, "out of memory for a GPU plan");
    /* the newest qwin saved queries, as the CPU scorer takes (TOVA: the newest alone) */
    int nq = st == KVS_OK && attn ? cuda_seq_queries(c->gpu, s->slot, qpos, kvs_gpu_spec_qwin(sp)) : 0;
    for (int il = 0; il < nl; il++) n_keep[il] = cuda_seq_layer_entries(c->gpu, s->slot, il); /* (as they are) */
    int32_t before = n_keep[nl - 1];
    /* causal: query w sees the entries at positions up to its own (a prefix: entries are in
     * position order) */
    for (int i = 0; i < n_lay && st == KVS_OK && attn; i++)
        for (int ih = 0; ih < nkv; ih++) {
            const int32_t *pos = cuda_seq_positions(c->gpu, s->slot, lay[i], ih);
            int32_t n = n_keep[lay[i]];
            for (int w = 0; w < nq; w++) {
                int32_t lo = 0, hi = n;
                while (lo < hi) {
                    int32_t mid = (lo + hi) / 2;
                    if (pos[mid] <= qpos[w]) lo = mid + 1;
                    else hi = mid;
                }
                vis[((size_t)i * nkv + ih) * nq + w] = lo;
            }
        }
    if (st == KVS_OK && attn)
        st = cuda_seq_score_window(c->gpu, s->slot, n_lay, lay, vis, nq, sp->agg == KV_AGG_MAX, sc, (size_t)p->cap_max);
    if (st == KVS_OK && src == KV_SRC_KNORM) st = cuda_seq_key_sq(c->gpu, s->slot, n_lay, lay, sc, (size_t)p->cap_max);
    if (st == KVS_OK && src == KV_SRC_ACC) st = cuda_seq_acc(c->gpu, s->slot, n_lay, lay, sc, (size_t)p->cap_max);
    for (int i = 0; i < n_lay && st == KVS_OK; i++) {
        int il = lay[i];
        int32_t n = n_keep[il], nh[KV_VIEW_MAX_HEADS];
        const int32_t *pos[KV_VIEW_MAX_HEADS];
        for (int ih = 0; ih < nkv; ih++) {
            pos[ih] = cuda_seq_positions(c->gpu, s->slot, il, ih);
            nh[ih] = n;
            float *row = p->score + (size_t)ih * p->cap_max;
            const float *got = sc + ((size_t)i * nkv + ih) * p->cap_max;
            if (src == KV_SRC_POS) kv_policy_score_pos(p, il, ih, pos[ih], n, row);
            else if (src == KV_SRC_KNORM) for (int32_t j = 0; j < n; j++) row[j] = -sqrtf(got[j]);
            else memcpy(row, got, sizeof(float) * n);
            if (src == KV_SRC_WINDOW) kv_snapkv_pool(p, row, n, tmp);
        }
        if (!kv_policy_plan_scored(p, il, n_seen, slack, nh, pos, s->kv->pin, &c->plan)) continue;
        keep_l[il] = store + (size_t)i * nkv * p->cap_max;
        for (int ih = 0; ih < nkv; ih++) {
            KVS_ASSERT(c->plan.n_keep[ih] == c->plan.n_keep[0]); /* same n and budget in every head */
            memcpy(keep_l[il] + (size_t)ih * p->cap_max, c->plan.keep[ih], sizeof(int32_t) * c->plan.n_keep[ih]);
        }
        n_keep[il] = c->plan.n_keep[0];
        /* the store's bound: no head above its budget */
        KVS_ASSERT(n_keep[il] <= kv_policy_budget(p, il, n_seen) || n_keep[il] == n);
    }
    if (st == KVS_OK)
        st = cuda_seq_compact(c->gpu, s->slot, (const int32_t *const *)keep_l, n_keep, p->cap_max, sp->reindex);
    /* in-cache positions (streaming pos=cache), as the CPU path counts them: the last layer's
     * evictions, from the next pass on */
    if (st == KVS_OK && sp->reindex && keep_l[nl - 1]) s->pos_shift += before - n_keep[nl - 1];
    for (int il = 0; il < nl && st == KVS_OK; il++) c->plan_layers += keep_l[il] != NULL;
    free(store), free(sc), free(tmp), free(vis), free(qpos);
    c->plan_s += (kvs_time_ms() - t0) / 1e3;
    return st;
}

/* --device cuda: the whole pass on the GPU (src/cuda/), each sequence's cache in its slot there */
static enum kvs_status forward_gpu(struct kvs_context *c, const int32_t *tokens, const int32_t *pos,
                                   kvs_sequence *const *seq, int T, const int *out_rows, int n_out,
                                   float *logits, const uint8_t *phase) {
    int slot[KVS_T_MAX] = {0};
    for (int t = 0; t < T; t++) {
        if (phase[t] == FWD_RECOMPUTE) return kvs_gpu_refuse(c, "recomputing reused chunk tokens");
        slot[t] = seq[t]->slot;
    }
    for (int t = 0; t < T; t++) cuda_seq_set_rope_shift(c->gpu, slot[t], seq[t]->pos_shift);
    enum kvs_status st = cuda_forward(c->gpu, tokens, pos, slot, T, out_rows, n_out, logits);
    /* each sequence's policy, at its last token of the pass. The pass's entries are in by now:
     * a compression that runs out of memory leaves that cache whole (over budget, planned again
     * after the next pass) rather than failing a pass whose tokens are already stored */
    for (int t = 0; t < T && st == KVS_OK; t++) {
        bool last = true;
        for (int u = t + 1; u < T && last; u++) last = seq[u] != seq[t];
        if (!last) continue;
        st = gpu_compress(c, seq[t], (enum fwd_phase)phase[t], (int64_t)pos[t] + 1);
        if (st == KVS_ERR_NOMEM) {
            kvs_log(1, "cuda: compressing a sequence's cache: %s (left as it is for now)", kvs_last_error());
            st = KVS_OK;
        }
    }
    return st;
}

enum kvs_status forward(struct kvs_context *c, const int32_t *tokens, const int32_t *pos,
                        kvs_sequence *const *seq, int T, const int *out_rows, int n_out,
                        float *logits, const uint8_t *phase) {
    if (c->gpu) return forward_gpu(c, tokens, pos, seq, T, out_rows, n_out, logits, phase);
    const kvs_model *m = c->m;
    const struct hparams *hp = &m->hp;
    const int d = hp->n_embd, hd = hp->head_dim, nq = hp->n_head * hd,
              nkv = hp->n_head_kv * hd, ff = hp->n_ff;
    KVS_ASSERT(T >= 1 && T <= c->t_max);

    /* distinct sequences of the batch and their views */
    struct kv_view views[64];
    kvs_sequence *vseq[64];
    int n_views = 0;
    int vidx_buf[KVS_T_MAX];
    for (int t = 0; t < T; t++) {
        int f = -1;
        for (int i = 0; i < n_views; i++)
            if (vseq[i] == seq[t]) f = i;
        if (f < 0) {
            KVS_ASSERT(n_views < 64);
            f = n_views;
            vseq[n_views++] = seq[t];
        }
        vidx_buf[t] = f;
    }
    int cnt[64] = {0}; /* tokens of each distinct sequence in this batch */
    enum fwd_phase vph[64];
    for (int t = 0; t < T; t++) cnt[vidx_buf[t]]++, vph[vidx_buf[t]] = (enum fwd_phase)phase[t];
    /* embeddings and rope tables */
    for (int t = 0; t < T; t++) {
        if (tokens[t] < 0 || tokens[t] >= hp->n_vocab)
            return kvs_fail(KVS_ERR_INVALID_ARG, "token id %d out of range [0, %d)", tokens[t],
                            hp->n_vocab);
    }
    for (int t = 0; t < T; t++) {
        quant_dequantize_row(m->tok_embd.type,
                             (const uint8_t *)m->tok_embd.data + (size_t)tokens[t] * m->tok_embd.row_bytes,
                             c->x + (size_t)t * d, d);
        float *cs = c->rope_cs + (size_t)t * hd;
        for (int i = 0; i < hd / 2; i++) {
            double a = (double)(pos[t] - seq[t]->pos_shift) * c->inv_freq[i];
            cs[2 * i] = (float)cos(a);
            cs[2 * i + 1] = (float)sin(a);
        }
    }
    bool neox = m->arch->rope == ROPE_NEOX;
    /* Attention units, chosen per sequence from its own tokens and cache only (so a sequence's
     * results are the same in any batch): a sequence keeping accumulated attention gets one unit
     * per KV head; a prompt chunk, blocks of up to ATT_TB consecutive queries per KV head; a lone
     * decode token, its keys split so all threads stream the cache (flash-decoding; the split
     * depends on the cache, never on the thread count). */
    int tsplit[KVS_T_MAX], poff[KVS_T_MAX];
    struct att_unit_desc *units = c->att_units;
    int n_units = 0, n_kv = hp->n_head_kv;
    for (int t = 0; t < T; t++) tsplit[t] = 1;
    for (int i = 0; i < n_views; i++) {
        bool vacc = vseq[i]->kv->with_acc && !vseq[i]->kv->acc_learned;
        if (vacc) {
            for (int h = 0; h < n_kv; h++) units[n_units++] = (struct att_unit_desc){AU_ACC, (int16_t)h, i, 0};
        } else if (cnt[i] == 1 && vph[i] == FWD_DECODE) {
            /* (a one-token prompt item, e.g. the text between two reused chunks, takes the
             * block path like any prompt token, so it gets the bits of a prefill) */
            int t = 0;
            while (vidx_buf[t] != i) t++;
            int held = kv_seq_max_entries(vseq[i]->kv) + vseq[i]->nsh_max + 1;
            int ns = held / 256;
            tsplit[t] = ns < 1 ? 1 : ns > ATT_MAX_SPLIT ? ATT_MAX_SPLIT : ns;
            for (int h = 0; h < n_kv; h++)
                for (int sp = 0; sp < tsplit[t]; sp++)
                    units[n_units++] = (struct att_unit_desc){AU_SPLIT, (int16_t)h, t, sp};
        } else {
            for (int t = 0; t < T;) {
                if (vidx_buf[t] != i) { t++; continue; }
                int nt = 1;
                while (nt < ATT_TB && t + nt < T && vidx_buf[t + nt] == i &&
                       pos[t + nt] == pos[t + nt - 1] + 1)
                    nt++;
                for (int h = 0; h < n_kv; h++)
                    units[n_units++] = (struct att_unit_desc){AU_BLOCK, (int16_t)h, t, nt};
                t += nt;
            }
        }
    }
    for (int t = 0, o = 0; t < T; t++) poff[t] = o, o += n_kv * tsplit[t];

    for (int il = 0; il < hp->n_layer; il++) {
        const struct layer_weights *lw = &m->layers[il];
        unsigned fresh = 0;

        struct norm_job nj = {c->x, c->xn, lw->attn_norm, d, T, hp->norm_eps, d};
        run_rows(c, norm_worker, &nj, T);
        struct mm_job qkv = {.n_mm = 3, .T = T};
        qkv.mm[0] = (struct mm){&lw->wq, prep_act(c, c->xn, d, T, d, lw->wq.type, &fresh), c->q, nq};
        qkv.mm[1] = (struct mm){&lw->wk, prep_act(c, c->xn, d, T, d, lw->wk.type, &fresh), c->k, nkv};
        qkv.mm[2] = (struct mm){&lw->wv, prep_act(c, c->xn, d, T, d, lw->wv.type, &fresh), c->v, nkv};
        matmul(c, &qkv);

        for (int i = 0; i < n_views; i++) {
            enum kvs_status st = kv_seq_reserve(vseq[i]->kv, il, cnt[i]);
            if (st != KVS_OK) return st;
        }
        for (int i = 0; i < n_views; i++)
            if (vseq[i]->kv->gate_w && vseq[i]->kv->acc_learned) {
                KVS_ASSERT(c->agate);
                enum kvs_status st = gate_layer(c, il, pos, phase, T, vseq, n_views, vidx_buf);
                if (st != KVS_OK) return st;
                break;
            }
        int later[64]; /* tokens of each sequence still to come in this batch */
        memcpy(later, cnt, sizeof(int) * (size_t)n_views);
        int n_lrn = 0, lrn_row[KVS_T_MAX];
        for (int t = 0; t < T; t++) {
            float *q = c->q + (size_t)t * nq, *k = c->k + (size_t)t * nkv, *v = c->v + (size_t)t * nkv;
            if (lw->bq) {
                for (int i = 0; i < nq; i++) q[i] += lw->bq[i];
                for (int i = 0; i < nkv; i++) k[i] += lw->bk[i], v[i] += lw->bv[i];
            }
            lrn_row[t] = -1;
            if (seq[t]->kv->acc_learned && !seq[t]->kv->gate_w && phase[t] != FWD_RECOMPUTE) { /* Locret's input: q, k, v before RoPE */
                KVS_ASSERT(c->learned);
                float *x = c->lrn_x + (size_t)n_lrn * c->learned->d_in;
                memcpy(x, q, sizeof(float) * (size_t)nq);
                memcpy(x + nq, k, sizeof(float) * (size_t)nkv);
                memcpy(x + nq + nkv, v, sizeof(float) * (size_t)nkv);
                lrn_row[t] = n_lrn++;
            }
        }
        if (n_lrn) {
            struct lrn_job lj = {c, il, n_lrn};
            run_rows(c, lrn_worker, &lj, n_lrn);
        }
        for (int t = 0; t < T; t++) {
            float *q = c->q + (size_t)t * nq, *k = c->k + (size_t)t * nkv, *v = c->v + (size_t)t * nkv;
            const float *cs = c->rope_cs + (size_t)t * hd;
            ops_rope(q, hp->n_head, hd, cs, neox);
            ops_rope(k, hp->n_head_kv, hd, cs, neox);
            if (phase[t] == FWD_RECOMPUTE) { /* a reused chunk's token: replace its entries
                                              * (where a compressed record still holds them) */
                if (c->probe_dev && il == c->probe_layer)
                    c->probe_dev[t] += (float)kv_seq_value_dev(seq[t]->kv, il, pos[t], v);
                kv_seq_overwrite(seq[t]->kv, il, pos[t], k, v);
                continue;
            }
            kv_seq_append(seq[t]->kv, il, pos[t], k, v);
            if (lrn_row[t] >= 0)
                kv_seq_set_learned_last(seq[t]->kv, il, c->lrn_s + (size_t)lrn_row[t] * hp->n_head_kv);
            else if (seq[t]->kv->gate_w && seq[t]->kv->acc_learned)
                kv_seq_set_learned_last(seq[t]->kv, il, c->ag_s + (size_t)t * hp->n_head_kv);
            /* the ring keeps the last qwin queries: older ones of a chunk would be overwritten */
            if (phase[t] != FWD_RECOMPUTE && --later[vidx_buf[t]] < c->kv.qwin) kv_seq_save_query(seq[t]->kv, il, pos[t], q);
        }
        if (c->probe_dev && il == c->probe_layer) return KVS_OK; /* deviations measured */

        for (int i = 0; i < n_views; i++) {
            kv_seq_view(vseq[i]->kv, il, &views[i]);
            prefix_view(vseq[i], il, &views[i]);
        }
        struct att_job aj = {.c = c, .T = T, .n_views = n_views, .n_units = n_units,
                             .units = units, .tsplit = tsplit, .poff = poff, .pos = pos,
                             .views = views, .vi = vidx_buf, .seq = seq};
        atomic_init(&aj.next, 0);
        threadpool_run(c->tp, att_worker, &aj);
        att_combine(c, T, tsplit, poff, c->xn);
        for (int i = 0; i < n_views; i++) compress_layer(c, vseq[i], il, vph[i], pos, vidx_buf, T, i);

        fresh = 0;
        struct mm_job oj = {.n_mm = 1, .T = T};
        oj.mm[0] = (struct mm){&lw->wo, prep_act(c, c->xn, nq, T, nq, lw->wo.type, &fresh), c->q, d};
        matmul(c, &oj);
        for (size_t i = 0; i < (size_t)T * d; i++) c->x[i] += c->q[i];

        fresh = 0;
        struct norm_job fj = {c->x, c->xn, lw->ffn_norm, d, T, hp->norm_eps, d};
        run_rows(c, norm_worker, &fj, T);
        struct mm_job gu = {.n_mm = 2, .T = T};
        gu.mm[0] = (struct mm){&lw->w_gate, prep_act(c, c->xn, d, T, d, lw->w_gate.type, &fresh), c->gate, ff};
        gu.mm[1] = (struct mm){&lw->w_up, prep_act(c, c->xn, d, T, d, lw->w_up.type, &fresh), c->up, ff};
        matmul(c, &gu);
        struct swiglu_job sj = {c->gate, c->up, ff, T};
        run_rows(c, swiglu_worker, &sj, T);
        fresh = 0;
        struct mm_job dj = {.n_mm = 1, .T = T};
        dj.mm[0] = (struct mm){&lw->w_down, prep_act(c, c->gate, ff, T, ff, lw->w_down.type, &fresh), c->q, d};
        matmul(c, &dj);
        for (size_t i = 0; i < (size_t)T * d; i++) c->x[i] += c->q[i];
    }

    if (n_out > 0) {
        /* final norm of the requested rows, gathered contiguously into xn */
        for (int r = 0; r < n_out; r++)
            ops_rmsnorm(c->xn + (size_t)r * d, c->x + (size_t)out_rows[r] * d, m->output_norm, d,
                        hp->norm_eps);
        unsigned fresh = 0;
        struct mm_job lj = {.n_mm = 1, .T = n_out};
        lj.mm[0] = (struct mm){&m->output, prep_act(c, c->xn, d, n_out, d, m->output.type, &fresh),
                               logits, hp->n_vocab};
        matmul(c, &lj);
    }
    return KVS_OK;
}
