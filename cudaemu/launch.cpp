/*
 * cudaemu/launch.cpp: runs kernels. A launch is checked as a GPU checks it, then submitted
 * to its stream; when the stream runs it, the grid's blocks are shared out among a pool of
 * OS threads (CUDAEMU_THREADS), each running one block at a time.
 *
 * A block's threads are fibers on their OS thread: each has its own stack, and the block's
 * scheduler resumes them in thread order (or in reverse with CUDAEMU_ORDER=reverse, which
 * also reverses the order of blocks), each running until it waits at a barrier or returns.
 * __syncthreads releases when every thread of the block has arrived; a warp operation
 * (shuffle, vote, __syncwarp) when every lane of its mask has arrived, all with the same
 * mask; so values cross lanes at the same point of the program, as on a GPU. What a GPU
 * leaves undefined is reported as a fault of the launch (printed, and a sticky
 * cudaErrorLaunchFailure): a thread returning while others wait at __syncthreads or reaching
 * one after another returned, a warp operation naming a lane that has returned or does not
 * exist, lanes of a warp arriving with different masks, and threads left waiting at
 * barriers that can never release.
 *
 * Fiber switching: a few instructions of assembly on x86-64 (the callee-saved registers and
 * the floating-point control words), ucontext elsewhere; with AddressSanitizer each switch
 * is announced to it so it follows the stacks.
 */
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "cudaemu/emu_internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDAEMU_ASAN 1
#define CUDAEMU_STACK_BYTES (256u << 10)
#else
#define CUDAEMU_ASAN 0
#define CUDAEMU_STACK_BYTES (64u << 10)
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

__thread cudaemu_thread *cudaemu_self;

namespace {

constexpr unsigned max_block_threads = 1024;
constexpr size_t max_dynamic_shared = 48u << 10;

/* ---- context switching ------------------------------------------------------------------ */

#if defined(__x86_64__)
extern "C" void cudaemu_swap(void **save_sp, void *load_sp);
extern "C" void cudaemu_fiber_entry(void);
extern "C" __attribute__((visibility("hidden"), noreturn)) void cudaemu_fiber_main(void);

/* Saves the callee-saved registers on the current stack, stores the stack pointer in
 * *save_sp, and resumes the stack at load_sp. The floating-point control words (MXCSR, x87)
 * are left alone: they belong to the OS thread, and no kernel changes them. */
asm(R"(
    .text
    .p2align 4
    .globl cudaemu_swap
    .hidden cudaemu_swap
    .type cudaemu_swap, @function
cudaemu_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cudaemu_swap, .-cudaemu_swap

    .p2align 4
    .globl cudaemu_fiber_entry
    .hidden cudaemu_fiber_entry
    .type cudaemu_fiber_entry, @function
cudaemu_fiber_entry:
    call cudaemu_fiber_main
    ud2
    .size cudaemu_fiber_entry, .-cudaemu_fiber_entry
)");
#endif

enum fiber_state { READY, WAIT_BLOCK, WAIT_WARP, DONE };

/* A warp operation (shuffle, vote, __syncwarp) of one mask: live from the first lane's
 * arrival until every lane of the mask has arrived and read the contributions. Lanes with
 * disjoint masks run separate operations at once, as CUDA allows. */
struct warp_op {
    unsigned mask = 0;
    unsigned arrived = 0; /* complete when arrived == mask */
    unsigned readers = 0; /* lanes that have not yet read the result */
    const char *name = nullptr;
    uint64_t slots[32];
};

/* At most one live operation per lane: a lane waits in one, or reads it at once when it
 * resumes, before it can join another. */
constexpr unsigned max_warp_ops = 32;

struct warp_state {
    unsigned present = 0; /* lanes that exist (the last warp of a block may be partial) */
    unsigned exited = 0;  /* lanes that have returned */
    unsigned n_ops = 0;   /* ops[0 .. n_ops - 1] are live */
    warp_op ops[max_warp_ops];
};

struct fiber {
    char *stack = nullptr; /* lowest usable byte; a guard page lies below */
    char *top = nullptr;   /* where the stack starts (grows down from), below the colour */
#if defined(__x86_64__)
    void *sp = nullptr;
#else
    ucontext_t ctx;
#endif
    void *asan_fake = nullptr;
    bool dirty = false; /* abandoned mid-run: its stack may hold AddressSanitizer poison */
    warp_op *op = nullptr; /* the warp operation it waits in or reads */
    fiber_state state = DONE;
    cudaemu_thread t;
};

struct block_state {
    unsigned n_threads = 0, arrived = 0, exited = 0;
    std::vector<warp_state> warps; /* warps[0 .. n_warps - 1] are this block's */
    unsigned n_warps = 0;
    bool failed = false;
};

struct launch_job {
    cudaemu_launch_config c;
    const char *name;
    std::function<void()> body;
    uint64_t n_blocks;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
};

/* The OS thread's fibers and the block it runs. */
struct worker {
    std::vector<fiber> fibers;
    fiber *cur = nullptr;
    block_state blk;
    launch_job *job = nullptr;
    char *dyn = nullptr;
    size_t dyn_bytes = 0;
#if defined(__x86_64__)
    void *sched_sp = nullptr;
#else
    ucontext_t sched_ctx;
#endif
    void *sched_fake = nullptr;
    const void *sched_bottom = nullptr;
    size_t sched_size = 0;
    bool from_sched = false; /* the last switch into a fiber came from the scheduler */

