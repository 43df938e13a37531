/*
 * kernels/cuda/backend_cuda.cu: the CUDA backend's table: device memory (with or without a
 * budget), pinned host ranges, synchronous uploads and downloads, the copy engine, and the
 * creation and probing of the device. The ops live in ops_cuda.cu and matmul_cuda.cu.
 *
 * The copy engine: copy_async puts each copy on the copy stream behind an event recorded on
 * the compute stream at that moment, so a copy never overwrites memory that an op queued
 * before it still reads (an expert slot being refilled after its last use). Each copy
 * records an event of a ring; tickets count copies, and because one stream carries them
 * all, copies land in ticket order: a landed ticket means every earlier one has landed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/cuda/cuda_common.h"

ferry_status ferry_cuda_status(cudaError_t e, const char *what, const char *file, int line)
{
    ferry_status code = e == cudaErrorMemoryAllocation ? FERRY_ERR_NOMEM : FERRY_ERR_DEVICE;
    return ferry_fail(code, "%s:%d: %s: %s (%s)", file, line, what, cudaGetErrorString(e),
                      cudaGetErrorName(e));
}

ferry_status ferry_cublas_status(cublasStatus_t e, const char *what, const char *file, int line)
{
    ferry_status code = e == CUBLAS_STATUS_ALLOC_FAILED ? FERRY_ERR_NOMEM : FERRY_ERR_DEVICE;
    return ferry_fail(code, "%s:%d: %s: %s", file, line, what, cublasGetStatusString(e));
}

/* ---- memory ------------------------------------------------------------------- */

static ferry_status cuda_alloc(ferry_backend *b, size_t n_bytes, void **d_out)
{
    cuda_impl *impl = cuda_of(b);
    ferry_status st = FERRY_OK;
    cudaSetDevice(impl->device);
    pthread_mutex_lock(&impl->mem_mu);
    if (impl->arena) {
        st = ferry_arena_alloc(impl->arena, n_bytes, d_out);
        pthread_mutex_unlock(&impl->mem_mu);
        return st;
    }
    if (impl->n_blocks == impl->cap_blocks) {
        size_t cap = impl->cap_blocks ? 2 * impl->cap_blocks : 64;
        cuda_block *grown = (cuda_block *)realloc(impl->blocks, cap * sizeof *grown);
        if (!grown) {
            pthread_mutex_unlock(&impl->mem_mu);
            return ferry_fail(FERRY_ERR_NOMEM, "out of host memory tracking device blocks");
        }
        impl->blocks = grown;
        impl->cap_blocks = cap;
    }
    void *d = NULL;
    cudaError_t e = cudaMalloc(&d, n_bytes ? n_bytes : 1);
    if (e != cudaSuccess) {
        pthread_mutex_unlock(&impl->mem_mu);
        size_t free_bytes = 0, total = 0;
        cudaMemGetInfo(&free_bytes, &total);
        cudaGetLastError(); /* an allocation failure is not sticky; clear it */
        return ferry_fail(FERRY_ERR_NOMEM,
                          "cannot allocate %zu bytes of GPU memory (%s; %.1f of %.1f MiB free, "
                          "%.1f MiB allocated by ferry); set a budget with --gpu-mem to offload "
                          "experts",
                          n_bytes, cudaGetErrorString(e), (double)free_bytes / 1048576.0,
                          (double)total / 1048576.0, (double)impl->used / 1048576.0);
    }
    impl->blocks[impl->n_blocks++] = (cuda_block){d, n_bytes};
    impl->used += n_bytes;
    pthread_mutex_unlock(&impl->mem_mu);
    *d_out = d;
    return st;
}

static void cuda_free(ferry_backend *b, void *d)
{
    cuda_impl *impl = cuda_of(b);
    if (!d)
        return;
    cudaSetDevice(impl->device);
    pthread_mutex_lock(&impl->mem_mu);
    /* the ops and copies queued before this free may still use the block, and the arena
     * hands it out again at once (cudaFree's own synchronisation is not documented) */
    cudaStreamSynchronize(impl->compute);
    cudaStreamSynchronize(impl->copy);
    if (impl->arena) {
        ferry_arena_free(impl->arena, d);
    } else {
        for (size_t i = 0; i < impl->n_blocks; i++)
            if (impl->blocks[i].d == d) {
                impl->used -= impl->blocks[i].n_bytes;
                impl->blocks[i] = impl->blocks[--impl->n_blocks];
                cudaFree(d);
                break;
            }
    }
    pthread_mutex_unlock(&impl->mem_mu);
    cudaGetLastError(); /* a free reports nothing; leave no error for the next launch */
}

