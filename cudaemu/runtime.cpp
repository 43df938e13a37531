/*
 * cudaemu/runtime.cpp: the emulated CUDA runtime: one device of compute capability 9.0 whose
 * memory is host memory, streams, events, copies, errors. Configured from the environment
 * (CUDAEMU_*; README, "The emulated CUDA build").
 *
 * Device memory: each cudaMalloc is its own host allocation of exactly the size asked
 * (256-byte aligned, as cudaMalloc's are), so AddressSanitizer sees where it ends, filled
 * with 0xff bytes, which read as NaN in f32, f16 and bf16, so that reading memory nobody
 * wrote shows. Allocations are counted against CUDAEMU_MEM, which cudaMemGetInfo reports.
 * Copies check that their device side lies inside one allocation and their host side does
 * not, as the kind says.
 *
 * Streams: synchronous by default, each operation running when submitted. With
 * CUDAEMU_ASYNC=1 each stream has a worker thread running its operations in order, so the
 * host runs ahead of the device as with a GPU, and an ordering the code forgot (a missing
 * event wait, a buffer reused before its copy ran) reads stale data; CUDAEMU_COPY_DELAY_US
 * makes each copy slower, widening such windows. As on a GPU, a copy from pageable host
 * memory reads its source when submitted (the driver stages it) and a copy to pageable
 * memory returns when done, while copies to or from registered (pinned) memory run when the
 * stream reaches them. Streams are independent: the legacy default stream's implicit
 * synchronisation with other streams is not emulated.
 *
 * Errors: the calling thread's last error, and a sticky error set by a fault (emu_internal.h).
 */
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "cudaemu/emu_internal.h"

struct CUstream_st {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::function<void()>> ops;
    bool busy = false, stop = false;
    std::thread worker;
};

struct CUevent_st {
    std::mutex mu;
    std::condition_variable cv;
    uint64_t recorded = 0, completed = 0;
};

