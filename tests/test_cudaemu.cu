/*
 * tests/test_cudaemu.cu: the emulated CUDA platform's own tests (cudaemu/: launch.cpp,
 * runtime.cpp and the replacement headers), written as ordinary CUDA: kernels with
 * __global__, launched with <<<...>>>, static and extern __shared__. The build rewrites this
 * file with cudaemu/rewrite.py and compiles it with g++, like the sources in kernels/cuda.
 * Emulated CUDA build only.
 *
 * Every expected value is worked out here from NVIDIA's documentation (the CUDA C++
 * Programming Guide for indexing, barriers, shuffles and votes; the runtime API reference
 * for errors; IEEE 754 for the conversions), never by calling the emulator a second way: a
 * test that shared the emulator's reading would hide exactly the bugs it is here to find.
 *
 * Runs in one process (CK_NOFORK), as every CUDA suite does. The teardown frees what a test
 * allocated and resets the device when a test left it faulted, so one failure does not
 * cascade. The emulator reads its configuration (CUDAEMU_*) once per process, so the cases
 * that need other settings run this program again in a child: the thread, warp and fault
 * cases with CUDAEMU_ORDER=reverse (tag "order"); the stream, launch and fault cases with
 * CUDAEMU_ASYNC=1 and copies of 100 ms (tag "async"); the memory cases with CUDAEMU_MEM=64M; a
 * missing __syncthreads in both orders; and a machine without a device (CUDAEMU_DEVICES=0).
 * Tests that only mean something in one stream mode (the "sync" and "async" cases) are in the
 * suite only in that mode, read from the environment as the runtime reads it. Exits 77
 * (skipped) when the emulated machine has no device.
 */
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <check.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

extern "C" {
#include "tests/check_util.h"
}

extern char **environ;

#define FULL_MASK 0xffffffffu
#define POISON_U32 0xffffffffu /* four 0xff bytes: what unwritten device and shared memory hold */
#define MAX_BUFFERS 32
#define NO_DEVICE_ARG "--no-device"
#define MISSING_BARRIER_ARG "--missing-barrier"
/* the async cases rely on each copy taking this long; the child sets 100 ms, far longer than
 * a loaded machine keeps a thread waiting for a core */
#define MIN_ASYNC_DELAY_US 10000ull

/* ---- the emulator's configuration, read as runtime.cpp reads it ------------------------ */

/* CUDAEMU_* as a number (runtime.cpp's env_number): unset or empty gives dflt; with suffixes,
 * K, M or G multiply by 2^10, 2^20, 2^30. A malformed value makes the runtime abort before any
 * test runs, so it is not handled here. */
static unsigned long long env_number(const char *name, unsigned long long dflt, bool suffixes)
{
    const char *v = getenv(name);
    if (!v || !*v)
        return dflt;
    char *end = nullptr;
    unsigned long long n = strtoull(v, &end, 10);
    if (suffixes && *end == 'K')
        n <<= 10;
    else if (suffixes && *end == 'M')
        n <<= 20;
    else if (suffixes && *end == 'G')
        n <<= 30;
    return n;
}

static bool emu_async(void) { return env_number("CUDAEMU_ASYNC", 0, false) != 0; }
/* CUDAEMU_ORDER=reverse: threads (and blocks) run last to first */
static bool emu_reverse(void)
{
    const char *v = getenv("CUDAEMU_ORDER");
    return v && strcmp(v, "reverse") == 0;
}
static size_t emu_mem_total(void) { return (size_t)env_number("CUDAEMU_MEM", 16ull << 30, true); }
static bool emu_slow_copies(void)
{
    return emu_async() && env_number("CUDAEMU_COPY_DELAY_US", 0, false) >= MIN_ASYNC_DELAY_US;
}

/* ---- what a test holds; the teardown gives it back -------------------------------------- */

static void *g_dev[MAX_BUFFERS];
static int g_n_dev;
static void *g_host[MAX_BUFFERS];
static int g_n_host;
static cudaStream_t g_streams[8];
static int g_n_streams;
static cudaEvent_t g_events[8];
static int g_n_events;

static void setup(void)
{
    g_n_dev = g_n_host = g_n_streams = g_n_events = 0;
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
}

static void teardown(void)
{
    for (int i = 0; i < g_n_events; i++)
        cudaEventDestroy(g_events[i]);
    for (int i = 0; i < g_n_streams; i++)
        cudaStreamDestroy(g_streams[i]);
    for (int i = 0; i < g_n_dev; i++)
        cudaFree(g_dev[i]);
    for (int i = 0; i < g_n_host; i++) {
        cudaHostUnregister(g_host[i]); /* NotRegistered for pageable ones: fine */
        free(g_host[i]);
    }
    g_n_dev = g_n_host = g_n_streams = g_n_events = 0;
    if (cudaDeviceSynchronize() != cudaSuccess) /* a test failed with the device faulted */
        cudaDeviceReset();
    cudaGetLastError();
}

/* After cudaDeviceReset every allocation and registration is gone: teardown must not free
 * the allocations again (the host buffers stay, and are freed). */
static void reset_device(void)
{
    ck_assert_int_eq(cudaDeviceReset(), cudaSuccess);
    g_n_dev = 0;
    ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
}

template <class T> static T *dev_alloc(size_t n)
{
    ck_assert_int_lt(g_n_dev, MAX_BUFFERS);
    void *d = nullptr;
    ck_assert_int_eq(cudaMalloc(&d, n * sizeof(T)), cudaSuccess);
    g_dev[g_n_dev++] = d;
    return (T *)d;
}

/* n_bytes of host memory, registered (pinned) or not; filled with 0xee bytes. */
template <class T> static T *host_alloc(size_t n, bool pinned)
{
    ck_assert_int_lt(g_n_host, MAX_BUFFERS);
    size_t n_bytes = (n * sizeof(T) + 4095) / 4096 * 4096;
    void *h = aligned_alloc(4096, n_bytes);
    ck_assert_ptr_nonnull(h);
    memset(h, 0xee, n_bytes);
    g_host[g_n_host++] = h;
    if (pinned)
        ck_assert_int_eq(cudaHostRegister(h, n_bytes, cudaHostRegisterDefault), cudaSuccess);
    return (T *)h;
}

static cudaStream_t new_stream(void)
{
    ck_assert_int_lt(g_n_streams, 8);
    cudaStream_t s = nullptr;
    ck_assert_int_eq(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
    g_streams[g_n_streams++] = s;
    return s;
}

static cudaEvent_t new_event(void)
{
    ck_assert_int_lt(g_n_events, 8);
    cudaEvent_t e = nullptr;
    ck_assert_int_eq(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), cudaSuccess);
    g_events[g_n_events++] = e;
    return e;
}

