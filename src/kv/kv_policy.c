/* kv_policy.c — budgets, allocators and the top-k planner shared by every scorer.
 *
 * Per (sequence, layer): each KV head's budget comes from the spec (budget=N tokens, ratio=R of
 * the tokens seen, or mem=BYTES spread over layers and heads), shaped across layers by the
 * allocator (uniform, or PyramidKV's linear pyramid: layer 0 gets (2 - 1/beta) x the mean, the
 * top layer 1/beta x, so the total is unchanged). The scorer scores the entries; the newest
 * `protect` entries (the recent window of H2O/SnapKV) are always kept; the rest compete for the
 * remaining budget by score, ties going to the later position. AdaKV instead pools the layer's
 * budget: every head first keeps floor x its uniform share of its best entries, then the
 * remaining slots go to the best entries of any head (scores are attention probabilities, so
 * they compare across heads; Feng et al., "Ada-KV", arXiv 2407.11550).
 * The planner only writes the plan; the store applies it.
 */
#include "kv_policy.h"
#include "kv_attn.h"
#include "threadpool.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct ent { float s; int32_t ih, j; }; /* an AdaKV pool candidate */
static int cmp_ent(const void *a, const void *b);

static const struct kv_scorer_i *scorer_for(enum kv_method m) {
    switch (m) {
    case KV_STREAMING: return &kv_scorer_streaming;
    case KV_H2O: return &kv_scorer_h2o;
    case KV_TOVA: return &kv_scorer_tova;
    case KV_SNAPKV: return &kv_scorer_snapkv;
    case KV_KNORM: return &kv_scorer_knorm;
    case KV_RANDOM: return &kv_scorer_random;
    case KV_D2O: return &kv_scorer_d2o;
    case KV_EMS: return &kv_scorer_ems;
    case KV_KVMERGER: return &kv_scorer_kvmerger;
    case KV_ELASTIC: return &kv_scorer_elastic;
    case KV_LOCRET: return &kv_scorer_locret;
    case KV_AGATE: return &kv_scorer_agate;
    default: return NULL;
    }
}

unsigned kv_policy_needs(const struct kv_spec *spec) {
    const struct kv_scorer_i *sc = scorer_for(spec->method);
    unsigned n = sc ? sc->needs : 0;
    if (spec->think || spec->mikv_low) n |= KV_NEED_QUERIES; /* pack.c's window */
    if (spec->alloc == KV_ALLOC_D2O && sc) n |= KV_NEED_ACC;  /* D2O's attention variance */
    return n;
}

int kv_policy_qwin(const struct kv_spec *spec) {
    if (!(kv_policy_needs(spec) & KV_NEED_QUERIES)) return 0;
    int w = spec->obs_window > 0 ? spec->obs_window : 1;
    if ((spec->think || spec->mikv_low) && w < 32) w = 32;
    return w;
}

