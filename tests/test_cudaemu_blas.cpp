/*
 * tests/test_cudaemu_blas.cpp: the emulated cuBLAS (cudaemu/cublas.cpp) against what NVIDIA
 * documents, and its own checks where a real program's behaviour would be undefined (a
 * destroyed handle, alpha in device memory, a workspace freed while held). Emulated CUDA
 * build only.
 *
 * Every expected result is a hand-computed, column-major example written out as literal
 * numbers (and literal f16/bf16 bit patterns), never the output of a second GEMM in this
 * file: a test that shared the emulator's reading of the layout would hide exactly the bugs
 * it is here to find. The two examples most tests use:
 * - A 2 x 3 stored {1,2,3,4,5,6}: rows (1 3 5), (2 4 6). B 3 x 4 stored
 *   {1,2,3, 4,5,6, 7,8,9, -1,0,2}: its columns are those triples. A B (2 x 4) is
 *   {22,28, 49,64, 76,100, 9,10}, e.g. (0,2) = 1*7 + 3*8 + 5*9 = 76.
 * - ferry's matmul (kernels/cuda/matmul_cuda.cu): out (n, rows) = x (n, cols) . W^T with W
 *   row-major (rows, cols), called as gemm(T, N, rows, n, cols, W, lda = cols, x,
 *   ldb = cols, out, ldc = rows). W rows (1 2 0 -1), (0 1 3 2), (2 0 1 1); tokens
 *   x0 = (1 1 1 1), x1 = (2 -1 0 3); out = {2,6,4, -3,5,7}, e.g. W0 . x1 = 2 - 2 + 0 - 3.
 *
 * Runs in one process (CK_NOFORK), as every CUDA suite does. Tests that make the device
 * fault reset it (cudaDeviceReset) before they end, so the next test starts clean. The two
 * cases that need other emulator settings, read once per process, run this program again in
 * a child: the stream case with asynchronous streams and slow copies, and cublasCreate with
 * no device. Exits 77 (skipped) when the emulated machine has no device (CUDAEMU_DEVICES=0).
 */
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <check.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

extern "C" {
#include "tests/check_util.h"
}

extern char **environ;

#define MAX_BUFFERS 32
#define SENTINEL (-777.0f) /* padding and untouched elements of C */

static const float NaN = std::numeric_limits<float>::quiet_NaN();

static cublasHandle_t g_h;
static void *g_dev[MAX_BUFFERS]; /* the running test's device buffers, freed by teardown */
static int g_n_dev;

/* ---- helpers ------------------------------------------------------------------------ */

static void setup(void)
{
    ck_assert_int_eq(cublasCreate(&g_h), CUBLAS_STATUS_SUCCESS);
    g_n_dev = 0;
}

static void teardown(void)
{
    if (g_h)
        cublasDestroy(g_h);
    g_h = nullptr;
    for (int i = 0; i < g_n_dev; i++)
        cudaFree(g_dev[i]);
    g_n_dev = 0;
    cudaGetLastError();
}

/* After cudaDeviceReset every allocation is gone: teardown must not free them again. */
static void reset_device(void)
{
    ck_assert_int_eq(cudaDeviceReset(), cudaSuccess);
    g_n_dev = 0;
    cudaGetLastError(); /* the failed synchronize may have left the error there */
    ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
}

static void *dev_alloc(size_t n_bytes)
{
    ck_assert_int_lt(g_n_dev, MAX_BUFFERS);
    void *d = nullptr;
    ck_assert_int_eq(cudaMalloc(&d, n_bytes), cudaSuccess);
    g_dev[g_n_dev++] = d;
    return d;
}

static float *dev_f32(const float *h, size_t n)
{
    float *d = (float *)dev_alloc(n * sizeof *h);
    ck_assert_int_eq(cudaMemcpy(d, h, n * sizeof *h, cudaMemcpyHostToDevice), cudaSuccess);
    return d;
}

static uint16_t *dev_u16(const uint16_t *h, size_t n)
{
    uint16_t *d = (uint16_t *)dev_alloc(n * sizeof *h);
    ck_assert_int_eq(cudaMemcpy(d, h, n * sizeof *h, cudaMemcpyHostToDevice), cudaSuccess);
    return d;
}

/* n floats of NaN, the "never read" value of C when beta is 0. */
static float *dev_nan(size_t n)
{
    float h[64];
    ck_assert_uint_le(n, 64);
    for (size_t i = 0; i < n; i++)
        h[i] = NaN;
    return dev_f32(h, n);
}

/* Fails unless the n floats at d are exactly want (NaN never matches). */
static void expect_f32(const char *what, const float *d, const float *want, size_t n)
{
    float got[64];
    ck_assert_uint_le(n, 64);
    ck_assert_int_eq(cudaMemcpy(got, d, n * sizeof *got, cudaMemcpyDeviceToHost), cudaSuccess);
    tu_assert_close(what, got, want, n, 0.0, 0.0);
}

/* Fails unless the n 16-bit words at d are exactly want (f16 / bf16 bit patterns). */
static void expect_u16(const char *what, const uint16_t *d, const uint16_t *want, size_t n)
{
    uint16_t got[64];
    ck_assert_uint_le(n, 64);
    ck_assert_int_eq(cudaMemcpy(got, d, n * sizeof *got, cudaMemcpyDeviceToHost), cudaSuccess);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(got[i] == want[i], "%s[%zu] = 0x%04x, want 0x%04x", what, i, (unsigned)got[i],
                      (unsigned)want[i]);
}

/* Fails unless the n floats at d have exactly the bits of want (NaN included). */
static void expect_f32_bits(const char *what, const float *d, const float *want, size_t n)
{
    float got[64];
    ck_assert_uint_le(n, 64);
    ck_assert_int_eq(cudaMemcpy(got, d, n * sizeof *got, cudaMemcpyDeviceToHost), cudaSuccess);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(memcmp(&got[i], &want[i], sizeof *got) == 0, "%s[%zu] = %g, want %g", what, i,
                      (double)got[i], (double)want[i]);
}

/* The first example (header comment): A 2 x 3, B 3 x 4 as stored for OP_N. */
static const float A_NN[6] = {1, 2, 3, 4, 5, 6};
static const float B_NN[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, -1, 0, 2};
static const float AB[8] = {22, 28, 49, 64, 76, 100, 9, 10};
/* The same matrices stored transposed, for OP_T: A^T 3 x 2, B^T 4 x 3. */
static const float A_T[6] = {1, 3, 5, 2, 4, 6};
static const float B_T[12] = {1, 4, 7, -1, 2, 5, 8, 0, 3, 6, 9, 2};

/* The second example: W (3, 4) row-major, x (2, 4), out (2, 3). */
static const float W[12] = {1, 2, 0, -1, 0, 1, 3, 2, 2, 0, 1, 1};
static const float X[8] = {1, 1, 1, 1, 2, -1, 0, 3};
static const float OUT[6] = {2, 6, 4, -3, 5, 7};
/* The same in bf16 and f16 bits (1 0x3f80 / 0x3c00, 2 0x4000 / 0x4000, 3 0x4040 / 0x4200,
 * -1 0xbf80 / 0xbc00). */
