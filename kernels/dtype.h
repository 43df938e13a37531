/*
 * kernels/dtype.h: element types of weights and activations, and bf16/f16 conversion.
 *
 * Weights may be f32, f16 or bf16 (as stored in the checkpoint); activations and
 * accumulators are always f32. Conversions are exact (bf16/f16 -> f32) or round to
 * nearest even (f32 -> bf16/f16), matching PyTorch's casts.
 */
#ifndef FERRY_KERNELS_DTYPE_H
#define FERRY_KERNELS_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef enum {
    FERRY_DTYPE_F32 = 0,
    FERRY_DTYPE_F16 = 1,
    FERRY_DTYPE_BF16 = 2,
    FERRY_DTYPE_COUNT
} ferry_dtype;

/* Bytes per element. */
static inline size_t ferry_dtype_size(ferry_dtype t) { return t == FERRY_DTYPE_F32 ? 4 : 2; }

/* "F32", "F16", "BF16" (the safetensors spelling). */
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
