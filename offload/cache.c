/*
 * offload/cache.c: see cache.h.
 *
 * Owns four arrays sized at create: the (layer, expert) -> slot table, the slots, the
 * per-layer partition bounds (layer-lru), the predictor scores, and the per-layer stats.
 * Invariants, all under c->mu: table[l * n_experts + e] == s >= 0 exactly when slot s is
 * not EMPTY and holds (l, e); a slot with n_refs > 0 or in state FILLING is never chosen as
 * a victim; an EMPTY slot with n_refs > 0 (its fill failed while pinned) is not reused
 * until the pins are released, so a waiter on it still sees the failure. Recency stamps
 * come from one clock incremented per stamp, so no two slots share one and every victim
 * choice is deterministic.
 */
#include "offload/cache.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

typedef enum { SLOT_EMPTY, SLOT_FILLING, SLOT_READY } slot_state;

typedef struct {
    int32_t layer, expert; /* owner while not EMPTY; after a failed fill, the one that failed
                              (for wait_ready's message); -1 before the first fill */
    slot_state state;
    int32_t n_refs;      /* pins: acquires not yet released */
    uint64_t last_use;   /* clock at the load or the latest demand acquire */
    int64_t n_uses;      /* demand acquires since the load (lfu) */
    int prefetch_unused; /* loaded by a prefetch, no demand acquire yet */
} cache_slot;

struct ferry_cache {
    ferry_cache_params p;
    int32_t *table;                 /* (n_layers, n_experts): slot or -1 */
    cache_slot *slots;              /* n_slots */
    int32_t *part_begin;            /* n_layers + 1: layer l may use [part_begin[l],
                                       part_begin[l + 1]) under layer-lru */
    float *scores;                  /* (n_layers, n_experts), predicted policy */
    ferry_cache_layer_stats *stats; /* n_layers */
    uint64_t clock;
    pthread_mutex_t mu;
    pthread_cond_t filled; /* broadcast when any fill completes or fails */
    int has_mu, has_cond;  /* which of mu, filled were initialised (half-built destroy) */
};

static const char *const g_policy_names[] = {"lru", "lfu", "layer-lru", "predicted"};
#define N_POLICIES ((int)(sizeof g_policy_names / sizeof g_policy_names[0]))
#define VALID_POLICIES "lru, lfu, layer-lru, predicted"

/* The const API functions (stats, owner, check) still lock: the mutex is never part of
 * the caller-visible state, and no ferry_cache is defined const. */
static void lock(const ferry_cache *c) { pthread_mutex_lock((pthread_mutex_t *)&c->mu); }
static void unlock(const ferry_cache *c) { pthread_mutex_unlock((pthread_mutex_t *)&c->mu); }

const char *ferry_cache_policy_name(ferry_cache_policy p)
{
    if ((int)p < 0 || (int)p >= N_POLICIES)
        return "unknown";
    return g_policy_names[p];
}

ferry_status ferry_cache_policy_parse(const char *s, ferry_cache_policy *out)
{
    if (!out)
        return ferry_fail(FERRY_ERR_INVALID, "expert cache: policy_parse needs an output");
    if (!s)
        return ferry_fail(FERRY_ERR_INVALID,
                          "expert cache: no policy given; valid: " VALID_POLICIES);
    for (int i = 0; i < N_POLICIES; i++) {
        if (strcmp(s, g_policy_names[i]) == 0) {
            *out = (ferry_cache_policy)i;
            return FERRY_OK;
        }
    }
    return ferry_fail(FERRY_ERR_INVALID,
                      "expert cache: unknown policy '%.100s'; valid: " VALID_POLICIES, s);
}

static ferry_status check_params(const ferry_cache_params *p)
{
    if (p->n_slots < 1)
        return ferry_fail(FERRY_ERR_INVALID, "expert cache: n_slots must be >= 1, got %d",
                          (int)p->n_slots);
    if (p->n_layers < 1)
        return ferry_fail(FERRY_ERR_INVALID, "expert cache: n_layers must be >= 1, got %d",
                          (int)p->n_layers);
    if (p->n_experts < 1)
        return ferry_fail(FERRY_ERR_INVALID, "expert cache: n_experts must be >= 1, got %d",
                          (int)p->n_experts);
    if ((int64_t)p->n_layers * p->n_experts > INT32_MAX)
        return ferry_fail(FERRY_ERR_INVALID,
                          "expert cache: n_layers %d * n_experts %d exceeds %d experts",
                          (int)p->n_layers, (int)p->n_experts, (int)INT32_MAX);
    if ((int)p->policy < 0 || (int)p->policy >= N_POLICIES)
        return ferry_fail(FERRY_ERR_INVALID,
                          "expert cache: policy %d is not one of " VALID_POLICIES,
                          (int)p->policy);
    if (p->policy == FERRY_POLICY_LAYER_LRU && p->n_slots < p->n_layers)
        return ferry_fail(FERRY_ERR_INVALID,
                          "expert cache: policy layer-lru needs at least one slot per layer: "
                          "n_slots %d < n_layers %d",
                          (int)p->n_slots, (int)p->n_layers);
    return FERRY_OK;
}

