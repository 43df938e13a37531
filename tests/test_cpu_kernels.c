/*
 * tests/test_cpu_kernels.c: the vectorised CPU matmul kernels against the reference kernel,
 * bit for bit (the exact ones) or within 1e-2 (avx512bf16), directly and through the backend
 * table; the choice of kernel set (detection, names, refusal of what the CPU lacks).
 *
 * Inputs mix signs and magnitudes over many binades, so that any change in rounding (a
 * fused multiply-add) or in the order of the additions changes some output bits.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cpu/cpu_kernels.h"
#include "tests/check_util.h"

static const int64_t g_cols[] = {1, 3, 8, 9, 15, 16, 17, 100, 511, 512, 513, 1030, 4096};
static const int64_t g_rows[] = {1, 2, 3, 7, 8, 9, 33};
static const int32_t g_ns[] = {1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 40};
static const ferry_dtype g_types[] = {FERRY_DTYPE_F32, FERRY_DTYPE_F16, FERRY_DTYPE_BF16};
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static const ferry_cpu_isa g_exact[] = {FERRY_CPU_ISA_AVX2, FERRY_CPU_ISA_AVX512};

/* n floats u * 2^e, u uniform in [-1, 1), e uniform in [-span, span]. */
static float *spread_floats(uint64_t *rng, size_t n, int span)
{
    float *v = malloc((n ? n : 1) * sizeof(float));
    ck_assert(v != NULL);
    for (size_t i = 0; i < n; i++) {
        int e = (int)(tu_rand_u64(rng) % (uint64_t)(2 * span + 1)) - span;
        v[i] = ldexpf(tu_rand_uniform(rng, -1, 1), e);
    }
    return v;
}

typedef struct {
    ferry_weight w;
    void *store;
    float *wv, *x;
    float *ref; /* (n, rows) from the reference kernel */
    int32_t n;
} mm_case;

/* span 1: weights over 2^-12..2^12 (f16 holds up to 65504; its denormals included),
 * activations over 2^-16..2^16. span 0: both uniform in [-1, 1). */
static mm_case make_case(uint64_t *rng, ferry_dtype t, int64_t rows, int64_t cols, int32_t n,
                         int span)
{
    mm_case c = {.n = n};
    c.wv = spread_floats(rng, (size_t)(rows * cols), 12 * span);
    c.x = spread_floats(rng, (size_t)n * (size_t)cols, 16 * span);
    c.store = tu_make_weight(&c.w, c.wv, rows, cols, t);
    c.ref = malloc((size_t)n * (size_t)rows * sizeof(float));
    ck_assert(c.ref != NULL);
    ferry_cpu_matmul_reference(c.ref, c.x, &c.w, n, 0, rows);
    return c;
}

static void free_case(mm_case *c)
{
    free(c->store);
    free(c->wv);
    free(c->x);
    free(c->ref);
}

/* Fails unless got and want hold the same bits; names the case and the first mismatch. */
static void assert_same_bits(const char *what, const mm_case *c, const float *got,
                             const float *want)
{
    size_t n_out = (size_t)c->n * (size_t)c->w.rows;
    if (memcmp(got, want, n_out * sizeof(float)) == 0)
        return;
    size_t i = 0;
    while (memcmp(got + i, want + i, sizeof(float)) == 0)
        i++;
    ck_abort_msg("%s: %s weight (%lld, %lld), n %d: output (token %zu, row %zu) is %.9g, "
                 "reference %.9g",
                 what, ferry_dtype_name(c->w.dtype), (long long)c->w.rows, (long long)c->w.cols,
                 (int)c->n, i / (size_t)c->w.rows, i % (size_t)c->w.rows, (double)got[i],
                 (double)want[i]);
}

/* Runs kernel fn over the rows [j0, j1) of a buffer full of sentinels, checks the rows
 * outside stay untouched, and copies the rows computed into acc. */
static void run_range(ferry_cpu_matmul_fn fn, const mm_case *c, float *acc, int64_t j0, int64_t j1)
{
    int64_t rows = c->w.rows;
    size_t n_out = (size_t)c->n * (size_t)rows;
    float *out = malloc(n_out * sizeof(float));
    ck_assert(out != NULL);
    for (size_t i = 0; i < n_out; i++)
        out[i] = -12345.0f;
    fn(out, c->x, &c->w, c->n, j0, j1);
    for (int32_t t = 0; t < c->n; t++)
        for (int64_t j = 0; j < rows; j++) {
            float v = out[(size_t)t * (size_t)rows + (size_t)j];
            if (j >= j0 && j < j1)
                acc[(size_t)t * (size_t)rows + (size_t)j] = v;
            else
                ck_assert_msg(v == -12345.0f, "row %lld written outside [%lld, %lld)", (long long)j,
                              (long long)j0, (long long)j1);
        }
    free(out);
}

