/*
 * moe/schedule.h: cross-batch token reordering. A layer's pending tokens (from many
 * sequences, or a long prompt's chunks) run through the MoE block in layer-batches of at
 * most max_group tokens; each layer-batch needs every expert any of its tokens routes to,
 * so every distinct expert of a layer-batch is one expert load (one transfer when experts
 * are offloaded). The scheduler cuts the tokens into the same number of layer-batches as
 * arrival order would, but chooses which tokens go together so the loads are few: by the
 * known routing at this layer first, then by the predicted routing at the next layer (so
 * tokens that stay together agree downstream too).
 *
 * Greedy: each layer-batch starts from the expert most remaining tokens route to, takes the
 * first such token, then repeatedly adds the remaining token that brings the fewest new
 * experts (ties: fewest new predicted experts of the next layer, then the earliest token).
 * The result never has more loads than arrival order: when the greedy cut would, arrival
 * order is returned. Deterministic; O(n^2 k) per layer.
 */
#ifndef FERRY_MOE_SCHEDULE_H
#define FERRY_MOE_SCHEDULE_H

#include <stdint.h>

#include "ferry.h"

typedef struct ferry_schedule ferry_schedule;

/* Scratch for up to max_tokens tokens of a model with n_experts experts per layer and top-k
 * routing. FERRY_ERR_INVALID (sizes < 1), FERRY_ERR_NOMEM. */
ferry_status ferry_schedule_create(int32_t n_experts, int32_t max_tokens, int32_t k,
                                   ferry_schedule **out);
void ferry_schedule_destroy(ferry_schedule *s); /* NULL-safe */

typedef struct {
    int32_t n_groups;  /* ceil(n / max_group) */
    int64_t loads;     /* sum over groups of the distinct experts the group routes to */
    int reordered;     /* 1: the greedy cut; 0: arrival order (asked for, or no better) */
} ferry_schedule_result;

/* Cuts tokens 0..n-1 into layer-batches of at most max_group tokens. experts (n, k): each
 * token's experts at this layer, in [0, n_experts). next (n, k) or NULL: each token's
 * predicted experts at the next layer (a tie-breaker). reorder 0: arrival order. Writes
 * order (n): the tokens, group by group; starts (n_groups + 1): group g is order[starts[g]
 * .. starts[g+1]). FERRY_ERR_INVALID (n outside 1..max_tokens, max_group < 1, an expert id
 * out of range, naming the token). No allocation. */
ferry_status ferry_schedule_groups(ferry_schedule *s, const int32_t *experts, const int32_t *next,
                                   int32_t n, int32_t max_group, int reorder, int32_t *order,
                                   int32_t *starts, ferry_schedule_result *out);

#endif