enum kvs_status kv_policy_new(const struct kv_spec *spec, int n_layer, int n_head, int n_head_kv,
                              int head_dim, int32_t cap_max, uint64_t entry_bytes,
                              struct kv_policy **out) {
    *out = NULL;
    if (spec->method == KV_FULL) return KVS_OK;
    struct kv_policy *p = calloc(1, sizeof *p);
    if (!p) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    p->spec = *spec;
    p->qwin = kv_policy_qwin(spec);
    p->scorer = scorer_for(spec->method);
    KVS_ASSERT(p->scorer && p->scorer->api_version == KV_POLICY_API_VERSION);
    p->n_layer = n_layer;
    p->n_head = n_head;
    p->n_head_kv = n_head_kv;
    p->head_dim = head_dim;
    p->entry_bytes = entry_bytes;
    kv_pack_cfg_from_spec(spec, head_dim, &p->pack);
    p->cap_max = cap_max;
    size_t g = (size_t)(n_head / n_head_kv);
    p->score = malloc(sizeof(float) * n_head_kv * (size_t)cap_max);
    p->n_par = 1;
    p->scratch = malloc(sizeof(float) * (g + 1) * (size_t)cap_max);
    p->order = malloc(sizeof(int32_t) * n_head_kv * (size_t)cap_max);
    p->keep = malloc(sizeof(int32_t) * n_head_kv * (size_t)cap_max);
    p->pool = malloc(sizeof(struct ent) * n_head_kv * (size_t)cap_max);
    p->ascratch = malloc(sizeof(float) * kv_attn_scratch_floats((int)g, head_dim));
    p->mt = malloc(sizeof(int32_t) * n_head_kv * (size_t)cap_max);
    p->mc = malloc(sizeof(float) * n_head_kv * (size_t)cap_max);
    p->dem = malloc((size_t)n_head_kv * (size_t)cap_max);
    if (!p->score || !p->scratch || !p->order || !p->keep || !p->pool || !p->ascratch || !p->mt ||
        !p->mc || !p->dem) {
        kv_policy_free(p);
        return kvs_fail(KVS_ERR_NOMEM, "out of memory for the KV policy");
    }
    *out = p;
    return KVS_OK;
}

enum kvs_status kv_policy_set_threads(struct kv_policy *p, struct threadpool *tp) {
    if (!p || !tp || !(p->scorer->needs & KV_PAR_HEADS)) return KVS_OK;
    int n = threadpool_n_threads(tp);
    if (n > p->n_head_kv) n = p->n_head_kv;
    if (n <= 1) return KVS_OK;
    size_t g = (size_t)(p->n_head / p->n_head_kv);
    float *sc = malloc(sizeof(float) * (g + 1) * (size_t)p->cap_max * (size_t)n);
    float *as = malloc(sizeof(float) * kv_attn_scratch_floats((int)g, p->head_dim) * (size_t)n);
    if (!sc || !as) {
        free(sc), free(as);
        return kvs_fail(KVS_ERR_NOMEM, "out of memory for the KV policy's scoring threads");
    }
    free(p->scratch), free(p->ascratch);
    p->scratch = sc, p->ascratch = as, p->tp = tp, p->n_par = n;
    return KVS_OK;
}

void kv_policy_free(struct kv_policy *p) {
    if (!p) return;
    free(p->score);
    free(p->scratch);
    free(p->order);
    free(p->keep);
    free(p->pool);
    free(p->ascratch);
    free(p->mt);
    free(p->mc);
    free(p->dem);
    free(p);
}

int32_t kv_policy_budget(const struct kv_policy *p, int il, int64_t n_seen) {
    const struct kv_spec *sp = &p->spec;
    double b;
    if (sp->budget > 0) b = sp->budget;
    else if (sp->ratio > 0) b = ceil(sp->ratio * (double)n_seen);
    else {
        /* bytes per head; an fp16 entry costs entry_bytes. KIVI: beyond its fp16 window of
         * resid + G - 1 entries, each entry costs a packed one. ThinK keeps generated tokens
         * full width, so it is priced at fp16 (the bound holds however long it decodes). */
        double mh = (double)sp->mem_bytes / ((double)p->n_layer * p->n_head_kv);
        double F = (double)p->entry_bytes;
        if (p->pack.kivi) {
            double W = p->pack.resid + p->pack.f.G - 1;
            double P = kv_pack_entry_bytes(&p->pack, p->head_dim) + (F - kv_entry_payload_bytes(p->head_dim));
            b = mh <= W * F ? mh / F : W + (mh - W * F) / P;
        } else {
            b = mh / F;
        }
        b = floor(b);
    }
    if (sp->alloc == KV_ALLOC_PYRAMID && p->n_layer > 1) {
        double beta = sp->pyramid_beta, top = 1.0 / beta, bottom = 2.0 - top;
        b *= bottom - (bottom - top) * il / (p->n_layer - 1);
    }
    if (b < 1) b = 1;
    if (b > p->cap_max) b = p->cap_max;
    return (int32_t)b;
}

