/* threadpool.c — see threadpool.h. One job slot guarded by a generation counter: run() bumps
 * the generation, workers notice it (spinning, then on a condvar), run their share and count
 * down `pending`; run() spins until pending reaches zero. */
#include "threadpool.h"
#include "base.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

/* Waiting: a few thousand pause instructions (a job is often microseconds away), then
 * sched_yield so that an oversubscribed machine runs whoever holds the work, then (workers only)
 * sleep on the condition variable. */
enum { SPIN_PAUSE = 4000, SPIN_YIELD = 20000 };

struct worker { struct threadpool *tp; int ith; pthread_t th; };

struct threadpool {
    int n;
    struct worker *w;
    threadpool_fn fn;
    void *arg;
    _Atomic unsigned gen;
    _Atomic int pending;
    _Atomic int sleepers;
    _Atomic int quit;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

static void *worker_main(void *p) {
    struct worker *w = p;
    struct threadpool *tp = w->tp;
    unsigned seen = 0;
    for (;;) {
        unsigned g;
        int spins = 0;
        while ((g = atomic_load_explicit(&tp->gen, memory_order_acquire)) == seen) {
            if (++spins < SPIN_PAUSE) {
                CPU_RELAX();
                continue;
            }
            if (spins < SPIN_PAUSE + SPIN_YIELD) {
                sched_yield();
                continue;
            }
            pthread_mutex_lock(&tp->mu);
            atomic_fetch_add(&tp->sleepers, 1);
            while (atomic_load(&tp->gen) == seen && !atomic_load(&tp->quit))
                pthread_cond_wait(&tp->cv, &tp->mu);
            atomic_fetch_sub(&tp->sleepers, 1);
            pthread_mutex_unlock(&tp->mu);
            spins = 0;
        }
        seen = g;
        if (atomic_load(&tp->quit)) return NULL;
        tp->fn(tp->arg, w->ith, tp->n);
        atomic_fetch_sub_explicit(&tp->pending, 1, memory_order_acq_rel);
    }
}

int threadpool_default_threads(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (int)n;
}

struct threadpool *threadpool_new(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    struct threadpool *tp = calloc(1, sizeof *tp);
    if (!tp) return NULL;
    tp->n = n_threads;
    pthread_mutex_init(&tp->mu, NULL);
    pthread_cond_init(&tp->cv, NULL);
    tp->w = calloc((size_t)n_threads, sizeof *tp->w);
    if (!tp->w) {
        free(tp);
        return NULL;
    }
    for (int i = 1; i < n_threads; i++) {
        tp->w[i].tp = tp;
        tp->w[i].ith = i;
        if (pthread_create(&tp->w[i].th, NULL, worker_main, &tp->w[i]) != 0) {
            tp->n = i; /* shut down the ones started */
            threadpool_free(tp);
            return NULL;
        }
    }
    return tp;
}

int threadpool_n_threads(const struct threadpool *tp) { return tp->n; }

static void wake_all(struct threadpool *tp) {
    if (atomic_load(&tp->sleepers) > 0) {
        pthread_mutex_lock(&tp->mu);
        pthread_cond_broadcast(&tp->cv);
        pthread_mutex_unlock(&tp->mu);
    }
}

void threadpool_run(struct threadpool *tp, threadpool_fn fn, void *arg) {
    if (tp->n == 1) {
        fn(arg, 0, 1);
        return;
    }
    tp->fn = fn;
    tp->arg = arg;
    atomic_store(&tp->pending, tp->n - 1);
    /* the mutex orders this bump against a worker that is about to sleep */
    pthread_mutex_lock(&tp->mu);
    atomic_fetch_add_explicit(&tp->gen, 1, memory_order_release);
    pthread_mutex_unlock(&tp->mu);
    wake_all(tp);
    fn(arg, 0, tp->n);
    for (int spins = 0; atomic_load_explicit(&tp->pending, memory_order_acquire) > 0; spins++) {
        if (spins < SPIN_PAUSE) CPU_RELAX();
        else sched_yield();
    }
}

void threadpool_free(struct threadpool *tp) {
    if (!tp) return;
    pthread_mutex_lock(&tp->mu);
    atomic_store(&tp->quit, 1);
    atomic_fetch_add(&tp->gen, 1);
    pthread_cond_broadcast(&tp->cv);
    pthread_mutex_unlock(&tp->mu);
    for (int i = 1; i < tp->n; i++) pthread_join(tp->w[i].th, NULL);
    pthread_mutex_destroy(&tp->mu);
    pthread_cond_destroy(&tp->cv);
    free(tp->w);
    free(tp);
}