    ~worker()
    {
        for (fiber &f : fibers)
            munmap(f.stack - page(), CUDAEMU_STACK_BYTES + page());
        free(dyn);
    }
    static size_t page() { return (size_t)sysconf(_SC_PAGESIZE); }
};

/* The OS thread's worker: owned by tls_owner (destroyed with the thread), read through the
 * plain pointer on the hot paths. */
thread_local std::unique_ptr<worker> tls_owner;
__thread worker *tls_worker;
std::atomic<uint64_t> block_serials{0};

worker &self_worker()
{
    if (!tls_worker) {
        tls_owner.reset(new worker());
        tls_worker = tls_owner.get();
    }
    return *tls_worker;
}

void grow_fibers(worker &w, unsigned n)
{
    size_t page = worker::page();
    while (w.fibers.size() < n) {
        void *m = mmap(nullptr, CUDAEMU_STACK_BYTES + page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            fprintf(stderr, "cudaemu: cannot map a fiber stack of %u bytes\n",
                    CUDAEMU_STACK_BYTES);
            abort();
        }
        mprotect(m, page, PROT_NONE); /* an overflowing fiber faults instead of corrupting */
        w.fibers.emplace_back();
        fiber &f = w.fibers.back();
        f.stack = (char *)m + page;
        /* stacks lie 64 KiB apart: started at the same offset, the hot top of every stack
         * would fall in one set of the L1 cache; a colour per fiber spreads them */
        size_t colour = (w.fibers.size() - 1) * 9 % 64 * 64;
        f.top = f.stack + CUDAEMU_STACK_BYTES - colour;
    }
}

/* ---- switching between the block's scheduler and its fibers ----------------------------- */

void asan_start(void **fake, const void *bottom, size_t size)
{
#if CUDAEMU_ASAN
    __sanitizer_start_switch_fiber(fake, bottom, size);
#else
    (void)fake, (void)bottom, (void)size;
#endif
}

void asan_finish(void *fake, const void **bottom, size_t *size)
{
#if CUDAEMU_ASAN
    __sanitizer_finish_switch_fiber(fake, bottom, size);
#else
    (void)fake, (void)bottom, (void)size;
#endif
}

/* Switches from the running context to fiber f. */
void switch_to(worker &w, fiber &f, void **save_sp, void **asan_save, bool from_sched)
{
    w.cur = &f;
    w.from_sched = from_sched;
    cudaemu_self = &f.t;
    asan_start(asan_save, f.stack, CUDAEMU_STACK_BYTES);
#if defined(__x86_64__)
    cudaemu_swap(save_sp, f.sp);
#else
    swapcontext((ucontext_t *)save_sp, &f.ctx);
#endif
}

/* A fiber has just been switched to: tell AddressSanitizer, and learn the scheduler's stack
 * when it was the scheduler that switched. */
void arrived_in(worker &w, void *asan_fake)
{
    asan_finish(asan_fake, w.from_sched ? &w.sched_bottom : nullptr,
                w.from_sched ? &w.sched_size : nullptr);
}

/* From the scheduler into fiber f, until control comes back to the scheduler. */
void resume(worker &w, fiber &f)
{
#if defined(__x86_64__)
    switch_to(w, f, &w.sched_sp, &w.sched_fake, true);
#else
    switch_to(w, f, (void **)&w.sched_ctx, &w.sched_fake, true);
#endif
    asan_finish(w.sched_fake, nullptr, nullptr);
    cudaemu_self = nullptr;
    w.cur = nullptr;
}

/* The next fiber of f's warp, in scheduling order, that is ready to run; nullptr when none
 * is before the end of the warp's pass (the scheduler then starts the next pass). */
fiber *next_ready(worker &w, const fiber &f)
{
    if (w.blk.failed)
        return nullptr;
    unsigned l0 = f.t.warp * 32, n = w.blk.n_threads, nl = n - l0 < 32 ? n - l0 : 32;
    if (!cudaemu::cfg().reverse) {
        for (unsigned l = f.t.lane + 1; l < nl; l++)
            if (w.fibers[l0 + l].state == READY)
                return &w.fibers[l0 + l];
    } else {
        for (unsigned l = f.t.lane; l-- > 0;)
            if (w.fibers[l0 + l].state == READY)
                return &w.fibers[l0 + l];
    }
    return nullptr;
}

/* From the running fiber to the next ready fiber of its warp (one switch instead of two
 * through the scheduler), or back to the scheduler; returns when the fiber is resumed. With
 * final set the fiber never runs again (it has returned, or its block failed). */
void yield(worker &w, bool final)
{
    fiber &f = *w.cur;
    void **fake = final ? nullptr : &f.asan_fake;
    if (fiber *next = next_ready(w, f)) {
#if defined(__x86_64__)
        switch_to(w, *next, &f.sp, fake, false);
#else
        switch_to(w, *next, (void **)&f.ctx, fake, false);
#endif
    } else {
        asan_start(fake, w.sched_bottom, w.sched_size);
#if defined(__x86_64__)
        cudaemu_swap(&f.sp, w.sched_sp);
#else
        swapcontext(&f.ctx, &w.sched_ctx);
#endif
    }
    arrived_in(w, f.asan_fake);
}

[[noreturn]] void fiber_run()
{
    worker &w = *tls_worker;
    arrived_in(w, nullptr);
    w.job->body();
    /* the thread returned */
    fiber &f = *w.cur;
    block_state &b = w.blk;
    warp_state &ws = b.warps[f.t.warp];
    unsigned bit = 1u << f.t.lane;
    if (!b.failed && b.arrived > 0)
        cudaemu_kernel_fault("thread (%u,%u,%u) returned while %u threads of its block wait at "
                             "__syncthreads",
                             f.t.thread_idx.x, f.t.thread_idx.y, f.t.thread_idx.z, b.arrived);
    for (unsigned i = 0; i < ws.n_ops && !b.failed; i++) {
        const warp_op &o = ws.ops[i];
        if (o.arrived != o.mask && (o.mask & bit))
            cudaemu_kernel_fault("lane %u of warp %u returned while lanes 0x%08x wait for it at "
                                 "%s with mask 0x%08x",
                                 f.t.lane, f.t.warp, o.arrived, o.name, o.mask);
    }
    b.exited++;
    ws.exited |= bit;
    f.state = DONE;
    yield(w, true);
    __builtin_unreachable();
}

} // namespace

