/*
 * kernels/cuda/matmul_cuda.cu: d_out (n, rows) = d_x (n, cols) . W^T on the GPU.
 *
 * f32, f16 and bf16 weights take one of two paths, chosen by the number of rows n:
 * - n <= FERRY_CUDA_GEMV_MAX_ROWS (decode, and the experts of few tokens): the backend's
 *   GEMV. One warp per weight row reads the row once, 16 bytes per lane per load, four loads
 *   in flight, widening bf16/f16 to float32 and accumulating in float32 against float32
 *   activations for up to eight tokens at once. Memory-bound by design: the weight bytes
 *   are the cost, and they are read exactly once.
 * - more rows (prefill): cuBLAS. float32 weights: SGEMM (no TF32). bf16/f16 weights: the
 *   activations are rounded to the weight's type in a scratch buffer, in chunks of rows that
 *   fit it, and cublasGemmEx multiplies with float32 accumulation into float32 output; this
 *   rounding is why prefill on the GPU is within 1e-2 of the CPU, not 1e-5.
 *
 * Q8 and Q4 weights (groups of 32 with their own f16 scales, layout in kernels/quant.h;
 * cols must be a multiple of 32) never reach cuBLAS, which cannot read them:
 * - n <= FERRY_CUDA_GEMV_MAX_ROWS: the quantized GEMV, still one warp per weight row. Eight
 *   lanes share a group, four weights each, so a warp walks four groups per step and its
 *   float32 activation loads stay contiguous; eight steps of weight loads are in flight.
 *   Each weight byte is read once and dequantized in registers.
 * - more rows: a tiled kernel. A block computes a 64 x 64 tile of the output (64 tokens by
 *   64 weight rows) in K-steps of one group: it dequantizes the 64 groups of the step into
 *   shared memory as float32 beside the 64 x 32 activations, and each of its 256 threads
 *   accumulates a 4 x 4 block in float32. The next step's bytes are loaded into registers
 *   while the current one is multiplied. No scratch: shared memory only.
 * Both dequantize exactly as quant.h defines, which is what makes a quantized matmul on the
 * GPU agree with the CPU to 1e-5 whatever n is: the f16 fields widened exactly, q made a
 * float exactly, then __fmul_rn(d, q) and, for Q4, __fadd_rn(that, m), the intrinsics
 * keeping nvcc from fusing them into a multiply-add. Only the order of the float32 sum
 * differs from the CPU. Rows are 2-byte aligned at best (34-byte groups), so weight bytes
 * are read 16 bits at a time (8 at a time where the weight itself starts at an odd address).
 */
#include <string.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda/cuda_common.h"

#define FERRY_GEMV_THREADS 256 /* 8 warps: 8 weight rows per block */

__device__ __forceinline__ void widen8(const uint4 raw, int dtype, float *f)
{
    const uint32_t u[4] = {raw.x, raw.y, raw.z, raw.w};
    for (int i = 0; i < 4; i++) {
        uint32_t lo = u[i] & 0xffffu, hi = u[i] >> 16;
        if (dtype == FERRY_DTYPE_BF16) {
            f[2 * i] = __uint_as_float(lo << 16);
            f[2 * i + 1] = __uint_as_float(hi << 16);
        } else {
            f[2 * i] = __half2float(__ushort_as_half((unsigned short)lo));
            f[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)hi));
        }
    }
}

/* 8 weights of row r starting at column c (16-bit types: one 16-byte load; float32: two). */
__device__ __forceinline__ void load8(const void *__restrict__ w, int dtype, size_t at, float *f)
{
    if (dtype == FERRY_DTYPE_F32) {
        const float4 *p = (const float4 *)((const float *)w + at);
        float4 a = __ldg(p), b = __ldg(p + 1);
        f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w;
        f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
    } else {
        widen8(__ldg((const uint4 *)((const uint16_t *)w + at)), dtype, f);
    }
}

