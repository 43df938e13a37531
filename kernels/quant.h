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

typedef enum { FERRY_QUANT_Q8 = 0, FERRY_QUANT_Q4 = 1, FERRY_QUANT_COUNT } ferry_quant_type;

#define FERRY_QUANT_GROUP 32

/* "q8", "q4"; "?" otherwise. */
const char *ferry_quant_name(ferry_quant_type t);

/* Bytes of one group: 34 (Q8), 20 (Q4); 0 for an unknown type. */
size_t ferry_quant_group_bytes(ferry_quant_type t);

/* Bytes of a row of cols weights. FERRY_ERR_INVALID when cols is not a positive multiple of
 * 32 or the type is unknown. */
ferry_status ferry_quant_row_bytes(ferry_quant_type t, int64_t cols, size_t *out);

/* Quantizes src (cols floats) into dst (ferry_quant_row_bytes of them). FERRY_ERR_INVALID
 * for a bad cols or type, a value that is not finite, or a group whose scale does not fit
 * an f16 (the message names the column); dst is then partly written. Thread-safe. */
ferry_status ferry_quantize_row(ferry_quant_type t, const float *src, int64_t cols, void *dst);

/* The dequantized values of a row (see above) into dst (cols floats). FERRY_ERR_INVALID
 * for a bad cols or type. Thread-safe. */
ferry_status ferry_dequantize_row(ferry_quant_type t, const void *src, int64_t cols, float *dst);

#endif
