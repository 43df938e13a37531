/*
 * core/progress.c: see progress.h. Owns the callback and its user pointer, set together under
 * one mutex so a report never pairs one program's function with another's pointer.
 */
#include "core/progress.h"

#include <pthread.h>

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static ferry_progress_fn g_fn = NULL;
static void *g_user = NULL;

void ferry_set_progress(ferry_progress_fn fn, void *user)
{
    pthread_mutex_lock(&g_lock);
    g_fn = fn;
    g_user = user;
    pthread_mutex_unlock(&g_lock);
}

void ferry_progress_report(const char *what, uint64_t done, uint64_t total, const char *unit)
{
    pthread_mutex_lock(&g_lock);
    ferry_progress_fn fn = g_fn;
    void *user = g_user;
    pthread_mutex_unlock(&g_lock);
    if (fn)
        fn(user, what, done, total, unit);
}