#if defined(__x86_64__)
extern "C" void cudaemu_fiber_main(void) { fiber_run(); }
#else
static void fiber_trampoline(void) { fiber_run(); }
#endif

namespace {

void start_fiber(fiber &f)
{
    f.state = READY;
    f.asan_fake = nullptr;
    f.op = nullptr;
#if CUDAEMU_ASAN
    /* fiber_run's own frame never returns, and an abandoned fiber's frames never unwind */
    size_t clean = f.dirty ? CUDAEMU_STACK_BYTES : 4096;
    __asan_unpoison_memory_region(f.top - clean, clean);
#endif
    f.dirty = false;
#if defined(__x86_64__)
    /* the frame cudaemu_swap pops: six registers, then "return" into cudaemu_fiber_entry,
     * which must start with the stack 16-byte aligned (its call then pushes 8 bytes, as the
     * ABI expects at a function's entry); two slots of padding above make it so */
    uint64_t *top = (uint64_t *)f.top;
    uint64_t *sp = top - 9;
    for (int i = 0; i < 6; i++)
        sp[i] = 0;
    sp[6] = (uint64_t)(uintptr_t)&cudaemu_fiber_entry;
    sp[7] = sp[8] = 0;
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = (size_t)(f.top - f.stack);
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_trampoline, 0);
#endif
}

