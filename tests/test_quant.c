/*
 * tests/test_quant.c: the group-wise quantized row formats (kernels/quant.h): sizes, the
 * byte layout on hand-made groups, exact round trips of representable values, error bounds
 * on random rows, zero and constant groups, and refused input.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check_util.h"
#include "kernels/dtype.h"
#include "kernels/quant.h"

START_TEST(test_quant_sizes_and_bad_shapes)
{
    size_t n;
    ck_assert_int_eq(ferry_quant_row_bytes(FERRY_DTYPE_Q8, 4096, &n), FERRY_OK);
    ck_assert_uint_eq(n, 128 * 34);
    ck_assert_int_eq(ferry_quant_row_bytes(FERRY_DTYPE_Q4, 14336, &n), FERRY_OK);
    ck_assert_uint_eq(n, 448 * 20);
    const int64_t bad[] = {0, -32, 31, 33, 100};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_int_eq(ferry_quant_row_bytes(FERRY_DTYPE_Q8, bad[i], &n), FERRY_ERR_INVALID);
        ck_assert(strstr(ferry_last_error(), "multiple of 32") != NULL);
    }
    ck_assert_int_eq(ferry_quant_row_bytes(FERRY_DTYPE_BF16, 32, &n), FERRY_ERR_INVALID);
    ck_assert_str_eq(ferry_quant_name(FERRY_DTYPE_Q4), "q4");
}
END_TEST

START_TEST(test_quant_layout_by_hand)
{
    /* Q8: w = 0.5 * (i - 16): scale 16 * 0.5 / 127 rounds to f16, q = round(w / d) */
    float w[32], back[32];
    uint8_t g[34];
    for (int i = 0; i < 32; i++)
        w[i] = 0.5f * (float)(i - 16);
    ck_assert_int_eq(ferry_quantize_row(FERRY_DTYPE_Q8, w, 32, g), FERRY_OK);
    float d = ferry_f16_to_f32((uint16_t)(g[0] | g[1] << 8));
    ck_assert(d == ferry_f16_to_f32(ferry_f32_to_f16(8.0f / 127.0f)));
    ck_assert_int_eq((int8_t)g[2], -127); /* w[0] = -8 is the extreme */
    ck_assert_int_eq((int8_t)g[2 + 16], 0);
    ck_assert_int_eq((int8_t)g[2 + 31], (int)roundf(7.5f / d));
    /* Q4: w[i] = 1 + 0.25 * (i % 16): m = 1, d = 0.25, q = i % 16, nibbles low first */
    uint8_t h[20];
    for (int i = 0; i < 32; i++)
        w[i] = 1.0f + 0.25f * (float)(i % 16);
    ck_assert_int_eq(ferry_quantize_row(FERRY_DTYPE_Q4, w, 32, h), FERRY_OK);
    ck_assert_int_eq(h[0] | h[1] << 8, ferry_f32_to_f16(0.25f));
    ck_assert_int_eq(h[2] | h[3] << 8, ferry_f32_to_f16(1.0f));
    for (int j = 0; j < 16; j++)
        ck_assert_int_eq(h[4 + j], (uint8_t)(((2 * j + 1) % 16) << 4 | (2 * j) % 16));
    ck_assert_int_eq(ferry_dequantize_row(FERRY_DTYPE_Q4, h, 32, back), FERRY_OK);
    ck_assert(memcmp(back, w, sizeof w) == 0); /* representable: exact */
}
END_TEST

START_TEST(test_quant_representable_values_are_exact)
{
    uint64_t rng = 5;
    float w[256], back[256];
    uint8_t buf[256 / 32 * 34];
    /* Q8: d = 2^-6, q in [-127, 127] with the extreme present in every group */
    for (int i = 0; i < 256; i++)
        w[i] = (i % 32 == 0 ? 127.0f : (float)((int)(tu_rand_u64(&rng) % 255) - 127)) / 64.0f;
    ck_assert_int_eq(ferry_quantize_row(FERRY_DTYPE_Q8, w, 256, buf), FERRY_OK);
    ck_assert_int_eq(ferry_dequantize_row(FERRY_DTYPE_Q8, buf, 256, back), FERRY_OK);
    ck_assert(memcmp(w, back, sizeof w) == 0);
    /* Q4: m = -0.5, d = 2^-4, q in [0, 15] with both ends present */
    for (int i = 0; i < 256; i++)
        w[i] = -0.5f + (float)(i % 32 == 0 ? 0 : i % 32 == 1 ? 15 : (int)(tu_rand_u64(&rng) % 16)) / 16.0f;
    ck_assert_int_eq(ferry_quantize_row(FERRY_DTYPE_Q4, w, 256, buf), FERRY_OK);
    ck_assert_int_eq(ferry_dequantize_row(FERRY_DTYPE_Q4, buf, 256, back), FERRY_OK);
    ck_assert(memcmp(w, back, sizeof w) == 0);
}
END_TEST

