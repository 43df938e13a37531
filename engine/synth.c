/*
 * engine/synth.c: synthetic checkpoints (ferry synth): a real model's shape, random
 * weights, written as a Hugging Face checkpoint of one of the families of format/arch.h
 * (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE) that ferry_model_open (and transformers) load.
 *
 * What out_dir receives:
 *   config.json                           the keys the family's real config.json has, in
 *                                         its order (Mixtral's as before, the others sorted
 *                                         as transformers writes them), torch_dtype, and
 *                                         "ferry_synth" (seed)
 *   model.safetensors                     when the tensors fit in one shard, else
 *   model-0000i-of-0000N.safetensors      shards of at most shard_bytes of tensors, and
 *   model.safetensors.index.json          { "metadata": { "total_size": tensor bytes },
 *                                           "weight_map": { name: shard, ... } }
 *   tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model
 *                                         copied from tokenizer_dir (the last three when
 *                                         present), or, without one (not for Mixtral),
 *   tokenizer.json, tokenizer_config.json a byte-level BPE written here (below)
 * A shard is what format/safetensors.c validates: u64 header length N (little-endian),
 * N bytes of JSON padded with spaces to a multiple of 8 ({"__metadata__": {"format":
 * "pt"}, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}), then the tensors
 * back to back in header order, so every tensor starts aligned for its dtype. Tensors go
 * in model order (embedding; each layer's input norm, attention projections each with its
 * bias, q/k norms, post-attention norm, then its MLP: the router, each expert's gate, down
 * and up projections, the shared expert and its gate; or the dense MLP; final norm, LM
 * head unless tied); a shard is closed when the next tensor would take it past shard_bytes.
 * The names and which tensors a layer has come from the family's row of format/arch.h.
 *
 * Values: element i of the tensor called T takes 16 bits, lane i % 4, of splitmix64's
 * output r = mix(key + (i / 4 + 1) * golden), key = XXH3(T, seed), and is
 * (bits + 0.5) * 2a / 65536 - a rounded to the dtype: a counter-based generator, so any
 * chunk of any tensor is computed without the others, and a tensor's values depend on the
 * seed and its name only (a 2-layer and a 32-layer model share layer 0). 16 bits are more
 * than bf16 and f16 hold, and let a thread look the 65536 values up in a table instead of
 * converting each. a = sqrt(3 / fan_in) gives standard deviation 1/sqrt(fan_in), so
 * activations keep unit scale through the layers: fan_in is a matrix's columns, and a
 * bias's is its projection's columns; norm weights (q/k norms too) are 1.
 *
 * The generated tokenizer (tokenizer_dir NULL): tokenizer.json laid out as a real Qwen3
 * (or, for OLMoE, GPT-NeoX) tokenizer.json is, with a synthetic vocabulary: ids 0..255 the
 * 256 GPT-2 byte symbols in GPT-2's order, then n_bpe - 256 merges, each "a b" of two
 * tokens already there (rank = order) making token a+b; then the family's special tokens
 * (Qwen: <|endoftext|>, <|im_start|>, <|im_end|>; OLMoE: <|extra_id_0|>, <|extra_id_1|>,
 * <|endoftext|>) as added tokens, whose ids are config.json's BOS/EOS. The merges build
 * words as the pre-tokenizer cuts text: a piece is lowercase ASCII letters, a start is 'Ġ'
 * (a space) followed by a piece; half the merges join a start and a piece into a longer
 * start, half two pieces into a longer piece, at most SYNTH_BPE_MAX_LEN bytes, the parts
 * drawn by a fixed splitmix64 stream with early tokens likelier, and a draw is skipped
 * when its result exists. So the tokenizer depends only on n_bpe and the family, and one
 * of n tokens is the first n of a larger one.
 *
 * Writing: the tensors are cut into chunks of at most SYNTH_CHUNK_BYTES; every thread of
 * a pool claims chunks in order from one atomic counter, converts them into its own
 * buffer and pwrites the buffer at the chunk's place. Memory is one buffer per thread,
 * whatever the model's size. Every file is written under its temporary name
 * "NAME.<id>.tmp" (core/tempfile.h: recorded, so ferry_remove_temporaries removes it on a
 * signal; shards fallocated first, so a full disk fails before the data), fsynced, then
 * renamed: tokenizer files, config.json, the shards, and last the file that makes the
 * folder a checkpoint (model.safetensors, or the index). A failure removes every file
 * written and the folder when this call created it; a folder that holds only the
 * temporaries of a killed run is emptied and written again. The shards' bytes are reported
 * as "writing the checkpoint" to the progress callback.
 */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <xxhash.h>

#include "core/error.h"
#include "core/fileio.h"
#include "core/pool.h"
#include "core/progress.h"
#include "core/tempfile.h"
#include "format/arch.h"
#include "format/config.h"
#include "format/tokenizer.h"
#include "kernels/dtype.h"

#define SYNTH_CHUNK_BYTES (4u << 20)
#define SYNTH_DEFAULT_SHARD_BYTES (4ull << 30)
#define SYNTH_MAX_SHARDS 99999          /* the 5 digits of model-00001-of-00002 */
#define SYNTH_MAX_TENSORS (1 << 20)
#define SYNTH_MAX_HEADER (100ull * 1000 * 1000) /* what format/safetensors.c accepts */
#define SYNTH_MAX_THREADS 1024
#define SYNTH_NAME_CAP 96
#define SYNTH_GOLDEN 0x9e3779b97f4a7c15ull
#define SYNTH_N_SPECIAL 3               /* special tokens of a generated tokenizer */
#define SYNTH_BPE_MIN 256               /* its byte symbols */
#define SYNTH_BPE_MAX_LEN 12            /* bytes of its longest merged token */
#define SYNTH_BPE_SEED 0x6665727279ull  /* its merges' stream ("ferry") */

static const char *const g_dtype_names[3] = {"BF16", "F16", "F32"};
static const char *const g_torch_dtypes[3] = {"bfloat16", "float16", "float32"};
/* The tokenizer files copied, the first required. */
static const char *const g_tokenizer_files[4] = {"tokenizer.json", "tokenizer_config.json",
                                                 "special_tokens_map.json", "tokenizer.model"};

/* What ferry synth writes for a family beyond its row of format/arch.h: the keys of its
 * real config.json that ferry does not read, and its generated tokenizer. */
typedef struct {
    const char *model_type;
    int writes_head_dim;       /* config.json has head_dim: 1 always, 2 when it is not
                                  hidden / heads, 0 never (the family has no such key) */
    int writes_bos;            /* config.json has bos_token_id */
    int writes_rope_scaling;   /* config.json has "rope_scaling": null */
    int writes_empty_mlp_only; /* config.json has mlp_only_layers even when it is [] */
    int32_t pad_token_id;      /* config.json's pad_token_id; -1 = none */
    double aux_loss;           /* router_aux_loss_coef */
    int32_t sliding_window;    /* Qwen: sliding_window (0 = null), unused without
                                  use_sliding_window */
    int32_t max_window_layers; /* Qwen: max_window_layers; 0 = num_hidden_layers */
    /* the generated tokenizer; special[bos] / special[eos], -1 = none */
    const char *special[SYNTH_N_SPECIAL];
    int bos, eos;
    int qwen_pretok;           /* Qwen's Split regex then ByteLevel; else GPT-2's ByteLevel */
    const char *tokenizer_class;
} synth_family;

static const synth_family g_families[] = {
    {.model_type = "mixtral",
     .writes_head_dim = 2,
     .writes_bos = 1,
     .pad_token_id = -1,
     .aux_loss = 0.02},
    /* Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B */
    {.model_type = "qwen3_moe",
     .writes_head_dim = 1,
     .writes_bos = 1,
     .writes_rope_scaling = 1,
     .writes_empty_mlp_only = 1,
     .pad_token_id = -1,
     .aux_loss = 0.001,
     .special = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"},
     .bos = 0,
     .eos = 2,
     .qwen_pretok = 1,
     .tokenizer_class = "Qwen2Tokenizer"},
    /* Qwen/Qwen1.5-MoE-A2.7B */
    {.model_type = "qwen2_moe",
     .writes_bos = 1,
     .pad_token_id = -1,
     .aux_loss = 0.001,
     .sliding_window = 32768,
     .max_window_layers = 21,
     .special = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"},
     .bos = 0,
     .eos = 0,
     .qwen_pretok = 1,
     .tokenizer_class = "Qwen2Tokenizer"},
    /* allenai/OLMoE-1B-7B-0924 */
    {.model_type = "olmoe",
     .writes_rope_scaling = 1,
     .pad_token_id = 1,
     .aux_loss = 0.01,
     .special = {"<|extra_id_0|>", "<|extra_id_1|>", "<|endoftext|>"},
     .bos = -1,
     .eos = 2,
     .tokenizer_class = "GPTNeoXTokenizer"},
};
#define N_FAMILIES ((int)(sizeof g_families / sizeof g_families[0]))

typedef struct {
    char name[SYNTH_NAME_CAP];
    int32_t n_dims;   /* 1 (a norm or bias) or 2 */
    int64_t shape[2];
    float half_width; /* values uniform in [-half_width, half_width); 0: all ones */
    uint64_t key;     /* XXH3 of the name, seeded */
    int32_t shard;
    uint64_t offset;  /* in the shard's data section */
    uint64_t n_elems;
} synth_tensor;

typedef struct {
    int32_t tensor;
    uint64_t first, count; /* elements */
} synth_chunk;

typedef struct {
    char name[48];         /* model-00001-of-00003.safetensors */
    char *header;          /* u64 length + padded JSON */
    uint64_t header_bytes; /* 8 + padded JSON: where the data section starts */
    uint64_t data_bytes;
} synth_shard;

typedef struct {
    ferry_synth_params p;
    const ferry_arch *arch;
    const synth_family *fam;
    int32_t head_dim;       /* resolved */
    uint8_t *dense;         /* (n_layers) 1: the layer's MLP is dense */
    int32_t n_bpe;          /* generated tokenizer: byte + merged tokens; 0: copied */
    size_t elem_bytes;
    int32_t bos_id, eos_id; /* from the tokenizer; -1 when it has none */
    synth_tensor *tensors;
    int32_t n_tensors, cap_tensors;
    synth_shard *shards;
    int32_t n_shards;
    synth_chunk *chunks;
    int64_t n_chunks;
    uint64_t tensor_bytes, total_bytes, max_chunk_bytes;
    int64_t n_params;
    int32_t n_threads;
} synth_plan;

/* ---- parameters and presets ---------------------------------------------------------- */

ferry_synth_params ferry_synth_params_default(void)
{
    ferry_synth_params p;
    memset(&p, 0, sizeof p);
    (void)ferry_synth_preset("mixtral-8x7b", &p);
    p.dtype = FERRY_SYNTH_BF16;
    p.seed = 0;
    p.n_threads = 0;
    p.shard_bytes = SYNTH_DEFAULT_SHARD_BYTES;
    p.tokenizer_dir = NULL;
    return p;
}