/* sort helpers: order indices by score descending, ties to the larger index (later position) */
/* qsort has no context argument: the scores being sorted, per thread (contexts may plan
 * concurrently on different threads) */
static _Thread_local const float *g_sort_score;
static int cmp_desc(const void *a, const void *b) {
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    float x = g_sort_score[i], y = g_sort_score[j];
    if (x != y) return x > y ? -1 : 1;
    return i > j ? -1 : 1;
}
static int cmp_i32(const void *a, const void *b) {
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    return (i > j) - (i < j);
}

static bool plan_adakv(struct kv_policy *p, const struct kv_seq *s, int il, int32_t budget,
                       int32_t prot, struct kv_plan *plan);
static bool d2o_skipped(const struct kv_policy *p, int il);

/* a ranks before b: the higher score, ties to the larger index (cmp_desc's order) */
static inline bool ranks_before(const float *sc, int32_t a, int32_t b) {
    return sc[a] > sc[b] || (sc[a] == sc[b] && a > b);
}

/* Reorder v[0..n) so that its first k are the k best by ranks_before (in no order): the set a
 * sort by cmp_desc would put first, found in O(n) expected time (quickselect, median of three). */
static void select_best(const float *sc, int32_t *v, int32_t n, int32_t k) {
    int32_t lo = 0, hi = n - 1;
    while (lo < hi && k > lo && k <= hi) {
        int32_t mid = lo + (hi - lo) / 2, t;
        /* median of three into v[hi] as the pivot */
        if (ranks_before(sc, v[mid], v[lo])) t = v[mid], v[mid] = v[lo], v[lo] = t;
        if (ranks_before(sc, v[hi], v[lo])) t = v[hi], v[hi] = v[lo], v[lo] = t;
        if (ranks_before(sc, v[mid], v[hi])) t = v[mid], v[mid] = v[hi], v[hi] = t;
        int32_t piv = v[hi], i = lo;
        for (int32_t j = lo; j < hi; j++)
            if (ranks_before(sc, v[j], piv)) t = v[i], v[i] = v[j], v[j] = t, i++;
        t = v[i], v[i] = v[hi], v[hi] = t; /* v[lo..i) rank before the pivot, now at i */
        if (i == k || i + 1 == k) return;
        if (i > k) hi = i - 1;
        else lo = i + 1;
    }
}

/* Keep for one head: the last `prot` entries plus the best (budget - prot) of the others, in
 * ascending order */
static int32_t select_head(const float *score, int32_t n, int32_t budget, int32_t prot,
                           int32_t *order, int32_t *keep) {
    if (n <= budget) {
        for (int32_t j = 0; j < n; j++) keep[j] = j;
        return n;
    }
    if (prot > budget) prot = budget;
    int32_t cand = n - prot, take = budget - prot, nk = 0;
    for (int32_t j = 0; j < cand; j++) order[j] = j;
    select_best(score, order, cand, take);
    /* the chosen ones in ascending order: flags in keep, then compacted in place (nk <= j) */
    for (int32_t j = 0; j < cand; j++) keep[j] = 0;
    for (int32_t i = 0; i < take; i++) keep[order[i]] = 1;
    for (int32_t j = 0; j < cand; j++)
        if (keep[j]) keep[nk++] = j;
    for (int32_t j = cand; j < n; j++) keep[nk++] = j;
    return nk;
}

static bool d2o_skipped(const struct kv_policy *p, int il) {
    return p->spec.alloc == KV_ALLOC_D2O && p->spec.skip_layers && p->n_layer > 3 &&
           (il < 2 || il == p->n_layer - 1);
}

