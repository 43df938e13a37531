/*
 * cudaemu/emu_internal.h: what the emulated CUDA runtime's files share (runtime.cpp,
 * launch.cpp, cublas.cpp). Not seen by the code under test: it sees only the replacement
 * headers in cudaemu/include.
 *
 * Streams: an operation is submitted to a stream as a closure. In the synchronous mode (the
 * default) it runs at once on the calling thread; with CUDAEMU_ASYNC=1 each stream has a
 * worker thread that runs its operations in submission order, later, as a GPU would.
 *
 * Faults: what a GPU would report as a fault while running an operation (an access outside
 * device memory, a divergent barrier) is printed to stderr naming what went wrong and
 * becomes a sticky error: every later runtime call returns it, as on a GPU, until
 * cudaDeviceReset.
 */
#ifndef CUDAEMU_EMU_INTERNAL_H
#define CUDAEMU_EMU_INTERNAL_H

#include <cstddef>
#include <functional>

#include <cuda_runtime.h>

namespace cudaemu {

/* Runs op on stream s after everything submitted to s before it (s may be 0, the default
 * stream). Returns the sticky error if there is one (op is then dropped), else cudaSuccess. */
cudaError_t submit(cudaStream_t s, std::function<void()> op);

/* 1 when [p, p + n_bytes) lies inside one live device allocation (cudaMalloc). */
bool device_range(const void *p, size_t n_bytes);

/* Records a fault found while running an operation: prints "cudaemu: <message>" to stderr
 * and makes e the sticky error. Thread-safe. */
void fault(cudaError_t e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* cudaErrorNoDevice when the emulated machine has no GPU (CUDAEMU_DEVICES=0),
 * cudaErrorInvalidDevice for a device it does not have, else cudaSuccess. */
cudaError_t device_error(int device);

/* The sticky error, or cudaSuccess. */
cudaError_t sticky_error();

/* Sets the calling thread's last error (what cudaGetLastError returns) and returns e. */
cudaError_t set_last_error(cudaError_t e);

/* Configuration read once from the environment (README: the emulated CUDA build). */
struct config {
    bool async;              /* CUDAEMU_ASYNC=1: a worker thread per stream */
    unsigned copy_delay_us;  /* CUDAEMU_COPY_DELAY_US: each copy waits this long (async) */
    bool reverse;            /* CUDAEMU_ORDER=reverse: threads and blocks in reverse order */
    size_t mem_total;        /* CUDAEMU_MEM: device memory in bytes (default 16 GiB) */
    int n_devices;           /* CUDAEMU_DEVICES: 0 emulates a machine without a GPU */
    unsigned n_workers;      /* CUDAEMU_THREADS: threads that run a kernel's blocks */
};
const config &cfg();

} // namespace cudaemu

#endif
