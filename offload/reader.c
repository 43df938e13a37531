/*
 * offload/reader.c: see reader.h. Requests are cut into chunks; at most queue_depth
 * chunks are in flight, and a request's remaining bytes wait in a FIFO until a chunk slot
 * frees up, so a huge request never starves the queue and no memory is allocated per
 * read once the reader has seen its high-water mark of outstanding requests.
 *
 * State and its owner. One mutex guards the request and chunk bookkeeping, the counters
 * and, with io_uring, the submission side of the ring (any thread may submit). The
 * completion side is touched by the waiting thread while `waiting` is set (it blocks in
 * the kernel without the lock), and otherwise only under the lock with `waiting` clear
 * (a submitter collecting completions, or destroy), so it has one consumer at a time.
 *   request  free list -> pending FIFO (bytes not yet cut into chunks; only its head can
 *            be partly cut) -> in flight (chunks out) -> done FIFO -> returned by wait
 *   chunk    free list -> in flight: an SQE (io_uring) or the work FIFO / a worker (pread)
 * A chunk goes through the O_DIRECT descriptor when its offset, buffer and length are all
 * multiples of 4096 and the filesystem takes O_DIRECT, else through the buffered one (the
 * unaligned tail of a file, the rest of a short read). A request's unaligned tail shorter
 * than 4096 becomes its own chunk so the aligned part stays direct.
 *
 * io_uring: one ring of queue_depth entries (CQ twice that, so it never overflows); the
 * region is registered in spans of at most 1 GiB (the kernel's limit per buffer) and a
 * chunk never crosses a span. A short read not at end of file is resubmitted for the
 * rest; -EAGAIN/-EINTR are resubmitted; -EINVAL from O_DIRECT turns O_DIRECT off (once,
 * logged) and reads the chunk again buffered. The waiter blocks in io_uring_wait_cqe
 * without the lock, which needs IORING_FEAT_EXT_ARG (Linux 5.11) so that a timed wait
 * takes no SQE; a kernel without it counts as having no io_uring.
 * pread: min(queue_depth, 64) workers take chunks from the work FIFO and loop on pread
 * until the chunk is full or the file ends; completions wake the waiter's condvar.
 */
#include "offload/reader.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "core/error.h"

#define RD_MAX_DEPTH 4096
#define RD_MAX_THREADS 64
#define RD_SPAN_BYTES (1ull << 30) /* largest buffer io_uring registers */
#define RD_MSG_BYTES 400
#define RD_REAP_BATCH 64
#define RD_STUCK_SLICE_MS 10 /* retry period while the kernel refuses SQEs */

typedef struct rd_request {
    struct rd_request *next;     /* free list, pending FIFO or done FIFO */
    struct rd_request *all_next; /* every request allocated, for destroy */
    uint64_t tag;
    uint64_t offset;
    size_t n_bytes;
    uint8_t *dst;
    size_t n_issued;      /* bytes cut into chunks; n_bytes once failed */
    size_t n_read;        /* bytes landed */
    int32_t n_chunks_out; /* chunks in flight */
    int failed;           /* I/O error or end of file: cut no more chunks */
    int hit_eof;
    ferry_status status;
    char msg[RD_MSG_BYTES];
} rd_request;

typedef struct rd_chunk {
    struct rd_chunk *next; /* free list or work FIFO */
    rd_request *req;
    uint64_t offset;
    uint8_t *dst;
    size_t n_bytes;
    int direct;      /* read through fd_direct */
    int fixed_index; /* registered span holding dst, or -1 */
} rd_chunk;

struct ferry_reader {
    char *path;
    int fd_direct; /* -1 when the filesystem refuses O_DIRECT */
    int fd_buffered;
    int use_uring;
    int32_t depth;

    pthread_mutex_t lock; /* everything below; the ring's submission side */
    int lock_ready;
    int direct_ok; /* O_DIRECT in use (cleared if the kernel rejects a direct read) */
    rd_chunk *chunks; /* depth slots */
    rd_chunk *free_chunks;
    int32_t n_chunks_out;
    rd_request *free_reqs, *all_reqs;
    rd_request *pend_head, *pend_tail;
    rd_request *done_head, *done_tail;
    int64_t n_outstanding; /* submitted and not yet returned by wait */
    int waiting;
    int stopping;
    ferry_reader_stats stats;