static size_t cuda_mem_capacity(ferry_backend *b)
{
    cuda_impl *impl = cuda_of(b);
    return impl->arena ? ferry_arena_capacity(impl->arena) : 0;
}

static size_t cuda_mem_used(ferry_backend *b)
{
    cuda_impl *impl = cuda_of(b);
    pthread_mutex_lock(&impl->mem_mu);
    size_t used = impl->arena ? ferry_arena_used(impl->arena) : impl->used;
    pthread_mutex_unlock(&impl->mem_mu);
    return used;
}

static ferry_status cuda_host_register(ferry_backend *b, void *h, size_t n_bytes)
{
    if (!h || !n_bytes)
        return FERRY_OK;
    cudaSetDevice(cuda_of(b)->device);
    cudaError_t e = cudaHostRegister(h, n_bytes, cudaHostRegisterDefault);
    if (e == cudaErrorHostMemoryAlreadyRegistered) {
        cudaGetLastError();
        return FERRY_OK;
    }
    if (e != cudaSuccess) {
        cudaGetLastError();
        return ferry_fail(FERRY_ERR_DEVICE, "cannot pin %zu bytes of host memory: %s", n_bytes,
                          cudaGetErrorString(e));
    }
    return FERRY_OK;
}

static void cuda_host_unregister(ferry_backend *b, void *h)
{
    cudaSetDevice(cuda_of(b)->device);
    if (h && cudaHostUnregister(h) != cudaSuccess)
        cudaGetLastError(); /* not registered: nothing to undo */
}

/* ---- synchronous transfers ------------------------------------------------------ */

static ferry_status check_copy(const void *dst, const void *src, size_t n_bytes)
{
    if (n_bytes && (!dst || !src))
        return ferry_fail(FERRY_ERR_INVALID, "copy of %zu bytes with a NULL pointer", n_bytes);
    return FERRY_OK;
}

static ferry_status cuda_upload(ferry_backend *b, void *d_dst, const void *h_src, size_t n_bytes)
{
    cuda_impl *impl = cuda_of(b);
    cudaSetDevice(impl->device);
    TRY(check_copy(d_dst, h_src, n_bytes));
    if (!n_bytes)
        return FERRY_OK;
    CUDA_TRY(cudaMemcpyAsync(d_dst, h_src, n_bytes, cudaMemcpyHostToDevice, impl->compute));
    CUDA_TRY(cudaStreamSynchronize(impl->compute)); /* h_src may be reused on return */
    return FERRY_OK;
}

static ferry_status cuda_download(ferry_backend *b, void *h_dst, const void *d_src, size_t n_bytes)
{
    cuda_impl *impl = cuda_of(b);
    cudaSetDevice(impl->device);
    TRY(check_copy(h_dst, d_src, n_bytes));
    if (!n_bytes)
        return FERRY_OK;
    CUDA_TRY(cudaMemcpyAsync(h_dst, d_src, n_bytes, cudaMemcpyDeviceToHost, impl->compute));
    CUDA_TRY(cudaStreamSynchronize(impl->compute));
    return FERRY_OK;
}

static ferry_status cuda_copy_device(ferry_backend *b, void *d_dst, const void *d_src,
                                     size_t n_bytes)
{
    cuda_impl *impl = cuda_of(b);
    cudaSetDevice(impl->device);
    TRY(check_copy(d_dst, d_src, n_bytes));
    const char *dst = (const char *)d_dst, *src = (const char *)d_src;
    if (n_bytes && dst < src + n_bytes && src < dst + n_bytes && dst != src)
        return ferry_fail(FERRY_ERR_INVALID, "copy_device: overlapping ranges of %zu bytes",
                          n_bytes);
    if (!n_bytes)
        return FERRY_OK;
    CUDA_TRY(cudaMemcpyAsync(d_dst, d_src, n_bytes, cudaMemcpyDeviceToDevice, impl->compute));
    return FERRY_OK;
}

