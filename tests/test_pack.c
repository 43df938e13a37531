/*
 * tests/test_pack.c: the packed expert file and the reader. A pack of the bundled model
 * (tiny-moe-code: 6 layers x 8 experts, d_model 192, d_ff 384, bf16) is written once per
 * test case from its safetensors tensors; every expert is read back through io_uring and
 * through pread threads and must equal w1|w3|w2 byte for byte and pass its checksum.
 * Corrupt, truncated and foreign files must fail with a message naming the field or the
 * layer and expert; a failing writer must leave nothing behind; four submitting threads
 * and one waiting thread share a reader (the case ThreadSanitizer must find clean).
 * Where io_uring is unavailable the io_uring half says so and is skipped.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "core/error.h"
#include "format/safetensors.h"
#include "offload/pack.h"
#include "offload/reader.h"
#include "tests/check_util.h"

#define TINY_DIR FERRY_SOURCE_DIR "/models/tiny-moe-code"
#define N_LAYERS 6
#define N_EXPERTS 8
#define N_TOTAL (N_LAYERS * N_EXPERTS)
#define D_MODEL 192
#define D_FF 384
#define EXPERT_BYTES (3ull * D_MODEL * D_FF * 2) /* bf16 */

static const ferry_pack_shape tiny_shape = {N_LAYERS, N_EXPERTS, D_MODEL, D_FF, 0};
static const ferry_reader_mode both_modes[2] = {FERRY_READER_URING, FERRY_READER_PREAD};
static const char *const mode_names[2] = {"uring", "pread"};

/* Built by the case fixture (in Check's parent process, inherited by each test). */
static char g_dir[512];
static char g_pack[600];
static uint8_t *g_ref[N_TOTAL]; /* w1 | w3 | w2 of each expert, from the safetensors */

/* ---- helpers --------------------------------------------------------------------------- */

static void assert_error_has(const char *what, const char *needle)
{
    const char *msg = ferry_last_error();
    ck_assert_msg(strstr(msg, needle) != NULL, "%s: error \"%s\" lacks \"%s\"", what, msg,
                  needle);
}

