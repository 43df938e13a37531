/*
 * engine/quantize.h: a whole matrix quantized to q8 or q4 (kernels/quant.h), its rows
 * spread over a thread pool; used by `ferry pack --quant` for the experts and by
 * --quant-dense for the dense matmul weights.
 */
#ifndef FERRY_ENGINE_QUANTIZE_H
#define FERRY_ENGINE_QUANTIZE_H

#include "core/pool.h"
#include "kernels/backend.h"

/* Writes w (rows x cols of an element dtype, in host memory, aligned for its dtype) as
 * dtype q (FERRY_DTYPE_Q8 or FERRY_DTYPE_Q4) to dst: rows x ferry_dtype_row_bytes(q, cols)
 * bytes. Every row is quantized alone, so the bytes do not depend on pool (NULL: this thread
 * does all). Returns FERRY_ERR_INVALID ("row R: cannot quantize column C: ..." for a NaN,
 * an infinity or a group beyond f16, or cols not a multiple of 32), FERRY_ERR_NOMEM. */
ferry_status ferry_quantize_matrix(const ferry_weight *w, ferry_dtype q, ferry_pool *pool,
                                   void *dst);

#endif