static ferry_status cuda_synchronize(ferry_backend *b)
{
    CUDA_TRY(cudaStreamSynchronize(compute_stream(b)));
    return FERRY_OK;
}

/* ---- the copy engine ------------------------------------------------------------- */

/* With copy_mu held: learns how far copies have landed, without blocking. */
static void poll_landed(cuda_impl *impl)
{
    while (impl->landed < impl->submitted) {
        cudaError_t e = cudaEventQuery(impl->ring[(impl->landed + 1) % FERRY_CUDA_COPY_RING]);
        if (e != cudaSuccess) {
            if (e == cudaErrorNotReady)
                cudaGetLastError();
            break;
        }
        impl->landed++;
    }
}

static ferry_status cuda_copy_async(ferry_backend *b, void *d_dst, const void *h_src,
                                    size_t n_bytes, uint64_t *ticket)
{
    cuda_impl *impl = cuda_of(b);
    TRY(check_copy(d_dst, h_src, n_bytes));
    ferry_status st = FERRY_OK;
    cudaSetDevice(impl->device); /* copy_async is called from the prefetch worker too */
    pthread_mutex_lock(&impl->copy_mu);
    if (impl->submitted - impl->landed >= FERRY_CUDA_COPY_RING) {
        /* the ring is full: the oldest copy's event is about to be reused */
        cudaError_t e =
            cudaEventSynchronize(impl->ring[(impl->landed + 1) % FERRY_CUDA_COPY_RING]);
        if (e != cudaSuccess) {
            st = ferry_cuda_status(e, "cudaEventSynchronize", __FILE__, __LINE__);
            goto done;
        }
        impl->landed++;
    }
    {
        cudaEvent_t ev = impl->ring[(impl->submitted + 1) % FERRY_CUDA_COPY_RING];
        cudaError_t e = cudaEventRecord(impl->ops_mark, impl->compute);
        if (e == cudaSuccess)
            e = cudaStreamWaitEvent(impl->copy, impl->ops_mark, 0);
        if (e == cudaSuccess && n_bytes)
            e = cudaMemcpyAsync(d_dst, h_src, n_bytes, cudaMemcpyHostToDevice, impl->copy);
        if (e == cudaSuccess)
            e = cudaEventRecord(ev, impl->copy);
        if (e != cudaSuccess) {
            st = ferry_cuda_status(e, "copy_async", __FILE__, __LINE__);
            goto done;
        }
        *ticket = ++impl->submitted;
    }
done:
    pthread_mutex_unlock(&impl->copy_mu);
    return st;
}

static ferry_status cuda_copy_wait(ferry_backend *b, uint64_t ticket)
{
    cuda_impl *impl = cuda_of(b);
    cudaSetDevice(impl->device);
    pthread_mutex_lock(&impl->copy_mu);
    if (ticket > impl->submitted) {
        pthread_mutex_unlock(&impl->copy_mu);
        return ferry_fail(FERRY_ERR_INVALID, "copy ticket %llu was never issued",
                          (unsigned long long)ticket);
    }
    if (ticket <= impl->landed) {
        pthread_mutex_unlock(&impl->copy_mu);
        return FERRY_OK;
    }
    /* the event cannot be re-recorded before ticket is known to have landed, and waiting
     * on a re-recorded one would only wait for a later copy */
    cudaEvent_t ev = impl->ring[ticket % FERRY_CUDA_COPY_RING];
    pthread_mutex_unlock(&impl->copy_mu);
    CUDA_TRY(cudaEventSynchronize(ev));
    pthread_mutex_lock(&impl->copy_mu);
    if (impl->landed < ticket)
        impl->landed = ticket;
    pthread_mutex_unlock(&impl->copy_mu);
    return FERRY_OK;
}

static int cuda_copy_done(ferry_backend *b, uint64_t ticket)
{
    cuda_impl *impl = cuda_of(b);
    cudaSetDevice(impl->device);
    pthread_mutex_lock(&impl->copy_mu);
    poll_landed(impl);
    int done = ticket <= impl->landed;
    pthread_mutex_unlock(&impl->copy_mu);
    return done;
}

/* ---- creation ---------------------------------------------------------------------- */

