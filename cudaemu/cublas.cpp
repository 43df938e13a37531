/*
 * cudaemu/cublas.cpp: the emulated cuBLAS (cublas_v2.h): handles, and single-precision GEMM
 * (cublasSgemm, cublasGemmEx) run on the CPU in the order of the handle's stream.
 *
 * Owns the handles (struct cublasContext) and the set of live ones, so that a destroyed or
 * made-up handle is refused with NOT_INITIALIZED instead of being read.
 *
 * What it follows from NVIDIA's documentation, because a caller's bug shows up there:
 * - the argument checks and their order: handle, then sizes, ops and leading dimensions
 *   (INVALID_VALUE), then the types and the algorithm (NOT_SUPPORTED);
 * - the BLAS quick returns: nothing when m or n is 0 or when op(A) op(B) is not needed and
 *   beta is 1; C = beta * C when k is 0 or alpha is 0 (A and B are then not read);
 * - beta == 0 means C is written, never read: fresh device memory holds NaN in the
 *   emulator, so a GEMM that scaled it by 0 would leave NaN, as a caller trusting it would
 *   not see on a GPU that happened to hold zeros;
 * - alpha and beta are read at the call, the GEMM itself runs later in stream order.
 * What a GPU would report as a fault, a matrix that is not inside device memory or a
 * workspace freed while the handle holds it, is checked before the GEMM is submitted: it
 * becomes the sticky cudaErrorIllegalAddress (the message names the matrix and its extent)
 * and the call returns EXECUTION_FAILED. What would crash the host, alpha or beta pointing
 * into device memory, is refused with INVALID_VALUE and a message instead.
 *
 * Arithmetic: inputs widened exactly to float32, products summed in float32 in order of k,
 * then alpha * sum + beta * C, rounded once to C's type (to nearest even). The half-precision
 * conversions are written here, not shared with ferry's kernels/dtype.c, so that the
 * emulator cannot agree with a bug in the code it checks.
 */
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
#include <new>
#include <unordered_set>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "emu_internal.h"

struct cublasContext {
    cudaStream_t stream;    /* where the handle's operations run (0: the default stream) */
    void *d_workspace;      /* borrowed (cublasSetWorkspace); NULL: none */
    size_t workspace_bytes; /* 0 when d_workspace is NULL */
    cublasMath_t math;
};

