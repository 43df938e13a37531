/*
 * moe/hybrid.c: see hybrid.h.
 */
#include "moe/hybrid.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int cost_valid(const ferry_hybrid_cost *c)
{
    return c && isfinite(c->fetch_bytes_per_s) && c->fetch_bytes_per_s > 0 &&
           isfinite(c->cpu_seconds_1) && c->cpu_seconds_1 > 0 &&
           isfinite(c->cpu_seconds_per_token) && c->cpu_seconds_per_token >= 0 &&
           isfinite(c->ref_bytes) && c->ref_bytes > 0;
}

double ferry_hybrid_cpu_seconds(const ferry_hybrid_cost *c, const ferry_hybrid_item *item)
{
    int32_t extra = item->n_tokens > 1 ? item->n_tokens - 1 : 0;
    return (double)item->n_bytes / c->ref_bytes *
           (c->cpu_seconds_1 + (double)extra * c->cpu_seconds_per_token);
}

double ferry_hybrid_fetch_seconds(const ferry_hybrid_cost *c, const ferry_hybrid_item *item)
{
    return (double)item->n_bytes / c->fetch_bytes_per_s;
}

typedef struct {
    double ratio; /* CPU seconds per fetch second: lower suits the CPU better */
    int32_t index;
} ranked;

static int by_ratio(const void *a, const void *b)
{
    const ranked *x = a, *y = b;
    if (x->ratio != y->ratio)
        return x->ratio < y->ratio ? -1 : 1;
    return x->index < y->index ? -1 : (x->index > y->index);
}

int32_t ferry_hybrid_plan(const ferry_hybrid_cost *c, const ferry_hybrid_item *items, int32_t n,
                          uint8_t *on_cpu, double *cpu_s, double *fetch_s)
{
    if (n <= 0 || n > FERRY_HYBRID_MAX_ITEMS || !items || !on_cpu) {
        if (cpu_s)
            *cpu_s = 0;
        if (fetch_s)
            *fetch_s = 0;
        return 0;
    }
    memset(on_cpu, 0, (size_t)n);
    double all_fetch = 0;
    if (!cost_valid(c)) {
        if (cpu_s)
            *cpu_s = 0;
        if (fetch_s)
            *fetch_s = 0;
        return 0;
    }
    ranked r[FERRY_HYBRID_MAX_ITEMS];
    for (int32_t i = 0; i < n; i++) {
        double f = ferry_hybrid_fetch_seconds(c, &items[i]);
        all_fetch += f;
        r[i].ratio = f > 0 ? ferry_hybrid_cpu_seconds(c, &items[i]) / f : INFINITY;
        r[i].index = i;
    }
    qsort(r, (size_t)n, sizeof r[0], by_ratio);
    /* prefix p of r goes to the CPU; p = 0 fetches everything */
    int32_t best_p = 0;
    double best = all_fetch, best_cpu = 0, best_fetch = all_fetch;
    double cpu = 0, fetch = all_fetch;
    for (int32_t p = 1; p <= n; p++) {
        const ferry_hybrid_item *it = &items[r[p - 1].index];
        cpu += ferry_hybrid_cpu_seconds(c, it);
        fetch -= ferry_hybrid_fetch_seconds(c, it);
        if (fetch < 0)
            fetch = 0;
        double t = cpu > fetch ? cpu : fetch;
        if (t < best) {
            best = t;
            best_p = p;
            best_cpu = cpu;
            best_fetch = fetch;
        }
    }
    for (int32_t p = 0; p < best_p; p++)
        on_cpu[r[p].index] = 1;
    if (cpu_s)
        *cpu_s = best_cpu;
    if (fetch_s)
        *fetch_s = best_fetch;
    return best_p;
}
