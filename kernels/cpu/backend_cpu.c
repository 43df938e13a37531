/*
 * kernels/cpu/backend_cpu.c: the CPU reference backend. Plain loops with float32
 * accumulation, written to be read; the heavy ops (matmul, attention) are split over the
 * thread pool by output rows, so each output element is computed by one thread in a
 * fixed order and results do not depend on the thread count or the batch. The matmul and
 * the attention run the kernels chosen at creation (kernels/cpu/cpu_kernels.h): the
 * reference loops or vectorised kernels that give the same bits.
 *
 * "Device" memory is ordinary host memory (64-byte aligned).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pthread.h>

#include "core/arena.h"
#include "core/error.h"
#include "core/pool.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_kernels.h"

#define FERRY_COPY_QUEUE 1024

typedef struct {
    void *dst;
    const void *src;
    size_t n_bytes;
} copy_job;

typedef struct {
    ferry_pool *pool;
    ferry_cpu_isa isa;             /* the matmul kernels, resolved (never AUTO) */
    ferry_cpu_matmul_fn matmul_fn; /* its matmul */
    ferry_cpu_attn_fn attn_fn;     /* its attention */
    /* Products of fewer multiply-adds run on the calling thread: waking the workers costs
     * some 10-30 us, in which the vector kernels do about a million. */
    int64_t matmul_serial_below;

    /* device arena (device_bytes > 0) */
    void *arena_mem;
    ferry_arena *arena;
    pthread_mutex_t arena_mu;
    size_t unbounded_used; /* bytes allocated without an arena */

    /* copy engine: a ring of jobs served in order by one worker */
    pthread_t copier;
    int copier_started;
    pthread_mutex_t copy_mu;
    pthread_cond_t copy_work, copy_landed;
    copy_job queue[FERRY_COPY_QUEUE];
    uint64_t submitted; /* tickets 1..submitted handed out */
    uint64_t landed;    /* tickets 1..landed done */
    int stop;
} cpu_impl;

static ferry_pool *pool_of(ferry_backend *b) { return ((cpu_impl *)b->impl)->pool; }

/* ---- memory ------------------------------------------------------------------- */

/* Without an arena each block carries its size in a 64-byte header, for mem_used. */
#define FERRY_CPU_HDR 64

static ferry_status cpu_alloc(ferry_backend *b, size_t n_bytes, void **d_out)
{
    cpu_impl *impl = b->impl;
    if (impl->arena) {
        pthread_mutex_lock(&impl->arena_mu);
        ferry_status st = ferry_arena_alloc(impl->arena, n_bytes, d_out);
        pthread_mutex_unlock(&impl->arena_mu);
        return st;
    }
    size_t rounded = (n_bytes + 63) & ~(size_t)63;
    if (rounded < n_bytes || rounded > SIZE_MAX - FERRY_CPU_HDR)
        return ferry_fail(FERRY_ERR_NOMEM, "cannot allocate %zu bytes", n_bytes);
    char *p = aligned_alloc(64, rounded + FERRY_CPU_HDR);
    if (!p)
        return ferry_fail(FERRY_ERR_NOMEM, "cannot allocate %zu bytes", n_bytes);
    memcpy(p, &rounded, sizeof rounded);
    pthread_mutex_lock(&impl->arena_mu);
    impl->unbounded_used += rounded;
    pthread_mutex_unlock(&impl->arena_mu);
    *d_out = p + FERRY_CPU_HDR;
    return FERRY_OK;
}

static void cpu_free(ferry_backend *b, void *d)
{
    cpu_impl *impl = b->impl;
    if (!d)
        return;
    pthread_mutex_lock(&impl->arena_mu);
    if (impl->arena) {
        ferry_arena_free(impl->arena, d);
    } else {
        size_t rounded;
        memcpy(&rounded, (char *)d - FERRY_CPU_HDR, sizeof rounded);
        impl->unbounded_used -= rounded;
        free((char *)d - FERRY_CPU_HDR);
    }
    pthread_mutex_unlock(&impl->arena_mu);
}

static size_t cpu_mem_capacity(ferry_backend *b)
{
    cpu_impl *impl = b->impl;
    return impl->arena ? ferry_arena_capacity(impl->arena) : 0;
}

