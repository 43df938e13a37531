/*
 * engine/synth.c: synthetic checkpoints (ferry synth): a real model's shape, random
 * weights, written as a Hugging Face Mixtral checkpoint that ferry_model_open (and
 * transformers) load.
 *
 * What out_dir receives:
 *   config.json                           every field format/config.c reads, model_type
 *                                         "mixtral", torch_dtype, and "ferry_synth" (seed)
 *   model.safetensors                     when the tensors fit in one shard, else
 *   model-0000i-of-0000N.safetensors      shards of at most shard_bytes of tensors, and
 *   model.safetensors.index.json          { "metadata": { "total_size": tensor bytes },
 *                                           "weight_map": { name: shard, ... } }
 *   tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model
 *                                         copied from tokenizer_dir (the last three when
 *                                         present)
 * A shard is what format/safetensors.c validates: u64 header length N (little-endian),
 * N bytes of JSON padded with spaces to a multiple of 8 ({"__metadata__": {"format":
 * "pt"}, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}), then the tensors
 * back to back in header order, so every tensor starts aligned for its dtype. Tensors go
 * in model order (embedding, each layer's norms, attention, router and experts, final
 * norm, LM head); a shard is closed when the next tensor would take it past shard_bytes.
 *
 * Values: element i of the tensor called T takes 16 bits, lane i % 4, of splitmix64's
 * output r = mix(key + (i / 4 + 1) * golden), key = XXH3(T, seed), and is
 * (bits + 0.5) * 2a / 65536 - a rounded to the dtype: a counter-based generator, so any
 * chunk of any tensor is computed without the others, and a tensor's values depend on the
 * seed and its name only (a 2-layer and a 32-layer model share layer 0). 16 bits are more
 * than bf16 and f16 hold, and let a thread look the 65536 values up in a table instead of
 * converting each. a = sqrt(3 / columns) gives standard deviation 1/sqrt(fan_in), so
 * activations keep unit scale through the layers; norm weights are 1.
 *
 * Writing: the tensors are cut into chunks of at most SYNTH_CHUNK_BYTES; every thread of
 * a pool claims chunks in order from one atomic counter, converts them into its own
 * buffer and pwrites the buffer at the chunk's place. Memory is one buffer per thread,
 * whatever the model's size. Every file is written as "NAME.tmp" (shards fallocated first,
 * so a full disk fails before the data), fsynced, then renamed: tokenizer files,
 * config.json, the shards, and last the file that makes the folder a checkpoint
 * (model.safetensors, or the index). A failure removes every file written and the folder
 * when this call created it.
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

static const char *const g_dtype_names[3] = {"BF16", "F16", "F32"};
static const char *const g_torch_dtypes[3] = {"bfloat16", "float16", "float32"};
/* The tokenizer files copied, the first required. */
static const char *const g_tokenizer_files[4] = {"tokenizer.json", "tokenizer_config.json",
                                                 "special_tokens_map.json", "tokenizer.model"};

