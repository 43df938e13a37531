/*
 * format/unicode.c: NFC as the Rust `tokenizers` library computes it.
 *
 * tokenizers normalizes with unicode-normalization-alignments, whose tables are Unicode 12.1;
 * utf8proc's are newer. The two agree on every single code point, and differ only where a
 * character assigned later takes part: the marks with a nonzero combining class added since
 * (the old tables give them class 0, so they are not reordered), and the composition
 * U+11935 U+11930 -> U+11938. Such a character is inert for the old tables (class 0, no
 * decomposition, no composition), so it splits the text: the pieces between are normalized
 * alone and the character is copied as it is, which is what the old tables produce.
 * The list below came from probing tokenizers 0.22.2 (the @anush008/tokenizers Node
 * binding) with every mark utf8proc gives a nonzero class and every canonical pair.
 *
 * Most text is already NFC, so only the spans that may change go through utf8proc: a span
 * starts at the last "safe" character (combining class 0, no canonical decomposition, never
 * the second of a composition: nothing before it can reorder or compose across it) before
 * a character that is not safe, and ends at the next safe one.
 */
#include "format/unicode.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

static const uint32_t inert_ranges[][2] = {
    {0x7FD, 0x7FD}, {0x898, 0x89F}, {0x8CA, 0x8D3}, {0x9FE, 0x9FE}, {0xC3C, 0xC3C}, {0xD3B, 0xD3C},
    {0xEBA, 0xEBA}, {0x1715, 0x1715}, {0x1ABF, 0x1ACE}, {0x1DF6, 0x1DFA}, {0xA82C, 0xA82C},
    {0x10D24, 0x10D27}, {0x10EAB, 0x10EAC}, {0x10EFD, 0x10EFF}, {0x10F46, 0x10F50},
    {0x10F82, 0x10F85}, {0x11070, 0x11070}, {0x1133B, 0x1133B}, {0x1145E, 0x1145E},
    {0x11839, 0x1183A}, {0x11930, 0x11930}, {0x11938, 0x11938}, {0x1193D, 0x1193E},
    {0x11943, 0x11943}, {0x119E0, 0x119E0}, {0x11A34, 0x11A34}, {0x11A47, 0x11A47},
    {0x11A99, 0x11A99}, {0x11D42, 0x11D42}, {0x11D44, 0x11D45}, {0x11D97, 0x11D97},
    {0x11F41, 0x11F42}, {0x16FF0, 0x16FF1}, {0x1E08F, 0x1E08F}, {0x1E130, 0x1E136},
    {0x1E2AE, 0x1E2AE}, {0x1E2EC, 0x1E2EF}, {0x1E4EC, 0x1E4EF},
};

/* The characters of class 0 that are the second of a canonical composition (utf8proc's
 * pairs, and the Hangul trailing consonants of the algorithmic LV + T). */
static const uint32_t second_ranges[][2] = {
    {0x9BE, 0x9BE}, {0x9D7, 0x9D7}, {0xB3E, 0xB3E}, {0xB56, 0xB57}, {0xBBE, 0xBBE},
    {0xBD7, 0xBD7}, {0xCC2, 0xCC2}, {0xCD5, 0xCD6}, {0xD3E, 0xD3E}, {0xD57, 0xD57},
    {0xDCF, 0xDCF}, {0xDDF, 0xDDF}, {0x102E, 0x102E}, {0x1161, 0x1175}, {0x11A8, 0x11C2},
    {0x1B35, 0x1B35}, {0x11127, 0x11127}, {0x1133E, 0x1133E}, {0x11357, 0x11357},
    {0x114B0, 0x114B0}, {0x114BA, 0x114BA}, {0x114BD, 0x114BD}, {0x115AF, 0x115AF},
    {0x11930, 0x11930},
};

int ferry_unicode_in_ranges(const uint32_t (*r)[2], size_t n, uint32_t c)
{
    size_t lo = 0, hi = n;
    if (n == 0 || c < r[0][0])
        return 0;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < r[mid][0])
            hi = mid;
        else if (c > r[mid][1])
            lo = mid + 1;
        else
            return 1;
    }
    return 0;
}

static int is_inert(uint32_t c)
{
    return ferry_unicode_in_ranges(inert_ranges, sizeof inert_ranges / sizeof inert_ranges[0], c);
}

