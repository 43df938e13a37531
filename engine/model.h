/*
 * engine/model.h: the opened model (internal). A ferry_model binds a checkpoint's tensors
 * to the backend by the names its family's row of format/arch.h gives: config, tokenizer,
 * the dense weights (embeddings, attention, norms, routers, dense MLPs, shared experts, LM
 * head) and every expert's w1, w3, w2.
 *
 * Layer indices: functions keyed by expert (ferry_model_expert_*, the store, cache and
 * pack) take the MoE index of a sparse layer (format/config.h), not the decoder layer.
 *
 * Weights of a host-memory backend point straight into the safetensors mappings (a
 * tensor whose address is not aligned for its dtype is copied once); other backends get
 * device copies. The model is immutable after ferry_model_open; `lock` serialises the
 * contexts' use of the shared backend.
 */
#ifndef FERRY_ENGINE_MODEL_H
#define FERRY_ENGINE_MODEL_H

#include <pthread.h>

#include "core/pool.h"
#include "format/config.h"
#include "format/safetensors.h"
#include "format/tokenizer.h"
#include "ferry.h"
#include "kernels/backend.h"
#include "moe/hybrid.h"
#include "offload/cache.h"
#include "offload/pack.h"
#include "offload/prefetch.h"
#include "offload/store.h"
#include "predictor/predictor.h"

typedef struct {
    ferry_weight w1; /* (d_ff, d_model) gate projection */
    ferry_weight w3; /* (d_ff, d_model) up projection */
    ferry_weight w2; /* (d_model, d_ff) down projection */
} ferry_expert_weights;

/* One decoder layer's dense weights. A weight the family does not have has d_data NULL. */
typedef struct {
    ferry_weight attn_norm; /* (1, d_model) input_layernorm */
    ferry_weight ffn_norm;  /* (1, d_model) post_attention_layernorm */
    ferry_weight wq;        /* (n_heads * head_dim, d_model) */
    ferry_weight wk;        /* (n_kv_heads * head_dim, d_model) */
    ferry_weight wv;        /* (n_kv_heads * head_dim, d_model) */
    ferry_weight wo;        /* (d_model, n_heads * head_dim) */
    ferry_weight bq, bk, bv; /* (1, q_dim), (1, kv_dim), (1, kv_dim) biases (cfg.qkv_bias) */
    ferry_weight bo;        /* (1, d_model) (cfg.o_bias) */
    ferry_weight q_norm;    /* (1, head_dim) or (1, q_dim) (cfg.qk_norm) */
    ferry_weight k_norm;    /* (1, head_dim) or (1, kv_dim) */
    int32_t moe;            /* this layer's MoE index, or -1: a dense MLP layer */
    ferry_expert_weights mlp;    /* a dense layer's MLP, (dense_ff, d_model) ... */
    ferry_expert_weights shared; /* the shared expert of a sparse layer (cfg.shared_ff) */
    ferry_weight shared_gate;    /* (1, d_model) */
} ferry_layer_weights;

/* One sparse layer's router and experts, by MoE index. */
typedef struct {
    ferry_weight gate;      /* (n_experts, d_model) router */
    ferry_expert_weights *experts; /* (n_experts) in host memory: the expert store's source,
                                      and used in place when the backend maps host weights */
} ferry_moe_weights;

typedef struct {
    void *ptr;
    int on_device;
} ferry_owned;

struct ferry_model {
    char name[128]; /* the checkpoint folder's name */
    ferry_config cfg;
    ferry_st_set *st;
    ferry_tokenizer *tok;
    ferry_backend *be;
    pthread_mutex_t lock;
    int lock_ready;

    ferry_weight embed;      /* (n_vocab, d_model) */
    ferry_weight final_norm; /* (1, d_model) */
    ferry_weight lm_head;    /* (n_vocab, d_model); the embedding when tied */
    ferry_layer_weights *layers; /* (n_layers) */
    ferry_moe_weights *moe;      /* (n_moe_layers) */

    ferry_owned *owned;      /* device copies, or aligned host copies of experts */
    ferry_pool *bind_pool;   /* quantizes dense weights while binding (--quant-dense) */
    int32_t n_owned, cap_owned;
    int64_t n_params;

