/*
 * bench/bench_matmul.c: the CPU matmul kernels on one expert-shaped matrix, for each weight
 * format and each kernel set this CPU runs. Prints milliseconds per matmul (best of
 * --repeat), the weight bytes read per second and the weights per second.
 *
 *   build/bench_matmul [--rows R] [--cols C] [--tokens N,N,...] [--threads T] [--repeat K]
 *
 * The default shape is one Mixtral-8x7B expert matrix (14336 x 4096) and tokens 1,4,64:
 * decode (a row of weights per output, read once) and prefill. With --threads T the rows
 * are split over T threads of ferry's pool, as the CPU backend splits them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/pool.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/quant.h"

typedef struct {
    ferry_cpu_matmul_fn fn;
    float *out;
    const float *x;
    const ferry_weight *w;
    int32_t n, n_tasks;
} job;

static void run_task(void *arg, int32_t task)
{
    const job *j = arg;
    int64_t per = (j->w->rows + j->n_tasks - 1) / j->n_tasks;
    int64_t r0 = per * task, r1 = r0 + per < j->w->rows ? r0 + per : j->w->rows;
    if (r0 < r1)
        j->fn(j->out, j->x, j->w, j->n, r0, r1);
}

static int usage(const char *why, const char *what)
{
    fprintf(stderr, "bench_matmul: %s%s\nusage: bench_matmul [--rows R] [--cols C] "
            "[--tokens N,N,...] [--threads T] [--repeat K]\n", why, what);
    return 2;
}

static int parse_int(const char *s, long lo, long hi, long *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

/* A weight of the given format holding a deterministic pattern with a spread like a
 * trained expert's (+-0.05). */
static void *make_weight(ferry_dtype dt, int64_t rows, int64_t cols)
{
    size_t rb = ferry_dtype_row_bytes(dt, cols);
    char *data = aligned_alloc(64, (rb * (size_t)rows + 63) / 64 * 64);
    float *row = malloc((size_t)cols * sizeof *row);
    if (!data || !row) {
        free(data);
        free(row);
        return NULL;
    }
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < cols; c++)
            row[c] = (float)((r * 31 + c * 7) % 101 - 50) * 1e-3f;
        if (ferry_dtype_is_quant(dt)) {
            if (ferry_quantize_row(dt, row, cols, data + (size_t)r * rb)) {
                free(data);
                free(row);
                return NULL;
            }
        } else {
            uint16_t *h = (uint16_t *)(data + (size_t)r * rb);
            for (int64_t c = 0; c < cols; c++)
                h[c] = ferry_f32_to_bf16(row[c]);
        }
    }
    free(row);
    return data;
}

int main(int argc, char **argv)
{
    long rows = 14336, cols = 4096, threads = 1, repeat = 5;
    long tokens[8] = {1, 4, 64};
    int n_tokens = 3;
    struct {
        const char *name;
        long lo, hi, *value;
    } opts[] = {{"--rows", 8, 1L << 20, &rows},
                {"--cols", 32, 1L << 20, &cols},
                {"--threads", 1, 1024, &threads},
                {"--repeat", 1, 1000, &repeat}};
    for (int i = 1; i < argc; i += 2) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            return usage("a value is missing after ", a);
        int known = 0;
        for (size_t k = 0; k < sizeof opts / sizeof opts[0]; k++)
            if (!strcmp(a, opts[k].name)) {
                known = 1;
                if (parse_int(v, opts[k].lo, opts[k].hi, opts[k].value)) {
                    fprintf(stderr, "bench_matmul: %s expects an integer in [%ld, %ld], got '%s'\n",
                            a, opts[k].lo, opts[k].hi, v);
                    return 2;
                }
            }
        if (known)
            continue;
        if (strcmp(a, "--tokens"))
            return usage("unknown option ", a);
        char *list = strdup(v), *save = NULL;
        n_tokens = 0;
        for (char *t = list ? strtok_r(list, ",", &save) : NULL; t; t = strtok_r(NULL, ",", &save))
            if (n_tokens == 8 || parse_int(t, 1, 4096, &tokens[n_tokens++])) {
                n_tokens = 0;
                break;
            }
        free(list);
        if (n_tokens == 0)
            return usage("--tokens takes 1 to 8 counts from 1 to 4096, got ", v);
    }
    if (cols % FERRY_QUANT_GROUP)
        return usage("--cols must be a multiple of 32 (the quantized group)", "");
    long max_n = 0;
    for (int i = 0; i < n_tokens; i++)
        max_n = tokens[i] > max_n ? tokens[i] : max_n;
    float *x = malloc((size_t)max_n * (size_t)cols * sizeof *x);
    float *out = malloc((size_t)max_n * (size_t)rows * sizeof *out);
    ferry_pool *pool = NULL;
    if (!x || !out || ferry_pool_create((int32_t)threads, &pool)) {
        fprintf(stderr, "bench_matmul: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < (size_t)max_n * (size_t)cols; i++)
        x[i] = (float)(i % 13) * 0.01f;
    printf("matrix %ld x %ld, %ld thread(s), best of %ld\n", rows, cols, threads, repeat);
    printf("%-6s %-11s %6s %10s %10s %12s\n", "format", "kernels", "tokens", "ms", "GB/s",
           "Gweights/s");
    const ferry_dtype formats[] = {FERRY_DTYPE_BF16, FERRY_DTYPE_Q8, FERRY_DTYPE_Q4};
    for (int f = 0; f < 3; f++) {
        ferry_dtype dt = formats[f];
        void *data = make_weight(dt, rows, cols);
        if (!data) {
            fprintf(stderr, "bench_matmul: cannot make the %s weight\n", ferry_dtype_is_quant(dt) ? ferry_quant_name(dt) : "bf16");
            return 1;
        }
        ferry_weight w = {.d_data = data, .dtype = dt, .rows = rows, .cols = cols};
        double bytes = (double)ferry_dtype_row_bytes(dt, cols) * (double)rows;
        const char *name = dt == FERRY_DTYPE_BF16 ? "bf16" : ferry_quant_name(dt);
        for (int isa = FERRY_CPU_ISA_REFERENCE; isa < FERRY_CPU_ISA_COUNT; isa++) {
            ferry_cpu_matmul_fn fn = ferry_cpu_matmul_kernel((ferry_cpu_isa)isa);
            if (!fn)
                continue;
            for (int i = 0; i < n_tokens; i++) {
                job j = {fn, out, x, &w, (int32_t)tokens[i], (int32_t)threads * 4};
                ferry_pool_run(pool, j.n_tasks, run_task, &j); /* warm: pages, caches */
                double best = 1e30;
                for (long k = 0; k < repeat; k++) {
                    double t0 = ferry_now_seconds();
                    ferry_pool_run(pool, j.n_tasks, run_task, &j);
                    double t = ferry_now_seconds() - t0;
                    best = t < best ? t : best;
                }
                printf("%-6s %-11s %6ld %10.3f %10.3g %12.3g\n", name,
                       ferry_cpu_isa_name((ferry_cpu_isa)isa), tokens[i], best * 1e3,
                       bytes / best / 1e9, (double)rows * (double)cols / best / 1e9);
                fflush(stdout);
            }
        }
        free(data);
    }
    ferry_pool_destroy(pool);
    free(x);
    free(out);
    return 0;
}