ferry_status ferry_cache_create(const ferry_cache_params *p, ferry_cache **out)
{
    if (!p || !out)
        return ferry_fail(FERRY_ERR_INVALID, "expert cache: create needs params and an output");
    ferry_status st = check_params(p);
    if (st != FERRY_OK)
        return st;

    size_t n_keys = (size_t)p->n_layers * (size_t)p->n_experts;
    ferry_cache *c = calloc(1, sizeof *c);
    if (!c)
        return ferry_fail(FERRY_ERR_NOMEM, "expert cache: out of memory");
    c->p = *p;
    c->table = malloc(n_keys * sizeof *c->table);
    c->slots = calloc((size_t)p->n_slots, sizeof *c->slots);
    c->part_begin = malloc(((size_t)p->n_layers + 1) * sizeof *c->part_begin);
    c->scores = calloc(n_keys, sizeof *c->scores);
    c->stats = calloc((size_t)p->n_layers, sizeof *c->stats);
    if (!c->table || !c->slots || !c->part_begin || !c->scores || !c->stats) {
        st = ferry_fail(FERRY_ERR_NOMEM,
                        "expert cache: out of memory for %d slots and %zu experts",
                        (int)p->n_slots, n_keys);
        goto fail;
    }
    if (pthread_mutex_init(&c->mu, NULL) != 0) {
        st = ferry_fail(FERRY_ERR_NOMEM, "expert cache: cannot create its mutex");
        goto fail;
    }
    c->has_mu = 1;
    if (pthread_cond_init(&c->filled, NULL) != 0) {
        st = ferry_fail(FERRY_ERR_NOMEM, "expert cache: cannot create its condition variable");
        goto fail;
    }
    c->has_cond = 1;

    for (size_t i = 0; i < n_keys; i++)
        c->table[i] = -1;
    for (int32_t s = 0; s < p->n_slots; s++) {
        c->slots[s].layer = -1;
        c->slots[s].expert = -1;
        c->slots[s].state = SLOT_EMPTY;
    }
    /* Layer-lru partition: floor(n_slots / n_layers) each, the remainder one apiece to the
     * first layers. Other policies never read it. */
    int32_t base = p->n_slots / p->n_layers, extra = p->n_slots % p->n_layers;
    c->part_begin[0] = 0;
    for (int32_t l = 0; l < p->n_layers; l++)
        c->part_begin[l + 1] = c->part_begin[l] + base + (l < extra ? 1 : 0);
    *out = c;
    return FERRY_OK;

fail:
    ferry_cache_destroy(c);
    return st;
}

void ferry_cache_destroy(ferry_cache *c)
{
    if (!c)
        return;
    if (c->has_cond)
        pthread_cond_destroy(&c->filled);
    if (c->has_mu)
        pthread_mutex_destroy(&c->mu);
    free(c->table);
    free(c->slots);
    free(c->part_begin);
    free(c->scores);
    free(c->stats);
    free(c);
}

/* Whether slot a should be evicted before slot b (both READY). */
static int evicts_before(const ferry_cache *c, const cache_slot *a, const cache_slot *b)
{
    switch (c->p.policy) {
    case FERRY_POLICY_LFU:
        if (a->n_uses != b->n_uses)
            return a->n_uses < b->n_uses;
        break;
    case FERRY_POLICY_PREDICTED: {
        float sa = c->scores[(size_t)a->layer * (size_t)c->p.n_experts + (size_t)a->expert];
        float sb = c->scores[(size_t)b->layer * (size_t)c->p.n_experts + (size_t)b->expert];
        if (sa != sb)
            return sa < sb;
        break;
    }
    case FERRY_POLICY_LRU:
    case FERRY_POLICY_LAYER_LRU:
        break;
    }
    return a->last_use < b->last_use;
}