__device__ __forceinline__ void fma8(float *acc, const float *__restrict__ x, int n, size_t cols,
                                     size_t c, const float *f)
{
#pragma unroll
    for (int t = 0; t < FERRY_CUDA_GEMV_MAX_ROWS; t++) {
        if (t < n) {
            const float4 *xp = (const float4 *)(x + (size_t)t * cols + c);
            float4 a = __ldg(xp), b = __ldg(xp + 1);
            acc[t] += f[0] * a.x + f[1] * a.y + f[2] * a.z + f[3] * a.w + f[4] * b.x +
                      f[5] * b.y + f[6] * b.z + f[7] * b.w;
        }
    }
}

/* Sums each token's lanes over the warp; lane 0 writes output element (t, r). */
__device__ __forceinline__ void store_row(float *__restrict__ out, float *acc, int n, int64_t rows,
                                          int64_t r, int lane)
{
#pragma unroll
    for (int t = 0; t < FERRY_CUDA_GEMV_MAX_ROWS; t++) {
        if (t < n) {
            float s = acc[t];
            for (int o = 16; o > 0; o >>= 1)
                s += __shfl_xor_sync(0xffffffffu, s, o);
            if (lane == 0)
                out[(size_t)t * (size_t)rows + (size_t)r] = s;
        }
    }
}

/* One warp per weight row r, for n <= FERRY_CUDA_GEMV_MAX_ROWS tokens. VEC (cols % 8 == 0,
 * every row of w and x 16-byte aligned): 8 elements per lane per load, four loads in
 * flight. Otherwise one element per lane per step, any shape and alignment. */
template <bool VEC>
__global__ void gemv_kernel(float *__restrict__ out, const float *__restrict__ x,
                            const void *__restrict__ w, int dtype, int n, int64_t rows,
                            int64_t cols)
{
    int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= rows)
        return;
    float acc[FERRY_CUDA_GEMV_MAX_ROWS];
#pragma unroll
    for (int t = 0; t < FERRY_CUDA_GEMV_MAX_ROWS; t++)
        acc[t] = 0.0f;
    size_t row0 = (size_t)r * (size_t)cols, ucols = (size_t)cols;
    if (VEC) {
        size_t c = (size_t)lane * 8;
        for (; c + 3 * 256 < ucols; c += 4 * 256) {
            float f0[8], f1[8], f2[8], f3[8];
            load8(w, dtype, row0 + c, f0);
            load8(w, dtype, row0 + c + 256, f1);
            load8(w, dtype, row0 + c + 512, f2);
            load8(w, dtype, row0 + c + 768, f3);
            fma8(acc, x, n, ucols, c, f0);
            fma8(acc, x, n, ucols, c + 256, f1);
            fma8(acc, x, n, ucols, c + 512, f2);
            fma8(acc, x, n, ucols, c + 768, f3);
        }
        for (; c < ucols; c += 256) {
            float f[8];
            load8(w, dtype, row0 + c, f);
            fma8(acc, x, n, ucols, c, f);
        }
    } else {
        for (size_t c = (size_t)lane; c < ucols; c += 32) {
            float f = cuda_weight_at(w, dtype, row0 + c);
#pragma unroll
            for (int t = 0; t < FERRY_CUDA_GEMV_MAX_ROWS; t++)
                if (t < n)
                    acc[t] += f * x[(size_t)t * ucols + c];
        }
    }
    store_row(out, acc, n, rows, r, lane);
}

