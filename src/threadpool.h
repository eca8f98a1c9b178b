/* threadpool.h — a fixed set of worker threads that run one data-parallel job at a time.
 *
 * threadpool_run(pool, fn, arg) calls fn(arg, ith, nth) for ith = 0..nth-1, the caller itself
 * running ith = 0, and returns when all have finished. Workers spin briefly between jobs (a
 * decode step issues a few hundred small jobs, and a condition-variable wake costs more than the
 * job) and then sleep, so an idle engine uses no CPU.
 * Does not: allocate after init, queue several jobs, or nest (fn must not call threadpool_run).
 */
#ifndef KVS_THREADPOOL_H
#define KVS_THREADPOOL_H

struct threadpool;
typedef void (*threadpool_fn)(void *arg, int ith, int nth);

struct threadpool *threadpool_new(int n_threads); /* NULL on failure; n_threads >= 1 */
void threadpool_free(struct threadpool *tp);
int threadpool_n_threads(const struct threadpool *tp);
void threadpool_run(struct threadpool *tp, threadpool_fn fn, void *arg);

/* Split [0, n) into nth near-equal parts; part ith is [*lo, *hi). */
static inline void threadpool_split(int n, int ith, int nth, int *lo, int *hi) {
    int q = n / nth, r = n % nth;
    *lo = ith * q + (ith < r ? ith : r);
    *hi = *lo + q + (ith < r ? 1 : 0);
}

int threadpool_default_threads(void); /* online CPUs */

#endif
