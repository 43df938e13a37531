/*
 * engine/sim.c: the routing-trace simulator (see sim.h).
 *
 * A run owns a CPU backend with a device arena of n_slots dummy experts of SIM_EXPERT_BYTES
 * each, a RAM store built from a table of distinct dummy bytes per expert, the cache and
 * the prefetch pipeline, and scratch sized at the start; the replay itself allocates
 * nothing. The demand path copies the forward pass's moe_offloaded / run_wave
 * (engine/context.c): acquire each needed expert with demand = 1, a FILL goes to
 * ferry_prefetch_demand, a PENDING to ferry_prefetch_promote; when the cache cannot pin
 * another slot, the wave held so far is used and released and the acquire retried; then
 * stale prefetches of the layer are cancelled and the wave is waited for, checked and
 * released. The prefetch path follows predict_after_layer; it departs from the forward
 * pass in two ways, both for determinism: each layer's prefetches are drained before the
 * next demand, and they stay pinned until then (on a GPU they would still be in flight).
 *
 * Belady's MIN: next_use[i] is the index of the next access to the same key (N when
 * none). The resident keys sit in a max-heap on their next use with lazy deletion: an
 * entry (v, k) is live exactly when k is resident and cur_next[k] == v (a key's next-use
 * values strictly grow, so a stale entry never matches again). The heap is compacted to its
 * live entries (at most n_slots) whenever it fills its 2 n_slots + 16 entries, which keeps
 * it small and costs O(1) amortised per access.
 */
#include "engine/sim.h"

#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "kernels/backend.h"
#include "offload/prefetch.h"
#include "offload/store.h"

/* One dummy expert: w1 | w3 | w2 of 64, 64 and 128 bytes of float32. */
#define SIM_EXPERT_BYTES 256
static const size_t g_part_bytes[3] = {64, 64, 128};

/* ---- Belady's MIN ------------------------------------------------------------------------ */

typedef struct {
    int64_t next; /* index of the key's next use; N = never */
    int32_t key;
} heap_entry;

static void heap_sift_up(heap_entry *h, int64_t i)
{
    heap_entry x = h[i];
    while (i > 0) {
        int64_t parent = (i - 1) / 2;
        if (h[parent].next >= x.next)
            break;
        h[i] = h[parent];
        i = parent;
    }
    h[i] = x;
}

static void heap_sift_down(heap_entry *h, int64_t n, int64_t i)
{
    heap_entry x = h[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && h[c + 1].next > h[c].next)
            c++;
        if (h[c].next <= x.next)
            break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

/* Keeps only the live entries and restores the heap order. */
static int64_t heap_compact(heap_entry *h, int64_t n, const int64_t *cur_next)
{
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++)
        if (cur_next[h[i].key] == h[i].next)
            h[m++] = h[i];
    for (int64_t i = m / 2 - 1; i >= 0; i--)
        heap_sift_down(h, m, i);
    return m;
}

