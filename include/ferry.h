/*
 * ferry.h: the public C API of libferry, an inference engine for Mixture-of-Experts
 * language models (Hugging Face checkpoints of Mixtral, Qwen3-MoE, Qwen2-MoE and OLMoE).
 *
 * This is the only header a user includes. Every object is an opaque handle; every
 * fallible call returns a ferry_status and, on failure, leaves a message that
 * ferry_last_error() returns (thread-local: read it on the thread that made the call).
 * Out-parameters are written only on success. Pointers passed in are borrowed unless
 * a comment says "takes ownership".
 *
 * Threads: a ferry_model is immutable once open and may be shared by contexts on
 * different threads; a ferry_context is used by one thread at a time.
 */
#ifndef FERRY_H
#define FERRY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    FERRY_OK = 0,
    FERRY_ERR_NOMEM = 1,       /* an allocation failed */
    FERRY_ERR_IO = 2,          /* a file could not be opened, read or mapped */
    FERRY_ERR_FORMAT = 3,      /* a file is malformed: header, JSON, shapes, offsets */
    FERRY_ERR_INVALID = 4,     /* an argument or option is out of range */
    FERRY_ERR_DEVICE = 5,      /* the compute device failed */
    FERRY_ERR_UNSUPPORTED = 6, /* valid input that this build cannot handle */
} ferry_status;

/* The message of the last failure on this thread ("" if none). The string stays valid
 * until the next failing ferry call on this thread. Thread-safe. */
const char *ferry_last_error(void);

/* A constant name for a status code ("FERRY_ERR_FORMAT"). Thread-safe. */
const char *ferry_status_name(ferry_status s);

/* The library version, "MAJOR.MINOR.PATCH". */
const char *ferry_version(void);

/* Whether this build can run on a GPU: FERRY_OK and a description of CUDA device 0
 * ("NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB") in desc (when not NULL), else
 * FERRY_ERR_UNSUPPORTED (built without CUDA) or FERRY_ERR_DEVICE (no usable device), with
 * the reason in ferry_last_error(). Thread-safe. */
ferry_status ferry_cuda_probe(char *desc, size_t desc_len);

/* ---- logging ---------------------------------------------------------------- */

typedef enum { FERRY_LOG_ERROR = 0, FERRY_LOG_WARN = 1, FERRY_LOG_INFO = 2, FERRY_LOG_DEBUG = 3 } ferry_log_level;
typedef void (*ferry_log_fn)(ferry_log_level level, const char *msg, void *user);

/* Sends library log lines at or below `level` to fn (NULL restores the default, which
 * writes to stderr). The library never prints anything else. Not thread-safe: call
 * before opening models. */
void ferry_set_log(ferry_log_level level, ferry_log_fn fn, void *user);

/* ---- progress and interruption -------------------------------------------------- */

/* Told how a long operation advances: loading a model ("loading the model", in layers),
 * copying the experts into the RAM tier or checking a pack ("copying experts", "checking the
 * pack", bytes), writing a packed expert file (ferry_pack_model, and the first NVMe run's
 * pack: "packing experts", bytes), ferry_synth ("writing the checkpoint", bytes),
 * ferry_perplexity ("computing perplexity", tokens) and ferry_trace_text ("tracing routing",
 * tokens). what and unit are string constants. An operation reports as it goes (from done 0
 * where it knows its total from the start; a pack's total is known after its first expert),
 * at a granularity that costs nothing next to its work, and ends with one call where
 * done == total (finished) or total == 0 (stopped by a failure). Calls come from the
 * thread doing the work (ferry_synth: any of its writer threads, never two at once). */
typedef void (*ferry_progress_fn)(void *user, const char *what, uint64_t done, uint64_t total,
                                  const char *unit);

/* Sends the progress of every long operation of the process to fn (NULL: to nobody, the
 * default); user goes back to it. The library itself never draws progress. Thread-safe: a
 * report in flight goes to the function set before it or after it, whole. */
void ferry_set_progress(ferry_progress_fn fn, void *user);

/* Removes the temporary files the library is writing at this moment (a packed expert file,
 * a synthetic checkpoint's files, a trace or statistics file: each is written as
 * "TARGET.<id>.tmp" and renamed over TARGET when complete), so a program stopped by a
 * signal leaves none behind; those writes then fail. Returns the count removed.
 * Async-signal-safe: meant for SIGINT and SIGTERM handlers (the ferry command's remove them,
 * then die of the signal). A temporary a killed process left is removed by the next write
 * of the same target, which logs that it did. */
int32_t ferry_remove_temporaries(void);

/* ---- model ------------------------------------------------------------------- */

typedef struct ferry_model ferry_model;

typedef enum { FERRY_OFFLOAD_RAM = 0, FERRY_OFFLOAD_NVME = 1 } ferry_offload_tier;
typedef enum {
    FERRY_CACHE_LRU = 0,       /* least recently used */
    FERRY_CACHE_LFU = 1,       /* least frequently used */
    FERRY_CACHE_LAYER_LRU = 2, /* a fixed share of slots per layer, LRU within it */
    FERRY_CACHE_PREDICTED = 3  /* evict what the routing predictor scores lowest */
} ferry_cache_policy_id;
/* What names the experts to prefetch: the experts each layer used in the previous step
 * (recency), the next layers' routers applied to the current hidden state (gate), fitted
 * routing statistics (stats, needs predictor_stats_path), or both (combined). */
typedef enum {
    FERRY_PREDICT_RECENCY = 0,
    FERRY_PREDICT_GATE = 1,
    FERRY_PREDICT_STATS = 2,
    FERRY_PREDICT_COMBINED = 3
} ferry_predict_id;
/* Which backend computes. AUTO: the CUDA backend when this build has it and a CUDA device
 * is usable, else the CPU backend (and the log says why); CPU: always the CPU reference
 * backend; CUDA: the GPU, and ferry_model_open fails (FERRY_ERR_UNSUPPORTED: built without
 * CUDA; FERRY_ERR_DEVICE: no usable device) when there is none. The CUDA backend uses
 * device 0 of those CUDA_VISIBLE_DEVICES leaves visible. The library reads no environment
 * variable for this: $FERRY_BACKEND is the ferry command's default only. */