static void expect_fail(ferry_status got, ferry_status want, const char *what, const char *a,
                        const char *b)
{
    ck_assert_msg(got == want, "%s: got %s (%s), want %s", what, ferry_status_name(got),
                  ferry_last_error(), ferry_status_name(want));
    if (a)
        assert_error_has(what, a);
    if (b)
        assert_error_has(what, b);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *alloc_aligned(size_t n)
{
    void *p = aligned_alloc(FERRY_READER_ALIGN, (n + FERRY_READER_ALIGN - 1) / FERRY_READER_ALIGN
                                                    * FERRY_READER_ALIGN);
    ck_assert(p != NULL);
    return p;
}

static size_t round4k(uint64_t n) { return (size_t)((n + 4095) / 4096 * 4096); }

static void tensor_name(char *out, size_t cap, int32_t l, int32_t e, int32_t which)
{
    static const char *const part[3] = {"w1", "w3", "w2"};
    snprintf(out, cap, "model.layers.%d.block_sparse_moe.experts.%d.%s.weight", l, e,
             part[which]);
}

typedef struct {
    ferry_st_set *st;
    int32_t fail_at; /* layer x n_experts + expert whose w3 fails, or -1 */
    int32_t n_progress;
} source_ctx;

static ferry_status st_source(void *user, int32_t l, int32_t e, int32_t which, const void **data,
                              ferry_dtype *dtype)
{
    source_ctx *c = user;
    if (l * N_EXPERTS + e == c->fail_at && which == FERRY_PACK_W3)
        return ferry_fail(FERRY_ERR_IO, "injected source failure");
    char name[128];
    tensor_name(name, sizeof name, l, e, which);
    const int64_t shape[2] = {which == FERRY_PACK_W2 ? D_MODEL : D_FF,
                              which == FERRY_PACK_W2 ? D_FF : D_MODEL};
    const ferry_st_tensor *t;
    ferry_dtype dt;
    ferry_status st = ferry_st_get(c->st, name, 2, shape, &t, &dt);
    if (st != FERRY_OK)
        return st;
    *data = t->data;
    *dtype = dt;
    return FERRY_OK;
}

static void count_progress(void *user, int32_t n_done, int32_t n_total)
{
    source_ctx *c = user;
    ck_assert_int_eq(n_total, N_TOTAL);
    ck_assert_int_eq(n_done, c->n_progress + 1);
    c->n_progress = n_done;
}

/* Writes the tiny model's pack to path; fail_at as in source_ctx. */
static ferry_status write_tiny_pack(const char *path, int32_t fail_at, int32_t *n_progress)
{
    source_ctx c = {NULL, fail_at, 0};
    ck_assert_msg(ferry_st_open_dir(TINY_DIR, &c.st) == FERRY_OK, "%s", ferry_last_error());
    ferry_status st = ferry_pack_write(path, &tiny_shape, st_source, count_progress, &c);
    ferry_st_close(c.st);
    if (n_progress)
        *n_progress = c.n_progress;
    return st;
}

static void fixture_setup(void)
{
    tu_scratch_dir(g_dir, "pack");
    snprintf(g_pack, sizeof g_pack, "%s/tiny.pack", g_dir);
    int32_t n_progress = 0;
    ck_assert_msg(write_tiny_pack(g_pack, -1, &n_progress) == FERRY_OK, "%s",
                  ferry_last_error());
    ck_assert_int_eq(n_progress, N_TOTAL);

    ferry_st_set *st = NULL;
    ck_assert_msg(ferry_st_open_dir(TINY_DIR, &st) == FERRY_OK, "%s", ferry_last_error());
    for (int32_t i = 0; i < N_TOTAL; i++) {
        g_ref[i] = malloc(EXPERT_BYTES);
        ck_assert(g_ref[i] != NULL);
        size_t at = 0;
        for (int32_t w = 0; w < 3; w++) {
            char name[128];
            tensor_name(name, sizeof name, i / N_EXPERTS, i % N_EXPERTS, w);
            const ferry_st_tensor *t = ferry_st_find(st, name);
            ck_assert_msg(t != NULL, "%s missing", name);
            ck_assert_int_eq(t->n_bytes, EXPERT_BYTES / 3);
            memcpy(g_ref[i] + at, t->data, t->n_bytes);
            at += t->n_bytes;
        }
    }
    ferry_st_close(st);
}

static void fixture_teardown(void)
{
    for (int32_t i = 0; i < N_TOTAL; i++) {
        free(g_ref[i]);
        g_ref[i] = NULL;
    }
    unlink(g_pack);
    rmdir(g_dir);
}

/* Opens a reader in mode; returns NULL (after saying so) when io_uring is unavailable. */
static ferry_reader *open_reader(const char *path, ferry_reader_mode mode, int32_t depth,
                                 void *region, size_t region_bytes)
{
    ferry_reader *r = NULL;
    ferry_status st = ferry_reader_create(path, mode, depth, region, region_bytes, &r);
    if (st == FERRY_ERR_UNSUPPORTED && mode == FERRY_READER_URING) {
        printf("pack: io_uring is unavailable on this machine, io_uring part skipped: %s\n",
               ferry_last_error());
        return NULL;
    }
    ck_assert_msg(st == FERRY_OK, "reader on %s: %s", path, ferry_last_error());
    ck_assert_int_eq(ferry_reader_uses_uring(r), mode == FERRY_READER_URING);
    return r;
}

/* Waits for one completion (no time limit); returns its tag, stores its result. */
static uint64_t wait_one(ferry_reader *r, ferry_status *result)
{
    uint64_t tag = 0;
    int done = 0;
    ferry_status st = ferry_reader_wait(r, -1, &tag, result, &done);
    ck_assert_msg(st == FERRY_OK, "wait: %s", ferry_last_error());
    ck_assert(done == 1);
    return tag;
}

/* Whether registering region_bytes with io_uring should work (root, or under memlock). */
static int can_register(size_t region_bytes)
{
    struct rlimit rl;
    if (geteuid() == 0)
        return 1;
    return getrlimit(RLIMIT_MEMLOCK, &rl) == 0
           && (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= region_bytes);
}

/* Submits every expert of pack at once into region (slot = layer x 8 + expert), waits for
 * all of them and checks each against the safetensors bytes and its checksum. */
static void read_all_and_check(ferry_reader *r, const ferry_pack *p, uint8_t *region,
                               size_t slot_bytes, const char *what)
{
    memset(region, 0xa5, slot_bytes * N_TOTAL);
    for (int32_t i = 0; i < N_TOTAL; i++) {
        const ferry_pack_entry *e = ferry_pack_get(p, i / N_EXPERTS, i % N_EXPERTS);
        ck_assert_msg(ferry_reader_submit(r, e->offset, e->n_bytes, region + slot_bytes * i,
                                          1000 + (uint64_t)i) == FERRY_OK,
                      "%s: submit %d: %s", what, i, ferry_last_error());
    }
    int seen[N_TOTAL] = {0};
    for (int32_t k = 0; k < N_TOTAL; k++) {
        ferry_status res;
        uint64_t tag = wait_one(r, &res);
        ck_assert_msg(tag >= 1000 && tag < 1000 + N_TOTAL, "%s: tag %llu", what,
                      (unsigned long long)tag);
        int32_t i = (int32_t)(tag - 1000);
        ck_assert_msg(!seen[i], "%s: expert %d completed twice", what, i);
        seen[i] = 1;
        ck_assert_msg(res == FERRY_OK, "%s: expert %d: %s", what, i, ferry_last_error());
        ck_assert_msg(memcmp(region + slot_bytes * i, g_ref[i], EXPERT_BYTES) == 0,
                      "%s: layer %d expert %d differs from the safetensors", what, i / N_EXPERTS,
                      i % N_EXPERTS);
        ck_assert_msg(ferry_pack_verify(p, i / N_EXPERTS, i % N_EXPERTS,
                                        region + slot_bytes * i) == FERRY_OK,
                      "%s: %s", what, ferry_last_error());
    }
    int done = 0;
    uint64_t tag;
    ferry_status res;
    expect_fail(ferry_reader_wait(r, 0, &tag, &res, &done), FERRY_ERR_INVALID, what,
                "no read outstanding", NULL);
}

/* ---- the pack of the real model, read back in both modes ------------------------------- */

START_TEST(test_pack_layout_matches_model)
{
    ferry_pack *p = NULL;
    ck_assert_msg(ferry_pack_open(g_pack, &tiny_shape, &p) == FERRY_OK, "%s", ferry_last_error());
    ferry_pack_shape s = ferry_pack_get_shape(p);
    ck_assert(s.n_layers == N_LAYERS && s.n_experts == N_EXPERTS && s.d_model == D_MODEL
              && s.d_ff == D_FF);
    ck_assert_str_eq(ferry_pack_path(p), g_pack);
    ck_assert_uint_eq(ferry_pack_max_expert_bytes(p), EXPERT_BYTES);
    uint64_t prev_end = 0;
    for (int32_t l = 0; l < N_LAYERS; l++)
        for (int32_t e = 0; e < N_EXPERTS; e++) {
            const ferry_pack_entry *pe = ferry_pack_get(p, l, e);
            ck_assert(pe != NULL);
            ck_assert_uint_eq(pe->offset % 4096, 0);
            ck_assert_uint_ge(pe->offset, 8192); /* after the header region */
            ck_assert_uint_gt(pe->offset, prev_end == 0 ? 0 : prev_end - 1);
            ck_assert_uint_lt(pe->offset - (prev_end ? prev_end : pe->offset), 4096);
            ck_assert_uint_eq(pe->n_bytes, EXPERT_BYTES);
            for (int w = 0; w < 3; w++) {
                ck_assert_int_eq(pe->dtype[w], FERRY_DTYPE_BF16);
                ck_assert_uint_eq(pe->part_bytes[w], EXPERT_BYTES / 3);
            }
            ck_assert_uint_eq(pe->checksum, XXH3_64bits(g_ref[l * N_EXPERTS + e], EXPERT_BYTES));
            prev_end = pe->offset + pe->n_bytes;
        }
    ck_assert_uint_eq(ferry_pack_file_bytes(p), prev_end);
    struct stat sb;
    ck_assert(stat(g_pack, &sb) == 0);
    ck_assert_uint_eq((uint64_t)sb.st_size, prev_end);
    ck_assert_ptr_null(ferry_pack_get(p, N_LAYERS, 0));
    ck_assert_ptr_null(ferry_pack_get(p, 0, N_EXPERTS));
    ck_assert_ptr_null(ferry_pack_get(p, -1, 0));
    /* Without an expected shape the pack opens too. */
    ferry_pack *q = NULL;
    ck_assert_msg(ferry_pack_open(g_pack, NULL, &q) == FERRY_OK, "%s", ferry_last_error());
    ferry_pack_close(q);
    ferry_pack_close(p);
    ferry_pack_close(NULL);
}
END_TEST

START_TEST(test_pack_read_all_experts)
{
    const int m = _i;
    ferry_pack *p = NULL;
    ck_assert_msg(ferry_pack_open(g_pack, &tiny_shape, &p) == FERRY_OK, "%s", ferry_last_error());
    size_t slot = round4k(ferry_pack_max_expert_bytes(p));
    uint8_t *region = alloc_aligned(slot * N_TOTAL);
    ferry_reader *r = open_reader(g_pack, both_modes[m], 32, region, slot * N_TOTAL);
    if (r) {
        read_all_and_check(r, p, region, slot, mode_names[m]);
        read_all_and_check(r, p, region, slot, mode_names[m]); /* slots reused */
        ferry_reader_stats stats;
        ferry_reader_get_stats(r, &stats);
        ck_assert_uint_eq(stats.n_requests, 2 * N_TOTAL);
        ck_assert_uint_eq(stats.n_bytes, 2 * N_TOTAL * EXPERT_BYTES);
        ck_assert_uint_eq(stats.n_chunks, 2 * N_TOTAL); /* 432 KiB each: one chunk */
        if (ferry_reader_uses_direct(r))
            ck_assert_uint_eq(stats.n_direct_chunks, stats.n_chunks);
        if (both_modes[m] == FERRY_READER_URING && can_register(slot * N_TOTAL))
            ck_assert_uint_eq(stats.n_fixed_chunks, stats.n_chunks);
        if (both_modes[m] == FERRY_READER_PREAD)
            ck_assert_uint_eq(stats.n_fixed_chunks, 0);
        printf("pack: %s read all 48 experts (O_DIRECT %s, fixed buffers %llu of %llu reads)\n",
               mode_names[m], ferry_reader_uses_direct(r) ? "on" : "off",
               (unsigned long long)stats.n_fixed_chunks, (unsigned long long)stats.n_chunks);
    }
    ferry_reader_destroy(r);
    ferry_reader_destroy(NULL);
    free(region);
    ferry_pack_close(p);
}
END_TEST

/* Copies the pack to dir/name (e.g. on tmpfs); returns 0 when dir does not exist. */
static int copy_pack_to(char *out, const char *dir, const char *name)
{
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return 0;
    size_t len;
    char *bytes = tu_read_file(g_pack, &len);
    snprintf(out, 512, "%s/%s.%d", dir, name, (int)getpid());
    FILE *f = fopen(out, "wb");
    ck_assert_msg(f != NULL, "cannot write %s: %s", out, strerror(errno));
    ck_assert(fwrite(bytes, 1, len, f) == len);
    ck_assert(fclose(f) == 0);
    free(bytes);
    return 1;
}

/* The pack on tmpfs (RAM): the same bytes, whether or not this kernel's tmpfs takes
 * O_DIRECT (Linux 6.6 and later do). */
START_TEST(test_pack_reader_on_tmpfs)
{
    char path[512];
    if (!copy_pack_to(path, "/dev/shm", "ferry-pack-tmpfs")) {
        printf("pack: no /dev/shm here; tmpfs not tested\n");
        return;
    }
    ferry_pack *p = NULL;
    ck_assert_msg(ferry_pack_open(path, &tiny_shape, &p) == FERRY_OK, "%s", ferry_last_error());
    size_t slot = round4k(EXPERT_BYTES);
    uint8_t *region = alloc_aligned(slot * N_TOTAL);
    for (int m = 0; m < 2; m++) {
        ferry_reader *r = open_reader(path, both_modes[m], 8, region, slot * N_TOTAL);
        if (!r)
            continue;
        read_all_and_check(r, p, region, slot, mode_names[m]);
        ferry_reader_stats stats;
        ferry_reader_get_stats(r, &stats);
        ck_assert_uint_eq(stats.n_direct_chunks, ferry_reader_uses_direct(r) ? stats.n_chunks : 0);
        ferry_reader_destroy(r);
    }
    free(region);
    ferry_pack_close(p);
    unlink(path);
}
END_TEST

/* Where the filesystem refuses O_DIRECT (procfs here; tmpfs before Linux 6.6) the reader
 * reads buffered: /proc/version, read whole through both modes, ends early (a short read
 * naming what came) and holds the same text as a plain read. */
START_TEST(test_pack_reader_falls_back_where_o_direct_is_refused)
{
    const char *path = "/proc/version";
    int fd = open(path, O_RDONLY | O_DIRECT);
    if (fd >= 0 || errno != EINVAL) {
        if (fd >= 0)
            close(fd);
        printf("pack: %s takes O_DIRECT here; the fallback is not tested\n", path);
        return;
    }
    char want[4096];
    FILE *f = fopen(path, "r");
    ck_assert(f != NULL);
    size_t n_want = fread(want, 1, sizeof want, f);
    fclose(f);
    ck_assert(n_want > 0 && n_want < sizeof want);
    uint8_t *buf = alloc_aligned(8192);
    for (int m = 0; m < 2; m++) {
        ferry_reader *r = open_reader(path, both_modes[m], 2, buf, 8192);
        if (!r)
            continue;
        ck_assert_int_eq(ferry_reader_uses_direct(r), 0);
        memset(buf, 0, 8192);
        ck_assert(ferry_reader_submit(r, 0, 8192, buf, 9) == FERRY_OK);
        ferry_status res;
        ck_assert_uint_eq(wait_one(r, &res), 9);
        char msg[64];
        snprintf(msg, sizeof msg, "returned %zu (file truncated?)", n_want);
        expect_fail(res, FERRY_ERR_FORMAT, mode_names[m], msg, NULL);
        ck_assert(memcmp(buf, want, n_want) == 0);
        ferry_reader_stats stats;
        ferry_reader_get_stats(r, &stats);
        ck_assert_uint_eq(stats.n_direct_chunks, 0);
        ferry_reader_destroy(r);
    }
    free(buf);
}
END_TEST

/* A read that comes back short before the end of the file is continued for the rest:
 * procfs returns about a page per read, so 64 KiB of /proc/kallsyms take many. */
START_TEST(test_pack_reader_continues_short_reads)
{
    const char *path = "/proc/kallsyms";
    const size_t n = 64 * 1024;
    char *want = malloc(n);
    ck_assert(want != NULL);
    FILE *f = fopen(path, "r");
    size_t n_want = f ? fread(want, 1, n, f) : 0;
    if (f)
        fclose(f);
    if (n_want < n) {
        printf("pack: %s is not readable or short here; short-read continuation not tested\n",
               path);
        free(want);
        return;
    }
    uint8_t *buf = alloc_aligned(n);
    for (int m = 0; m < 2; m++) {
        ferry_reader *r = open_reader(path, both_modes[m], 4, buf, n);
        if (!r)
            continue;
        memset(buf, 0, n);
        ck_assert(ferry_reader_submit(r, 0, n, buf, 77) == FERRY_OK);
        ferry_status res;
        ck_assert_uint_eq(wait_one(r, &res), 77);
        ck_assert_msg(res == FERRY_OK, "%s: %s", mode_names[m], ferry_last_error());
        ck_assert_msg(memcmp(buf, want, n) == 0, "%s: bytes differ from a plain read",
                      mode_names[m]);
        ferry_reader_stats stats;
        ferry_reader_get_stats(r, &stats);
        ck_assert_uint_eq(stats.n_bytes, n);
        if (both_modes[m] == FERRY_READER_URING)
            ck_assert_uint_gt(stats.n_resubmits, 4);
        ferry_reader_destroy(r);
    }
    free(buf);
    free(want);
}
END_TEST

/* ---- io_uring unavailable: AUTO falls back, URING refuses -------------------------------- */

static char g_log[2048];

static void capture_log(ferry_log_level level, const char *msg, void *user)
{
    (void)user;
    size_t used = strlen(g_log);
    snprintf(g_log + used, sizeof g_log - used, "%d:%s\n", (int)level, msg);
}

/* Makes io_uring_setup fail with ENOSYS in this process, as an old kernel or a seccomp
 * profile (Docker's default) does. */
static int block_io_uring(void)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {(unsigned short)(sizeof f / sizeof f[0]), f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
}

/* The child of test_pack_reader_auto_falls_back_without_io_uring; returns its exit code
 * (0: as expected, else which step failed). */
static int without_io_uring_child(void)
{
    if (block_io_uring() != 0)
        return 77;
    ferry_set_log(FERRY_LOG_WARN, capture_log, NULL);
    ferry_reader *r = NULL;
    if (ferry_reader_create(g_pack, FERRY_READER_URING, 4, NULL, 0, &r) != FERRY_ERR_UNSUPPORTED
        || !strstr(ferry_last_error(), "io_uring is unavailable here"))
        return 1;
    setenv("FERRY_READER", "uring", 1);
    if (ferry_reader_create(g_pack, FERRY_READER_AUTO, 4, NULL, 0, &r) != FERRY_ERR_UNSUPPORTED)
        return 2;
    unsetenv("FERRY_READER");
    if (g_log[0] != 0) /* refusing is not a fallback: nothing logged yet */
        return 3;
    uint8_t *buf = aligned_alloc(4096, 8192);
    if (!buf || ferry_reader_create(g_pack, FERRY_READER_AUTO, 4, buf, 8192, &r) != FERRY_OK)
        return 4;
    if (ferry_reader_uses_uring(r) || !strstr(g_log, "io_uring is unavailable")
        || !strstr(g_log, "pread") || g_log[0] != '0' + FERRY_LOG_WARN)
        return 5;
    uint64_t tag = 0;
    ferry_status res = FERRY_ERR_IO;
    int done = 0;
    if (ferry_reader_submit(r, 0, 8192, buf, 5) != FERRY_OK
        || ferry_reader_wait(r, -1, &tag, &res, &done) != FERRY_OK || !done || tag != 5
        || res != FERRY_OK || memcmp(buf, "FERRYPK1", 8) != 0)
        return 6;
    ferry_reader_destroy(r);
    /* Once per process: a second fallback says nothing more. */
    size_t logged = strlen(g_log);
    if (ferry_reader_create(g_pack, FERRY_READER_AUTO, 4, NULL, 0, &r) != FERRY_OK
        || strlen(g_log) != logged)
        return 7;
    ferry_reader_destroy(r);
    free(buf);
    return 0;
}

START_TEST(test_pack_reader_auto_falls_back_without_io_uring)
{
    fflush(stdout);
    pid_t pid = fork();
    ck_assert(pid >= 0);
    if (pid == 0)
        _exit(without_io_uring_child());
    int status = 0;
    ck_assert(waitpid(pid, &status, 0) == pid);
    ck_assert_msg(WIFEXITED(status), "the child died (status %d)", status);
    if (WEXITSTATUS(status) == 77) {
        printf("pack: cannot install a seccomp filter here; io_uring fallback not tested\n");
        return;
    }
    ck_assert_msg(WEXITSTATUS(status) == 0, "without io_uring: step %d failed",
                  WEXITSTATUS(status));
}
END_TEST

/* Reads the 48 experts n_rounds times; returns GB/s. */
static double bandwidth(const char *path, ferry_reader_mode mode, int n_rounds, int *skipped,
                        int *direct)
{
    ferry_pack *p = NULL;
    ck_assert_msg(ferry_pack_open(path, &tiny_shape, &p) == FERRY_OK, "%s", ferry_last_error());
    size_t slot = round4k(EXPERT_BYTES);
    uint8_t *region = alloc_aligned(slot * N_TOTAL);
    ferry_reader *r = open_reader(path, mode, 32, region, slot * N_TOTAL);
    double gbs = 0;
    *skipped = r == NULL;
    if (r) {
        *direct = ferry_reader_uses_direct(r);
        read_all_and_check(r, p, region, slot, "warm-up");
        double t0 = now_s();
        for (int k = 0; k < n_rounds; k++) {
            for (int32_t i = 0; i < N_TOTAL; i++) {
                const ferry_pack_entry *e = ferry_pack_get(p, i / N_EXPERTS, i % N_EXPERTS);
                ck_assert(ferry_reader_submit(r, e->offset, e->n_bytes, region + slot * i,
                                              (uint64_t)i) == FERRY_OK);
            }
            for (int32_t i = 0; i < N_TOTAL; i++) {
                ferry_status res;
                wait_one(r, &res);
                ck_assert_msg(res == FERRY_OK, "%s", ferry_last_error());
            }
        }
        double dt = now_s() - t0;
        gbs = (double)n_rounds * N_TOTAL * EXPERT_BYTES / dt / 1e9;
        read_all_and_check(r, p, region, slot, "after timing");
    }
    ferry_reader_destroy(r);
    free(region);
    ferry_pack_close(p);
    return gbs;
}

/* Prints the read bandwidth of both modes: the pack on the scratch filesystem (O_DIRECT
 * where it is accepted) and a copy on tmpfs (page cache). Rerun: ./build/test_pack. */
START_TEST(test_pack_read_bandwidth)
{
    char shm[512];
    int have_shm = copy_pack_to(shm, "/dev/shm", "ferry-pack-bw");
    for (int where = 0; where < 1 + have_shm; where++) {
        const char *path = where == 0 ? g_pack : shm;
        for (int m = 0; m < 2; m++) {
            int skipped = 0, direct = 0;
            double gbs = bandwidth(path, both_modes[m], 20, &skipped, &direct);
            if (!skipped)
                printf("pack: bandwidth %s, %s, queue depth 32, 20 x 48 experts of 432 KiB: "
                       "%.2f GB/s (%s)\n", mode_names[m], where == 0 ? "scratch dir" : "tmpfs",
                       gbs, direct ? "O_DIRECT" : "buffered, page cache");
        }
    }
    if (have_shm)
        unlink(shm);
}
END_TEST

/* ---- the reader on its own: tails, short reads, arguments ------------------------------ */

START_TEST(test_pack_reader_tail_and_short_read)
{
    const int m = _i;
    /* 3 MiB + 3 pages + 123 bytes: several chunks, then a tail off the 4096 grid. */
    const size_t size = (3u << 20) + 3 * 4096 + 123;
    uint8_t *data = malloc(size);
    ck_assert(data != NULL);
    uint64_t seed = 7;
    for (size_t i = 0; i < size; i++)
        data[i] = (uint8_t)tu_rand_u64(&seed);
    char path[512];
    tu_write_file(path, "reader-tail.bin", data, size);
    uint8_t *buf = alloc_aligned(size + 3 * 4096);
    ferry_reader *r = open_reader(path, both_modes[m], 4, buf, round4k(size + 3 * 4096));
    if (!r) {
        unlink(path);
        free(buf);
        free(data);
        return;
    }
    ferry_status res;

    /* The whole file in one request: chunks of 1 MiB, the aligned rest, the tail. */
    memset(buf, 0, size + 3 * 4096);
    ck_assert(ferry_reader_submit(r, 0, size, buf, 1) == FERRY_OK);
    ck_assert_uint_eq(wait_one(r, &res), 1);
    ck_assert_msg(res == FERRY_OK, "%s", ferry_last_error());
    ck_assert(memcmp(buf, data, size) == 0);
    ck_assert_uint_eq(buf[size], 0); /* nothing written past the request */

    /* The last page and the tail. */
    const uint64_t last = (3u << 20) + 2 * 4096;
    memset(buf, 0, 3 * 4096);
    ck_assert(ferry_reader_submit(r, last, size - last, buf, 2) == FERRY_OK);
    ck_assert_uint_eq(wait_one(r, &res), 2);
    ck_assert_msg(res == FERRY_OK, "%s", ferry_last_error());
    ck_assert(memcmp(buf, data + last, size - last) == 0);
    ck_assert_uint_eq(buf[size - last], 0);

    /* Past the end: a short read, naming the file, the size, the offset and what came. */
    char want[128];
    ck_assert(ferry_reader_submit(r, last, 3 * 4096, buf, 3) == FERRY_OK);
    ck_assert_uint_eq(wait_one(r, &res), 3);
    snprintf(want, sizeof want, "read of 12288 bytes at offset %llu returned %zu (file "
             "truncated?)", (unsigned long long)last, size - (size_t)last);
    expect_fail(res, FERRY_ERR_FORMAT, "read past the end", path, want);
    ck_assert(memcmp(buf, data + last, size - last) == 0);

    /* Wholly past the end. */
    ck_assert(ferry_reader_submit(r, 4u << 20, 8192, buf, 4) == FERRY_OK);
    ck_assert_uint_eq(wait_one(r, &res), 4);
    expect_fail(res, FERRY_ERR_FORMAT, "read beyond the end", "returned 0", NULL);

    /* A request bigger than the whole queue (4 chunks of 1 MiB in flight at most). */
    const size_t big = (3u << 20) + 4096;
    memset(buf, 0, size);
    ck_assert(ferry_reader_submit(r, 0, big, buf, 5) == FERRY_OK);
    ck_assert(ferry_reader_submit(r, big, size - big, buf + big, 6) == FERRY_OK);
    int got5 = 0, got6 = 0;
    for (int k = 0; k < 2; k++) {
        uint64_t tag = wait_one(r, &res);
        ck_assert_msg(res == FERRY_OK, "%s", ferry_last_error());
        got5 += tag == 5;
        got6 += tag == 6;
    }
    ck_assert(got5 == 1 && got6 == 1);
    ck_assert(memcmp(buf, data, size) == 0);

    ferry_reader_stats stats;
    ferry_reader_get_stats(r, &stats);
    ck_assert_uint_eq(stats.n_requests, 6);
    if (ferry_reader_uses_direct(r))
        ck_assert_uint_gt(stats.n_direct_chunks, 0);
    ferry_reader_destroy(r);
    unlink(path);
    free(buf);
    free(data);
}
END_TEST

START_TEST(test_pack_reader_rejects_bad_arguments)
{
    ferry_reader *r = NULL;
    uint8_t *buf = alloc_aligned(8192);
    expect_fail(ferry_reader_create(g_dir, FERRY_READER_PREAD, 0, NULL, 0, &r), FERRY_ERR_INVALID,
                "depth 0", "queue depth 0", NULL);
    expect_fail(ferry_reader_create(g_pack, FERRY_READER_PREAD, 4, buf + 1, 4096, &r),
                FERRY_ERR_INVALID, "misaligned region", "region", NULL);
    expect_fail(ferry_reader_create(g_pack, FERRY_READER_PREAD, 4, buf, 100, &r),
                FERRY_ERR_INVALID, "odd region size", "region", NULL);
    char missing[600];
    snprintf(missing, sizeof missing, "%s/no-such.pack", g_dir);
    expect_fail(ferry_reader_create(missing, FERRY_READER_AUTO, 4, NULL, 0, &r), FERRY_ERR_IO,
                "missing file", missing, "No such file");
    ck_assert_ptr_null(r);

    setenv("FERRY_READER", "bogus", 1);
    expect_fail(ferry_reader_create(g_pack, FERRY_READER_AUTO, 4, NULL, 0, &r), FERRY_ERR_INVALID,
                "bad FERRY_READER", "FERRY_READER='bogus'", NULL);
    setenv("FERRY_READER", "pread", 1);
    ck_assert(ferry_reader_create(g_pack, FERRY_READER_AUTO, 4, NULL, 0, &r) == FERRY_OK);
    ck_assert_int_eq(ferry_reader_uses_uring(r), 0);
    ferry_reader_destroy(r);
    r = NULL;
    setenv("FERRY_READER", "uring", 1);
    ferry_status st = ferry_reader_create(g_pack, FERRY_READER_AUTO, 4, NULL, 0, &r);
    ck_assert_msg(st == FERRY_OK || st == FERRY_ERR_UNSUPPORTED, "%s", ferry_last_error());
    if (st == FERRY_OK) {
        ck_assert_int_eq(ferry_reader_uses_uring(r), 1);
        ferry_reader_destroy(r);
        r = NULL;
    }
    /* An explicit mode wins over the environment. */
    ck_assert(ferry_reader_create(g_pack, FERRY_READER_PREAD, 4, NULL, 0, &r) == FERRY_OK);
    ck_assert_int_eq(ferry_reader_uses_uring(r), 0);
    unsetenv("FERRY_READER");

    uint64_t tag;
    ferry_status res;
    int done = 7;
    expect_fail(ferry_reader_wait(r, -1, &tag, &res, &done), FERRY_ERR_INVALID,
                "wait with nothing outstanding", "no read outstanding", NULL);
    ck_assert_int_eq(done, 7);
    expect_fail(ferry_reader_submit(r, 100, 4096, buf, 1), FERRY_ERR_INVALID, "odd offset",
                "offset 100", NULL);
    expect_fail(ferry_reader_submit(r, 4096, 4096, buf + 8, 1), FERRY_ERR_INVALID, "odd buffer",
                "multiples of 4096", NULL);
    expect_fail(ferry_reader_submit(r, 4096, 0, buf, 1), FERRY_ERR_INVALID, "empty read",
                "read of 0 bytes", NULL);
    expect_fail(ferry_reader_submit(r, UINT64_MAX - 4095, 8192, buf, 1), FERRY_ERR_INVALID,
                "overflow", NULL, NULL);

    /* Polling: completed stays 0 (tag and result untouched) until the read lands. */
    ck_assert(ferry_reader_submit(r, 0, 8192, buf, 42) == FERRY_OK);
    tag = 0;
    for (int polls = 0;; polls++) {
        res = (ferry_status)99;
        ck_assert(ferry_reader_wait(r, polls % 2, &tag, &res, &done) == FERRY_OK);
        if (done)
            break;
        ck_assert_uint_eq(tag, 0);
        ck_assert_int_eq(res, 99);
    }
    ck_assert_uint_eq(tag, 42);
    ck_assert_int_eq(res, FERRY_OK);
    ck_assert(memcmp(buf, "FERRYPK1", 8) == 0);
    ferry_reader_destroy(r);
    free(buf);
}
END_TEST

/* Destroying a reader with reads in flight waits for them and leaks nothing (ASan). */
START_TEST(test_pack_reader_destroy_with_reads_in_flight)
{
    const int m = _i;
    size_t slot = round4k(EXPERT_BYTES);
    uint8_t *region = alloc_aligned(slot * N_TOTAL);
    ferry_pack *p = NULL;
    ck_assert(ferry_pack_open(g_pack, &tiny_shape, &p) == FERRY_OK);
    ferry_reader *r = open_reader(g_pack, both_modes[m], 4, region, slot * N_TOTAL);
    if (r) {
        for (int32_t i = 0; i < N_TOTAL; i++) {
            const ferry_pack_entry *e = ferry_pack_get(p, i / N_EXPERTS, i % N_EXPERTS);
            ck_assert(ferry_reader_submit(r, e->offset, e->n_bytes, region + slot * i, 0)
                      == FERRY_OK);
        }
        ferry_status res;
        wait_one(r, &res);
        ferry_reader_destroy(r);
    }
    free(region);
    ferry_pack_close(p);
}
END_TEST

/* ---- corrupt, truncated and foreign files ---------------------------------------------- */

/* The pack's bytes, read whole. */
static uint8_t *pack_bytes(size_t *len) { return (uint8_t *)tu_read_file(g_pack, len); }

static void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* Recomputes the header checksum of an edited copy (as a consistent but wrong writer would). */
static void reseal(uint8_t *bytes)
{
    uint32_t header_bytes = (uint32_t)bytes[12] | (uint32_t)bytes[13] << 8
                            | (uint32_t)bytes[14] << 16 | (uint32_t)bytes[15] << 24;
    memset(bytes + 40, 0, 8);
    put_le64(bytes + 40, XXH3_64bits(bytes, header_bytes));
}

/* Offset of the table entry of (l, e). */
static size_t entry_at(int32_t l, int32_t e) { return 4096 + 32 * (size_t)(l * N_EXPERTS + e); }

/* Writes bytes to a scratch file named after name, opens it as a pack and removes it;
 * returns the status (the message stays, naming path). */
static ferry_status open_variant(const char *name, const uint8_t *bytes, size_t len,
                                 const ferry_pack_shape *expect, char *path)
{
    tu_write_file(path, name, bytes, len);
    ferry_pack *p = (ferry_pack *)0x1;
    ferry_status st = ferry_pack_open(path, expect, &p);
    unlink(path);
    if (st == FERRY_OK)
        ferry_pack_close(p);
    else
        ck_assert_ptr_eq(p, (ferry_pack *)0x1); /* out untouched on failure */
    return st;
}

START_TEST(test_pack_detects_corrupt_expert)
{
    size_t len;
    uint8_t *bytes = pack_bytes(&len);
    uint64_t off = get_le64(bytes + entry_at(3, 5));
    bytes[off + 1000] ^= 0x10;
    char path[512];
    tu_write_file(path, "corrupt-expert.pack", bytes, len);
    ferry_pack *p = NULL;
    ck_assert(ferry_pack_open(path, &tiny_shape, &p) == FERRY_OK);
    uint8_t *buf = alloc_aligned(2 * round4k(EXPERT_BYTES));
    ferry_reader *r = open_reader(path, FERRY_READER_PREAD, 4, NULL, 0);
    const ferry_pack_entry *bad = ferry_pack_get(p, 3, 5), *good = ferry_pack_get(p, 3, 4);
    ck_assert(ferry_reader_submit(r, bad->offset, bad->n_bytes, buf, 35) == FERRY_OK);
    ck_assert(ferry_reader_submit(r, good->offset, good->n_bytes, buf + round4k(EXPERT_BYTES),
                                  34) == FERRY_OK);
    for (int k = 0; k < 2; k++) {
        ferry_status res;
        wait_one(r, &res);
        ck_assert_int_eq(res, FERRY_OK); /* the read itself is fine */
    }
    expect_fail(ferry_pack_verify(p, 3, 5, buf), FERRY_ERR_FORMAT, "flipped byte", path,
                "layer 3 expert 5: checksum mismatch (corrupt pack file)");
    ck_assert_msg(ferry_pack_verify(p, 3, 4, buf + round4k(EXPERT_BYTES)) == FERRY_OK, "%s",
                  ferry_last_error());
    /* The same bytes, but checked as another expert, fail too. */
    expect_fail(ferry_pack_verify(p, 3, 6, buf + round4k(EXPERT_BYTES)), FERRY_ERR_FORMAT,
                "wrong expert", "layer 3 expert 6", NULL);
    expect_fail(ferry_pack_verify(p, 6, 0, buf), FERRY_ERR_INVALID, "out of range",
                "no such expert", NULL);
    ferry_reader_destroy(r);
    ferry_pack_close(p);
    unlink(path);
    free(buf);
    free(bytes);
}
END_TEST

START_TEST(test_pack_detects_corrupt_table)
{
    size_t len;
    uint8_t *bytes = pack_bytes(&len);
    char path[512];
    /* A flipped byte in an entry's offset, size, checksum or dtype; then in the fixed part. */
    const size_t spots[5] = {entry_at(1, 2) + 1, entry_at(4, 7) + 9, entry_at(0, 0) + 20,
                             entry_at(5, 3) + 26, 30 /* d_ff */};
    for (int k = 0; k < 5; k++) {
        bytes[spots[k]] ^= 0x04;
        expect_fail(open_variant("corrupt-table.pack", bytes, len, &tiny_shape, path),
                    FERRY_ERR_FORMAT, "flipped table byte", path, "header checksum mismatch");
        bytes[spots[k]] ^= 0x04;
    }
    free(bytes);
}
END_TEST

START_TEST(test_pack_detects_truncation)
{
    size_t len;
    uint8_t *bytes = pack_bytes(&len);
    char path[512];
    const uint64_t off = get_le64(bytes + entry_at(2, 3));
    const size_t cut = (size_t)off + 100;
    expect_fail(open_variant("truncated.pack", bytes, cut, &tiny_shape, path), FERRY_ERR_FORMAT,
                "truncated in layer 2 expert 3", "truncated: layer 2 expert 3 ends at byte",
                "the file has");
    /* Cut exactly between two experts: the next one is the first cut off. */
    const uint64_t end_2_2 = get_le64(bytes + entry_at(2, 2)) + EXPERT_BYTES;
    expect_fail(open_variant("truncated2.pack", bytes, (size_t)end_2_2, &tiny_shape, path),
                FERRY_ERR_FORMAT, "cut after layer 2 expert 2", "layer 2 expert 3", NULL);
    /* One byte short of the end. */
    expect_fail(open_variant("truncated3.pack", bytes, len - 1, &tiny_shape, path),
                FERRY_ERR_FORMAT, "one byte short", "layer 5 expert 7", NULL);

    /* A reader on the truncated file: reading the cut expert is a short read. */
    tu_write_file(path, "truncated.pack", bytes, cut);
    uint8_t *buf = alloc_aligned(round4k(EXPERT_BYTES));
    for (int m = 0; m < 2; m++) {
        ferry_reader *r = open_reader(path, both_modes[m], 8, NULL, 0);
        if (!r)
            continue;
        ferry_status res;
        ck_assert(ferry_reader_submit(r, off, EXPERT_BYTES, buf, 23) == FERRY_OK);
        ck_assert_uint_eq(wait_one(r, &res), 23);
        char want[160];
        snprintf(want, sizeof want, "read of %llu bytes at offset %llu returned 100 (file "
                 "truncated?)", (unsigned long long)EXPERT_BYTES, (unsigned long long)off);
        expect_fail(res, FERRY_ERR_FORMAT, mode_names[m], path, want);
        ck_assert(memcmp(buf, g_ref[2 * N_EXPERTS + 3], 100) == 0);
        ferry_reader_destroy(r);
    }
    unlink(path);
    free(buf);
    free(bytes);
}
END_TEST

START_TEST(test_pack_rejects_wrong_version_and_magic)
{
    size_t len;
    uint8_t *bytes = pack_bytes(&len);
    char path[512];
    bytes[8] = 7;
    expect_fail(open_variant("version.pack", bytes, len, &tiny_shape, path), FERRY_ERR_FORMAT,
                "version 7", path, "pack format version 7, this build reads 1 to 2");
    reseal(bytes); /* a well-formed file of a future version says the same */
    expect_fail(open_variant("version.pack", bytes, len, &tiny_shape, path), FERRY_ERR_FORMAT,
                "version 7 sealed", "format version 7", NULL);
    bytes[8] = 1;
    reseal(bytes);
    memcpy(bytes, "FERRYPK2", 8);
    expect_fail(open_variant("magic.pack", bytes, len, &tiny_shape, path), FERRY_ERR_FORMAT,
                "magic", "not a ferry pack file (magic 'FERRYPK2'", NULL);
    memcpy(bytes, "\x89PNG\r\n\x1a\n", 8);
    expect_fail(open_variant("magic.pack", bytes, len, &tiny_shape, path), FERRY_ERR_FORMAT,
                "binary magic", "magic '\\x89PNG\\x0d", NULL);
    free(bytes);
}
END_TEST

START_TEST(test_pack_rejects_other_model_shape)
{
    ferry_pack *p = (ferry_pack *)0x1;
    ferry_pack_shape s = tiny_shape;
    s.d_ff = 385;
    expect_fail(ferry_pack_open(g_pack, &s, &p), FERRY_ERR_FORMAT, "d_ff 385", g_pack,
                "pack holds d_ff 384, the model has 385");
    s = tiny_shape;
    s.n_experts = 16;
    expect_fail(ferry_pack_open(g_pack, &s, &p), FERRY_ERR_FORMAT, "16 experts",
                "n_experts 8, the model has 16", NULL);
    s = tiny_shape;
    s.n_layers = 32;
    expect_fail(ferry_pack_open(g_pack, &s, &p), FERRY_ERR_FORMAT, "32 layers",
                "n_layers 6, the model has 32", NULL);
    s = tiny_shape;
    s.d_model = 4096;
    expect_fail(ferry_pack_open(g_pack, &s, &p), FERRY_ERR_FORMAT, "d_model",
                "d_model 192, the model has 4096", NULL);
    ck_assert_ptr_eq(p, (ferry_pack *)0x1);
}
END_TEST

/* The fingerprint is recorded and checked only where both sides have one. */
START_TEST(test_pack_fingerprint)
{
    char path[600];
    snprintf(path, sizeof path, "%s/fingerprinted.pack", g_dir);
    source_ctx c = {NULL, -1, 0};
    ck_assert_msg(ferry_st_open_dir(TINY_DIR, &c.st) == FERRY_OK, "%s", ferry_last_error());
    ferry_pack_shape s = tiny_shape;
    s.fingerprint = 0x0123456789abcdefULL;
    ck_assert_int_eq(ferry_pack_write(path, &s, st_source, count_progress, &c), FERRY_OK);
    ferry_st_close(c.st);
    ferry_pack *p = NULL;
    ck_assert_int_eq(ferry_pack_open(path, &s, &p), FERRY_OK);
    ck_assert_uint_eq(ferry_pack_get_shape(p).fingerprint, 0x0123456789abcdefULL);
    ferry_pack_close(p);
    ck_assert_int_eq(ferry_pack_open(path, NULL, &p), FERRY_OK);
    ferry_pack_close(p);
    ck_assert_int_eq(ferry_pack_open(path, &tiny_shape, &p), FERRY_OK); /* the model has none */
    ferry_pack_close(p);
    ferry_pack_shape other = s;
    other.fingerprint = 0x0123456789abcdeeULL;
    p = (ferry_pack *)0x1;
    expect_fail(ferry_pack_open(path, &other, &p), FERRY_ERR_FORMAT, "another checkpoint", path,
                "another checkpoint of the same shape (fingerprint 0123456789abcdef, the model's "
                "0123456789abcdee");
    ck_assert_ptr_eq(p, (ferry_pack *)0x1);
    /* a pack with none (an older ferry's) opens for a model with one */
    ck_assert_int_eq(ferry_pack_open(g_pack, &other, &p), FERRY_OK);
    ck_assert_uint_eq(ferry_pack_get_shape(p).fingerprint, 0);
    ferry_pack_close(p);
}
END_TEST

START_TEST(test_pack_rejects_short_file)
{
    size_t len;
    uint8_t *bytes = pack_bytes(&len);
    char path[512];
    expect_fail(open_variant("empty.pack", bytes, 0, &tiny_shape, path), FERRY_ERR_FORMAT,
                "empty", "the file has 0 bytes, shorter than the 4096-byte pack header", NULL);
    expect_fail(open_variant("short.pack", bytes, 100, &tiny_shape, path), FERRY_ERR_FORMAT,
                "100 bytes", path, "100 bytes, shorter than the 4096-byte pack header");
    /* The fixed part is there, the table is not. */
    expect_fail(open_variant("short.pack", bytes, 4096 + 64, &tiny_shape, path),
                FERRY_ERR_FORMAT, "no table", "shorter than its 8192-byte header", NULL);
    /* The header is whole, no expert is. */
    expect_fail(open_variant("short.pack", bytes, 8192, &tiny_shape, path), FERRY_ERR_FORMAT,
                "header only", "layer 0 expert 0", NULL);
    char missing[600];
    snprintf(missing, sizeof missing, "%s/none.pack", g_dir);
    ferry_pack *p = NULL;
    expect_fail(ferry_pack_open(missing, &tiny_shape, &p), FERRY_ERR_IO, "missing", missing,
                "No such file");
    free(bytes);
}
END_TEST

/* Entries that a consistent header checksum does not excuse. */
START_TEST(test_pack_rejects_bad_entries)
{
    size_t len;
    uint8_t *orig = pack_bytes(&len);
    uint8_t *b = malloc(len + 8192);
    ck_assert(b != NULL);
    char path[512];
    const size_t e12 = entry_at(1, 2);

    memcpy(b, orig, len);
    put_le64(b + e12, get_le64(b + e12) + 8);
    reseal(b);
    expect_fail(open_variant("bad.pack", b, len, &tiny_shape, path), FERRY_ERR_FORMAT,
                "misaligned", "layer 1 expert 2: offset", "not a multiple of 4096");

    memcpy(b, orig, len);
    put_le64(b + e12 + 8, EXPERT_BYTES + 2);
    reseal(b);
    expect_fail(open_variant("bad.pack", b, len, &tiny_shape, path), FERRY_ERR_FORMAT,
                "size", "layer 1 expert 2: 442370 bytes", "imply 442368");

    memcpy(b, orig, len);
    b[e12 + 24] = FERRY_DTYPE_F32; /* w1 claims f32: the size no longer matches */
    reseal(b);
    expect_fail(open_variant("bad.pack", b, len, &tiny_shape, path), FERRY_ERR_FORMAT,
                "dtype vs size", "dtypes F32/BF16/BF16", NULL);

    memcpy(b, orig, len);
    b[e12 + 26] = 9;
    reseal(b);
    expect_fail(open_variant("bad.pack", b, len, &tiny_shape, path), FERRY_ERR_FORMAT,
                "unknown dtype", "layer 1 expert 2: w2 dtype 9 is unknown", NULL);

    memcpy(b, orig, len);
    put_le64(b + e12, get_le64(b + entry_at(1, 1)));
    reseal(b);
    expect_fail(open_variant("bad.pack", b, len, &tiny_shape, path), FERRY_ERR_FORMAT,
                "overlap", "layer 1 expert 2", "overlaps the expert before it");

    memcpy(b, orig, len);
    put_le64(b + entry_at(0, 0), 4096);
    reseal(b);
    expect_fail(open_variant("bad.pack", b, len, &tiny_shape, path), FERRY_ERR_FORMAT,
                "inside header", "layer 0 expert 0", "overlaps the header");

    memcpy(b, orig, len);
    put_le64(b + entry_at(5, 7), get_le64(b + entry_at(5, 7)) + 4096);
    reseal(b);
    expect_fail(open_variant("bad.pack", b, len, &tiny_shape, path), FERRY_ERR_FORMAT,
                "past the end", "layer 5 expert 7", "past the recorded file size");

    /* The header records a longer file than there is, but every expert is whole. */
    memcpy(b, orig, len);
    put_le64(b + 32, len + 4096);
    reseal(b);
    expect_fail(open_variant("bad.pack", b, len, &tiny_shape, path), FERRY_ERR_FORMAT,
                "file bytes", "truncated: the file has", NULL);

    /* Trailing bytes after the last expert. */
    memcpy(b, orig, len);
    memset(b + len, 0, 4096);
    expect_fail(open_variant("bad.pack", b, len + 4096, &tiny_shape, path), FERRY_ERR_FORMAT,
                "trailing", "trailing data", NULL);

    /* A header region size that does not fit the shape it claims. */
    memcpy(b, orig, len);
    b[13] = 0x30; /* 12288 */
    reseal(b);
    expect_fail(open_variant("bad.pack", b, len, &tiny_shape, path), FERRY_ERR_FORMAT,
                "header size", "header region of", NULL);
    free(b);
    free(orig);
}
END_TEST

/* ---- the writer --------------------------------------------------------------------- */

/* The files in dir (but . and ..). */
static int count_files(const char *dir)
{
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    int n = 0;
    const struct dirent *e;
    while ((e = readdir(d)))
        n += strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
    closedir(d);
    return n;
}

START_TEST(test_pack_writer_is_atomic)
{
    char dir[512], path[600], tmp[610];
    tu_scratch_dir(dir, "pack-atomic");
    snprintf(path, sizeof path, "%s/model.pack", dir);

    int32_t n_progress = 0;
    expect_fail(write_tiny_pack(path, 2 * N_EXPERTS + 4, &n_progress), FERRY_ERR_IO,
                "failing source", "layer 2 expert 4 w3", "injected source failure");
    ck_assert_int_eq(n_progress, 2 * N_EXPERTS + 4);
    ck_assert_msg(access(path, F_OK) != 0 && errno == ENOENT, "a file was left at %s", path);
    ck_assert_msg(count_files(dir) == 0, "the temporary of %s was left behind", path);

    /* A good pack, then a failing rewrite: the good one stays as it was. */
    ck_assert_msg(write_tiny_pack(path, -1, NULL) == FERRY_OK, "%s", ferry_last_error());
    size_t len_a, len_b;
    char *a = tu_read_file(path, &len_a);
    ck_assert(write_tiny_pack(path, 0, NULL) == FERRY_ERR_IO);
    char *b = tu_read_file(path, &len_b);
    ck_assert(len_a == len_b && memcmp(a, b, len_a) == 0);
    ck_assert_int_eq(count_files(dir), 1); /* the pack, no temporary */
    ferry_pack *p = NULL;
    ck_assert_msg(ferry_pack_open(path, &tiny_shape, &p) == FERRY_OK, "%s", ferry_last_error());
    ferry_pack_close(p);
    /* The writer is deterministic: the same model gives the same file. */
    size_t len_g;
    char *g = tu_read_file(g_pack, &len_g);
    ck_assert(len_g == len_a && memcmp(g, a, len_a) == 0);
    free(a);
    free(b);
    free(g);

    ferry_pack_shape bad = tiny_shape;
    bad.d_ff = 0;
    expect_fail(ferry_pack_write(path, &bad, st_source, NULL, NULL), FERRY_ERR_INVALID,
                "d_ff 0", "d_ff out of range", NULL);
    snprintf(tmp, sizeof tmp, "%s/no-such-dir/x.pack", dir);
    expect_fail(write_tiny_pack(tmp, -1, NULL), FERRY_ERR_IO, "unwritable", "cannot create",
                NULL);
    unlink(path);
    rmdir(dir);
}
END_TEST

/* ---- quantized parts (format version 2) ------------------------------------------------ */

static ferry_status quant_source(void *user, int32_t l, int32_t e, int32_t which,
                                 const void **data, ferry_dtype *dtype)
{
    (void)l, (void)e;
    *data = user;
    *dtype = which == FERRY_PACK_W2 ? FERRY_DTYPE_Q8 : FERRY_DTYPE_Q4;
    return FERRY_OK;
}

START_TEST(test_pack_quantized_parts)
{
    char dir[512], path[600];
    tu_scratch_dir(dir, "pack_quant");
    snprintf(path, sizeof path, "%s/q.pack", dir);
    uint8_t *src = calloc(1, (size_t)D_MODEL * D_FF / 32 * 34);
    ck_assert_msg(ferry_pack_write(path, &tiny_shape, quant_source, NULL, src) == FERRY_OK, "%s",
                  ferry_last_error());
    ferry_pack *p;
    ck_assert_msg(ferry_pack_open(path, &tiny_shape, &p) == FERRY_OK, "%s", ferry_last_error());
    const ferry_pack_entry *pe = ferry_pack_get(p, 1, 2);
    ck_assert_int_eq(pe->dtype[0], FERRY_DTYPE_Q4);
    ck_assert_int_eq(pe->dtype[2], FERRY_DTYPE_Q8);
    ck_assert_uint_eq(pe->part_bytes[0], D_FF * (D_MODEL / 32 * 20));
    ck_assert_uint_eq(pe->part_bytes[2], D_MODEL * (D_FF / 32 * 34));
    ck_assert_uint_eq(pe->n_bytes, 2 * pe->part_bytes[0] + pe->part_bytes[2]);
    ferry_pack_close(p);

    /* the same table under version 1, which has no quantized dtypes */
    size_t len;
    uint8_t *bytes = (uint8_t *)tu_read_file(path, &len);
    bytes[8] = 1;
    reseal(bytes);
    expect_fail(open_variant("v1-quant.pack", bytes, len, &tiny_shape, path), FERRY_ERR_FORMAT,
                "quantized in version 1", "layer 0 expert 0: w1 dtype 4",
                "pack format version 1 does not hold");
    /* a version 1 pack of plain dtypes still opens */
    size_t glen;
    uint8_t *g = pack_bytes(&glen);
    g[8] = 1;
    reseal(g);
    ck_assert_int_eq(open_variant("v1.pack", g, glen, &tiny_shape, path), FERRY_OK);
    free(g);
    free(bytes);

    /* group-wise formats need whole groups of 32 in both dimensions */
    ferry_pack_shape odd = {1, 1, 48, 64, 0};
    snprintf(path, sizeof path, "%s/odd.pack", dir);
    expect_fail(ferry_pack_write(path, &odd, quant_source, NULL, src), FERRY_ERR_INVALID,
                "d_model 48", "layer 0 expert 0 w1", "multiples of");
    ck_assert_int_eq(access(path, F_OK), -1);
    free(src);
}
END_TEST

/* ---- many threads on one reader ------------------------------------------------------- */

#define STRESS_SUBMITTERS 4
#define STRESS_SLOTS_EACH 6
#define STRESS_SLOTS (STRESS_SUBMITTERS * STRESS_SLOTS_EACH)
#define STRESS_READS_EACH 150

typedef struct {
    ferry_reader *r;
    const ferry_pack *p;
    uint8_t *region;
    size_t slot_bytes;
    /* written by a submitter before it submits, read by the waiter after completion: the
     * reader's own synchronisation must order them */
    int32_t slot_expert[STRESS_SLOTS];
    uint64_t slot_from[STRESS_SLOTS];
    size_t slot_len[STRESS_SLOTS];

    pthread_mutex_t mu; /* guards what follows */
    pthread_cond_t cv;
    int slot_busy[STRESS_SLOTS];
    int n_bad;
    char first_bad[512];
} stress_ctx;

typedef struct {
    stress_ctx *c;
    int32_t id;
} stress_arg;

static void stress_bad(stress_ctx *c, const char *msg)
{
    pthread_mutex_lock(&c->mu);
    if (c->n_bad++ == 0)
        snprintf(c->first_bad, sizeof c->first_bad, "%.500s", msg);
    pthread_mutex_unlock(&c->mu);
}

static void *stress_submitter(void *arg)
{
    stress_arg *a = arg;
    stress_ctx *c = a->c;
    uint64_t seed = 0x5eed0000u + (uint64_t)a->id;
    for (int32_t k = 0; k < STRESS_READS_EACH; k++) {
        int32_t slot = a->id * STRESS_SLOTS_EACH + k % STRESS_SLOTS_EACH;
        pthread_mutex_lock(&c->mu);
        while (c->slot_busy[slot])
            pthread_cond_wait(&c->cv, &c->mu);
        c->slot_busy[slot] = 1;
        pthread_mutex_unlock(&c->mu);

        int32_t i = (int32_t)(tu_rand_u64(&seed) % N_TOTAL);
        const ferry_pack_entry *e = ferry_pack_get(c->p, i / N_EXPERTS, i % N_EXPERTS);
        /* Every third read is a piece of the expert: an aligned start, any length. */
        uint64_t from = 0, n = e->n_bytes;
        if (k % 3 == 2) {
            from = (tu_rand_u64(&seed) % (e->n_bytes / 4096)) * 4096;
            n = 1 + tu_rand_u64(&seed) % (e->n_bytes - from);
        }
        c->slot_expert[slot] = i;
        c->slot_from[slot] = from;
        c->slot_len[slot] = (size_t)n;
        memset(c->region + c->slot_bytes * slot, 0xee, (size_t)n);
        if (ferry_reader_submit(c->r, e->offset + from, (size_t)n,
                                c->region + c->slot_bytes * slot, (uint64_t)slot) != FERRY_OK) {
            stress_bad(c, ferry_last_error());
            pthread_mutex_lock(&c->mu);
            c->slot_busy[slot] = 0;
            pthread_mutex_unlock(&c->mu);
        }
    }
    return NULL;
}

static void *stress_waiter(void *arg)
{
    stress_ctx *c = arg;
    char msg[600];
    for (int32_t k = 0; k < STRESS_SUBMITTERS * STRESS_READS_EACH; k++) {
        uint64_t tag = 0;
        ferry_status res = FERRY_OK;
        int done = 0;
        /* Short timeouts now and then: the timed path runs against the submitters too. */
        while (!done) {
            ferry_status st = ferry_reader_wait(c->r, k % 4 == 0 ? 1 : -1, &tag, &res, &done);
            if (st == FERRY_ERR_INVALID) { /* nothing outstanding yet: submitters are slow */
                struct timespec ts = {0, 100000};
                nanosleep(&ts, NULL);
                continue;
            }
            if (st != FERRY_OK) {
                stress_bad(c, ferry_last_error());
                return NULL;
            }
        }
        int32_t slot = (int32_t)tag;
        if (tag >= STRESS_SLOTS) {
            stress_bad(c, "a tag that was never submitted");
            return NULL;
        }
        int32_t i = c->slot_expert[slot];
        const uint8_t *got = c->region + c->slot_bytes * slot;
        if (res != FERRY_OK) {
            snprintf(msg, sizeof msg, "slot %d: %s", slot, ferry_last_error());
            stress_bad(c, msg);
        } else if (memcmp(got, g_ref[i] + c->slot_from[slot], c->slot_len[slot]) != 0) {
            snprintf(msg, sizeof msg, "slot %d: layer %d expert %d bytes [%llu, +%zu) differ",
                     slot, i / N_EXPERTS, i % N_EXPERTS,
                     (unsigned long long)c->slot_from[slot], c->slot_len[slot]);
            stress_bad(c, msg);
        } else if (c->slot_len[slot] == EXPERT_BYTES
                   && ferry_pack_verify(c->p, i / N_EXPERTS, i % N_EXPERTS, got) != FERRY_OK) {
            stress_bad(c, ferry_last_error());
        }
        pthread_mutex_lock(&c->mu);
        c->slot_busy[slot] = 0;
        pthread_cond_broadcast(&c->cv);
        pthread_mutex_unlock(&c->mu);
    }
    return NULL;
}

START_TEST(test_pack_reader_stress_threads)
{
    const int m = _i;
    ferry_pack *p = NULL;
    ck_assert_msg(ferry_pack_open(g_pack, &tiny_shape, &p) == FERRY_OK, "%s", ferry_last_error());
    stress_ctx *c = calloc(1, sizeof *c);
    ck_assert(c != NULL);
    c->p = p;
    c->slot_bytes = round4k(EXPERT_BYTES);
    c->region = alloc_aligned(c->slot_bytes * STRESS_SLOTS);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    /* Depth 8 < 24 slots: requests queue behind each other. */
    c->r = open_reader(g_pack, both_modes[m], 8, c->region, c->slot_bytes * STRESS_SLOTS);
    if (c->r) {
        pthread_t sub[STRESS_SUBMITTERS], waiter;
        stress_arg args[STRESS_SUBMITTERS];
        ck_assert(pthread_create(&waiter, NULL, stress_waiter, c) == 0);
        for (int32_t t = 0; t < STRESS_SUBMITTERS; t++) {
            args[t] = (stress_arg){c, t};
            ck_assert(pthread_create(&sub[t], NULL, stress_submitter, &args[t]) == 0);
        }
        for (int32_t t = 0; t < STRESS_SUBMITTERS; t++)
            pthread_join(sub[t], NULL);
        pthread_join(waiter, NULL);
        ck_assert_msg(c->n_bad == 0, "%s: %d bad reads, first: %s", mode_names[m], c->n_bad,
                      c->first_bad);
        ferry_reader_stats stats;
        ferry_reader_get_stats(c->r, &stats);
        ck_assert_uint_eq(stats.n_requests, STRESS_SUBMITTERS * STRESS_READS_EACH);
        ferry_reader_destroy(c->r);
    }
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    free(c->region);
    free(c);
    ferry_pack_close(p);
}
END_TEST

static Suite *pack_suite(void)
{
    Suite *s = suite_create("pack");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 300);
    tcase_add_unchecked_fixture(tc, fixture_setup, fixture_teardown);
    tcase_add_test(tc, test_pack_layout_matches_model);
    tcase_add_loop_test(tc, test_pack_read_all_experts, 0, 2);
    tcase_add_test(tc, test_pack_reader_on_tmpfs);
    tcase_add_test(tc, test_pack_reader_falls_back_where_o_direct_is_refused);
    tcase_add_test(tc, test_pack_reader_continues_short_reads);
    tcase_add_test(tc, test_pack_reader_auto_falls_back_without_io_uring);
    tcase_add_test(tc, test_pack_read_bandwidth);
    tcase_add_loop_test(tc, test_pack_reader_tail_and_short_read, 0, 2);
    tcase_add_test(tc, test_pack_reader_rejects_bad_arguments);
    tcase_add_loop_test(tc, test_pack_reader_destroy_with_reads_in_flight, 0, 2);
    tcase_add_test(tc, test_pack_detects_corrupt_expert);
    tcase_add_test(tc, test_pack_detects_corrupt_table);
    tcase_add_test(tc, test_pack_detects_truncation);
    tcase_add_test(tc, test_pack_rejects_wrong_version_and_magic);
    tcase_add_test(tc, test_pack_rejects_other_model_shape);
    tcase_add_test(tc, test_pack_fingerprint);
    tcase_add_test(tc, test_pack_rejects_short_file);
    tcase_add_test(tc, test_pack_rejects_bad_entries);
    tcase_add_test(tc, test_pack_quantized_parts);
    tcase_add_test(tc, test_pack_writer_is_atomic);
    tcase_add_loop_test(tc, test_pack_reader_stress_threads, 0, 2);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(pack_suite()); }