ferry_status ferry_sim_belady_keys(const int32_t *keys, int64_t n, int32_t n_keys, int32_t n_slots,
                                   int64_t *misses)
{
    if (!misses || n < 0 || (n > 0 && !keys))
        return ferry_fail(FERRY_ERR_INVALID, "belady: needs a key sequence and a result");
    if (n_slots < 1)
        return ferry_fail(FERRY_ERR_INVALID, "belady: n_slots is %d; need at least 1",
                          (int)n_slots);
    if (n_keys < 1)
        return ferry_fail(FERRY_ERR_INVALID, "belady: n_keys is %d; need at least 1", (int)n_keys);
    for (int64_t i = 0; i < n; i++)
        if (keys[i] < 0 || keys[i] >= n_keys)
            return ferry_fail(FERRY_ERR_INVALID, "belady: key %d at index %lld outside [0, %d)",
                              (int)keys[i], (long long)i, (int)n_keys);

    ferry_status st = FERRY_OK;
    int64_t cap = 2 * (int64_t)n_slots + 16;
    int64_t *next_use = malloc((size_t)(n > 0 ? n : 1) * sizeof *next_use);
    int64_t *cur_next = malloc((size_t)n_keys * sizeof *cur_next);
    heap_entry *heap = malloc((size_t)cap * sizeof *heap);
    if (!next_use || !cur_next || !heap) {
        st = ferry_fail(FERRY_ERR_NOMEM, "belady: out of memory for %lld accesses", (long long)n);
        goto fail;
    }

    /* cur_next first serves as "the next use seen so far" while scanning backwards */
    for (int32_t k = 0; k < n_keys; k++)
        cur_next[k] = n;
    for (int64_t i = n - 1; i >= 0; i--) {
        next_use[i] = cur_next[keys[i]];
        cur_next[keys[i]] = i;
    }
    for (int32_t k = 0; k < n_keys; k++)
        cur_next[k] = -1; /* not resident */

    int64_t n_heap = 0, n_miss = 0;
    int32_t n_resident = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t k = keys[i];
        if (cur_next[k] < 0) {
            n_miss++;
            if (n_resident == n_slots) {
                /* evict the resident key used farthest in the future */
                for (;;) {
                    heap_entry top = heap[0];
                    heap[0] = heap[--n_heap];
                    if (n_heap > 0)
                        heap_sift_down(heap, n_heap, 0);
                    if (cur_next[top.key] == top.next) {
                        cur_next[top.key] = -1;
                        n_resident--;
                        break;
                    }
                }
            }
            n_resident++;
        }
        cur_next[k] = next_use[i];
        if (n_heap == cap)
            n_heap = heap_compact(heap, n_heap, cur_next);
        heap[n_heap] = (heap_entry){next_use[i], k};
        heap_sift_up(heap, n_heap++);
    }
    *misses = n_miss;
fail:
    free(next_use);
    free(cur_next);
    free(heap);
    return st;
}

/* The trace's shape and body are usable: FERRY_OK or FERRY_ERR_INVALID naming the field. */
static ferry_status check_trace(const ferry_trace *tr)
{
    if (!tr)
        return ferry_fail(FERRY_ERR_INVALID, "sim: no trace");
    if (tr->n_layers < 1 || tr->n_experts < 1 || tr->n_experts > 256 || tr->top_k < 1 ||
        tr->top_k > tr->n_experts || tr->n_tokens < 0)
        return ferry_fail(FERRY_ERR_INVALID,
                          "sim: trace shape %d layers x %d experts, top_k %d, %lld tokens is "
                          "out of range",
                          (int)tr->n_layers, (int)tr->n_experts, (int)tr->top_k,
                          (long long)tr->n_tokens);
    if (tr->n_tokens > 0 && !tr->experts)
        return ferry_fail(FERRY_ERR_INVALID, "sim: trace has %lld tokens but no expert ids",
                          (long long)tr->n_tokens);
    int64_t sum = 0;
    for (int32_t s = 0; s < tr->n_seqs && tr->seq_lengths; s++) {
        if (tr->seq_lengths[s] <= 0)
            return ferry_fail(FERRY_ERR_INVALID, "sim: trace sequence %d has length %lld", (int)s,
                              (long long)tr->seq_lengths[s]);
        sum += tr->seq_lengths[s];
    }
    if (sum != tr->n_tokens)
        return ferry_fail(FERRY_ERR_INVALID,
                          "sim: trace sequence lengths sum to %lld, but it has %lld tokens",
                          (long long)sum, (long long)tr->n_tokens);
    return FERRY_OK;
}

/* Belady's MIN over the first n_tok tokens of tr (checked by check_trace). */
static ferry_status belady_trace(const ferry_trace *tr, int64_t n_tok, int32_t n_slots,
                                 int64_t *misses)
{
    int64_t per_tok = (int64_t)tr->n_layers * tr->top_k, n = n_tok * per_tok;
    int32_t *keys = malloc((size_t)(n > 0 ? n : 1) * sizeof *keys);
    if (!keys)
        return ferry_fail(FERRY_ERR_NOMEM, "belady: out of memory for %lld accesses", (long long)n);
    for (int64_t t = 0; t < n_tok; t++)
        for (int32_t l = 0; l < tr->n_layers; l++) {
            const uint8_t *ids = ferry_trace_at(tr, t, l);
            for (int32_t j = 0; j < tr->top_k; j++) {
                if (ids[j] >= tr->n_experts) {
                    free(keys);
                    return ferry_fail(FERRY_ERR_INVALID,
                                      "sim: trace token %lld layer %d names expert %d of %d",
                                      (long long)t, (int)l, (int)ids[j], (int)tr->n_experts);
                }
                keys[(t * tr->n_layers + l) * tr->top_k + j] = l * tr->n_experts + ids[j];
            }
        }
    ferry_status st = ferry_sim_belady_keys(keys, n, tr->n_layers * tr->n_experts, n_slots, misses);
    free(keys);
    return st;
}