/* the budget of layer il as planned (D2O's layer factor applied) */
static int32_t layer_budget(const struct kv_policy *p, struct kv_seq *s, int il, int64_t n_seen,
                            bool decode) {
    int32_t b = kv_policy_budget(p, il, n_seen);
    if (p->spec.alloc == KV_ALLOC_D2O) {
        if (d2o_skipped(p, il)) return p->cap_max;
        /* D2O decides the layer split from the prompt's statistics; decoding reuses it */
        float *st = s->pstate + (size_t)il * KV_PSTATE + 3;
        if (!decode || *st == 0) *st = (float)kv_d2o_layer_factor(p, s, il);
        double f = *st * b;
        double lo = 0.01 * (double)n_seen;
        b = (int32_t)(f < lo ? lo : f);
        if (b < 1) b = 1;
        if (b > p->cap_max) b = p->cap_max;
    }
    return b;
}

/* entries of a head the budget counts: all, or the fp16 ones under MiKV */
static int32_t counted(const struct kv_policy *p, const struct kv_head_store *h) {
    return p->spec.mikv_low ? h->n - h->nc : h->n;
}

bool kv_policy_check_budget(const struct kv_policy *p, const struct kv_seq *s, int il, int64_t n_seen) {
    /* D2O's layer factor moves with the statistics the apply just changed: check the planned one */
    int32_t budget = p->spec.alloc == KV_ALLOC_D2O ? p->planned : layer_budget(p, (struct kv_seq *)s, il, n_seen, true), sum = 0;
    bool pooled = p->spec.alloc == KV_ALLOC_ADAKV || p->spec.method == KV_AGATE; /* the layer's sum */
    for (int ih = 0; ih < p->n_head_kv; ih++) {
        int32_t n = counted(p, kv_seq_head(s, il, ih));
        sum += n;
        if (!pooled && n > budget) return false;
    }
    return sum <= budget * p->n_head_kv;
}

/* Elastic Cache while decoding: evict the entry at the fixed slot p* = (entries after the
 * prompt's compression) + distance (distance < 0) or slot `distance` (> 0), until within budget. */
static bool plan_elastic_decode(struct kv_policy *p, struct kv_seq *s, int il, int32_t budget,
                                struct kv_plan *plan) {
    float *st = s->pstate + (size_t)il * KV_PSTATE;
    for (int ih = 0; ih < p->n_head_kv; ih++) {
        int32_t n = kv_seq_head(s, il, ih)->n, *keep = p->keep + (size_t)ih * p->cap_max;
        int32_t drop = n > budget ? n - budget : 0;
        int32_t at = p->spec.distance < 0 ? (int32_t)st[1] + p->spec.distance : p->spec.distance;
        if (at < p->spec.sinks) at = p->spec.sinks;
        if (at > n - drop - 1) at = n - drop - 1; /* the newest entry always stays */
        if (at < 0) at = 0;
        int32_t nk = 0;
        for (int32_t j = 0; j < n; j++)
            if (j < at || j >= at + drop) keep[nk++] = j;
        plan->keep[ih] = keep;
        plan->n_keep[ih] = nk;
        plan->mt[ih] = NULL, plan->mc[ih] = NULL, plan->dem[ih] = NULL;
    }
    return true;
}

static bool plan_layer(struct kv_policy *p, struct kv_seq *s, int il, int64_t n_seen,
                       int32_t slack, bool decode, struct kv_plan *plan);

bool kv_policy_plan_layer(struct kv_policy *p, struct kv_seq *s, int il, int64_t n_seen,
                          int32_t slack, bool decode, struct kv_plan *plan) {
    bool planned = plan_layer(p, s, il, n_seen, slack, decode, plan);
    if (planned) p->n_plans++;
    return planned;
}

/* Attention-Gate: per head, entries whose keep score is below tau and that the next query
 * (position newest + 1) can no longer see are evicted (pinned positions stay). Under a budget the
 * layer's n_head_kv x budget slots are pooled over its heads (the gate keeps very different
 * numbers in different heads): each head keeps its newest `window`, the rest go to the best
 * scores of any head (scores are keep probabilities, comparable across heads; ties to the later
 * entry). */
