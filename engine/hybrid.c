/*
 * engine/hybrid.c: see hybrid.h. The worker sleeps on a condition variable between jobs;
 * a job's error message, recorded on the worker's thread, travels back in the job and is
 * raised again on the thread that finishes it.
 */
#include "engine/hybrid.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/error.h"

enum { JOB_IDLE, JOB_QUEUED, JOB_DONE };

struct ferry_hybrid {
    ferry_model *m;
    ferry_backend *cpu; /* m->cpu_be, borrowed */
    int32_t d, ff, k, max_tokens;
    float *in;    /* (max_tokens, d) the layer-batch's rows, filled by the caller */
    float *xe;    /* (max_tokens, d) rows routed to one expert */
    float *a, *b; /* (max_tokens, ff) */
    float *out;   /* (max_tokens * k, d) output rows, packed in job order */
    int32_t *rows; /* (max_tokens * k) their rows in the expert outputs */

    pthread_t worker;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int state; /* JOB_* */
    int stop;

    /* the job (written by start, read by the worker) */
    int32_t layer;
    const ferry_dispatch *dispatch;
    int32_t experts[FERRY_CONFIG_MAX_EXPERTS];
    int32_t n_experts;
    /* its result (written by the worker before JOB_DONE) */
    ferry_status status;
    char message[512];
    int32_t n_rows;
    uint64_t n_bytes;
    double busy_seconds;
};

static ferry_status run_job(ferry_hybrid *h)
{
    const ferry_dispatch *dsp = h->dispatch;
    size_t d = (size_t)h->d;
    h->n_rows = 0;
    h->n_bytes = 0;
    for (int32_t i = 0; i < h->n_experts; i++) {
        int32_t e = h->experts[i];
        int32_t me = ferry_dispatch_count(dsp, e), off = dsp->offsets[e];
        for (int32_t r = 0; r < me; r++)
            memcpy(h->xe + (size_t)r * d, h->in + (size_t)dsp->tokens[off + r] * d,
                   d * sizeof(float));
        ferry_expert_weights X;
        TRY(ferry_model_expert_host(h->m, h->layer, e, &X));
        ferry_status st = ferry_expert_ffn(h->cpu, &X, h->xe, me, h->a, h->b,
                                     h->out + (size_t)h->n_rows * d);
        ferry_model_expert_host_done(h->m, h->layer, e);
        if (st)
            return st;
        memcpy(h->rows + h->n_rows, dsp->rows + off, (size_t)me * sizeof(int32_t));
        h->n_rows += me;
        h->n_bytes += ferry_model_expert_bytes(h->m);
    }
    return FERRY_OK;
}

static void *worker_main(void *vp)
{
    ferry_hybrid *h = vp;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        while (!h->stop && h->state != JOB_QUEUED)
            pthread_cond_wait(&h->cv, &h->mu);
        if (h->stop)
            break;
        pthread_mutex_unlock(&h->mu);
        double t0 = ferry_now_seconds();
        ferry_status st = run_job(h);
        double busy = ferry_now_seconds() - t0;
        pthread_mutex_lock(&h->mu);
        h->status = st;
        if (st)
            snprintf(h->message, sizeof h->message, "%s", ferry_last_error());
        h->busy_seconds = busy;
        h->state = JOB_DONE;
        pthread_cond_broadcast(&h->cv);
    }
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