ferry_status ferry_sim_belady(const ferry_trace *tr, int32_t n_slots, int64_t *misses)
{
    ferry_status st = check_trace(tr);
    if (st)
        return st;
    if (!misses)
        return ferry_fail(FERRY_ERR_INVALID, "belady: no result");
    if (n_slots < 1)
        return ferry_fail(FERRY_ERR_INVALID, "belady: n_slots is %d; need at least 1",
                          (int)n_slots);
    return belady_trace(tr, tr->n_tokens, n_slots, misses);
}

/* ---- the replay ---------------------------------------------------------------------- */

typedef struct {
    const ferry_trace *tr;
    ferry_sim_params p;
    int32_t prefetch_k;

    ferry_backend *be;
    ferry_store *store;
    ferry_cache *cache;
    ferry_prefetch *pf;
    char *d_slots; /* (n_slots, SIM_EXPERT_BYTES) in the device arena */

    uint8_t *expected;    /* (n_layers * n_experts, SIM_EXPERT_BYTES): each expert's bytes */
    uint8_t *h_slot;      /* (SIM_EXPERT_BYTES) a slot read back */
    int32_t *held_slot;   /* (top_k) the wave's pinned slots */
    int32_t *held_expert; /* (top_k) */
    int32_t *route;       /* (top_k) the token's experts at the layer, for the predictor */
    float *scores;        /* (n_experts) */
    int32_t *hint;        /* (n_experts) the experts of one hint */
    int32_t *pinned;      /* (lookahead + 1, n_experts) slots of the prefetches in flight */
    ferry_cache_layer_stats *stats; /* (n_layers) */
} sim_state;

ferry_sim_params ferry_sim_params_default(void)
{
    ferry_sim_params p = {0};
    p.policy = FERRY_POLICY_LRU;
    p.predictor_kind = FERRY_PREDICTOR_STATS;
    p.lookahead = 1;
    return p;
}

/* Distinct bytes for every expert: its key in the first four bytes, then splitmix64. */
static void fill_expert_bytes(uint8_t *dst, uint32_t key)
{
    uint64_t state = ((uint64_t)key + 1) * 0x9E3779B97F4A7C15ULL;
    dst[0] = (uint8_t)key;
    dst[1] = (uint8_t)(key >> 8);
    dst[2] = (uint8_t)(key >> 16);
    dst[3] = (uint8_t)(key >> 24);
    for (size_t i = 4; i < SIM_EXPERT_BYTES; i++) {
        uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        dst[i] = (uint8_t)(z ^ (z >> 31));
    }
}

static ferry_status sim_source(void *user, int32_t layer, int32_t expert, const void *parts[3],
                               ferry_expert_layout *layout)
{
    const sim_state *s = user;
    const uint8_t *base =
        s->expected +
        ((size_t)layer * (size_t)s->tr->n_experts + (size_t)expert) * SIM_EXPERT_BYTES;
    size_t off = 0;
    for (int k = 0; k < 3; k++) {
        parts[k] = base + off;
        layout->part_bytes[k] = g_part_bytes[k];
        layout->dtype[k] = FERRY_DTYPE_F32;
        off += g_part_bytes[k];
    }
    return FERRY_OK;
}