template <class T> static void to_host(T *h, const T *d, size_t n)
{
    ck_assert_int_eq(cudaMemcpy(h, d, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
}

template <class T> static void to_dev(T *d, const T *h, size_t n)
{
    ck_assert_int_eq(cudaMemcpy(d, h, n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
}

/* Device memory is host memory in cudaemu: the tests of when a copy lands read it directly,
 * without a runtime call that would wait for the streams. */
static unsigned peek_u32(const void *d)
{
    return __atomic_load_n((const unsigned *)d, __ATOMIC_SEQ_CST);
}

static unsigned f32_bits(float f)
{
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}

static float f32_of(unsigned u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- stderr capture (fault messages) ----------------------------------------------------- */

static FILE *g_capture;
static int g_saved_stderr = -1;

/* Sends fd 2 to a temporary file until capture_end. No assertion may run in between: a
 * failing one would leave stderr redirected for the rest of the run. */
static void capture_begin(void)
{
    g_capture = tmpfile();
    ck_assert_ptr_nonnull(g_capture);
    fflush(stderr);
    g_saved_stderr = dup(2);
    ck_assert_int_ge(g_saved_stderr, 0);
    ck_assert_int_ge(dup2(fileno(g_capture), 2), 0);
}

/* Restores stderr and returns what was written to it in msg (len bytes, NUL-terminated). */
static void capture_end(char *msg, size_t len)
{
    fflush(stderr);
    dup2(g_saved_stderr, 2);
    close(g_saved_stderr);
    g_saved_stderr = -1;
    rewind(g_capture);
    size_t n = fread(msg, 1, len - 1, g_capture);
    msg[n] = '\0';
    fclose(g_capture);
    g_capture = nullptr;
}

/* ---- kernels ------------------------------------------------------------------------------ */

struct thread_record {
    unsigned block[3], thread[3], block_dim[3], grid_dim[3];
    unsigned via_lane; /* what lane (linear index % 32) of the warp holds as its linear index */
};

/* Every thread appends its coordinates to out (room for cap records); *n counts them. The
 * block has at most 32 threads (one warp, perhaps partial), so each thread can also ask the
 * lane its linear index names for that lane's linear index: its own, when lanes follow the
 * linear index. */
static __global__ void record_coordinates(thread_record *out, unsigned cap, unsigned *n)
{
    const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned size = blockDim.x * blockDim.y * blockDim.z;
    const unsigned mask = size >= 32 ? FULL_MASK : (1u << size) - 1u;
    const unsigned via_lane = __shfl_sync(mask, linear, (int)(linear % 32));
    unsigned slot = atomicAdd(n, 1u);
    if (slot >= cap)
        return;
    thread_record r = {{blockIdx.x, blockIdx.y, blockIdx.z},
                       {threadIdx.x, threadIdx.y, threadIdx.z},
                       {blockDim.x, blockDim.y, blockDim.z},
                       {gridDim.x, gridDim.y, gridDim.z},
                       via_lane};
    out[slot] = r;
}

/* out[i] = base + i over the whole (1-D) grid. */
static __global__ void fill_index(int *out, int base)
{
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = base + (int)i;
}

/* Counts the blocks that run. */
static __global__ void count_blocks(unsigned *n)
{
    if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0)
        atomicAdd(n, 1u);
}

/* Thread i writes shared[i] and reads its neighbour's slot, with or without a barrier between
 * (with_barrier is the same for the whole block, so the barrier is not divergent). */
static __global__ void rotate_through_shared(unsigned *out, int with_barrier)
{
    __shared__ unsigned s[256];
    const unsigned n = blockDim.x, i = threadIdx.x;
    s[i] = 1000u * blockIdx.x + i;
    if (with_barrier)
        __syncthreads();
    out[blockIdx.x * n + i] = s[(i + 1) % n];
}

/* What each thread reads from static and dynamic shared memory before anyone wrote it, and
 * its neighbour's slot after every thread of the block wrote its own. */
static __global__ void shared_first_and_neighbour(unsigned *first, unsigned *neighbour,
                                                  unsigned *dyn_first, unsigned *dyn_neighbour)
{
    __shared__ unsigned s[64];
    extern __shared__ unsigned dyn[];
    const unsigned n = blockDim.x, i = threadIdx.x, at = blockIdx.x * n + i;
    first[at] = s[i];
    dyn_first[at] = dyn[i];
    __syncthreads();
    s[i] = 1000u * blockIdx.x + i;
    dyn[i] = 1000u * blockIdx.x + i + 500000u;
    __syncthreads();
    neighbour[at] = s[(i + 1) % n];
    dyn_neighbour[at] = dyn[(i + 1) % n];
}

/* Two arrays in one __shared__ declaration: both must start as NaN bytes in every block. */
static __global__ void shared_two_declarators(unsigned *first)
{
    __shared__ unsigned a[32], b[32];
    const unsigned i = threadIdx.x, at = 2 * (blockIdx.x * 32 + i);
    first[at] = a[i];
    first[at + 1] = b[i];
    __syncthreads();
    a[i] = 1u;
    b[i] = 2u;
}

/* n_poisoned[block] = how many of the n_bytes of dynamic shared memory held 0xff when the
 * block started; the block then overwrites all of them. */
static __global__ void count_dynamic_poison(unsigned *n_poisoned, unsigned n_bytes)
{
    extern __shared__ unsigned char bytes[];
    unsigned count = 0;
    for (unsigned i = threadIdx.x; i < n_bytes; i += blockDim.x)
        count += bytes[i] == 0xffu;
    __syncthreads();
    for (unsigned i = threadIdx.x; i < n_bytes; i += blockDim.x)
        bytes[i] = (unsigned char)blockIdx.x;
    atomicAdd(&n_poisoned[blockIdx.x], count);
}

enum shfl_mode { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR };
static const char *const shfl_names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                         "__shfl_xor_sync"};

/* Each thread contributes values made from its index and stores what the shuffle returns. */
static __global__ void shuffle(int mode, int param, int width, int *out_i, float *out_f,
                               double *out_d)
{
    const unsigned t = threadIdx.x;
    const int vi = (int)(t * 7u + 3u);
    const float vf = (float)t * 0.5f + 0.25f;
    const double vd = (double)t * 1.5 + 1e10;
    int ri = 0;
    float rf = 0.0f;
    double rd = 0.0;
    switch (mode) {
    case SHFL_IDX:
        ri = __shfl_sync(FULL_MASK, vi, param, width);
        rf = __shfl_sync(FULL_MASK, vf, param, width);
        rd = __shfl_sync(FULL_MASK, vd, param, width);
        break;
    case SHFL_UP:
        ri = __shfl_up_sync(FULL_MASK, vi, (unsigned)param, width);
        rf = __shfl_up_sync(FULL_MASK, vf, (unsigned)param, width);
        rd = __shfl_up_sync(FULL_MASK, vd, (unsigned)param, width);
        break;
    case SHFL_DOWN:
        ri = __shfl_down_sync(FULL_MASK, vi, (unsigned)param, width);
        rf = __shfl_down_sync(FULL_MASK, vf, (unsigned)param, width);
        rd = __shfl_down_sync(FULL_MASK, vd, (unsigned)param, width);
        break;
    default:
        ri = __shfl_xor_sync(FULL_MASK, vi, param, width);
        rf = __shfl_xor_sync(FULL_MASK, vf, param, width);
        rd = __shfl_xor_sync(FULL_MASK, vd, param, width);
        break;
    }
    out_i[t] = ri;
    out_f[t] = rf;
    out_d[t] = rd;
}

/* In a 2-D block, lane 0 of each warp broadcasts its linear index x + blockDim.x * y. */
static __global__ void broadcast_linear_index(unsigned *out)
{
    const unsigned linear = threadIdx.x + blockDim.x * threadIdx.y;
    out[linear] = __shfl_sync(FULL_MASK, linear, 0);
}

struct vote_result {
    unsigned ballot;
    int any_t40, any_none, all_t_not_5, all_every;
};

static __global__ void votes(vote_result *out)
{
    const unsigned t = threadIdx.x;
    vote_result r;
    r.ballot = __ballot_sync(FULL_MASK, t % 3 == 0);
    r.any_t40 = __any_sync(FULL_MASK, t == 40);
    r.any_none = __any_sync(FULL_MASK, 0);
    r.all_t_not_5 = __all_sync(FULL_MASK, t != 5);
    r.all_every = __all_sync(FULL_MASK, 1);
    out[t] = r;
}

/* A ballot and an all over the low half alone, after every lane voted 1 with the full mask:
 * lanes outside the mask must not count, whatever they voted before. */
static __global__ void votes_low_half(unsigned *ballot, int *all)
{
    const unsigned lane = threadIdx.x % 32;
    const unsigned everyone = __ballot_sync(FULL_MASK, 1);
    __syncwarp();
    if (lane < 16) {
        ballot[threadIdx.x] = __ballot_sync(0x0000ffffu, 1);
        all[threadIdx.x] = __all_sync(0x0000ffffu, 1);
    } else {
        ballot[threadIdx.x] = everyone;
        all[threadIdx.x] = 1;
    }
}

/* A warp reduction by xor butterfly over the lanes that exist: the last warp of the block may
 * be partial (a power of two of lanes), and its mask then names only those. */
static __global__ void warp_reduce(const float *in, float *sum_f, int *sum_i, unsigned *ballot,
                                   int *all, int *any)
{
    const unsigned t = threadIdx.x, lane = t % 32, first = t - lane;
    const unsigned n_lanes = blockDim.x - first < 32 ? blockDim.x - first : 32;
    const unsigned mask = n_lanes == 32 ? FULL_MASK : (1u << n_lanes) - 1u;
    float v = in[t];
    int vi = (int)t + 1;
    for (unsigned o = n_lanes / 2; o > 0; o /= 2) {
        v += __shfl_xor_sync(mask, v, (int)o);
        vi += __shfl_xor_sync(mask, vi, (int)o);
    }
    sum_f[t] = v;
    sum_i[t] = vi;
    ballot[t] = __ballot_sync(mask, lane & 1u);
    all[t] = __all_sync(mask, 1);
    any[t] = __any_sync(mask, lane == n_lanes - 1);
}

/* Each half-warp reduces on its own with its own mask (Programming Guide: every thread named
 * in a mask executes the intrinsic with that same mask, which holds here). */
static __global__ void half_warp_sums(int *out)
{
    const unsigned lane = threadIdx.x % 32;
    const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    int v = (int)threadIdx.x;
    for (int o = 8; o > 0; o >>= 1)
        v += __shfl_xor_sync(half, v, o, 16);
    out[threadIdx.x] = v;
}

/* Even and odd lanes exchange among themselves, each group with its own mask. */
static __global__ void even_odd_sums(int *out)
{
    const unsigned lane = threadIdx.x % 32;
    const unsigned group = lane & 1u ? 0xaaaaaaaau : 0x55555555u;
    int v = (int)threadIdx.x;
    for (int o = 16; o > 1; o >>= 1)
        v += __shfl_xor_sync(group, v, o);
    out[threadIdx.x] = v;
}

/* Every lane reads lane src's value (src = 15 or 16) with the full mask; then the half
 * holding src goes on with two shuffles of its own mask while the other half does none.
 * out[lane] = what the full-mask shuffle returned; out[32 + lane] = the half's result. */
static __global__ void full_then_half_shuffles(int *out, int low_half_goes_on)
{
    const unsigned lane = threadIdx.x;
    const int src = low_half_goes_on ? 15 : 16;
    const int got = __shfl_sync(FULL_MASK, (int)lane + 100, src);
    const bool goes_on = low_half_goes_on ? lane < 16 : lane >= 16;
    if (goes_on) {
        const unsigned half = low_half_goes_on ? 0x0000ffffu : 0xffff0000u;
        int x = __shfl_xor_sync(half, (int)lane + 1000, 1);
        x = __shfl_xor_sync(half, x + 2000, 2);
        out[32 + lane] = x;
    }
    out[lane] = got;
}

/* Lane i writes s[i] and reads its neighbour's slot in the same warp, with or without
 * __syncwarp between; with mask, only the lanes it names take part (the others return). */
static __global__ void rotate_within_warp(unsigned *out, int with_syncwarp, unsigned mask)
{
    __shared__ unsigned s[64];
    const unsigned t = threadIdx.x, lane = t % 32, first = t - lane;
    if (!(mask >> lane & 1u))
        return;
    s[t] = 100u * t + 7u;
    if (with_syncwarp)
        __syncwarp(mask);
    /* the next lane of the mask after this one, wrapping */
    unsigned next = lane;
    for (unsigned k = 1; k <= 32; k++)
        if (mask >> ((lane + k) % 32) & 1u) {
            next = (lane + k) % 32;
            break;
        }
    out[t] = s[first + next];
}

struct atomic_results {
    unsigned add_old, max_old, max_kept, cas_hit_old, cas_miss_old, cas_final, exch_old,
        exch_final;
    float fadd_old, fadd_final;
};

/* One thread: what each atomic returns and leaves behind (CUDA: every atomic returns the old
 * value; atomicCAS stores only when the old value equals compare). */
static __global__ void atomic_semantics(unsigned *w, float *f, atomic_results *r)
{
    r->add_old = atomicAdd(&w[0], 5u);         /* w0 = 10 -> 15 */
    r->max_old = atomicMax(&w[1], 3u);         /* w1 = 7 stays */
    r->max_kept = atomicMax(&w[1], 9u);        /* returns 7, w1 = 9 */
    r->cas_hit_old = atomicCAS(&w[2], 4u, 8u); /* w2 = 4 -> 8 */
    r->cas_miss_old = atomicCAS(&w[2], 4u, 99u);
    r->cas_final = w[2];
    r->exch_old = atomicExch(&w[3], 12u);
    r->exch_final = w[3];
    r->fadd_old = atomicAdd(&f[0], 0.25f);
    r->fadd_final = f[0];
}

/* Every thread of every block adds to the same counters. */
static __global__ void atomic_counts(unsigned *count, float *fsum, unsigned *max_id)
{
    const unsigned id = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(count, 1u);
    atomicAdd(fsum, 1.0f);
    atomicMax(max_id, id);
}

struct launch_args {
    unsigned a, b;
};

static __global__ void store_args(launch_args args, int scalar, unsigned *out)
{
    out[0] = args.a;
    out[1] = args.b;
    out[2] = (unsigned)scalar;
}

/* ---- faulting kernels --------------------------------------------------------------------- */

/* Thread quitter returns while the others go to __syncthreads. */
static __global__ void return_before_syncthreads(int *out, unsigned quitter)
{
    if (threadIdx.x == quitter)
        return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

/* One half of the warp returns; the other shuffles with the full mask. */
static __global__ void shuffle_after_lanes_returned(int *out, int low_half_returns)
{
    if ((threadIdx.x < 16) == (low_half_returns != 0))
        return;
    out[threadIdx.x] = __shfl_sync(FULL_MASK, (int)threadIdx.x, 0);
}

/* The low half waits at __syncthreads, the high half at a shuffle naming the low half:
 * neither can ever go on. */
static __global__ void barrier_against_shuffle(int *out)
{
    if (threadIdx.x < 16)
        __syncthreads();
    else
        out[threadIdx.x] = __shfl_sync(FULL_MASK, (int)threadIdx.x, 0);
}

/* Lane 31 leaves lane 0 out of its mask; every other lane names the whole warp. */
static __global__ void shuffle_with_different_masks(int *out)
{
    const unsigned mask = threadIdx.x == 31 ? 0xfffffffeu : FULL_MASK;
    out[threadIdx.x] = __shfl_xor_sync(mask, (int)threadIdx.x, 2);
}

/* 40 threads: the second warp has lanes 0..7 only, and names all 32. */
static __global__ void full_mask_in_partial_warp(int *out)
{
    out[threadIdx.x] = __shfl_xor_sync(FULL_MASK, (int)threadIdx.x, 1);
}

/* Lanes 0..15 shuffle among themselves but read lane 20. */
static __global__ void shuffle_reads_outside_mask(int *out)
{
    if (threadIdx.x < 16)
        out[threadIdx.x] = __shfl_sync(0x0000ffffu, (int)threadIdx.x, 20);
}

/* ---- kernels for the stream cases --------------------------------------------------------- */

static __global__ void copy_word(const unsigned *src, unsigned *dst) { dst[0] = src[0]; }

static __global__ void double_words(unsigned *p, unsigned n)
{
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        p[i] *= 2u;
}

/* Appends *src to log, at the next free place (*n counts them). */
static __global__ void append_word(const unsigned *src, unsigned *log, unsigned *n)
{
    log[atomicAdd(n, 1u)] = src[0];
}

/* ---- helpers for the fault cases ---------------------------------------------------------- */

struct fault_run {
    cudaError_t launch, sync;
    char msg[4096];
};

/* Runs launch (which launches one kernel) with stderr captured; records what
 * cudaGetLastError said right after the launch, what cudaDeviceSynchronize said, and what
 * the emulator printed. */
template <class F> static void run_faulting(F launch, fault_run *r)
{
    capture_begin();
    launch();
    r->launch = cudaGetLastError();
    r->sync = cudaDeviceSynchronize();
    capture_end(r->msg, sizeof r->msg);
}

/* The launch failed as a GPU's would: in the synchronous mode at once, in either mode by the
 * next synchronisation; the message names the kernel and each of want (NULL-terminated). */
static void expect_fault(const fault_run *r, const char *kernel, const char *const *want)
{
    if (!emu_async())
        ck_assert_msg(r->launch == cudaErrorLaunchFailure, "launch of %s returned %s", kernel,
                      cudaGetErrorName(r->launch));
    ck_assert_msg(r->sync == cudaErrorLaunchFailure, "synchronize after %s returned %s", kernel,
                  cudaGetErrorName(r->sync));
    char name[128];
    snprintf(name, sizeof name, "cudaemu: kernel %s, block (", kernel);
    ck_assert_msg(strstr(r->msg, name), "message does not name '%s': %s", name, r->msg);
    for (const char *const *w = want; *w; w++)
        ck_assert_msg(strstr(r->msg, *w), "message does not say '%s': %s", *w, r->msg);
}

/* The fault is sticky: allocations, copies and launches fail with it until cudaDeviceReset,
 * after which the device works again. d is a buffer allocated before the fault. */
static void expect_sticky_until_reset(int *d)
{
    void *p = nullptr;
    int h[4] = {0, 0, 0, 0};
    ck_assert_int_eq(cudaMalloc(&p, 64), cudaErrorLaunchFailure);
    ck_assert_int_eq(cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost), cudaErrorLaunchFailure);
    ck_assert_int_eq(cudaMemcpy(d, h, sizeof h, cudaMemcpyHostToDevice), cudaErrorLaunchFailure);
    fill_index<<<1, 4>>>(d, 0);
    ck_assert_int_eq(cudaGetLastError(), cudaErrorLaunchFailure);
    ck_assert_int_eq(cudaGetLastError(), cudaErrorLaunchFailure); /* not cleared by reading */
    ck_assert_int_eq(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
    reset_device();
    int *d2 = dev_alloc<int>(64);
    fill_index<<<2, 32>>>(d2, 5);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    int got[64];
    to_host(got, d2, 64);
    for (int i = 0; i < 64; i++)
        ck_assert_int_eq(got[i], 5 + i);
}

/* ---- threads, blocks, barriers, shared memory ---------------------------------------------- */

START_TEST(test_launch_indexes_every_thread_of_a_3d_grid_once)
{
    const dim3 grid(3, 2, 2), block(4, 3, 2);
    const unsigned n_blocks = 12, n_threads = 24, total = n_blocks * n_threads, cap = 2 * total;
    thread_record *d = dev_alloc<thread_record>(cap);
    unsigned *d_n = dev_alloc<unsigned>(1);
    ck_assert_int_eq(cudaMemset(d_n, 0, sizeof *d_n), cudaSuccess);
    record_coordinates<<<grid, block>>>(d, cap, d_n);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    unsigned n = 0;
    to_host(&n, d_n, 1);
    ck_assert_uint_eq(n, total);
    static thread_record rec[2 * 288];
    to_host(rec, d, total);
    static int seen[12][24];
    memset(seen, 0, sizeof seen);
    for (unsigned k = 0; k < total; k++) {
        const thread_record &r = rec[k];
        ck_assert_msg(r.block_dim[0] == 4 && r.block_dim[1] == 3 && r.block_dim[2] == 2,
                      "record %u: blockDim (%u,%u,%u)", k, r.block_dim[0], r.block_dim[1],
                      r.block_dim[2]);
        ck_assert_msg(r.grid_dim[0] == 3 && r.grid_dim[1] == 2 && r.grid_dim[2] == 2,
                      "record %u: gridDim (%u,%u,%u)", k, r.grid_dim[0], r.grid_dim[1],
                      r.grid_dim[2]);
        ck_assert_msg(r.block[0] < 3 && r.block[1] < 2 && r.block[2] < 2 && r.thread[0] < 4 &&
                          r.thread[1] < 3 && r.thread[2] < 2,
                      "record %u: block (%u,%u,%u) thread (%u,%u,%u) out of range", k,
                      r.block[0], r.block[1], r.block[2], r.thread[0], r.thread[1], r.thread[2]);
        const unsigned linear = r.thread[0] + 4 * (r.thread[1] + 3 * r.thread[2]);
        ck_assert_msg(r.via_lane == linear,
                      "thread (%u,%u,%u), linear %u: lane %u holds linear index %u", r.thread[0],
                      r.thread[1], r.thread[2], linear, linear % 32, r.via_lane);
        seen[r.block[0] + 3 * (r.block[1] + 2 * r.block[2])][linear]++;
    }
    for (unsigned b = 0; b < n_blocks; b++)
        for (unsigned t = 0; t < n_threads; t++)
            ck_assert_msg(seen[b][t] == 1, "block %u thread %u seen %d times", b, t, seen[b][t]);
}
END_TEST

START_TEST(test_syncthreads_waits_for_the_whole_block)
{
    /* 96 threads: three warps, so the barrier is crossed between warps too */
    const unsigned n = 96, n_blocks = 4;
    unsigned *d = dev_alloc<unsigned>(n * n_blocks);
    rotate_through_shared<<<n_blocks, n>>>(d, 1);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    unsigned got[96 * 4];
    to_host(got, d, n * n_blocks);
    for (unsigned b = 0; b < n_blocks; b++)
        for (unsigned i = 0; i < n; i++)
            ck_assert_msg(got[b * n + i] == 1000u * b + (i + 1) % n,
                          "block %u thread %u read 0x%08x, want %u", b, i, got[b * n + i],
                          1000u * b + (i + 1) % n);
}
END_TEST

START_TEST(test_shared_is_per_block_and_starts_as_nan_bytes)
{
    const unsigned n = 64, n_blocks = 32, total = n * n_blocks;
    unsigned *first = dev_alloc<unsigned>(total), *neighbour = dev_alloc<unsigned>(total);
    unsigned *dyn_first = dev_alloc<unsigned>(total), *dyn_neighbour = dev_alloc<unsigned>(total);
    shared_first_and_neighbour<<<n_blocks, n, n * sizeof(unsigned)>>>(first, neighbour,
                                                                       dyn_first, dyn_neighbour);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    static unsigned h_first[2048], h_neighbour[2048], h_dyn_first[2048], h_dyn_neighbour[2048];
    to_host(h_first, first, total);
    to_host(h_neighbour, neighbour, total);
    to_host(h_dyn_first, dyn_first, total);
    to_host(h_dyn_neighbour, dyn_neighbour, total);
    for (unsigned b = 0; b < n_blocks; b++)
        for (unsigned i = 0; i < n; i++) {
            unsigned at = b * n + i, want = 1000u * b + (i + 1) % n;
            ck_assert_msg(h_first[at] == POISON_U32,
                          "block %u thread %u: static __shared__ before any write held 0x%08x",
                          b, i, h_first[at]);
            ck_assert_msg(h_dyn_first[at] == POISON_U32,
                          "block %u thread %u: extern __shared__ before any write held 0x%08x",
                          b, i, h_dyn_first[at]);
            ck_assert_msg(h_neighbour[at] == want,
                          "block %u thread %u: static neighbour %u, want %u", b, i,
                          h_neighbour[at], want);
            ck_assert_msg(h_dyn_neighbour[at] == want + 500000u,
                          "block %u thread %u: dynamic neighbour %u, want %u", b, i,
                          h_dyn_neighbour[at], want + 500000u);
        }
}
END_TEST

/* Each block finds all of the launch's dynamic shared bytes set to 0xff, though the block
 * before it (on the same OS thread) overwrote them: at an odd size and at the 48 KiB limit. */
START_TEST(test_shared_dynamic_is_the_launch_size_and_fresh_per_block)
{
    const unsigned sizes[] = {1000, 48u << 10, 4};
    const unsigned n_blocks = 8;
    unsigned *d = dev_alloc<unsigned>(n_blocks);
    for (unsigned k = 0; k < 3; k++) {
        ck_assert_int_eq(cudaMemset(d, 0, n_blocks * sizeof *d), cudaSuccess);
        count_dynamic_poison<<<n_blocks, 128, sizes[k]>>>(d, sizes[k]);
        ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
        unsigned got[8];
        to_host(got, d, n_blocks);
        for (unsigned b = 0; b < n_blocks; b++)
            ck_assert_msg(got[b] == sizes[k], "%u bytes: block %u found %u bytes of 0xff",
                          sizes[k], b, got[b]);
    }
}
END_TEST

/* __shared__ unsigned a[32], b[32]; declares two arrays; both start as NaN bytes in every
 * block, as a lone declaration does. */
START_TEST(test_shared_every_declarator_starts_as_nan_bytes)
{
    const unsigned n_blocks = 4;
    unsigned *d = dev_alloc<unsigned>(2 * 32 * n_blocks);
    shared_two_declarators<<<n_blocks, 32>>>(d);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    unsigned got[2 * 32 * 4];
    to_host(got, d, 2 * 32 * n_blocks);
    for (unsigned k = 0; k < 2 * 32 * n_blocks; k++)
        ck_assert_msg(got[k] == POISON_U32, "block %u lane %u: %s[] before any write held 0x%08x",
                      k / 64, k / 2 % 32, k % 2 ? "b" : "a", got[k]);
}
END_TEST

/* ---- warps ---------------------------------------------------------------------------------- */

/* The lane whose value a shuffle returns, from the Programming Guide's definitions: the
 * warp splits into segments of width lanes; __shfl_sync reads lane param modulo width of the
 * caller's segment; up and down read delta lanes lower or higher and return the caller's own
 * value when that leaves the segment; xor reads lane ^ param, may reach earlier segments,
 * and returns the caller's own value when it would reach a later one. */
static int shfl_source(int mode, int lane, int param, int width)
{
    const int seg = lane / width * width, rel = lane % width;
    switch (mode) {
    case SHFL_IDX: return seg + ((param % width) + width) % width;
    case SHFL_UP: return rel >= param ? lane - param : lane;
    case SHFL_DOWN: return rel + param < width ? lane + param : lane;
    default: {
        int src = lane ^ param;
        return src / width > lane / width ? lane : src;
    }
    }
}

START_TEST(test_shfl_matches_the_programming_guide)
{
    const int n = 64; /* two warps: a lane's segment is within its own warp */
    int *di = dev_alloc<int>(n);
    float *df = dev_alloc<float>(n);
    double *dd = dev_alloc<double>(n);
    const int widths[] = {2, 4, 8, 16, 32};
    const int idx_params[] = {0, 1, 5, 13, 31, 33};
    const int shift_params[] = {0, 1, 3, 7, 16};
    const int xor_params[] = {1, 2, 3, 4, 8, 12, 16, 31};
    int n_cases = 0;
    for (int mode = SHFL_IDX; mode <= SHFL_XOR; mode++) {
        const int *params = mode == SHFL_IDX   ? idx_params
                            : mode == SHFL_XOR ? xor_params
                                               : shift_params;
        const int n_params = mode == SHFL_IDX ? 6 : mode == SHFL_XOR ? 8 : 5;
        for (int w = 0; w < 5; w++)
            for (int p = 0; p < n_params; p++) {
                const int width = widths[w], param = params[p];
                shuffle<<<1, n>>>(mode, param, width, di, df, dd);
                ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
                int gi[64];
                float gf[64];
                double gd[64];
                to_host(gi, di, n);
                to_host(gf, df, n);
                to_host(gd, dd, n);
                for (int t = 0; t < n; t++) {
                    const int src = t / 32 * 32 + shfl_source(mode, t % 32, param, width);
                    const int wi = src * 7 + 3;
                    const float wf = (float)src * 0.5f + 0.25f;
                    const double wd = (double)src * 1.5 + 1e10;
                    ck_assert_msg(gi[t] == wi && f32_bits(gf[t]) == f32_bits(wf) && gd[t] == wd,
                                  "%s(param %d, width %d), thread %d: got %d / %g / %.1f, want "
                                  "thread %d's %d / %g / %.1f",
                                  shfl_names[mode], param, width, t, gi[t], (double)gf[t], gd[t],
                                  src, wi, (double)wf, wd);
                }
                n_cases++;
            }
    }
    ck_assert_int_eq(n_cases, 5 * (6 + 5 + 5 + 8));
}
END_TEST

/* Warps are made of consecutive linear thread indices, x fastest (Programming Guide, Thread
 * Hierarchy): in an 8 x 8 block, threads (0..7, 4..7) form the second warp. */
START_TEST(test_shfl_lanes_follow_the_linear_thread_index)
{
    unsigned *d = dev_alloc<unsigned>(64);
    broadcast_linear_index<<<1, dim3(8, 8)>>>(d);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    unsigned got[64];
    to_host(got, d, 64);
    for (unsigned t = 0; t < 64; t++)
        ck_assert_msg(got[t] == t / 32 * 32, "linear thread %u got %u from its lane 0", t, got[t]);
}
END_TEST

START_TEST(test_vote_ballot_any_all)
{
    vote_result *d = dev_alloc<vote_result>(64);
    votes<<<1, 64>>>(d);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    vote_result got[64];
    to_host(got, d, 64);
    for (unsigned t = 0; t < 64; t++) {
        const unsigned warp = t / 32;
        unsigned want_ballot = 0;
        for (unsigned lane = 0; lane < 32; lane++)
            if ((warp * 32 + lane) % 3 == 0)
                want_ballot |= 1u << lane;
        ck_assert_msg(got[t].ballot == want_ballot, "thread %u: ballot 0x%08x, want 0x%08x", t,
                      got[t].ballot, want_ballot);
        ck_assert_int_eq(got[t].any_t40, warp == 1);     /* thread 40 is in warp 1 */
        ck_assert_int_eq(got[t].any_none, 0);
        ck_assert_int_eq(got[t].all_t_not_5, warp == 1); /* thread 5 is in warp 0 */
        ck_assert_int_eq(got[t].all_every, 1);
    }

    unsigned *ballot = dev_alloc<unsigned>(32);
    int *all = dev_alloc<int>(32);
    votes_low_half<<<1, 32>>>(ballot, all);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    unsigned gb[32];
    int ga[32];
    to_host(gb, ballot, 32);
    to_host(ga, all, 32);
    for (unsigned lane = 0; lane < 32; lane++) {
        const unsigned want = lane < 16 ? 0x0000ffffu : FULL_MASK;
        ck_assert_msg(gb[lane] == want, "lane %u: ballot 0x%08x, want 0x%08x", lane, gb[lane],
                      want);
        ck_assert_msg(ga[lane] == 1, "lane %u: __all_sync over its own mask gave 0", lane);
    }
}
END_TEST

/* Blocks of 32, 40 and 100 threads: the last warp has 32, 8 and 4 lanes, and its mask names
 * only those; every lane ends with the exact total of its warp. */
START_TEST(test_warp_xor_butterfly_sums_exactly_in_partial_warps)
{
    const unsigned sizes[] = {32, 40, 100};
    float *in = dev_alloc<float>(128), *sum_f = dev_alloc<float>(128);
    int *sum_i = dev_alloc<int>(128), *all = dev_alloc<int>(128), *any = dev_alloc<int>(128);
    unsigned *ballot = dev_alloc<unsigned>(128);
    float h_in[128];
    for (unsigned t = 0; t < 128; t++)
        h_in[t] = (float)(t % 7) * 0.25f - 0.5f; /* quarters: every partial sum is exact */
    to_dev(in, h_in, 128);
    for (unsigned k = 0; k < 3; k++) {
        const unsigned n = sizes[k];
        warp_reduce<<<1, n>>>(in, sum_f, sum_i, ballot, all, any);
        ck_assert_msg(cudaGetLastError() == cudaSuccess, "block of %u threads", n);
        float gf[128];
        int gi[128], ga[128], gany[128];
        unsigned gb[128];
        to_host(gf, sum_f, n);
        to_host(gi, sum_i, n);
        to_host(ga, all, n);
        to_host(gany, any, n);
        to_host(gb, ballot, n);
        for (unsigned t = 0; t < n; t++) {
            const unsigned first = t / 32 * 32, n_lanes = n - first < 32 ? n - first : 32;
            double want_f = 0;
            int want_i = 0;
            unsigned want_b = 0;
            for (unsigned l = 0; l < n_lanes; l++) {
                want_f += h_in[first + l];
                want_i += (int)(first + l) + 1;
                want_b |= (l & 1u) << l;
            }
            ck_assert_msg(gf[t] == (float)want_f && gi[t] == want_i,
                          "block %u, thread %u: sums %g / %d, want %g / %d", n, t, (double)gf[t],
                          gi[t], want_f, want_i);
            ck_assert_msg(gb[t] == want_b, "block %u, thread %u: ballot 0x%08x, want 0x%08x", n,
                          t, gb[t], want_b);
            ck_assert_int_eq(ga[t], 1);
            ck_assert_int_eq(gany[t], 1);
        }
    }
}
END_TEST

/* Lanes in disjoint groups, each group calling with its own mask, are well defined: every
 * thread a mask names calls with that same mask. Contiguous halves (a 16-lane tile, two
 * shuffles in a row) and interleaved groups (even and odd lanes). */
START_TEST(test_warp_disjoint_masks_run_as_separate_groups)
{
    int *d = dev_alloc<int>(64);
    half_warp_sums<<<1, 64>>>(d);
    cudaError_t e = cudaGetLastError();
    ck_assert_msg(e == cudaSuccess && cudaDeviceSynchronize() == cudaSuccess,
                  "half-warp groups with masks 0x0000ffff and 0xffff0000: %s (the cudaemu "
                  "message is above)",
                  cudaGetErrorName(e ? e : cudaDeviceSynchronize()));
    int got[64];
    to_host(got, d, 64);
    for (int t = 0; t < 64; t++) {
        const int first = t / 16 * 16, want = 16 * first + 120; /* first + ... + first + 15 */
        ck_assert_msg(got[t] == want, "half-warp sum at thread %d: %d, want %d", t, got[t], want);
    }

    even_odd_sums<<<1, 32>>>(d);
    e = cudaGetLastError();
    ck_assert_msg(e == cudaSuccess && cudaDeviceSynchronize() == cudaSuccess,
                  "even and odd lanes with masks 0x55555555 and 0xaaaaaaaa: %s (the cudaemu "
                  "message is above)",
                  cudaGetErrorName(e ? e : cudaDeviceSynchronize()));
    to_host(got, d, 32);
    for (int t = 0; t < 32; t++) {
        /* xor by 16, 8, 4, 2 keeps bit 0: lanes with t's parity, 0 + 2 + ... + 30 (+ 16) */
        const int want = t & 1 ? 256 : 240;
        ck_assert_msg(got[t] == want, "even/odd sum at lane %d: %d, want %d", t, got[t], want);
    }
}
END_TEST

/* A lane that has not yet read what a full-mask shuffle returned must still get it when the
 * other half of its warp has gone on to two more shuffles of its own. Both halves, so that
 * the forward and the reverse order each have a case where the reader comes last. */
START_TEST(test_shfl_result_survives_later_subset_mask_operations)
{
    int *d = dev_alloc<int>(64);
    for (int low = 1; low >= 0; low--) {
        ck_assert_int_eq(cudaMemset(d, 0xff, 64 * sizeof(int)), cudaSuccess);
        full_then_half_shuffles<<<1, 32>>>(d, low);
        ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
        int got[64];
        to_host(got, d, 64);
        const int src = low ? 15 : 16;
        for (int lane = 0; lane < 32; lane++) {
            ck_assert_msg(got[lane] == src + 100,
                          "%s half goes on: lane %d read %d from lane %d, want %d",
                          low ? "low" : "high", lane, got[lane], src, src + 100);
            if ((lane < 16) == (low != 0)) {
                /* x1 = partner^1's lane + 1000; x2 = x1 of partner^2 + 2000 */
                const int want = ((lane ^ 2) ^ 1) + 1000 + 2000;
                ck_assert_msg(got[32 + lane] == want, "lane %d: half shuffles gave %d, want %d",
                              lane, got[32 + lane], want);
            }
        }
    }
}
END_TEST

/* __syncwarp orders shared memory between the lanes it names: each lane then reads the slot
 * the next named lane wrote. Full mask, and the even lanes alone (the odd ones returned). */
START_TEST(test_syncwarp_orders_shared_memory_within_a_warp)
{
    const unsigned masks[] = {FULL_MASK, 0x55555555u};
    unsigned *d = dev_alloc<unsigned>(64);
    for (unsigned mask : masks) {
        ck_assert_int_eq(cudaMemset(d, 0, 64 * sizeof(unsigned)), cudaSuccess);
        rotate_within_warp<<<1, 64>>>(d, 1, mask);
        ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
        unsigned got[64];
        to_host(got, d, 64);
        for (unsigned t = 0; t < 64; t++) {
            const unsigned lane = t % 32;
            if (!(mask >> lane & 1u)) {
                ck_assert_uint_eq(got[t], 0u);
                continue;
            }
            unsigned next = lane + 1;
            while (!(mask >> (next % 32) & 1u))
                next++;
            const unsigned want = 100u * (t - lane + next % 32) + 7u;
            ck_assert_msg(got[t] == want, "mask 0x%08x, thread %u: read %u, want %u", mask, t,
                          got[t], want);
        }
    }
}
END_TEST

START_TEST(test_atomics_return_the_old_value)
{
    unsigned *w = dev_alloc<unsigned>(4);
    float *f = dev_alloc<float>(1);
    atomic_results *r = dev_alloc<atomic_results>(1);
    const unsigned init[4] = {10, 7, 4, 6};
    const float finit = 1.5f;
    to_dev(w, init, 4);
    to_dev(f, &finit, 1);
    atomic_semantics<<<1, 1>>>(w, f, r);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    atomic_results h;
    to_host(&h, r, 1);
    ck_assert_uint_eq(h.add_old, 10);
    ck_assert_uint_eq(h.max_old, 7);
    ck_assert_uint_eq(h.max_kept, 7);
    ck_assert_uint_eq(h.cas_hit_old, 4);
    ck_assert_uint_eq(h.cas_miss_old, 8);
    ck_assert_uint_eq(h.cas_final, 8);
    ck_assert_uint_eq(h.exch_old, 6);
    ck_assert_uint_eq(h.exch_final, 12);
    ck_assert(h.fadd_old == 1.5f && h.fadd_final == 1.75f);
    unsigned hw[4];
    to_host(hw, w, 4);
    ck_assert_uint_eq(hw[0], 15);
    ck_assert_uint_eq(hw[1], 9);

    /* 64 blocks of 256 threads, on however many OS threads run blocks: no update lost */
    unsigned *count = dev_alloc<unsigned>(2);
    float *fsum = dev_alloc<float>(1);
    ck_assert_int_eq(cudaMemset(count, 0, 2 * sizeof(unsigned)), cudaSuccess);
    ck_assert_int_eq(cudaMemset(fsum, 0, sizeof(float)), cudaSuccess);
    atomic_counts<<<64, 256>>>(count, fsum, count + 1);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    unsigned hc[2];
    float hf = 0;
    to_host(hc, count, 2);
    to_host(&hf, fsum, 1);
    ck_assert_uint_eq(hc[0], 64 * 256);
    ck_assert_uint_eq(hc[1], 64 * 256 - 1);
    ck_assert(hf == 16384.0f);
}
END_TEST

/* ---- faults ------------------------------------------------------------------------------- */

/* The first thread and the last one in turn: whichever order the threads run in, one case
 * has the quitter return before the others reach the barrier (reported at the barrier) and
 * one after they wait there (reported at the return). */
START_TEST(test_fault_return_before_syncthreads)
{
    const struct {
        unsigned quitter;
        const char *forward, *reverse;
    } cases[] = {
        {0, "thread (1,0,0) reached __syncthreads after 1 threads of its block returned",
         "thread (0,0,0) returned while 63 threads of its block wait at __syncthreads"},
        {63, "thread (63,0,0) returned while 63 threads of its block wait at __syncthreads",
         "thread (62,0,0) reached __syncthreads after 1 threads of its block returned"},
    };
    for (const auto &c : cases) {
        int *d = dev_alloc<int>(64);
        fault_run r;
        run_faulting([&] { return_before_syncthreads<<<1, 64>>>(d, c.quitter); }, &r);
        const char *const want[] = {emu_reverse() ? c.reverse : c.forward, nullptr};
        expect_fault(&r, "return_before_syncthreads", want);
        expect_sticky_until_reset(d);
    }
}
END_TEST

/* Each half in turn returns: whichever order the lanes run in, one case has lanes return
 * while the others wait and one has lanes call after the others returned. */
START_TEST(test_fault_shuffle_after_lanes_returned)
{
    const struct {
        int low_half_returns;
        const char *forward, *reverse;
    } cases[] = {
        {0,
         "lane 16 of warp 0 returned while lanes 0x0000ffff wait for it at __shfl_sync with "
         "mask 0xffffffff",
         "__shfl_sync with mask 0xffffffff in warp 0, lane 15: lanes 0xffff0000 named in the "
         "mask have returned"},
        {1,
         "__shfl_sync with mask 0xffffffff in warp 0, lane 16: lanes 0x0000ffff named in the "
         "mask have returned",
         "lane 15 of warp 0 returned while lanes 0xffff0000 wait for it at __shfl_sync with "
         "mask 0xffffffff"},
    };
    for (const auto &c : cases) {
        int *d = dev_alloc<int>(32);
        fault_run r;
        run_faulting([&] { shuffle_after_lanes_returned<<<1, 32>>>(d, c.low_half_returns); },
                     &r);
        const char *const want[] = {emu_reverse() ? c.reverse : c.forward, nullptr};
        expect_fault(&r, "shuffle_after_lanes_returned", want);
        expect_sticky_until_reset(d);
    }
}
END_TEST

START_TEST(test_fault_barrier_against_shuffle_deadlocks)
{
    int *d = dev_alloc<int>(32);
    fault_run r;
    run_faulting([&] { barrier_against_shuffle<<<1, 32>>>(d); }, &r);
    const char *const want[] = {"lanes 0xffff0000 of warp 0 wait at __shfl_sync with mask "
                                "0xffffffff; lanes 0x0000ffff never arrive",
                                "__syncthreads", nullptr};
    expect_fault(&r, "barrier_against_shuffle", want);
    expect_sticky_until_reset(d);
}
END_TEST

START_TEST(test_fault_lanes_with_different_masks)
{
    int *d = dev_alloc<int>(32);
    fault_run r;
    run_faulting([&] { shuffle_with_different_masks<<<1, 32>>>(d); }, &r);
    const char *const want[] = {"__shfl_xor_sync", "0xfffffffe", "0xffffffff", nullptr};
    expect_fault(&r, "shuffle_with_different_masks", want);
    expect_sticky_until_reset(d);
}
END_TEST

START_TEST(test_fault_mask_names_missing_lanes)
{
    int *d = dev_alloc<int>(40);
    fault_run r;
    run_faulting([&] { full_mask_in_partial_warp<<<1, 40>>>(d); }, &r);
    const char *const want[] = {"__shfl_xor_sync", "0xffffff00", "40 threads", nullptr};
    expect_fault(&r, "full_mask_in_partial_warp", want);
    expect_sticky_until_reset(d);
}
END_TEST

START_TEST(test_fault_read_outside_mask)
{
    int *d = dev_alloc<int>(32);
    fault_run r;
    run_faulting([&] { shuffle_reads_outside_mask<<<1, 32>>>(d); }, &r);
    const char *const want[] = {"__shfl_sync", "0x0000ffff", "lane 20", "not in the mask",
                                nullptr};
    expect_fault(&r, "shuffle_reads_outside_mask", want);
    expect_sticky_until_reset(d);
}
END_TEST

/* ---- launch configuration ------------------------------------------------------------------ */

START_TEST(test_launch_config_errors_are_not_sticky)
{
    struct bad_config {
        dim3 grid, block;
        size_t shared;
        cudaError_t want;
        const char *what;
    };
    const bad_config bad[] = {
        {dim3(1), dim3(1025), 0, cudaErrorInvalidConfiguration, "block of 1025 threads"},
        {dim3(1), dim3(32, 33), 0, cudaErrorInvalidConfiguration, "block 32 x 33 = 1056"},
        {dim3(1), dim3(5, 205), 0, cudaErrorInvalidConfiguration, "block 5 x 205 = 1025"},
        {dim3(1), dim3(1, 1, 65), 0, cudaErrorInvalidConfiguration, "block.z 65"},
        {dim3(1), dim3(0), 0, cudaErrorInvalidConfiguration, "block.x 0"},
        {dim3(1, 65536), dim3(1), 0, cudaErrorInvalidConfiguration, "grid.y 65536"},
        {dim3(1, 1, 65536), dim3(1), 0, cudaErrorInvalidConfiguration, "grid.z 65536"},
        {dim3(0), dim3(32), 0, cudaErrorInvalidConfiguration, "grid.x 0"},
        {dim3(1), dim3(32), (48u << 10) + 1, cudaErrorInvalidValue, "48 KiB + 1 shared"},
    };
    int *d = dev_alloc<int>(2048);
    int got[64];
    for (const bad_config &c : bad) {
        ck_assert_int_eq(cudaMemset(d, 0xff, 2048 * sizeof(int)), cudaSuccess);
        fill_index<<<c.grid, c.block, c.shared>>>(d, 7);
        cudaError_t e = cudaGetLastError();
        ck_assert_msg(e == c.want, "%s: %s, want %s", c.what, cudaGetErrorName(e),
                      cudaGetErrorName(c.want));
        ck_assert_msg(cudaGetLastError() == cudaSuccess, "%s: cudaGetLastError did not clear it",
                      c.what);
        ck_assert_msg(cudaDeviceSynchronize() == cudaSuccess, "%s: sticky", c.what);
        to_host(got, d, 1);
        ck_assert_msg(got[0] == -1, "%s: the kernel ran", c.what);
        /* a valid launch right after works */
        fill_index<<<2, 32>>>(d, 7);
        ck_assert_msg(cudaGetLastError() == cudaSuccess, "%s: the next launch failed", c.what);
        to_host(got, d, 64);
        for (int i = 0; i < 64; i++)
            ck_assert_int_eq(got[i], 7 + i);
    }
}
END_TEST

START_TEST(test_launch_config_limits_work)
{
    int *d = dev_alloc<int>(1024);
    int got[1024];
    fill_index<<<1, 1024>>>(d, 3);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    to_host(got, d, 1024);
    for (int i = 0; i < 1024; i++)
        ck_assert_int_eq(got[i], 3 + i);

    unsigned *n = dev_alloc<unsigned>(1);
    const struct {
        dim3 grid, block;
        unsigned blocks;
    } ok[] = {{dim3(1, 65535), dim3(1), 65535},
              {dim3(2, 1, 3), dim3(1, 1, 64), 6},
              {dim3(1), dim3(32, 32), 1},
              {dim3(1), dim3(1, 1024), 1}};
    for (const auto &c : ok) {
        ck_assert_int_eq(cudaMemset(n, 0, sizeof *n), cudaSuccess);
        count_blocks<<<c.grid, c.block>>>(n);
        ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
        unsigned got_n = 0;
        to_host(&got_n, n, 1);
        ck_assert_uint_eq(got_n, c.blocks);
    }

    /* 48 KiB of dynamic shared memory exactly: accepted, and all of it there */
    unsigned *poisoned = dev_alloc<unsigned>(1);
    ck_assert_int_eq(cudaMemset(poisoned, 0, sizeof *poisoned), cudaSuccess);
    count_dynamic_poison<<<1, 256, 48u << 10>>>(poisoned, 48u << 10);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    unsigned got_p = 0;
    to_host(&got_p, poisoned, 1);
    ck_assert_uint_eq(got_p, 48u << 10);
}
END_TEST

/* ---- memory ------------------------------------------------------------------------------- */

START_TEST(test_malloc_fills_with_0xff_and_aligns_to_256)
{
    const size_t sizes[] = {1, 3, 255, 256, 4097};
    unsigned char h[4097];
    for (size_t k = 0; k < 5; k++) {
        unsigned char *d = dev_alloc<unsigned char>(sizes[k]);
        ck_assert_msg((uintptr_t)d % 256 == 0, "cudaMalloc(%zu) = %p", sizes[k], (void *)d);
        to_host(h, d, sizes[k]);
        for (size_t i = 0; i < sizes[k]; i++)
            ck_assert_msg(h[i] == 0xff, "cudaMalloc(%zu): byte %zu is 0x%02x", sizes[k], i, h[i]);
    }
    /* and a float read from it is NaN */
    float *f = dev_alloc<float>(1);
    float hf = 0;
    to_host(&hf, f, 1);
    ck_assert(std::isnan(hf));
}
END_TEST

START_TEST(test_memgetinfo_counts_every_byte)
{
    size_t free0 = 0, total = 0, free1 = 0, total1 = 0;
    ck_assert_int_eq(cudaMemGetInfo(&free0, &total), cudaSuccess);
    ck_assert_uint_eq(total, emu_mem_total());
    ck_assert_uint_le(free0, total);
    void *a = nullptr, *b = nullptr;
    ck_assert_int_eq(cudaMalloc(&a, 12345), cudaSuccess);
    ck_assert_int_eq(cudaMemGetInfo(&free1, &total1), cudaSuccess);
    ck_assert_uint_eq(free1, free0 - 12345);
    ck_assert_uint_eq(total1, total);
    ck_assert_int_eq(cudaMalloc(&b, 1), cudaSuccess);
    ck_assert_int_eq(cudaMemGetInfo(&free1, &total1), cudaSuccess);
    ck_assert_uint_eq(free1, free0 - 12346);
    ck_assert_int_eq(cudaFree(a), cudaSuccess);
    ck_assert_int_eq(cudaFree(b), cudaSuccess);
    ck_assert_int_eq(cudaMemGetInfo(&free1, &total1), cudaSuccess);
    ck_assert_uint_eq(free1, free0);
    ck_assert_int_eq(cudaMemGetInfo(nullptr, &total1), cudaErrorInvalidValue);
    cudaGetLastError();
}
END_TEST

/* More than is free fails with cudaErrorMemoryAllocation, reported once by cudaGetLastError
 * and not sticky. Where the device is small (CUDAEMU_MEM=64M in the child), exactly what is
 * free can be had, and then not one byte more. */
START_TEST(test_malloc_over_the_limit_fails_and_is_not_sticky)
{
    size_t free0 = 0, total = 0;
    ck_assert_int_eq(cudaMemGetInfo(&free0, &total), cudaSuccess);
    void *p = nullptr;
    ck_assert_int_eq(cudaMalloc(&p, free0 + 1), cudaErrorMemoryAllocation);
    ck_assert_int_eq(cudaGetLastError(), cudaErrorMemoryAllocation);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    int *d = dev_alloc<int>(64);
    fill_index<<<1, 64>>>(d, 1);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    int got[64];
    to_host(got, d, 64);
    ck_assert_int_eq(got[63], 64);
    if (total <= (256u << 20)) {
        size_t free1 = 0;
        ck_assert_int_eq(cudaMemGetInfo(&free1, &total), cudaSuccess);
        void *all = nullptr, *one = nullptr;
        ck_assert_int_eq(cudaMalloc(&all, free1), cudaSuccess);
        ck_assert_int_eq(cudaMalloc(&one, 1), cudaErrorMemoryAllocation);
        cudaGetLastError();
        ck_assert_int_eq(cudaFree(all), cudaSuccess);
        ck_assert_int_eq(cudaMalloc(&one, 1), cudaSuccess);
        ck_assert_int_eq(cudaFree(one), cudaSuccess);
    }
}
END_TEST

START_TEST(test_free_refuses_non_allocations)
{
    static int host[64];
    int *d = dev_alloc<int>(64);
    ck_assert_int_eq(cudaFree(host), cudaErrorInvalidValue);
    ck_assert_int_eq(cudaFree(d + 4), cudaErrorInvalidValue); /* inside, not the start */
    ck_assert_int_eq(cudaFree(nullptr), cudaSuccess);
    ck_assert_int_eq(cudaGetLastError(), cudaErrorInvalidValue);
    void *once = nullptr;
    ck_assert_int_eq(cudaMalloc(&once, 32), cudaSuccess);
    ck_assert_int_eq(cudaFree(once), cudaSuccess);
    ck_assert_int_eq(cudaFree(once), cudaErrorInvalidValue);
    cudaGetLastError();
    /* not sticky: d still works */
    fill_index<<<1, 64>>>(d, 0);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    int got[64];
    to_host(got, d, 64);
    ck_assert_int_eq(got[10], 10);
}
END_TEST

START_TEST(test_memcpy_checks_both_sides_against_the_kind)
{
    int *d = dev_alloc<int>(4), *d2 = dev_alloc<int>(4);
    int h[5] = {1, 2, 3, 4, 5}, h2[5] = {9, 9, 9, 9, 9};
    const struct {
        void *dst;
        const void *src;
        size_t n_bytes;
        cudaMemcpyKind kind;
        cudaError_t want;
        const char *what;
    } bad[] = {
        {h2, h, 16, cudaMemcpyHostToDevice, cudaErrorInvalidValue, "H2D to a host pointer"},
        {d, d2, 16, cudaMemcpyHostToDevice, cudaErrorInvalidValue, "H2D from device memory"},
        {d, h, 20, cudaMemcpyHostToDevice, cudaErrorInvalidValue, "H2D past the end"},
        {h2, h, 16, cudaMemcpyDeviceToHost, cudaErrorInvalidValue, "D2H from a host pointer"},
        {d2, d, 16, cudaMemcpyDeviceToHost, cudaErrorInvalidValue, "D2H to device memory"},
        {h2, d, 20, cudaMemcpyDeviceToHost, cudaErrorInvalidValue, "D2H past the end"},
        {d2, h, 16, cudaMemcpyDeviceToDevice, cudaErrorInvalidValue, "D2D from host"},
        {d2 + 1, d, 16, cudaMemcpyDeviceToDevice, cudaErrorInvalidValue, "D2D past the end"},
        {h2, d, 16, cudaMemcpyHostToHost, cudaErrorInvalidValue, "H2H from device memory"},
        {d, h, 16, (cudaMemcpyKind)7, cudaErrorInvalidMemcpyDirection, "kind 7"},
    };
    ck_assert_int_eq(cudaMemset(d, 0, 16), cudaSuccess);
    ck_assert_int_eq(cudaMemset(d2, 0, 16), cudaSuccess);
    for (const auto &c : bad) {
        cudaError_t e = cudaMemcpy(c.dst, c.src, c.n_bytes, c.kind);
        ck_assert_msg(e == c.want, "cudaMemcpy %s: %s", c.what, cudaGetErrorName(e));
        e = cudaMemcpyAsync(c.dst, c.src, c.n_bytes, c.kind, 0);
        ck_assert_msg(e == c.want, "cudaMemcpyAsync %s: %s", c.what, cudaGetErrorName(e));
        ck_assert_int_eq(cudaGetLastError(), c.want);
        ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess); /* not sticky */
    }
    /* nothing was copied */
    int got[4];
    to_host(got, d, 4);
    to_host(h2, d2, 4);
    for (int i = 0; i < 4; i++)
        ck_assert_msg(got[i] == 0 && h2[i] == 0, "element %d changed by a refused copy", i);
    ck_assert_int_eq(h2[4], 9);
    /* and the right kinds work, cudaMemcpyDefault included */
    ck_assert_int_eq(cudaMemcpy(d, h, 16, cudaMemcpyDefault), cudaSuccess);
    ck_assert_int_eq(cudaMemcpy(d2, d, 16, cudaMemcpyDeviceToDevice), cudaSuccess);
    ck_assert_int_eq(cudaMemcpy(h2, d2, 16, cudaMemcpyDefault), cudaSuccess);
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(h2[i], i + 1);
}
END_TEST

START_TEST(test_host_register_refuses_twice_and_unregistered)
{
    char *h = host_alloc<char>(8192, false);
    ck_assert_int_eq(cudaHostRegister(h, 8192, cudaHostRegisterDefault), cudaSuccess);
    ck_assert_int_eq(cudaHostRegister(h, 8192, cudaHostRegisterDefault),
                     cudaErrorHostMemoryAlreadyRegistered);
    ck_assert_int_eq(cudaHostRegister(h + 4096, 100, cudaHostRegisterDefault),
                     cudaErrorHostMemoryAlreadyRegistered); /* overlapping */
    ck_assert_int_eq(cudaGetLastError(), cudaErrorHostMemoryAlreadyRegistered);
    ck_assert_int_eq(cudaHostUnregister(h + 4096), cudaErrorHostMemoryNotRegistered);
    ck_assert_int_eq(cudaHostUnregister(h), cudaSuccess);
    ck_assert_int_eq(cudaHostUnregister(h), cudaErrorHostMemoryNotRegistered);
    static char never[64];
    ck_assert_int_eq(cudaHostUnregister(never), cudaErrorHostMemoryNotRegistered);
    ck_assert_int_eq(cudaGetLastError(), cudaErrorHostMemoryNotRegistered);
    /* registered again after unregistering: fine */
    ck_assert_int_eq(cudaHostRegister(h, 8192, cudaHostRegisterDefault), cudaSuccess);
    ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);
}
END_TEST

/* ---- the device and errors --------------------------------------------------------------- */

START_TEST(test_device_count_and_properties)
{
    int n = -1, dev = -1, v = -1;
    ck_assert_int_eq(cudaGetDeviceCount(&n), cudaSuccess);
    ck_assert_int_eq(n, 1);
    ck_assert_int_eq(cudaSetDevice(0), cudaSuccess);
    ck_assert_int_eq(cudaGetDevice(&dev), cudaSuccess);
    ck_assert_int_eq(dev, 0);
    ck_assert_int_eq(cudaSetDevice(1), cudaErrorInvalidDevice);
    ck_assert_int_eq(cudaGetLastError(), cudaErrorInvalidDevice);
    cudaDeviceProp p;
    memset(&p, 0, sizeof p);
    ck_assert_int_eq(cudaGetDeviceProperties(&p, 0), cudaSuccess);
    ck_assert_int_eq(p.major, 9);
    ck_assert_int_eq(p.minor, 0);
    ck_assert_int_eq(p.warpSize, 32);
    ck_assert_int_eq(p.maxThreadsPerBlock, 1024);
    ck_assert_int_eq(p.maxThreadsDim[0], 1024);
    ck_assert_int_eq(p.maxThreadsDim[2], 64);
    ck_assert_int_eq(p.maxGridSize[1], 65535);
    ck_assert_uint_eq(p.sharedMemPerBlock, 48u << 10);
    ck_assert_uint_eq(p.totalGlobalMem, emu_mem_total());
    ck_assert_int_eq(cudaGetDeviceProperties(&p, 1), cudaErrorInvalidDevice);
    ck_assert_int_eq(cudaDeviceGetAttribute(&v, cudaDevAttrWarpSize, 0), cudaSuccess);
    ck_assert_int_eq(v, 32);
    ck_assert_int_eq(cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, 0),
                     cudaSuccess);
    ck_assert_int_eq(v, 9);
    ck_assert_int_eq(cudaDeviceGetAttribute(&v, cudaDevAttrMaxThreadsPerBlock, 0), cudaSuccess);
    ck_assert_int_eq(v, 1024);
    ck_assert_int_eq(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlock, 0),
                     cudaSuccess);
    ck_assert_int_eq(v, 48 << 10);
    cudaGetLastError();
}
END_TEST

