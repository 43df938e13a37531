/*
 * tests/test_cache.c: the expert cache's bookkeeping. Each policy runs a fixed access
 * sequence whose hits, misses, evictions and final slot contents were worked out by hand
 * (the reasoning is next to each sequence); then pinning, slots in flight, waiting across
 * threads, failed fills, prefetch accounting, misuse, bad parameters, and a multi-threaded
 * stress run that checks the cache's invariants and counters at the end.
 */
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "core/error.h"
#include "offload/cache.h"
#include "tests/check_util.h"

typedef struct {
    int32_t layer, expert;
} key;

static void assert_error_has(const char *what, const char *needle)
{
    const char *msg = ferry_last_error();
    ck_assert_msg(strstr(msg, needle) != NULL, "%s: error \"%s\" lacks \"%s\"", what, msg,
                  needle);
}

static ferry_cache *make_cache(int32_t n_slots, int32_t n_layers, int32_t n_experts,
                               ferry_cache_policy policy)
{
    ferry_cache_params p = {.n_slots = n_slots, .n_layers = n_layers, .n_experts = n_experts,
                            .policy = policy};
    ferry_cache *c = NULL;
    ck_assert_msg(ferry_cache_create(&p, &c) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_ptr_nonnull(c);
    return c;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static char result_char(ferry_cache_result r)
{
    return r == FERRY_CACHE_HIT ? 'H' : r == FERRY_CACHE_PENDING ? 'P' : 'F';
}

/* Demand-acquires each key in turn; a FILL is marked ready at once, and every slot is
 * released before the next step. Returns one letter per step: H hit, P pending, F fill. */
static void run_sequence(ferry_cache *c, const key *seq, int n, char *got)
{
    for (int i = 0; i < n; i++) {
        int32_t s = -1;
        ferry_cache_result r;
        ck_assert_msg(ferry_cache_acquire(c, seq[i].layer, seq[i].expert, 1, &s, &r) ==
                          FERRY_OK,
                      "step %d: %s", i + 1, ferry_last_error());
        if (r == FERRY_CACHE_FILL)
            ferry_cache_mark_ready(c, s);
        ferry_cache_release(c, s);
        got[i] = result_char(r);
    }
    got[n] = 0;
    ck_assert_msg(ferry_cache_check(c, 1) == FERRY_OK, "%s", ferry_last_error());
}

static void assert_sequence(const char *what, ferry_cache *c, const key *seq, int n,
                            const char *expected)
{
    char got[128];
    ck_assert(n < (int)sizeof got);
    run_sequence(c, seq, n, got);
    ck_assert_msg(strcmp(got, expected) == 0, "%s: results %s, expected %s", what, got,
                  expected);
}

/* Checks that slot s holds (layer, expert) for every s; layer -1 means empty. */
static void assert_slots(const char *what, const ferry_cache *c, const key *expected, int n)
{
    for (int s = 0; s < n; s++) {
        int32_t l, e;
        ferry_cache_slot_owner(c, s, &l, &e);
        ck_assert_msg(l == expected[s].layer && e == expected[s].expert,
                      "%s: slot %d holds (%d, %d), expected (%d, %d)", what, s, (int)l, (int)e,
                      (int)expected[s].layer, (int)expected[s].expert);
    }
}

static void assert_stats(const char *what, const ferry_cache_layer_stats *got,
                         ferry_cache_layer_stats want)
{
    ck_assert_msg(got->hits == want.hits && got->misses == want.misses &&
                      got->hits_pending == want.hits_pending &&
                      got->prefetch_issued == want.prefetch_issued &&
                      got->prefetch_used == want.prefetch_used &&
                      got->prefetch_wasted == want.prefetch_wasted &&
                      got->evictions == want.evictions,
                  "%s: hits %lld (pending %lld) misses %lld issued %lld used %lld wasted %lld "
                  "evictions %lld; expected %lld (%lld) %lld %lld %lld %lld %lld",
                  what, (long long)got->hits, (long long)got->hits_pending,
                  (long long)got->misses, (long long)got->prefetch_issued,
                  (long long)got->prefetch_used, (long long)got->prefetch_wasted,
                  (long long)got->evictions, (long long)want.hits, (long long)want.hits_pending,
                  (long long)want.misses, (long long)want.prefetch_issued,
                  (long long)want.prefetch_used, (long long)want.prefetch_wasted,
                  (long long)want.evictions);
}

/* One layer, experts 0 0 0 1 2 3 0 1, three slots: the sequence where lru and lfu part. */
static const key g_seq_lru_lfu[] = {{0, 0}, {0, 0}, {0, 0}, {0, 1},
                                    {0, 2}, {0, 3}, {0, 0}, {0, 1}};

START_TEST(test_cache_lru_sequence)
{
    /* Stamps: 0@3 (steps 1-3, slot 0), 1@4 (slot 1), 2@5 (slot 2).
     * Step 6, expert 3: least recent is 0@3 -> slot 0 = 3@6.
     * Step 7, expert 0: miss; least recent 1@4 -> slot 1 = 0@7.
     * Step 8, expert 1: miss; least recent 2@5 -> slot 2 = 1@8.
     * Hits 2 (steps 2, 3), misses 6, evictions 3. */
    ferry_cache *c = make_cache(3, 1, 8, FERRY_POLICY_LRU);
    assert_sequence("lru", c, g_seq_lru_lfu, 8, "FHHFFFFF");
    const key slots[] = {{0, 3}, {0, 0}, {0, 1}};
    assert_slots("lru", c, slots, 3);
    ck_assert_int_eq(ferry_cache_find(c, 0, 2, NULL), -1);
    ferry_cache_layer_stats st;
    ferry_cache_get_stats(c, &st);
    assert_stats("lru", &st, (ferry_cache_layer_stats){.hits = 2, .misses = 6, .evictions = 3});
    ferry_cache_destroy(c);
}
END_TEST

START_TEST(test_cache_lfu_sequence)
{
    /* Uses since load: 0 has 3 (slot 0), 1 has 1@4 (slot 1), 2 has 1@5 (slot 2).
     * Step 6, expert 3: fewest uses are 1 and 2 (1 each); the tie goes to the least recent,
     *   1@4 -> slot 1 = 3 (1 use, @6).
     * Step 7, expert 0: hit (lru missed here), 0 now has 4 uses.
     * Step 8, expert 1: fewest are 2 (1, @5) and 3 (1, @6) -> evict 2: slot 2 = 1.
     * Hits 3, misses 5, evictions 2. */
    ferry_cache *c = make_cache(3, 1, 8, FERRY_POLICY_LFU);
    assert_sequence("lfu", c, g_seq_lru_lfu, 8, "FHHFFFHF");
    const key slots[] = {{0, 0}, {0, 3}, {0, 1}};
    assert_slots("lfu", c, slots, 3);
    ck_assert_int_eq(ferry_cache_find(c, 0, 2, NULL), -1);
    ferry_cache_layer_stats st;
    ferry_cache_get_stats(c, &st);
    assert_stats("lfu", &st, (ferry_cache_layer_stats){.hits = 3, .misses = 5, .evictions = 2});
    ferry_cache_destroy(c);
}
END_TEST

START_TEST(test_cache_lfu_counts_since_load)
{
    /* Two slots, experts 0 0 0 1 1 1 1 2 0 3 0.
     * After step 7: 0 has 3 uses (slot 0), 1 has 4 (slot 1).
     * Step 8, expert 2: evict 0 (3 < 4) -> slot 0 = 2 (1 use).
     * Step 9, expert 0: evict 2 (1 < 4) -> slot 0 = 0, whose count restarts at 1.
     * Step 10, expert 3: evict 0 (1 < 4). Were counts kept across loads, 0 would have 4,
     *   tie with 1 broken by recency (1@7 older than 0@9): 1 would go and step 11 would hit.
     * Step 11, expert 0: miss, evicts 3 (1 < 4).
     * Hits 5 (steps 2, 3, 5, 6, 7), misses 6, evictions 4. */
    static const key seq[] = {{0, 0}, {0, 0}, {0, 0}, {0, 1}, {0, 1}, {0, 1},
                              {0, 1}, {0, 2}, {0, 0}, {0, 3}, {0, 0}};
    ferry_cache *c = make_cache(2, 1, 8, FERRY_POLICY_LFU);
    assert_sequence("lfu since load", c, seq, 11, "FHHFHHHFFFF");
    const key slots[] = {{0, 0}, {0, 1}};
    assert_slots("lfu since load", c, slots, 2);
    ferry_cache_layer_stats st;
    ferry_cache_get_stats(c, &st);
    assert_stats("lfu since load", &st,
                 (ferry_cache_layer_stats){.hits = 5, .misses = 6, .evictions = 4});
    ferry_cache_destroy(c);
}
END_TEST

/* Two layers, four slots: layer 1 loads first, then layer 0 streams through three experts. */
static const key g_seq_layers[] = {{1, 0}, {1, 1}, {0, 0}, {0, 1}, {0, 2},
                                   {1, 0}, {0, 0}, {0, 2}, {1, 1}};

START_TEST(test_cache_layer_lru_sequence)
{
    /* Layer-lru: layer 0 owns slots 0-1, layer 1 slots 2-3.
     * Steps 1-4 fill: (1,0)@1 slot 2, (1,1)@2 slot 3, (0,0)@3 slot 0, (0,1)@4 slot 1.
     * Step 5 (0,2): evicts within layer 0 only: (0,0)@3 -> slot 0 = (0,2)@5.
     * Step 6 (1,0): hit. Step 7 (0,0): evicts (0,1)@4 -> slot 1. Steps 8, 9: hits.
     * Layer 0: 1 hit, 4 misses, 2 evictions; layer 1: 2 hits, 2 misses, 0 evictions. */
    ferry_cache *c = make_cache(4, 2, 4, FERRY_POLICY_LAYER_LRU);
    assert_sequence("layer-lru", c, g_seq_layers, 9, "FFFFFHFHH");
    const key slots[] = {{0, 2}, {0, 0}, {1, 0}, {1, 1}};
    assert_slots("layer-lru", c, slots, 4);
    ferry_cache_layer_stats st[2];
    ferry_cache_get_stats(c, st);
    assert_stats("layer-lru layer 0", &st[0],
                 (ferry_cache_layer_stats){.hits = 1, .misses = 4, .evictions = 2});
    assert_stats("layer-lru layer 1", &st[1],
                 (ferry_cache_layer_stats){.hits = 2, .misses = 2, .evictions = 0});
    ferry_cache_destroy(c);

    /* The same sequence under global lru: step 5 evicts (1,0)@1 (slot 0), step 6 (1,0) misses
     * and evicts (1,1)@2 (slot 1), steps 7, 8 hit, step 9 (1,1) evicts (0,1)@4 (slot 3).
     * Layer 0: 2 hits, 3 misses, 1 eviction; layer 1: 0 hits, 4 misses, 2 evictions. */
    c = make_cache(4, 2, 4, FERRY_POLICY_LRU);
    assert_sequence("lru on layers", c, g_seq_layers, 9, "FFFFFFHHF");
    const key lru_slots[] = {{0, 2}, {1, 0}, {0, 0}, {1, 1}};
    assert_slots("lru on layers", c, lru_slots, 4);
    ferry_cache_get_stats(c, st);
    assert_stats("lru layer 0", &st[0],
                 (ferry_cache_layer_stats){.hits = 2, .misses = 3, .evictions = 1});
    assert_stats("lru layer 1", &st[1],
                 (ferry_cache_layer_stats){.hits = 0, .misses = 4, .evictions = 2});
    ferry_cache_destroy(c);
}
END_TEST

START_TEST(test_cache_layer_lru_partition)
{
    /* 8 slots over 3 layers: floor(8 / 3) = 2 each, the remainder 2 to layers 0 and 1:
     * layer 0 = slots 0-2, layer 1 = slots 3-5, layer 2 = slots 6-7. Pinning a layer's
     * experts one after another fills exactly its range, then fails naming the layer. */
    ferry_cache *c = make_cache(8, 3, 8, FERRY_POLICY_LAYER_LRU);
    const int32_t begin[] = {0, 3, 6}, size[] = {3, 3, 2};
    for (int32_t l = 0; l < 3; l++) {
        for (int32_t e = 0; e < size[l]; e++) {
            int32_t s;
            ferry_cache_result r;
            ck_assert_msg(ferry_cache_acquire(c, l, e, 1, &s, &r) == FERRY_OK, "%s",
                          ferry_last_error());
            ck_assert_int_eq(r, FERRY_CACHE_FILL);
            ck_assert_int_eq(s, begin[l] + e);
            ferry_cache_mark_ready(c, s);
        }
        int32_t s = -7;
        ferry_cache_result r = FERRY_CACHE_HIT;
        ck_assert_int_eq(ferry_cache_acquire(c, l, 7, 1, &s, &r), FERRY_ERR_NOMEM);
        char want[128];
        snprintf(want, sizeof want,
                 "expert cache: all %d slots of layer %d are in use (pinned or in flight); "
                 "need at least %d",
                 (int)size[l], (int)l, (int)size[l] + 1);
        ck_assert_str_eq(ferry_last_error(), want);
        ck_assert_int_eq(s, -7);
        ck_assert_int_eq(r, FERRY_CACHE_HIT);
    }
    ck_assert_msg(ferry_cache_check(c, 0) == FERRY_OK, "%s", ferry_last_error());
    /* Releasing one slot of layer 1 lets layer 1, and only layer 1, load there. */
    ferry_cache_release(c, 4);
    int32_t s;
    ferry_cache_result r;
    ck_assert_int_eq(ferry_cache_acquire(c, 0, 7, 1, &s, &r), FERRY_ERR_NOMEM);
    ck_assert_int_eq(ferry_cache_acquire(c, 1, 7, 1, &s, &r), FERRY_OK);
    ck_assert_int_eq(s, 4);
    ck_assert_int_eq(r, FERRY_CACHE_FILL);
    ferry_cache_destroy(c);

    /* One slot per layer is enough. */
    c = make_cache(3, 3, 2, FERRY_POLICY_LAYER_LRU);
    ck_assert_msg(ferry_cache_check(c, 1) == FERRY_OK, "%s", ferry_last_error());
    ferry_cache_destroy(c);
}
END_TEST

START_TEST(test_cache_predicted_sequence)
{
    /* Three slots, one layer; expert 0 scores 0.9, the rest 0. Experts 0 1 2 3 4 0:
     * step 4 (3): lowest score is 0 for 1@2 and 2@3 -> the older, 1, goes (slot 1);
     * step 5 (4): 2@3 and 3@4 score 0 -> 2 goes (slot 2); step 6 (0): hit, protected.
     * Lru would have evicted 0 at step 4 and missed at step 6. */
    static const key seq[] = {{0, 0}, {0, 1}, {0, 2}, {0, 3}, {0, 4}, {0, 0}};
    ferry_cache *c = make_cache(3, 1, 8, FERRY_POLICY_PREDICTED);
    float scores[8] = {0.9f};
    ferry_cache_set_scores(c, 0, scores);
    assert_sequence("predicted", c, seq, 6, "FFFFFH");
    const key slots[] = {{0, 0}, {0, 3}, {0, 4}};
    assert_slots("predicted", c, slots, 3);

    /* New scores: 0 -> 0.1, 3 -> 0.9, 4 -> 0.5, others 0. Experts 5 0 3:
     * step 7 (5): lowest is 0 (0.1) -> slot 0 = 5; step 8 (0): lowest is 5 (0) -> slot 0 = 0;
     * step 9 (3): hit. Over all nine steps: hits 2, misses 7, evictions 4. */
    static const key seq2[] = {{0, 5}, {0, 0}, {0, 3}};
    float scores2[8] = {0.1f, 0, 0, 0.9f, 0.5f, 0, 0, 0};
    ferry_cache_set_scores(c, 0, scores2);
    assert_sequence("predicted rescored", c, seq2, 3, "FFH");
    assert_slots("predicted rescored", c, slots, 3);
    ferry_cache_layer_stats st;
    ferry_cache_get_stats(c, &st);
    assert_stats("predicted", &st,
                 (ferry_cache_layer_stats){.hits = 2, .misses = 7, .evictions = 4});
    ferry_cache_destroy(c);

    /* The same first six steps under lru, and under predicted with the scores reset (NULL):
     * both evict 0 at step 4 and miss it at step 6. */
    c = make_cache(3, 1, 8, FERRY_POLICY_LRU);
    ferry_cache_set_scores(c, 0, scores);
    assert_sequence("lru ignores scores", c, seq, 6, "FFFFFF");
    ferry_cache_destroy(c);
    c = make_cache(3, 1, 8, FERRY_POLICY_PREDICTED);
    ferry_cache_set_scores(c, 0, scores);
    ferry_cache_set_scores(c, 0, NULL);
    assert_sequence("predicted, scores reset", c, seq, 6, "FFFFFF");
    ferry_cache_destroy(c);
}
END_TEST

/* Acquires (layer, expert) on demand and checks the result and slot (slot -1: any). */
static int32_t acquire_expect(ferry_cache *c, int32_t layer, int32_t expert, int demand,
                              ferry_cache_result want, int32_t want_slot)
{
    int32_t s = -1;
    ferry_cache_result r;
    ck_assert_msg(ferry_cache_acquire(c, layer, expert, demand, &s, &r) == FERRY_OK,
                  "(%d, %d): %s", (int)layer, (int)expert, ferry_last_error());
    ck_assert_msg(r == want, "(%d, %d): result %c, expected %c", (int)layer, (int)expert,
                  result_char(r), result_char(want));
    if (want_slot >= 0)
        ck_assert_msg(s == want_slot, "(%d, %d): slot %d, expected %d", (int)layer,
                      (int)expert, (int)s, (int)want_slot);
    return s;
}

START_TEST(test_cache_pinned_never_evicted)
{
    ferry_cache *c = make_cache(3, 1, 8, FERRY_POLICY_LRU);
    /* (0,0) is the least recent but stays pinned, so the miss on 3 takes (0,1) instead. */
    acquire_expect(c, 0, 0, 1, FERRY_CACHE_FILL, 0);
    ferry_cache_mark_ready(c, 0);
    for (int32_t e = 1; e <= 2; e++) {
        acquire_expect(c, 0, e, 1, FERRY_CACHE_FILL, e);
        ferry_cache_mark_ready(c, e);
        ferry_cache_release(c, e);
    }
    acquire_expect(c, 0, 3, 1, FERRY_CACHE_FILL, 1);
    ferry_cache_mark_ready(c, 1);
    int ready = 0;
    ck_assert_int_eq(ferry_cache_find(c, 0, 0, &ready), 0);
    ck_assert_int_eq(ready, 1);
    ck_assert_int_eq(ferry_cache_find(c, 0, 1, NULL), -1);
    /* The next miss has one choice left, slot 2; kept pinned and in flight. */
    acquire_expect(c, 0, 4, 1, FERRY_CACHE_FILL, 2);
    ready = 1;
    ck_assert_int_eq(ferry_cache_find(c, 0, 4, &ready), 2);
    ck_assert_int_eq(ready, 0);

    /* Every slot pinned: the documented status and message, nothing written or counted. */
    ferry_cache_layer_stats before, after;
    ferry_cache_get_stats(c, &before);
    int32_t s = -7;
    ferry_cache_result r = FERRY_CACHE_PENDING;
    ck_assert_int_eq(ferry_cache_acquire(c, 0, 5, 1, &s, &r), FERRY_ERR_NOMEM);
    ck_assert_str_eq(ferry_last_error(), "expert cache: all 3 slots are in use (pinned or in "
                                         "flight); need at least 4");
    ck_assert_int_eq(s, -7);
    ck_assert_int_eq(r, FERRY_CACHE_PENDING);
    ferry_cache_get_stats(c, &after);
    assert_stats("failed acquire counts nothing", &after, before);
    ck_assert_int_eq(ferry_cache_acquire(c, 0, 6, 0, &s, &r), FERRY_ERR_NOMEM);
    /* A resident expert is still found while everything is pinned. */
    acquire_expect(c, 0, 3, 1, FERRY_CACHE_HIT, 1);
    ferry_cache_release(c, 1);
    ck_assert_msg(ferry_cache_check(c, 0) == FERRY_OK, "%s", ferry_last_error());

    /* Unpinning (0,0) makes it the only victim. */
    ferry_cache_release(c, 0);
    acquire_expect(c, 0, 5, 1, FERRY_CACHE_FILL, 0);
    ck_assert_int_eq(ferry_cache_find(c, 0, 0, NULL), -1);
    ferry_cache_destroy(c);
}
END_TEST

START_TEST(test_cache_filling_never_evicted)
{
    /* A slot in flight is not taken even when nobody pins it (a prefetcher may drop its
     * pin before the copy lands): the fill must finish first. */
    ferry_cache *c = make_cache(3, 1, 8, FERRY_POLICY_LRU);
    acquire_expect(c, 0, 0, 0, FERRY_CACHE_FILL, 0);
    ferry_cache_release(c, 0); /* in flight, unpinned, and the least recent */
    for (int32_t e = 1; e <= 4; e++) {
        int32_t s = acquire_expect(c, 0, e, 1, FERRY_CACHE_FILL, -1);
        ck_assert_int_ne(s, 0);
        ferry_cache_mark_ready(c, s);
        ferry_cache_release(c, s);
    }
    int ready = 1;
    ck_assert_int_eq(ferry_cache_find(c, 0, 0, &ready), 0);
    ck_assert_int_eq(ready, 0);
    int32_t a = acquire_expect(c, 0, 5, 1, FERRY_CACHE_FILL, -1);
    int32_t b = acquire_expect(c, 0, 6, 1, FERRY_CACHE_FILL, -1);
    ck_assert(a != 0 && b != 0 && a != b);
    int32_t s;
    ferry_cache_result r;
    ck_assert_int_eq(ferry_cache_acquire(c, 0, 7, 1, &s, &r), FERRY_ERR_NOMEM);
    assert_error_has("in flight", "all 3 slots are in use");
    /* Once it lands it is an ordinary unpinned slot and the next miss takes it. */
    ferry_cache_mark_ready(c, 0);
    acquire_expect(c, 0, 7, 1, FERRY_CACHE_FILL, 0);
    ferry_cache_destroy(c);
}
END_TEST

typedef struct {
    ferry_cache *c;
    int32_t layer, expert;
    ferry_cache_result result;
    int32_t slot;
    ferry_status wait_status;
    char message[256];
    atomic_int acquired, done;
} waiter;

/* Demand-acquires, then blocks in wait_ready; records what it saw. */
static void *waiter_main(void *arg)
{
    waiter *w = arg;
    if (ferry_cache_acquire(w->c, w->layer, w->expert, 1, &w->slot, &w->result) != FERRY_OK) {
        snprintf(w->message, sizeof w->message, "acquire: %s", ferry_last_error());
        w->wait_status = FERRY_ERR_INVALID;
        atomic_store(&w->acquired, 1);
        atomic_store(&w->done, 1);
        return NULL;
    }
    atomic_store(&w->acquired, 1);
    w->wait_status = ferry_cache_wait_ready(w->c, w->slot);
    snprintf(w->message, sizeof w->message, "%s", ferry_last_error());
    atomic_store(&w->done, 1);
    return NULL;
}

/* Starts n waiters on (layer, expert) and returns once all have acquired and, by all
 * appearances, block: none finished within 50 ms. */
static void start_waiters(waiter *w, pthread_t *t, int n, ferry_cache *c, int32_t layer,
                          int32_t expert)
{
    for (int i = 0; i < n; i++) {
        memset(&w[i], 0, sizeof w[i]);
        w[i].c = c;
        w[i].layer = layer;
        w[i].expert = expert;
        w[i].slot = -1;
        atomic_init(&w[i].acquired, 0);
        atomic_init(&w[i].done, 0);
        ck_assert_int_eq(pthread_create(&t[i], NULL, waiter_main, &w[i]), 0);
    }
    for (int i = 0; i < n; i++)
        while (!atomic_load(&w[i].acquired))
            sleep_ms(1);
    sleep_ms(50);
    for (int i = 0; i < n; i++)
        ck_assert_msg(!atomic_load(&w[i].done), "waiter %d did not block: %s", i,
                      w[i].message);
}

START_TEST(test_cache_pending_wait_ready_threads)
{
    ferry_cache *c = make_cache(2, 1, 4, FERRY_POLICY_LRU);
    int32_t s = acquire_expect(c, 0, 1, 1, FERRY_CACHE_FILL, 0);
    waiter w[2];
    pthread_t t[2];
    start_waiters(w, t, 2, c, 0, 1);
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(w[i].result, FERRY_CACHE_PENDING);
        ck_assert_int_eq(w[i].slot, s);
    }
    ferry_cache_mark_ready(c, s);
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(pthread_join(t[i], NULL), 0);
        ck_assert_msg(w[i].wait_status == FERRY_OK, "waiter %d: %s", i, w[i].message);
    }
    ck_assert_int_eq(ferry_cache_wait_ready(c, s), FERRY_OK);
    /* Three pins: the filler's and the two waiters'. A pending demand is a hit. */
    ferry_cache_layer_stats st;
    ferry_cache_get_stats(c, &st);
    assert_stats("pending", &st,
                 (ferry_cache_layer_stats){.hits = 2, .hits_pending = 2, .misses = 1});
    for (int i = 0; i < 3; i++)
        ferry_cache_release(c, s);
    ck_assert_msg(ferry_cache_check(c, 1) == FERRY_OK, "%s", ferry_last_error());
    acquire_expect(c, 0, 1, 1, FERRY_CACHE_HIT, s);
    ferry_cache_release(c, s);
    ferry_cache_destroy(c);
}
END_TEST

