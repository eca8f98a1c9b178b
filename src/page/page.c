/* page.c — the replacement policies of page.h behind one vtable.
 *
 * LRU, LFU, marking, discard predictions (PAGE_PRED), MARK&PREDICT (PAGE_PHASE) and Belady's
 * optimum share one slot table (`struct slotc`): k slots with the page, its last access time, its
 * in-cache request count, its latest bit, its mark and (optimum) its next request; a hash map
 * from page to slot; victims are chosen by scanning the slots. ARC keeps its four lists (T1, T2
 * and the ghosts B1, B2) in a table of 2k entries ordered by time stamps. PAGE_PRED_ROBUST runs
 * PAGE_PRED and LRU side by side and follows one of them (below). */
#include "page/page.h"
#include "page/page_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *KIND_NAMES[PAGE_KIND_COUNT] = {"lru",  "lfu",       "arc",   "marking",
                                                  "pred", "pred+lru",  "phase", "opt"};

const char *page_kind_name(enum page_kind kind) {
    return (unsigned)kind < PAGE_KIND_COUNT ? KIND_NAMES[kind] : "?";
}

int page_kind_parse(const char *name) {
    for (int i = 0; i < PAGE_KIND_COUNT; i++)
        if (!strcmp(name, KIND_NAMES[i])) return i;
    return -1;
}

static enum kvs_status check_req(const struct page_req *rq) {
    if (rq->page < 0) return kvs_fail(KVS_ERR_INVALID_ARG, "page id %lld is negative", (long long)rq->page);
    if (rq->bit > 1) return kvs_fail(KVS_ERR_INVALID_ARG, "bit %u is not 0 or 1", rq->bit);
    if (rq->size > 1)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "page %lld has size %u: only unit-size pages are supported",
                        (long long)rq->page, rq->size);
    return KVS_OK;
}

/* ---------------- slot-table policies ---------------- */

struct slotc {
    struct page_cache base;
    struct pmap map; /* page -> slot */
    int64_t *page, *last, *freq, *next;
    uint8_t *bit, *mark;
    int64_t clock;
    uint64_t rng;
    /* PAGE_OPT */
    const struct page_req *trace;
    size_t n_trace, pos;
    int64_t *nextuse; /* per trace position: the position of the page's next request, or INT64_MAX */
};

static bool slot_contains(const struct page_cache *c, int64_t page) {
    return pmap_get(&((const struct slotc *)c)->map, page) >= 0;
}

static void slot_destroy(struct page_cache *c) {
    struct slotc *s = (struct slotc *)c;
    pmap_free(&s->map);
    free(s->page), free(s->last), free(s->freq), free(s->next);
    free(s->bit), free(s->mark), free(s->nextuse);
    free(s);
}

/* least recently used slot among those with (bit == want_bit or want_bit < 0) and (unmarked or
 * !need_unmarked); -1 when none */
static int64_t slot_lru_where(const struct slotc *s, int want_bit, bool need_unmarked) {
    int64_t best = -1;
    for (int64_t i = 0; i < s->base.used; i++) {
        if (want_bit >= 0 && s->bit[i] != want_bit) continue;
        if (need_unmarked && s->mark[i]) continue;
        if (best < 0 || s->last[i] < s->last[best]) best = i;
    }
    return best;
}

static int64_t count_unmarked(const struct slotc *s) {
    int64_t n = 0;
    for (int64_t i = 0; i < s->base.used; i++) n += !s->mark[i];
    return n;
}

static void new_phase(struct slotc *s) { memset(s->mark, 0, (size_t)s->base.used); }

/* a uniformly random unmarked slot, starting a new phase first when every page is marked */
static int64_t random_unmarked(struct slotc *s) {
    int64_t nu = count_unmarked(s);
    if (nu == 0) {
        new_phase(s);
        nu = s->base.used;
    }
    int64_t r = (int64_t)page_rng_below(&s->rng, (uint64_t)nu);
    for (int64_t i = 0; i < s->base.used; i++)
        if (!s->mark[i] && r-- == 0) return i;
    KVS_ASSERT(0);
}