/* The first slot of [begin, end) that a miss may take: the lowest free one, else the
 * policy's victim among the unpinned ready ones; -1 if none. Caller holds c->mu. */
static int32_t pick_victim(const ferry_cache *c, int32_t begin, int32_t end)
{
    int32_t best = -1;
    for (int32_t s = begin; s < end; s++) {
        const cache_slot *sl = &c->slots[s];
        if (sl->n_refs > 0)
            continue;
        if (sl->state == SLOT_EMPTY)
            return s;
        if (sl->state == SLOT_READY && (best < 0 || evicts_before(c, sl, &c->slots[best])))
            best = s;
    }
    return best;
}

ferry_status ferry_cache_acquire(ferry_cache *c, int32_t layer, int32_t expert, int demand,
                                 int32_t *slot, ferry_cache_result *result)
{
    if (!c || !slot || !result)
        return ferry_fail(FERRY_ERR_INVALID,
                          "expert cache: acquire needs a cache, a slot and a result");
    if (layer < 0 || layer >= c->p.n_layers)
        return ferry_fail(FERRY_ERR_INVALID, "expert cache: layer %d out of range [0, %d)",
                          (int)layer, (int)c->p.n_layers);
    if (expert < 0 || expert >= c->p.n_experts)
        return ferry_fail(FERRY_ERR_INVALID,
                          "expert cache: layer %d expert %d out of range [0, %d)", (int)layer,
                          (int)expert, (int)c->p.n_experts);

    size_t key = (size_t)layer * (size_t)c->p.n_experts + (size_t)expert;
    ferry_cache_result r;
    lock(c);
    ferry_cache_layer_stats *st = &c->stats[layer];
    int32_t s = c->table[key];
    if (s >= 0) {
        cache_slot *sl = &c->slots[s];
        r = sl->state == SLOT_READY ? FERRY_CACHE_HIT : FERRY_CACHE_PENDING;
        sl->n_refs++;
        if (demand) {
            st->hits++;
            if (r == FERRY_CACHE_PENDING)
                st->hits_pending++;
            if (sl->prefetch_unused) {
                st->prefetch_used++;
                sl->prefetch_unused = 0;
            }
            sl->last_use = ++c->clock;
            sl->n_uses++;
        }
    } else {
        int32_t begin = 0, end = c->p.n_slots;
        if (c->p.policy == FERRY_POLICY_LAYER_LRU) {
            begin = c->part_begin[layer];
            end = c->part_begin[layer + 1];
        }
        s = pick_victim(c, begin, end);
        if (s < 0) {
            unlock(c);
            if (c->p.policy == FERRY_POLICY_LAYER_LRU)
                return ferry_fail(FERRY_ERR_NOMEM,
                                  "expert cache: all %d slots of layer %d are in use (pinned or "
                                  "in flight); need at least %d",
                                  (int)(end - begin), (int)layer, (int)(end - begin) + 1);
            return ferry_fail(FERRY_ERR_NOMEM,
                              "expert cache: all %d slots are in use (pinned or in flight); "
                              "need at least %d",
                              (int)(end - begin), (int)(end - begin) + 1);
        }
        cache_slot *sl = &c->slots[s];
        if (sl->state == SLOT_READY) {
            ferry_cache_layer_stats *old = &c->stats[sl->layer];
            old->evictions++;
            if (sl->prefetch_unused)
                old->prefetch_wasted++;
            c->table[(size_t)sl->layer * (size_t)c->p.n_experts + (size_t)sl->expert] = -1;
        }
        sl->layer = layer;
        sl->expert = expert;
        sl->state = SLOT_FILLING;
        sl->n_refs = 1;
        sl->last_use = ++c->clock;
        sl->n_uses = demand ? 1 : 0;
        sl->prefetch_unused = !demand;
        c->table[key] = s;
        if (demand)
            st->misses++;
        else
            st->prefetch_issued++;
        r = FERRY_CACHE_FILL;
    }
    unlock(c);
    *slot = s;
    *result = r;
    return FERRY_OK;
}

int32_t ferry_cache_find(ferry_cache *c, int32_t layer, int32_t expert, int *ready)
{
    if (!c || layer < 0 || layer >= c->p.n_layers || expert < 0 || expert >= c->p.n_experts)
        return -1;
    lock(c);
    int32_t s = c->table[(size_t)layer * (size_t)c->p.n_experts + (size_t)expert];
    int is_ready = s >= 0 && c->slots[s].state == SLOT_READY;
    unlock(c);
    if (s >= 0 && ready)
        *ready = is_ready;
    return s;
}