START_TEST(test_cache_mark_failed_wakes_waiters)
{
    ferry_cache *c = make_cache(2, 1, 4, FERRY_POLICY_LRU);
    acquire_expect(c, 0, 0, 1, FERRY_CACHE_FILL, 0);
    ferry_cache_mark_ready(c, 0);
    ferry_cache_release(c, 0);
    int32_t s = acquire_expect(c, 0, 3, 1, FERRY_CACHE_FILL, 1);
    waiter w[2];
    pthread_t t[2];
    start_waiters(w, t, 2, c, 0, 3);
    ferry_cache_mark_failed(c, s);
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(pthread_join(t[i], NULL), 0);
        ck_assert_int_eq(w[i].result, FERRY_CACHE_PENDING);
        ck_assert_msg(w[i].wait_status == FERRY_ERR_IO, "waiter %d: status %d", i,
                      (int)w[i].wait_status);
        ck_assert_str_eq(w[i].message, "expert cache: layer 0 expert 3 failed to load");
    }
    ck_assert_int_eq(ferry_cache_wait_ready(c, s), FERRY_ERR_IO);
    assert_error_has("filler's wait", "layer 0 expert 3 failed to load");
    /* The slot is empty and the expert gone. */
    int32_t l, e;
    ferry_cache_slot_owner(c, s, &l, &e);
    ck_assert(l == -1 && e == -1);
    ck_assert_int_eq(ferry_cache_find(c, 0, 3, NULL), -1);
    ck_assert_msg(ferry_cache_check(c, 0) == FERRY_OK, "%s", ferry_last_error());
    /* While the three pins stay, the failed slot is not reused: a miss evicts (0,0). */
    int32_t other = acquire_expect(c, 0, 2, 1, FERRY_CACHE_FILL, 0);
    ferry_cache_mark_ready(c, other);
    ferry_cache_release(c, other);
    for (int i = 0; i < 3; i++)
        ferry_cache_release(c, s);
    ck_assert_msg(ferry_cache_check(c, 1) == FERRY_OK, "%s", ferry_last_error());
    /* Unpinned, it is a free slot again and is taken before any eviction. */
    acquire_expect(c, 0, 3, 1, FERRY_CACHE_FILL, s);
    ferry_cache_mark_ready(c, s);
    ferry_cache_release(c, s);
    ck_assert_int_eq(ferry_cache_find(c, 0, 2, NULL), 0);
    ferry_cache_destroy(c);
}
END_TEST