typedef enum { FERRY_BACKEND_AUTO = 0, FERRY_BACKEND_CPU = 1, FERRY_BACKEND_CUDA = 2 } ferry_backend_id;
/* Where experts that are not in a device slot are computed (--hybrid).
 * AUTO: with offloading (gpu_mem_bytes > 0), each missing expert is either fetched into a
 * slot or computed on the CPU from host memory, whichever a cost model fed by rates measured
 * at start says finishes the layer sooner; both kinds of work run at once, and resident
 * experts run on the device meanwhile. Without offloading it changes nothing.
 * OFF: every missing expert is fetched.
 * CPU_EXPERTS: every expert is computed on the CPU from host memory (the checkpoint's
 * mapping), and the device holds only the dense weights (llama.cpp's --cpu-moe); no expert
 * slots; not combined with the NVMe tier.
 * The CPU computes experts with the CPU backend's kernels (exact float32), the device with its
 * own: on the CPU backend outputs are bit-identical across modes; on a GPU they agree within
 * the GPU's tolerance, and which experts the CPU takes can depend on timing. */
typedef enum {
    FERRY_HYBRID_AUTO = 0,
    FERRY_HYBRID_OFF = 1,
    FERRY_HYBRID_CPU_EXPERTS = 2
} ferry_hybrid_id;
/* The CPU kernels (--cpu-kernels): AUTO picks the fastest exact set this CPU runs (AVX-512,
 * else AVX2, else the reference loops). REFERENCE, AVX2 and AVX512 give bit-identical
 * results; AVX512BF16 rounds activations to bf16 inside the matmuls (faster for many tokens,
 * within 1e-2 of the others, like the GPU's batched path). A set the CPU lacks fails
 * ferry_model_open with FERRY_ERR_UNSUPPORTED. */
typedef enum {
    FERRY_CPU_KERNELS_AUTO = 0,
    FERRY_CPU_KERNELS_REFERENCE = 1,
    FERRY_CPU_KERNELS_AVX2 = 2,
    FERRY_CPU_KERNELS_AVX512 = 3,
    FERRY_CPU_KERNELS_AVX512BF16 = 4
} ferry_cpu_kernels_id;
/* How the NVMe tier reads: io_uring where the kernel allows it, else a pread thread pool. */
typedef enum { FERRY_READ_AUTO = 0, FERRY_READ_URING = 1, FERRY_READ_PREAD = 2 } ferry_reader_id;

typedef struct {
    int32_t n_threads; /* compute threads; 0 = one per physical core */
    int32_t backend;   /* ferry_backend_id */
    /* Expert offloading. gpu_mem_bytes = 0: everything resident, nothing offloaded. Else the
     * device budget: dense weights, KV cache and workspace are placed in it and the rest
     * becomes expert slots, a cache in front of the expert store. */
    uint64_t gpu_mem_bytes;
    int32_t offload;           /* ferry_offload_tier: where experts live */
    const char *pack_path;     /* a file written by ferry_pack_model: the experts come from
                                  it instead of the checkpoint, in every mode (a q8 or q4
                                  pack gives quantized experts, computed by kernels that
                                  dequantize as they read); checked against the model's
                                  shape and, unless the NVMe tier reads it, every expert's
                                  checksum at open. FERRY_OFFLOAD_NVME reads it from disk;
                                  NULL there: ferry writes one into its cache folder
                                  ($FERRY_CACHE_DIR, else $XDG_CACHE_HOME/ferry, else
                                  ~/.cache/ferry) when it is missing or older than the
                                  checkpoint, and logs that it does */
    uint64_t host_cache_bytes; /* FERRY_OFFLOAD_NVME: RAM cache in front of the disk; 0 = 1 GiB */
    int32_t reader;            /* FERRY_OFFLOAD_NVME: ferry_reader_id (io_uring or preads) */
    int32_t policy;            /* ferry_cache_policy_id */
    int32_t prefetch;          /* nonzero: fetch the experts the next layers will probably use
                                  while this one computes */
    int32_t predictor;         /* ferry_predict_id: what names those experts */
    const char *predictor_stats_path; /* stats and combined: the file of ferry predictor fit */
    int32_t lookahead;         /* predict and prefetch layers l+1 .. l+lookahead (1..3) */
    int32_t max_slots;         /* at most this many expert slots (0: what the budget holds) */
    int32_t hybrid;            /* ferry_hybrid_id */
    int32_t cpu_kernels;       /* ferry_cpu_kernels_id, for the CPU backend and the CPU's
                                  share of hybrid work */
    int32_t quant_dense;       /* ferry_pack_format for the dense matmul weights (attention
                                  projections, and the LM head unless tied to the
                                  embedding), quantized in memory at open:
                                  FERRY_PACK_AS_STORED (default) keeps the checkpoint's, Q8
                                  and Q4 as in packs (their columns must be multiples of
                                  32). Embeddings, norms and routers stay as stored. */
} ferry_model_params;

ferry_model_params ferry_model_params_default(void);

/* Opens a Hugging Face checkpoint directory of a family ferry runs (mixtral, qwen3_moe,
 * qwen2_moe, olmoe; format/arch.h): config.json, one
 * model.safetensors or shards listed in model.safetensors.index.json, tokenizer.json
 * (and tokenizer_config.json when present). Tensors are memory-mapped and validated
 * (offsets, sizes, dtypes, shapes against config.json) before use. On success *out owns
 * the model; free it with ferry_model_close. Returns FERRY_ERR_IO (missing or unreadable
 * file), FERRY_ERR_FORMAT (malformed file; the message names file and tensor or field),
 * FERRY_ERR_UNSUPPORTED (a valid checkpoint this build cannot run), FERRY_ERR_NOMEM,
 * FERRY_ERR_INVALID (NULL arguments). Thread-safe. */