/* One preset: the shape fields, model_type .. n_bpe_tokens of ferry_synth_params. */
typedef struct {
    const char *name;
    const char *model_type;
    int32_t n_vocab, d_model, d_ff, n_layers, n_heads, n_kv_heads, head_dim, n_experts,
        n_experts_used, max_positions;
    double rope_theta, rms_eps;
    int32_t d_ff_dense, d_ff_shared, norm_topk_prob, n_bpe_tokens;
} synth_preset;

/* From each model's config.json on the Hugging Face Hub (and, for tiny, the bundled
 * models/tiny-moe-code/config.json). n_bpe_tokens is the real tokenizer's regular tokens
 * (Qwen2's 151643; OLMoE's GPT-NeoX 50277), so the special tokens take the real ids. */
static const synth_preset g_presets[] = {
    {"mixtral-8x7b", "mixtral", 32000, 4096, 14336, 32, 32, 8, 0, 8, 2, 32768, 1e6, 1e-5, 0,
     0, 1, 0},
    {"tiny", "mixtral", 4096, 192, 384, 6, 6, 2, 0, 8, 2, 4096, 1e6, 1e-5, 0, 0, 1, 0},
    {"qwen3-30b-a3b", "qwen3_moe", 151936, 2048, 768, 48, 32, 4, 128, 128, 8, 40960, 1e6,
     1e-6, 6144, 0, 1, 151643},
    {"qwen3-235b-a22b", "qwen3_moe", 151936, 4096, 1536, 94, 64, 4, 128, 128, 8, 40960, 1e6,
     1e-6, 12288, 0, 1, 151643},
    {"qwen1.5-moe-a2.7b", "qwen2_moe", 151936, 2048, 1408, 24, 16, 16, 0, 60, 4, 8192, 1e6,
     1e-6, 5632, 5632, 0, 151643},
    {"olmoe-1b-7b", "olmoe", 50304, 2048, 1024, 16, 16, 16, 0, 64, 8, 4096, 1e4, 1e-5, 0, 0,
     0, 50277},
};
#define N_PRESETS ((int)(sizeof g_presets / sizeof g_presets[0]))

ferry_status ferry_synth_preset(const char *name, ferry_synth_params *p)
{
    if (!name || !p)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_synth_preset: NULL argument");
    const synth_preset *s = NULL;
    for (int i = 0; i < N_PRESETS && !s; i++)
        if (!strcmp(name, g_presets[i].name))
            s = &g_presets[i];
    if (!s)
        return ferry_fail(FERRY_ERR_INVALID, "unknown preset '%s' (known: mixtral-8x7b, tiny, "
                          "qwen3-30b-a3b, qwen3-235b-a22b, qwen1.5-moe-a2.7b, olmoe-1b-7b)",
                          name);
    p->model_type = s->model_type;
    p->n_vocab = s->n_vocab;
    p->d_model = s->d_model;
    p->d_ff = s->d_ff;
    p->n_layers = s->n_layers;
    p->n_heads = s->n_heads;
    p->n_kv_heads = s->n_kv_heads;
    p->head_dim = s->head_dim;
    p->n_experts = s->n_experts;
    p->n_experts_used = s->n_experts_used;
    p->max_positions = s->max_positions;
    p->rope_theta = s->rope_theta;
    p->rms_eps = s->rms_eps;
    p->d_ff_dense = s->d_ff_dense;
    p->dense_layers = NULL;
    p->n_dense_layers = 0;
    p->d_ff_shared = s->d_ff_shared;
    p->norm_topk_prob = s->norm_topk_prob;
    p->attention_bias = 0;
    p->clip_qkv = 0;
    p->tie_embeddings = 0;
    p->n_bpe_tokens = s->n_bpe_tokens;
    return FERRY_OK;
}

/* Checks one count against [1, hi]; `what` names the option and the config.json field. */
static ferry_status check_count(const char *what, int64_t v, int64_t hi)
{
    if (v < 1 || v > hi)
        return ferry_fail(FERRY_ERR_INVALID, "%s is %lld, must be in [1, %lld]", what,
                          (long long)v, (long long)hi);
    return FERRY_OK;
}

/* A 0/1 flag. */
static ferry_status check_flag(const char *what, int32_t v)
{
    if (v != 0 && v != 1)
        return ferry_fail(FERRY_ERR_INVALID, "%s is %d, must be 0 or 1", what, (int)v);
    return FERRY_OK;
}

/* The family p->model_type names: its row of format/arch.h and what synth writes for it. */
static ferry_status find_family(const ferry_synth_params *p, const ferry_arch **arch,
                                const synth_family **fam)
{
    const char *type = p->model_type ? p->model_type : "mixtral";
    for (int i = 0; i < N_FAMILIES; i++)
        if (!strcmp(type, g_families[i].model_type) && (*arch = ferry_arch_find(type))) {
            *fam = &g_families[i];
            return FERRY_OK;
        }
    return ferry_fail(FERRY_ERR_INVALID, "model type '%s' is not a family ferry synth writes "
                      "(mixtral, qwen3_moe, qwen2_moe, olmoe)", type);
}

/* The head dimension and its consistency with hidden and heads; *head_dim the resolved one.
 * Needs the counts checked. */
static ferry_status check_heads(const ferry_synth_params *p, const synth_family *fam,
                                int32_t *head_dim)
{
    if (p->head_dim == 0) {
        if (p->d_model % p->n_heads != 0)
            return ferry_fail(FERRY_ERR_INVALID, "hidden (hidden_size) %d is not a multiple of "
                              "heads (num_attention_heads) %d", (int)p->d_model,
                              (int)p->n_heads);
        if ((p->d_model / p->n_heads) % 2 != 0)
            return ferry_fail(FERRY_ERR_INVALID, "head dimension hidden / heads = %d / %d = %d "
                              "is odd; RoPE rotates pairs", (int)p->d_model, (int)p->n_heads,
                              (int)(p->d_model / p->n_heads));
        *head_dim = p->d_model / p->n_heads;
    } else {
        TRY(check_count("head dim (head_dim)", p->head_dim, FERRY_CONFIG_MAX_DIM));
        if (p->head_dim % 2 != 0)
            return ferry_fail(FERRY_ERR_INVALID, "head dim (head_dim) %d is odd; RoPE rotates "
                              "pairs", (int)p->head_dim);
        if ((int64_t)p->n_heads * p->head_dim > FERRY_CONFIG_MAX_DIM)
            return ferry_fail(FERRY_ERR_INVALID, "heads (num_attention_heads) %d x head dim "
                              "(head_dim) %d exceeds %d", (int)p->n_heads, (int)p->head_dim,
                              FERRY_CONFIG_MAX_DIM);
        if (!fam->writes_head_dim && (int64_t)p->head_dim * p->n_heads != p->d_model)
            return ferry_fail(FERRY_ERR_INVALID, "head dim (head_dim) %d is not hidden / heads "
                              "= %d / %d, and %s's config.json has no head_dim; leave it 0",
                              (int)p->head_dim, (int)p->d_model, (int)p->n_heads,
                              fam->model_type);
        *head_dim = p->head_dim;
    }
    if (p->n_heads % p->n_kv_heads != 0)
        return ferry_fail(FERRY_ERR_INVALID, "heads (num_attention_heads) %d is not a multiple of "
                          "kv heads (num_key_value_heads) %d", (int)p->n_heads,
                          (int)p->n_kv_heads);
    return FERRY_OK;
}

/* The options beyond Mixtral's: dense layers (into dense, n_layers entries, when not
 * NULL), the shared expert, routing, biases, clip_qkv, tied embeddings. */
static ferry_status check_family_options(const ferry_synth_params *p, const ferry_arch *a,
                                         uint8_t *dense)
{
    const char *type = a->model_type;
    const int64_t dim = FERRY_CONFIG_MAX_DIM;
    if (a->key_dense_ff)
        TRY(check_count("dense intermediate (intermediate_size)", p->d_ff_dense, dim));
    else if (p->d_ff_dense != 0)
        return ferry_fail(FERRY_ERR_INVALID, "dense intermediate is %d, must be 0: %s has no "
                          "dense MLP layers", (int)p->d_ff_dense, type);
    if (p->n_dense_layers < 0 || p->n_dense_layers >= p->n_layers)
        return ferry_fail(FERRY_ERR_INVALID, "dense layers (mlp_only_layers) lists %d of the %d "
                          "layers; at least one layer must be sparse", (int)p->n_dense_layers,
                          (int)p->n_layers);
    if (p->n_dense_layers > 0 && !p->dense_layers)
        return ferry_fail(FERRY_ERR_INVALID, "dense layers (mlp_only_layers) is NULL with %d "
                          "entries", (int)p->n_dense_layers);
    if (p->n_dense_layers > 0 && !a->key_dense_ff)
        return ferry_fail(FERRY_ERR_INVALID, "dense layers (mlp_only_layers) given, but %s has "
                          "no dense MLP layers", type);
    for (int32_t i = 0; i < p->n_dense_layers; i++) {
        int32_t l = p->dense_layers[i];
        if (l < 0 || l >= p->n_layers)
            return ferry_fail(FERRY_ERR_INVALID, "dense layer (mlp_only_layers[%d]) %d is not a "
                              "layer in [0, %d)", (int)i, (int)l, (int)p->n_layers);
        for (int32_t j = 0; j < i; j++)
            if (p->dense_layers[j] == l)
                return ferry_fail(FERRY_ERR_INVALID, "dense layer %d is listed twice "
                                  "(mlp_only_layers[%d] and [%d])", (int)l, (int)j, (int)i);
        if (dense)
            dense[l] = 1;
    }
    if (a->key_shared_ff)
        TRY(check_count("shared intermediate (shared_expert_intermediate_size)", p->d_ff_shared,
                        dim));
    else if (p->d_ff_shared != 0)
        return ferry_fail(FERRY_ERR_INVALID, "shared intermediate is %d, must be 0: %s has no "
                          "shared expert", (int)p->d_ff_shared, type);
    TRY(check_flag("norm topk prob (norm_topk_prob)", p->norm_topk_prob));
    if (a->topk == FERRY_TOPK_ALWAYS && !p->norm_topk_prob)
        return ferry_fail(FERRY_ERR_INVALID, "norm topk prob is 0, but %s always renormalises "
                          "the top-k routing weights; it must be 1", type);
    TRY(check_flag("attention bias (attention_bias)", p->attention_bias));
    if (p->attention_bias && a->bias != FERRY_BIAS_CONFIG_ALL)
        return ferry_fail(FERRY_ERR_INVALID, "attention bias is 1, but %s's config.json has no "
                          "attention_bias (%s)", type, a->bias == FERRY_BIAS_QKV ?
                          "its q, k and v projections always have biases" : "it has none");
    if (!(p->clip_qkv >= 0) || !isfinite((float)p->clip_qkv))
        return ferry_fail(FERRY_ERR_INVALID, "clip qkv (clip_qkv) %g must be a float >= 0 "
                          "(0: none)", p->clip_qkv);
    if (p->clip_qkv > 0 && (!a->clip_qkv || !((float)p->clip_qkv > 0)))
        return ferry_fail(FERRY_ERR_INVALID, "clip qkv (clip_qkv) is %g, but %s", p->clip_qkv,
                          a->clip_qkv ? "it is 0 as a float" : "only olmoe clamps q, k and v");
    TRY(check_flag("tie embeddings (tie_word_embeddings)", p->tie_embeddings));
    return FERRY_OK;
}