START_TEST(test_error_names_and_strings)
{
    ck_assert_int_eq(cudaSuccess, 0);
    ck_assert_int_eq(cudaErrorInvalidValue, 1);
    ck_assert_int_eq(cudaErrorMemoryAllocation, 2);
    ck_assert_int_eq(cudaErrorInvalidConfiguration, 9);
    ck_assert_int_eq(cudaErrorInvalidMemcpyDirection, 21);
    ck_assert_int_eq(cudaErrorNoDevice, 100);
    ck_assert_int_eq(cudaErrorInvalidDevice, 101);
    ck_assert_int_eq(cudaErrorInvalidResourceHandle, 400);
    ck_assert_int_eq(cudaErrorNotReady, 600);
    ck_assert_int_eq(cudaErrorIllegalAddress, 700);
    ck_assert_int_eq(cudaErrorHostMemoryAlreadyRegistered, 712);
    ck_assert_int_eq(cudaErrorHostMemoryNotRegistered, 713);
    ck_assert_int_eq(cudaErrorLaunchFailure, 719);
    ck_assert_str_eq(cudaGetErrorName(cudaSuccess), "cudaSuccess");
    ck_assert_str_eq(cudaGetErrorName(cudaErrorInvalidValue), "cudaErrorInvalidValue");
    ck_assert_str_eq(cudaGetErrorName(cudaErrorMemoryAllocation), "cudaErrorMemoryAllocation");
    ck_assert_str_eq(cudaGetErrorName(cudaErrorInvalidConfiguration),
                     "cudaErrorInvalidConfiguration");
    ck_assert_str_eq(cudaGetErrorName(cudaErrorLaunchFailure), "cudaErrorLaunchFailure");
    ck_assert_str_eq(cudaGetErrorName(cudaErrorNotReady), "cudaErrorNotReady");
    ck_assert_str_eq(cudaGetErrorName(cudaErrorNoDevice), "cudaErrorNoDevice");
    ck_assert_str_eq(cudaGetErrorString(cudaSuccess), "no error");
    ck_assert_str_eq(cudaGetErrorString(cudaErrorInvalidValue), "invalid argument");
    ck_assert_str_eq(cudaGetErrorString(cudaErrorMemoryAllocation), "out of memory");
    ck_assert_str_eq(cudaGetErrorString(cudaErrorInvalidConfiguration),
                     "invalid configuration argument");
    ck_assert_str_eq(cudaGetErrorString(cudaErrorLaunchFailure), "unspecified launch failure");
    ck_assert_str_eq(cudaGetErrorString(cudaErrorNoDevice), "no CUDA-capable device is detected");
    ck_assert_str_eq(cudaGetErrorString(cudaErrorIllegalAddress),
                     "an illegal memory access was encountered");
    ck_assert_ptr_nonnull(cudaGetErrorString((cudaError_t)555)); /* not a code: still a text */
}
END_TEST

