/* merge.c — the merging methods: their scorers and the merge action (DESIGN.md §2: entries that
 * lose are folded into kept entries; an entry's weight counts the tokens it stands for). Method
 * notes, with the choices made where the papers are silent, are in shared/methods/:
 *  - D2O (Wan et al., arXiv 2406.13035; d2o.md): H2O scores with the first `sinks` entries
 *    pinned; layer budgets from the variance of accumulated attention (alloc=d2o: softmax(-sigma)
 *    over layers, clamped to [0.01, 1] of the tokens seen, layers 0, 1, L-1 uncompressed); every
 *    evicted entry e finds its most similar kept key c (cosine u_e); it is merged when u_e
 *    clears the threshold tau, an EMA over calls per (sequence, layer): tau = mean(u) on the first
 *    call, then alpha tau + beta mean(u) (thr=X fixes tau). Paper-form weights:
 *    w_e = exp(u_e) / (sum exp(u_e') + e), w_c = e / (sum exp(u_e') + e). [D] decided per KV head
 *    (the reference averages u over heads at one slot index).
 *  - EMS (Li et al., arXiv 2412.08521; ems.md, a reconstruction): global score = accumulated
 *    attention / the number of queries that could see the entry (t - p_j), local score = the
 *    last `window` queries' attention; GL = max of the two, each min-max normalised. Kept
 *    entries are centres; a loser whose best cosine to a centre is >= thr (0.5) is merged with
 *    GL-proportional weights and the centre's key norm preserved; the rest go to the zero class
 *    (evicted). Head-adaptive budgets (alloc=adakv) by default.
 *  - KVMerger (Wang et al., arXiv 2407.08454; kvmerger.md): outside the sinks and the recent
 *    window, maximal runs of adjacent entries whose neighbouring keys have cosine >= thr (0.75)
 *    are merging sets; each collapses into its pivot (the member with the most accumulated
 *    attention) with Gaussian-kernel weights g_i = exp(-|k_p - k_i|^2 / (2 sigma^2)), sigma^2 =
 *    the mean squared pivot distance. Sets are merged most similar first, only while the head is
 *    over budget; then H2O eviction (merged pivots score the sum of their members) brings it to
 *    the budget. A set whose pivot is evicted is evicted whole.
 *  - Elastic Cache (Liu et al., arXiv 2407.18121; elastic-cache.md): importance = accumulated
 *    attention averaged over the layer's heads (one anchor set per layer), the first `sinks`
 *    entries and the newest one protected; every non-anchor is merged into the anchor nearest in
 *    position (ties to the earlier) as a plain mean; while decoding, plan_elastic_decode in
 *    kv_policy.c evicts at the fixed slot.
 * Cosines are computed with the fp16 attention kernel over the head's keys (packed entries
 * dequantized first), so a merge over n entries costs one n x n_evicted dot-product pass.
 */
#include "kv_policy.h"
#include "ops.h"
#include "quant.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- scorers ------------------------------------------------------------------------------ */

static void score_acc_sinks(const struct kv_score_args *a, int ih, float *out) {
    const struct kv_head_store *h = kv_seq_head(a->s, a->il, ih);
    for (int32_t j = 0; j < h->n; j++) out[j] = h->pos[j] < a->p->spec.sinks ? INFINITY : h->acc[j];
}

static int32_t protect_recent(const struct kv_policy *p, int32_t budget) {
    return (int32_t)(p->spec.recent * budget + 0.5f);
}

static void minmax(float *x, int32_t n) {
    float lo = INFINITY, hi = -INFINITY;
    for (int32_t j = 0; j < n; j++) lo = x[j] < lo ? x[j] : lo, hi = x[j] > hi ? x[j] : hi;
    float d = hi - lo;
    for (int32_t j = 0; j < n; j++) x[j] = d > 0 ? (x[j] - lo) / d : 0.0f;
}

static void score_ems(const struct kv_score_args *a, int ih, float *out) {
    const struct kv_head_store *h = kv_seq_head(a->s, a->il, ih);
    int32_t n = h->n;
    float *loc = a->scratch + (size_t)(a->p->n_head / a->p->n_head_kv) * a->p->cap_max; /* agg row */
    kv_score_query_attention(a, ih, false, out);
    /* local part in out; the global part goes through a copy (the agg row is free again) */
    for (int32_t j = 0; j < n; j++) loc[j] = out[j];
    for (int32_t j = 0; j < n; j++) {
        double seen = (double)(a->n_seen - h->pos[j]);
        out[j] = (float)(h->acc[j] / (seen > 1 ? seen : 1));
    }
    minmax(out, n);
    minmax(loc, n);
    for (int32_t j = 0; j < n; j++) {
        out[j] = out[j] > loc[j] ? out[j] : loc[j];
        if (h->pos[j] < a->p->spec.sinks) out[j] = INFINITY;
    }
}

