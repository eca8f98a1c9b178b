/* page_internal.h — helpers shared by the files of src/page/: a growable open-addressing map from page id
 * (int64_t >= 0) to a small integer, and a seeded splitmix64 generator. Not part of the API. */
#ifndef KVS_PAGE_INTERNAL_H
#define KVS_PAGE_INTERNAL_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stdbool.h>

struct pmap {
    int64_t *keys; /* -1 = empty */
    int64_t *vals;
    size_t cap, n; /* cap a power of two, n <= cap / 2 */
};

static inline uint64_t pmap_hash(int64_t k) {
    uint64_t x = (uint64_t)k + 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static inline bool pmap_init(struct pmap *m, size_t expect) {
    size_t cap = 16;
    while (cap < 2 * expect + 2) cap *= 2;
    m->keys = malloc(cap * sizeof *m->keys);
    m->vals = malloc(cap * sizeof *m->vals);
    m->cap = cap;
    m->n = 0;
    if (!m->keys || !m->vals) {
        free(m->keys), free(m->vals);
        m->keys = NULL, m->vals = NULL;
        return false;
    }
    memset(m->keys, 0xff, cap * sizeof *m->keys);
    return true;
}

static inline void pmap_free(struct pmap *m) {
    free(m->keys), free(m->vals);
    m->keys = NULL, m->vals = NULL;
}

/* the value of `k`, or -1 */
static inline int64_t pmap_get(const struct pmap *m, int64_t k) {
    size_t mask = m->cap - 1;
    for (size_t i = pmap_hash(k) & mask;; i = (i + 1) & mask) {
        if (m->keys[i] == k) return m->vals[i];
        if (m->keys[i] < 0) return -1;
    }
}

static inline void pmap_put_nogrow(struct pmap *m, int64_t k, int64_t v) {
    size_t mask = m->cap - 1;
    size_t i = pmap_hash(k) & mask;
    for (; m->keys[i] >= 0 && m->keys[i] != k; i = (i + 1) & mask) {}
    if (m->keys[i] < 0) m->n++;
    m->keys[i] = k;
    m->vals[i] = v;
}

/* inserts or replaces; false when out of memory (the map is then unchanged) */
static inline bool pmap_put(struct pmap *m, int64_t k, int64_t v) {
    if (2 * (m->n + 1) > m->cap) {
        struct pmap g;
        if (!pmap_init(&g, m->cap)) return false;
        for (size_t i = 0; i < m->cap; i++)
            if (m->keys[i] >= 0) pmap_put_nogrow(&g, m->keys[i], m->vals[i]);
        pmap_free(m);
        *m = g;
    }
    pmap_put_nogrow(m, k, v);
    return true;
}

/* removes `k` if present (backward-shift deletion: no tombstones) */
static inline void pmap_del(struct pmap *m, int64_t k) {
    size_t mask = m->cap - 1;
    size_t i = pmap_hash(k) & mask;
    for (; m->keys[i] != k; i = (i + 1) & mask)
        if (m->keys[i] < 0) return;
    m->n--;
    for (size_t j = (i + 1) & mask; m->keys[j] >= 0; j = (j + 1) & mask) {
        size_t h = pmap_hash(m->keys[j]) & mask;
        /* j's entry may move to the hole i when its home h is not in the cyclic range (i, j] */
        bool in = i <= j ? (h > i && h <= j) : (h > i || h <= j);
        if (!in) {
            m->keys[i] = m->keys[j];
            m->vals[i] = m->vals[j];
            i = j;
        }
    }
    m->keys[i] = -1;
}

static inline uint64_t page_rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
/* uniform in [0, n), n >= 1 */
static inline uint64_t page_rng_below(uint64_t *s, uint64_t n) {
    uint64_t lim = UINT64_MAX - UINT64_MAX % n, x;
    do x = page_rng_next(s); while (x >= lim);
    return x % n;
}
static inline double page_rng_unit(uint64_t *s) { /* [0, 1) */
    return (double)(page_rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

#endif