std::string block_name(const worker &w, const cudaemu_thread &t)
{
    char s[160];
    snprintf(s, sizeof s, "kernel %s, block (%u,%u,%u)", w.job->name, t.block_idx.x,
             t.block_idx.y, t.block_idx.z);
    return s;
}

/* Every live thread waits and none can go on: says why, as precisely as it can. */
void report_deadlock(worker &w)
{
    block_state &b = w.blk;
    const fiber *blockwait = nullptr;
    for (unsigned i = 0; i < b.n_threads; i++)
        if (w.fibers[i].state == WAIT_BLOCK) {
            blockwait = &w.fibers[i];
            break;
        }
    for (unsigned wi = 0; wi < b.n_warps; wi++) {
        const warp_state &ws = b.warps[wi];
        for (unsigned i = 0; i < ws.n_ops; i++) {
            const warp_op &o = ws.ops[i];
            if (o.arrived == o.mask)
                continue;
            cudaemu::fault(cudaErrorLaunchFailure,
                           "%s: lanes 0x%08x of warp %u wait at %s with mask 0x%08x; lanes "
                           "0x%08x never arrive (%s)",
                           block_name(w, w.fibers[wi * 32].t).c_str(), o.arrived, wi, o.name,
                           o.mask, o.mask & ~o.arrived,
                           blockwait ? "they wait at __syncthreads" : "divergent warp operation");
            return;
        }
    }
    cudaemu::fault(cudaErrorLaunchFailure, "%s: %u threads wait at __syncthreads that can never "
                   "release", block_name(w, blockwait ? blockwait->t : w.fibers[0].t).c_str(),
                   b.arrived);
}