typedef struct {
    char name[SYNTH_NAME_CAP];
    int32_t n_dims;   /* 1 (a norm) or 2 */
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

ferry_status ferry_synth_preset(const char *name, ferry_synth_params *p)
{
    if (!name || !p)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_synth_preset: NULL argument");
    if (!strcmp(name, "mixtral-8x7b")) {
        p->n_vocab = 32000;
        p->d_model = 4096;
        p->d_ff = 14336;
        p->n_layers = 32;
        p->n_heads = 32;
        p->n_kv_heads = 8;
        p->n_experts = 8;
        p->n_experts_used = 2;
        p->max_positions = 32768;
        p->rope_theta = 1e6;
        p->rms_eps = 1e-5;
    } else if (!strcmp(name, "tiny")) { /* models/tiny-moe-code/config.json */
        p->n_vocab = 4096;
        p->d_model = 192;
        p->d_ff = 384;
        p->n_layers = 6;
        p->n_heads = 6;
        p->n_kv_heads = 2;
        p->n_experts = 8;
        p->n_experts_used = 2;
        p->max_positions = 4096;
        p->rope_theta = 1e6;
        p->rms_eps = 1e-5;
    } else {
        return ferry_fail(FERRY_ERR_INVALID, "unknown preset '%s' (known: mixtral-8x7b, tiny)",
                          name);
    }
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

/* Everything about p but the tokenizer and the output folder. */
static ferry_status check_params(const ferry_synth_params *p)
{
    const int64_t dim = FERRY_CONFIG_MAX_DIM, count = FERRY_CONFIG_MAX_COUNT;
    TRY(check_count("vocab (vocab_size)", p->n_vocab, FERRY_CONFIG_MAX_VOCAB));
    TRY(check_count("hidden (hidden_size)", p->d_model, dim));
    TRY(check_count("intermediate (intermediate_size)", p->d_ff, dim));
    TRY(check_count("layers (num_hidden_layers)", p->n_layers, count));
    TRY(check_count("heads (num_attention_heads)", p->n_heads, count));
    TRY(check_count("kv heads (num_key_value_heads)", p->n_kv_heads, count));
    TRY(check_count("experts (num_local_experts)", p->n_experts, FERRY_CONFIG_MAX_EXPERTS));
    TRY(check_count("top-k (num_experts_per_tok)", p->n_experts_used, count));
    TRY(check_count("max positions (max_position_embeddings)", p->max_positions,
                    FERRY_CONFIG_MAX_VOCAB));
    if (p->d_model % p->n_heads != 0)
        return ferry_fail(FERRY_ERR_INVALID, "hidden (hidden_size) %d is not a multiple of heads "
                          "(num_attention_heads) %d", (int)p->d_model, (int)p->n_heads);
    if ((p->d_model / p->n_heads) % 2 != 0)
        return ferry_fail(FERRY_ERR_INVALID, "head dimension hidden / heads = %d / %d = %d is "
                          "odd; RoPE rotates pairs", (int)p->d_model, (int)p->n_heads,
                          (int)(p->d_model / p->n_heads));
    if (p->n_heads % p->n_kv_heads != 0)
        return ferry_fail(FERRY_ERR_INVALID, "heads (num_attention_heads) %d is not a multiple of "
                          "kv heads (num_key_value_heads) %d", (int)p->n_heads,
                          (int)p->n_kv_heads);
    if (p->n_experts_used > p->n_experts)
        return ferry_fail(FERRY_ERR_INVALID, "top-k (num_experts_per_tok) %d exceeds experts "
                          "(num_local_experts) %d", (int)p->n_experts_used, (int)p->n_experts);
    if (!(p->rope_theta > 0) || !isfinite((float)p->rope_theta))
        return ferry_fail(FERRY_ERR_INVALID, "rope theta %g must be a positive float",
                          p->rope_theta);
    if (!((float)p->rms_eps > 0) || !isfinite((float)p->rms_eps))
        return ferry_fail(FERRY_ERR_INVALID, "rms eps %g must be a positive float", p->rms_eps);
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

/* Checks the tokenizer folder against the vocab size and reads its BOS/EOS ids. */
static ferry_status check_tokenizer(const ferry_synth_params *p, int32_t *bos, int32_t *eos)
{
    struct stat sb;
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

static void plan_free(synth_plan *pl)
{
    if (pl->shards)
        for (int32_t i = 0; i < pl->n_shards; i++)
            free(pl->shards[i].header);
    free(pl->shards);
    free(pl->tensors);
    free(pl->chunks);
    memset(pl, 0, sizeof *pl);
}

/* Appends a tensor: a norm of d0 ones (n_dims 1) or a (d0, d1) matrix. */
static void add_tensor(synth_plan *pl, const char *name, int32_t n_dims, int64_t d0, int64_t d1)
{
    synth_tensor *t = &pl->tensors[pl->n_tensors++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->n_dims = n_dims;
    t->shape[0] = d0;
    t->shape[1] = n_dims == 2 ? d1 : 0;
    t->n_elems = (uint64_t)d0 * (uint64_t)(n_dims == 2 ? d1 : 1);
    t->half_width = n_dims == 2 ? (float)sqrt(3.0 / (double)d1) : 0.0f;
    t->key = XXH3_64bits_withSeed(name, strlen(name), pl->p.seed);
}

static ferry_status plan_tensors(synth_plan *pl)
{
    const ferry_synth_params *p = &pl->p;
    int64_t n = 3 + (int64_t)p->n_layers * (7 + 3 * (int64_t)p->n_experts);
    if (n > SYNTH_MAX_TENSORS)
        return ferry_fail(FERRY_ERR_INVALID, "%d layers x %d experts make %lld tensors, more "
                          "than the %d ferry synth writes", (int)p->n_layers, (int)p->n_experts,
                          (long long)n, SYNTH_MAX_TENSORS);
    pl->tensors = calloc((size_t)n, sizeof *pl->tensors);
    if (!pl->tensors)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for %lld tensor records", (long long)n);
    pl->cap_tensors = (int32_t)n;
    const int64_t d = p->d_model, ff = p->d_ff, V = p->n_vocab;
    const int64_t head_dim = d / p->n_heads, kv = (int64_t)p->n_kv_heads * head_dim;
    char name[SYNTH_NAME_CAP];
    add_tensor(pl, "model.embed_tokens.weight", 2, V, d);
    for (int32_t l = 0; l < p->n_layers; l++) {
#define LAYER(suffix, nd, a, b)                                                                 \
    do {                                                                                        \
        snprintf(name, sizeof name, "model.layers.%d.%s", (int)l, suffix);                      \
        add_tensor(pl, name, nd, a, b);                                                         \
    } while (0)
        LAYER("input_layernorm.weight", 1, d, 0);
        LAYER("self_attn.q_proj.weight", 2, d, d);
        LAYER("self_attn.k_proj.weight", 2, kv, d);
        LAYER("self_attn.v_proj.weight", 2, kv, d);
        LAYER("self_attn.o_proj.weight", 2, d, d);
        LAYER("post_attention_layernorm.weight", 1, d, 0);
        LAYER("block_sparse_moe.gate.weight", 2, p->n_experts, d);
        for (int32_t e = 0; e < p->n_experts; e++) {
            char sfx[64];
            snprintf(sfx, sizeof sfx, "block_sparse_moe.experts.%d.w1.weight", (int)e);
            LAYER(sfx, 2, ff, d);
            snprintf(sfx, sizeof sfx, "block_sparse_moe.experts.%d.w2.weight", (int)e);
            LAYER(sfx, 2, d, ff);
            snprintf(sfx, sizeof sfx, "block_sparse_moe.experts.%d.w3.weight", (int)e);
            LAYER(sfx, 2, ff, d);
        }
#undef LAYER
    }
    add_tensor(pl, "model.norm.weight", 1, d, 0);
    add_tensor(pl, "lm_head.weight", 2, V, d);
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
    if ((st = check_params(p)))
        return st;
    pl->p = *p;
    pl->elem_bytes = p->dtype == FERRY_SYNTH_F32 ? 4 : 2;
    if ((st = check_tokenizer(p, &pl->bos_id, &pl->eos_id)) || (st = plan_tensors(pl)) ||
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

/* The files this call has made, to remove on failure: each as its temporary name until
 * renamed, then as its final name. */
typedef struct {
    char *dir;
    int created_dir;
    char **paths; /* dir/NAME.tmp */
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

/* Records dir/name.tmp as made by this call; *tmp borrows the path. */
static ferry_status files_add(synth_files *f, const char *name, const char **tmp)
{
    if (f->n == f->cap) {
        int32_t cap = f->cap ? f->cap * 2 : 16;
        char **paths = realloc(f->paths, (size_t)cap * sizeof *paths);
        if (!paths)
            return ferry_fail(FERRY_ERR_NOMEM, "out of memory");
        f->paths = paths;
        int *renamed = realloc(f->renamed, (size_t)cap * sizeof *renamed);
        if (!renamed)
            return ferry_fail(FERRY_ERR_NOMEM, "out of memory");
        f->renamed = renamed;
        f->cap = cap;
    }
    char *p = join(f->dir, name, ".tmp");
    if (!p)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory");
    f->paths[f->n] = p;
    f->renamed[f->n] = 0;
    f->n++;
    *tmp = p;
    return FERRY_OK;
}

/* Renames file i from NAME.tmp to NAME. */
static ferry_status files_commit(synth_files *f, int32_t i)
{
    char *path = f->paths[i];
    size_t n = strlen(path);
    char *final = strndup(path, n - 4);
    if (!final)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory");
    if (rename(path, final) != 0) {
        ferry_status st = ferry_fail(FERRY_ERR_IO, "%s: cannot rename to %s: %s", path, final,
                                     strerror(errno));
        free(final);
        return st;
    }
    free(path);
    f->paths[i] = final;
    f->renamed[i] = 1;
    return FERRY_OK;
}

/* Removes what was made (when `undo`) and frees the records. */
static void files_finish(synth_files *f, int undo)
{
    for (int32_t i = 0; i < f->n; i++) {
        if (undo)
            unlink(f->paths[i]);
        free(f->paths[i]);
    }
    if (undo && f->created_dir)
        rmdir(f->dir);
    free(f->paths);
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
        free(src);
        if (st || missing)
            return st;
        const char *tmp;
        if (!(st = files_add(f, g_tokenizer_files[k], &tmp)))
            st = write_small_file(tmp, data, len);
        free(data);
        if (st)
            return st;
    }
    return FERRY_OK;
}

static ferry_status write_config(const synth_plan *pl, synth_files *f)
{
    const ferry_synth_params *p = &pl->p;
    cJSON *c = cJSON_CreateObject();
    cJSON *arch = cJSON_AddArrayToObject(c, "architectures");
    if (arch)
        cJSON_AddItemToArray(arch, cJSON_CreateString("MixtralForCausalLM"));
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
    cJSON_AddNumberToObject(c, "router_aux_loss_coef", 0.02);
    cJSON_AddNullToObject(c, "sliding_window");
    cJSON_AddBoolToObject(c, "tie_word_embeddings", 0);
    cJSON_AddStringToObject(c, "torch_dtype", g_torch_dtypes[p->dtype]);
    cJSON_AddBoolToObject(c, "use_cache", 1);
    cJSON_AddNumberToObject(c, "vocab_size", p->n_vocab);
    /* Says the weights are random (and how to make them again); loaders ignore it. */
    cJSON *synth = cJSON_AddObjectToObject(c, "ferry_synth");
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)p->seed);
    if (synth) {
        cJSON_AddStringToObject(synth, "weights", "random");
        cJSON_AddStringToObject(synth, "seed", seed);
    }
    char *text = cJSON_Print(c);
    cJSON_Delete(c);
    if (!text)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for config.json");
    const char *tmp;
    ferry_status st = files_add(f, "config.json", &tmp);
    if (!st)
        st = write_small_file(tmp, text, strlen(text));
    free(text);
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

/* out_dir must be an empty folder, or not exist (then it is made). */
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
    char first[256] = "";
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            snprintf(first, sizeof first, "%s", e->d_name);
            break;
        }
    closedir(d);
    if (first[0])
        return ferry_fail(FERRY_ERR_INVALID, "%s is not empty (it holds %s); ferry synth writes "
                          "into a new or empty folder", out_dir, first);
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

static void report_progress(synth_job *j, uint64_t total)
{
    pthread_mutex_lock(&j->mu);
    uint64_t now = atomic_load(&j->bytes_done);
    if (now > j->reported) {
        j->reported = now;
        j->pl->p.progress(now, total, j->pl->p.progress_user);
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
        ferry_status st = ferry_pwrite_all(j->fds[t->shard], j->tmp_paths[t->shard], j->workers[k].buf,
                                    bytes, at);
        if (st) {
            job_fail(j, st);
            return;
        }
        uint64_t before = atomic_fetch_add(&j->bytes_done, bytes);
        if (pl->p.progress && before / step != (before + bytes) / step)
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
    ferry_pool_run(pool, pl->n_threads, write_task, &j);
    if (!atomic_load(&j.failed)) {
        if (pl->p.progress)
            report_progress(&j, pl->tensor_bytes);
        ferry_pool_run(pool, pl->n_shards, sync_task, &j);
    }
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
        (st = copy_tokenizer(&pl, &f)) || (st = write_config(&pl, &f)) ||
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
