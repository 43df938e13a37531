/*
 * kernels/cpu/matmul_avx512bf16.c: the AVX512-BF16 matmul. NOT bit-identical to the
 * reference: the activations are rounded to bf16 (to nearest even, as ferry_f32_to_bf16,
 * except that the instruction treats f32 denormals as zero) and multiplied with the bf16
 * weights by vdpbf16ps, which adds two products at a time into float lanes with its own
 * rounding. Results are within 1e-2 relative L2 error of the reference, like the CUDA
 * backend's cuBLAS path. Each output still depends only on its own x row and weight row
 * (the same instructions on the same values in the same order whatever n, the thread count
 * or the row split), so prefill and decode agree bit for bit on this kernel. Weights in
 * f32 or f16 run the exact AVX-512 kernel instead.
 *
 * Layout: one zmm holds 16 float lanes for one (row, token); a step takes 32 columns (32
 * bf16 weights of the row, the token's 32 activations rounded to bf16) and lane l gains
 * w[2l] * x[2l] + w[2l + 1] * x[2l + 1]. The last cols % 32 columns are zero-padded (masked
 * loads: nothing is read past a row). A tile is RB rows by up to TB tokens; at the end the
 * 16 lanes of each output are summed by _mm512_reduce_add_ps. Two paths, with the same
 * steps on the same values:
 * - n <= TB (decode): weights and activations come from memory as they stream by, the
 *   activations converted in registers.
 * - n > TB (prefill): for SB tiles of rows (a superblock) and up to GROUP tokens, CHUNK
 *   columns of the rows are copied into a contiguous buffer and each tile of tokens is
 *   converted once into another, so that both sit in L1 while every tile of the superblock
 *   uses them; the accumulators wait in memory between chunks.
 */
#include "kernels/cpu/cpu_kernels.h"

#if FERRY_CPU_X86
#include <immintrin.h>
#include <string.h>

#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define INLINE static inline __attribute__((always_inline))

#define RB 6          /* rows per tile (RB * TB accumulators + RB weights: 30 of 32 zmm) */
#define TB 4          /* tokens per tile at most */
#define SB 4          /* tiles of rows per superblock (n > TB) */
#define SBR (SB * RB) /* rows per superblock */
#define CHUNK 256     /* columns per buffered chunk (n > TB): a multiple of 32 */
#define GROUP 16      /* tokens whose accumulators wait in memory between chunks (n > TB) */
#define PF_BYTES 1024 /* how far ahead of the streaming rows to prefetch (n <= TB) */

/* Activations x[0 .. m) (m <= 32) as bf16, zeros after. */
BF16 INLINE __m512bh convert_x(const float *x, int m)
{
    __m512 lo, hi;
    if (m == 32) {
        lo = _mm512_loadu_ps(x);
        hi = _mm512_loadu_ps(x + 16);
    } else {
        lo = _mm512_maskz_loadu_ps((__mmask16)((m >= 16 ? 0x10000u : 1u << m) - 1), x);
        hi = _mm512_maskz_loadu_ps((__mmask16)(m > 16 ? (1u << (m - 16)) - 1 : 0), x + 16);
    }
    return _mm512_cvtne2ps_pbh(hi, lo); /* the second operand fills the low half */
}

/* Weights w[0 .. m) (m <= 32) of a bf16 row, zeros after. */
BF16 INLINE __m512bh load_w(const uint16_t *w, int m)
{
    if (m == 32)
        return (__m512bh)_mm512_loadu_si512(w);
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << m) - 1), w);
}

BF16 INLINE void step(__m512 acc[RB][TB], const __m512bh *wv, __m512bh xv, int t)
{
    for (int r = 0; r < RB; r++)
        acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
}

/* n <= TB: rows w[] by tokens x[] over all cols, from memory; stores rows [0, nr) of out
 * (which points at token 0, row 0). */
BF16 INLINE void tile_stream(float *out, int64_t ld, const uint16_t *const *w,
                             const float *const *x, int64_t cols, int nr, int nt)
{
    __m512 acc[RB][TB];
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TB; t++)
            acc[r][t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < cols; c += 32) {
        int m = cols - c < 32 ? (int)(cols - c) : 32;
        __m512bh wv[RB];
        for (int r = 0; r < RB; r++) {
            _mm_prefetch((const char *)(w[r] + c) + PF_BYTES, _MM_HINT_T0);
            wv[r] = load_w(w[r] + c, m);
        }
        for (int t = 0; t < nt; t++)
            step(acc, wv, convert_x(x[t] + c, m), t);
    }
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < nr; r++)
            out[t * ld + r] = _mm512_reduce_add_ps(acc[r][t]);
}

/* n > TB: n_steps steps of the rows at wb (row stride CHUNK) and the converted tokens at
 * xb (token stride CHUNK), added to the accumulators at saved (token t, row r at
 * saved[t * SBR + r]). */
