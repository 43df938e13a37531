/*
 * kernels/dtype.c: IEEE half precision conversion (exact widening, round-to-nearest-even
 * narrowing) and dtype names.
 */
#include "kernels/dtype.h"

const char *ferry_dtype_name(ferry_dtype t)
{
    switch (t) {
    case FERRY_DTYPE_F32: return "F32";
    case FERRY_DTYPE_F16: return "F16";
    case FERRY_DTYPE_BF16: return "BF16";
    case FERRY_DTYPE_Q8: return "Q8";
    case FERRY_DTYPE_Q4: return "Q4";
    default: return "?";
    }
}

float ferry_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else {
        /* subnormal: normalise the mantissa */
        int e = -1;
        do {
            e++;
            man <<= 1;
        } while ((man & 0x400u) == 0);
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t ferry_f32_to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u)
        return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u) /* rounds to >= 65520: infinity */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) {
        /* result is subnormal or zero: add 0.5 (as f32) to let the FPU round */
        float t;
        uint32_t au = a;
        memcpy(&t, &au, 4);
        t += 0.5f;
        memcpy(&au, &t, 4);
        return (uint16_t)(sign | (au - 0x3f000000u));
    }
    uint32_t r = a - ((uint32_t)(127 - 15) << 23);
    r += 0xfffu + ((a >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}