static size_t cpu_mem_used(ferry_backend *b)
{
    cpu_impl *impl = b->impl;
    pthread_mutex_lock(&impl->arena_mu);
    size_t used = impl->arena ? ferry_arena_used(impl->arena) : impl->unbounded_used;
    pthread_mutex_unlock(&impl->arena_mu);
    return used;
}

/* ---- the copy engine ------------------------------------------------------------ */

static void *copier_main(void *vp)
{
    cpu_impl *impl = vp;
    pthread_mutex_lock(&impl->copy_mu);
    for (;;) {
        while (!impl->stop && impl->landed == impl->submitted)
            pthread_cond_wait(&impl->copy_work, &impl->copy_mu);
        if (impl->landed == impl->submitted)
            break; /* stopping with nothing queued */
        copy_job job = impl->queue[impl->landed % FERRY_COPY_QUEUE];
        pthread_mutex_unlock(&impl->copy_mu);
        memcpy(job.dst, job.src, job.n_bytes);
        pthread_mutex_lock(&impl->copy_mu);
        impl->landed++;
        pthread_cond_broadcast(&impl->copy_landed);
    }
    pthread_mutex_unlock(&impl->copy_mu);
    return NULL;
}

static ferry_status cpu_copy_async(ferry_backend *b, void *d_dst, const void *h_src,
                                   size_t n_bytes, uint64_t *ticket)
{
    cpu_impl *impl = b->impl;
    if (n_bytes && (!d_dst || !h_src))
        return ferry_fail(FERRY_ERR_INVALID, "copy of %zu bytes with a NULL pointer", n_bytes);
    if (!impl->copier_started) {
        /* no copy engine without an arena: the copy is done by the time it is queued */
        if (n_bytes)
            memcpy(d_dst, h_src, n_bytes);
        pthread_mutex_lock(&impl->copy_mu);
        *ticket = ++impl->submitted;
        impl->landed = impl->submitted;
        pthread_mutex_unlock(&impl->copy_mu);
        return FERRY_OK;
    }
    pthread_mutex_lock(&impl->copy_mu);
    while (impl->submitted - impl->landed >= FERRY_COPY_QUEUE)
        pthread_cond_wait(&impl->copy_landed, &impl->copy_mu);
    impl->queue[impl->submitted % FERRY_COPY_QUEUE] = (copy_job){d_dst, h_src, n_bytes};
    *ticket = ++impl->submitted;
    pthread_cond_signal(&impl->copy_work);
    pthread_mutex_unlock(&impl->copy_mu);
    return FERRY_OK;
}

static ferry_status cpu_copy_wait(ferry_backend *b, uint64_t ticket)
{
    cpu_impl *impl = b->impl;
    pthread_mutex_lock(&impl->copy_mu);
    if (ticket > impl->submitted) {
        pthread_mutex_unlock(&impl->copy_mu);
        return ferry_fail(FERRY_ERR_INVALID, "copy ticket %llu was never issued",
                          (unsigned long long)ticket);
    }
    while (impl->landed < ticket)
        pthread_cond_wait(&impl->copy_landed, &impl->copy_mu);
    pthread_mutex_unlock(&impl->copy_mu);
    return FERRY_OK;
}

static int cpu_copy_done(ferry_backend *b, uint64_t ticket)
{
    cpu_impl *impl = b->impl;
    pthread_mutex_lock(&impl->copy_mu);
    int done = impl->landed >= ticket;
    pthread_mutex_unlock(&impl->copy_mu);
    return done;
}

static ferry_status cpu_copy(ferry_backend *b, void *dst, const void *src, size_t n_bytes)
{
    (void)b;
    if (n_bytes && (!dst || !src))
        return ferry_fail(FERRY_ERR_INVALID, "copy of %zu bytes with a NULL pointer", n_bytes);
    if (n_bytes)
        memmove(dst, src, n_bytes);
    return FERRY_OK;
}

static ferry_status cpu_host_register(ferry_backend *b, void *h, size_t n_bytes)
{
    (void)b;
    (void)h;
    (void)n_bytes;
    return FERRY_OK;
}

static void cpu_host_unregister(ferry_backend *b, void *h)
{
    (void)b;
    (void)h;
}

static ferry_status cpu_synchronize(ferry_backend *b)
{
    (void)b;
    return FERRY_OK;
}

/* ---- helpers ------------------------------------------------------------------ */

