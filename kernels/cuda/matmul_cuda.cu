/*
 * kernels/cuda/matmul_cuda.cu: d_out (n, rows) = d_x (n, cols) . W^T on the GPU.
 *
 * Two paths, chosen by the number of rows n:
 * - n <= FERRY_CUDA_GEMV_MAX_ROWS (decode, and the experts of few tokens): the backend's
 *   GEMV. One warp per weight row reads the row once, 16 bytes per lane per load, four loads
 *   in flight, widening bf16/f16 to float32 and accumulating in float32 against float32
 *   activations for up to eight tokens at once. Memory-bound by design: the weight bytes
 *   are the cost, and they are read exactly once.
 * - more rows (prefill): cuBLAS. float32 weights: SGEMM (no TF32). bf16/f16 weights: the
 *   activations are rounded to the weight's type in a scratch buffer, in chunks of rows that
 *   fit it, and cublasGemmEx multiplies with float32 accumulation into float32 output; this
 *   rounding is why prefill on the GPU is within 1e-2 of the CPU, not 1e-5.
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
    if (n == 0)
        return FERRY_OK;
    cuda_impl *impl = cuda_of(b);
    cudaSetDevice(impl->device);
    if (n <= FERRY_CUDA_GEMV_MAX_ROWS)
        return gemv(impl, d_out, d_x, w, n);
    return gemm(impl, d_out, d_x, w, n);
}
