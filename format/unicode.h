/*
 * format/unicode.h: Unicode normalization for the tokenizer, as the Rust `tokenizers`
 * library computes it (its NFC comes from unicode-normalization-alignments, whose tables
 * are Unicode 12.1; utf8proc supplies the algorithm and newer tables, and the few
 * characters the old tables do not know are kept inert, as there).
 *
 * Stateless; every function may be called from any number of threads at once.
 */
#ifndef FERRY_FORMAT_UNICODE_H
#define FERRY_FORMAT_UNICODE_H

#include <stddef.h>
#include <stdint.h>

/* NFC of the valid UTF-8 s[0..n). On success returns 0 and either sets *out to NULL when s
 * is already in that form (nothing to copy), or to a malloc'd string of *out_len bytes the
 * caller frees. Returns -1 when out of memory. Thread-safe. */
int ferry_unicode_nfc(const char *s, size_t n, char **out, size_t *out_len);

/* Whether c lies in one of the n inclusive ranges r, sorted and disjoint (binary search).
 * Thread-safe. */
int ferry_unicode_in_ranges(const uint32_t (*r)[2], size_t n, uint32_t c);

#endif