    /* Expert offloading (params.gpu_mem_bytes > 0). The store is built at open; the slots,
     * cache and prefetch pipeline when the first context has taken its share of the budget. */
    ferry_model_params params;
    char *pack_path;          /* owned copy of params.pack_path */
    /* The caller's pack (params.pack_path given): the experts are bound from it, not from
     * the checkpoint (a quantized pack gives quantized experts). Mapped read-only. */
    ferry_pack *pack;
    void *pack_map;
    size_t pack_map_bytes;
    ferry_store *store;
    void *h_pinned;           /* the store's host memory, when the backend pinned it */
    int experts_on_host;      /* experts stay in host memory (the store's source, or used in
                                 place by the CPU backend) */
    size_t dense_bytes;       /* device bytes of the dense weights */
    size_t context_bytes;     /* device bytes of the first context */
    int defer_plan;           /* nonzero: contexts being created do not plan the slots yet
                                 (engine/batch.c plans them once all its contexts exist) */
    size_t slot_bytes;        /* one expert slot, aligned */
    int32_t n_slots;
    char *d_slots;            /* (n_slots, slot_bytes) */
    ferry_cache *cache;
    ferry_prefetch *prefetch;
    /* Hybrid execution (--hybrid): the mode in force (AUTO only with a store and slots),
     * the CPU backend computing the CPU's share of the experts (not OFF), and the cost
     * model's rates, measured when the slots are planned (AUTO). */
    int32_t hybrid;
    ferry_backend *cpu_be;
    ferry_hybrid_cost hybrid_cost;
    int slots_planned;        /* ferry_model_plan_slots has run (CPU_EXPERTS plans none) */
    ferry_weight *gates, *ffn_norms;   /* (n_moe_layers) host views, for the gate predictor */
    ferry_routing_stats *route_stats;  /* for the stats and combined predictors */
};

/* Creates the backend the params name (p->backend, p->n_threads) with device_bytes of
 * budget (0: none). AUTO takes the GPU when this build has CUDA and a usable device, else
 * the CPU, logging why when a CUDA build falls back. The codes of the backends' create
 * functions; FERRY_ERR_INVALID for an unknown backend id. */
ferry_status ferry_backend_for_params(const ferry_model_params *p, size_t device_bytes,
                                      ferry_backend **out);

/* The weights of expert e of layer whose block [w1 | w3 | w2], laid out as the store lays it
 * out, starts at base (a device slot or the store's host memory). */
ferry_expert_weights ferry_model_expert_at(const ferry_model *m, int32_t layer, int32_t e,
                                           const void *base);

/* One expert over m rows on backend be: d_out (m, d_model) = (silu(d_x W1^T) * (d_x W3^T))
 * W2^T, with d_a, d_b (m, d_ff) as scratch (d_a ends up holding the gated product). The
 * forward pass runs it on the model's backend, the hybrid worker on the CPU's. The
 * backend's codes. */
ferry_status ferry_expert_ffn(ferry_backend *be, const ferry_expert_weights *X, const float *d_x,
                              int32_t m, float *d_a, float *d_b, float *d_out);

/* The expert's weights in host memory, for the CPU: from the store (blocking while the NVMe
 * tier reads it, or while every host cache buffer is held) or, without one, the
 * checkpoint's host tensors. Each successful call is
 * ended by ferry_model_expert_host_done. The store's codes. Thread-safe. */
ferry_status ferry_model_expert_host(ferry_model *m, int32_t layer, int32_t e,
                                     ferry_expert_weights *out);
void ferry_model_expert_host_done(ferry_model *m, int32_t layer, int32_t e);

/* The pack shape of the model's checkpoint, with its fingerprint: XXH3-64 over the shape
 * and every layer's router widened to float32 (a bf16 and an f32 copy of one checkpoint
 * agree; two trainings of one shape do not), never 0. Reads the routers from the
 * checkpoint's mapping. FERRY_ERR_NOMEM, or the checkpoint's error for a missing router. */
ferry_status ferry_model_pack_shape(const ferry_model *m, ferry_pack_shape *out);

/* A ferry_pack_source_fn (offload/pack.h) over an open model (user): its experts' host
 * tensors as they are. */
ferry_status ferry_model_pack_source(void *user, int32_t layer, int32_t expert, int32_t which,
                                     const void **data, ferry_dtype *dtype);

/* Bytes of one expert's weights (w1, w3, w2) as the model holds them (the checkpoint's, or
 * the pack's). */
uint64_t ferry_model_expert_bytes(const ferry_model *m);

/* Builds the expert slots, cache and prefetch pipeline from what is left of the device
 * budget (called by the first context once its buffers are allocated). FERRY_ERR_NOMEM
 * with the memory plan in the message when fewer than top-k slots fit. */
ferry_status ferry_model_plan_slots(ferry_model *m, size_t context_bytes);

#endif