ferry_status ferry_model_open(const char *dir, const ferry_model_params *p, ferry_model **out);

/* Frees the model. NULL-safe. Every context of the model must be freed first. */
void ferry_model_close(ferry_model *m);

/* How ferry_pack_model stores the expert weights. */
typedef enum {
    FERRY_PACK_AS_STORED = 0, /* the checkpoint's own dtype, bit for bit */
    FERRY_PACK_Q8 = 1,        /* groups of 32: f16 scale + 32 int8 (8.5 bits per weight) */
    FERRY_PACK_Q4 = 2         /* groups of 32: f16 scale + f16 minimum + 32 x 4 bits (5 bits) */
} ferry_pack_format;

typedef struct {
    int32_t format; /* ferry_pack_format */
} ferry_pack_params;

ferry_pack_params ferry_pack_params_default(void);

/* Writes the packed expert file of the checkpoint in model_dir to out_path (atomically):
 * a header with the model's shape and each expert's offset, size, dtypes and checksum,
 * then every expert's w1, w3, w2 contiguous and 4 KiB aligned, in p's format (Q8 and Q4
 * quantize each row's groups of 32 weights with their own scales, using every core; the
 * dense weights are not in the pack and stay as the checkpoint has them). p NULL: the
 * defaults (as stored). The pack serves ferry_model_params.pack_path. Returns the codes of
 * ferry_model_open, FERRY_ERR_IO when out_path cannot be written, FERRY_ERR_INVALID (an
 * unknown format; a weight that is not finite: naming layer, expert, matrix, row and
 * column), FERRY_ERR_UNSUPPORTED (quantizing a model whose hidden or
 * intermediate size is not a multiple of 32). */
ferry_status ferry_pack_model(const char *model_dir, const char *out_path,
                              const ferry_pack_params *p);

/* ---- synthetic checkpoints ------------------------------------------------------ */

/* Checkpoints with a real model's shape and random weights, for benchmarks at scales
 * nobody ships a test model of (ferry synth). */
typedef enum { FERRY_SYNTH_BF16 = 0, FERRY_SYNTH_F16 = 1, FERRY_SYNTH_F32 = 2 } ferry_synth_dtype;

/* Called during ferry_synth with the tensor bytes written so far, from whichever writer
 * thread crossed the next 1/256 of the total (calls never overlap), and once at the end. */
typedef void (*ferry_synth_progress_fn)(uint64_t bytes_done, uint64_t bytes_total, void *user);

typedef struct {
    /* the shape, written to config.json as the names in parentheses (the family's own keys:
       Mixtral's num_local_experts is Qwen's and OLMoE's num_experts, Mixtral's and OLMoE's
       expert intermediate_size is Qwen's moe_intermediate_size) */
    const char *model_type; /* the family, config.json's model_type: "mixtral", "qwen3_moe",
                               "qwen2_moe" or "olmoe" (format/arch.h); NULL = "mixtral" */
    int32_t n_vocab;        /* vocab_size; at least the tokenizer's vocabulary */
    int32_t d_model;        /* hidden_size */
    int32_t d_ff;           /* one expert's width: intermediate_size (mixtral, olmoe),
                               moe_intermediate_size (qwen3_moe, qwen2_moe) */
    int32_t n_layers;       /* num_hidden_layers */
    int32_t n_heads;        /* num_attention_heads */
    int32_t n_kv_heads;     /* num_key_value_heads; divides n_heads */
    int32_t head_dim;       /* head_dim, even; 0 = d_model / n_heads (n_heads must divide
                               d_model). Written for qwen3_moe always, for mixtral when it
                               is not d_model / n_heads; qwen2_moe and olmoe have no such key,
                               so for them it must be 0 or d_model / n_heads */
    int32_t n_experts;      /* experts per sparse layer (num_local_experts, num_experts) */
    int32_t n_experts_used; /* num_experts_per_tok (top-k), 1..n_experts */
    int32_t max_positions;  /* max_position_embeddings */
    double rope_theta;      /* rope_theta, > 0 */
    double rms_eps;         /* rms_norm_eps, > 0 */
    int32_t d_ff_dense;     /* qwen3_moe, qwen2_moe: intermediate_size, the width of a dense
                               layer's MLP, >= 1; mixtral, olmoe: 0 (they have no dense MLP) */
    const int32_t *dense_layers; /* Qwen's mlp_only_layers: the layers (each in
                                    [0, n_layers), not all of them) whose MLP is dense, of
                                    width d_ff_dense; borrowed; NULL when n_dense_layers is 0 */
    int32_t n_dense_layers;
    int32_t d_ff_shared;    /* qwen2_moe: shared_expert_intermediate_size, the width of every
                               sparse layer's shared expert, >= 1; other families: 0 */
    int32_t norm_topk_prob; /* 1: the top-k routing weights are renormalised to sum to 1.
                               Written as norm_topk_prob for qwen3_moe, qwen2_moe and olmoe;
                               mixtral always renormalises, so it must be 1 there */
    int32_t attention_bias; /* qwen3_moe, olmoe: attention_bias, biases on the q, k, v and o
                               projections; must be 0 for mixtral and qwen2_moe (which always
                               has q, k and v biases, and no o bias) */
    double clip_qkv;        /* olmoe: clip_qkv, > 0 clamps q, k, v; 0 = null. Other
                               families: 0 */
    int32_t tie_embeddings; /* tie_word_embeddings: 1 = no lm_head.weight, the output head is
                               the embedding */
    int32_t n_bpe_tokens;   /* the tokenizer ferry_synth writes when tokenizer_dir is NULL
                               (every family but mixtral): its byte and merged tokens, ids
                               0..n_bpe_tokens-1, >= 256; its special tokens follow. 0 = as
                               many as the vocabulary leaves room for */
    int32_t dtype;          /* ferry_synth_dtype of every tensor */
    uint64_t seed;          /* a tensor's values depend on the seed and its name only */
    int32_t n_threads;      /* writer threads; 0 = every online core */
    uint64_t shard_bytes;   /* most tensor bytes per shard (a larger tensor gets a shard of
                               its own); one shard: model.safetensors, no index */
    const char *tokenizer_dir; /* copied from: tokenizer.json (required), and
                                  tokenizer_config.json, special_tokens_map.json,
                                  tokenizer.model when present. NULL: required for mixtral;
                                  for the other families ferry_synth writes a byte-level BPE
                                  tokenizer.json and tokenizer_config.json of its own (the
                                  256 GPT-2 byte symbols, n_bpe_tokens - 256 deterministic
                                  merges, then the family's special tokens, whose ids are the
                                  BOS/EOS in config.json) */
    ferry_synth_progress_fn progress; /* may be NULL */
    void *progress_user;
} ferry_synth_params;

