/*
 * format/arch.c: the table of model architectures (format/arch.h), written from the Hugging
 * Face transformers modeling code of each family (modeling_mixtral.py, modeling_qwen3_moe.py,
 * modeling_qwen2_moe.py, modeling_olmoe.py) and their configuration classes.
 */
#include "format/arch.h"

#include <stddef.h>
#include <string.h>

#define LAYER "model.layers.%d."
#define QWEN_EXPERTS                                                                           \
    {LAYER "mlp.experts.%d.gate_proj.weight", LAYER "mlp.experts.%d.up_proj.weight",            \
     LAYER "mlp.experts.%d.down_proj.weight"}

static const ferry_arch g_arches[] = {
    {
        .model_type = "mixtral",
        .architecture = "MixtralForCausalLM",
        .key_n_experts = "num_local_experts",
        .key_expert_ff = "intermediate_size",
        .router = LAYER "block_sparse_moe.gate.weight",
        .expert = {LAYER "block_sparse_moe.experts.%d.w1.weight",
                   LAYER "block_sparse_moe.experts.%d.w3.weight",
                   LAYER "block_sparse_moe.experts.%d.w2.weight"},
        .topk = FERRY_TOPK_ALWAYS,
        .default_rope_theta = 1e6f,
        .default_rms_eps = 1e-5f,
    },
    {
        .model_type = "qwen3_moe",
        .architecture = "Qwen3MoeForCausalLM",
        .key_n_experts = "num_experts",
        .key_expert_ff = "moe_intermediate_size",
        .key_dense_ff = "intermediate_size",
        .router = LAYER "mlp.gate.weight",
        .expert = QWEN_EXPERTS,
        .dense_mlp = {LAYER "mlp.gate_proj.weight", LAYER "mlp.up_proj.weight",
                      LAYER "mlp.down_proj.weight"},
        .q_norm = LAYER "self_attn.q_norm.weight",
        .k_norm = LAYER "self_attn.k_norm.weight",
        .qk_norm = FERRY_QK_NORM_HEAD,
        .topk = FERRY_TOPK_CONFIG,
        .bias = FERRY_BIAS_CONFIG_ALL,
        .sparse_rule = 1,
        .window_rule = 1,
        .default_rope_theta = 1e4f,
        .default_rms_eps = 1e-6f,
    },
    {
        .model_type = "qwen2_moe",
        .architecture = "Qwen2MoeForCausalLM",
        .key_n_experts = "num_experts",
        .key_expert_ff = "moe_intermediate_size",
        .key_dense_ff = "intermediate_size",
        .key_shared_ff = "shared_expert_intermediate_size",
        .router = LAYER "mlp.gate.weight",
        .expert = QWEN_EXPERTS,
        .dense_mlp = {LAYER "mlp.gate_proj.weight", LAYER "mlp.up_proj.weight",
                      LAYER "mlp.down_proj.weight"},
        .shared = {LAYER "mlp.shared_expert.gate_proj.weight",
                   LAYER "mlp.shared_expert.up_proj.weight",
                   LAYER "mlp.shared_expert.down_proj.weight"},
        .shared_gate = LAYER "mlp.shared_expert_gate.weight",
        .topk = FERRY_TOPK_CONFIG,
        .bias = FERRY_BIAS_QKV,
        .sparse_rule = 1,
        .window_rule = 1,
        .default_rope_theta = 1e4f,
        .default_rms_eps = 1e-6f,
    },
    {
        .model_type = "olmoe",
        .architecture = "OlmoeForCausalLM",
        .key_n_experts = "num_experts",
        .key_expert_ff = "intermediate_size",
        .router = LAYER "mlp.gate.weight",
        .expert = QWEN_EXPERTS,
        .q_norm = LAYER "self_attn.q_norm.weight",
        .k_norm = LAYER "self_attn.k_norm.weight",
        .qk_norm = FERRY_QK_NORM_FULL,
        .topk = FERRY_TOPK_CONFIG,
        .bias = FERRY_BIAS_CONFIG_ALL,
        .clip_qkv = 1,
        .default_rope_theta = 1e4f,
        .default_rms_eps = 1e-5f,
    },
};

#define N_ARCHES (sizeof g_arches / sizeof g_arches[0])

const ferry_arch *ferry_arch_find(const char *model_type)
{
    for (size_t i = 0; model_type && i < N_ARCHES; i++)
        if (strcmp(g_arches[i].model_type, model_type) == 0)
            return &g_arches[i];
    return NULL;
}

const ferry_arch *ferry_arch_find_class(const char *architecture)
{
    for (size_t i = 0; architecture && i < N_ARCHES; i++)
        if (strcmp(g_arches[i].architecture, architecture) == 0)
            return &g_arches[i];
    return NULL;
}

const char *ferry_arch_names(void) { return "mixtral, qwen3_moe, qwen2_moe, olmoe"; }
