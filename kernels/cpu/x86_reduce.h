/*
 * kernels/cpu/x86_reduce.h: the canonical dot product's final step (cpu_kernels.h,
 * ferry_cpu_reduce_lanes) for eight dot products at once, shared by the exact x86 kernels
 * (matmul_avx2.c, matmul_avx512.c, attention_avx2.c); each includes it after defining
 * TILE_TARGET (its target attribute) and INLINE.
 */
#ifndef FERRY_KERNELS_CPU_X86_REDUCE_H
#define FERRY_KERNELS_CPU_X86_REDUCE_H

/* r[k] = ((a[k]0 + a[k]1) + (a[k]2 + a[k]3)) + ((a[k]4 + a[k]5) + (a[k]6 + a[k]7)). */
TILE_TARGET INLINE __m256 reduce8(const __m256 a[8])
{
    __m256 h0 = _mm256_hadd_ps(a[0], a[1]), h1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 h2 = _mm256_hadd_ps(a[4], a[5]), h3 = _mm256_hadd_ps(a[6], a[7]);
    __m256 g0 = _mm256_hadd_ps(h0, h1), g1 = _mm256_hadd_ps(h2, h3);
    return _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20),
                         _mm256_permute2f128_ps(g0, g1, 0x31));
}

#endif
