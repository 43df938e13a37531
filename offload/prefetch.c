/*
 * offload/prefetch.c: see prefetch.h. The queue is a small array (at most one request per
 * slot, since a request owns its slot until served), scanned for the best request.
 */
#include "offload/prefetch.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/error.h"

typedef struct {
    int32_t layer, expert, slot;
    int demand;   /* a demand miss or a promoted prefetch: served first, never cancelled */
    int owns_pin; /* issued as a prefetch: the worker drops the prefetch's pin when done */
    float score;
    uint64_t seq; /* arrival order */
} fetch_req;

struct ferry_prefetch {
    ferry_prefetch_params p;
    ferry_backend *be;
    ferry_store *store;
    ferry_cache *cache;

    pthread_t worker;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t work;
    fetch_req *queue; /* (n_slots) */
    int32_t n_queued;
    uint64_t seq;
    size_t queued_prefetch_bytes;
    int stop;
    int busy;            /* the worker is serving a request */
    pthread_cond_t idle; /* signalled when the queue empties and the worker is done */

    /* the last failure, for the thread that waits on the slot */
    int32_t fail_layer, fail_expert;
    ferry_status fail_code;
    char fail_msg[512];

    ferry_prefetch_stats stats;
    uint64_t *layer_bytes; /* (n_layers) */
};

/* Index of the request to serve next: the oldest demand, else the best-scored prefetch.
 * Called with mu held; -1 when the queue is empty. */
static int32_t pick(const ferry_prefetch *pf)
{
    int32_t best = -1;
    for (int32_t i = 0; i < pf->n_queued; i++) {
        const fetch_req *r = &pf->queue[i], *b = best >= 0 ? &pf->queue[best] : NULL;
        if (!b || (r->demand && !b->demand) ||
            (r->demand == b->demand &&
             (r->demand ? r->seq < b->seq
                        : (r->score > b->score || (r->score == b->score && r->seq < b->seq)))))
            best = i;
    }
    return best;
}

static void remove_at(ferry_prefetch *pf, int32_t i)
{
    pf->queue[i] = pf->queue[--pf->n_queued];
}

/* Requests one worker pass serves: every queued demand up to this many, or up to
 * PREFETCH_BATCH prefetches (so a demand arriving meanwhile waits behind few copies). Their
 * copies are all submitted before the first wait, so the copy engine goes from one expert to
 * the next without a round trip to this thread: what keeps small experts (Qwen3's 9 MiB, or
 * 3 MiB in q4) near the bus's bandwidth. */
#define DEMAND_BATCH 16
#define PREFETCH_BATCH 2

/* One request of a batch in flight. */
typedef struct {
    fetch_req r;
    ferry_status st;
    uint64_t ticket;
    size_t n_bytes;
    double t_submit;
    int held; /* the store's bytes are held (ferry_store_put owed) */
} fetch_job;

/* Ends one job: the slot marked ready or failed, the store's bytes and a prefetch's pin
 * released, the failure recorded for the waiter. */
static void finish_job(ferry_prefetch *pf, fetch_job *j)
{
    if (j->held)
        ferry_store_put(pf->store, j->r.layer, j->r.expert);
    if (j->st == FERRY_OK) {
        ferry_cache_mark_ready(pf->cache, j->r.slot);
    } else {
        pthread_mutex_lock(&pf->mu);
        pf->fail_layer = j->r.layer;
        pf->fail_expert = j->r.expert;
        pf->fail_code = j->st;
        snprintf(pf->fail_msg, sizeof pf->fail_msg, "%s", ferry_last_error());
        pthread_mutex_unlock(&pf->mu);
        ferry_cache_mark_failed(pf->cache, j->r.slot);
    }
    /* a prefetch's own pin; a demand's pin belongs to the forward pass */
    if (j->r.owns_pin)
        ferry_cache_release(pf->cache, j->r.slot);
}

