/*
 * format/tokenizer.h: the BPE tokenizer of a Hugging Face checkpoint (tokenizer.json, plus
 * tokenizer_config.json when present), encoding and decoding exactly as the Rust
 * `tokenizers` library (0.22) does, in its two families:
 *   - SentencePiece-style (Llama, Mistral, Mixtral): normalizer Prepend/Replace,
 *     pre-tokenizer Metaspace or none, BPE with byte fallback and unk, decoder chain
 *     Replace, ByteFallback, Fuse, Strip, Metaspace;
 *   - byte-level (Qwen2/Qwen3, DeepSeek-V3, OLMoE/GPT-NeoX, gpt-oss, Llama 3): normalizer
 *     NFC or none, pre-tokenizer Split steps (regexes through PCRE2, format/regex.h) and
 *     ByteLevel (format/pretokenize.h), BPE over GPT-2's byte alphabet (ignore_merges too),
 *     decoder ByteLevel (bytes back, then lossy UTF-8).
 * Both: added tokens split first (single_word, lstrip, rstrip, normalized, special), a
 * normalizer Sequence, post-processor TemplateProcessing / ByteLevel / a Sequence of them,
 * merges as "a b" or ["a", "b"].
 *
 * A ferry_tokenizer is immutable once loaded: every function taking a const pointer may
 * be called from any number of threads at once.
 */
#ifndef FERRY_ENGINE_TOKENIZER_H
#define FERRY_ENGINE_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "ferry.h"

typedef struct ferry_tokenizer ferry_tokenizer;

/* Loads dir/tokenizer.json and, when present, dir/tokenizer_config.json. On success *out
 * owns the tokenizer (free with ferry_tokenizer_free). Returns FERRY_ERR_IO (file missing
 * or unreadable; the message names the path), FERRY_ERR_FORMAT (malformed JSON, vocab,
 * merges, added tokens, pre-tokenizer steps (a bad regex, an unknown Split behavior),
 * post-processor, a decoder chain that grows a token past 16 x + 4096 bytes; the message
 * names the file and the token, merge or field, e.g.
 * "pre_tokenizer.pretokenizers[0].pattern.Regex"), FERRY_ERR_UNSUPPORTED (a valid
 * tokenizer using a model, normalizer, pre-tokenizer, decoder or Split option (invert)
 * this build does not implement; the message names it), FERRY_ERR_NOMEM, FERRY_ERR_INVALID
 * (NULL arguments). Thread-safe. */
ferry_status ferry_tokenizer_load(const char *dir, ferry_tokenizer **out);

/* Same as ferry_tokenizer_load from memory: tok_json (tok_len bytes) is tokenizer.json,
 * config_json (config_len bytes) tokenizer_config.json or NULL. Neither need be
 * NUL-terminated; both are only read during the call. `origin` names the source in error
 * messages (NULL: "tokenizer.json"). Same codes as ferry_tokenizer_load but FERRY_ERR_IO.
 * Thread-safe. */
ferry_status ferry_tokenizer_load_json(const char *tok_json, size_t tok_len,
                                       const char *config_json, size_t config_len,
                                       const char *origin, ferry_tokenizer **out);

/* Frees the tokenizer. NULL-safe. */
void ferry_tokenizer_free(ferry_tokenizer *t);

/* 1 + the largest id of the model vocab and the added tokens. Thread-safe. */
int32_t ferry_tokenizer_n_vocab(const ferry_tokenizer *t);

/* The beginning/end-of-sequence ids: tokenizer_config.json's bos_token/eos_token when
 * given, else the template's special tokens before/after $A, else "<s>"/"</s>" when they
 * exist; -1 if none. Thread-safe. */
int32_t ferry_tokenizer_bos_id(const ferry_tokenizer *t);
int32_t ferry_tokenizer_eos_id(const ferry_tokenizer *t);

/* Nonzero if id's token is a special added token (the ones skip_special drops); 0 for
 * other ids and ids out of range. Thread-safe. */
int ferry_tokenizer_is_special(const ferry_tokenizer *t, int32_t id);

/* Nonzero if ferry_tokenizer_encode with add_special puts the BOS id first: the
 * post-processor's template asks for it, or (no template) tokenizer_config.json's
 * add_bos_token (default true for Llama tokenizer classes). Thread-safe. */
int ferry_tokenizer_adds_bos(const ferry_tokenizer *t);

/* The text of token id as the vocab stores it (an added token's content; byte-level tokens
 * in their alphabet, "Ġhello"): *s points into the tokenizer (valid while it lives, not
 * NUL-terminated), *len its bytes. FERRY_ERR_INVALID for an id outside [0, n_vocab) or one
 * that names no token, or NULL arguments. Thread-safe. */
ferry_status ferry_tokenizer_piece(const ferry_tokenizer *t, int32_t id, const char **s,
                                   size_t *len);

