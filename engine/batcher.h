/*
 * engine/batcher.h: continuous batching. A fixed set of sequence slots, each with its own
 * attention context (KV cache, sampler); sequences join and leave between steps. A step runs
 * the next token of every decoding sequence together with prompt chunks of the sequences
 * still reading their prompts, layer by layer: attention per sequence, then each MoE layer
 * over all the step's tokens in layer-batches that load each expert once (moe/schedule.h).
 * A row's MoE result does not depend on the rows beside it, so every sequence's tokens are
 * the same bit for bit as generating it alone, whatever else is in flight.
 *
 * Which prompt chunks join a step: with a token budget per step (step_tokens), pending
 * prompts compete for it. With `select`, the batcher prefers chunks whose experts overlap
 * those the step already activates: each sequence's signature is the set of (layer, expert)
 * pairs its tokens routed to in its last step, a sequence with no signature yet is costed
 * by the experts that uniform routing would be expected to add; the greedy choice
 * (cheapest chunk first) stands where it is estimated to add fewer experts than arrival
 * order would. A prompt passed over max_wait times joins the next step (within the budget,
 * a token at least), so none starves. The statistics keep the estimate for the chosen
 * chunks beside the same estimate for arrival order in the same state, and the distinct
 * experts each step actually activated (the measure to compare runs with select on and
 * off by).
 *
 * ferry_batch_generate (engine/batch.c) is this with every prompt admitted at once and no
 * budget. Not thread-safe: one thread drives a batcher; it holds the model's lock during a
 * step.
 */
#ifndef FERRY_ENGINE_BATCHER_H
#define FERRY_ENGINE_BATCHER_H

#include <stdint.h>

#include "ferry.h"

typedef struct ferry_batcher ferry_batcher;

typedef struct {
    int32_t max_seqs;        /* slots: sequences in flight at once (>= 1) */
    int32_t n_ctx;           /* positions of each slot's KV cache (prompt + generated) */
    const int32_t *slot_ctx; /* or per slot (max_seqs entries, read at creation); NULL: n_ctx */
    int32_t max_batch;       /* most tokens per MoE layer-batch; 0 = 16 */
    int32_t chunk;           /* most prompt tokens a sequence feeds per step; 0 = 64 */
    int32_t step_tokens;     /* most tokens per step, decode tokens included; 0 = no limit
                                (every pending prompt feeds a full chunk every step) */
    int32_t max_wait;        /* steps a pending prompt may be passed over; 0 = 4 */
    int32_t reorder;         /* nonzero: cross-batch token reordering inside a step */
    int32_t select;          /* nonzero: choose prompt chunks for fewer distinct experts;
                                0: arrival order */
} ferry_batcher_params;

/* 16-token layer-batches, 64-token chunks, no step limit, max_wait 4, reorder and select. */
ferry_batcher_params ferry_batcher_params_default(void);

/* One sequence's sampling and limits. */
typedef struct {
    float temperature;   /* 0: greedy */
    int32_t top_k;       /* 0: off */
    float top_p;         /* 1: off */
    uint64_t seed;
    int32_t max_tokens;  /* >= 1; generation also ends where the slot's context does */
    int32_t stop_at_eos; /* nonzero: the first EOS ends it */
} ferry_seq_params;

enum { FERRY_FINISH_NONE = 0, FERRY_FINISH_EOS = 1, FERRY_FINISH_LENGTH = 2 };

/* A token sampled for the sequence in `slot`; finish is FERRY_FINISH_NONE while it goes
 * on, else why it ended (the slot is free again once the step returns). */
typedef struct {
    int32_t slot;
    int32_t token;
    int32_t finish;
} ferry_batcher_event;

typedef struct {
    int64_t steps, tokens;       /* steps run, tokens through the model (prompt + decode) */
    int64_t prompt_tokens, generated_tokens;
    int64_t layer_batches, expert_loads; /* MoE block runs; distinct experts summed over them */
    int64_t step_experts;        /* distinct (layer, expert) pairs each step activated */
    int64_t step_experts_planned; /* estimated for the prompt chunks chosen (steps where
                                     prompts competed for the budget), the decode tokens'
                                     included */
    int64_t step_experts_arrival; /* the same estimate for what arrival order (select off)
                                     would have taken in the same state: the prompts due
                                     after max_wait, then the oldest first */
    int64_t selected_steps;      /* steps where the choice was made (prompts competed) */
    int64_t selected_step_experts; /* step_experts over those steps only */
    int32_t max_waited;          /* the most consecutive steps a pending prompt was passed
                                    over (at most max_wait) */
    int64_t predicted, predicted_hits; /* the next layer's router on a layer's input (the
                                          scheduler's tie-breaker) as a predictor: experts
                                          predicted, and of them those then chosen (recall =
                                          hits / predicted, as the sets are top-k each) */
    double seconds;              /* inside ferry_batcher_step */
} ferry_batcher_stats;

/* Makes the slots' contexts and the shared MoE context. With offloading and the expert
 * slots not planned yet, the contexts come out of the device budget first. FERRY_ERR_INVALID
 * (bad params), FERRY_ERR_NOMEM (naming what does not fit), the contexts' errors. */
ferry_status ferry_batcher_create(ferry_model *m, const ferry_batcher_params *p,
                                  ferry_batcher **out);
void ferry_batcher_free(ferry_batcher *b);

/* Starts a sequence in a free slot (its number to *slot) with the prompt (copied).
 * FERRY_ERR_INVALID: no free slot, an empty prompt, an id outside the vocabulary, a prompt
 * that leaves no room to generate in the slot's context, bad sampling settings (each names
 * the value). */
ferry_status ferry_batcher_add(ferry_batcher *b, const int32_t *prompt, int32_t n_prompt,
                               const ferry_seq_params *sp, int32_t *slot);

/* Ends the sequence in slot now (a client went away); its slot is free at once. A free or
 * out-of-range slot is ignored. */
void ferry_batcher_cancel(ferry_batcher *b, int32_t slot);

/* Sequences in flight, and slots free. */
int32_t ferry_batcher_active(const ferry_batcher *b);
int32_t ferry_batcher_free_slots(const ferry_batcher *b);
/* The slot's context positions. */
int32_t ferry_batcher_slot_ctx(const ferry_batcher *b, int32_t slot);

/* One step over the sequences in flight (none: returns with *n_events 0). Writes one event
 * per sequence that sampled a token (at most max_seqs) to ev. The forward pass's errors; on
 * an error every sequence in flight is ended (their slots freed) and the error returned. */
ferry_status ferry_batcher_step(ferry_batcher *b, ferry_batcher_event *ev, int32_t *n_events);

/* Counters since creation. */
void ferry_batcher_get_stats(const ferry_batcher *b, ferry_batcher_stats *out);

/* Expert loads per decoder layer since creation (n_layers entries). */
const int64_t *ferry_batcher_layer_loads(const ferry_batcher *b);

/* The MoE context: its offload statistics (expert cache, bytes moved, CPU experts) cover
 * every step. */
ferry_context *ferry_batcher_moe_context(ferry_batcher *b);

#endif
