/*
 * core/tempfile.c: see tempfile.h. Owns the registry of the temporaries this process is
 * writing.
 *
 * A slot's state moves FREE -> FILLING -> READY (its writer, recording a path) -> FREE (its
 * writer, done), or READY -> REMOVING -> REMOVED (ferry_remove_temporaries) -> FREE (its
 * writer). Only the writer moves a slot to FREE, and never out of REMOVING, so the path a
 * removal reads stays allocated until the removal is done.
 */
#include "core/tempfile.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/error.h"

_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "the registry needs lock-free atomic ints "
                                          "(async-signal-safe)");

enum { SLOT_FREE = 0, SLOT_FILLING, SLOT_READY, SLOT_REMOVING, SLOT_REMOVED };

static atomic_int g_state[FERRY_TEMP_SLOTS];
static char *g_path[FERRY_TEMP_SLOTS]; /* written while FILLING, read while REMOVING */

/* A slot holding path, + 1; 0 when the table is full. */
static int32_t registry_add(char *path)
{
    for (int32_t i = 0; i < FERRY_TEMP_SLOTS; i++) {
        int expect = SLOT_FREE;
        if (atomic_compare_exchange_strong(&g_state[i], &expect, SLOT_FILLING)) {
            g_path[i] = path;
            atomic_store(&g_state[i], SLOT_READY);
            return i + 1;
        }
    }
    return 0;
}

/* Takes slot i back, waiting out a removal that is reading its path. */
static void registry_drop(int32_t i)
{
    for (;;) {
        int s = atomic_load(&g_state[i]);
        if (s == SLOT_REMOVING) {
            sched_yield();
            continue;
        }
        if (atomic_compare_exchange_strong(&g_state[i], &s, SLOT_FREE))
            return;
    }
}

int32_t ferry_remove_temporaries(void)
{
    int32_t n = 0;
    int saved = errno;
    for (int32_t i = 0; i < FERRY_TEMP_SLOTS; i++) {
        int expect = SLOT_READY;
        if (!atomic_compare_exchange_strong(&g_state[i], &expect, SLOT_REMOVING))
            continue;
        if (unlink(g_path[i]) == 0)
            n++;
        atomic_store(&g_state[i], SLOT_REMOVED);
    }
    errno = saved;
    return n;
}

ferry_status ferry_temp_begin(const char *target, ferry_temp *t)
{
    *t = (ferry_temp){0};
    size_t n = strlen(target) + 32;
    char *path = malloc(n);
    if (!path)
        return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", target);
    snprintf(path, n, "%s.%lld.tmp", target, (long long)gettid());
    t->path = path;
    t->slot = registry_add(path);
    if (!t->slot)
        ferry_log(FERRY_LOG_DEBUG, "%s: %d temporaries are being written already; an "
                  "interruption will leave this one for the next run to remove", path,
                  FERRY_TEMP_SLOTS);
    return FERRY_OK;
}

ferry_status ferry_temp_create(const char *target, ferry_temp *t, int *fd)
{
    *fd = -1;
    ferry_temp_sweep(target);
    TRY(ferry_temp_begin(target, t));
    *fd = open(t->path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (*fd < 0) {
        ferry_status st = ferry_fail(FERRY_ERR_IO, "%s: cannot create: %s", t->path,
                                     strerror(errno));
        ferry_temp_abort(t);
        return st;
    }
    return FERRY_OK;
}

static void temp_forget(ferry_temp *t)
{
    if (t->slot)
        registry_drop(t->slot - 1);
    free(t->path);
    *t = (ferry_temp){0};
}

ferry_status ferry_temp_commit(ferry_temp *t, const char *target)
{
    if (rename(t->path, target) != 0)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot rename to %s: %s", t->path, target,
                          strerror(errno));
    temp_forget(t);
    return FERRY_OK;
}

void ferry_temp_abort(ferry_temp *t)
{
    if (!t || !t->path)
        return;
    unlink(t->path);
    temp_forget(t);
}

int64_t ferry_temp_parse(const char *name, size_t *base_len)
{
    size_t n = strlen(name);
    if (n < 5 || strcmp(name + n - 4, ".tmp"))
        return -1;
    size_t end = n - 4, d = end; /* the id, if any, is name[d, end) */
    while (d > 0 && name[d - 1] >= '0' && name[d - 1] <= '9')
        d--;
    int64_t id = 0;
    if (d < end && end - d <= 18 && d >= 2 && name[d - 1] == '.' && name[d] != '0') {
        for (size_t i = d; i < end; i++)
            id = id * 10 + (name[i] - '0');
        end = d - 1;
    }
    if (base_len)
        *base_len = end;
    return id;
}

int ferry_temp_owner_alive(int64_t id)
{
    if (id <= 0 || id > INT32_MAX)
        return 0;
    return kill((pid_t)id, 0) == 0 || errno != ESRCH;
}

void ferry_temp_shell_quote(const char *path, char *out, size_t cap)
{
    size_t at = 0;
    if (cap < 3) {
        if (cap)
            out[0] = 0;
        return;
    }
    out[at++] = '\'';
    for (const char *p = path; *p; p++) {
        const char *piece = *p == '\'' ? "'\\''" : NULL;
        size_t len = piece ? 4 : 1;
        if (at + len + 2 > cap)
            break;
        if (piece)
            memcpy(out + at, piece, len);
        else
            out[at] = *p;
        at += len;
    }
    out[at++] = '\'';
    out[at] = 0;
}

int32_t ferry_temp_sweep(const char *target)
{
    const char *slash = strrchr(target, '/');
    const char *base = slash ? slash + 1 : target;
    size_t dir_len = slash ? (size_t)(slash - target) : 0, base_len = strlen(base);
    char *dir = slash ? strndup(target, dir_len ? dir_len : 1) : strdup(".");
    DIR *d = dir ? opendir(dir) : NULL;
    int32_t removed = 0;
    const int64_t self = gettid();
    const struct dirent *e;
    while (d && (e = readdir(d))) {
        size_t bl;
        int64_t id = ferry_temp_parse(e->d_name, &bl);
        int old = !strncmp(e->d_name, base, base_len) && !strcmp(e->d_name + base_len, ".tmp");
        if (!old && (id <= 0 || bl != base_len || strncmp(e->d_name, base, base_len)))
            continue;
        char path[4352], quoted[8800];
        snprintf(path, sizeof path, "%.*s%s%s", (int)dir_len, target, slash ? "/" : "",
                 e->d_name);
        if (old) {
            ferry_temp_shell_quote(path, quoted, sizeof quoted);
            ferry_log(FERRY_LOG_WARN, "%s is a temporary file an older ferry left behind (or is "
                      "still writing); when none is running, remove it: rm -f %s", path, quoted);
        } else if (id != self && ferry_temp_owner_alive(id)) {
            ferry_log(FERRY_LOG_INFO, "%s: left alone, process %lld that writes it is running",
                      path, (long long)id);
        } else if (unlink(path) == 0) {
            /* id == self: a dead process's file under a reused id; this thread writes no
             * other temporary of target now */
            ferry_log(FERRY_LOG_WARN, "removed %s, a temporary file left by process %lld, "
                      "which is no longer running", path, (long long)id);
            removed++;
        }
    }
    if (d)
        closedir(d);
    free(dir);
    return removed;
}