/* The mixtral-8x7b shape, bf16, seed 0, every core, 4 GiB shards, no tokenizer_dir (it
 * must be set for mixtral), no progress callback. */
ferry_synth_params ferry_synth_params_default(void);

/* Sets the shape fields of *p (model_type .. n_bpe_tokens) to a real model's, from its
 * Hugging Face config.json, and leaves the others:
 *   "mixtral-8x7b"     mixtral: 32 layers, 8 experts of 14336 over hidden 4096, top-2,
 *                      32/8 heads, vocab 32000
 *   "tiny"             mixtral: the bundled models/tiny-moe-code, 6 layers, 8 experts of
 *                      384 over hidden 192, top-2, 6/2 heads, vocab 4096
 *   "qwen3-30b-a3b"    qwen3_moe: 48 layers, 128 experts of 768 over hidden 2048, top-8
 *                      renormalised, 32/4 heads of head_dim 128, q/k norms, dense width
 *                      6144 (no dense layer), vocab 151936, untied
 *   "qwen3-235b-a22b"  qwen3_moe: 94 layers, 128 experts of 1536 over hidden 4096, top-8,
 *                      64/4 heads of 128, dense width 12288 (no dense layer), vocab 151936
 *   "qwen1.5-moe-a2.7b" qwen2_moe: 24 layers, 60 experts of 1408 over hidden 2048, top-4
 *                      not renormalised, a shared expert of 5632, 16/16 heads, q/k/v
 *                      biases, vocab 151936
 *   "olmoe-1b-7b"      olmoe: 16 layers, 64 experts of 1024 over hidden 2048, top-8 not
 *                      renormalised, 16/16 heads, q/k norms over the whole projections,
 *                      vocab 50304
 * FERRY_ERR_INVALID for another name (naming it and the known ones) or NULL. Thread-safe. */
ferry_status ferry_synth_preset(const char *name, ferry_synth_params *p);

typedef struct {
    uint64_t total_bytes; /* every shard's bytes, headers included */
    int64_t n_params;
    int32_t n_tensors;
    int32_t n_shards;
    int32_t n_threads;    /* writer threads ferry_synth starts */
} ferry_synth_info;

/* Checks p as ferry_synth does (everything but the output folder, the tokenizer folder
 * included) and says what it would write. Returns ferry_synth's codes. Thread-safe. */
ferry_status ferry_synth_plan(const ferry_synth_params *p, ferry_synth_info *out);

/* Writes a checkpoint of p's shape with random weights into out_dir, which must not exist
 * (it is created; its parent must exist) or be empty: config.json (the family's keys, as
 * its real config.json has them, and torch_dtype), the tensors ferry_model_open binds
 * under the family's names (q/k norms, biases, shared experts, dense MLPs included), in
 * model.safetensors or in shards model-0000i-of-0000N.safetensors listed by
 * model.safetensors.index.json, and the tokenizer files (copied, or written: see
 * tokenizer_dir; a copied tokenizer.json with fewer tokens than vocab_size gets regular tokens
 * "<synth_ID>" up to it, so every id decodes). Values are uniform with standard deviation 1/sqrt(fan-in) (norms are 1),
 * a function of p->seed and the tensor's name, so the same seed gives the same bytes
 * whatever the thread count. Files are written under temporary names ("NAME.<id>.tmp",
 * core/tempfile.h), fsynced and renamed, model.safetensors or the index last: a run that
 * stops early never leaves a checkpoint that opens, and a failing run removes what it wrote.
 * An out_dir holding only the temporaries of a writer that is no longer running is cleaned
 * and written. Returns FERRY_ERR_INVALID (a bad parameter, an out_dir that is not an empty
 * folder: the message names it), FERRY_ERR_IO (the tokenizer folder or a file is missing, unreadable or
 * unwritable, too little disk space), FERRY_ERR_FORMAT/UNSUPPORTED (a tokenizer.json this
 * build cannot read), FERRY_ERR_NOMEM. Thread-safe (for distinct out_dirs). */
ferry_status ferry_synth(const ferry_synth_params *p, const char *out_dir);

typedef struct {
    int32_t n_vocab;
    int32_t d_model;      /* hidden_size */
    int32_t d_ff;         /* intermediate_size (one expert) */
    int32_t n_layers;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim;
    int32_t n_experts;
    int32_t n_experts_used; /* top-k */
    int32_t max_positions;
    int32_t bos_id;
    int32_t eos_id;
    float rope_theta;
    float rms_eps;
    int64_t n_params;
    int32_t backend;  /* ferry_backend_id that computes: FERRY_BACKEND_CPU or FERRY_BACKEND_CUDA */
    char device[128]; /* what it runs on: "cpu, 2 threads, avx512" or the GPU's name, compute
                         capability and memory */
} ferry_model_info;

/* Fills *out with the model's shape. FERRY_ERR_INVALID on NULL. Thread-safe. */
ferry_status ferry_model_get_info(const ferry_model *m, ferry_model_info *out);

