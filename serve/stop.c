/*
 * serve/stop.c: the stop-string matcher (see stop.h).
 *
 * The matcher owns buf[0..len): all text kept so far. Invariants between calls:
 * emitted <= len; no stop string starts at a position before `emitted` (every such
 * position was seen to mismatch every stop string at a byte already present, which later
 * text cannot change), so a feed searches only from `emitted` on. Bytes in
 * [emitted, len) are held back: a suffix that is a proper prefix of a stop string, or an
 * incomplete UTF-8 sequence. After a stop, len is cut to the start of the occurrence and
 * emitted == len.
 */
#include "serve/stop.h"

#include <stdlib.h>
#include <string.h>

#include "core/error.h"

#define STOP_DEFAULT_BYTES 4096

struct ferry_stop {
    char **stop;      /* n_stop NUL-terminated copies */
    size_t *stop_len; /* their lengths, each >= 1 */
    int32_t n_stop;
    size_t max_stop_len; /* the longest, 0 when there are none */
    char *buf;           /* the text; cap bytes */
    size_t len, cap;
    size_t emitted; /* bytes handed out: buf[0..emitted) */
    int stopped;
    int32_t stop_index; /* -1 until a stop */
};

int32_t ferry_utf8_seq(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    if (n == 0)
        return 0;
    unsigned char c = u[0];
    int32_t need;
    /* the range the second byte may take (excludes overlongs, surrogates, > U+10FFFF) */
    unsigned char lo = 0x80, hi = 0xBF;
    if (c < 0x80)
        return 1;
    if (c < 0xC2)
        return -1; /* a continuation byte, or an overlong 2-byte lead */
    if (c < 0xE0) {
        need = 2;
    } else if (c < 0xF0) {
        need = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c < 0xF5) {
        need = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else {
        return -1;
    }
    for (int32_t i = 1; i < need; i++) {
        if ((size_t)i >= n)
            return 0;
        unsigned char b = u[i];
        if (i == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF))
            return -1;
    }
    return need;
}

ferry_status ferry_stop_create(const char *const *stop, int32_t n_stop, size_t initial_bytes,
                               ferry_stop **out)
{
    if (!out || n_stop < 0 || (n_stop > 0 && !stop))
        return ferry_fail(FERRY_ERR_INVALID, "ferry_stop_create: invalid arguments");
    for (int32_t i = 0; i < n_stop; i++)
        if (!stop[i] || !stop[i][0])
            return ferry_fail(FERRY_ERR_INVALID, "ferry_stop_create: stop string %d is %s", (int)i,
                              stop[i] ? "empty" : "NULL");
    ferry_stop *m = calloc(1, sizeof(*m));
    if (!m)
        goto nomem;
    m->stop_index = -1;
    m->cap = initial_bytes ? initial_bytes : STOP_DEFAULT_BYTES;
    m->buf = malloc(m->cap);
    if (!m->buf)
        goto nomem;
    if (n_stop > 0) {
        m->stop = calloc((size_t)n_stop, sizeof(*m->stop));
        m->stop_len = calloc((size_t)n_stop, sizeof(*m->stop_len));
        if (!m->stop || !m->stop_len)
            goto nomem;
        m->n_stop = n_stop; /* set before the copies so destroy frees the partial set */
        for (int32_t i = 0; i < n_stop; i++) {
            m->stop_len[i] = strlen(stop[i]);
            m->stop[i] = malloc(m->stop_len[i] + 1);
            if (!m->stop[i])
                goto nomem;
            memcpy(m->stop[i], stop[i], m->stop_len[i] + 1);
            if (m->stop_len[i] > m->max_stop_len)
                m->max_stop_len = m->stop_len[i];
        }
    }
    *out = m;
    return FERRY_OK;
nomem:
    ferry_stop_destroy(m);
    return ferry_fail(FERRY_ERR_NOMEM, "ferry_stop_create: out of memory");
}

void ferry_stop_destroy(ferry_stop *m)
{
    if (!m)
        return;
    if (m->stop)
        for (int32_t i = 0; i < m->n_stop; i++)
            free(m->stop[i]);
    free(m->stop);
    free(m->stop_len);
    free(m->buf);
    free(m);
}

void ferry_stop_reset(ferry_stop *m)
{
    if (!m)
        return;
    m->len = 0;
    m->emitted = 0;
    m->stopped = 0;
    m->stop_index = -1;
}