static bool plan_gate(struct kv_policy *p, struct kv_seq *s, int il, int32_t budget, int32_t slack,
                      struct kv_plan *plan) {
    bool any = p->plan_always;
    float tau = s->gate_tau;
    int32_t win = s->gate_win, m[KV_VIEW_MAX_HEADS], total = 0, cap = budget * p->n_head_kv;
    for (int ih = 0; ih < p->n_head_kv; ih++) {
        const struct kv_head_store *h = kv_seq_head(s, il, ih);
        size_t o = (size_t)ih * p->cap_max;
        int32_t *idx = p->mt + o, n = h->n;
        float *sc = p->score + o;
        int32_t next = n ? h->pos[n - 1] + 1 : 0;
        m[ih] = 0;
        for (int32_t j = 0; j < n; j++) {
            bool pinned = h->pos[j] < s->pin;
            if (!pinned && h->acc[j] < tau && next - h->pos[j] >= win) continue;
            idx[m[ih]] = j;
            sc[m[ih]++] = pinned ? INFINITY : h->acc[j];
        }
        any = any || m[ih] < n;
        total += m[ih];
    }
    bool over = total > cap + slack * p->n_head_kv;
    if (!any && !over) return false;
    int32_t nk[KV_VIEW_MAX_HEADS];
    if (total <= cap) {
        for (int ih = 0; ih < p->n_head_kv; ih++) nk[ih] = m[ih];
    } else {
        struct ent *pool = p->pool;
        int32_t n_pool = 0, remaining = cap;
        for (int ih = 0; ih < p->n_head_kv; ih++) {
            int32_t prot = win < m[ih] ? win : m[ih];
            nk[ih] = 0;
            remaining -= prot;
            const float *sc = p->score + (size_t)ih * p->cap_max;
            for (int32_t i = 0; i < m[ih] - prot; i++) pool[n_pool++] = (struct ent){sc[i], ih, i};
        }
        qsort(pool, (size_t)n_pool, sizeof *pool, cmp_ent);
        uint8_t *take = p->dem; /* (n_head_kv, cap_max) flags: which candidates stay */
        for (int ih = 0; ih < p->n_head_kv; ih++) memset(take + (size_t)ih * p->cap_max, 0, (size_t)m[ih]);
        for (int32_t i = 0; i < remaining && i < n_pool; i++) take[(size_t)pool[i].ih * p->cap_max + pool[i].j] = 1;
        for (int ih = 0; ih < p->n_head_kv; ih++) {
            uint8_t *t = take + (size_t)ih * p->cap_max;
            int32_t prot = win < m[ih] ? win : m[ih];
            for (int32_t i = m[ih] - prot; i < m[ih]; i++) t[i] = 1;
            int32_t *idx = p->mt + (size_t)ih * p->cap_max, k = 0;
            for (int32_t i = 0; i < m[ih]; i++)
                if (t[i]) idx[k++] = idx[i]; /* in place: k <= i */
            nk[ih] = k;
        }
    }
    for (int ih = 0; ih < p->n_head_kv; ih++) {
        size_t o = (size_t)ih * p->cap_max;
        int32_t *keep = p->keep + o;
        memcpy(keep, p->mt + o, sizeof(int32_t) * (size_t)nk[ih]);
        plan->keep[ih] = keep;
        plan->n_keep[ih] = nk[ih];
    }
    return true;
}

/* the KV heads of a layer scored on the policy's workers (kv_policy_set_threads): worker ith
 * takes heads ith, ith + nth, ... with its own scratch; each head's arithmetic is unchanged */