    /* io_uring */
    struct io_uring ring;
    int ring_ready;
    uint8_t *region;
    size_t region_bytes;
    int32_t n_fixed; /* registered spans; 0 when nothing is registered */
    int sq_stuck;    /* prepared SQEs the kernel has not taken yet */

    /* pread */
    pthread_cond_t work_cv; /* workers wait for chunks */
    pthread_cond_t done_cv; /* the waiter waits for completions */
    int cv_ready;
    rd_chunk *work_head, *work_tail;
    pthread_t *threads;
    int32_t n_threads;
    int stop_threads;
};

static atomic_flag g_logged_direct = ATOMIC_FLAG_INIT;
static atomic_flag g_logged_direct_off = ATOMIC_FLAG_INIT;
static atomic_flag g_logged_uring = ATOMIC_FLAG_INIT;
static atomic_flag g_logged_register = ATOMIC_FLAG_INIT;
static atomic_flag g_logged_submit = ATOMIC_FLAG_INIT;

static int aligned(uint64_t x) { return x % FERRY_READER_ALIGN == 0; }

/* ---- bookkeeping (under lock) ------------------------------------------------------ */

static void choose_fd_locked(ferry_reader *r, rd_chunk *c)
{
    c->direct = r->direct_ok && aligned(c->offset) && aligned((uintptr_t)c->dst)
                && aligned(c->n_bytes);
}

static void finish_request_locked(ferry_reader *r, rd_request *q)
{
    if (q->status == FERRY_OK && q->n_read != q->n_bytes) {
        q->status = FERRY_ERR_FORMAT;
        snprintf(q->msg, sizeof q->msg, "%s: read of %zu bytes at offset %llu returned %zu (file "
                 "truncated?)", r->path, q->n_bytes, (unsigned long long)q->offset, q->n_read);
    }
    r->stats.n_requests++;
    q->next = NULL;
    if (r->done_tail)
        r->done_tail->next = q;
    else
        r->done_head = q;
    r->done_tail = q;
    if (r->cv_ready)
        pthread_cond_signal(&r->done_cv);
}

static void release_chunk_locked(ferry_reader *r, rd_chunk *c)
{
    rd_request *q = c->req;
    c->req = NULL;
    c->next = r->free_chunks;
    r->free_chunks = c;
    r->n_chunks_out--;
    q->n_chunks_out--;
    if (q->n_chunks_out == 0 && q->n_issued == q->n_bytes)
        finish_request_locked(r, q);
}

/* Stops cutting chunks of q; q, if still partly uncut, is the pending FIFO's head. */
static void fail_request_locked(ferry_reader *r, rd_request *q)
{
    q->failed = 1;
    if (q->n_issued < q->n_bytes) {
        r->pend_head = q->next;
        if (!r->pend_head)
            r->pend_tail = NULL;
        q->n_issued = q->n_bytes;
    }
}

/* Accounts the outcome of one read of chunk c: res bytes (>= 0) or -errno. short_is_eof:
 * the reader already looped on the read, so fewer bytes than asked means end of file.
 * Returns 1 when c must be started again for its remaining bytes; otherwise c is released. */
static int chunk_result_locked(ferry_reader *r, rd_chunk *c, int64_t res, int short_is_eof)
{
    rd_request *q = c->req;
    if (res == -EINTR || res == -EAGAIN)
        return 1;
    if (res == -EINVAL && c->direct) {
        if (r->direct_ok && !atomic_flag_test_and_set(&g_logged_direct_off))
            ferry_log(FERRY_LOG_WARN, "%s: the kernel refused an O_DIRECT read; reading through "
                      "the page cache from now on", r->path);
        r->direct_ok = 0;
        c->direct = 0;
        return 1;
    }
    if (res < 0) {
        if (q->status == FERRY_OK) {
            q->status = FERRY_ERR_IO;
            snprintf(q->msg, sizeof q->msg, "%s: read of %zu bytes at offset %llu failed: %s",
                     r->path, c->n_bytes, (unsigned long long)c->offset, strerror((int)-res));
        }
        fail_request_locked(r, q);
        release_chunk_locked(r, c);
        return 0;
    }
    q->n_read += (size_t)res;
    r->stats.n_bytes += (uint64_t)res;
    if ((size_t)res == c->n_bytes) {
        release_chunk_locked(r, c);
        return 0;
    }
    if (res == 0 || short_is_eof) {
        q->hit_eof = 1;
        fail_request_locked(r, q);
        release_chunk_locked(r, c);
        return 0;
    }
    c->offset += (uint64_t)res;
    c->dst += res;
    c->n_bytes -= (size_t)res;
    r->stats.n_resubmits++;
    return 1;
}