static int64_t slot_victim(struct slotc *s) {
    int64_t v = -1;
    switch (s->base.kind) {
    case PAGE_LRU: v = slot_lru_where(s, -1, false); break;
    case PAGE_LFU:
        for (int64_t i = 0; i < s->base.used; i++)
            if (v < 0 || s->freq[i] < s->freq[v] || (s->freq[i] == s->freq[v] && s->last[i] < s->last[v])) v = i;
        break;
    case PAGE_MARKING: v = random_unmarked(s); break;
    case PAGE_PRED:
        /* follow the bits: a page predicted "safe to evict", the least recent first */
        v = slot_lru_where(s, 1, false);
        if (v < 0) {
            /* every cached page claims "keep": at least one bit is wrong. Marking fallback: the
             * least recent unmarked page, after starting a new phase if all are marked. */
            if (count_unmarked(s) == 0) new_phase(s);
            v = slot_lru_where(s, -1, true);
        }
        break;
    case PAGE_PHASE:
        if (count_unmarked(s) == 0) new_phase(s);
        v = slot_lru_where(s, 1, true);
        if (v < 0) v = random_unmarked(s);
        break;
    case PAGE_OPT:
        /* furthest next request; ties (never requested again) to the least recent */
        for (int64_t i = 0; i < s->base.used; i++)
            if (v < 0 || s->next[i] > s->next[v] || (s->next[i] == s->next[v] && s->last[i] < s->last[v])) v = i;
        break;
    default: KVS_ASSERT(0);
    }
    KVS_ASSERT(v >= 0);
    return v;
}

static enum kvs_status slot_access(struct page_cache *c, const struct page_req *rq, struct page_result *res) {
    struct slotc *s = (struct slotc *)c;
    int64_t nxt = INT64_MAX;
    if (c->kind == PAGE_OPT) {
        if (s->pos >= s->n_trace)
            return kvs_fail(KVS_ERR_INVALID_ARG, "opt: request %zu is past the end of its trace (%zu requests)",
                            s->pos + 1, s->n_trace);
        if (s->trace[s->pos].page != rq->page)
            return kvs_fail(KVS_ERR_INVALID_ARG, "opt: request %zu is page %lld, its trace says %lld", s->pos + 1,
                            (long long)rq->page, (long long)s->trace[s->pos].page);
        nxt = s->nextuse[s->pos++];
    }
    res->hit = false, res->evicted = false, res->victim = -1;
    int64_t i = pmap_get(&s->map, rq->page);
    s->clock++;
    if (i >= 0) {
        res->hit = true;
        s->freq[i]++;
    } else {
        c->faults++;
        if (c->used < c->capacity) {
            i = c->used++;
        } else {
            i = slot_victim(s);
            res->evicted = true;
            res->victim = s->page[i];
            pmap_del(&s->map, s->page[i]);
        }
        s->page[i] = rq->page;
        s->freq[i] = 1;
        pmap_put_nogrow(&s->map, rq->page, i); /* sized for k at creation */
    }
    s->last[i] = s->clock;
    s->bit[i] = rq->bit;
    s->mark[i] = 1;
    s->next[i] = nxt;
    return KVS_OK;
}

static const struct page_cache_i SLOT_I = {"slots", slot_access, slot_contains, slot_destroy};