/* Encodes UTF-8 text (len bytes; need not be NUL-terminated; text may be NULL when len is
 * 0) into ids. add_special != 0 adds the post-processor's (or tokenizer_config.json's)
 * BOS/EOS. Writes up to cap ids (ids may be NULL when cap is 0) and the full count to
 * *n_out; if the count exceeds cap returns FERRY_ERR_INVALID with *n_out set (and the
 * first cap ids written). FERRY_ERR_INVALID also for NULL arguments, text that is not
 * valid UTF-8 (the message gives the byte offset), or a pre-tokenizer regex that gives up
 * on the text (PCRE2's limits); FERRY_ERR_NOMEM; FERRY_ERR_FORMAT when an unknown
 * character needs the unk token and the vocab lacks it, or when the normalizer's steps
 * grow the text past 16 x its length + 4096 bytes (the message names the step).
 * Thread-safe. */
ferry_status ferry_tokenizer_encode(const ferry_tokenizer *t, const char *text, size_t len,
                                    int add_special, int32_t *ids, int32_t cap, int32_t *n_out);

/* Decodes ids into UTF-8 text as tokenizers' decode(ids, skip_special_tokens) does (ids
 * inside [0, n_vocab) that name no token are skipped, as there). Writes at most cap bytes
 * including a terminating NUL to text and the full length without the NUL to *len_out.
 * FERRY_ERR_INVALID if it does not fit (*len_out set, text[0] = 0 when cap > 0), if an id
 * is outside [0, n_vocab) (the message gives id and position) or on NULL arguments;
 * FERRY_ERR_FORMAT when decoder Replace steps after Fuse grow the text past 16 x + 4096
 * bytes; FERRY_ERR_NOMEM. Thread-safe. */
ferry_status ferry_tokenizer_decode(const ferry_tokenizer *t, const int32_t *ids, int32_t n,
                                    int skip_special, char *text, size_t cap, size_t *len_out);

/* The most bytes (without the NUL) one ferry_detok_stream_push or _flush can write: an
 * `out` of this size + 1 never gets FERRY_ERR_INVALID for being too small. Thread-safe. */
size_t ferry_tokenizer_max_piece_bytes(const ferry_tokenizer *t);

/* Streaming decoder state for generation: a plain struct the caller embeds; no
 * allocation. Bytes of byte-fallback tokens, and of byte-level tokens, wait in `pending`
 * until they complete a UTF-8 character, so no piece ever ends inside a character.
 *
 * Byte-level (decoder ByteLevel): the concatenation of the pieces, after the flush, always
 * equals ferry_tokenizer_decode of the same ids (one U+FFFD per maximal invalid subpart,
 * as String::from_utf8_lossy; decoder steps after ByteLevel are not streamed).
 *
 * Byte fallback (the SentencePiece family): the concatenation of the pieces equals
 * ferry_tokenizer_decode of the same ids whenever every run of consecutive byte tokens is
 * valid UTF-8 (always the case for ids that encode valid text). The one divergence: in a
 * byte run that turns out invalid after some
 * complete characters were already emitted, decode (like tokenizers) turns the whole run
 * into U+FFFD per byte, while the stream has already emitted those characters and turns
 * only the rest into U+FFFD. Decoder chains other than [per-token Replace/Metaspace/Strip]
 * [ByteFallback] [Fuse [Strip with stop 0]] (every Llama/Mistral chain is of this form)
 * stream the per-token steps and ignore the other steps after ByteFallback/Fuse. */
typedef struct {
    uint8_t pending[4];       /* bytes of an incomplete UTF-8 character */
    int32_t n_pending;
    int32_t n_emitted_tokens; /* tokens passed to the decoder so far (after skip_special) */
    int32_t n_stripped;       /* leading characters dropped by a Strip step so far */
    int32_t run_bad;          /* the current byte run is known to be invalid UTF-8 */
    int32_t stripping;        /* nothing but stripped characters emitted yet */
} ferry_detok_stream;

/* Starts a stream (state for a new sequence). */
void ferry_detok_stream_init(ferry_detok_stream *s);

/* Feeds one generated id; writes the newly complete UTF-8 text to out (cap bytes including
 * the NUL) and its length to *len_out (possibly 0). Special tokens produce no text when
 * skip_special. No allocation. FERRY_ERR_INVALID when id is outside [0, n_vocab), on NULL
 * arguments, or when the text does not fit (then *len_out holds the length needed and *s
 * is unchanged). Thread-safe for distinct streams. */
ferry_status ferry_detok_stream_push(const ferry_tokenizer *t, ferry_detok_stream *s, int32_t id,
                                     int skip_special, char *out, size_t cap, size_t *len_out);

/* Ends the sequence: writes what is pending (an incomplete character becomes U+FFFD per
 * byte; byte-level: one U+FFFD) as ferry_detok_stream_push does, and empties the pending
 * bytes. */
ferry_status ferry_detok_stream_flush(const ferry_tokenizer *t, ferry_detok_stream *s, char *out,
                                      size_t cap, size_t *len_out);

#endif