/* Everything about p but the tokenizer and the output folder; *arch, *fam, *head_dim the
 * family and resolved head dimension. */
static ferry_status check_params(const ferry_synth_params *p, const ferry_arch **arch,
                                 const synth_family **fam, int32_t *head_dim)
{
    const int64_t dim = FERRY_CONFIG_MAX_DIM, count = FERRY_CONFIG_MAX_COUNT;
    TRY(find_family(p, arch, fam));
    const ferry_arch *a = *arch;
    char experts[64], ff[64];
    snprintf(experts, sizeof experts, "experts (%s)", a->key_n_experts);
    snprintf(ff, sizeof ff, "intermediate (%s)", a->key_expert_ff);
    TRY(check_count("vocab (vocab_size)", p->n_vocab, FERRY_CONFIG_MAX_VOCAB));
    TRY(check_count("hidden (hidden_size)", p->d_model, dim));
    TRY(check_count(ff, p->d_ff, dim));
    TRY(check_count("layers (num_hidden_layers)", p->n_layers, count));
    TRY(check_count("heads (num_attention_heads)", p->n_heads, count));
    TRY(check_count("kv heads (num_key_value_heads)", p->n_kv_heads, count));
    TRY(check_count(experts, p->n_experts, FERRY_CONFIG_MAX_EXPERTS));
    TRY(check_count("top-k (num_experts_per_tok)", p->n_experts_used, count));
    TRY(check_count("max positions (max_position_embeddings)", p->max_positions,
                    FERRY_CONFIG_MAX_VOCAB));
    TRY(check_heads(p, *fam, head_dim));
    if (p->n_experts_used > p->n_experts)
        return ferry_fail(FERRY_ERR_INVALID, "top-k (num_experts_per_tok) %d exceeds %s %d",
                          (int)p->n_experts_used, experts, (int)p->n_experts);
    if (!(p->rope_theta > 0) || !isfinite((float)p->rope_theta))
        return ferry_fail(FERRY_ERR_INVALID, "rope theta %g must be a positive float",
                          p->rope_theta);
    if (!((float)p->rms_eps > 0) || !isfinite((float)p->rms_eps))
        return ferry_fail(FERRY_ERR_INVALID, "rms eps %g must be a positive float", p->rms_eps);
    TRY(check_family_options(p, a, NULL));
    if (p->dtype < FERRY_SYNTH_BF16 || p->dtype > FERRY_SYNTH_F32)
        return ferry_fail(FERRY_ERR_INVALID, "dtype %d is not bf16 (%d), f16 (%d) or f32 (%d)",
                          (int)p->dtype, FERRY_SYNTH_BF16, FERRY_SYNTH_F16, FERRY_SYNTH_F32);
    if (p->n_threads < 0 || p->n_threads > SYNTH_MAX_THREADS)
        return ferry_fail(FERRY_ERR_INVALID, "threads is %d, must be in [0, %d] (0: every core)",
                          (int)p->n_threads, SYNTH_MAX_THREADS);
    if (p->shard_bytes == 0)
        return ferry_fail(FERRY_ERR_INVALID, "shard size is 0 bytes, must be positive");
    return FERRY_OK;
}

/* The tokenizer: the folder to copy, checked against the vocab size, with its BOS/EOS ids;
 * or, without one (not for Mixtral), the one this file generates: *n_bpe its byte and
 * merged tokens, the special tokens after them. */
static ferry_status check_tokenizer(const ferry_synth_params *p, const synth_family *fam,
                                    int32_t *n_bpe, int32_t *bos, int32_t *eos)
{
    struct stat sb;
    *n_bpe = 0;
    if ((!p->tokenizer_dir || !p->tokenizer_dir[0]) && fam->special[0]) {
        int32_t room = p->n_vocab - SYNTH_N_SPECIAL, n = p->n_bpe_tokens ? p->n_bpe_tokens : room;
        if (p->n_bpe_tokens < 0 || n > room || n < SYNTH_BPE_MIN)
            return ferry_fail(FERRY_ERR_INVALID, "the generated tokenizer's %d BPE tokens "
                              "(n_bpe_tokens %d) and %d special tokens do not fit vocab "
                              "(vocab_size) %d; it needs %d byte tokens at least",
                              (int)n, (int)p->n_bpe_tokens, SYNTH_N_SPECIAL, (int)p->n_vocab,
                              SYNTH_BPE_MIN);
        *n_bpe = n;
        *bos = fam->bos >= 0 ? n + fam->bos : -1;
        *eos = fam->eos >= 0 ? n + fam->eos : -1;
        return FERRY_OK;
    }
    if (!p->tokenizer_dir || !p->tokenizer_dir[0])
        return ferry_fail(FERRY_ERR_INVALID, "no tokenizer folder given (tokenizer_dir): a "
                          "checkpoint needs a tokenizer.json to copy");
    if (stat(p->tokenizer_dir, &sb) != 0)
        return ferry_fail(FERRY_ERR_IO, "tokenizer folder %s: %s", p->tokenizer_dir,
                          strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return ferry_fail(FERRY_ERR_IO, "tokenizer folder %s is not a folder", p->tokenizer_dir);
    ferry_tokenizer *tok = NULL;
    ferry_status st = ferry_tokenizer_load(p->tokenizer_dir, &tok);
    if (st)
        return ferry_fail_prefix(st, "tokenizer folder %s", p->tokenizer_dir);
    int32_t n = ferry_tokenizer_n_vocab(tok);
    *bos = ferry_tokenizer_bos_id(tok);
    *eos = ferry_tokenizer_eos_id(tok);
    ferry_tokenizer_free(tok);
    if (n > p->n_vocab)
        return ferry_fail(FERRY_ERR_INVALID, "vocab (vocab_size) %d is smaller than the %d tokens "
                          "of %s/tokenizer.json", (int)p->n_vocab, (int)n, p->tokenizer_dir);
    return FERRY_OK;
}

/* ---- the plan: tensors, shards, headers, chunks ------------------------------------------ */

/* A growable string; `failed` once an allocation has failed (later appends do nothing). */
typedef struct {
    char *s;
    size_t len, cap;
    int failed;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) FERRY_PRINTF(2, 3);
static void sb_printf(sbuf *b, const char *fmt, ...)
{
    if (b->failed)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->failed = 1;
            return;
        }
        if (b->s && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = (b->cap ? b->cap * 2 : 4096) + (size_t)n;
        char *grown = realloc(b->s, cap);
        if (!grown) {
            b->failed = 1;
            return;
        }
        b->s = grown;
        b->cap = cap;
    }
}

/* Appends n bytes of s (no formatting: the hot path of the tokenizer's 151k entries). */
static void sb_put(sbuf *b, const char *s, size_t n)
{
    if (b->failed)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = (b->cap ? b->cap * 2 : 4096) + n;
        char *grown = realloc(b->s, cap);
        if (!grown) {
            b->failed = 1;
            return;
        }
        b->s = grown;
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = 0;
}

static void plan_free(synth_plan *pl)
{
    if (pl->shards)
        for (int32_t i = 0; i < pl->n_shards; i++)
            free(pl->shards[i].header);
    free(pl->shards);
    free(pl->tensors);
    free(pl->chunks);
    free(pl->dense);
    memset(pl, 0, sizeof *pl);
}

/* The half-width of values with standard deviation 1/sqrt(fan_in). */
static float half_width(int64_t fan_in) { return (float)sqrt(3.0 / (double)fan_in); }

/* Appends a tensor: a vector of d0 (n_dims 1) or a (d0, d1) matrix, values uniform in
 * [-a, a), or ones when a is 0. */
