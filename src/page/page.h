/* page.h — cache replacement over integer page ids: LRU, LFU, ARC, randomised marking, paging
 * with one-bit discard predictions (Antoniadis et al., arXiv 2210.02775) with its marking
 * fallback and a robust combination with LRU, phase predictions (MARK&PREDICT), and Belady's
 * optimum; the ground-truth labelling of the bits, bit corruption, an online bit predictor from
 * reuse statistics, trace generators and the trace-file parser (`kvsieve pagesim` reads it).
 *
 * Does: decide, for a cache of `capacity` unit-size pages, whether a request hits and which page
 * is evicted. The caller owns the data the pages stand for (the chunk store's RAM and disk tiers
 * will); this library only tracks ids.
 * Does not: print, exit, or allocate per access (a policy allocates at creation; the online
 * predictor and the ids it has seen grow with the number of distinct pages).
 *
 * Conventions:
 * - A page id is any int64_t >= 0.
 * - Sizes: every page has size 1 for now (`struct page_req.size` 0 or 1; anything else is refused
 *   with KVS_ERR_UNSUPPORTED) and `capacity` counts pages. The field is there so that sized
 *   chunks can come later without changing the interface; with sizes an access may evict more than
 *   one page, and `struct page_result` will then grow a list.
 * - Bit polarity (discard predictions): 1 = "safe to evict" (the optimum evicts this page before
 *   its next request), 0 = "keep". The bit belongs to the request that carries it, and a cached
 *   page's bit is the bit of its most recent request.
 * - Phase bits (PAGE_PHASE): 1 = "not requested in the next k-phase" (evictable), 0 = "requested
 *   again in the next phase". Same polarity: 1 means evict me.
 * - Costs: one fault per miss, including the compulsory first load of a page.
 * - Complexity: a hit is O(1) (hash lookup); choosing a victim scans the k slots (O(k)), which
 *   is fine for the tier sizes of the chunk store (thousands of pages) and for simulation. */
#ifndef KVS_PAGE_H
#define KVS_PAGE_H

#include "base.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum page_kind {
    PAGE_LRU,     /* least recently used */
    PAGE_LFU,     /* least frequently used since loaded (in-cache counts), ties: least recent */
    PAGE_ARC,     /* Adaptive Replacement Cache (Megiddo & Modha, FAST 2003) */
    PAGE_MARKING, /* randomised marking (Fiat et al. 1991): evict a uniformly random unmarked page */
    PAGE_PRED,    /* discard predictions: evict a bit-1 page (least recent first); when every cached
                     page claims "keep", an unmarked page, least recent first (marking fallback) */
    PAGE_PRED_ROBUST, /* PAGE_PRED combined with LRU by deterministic switching (see below) */
    PAGE_PHASE,   /* phase predictions, MARK&PREDICT: evict an unmarked page with phase bit 1,
                     else a uniformly random unmarked page */
    PAGE_OPT,     /* Belady's furthest-in-future; offline: needs the whole trace (cfg.trace) */
    PAGE_KIND_COUNT
};

/* one request: a page id, its size (0 or 1 = one unit) and its predicted bit (0 or 1) */
struct page_req {
    int64_t page;
    uint32_t size;
    uint8_t bit;
};

struct page_result {
    bool hit;
    bool evicted;   /* a page left the cache to make room */
    int64_t victim; /* that page (-1 when none) */
};

struct page_cfg {
    enum page_kind kind;
    int64_t capacity; /* k >= 1 pages */
    uint64_t seed;    /* PAGE_MARKING and PAGE_PHASE's random choices */
    /* PAGE_OPT only: the whole trace, in the order it will be accessed (borrowed; must outlive
     * the cache). Every access must then be the next request of this trace. */
    const struct page_req *trace;
    size_t n_trace;
    /* PAGE_PRED_ROBUST: the switching factor beta >= 1 (0 = PAGE_ROBUST_BETA). The combination follows
     * PAGE_PRED while its faults F_pred <= beta * F_lru + k, else LRU until F_lru > beta * F_pred
     * + k, and so on; it follows the leader lazily (a fault evicts a page the leader does not
     * hold). Bound, proved in page.c: faults <= (beta + beta^2) * min(F_pred, F_lru) +
     * (beta + 2) * k + 1 + k * switches, and switches <= 2 + 2 log_{beta^2}(n / k). With perfect
     * bits PAGE_PRED never falls behind LRU, so it is followed all along: optimal. */
    double beta;
};
/* default switching factor: a bound of 2.31 x the better of pred and LRU (plus O(k log n)); a
 * larger beta switches less often and later */
#define PAGE_ROBUST_BETA 1.1

struct page_cache;

/* The vtable every policy implements; `struct page_cache` starts with a pointer to it. */
struct page_cache_i {
    const char *name;
    enum kvs_status (*access)(struct page_cache *c, const struct page_req *rq, struct page_result *res);
    bool (*contains)(const struct page_cache *c, int64_t page);
    void (*destroy)(struct page_cache *c);
};

struct page_cache {
    const struct page_cache_i *vt;
    enum page_kind kind;
    int64_t capacity;
    int64_t used;    /* pages held */
    int64_t faults;  /* misses so far */
    int64_t n_access;
};

