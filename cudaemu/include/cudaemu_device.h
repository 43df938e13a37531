/*
 * cudaemu/include/cudaemu_device.h: the device side of the emulated CUDA platform: built-in
 * variables, vector types, barriers, warp shuffles, the intrinsics the CUDA sources use, and
 * the kernel launch that the build substitutes for <<<...>>> (cudaemu/rewrite.py).
 *
 * Execution model (cudaemu/launch.cpp): each thread of a block is a fiber, a function with
 * its own stack that runs until it reaches a barrier (__syncthreads, __syncwarp, a shuffle,
 * a vote) and then yields; a barrier releases its threads only when every thread it names
 * has arrived, so a missing __syncthreads shows up as wrong results and a divergent one as a
 * reported fault, as on a GPU. The fibers of a block run on one OS thread; blocks run on a
 * pool of OS threads. threadIdx and friends read the running fiber's own values.
 */
#ifndef CUDAEMU_DEVICE_H
#define CUDAEMU_DEVICE_H

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cudaemu_defs.h"

struct uint3 {
    unsigned int x, y, z;
};

struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
struct __attribute__((aligned(8))) float2 {
    float x, y;
};
struct __attribute__((aligned(16))) uint4 {
    unsigned int x, y, z, w;
};
struct __attribute__((aligned(8))) uint2 {
    unsigned int x, y;
};
struct __attribute__((aligned(16))) int4 {
    int x, y, z, w;
};

inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w)
{
    return uint4{x, y, z, w};
}

/* The running emulated thread: its coordinates, and the runtime's handle on its block. */
struct cudaemu_thread {
    uint3 thread_idx, block_idx;
    dim3 block_dim, grid_dim;
    unsigned linear; /* threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z) */
    unsigned lane, warp;
    uint64_t block_serial; /* unique to this run of this block on this OS thread */
    void *block;           /* launch.cpp's block state */
};
/* __thread, not thread_local: no dynamic initialisation, so every threadIdx is a plain TLS
 * load rather than a call to C++'s TLS wrapper */
extern __thread cudaemu_thread *cudaemu_self;

#define threadIdx (static_cast<const uint3 &>(cudaemu_self->thread_idx))
#define blockIdx (static_cast<const uint3 &>(cudaemu_self->block_idx))
#define blockDim (static_cast<const dim3 &>(cudaemu_self->block_dim))
#define gridDim (static_cast<const dim3 &>(cudaemu_self->grid_dim))
constexpr int warpSize = 32;

/* ---- barriers and warp exchange (launch.cpp) ------------------------------------------ */

void __syncthreads(void);
void __syncwarp(unsigned mask = 0xffffffffu);
/* Every lane named in mask contributes value and waits for the others; returns the 32
 * contributions (lanes outside mask: undefined, and reading one is reported as a fault by
 * the callers below), valid until the caller's cudaemu_warp_release. op names the
 * intrinsic for messages. */
const uint64_t *cudaemu_warp_exchange(unsigned mask, uint64_t value, const char *op);
void cudaemu_warp_release(void);
/* Reports a fault of the running kernel (a shuffle reading a lane outside its mask) and
 * ends the running thread's block; does not return. */
[[noreturn]] void cudaemu_kernel_fault(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));

/* The dynamic shared memory of the running block (the launch's third argument). */
void *cudaemu_dynamic_shared(void);
/* Fills a __shared__ variable with NaN bytes the first time a thread of a new block reaches
 * its declaration (gen remembers the block that did). */
void cudaemu_shared_touch(uint64_t *gen, void *p, size_t n_bytes);
#define CUDAEMU_SHARED_POISON(name)                                                            \
    do {                                                                                       \
        static thread_local uint64_t cudaemu_gen_##name;                                       \
        cudaemu_shared_touch(&cudaemu_gen_##name, &(name), sizeof(name));                      \
    } while (0)

template <class T> inline uint64_t cudaemu_bits(T v)
{
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of T");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof v);
    return u;
}

template <class T> inline T cudaemu_from_bits(uint64_t u)
{
    T v;
    std::memcpy(&v, &u, sizeof v);
    return v;
}

/* The value lane src contributed to a shuffle, or the caller's own when src is outside the
 * caller's segment of width lanes (keep_own), as the CUDA shuffles define. */
template <class T>
inline T cudaemu_shfl(unsigned mask, T var, int src, bool keep_own, const char *op)
{
    const uint64_t *v = cudaemu_warp_exchange(mask, cudaemu_bits(var), op);
    if (!keep_own && !(mask >> src & 1u))
        cudaemu_kernel_fault("%s with mask 0x%08x: lane %u reads lane %d, which is not in the "
                             "mask", op, mask, cudaemu_self->lane, src);
    T r = keep_own ? var : cudaemu_from_bits<T>(v[src]);
    cudaemu_warp_release();
    return r;
}

template <class T> inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32)
{
    int lane = (int)cudaemu_self->lane, base = lane & ~(width - 1);
    return cudaemu_shfl(mask, var, base + (src_lane & (width - 1)), false, "__shfl_sync");
}