static int32_t protect_window(const struct kv_policy *p, int32_t budget) {
    return p->spec.obs_window < budget ? p->spec.obs_window : budget;
}

static int32_t protect_last(const struct kv_policy *p, int32_t budget) {
    (void)p;
    return budget > 0 ? 1 : 0;
}

const struct kv_scorer_i kv_scorer_d2o = {
    .api_version = KV_POLICY_API_VERSION, .method = KV_D2O, .needs = KV_NEED_ACC,
    .score = score_acc_sinks, .protect = protect_recent};
const struct kv_scorer_i kv_scorer_kvmerger = {
    .api_version = KV_POLICY_API_VERSION, .method = KV_KVMERGER, .needs = KV_NEED_ACC,
    .score = score_acc_sinks, .protect = protect_recent};
const struct kv_scorer_i kv_scorer_ems = {
    .api_version = KV_POLICY_API_VERSION, .method = KV_EMS,
    .needs = KV_NEED_ACC | KV_NEED_QUERIES, .score = score_ems, .protect = protect_window};
const struct kv_scorer_i kv_scorer_elastic = {
    .api_version = KV_POLICY_API_VERSION, .method = KV_ELASTIC,
    .needs = KV_NEED_ACC | KV_NEED_LAYERWISE, .score = score_acc_sinks, .protect = protect_last};

/* ---- D2O layer budgets -------------------------------------------------------------------- */

static double layer_sigma(const struct kv_policy *p, const struct kv_seq *s, int il) {
    double v[KV_VIEW_MAX_HEADS], lo = INFINITY, hi = -INFINITY, sum = 0;
    for (int ih = 0; ih < p->n_head_kv; ih++) {
        const struct kv_head_store *h = kv_seq_head(s, il, ih);
        double m = 0, q = 0;
        for (int32_t j = 0; j < h->n; j++) m += h->acc ? h->acc[j] : 0;
        m /= h->n > 0 ? h->n : 1;
        for (int32_t j = 0; j < h->n; j++) {
            double d = (h->acc ? h->acc[j] : 0) - m;
            q += d * d;
        }
        v[ih] = h->n > 0 ? q / h->n : 0;
        lo = v[ih] < lo ? v[ih] : lo, hi = v[ih] > hi ? v[ih] : hi;
    }
    for (int ih = 0; ih < p->n_head_kv; ih++) sum += (v[ih] - lo) / (hi - lo + 1e-6);
    return sum / p->n_head_kv;
}

double kv_d2o_layer_factor(const struct kv_policy *p, const struct kv_seq *s, int il) {
    /* w_l = softmax_l(-sigma_l); factor = w_l * L (1 when all layers are alike) */
    double z = 0, mine = 0;
    for (int l = 0; l < p->n_layer; l++) {
        double e = exp(-layer_sigma(p, s, l));
        z += e;
        if (l == il) mine = e;
    }
    return z > 0 ? mine / z * p->n_layer : 1.0;
}

/* ---- similarity --------------------------------------------------------------------------- */

/* the head's keys as fp16 rows (packed ones dequantized) and their norms */
static uint16_t *head_keys(const struct kv_seq *s, int il, int ih, float *norm) {
    const struct kv_head_store *h = kv_seq_head(s, il, ih);
    int hd = s->owner->head_dim;
    uint16_t *K = malloc((size_t)(h->n ? h->n : 1) * hd * 2);
    KVS_ASSERT(K);
    float x[512];
    for (int32_t j = 0; j < h->n; j++) {
        if (j < h->nc) {
            kv_seq_key(s, il, ih, j, x);
            quant_f32_to_f16_row(x, K + (size_t)j * hd, hd);
        } else {
            memcpy(K + (size_t)j * hd, h->k + (size_t)(j - h->nc) * hd, (size_t)hd * 2);
        }
        quant_f16_to_f32_row(K + (size_t)j * hd, x, hd);
        double ss = 0;
        for (int d = 0; d < hd; d++) ss += (double)x[d] * x[d];
        norm[j] = (float)sqrt(ss);
    }
    return K;
}

/* For every entry e with is_src[e]: its most similar target (cosine) among entries with
 * is_tgt[]; best[e] (u) and arg[e] (-1 if no target). Keys are normalised to unit length
 * first, so one fp16 dot-product pass over the targets gives the cosines. */
