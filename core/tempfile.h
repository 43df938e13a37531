/*
 * core/tempfile.h: the temporary files ferry writes before renaming them over their targets
 * (the packed expert file, a synthetic checkpoint's files, traces, statistics): unique names,
 * a registry that a signal handler empties (ferry_remove_temporaries in ferry.h), and the
 * sweep of temporaries that killed writers left behind.
 *
 * The temporary of target T is "T.<id>.tmp", id the writing thread's id: the process id in
 * a single-threaded program, and Linux's kill() takes either. So two processes (or threads)
 * writing one target never share a file, and a later run tells a live writer's temporary
 * from a dead one's. "T.tmp" is what ferry wrote before these names.
 *
 * The registry is a fixed table of FERRY_TEMP_SLOTS slots, each an atomic state and a path
 * owned by the writer. ferry_remove_temporaries walks it with atomics and unlink() alone
 * (async-signal-safe); a writer frees its path only after taking its slot back, which waits
 * while a removal reads it. A write that finds the table full goes on unrecorded: a signal
 * then leaves its temporary, which the next run's sweep removes.
 */
#ifndef FERRY_CORE_TEMPFILE_H
#define FERRY_CORE_TEMPFILE_H

#include <stdint.h>

#include "ferry.h"

#define FERRY_TEMP_SLOTS 1024

/* One temporary being written. A zeroed struct is "none". */
typedef struct {
    char *path;   /* "<target>.<id>.tmp", owned; NULL when none */
    int32_t slot; /* registry slot + 1; 0 when not recorded */
} ferry_temp;

/* Names the temporary of target for this thread and records it, before the caller creates
 * the file (O_CREAT | O_EXCL), so a signal at any moment after the file exists removes it.
 * Does not sweep (ferry_temp_sweep). FERRY_ERR_NOMEM. Thread-safe. */
ferry_status ferry_temp_begin(const char *target, ferry_temp *t);

/* The usual start of a write to target: ferry_temp_sweep, ferry_temp_begin, then the
 * temporary created (O_EXCL) and open for writing in *fd (-1 on failure, when nothing stays
 * recorded). FERRY_ERR_IO naming the temporary, FERRY_ERR_NOMEM. */
ferry_status ferry_temp_create(const char *target, ferry_temp *t, int *fd);

/* Renames the temporary over target (an atomic replace) and forgets it. FERRY_ERR_IO naming
 * both paths and strerror; the temporary then stays recorded for ferry_temp_abort. */
ferry_status ferry_temp_commit(ferry_temp *t, const char *target);

/* Removes the temporary (if it exists) and forgets it. NULL-safe; a zeroed, committed or
 * aborted t is left as it is. */
void ferry_temp_abort(ferry_temp *t);

/* Parses a file name (no folder) as a temporary: the writer's id (> 0) for "B.<id>.tmp", 0
 * for an old-style "B.tmp", -1 for anything else; *base_len gets strlen(B) (may be NULL). */
int64_t ferry_temp_parse(const char *name, size_t *base_len);

/* Whether the writer of a temporary is running: its thread (or process) exists, or exists
 * under another user (EPERM). */
int ferry_temp_owner_alive(int64_t id);

/* Cleans the folder of target before a write: removes each "T.<id>.tmp" whose writer is no
 * longer running (one warning line each, naming it), leaves those of running writers, and
 * names each old-style "T.tmp" in a warning with the rm command that removes it (an older
 * ferry may still be writing it). A folder that cannot be listed is left alone. Returns the
 * count removed. Thread-safe. */
int32_t ferry_temp_sweep(const char *target);

/* 'path' quoted for a POSIX shell into out (cap bytes, truncated with the quote closed). */
void ferry_temp_shell_quote(const char *path, char *out, size_t cap);

#endif
