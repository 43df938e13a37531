/*
 * moe/schedule.c: see schedule.h.
 */
#include "moe/schedule.h"

#include <stdlib.h>
#include <string.h>

#include "core/error.h"

struct ferry_schedule {
    int32_t n_experts, max_tokens, k;
    uint8_t *taken;     /* (max_tokens) */
    uint8_t *in_group;  /* (n_experts) experts of the group being built */
    uint8_t *in_next;   /* (n_experts) predicted next-layer experts of the group */
    int32_t *count;     /* (n_experts) remaining tokens routed to each expert */
    int32_t *greedy;    /* (max_tokens) the greedy order */
};

ferry_status ferry_schedule_create(int32_t n_experts, int32_t max_tokens, int32_t k,
                                   ferry_schedule **out)
{
    if (!out || n_experts < 1 || max_tokens < 1 || k < 1 || k > n_experts)
        return ferry_fail(FERRY_ERR_INVALID, "schedule: %d experts, %d tokens, top-%d",
                          (int)n_experts, (int)max_tokens, (int)k);
    ferry_schedule *s = calloc(1, sizeof *s);
    if (!s)
        return ferry_fail(FERRY_ERR_NOMEM, "schedule: out of memory");
    s->n_experts = n_experts;
    s->max_tokens = max_tokens;
    s->k = k;
    s->taken = malloc((size_t)max_tokens);
    s->in_group = malloc((size_t)n_experts);
    s->in_next = malloc((size_t)n_experts);
    s->count = malloc((size_t)n_experts * sizeof *s->count);
    s->greedy = malloc((size_t)max_tokens * sizeof *s->greedy);
    if (!s->taken || !s->in_group || !s->in_next || !s->count || !s->greedy) {
        ferry_schedule_destroy(s);
        return ferry_fail(FERRY_ERR_NOMEM, "schedule: out of memory for %d tokens",
                          (int)max_tokens);
    }
    *out = s;
    return FERRY_OK;
}

void ferry_schedule_destroy(ferry_schedule *s)
{
    if (!s)
        return;
    free(s->taken);
    free(s->in_group);
    free(s->in_next);
    free(s->count);
    free(s->greedy);
    free(s);
}

/* Distinct experts over the groups of order cut at multiples of max_group. */
static int64_t count_loads(ferry_schedule *s, const int32_t *experts, const int32_t *order,
                           int32_t n, int32_t max_group)
{
    int64_t loads = 0;
    for (int32_t g0 = 0; g0 < n; g0 += max_group) {
        memset(s->in_group, 0, (size_t)s->n_experts);
        int32_t g1 = g0 + max_group < n ? g0 + max_group : n;
        for (int32_t i = g0; i < g1; i++)
            for (int32_t j = 0; j < s->k; j++) {
                int32_t e = experts[(size_t)order[i] * (size_t)s->k + (size_t)j];
                loads += !s->in_group[e];
                s->in_group[e] = 1;
            }
    }
    return loads;
}

/* New experts token t would add to the group: (layer, next layer). */
static void cost_of(const ferry_schedule *s, const int32_t *experts, const int32_t *next,
                    int32_t t, int32_t *layer_cost, int32_t *next_cost)
{
    int32_t a = 0, b = 0;
    for (int32_t j = 0; j < s->k; j++) {
        a += !s->in_group[experts[(size_t)t * (size_t)s->k + (size_t)j]];
        if (next)
            b += !s->in_next[next[(size_t)t * (size_t)s->k + (size_t)j]];
    }
    *layer_cost = a;
    *next_cost = b;
}

static void take(ferry_schedule *s, const int32_t *experts, const int32_t *next, int32_t t)
{
    s->taken[t] = 1;
    for (int32_t j = 0; j < s->k; j++) {
        int32_t e = experts[(size_t)t * (size_t)s->k + (size_t)j];
        s->in_group[e] = 1;
        s->count[e]--;
        if (next)
            s->in_next[next[(size_t)t * (size_t)s->k + (size_t)j]] = 1;
    }
}

