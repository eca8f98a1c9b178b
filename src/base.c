/* base.c — status text, last-error buffer, asserts, log sink, aligned allocation, clock. */
#include "base.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

static _Thread_local char last_error[512];

static kvs_log_fn log_fn;
static void *log_user;
static int log_level = 2;

const char *kvs_status_str(enum kvs_status st) {
    switch (st) {
    case KVS_OK: return "ok";
    case KVS_ERR_IO: return "i/o error";
    case KVS_ERR_FORMAT: return "malformed file";
    case KVS_ERR_UNSUPPORTED: return "unsupported";
    case KVS_ERR_NOMEM: return "out of memory";
    case KVS_ERR_INVALID_ARG: return "invalid argument";
    case KVS_ERR_CONTEXT_FULL: return "context full";
    case KVS_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

const char *kvs_last_error(void) { return last_error; }

enum kvs_status kvs_fail(enum kvs_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return st;
}

void kvs_assert_fail(const char *file, int line, const char *expr) {
    fprintf(stderr, "kvsieve: assertion failed at %s:%d: %s\n", file, line, expr);
    fflush(stderr);
    abort();
}

void kvs_set_log_callback(kvs_log_fn fn, void *user) {
    log_fn = fn;
    log_user = user;
}

void kvs_set_log_level(int max_level) { log_level = max_level; }

void kvs_log(int level, const char *fmt, ...) {
    if (level > log_level) return;
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (log_fn) {
        log_fn(level, buf, log_user);
    } else {
        static const char *tag[] = {"error", "warning", "info", "debug"};
        fprintf(stderr, "kvsieve: %s: %s\n", tag[level < 0 ? 0 : level > 3 ? 3 : level], buf);
    }
}

void *kvs_aligned_alloc(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
    return p;
}

void kvs_aligned_free(void *p) { free(p); }

double kvs_time_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

bool kvs_cpu_has_avx2(void) {
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28),
         f16c = c & (1u << 29);
    if (!(fma && osxsave && avx && f16c)) return false;
    unsigned xlo, xhi;
    __asm__("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    if ((xlo & 6) != 6) return false; /* OS saves xmm and ymm state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return b & (1u << 5); /* AVX2 */
#else
    return false;
#endif
}
