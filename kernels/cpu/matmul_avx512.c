/*
 * kernels/cpu/matmul_avx512.c: the AVX-512 matmul, bit-identical to the reference kernel.
 *
 * The reference gives output (t, j) eight float lanes: lane l sums x[i] * w[i] over the
 * columns i = l (mod 8) in increasing order (product rounded, then sum rounded), and the
 * lanes are summed pairwise at the end. Here one zmm register holds those eight lanes for
 * two weight rows and one token:
 *
 *     acc = [ row j: lanes 0..7 | row j+1: lanes 0..7 ]
 *
 * and a step over the next 8 columns is acc = acc + x * w: w holds 8 widened weights of
 * row j and 8 of row j+1, x the token's 8 activations broadcast to both halves (a mul and
 * an add, never a fused multiply-add, so each rounds as in the reference). A tile is RB
 * rows (RB / 2 zmm) by up to TB tokens: that many independent add chains, and each
 * widened block of weights serves every token of the tile.
 *
 * The column walk, the two paths (streaming decode, chunked prefill and quantized rows) and
 * the reduction are shared with the AVX2 kernel (matmul_x86_tile.h, matmul_x86_driver.h);
 * what is here is the register layout. At the end the lanes of 8 outputs are summed in the
 * reference order by a transposing reduction (reduce8).
 */
#include "kernels/cpu/cpu_kernels.h"

#if FERRY_CPU_X86
#include <immintrin.h>
#include <string.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c")))
#define INLINE static inline __attribute__((always_inline))

#define RB 8         /* rows per tile */
#define TB 4         /* tokens per tile at most */
#define VB (RB / 2)  /* vectors per token of a tile: one per row pair */
#define CHUNK 512    /* columns widened at once (chunk path) */
#define GROUP 64     /* tokens served by one widened chunk (chunk path) */
#define PF_BYTES 512 /* how far ahead of the streaming rows to prefetch */
/* A pseudo dtype: weights already widened into the chunk buffer, where a row pair's 16
 * floats for columns c..c+7 sit at byte offset c * WIDE_COL_BYTES from the pair's start. */
#define WIDE FERRY_DTYPE_COUNT
#define WIDE_COL_BYTES (RB * 4)

typedef __m512 tile_vec;
typedef tile_vec tile_acc[VB][TB];
#define VADD _mm512_add_ps
#define VMUL _mm512_mul_ps
#define VZERO _mm512_setzero_ps

#define TILE_TARGET AVX512
#include "kernels/cpu/matmul_x86_quant.h"

/* Columns c..c+7 of the tile's row pair b, as floats [row 2b | row 2b + 1]. */
AVX512 INLINE __m512 load_block(const char *const *w, int b, int64_t c, int dt)
{
    const char *a = w[2 * b] + col_offset(dt, c), *bb = w[2 * b + 1] + col_offset(dt, c);
    if (dt == WIDE)
        return _mm512_loadu_ps(a);
    if (dt == FERRY_DTYPE_F32) {
        __m256d lo = _mm256_castps_pd(_mm256_loadu_ps((const float *)a));
        __m256d hi = _mm256_castps_pd(_mm256_loadu_ps((const float *)bb));
        return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(lo), hi, 1));
    }
    __m256i h = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const void *)a)),
                                        _mm_loadu_si128((const void *)bb), 1);
    if (dt == FERRY_DTYPE_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* [a x 8 | b x 8] */
AVX512 INLINE __m512 pair_set(float a, float b)
{
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(
                                                   _mm256_set1_ps(a))),
                                               _mm256_castps_pd(_mm256_set1_ps(b)), 1));
}

/* The quantized groups at column c (a multiple of 32) of the tile's row pair b, as 4
 * vectors [row 2b | row 2b + 1] (columns c..c+7, ..., c+24..c+31). */
AVX512 INLINE void load_group(__m512 wv[4], const char *const *w, int b, int64_t c, int dt)
{
    __m128i qa[2], qb[2];
    float da, ma, db, mb;
    group_codes(w[2 * b] + col_offset(dt, c), dt, qa, &da, &ma);
    group_codes(w[2 * b + 1] + col_offset(dt, c), dt, qb, &db, &mb);
    __m512 dv = pair_set(da, db), mv = pair_set(ma, mb);
    for (int k = 0; k < 4; k++) {
        __m128i q16 = k % 2 ? _mm_unpackhi_epi64(qa[k / 2], qb[k / 2])
                            : _mm_unpacklo_epi64(qa[k / 2], qb[k / 2]);
        __m512i i = dt == FERRY_DTYPE_Q8 ? _mm512_cvtepi8_epi32(q16) : _mm512_cvtepu8_epi32(q16);
        __m512 v = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(i));
        wv[k] = dt == FERRY_DTYPE_Q8 ? v : _mm512_add_ps(v, mv);
    }
}

/* The 8 activations at p in both halves. */
AVX512 INLINE __m512 load_x(const float *p)
{
    return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))));
}

#include "kernels/cpu/matmul_x86_tile.h"

/* Reduces the tile and stores rows [0, nr) of its nt tokens; out points at (token 0, row 0). */
AVX512 INLINE void store_tile(float *out, int64_t ld, tile_acc acc, int nt, int nr)
{
    for (int t = 0; t < nt; t++) {
        __m256 a[8];
        for (int p = 0; p < RB / 2; p++) {
            a[2 * p] = _mm512_castps512_ps256(acc[p][t]);
            a[2 * p + 1] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[p][t]), 1));
        }
        __m256 r = reduce8(a);
        if (nr == RB) {
            _mm256_storeu_ps(out + t * ld, r);
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, r);
            memcpy(out + t * ld, tmp, (size_t)nr * sizeof(float));
        }
    }
}

/* Fixed (nt, dt) instances, so the loops above unroll and the tile stays in registers. */
#define BY_NT(nt, call, ...)                                                                       \
    switch (nt) {                                                                                  \
    case 1: call(__VA_ARGS__, 1); break;                                                           \
    case 2: call(__VA_ARGS__, 2); break;                                                           \
    case 3: call(__VA_ARGS__, 3); break;                                                           \
    default: call(__VA_ARGS__, 4); break;                                                          \
    }

#include "kernels/cpu/matmul_x86_driver.h"

AVX512 void ferry_cpu_matmul_avx512(float *out, const float *x, const ferry_weight *w, int32_t n,
                                    int64_t j0, int64_t j1)
{
    matmul_tiles(out, x, w, n, j0, j1);
}

#endif /* FERRY_CPU_X86 */
