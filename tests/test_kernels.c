/*
 * tests/test_kernels.c: the CPU backend's ops against their definitions computed in
 * double precision, plus the pieces they stand on: the thread pool, half-precision
 * conversion, MoE dispatch and the sampler.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/pool.h"
#include "engine/sampler.h"
#include "kernels/backend.h"
#include "moe/dispatch.h"
#include "offload/topology.h"
#include "tests/check_util.h"

static ferry_backend *cpu(int32_t n_threads)
{
    ferry_backend *b;
    ck_assert_int_eq(ferry_backend_cpu_create(n_threads, 0, &b), FERRY_OK);
    return b;
}

START_TEST(test_kernels_half_conversions_exact)
{
    /* every f16 value widens and narrows back to itself; bf16 likewise */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = ferry_f16_to_f32((uint16_t)h);
        if (!isnan(f))
            ck_assert_msg(ferry_f32_to_f16(f) == h, "f16 %04x", h);
        float g = ferry_bf16_to_f32((uint16_t)h);
        if (!isnan(g))
            ck_assert_msg(ferry_f32_to_bf16(g) == h, "bf16 %04x", h);
    }
    ck_assert_float_eq(ferry_f16_to_f32(0x3c00), 1.0f);
    ck_assert_float_eq(ferry_f16_to_f32(0x0001), 0x1p-24f);
    ck_assert_int_eq(ferry_f32_to_f16(65520.0f), 0x7c00); /* rounds to infinity */
    ck_assert_int_eq(ferry_f32_to_f16(1.0f + 0x1p-11f), 0x3c00); /* tie to even */
    ck_assert_int_eq(ferry_f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);   /* tie to even */
    ck_assert_int_eq(ferry_f32_to_bf16(1.0f + 0x1p-7f + 0x1p-8f), 0x3f82);
}
END_TEST

static void count_task(void *arg, int32_t i)
{
    int *hits = arg;
    __atomic_add_fetch(&hits[i], 1, __ATOMIC_RELAXED);
}

typedef struct {
    pthread_t caller;
    int cpu[64];      /* where each task ran */
    int by_worker[64]; /* 1: a worker ran it, not the caller */
} where_job;

static void where_task(void *vp, int32_t task)
{
    where_job *j = vp;
    j->by_worker[task] = !pthread_equal(pthread_self(), j->caller);
    j->cpu[task] = sched_getcpu();
    struct timespec ts = {0, 200000}; /* long enough for the worker to take some */
    nanosleep(&ts, NULL);
}

START_TEST(test_kernels_pool_pins_workers_to_cores)
{
    /* one CPU per physical core, each one this process may run on */
    int32_t cpus[1024];
    int32_t n = ferry_topology_core_cpus(cpus, 1024);
    ck_assert_int_ge(n, 1);
    cpu_set_t allowed;
    ck_assert_int_eq(sched_getaffinity(0, sizeof allowed, &allowed), 0);
    for (int32_t i = 0; i < n; i++)
        ck_assert_msg(CPU_ISSET(cpus[i], &allowed), "core CPU %d is not allowed", (int)cpus[i]);
    /* a pool of 2 pins its one worker to the second CPU of the list (the first when the
     * list has one): every task the worker ran ran there */
    ferry_pool *p;
    ck_assert_int_eq(ferry_pool_create(2, &p), FERRY_OK);
    ck_assert_int_eq(ferry_pool_pin(p, cpus, n), 1);
    where_job j = {.caller = pthread_self()};
    ferry_pool_run(p, 64, where_task, &j);
    int worker_tasks = 0;
    for (int t = 0; t < 64; t++)
        if (j.by_worker[t]) {
            worker_tasks++;
            ck_assert_int_eq(j.cpu[t], cpus[1 % n]);
        }
    ck_assert_int_gt(worker_tasks, 0);
    ck_assert_int_eq(ferry_pool_pin(p, NULL, 0), 0);
    ferry_pool_destroy(p);
}
END_TEST

