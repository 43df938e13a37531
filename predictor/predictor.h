/*
 * predictor/predictor.h: routing predictors behind one interface.
 *
 * A predictor is fed layer by layer during the forward pass, one token at a time: after
 * layer l it sees the token's hidden state (the layer's output) and the experts layer l
 * chose, and it names, with scores, the experts that layers l+1 .. l+max_lookahead will
 * probably choose for the same token. Kinds:
 * - gate: applies the router of layer l+d (its post-attention RMSNorm, then its gate
 *   matrix, then softmax) to the hidden state after layer l. No training.
 * - stats: fitted transition statistics (ferry_routing_stats): P(expert at l+d | experts
 *   at l) and, at the same layer, P(expert for token t | experts for token t-1).
 * - combined: a mix of the two, weighted by measurement: the gate applied to the hidden
 *   state moved by the previous token's update over the same layers (which carries the
 *   same-layer recency) where hidden states are observed, the statistics where not and
 *   for the next token (predictor.c has the numbers).
 * A predictor holds per-sequence state (the previous token's hidden states); reset it
 * between sequences. Scoring allocates nothing. One thread at a time.
 */
#ifndef FERRY_PREDICTOR_PREDICTOR_H
#define FERRY_PREDICTOR_PREDICTOR_H

#include <stdint.h>

#include "ferry.h"
#include "kernels/backend.h"
#include "predictor/trace.h"

#define FERRY_PREDICT_MAX_LOOKAHEAD 3

typedef enum {
    FERRY_PREDICTOR_GATE = 0,
    FERRY_PREDICTOR_STATS = 1,
    FERRY_PREDICTOR_COMBINED = 2,
} ferry_predictor_kind;

/* The kind behind a public ferry_predict_id (gate, stats, combined; recency, which names no
 * predictor, maps to gate). */
static inline ferry_predictor_kind ferry_predictor_kind_of(int32_t predict_id)
{
    return predict_id == FERRY_PREDICT_STATS      ? FERRY_PREDICTOR_STATS
           : predict_id == FERRY_PREDICT_COMBINED ? FERRY_PREDICTOR_COMBINED
                                                  : FERRY_PREDICTOR_GATE;
}

/* "gate", "stats", "combined" <-> kind; parse gives FERRY_ERR_INVALID listing the names. */
const char *ferry_predictor_kind_name(ferry_predictor_kind k);
ferry_status ferry_predictor_kind_parse(const char *s, ferry_predictor_kind *out);

/* ---- fitted statistics ------------------------------------------------------------- */

typedef struct ferry_routing_stats ferry_routing_stats;

/* Fits transition statistics from traces (all of the same shape): for d = 1..3, counts of
 * (expert e at layer l, expert e' at layer l+d) in the same token; for each layer, counts
 * of (e for token t-1, e' for token t) within a sequence; and each layer's expert
 * frequencies. FERRY_ERR_INVALID (no traces, shapes differ), FERRY_ERR_NOMEM. */
ferry_status ferry_routing_stats_fit(const ferry_trace *const *traces, int32_t n_traces,
                                     ferry_routing_stats **out);

/* Saves to / loads from a small binary file (magic, version, shape, the counts, a
 * checksum). Load: FERRY_ERR_IO, FERRY_ERR_FORMAT naming the file and what is wrong. */
ferry_status ferry_routing_stats_save(const ferry_routing_stats *s, const char *path);
ferry_status ferry_routing_stats_load(const char *path, ferry_routing_stats **out);
void ferry_routing_stats_free(ferry_routing_stats *s);

/* The shape the statistics were fitted on. */
void ferry_routing_stats_shape(const ferry_routing_stats *s, int32_t *n_layers,
                               int32_t *n_experts, int32_t *top_k);

/* The fitted transition table P(e' | e), (n_experts, n_experts) row-major, row e = an expert
 * chosen at `layer`: for d = 1..3, of e' being among the experts of layer + d in the same
 * token; for d = 0, among the experts of the same layer for the next token of the sequence.
 * Add-one smoothed: P(e' | e) = (count(e, e') + 1) / (sum over e'' of count(e, e'') +
 * n_experts), so each row sums to 1. NULL when layer or d is out of range (layer + d must
 * be < n_layers). The table belongs to s and lives as long as it. Thread-safe. */
