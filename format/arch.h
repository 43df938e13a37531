/*
 * format/arch.h: the description of each model architecture ferry runs. A family is one
 * row of a table: the config.json keys it reads, the tensor names of its checkpoint and
 * the options its forward pass uses. The config parser (format/config.c) fills a
 * ferry_config from the row and config.json; the loader (engine/model.c) binds tensors by
 * the row's names; the forward pass reads only the resolved options in ferry_config, never
 * the family's name. A new family (DeepSeek's MLA, gpt-oss) is a new row plus the options
 * its forward pass needs.
 *
 * The rows are static and immutable: any thread may read them.
 */
#ifndef FERRY_FORMAT_ARCH_H
#define FERRY_FORMAT_ARCH_H

/* Where a family's query/key RMSNorm sits. */
typedef enum {
    FERRY_QK_NORM_NONE = 0,
    FERRY_QK_NORM_HEAD = 1, /* over each head's head_dim values, after the head split (Qwen3) */
    FERRY_QK_NORM_FULL = 2, /* over the whole q and k projections, before the split (OLMoE) */
} ferry_qk_norm;

/* How a family decides whether the top-k routing weights are renormalised. */
typedef enum {
    FERRY_TOPK_ALWAYS = 0, /* always renormalised (Mixtral) */
    FERRY_TOPK_CONFIG = 1, /* config.json's norm_topk_prob (default false) */
} ferry_topk_rule;

/* How a family's attention projections get biases. */
typedef enum {
    FERRY_BIAS_NONE = 0,       /* none */
    FERRY_BIAS_QKV = 1,        /* q, k and v always; o never (Qwen2-MoE) */
    FERRY_BIAS_CONFIG_ALL = 2, /* q, k, v and o when config.json's attention_bias is true */
} ferry_bias_rule;

/* Tensor names are printf formats: "%d" the decoder layer, and for experts a second "%d"
 * the expert. A NULL name: the family has no such tensor. Expert and MLP triples are in
 * the order gate (w1), up (w3), down (w2). */
typedef struct {
    const char *model_type;      /* config.json's model_type: "qwen3_moe" */
    const char *architecture;    /* the class in config.json's architectures */
    const char *key_n_experts;   /* config key of experts per layer */
    const char *key_expert_ff;   /* config key of one expert's FFN width */
    const char *key_dense_ff;    /* config key of a dense MLP layer's width; NULL: none */
    const char *key_shared_ff;   /* config key of the shared expert's width; NULL: none */
    const char *router;          /* (n_experts, d_model) */
    const char *expert[3];       /* (ff, d), (ff, d), (d, ff) */
    const char *dense_mlp[3];    /* a dense layer's MLP; NULL when the family has none */
    const char *shared[3];       /* the shared expert; NULL when the family has none */
    const char *shared_gate;     /* (1, d_model): sigmoid(x . w) scales the shared expert */
    const char *q_norm, *k_norm; /* with qk_norm */
    ferry_qk_norm qk_norm;
    ferry_topk_rule topk;
    ferry_bias_rule bias;
    int clip_qkv;                /* reads config.json's clip_qkv (clamps q, k, v) */
    int sparse_rule;             /* reads mlp_only_layers and decoder_sparse_step */
    int window_rule;             /* sliding_window applies only with use_sliding_window, from
                                    layer max_window_layers on; else always when set */
    float default_rope_theta;    /* rope_theta when config.json leaves it out */
    float default_rms_eps;       /* rms_norm_eps when config.json leaves it out (the
                                    configuration class's default; OLMoE-1B-7B-0924 omits it) */
} ferry_arch;

/* The row whose model_type is name, or NULL. Thread-safe. */
const ferry_arch *ferry_arch_find(const char *model_type);

/* The row whose architecture class is name, or NULL. Thread-safe. */
const ferry_arch *ferry_arch_find_class(const char *architecture);

/* The supported model_type values, comma-separated, for messages: "mixtral, qwen3_moe, ...".
 * Thread-safe. */
const char *ferry_arch_names(void);

#endif