static enum kvs_status slot_new(const struct page_cfg *cfg, struct page_cache **out) {
    struct slotc *s = calloc(1, sizeof *s);
    if (!s) return kvs_fail(KVS_ERR_NOMEM, "page cache: out of memory");
    size_t k = (size_t)cfg->capacity;
    s->base.vt = &SLOT_I;
    s->rng = cfg->seed;
    bool ok = pmap_init(&s->map, k);
    s->page = malloc(k * sizeof(int64_t));
    s->last = malloc(k * sizeof(int64_t));
    s->freq = malloc(k * sizeof(int64_t));
    s->next = malloc(k * sizeof(int64_t));
    s->bit = malloc(k);
    s->mark = malloc(k);
    ok = ok && s->page && s->last && s->freq && s->next && s->bit && s->mark;
    if (ok && cfg->kind == PAGE_OPT) {
        s->trace = cfg->trace;
        s->n_trace = cfg->n_trace;
        s->nextuse = malloc((cfg->n_trace ? cfg->n_trace : 1) * sizeof(int64_t));
        struct pmap seen;
        ok = s->nextuse && pmap_init(&seen, 64);
        for (size_t t = cfg->n_trace; ok && t-- > 0;) {
            int64_t j = pmap_get(&seen, cfg->trace[t].page);
            s->nextuse[t] = j < 0 ? INT64_MAX : j;
            ok = pmap_put(&seen, cfg->trace[t].page, (int64_t)t);
        }
        if (seen.keys) pmap_free(&seen);
    }
    if (!ok) {
        slot_destroy(&s->base);
        return kvs_fail(KVS_ERR_NOMEM, "page cache: out of memory");
    }
    *out = &s->base;
    return KVS_OK;
}

/* ---------------- ARC ---------------- */

enum { ARC_T1, ARC_T2, ARC_B1, ARC_B2 };

struct arc {
    struct page_cache base;
    struct pmap map; /* page -> entry, for T1, T2, B1 and B2 */
    int64_t *page, *stamp;
    uint8_t *list;
    int64_t n_ent; /* entries in use; free entries are taken from the end, holes refilled by the last */
    int64_t len[4];
    double p; /* target size of T1 */
    int64_t clock;
};

static bool arc_contains(const struct page_cache *c, int64_t page) {
    const struct arc *a = (const struct arc *)c;
    int64_t e = pmap_get(&a->map, page);
    return e >= 0 && (a->list[e] == ARC_T1 || a->list[e] == ARC_T2);
}

static void arc_destroy(struct page_cache *c) {
    struct arc *a = (struct arc *)c;
    pmap_free(&a->map);
    free(a->page), free(a->stamp), free(a->list);
    free(a);
}

static int64_t arc_lru(const struct arc *a, int list) {
    int64_t best = -1;
    for (int64_t e = 0; e < a->n_ent; e++)
        if (a->list[e] == list && (best < 0 || a->stamp[e] < a->stamp[best])) best = e;
    KVS_ASSERT(best >= 0);
    return best;
}

static void arc_move(struct arc *a, int64_t e, int list) { /* to the MRU end of `list` */
    a->len[a->list[e]]--;
    a->list[e] = (uint8_t)list;
    a->len[list]++;
    a->stamp[e] = ++a->clock;
}

static void arc_delete(struct arc *a, int64_t e) {
    a->len[a->list[e]]--;
    pmap_del(&a->map, a->page[e]);
    int64_t last = --a->n_ent;
    if (e != last) {
        a->page[e] = a->page[last];
        a->stamp[e] = a->stamp[last];
        a->list[e] = a->list[last];
        pmap_put_nogrow(&a->map, a->page[e], e);
    }
}

/* ARC's REPLACE: demote the LRU page of T1 (to B1) or of T2 (to B2); returns the evicted page */
static int64_t arc_replace(struct arc *a, bool in_b2) {
    int64_t e;
    if (a->len[ARC_T1] >= 1 && ((in_b2 && (double)a->len[ARC_T1] == a->p) || (double)a->len[ARC_T1] > a->p)) {
        e = arc_lru(a, ARC_T1);
        arc_move(a, e, ARC_B1);
    } else {
        e = arc_lru(a, ARC_T2);
        arc_move(a, e, ARC_B2);
    }
    return a->page[e];
}