START_TEST(test_cache_prefetch_accounting)
{
    ferry_cache *c = make_cache(2, 2, 8, FERRY_POLICY_LRU);
    ferry_cache_layer_stats st[2];
    /* 1. prefetch 0 (slot 0): issued. 2, 3. two demands: hits, and the first is "used". */
    acquire_expect(c, 0, 0, 0, FERRY_CACHE_FILL, 0);
    ferry_cache_mark_ready(c, 0);
    ferry_cache_release(c, 0);
    for (int i = 0; i < 2; i++) {
        acquire_expect(c, 0, 0, 1, FERRY_CACHE_HIT, 0);
        ferry_cache_release(c, 0);
    }
    ferry_cache_get_stats(c, st);
    assert_stats("prefetch then demand", &st[0],
                 (ferry_cache_layer_stats){.hits = 2, .prefetch_issued = 1, .prefetch_used = 1});
    /* 4. prefetch 1 (slot 1, stamped at load, @4). 5. demand 0 (@5). 6. prefetching 1 again
     * counts nothing and does not refresh it, so 1 stays the least recent. 7. demand 2
     * misses and evicts 1, never used: wasted. 8. demand 3 evicts 0 (used: no waste). */
    acquire_expect(c, 0, 1, 0, FERRY_CACHE_FILL, 1);
    ferry_cache_mark_ready(c, 1);
    ferry_cache_release(c, 1);
    acquire_expect(c, 0, 0, 1, FERRY_CACHE_HIT, 0);
    ferry_cache_release(c, 0);
    acquire_expect(c, 0, 1, 0, FERRY_CACHE_HIT, 1);
    ferry_cache_release(c, 1);
    for (int32_t e = 2; e <= 3; e++) {
        int32_t s = acquire_expect(c, 0, e, 1, FERRY_CACHE_FILL, e == 2 ? 1 : 0);
        ferry_cache_mark_ready(c, s);
        ferry_cache_release(c, s);
    }
    ferry_cache_get_stats(c, st);
    assert_stats("prefetch evicted unused", &st[0],
                 (ferry_cache_layer_stats){.hits = 3, .misses = 2, .prefetch_issued = 2,
                                           .prefetch_used = 1, .prefetch_wasted = 1,
                                           .evictions = 2});
    /* 9. prefetch 4 evicts 2 (slot 1, older than 3 in slot 0); a demand finds it in
     * flight: a pending hit, and the prefetch is used. */
    acquire_expect(c, 0, 4, 0, FERRY_CACHE_FILL, 1);
    acquire_expect(c, 0, 4, 1, FERRY_CACHE_PENDING, 1);
    ferry_cache_mark_ready(c, 1);
    ck_assert_int_eq(ferry_cache_wait_ready(c, 1), FERRY_OK);
    ferry_cache_release(c, 1);
    ferry_cache_release(c, 1);
    /* 10. prefetch 5 evicts 3 (slot 0) and fails: wasted, and slot 0 is free. */
    acquire_expect(c, 0, 5, 0, FERRY_CACHE_FILL, 0);
    ferry_cache_mark_failed(c, 0);
    ferry_cache_release(c, 0);
    ferry_cache_get_stats(c, st);
    assert_stats("pending use and failed prefetch", &st[0],
                 (ferry_cache_layer_stats){.hits = 4, .hits_pending = 1, .misses = 2,
                                           .prefetch_issued = 4, .prefetch_used = 2,
                                           .prefetch_wasted = 2, .evictions = 4});
    /* 11. prefetch (1,0) takes the free slot 0. 12. demand (0,6) evicts the older (0,4)
     * (slot 1). 13. demand (0,7) evicts (1,0), never used: layer 1's waste and eviction. */
    acquire_expect(c, 1, 0, 0, FERRY_CACHE_FILL, 0);
    ferry_cache_mark_ready(c, 0);
    ferry_cache_release(c, 0);
    for (int32_t e = 6; e <= 7; e++) {
        int32_t s = acquire_expect(c, 0, e, 1, FERRY_CACHE_FILL, e == 6 ? 1 : 0);
        ferry_cache_mark_ready(c, s);
        ferry_cache_release(c, s);
    }
    ferry_cache_get_stats(c, st);
    assert_stats("layer 0", &st[0],
                 (ferry_cache_layer_stats){.hits = 4, .hits_pending = 1, .misses = 4,
                                           .prefetch_issued = 4, .prefetch_used = 2,
                                           .prefetch_wasted = 2, .evictions = 5});
    assert_stats("layer 1", &st[1],
                 (ferry_cache_layer_stats){.prefetch_issued = 1, .prefetch_wasted = 1,
                                           .evictions = 1});
    ferry_cache_reset_stats(c);
    ferry_cache_get_stats(c, st);
    assert_stats("reset 0", &st[0], (ferry_cache_layer_stats){0});
    assert_stats("reset 1", &st[1], (ferry_cache_layer_stats){0});
    /* Reset keeps the contents. */
    acquire_expect(c, 0, 7, 1, FERRY_CACHE_HIT, 0);
    ferry_cache_release(c, 0);
    ck_assert_msg(ferry_cache_check(c, 1) == FERRY_OK, "%s", ferry_last_error());
    ferry_cache_destroy(c);
}
END_TEST