/* Creates a policy. Errors: KVS_ERR_INVALID_ARG (capacity < 1, unknown kind, PAGE_OPT without a
 * trace, beta < 1), KVS_ERR_NOMEM. */
enum kvs_status page_cache_new(const struct page_cfg *cfg, struct page_cache **out);
void page_cache_free(struct page_cache *c);

/* One request. Errors: KVS_ERR_INVALID_ARG (negative id, bit not 0/1, PAGE_OPT: not the trace's
 * next request), KVS_ERR_UNSUPPORTED (size > 1). On error the cache is unchanged. */
enum kvs_status page_access(struct page_cache *c, const struct page_req *rq, struct page_result *res);
bool page_contains(const struct page_cache *c, int64_t page);
/* PAGE_PRED_ROBUST: how often it switched between PAGE_PRED and LRU so far (0 for others) */
int64_t page_robust_switches(const struct page_cache *c);

const char *page_kind_name(enum page_kind kind); /* "lru", "lfu", "arc", "marking", "pred", ... */
/* the kind named `name`, or -1 */
int page_kind_parse(const char *name);

/* Runs `trace` through a fresh policy; *faults = its misses. */
enum kvs_status page_simulate(const struct page_cfg *cfg, const struct page_req *trace, size_t n,
                              int64_t *faults);

/* ---- bits ---- */

/* Ground-truth discard bits: simulates Belady's furthest-in-future (ties between pages never
 * requested again, or requested at the same time, go to the least recently used) with k pages;
 * whenever it evicts page q, the bit of q's most recent request is set to 1; every other bit is
 * 0. Writes trace[i].bit; *opt_faults (may be NULL) = the optimum's faults. */
enum kvs_status page_label_discard(struct page_req *trace, size_t n, int64_t k, int64_t *opt_faults);
/* Ground-truth phase bits: splits the trace into k-phases (maximal runs of k distinct pages, as
 * marking algorithms see them); the bit of a request to p in phase i is 1 iff p is not requested
 * in phase i+1 (the last phase: 1). *n_phases may be NULL. */
enum kvs_status page_label_phase(struct page_req *trace, size_t n, int64_t k, int64_t *n_phases);
/* Flips exactly round(frac * n) bits at positions chosen uniformly without replacement (seeded);
 * frac in [0, 1]. */
enum kvs_status page_flip_bits(struct page_req *trace, size_t n, double frac, uint64_t seed);
/* Adversarial: every bit inverted. */
void page_invert_bits(struct page_req *trace, size_t n);

/* Online predictor of the discard bit from reuse statistics, for when no oracle exists.
 * Rule: for each page it keeps the LRU stack distance of its past reuses (the number of distinct
 * pages requested between two requests to it), smoothed as d = (d + new) / 2. A request gets bit
 * 0 ("keep") iff the page has been reused before and its smoothed distance is below k (it is
 * expected back before k other pages have been touched, i.e. while an LRU cache of k would
 * still hold it); a first request, or a page whose reuses are k or more distinct pages apart, gets
 * bit 1. The prediction for a request uses only the requests before it. Memory: O(distinct
 * pages), whatever the number of requests; O(log) time per request, amortised. */
struct page_predictor;
enum kvs_status page_predictor_new(int64_t k, struct page_predictor **out);
void page_predictor_free(struct page_predictor *p);
/* the predicted bit for this request to `page`, then the request is recorded; -1 on error */
int page_predict(struct page_predictor *p, int64_t page);
/* writes trace[i].bit from a fresh predictor */
enum kvs_status page_label_online(struct page_req *trace, size_t n, int64_t k);

/* ---- traces ---- */

enum page_gen_kind { PAGE_GEN_ZIPF, PAGE_GEN_LOOP, PAGE_GEN_PHASES };
struct page_gen {
    enum page_gen_kind kind;
    size_t n;        /* requests */
    int64_t pages;   /* zipf: universe; loop: loop length; phases: pages in all */
    double alpha;    /* zipf exponent (> 0) */
    int64_t ws;      /* phases: working-set size */
    size_t len;      /* phases: requests per working set before it shifts */
    double noise;    /* phases: fraction of requests to a uniformly random page outside the set */
    uint64_t seed;
};
/* Zipf(alpha) over `pages` ids (id 0 most popular, ids permuted by the seed); a loop 0..pages-1
 * repeated (a sequential scan: LRU's worst case when pages > k); or a working set of `ws` pages
 * drawn from `pages`, uniformly requested, replaced by a new one every `len` requests (half of it
 * kept), with `noise` of requests elsewhere. Bits are 0. *out is malloc'ed. */
enum kvs_status page_generate(const struct page_gen *g, struct page_req **out);

/* Parses a trace file's text: one request per line, `PAGE` or `PAGE BIT` (PAGE a decimal integer
 * 0..2^63-1, BIT 0 or 1, separated by spaces or tabs); blank lines and lines starting with '#'
 * are skipped, '\r' before the newline is accepted. Either every request has a bit or none does.
 * *out is malloc'ed (NULL when empty), *has_bits tells whether the bits came from the file.
 * Errors: KVS_ERR_FORMAT with "line N: problem" in kvs_last_error(), KVS_ERR_NOMEM. */
enum kvs_status page_trace_parse(const char *text, size_t len, struct page_req **out, size_t *n,
                                 bool *has_bits);

#endif