/* Hands the SQEs prepared so far to the kernel; remembers if it did not take them all. */
static void flush_sq_locked(ferry_reader *r)
{
    int rc;
    do
        rc = io_uring_submit(&r->ring);
    while (rc == -EINTR);
    r->sq_stuck = io_uring_sq_ready(&r->ring) > 0;
    if (rc < 0 && rc != -EAGAIN && rc != -EBUSY && !atomic_flag_test_and_set(&g_logged_submit))
        ferry_log(FERRY_LOG_ERROR, "%s: io_uring_submit failed: %s; retrying", r->path,
                  strerror(-rc));
}

/* Starts chunk c: an SQE (io_uring) or the work FIFO (pread). */
static void start_chunk_locked(ferry_reader *r, rd_chunk *c)
{
    choose_fd_locked(r, c);
    r->stats.n_chunks++;
    r->stats.n_direct_chunks += (uint64_t)c->direct;
    if (!r->use_uring) {
        c->next = NULL;
        if (r->work_tail)
            r->work_tail->next = c;
        else
            r->work_head = c;
        r->work_tail = c;
        pthread_cond_signal(&r->work_cv);
        return;
    }
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) { /* cannot happen with <= depth chunks out; flush and try once more */
        flush_sq_locked(r);
        sqe = io_uring_get_sqe(&r->ring);
    }
    if (!sqe) {
        chunk_result_locked(r, c, -EBUSY, 0);
        return;
    }
    int fd = c->direct ? r->fd_direct : r->fd_buffered;
    if (c->fixed_index >= 0) {
        io_uring_prep_read_fixed(sqe, fd, c->dst, (unsigned)c->n_bytes, c->offset,
                                 c->fixed_index);
        r->stats.n_fixed_chunks++;
    } else {
        io_uring_prep_read(sqe, fd, c->dst, (unsigned)c->n_bytes, c->offset);
    }
    io_uring_sqe_set_data(sqe, c);
}

/* Cuts chunks from the pending FIFO into free slots and starts them. */
static void issue_locked(ferry_reader *r)
{
    while (!r->stopping && r->free_chunks && r->pend_head) {
        rd_request *q = r->pend_head;
        rd_chunk *c = r->free_chunks;
        r->free_chunks = c->next;
        size_t left = q->n_bytes - q->n_issued;
        size_t len = left < FERRY_READER_CHUNK_BYTES ? left : FERRY_READER_CHUNK_BYTES;
        uint8_t *dst = q->dst + q->n_issued;
        c->fixed_index = -1;
        if (r->n_fixed > 0 && dst >= r->region && dst < r->region + r->region_bytes) {
            size_t rel = (size_t)(dst - r->region);
            size_t span = (size_t)(rel / RD_SPAN_BYTES);
            size_t span_end = (span + 1) * RD_SPAN_BYTES;
            if (span_end > r->region_bytes)
                span_end = r->region_bytes;
            if (len > span_end - rel)
                len = span_end - rel;
            c->fixed_index = (int)span;
        }
        if (len > FERRY_READER_ALIGN && !aligned(len))
            len -= len % FERRY_READER_ALIGN;
        c->req = q;
        c->offset = q->offset + q->n_issued;
        c->dst = dst;
        c->n_bytes = len;
        q->n_issued += len;
        q->n_chunks_out++;
        r->n_chunks_out++;
        if (q->n_issued == q->n_bytes) {
            r->pend_head = q->next;
            if (!r->pend_head)
                r->pend_tail = NULL;
        }
        start_chunk_locked(r, c);
    }
    if (r->use_uring && io_uring_sq_ready(&r->ring) > 0)
        flush_sq_locked(r);
}

/* Takes every completion the ring holds (the waiting thread or destroy only). */
static void reap_locked(ferry_reader *r)
{
    struct io_uring_cqe *cqes[RD_REAP_BATCH];
    unsigned n;
    while ((n = io_uring_peek_batch_cqe(&r->ring, cqes, RD_REAP_BATCH)) > 0) {
        for (unsigned i = 0; i < n; i++) {
            rd_chunk *c = io_uring_cqe_get_data(cqes[i]);
            if (chunk_result_locked(r, c, cqes[i]->res, 0)) {
                if (r->stopping)
                    release_chunk_locked(r, c);
                else
                    start_chunk_locked(r, c);
            }
        }
        io_uring_cq_advance(&r->ring, n);
    }
    issue_locked(r);
}