static ferry_status check_params(const ferry_trace *tr, const ferry_sim_params *p)
{
    if (!p)
        return ferry_fail(FERRY_ERR_INVALID, "sim: no parameters");
    if (p->n_slots < 1)
        return ferry_fail(FERRY_ERR_INVALID, "sim: n_slots is %d; need at least 1 slot",
                          (int)p->n_slots);
    if ((int)p->policy < 0 || (int)p->policy > (int)FERRY_POLICY_PREDICTED)
        return ferry_fail(FERRY_ERR_INVALID, "sim: policy %d is not a cache policy",
                          (int)p->policy);
    if (p->policy == FERRY_POLICY_LAYER_LRU && p->n_slots < tr->n_layers)
        return ferry_fail(FERRY_ERR_INVALID,
                          "sim: layer-lru needs at least one slot per layer: n_slots %d < %d "
                          "layers",
                          (int)p->n_slots, (int)tr->n_layers);
    if (p->lookahead < 1 || p->lookahead > FERRY_PREDICT_MAX_LOOKAHEAD)
        return ferry_fail(FERRY_ERR_INVALID, "sim: lookahead %d is outside 1..%d",
                          (int)p->lookahead, FERRY_PREDICT_MAX_LOOKAHEAD);
    if (p->prefetch_k < 0 || p->prefetch_k > tr->n_experts)
        return ferry_fail(FERRY_ERR_INVALID, "sim: prefetch_k %d is outside 0..%d (n_experts)",
                          (int)p->prefetch_k, (int)tr->n_experts);
    if (p->predictor && p->predictor_kind == FERRY_PREDICTOR_GATE && !p->hidden)
        return ferry_fail(FERRY_ERR_INVALID,
                          "sim: the gate predictor needs hidden states, which a routing trace "
                          "does not have; use a stats or combined predictor");
    if (p->hidden && p->d_model < 1)
        return ferry_fail(FERRY_ERR_INVALID, "sim: hidden states given with d_model %d",
                          (int)p->d_model);
    if (p->predictor && p->predictor_kind != FERRY_PREDICTOR_STATS &&
        p->predictor_kind != FERRY_PREDICTOR_COMBINED && p->predictor_kind != FERRY_PREDICTOR_GATE)
        return ferry_fail(FERRY_ERR_INVALID, "sim: predictor kind %d is not a predictor kind",
                          (int)p->predictor_kind);
    if (p->n_tokens < 0 || p->n_tokens > tr->n_tokens)
        return ferry_fail(FERRY_ERR_INVALID, "sim: n_tokens %lld is outside 0..%lld",
                          (long long)p->n_tokens, (long long)tr->n_tokens);
    if (tr->n_tokens == 0)
        return ferry_fail(FERRY_ERR_INVALID, "sim: the trace has no tokens");
    return FERRY_OK;
}

static void sim_free(sim_state *s)
{
    ferry_prefetch_destroy(s->pf); /* first: stops the worker that uses the rest */
    ferry_cache_destroy(s->cache);
    ferry_store_destroy(s->store);
    if (s->be && s->d_slots)
        s->be->ops->free(s->be, s->d_slots);
    ferry_backend_destroy(s->be);
    free(s->expected);
    free(s->h_slot);
    free(s->held_slot);
    free(s->held_expert);
    free(s->route);
    free(s->scores);
    free(s->hint);
    free(s->pinned);
    free(s->stats);
}

static ferry_status sim_build(sim_state *s)
{
    const ferry_trace *tr = s->tr;
    size_t n_keys = (size_t)tr->n_layers * (size_t)tr->n_experts, E = (size_t)tr->n_experts;
    size_t k = (size_t)tr->top_k;
    s->expected = malloc(n_keys * SIM_EXPERT_BYTES);
    s->h_slot = malloc(SIM_EXPERT_BYTES);
    s->held_slot = malloc(k * sizeof *s->held_slot);
    s->held_expert = malloc(k * sizeof *s->held_expert);
    s->route = malloc(k * sizeof *s->route);
    s->scores = malloc(E * sizeof *s->scores);
    s->hint = malloc(E * sizeof *s->hint);
    s->pinned = malloc((FERRY_PREDICT_MAX_LOOKAHEAD + 1) * E * sizeof *s->pinned);
    s->stats = malloc((size_t)tr->n_layers * sizeof *s->stats);
    if (!s->expected || !s->h_slot || !s->held_slot || !s->held_expert || !s->route || !s->scores ||
        !s->hint || !s->pinned || !s->stats)
        return ferry_fail(FERRY_ERR_NOMEM, "sim: out of memory for %zu dummy experts", n_keys);
    for (size_t i = 0; i < n_keys; i++)
        fill_expert_bytes(s->expected + i * SIM_EXPERT_BYTES, (uint32_t)i);

    ferry_status st;
    size_t arena = (size_t)s->p.n_slots * SIM_EXPERT_BYTES + 4096;
    if ((st = ferry_backend_cpu_create(1, arena, &s->be)))
        return st;
    if ((st = s->be->ops->alloc(s->be, (size_t)s->p.n_slots * SIM_EXPERT_BYTES,
                                (void **)&s->d_slots)))
        return st;
    if ((st = ferry_store_create_ram(tr->n_layers, tr->n_experts, sim_source, s, &s->store)))
        return st;
    if (ferry_store_max_expert_bytes(s->store) != SIM_EXPERT_BYTES)
        return ferry_fail(FERRY_ERR_DEVICE, "sim: the store's experts are %zu bytes, not %d",
                          ferry_store_max_expert_bytes(s->store), SIM_EXPERT_BYTES);
    ferry_cache_params cp = {.n_slots = s->p.n_slots,
                             .n_layers = tr->n_layers,
                             .n_experts = tr->n_experts,
                             .policy = s->p.policy};
    if ((st = ferry_cache_create(&cp, &s->cache)))
        return st;
    /* No byte bound beyond the cache itself: every hint batch is drained before the next
     * demand, so the bound of the forward pass (half the slots in flight) has no role. */
    ferry_prefetch_params pp = {.d_slots = s->d_slots,
                                .slot_bytes = SIM_EXPERT_BYTES,
                                .n_slots = s->p.n_slots,
                                .n_layers = tr->n_layers,
                                .max_prefetch_bytes = (size_t)s->p.n_slots * SIM_EXPERT_BYTES};
    return ferry_prefetch_create(&pp, s->be, s->store, s->cache, &s->pf);
}