/* A weight the op can read: quantized weights only for matmul, in whole groups. */
static ferry_status check_weight(const ferry_weight *w, const char *op, int quant_ok)
{
    if (!w || !w->d_data || w->rows <= 0 || w->cols <= 0 || (int)w->dtype < 0 ||
        w->dtype >= FERRY_DTYPE_COUNT)
        return ferry_fail(FERRY_ERR_INVALID, "%s: invalid weight", op);
    if (ferry_dtype_is_quant(w->dtype) && (!quant_ok || w->cols % FERRY_QUANT_GROUP))
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: %s weight of %lld columns (quantized "
                          "weights serve matmuls of a multiple of %d columns)", op,
                          ferry_dtype_name(w->dtype), (long long)w->cols, FERRY_QUANT_GROUP);
    return FERRY_OK;
}

/* ---- embedding, norms, elementwise --------------------------------------------- */

static ferry_status cpu_embedding(ferry_backend *b, float *d_out, const ferry_weight *table,
                                  const int32_t *ids, int32_t n)
{
    (void)b;
    ferry_status st = check_weight(table, "embedding", 0);
    if (st)
        return st;
    for (int32_t t = 0; t < n; t++) {
        if (ids[t] < 0 || ids[t] >= table->rows)
            return ferry_fail(FERRY_ERR_INVALID, "embedding: token id %d is outside [0, %lld)",
                              (int)ids[t], (long long)table->rows);
    }
    for (int32_t t = 0; t < n; t++)
        ferry_cpu_widen(d_out + (size_t)t * (size_t)table->cols, table, ids[t], 0, table->cols);
    return FERRY_OK;
}

static ferry_status cpu_rmsnorm(ferry_backend *b, float *d_out, const float *d_x,
                                const ferry_weight *w, int32_t n, int32_t d, float eps)
{
    (void)b;
    ferry_status st = check_weight(w, "rmsnorm", 0);
    if (st)
        return st;
    if (w->rows * w->cols != d || d > 1 << 20)
        return ferry_fail(FERRY_ERR_INVALID, "rmsnorm: weight has %lld elements, rows have %d",
                          (long long)(w->rows * w->cols), (int)d);
    float wf[1024];
    for (int32_t t = 0; t < n; t++) {
        const float *x = d_x + (size_t)t * (size_t)d;
        float *y = d_out + (size_t)t * (size_t)d;
        double ss = 0;
        for (int32_t i = 0; i < d; i++)
            ss += (double)x[i] * (double)x[i];
        float inv = (float)(1.0 / sqrt(ss / d + (double)eps));
        for (int32_t i0 = 0; i0 < d; i0 += 1024) {
            int32_t m = d - i0 < 1024 ? d - i0 : 1024;
            ferry_cpu_widen(wf, w, 0, i0, m);
            for (int32_t i = 0; i < m; i++)
                y[i0 + i] = wf[i] * (x[i0 + i] * inv);
        }
    }
    return FERRY_OK;
}

static ferry_status cpu_silu_mul(ferry_backend *b, float *d_out, const float *d_gate,
                                 const float *d_up, size_t n)
{
    (void)b;
    for (size_t i = 0; i < n; i++) {
        float g = d_gate[i];
        d_out[i] = (g / (1.0f + expf(-g))) * d_up[i];
    }
    return FERRY_OK;
}

static ferry_status cpu_add(ferry_backend *b, float *d_x, const float *d_y, size_t n)
{
    (void)b;
    for (size_t i = 0; i < n; i++)
        d_x[i] += d_y[i];
    return FERRY_OK;
}

static ferry_status cpu_add_bias(ferry_backend *b, float *d_x, const ferry_weight *bias, int32_t n,
                                 int32_t d)
{
    (void)b;
    ferry_status st = check_weight(bias, "add_bias", 0);
    if (st)
        return st;
    if (n < 0 || bias->rows * bias->cols != d)
        return ferry_fail(FERRY_ERR_INVALID, "add_bias: bias has %lld elements, rows have %d",
                          (long long)(bias->rows * bias->cols), (int)d);
    float bf[1024];
    for (int32_t i0 = 0; i0 < d; i0 += 1024) {
        int32_t m = d - i0 < 1024 ? d - i0 : 1024;
        ferry_cpu_widen(bf, bias, 0, i0, m);
        for (int32_t t = 0; t < n; t++) {
            float *x = d_x + (size_t)t * (size_t)d + (size_t)i0;
            for (int32_t i = 0; i < m; i++)
                x[i] += bf[i];
        }
    }
    return FERRY_OK;
}