START_TEST(test_kernels_pool_runs_each_task_once)
{
    ferry_pool *p;
    ck_assert_int_eq(ferry_pool_create(4, &p), FERRY_OK);
    ck_assert_int_eq(ferry_pool_size(p), 4);
    for (int round = 0; round < 200; round++) {
        int n = 1 + round % 37;
        int hits[64] = {0};
        ferry_pool_run(p, n, count_task, hits);
        for (int i = 0; i < 64; i++)
            ck_assert_int_eq(hits[i], i < n ? 1 : 0);
    }
    ferry_pool_destroy(p);
    ck_assert_int_eq(ferry_pool_create(5000, &p), FERRY_ERR_INVALID);
}
END_TEST

START_TEST(test_kernels_matmul_matches_definition)
{
    uint64_t rng = 11;
    const ferry_dtype types[] = {FERRY_DTYPE_F32, FERRY_DTYPE_F16, FERRY_DTYPE_BF16};
    const int64_t shapes[][3] = {{1, 7, 5}, {3, 64, 33}, {40, 100, 1030}, {2, 300, 8}};
    ferry_backend *b = cpu(3);
    for (size_t ti = 0; ti < 3; ti++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            int32_t n = (int32_t)shapes[si][0];
            int64_t rows = shapes[si][1], cols = shapes[si][2];
            float *wv = tu_rand_floats(&rng, (size_t)(rows * cols), -1, 1);
            float *x = tu_rand_floats(&rng, (size_t)(n * cols), -1, 1);
            ferry_weight w;
            void *store = tu_make_weight(&w, wv, rows, cols, types[ti]);
            float *out = malloc((size_t)(n * rows) * sizeof(float));
            float *ref = malloc((size_t)(n * rows) * sizeof(float));
            ck_assert_int_eq(b->ops->matmul(b, out, x, &w, n), FERRY_OK);
            for (int32_t t = 0; t < n; t++)
                for (int64_t j = 0; j < rows; j++) {
                    double s = 0;
                    for (int64_t i = 0; i < cols; i++)
                        s += (double)x[t * cols + i] * wv[j * cols + i];
                    ref[t * rows + j] = (float)s;
                }
            tu_assert_close("matmul", out, ref, (size_t)(n * rows), 1e-5, 1e-5);
            /* each row alone gives the same bits as in the batch */
            float *one = malloc((size_t)rows * sizeof(float));
            for (int32_t t = 0; t < n; t++) {
                ck_assert_int_eq(b->ops->matmul(b, one, x + t * cols, &w, 1), FERRY_OK);
                ck_assert(memcmp(one, out + t * rows, (size_t)rows * sizeof(float)) == 0);
            }
            free(one);
            free(store);
            free(wv);
            free(x);
            free(out);
            free(ref);
        }
    ferry_weight bad = {NULL, FERRY_DTYPE_F32, 3, 3};
    float o[9], x[9] = {0};
    ck_assert_int_eq(b->ops->matmul(b, o, x, &bad, 1), FERRY_ERR_INVALID);
    ferry_backend_destroy(b);
}
END_TEST

START_TEST(test_kernels_matmul_independent_of_threads)
{
    uint64_t rng = 5;
    int64_t rows = 257, cols = 600;
    int32_t n = 9;
    float *wv = tu_rand_floats(&rng, (size_t)(rows * cols), -1, 1);
    float *x = tu_rand_floats(&rng, (size_t)(n * cols), -1, 1);
    ferry_weight w;
    void *store = tu_make_weight(&w, wv, rows, cols, FERRY_DTYPE_BF16);
    float *a = malloc((size_t)(n * rows) * sizeof(float)), *c = malloc((size_t)(n * rows) * sizeof(float));
    ferry_backend *b1 = cpu(1), *b4 = cpu(4);
    ck_assert_int_eq(b1->ops->matmul(b1, a, x, &w, n), FERRY_OK);
    ck_assert_int_eq(b4->ops->matmul(b4, c, x, &w, n), FERRY_OK);
    ck_assert(memcmp(a, c, (size_t)(n * rows) * sizeof(float)) == 0);
    ferry_backend_destroy(b1);
    ferry_backend_destroy(b4);
    free(store);
    free(wv);
    free(x);
    free(a);
    free(c);
}
END_TEST