static const uint16_t W_BF16[12] = {0x3f80, 0x4000, 0x0000, 0xbf80, 0x0000, 0x3f80,
                                    0x4040, 0x4000, 0x4000, 0x0000, 0x3f80, 0x3f80};
static const uint16_t X_BF16[8] = {0x3f80, 0x3f80, 0x3f80, 0x3f80, 0x4000, 0xbf80, 0x0000, 0x4040};
static const uint16_t W_F16[12] = {0x3c00, 0x4000, 0x0000, 0xbc00, 0x0000, 0x3c00,
                                   0x4200, 0x4000, 0x4000, 0x0000, 0x3c00, 0x3c00};
static const uint16_t X_F16[8] = {0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x4000, 0xbc00, 0x0000, 0x4200};

static const float ONE = 1.0f, ZERO = 0.0f;

/* ---- constants and handles ---------------------------------------------------------- */

START_TEST(test_cublas_enum_values_are_nvidias)
{
    ck_assert_int_eq(CUBLAS_STATUS_SUCCESS, 0);
    ck_assert_int_eq(CUBLAS_STATUS_NOT_INITIALIZED, 1);
    ck_assert_int_eq(CUBLAS_STATUS_ALLOC_FAILED, 3);
    ck_assert_int_eq(CUBLAS_STATUS_INVALID_VALUE, 7);
    ck_assert_int_eq(CUBLAS_STATUS_ARCH_MISMATCH, 8);
    ck_assert_int_eq(CUBLAS_STATUS_MAPPING_ERROR, 11);
    ck_assert_int_eq(CUBLAS_STATUS_EXECUTION_FAILED, 13);
    ck_assert_int_eq(CUBLAS_STATUS_INTERNAL_ERROR, 14);
    ck_assert_int_eq(CUBLAS_STATUS_NOT_SUPPORTED, 15);
    ck_assert_int_eq(CUBLAS_STATUS_LICENSE_ERROR, 16);
    ck_assert_int_eq(CUBLAS_OP_N, 0);
    ck_assert_int_eq(CUBLAS_OP_T, 1);
    ck_assert_int_eq(CUBLAS_OP_C, 2);
    ck_assert_int_eq(CUBLAS_COMPUTE_16F, 64);
    ck_assert_int_eq(CUBLAS_COMPUTE_16F_PEDANTIC, 65);
    ck_assert_int_eq(CUBLAS_COMPUTE_32F, 68);
    ck_assert_int_eq(CUBLAS_COMPUTE_32F_PEDANTIC, 69);
    ck_assert_int_eq(CUBLAS_COMPUTE_32F_FAST_16F, 74);
    ck_assert_int_eq(CUBLAS_COMPUTE_32F_FAST_16BF, 75);
    ck_assert_int_eq(CUBLAS_COMPUTE_32F_FAST_TF32, 77);
    ck_assert_int_eq(CUBLAS_COMPUTE_64F, 70);
    ck_assert_int_eq(CUBLAS_COMPUTE_64F_PEDANTIC, 71);
    ck_assert_int_eq(CUBLAS_COMPUTE_32I, 72);
    ck_assert_int_eq(CUBLAS_COMPUTE_32I_PEDANTIC, 73);
    ck_assert_int_eq(CUBLAS_GEMM_DEFAULT, -1);
    ck_assert_int_eq(CUBLAS_GEMM_DEFAULT_TENSOR_OP, 99);
    ck_assert_int_eq(CUBLAS_DEFAULT_MATH, 0);
    ck_assert_int_eq(CUBLAS_TENSOR_OP_MATH, 1);
    ck_assert_int_eq(CUBLAS_PEDANTIC_MATH, 2);
    ck_assert_int_eq(CUBLAS_TF32_TENSOR_OP_MATH, 3);
    ck_assert_int_eq(CUDA_R_32F, 0);
    ck_assert_int_eq(CUDA_R_64F, 1);
    ck_assert_int_eq(CUDA_R_16F, 2);
    ck_assert_int_eq(CUDA_R_8I, 3);
    ck_assert_int_eq(CUDA_R_32I, 10);
    ck_assert_int_eq(CUDA_R_16BF, 14);
}
END_TEST

START_TEST(test_cublas_status_names_and_strings)
{
    ck_assert_str_eq(cublasGetStatusName(CUBLAS_STATUS_SUCCESS), "CUBLAS_STATUS_SUCCESS");
    ck_assert_str_eq(cublasGetStatusName(CUBLAS_STATUS_NOT_INITIALIZED),
                     "CUBLAS_STATUS_NOT_INITIALIZED");
    ck_assert_str_eq(cublasGetStatusName(CUBLAS_STATUS_ALLOC_FAILED), "CUBLAS_STATUS_ALLOC_FAILED");
    ck_assert_str_eq(cublasGetStatusName(CUBLAS_STATUS_INVALID_VALUE),
                     "CUBLAS_STATUS_INVALID_VALUE");
    ck_assert_str_eq(cublasGetStatusName(CUBLAS_STATUS_EXECUTION_FAILED),
                     "CUBLAS_STATUS_EXECUTION_FAILED");
    ck_assert_str_eq(cublasGetStatusName(CUBLAS_STATUS_NOT_SUPPORTED),
                     "CUBLAS_STATUS_NOT_SUPPORTED");
    ck_assert_str_eq(cublasGetStatusString(CUBLAS_STATUS_INVALID_VALUE),
                     "an invalid numeric value was used as an argument");
    ck_assert_str_eq(cublasGetStatusString(CUBLAS_STATUS_EXECUTION_FAILED),
                     "the GPU program failed to execute");
    /* every code has its own text, and an unknown one still gets a string */
    const cublasStatus_t all[] = {CUBLAS_STATUS_SUCCESS,          CUBLAS_STATUS_NOT_INITIALIZED,
                                  CUBLAS_STATUS_ALLOC_FAILED,     CUBLAS_STATUS_INVALID_VALUE,
                                  CUBLAS_STATUS_ARCH_MISMATCH,    CUBLAS_STATUS_MAPPING_ERROR,
                                  CUBLAS_STATUS_EXECUTION_FAILED, CUBLAS_STATUS_INTERNAL_ERROR,
                                  CUBLAS_STATUS_NOT_SUPPORTED,    CUBLAS_STATUS_LICENSE_ERROR};
    const size_t n = sizeof all / sizeof all[0];
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++) {
            ck_assert_str_ne(cublasGetStatusString(all[i]), cublasGetStatusString(all[j]));
            ck_assert_str_ne(cublasGetStatusName(all[i]), cublasGetStatusName(all[j]));
        }
    /* 31: not a status, yet inside the enum's range (a value outside it would be undefined
     * behaviour in C++) */
    ck_assert_ptr_nonnull(cublasGetStatusString((cublasStatus_t)31));
    ck_assert_ptr_nonnull(cublasGetStatusName((cublasStatus_t)31));
}
END_TEST