/* Waits for, checks and releases the n_held slots of the wave, like run_wave: every pin is
 * released even after a failure. */
static ferry_status finish_wave(sim_state *s, int32_t layer, int32_t n_held)
{
    ferry_status st = FERRY_OK;
    for (int32_t i = 0; i < n_held; i++) {
        int32_t slot = s->held_slot[i], e = s->held_expert[i];
        if (st == FERRY_OK && ferry_cache_wait_ready(s->cache, slot) != FERRY_OK)
            st = ferry_prefetch_failure(s->pf, layer, e);
        if (st == FERRY_OK)
            st = s->be->ops->download(
                s->be, s->h_slot, s->d_slots + (size_t)slot * SIM_EXPERT_BYTES, SIM_EXPERT_BYTES);
        if (st == FERRY_OK) {
            size_t key = (size_t)layer * (size_t)s->tr->n_experts + (size_t)e;
            const uint8_t *want = s->expected + key * SIM_EXPERT_BYTES;
            if (memcmp(s->h_slot, want, SIM_EXPERT_BYTES) != 0) {
                int32_t first = 0;
                while (s->h_slot[first] == want[first])
                    first++;
                st = ferry_fail(FERRY_ERR_DEVICE,
                                "sim: slot %d should hold layer %d expert %d but differs from "
                                "its bytes at byte %d",
                                (int)slot, (int)layer, (int)e, (int)first);
            }
        }
        ferry_cache_release(s->cache, slot);
    }
    return st;
}

/* The demand path of one token at one layer (the forward pass's moe_offloaded). */
static ferry_status demand_layer(sim_state *s, int32_t layer, const uint8_t *ids)
{
    int32_t n_held = 0, i = 0, drained = 0;
    ferry_status st = FERRY_OK;
    while (i < s->tr->top_k) {
        int32_t e = ids[i], slot;
        ferry_cache_result res;
        st = ferry_cache_acquire(s->cache, layer, e, 1, &slot, &res);
        if (st == FERRY_ERR_NOMEM && n_held > 0) {
            st = finish_wave(s, layer, n_held); /* frees our pins, then retry */
            n_held = 0;
            if (st)
                return st;
            continue;
        }
        if (st == FERRY_ERR_NOMEM && !drained) {
            ferry_prefetch_drain(s->pf); /* every slot is pinned by prefetches in flight */
            drained = 1;
            continue;
        }
        if (st)
            break;
        drained = 0;
        if (res == FERRY_CACHE_FILL) {
            if ((st = ferry_prefetch_demand(s->pf, layer, e, slot))) {
                ferry_cache_mark_failed(s->cache, slot);
                ferry_cache_release(s->cache, slot);
                break;
            }
        } else if (res == FERRY_CACHE_PENDING) {
            ferry_prefetch_promote(s->pf, layer, e);
        }
        s->held_slot[n_held] = slot;
        s->held_expert[n_held] = e;
        n_held++;
        i++;
    }
    if (st) {
        finish_wave(s, layer, n_held);
        return st;
    }
    ferry_prefetch_cancel(s->pf, layer); /* queued prefetches this layer did not need */
    return finish_wave(s, layer, n_held);
}