static char g_log[1024];
static int g_n_logs;

static void capture_log(ferry_log_level level, const char *msg, void *user)
{
    (void)user;
    if (level == FERRY_LOG_ERROR) {
        snprintf(g_log, sizeof g_log, "%s", msg);
        g_n_logs++;
    }
}

START_TEST(test_cache_misuse_is_logged_and_ignored)
{
    ferry_set_log(FERRY_LOG_WARN, capture_log, NULL);
    ferry_cache *c = make_cache(2, 1, 4, FERRY_POLICY_LRU);
    struct {
        void (*fn)(ferry_cache *, int32_t);
        int32_t slot;
        const char *needle;
    } cases[] = {
        {ferry_cache_release, 0, "release of slot 0, which is not pinned"},
        {ferry_cache_release, 2, "release of slot 2, out of range [0, 2)"},
        {ferry_cache_release, -1, "release of slot -1, out of range"},
        {ferry_cache_mark_ready, 1, "mark_ready of slot 1, which is not being filled"},
        {ferry_cache_mark_failed, 0, "mark_failed of slot 0, which is not being filled"},
        {ferry_cache_mark_ready, 5, "mark_ready of slot 5, out of range"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int before = g_n_logs;
        cases[i].fn(c, cases[i].slot);
        ck_assert_int_eq(g_n_logs, before + 1);
        ck_assert_msg(strstr(g_log, cases[i].needle) != NULL, "log \"%s\" lacks \"%s\"", g_log,
                      cases[i].needle);
    }
    ferry_cache_set_scores(c, 3, NULL);
    ck_assert_msg(strstr(g_log, "scores for layer 3, out of range") != NULL, "%s", g_log);
    /* A ready slot is not failed by a stray mark_failed, nor its pin count driven negative. */
    acquire_expect(c, 0, 1, 1, FERRY_CACHE_FILL, 0);
    ferry_cache_mark_ready(c, 0);
    ferry_cache_mark_failed(c, 0);
    ferry_cache_release(c, 0);
    ferry_cache_release(c, 0);
    ck_assert_msg(ferry_cache_check(c, 1) == FERRY_OK, "%s", ferry_last_error());
    acquire_expect(c, 0, 1, 1, FERRY_CACHE_HIT, 0);
    ferry_cache_release(c, 0);

    ck_assert_int_eq(ferry_cache_wait_ready(c, 1), FERRY_ERR_IO);
    assert_error_has("never filled", "expert cache: slot 1 holds no expert");
    ck_assert_int_eq(ferry_cache_wait_ready(c, 2), FERRY_ERR_INVALID);
    assert_error_has("wait out of range", "slot 2 out of range [0, 2)");
    ck_assert_int_eq(ferry_cache_find(c, 0, 4, NULL), -1);
    ck_assert_int_eq(ferry_cache_find(c, -1, 0, NULL), -1);
    int32_t l = 9, e = 9;
    ferry_cache_slot_owner(c, 7, &l, &e);
    ck_assert(l == -1 && e == -1);
    ferry_cache_destroy(c);
    ferry_cache_destroy(NULL);
    ferry_set_log(FERRY_LOG_WARN, NULL, NULL);
}
END_TEST

START_TEST(test_cache_rejects_bad_params)
{
    static const struct {
        ferry_cache_params p;
        const char *needle;
    } bad[] = {
        {{0, 2, 8, FERRY_POLICY_LRU}, "n_slots must be >= 1, got 0"},
        {{-3, 2, 8, FERRY_POLICY_LRU}, "n_slots must be >= 1, got -3"},
        {{4, 0, 8, FERRY_POLICY_LRU}, "n_layers must be >= 1, got 0"},
        {{4, 2, -1, FERRY_POLICY_LFU}, "n_experts must be >= 1, got -1"},
        {{4, 65536, 65536, FERRY_POLICY_LRU}, "n_layers 65536 * n_experts 65536 exceeds"},
        {{4, 2, 8, (ferry_cache_policy)42}, "policy 42 is not one of lru, lfu, layer-lru, "
                                            "predicted"},
        {{3, 4, 8, FERRY_POLICY_LAYER_LRU}, "policy layer-lru needs at least one slot per "
                                            "layer: n_slots 3 < n_layers 4"},
    };
    static char sentinel;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ferry_cache *c = (ferry_cache *)&sentinel;
        ck_assert_int_eq(ferry_cache_create(&bad[i].p, &c), FERRY_ERR_INVALID);
        ck_assert_ptr_eq(c, (ferry_cache *)&sentinel);
        assert_error_has("bad params", bad[i].needle);
    }
    ferry_cache *c = NULL;
    ck_assert_int_eq(ferry_cache_create(NULL, &c), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_cache_create(&bad[0].p, NULL), FERRY_ERR_INVALID);

    /* Acquire's arguments. */
    c = make_cache(2, 2, 4, FERRY_POLICY_LRU);
    int32_t s = -7;
    ferry_cache_result r = FERRY_CACHE_PENDING;
    ck_assert_int_eq(ferry_cache_acquire(c, 2, 0, 1, &s, &r), FERRY_ERR_INVALID);
    assert_error_has("layer", "expert cache: layer 2 out of range [0, 2)");
    ck_assert_int_eq(ferry_cache_acquire(c, 1, 4, 1, &s, &r), FERRY_ERR_INVALID);
    assert_error_has("expert", "expert cache: layer 1 expert 4 out of range [0, 4)");
    ck_assert_int_eq(ferry_cache_acquire(c, 0, -1, 1, &s, &r), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_cache_acquire(c, 0, 0, 1, NULL, &r), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_cache_acquire(c, 0, 0, 1, &s, NULL), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_cache_acquire(NULL, 0, 0, 1, &s, &r), FERRY_ERR_INVALID);
    ck_assert_int_eq(s, -7);
    ck_assert_int_eq(r, FERRY_CACHE_PENDING);
    ck_assert_msg(ferry_cache_check(c, 1) == FERRY_OK, "%s", ferry_last_error());
    ferry_cache_destroy(c);
}
END_TEST