START_TEST(test_matmul_reference_independent_of_n)
{
    uint64_t rng = 7;
    mm_case c = make_case(&rng, FERRY_DTYPE_BF16, 9, 1030, 17, 1);
    float *one = malloc((size_t)c.w.rows * sizeof(float));
    for (int32_t t = 0; t < c.n; t++) {
        ferry_cpu_matmul_reference(one, c.x + (size_t)t * (size_t)c.w.cols, &c.w, 1, 0, c.w.rows);
        ck_assert(memcmp(one, c.ref + (size_t)t * (size_t)c.w.rows,
                         (size_t)c.w.rows * sizeof(float)) == 0);
    }
    free(one);
    free_case(&c);
}
END_TEST

/* Every exact kernel, every dtype and shape of the lists, full and split row ranges. */
START_TEST(test_matmul_exact_kernels_match_reference)
{
    ferry_cpu_isa isa = g_exact[_i];
    ferry_cpu_matmul_fn fn = ferry_cpu_matmul_kernel(isa);
    if (!fn)
        return; /* this CPU lacks it: test_isa_missing_is_refused covers that */
    uint64_t rng = 1000 + (uint64_t)isa;
    size_t n_cases = 0;
    for (size_t ti = 0; ti < COUNT(g_types); ti++)
        for (size_t ci = 0; ci < COUNT(g_cols); ci++)
            for (size_t ri = 0; ri < COUNT(g_rows); ri++)
                for (size_t ni = 0; ni < COUNT(g_ns); ni++) {
                    mm_case c = make_case(&rng, g_types[ti], g_rows[ri], g_cols[ci], g_ns[ni], 1);
                    size_t n_out = (size_t)c.n * (size_t)c.w.rows;
                    float *got = malloc(n_out * sizeof(float));
                    run_range(fn, &c, got, 0, c.w.rows);
                    assert_same_bits(ferry_cpu_isa_name(isa), &c, got, c.ref);
                    /* the same rows in three arbitrary pieces */
                    int64_t a = (int64_t)(tu_rand_u64(&rng) % (uint64_t)(c.w.rows + 1));
                    int64_t b = (int64_t)(tu_rand_u64(&rng) % (uint64_t)(c.w.rows + 1));
                    if (a > b) {
                        int64_t tmp = a;
                        a = b;
                        b = tmp;
                    }
                    memset(got, 0, n_out * sizeof(float));
                    run_range(fn, &c, got, 0, a);
                    run_range(fn, &c, got, a, b);
                    run_range(fn, &c, got, b, c.w.rows);
                    assert_same_bits(ferry_cpu_isa_name(isa), &c, got, c.ref);
                    free(got);
                    free_case(&c);
                    n_cases++;
                }
    ck_assert_uint_eq(n_cases, COUNT(g_types) * COUNT(g_cols) * COUNT(g_rows) * COUNT(g_ns));
}
END_TEST

/* Special values go through the same operations: infinities, NaN from inf * 0, -0. */
START_TEST(test_matmul_exact_kernels_special_values)
{
    uint64_t rng = 99;
    for (size_t k = 0; k < COUNT(g_exact); k++) {
        ferry_cpu_matmul_fn fn = ferry_cpu_matmul_kernel(g_exact[k]);
        if (!fn)
            continue;
        for (size_t ti = 0; ti < COUNT(g_types); ti++) {
            mm_case c = {.n = 5};
            int64_t rows = 9, cols = 37;
            c.wv = spread_floats(&rng, (size_t)(rows * cols), 4);
            c.x = spread_floats(&rng, (size_t)c.n * (size_t)cols, 4);
            c.wv[3] = INFINITY;
            c.wv[cols + 5] = -0.0f;
            c.wv[2 * cols + 8] = 0.0f;
            c.x[8] = INFINITY; /* token 0: inf * 0 = NaN in row 2 */
            c.x[cols + 3] = -INFINITY;
            c.x[2 * cols + 1] = -0.0f;
            for (int64_t i = 0; i < cols; i++)
                c.wv[4 * cols + i] = -0.0f; /* row 4: all -0 */
            c.store = tu_make_weight(&c.w, c.wv, rows, cols, g_types[ti]);
            c.ref = malloc((size_t)c.n * (size_t)rows * sizeof(float));
            ferry_cpu_matmul_reference(c.ref, c.x, &c.w, c.n, 0, rows);
            float *got = malloc((size_t)c.n * (size_t)rows * sizeof(float));
            fn(got, c.x, &c.w, c.n, 0, rows);
            assert_same_bits(ferry_cpu_isa_name(g_exact[k]), &c, got, c.ref);
            free(got);
            free_case(&c);
        }
    }
}
END_TEST

