/*
 * cudaemu/include/cuda_bf16.h: the emulated CUDA platform's bfloat16 type and conversions.
 * bfloat16 is the top half of a float32: widening is exact; narrowing rounds to nearest
 * even, and a NaN stays a (quiet) NaN rather than rounding into infinity.
 */
#ifndef CUDAEMU_CUDA_BF16_H
#define CUDAEMU_CUDA_BF16_H

#include <cstdint>
#include <cstring>

#include "cudaemu_defs.h"

struct __nv_bfloat16 {
    uint16_t x;
};

__host__ __device__ inline float __bfloat162float(__nv_bfloat16 h)
{
    uint32_t u = (uint32_t)h.x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

__host__ __device__ inline __nv_bfloat16 __float2bfloat16_rn(float f)
{
    uint32_t u;
    std::memcpy(&u, &f, 4);
    __nv_bfloat16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        h.x = (uint16_t)((u >> 16) | 0x40u);
        return h;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    h.x = (uint16_t)(u >> 16);
    return h;
}

__host__ __device__ inline __nv_bfloat16 __float2bfloat16(float f)
{
    return __float2bfloat16_rn(f);
}

#endif