static void add_tensor(synth_plan *pl, const char *name, int32_t n_dims, int64_t d0, int64_t d1,
                       float a)
{
    synth_tensor *t = &pl->tensors[pl->n_tensors++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->n_dims = n_dims;
    t->shape[0] = d0;
    t->shape[1] = n_dims == 2 ? d1 : 0;
    t->n_elems = (uint64_t)d0 * (uint64_t)(n_dims == 2 ? d1 : 1);
    t->half_width = a;
    t->key = XXH3_64bits_withSeed(name, strlen(name), pl->p.seed);
}

/* A (rows, cols) matrix named by fmt ("%d" the layer l, then the expert e). */
static void add_matrix(synth_plan *pl, const char *fmt, int32_t l, int32_t e, int64_t rows,
                       int64_t cols)
{
    char name[SYNTH_NAME_CAP];
    snprintf(name, sizeof name, fmt, (int)l, (int)e);
    add_tensor(pl, name, 2, rows, cols, half_width(cols));
}

/* A vector of n named by fmt ("%d" the layer): a norm (fan_in 0: ones) or a bias. */
static void add_vector(synth_plan *pl, const char *fmt, int32_t l, int64_t n, int64_t fan_in)
{
    char name[SYNTH_NAME_CAP];
    snprintf(name, sizeof name, fmt, (int)l);
    add_tensor(pl, name, 1, n, 0, fan_in ? half_width(fan_in) : 0.0f);
}

/* A SwiGLU MLP of width ff named by fmt (gate, up, down; "%d" the layer, then the expert),
 * written gate, down, up (Mixtral's w1, w2, w3). */
static void add_mlp(synth_plan *pl, const char *const fmt[3], int32_t l, int32_t e, int64_t ff)
{
    const int64_t d = pl->p.d_model;
    add_matrix(pl, fmt[0], l, e, ff, d);
    add_matrix(pl, fmt[2], l, e, d, ff);
    add_matrix(pl, fmt[1], l, e, ff, d);
}

static ferry_status plan_tensors(synth_plan *pl)
{
    const ferry_synth_params *p = &pl->p;
    const ferry_arch *a = pl->arch;
    int64_t n = 3 + (int64_t)p->n_layers * (16 + 3 * (int64_t)p->n_experts);
    if (n > SYNTH_MAX_TENSORS)
        return ferry_fail(FERRY_ERR_INVALID, "%d layers x %d experts make %lld tensors, more "
                          "than the %d ferry synth writes", (int)p->n_layers, (int)p->n_experts,
                          (long long)n, SYNTH_MAX_TENSORS);
    pl->tensors = calloc((size_t)n, sizeof *pl->tensors);
    pl->dense = calloc((size_t)p->n_layers, 1);
    if (!pl->tensors || !pl->dense)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for %lld tensor records", (long long)n);
    pl->cap_tensors = (int32_t)n;
    TRY(check_family_options(p, a, pl->dense));
    const int64_t d = p->d_model, V = p->n_vocab;
    const int64_t q = (int64_t)p->n_heads * pl->head_dim;
    const int64_t kv = (int64_t)p->n_kv_heads * pl->head_dim;
    const int qkv_bias = a->bias == FERRY_BIAS_QKV || p->attention_bias;
    static const char *const proj[4] = {"q", "k", "v", "o"};
    const int64_t rows[4] = {q, kv, kv, d}, cols[4] = {d, d, d, q};
    char fmt[SYNTH_NAME_CAP];
    add_tensor(pl, "model.embed_tokens.weight", 2, V, d, half_width(d));
    for (int32_t l = 0; l < p->n_layers; l++) {
        add_vector(pl, "model.layers.%d.input_layernorm.weight", l, d, 0);
        for (int k = 0; k < 4; k++) {
            snprintf(fmt, sizeof fmt, "model.layers.%%d.self_attn.%s_proj.weight", proj[k]);
            add_matrix(pl, fmt, l, 0, rows[k], cols[k]);
            if (k < 3 ? qkv_bias : p->attention_bias) {
                snprintf(fmt, sizeof fmt, "model.layers.%%d.self_attn.%s_proj.bias", proj[k]);
                add_vector(pl, fmt, l, rows[k], cols[k]);
            }
        }
        if (a->qk_norm != FERRY_QK_NORM_NONE) {
            int head = a->qk_norm == FERRY_QK_NORM_HEAD;
            add_vector(pl, a->q_norm, l, head ? pl->head_dim : q, 0);
            add_vector(pl, a->k_norm, l, head ? pl->head_dim : kv, 0);
        }
        add_vector(pl, "model.layers.%d.post_attention_layernorm.weight", l, d, 0);
        if (pl->dense[l]) {
            add_mlp(pl, a->dense_mlp, l, 0, p->d_ff_dense);
            continue;
        }
        add_matrix(pl, a->router, l, 0, p->n_experts, d);
        for (int32_t e = 0; e < p->n_experts; e++)
            add_mlp(pl, a->expert, l, e, p->d_ff);
        if (a->shared[0]) {
            add_mlp(pl, a->shared, l, 0, p->d_ff_shared);
            add_matrix(pl, a->shared_gate, l, 0, 1, d);
        }
    }
    add_tensor(pl, "model.norm.weight", 1, d, 0, 0.0f);
    if (!p->tie_embeddings)
        add_tensor(pl, "lm_head.weight", 2, V, d, half_width(d));
    for (int32_t i = 0; i < pl->n_tensors; i++)
        pl->n_params += (int64_t)pl->tensors[i].n_elems;
    return FERRY_OK;
}

/* Shards: a new one when the next tensor would take the current past shard_bytes. */
static ferry_status plan_shards(synth_plan *pl)
{
    int32_t shard = 0;
    uint64_t used = 0;
    for (int32_t i = 0; i < pl->n_tensors; i++) {
        synth_tensor *t = &pl->tensors[i];
        uint64_t bytes = t->n_elems * pl->elem_bytes;
        if (used > 0 && used + bytes > pl->p.shard_bytes) {
            shard++;
            used = 0;
        }
        if (shard >= SYNTH_MAX_SHARDS)
            return ferry_fail(FERRY_ERR_INVALID, "shard size %llu bytes would make more than %d "
                              "shards", (unsigned long long)pl->p.shard_bytes, SYNTH_MAX_SHARDS);
        t->shard = shard;
        t->offset = used;
        used += bytes;
        pl->tensor_bytes += bytes;
    }
    pl->n_shards = shard + 1;
    pl->shards = calloc((size_t)pl->n_shards, sizeof *pl->shards);
    if (!pl->shards)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for %d shards", (int)pl->n_shards);
    for (int32_t s = 0; s < pl->n_shards; s++) {
        if (pl->n_shards == 1)
            snprintf(pl->shards[s].name, sizeof pl->shards[s].name, "model.safetensors");
        else
            snprintf(pl->shards[s].name, sizeof pl->shards[s].name,
                     "model-%05d-of-%05d.safetensors", (int)s + 1, (int)pl->n_shards);
    }
    return FERRY_OK;
}

/* Each shard's header: the 8-byte length, then the JSON padded with spaces to a multiple
 * of 8 (as the safetensors library writes it). */
static ferry_status plan_headers(synth_plan *pl)
{
    int32_t i = 0;
    for (int32_t s = 0; s < pl->n_shards; s++) {
        synth_shard *sh = &pl->shards[s];
        sbuf b = {0};
        sb_printf(&b, "%8s{\"__metadata__\":{\"format\":\"pt\"}", "");
        for (; i < pl->n_tensors && pl->tensors[i].shard == s; i++) {
            const synth_tensor *t = &pl->tensors[i];
            uint64_t begin = t->offset, end = begin + t->n_elems * pl->elem_bytes;
            sb_printf(&b, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld", t->name,
                      g_dtype_names[pl->p.dtype], (long long)t->shape[0]);
            if (t->n_dims == 2)
                sb_printf(&b, ",%lld", (long long)t->shape[1]);
            sb_printf(&b, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)begin,
                      (unsigned long long)end);
            sh->data_bytes = end;
        }
        sb_printf(&b, "}");
        while (!b.failed && b.len % 8 != 0)
            sb_printf(&b, " ");
        if (b.failed) {
            free(b.s);
            return ferry_fail(FERRY_ERR_NOMEM, "out of memory for the header of %s", sh->name);
        }
        uint64_t json_bytes = b.len - 8;
        if (json_bytes > SYNTH_MAX_HEADER) {
            free(b.s);
            return ferry_fail(FERRY_ERR_INVALID, "%s: its header would be %llu bytes, more than "
                              "the %llu readers accept; use smaller shards", sh->name,
                              (unsigned long long)json_bytes,
                              (unsigned long long)SYNTH_MAX_HEADER);
        }
        for (int k = 0; k < 8; k++)
            b.s[k] = (char)(json_bytes >> (8 * k));
        sh->header = b.s;
        sh->header_bytes = b.len;
        pl->total_bytes += sh->header_bytes + sh->data_bytes;
    }
    return FERRY_OK;
}

static ferry_status plan_chunks(synth_plan *pl)
{
    uint64_t per = SYNTH_CHUNK_BYTES / pl->elem_bytes;
    int64_t n = 0;
    for (int32_t i = 0; i < pl->n_tensors; i++)
        n += (int64_t)((pl->tensors[i].n_elems + per - 1) / per);
    pl->chunks = malloc((size_t)(n > 0 ? n : 1) * sizeof *pl->chunks);
    if (!pl->chunks)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for %lld chunks", (long long)n);
    for (int32_t i = 0; i < pl->n_tensors; i++) {
        for (uint64_t first = 0; first < pl->tensors[i].n_elems; first += per) {
            uint64_t count = pl->tensors[i].n_elems - first;
            if (count > per)
                count = per;
            pl->chunks[pl->n_chunks++] = (synth_chunk){i, first, count};
            if (count * pl->elem_bytes > pl->max_chunk_bytes)
                pl->max_chunk_bytes = count * pl->elem_bytes;
        }
    }
    int32_t threads = pl->p.n_threads ? pl->p.n_threads : ferry_pool_default_threads();
    pl->n_threads = (int64_t)threads < pl->n_chunks ? threads : (int32_t)pl->n_chunks;
    if (pl->n_threads < 1)
        pl->n_threads = 1;
    return FERRY_OK;
}

static ferry_status plan_build(const ferry_synth_params *p, synth_plan *pl)
{
    ferry_status st;
    memset(pl, 0, sizeof *pl);
    if (!p)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_synth: NULL parameters");
    if ((st = check_params(p, &pl->arch, &pl->fam, &pl->head_dim)))
        return st;
    pl->p = *p;
    pl->elem_bytes = p->dtype == FERRY_SYNTH_F32 ? 4 : 2;
    if ((st = check_tokenizer(p, pl->fam, &pl->n_bpe, &pl->bos_id, &pl->eos_id)) ||
        (st = plan_tensors(pl)) ||
        (st = plan_shards(pl)) || (st = plan_headers(pl)) || (st = plan_chunks(pl)))
        plan_free(pl);
    return st;
}

ferry_status ferry_synth_plan(const ferry_synth_params *p, ferry_synth_info *out)
{
    if (!out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_synth_plan: NULL argument");
    synth_plan pl;
    ferry_status st = plan_build(p, &pl);
    if (st)
        return st;
    ferry_synth_info info = {.total_bytes = pl.total_bytes,
                             .n_params = pl.n_params,
                             .n_tensors = pl.n_tensors,
                             .n_shards = pl.n_shards,
                             .n_threads = pl.n_threads};
    plan_free(&pl);
    *out = info;
    return FERRY_OK;
}

/* ---- values ------------------------------------------------------------------------------ */

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* A writer thread's memory: its chunk buffer, and the 65536 values of the tensor it last
 * filled (a tensor's values are its table at 16 random bits per element). */
typedef struct {
    uint8_t *buf;
    void *table;     /* (65536) elements of the plan's dtype */
    float table_a;   /* the half-width the table holds; < 0: none yet */
} synth_worker;

/* Value r of a tensor with half-width a: ((float)r + 0.5f) * (2a / 65536) - a, rounded to
 * dtype as PyTorch casts (to nearest even). */
static void build_table(float a, int32_t dtype, void *table)
{
    const float step = 2.0f * a / 65536.0f;
    for (uint32_t r = 0; r < 65536; r++) {
        float v = ((float)r + 0.5f) * step - a;
        if (dtype == FERRY_SYNTH_F32)
            ((float *)table)[r] = v;
        else if (dtype == FERRY_SYNTH_BF16)
            ((uint16_t *)table)[r] = ferry_f32_to_bf16(v);
        else
            ((uint16_t *)table)[r] = ferry_f32_to_f16(v);
    }
}

/* Element i takes lane i % 4 (16 bits) of r = mix64(key + (i / 4 + 1) * golden). */
#define FILL_FROM_TABLE(T)                                                                     \
    do {                                                                                       \
        const T *tb = w->table;                                                                \
        T *o = buf;                                                                            \
        uint64_t i = first, end = first + count;                                               \
        uint64_t z = t->key + (first / 4 + 1) * SYNTH_GOLDEN;                                  \
        for (; i + 4 <= end; i += 4, z += SYNTH_GOLDEN, o += 4) {                              \
            uint64_t r = mix64(z);                                                             \
            o[0] = tb[r & 0xffff];                                                             \
            o[1] = tb[(r >> 16) & 0xffff];                                                     \
            o[2] = tb[(r >> 32) & 0xffff];                                                     \
            o[3] = tb[r >> 48];                                                                \
        }                                                                                      \
        for (uint64_t r = mix64(z); i < end; i++, r >>= 16)                                    \
            *o++ = tb[r & 0xffff];                                                             \
    } while (0)

/* Elements [first, first + count) of tensor t as dtype into buf; first is a multiple of 4
 * (chunks are). */
static void fill_chunk(const synth_tensor *t, uint64_t first, uint64_t count, int32_t dtype,
                       synth_worker *w, void *buf)
{
    if (t->half_width == 0) { /* a norm: ones */
        for (uint64_t i = 0; i < count; i++) {
            if (dtype == FERRY_SYNTH_F32)
                ((float *)buf)[i] = 1.0f;
            else
                ((uint16_t *)buf)[i] = dtype == FERRY_SYNTH_BF16 ? 0x3f80 : 0x3c00;
        }
        return;
    }
    if (w->table_a != t->half_width) {
        build_table(t->half_width, dtype, w->table);
        w->table_a = t->half_width;
    }
    if (dtype == FERRY_SYNTH_F32)
        FILL_FROM_TABLE(float);
    else
        FILL_FROM_TABLE(uint16_t);
}
#undef FILL_FROM_TABLE

/* ---- files --------------------------------------------------------------------------------- */

/* The files this call has made, to remove on failure: each as its temporary until renamed,
 * then as its final name. */
typedef struct {
    char *dir;
    int created_dir;
    ferry_temp *temps; /* dir/NAME.<id>.tmp until renamed */
    char **finals;     /* dir/NAME */
    int *renamed;
    int32_t n, cap;
} synth_files;

static char *join(const char *dir, const char *name, const char *suffix)
{
    size_t a = strlen(dir), b = strlen(name), c = strlen(suffix);
    char *p = malloc(a + b + c + 2);
    if (!p)
        return NULL;
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b);
    memcpy(p + a + 1 + b, suffix, c + 1);
    return p;
}

/* Records dir/name's temporary as made by this call (before it is created); *tmp borrows
 * its path. */
static ferry_status files_add(synth_files *f, const char *name, const char **tmp)
{
    if (f->n == f->cap) {
        int32_t cap = f->cap ? f->cap * 2 : 16;
        ferry_temp *temps = realloc(f->temps, (size_t)cap * sizeof *temps);
        if (!temps)
            return ferry_fail(FERRY_ERR_NOMEM, "out of memory");
        f->temps = temps;
        char **finals = realloc(f->finals, (size_t)cap * sizeof *finals);
        if (!finals)
            return ferry_fail(FERRY_ERR_NOMEM, "out of memory");
        f->finals = finals;
        int *renamed = realloc(f->renamed, (size_t)cap * sizeof *renamed);
        if (!renamed)
            return ferry_fail(FERRY_ERR_NOMEM, "out of memory");
        f->renamed = renamed;
        f->cap = cap;
    }
    char *final = join(f->dir, name, "");
    if (!final)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory");
    ferry_status st = ferry_temp_begin(final, &f->temps[f->n]);
    if (st) {
        free(final);
        return st;
    }
    f->finals[f->n] = final;
    f->renamed[f->n] = 0;
    *tmp = f->temps[f->n].path;
    f->n++;
    return FERRY_OK;
}

/* Renames file i from its temporary to NAME. */
static ferry_status files_commit(synth_files *f, int32_t i)
{
    TRY(ferry_temp_commit(&f->temps[i], f->finals[i]));
    f->renamed[i] = 1;
    return FERRY_OK;
}

/* Removes what was made (the renamed files when `undo`, temporaries always) and frees the
 * records. */
static void files_finish(synth_files *f, int undo)
{
    for (int32_t i = 0; i < f->n; i++) {
        if (undo && f->renamed[i])
            unlink(f->finals[i]);
        ferry_temp_abort(&f->temps[i]);
        free(f->finals[i]);
    }
    if (undo && f->created_dir)
        rmdir(f->dir);
    free(f->temps);
    free(f->finals);
    free(f->renamed);
    free(f->dir);
}

/* Creates path (which must not exist), writes data and fsyncs it. */
static ferry_status write_small_file(const char *path, const void *data, size_t n)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot create: %s", path, strerror(errno));
    ferry_status st = ferry_pwrite_all(fd, path, data, n, 0);
    if (!st && fsync(fd) != 0)
        st = ferry_fail(FERRY_ERR_IO, "%s: fsync failed: %s", path, strerror(errno));
    if (close(fd) != 0 && !st)
        st = ferry_fail(FERRY_ERR_IO, "%s: close failed: %s", path, strerror(errno));
    return st;
}

