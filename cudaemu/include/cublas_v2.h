/*
 * cudaemu/include/cublas_v2.h: the part of cuBLAS that ferry calls, emulated on the CPU for
 * the emulated CUDA build (cudaemu/cublas.cpp). Names, enum values and signatures are
 * NVIDIA's (cublas_api.h); the behaviour is what NVIDIA's cuBLAS documentation states,
 * including the argument checks, the quick returns and the stream ordering.
 *
 * Matrices are column-major: element (i, j) of a matrix with leading dimension ld is at
 * index i + j * ld. alpha and beta are host pointers (the default pointer mode, the only one
 * emulated), read when the call is made. Only ever included from C++ (the functions have C
 * linkage, like the real library's).
 */
#ifndef CUDAEMU_CUBLAS_V2_H
#define CUDAEMU_CUBLAS_V2_H

#include <cstddef>

#include <cuda_runtime.h>
#include <library_types.h>

typedef enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,   /* NULL or destroyed handle; no device */
    CUBLAS_STATUS_ALLOC_FAILED = 3,      /* host memory for the handle */
    CUBLAS_STATUS_INVALID_VALUE = 7,     /* an argument outside its documented range */
    CUBLAS_STATUS_ARCH_MISMATCH = 8,     /* never: the emulated device has every feature */
    CUBLAS_STATUS_MAPPING_ERROR = 11,    /* never: no textures */
    CUBLAS_STATUS_EXECUTION_FAILED = 13, /* a matrix outside device memory; a sticky error */
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15, /* a combination of types or an algorithm not offered */
    CUBLAS_STATUS_LICENSE_ERROR = 16
} cublasStatus_t;

/* op(X): X as stored, or transposed. OP_C (conjugate transpose) is OP_T on real types. */
typedef enum {
    CUBLAS_OP_N = 0,
    CUBLAS_OP_T = 1,
    CUBLAS_OP_C = 2,
    CUBLAS_OP_HERMITAN = 2,
    CUBLAS_OP_CONJG = 3 /* reserved by NVIDIA for a future release; refused here */
} cublasOperation_t;

/* What cublasGemmEx accumulates in. Every 32F kind is emulated as exact float32: the FAST
 * kinds allow, not require, reduced-precision inputs. */
typedef enum {
    CUBLAS_COMPUTE_16F = 64,
    CUBLAS_COMPUTE_16F_PEDANTIC = 65,
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    CUBLAS_COMPUTE_32F_FAST_16F = 74,
    CUBLAS_COMPUTE_32F_FAST_16BF = 75,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
    CUBLAS_COMPUTE_64F = 70,
    CUBLAS_COMPUTE_64F_PEDANTIC = 71,
    CUBLAS_COMPUTE_32I = 72,
    CUBLAS_COMPUTE_32I_PEDANTIC = 73
} cublasComputeType_t;

/* Algorithm hints: all give the same result here. */
typedef enum {
    CUBLAS_GEMM_DFALT = -1,
    CUBLAS_GEMM_DEFAULT = -1,
    CUBLAS_GEMM_ALGO0 = 0,
    CUBLAS_GEMM_ALGO1 = 1,
    CUBLAS_GEMM_ALGO2 = 2,
    CUBLAS_GEMM_ALGO3 = 3,
    CUBLAS_GEMM_ALGO4 = 4,
    CUBLAS_GEMM_ALGO5 = 5,
    CUBLAS_GEMM_ALGO6 = 6,
    CUBLAS_GEMM_ALGO7 = 7,
    CUBLAS_GEMM_ALGO8 = 8,
    CUBLAS_GEMM_ALGO9 = 9,
    CUBLAS_GEMM_ALGO10 = 10,
    CUBLAS_GEMM_ALGO11 = 11,
    CUBLAS_GEMM_ALGO12 = 12,
    CUBLAS_GEMM_ALGO13 = 13,
    CUBLAS_GEMM_ALGO14 = 14,
    CUBLAS_GEMM_ALGO15 = 15,
    CUBLAS_GEMM_ALGO16 = 16,
    CUBLAS_GEMM_ALGO17 = 17,
    CUBLAS_GEMM_ALGO18 = 18,
    CUBLAS_GEMM_ALGO19 = 19,
    CUBLAS_GEMM_ALGO20 = 20,
    CUBLAS_GEMM_ALGO21 = 21,
    CUBLAS_GEMM_ALGO22 = 22,
    CUBLAS_GEMM_ALGO23 = 23,
    CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99,
    CUBLAS_GEMM_DFALT_TENSOR_OP = 99,
    CUBLAS_GEMM_ALGO0_TENSOR_OP = 100,
    CUBLAS_GEMM_ALGO1_TENSOR_OP = 101,
    CUBLAS_GEMM_ALGO2_TENSOR_OP = 102,
    CUBLAS_GEMM_ALGO3_TENSOR_OP = 103,
    CUBLAS_GEMM_ALGO4_TENSOR_OP = 104,
    CUBLAS_GEMM_ALGO5_TENSOR_OP = 105,
    CUBLAS_GEMM_ALGO6_TENSOR_OP = 106,
    CUBLAS_GEMM_ALGO7_TENSOR_OP = 107,
    CUBLAS_GEMM_ALGO8_TENSOR_OP = 108,
    CUBLAS_GEMM_ALGO9_TENSOR_OP = 109,
    CUBLAS_GEMM_ALGO10_TENSOR_OP = 110,
    CUBLAS_GEMM_ALGO11_TENSOR_OP = 111,
    CUBLAS_GEMM_ALGO12_TENSOR_OP = 112,
    CUBLAS_GEMM_ALGO13_TENSOR_OP = 113,
    CUBLAS_GEMM_ALGO14_TENSOR_OP = 114,
    CUBLAS_GEMM_ALGO15_TENSOR_OP = 115
} cublasGemmAlgo_t;