namespace cudaemu {
namespace {

[[noreturn]] void bad_env(const char *name, const char *value, const char *expects)
{
    fprintf(stderr, "cudaemu: %s=%s: expected %s\n", name, value, expects);
    abort();
}

unsigned long long env_number(const char *name, unsigned long long dflt, bool suffixes)
{
    const char *v = getenv(name);
    if (!v || !*v)
        return dflt;
    char *end = nullptr;
    errno = 0;
    unsigned long long n = strtoull(v, &end, 10);
    unsigned long long mult = 1;
    if (suffixes && *end) {
        switch (*end) {
        case 'K': mult = 1ull << 10; break;
        case 'M': mult = 1ull << 20; break;
        case 'G': mult = 1ull << 30; break;
        default: mult = 0;
        }
        end += mult != 0;
    }
    if (errno || end == v || *end || mult == 0 || v[0] == '-' || n > ~0ull / mult)
        bad_env(name, v, suffixes ? "a number of bytes, with an optional K, M or G"
                                  : "a non-negative number");
    return n * mult;
}

config read_config()
{
    config c;
    c.async = env_number("CUDAEMU_ASYNC", 0, false) != 0;
    c.copy_delay_us = (unsigned)env_number("CUDAEMU_COPY_DELAY_US", 0, false);
    const char *order = getenv("CUDAEMU_ORDER");
    c.reverse = false;
    if (order && *order) {
        if (!strcmp(order, "reverse"))
            c.reverse = true;
        else if (strcmp(order, "forward"))
            bad_env("CUDAEMU_ORDER", order, "forward or reverse");
    }
    c.mem_total = (size_t)env_number("CUDAEMU_MEM", 16ull << 30, true);
    c.n_devices = (int)env_number("CUDAEMU_DEVICES", 1, false);
    if (c.n_devices > 1)
        bad_env("CUDAEMU_DEVICES", getenv("CUDAEMU_DEVICES"), "0 or 1");
    unsigned hw = std::thread::hardware_concurrency();
    c.n_workers = (unsigned)env_number("CUDAEMU_THREADS", hw ? std::min(hw, 8u) : 2, false);
    if (c.n_workers == 0)
        bad_env("CUDAEMU_THREADS", getenv("CUDAEMU_THREADS"), "at least 1");
    return c;
}

/* ---- state ----------------------------------------------------------------------------- */

std::mutex mem_mu;
std::map<uintptr_t, size_t> allocations; /* start -> bytes */
std::map<uintptr_t, size_t> registered;  /* cudaHostRegister'd ranges */
size_t allocated_bytes = 0;

std::mutex streams_mu;
std::set<CUstream_st *> streams;
CUstream_st *default_stream; /* stream 0, created on first use */

std::atomic<int> sticky{cudaSuccess};
thread_local cudaError_t last_error = cudaSuccess;
int current_device = 0;

/* With mem_mu held: the allocation containing [p, p + n), or allocations.end(). */
std::map<uintptr_t, size_t>::const_iterator find_in(const std::map<uintptr_t, size_t> &m,
                                                    const void *p, size_t n)
{
    uintptr_t a = (uintptr_t)p;
    auto it = m.upper_bound(a);
    if (it == m.begin())
        return m.end();
    --it;
    if (a + n < a || a + n > it->first + it->second || (n == 0 && a >= it->first + it->second))
        return m.end();
    return it;
}

bool overlaps(const std::map<uintptr_t, size_t> &m, const void *p, size_t n)
{
    uintptr_t a = (uintptr_t)p;
    auto it = m.upper_bound(a + (n ? n - 1 : 0));
    if (it == m.begin())
        return false;
    --it;
    return it->first + it->second > a;
}

bool is_registered(const void *p, size_t n)
{
    std::lock_guard<std::mutex> lk(mem_mu);
    return find_in(registered, p, n) != registered.end();
}

void stream_loop(CUstream_st *s)
{
    std::unique_lock<std::mutex> lk(s->mu);
    for (;;) {
        s->cv.wait(lk, [s] { return s->stop || !s->ops.empty(); });
        if (s->ops.empty())
            return;
        std::function<void()> op = std::move(s->ops.front());
        s->ops.pop_front();
        s->busy = true;
        lk.unlock();
        op(); /* even after a fault: event records must still complete, or waiters hang */
        lk.lock();
        s->busy = false;
        s->cv.notify_all();
    }
}

CUstream_st *new_stream()
{
    CUstream_st *s = new CUstream_st();
    if (cfg().async)
        s->worker = std::thread(stream_loop, s);
    return s;
}

CUstream_st *resolve(cudaStream_t s)
{
    if (s)
        return s;
    std::lock_guard<std::mutex> lk(streams_mu);
    if (!default_stream)
        default_stream = new_stream();
    return default_stream;
}

bool live_stream(cudaStream_t s)
{
    if (!s)
        return true;
    std::lock_guard<std::mutex> lk(streams_mu);
    return streams.count(s) != 0;
}

void drain(CUstream_st *s)
{
    std::unique_lock<std::mutex> lk(s->mu);
    s->cv.wait(lk, [s] { return s->ops.empty() && !s->busy; });
}

void drain_all()
{
    std::vector<CUstream_st *> all;
    {
        std::lock_guard<std::mutex> lk(streams_mu);
        all.assign(streams.begin(), streams.end());
        if (default_stream)
            all.push_back(default_stream);
    }
    for (CUstream_st *s : all)
        drain(s);
}

cudaError_t ret(cudaError_t e) { return set_last_error(e); }

/* The error a call returns when a fault has made the context unusable. */
cudaError_t gate() { return (cudaError_t)sticky.load(); }

} // namespace

const config &cfg()
{
    static const config c = read_config();
    return c;
}

cudaError_t set_last_error(cudaError_t e)
{
    if (e != cudaSuccess)
        last_error = e;
    return e;
}

cudaError_t sticky_error() { return gate(); }

void fault(cudaError_t e, const char *fmt, ...)
{
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "cudaemu: %s\n", msg);
    int expected = cudaSuccess;
    sticky.compare_exchange_strong(expected, (int)e);
}

bool device_range(const void *p, size_t n_bytes)
{
    if (!p)
        return false;
    std::lock_guard<std::mutex> lk(mem_mu);
    return find_in(allocations, p, n_bytes) != allocations.end();
}