/* Reads a whole file (a tokenizer file: small) into *buf (caller frees). *missing = 1
 * and FERRY_OK when it does not exist. */
static ferry_status read_file(const char *path, char **buf, size_t *len, int *missing)
{
    *missing = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        *missing = 1;
        return FERRY_OK;
    }
    if (fd < 0)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    ferry_status st = FERRY_OK;
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    for (;;) {
        if (!b) {
            st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", path);
            break;
        }
        if (n == cap) {
            char *grown = realloc(b, cap * 2);
            if (!grown) {
                free(b);
                b = NULL;
                continue;
            }
            b = grown;
            cap *= 2;
        }
        ssize_t r = read(fd, b + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            st = ferry_fail(FERRY_ERR_IO, "%s: cannot read: %s", path, strerror(errno));
            break;
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    if (st) {
        free(b);
        return st;
    }
    *buf = b;
    *len = n;
    return FERRY_OK;
}

/* A copied tokenizer.json with fewer tokens than vocab_size gets regular tokens for the
 * ids after its last ("<synth_ID>": never produced by encoding, decoded as their text), so
 * every id the model can produce decodes. *out is a new document, or NULL when nothing was
 * missing. */
static ferry_status pad_tokenizer(const char *src, const char *data, size_t len,
                                  int32_t n_vocab, char **out, size_t *out_len)
{
    *out = NULL;
    cJSON *root = cJSON_ParseWithLength(data, len);
    cJSON *model = root ? cJSON_GetObjectItemCaseSensitive(root, "model") : NULL;
    cJSON *vocab = model ? cJSON_GetObjectItemCaseSensitive(model, "vocab") : NULL;
    if (!cJSON_IsObject(vocab)) {
        cJSON_Delete(root);
        return ferry_fail(FERRY_ERR_FORMAT, "%s: no model.vocab object to extend to vocab_size "
                          "%d", src, (int)n_vocab);
    }
    double top = -1;
    for (const cJSON *e = vocab->child; e; e = e->next)
        top = cJSON_IsNumber(e) && e->valuedouble > top ? e->valuedouble : top;
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    for (const cJSON *a = cJSON_IsArray(added) ? added->child : NULL; a; a = a->next) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(a, "id");
        top = cJSON_IsNumber(id) && id->valuedouble > top ? id->valuedouble : top;
    }
    if (top + 1 >= n_vocab) {
        cJSON_Delete(root);
        return FERRY_OK;
    }
    for (int32_t id = (int32_t)top + 1; id < n_vocab; id++) {
        char piece[32];
        snprintf(piece, sizeof piece, "<synth_%d>", (int)id);
        if (cJSON_GetObjectItemCaseSensitive(vocab, piece) ||
            !cJSON_AddNumberToObject(vocab, piece, id)) {
            cJSON_Delete(root);
            return ferry_fail(FERRY_ERR_NOMEM, "%s: cannot add token %s", src, piece);
        }
    }
    *out = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!*out)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for %s", src);
    *out_len = strlen(*out);
    return FERRY_OK;
}

static ferry_status copy_tokenizer(const synth_plan *pl, synth_files *f)
{
    for (int k = 0; k < 4; k++) {
        char *src = join(pl->p.tokenizer_dir, g_tokenizer_files[k], "");
        if (!src)
            return ferry_fail(FERRY_ERR_NOMEM, "out of memory");
        char *data = NULL;
        size_t len = 0;
        int missing = 0;
        ferry_status st = read_file(src, &data, &len, &missing);
        if (!st && missing && k == 0)
            st = ferry_fail(FERRY_ERR_IO, "%s: no such file", src);
        char *padded = NULL;
        size_t padded_len = 0;
        if (!st && !missing && k == 0)
            st = pad_tokenizer(src, data, len, pl->p.n_vocab, &padded, &padded_len);
        free(src);
        if (st || missing) {
            free(data);
            return st;
        }
        const char *tmp;
        if (!(st = files_add(f, g_tokenizer_files[k], &tmp)))
            st = padded ? write_small_file(tmp, padded, padded_len)
                        : write_small_file(tmp, data, len);
        free(padded);
        free(data);
        if (st)
            return st;
    }
    return FERRY_OK;
}

/* ---- the generated tokenizer (see the top of the file) ------------------------------------ */

/* GPT-2's bytes_to_unicode in its id order: ids 0..187 the printable bytes ('!'..'~',
 * U+00A1..U+00AC, U+00AE..U+00FF) as themselves, ids 188..255 the others in byte order as
 * U+0100 onwards (the space, 0x20, is U+0120 'Ġ'). cp[id] is the code point, byte[id] the
 * byte it stands for. */
static void byte_symbols(uint32_t cp[256], uint8_t byte[256])
{
    int n = 0, extra = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int b = 0; b < 256; b++) {
            int printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
            if (printable != (pass == 0))
                continue;
            byte[n] = (uint8_t)b;
            cp[n++] = pass == 0 ? (uint32_t)b : 256u + (uint32_t)extra++;
        }
}

/* The vocabulary being built: every token's text (GPT-2 symbols, UTF-8) and a hash set of
 * them, the merges, and which tokens a merge may take as its left or right part. */
typedef struct {
    int32_t n, cap;
    char *text;            /* token i is text[off[i] .. off[i + 1]) */
    uint32_t *off;         /* (cap + 1) */
    uint8_t *raw;          /* (cap) bytes of text token i stands for */
    int32_t *starts;       /* (cap) 'Ġ' and the pieces that start with it: a word's start */
    int32_t *pieces;       /* (cap) the pieces of lowercase letters */
    int32_t n_starts, n_pieces;
    int32_t *merges;       /* (cap) x 2: token i >= 256 is merges[2i] + merges[2i + 1] */
    int32_t *slots;        /* hash set of the tokens' texts, -1 empty */
    uint64_t mask;
} synth_bpe;

static void bpe_free(synth_bpe *b)
{
    free(b->text);
    free(b->off);
    free(b->raw);
    free(b->starts);
    free(b->pieces);
    free(b->merges);
    free(b->slots);
}

/* The slot holding text s (n bytes), or the empty slot where it would go. */
static int32_t *bpe_slot(const synth_bpe *b, const char *s, size_t n)
{
    for (uint64_t h = XXH3_64bits(s, n);; h++) {
        int32_t *slot = &b->slots[h & b->mask], id = *slot;
        if (id < 0 || (b->off[id + 1] - b->off[id] == n && !memcmp(b->text + b->off[id], s, n)))
            return slot;
    }
}

/* Appends the token whose text is s (n bytes, not yet in the vocabulary). */
static void bpe_add(synth_bpe *b, const char *s, size_t n, uint8_t raw, int32_t *slot)
{
    int32_t id = b->n++;
    memcpy(b->text + b->off[id], s, n);
    b->off[id + 1] = b->off[id] + (uint32_t)n;
    b->raw[id] = raw;
    *slot = id;
}

/* An index in [0, n), early ones likelier (u^3 of a uniform u: short tokens merge more,
 * as in a trained BPE), from the stream *s. */
static int32_t bpe_pick(uint64_t *s, int32_t n)
{
    *s += SYNTH_GOLDEN;
    double u = (double)(mix64(*s) >> 11) * 0x1p-53;
    return (int32_t)(u * u * u * (double)n);
}