START_TEST(test_cublas_handle_stream_and_bad_handles)
{
    cudaStream_t s = nullptr, got = (cudaStream_t)&g_h;
    ck_assert_int_eq(cublasGetStream(g_h, &got), CUBLAS_STATUS_SUCCESS);
    ck_assert_ptr_null(got); /* a new handle uses the default stream */
    ck_assert_int_eq(cudaStreamCreate(&s), cudaSuccess);
    ck_assert_int_eq(cublasSetStream(g_h, s), CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(cublasGetStream(g_h, &got), CUBLAS_STATUS_SUCCESS);
    ck_assert_ptr_eq(got, s);
    ck_assert_int_eq(cublasSetStream(g_h, 0), CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(cublasGetStream(g_h, &got), CUBLAS_STATUS_SUCCESS);
    ck_assert_ptr_null(got);
    ck_assert_int_eq(cublasGetStream(g_h, nullptr), CUBLAS_STATUS_INVALID_VALUE);
    ck_assert_int_eq(cudaStreamDestroy(s), cudaSuccess);

    ck_assert_int_eq(cublasCreate(nullptr), CUBLAS_STATUS_INVALID_VALUE);

    /* a NULL handle, and one already destroyed, are refused by every call */
    cublasHandle_t gone = nullptr;
    ck_assert_int_eq(cublasCreate(&gone), CUBLAS_STATUS_SUCCESS);
    ck_assert_ptr_nonnull(gone);
    ck_assert_int_eq(cublasDestroy(gone), CUBLAS_STATUS_SUCCESS);
    float *d = dev_nan(4);
    cublasMath_t mode;
    const cublasHandle_t bad[2] = {nullptr, gone};
    for (int i = 0; i < 2; i++) {
        cublasHandle_t h = bad[i];
        ck_assert_int_eq(cublasDestroy(h), CUBLAS_STATUS_NOT_INITIALIZED);
        ck_assert_int_eq(cublasSetStream(h, 0), CUBLAS_STATUS_NOT_INITIALIZED);
        ck_assert_int_eq(cublasGetStream(h, &got), CUBLAS_STATUS_NOT_INITIALIZED);
        ck_assert_int_eq(cublasSetWorkspace(h, nullptr, 0), CUBLAS_STATUS_NOT_INITIALIZED);
        ck_assert_int_eq(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH), CUBLAS_STATUS_NOT_INITIALIZED);
        ck_assert_int_eq(cublasGetMathMode(h, &mode), CUBLAS_STATUS_NOT_INITIALIZED);
        ck_assert_int_eq(
            cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &ONE, d, 2, d, 2, &ZERO, d, 2),
            CUBLAS_STATUS_NOT_INITIALIZED);
        ck_assert_int_eq(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &ONE, d, CUDA_R_32F, 2,
                                      d, CUDA_R_32F, 2, &ZERO, d, CUDA_R_32F, 2, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT),
                         CUBLAS_STATUS_NOT_INITIALIZED);
    }
    const float nans[4] = {NaN, NaN, NaN, NaN};
    expect_f32_bits("C after calls on bad handles", d, nans, 4);
}
END_TEST