cudaError_t submit(cudaStream_t s, std::function<void()> op)
{
    if (cudaError_t e = gate())
        return e;
    if (!live_stream(s))
        return cudaErrorInvalidResourceHandle;
    if (!cfg().async) {
        op();
        return gate();
    }
    CUstream_st *st = resolve(s);
    {
        std::lock_guard<std::mutex> lk(st->mu);
        st->ops.push_back(std::move(op));
    }
    st->cv.notify_all();
    return cudaSuccess;
}

} // namespace cudaemu

using namespace cudaemu;

/* ---- errors ------------------------------------------------------------------------------- */

namespace {
struct error_text {
    cudaError_t e;
    const char *name, *text;
};
const error_text error_texts[] = {
    {cudaSuccess, "cudaSuccess", "no error"},
    {cudaErrorInvalidValue, "cudaErrorInvalidValue", "invalid argument"},
    {cudaErrorMemoryAllocation, "cudaErrorMemoryAllocation", "out of memory"},
    {cudaErrorInitializationError, "cudaErrorInitializationError", "initialization error"},
    {cudaErrorInvalidConfiguration, "cudaErrorInvalidConfiguration",
     "invalid configuration argument"},
    {cudaErrorInvalidPitchValue, "cudaErrorInvalidPitchValue", "invalid pitch argument"},
    {cudaErrorInvalidSymbol, "cudaErrorInvalidSymbol", "invalid device symbol"},
    {cudaErrorInvalidDevicePointer, "cudaErrorInvalidDevicePointer", "invalid device pointer"},
    {cudaErrorInvalidMemcpyDirection, "cudaErrorInvalidMemcpyDirection",
     "invalid copy direction for memcpy"},
    {cudaErrorInvalidDeviceFunction, "cudaErrorInvalidDeviceFunction",
     "invalid device function"},
    {cudaErrorNoDevice, "cudaErrorNoDevice", "no CUDA-capable device is detected"},
    {cudaErrorInsufficientDriver, "cudaErrorInsufficientDriver",
     "CUDA driver version is insufficient for CUDA runtime version"},
    {cudaErrorInvalidDevice, "cudaErrorInvalidDevice", "invalid device ordinal"},
    {cudaErrorInvalidResourceHandle, "cudaErrorInvalidResourceHandle",
     "invalid resource handle"},
    {cudaErrorNotReady, "cudaErrorNotReady", "device not ready"},
    {cudaErrorIllegalAddress, "cudaErrorIllegalAddress",
     "an illegal memory access was encountered"},
    {cudaErrorLaunchOutOfResources, "cudaErrorLaunchOutOfResources",
     "too many resources requested for launch"},
    {cudaErrorHostMemoryAlreadyRegistered, "cudaErrorHostMemoryAlreadyRegistered",
     "part or all of the requested memory range is already mapped"},
    {cudaErrorHostMemoryNotRegistered, "cudaErrorHostMemoryNotRegistered",
     "pointer does not correspond to a registered memory region"},
    {cudaErrorLaunchFailure, "cudaErrorLaunchFailure", "unspecified launch failure"},
    {cudaErrorUnknown, "cudaErrorUnknown", "unknown error"},
};

const error_text *text_of(cudaError_t e)
{
    for (const error_text &t : error_texts)
        if (t.e == e)
            return &t;
    return nullptr;
}
} // namespace

const char *cudaGetErrorString(cudaError_t e)
{
    const error_text *t = text_of(e);
    return t ? t->text : "unrecognized error code";
}

const char *cudaGetErrorName(cudaError_t e)
{
    const error_text *t = text_of(e);
    return t ? t->name : "cudaErrorUnknown";
}

cudaError_t cudaGetLastError(void)
{
    cudaError_t e = last_error;
    last_error = cudaSuccess;
    if (cudaError_t s = gate())
        return s;
    return e;
}

cudaError_t cudaPeekAtLastError(void)
{
    if (cudaError_t s = gate())
        return s;
    return last_error;
}

/* ---- the device ----------------------------------------------------------------------------- */

cudaError_t cudaGetDeviceCount(int *count)
{
    if (!count)
        return ret(cudaErrorInvalidValue);
    *count = cfg().n_devices;
    return cfg().n_devices ? cudaSuccess : ret(cudaErrorNoDevice);
}

cudaError_t cudaemu::device_error(int device)
{
    if (cfg().n_devices == 0)
        return cudaErrorNoDevice;
    return device < 0 || device >= cfg().n_devices ? cudaErrorInvalidDevice : cudaSuccess;
}

