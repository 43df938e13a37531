/*
 * core/fileio.c: see fileio.h.
 */
#include "core/fileio.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "core/error.h"

#define FERRY_MAX_WRITE (1u << 30)

ferry_status ferry_pwrite_all(int fd, const char *path, const void *data, uint64_t n,
                              uint64_t offset)
{
    const uint8_t *p = data;
    while (n > 0) {
        size_t step = n > FERRY_MAX_WRITE ? FERRY_MAX_WRITE : (size_t)n;
        ssize_t w = pwrite(fd, p, step, (off_t)offset);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return ferry_fail(FERRY_ERR_IO, "%s: write of %zu bytes at offset %llu failed: %s",
                              path, step, (unsigned long long)offset,
                              w < 0 ? strerror(errno) : "no progress");
        p += w;
        n -= (uint64_t)w;
        offset += (uint64_t)w;
    }
    return FERRY_OK;
}
