/* report_data.h — the data both report files read: the records, the dictionaries that rank
 * their string fields, sorted key sets and weighted means (types and inline helpers only; no
 * function of report.c or report_plot.c is declared here). Internal to src/eval/report*.c; the
 * API is report.h. Dependencies run one way: report.c (loading, results.csv, report.md) calls
 * report_plot.c (figures, report_plot.h), and both include this header.
 * Does not: own anything by itself; struct report and its records are freed in report.c.
 */
#ifndef KVS_EVAL_REPORT_DATA_H
#define KVS_EVAL_REPORT_DATA_H

#include "eval/jsonl.h"
#include "base.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DASH "\xE2\x80\x93" /* "–", printed for a missing value */

/* ---------------------------------------------------------------------------------------------
 * small helpers */

static inline void *xalloc(void *p, size_t n, size_t size) { /* realloc, zeroing nothing; asserts */
    KVS_ASSERT(size == 0 || n <= SIZE_MAX / size);
    void *q = realloc(p, n && size ? n * size : 1);
    KVS_ASSERT(q != NULL);
    return q;
}

static inline void *xcalloc(size_t n, size_t size) {
    void *q = calloc(n ? n : 1, size);
    KVS_ASSERT(q != NULL);
    return q;
}

static inline int set_err(char *err, size_t err_size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static inline int set_err(char *err, size_t err_size, const char *fmt, ...) {
    if (err && err_size) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_size, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static inline bool path_join(char *out, size_t n, const char *dir, const char *name) {
    int k = snprintf(out, n, "%s/%s", dir, name);
    return k >= 0 && (size_t)k < n;
}

struct acc { double sum, w; int n; }; /* weighted mean of finite values */

static inline void acc_add(struct acc *a, double x, double w) {
    if (!isfinite(x) || !(w > 0) || !isfinite(w)) return;
    a->sum += x * w;
    a->w += w;
    a->n++;
}

static inline double acc_mean(const struct acc *a) { return a->w > 0 ? a->sum / a->w : NAN; }

/* ---------------------------------------------------------------------------------------------
 * keys: tuples of doubles (dictionary ranks, lengths, negated ratios for descending order)
 * compared lexicographically, NaN after every number; a keyset is a sorted set of them */

#define NK 5
struct key { double k[NK]; };
#define KEY(...) ((struct key){{__VA_ARGS__}})

static inline int dcmp(double a, double b) {
    if (isnan(a) || isnan(b)) return isnan(a) - isnan(b);
    return (a > b) - (a < b);
}

static inline int key_cmp(const void *pa, const void *pb) {
    const struct key *a = pa, *b = pb;
    for (int i = 0; i < NK; i++) {
        int c = dcmp(a->k[i], b->k[i]);
        if (c) return c;
    }
    return 0;
}

struct keyset { struct key *v; int n, cap; };

static inline void ks_add(struct keyset *s, struct key k) {
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        s->v = xalloc(s->v, (size_t)s->cap, sizeof *s->v);
    }
    s->v[s->n++] = k;
}

static inline void ks_done(struct keyset *s) { /* sort and drop duplicates */
    if (!s->n) return;
    qsort(s->v, (size_t)s->n, sizeof *s->v, key_cmp);
    int m = 1;
    for (int i = 1; i < s->n; i++)
        if (key_cmp(&s->v[i], &s->v[m - 1])) s->v[m++] = s->v[i];
    s->n = m;
}

static inline int ks_find(const struct keyset *s, struct key k) {
    const struct key *f = s->n ? bsearch(&k, s->v, (size_t)s->n, sizeof *s->v, key_cmp) : NULL;
    KVS_ASSERT(f != NULL); /* every lookup follows an ks_add of the same key */
    return (int)(f - s->v);
}

static inline void ks_free(struct keyset *s) { free(s->v); memset(s, 0, sizeof *s); }

struct dict { /* the distinct values of one string field, in display order (report.c) */
    const char **v; /* (n) borrowed strings */
    int n, cap;
    const char *const *order; /* values listed here come first, in this order */
    bool by_family;           /* tasks: order by the family their name suggests */
};

/* ---------------------------------------------------------------------------------------------
 * records and the report state */

struct rec {
    struct jsonl_obj obj; /* the parsed line: owns the strings below that are not literals */
    const char *system, *kind, *model, *method, *mode, *task, *family; /* never NULL */
    const char *run, *git, *sha;                                         /* NULL when absent */
    double ratio, budget, length, score, ppl, kl, n_tokens, kv_peak, kv_full, decode; /* NaN: absent */
    double kv_held; /* kv_bytes (KV held when decoding starts), else kv_bytes_peak */
    bool is_ppl, is_full;
    int file;                                  /* index into report.files */
    int im, isys, imeth, imode, itask, ifam;   /* ranks in the dictionaries */
};

struct figure { /* one figure written to DIR/plots/ */
    char stem[200];  /* file name without extension */
    char title[400];
    int rendered;    /* 1 rendered, 0 not tried (no gnuplot), -1 gnuplot failed */
};

struct report {
    const char *dir;
    char plots[PATH_MAX]; /* DIR/plots */
    struct rec *r;        /* (n) */
    int n, cap;
    char **files; /* (n_files) names as shown in the report */
    int *file_n;  /* records read from each file */
    int n_files, n_bad, n_dup;
    struct dict models, systems, methods, modes, tasks, families, commits;
    bool peers;   /* some record comes from a system other than kvsieve */
    struct figure *figs;
    int n_figs;
    int gnuplot;  /* 0 not tried yet, 1 ran, -1 not found */
};

static inline double tok_weight(const struct rec *r) {
    return isfinite(r->n_tokens) && r->n_tokens > 0 ? r->n_tokens : 1;
}

static inline const char *mode_label(const char *mode) {
    return !strcmp(mode, "aware") ? "question-aware" : !strcmp(mode, "agnostic") ? "question-agnostic" : mode;
}

#endif
