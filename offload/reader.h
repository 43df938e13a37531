/*
 * offload/reader.h: many reads of one file in flight at once, through io_uring where the
 * kernel allows it and through a pool of pread threads where it does not; the caller sees
 * the same API either way.
 *
 * A request (offset, n_bytes, dst, tag) is split into chunks of FERRY_READER_CHUNK_BYTES
 * so that up to queue_depth chunks are in flight; it completes when all its chunks have,
 * and ferry_reader_wait hands back its tag and result. The file is opened with O_DIRECT
 * (page-cache bypass, the NVMe tier's mode) unless the filesystem refuses it (tmpfs), and
 * with io_uring a caller-given region is registered so reads into it are READ_FIXED.
 *
 * The environment variable FERRY_READER=pread|uring|auto overrides FERRY_READER_AUTO (an
 * explicit mode passed to ferry_reader_create is honoured as given): "pread" forces the
 * thread pool, "uring" requires io_uring (creation fails with FERRY_ERR_UNSUPPORTED
 * without it), "auto" or unset tries io_uring and falls back to pread.
 */
#ifndef FERRY_OFFLOAD_READER_H
#define FERRY_OFFLOAD_READER_H

#include <stddef.h>
#include <stdint.h>

#include "ferry.h"

#define FERRY_READER_ALIGN 4096u               /* offsets and buffers are multiples */
#define FERRY_READER_CHUNK_BYTES (1u << 20)    /* a request is read in pieces this big */

typedef enum {
    FERRY_READER_AUTO = 0,  /* io_uring if it works here, else pread threads (logged once) */
    FERRY_READER_URING = 1, /* io_uring or FERRY_ERR_UNSUPPORTED */
    FERRY_READER_PREAD = 2, /* a pool of pread threads */
} ferry_reader_mode;

typedef struct ferry_reader ferry_reader;

/* Counters since creation (read under the reader's lock, so they are consistent). */
typedef struct {
    uint64_t n_requests;       /* completed requests, failed ones included */
    uint64_t n_bytes;          /* bytes landed in caller buffers */
    uint64_t n_chunks;         /* reads issued to the kernel or the threads */
    uint64_t n_fixed_chunks;   /* of those, io_uring READ_FIXED into the registered region */
    uint64_t n_direct_chunks;  /* of those, through the O_DIRECT descriptor */
    uint64_t n_resubmits;      /* short reads not at end of file, read again for the rest */
} ferry_reader_stats;

/* Opens path for reading. mode: see ferry_reader_mode and FERRY_READER above; where AUTO
 * falls back to pread it says why once per process through ferry_log(FERRY_LOG_WARN).
 * The file is opened with O_DIRECT and also buffered (for a file's tail that is not a
 * multiple of 4096); where the filesystem refuses O_DIRECT every read is buffered (logged
 * once per process). region/region_bytes (NULL/0 for none): a buffer, 4096-aligned, that
 * reads will land in; with io_uring it is registered and reads that fall inside it use
 * IORING_OP_READ_FIXED (if registering fails, e.g. over RLIMIT_MEMLOCK, that is logged
 * once and reads use plain buffers). The region is borrowed and must outlive the reader.
 * queue_depth (1..4096): chunks in flight; with pread, the number of threads (at most 64).
 * On success *out owns the reader. Returns FERRY_ERR_IO (cannot open: the message names
 * the path and strerror), FERRY_ERR_UNSUPPORTED (io_uring required but unavailable:
 * the message says why), FERRY_ERR_INVALID (NULL path or out, queue_depth out of range, a
 * misaligned region, a bad FERRY_READER value), FERRY_ERR_NOMEM. Thread-safe. */
ferry_status ferry_reader_create(const char *path, ferry_reader_mode mode, int32_t queue_depth,
                                 void *region, size_t region_bytes, ferry_reader **out);

/* Waits for every chunk in flight to land (a read into a caller buffer is never left
 * running), drops requests not yet started, stops the threads and closes the file.
 * NULL-safe. Must not run concurrently with any other call on the reader. */
void ferry_reader_destroy(ferry_reader *r);

/* 1 when the reader uses io_uring, 0 when pread threads. Thread-safe. */
int ferry_reader_uses_uring(const ferry_reader *r);

/* 1 when reads go through O_DIRECT (the filesystem accepted it), 0 when buffered.
 * Thread-safe. */
int ferry_reader_uses_direct(ferry_reader *r);

/* Copies the counters to *out. Thread-safe. */
void ferry_reader_get_stats(ferry_reader *r, ferry_reader_stats *out);

/* Queues a read of n_bytes at file offset into dst; tag comes back from ferry_reader_wait.
 * offset and dst must be multiples of FERRY_READER_ALIGN in every mode (so code tested on
 * tmpfs behaves the same on NVMe); n_bytes need not be: a tail short of a multiple is read
 * through the buffered descriptor, and a read past the end of the file completes with a
 * short-read error. dst is borrowed until the request's completion is returned by
 * ferry_reader_wait (or the reader is destroyed). The read starts at once when fewer than
 * queue_depth chunks are in flight, else as earlier chunks complete (with io_uring, when
 * their completions are collected: by the waiting thread, or by the next submit when no
 * thread is waiting). Returns
 * FERRY_OK, FERRY_ERR_INVALID (n_bytes 0, misalignment, offset + n_bytes overflows),
 * FERRY_ERR_NOMEM (more requests outstanding than ever before and no memory for one more).
 * Thread-safe: any thread may submit, concurrently with a waiting thread. */
ferry_status ferry_reader_submit(ferry_reader *r, uint64_t offset, size_t n_bytes, void *dst,
                                 uint64_t tag);

/* Waits up to timeout_ms (-1: no limit, 0: poll) for the next completed request. When one
 * completes: returns FERRY_OK with *completed = 1, its tag in *tag and its result in
 * *result: FERRY_OK, FERRY_ERR_IO ("<path>: read of N bytes at offset O failed: <strerror>")
 * or FERRY_ERR_FORMAT for a short read ("<path>: read of N bytes at offset O returned M
 * (file truncated?)"); for a failed result the message is this thread's ferry_last_error.
 * When the time runs out first: returns FERRY_OK with *completed = 0 and tag and result
 * untouched. Returns FERRY_ERR_INVALID when nothing is outstanding (every submitted request
 * has already been returned), when another thread is waiting, or on NULL arguments.
 * Completions come back in the order they finish, not the order submitted. One waiting
 * thread at a time; submitters may run concurrently. */
ferry_status ferry_reader_wait(ferry_reader *r, int32_t timeout_ms, uint64_t *tag,
                               ferry_status *result, int *completed);

#endif