/* Serves jobs[0..n): submits every copy (reading each expert from the store just before
 * its copy, so an NVMe read overlaps the copies before it), then waits for them in order.
 * Returns how many were served; the rest (a host cache with no free buffer left for them)
 * go back to the queue. Copy time counts while a copy of the batch is in flight. */
static int32_t serve_batch(ferry_prefetch *pf, fetch_job *jobs, int32_t n)
{
    int32_t n_issued = 0;
    for (; n_issued < n; n_issued++) {
        fetch_job *j = &jobs[n_issued];
        const void *bytes;
        j->st = ferry_store_get(pf->store, j->r.layer, j->r.expert, &bytes);
        if (j->st == FERRY_ERR_NOMEM && n_issued > 0)
            break; /* buffers come back as this batch lands: serve the rest after it */
        if (j->st)
            continue;
        j->held = 1;
        j->n_bytes = ferry_expert_layout_bytes(ferry_store_layout(pf->store, j->r.layer,
                                                                  j->r.expert));
        char *dst = pf->p.d_slots + (size_t)j->r.slot * pf->p.slot_bytes;
        j->t_submit = ferry_now_seconds();
        j->st = pf->be->ops->copy_async(pf->be, dst, bytes, j->n_bytes, &j->ticket);
    }
    double busy = 0, t_prev = 0;
    uint64_t landed_bytes = 0;
    for (int32_t i = 0; i < n_issued; i++) {
        fetch_job *j = &jobs[i];
        if (j->st == FERRY_OK) {
            j->st = pf->be->ops->copy_wait(pf->be, j->ticket);
            double t = ferry_now_seconds();
            if (j->st == FERRY_OK) {
                busy += t - (j->t_submit > t_prev ? j->t_submit : t_prev);
                t_prev = t;
                landed_bytes += j->n_bytes;
                pthread_mutex_lock(&pf->mu);
                pf->layer_bytes[j->r.layer] += j->n_bytes;
                pf->stats.fills++;
                pthread_mutex_unlock(&pf->mu);
            }
        }
        finish_job(pf, j);
    }
    pthread_mutex_lock(&pf->mu);
    pf->stats.copy_seconds += busy;
    pf->stats.bytes_to_device += landed_bytes;
    for (int32_t i = n_issued; i < n; i++) { /* back in the queue, as they were */
        pf->queue[pf->n_queued++] = jobs[i].r;
        if (!jobs[i].r.demand)
            pf->queued_prefetch_bytes += pf->p.slot_bytes;
    }
    pthread_mutex_unlock(&pf->mu);
    return n_issued;
}

static void *worker_main(void *vp)
{
    ferry_prefetch *pf = vp;
    fetch_job jobs[DEMAND_BATCH];
    pthread_mutex_lock(&pf->mu);
    for (;;) {
        while (!pf->stop && pf->n_queued == 0)
            pthread_cond_wait(&pf->work, &pf->mu);
        if (pf->stop)
            break;
        /* the batch: the next request, and after it the ones of its kind that follow */
        int32_t n = 0;
        int demand = pf->queue[pick(pf)].demand;
        int32_t cap = demand ? DEMAND_BATCH : PREFETCH_BATCH;
        while (n < cap && pf->n_queued > 0) {
            int32_t i = pick(pf);
            if (pf->queue[i].demand != demand)
                break;
            memset(&jobs[n], 0, sizeof jobs[n]);
            jobs[n++].r = pf->queue[i];
            remove_at(pf, i);
            if (!demand)
                pf->queued_prefetch_bytes -= pf->p.slot_bytes;
        }
        pf->busy = 1;
        pthread_mutex_unlock(&pf->mu);

        serve_batch(pf, jobs, n);

        pthread_mutex_lock(&pf->mu);
        pf->busy = 0;
        if (pf->n_queued == 0)
            pthread_cond_broadcast(&pf->idle);
    }
    pthread_mutex_unlock(&pf->mu);
    return NULL;
}

