/*
 * offload/prefetch.h: the fetch pipeline that fills expert cache slots.
 *
 * Requests name a slot the cache assigned to (layer, expert). One worker thread serves
 * them, demand misses first (in arrival order), then prefetches by score, in batches (every
 * queued demand, or two prefetches): for each it gets the expert's bytes from the store
 * (RAM, or NVMe through the host cache) and submits the copy into the device slot on the
 * backend's copy queue; then it waits for the copies in order and marks each slot ready as
 * its copy lands (or failed, keeping the message). Submitting a layer's misses together
 * keeps the copy engine busy from one expert to the next, so small experts still move at
 * the bus's bandwidth. A wrong prefetch costs bandwidth, never
 * correctness: the data in a slot is always the expert the cache says it is.
 *
 * Threads: ferry_prefetch_demand, _promote, _hint and _cancel are called by the one
 * thread running the forward pass; the worker only serves. Prefetches are deduplicated
 * through the cache (an expert resident or in flight is not fetched again), the bytes of
 * queued prefetches are bounded, and prefetches still queued when they become stale are
 * cancelled (their slots go back to the cache empty).
 */
#ifndef FERRY_OFFLOAD_PREFETCH_H
#define FERRY_OFFLOAD_PREFETCH_H

#include <stddef.h>
#include <stdint.h>

#include "ferry.h"
#include "kernels/backend.h"
#include "offload/cache.h"
#include "offload/store.h"

typedef struct ferry_prefetch ferry_prefetch;

typedef struct {
    char *d_slots;              /* the slot arena on the device: n_slots x slot_bytes */
    size_t slot_bytes;
    int32_t n_slots;
    int32_t n_layers;           /* for the per-layer byte counts */
    size_t max_prefetch_bytes;  /* queued prefetches beyond this are not issued */
} ferry_prefetch_params;

/* Starts the worker. Borrows be, store and cache, which must outlive the pipeline.
 * FERRY_ERR_NOMEM, FERRY_ERR_INVALID. */
ferry_status ferry_prefetch_create(const ferry_prefetch_params *p, ferry_backend *be,
                                   ferry_store *store, ferry_cache *cache, ferry_prefetch **out);

/* Cancels queued prefetches, waits for the batch in service, stops the worker.
 * NULL-safe. */
void ferry_prefetch_destroy(ferry_prefetch *pf);

/* A demand miss: slot was returned FERRY_CACHE_FILL by a demand acquire of (layer,
 * expert). The caller keeps its pin and waits with ferry_cache_wait_ready. */
ferry_status ferry_prefetch_demand(ferry_prefetch *pf, int32_t layer, int32_t expert,
                                   int32_t slot);

/* The forward pass needs (layer, expert), which an earlier prefetch is filling
 * (FERRY_CACHE_PENDING): serve it next and never cancel it. */
void ferry_prefetch_promote(ferry_prefetch *pf, int32_t layer, int32_t expert);

/* The predictor's entry point: these experts of layer will probably be needed soon, with
 * these scores (higher first). Each one not resident or in flight is given a slot and
 * queued, within the byte bound. Returns how many were issued. */
int32_t ferry_prefetch_hint(ferry_prefetch *pf, int32_t layer, const int32_t *experts,
                            const float *scores, int32_t n);

/* Cancels queued prefetches for layer (they are stale: the forward pass got there).
 * Returns how many were cancelled. */
int32_t ferry_prefetch_cancel(ferry_prefetch *pf, int32_t layer);

/* Blocks until nothing is queued or in service (for simulations that want each
 * prefetch to land before the next demand). */
void ferry_prefetch_drain(ferry_prefetch *pf);

/* After ferry_cache_wait_ready failed on a slot: the failure's status and message for
 * (layer, expert), re-raised as this thread's last error. */
ferry_status ferry_prefetch_failure(ferry_prefetch *pf, int32_t layer, int32_t expert);

typedef struct {
    uint64_t bytes_to_device;  /* copied into slots */
    uint64_t fills;            /* slots filled (demand + prefetch) */
    uint64_t prefetch_cancelled;
    uint64_t prefetch_skipped; /* hints dropped by the byte bound or a full cache */
    double copy_seconds;       /* while a copy was in flight (from a copy's submission, or
                                  the previous one's landing, to its landing): the fetch
                                  rate is bytes_to_device / copy_seconds */
} ferry_prefetch_stats;

void ferry_prefetch_get_stats(ferry_prefetch *pf, ferry_prefetch_stats *out);

/* Bytes copied into slots for each layer's experts: out[n_layers]. */
void ferry_prefetch_layer_bytes(ferry_prefetch *pf, uint64_t *out);

#endif
