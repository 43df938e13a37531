/*
 * kernels/cpu/matmul_x86_tile.h: the steps and the column walks of the exact x86 matmul
 * kernels (matmul_avx2.c, matmul_avx512.c), which do not depend on the register width,
 * written once and included by each after it has defined, for its own width:
 *   TILE_TARGET  the function attribute naming the instruction set
 *   INLINE, RB (rows per tile), TB (tokens per tile), VB (vectors per token of a tile),
 *   PF_BYTES, WIDE (the pseudo dtype of an already widened chunk)
 *   tile_vec, tile_acc (tile_vec[VB][TB]), VADD, VMUL
 *   load_block(w, b, c, dt): vector b of the tile's rows w[] at columns c..c+7
 *   load_group(wv, w, b, c, dt): vector b of the tile's rows w[] for the 32 columns of
 *                the quantized group at column c, as 4 vectors of 8 columns each
 *   load_x(p): the 8 activations at p, as the tile's vectors pair them with load_block
 * (and matmul_x86_quant.h's col_offset). step is one 8-column step of the tile; accumulate
 * walks the columns (prefetching streamed rows, zero-padding the last cols % 8, which adds
 * +0 to lanes that start at +0 and so changes no bit); the tiles' lanes are summed by
 * x86_reduce.h's reduce8.
 */
#ifndef FERRY_KERNELS_CPU_MATMUL_X86_TILE_H
#define FERRY_KERNELS_CPU_MATMUL_X86_TILE_H

#include "kernels/cpu/x86_reduce.h"

/* One step: weight columns [wc, wc + 8) of the rows w[], activation columns [c, c + 8) of
 * the tokens x[]: a mul and an add, never a fused multiply-add, so each rounds as in the
 * reference. */
TILE_TARGET INLINE void step(tile_acc acc, const char *const *w, int64_t wc, const float *const *x,
                             int64_t c, int nt, int dt)
{
    tile_vec wv[VB];
    for (int b = 0; b < VB; b++)
        wv[b] = load_block(w, b, wc, dt);
    for (int t = 0; t < nt; t++) {
        tile_vec xv = load_x(x[t] + c);
        for (int b = 0; b < VB; b++)
            acc[b][t] = VADD(acc[b][t], VMUL(xv, wv[b]));
    }
}

/* Accumulates columns [0, m) into acc; w[r] and x[t] point at column 0. dt is an element
 * type or WIDE (quantized rows: accumulate_quant). */
TILE_TARGET INLINE void accumulate(tile_acc acc, const char *const *w, const float *const *x,
                                   int64_t m, int nt, int dt)
{
    /* one prefetch per 64 bytes of the streamed rows */
    int64_t pf_cols = dt == WIDE ? 0 : 64 / (int64_t)col_offset(dt, 1);
    int64_t c = 0;
    for (; c + 8 <= m; c += 8) {
        if (pf_cols && c % pf_cols == 0)
            for (int r = 0; r < RB; r++)
                _mm_prefetch(w[r] + col_offset(dt, c) + PF_BYTES, _MM_HINT_T0);
        step(acc, w, c, x, c, nt, dt);
    }
    if (c == m)
        return;
    float xpad[TB][8] = {{0}};
    const float *xp[TB];
    for (int t = 0; t < nt; t++) {
        memcpy(xpad[t], x[t] + c, (size_t)(m - c) * sizeof(float));
        xp[t] = xpad[t];
    }
    if (dt == WIDE) { /* the chunk buffer is padded already */
        step(acc, w, c, xp, 0, nt, dt);
        return;
    }
    char wpad[RB][32] = {{0}};
    const char *wp[RB];
    for (int r = 0; r < RB; r++) {
        memcpy(wpad[r], w[r] + col_offset(dt, c), (size_t)(m - c) * col_offset(dt, 1));
        wp[r] = wpad[r];
    }
    step(acc, wp, 0, xp, 0, nt, dt);
}

/* accumulate for quantized rows (whole groups, never a tail): each group is widened once,
 * its scale read once, and its 4 vectors of 8 columns are added in column order, as step
 * would add them. */
TILE_TARGET INLINE void accumulate_quant(tile_acc acc, const char *const *w,
                                         const float *const *x, int64_t m, int nt, int dt)
{
    for (int64_t c = 0; c < m; c += FERRY_QUANT_GROUP) {
        for (int r = 0; r < RB; r++)
            _mm_prefetch(w[r] + col_offset(dt, c) + PF_BYTES, _MM_HINT_T0);
        for (int b = 0; b < VB; b++) {
            tile_vec wv[4];
            load_group(wv, w, b, c, dt);
            for (int k = 0; k < 4; k++)
                for (int t = 0; t < nt; t++)
                    acc[b][t] = VADD(acc[b][t], VMUL(load_x(x[t] + c + 8 * k), wv[k]));
        }
    }
}

#endif