static void best_match(const uint16_t *K, const float *norm, int32_t n, int hd, const uint8_t *is_src,
                       const uint8_t *is_tgt, float *best, int32_t *arg) {
    enum { B = 32 };
    int32_t nt = 0;
    for (int32_t c = 0; c < n; c++) nt += is_tgt[c] != 0;
    size_t ntz = (size_t)(nt > 0 ? nt : 1);
    uint16_t *T = malloc(ntz * (size_t)hd * 2);
    int32_t *tid = malloc(sizeof(int32_t) * ntz);
    float *Q = malloc(sizeof(float) * B * (size_t)hd), *S = malloc(sizeof(float) * B * ntz);
    float *x = malloc(sizeof(float) * (size_t)hd);
    int32_t idx[B];
    KVS_ASSERT(T && tid && Q && S && x);
    for (int32_t c = 0, i = 0; c < n; c++) {
        if (!is_tgt[c]) continue;
        quant_f16_to_f32_row(K + (size_t)c * hd, x, hd);
        float inv = norm[c] > 0 ? 1.0f / norm[c] : 0.0f;
        for (int d = 0; d < hd; d++) x[d] *= inv;
        quant_f32_to_f16_row(x, T + (size_t)i * hd, hd);
        tid[i++] = c;
    }
    for (int32_t e0 = 0; e0 < n;) {
        int nb = 0;
        for (; e0 < n && nb < B; e0++)
            if (is_src[e0]) {
                quant_f16_to_f32_row(K + (size_t)e0 * hd, Q + (size_t)nb * hd, hd);
                float inv = norm[e0] > 0 ? 1.0f / norm[e0] : 0.0f;
                for (int d = 0; d < hd; d++) Q[(size_t)nb * hd + d] *= inv;
                idx[nb++] = e0;
            }
        if (!nb) break;
        if (nt > 0) ops_attn_scores(Q, nb, T, nt, hd, 1.0f, S, nt);
        for (int b = 0; b < nb; b++) {
            int32_t e = idx[b], am = -1;
            float bm = -INFINITY;
            for (int32_t i = 0; i < nt; i++) {
                float u = S[(size_t)b * nt + i];
                if (u > bm) bm = u, am = tid[i];
            }
            best[e] = am >= 0 ? bm : -INFINITY;
            arg[e] = am;
        }
    }
    free(T), free(tid), free(Q), free(S), free(x);
}

/* ---- the merge action after selection (d2o, ems, elastic) ---------------------------------- */