/* Hands out buf[emitted..upto) into *r and advances emitted. */
static void hand_out(ferry_stop *m, size_t upto, ferry_stop_result *r)
{
    r->text = m->buf + m->emitted;
    r->len = upto - m->emitted;
    r->stopped = m->stopped;
    r->stop_index = m->stop_index;
    m->emitted = upto;
}

/* Whether buf[p..len) is a proper prefix of some stop string. */
static int prefix_of_stop(const ferry_stop *m, size_t p)
{
    size_t n = m->len - p;
    for (int32_t i = 0; i < m->n_stop; i++)
        if (n < m->stop_len[i] && memcmp(m->buf + p, m->stop[i], n) == 0)
            return 1;
    return 0;
}

/* The start of a trailing incomplete (but so far well-formed) UTF-8 sequence in
 * buf[from..len), or len when the text does not end in one. */
static size_t incomplete_utf8_start(const ferry_stop *m, size_t from)
{
    /* a sequence is at most 4 bytes, so an incomplete one starts within the last 3 */
    size_t lo = m->len > from + 3 ? m->len - 3 : from;
    for (size_t q = m->len; q > lo;) {
        q--;
        unsigned char c = (unsigned char)m->buf[q];
        if (c >= 0x80 && c < 0xC0)
            continue; /* a continuation byte: look further back for its lead */
        return ferry_utf8_seq(m->buf + q, m->len - q) == 0 ? q : m->len;
    }
    return m->len;
}

ferry_status ferry_stop_feed(ferry_stop *m, const char *piece, size_t len, ferry_stop_result *r)
{
    if (!m || !r || (!piece && len > 0))
        return ferry_fail(FERRY_ERR_INVALID, "ferry_stop_feed: invalid arguments");
    if (m->stopped) {
        hand_out(m, m->emitted, r);
        return FERRY_OK;
    }
    if (len > m->cap - m->len) {
        size_t cap = m->cap;
        while (len > cap - m->len) {
            if (cap > SIZE_MAX / 2)
                return ferry_fail(FERRY_ERR_NOMEM, "ferry_stop_feed: text too long");
            cap *= 2;
        }
        char *buf = realloc(m->buf, cap);
        if (!buf)
            return ferry_fail(FERRY_ERR_NOMEM, "ferry_stop_feed: out of memory (%zu bytes)", cap);
        m->buf = buf;
        m->cap = cap;
    }
    if (len > 0)
        memcpy(m->buf + m->len, piece, len);
    m->len += len;

    /* The earliest complete occurrence of any stop string at or after `emitted`. On a tie
     * the first listed wins (the cut is the same). */
    size_t best = SIZE_MAX;
    int32_t best_i = -1;
    for (int32_t i = 0; i < m->n_stop; i++) {
        size_t sl = m->stop_len[i];
        if (sl > m->len - m->emitted)
            continue;
        size_t last = m->len - sl;
        for (size_t p = m->emitted; p <= last && p < best; p++) {
            if (m->buf[p] == m->stop[i][0] && memcmp(m->buf + p, m->stop[i], sl) == 0) {
                best = p;
                best_i = i;
                break;
            }
        }
    }
    if (best_i >= 0) {
        m->stopped = 1;
        m->stop_index = best_i;
        m->len = best;
        hand_out(m, best, r);
        return FERRY_OK;
    }

    /* Hold back from the earliest position whose suffix could still grow into a stop
     * string; positions before it can never start one. */
    size_t safe = m->len;
    size_t from = m->emitted;
    if (m->max_stop_len > 0 && m->len - from >= m->max_stop_len)
        from = m->len - (m->max_stop_len - 1); /* a proper prefix is shorter than its stop */
    for (size_t p = from; m->n_stop > 0 && p < m->len; p++) {
        if (prefix_of_stop(m, p)) {
            safe = p;
            break;
        }
    }
    size_t u = incomplete_utf8_start(m, m->emitted);
    hand_out(m, u < safe ? u : safe, r);
    return FERRY_OK;
}

ferry_status ferry_stop_flush(ferry_stop *m, ferry_stop_result *r)
{
    if (!m || !r)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_stop_flush: invalid arguments");
    hand_out(m, m->len, r);
    return FERRY_OK;
}

const char *ferry_stop_text(const ferry_stop *m, size_t *len)
{
    if (len)
        *len = m ? m->emitted : 0;
    return m ? m->buf : NULL;
}
