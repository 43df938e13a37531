/*
 * tests/test_schedule.c: cross-batch token reordering (moe/schedule.h): known groupings,
 * never more loads than arrival order, a permutation of the tokens, errors.
 */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "check_util.h"
#include "core/error.h"
#include "moe/schedule.h"

/* Distinct experts summed over the groups, recomputed from order and starts. */
static int64_t loads_of(const int32_t *experts, int32_t k, const int32_t *order,
                        const int32_t *starts, int32_t n_groups)
{
    int64_t loads = 0;
    for (int32_t g = 0; g < n_groups; g++) {
        uint8_t seen[256] = {0};
        for (int32_t i = starts[g]; i < starts[g + 1]; i++)
            for (int32_t j = 0; j < k; j++) {
                int32_t e = experts[order[i] * k + j];
                loads += !seen[e];
                seen[e] = 1;
            }
    }
    return loads;
}

static void assert_permutation(const int32_t *order, int32_t n)
{
    uint8_t *seen = calloc((size_t)n, 1);
    for (int32_t i = 0; i < n; i++) {
        ck_assert(order[i] >= 0 && order[i] < n);
        ck_assert(!seen[order[i]]);
        seen[order[i]] = 1;
    }
    free(seen);
}

START_TEST(test_known_grouping)
{
    /* 8 tokens, top-2 of 8 experts, interleaved: arrival order in groups of 4 needs
     * {0,1,2,3} twice = 8 loads; grouping the (0,1) tokens and the (2,3) tokens needs 4 */
    const int32_t experts[] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
    ferry_schedule *s = NULL;
    ck_assert_int_eq(ferry_schedule_create(8, 8, 2, &s), FERRY_OK);
    int32_t order[8], starts[9];
    ferry_schedule_result r;
    ck_assert_int_eq(ferry_schedule_groups(s, experts, NULL, 8, 4, 0, order, starts, &r),
                     FERRY_OK);
    ck_assert_int_eq(r.n_groups, 2);
    ck_assert_int_eq(r.loads, 8);
    ck_assert_int_eq(r.reordered, 0);
    for (int32_t i = 0; i < 8; i++)
        ck_assert_int_eq(order[i], i);

    ck_assert_int_eq(ferry_schedule_groups(s, experts, NULL, 8, 4, 1, order, starts, &r),
                     FERRY_OK);
    ck_assert_int_eq(r.loads, 4);
    ck_assert_int_eq(r.reordered, 1);
    const int32_t want[] = {0, 2, 4, 6, 1, 3, 5, 7};
    for (int32_t i = 0; i < 8; i++)
        ck_assert_int_eq(order[i], want[i]);
    ck_assert_int_eq(starts[0], 0);
    ck_assert_int_eq(starts[1], 4);
    ck_assert_int_eq(starts[2], 8);
    ferry_schedule_destroy(s);
}
END_TEST

START_TEST(test_next_layer_breaks_ties)
{
    /* all four tokens route to (0,1) here; at the next layer tokens 0 and 2 go to (4,5),
     * 1 and 3 to (6,7): groups of 2 keep the next layer's pairs together */
    const int32_t experts[] = {0, 1, 0, 1, 0, 1, 0, 1};
    const int32_t next[] = {4, 5, 6, 7, 4, 5, 6, 7};
    ferry_schedule *s = NULL;
    ck_assert_int_eq(ferry_schedule_create(8, 4, 2, &s), FERRY_OK);
    int32_t order[4], starts[5];
    ferry_schedule_result r;
    /* equal loads at this layer: arrival order is kept */
    ck_assert_int_eq(ferry_schedule_groups(s, experts, next, 4, 2, 1, order, starts, &r),
                     FERRY_OK);
    ck_assert_int_eq(r.loads, 4);
    ck_assert_int_eq(r.reordered, 0);
    ferry_schedule_destroy(s);

    /* with this layer's pairs split as well, the greedy cut follows both */
    const int32_t experts2[] = {0, 1, 2, 3, 0, 1, 2, 3};
    ck_assert_int_eq(ferry_schedule_create(8, 4, 2, &s), FERRY_OK);
    ck_assert_int_eq(ferry_schedule_groups(s, experts2, next, 4, 2, 1, order, starts, &r),
                     FERRY_OK);
    ck_assert_int_eq(r.loads, 4);
    ck_assert_int_eq(order[0], 0);
    ck_assert_int_eq(order[1], 2);
    ferry_schedule_destroy(s);
}
END_TEST

