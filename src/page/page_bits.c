/* page_bits.c — the predicted bits of page.h: ground truth (Belady discard labels, k-phase
 * labels), corruption (seeded flips, inversion) and the online predictor from reuse distances. */
#include "page/page.h"
#include "page/page_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum kvs_status page_label_discard(struct page_req *trace, size_t n, int64_t k, int64_t *opt_faults) {
    struct page_cfg cfg = {.kind = PAGE_OPT, .capacity = k, .trace = trace, .n_trace = n};
    struct page_cache *c;
    enum kvs_status st = page_cache_new(&cfg, &c);
    if (st != KVS_OK) return st;
    struct pmap last; /* page -> position of its most recent request */
    if (!pmap_init(&last, 64)) {
        page_cache_free(c);
        return kvs_fail(KVS_ERR_NOMEM, "label: out of memory");
    }
    for (size_t i = 0; i < n; i++) trace[i].bit = 0;
    for (size_t i = 0; i < n && st == KVS_OK; i++) {
        struct page_result r;
        st = page_access(c, &trace[i], &r);
        if (st != KVS_OK) break;
        if (r.evicted) {
            int64_t j = pmap_get(&last, r.victim);
            KVS_ASSERT(j >= 0);
            trace[j].bit = 1;
        }
        if (!pmap_put(&last, trace[i].page, (int64_t)i)) st = kvs_fail(KVS_ERR_NOMEM, "label: out of memory");
    }
    if (st == KVS_OK && opt_faults) *opt_faults = c->faults;
    pmap_free(&last);
    page_cache_free(c);
    return st;
}

enum kvs_status page_label_phase(struct page_req *trace, size_t n, int64_t k, int64_t *n_phases) {
    if (k < 1) return kvs_fail(KVS_ERR_INVALID_ARG, "label: capacity %lld < 1", (long long)k);
    int64_t *ph = malloc((n ? n : 1) * sizeof *ph);
    struct pmap m; /* forward: page -> phase of its latest request; backward: page -> slot */
    if (!ph || !pmap_init(&m, 64)) {
        free(ph);
        return kvs_fail(KVS_ERR_NOMEM, "label: out of memory");
    }
    enum kvs_status st = KVS_OK;
    int64_t phase = 0, distinct = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t f = pmap_get(&m, trace[i].page);
        if (f != phase) { /* a page new to this phase */
            if (distinct == k) phase++, distinct = 0;
            distinct++;
        }
        ph[i] = phase;
        if (!pmap_put(&m, trace[i].page, phase)) { st = kvs_fail(KVS_ERR_NOMEM, "label: out of memory"); break; }
    }
    if (n_phases) *n_phases = n ? phase + 1 : 0;
    /* backward: per page, the phase of its earliest request seen so far (cur) and the earliest
     * phase after cur in which it is requested (nxt) */
    int64_t *cur = NULL, *nxt = NULL;
    if (st == KVS_OK) {
        size_t np = m.n;
        pmap_free(&m);
        cur = malloc((np ? np : 1) * sizeof *cur);
        nxt = malloc((np ? np : 1) * sizeof *nxt);
        if (!cur || !nxt || !pmap_init(&m, np)) st = kvs_fail(KVS_ERR_NOMEM, "label: out of memory");
    }
    int64_t used = 0;
    for (size_t i = n; st == KVS_OK && i-- > 0;) {
        int64_t s = pmap_get(&m, trace[i].page);
        if (s < 0) {
            s = used++;
            pmap_put_nogrow(&m, trace[i].page, s);
            cur[s] = ph[i];
            nxt[s] = -1;
        } else if (cur[s] != ph[i]) {
            nxt[s] = cur[s];
            cur[s] = ph[i];
        }
        trace[i].bit = nxt[s] != ph[i] + 1;
    }
    free(cur), free(nxt), free(ph);
    pmap_free(&m);
    return st;
}

