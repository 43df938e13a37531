/*
 * tests/test_tempfile.c: the temporaries of core/tempfile.h (names, commit and abort, the
 * registry that ferry_remove_temporaries empties, from a signal handler and against writers
 * on other threads, the sweep of stale ones) and the progress reports of the writers that
 * use them (core/progress.h through ferry_set_progress).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/error.h"
#include "core/fileio.h"
#include "core/tempfile.h"
#include "offload/pack.h"
#include "tests/check_util.h"

/* The entries of dir (but . and ..), each name into names (up to 64 of 256 bytes). */
static int list_names(const char *dir, char names[][256])
{
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    int n = 0;
    const struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && n < 64)
            snprintf(names[n++], 256, "%s", e->d_name);
    closedir(d);
    return n;
}

static int exists(const char *path) { return access(path, F_OK) == 0; }

static void touch(const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    ck_assert_msg(fd >= 0, "%s: %s", path, strerror(errno));
    ck_assert_int_eq(write(fd, "partial", 7), 7);
    close(fd);
}

/* A process id that no process has now: a child that exited and was reaped. */
static pid_t dead_pid(void)
{
    pid_t p = fork();
    ck_assert(p >= 0);
    if (p == 0)
        _exit(0);
    waitpid(p, NULL, 0);
    return p;
}

static char g_log[8192];
static void capture_log(ferry_log_level level, const char *msg, void *user)
{
    (void)level, (void)user;
    size_t n = strlen(g_log);
    snprintf(g_log + n, sizeof g_log - n, "%s\n", msg);
}

START_TEST(test_temp_parse_names)
{
    size_t base = 0;
    ck_assert_int_eq(ferry_temp_parse("m.pack.1234.tmp", &base), 1234);
    ck_assert_uint_eq(base, strlen("m.pack"));
    ck_assert_int_eq(ferry_temp_parse("m.pack.tmp", &base), 0); /* an older ferry's */
    ck_assert_uint_eq(base, strlen("m.pack"));
    ck_assert_int_eq(ferry_temp_parse("config.json.7.tmp", &base), 7);
    ck_assert_uint_eq(base, strlen("config.json"));
    ck_assert_int_eq(ferry_temp_parse("m.pack", NULL), -1);
    ck_assert_int_eq(ferry_temp_parse(".tmp", NULL), -1);
    ck_assert_int_eq(ferry_temp_parse("x.tmpx", NULL), -1);
    ck_assert_int_eq(ferry_temp_parse("12.tmp", &base), 0); /* no base before the id */
    ck_assert_uint_eq(base, 2);
    ck_assert_int_eq(ferry_temp_parse("a.0012.tmp", &base), 0); /* ids have no leading 0 */
    ck_assert_int_eq(ferry_temp_parse("a.99999999999999999999.tmp", &base), 0); /* too long */

    char q[64];
    ferry_temp_shell_quote("/a b/it's", q, sizeof q);
    ck_assert_str_eq(q, "'/a b/it'\\''s'");
    ferry_temp_shell_quote("/a/very/long/path", q, 8);
    ck_assert_str_eq(q, "'/a/ve'");
}
END_TEST

START_TEST(test_temp_commit_and_abort)
{
    char dir[512], target[600], want[700];
    tu_scratch_dir(dir, "temp-commit");
    snprintf(target, sizeof target, "%s/out.bin", dir);
    ferry_temp t;
    ck_assert_int_eq(ferry_temp_begin(target, &t), FERRY_OK);
    snprintf(want, sizeof want, "%s.%d.tmp", target, (int)gettid());
    ck_assert_str_eq(t.path, want);
    ck_assert_int_gt(t.slot, 0);
    touch(t.path);
    ck_assert_int_eq(ferry_temp_commit(&t, target), FERRY_OK);
    ck_assert_ptr_null(t.path);
    ck_assert(exists(target) && !exists(want));
    ck_assert_int_eq(ferry_remove_temporaries(), 0); /* committed: not recorded any more */
    ck_assert(exists(target));
    ferry_temp_abort(&t); /* a finished one: nothing */

    ck_assert_int_eq(ferry_temp_begin(target, &t), FERRY_OK);
    touch(t.path);
    ferry_temp_abort(&t);
    ck_assert(!exists(want) && exists(target));
    ferry_temp_abort(NULL);

    /* removed under the writer: its commit fails naming the temporary, the target stays */
    ck_assert_int_eq(ferry_temp_begin(target, &t), FERRY_OK);
    touch(t.path);
    ck_assert_int_eq(ferry_remove_temporaries(), 1);
    ck_assert(!exists(want));
    ck_assert_int_eq(ferry_temp_commit(&t, target), FERRY_ERR_IO);
    ck_assert_ptr_nonnull(strstr(ferry_last_error(), want));
    ferry_temp_abort(&t);
    ck_assert_int_eq(ferry_remove_temporaries(), 0);
    ck_assert(exists(target));
}
END_TEST