ferry_status ferry_prefetch_create(const ferry_prefetch_params *p, ferry_backend *be,
                                   ferry_store *store, ferry_cache *cache, ferry_prefetch **out)
{
    if (!p || !be || !store || !cache || !p->d_slots || p->n_slots <= 0 || !p->slot_bytes ||
        p->n_layers <= 0)
        return ferry_fail(FERRY_ERR_INVALID, "prefetch: invalid parameters");
    ferry_prefetch *pf = calloc(1, sizeof *pf);
    if (!pf)
        return ferry_fail(FERRY_ERR_NOMEM, "prefetch: out of memory");
    pf->p = *p;
    pf->be = be;
    pf->store = store;
    pf->cache = cache;
    pf->fail_layer = pf->fail_expert = -1;
    pthread_mutex_init(&pf->mu, NULL);
    pthread_cond_init(&pf->work, NULL);
    pthread_cond_init(&pf->idle, NULL);
    pf->queue = calloc((size_t)p->n_slots, sizeof *pf->queue);
    pf->layer_bytes = calloc((size_t)p->n_layers, sizeof *pf->layer_bytes);
    if (!pf->queue || !pf->layer_bytes) {
        ferry_prefetch_destroy(pf);
        return ferry_fail(FERRY_ERR_NOMEM, "prefetch: out of memory");
    }
    if (pthread_create(&pf->worker, NULL, worker_main, pf) != 0) {
        ferry_prefetch_destroy(pf);
        return ferry_fail(FERRY_ERR_NOMEM, "prefetch: cannot start the worker thread");
    }
    pf->started = 1;
    *out = pf;
    return FERRY_OK;
}

void ferry_prefetch_destroy(ferry_prefetch *pf)
{
    if (!pf)
        return;
    if (pf->started) {
        /* cancel what is queued; the batch in service finishes before the worker stops */
        pthread_mutex_lock(&pf->mu);
        while (pf->n_queued > 0) {
            fetch_req r = pf->queue[--pf->n_queued];
            ferry_cache_mark_failed(pf->cache, r.slot);
            if (r.owns_pin)
                ferry_cache_release(pf->cache, r.slot);
        }
        pf->stop = 1;
        pthread_cond_signal(&pf->work);
        pthread_mutex_unlock(&pf->mu);
        pthread_join(pf->worker, NULL);
    }
    pthread_mutex_destroy(&pf->mu);
    pthread_cond_destroy(&pf->work);
    pthread_cond_destroy(&pf->idle);
    free(pf->queue);
    free(pf->layer_bytes);
    free(pf);
}

static ferry_status enqueue(ferry_prefetch *pf, fetch_req r)
{
    pthread_mutex_lock(&pf->mu);
    if (pf->n_queued == pf->p.n_slots) {
        pthread_mutex_unlock(&pf->mu);
        return ferry_fail(FERRY_ERR_INVALID, "prefetch: queue of %d requests is full",
                          (int)pf->p.n_slots);
    }
    r.seq = pf->seq++;
    pf->queue[pf->n_queued++] = r;
    if (!r.demand)
        pf->queued_prefetch_bytes += pf->p.slot_bytes;
    pthread_cond_signal(&pf->work);
    pthread_mutex_unlock(&pf->mu);
    return FERRY_OK;
}

ferry_status ferry_prefetch_demand(ferry_prefetch *pf, int32_t layer, int32_t expert,
                                   int32_t slot)
{
    fetch_req r = {layer, expert, slot, 1, 0, 0, 0};
    return enqueue(pf, r);
}

void ferry_prefetch_promote(ferry_prefetch *pf, int32_t layer, int32_t expert)
{
    pthread_mutex_lock(&pf->mu);
    for (int32_t i = 0; i < pf->n_queued; i++) {
        fetch_req *r = &pf->queue[i];
        if (r->layer == layer && r->expert == expert && !r->demand) {
            r->demand = 1; /* owns_pin stays: the prefetch's pin is still the worker's */
            r->seq = pf->seq++;
            pf->queued_prefetch_bytes -= pf->p.slot_bytes;
        }
    }
    pthread_mutex_unlock(&pf->mu);
}