/* Builds n_bpe tokens: the 256 byte symbols, then the merges. */
static ferry_status bpe_build(synth_bpe *b, int32_t n_bpe)
{
    uint64_t n_slots = 1;
    while (n_slots < 2 * (uint64_t)n_bpe)
        n_slots *= 2;
    memset(b, 0, sizeof *b);
    b->cap = n_bpe;
    b->mask = n_slots - 1;
    b->text = malloc((size_t)n_bpe * 2 * SYNTH_BPE_MAX_LEN);
    b->off = calloc((size_t)n_bpe + 1, sizeof *b->off);
    b->raw = malloc((size_t)n_bpe);
    b->starts = malloc((size_t)n_bpe * sizeof *b->starts);
    b->pieces = malloc((size_t)n_bpe * sizeof *b->pieces);
    b->merges = malloc((size_t)n_bpe * 2 * sizeof *b->merges);
    b->slots = malloc(n_slots * sizeof *b->slots);
    if (!b->text || !b->off || !b->raw || !b->starts || !b->pieces || !b->merges || !b->slots)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for a tokenizer of %d tokens",
                          (int)n_bpe);
    memset(b->slots, 0xff, n_slots * sizeof *b->slots);
    uint32_t cp[256];
    uint8_t byte[256];
    byte_symbols(cp, byte);
    for (int i = 0; i < 256; i++) {
        char s[2];
        size_t n = 1;
        if (cp[i] < 0x80) {
            s[0] = (char)cp[i];
        } else {
            s[0] = (char)(0xc0 | (cp[i] >> 6));
            s[1] = (char)(0x80 | (cp[i] & 0x3f));
            n = 2;
        }
        bpe_add(b, s, n, 1, bpe_slot(b, s, n));
        if (byte[i] >= 'a' && byte[i] <= 'z')
            b->pieces[b->n_pieces++] = i;
        else if (byte[i] == ' ')
            b->starts[b->n_starts++] = i;
    }
    uint64_t stream = SYNTH_BPE_SEED;
    int64_t tries = 0, max_tries = 64 * (int64_t)n_bpe + 1000000;
    char s[4 * SYNTH_BPE_MAX_LEN];
    while (b->n < n_bpe) {
        if (++tries > max_tries)
            return ferry_fail(FERRY_ERR_INVALID, "generating the tokenizer: %d merges found in "
                              "%lld tries, %d wanted", (int)(b->n - 256), (long long)tries,
                              (int)(n_bpe - 256));
        /* half the merges make a word's start, half a piece inside a word */
        stream += SYNTH_GOLDEN;
        int start = (int)(mix64(stream) >> 63);
        int32_t x = start ? b->starts[bpe_pick(&stream, b->n_starts)]
                          : b->pieces[bpe_pick(&stream, b->n_pieces)];
        int32_t y = b->pieces[bpe_pick(&stream, b->n_pieces)];
        if (b->raw[x] + b->raw[y] > SYNTH_BPE_MAX_LEN)
            continue;
        size_t nx = b->off[x + 1] - b->off[x], ny = b->off[y + 1] - b->off[y];
        memcpy(s, b->text + b->off[x], nx);
        memcpy(s + nx, b->text + b->off[y], ny);
        int32_t *slot = bpe_slot(b, s, nx + ny);
        if (*slot >= 0)
            continue;
        int32_t id = b->n;
        b->merges[2 * id] = x;
        b->merges[2 * id + 1] = y;
        bpe_add(b, s, nx + ny, (uint8_t)(b->raw[x] + b->raw[y]), slot);
        if (start)
            b->starts[b->n_starts++] = id;
        else
            b->pieces[b->n_pieces++] = id;
    }
    return FERRY_OK;
}

/* A JSON string of n bytes of s: the vocabulary's texts need only '"' and '\' escaped. */
static void sb_json(sbuf *o, const char *s, size_t n)
{
    sb_put(o, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '"' || s[i] == '\\')
            sb_put(o, "\\", 1);
        sb_put(o, s + i, 1);
    }
    sb_put(o, "\"", 1);
}

/* Qwen2's pre-tokenizer regex, as tokenizer.json spells it (JSON escapes). */
#define SYNTH_QWEN_REGEX                                                                       \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}| "          \
    "?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+"

/* tokenizer.json, laid out as the family's real one (compact). */
static ferry_status tokenizer_json(const synth_plan *pl, const synth_bpe *b, sbuf *o)
{
    const synth_family *fam = pl->fam;
    const char *bl = fam->qwen_pretok ? "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,"
                                        "\"trim_offsets\":false,\"use_regex\":false}"
                                      : "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,"
                                        "\"trim_offsets\":true,\"use_regex\":true}";
    sb_printf(o, "{\"version\":\"1.0\",\"truncation\":null,\"padding\":null,\"added_tokens\":[");
    for (int k = 0; k < SYNTH_N_SPECIAL; k++)
        sb_printf(o, "%s{\"id\":%d,\"content\":\"%s\",\"single_word\":false,\"lstrip\":false,"
                  "\"rstrip\":false,\"normalized\":false,\"special\":true}", k ? "," : "",
                  (int)(b->n + k), fam->special[k]);
    sb_printf(o, "],\"normalizer\":{\"type\":\"NFC\"},\"pre_tokenizer\":");
    if (fam->qwen_pretok)
        sb_printf(o, "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":"
                  "{\"Regex\":\"" SYNTH_QWEN_REGEX "\"},\"behavior\":\"Isolated\",\"invert\":"
                  "false},%s]}", bl);
    else
        sb_printf(o, "%s", bl);
    sb_printf(o, ",\"post_processor\":%s,\"decoder\":%s,\"model\":{\"type\":\"BPE\",\"dropout\":"
              "null,\"unk_token\":null,\"continuing_subword_prefix\":\"\",\"end_of_word_suffix\":"
              "\"\",\"fuse_unk\":false,\"byte_fallback\":false,\"ignore_merges\":false,"
              "\"vocab\":{", bl, bl);
    for (int32_t i = 0; i < b->n; i++) {
        char id[16];
        if (i)
            sb_put(o, ",", 1);
        sb_json(o, b->text + b->off[i], b->off[i + 1] - b->off[i]);
        sb_put(o, id, (size_t)snprintf(id, sizeof id, ":%d", (int)i));
    }
    sb_put(o, "},\"merges\":[", 12);
    for (int32_t i = 256; i < b->n; i++) {
        int32_t x = b->merges[2 * i], y = b->merges[2 * i + 1];
        size_t nx = b->off[x + 1] - b->off[x], ny = b->off[y + 1] - b->off[y];
        char s[4 * SYNTH_BPE_MAX_LEN + 1];
        memcpy(s, b->text + b->off[x], nx);
        s[nx] = ' ';
        memcpy(s + nx + 1, b->text + b->off[y], ny);
        if (i > 256)
            sb_put(o, ",", 1);
        sb_json(o, s, nx + 1 + ny);
    }
    sb_put(o, "]}}", 3);
    if (o->failed)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for tokenizer.json");
    return FERRY_OK;
}

/* tokenizer_config.json: no BOS added, the special tokens, the family's tokenizer class. */
static char *tokenizer_config_json(const synth_plan *pl)
{
    const synth_family *fam = pl->fam;
    cJSON *c = cJSON_CreateObject();
    cJSON_AddBoolToObject(c, "add_bos_token", 0);
    if (fam->qwen_pretok)
        cJSON_AddBoolToObject(c, "add_prefix_space", 0);
    else
        cJSON_AddBoolToObject(c, "add_eos_token", 0);
    cJSON *dec = cJSON_AddObjectToObject(c, "added_tokens_decoder");
    for (int k = 0; k < SYNTH_N_SPECIAL && dec; k++) {
        char id[16];
        snprintf(id, sizeof id, "%d", (int)(pl->n_bpe + k));
        cJSON *t = cJSON_AddObjectToObject(dec, id);
        cJSON_AddStringToObject(t, "content", fam->special[k]);
        cJSON_AddBoolToObject(t, "lstrip", 0);
        cJSON_AddBoolToObject(t, "normalized", 0);
        cJSON_AddBoolToObject(t, "rstrip", 0);
        cJSON_AddBoolToObject(t, "single_word", 0);
        cJSON_AddBoolToObject(t, "special", 1);
    }
    if (fam->qwen_pretok) {
        cJSON *extra = cJSON_AddArrayToObject(c, "additional_special_tokens");
        for (int k = 1; k < SYNTH_N_SPECIAL && extra; k++)
            cJSON_AddItemToArray(extra, cJSON_CreateString(fam->special[k]));
    }
    cJSON_AddNullToObject(c, "bos_token"); /* as the real ones: config.json has the BOS */
    cJSON_AddBoolToObject(c, "clean_up_tokenization_spaces", 0);
    cJSON_AddStringToObject(c, "eos_token", fam->special[fam->eos]);
    if (fam->qwen_pretok)
        cJSON_AddStringToObject(c, "errors", "replace");
    cJSON_AddNumberToObject(c, "model_max_length", pl->p.max_positions);
    if (fam->qwen_pretok) {
        cJSON_AddStringToObject(c, "pad_token", fam->special[0]);
        cJSON_AddBoolToObject(c, "split_special_tokens", 0);
    } else {
        cJSON_AddNullToObject(c, "pad_token");
    }
    cJSON_AddStringToObject(c, "tokenizer_class", fam->tokenizer_class);
    cJSON_AddNullToObject(c, "unk_token");
    char *text = cJSON_Print(c);
    cJSON_Delete(c);
    return text;
}

/* Writes the generated tokenizer.json and tokenizer_config.json. */
static ferry_status write_tokenizer(const synth_plan *pl, synth_files *f)
{
    synth_bpe b;
    sbuf o = {0};
    char *config = NULL;
    const char *tmp;
    ferry_status st = bpe_build(&b, pl->n_bpe);
    if (st)
        goto fail;
    if ((st = tokenizer_json(pl, &b, &o)) || (st = files_add(f, "tokenizer.json", &tmp)) ||
        (st = write_small_file(tmp, o.s, o.len)))
        goto fail;
    if (!(config = tokenizer_config_json(pl))) {
        st = ferry_fail(FERRY_ERR_NOMEM, "out of memory for tokenizer_config.json");
        goto fail;
    }
    if ((st = files_add(f, "tokenizer_config.json", &tmp)))
        goto fail;
    st = write_small_file(tmp, config, strlen(config));
fail:
    free(config);
    free(o.s);
    bpe_free(&b);
    return st;
}

/* ---- config.json -------------------------------------------------------------------------- */

static int cmp_keys(const void *a, const void *b)
{
    return strcmp((*(cJSON *const *)a)->string, (*(cJSON *const *)b)->string);
}

/* Sorts o's keys as transformers writes config.json (sort_keys). */
static ferry_status sort_keys(cJSON *o)
{
    int n = cJSON_GetArraySize(o), i = 0;
    cJSON **items = malloc((size_t)(n > 0 ? n : 1) * sizeof *items);
    if (!items)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for config.json");
    while (o->child)
        items[i++] = cJSON_DetachItemViaPointer(o, o->child);
    qsort(items, (size_t)n, sizeof *items, cmp_keys);
    for (i = 0; i < n; i++)
        cJSON_AddItemToArray(o, items[i]);
    free(items);
    return FERRY_OK;
}