cudaError_t cudaSetDevice(int device)
{
    if (cudaError_t e = device_error(device))
        return ret(e);
    current_device = device;
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int *device)
{
    if (!device)
        return ret(cudaErrorInvalidValue);
    if (cudaError_t e = device_error(0))
        return ret(e);
    *device = current_device;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int device)
{
    if (!prop)
        return ret(cudaErrorInvalidValue);
    if (cudaError_t e = device_error(device))
        return ret(e);
    memset(prop, 0, sizeof *prop);
    snprintf(prop->name, sizeof prop->name, "cudaemu (emulated on the CPU)");
    prop->totalGlobalMem = cfg().mem_total;
    prop->sharedMemPerBlock = 48u << 10;
    prop->regsPerBlock = 65536;
    prop->warpSize = 32;
    prop->maxThreadsPerBlock = 1024;
    prop->maxThreadsDim[0] = prop->maxThreadsDim[1] = 1024;
    prop->maxThreadsDim[2] = 64;
    prop->maxGridSize[0] = 0x7fffffff;
    prop->maxGridSize[1] = prop->maxGridSize[2] = 65535;
    prop->major = 9;
    prop->minor = 0;
    prop->multiProcessorCount = (int)cfg().n_workers;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device)
{
    if (!value)
        return ret(cudaErrorInvalidValue);
    cudaDeviceProp p;
    if (cudaError_t e = cudaGetDeviceProperties(&p, device))
        return e;
    switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = p.maxThreadsPerBlock; break;
    case cudaDevAttrMaxBlockDimX: *value = p.maxThreadsDim[0]; break;
    case cudaDevAttrMaxGridDimX: *value = p.maxGridSize[0]; break;
    case cudaDevAttrMaxGridDimY: *value = p.maxGridSize[1]; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = (int)p.sharedMemPerBlock; break;
    case cudaDevAttrWarpSize: *value = p.warpSize; break;
    case cudaDevAttrMultiProcessorCount: *value = p.multiProcessorCount; break;
    case cudaDevAttrComputeCapabilityMajor: *value = p.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = p.minor; break;
    default: return ret(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void)
{
    if (cudaError_t e = device_error(0))
        return ret(e);
    drain_all();
    return ret(gate());
}

cudaError_t cudaDeviceReset(void)
{
    drain_all();
    std::lock_guard<std::mutex> lk(mem_mu);
    for (auto &a : allocations)
        free((void *)a.first);
    allocations.clear();
    registered.clear();
    allocated_bytes = 0;
    sticky.store(cudaSuccess);
    last_error = cudaSuccess;
    return cudaSuccess;
}

/* ---- memory ---------------------------------------------------------------------------------- */

cudaError_t cudaMalloc(void **d, size_t n_bytes)
{
    if (!d)
        return ret(cudaErrorInvalidValue);
    if (cudaError_t e = device_error(0))
        return ret(e);
    if (cudaError_t e = gate())
        return e;
    std::lock_guard<std::mutex> lk(mem_mu);
    if (n_bytes > cfg().mem_total - allocated_bytes)
        return ret(cudaErrorMemoryAllocation);
    void *p = nullptr;
    if (posix_memalign(&p, 256, n_bytes ? n_bytes : 1))
        return ret(cudaErrorMemoryAllocation);
    memset(p, 0xff, n_bytes);
    allocations[(uintptr_t)p] = n_bytes;
    allocated_bytes += n_bytes;
    *d = p;
    return cudaSuccess;
}

cudaError_t cudaFree(void *d)
{
    if (!d)
        return cudaSuccess;
    drain_all(); /* cudaFree waits for the device to be done with the memory */
    std::lock_guard<std::mutex> lk(mem_mu);
    auto it = allocations.find((uintptr_t)d);
    if (it == allocations.end())
        return ret(cudaErrorInvalidValue);
    allocated_bytes -= it->second;
    allocations.erase(it);
    free(d);
    return ret(gate());
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes)
{
    if (!free_bytes || !total_bytes)
        return ret(cudaErrorInvalidValue);
    if (cudaError_t e = device_error(0))
        return ret(e);
    std::lock_guard<std::mutex> lk(mem_mu);
    *total_bytes = cfg().mem_total;
    *free_bytes = cfg().mem_total - allocated_bytes;
    return cudaSuccess;
}

cudaError_t cudaHostRegister(void *h, size_t n_bytes, unsigned int flags)
{
    if (cudaError_t e = device_error(0))
        return ret(e);
    if (!h || !n_bytes || flags > 0xf)
        return ret(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> lk(mem_mu);
    if (overlaps(allocations, h, n_bytes))
        return ret(cudaErrorInvalidValue);
    if (overlaps(registered, h, n_bytes))
        return ret(cudaErrorHostMemoryAlreadyRegistered);
    registered[(uintptr_t)h] = n_bytes;
    return cudaSuccess;
}

cudaError_t cudaHostUnregister(void *h)
{
    std::lock_guard<std::mutex> lk(mem_mu);
    auto it = registered.find((uintptr_t)h);
    if (!h || it == registered.end())
        return ret(cudaErrorHostMemoryNotRegistered);
    registered.erase(it);
    return cudaSuccess;
}

namespace {

/* Checks a copy's sides against its kind; cudaMemcpyDefault takes the kind the pointers
 * say. Device sides must lie inside one allocation; host sides must not touch one. */
cudaError_t check_copy(void *dst, const void *src, size_t n, cudaMemcpyKind &kind)
{
    if (n == 0)
        return cudaSuccess;
    if (!dst || !src)
        return cudaErrorInvalidValue;
    bool dst_dev = device_range(dst, n), src_dev = device_range(src, n);
    if (kind == cudaMemcpyDefault) {
        kind = src_dev ? (dst_dev ? cudaMemcpyDeviceToDevice : cudaMemcpyDeviceToHost)
                       : (dst_dev ? cudaMemcpyHostToDevice : cudaMemcpyHostToHost);
    }
    bool want_dst = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    bool want_src = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault)
        return cudaErrorInvalidMemcpyDirection;
    std::lock_guard<std::mutex> lk(mem_mu);
    if (want_dst != dst_dev || (!want_dst && overlaps(allocations, dst, n)))
        return cudaErrorInvalidValue;
    if (want_src != src_dev || (!want_src && overlaps(allocations, src, n)))
        return cudaErrorInvalidValue;
    return cudaSuccess;
}

void copy_delay()
{
    if (cfg().async && cfg().copy_delay_us)
        std::this_thread::sleep_for(std::chrono::microseconds(cfg().copy_delay_us));
}

} // namespace

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n_bytes, cudaMemcpyKind kind,
                            cudaStream_t s)
{
    if (cudaError_t e = gate())
        return e;
    if (cudaError_t e = check_copy(dst, src, n_bytes, kind))
        return ret(e);
    if (!live_stream(s))
        return ret(cudaErrorInvalidResourceHandle);
    if (n_bytes == 0)
        return cudaSuccess;
    cudaError_t e;
    if (kind == cudaMemcpyHostToDevice && !is_registered(src, n_bytes)) {
        /* pageable source: staged now, so the caller may reuse it on return */
        auto staged = std::make_shared<std::vector<char>>((const char *)src,
                                                          (const char *)src + n_bytes);
        e = submit(s, [dst, staged] {
            if (gate())
                return;
            copy_delay();
            memcpy(dst, staged->data(), staged->size());
        });
    } else {
        e = submit(s, [dst, src, n_bytes] {
            if (gate())
                return;
            copy_delay();
            memcpy(dst, src, n_bytes);
        });
        if (e == cudaSuccess && kind == cudaMemcpyDeviceToHost && !is_registered(dst, n_bytes))
            drain(resolve(s)); /* pageable destination: returns once the data is there */
    }
    return ret(e ? e : gate());
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t n_bytes, cudaMemcpyKind kind)
{
    if (cudaError_t e = gate())
        return e;
    if (cudaError_t e = check_copy(dst, src, n_bytes, kind))
        return ret(e);
    drain_all();
    if (cudaError_t e = gate()) /* a fault of the work it waited for */
        return e;
    memcpy(dst, src, n_bytes);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *d, int value, size_t n_bytes, cudaStream_t s)
{
    if (cudaError_t e = gate())
        return e;
    if (n_bytes && !device_range(d, n_bytes))
        return ret(cudaErrorInvalidValue);
    if (n_bytes == 0)
        return cudaSuccess;
    return ret(submit(s, [d, value, n_bytes] {
        if (!gate())
            memset(d, value, n_bytes);
    }));
}

