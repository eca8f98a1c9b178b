/* pagesim_cli.c — `kvsieve pagesim`: replays a page-request trace (a file, or generated) through
 * the replacement policies of src/page/ at one or more cache sizes and prints their faults beside
 * Belady's optimum. Part of the program, not the library: it prints and returns the exit code
 * (0 ok, 1 runtime failure, 2 bad input). */
#include "cli/pagesim_cli.h"
#include "page/page.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *PAGESIM_USAGE =
    "usage: kvsieve pagesim (TRACE | -f TRACE | --gen SPEC) [options]\n"
    "\n"
    "Replays page requests through cache replacement policies at each cache size k and prints\n"
    "their faults (misses, first loads included) and the ratio to Belady's optimum (OPT).\n"
    "\n"
    "trace file (TRACE, '-' = stdin): one request per line, `PAGE` or `PAGE BIT`: PAGE a decimal\n"
    "  integer 0..2^63-1, BIT the predicted discard bit (1 = safe to evict, 0 = keep), separated\n"
    "  by spaces or tabs. Blank lines and lines starting with '#' are skipped. Either every\n"
    "  request has a bit or none does. A bad line stops with `TRACE:LINE: problem`, exit 2.\n"
    "\n"
    "options:\n"
    "  --gen SPEC       generate the trace instead (seeded, reproducible):\n"
    "                   zipf:n=N,pages=P,alpha=A,seed=S     Zipf(A) popularity over P pages\n"
    "                     (defaults n=100000, pages=10000, alpha=0.9, seed=1)\n"
    "                   loop:n=N,pages=P                    0,1,..,P-1 repeated (a scan)\n"
    "                     (defaults n=100000, pages=300)\n"
    "                   phases:n=N,pages=P,ws=W,len=L,noise=X,seed=S\n"
    "                     a working set of W of P pages, half of it replaced every L requests,\n"
    "                     X of the requests to random pages (defaults n=100000, pages=20000,\n"
    "                     ws=200, len=5000, noise=0.05, seed=1)\n"
    "  -k LIST          cache sizes in pages (64,128,256)\n"
    "  --flip LIST      fractions of the perfect bits to flip, each a row (0.1,0.3); 'none'\n"
    "  --seed N         seed of the flips and of the randomised policies (1)\n"
    "  --beta X         switching factor of pred+lru, >= 1 (1.1)\n"
    "  --json           one JSON object per (k, row) on stdout instead of the table\n"
    "  --write FILE     also write the trace to FILE in the trace format ('-' = stdout, no table)\n"
    "  --write-bits K   with --write: add the optimum's discard bits for a cache of K pages\n"
    "\n"
    "rows: lru, lfu (counts since loaded), arc (Megiddo & Modha), marking (randomised),\n"
    "  phase (MARK&PREDICT with perfect phase bits: 1 = not requested in the next k-phase),\n"
    "  pred (evict a page whose latest bit is 1, least recent first; when every cached page\n"
    "  says keep, the least recent unmarked page) and pred+lru (pred combined with LRU by\n"
    "  deterministic switching: within (beta+beta^2) x the better of the two, plus O(k log n))\n"
    "  with bits: perfect (Belady's discard labels for this k), flip=F (F of them flipped),\n"
    "  adversarial (all inverted), online (predicted from reuse distances, no oracle), file\n"
    "  (the trace's own bits, when it has them); and opt. A policy scans its k pages on each\n"
    "  fault (O(k)); a hit is O(1).\n";

static int usage_err(const char *fmt, const char *a) {
    fprintf(stderr, "kvsieve pagesim: ");
    fprintf(stderr, fmt, a);
    fprintf(stderr, "\n(see `kvsieve pagesim --help`)\n");
    return 2;
}

static bool parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out) {
    if (!*s) return false;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (*end || errno || v < lo || v > hi) return false;
    *out = v;
    return true;
}

static bool parse_f64(const char *s, double lo, double hi, double *out) {
    if (!*s) return false;
    char *end;
    double v = strtod(s, &end);
    if (*end || !(v >= lo && v <= hi)) return false;
    *out = v;
    return true;
}