START_TEST(test_cublas_math_mode_roundtrip)
{
    cublasMath_t mode = (cublasMath_t)31;
    ck_assert_int_eq(cublasGetMathMode(g_h, &mode), CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(mode, CUBLAS_DEFAULT_MATH);
    ck_assert_int_eq(cublasSetMathMode(g_h, CUBLAS_TF32_TENSOR_OP_MATH), CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(cublasGetMathMode(g_h, &mode), CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(mode, CUBLAS_TF32_TENSOR_OP_MATH);
    cublasMath_t pedantic_strict =
        (cublasMath_t)(CUBLAS_PEDANTIC_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
    ck_assert_int_eq(cublasSetMathMode(g_h, pedantic_strict), CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(cublasGetMathMode(g_h, &mode), CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(mode, pedantic_strict);
    ck_assert_int_eq(cublasSetMathMode(g_h, (cublasMath_t)7), CUBLAS_STATUS_INVALID_VALUE);
    ck_assert_int_eq(cublasGetMathMode(g_h, &mode), CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(mode, pedantic_strict); /* a refused mode changes nothing */
    ck_assert_int_eq(cublasGetMathMode(g_h, nullptr), CUBLAS_STATUS_INVALID_VALUE);
    ck_assert_int_eq(cublasSetMathMode(g_h, CUBLAS_DEFAULT_MATH), CUBLAS_STATUS_SUCCESS);
}
END_TEST

START_TEST(test_cublas_workspace_must_be_aligned_device_memory)
{
    char *ws = (char *)dev_alloc(4096);
    static char host[4096] __attribute__((aligned(256)));
    ck_assert_uint_eq((uintptr_t)ws % 256, 0); /* cudaMalloc's documented alignment */
    ck_assert_int_eq(cublasSetWorkspace(g_h, ws, 4096), CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(cublasSetWorkspace(g_h, ws + 256, 4096 - 256), CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(cublasSetWorkspace(g_h, ws, 4097), CUBLAS_STATUS_INVALID_VALUE);
    ck_assert_int_eq(cublasSetWorkspace(g_h, ws + 256, 4096), CUBLAS_STATUS_INVALID_VALUE);
    ck_assert_int_eq(cublasSetWorkspace(g_h, ws + 16, 1024), CUBLAS_STATUS_INVALID_VALUE);
    ck_assert_int_eq(cublasSetWorkspace(g_h, host, sizeof host), CUBLAS_STATUS_INVALID_VALUE);
    ck_assert_int_eq(cublasSetWorkspace(g_h, nullptr, 1024), CUBLAS_STATUS_INVALID_VALUE);
    ck_assert_int_eq(cublasSetWorkspace(g_h, nullptr, 0), CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(cublasSetWorkspace(g_h, host + 1, 0), CUBLAS_STATUS_SUCCESS);

    /* a GEMM still runs with a workspace set */
    ck_assert_int_eq(cublasSetWorkspace(g_h, ws, 4096), CUBLAS_STATUS_SUCCESS);
    float *a = dev_f32(A_NN, 6), *b = dev_f32(B_NN, 12), *c = dev_nan(8);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 4, 3, &ONE, a, 2, b, 3, &ZERO, c, 2),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("A B with a workspace", c, AB, 8);
}
END_TEST

/* cublasSetStream gives the workspace back to cuBLAS's own pool, so freeing it afterwards is
 * fine; freeing it while the handle holds it leaves cuBLAS writing freed memory. */
START_TEST(test_cublas_workspace_freed_while_held_faults)
{
    void *ws = nullptr;
    ck_assert_int_eq(cudaMalloc(&ws, 1024), cudaSuccess);
    float *a = dev_f32(A_NN, 6), *b = dev_f32(B_NN, 12), *c = dev_nan(8);
    ck_assert_int_eq(cublasSetWorkspace(g_h, ws, 1024), CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(cublasSetStream(g_h, 0), CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(cudaFree(ws), cudaSuccess);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 4, 3, &ONE, a, 2, b, 3, &ZERO, c, 2),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("A B after the workspace was released", c, AB, 8);

    ck_assert_int_eq(cudaMalloc(&ws, 1024), cudaSuccess);
    ck_assert_int_eq(cublasSetWorkspace(g_h, ws, 1024), CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(cudaFree(ws), cudaSuccess);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 4, 3, &ONE, a, 2, b, 3, &ZERO, c, 2),
        CUBLAS_STATUS_EXECUTION_FAILED);
    ck_assert_int_eq(cudaDeviceSynchronize(), cudaErrorIllegalAddress);
    reset_device();
}
END_TEST

/* ---- Sgemm: the four transpositions, leading dimensions, alpha and beta ------------- */

START_TEST(test_cublas_sgemm_nn_hand_computed)
{
    float *a = dev_f32(A_NN, 6), *b = dev_f32(B_NN, 12), *c = dev_nan(8);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 4, 3, &ONE, a, 2, b, 3, &ZERO, c, 2),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("N N: A B", c, AB, 8);
}
END_TEST

/* The call kernels/cuda/matmul_cuda.cu makes: out = x W^T as gemm(T, N) with lda = cols. */
START_TEST(test_cublas_sgemm_tn_matmul_layout)
{
    float *w = dev_f32(W, 12), *x = dev_f32(X, 8), *out = dev_nan(6);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_T, CUBLAS_OP_N, 3, 2, 4, &ONE, w, 4, x, 4, &ZERO, out, 3),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("T N: x W^T", out, OUT, 6);

    /* on real matrices the conjugate transpose is the transpose */
    float *out_c = dev_nan(6);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_C, CUBLAS_OP_N, 3, 2, 4, &ONE, w, 4, x, 4, &ZERO, out_c, 3),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("C N: x W^T", out_c, OUT, 6);
}
END_TEST

START_TEST(test_cublas_sgemm_nt_hand_computed)
{
    float *a = dev_f32(A_NN, 6), *bt = dev_f32(B_T, 12), *c = dev_nan(8);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_T, 2, 4, 3, &ONE, a, 2, bt, 4, &ZERO, c, 2),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("N T: A (B^T)^T", c, AB, 8);
}
END_TEST

START_TEST(test_cublas_sgemm_tt_hand_computed)
{
    float *at = dev_f32(A_T, 6), *bt = dev_f32(B_T, 12), *c = dev_nan(8);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_T, CUBLAS_OP_T, 2, 4, 3, &ONE, at, 3, bt, 4, &ZERO, c, 2),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("T T: (A^T)^T (B^T)^T", c, AB, 8);
    /* OP_C on both: the same */
    float *c2 = dev_nan(8);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_C, CUBLAS_OP_C, 2, 4, 3, &ONE, at, 3, bt, 4, &ZERO, c2, 2),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("C C", c2, AB, 8);
}
END_TEST

/* Leading dimensions larger than the rows: the padding between columns is NaN in A and B (a
 * read shows up in C) and a sentinel in C (a write shows up there). Each buffer holds exactly
 * (cols - 1) * ld + rows elements, all that a matrix spans. */
START_TEST(test_cublas_sgemm_padding_is_neither_read_nor_written)
{
    const float P = NaN, S = SENTINEL;
    /* W^T as stored: 4 x 3, lda 6 */
    const float a_h[16] = {1, 2, 0, -1, P, P, 0, 1, 3, 2, P, P, 2, 0, 1, 1};
    /* x^T as stored: 4 x 2, ldb 5 */
    const float b_h[9] = {1, 1, 1, 1, P, 2, -1, 0, 3};
    /* out^T: 3 x 2, ldc 4 */
    const float c_h[7] = {S, S, S, S, S, S, S};
    const float want[7] = {2, 6, 4, S, -3, 5, 7};
    float *a = dev_f32(a_h, 16), *b = dev_f32(b_h, 9), *c = dev_f32(c_h, 7);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_T, CUBLAS_OP_N, 3, 2, 4, &ONE, a, 6, b, 5, &ZERO, c, 4),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("T N with padding", c, want, 7);
    expect_f32_bits("A after", a, a_h, 16);
    expect_f32_bits("B after", b, b_h, 9);

    /* N N with padding: A 2 x 3 in lda 3, B 3 x 4 in ldb 4, C 2 x 4 in ldc 3 */
    const float an_h[8] = {1, 2, P, 3, 4, P, 5, 6};
    const float bn_h[15] = {1, 2, 3, P, 4, 5, 6, P, 7, 8, 9, P, -1, 0, 2};
    const float cn_h[11] = {S, S, S, S, S, S, S, S, S, S, S};
    const float wantn[11] = {22, 28, S, 49, 64, S, 76, 100, S, 9, 10};
    float *an = dev_f32(an_h, 8), *bn = dev_f32(bn_h, 15), *cn = dev_f32(cn_h, 11);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 4, 3, &ONE, an, 3, bn, 4, &ZERO, cn, 3),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("N N with padding", cn, wantn, 11);
}
END_TEST

START_TEST(test_cublas_sgemm_alpha_beta_scale)
{
    /* C = 2 A B + 3 C_old, C_old = {1..8}: 2 * 22 + 3 * 1 = 47, ... */
    const float c_old[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    const float want[8] = {47, 62, 107, 140, 167, 218, 39, 44};
    const float alpha = 2.0f, beta = 3.0f;
    float *a = dev_f32(A_NN, 6), *b = dev_f32(B_NN, 12), *c = dev_f32(c_old, 8);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 4, 3, &alpha, a, 2, b, 3, &beta, c, 2),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("2 A B + 3 C", c, want, 8);

    /* alpha -0.5, beta 1 on the matmul example: C_old = {1, ..., 6} */
    const float c2_old[6] = {1, 2, 3, 4, 5, 6};
    const float want2[6] = {0, -1, 1, 5.5f, 2.5f, 2.5f};
    const float alpha2 = -0.5f;
    float *w = dev_f32(W, 12), *x = dev_f32(X, 8), *c2 = dev_f32(c2_old, 6);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_T, CUBLAS_OP_N, 3, 2, 4, &alpha2, w, 4, x, 4, &ONE, c2, 3),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("-0.5 x W^T + C", c2, want2, 6);
}
END_TEST

/* Fresh device memory may hold anything (NaN in the emulator): with beta 0, C is written
 * without being read, so NaN * 0 never reaches the result. */
START_TEST(test_cublas_sgemm_beta_zero_does_not_read_c)
{
    float *a = dev_f32(A_NN, 6), *b = dev_f32(B_NN, 12), *c = dev_nan(8);
    const float two = 2.0f;
    const float want[8] = {44, 56, 98, 128, 152, 200, 18, 20};
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 4, 3, &two, a, 2, b, 3, &ZERO, c, 2),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("2 A B over NaN", c, want, 8);

    /* an infinite C as well */
    const float inf = std::numeric_limits<float>::infinity();
    const float c_inf[8] = {inf, -inf, inf, -inf, inf, -inf, inf, -inf};
    float *c2 = dev_f32(c_inf, 8);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 4, 3, &ONE, a, 2, b, 3, &ZERO, c2, 2),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("A B over inf", c2, AB, 8);
}
END_TEST

/* ---- GemmEx: types ----------------------------------------------------------------- */

START_TEST(test_cublas_gemmex_f32_hand_computed)
{
    float *at = dev_f32(A_T, 6), *bt = dev_f32(B_T, 12);
    const cublasComputeType_t computes[] = {
        CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_COMPUTE_32F_FAST_TF32,
        CUBLAS_COMPUTE_32F_FAST_16F, CUBLAS_COMPUTE_32F_FAST_16BF};
    for (size_t i = 0; i < sizeof computes / sizeof computes[0]; i++) {
        float *c = dev_nan(8);
        ck_assert_int_eq(cublasGemmEx(g_h, CUBLAS_OP_T, CUBLAS_OP_T, 2, 4, 3, &ONE, at, CUDA_R_32F,
                                      3, bt, CUDA_R_32F, 4, &ZERO, c, CUDA_R_32F, 2, computes[i],
                                      CUBLAS_GEMM_DEFAULT_TENSOR_OP),
                         CUBLAS_STATUS_SUCCESS);
        expect_f32("GemmEx 32F, T T", c, AB, 8);
    }
}
END_TEST

