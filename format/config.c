/*
 * format/config.c: parses and checks a Hugging Face config.json of a family in
 * format/arch.h.
 *
 * The fields read (a JSON object; others are ignored):
 *   model_type (or absent, with architectures containing the family's class)
 *   vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
 *   num_experts_per_tok, max_position_embeddings      required integers
 *   the family's expert count and expert width        required integers (Mixtral
 *                                                     num_local_experts / intermediate_size;
 *                                                     Qwen num_experts / moe_intermediate_size;
 *                                                     OLMoE num_experts / intermediate_size)
 *   rms_norm_eps                                       number > 0, default the family's
 *                                                      (the configuration class's)
 *   num_key_value_heads                                integer, default num_attention_heads
 *   head_dim                                           integer or null, default
 *                                                      hidden_size / num_attention_heads
 *   rope_theta                                         number > 0, default the family's
 *   sliding_window                                     integer >= 0 or null (= none); Qwen:
 *                                                      only with use_sliding_window true, from
 *                                                      layer max_window_layers on
 *   tie_word_embeddings                                bool, default false
 *   bos_token_id                                       integer or null
 *   eos_token_id                                       integer, list of integers, or null
 *   rope_scaling                                       must be null or absent
 *   Qwen: mlp_only_layers (list of layers with a dense MLP), decoder_sparse_step (every
 *   step-th layer is sparse, default 1), intermediate_size (the dense MLP's width, when a
 *   layer is dense), norm_topk_prob (bool, default false); Qwen3/OLMoE attention_bias
 *   (bool, default false); Qwen2-MoE shared_expert_intermediate_size (required, > 0);
 *   OLMoE clip_qkv (number > 0 or null).
 *   hidden_act                                         "silu" or absent
 * A field given the JSON value null is treated as absent.
 */
#include "format/config.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/fileio.h"


#define FERRY_CONFIG_MAX_FILE (16u * 1024 * 1024)

/* The field, or NULL when absent or JSON null. */
static const cJSON *field(const cJSON *root, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    return cJSON_IsNull(v) ? NULL : v;
}

/* Reads integer field key into *out, in [lo, hi]. Absent: *out = def when optional, else
 * a failure. */
static ferry_status get_int(const cJSON *root, const char *origin, const char *key,
                            int required, int32_t def, int64_t lo, int64_t hi, int32_t *out)
{
    const cJSON *v = field(root, key);
    if (!v) {
        if (required)
            return ferry_fail(FERRY_ERR_FORMAT, "%s: required field '%s' is missing", origin,
                              key);
        *out = def;
        return FERRY_OK;
    }
    if (!cJSON_IsNumber(v) || !(fabs(v->valuedouble) < 9007199254740992.0) ||
        v->valuedouble != floor(v->valuedouble))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: field '%s' is not an integer", origin, key);
    double d = v->valuedouble;
    if (d < (double)lo || d > (double)hi)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: field '%s' is %.0f, outside [%lld, %lld]",
                          origin, key, d, (long long)lo, (long long)hi);
    *out = (int32_t)d;
    return FERRY_OK;
}

/* Reads a number field > 0 that stays finite and nonzero as a float. */
static ferry_status get_positive(const cJSON *root, const char *origin, const char *key,
                                 int required, float def, float *out)
{
    const cJSON *v = field(root, key);
    if (!v) {
        if (required)
            return ferry_fail(FERRY_ERR_FORMAT, "%s: required field '%s' is missing", origin,
                              key);
        *out = def;
        return FERRY_OK;
    }
    if (!cJSON_IsNumber(v))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: field '%s' is not a number", origin, key);
    float f = (float)v->valuedouble;
    if (!(v->valuedouble > 0) || !(f > 0) || !isfinite(f))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: field '%s' is %g, must be a positive float",
                          origin, key, v->valuedouble);
    *out = f;
    return FERRY_OK;
}

