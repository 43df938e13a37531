/*
 * core/progress.h: the process-wide progress callback (ferry_set_progress in ferry.h) and the
 * one call the library's long loops make to report through it.
 *
 * The library never draws anything: it hands (what, done, total, unit) to the callback the
 * program set, or to nobody. An operation reports as it goes (done = 0 first where the total
 * is known from the start), at a granularity that costs nothing next to the work (an expert,
 * a layer, a window, 1/256 of a checkpoint), and ends with one call where done == total
 * (finished) or total == 0 (stopped by a failure), so a renderer always knows when to take
 * its line down.
 */
#ifndef FERRY_CORE_PROGRESS_H
#define FERRY_CORE_PROGRESS_H

#include <stdint.h>

#include "ferry.h"

/* Passes one report to the callback, if one is set. what and unit are string constants
 * ("packing experts", "bytes"). Thread-safe; the callback runs on the calling thread,
 * outside any lock of this module. */
void ferry_progress_report(const char *what, uint64_t done, uint64_t total, const char *unit);

#endif