cudaError_t cudaMemset(void *d, int value, size_t n_bytes)
{
    cudaError_t e = cudaMemsetAsync(d, value, n_bytes, 0);
    if (e != cudaSuccess)
        return e;
    drain_all();
    return ret(gate());
}

/* ---- streams --------------------------------------------------------------------------------- */

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned int flags)
{
    if (!s || flags > cudaStreamNonBlocking)
        return ret(cudaErrorInvalidValue);
    if (cudaError_t e = device_error(0))
        return ret(e);
    CUstream_st *st = new_stream();
    std::lock_guard<std::mutex> lk(streams_mu);
    streams.insert(st);
    *s = st;
    return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithFlags(s, 0); }

cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    {
        std::lock_guard<std::mutex> lk(streams_mu);
        if (!s || !streams.erase(s))
            return ret(cudaErrorInvalidResourceHandle);
    }
    drain(s);
    if (s->worker.joinable()) {
        {
            std::lock_guard<std::mutex> lk(s->mu);
            s->stop = true;
        }
        s->cv.notify_all();
        s->worker.join();
    }
    delete s;
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
    if (!live_stream(s))
        return ret(cudaErrorInvalidResourceHandle);
    drain(resolve(s));
    return ret(gate());
}

cudaError_t cudaStreamQuery(cudaStream_t s)
{
    if (!live_stream(s))
        return ret(cudaErrorInvalidResourceHandle);
    if (cudaError_t e = gate())
        return e;
    CUstream_st *st = resolve(s);
    std::lock_guard<std::mutex> lk(st->mu);
    return st->ops.empty() && !st->busy ? cudaSuccess : cudaErrorNotReady;
}