/* cudaGetLastError returns a (non-sticky) error once and clears it; cudaPeekAtLastError
 * returns it without clearing; a later success does not clear it. */
START_TEST(test_last_error_cleared_by_get_kept_by_peek)
{
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    ck_assert_int_eq(cudaFree((void *)&g_n_dev), cudaErrorInvalidValue);
    int *d = dev_alloc<int>(4); /* a success in between */
    (void)d;
    ck_assert_int_eq(cudaPeekAtLastError(), cudaErrorInvalidValue);
    ck_assert_int_eq(cudaPeekAtLastError(), cudaErrorInvalidValue);
    ck_assert_int_eq(cudaGetLastError(), cudaErrorInvalidValue);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    ck_assert_int_eq(cudaPeekAtLastError(), cudaSuccess);
}
END_TEST

/* ---- fp16, bf16 and byte permutes --------------------------------------------------------- */

START_TEST(test_half_from_float_hand_picked)
{
    const struct {
        float f;
        uint16_t want;
        const char *what;
    } cases[] = {
        {1.0f, 0x3c00, "1"},
        {-2.0f, 0xc000, "-2"},
        {0.333251953125f, 0x3555, "1/3 in half, exactly"},
        {65504.0f, 0x7bff, "the largest half"},
        {65519.0f, 0x7bff, "below the midpoint to infinity"},
        {65520.0f, 0x7c00, "the midpoint 65520: ties to even, which is infinity"},
        {1e10f, 0x7c00, "overflow"},
        {-1e10f, 0xfc00, "negative overflow"},
        {ldexpf(1.0f, -14), 0x0400, "the smallest normal"},
        {ldexpf(1.0f, -24), 0x0001, "2^-24, the smallest subnormal"},
        {ldexpf(1.0f, -25), 0x0000, "2^-25: halfway to 2^-24, ties to even (0)"},
        {ldexpf(1.0f, -25) * 1.0000001f, 0x0001, "just above 2^-25"},
        {3.0f * ldexpf(1.0f, -26), 0x0001, "3 2^-26 = 0.75 2^-24: rounds up"},
        {3.0f * ldexpf(1.0f, -25), 0x0002, "3 2^-25 = 1.5 2^-24: ties to even (2)"},
        {5.0f * ldexpf(1.0f, -25), 0x0002, "5 2^-25 = 2.5 2^-24: ties to even (2)"},
        {ldexpf(1.0f, -26), 0x0000, "2^-26"},
        {ldexpf(1.0f, -14) - ldexpf(1.0f, -26), 0x0400, "just below the smallest normal: up"},
        {1.0f + ldexpf(1.0f, -11), 0x3c00, "1 + 2^-11: ties to even (1)"},
        {1.0f + 3.0f * ldexpf(1.0f, -11), 0x3c02, "1 + 3 2^-11: ties to even (1 + 2^-9)"},
        {1.0f + ldexpf(1.0f, -11) + ldexpf(1.0f, -20), 0x3c01, "just above a tie"},
        {2047.5f, 0x6800, "tie with a carry into the exponent (2048)"},
        {2046.5f, 0x67fe, "tie to the even 2046"},
        {0.0f, 0x0000, "+0"},
        {-0.0f, 0x8000, "-0"},
        {-ldexpf(1.0f, -24), 0x8001, "-2^-24"},
        {std::numeric_limits<float>::infinity(), 0x7c00, "inf"},
        {-std::numeric_limits<float>::infinity(), 0xfc00, "-inf"},
        {std::numeric_limits<float>::denorm_min(), 0x0000, "a float subnormal"},
    };
    for (const auto &c : cases) {
        const uint16_t got = __half_as_ushort(__float2half_rn(c.f));
        ck_assert_msg(got == c.want, "__float2half_rn(%a) (%s) = 0x%04x, want 0x%04x",
                      (double)c.f, c.what, got, c.want);
        ck_assert_uint_eq(__half_as_ushort(__float2half(c.f)), c.want);
    }
    const float nans[] = {std::numeric_limits<float>::quiet_NaN(), f32_of(0x7f800001u),
                          f32_of(0xffc00000u), f32_of(0x7fbfffffu)};
    for (float f : nans) {
        const uint16_t got = __half_as_ushort(__float2half_rn(f));
        ck_assert_msg((got & 0x7c00) == 0x7c00 && (got & 0x03ff) != 0,
                      "__float2half_rn(NaN 0x%08x) = 0x%04x, not a NaN", f32_bits(f), got);
        ck_assert_uint_eq(got & 0x8000u, f32_bits(f) >> 16 & 0x8000u);
    }
}
END_TEST