struct score_job {
    struct kv_policy *p;
    struct kv_score_args a;
};
static void score_worker(void *arg, int ith, int nth) {
    struct score_job *j = arg;
    struct kv_policy *p = j->p;
    if (ith >= p->n_par) return;
    if (nth > p->n_par) nth = p->n_par;
    size_t g = (size_t)(p->n_head / p->n_head_kv);
    struct kv_score_args a = j->a;
    a.scratch = p->scratch + (size_t)ith * (g + 1) * (size_t)p->cap_max;
    a.ascratch = p->ascratch + (size_t)ith * kv_attn_scratch_floats((int)g, p->head_dim);
    for (int ih = ith; ih < p->n_head_kv; ih += nth) p->scorer->score(&a, ih, p->score + (size_t)ih * p->cap_max);
}

/* one score per layer (TOVA): the heads hold the same positions; their scores summed, the sum
 * given to every head */
static void layer_scores(struct kv_policy *p, int32_t n) {
    for (int ih = 1; ih < p->n_head_kv; ih++) {
        const float *r = p->score + (size_t)ih * p->cap_max;
        for (int32_t j = 0; j < n; j++) p->score[j] += r[j];
    }
    for (int ih = 1; ih < p->n_head_kv; ih++) memcpy(p->score + (size_t)ih * p->cap_max, p->score, sizeof(float) * n);
}

/* a plan of evictions alone, so far: no merges, demotions or reweighting */
static void plan_evict_only(struct kv_plan *plan) {
    for (int ih = 0; ih < KV_VIEW_MAX_HEADS; ih++) plan->mt[ih] = NULL, plan->mc[ih] = NULL, plan->dem[ih] = NULL;
    plan->renorm = false;
}

