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
 * Two paths, the same operations in the same order for every output:
 * - n <= TB (decode): weights are widened from memory as they stream by.
 * - n > TB (prefill): per tile of rows, CHUNK columns are widened once into a buffer (the
 *   rows interleaved, as they are used) and then serve up to GROUP tokens, whose
 *   accumulators wait in memory between chunks.
 * The last cols % 8 columns go through zero-padded copies (never reading past a row): they
 * add +0 to the lanes the reference leaves alone, which changes no bit, since a lane
 * starts at +0 and can never become -0. Rows past the end of the range repeat the last
 * row and are not stored. At the end the lanes of 8 outputs are summed in the reference
 * order by a transposing reduction (reduce8).
 */
#include "kernels/cpu/cpu_kernels.h"

#if FERRY_CPU_X86
#include <immintrin.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2,f16c")))
#define INLINE static inline __attribute__((always_inline))

#define RB 4         /* rows per tile */
#define TB 2         /* tokens per tile at most */
#define CHUNK 512    /* columns widened at once (n > TB) */
#define GROUP 64     /* tokens served by one widened chunk (n > TB) */
#define PF_BYTES 512 /* how far ahead of the streaming rows to prefetch */
/* A pseudo dtype: weights already widened into the chunk buffer, where a row's 8 floats
 * for columns c..c+7 sit at byte offset c * WIDE_COL_BYTES from the row's start. */
#define WIDE FERRY_DTYPE_COUNT
#define WIDE_COL_BYTES (RB * 4)

typedef __m256 tile_acc[RB][TB];

#define TILE_TARGET AVX2
#include "kernels/cpu/matmul_x86_quant.h"

/* Columns c..c+7 of the row starting at row, as floats. */
AVX2 INLINE __m256 load_row(const char *row, int64_t c, int dt)
{
    if (ferry_dtype_is_quant((ferry_dtype)dt))
        return load8_quant(row, c, dt);
    const char *a = row + col_offset(dt, c);
    if (dt == WIDE || dt == FERRY_DTYPE_F32)
        return _mm256_loadu_ps((const float *)a);
    __m128i h = _mm_loadu_si128((const void *)a);
    if (dt == FERRY_DTYPE_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* One step: weight columns [wc, wc + 8) of the rows w[], activation columns [c, c + 8) of
 * the tokens x[]. */
AVX2 INLINE void step(tile_acc acc, const char *const *w, int64_t wc, const float *const *x,
                      int64_t c, int nt, int dt)
{
    __m256 wv[RB];
    for (int r = 0; r < RB; r++)
        wv[r] = load_row(w[r], wc, dt);
    for (int t = 0; t < nt; t++) {
        __m256 xv = _mm256_loadu_ps(x[t] + c);
        for (int r = 0; r < RB; r++)
            acc[r][t] = _mm256_add_ps(acc[r][t], _mm256_mul_ps(xv, wv[r]));
    }
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

/* The tile of rows w[] and tokens x[], accumulated over all cols from the weights in memory. */
AVX2 INLINE void tile_stream(float *out, int64_t ld, const char *const *w, const float *const *x,
                             int64_t cols, int nr, int dt, int nt)
{
    tile_acc acc;
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TB; t++)
            acc[r][t] = _mm256_setzero_ps();
    accumulate(acc, w, x, cols, nt, dt);
    store_tile(out, ld, acc, nt, nr);
}

/* Columns [0, m) of the chunk, for the tokens x[] whose accumulators are at saved. */
AVX2 INLINE void tile_wide(__m256 *saved, const char *const *w, const float *const *x, int64_t m,
                           int nt)
{
    tile_acc acc;
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TB; t++)
            acc[r][t] = t < nt ? saved[t * RB + r] : _mm256_setzero_ps();
    accumulate(acc, w, x, m, nt, WIDE);
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < nt; t++)
            saved[t * RB + r] = acc[r][t];
}

/* Fixed (nt, dt) instances, so the loops above unroll and the tile stays in registers. */
#define BY_NT(nt, call, ...)                                                                       \
    do {                                                                                           \
        if ((nt) == 1)                                                                             \
            call(__VA_ARGS__, 1);                                                                  \
        else                                                                                       \
            call(__VA_ARGS__, 2);                                                                  \
    } while (0)