void run_block(worker &w, uint64_t index)
{
    launch_job &job = *w.job;
    const dim3 g = job.c.grid, bd = job.c.block;
    unsigned n = bd.x * bd.y * bd.z;
    grow_fibers(w, n);
    block_state &b = w.blk;
    b.n_threads = n;
    b.arrived = b.exited = 0;
    b.failed = false;
    unsigned n_warps_needed = (n + 31) / 32;
    if (b.warps.size() < n_warps_needed)
        b.warps.resize(n_warps_needed);
    b.n_warps = n_warps_needed;
    for (unsigned wi = 0; wi < n_warps_needed; wi++) {
        warp_state &ws = b.warps[wi];
        ws.present = ws.exited = 0;
        ws.n_ops = 0;
    }
    for (unsigned i = 0; i < n; i++)
        b.warps[i / 32].present |= 1u << (i % 32);
    if (job.c.shared_bytes)
        memset(w.dyn, 0xff, job.c.shared_bytes);
    uint3 bi = {(unsigned)(index % g.x), (unsigned)(index / g.x % g.y),
                (unsigned)(index / g.x / g.y)};
    uint64_t serial = ++block_serials;
    for (unsigned i = 0; i < n; i++) {
        fiber &f = w.fibers[i];
        f.t.thread_idx = uint3{i % bd.x, i / bd.x % bd.y, i / bd.x / bd.y};
        f.t.block_idx = bi;
        f.t.block_dim = bd;
        f.t.grid_dim = g;
        f.t.linear = i;
        f.t.lane = i % 32;
        f.t.warp = i / 32;
        f.t.block_serial = serial;
        f.t.block = &b;
        start_fiber(f);
    }
    /* warp by warp: a warp's lanes run until each has returned or waits at __syncthreads
     * (a warp operation only waits for lanes of its own warp), which keeps the 32 stacks
     * in use warm in the cache */
    const bool rev = cudaemu::cfg().reverse;
    const unsigned n_warps = b.n_warps;
    while (b.exited < n && !b.failed) {
        bool progress = false;
        for (unsigned wk = 0; wk < n_warps && !b.failed; wk++) {
            unsigned wi = rev ? n_warps - 1 - wk : wk;
            unsigned l0 = wi * 32, nl = n - l0 < 32 ? n - l0 : 32;
            for (bool again = true; again && !b.failed;) {
                again = false;
                for (unsigned k = 0; k < nl && !b.failed; k++) {
                    fiber &f = w.fibers[l0 + (rev ? nl - 1 - k : k)];
                    if (f.state != READY)
                        continue;
                    resume(w, f);
                    again = progress = true;
                }
            }
        }
        if (!progress && !b.failed) {
            report_deadlock(w);
            b.failed = true;
        }
    }
    if (b.failed) {
        for (unsigned i = 0; i < n; i++)
            w.fibers[i].dirty = true;
        job.failed = true;
    }
}

void run_blocks(worker &w, launch_job &job)
{
    w.job = &job;
    if (job.c.shared_bytes != w.dyn_bytes) {
        free(w.dyn);
        /* exactly the launch's size, so AddressSanitizer sees its end */
        w.dyn = (char *)malloc(job.c.shared_bytes ? job.c.shared_bytes : 1);
        w.dyn_bytes = job.c.shared_bytes;
    }
    const bool rev = cudaemu::cfg().reverse;
    for (;;) {
        if (job.failed)
            break;
        uint64_t i = job.next.fetch_add(1);
        if (i >= job.n_blocks)
            break;
        run_block(w, rev ? job.n_blocks - 1 - i : i);
    }
    w.job = nullptr;
}

/* ---- the pool that runs blocks ------------------------------------------------------------ */

class pool {
  public:
    static pool &get()
    {
        static pool *p = new pool(); /* never destroyed: its threads wait on it to the end */
        return *p;
    }

    /* Runs every block of job on the pool and the calling thread; one job at a time. */
    void run(launch_job &job)
    {
        std::lock_guard<std::mutex> one(run_mu_);
        unsigned helpers = n_helpers(job);
        if (helpers == 0) {
            run_blocks(self_worker(), job);
            return;
        }
        {
            std::lock_guard<std::mutex> lk(mu_);
            start(helpers);
            job_ = &job;
            wanted_ = helpers;
            busy_ = helpers;
            ++round_;
        }
        cv_.notify_all();
        run_blocks(self_worker(), job);
        std::unique_lock<std::mutex> lk(mu_);
        done_cv_.wait(lk, [&] { return busy_ == 0; });
        job_ = nullptr;
    }

  private:
    unsigned n_helpers(const launch_job &job) const
    {
        unsigned n = cudaemu::cfg().n_workers;
        uint64_t want = job.n_blocks < 2 ? 0 : job.n_blocks - 1;
        return (unsigned)(want < n - 1 ? want : n - 1);
    }