START_TEST(test_cache_policy_names)
{
    static const char *names[] = {"lru", "lfu", "layer-lru", "predicted"};
    for (int i = 0; i < 4; i++) {
        ferry_cache_policy p = (ferry_cache_policy)99;
        ck_assert_int_eq(ferry_cache_policy_parse(names[i], &p), FERRY_OK);
        ck_assert_int_eq(p, i);
        ck_assert_str_eq(ferry_cache_policy_name(p), names[i]);
    }
    ck_assert_str_eq(ferry_cache_policy_name((ferry_cache_policy)7), "unknown");
    static const char *bad[] = {"fifo", "LRU", "", "lru ", "layer_lru"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ferry_cache_policy p = (ferry_cache_policy)99;
        ck_assert_int_eq(ferry_cache_policy_parse(bad[i], &p), FERRY_ERR_INVALID);
        ck_assert_int_eq(p, 99);
        char want[128];
        snprintf(want, sizeof want,
                 "expert cache: unknown policy '%s'; valid: lru, lfu, layer-lru, predicted",
                 bad[i]);
        ck_assert_str_eq(ferry_last_error(), want);
    }
    ferry_cache_policy p;
    ck_assert_int_eq(ferry_cache_policy_parse(NULL, &p), FERRY_ERR_INVALID);
    assert_error_has("NULL policy", "valid: lru, lfu, layer-lru, predicted");
    ck_assert_int_eq(ferry_cache_policy_parse("lru", NULL), FERRY_ERR_INVALID);
}
END_TEST