/* Hints s->hint[0..n) of layer `target`, one at a time, pinning each prefetch it issues
 * into s->pinned (see hint_batch). */
static ferry_status hint_ids(sim_state *s, int32_t target, int32_t n, int32_t *n_pinned)
{
    for (int32_t j = 0; j < n; j++) {
        float score = s->scores[s->hint[j]];
        if (ferry_prefetch_hint(s->pf, target, &s->hint[j], &score, 1) != 1)
            continue;
        int32_t slot;
        ferry_cache_result res;
        /* issued, so resident or in flight: this pins it and counts nothing */
        ferry_status st = ferry_cache_acquire(s->cache, target, s->hint[j], 0, &slot, &res);
        if (st)
            return st;
        s->pinned[(*n_pinned)++] = slot;
        if (res == FERRY_CACHE_FILL) { /* its fill failed in between: give the slot back */
            ferry_cache_mark_failed(s->cache, slot);
            return ferry_prefetch_failure(s->pf, target, s->hint[j]);
        }
    }
    return FERRY_OK;
}

/* Hints the prefetch_k best experts of layer `target` by s->scores (ferry_predictor_top:
 * ascending ids, as the forward pass hints them), one at a time, pinning each prefetch it
 * issues into s->pinned: on a GPU a batch is still in flight while the rest is issued, so no
 * prefetch of the batch can evict another; without the pin that would depend on how fast
 * the worker is. */
static ferry_status hint_batch(sim_state *s, int32_t target, int32_t *n_pinned)
{
    ferry_predictor_top(s->scores, s->tr->n_experts, s->prefetch_k, s->hint);
    return hint_ids(s, target, s->prefetch_k, n_pinned);
}

/* After layer's demands, as the forward pass's predict_after_layer: the predictor sees the
 * layer's experts and names those of layers layer+1 .. layer+lookahead, which are scored in
 * the cache (predicted policy) and hinted to the pipeline; after the last layer, the next
 * token's layer 0 (when the sequence goes on; a gate predictor has no guess there, so this
 * token's layer-0 experts, as the forward pass does). The prefetches land before the next
 * demand. */
static ferry_status predict_and_prefetch(sim_state *s, int64_t t, int32_t layer,
                                         const uint8_t *ids, int next_in_seq)
{
    const ferry_trace *tr = s->tr;
    for (int32_t j = 0; j < tr->top_k; j++)
        s->route[j] = ids[j];
    const float *h = s->p.hidden ? s->p.hidden + ((size_t)t * (size_t)tr->n_layers +
                                                  (size_t)layer) * (size_t)s->p.d_model
                                 : NULL;
    ferry_predictor_observe(s->p.predictor, layer, h, s->route);
    ferry_status st = FERRY_OK;
    int32_t n_pinned = 0;
    for (int32_t d = 1; d <= s->p.lookahead && layer + d < tr->n_layers && !st; d++) {
        if ((st = ferry_predictor_predict(s->p.predictor, layer, d, s->scores)))
            break;
        if (s->p.policy == FERRY_POLICY_PREDICTED)
            ferry_cache_set_scores(s->cache, layer + d, s->scores);
        st = hint_batch(s, layer + d, &n_pinned);
    }
    if (!st && layer == tr->n_layers - 1 && next_in_seq) {
        if (s->p.predictor_kind == FERRY_PREDICTOR_GATE) {
            /* no next-token guess from a gate: as the forward pass, this token's layer-0
             * experts */
            const uint8_t *first = ferry_trace_at(tr, t, 0);
            for (int32_t j = 0; j < tr->top_k; j++) {
                s->hint[j] = first[j];
                s->scores[first[j]] = 1.0f;
            }
            st = hint_ids(s, 0, tr->top_k, &n_pinned);
        } else if (!(st = ferry_predictor_predict_next_token(s->p.predictor, 0, s->scores))) {
            st = hint_batch(s, 0, &n_pinned);
        }
    }
    ferry_prefetch_drain(s->pf);
    for (int32_t j = 0; j < n_pinned; j++)
        ferry_cache_release(s->cache, s->pinned[j]);
    return st;
}