/* The family config.json names, by model_type or, without one, by architectures. */
static ferry_status find_arch(const cJSON *root, const char *origin, const ferry_arch **out)
{
    const cJSON *type = field(root, "model_type");
    if (type) {
        if (!cJSON_IsString(type))
            return ferry_fail(FERRY_ERR_FORMAT, "%s: field 'model_type' is not a string", origin);
        if (!(*out = ferry_arch_find(type->valuestring)))
            return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: model_type '%s' is not supported "
                              "(ferry runs %s)", origin, type->valuestring, ferry_arch_names());
        return FERRY_OK;
    }
    const cJSON *arch = field(root, "architectures");
    if (!arch)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: neither 'model_type' nor 'architectures' is "
                          "given", origin);
    if (!cJSON_IsArray(arch))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: field 'architectures' is not a list", origin);
    for (const cJSON *a = arch->child; a; a = a->next)
        if (cJSON_IsString(a) && (*out = ferry_arch_find_class(a->valuestring)))
            return FERRY_OK;
    const cJSON *first = arch->child;
    return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: architectures ['%s'%s] include no class ferry "
                      "runs (the families %s)", origin,
                      cJSON_IsString(first) ? first->valuestring : "?",
                      first && first->next ? ", ..." : "", ferry_arch_names());
}

/* A bool field; absent: def. */
static ferry_status get_bool(const cJSON *root, const char *origin, const char *key, int def,
                             int *out)
{
    const cJSON *v = field(root, key);
    if (v && !cJSON_IsBool(v))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: field '%s' is not a bool", origin, key);
    *out = v ? cJSON_IsTrue(v) : def;
    return FERRY_OK;
}

/* Which decoder layers are sparse: Qwen's mlp_only_layers and decoder_sparse_step (a layer
 * is sparse unless listed, when (layer + 1) is a multiple of the step); every layer for the
 * other families. Fills moe_index, moe_layer and n_moe_layers. */
static ferry_status sparse_layers(const cJSON *root, const char *origin, ferry_config *c)
{
    ferry_status st;
    int32_t step = 1;
    uint8_t dense[FERRY_CONFIG_MAX_COUNT] = {0};
    if (c->arch->sparse_rule) {
        if ((st = get_int(root, origin, "decoder_sparse_step", 0, 1, 1, c->n_layers, &step)))
            return st;
        const cJSON *only = field(root, "mlp_only_layers");
        if (only && !cJSON_IsArray(only))
            return ferry_fail(FERRY_ERR_FORMAT, "%s: field 'mlp_only_layers' is not a list",
                              origin);
        int i = 0;
        for (const cJSON *e = only ? only->child : NULL; e; e = e->next, i++) {
            double d = cJSON_IsNumber(e) ? e->valuedouble : -1;
            if (!(d >= 0 && d < c->n_layers) || d != floor(d))
                return ferry_fail(FERRY_ERR_FORMAT, "%s: field 'mlp_only_layers'[%d] is not a "
                                  "layer in [0, %d)", origin, i, (int)c->n_layers);
            dense[(int)d] = 1;
        }
    }
    c->n_moe_layers = 0;
    for (int32_t l = 0; l < c->n_layers; l++) {
        if (dense[l] || (l + 1) % step != 0) {
            c->moe_index[l] = -1;
            continue;
        }
        c->moe_index[l] = (int16_t)c->n_moe_layers;
        c->moe_layer[c->n_moe_layers++] = (int16_t)l;
    }
    if (c->n_moe_layers == 0)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: no layer is sparse (mlp_only_layers and "
                          "decoder_sparse_step leave every layer dense); ferry runs MoE models",
                          origin);
    return FERRY_OK;
}

/* The family's options beyond Mixtral's: widths of the dense MLP and shared expert, router
 * renormalisation, biases, q/k norms, clip_qkv, the sliding window rule. */