START_TEST(test_cublas_gemmex_bf16_in_f32_out)
{
    uint16_t *w = dev_u16(W_BF16, 12), *x = dev_u16(X_BF16, 8);
    float *out = dev_nan(6);
    ck_assert_int_eq(cublasGemmEx(g_h, CUBLAS_OP_T, CUBLAS_OP_N, 3, 2, 4, &ONE, w, CUDA_R_16BF, 4,
                                  x, CUDA_R_16BF, 4, &ZERO, out, CUDA_R_32F, 3, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT),
                     CUBLAS_STATUS_SUCCESS);
    expect_f32("bf16 x W^T -> f32", out, OUT, 6);
}
END_TEST

START_TEST(test_cublas_gemmex_f16_in_f32_out)
{
    uint16_t *w = dev_u16(W_F16, 12), *x = dev_u16(X_F16, 8);
    float *out = dev_nan(6);
    ck_assert_int_eq(cublasGemmEx(g_h, CUBLAS_OP_T, CUBLAS_OP_N, 3, 2, 4, &ONE, w, CUDA_R_16F, 4, x,
                                  CUDA_R_16F, 4, &ZERO, out, CUDA_R_32F, 3, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT),
                     CUBLAS_STATUS_SUCCESS);
    expect_f32("f16 x W^T -> f32", out, OUT, 6);
}
END_TEST

START_TEST(test_cublas_gemmex_bf16_in_bf16_out)
{
    /* A B in bf16: 1..9 are 0x3f80 0x4000 0x4040 0x4080 0x40a0 0x40c0 0x40e0 0x4100 0x4110;
     * the results 22 28 49 64 76 100 9 10 all fit bf16's 8 significant bits */
    const uint16_t a_h[6] = {0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0};
    const uint16_t b_h[12] = {0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0,
                              0x40e0, 0x4100, 0x4110, 0xbf80, 0x0000, 0x4000};
    const uint16_t want[8] = {0x41b0, 0x41e0, 0x4244, 0x4280, 0x4298, 0x42c8, 0x4110, 0x4120};
    const uint16_t nan_h[8] = {0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff};
    uint16_t *a = dev_u16(a_h, 6), *b = dev_u16(b_h, 12), *c = dev_u16(nan_h, 8);
    ck_assert_int_eq(cublasGemmEx(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 4, 3, &ONE, a, CUDA_R_16BF, 2,
                                  b, CUDA_R_16BF, 3, &ZERO, c, CUDA_R_16BF, 2, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT),
                     CUBLAS_STATUS_SUCCESS);
    expect_u16("bf16 A B -> bf16", c, want, 8);
}
END_TEST

/* C = 16 * 16 + C_old with C_old {1, 3, 2, 1.5} in bf16 (step 2 above 256): 257 is a tie and
 * goes to the even 256, 259 to the even 260, 258 is exact, 257.5 goes up to 258.
 * Truncating would give 256, 258, 258, 256; rounding ties away 258, 260, 258, 258. */
START_TEST(test_cublas_gemmex_bf16_out_rounds_to_nearest_even)
{
    const uint16_t a_h[4] = {0x4180, 0x4180, 0x4180, 0x4180}; /* 16 */
    const uint16_t b_h[1] = {0x4180};
    const uint16_t c_h[4] = {0x3f80, 0x4040, 0x4000, 0x3fc0};  /* 1 3 2 1.5 */
    const uint16_t want[4] = {0x4380, 0x4382, 0x4381, 0x4381}; /* 256 260 258 258 */
    uint16_t *a = dev_u16(a_h, 4), *b = dev_u16(b_h, 1), *c = dev_u16(c_h, 4);
    ck_assert_int_eq(cublasGemmEx(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 1, 1, &ONE, a, CUDA_R_16BF, 4,
                                  b, CUDA_R_16BF, 1, &ONE, c, CUDA_R_16BF, 4, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT),
                     CUBLAS_STATUS_SUCCESS);
    expect_u16("256 + C_old in bf16", c, want, 4);
}
END_TEST

/* The same in f16 (step 2 above 2048): 32 * 64 + C_old {1, 3, 2, 1.5} -> 2048, 2052, 2050,
 * 2050. Then overflow: 256 * 256 = 65536 is past 65520, halfway above the largest half
 * 65504, so it is inf; 255 * 256 = 65280 is exact. */
START_TEST(test_cublas_gemmex_f16_out_rounds_to_nearest_even)
{
    const uint16_t a_h[4] = {0x5000, 0x5000, 0x5000, 0x5000}; /* 32 */
    const uint16_t b_h[1] = {0x5400};                         /* 64 */
    const uint16_t c_h[4] = {0x3c00, 0x4200, 0x4000, 0x3e00}; /* 1 3 2 1.5 */
    const uint16_t want[4] = {0x6800, 0x6802, 0x6801, 0x6801};
    uint16_t *a = dev_u16(a_h, 4), *b = dev_u16(b_h, 1), *c = dev_u16(c_h, 4);
    ck_assert_int_eq(cublasGemmEx(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 1, 1, &ONE, a, CUDA_R_16F, 4, b,
                                  CUDA_R_16F, 1, &ONE, c, CUDA_R_16F, 4, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT),
                     CUBLAS_STATUS_SUCCESS);
    expect_u16("2048 + C_old in f16", c, want, 4);

    const uint16_t big_h[3] = {0x5c00, 0x5bf8, 0xdc00}; /* 256 255 -256 */
    const uint16_t b256_h[1] = {0x5c00};
    const uint16_t want_big[3] = {0x7c00, 0x7bf8, 0xfc00}; /* inf 65280 -inf */
    const uint16_t nan_h[3] = {0x7fff, 0x7fff, 0x7fff};
    uint16_t *big = dev_u16(big_h, 3), *b256 = dev_u16(b256_h, 1), *c2 = dev_u16(nan_h, 3);
    ck_assert_int_eq(cublasGemmEx(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 3, 1, 1, &ONE, big, CUDA_R_16F, 3,
                                  b256, CUDA_R_16F, 1, &ZERO, c2, CUDA_R_16F, 3, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT),
                     CUBLAS_STATUS_SUCCESS);
    expect_u16("256^2 in f16", c2, want_big, 3);
}
END_TEST

/* f16 inputs are widened exactly, subnormals and infinities included: 2^-24 (0x0001) and
 * 2^-15 (0x0200) times 2^14 (0x7400) are 2^-10 and 0.5. */