BF16 INLINE void tile_block(__m512 *saved, const uint16_t *wb, const uint16_t *xb, int n_steps,
                            int nt)
{
    __m512 acc[RB][TB];
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TB; t++)
            acc[r][t] = t < nt ? saved[t * SBR + r] : _mm512_setzero_ps();
    for (int s = 0; s < n_steps; s++) {
        __m512bh wv[RB];
        for (int r = 0; r < RB; r++)
            wv[r] = (__m512bh)_mm512_loadu_si512(wb + r * CHUNK + s * 32);
        for (int t = 0; t < nt; t++)
            step(acc, wv, (__m512bh)_mm512_loadu_si512(xb + t * CHUNK + s * 32), t);
    }
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < nt; t++)
            saved[t * SBR + r] = acc[r][t];
}

/* Fixed instances, so the loops above unroll and the tile stays in registers. */
#define BY_NT(nt, call, ...)                                                                       \
    switch (nt) {                                                                                  \
    case 1: call(__VA_ARGS__, 1); break;                                                           \
    case 2: call(__VA_ARGS__, 2); break;                                                           \
    case 3: call(__VA_ARGS__, 3); break;                                                           \
    default: call(__VA_ARGS__, 4); break;                                                          \
    }

static BF16 void stream_any(float *out, int64_t ld, const uint16_t *const *w, const float *const *x,
                            int64_t cols, int nr, int nt)
{
    BY_NT(nt, tile_stream, out, ld, w, x, cols, nr)
}

static BF16 void block_any(__m512 *saved, const uint16_t *wb, const uint16_t *xb, int n_steps,
                           int nt)
{
    BY_NT(nt, tile_block, saved, wb, xb, n_steps)
}

/* n > TB: rows [j, j + nr) (nr <= SBR) of out for all n tokens. */
static BF16 void superblock(float *out, const float *x, const ferry_weight *w, int32_t n, int64_t j,
                            int nr)
{
    int64_t cols = w->cols, rows = w->rows;
    const uint16_t *w0 = (const uint16_t *)w->d_data + (size_t)j * (size_t)cols;
    _Alignas(64) uint16_t wb[SBR * CHUNK];
    _Alignas(64) uint16_t xb[TB * CHUNK];
    _Alignas(64) __m512 saved[GROUP * SBR];
    int n_tiles = (nr + RB - 1) / RB;
    /* rows past nr in the last tile: zeros, computed and not stored */
    memset(wb + nr * CHUNK, 0, (size_t)(n_tiles * RB - nr) * CHUNK * sizeof wb[0]);
    for (int32_t g0 = 0; g0 < n; g0 += GROUP) {
        int32_t ng = n - g0 < GROUP ? n - g0 : GROUP;
        memset(saved, 0, (size_t)ng * SBR * sizeof saved[0]);
        for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
            int m = cols - c0 < CHUNK ? (int)(cols - c0) : CHUNK;
            int n_steps = (m + 31) / 32;
            for (int r = 0; r < nr; r++) {
                memcpy(wb + r * CHUNK, w0 + (size_t)r * (size_t)cols + c0, (size_t)m * 2);
                memset(wb + r * CHUNK + m, 0, (size_t)(n_steps * 32 - m) * 2);
            }
            for (int32_t t = 0; t < ng; t += TB) {
                int nt = ng - t < TB ? ng - t : TB;
                for (int k = 0; k < nt; k++) {
                    const float *xr = x + (size_t)(g0 + t + k) * (size_t)cols + c0;
                    for (int s = 0; s < n_steps; s++) {
                        int ms = m - s * 32 < 32 ? m - s * 32 : 32;
                        _mm512_store_si512(xb + k * CHUNK + s * 32,
                                           (__m512i)convert_x(xr + s * 32, ms));
                    }
                }
                for (int b = 0; b < n_tiles; b++)
                    block_any(saved + t * SBR + b * RB, wb + b * RB * CHUNK, xb, n_steps, nt);
            }
        }
        for (int32_t t = 0; t < ng; t++)
            for (int r = 0; r < nr; r++)
                out[(size_t)(g0 + t) * (size_t)rows + (size_t)(j + r)] =
                    _mm512_reduce_add_ps(saved[t * SBR + r]);
    }
}

BF16 void ferry_cpu_matmul_avx512bf16(float *out, const float *x, const ferry_weight *w, int32_t n,
                                      int64_t j0, int64_t j1)
{
    if (w->dtype != FERRY_DTYPE_BF16) {
        ferry_cpu_matmul_avx512(out, x, w, n, j0, j1);
        return;
    }
    int64_t cols = w->cols, rows = w->rows;
    if (n > TB) {
        for (int64_t j = j0; j < j1; j += SBR)
            superblock(out, x, w, n, j, j1 - j < SBR ? (int)(j1 - j) : SBR);
        return;
    }
    const float *xr[TB];
    for (int t = 0; t < TB; t++)
        xr[t] = x + (size_t)(t < n ? t : 0) * (size_t)cols;
    for (int64_t j = j0; j < j1; j += RB) {
        int nr = j1 - j < RB ? (int)(j1 - j) : RB;
        const uint16_t *wr[RB];
        for (int r = 0; r < RB; r++)
            wr[r] =
                (const uint16_t *)w->d_data + (size_t)(j + (r < nr ? r : nr - 1)) * (size_t)cols;
        stream_any(out + j, rows, wr, xr, cols, nr, n);
    }
}

#endif /* FERRY_CPU_X86 */