/* ---- pread workers ----------------------------------------------------------------- */

/* Reads the whole chunk (looping on short reads); returns the bytes read, fewer only at
 * end of file, or -errno. */
static int64_t read_chunk(const ferry_reader *r, const rd_chunk *c)
{
    size_t got = 0;
    int fd = c->direct ? r->fd_direct : r->fd_buffered;
    while (got < c->n_bytes) {
        ssize_t k = pread(fd, c->dst + got, c->n_bytes - got, (off_t)(c->offset + got));
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return -(int64_t)errno;
        if (k == 0)
            break;
        got += (size_t)k;
        if (!aligned(got)) /* the rest cannot go through O_DIRECT */
            fd = r->fd_buffered;
    }
    return (int64_t)got;
}

static void *worker_main(void *arg)
{
    ferry_reader *r = arg;
    pthread_mutex_lock(&r->lock);
    for (;;) {
        while (!r->stop_threads && !r->work_head)
            pthread_cond_wait(&r->work_cv, &r->lock);
        if (r->stop_threads)
            break;
        rd_chunk *c = r->work_head;
        r->work_head = c->next;
        if (!r->work_head)
            r->work_tail = NULL;
        if (!r->direct_ok)
            c->direct = 0;
        pthread_mutex_unlock(&r->lock);
        int64_t res = read_chunk(r, c);
        pthread_mutex_lock(&r->lock);
        if (chunk_result_locked(r, c, res, 1))
            start_chunk_locked(r, c);
        issue_locked(r);
    }
    pthread_mutex_unlock(&r->lock);
    return NULL;
}

/* ---- create / destroy -------------------------------------------------------------- */

/* Tries io_uring; on failure writes why to why and returns 0. */
static int setup_uring(ferry_reader *r, char *why, size_t why_cap)
{
    int rc = io_uring_queue_init((unsigned)r->depth, &r->ring, 0);
    if (rc < 0) {
        snprintf(why, why_cap, "io_uring_queue_init: %s", strerror(-rc));
        return 0;
    }
    if (!(r->ring.features & IORING_FEAT_EXT_ARG)) {
        io_uring_queue_exit(&r->ring);
        snprintf(why, why_cap, "the kernel lacks IORING_FEAT_EXT_ARG (Linux < 5.11)");
        return 0;
    }
    r->ring_ready = 1;
    r->use_uring = 1;
    if (!r->region)
        return 1;
    size_t n_spans = (r->region_bytes + RD_SPAN_BYTES - 1) / RD_SPAN_BYTES;
    struct iovec *iov = calloc(n_spans, sizeof *iov);
    rc = -ENOMEM;
    if (iov) {
        for (size_t i = 0; i < n_spans; i++) {
            size_t start = i * RD_SPAN_BYTES, end = start + RD_SPAN_BYTES;
            iov[i].iov_base = r->region + start;
            iov[i].iov_len = (end > r->region_bytes ? r->region_bytes : end) - start;
        }
        rc = io_uring_register_buffers(&r->ring, iov, (unsigned)n_spans);
        free(iov);
    }
    if (rc == 0)
        r->n_fixed = (int32_t)n_spans;
    else if (!atomic_flag_test_and_set(&g_logged_register))
        ferry_log(FERRY_LOG_WARN, "%s: cannot register the %zu-byte read buffer with io_uring "
                  "(%s; RLIMIT_MEMLOCK?); reads use unregistered buffers", r->path,
                  r->region_bytes, strerror(-rc));
    return 1;
}