/* ---- tokenizer --------------------------------------------------------------- */

/* Encodes UTF-8 text (len bytes; need not be NUL-terminated) into token ids as the
 * checkpoint's tokenizer.json does in Hugging Face tokenizers. add_special != 0 adds the
 * BOS/EOS tokens the post-processor (or tokenizer_config.json) asks for. Writes up to
 * cap ids to ids (ids may be NULL when cap is 0) and the full count to *n_out; if the
 * count exceeds cap, returns FERRY_ERR_INVALID with *n_out set so the caller can retry
 * with a larger buffer. Thread-safe. */
ferry_status ferry_tokenize(const ferry_model *m, const char *text, size_t len, int add_special,
                            int32_t *ids, int32_t cap, int32_t *n_out);

/* Decodes ids into UTF-8 text as Hugging Face's decode(skip_special_tokens) does.
 * Writes at most cap bytes including a terminating NUL to text and the full length
 * (without the NUL) to *len_out; FERRY_ERR_INVALID if it does not fit (with *len_out
 * set) or an id is out of range. Thread-safe. */
ferry_status ferry_detokenize(const ferry_model *m, const int32_t *ids, int32_t n,
                              int skip_special, char *text, size_t cap, size_t *len_out);

/* Whether id ends generation: one of config.json's eos ids, else the tokenizer's EOS.
 * Thread-safe. */
int ferry_token_is_eos(const ferry_model *m, int32_t id);

/* ---- generation context -------------------------------------------------------- */

typedef struct ferry_context ferry_context;

typedef struct {
    int32_t n_ctx;       /* KV cache capacity in tokens; 0 = min(model maximum, 4096) */
    int32_t n_batch;     /* most tokens per forward step (longer prompts run in chunks);
                            0 = 128. Results do not depend on it. */
    float temperature;   /* 0 = greedy */
    int32_t top_k;       /* 0 = off */
    float top_p;         /* 1 = off */
    uint64_t seed;
} ferry_context_params;

ferry_context_params ferry_context_params_default(void);

/* Creates a generation context (KV cache, scratch, sampler) for the model. Borrows the
 * model, which must outlive the context. Returns FERRY_ERR_INVALID (bad params, message
 * names the field), FERRY_ERR_NOMEM. */
ferry_status ferry_context_create(ferry_model *m, const ferry_context_params *p,
                                  ferry_context **out);

/* Frees the context. NULL-safe. */
void ferry_context_free(ferry_context *c);

/* Empties the KV cache and the statistics and restarts the sampler's random stream from
 * the context's seed; the next ferry_eval starts at position 0, and a generation after a
 * reset samples the same tokens as the first one did. */
void ferry_context_reset(ferry_context *c);

/* Number of tokens currently held in the KV cache. */
int32_t ferry_context_n_past(const ferry_context *c);

/* The positions the KV cache holds (its n_ctx): a prompt of n tokens and m to generate
 * need n + m - 1 of them. 0 for NULL. */
int32_t ferry_context_n_ctx(const ferry_context *c);

/* Runs the model over n tokens appended after those already in the KV cache (a prompt
 * in one forward, or one token at a time). If logits is not NULL, writes the n_vocab
 * logits of the last of the n tokens to it. FERRY_ERR_INVALID if the tokens would not
 * fit in the context (the message gives the numbers) or an id is out of range; the KV
 * cache is then unchanged. */
ferry_status ferry_eval(ferry_context *c, const int32_t *ids, int32_t n, float *logits);

/* Called once per generated token with the token id and the UTF-8 text it completes
 * (possibly empty while a multi-byte character is pending; never a broken sequence;
 * empty for special tokens such as EOS). After the last token, bytes still pending (an
 * unfinished character, shown as U+FFFD) arrive in one more call with id -1.
 * Return nonzero to stop generation. */
typedef int (*ferry_token_fn)(int32_t id, const char *text, size_t len, void *user);

typedef struct {
    int32_t n_predict;   /* maximum tokens to generate */
    int stop_at_eos;     /* nonzero: stop after the end-of-sequence token */
    float *prompt_logits; /* when not NULL: receives the n_vocab logits of the prompt's last
                             position (borrowed; the caller sizes it) */
} ferry_generate_params;

ferry_generate_params ferry_generate_params_default(void);

/* Generates up to p->n_predict tokens continuing prompt_ids (which the caller usually
 * gets from ferry_tokenize with BOS) on an empty KV cache, calling fn for each token
 * (fn may be NULL). Writes the generated ids to out_ids (capacity out_cap, may be NULL
 * when out_cap is 0) and their count to *n_out (ids beyond out_cap are not stored).
 * Generation stops at EOS (when asked), after n_predict tokens or when fn returns
 * nonzero. FERRY_ERR_INVALID when prompt plus n_predict exceeds the context capacity,
 * before anything runs. */
ferry_status ferry_generate(ferry_context *c, const int32_t *prompt_ids, int32_t n_prompt,
                            const ferry_generate_params *p, ferry_token_fn fn, void *user,
                            int32_t *out_ids, int32_t out_cap, int32_t *n_out);

typedef struct {
    int64_t n_prompt_tokens;   /* tokens evaluated in prefill (n > 1 per call) */
    int64_t n_decode_tokens;   /* tokens evaluated one at a time */
    double prefill_seconds;
    double decode_seconds;
    double sample_seconds;
    double prefill_tokens_per_s;
    double decode_tokens_per_s;
} ferry_stats;

/* Statistics since the context was created or last reset. */
ferry_status ferry_context_get_stats(const ferry_context *c, ferry_stats *out);

