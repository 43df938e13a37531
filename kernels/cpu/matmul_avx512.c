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
 * Two paths, the same operations in the same order for every output:
 * - n <= TB (decode): weights are widened from memory as they stream by.
 * - n > TB (prefill): per tile of rows, CHUNK columns are widened once into a buffer
 *   (row pairs interleaved, as they are used) and then serve up to GROUP tokens, whose
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

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c")))
#define INLINE static inline __attribute__((always_inline))

#define RB 8         /* rows per tile: RB / 2 zmm per token */
#define TB 4         /* tokens per tile at most */
#define CHUNK 512    /* columns widened at once (n > TB) */
#define GROUP 64     /* tokens served by one widened chunk (n > TB) */
#define PF_BYTES 512 /* how far ahead of the streaming rows to prefetch */
/* A pseudo dtype: weights already widened into the chunk buffer, where a row pair's 16
 * floats for columns c..c+7 sit at byte offset c * WIDE_COL_BYTES from the pair's start. */
#define WIDE FERRY_DTYPE_COUNT
#define WIDE_COL_BYTES (RB * 4)

typedef __m512 tile_acc[RB / 2][TB];

#define TILE_TARGET AVX512
#include "kernels/cpu/matmul_x86_quant.h"

/* Columns c..c+7 of the rows starting at ra and rb, as floats [ra | rb]. */
AVX512 INLINE __m512 load_pair(const char *ra, const char *rb, int64_t c, int dt)
{
    if (ferry_dtype_is_quant((ferry_dtype)dt)) {
        __m256d lo = _mm256_castps_pd(load8_quant(ra, c, dt));
        __m256d hi = _mm256_castps_pd(load8_quant(rb, c, dt));
        return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(lo), hi, 1));
    }
    const char *a = ra + col_offset(dt, c), *b = rb + col_offset(dt, c);
    if (dt == WIDE)
        return _mm512_loadu_ps(a);
    if (dt == FERRY_DTYPE_F32) {
        __m256d lo = _mm256_castps_pd(_mm256_loadu_ps((const float *)a));
        __m256d hi = _mm256_castps_pd(_mm256_loadu_ps((const float *)b));
        return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(lo), hi, 1));
    }
    __m256i h = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const void *)a)),
                                        _mm_loadu_si128((const void *)b), 1);
    if (dt == FERRY_DTYPE_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 8 floats at p in both halves. */
AVX512 INLINE __m512 broadcast8(const float *p)
{
    return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))));
}

/* One step: weight columns [wc, wc + 8) of the rows w[], activation columns [c, c + 8) of
 * the tokens x[]. */