static ferry_status setup_threads(ferry_reader *r)
{
    pthread_condattr_t ca;
    if (pthread_condattr_init(&ca) != 0)
        return ferry_fail(FERRY_ERR_NOMEM, "%s: cannot create the reader's condition", r->path);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    int ok = pthread_cond_init(&r->done_cv, &ca) == 0;
    if (ok && pthread_cond_init(&r->work_cv, NULL) != 0) {
        pthread_cond_destroy(&r->done_cv);
        ok = 0;
    }
    pthread_condattr_destroy(&ca);
    if (!ok)
        return ferry_fail(FERRY_ERR_NOMEM, "%s: cannot create the reader's condition", r->path);
    r->cv_ready = 1;
    int32_t n = r->depth < RD_MAX_THREADS ? r->depth : RD_MAX_THREADS;
    r->threads = calloc((size_t)n, sizeof *r->threads);
    if (!r->threads)
        return ferry_fail(FERRY_ERR_NOMEM, "%s: no memory for %d reader threads", r->path, n);
    for (int32_t i = 0; i < n; i++) {
        int rc = pthread_create(&r->threads[i], NULL, worker_main, r);
        if (rc != 0)
            return ferry_fail(FERRY_ERR_NOMEM, "%s: cannot start reader thread %d of %d: %s",
                              r->path, i + 1, n, strerror(rc));
        r->n_threads++;
    }
    return FERRY_OK;
}

/* Reads FERRY_READER into *mode when mode is AUTO. */
static ferry_status apply_env(ferry_reader_mode *mode)
{
    const char *v = getenv("FERRY_READER");
    if (*mode != FERRY_READER_AUTO || !v || !*v)
        return FERRY_OK;
    if (strcmp(v, "pread") == 0)
        *mode = FERRY_READER_PREAD;
    else if (strcmp(v, "uring") == 0)
        *mode = FERRY_READER_URING;
    else if (strcmp(v, "auto") != 0)
        return ferry_fail(FERRY_ERR_INVALID, "FERRY_READER='%.64s': expected pread, uring or auto",
                          v);
    return FERRY_OK;
}