    void start(unsigned helpers)
    {
        while (threads_.size() < helpers) {
            unsigned id = (unsigned)threads_.size();
            threads_.emplace_back([this, id] { loop(id); });
            threads_.back().detach();
        }
    }

    void loop(unsigned id)
    {
        uint64_t seen = 0;
        for (;;) {
            launch_job *job;
            {
                std::unique_lock<std::mutex> lk(mu_);
                cv_.wait(lk, [&] { return round_ != seen; });
                seen = round_;
                if (id >= wanted_)
                    continue;
                job = job_;
            }
            run_blocks(self_worker(), *job);
            std::lock_guard<std::mutex> lk(mu_);
            if (--busy_ == 0)
                done_cv_.notify_all();
        }
    }

    std::mutex run_mu_, mu_;
    std::condition_variable cv_, done_cv_;
    std::vector<std::thread> threads_;
    launch_job *job_ = nullptr;
    unsigned wanted_ = 0, busy_ = 0;
    uint64_t round_ = 0;
};

worker &running()
{
    worker *w = tls_worker;
    if (!w || !w->cur) {
        fprintf(stderr, "cudaemu: a device function was called outside a kernel\n");
        abort();
    }
    return *w;
}

/* Ends the running fiber's block as failed: the fiber never runs again. */
[[noreturn]] void abandon(worker &w)
{
    w.blk.failed = true;
    w.cur->state = DONE;
    yield(w, true);
    __builtin_unreachable();
}

} // namespace

/* ---- the device-side entry points ------------------------------------------------------------ */

void cudaemu_kernel_fault(const char *fmt, ...)
{
    worker &w = running();
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    cudaemu::fault(cudaErrorLaunchFailure, "%s: %s", block_name(w, w.cur->t).c_str(), msg);
    abandon(w);
}

void __syncthreads(void)
{
    worker &w = running();
    block_state &b = w.blk;
    fiber &f = *w.cur;
    if (b.exited)
        cudaemu_kernel_fault("thread (%u,%u,%u) reached __syncthreads after %u threads of its "
                             "block returned",
                             f.t.thread_idx.x, f.t.thread_idx.y, f.t.thread_idx.z, b.exited);
    if (++b.arrived == b.n_threads) {
        b.arrived = 0;
        for (unsigned i = 0; i < b.n_threads; i++)
            if (w.fibers[i].state == WAIT_BLOCK)
                w.fibers[i].state = READY;
        return;
    }
    f.state = WAIT_BLOCK;
    yield(w, false);
    if (b.failed)
        abandon(w);
}

static bool same_op(const char *a, const char *b) { return a == b || strcmp(a, b) == 0; }

const uint64_t *cudaemu_warp_exchange(unsigned mask, uint64_t value, const char *op)
{
    worker &w = running();
    block_state &b = w.blk;
    fiber &f = *w.cur;
    warp_state &ws = b.warps[f.t.warp];
    unsigned bit = 1u << f.t.lane;
    if (!(mask & bit))
        cudaemu_kernel_fault("lane %u of warp %u calls %s with mask 0x%08x, which does not name "
                             "it", f.t.lane, f.t.warp, op, mask);
    if (mask & ~ws.present)
        cudaemu_kernel_fault("%s with mask 0x%08x in warp %u: lanes 0x%08x do not exist (the "
                             "block has %u threads)",
                             op, mask, f.t.warp, mask & ~ws.present, b.n_threads);
    if (mask & ws.exited)
        cudaemu_kernel_fault("%s with mask 0x%08x in warp %u, lane %u: lanes 0x%08x named in "
                             "the mask have returned",
                             op, mask, f.t.warp, f.t.lane, mask & ws.exited);
    /* join the operation in progress of this mask, unless a lane it names waits in another
     * (or this lane is awaited by another): then the lanes disagree about the mask */
    warp_op *o = nullptr;
    for (unsigned i = 0; i < ws.n_ops; i++) {
        warp_op &c = ws.ops[i];
        if (c.arrived == c.mask)
            continue;
        if (c.mask == mask && same_op(c.name, op)) {
            o = &c;
            break;
        }
        if ((c.mask & bit) || (c.arrived & mask))
            cudaemu_kernel_fault("warp %u: lane %u calls %s with mask 0x%08x while lanes 0x%08x "
                                 "wait at %s with mask 0x%08x",
                                 f.t.warp, f.t.lane, op, mask, c.arrived, c.name, c.mask);
    }
    if (!o) {
        if (ws.n_ops == max_warp_ops) { /* cannot happen: one live operation per lane */
            fprintf(stderr, "cudaemu: warp %u has %u operations in progress\n", f.t.warp,
                    ws.n_ops);
            abort();
        }
        o = &ws.ops[ws.n_ops++];
        o->mask = mask;
        o->arrived = 0;
        o->readers = mask;
        o->name = op;
    }
    o->slots[f.t.lane] = value;
    o->arrived |= bit;
    f.op = o;
    if (o->arrived == mask) {
        unsigned base = f.t.warp * 32;
        for (unsigned l = 0; l < 32; l++)
            if ((mask >> l & 1u) && w.fibers[base + l].state == WAIT_WARP)
                w.fibers[base + l].state = READY;
    } else {
        f.state = WAIT_WARP;
        yield(w, false);
        if (b.failed)
            abandon(w);
    }
    /* valid until this lane's cudaemu_warp_release: the operation lives until every lane of
     * its mask has read it */
    return f.op->slots;
}