void kv_merge_plan(struct kv_policy *p, struct kv_seq *s, int il, struct kv_plan *plan) {
    int hd = p->head_dim;
    enum kv_merge mode = p->spec.merge;
    /* D2O's threshold is shared by the layer's heads: first find every head's matches */
    int32_t nmax = 0;
    for (int ih = 0; ih < p->n_head_kv; ih++) {
        int32_t n = kv_seq_head(s, il, ih)->n;
        nmax = n > nmax ? n : nmax;
    }
    size_t N = (size_t)(nmax ? nmax : 1);
    float *best = malloc(sizeof(float) * N * p->n_head_kv), *norm = malloc(sizeof(float) * N);
    int32_t *arg = malloc(sizeof(int32_t) * N * p->n_head_kv);
    uint8_t *kept = malloc(N), *lost = malloc(N);
    KVS_ASSERT(best && norm && arg && kept && lost);
    double usum = 0;
    int64_t ucnt = 0;
    for (int ih = 0; ih < p->n_head_kv; ih++) {
        const struct kv_head_store *h = kv_seq_head(s, il, ih);
        int32_t n = h->n, *mt = p->mt + (size_t)ih * p->cap_max;
        float *mc = p->mc + (size_t)ih * p->cap_max, *bh = best + (size_t)ih * N;
        int32_t *ah = arg + (size_t)ih * N;
        memset(kept, 0, (size_t)n);
        for (int32_t i = 0; i < plan->n_keep[ih]; i++) kept[plan->keep[ih][i]] = 1;
        for (int32_t j = 0; j < n; j++) lost[j] = !kept[j], mt[j] = -1, mc[j] = 1.0f, bh[j] = -INFINITY, ah[j] = -1;
        plan->mt[ih] = mt, plan->mc[ih] = mc;
        if (mode == KV_MERGE_ELASTIC) { /* nearest anchor by position, ties to the earlier */
            int32_t prev = -1;
            for (int32_t j = 0; j < n; j++) {
                if (kept[j]) { prev = j; continue; }
                int32_t next = j + 1;
                while (next < n && !kept[next]) next++;
                int32_t t = prev;
                if (next < n && (prev < 0 || h->pos[next] - h->pos[j] < h->pos[j] - h->pos[prev])) t = next;
                ah[j] = t;
            }
            continue;
        }
        uint16_t *K = head_keys(s, il, ih, norm);
        best_match(K, norm, n, hd, lost, kept, bh, ah);
        free(K);
        for (int32_t j = 0; j < n; j++)
            if (lost[j] && ah[j] >= 0) usum += bh[j], ucnt++;
    }
    float tau = p->spec.thr;
    if (mode == KV_MERGE_D2O && isnan(tau)) {
        float *st = s->pstate + (size_t)il * KV_PSTATE;
        double mean = ucnt ? usum / (double)ucnt : 0;
        st[0] = st[2] == 0 ? (float)mean : p->spec.d2o_alpha * st[0] + p->spec.d2o_beta * (float)mean;
        st[2] = 1;
        tau = st[0];
    }
    for (int ih = 0; ih < p->n_head_kv; ih++) {
        const struct kv_head_store *h = kv_seq_head(s, il, ih);
        int32_t n = h->n, *mt = plan->mt[ih], *ah = arg + (size_t)ih * N;
        float *mc = plan->mc[ih], *bh = best + (size_t)ih * N, *den = norm; /* reuse: per target */
        for (int32_t j = 0; j < n; j++) den[j] = 0.0f;
        for (int32_t j = 0; j < n; j++) {
            if (ah[j] < 0) continue;
            if (mode != KV_MERGE_ELASTIC && !(bh[j] >= tau)) continue;
            mt[j] = ah[j];
        }
        /* coefficients: per target, normalise the members' raw weights */
        float *raw = bh; /* the cosine is no longer needed once mt is set */
        for (int32_t j = 0; j < n; j++) {
            if (mt[j] < 0) continue;
            if (mode == KV_MERGE_D2O) raw[j] = expf(bh[j]);
            else if (mode == KV_MERGE_EMS) {
                float sj = p->score[(size_t)ih * p->cap_max + j];
                raw[j] = (isfinite(sj) ? sj : 1.0f) + 1e-6f;
            }
            else raw[j] = 1.0f;
            den[mt[j]] += raw[j];
        }
        for (int32_t c = 0; c < n; c++) {
            if (den[c] == 0.0f) continue;
            float sc_c = p->score[(size_t)ih * p->cap_max + c];
            /* EMS: a centre pinned with +inf (sink, protected window) weighs as a full score */
            float self = mode == KV_MERGE_D2O ? expf(1.0f)
                       : mode == KV_MERGE_EMS ? (isfinite(sc_c) ? sc_c : 1.0f) + 1e-6f
                       : 1.0f;
            den[c] += self;
            mc[c] = self / den[c];
        }
        for (int32_t j = 0; j < n; j++)
            if (mt[j] >= 0) mc[j] = raw[j] / den[mt[j]];
    }
    plan->renorm = mode == KV_MERGE_EMS;
    free(best), free(norm), free(arg), free(kept), free(lost);
}

/* ---- KVMerger ------------------------------------------------------------------------------ */

struct kset { int32_t a, b; float sim; }; /* entries a..b (inclusive), mean adjacent cosine */
static int cmp_kset(const void *x, const void *y) {
    const struct kset *s = x, *t = y;
    if (s->sim != t->sim) return s->sim > t->sim ? -1 : 1;
    return (s->a > t->a) - (s->a < t->a);
}
static _Thread_local const float *g_ks;
static int cmp_desc_k(const void *x, const void *y) {
    int32_t i = *(const int32_t *)x, j = *(const int32_t *)y;
    if (g_ks[i] != g_ks[j]) return g_ks[i] > g_ks[j] ? -1 : 1;
    return i > j ? -1 : 1;
}
static int cmp_i32k(const void *x, const void *y) {
    int32_t i = *(const int32_t *)x, j = *(const int32_t *)y;
    return (i > j) - (i < j);
}