START_TEST(test_half_to_float_subnormals_inf_nan)
{
    const struct {
        uint16_t h;
        float want;
    } cases[] = {
        {0x0001, ldexpf(1.0f, -24)},
        {0x0002, ldexpf(1.0f, -23)},
        {0x03ff, 1023.0f * ldexpf(1.0f, -24)},
        {0x0200, ldexpf(1.0f, -15)},
        {0x8001, -ldexpf(1.0f, -24)},
        {0x0400, ldexpf(1.0f, -14)},
        {0x8400, -ldexpf(1.0f, -14)},
        {0x3c00, 1.0f},
        {0x3555, 0.333251953125f},
        {0x7bff, 65504.0f},
        {0xc000, -2.0f},
        {0x7c00, std::numeric_limits<float>::infinity()},
        {0xfc00, -std::numeric_limits<float>::infinity()},
        {0x0000, 0.0f},
    };
    for (const auto &c : cases) {
        const float got = __half2float(__ushort_as_half(c.h));
        ck_assert_msg(f32_bits(got) == f32_bits(c.want), "__half2float(0x%04x) = %a, want %a",
                      c.h, (double)got, (double)c.want);
    }
    ck_assert_uint_eq(f32_bits(__half2float(__ushort_as_half(0x8000))), 0x80000000u);
    const uint16_t nans[] = {0x7e00, 0x7c01, 0xfe00, 0x7fff};
    for (uint16_t h : nans)
        ck_assert_msg(std::isnan(__half2float(__ushort_as_half(h))), "0x%04x is not NaN", h);
}
END_TEST