static ferry_backend *backend(int32_t n_threads, ferry_cpu_isa isa)
{
    ferry_backend *b;
    ck_assert_msg(ferry_backend_cpu_create_isa(n_threads, 0, (int32_t)isa, &b) == FERRY_OK, "%s",
                  ferry_last_error());
    ck_assert_msg(strstr(b->device, ferry_cpu_isa_name(isa)) != NULL, "device '%s'", b->device);
    return b;
}

/* Through the backend table, 1 and 2 threads, products large enough to use the pool. */
START_TEST(test_backend_cpu_isa_matches_reference_backend)
{
    const int64_t shapes[][2] = {{33, 4096}, {257, 600}, {7, 1030}, {130, 17}, {1000, 192}};
    const int32_t ns[] = {1, 2, 3, 5, 8, 17, 40, 70}; /* 70: more than one group of tokens */
    ferry_backend *ref = backend(1, FERRY_CPU_ISA_REFERENCE);
    uint64_t rng = 3;
    for (size_t k = 0; k < COUNT(g_exact); k++) {
        if (!ferry_cpu_isa_available(g_exact[k]))
            continue;
        for (int32_t threads = 1; threads <= 2; threads++) {
            ferry_backend *b = backend(threads, g_exact[k]);
            for (size_t ti = 0; ti < COUNT(g_types); ti++)
                for (size_t si = 0; si < COUNT(shapes); si++)
                    for (size_t ni = 0; ni < COUNT(ns); ni++) {
                        mm_case c =
                            make_case(&rng, g_types[ti], shapes[si][0], shapes[si][1], ns[ni], 1);
                        size_t n_out = (size_t)c.n * (size_t)c.w.rows;
                        float *want = malloc(n_out * sizeof(float));
                        float *got = malloc(n_out * sizeof(float));
                        ck_assert_int_eq(ref->ops->matmul(ref, want, c.x, &c.w, c.n), FERRY_OK);
                        ck_assert_int_eq(b->ops->matmul(b, got, c.x, &c.w, c.n), FERRY_OK);
                        assert_same_bits(b->device, &c, want, c.ref);
                        assert_same_bits(b->device, &c, got, want);
                        free(want);
                        free(got);
                        free_case(&c);
                    }
            ferry_backend_destroy(b);
        }
    }
    ferry_backend_destroy(ref);
}
END_TEST

/* q8 and q4 weights: every kernel's fused dequantization equals the reference's, which
 * equals a float32 matmul over the dequantized rows (ferry_dequantize_row), bit for bit, for
 * the decode and the prefill paths, full and split row ranges, and through the backend. */