static ferry_status cpu_clamp(ferry_backend *b, float *d_x, size_t n, float limit)
{
    (void)b;
    if (!(limit > 0))
        return ferry_fail(FERRY_ERR_INVALID, "clamp: limit %g is not positive", (double)limit);
    for (size_t i = 0; i < n; i++)
        d_x[i] = d_x[i] < -limit ? -limit : d_x[i] > limit ? limit : d_x[i];
    return FERRY_OK;
}

static ferry_status cpu_gate_rows(ferry_backend *b, float *d_y, const float *d_s, int32_t n,
                                  int32_t d)
{
    (void)b;
    if (n < 0 || d <= 0)
        return ferry_fail(FERRY_ERR_INVALID, "gate_rows: %d rows of %d", (int)n, (int)d);
    for (int32_t t = 0; t < n; t++) {
        float g = 1.0f / (1.0f + expf(-d_s[t]));
        float *y = d_y + (size_t)t * (size_t)d;
        for (int32_t i = 0; i < d; i++)
            y[i] *= g;
    }
    return FERRY_OK;
}

/* ---- matmul --------------------------------------------------------------------- */

/* Rows are handed out in tasks of FERRY_MM_ROWS_PER_TASK; each task runs the backend's
 * kernel over its rows (every kernel computes each output alone, always in the same order,
 * so neither the split nor the thread count changes a bit). 24 is a multiple of each
 * kernel's block of rows (avx2 4, avx512 8, avx512bf16 24), so no task computes rows it
 * does not store. */
#define FERRY_MM_ROWS_PER_TASK 24

typedef struct {
    float *out;
    const float *x;
    const ferry_weight *w;
    int32_t n;
    ferry_cpu_matmul_fn fn;
} matmul_job;

static void matmul_task(void *vp, int32_t task)
{
    const matmul_job *job = vp;
    int64_t j0 = (int64_t)task * FERRY_MM_ROWS_PER_TASK;
    int64_t j1 = j0 + FERRY_MM_ROWS_PER_TASK < job->w->rows ? j0 + FERRY_MM_ROWS_PER_TASK
                                                             : job->w->rows;
    job->fn(job->out, job->x, job->w, job->n, j0, j1);
}

static ferry_status cpu_matmul(ferry_backend *b, float *d_out, const float *d_x,
                               const ferry_weight *w, int32_t n)
{
    ferry_status st = check_weight(w, "matmul", 1);
    if (st)
        return st;
    if (n < 0 || (n > 0 && (!d_out || !d_x)))
        return ferry_fail(FERRY_ERR_INVALID, "matmul: %d rows with NULL buffers", (int)n);
    if (n == 0)
        return FERRY_OK;
    cpu_impl *impl = b->impl;
    /* small products are not worth waking the workers for */
    if (w->rows * w->cols * (int64_t)n < impl->matmul_serial_below) {
        impl->matmul_fn(d_out, d_x, w, n, 0, w->rows);
        return FERRY_OK;
    }
    matmul_job job = {d_out, d_x, w, n, impl->matmul_fn};
    int64_t n_tasks = (w->rows + FERRY_MM_ROWS_PER_TASK - 1) / FERRY_MM_ROWS_PER_TASK;
    ferry_pool_run(pool_of(b), (int32_t)n_tasks, matmul_task, &job);
    return FERRY_OK;
}

/* ---- rope ----------------------------------------------------------------------- */

static ferry_status cpu_rope(ferry_backend *b, float *d_x, int32_t n, int32_t n_heads,
                             int32_t head_dim, int32_t pos0, const float *d_cos,
                             const float *d_sin)
{
    (void)b;
    if (head_dim <= 0 || head_dim % 2 || pos0 < 0)
        return ferry_fail(FERRY_ERR_INVALID, "rope: head_dim %d, pos0 %d", (int)head_dim,
                          (int)pos0);
    int32_t half = head_dim / 2;
    for (int32_t t = 0; t < n; t++) {
        const float *c = d_cos + (size_t)(pos0 + t) * (size_t)half;
        const float *s = d_sin + (size_t)(pos0 + t) * (size_t)half;
        for (int32_t h = 0; h < n_heads; h++) {
            float *v = d_x + ((size_t)t * (size_t)n_heads + (size_t)h) * (size_t)head_dim;
            for (int32_t i = 0; i < half; i++) {
                float a = v[i], bb = v[i + half];
                /* q * cos + rotate_half(q) * sin, rotate_half(q) = (-q2, q1) */
                v[i] = a * c[i] - bb * s[i];
                v[i + half] = bb * c[i] + a * s[i];
            }
        }
    }
    return FERRY_OK;
}