static void cuda_destroy(ferry_backend *b)
{
    if (!b)
        return;
    cuda_impl *impl = cuda_of(b);
    if (impl && impl->compute) { /* else init failed before touching the device */
        cudaSetDevice(impl->device);
        if (impl->compute)
            cudaStreamSynchronize(impl->compute);
        if (impl->copy)
            cudaStreamSynchronize(impl->copy);
        if (impl->blas)
            cublasDestroy(impl->blas);
        for (size_t i = 0; i < impl->n_blocks; i++)
            cudaFree(impl->blocks[i].d);
        free(impl->blocks);
        ferry_arena_destroy(impl->arena);
        cudaFree(impl->d_region);
        cudaFree(impl->d_blas_ws);
        cudaFree(impl->d_act);
        for (int i = 0; i < FERRY_CUDA_COPY_RING; i++)
            if (impl->ring[i])
                cudaEventDestroy(impl->ring[i]);
        if (impl->ops_mark)
            cudaEventDestroy(impl->ops_mark);
        if (impl->compute)
            cudaStreamDestroy(impl->compute);
        if (impl->copy)
            cudaStreamDestroy(impl->copy);
        cudaGetLastError();
    }
    if (impl) {
        pthread_mutex_destroy(&impl->mem_mu);
        pthread_mutex_destroy(&impl->copy_mu);
    }
    free(impl);
    free(b);
}

static const ferry_backend_ops cuda_ops = {
    .name = "cuda",
    .destroy = cuda_destroy,
    .alloc = cuda_alloc,
    .free = cuda_free,
    .upload = cuda_upload,
    .download = cuda_download,
    .synchronize = cuda_synchronize,
    .mem_capacity = cuda_mem_capacity,
    .mem_used = cuda_mem_used,
    .copy_async = cuda_copy_async,
    .copy_wait = cuda_copy_wait,
    .copy_done = cuda_copy_done,
    .host_register = cuda_host_register,
    .host_unregister = cuda_host_unregister,
    .copy_device = cuda_copy_device,
    .embedding = ferry_cuda_embedding,
    .rmsnorm = ferry_cuda_rmsnorm,
    .matmul = ferry_cuda_matmul,
    .rope = ferry_cuda_rope,
    .attention = ferry_cuda_attention,
    .silu_mul = ferry_cuda_silu_mul,
    .add = ferry_cuda_add,
    .router_topk = ferry_cuda_router_topk,
    .add_bias = ferry_cuda_add_bias,
    .clamp = ferry_cuda_clamp,
    .gate_rows = ferry_cuda_gate_rows,
    .gather_rows = ferry_cuda_gather_rows,
    .scatter_rows = ferry_cuda_scatter_rows,
    .combine = ferry_cuda_combine,
};

