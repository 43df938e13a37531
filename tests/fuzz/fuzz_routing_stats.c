/*
 * tests/fuzz/fuzz_routing_stats.c: routing statistics files (predictor/stats.c,
 * ferry_routing_stats_load, what `ferry predictor fit` writes).
 * Dictionaries: routing_stats.dict
 *
 * Input: one control byte, then the file. A mutation of the shape leaves a file of the wrong
 * size, and almost any other one a wrong checksum; so the control byte can set both right:
 *   bit 1  resize the file to the size its header's shape implies (zero counts appended, or
 *          the end cut off), when that is at most 1 MiB
 *   bit 0  rewrite the trailing XXH3 checksum to match the bytes before it
 * and mutations get past them to the checks of the counts.
 *
 * An accepted file must give statistics of a shape in range whose every transition row is a
 * probability distribution (entries in (0, 1], summing to 1), with rows for exactly the
 * layer pairs that exist; and saving them must write the input file back byte for byte (the
 * format has one encoding of a set of counts). A rejected file must get a message naming the
 * path.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

#include "core/bytes.h"
#include "predictor/predictor.h"
#include "tests/fuzz/fuzz_util.h"

#define RESIZE_MAX ((uint64_t)1 << 20)

static void check_tables(const ferry_routing_stats *s)
{
    int32_t L = 0, E = 0, K = 0;
    ferry_routing_stats_shape(s, &L, &E, &K);
    FUZZ_CHECK(L >= 1 && L <= 256 && E >= 1 && E <= 256 && K >= 1 && K <= E,
               "shape %d x %d, top_k %d", L, E, K);
    for (int32_t l = -1; l <= L; l++) {
        for (int32_t d = -1; d <= FERRY_PREDICT_MAX_LOOKAHEAD + 1; d++) {
            const float *p = ferry_routing_stats_transition(s, l, d);
            int exists = l >= 0 && d >= 0 && d <= FERRY_PREDICT_MAX_LOOKAHEAD && l + d < L;
            FUZZ_CHECK(!p == !exists, "layer %d lookahead %d: table %s", l, d,
                       p ? "given" : "missing");
            for (int32_t e = 0; p && e < E; e++) {
                double sum = 0;
                for (int32_t j = 0; j < E; j++) {
                    float v = p[(size_t)e * (size_t)E + (size_t)j];
                    FUZZ_CHECK(v > 0.0f && v <= 1.0f, "layer %d lookahead %d row %d: %g", l, d,
                               e, (double)v);
                    sum += v;
                }
                FUZZ_CHECK(fabs(sum - 1.0) < 1e-3, "layer %d lookahead %d row %d sums to %g", l,
                           d, e, sum);
            }
        }
    }
}

/* Saves s and compares the file with the input. */
static void check_round_trip(const ferry_routing_stats *s, const uint8_t *f, size_t n)
{
    char path[512];
    snprintf(path, sizeof path, "%s/stats", fuzz_scratch_dir());
    ferry_status st = ferry_routing_stats_save(s, path);
    FUZZ_CHECK(st == FERRY_OK, "save: %s", ferry_last_error());
    FILE *file = fopen(path, "rb");
    if (!file)
        fuzz_setup_failed(path);
    uint8_t *back = malloc(n + 1);
    if (!back)
        fuzz_setup_failed("malloc");
    size_t got = fread(back, 1, n + 1, file);
    fclose(file);
    FUZZ_CHECK(got == n && memcmp(back, f, n) == 0, "saved file (%zu bytes) differs from the "
               "loaded one (%zu bytes)", got, n);
    free(back);
}

FUZZ_INITIALIZE_QUIET()

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t n = size - 1;
    if ((data[0] & 2) && n >= 20) {
        uint64_t l = ferry_get_u32(data + 1 + 12), e = ferry_get_u32(data + 1 + 16);
        uint64_t want = 40 + 4 * (l * e + (FERRY_PREDICT_MAX_LOOKAHEAD + 1) * l * e * e) + 8;
        if (l >= 1 && l <= 256 && e >= 1 && e <= 256 && want <= RESIZE_MAX)
            n = (size_t)want;
    }
    uint8_t *f = calloc(n ? n : 1, 1);
    if (!f)
        fuzz_setup_failed("calloc");
    memcpy(f, data + 1, n < size - 1 ? n : size - 1);
    if ((data[0] & 1) && n >= 8)
        ferry_put_u64(f + n - 8, XXH3_64bits(f, n - 8));
    char path[64];
    int fd = fuzz_memfd(f, n, path, sizeof path);
    ferry_routing_stats *s = NULL;
    ferry_status st = ferry_routing_stats_load(path, &s);
    close(fd);
    if (st != FERRY_OK) {
        FUZZ_CHECK(s == NULL, "a failed load wrote its output");
        fuzz_check_rejection(st, path);
    } else {
        check_tables(s);
        check_round_trip(s, f, n);
        ferry_routing_stats_free(s);
    }
    free(f);
    return 0;
}
