/*
 * kernels/cuda/cuda_common.h: what the CUDA backend's files share: the backend state, the
 * macro that turns a CUDA or cuBLAS failure into a returned status with file:line, and the
 * op launchers each file defines. Internal to kernels/cuda.
 *
 * Streams: every op is launched on impl->compute in call order, so the ops of one forward
 * pass run in order without host synchronisation; download and synchronize wait for them.
 * Copies of copy_async go on impl->copy, each ordered after the ops queued before it.
 */
#ifndef FERRY_KERNELS_CUDA_COMMON_H
#define FERRY_KERNELS_CUDA_COMMON_H

#include <pthread.h>

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

extern "C" {
#include "core/arena.h"
#include "core/error.h"
#include "kernels/backend.h"
}

/* Copies in flight that copy_done / copy_wait can still name: a ring of events. */
#define FERRY_CUDA_COPY_RING 256
/* Host index arrays (token ids, gather/scatter rows) travel as kernel arguments, in chunks
 * of this many entries: no staging copy, no device scratch. */
#define FERRY_CUDA_IDX_CHUNK 512
/* Matmuls of at most this many rows run in the backend's own float32 GEMV kernel (weights
 * read once, activations kept in float32); more rows go to cuBLAS, or for Q8/Q4 weights to
 * the backend's tiled kernel. */
#define FERRY_CUDA_GEMV_MAX_ROWS 8
/* Workspaces beside the device budget: cuBLAS's, and the half-precision copy of the
 * activations that cuBLAS multiplies with half-precision weights. */
#define FERRY_CUDA_BLAS_WORKSPACE (4u << 20)        /* Ampere, Ada */
#define FERRY_CUDA_BLAS_WORKSPACE_SM90 (32u << 20)  /* Hopper and newer, as cuBLAS advises */
#define FERRY_CUDA_ACT_SCRATCH (8u << 20)

typedef struct {
    void *d;
    size_t n_bytes;
} cuda_block;

typedef struct {
    int device;
    char desc[128];
    cudaStream_t compute, copy;
    cublasHandle_t blas;
    void *d_blas_ws;
    size_t blas_ws_bytes;
    void *d_act; /* FERRY_CUDA_ACT_SCRATCH bytes */

    /* device memory: an arena over one cudaMalloc (a budget) or one cudaMalloc per block */
    pthread_mutex_t mem_mu;
    void *d_region;
    ferry_arena *arena;
    cuda_block *blocks;
    size_t n_blocks, cap_blocks, used;

    /* the copy engine */
    pthread_mutex_t copy_mu;
    cudaEvent_t ops_mark; /* recorded on compute, waited on by copy: copies follow the ops */
    cudaEvent_t ring[FERRY_CUDA_COPY_RING];
    uint64_t submitted; /* tickets 1..submitted handed out */
    uint64_t landed;    /* tickets 1..landed known to have landed */
} cuda_impl;

static inline cuda_impl *cuda_of(ferry_backend *b) { return (cuda_impl *)b->impl; }

/* The compute stream, with ferry's device made current on the calling thread (an embedding
 * application may have made another one current there). */
static inline cudaStream_t compute_stream(ferry_backend *b)
{
    cudaSetDevice(cuda_of(b)->device);
    return cuda_of(b)->compute;
}

ferry_status ferry_cuda_status(cudaError_t e, const char *what, const char *file, int line);
ferry_status ferry_cublas_status(cublasStatus_t e, const char *what, const char *file, int line);

/* Evaluates a CUDA runtime call; on failure returns FERRY_ERR_DEVICE naming it. */
#define CUDA_TRY(call)                                                                          \
    do {                                                                                        \
        cudaError_t cuda_try_e_ = (call);                                                       \
        if (cuda_try_e_ != cudaSuccess)                                                         \
            return ferry_cuda_status(cuda_try_e_, #call, __FILE__, __LINE__);                   \
    } while (0)

#define CUBLAS_TRY(call)                                                                        \
    do {                                                                                        \
        cublasStatus_t cublas_try_e_ = (call);                                                  \
        if (cublas_try_e_ != CUBLAS_STATUS_SUCCESS)                                             \
            return ferry_cublas_status(cublas_try_e_, #call, __FILE__, __LINE__);               \
    } while (0)

/* The status of the kernel launch just made. */
#define CUDA_LAUNCHED() CUDA_TRY(cudaGetLastError())

/* Element i of a weight of the given element dtype (f32, f16, bf16), widened to float32.
 * Quantized weights have no element i on its own: only matmul_cuda.cu reads them. */
__device__ __forceinline__ float cuda_weight_at(const void *w, int dtype, size_t i)
{
    if (dtype == FERRY_DTYPE_F32)
        return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    if (dtype == FERRY_DTYPE_BF16)
        return __uint_as_float((uint32_t)h << 16);
    return __half2float(__ushort_as_half(h));
}

/* ops_cuda.cu */
ferry_status ferry_cuda_embedding(ferry_backend *b, float *d_out, const ferry_weight *table,
                                  const int32_t *ids, int32_t n);
ferry_status ferry_cuda_rmsnorm(ferry_backend *b, float *d_out, const float *d_x,
                                const ferry_weight *w, int32_t n, int32_t d, float eps);
ferry_status ferry_cuda_rope(ferry_backend *b, float *d_x, int32_t n, int32_t n_heads,
                             int32_t head_dim, int32_t pos0, const float *d_cos,
                             const float *d_sin);
ferry_status ferry_cuda_attention(ferry_backend *b, float *d_out, const float *d_q,
                                  const float *d_k, const float *d_v, int32_t n, int32_t pos0,
                                  const ferry_attn_shape *shape);
ferry_status ferry_cuda_silu_mul(ferry_backend *b, float *d_out, const float *d_gate,
                                 const float *d_up, size_t n);
ferry_status ferry_cuda_add(ferry_backend *b, float *d_x, const float *d_y, size_t n);
ferry_status ferry_cuda_router_topk(ferry_backend *b, int32_t *d_experts, float *d_weights,
                                    const float *d_logits, int32_t n, int32_t n_experts,
                                    int32_t k, int normalize);
ferry_status ferry_cuda_add_bias(ferry_backend *b, float *d_x, const ferry_weight *bias,
                                 int32_t n, int32_t d);
ferry_status ferry_cuda_clamp(ferry_backend *b, float *d_x, size_t n, float limit);
ferry_status ferry_cuda_gate_rows(ferry_backend *b, float *d_y, const float *d_s, int32_t n,
                                  int32_t d);
ferry_status ferry_cuda_gather_rows(ferry_backend *b, float *d_out, const float *d_x,
                                    const int32_t *idx, int32_t m, int32_t d);
ferry_status ferry_cuda_scatter_rows(ferry_backend *b, float *d_out, const float *d_y,
                                     const int32_t *idx, int32_t m, int32_t d);
ferry_status ferry_cuda_combine(ferry_backend *b, float *d_out, const float *d_y,
                                const float *d_weights, int32_t n, int32_t k, int32_t d);

/* matmul_cuda.cu */
ferry_status ferry_cuda_matmul(ferry_backend *b, float *d_out, const float *d_x,
                               const ferry_weight *w, int32_t n);

#endif
