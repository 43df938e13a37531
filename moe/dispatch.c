/*
 * moe/dispatch.c: see dispatch.h.
 */
#include "moe/dispatch.h"

#include <stdlib.h>
#include <string.h>

#include "core/error.h"

ferry_status ferry_dispatch_init(ferry_dispatch *d, int32_t n_experts, int32_t max_rows)
{
    memset(d, 0, sizeof *d);
    if (n_experts <= 0 || max_rows <= 0)
        return ferry_fail(FERRY_ERR_INVALID, "dispatch: %d experts, %d rows", (int)n_experts,
                          (int)max_rows);
    d->n_experts = n_experts;
    d->max_rows = max_rows;
    d->offsets = calloc((size_t)n_experts + 1, sizeof *d->offsets);
    d->tokens = calloc((size_t)max_rows, sizeof *d->tokens);
    d->rows = calloc((size_t)max_rows, sizeof *d->rows);
    if (!d->offsets || !d->tokens || !d->rows) {
        ferry_dispatch_free(d);
        return ferry_fail(FERRY_ERR_NOMEM, "dispatch: out of memory for %d rows", (int)max_rows);
    }
    return FERRY_OK;
}

void ferry_dispatch_free(ferry_dispatch *d)
{
    free(d->offsets);
    free(d->tokens);
    free(d->rows);
    memset(d, 0, sizeof *d);
}

ferry_status ferry_dispatch_build(ferry_dispatch *d, const int32_t *experts, int32_t n,
                                  int32_t k)
{
    if (n < 0 || k <= 0 || (int64_t)n * k > d->max_rows)
        return ferry_fail(FERRY_ERR_INVALID, "dispatch: %d tokens x top-%d exceeds %d rows",
                          (int)n, (int)k, (int)d->max_rows);
    for (int32_t i = 0; i < n * k; i++)
        if (experts[i] < 0 || experts[i] >= d->n_experts)
            return ferry_fail(FERRY_ERR_INVALID, "dispatch: token %d routed to expert %d of %d",
                              (int)(i / k), (int)experts[i], (int)d->n_experts);
    memset(d->offsets, 0, ((size_t)d->n_experts + 1) * sizeof *d->offsets);
    for (int32_t i = 0; i < n * k; i++)
        d->offsets[experts[i] + 1]++;
    for (int32_t e = 0; e < d->n_experts; e++)
        d->offsets[e + 1] += d->offsets[e];
    /* stable placement: reuse offsets as cursors, then shift them back */
    for (int32_t i = 0; i < n * k; i++) {
        int32_t at = d->offsets[experts[i]]++;
        d->tokens[at] = i / k;
        d->rows[at] = i;
    }
    for (int32_t e = d->n_experts; e > 0; e--)
        d->offsets[e] = d->offsets[e - 1];
    d->offsets[0] = 0;
    return FERRY_OK;
}