/* ---- concurrent stress ------------------------------------------------------------ */

#define STRESS_LAYERS 2
#define STRESS_EXPERTS 6
#define STRESS_SLOTS 4
#define STRESS_WORKERS 4
#define STRESS_ITERS 4000
#define QUEUE_CAP 64

typedef struct {
    ferry_cache *c;
    /* Fill requests, handed from the workers to the filler thread. */
    pthread_mutex_t mu;
    pthread_cond_t nonempty;
    int32_t queue[QUEUE_CAP];
    int head, count, stop;
    int64_t n_failed; /* fills the filler failed (filler thread only until joined) */
    /* The first problem a thread saw (Check's asserts belong on the test's thread). */
    char problem[512];
    atomic_int has_problem;
} stress_shared;

typedef struct {
    stress_shared *sh;
    uint64_t rng;
    int64_t demand[STRESS_LAYERS], demand_fills[STRESS_LAYERS], prefetch_fills[STRESS_LAYERS];
    int64_t n_busy; /* acquires refused with every slot in use */
} stress_worker;

static void report(stress_shared *sh, const char *fmt, ...) FERRY_PRINTF(2, 3);

static void report(stress_shared *sh, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    pthread_mutex_lock(&sh->mu);
    if (!atomic_load(&sh->has_problem))
        vsnprintf(sh->problem, sizeof sh->problem, fmt, ap);
    atomic_store(&sh->has_problem, 1);
    pthread_mutex_unlock(&sh->mu);
    va_end(ap);
}