/* ---- attention ------------------------------------------------------------------- */

typedef struct {
    float *out;
    const float *q, *k, *v;
    int32_t n, pos0;
    const ferry_attn_shape *shape;
    ferry_cpu_attn_fn fn;
} attn_job;

/* One (token, head), by the backend's attention kernel (cpu_kernels.h). */
static void attn_task(void *vp, int32_t task)
{
    const attn_job *job = vp;
    const ferry_attn_shape *sh = job->shape;
    int32_t t = task / sh->n_heads, h = task % sh->n_heads;
    int32_t hd = sh->head_dim;
    int32_t kvh = h / (sh->n_heads / sh->n_kv_heads);
    int32_t pos = job->pos0 + t;
    size_t at = ((size_t)t * (size_t)sh->n_heads + (size_t)h) * (size_t)hd;
    ferry_cpu_attn_head a = {
        .q = job->q + at,
        .k = job->k + (size_t)kvh * (size_t)hd,
        .v = job->v + (size_t)kvh * (size_t)hd,
        .kv_stride = (size_t)sh->n_kv_heads * (size_t)hd,
        .first = sh->sliding_window > 0 && pos - sh->sliding_window + 1 > 0
                     ? pos - sh->sliding_window + 1
                     : 0,
        .last = pos,
        .head_dim = hd,
        .scale = sh->scale,
    };
    job->fn(job->out + at, &a);
}

static ferry_status cpu_attention(ferry_backend *b, float *d_out, const float *d_q,
                                  const float *d_k, const float *d_v, int32_t n, int32_t pos0,
                                  const ferry_attn_shape *shape)
{
    if (!shape || shape->n_heads <= 0 || shape->n_kv_heads <= 0 || shape->head_dim <= 0 ||
        shape->n_heads % shape->n_kv_heads || pos0 < 0 || n < 0)
        return ferry_fail(FERRY_ERR_INVALID, "attention: invalid shape");
    attn_job job = {d_out, d_q, d_k, d_v, n, pos0, shape, ((cpu_impl *)b->impl)->attn_fn};
    int64_t n_tasks = (int64_t)n * shape->n_heads;
    int64_t work = n_tasks * (int64_t)(pos0 + n) * shape->head_dim;
    if (work < (1 << 15)) {
        for (int64_t i = 0; i < n_tasks; i++)
            attn_task(&job, (int32_t)i);
        return FERRY_OK;
    }
    ferry_pool_run(pool_of(b), (int32_t)n_tasks, attn_task, &job);
    return FERRY_OK;
}

/* ---- MoE pieces ------------------------------------------------------------------- */

static ferry_status cpu_router_topk(ferry_backend *b, int32_t *d_experts, float *d_weights,
                                    const float *d_logits, int32_t n, int32_t n_experts,
                                    int32_t k, int normalize)
{
    (void)b;
    if (n_experts <= 0 || n_experts > 1024 || k <= 0 || k > n_experts)
        return ferry_fail(FERRY_ERR_INVALID, "router: top-%d of %d experts", (int)k,
                          (int)n_experts);
    float prob[1024];
    int32_t pick[1024];
    for (int32_t t = 0; t < n; t++) {
        const float *lg = d_logits + (size_t)t * (size_t)n_experts;
        float mx = lg[0];
        for (int32_t e = 1; e < n_experts; e++)
            mx = lg[e] > mx ? lg[e] : mx;
        float sum = 0;
        for (int32_t e = 0; e < n_experts; e++) {
            prob[e] = expf(lg[e] - mx);
            sum += prob[e];
        }
        for (int32_t e = 0; e < n_experts; e++)
            prob[e] /= sum;
        /* k largest, ties to the lower index */
        for (int32_t j = 0; j < k; j++) {
            int32_t best = -1;
            for (int32_t e = 0; e < n_experts; e++) {
                int taken = 0;
                for (int32_t i = 0; i < j; i++)
                    taken |= pick[i] == e;
                if (!taken && (best < 0 || prob[e] > prob[best]))
                    best = e;
            }
            pick[j] = best;
        }
        float wsum = 0;
        for (int32_t j = 0; j < k; j++)
            wsum += prob[pick[j]];
        if (!normalize)
            wsum = 1.0f;
        /* ascending expert order */
        for (int32_t j = 1; j < k; j++)
            for (int32_t i = j; i > 0 && pick[i - 1] > pick[i]; i--) {
                int32_t tmp = pick[i];
                pick[i] = pick[i - 1];
                pick[i - 1] = tmp;
            }
        for (int32_t j = 0; j < k; j++) {
            d_experts[(size_t)t * (size_t)k + (size_t)j] = pick[j];
            d_weights[(size_t)t * (size_t)k + (size_t)j] = prob[pick[j]] / wsum;
        }
    }
    return FERRY_OK;
}