static ferry_status family_options(const cJSON *root, const char *origin, ferry_config *c)
{
    ferry_status st;
    const ferry_arch *a = c->arch;
    const int64_t dim = FERRY_CONFIG_MAX_DIM;
    const cJSON *act = field(root, "hidden_act");
    if (act && !cJSON_IsString(act))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: field 'hidden_act' is not a string", origin);
    if (act && strcmp(act->valuestring, "silu") != 0)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: hidden_act '%s' is not supported (ferry's "
                          "MLPs are SwiGLU: 'silu')", origin, act->valuestring);
    TRY(sparse_layers(root, origin, c));
    c->dense_ff = 0;
    if (c->n_moe_layers < c->n_layers) {
        if (!a->key_dense_ff)
            return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: %s has no dense MLP layers", origin,
                              a->model_type);
        if ((st = get_int(root, origin, a->key_dense_ff, 1, 0, 1, dim, &c->dense_ff)))
            return st;
    }
    c->shared_ff = 0;
    if (a->key_shared_ff &&
        (st = get_int(root, origin, a->key_shared_ff, 1, 0, 1, dim, &c->shared_ff)))
        return st;
    c->norm_topk = 1;
    if (a->topk == FERRY_TOPK_CONFIG && (st = get_bool(root, origin, "norm_topk_prob", 0,
                                                       &c->norm_topk)))
        return st;
    int bias = 0;
    if (a->bias == FERRY_BIAS_CONFIG_ALL &&
        (st = get_bool(root, origin, "attention_bias", 0, &bias)))
        return st;
    c->qkv_bias = a->bias == FERRY_BIAS_QKV || bias;
    c->o_bias = bias;
    c->qk_norm = a->qk_norm;
    c->clip_qkv = 0;
    if (a->clip_qkv && field(root, "clip_qkv") &&
        (st = get_positive(root, origin, "clip_qkv", 1, 0, &c->clip_qkv)))
        return st;
    c->sliding_from = 0;
    if (a->window_rule) {
        int use = 0;
        if ((st = get_bool(root, origin, "use_sliding_window", 0, &use)))
            return st;
        if (!use)
            c->sliding_window = 0;
        else if ((st = get_int(root, origin, "max_window_layers", 0, 0, 0, c->n_layers,
                               &c->sliding_from)))
            return st;
    }
    return FERRY_OK;
}

static ferry_status get_token_ids(const cJSON *root, const char *origin, int32_t vocab,
                                  ferry_config *c)
{
    ferry_status st;
    if ((st = get_int(root, origin, "bos_token_id", 0, -1, 0, vocab - 1, &c->bos_id)) != FERRY_OK)
        return st;
    const cJSON *eos = field(root, "eos_token_id");
    c->n_eos = 0;
    if (!eos || cJSON_IsNumber(eos)) {
        if (eos) {
            if ((st = get_int(root, origin, "eos_token_id", 1, 0, 0, vocab - 1, &c->eos_ids[0])) !=
                FERRY_OK)
                return st;
            c->n_eos = 1;
        }
        return FERRY_OK;
    }
    if (!cJSON_IsArray(eos))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: field 'eos_token_id' is neither an integer nor "
                          "a list", origin);
    int n = cJSON_GetArraySize(eos);
    if (n > FERRY_CONFIG_MAX_EOS)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: field 'eos_token_id' lists %d ids, at most "
                          "%d are supported", origin, n, FERRY_CONFIG_MAX_EOS);
    int i = 0;
    for (const cJSON *e = eos->child; e; e = e->next, i++) {
        double d = cJSON_IsNumber(e) ? e->valuedouble : -1;
        if (!(d >= 0 && d < vocab) || d != floor(d))
            return ferry_fail(FERRY_ERR_FORMAT, "%s: field 'eos_token_id'[%d] is not a token id "
                              "in [0, %d)", origin, i, (int)vocab);
        c->eos_ids[i] = (int32_t)d;
    }
    c->n_eos = n;
    return FERRY_OK;
}

