/*
 * offload/cache.h: the expert cache's bookkeeping. n_slots fixed device-resident expert
 * slots cache (layer, expert) pairs; this object decides which pair occupies which slot
 * and which slot a miss evicts. It moves no bytes: whoever gets FERRY_CACHE_FILL (the
 * forward pass or the prefetch pipeline) fills the slot and then calls
 * ferry_cache_mark_ready or ferry_cache_mark_failed.
 *
 * Slot life: EMPTY -> (acquire miss) FILLING -> (mark_ready) READY -> (evicted by a later
 * miss) FILLING for another expert; FILLING -> (mark_failed) EMPTY. A slot is evicted only
 * when it is READY and no one holds a reference (pin) on it; a FILLING slot is never taken.
 *
 * Policies (the victim among the evictable slots; a free slot is always taken first):
 *   lru        least recently used, where a "use" is a demand acquire (hit, pending or
 *              miss) and a load stamps the slot too, so a fresh prefetch is not the first
 *              victim. Prefetch acquires of a resident expert and releases do not count.
 *   lfu        fewest demand acquires since the expert was loaded into this slot (the
 *              demand miss that loads it counts 1, a prefetch load counts 0; the count
 *              restarts when the expert is evicted and loaded again); ties by lru.
 *   layer-lru  the slots are split into fixed per-layer partitions and a layer's miss
 *              evicts (by lru) only within its own partition. Layer l gets
 *              floor(n_slots / n_layers) slots, one more if l < n_slots % n_layers,
 *              contiguous and in layer order; n_slots < n_layers is an error.
 *   predicted  the lowest predictor score (ferry_cache_set_scores; default 0), ties by lru.
 *
 * Threads: every function may be called from any thread; one internal mutex guards all
 * state and a condition variable wakes ferry_cache_wait_ready. Nothing allocates after
 * ferry_cache_create.
 */
#ifndef FERRY_OFFLOAD_CACHE_H
#define FERRY_OFFLOAD_CACHE_H

#include <stdint.h>

#include "ferry.h"

typedef enum {
    FERRY_POLICY_LRU,
    FERRY_POLICY_LFU,
    FERRY_POLICY_LAYER_LRU,
    FERRY_POLICY_PREDICTED,
} ferry_cache_policy;

/* The policy's name: "lru", "lfu", "layer-lru", "predicted" ("unknown" for a value outside
 * the enum). The string is constant. Thread-safe. */
const char *ferry_cache_policy_name(ferry_cache_policy p);

/* Parses a policy name (exact, lower case) into *out. FERRY_ERR_INVALID naming the bad
 * string and listing the valid ones (also for NULL). Thread-safe. */
ferry_status ferry_cache_policy_parse(const char *s, ferry_cache_policy *out);

typedef struct {
    int32_t n_slots;   /* >= 1; with layer-lru, >= n_layers */
    int32_t n_layers;  /* >= 1 */
    int32_t n_experts; /* per layer, >= 1 */
    ferry_cache_policy policy;
} ferry_cache_params;

typedef struct ferry_cache ferry_cache; /* fields live in cache.c only */

/* Creates an empty cache (every slot free, every score 0, stats zero). On success *out owns
 * it; free it with ferry_cache_destroy. FERRY_ERR_INVALID (NULL arguments, or a field out of
 * range; the message names the field and its value, and for layer-lru with too few slots
 * both n_slots and n_layers), FERRY_ERR_NOMEM. Thread-safe. */
ferry_status ferry_cache_create(const ferry_cache_params *p, ferry_cache **out);

/* Frees the cache. NULL-safe. No other thread may be using it. */
void ferry_cache_destroy(ferry_cache *c);

typedef enum {
    FERRY_CACHE_HIT,     /* resident and ready: compute with it now */
    FERRY_CACHE_PENDING, /* being filled by an earlier request: wait with
                            ferry_cache_wait_ready, or compute others first */
    FERRY_CACHE_FILL,    /* a slot was assigned to this expert: the caller must fill it and
                            call ferry_cache_mark_ready or ferry_cache_mark_failed */
} ferry_cache_result;