static enum kvs_status arc_access(struct page_cache *c, const struct page_req *rq, struct page_result *res) {
    struct arc *a = (struct arc *)c;
    double k = (double)c->capacity;
    res->hit = false, res->evicted = false, res->victim = -1;
    int64_t e = pmap_get(&a->map, rq->page);
    if (e >= 0 && (a->list[e] == ARC_T1 || a->list[e] == ARC_T2)) { /* case I: hit */
        res->hit = true;
        arc_move(a, e, ARC_T2);
        return KVS_OK;
    }
    c->faults++;
    if (e >= 0) { /* cases II and III: a ghost hit adapts p, then the page comes back into T2 */
        bool b2 = a->list[e] == ARC_B2;
        double l1 = (double)a->len[ARC_B1], l2 = (double)a->len[ARC_B2];
        if (!b2) a->p = fmin(k, a->p + (l1 >= l2 ? 1.0 : l2 / l1));
        else a->p = fmax(0.0, a->p - (l2 >= l1 ? 1.0 : l1 / l2));
        res->victim = arc_replace(a, b2);
        res->evicted = true;
        arc_move(a, e, ARC_T2);
        return KVS_OK;
    }
    /* case IV: a page in none of the lists */
    int64_t L1 = a->len[ARC_T1] + a->len[ARC_B1];
    int64_t tot = L1 + a->len[ARC_T2] + a->len[ARC_B2];
    if (L1 == c->capacity) {
        if (a->len[ARC_T1] < c->capacity) {
            arc_delete(a, arc_lru(a, ARC_B1));
            res->victim = arc_replace(a, false);
        } else {
            int64_t v = arc_lru(a, ARC_T1);
            res->victim = a->page[v];
            arc_delete(a, v);
        }
        res->evicted = true;
    } else if (tot >= c->capacity) {
        if (tot == 2 * c->capacity) arc_delete(a, arc_lru(a, ARC_B2));
        if (a->len[ARC_T1] + a->len[ARC_T2] == c->capacity) {
            res->victim = arc_replace(a, false);
            res->evicted = true;
        }
    }
    e = a->n_ent++;
    KVS_ASSERT(e < 2 * c->capacity);
    a->page[e] = rq->page;
    a->list[e] = ARC_T1;
    a->len[ARC_T1]++;
    a->stamp[e] = ++a->clock;
    pmap_put_nogrow(&a->map, rq->page, e);
    c->used = a->len[ARC_T1] + a->len[ARC_T2];
    return KVS_OK;
}

static const struct page_cache_i ARC_I = {"arc", arc_access, arc_contains, arc_destroy};

static enum kvs_status arc_new(const struct page_cfg *cfg, struct page_cache **out) {
    struct arc *a = calloc(1, sizeof *a);
    if (!a) return kvs_fail(KVS_ERR_NOMEM, "page cache: out of memory");
    size_t n = 2 * (size_t)cfg->capacity;
    a->base.vt = &ARC_I;
    bool ok = pmap_init(&a->map, n);
    a->page = malloc(n * sizeof(int64_t));
    a->stamp = malloc(n * sizeof(int64_t));
    a->list = malloc(n);
    if (!ok || !a->page || !a->stamp || !a->list) {
        arc_destroy(&a->base);
        return kvs_fail(KVS_ERR_NOMEM, "page cache: out of memory");
    }
    *out = &a->base;
    return KVS_OK;
}