static char g_signal_target[600];
static void on_usr1(int sig)
{
    (void)sig;
    ferry_remove_temporaries();
}

START_TEST(test_temp_removed_by_a_signal_handler)
{
    char dir[512];
    tu_scratch_dir(dir, "temp-signal");
    snprintf(g_signal_target, sizeof g_signal_target, "%s/m.pack", dir);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigemptyset(&sa.sa_mask);
    ck_assert_int_eq(sigaction(SIGUSR1, &sa, NULL), 0);
    ferry_temp t[3];
    char target[700];
    for (int i = 0; i < 3; i++) {
        snprintf(target, sizeof target, "%s.%d", g_signal_target, i);
        ck_assert_int_eq(ferry_temp_begin(target, &t[i]), FERRY_OK);
        touch(t[i].path);
    }
    char names[64][256];
    ck_assert_int_eq(list_names(dir, names), 3);
    raise(SIGUSR1);
    ck_assert_int_eq(list_names(dir, names), 0);
    for (int i = 0; i < 3; i++)
        ferry_temp_abort(&t[i]);
}
END_TEST

START_TEST(test_temp_registry_full)
{
    char dir[512], target[700];
    tu_scratch_dir(dir, "temp-full");
    static ferry_temp t[FERRY_TEMP_SLOTS + 1];
    for (int i = 0; i <= FERRY_TEMP_SLOTS; i++) {
        snprintf(target, sizeof target, "%s/f%d", dir, i);
        ck_assert_int_eq(ferry_temp_begin(target, &t[i]), FERRY_OK);
    }
    /* the table holds FERRY_TEMP_SLOTS; the next write goes on unrecorded */
    ck_assert_int_gt(t[FERRY_TEMP_SLOTS - 1].slot, 0);
    ck_assert_int_eq(t[FERRY_TEMP_SLOTS].slot, 0);
    touch(t[0].path);
    touch(t[FERRY_TEMP_SLOTS].path);
    ck_assert_int_eq(ferry_remove_temporaries(), 1); /* the files that exist */
    ck_assert(!exists(t[0].path) && exists(t[FERRY_TEMP_SLOTS].path));
    for (int i = 0; i <= FERRY_TEMP_SLOTS; i++)
        ferry_temp_abort(&t[i]);
    /* every slot is free again */
    for (int i = 0; i < FERRY_TEMP_SLOTS; i++) {
        snprintf(target, sizeof target, "%s/g%d", dir, i);
        ck_assert_int_eq(ferry_temp_begin(target, &t[i]), FERRY_OK);
        ck_assert_int_gt(t[i].slot, 0);
    }
    for (int i = 0; i < FERRY_TEMP_SLOTS; i++)
        ferry_temp_abort(&t[i]);
}
END_TEST

/* Writers on threads commit their files while the main thread removes temporaries over
 * and over: each write ends committed or failed because its temporary was removed, and no
 * temporary, nor any file but a committed one, is left. */
typedef struct {
    const char *dir;
    int32_t id;
    int32_t committed, removed;
} writer_arg;