START_TEST(test_random_never_worse)
{
    uint64_t rng = 42;
    int64_t total_arrival = 0, total_reordered = 0;
    for (int round = 0; round < 300; round++) {
        int32_t E = 2 + (int32_t)(tu_rand_u64(&rng) % 30);
        int32_t k = 1 + (int32_t)(tu_rand_u64(&rng) % (E < 4 ? E : 4));
        int32_t n = 1 + (int32_t)(tu_rand_u64(&rng) % 80);
        int32_t group = 1 + (int32_t)(tu_rand_u64(&rng) % 20);
        int32_t *experts = malloc((size_t)n * (size_t)k * sizeof *experts);
        int32_t *next = malloc((size_t)n * (size_t)k * sizeof *next);
        for (int32_t t = 0; t < n; t++) {
            /* k distinct experts per token, clustered: half the tokens from a small pool */
            int32_t pool = (t % 2) ? E : (k + 1 < E ? k + 1 : E);
            for (int32_t j = 0; j < k; j++) {
                int32_t e, dup;
                do {
                    e = (int32_t)(tu_rand_u64(&rng) % (uint64_t)pool);
                    dup = 0;
                    for (int32_t q = 0; q < j; q++)
                        dup |= experts[t * k + q] == e;
                } while (dup);
                experts[t * k + j] = e;
                next[t * k + j] = (int32_t)(tu_rand_u64(&rng) % (uint64_t)E);
            }
        }
        ferry_schedule *s = NULL;
        ck_assert_int_eq(ferry_schedule_create(E, n, k, &s), FERRY_OK);
        int32_t *order = malloc((size_t)n * sizeof *order);
        int32_t *starts = malloc(((size_t)n + 1) * sizeof *starts);
        ferry_schedule_result a, r;
        ck_assert_int_eq(ferry_schedule_groups(s, experts, next, n, group, 0, order, starts, &a),
                         FERRY_OK);
        ck_assert_int_eq(a.loads, loads_of(experts, k, order, starts, a.n_groups));
        ck_assert_int_eq(ferry_schedule_groups(s, experts, next, n, group, 1, order, starts, &r),
                         FERRY_OK);
        assert_permutation(order, n);
        ck_assert_int_eq(r.n_groups, (n + group - 1) / group);
        for (int32_t g = 0; g < r.n_groups; g++)
            ck_assert(starts[g + 1] - starts[g] >= 1 && starts[g + 1] - starts[g] <= group);
        ck_assert_int_eq(starts[r.n_groups], n);
        ck_assert_int_eq(r.loads, loads_of(experts, k, order, starts, r.n_groups));
        ck_assert_int_le(r.loads, a.loads);
        total_arrival += a.loads;
        total_reordered += r.loads;
        ferry_schedule_destroy(s);
        free(experts);
        free(next);
        free(order);
        free(starts);
    }
    /* on clustered routing reordering must actually help */
    ck_assert_msg(total_reordered < total_arrival * 9 / 10, "%lld vs %lld",
                  (long long)total_reordered, (long long)total_arrival);
}
END_TEST

START_TEST(test_errors)
{
    ferry_schedule *s = NULL;
    ck_assert_int_eq(ferry_schedule_create(0, 4, 1, &s), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_schedule_create(4, 4, 5, &s), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_schedule_create(4, 4, 2, &s), FERRY_OK);
    int32_t order[8], starts[9];
    ferry_schedule_result r;
    const int32_t bad[] = {0, 1, 2, 4};
    ck_assert_int_eq(ferry_schedule_groups(s, bad, NULL, 2, 1, 1, order, starts, &r),
                     FERRY_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(ferry_last_error(), "token 1"));
    const int32_t good[] = {0, 1, 2, 3};
    ck_assert_int_eq(ferry_schedule_groups(s, good, NULL, 5, 1, 1, order, starts, &r),
                     FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_schedule_groups(s, good, NULL, 2, 0, 1, order, starts, &r),
                     FERRY_ERR_INVALID);
    ferry_schedule_destroy(s);
    ferry_schedule_destroy(NULL);
}
END_TEST

static Suite *schedule_suite(void)
{
    Suite *s = suite_create("schedule");
    TCase *tc = tcase_create("units");
    tcase_add_test(tc, test_known_grouping);
    tcase_add_test(tc, test_next_layer_breaks_ties);
    tcase_add_test(tc, test_random_never_worse);
    tcase_add_test(tc, test_errors);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(schedule_suite()); }