START_TEST(test_quant_error_bounds_on_random_rows)
{
    uint64_t rng = 11;
    enum { COLS = 4096 };
    float *w = tu_rand_floats(&rng, COLS, -0.05f, 0.05f), back[COLS];
    uint8_t buf[COLS / 32 * 34];
    double rel[FERRY_DTYPE_COUNT];
    for (int t = FERRY_DTYPE_Q8; t <= FERRY_DTYPE_Q4; t++) {
        ck_assert_int_eq(ferry_quantize_row((ferry_dtype)t, w, COLS, buf), FERRY_OK);
        ck_assert_int_eq(ferry_dequantize_row((ferry_dtype)t, buf, COLS, back), FERRY_OK);
        size_t gb = ferry_quant_group_bytes((ferry_dtype)t);
        for (int c = 0; c < COLS; c++) {
            const uint8_t *g = buf + (size_t)(c / 32) * gb;
            double d = ferry_f16_to_f32((uint16_t)(g[0] | g[1] << 8));
            double slack = d / 2 * (1 + 1e-3) + 1e-7;
            if (t == FERRY_DTYPE_Q4) { /* the minimum itself is rounded to f16 */
                float lo = w[c / 32 * 32];
                for (int i = 1; i < 32; i++)
                    lo = fminf(lo, w[c / 32 * 32 + i]);
                slack += fabs(ferry_f16_to_f32((uint16_t)(g[2] | g[3] << 8)) - lo);
            }
            ck_assert_msg(fabs(back[c] - w[c]) <= slack, "%s column %d: %g -> %g (d %g)",
                          ferry_quant_name((ferry_dtype)t), c, w[c], back[c], d);
        }
        rel[t] = tu_rel_l2(back, w, COLS);
    }
    printf("uniform rows: relative L2 error q8 %.5f, q4 %.5f\n", rel[0], rel[1]);
    ck_assert(rel[FERRY_DTYPE_Q8] < 0.01);
    ck_assert(rel[FERRY_DTYPE_Q4] < 0.12);
    ck_assert(rel[FERRY_DTYPE_Q4] > rel[FERRY_DTYPE_Q8]);
    free(w);
}
END_TEST

START_TEST(test_quant_zero_constant_and_bad_values)
{
    float w[64] = {0}, back[64];
    uint8_t buf[2 * 34];
    for (int t = FERRY_DTYPE_Q8; t <= FERRY_DTYPE_Q4; t++) {
        ck_assert_int_eq(ferry_quantize_row((ferry_dtype)t, w, 64, buf), FERRY_OK);
        ck_assert_int_eq(ferry_dequantize_row((ferry_dtype)t, buf, 64, back), FERRY_OK);
        for (int i = 0; i < 64; i++)
            ck_assert(back[i] == 0.0f);
    }
    for (int i = 0; i < 64; i++)
        w[i] = 0.75f; /* constant: Q4 keeps it in m with d = 0 */
    ck_assert_int_eq(ferry_quantize_row(FERRY_DTYPE_Q4, w, 64, buf), FERRY_OK);
    ck_assert_int_eq(ferry_dequantize_row(FERRY_DTYPE_Q4, buf, 64, back), FERRY_OK);
    for (int i = 0; i < 64; i++)
        ck_assert(back[i] == 0.75f);
    w[40] = NAN;
    ck_assert_int_eq(ferry_quantize_row(FERRY_DTYPE_Q8, w, 64, buf), FERRY_ERR_INVALID);
    ck_assert(strstr(ferry_last_error(), "column 40") != NULL);
    w[40] = INFINITY;
    ck_assert_int_eq(ferry_quantize_row(FERRY_DTYPE_Q4, w, 64, buf), FERRY_ERR_INVALID);
    w[40] = 1e7f; /* a scale beyond f16 */
    ck_assert_int_eq(ferry_quantize_row(FERRY_DTYPE_Q8, w, 64, buf), FERRY_ERR_INVALID);
    ck_assert(strstr(ferry_last_error(), "beyond f16") != NULL);
    ck_assert_int_eq(ferry_quantize_row(FERRY_DTYPE_Q8, w, 48, buf), FERRY_ERR_INVALID);
}
END_TEST

static Suite *quant_suite(void)
{
    Suite *s = suite_create("quant");
    TCase *tc = tcase_create("quant");
    tcase_add_test(tc, test_quant_sizes_and_bad_shapes);
    tcase_add_test(tc, test_quant_layout_by_hand);
    tcase_add_test(tc, test_quant_representable_values_are_exact);
    tcase_add_test(tc, test_quant_error_bounds_on_random_rows);
    tcase_add_test(tc, test_quant_zero_constant_and_bad_values);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(quant_suite()); }
