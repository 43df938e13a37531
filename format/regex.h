/*
 * format/regex.h: the regular expressions of tokenizer.json (pre_tokenizer Split patterns,
 * the GPT-2 pattern of ByteLevel) matched as the Rust `tokenizers` library matches them.
 * tokenizers compiles them with Oniguruma (Ruby syntax, Unicode 16 property tables); ferry
 * compiles them with PCRE2 (UTF and UCP modes, JIT when available) after rewriting what
 * differs: \s is Unicode White_Space (PCRE2 adds U+180E), \d/\w/\h are Oniguruma's, the
 * general categories \p{L}, \p{N}, ... gain the characters assigned after the PCRE2 build's
 * Unicode version, (?m) is Ruby's dot-all, and ^/$ match at line ends.
 *
 * A ferry_regex is immutable once compiled and may be matched from any number of threads
 * at once, each with its own ferry_regex_scratch.
 */
#ifndef FERRY_FORMAT_REGEX_H
#define FERRY_FORMAT_REGEX_H

#include <stddef.h>

#include "ferry.h"

typedef struct ferry_regex ferry_regex;
typedef struct ferry_regex_scratch ferry_regex_scratch;

/* Compiles the UTF-8 pattern (len bytes, need not be NUL-terminated). `where` names the
 * pattern's field in error messages. On success *out owns the regex (ferry_regex_free).
 * FERRY_ERR_FORMAT (a pattern PCRE2 rejects: the message gives its reason and offset),
 * FERRY_ERR_UNSUPPORTED (Oniguruma syntax with no PCRE2 equivalent: nested classes, class
 * intersection), FERRY_ERR_NOMEM. Thread-safe. */
ferry_status ferry_regex_compile(const char *pattern, size_t len, const char *where,
                                 ferry_regex **out);

/* Frees the regex. NULL-safe. */
void ferry_regex_free(ferry_regex *re);

/* Scratch for matching (match data, JIT stack): one per thread. On success *out owns it
 * (ferry_regex_scratch_free). FERRY_ERR_NOMEM. */
ferry_status ferry_regex_scratch_create(ferry_regex_scratch **out);
void ferry_regex_scratch_free(ferry_regex_scratch *sc); /* NULL-safe */

/* Finds the leftmost match in s[0..n) (valid UTF-8) that starts at or after `start` (a
 * character boundary); the text before `start` is seen by lookbehind. Returns 1 with the
 * match in [*m_start, *m_end), 0 if there is none, or -1 when PCRE2 gives up (a match or
 * depth limit: the message names `where`). Thread-safe with distinct scratch. */
int ferry_regex_find(const ferry_regex *re, ferry_regex_scratch *sc, const char *s, size_t n,
                     size_t start, size_t *m_start, size_t *m_end);

#endif
