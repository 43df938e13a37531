/*
 * core/fileio.h: file writing shared by the modules that write large files (the packed
 * expert file, synthetic checkpoints), and the one reader of small whole files (config.json,
 * the shard index, tokenizer files).
 */
#ifndef FERRY_CORE_FILEIO_H
#define FERRY_CORE_FILEIO_H

#include <stddef.h>
#include <stdint.h>

#include "ferry.h"

/* Writes n bytes of data at offset of fd, in pieces of at most 1 GiB, retrying on EINTR and
 * short writes. FERRY_ERR_IO naming path, the size and the offset on failure. Thread-safe
 * for disjoint ranges of one file. */
ferry_status ferry_pwrite_all(int fd, const char *path, const void *data, uint64_t n,
                              uint64_t offset);

/* One piece of a file's contents. */
typedef struct {
    const void *data;
    size_t n_bytes;
} ferry_file_part;

/* Replaces path atomically with the concatenated parts: writes the temporary
 * "<path>.<id>.tmp" (core/tempfile.h: unique to this thread, recorded for
 * ferry_remove_temporaries; stale ones of path are swept first), fsyncs it and renames it
 * over path, so a reader sees the old file or the whole new one, never a torn write. On
 * failure the temporary is removed and path is untouched. FERRY_ERR_NOMEM, FERRY_ERR_IO
 * naming the file and strerror. Thread-safe. */
ferry_status ferry_replace_file(const char *path, const ferry_file_part *parts, int32_t n_parts);

/* Reads the whole regular file at path into a NUL-terminated buffer the caller frees
 * (*len_out bytes before the NUL). optional: a file that does not exist is FERRY_OK with
 * *buf_out NULL and *len_out 0. FERRY_ERR_IO (cannot open, not a regular file, a read
 * error, a file that shrank: each naming path), FERRY_ERR_FORMAT (larger than limit bytes),
 * FERRY_ERR_NOMEM. Thread-safe. */
ferry_status ferry_read_small_file(const char *path, uint64_t limit, int optional,
                                   char **buf_out, size_t *len_out);

#endif