typedef struct {
    int64_t hits, misses;              /* demand lookups in the expert cache */
    int64_t prefetch_issued, prefetch_used, prefetch_wasted;
    int64_t evictions;
    uint64_t bytes_to_device;          /* this layer's experts copied into slots */
    uint64_t bytes_from_disk;          /* this layer's experts read from the pack file */
    double stall_seconds;              /* the forward pass waiting for this layer's experts */
    int64_t cpu_experts;               /* experts computed on the CPU (--hybrid), once per
                                          layer-batch each */
    int64_t cpu_tokens;                /* token rows those computed */
} ferry_layer_stats;

typedef struct {
    int32_t enabled;          /* 0 when the model runs fully resident */
    int32_t tier;             /* ferry_offload_tier */
    int32_t uses_uring;       /* NVMe tier: io_uring (1) or the pread fallback (0) */
    int32_t n_slots;          /* expert slots in the device budget */
    uint64_t slot_bytes;
    uint64_t budget_bytes;    /* --gpu-mem */
    uint64_t dense_bytes;     /* dense weights on the device */
    uint64_t context_bytes;   /* KV cache and workspace of the first context */
    uint64_t slots_bytes;     /* n_slots x slot_bytes */
    int64_t hits, misses;     /* totals over layers */
    int64_t prefetch_issued, prefetch_used, prefetch_wasted;
    uint64_t bytes_to_device; /* expert bytes copied into slots */
    uint64_t bytes_from_disk; /* read from the pack file */
    double stall_seconds;     /* forward pass waiting for experts */
    double copy_seconds;      /* copies into slots, from submission to landing: the fetch
                                 rate is bytes_to_device / copy_seconds */
    /* the predictor, measured live on decoded tokens: index d = lookahead distance */
    int32_t predictor;                  /* ferry_predict_id */
    int64_t predictions[4];             /* top-k sets predicted for layer l+d */
    double precision[4], recall[4];     /* of those sets against the experts then chosen */
    /* hybrid execution (--hybrid): experts computed on the CPU instead of fetched */
    int32_t hybrid;                 /* ferry_hybrid_id in force (OFF when nothing is offloaded) */
    int64_t cpu_experts;            /* expert computations on the CPU */
    int64_t cpu_tokens;             /* token rows they computed */
    uint64_t cpu_bytes;             /* expert weight bytes the CPU read for them */
    double cpu_seconds;             /* the CPU's busy time on them */
    double cpu_wait_seconds;        /* the forward pass waiting for the CPU after the device's
                                       share was done */
    double cost_fetch_bytes_per_s;  /* the cost model's rates, measured at start: fetches, */
    double cost_cpu_bytes_per_s;    /* and the CPU computing an expert for one token */
} ferry_offload_stats;

/* Offload statistics of the model's expert cache (shared by its contexts) since the
 * context was created or reset; per-layer counters go to layers[0..n_layers) when layers
 * is not NULL (n_layers may be smaller than the model's), indexed by decoder layer: a layer
 * with a dense MLP (Qwen's mlp_only_layers) has no experts and counts zeros. */
ferry_status ferry_context_get_offload_stats(const ferry_context *c, ferry_offload_stats *out,
                                             ferry_layer_stats *layers, int32_t n_layers);

/* The expert hit rate, as ferry reports it everywhere (run, batch, bench, sim, serve,
 * Python): the share of expert uses served from a device slot,
 * hits / (hits + misses + cpu_experts). An expert computed on the CPU (--hybrid) is neither
 * a hit nor a fetch, and counts against the rate. 0 when there were no uses. Printed as a
 * percentage with one decimal ("hit rate 87.5%"); JSON carries the fraction. */
double ferry_expert_hit_rate(int64_t hits, int64_t misses, int64_t cpu_experts);

/* ---- batch generation ------------------------------------------------------------------ */

/* Many prompts at once: every step, each unfinished sequence contributes its next prompt
 * chunk or its next token; layer by layer, attention runs per sequence and the MoE block
 * runs over all the step's tokens in layer-batches of at most max_batch tokens, each
 * layer-batch loading every expert its tokens route to once. With reorder, the tokens of
 * a layer are assigned to layer-batches so that each needs few experts (moe/schedule.h);
 * the outputs are bit-identical either way, and to generating each prompt alone. */
typedef struct {
    int32_t max_batch;   /* most tokens per layer-batch; 0 = 16 */
    int32_t chunk;       /* most prompt tokens a sequence feeds per step; 0 = 64 */
    int32_t reorder;     /* nonzero: cross-batch token reordering */
    int32_t stop_at_eos; /* nonzero: a sequence ends at its first EOS */
    ferry_context_params sampling; /* temperature, top_k, top_p, seed (each sequence samples
                                      with this seed, as if run alone); n_ctx and n_batch are
                                      ignored */
} ferry_batch_params;

/* max_batch 16, chunk 64, reorder on, stop at EOS, greedy. */
ferry_batch_params ferry_batch_params_default(void);

typedef struct {
    int64_t steps;          /* forward steps over the pending work */
    int64_t tokens;         /* tokens run through the model */
    int64_t layer_batches;  /* MoE block runs */
    int64_t expert_loads;   /* distinct experts summed over layer-batches */
    uint64_t expert_bytes;  /* bytes of one expert (its weights as stored) */
    uint64_t bytes_to_device; /* offloading: expert bytes copied into device slots; else 0 */
    int64_t hits, misses;   /* offloading: expert cache lookups */
    double seconds;
    int64_t cpu_experts;    /* --hybrid: expert runs computed on the CPU instead */
} ferry_batch_stats;

/* Generates up to n_predict[i] tokens after each prompt i < n_seqs (prompts[i], n_prompt[i]
 * ids, BOS included when wanted) into out_ids[i] (capacity n_predict[i]), their counts to
 * n_out[i]. Stats to *stats, and per layer the expert loads to layer_loads (n_layers) when
 * not NULL. With offloading (the model's gpu_mem_bytes) and no context yet, the sequences'
 * KV caches and the batch workspace come out of the device budget before the expert slots
 * are planned; with a context already made, they must fit in what its plan left.
 * FERRY_ERR_INVALID (empty prompts, bad ids, bad params),
 * FERRY_ERR_NOMEM (naming what does not fit), the forward pass's errors. */
