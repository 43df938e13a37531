/*
 * moe/dispatch.h: groups a batch's routing decisions by expert, so each expert is applied
 * once to all the tokens routed to it.
 *
 * Input: experts (n, k), the top-k choice of each token. Output: for each expert e, the
 * tokens routed to it (ascending) and, for each, the row t * k + j where that expert's
 * output for the token goes. Grouping is a stable counting sort: O(n k + n_experts).
 */
#ifndef FERRY_MOE_DISPATCH_H
#define FERRY_MOE_DISPATCH_H

#include <stdint.h>

#include "ferry.h"

typedef struct {
    int32_t n_experts;
    int32_t max_rows;  /* capacity: tokens x k */
    int32_t *offsets;  /* (n_experts + 1): expert e owns entries [offsets[e], offsets[e+1]) */
    int32_t *tokens;   /* (max_rows) token index of each entry */
    int32_t *rows;     /* (max_rows) output row t * k + j of each entry */
} ferry_dispatch;

/* Allocates the tables for up to max_rows assignments. FERRY_ERR_NOMEM, FERRY_ERR_INVALID. */
ferry_status ferry_dispatch_init(ferry_dispatch *d, int32_t n_experts, int32_t max_rows);

/* Frees the tables. Safe on a zeroed or half-built struct. */
void ferry_dispatch_free(ferry_dispatch *d);

/* Groups experts (n, k) by expert. FERRY_ERR_INVALID if n * k exceeds the capacity or an
 * expert id is out of range (the message names the token). No allocation. */
ferry_status ferry_dispatch_build(ferry_dispatch *d, const int32_t *experts, int32_t n,
                                  int32_t k);

/* Number of tokens routed to expert e by the last build. */
static inline int32_t ferry_dispatch_count(const ferry_dispatch *d, int32_t e)
{
    return d->offsets[e + 1] - d->offsets[e];
}

#endif
