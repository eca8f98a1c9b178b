/* base.h — status codes, always-on asserts, small helpers shared by every module.
 *
 * Does: define enum kvs_status (re-exported by include/kvsieve.h), KVS_ASSERT (always on,
 * reports file:line and aborts: for broken invariants only, never for bad input), an error
 * text buffer per thread so library calls can return a status plus a readable message, and a
 * log sink (stderr by default, replaceable) used for warnings/progress.
 * Does not: print to stdout or call exit().
 */
#ifndef KVS_BASE_H
#define KVS_BASE_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include "../include/kvsieve.h"

#define KVS_ASSERT(cond)                                                                      \
    do {                                                                                      \
        if (!(cond)) kvs_assert_fail(__FILE__, __LINE__, #cond);                              \
    } while (0)

_Noreturn void kvs_assert_fail(const char *file, int line, const char *expr);

/* Sets the calling thread's last-error text (printf-style) and returns `st` so that callers can
 * write `return kvs_fail(KVS_ERR_FORMAT, "%s: truncated", path);`. */
enum kvs_status kvs_fail(enum kvs_status st, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Logging: level 0 = error, 1 = warn, 2 = info, 3 = debug. Goes to the sink set with
 * kvs_set_log_callback (include/kvsieve.h); stderr when none. */
void kvs_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Checked allocation: returns NULL on failure (caller turns it into KVS_ERR_NOMEM). Aligned to 64
 * bytes so SIMD loads of whole rows never straddle a cache line needlessly. */
void *kvs_aligned_alloc(size_t bytes);
void kvs_aligned_free(void *p);

double kvs_time_ms(void); /* monotonic clock, milliseconds */

/* True when the CPU (and OS, for the ymm state) supports AVX2, FMA and F16C: the feature set of
 * every *_avx2.c file. Read once with cpuid/xgetbv; portable across gcc and clang. */
bool kvs_cpu_has_avx2(void);

static inline size_t kvs_pad(size_t x, size_t a) { return (x + a - 1) / a * a; }

#endif
