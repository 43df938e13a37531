/*
 * format/pretokenize.h: the byte-level pre-tokenizers of tokenizer.json (Qwen2/Qwen3,
 * DeepSeek-V3, OLMoE/GPT-NeoX, gpt-oss, Llama 3): a list of Split steps (a Regex or String
 * pattern and a SplitDelimiterBehavior) and ByteLevel steps (GPT-2's byte alphabet, an
 * optional prefix space, the optional GPT-2 pattern), each step applied to every piece the
 * previous one left, exactly as the Rust `tokenizers` library's PreTokenizedString::split.
 *
 * A ferry_pretok is immutable once parsed and may run from any number of threads at once,
 * each with its own ferry_pretok_scratch.
 */
#ifndef FERRY_FORMAT_PRETOKENIZE_H
#define FERRY_FORMAT_PRETOKENIZE_H

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

#include "ferry.h"

typedef struct ferry_pretok ferry_pretok;
typedef struct ferry_pretok_scratch ferry_pretok_scratch;

/* Parses a pre_tokenizer object: Split, ByteLevel, or a Sequence of them (nested Sequences
 * flattened). `origin` names the file in messages. On success *out owns the result
 * (ferry_pretok_free). FERRY_ERR_FORMAT (a malformed step: missing or mistyped pattern,
 * unknown behavior, a regex PCRE2 rejects; the message names the field, e.g.
 * "pre_tokenizer.pretokenizers[0].behavior"), FERRY_ERR_UNSUPPORTED (a pre-tokenizer type
 * other than Split/ByteLevel, Split with invert true, regex syntax with no PCRE2
 * equivalent), FERRY_ERR_NOMEM. Thread-safe. */
ferry_status ferry_pretok_parse(const cJSON *obj, const char *origin, ferry_pretok **out);

/* Frees it. NULL-safe. */
void ferry_pretok_free(ferry_pretok *p);

/* 1 when the last step is ByteLevel: the words ferry_pretok_run gives are then the raw bytes
 * that step would map to its alphabet, and the caller maps them (ferry_bytelevel_char) or
 * uses them directly; 0 when the words are the text the steps produced. */
int ferry_pretok_bytes_out(const ferry_pretok *p);

/* Scratch for ferry_pretok_run, one per thread. FERRY_ERR_NOMEM. */
ferry_status ferry_pretok_scratch_create(ferry_pretok_scratch **out);
void ferry_pretok_scratch_free(ferry_pretok_scratch *sc); /* NULL-safe */

/* Called for each word, in order; a non-OK status stops the run and is returned. */
typedef ferry_status (*ferry_pretok_word_fn)(const char *w, size_t n, void *user);

/* Pre-tokenizes s[0..n) (valid UTF-8, normalized) and calls fn for every non-empty word.
 * Returns fn's first failure, FERRY_ERR_NOMEM, or FERRY_ERR_INVALID when a regex gives up
 * (PCRE2's match limits). Thread-safe with distinct scratch. */
ferry_status ferry_pretok_run(const ferry_pretok *p, ferry_pretok_scratch *sc, const char *s,
                              size_t n, ferry_pretok_word_fn fn, void *user);

/* GPT-2's byte-to-unicode alphabet: the UTF-8 (1 or 2 bytes, written to out) of the
 * character standing for byte b; returns its length. */
size_t ferry_bytelevel_char(uint8_t b, char out[2]);

/* The byte a character of that alphabet stands for, or -1 if c is not in it. */
int ferry_bytelevel_byte(uint32_t c);

#endif