void cudaemu_warp_release(void)
{
    worker &w = running();
    fiber &f = *w.cur;
    warp_state &ws = w.blk.warps[f.t.warp];
    warp_op *o = f.op;
    f.op = nullptr;
    o->readers &= ~(1u << f.t.lane);
    if (o->readers)
        return;
    /* the last reader: the operation's entry is reused (the last live one moves into it,
     * with the lanes that point at it) */
    warp_op *last = &ws.ops[ws.n_ops - 1];
    if (o != last) {
        *o = *last;
        unsigned base = f.t.warp * 32, n = w.blk.n_threads;
        for (unsigned l = 0; l < 32 && base + l < n; l++)
            if (w.fibers[base + l].op == last)
                w.fibers[base + l].op = o;
    }
    ws.n_ops--;
}

void __syncwarp(unsigned mask)
{
    cudaemu_warp_exchange(mask, 0, "__syncwarp");
    cudaemu_warp_release();
}

void *cudaemu_dynamic_shared(void) { return running().dyn; }

void cudaemu_shared_touch(uint64_t *gen, void *p, size_t n_bytes)
{
    uint64_t serial = running().cur->t.block_serial;
    if (*gen != serial) {
        memset(p, 0xff, n_bytes);
        *gen = serial;
    }
}

cudaError_t cudaemu_launch_body(const cudaemu_launch_config &c, const char *name,
                                std::function<void()> body)
{
    if (cudaError_t e = cudaemu::device_error(0))
        return cudaemu::set_last_error(e);
    if (cudaError_t e = cudaemu::sticky_error())
        return cudaemu::set_last_error(e);
    const dim3 g = c.grid, bd = c.block;
    uint64_t threads = (uint64_t)bd.x * bd.y * bd.z;
    if (!g.x || !g.y || !g.z || !threads || bd.x > 1024 || bd.y > 1024 || bd.z > 64 ||
        threads > max_block_threads || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535)
        return cudaemu::set_last_error(cudaErrorInvalidConfiguration);
    if (c.shared_bytes > max_dynamic_shared)
        return cudaemu::set_last_error(cudaErrorInvalidValue);
    auto job = std::make_shared<launch_job>();
    job->c = c;
    job->name = name;
    job->body = std::move(body);
    job->n_blocks = (uint64_t)g.x * g.y * g.z;
    cudaError_t e = cudaemu::submit(c.stream, [job] {
        if (!cudaemu::sticky_error()) /* a fault earlier on any stream ends the context */
            pool::get().run(*job);
    });
    return cudaemu::set_last_error(e);
}
