/*
 * moe/hybrid.h: the hybrid cost model. When a layer needs experts that are not in a device
 * slot, each one can be fetched (its bytes cross the bus, then the device computes it) or
 * computed on the CPU from host memory (only the activations cross). The two queues run
 * at once, so the layer waits for the longer of them; the plan chooses which misses go to
 * the CPU so that the longer queue is as short as possible.
 *
 * Costs: a fetch takes bytes / fetch_bytes_per_s whatever the token count; the CPU takes
 * (bytes / ref_bytes) * (cpu_seconds_1 + (tokens - 1) * cpu_seconds_per_token), measured
 * on an expert of ref_bytes (streaming the weights bounds one token; the arithmetic grows
 * with more). The plan sorts the misses by CPU-to-fetch cost ratio and sends the cheapest
 * prefix to the CPU, choosing the prefix length that minimises max(CPU queue, copy
 * queue); on a tie it fetches (a fetched expert stays cached for later tokens).
 * Deterministic; O(n log n); no allocation.
 */
#ifndef FERRY_MOE_HYBRID_H
#define FERRY_MOE_HYBRID_H

#include <stddef.h>
#include <stdint.h>

#include "ferry.h"

typedef struct {
    double fetch_bytes_per_s;     /* host-to-device copies into slots */
    double cpu_seconds_1;         /* the CPU computing one expert of ref_bytes for 1 token */
    double cpu_seconds_per_token; /* each further token on that expert */
    double ref_bytes;             /* the expert size the CPU figures were measured on */
} ferry_hybrid_cost;

typedef struct {
    size_t n_bytes;  /* the expert's weights */
    int32_t n_tokens; /* tokens routed to it in this layer-batch */
} ferry_hybrid_item;

/* Most misses one plan takes (a layer's experts). */
#define FERRY_HYBRID_MAX_ITEMS 1024

/* Seconds the CPU needs for item. */
double ferry_hybrid_cpu_seconds(const ferry_hybrid_cost *c, const ferry_hybrid_item *item);

/* Seconds a fetch of item takes. */
double ferry_hybrid_fetch_seconds(const ferry_hybrid_cost *c, const ferry_hybrid_item *item);

/* Plans n misses: on_cpu[i] = 1 for those the CPU computes, 0 for those fetched. Writes the
 * predicted time of each queue to *cpu_s and *fetch_s when not NULL. Returns how many go
 * to the CPU. Costs that are not positive and finite, or n outside 0..FERRY_HYBRID_MAX_ITEMS,
 * plan every item as a fetch. Thread-safe. */
int32_t ferry_hybrid_plan(const ferry_hybrid_cost *c, const ferry_hybrid_item *items, int32_t n,
                          uint8_t *on_cpu, double *cpu_s, double *fetch_s);

#endif
