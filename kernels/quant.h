/*
 * kernels/quant.h: group-wise quantized weight rows, the storage of quantized experts.
 * A row of cols weights (cols a multiple of 32) is cols / 32 groups, each stored alone:
 *
 *   Q8 (34 bytes per group): f16 scale d, then int8 q[32];        w[i] = d * q[i]
 *   Q4 (20 bytes per group): f16 scale d, f16 minimum m, then 16 bytes of 4-bit q, q[2j]
 *                            in the low nibble of byte j and q[2j+1] in the high one;
 *                                                                   w[i] = d * q[i] + m
 *
 * (little-endian f16 fields, no padding). The dequantized value is defined as computed here
 * in float32, the f16 fields widened exactly and no fused multiply-add: d * q for Q8,
 * (d * q) + m for Q4. Every kernel that multiplies by quantized weights (CPU and CUDA)
 * must produce these values, so a quantized matmul equals the float matmul of the
 * dequantized rows.
 *
 * Quantizing: Q8 is symmetric, d = max |w| / 127 rounded to f16, q = round(w / d) (half
 * away from zero) in [-127, 127]; Q4 takes m = min w rounded to f16 and d = (max w - m) / 15
 * rounded to f16, q = round((w - m) / d) clamped to [0, 15]. A group of zeros stores d = 0.
 */
#ifndef FERRY_KERNELS_QUANT_H
#define FERRY_KERNELS_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include "ferry.h"

#include "kernels/dtype.h"

/* The types are FERRY_DTYPE_Q8 and FERRY_DTYPE_Q4 (kernels/dtype.h, which also gives the
 * group and row sizes). */

/* "q8", "q4"; "?" otherwise. */
const char *ferry_quant_name(ferry_dtype t);

/* Parses "q8" or "q4" into *out. FERRY_ERR_INVALID (the message lists the choices). */
ferry_status ferry_quant_parse(const char *s, ferry_dtype *out);

/* Bytes of a row of cols weights. FERRY_ERR_INVALID when cols is not a positive multiple of
 * 32 or the type is not quantized. */
ferry_status ferry_quant_row_bytes(ferry_dtype t, int64_t cols, size_t *out);

/* Quantizes src (cols floats) into dst (ferry_quant_row_bytes of them). FERRY_ERR_INVALID
 * for a bad cols or type, a value that is not finite, or a group whose scale does not fit
 * an f16 (the message names the column); dst is then partly written. Thread-safe. */
ferry_status ferry_quantize_row(ferry_dtype t, const float *src, int64_t cols, void *dst);

/* The dequantized values of a row (see above) into dst (cols floats). FERRY_ERR_INVALID
 * for a bad cols or type. Thread-safe. */
ferry_status ferry_dequantize_row(ferry_dtype t, const void *src, int64_t cols, float *dst);

/* Weight i of a quantized row (row points at its first group), as defined above. For
 * kernels that widen a few weights at a time; ferry_dequantize_row does whole rows. */
static inline float ferry_quant_weight(ferry_dtype t, const uint8_t *row, int64_t i)
{
    const uint8_t *g = row + (size_t)(i / FERRY_QUANT_GROUP) * ferry_quant_group_bytes(t);
    int k = (int)(i % FERRY_QUANT_GROUP);
    float d = ferry_f16_to_f32((uint16_t)(g[0] | g[1] << 8));
    if (t == FERRY_DTYPE_Q8)
        return d * (float)(int8_t)g[2 + k];
    float m = ferry_f16_to_f32((uint16_t)(g[2] | g[3] << 8));
    return d * (float)((g[4 + k / 2] >> (4 * (k & 1))) & 15) + m;
}

#endif
