/*
 * core/pool.c: see pool.h. A job is published by bumping a generation number (after its
 * function, argument and task count are written), tasks are claimed with an atomic
 * counter, and the last worker to finish tells the caller. Between jobs a worker first
 * spins on the generation for a short while (POOL_SPIN_NS: decoding a token runs a few
 * dozen jobs back to back, and waking a sleeping thread costs microseconds each time),
 * then sleeps on a condition variable; the caller likewise spins a while for the workers
 * before sleeping. Who sleeps is counted under the mutex, so a wake-up is never lost and
 * never sent for nothing.
 */
#include "core/pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "core/error.h"

#define POOL_SPIN_NS 50000 /* 50 us */

struct ferry_pool {
    int32_t n_threads;
    pthread_t *workers; /* n_threads - 1 */
    int32_t n_started;

    pthread_mutex_t mu;
    pthread_cond_t wake;       /* sleeping workers wait for a new generation */
    pthread_cond_t done;       /* a sleeping caller waits for the job to finish */
    int32_t n_sleeping;        /* workers in cond_wait (under mu) */
    int caller_sleeping;       /* the caller is in cond_wait (under mu) */
    atomic_uint_fast64_t generation;
    atomic_int stop;

    /* the current job: written before the generation is bumped */
    ferry_pool_fn fn;
    void *arg;
    int32_t n_tasks;
    atomic_int next_task;
    atomic_int n_busy; /* workers still inside the current job */
};

int32_t ferry_pool_default_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > 1024 ? 1024 : (int32_t)n);
}

static void run_tasks(ferry_pool *p, ferry_pool_fn fn, void *arg, int32_t n_tasks)
{
    for (;;) {
        int32_t i = atomic_fetch_add(&p->next_task, 1);
        if (i >= n_tasks)
            break;
        fn(arg, i);
    }
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Spins until done(p, user) or POOL_SPIN_NS pass; returns done's last answer. */
static int spin_until(ferry_pool *p, int (*done)(ferry_pool *, uint64_t), uint64_t user)
{
    int64_t t0 = 0;
    for (uint32_t i = 0;; i++) {
        if (done(p, user))
            return 1;
        cpu_relax();
        if ((i & 63) == 63) {
            int64_t t = now_ns();
            if (!t0)
                t0 = t;
            else if (t - t0 > POOL_SPIN_NS)
                return done(p, user);
        }
    }
}

static int new_job_or_stop(ferry_pool *p, uint64_t seen)
{
    return atomic_load(&p->stop) || atomic_load(&p->generation) != seen;
}

static int job_finished(ferry_pool *p, uint64_t unused)
{
    (void)unused;
    return atomic_load(&p->n_busy) == 0;
}

static void *worker_main(void *vp)
{
    ferry_pool *p = vp;
    uint64_t seen = 0;
    for (;;) {
        if (!spin_until(p, new_job_or_stop, seen)) {
            pthread_mutex_lock(&p->mu);
            while (!new_job_or_stop(p, seen)) {
                p->n_sleeping++;
                pthread_cond_wait(&p->wake, &p->mu);
                p->n_sleeping--;
            }
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop))
            break;
        seen = atomic_load(&p->generation);
        run_tasks(p, p->fn, p->arg, p->n_tasks);
        if (atomic_fetch_sub(&p->n_busy, 1) == 1) {
            pthread_mutex_lock(&p->mu);
            if (p->caller_sleeping)
                pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
    }
    return NULL;
}

ferry_status ferry_pool_create(int32_t n_threads, ferry_pool **out)
{
    if (n_threads <= 0)
        n_threads = ferry_pool_default_threads();
    if (n_threads > 1024)
        return ferry_fail(FERRY_ERR_INVALID, "thread count %d is more than 1024", (int)n_threads);
    ferry_pool *p = calloc(1, sizeof *p);
    if (!p)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for the thread pool");
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    atomic_init(&p->next_task, 0);
    atomic_init(&p->n_busy, 0);
    atomic_init(&p->generation, 0);
    atomic_init(&p->stop, 0);
    if (n_threads > 1) {
        p->workers = calloc((size_t)n_threads - 1, sizeof *p->workers);
        if (!p->workers)
            goto nomem;
        for (int32_t i = 0; i < n_threads - 1; i++) {
            if (pthread_create(&p->workers[i], NULL, worker_main, p) != 0) {
                ferry_pool_destroy(p);
                return ferry_fail(FERRY_ERR_NOMEM, "cannot start worker thread %d of %d",
                                  (int)i + 1, (int)n_threads - 1);
            }
            p->n_started++;
        }
    }
    *out = p;
    return FERRY_OK;
nomem:
    ferry_pool_destroy(p);
    return ferry_fail(FERRY_ERR_NOMEM, "out of memory for the thread pool");
}

void ferry_pool_destroy(ferry_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int32_t i = 0; i < p->n_started; i++)
        pthread_join(p->workers[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    free(p->workers);
    free(p);
}

int32_t ferry_pool_pin(ferry_pool *p, const int32_t *cpus, int32_t n_cpus)
{
    int32_t pinned = 0;
    if (!p || !cpus || n_cpus <= 0)
        return 0;
    for (int32_t i = 0; i < p->n_started; i++) {
        int32_t cpu = cpus[(i + 1) % n_cpus];
        if (cpu < 0 || cpu >= CPU_SETSIZE)
            continue;
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        pinned += pthread_setaffinity_np(p->workers[i], sizeof set, &set) == 0;
    }
    return pinned;
}

int32_t ferry_pool_size(const ferry_pool *p) { return p->n_threads; }

void ferry_pool_run(ferry_pool *p, int32_t n_tasks, ferry_pool_fn fn, void *arg)
{
    if (n_tasks <= 0)
        return;
    if (p->n_started == 0 || n_tasks == 1) {
        for (int32_t i = 0; i < n_tasks; i++)
            fn(arg, i);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    p->n_tasks = n_tasks;
    atomic_store(&p->next_task, 0);
    atomic_store(&p->n_busy, p->n_started);
    atomic_fetch_add(&p->generation, 1); /* publishes the job */
    pthread_mutex_lock(&p->mu);
    if (p->n_sleeping > 0)
        pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);

    run_tasks(p, fn, arg, n_tasks);

    if (!spin_until(p, job_finished, 0)) {
        pthread_mutex_lock(&p->mu);
        while (!job_finished(p, 0)) {
            p->caller_sleeping = 1;
            pthread_cond_wait(&p->done, &p->mu);
        }
        p->caller_sleeping = 0;
        pthread_mutex_unlock(&p->mu);
    }
}
