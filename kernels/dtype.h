/*
 * kernels/dtype.h: element types of weights and activations, and bf16/f16 conversion.
 *
 * Weights may be f32, f16 or bf16 (as stored in the checkpoint), or, for the experts of a
 * quantized pack, q8 or q4: rows of groups of 32 weights with their own scales (the layout
 * and the exact dequantized values are in kernels/quant.h). Activations and accumulators
 * are always f32. Conversions are exact (bf16/f16 -> f32) or round to nearest even
 * (f32 -> bf16/f16), matching PyTorch's casts.
 */
#ifndef FERRY_KERNELS_DTYPE_H
#define FERRY_KERNELS_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The size helpers below are also callable from CUDA device code. */
#ifdef __CUDACC__
#define FERRY_HOST_DEVICE __host__ __device__
#else
#define FERRY_HOST_DEVICE
#endif

typedef enum {
    FERRY_DTYPE_F32 = 0,
    FERRY_DTYPE_F16 = 1,
    FERRY_DTYPE_BF16 = 2,
    FERRY_DTYPE_Q8 = 3, /* groups of 32: f16 scale + 32 x int8 (34 bytes) */
    FERRY_DTYPE_Q4 = 4, /* groups of 32: f16 scale + f16 minimum + 32 x 4 bits (20 bytes) */
    FERRY_DTYPE_COUNT
} ferry_dtype;

/* Weights per group of a quantized row. */
#define FERRY_QUANT_GROUP 32

static inline FERRY_HOST_DEVICE int ferry_dtype_is_quant(ferry_dtype t)
{
    return t == FERRY_DTYPE_Q8 || t == FERRY_DTYPE_Q4;
}

/* Bytes per element of an element type (f32 4, f16 and bf16 2); 0 for a quantized type,
 * whose rows are measured by ferry_dtype_row_bytes. */
static inline FERRY_HOST_DEVICE size_t ferry_dtype_size(ferry_dtype t)
{
    return t == FERRY_DTYPE_F32 ? 4 : (t == FERRY_DTYPE_F16 || t == FERRY_DTYPE_BF16) ? 2 : 0;
}

/* Bytes of one group of a quantized type: 34 (q8), 20 (q4); 0 otherwise. */
static inline FERRY_HOST_DEVICE size_t ferry_quant_group_bytes(ferry_dtype t)
{
    return t == FERRY_DTYPE_Q8 ? 2 + FERRY_QUANT_GROUP
                               : t == FERRY_DTYPE_Q4 ? 4 + FERRY_QUANT_GROUP / 2 : 0;
}

/* Bytes of a row of cols weights of type t (for a quantized type, cols must be a multiple
 * of 32: the caller checks). */
static inline FERRY_HOST_DEVICE size_t ferry_dtype_row_bytes(ferry_dtype t, int64_t cols)
{
    if (ferry_dtype_is_quant(t))
        return (size_t)(cols / FERRY_QUANT_GROUP) * ferry_quant_group_bytes(t);
    return (size_t)cols * ferry_dtype_size(t);
}

/* "F32", "F16", "BF16" (the safetensors spelling), "Q8", "Q4". */
const char *ferry_dtype_name(ferry_dtype t);

static inline float ferry_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t ferry_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it a quiet NaN */
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float ferry_f16_to_f32(uint16_t h);
uint16_t ferry_f32_to_f16(float f);

#endif