static ferry_status replay(sim_state *s, int64_t n_tok)
{
    const ferry_trace *tr = s->tr;
    int32_t seq = 0;
    int64_t seq_end = 0;
    for (int64_t t = 0; t < n_tok; t++) {
        if (t == seq_end) {
            seq_end += tr->seq_lengths[seq++];
            if (s->p.predictor)
                ferry_predictor_reset(s->p.predictor);
        }
        for (int32_t l = 0; l < tr->n_layers; l++) {
            const uint8_t *ids = ferry_trace_at(tr, t, l);
            ferry_status st = demand_layer(s, l, ids);
            if (st == FERRY_OK && s->p.predictor)
                st = predict_and_prefetch(s, t, l, ids, t + 1 < seq_end);
            if (st)
                return ferry_fail_prefix(st, "sim: token %lld layer %d", (long long)t, (int)l);
        }
    }
    ferry_prefetch_drain(s->pf);
    return FERRY_OK;
}

ferry_status ferry_sim_run(const ferry_trace *tr, const ferry_sim_params *p, ferry_sim_result *out)
{
    ferry_status st = check_trace(tr);
    if (st)
        return st;
    if ((st = check_params(tr, p)))
        return st;
    if (!out)
        return ferry_fail(FERRY_ERR_INVALID, "sim: no result");

    sim_state s = {.tr = tr, .p = *p};
    s.prefetch_k = p->prefetch_k ? p->prefetch_k : tr->top_k;
    int64_t n_tok = p->n_tokens ? p->n_tokens : tr->n_tokens;
    int64_t belady_misses;
    if ((st = belady_trace(tr, n_tok, p->n_slots, &belady_misses)))
        goto fail;
    if ((st = sim_build(&s)) || (st = replay(&s, n_tok)))
        goto fail;

    ferry_sim_result r = {0};
    ferry_cache_get_stats(s.cache, s.stats);
    for (int32_t l = 0; l < tr->n_layers; l++) {
        r.hits += s.stats[l].hits;
        r.misses += s.stats[l].misses;
        r.prefetch_issued += s.stats[l].prefetch_issued;
        r.prefetch_used += s.stats[l].prefetch_used;
        r.prefetch_wasted += s.stats[l].prefetch_wasted;
        r.evictions += s.stats[l].evictions;
    }
    r.prefetch_unused_at_end = r.prefetch_issued - r.prefetch_used - r.prefetch_wasted;
    r.prefetch_wasted += r.prefetch_unused_at_end;
    ferry_prefetch_stats ps;
    ferry_prefetch_get_stats(s.pf, &ps);
    r.prefetch_cancelled = (int64_t)ps.prefetch_cancelled;
    r.prefetch_skipped = (int64_t)ps.prefetch_skipped;
    r.fills = (int64_t)ps.fills;
    r.lookups = r.hits + r.misses;
    r.hit_rate = r.lookups > 0 ? (double)r.hits / (double)r.lookups : 0.0;
    r.expert_bytes = p->expert_bytes ? p->expert_bytes : SIM_EXPERT_BYTES;
    r.bytes_moved = (uint64_t)r.fills * r.expert_bytes;
    if (r.prefetch_wasted > r.prefetch_cancelled)
        r.prefetch_bytes_wasted =
            (uint64_t)(r.prefetch_wasted - r.prefetch_cancelled) * r.expert_bytes;
    r.belady_misses = belady_misses;
    r.belady_hit_rate = r.lookups > 0 ? 1.0 - (double)belady_misses / (double)r.lookups : 0.0;
    if (r.lookups != n_tok * tr->n_layers * tr->top_k) {
        st = ferry_fail(FERRY_ERR_DEVICE, "sim: the cache counted %lld lookups, expected %lld",
                        (long long)r.lookups, (long long)(n_tok * tr->n_layers * tr->top_k));
        goto fail;
    }
    sim_free(&s);
    *out = r;
    return FERRY_OK;
fail:
    sim_free(&s);
    return st;
}