static void queue_push(stress_shared *sh, int32_t slot)
{
    pthread_mutex_lock(&sh->mu);
    if (sh->count == QUEUE_CAP) {
        pthread_mutex_unlock(&sh->mu);
        report(sh, "fill queue overflow at slot %d", (int)slot);
        ferry_cache_mark_failed(sh->c, slot);
        return;
    }
    sh->queue[(sh->head + sh->count) % QUEUE_CAP] = slot;
    sh->count++;
    pthread_cond_signal(&sh->nonempty);
    pthread_mutex_unlock(&sh->mu);
}

/* Completes fills in arrival order; one in 16 fails. Runs until stopped and drained. */
static void *filler_main(void *arg)
{
    stress_shared *sh = arg;
    uint64_t rng = 99;
    for (;;) {
        pthread_mutex_lock(&sh->mu);
        while (sh->count == 0 && !sh->stop)
            pthread_cond_wait(&sh->nonempty, &sh->mu);
        if (sh->count == 0) {
            pthread_mutex_unlock(&sh->mu);
            return NULL;
        }
        int32_t slot = sh->queue[sh->head];
        sh->head = (sh->head + 1) % QUEUE_CAP;
        sh->count--;
        pthread_mutex_unlock(&sh->mu);
        if (tu_rand_u64(&rng) % 4 == 0)
            sched_yield();
        if (tu_rand_u64(&rng) % 16 == 0) {
            ferry_cache_mark_failed(sh->c, slot);
            sh->n_failed++;
        } else {
            ferry_cache_mark_ready(sh->c, slot);
        }
    }
}

/* Each iteration pins one or two random experts (like top-2 routing), mostly on demand,
 * sometimes as a prefetch; hands FILLs to the filler; waits for in-flight ones; checks
 * that a pinned slot keeps its owner; then releases everything. */
static void *worker_main(void *arg)
{
    stress_worker *w = arg;
    stress_shared *sh = w->sh;
    ferry_cache *c = sh->c;
    for (int it = 0; it < STRESS_ITERS && !atomic_load(&sh->has_problem); it++) {
        int32_t held[2], n_held = 0;
        int n_want = 1 + (int)(tu_rand_u64(&w->rng) % 2);
        for (int k = 0; k < n_want; k++) {
            int32_t l = (int32_t)(tu_rand_u64(&w->rng) % STRESS_LAYERS);
            int32_t e = (int32_t)(tu_rand_u64(&w->rng) % STRESS_EXPERTS);
            int demand = tu_rand_u64(&w->rng) % 4 != 0;
            if (l == 1 && e == 0 && tu_rand_u64(&w->rng) % 8 == 0) {
                float scores[STRESS_EXPERTS];
                for (int i = 0; i < STRESS_EXPERTS; i++)
                    scores[i] = tu_rand_uniform(&w->rng, 0, 1);
                ferry_cache_set_scores(c, l, scores);
            }
            int32_t s;
            ferry_cache_result r;
            ferry_status st = ferry_cache_acquire(c, l, e, demand, &s, &r);
            if (st == FERRY_ERR_NOMEM) {
                if (!strstr(ferry_last_error(), "are in use (pinned or in flight)"))
                    report(sh, "busy acquire of (%d, %d): %s", (int)l, (int)e,
                           ferry_last_error());
                w->n_busy++;
                sched_yield();
                continue;
            }
            if (st != FERRY_OK) {
                report(sh, "acquire (%d, %d): %s", (int)l, (int)e, ferry_last_error());
                break;
            }
            if (demand)
                w->demand[l]++;
            if (r == FERRY_CACHE_FILL) {
                if (demand)
                    w->demand_fills[l]++;
                else
                    w->prefetch_fills[l]++;
                queue_push(sh, s);
                if (!demand) {
                    /* A prefetcher may drop its pin before the copy lands. */
                    ferry_cache_release(c, s);
                    continue;
                }
            }
            if (r != FERRY_CACHE_HIT && ferry_cache_wait_ready(c, s) != FERRY_OK) {
                /* Failed: the expert left the slot, and the slot, pinned, stays empty. */
                int32_t ol, oe;
                ferry_cache_slot_owner(c, s, &ol, &oe);
                if (ol != -1 || ferry_cache_find(c, l, e, NULL) == s)
                    report(sh, "slot %d failed for (%d, %d) but holds (%d, %d)", (int)s, (int)l,
                           (int)e, (int)ol, (int)oe);
                ferry_cache_release(c, s);
                continue;
            }
            int32_t ol, oe;
            ferry_cache_slot_owner(c, s, &ol, &oe);
            int ready = 0;
            if (ol != l || oe != e || ferry_cache_find(c, l, e, &ready) != s || !ready)
                report(sh, "pinned slot %d for (%d, %d) holds (%d, %d), ready %d", (int)s,
                       (int)l, (int)e, (int)ol, (int)oe, ready);
            held[n_held++] = s;
        }
        for (int k = 0; k < n_held; k++)
            ferry_cache_release(c, held[k]);
    }
    return NULL;
}

