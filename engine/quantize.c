/*
 * engine/quantize.c: see quantize.h.
 */
#include "engine/quantize.h"

#include <stdlib.h>

#include "core/error.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/quant.h"

#define ROWS_PER_TASK 64

typedef struct {
    const ferry_weight *w;
    ferry_dtype q;
    uint8_t *dst;
    int64_t *task_bad; /* per task: the first row that failed, -2 out of memory, -1 none */
} quant_job;

static void quant_task(void *arg, int32_t task)
{
    quant_job *j = arg;
    const ferry_weight *w = j->w;
    size_t rb = ferry_dtype_row_bytes(j->q, w->cols);
    int64_t r0 = (int64_t)task * ROWS_PER_TASK;
    int64_t r1 = r0 + ROWS_PER_TASK < w->rows ? r0 + ROWS_PER_TASK : w->rows;
    float *row = malloc((size_t)w->cols * sizeof(float));
    j->task_bad[task] = row ? -1 : -2;
    for (int64_t r = r0; row && r < r1; r++) {
        ferry_cpu_widen(row, w, r, 0, w->cols);
        if (ferry_quantize_row(j->q, row, w->cols, j->dst + (size_t)r * rb) != FERRY_OK) {
            j->task_bad[task] = r;
            break;
        }
    }
    free(row);
}

ferry_status ferry_quantize_matrix(const ferry_weight *w, ferry_dtype q, ferry_pool *pool,
                                   void *dst)
{
    size_t rb;
    ferry_status st = ferry_quant_row_bytes(q, w->cols, &rb);
    if (st)
        return st;
    int32_t n_tasks = (int32_t)((w->rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK);
    quant_job j = {w, q, dst, malloc((size_t)(n_tasks ? n_tasks : 1) * sizeof(int64_t))};
    if (!j.task_bad)
        return ferry_fail(FERRY_ERR_NOMEM, "no memory to quantize %lld rows", (long long)w->rows);
    if (pool) {
        ferry_pool_run(pool, n_tasks, quant_task, &j);
    } else {
        for (int32_t t = 0; t < n_tasks; t++)
            quant_task(&j, t);
    }
    for (int32_t t = 0; t < n_tasks && !st; t++) {
        if (j.task_bad[t] == -2) {
            st = ferry_fail(FERRY_ERR_NOMEM, "no memory to quantize a row");
        } else if (j.task_bad[t] >= 0) { /* again on this thread, for the message */
            float *row = malloc((size_t)w->cols * sizeof(float));
            if (!row) {
                st = ferry_fail(FERRY_ERR_NOMEM, "no memory to quantize a row");
                break;
            }
            ferry_cpu_widen(row, w, j.task_bad[t], 0, w->cols);
            st = ferry_quantize_row(q, row, w->cols, j.dst + (size_t)j.task_bad[t] * rb);
            free(row);
            st = ferry_fail_prefix(st ? st : FERRY_ERR_INVALID, "row %lld",
                                   (long long)j.task_bad[t]);
        }
    }
    free(j.task_bad);
    return st;
}