/* ---------------- PAGE_PRED combined with LRU ----------------
 *
 * Both run on every request (simulated: they only track ids). The real cache follows a leader L:
 * on a fault it evicts L's victim when the real cache holds it, else its least recent page that
 * L does not hold (there is one: L holds the requested page and the real cache does not).
 * Switching, after both have seen the request: from PRED to LRU when F_pred > beta F_lru + k,
 * back when F_lru > beta F_pred + k.
 *
 * Bound. Within a stretch that follows L, let d = |real \ cache(L)| (d <= k; 0 at the start).
 * A real fault on a request L hits lowers d by one; a request L faults on raises d by at most
 * one and only when the real cache hits. So the real faults of the stretch are at most L's
 * faults there plus d at its start (<= k, 0 for the first stretch). Summing, the real faults are
 * at most F_A(t_A) + F_B(t_B) + k S (t_X: the end of X's last stretch, S switches). The last
 * leader L had not switched: F_L(n) <= beta min(F_A, F_B) + k; the other one O was left at some
 * t with F_O(t) <= beta F_L(t) + k + 1 (one request adds one fault at most) <= beta F_L(n) + k +
 * 1. Hence faults <= (beta + beta^2) min(F_pred, F_lru) + (beta + 2) k + 1 + k S.
 * Switches: leaving X at t needs F_X(t) > beta F_Y(t) + k > k, and leaving X again at t' after
 * leaving Y in between needs F_X(t') > beta F_Y(t'') + k > beta^2 F_X(t): each side's faults at
 * its switches exceed k and grow by beta^2, so S <= 2 + 2 log_{beta^2}(n / k). */

struct robust {
    struct page_cache base;
    struct page_cache *alg[2]; /* 0: PAGE_PRED, 1: LRU */
    int leader;
    double beta;
    int64_t switches;
    struct pmap map; /* page -> slot of the real cache */
    int64_t *page, *last;
    int64_t clock;
};

static bool robust_contains(const struct page_cache *c, int64_t page) {
    return pmap_get(&((const struct robust *)c)->map, page) >= 0;
}

static void robust_destroy(struct page_cache *c) {
    struct robust *r = (struct robust *)c;
    for (int i = 0; i < 2; i++)
        if (r->alg[i]) r->alg[i]->vt->destroy(r->alg[i]);
    pmap_free(&r->map);
    free(r->page), free(r->last);
    free(r);
}

static enum kvs_status robust_access(struct page_cache *c, const struct page_req *rq, struct page_result *res) {
    struct robust *r = (struct robust *)c;
    struct page_result sub[2];
    for (int i = 0; i < 2; i++) {
        enum kvs_status st = r->alg[i]->vt->access(r->alg[i], rq, &sub[i]);
        if (st != KVS_OK) return st; /* cannot happen after check_req: both accept any request */
        r->alg[i]->n_access++;
    }
    double k = (double)c->capacity;
    double fl = (double)r->alg[r->leader]->faults, fo = (double)r->alg[1 - r->leader]->faults;
    if (fl > r->beta * fo + k) {
        r->leader = 1 - r->leader;
        r->switches++;
    }
    const struct page_cache *L = r->alg[r->leader];
    res->hit = false, res->evicted = false, res->victim = -1;
    int64_t i = pmap_get(&r->map, rq->page);
    r->clock++;
    if (i >= 0) {
        res->hit = true;
    } else {
        c->faults++;
        if (c->used < c->capacity) {
            i = c->used++;
        } else {
            int64_t lv = sub[r->leader].evicted ? pmap_get(&r->map, sub[r->leader].victim) : -1;
            i = lv;
            if (i < 0)
                for (int64_t j = 0; j < c->used; j++)
                    if (!L->vt->contains(L, r->page[j]) && (i < 0 || r->last[j] < r->last[i])) i = j;
            KVS_ASSERT(i >= 0);
            res->evicted = true;
            res->victim = r->page[i];
            pmap_del(&r->map, r->page[i]);
        }
        r->page[i] = rq->page;
        pmap_put_nogrow(&r->map, rq->page, i);
    }
    r->last[i] = r->clock;
    return KVS_OK;
}

static const struct page_cache_i ROBUST_I = {"pred+lru", robust_access, robust_contains, robust_destroy};