static ferry_status gemv(cuda_impl *impl, float *d_out, const float *d_x, const ferry_weight *w,
                         int32_t n)
{
    size_t esize = ferry_dtype_size(w->dtype);
    int aligned = w->cols % 8 == 0 && (uintptr_t)w->d_data % 16 == 0 &&
                  (uintptr_t)d_x % 16 == 0 && ((size_t)w->cols * esize) % 16 == 0;
    int64_t blocks = (w->rows * 32 + FERRY_GEMV_THREADS - 1) / FERRY_GEMV_THREADS;
    if (blocks > INT32_MAX)
        return ferry_fail(FERRY_ERR_INVALID, "matmul: %lld weight rows", (long long)w->rows);
    if (aligned)
        gemv_kernel<true><<<(unsigned)blocks, FERRY_GEMV_THREADS, 0, impl->compute>>>(
            d_out, d_x, w->d_data, (int)w->dtype, n, w->rows, w->cols);
    else
        gemv_kernel<false><<<(unsigned)blocks, FERRY_GEMV_THREADS, 0, impl->compute>>>(
            d_out, d_x, w->d_data, (int)w->dtype, n, w->rows, w->cols);
    CUDA_LAUNCHED();
    return FERRY_OK;
}

__global__ void to_half_kernel(void *dst, const float *src, size_t n, int dtype)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        if (dtype == FERRY_DTYPE_BF16)
            ((__nv_bfloat16 *)dst)[i] = __float2bfloat16_rn(src[i]);
        else
            ((__half *)dst)[i] = __float2half_rn(src[i]);
    }
}