enum kvs_status page_flip_bits(struct page_req *trace, size_t n, double frac, uint64_t seed) {
    if (!(frac >= 0 && frac <= 1)) return kvs_fail(KVS_ERR_INVALID_ARG, "flip fraction %g not in [0, 1]", frac);
    size_t m = (size_t)llround(frac * (double)n);
    if (m > n) m = n;
    if (m == 0) return KVS_OK;
    size_t *idx = malloc(n * sizeof *idx);
    if (!idx) return kvs_fail(KVS_ERR_NOMEM, "flip: out of memory");
    for (size_t i = 0; i < n; i++) idx[i] = i;
    uint64_t rng = seed;
    for (size_t i = 0; i < m; i++) { /* partial Fisher-Yates: idx[0..m) is a uniform m-subset */
        size_t j = i + (size_t)page_rng_below(&rng, n - i);
        size_t t = idx[i];
        idx[i] = idx[j];
        idx[j] = t;
        trace[idx[i]].bit ^= 1;
    }
    free(idx);
    return KVS_OK;
}

void page_invert_bits(struct page_req *trace, size_t n) {
    for (size_t i = 0; i < n; i++) trace[i].bit ^= 1;
}

/* ---------------- online predictor ----------------
 * The stack distance of a reuse at time t of a page last requested at time s is the number of
 * distinct pages requested in (s, t): with a Fenwick tree over times holding a 1 at the latest
 * request time of every page, it is the count of ones in (s, t). */

struct page_predictor {
    int64_t k;
    struct pmap map; /* page -> dense index */
    int64_t *last;   /* per dense index: time of the latest request */
    double *dist;    /* per dense index: smoothed stack distance, < 0 before the first reuse */
    size_t n_pages, cap_pages;
    int32_t *fen;    /* Fenwick tree over times 1..cap_t */
    uint8_t *mark;   /* 1 at the latest request time of some page */
    size_t cap_t, t;
};

static void fen_add(int32_t *f, size_t cap, size_t i, int32_t v) {
    for (; i <= cap; i += i & (0 - i)) f[i] += v;
}
static int64_t fen_sum(const int32_t *f, size_t i) { /* ones in [1, i] */
    int64_t s = 0;
    for (; i > 0; i -= i & (0 - i)) s += f[i];
    return s;
}

static int cmp_pair(const void *a, const void *b) {
    int64_t x = ((const int64_t *)a)[0], y = ((const int64_t *)b)[0];
    return (x > y) - (x < y);
}

/* The time axis is full: renumber the latest request times of the pages 1..m in their order
 * (stack distances only count marks between two times, so they are unchanged) and size the axis
 * to 4m (at least 1024). Memory stays O(distinct pages), however long the predictor runs. */
static enum kvs_status compact(struct page_predictor *p) {
    size_t m = p->n_pages, nc = 4 * m > 1024 ? 4 * m : 1024;
    int64_t *pr = malloc((m ? m : 1) * 2 * sizeof *pr);
    int32_t *f = calloc(nc + 1, sizeof *f);
    uint8_t *mk = calloc(nc + 1, 1);
    if (!pr || !f || !mk) {
        free(pr), free(f), free(mk);
        return kvs_fail(KVS_ERR_NOMEM, "predictor: out of memory");
    }
    for (size_t i = 0; i < m; i++) pr[2 * i] = p->last[i], pr[2 * i + 1] = (int64_t)i;
    qsort(pr, m, 2 * sizeof *pr, cmp_pair);
    for (size_t r = 0; r < m; r++) {
        p->last[pr[2 * r + 1]] = (int64_t)(r + 1);
        mk[r + 1] = 1;
    }
    for (size_t i = 1; i <= nc; i++) { /* O(n) Fenwick build */
        f[i] += mk[i];
        size_t j = i + (i & (0 - i));
        if (j <= nc) f[j] += f[i];
    }
    free(pr), free(p->fen), free(p->mark);
    p->fen = f, p->mark = mk, p->cap_t = nc, p->t = m;
    return KVS_OK;
}