/* ---- events ---------------------------------------------------------------------------------- */

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned int flags)
{
    if (!e || flags > (cudaEventBlockingSync | cudaEventDisableTiming | 0x4u))
        return ret(cudaErrorInvalidValue);
    if (cudaError_t err = device_error(0))
        return ret(err);
    *e = new CUevent_st();
    return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t *e) { return cudaEventCreateWithFlags(e, 0); }

cudaError_t cudaEventDestroy(cudaEvent_t e)
{
    if (!e)
        return ret(cudaErrorInvalidResourceHandle);
    drain_all(); /* operations queued on streams may still name it */
    delete e;
    return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s)
{
    if (!e)
        return ret(cudaErrorInvalidResourceHandle);
    uint64_t ticket;
    {
        std::lock_guard<std::mutex> lk(e->mu);
        ticket = ++e->recorded;
    }
    cudaError_t err = submit(s, [e, ticket] {
        std::lock_guard<std::mutex> lk(e->mu);
        e->completed = std::max(e->completed, ticket);
        e->cv.notify_all();
    });
    if (err) {
        std::lock_guard<std::mutex> lk(e->mu);
        e->completed = std::max(e->completed, ticket); /* nothing will run it: never wait */
    }
    return ret(err);
}

cudaError_t cudaEventQuery(cudaEvent_t e)
{
    if (!e)
        return ret(cudaErrorInvalidResourceHandle);
    if (cudaError_t err = gate())
        return err;
    std::lock_guard<std::mutex> lk(e->mu);
    return e->completed >= e->recorded ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventSynchronize(cudaEvent_t e)
{
    if (!e)
        return ret(cudaErrorInvalidResourceHandle);
    {
        std::unique_lock<std::mutex> lk(e->mu);
        uint64_t target = e->recorded;
        e->cv.wait(lk, [e, target] { return e->completed >= target || gate(); });
    }
    return ret(gate());
}

cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned int flags)
{
    if (!e || flags)
        return ret(!e ? cudaErrorInvalidResourceHandle : cudaErrorInvalidValue);
    uint64_t target;
    {
        std::lock_guard<std::mutex> lk(e->mu);
        target = e->recorded;
    }
    return ret(submit(s, [e, target] {
        std::unique_lock<std::mutex> lk(e->mu);
        e->cv.wait(lk, [e, target] { return e->completed >= target || gate(); });
    }));
}