static void *writer_thread(void *arg)
{
    writer_arg *w = arg;
    char target[700];
    for (int32_t k = 0; k < 300; k++) {
        snprintf(target, sizeof target, "%s/w%d-%d", w->dir, (int)w->id, (int)k);
        ferry_temp t;
        if (ferry_temp_begin(target, &t) != FERRY_OK)
            return NULL;
        int fd = open(t.path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd >= 0)
            close(fd);
        if (ferry_temp_commit(&t, target) == FERRY_OK)
            w->committed++;
        else
            w->removed++;
        ferry_temp_abort(&t);
    }
    return NULL;
}

START_TEST(test_temp_removal_races_writers)
{
    char dir[512];
    tu_scratch_dir(dir, "temp-race");
    enum { N = 4 };
    pthread_t th[N];
    writer_arg args[N];
    for (int i = 0; i < N; i++) {
        args[i] = (writer_arg){dir, i, 0, 0};
        ck_assert_int_eq(pthread_create(&th[i], NULL, writer_thread, &args[i]), 0);
    }
    int32_t removed = 0;
    for (int i = 0; i < 2000; i++)
        removed += ferry_remove_temporaries();
    for (int i = 0; i < N; i++)
        pthread_join(th[i], NULL);
    int32_t committed = 0, failed = 0;
    for (int i = 0; i < N; i++) {
        committed += args[i].committed;
        failed += args[i].removed;
    }
    ck_assert_int_eq(committed + failed, N * 300);
    /* a removal unlinks a temporary only between its creation and its rename, and then its
     * commit fails: one for one */
    ck_assert_int_eq(failed, removed);
    DIR *d = opendir(dir);
    const struct dirent *e;
    int32_t files = 0;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        ck_assert_msg(ferry_temp_parse(e->d_name, NULL) < 0, "%s left behind", e->d_name);
        files++;
    }
    closedir(d);
    ck_assert_int_eq(files, committed);
}
END_TEST

START_TEST(test_temp_sweep_removes_dead_writers_only)
{
    char dir[512], target[600], dead[700], live[700], mine[700], old[700], other[700];
    tu_scratch_dir(dir, "temp-sweep");
    snprintf(target, sizeof target, "%s/m.pack", dir);
    snprintf(dead, sizeof dead, "%s.%d.tmp", target, (int)dead_pid());
    snprintf(live, sizeof live, "%s.%d.tmp", target, (int)getppid()); /* alive: our parent */
    snprintf(mine, sizeof mine, "%s.%d.tmp", target, (int)gettid()); /* a reused id */
    snprintf(old, sizeof old, "%s.tmp", target);
    snprintf(other, sizeof other, "%s/n.pack.%d.tmp", dir, (int)dead_pid()); /* another target */
    const char *all[] = {dead, live, mine, old, other};
    for (int i = 0; i < 5; i++)
        touch(all[i]);
    g_log[0] = 0;
    ferry_set_log(FERRY_LOG_INFO, capture_log, NULL);
    ck_assert_int_eq(ferry_temp_sweep(target), 2);
    ferry_set_log(FERRY_LOG_WARN, NULL, NULL);
    ck_assert(!exists(dead) && !exists(mine));
    ck_assert(exists(live) && exists(old) && exists(other));
    char want[1600];
    snprintf(want, sizeof want, "removed %s, a temporary file left by process", dead);
    ck_assert_msg(strstr(g_log, want), "%s", g_log);
    snprintf(want, sizeof want, "rm -f '%s'", old);
    ck_assert_msg(strstr(g_log, want), "%s", g_log);
    snprintf(want, sizeof want, "%s: left alone, process %d that writes it is running", live,
             (int)getppid());
    ck_assert_msg(strstr(g_log, want), "%s", g_log);
    /* a folder that does not exist: nothing */
    ck_assert_int_eq(ferry_temp_sweep("/no/such/folder/x"), 0);

    /* ferry_replace_file sweeps first, then writes the target whole */
    char stale[700];
    snprintf(stale, sizeof stale, "%s.%d.tmp", target, (int)dead_pid());
    touch(stale);
    const ferry_file_part part = {"hello", 5};
    ck_assert_int_eq(ferry_replace_file(target, &part, 1), FERRY_OK);
    ck_assert(!exists(stale));
    size_t len;
    char *got = tu_read_file(target, &len);
    ck_assert(len == 5 && !memcmp(got, "hello", 5));
    free(got);
}
END_TEST

