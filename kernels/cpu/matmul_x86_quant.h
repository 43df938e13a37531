/*
 * kernels/cpu/matmul_x86_quant.h: where the exact x86 matmul kernels (matmul_avx2.c,
 * matmul_avx512.c) find 8 columns of a weight row, and the widening of 8 quantized weights,
 * written once and included by each after it has defined TILE_TARGET, INLINE, WIDE and
 * WIDE_COL_BYTES (and before its step, which calls these).
 *
 * A q8 or q4 row is groups of 32 weights (kernels/quant.h); 8 columns c..c+7 with c a
 * multiple of 8 always lie in one group. They are widened to exactly the values
 * ferry_quant_weight defines: the f16 scale (and minimum) widened exactly by F16C, q8:
 * d * q, q4: (d * q) + m as a separate multiply and add, so a fused kernel equals the
 * reference's dequantize-then-multiply bit for bit.
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

/* Weights c..c+7 of the quantized row starting at row. */
TILE_TARGET INLINE __m256 load8_quant(const char *row, int64_t c, int dt)
{
    const char *g = row + col_offset(dt, c);
    int k = (int)(c % FERRY_QUANT_GROUP);
    __m256 d = _mm256_set1_ps(f16_at(g));
    if (dt == FERRY_DTYPE_Q8) {
        __m128i q = _mm_loadl_epi64((const void *)(g + 2 + k));
        return _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
    }
    uint32_t v;
    memcpy(&v, g + 4 + k / 2, 4);
    __m128i b = _mm_cvtsi32_si128((int)v), mask = _mm_set1_epi8(15);
    __m128i q = _mm_unpacklo_epi8(_mm_and_si128(b, mask), _mm_and_si128(_mm_srli_epi16(b, 4), mask));
    __m256 dq = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)));
    return _mm256_add_ps(dq, _mm256_set1_ps(f16_at(g + 2)));
}

#endif
