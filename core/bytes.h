/*
 * core/bytes.h: little-endian fields of ferry's binary files (the pack file, the routing
 * statistics file).
 */
#ifndef FERRY_CORE_BYTES_H
#define FERRY_CORE_BYTES_H

#include <stdint.h>

static inline void ferry_put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void ferry_put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint32_t ferry_get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t ferry_get_u64(const uint8_t *p)
{
    return (uint64_t)ferry_get_u32(p) | (uint64_t)ferry_get_u32(p + 4) << 32;
}

#endif
