/*
 * kernels/cpu/matmul_avx2.c: the AVX2 matmul, bit-identical to the reference kernel.
 *
 * The reference gives output (t, j) eight float lanes: lane l sums x[i] * w[i] over the
 * columns i = l (mod 8) in increasing order (product rounded, then sum rounded), and the
 * lanes are summed pairwise at the end. Here those eight lanes are one ymm register, and a
 * step over the next 8 columns is acc = acc + x * w (a mul and an add, never a fused
 * multiply-add, so each rounds as in the reference), w the 8 widened weights of the row
 * and x the token's 8 activations. A tile is RB rows by up to TB tokens: RB * TB
 * independent add chains, and each widened vector of weights serves every token of the tile.
 *
 * The column walk, the two paths (streaming decode, chunked prefill and quantized rows) and
 * the reduction are shared with the AVX-512 kernel (matmul_x86_tile.h, matmul_x86_driver.h);
 * what is here is the register layout. At the end the lanes of 8 outputs are summed in the
 * reference order by a transposing reduction (reduce8).
 */
#include "kernels/cpu/cpu_kernels.h"

#if FERRY_CPU_X86
#include <immintrin.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2,f16c")))
#define INLINE static inline __attribute__((always_inline))

#define RB 4         /* rows per tile */
#define TB 2         /* tokens per tile at most */
#define VB RB        /* vectors per token of a tile: one per row */
#define CHUNK 512    /* columns widened at once (chunk path) */
#define GROUP 64     /* tokens served by one widened chunk (chunk path) */
#define PF_BYTES 512 /* how far ahead of the streaming rows to prefetch */
/* A pseudo dtype: weights already widened into the chunk buffer, where a row's 8 floats
 * for columns c..c+7 sit at byte offset c * WIDE_COL_BYTES from the row's start. */
#define WIDE FERRY_DTYPE_COUNT
#define WIDE_COL_BYTES (RB * 4)

typedef __m256 tile_vec;
typedef tile_vec tile_acc[VB][TB];
#define VADD _mm256_add_ps
#define VMUL _mm256_mul_ps
#define VZERO _mm256_setzero_ps

#define TILE_TARGET AVX2
#include "kernels/cpu/matmul_x86_quant.h"

/* Columns c..c+7 of row b of the tile, as floats. */
AVX2 INLINE __m256 load_block(const char *const *w, int b, int64_t c, int dt)
{
    const char *a = w[b] + col_offset(dt, c);
    if (dt == WIDE || dt == FERRY_DTYPE_F32)
        return _mm256_loadu_ps((const float *)a);
    __m128i h = _mm_loadu_si128((const void *)a);
    if (dt == FERRY_DTYPE_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* The quantized group at column c (a multiple of 32) of row b of the tile, as 4 vectors
 * (columns c..c+7, ..., c+24..c+31). */
AVX2 INLINE void load_group(__m256 wv[4], const char *const *w, int b, int64_t c, int dt)
{
    __m128i q[2];
    float d, m;
    group_codes(w[b] + col_offset(dt, c), dt, q, &d, &m);
    __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
    for (int k = 0; k < 4; k++) {
        __m128i q8 = k % 2 ? _mm_unpackhi_epi64(q[k / 2], q[k / 2]) : q[k / 2];
        __m256i i = dt == FERRY_DTYPE_Q8 ? _mm256_cvtepi8_epi32(q8) : _mm256_cvtepu8_epi32(q8);
        __m256 v = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(i));
        wv[k] = dt == FERRY_DTYPE_Q8 ? v : _mm256_add_ps(v, mv);
    }
}

AVX2 INLINE __m256 load_x(const float *p)
{
    return _mm256_loadu_ps(p);
}

#include "kernels/cpu/matmul_x86_tile.h"

/* Reduces the tile and stores rows [0, nr) of its nt tokens; out points at (token 0, row 0). */
AVX2 INLINE void store_tile(float *out, int64_t ld, tile_acc acc, int nt, int nr)
{
    for (int t = 0; t < nt; t += 2) {
        __m256 a[8];
        for (int r = 0; r < RB; r++) {
            a[r] = acc[r][t];
            a[RB + r] = t + 1 < nt ? acc[r][t + 1] : _mm256_setzero_ps();
        }
        float res[8];
        _mm256_storeu_ps(res, reduce8(a));
        memcpy(out + t * ld, res, (size_t)nr * sizeof(float));
        if (t + 1 < nt)
            memcpy(out + (t + 1) * ld, res + RB, (size_t)nr * sizeof(float));
    }
}

/* Fixed (nt, dt) instances, so the loops above unroll and the tile stays in registers. */
#define BY_NT(nt, call, ...)                                                                       \
    do {                                                                                           \
        if ((nt) == 1)                                                                             \
            call(__VA_ARGS__, 1);                                                                  \
        else                                                                                       \
            call(__VA_ARGS__, 2);                                                                  \
    } while (0)

#include "kernels/cpu/matmul_x86_driver.h"

AVX2 void ferry_cpu_matmul_avx2(float *out, const float *x, const ferry_weight *w, int32_t n,
                                int64_t j0, int64_t j1)
{
    matmul_tiles(out, x, w, n, j0, j1);
}

#endif /* FERRY_CPU_X86 */
