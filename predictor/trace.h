/*
 * predictor/trace.h: routing traces, "moe-routing-trace v1".
 *
 * File layout: one JSON header line (terminated by '\n'):
 *   {"format": "moe-routing-trace v1", "model": "...", "layers": L, "experts": E,
 *    "top_k": K, "tokens": T, "sequence_lengths": [n0, n1, ...],
 *    "body": "...", "probs": "float32 [tokens][layers][experts] after the expert ids"}
 * ("probs" present only when router probabilities are stored), then the body: uint8
 * expert ids [tokens][layers][top_k], ascending within a token, row-major; then, when
 * "probs" is present, little-endian float32 router probabilities [tokens][layers][experts].
 * The sequence lengths sum to T; tokens of a sequence are consecutive.
 */
#ifndef FERRY_PREDICTOR_TRACE_H
#define FERRY_PREDICTOR_TRACE_H

#include <stddef.h>
#include <stdint.h>

#include "ferry.h"

typedef struct {
    int32_t n_layers, n_experts, top_k;
    int64_t n_tokens;
    int32_t n_seqs;
    int64_t *seq_lengths; /* (n_seqs) */
    uint8_t *experts;     /* (n_tokens, n_layers, top_k), ascending within a token */
    float *probs;         /* (n_tokens, n_layers, n_experts) or NULL */
    char model[128];
} ferry_trace;

/* The experts of token t at layer l: top_k ids. */
static inline const uint8_t *ferry_trace_at(const ferry_trace *tr, int64_t t, int32_t l)
{
    return tr->experts + ((size_t)t * (size_t)tr->n_layers + (size_t)l) * (size_t)tr->top_k;
}

/* Reads and validates a trace: header fields present and in range (layers, experts <= 256
 * since ids are bytes, top_k <= experts), sequence lengths positive and summing to
 * tokens, the body exactly as long as the header says, every id < experts and ascending
 * within a token. FERRY_ERR_IO, FERRY_ERR_FORMAT naming the file and the field or token
 * at fault, FERRY_ERR_NOMEM. On success *out owns the trace. */
ferry_status ferry_trace_load(const char *path, ferry_trace **out);

/* Frees a trace. NULL-safe. */
void ferry_trace_free(ferry_trace *tr);

/* Creates an empty in-memory trace to append to (with_probs: also keep probabilities). */
ferry_status ferry_trace_create(int32_t n_layers, int32_t n_experts, int32_t top_k, int with_probs,
                                const char *model, ferry_trace **out);

/* Appends one sequence of n tokens: experts (n, n_layers, top_k) ascending, probs
 * (n, n_layers, n_experts) or NULL (required when the trace keeps probabilities). */
ferry_status ferry_trace_append(ferry_trace *tr, int64_t n, const uint8_t *experts,
                                const float *probs);

/* Writes the trace to path (atomically: path.<id>.tmp then rename). FERRY_ERR_IO. */
ferry_status ferry_trace_save(const ferry_trace *tr, const char *path);

/* A view of tokens [t0, t0 + n) of tr as its own trace, cut at sequence boundaries where
 * the range splits a sequence (the pieces become sequences of their own). *out owns a
 * copy. Used to split a trace into fit and evaluation parts (first 80% / last 20%). */
ferry_status ferry_trace_slice(const ferry_trace *tr, int64_t t0, int64_t n, ferry_trace **out);

#endif
