/*
 * core/fileio.c: see fileio.h.
 */
#include "core/fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"
#include "core/tempfile.h"

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

ferry_status ferry_replace_file(const char *path, const ferry_file_part *parts, int32_t n_parts)
{
    ferry_temp t;
    int fd;
    ferry_status st = ferry_temp_create(path, &t, &fd);
    if (st)
        return st;
    uint64_t at = 0;
    for (int32_t i = 0; i < n_parts && st == FERRY_OK; i++) {
        st = ferry_pwrite_all(fd, t.path, parts[i].data, parts[i].n_bytes, at);
        at += parts[i].n_bytes;
    }
    if (st == FERRY_OK && fsync(fd) != 0)
        st = ferry_fail(FERRY_ERR_IO, "%s: write failed: %s", t.path, strerror(errno));
    if (close(fd) != 0 && st == FERRY_OK)
        st = ferry_fail(FERRY_ERR_IO, "%s: write failed: %s", t.path, strerror(errno));
    if (st == FERRY_OK)
        st = ferry_temp_commit(&t, path);
    ferry_temp_abort(&t);
    return st;
}

ferry_status ferry_read_small_file(const char *path, uint64_t limit, int optional,
                                   char **buf_out, size_t *len_out)
{
    ferry_status st;
    char *buf = NULL;
    struct stat sb;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 && optional && errno == ENOENT) {
        *buf_out = NULL;
        *len_out = 0;
        return FERRY_OK;
    }
    if (fd < 0)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (fstat(fd, &sb) != 0) {
        st = ferry_fail(FERRY_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(sb.st_mode)) {
        st = ferry_fail(FERRY_ERR_IO, "%s: not a regular file", path);
        goto fail;
    }
    if ((uint64_t)sb.st_size > limit) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: file is %lld bytes, more than the %llu allowed",
                        path, (long long)sb.st_size, (unsigned long long)limit);
        goto fail;
    }
    size_t len = (size_t)sb.st_size;
    buf = malloc(len + 1);
    if (!buf) {
        st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory for %zu bytes", path, len);
        goto fail;
    }
    size_t got = 0;
    while (got < len) {
        ssize_t r = read(fd, buf + got, len - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            st = ferry_fail(FERRY_ERR_IO, "%s: cannot read: %s", path, strerror(errno));
            goto fail;
        }
        if (r == 0) {
            st = ferry_fail(FERRY_ERR_IO, "%s: file shrank while being read", path);
            goto fail;
        }
        got += (size_t)r;
    }
    buf[len] = 0;
    close(fd);
    *buf_out = buf;
    *len_out = len;
    return FERRY_OK;
fail:
    free(buf);
    close(fd);
    return st;
}