START_TEST(test_cache_concurrent_stress)
{
    ferry_cache_policy policy = (ferry_cache_policy)_i;
    ferry_cache *c = make_cache(STRESS_SLOTS, STRESS_LAYERS, STRESS_EXPERTS, policy);
    stress_shared sh;
    memset(&sh, 0, sizeof sh);
    sh.c = c;
    atomic_init(&sh.has_problem, 0);
    ck_assert_int_eq(pthread_mutex_init(&sh.mu, NULL), 0);
    ck_assert_int_eq(pthread_cond_init(&sh.nonempty, NULL), 0);
    stress_worker w[STRESS_WORKERS];
    memset(w, 0, sizeof w);
    pthread_t tw[STRESS_WORKERS], tf;
    ck_assert_int_eq(pthread_create(&tf, NULL, filler_main, &sh), 0);
    for (int i = 0; i < STRESS_WORKERS; i++) {
        w[i].sh = &sh;
        w[i].rng = 1000u + (uint64_t)i * 7919u + (uint64_t)policy;
        ck_assert_int_eq(pthread_create(&tw[i], NULL, worker_main, &w[i]), 0);
    }
    for (int i = 0; i < STRESS_WORKERS; i++)
        ck_assert_int_eq(pthread_join(tw[i], NULL), 0);
    pthread_mutex_lock(&sh.mu);
    sh.stop = 1;
    pthread_cond_signal(&sh.nonempty);
    pthread_mutex_unlock(&sh.mu);
    ck_assert_int_eq(pthread_join(tf, NULL), 0);
    ck_assert_msg(!atomic_load(&sh.has_problem), "%s: %s", ferry_cache_policy_name(policy),
                  sh.problem);

    /* Structure: table and slots agree, nothing pinned or in flight. */
    ck_assert_msg(ferry_cache_check(c, 1) == FERRY_OK, "%s", ferry_last_error());
    int32_t seen[STRESS_LAYERS][STRESS_EXPERTS];
    memset(seen, 0, sizeof seen);
    int64_t n_resident = 0;
    for (int32_t s = 0; s < STRESS_SLOTS; s++) {
        int32_t l, e;
        ferry_cache_slot_owner(c, s, &l, &e);
        if (l < 0)
            continue;
        ck_assert_msg(seen[l][e]++ == 0, "(%d, %d) in two slots", (int)l, (int)e);
        ck_assert_int_eq(ferry_cache_find(c, l, e, NULL), s);
        n_resident++;
    }

    /* Counters: every demand acquire is a hit or a miss; every fill was counted once and
     * ended evicted, failed or still resident. */
    ferry_cache_layer_stats st[STRESS_LAYERS];
    ferry_cache_get_stats(c, st);
    int64_t n_fills = 0, n_evictions = 0, n_busy = 0;
    for (int l = 0; l < STRESS_LAYERS; l++) {
        int64_t demand = 0, demand_fills = 0, prefetch_fills = 0;
        for (int i = 0; i < STRESS_WORKERS; i++) {
            demand += w[i].demand[l];
            demand_fills += w[i].demand_fills[l];
            prefetch_fills += w[i].prefetch_fills[l];
        }
        ck_assert_int_eq(st[l].hits + st[l].misses, demand);
        ck_assert_int_eq(st[l].misses, demand_fills);
        ck_assert_int_eq(st[l].prefetch_issued, prefetch_fills);
        ck_assert(st[l].hits_pending <= st[l].hits);
        ck_assert(st[l].prefetch_used + st[l].prefetch_wasted <= st[l].prefetch_issued);
        n_fills += demand_fills + prefetch_fills;
        n_evictions += st[l].evictions;
    }
    for (int i = 0; i < STRESS_WORKERS; i++)
        n_busy += w[i].n_busy;
    ck_assert_int_eq(n_fills, n_evictions + sh.n_failed + n_resident);
    ck_assert_msg(sh.n_failed > 0 && n_evictions > 0 && n_busy > 0,
                  "the run should exercise failures (%lld), evictions (%lld) and a full "
                  "cache (%lld)",
                  (long long)sh.n_failed, (long long)n_evictions, (long long)n_busy);

    /* Demand-use what is resident: each prefetch is now used or wasted, exactly. */
    for (int32_t s = 0; s < STRESS_SLOTS; s++) {
        int32_t l, e;
        ferry_cache_slot_owner(c, s, &l, &e);
        if (l >= 0) {
            acquire_expect(c, l, e, 1, FERRY_CACHE_HIT, s);
            ferry_cache_release(c, s);
        }
    }
    ferry_cache_get_stats(c, st);
    for (int l = 0; l < STRESS_LAYERS; l++)
        ck_assert_int_eq(st[l].prefetch_issued, st[l].prefetch_used + st[l].prefetch_wasted);
    ck_assert_msg(ferry_cache_check(c, 1) == FERRY_OK, "%s", ferry_last_error());
    pthread_cond_destroy(&sh.nonempty);
    pthread_mutex_destroy(&sh.mu);
    ferry_cache_destroy(c);
}
END_TEST

static Suite *cache_suite(void)
{
    Suite *s = suite_create("cache");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_cache_lru_sequence);
    tcase_add_test(tc, test_cache_lfu_sequence);
    tcase_add_test(tc, test_cache_lfu_counts_since_load);
    tcase_add_test(tc, test_cache_layer_lru_sequence);
    tcase_add_test(tc, test_cache_layer_lru_partition);
    tcase_add_test(tc, test_cache_predicted_sequence);
    tcase_add_test(tc, test_cache_pinned_never_evicted);
    tcase_add_test(tc, test_cache_filling_never_evicted);
    tcase_add_test(tc, test_cache_pending_wait_ready_threads);
    tcase_add_test(tc, test_cache_mark_failed_wakes_waiters);
    tcase_add_test(tc, test_cache_prefetch_accounting);
    tcase_add_test(tc, test_cache_misuse_is_logged_and_ignored);
    tcase_add_test(tc, test_cache_rejects_bad_params);
    tcase_add_test(tc, test_cache_policy_names);
    tcase_add_loop_test(tc, test_cache_concurrent_stress, FERRY_POLICY_LRU,
                        FERRY_POLICY_PREDICTED + 1);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(cache_suite()); }