/* The value of half bits h from the IEEE 754 binary16 layout (sign, 5 exponent bits biased
 * by 15, 10 mantissa bits; exponent 0 subnormal). The exponent 31 is read as if it were a
 * normal one, so half_value(0x7c00) is 65536, the next step above 0x7bff. */
static double half_value(uint32_t h)
{
    const double s = h & 0x8000u ? -1.0 : 1.0;
    const int e = (int)(h >> 10 & 0x1fu), m = (int)(h & 0x3ffu);
    return e == 0 ? s * ldexp(m, -24) : s * ldexp(m + 1024, e - 25);
}

/* Every finite half h and the next one up, h + 1 in bits: h widens to exactly its value; the
 * midpoint (exact in float) rounds to whichever has an even mantissa, a hair above it to
 * h + 1, a hair below to h; h's value converts back to h. Over all 2 x 31744 finite halves,
 * positive and negative. */
START_TEST(test_half_rounds_every_midpoint_to_even)
{
    char first[256] = ""; /* the first mismatch; one assertion at the end keeps this fast */
    int n_bad = 0;
    for (uint32_t h = 0; h < 0x7c00; h++)
        for (uint32_t sign = 0; sign <= 0x8000u; sign += 0x8000u) {
            const uint16_t down = (uint16_t)(sign | h), up = (uint16_t)(sign | (h + 1));
            const uint16_t even = h & 1u ? up : down;
            const double lo = half_value(down), hi = half_value(up);
            const float mid = (float)((lo + hi) / 2);
            const float widened = __half2float(__ushort_as_half(down));
            const uint16_t got_lo = __half_as_ushort(__float2half_rn((float)lo));
            const uint16_t got_mid = __half_as_ushort(__float2half_rn(mid));
            const uint16_t got_above =
                __half_as_ushort(__float2half_rn(std::nextafter(mid, (float)hi)));
            const uint16_t got_below =
                __half_as_ushort(__float2half_rn(std::nextafter(mid, (float)lo)));
            if ((double)mid == (lo + hi) / 2 && f32_bits(widened) == f32_bits((float)lo) &&
                got_lo == down && got_mid == even && got_above == up && got_below == down)
                continue;
            if (n_bad++ == 0)
                snprintf(first, sizeof first,
                         "0x%04x: widened %a (want %a), back 0x%04x; midpoint %a with 0x%04x "
                         "-> 0x%04x (want 0x%04x), above -> 0x%04x, below -> 0x%04x",
                         down, (double)widened, lo, got_lo, (double)mid, up, got_mid, even,
                         got_above, got_below);
        }
    ck_assert_msg(n_bad == 0, "%d halves wrong; first %s", n_bad, first);
}
END_TEST

START_TEST(test_bfloat16_rounds_to_nearest_even_and_keeps_nan)
{
    const struct {
        uint32_t f;
        uint16_t want;
    } cases[] = {
        {0x3f800000u, 0x3f80}, /* 1 */
        {0x3f808000u, 0x3f80}, /* 1 + 2^-8: tie, to the even 1 */
        {0x3f818000u, 0x3f82}, /* tie, to the even 0x3f82 */
        {0x3f808001u, 0x3f81}, /* just above a tie */
        {0x3f80ffffu, 0x3f81},
        {0x3f817fffu, 0x3f81}, /* just below a tie */
        {0xbf818000u, 0xbf82}, /* negative tie */
        {0x7f7f0000u, 0x7f7f}, /* the largest bf16 */
        {0x7f7f8000u, 0x7f80}, /* tie above it: even is infinity */
        {0x7f7fffffu, 0x7f80}, /* FLT_MAX overflows */
        {0x7f800000u, 0x7f80}, /* inf */
        {0xff800000u, 0xff80}, /* -inf */
        {0x80000000u, 0x8000}, /* -0 */
        {0x00008000u, 0x0000}, /* float subnormal tie: to 0 */
        {0x00018000u, 0x0002}, /* float subnormal tie: to 2 */
        {0x00010000u, 0x0001}, /* the smallest bf16 subnormal */
    };
    for (const auto &c : cases) {
        const __nv_bfloat16 b = __float2bfloat16_rn(f32_of(c.f));
        ck_assert_msg(b.x == c.want, "__float2bfloat16_rn(0x%08x) = 0x%04x, want 0x%04x", c.f,
                      b.x, c.want);
        ck_assert_uint_eq(__float2bfloat16(f32_of(c.f)).x, c.want);
    }
    /* NaN stays NaN, even a payload only in the low 16 bits, which rounding would drop */
    const uint32_t nans[] = {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu, 0x7f80ffffu};
    for (uint32_t f : nans) {
        const __nv_bfloat16 b = __float2bfloat16_rn(f32_of(f));
        ck_assert_msg((b.x & 0x7f80) == 0x7f80 && (b.x & 0x7f) != 0,
                      "__float2bfloat16_rn(NaN 0x%08x) = 0x%04x, not a NaN", f, b.x);
        ck_assert_uint_eq(b.x & 0x8000u, f >> 16 & 0x8000u);
        ck_assert(std::isnan(__bfloat162float(b)));
    }
    __nv_bfloat16 b;
    b.x = 0x0001;
    ck_assert_uint_eq(f32_bits(__bfloat162float(b)), 0x00010000u); /* widening is exact */
    b.x = 0xc0a0;
    ck_assert(__bfloat162float(b) == -5.0f);
}
END_TEST

/* As for half: every finite bf16 and the next one up, all 2 x 32640 of them. */
START_TEST(test_bfloat16_rounds_every_midpoint_to_even)
{
    char first[256] = "";
    int n_bad = 0;
    for (uint32_t h = 0; h < 0x7f80; h++)
        for (uint32_t sign = 0; sign <= 0x8000u; sign += 0x8000u) {
            const uint32_t lo_bits = (sign | h) << 16, hi_bits = (sign | (h + 1)) << 16;
            const double lo = (double)f32_of(lo_bits);
            const double hi = h + 1 == 0x7f80 ? (sign ? -1.0 : 1.0) * ldexp(1.0, 128)
                                              : (double)f32_of(hi_bits);
            const float mid = (float)((lo + hi) / 2);
            const uint16_t down = (uint16_t)(sign | h), up = (uint16_t)(sign | (h + 1));
            const uint16_t even = h & 1u ? up : down;
            const uint16_t got_lo = __float2bfloat16_rn((float)lo).x;
            const uint16_t got_mid = __float2bfloat16_rn(mid).x;
            const uint16_t got_above = __float2bfloat16_rn(std::nextafter(mid, (float)hi)).x;
            const uint16_t got_below = __float2bfloat16_rn(std::nextafter(mid, (float)lo)).x;
            if ((double)mid == (lo + hi) / 2 && got_lo == down && got_mid == even &&
                got_above == up && got_below == down)
                continue;
            if (n_bad++ == 0)
                snprintf(first, sizeof first,
                         "0x%04x: back 0x%04x; midpoint %a with 0x%04x -> 0x%04x (want 0x%04x), "
                         "above -> 0x%04x, below -> 0x%04x",
                         down, got_lo, (double)mid, up, got_mid, even, got_above, got_below);
        }
    ck_assert_msg(n_bad == 0, "%d bfloat16 values wrong; first %s", n_bad, first);
}
END_TEST

/* CUDA Math API: input bytes 0..3 are x's, 4..7 are y's (low byte first); result byte n is
 * input byte s[4n + 2 : 4n] (only the low three bits of each selector nibble count). With
 * x = 0x33221100 and y = 0x77665544, input byte k is 0x11 k. */
