/*
 * core/fileio.h: file writing shared by the modules that write large files (the packed
 * expert file, synthetic checkpoints).
 */
#ifndef FERRY_CORE_FILEIO_H
#define FERRY_CORE_FILEIO_H

#include <stdint.h>

#include "ferry.h"

/* Writes n bytes of data at offset of fd, in pieces of at most 1 GiB, retrying on EINTR and
 * short writes. FERRY_ERR_IO naming path, the size and the offset on failure. Thread-safe
 * for disjoint ranges of one file. */
ferry_status ferry_pwrite_all(int fd, const char *path, const void *data, uint64_t n,
                              uint64_t offset);

#endif