START_TEST(test_cublas_gemmex_f16_widens_subnormals_and_inf)
{
    const uint16_t a_h[5] = {0x0001, 0x0200, 0x7c00, 0xfc00, 0x8001};
    const uint16_t b_h[1] = {0x7400};
    const float inf = std::numeric_limits<float>::infinity();
    const float want[5] = {0.0009765625f, 0.5f, inf, -inf, -0.0009765625f};
    uint16_t *a = dev_u16(a_h, 5), *b = dev_u16(b_h, 1);
    float *c = dev_nan(5);
    ck_assert_int_eq(cublasGemmEx(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 5, 1, 1, &ONE, a, CUDA_R_16F, 5, b,
                                  CUDA_R_16F, 1, &ZERO, c, CUDA_R_32F, 5, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT),
                     CUBLAS_STATUS_SUCCESS);
    expect_f32_bits("f16 specials widened", c, want, 5);
}
END_TEST

/* ---- argument checks ---------------------------------------------------------------- */

/* Each documented INVALID_VALUE case, on buffers big enough for any of the shapes; C must
 * be left as it was. Each case differs from a valid call in the one argument named. */
START_TEST(test_cublas_invalid_values_are_refused)
{
    float ones[16];
    for (int i = 0; i < 16; i++)
        ones[i] = 1.0f;
    float sentinels[16];
    for (int i = 0; i < 16; i++)
        sentinels[i] = SENTINEL;
    float *a = dev_f32(ones, 16), *b = dev_f32(ones, 16), *c = dev_f32(sentinels, 16);
    const cublasOperation_t N = CUBLAS_OP_N, T = CUBLAS_OP_T;
    struct {
        const char *what;
        cublasOperation_t ta, tb;
        int m, n, k, lda, ldb, ldc;
    } bad[] = {
        {"m < 0", N, N, -1, 2, 3, 2, 3, 2},
        {"n < 0", N, N, 2, -1, 3, 2, 3, 2},
        {"k < 0", N, N, 2, 2, -1, 2, 3, 2},
        /* 3 is CUBLAS_OP_CONJG, reserved; the only other value inside the enum's range */
        {"transa 3", CUBLAS_OP_CONJG, N, 2, 2, 3, 3, 3, 2},
        {"transb 3", N, CUBLAS_OP_CONJG, 2, 2, 3, 2, 3, 2},
        {"lda < m (N)", N, N, 2, 2, 3, 1, 3, 2},
        {"lda < k (T), though >= m", T, N, 2, 2, 3, 2, 3, 2},
        {"ldb < k (N)", N, N, 2, 2, 3, 2, 2, 2},
        {"ldb < n (T), though >= k", N, T, 2, 4, 3, 2, 3, 2},
        {"ldc < m", N, N, 2, 2, 3, 2, 3, 1},
        {"lda 0 with m 0 (max(1, m))", N, N, 0, 2, 3, 0, 3, 1},
        {"ldb 0 with k 0 (max(1, k))", N, N, 2, 2, 0, 2, 0, 2},
        {"ldc 0 with m 0 (max(1, m))", N, N, 0, 2, 3, 1, 3, 0},
        {"ldb 0 with n 0 (T, max(1, n))", N, T, 2, 0, 3, 2, 0, 2},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cublasStatus_t st = cublasSgemm(g_h, bad[i].ta, bad[i].tb, bad[i].m, bad[i].n, bad[i].k,
                                        &ONE, a, bad[i].lda, b, bad[i].ldb, &ZERO, c, bad[i].ldc);
        ck_assert_msg(st == CUBLAS_STATUS_INVALID_VALUE, "Sgemm %s: %s", bad[i].what,
                      cublasGetStatusName(st));
        st = cublasGemmEx(g_h, bad[i].ta, bad[i].tb, bad[i].m, bad[i].n, bad[i].k, &ONE, a,
                          CUDA_R_32F, bad[i].lda, b, CUDA_R_32F, bad[i].ldb, &ZERO, c, CUDA_R_32F,
                          bad[i].ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        ck_assert_msg(st == CUBLAS_STATUS_INVALID_VALUE, "GemmEx %s: %s", bad[i].what,
                      cublasGetStatusName(st));
    }
    /* host pointer mode: alpha and beta must be host memory (the emulator's check: the host
     * would crash reading a device pointer) */
    const float *d_one = dev_f32(&ONE, 1);
    ck_assert_int_eq(cublasSgemm(g_h, N, N, 2, 2, 3, d_one, a, 2, b, 3, &ZERO, c, 2),
                     CUBLAS_STATUS_INVALID_VALUE);
    ck_assert_int_eq(cublasSgemm(g_h, N, N, 2, 2, 3, &ONE, a, 2, b, 3, d_one, c, 2),
                     CUBLAS_STATUS_INVALID_VALUE);
    ck_assert_int_eq(cublasSgemm(g_h, N, N, 2, 2, 3, &ONE, a, 2, b, 3, nullptr, c, 2),
                     CUBLAS_STATUS_INVALID_VALUE);
    expect_f32("C after refused calls", c, sentinels, 16);

    /* the checks are not stricter than documented: with T, lda only needs k (here < m) */
    ck_assert_int_eq(cublasSgemm(g_h, T, N, 4, 2, 3, &ONE, a, 3, b, 3, &ZERO, c, 4),
                     CUBLAS_STATUS_SUCCESS);
    const float want[16] = {3,        3,        3,        3,        3,        3,
                            3,        3,        SENTINEL, SENTINEL, SENTINEL, SENTINEL,
                            SENTINEL, SENTINEL, SENTINEL, SENTINEL};
    expect_f32("T N with lda = k < m", c, want, 16);
}
END_TEST

START_TEST(test_cublas_unsupported_types_are_refused)
{
    const uint16_t h16[8] = {0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00, 0x3c00};
    uint16_t *a = dev_u16(h16, 8), *b = dev_u16(h16, 8), *c = dev_u16(h16, 8);
    struct {
        const char *what;
        cudaDataType_t at, bt, ct;
        cublasComputeType_t compute;
    } bad[] = {
        {"bf16 A B into f16 C", CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16F, CUBLAS_COMPUTE_32F},
        {"f16 into bf16 C", CUDA_R_16F, CUDA_R_16F, CUDA_R_16BF, CUBLAS_COMPUTE_32F},
        {"f16 A with bf16 B", CUDA_R_16F, CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F},
        {"f32 with compute 64F", CUDA_R_32F, CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_64F},
        {"f32 with compute 32I", CUDA_R_32F, CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32I},
        {"bf16 with compute 32F_FAST_TF32", CUDA_R_16BF, CUDA_R_16BF, CUDA_R_32F,
         CUBLAS_COMPUTE_32F_FAST_TF32},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cublasStatus_t st =
            cublasGemmEx(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &ONE, a, bad[i].at, 2, b,
                         bad[i].bt, 2, &ZERO, c, bad[i].ct, 2, bad[i].compute, CUBLAS_GEMM_DEFAULT);
        ck_assert_msg(st == CUBLAS_STATUS_NOT_SUPPORTED, "%s: %s", bad[i].what,
                      cublasGetStatusName(st));
    }
    expect_u16("C after refused calls", c, h16, 8);
}
END_TEST

/* Runs one Sgemm with stderr sent to a file; returns its status, and in msg (len bytes) what
 * it printed. */
static cublasStatus_t sgemm_capturing_stderr(const float *a, int lda, const float *b, float *c,
                                             char *msg, size_t len)
{
    FILE *f = tmpfile();
    ck_assert_ptr_nonnull(f);
    fflush(stderr);
    int saved = dup(2);
    ck_assert_int_ge(saved, 0);
    ck_assert_int_ge(dup2(fileno(f), 2), 0);
    cublasStatus_t st =
        cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 4, 3, &ONE, a, lda, b, 3, &ZERO, c, 2);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    rewind(f);
    size_t n = fread(msg, 1, len - 1, f);
    msg[n] = '\0';
    fclose(f);
    return st;
}