int32_t ferry_prefetch_hint(ferry_prefetch *pf, int32_t layer, const int32_t *experts,
                            const float *scores, int32_t n)
{
    int32_t issued = 0;
    for (int32_t i = 0; i < n; i++) {
        pthread_mutex_lock(&pf->mu);
        int over = pf->queued_prefetch_bytes + pf->p.slot_bytes > pf->p.max_prefetch_bytes;
        if (over)
            pf->stats.prefetch_skipped++;
        pthread_mutex_unlock(&pf->mu);
        if (over)
            continue;
        int32_t slot;
        ferry_cache_result res;
        if (ferry_cache_acquire(pf->cache, layer, experts[i], 0, &slot, &res) != FERRY_OK) {
            pthread_mutex_lock(&pf->mu);
            pf->stats.prefetch_skipped++;
            pthread_mutex_unlock(&pf->mu);
            continue;
        }
        if (res != FERRY_CACHE_FILL) {
            ferry_cache_release(pf->cache, slot);
            continue;
        }
        fetch_req r = {layer, experts[i], slot, 0, 1, scores ? scores[i] : 0, 0};
        if (enqueue(pf, r) != FERRY_OK) {
            ferry_cache_mark_failed(pf->cache, slot);
            ferry_cache_release(pf->cache, slot);
            continue;
        }
        issued++;
    }
    return issued;
}

int32_t ferry_prefetch_cancel(ferry_prefetch *pf, int32_t layer)
{
    int32_t n = 0;
    pthread_mutex_lock(&pf->mu);
    for (int32_t i = 0; i < pf->n_queued;) {
        fetch_req r = pf->queue[i];
        if (r.layer != layer || r.demand) {
            i++;
            continue;
        }
        remove_at(pf, i);
        pf->queued_prefetch_bytes -= pf->p.slot_bytes;
        pf->stats.prefetch_cancelled++;
        ferry_cache_mark_failed(pf->cache, r.slot);
        ferry_cache_release(pf->cache, r.slot);
        n++;
    }
    pthread_mutex_unlock(&pf->mu);
    return n;
}

ferry_status ferry_prefetch_failure(ferry_prefetch *pf, int32_t layer, int32_t expert)
{
    pthread_mutex_lock(&pf->mu);
    ferry_status code = pf->fail_code ? pf->fail_code : FERRY_ERR_IO;
    char msg[512];
    if (pf->fail_layer == layer && pf->fail_expert == expert)
        snprintf(msg, sizeof msg, "%s", pf->fail_msg);
    else
        snprintf(msg, sizeof msg, "layer %d expert %d failed to load", (int)layer, (int)expert);
    pthread_mutex_unlock(&pf->mu);
    return ferry_fail(code, "%s", msg);
}

void ferry_prefetch_get_stats(ferry_prefetch *pf, ferry_prefetch_stats *out)
{
    pthread_mutex_lock(&pf->mu);
    *out = pf->stats;
    pthread_mutex_unlock(&pf->mu);
}

void ferry_prefetch_layer_bytes(ferry_prefetch *pf, uint64_t *out)
{
    pthread_mutex_lock(&pf->mu);
    memcpy(out, pf->layer_bytes, (size_t)pf->p.n_layers * sizeof *out);
    pthread_mutex_unlock(&pf->mu);
}

void ferry_prefetch_drain(ferry_prefetch *pf)
{
    pthread_mutex_lock(&pf->mu);
    while (pf->n_queued > 0 || pf->busy)
        pthread_cond_wait(&pf->idle, &pf->mu);
    pthread_mutex_unlock(&pf->mu);
}
