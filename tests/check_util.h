/*
 * tests/check_util.h: helpers shared by the Check suites: array comparison that reports
 * the max error and the first mismatches, seeded random numbers, scratch files, and the
 * common main() that runs one suite.
 */
#ifndef FERRY_TESTS_CHECK_UTIL_H
#define FERRY_TESTS_CHECK_UTIL_H

#include <check.h>
#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/backend.h"

/* Relative L2 error ||a - b|| / ||b|| of two float arrays. */
double tu_rel_l2(const float *a, const float *b, size_t n);

/* Fails the current test (with the max abs error, its index and up to 5 mismatching
 * positions) unless |a[i] - b[i]| <= atol + rtol * |b[i]| for every i. */
void tu_assert_close(const char *what, const float *a, const float *b, size_t n, double atol,
                     double rtol);

/* Deterministic random numbers (splitmix64). */
uint64_t tu_rand_u64(uint64_t *state);
float tu_rand_uniform(uint64_t *state, float lo, float hi);

/* A JSON array of numbers as a fresh int32 / float array (one spare element); *n gets the
 * count. Caller frees. */
int32_t *tu_json_ints(const cJSON *a, int32_t *n);
float *tu_json_floats(const cJSON *a, int32_t *n);

/* n floats uniform in [lo, hi); caller frees. */
float *tu_rand_floats(uint64_t *state, size_t n, float lo, float hi);

/* Makes w a host weight (rows, cols) of dtype t holding vals, rounding vals in place to what
 * is stored, so a reference computed from vals uses exactly the stored values (q8/q4: each
 * row quantized, vals replaced by the dequantized values; cols a multiple of 32). Returns
 * the storage, which the caller frees. */
void *tu_make_weight(ferry_weight *w, float *vals, int64_t rows, int64_t cols, ferry_dtype t);

/* Writes bytes to a fresh file under the test scratch folder and returns its path in a
 * static buffer of the caller (path must hold 512 bytes). */
void tu_write_file(char *path, const char *name, const void *data, size_t len);

/* A fresh empty scratch folder for this test (name becomes part of the path). */
void tu_scratch_dir(char *path, const char *name);

/* Reads a whole file; caller frees. Fails the test on error. */
char *tu_read_file(const char *path, size_t *len);

/* Runs the suite; returns the process exit status. */
int tu_run_suite(Suite *s);

/* Runs the suite in this process (CK_NOFORK, whatever CK_FORK says): for CUDA suites, since
 * CUDA after fork is undefined. A failing test still runs its checked teardown; a crash
 * ends the whole run. Returns the process exit status. */
int tu_run_suite_nofork(Suite *s);

#endif