ferry_status ferry_reader_create(const char *path, ferry_reader_mode mode, int32_t queue_depth,
                                 void *region, size_t region_bytes, ferry_reader **out)
{
    if (!path || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_reader_create: NULL argument");
    if (queue_depth < 1 || queue_depth > RD_MAX_DEPTH)
        return ferry_fail(FERRY_ERR_INVALID, "%s: reader queue depth %d out of range 1..%d", path,
                          queue_depth, RD_MAX_DEPTH);
    if ((region == NULL) != (region_bytes == 0) || !aligned((uintptr_t)region)
        || !aligned(region_bytes))
        return ferry_fail(FERRY_ERR_INVALID, "%s: reader region %p of %zu bytes: both must be "
                          "multiples of %u (or NULL and 0)", path, region, region_bytes,
                          FERRY_READER_ALIGN);
    if ((unsigned)mode > FERRY_READER_PREAD)
        return ferry_fail(FERRY_ERR_INVALID, "%s: reader mode %d unknown", path, (int)mode);
    ferry_status st = apply_env(&mode);
    if (st != FERRY_OK)
        return st;

    ferry_reader *r = calloc(1, sizeof *r);
    if (!r)
        return ferry_fail(FERRY_ERR_NOMEM, "%s: no memory for a reader", path);
    r->fd_direct = r->fd_buffered = -1;
    r->depth = queue_depth;
    r->region = region;
    r->region_bytes = region_bytes;
    r->path = strdup(path);
    r->chunks = calloc((size_t)queue_depth, sizeof *r->chunks);
    if (!r->path || !r->chunks || pthread_mutex_init(&r->lock, NULL) != 0) {
        st = ferry_fail(FERRY_ERR_NOMEM, "%s: no memory for a reader", path);
        goto fail;
    }
    r->lock_ready = 1;
    for (int32_t i = queue_depth - 1; i >= 0; i--) {
        r->chunks[i].next = r->free_chunks;
        r->free_chunks = &r->chunks[i];
    }

    r->fd_buffered = open(path, O_RDONLY | O_CLOEXEC);
    if (r->fd_buffered < 0) {
        st = ferry_fail(FERRY_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    r->fd_direct = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
    if (r->fd_direct < 0 && !atomic_flag_test_and_set(&g_logged_direct))
        ferry_log(FERRY_LOG_WARN, "%s: the filesystem refuses O_DIRECT (%s); reading through the "
                  "page cache", path, strerror(errno));
    r->direct_ok = r->fd_direct >= 0;

    if (mode != FERRY_READER_PREAD) {
        char why[160];
        if (!setup_uring(r, why, sizeof why)) {
            if (mode == FERRY_READER_URING) {
                st = ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: io_uring is unavailable here (%s)",
                                path, why);
                goto fail;
            }
            if (!atomic_flag_test_and_set(&g_logged_uring))
                ferry_log(FERRY_LOG_WARN, "io_uring is unavailable (%s); reading with pread "
                          "threads", why);
        }
    }
    if (!r->use_uring && (st = setup_threads(r)) != FERRY_OK)
        goto fail;
    *out = r;
    return FERRY_OK;

fail:
    ferry_reader_destroy(r);
    return st;
}

void ferry_reader_destroy(ferry_reader *r)
{
    if (!r)
        return;
    if (r->lock_ready) {
        pthread_mutex_lock(&r->lock);
        r->stopping = 1;
        r->stop_threads = 1;
        if (r->cv_ready)
            pthread_cond_broadcast(&r->work_cv);
        pthread_mutex_unlock(&r->lock);
    }
    for (int32_t i = 0; i < r->n_threads; i++)
        pthread_join(r->threads[i], NULL);
    if (r->ring_ready) {
        /* Chunks the kernel has taken write into caller memory: wait for each of them.
         * SQEs it never took die with the ring. */
        pthread_mutex_lock(&r->lock);
        if (r->sq_stuck)
            flush_sq_locked(r);
        while (r->n_chunks_out - (int32_t)io_uring_sq_ready(&r->ring) > 0) {
            pthread_mutex_unlock(&r->lock);
            struct io_uring_cqe *cqe;
            struct __kernel_timespec ts = {0, RD_STUCK_SLICE_MS * 1000000LL};
            io_uring_wait_cqe_timeout(&r->ring, &cqe, &ts);
            pthread_mutex_lock(&r->lock);
            reap_locked(r);
            if (r->sq_stuck)
                flush_sq_locked(r);
        }
        pthread_mutex_unlock(&r->lock);
        io_uring_queue_exit(&r->ring);
    }
    if (r->fd_direct >= 0)
        close(r->fd_direct);
    if (r->fd_buffered >= 0)
        close(r->fd_buffered);
    while (r->all_reqs) {
        rd_request *q = r->all_reqs;
        r->all_reqs = q->all_next;
        free(q);
    }
    if (r->cv_ready) {
        pthread_cond_destroy(&r->work_cv);
        pthread_cond_destroy(&r->done_cv);
    }
    if (r->lock_ready)
        pthread_mutex_destroy(&r->lock);
    free(r->threads);
    free(r->chunks);
    free(r->path);
    free(r);
}

int ferry_reader_uses_uring(const ferry_reader *r) { return r->use_uring; }

int ferry_reader_uses_direct(ferry_reader *r)
{
    pthread_mutex_lock(&r->lock);
    int d = r->direct_ok;
    pthread_mutex_unlock(&r->lock);
    return d;
}

void ferry_reader_get_stats(ferry_reader *r, ferry_reader_stats *out)
{
    pthread_mutex_lock(&r->lock);
    *out = r->stats;
    pthread_mutex_unlock(&r->lock);
}

/* ---- submit / wait ----------------------------------------------------------------- */

ferry_status ferry_reader_submit(ferry_reader *r, uint64_t offset, size_t n_bytes, void *dst,
                                 uint64_t tag)
{
    if (!r || !dst)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_reader_submit: NULL argument");
    if (n_bytes == 0 || !aligned(offset) || !aligned((uintptr_t)dst)
        || offset + n_bytes < offset)
        return ferry_fail(FERRY_ERR_INVALID, "%s: read of %zu bytes at offset %llu into %p: the "
                          "size must be positive, the offset and buffer multiples of %u",
                          r->path, n_bytes, (unsigned long long)offset, dst, FERRY_READER_ALIGN);
    pthread_mutex_lock(&r->lock);
    rd_request *q = r->free_reqs;
    if (q) {
        r->free_reqs = q->next;
    } else {
        q = malloc(sizeof *q);
        if (!q) {
            pthread_mutex_unlock(&r->lock);
            return ferry_fail(FERRY_ERR_NOMEM, "%s: no memory for one more read request",
                              r->path);
        }
        q->all_next = r->all_reqs;
        r->all_reqs = q;
    }
    q->next = NULL;
    q->tag = tag;
    q->offset = offset;
    q->n_bytes = n_bytes;
    q->dst = dst;
    q->n_issued = q->n_read = 0;
    q->n_chunks_out = 0;
    q->failed = q->hit_eof = 0;
    q->status = FERRY_OK;
    q->msg[0] = 0;
    if (r->pend_tail)
        r->pend_tail->next = q;
    else
        r->pend_head = q;
    r->pend_tail = q;
    r->n_outstanding++;
    /* With no thread waiting the completion queue is free: collecting what has landed
     * frees chunk slots, so a full queue keeps moving between waits. */
    if (r->use_uring && !r->waiting)
        reap_locked(r);
    else
        issue_locked(r);
    pthread_mutex_unlock(&r->lock);
    return FERRY_OK;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* One blocking step of the io_uring waiter, lock released around the kernel wait. Returns
 * 0 (something may have completed), -ETIME (deadline passed) or another -errno. */
static int uring_wait_step_locked(ferry_reader *r, int64_t deadline)
{
    if (r->sq_stuck)
        flush_sq_locked(r);
    int64_t left = deadline < 0 ? -1 : deadline - now_ns();
    if (deadline >= 0 && left < 0)
        left = 0;
    if (r->sq_stuck && (left < 0 || left > RD_STUCK_SLICE_MS * 1000000LL))
        left = RD_STUCK_SLICE_MS * 1000000LL;
    pthread_mutex_unlock(&r->lock);
    struct io_uring_cqe *cqe;
    int rc;
    if (left < 0) {
        rc = io_uring_wait_cqe(&r->ring, &cqe);
    } else {
        struct __kernel_timespec ts = {left / 1000000000LL, left % 1000000000LL};
        rc = io_uring_wait_cqe_timeout(&r->ring, &cqe, &ts);
    }
    pthread_mutex_lock(&r->lock);
    if (rc == 0 || rc == -EINTR || rc == -EAGAIN) {
        reap_locked(r);
        return 0;
    }
    if (rc == -ETIME) {
        reap_locked(r);
        return deadline >= 0 && now_ns() >= deadline && !r->done_head ? -ETIME : 0;
    }
    return rc;
}

ferry_status ferry_reader_wait(ferry_reader *r, int32_t timeout_ms, uint64_t *tag,
                               ferry_status *result, int *completed)
{
    if (!r || !tag || !result || !completed)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_reader_wait: NULL argument");
    pthread_mutex_lock(&r->lock);
    if (r->waiting || r->n_outstanding == 0) {
        int other = r->waiting;
        pthread_mutex_unlock(&r->lock);
        return ferry_fail(FERRY_ERR_INVALID, "%s: %s", r->path,
                          other ? "another thread is already waiting on this reader"
                                : "wait with no read outstanding");
    }
    r->waiting = 1;
    const int64_t deadline = timeout_ms < 0 ? -1 : now_ns() + (int64_t)timeout_ms * 1000000LL;
    ferry_status st = FERRY_OK;
    rd_request *q = NULL;
    for (;;) {
        if (r->done_head) {
            q = r->done_head;
            r->done_head = q->next;
            if (!r->done_head)
                r->done_tail = NULL;
            r->n_outstanding--;
            break;
        }
        if (r->use_uring) {
            int rc = uring_wait_step_locked(r, deadline);
            if (rc == -ETIME)
                break;
            if (rc < 0) {
                st = ferry_fail(FERRY_ERR_IO, "%s: waiting for io_uring completions failed: %s",
                                r->path, strerror(-rc));
                break;
            }
        } else if (deadline < 0) {
            pthread_cond_wait(&r->done_cv, &r->lock);
        } else {
            struct timespec ts = {deadline / 1000000000LL, deadline % 1000000000LL};
            if (pthread_cond_timedwait(&r->done_cv, &r->lock, &ts) == ETIMEDOUT && !r->done_head)
                break;
        }
    }
    r->waiting = 0;
    if (st != FERRY_OK) {
        pthread_mutex_unlock(&r->lock);
        return st;
    }
    if (!q) {
        pthread_mutex_unlock(&r->lock);
        *completed = 0;
        return FERRY_OK;
    }
    uint64_t q_tag = q->tag;
    ferry_status q_status = q->status;
    char msg[RD_MSG_BYTES];
    if (q_status != FERRY_OK)
        memcpy(msg, q->msg, sizeof msg);
    q->next = r->free_reqs;
    r->free_reqs = q;
    pthread_mutex_unlock(&r->lock);
    if (q_status != FERRY_OK)
        ferry_fail(q_status, "%s", msg);
    *tag = q_tag;
    *result = q_status;
    *completed = 1;
    return FERRY_OK;
}