/* Mixtral's config.json, as ferry synth has always written it. */
static void mixtral_config(const synth_plan *pl, cJSON *c)
{
    const ferry_synth_params *p = &pl->p;
    cJSON *arch = cJSON_AddArrayToObject(c, "architectures");
    if (arch)
        cJSON_AddItemToArray(arch, cJSON_CreateString(pl->arch->architecture));
    cJSON_AddStringToObject(c, "model_type", "mixtral");
    cJSON_AddNumberToObject(c, "attention_dropout", 0.0);
    if (pl->bos_id >= 0 && pl->bos_id < p->n_vocab)
        cJSON_AddNumberToObject(c, "bos_token_id", pl->bos_id);
    else
        cJSON_AddNullToObject(c, "bos_token_id");
    if (pl->eos_id >= 0 && pl->eos_id < p->n_vocab)
        cJSON_AddNumberToObject(c, "eos_token_id", pl->eos_id);
    else
        cJSON_AddNullToObject(c, "eos_token_id");
    if (p->head_dim && (int64_t)p->head_dim * p->n_heads != p->d_model)
        cJSON_AddNumberToObject(c, "head_dim", p->head_dim);
    cJSON_AddStringToObject(c, "hidden_act", "silu");
    cJSON_AddNumberToObject(c, "hidden_size", p->d_model);
    cJSON_AddNumberToObject(c, "initializer_range", 0.02);
    cJSON_AddNumberToObject(c, "intermediate_size", p->d_ff);
    cJSON_AddNumberToObject(c, "max_position_embeddings", p->max_positions);
    cJSON_AddNumberToObject(c, "num_attention_heads", p->n_heads);
    cJSON_AddNumberToObject(c, "num_experts_per_tok", p->n_experts_used);
    cJSON_AddNumberToObject(c, "num_hidden_layers", p->n_layers);
    cJSON_AddNumberToObject(c, "num_key_value_heads", p->n_kv_heads);
    cJSON_AddNumberToObject(c, "num_local_experts", p->n_experts);
    cJSON_AddBoolToObject(c, "output_router_logits", 0);
    cJSON_AddNumberToObject(c, "rms_norm_eps", p->rms_eps);
    cJSON_AddNumberToObject(c, "rope_theta", p->rope_theta);
    cJSON_AddNumberToObject(c, "router_aux_loss_coef", pl->fam->aux_loss);
    cJSON_AddNullToObject(c, "sliding_window");
    cJSON_AddBoolToObject(c, "tie_word_embeddings", p->tie_embeddings);
    cJSON_AddStringToObject(c, "torch_dtype", g_torch_dtypes[p->dtype]);
    cJSON_AddBoolToObject(c, "use_cache", 1);
    cJSON_AddNumberToObject(c, "vocab_size", p->n_vocab);
}

/* The other families' config.json: the keys their real one has (keys sorted afterwards). */
static void family_config(const synth_plan *pl, cJSON *c)
{
    const ferry_synth_params *p = &pl->p;
    const ferry_arch *a = pl->arch;
    const synth_family *fam = pl->fam;
    cJSON *arch = cJSON_AddArrayToObject(c, "architectures");
    if (arch)
        cJSON_AddItemToArray(arch, cJSON_CreateString(a->architecture));
    cJSON_AddStringToObject(c, "model_type", a->model_type);
    if (a->bias == FERRY_BIAS_CONFIG_ALL)
        cJSON_AddBoolToObject(c, "attention_bias", p->attention_bias);
    cJSON_AddNumberToObject(c, "attention_dropout", 0.0);
    if (fam->writes_bos && pl->bos_id >= 0 && pl->bos_id < p->n_vocab)
        cJSON_AddNumberToObject(c, "bos_token_id", pl->bos_id);
    else if (fam->writes_bos)
        cJSON_AddNullToObject(c, "bos_token_id");
    if (a->clip_qkv && p->clip_qkv > 0)
        cJSON_AddNumberToObject(c, "clip_qkv", p->clip_qkv);
    else if (a->clip_qkv)
        cJSON_AddNullToObject(c, "clip_qkv");
    if (pl->eos_id >= 0 && pl->eos_id < p->n_vocab)
        cJSON_AddNumberToObject(c, "eos_token_id", pl->eos_id);
    else
        cJSON_AddNullToObject(c, "eos_token_id");
    if (fam->writes_head_dim == 1)
        cJSON_AddNumberToObject(c, "head_dim", pl->head_dim);
    cJSON_AddStringToObject(c, "hidden_act", "silu");
    cJSON_AddNumberToObject(c, "hidden_size", p->d_model);
    cJSON_AddNumberToObject(c, "initializer_range", 0.02);
    cJSON_AddNumberToObject(c, a->key_expert_ff, p->d_ff);
    cJSON_AddNumberToObject(c, "max_position_embeddings", p->max_positions);
    cJSON_AddBoolToObject(c, "norm_topk_prob", p->norm_topk_prob);
    cJSON_AddNumberToObject(c, "num_attention_heads", p->n_heads);
    cJSON_AddNumberToObject(c, a->key_n_experts, p->n_experts);
    cJSON_AddNumberToObject(c, "num_experts_per_tok", p->n_experts_used);
    cJSON_AddNumberToObject(c, "num_hidden_layers", p->n_layers);
    cJSON_AddNumberToObject(c, "num_key_value_heads", p->n_kv_heads);
    cJSON_AddBoolToObject(c, "output_router_logits", 0);
    if (fam->pad_token_id >= 0 && fam->pad_token_id < p->n_vocab)
        cJSON_AddNumberToObject(c, "pad_token_id", fam->pad_token_id);
    cJSON_AddNumberToObject(c, "rms_norm_eps", p->rms_eps);
    if (fam->writes_rope_scaling)
        cJSON_AddNullToObject(c, "rope_scaling");
    cJSON_AddNumberToObject(c, "rope_theta", p->rope_theta);
    cJSON_AddNumberToObject(c, "router_aux_loss_coef", fam->aux_loss);
    cJSON_AddBoolToObject(c, "tie_word_embeddings", p->tie_embeddings);
    cJSON_AddStringToObject(c, "torch_dtype", g_torch_dtypes[p->dtype]);
    cJSON_AddBoolToObject(c, "use_cache", 1);
    cJSON_AddNumberToObject(c, "vocab_size", p->n_vocab);
    if (a->key_dense_ff) { /* Qwen */
        cJSON_AddNumberToObject(c, "decoder_sparse_step", 1);
        cJSON_AddNumberToObject(c, "intermediate_size", p->d_ff_dense);
        int32_t window = fam->max_window_layers ? fam->max_window_layers : p->n_layers;
        cJSON_AddNumberToObject(c, "max_window_layers", window < p->n_layers ? window
                                                                             : p->n_layers);
        if (fam->writes_empty_mlp_only || p->n_dense_layers > 0) {
            cJSON *only = cJSON_AddArrayToObject(c, "mlp_only_layers");
            for (int32_t l = 0; l < p->n_layers && only; l++)
                if (pl->dense[l])
                    cJSON_AddItemToArray(only, cJSON_CreateNumber(l));
        }
        if (fam->sliding_window)
            cJSON_AddNumberToObject(c, "sliding_window", fam->sliding_window);
        else
            cJSON_AddNullToObject(c, "sliding_window");
        cJSON_AddBoolToObject(c, "use_sliding_window", 0);
    }
    if (a->key_shared_ff)
        cJSON_AddNumberToObject(c, a->key_shared_ff, p->d_ff_shared);
}

static ferry_status write_config(const synth_plan *pl, synth_files *f)
{
    const ferry_synth_params *p = &pl->p;
    ferry_status st = FERRY_OK;
    char *text = NULL;
    cJSON *c = cJSON_CreateObject();
    if (!c)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for config.json");
    if (!strcmp(pl->arch->model_type, "mixtral")) {
        mixtral_config(pl, c);
    } else {
        family_config(pl, c);
        if ((st = sort_keys(c)))
            goto fail;
    }
    /* Says the weights are random (and how to make them again); loaders ignore it. */
    cJSON *synth = cJSON_AddObjectToObject(c, "ferry_synth");
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)p->seed);
    if (synth) {
        cJSON_AddStringToObject(synth, "weights", "random");
        cJSON_AddStringToObject(synth, "seed", seed);
    }
    if (!(text = cJSON_Print(c))) {
        st = ferry_fail(FERRY_ERR_NOMEM, "out of memory for config.json");
        goto fail;
    }
    const char *tmp;
    if (!(st = files_add(f, "config.json", &tmp)))
        st = write_small_file(tmp, text, strlen(text));
fail:
    free(text);
    cJSON_Delete(c);
    return st;
}

static ferry_status write_index(const synth_plan *pl, synth_files *f)
{
    sbuf b = {0};
    sb_printf(&b, "{\n  \"metadata\": {\n    \"total_size\": %llu\n  },\n  \"weight_map\": {",
              (unsigned long long)pl->tensor_bytes);
    for (int32_t i = 0; i < pl->n_tensors; i++)
        sb_printf(&b, "%s\n    \"%s\": \"%s\"", i ? "," : "", pl->tensors[i].name,
                  pl->shards[pl->tensors[i].shard].name);
    sb_printf(&b, "\n  }\n}\n");
    if (b.failed) {
        free(b.s);
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for the index");
    }
    const char *tmp;
    ferry_status st = files_add(f, "model.safetensors.index.json", &tmp);
    if (!st)
        st = write_small_file(tmp, b.s, b.len);
    free(b.s);
    return st;
}

/* Removes the temporaries a killed ferry synth left in out_dir (every entry: the caller
 * checked), saying so in one line. */
static ferry_status remove_leftovers(const char *out_dir, int32_t n, int64_t writer)
{
    DIR *d = opendir(out_dir);
    if (!d)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot list: %s", out_dir, strerror(errno));
    const struct dirent *e;
    ferry_status st = FERRY_OK;
    while (!st && (e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        char *path = join(out_dir, e->d_name, "");
        if (!path)
            st = ferry_fail(FERRY_ERR_NOMEM, "out of memory");
        else if (unlink(path) != 0 && errno != ENOENT)
            st = ferry_fail(FERRY_ERR_IO, "%s: cannot remove: %s", path, strerror(errno));
        free(path);
    }
    closedir(d);
    if (!st)
        ferry_log(FERRY_LOG_WARN, "%s held only the temporary files of an interrupted ferry "
                  "synth (process %lld, no longer running): removed %d, starting over", out_dir,
                  (long long)writer, (int)n);
    return st;
}

/* out_dir must be an empty folder, or not exist (then it is made), or hold only the
 * temporaries ("NAME.<id>.tmp") of writers no longer running: an interrupted run's, removed. */
static ferry_status prepare_dir(const char *out_dir, synth_files *f)
{
    struct stat sb;
    if (stat(out_dir, &sb) != 0) {
        if (errno != ENOENT)
            return ferry_fail(FERRY_ERR_IO, "%s: cannot stat: %s", out_dir, strerror(errno));
        if (mkdir(out_dir, 0755) != 0)
            return ferry_fail(FERRY_ERR_IO, "%s: cannot create the folder: %s", out_dir,
                              strerror(errno));
        f->created_dir = 1;
        return FERRY_OK;
    }
    if (!S_ISDIR(sb.st_mode))
        return ferry_fail(FERRY_ERR_INVALID, "%s exists and is not a folder; ferry synth writes "
                          "into a new or empty folder", out_dir);
    DIR *d = opendir(out_dir);
    if (!d)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot list: %s", out_dir, strerror(errno));
    const struct dirent *e;
    char first[256] = "", live[256] = "";
    int32_t n_leftovers = 0;
    int64_t writer = 0, live_writer = 0, self = gettid();
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        int64_t id = ferry_temp_parse(e->d_name, NULL);
        if (id > 0 && id != self && ferry_temp_owner_alive(id)) {
            snprintf(live, sizeof live, "%s", e->d_name);
            live_writer = id;
        } else if (id > 0) {
            n_leftovers++;
            writer = id;
        } else if (!first[0]) {
            snprintf(first, sizeof first, "%s", e->d_name);
        }
    }
    closedir(d);
    if (live[0])
        return ferry_fail(FERRY_ERR_INVALID, "%s is being written by process %lld (it holds its "
                          "temporary %s); ferry synth writes into a new or empty folder",
                          out_dir, (long long)live_writer, live);
    if (first[0]) {
        char quoted[600] = "";
        if (ferry_temp_parse(first, NULL) == 0) { /* an older ferry's "NAME.tmp" */
            char *path = join(out_dir, first, "");
            if (path)
                ferry_temp_shell_quote(path, quoted, sizeof quoted);
            free(path);
        }
        return ferry_fail(FERRY_ERR_INVALID, "%s is not empty (it holds %s%s%s); ferry synth "
                          "writes into a new or empty folder", out_dir, first,
                          quoted[0] ? ", a temporary file an older ferry left: rm -f " : "",
                          quoted);
    }
    if (n_leftovers)
        return remove_leftovers(out_dir, n_leftovers, writer);
    return FERRY_OK;
}