ferry_status ferry_hybrid_create(ferry_model *m, int32_t max_tokens, ferry_hybrid **out)
{
    if (!m || !m->cpu_be || max_tokens < 1 || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_hybrid_create: bad arguments");
    ferry_hybrid *h = calloc(1, sizeof *h);
    if (!h)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for the hybrid executor");
    if (pthread_mutex_init(&h->mu, NULL) != 0) {
        free(h);
        return ferry_fail(FERRY_ERR_NOMEM, "cannot create the hybrid executor's lock");
    }
    if (pthread_cond_init(&h->cv, NULL) != 0) {
        pthread_mutex_destroy(&h->mu);
        free(h);
        return ferry_fail(FERRY_ERR_NOMEM, "cannot create the hybrid executor's lock");
    }
    h->m = m;
    h->cpu = m->cpu_be;
    h->d = m->cfg.hidden_size;
    h->ff = m->cfg.intermediate_size;
    h->k = m->cfg.n_experts_per_tok;
    h->max_tokens = max_tokens;
    size_t T = (size_t)max_tokens, d = (size_t)h->d, ff = (size_t)h->ff, k = (size_t)h->k;
    ferry_backend *cpu = h->cpu;
    ferry_status st;
    if ((st = cpu->ops->alloc(cpu, T * d * sizeof(float), (void **)&h->in)) ||
        (st = cpu->ops->alloc(cpu, T * d * sizeof(float), (void **)&h->xe)) ||
        (st = cpu->ops->alloc(cpu, T * ff * sizeof(float), (void **)&h->a)) ||
        (st = cpu->ops->alloc(cpu, T * ff * sizeof(float), (void **)&h->b)) ||
        (st = cpu->ops->alloc(cpu, T * k * d * sizeof(float), (void **)&h->out)) ||
        (st = cpu->ops->alloc(cpu, T * k * sizeof(int32_t), (void **)&h->rows))) {
        ferry_hybrid_destroy(h);
        return ferry_fail_prefix(st, "hybrid executor for %d tokens", (int)max_tokens);
    }
    if (pthread_create(&h->worker, NULL, worker_main, h) != 0) {
        ferry_hybrid_destroy(h);
        return ferry_fail(FERRY_ERR_NOMEM, "cannot start the hybrid executor's thread");
    }
    h->started = 1;
    *out = h;
    return FERRY_OK;
}

void ferry_hybrid_destroy(ferry_hybrid *h)
{
    if (!h)
        return;
    if (h->started) {
        pthread_mutex_lock(&h->mu);
        h->stop = 1;
        pthread_cond_broadcast(&h->cv);
        pthread_mutex_unlock(&h->mu);
        pthread_join(h->worker, NULL);
    }
    void *bufs[] = {h->in, h->xe, h->a, h->b, h->out, h->rows};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i])
            h->cpu->ops->free(h->cpu, bufs[i]);
    pthread_cond_destroy(&h->cv);
    pthread_mutex_destroy(&h->mu);
    free(h);
}

float *ferry_hybrid_input(ferry_hybrid *h) { return h->in; }

ferry_status ferry_hybrid_start(ferry_hybrid *h, int32_t layer, const ferry_dispatch *dispatch,
                                const int32_t *experts, int32_t n)
{
    if (!h || !dispatch || (n > 0 && !experts) || n < 0 || n > FERRY_CONFIG_MAX_EXPERTS ||
        layer < 0 || layer >= h->m->cfg.n_moe_layers)
        return ferry_fail(FERRY_ERR_INVALID, "hybrid: bad job (layer %d, %d experts)", (int)layer,
                          (int)n);
    pthread_mutex_lock(&h->mu);
    if (h->state == JOB_QUEUED) {
        pthread_mutex_unlock(&h->mu);
        return ferry_fail(FERRY_ERR_INVALID, "hybrid: a job is already running");
    }
    h->layer = layer;
    h->dispatch = dispatch;
    memcpy(h->experts, experts, (size_t)n * sizeof(int32_t));
    h->n_experts = n;
    h->status = FERRY_OK;
    h->state = JOB_QUEUED;
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
    return FERRY_OK;
}

ferry_status ferry_hybrid_finish(ferry_hybrid *h, const float **out, const int32_t **rows,
                                 int32_t *n_rows, uint64_t *n_bytes, double *busy_seconds)
{
    pthread_mutex_lock(&h->mu);
    if (h->state == JOB_IDLE) {
        pthread_mutex_unlock(&h->mu);
        return ferry_fail(FERRY_ERR_INVALID, "hybrid: finish without a job");
    }
    while (h->state != JOB_DONE)
        pthread_cond_wait(&h->cv, &h->mu);
    h->state = JOB_IDLE;
    ferry_status st = h->status;
    pthread_mutex_unlock(&h->mu);
    if (st)
        return ferry_fail(st, "%s", h->message);
    *out = h->out;
    *rows = h->rows;
    *n_rows = h->n_rows;
    *n_bytes = h->n_bytes;
    *busy_seconds = h->busy_seconds;
    return FERRY_OK;
}