void ferry_cache_release(ferry_cache *c, int32_t slot)
{
    if (!c)
        return;
    if (slot < 0 || slot >= c->p.n_slots) {
        ferry_log(FERRY_LOG_ERROR, "expert cache: release of slot %d, out of range [0, %d)",
                  (int)slot, (int)c->p.n_slots);
        return;
    }
    lock(c);
    int ok = c->slots[slot].n_refs > 0;
    if (ok)
        c->slots[slot].n_refs--;
    unlock(c);
    if (!ok)
        ferry_log(FERRY_LOG_ERROR, "expert cache: release of slot %d, which is not pinned",
                  (int)slot);
}

/* Ends the fill of slot: ready (ok) or failed. */
static void finish_fill(ferry_cache *c, int32_t slot, int ok)
{
    const char *what = ok ? "mark_ready" : "mark_failed";
    if (!c)
        return;
    if (slot < 0 || slot >= c->p.n_slots) {
        ferry_log(FERRY_LOG_ERROR, "expert cache: %s of slot %d, out of range [0, %d)", what,
                  (int)slot, (int)c->p.n_slots);
        return;
    }
    lock(c);
    cache_slot *sl = &c->slots[slot];
    int filling = sl->state == SLOT_FILLING;
    if (filling && ok) {
        sl->state = SLOT_READY;
    } else if (filling) {
        if (sl->prefetch_unused)
            c->stats[sl->layer].prefetch_wasted++;
        c->table[(size_t)sl->layer * (size_t)c->p.n_experts + (size_t)sl->expert] = -1;
        sl->state = SLOT_EMPTY;
        sl->n_uses = 0;
        sl->prefetch_unused = 0;
    }
    if (filling)
        pthread_cond_broadcast(&c->filled);
    unlock(c);
    if (!filling)
        ferry_log(FERRY_LOG_ERROR, "expert cache: %s of slot %d, which is not being filled",
                  what, (int)slot);
}

void ferry_cache_mark_ready(ferry_cache *c, int32_t slot) { finish_fill(c, slot, 1); }

void ferry_cache_mark_failed(ferry_cache *c, int32_t slot) { finish_fill(c, slot, 0); }

ferry_status ferry_cache_wait_ready(ferry_cache *c, int32_t slot)
{
    if (!c)
        return ferry_fail(FERRY_ERR_INVALID, "expert cache: wait_ready needs a cache");
    if (slot < 0 || slot >= c->p.n_slots)
        return ferry_fail(FERRY_ERR_INVALID, "expert cache: slot %d out of range [0, %d)",
                          (int)slot, (int)c->p.n_slots);
    lock(c);
    cache_slot *sl = &c->slots[slot];
    while (sl->state == SLOT_FILLING)
        pthread_cond_wait(&c->filled, &c->mu);
    int ready = sl->state == SLOT_READY;
    int32_t layer = sl->layer, expert = sl->expert;
    unlock(c);
    if (ready)
        return FERRY_OK;
    if (layer < 0)
        return ferry_fail(FERRY_ERR_IO, "expert cache: slot %d holds no expert", (int)slot);
    return ferry_fail(FERRY_ERR_IO, "expert cache: layer %d expert %d failed to load",
                      (int)layer, (int)expert);
}

void ferry_cache_set_scores(ferry_cache *c, int32_t layer, const float *scores)
{
    if (!c)
        return;
    if (layer < 0 || layer >= c->p.n_layers) {
        ferry_log(FERRY_LOG_ERROR, "expert cache: scores for layer %d, out of range [0, %d)",
                  (int)layer, (int)c->p.n_layers);
        return;
    }
    float *dst = c->scores + (size_t)layer * (size_t)c->p.n_experts;
    lock(c);
    for (int32_t e = 0; e < c->p.n_experts; e++)
        dst[e] = scores && !isnan(scores[e]) ? scores[e] : 0.0f;
    unlock(c);
}

void ferry_cache_slot_owner(const ferry_cache *c, int32_t slot, int32_t *layer,
                            int32_t *expert)
{
    int32_t l = -1, e = -1;
    if (c && slot >= 0 && slot < c->p.n_slots) {
        lock(c);
        if (c->slots[slot].state != SLOT_EMPTY) {
            l = c->slots[slot].layer;
            e = c->slots[slot].expert;
        }
        unlock(c);
    }
    if (layer)
        *layer = l;
    if (expert)
        *expert = e;
}