START_TEST(test_kernels_rmsnorm_embedding_silu_add)
{
    uint64_t rng = 3;
    ferry_backend *b = cpu(2);
    int32_t n = 3, d = 1500;
    float *x = tu_rand_floats(&rng, (size_t)(n * d), -2, 2);
    float *wv = tu_rand_floats(&rng, (size_t)d, 0.5f, 1.5f);
    ferry_weight w;
    void *store = tu_make_weight(&w, wv, 1, d, FERRY_DTYPE_BF16);
    float *out = malloc((size_t)(n * d) * sizeof(float)), *ref = malloc((size_t)(n * d) * sizeof(float));
    ck_assert_int_eq(b->ops->rmsnorm(b, out, x, &w, n, d, 1e-5f), FERRY_OK);
    for (int32_t t = 0; t < n; t++) {
        double ss = 0;
        for (int32_t i = 0; i < d; i++)
            ss += (double)x[t * d + i] * x[t * d + i];
        double inv = 1 / sqrt(ss / d + 1e-5);
        for (int32_t i = 0; i < d; i++)
            ref[t * d + i] = (float)(x[t * d + i] * inv * wv[i]);
    }
    tu_assert_close("rmsnorm", out, ref, (size_t)(n * d), 1e-6, 1e-6);
    ck_assert_int_eq(b->ops->rmsnorm(b, out, x, &w, n, d - 1, 1e-5f), FERRY_ERR_INVALID);

    /* embedding: rows of the table, widened */
    int32_t ids[3] = {0, 1, 0};
    float *tv = tu_rand_floats(&rng, (size_t)(2 * d), -1, 1);
    ferry_weight table;
    void *tstore = tu_make_weight(&table, tv, 2, d, FERRY_DTYPE_F16);
    ck_assert_int_eq(b->ops->embedding(b, out, &table, ids, 3), FERRY_OK);
    for (int32_t t = 0; t < 3; t++)
        ck_assert(memcmp(out + t * d, tv + ids[t] * d, (size_t)d * sizeof(float)) == 0);
    int32_t bad_id = 2;
    ck_assert_int_eq(b->ops->embedding(b, out, &table, &bad_id, 1), FERRY_ERR_INVALID);

    /* silu(g) * u and add */
    float g[4] = {-3, 0, 1, 20}, u[4] = {2, 5, -1, 0.5f}, s[4];
    ck_assert_int_eq(b->ops->silu_mul(b, s, g, u, 4), FERRY_OK);
    for (int i = 0; i < 4; i++)
        ck_assert_float_eq_tol(s[i], g[i] / (1 + exp(-g[i])) * u[i], 1e-6);
    ck_assert_int_eq(b->ops->add(b, s, u, 4), FERRY_OK);
    ck_assert_float_eq_tol(s[1], 5.0f, 1e-6);
    ferry_backend_destroy(b);
    free(store);
    free(tstore);
    free(tv);
    free(x);
    free(wv);
    free(out);
    free(ref);
}
END_TEST

