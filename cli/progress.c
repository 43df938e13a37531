/*
 * cli/progress.c: see progress.h. Owns the progress line: what it shows, when it was drawn,
 * whether it is on the screen (read by the signal handler, hence a sig_atomic_t).
 *
 * The line reads "ferry: packing experts  45% (1.2 of 2.7 GiB), 3 s left". A new operation
 * (another what, or done going back) restarts the clock the time left is measured from; the
 * time left shows once an operation has run a second.
 */
#include "cli/progress.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define REDRAW_SECONDS 0.1

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER; /* guards what follows */
static const char *g_what;   /* the operation on the line; NULL: none */
static double g_start;       /* when it began, and its done then */
static uint64_t g_start_done;
static uint64_t g_last_done;
static double g_last_draw;
static atomic_int g_quiet;
static volatile sig_atomic_t g_drawn; /* the line is on the screen */

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Writes all n bytes to stderr's descriptor (unbuffered, like stderr itself). */
static void put(const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = write(STDERR_FILENO, s, n);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

/* Takes the line down; the caller holds g_lock. */
static void clear_line(void)
{
    if (g_drawn) {
        put("\r\033[K", 4);
        g_drawn = 0;
    }
}

/* "1.2 of 2.7 GiB": both in the unit that suits the total. */
static void format_bytes(char *out, size_t cap, uint64_t done, uint64_t total)
{
    static const char *const units[] = {"KiB", "MiB", "GiB", "TiB"};
    double scale = 1024.0;
    int u = 0;
    while (u < 3 && (double)total >= scale * 1024.0) {
        scale *= 1024.0;
        u++;
    }
    snprintf(out, cap, "%.1f of %.1f %s", (double)done / scale, (double)total / scale, units[u]);
}

/* ", 3 s left", ", 2 min 05 s left", ", 1 h 20 min left". */
static void format_left(char *out, size_t cap, double seconds)
{
    long s = (long)seconds + (seconds > (double)(long)seconds); /* rounded up: never "0 s" */
    if (s < 60)
        snprintf(out, cap, ", %ld s left", s);
    else if (s < 3600)
        snprintf(out, cap, ", %ld min %02ld s left", s / 60, s % 60);
    else
        snprintf(out, cap, ", %ld h %02ld min left", s / 3600, s / 60 % 60);
}

static void render(void *user, const char *what, uint64_t done, uint64_t total, const char *unit)
{
    (void)user;
    pthread_mutex_lock(&g_lock);
    double now = now_seconds();
    if (atomic_load(&g_quiet) || total == 0 || done >= total) { /* over, or not wanted */
        clear_line();
        g_what = NULL;
        pthread_mutex_unlock(&g_lock);
        return;
    }
    if (!g_what || strcmp(g_what, what) || done < g_last_done) {
        g_what = what;
        g_start = now;
        g_start_done = done;
        g_last_draw = 0;
    }
    g_last_done = done;
    if (g_drawn && now - g_last_draw < REDRAW_SECONDS) {
        pthread_mutex_unlock(&g_lock);
        return;
    }
    g_last_draw = now;
    char amount[96], left[48] = "", line[512];
    if (!strcmp(unit, "bytes"))
        format_bytes(amount, sizeof amount, done, total);
    else
        snprintf(amount, sizeof amount, "%llu of %llu %s", (unsigned long long)done,
                 (unsigned long long)total, unit);
    double elapsed = now - g_start;
    if (elapsed >= 1.0 && done > g_start_done)
        format_left(left, sizeof left,
                    (double)(total - done) * elapsed / (double)(done - g_start_done));
    int len = snprintf(line, sizeof line, "\rferry: %s %3d%% (%s)%s", what,
                       (int)((double)done * 100.0 / (double)total), amount, left);
    if (len < 0)
        len = 0;
    if ((size_t)len >= sizeof line)
        len = (int)sizeof line - 1;
    struct winsize ws; /* a line that wraps could not be redrawn in place */
    if (ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 1 && len > ws.ws_col)
        len = ws.ws_col; /* the \r and ws_col - 1 characters */
    put(line, (size_t)len);
    put("\033[K", 3);
    g_drawn = 1;
    pthread_mutex_unlock(&g_lock);
}

void cli_log(ferry_log_level level, const char *msg, void *user)
{
    static const char *const names[] = {"error", "warning", "info", "debug"};
    (void)user;
    pthread_mutex_lock(&g_lock);
    clear_line();
    fprintf(stderr, "ferry %s: %s\n", names[level], msg);
    pthread_mutex_unlock(&g_lock);
}

void cli_progress_install(void)
{
    if (!isatty(STDERR_FILENO))
        return;
    ferry_set_log(FERRY_LOG_WARN, cli_log, NULL);
    ferry_set_progress(render, NULL);
}

void cli_progress_quiet(void) { atomic_store(&g_quiet, 1); }

static void on_signal(int sig)
{
    ferry_remove_temporaries();
    if (g_drawn) /* not clear_line: no lock here; the process ends */
        put("\r\033[K", 4);
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    raise(sig); /* pending until the handler returns, then the default action */
}

void cli_signals_install(void)
{
    static const int sigs[] = {SIGINT, SIGTERM, SIGHUP};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
        struct sigaction old, sa;
        if (sigaction(sigs[i], NULL, &old) != 0 || old.sa_handler == SIG_IGN)
            continue;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_signal;
        sigfillset(&sa.sa_mask); /* one handler at a time */
        sigaction(sigs[i], &sa, NULL);
    }
}
