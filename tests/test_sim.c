/*
 * tests/test_sim.c: the routing-trace simulator. Belady's MIN on hand-worked sequences
 * (reasoning next to each) and against a plain O(N x slots) implementation on random
 * sequences and on the fixture trace; the real cache and pipeline on a hand-made trace
 * with hand-computed hits and misses; on a slice of the fixture trace, every policy against
 * Belady, LRU and layer-LRU against a plain LRU model of the same demand sequence,
 * determinism, prefetch accounting with a fitted stats predictor, and bad parameters.
 *
 * The fixture replay goes through the real pipeline (two thread hand-offs per miss), so
 * the replays use a slice of FIXTURE_SLICE tokens; Belady runs on the whole trace.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/error.h"
#include "engine/sim.h"
#include "predictor/predictor.h"
#include "predictor/trace.h"
#include "tests/check_util.h"

#define FIXTURE FERRY_SOURCE_DIR "/tests/fixtures/tiny-moe-code.trace"
#define FIXTURE_SLICE 3000

static void assert_error_has(const char *what, const char *needle)
{
    const char *msg = ferry_last_error();
    ck_assert_msg(strstr(msg, needle) != NULL, "%s: error \"%s\" lacks \"%s\"", what, msg, needle);
}

/* Belady by definition, independent of the heap: next uses from a backward scan, the
 * victim by a linear scan of the resident keys. O(N x n_slots). */
static int64_t plain_belady(const int32_t *keys, int64_t n, int32_t n_keys, int32_t n_slots)
{
    int64_t *next = malloc((size_t)(n > 0 ? n : 1) * sizeof *next);
    int64_t *last = malloc((size_t)n_keys * sizeof *last);
    int32_t *res_key = malloc((size_t)n_slots * sizeof *res_key);
    int64_t *res_next = malloc((size_t)n_slots * sizeof *res_next);
    ck_assert(next && last && res_key && res_next);
    for (int32_t k = 0; k < n_keys; k++)
        last[k] = n;
    for (int64_t i = n - 1; i >= 0; i--) {
        next[i] = last[keys[i]];
        last[keys[i]] = i;
    }
    int32_t n_res = 0;
    int64_t misses = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t j = 0;
        while (j < n_res && res_key[j] != keys[i])
            j++;
        if (j == n_res) {
            misses++;
            if (n_res < n_slots) {
                n_res++;
            } else {
                j = 0;
                for (int32_t q = 1; q < n_res; q++)
                    if (res_next[q] > res_next[j])
                        j = q;
            }
            res_key[j] = keys[i];
        }
        res_next[j] = next[i];
    }
    free(next);
    free(last);
    free(res_key);
    free(res_next);
    return misses;
}

/* Plain LRU on a key sequence: misses. O(N x n_slots). */
static int64_t plain_lru(const int32_t *keys, int64_t n, int32_t n_slots)
{
    int32_t *res_key = malloc((size_t)n_slots * sizeof *res_key);
    int64_t *res_used = malloc((size_t)n_slots * sizeof *res_used);
    ck_assert(res_key && res_used);
    int32_t n_res = 0;
    int64_t misses = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t j = 0;
        while (j < n_res && res_key[j] != keys[i])
            j++;
        if (j == n_res) {
            misses++;
            if (n_res < n_slots) {
                n_res++;
            } else {
                j = 0;
                for (int32_t q = 1; q < n_res; q++)
                    if (res_used[q] < res_used[j])
                        j = q;
            }
            res_key[j] = keys[i];
        }
        res_used[j] = i;
    }
    free(res_key);
    free(res_used);
    return misses;
}

static int64_t belady_of(const int32_t *keys, int64_t n, int32_t n_keys, int32_t n_slots)
{
    int64_t m = -1;
    ck_assert_msg(ferry_sim_belady_keys(keys, n, n_keys, n_slots, &m) == FERRY_OK, "%s",
                  ferry_last_error());
    return m;
}

/* The demand keys (layer * n_experts + expert) of the first n_tok tokens, in replay
 * order; only layer `only_layer` (keys renumbered to the expert) when it is >= 0. */