START_TEST(test_matmul_quant_fused_equals_dequantize_then_multiply)
{
    const ferry_dtype qt[] = {FERRY_DTYPE_Q8, FERRY_DTYPE_Q4};
    const int64_t cols[] = {32, 64, 96, 512, 544, 1056, 4096};
    const ferry_cpu_isa isas[] = {FERRY_CPU_ISA_REFERENCE, FERRY_CPU_ISA_AVX2,
                                  FERRY_CPU_ISA_AVX512, FERRY_CPU_ISA_AVX512BF16};
    uint64_t rng = 4242;
    size_t n_checked = 0;
    for (size_t ti = 0; ti < COUNT(qt); ti++)
        for (size_t ci = 0; ci < COUNT(cols); ci++)
            for (size_t ri = 0; ri < COUNT(g_rows); ri++)
                for (size_t ni = 0; ni < COUNT(g_ns); ni += 2) {
                    mm_case c = make_case(&rng, qt[ti], g_rows[ri], cols[ci], g_ns[ni], 1);
                    /* make_case left the dequantized values in c.wv: the same rows in f32 */
                    ferry_weight wf;
                    void *fstore = tu_make_weight(&wf, c.wv, c.w.rows, c.w.cols, FERRY_DTYPE_F32);
                    size_t n_out = (size_t)c.n * (size_t)c.w.rows;
                    float *want = malloc(n_out * sizeof(float)), *got = malloc(n_out * sizeof(float));
                    ferry_cpu_matmul_reference(want, c.x, &wf, c.n, 0, wf.rows);
                    assert_same_bits("dequantize then multiply", &c, c.ref, want);
                    for (size_t k = 0; k < COUNT(isas); k++) {
                        ferry_cpu_matmul_fn fn = ferry_cpu_matmul_kernel(isas[k]);
                        if (!fn)
                            continue;
                        run_range(fn, &c, got, 0, c.w.rows);
                        assert_same_bits(ferry_cpu_isa_name(isas[k]), &c, got, want);
                        int64_t a = (int64_t)(tu_rand_u64(&rng) % (uint64_t)(c.w.rows + 1));
                        memset(got, 0, n_out * sizeof(float));
                        run_range(fn, &c, got, 0, a);
                        run_range(fn, &c, got, a, c.w.rows);
                        assert_same_bits(ferry_cpu_isa_name(isas[k]), &c, got, want);
                        n_checked++;
                    }
                    free(want);
                    free(got);
                    free(fstore);
                    free_case(&c);
                }
    ck_assert(n_checked >= COUNT(qt) * COUNT(cols) * COUNT(g_rows) * (COUNT(g_ns) / 2));

    /* through the backend, with the thread pool splitting the rows */
    ferry_backend *b = backend(2, ferry_cpu_isa_best_exact());
    const int64_t shapes[][2] = {{257, 608}, {1000, 192}, {33, 4096}};
    const int32_t ns[] = {1, 3, 70};
    for (size_t ti = 0; ti < COUNT(qt); ti++)
        for (size_t si = 0; si < COUNT(shapes); si++)
            for (size_t ni = 0; ni < COUNT(ns); ni++) {
                mm_case c = make_case(&rng, qt[ti], shapes[si][0], shapes[si][1], ns[ni], 1);
                float *got = malloc((size_t)c.n * (size_t)c.w.rows * sizeof(float));
                ck_assert_int_eq(b->ops->matmul(b, got, c.x, &c.w, c.n), FERRY_OK);
                assert_same_bits(b->device, &c, got, c.ref);
                free(got);
                free_case(&c);
            }
    ferry_backend_destroy(b);
}
END_TEST

/* Quantized weights serve matmuls of whole groups only; other ops refuse them by name. */
START_TEST(test_quant_weights_refused_where_unsupported)
{
    ferry_backend *b = backend(1, FERRY_CPU_ISA_REFERENCE);
    uint8_t q[4 * 34] = {0};
    float x[64] = {0}, y[64];
    ferry_weight w = {.d_data = q, .dtype = FERRY_DTYPE_Q8, .rows = 1, .cols = 48};
    ck_assert_int_eq(b->ops->matmul(b, y, x, &w, 1), FERRY_ERR_UNSUPPORTED);
    ck_assert(strstr(ferry_last_error(), "multiple of 32") != NULL);
    w.cols = 64;
    ck_assert_int_eq(b->ops->matmul(b, y, x, &w, 1), FERRY_OK);
    ck_assert_int_eq(b->ops->rmsnorm(b, y, x, &w, 1, 64, 1e-5f), FERRY_ERR_UNSUPPORTED);
    ck_assert(strstr(ferry_last_error(), "rmsnorm: Q8") != NULL);
    int32_t id = 0;
    w.dtype = FERRY_DTYPE_Q4;
    ck_assert_int_eq(b->ops->embedding(b, y, &w, &id, 1), FERRY_ERR_UNSUPPORTED);
    ferry_backend_destroy(b);
}
END_TEST