static ferry_status gemm(cuda_impl *impl, float *d_out, const float *d_x, const ferry_weight *w,
                         int32_t n)
{
    const float one = 1.0f, zero = 0.0f;
    int rows = (int)w->rows, cols = (int)w->cols;
    if (w->dtype == FERRY_DTYPE_F32) {
        CUBLAS_TRY(cublasSgemm(impl->blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, n, cols, &one,
                               (const float *)w->d_data, cols, d_x, cols, &zero, d_out, rows));
        return FERRY_OK;
    }
    cudaDataType_t type = w->dtype == FERRY_DTYPE_BF16 ? CUDA_R_16BF : CUDA_R_16F;
    size_t row_bytes = (size_t)cols * 2;
    if (row_bytes > FERRY_CUDA_ACT_SCRATCH)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "matmul: %d columns (at most %u)", cols,
                          FERRY_CUDA_ACT_SCRATCH / 2);
    int32_t chunk = (int32_t)(FERRY_CUDA_ACT_SCRATCH / row_bytes);
    for (int32_t t0 = 0; t0 < n; t0 += chunk) {
        int32_t nc = n - t0 < chunk ? n - t0 : chunk;
        size_t count = (size_t)nc * (size_t)cols;
        size_t grid = (count + 255) / 256;
        to_half_kernel<<<(unsigned)(grid < 65535 ? grid : 65535), 256, 0, impl->compute>>>(
            impl->d_act, d_x + (size_t)t0 * (size_t)cols, count, (int)w->dtype);
        CUDA_LAUNCHED();
        CUBLAS_TRY(cublasGemmEx(impl->blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, nc, cols, &one,
                                w->d_data, type, cols, impl->d_act, type, cols, &zero,
                                d_out + (size_t)t0 * (size_t)rows, CUDA_R_32F, rows,
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    return FERRY_OK;
}

/* ---- quantized weights ---------------------------------------------------------------- */

#define FERRY_QGEMV_UNROLL 8 /* steps of four groups whose weight loads a lane keeps in flight */
#define FERRY_QTILE_TOKENS 64
#define FERRY_QTILE_ROWS 64
#define FERRY_QTILE_THREADS 256 /* 16 x 16 threads, a 4 x 4 block of the tile each */
#define FERRY_QTILE_PAD 4       /* keeps the float4 reads of a k-row aligned */
#define FERRY_QTILE_MAX_Y 65535 /* gridDim.y: tiles of tokens per launch */

/* The bytes of a few consecutive weights of one group, as loaded: the f16 fields in s (Q8:
 * d; Q4: d | m << 16) and the quantized values in q (Q8: 4 int8 per word; Q4: 8 nibbles per
 * word, the weight order of quant.h). */
typedef struct {
    uint32_t s;
    uint32_t q[2];
} quant_raw;

/* A little-endian 16-bit field at p: one load where the weight starts at an even address
 * (then every field is at an even address), two byte loads otherwise. */
template <bool EVEN> __device__ __forceinline__ uint32_t ld_u16(const uint8_t *__restrict__ p)
{
    if (EVEN)
        return __ldg((const unsigned short *)p);
    return (uint32_t)__ldg(p) | (uint32_t)__ldg(p + 1) << 8;
}

/* Loads weights NW * part .. NW * part + NW - 1 (NW = 4 or 8) of the group at g. */
template <int DT, bool EVEN, int NW>
__device__ __forceinline__ quant_raw load_part(const uint8_t *__restrict__ g, int part)
{
    quant_raw r = {0, {0, 0}};
    if (DT == FERRY_DTYPE_Q8) {
        r.s = ld_u16<EVEN>(g);
        const uint8_t *q = g + 2 + NW * part;
#pragma unroll
        for (int i = 0; i < NW / 4; i++)
            r.q[i] = ld_u16<EVEN>(q + 4 * i) | ld_u16<EVEN>(q + 4 * i + 2) << 16;
    } else {
        r.s = ld_u16<EVEN>(g) | ld_u16<EVEN>(g + 2) << 16;
        const uint8_t *q = g + 4 + NW / 2 * part;
        r.q[0] = ld_u16<EVEN>(q);
        if (NW == 8)
            r.q[0] |= ld_u16<EVEN>(q + 2) << 16;
    }
    return r;
}

/* The NW weights of r, exactly as kernels/quant.h defines them. q becomes a float without an
 * integer conversion (a quarter-rate instruction on these GPUs, and the GEMV widens a weight
 * per byte it reads): 2^23 + v, for v in [0, 256), is the float whose low mantissa bits are
 * v, and subtracting 2^23 (plus the 128 that biased int8 to unsigned) is exact. */
template <int DT, int NW> __device__ __forceinline__ void dequant(const quant_raw &r, float *w)
{
    float d = __half2float(__ushort_as_half((unsigned short)(r.s & 0xffffu)));
    if (DT == FERRY_DTYPE_Q8) {
#pragma unroll
        for (int k = 0; k < NW; k++) {
            uint32_t biased = r.q[k / 4] ^ 0x80808080u; /* q + 128 in each byte */
            float q = __fsub_rn(__uint_as_float(__byte_perm(biased, 0x4b00u, 0x5440u + k % 4)),
                                8388736.0f);
            w[k] = __fmul_rn(d, q);
        }
    } else {
        float m = __half2float(__ushort_as_half((unsigned short)(r.s >> 16)));
#pragma unroll
        for (int k = 0; k < NW; k++) {
            uint32_t v = (r.q[0] >> (4 * k)) & 15u;
            float q = __fsub_rn(__uint_as_float(0x4b000000u | v), 8388608.0f);
            w[k] = __fadd_rn(__fmul_rn(d, q), m);
        }
    }
}

/* acc[t] += the 4 weights w . x[t][c .. c + 3] for each of the n tokens. XVEC: x 16-byte
 * aligned (c is a multiple of 4 and cols of 32, so then every such load is). */
template <bool XVEC>
__device__ __forceinline__ void fma4(float *acc, const float *__restrict__ x, int n, size_t cols,
                                     size_t c, const float *w)
{
#pragma unroll
    for (int t = 0; t < FERRY_CUDA_GEMV_MAX_ROWS; t++) {
        if (t < n) {
            const float *xp = x + (size_t)t * cols + c;
            float4 a;
            if (XVEC)
                a = __ldg((const float4 *)xp);
            else
                a = make_float4(__ldg(xp), __ldg(xp + 1), __ldg(xp + 2), __ldg(xp + 3));
            acc[t] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w;
        }
    }
}

/* One warp per weight row r of a Q8/Q4 weight, for n <= FERRY_CUDA_GEMV_MAX_ROWS tokens.
 * Lane l takes weights 4 (l % 8) .. 4 (l % 8) + 3 of group l / 8 of each step of four
 * groups, so the warp's activation loads of a step are 128 consecutive floats per token and
 * its weight loads 4 whole groups. The steps and the sum are in a fixed order: a call
 * repeats bit for bit. */
template <int DT, bool XVEC, bool EVEN>
__global__ void gemv_quant_kernel(float *__restrict__ out, const float *__restrict__ x,
                                  const uint8_t *__restrict__ w, int n, int64_t rows,
                                  int64_t cols)
{
    int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= rows)
        return;
    const size_t gbytes = ferry_quant_group_bytes((ferry_dtype)DT), ucols = (size_t)cols;
    const int64_t n_groups = cols / FERRY_QUANT_GROUP;
    const uint8_t *row = w + (size_t)r * (size_t)n_groups * gbytes;
    const int part = lane & 7;
    const int64_t gl = lane >> 3;
    float acc[FERRY_CUDA_GEMV_MAX_ROWS];
#pragma unroll
    for (int t = 0; t < FERRY_CUDA_GEMV_MAX_ROWS; t++)
        acc[t] = 0.0f;
    int64_t g0 = 0;
    /* whole blocks of steps, the same count for every lane; loads first, then the math */
    for (; g0 + 4 * FERRY_QGEMV_UNROLL <= n_groups; g0 += 4 * FERRY_QGEMV_UNROLL) {
        quant_raw raw[FERRY_QGEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < FERRY_QGEMV_UNROLL; u++)
            raw[u] = load_part<DT, EVEN, 4>(row + (size_t)(g0 + gl + 4 * u) * gbytes, part);
#pragma unroll
        for (int u = 0; u < FERRY_QGEMV_UNROLL; u++) {
            float wv[4];
            dequant<DT, 4>(raw[u], wv);
            fma4<XVEC>(acc, x, n, ucols,
                       (size_t)(g0 + gl + 4 * u) * FERRY_QUANT_GROUP + (size_t)part * 4, wv);
        }
    }
    for (int64_t g = g0 + gl; g < n_groups; g += 4) {
        float wv[4];
        dequant<DT, 4>(load_part<DT, EVEN, 4>(row + (size_t)g * gbytes, part), wv);
        fma4<XVEC>(acc, x, n, ucols, (size_t)g * FERRY_QUANT_GROUP + (size_t)part * 4, wv);
    }
    store_row(out, acc, n, rows, r, lane);
}

template <int DT>
static void launch_gemv_quant(cuda_impl *impl, unsigned blocks, float *d_out, const float *d_x,
                              const ferry_weight *w, int32_t n)
{
    const uint8_t *wd = (const uint8_t *)w->d_data;
    int xvec = (uintptr_t)d_x % 16 == 0, even = (uintptr_t)wd % 2 == 0;
    cudaStream_t s = impl->compute;
    if (xvec && even)
        gemv_quant_kernel<DT, true, true>
            <<<blocks, FERRY_GEMV_THREADS, 0, s>>>(d_out, d_x, wd, n, w->rows, w->cols);
    else if (xvec)
        gemv_quant_kernel<DT, true, false>
            <<<blocks, FERRY_GEMV_THREADS, 0, s>>>(d_out, d_x, wd, n, w->rows, w->cols);
    else if (even)
        gemv_quant_kernel<DT, false, true>
            <<<blocks, FERRY_GEMV_THREADS, 0, s>>>(d_out, d_x, wd, n, w->rows, w->cols);
    else
        gemv_quant_kernel<DT, false, false>
            <<<blocks, FERRY_GEMV_THREADS, 0, s>>>(d_out, d_x, wd, n, w->rows, w->cols);
}

static ferry_status gemv_quant(cuda_impl *impl, float *d_out, const float *d_x,
                               const ferry_weight *w, int32_t n)
{
    int64_t blocks = (w->rows * 32 + FERRY_GEMV_THREADS - 1) / FERRY_GEMV_THREADS;
    if (w->dtype == FERRY_DTYPE_Q8)
        launch_gemv_quant<FERRY_DTYPE_Q8>(impl, (unsigned)blocks, d_out, d_x, w, n);
    else
        launch_gemv_quant<FERRY_DTYPE_Q4>(impl, (unsigned)blocks, d_out, d_x, w, n);
    CUDA_LAUNCHED();
    return FERRY_OK;
}

/* The tile of out at tokens blockIdx.y * 64 .. + 63, weight rows blockIdx.x * 64 .. + 63, of
 * a Q8/Q4 weight, for n tokens (any count; the edges of the tile are masked). Per K-step of
 * one group: thread i loads x[token i / 32 + 8 j][column i % 32] (j < 8, coalesced) and
 * dequantizes weights 8 (i % 4) .. + 7 of row i / 4's group, both stored k-major so that
 * thread (ty, tx) = (i / 16, i % 16) reads its 4 tokens and 4 rows at one float4 each per k.
 * Each output is one float32 sum over k in order: a call repeats bit for bit. */
template <int DT, bool EVEN>
__global__ void __launch_bounds__(FERRY_QTILE_THREADS)
    gemm_quant_kernel(float *__restrict__ out, const float *__restrict__ x,
                      const uint8_t *__restrict__ w, int n, int rows, int cols)
{
    __shared__ __align__(16) float xs[FERRY_QUANT_GROUP][FERRY_QTILE_TOKENS + FERRY_QTILE_PAD];
    __shared__ __align__(16) float ws[FERRY_QUANT_GROUP][FERRY_QTILE_ROWS + FERRY_QTILE_PAD];
    const int tid = threadIdx.x;
    const int64_t t0 = (int64_t)blockIdx.y * FERRY_QTILE_TOKENS;
    const int64_t r0 = (int64_t)blockIdx.x * FERRY_QTILE_ROWS;
    const size_t gbytes = ferry_quant_group_bytes((ferry_dtype)DT), ucols = (size_t)cols;

    /* what this thread loads */
    const int xk = tid % FERRY_QUANT_GROUP, xt = tid / FERRY_QUANT_GROUP;
    const int wr = tid / 4, part = tid % 4;
    const bool w_in = r0 + wr < rows;
    const uint8_t *wrow =
        w + (size_t)(w_in ? r0 + wr : 0) * ((size_t)(cols / FERRY_QUANT_GROUP) * gbytes);
    float xr[8];
    quant_raw wraw = {0, {0, 0}};
#pragma unroll
    for (int j = 0; j < 8; j++) {
        int64_t t = t0 + xt + 8 * j;
        xr[j] = t < n ? __ldg(x + (size_t)t * ucols + (size_t)xk) : 0.0f;
    }
    if (w_in)
        wraw = load_part<DT, EVEN, 8>(wrow, part);

    /* what this thread computes */
    const int tx = tid % 16, ty = tid / 16;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
            acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < cols; k0 += FERRY_QUANT_GROUP) {
#pragma unroll
        for (int j = 0; j < 8; j++)
            xs[xk][xt + 8 * j] = xr[j];
        float wv[8];
        dequant<DT, 8>(wraw, wv);
#pragma unroll
        for (int j = 0; j < 8; j++)
            ws[8 * part + j][wr] = wv[j];
        __syncthreads();

        /* the next step's bytes travel while this one is multiplied */
        int k1 = k0 + FERRY_QUANT_GROUP;
        if (k1 < cols) {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                int64_t t = t0 + xt + 8 * j;
                xr[j] = t < n ? __ldg(x + (size_t)t * ucols + (size_t)(k1 + xk)) : 0.0f;
            }
            if (w_in)
                wraw = load_part<DT, EVEN, 8>(
                    wrow + (size_t)(k1 / FERRY_QUANT_GROUP) * gbytes, part);
        }

#pragma unroll 8
        for (int k = 0; k < FERRY_QUANT_GROUP; k++) {
            float4 a = *(const float4 *)&xs[k][ty * 4];
            float4 b = *(const float4 *)&ws[k][tx * 4];
            const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++)
                    acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; i++) {
        int64_t t = t0 + ty * 4 + i;
        if (t >= n)
            continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int64_t r = r0 + tx * 4 + j;
            if (r < rows)
                out[(size_t)t * (size_t)rows + (size_t)r] = acc[i][j];
        }
    }
}

