/*
 * engine/context.h: the generation context (internal view): KV cache, scratch buffers,
 * sampler and statistics, and the forward pass written against the backend table.
 *
 * Scratch is sized at creation for n_batch tokens per forward call; longer inputs are run
 * in chunks of n_batch, so nothing is allocated per token.
 */
#ifndef FERRY_ENGINE_CONTEXT_H
#define FERRY_ENGINE_CONTEXT_H

#include "engine/hybrid.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "ferry.h"
#include "moe/dispatch.h"

/* Watches the forward pass (tests, routing traces, predictors). Called on the thread
 * running the forward, with host arrays valid only during the call. */
typedef struct {
    /* After a sparse layer's router: its MoE index (format/config.h; the decoder layer
     * when every layer is sparse), n tokens at positions pos0.., router logits
     * (n, n_experts), chosen experts (n, k) ascending and their weights (n, k). */
    void (*on_route)(void *user, int32_t layer, int32_t pos0, int32_t n, const float *logits,
                     const int32_t *experts, const float *weights);
    /* Hidden states (n, d_model): layer -1 after the embedding, 0 <= l < n_layers after
     * layer l's residual update, n_layers after the final norm (only for the rows whose
     * logits are computed). */
    void (*on_hidden)(void *user, int32_t layer, int32_t pos0, int32_t n, const float *hidden);
    void *user;
} ferry_observer;

struct ferry_context {
    ferry_model *m;
    ferry_context_params p;
    unsigned parts; /* FERRY_CONTEXT_ATTENTION | FERRY_CONTEXT_MOE: what it has buffers for */
    int32_t n_ctx;
    int32_t n_batch;
    int32_t n_past;
    ferry_sampler sampler;
    ferry_stats stats;
    ferry_observer obs;

    /* device memory */
    float *d_k, *d_v;     /* (n_layers, n_ctx, n_kv_heads * head_dim) */
    float *d_cos, *d_sin; /* (n_ctx, head_dim / 2) */
    float *d_x;           /* (n_batch, d) residual stream */
    float *d_h;           /* (n_batch, d) normed */
    float *d_q;           /* (n_batch, n_heads * head_dim) */
    float *d_att;         /* (n_batch, n_heads * head_dim) */
    float *d_router;      /* (n_batch, n_experts) */
    int32_t *d_experts;   /* (n_batch, k) */
    float *d_weights;     /* (n_batch, k) */
    float *d_xe;          /* (n_batch, d) rows routed to one expert */
    float *d_a, *d_b;     /* (n_batch, d_ff) */
    float *d_ye;          /* (n_batch, d) */
    float *d_eo;          /* (n_batch * k, d) per-token expert outputs */
    float *d_moe;         /* (n_batch, d) */
    float *d_fa, *d_fb;   /* (n_batch, max(dense_ff, shared_ff)) dense MLP / shared expert */
    float *d_fo;          /* (n_batch, d) their output */
    float *d_sg;          /* (n_batch) the shared expert's gate logits */
    float *d_logits;      /* (min(n_batch, 16), n_vocab) */

    /* host memory */
    float *h_router;      /* (n_batch, n_experts) only when observed */
    int32_t *h_experts;   /* (n_batch, k) */
    float *h_weights;     /* (n_batch, k) */
    float *h_hidden;      /* (n_batch, d) only when observed */
    ferry_dispatch dispatch;

    /* offloading: the experts each layer used in the previous step (prefetch hints) */
    uint8_t *prev_used;   /* (n_moe_layers, n_experts) */
    int32_t *held_slot;   /* (n_experts) per wave: slot of each acquired expert */
    int32_t *held_expert; /* (n_experts) */
    uint8_t *held_ready;  /* (n_experts) */
    double stall_seconds;
    ferry_cache_layer_stats *layer_stats0; /* (n_moe_layers) cache counters at reset */
    uint64_t bytes_to_device0, bytes_from_disk0;  /* pipeline and store counters at reset */
    double copy_seconds0;
    uint64_t *layer_device0, *layer_disk0;        /* (n_moe_layers) the same per layer */
    double *layer_stall;                          /* (n_moe_layers) since reset */

    /* prediction during decode (offloading with a predictor other than recency) */
    ferry_predictor *predictor;
    float *h_scores;        /* (n_experts) */
    int32_t *h_top;         /* (n_experts) */
    int32_t *pred_top;      /* (n_moe_layers, 4, k): the set predicted for layer j at distance d */
    uint8_t *pred_valid;    /* (n_moe_layers, 4) */
    int64_t pred_n[4], pred_correct[4];

    /* hybrid execution (the model's hybrid mode is not OFF and the context has the MoE part) */
    ferry_hybrid *hybrid;
    float *d_cpu_out;              /* (n_batch * k, d) the CPU's output rows, uploaded */
    uint8_t *h_on_cpu;             /* (n_experts) this layer-batch: the CPU computes it */
    int32_t *h_cpu_list;           /* (n_experts) those experts */
    int32_t *h_miss;               /* (n_experts) the misses the plan chose from */
    ferry_hybrid_item *h_items;    /* (n_experts) */
    int64_t *layer_cpu_experts;    /* (n_moe_layers) since reset */
    int64_t *layer_cpu_tokens;     /* (n_moe_layers) */
    uint64_t cpu_bytes;
    double cpu_seconds, cpu_wait_seconds;
};

/* Runs n tokens (any n; chunks of n_batch internally) after the n_past already cached.
 * logits_all, when not NULL, receives (n, n_vocab) logits of every position;
 * logits_last, when not NULL, the last position's. Same errors as ferry_eval. */
ferry_status ferry_context_forward(ferry_context *c, const int32_t *ids, int32_t n,
                                   float *logits_all, float *logits_last);

/* What a context has device buffers for: the attention half (KV cache, RoPE tables, query
 * and attention buffers) and the MoE block (the experts' workspace). ferry_context_create
 * makes both; engine/batch.c gives each sequence attention only and its shared MoE context
 * the MoE block only, so neither holds budget it never uses. */
enum { FERRY_CONTEXT_ATTENTION = 1u, FERRY_CONTEXT_MOE = 2u };

/* ferry_context_create with only the given parts; calling the missing part's step is
 * FERRY_ERR_INVALID. */
ferry_status ferry_context_create_parts(ferry_model *m, const ferry_context_params *p,
                                        unsigned parts, ferry_context **out);

/* The parts of a forward step, for work that runs several contexts' tokens through one MoE
 * block (engine/batch.c); ferry_context_forward is embed, then for each layer attention and
 * moe, then finish. The caller holds the model's lock. */
ferry_status ferry_context_embed(ferry_context *c, const int32_t *ids, int32_t n);
ferry_status ferry_context_attention(ferry_context *c, int32_t l, int32_t n);
/* Decoder layer l's MLP over the n rows of c->d_h, added into c->d_x (rows are independent:
 * a row's result does not depend on the other rows): its MoE block (a context with the MoE
 * part), or its dense MLP (any context). */
ferry_status ferry_context_moe(ferry_context *c, int32_t l, int32_t n);
ferry_status ferry_context_finish(ferry_context *c, int32_t n, float *logits_all,
                                  float *logits_last);

/* Installs (or with NULL, removes) an observer. */
void ferry_context_set_observer(ferry_context *c, const ferry_observer *obs);

#endif
