/*
 * core/error.c: the thread-local last-error message and the log callback.
 */
#include "core/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define FERRY_ERROR_CAP 1024

static _Thread_local char g_error[FERRY_ERROR_CAP];

static ferry_log_level g_log_level = FERRY_LOG_WARN;
static ferry_log_fn g_log_fn = NULL;
static void *g_log_user = NULL;

const char *ferry_last_error(void) { return g_error; }

const char *ferry_status_name(ferry_status s)
{
    switch (s) {
    case FERRY_OK: return "FERRY_OK";
    case FERRY_ERR_NOMEM: return "FERRY_ERR_NOMEM";
    case FERRY_ERR_IO: return "FERRY_ERR_IO";
    case FERRY_ERR_FORMAT: return "FERRY_ERR_FORMAT";
    case FERRY_ERR_INVALID: return "FERRY_ERR_INVALID";
    case FERRY_ERR_DEVICE: return "FERRY_ERR_DEVICE";
    case FERRY_ERR_UNSUPPORTED: return "FERRY_ERR_UNSUPPORTED";
    }
    return "FERRY_ERR_UNKNOWN";
}

const char *ferry_version(void) { return "0.1.0"; }

ferry_status ferry_fail(ferry_status code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
    return code;
}

ferry_status ferry_fail_prefix(ferry_status code, const char *fmt, ...)
{
    char prefix[FERRY_ERROR_CAP];
    char old[FERRY_ERROR_CAP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, g_error, sizeof old);
    size_t n = strlen(prefix);
    if (n > sizeof g_error - 3)
        n = sizeof g_error - 3;
    memcpy(g_error, prefix, n);
    memcpy(g_error + n, ": ", 2);
    size_t rest = sizeof g_error - n - 3;
    size_t m = strnlen(old, rest);
    memcpy(g_error + n + 2, old, m);
    g_error[n + 2 + m] = 0;
    return code;
}

void ferry_set_log(ferry_log_level level, ferry_log_fn fn, void *user)
{
    g_log_level = level;
    g_log_fn = fn;
    g_log_user = user;
}

int ferry_log_enabled(ferry_log_level level) { return level <= g_log_level; }

void ferry_log(ferry_log_level level, const char *fmt, ...)
{
    static const char *names[] = {"error", "warning", "info", "debug"};
    char line[FERRY_ERROR_CAP];
    va_list ap;
    if (!ferry_log_enabled(level))
        return;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (g_log_fn) {
        g_log_fn(level, line, g_log_user);
        return;
    }
    fprintf(stderr, "ferry %s: %s\n", names[level], line);
}