enum kvs_status page_predictor_new(int64_t k, struct page_predictor **out) {
    *out = NULL;
    if (k < 1) return kvs_fail(KVS_ERR_INVALID_ARG, "predictor: capacity %lld < 1", (long long)k);
    struct page_predictor *p = calloc(1, sizeof *p);
    if (!p) return kvs_fail(KVS_ERR_NOMEM, "predictor: out of memory");
    p->k = k;
    p->cap_pages = 64;
    p->cap_t = 1024;
    p->last = malloc(p->cap_pages * sizeof *p->last);
    p->dist = malloc(p->cap_pages * sizeof *p->dist);
    p->fen = calloc(p->cap_t + 1, sizeof *p->fen);
    p->mark = calloc(p->cap_t + 1, 1);
    if (!pmap_init(&p->map, 64) || !p->last || !p->dist || !p->fen || !p->mark) {
        page_predictor_free(p);
        return kvs_fail(KVS_ERR_NOMEM, "predictor: out of memory");
    }
    *out = p;
    return KVS_OK;
}

void page_predictor_free(struct page_predictor *p) {
    if (!p) return;
    if (p->map.keys) pmap_free(&p->map);
    free(p->last), free(p->dist), free(p->fen), free(p->mark);
    free(p);
}

int page_predict(struct page_predictor *p, int64_t page) {
    if (page < 0) {
        kvs_fail(KVS_ERR_INVALID_ARG, "page id %lld is negative", (long long)page);
        return -1;
    }
    if (p->t + 1 > p->cap_t && compact(p) != KVS_OK) return -1;
    size_t t = ++p->t;
    int64_t s = pmap_get(&p->map, page);
    int bit = 1;
    if (s < 0) {
        if (p->n_pages == p->cap_pages) {
            size_t nc = p->cap_pages * 2;
            int64_t *l = realloc(p->last, nc * sizeof *l);
            if (l) p->last = l;
            double *d = realloc(p->dist, nc * sizeof *d);
            if (d) p->dist = d;
            if (!l || !d) {
                p->t--;
                kvs_fail(KVS_ERR_NOMEM, "predictor: out of memory");
                return -1;
            }
            p->cap_pages = nc;
        }
        s = (int64_t)p->n_pages;
        if (!pmap_put(&p->map, page, s)) {
            p->t--;
            kvs_fail(KVS_ERR_NOMEM, "predictor: out of memory");
            return -1;
        }
        p->n_pages++;
        p->dist[s] = -1;
    } else {
        size_t lt = (size_t)p->last[s];
        double sd = (double)(fen_sum(p->fen, t - 1) - fen_sum(p->fen, lt));
        fen_add(p->fen, p->cap_t, lt, -1);
        p->mark[lt] = 0;
        p->dist[s] = p->dist[s] < 0 ? sd : 0.5 * (p->dist[s] + sd);
        bit = p->dist[s] < (double)p->k ? 0 : 1;
    }
    p->last[s] = (int64_t)t;
    p->mark[t] = 1;
    fen_add(p->fen, p->cap_t, t, 1);
    return bit;
}

enum kvs_status page_label_online(struct page_req *trace, size_t n, int64_t k) {
    struct page_predictor *p;
    enum kvs_status st = page_predictor_new(k, &p);
    if (st != KVS_OK) return st;
    for (size_t i = 0; i < n; i++) {
        int b = page_predict(p, trace[i].page);
        if (b < 0) {
            page_predictor_free(p);
            return trace[i].page < 0 ? KVS_ERR_INVALID_ARG : KVS_ERR_NOMEM; /* message set */
        }
        trace[i].bit = (uint8_t)b;
    }
    page_predictor_free(p);
    return KVS_OK;
}