static bool plan_layer(struct kv_policy *p, struct kv_seq *s, int il, int64_t n_seen,
                       int32_t slack, bool decode, struct kv_plan *plan) {
    int32_t budget = layer_budget(p, s, il, n_seen, decode);
    p->planned = budget;
    if (p->spec.method == KV_AGATE) {
        plan_evict_only(plan);
        return plan_gate(p, s, il, budget, slack, plan);
    }
    /* Elastic's decode slot is relative to the prompt as compressed: its length so far */
    if (!decode) s->pstate[(size_t)il * KV_PSTATE + 1] = (float)kv_seq_head(s, il, 0)->n;
    bool over = false;
    for (int ih = 0; ih < p->n_head_kv; ih++) {
        int32_t n = counted(p, kv_seq_head(s, il, ih));
        if (n > budget + slack) over = true;
    }
    plan_evict_only(plan);
    if (!over && !p->plan_always) return false;
    /* (with MiKV the losers are demoted, whatever the method's eviction rule) */
    if (decode && p->spec.merge == KV_MERGE_ELASTIC && !p->spec.mikv_low)
        return plan_elastic_decode(p, s, il, budget, plan);
    struct kv_score_args a = {.p = p, .s = s, .il = il, .n_seen = n_seen, .scratch = p->scratch,
                              .ascratch = p->ascratch};
    int32_t prot = p->scorer->protect ? p->scorer->protect(p, budget) : 0;
    bool layerwise = p->scorer->needs & KV_NEED_LAYERWISE;
    if (p->n_par > 1) {
        struct score_job j = {.p = p, .a = a};
        threadpool_run(p->tp, score_worker, &j);
    } else {
        for (int ih = 0; ih < p->n_head_kv; ih++) p->scorer->score(&a, ih, p->score + (size_t)ih * p->cap_max);
    }
    if (layerwise) {
        int32_t n = kv_seq_head(s, il, 0)->n;
        for (int ih = 1; ih < p->n_head_kv; ih++) KVS_ASSERT(kv_seq_head(s, il, ih)->n == n);
        layer_scores(p, n);
    }
    if (s->pin > 0) /* pinned positions (a system prompt) always win their head's ranking */
        for (int ih = 0; ih < p->n_head_kv; ih++) {
            const struct kv_head_store *h = kv_seq_head(s, il, ih);
            float *sc = p->score + (size_t)ih * p->cap_max;
            for (int32_t j = 0; j < h->n && h->pos[j] < s->pin; j++) sc[j] = INFINITY;
        }
    if (p->spec.mikv_low) { /* rank the fp16 entries; the losers are demoted, not evicted */
        for (int ih = 0; ih < p->n_head_kv; ih++) {
            const struct kv_head_store *h = kv_seq_head(s, il, ih);
            int32_t n = h->n, nc = h->nc, *keep = p->keep + (size_t)ih * p->cap_max;
            uint8_t *dem = p->dem + (size_t)ih * p->cap_max;
            int32_t nk = select_head(p->score + (size_t)ih * p->cap_max + nc, n - nc, budget, prot,
                                     p->order, keep + nc);
            memset(dem, 1, (size_t)n);
            for (int32_t i = 0; i < nk; i++) dem[nc + keep[nc + i]] = 0;
            for (int32_t j = 0; j < n; j++) keep[j] = j;
            plan->keep[ih] = keep, plan->n_keep[ih] = n, plan->dem[ih] = dem;
        }
        return true;
    }
    if (p->spec.merge == KV_MERGE_KVMERGER) {
        for (int ih = 0; ih < p->n_head_kv; ih++) {
            size_t o = (size_t)ih * p->cap_max;
            plan->n_keep[ih] = kv_kvmerger_head(p, s, il, ih, p->score + o, budget, prot,
                                                p->keep + o, p->mt + o, p->mc + o);
            plan->keep[ih] = p->keep + o, plan->mt[ih] = p->mt + o, plan->mc[ih] = p->mc + o;
        }
        return true;
    }
    if (p->spec.alloc == KV_ALLOC_ADAKV && !layerwise) {
        plan_adakv(p, s, il, budget, prot, plan);
    } else {
        for (int ih = 0; ih < p->n_head_kv; ih++) {
            int32_t n = kv_seq_head(s, il, ih)->n;
            int32_t *keep = p->keep + (size_t)ih * p->cap_max;
            plan->n_keep[ih] = select_head(p->score + (size_t)ih * p->cap_max, n, budget, prot,
                                           p->order, keep);
            plan->keep[ih] = keep;
        }
    }
    if (p->spec.merge != KV_MERGE_NONE) kv_merge_plan(p, s, il, plan);
    if (!decode) s->pstate[(size_t)il * KV_PSTATE + 1] = (float)plan->n_keep[0];
    return true;
}

bool kv_policy_over(const struct kv_policy *p, int il, int64_t n_seen, int32_t slack, int32_t n) {
    return p->plan_always || n > kv_policy_budget(p, il, n_seen) + slack;
}

bool kv_policy_plan_scored(struct kv_policy *p, int il, int64_t n_seen, int32_t slack, const int32_t *n,
                           const int32_t *const *pos, int32_t pin, struct kv_plan *plan) {
    KVS_ASSERT(kv_policy_scored_elsewhere(&p->spec));
    int32_t budget = kv_policy_budget(p, il, n_seen);
    p->planned = budget;
    bool over = p->plan_always;
    for (int ih = 0; ih < p->n_head_kv; ih++) over = over || n[ih] > budget + slack;
    plan_evict_only(plan);
    if (!over) return false;
    int32_t prot = p->scorer->protect ? p->scorer->protect(p, budget) : 0;
    if (p->scorer->needs & KV_NEED_LAYERWISE) {
        for (int ih = 1; ih < p->n_head_kv; ih++) KVS_ASSERT(n[ih] == n[0]);
        layer_scores(p, n[0]);
    }
    for (int ih = 0; ih < p->n_head_kv; ih++) {
        float *sc = p->score + (size_t)ih * p->cap_max;
        for (int32_t j = 0; j < n[ih] && pin > 0 && pos[ih][j] < pin; j++) sc[j] = INFINITY;
        int32_t *keep = p->keep + (size_t)ih * p->cap_max;
        plan->n_keep[ih] = select_head(sc, n[ih], budget, prot, p->order, keep);
        plan->keep[ih] = keep;
    }
    p->n_plans++;
    return true;
}