template <int DT>
static ferry_status launch_gemm_quant(cuda_impl *impl, float *d_out, const float *d_x,
                                      const ferry_weight *w, int32_t n)
{
    const uint8_t *wd = (const uint8_t *)w->d_data;
    int rows = (int)w->rows, cols = (int)w->cols;
    unsigned tiles_x = (unsigned)((rows + FERRY_QTILE_ROWS - 1) / FERRY_QTILE_ROWS);
    /* gridDim.y is at most 65535: tokens beyond that many tiles go in further launches */
    const int64_t per_launch = (int64_t)FERRY_QTILE_MAX_Y * FERRY_QTILE_TOKENS;
    for (int64_t t0 = 0; t0 < n; t0 += per_launch) {
        int nc = (int)(n - t0 < per_launch ? n - t0 : per_launch);
        dim3 grid(tiles_x, (unsigned)((nc + FERRY_QTILE_TOKENS - 1) / FERRY_QTILE_TOKENS));
        float *o = d_out + (size_t)t0 * (size_t)rows;
        const float *xc = d_x + (size_t)t0 * (size_t)cols;
        if ((uintptr_t)wd % 2 == 0)
            gemm_quant_kernel<DT, true>
                <<<grid, FERRY_QTILE_THREADS, 0, impl->compute>>>(o, xc, wd, nc, rows, cols);
        else
            gemm_quant_kernel<DT, false>
                <<<grid, FERRY_QTILE_THREADS, 0, impl->compute>>>(o, xc, wd, nc, rows, cols);
        CUDA_LAUNCHED();
    }
    return FERRY_OK;
}