/* A matrix that is not all inside device memory is what a GPU reports as an illegal
 * address: EXECUTION_FAILED, a message naming the matrix, and a sticky error that every
 * later call sees until cudaDeviceReset. */
START_TEST(test_cublas_matrix_outside_device_memory_faults)
{
    char msg[1024];
    float *b = dev_f32(B_NN, 12), *c = dev_nan(8);
    static float host_a[6] = {1, 2, 3, 4, 5, 6};
    ck_assert_int_eq(sgemm_capturing_stderr(host_a, 2, b, c, msg, sizeof msg),
                     CUBLAS_STATUS_EXECUTION_FAILED);
    ck_assert_msg(strstr(msg, "cublasSgemm") && strstr(msg, "A (") &&
                      strstr(msg, "not inside device memory"),
                  "message: %s", msg);
    ck_assert_int_eq(cudaDeviceSynchronize(), cudaErrorIllegalAddress);
    /* sticky: a valid call fails too */
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 4, 3, &ONE, c, 2, b, 3, &ZERO, c, 2),
        CUBLAS_STATUS_EXECUTION_FAILED);
    reset_device();

    /* device memory, but A's extent (cols - 1) * lda + rows = 2 * 3 + 2 = 8 floats runs past
     * its 6: lda 3 instead of 2 */
    float *a6 = dev_f32(A_NN, 6);
    b = dev_f32(B_NN, 12);
    c = dev_nan(8);
    ck_assert_int_eq(sgemm_capturing_stderr(a6, 3, b, c, msg, sizeof msg),
                     CUBLAS_STATUS_EXECUTION_FAILED);
    ck_assert_msg(strstr(msg, "A (") && strstr(msg, "8 elements"), "message: %s", msg);
    ck_assert_int_eq(cudaDeviceSynchronize(), cudaErrorIllegalAddress);
    reset_device();

    /* C one float short */
    float *a = dev_f32(A_NN, 6);
    b = dev_f32(B_NN, 12);
    float *c7 = dev_nan(7);
    ck_assert_int_eq(sgemm_capturing_stderr(a, 2, b, c7, msg, sizeof msg),
                     CUBLAS_STATUS_EXECUTION_FAILED);
    ck_assert_msg(strstr(msg, "C (") && strstr(msg, "8 elements"), "message: %s", msg);
    reset_device();

    /* after the reset, a new handle works again */
    cublasHandle_t h2 = nullptr;
    ck_assert_int_eq(cublasCreate(&h2), CUBLAS_STATUS_SUCCESS);
    a = dev_f32(A_NN, 6);
    b = dev_f32(B_NN, 12);
    c = dev_nan(8);
    ck_assert_int_eq(
        cublasSgemm(h2, CUBLAS_OP_N, CUBLAS_OP_N, 2, 4, 3, &ONE, a, 2, b, 3, &ZERO, c, 2),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("A B after the reset", c, AB, 8);
    ck_assert_int_eq(cublasDestroy(h2), CUBLAS_STATUS_SUCCESS);
}
END_TEST

/* ---- quick returns ------------------------------------------------------------------ */

START_TEST(test_cublas_quick_returns)
{
    const float S = SENTINEL;
    const float sentinels[8] = {S, S, S, S, S, S, S, S};
    float *a = dev_f32(A_NN, 6), *b = dev_f32(B_NN, 12), *c = dev_f32(sentinels, 8);

    /* m == 0 or n == 0: nothing is computed or written */
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 0, 4, 3, &ONE, a, 1, b, 3, &ZERO, c, 1),
        CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 0, 3, &ONE, a, 2, b, 3, &ZERO, c, 2),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("C after m = 0, n = 0", c, sentinels, 8);

    /* k == 0: C = beta C, and A and B are not read (NULL here) */
    const float c_old[4] = {1, 2, 3, 4};
    const float want_k0[4] = {2, 4, 6, 8};
    const float two = 2.0f;
    float *c2 = dev_f32(c_old, 4);
    ck_assert_int_eq(cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 0, &ONE, nullptr, 2, nullptr,
                                 1, &two, c2, 2),
                     CUBLAS_STATUS_SUCCESS);
    expect_f32("k = 0: 2 C", c2, want_k0, 4);

    /* k == 0 and beta == 0: C = 0 without reading C's NaN */
    const float zeros[4] = {0, 0, 0, 0};
    float *c3 = dev_nan(4);
    ck_assert_int_eq(cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 0, &ONE, nullptr, 2, nullptr,
                                 1, &ZERO, c3, 2),
                     CUBLAS_STATUS_SUCCESS);
    expect_f32("k = 0, beta = 0 over NaN", c3, zeros, 4);

    /* alpha == 0: C = beta C */
    const float half = 0.5f;
    const float want_a0[4] = {0.5f, 1, 1.5f, 2};
    float *c4 = dev_f32(c_old, 4);
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &ZERO, a, 2, b, 3, &half, c4, 2),
        CUBLAS_STATUS_SUCCESS);
    expect_f32("alpha = 0: 0.5 C", c4, want_a0, 4);

    /* GemmEx, k == 0 with a bf16 C: 0.5 * {1, 2, 3, 4} */
    const uint16_t cb_old[4] = {0x3f80, 0x4000, 0x4040, 0x4080};
    const uint16_t want_b[4] = {0x3f00, 0x3f80, 0x3fc0, 0x4000};
    uint16_t *cb = dev_u16(cb_old, 4);
    ck_assert_int_eq(cublasGemmEx(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 0, &ONE, nullptr,
                                  CUDA_R_16BF, 2, nullptr, CUDA_R_16BF, 1, &half, cb, CUDA_R_16BF,
                                  2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                     CUBLAS_STATUS_SUCCESS);
    expect_u16("GemmEx k = 0: 0.5 C in bf16", cb, want_b, 4);
}
END_TEST

/* ---- streams ------------------------------------------------------------------------ */

/* The GEMM runs after the copies queued before it on the handle's stream and before those
 * queued after, and alpha and beta are read at the call (changing them afterwards changes
 * nothing). Telling only where the stream runs later than the calls (CUDAEMU_ASYNC=1, with
 * slow copies): test_cublas_stream_order_with_async_streams runs it so in a child. */