static enum kvs_status robust_new(const struct page_cfg *cfg, struct page_cache **out) {
    struct robust *r = calloc(1, sizeof *r);
    if (!r) return kvs_fail(KVS_ERR_NOMEM, "page cache: out of memory");
    r->base.vt = &ROBUST_I;
    r->beta = cfg->beta > 0 ? cfg->beta : PAGE_ROBUST_BETA;
    size_t k = (size_t)cfg->capacity;
    struct page_cfg sc = *cfg;
    enum kvs_status st = KVS_OK;
    sc.kind = PAGE_PRED;
    if (st == KVS_OK) st = page_cache_new(&sc, &r->alg[0]);
    sc.kind = PAGE_LRU;
    if (st == KVS_OK) st = page_cache_new(&sc, &r->alg[1]);
    bool ok = pmap_init(&r->map, k);
    r->page = malloc(k * sizeof(int64_t));
    r->last = malloc(k * sizeof(int64_t));
    if (st != KVS_OK || !ok || !r->page || !r->last) {
        robust_destroy(&r->base);
        return st != KVS_OK ? st : kvs_fail(KVS_ERR_NOMEM, "page cache: out of memory");
    }
    *out = &r->base;
    return KVS_OK;
}

int64_t page_robust_switches(const struct page_cache *c) {
    return c->kind == PAGE_PRED_ROBUST ? ((const struct robust *)c)->switches : 0;
}

/* ---------------- the interface ---------------- */

enum kvs_status page_cache_new(const struct page_cfg *cfg, struct page_cache **out) {
    *out = NULL;
    if ((unsigned)cfg->kind >= PAGE_KIND_COUNT) return kvs_fail(KVS_ERR_INVALID_ARG, "unknown page policy %d", (int)cfg->kind);
    if (cfg->capacity < 1 || cfg->capacity > ((int64_t)1 << 32))
        return kvs_fail(KVS_ERR_INVALID_ARG, "page cache capacity %lld out of range (1 to 2^32)",
                        (long long)cfg->capacity);
    if (cfg->kind == PAGE_OPT && !cfg->trace && cfg->n_trace)
        return kvs_fail(KVS_ERR_INVALID_ARG, "opt needs the whole trace");
    if (cfg->kind == PAGE_PRED_ROBUST && cfg->beta != 0 && !(cfg->beta >= 1))
        return kvs_fail(KVS_ERR_INVALID_ARG, "pred+lru: beta must be >= 1");
    enum kvs_status st;
    switch (cfg->kind) {
    case PAGE_ARC: st = arc_new(cfg, out); break;
    case PAGE_PRED_ROBUST: st = robust_new(cfg, out); break;
    default: st = slot_new(cfg, out); break;
    }
    if (st != KVS_OK) return st;
    (*out)->kind = cfg->kind;
    (*out)->capacity = cfg->capacity;
    return KVS_OK;
}

void page_cache_free(struct page_cache *c) {
    if (c) c->vt->destroy(c);
}

enum kvs_status page_access(struct page_cache *c, const struct page_req *rq, struct page_result *res) {
    enum kvs_status st = check_req(rq);
    if (st != KVS_OK) return st;
    struct page_result tmp;
    st = c->vt->access(c, rq, res ? res : &tmp);
    if (st == KVS_OK) c->n_access++;
    return st;
}

bool page_contains(const struct page_cache *c, int64_t page) { return c->vt->contains(c, page); }

enum kvs_status page_simulate(const struct page_cfg *cfg, const struct page_req *trace, size_t n,
                              int64_t *faults) {
    struct page_cfg c2 = *cfg;
    if (c2.kind == PAGE_OPT) c2.trace = trace, c2.n_trace = n;
    struct page_cache *c;
    enum kvs_status st = page_cache_new(&c2, &c);
    if (st != KVS_OK) return st;
    for (size_t i = 0; i < n && st == KVS_OK; i++) st = page_access(c, &trace[i], NULL);
    if (st == KVS_OK) *faults = c->faults;
    page_cache_free(c);
    return st;
}