enum kv_score_src kv_policy_score_src(const struct kv_spec *sp) {
    if (sp->merge != KV_MERGE_NONE || sp->mikv_low || sp->think || sp->kivi_bits || sp->wattn ||
        (sp->alloc != KV_ALLOC_UNIFORM && sp->alloc != KV_ALLOC_PYRAMID))
        return KV_SRC_NONE;
    switch (sp->method) {
    case KV_SNAPKV: return KV_SRC_WINDOW;
    case KV_TOVA: return KV_SRC_LAST;
    case KV_H2O: return KV_SRC_ACC;
    case KV_STREAMING:
    case KV_RANDOM: return KV_SRC_POS;
    case KV_KNORM: return KV_SRC_KNORM;
    default: return KV_SRC_NONE;
    }
}

bool kv_policy_scored_elsewhere(const struct kv_spec *sp) { return kv_policy_score_src(sp) != KV_SRC_NONE; }

void kv_policy_score_pos(const struct kv_policy *p, int il, int ih, const int32_t *pos, int32_t n, float *out) {
    KVS_ASSERT(p->scorer->score_pos);
    p->scorer->score_pos(p, il, ih, pos, n, out);
}

/* AdaKV: each head keeps its protected tail and floor x budget of its best entries; the rest of
 * the layer's n_head_kv x budget slots go to the best remaining entries of any head. */
static int cmp_ent(const void *a, const void *b) {
    const struct ent *x = a, *y = b;
    if (x->s != y->s) return x->s > y->s ? -1 : 1;
    if (x->j != y->j) return x->j > y->j ? -1 : 1;
    return x->ih < y->ih ? -1 : 1;
}

static bool plan_adakv(struct kv_policy *p, const struct kv_seq *s, int il, int32_t budget,
                       int32_t prot, struct kv_plan *plan) {
    int32_t floor_n = (int32_t)(p->spec.adakv_floor * budget);
    if (floor_n < prot) floor_n = prot < budget ? prot : budget;
    int32_t remaining = budget * p->n_head_kv, n_pool = 0, nk[KV_VIEW_MAX_HEADS];
    struct ent *pool = p->pool;
    for (int ih = 0; ih < p->n_head_kv; ih++) {
        int32_t n = kv_seq_head(s, il, ih)->n;
        float *sc = p->score + (size_t)ih * p->cap_max;
        int32_t *keep = p->keep + (size_t)ih * p->cap_max;
        for (int32_t j = n - (prot < n ? prot : n); j < n; j++) sc[j] = INFINITY;
        for (int32_t j = 0; j < n; j++) keep[j] = j;
        g_sort_score = sc;
        qsort(keep, (size_t)n, sizeof *keep, cmp_desc); /* best first */
        nk[ih] = floor_n < n ? floor_n : n;
        remaining -= nk[ih];
        for (int32_t j = nk[ih]; j < n; j++) pool[n_pool++] = (struct ent){sc[keep[j]], ih, keep[j]};
    }
    qsort(pool, (size_t)n_pool, sizeof *pool, cmp_ent);
    for (int32_t i = 0; i < remaining && i < n_pool; i++) {
        int ih = pool[i].ih;
        p->keep[(size_t)ih * p->cap_max + nk[ih]++] = pool[i].j;
    }
    for (int ih = 0; ih < p->n_head_kv; ih++) {
        int32_t *keep = p->keep + (size_t)ih * p->cap_max;
        qsort(keep, (size_t)nk[ih], sizeof *keep, cmp_i32);
        plan->keep[ih] = keep;
        plan->n_keep[ih] = nk[ih];
    }
    return true;
}