/* Lossy, but each output depends on its own row alone. */
START_TEST(test_matmul_avx512bf16_close_and_independent_of_n)
{
    ferry_cpu_matmul_fn fn = ferry_cpu_matmul_kernel(FERRY_CPU_ISA_AVX512BF16);
    if (!fn)
        return;
    ck_assert_int_eq(ferry_cpu_isa_exact(FERRY_CPU_ISA_AVX512BF16), 0);
    uint64_t rng = 21;
    for (size_t ti = 0; ti < COUNT(g_types); ti++)
        for (size_t ci = 0; ci < COUNT(g_cols); ci++)
            for (size_t ri = 0; ri < COUNT(g_rows); ri += 2)
                for (size_t ni = 0; ni < COUNT(g_ns); ni += 3) {
                    int64_t rows = g_rows[ri], cols = g_cols[ci];
                    /* uniform values: with magnitudes spread over many binades, a single
                     * dot product can cancel down to its rounding errors */
                    mm_case c = make_case(&rng, g_types[ti], rows, cols, g_ns[ni], 0);
                    size_t n_out = (size_t)c.n * (size_t)rows;
                    float *got = malloc(n_out * sizeof(float));
                    run_range(fn, &c, got, 0, rows);
                    if (g_types[ti] == FERRY_DTYPE_BF16) {
                        double err = tu_rel_l2(got, c.ref, n_out);
                        ck_assert_msg(err <= 1e-2, "(%lld, %lld), n %d: relative L2 error %g",
                                      (long long)rows, (long long)cols, (int)c.n, err);
                    } else {
                        /* f32 and f16 weights run the exact AVX-512 kernel */
                        assert_same_bits("avx512bf16", &c, got, c.ref);
                    }
                    float *one = malloc((size_t)rows * sizeof(float));
                    for (int32_t t = 0; t < c.n; t++) {
                        fn(one, c.x + (size_t)t * (size_t)cols, &c.w, 1, 0, rows);
                        ck_assert_msg(memcmp(one, got + (size_t)t * (size_t)rows,
                                             (size_t)rows * sizeof(float)) == 0,
                                      "(%lld, %lld), n %d: token %d alone differs", (long long)rows,
                                      (long long)cols, (int)c.n, (int)t);
                    }
                    int64_t a = rows / 2;
                    free(one);
                    float *split = malloc(n_out * sizeof(float));
                    run_range(fn, &c, split, 0, a);
                    run_range(fn, &c, split, a, rows);
                    ck_assert(memcmp(split, got, n_out * sizeof(float)) == 0);
                    free(split);
                    free(got);
                    free_case(&c);
                }
}
END_TEST

START_TEST(test_isa_detection_consistent)
{
    ck_assert(ferry_cpu_isa_available(FERRY_CPU_ISA_REFERENCE));
    ck_assert(ferry_cpu_isa_available(FERRY_CPU_ISA_AUTO));
    ck_assert(!ferry_cpu_isa_available(FERRY_CPU_ISA_COUNT));
    ferry_cpu_isa best = ferry_cpu_isa_best_exact();
    ck_assert(ferry_cpu_isa_exact(best) && ferry_cpu_isa_available(best));
    if (ferry_cpu_isa_available(FERRY_CPU_ISA_AVX512))
        ck_assert_int_eq(best, FERRY_CPU_ISA_AVX512);
    else if (ferry_cpu_isa_available(FERRY_CPU_ISA_AVX2))
        ck_assert_int_eq(best, FERRY_CPU_ISA_AVX2);
    else
        ck_assert_int_eq(best, FERRY_CPU_ISA_REFERENCE);
    /* AVX512BF16 needs the rest of AVX-512, which needs AVX2 */
    if (ferry_cpu_isa_available(FERRY_CPU_ISA_AVX512BF16))
        ck_assert(ferry_cpu_isa_available(FERRY_CPU_ISA_AVX512));
    if (ferry_cpu_isa_available(FERRY_CPU_ISA_AVX512))
        ck_assert(ferry_cpu_isa_available(FERRY_CPU_ISA_AVX2));
    ck_assert(ferry_cpu_matmul_kernel(FERRY_CPU_ISA_AUTO) == ferry_cpu_matmul_kernel(best));
    ck_assert(ferry_cpu_matmul_kernel(FERRY_CPU_ISA_REFERENCE) == ferry_cpu_matmul_reference);
    ck_assert(ferry_cpu_matmul_kernel(FERRY_CPU_ISA_COUNT) == NULL);
    ck_assert_int_eq(ferry_cpu_isa_exact(FERRY_CPU_ISA_AVX2), 1);
    ck_assert_int_eq(ferry_cpu_isa_exact(FERRY_CPU_ISA_AVX512), 1);

    ferry_backend *b;
    ck_assert_int_eq(ferry_backend_cpu_create(1, 0, &b), FERRY_OK);
    ck_assert_msg(strstr(b->device, ferry_cpu_isa_name(best)) != NULL, "%s", b->device);
    ferry_backend_destroy(b);
    ck_assert_int_eq(ferry_backend_cpu_create_isa(1, 0, FERRY_CPU_ISA_COUNT, &b),
                     FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_backend_cpu_create_isa(1, 0, -1, &b), FERRY_ERR_INVALID);
}
END_TEST