static int32_t *trace_keys(const ferry_trace *tr, int64_t n_tok, int32_t only_layer, int64_t *n_out)
{
    int32_t *keys = malloc((size_t)n_tok * (size_t)tr->n_layers * (size_t)tr->top_k * sizeof *keys);
    ck_assert_ptr_nonnull(keys);
    int64_t n = 0;
    for (int64_t t = 0; t < n_tok; t++)
        for (int32_t l = 0; l < tr->n_layers; l++) {
            if (only_layer >= 0 && l != only_layer)
                continue;
            const uint8_t *ids = ferry_trace_at(tr, t, l);
            for (int32_t j = 0; j < tr->top_k; j++)
                keys[n++] = only_layer >= 0 ? ids[j] : l * tr->n_experts + ids[j];
        }
    *n_out = n;
    return keys;
}

static ferry_trace *load_fixture(void)
{
    ferry_trace *tr = NULL;
    ck_assert_msg(ferry_trace_load(FIXTURE, &tr) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(tr->n_layers, 6);
    ck_assert_int_eq(tr->n_experts, 8);
    ck_assert_int_eq(tr->top_k, 2);
    return tr;
}

static ferry_sim_result run_sim(const ferry_trace *tr, const ferry_sim_params *p)
{
    ferry_sim_result r;
    memset(&r, 0xAB, sizeof r);
    ck_assert_msg(ferry_sim_run(tr, p, &r) == FERRY_OK, "%s", ferry_last_error());
    return r;
}

/* The identities every run's counters satisfy. */
static void assert_accounting(const ferry_trace *tr, const ferry_sim_params *p,
                              const ferry_sim_result *r)
{
    int64_t n_tok = p->n_tokens ? p->n_tokens : tr->n_tokens;
    ck_assert_int_eq(r->lookups, n_tok * tr->n_layers * tr->top_k);
    ck_assert_int_eq(r->hits + r->misses, r->lookups);
    ck_assert_int_eq(r->prefetch_used + r->prefetch_wasted, r->prefetch_issued);
    ck_assert_int_ge(r->prefetch_wasted, r->prefetch_unused_at_end);
    ck_assert_int_ge(r->prefetch_unused_at_end, 0);
    ck_assert_int_eq(r->fills, r->misses + r->prefetch_issued - r->prefetch_cancelled);
    ck_assert_uint_eq(r->bytes_moved, (uint64_t)r->fills * r->expert_bytes);
    ck_assert_uint_eq(r->prefetch_bytes_wasted,
                      (uint64_t)(r->prefetch_wasted - r->prefetch_cancelled) * r->expert_bytes);
    ck_assert_int_le(r->belady_misses, r->lookups);
    ck_assert(r->hit_rate == (double)r->hits / (double)r->lookups);
    ck_assert(r->belady_hit_rate == 1.0 - (double)r->belady_misses / (double)r->lookups);
}

/* ---- Belady ------------------------------------------------------------------------------ */

START_TEST(test_sim_belady_hand_sequences)
{
    /* The cycle 0 1 2 3 repeated three times, 3 slots. LRU always evicts the key needed
     * next: 12 misses out of 12. MIN: 0, 1, 2 cold (3 misses); at i=3 (key 3) the next uses
     * are 0@4, 1@5, 2@6: evict 2; 0@4 and 1@5 hit; at i=6 (key 2) next uses 0@8, 1@9, 3@7:
     * evict 1; 3@7 and 0@8 hit; at i=9 (key 1) next uses 0 never, 2@10, 3@11: evict 0; 2@10
     * and 3@11 hit. 6 misses. */
    int32_t cyc[12] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
    ck_assert_int_eq(belady_of(cyc, 12, 4, 3), 6);
    ck_assert_int_eq(plain_lru(cyc, 12, 3), 12);

    /* The textbook reference string (Silberschatz et al., Operating System Concepts, the
     * page-replacement chapter), 3 frames: OPT 9 faults, LRU 12. MIN step by step (misses
     * marked *): 7* 0* 1* | 2* evicts 7 (7 next at 17, 0 at 4, 1 at 13) | 0 | 3* evicts 1
     * (1 at 13, 0 at 6, 2 at 8) | 0 | 4* evicts 0 (0 at 10, 2 at 8, 3 at 9) | 2 3 |
     * 0* evicts 4 (never again) | 3 2 | 1* evicts 3 (never again; 0 at 15, 2 at 14) | 2 |
     * 0 | 1 | 7* evicts 2 (never again) | 0 1. Misses: 7 0 1 2 3 4 0 1 7 = 9. */
    int32_t book[20] = {7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1};
    ck_assert_int_eq(belady_of(book, 20, 8, 3), 9);
    ck_assert_int_eq(plain_lru(book, 20, 3), 12);

    /* Enough slots for every distinct key: only the cold misses (6 distinct keys). */
    ck_assert_int_eq(belady_of(book, 20, 8, 6), 6);
    ck_assert_int_eq(belady_of(book, 20, 8, 100), 6);
    /* One slot: a miss wherever the key differs from the one before; no key of the string
     * repeats back to back, so all 20 miss. */
    ck_assert_int_eq(belady_of(book, 20, 8, 1), 20);
    int32_t runs[7] = {5, 5, 2, 2, 2, 5, 5};
    ck_assert_int_eq(belady_of(runs, 7, 8, 1), 3);
    /* No accesses, no misses. */
    ck_assert_int_eq(belady_of(NULL, 0, 8, 3), 0);
}
END_TEST

START_TEST(test_sim_belady_matches_plain_on_random)
{
    /* Skewed random keys (a few hot ones) over long sequences, so the heap is compacted
     * many times and ties among keys never used again occur. */
    uint64_t rng = 12345;
    for (int round = 0; round < 200; round++) {
        int32_t n_keys = 1 + (int32_t)(tu_rand_u64(&rng) % 40);
        int32_t n_slots = 1 + (int32_t)(tu_rand_u64(&rng) % 12);
        int64_t n = (int64_t)(tu_rand_u64(&rng) % 3000);
        int32_t *keys = malloc((size_t)(n > 0 ? n : 1) * sizeof *keys);
        ck_assert_ptr_nonnull(keys);
        for (int64_t i = 0; i < n; i++) {
            uint64_t r = tu_rand_u64(&rng);
            keys[i] = (r & 1) ? (int32_t)((r >> 8) % (uint64_t)n_keys)
                              : (int32_t)((r >> 8) % (uint64_t)(n_keys < 4 ? n_keys : 4));
        }
        int64_t want = plain_belady(keys, n, n_keys, n_slots);
        int64_t got = belady_of(keys, n, n_keys, n_slots);
        ck_assert_msg(got == want, "round %d (n %lld, %d keys, %d slots): %lld misses, plain %lld",
                      round, (long long)n, (int)n_keys, (int)n_slots, (long long)got,
                      (long long)want);
        ck_assert_int_le(got, plain_lru(keys, n, n_slots));
        free(keys);
    }
}
END_TEST

START_TEST(test_sim_belady_fixture_whole_trace)
{
    ferry_trace *tr = load_fixture();
    int64_t n;
    int32_t *keys = trace_keys(tr, tr->n_tokens, -1, &n);
    ck_assert_int_eq(n, tr->n_tokens * 12);
    int used[48] = {0}, n_distinct = 0;
    for (int64_t i = 0; i < n; i++)
        if (!used[keys[i]]++)
            n_distinct++;
    for (int32_t slots = 2; slots <= 48; slots += 10) {
        int64_t m = -1;
        ck_assert_msg(ferry_sim_belady(tr, slots, &m) == FERRY_OK, "%s", ferry_last_error());
        ck_assert_int_eq(m, plain_belady(keys, n, 48, slots));
        ck_assert_int_le(m, plain_lru(keys, n, slots));
        ck_assert_int_ge(m, n_distinct); /* the cold misses */
    }
    int64_t m = -1;
    ck_assert_msg(ferry_sim_belady(tr, 48, &m) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(m, n_distinct); /* every key resident at once: cold misses only */
    free(keys);
    ferry_trace_free(tr);
}
END_TEST

/* ---- the real cache on a hand-made trace --------------------------------------------- */

/* 2 layers x 4 experts, top-2, one sequence of 3 tokens:
 *   token 0: layer 0 {0, 1}, layer 1 {0, 1}
 *   token 1: layer 0 {0, 1}, layer 1 {2, 3}
 *   token 2: layer 0 {0, 1}, layer 1 {0, 1}
 * Keys a b = layer 0 experts 0 1; c d e f = layer 1 experts 0 1 2 3. Demand order:
 *   a b c d | a b e f | a b c d */
static uint8_t g_hand_ids[3 * 2 * 2] = {0, 1, 0, 1, 0, 1, 2, 3, 0, 1, 0, 1};
static int64_t g_hand_seqs[1] = {3};

static ferry_trace hand_trace(void)
{
    ferry_trace tr = {.n_layers = 2,
                      .n_experts = 4,
                      .top_k = 2,
                      .n_tokens = 3,
                      .n_seqs = 1,
                      .seq_lengths = g_hand_seqs,
                      .experts = g_hand_ids,
                      .probs = NULL};
    return tr;
}

START_TEST(test_sim_real_cache_hand_trace)
{
    ferry_trace tr = hand_trace();
    ferry_sim_params p = ferry_sim_params_default();
    p.n_slots = 4;
    p.expert_bytes = 1000;

    /* LRU, 4 slots. Token 0: a b c d fill the four free slots (4 misses; stamps a1 b2 c3
     * d4). Token 1: a, b hit (a5 b6); e misses and evicts c (3, the oldest), f misses and
     * evicts d (4): {a5 b6 e7 f8}. Token 2: a, b hit (a9 b10); c misses and evicts e (7), d
     * misses and evicts f (8). 8 misses, 4 hits, 4 evictions. */
    p.policy = FERRY_POLICY_LRU;
    ferry_sim_result r = run_sim(&tr, &p);
    assert_accounting(&tr, &p, &r);
    ck_assert_int_eq(r.lookups, 12);
    ck_assert_int_eq(r.misses, 8);
    ck_assert_int_eq(r.hits, 4);
    ck_assert_int_eq(r.evictions, 4);
    ck_assert_int_eq(r.fills, 8);
    ck_assert_uint_eq(r.bytes_moved, 8000);
    ck_assert_int_eq(r.prefetch_issued, 0);
    /* MIN, 4 slots: a b c d cold; e at i=6 sees next uses a@8 b@9 c@10 d@11: evicts d; f at
     * i=7 sees a@8 b@9 c@10 e never: evicts e; a b c hit; d misses. 7 misses. */
    ck_assert_int_eq(r.belady_misses, 7);
    ck_assert(r.belady_hit_rate == 1.0 - 7.0 / 12.0);
    ck_assert(r.hit_rate == 4.0 / 12.0);

    /* Layer-LRU, 4 slots over 2 layers: 2 slots each. Layer 0 holds a, b: 2 misses then 4
     * hits. Layer 1 has 2 slots for c d | e f | c d: 6 misses. 8 misses, 4 hits; the
     * evictions are e f's of c d and c d's of e f: 4. */
    p.policy = FERRY_POLICY_LAYER_LRU;
    r = run_sim(&tr, &p);
    assert_accounting(&tr, &p, &r);
    ck_assert_int_eq(r.misses, 8);
    ck_assert_int_eq(r.hits, 4);
    ck_assert_int_eq(r.evictions, 4);

    /* LRU, 3 slots: token 0: a b c fill, d evicts a (a1 b2 c3 pinned): {d4 b2 c3}. Token 1:
     * a evicts b (2) -> a5; b evicts c (3; a is pinned) -> b6; e evicts d (4) -> e7; f evicts
     * a (5; e pinned) -> f8: {e7 f8 b6}. Token 2: a evicts b (6), b evicts e (7), c evicts f
     * (8), d evicts a (9). Every access misses: 12. */
    p.policy = FERRY_POLICY_LRU;
    p.n_slots = 3;
    r = run_sim(&tr, &p);
    assert_accounting(&tr, &p, &r);
    ck_assert_int_eq(r.misses, 12);
    ck_assert_int_eq(r.hits, 0);
    ck_assert_int_eq(r.evictions, 9);

    /* Only the first 2 tokens (a b c d a b e f), 4 slots: 4 cold misses, a b hit, e and f
     * miss: 6 misses; MIN also 6 (the same 4 cold, then e and f can only miss). */
    p.n_slots = 4;
    p.n_tokens = 2;
    r = run_sim(&tr, &p);
    assert_accounting(&tr, &p, &r);
    ck_assert_int_eq(r.lookups, 8);
    ck_assert_int_eq(r.misses, 6);
    ck_assert_int_eq(r.belady_misses, 6);

    /* One slot, fewer than top_k: the forward pass's waves (use and release the held
     * expert, then acquire the next). Every access misses: a b c d a b e f a b c d. */
    p.n_tokens = 0;
    p.n_slots = 1;
    r = run_sim(&tr, &p);
    assert_accounting(&tr, &p, &r);
    ck_assert_int_eq(r.misses, 12);
    ck_assert_int_eq(r.belady_misses, 12);
}
END_TEST

START_TEST(test_sim_belady_on_trace_matches_keys)
{
    ferry_trace tr = hand_trace();
    int32_t keys[12] = {0, 1, 4, 5, 0, 1, 6, 7, 0, 1, 4, 5};
    for (int32_t slots = 1; slots <= 7; slots++) {
        int64_t m = -1;
        ck_assert_msg(ferry_sim_belady(&tr, slots, &m) == FERRY_OK, "%s", ferry_last_error());
        ck_assert_int_eq(m, belady_of(keys, 12, 8, slots));
        ck_assert_int_eq(m, plain_belady(keys, 12, 8, slots));
    }
}
END_TEST

/* ---- the fixture trace --------------------------------------------------------------------- */

START_TEST(test_sim_fixture_policies_vs_belady)
{
    ferry_trace *tr = load_fixture();
    int64_t n;
    int32_t *keys = trace_keys(tr, FIXTURE_SLICE, -1, &n);
    int64_t lru_model = plain_lru(keys, n, 12);
    int64_t min_model = plain_belady(keys, n, 48, 12);
    /* layer-lru with 12 slots over 6 layers: 2 slots per layer, LRU within the layer */
    int64_t layer_lru_model = 0;
    for (int32_t l = 0; l < tr->n_layers; l++) {
        int64_t nl;
        int32_t *lk = trace_keys(tr, FIXTURE_SLICE, l, &nl);
        layer_lru_model += plain_lru(lk, nl, 2);
        free(lk);
    }

    ferry_sim_params p = ferry_sim_params_default();
    p.n_slots = 12;
    p.n_tokens = FIXTURE_SLICE;
    for (int pol = FERRY_POLICY_LRU; pol <= FERRY_POLICY_PREDICTED; pol++) {
        p.policy = (ferry_cache_policy)pol;
        ferry_sim_result r = run_sim(tr, &p);
        assert_accounting(tr, &p, &r);
        ck_assert_int_eq(r.belady_misses, min_model);
        ck_assert_msg(r.belady_misses <= r.misses, "%s: %lld misses < Belady's %lld",
                      ferry_cache_policy_name(p.policy), (long long)r.misses,
                      (long long)r.belady_misses);
        ck_assert_int_gt(r.misses, 0);
        /* With top_k <= slots a pinned wave never holds the LRU victim, so the real cache
         * must match plain LRU exactly; the predicted policy without scores is LRU. */
        if (pol == FERRY_POLICY_LRU || pol == FERRY_POLICY_PREDICTED)
            ck_assert_int_eq(r.misses, lru_model);
        if (pol == FERRY_POLICY_LAYER_LRU)
            ck_assert_int_eq(r.misses, layer_lru_model);
    }
    free(keys);
    ferry_trace_free(tr);
}
END_TEST

static ferry_routing_stats *fit_stats(const ferry_trace *tr)
{
    ferry_routing_stats *st = NULL;
    const ferry_trace *list[1] = {tr};
    ck_assert_msg(ferry_routing_stats_fit(list, 1, &st) == FERRY_OK, "%s", ferry_last_error());
    return st;
}

static ferry_predictor *stats_predictor(const ferry_trace *tr, const ferry_routing_stats *st)
{
    ferry_predictor_params pp = {
        .n_layers = tr->n_layers, .n_experts = tr->n_experts, .top_k = tr->top_k, .stats = st};
    ferry_predictor *pred = NULL;
    ck_assert_msg(ferry_predictor_create(FERRY_PREDICTOR_STATS, &pp, &pred) == FERRY_OK, "%s",
                  ferry_last_error());
    return pred;
}

START_TEST(test_sim_prefetch_next_token_within_sequence)
{
    /* One layer, 4 experts, top-1, two sequences: 0 1 | 0 1. The statistics fitted on it
     * have P(1 | 0) = (2 + 1) / (2 + 4) (add-one smoothing) above the rest, and no counts
     * from 1, so from 1 the guess is uniform and 0 wins the tie. With one layer, the only
     * prefetch is the next token's layer 0, after the last layer. One slot, LRU:
     *   t0: 0 misses; the next token is in the sequence: 1 is prefetched (evicting 0)
     *   t1: 1 hits (prefetch used); the sequence ends here: nothing is prefetched (across
     *       the boundary the guess would be 0, a prefetch the next token would use)
     *   t2: 0 misses (evicting 1); 1 is prefetched
     *   t3: 1 hits (prefetch used); the trace ends.
     * 2 misses, 2 hits, 2 prefetches, both used. */
    uint8_t ids[4] = {0, 1, 0, 1};
    int64_t seqs[2] = {2, 2};
    ferry_trace tr = {.n_layers = 1,
                      .n_experts = 4,
                      .top_k = 1,
                      .n_tokens = 4,
                      .n_seqs = 2,
                      .seq_lengths = seqs,
                      .experts = ids};
    ferry_routing_stats *st = fit_stats(&tr);
    ferry_predictor *pred = stats_predictor(&tr, st);
    ferry_sim_params p = ferry_sim_params_default();
    p.n_slots = 1;
    p.predictor = pred;
    ferry_sim_result r = run_sim(&tr, &p);
    assert_accounting(&tr, &p, &r);
    ck_assert_int_eq(r.misses, 2);
    ck_assert_int_eq(r.hits, 2);
    ck_assert_int_eq(r.prefetch_issued, 2);
    ck_assert_int_eq(r.prefetch_used, 2);
    ck_assert_int_eq(r.prefetch_wasted, 0);
    ck_assert_int_eq(r.fills, 4);
    ck_assert_int_eq(r.evictions, 3);
    /* MIN without prefetching: 0 1 0 1 with one slot misses every time */
    ck_assert_int_eq(r.belady_misses, 4);
    ferry_predictor_destroy(pred);
    ferry_routing_stats_free(st);
}
END_TEST

/* Routers and norms of zeros for a tiny d_model: enough to build gate and combined
 * predictors (whose gate part the sim never reaches: it has no hidden states). */
#define DUMMY_D_MODEL 4
typedef struct {
    float w[8 * 256 * DUMMY_D_MODEL];
    ferry_weight gates[8], norms[8];
} dummy_gates;

static ferry_predictor *make_gate_predictor(const ferry_trace *tr, ferry_predictor_kind kind,
                                            const ferry_routing_stats *st, dummy_gates *g)
{
    ck_assert_int_le(tr->n_layers, 8);
    memset(g, 0, sizeof *g);
    for (int32_t l = 0; l < tr->n_layers; l++) {
        g->gates[l] = (ferry_weight){g->w, FERRY_DTYPE_F32, tr->n_experts, DUMMY_D_MODEL};
        g->norms[l] = (ferry_weight){g->w, FERRY_DTYPE_F32, 1, DUMMY_D_MODEL};
    }
    ferry_predictor_params pp = {.n_layers = tr->n_layers,
                                 .n_experts = tr->n_experts,
                                 .top_k = tr->top_k,
                                 .d_model = DUMMY_D_MODEL,
                                 .rms_eps = 1e-5f,
                                 .gates = g->gates,
                                 .ffn_norms = g->norms,
                                 .stats = st};
    ferry_predictor *pred = NULL;
    ck_assert_msg(ferry_predictor_create(kind, &pp, &pred) == FERRY_OK, "%s",
                  ferry_last_error());
    return pred;
}

START_TEST(test_sim_combined_predictor_uses_stats)
{
    /* Without hidden states a combined predictor scores with its statistics alone, so its
     * replay is the stats predictor's, counter for counter. */
    ferry_trace *tr = load_fixture();
    ferry_routing_stats *st = fit_stats(tr);
    ferry_predictor *stats = stats_predictor(tr, st);
    dummy_gates *g = malloc(sizeof *g);
    ck_assert_ptr_nonnull(g);
    ferry_predictor *comb = make_gate_predictor(tr, FERRY_PREDICTOR_COMBINED, st, g);
    ferry_sim_params p = ferry_sim_params_default();
    p.n_slots = 12;
    p.n_tokens = 600;
    p.lookahead = 2;
    p.policy = FERRY_POLICY_PREDICTED;
    p.predictor = stats;
    ferry_sim_result a = run_sim(tr, &p);
    p.predictor = comb;
    p.predictor_kind = FERRY_PREDICTOR_COMBINED;
    ferry_sim_result b = run_sim(tr, &p);
    assert_accounting(tr, &p, &b);
    ck_assert_int_gt(b.prefetch_issued, 0);
    ck_assert_msg(memcmp(&a, &b, sizeof a) == 0, "combined %lld misses, stats %lld",
                  (long long)b.misses, (long long)a.misses);
    ferry_predictor_destroy(comb);
    ferry_predictor_destroy(stats);
    free(g);
    ferry_routing_stats_free(st);
    ferry_trace_free(tr);
}
END_TEST

START_TEST(test_sim_deterministic)
{
    ferry_trace *tr = load_fixture();
    ferry_routing_stats *st = fit_stats(tr);
    ferry_predictor *pred = stats_predictor(tr, st);
    ferry_sim_params p = ferry_sim_params_default();
    p.n_slots = 12;
    p.n_tokens = 1000;
    /* lfu and predicted with prefetching are where worker timing could leak in: a batch's
     * prefetch (0 uses, lowest score) is the first victim of the batch's next one */
    const struct {
        ferry_cache_policy policy;
        int with_pred;
    } runs[] = {{FERRY_POLICY_LRU, 0}, {FERRY_POLICY_LFU, 1}, {FERRY_POLICY_PREDICTED, 1}};
    for (size_t i = 0; i < sizeof runs / sizeof runs[0]; i++) {
        p.policy = runs[i].policy;
        p.predictor = runs[i].with_pred ? pred : NULL;
        p.prefetch_k = runs[i].with_pred ? 4 : 0;
        ferry_sim_result a = run_sim(tr, &p), b = run_sim(tr, &p);
        ck_assert_msg(memcmp(&a, &b, sizeof a) == 0,
                      "%s%s: two runs differ (%lld/%lld misses, %lld/%lld prefetches)",
                      ferry_cache_policy_name(p.policy), runs[i].with_pred ? " + stats" : "",
                      (long long)a.misses, (long long)b.misses, (long long)a.prefetch_issued,
                      (long long)b.prefetch_issued);
    }
    ferry_predictor_destroy(pred);
    ferry_routing_stats_free(st);
    ferry_trace_free(tr);
}
END_TEST

START_TEST(test_sim_prefetch_accounting)
{
    ferry_trace *tr = load_fixture();
    ferry_routing_stats *st = fit_stats(tr);
    ferry_predictor *pred = stats_predictor(tr, st);
    ferry_sim_params p = ferry_sim_params_default();
    p.n_slots = 12;
    p.n_tokens = FIXTURE_SLICE / 2;
    p.expert_bytes = (uint64_t)352 << 20; /* a Mixtral-8x7B expert in bf16 */
    ferry_sim_result base = run_sim(tr, &p);
    ck_assert_int_eq(base.prefetch_issued, 0);
    ck_assert_int_eq(base.fills, base.misses);
    ck_assert_uint_eq(base.bytes_moved, (uint64_t)base.misses * p.expert_bytes);

    /* every policy, every lookahead (lru d=2, lfu d=3 with 3 experts per prediction,
     * layer-lru d=1, predicted d=2 and d=3) */
    p.predictor = pred;
    for (int i = 0; i < 5; i++) {
        p.policy = i < 4 ? (ferry_cache_policy)i : FERRY_POLICY_PREDICTED;
        p.lookahead = 1 + (i + 1) % FERRY_PREDICT_MAX_LOOKAHEAD;
        p.prefetch_k = p.policy == FERRY_POLICY_LFU ? 3 : 0;
        ferry_sim_result r = run_sim(tr, &p);
        assert_accounting(tr, &p, &r);
        /* every prefetch batch lands before the next demand: nothing is cancelled, the
         * cache has room for every hint, and the pipeline moved exactly the misses and the
         * prefetches */
        ck_assert_int_eq(r.prefetch_cancelled, 0);
        ck_assert_int_eq(r.prefetch_skipped, 0);
        ck_assert_uint_eq(r.bytes_moved, (uint64_t)(r.misses + r.prefetch_issued) * p.expert_bytes);
        ck_assert_uint_eq(r.prefetch_bytes_wasted, (uint64_t)r.prefetch_wasted * p.expert_bytes);
        ck_assert_int_gt(r.prefetch_issued, 0);
        ck_assert_int_gt(r.prefetch_used, 0);
        ck_assert_int_eq(r.belady_misses, base.belady_misses);
        /* No cache, prefetching or not, loads fewer useful experts than MIN: deferring each
         * load that a demand later uses to that demand, and dropping the unused ones, gives
         * a demand-paging run with misses + prefetch_used misses, and MIN is the least. */
        ck_assert_int_ge(r.misses + r.prefetch_used, r.belady_misses);
    }
    ferry_predictor_destroy(pred);
    ferry_routing_stats_free(st);
    ferry_trace_free(tr);
}
END_TEST

/* ---- bad parameters ------------------------------------------------------------------- */

static void expect_invalid(const ferry_trace *tr, const ferry_sim_params *p, const char *needle)
{
    ferry_sim_result r;
    memset(&r, 0x5A, sizeof r);
    ferry_sim_result before = r;
    ck_assert_int_eq(ferry_sim_run(tr, p, &r), FERRY_ERR_INVALID);
    assert_error_has("sim", needle);
    ck_assert_msg(memcmp(&r, &before, sizeof r) == 0, "the result was written on failure");
}

START_TEST(test_sim_rejects_bad_params)
{
    ferry_trace tr = hand_trace();
    dummy_gates g;
    ferry_predictor *gate = make_gate_predictor(&tr, FERRY_PREDICTOR_GATE, NULL, &g);
    ferry_sim_params good = ferry_sim_params_default();
    good.n_slots = 4;
    ferry_sim_params p = good;

    p.n_slots = 0;
    expect_invalid(&tr, &p, "n_slots is 0");
    p = good;
    p.lookahead = 0;
    expect_invalid(&tr, &p, "lookahead 0");
    p.lookahead = 4;
    expect_invalid(&tr, &p, "lookahead 4");
    p = good;
    p.predictor = gate;
    p.predictor_kind = FERRY_PREDICTOR_GATE;
    expect_invalid(&tr, &p, "gate predictor needs hidden states");
    p.predictor_kind = (ferry_predictor_kind)9;
    expect_invalid(&tr, &p, "predictor kind 9");
    p = good;
    p.policy = FERRY_POLICY_LAYER_LRU;
    p.n_slots = 1;
    expect_invalid(&tr, &p, "n_slots 1 < 2 layers");
    p = good;
    p.prefetch_k = 5;
    expect_invalid(&tr, &p, "prefetch_k 5");
    p = good;
    p.n_tokens = 4;
    expect_invalid(&tr, &p, "n_tokens 4");
    p = good;
    p.policy = (ferry_cache_policy)7;
    expect_invalid(&tr, &p, "policy 7");
    ck_assert_int_eq(ferry_sim_run(&tr, NULL, &(ferry_sim_result){0}), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_sim_run(&tr, &good, NULL), FERRY_ERR_INVALID);

    /* malformed traces */
    uint8_t bad_ids[12];
    memcpy(bad_ids, g_hand_ids, sizeof bad_ids);
    bad_ids[7] = 4; /* token 1, layer 1: expert 4 of 4 */
    ferry_trace bad = hand_trace();
    bad.experts = bad_ids;
    expect_invalid(&bad, &good, "token 1 layer 1 names expert 4 of 4");
    int64_t m = 77;
    ck_assert_int_eq(ferry_sim_belady(&bad, 2, &m), FERRY_ERR_INVALID);
    ck_assert_int_eq(m, 77);
    bad = hand_trace();
    int64_t short_seq[1] = {2};
    bad.seq_lengths = short_seq;
    expect_invalid(&bad, &good, "sum to 2, but it has 3 tokens");
    bad = hand_trace();
    bad.top_k = 5;
    expect_invalid(&bad, &good, "top_k 5");
    bad = hand_trace();
    bad.n_tokens = 0;
    bad.n_seqs = 0;
    expect_invalid(&bad, &good, "no tokens");
    ck_assert_int_eq(ferry_sim_belady(&bad, 2, &m), FERRY_OK);
    ck_assert_int_eq(m, 0);

    ck_assert_int_eq(ferry_sim_belady(&tr, 0, &m), FERRY_ERR_INVALID);
    assert_error_has("belady", "n_slots is 0");
    int32_t keys[3] = {0, 3, 1};
    ck_assert_int_eq(ferry_sim_belady_keys(keys, 3, 3, 2, &m), FERRY_ERR_INVALID);
    assert_error_has("belady", "key 3 at index 1");
    ck_assert_int_eq(m, 0);

    ferry_predictor_destroy(gate);
}
END_TEST

static Suite *sim_suite(void)
{
    Suite *s = suite_create("sim");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_sim_belady_hand_sequences);
    tcase_add_test(tc, test_sim_belady_matches_plain_on_random);
    tcase_add_test(tc, test_sim_belady_fixture_whole_trace);
    tcase_add_test(tc, test_sim_belady_on_trace_matches_keys);
    tcase_add_test(tc, test_sim_real_cache_hand_trace);
    tcase_add_test(tc, test_sim_fixture_policies_vs_belady);
    tcase_add_test(tc, test_sim_deterministic);
    tcase_add_test(tc, test_sim_prefetch_accounting);
    tcase_add_test(tc, test_sim_prefetch_next_token_within_sequence);
    tcase_add_test(tc, test_sim_combined_predictor_uses_stats);
    tcase_add_test(tc, test_sim_rejects_bad_params);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(sim_suite()); }