namespace {

/* ---- handles ------------------------------------------------------------------------ */

std::mutex &handles_mu()
{
    static std::mutex mu;
    return mu;
}

/* Handles created and not yet destroyed. Never freed: handles may be destroyed from static
 * destructors that run after this would be. */
std::unordered_set<cublasContext *> &live_handles()
{
    static auto *live = new std::unordered_set<cublasContext *>;
    return *live;
}

bool is_live(cublasHandle_t h)
{
    if (!h)
        return false;
    std::lock_guard<std::mutex> lock(handles_mu());
    return live_handles().count(h) != 0;
}

/* ---- half-precision conversions ----------------------------------------------------- */

/* The emulated platform's own conversions (cuda_fp16.h, cuda_bf16.h: exact widening, round to
 * nearest even with NaN kept NaN), which test_cudaemu checks over every half and bfloat16. */
float f16_to_f32(uint16_t h) { return __half2float(__ushort_as_half(h)); }
uint16_t f32_to_f16(float f) { return __half_as_ushort(__float2half_rn(f)); }
float bf16_to_f32(uint16_t b)
{
    __nv_bfloat16 h;
    h.x = b;
    return __bfloat162float(h);
}
uint16_t f32_to_bf16(float f) { return __float2bfloat16_rn(f).x; }

/* ---- matrices ------------------------------------------------------------------------ */

size_t elem_bytes(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

const char *type_name(cudaDataType_t t)
{
    switch (t) {
    case CUDA_R_32F: return "CUDA_R_32F";
    case CUDA_R_16F: return "CUDA_R_16F";
    case CUDA_R_16BF: return "CUDA_R_16BF";
    default: return "?";
    }
}

template <cudaDataType_t T> float load(const void *p, size_t i);

template <> float load<CUDA_R_32F>(const void *p, size_t i)
{
    float f;
    std::memcpy(&f, (const char *)p + i * 4, 4);
    return f;
}

template <> float load<CUDA_R_16F>(const void *p, size_t i)
{
    uint16_t h;
    std::memcpy(&h, (const char *)p + i * 2, 2);
    return f16_to_f32(h);
}

template <> float load<CUDA_R_16BF>(const void *p, size_t i)
{
    uint16_t h;
    std::memcpy(&h, (const char *)p + i * 2, 2);
    return bf16_to_f32(h);
}

float load_any(const void *p, cudaDataType_t t, size_t i)
{
    if (t == CUDA_R_16F)
        return load<CUDA_R_16F>(p, i);
    if (t == CUDA_R_16BF)
        return load<CUDA_R_16BF>(p, i);
    return load<CUDA_R_32F>(p, i);
}

void store(void *p, cudaDataType_t t, size_t i, float v)
{
    if (t == CUDA_R_32F) {
        std::memcpy((char *)p + i * 4, &v, 4);
        return;
    }
    uint16_t h = t == CUDA_R_16F ? f32_to_f16(v) : f32_to_bf16(v);
    std::memcpy((char *)p + i * 2, &h, 2);
}

/* One GEMM as submitted: everything by value, since it may run after the call returns and
 * after the handle is gone. */
struct gemm_op {
    bool trans_a, trans_b;
    int m, n, k;
    float alpha, beta;
    bool uses_ab; /* k > 0 and alpha != 0: op(A) op(B) is computed */
    const void *A;
    int lda;
    const void *B;
    int ldb;
    cudaDataType_t ab_type; /* A and B have one type */
    void *C;
    cudaDataType_t c_type;
    int ldc;
};

/* op(A) as an m x k row-major float matrix (row i holds op(A)(i, 0 .. k - 1)), or op(B)
 * transposed as an n x k one (row j holds op(B)(0 .. k - 1, j)): element (r, p) of op(X)
 * read from X as stored, X[r + p * ld] when X is not transposed for A (or is for B), else
 * X[p + r * ld]. Widening first makes every dot product below a contiguous walk. */
template <cudaDataType_t T>
void widen(std::vector<float> &out, const void *x, int n_rows, int k, int ld, bool rows_strided)
{
    out.resize((size_t)n_rows * (size_t)k);
    for (int r = 0; r < n_rows; r++)
        for (int p = 0; p < k; p++)
            out[(size_t)r * (size_t)k + (size_t)p] =
                load<T>(x, rows_strided ? (size_t)p + (size_t)r * (size_t)ld
                                        : (size_t)r + (size_t)p * (size_t)ld);
}

/* The dot products of row a with rows b[0 .. NB - 1], each of k floats. cuBLAS documents
 * no order of summation; this one keeps 8 partial sums per product (p mod 8), added up in a
 * fixed order at the end, so a call repeats bit for bit and g++ can use vector registers. */
template <int NB> void dots(const float *a, const float *const *b, int k, float *out)
{
    float acc[NB][8] = {};
    int p = 0;
    for (; p + 8 <= k; p += 8)
        for (int c = 0; c < NB; c++)
            for (int u = 0; u < 8; u++)
                acc[c][u] += a[p + u] * b[c][p + u];
    for (int c = 0; c < NB; c++) {
        float tail = 0.0f;
        for (int q = p; q < k; q++)
            tail += a[q] * b[c][q];
        out[c] = (((acc[c][0] + acc[c][1]) + (acc[c][2] + acc[c][3])) +
                  ((acc[c][4] + acc[c][5]) + (acc[c][6] + acc[c][7]))) +
                 tail;
    }
}

/* Element (i, j) of C from its sum: alpha * sum + beta * C (C not read when beta is 0). */
void finish(const gemm_op &g, int i, int j, float sum)
{
    size_t at = (size_t)i + (size_t)j * (size_t)g.ldc;
    float r = 0.0f;
    if (g.uses_ab)
        r = g.alpha * sum;
    if (g.beta != 0.0f)
        r = g.uses_ab ? r + g.beta * load_any(g.C, g.c_type, at)
                      : g.beta * load_any(g.C, g.c_type, at);
    store(g.C, g.c_type, at, r);
}

/* Columns j0 .. j1 - 1 of C, four at a time so each row of op(A) is read once per four. */
void gemm_columns(const gemm_op &g, const float *a, const float *b, int j0, int j1)
{
    const size_t k = (size_t)g.k;
    int j = j0;
    for (; j + 4 <= j1; j += 4) {
        const float *bs[4] = {b + (size_t)j * k, b + (size_t)(j + 1) * k,
                              b + (size_t)(j + 2) * k, b + (size_t)(j + 3) * k};
        for (int i = 0; i < g.m; i++) {
            float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (g.uses_ab)
                dots<4>(a + (size_t)i * k, bs, g.k, s);
            for (int c = 0; c < 4; c++)
                finish(g, i, j + c, s[c]);
        }
    }
    for (; j < j1; j++) {
        const float *bs[1] = {b + (size_t)j * k};
        for (int i = 0; i < g.m; i++) {
            float s = 0.0f;
            if (g.uses_ab)
                dots<1>(a + (size_t)i * k, bs, g.k, &s);
            finish(g, i, j, s);
        }
    }
}

template <cudaDataType_t T> void run_gemm(const gemm_op &g)
{
    std::vector<float> a, b;
    if (g.uses_ab) {
        widen<T>(a, g.A, g.m, g.k, g.lda, g.trans_a);
        widen<T>(b, g.B, g.n, g.k, g.ldb, !g.trans_b);
    }
    /* columns shared out among the emulator's threads when the product is large */
    unsigned n_threads = cudaemu::cfg().n_workers;
    double work = (double)g.m * (double)g.n * (double)(g.k ? g.k : 1);
    if (n_threads > (unsigned)g.n)
        n_threads = (unsigned)g.n;
    if (work < 1e6 || n_threads < 2) {
        gemm_columns(g, a.data(), b.data(), 0, g.n);
        return;
    }
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < n_threads; t++) {
        int j0 = (int)((int64_t)g.n * t / n_threads);
        int j1 = (int)((int64_t)g.n * (t + 1) / n_threads);
        threads.emplace_back(gemm_columns, std::cref(g), a.data(), b.data(), j0, j1);
    }
    for (std::thread &t : threads)
        t.join();
}

void run(const gemm_op &g)
{
    if (g.ab_type == CUDA_R_16F)
        run_gemm<CUDA_R_16F>(g);
    else if (g.ab_type == CUDA_R_16BF)
        run_gemm<CUDA_R_16BF>(g);
    else
        run_gemm<CUDA_R_32F>(g);
}

/* A matrix of rows x cols (as stored) with leading dimension ld spans (cols - 1) * ld + rows
 * elements from p. false, with the sticky fault recorded, when they are not all inside one
 * device allocation. */
bool inside_device(const char *fn, const char *name, const void *p, cudaDataType_t t, int rows,
                   int cols, int ld)
{
    size_t n_elems = (size_t)(cols - 1) * (size_t)ld + (size_t)rows;
    size_t n_bytes = n_elems * elem_bytes(t);
    if (cudaemu::device_range(p, n_bytes))
        return true;
    cudaemu::fault(cudaErrorIllegalAddress,
                   "%s: %s (%d x %d %s, leading dimension %d: %zu elements, %zu bytes from %p) "
                   "is not inside device memory",
                   fn, name, rows, cols, type_name(t), ld, n_elems, n_bytes, p);
    return false;
}

bool valid_op(cublasOperation_t op)
{
    return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C;
}

int max1(int v) { return v > 1 ? v : 1; }

/* The emulated combinations (cublas_v2.h, cublasGemmEx). */
bool supported_types(cudaDataType_t at, cudaDataType_t bt, cudaDataType_t ct,
                     cublasComputeType_t compute)
{
    if (at != bt)
        return false;
    switch (compute) {
    case CUBLAS_COMPUTE_32F:
    case CUBLAS_COMPUTE_32F_PEDANTIC:
        if (at == CUDA_R_32F)
            return ct == CUDA_R_32F;
        if (at == CUDA_R_16F)
            return ct == CUDA_R_16F || ct == CUDA_R_32F;
        if (at == CUDA_R_16BF)
            return ct == CUDA_R_16BF || ct == CUDA_R_32F;
        return false;
    case CUBLAS_COMPUTE_32F_FAST_16F:
    case CUBLAS_COMPUTE_32F_FAST_16BF:
    case CUBLAS_COMPUTE_32F_FAST_TF32: return at == CUDA_R_32F && ct == CUDA_R_32F;
    default: return false;
    }
}

bool known_algo(cublasGemmAlgo_t algo)
{
    return (algo >= CUBLAS_GEMM_DEFAULT && algo <= CUBLAS_GEMM_ALGO23) ||
           (algo >= CUBLAS_GEMM_DEFAULT_TENSOR_OP && algo <= CUBLAS_GEMM_ALGO15_TENSOR_OP);
}

/* A scalar in host pointer mode is read by the host: a device pointer there would crash a
 * real program, which the emulator (whose device memory the host can read) would not. */
bool host_scalar(const char *fn, const char *name, const float *p)
{
    if (!p)
        return false;
    if (cudaemu::device_range(p, sizeof *p)) {
        std::fprintf(stderr,
                     "cudaemu: %s: %s (%p) points into device memory, but the pointer mode is "
                     "host: the host would read it and crash\n",
                     fn, name, (const void *)p);
        return false;
    }
    return true;
}

/* Sgemm and GemmEx after their argument checks: reads alpha and beta, takes the quick
 * returns, checks that the matrices (and the workspace) are device memory and submits the
 * GEMM to the handle's stream. */
cublasStatus_t gemm(const char *fn, cublasHandle_t h, cublasOperation_t transa,
                    cublasOperation_t transb, int m, int n, int k, const float *alpha,
                    const void *A, int lda, const void *B, int ldb, cudaDataType_t ab_type,
                    const float *beta, void *C, cudaDataType_t c_type, int ldc)
{
    bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
    if (!host_scalar(fn, "alpha", alpha) || !host_scalar(fn, "beta", beta))
        return CUBLAS_STATUS_INVALID_VALUE;
    gemm_op g = {};
    g.trans_a = ta;
    g.trans_b = tb;
    g.m = m;
    g.n = n;
    g.k = k;
    g.alpha = *alpha;
    g.beta = *beta;
    g.uses_ab = k > 0 && g.alpha != 0.0f;
    g.A = A;
    g.lda = lda;
    g.B = B;
    g.ldb = ldb;
    g.ab_type = ab_type;
    g.C = C;
    g.c_type = c_type;
    g.ldc = ldc;
    if (m == 0 || n == 0 || (!g.uses_ab && g.beta == 1.0f))
        return CUBLAS_STATUS_SUCCESS;

    if (cudaemu::sticky_error() != cudaSuccess)
        return CUBLAS_STATUS_EXECUTION_FAILED;
    /* a workspace freed while the handle still holds it is memory cuBLAS may write */
    if (h->d_workspace && !cudaemu::device_range(h->d_workspace, h->workspace_bytes)) {
        cudaemu::fault(cudaErrorIllegalAddress,
                       "%s: the handle's workspace (%zu bytes from %p) is no longer device "
                       "memory",
                       fn, h->workspace_bytes, h->d_workspace);
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    if (g.uses_ab) {
        if (!inside_device(fn, "A", A, ab_type, ta ? k : m, ta ? m : k, lda) ||
            !inside_device(fn, "B", B, ab_type, tb ? n : k, tb ? k : n, ldb))
            return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    if (!inside_device(fn, "C", C, c_type, m, n, ldc))
        return CUBLAS_STATUS_EXECUTION_FAILED;

    if (cudaemu::submit(h->stream, [g]() { run(g); }) != cudaSuccess)
        return CUBLAS_STATUS_EXECUTION_FAILED;
    return CUBLAS_STATUS_SUCCESS;
}

/* The documented INVALID_VALUE cases of every GEMM. */
bool valid_shape(cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k, int lda,
                 int ldb, int ldc)
{
    if (m < 0 || n < 0 || k < 0 || !valid_op(transa) || !valid_op(transb))
        return false;
    if (lda < max1(transa == CUBLAS_OP_N ? m : k))
        return false;
    if (ldb < max1(transb == CUBLAS_OP_N ? k : n))
        return false;
    return ldc >= max1(m);
}

} // namespace

/* ---- the API ------------------------------------------------------------------------ */

cublasStatus_t cublasCreate(cublasHandle_t *handle)
{
    if (!handle)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (cudaemu::cfg().n_devices == 0)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    cublasContext *h = new (std::nothrow) cublasContext();
    if (!h)
        return CUBLAS_STATUS_ALLOC_FAILED;
    h->stream = 0;
    h->d_workspace = nullptr;
    h->workspace_bytes = 0;
    h->math = CUBLAS_DEFAULT_MATH;
    try {
        std::lock_guard<std::mutex> lock(handles_mu());
        live_handles().insert(h);
    } catch (const std::bad_alloc &) {
        delete h;
        return CUBLAS_STATUS_ALLOC_FAILED;
    }
    *handle = h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle)
{
    {
        std::lock_guard<std::mutex> lock(handles_mu());
        if (!handle || live_handles().erase(handle) == 0)
            return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    /* cuBLAS documents that releasing a handle synchronizes the device; its status (a
     * sticky error, say) is not cuBLAS's to report */
    cudaDeviceSynchronize();
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t s)
{
    if (!is_live(handle))
        return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->stream = s;
    handle->d_workspace = nullptr;
    handle->workspace_bytes = 0;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream(cublasHandle_t handle, cudaStream_t *s)
{
    if (!is_live(handle))
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!s)
        return CUBLAS_STATUS_INVALID_VALUE;
    *s = handle->stream;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void *workspace, size_t workspace_bytes)
{
    if (!is_live(handle))
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if (workspace_bytes == 0) {
        handle->d_workspace = nullptr;
        handle->workspace_bytes = 0;
        return CUBLAS_STATUS_SUCCESS;
    }
    if ((uintptr_t)workspace % 256 != 0 || !cudaemu::device_range(workspace, workspace_bytes))
        return CUBLAS_STATUS_INVALID_VALUE;
    handle->d_workspace = workspace;
    handle->workspace_bytes = workspace_bytes;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode)
{
    if (!is_live(handle))
        return CUBLAS_STATUS_NOT_INITIALIZED;
    unsigned base = (unsigned)mode & ~(unsigned)CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION;
    if (base > CUBLAS_TF32_TENSOR_OP_MATH)
        return CUBLAS_STATUS_INVALID_VALUE;
    handle->math = mode;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t *mode)
{
    if (!is_live(handle))
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!mode)
        return CUBLAS_STATUS_INVALID_VALUE;
    *mode = handle->math;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSgemm(cublasHandle_t handle, cublasOperation_t transa,
                           cublasOperation_t transb, int m, int n, int k, const float *alpha,
                           const float *A, int lda, const float *B, int ldb, const float *beta,
                           float *C, int ldc)
{
    if (!is_live(handle))
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!valid_shape(transa, transb, m, n, k, lda, ldb, ldc))
        return CUBLAS_STATUS_INVALID_VALUE;
    return gemm("cublasSgemm", handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, CUDA_R_32F,
                beta, C, CUDA_R_32F, ldc);
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void *alpha,
                            const void *A, cudaDataType_t Atype, int lda, const void *B,
                            cudaDataType_t Btype, int ldb, const void *beta, void *C,
                            cudaDataType_t Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t algo)
{
    if (!is_live(handle))
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!valid_shape(transa, transb, m, n, k, lda, ldb, ldc))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (!supported_types(Atype, Btype, Ctype, computeType) || !known_algo(algo))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    /* every emulated compute type is a 32F one, whose scale type is float */
    return gemm("cublasGemmEx", handle, transa, transb, m, n, k, (const float *)alpha, A, lda, B,
                ldb, Atype, (const float *)beta, C, Ctype, ldc);
}

const char *cublasGetStatusString(cublasStatus_t status)
{
    switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "the operation completed successfully";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "an absent device architectural feature is required";
    case CUBLAS_STATUS_MAPPING_ERROR: return "an access to GPU memory space failed";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    case CUBLAS_STATUS_LICENSE_ERROR: return "the functionality requested requires some license";
    }
    return "unknown error";
}

const char *cublasGetStatusName(cublasStatus_t status)
{
    switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}