static AVX2 void stream_any(float *out, int64_t ld, const char *const *w, const float *const *x,
                            int64_t cols, int nr, ferry_dtype dt, int nt)
{
    switch (dt) {
    case FERRY_DTYPE_F32: BY_NT(nt, tile_stream, out, ld, w, x, cols, nr, FERRY_DTYPE_F32); break;
    case FERRY_DTYPE_F16: BY_NT(nt, tile_stream, out, ld, w, x, cols, nr, FERRY_DTYPE_F16); break;
    case FERRY_DTYPE_Q8: BY_NT(nt, tile_stream, out, ld, w, x, cols, nr, FERRY_DTYPE_Q8); break;
    case FERRY_DTYPE_Q4: BY_NT(nt, tile_stream, out, ld, w, x, cols, nr, FERRY_DTYPE_Q4); break;
    default: BY_NT(nt, tile_stream, out, ld, w, x, cols, nr, FERRY_DTYPE_BF16); break;
    }
}

/* Widens columns [c0, c0 + m) of the rows w[] into buf, zero-padded to a multiple of 8
 * columns (a quantized row has whole groups: no padding). */
static AVX2 void widen_chunk(__m256 *buf, const char *const *w, int64_t c0, int64_t m,
                             ferry_dtype dt)
{
    int64_t c = 0;
    for (; c + 8 <= m; c += 8, buf += RB)
        for (int r = 0; r < RB; r++)
            buf[r] = load_row(w[r], c0 + c, dt);
    if (c == m)
        return;
    size_t es = ferry_dtype_size(dt);
    char wpad[RB][32] = {{0}};
    for (int r = 0; r < RB; r++) {
        memcpy(wpad[r], w[r] + (size_t)(c0 + c) * es, (size_t)(m - c) * es);
        buf[r] = load_row(wpad[r], 0, dt);
    }
}

AVX2 void ferry_cpu_matmul_avx2(float *out, const float *x, const ferry_weight *w, int32_t n,
                                int64_t j0, int64_t j1)
{
    int64_t cols = w->cols, rows = w->rows;
    size_t row_bytes = ferry_dtype_row_bytes(w->dtype, cols);
    for (int64_t j = j0; j < j1; j += RB) {
        int nr = j1 - j < RB ? (int)(j1 - j) : RB;
        const char *wr[RB];
        for (int r = 0; r < RB; r++)
            wr[r] = (const char *)w->d_data + (size_t)(j + (r < nr ? r : nr - 1)) * row_bytes;
        if (n <= TB) {
            const float *xr[TB];
            for (int t = 0; t < TB; t++)
                xr[t] = x + (size_t)(t < n ? t : 0) * (size_t)cols;
            stream_any(out + j, rows, wr, xr, cols, nr, w->dtype, n);
            continue;
        }
        __m256 wide[CHUNK / 8 * RB];
        __m256 saved[GROUP * RB];
        const char *wp[RB];
        for (int r = 0; r < RB; r++)
            wp[r] = (const char *)(wide + r);
        for (int32_t g0 = 0; g0 < n; g0 += GROUP) {
            int32_t ng = n - g0 < GROUP ? n - g0 : GROUP;
            memset(saved, 0, (size_t)ng * RB * sizeof saved[0]);
            for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
                int64_t m = cols - c0 < CHUNK ? cols - c0 : CHUNK;
                widen_chunk(wide, wr, c0, m, w->dtype);
                for (int32_t t = 0; t < ng; t += TB) {
                    int nt = ng - t < TB ? ng - t : TB;
                    const float *xr[TB];
                    for (int k = 0; k < TB; k++)
                        xr[k] = x + (size_t)(g0 + t + (k < nt ? k : 0)) * (size_t)cols + c0;
                    BY_NT(nt, tile_wide, saved + t * RB, wp, xr, m);
                }
            }
            for (int32_t t = 0; t < ng; t += TB) {
                int nt = ng - t < TB ? ng - t : TB;
                tile_acc acc;
                for (int r = 0; r < RB; r++)
                    for (int k = 0; k < TB; k++)
                        acc[r][k] = k < nt ? saved[(t + k) * RB + r] : _mm256_setzero_ps();
                store_tile(out + (size_t)(g0 + t) * (size_t)rows + j, rows, acc, nt, nr);
            }
        }
    }
}

#endif /* FERRY_CPU_X86 */