/* Looks up (layer, expert) and, on success, pins the slot it returns (reference count + 1):
 * the slot is not evicted until the matching ferry_cache_release, whatever the result.
 * On a miss it takes a victim under the policy among slots that are unpinned and not being
 * filled (a free slot first, the lowest-numbered), records it as being filled for this
 * expert and returns FERRY_CACHE_FILL.
 *
 * demand = 1 for a real use: counted as a hit (HIT or PENDING; PENDING also in
 * hits_pending) or a miss (FILL), and a "use" for lru/lfu. demand = 0 for a prefetch:
 * a FILL counts as prefetch_issued; a prefetch that finds the expert resident or in flight
 * counts nothing and changes no recency. The first demand acquire of a prefetch-loaded
 * slot counts as a hit and as prefetch_used; a prefetch-loaded slot evicted (or failed)
 * before any demand use counts as prefetch_wasted. Counters go to the expert's layer.
 *
 * Returns FERRY_ERR_INVALID (NULL arguments, layer or expert out of range) or
 * FERRY_ERR_NOMEM when every candidate slot is pinned or being filled: "expert cache: all
 * N slots are in use (pinned or in flight); need at least N+1" (with layer-lru, "all N
 * slots of layer L ..."). That is transient: release pins or wait for fills, then retry.
 * A failed acquire pins nothing and counts nothing. *slot and *result are written only on
 * success. Thread-safe. */
ferry_status ferry_cache_acquire(ferry_cache *c, int32_t layer, int32_t expert, int demand,
                                 int32_t *slot, ferry_cache_result *result);

/* Non-pinning lookup: the slot holding (layer, expert) or -1 (also for out-of-range
 * arguments); if ready is not NULL and a slot is returned, *ready = 1 when it is filled,
 * 0 while in flight. Without a pin the answer may be stale by the time it is read.
 * Thread-safe. */
int32_t ferry_cache_find(ferry_cache *c, int32_t layer, int32_t expert, int *ready);

/* Drops one reference taken by ferry_cache_acquire. A slot index out of range or a slot
 * with no references is a caller bug: logged as an error and ignored. Thread-safe. */
void ferry_cache_release(ferry_cache *c, int32_t slot);

/* The fill of slot (which must be being filled) completed: the slot becomes ready and
 * every ferry_cache_wait_ready on it returns FERRY_OK. Misuse is logged and ignored.
 * Thread-safe. */
void ferry_cache_mark_ready(ferry_cache *c, int32_t slot);

/* The fill of slot failed: the slot becomes empty (the expert is no longer found, a later
 * acquire of it misses again), and every ferry_cache_wait_ready on it returns FERRY_ERR_IO.
 * The slot is not reused until every pin on it is released. Misuse is logged and ignored.
 * Thread-safe. */
void ferry_cache_mark_failed(ferry_cache *c, int32_t slot);

/* Blocks until slot, which the caller must hold pinned, is ready: FERRY_OK, or its fill
 * failed: FERRY_ERR_IO "expert cache: layer L expert E failed to load". FERRY_ERR_INVALID
 * for a slot index out of range. Returns at once when the slot is already ready or
 * failed. Thread-safe. */
ferry_status ferry_cache_wait_ready(ferry_cache *c, int32_t slot);

/* For the predicted policy: the predictor's scores (probability of use soon) for the
 * n_experts experts of layer, copied; NULL resets the layer to 0; NaN counts as 0. Other
 * policies keep but ignore them. A layer out of range is logged and ignored. Thread-safe. */
void ferry_cache_set_scores(ferry_cache *c, int32_t layer, const float *scores);

/* Which (layer, expert) a slot holds or is being filled with; (-1, -1) if it is empty or
 * the index is out of range. Thread-safe. */
void ferry_cache_slot_owner(const ferry_cache *c, int32_t slot, int32_t *layer,
                            int32_t *expert);

typedef struct {
    int64_t hits, misses; /* demand acquires: found (resident or in flight) / FILL */
    int64_t hits_pending; /* of the hits, those that found the expert still in flight */
    int64_t prefetch_issued, prefetch_used, prefetch_wasted;
    int64_t evictions; /* ready experts of this layer pushed out by a miss */
} ferry_cache_layer_stats;

/* Copies the per-layer counters into out[n_layers]. Between resets,
 * prefetch_issued = prefetch_used + prefetch_wasted + prefetched slots not yet used.
 * Thread-safe. */
void ferry_cache_get_stats(const ferry_cache *c, ferry_cache_layer_stats *out);

/* Zeroes every counter (not the slots, recency or use counts). Thread-safe. */
void ferry_cache_reset_stats(ferry_cache *c);

/* Verifies the internal invariants: the (layer, expert) table and the slots agree (so no
 * expert is in two slots and no slot is owned twice), reference counts are >= 0, and with
 * layer-lru every slot holds an expert of its own layer. With expect_idle, also that no
 * slot is pinned or being filled. FERRY_OK or FERRY_ERR_INVALID naming the first
 * violation. For tests and debugging; O(n_layers * n_experts + n_slots). Thread-safe. */
ferry_status ferry_cache_check(const ferry_cache *c, int expect_idle);

#endif