START_TEST(test_kernels_rope_rotate_half)
{
    ferry_backend *b = cpu(1);
    int32_t hd = 8, half = 4, heads = 2, n = 3, pos0 = 5, max_pos = 16;
    float theta = 10000.0f;
    float *cosb = malloc((size_t)(max_pos * half) * sizeof(float));
    float *sinb = malloc((size_t)(max_pos * half) * sizeof(float));
    for (int32_t p = 0; p < max_pos; p++)
        for (int32_t i = 0; i < half; i++) {
            double a = p / pow(theta, 2.0 * i / hd);
            cosb[p * half + i] = (float)cos(a);
            sinb[p * half + i] = (float)sin(a);
        }
    uint64_t rng = 9;
    float *x = tu_rand_floats(&rng, (size_t)(n * heads * hd), -1, 1);
    float *y = malloc((size_t)(n * heads * hd) * sizeof(float));
    memcpy(y, x, (size_t)(n * heads * hd) * sizeof(float));
    ck_assert_int_eq(b->ops->rope(b, y, n, heads, hd, pos0, cosb, sinb), FERRY_OK);
    for (int32_t t = 0; t < n; t++)
        for (int32_t h = 0; h < heads; h++) {
            const float *v = x + (t * heads + h) * hd;
            const float *r = y + (t * heads + h) * hd;
            for (int32_t i = 0; i < half; i++) {
                double a = (pos0 + t) / pow(theta, 2.0 * i / hd);
                ck_assert_float_eq_tol(r[i], v[i] * cos(a) - v[i + half] * sin(a), 1e-5);
                ck_assert_float_eq_tol(r[i + half], v[i + half] * cos(a) + v[i] * sin(a), 1e-5);
            }
        }
    ck_assert_int_eq(b->ops->rope(b, y, n, heads, 7, pos0, cosb, sinb), FERRY_ERR_INVALID);
    ferry_backend_destroy(b);
    free(cosb);
    free(sinb);
    free(x);
    free(y);
}
END_TEST

static void attention_reference(float *out, const float *q, const float *k, const float *v,
                                int32_t n, int32_t pos0, const ferry_attn_shape *s)
{
    int32_t hd = s->head_dim, kvd = s->n_kv_heads * hd;
    for (int32_t t = 0; t < n; t++)
        for (int32_t h = 0; h < s->n_heads; h++) {
            int32_t kvh = h / (s->n_heads / s->n_kv_heads), pos = pos0 + t;
            double *sc = malloc((size_t)(pos + 1) * sizeof(double)), mx = -INFINITY, sum = 0;
            for (int32_t j = 0; j <= pos; j++) {
                double dot = 0;
                for (int32_t d = 0; d < hd; d++)
                    dot += (double)q[(t * s->n_heads + h) * hd + d] * k[j * kvd + kvh * hd + d];
                sc[j] = dot * s->scale;
                if (s->sliding_window > 0 && pos - j >= s->sliding_window)
                    sc[j] = -INFINITY;
                mx = sc[j] > mx ? sc[j] : mx;
            }
            for (int32_t j = 0; j <= pos; j++)
                sum += sc[j] = exp(sc[j] - mx);
            for (int32_t d = 0; d < hd; d++) {
                double acc = 0;
                for (int32_t j = 0; j <= pos; j++)
                    acc += sc[j] / sum * v[j * kvd + kvh * hd + d];
                out[(t * s->n_heads + h) * hd + d] = (float)acc;
            }
            free(sc);
        }
}

START_TEST(test_kernels_attention_gqa_and_window)
{
    uint64_t rng = 21;
    ferry_backend *b = cpu(3);
    const int32_t cfgs[][4] = {{4, 4, 16, 0}, {8, 2, 8, 0}, {6, 2, 32, 0}, {4, 1, 16, 5}};
    for (size_t ci = 0; ci < sizeof cfgs / sizeof cfgs[0]; ci++) {
        ferry_attn_shape s = {cfgs[ci][0], cfgs[ci][1], cfgs[ci][2], cfgs[ci][3],
                              1.0f / sqrtf((float)cfgs[ci][2])};
        int32_t pos0 = 150, n = 140; /* more than one block of keys */
        int32_t cap = pos0 + n, qd = s.n_heads * s.head_dim, kvd = s.n_kv_heads * s.head_dim;
        float *q = tu_rand_floats(&rng, (size_t)(n * qd), -1, 1);
        float *k = tu_rand_floats(&rng, (size_t)(cap * kvd), -1, 1);
        float *v = tu_rand_floats(&rng, (size_t)(cap * kvd), -1, 1);
        float *out = malloc((size_t)(n * qd) * sizeof(float)), *ref = malloc((size_t)(n * qd) * sizeof(float));
        ck_assert_int_eq(b->ops->attention(b, out, q, k, v, n, pos0, &s), FERRY_OK);
        attention_reference(ref, q, k, v, n, pos0, &s);
        tu_assert_close("attention", out, ref, (size_t)(n * qd), 1e-5, 1e-4);
        free(q);
        free(k);
        free(v);
        free(out);
        free(ref);
    }
    ferry_attn_shape bad = {6, 4, 8, 0, 1};
    float z[8] = {0};
    ck_assert_int_eq(b->ops->attention(b, z, z, z, z, 1, 0, &bad), FERRY_ERR_INVALID);
    ferry_backend_destroy(b);
}
END_TEST

