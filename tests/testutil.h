/* testutil.h — a tiny test harness: CHECK macros that count failures and report file:line,
 * and helpers for comparing float arrays by normalised error. Header-only: each tests/test_*.c
 * is one executable whose exit status is the verdict (0 = pass, 77 = skipped). */
#ifndef KVS_TESTUTIL_H
#define KVS_TESTUTIL_H
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <stdarg.h>

static int tu_failures = 0, tu_checks = 0;

#define CHECK(cond)                                                                           \
    do {                                                                                      \
        tu_checks++;                                                                          \
        if (!(cond)) {                                                                        \
            tu_failures++;                                                                    \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);          \
        }                                                                                     \
    } while (0)

#define CHECKF(cond, ...)                                                                     \
    do {                                                                                      \
        tu_checks++;                                                                          \
        if (!(cond)) {                                                                        \
            tu_failures++;                                                                    \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond);          \
            fprintf(stderr, __VA_ARGS__);                                                     \
            fputc('\n', stderr);                                                              \
        }                                                                                     \
    } while (0)

/* normalised mean squared error: sum (a-b)^2 / sum b^2 (b is the reference) */
static inline double tu_nmse(const float *a, const float *ref, long n) {
    double num = 0, den = 0;
    for (long i = 0; i < n; i++) {
        double d = (double)a[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? num / den : num;
}

static inline double tu_max_abs_diff(const float *a, const float *b, long n) {
    double m = 0;
    for (long i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > m || d != d) m = d;
    }
    return m;
}

/* xorshift RNG for reproducible random test data */
static unsigned long long tu_rng_state = 0x9E3779B97F4A7C15ull;
static inline unsigned long long tu_rand_u64(void) {
    unsigned long long x = tu_rng_state;
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    return tu_rng_state = x;
}
static inline float tu_randf(void) { /* uniform [-1, 1) */
    return (float)((tu_rand_u64() >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}

/* Skips: a test that cannot run a part says so on one line, "SKIP <what> (<why>)", which
 * tests/run.sh counts; a test that can run nothing at all then also exits 77. A model that is
 * present but fails to load is a failure, never a skip. */
static inline void tu_skip(const char *what, const char *why_fmt, ...)
    __attribute__((format(printf, 2, 3)));
static inline void tu_skip(const char *what, const char *why_fmt, ...) {
    va_list ap;
    va_start(ap, why_fmt);
    fprintf(stderr, "SKIP %s (", what);
    vfprintf(stderr, why_fmt, ap);
    fprintf(stderr, ")\n");
    va_end(ap);
}

/* the test model's path: KVS_TEST_MODEL or the SmolLM2 default */
static inline const char *tu_model_name(void) {
    const char *p = getenv("KVS_TEST_MODEL");
    return p ? p : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

/* path of the test model, or NULL when the file is absent (the test then prints a SKIP line
 * with tu_skip and exits 77, or skips the parts that need it) */
static inline const char *tu_model_path(void) {
    const char *p = tu_model_name();
    FILE *f = fopen(p, "rb");
    if (!f) return NULL;
    fclose(f);
    return p;
}

static inline int tu_finish(const char *name) {
    if (tu_failures) {
        fprintf(stderr, "%s: %d of %d checks FAILED\n", name, tu_failures, tu_checks);
        return 1;
    }
    fprintf(stderr, "%s: all %d checks passed\n", name, tu_checks);
    return 0;
}
#endif