/* Every set this CPU lacks is refused by name (nothing to check where it has them all; a
 * build with -DFERRY_CPU_X86=0 lacks all of them). */
START_TEST(test_isa_missing_is_refused)
{
    for (int i = FERRY_CPU_ISA_AVX2; i < FERRY_CPU_ISA_COUNT; i++) {
        if (ferry_cpu_isa_available((ferry_cpu_isa)i))
            continue;
        ferry_backend *b = NULL;
        ck_assert_int_eq(ferry_backend_cpu_create_isa(1, 0, i, &b), FERRY_ERR_UNSUPPORTED);
        ck_assert(b == NULL);
        ck_assert_msg(strstr(ferry_last_error(), ferry_cpu_isa_name((ferry_cpu_isa)i)) != NULL,
                      "%s", ferry_last_error());
        ck_assert(ferry_cpu_matmul_kernel((ferry_cpu_isa)i) == NULL);
    }
}
END_TEST

START_TEST(test_isa_parse_names)
{
    for (int i = 0; i < FERRY_CPU_ISA_COUNT; i++) {
        ferry_cpu_isa got = FERRY_CPU_ISA_COUNT;
        ck_assert_int_eq(ferry_cpu_isa_parse(ferry_cpu_isa_name((ferry_cpu_isa)i), &got), FERRY_OK);
        ck_assert_int_eq(got, i);
    }
    ck_assert_str_eq(ferry_cpu_isa_name(FERRY_CPU_ISA_AVX512BF16), "avx512bf16");
    ck_assert_str_eq(ferry_cpu_isa_name(FERRY_CPU_ISA_COUNT), "?");
    const char *bad[] = {"", "AVX2", "avx", "avx512bf", "avx512 ", "sse4"};
    for (size_t k = 0; k < COUNT(bad); k++) {
        ferry_cpu_isa got = FERRY_CPU_ISA_AVX2;
        ck_assert_int_eq(ferry_cpu_isa_parse(bad[k], &got), FERRY_ERR_INVALID);
        ck_assert_int_eq(got, FERRY_CPU_ISA_AVX2);
        ck_assert_msg(strstr(ferry_last_error(), "reference") &&
                          strstr(ferry_last_error(), "avx512bf16"),
                      "%s", ferry_last_error());
    }
    ferry_cpu_isa got = FERRY_CPU_ISA_AVX2;
    ck_assert_int_eq(ferry_cpu_isa_parse(NULL, &got), FERRY_ERR_INVALID);
}
END_TEST

/* Attention: every x86 set's kernel gives the reference's bits, for head sizes with and
 * without a multiple of 8 (those fall back), contexts inside one block and across several,
 * sliding windows, interleaved KV heads; scores spread over a wide range so the softmax's
 * rescaling between blocks matters. */