/* ---- the parallel writer ------------------------------------------------------------------ */

typedef struct {
    const synth_plan *pl;
    const int *fds;           /* (n_shards) */
    char *const *tmp_paths;   /* (n_shards) */
    synth_worker *workers;    /* (n_threads) */
    atomic_llong next_chunk;
    atomic_ullong bytes_done;
    atomic_int failed;
    pthread_mutex_t mu;       /* guards what follows */
    ferry_status status;
    char error[1024];
    uint64_t reported;        /* bytes last passed to the progress callback */
} synth_job;

static void job_fail(synth_job *j, ferry_status st)
{
    pthread_mutex_lock(&j->mu);
    if (j->status == FERRY_OK) {
        j->status = st;
        snprintf(j->error, sizeof j->error, "%s", ferry_last_error());
    }
    pthread_mutex_unlock(&j->mu);
    atomic_store(&j->failed, 1);
}

/* To the params' callback, and to the process-wide one short of the total: that one ends
 * after the fsyncs (write_shards). */
static void report_progress(synth_job *j, uint64_t total)
{
    pthread_mutex_lock(&j->mu);
    uint64_t now = atomic_load(&j->bytes_done);
    if (now > j->reported) {
        j->reported = now;
        if (j->pl->p.progress)
            j->pl->p.progress(now, total, j->pl->p.progress_user);
        if (now < total)
            ferry_progress_report("writing the checkpoint", now, total, "bytes");
    }
    pthread_mutex_unlock(&j->mu);
}

/* Task k: thread buffer k; claims chunks until none are left or a write failed. */
static void write_task(void *arg, int32_t k)
{
    synth_job *j = arg;
    const synth_plan *pl = j->pl;
    const uint64_t total = pl->tensor_bytes, step = total / 256 + 1;
    while (!atomic_load(&j->failed)) {
        long long c = atomic_fetch_add(&j->next_chunk, 1);
        if (c >= pl->n_chunks)
            return;
        const synth_chunk *ch = &pl->chunks[c];
        const synth_tensor *t = &pl->tensors[ch->tensor];
        fill_chunk(t, ch->first, ch->count, pl->p.dtype, &j->workers[k], j->workers[k].buf);
        uint64_t bytes = ch->count * pl->elem_bytes;
        uint64_t at = pl->shards[t->shard].header_bytes + t->offset + ch->first * pl->elem_bytes;
        ferry_status st = ferry_pwrite_all(j->fds[t->shard], j->tmp_paths[t->shard],
                                           j->workers[k].buf, bytes, at);
        if (st) {
            job_fail(j, st);
            return;
        }
        uint64_t before = atomic_fetch_add(&j->bytes_done, bytes);
        if (before / step != (before + bytes) / step)
            report_progress(j, total);
    }
}

static void sync_task(void *arg, int32_t s)
{
    synth_job *j = arg;
    if (fsync(j->fds[s]) != 0)
        job_fail(j, ferry_fail(FERRY_ERR_IO, "%s: fsync failed: %s", j->tmp_paths[s],
                               strerror(errno)));
}

/* Creates every shard's temporary file with its size reserved and its header written. */
static ferry_status open_shards(const synth_plan *pl, synth_files *f, int *fds, char **tmps)
{
    for (int32_t s = 0; s < pl->n_shards; s++) {
        const synth_shard *sh = &pl->shards[s];
        const char *tmp;
        TRY(files_add(f, sh->name, &tmp));
        tmps[s] = (char *)tmp;
        fds[s] = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fds[s] < 0)
            return ferry_fail(FERRY_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
        off_t size = (off_t)(sh->header_bytes + sh->data_bytes);
        /* Reserving the blocks makes a full disk fail here rather than mid-write;
         * file systems without fallocate just get the size. */
        if (fallocate(fds[s], 0, 0, size) != 0) {
            if (errno == ENOSPC)
                return ferry_fail(FERRY_ERR_IO, "%s: no space left for its %llu bytes", tmp,
                                  (unsigned long long)size);
            if (ftruncate(fds[s], size) != 0)
                return ferry_fail(FERRY_ERR_IO, "%s: cannot size to %llu bytes: %s", tmp,
                                  (unsigned long long)size, strerror(errno));
        }
        TRY(ferry_pwrite_all(fds[s], tmp, sh->header, sh->header_bytes, 0));
    }
    return FERRY_OK;
}

static ferry_status write_shards(const synth_plan *pl, synth_files *f)
{
    ferry_status st = FERRY_OK;
    ferry_pool *pool = NULL;
    int *fds = malloc((size_t)pl->n_shards * sizeof *fds);
    char **tmps = calloc((size_t)pl->n_shards, sizeof *tmps);
    synth_worker *workers = calloc((size_t)pl->n_threads, sizeof *workers);
    synth_job j = {.pl = pl, .fds = fds, .tmp_paths = tmps, .workers = workers};
    int mu_ready = 0;
    if (!fds || !tmps || !workers) {
        st = ferry_fail(FERRY_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (int32_t s = 0; s < pl->n_shards; s++)
        fds[s] = -1;
    size_t buf_bytes = (size_t)(pl->max_chunk_bytes + 4095) / 4096 * 4096;
    for (int32_t k = 0; k < pl->n_threads; k++) {
        workers[k].table_a = -1;
        workers[k].buf = aligned_alloc(4096, buf_bytes ? buf_bytes : 4096);
        workers[k].table = malloc(65536 * pl->elem_bytes);
        if (!workers[k].buf || !workers[k].table) {
            st = ferry_fail(FERRY_ERR_NOMEM, "out of memory for %d write buffers of %zu bytes",
                            (int)pl->n_threads, buf_bytes);
            goto done;
        }
    }
    if ((st = open_shards(pl, f, fds, tmps)))
        goto done;
    if ((st = ferry_pool_create(pl->n_threads, &pool)))
        goto done;
    if (pthread_mutex_init(&j.mu, NULL) != 0) {
        st = ferry_fail(FERRY_ERR_NOMEM, "cannot create a mutex");
        goto done;
    }
    mu_ready = 1;
    atomic_init(&j.next_chunk, 0);
    atomic_init(&j.bytes_done, 0);
    atomic_init(&j.failed, 0);
    const uint64_t total = pl->tensor_bytes;
    if (total)
        ferry_progress_report("writing the checkpoint", 0, total, "bytes");
    ferry_pool_run(pool, pl->n_threads, write_task, &j);
    if (!atomic_load(&j.failed)) {
        report_progress(&j, total);
        ferry_pool_run(pool, pl->n_shards, sync_task, &j);
    }
    if (total)
        ferry_progress_report("writing the checkpoint", atomic_load(&j.bytes_done),
                              atomic_load(&j.failed) ? 0 : total, "bytes");
    if (atomic_load(&j.failed))
        st = ferry_fail(j.status, "%s", j.error);
done:
    ferry_pool_destroy(pool);
    if (mu_ready)
        pthread_mutex_destroy(&j.mu);
    if (fds)
        for (int32_t s = 0; s < pl->n_shards; s++)
            if (fds[s] >= 0 && close(fds[s]) != 0 && !st)
                st = ferry_fail(FERRY_ERR_IO, "%s: close failed: %s", tmps[s], strerror(errno));
    if (workers)
        for (int32_t k = 0; k < pl->n_threads; k++) {
            free(workers[k].buf);
            free(workers[k].table);
        }
    free(workers);
    free(tmps);
    free(fds);
    return st;
}

static ferry_status check_space(const synth_plan *pl, const char *out_dir)
{
    struct statvfs vs;
    if (statvfs(out_dir, &vs) != 0)
        return FERRY_OK; /* unknown: fallocate still catches a full disk */
    uint64_t free_bytes = (uint64_t)vs.f_bavail * (uint64_t)vs.f_frsize;
    if (free_bytes < pl->total_bytes)
        return ferry_fail(FERRY_ERR_IO, "%s: the checkpoint needs %.2f GB, the file system has "
                          "%.2f GB free", out_dir, (double)pl->total_bytes / 1e9,
                          (double)free_bytes / 1e9);
    return FERRY_OK;
}

ferry_status ferry_synth(const ferry_synth_params *p, const char *out_dir)
{
    if (!p || !out_dir || !out_dir[0])
        return ferry_fail(FERRY_ERR_INVALID, "ferry_synth: NULL argument or empty folder name");
    synth_plan pl;
    ferry_status st = plan_build(p, &pl);
    if (st)
        return st;
    synth_files f = {0};
    f.dir = strdup(out_dir);
    if (!f.dir) {
        st = ferry_fail(FERRY_ERR_NOMEM, "out of memory");
        goto done;
    }
    if ((st = prepare_dir(out_dir, &f)) || (st = check_space(&pl, out_dir)) ||
        (st = pl.n_bpe ? write_tokenizer(&pl, &f) : copy_tokenizer(&pl, &f)) ||
        (st = write_config(&pl, &f)) ||
        (st = write_shards(&pl, &f)))
        goto done;
    if (pl.n_shards > 1 && (st = write_index(&pl, &f)))
        goto done;
    /* Everything is on disk under temporary names: commit in order, the file that makes
     * the folder a checkpoint (the last one: the index, or the single model.safetensors)
     * last. */
    for (int32_t i = 0; i < f.n; i++)
        if ((st = files_commit(&f, i)))
            goto done;
    int dfd = open(out_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) { /* best effort: the renames themselves durable */
        (void)fsync(dfd);
        close(dfd);
    }
done:
    files_finish(&f, st != FERRY_OK);
    plan_free(&pl);
    return st;
}