/* The handle's math mode: one of the first four, optionally with the DISALLOW flag. Recorded
 * and reported; the emulated Sgemm is exact float32 in every mode (TF32 is allowed, not
 * required). */
typedef enum {
    CUBLAS_DEFAULT_MATH = 0,
    CUBLAS_TENSOR_OP_MATH = 1, /* deprecated by NVIDIA */
    CUBLAS_PEDANTIC_MATH = 2,
    CUBLAS_TF32_TENSOR_OP_MATH = 3,
    CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16
} cublasMath_t;

struct cublasContext;
typedef struct cublasContext *cublasHandle_t;

/* C linkage, as the real library's symbols have. */
extern "C" {

/* Creates a handle on the default stream (0) with CUBLAS_DEFAULT_MATH. On success *handle
 * owns it (cublasDestroy). INVALID_VALUE when handle is NULL, NOT_INITIALIZED when the
 * emulated machine has no device, ALLOC_FAILED when host memory runs out. Thread-safe. */
cublasStatus_t cublasCreate(cublasHandle_t *handle);

/* Destroys a handle after the operations it submitted have run (its stream is synchronized,
 * as cuBLAS does). NOT_INITIALIZED for a NULL or already destroyed handle. */
cublasStatus_t cublasDestroy(cublasHandle_t handle);

/* Later operations of handle run in the order of stream s (0: the default stream). As in
 * cuBLAS, this also drops a workspace set by cublasSetWorkspace. NOT_INITIALIZED for a bad
 * handle. A handle is not to be used from two threads at once. */
cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t s);

/* *s = the handle's stream. NOT_INITIALIZED for a bad handle, INVALID_VALUE for NULL s. */
cublasStatus_t cublasGetStream(cublasHandle_t handle, cudaStream_t *s);

/* Gives the handle workspace_bytes of device memory at workspace (borrowed; it must stay
 * allocated while the handle holds it: a GEMM on a handle whose workspace was freed is
 * reported as the fault it could be on a GPU, EXECUTION_FAILED and a sticky
 * cudaErrorIllegalAddress). INVALID_VALUE unless the memory is device memory of at least
 * that size and 256-byte aligned; size 0 means no workspace, whatever the pointer. */
cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void *workspace, size_t workspace_bytes);

/* Sets / reads the math mode. INVALID_VALUE for an unknown mode or a NULL mode pointer. */
cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode);
cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t *mode);

/* C = alpha * op(A) * op(B) + beta * C in float32: op(A) m x k, op(B) k x n, C m x n.
 * A is m x k (lda >= max(1, m)) when transa is N, else k x m (lda >= max(1, k)); likewise B
 * with k, n and ldb; ldc >= max(1, m). When beta is 0, C is written without being read.
 * Runs in the handle's stream order. INVALID_VALUE for a negative size, an unknown op or a
 * leading dimension too small, and (the emulator's own check) for alpha or beta NULL or in
 * device memory, which the host would crash reading in the host pointer mode;
 * EXECUTION_FAILED when a matrix is not inside device memory (a sticky
 * cudaErrorIllegalAddress, as a GPU would raise) or the device has a sticky error;
 * NOT_INITIALIZED for a bad handle. */
cublasStatus_t cublasSgemm(cublasHandle_t handle, cublasOperation_t transa,
                           cublasOperation_t transb, int m, int n, int k, const float *alpha,
                           const float *A, int lda, const float *B, int ldb, const float *beta,
                           float *C, int ldc);

/* Sgemm with typed matrices. Emulated combinations, all with float alpha and beta:
 * computeType 32F or 32F_PEDANTIC with A, B, C all 32F, or A and B 16F with C 16F or 32F,
 * or A and B 16BF with C 16BF or 32F; 32F_FAST_16F, _16BF, _TF32 with A, B, C all 32F.
 * Products of the widened (exact) inputs are summed in float32 and the result rounded to
 * C's type (to nearest even). NOT_SUPPORTED for any other combination or an unknown algo;
 * otherwise the codes of cublasSgemm. */
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void *alpha,
                            const void *A, cudaDataType_t Atype, int lda, const void *B,
                            cudaDataType_t Btype, int ldb, const void *beta, void *C,
                            cudaDataType_t Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t algo);

/* What went wrong, in NVIDIA's words / the enum's name ("CUBLAS_STATUS_INVALID_VALUE").
 * Static strings; an unknown status gives "unknown error" / "CUBLAS_STATUS_UNKNOWN". */
const char *cublasGetStatusString(cublasStatus_t status);
const char *cublasGetStatusName(cublasStatus_t status);

} /* extern "C" */

#endif
