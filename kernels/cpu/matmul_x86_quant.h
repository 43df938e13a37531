/*
 * kernels/cpu/matmul_x86_quant.h: where the exact x86 matmul kernels (matmul_avx2.c,
 * matmul_avx512.c) find the columns of a weight row, and the widening of quantized rows,
 * written once and included by each after it has defined TILE_TARGET, INLINE, WIDE and
 * WIDE_COL_BYTES.
 *
 * A q8 or q4 row is groups of 32 weights (kernels/quant.h). The kernels widen a whole group
 * at a time (each file's load_group, from group_codes here): the f16 scale (and minimum)
 * read once, the 32 codes in one or two loads. The values are exactly those
 * ferry_quant_weight defines: the f16s widened exactly by F16C, q8: d * q, q4: (d * q) + m
 * as a separate multiply and add, so a fused kernel equals the reference's
 * dequantize-then-multiply bit for bit.
 */
#ifndef FERRY_KERNELS_CPU_MATMUL_X86_QUANT_H
#define FERRY_KERNELS_CPU_MATMUL_X86_QUANT_H

#include "kernels/quant.h"

/* Byte offset of column c from the start of a row (quantized: of the group holding c). */
TILE_TARGET INLINE size_t col_offset(int dt, int64_t c)
{
    if (dt == WIDE)
        return (size_t)c * WIDE_COL_BYTES;
    if (ferry_dtype_is_quant((ferry_dtype)dt))
        return (size_t)(c / FERRY_QUANT_GROUP) * ferry_quant_group_bytes((ferry_dtype)dt);
    return (size_t)c * ferry_dtype_size((ferry_dtype)dt);
}

/* The f16 at p, widened. */
TILE_TARGET INLINE float f16_at(const char *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* The group at g: its 32 codes as bytes (q[0]: weights 0..15, q[1]: 16..31; a q4 code
 * zero-extended, a q8 code as its int8 bits), its scale and, for q4, its minimum. */
TILE_TARGET INLINE void group_codes(const char *g, int dt, __m128i q[2], float *d, float *m)
{
    *d = f16_at(g);
    if (dt == FERRY_DTYPE_Q8) {
        *m = 0;
        q[0] = _mm_loadu_si128((const void *)(g + 2));
        q[1] = _mm_loadu_si128((const void *)(g + 18));
        return;
    }
    *m = f16_at(g + 2);
    __m128i b = _mm_loadu_si128((const void *)(g + 4)), mask = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    q[0] = _mm_unpacklo_epi8(lo, hi); /* byte i holds weight 2i (low nibble), 2i + 1 (high) */
    q[1] = _mm_unpackhi_epi8(lo, hi);
}

#endif
