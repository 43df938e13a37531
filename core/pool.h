/*
 * core/pool.h: a fixed pool of worker threads that runs data-parallel loops.
 *
 * ferry_pool_run hands task indices 0..n_tasks-1 to the workers and to the calling
 * thread, and returns when every task is done. Which thread runs which task varies, so
 * a task must write only its own part of the output: results never depend on the
 * number of threads or the schedule.
 */
#ifndef FERRY_CORE_POOL_H
#define FERRY_CORE_POOL_H

#include <stdint.h>

#include "ferry.h"

typedef struct ferry_pool ferry_pool;

typedef void (*ferry_pool_fn)(void *arg, int32_t task);

/* Number of online cores (at least 1). */
int32_t ferry_pool_default_threads(void);

/* Creates a pool of n_threads threads in all (the caller counts as one, so n_threads - 1
 * workers start). n_threads <= 0 means every online core. On success *out owns the pool.
 * FERRY_ERR_NOMEM, FERRY_ERR_INVALID (more than 1024 threads). */
ferry_status ferry_pool_create(int32_t n_threads, ferry_pool **out);

/* Stops and joins the workers. NULL-safe. */
void ferry_pool_destroy(ferry_pool *p);

/* Pins worker i (the workers, not the calling thread) to logical CPU cpus[(i + 1) % n_cpus],
 * so with one CPU per physical core no two workers share a core's hardware threads and the
 * scheduler does not move them between runs. Returns how many workers were pinned (the
 * system may refuse; the pool works the same unpinned). Call before the first run. */
int32_t ferry_pool_pin(ferry_pool *p, const int32_t *cpus, int32_t n_cpus);

/* Threads in the pool, the caller included. */
int32_t ferry_pool_size(const ferry_pool *p);

/* Runs fn(arg, i) for every i in [0, n_tasks) and waits for all of them. One caller at a
 * time per pool (the contexts of one model serialise through the backend). */
void ferry_pool_run(ferry_pool *p, int32_t n_tasks, ferry_pool_fn fn, void *arg);

#endif