/* Device 0, if there is one this build can run on; its description into desc. */
static ferry_status probe(char *desc, size_t desc_len)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess)
        cudaGetLastError();
    /* Without a driver the runtime says "driver version is insufficient", which sends people
     * looking for a driver update on a machine that has no GPU at all. */
    int have_driver = access("/proc/driver/nvidia/version", F_OK) == 0;
    if ((e == cudaErrorInsufficientDriver && !have_driver) || e == cudaErrorNoDevice ||
        (e == cudaSuccess && n <= 0)) {
        const char *vis = getenv("CUDA_VISIBLE_DEVICES");
        return ferry_fail(FERRY_ERR_DEVICE, "no NVIDIA driver / no GPU found for the CUDA "
                          "backend (%s%s%s)",
                          have_driver ? "the driver sees no device" : "no NVIDIA driver is loaded",
                          have_driver && vis ? "; CUDA_VISIBLE_DEVICES=" : "",
                          have_driver && vis ? vis : "");
    }
    if (e != cudaSuccess)
        return ferry_fail(FERRY_ERR_DEVICE, "no usable CUDA device: %s", cudaGetErrorString(e));
    cudaDeviceProp prop;
    CUDA_TRY(cudaGetDeviceProperties(&prop, 0));
    if (prop.major < 8)
        return ferry_fail(FERRY_ERR_DEVICE,
                          "CUDA device 0 (%s) has compute capability %d.%d; ferry needs 8.0 or "
                          "newer (Ampere, Ada, Hopper, Blackwell)",
                          prop.name, prop.major, prop.minor);
    if (desc && desc_len)
        snprintf(desc, desc_len, "%s, sm_%d%d, %.1f GiB", prop.name, prop.major, prop.minor,
                 (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    return FERRY_OK;
}

extern "C" ferry_status ferry_backend_cuda_probe(char *desc, size_t desc_len)
{
    return probe(desc, desc_len);
}

/* The steps of creation that can fail, on a zeroed impl; cuda_destroy undoes any prefix. */
static ferry_status init(cuda_impl *impl, size_t device_bytes)
{
    TRY(probe(impl->desc, sizeof impl->desc));
    impl->device = 0;
    CUDA_TRY(cudaSetDevice(impl->device));
    CUDA_TRY(cudaStreamCreateWithFlags(&impl->compute, cudaStreamNonBlocking));
    CUDA_TRY(cudaStreamCreateWithFlags(&impl->copy, cudaStreamNonBlocking));
    CUDA_TRY(cudaEventCreateWithFlags(&impl->ops_mark, cudaEventDisableTiming));
    /* the prefetch worker waits on these: block, do not spin a core the NVMe reader wants */
    for (int i = 0; i < FERRY_CUDA_COPY_RING; i++)
        CUDA_TRY(cudaEventCreateWithFlags(&impl->ring[i],
                                          cudaEventDisableTiming | cudaEventBlockingSync));
    CUBLAS_TRY(cublasCreate(&impl->blas));
    CUBLAS_TRY(cublasSetStream(impl->blas, impl->compute));
    /* a fixed workspace keeps cuBLAS from allocating on its own and its results repeatable */
    int major = 0;
    CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, impl->device));
    impl->blas_ws_bytes = major >= 9 ? FERRY_CUDA_BLAS_WORKSPACE_SM90 : FERRY_CUDA_BLAS_WORKSPACE;
    CUDA_TRY(cudaMalloc(&impl->d_blas_ws, impl->blas_ws_bytes));
    CUBLAS_TRY(cublasSetWorkspace(impl->blas, impl->d_blas_ws, impl->blas_ws_bytes));
    CUBLAS_TRY(cublasSetMathMode(impl->blas, CUBLAS_DEFAULT_MATH)); /* no TF32 for float32 */
    CUDA_TRY(cudaMalloc(&impl->d_act, FERRY_CUDA_ACT_SCRATCH));
    if (device_bytes > 0) {
        size_t rounded = (device_bytes + FERRY_ARENA_ALIGN - 1) / FERRY_ARENA_ALIGN *
                         FERRY_ARENA_ALIGN;
        if (rounded < device_bytes)
            return ferry_fail(FERRY_ERR_INVALID, "device budget of %zu bytes", device_bytes);
        cudaError_t e = cudaMalloc(&impl->d_region, rounded);
        if (e != cudaSuccess) {
            cudaGetLastError();
            size_t free_bytes = 0, total = 0;
            cudaMemGetInfo(&free_bytes, &total);
            return ferry_fail(FERRY_ERR_NOMEM,
                              "--gpu-mem %.1f MiB: the GPU has %.1f of %.1f MiB free (%s)",
                              (double)device_bytes / 1048576.0, (double)free_bytes / 1048576.0,
                              (double)total / 1048576.0, cudaGetErrorString(e));
        }
        TRY(ferry_arena_create(impl->d_region, device_bytes, &impl->arena));
    }
    return FERRY_OK;
}

extern "C" ferry_status ferry_backend_cuda_create(size_t device_bytes, ferry_backend **out)
{
    if (!out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_backend_cuda_create: NULL argument");
    ferry_backend *b = (ferry_backend *)calloc(1, sizeof *b);
    cuda_impl *impl = (cuda_impl *)calloc(1, sizeof *impl);
    if (!b || !impl) {
        free(b);
        free(impl);
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for the CUDA backend");
    }
    b->ops = &cuda_ops;
    b->impl = impl;
    b->map_host_weights = 0;
    pthread_mutex_init(&impl->mem_mu, NULL);
    pthread_mutex_init(&impl->copy_mu, NULL);
    ferry_status st = init(impl, device_bytes);
    if (st) {
        cuda_destroy(b);
        return st;
    }
    snprintf(b->device, sizeof b->device, "%s", impl->desc);
    *out = b;
    return FERRY_OK;
}