/* Nothing before c can reorder or compose across it, and c alone is NFC. */
static int is_safe(uint32_t c)
{
    if (c < 0x300)
        return 1;
    const utf8proc_property_t *p = utf8proc_get_property((utf8proc_int32_t)c);
    if (p->combining_class != 0 || (p->decomp_seqindex != UINT16_MAX && p->decomp_type == 0))
        return 0;
    size_t n_second = sizeof second_ranges / sizeof second_ranges[0];
    return !ferry_unicode_in_ranges(second_ranges, n_second, c) && !is_inert(c);
}

static uint32_t decode_at(const uint8_t *u, size_t i, size_t *len)
{
    uint8_t c = u[i];
    if (c < 0x80) {
        *len = 1;
        return c;
    }
    if (c < 0xE0) {
        *len = 2;
        return (uint32_t)(c & 0x1F) << 6 | (u[i + 1] & 0x3F);
    }
    if (c < 0xF0) {
        *len = 3;
        return (uint32_t)(c & 0x0F) << 12 | (uint32_t)(u[i + 1] & 0x3F) << 6 | (u[i + 2] & 0x3F);
    }
    *len = 4;
    return (uint32_t)(c & 0x07) << 18 | (uint32_t)(u[i + 1] & 0x3F) << 12 |
           (uint32_t)(u[i + 2] & 0x3F) << 6 | (u[i + 3] & 0x3F);
}

typedef struct {
    char *p;
    size_t n, cap;
} nf_buf;

static int nf_put(nf_buf *b, const void *s, size_t n)
{
    if (b->cap - b->n < n) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap - b->n < n)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            return -1;
        b->p = p;
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->n, s, n);
    b->n += n;
    return 0;
}

/* Appends NFC(s[0..n)) by utf8proc. */
static int nf_segment(nf_buf *b, const char *s, size_t n)
{
    if (n == 0)
        return 0;
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t m = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst,
                                      UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    /* the input is valid UTF-8, so the only failure left is memory */
    if (m < 0)
        return -1;
    int rc = nf_put(b, dst, (size_t)m);
    free(dst);
    return rc;
}

/* Appends NFC(s[0..n)) as the old tables compute it: inert characters split the text. */
static int nf_span(nf_buf *b, const char *s, size_t n)
{
    const uint8_t *u = (const uint8_t *)s;
    size_t start = 0, i = 0, len;
    while (i < n) {
        if (is_inert(decode_at(u, i, &len))) {
            if (nf_segment(b, s + start, i - start) || nf_put(b, s + i, len))
                return -1;
            start = i + len;
        }
        i += len;
    }
    return nf_segment(b, s + start, n - start);
}

int ferry_unicode_nfc(const char *s, size_t n, char **out, size_t *out_len)
{
    const uint8_t *u = (const uint8_t *)s;
    size_t i = 0, len;
    *out = NULL;
    /* below U+0300 (lead bytes < 0xCC) every character is safe: such text is its own NFC */
    while (i < n && u[i] < 0xCC)
        i++;
    if (i == n)
        return 0;
    nf_buf b = {NULL, 0, 0};
    size_t done = 0, last_safe = 0;
    i = 0;
    while (i < n) {
        if (u[i] < 0xCC || is_safe(decode_at(u, i, &len))) {
            last_safe = i;
            i += u[i] < 0x80 ? 1 : u[i] < 0xE0 ? 2 : u[i] < 0xF0 ? 3 : 4;
            continue;
        }
        /* from the safe character before to the next safe one */
        size_t end = i + len;
        while (end < n && !(u[end] < 0xCC || is_safe(decode_at(u, end, &len))))
            end += len;
        if (nf_put(&b, s + done, last_safe - done) || nf_span(&b, s + last_safe, end - last_safe))
            goto fail;
        done = last_safe = i = end;
    }
    if (done == 0 && b.n == 0)
        return 0; /* nothing needed normalizing */
    if (nf_put(&b, s + done, n - done))
        goto fail;
    if (b.n == n && memcmp(b.p, s, n) == 0) {
        free(b.p);
        return 0;
    }
    *out = b.p ? b.p : malloc(1);
    *out_len = b.n;
    return *out ? 0 : -1;
fail:
    free(b.p);
    return -1;
}
