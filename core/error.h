/*
 * core/error.h: failure reporting and logging shared by every module.
 *
 * ferry_fail records a thread-local message and returns the code, so a failing path
 * reads `return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s' ...", path, name);`.
 * Library code never prints: FERRY_LOG sends a line to the callback set by ferry_set_log.
 */
#ifndef FERRY_CORE_ERROR_H
#define FERRY_CORE_ERROR_H

#include "ferry.h"

#if defined(__GNUC__)
#define FERRY_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define FERRY_PRINTF(a, b)
#endif

/* Records the message (printf format) as this thread's last error and returns code. */
ferry_status ferry_fail(ferry_status code, const char *fmt, ...) FERRY_PRINTF(2, 3);

/* Prepends "prefix: " to this thread's last error message and returns code; used where a
 * caller adds context (the file being read) to a failure from below. */
ferry_status ferry_fail_prefix(ferry_status code, const char *fmt, ...) FERRY_PRINTF(2, 3);

/* Sends one log line at the given level to the log callback, if the level is enabled. */
void ferry_log(ferry_log_level level, const char *fmt, ...) FERRY_PRINTF(2, 3);

/* Whether lines at this level are delivered (to skip building expensive messages). */
int ferry_log_enabled(ferry_log_level level);

/* Returns from the enclosing function with expr's status when it is not FERRY_OK. */
#define TRY(expr)                                                                              \
    do {                                                                                       \
        ferry_status st_ = (expr);                                                             \
        if (st_ != FERRY_OK)                                                                   \
            return st_;                                                                        \
    } while (0)

#endif