START_TEST(test_kernels_router_topk)
{
    ferry_backend *b = cpu(1);
    /* token 0: clear winners 5 and 2; token 1: a tie between 1 and 3 goes to the lower id */
    float logits[2][8] = {{0, 1, 3, 0, 0, 4, 0, -1}, {0, 2, 1, 2, 0, 0, 0, 5}};
    int32_t ex[4];
    float w[4];
    ck_assert_int_eq(b->ops->router_topk(b, ex, w, &logits[0][0], 2, 8, 2, 1), FERRY_OK);
    ck_assert_int_eq(ex[0], 2);
    ck_assert_int_eq(ex[1], 5);
    ck_assert_float_eq_tol(w[0], exp(3) / (exp(3) + exp(4)), 1e-6);
    ck_assert_float_eq_tol(w[1], exp(4) / (exp(3) + exp(4)), 1e-6);
    ck_assert_int_eq(ex[2], 1);
    ck_assert_int_eq(ex[3], 7);
    ck_assert_float_eq_tol(w[2] + w[3], 1.0, 1e-6);
    ck_assert_int_eq(b->ops->router_topk(b, ex, w, &logits[0][0], 1, 8, 9, 1), FERRY_ERR_INVALID);
    ferry_backend_destroy(b);
}
END_TEST

START_TEST(test_kernels_dispatch_groups_and_combine)
{
    ferry_dispatch d;
    ck_assert_int_eq(ferry_dispatch_init(&d, 4, 8), FERRY_OK);
    int32_t experts[8] = {0, 2, 2, 3, 0, 3, 1, 2}; /* 4 tokens, top-2 */
    ck_assert_int_eq(ferry_dispatch_build(&d, experts, 4, 2), FERRY_OK);
    const int32_t want_counts[4] = {2, 1, 3, 2};
    const int32_t want_tokens[8] = {0, 2, 3, 0, 1, 3, 1, 2};
    const int32_t want_rows[8] = {0, 4, 6, 1, 2, 7, 3, 5};
    for (int e = 0; e < 4; e++)
        ck_assert_int_eq(ferry_dispatch_count(&d, e), want_counts[e]);
    ck_assert_mem_eq(d.tokens, want_tokens, sizeof want_tokens);
    ck_assert_mem_eq(d.rows, want_rows, sizeof want_rows);
    int32_t bad[2] = {0, 4};
    ck_assert_int_eq(ferry_dispatch_build(&d, bad, 1, 2), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_dispatch_build(&d, experts, 5, 2), FERRY_ERR_INVALID);
    ferry_dispatch_free(&d);

    /* combine: weighted sum of each token's k rows */
    ferry_backend *b = cpu(1);
    float y[4][2] = {{1, 2}, {10, 20}, {3, 4}, {30, 40}}, wt[4] = {0.25f, 0.75f, 0.5f, 0.5f};
    float out[2][2];
    ck_assert_int_eq(b->ops->combine(b, &out[0][0], &y[0][0], wt, 2, 2, 2), FERRY_OK);
    ck_assert_float_eq(out[0][0], 7.75f);
    ck_assert_float_eq(out[0][1], 15.5f);
    ck_assert_float_eq(out[1][0], 16.5f);
    ck_assert_float_eq(out[1][1], 22.0f);
    ferry_backend_destroy(b);
}
END_TEST