ferry_status ferry_batch_generate(ferry_model *m, const int32_t *const *prompts,
                                  const int32_t *n_prompt, const int32_t *n_predict, int32_t n_seqs,
                                  const ferry_batch_params *p, int32_t *const *out_ids,
                                  int32_t *n_out, ferry_batch_stats *stats, int64_t *layer_loads);

/* ---- routing traces and predictors -------------------------------------------------- */

/* Runs the model over UTF-8 text in sequences of up to seq_len tokens (the text is
 * tokenized once; each sequence starts with BOS) and writes its routing trace
 * ("moe-routing-trace v1", with router probabilities when with_probs) to out_path. The
 * number of tokens traced goes to *n_tokens (may be NULL). FERRY_ERR_INVALID (seq_len < 2,
 * empty text), FERRY_ERR_IO, FERRY_ERR_NOMEM. Uses its own context. */
ferry_status ferry_trace_text(ferry_model *m, const char *text, size_t len, int32_t seq_len,
                              int with_probs, const char *out_path, int64_t *n_tokens);

/* Fits routing statistics from n trace files (of one shape) into out_path, for the stats
 * and combined predictors. FERRY_ERR_IO, FERRY_ERR_FORMAT naming the file at fault. */
ferry_status ferry_predictor_fit(const char *const *trace_paths, int32_t n, const char *out_path);

/* A replay of routing through the real expert cache and prefetch pipeline (ferry sim). */
typedef struct {
    int32_t n_slots;       /* device expert slots; 0 = a quarter of all experts (at least 1) */
    int32_t policy;        /* ferry_cache_policy_id */
    int32_t prefetch;      /* nonzero: the predictor's experts for layers l+1..l+lookahead
                              are fetched after layer l */
    int32_t predictor;     /* ferry_predict_id (not recency); with a trace alone, stats (a
                              trace has no hidden states for the gate and combined ones) */
    const char *predictor_stats_path; /* stats and combined: the file of ferry predictor fit */
    int32_t lookahead;     /* 1..3; 0 = 1 */
    uint64_t expert_bytes; /* bytes one expert moves, for the byte figures; 0 = count experts
                              (a model's own size where the model is at hand) */
} ferry_sim_options;

/* n_slots 0, lru, no prefetch, gate, lookahead 1, expert_bytes 0. */
ferry_sim_options ferry_sim_options_default(void);

typedef struct {
    int32_t n_slots, n_experts_total; /* slots, and layers x experts */
    int64_t lookups, hits;            /* demand accesses (tokens x layers x top-k), hits */
    double hit_rate;                  /* hits / lookups: ferry_expert_hit_rate (no CPU here) */
    int64_t prefetch_issued, prefetch_used, prefetch_wasted;
    int64_t experts_moved;          /* slots filled: misses and prefetches */
    uint64_t expert_bytes;          /* 0: the byte figures below are 0 too */
    uint64_t bytes_moved, prefetch_bytes_wasted;
    double belady_hit_rate;         /* Belady's MIN with n_slots: the best demand paging */
} ferry_sim_report;

/* Replays the trace at trace_path (all of it) through the expert cache and prefetch
 * pipeline as configured by o. FERRY_ERR_INVALID (bad options, the gate predictor), the
 * codes of loading the trace and statistics files, FERRY_ERR_NOMEM. */
ferry_status ferry_sim_trace_file(const char *trace_path, const ferry_sim_options *o,
                                  ferry_sim_report *out);

typedef struct {
    int32_t k;               /* experts per prediction (the model's top-k) */
    int64_t predictions[4];  /* index d = lookahead distance 1..3 */
    double precision[4];     /* precision@k */
    double recall[4];        /* recall@k */
    double seconds_per_token; /* predictor cost per token (observe + predict, every layer) */
    /* the same routing replayed through the expert cache: alone, and with this predictor's
     * prefetches (ferry_sim_trace_file; the options' predictor is the evaluated one) */
    ferry_sim_report cache_only, with_prefetch;
} ferry_predictor_report;

/* Evaluates a predictor (ferry_predict_id other than recency; stats_path for stats and
 * combined) live: runs the model over text in sequences of up to seq_len tokens and, for
 * every token and layer l, compares the predicted top-k experts of layer l+d with those
 * chosen. Then replays the routing (and hidden states) through the expert cache as sim says
 * (NULL: ferry_sim_options_default; its predictor, prefetch and stats fields are ignored),
 * with and without this predictor's prefetches; expert_bytes 0 there means the model's.
 * FERRY_ERR_INVALID, FERRY_ERR_IO, FERRY_ERR_FORMAT, FERRY_ERR_NOMEM. */
ferry_status ferry_predictor_eval_text(ferry_model *m, const char *text, size_t len,
                                       int32_t seq_len, int32_t predictor,
                                       const char *stats_path, const ferry_sim_options *sim,
                                       ferry_predictor_report *out);

/* The same over a routing trace (the stats predictor only: a trace has no hidden states). */
ferry_status ferry_predictor_eval_trace_file(const char *trace_path, const char *stats_path,
                                             const ferry_sim_options *sim,
                                             ferry_predictor_report *out);

/* ---- perplexity ----------------------------------------------------------------- */

typedef struct {
    double perplexity; /* exp(nll) */
    double nll;        /* mean negative log-likelihood of the scored tokens, in nats */
    int64_t n_scored;  /* tokens scored */
    int32_t n_windows; /* windows evaluated */
    int32_t window;    /* tokens per window, BOS included */
    double seconds;    /* evaluation time */
} ferry_perplexity_result;

/* Perplexity of the model (with its offloading, hybrid and kernel options) on text: the
 * text is tokenized once without BOS and cut into windows of window - 1 tokens, each run
 * with BOS in front on an empty KV cache; every token is scored by the logits of the
 * position before it (log-softmax in double precision), so each text token counts once.
 * FERRY_ERR_INVALID (window outside 2..max_positions, a text without tokens), and the codes
 * of the forward pass. Not thread-safe for one model. */
