/*
 * kernels/cpu/matmul_x86_driver.h: the tiling of the exact x86 matmul kernels
 * (matmul_avx2.c, matmul_avx512.c), written once and included by each after
 * matmul_x86_tile.h and its own store_tile(out, ld, acc, nt, nr) and BY_NT(nt, call, ...)
 * (the fixed token-count instances, so the loops unroll and the tile stays in registers).
 *
 * Rows go RB at a time (rows past the end of the range repeat the last row and are not
 * stored), by one of two paths, the same operations in the same order for every output:
 * - n <= TB (decode): weights are widened from memory as they stream by (a quantized row
 *   a group of 32 at a time).
 * - n > TB (prefill): per tile of rows, CHUNK columns are widened once into a buffer (rows
 *   interleaved, as they are used) and then serve up to GROUP tokens, whose accumulators
 *   wait in memory between chunks.
 */
#ifndef FERRY_KERNELS_CPU_MATMUL_X86_DRIVER_H
#define FERRY_KERNELS_CPU_MATMUL_X86_DRIVER_H

/* The tile of rows w[] and tokens x[], accumulated over all cols from the weights in memory. */
TILE_TARGET INLINE void tile_stream(float *out, int64_t ld, const char *const *w,
                                    const float *const *x, int64_t cols, int nr, int dt, int nt)
{
    tile_acc acc;
    for (int b = 0; b < VB; b++)
        for (int t = 0; t < TB; t++)
            acc[b][t] = VZERO();
    if (ferry_dtype_is_quant((ferry_dtype)dt))
        accumulate_quant(acc, w, x, cols, nt, dt);
    else
        accumulate(acc, w, x, cols, nt, dt);
    store_tile(out, ld, acc, nt, nr);
}

/* Columns [0, m) of the chunk, for the tokens x[] whose accumulators are at saved. */
TILE_TARGET INLINE void tile_wide(tile_vec *saved, const char *const *w, const float *const *x,
                                  int64_t m, int nt)
{
    tile_acc acc;
    for (int b = 0; b < VB; b++)
        for (int t = 0; t < TB; t++)
            acc[b][t] = t < nt ? saved[t * VB + b] : VZERO();
    accumulate(acc, w, x, m, nt, WIDE);
    for (int b = 0; b < VB; b++)
        for (int t = 0; t < nt; t++)
            saved[t * VB + b] = acc[b][t];
}

static TILE_TARGET void stream_any(float *out, int64_t ld, const char *const *w,
                                   const float *const *x, int64_t cols, int nr, ferry_dtype dt,
                                   int nt)
{
    switch (dt) {
    case FERRY_DTYPE_F32: BY_NT(nt, tile_stream, out, ld, w, x, cols, nr, FERRY_DTYPE_F32); break;
    case FERRY_DTYPE_F16: BY_NT(nt, tile_stream, out, ld, w, x, cols, nr, FERRY_DTYPE_F16); break;
    case FERRY_DTYPE_Q8: BY_NT(nt, tile_stream, out, ld, w, x, cols, nr, FERRY_DTYPE_Q8); break;
    case FERRY_DTYPE_Q4: BY_NT(nt, tile_stream, out, ld, w, x, cols, nr, FERRY_DTYPE_Q4); break;
    default: BY_NT(nt, tile_stream, out, ld, w, x, cols, nr, FERRY_DTYPE_BF16); break;
    }
}

static TILE_TARGET void wide_any(tile_vec *saved, const char *const *w, const float *const *x,
                                 int64_t m, int nt)
{
    BY_NT(nt, tile_wide, saved, w, x, m);
}

/* Widens columns [c0, c0 + m) of the rows w[] into buf, zero-padded to a multiple of 8
 * columns (a quantized row has whole groups: no padding). */
static TILE_TARGET void widen_chunk(tile_vec *buf, const char *const *w, int64_t c0, int64_t m,
                                    ferry_dtype dt)
{
    if (ferry_dtype_is_quant(dt)) {
        for (int64_t c = 0; c < m; c += FERRY_QUANT_GROUP, buf += 4 * VB)
            for (int b = 0; b < VB; b++) {
                tile_vec wv[4];
                load_group(wv, w, b, c0 + c, dt);
                for (int k = 0; k < 4; k++)
                    buf[k * VB + b] = wv[k];
            }
        return;
    }
    int64_t c = 0;
    for (; c + 8 <= m; c += 8, buf += VB)
        for (int b = 0; b < VB; b++)
            buf[b] = load_block(w, b, c0 + c, dt);
    if (c == m)
        return;
    size_t es = ferry_dtype_size(dt);
    char wpad[RB][32] = {{0}};
    const char *wp[RB];
    for (int r = 0; r < RB; r++) {
        memcpy(wpad[r], w[r] + (size_t)(c0 + c) * es, (size_t)(m - c) * es);
        wp[r] = wpad[r];
    }
    for (int b = 0; b < VB; b++)
        buf[b] = load_block(wp, b, 0, dt);
}

/* out[t * rows + j] for j in [j0, j1), t < n (see cpu_kernels.h). */
static TILE_TARGET void matmul_tiles(float *out, const float *x, const ferry_weight *w, int32_t n,
                                     int64_t j0, int64_t j1)
{
    int64_t cols = w->cols, rows = w->rows;
    size_t row_bytes = ferry_dtype_row_bytes(w->dtype, cols);
    _Alignas(64) tile_vec wide[CHUNK / 8 * VB];
    _Alignas(64) tile_vec saved[GROUP * VB];
    const char *wp[RB]; /* the chunk buffer seen as rows, for load_block */
    for (int r = 0; r < RB; r++)
        wp[r] = (const char *)wide + (size_t)r * 32;
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
        for (int32_t g0 = 0; g0 < n; g0 += GROUP) {
            int32_t ng = n - g0 < GROUP ? n - g0 : GROUP;
            memset(saved, 0, (size_t)ng * VB * sizeof saved[0]);
            for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
                int64_t m = cols - c0 < CHUNK ? cols - c0 : CHUNK;
                widen_chunk(wide, wr, c0, m, w->dtype);
                for (int32_t t = 0; t < ng; t += TB) {
                    int nt = ng - t < TB ? ng - t : TB;
                    const float *xr[TB];
                    for (int k = 0; k < TB; k++)
                        xr[k] = x + (size_t)(g0 + t + (k < nt ? k : 0)) * (size_t)cols + c0;
                    wide_any(saved + t * VB, wp, xr, m, nt);
                }
            }
            for (int32_t t = 0; t < ng; t += TB) {
                int nt = ng - t < TB ? ng - t : TB;
                tile_acc acc;
                for (int b = 0; b < VB; b++)
                    for (int k = 0; k < TB; k++)
                        acc[b][k] = k < nt ? saved[(t + k) * VB + b] : VZERO();
                store_tile(out + (size_t)(g0 + t) * (size_t)rows + j, rows, acc, nt, nr);
            }
        }
    }
}

#endif