static ferry_status cpu_gather_rows(ferry_backend *b, float *d_out, const float *d_x,
                                    const int32_t *idx, int32_t m, int32_t d)
{
    (void)b;
    for (int32_t i = 0; i < m; i++)
        memcpy(d_out + (size_t)i * (size_t)d, d_x + (size_t)idx[i] * (size_t)d,
               (size_t)d * sizeof(float));
    return FERRY_OK;
}

static ferry_status cpu_scatter_rows(ferry_backend *b, float *d_out, const float *d_y,
                                     const int32_t *idx, int32_t m, int32_t d)
{
    (void)b;
    for (int32_t i = 0; i < m; i++)
        memcpy(d_out + (size_t)idx[i] * (size_t)d, d_y + (size_t)i * (size_t)d,
               (size_t)d * sizeof(float));
    return FERRY_OK;
}

static ferry_status cpu_combine(ferry_backend *b, float *d_out, const float *d_y,
                                const float *d_weights, int32_t n, int32_t k, int32_t d)
{
    (void)b;
    for (int32_t t = 0; t < n; t++) {
        float *o = d_out + (size_t)t * (size_t)d;
        for (int32_t i = 0; i < d; i++)
            o[i] = 0;
        for (int32_t j = 0; j < k; j++) {
            float w = d_weights[(size_t)t * (size_t)k + (size_t)j];
            const float *y = d_y + ((size_t)t * (size_t)k + (size_t)j) * (size_t)d;
            for (int32_t i = 0; i < d; i++) {
                float p = y[i] * w;
                o[i] += p;
            }
        }
    }
    return FERRY_OK;
}

/* ---- table ------------------------------------------------------------------------ */

static void cpu_destroy(ferry_backend *b)
{
    if (!b)
        return;
    cpu_impl *impl = b->impl;
    if (impl) {
        if (impl->copier_started) {
            pthread_mutex_lock(&impl->copy_mu);
            impl->stop = 1;
            pthread_cond_signal(&impl->copy_work);
            pthread_mutex_unlock(&impl->copy_mu);
            pthread_join(impl->copier, NULL);
        }
        ferry_pool_destroy(impl->pool);
        ferry_arena_destroy(impl->arena);
        free(impl->arena_mem);
        pthread_mutex_destroy(&impl->arena_mu);
        pthread_mutex_destroy(&impl->copy_mu);
        pthread_cond_destroy(&impl->copy_work);
        pthread_cond_destroy(&impl->copy_landed);
    }
    free(impl);
    free(b);
}

static const ferry_backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .synchronize = cpu_synchronize,
    .mem_capacity = cpu_mem_capacity,
    .mem_used = cpu_mem_used,
    .copy_async = cpu_copy_async,
    .copy_wait = cpu_copy_wait,
    .copy_done = cpu_copy_done,
    .host_register = cpu_host_register,
    .host_unregister = cpu_host_unregister,
    .copy_device = cpu_copy,
    .embedding = cpu_embedding,
    .rmsnorm = cpu_rmsnorm,
    .matmul = cpu_matmul,
    .rope = cpu_rope,
    .attention = cpu_attention,
    .silu_mul = cpu_silu_mul,
    .add = cpu_add,
    .router_topk = cpu_router_topk,
    .add_bias = cpu_add_bias,
    .clamp = cpu_clamp,
    .gate_rows = cpu_gate_rows,
    .gather_rows = cpu_gather_rows,
    .scatter_rows = cpu_scatter_rows,
    .combine = cpu_combine,
};