/* ---- progress ------------------------------------------------------------------------ */

typedef struct {
    int32_t n_calls;
    uint64_t last_done, last_total, first_total;
    int monotonic;
    char what[64], unit[16];
} progress_log;

static void record_progress(void *user, const char *what, uint64_t done, uint64_t total,
                            const char *unit)
{
    progress_log *p = user;
    if (p->n_calls == 0)
        p->first_total = total;
    else if (done < p->last_done)
        p->monotonic = 0;
    p->n_calls++;
    p->last_done = done;
    p->last_total = total;
    snprintf(p->what, sizeof p->what, "%s", what);
    snprintf(p->unit, sizeof p->unit, "%s", unit);
}

static float g_zeros[64 * 128];
static int32_t g_fail_at = -1; /* the expert whose w2 fails, or -1 */

static ferry_status zero_source(void *user, int32_t l, int32_t e, int32_t which,
                                const void **data, ferry_dtype *dtype)
{
    (void)user;
    if (l * 4 + e == g_fail_at && which == FERRY_PACK_W2)
        return ferry_fail(FERRY_ERR_IO, "injected failure");
    *data = g_zeros;
    *dtype = FERRY_DTYPE_F32;
    return FERRY_OK;
}

START_TEST(test_progress_of_the_pack_writer)
{
    char dir[512], path[600];
    tu_scratch_dir(dir, "temp-progress");
    snprintf(path, sizeof path, "%s/p.pack", dir);
    const ferry_pack_shape shape = {3, 4, 64, 128, 0};
    progress_log log = {.monotonic = 1};
    ferry_set_progress(record_progress, &log);
    g_fail_at = -1;
    ck_assert_msg(ferry_pack_write(path, &shape, zero_source, NULL, NULL) == FERRY_OK, "%s",
                  ferry_last_error());
    struct stat sb;
    ck_assert_int_eq(stat(path, &sb), 0);
    /* after every expert but the last, then once at the end with done == total == the size;
     * the total is exact from the first report on (experts of one size) */
    ck_assert_int_eq(log.n_calls, 3 * 4);
    ck_assert_str_eq(log.what, "packing experts");
    ck_assert_str_eq(log.unit, "bytes");
    ck_assert(log.monotonic);
    ck_assert_uint_eq(log.last_done, (uint64_t)sb.st_size);
    ck_assert_uint_eq(log.last_total, (uint64_t)sb.st_size);
    ck_assert_uint_eq(log.first_total, (uint64_t)sb.st_size);

    /* a failing write ends its reports with total 0, and leaves no temporary */
    log = (progress_log){.monotonic = 1};
    g_fail_at = 5;
    ck_assert_int_eq(ferry_pack_write(path, &shape, zero_source, NULL, NULL), FERRY_ERR_IO);
    ck_assert_int_eq(log.n_calls, 5 + 1);
    ck_assert_uint_eq(log.last_total, 0);
    char names[64][256];
    ck_assert_int_eq(list_names(dir, names), 1);
    ck_assert_str_eq(names[0], "p.pack");

    /* NULL: nobody is told */
    ferry_set_progress(NULL, NULL);
    log = (progress_log){.monotonic = 1};
    g_fail_at = -1;
    ck_assert_int_eq(ferry_pack_write(path, &shape, zero_source, NULL, NULL), FERRY_OK);
    ck_assert_int_eq(log.n_calls, 0);
}
END_TEST

static Suite *tempfile_suite(void)
{
    Suite *s = suite_create("tempfile");
    TCase *tc = tcase_create("tempfile");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_temp_parse_names);
    tcase_add_test(tc, test_temp_commit_and_abort);
    tcase_add_test(tc, test_temp_removed_by_a_signal_handler);
    tcase_add_test(tc, test_temp_registry_full);
    tcase_add_test(tc, test_temp_removal_races_writers);
    tcase_add_test(tc, test_temp_sweep_removes_dead_writers_only);
    tcase_add_test(tc, test_progress_of_the_pack_writer);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(tempfile_suite()); }