const float *ferry_routing_stats_transition(const ferry_routing_stats *s, int32_t layer,
                                            int32_t d);

/* ---- predictors ------------------------------------------------------------------------ */

typedef struct {
    int32_t n_layers, n_experts, top_k, d_model;
    float rms_eps;
    /* gate and combined: each layer's router (n_experts, d_model) and post-attention
     * norm (1, d_model), in host memory (any weight dtype). Borrowed. */
    const ferry_weight *gates;     /* (n_layers) */
    const ferry_weight *ffn_norms; /* (n_layers) */
    /* stats and combined: fitted statistics of the same shape. Borrowed. */
    const ferry_routing_stats *stats;
} ferry_predictor_params;

typedef struct ferry_predictor ferry_predictor;

/* Creates a predictor of the given kind. FERRY_ERR_INVALID when what the kind needs is
 * missing or the statistics' shape differs (the message says which), FERRY_ERR_NOMEM. */
ferry_status ferry_predictor_create(ferry_predictor_kind kind, const ferry_predictor_params *p,
                                    ferry_predictor **out);
void ferry_predictor_destroy(ferry_predictor *p);

/* Forgets the per-sequence state (start of a new sequence). */
void ferry_predictor_reset(ferry_predictor *p);

/* After layer `layer` for the current token: its hidden state after the layer (d_model
 * floats; may be NULL for the stats kind) and the top_k experts the layer chose. Must be
 * called for layers 0, 1, ... in order for each token. */
void ferry_predictor_observe(ferry_predictor *p, int32_t layer, const float *hidden,
                             const int32_t *experts);

/* Scores for the n_experts experts of layer `layer + d` (1 <= d <= 3, layer + d <
 * n_layers) from what was observed at `layer` for the current token; higher is more
 * likely (gate: router probabilities; stats: conditional probabilities). FERRY_ERR_INVALID
 * for d or layer out of range or nothing observed yet at layer. */
ferry_status ferry_predictor_predict(ferry_predictor *p, int32_t layer, int32_t d, float *scores);

/* Scores for layer `layer` of the next token (stats and combined: from the current token's
 * experts at that layer through the same-layer statistics; gate: FERRY_ERR_UNSUPPORTED).
 * FERRY_ERR_INVALID for layer out of range or nothing observed yet at layer. */
ferry_status ferry_predictor_predict_next_token(ferry_predictor *p, int32_t layer,
                                                float *scores);

/* ---- evaluation ---------------------------------------------------------------------- */

/* The k highest of n scores (ties to the lower id), ascending ids, into top (k). */
void ferry_predictor_top(const float *scores, int32_t n, int32_t k, int32_t *top);

typedef struct {
    /* index d = lookahead 1..3; index 0: the same layer of the next token
     * (ferry_predictor_predict_next_token) */
    int64_t n_predictions[FERRY_PREDICT_MAX_LOOKAHEAD + 1];
    int64_t n_correct[FERRY_PREDICT_MAX_LOOKAHEAD + 1];     /* predicted top-k ∩ actual */
    int32_t k;
} ferry_predictor_eval;

/* precision@k = correct / (predictions * k) (the predicted set has k experts); recall@k =
 * correct / (predictions * top_k actual). Equal when k = top_k. */
double ferry_predictor_eval_precision(const ferry_predictor_eval *e, int32_t d);
double ferry_predictor_eval_recall(const ferry_predictor_eval *e, int32_t d, int32_t top_k);

/* Replays a trace through a stats predictor (no hidden states needed), predicting every
 * layer l+d from layer l for d = 1..3 and (index 0) every layer of the next token within a
 * sequence, and accumulates into *e (zero it first; e->k = 0 means the trace's top_k). A
 * combined predictor may be replayed too: without hidden states it uses its statistics
 * alone. The predictor is reset at each sequence. FERRY_ERR_INVALID (a gate predictor, a
 * trace of another shape, k outside 1..n_experts). */
ferry_status ferry_predictor_eval_trace(ferry_predictor *p, const ferry_trace *tr,
                                        ferry_predictor_eval *e);

#endif
