/* page_trace.c — request traces for the paging policies: generators (Zipf, loops, shifting
 * working sets) and the trace-file parser of `kvsieve pagesim` (format in page.h). */
#include "page/page.h"
#include "page/page_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define GEN_MAX_PAGES ((int64_t)1 << 26)
#define GEN_MAX_N ((size_t)1 << 30)

enum kvs_status page_generate(const struct page_gen *g, struct page_req **out) {
    *out = NULL;
    if (g->n < 1 || g->n > GEN_MAX_N) return kvs_fail(KVS_ERR_INVALID_ARG, "trace length %zu out of range (1 to 2^30)", g->n);
    if (g->pages < 1 || g->pages > GEN_MAX_PAGES)
        return kvs_fail(KVS_ERR_INVALID_ARG, "pages %lld out of range (1 to 2^26)", (long long)g->pages);
    if (g->kind == PAGE_GEN_ZIPF && !(g->alpha > 0 && g->alpha <= 10))
        return kvs_fail(KVS_ERR_INVALID_ARG, "zipf alpha %g out of range (0 < alpha <= 10)", g->alpha);
    if (g->kind == PAGE_GEN_PHASES) {
        if (g->ws < 1 || 2 * g->ws > g->pages)
            return kvs_fail(KVS_ERR_INVALID_ARG, "phases: working set %lld must be 1 to pages/2 (%lld)",
                            (long long)g->ws, (long long)(g->pages / 2));
        if (g->len < 1) return kvs_fail(KVS_ERR_INVALID_ARG, "phases: len must be >= 1");
        if (!(g->noise >= 0 && g->noise <= 1)) return kvs_fail(KVS_ERR_INVALID_ARG, "phases: noise %g not in [0, 1]", g->noise);
    }
    struct page_req *t = calloc(g->n, sizeof *t);
    if (!t) return kvs_fail(KVS_ERR_NOMEM, "trace: out of memory");
    uint64_t rng = g->seed;
    size_t np = (size_t)g->pages;
    if (g->kind == PAGE_GEN_LOOP) {
        for (size_t i = 0; i < g->n; i++) t[i].page = (int64_t)(i % np);
    } else if (g->kind == PAGE_GEN_ZIPF) {
        double *cdf = malloc(np * sizeof *cdf);
        int64_t *perm = malloc(np * sizeof *perm);
        if (!cdf || !perm) {
            free(cdf), free(perm), free(t);
            return kvs_fail(KVS_ERR_NOMEM, "trace: out of memory");
        }
        double s = 0;
        for (size_t r = 0; r < np; r++) cdf[r] = (s += pow((double)(r + 1), -g->alpha));
        for (size_t r = 0; r < np; r++) {
            cdf[r] /= s;
            perm[r] = (int64_t)r;
        }
        for (size_t r = np; r-- > 1;) { /* ids shuffled so that popularity is not id order */
            size_t j = (size_t)page_rng_below(&rng, r + 1);
            int64_t x = perm[r];
            perm[r] = perm[j];
            perm[j] = x;
        }
        for (size_t i = 0; i < g->n; i++) {
            double u = page_rng_unit(&rng);
            size_t lo = 0, hi = np - 1;
            while (lo < hi) {
                size_t mid = (lo + hi) / 2;
                if (cdf[mid] > u) hi = mid;
                else lo = mid + 1;
            }
            t[i].page = perm[lo];
        }
        free(cdf), free(perm);
    } else if (g->kind == PAGE_GEN_PHASES) {
        size_t ws = (size_t)g->ws;
        int64_t *set = malloc(ws * sizeof *set);
        uint8_t *in = calloc(np, 1);
        if (!set || !in) {
            free(set), free(in), free(t);
            return kvs_fail(KVS_ERR_NOMEM, "trace: out of memory");
        }
        for (size_t j = 0; j < ws; j++) { /* distinct pages: at most half of them are taken */
            int64_t p;
            do p = (int64_t)page_rng_below(&rng, np); while (in[p]);
            in[p] = 1;
            set[j] = p;
        }
        for (size_t i = 0; i < g->n; i++) {
            if (i > 0 && i % g->len == 0) /* shift: replace half of the set (at least one page) */
                for (size_t r = 0; r < (ws + 1) / 2; r++) {
                    size_t j = (size_t)page_rng_below(&rng, ws);
                    int64_t p;
                    do p = (int64_t)page_rng_below(&rng, np); while (in[p]);
                    in[set[j]] = 0;
                    in[p] = 1;
                    set[j] = p;
                }
            if (g->noise > 0 && page_rng_unit(&rng) < g->noise) t[i].page = (int64_t)page_rng_below(&rng, np);
            else t[i].page = set[page_rng_below(&rng, ws)];
        }
        free(set), free(in);
    } else {
        free(t);
        return kvs_fail(KVS_ERR_INVALID_ARG, "unknown trace generator %d", (int)g->kind);
    }
    *out = t;
    return KVS_OK;
}

