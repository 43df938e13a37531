/*
 * core/clock.h: the monotonic clock every timing in the library reads.
 */
#ifndef FERRY_CORE_CLOCK_H
#define FERRY_CORE_CLOCK_H

#include <time.h>

/* Seconds on CLOCK_MONOTONIC: only differences mean anything. */
static inline double ferry_now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#endif