START_TEST(test_attention_kernels_match_reference)
{
    const int32_t hds[] = {8, 16, 32, 64, 96, 128, 136, 12};
    const int32_t lasts[] = {0, 1, 7, 8, 9, 127, 128, 129, 255, 256, 700};
    ferry_cpu_attn_fn ref = ferry_cpu_attn_kernel(FERRY_CPU_ISA_REFERENCE);
    ck_assert_ptr_eq(ref, ferry_cpu_attn_reference);
    uint64_t rng = 11;
    int n_checked = 0;
    for (size_t k = 0; k < COUNT(g_exact); k++) {
        ferry_cpu_attn_fn fn = ferry_cpu_attn_kernel(g_exact[k]);
        if (!ferry_cpu_isa_available(g_exact[k])) {
            ck_assert_ptr_null(fn);
            continue;
        }
        ck_assert_ptr_nonnull(fn);
        for (size_t hi = 0; hi < COUNT(hds); hi++)
            for (size_t li = 0; li < COUNT(lasts); li++) {
                int32_t hd = hds[hi], last = lasts[li];
                size_t stride = 2 * (size_t)hd; /* two KV heads; this one is the second */
                float *q = spread_floats(&rng, (size_t)hd, 1);
                float *kv = spread_floats(&rng, 2 * (size_t)(last + 1) * stride, 1);
                const int32_t firsts[] = {0, last / 2, last};
                for (int f = 0; f < 3; f++) {
                    ferry_cpu_attn_head a = {.q = q,
                                             .k = kv + hd,
                                             .v = kv + (size_t)(last + 1) * stride + hd,
                                             .kv_stride = stride,
                                             .first = firsts[f],
                                             .last = last,
                                             .head_dim = hd,
                                             .scale = 1.0f / sqrtf((float)hd)};
                    float *want = malloc((size_t)hd * sizeof(float));
                    float *got = malloc((size_t)hd * sizeof(float));
                    ref(want, &a);
                    fn(got, &a);
                    ck_assert_msg(memcmp(want, got, (size_t)hd * sizeof(float)) == 0,
                                  "%s: head_dim %d, positions %d..%d differ",
                                  ferry_cpu_isa_name(g_exact[k]), (int)hd, (int)firsts[f],
                                  (int)last);
                    for (int32_t d = 0; d < hd; d++)
                        ck_assert(isfinite(want[d]));
                    free(want);
                    free(got);
                    n_checked++;
                }
                free(q);
                free(kv);
            }
    }
    if (ferry_cpu_isa_available(FERRY_CPU_ISA_AVX2))
        ck_assert_int_gt(n_checked, 0);
}
END_TEST

/* The attention op of each x86 backend equals the reference backend's: grouped-query heads,
 * several tokens after a prefix, a sliding window, 1 and 2 threads. */
START_TEST(test_backend_attention_matches_reference_backend)
{
    const int32_t n = 5, pos0 = 300, n_heads = 6, n_kv = 2, hd = 32, ctx = pos0 + n;
    uint64_t rng = 5;
    float *q = spread_floats(&rng, (size_t)n * n_heads * hd, 1);
    float *k = spread_floats(&rng, (size_t)ctx * n_kv * hd, 1);
    float *v = spread_floats(&rng, (size_t)ctx * n_kv * hd, 1);
    size_t n_out = (size_t)n * n_heads * hd;
    float *want = malloc(n_out * sizeof(float)), *got = malloc(n_out * sizeof(float));
    ferry_backend *ref = backend(1, FERRY_CPU_ISA_REFERENCE);
    for (int window = 0; window <= 100; window += 100) {
        ferry_attn_shape sh = {n_heads, n_kv, hd, window, 1.0f / sqrtf((float)hd)};
        ck_assert_int_eq(ref->ops->attention(ref, want, q, k, v, n, pos0, &sh), FERRY_OK);
        for (size_t i = 0; i < COUNT(g_exact); i++) {
            if (!ferry_cpu_isa_available(g_exact[i]))
                continue;
            for (int32_t threads = 1; threads <= 2; threads++) {
                ferry_backend *b = backend(threads, g_exact[i]);
                ck_assert_int_eq(b->ops->attention(b, got, q, k, v, n, pos0, &sh), FERRY_OK);
                ck_assert_msg(memcmp(want, got, n_out * sizeof(float)) == 0, "%s, window %d",
                              b->device, window);
                ferry_backend_destroy(b);
            }
        }
    }
    ferry_backend_destroy(ref);
    free(q);
    free(k);
    free(v);
    free(want);
    free(got);
}
END_TEST

static Suite *cpu_kernels_suite(void)
{
    Suite *s = suite_create("cpu_kernels");
    TCase *tc = tcase_create("matmul");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_matmul_reference_independent_of_n);
    tcase_add_loop_test(tc, test_matmul_exact_kernels_match_reference, 0, (int)COUNT(g_exact));
    tcase_add_test(tc, test_matmul_exact_kernels_special_values);
    tcase_add_test(tc, test_backend_cpu_isa_matches_reference_backend);
    tcase_add_test(tc, test_matmul_avx512bf16_close_and_independent_of_n);
    tcase_add_test(tc, test_matmul_quant_fused_equals_dequantize_then_multiply);
    tcase_add_test(tc, test_quant_weights_refused_where_unsupported);
    tcase_add_test(tc, test_attention_kernels_match_reference);
    tcase_add_test(tc, test_backend_attention_matches_reference_backend);
    tcase_add_test(tc, test_isa_detection_consistent);
    tcase_add_test(tc, test_isa_missing_is_refused);
    tcase_add_test(tc, test_isa_parse_names);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(cpu_kernels_suite()); }