static bool is_blank(char c) { return c == ' ' || c == '\t'; }

enum kvs_status page_trace_parse(const char *text, size_t len, struct page_req **out, size_t *n,
                                 bool *has_bits) {
    *out = NULL, *n = 0, *has_bits = false;
    struct page_req *t = NULL;
    size_t cnt = 0, cap = 0, line = 0, first_line = 0;
    int bits_mode = -1; /* -1 unknown, 0 no bits, 1 bits */
    size_t i = 0;
    enum kvs_status st = KVS_OK;
    while (i < len) {
        line++;
        size_t end = i;
        while (end < len && text[end] != '\n') end++;
        size_t e = end;
        if (e > i && text[e - 1] == '\r') e--;
        size_t j = i;
        i = end + 1;
        if (memchr(text + j, 0, e - j)) { st = kvs_fail(KVS_ERR_FORMAT, "line %zu: NUL byte", line); break; }
        while (j < e && is_blank(text[j])) j++;
        if (j == e || text[j] == '#') continue;
        if (text[j] == '-') { st = kvs_fail(KVS_ERR_FORMAT, "line %zu: negative page id", line); break; }
        if (text[j] < '0' || text[j] > '9') {
            st = kvs_fail(KVS_ERR_FORMAT, "line %zu: expected a page id (a decimal integer), got '%c'", line,
                          (unsigned char)text[j] >= 0x20 && (unsigned char)text[j] < 0x7f ? text[j] : '?');
            break;
        }
        uint64_t v = 0;
        bool over = false;
        for (; j < e && text[j] >= '0' && text[j] <= '9'; j++) {
            v = v * 10 + (uint64_t)(text[j] - '0');
            if (v > (uint64_t)INT64_MAX) over = true, v = (uint64_t)INT64_MAX; /* keep scanning */
        }
        if (over) { st = kvs_fail(KVS_ERR_FORMAT, "line %zu: page id out of range (0 to 2^63-1)", line); break; }
        int bit = -1;
        if (j < e && !is_blank(text[j])) {
            st = kvs_fail(KVS_ERR_FORMAT, "line %zu: unexpected character after the page id", line);
            break;
        }
        while (j < e && is_blank(text[j])) j++;
        if (j < e) {
            if ((text[j] == '0' || text[j] == '1') && (j + 1 == e || is_blank(text[j + 1]))) {
                bit = text[j] - '0';
                j++;
                while (j < e && is_blank(text[j])) j++;
                if (j < e) { st = kvs_fail(KVS_ERR_FORMAT, "line %zu: extra text after the bit", line); break; }
            } else {
                st = kvs_fail(KVS_ERR_FORMAT, "line %zu: the predicted bit must be 0 or 1", line);
                break;
            }
        }
        if (bits_mode < 0) bits_mode = bit >= 0, first_line = line;
        else if (bits_mode != (bit >= 0)) {
            st = kvs_fail(KVS_ERR_FORMAT, "line %zu: %s a predicted bit but line %zu %s (all requests or none)", line,
                          bit >= 0 ? "has" : "lacks", first_line, bits_mode ? "has one" : "has none");
            break;
        }
        if (cnt == cap) {
            size_t nc = cap ? cap * 2 : 1024;
            struct page_req *g = realloc(t, nc * sizeof *g);
            if (!g) { st = kvs_fail(KVS_ERR_NOMEM, "trace: out of memory"); break; }
            t = g, cap = nc;
        }
        t[cnt].page = (int64_t)v;
        t[cnt].size = 1;
        t[cnt].bit = bit > 0;
        cnt++;
    }
    if (st != KVS_OK) {
        free(t);
        return st;
    }
    *out = t, *n = cnt, *has_bits = bits_mode == 1;
    return KVS_OK;
}
