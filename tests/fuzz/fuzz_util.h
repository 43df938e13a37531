/*
 * tests/fuzz/fuzz_util.h: what the fuzz targets share: an invariant check that names the
 * broken condition and aborts, an input handed to a parser that takes a path (an in-memory
 * file, memfd, opened as /proc/self/fd/N), a scratch folder on tmpfs for writers, a silenced
 * library log, and the check that a rejected input got a message naming what it rejected.
 *
 * A target is tests/fuzz/fuzz_NAME.c defining LLVMFuzzerTestOneInput (and optionally
 * LLVMFuzzerInitialize). `make fuzz` builds it with libFuzzer (clang, FERRY_FUZZ=ON) and runs
 * it over tests/fuzz/corpus/NAME, tests/fuzz/regress/NAME and the seeds tests/fuzz/seeds.sh
 * makes from real files, with the dictionaries tests/fuzz/NAME.dict (when it exists) and
 * those a line " * Dictionaries: a.dict b.dict" in the target's opening comment names. The
 * normal build links it with tests/fuzz/replay_main.c instead (any compiler) and replays
 * corpus/NAME and regress/NAME as the ctest test test_fuzz_regress_NAME.
 *
 * Invariant checks (FUZZ_CHECK) are for what a parser promises about what it accepted; the
 * inputs themselves are untrusted and any of them may be rejected.
 */
#ifndef FERRY_TESTS_FUZZ_UTIL_H
#define FERRY_TESTS_FUZZ_UTIL_H

#include <errno.h>
#include <ftw.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ferry.h"

/* Prints "file:line: invariant 'cond' broken: <message>" and aborts (a finding). */
#define FUZZ_CHECK(cond, ...)                                                                  \
    do {                                                                                       \
        if (!(cond))                                                                           \
            fuzz_broken(__FILE__, __LINE__, #cond, __VA_ARGS__);                               \
    } while (0)

__attribute__((noreturn, format(printf, 4, 5))) static inline void
fuzz_broken(const char *file, int line, const char *cond, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s:%d: invariant '%s' broken: ", file, line, cond);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    abort();
}

/* The harness itself cannot go on (no memfd, no scratch folder): not a finding in the code
 * under test, but nothing can be checked either. */
__attribute__((noreturn)) static inline void fuzz_setup_failed(const char *what)
{
    fprintf(stderr, "fuzz harness: %s: %s\n", what, strerror(errno));
    abort();
}

static inline void fuzz_silent_log(ferry_log_level level, const char *msg, void *user)
{
    (void)level;
    (void)msg;
    (void)user;
}

/* Drops the library's log lines (a parser that logs what it tolerates would fill the
 * fuzzer's output). Idempotent. */
static inline void fuzz_quiet(void) { ferry_set_log(FERRY_LOG_ERROR, fuzz_silent_log, NULL); }

/* The LLVMFuzzerInitialize of a target that needs nothing but quiet logs. */
#define FUZZ_INITIALIZE_QUIET()                                                                \
    int LLVMFuzzerInitialize(int *argc, char ***argv)                                          \
    {                                                                                          \
        (void)argc;                                                                            \
        (void)argv;                                                                            \
        fuzz_quiet();                                                                          \
        return 0;                                                                              \
    }

/* Offset of the first byte of s[0..n) that is not part of well-formed UTF-8 (RFC 3629: no
 * overlongs, no surrogates, nothing past U+10FFFF), n if none: the targets' own reference,
 * independent of the code under test. */
static inline size_t fuzz_utf8_bad(const void *p, size_t n)
{
    const uint8_t *s = p;
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t len = c < 0x80                 ? 1
                     : c >= 0xC2 && c <= 0xDF ? 2
                     : c >= 0xE0 && c <= 0xEF ? 3
                     : c >= 0xF0 && c <= 0xF4 ? 4
                                              : 0;
        if (len == 0 || len > n - i)
            return i;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
        else if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
        for (size_t k = 1; k < len; k++) {
            uint8_t d = s[i + k];
            if (d < (k == 1 ? lo : 0x80) || d > (k == 1 ? hi : 0xBF))
                return i;
        }
        i += len;
    }
    return n;
}

/* An in-memory file holding data[0, size), open for reading and writing; its path
 * ("/proc/self/fd/N") goes to path (cap >= 32). Close the returned descriptor when done. */
static inline int fuzz_memfd(const uint8_t *data, size_t size, char *path, size_t cap)
{
    int fd = memfd_create("ferry-fuzz", MFD_CLOEXEC);
    if (fd < 0)
        fuzz_setup_failed("memfd_create");
    for (size_t done = 0; done < size;) {
        ssize_t n = write(fd, data + done, size - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            fuzz_setup_failed("writing the input to the memfd");
        done += (size_t)n;
    }
    snprintf(path, cap, "/proc/self/fd/%d", fd);
    return fd;
}

/* Writes data[0, size) to path, replacing what was there. */
static inline void fuzz_write_file(const char *path, const void *data, size_t size)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, size, f) != size || fclose(f) != 0)
        fuzz_setup_failed(path);
}

static inline int fuzz_remove_one(const char *path, const struct stat *sb, int flag,
                                  struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static char fuzz_scratch_path[256];

static inline void fuzz_remove_scratch(void)
{
    if (fuzz_scratch_path[0])
        nftw(fuzz_scratch_path, fuzz_remove_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* A folder of this process for files a target writes (on /dev/shm when there is one, so
 * the writers' fsyncs cost nothing), made at the first call and removed at exit. */
static inline const char *fuzz_scratch_dir(void)
{
    if (fuzz_scratch_path[0])
        return fuzz_scratch_path;
    struct stat sb;
    const char *base = stat("/dev/shm", &sb) == 0 && S_ISDIR(sb.st_mode) &&
                               access("/dev/shm", W_OK) == 0
                           ? "/dev/shm"
                           : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(fuzz_scratch_path, sizeof fuzz_scratch_path, "%s/ferry-fuzz-XXXXXX", base);
    if (!mkdtemp(fuzz_scratch_path))
        fuzz_setup_failed("mkdtemp");
    atexit(fuzz_remove_scratch);
    return fuzz_scratch_path;
}

/* A rejected input: the status is one a parser may give for a bad file (not OK, not
 * INVALID, which would mean the harness called it wrongly) and the message names `names`
 * (the file), as every parser's contract says. With FUZZ_VERBOSE set in the environment the
 * message is printed (to see why a seed or a replayed input was rejected). */
static inline void fuzz_check_rejection(ferry_status st, const char *names)
{
    const char *msg = ferry_last_error();
    if (getenv("FUZZ_VERBOSE"))
        fprintf(stderr, "rejected: %s: %s\n", ferry_status_name(st), msg ? msg : "(none)");
    FUZZ_CHECK(st == FERRY_ERR_FORMAT || st == FERRY_ERR_UNSUPPORTED || st == FERRY_ERR_IO ||
                   st == FERRY_ERR_NOMEM,
               "unexpected status %s: %s", ferry_status_name(st), msg ? msg : "(none)");
    FUZZ_CHECK(msg && strstr(msg, names), "the message does not name '%s': %s", names,
               msg ? msg : "(none)");
}

/* FNV-1a of the input: a stable source of choices a target makes about an input (which
 * slice to cut, which shape to expect) without spending input bytes on them. */
static inline uint64_t fuzz_hash(const uint8_t *data, size_t size)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < size; i++)
        h = (h ^ data[i]) * 0x100000001b3ull;
    return h;
}

#endif
