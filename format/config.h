/*
 * format/config.h: the model hyperparameters of a Hugging Face config.json, for every family
 * in format/arch.h (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE).
 *
 * ferry_config is a plain value: parsing fills it completely and checks every field
 * against the others (head counts, expert counts, head_dim, dense and sparse layers) and
 * against limits that keep 32-bit index arithmetic safe, so code that takes a ferry_config
 * may trust it. The family's options are resolved here (norm_topk_prob, biases, q/k norms,
 * clip_qkv, the shared expert): the forward pass reads these fields, never the family.
 *
 * Layers: a decoder layer's MLP is either sparse (router + experts) or dense (one SwiGLU
 * MLP, resident). Everything keyed by expert (store, cache, packs, predictor, traces,
 * statistics) counts only the sparse layers, by their MoE index 0..n_moe_layers-1;
 * moe_index/moe_layer map between the two. For Mixtral every layer is sparse and the two
 * indices agree.
 */
#ifndef FERRY_ENGINE_CONFIG_H
#define FERRY_ENGINE_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "ferry.h"
#include "format/arch.h"

#define FERRY_CONFIG_MAX_EOS 8
#define FERRY_CONFIG_MAX_DIM (1 << 20)   /* hidden, intermediate, head_dim, heads x head_dim */
#define FERRY_CONFIG_MAX_VOCAB (1 << 24) /* also the limit on max_position_embeddings */
#define FERRY_CONFIG_MAX_COUNT (1 << 12) /* layers, heads, experts */
#define FERRY_CONFIG_MAX_EXPERTS 1024     /* experts per layer the router and cache handle */

typedef struct {
    int32_t vocab_size;        /* vocab_size */
    int32_t hidden_size;       /* hidden_size */
    int32_t intermediate_size; /* one expert's FFN width (Mixtral/OLMoE intermediate_size,
                                  Qwen moe_intermediate_size) */
    int32_t n_layers;          /* num_hidden_layers */
    int32_t n_heads;           /* num_attention_heads */
    int32_t n_kv_heads;        /* num_key_value_heads (default n_heads); divides n_heads */
    int32_t head_dim;          /* head_dim (default hidden_size / n_heads); even */
    int32_t n_experts;         /* experts per sparse layer (num_local_experts, num_experts) */
    int32_t n_experts_per_tok; /* num_experts_per_tok, 1..n_experts */
    int32_t max_positions;     /* max_position_embeddings */
    int32_t sliding_window;    /* sliding_window; 0 = none (null or absent) */
    int32_t bos_id;            /* bos_token_id; -1 when absent or null */
    int32_t n_eos;             /* entries of eos_ids used (0 when absent or null) */
    int32_t eos_ids[FERRY_CONFIG_MAX_EOS]; /* eos_token_id, an int or a list of ints */
    float rope_theta;          /* rope_theta (default 1e6) */
    float rms_eps;             /* rms_norm_eps, > 0 */
    int tie_word_embeddings;   /* tie_word_embeddings (default false) */

    const ferry_arch *arch;    /* the family (format/arch.h) */
    int32_t n_moe_layers;      /* sparse layers, 1..n_layers */
    int32_t sliding_from;      /* sliding_window applies to layers >= this */
    int32_t dense_ff;          /* a dense layer's MLP width; 0 when every layer is sparse */
    int32_t shared_ff;         /* the shared expert's width, 0 = none */
    int norm_topk;             /* renormalise the top-k routing weights to sum to 1 */
    int qkv_bias;              /* q, k, v projections have biases */
    int o_bias;                /* the output projection has a bias */
    ferry_qk_norm qk_norm;     /* RMSNorm of q and k (eps rms_eps) */
    float clip_qkv;            /* q, k, v clamped to [-clip_qkv, clip_qkv]; 0 = no clamp */
    int16_t moe_index[FERRY_CONFIG_MAX_COUNT]; /* decoder layer -> MoE layer, -1 dense */
    int16_t moe_layer[FERRY_CONFIG_MAX_COUNT]; /* MoE layer -> decoder layer */
} ferry_config;

/* Parses config.json text (len bytes, need not be NUL-terminated). origin names the text
 * in messages (usually the path). model_type must name a family of format/arch.h, or be
 * absent with that family's class among architectures. On success writes *out. Returns
 * FERRY_ERR_FORMAT (invalid JSON, a required field missing or of the wrong type, a value
 * out of range or inconsistent: the message names origin and the field),
 * FERRY_ERR_UNSUPPORTED (another model_type or architecture, a non-null rope_scaling, an
 * option value the family's forward pass does not implement: the message names it),
 * FERRY_ERR_NOMEM, FERRY_ERR_INVALID (NULL arguments). Thread-safe. */
ferry_status ferry_config_parse(const char *json, size_t len, const char *origin,
                                ferry_config *out);

/* Reads and parses dir/config.json. Returns FERRY_ERR_IO when it cannot be read (naming
 * the path, with strerror), else as ferry_config_parse. Thread-safe. */
ferry_status ferry_config_load(const char *dir, ferry_config *out);

#endif