START_TEST(test_byte_perm_selects_bytes)
{
    const unsigned x = 0x33221100u, y = 0x77665544u;
    ck_assert_uint_eq(__byte_perm(x, y, 0x3210), 0x33221100u); /* x itself */
    ck_assert_uint_eq(__byte_perm(x, y, 0x7654), 0x77665544u); /* y itself */
    ck_assert_uint_eq(__byte_perm(x, y, 0x0123), 0x00112233u); /* x's bytes reversed */
    ck_assert_uint_eq(__byte_perm(x, y, 0x5440), 0x55444400u); /* bytes 0, 4, 4, 5 */
    ck_assert_uint_eq(__byte_perm(x, y, 0x1111), 0x11111111u); /* byte 1 everywhere */
    ck_assert_uint_eq(__byte_perm(x, y, 0x7531), 0x77553311u); /* the odd bytes */
    ck_assert_uint_eq(__byte_perm(x, y, 0xcdef), 0x44556677u); /* nibble bit 3 ignored */
    ck_assert_uint_eq(__byte_perm(x, y, 0xabcd3210), 0x33221100u); /* bits above 15 ignored */
    ck_assert_uint_eq(__byte_perm(0x12345678u, 0, 0x0123), 0x78563412u); /* a byte swap */
}
END_TEST

/* ---- streams: synchronous mode (the default) ----------------------------------------------- */

START_TEST(test_sync_results_visible_when_the_call_returns)
{
    int *d = dev_alloc<int>(64);
    fill_index<<<2, 32>>>(d, 40);
    for (int i = 0; i < 64; i++)
        ck_assert_msg(peek_u32(d + i) == (unsigned)(40 + i), "element %d not written at return",
                      i);
    cudaStream_t s = new_stream();
    unsigned *pinned = host_alloc<unsigned>(4, true), *pageable = host_alloc<unsigned>(4, false);
    unsigned *d2 = dev_alloc<unsigned>(8);
    pinned[0] = 0xabcd0001u;
    pageable[0] = 0xabcd0002u;
    ck_assert_int_eq(cudaMemcpyAsync(d2, pinned, 4, cudaMemcpyHostToDevice, s), cudaSuccess);
    ck_assert_int_eq(cudaMemcpyAsync(d2 + 1, pageable, 4, cudaMemcpyHostToDevice, s), cudaSuccess);
    ck_assert_uint_eq(peek_u32(d2), 0xabcd0001u);
    ck_assert_uint_eq(peek_u32(d2 + 1), 0xabcd0002u);
    ck_assert_int_eq(cudaStreamQuery(s), cudaSuccess);
    cudaEvent_t e = new_event();
    ck_assert_int_eq(cudaEventRecord(e, s), cudaSuccess);
    ck_assert_int_eq(cudaEventQuery(e), cudaSuccess);
}
END_TEST

/* ---- streams: asynchronous mode (CUDAEMU_ASYNC=1, copies of 100 ms in the child) ---------- */

/* A copy from pinned memory runs when the stream gets to it: not landed when the call
 * returns, landed after cudaStreamSynchronize. */
START_TEST(test_async_pinned_copy_lands_when_the_stream_runs_it)
{
    cudaStream_t s = new_stream();
    unsigned *h = host_alloc<unsigned>(256, true);
    unsigned *d = dev_alloc<unsigned>(256);
    for (unsigned i = 0; i < 256; i++)
        h[i] = 0x5000u + i;
    ck_assert_int_eq(cudaMemcpyAsync(d, h, 256 * 4, cudaMemcpyHostToDevice, s), cudaSuccess);
    ck_assert_uint_eq(peek_u32(d), POISON_U32);
    ck_assert_uint_eq(peek_u32(d + 255), POISON_U32);
    ck_assert_int_eq(cudaStreamQuery(s), cudaErrorNotReady);
    ck_assert_int_eq(cudaStreamSynchronize(s), cudaSuccess);
    ck_assert_int_eq(cudaStreamQuery(s), cudaSuccess);
    for (unsigned i = 0; i < 256; i++)
        ck_assert_uint_eq(peek_u32(d + i), 0x5000u + i);
}
END_TEST

/* From pageable memory the copy reads its source at the call (the driver stages it): a
 * change right after does not land. From pinned memory it reads the source when it runs: a
 * change right after does land. A copy to pageable memory returns once the data is there. */
START_TEST(test_async_pageable_source_is_read_at_the_call)
{
    cudaStream_t s = new_stream();
    unsigned *pageable = host_alloc<unsigned>(4, false), *pinned = host_alloc<unsigned>(4, true);
    unsigned *d = dev_alloc<unsigned>(2);
    pageable[0] = 111;
    pinned[0] = 222;
    ck_assert_int_eq(cudaMemcpyAsync(d, pageable, 4, cudaMemcpyHostToDevice, s), cudaSuccess);
    ck_assert_int_eq(cudaMemcpyAsync(d + 1, pinned, 4, cudaMemcpyHostToDevice, s), cudaSuccess);
    __atomic_store_n(&pageable[0], 333u, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pinned[0], 444u, __ATOMIC_SEQ_CST);
    ck_assert_uint_eq(peek_u32(d + 1), POISON_U32); /* still queued: the change was in time */
    unsigned *back = host_alloc<unsigned>(2, false);
    ck_assert_int_eq(cudaMemcpyAsync(back, d, 8, cudaMemcpyDeviceToHost, s), cudaSuccess);
    /* no synchronisation: a copy to pageable memory has landed when it returns */
    ck_assert_uint_eq(back[0], 111u);
    ck_assert_uint_eq(back[1], 444u);
}
END_TEST

START_TEST(test_async_event_not_ready_until_its_stream_gets_there)
{
    cudaStream_t s = new_stream();
    cudaEvent_t e = new_event();
    unsigned *h = host_alloc<unsigned>(1, true), *d = dev_alloc<unsigned>(1);
    ck_assert_int_eq(cudaEventQuery(e), cudaSuccess); /* never recorded */
    h[0] = 77;
    ck_assert_int_eq(cudaMemcpyAsync(d, h, 4, cudaMemcpyHostToDevice, s), cudaSuccess);
    ck_assert_int_eq(cudaEventRecord(e, s), cudaSuccess);
    ck_assert_int_eq(cudaEventQuery(e), cudaErrorNotReady);
    ck_assert_uint_eq(peek_u32(d), POISON_U32);
    ck_assert_int_eq(cudaEventSynchronize(e), cudaSuccess);
    ck_assert_int_eq(cudaEventQuery(e), cudaSuccess);
    ck_assert_uint_eq(peek_u32(d), 77u);
}
END_TEST

/* A kernel on stream b after cudaStreamWaitEvent on an event recorded after a copy on stream
 * a sees the copy; without the wait it runs at once and reads what was there before. Stream
 * a first runs a copy it does not need, so its real copy lands 200 ms after the call. */
START_TEST(test_async_stream_wait_event_orders_two_streams)
{
    cudaStream_t a = new_stream(), b = new_stream();
    cudaEvent_t e = new_event();
    unsigned *h = host_alloc<unsigned>(4, true), *d = dev_alloc<unsigned>(4);
    unsigned *scratch = dev_alloc<unsigned>(4), *out = dev_alloc<unsigned>(2);
    h[0] = 4242;
    h[1] = 4343;

    ck_assert_int_eq(cudaMemcpyAsync(scratch, h, 16, cudaMemcpyHostToDevice, a), cudaSuccess);
    ck_assert_int_eq(cudaMemcpyAsync(d, h, 4, cudaMemcpyHostToDevice, a), cudaSuccess);
    ck_assert_int_eq(cudaEventRecord(e, a), cudaSuccess);
    ck_assert_int_eq(cudaStreamWaitEvent(b, e, 0), cudaSuccess);
    copy_word<<<1, 1, 0, b>>>(d, out);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    ck_assert_int_eq(cudaStreamSynchronize(b), cudaSuccess);
    ck_assert_uint_eq(peek_u32(out), 4242u);

    /* the same without the wait: stale */
    ck_assert_int_eq(cudaMemcpyAsync(scratch, h, 16, cudaMemcpyHostToDevice, a), cudaSuccess);
    ck_assert_int_eq(cudaMemcpyAsync(d + 1, h + 1, 4, cudaMemcpyHostToDevice, a), cudaSuccess);
    copy_word<<<1, 1, 0, b>>>(d + 1, out + 1);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    ck_assert_int_eq(cudaStreamSynchronize(b), cudaSuccess);
    ck_assert_int_eq(cudaStreamSynchronize(a), cudaSuccess);
    ck_assert_uint_eq(peek_u32(d + 1), 4343u);
    ck_assert_msg(peek_u32(out + 1) == POISON_U32,
                  "without the wait the kernel read 0x%08x, not the stale 0xffffffff",
                  peek_u32(out + 1));
}
END_TEST

/* One stream runs copies, kernels and memsets in the order submitted, however long each
 * takes: a kernel after a slow copy sees it, and the copy back lands only when reached. */
START_TEST(test_async_stream_runs_operations_in_submission_order)
{
    cudaStream_t s = new_stream();
    unsigned *ha = host_alloc<unsigned>(1, true), *hb = host_alloc<unsigned>(1, true);
    unsigned *hlog = host_alloc<unsigned>(4, true);
    unsigned *d = dev_alloc<unsigned>(1), *log = dev_alloc<unsigned>(4);
    unsigned *n = dev_alloc<unsigned>(1);
    unsigned *v = dev_alloc<unsigned>(64), *hv = host_alloc<unsigned>(64, true);
    ck_assert_int_eq(cudaMemset(n, 0, 4), cudaSuccess);
    ha[0] = 0x11111111u;
    hb[0] = 0x33333333u;
    for (unsigned i = 0; i < 64; i++)
        hv[i] = i;
    ck_assert_int_eq(cudaMemcpyAsync(d, ha, 4, cudaMemcpyHostToDevice, s), cudaSuccess);
    append_word<<<1, 1, 0, s>>>(d, log, n);
    ck_assert_int_eq(cudaMemsetAsync(d, 0x22, 4, s), cudaSuccess);
    append_word<<<1, 1, 0, s>>>(d, log, n);
    ck_assert_int_eq(cudaMemcpyAsync(d, hb, 4, cudaMemcpyHostToDevice, s), cudaSuccess);
    append_word<<<1, 1, 0, s>>>(d, log, n);
    ck_assert_int_eq(cudaMemcpyAsync(hlog, log, 12, cudaMemcpyDeviceToHost, s), cudaSuccess);
    /* copy in, kernel, copy out */
    ck_assert_int_eq(cudaMemcpyAsync(v, hv, 256, cudaMemcpyHostToDevice, s), cudaSuccess);
    double_words<<<2, 32, 0, s>>>(v, 64);
    ck_assert_int_eq(cudaMemcpyAsync(hv, v, 256, cudaMemcpyDeviceToHost, s), cudaSuccess);
    ck_assert_uint_eq(__atomic_load_n(&hlog[0], __ATOMIC_SEQ_CST), 0xeeeeeeeeu); /* not yet */
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    ck_assert_int_eq(cudaStreamSynchronize(s), cudaSuccess);
    ck_assert_uint_eq(hlog[0], 0x11111111u);
    ck_assert_uint_eq(hlog[1], 0x22222222u);
    ck_assert_uint_eq(hlog[2], 0x33333333u);
    for (unsigned i = 0; i < 64; i++)
        ck_assert_uint_eq(hv[i], 2 * i);
}
END_TEST

/* Kernel arguments are copied at the launch: changing the variables passed, after the launch
 * and before the kernel runs (it is queued behind a slow copy), changes nothing. */
START_TEST(test_async_kernel_arguments_are_copied_at_the_launch)
{
    cudaStream_t s = new_stream();
    unsigned *h = host_alloc<unsigned>(1, true), *d = dev_alloc<unsigned>(1);
    unsigned *out = dev_alloc<unsigned>(3);
    launch_args args = {11, 22};
    int scalar = 33;
    ck_assert_int_eq(cudaMemcpyAsync(d, h, 4, cudaMemcpyHostToDevice, s), cudaSuccess);
    store_args<<<1, 1, 0, s>>>(args, scalar, out);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    args.a = args.b = 0;
    scalar = 0;
    ck_assert_uint_eq(peek_u32(out), POISON_U32); /* not run yet: the change came first */
    ck_assert_int_eq(cudaStreamSynchronize(s), cudaSuccess);
    ck_assert_uint_eq(peek_u32(out), 11u);
    ck_assert_uint_eq(peek_u32(out + 1), 22u);
    ck_assert_uint_eq(peek_u32(out + 2), 33u);
}
END_TEST

/* A kernel queued behind a slow copy faults after the call that launched it returned
 * (cudaSuccess, as a GPU's asynchronous launch does); the next call that waits for the device
 * reports the fault: a cudaMemcpy as much as a cudaDeviceSynchronize, and a cudaMemset too. */
START_TEST(test_async_fault_reported_by_the_next_blocking_call)
{
    cudaStream_t s = new_stream();
    unsigned *h = host_alloc<unsigned>(1, true), *d = dev_alloc<unsigned>(1);
    int *out = dev_alloc<int>(64);
    unsigned back = 0;
    cudaError_t launch[2], blocking[2], sync[2];
    char msg[2][4096];
    for (int k = 0; k < 2; k++) {
        if (k == 1) {
            reset_device();
            d = dev_alloc<unsigned>(1);
            out = dev_alloc<int>(64);
        }
        ck_assert_int_eq(cudaMemcpyAsync(d, h, 4, cudaMemcpyHostToDevice, s), cudaSuccess);
        return_before_syncthreads<<<1, 64, 0, s>>>(out, 3);
        launch[k] = cudaGetLastError();
        capture_begin();
        blocking[k] = k == 0 ? cudaMemcpy(&back, d, 4, cudaMemcpyDeviceToHost)
                             : cudaMemset(d, 0, 4);
        sync[k] = cudaDeviceSynchronize();
        capture_end(msg[k], sizeof msg[k]);
    }
    reset_device();
    const char *what[2] = {"cudaMemcpy", "cudaMemset"};
    for (int k = 0; k < 2; k++) {
        ck_assert_msg(launch[k] == cudaSuccess, "%s case: the queued launch returned %s",
                      what[k], cudaGetErrorName(launch[k]));
        ck_assert_msg(strstr(msg[k], "return_before_syncthreads"), "no fault message: %s",
                      msg[k]);
        ck_assert_int_eq(sync[k], cudaErrorLaunchFailure);
    }
    ck_assert_msg(blocking[0] == cudaErrorLaunchFailure && blocking[1] == cudaErrorLaunchFailure,
                  "after a kernel that faulted while they waited for it, cudaMemcpy returned %s "
                  "and cudaMemset %s",
                  cudaGetErrorName(blocking[0]), cudaGetErrorName(blocking[1]));
}
END_TEST

