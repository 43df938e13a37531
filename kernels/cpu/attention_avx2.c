/*
 * kernels/cpu/attention_avx2.c: one (token, head) of attention with AVX2, bit-identical to
 * ferry_cpu_attn_reference (cpu_kernels.c).
 *
 * The reference's arithmetic, vectorised where it is independent:
 * - scores: each is the canonical dot product (8 lanes over head_dim, summed pairwise), so
 *   8 keys at a time keep one ymm of lanes each and reduce8 sums them in the reference
 *   order; then times scale.
 * - the block's maximum, expf and the running sum l stay scalar, in position order (libm's
 *   expf, as the reference calls it).
 * - the output: o[d] = o[d] * corr, then o[d] = o[d] + p_j * v_j[d] for j in position
 *   order, per element d, so 8 elements per ymm give the same bits; up to 64 elements are
 *   held in registers across the block's positions.
 * A head_dim that is not a multiple of 8 goes to the reference.
 */
#include "kernels/cpu/cpu_kernels.h"

#if FERRY_CPU_X86
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2,f16c")))
#define INLINE static inline __attribute__((always_inline))
#define TILE_TARGET AVX2
#include "kernels/cpu/x86_reduce.h"

/* The scaled scores of the n <= 8 keys at k (rows stride floats apart) into s[0..n). */
AVX2 INLINE void scores8(float *s, const float *q, const float *k, size_t stride, int n, int hd,
                         float scale)
{
    const float *kr[8];
    __m256 acc[8];
    for (int u = 0; u < 8; u++) {
        kr[u] = k + (size_t)(u < n ? u : n - 1) * stride;
        acc[u] = _mm256_setzero_ps();
    }
    for (int i = 0; i < hd; i += 8) {
        __m256 qv = _mm256_loadu_ps(q + i);
        for (int u = 0; u < 8; u++)
            acc[u] = _mm256_add_ps(acc[u], _mm256_mul_ps(qv, _mm256_loadu_ps(kr[u] + i)));
    }
    float out[8];
    _mm256_storeu_ps(out, _mm256_mul_ps(reduce8(acc), _mm256_set1_ps(scale)));
    memcpy(s, out, (size_t)n * sizeof(float));
}

/* o[0 .. 8 NC) = o * corr + sum over j < n of p[j] * v_j, in j order. */
AVX2 INLINE void update(float *o, float corr, const float *p, const float *v, size_t stride,
                        int32_t n, int nc)
{
    __m256 ov[8], c = _mm256_set1_ps(corr);
    for (int i = 0; i < nc; i++)
        ov[i] = _mm256_mul_ps(_mm256_loadu_ps(o + 8 * i), c);
    for (int32_t j = 0; j < n; j++) {
        __m256 pv = _mm256_set1_ps(p[j]);
        const float *vr = v + (size_t)j * stride;
        for (int i = 0; i < nc; i++)
            ov[i] = _mm256_add_ps(ov[i], _mm256_mul_ps(pv, _mm256_loadu_ps(vr + 8 * i)));
    }
    for (int i = 0; i < nc; i++)
        _mm256_storeu_ps(o + 8 * i, ov[i]);
}

AVX2 void ferry_cpu_attn_avx2(float *o, const ferry_cpu_attn_head *a)
{
    int32_t hd = a->head_dim;
    if (hd % 8) {
        ferry_cpu_attn_reference(o, a);
        return;
    }
    float scores[FERRY_CPU_ATT_BLOCK];
    float m = -INFINITY, l = 0;
    memset(o, 0, (size_t)hd * sizeof *o);
    for (int32_t j0 = a->first; j0 <= a->last; j0 += FERRY_CPU_ATT_BLOCK) {
        int32_t jn = a->last + 1 - j0 < FERRY_CPU_ATT_BLOCK ? a->last + 1 - j0
                                                            : FERRY_CPU_ATT_BLOCK;
        for (int32_t j = 0; j < jn; j += 8)
            scores8(scores + j, a->q, a->k + (size_t)(j0 + j) * a->kv_stride, a->kv_stride,
                    jn - j < 8 ? (int)(jn - j) : 8, hd, a->scale);
        float bm = -INFINITY;
        for (int32_t j = 0; j < jn; j++)
            if (scores[j] > bm)
                bm = scores[j];
        float m_new = bm > m ? bm : m;
        float corr = expf(m - m_new); /* 0 on the first block (m = -inf) */
        l *= corr;
        for (int32_t j = 0; j < jn; j++) { /* the scores become the weights p_j */
            scores[j] = expf(scores[j] - m_new);
            l += scores[j];
        }
        const float *v = a->v + (size_t)j0 * a->kv_stride;
        int32_t d = 0;
        for (; d + 64 <= hd; d += 64)
            update(o + d, corr, scores, v + d, a->kv_stride, jn, 8);
        for (; d + 32 <= hd; d += 32)
            update(o + d, corr, scores, v + d, a->kv_stride, jn, 4);
        for (; d + 8 <= hd; d += 8)
            update(o + d, corr, scores, v + d, a->kv_stride, jn, 1);
        m = m_new;
    }
    __m256 inv = _mm256_set1_ps(1.0f / l);
    for (int32_t d = 0; d < hd; d += 8)
        _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), inv));
}

#endif /* FERRY_CPU_X86 */