START_TEST(test_cublas_runs_in_stream_order_and_reads_scalars_at_the_call)
{
    cudaStream_t s = nullptr;
    ck_assert_int_eq(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
    ck_assert_int_eq(cublasSetStream(g_h, s), CUBLAS_STATUS_SUCCESS);
    float *a = (float *)dev_alloc(6 * sizeof(float));
    float *b = (float *)dev_alloc(12 * sizeof(float));
    float *c = (float *)dev_alloc(8 * sizeof(float));
    static const float c_old[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    ck_assert_int_eq(cudaMemcpyAsync(a, A_NN, sizeof A_NN, cudaMemcpyHostToDevice, s), cudaSuccess);
    ck_assert_int_eq(cudaMemcpyAsync(b, B_NN, sizeof B_NN, cudaMemcpyHostToDevice, s), cudaSuccess);
    ck_assert_int_eq(cudaMemcpyAsync(c, c_old, sizeof c_old, cudaMemcpyHostToDevice, s),
                     cudaSuccess);
    float alpha = 2.0f, beta = 3.0f;
    ck_assert_int_eq(
        cublasSgemm(g_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 4, 3, &alpha, a, 2, b, 3, &beta, c, 2),
        CUBLAS_STATUS_SUCCESS);
    alpha = 100.0f;
    beta = 100.0f;
    float got[8];
    ck_assert_int_eq(cudaMemcpyAsync(got, c, sizeof got, cudaMemcpyDeviceToHost, s), cudaSuccess);
    ck_assert_int_eq(cudaStreamSynchronize(s), cudaSuccess);
    const float want[8] = {47, 62, 107, 140, 167, 218, 39, 44};
    tu_assert_close("2 A B + 3 C in stream order", got, want, 8, 0.0, 0.0);
    ck_assert_int_eq(cublasSetStream(g_h, 0), CUBLAS_STATUS_SUCCESS);
    ck_assert_int_eq(cudaStreamDestroy(s), cudaSuccess);
}
END_TEST

/* ---- child processes ------------------------------------------------------------- */

/* The emulator reads its configuration once per process, so the cases that need another
 * one run this program again. */
#define NO_DEVICE_ARG "--cublas-create-without-device"

/* Runs this program with argument arg (or none) and the environment changed by set (NAME=value
 * entries, NULL-terminated); returns its exit status, or -1 when it did not exit. */
static int run_self(const char *arg, const char *const *set)
{
    char *envp[512];
    int n = 0;
    for (char **e = environ; *e && n < 480; e++) {
        int replaced = 0;
        for (const char *const *v = set; *v; v++) {
            size_t name_len = strchr(*v, '=') - *v + 1;
            replaced |= strncmp(*e, *v, name_len) == 0;
        }
        if (!replaced)
            envp[n++] = *e;
    }
    for (const char *const *v = set; *v && n < 510; v++)
        envp[n++] = (char *)*v;
    envp[n] = nullptr;
    char self[] = "/proc/self/exe";
    char *argv[] = {self, (char *)arg, nullptr};
    pid_t pid;
    ck_assert_int_eq(posix_spawn(&pid, self, nullptr, nullptr, argv, envp), 0);
    int status = 0;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

START_TEST(test_cublas_stream_order_with_async_streams)
{
    const char *const set[] = {"CUDAEMU_ASYNC=1", "CUDAEMU_COPY_DELAY_US=2000",
                               "CK_RUN_SUITE=cudaemu_blas", "CK_RUN_CASE=stream", nullptr};
    ck_assert_msg(run_self(nullptr, set) == 0,
                  "the stream case failed with CUDAEMU_ASYNC=1 (its output is above)");
}
END_TEST

/* With CUDAEMU_DEVICES=0, cublasCreate fails with NOT_INITIALIZED, as cuBLAS does on a
 * machine without a GPU (create_without_device, in the child). */
START_TEST(test_cublas_create_without_device)
{
    const char *const set[] = {"CUDAEMU_DEVICES=0", nullptr};
    ck_assert_msg(run_self(NO_DEVICE_ARG, set) == 0,
                  "cublasCreate without a device did not return NOT_INITIALIZED");
}
END_TEST

static int create_without_device(void)
{
    cublasHandle_t h = nullptr;
    cublasStatus_t st = cublasCreate(&h);
    if (st != CUBLAS_STATUS_NOT_INITIALIZED) {
        fprintf(stderr, "cublasCreate without a device: %s\n", cublasGetStatusName(st));
        return 1;
    }
    return 0;
}

static Suite *blas_suite(void)
{
    Suite *s = suite_create("cudaemu_blas");
    TCase *api = tcase_create("api");
    tcase_add_checked_fixture(api, setup, teardown);
    tcase_add_test(api, test_cublas_enum_values_are_nvidias);
    tcase_add_test(api, test_cublas_status_names_and_strings);
    tcase_add_test(api, test_cublas_handle_stream_and_bad_handles);
    tcase_add_test(api, test_cublas_math_mode_roundtrip);
    tcase_add_test(api, test_cublas_workspace_must_be_aligned_device_memory);
    tcase_add_test(api, test_cublas_workspace_freed_while_held_faults);
    suite_add_tcase(s, api);

    TCase *gemm = tcase_create("gemm");
    tcase_add_checked_fixture(gemm, setup, teardown);
    tcase_add_test(gemm, test_cublas_sgemm_nn_hand_computed);
    tcase_add_test(gemm, test_cublas_sgemm_tn_matmul_layout);
    tcase_add_test(gemm, test_cublas_sgemm_nt_hand_computed);
    tcase_add_test(gemm, test_cublas_sgemm_tt_hand_computed);
    tcase_add_test(gemm, test_cublas_sgemm_padding_is_neither_read_nor_written);
    tcase_add_test(gemm, test_cublas_sgemm_alpha_beta_scale);
    tcase_add_test(gemm, test_cublas_sgemm_beta_zero_does_not_read_c);
    tcase_add_test(gemm, test_cublas_gemmex_f32_hand_computed);
    tcase_add_test(gemm, test_cublas_gemmex_bf16_in_f32_out);
    tcase_add_test(gemm, test_cublas_gemmex_f16_in_f32_out);
    tcase_add_test(gemm, test_cublas_gemmex_bf16_in_bf16_out);
    tcase_add_test(gemm, test_cublas_gemmex_bf16_out_rounds_to_nearest_even);
    tcase_add_test(gemm, test_cublas_gemmex_f16_out_rounds_to_nearest_even);
    tcase_add_test(gemm, test_cublas_gemmex_f16_widens_subnormals_and_inf);
    tcase_add_test(gemm, test_cublas_quick_returns);
    suite_add_tcase(s, gemm);

    /* run again in a child with other settings (CK_RUN_CASE=stream): keep it free of the
     * child-spawning cases */
    TCase *stream = tcase_create("stream");
    tcase_add_checked_fixture(stream, setup, teardown);
    tcase_add_test(stream, test_cublas_runs_in_stream_order_and_reads_scalars_at_the_call);
    suite_add_tcase(s, stream);

    TCase *errors = tcase_create("errors");
    tcase_add_checked_fixture(errors, setup, teardown);
    tcase_add_test(errors, test_cublas_invalid_values_are_refused);
    tcase_add_test(errors, test_cublas_unsupported_types_are_refused);
    tcase_add_test(errors, test_cublas_matrix_outside_device_memory_faults);
    suite_add_tcase(s, errors);

    TCase *child = tcase_create("child");
    tcase_add_test(child, test_cublas_stream_order_with_async_streams);
    tcase_add_test(child, test_cublas_create_without_device);
    suite_add_tcase(s, child);
    return s;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], NO_DEVICE_ARG) == 0)
        return create_without_device();
    int n_devices = 0;
    if (cudaGetDeviceCount(&n_devices) != cudaSuccess || n_devices == 0) {
        printf("test_cudaemu_blas: skipped: no (emulated) CUDA device\n");
        return 77;
    }
    return tu_run_suite_nofork(blas_suite());
}
