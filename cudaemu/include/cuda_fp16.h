/*
 * cudaemu/include/cuda_fp16.h: the emulated CUDA platform's half type and the conversions
 * the CUDA sources use. __half holds the IEEE binary16 bits; conversions to float are exact,
 * conversions from float round to nearest even as the _rn intrinsics do, with overflow to
 * infinity and NaN kept NaN. Written from the IEEE 754 definitions, sharing no code with
 * the project under test.
 */
#ifndef CUDAEMU_CUDA_FP16_H
#define CUDAEMU_CUDA_FP16_H

#include <cstdint>
#include <cstring>

#include "cudaemu_defs.h"

struct __half {
    uint16_t x;
};

__host__ __device__ inline __half __ushort_as_half(unsigned short u)
{
    __half h;
    h.x = u;
    return h;
}

__host__ __device__ inline unsigned short __half_as_ushort(__half h) { return h.x; }

__host__ __device__ inline float __half2float(__half h)
{
    uint32_t sign = (uint32_t)(h.x & 0x8000u) << 16;
    uint32_t exp = (h.x >> 10) & 0x1fu, man = h.x & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf, or NaN with its payload */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13); /* 127 - 15 = 112 */
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = 113;
        while (!(man & 0x400u)) {
            man <<= 1;
            e--;
        }
        bits = sign | ((uint32_t)e << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

__host__ __device__ inline __half __float2half_rn(float f)
{
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t exp = (u >> 23) & 0xffu, man = u & 0x7fffffu;
    if (exp == 0xff) /* inf stays inf; NaN stays a (quiet) NaN */
        return __ushort_as_half((uint16_t)(sign | 0x7c00u | (man ? 0x200u | (man >> 13) : 0)));
    int e = (int)exp - 112; /* the half exponent field, if normal */
    if (e >= 0x1f)
        return __ushort_as_half((uint16_t)(sign | 0x7c00u));
    uint32_t full, shift;
    if (e > 0) {
        full = (uint32_t)e << 23 | man; /* exponent and mantissa, rounded together below */
        shift = 13;
    } else {
        if (e < -10) /* below half the smallest subnormal: rounds to zero */
            return __ushort_as_half(sign);
        full = man | 0x800000u; /* the implicit bit, shifted into a subnormal */
        shift = (uint32_t)(14 - e);
    }
    uint32_t kept = full >> shift, rest = full & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (kept & 1u)))
        kept++; /* a carry into the exponent is the right result (up to infinity) */
    return __ushort_as_half((uint16_t)(sign | kept));
}

__host__ __device__ inline __half __float2half(float f) { return __float2half_rn(f); }

#endif