template <class T> inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32)
{
    int lane = (int)cudaemu_self->lane, base = lane & ~(width - 1), src = lane ^ lane_mask;
    return cudaemu_shfl(mask, var, src, src >= base + width, "__shfl_xor_sync");
}

template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32)
{
    int lane = (int)cudaemu_self->lane, base = lane & ~(width - 1), src = lane + (int)delta;
    return cudaemu_shfl(mask, var, src, src >= base + width, "__shfl_down_sync");
}

template <class T> inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32)
{
    int lane = (int)cudaemu_self->lane, base = lane & ~(width - 1), src = lane - (int)delta;
    return cudaemu_shfl(mask, var, src, src < base, "__shfl_up_sync");
}

inline unsigned __ballot_sync(unsigned mask, int pred)
{
    const uint64_t *v = cudaemu_warp_exchange(mask, pred != 0, "__ballot_sync");
    unsigned r = 0;
    for (int l = 0; l < 32; l++)
        if ((mask >> l & 1u) && v[l])
            r |= 1u << l;
    cudaemu_warp_release();
    return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

/* ---- intrinsics ----------------------------------------------------------------------- */

template <class T> inline T __ldg(const T *p) { return *p; }

inline float __uint_as_float(unsigned u)
{
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f)
{
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __int_as_float(int i) { return __uint_as_float((unsigned)i); }
inline int __float_as_int(float f) { return (int)__float_as_uint(f); }

/* Byte n of the result is byte s[4n + 2 : 4n] of the eight bytes {y, x} (x the low four). */
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s)
{
    uint64_t both = (uint64_t)y << 32 | x;
    unsigned r = 0;
    for (int n = 0; n < 4; n++)
        r |= (unsigned)(both >> (8 * (s >> (4 * n) & 7u)) & 0xffu) << (8 * n);
    return r;
}

/* The _rn intrinsics: one IEEE operation, rounded to nearest even, never fused. g++ does not
 * contract a * b + c here (no FMA instructions in this build), so these are the plain ops. */
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : a > 1.0f ? 1.0f : a; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }

inline void __threadfence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* Atomics: blocks run on several OS threads at once, so these are real atomic operations. */
template <class T> inline T atomicAdd(T *p, T v)
{
    static_assert(std::is_integral<T>::value, "atomicAdd of an integer type");
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float *p, float v)
{
    unsigned *u = reinterpret_cast<unsigned *>(p);
    unsigned old = __atomic_load_n(u, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(u, &old, __float_as_uint(__uint_as_float(old) + v), false,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return __uint_as_float(old);
}
template <class T> inline T atomicMax(T *p, T v)
{
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST,
                                                   __ATOMIC_SEQ_CST)) {
    }
    return old;
}
template <class T> inline T atomicCAS(T *p, T expected, T desired)
{
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
    return expected;
}
template <class T> inline T atomicExch(T *p, T v)
{
    return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}

/* ---- launches ------------------------------------------------------------------------- */

struct cudaemu_launch_config {
    dim3 grid, block;
    size_t shared_bytes;
    cudaStream_t stream;
};

inline cudaemu_launch_config cudaemu_config(dim3 grid, dim3 block, size_t shared_bytes = 0,
                                            cudaStream_t stream = 0)
{
    return cudaemu_launch_config{grid, block, shared_bytes, stream};
}

/* Checks the configuration as a GPU does and runs body once per thread of the grid on the
 * stream (launch.cpp). Returns the launch status, which cudaGetLastError also reports. */
cudaError_t cudaemu_launch_body(const cudaemu_launch_config &c, const char *name,
                                std::function<void()> body);

/* kernel<<<grid, block, shared, stream>>>(args...) as rewritten by cudaemu/rewrite.py: the
 * arguments are converted to the kernel's parameter types and copied at the launch, as the
 * CUDA runtime copies them; each thread then gets its own copy, as a kernel parameter is. */
template <class... P, class... A>
cudaError_t cudaemu_launch(const cudaemu_launch_config &c, const char *name, void (*kernel)(P...),
                           A &&...args)
{
    auto params = std::make_shared<const std::tuple<std::decay_t<P>...>>(std::forward<A>(args)...);
    return cudaemu_launch_body(c, name, [kernel, params]() {
        std::tuple<std::decay_t<P>...> own = *params;
        std::apply(kernel, own);
    });
}

#endif
