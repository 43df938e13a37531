/*
 * serve/stop.h: stop strings applied to generated text as the OpenAI API does ("stop": up
 * to 4 sequences; the returned text ends before the first one and never contains it), and
 * the UTF-8 holdback that keeps streamed pieces whole characters.
 *
 * Generated text arrives a decoded token at a time. A ferry_stop matcher owns a growing
 * buffer of the whole text and two offsets into it: `emitted` (bytes already handed out)
 * and the end. Each feed appends a piece and hands out the bytes that are now safe: those
 * that cannot be the start of a stop string and do not end in an incomplete UTF-8
 * sequence. What it holds back is as short as possible: the longest suffix that is a
 * proper prefix of some stop string, or the trailing incomplete UTF-8 sequence, whichever
 * starts earlier. When a stop string occurs (anywhere, across piece boundaries), the text
 * is cut at the start of the earliest occurrence: that occurrence and everything after it
 * are never handed out.
 */
#ifndef FERRY_SERVE_STOP_H
#define FERRY_SERVE_STOP_H

#include <stddef.h>
#include <stdint.h>

#include "ferry.h"

typedef struct ferry_stop ferry_stop; /* fields live in stop.c only */

/* What one feed or flush hands out. */
typedef struct {
    const char *text;   /* the newly safe bytes: a view into the matcher's buffer, valid
                         * until the next feed, flush or reset of that matcher */
    size_t len;         /* their count (may be 0) */
    int stopped;        /* 1 once a stop string has occurred (text then ends before it) */
    int32_t stop_index; /* which stop string (index into the array given at creation) when
                         * stopped is set by this call or an earlier one, else -1 */
} ferry_stop_result;

/* Creates a matcher for n_stop stop strings (each NUL-terminated, copied; n_stop may be 0:
 * the matcher then only holds back incomplete UTF-8). initial_bytes sizes the text buffer
 * (0: a default); it grows by doubling as text arrives. On success *out owns the matcher.
 * Returns FERRY_ERR_INVALID (out NULL, n_stop < 0, stop NULL with n_stop > 0, a NULL or
 * empty stop string) or FERRY_ERR_NOMEM. Thread-safe; one matcher serves one thread. */
ferry_status ferry_stop_create(const char *const *stop, int32_t n_stop, size_t initial_bytes,
                               ferry_stop **out);

/* Frees the matcher. NULL-safe. */
void ferry_stop_destroy(ferry_stop *m);

/* Empties the text for a new generation, keeping the stop strings and the buffer. */
void ferry_stop_reset(ferry_stop *m);

/* Appends piece (len bytes, any bytes; NULL allowed when len is 0) and fills *r with the
 * bytes now safe to hand out and whether a stop string occurred. After a stop, further
 * feeds append nothing and hand out nothing (r->stopped stays 1). Returns FERRY_ERR_INVALID
 * (m or r NULL, piece NULL with len > 0) or FERRY_ERR_NOMEM (growing the buffer; the
 * matcher is unchanged and the feed may be retried); *r is written only on success. */
ferry_status ferry_stop_feed(ferry_stop *m, const char *piece, size_t len, ferry_stop_result *r);

/* Ends the generation (length limit or end of sequence): hands out everything still held
 * back (a prefix of a stop string that never completed, an incomplete UTF-8 sequence).
 * After a stop there is nothing left to hand out. Further feeds are allowed (they continue
 * the text). Returns FERRY_ERR_INVALID when m or r is NULL. */
ferry_status ferry_stop_flush(ferry_stop *m, ferry_stop_result *r);

/* All bytes handed out so far, in order (their concatenation); *len gets the count. The
 * pointer is valid until the next feed, flush or reset. Not NUL-terminated in general. */
const char *ferry_stop_text(const ferry_stop *m, size_t *len);

/* The UTF-8 sequence at the start of s[0..n): returns its length (1..4) when s holds a
 * whole well-formed sequence (no overlong forms, no surrogates, nothing above U+10FFFF),
 * 0 when s[0..n) is a proper prefix of one (more bytes could complete it; n may be 0),
 * -1 when it is malformed whatever follows. Thread-safe. */
int32_t ferry_utf8_seq(const char *s, size_t n);

#endif
