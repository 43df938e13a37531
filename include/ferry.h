/*
 * ferry.h: the public C API of libferry, an inference engine for Mixture-of-Experts
 * language models (Mixtral-style checkpoints in the Hugging Face layout).
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

/* ---- logging ---------------------------------------------------------------- */

typedef enum { FERRY_LOG_ERROR = 0, FERRY_LOG_WARN = 1, FERRY_LOG_INFO = 2, FERRY_LOG_DEBUG = 3 } ferry_log_level;
typedef void (*ferry_log_fn)(ferry_log_level level, const char *msg, void *user);

/* Sends library log lines at or below `level` to fn (NULL restores the default, which
 * writes to stderr). The library never prints anything else. Not thread-safe: call
 * before opening models. */
void ferry_set_log(ferry_log_level level, ferry_log_fn fn, void *user);

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
/* How the NVMe tier reads: io_uring where the kernel allows it, else a pread thread pool. */
typedef enum { FERRY_READ_AUTO = 0, FERRY_READ_URING = 1, FERRY_READ_PREAD = 2 } ferry_reader_id;

typedef struct {
    int32_t n_threads; /* compute threads; 0 = one per physical core */
    /* Expert offloading. gpu_mem_bytes = 0: everything resident, nothing offloaded. Else the
     * device budget: dense weights, KV cache and workspace are placed in it and the rest
     * becomes expert slots, a cache in front of the expert store. */
    uint64_t gpu_mem_bytes;
    int32_t offload;           /* ferry_offload_tier: where experts live */
    const char *pack_path;     /* FERRY_OFFLOAD_NVME: the file written by ferry_pack_model;
                                  NULL: ferry writes one into its cache folder
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
} ferry_model_params;

ferry_model_params ferry_model_params_default(void);

/* Opens a Hugging Face Mixtral-style checkpoint directory: config.json, one
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

/* Writes the packed expert file of the checkpoint in model_dir to out_path (atomically):
 * a header with the model's shape and each expert's offset, size and checksum, then every
 * expert's w1, w3, w2 contiguous and 4 KiB aligned, for the NVMe tier. Returns the codes
 * of ferry_model_open, and FERRY_ERR_IO when out_path cannot be written. */
ferry_status ferry_pack_model(const char *model_dir, const char *out_path);

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

/* Empties the KV cache and the statistics; the next ferry_eval starts at position 0. */
void ferry_context_reset(ferry_context *c);

/* Number of tokens currently held in the KV cache. */
int32_t ferry_context_n_past(const ferry_context *c);

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
    /* the predictor, measured live on decoded tokens: index d = lookahead distance */
    int32_t predictor;                  /* ferry_predict_id */
    int64_t predictions[4];             /* top-k sets predicted for layer l+d */
    double precision[4], recall[4];     /* of those sets against the experts then chosen */
} ferry_offload_stats;

/* Offload statistics of the model's expert cache (shared by its contexts) since the
 * context was created or reset; per-layer counters go to layers[0..n_layers) when layers
 * is not NULL (n_layers may be smaller than the model's). */
ferry_status ferry_context_get_offload_stats(const ferry_context *c, ferry_offload_stats *out,
                                             ferry_layer_stats *layers, int32_t n_layers);

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
    double hit_rate;
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

#ifdef __cplusplus
}
#endif

#endif