ferry_status ferry_backend_cpu_create(int32_t n_threads, size_t device_bytes, ferry_backend **out)
{
    return ferry_backend_cpu_create_isa(n_threads, device_bytes, FERRY_CPU_ISA_AUTO, out);
}

/* "reference, avx2, avx512": the kernel sets this CPU runs. */
static void describe_isas(char *buf, size_t len)
{
    size_t at = (size_t)snprintf(buf, len, "%s", ferry_cpu_isa_name(FERRY_CPU_ISA_REFERENCE));
    for (int i = FERRY_CPU_ISA_AVX2; i < FERRY_CPU_ISA_COUNT && at < len; i++)
        if (ferry_cpu_isa_available((ferry_cpu_isa)i))
            at += (size_t)snprintf(buf + at, len - at, ", %s",
                                   ferry_cpu_isa_name((ferry_cpu_isa)i));
}

ferry_status ferry_backend_cpu_create_isa(int32_t n_threads, size_t device_bytes, int32_t isa,
                                          ferry_backend **out)
{
    if (isa < 0 || isa >= FERRY_CPU_ISA_COUNT)
        return ferry_fail(FERRY_ERR_INVALID, "CPU kernel set %d is out of range", (int)isa);
    ferry_cpu_isa chosen = isa == FERRY_CPU_ISA_AUTO ? ferry_cpu_isa_best_exact()
                                                     : (ferry_cpu_isa)isa;
    ferry_cpu_matmul_fn fn = ferry_cpu_matmul_kernel(chosen);
    if (!fn) {
        char have[128];
        describe_isas(have, sizeof have);
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "this CPU cannot run the %s kernels; it runs: %s",
                          ferry_cpu_isa_name(chosen), have);
    }
    ferry_backend *b = calloc(1, sizeof *b);
    cpu_impl *impl = calloc(1, sizeof *impl);
    if (!b || !impl) {
        free(b);
        free(impl);
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for the CPU backend");
    }
    b->ops = &cpu_ops;
    b->impl = impl;
    impl->isa = chosen;
    impl->matmul_fn = fn;
    impl->attn_fn = ferry_cpu_attn_kernel(chosen);
    impl->matmul_serial_below = chosen == FERRY_CPU_ISA_REFERENCE ? 1 << 18 : 1 << 20;
    b->map_host_weights = device_bytes == 0;
    pthread_mutex_init(&impl->arena_mu, NULL);
    pthread_mutex_init(&impl->copy_mu, NULL);
    pthread_cond_init(&impl->copy_work, NULL);
    pthread_cond_init(&impl->copy_landed, NULL);
    ferry_status st = ferry_pool_create(n_threads, &impl->pool);
    if (st)
        goto fail;
    if (device_bytes > 0) {
        size_t rounded = (device_bytes + FERRY_ARENA_ALIGN - 1) / FERRY_ARENA_ALIGN *
                         FERRY_ARENA_ALIGN;
        impl->arena_mem = rounded >= device_bytes ? aligned_alloc(FERRY_ARENA_ALIGN, rounded) : NULL;
        if (!impl->arena_mem) {
            st = ferry_fail(FERRY_ERR_NOMEM, "cannot reserve a device arena of %zu bytes",
                            device_bytes);
            goto fail;
        }
        if ((st = ferry_arena_create(impl->arena_mem, device_bytes, &impl->arena)))
            goto fail;
        if (pthread_create(&impl->copier, NULL, copier_main, impl) != 0) {
            st = ferry_fail(FERRY_ERR_NOMEM, "cannot start the copy worker thread");
            goto fail;
        }
        impl->copier_started = 1;
    }
    snprintf(b->device, sizeof b->device, "cpu, %d thread%s, %s", (int)ferry_pool_size(impl->pool),
             ferry_pool_size(impl->pool) == 1 ? "" : "s", ferry_cpu_isa_name(chosen));
    *out = b;
    return FERRY_OK;
fail:
    cpu_destroy(b);
    return st;
}

int32_t ferry_backend_cpu_pin(ferry_backend *b, const int32_t *cpus, int32_t n_cpus)
{
    if (!b || b->ops != &cpu_ops)
        return 0;
    return ferry_pool_pin(pool_of(b), cpus, n_cpus);
}
