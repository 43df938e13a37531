/*
 * core/pool.c: see pool.h. Workers sleep on a condition variable between jobs; a job is
 * published by bumping a generation number, tasks are claimed with an atomic counter,
 * and the last finisher wakes the caller.
 */
#include "core/pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "core/error.h"

struct ferry_pool {
    int32_t n_threads;
    pthread_t *workers; /* n_threads - 1 */
    int32_t n_started;

    pthread_mutex_t mu;
    pthread_cond_t wake; /* workers wait for a new generation */
    pthread_cond_t done; /* the caller waits for the job to finish */
    uint64_t generation;
    int stop;

    /* the current job */
    ferry_pool_fn fn;
    void *arg;
    int32_t n_tasks;
    atomic_int next_task;
    int32_t n_busy; /* workers still inside the current job (under mu) */
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

static void *worker_main(void *vp)
{
    ferry_pool *p = vp;
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->generation == seen)
            pthread_cond_wait(&p->wake, &p->mu);
        if (p->stop)
            break;
        seen = p->generation;
        ferry_pool_fn fn = p->fn;
        void *arg = p->arg;
        int32_t n_tasks = p->n_tasks;
        pthread_mutex_unlock(&p->mu);
        run_tasks(p, fn, arg, n_tasks);
        pthread_mutex_lock(&p->mu);
        if (--p->n_busy == 0)
            pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
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
    p->stop = 1;
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
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->n_tasks = n_tasks;
    atomic_store(&p->next_task, 0);
    p->n_busy = p->n_started;
    p->generation++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);

    run_tasks(p, fn, arg, n_tasks);

    pthread_mutex_lock(&p->mu);
    while (p->n_busy > 0)
        pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