ferry_status ferry_perplexity(ferry_model *m, const char *text, size_t len, int32_t window,
                              ferry_perplexity_result *out);

/* ---- benchmarks --------------------------------------------------------------- */

typedef struct {
    double device_gbps;       /* device memory: bytes read + written by a device-to-device copy */
    double pinned_h2d_gbps;   /* pinned host memory to the device, through the copy engine */
    double pageable_h2d_gbps; /* pageable host memory to the device (a plain upload) */
    double host_read_gbps;    /* host memory read by every compute thread at once: what
                                 bounds the CPU computing experts (--hybrid) */
    uint64_t n_bytes;         /* buffer size measured with */
    /* ferry_bench_run only: reads of the expert file (the pack file with --offload nvme,
     * else the checkpoint's largest shard) through ferry's reader, 4 MiB requests, 16 in
     * flight, O_DIRECT where the filesystem allows it (else the page cache may serve them) */
    double disk_gbps;
    int32_t disk_direct;
    char disk_path[256];
} ferry_bandwidths;

/* Measures the bandwidths of the backend the params name (AUTO as ferry_model_open
 * resolves it) with buffers of n_bytes (0 = 256 MiB), on a backend of its own. On the CPU
 * backend the "device" is host memory and the copies are one thread's memcpy.
 * FERRY_ERR_NOMEM, FERRY_ERR_DEVICE, FERRY_ERR_UNSUPPORTED. Not thread-safe. */
ferry_status ferry_measure_bandwidths(const ferry_model_params *mp, uint64_t n_bytes,
                                      ferry_bandwidths *out);

typedef enum { FERRY_BENCH_DECODE = 0, FERRY_BENCH_PREFILL = 1, FERRY_BENCH_BATCH = 2 } ferry_bench_mode;

typedef struct {
    int32_t mode;       /* ferry_bench_mode */
    int32_t prompt_len; /* tokens of the (synthetic, deterministic) prompt */
    int32_t gen_len;    /* greedy decode steps after it (decode and batch modes) */
    int32_t repeat;     /* runs; speeds are the median run, latencies pool every run */
    uint64_t bandwidth_bytes; /* buffer for ferry_measure_bandwidths; 0 = 256 MiB */
    int32_t batch;      /* batch mode: sequences generated together (ferry_batch_generate,
                           default layer-batch size and reordering) */
} ferry_bench_params;

ferry_bench_params ferry_bench_params_default(void);

typedef struct {
    ferry_bandwidths bw;
    int32_t backend;            /* ferry_backend_id that ran */
    char device[128];
    double prefill_tokens_per_s; /* median run */
    double decode_tokens_per_s;  /* median run */
    double latency_median_ms, latency_p90_ms; /* per decoded token, every run */
    /* bytes one decode token reads from device memory: dense weights, the top-k experts of
     * every layer, and the KV cache at the run's mean position */
    uint64_t dense_bytes_per_token, expert_bytes_per_token, kv_bytes_per_token;
    /* offloading (zero when resident), over the decode steps of every run */
    int32_t offload;
    double hit_rate;              /* ferry_expert_hit_rate over the decode steps */
    double moved_bytes_per_token; /* expert bytes copied to the device per decoded token */
    double stall_ms_per_token;
    double fetch_gbps;            /* expert bytes over the copy engine's busy time */
    double disk_bytes_per_token;  /* --offload nvme: read from the pack file per token */
    /* hybrid execution (--hybrid auto or cpu-experts): the CPU's share per decoded token */
    int32_t hybrid;               /* ferry_hybrid_id in force */
    double cpu_experts_per_token;
    double cpu_bytes_per_token;   /* expert weight bytes the CPU read */
    double cpu_gbps;              /* those bytes over the CPU's busy time */
    /* the bound: the fastest decode the measured bandwidths allow for these bytes, when
     * copies, reads and compute overlap perfectly:
     * 1 / max(device read / device_bw, off-device / (pinned_bw + host_read_bw),
     * from disk / disk_bw), where device read counts the dense weights, the KV cache and
     * the experts the device computes, and off-device the expert bytes that were not in a
     * slot (moved plus computed on the CPU), which the bus and the CPU can share; without
     * hybrid work the CPU takes no share (off-device / pinned_bw) */
    double bound_tokens_per_s;
    double fraction_of_bound;     /* decode_tokens_per_s / bound_tokens_per_s */
    /* batch mode (median run): generated tokens of all sequences per second, and per
     * generated token the distinct experts loaded per layer-batch and the bytes moved */
    double batch_tokens_per_s;
    double batch_expert_loads_per_token;
    double batch_moved_bytes_per_token;
    /* the CPU backend (decode and prefill modes): the bytes a decode step cycles through
     * (dense weights, the resident experts or the slots, the KV cache at full length); the
     * read rate of all compute threads over a buffer this large (at most 256 MiB) is then
     * bw.device_gbps when faster than the copy */
    uint64_t working_set_bytes;
} ferry_bench_result;

/* Opens the model in model_dir with mp, measures the bandwidths, then runs the benchmark:
 * per repeat, a fresh KV cache, a prefill of prompt_len tokens and (decode mode) gen_len
 * greedy steps, each timed; in batch mode, per repeat, `batch` different prompts of
 * prompt_len tokens generating gen_len tokens each, together. FERRY_ERR_INVALID for impossible lengths (prompt_len < 1,
 * gen_len < 1 in decode mode, more than the context holds, repeat < 1); the codes of
 * ferry_model_open otherwise. */
ferry_status ferry_bench_run(const char *model_dir, const ferry_model_params *mp,
                             const ferry_bench_params *bp, ferry_bench_result *out);

#ifdef __cplusplus
}
#endif

#endif