void ferry_cache_get_stats(const ferry_cache *c, ferry_cache_layer_stats *out)
{
    if (!c || !out)
        return;
    lock(c);
    memcpy(out, c->stats, (size_t)c->p.n_layers * sizeof *out);
    unlock(c);
}

void ferry_cache_reset_stats(ferry_cache *c)
{
    if (!c)
        return;
    lock(c);
    memset(c->stats, 0, (size_t)c->p.n_layers * sizeof *c->stats);
    unlock(c);
}

/* Body of ferry_cache_check; caller holds c->mu. */
static ferry_status check_locked(const ferry_cache *c, int expect_idle)
{
    const int32_t n_experts = c->p.n_experts;
    for (int32_t l = 0; l < c->p.n_layers; l++) {
        for (int32_t e = 0; e < n_experts; e++) {
            int32_t s = c->table[(size_t)l * (size_t)n_experts + (size_t)e];
            if (s == -1)
                continue;
            if (s < 0 || s >= c->p.n_slots)
                return ferry_fail(FERRY_ERR_INVALID,
                                  "expert cache: layer %d expert %d maps to bad slot %d",
                                  (int)l, (int)e, (int)s);
            const cache_slot *sl = &c->slots[s];
            if (sl->state == SLOT_EMPTY || sl->layer != l || sl->expert != e)
                return ferry_fail(FERRY_ERR_INVALID,
                                  "expert cache: layer %d expert %d maps to slot %d, which "
                                  "holds layer %d expert %d (state %d)",
                                  (int)l, (int)e, (int)s, (int)sl->layer, (int)sl->expert,
                                  (int)sl->state);
        }
    }
    for (int32_t s = 0; s < c->p.n_slots; s++) {
        const cache_slot *sl = &c->slots[s];
        if (sl->n_refs < 0)
            return ferry_fail(FERRY_ERR_INVALID, "expert cache: slot %d has %d references",
                              (int)s, (int)sl->n_refs);
        if (expect_idle && (sl->n_refs != 0 || sl->state == SLOT_FILLING))
            return ferry_fail(FERRY_ERR_INVALID,
                              "expert cache: slot %d is not idle (%d references, state %d)",
                              (int)s, (int)sl->n_refs, (int)sl->state);
        if (sl->state == SLOT_EMPTY) {
            if (sl->prefetch_unused)
                return ferry_fail(FERRY_ERR_INVALID,
                                  "expert cache: empty slot %d is marked prefetched", (int)s);
            continue;
        }
        if (sl->state != SLOT_FILLING && sl->state != SLOT_READY)
            return ferry_fail(FERRY_ERR_INVALID, "expert cache: slot %d has bad state %d",
                              (int)s, (int)sl->state);
        if (sl->layer < 0 || sl->layer >= c->p.n_layers || sl->expert < 0 ||
            sl->expert >= n_experts)
            return ferry_fail(FERRY_ERR_INVALID,
                              "expert cache: slot %d holds out-of-range layer %d expert %d",
                              (int)s, (int)sl->layer, (int)sl->expert);
        if (c->table[(size_t)sl->layer * (size_t)n_experts + (size_t)sl->expert] != s)
            return ferry_fail(FERRY_ERR_INVALID,
                              "expert cache: slot %d holds layer %d expert %d, which maps to "
                              "slot %d",
                              (int)s, (int)sl->layer, (int)sl->expert,
                              (int)c->table[(size_t)sl->layer * (size_t)n_experts +
                                            (size_t)sl->expert]);
        if (c->p.policy == FERRY_POLICY_LAYER_LRU &&
            (s < c->part_begin[sl->layer] || s >= c->part_begin[sl->layer + 1]))
            return ferry_fail(FERRY_ERR_INVALID,
                              "expert cache: slot %d holds layer %d, outside its slots [%d, %d)",
                              (int)s, (int)sl->layer, (int)c->part_begin[sl->layer],
                              (int)c->part_begin[sl->layer + 1]);
    }
    return FERRY_OK;
}

ferry_status ferry_cache_check(const ferry_cache *c, int expect_idle)
{
    if (!c)
        return ferry_fail(FERRY_ERR_INVALID, "expert cache: check needs a cache");
    lock(c);
    ferry_status st = check_locked(c, expect_idle);
    unlock(c);
    return st;
}