#define MAX_K 16
#define MAX_FLIP 16

/* "zipf:n=1000,alpha=0.8" -> g; returns an error text or NULL */
static const char *parse_gen(const char *spec, struct page_gen *g, char *err, size_t errn) {
    char buf[512];
    snprintf(buf, sizeof buf, "%s", spec);
    char *colon = strchr(buf, ':');
    if (colon) *colon = 0;
    *g = (struct page_gen){.n = 100000, .seed = 1};
    if (!strcmp(buf, "zipf")) g->kind = PAGE_GEN_ZIPF, g->pages = 10000, g->alpha = 0.9;
    else if (!strcmp(buf, "loop")) g->kind = PAGE_GEN_LOOP, g->pages = 300;
    else if (!strcmp(buf, "phases")) g->kind = PAGE_GEN_PHASES, g->pages = 20000, g->ws = 200, g->len = 5000, g->noise = 0.05;
    else {
        snprintf(err, errn, "unknown generator '%.64s' (accepted: zipf, loop, phases)", buf);
        return err;
    }
    if (!colon) return NULL;
    for (char *kv = strtok(colon + 1, ","); kv; kv = strtok(NULL, ",")) {
        char *eq = strchr(kv, '=');
        if (!eq) {
            snprintf(err, errn, "'%.64s' in --gen is not key=value", kv);
            return err;
        }
        *eq = 0;
        const char *v = eq + 1;
        int64_t iv = 0;
        double dv = 0;
        bool ok = true;
        if (!strcmp(kv, "n")) ok = parse_i64(v, 1, (int64_t)1 << 30, &iv), g->n = (size_t)iv;
        else if (!strcmp(kv, "pages")) ok = parse_i64(v, 1, (int64_t)1 << 26, &iv), g->pages = iv;
        else if (!strcmp(kv, "seed")) ok = parse_i64(v, 0, INT64_MAX, &iv), g->seed = (uint64_t)iv;
        else if (!strcmp(kv, "alpha") && g->kind == PAGE_GEN_ZIPF) ok = parse_f64(v, 1e-9, 10, &dv), g->alpha = dv;
        else if (!strcmp(kv, "ws") && g->kind == PAGE_GEN_PHASES) ok = parse_i64(v, 1, (int64_t)1 << 25, &iv), g->ws = iv;
        else if (!strcmp(kv, "len") && g->kind == PAGE_GEN_PHASES) ok = parse_i64(v, 1, (int64_t)1 << 30, &iv), g->len = (size_t)iv;
        else if (!strcmp(kv, "noise") && g->kind == PAGE_GEN_PHASES) ok = parse_f64(v, 0, 1, &dv), g->noise = dv;
        else {
            snprintf(err, errn, "unknown key '%.64s' for generator %.16s", kv, buf);
            return err;
        }
        if (!ok) {
            snprintf(err, errn, "bad value '%.64s' for '%.64s' in --gen %.16s", v, kv, buf);
            return err;
        }
    }
    return NULL;
}

static char *read_all(const char *path, size_t *len) {
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (n == cap) {
            char *g = realloc(buf, cap * 2);
            if (!g) { free(buf); buf = NULL; break; }
            buf = g, cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) break;
    }
    bool err = ferror(f);
    if (f != stdin) fclose(f);
    if (err) { free(buf); return NULL; }
    *len = n;
    return buf;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

struct row {
    const char *policy; /* page_kind_name */
    enum page_kind kind;
    char bits[32];      /* none, perfect, flip=F, adversarial, online, file, phase */
    int64_t faults[MAX_K], switches[MAX_K];
};