static void greedy_order(ferry_schedule *s, const int32_t *experts, const int32_t *next,
                         int32_t n, int32_t max_group)
{
    int32_t E = s->n_experts, K = s->k, placed = 0;
    memset(s->taken, 0, (size_t)n);
    memset(s->count, 0, (size_t)E * sizeof *s->count);
    for (size_t i = 0; i < (size_t)n * (size_t)K; i++)
        s->count[experts[i]]++;
    while (placed < n) {
        memset(s->in_group, 0, (size_t)E);
        memset(s->in_next, 0, (size_t)E);
        /* seed: the first remaining token of the most wanted expert */
        int32_t best_e = 0;
        for (int32_t e = 1; e < E; e++)
            if (s->count[e] > s->count[best_e])
                best_e = e;
        int32_t seed = -1;
        for (int32_t t = 0; t < n && seed < 0; t++)
            if (!s->taken[t])
                for (int32_t j = 0; j < K; j++)
                    if (experts[(size_t)t * (size_t)K + (size_t)j] == best_e)
                        seed = t;
        take(s, experts, next, seed);
        s->greedy[placed++] = seed;
        int32_t size = 1;
        while (size < max_group && placed < n) {
            int32_t best = -1, best_a = 0, best_b = 0;
            for (int32_t t = 0; t < n; t++) {
                if (s->taken[t])
                    continue;
                int32_t a, b;
                cost_of(s, experts, next, t, &a, &b);
                if (best < 0 || a < best_a || (a == best_a && b < best_b)) {
                    best = t;
                    best_a = a;
                    best_b = b;
                    if (a == 0 && b == 0)
                        break;
                }
            }
            take(s, experts, next, best);
            s->greedy[placed++] = best;
            size++;
        }
    }
}

ferry_status ferry_schedule_groups(ferry_schedule *s, const int32_t *experts, const int32_t *next,
                                   int32_t n, int32_t max_group, int reorder, int32_t *order,
                                   int32_t *starts, ferry_schedule_result *out)
{
    if (!s || !experts || !order || !starts || !out)
        return ferry_fail(FERRY_ERR_INVALID, "schedule: NULL argument");
    if (n < 1 || n > s->max_tokens || max_group < 1)
        return ferry_fail(FERRY_ERR_INVALID, "schedule: %d tokens in groups of %d (capacity %d)",
                          (int)n, (int)max_group, (int)s->max_tokens);
    for (int32_t t = 0; t < n; t++)
        for (int32_t j = 0; j < s->k; j++) {
            int32_t e = experts[(size_t)t * (size_t)s->k + (size_t)j];
            int32_t p = next ? next[(size_t)t * (size_t)s->k + (size_t)j] : 0;
            if (e < 0 || e >= s->n_experts || p < 0 || p >= s->n_experts)
                return ferry_fail(FERRY_ERR_INVALID, "schedule: token %d routes to expert %d "
                                  "(predicted %d); the layer has %d", (int)t, (int)e, (int)p,
                                  (int)s->n_experts);
        }
    for (int32_t t = 0; t < n; t++)
        order[t] = t;
    ferry_schedule_result r = {.n_groups = (n + max_group - 1) / max_group, .reordered = 0};
    r.loads = count_loads(s, experts, order, n, max_group);
    if (reorder && r.n_groups > 1) {
        greedy_order(s, experts, next, n, max_group);
        int64_t loads = count_loads(s, experts, s->greedy, n, max_group);
        if (loads < r.loads) {
            memcpy(order, s->greedy, (size_t)n * sizeof *order);
            r.loads = loads;
            r.reordered = 1;
        }
    }
    for (int32_t g = 0; g <= r.n_groups; g++)
        starts[g] = g * max_group < n ? g * max_group : n;
    *out = r;
    return FERRY_OK;
}