int32_t kv_kvmerger_head(struct kv_policy *p, const struct kv_seq *s, int il, int ih,
                         const float *score, int32_t budget, int32_t prot, int32_t *keep,
                         int32_t *mt, float *mc) {
    const struct kv_head_store *h = kv_seq_head(s, il, ih);
    int32_t n = h->n, hd = p->head_dim;
    for (int32_t j = 0; j < n; j++) mt[j] = -1, mc[j] = 1.0f;
    if (n <= budget) {
        for (int32_t j = 0; j < n; j++) keep[j] = j;
        return n;
    }
    if (prot > budget) prot = budget;
    int32_t lo = 0, hi = n - prot; /* mergeable: not a sink, not in the recent window */
    while (lo < hi && h->pos[lo] < p->spec.sinks) lo++;
    float *norm = malloc(sizeof(float) * (size_t)n), *x = malloc(sizeof(float) * (size_t)hd * 2);
    float *sc = malloc(sizeof(float) * (size_t)n), *adj = malloc(sizeof(float) * (size_t)n);
    struct kset *sets = malloc(sizeof *sets * (size_t)n);
    uint8_t *gone = calloc((size_t)n, 1);
    KVS_ASSERT(norm && x && sc && adj && sets && gone);
    uint16_t *K = head_keys(s, il, ih, norm);
    float *y = x + hd;
    for (int32_t j = lo; j + 1 < hi; j++) {
        quant_f16_to_f32_row(K + (size_t)j * hd, x, hd);
        quant_f16_to_f32_row(K + (size_t)(j + 1) * hd, y, hd);
        double d = 0;
        for (int c = 0; c < hd; c++) d += (double)x[c] * y[c];
        double den = (double)norm[j] * norm[j + 1];
        adj[j] = den > 0 ? (float)(d / den) : 0.0f;
    }
    int32_t ns = 0;
    for (int32_t j = lo; j + 1 < hi;) {
        if (!(adj[j] >= p->spec.thr)) { j++; continue; }
        int32_t a = j;
        double sum = 0;
        while (j + 1 < hi && adj[j] >= p->spec.thr) sum += adj[j], j++;
        sets[ns++] = (struct kset){a, j, (float)(sum / (j - a))};
        j++;
    }
    qsort(sets, (size_t)ns, sizeof *sets, cmp_kset);
    for (int32_t j = 0; j < n; j++) sc[j] = score[j];
    int32_t held = n;
    for (int32_t si = 0; si < ns && held > budget; si++) {
        int32_t a = sets[si].a, b = sets[si].b, pv = a;
        for (int32_t j = a; j <= b; j++) if (score[j] > score[pv]) pv = j;
        quant_f16_to_f32_row(K + (size_t)pv * hd, x, hd);
        double var = 0;
        for (int32_t j = a; j <= b; j++) {
            quant_f16_to_f32_row(K + (size_t)j * hd, y, hd);
            double d2 = 0;
            for (int c = 0; c < hd; c++) d2 += (double)(x[c] - y[c]) * (x[c] - y[c]);
            adj[j] = (float)d2; /* reuse: squared pivot distance */
            var += d2;
        }
        var = var / (b - a + 1) + 1e-12;
        double z = 0;
        for (int32_t j = a; j <= b; j++) z += exp(-adj[j] / (2 * var));
        float acc = 0;
        for (int32_t j = a; j <= b; j++) {
            mc[j] = (float)(exp(-adj[j] / (2 * var)) / z);
            acc += score[j];
            if (j != pv) mt[j] = pv, gone[j] = 1;
        }
        sc[pv] = acc;
        held -= b - a;
    }
    /* H2O eviction among what is left: protected tail + best of the rest */
    int32_t cand = 0, nk = 0, take = budget - prot;
    for (int32_t j = 0; j < n - prot; j++) if (!gone[j]) p->order[cand++] = j;
    g_ks = sc;
    qsort(p->order, (size_t)cand, sizeof *p->order, cmp_desc_k);
    if (take > cand) take = cand;
    for (int32_t i = 0; i < take; i++) keep[nk++] = p->order[i];
    qsort(keep, (size_t)nk, sizeof *keep, cmp_i32k);
    for (int32_t j = n - prot; j < n; j++) keep[nk++] = j;
    /* sets whose pivot was evicted go with it */
    memset(gone, 0, (size_t)n);
    for (int32_t i = 0; i < nk; i++) gone[keep[i]] = 1; /* now: kept */
    for (int32_t j = 0; j < n; j++) {
        if (mt[j] >= 0 && !gone[mt[j]]) mt[j] = -1;
        if (!gone[j] && mt[j] < 0) mc[j] = 1.0f;
    }
    /* a kept pivot whose members were all dropped keeps its own key unchanged */
    for (int32_t j = 0; j < n; j++) norm[j] = 0.0f;
    for (int32_t j = 0; j < n; j++) if (mt[j] >= 0) norm[mt[j]] = 1.0f;
    for (int32_t j = 0; j < n; j++) if (gone[j] && norm[j] == 0.0f) mc[j] = 1.0f;
    free(K), free(norm), free(x), free(sc), free(adj), free(sets), free(gone);
    return nk;
}
