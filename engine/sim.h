/*
 * engine/sim.h: the routing-trace simulator behind `ferry sim`.
 *
 * Replays a routing trace (predictor/trace.h) through the real expert cache
 * (offload/cache.h) and prefetch pipeline (offload/prefetch.h), on a CPU backend with a
 * device arena of small dummy experts, exactly as the forward pass drives them: for each
 * token, layer by layer, demand-acquire the token's experts, fill misses through the
 * pipeline, wait, use, release; with a predictor, after each layer l, as the forward
 * pass's predict_after_layer does, hint the predicted experts of layers l+1 .. l+lookahead
 * (and, after the last layer, of the next token's layer 0). Every slot's bytes are checked
 * against the expert the cache says it holds, so a run is also a proof that the pipeline
 * delivered the right experts.
 *
 * Next to it, Belady's MIN (evict the resident expert whose next use is farthest in the
 * future) on the same demand sequence and number of slots: the fewest misses any demand
 * paging cache can have, without prefetching.
 *
 * Results are deterministic: each prefetch batch is drained before the next demand, and
 * the cache's recency clock only moves on this thread's acquires.
 */
#ifndef FERRY_ENGINE_SIM_H
#define FERRY_ENGINE_SIM_H

#include <stdint.h>

#include "ferry.h"
#include "offload/cache.h"
#include "predictor/predictor.h"
#include "predictor/trace.h"

typedef struct {
    int32_t n_slots;           /* device expert slots, >= 1 (layer-lru: >= n_layers) */
    ferry_cache_policy policy; /* eviction policy of the cache */
    /* NULL: no prefetching. Borrowed; reset at each sequence start and observed with the
     * trace's experts and, when `hidden` is given, each layer's hidden state. Without
     * hidden states it must be of the stats or combined kind (a combined one then uses its
     * statistics alone). predictor_kind says which kind it is (the predictor interface does
     * not tell). */
    ferry_predictor *predictor;
    ferry_predictor_kind predictor_kind;
    /* NULL, or every replayed token's hidden state after each layer, (tokens, n_layers,
     * d_model) floats in trace order, as the forward pass feeds the predictor (the gate
     * predictor needs them). Borrowed. */
    const float *hidden;
    int32_t d_model;
    int32_t lookahead;     /* 1..FERRY_PREDICT_MAX_LOOKAHEAD: after layer l, prefetch the
                              predicted experts of layers l+1 .. l+lookahead */
    int32_t prefetch_k;    /* experts prefetched per predicted layer, 0 = the trace's top_k;
                              at most n_experts */
    uint64_t expert_bytes; /* bytes one expert moves, for the byte figures (the real
                              model's expert size); 0 = the sim's dummy expert size */
    int64_t n_tokens;      /* replay the first n_tokens tokens only; 0 = all */
} ferry_sim_params;

/* n_slots 0 (must be set), lru, no predictor, lookahead 1, prefetch_k 0, expert_bytes 0,
 * n_tokens 0. */
ferry_sim_params ferry_sim_params_default(void);

typedef struct {
    int64_t lookups;      /* demand accesses: tokens x layers x top_k */
    int64_t hits, misses; /* from the cache's counters; hits include prefetched experts */
    double hit_rate;      /* hits / lookups */
    /* prefetch_issued = prefetch_used + prefetch_wasted: a prefetched expert is used when a
     * demand finds it before it is evicted; wasted when it is evicted or cancelled unused,
     * or still unused when the replay ends (prefetch_unused_at_end of them) */
    int64_t prefetch_issued, prefetch_used, prefetch_wasted;
    int64_t prefetch_unused_at_end;
    int64_t prefetch_cancelled; /* queued prefetches cancelled unfilled (stale) */
    int64_t prefetch_skipped;   /* hints dropped: the pipeline's byte bound or a full cache */
    int64_t evictions;          /* ready experts pushed out by a miss or a prefetch */
    int64_t fills; /* slots the pipeline filled: misses + prefetch_issued - prefetch_cancelled */
    uint64_t expert_bytes;          /* the size the byte figures use */
    uint64_t bytes_moved;           /* fills x expert_bytes */
    uint64_t prefetch_bytes_wasted; /* (prefetch_wasted - prefetch_cancelled) x expert_bytes */
    int64_t belady_misses;          /* Belady's MIN on the same demand sequence and n_slots */
    double belady_hit_rate;         /* 1 - belady_misses / lookups */
} ferry_sim_result;

/* Replays tr (or its first p->n_tokens tokens) as described above and fills *out.
 * Creates and destroys its own backend, store, cache and pipeline; borrows tr and the
 * predictor (whose per-sequence state it changes). FERRY_ERR_INVALID naming the parameter
 * at fault (n_slots < 1, or < n_layers with layer-lru; lookahead outside 1..3; prefetch_k
 * outside 0..n_experts; a gate predictor without hidden states; n_tokens outside 0..tokens; an empty
 * or malformed trace), FERRY_ERR_NOMEM, FERRY_ERR_DEVICE when a slot does not hold the
 * bytes of the expert the cache says it does, or the pipeline's error. *out is written only
 * on success. One thread; several runs may go on at once on different threads when they
 * use different predictors. */
ferry_status ferry_sim_run(const ferry_trace *tr, const ferry_sim_params *p, ferry_sim_result *out);

/* Belady's MIN on the trace's demand sequence: every (token, layer, expert) access in
 * replay order, key layer * n_experts + expert, with n_slots slots; *misses counts every
 * miss, the first use of each key included. O(N log n_slots) time, O(N) memory for
 * N = tokens x layers x top_k. FERRY_ERR_INVALID (n_slots < 1, a malformed trace),
 * FERRY_ERR_NOMEM. Thread-safe. */
ferry_status ferry_sim_belady(const ferry_trace *tr, int32_t n_slots, int64_t *misses);

/* Belady's MIN on an explicit sequence of n keys, each in [0, n_keys), with n_slots slots.
 * Same codes and guarantees as ferry_sim_belady. Thread-safe. */
ferry_status ferry_sim_belady_keys(const int32_t *keys, int64_t n, int32_t n_keys, int32_t n_slots,
                                   int64_t *misses);

#endif