ferry_status ferry_config_parse(const char *json, size_t len, const char *origin,
                                ferry_config *out)
{
    ferry_status st;
    ferry_config c;
    cJSON *root = NULL;
    if (!json || !origin || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_config_parse: NULL argument");
    memset(&c, 0, sizeof c);
    root = cJSON_ParseWithLength(json, len);
    if (!root)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: not valid JSON", origin);
    if (!cJSON_IsObject(root)) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: not a JSON object", origin);
        goto fail;
    }
    if ((st = find_arch(root, origin, &c.arch)) != FERRY_OK)
        goto fail;
    if (field(root, "rope_scaling")) {
        st = ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: field 'rope_scaling' is set; ferry supports "
                        "only plain RoPE", origin);
        goto fail;
    }

    const int64_t dim = FERRY_CONFIG_MAX_DIM, count = FERRY_CONFIG_MAX_COUNT;
    if ((st = get_int(root, origin, "vocab_size", 1, 0, 1, FERRY_CONFIG_MAX_VOCAB,
                      &c.vocab_size)) != FERRY_OK ||
        (st = get_int(root, origin, "hidden_size", 1, 0, 1, dim, &c.hidden_size)) != FERRY_OK ||
        (st = get_int(root, origin, c.arch->key_expert_ff, 1, 0, 1, dim,
                      &c.intermediate_size)) != FERRY_OK ||
        (st = get_int(root, origin, "num_hidden_layers", 1, 0, 1, count, &c.n_layers)) !=
            FERRY_OK ||
        (st = get_int(root, origin, "num_attention_heads", 1, 0, 1, count, &c.n_heads)) !=
            FERRY_OK ||
        (st = get_int(root, origin, "num_key_value_heads", 0, c.n_heads, 1, count,
                      &c.n_kv_heads)) != FERRY_OK ||
        (st = get_int(root, origin, c.arch->key_n_experts, 1, 0, 1, count, &c.n_experts)) !=
            FERRY_OK ||
        (st = get_int(root, origin, "num_experts_per_tok", 1, 0, 1, count,
                      &c.n_experts_per_tok)) != FERRY_OK ||
        (st = get_int(root, origin, "max_position_embeddings", 1, 0, 1, FERRY_CONFIG_MAX_VOCAB,
                      &c.max_positions)) != FERRY_OK ||
        (st = get_int(root, origin, "sliding_window", 0, 0, 0, INT32_MAX, &c.sliding_window)) !=
            FERRY_OK ||
        (st = get_positive(root, origin, "rms_norm_eps", 0, c.arch->default_rms_eps,
                          &c.rms_eps)) != FERRY_OK ||
        (st = get_positive(root, origin, "rope_theta", 0, c.arch->default_rope_theta,
                          &c.rope_theta)) != FERRY_OK ||
        (st = get_token_ids(root, origin, c.vocab_size, &c)) != FERRY_OK)
        goto fail;

    if (field(root, "head_dim")) {
        if ((st = get_int(root, origin, "head_dim", 1, 0, 1, dim, &c.head_dim)) != FERRY_OK)
            goto fail;
    } else if (c.hidden_size % c.n_heads != 0) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: no 'head_dim', and hidden_size %d is not a "
                        "multiple of num_attention_heads %d", origin, (int)c.hidden_size,
                        (int)c.n_heads);
        goto fail;
    } else {
        c.head_dim = c.hidden_size / c.n_heads;
    }
    if (c.head_dim % 2 != 0) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: head_dim %d is odd; RoPE rotates pairs", origin,
                        (int)c.head_dim);
        goto fail;
    }
    if ((int64_t)c.n_heads * c.head_dim > dim) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: num_attention_heads %d x head_dim %d exceeds %lld",
                        origin, (int)c.n_heads, (int)c.head_dim, (long long)dim);
        goto fail;
    }
    if (c.n_heads % c.n_kv_heads != 0) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: num_attention_heads %d is not a multiple of "
                        "num_key_value_heads %d", origin, (int)c.n_heads, (int)c.n_kv_heads);
        goto fail;
    }
    if (c.n_experts > FERRY_CONFIG_MAX_EXPERTS) {
        st = ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: %s %d is more than the %d this build "
                        "routes", origin, c.arch->key_n_experts, (int)c.n_experts,
                        FERRY_CONFIG_MAX_EXPERTS);
        goto fail;
    }
    if (c.n_experts_per_tok > c.n_experts) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: num_experts_per_tok %d exceeds %s %d", origin,
                        (int)c.n_experts_per_tok, c.arch->key_n_experts, (int)c.n_experts);
        goto fail;
    }

    const cJSON *tie = field(root, "tie_word_embeddings");
    if (tie && !cJSON_IsBool(tie)) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: field 'tie_word_embeddings' is not a bool", origin);
        goto fail;
    }
    c.tie_word_embeddings = cJSON_IsTrue(tie) ? 1 : 0;
    if ((st = family_options(root, origin, &c)) != FERRY_OK)
        goto fail;

    cJSON_Delete(root);
    *out = c;
    return FERRY_OK;
fail:
    cJSON_Delete(root);
    return st;
}

ferry_status ferry_config_load(const char *dir, ferry_config *out)
{
    char path[4096];
    char *buf;
    size_t len;
    if (!dir || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_config_load: NULL argument");
    if ((size_t)snprintf(path, sizeof path, "%s/config.json", dir) >= sizeof path)
        return ferry_fail(FERRY_ERR_INVALID, "%s: path too long", dir);
    TRY(ferry_read_small_file(path, FERRY_CONFIG_MAX_FILE, 0, &buf, &len));
    ferry_status st = ferry_config_parse(buf, len, path, out);
    free(buf);
    return st;
}