static ferry_status gemm_quant(cuda_impl *impl, float *d_out, const float *d_x,
                               const ferry_weight *w, int32_t n)
{
    if (w->dtype == FERRY_DTYPE_Q8)
        return launch_gemm_quant<FERRY_DTYPE_Q8>(impl, d_out, d_x, w, n);
    return launch_gemm_quant<FERRY_DTYPE_Q4>(impl, d_out, d_x, w, n);
}

ferry_status ferry_cuda_matmul(ferry_backend *b, float *d_out, const float *d_x,
                               const ferry_weight *w, int32_t n)
{
    if (!w || !w->d_data || w->rows <= 0 || w->cols <= 0 || (int)w->dtype < 0 ||
        w->dtype >= FERRY_DTYPE_COUNT)
        return ferry_fail(FERRY_ERR_INVALID, "matmul: invalid weight");
    if (n < 0 || (n > 0 && (!d_out || !d_x)))
        return ferry_fail(FERRY_ERR_INVALID, "matmul: %d rows with NULL buffers", (int)n);
    if (w->rows > INT32_MAX || w->cols > INT32_MAX)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "matmul: a %lld x %lld weight",
                          (long long)w->rows, (long long)w->cols);
    if (ferry_dtype_is_quant(w->dtype) && w->cols % FERRY_QUANT_GROUP)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "matmul: %s weight of %lld columns (quantized "
                          "weights serve matmuls of a multiple of %d columns)",
                          ferry_dtype_name(w->dtype), (long long)w->cols, FERRY_QUANT_GROUP);
    if (n == 0)
        return FERRY_OK;
    cuda_impl *impl = cuda_of(b);
    cudaSetDevice(impl->device);
    if (ferry_dtype_is_quant(w->dtype))
        return n <= FERRY_CUDA_GEMV_MAX_ROWS ? gemv_quant(impl, d_out, d_x, w, n)
                                             : gemm_quant(impl, d_out, d_x, w, n);
    if (n <= FERRY_CUDA_GEMV_MAX_ROWS)
        return gemv(impl, d_out, d_x, w, n);
    return gemm(impl, d_out, d_x, w, n);
}
