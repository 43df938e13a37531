/*
 * cli/progress.h: what the ferry command does with the library's progress reports and with
 * SIGINT, SIGTERM and SIGHUP.
 *
 * Progress: on a terminal, one line on stderr redrawn in place (at most 10 times a second)
 * with what is under way, done of total and the time left; taken down when the operation
 * ends. Nothing when stderr is not a terminal, or after --quiet. Library log lines go
 * through cli_log, which takes the line down first so the two never share a row.
 *
 * Signals: the handler removes the library's temporary files (ferry_remove_temporaries),
 * takes the progress line down, restores the default action and raises the signal again, so
 * the command still dies of it (its exit status says which).
 */
#ifndef FERRY_CLI_PROGRESS_H
#define FERRY_CLI_PROGRESS_H

#include "ferry.h"

/* Installs the renderer (when stderr is a terminal) and cli_log as the library's log sink at
 * its default level. Call once, before any command runs. */
void cli_progress_install(void);

/* --quiet: no progress from here on. */
void cli_progress_quiet(void);

/* A ferry_log_fn: the library's default line ("ferry warning: ..."), after taking the
 * progress line down. */
void cli_log(ferry_log_level level, const char *msg, void *user);

/* Installs the handler for SIGINT, SIGTERM and SIGHUP (not where they are ignored, as under
 * nohup). Not for ferry serve, which waits for them itself. */
void cli_signals_install(void);

#endif