START_TEST(test_kernels_sampler)
{
    ferry_sampler s;
    float logits[6] = {1.0f, 3.0f, 2.9f, -1.0f, 3.0f, 0.0f};
    ck_assert_int_eq(ferry_argmax(logits, 6), 1); /* first of equals */
    ck_assert_int_eq(ferry_sampler_init(&s, 6, 0, 0, 1, 1), FERRY_OK);
    ck_assert_int_eq(ferry_sampler_sample(&s, logits), 1);
    ferry_sampler_free(&s);

    /* top-k 2 at a high temperature only ever picks 1 or 4 */
    ck_assert_int_eq(ferry_sampler_init(&s, 6, 5.0f, 2, 1, 7), FERRY_OK);
    int seen[6] = {0};
    for (int i = 0; i < 2000; i++)
        seen[ferry_sampler_sample(&s, logits)]++;
    ck_assert_int_eq(seen[0] + seen[2] + seen[3] + seen[5], 0);
    ck_assert(seen[1] > 800 && seen[4] > 800);
    ferry_sampler_free(&s);

    /* top-p: {1, 4} hold 0.64 of the mass at T=1, so p = 0.5 keeps exactly those two */
    ck_assert_int_eq(ferry_sampler_init(&s, 6, 1.0f, 0, 0.5f, 7), FERRY_OK);
    memset(seen, 0, sizeof seen);
    for (int i = 0; i < 2000; i++)
        seen[ferry_sampler_sample(&s, logits)]++;
    ck_assert_int_eq(seen[0] + seen[2] + seen[3] + seen[5], 0);
    ck_assert(seen[1] > 800 && seen[4] > 800);
    ferry_sampler_free(&s);

    /* plain T=1 sampling follows the softmax: frequencies within a few percent */
    ck_assert_int_eq(ferry_sampler_init(&s, 6, 1.0f, 0, 1, 99), FERRY_OK);
    memset(seen, 0, sizeof seen);
    int N = 60000;
    for (int i = 0; i < N; i++)
        seen[ferry_sampler_sample(&s, logits)]++;
    double z = 0;
    for (int i = 0; i < 6; i++)
        z += exp(logits[i]);
    for (int i = 0; i < 6; i++)
        ck_assert_msg(fabs(seen[i] / (double)N - exp(logits[i]) / z) < 0.01, "token %d: %f vs %f",
                      i, seen[i] / (double)N, exp(logits[i]) / z);
    ferry_sampler_free(&s);

    ck_assert_int_eq(ferry_sampler_init(&s, 6, -1, 0, 1, 0), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_sampler_init(&s, 6, 1, 0, 0, 0), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_sampler_init(&s, 6, 1, -2, 1, 0), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_sampler_init(&s, 6, NAN, 0, 1, 0), FERRY_ERR_INVALID);
}
END_TEST

static Suite *kernels_suite(void)
{
    Suite *s = suite_create("kernels");
    TCase *tc = tcase_create("cpu");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_kernels_half_conversions_exact);
    tcase_add_test(tc, test_kernels_pool_runs_each_task_once);
    tcase_add_test(tc, test_kernels_pool_pins_workers_to_cores);
    tcase_add_test(tc, test_kernels_matmul_matches_definition);
    tcase_add_test(tc, test_kernels_matmul_independent_of_threads);
    tcase_add_test(tc, test_kernels_rmsnorm_embedding_silu_add);
    tcase_add_test(tc, test_kernels_rope_rotate_half);
    tcase_add_test(tc, test_kernels_attention_gqa_and_window);
    tcase_add_test(tc, test_kernels_router_topk);
    tcase_add_test(tc, test_kernels_dispatch_groups_and_combine);
    tcase_add_test(tc, test_kernels_sampler);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(kernels_suite()); }