AVX512 INLINE void step(tile_acc acc, const char *const *w, int64_t wc, const float *const *x,
                        int64_t c, int nt, int dt)
{
    __m512 wv[RB / 2];
    for (int p = 0; p < RB / 2; p++)
        wv[p] = load_pair(w[2 * p], w[2 * p + 1], wc, dt);
    for (int t = 0; t < nt; t++) {
        __m512 xv = broadcast8(x[t] + c);
        for (int p = 0; p < RB / 2; p++)
            acc[p][t] = _mm512_add_ps(acc[p][t], _mm512_mul_ps(xv, wv[p]));
    }
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

/* The tile of rows w[] and tokens x[], accumulated over all cols from the weights in memory. */
AVX512 INLINE void tile_stream(float *out, int64_t ld, const char *const *w, const float *const *x,
                               int64_t cols, int nr, int dt, int nt)
{
    tile_acc acc;
    for (int p = 0; p < RB / 2; p++)
        for (int t = 0; t < TB; t++)
            acc[p][t] = _mm512_setzero_ps();
    accumulate(acc, w, x, cols, nt, dt);
    store_tile(out, ld, acc, nt, nr);
}

/* Columns [0, m) of the chunk, for the tokens x[] whose accumulators are at saved. */
AVX512 INLINE void tile_wide(__m512 *saved, const char *const *w, const float *const *x, int64_t m,
                             int nt)
{
    tile_acc acc;
    for (int p = 0; p < RB / 2; p++)
        for (int t = 0; t < TB; t++)
            acc[p][t] = t < nt ? saved[t * (RB / 2) + p] : _mm512_setzero_ps();
    accumulate(acc, w, x, m, nt, WIDE);
    for (int p = 0; p < RB / 2; p++)
        for (int t = 0; t < nt; t++)
            saved[t * (RB / 2) + p] = acc[p][t];
}

/* Fixed (nt, dt) instances, so the loops above unroll and the tile stays in registers. */
#define BY_NT(nt, call, ...)                                                                       \
    switch (nt) {                                                                                  \
    case 1: call(__VA_ARGS__, 1); break;                                                           \
    case 2: call(__VA_ARGS__, 2); break;                                                           \
    case 3: call(__VA_ARGS__, 3); break;                                                           \
    default: call(__VA_ARGS__, 4); break;                                                          \
    }

static AVX512 void stream_any(float *out, int64_t ld, const char *const *w, const float *const *x,
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

static AVX512 void wide_any(__m512 *saved, const char *const *w, const float *const *x, int64_t m,
                            int nt)
{
    BY_NT(nt, tile_wide, saved, w, x, m);
}

/* Widens columns [c0, c0 + m) of the rows w[] into buf, pair by pair, zero-padded to a
 * multiple of 8 columns (a quantized row has whole groups: no padding). */
static AVX512 void widen_chunk(__m512 *buf, const char *const *w, int64_t c0, int64_t m,
                               ferry_dtype dt)
{
    int64_t c = 0;
    for (; c + 8 <= m; c += 8, buf += RB / 2)
        for (int p = 0; p < RB / 2; p++)
            buf[p] = load_pair(w[2 * p], w[2 * p + 1], c0 + c, dt);
    if (c == m)
        return;
    size_t es = ferry_dtype_size(dt);
    char wpad[RB][32] = {{0}};
    for (int r = 0; r < RB; r++)
        memcpy(wpad[r], w[r] + (size_t)(c0 + c) * es, (size_t)(m - c) * es);
    for (int p = 0; p < RB / 2; p++)
        buf[p] = load_pair(wpad[2 * p], wpad[2 * p + 1], 0, dt);
}

AVX512 void ferry_cpu_matmul_avx512(float *out, const float *x, const ferry_weight *w, int32_t n,
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
        _Alignas(64) __m512 wide[CHUNK / 8 * (RB / 2)];
        _Alignas(64) __m512 saved[GROUP * (RB / 2)];
        const char *wp[RB];
        for (int p = 0; p < RB / 2; p++)
            wp[2 * p] = wp[2 * p + 1] = (const char *)(wide + p);
        for (int32_t g0 = 0; g0 < n; g0 += GROUP) {
            int32_t ng = n - g0 < GROUP ? n - g0 : GROUP;
            memset(saved, 0, (size_t)ng * (RB / 2) * sizeof saved[0]);
            for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
                int64_t m = cols - c0 < CHUNK ? cols - c0 : CHUNK;
                widen_chunk(wide, wr, c0, m, w->dtype);
                for (int32_t t = 0; t < ng; t += TB) {
                    int nt = ng - t < TB ? ng - t : TB;
                    const float *xr[TB];
                    for (int k = 0; k < TB; k++)
                        xr[k] = x + (size_t)(g0 + t + (k < nt ? k : 0)) * (size_t)cols + c0;
                    wide_any(saved + t * (RB / 2), wp, xr, m, nt);
                }
            }
            for (int32_t t = 0; t < ng; t += TB) {
                int nt = ng - t < TB ? ng - t : TB;
                tile_acc acc;
                for (int p = 0; p < RB / 2; p++)
                    for (int k = 0; k < TB; k++)
                        acc[p][k] = k < nt ? saved[(t + k) * (RB / 2) + p] : _mm512_setzero_ps();
                store_tile(out + (size_t)(g0 + t) * (size_t)rows + j, rows, acc, nt, nr);
            }
        }
    }
}

#endif /* FERRY_CPU_X86 */