/* ---- the cost model's rates -------------------------------------------------------- */

#define MEASURE_TOKENS 8

ferry_status ferry_hybrid_measure(ferry_model *m, ferry_hybrid_cost *out)
{
    ferry_backend *be = m->be, *cpu = m->cpu_be;
    if (!cpu || !m->store || !m->d_slots)
        return ferry_fail(FERRY_ERR_INVALID, "hybrid: nothing to measure without slots");
    size_t d = (size_t)m->cfg.hidden_size, ff = (size_t)m->cfg.intermediate_size;
    size_t n_bytes = ferry_model_expert_bytes(m);
    float *x = NULL, *a = NULL, *b = NULL, *y = NULL;
    float **bufs[] = {&x, &a, &b, &y};
    ferry_status st;
    if ((st = cpu->ops->alloc(cpu, MEASURE_TOKENS * d * sizeof(float), (void **)&x)) ||
        (st = cpu->ops->alloc(cpu, MEASURE_TOKENS * ff * sizeof(float), (void **)&a)) ||
        (st = cpu->ops->alloc(cpu, MEASURE_TOKENS * ff * sizeof(float), (void **)&b)) ||
        (st = cpu->ops->alloc(cpu, MEASURE_TOKENS * d * sizeof(float), (void **)&y)))
        goto done;
    for (size_t i = 0; i < MEASURE_TOKENS * d; i++)
        x[i] = (float)((int)(i % 17) - 8) * 0.01f;
    const void *bytes;
    if ((st = ferry_store_get(m->store, 0, 0, &bytes)))
        goto done;
    double fetch = 1e30, cpu1 = 1e30, cpu8 = 1e30;
    for (int rep = 0; rep < 3 && st == FERRY_OK; rep++) {
        uint64_t ticket;
        double t0 = ferry_now_seconds();
        if ((st = be->ops->copy_async(be, m->d_slots, bytes, n_bytes, &ticket)) ||
            (st = be->ops->copy_wait(be, ticket)))
            break;
        double dt = ferry_now_seconds() - t0;
        fetch = dt < fetch ? dt : fetch;
    }
    ferry_expert_weights X = ferry_model_expert_at(m, 0, 0, bytes);
    for (int rep = 0; rep < 2 && st == FERRY_OK; rep++) {
        double t0 = ferry_now_seconds();
        if ((st = ferry_expert_ffn(cpu, &X, x, 1, a, b, y)))
            break;
        double t1 = ferry_now_seconds();
        if ((st = ferry_expert_ffn(cpu, &X, x, MEASURE_TOKENS, a, b, y)))
            break;
        double t2 = ferry_now_seconds();
        cpu1 = t1 - t0 < cpu1 ? t1 - t0 : cpu1;
        cpu8 = t2 - t1 < cpu8 ? t2 - t1 : cpu8;
    }
    ferry_store_put(m->store, 0, 0);
    if (st == FERRY_OK) {
        /* a clock too coarse for a tiny expert must not make either side look free */
        const double floor_s = 1e-7;
        fetch = fetch > floor_s ? fetch : floor_s;
        cpu1 = cpu1 > floor_s ? cpu1 : floor_s;
        double per_token = (cpu8 - cpu1) / (MEASURE_TOKENS - 1);
        *out = (ferry_hybrid_cost){.fetch_bytes_per_s = (double)n_bytes / fetch,
                                   .cpu_seconds_1 = cpu1,
                                   .cpu_seconds_per_token = per_token > 0 ? per_token : 0,
                                   .ref_bytes = (double)n_bytes};
    }
done:
    for (size_t i = 0; i < 4; i++)
        if (*bufs[i])
            cpu->ops->free(cpu, *bufs[i]);
    return st;
}