int pagesim_main(int argc, char **argv) {
    const char *trace_path = NULL, *gen_spec = NULL, *write_path = NULL;
    int64_t ks[MAX_K] = {64, 128, 256};
    int nk = 3;
    double flips[MAX_FLIP] = {0.1, 0.3};
    int nflip = 2;
    int64_t seed = 1, write_bits_k = 0;
    double beta = PAGE_ROBUST_BETA;
    bool json = false;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        bool has_val = i + 1 < argc;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(PAGESIM_USAGE, stdout);
            return 0;
        } else if (!strcmp(a, "--json")) {
            json = true;
        } else if (!strcmp(a, "-f") || !strcmp(a, "--gen") || !strcmp(a, "-k") || !strcmp(a, "--flip") ||
                   !strcmp(a, "--seed") || !strcmp(a, "--beta") || !strcmp(a, "--write") || !strcmp(a, "--write-bits")) {
            if (!has_val) return usage_err("%s needs a value", a);
            const char *v = argv[++i];
            if (!strcmp(a, "-f")) {
                if (trace_path) return usage_err("%s", "more than one trace");
                trace_path = v;
            } else if (!strcmp(a, "--gen")) gen_spec = v;
            else if (!strcmp(a, "--write")) write_path = v;
            else if (!strcmp(a, "--seed")) {
                if (!parse_i64(v, 0, INT64_MAX, &seed)) return usage_err("--seed expects an integer >= 0, got '%s'", v);
            } else if (!strcmp(a, "--beta")) {
                if (!parse_f64(v, 1, 1e6, &beta)) return usage_err("--beta expects a number >= 1, got '%s'", v);
            } else if (!strcmp(a, "--write-bits")) {
                if (!parse_i64(v, 1, (int64_t)1 << 32, &write_bits_k))
                    return usage_err("--write-bits expects a cache size >= 1, got '%s'", v);
            } else { /* -k or --flip: comma lists */
                char buf[512];
                snprintf(buf, sizeof buf, "%s", v);
                bool isk = !strcmp(a, "-k");
                int n = 0;
                if (!isk && !strcmp(v, "none")) {
                    nflip = 0;
                    continue;
                }
                for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
                    if (n == (isk ? MAX_K : MAX_FLIP)) return usage_err("%s: too many values (at most 16)", a);
                    bool ok = isk ? parse_i64(tok, 1, (int64_t)1 << 32, &ks[n]) : parse_f64(tok, 0, 1, &flips[n]);
                    if (!ok)
                        return usage_err(isk ? "-k expects cache sizes >= 1, comma-separated, got '%s'"
                                             : "--flip expects fractions in [0, 1], comma-separated, or 'none', got '%s'",
                                         tok);
                    n++;
                }
                if (n == 0) return usage_err("%s needs at least one value", a);
                if (isk) nk = n;
                else nflip = n;
            }
        } else if (a[0] == '-' && a[1]) {
            return usage_err("unknown option '%s'", a);
        } else {
            if (trace_path) return usage_err("more than one trace ('%s')", a);
            trace_path = a;
        }
    }
    if (!trace_path == !gen_spec) return usage_err("%s", "give a trace file or --gen SPEC (one of them)");
    if (write_bits_k && !write_path) return usage_err("%s", "--write-bits needs --write FILE");

    struct page_req *t = NULL;
    size_t n = 0;
    bool file_bits = false;
    char label[600];
    if (gen_spec) {
        struct page_gen g;
        char err[300];
        if (parse_gen(gen_spec, &g, err, sizeof err)) return usage_err("%s", err);
        if (page_generate(&g, &t) != KVS_OK) return usage_err("--gen: %s", kvs_last_error());
        n = g.n;
        snprintf(label, sizeof label, "%s", gen_spec);
    } else {
        size_t len;
        char *text = read_all(trace_path, &len);
        if (!text) {
            fprintf(stderr, "kvsieve pagesim: cannot read trace '%s': %s\n", trace_path, strerror(errno));
            return 2;
        }
        enum kvs_status st = page_trace_parse(text, len, &t, &n, &file_bits);
        free(text);
        if (st != KVS_OK) {
            const char *m = kvs_last_error();
            if (!strncmp(m, "line ", 5)) fprintf(stderr, "kvsieve pagesim: %s:%s\n", trace_path, m + 5);
            else fprintf(stderr, "kvsieve pagesim: %s: %s\n", trace_path, m);
            return st == KVS_ERR_NOMEM ? 1 : 2;
        }
        if (n == 0) {
            fprintf(stderr, "kvsieve pagesim: %s: no requests\n", trace_path);
            return 2;
        }
        snprintf(label, sizeof label, "%s", trace_path);
    }
    int rc = 0;
    struct page_req *w = malloc(n * sizeof *w), *orig = malloc(n * sizeof *orig), *truth = malloc(n * sizeof *truth);
    struct row *rows = calloc(8 + 2 * (MAX_FLIP + 4), sizeof *rows);
    if (!w || !orig || !truth || !rows) {
        fprintf(stderr, "kvsieve pagesim: out of memory\n");
        rc = 1;
        goto done;
    }
    memcpy(orig, t, n * sizeof *t);

    if (write_path) {
        FILE *f = strcmp(write_path, "-") ? fopen(write_path, "w") : stdout;
        if (!f) {
            fprintf(stderr, "kvsieve pagesim: cannot write '%s': %s\n", write_path, strerror(errno));
            rc = 2;
            goto done;
        }
        memcpy(w, t, n * sizeof *t);
        if (write_bits_k && page_label_discard(w, n, write_bits_k, NULL) != KVS_OK) {
            fprintf(stderr, "kvsieve pagesim: %s\n", kvs_last_error());
            rc = 1;
        }
        fprintf(f, "# kvsieve pagesim trace: %s, %zu requests%s\n", label, n,
                write_bits_k ? ", discard bits of the optimum" : "");
        if (write_bits_k) fprintf(f, "# bits for a cache of %lld pages (1 = evict)\n", (long long)write_bits_k);
        for (size_t i = 0; i < n && rc == 0; i++) {
            if (write_bits_k) fprintf(f, "%lld %u\n", (long long)w[i].page, w[i].bit);
            else fprintf(f, "%lld\n", (long long)w[i].page);
        }
        if ((f != stdout ? fclose(f) : fflush(f)) != 0 && rc == 0) {
            fprintf(stderr, "kvsieve pagesim: error writing '%s'\n", write_path);
            rc = 1;
        }
        if (rc || !strcmp(write_path, "-")) goto done;
    }

    /* the rows */
    int nr = 0;
    const enum page_kind plain[] = {PAGE_LRU, PAGE_LFU, PAGE_ARC, PAGE_MARKING};
    for (int i = 0; i < 4; i++) rows[nr].kind = plain[i], snprintf(rows[nr++].bits, 32, "none");
    rows[nr].kind = PAGE_PHASE, snprintf(rows[nr++].bits, 32, "phase");
    int first_pred = nr;
    char srcs[MAX_FLIP + 4][32];
    int ns = 0;
    snprintf(srcs[ns++], 32, "perfect");
    for (int f = 0; f < nflip; f++) snprintf(srcs[ns++], 32, "flip=%g", flips[f]);
    snprintf(srcs[ns++], 32, "adversarial");
    snprintf(srcs[ns++], 32, "online");
    if (file_bits) snprintf(srcs[ns++], 32, "file");
    for (int s = 0; s < ns; s++)
        for (int r = 0; r < 2; r++) {
            rows[nr].kind = r ? PAGE_PRED_ROBUST : PAGE_PRED;
            snprintf(rows[nr++].bits, 32, "%.31s", srcs[s]);
        }
    int opt_row = nr;
    rows[nr].kind = PAGE_OPT, snprintf(rows[nr++].bits, 32, "none");
    for (int r = 0; r < nr; r++) rows[r].policy = page_kind_name(rows[r].kind);

    size_t distinct = 0;
    { /* distinct pages: sort a copy of the ids */
        int64_t *ids = malloc(n * sizeof *ids);
        if (!ids) {
            fprintf(stderr, "kvsieve pagesim: out of memory\n");
            rc = 1;
            goto done;
        }
        for (size_t i = 0; i < n; i++) ids[i] = orig[i].page;
        qsort(ids, n, sizeof *ids, cmp_i64);
        for (size_t i = 0; i < n; i++) distinct += i == 0 || ids[i] != ids[i - 1];
        free(ids);
    }

    int64_t truth_k = 0;
    for (int ki = 0; ki < nk && rc == 0; ki++) {
        int64_t k = ks[ki];
        for (int r = 0; r < nr && rc == 0; r++) {
            struct row *R = &rows[r];
            memcpy(w, orig, n * sizeof *w);
            enum kvs_status st = KVS_OK;
            const char *b = R->bits;
            if (!strcmp(b, "phase")) st = page_label_phase(w, n, k, NULL);
            else if (!strcmp(b, "perfect") || !strncmp(b, "flip=", 5) || !strcmp(b, "adversarial")) {
                if (truth_k != k) { /* the optimum's labels, once per cache size */
                    memcpy(truth, orig, n * sizeof *truth);
                    st = page_label_discard(truth, n, k, NULL);
                    truth_k = st == KVS_OK ? k : 0;
                }
                memcpy(w, truth, n * sizeof *w);
                if (st == KVS_OK && !strncmp(b, "flip=", 5))
                    st = page_flip_bits(w, n, flips[(r - first_pred) / 2 - 1], (uint64_t)seed * 1000003u + (uint64_t)k);
                if (!strcmp(b, "adversarial")) page_invert_bits(w, n);
            } else if (!strcmp(b, "online")) st = page_label_online(w, n, k);
            /* "file": the trace's own bits; "none": bits unused */
            struct page_cfg cfg = {.kind = R->kind, .capacity = k, .seed = (uint64_t)seed, .beta = beta,
                                   .trace = w, .n_trace = n};
            struct page_cache *c = NULL;
            if (st == KVS_OK) st = page_cache_new(&cfg, &c);
            for (size_t i = 0; i < n && st == KVS_OK; i++) st = page_access(c, &w[i], NULL);
            if (st != KVS_OK) {
                fprintf(stderr, "kvsieve pagesim: %s at k=%lld: %s\n", R->policy, (long long)k, kvs_last_error());
                rc = 1;
            } else {
                R->faults[ki] = c->faults;
                R->switches[ki] = page_robust_switches(c);
            }
            page_cache_free(c);
        }
    }
    if (rc) goto done;

    if (json) {
        for (int ki = 0; ki < nk; ki++)
            for (int r = 0; r < nr; r++) {
                int64_t opt = rows[opt_row].faults[ki];
                printf("{\"trace\":\"");
                for (const char *p = label; *p; p++) {
                    if (*p == '"' || *p == '\\') printf("\\%c", *p);
                    else if ((unsigned char)*p < 0x20) printf("\\u%04x", (unsigned char)*p);
                    else putchar(*p);
                }
                printf("\",\"n\":%zu,\"distinct\":%zu,\"k\":%lld,\"policy\":\"%s\",\"bits\":\"%s\",\"faults\":%lld,"
                       "\"opt\":%lld,\"ratio\":%.4f,\"hit_rate\":%.4f",
                       n, distinct, (long long)ks[ki], rows[r].policy, rows[r].bits, (long long)rows[r].faults[ki],
                       (long long)opt, opt ? (double)rows[r].faults[ki] / (double)opt : 1.0,
                       1.0 - (double)rows[r].faults[ki] / (double)n);
                if (rows[r].kind == PAGE_PRED_ROBUST) printf(",\"switches\":%lld", (long long)rows[r].switches[ki]);
                printf("}\n");
            }
    } else {
        printf("trace %s: %zu requests, %zu distinct pages\n", label, n, distinct);
        printf("faults (ratio to opt)\n%-10s %-14s", "policy", "bits");
        for (int ki = 0; ki < nk; ki++) {
            char h[32];
            snprintf(h, sizeof h, "k=%lld", (long long)ks[ki]);
            printf(" %18s", h);
        }
        printf("\n");
        for (int r = 0; r < nr; r++) {
            printf("%-10s %-14s", rows[r].policy, rows[r].bits);
            for (int ki = 0; ki < nk; ki++) {
                int64_t opt = rows[opt_row].faults[ki];
                char cell[64];
                snprintf(cell, sizeof cell, "%lld (%.3f)", (long long)rows[r].faults[ki],
                         opt ? (double)rows[r].faults[ki] / (double)opt : 1.0);
                printf(" %18s", cell);
            }
            printf("\n");
        }
    }
done:
    free(w), free(orig), free(truth), free(rows), free(t);
    return rc;
}
