/*
 * tests/check_util.c: see check_util.h.
 */
#include "tests/check_util.h"
#include "kernels/quant.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

double tu_rel_l2(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

void tu_assert_close(const char *what, const float *a, const float *b, size_t n, double atol,
                     double rtol)
{
    double max_err = 0;
    size_t max_i = 0, n_bad = 0;
    char bad[512] = "";
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)a[i] - (double)b[i]);
        if (!(err <= max_err))
            max_err = err, max_i = i;
        if (!(err <= atol + rtol * fabs((double)b[i]))) {
            if (n_bad < 5 && used < sizeof bad - 64)
                used += (size_t)snprintf(bad + used, sizeof bad - used, " [%zu] %.7g vs %.7g;", i,
                                         (double)a[i], (double)b[i]);
            n_bad++;
        }
    }
    ck_assert_msg(n_bad == 0, "%s: %zu of %zu differ (max abs err %.3g at %zu):%s", what, n_bad,
                  n, max_err, max_i, bad);
}

uint64_t tu_rand_u64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

float tu_rand_uniform(uint64_t *state, float lo, float hi)
{
    return lo + (hi - lo) * (float)((tu_rand_u64(state) >> 40) * (1.0 / 16777216.0));
}

void tu_scratch_dir(char *path, const char *name)
{
    char cmd[1100];
    snprintf(path, 512, "%.250s/scratch/%.200s.%d", FERRY_BINARY_DIR, name, (int)getpid());
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", path, path);
    ck_assert_msg(system(cmd) == 0, "cannot make %s", path);
}

void tu_write_file(char *path, const char *name, const void *data, size_t len)
{
    char dir[256];
    snprintf(dir, sizeof dir, "%s/scratch", FERRY_BINARY_DIR);
    mkdir(dir, 0755);
    snprintf(path, 512, "%s/%.200s.%d", dir, name, (int)getpid());
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "cannot write %s: %s", path, strerror(errno));
    ck_assert(fwrite(data, 1, len, f) == len);
    ck_assert(fclose(f) == 0);
}

char *tu_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot read %s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    ck_assert(buf != NULL);
    ck_assert((long)fread(buf, 1, (size_t)n, f) == n);
    buf[n] = 0;
    fclose(f);
    if (len)
        *len = (size_t)n;
    return buf;
}

int32_t *tu_json_ints(const cJSON *a, int32_t *n)
{
    *n = cJSON_GetArraySize(a);
    int32_t *v = malloc(((size_t)*n + 1) * sizeof *v);
    ck_assert(v != NULL);
    int32_t i = 0; /* walk the list once: cJSON_GetArrayItem(a, i) is O(i) */
    for (const cJSON *e = a ? a->child : NULL; e && i < *n; e = e->next)
        v[i++] = (int32_t)e->valuedouble;
    return v;
}

float *tu_json_floats(const cJSON *a, int32_t *n)
{
    *n = cJSON_GetArraySize(a);
    float *v = malloc(((size_t)*n + 1) * sizeof *v);
    ck_assert(v != NULL);
    int32_t i = 0;
    for (const cJSON *e = a ? a->child : NULL; e && i < *n; e = e->next)
        v[i++] = (float)e->valuedouble;
    return v;
}

float *tu_rand_floats(uint64_t *state, size_t n, float lo, float hi)
{
    float *v = malloc((n ? n : 1) * sizeof *v);
    ck_assert(v != NULL);
    for (size_t i = 0; i < n; i++)
        v[i] = tu_rand_uniform(state, lo, hi);
    return v;
}

void *tu_make_weight(ferry_weight *w, float *vals, int64_t rows, int64_t cols, ferry_dtype t)
{
    size_t n = (size_t)(rows * cols);
    if (ferry_dtype_is_quant(t)) {
        size_t rb = ferry_dtype_row_bytes(t, cols);
        uint8_t *q = malloc((size_t)rows * rb + 1);
        ck_assert(q != NULL);
        for (int64_t r = 0; r < rows; r++) {
            ck_assert_msg(ferry_quantize_row(t, vals + r * cols, cols, q + (size_t)r * rb) == 0,
                          "%s", ferry_last_error());
            ck_assert(ferry_dequantize_row(t, q + (size_t)r * rb, cols, vals + r * cols) == 0);
        }
        *w = (ferry_weight){.d_data = q, .dtype = t, .rows = rows, .cols = cols};
        return q;
    }
    void *data = malloc((n ? n : 1) * ferry_dtype_size(t));
    ck_assert(data != NULL);
    for (size_t i = 0; i < n; i++) {
        if (t == FERRY_DTYPE_BF16) {
            uint16_t h = ferry_f32_to_bf16(vals[i]);
            ((uint16_t *)data)[i] = h;
            vals[i] = ferry_bf16_to_f32(h);
        } else if (t == FERRY_DTYPE_F16) {
            uint16_t h = ferry_f32_to_f16(vals[i]);
            ((uint16_t *)data)[i] = h;
            vals[i] = ferry_f16_to_f32(h);
        } else {
            ((float *)data)[i] = vals[i];
        }
    }
    w->d_data = data;
    w->dtype = t;
    w->rows = rows;
    w->cols = cols;
    return data;
}

/* Runs the suite with Check's fork mode (CK_FORK unless the environment says otherwise),
 * or in this process when nofork. */
static int run_suite(Suite *s, int nofork)
{
    SRunner *sr = srunner_create(s);
    if (nofork)
        srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

int tu_run_suite(Suite *s) { return run_suite(s, 0); }

int tu_run_suite_nofork(Suite *s) { return run_suite(s, 1); }