/* ---- child processes ------------------------------------------------------------------- */

/* Runs this program with argument arg (or none) and the environment changed by set: NAME=value
 * entries set, bare NAME entries remove; NULL-terminated. Returns its exit status, or -1
 * when it did not exit. */
static int run_self(const char *arg, const char *const *set)
{
    static char *envp[1024];
    int n = 0;
    for (char **e = environ; *e && n < 1000; e++) {
        bool replaced = false;
        for (const char *const *v = set; *v; v++) {
            const char *eq = strchr(*v, '=');
            size_t name_len = eq ? (size_t)(eq - *v) : strlen(*v);
            replaced |= strncmp(*e, *v, name_len) == 0 && (*e)[name_len] == '=';
        }
        if (!replaced)
            envp[n++] = *e;
    }
    for (const char *const *v = set; *v && n < 1020; v++)
        if (strchr(*v, '='))
            envp[n++] = (char *)*v;
    envp[n] = nullptr;
    char self[] = "/proc/self/exe";
    char *argv[] = {self, (char *)arg, nullptr};
    fflush(stdout);
    fflush(stderr);
    pid_t pid;
    ck_assert_int_eq(posix_spawn(&pid, self, nullptr, nullptr, argv, envp), 0);
    int status = 0;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

START_TEST(test_threads_warps_and_faults_in_reverse_order)
{
    const char *const set[] = {"CUDAEMU_ORDER=reverse", "CK_INCLUDE_TAGS=order", "CK_RUN_SUITE",
                               "CK_RUN_CASE", "CK_EXCLUDE_TAGS", nullptr};
    ck_assert_msg(run_self(nullptr, set) == 0,
                  "cases tagged 'order' failed with CUDAEMU_ORDER=reverse (output above)");
}
END_TEST

START_TEST(test_streams_in_async_mode)
{
    const char *const set[] = {"CUDAEMU_ASYNC=1", "CUDAEMU_COPY_DELAY_US=100000",
                               "CK_INCLUDE_TAGS=async", "CK_RUN_SUITE", "CK_RUN_CASE",
                               "CK_EXCLUDE_TAGS", nullptr};
    ck_assert_msg(run_self(nullptr, set) == 0,
                  "cases tagged 'async' failed with CUDAEMU_ASYNC=1 (output above)");
}
END_TEST

START_TEST(test_memory_on_a_64_mib_device)
{
    const char *const set[] = {"CUDAEMU_MEM=64M", "CK_RUN_CASE=memory", "CK_RUN_SUITE",
                               "CK_INCLUDE_TAGS", "CK_EXCLUDE_TAGS", nullptr};
    ck_assert_msg(run_self(nullptr, set) == 0,
                  "the memory cases failed with CUDAEMU_MEM=64M (output above)");
}
END_TEST

START_TEST(test_device_absent)
{
    const char *const set[] = {"CUDAEMU_DEVICES=0", "CK_RUN_SUITE", "CK_RUN_CASE",
                               "CK_INCLUDE_TAGS", "CK_EXCLUDE_TAGS", nullptr};
    ck_assert_msg(run_self(NO_DEVICE_ARG, set) == 0,
                  "the no-device case failed with CUDAEMU_DEVICES=0 (output above)");
}
END_TEST

/* Without the __syncthreads, threads read their neighbour's slot before it is written in at
 * least one of the two orders: the emulator shows a missing barrier. */
START_TEST(test_syncthreads_missing_shows_in_some_order)
{
    const char *const fwd[] = {"CUDAEMU_ORDER=forward", nullptr};
    const char *const rev[] = {"CUDAEMU_ORDER=reverse", nullptr};
    const int f = run_self(MISSING_BARRIER_ARG, fwd), r = run_self(MISSING_BARRIER_ARG, rev);
    ck_assert_msg((f == 0 || f == 1) && (r == 0 || r == 1), "children failed: %d, %d", f, r);
    ck_assert_msg(f == 1 || r == 1, "without the barrier both orders gave the right answer");
}
END_TEST

/* In the child: runs rotate_through_shared without its barrier; exits 0 when every thread
 * got its neighbour's value anyway, 1 when one did not, 2 when CUDA failed. */
static int missing_barrier_child(void)
{
    const unsigned n = 96, n_blocks = 2;
    unsigned *d = nullptr, got[96 * 2];
    if (cudaMalloc((void **)&d, sizeof got) != cudaSuccess)
        return 2;
    rotate_through_shared<<<n_blocks, n>>>(d, 0);
    if (cudaGetLastError() != cudaSuccess ||
        cudaMemcpy(got, d, sizeof got, cudaMemcpyDeviceToHost) != cudaSuccess)
        return 2;
    cudaFree(d);
    int wrong = 0;
    for (unsigned b = 0; b < n_blocks; b++)
        for (unsigned i = 0; i < n; i++)
            wrong += got[b * n + i] != 1000u * b + (i + 1) % n;
    return wrong ? 1 : 0;
}

/* ---- no device (the child of test_device_absent) -------------------------------------------- */

static __global__ void set_flag(int *flag) { *flag = 1; }

/* Every call that needs the device fails with cudaErrorNoDevice, as on a machine without a
 * GPU; a kernel launch included, which must not run. */
START_TEST(test_device_absent_refuses_every_call)
{
    int count = -1;
    ck_assert_int_eq(cudaGetDeviceCount(&count), cudaErrorNoDevice);
    ck_assert_int_eq(count, 0);
    char wrong[1024] = "";
    size_t used = 0;
    auto check = [&](const char *call, cudaError_t e) {
        if (e != cudaErrorNoDevice && used < sizeof wrong - 100)
            used += (size_t)snprintf(wrong + used, sizeof wrong - used, " %s: %s;", call,
                                     cudaGetErrorName(e));
    };
    void *d = nullptr;
    size_t free_b = 0, total_b = 0;
    cudaDeviceProp p;
    cudaStream_t s = nullptr;
    cudaEvent_t ev = nullptr;
    int dev = -1;
    check("cudaMalloc", cudaMalloc(&d, 16));
    check("cudaMemGetInfo", cudaMemGetInfo(&free_b, &total_b));
    check("cudaGetDeviceProperties", cudaGetDeviceProperties(&p, 0));
    check("cudaSetDevice", cudaSetDevice(0));
    check("cudaGetDevice", cudaGetDevice(&dev));
    check("cudaStreamCreate", cudaStreamCreate(&s));
    check("cudaEventCreate", cudaEventCreate(&ev));
    static int flag = 0;
    cudaGetLastError(); /* the refusals above left cudaErrorNoDevice there */
    set_flag<<<1, 1>>>(&flag);
    check("a kernel launch", cudaGetLastError());
    check("cudaDeviceSynchronize", cudaDeviceSynchronize());
    static char page[4096];
    check("cudaHostRegister", cudaHostRegister(page, sizeof page, cudaHostRegisterDefault));
    ck_assert_msg(used == 0 && flag == 0, "calls that did not return cudaErrorNoDevice:%s%s",
                  wrong, flag ? " and the kernel ran" : "");
}
END_TEST

static Suite *no_device_suite(void)
{
    Suite *s = suite_create("cudaemu_no_device");
    TCase *tc = tcase_create("no_device");
    tcase_add_test(tc, test_device_absent_refuses_every_call);
    suite_add_tcase(s, tc);
    return s;
}

/* ---- the suite ------------------------------------------------------------------------------ */

static TCase *fixture_case(Suite *s, const char *name, const char *tags)
{
    TCase *tc = tcase_create(name);
    tcase_add_checked_fixture(tc, setup, teardown);
    if (tags)
        tcase_set_tags(tc, tags);
    suite_add_tcase(s, tc);
    return tc;
}

/* Tags choose what the children run: "order" with CUDAEMU_ORDER=reverse, "async" with
 * CUDAEMU_ASYNC=1. The child-spawning cases carry no tag, so no child spawns again. */
static Suite *emu_suite(void)
{
    Suite *s = suite_create("cudaemu");

    TCase *threads = fixture_case(s, "threads", "order");
    tcase_add_test(threads, test_launch_indexes_every_thread_of_a_3d_grid_once);
    tcase_add_test(threads, test_syncthreads_waits_for_the_whole_block);
    tcase_add_test(threads, test_shared_is_per_block_and_starts_as_nan_bytes);
    tcase_add_test(threads, test_shared_dynamic_is_the_launch_size_and_fresh_per_block);
    tcase_add_test(threads, test_shared_every_declarator_starts_as_nan_bytes);

    TCase *warp = fixture_case(s, "warp", "order");
    tcase_add_test(warp, test_shfl_matches_the_programming_guide);
    tcase_add_test(warp, test_shfl_lanes_follow_the_linear_thread_index);
    tcase_add_test(warp, test_vote_ballot_any_all);
    tcase_add_test(warp, test_warp_xor_butterfly_sums_exactly_in_partial_warps);
    tcase_add_test(warp, test_warp_disjoint_masks_run_as_separate_groups);
    tcase_add_test(warp, test_shfl_result_survives_later_subset_mask_operations);
    tcase_add_test(warp, test_syncwarp_orders_shared_memory_within_a_warp);
    tcase_add_test(warp, test_atomics_return_the_old_value);

    TCase *faults = fixture_case(s, "faults", "order async");
    tcase_add_test(faults, test_fault_return_before_syncthreads);
    tcase_add_test(faults, test_fault_shuffle_after_lanes_returned);
    tcase_add_test(faults, test_fault_lanes_with_different_masks);
    tcase_add_test(faults, test_fault_mask_names_missing_lanes);
    tcase_add_test(faults, test_fault_read_outside_mask);
    tcase_add_test(faults, test_fault_barrier_against_shuffle_deadlocks);

    TCase *launch = fixture_case(s, "launch", "async");
    tcase_add_test(launch, test_launch_config_errors_are_not_sticky);
    tcase_add_test(launch, test_launch_config_limits_work);

    TCase *memory = fixture_case(s, "memory", nullptr);
    tcase_add_test(memory, test_malloc_fills_with_0xff_and_aligns_to_256);
    tcase_add_test(memory, test_memgetinfo_counts_every_byte);
    tcase_add_test(memory, test_malloc_over_the_limit_fails_and_is_not_sticky);
    tcase_add_test(memory, test_free_refuses_non_allocations);
    tcase_add_test(memory, test_memcpy_checks_both_sides_against_the_kind);
    tcase_add_test(memory, test_host_register_refuses_twice_and_unregistered);

    TCase *device = fixture_case(s, "device", nullptr);
    tcase_add_test(device, test_device_count_and_properties);
    tcase_add_test(device, test_error_names_and_strings);
    tcase_add_test(device, test_last_error_cleared_by_get_kept_by_peek);

    TCase *conv = fixture_case(s, "conversions", nullptr);
    tcase_add_test(conv, test_half_from_float_hand_picked);
    tcase_add_test(conv, test_half_to_float_subnormals_inf_nan);
    tcase_add_test(conv, test_half_rounds_every_midpoint_to_even);
    tcase_add_test(conv, test_bfloat16_rounds_to_nearest_even_and_keeps_nan);
    tcase_add_test(conv, test_bfloat16_rounds_every_midpoint_to_even);
    tcase_add_test(conv, test_byte_perm_selects_bytes);

    if (!emu_async()) {
        TCase *sync = fixture_case(s, "sync", nullptr);
        tcase_add_test(sync, test_sync_results_visible_when_the_call_returns);
    }
    if (emu_slow_copies()) {
        TCase *async = fixture_case(s, "async", "async");
        tcase_add_test(async, test_async_pinned_copy_lands_when_the_stream_runs_it);
        tcase_add_test(async, test_async_pageable_source_is_read_at_the_call);
        tcase_add_test(async, test_async_event_not_ready_until_its_stream_gets_there);
        tcase_add_test(async, test_async_stream_wait_event_orders_two_streams);
        tcase_add_test(async, test_async_stream_runs_operations_in_submission_order);
        tcase_add_test(async, test_async_kernel_arguments_are_copied_at_the_launch);
        tcase_add_test(async, test_async_fault_reported_by_the_next_blocking_call);
    }

    TCase *child = tcase_create("child");
    tcase_set_timeout(child, 120);
    tcase_add_test(child, test_threads_warps_and_faults_in_reverse_order);
    tcase_add_test(child, test_streams_in_async_mode);
    tcase_add_test(child, test_memory_on_a_64_mib_device);
    tcase_add_test(child, test_device_absent);
    tcase_add_test(child, test_syncthreads_missing_shows_in_some_order);
    suite_add_tcase(s, child);
    return s;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], NO_DEVICE_ARG) == 0)
        return tu_run_suite_nofork(no_device_suite());
    if (argc > 1 && strcmp(argv[1], MISSING_BARRIER_ARG) == 0)
        return missing_barrier_child();
    int n_devices = 0;
    if (cudaGetDeviceCount(&n_devices) != cudaSuccess || n_devices == 0) {
        printf("test_cudaemu: skipped: no (emulated) CUDA device\n");
        return 77;
    }
    return tu_run_suite_nofork(emu_suite());
}
