/*
 * cli/main.c: the `ferry` command.
 *
 *   ferry run MODEL_DIR -p PROMPT [options]   generate text, streaming it to stdout
 *
 * Usage errors exit with status 2, runtime failures with 1; messages go to stderr.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <time.h>

#include "cli/progress.h"
#include "core/tempfile.h"
#include "ferry.h"
#include "format/chat.h"
#include "format/tokenizer.h"
#include "serve/server.h"
#include "serve/stop.h"

static void usage_run(FILE *f)
{
    fprintf(f,
            "usage: ferry run MODEL_DIR (-p PROMPT | -f FILE) [options]\n"
            "\n"
            "Generates text from a Hugging Face checkpoint directory (Mixtral, Qwen3-MoE,\n"
            "Qwen2-MoE, OLMoE).\n"
            "\n"
            "  -p, --prompt TEXT   the prompt\n"
            "  -f, --file FILE     read the prompt from FILE ('-': standard input)\n"
            "  -n, --n-predict N   tokens to generate (default 64)\n"
            "      --ctx C         KV cache capacity in tokens (default: the model's maximum,\n"
            "                      capped at 4096)\n"
            "      --temp T        sampling temperature; 0 = greedy (default 0)\n"
            "      --top-k K       keep the K most probable tokens; 0 = off (default 0)\n"
            "      --top-p P       nucleus sampling mass in (0, 1]; 1 = off (default 1)\n"
            "      --seed S        random seed for sampling (default 0)\n"
            "      --threads N     compute threads; 0 = one per physical core (default 0)\n"
            "      --backend B     auto (default: the GPU when there is a usable one, else\n"
            "                      the CPU), cpu or cuda; $FERRY_BACKEND sets the default\n"
            "      --ignore-eos    keep generating after the end-of-sequence token\n"
            "      --chat          the prompt is a user message: render it with the model's\n"
            "                      chat template (tokenizer_config.json) and the generation\n"
            "                      prompt, as ferry serve's /v1/chat/completions does\n"
            "      --chat-template FILE  with --chat: the template in FILE instead\n"
            "      --stop STR      end the text before the first STR (repeatable, up to 16),\n"
            "                      as the server's \"stop\" does\n"
            "      --no-display-prompt  print only the generated text\n"
            "      --stats         print to stderr the backend, why generation ended, prefill\n"
            "                      and decode speed and, offloading, the memory plan, the\n"
            "                      expert cache, hybrid and predictor figures and a per-layer\n"
            "                      table\n"
            "      --json          print one JSON object instead of streaming text: prompt_ids,\n"
            "                      ids, text, finish_reason (eos, stop, length), backend,\n"
            "                      device, stats and, offloading, offload (all --stats prints)\n"
            "      --logits FILE   write the prompt's last-position logits (little-endian\n"
            "                      float32, n_vocab values) to FILE\n"
            "  -v, --verbose       log what the library does to stderr\n"
            "      --quiet         no progress line on the terminal (loading the model,\n"
            "                      writing the NVMe pack)\n"
            "\n"
            "Expert offloading (the output does not change, only where experts live):\n"
            "      --gpu-mem SIZE  device memory budget (bytes, or with K/M/G suffixes); the\n"
            "                      experts that do not fit stay in the store and are cached\n"
            "                      in expert slots (default: everything resident)\n"
            "      --offload T     where experts live: ram (default) or nvme\n"
            "      --pack FILE     take the experts from this pack (ferry pack; a --quant\n"
            "                      q8/q4 pack gives quantized experts), in every mode; the\n"
            "                      file --offload nvme reads (default: written once into\n"
            "                      ferry's cache folder)\n"
            "      --host-cache SIZE  RAM cache in front of the pack file (default 1G)\n"
            "      --reader R      NVMe reads: auto (default), uring or pread\n"
            "      --policy P      expert cache eviction: lru (default), lfu, layer-lru,\n"
            "                      predicted\n"
            "      --prefetch on|off  fetch the experts the next layers will probably use\n"
            "                      while this layer computes (default on)\n"
            "      --predictor P   what names them: gate (default: the next layers' routers\n"
            "                      applied to this layer's output), stats, combined, or\n"
            "                      recency (what the next layer used last time)\n"
            "      --predictor-stats FILE  statistics for stats/combined (ferry predictor fit)\n"
            "      --lookahead D   prefetch layers l+1 .. l+D, D in 1..3 (default 1)\n"
            "      --slots N       use at most N expert slots of the budget\n"
            "      --hybrid H      where missing experts are computed: auto (default: per\n"
            "                      miss, fetch it or compute it on the CPU from host memory,\n"
            "                      whichever a cost model measured at start says is sooner),\n"
            "                      off (always fetch) or cpu-experts (every expert on the\n"
            "                      CPU, the device holds the dense weights only)\n"
            "      --cpu-kernels K CPU matmul kernels: auto (default: the fastest exact set),\n"
            "                      reference, avx2, avx512, or avx512bf16 (activations\n"
            "                      rounded to bf16: faster prefill, within 1e-2)\n"
            "      --quant-dense Q quantize the dense matmul weights (attention projections,\n"
            "                      LM head) in memory at load: q8, q4 or as-stored (default)\n");
}

/* Parses "123", "64K", "1.5G" (powers of 1024) into bytes. */
static int parse_size(const char *opt, const char *s, unsigned long long *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    double mul = 1;
    if (end != s && *end) {
        switch (*end) {
        case 'k': case 'K': mul = 1024.0; break;
        case 'm': case 'M': mul = 1024.0 * 1024; break;
        case 'g': case 'G': mul = 1024.0 * 1024 * 1024; break;
        case 't': case 'T': mul = 1024.0 * 1024 * 1024 * 1024; break;
        default: mul = 0; break;
        }
        end++;
        if (*end == 'i' && end[1] == 'B')
            end += 2;
        else if (*end == 'B')
            end++;
    }
    if (errno || end == s || *end || mul == 0 || !(v * mul >= 1) || v * mul > 1e18) {
        fprintf(stderr, "ferry: %s expects a size such as 512M or 6G, got '%s'\n", opt, s);
        return 2;
    }
    *out = (unsigned long long)(v * mul);
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: ferry COMMAND [args]\n"
               "\n"
               "commands:\n"
               "  run       generate text from a model (ferry run --help)\n"
               "  pack      write the packed expert file of a model, optionally quantized\n"
               "            (ferry pack MODEL_DIR OUT_FILE [--quant q8|q4])\n"
               "  synth     write a checkpoint of a real shape with random weights, for\n"
               "            benchmarks (ferry synth --help)\n"
               "  trace     write the routing trace of a text (ferry trace --help)\n"
               "  sim       replay a routing trace through the expert cache (ferry sim --help)\n"
               "  batch     generate for many prompts at once (ferry batch --help)\n"
               "  serve     an OpenAI-compatible HTTP server with continuous batching\n"
               "            (ferry serve --help)\n"
               "  bench     measure bandwidths and speed against their bound (ferry bench --help)\n"
               "  perplexity  perplexity on a text file (ferry perplexity --help)\n"
               "  predictor fit routing statistics, evaluate predictors (ferry predictor --help)\n"
               "  tokenize  encode text or decode ids with a model's tokenizer alone\n"
               "            (ferry tokenize --help)\n"
               "  version   print the version and the GPU this build can use\n");
}

static int bad_value(const char *opt, const char *val, const char *want)
{
    fprintf(stderr, "ferry: %s expects %s, got '%s'\n", opt, want, val);
    return 2;
}

/* *out = the index of v among the n names; else a usage error saying what was expected. */
static int parse_name(const char *opt, const char *v, const char *const *names, int32_t n,
                      const char *want, int32_t *out)
{
    for (int32_t i = 0; i < n; i++)
        if (!strcmp(v, names[i])) {
            *out = i;
            return 0;
        }
    return bad_value(opt, v, want);
}

static int parse_backend(const char *opt, const char *v, int32_t *out)
{
    static const char *const names[] = {"auto", "cpu", "cuda"};
    return parse_name(opt, v, names, 3, "auto, cpu or cuda", out);
}

/* The model parameters every command starts from: the library's defaults, with the
 * backend of $FERRY_BACKEND (auto, cpu or cuda) when it is set. */
static int cli_model_params(ferry_model_params *mp)
{
    *mp = ferry_model_params_default();
    const char *env = getenv("FERRY_BACKEND");
    if (env && *env && parse_backend("FERRY_BACKEND", env, &mp->backend))
        return 2;
    return 0;
}

/* ferry_predict_id and ferry_hybrid_id by name, for parsing and printing alike */
static const char *const g_predictor_names[] = {"recency", "gate", "stats", "combined"};
static const char *const g_hybrid_names[] = {"auto", "off", "cpu-experts"};

static int parse_predictor(const char *opt, const char *v, int32_t *out)
{
    return parse_name(opt, v, g_predictor_names, 4, "recency, gate, stats or combined", out);
}

static int parse_i64(const char *opt, const char *s, long long lo, long long hi, long long *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        char want[96];
        snprintf(want, sizeof want, "an integer in [%lld, %lld]", lo, hi);
        return bad_value(opt, s, want);
    }
    *out = v;
    return 0;
}

static int parse_f(const char *opt, const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi) {
        char want[96];
        snprintf(want, sizeof want, "a number in [%g, %g]", lo, hi);
        return bad_value(opt, s, want);
    }
    *out = v;
    return 0;
}

static int parse_policy(const char *opt, const char *v, int32_t *out)
{
    static const char *const names[] = {"lru", "lfu", "layer-lru", "predicted"};
    return parse_name(opt, v, names, 4, "lru, lfu, layer-lru or predicted", out);
}

/* The cache-replay options of ferry sim and ferry predictor eval. Returns -1 when a is not
 * one of them, else 0 or a usage error's exit status; *i moves past the value. */
static int parse_sim_option(const char *cmd, int argc, char **argv, int *i, ferry_sim_options *o)
{
    const char *a = argv[*i];
    if (strcmp(a, "--slots") && strcmp(a, "--policy") && strcmp(a, "--lookahead") &&
        strcmp(a, "--expert-bytes"))
        return -1;
    if (*i + 1 >= argc) {
        fprintf(stderr, "ferry %s: %s needs a value\n", cmd, a);
        return 2;
    }
    const char *v = argv[++*i];
    long long n;
    unsigned long long bytes;
    int rc;
    if (!strcmp(a, "--slots")) {
        if ((rc = parse_i64(a, v, 1, INT32_MAX, &n)))
            return rc;
        o->n_slots = (int32_t)n;
    } else if (!strcmp(a, "--policy")) {
        return parse_policy(a, v, &o->policy);
    } else if (!strcmp(a, "--lookahead")) {
        if ((rc = parse_i64(a, v, 1, 3, &n)))
            return rc;
        o->lookahead = (int32_t)n;
    } else {
        if ((rc = parse_size(a, v, &bytes)))
            return rc;
        o->expert_bytes = bytes;
    }
    return 0;
}

/* The options of the model (threads, offloading, cache, predictor) and of sampling, shared
 * by ferry run and ferry batch, and --quiet (no progress line). Returns -1 when argv[*i] is
 * not one of them, else 0 or a usage error's exit status; *i moves past the value. */
static int parse_model_option(const char *cmd, int argc, char **argv, int *i,
                  ferry_model_params *mp, ferry_context_params *sp)
{
    static const char *const with_value[] = {
        "--temp", "--top-k", "--top-p", "--seed", "--threads", "--gpu-mem", "--host-cache",
        "--offload", "--pack", "--reader", "--policy", "--prefetch", "--predictor",
        "--predictor-stats", "--lookahead", "--slots", "--backend", "--hybrid",
        "--cpu-kernels", "--quant-dense"};
    const char *a = argv[*i];
    if (!strcmp(a, "--quiet")) {
        cli_progress_quiet();
        return 0;
    }
    size_t w = 0, n_with = sizeof with_value / sizeof with_value[0];
    while (w < n_with && strcmp(a, with_value[w]))
        w++;
    if (w == n_with)
        return -1;
    if (*i + 1 >= argc) {
        fprintf(stderr, "ferry %s: %s needs a value\n", cmd, a);
        return 2;
    }
    const char *v = argv[++*i];
    long long n;
    double f;
    int rc;
    if (!strcmp(a, "--temp")) {
        if ((rc = parse_f(a, v, 0, 1e6, &f)))
            return rc;
        sp->temperature = (float)f;
    } else if (!strcmp(a, "--top-k")) {
        if ((rc = parse_i64(a, v, 0, INT32_MAX, &n)))
            return rc;
        sp->top_k = (int32_t)n;
    } else if (!strcmp(a, "--top-p")) {
        if ((rc = parse_f(a, v, 0, 1, &f)))
            return rc;
        if (f <= 0)
            return bad_value(a, v, "a number in (0, 1]");
        sp->top_p = (float)f;
    } else if (!strcmp(a, "--seed")) {
        if ((rc = parse_i64(a, v, 0, LLONG_MAX, &n)))
            return rc;
        sp->seed = (uint64_t)n;
    } else if (!strcmp(a, "--threads")) {
        if ((rc = parse_i64(a, v, 0, 1024, &n)))
            return rc;
        mp->n_threads = (int32_t)n;
    } else if (!strcmp(a, "--backend")) {
        if ((rc = parse_backend(a, v, &mp->backend)))
            return rc;
    } else if (!strcmp(a, "--gpu-mem") || !strcmp(a, "--host-cache")) {
        unsigned long long bytes;
        if ((rc = parse_size(a, v, &bytes)))
            return rc;
        if (a[2] == 'g')
            mp->gpu_mem_bytes = bytes;
        else
            mp->host_cache_bytes = bytes;
    } else if (!strcmp(a, "--offload")) {
        if (!strcmp(v, "ram"))
            mp->offload = FERRY_OFFLOAD_RAM;
        else if (!strcmp(v, "nvme"))
            mp->offload = FERRY_OFFLOAD_NVME;
        else
            return bad_value(a, v, "ram or nvme");
    } else if (!strcmp(a, "--pack")) {
        mp->pack_path = v;
    } else if (!strcmp(a, "--reader")) {
        if (!strcmp(v, "auto"))
            mp->reader = FERRY_READ_AUTO;
        else if (!strcmp(v, "uring"))
            mp->reader = FERRY_READ_URING;
        else if (!strcmp(v, "pread"))
            mp->reader = FERRY_READ_PREAD;
        else
            return bad_value(a, v, "auto, uring or pread");
    } else if (!strcmp(a, "--policy")) {
        if ((rc = parse_policy(a, v, &mp->policy)))
            return rc;
    } else if (!strcmp(a, "--prefetch")) {
        if (!strcmp(v, "on"))
            mp->prefetch = 1;
        else if (!strcmp(v, "off"))
            mp->prefetch = 0;
        else
            return bad_value(a, v, "on or off");
    } else if (!strcmp(a, "--predictor")) {
        if ((rc = parse_predictor(a, v, &mp->predictor)))
            return rc;
    } else if (!strcmp(a, "--predictor-stats")) {
        mp->predictor_stats_path = v;
    } else if (!strcmp(a, "--lookahead")) {
        if ((rc = parse_i64(a, v, 1, 3, &n)))
            return rc;
        mp->lookahead = (int32_t)n;
    } else if (!strcmp(a, "--slots")) {
        if ((rc = parse_i64(a, v, 1, INT32_MAX, &n)))
            return rc;
        mp->max_slots = (int32_t)n;
    } else if (!strcmp(a, "--hybrid")) {
        return parse_name(a, v, g_hybrid_names, 3, "auto, off or cpu-experts", &mp->hybrid);
    } else if (!strcmp(a, "--cpu-kernels")) {
        static const char *const names[] = {"auto", "reference", "avx2", "avx512", "avx512bf16"};
        return parse_name(a, v, names, 5, "auto, reference, avx2, avx512 or avx512bf16",
                          &mp->cpu_kernels);
    } else if (!strcmp(a, "--quant-dense")) {
        static const char *const names[] = {"as-stored", "q8", "q4"};
        return parse_name(a, v, names, 3, "as-stored, q8 or q4", &mp->quant_dense);
    }
    return 0;
}

/* Reads a whole text file, or standard input for "-". */
static char *read_text_file(const char *path, size_t *len)
{
    int is_stdin = !strcmp(path, "-");
    FILE *f = is_stdin ? stdin : fopen(path, "rb");
    if (is_stdin)
        path = "standard input";
    if (!f) {
        fprintf(stderr, "ferry: cannot open %s: %s\n", path, strerror(errno));
        return NULL;
    }
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (n + 1 >= cap) {
            char *grown = realloc(buf, cap * 2);
            if (!grown) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = grown;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0)
            break;
    }
    if (buf && ferror(f)) {
        fprintf(stderr, "ferry: cannot read %s: %s\n", path, strerror(errno));
        free(buf);
        buf = NULL;
    }
    if (!is_stdin)
        fclose(f);
    if (buf) {
        buf[n] = 0;
        *len = n;
        /* every command reads text as UTF-8: anything else is this error, not a quieter
         * one later (a text without tokens, a parse error) */
        for (size_t i = 0; i < n;) {
            int32_t k = ferry_utf8_seq(buf + i, n - i);
            if (k <= 0) {
                fprintf(stderr, "ferry: %s is not UTF-8 text: %s at byte %zu\n", path,
                        k < 0 ? "an invalid sequence" : "a truncated character", i);
                free(buf);
                return NULL;
            }
            i += (size_t)k;
        }
    } else {
        fprintf(stderr, "ferry: cannot read %s\n", path);
    }
    return buf;
}

typedef struct {
    int stream;
    char *text; /* generated text, for --json */
    size_t len, cap;
    ferry_stop *stop; /* --stop strings, or NULL */
    int stopped;      /* one occurred: the text ends before it */
    int failed;       /* out of memory */
} run_sink;

/* Prints (or keeps, for --json) text. */
static int sink_put(run_sink *s, const char *text, size_t len)
{
    if (s->stream) {
        fwrite(text, 1, len, stdout);
        fflush(stdout);
        return 0;
    }
    if (s->len + len + 1 > s->cap) {
        size_t cap = (s->cap ? s->cap * 2 : 1024) + len;
        char *grown = realloc(s->text, cap);
        if (!grown)
            return 1;
        s->text = grown;
        s->cap = cap;
    }
    memcpy(s->text + s->len, text, len);
    s->len += len;
    s->text[s->len] = 0;
    return 0;
}

/* Each generated piece, through the --stop strings when there are any (serve/stop.h: the
 * text is cut before the first, as the server cuts it); nonzero ends generation. */
static int on_token(int32_t id, const char *text, size_t len, void *user)
{
    (void)id;
    run_sink *s = user;
    if (!s->stop)
        return s->failed = sink_put(s, text, len);
    ferry_stop_result r;
    if (ferry_stop_feed(s->stop, text, len, &r) || sink_put(s, r.text, r.len))
        return s->failed = 1;
    s->stopped = r.stopped;
    return r.stopped;
}

/* The warning --gpu-mem gets where the CPU backend computes. */
static void warn_simulated_device(const ferry_model_params *mp, int backend)
{
    if (mp->gpu_mem_bytes && backend == FERRY_BACKEND_CPU)
        fprintf(stderr, "ferry: warning: --gpu-mem on the CPU backend simulates a device: "
                "expert slots are extra copies in host memory, so it uses more memory and runs "
                "slower than no budget (it shows offloading at work, not a speedup)\n");
}

/* ferry_model_open, then the --gpu-mem warning. */
static ferry_status open_model(const char *dir, const ferry_model_params *mp, ferry_model **m)
{
    ferry_status st = ferry_model_open(dir, mp, m);
    if (st == FERRY_OK) {
        ferry_model_info info;
        ferry_model_get_info(*m, &info);
        warn_simulated_device(mp, info.backend);
    }
    return st;
}

static int fail_lib(const char *what, ferry_status st)
{
    fprintf(stderr, "ferry: %s: %s (%s)\n", what, ferry_last_error(), ferry_status_name(st));
    return 1;
}

static cJSON *stats_json(const ferry_stats *s)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "prompt_tokens", (double)s->n_prompt_tokens);
    cJSON_AddNumberToObject(o, "decode_tokens", (double)s->n_decode_tokens);
    cJSON_AddNumberToObject(o, "prefill_seconds", s->prefill_seconds);
    cJSON_AddNumberToObject(o, "decode_seconds", s->decode_seconds);
    cJSON_AddNumberToObject(o, "sample_seconds", s->sample_seconds);
    cJSON_AddNumberToObject(o, "prefill_tokens_per_s", s->prefill_tokens_per_s);
    cJSON_AddNumberToObject(o, "decode_tokens_per_s", s->decode_tokens_per_s);
    return o;
}

static cJSON *ids_json(const int32_t *ids, int32_t n)
{
    cJSON *a = cJSON_CreateArray();
    for (int32_t i = 0; i < n; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(ids[i]));
    return a;
}

#define MIB(x) ((double)(x) / (1024.0 * 1024.0))

/* The offload statistics into *o and a new per-layer array (free it), or NULL when nothing
 * is offloaded (or out of memory): what --stats prints and --json carries, read once. */
static ferry_layer_stats *get_offload_stats(const ferry_context *c, const ferry_model_info *info,
                                            ferry_offload_stats *o)
{
    ferry_layer_stats *ls = calloc((size_t)info->n_layers, sizeof *ls);
    if (!ls || ferry_context_get_offload_stats(c, o, ls, info->n_layers) != FERRY_OK ||
        !o->enabled) {
        free(ls);
        return NULL;
    }
    return ls;
}

/* Everything print_offload_stats prints, as JSON. */
static cJSON *offload_json(const ferry_offload_stats *op, const ferry_layer_stats *ls,
                           const ferry_model_info *info)
{
    const ferry_offload_stats o = *op;
    cJSON *r = cJSON_CreateObject();
    cJSON *plan = cJSON_AddObjectToObject(r, "memory_plan");
    cJSON_AddNumberToObject(plan, "budget_bytes", (double)o.budget_bytes);
    cJSON_AddNumberToObject(plan, "dense_bytes", (double)o.dense_bytes);
    cJSON_AddNumberToObject(plan, "context_bytes", (double)o.context_bytes);
    cJSON_AddNumberToObject(plan, "n_slots", o.n_slots);
    cJSON_AddNumberToObject(plan, "slot_bytes", (double)o.slot_bytes);
    cJSON_AddNumberToObject(plan, "slots_bytes", (double)o.slots_bytes);
    cJSON *x = cJSON_AddObjectToObject(r, "experts");
    cJSON_AddStringToObject(x, "tier", o.tier == FERRY_OFFLOAD_NVME ? "nvme" : "ram");
    if (o.tier == FERRY_OFFLOAD_NVME)
        cJSON_AddStringToObject(x, "reader", o.uses_uring ? "io_uring" : "pread");
    cJSON_AddNumberToObject(x, "uses", (double)(o.hits + o.misses + o.cpu_experts));
    cJSON_AddNumberToObject(x, "hits", (double)o.hits);
    cJSON_AddNumberToObject(x, "misses", (double)o.misses);
    cJSON_AddNumberToObject(x, "cpu_experts", (double)o.cpu_experts);
    cJSON_AddNumberToObject(x, "hit_rate", ferry_expert_hit_rate(o.hits, o.misses,
                                                                  o.cpu_experts));
    cJSON_AddNumberToObject(x, "bytes_to_device", (double)o.bytes_to_device);
    cJSON_AddNumberToObject(x, "bytes_from_disk", (double)o.bytes_from_disk);
    cJSON_AddNumberToObject(x, "stall_seconds", o.stall_seconds);
    cJSON_AddNumberToObject(x, "copy_seconds", o.copy_seconds);
    cJSON_AddNumberToObject(x, "fetch_gbps", o.copy_seconds > 0
                                                 ? (double)o.bytes_to_device / o.copy_seconds / 1e9
                                                 : 0.0);
    cJSON *pf = cJSON_AddObjectToObject(r, "prefetch");
    cJSON_AddNumberToObject(pf, "issued", (double)o.prefetch_issued);
    cJSON_AddNumberToObject(pf, "used", (double)o.prefetch_used);
    cJSON_AddNumberToObject(pf, "wasted", (double)o.prefetch_wasted);
    cJSON *h = cJSON_AddObjectToObject(r, "hybrid");
    cJSON_AddStringToObject(h, "mode", o.hybrid >= 0 && o.hybrid < 3 ? g_hybrid_names[o.hybrid]
                                                                      : "unknown");
    cJSON_AddNumberToObject(h, "cpu_experts", (double)o.cpu_experts);
    cJSON_AddNumberToObject(h, "cpu_tokens", (double)o.cpu_tokens);
    cJSON_AddNumberToObject(h, "cpu_bytes", (double)o.cpu_bytes);
    cJSON_AddNumberToObject(h, "cpu_seconds", o.cpu_seconds);
    cJSON_AddNumberToObject(h, "cpu_wait_seconds", o.cpu_wait_seconds);
    cJSON_AddNumberToObject(h, "cost_fetch_gbps", o.cost_fetch_bytes_per_s / 1e9);
    cJSON_AddNumberToObject(h, "cost_cpu_gbps", o.cost_cpu_bytes_per_s / 1e9);
    if (o.predictor > 0 && o.predictor < 4) {
        cJSON *pr = cJSON_AddObjectToObject(r, "predictor");
        cJSON_AddStringToObject(pr, "name", g_predictor_names[o.predictor]);
        cJSON_AddNumberToObject(pr, "k", info->n_experts_used);
        cJSON *la = cJSON_AddArrayToObject(pr, "lookahead");
        for (int d = 1; d <= 3; d++) {
            if (o.predictions[d] <= 0)
                continue;
            cJSON *e = cJSON_CreateObject();
            cJSON_AddNumberToObject(e, "distance", d);
            cJSON_AddNumberToObject(e, "precision", o.precision[d]);
            cJSON_AddNumberToObject(e, "recall", o.recall[d]);
            cJSON_AddNumberToObject(e, "predictions", (double)o.predictions[d]);
            cJSON_AddItemToArray(la, e);
        }
    }
    cJSON *layers = cJSON_AddArrayToObject(r, "layers");
    for (int32_t l = 0; l < info->n_layers; l++) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddNumberToObject(e, "layer", l);
        cJSON_AddNumberToObject(e, "hits", (double)ls[l].hits);
        cJSON_AddNumberToObject(e, "fetched", (double)ls[l].misses);
        cJSON_AddNumberToObject(e, "on_cpu", (double)ls[l].cpu_experts);
        cJSON_AddNumberToObject(e, "prefetch_issued", (double)ls[l].prefetch_issued);
        cJSON_AddNumberToObject(e, "prefetch_used", (double)ls[l].prefetch_used);
        cJSON_AddNumberToObject(e, "prefetch_wasted", (double)ls[l].prefetch_wasted);
        cJSON_AddNumberToObject(e, "evictions", (double)ls[l].evictions);
        cJSON_AddNumberToObject(e, "bytes_to_device", (double)ls[l].bytes_to_device);
        cJSON_AddNumberToObject(e, "bytes_from_disk", (double)ls[l].bytes_from_disk);
        cJSON_AddNumberToObject(e, "stall_seconds", ls[l].stall_seconds);
        cJSON_AddItemToArray(layers, e);
    }
    return r;
}

static void print_offload_stats(const ferry_offload_stats *op, const ferry_layer_stats *ls,
                                const ferry_model_info *info)
{
    const ferry_offload_stats o = *op;
    if (o.hybrid == FERRY_HYBRID_CPU_EXPERTS) {
        fprintf(stderr,
                "hybrid cpu-experts: every expert on the CPU: %lld expert runs over %lld token "
                "rows, %.1f MiB of weights read in %.3f s (%.2f GB/s)\n",
                (long long)o.cpu_experts, (long long)o.cpu_tokens, MIB(o.cpu_bytes),
                o.cpu_seconds, o.cpu_seconds > 0 ? (double)o.cpu_bytes / o.cpu_seconds / 1e9 : 0.0);
        return;
    }
    fprintf(stderr,
            "memory plan: budget %.1f MiB = dense %.1f MiB + KV cache and workspace %.1f MiB + "
            "%d expert slots x %.2f MiB (%.1f MiB)\n",
            MIB(o.budget_bytes), MIB(o.dense_bytes), MIB(o.context_bytes), (int)o.n_slots,
            MIB(o.slot_bytes), MIB(o.slots_bytes));
    if (o.hybrid == FERRY_HYBRID_AUTO)
        fprintf(stderr,
                "hybrid auto: %lld experts computed on the CPU (%lld token rows, %.1f MiB read, "
                "busy %.3f s, waited %.3f s) instead of fetched; cost model: fetch %.2f GB/s, "
                "CPU %.2f GB/s at one token\n",
                (long long)o.cpu_experts, (long long)o.cpu_tokens, MIB(o.cpu_bytes),
                o.cpu_seconds, o.cpu_wait_seconds, o.cost_fetch_bytes_per_s / 1e9,
                o.cost_cpu_bytes_per_s / 1e9);
    fprintf(stderr,
            "experts: %s tier%s, %lld uses: %lld in a slot, %lld fetched, %lld on the CPU; hit "
            "rate %.1f%%, %.1f MiB moved to the device, %.1f MiB read from disk, stalled "
            "%.3f s\n",
            o.tier == FERRY_OFFLOAD_NVME ? "nvme" : "ram",
            o.tier == FERRY_OFFLOAD_NVME ? (o.uses_uring ? " (io_uring)" : " (pread)") : "",
            (long long)(o.hits + o.misses + o.cpu_experts), (long long)o.hits,
            (long long)o.misses, (long long)o.cpu_experts,
            100.0 * ferry_expert_hit_rate(o.hits, o.misses, o.cpu_experts),
            MIB(o.bytes_to_device), MIB(o.bytes_from_disk), o.stall_seconds);
    if (o.copy_seconds > 0)
        fprintf(stderr, "fetch rate: %.2f GB/s (%.1f MiB in %.3f s of copies)\n",
                (double)o.bytes_to_device / o.copy_seconds / 1e9, MIB(o.bytes_to_device),
                o.copy_seconds);
    fprintf(stderr, "prefetch: %lld issued, %lld used, %lld wasted\n",
            (long long)o.prefetch_issued, (long long)o.prefetch_used,
            (long long)o.prefetch_wasted);
    if (o.predictor > 0 && o.predictor < 4) {
        fprintf(stderr, "predictor %s, live on decoded tokens:", g_predictor_names[o.predictor]);
        for (int d = 1; d <= 3; d++)
            if (o.predictions[d] > 0)
                fprintf(stderr, "  lookahead %d: precision@%d %.3f recall@%d %.3f (%lld)", d,
                        (int)info->n_experts_used, o.precision[d], (int)info->n_experts_used,
                        o.recall[d], (long long)o.predictions[d]);
        fprintf(stderr, "\n");
    }
    fprintf(stderr, "layer   hits fetched on-cpu  prefetch issued/used/wasted  evictions  "
                    "to device MiB  from disk MiB  stall s\n");
    for (int32_t l = 0; l < info->n_layers; l++) {
        char pre[48];
        snprintf(pre, sizeof pre, "%lld/%lld/%lld", (long long)ls[l].prefetch_issued,
                 (long long)ls[l].prefetch_used, (long long)ls[l].prefetch_wasted);
        fprintf(stderr, "%5d %6lld %7lld %6lld  %27s  %9lld  %13.1f  %13.1f  %7.3f\n", (int)l,
                (long long)ls[l].hits, (long long)ls[l].misses, (long long)ls[l].cpu_experts,
                pre, (long long)ls[l].evictions, MIB(ls[l].bytes_to_device),
                MIB(ls[l].bytes_from_disk), ls[l].stall_seconds);
    }
}

static const char *const pack_usage =
    "usage: ferry pack MODEL_DIR OUT_FILE [--quant q8|q4] [--quiet]\n";

static int cmd_pack(int argc, char **argv)
{
    if (argc == 1 && (!strcmp(argv[0], "-h") || !strcmp(argv[0], "--help"))) {
        printf("%s\nWrites the packed expert file (every expert's w1, w3, w2, 4 KiB aligned, "
               "with checksums) that --pack FILE reads, in every mode and for --offload nvme.\n"
               "\n"
               "      --quant q8|q4   quantize the experts in groups of 32 weights: q8 an f16\n"
               "                      scale and 32 int8 (8.5 bits per weight), q4 an f16 scale,\n"
               "                      an f16 minimum and 32 x 4 bits (5 bits per weight).\n"
               "                      Without it the experts keep the checkpoint's dtype.\n"
               "                      The dense weights are not in the pack.\n"
               "      --quiet         no progress line on the terminal\n",
               pack_usage);
        return 0;
    }
    ferry_pack_params pp = ferry_pack_params_default();
    const char *pos[2];
    int n_pos = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--quant")) {
            const char *val = i + 1 < argc ? argv[++i] : NULL;
            if (val && !strcmp(val, "q8")) {
                pp.format = FERRY_PACK_Q8;
            } else if (val && !strcmp(val, "q4")) {
                pp.format = FERRY_PACK_Q4;
            } else {
                fprintf(stderr, "ferry pack: --quant takes q8 or q4, not '%s'\n%s",
                        val ? val : "(nothing)", pack_usage);
                return 2;
            }
        } else if (!strcmp(argv[i], "--quiet")) {
            cli_progress_quiet();
        } else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "ferry pack: unknown option '%s'\n%s", argv[i], pack_usage);
            return 2;
        } else if (n_pos < 2) {
            pos[n_pos++] = argv[i];
        } else {
            fprintf(stderr, "ferry pack: unexpected argument '%s'\n%s", argv[i], pack_usage);
            return 2;
        }
    }
    if (n_pos != 2) {
        fprintf(stderr, "%s", pack_usage);
        return 2;
    }
    ferry_status st = ferry_pack_model(pos[0], pos[1], &pp);
    if (st) {
        fprintf(stderr, "ferry pack: %s (%s)\n", ferry_last_error(), ferry_status_name(st));
        return 1;
    }
    return 0;
}

/* ---- ferry synth ---------------------------------------------------------------------- */

static void usage_synth(FILE *f)
{
    fprintf(f,
            "usage: ferry synth OUT_DIR [options]\n"
            "\n"
            "Writes a checkpoint with a real model's shape and random weights (the same seed\n"
            "gives the same bytes) into OUT_DIR, which must not exist or be empty (or hold only\n"
            "a killed synth's temporaries, which are removed): config.json,\n"
            "safetensors shards and the tokenizer files, for benchmarks at full scale.\n"
            "\n"
            "      --preset P      the shape, from the real model's config.json:\n"
            "                        mixtral-8x7b (default), tiny (the bundled\n"
            "                        models/tiny-moe-code): Mixtral\n"
            "                        qwen3-30b-a3b, qwen3-235b-a22b: Qwen3-MoE\n"
            "                        qwen1.5-moe-a2.7b: Qwen2-MoE (shared expert)\n"
            "                        olmoe-1b-7b: OLMoE\n"
            "      --layers N, --hidden N, --intermediate N (one expert), --experts N,\n"
            "      --top-k N, --heads N, --kv-heads N, --vocab N, --head-dim N (0: hidden /\n"
            "      heads), --dense-intermediate N (Qwen's intermediate_size),\n"
            "      --shared-intermediate N (Qwen2-MoE's shared expert)\n"
            "                      override the preset's shape\n"
            "      --dtype D       bf16 (default), f16 or f32\n"
            "      --seed S        random seed (default 0)\n"
            "      --threads N     writer threads; 0 = every core (default 0)\n"
            "      --shard-size SIZE  most bytes per shard, with K/M/G suffixes (default 4G);\n"
            "                      one shard is written as model.safetensors\n"
            "      --tokenizer DIR copy tokenizer.json (and tokenizer_config.json,\n"
            "                      special_tokens_map.json, tokenizer.model) from DIR\n"
            "                      (default: Mixtral presets models/tiny-moe-code; the others\n"
            "                      get a byte-level BPE tokenizer written to fill the\n"
            "                      vocabulary, with the model's special tokens)\n"
            "      --quiet         no progress line on the terminal\n");
}

/* "3.43 GB" or "10.6 MB" (decimal units, as disks are sold). */
static void synth_size(char *buf, size_t cap, double bytes)
{
    if (bytes >= 1e9)
        snprintf(buf, cap, "%.2f GB", bytes / 1e9);
    else
        snprintf(buf, cap, "%.1f MB", bytes / 1e6);
}

static int cmd_synth(int argc, char **argv)
{
    enum { N_SHAPE = 11 };
    static const char *const shape_opts[N_SHAPE] = {
        "--layers", "--hidden", "--intermediate", "--experts", "--top-k", "--heads",
        "--kv-heads", "--vocab", "--head-dim", "--dense-intermediate", "--shared-intermediate"};
    static const long long shape_min[N_SHAPE] = {1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1};
    static const char *const other_opts[6] = {"--preset", "--dtype", "--seed", "--threads",
                                              "--shard-size", "--tokenizer"};
    static const char *const dtype_names[3] = {"bf16", "f16", "f32"};
    long long shape[N_SHAPE], n;
    for (int k = 0; k < N_SHAPE; k++)
        shape[k] = -1;
    const char *out_dir = NULL, *preset = "mixtral-8x7b", *tok_dir = NULL;
    ferry_synth_params p = ferry_synth_params_default();
    int rc;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage_synth(stdout);
            return 0;
        }
        if (!strcmp(a, "--quiet")) {
            cli_progress_quiet();
            continue;
        }
        if (a[0] != '-') {
            if (out_dir) {
                fprintf(stderr, "ferry synth: unexpected argument '%s'\n", a);
                return 2;
            }
            out_dir = a;
            continue;
        }
        int shape_k = -1, known = 0;
        for (int k = 0; k < N_SHAPE; k++)
            if (!strcmp(a, shape_opts[k]))
                shape_k = k;
        for (int k = 0; k < 6; k++)
            if (!strcmp(a, other_opts[k]))
                known = 1;
        if (shape_k < 0 && !known) {
            fprintf(stderr, "ferry synth: unknown option '%s'\n", a);
            return 2;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "ferry synth: %s needs a value\n", a);
            return 2;
        }
        const char *v = argv[++i];
        if (shape_k >= 0) {
            if ((rc = parse_i64(a, v, shape_min[shape_k], INT32_MAX, &shape[shape_k])))
                return rc;
        } else if (!strcmp(a, "--preset")) {
            preset = v;
        } else if (!strcmp(a, "--dtype")) {
            if ((rc = parse_name(a, v, dtype_names, 3, "bf16, f16 or f32", &p.dtype)))
                return rc;
        } else if (!strcmp(a, "--seed")) {
            if ((rc = parse_i64(a, v, 0, LLONG_MAX, &n)))
                return rc;
            p.seed = (uint64_t)n;
        } else if (!strcmp(a, "--threads")) {
            if ((rc = parse_i64(a, v, 0, 1024, &n)))
                return rc;
            p.n_threads = (int32_t)n;
        } else if (!strcmp(a, "--shard-size")) {
            unsigned long long bytes;
            if ((rc = parse_size(a, v, &bytes)))
                return rc;
            p.shard_bytes = bytes;
        } else {
            tok_dir = v;
        }
    }
    if (!out_dir) {
        fprintf(stderr, "usage: ferry synth OUT_DIR [--preset NAME] [options] (ferry synth "
                        "--help)\n");
        return 2;
    }
    /* the preset first, whatever the order of the options: explicit sizes override it */
    if (ferry_synth_preset(preset, &p) != FERRY_OK) {
        fprintf(stderr, "ferry synth: --preset: %s\n", ferry_last_error());
        return 2;
    }
    int32_t *fields[N_SHAPE] = {&p.n_layers,   &p.d_model,        &p.d_ff,
                                &p.n_experts,  &p.n_experts_used, &p.n_heads,
                                &p.n_kv_heads, &p.n_vocab,        &p.head_dim,
                                &p.d_ff_dense, &p.d_ff_shared};
    for (int k = 0; k < N_SHAPE; k++)
        if (shape[k] >= 0)
            *fields[k] = (int32_t)shape[k];
    if (shape[7] >= 0) /* --vocab: a generated tokenizer fills it */
        p.n_bpe_tokens = 0;
    /* Mixtral checkpoints copy a tokenizer; the other families write their own */
    int copies = !p.model_type || !strcmp(p.model_type, "mixtral");
    if (!tok_dir && copies) {
        FILE *t = fopen("models/tiny-moe-code/tokenizer.json", "rb");
        if (t) {
            fclose(t);
            tok_dir = "models/tiny-moe-code";
        }
#ifdef FERRY_SOURCE_DIR
        else {
            tok_dir = FERRY_SOURCE_DIR "/models/tiny-moe-code";
        }
#endif
        if (!tok_dir) {
            fprintf(stderr, "ferry synth: no models/tiny-moe-code here to take the tokenizer "
                            "from; give --tokenizer DIR\n");
            return 2;
        }
    }
    p.tokenizer_dir = tok_dir;

    ferry_synth_info info;
    ferry_status st = ferry_synth_plan(&p, &info);
    if (st) {
        fprintf(stderr, "ferry synth: %s (%s)\n", ferry_last_error(), ferry_status_name(st));
        return st == FERRY_ERR_INVALID ? 2 : 1;
    }
    char size[32], params[32];
    synth_size(size, sizeof size, (double)info.total_bytes);
    if (info.n_params >= 1000000000)
        snprintf(params, sizeof params, "%.2fB", (double)info.n_params / 1e9);
    else
        snprintf(params, sizeof params, "%.1fM", (double)info.n_params / 1e6);
    fprintf(stderr,
            "ferry synth: writing %s (%s parameters, %s, %d layer%s, %d experts) in %d "
            "shard%s to %s with %d thread%s\n",
            size, params, dtype_names[p.dtype], (int)p.n_layers,
            p.n_layers == 1 ? "" : "s", (int)p.n_experts, (int)info.n_shards,
            info.n_shards == 1 ? "" : "s", out_dir, (int)info.n_threads,
            info.n_threads == 1 ? "" : "s");
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    st = ferry_synth(&p, out_dir);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (st) {
        fprintf(stderr, "ferry synth: %s (%s)\n", ferry_last_error(), ferry_status_name(st));
        return st == FERRY_ERR_INVALID ? 2 : 1;
    }
    double s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    fprintf(stderr, "ferry synth: wrote %s in %d shard%s (%d tensors) to %s in %.2f s, "
                    "%.2f GB/s\n",
            size, (int)info.n_shards, info.n_shards == 1 ? "" : "s", (int)info.n_tensors,
            out_dir, s, s > 0 ? (double)info.total_bytes / 1e9 / s : 0.0);
    return 0;
}

static ferry_model *open_plain(const char *cmd, const char *dir)
{
    ferry_model *m;
    ferry_model_params mp;
    if (cli_model_params(&mp))
        return NULL;
    ferry_status st = ferry_model_open(dir, &mp, &m);
    if (st) {
        fprintf(stderr, "ferry %s: cannot load the model: %s (%s)\n", cmd, ferry_last_error(),
                ferry_status_name(st));
        return NULL;
    }
    return m;
}

/* --out - for the binary outputs the library writes to a path: the library writes a private
 * file in $TMPDIR (or /tmp), then it is copied to stdout and removed. */
typedef struct {
    ferry_temp tmp;   /* --out -: the private file (core/tempfile.h: a signal removes it) */
    const char *path; /* what the library writes: tmp's path, or the --out path itself */
} out_file;

/* 0, or 1 with the reason printed (stdout a terminal, no temporary). */
static int out_file_open(out_file *o, const char *cmd, const char *path)
{
    memset(&o->tmp, 0, sizeof o->tmp);
    o->path = path;
    if (strcmp(path, "-"))
        return 0;
    if (isatty(STDOUT_FILENO)) {
        fprintf(stderr, "ferry %s: --out - writes binary data; redirect stdout to a file or a "
                        "pipe\n", cmd);
        return 1;
    }
    const char *dir = getenv("TMPDIR");
    char target[4096];
    snprintf(target, sizeof target, "%s/ferry-out-%ld", dir && *dir ? dir : "/tmp",
             (long)getpid());
    if (ferry_temp_begin(target, &o->tmp)) {
        fprintf(stderr, "ferry %s: out of memory\n", cmd);
        return 1;
    }
    o->path = o->tmp.path;
    return 0;
}

/* After the library wrote o->path: with --out -, its bytes to stdout (when ok), and the
 * temporary removed either way. 0, or 1 when the copy failed. */
static int out_file_close(out_file *o, const char *cmd, int ok)
{
    if (!o->tmp.path)
        return 0;
    int rc = 0;
    if (ok) {
        FILE *f = fopen(o->tmp.path, "rb");
        char buf[1 << 16];
        size_t n;
        while (f && (n = fread(buf, 1, sizeof buf, f)) > 0)
            if (fwrite(buf, 1, n, stdout) != n)
                break;
        if (!f || ferror(f) || fflush(stdout) != 0 || ferror(stdout)) {
            fprintf(stderr, "ferry %s: cannot copy the output to stdout: %s\n", cmd,
                    strerror(errno));
            rc = 1;
        }
        if (f)
            fclose(f);
    }
    ferry_temp_abort(&o->tmp);
    return rc;
}

static int cmd_trace(int argc, char **argv)
{
    const char *dir = NULL, *input = NULL, *out = NULL;
    long long seq_len = 512;
    int probs = 0, rc;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: ferry trace MODEL_DIR --input TEXT_FILE --out TRACE [--seq-len N] "
                   "[--probs] [--quiet]\n\nRuns the model over the text in sequences of up to "
                   "N tokens (default 512, each starting with BOS) and writes its routing trace\n"
                   "(moe-routing-trace v1); --probs adds the router probabilities.\n"
                   "--input - reads the text from stdin, --out - writes the trace to stdout.\n");
            return 0;
        } else if ((!strcmp(a, "--input") || !strcmp(a, "--out") || !strcmp(a, "--seq-len")) &&
                   !v) {
            fprintf(stderr, "ferry trace: %s needs a value\n", a);
            return 2;
        } else if (!strcmp(a, "--input")) {
            input = argv[++i];
        } else if (!strcmp(a, "--out")) {
            out = argv[++i];
        } else if (!strcmp(a, "--seq-len")) {
            if ((rc = parse_i64(a, argv[++i], 2, 1 << 20, &seq_len)))
                return rc;
        } else if (!strcmp(a, "--probs")) {
            probs = 1;
        } else if (!strcmp(a, "--quiet")) {
            cli_progress_quiet();
        } else if (a[0] == '-') {
            fprintf(stderr, "ferry trace: unknown option '%s'\n", a);
            return 2;
        } else if (!dir) {
            dir = a;
        } else {
            fprintf(stderr, "ferry trace: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!dir || !input || !out) {
        fprintf(stderr, "usage: ferry trace MODEL_DIR --input TEXT_FILE --out TRACE\n");
        return 2;
    }
    size_t len;
    char *text = read_text_file(input, &len);
    if (!text)
        return 1;
    out_file of;
    if (out_file_open(&of, "trace", out)) {
        free(text);
        return 1;
    }
    ferry_model *m = open_plain("trace", dir);
    rc = 1;
    if (m) {
        int64_t n = 0;
        ferry_status st = ferry_trace_text(m, text, len, (int32_t)seq_len, probs, of.path, &n);
        if (st)
            fprintf(stderr, "ferry trace: %s (%s)\n", ferry_last_error(), ferry_status_name(st));
        else
            fprintf(stderr, "ferry trace: %lld tokens routed, written to %s\n", (long long)n,
                    strcmp(out, "-") ? out : "stdout");
        rc = st ? 1 : 0;
    }
    if (out_file_close(&of, "trace", rc == 0))
        rc = 1;
    ferry_model_close(m);
    free(text);
    return rc;
}

static void print_sim(const char *what, const ferry_sim_report *r)
{
    printf("%s: hit rate %.1f%% (%lld of %lld lookups), %lld experts moved", what,
           100.0 * r->hit_rate,
           (long long)r->hits, (long long)r->lookups, (long long)r->experts_moved);
    if (r->expert_bytes)
        printf(" (%.1f MiB)", (double)r->bytes_moved / 1048576.0);
    if (r->prefetch_issued) {
        printf(", prefetches %lld issued, %lld used, %lld wasted", (long long)r->prefetch_issued,
               (long long)r->prefetch_used, (long long)r->prefetch_wasted);
        if (r->expert_bytes)
            printf(" (%.1f MiB)", (double)r->prefetch_bytes_wasted / 1048576.0);
    }
    printf("\n");
}

static void print_report(const ferry_predictor_report *r, const ferry_sim_options *o)
{
    static const char *policies[] = {"lru", "lfu", "layer-lru", "predicted"};
    for (int d = 1; d <= 3; d++)
        if (r->predictions[d] > 0)
            printf("lookahead %d: precision@%d %.3f recall@%d %.3f\n", d, (int)r->k,
                   r->precision[d], (int)r->k, r->recall[d]);
    printf("cost: %.2f us per token\n", r->seconds_per_token * 1e6);
    const ferry_sim_report *a = &r->cache_only, *b = &r->with_prefetch;
    printf("cache of %d of %d experts, %s:\n", (int)a->n_slots, (int)a->n_experts_total,
           policies[o->policy == FERRY_CACHE_PREDICTED ? FERRY_CACHE_LRU : o->policy]);
    print_sim("  without prefetch", a);
    char what[96];
    snprintf(what, sizeof what, "  prefetch, lookahead %d, %s", o->lookahead ? (int)o->lookahead : 1,
             policies[o->policy]);
    print_sim(what, b);
    printf("  Belady (best demand paging, no prefetch): hit rate %.1f%%\n",
           100.0 * a->belady_hit_rate);
}

static int cmd_sim(int argc, char **argv)
{
    if (argc < 1 || !strcmp(argv[0], "-h") || !strcmp(argv[0], "--help")) {
        FILE *f = argc < 1 ? stderr : stdout;
        fprintf(f, "usage: ferry sim TRACE --slots N [--policy lru|lfu|layer-lru|predicted]\n"
                   "                 [--predictor stats --predictor-stats FILE]\n"
                   "                 [--lookahead D] [--expert-bytes SIZE]\n\n"
                   "Replays a routing trace through ferry's expert cache and prefetch pipeline\n"
                   "with N device slots and reports the hit rate, the experts (and, with\n"
                   "--expert-bytes, bytes) moved and the prefetches wasted, next to Belady's\n"
                   "optimal demand paging for N slots. With --predictor the predictor's experts\n"
                   "for layers l+1..l+D are prefetched after layer l (D = --lookahead, 1..3).\n");
        return argc < 1 ? 2 : 0;
    }
    ferry_sim_options o = ferry_sim_options_default();
    const char *trace = NULL;
    int have_slots = 0, rc;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--slots"))
            have_slots = 1;
        if ((rc = parse_sim_option("sim", argc, argv, &i, &o)) >= 0) {
            if (rc)
                return rc;
        } else if (!strcmp(a, "--predictor") || !strcmp(a, "--predictor-stats")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "ferry sim: %s needs a value\n", a);
                return 2;
            }
            const char *v = argv[++i];
            if (!strcmp(a, "--predictor-stats")) {
                o.predictor_stats_path = v;
            } else {
                if ((rc = parse_predictor(a, v, &o.predictor)))
                    return rc;
                if (o.predictor != FERRY_PREDICT_STATS) {
                    fprintf(stderr, "ferry sim: a trace has no hidden states: --predictor stats "
                                    "(ferry predictor eval --text runs gate and combined)\n");
                    return 2;
                }
                o.prefetch = 1;
            }
        } else if (a[0] == '-') {
            fprintf(stderr, "ferry sim: unknown option '%s'\n", a);
            return 2;
        } else if (!trace) {
            trace = a;
        } else {
            fprintf(stderr, "ferry sim: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!trace || !have_slots) {
        fprintf(stderr, "usage: ferry sim TRACE --slots N [options] (ferry sim --help)\n");
        return 2;
    }
    if (o.prefetch && !o.predictor_stats_path) {
        fprintf(stderr, "ferry sim: --predictor stats needs --predictor-stats FILE (ferry "
                        "predictor fit)\n");
        return 2;
    }
    if (o.policy == FERRY_CACHE_PREDICTED && !o.prefetch) {
        fprintf(stderr, "ferry sim: --policy predicted needs --predictor\n");
        return 2;
    }
    ferry_sim_report r;
    ferry_status st = ferry_sim_trace_file(trace, &o, &r);
    if (st) {
        fprintf(stderr, "ferry sim: %s (%s)\n", ferry_last_error(), ferry_status_name(st));
        return 1;
    }
    static const char *policies[] = {"lru", "lfu", "layer-lru", "predicted"};
    printf("%s: %d slots of %d experts, %s", trace, (int)r.n_slots, (int)r.n_experts_total,
           policies[o.policy]);
    if (o.prefetch)
        printf(", stats prefetch, lookahead %d", (int)o.lookahead);
    printf("\n");
    print_sim("sim", &r);
    printf("Belady (best demand paging, no prefetch): hit rate %.1f%%\n",
           100.0 * r.belady_hit_rate);
    return 0;
}

static void usage_predictor(FILE *f)
{
    fprintf(f, "usage: ferry predictor fit TRACE... --out FILE\n"
               "       ferry predictor eval MODEL_DIR (--text FILE | --trace TRACE)\n"
               "                            [--predictor gate|stats|combined]\n"
               "                            [--predictor-stats FILE] [--seq-len N]\n"
               "                            [--slots N] [--policy P] [--lookahead D]\n"
               "                            [--expert-bytes SIZE] [--quiet]\n\n"
               "fit: routing statistics from traces, for the stats and combined predictors\n"
               "(--out - writes them to stdout).\n"
               "eval: precision@k and recall@k of a predictor at lookahead 1, 2, 3 (live\n"
               "over a text, or over a trace for the stats predictor), and the hit rate of\n"
               "an expert cache of N slots (default: a quarter of all experts) without and\n"
               "with its prefetches (lookahead D, default 1), by replaying the routing\n"
               "through ferry's cache and prefetch pipeline.\n");
}

static int has_help(int argc, char **argv)
{
    for (int i = 0; i < argc; i++)
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help"))
            return 1;
    return 0;
}

static int cmd_predictor(int argc, char **argv)
{
    if (argc < 1 || has_help(argc, argv)) { /* ferry predictor [fit|eval] --help */
        usage_predictor(argc < 1 ? stderr : stdout);
        return argc < 1 ? 2 : 0;
    }
    int rc;
    if (!strcmp(argv[0], "fit")) {
        const char *out = NULL;
        const char **paths = calloc((size_t)argc, sizeof *paths);
        int32_t n = 0;
        if (!paths)
            return 1;
        for (int i = 1; i < argc; i++) {
            if (!strcmp(argv[i], "--out") && i + 1 < argc) {
                out = argv[++i];
            } else if (argv[i][0] == '-') {
                fprintf(stderr, "ferry predictor fit: unknown option '%s'\n", argv[i]);
                free(paths);
                return 2;
            } else {
                paths[n++] = argv[i];
            }
        }
        if (!out || n == 0) {
            fprintf(stderr, "usage: ferry predictor fit TRACE... --out FILE\n");
            free(paths);
            return 2;
        }
        out_file of;
        if (out_file_open(&of, "predictor fit", out)) {
            free(paths);
            return 1;
        }
        ferry_status st = ferry_predictor_fit(paths, n, of.path);
        free(paths);
        if (st)
            fprintf(stderr, "ferry predictor fit: %s (%s)\n", ferry_last_error(),
                    ferry_status_name(st));
        return out_file_close(&of, "predictor fit", st == FERRY_OK) || st ? 1 : 0;
    }
    if (strcmp(argv[0], "eval") != 0) {
        fprintf(stderr, "ferry predictor: unknown subcommand '%s' (fit or eval)\n", argv[0]);
        return 2;
    }
    const char *dir = NULL, *text_path = NULL, *trace_path = NULL, *stats = NULL;
    int32_t kind = 1; /* gate */
    long long seq_len = 512;
    ferry_sim_options so = ferry_sim_options_default();
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if ((rc = parse_sim_option("predictor eval", argc, argv, &i, &so)) >= 0) {
            if (rc)
                return rc;
            continue;
        }
        int takes = !strcmp(a, "--text") || !strcmp(a, "--trace") || !strcmp(a, "--predictor") ||
                    !strcmp(a, "--predictor-stats") || !strcmp(a, "--seq-len");
        if (takes && !v) {
            fprintf(stderr, "ferry predictor eval: %s needs a value\n", a);
            return 2;
        }
        if (!strcmp(a, "--text")) {
            text_path = argv[++i];
        } else if (!strcmp(a, "--trace")) {
            trace_path = argv[++i];
        } else if (!strcmp(a, "--predictor-stats")) {
            stats = argv[++i];
        } else if (!strcmp(a, "--predictor")) {
            if ((rc = parse_predictor(a, argv[++i], &kind)))
                return rc;
            if (kind == 0) {
                fprintf(stderr, "ferry predictor eval: evaluate gate, stats or combined\n");
                return 2;
            }
        } else if (!strcmp(a, "--seq-len")) {
            if ((rc = parse_i64(a, argv[++i], 2, 1 << 20, &seq_len)))
                return rc;
        } else if (!strcmp(a, "--quiet")) {
            cli_progress_quiet();
        } else if (a[0] == '-') {
            fprintf(stderr, "ferry predictor eval: unknown option '%s'\n", a);
            return 2;
        } else if (!dir && !trace_path) {
            dir = a;
        } else {
            fprintf(stderr, "ferry predictor eval: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!!text_path + !!trace_path != 1 || (text_path && !dir)) {
        fprintf(stderr, "usage: ferry predictor eval MODEL_DIR (--text FILE | --trace TRACE)\n");
        return 2;
    }
    ferry_predictor_report r;
    ferry_status st;
    if (trace_path) {
        if (kind != 2) {
            fprintf(stderr, "ferry predictor eval: a trace has no hidden states; with --trace "
                            "use --predictor stats\n");
            return 2;
        }
        st = ferry_predictor_eval_trace_file(trace_path, stats, &so, &r);
    } else {
        size_t len;
        char *text = read_text_file(text_path, &len);
        if (!text)
            return 1;
        ferry_model *m = open_plain("predictor eval", dir);
        if (!m) {
            free(text);
            return 1;
        }
        st = ferry_predictor_eval_text(m, text, len, (int32_t)seq_len, kind, stats, &so, &r);
        ferry_model_close(m);
        free(text);
    }
    if (st) {
        fprintf(stderr, "ferry predictor eval: %s (%s)\n", ferry_last_error(),
                ferry_status_name(st));
        return 1;
    }
    print_report(&r, &so);
    return 0;
}

static void usage_batch(FILE *f)
{
    fprintf(f,
            "usage: ferry batch MODEL_DIR --prompts IN.jsonl --out OUT.jsonl [options]\n"
            "\n"
            "Offline batch generation. Each line of IN.jsonl is a JSON object with \"prompt\"\n"
            "(text) and optionally \"max_tokens\" and \"id\"; OUT.jsonl (- for stdout) gets one\n"
            "object per prompt, in input order: id, prompt, text, tokens, finish (\"eos\" or\n"
            "\"length\"). Nothing computed is lost: a text that cannot be decoded is written as\n"
            "its ids with an \"error\"; if generation fails, what each prompt got so far is\n"
            "written with finish \"error\"; if OUT cannot be written, the lines go to a file in\n"
            "$TMPDIR (named on stderr). Any of these exits 1.\n"
            "All prompts advance together; each layer's MoE block runs the step's tokens in\n"
            "layer-batches, and cross-batch reordering puts tokens that route to the same\n"
            "experts into the same layer-batch. Outputs are identical either way.\n"
            "\n"
            "  -n, --n-predict N   tokens per prompt when a line has no max_tokens (default 64)\n"
            "      --max-batch N   most tokens per layer-batch (default 16)\n"
            "      --chunk N       most prompt tokens a sequence feeds per step (default 64)\n"
            "      --reorder on|off  cross-batch token reordering (default on)\n"
            "      --compare       also run the other order, check the outputs are identical and\n"
            "                      print both runs' expert loads and bytes\n"
            "      --ignore-eos    generate max_tokens even past EOS\n"
            "  and ferry run's sampling and model options: --temp --top-k --top-p --seed\n"
            "  --threads --backend --gpu-mem --offload --pack --host-cache --reader --policy --prefetch\n"
            "  --predictor --predictor-stats --lookahead --slots --hybrid --cpu-kernels\n"
            "  --quant-dense\n");
}

typedef struct {
    char *prompt;
    cJSON *id; /* owned copy, or NULL */
    int32_t *ids, n_ids, max_tokens;
    int32_t *out, n_out;
} batch_item;

/* The first member of a batch line that is not prompt, max_tokens or id, or NULL. */
static const char *unknown_field(const cJSON *o)
{
    for (const cJSON *f = o->child; f; f = f->next)
        if (strcmp(f->string, "prompt") && strcmp(f->string, "max_tokens") &&
            strcmp(f->string, "id"))
            return f->string;
    return NULL;
}

/* Reads IN.jsonl: one object per non-empty line. */
static batch_item *read_prompts(const char *path, long long default_n, int32_t *n_items)
{
    size_t len;
    char *text = read_text_file(path, &len);
    if (!text)
        return NULL;
    batch_item *items = NULL;
    int32_t n = 0, cap = 0, line_no = 0, ok = 1;
    for (char *line = text, *next; line && ok; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = 0;
        line_no++;
        if (strspn(line, " \t\r") == strlen(line))
            continue;
        cJSON *o = cJSON_Parse(line);
        cJSON *p = o ? cJSON_GetObjectItemCaseSensitive(o, "prompt") : NULL;
        cJSON *mt = o ? cJSON_GetObjectItemCaseSensitive(o, "max_tokens") : NULL;
        if (!cJSON_IsObject(o) || !cJSON_IsString(p) || !p->valuestring[0] ||
            (mt && (!cJSON_IsNumber(mt) || mt->valuedouble < 0 || mt->valuedouble > 1e7 ||
                    mt->valuedouble != (double)(int32_t)mt->valuedouble))) {
            fprintf(stderr, "ferry batch: %s line %d: expected {\"prompt\": \"non-empty text\"%s}\n",
                    path, (int)line_no, mt ? ", \"max_tokens\": a count >= 0" : "");
            ok = 0;
        } else if (unknown_field(o)) { /* honoured or refused, never ignored */
            fprintf(stderr, "ferry batch: %s line %d: the field '%s' is not supported here "
                    "(prompt, max_tokens, id; sampling comes from the command line)\n", path,
                    (int)line_no, unknown_field(o));
            ok = 0;
        } else {
            if (n == cap) {
                cap = cap ? cap * 2 : 16;
                batch_item *grown = realloc(items, (size_t)cap * sizeof *items);
                if (!grown) {
                    cJSON_Delete(o);
                    ok = 0;
                    break;
                }
                items = grown;
            }
            batch_item *it = &items[n++];
            memset(it, 0, sizeof *it);
            it->prompt = strdup(p->valuestring);
            cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "id");
            it->id = id ? cJSON_Duplicate(id, 1) : NULL;
            it->max_tokens = mt ? (int32_t)mt->valuedouble : (int32_t)default_n;
            ok = it->prompt != NULL;
        }
        cJSON_Delete(o);
    }
    free(text);
    if (ok && n == 0) {
        fprintf(stderr, "ferry batch: %s has no prompts\n", path);
        ok = 0;
    }
    if (!ok) {
        for (int32_t i = 0; i < n; i++) {
            free(items[i].prompt);
            cJSON_Delete(items[i].id);
        }
        free(items);
        return NULL;
    }
    *n_items = n;
    return items;
}

static void print_batch_stats(const char *what, const ferry_batch_stats *s, const int64_t *loads,
                              int32_t n_layers)
{
    fprintf(stderr, "%s: %lld steps, %lld tokens, %lld layer-batches, %lld expert loads "
                    "(%.2f per layer-batch), %.1f MiB of experts at %.2f MiB each",
            what, (long long)s->steps, (long long)s->tokens, (long long)s->layer_batches,
            (long long)s->expert_loads,
            s->layer_batches ? (double)s->expert_loads / (double)s->layer_batches : 0.0,
            (double)s->expert_loads * (double)s->expert_bytes / 1048576.0,
            (double)s->expert_bytes / 1048576.0);
    if (s->hits + s->misses + s->cpu_experts > 0)
        fprintf(stderr, "; expert cache: hit rate %.1f%%, %.1f MiB moved to the device",
                100.0 * ferry_expert_hit_rate(s->hits, s->misses, s->cpu_experts),
                (double)s->bytes_to_device / 1048576.0);
    if (s->cpu_experts > 0)
        fprintf(stderr, "; %lld expert runs on the CPU (--hybrid)", (long long)s->cpu_experts);
    fprintf(stderr, "; %.2f s, %.1f tokens/s\n", s->seconds,
            s->seconds > 0 ? (double)s->tokens / s->seconds : 0.0);
    fprintf(stderr, "  expert loads per layer:");
    for (int32_t l = 0; l < n_layers; l++)
        fprintf(stderr, " %lld", (long long)loads[l]);
    fprintf(stderr, "\n");
}

/* ids decoded into a new string (*out, free it); the library's status on failure. */
static ferry_status detok_alloc(ferry_model *m, const int32_t *ids, int32_t n, char **out,
                                size_t *len)
{
    *out = NULL;
    *len = SIZE_MAX;
    ferry_status st = ferry_detokenize(m, ids, n, 1, NULL, 0, len);
    if (st && *len == SIZE_MAX)
        return st; /* not a size problem */
    if (!(*out = malloc(*len + 1)))
        return FERRY_ERR_NOMEM;
    return ferry_detokenize(m, ids, n, 1, *out, *len + 1, len);
}

/* One line per item into f: the text is decode(prompt + generated) minus decode(prompt), as
 * ferry run prints. A line whose text cannot be decoded carries its ids and the error
 * instead; a generation that failed (error not NULL) marks the unfinished lines. Returns 0,
 * or -1 when writing failed; *n_bad counts the lines with an error. */
static int write_batch_lines(FILE *f, ferry_model *m, const batch_item *items, int32_t n,
                             int stop_at_eos, const char *error, int32_t *n_bad)
{
    *n_bad = 0;
    for (int32_t i = 0; i < n; i++) {
        const batch_item *it = &items[i];
        int32_t all_n = it->n_ids + it->n_out;
        int32_t *all = malloc(((size_t)all_n + 1) * sizeof *all);
        size_t a_len = 0, p_len = 0;
        char *a_txt = NULL, *p_txt = NULL;
        const char *why = NULL;
        char msg[512];
        if (!all) {
            why = "out of memory for the text";
        } else {
            memcpy(all, it->ids, (size_t)it->n_ids * sizeof *all);
            memcpy(all + it->n_ids, it->out, (size_t)it->n_out * sizeof *all);
            ferry_status st = detok_alloc(m, all, all_n, &a_txt, &a_len);
            if (!st)
                st = detok_alloc(m, it->ids, it->n_ids, &p_txt, &p_len);
            if (st == FERRY_ERR_NOMEM) {
                why = "out of memory for the text";
            } else if (st) {
                snprintf(msg, sizeof msg, "detokenize: %s (%s)", ferry_last_error(),
                         ferry_status_name(st));
                why = msg;
            }
        }
        int eos = 0;
        for (int32_t j = 0; j < it->n_out && stop_at_eos; j++)
            eos |= ferry_token_is_eos(m, it->out[j]);
        int done = eos || it->n_out >= it->max_tokens;
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToObject(o, "id", it->id ? cJSON_Duplicate(it->id, 1)
                                              : cJSON_CreateNumber((double)i));
        cJSON_AddStringToObject(o, "prompt", it->prompt);
        if (why) {
            cJSON_AddNullToObject(o, "text");
            cJSON_AddItemToObject(o, "ids", ids_json(it->out, it->n_out));
        } else {
            const char *gen = a_txt;
            if (p_len <= a_len && !memcmp(a_txt, p_txt, p_len))
                gen += p_len;
            cJSON_AddStringToObject(o, "text", gen);
        }
        cJSON_AddNumberToObject(o, "tokens", it->n_out);
        cJSON_AddStringToObject(o, "finish", !done && error ? "error" : eos ? "eos" : "length");
        if (why || (!done && error))
            cJSON_AddStringToObject(o, "error", why ? why : error);
        *n_bad += why || (!done && error);
        char *js = cJSON_PrintUnformatted(o);
        int bad = !js || fprintf(f, "%s\n", js) < 0;
        free(js);
        cJSON_Delete(o);
        free(all);
        free(a_txt);
        free(p_txt);
        if (bad)
            return -1;
    }
    return fflush(f) == 0 ? 0 : -1;
}

/* The output: stdout for "-", else a temporary beside path (opened before any work, so a
 * path that cannot be written fails at once) renamed over path at the end. */
typedef struct {
    const char *path;
    ferry_temp tmp; /* core/tempfile.h: a signal removes it, a later run sweeps a stale one */
    FILE *f;
} batch_out;

static int batch_out_open(batch_out *o, const char *path)
{
    o->path = path;
    memset(&o->tmp, 0, sizeof o->tmp);
    if (!strcmp(path, "-")) {
        o->f = stdout;
        return 0;
    }
    int fd;
    if (ferry_temp_create(path, &o->tmp, &fd)) {
        fprintf(stderr, "ferry batch: cannot write the output: %s\n", ferry_last_error());
        return 1;
    }
    if (!(o->f = fdopen(fd, "wb"))) {
        fprintf(stderr, "ferry batch: %s: %s\n", o->tmp.path, strerror(errno));
        close(fd);
        ferry_temp_abort(&o->tmp);
        return 1;
    }
    return 0;
}

static void batch_out_abandon(batch_out *o)
{
    if (o->f && o->f != stdout)
        fclose(o->f);
    ferry_temp_abort(&o->tmp);
    o->f = NULL;
}

/* Writes every line and puts the file in place. Where that fails, the lines go to a file in
 * $TMPDIR (or /tmp) instead, named in the message, so nothing computed is lost. 0 when the
 * output is complete and every line has its text. */
static int batch_out_finish(batch_out *o, ferry_model *m, const batch_item *items, int32_t n,
                            int stop_at_eos, const char *error)
{
    int32_t n_bad = 0;
    int wrote = write_batch_lines(o->f, m, items, n, stop_at_eos, error, &n_bad) == 0;
    int saved = wrote;
    int err = errno;
    if (o->f != stdout) {
        if (fclose(o->f) != 0 && wrote) {
            wrote = saved = 0;
            err = errno;
        }
        o->f = NULL;
        if (wrote && ferry_temp_commit(&o->tmp, o->path) != FERRY_OK) {
            saved = 0;
            fprintf(stderr, "ferry batch: %s\n", ferry_last_error());
        } else if (!wrote) {
            fprintf(stderr, "ferry batch: cannot write %s: %s\n", o->tmp.path, strerror(err));
        }
        if (!saved)
            ferry_temp_abort(&o->tmp);
    }
    if (!saved) {
        const char *dir = getenv("TMPDIR");
        char rescue[4096];
        snprintf(rescue, sizeof rescue, "%s/ferry-batch-%ld.jsonl", dir && *dir ? dir : "/tmp",
                 (long)getpid());
        FILE *f = fopen(rescue, "wb");
        int ok = f && write_batch_lines(f, m, items, n, stop_at_eos, error, &n_bad) == 0;
        if (f && fclose(f) != 0)
            ok = 0;
        if (ok) {
            fprintf(stderr, "ferry batch: the results are in %s instead\n", rescue);
        } else {
            if (f)
                remove(rescue);
            fprintf(stderr, "ferry batch: cannot write %s either: %s; the results follow on "
                            "stdout\n", rescue, strerror(errno));
            write_batch_lines(stdout, m, items, n, stop_at_eos, error, &n_bad);
        }
        return 1;
    }
    if (n_bad)
        fprintf(stderr, "ferry batch: %d of %d lines have an error instead of their text\n",
                (int)n_bad, (int)n);
    return n_bad ? 1 : 0;
}

static int cmd_batch(int argc, char **argv)
{
    const char *model_dir = NULL, *in_path = NULL, *out_path = NULL;
    long long n_predict = 64, n;
    int compare = 0, ignore_eos = 0, rc;
    ferry_model_params mp;
    if (cli_model_params(&mp))
        return 2;
    ferry_batch_params bp = ferry_batch_params_default();
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int takes = !strcmp(a, "--prompts") || !strcmp(a, "--out") || !strcmp(a, "-n") ||
                    !strcmp(a, "--n-predict") || !strcmp(a, "--max-batch") ||
                    !strcmp(a, "--chunk") || !strcmp(a, "--reorder");
        if ((rc = parse_model_option("batch", argc, argv, &i, &mp, &bp.sampling)) >= 0) {
            if (rc)
                return rc;
            continue;
        }
        if (takes && !v) {
            fprintf(stderr, "ferry batch: %s needs a value\n", a);
            return 2;
        }
        if (takes)
            i++;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage_batch(stdout);
            return 0;
        } else if (!strcmp(a, "--prompts")) {
            in_path = v;
        } else if (!strcmp(a, "--out")) {
            out_path = v;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) {
            if ((rc = parse_i64(a, v, 0, 10000000, &n_predict)))
                return rc;
        } else if (!strcmp(a, "--max-batch") || !strcmp(a, "--chunk")) {
            if ((rc = parse_i64(a, v, 1, 1 << 16, &n)))
                return rc;
            if (a[2] == 'm')
                bp.max_batch = (int32_t)n;
            else
                bp.chunk = (int32_t)n;
        } else if (!strcmp(a, "--reorder")) {
            if (strcmp(v, "on") && strcmp(v, "off"))
                return bad_value(a, v, "on or off");
            bp.reorder = !strcmp(v, "on");
        } else if (!strcmp(a, "--compare")) {
            compare = 1;
        } else if (!strcmp(a, "--ignore-eos")) {
            ignore_eos = 1;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "ferry batch: unknown option '%s' (see ferry batch --help)\n", a);
            return 2;
        } else if (!model_dir) {
            model_dir = a;
        } else {
            fprintf(stderr, "ferry batch: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!model_dir || !in_path || !out_path) {
        usage_batch(stderr);
        return 2;
    }
    if (mp.gpu_mem_bytes == 0 && mp.offload != FERRY_OFFLOAD_RAM) {
        fprintf(stderr, "ferry batch: --offload needs a device budget (--gpu-mem "
                        "SIZE)\n");
        return 2;
    }
    bp.stop_at_eos = !ignore_eos;
    int32_t n_items = 0;
    batch_item *items = read_prompts(in_path, n_predict, &n_items);
    if (!items)
        return 1;
    batch_out bo = {0};
    rc = 1;
    ferry_model *m = NULL;
    const int32_t **prompts = calloc((size_t)n_items, sizeof *prompts);
    int32_t *n_prompt = calloc((size_t)n_items, sizeof *n_prompt);
    int32_t *n_pred = calloc((size_t)n_items, sizeof *n_pred);
    int32_t **outs = calloc((size_t)n_items, sizeof *outs);
    int32_t **outs2 = calloc((size_t)n_items, sizeof *outs2);
    int32_t *n_out2 = calloc((size_t)n_items, sizeof *n_out2);
    int32_t *n_out = calloc((size_t)n_items, sizeof *n_out);
    int64_t *loads = NULL, *loads2 = NULL;
    ferry_status st;
    if (!prompts || !n_prompt || !n_pred || !outs || !outs2 || !n_out || !n_out2)
        goto done;
    if (batch_out_open(&bo, out_path)) /* before the work: a path that cannot be written */
        goto done;
    if ((st = open_model(model_dir, &mp, &m))) {
        rc = fail_lib("cannot load the model", st);
        goto done;
    }
    ferry_model_info info;
    ferry_model_get_info(m, &info);
    loads = calloc((size_t)info.n_layers, sizeof *loads);
    loads2 = calloc((size_t)info.n_layers, sizeof *loads2);
    if (!loads || !loads2)
        goto done;
    for (int32_t i = 0; i < n_items; i++) {
        batch_item *it = &items[i];
        size_t len = strlen(it->prompt);
        int32_t count = 0;
        st = ferry_tokenize(m, it->prompt, len, 1, NULL, 0, &count);
        if (st != FERRY_OK && st != FERRY_ERR_INVALID) {
            rc = fail_lib("tokenize", st);
            goto done;
        }
        it->ids = malloc(((size_t)count + 1) * sizeof *it->ids);
        it->out = malloc(((size_t)it->max_tokens + 1) * sizeof *it->out);
        outs2[i] = malloc(((size_t)it->max_tokens + 1) * sizeof *outs2[i]);
        if (!it->ids || !it->out || !outs2[i])
            goto done;
        if ((st = ferry_tokenize(m, it->prompt, len, 1, it->ids, count, &it->n_ids))) {
            rc = fail_lib("tokenize", st);
            goto done;
        }
        prompts[i] = it->ids;
        n_prompt[i] = it->n_ids;
        n_pred[i] = it->max_tokens;
        outs[i] = it->out;
    }
    ferry_batch_stats bs, bs2;
    if ((st = ferry_batch_generate(m, prompts, n_prompt, n_pred, n_items, &bp, outs, n_out, &bs,
                                   loads))) {
        /* what the sequences generated before the failure is written, marked */
        char why[512];
        snprintf(why, sizeof why, "batch: %s (%s)", ferry_last_error(), ferry_status_name(st));
        fprintf(stderr, "ferry %s; writing what was generated\n", why);
        for (int32_t i = 0; i < n_items; i++)
            items[i].n_out = n_out[i];
        batch_out_finish(&bo, m, items, n_items, bp.stop_at_eos, why);
        rc = 1;
        goto done;
    }
    for (int32_t i = 0; i < n_items; i++)
        items[i].n_out = n_out[i];
    fprintf(stderr, "backend: %s (%s)\n", info.backend == FERRY_BACKEND_CUDA ? "cuda" : "cpu",
            info.device);
    print_batch_stats(bp.reorder ? "reordered" : "arrival order", &bs, loads, info.n_layers);
    if (compare) {
        /* the other order on a fresh model, so the expert cache starts cold both times */
        ferry_model_close(m);
        if ((st = ferry_model_open(model_dir, &mp, &m))) {
            m = NULL;
            rc = fail_lib("cannot load the model", st);
            goto done;
        }
        ferry_batch_params other = bp;
        other.reorder = !bp.reorder;
        if ((st = ferry_batch_generate(m, prompts, n_prompt, n_pred, n_items, &other, outs2,
                                       n_out2, &bs2, loads2))) {
            fail_lib("batch (--compare)", st);
            batch_out_finish(&bo, m, items, n_items, bp.stop_at_eos, NULL); /* the first run's */
            rc = 1;
            goto done;
        }
        print_batch_stats(other.reorder ? "reordered" : "arrival order", &bs2, loads2,
                          info.n_layers);
        int same = 1;
        for (int32_t i = 0; i < n_items && same; i++)
            same = n_out[i] == n_out2[i] &&
                   !memcmp(outs[i], outs2[i], (size_t)n_out[i] * sizeof *outs[i]);
        const ferry_batch_stats *ro = bp.reorder ? &bs : &bs2, *ar = bp.reorder ? &bs2 : &bs;
        fprintf(stderr, "reordering: %lld expert loads instead of %lld (%.1f%% fewer); outputs "
                        "%s\n", (long long)ro->expert_loads, (long long)ar->expert_loads,
                ar->expert_loads ? 100.0 * (1.0 - (double)ro->expert_loads /
                                                      (double)ar->expert_loads) : 0.0,
                same ? "identical" : "DIFFER");
        if (!same)
            goto done;
    }
    rc = batch_out_finish(&bo, m, items, n_items, bp.stop_at_eos, NULL);
done:
    batch_out_abandon(&bo);
    ferry_model_close(m);
    for (int32_t i = 0; i < n_items; i++) {
        free(items[i].prompt);
        cJSON_Delete(items[i].id);
        free(items[i].ids);
        free(items[i].out);
        if (outs2)
            free(outs2[i]);
    }
    free(items);
    free(prompts);
    free(n_prompt);
    free(n_pred);
    free(outs);
    free(outs2);
    free(n_out);
    free(n_out2);
    free(loads);
    free(loads2);
    return rc;
}

static void usage_serve(FILE *f)
{
    fprintf(f,
            "usage: ferry serve MODEL_DIR [options]\n"
            "\n"
            "Serves the model over HTTP with the OpenAI API: GET /health, GET /v1/models,\n"
            "POST /v1/completions, POST /v1/chat/completions (streaming with \"stream\": true),\n"
            "GET /metrics (Prometheus). Requests in flight are batched continuously: each\n"
            "step runs every sequence's next token with chunks of pending prompts, each MoE\n"
            "layer loading every expert once for all of them. A greedy request's text is the\n"
            "same as ferry run's for its prompt alone, whatever else is in flight.\n"
            "\n"
            "      --host H        address to bind (default 127.0.0.1; 0.0.0.0 or :: for all)\n"
            "      --port P        port (default 8080; 0 = any free one, printed at start)\n"
            "      --api-key KEY   require 'Authorization: Bearer KEY' on every endpoint\n"
            "                      ($FERRY_API_KEY too)\n"
            "      --max-seqs N    sequences in flight, each with its own KV cache (default 8)\n"
            "      --max-queue N   requests waiting for a sequence; more get 429 (default 64)\n"
            "      --ctx C         positions per sequence, prompt + generated (default: the\n"
            "                      model's maximum, capped at 4096)\n"
            "      --chunk N       prompt tokens a sequence feeds per step (default 64)\n"
            "      --step-tokens N most tokens in one step, decode tokens included; pending\n"
            "                      prompts compete for the rest (default 256; 0 = no limit)\n"
            "      --max-batch N   tokens per MoE layer-batch (default 16)\n"
            "      --max-wait N    steps a pending prompt may be passed over (default 4)\n"
            "      --select on|off choose the prompt chunks that join a step for fewer\n"
            "                      distinct experts (on, default) or take them in arrival order\n"
            "      --max-body SIZE largest request body (default 1M); larger ones get 413\n"
            "      --max-tokens-default N  tokens for a request without max_tokens (default\n"
            "                      0: until EOS or the end of --ctx)\n"
            "      --chat-template FILE  the chat template to use instead of the model's\n"
            "      --served-model-name NAME  the model id (default: MODEL_DIR's name)\n"
            "      --stats         print the batching counters to stderr at exit\n"
            "  -v, --verbose       log what the library does to stderr\n"
            "\n"
            "and ferry run's model options: --threads --backend --gpu-mem --offload --pack\n"
            "--host-cache --reader --policy --prefetch --predictor --predictor-stats --lookahead\n"
            "--slots --hybrid --cpu-kernels --quant-dense. Sampling comes from each request\n"
            "(temperature, top_p, top_k, seed); ferry run's --temp etc. are not taken here.\n"
            "SIGINT or SIGTERM stops the server: requests in flight get a 503.\n");
}

static int cmd_serve(int argc, char **argv)
{
    const char *model_dir = NULL;
    ferry_server_params sp = ferry_server_params_default();
    ferry_model_params mp;
    ferry_context_params cp = ferry_context_params_default();
    long long n, n_ctx = 0;
    int want_stats = 0, rc;
    const char *env_key = getenv("FERRY_API_KEY");
    if (env_key && env_key[0])
        sp.api_key = env_key;
    if (cli_model_params(&mp))
        return 2;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--temp") || !strcmp(a, "--top-k") || !strcmp(a, "--top-p") ||
            !strcmp(a, "--seed")) {
            fprintf(stderr, "ferry serve: %s is not an option here: each request gives its "
                    "own sampling (temperature, top_k, top_p, seed)\n", a);
            return 2;
        }
        if ((rc = parse_model_option("serve", argc, argv, &i, &mp, &cp)) >= 0) {
            if (rc)
                return rc;
            continue;
        }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage_serve(stdout);
            return 0;
        }
        if (!strcmp(a, "--stats")) {
            want_stats = 1;
            continue;
        }
        if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) {
            ferry_set_log(FERRY_LOG_DEBUG, NULL, NULL);
            continue;
        }
        if (a[0] != '-' || !a[1]) {
            if (model_dir) {
                fprintf(stderr, "ferry serve: unexpected argument '%s'\n", a);
                return 2;
            }
            model_dir = a;
            continue;
        }
        if (!v) {
            fprintf(stderr, "ferry serve: %s needs a value (see ferry serve --help)\n", a);
            return 2;
        }
        i++;
        if (!strcmp(a, "--host")) {
            sp.host = v;
        } else if (!strcmp(a, "--port")) {
            if ((rc = parse_i64(a, v, 0, 65535, &n)))
                return rc;
            sp.port = (int32_t)n;
        } else if (!strcmp(a, "--api-key")) {
            sp.api_key = v;
        } else if (!strcmp(a, "--max-seqs")) {
            if ((rc = parse_i64(a, v, 1, 65536, &n)))
                return rc;
            sp.max_seqs = (int32_t)n;
        } else if (!strcmp(a, "--max-queue")) {
            if ((rc = parse_i64(a, v, 0, 1 << 20, &n)))
                return rc;
            sp.max_queue = (int32_t)n;
        } else if (!strcmp(a, "--ctx")) {
            if ((rc = parse_i64(a, v, 2, INT32_MAX, &n_ctx)))
                return rc;
        } else if (!strcmp(a, "--chunk")) {
            if ((rc = parse_i64(a, v, 1, 1 << 16, &n)))
                return rc;
            sp.chunk = (int32_t)n;
        } else if (!strcmp(a, "--step-tokens")) {
            if ((rc = parse_i64(a, v, 0, 1 << 24, &n)))
                return rc;
            sp.step_tokens = (int32_t)n;
        } else if (!strcmp(a, "--max-batch")) {
            if ((rc = parse_i64(a, v, 1, 1 << 16, &n)))
                return rc;
            sp.max_batch = (int32_t)n;
        } else if (!strcmp(a, "--max-wait")) {
            if ((rc = parse_i64(a, v, 1, 1 << 20, &n)))
                return rc;
            sp.max_wait = (int32_t)n;
        } else if (!strcmp(a, "--select")) {
            if (strcmp(v, "on") && strcmp(v, "off"))
                return bad_value(a, v, "on or off");
            sp.select = !strcmp(v, "on");
        } else if (!strcmp(a, "--max-body")) {
            unsigned long long bytes;
            if ((rc = parse_size(a, v, &bytes)))
                return rc;
            if (bytes < 1)
                return bad_value(a, v, "a size of at least 1 byte");
            sp.max_body = (size_t)bytes;
        } else if (!strcmp(a, "--chat-template")) {
            sp.chat_template = v;
        } else if (!strcmp(a, "--max-tokens-default")) {
            if ((rc = parse_i64(a, v, 0, INT32_MAX, &n)))
                return rc;
            sp.max_tokens_default = (int32_t)n;
        } else if (!strcmp(a, "--served-model-name")) {
            if (!v[0] || strlen(v) > 200)
                return bad_value(a, v, "a name of 1 to 200 bytes");
            sp.model_name = v;
        } else {
            fprintf(stderr, "ferry serve: unknown option '%s' (see ferry serve --help)\n", a);
            return 2;
        }
    }
    if (!model_dir) {
        usage_serve(stderr);
        return 2;
    }
    if (mp.gpu_mem_bytes == 0 && mp.offload != FERRY_OFFLOAD_RAM) {
        fprintf(stderr, "ferry serve: --offload needs a device budget (--gpu-mem SIZE)\n");
        return 2;
    }
    /* SIGINT and SIGTERM wait for sigwait below: blocked before any thread starts, so every
     * thread inherits the mask; a write to a closed socket is an error, not a signal */
    sigset_t stop_set;
    sigemptyset(&stop_set);
    sigaddset(&stop_set, SIGINT);
    sigaddset(&stop_set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop_set, NULL);
    signal(SIGPIPE, SIG_IGN);
    ferry_model *m = NULL;
    ferry_server *srv = NULL;
    ferry_status st;
    if ((st = open_model(model_dir, &mp, &m)))
        return fail_lib("cannot load the model", st);
    ferry_model_info info;
    ferry_model_get_info(m, &info);
    sp.n_ctx = n_ctx ? (int32_t)n_ctx : (info.max_positions < 4096 ? info.max_positions : 4096);
    if ((st = ferry_server_start(m, model_dir, &sp, &srv))) {
        rc = fail_lib("serve", st);
        ferry_model_close(m);
        return rc;
    }
    const char *host = sp.host ? sp.host : "127.0.0.1";
    int v6 = strchr(host, ':') != NULL;
    fprintf(stderr, "ferry serve: listening on http://%s%s%s:%d\n", v6 ? "[" : "", host,
            v6 ? "]" : "", (int)ferry_server_port(srv));
    fflush(stderr);
    int sig = 0;
    sigwait(&stop_set, &sig);
    fprintf(stderr, "ferry serve: %s, stopping\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    if (want_stats) {
        char summary[2048];
        ferry_server_summary(srv, summary, sizeof summary);
        fputs(summary, stderr);
    }
    ferry_server_stop(srv);
    ferry_model_close(m);
    return 0;
}

/* Renders one user message (text, len bytes) with the model's chat template (or the file
 * template_path) and the generation prompt, as the server's /v1/chat/completions does, into
 * *out (malloc'd). 0, or an exit status after saying why. */
static int render_chat(const char *model_dir, const char *template_path, const char *text,
                       size_t len, char **out, size_t *out_len)
{
    ferry_chat_template *t = NULL;
    ferry_status st = ferry_chat_template_load(model_dir, template_path, &t);
    if (st)
        return fail_lib("chat template", st);
    cJSON *msgs = cJSON_CreateArray(), *msg = cJSON_CreateObject();
    char *content = malloc(len + 1);
    if (content) {
        memcpy(content, text, len);
        content[len] = 0;
    }
    int rc = 1;
    if (!msgs || !msg || !content || !cJSON_AddStringToObject(msg, "role", "user") ||
        !cJSON_AddStringToObject(msg, "content", content)) {
        fprintf(stderr, "ferry run: out of memory\n");
    } else {
        cJSON_AddItemToArray(msgs, msg);
        msg = NULL;
        if ((st = ferry_chat_template_render(t, msgs, 1, NULL, out, out_len)))
            rc = fail_lib("chat template", st);
        else
            rc = 0;
    }
    cJSON_Delete(msg);
    cJSON_Delete(msgs);
    free(content);
    ferry_chat_template_free(t);
    return rc;
}

static int cmd_run(int argc, char **argv)
{
    const char *model_dir = NULL, *prompt = NULL, *prompt_file = NULL, *logits_path = NULL;
    long long n_predict = 64, n_ctx = 0;
    int want_stats = 0, want_json = 0, ignore_eos = 0, chat = 0, display_prompt = 1;
    const char *chat_template = NULL, *stops[16];
    int32_t n_stop = 0;
    ferry_model_params mp;
    ferry_context_params cp = ferry_context_params_default();
    int rc;
    if (cli_model_params(&mp))
        return 2;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEED_VALUE()                                                                           \
    do {                                                                                       \
        if (!v) {                                                                              \
            fprintf(stderr, "ferry run: %s needs a value\n", a);                              \
            return 2;                                                                          \
        }                                                                                      \
        i++;                                                                                   \
    } while (0)
        if ((rc = parse_model_option("run", argc, argv, &i, &mp, &cp)) >= 0) {
            if (rc)
                return rc;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage_run(stdout);
            return 0;
        } else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) {
            NEED_VALUE();
            prompt = v;
        } else if (!strcmp(a, "-f") || !strcmp(a, "--file")) {
            NEED_VALUE();
            prompt_file = v;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) {
            NEED_VALUE();
            if ((rc = parse_i64(a, v, 0, INT32_MAX, &n_predict)))
                return rc;
        } else if (!strcmp(a, "--ctx")) {
            NEED_VALUE();
            if ((rc = parse_i64(a, v, 1, INT32_MAX, &n_ctx)))
                return rc;
        } else if (!strcmp(a, "--logits")) {
            NEED_VALUE();
            logits_path = v;
        } else if (!strcmp(a, "--stats")) {
            want_stats = 1;
        } else if (!strcmp(a, "--json")) {
            want_json = 1;
        } else if (!strcmp(a, "--ignore-eos")) {
            ignore_eos = 1;
        } else if (!strcmp(a, "--chat")) {
            chat = 1;
        } else if (!strcmp(a, "--no-display-prompt")) {
            display_prompt = 0;
        } else if (!strcmp(a, "--stop")) {
            NEED_VALUE();
            if (!v[0] || n_stop == 16) {
                fprintf(stderr, "ferry run: --stop takes a non-empty string, at most 16 times\n");
                return 2;
            }
            stops[n_stop++] = v;
        } else if (!strcmp(a, "--chat-template")) {
            NEED_VALUE();
            chat_template = v;
        } else if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) {
            ferry_set_log(FERRY_LOG_DEBUG, cli_log, NULL);
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "ferry run: unknown option '%s' (see ferry run --help)\n", a);
            return 2;
        } else if (!model_dir) {
            model_dir = a;
        } else {
            fprintf(stderr, "ferry run: unexpected argument '%s'\n", a);
            return 2;
        }
#undef NEED_VALUE
    }
    if (!model_dir) {
        usage_run(stderr);
        return 2;
    }
    if (!!prompt + !!prompt_file != 1) {
        fprintf(stderr, "ferry run: give the prompt with exactly one of -p or -f\n");
        return 2;
    }
    if (chat_template && !chat) {
        fprintf(stderr, "ferry run: --chat-template applies to --chat only\n");
        return 2;
    }

    char *file_text = NULL;
    size_t prompt_len = prompt ? strlen(prompt) : 0;
    if (prompt_file) {
        file_text = read_text_file(prompt_file, &prompt_len);
        if (!file_text)
            return 1;
        prompt = file_text;
    }

    ferry_model *m = NULL;
    ferry_context *c = NULL;
    int32_t *prompt_ids = NULL, *ids = NULL;
    float *logits = NULL;
    run_sink sink = {.stream = !want_json};
    int32_t n_prompt = 0, n_gen = 0;
    ferry_model_info info;
    ferry_status st;
    char *rendered = NULL;
    int add_special = 1;
    rc = 1;

    if (mp.gpu_mem_bytes == 0 && mp.offload != FERRY_OFFLOAD_RAM) {
        fprintf(stderr, "ferry run: --offload needs a device budget (--gpu-mem SIZE)\n");
        rc = 2;
        goto done;
    }
    if ((st = open_model(model_dir, &mp, &m))) {
        rc = fail_lib("cannot load the model", st);
        goto done;
    }
    ferry_model_get_info(m, &info);
    cp.n_ctx = (int32_t)n_ctx;
    if ((st = ferry_context_create(m, &cp, &c))) {
        rc = fail_lib("context", st);
        goto done;
    }
    if (chat) { /* the prompt is the user's message, through the model's chat template */
        if ((rc = render_chat(model_dir, chat_template, prompt, prompt_len, &rendered,
                              &prompt_len)))
            goto done;
        rc = 1;
        prompt = rendered;
        add_special = 0; /* the template writes them */
    }
    st = ferry_tokenize(m, prompt, prompt_len, add_special, NULL, 0, &n_prompt);
    if (st != FERRY_OK && st != FERRY_ERR_INVALID) {
        rc = fail_lib("tokenize", st);
        goto done;
    }
    prompt_ids = malloc(((size_t)n_prompt + 1) * sizeof *prompt_ids);
    ids = malloc(((size_t)n_predict + 1) * sizeof *ids);
    logits = malloc((size_t)info.n_vocab * sizeof *logits);
    if (!prompt_ids || !ids || !logits) {
        fprintf(stderr, "ferry run: out of memory\n");
        goto done;
    }
    if ((st = ferry_tokenize(m, prompt, prompt_len, add_special, prompt_ids, n_prompt,
                             &n_prompt))) {
        rc = fail_lib("tokenize", st);
        goto done;
    }
    int64_t need = (int64_t)n_prompt + (n_predict > 0 ? n_predict - 1 : 0);
    if (need > ferry_context_n_ctx(c)) { /* before the prompt is echoed */
        fprintf(stderr, "ferry run: a prompt of %d tokens + %lld to generate needs %lld "
                "positions, the context holds %d (raise --ctx, up to %d)\n", (int)n_prompt,
                n_predict, (long long)need, (int)ferry_context_n_ctx(c), (int)info.max_positions);
        goto done;
    }
    if (n_stop && ferry_stop_create(stops, n_stop, 0, &sink.stop)) {
        rc = fail_lib("--stop", FERRY_ERR_NOMEM);
        goto done;
    }
    if (!want_json && display_prompt) {
        fwrite(prompt, 1, prompt_len, stdout);
        fflush(stdout);
    }
    ferry_generate_params gp = ferry_generate_params_default();
    gp.n_predict = (int32_t)n_predict;
    gp.stop_at_eos = !ignore_eos;
    gp.prompt_logits = logits;
    if ((st = ferry_generate(c, prompt_ids, n_prompt, &gp, on_token, &sink, ids,
                             (int32_t)n_predict, &n_gen))) {
        if (!want_json)
            printf("\n");
        rc = fail_lib("generate", st);
        goto done;
    }
    if (sink.stop && !sink.stopped) { /* what a stop string's prefix held back */
        ferry_stop_result r;
        if (ferry_stop_flush(sink.stop, &r) || sink_put(&sink, r.text, r.len))
            sink.failed = 1;
    }
    if (sink.failed) {
        fprintf(stderr, "ferry run: out of memory for the text\n");
        goto done;
    }
    if (!want_json) {
        printf("\n");
        fflush(stdout);
    }

    ferry_stats stats;
    ferry_context_get_stats(c, &stats);
    if (logits_path) {
        FILE *f = fopen(logits_path, "wb");
        int ok = f && fwrite(logits, sizeof(float), (size_t)info.n_vocab, f) == (size_t)info.n_vocab;
        if (f && fclose(f) != 0)
            ok = 0;
        if (!ok) {
            fprintf(stderr, "ferry run: cannot write %s: %s\n", logits_path, strerror(errno));
            goto done;
        }
    }
    /* eos: the model ended it; stop: a --stop string; length: -n ran out */
    const char *finish = sink.stopped ? "stop"
                         : n_gen > 0 && !ignore_eos && ferry_token_is_eos(m, ids[n_gen - 1])
                             ? "eos"
                             : "length";
    ferry_offload_stats ostats;
    ferry_layer_stats *lstats = want_json || want_stats ? get_offload_stats(c, &info, &ostats)
                                                        : NULL;
    if (want_json) {
        cJSON *root = cJSON_CreateObject();
        cJSON_AddItemToObject(root, "prompt_ids", ids_json(prompt_ids, n_prompt));
        cJSON_AddItemToObject(root, "ids", ids_json(ids, n_gen));
        cJSON_AddStringToObject(root, "text", sink.text ? sink.text : "");
        cJSON_AddStringToObject(root, "finish_reason", finish);
        cJSON_AddStringToObject(root, "backend",
                                info.backend == FERRY_BACKEND_CUDA ? "cuda" : "cpu");
        cJSON_AddStringToObject(root, "device", info.device);
        cJSON_AddItemToObject(root, "stats", stats_json(&stats));
        if (lstats)
            cJSON_AddItemToObject(root, "offload", offload_json(&ostats, lstats, &info));
        char *out = cJSON_PrintUnformatted(root);
        if (out)
            printf("%s\n", out);
        free(out);
        cJSON_Delete(root);
    }
    if (want_stats) {
        fprintf(stderr, "backend: %s (%s)\n", info.backend == FERRY_BACKEND_CUDA ? "cuda" : "cpu",
                info.device);
        fprintf(stderr, "finish: %s\n", finish);
        fprintf(stderr,
                "prefill: %lld tokens in %.3f s (%.1f tokens/s)\n"
                "decode:  %lld tokens in %.3f s (%.1f tokens/s)\n",
                (long long)stats.n_prompt_tokens, stats.prefill_seconds,
                stats.prefill_tokens_per_s, (long long)stats.n_decode_tokens,
                stats.decode_seconds, stats.decode_tokens_per_s);
        if (lstats)
            print_offload_stats(&ostats, lstats, &info);
    }
    free(lstats);
    rc = 0;
done:
    ferry_stop_destroy(sink.stop);
    free(rendered);
    free(sink.text);
    free(prompt_ids);
    free(ids);
    free(logits);
    free(file_text);
    ferry_context_free(c);
    ferry_model_close(m);
    return rc;
}

/* ---- ferry bench ---------------------------------------------------------------------- */

static void usage_bench(FILE *f)
{
    fprintf(f,
            "usage: ferry bench MODEL_DIR [--mode decode|prefill|batch] [options]\n"
            "\n"
            "Measures the device and host-to-device bandwidths, then the model: prefill speed,\n"
            "decode speed with per-token latency, and (offloading) hit rate, bytes moved and\n"
            "stall per token, next to the bound the bandwidths put on decoding.\n"
            "\n"
            "      --mode M          decode (default), prefill, or batch (many prompts\n"
            "                        generated together, ferry batch's engine)\n"
            "      --batch N         batch mode: sequences (default 8)\n"
            "      --prompt-len P    prompt tokens (default 32)\n"
            "      --gen-len G       greedy decode steps (default 64)\n"
            "      --repeat R        runs; speeds are the median run (default 3)\n"
            "      --bandwidth-size SIZE  buffer for the bandwidth measurements (default 256M)\n"
            "      --json FILE       also write the results as one JSON object\n"
            "  and ferry run's model options: --threads --backend --gpu-mem --offload --pack\n"
            "  --host-cache --reader --policy --prefetch --predictor --predictor-stats\n"
            "  --lookahead --slots --hybrid --cpu-kernels --quant-dense\n");
}

static int write_bench_json(const char *path, const char *model, const ferry_bench_params *bp,
                            const ferry_bench_result *r)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "model", model);
    cJSON_AddStringToObject(o, "backend", r->backend == FERRY_BACKEND_CUDA ? "cuda" : "cpu");
    cJSON_AddStringToObject(o, "device", r->device);
    static const char *const modes[] = {"decode", "prefill", "batch"};
    cJSON_AddStringToObject(o, "mode", modes[bp->mode]);
    cJSON_AddNumberToObject(o, "batch", bp->batch);
    cJSON_AddNumberToObject(o, "batch_tokens_per_s", r->batch_tokens_per_s);
    cJSON_AddNumberToObject(o, "batch_expert_loads_per_token", r->batch_expert_loads_per_token);
    cJSON_AddNumberToObject(o, "batch_moved_bytes_per_token", r->batch_moved_bytes_per_token);
    cJSON_AddNumberToObject(o, "prompt_len", bp->prompt_len);
    cJSON_AddNumberToObject(o, "gen_len", bp->gen_len);
    cJSON_AddNumberToObject(o, "repeat", bp->repeat);
    cJSON_AddNumberToObject(o, "device_gbps", r->bw.device_gbps);
    cJSON_AddNumberToObject(o, "pinned_h2d_gbps", r->bw.pinned_h2d_gbps);
    cJSON_AddNumberToObject(o, "pageable_h2d_gbps", r->bw.pageable_h2d_gbps);
    cJSON_AddNumberToObject(o, "disk_gbps", r->bw.disk_gbps);
    cJSON_AddBoolToObject(o, "disk_direct", r->bw.disk_direct);
    cJSON_AddStringToObject(o, "disk_path", r->bw.disk_path);
    cJSON_AddNumberToObject(o, "disk_bytes_per_token", r->disk_bytes_per_token);
    cJSON_AddNumberToObject(o, "prefill_tokens_per_s", r->prefill_tokens_per_s);
    cJSON_AddNumberToObject(o, "decode_tokens_per_s", r->decode_tokens_per_s);
    cJSON_AddNumberToObject(o, "latency_median_ms", r->latency_median_ms);
    cJSON_AddNumberToObject(o, "latency_p90_ms", r->latency_p90_ms);
    cJSON_AddNumberToObject(o, "dense_bytes_per_token", (double)r->dense_bytes_per_token);
    cJSON_AddNumberToObject(o, "expert_bytes_per_token", (double)r->expert_bytes_per_token);
    cJSON_AddNumberToObject(o, "kv_bytes_per_token", (double)r->kv_bytes_per_token);
    cJSON_AddBoolToObject(o, "offload", r->offload);
    cJSON_AddNumberToObject(o, "hit_rate", r->hit_rate);
    cJSON_AddNumberToObject(o, "moved_bytes_per_token", r->moved_bytes_per_token);
    cJSON_AddNumberToObject(o, "stall_ms_per_token", r->stall_ms_per_token);
    cJSON_AddNumberToObject(o, "fetch_gbps", r->fetch_gbps);
    cJSON_AddNumberToObject(o, "host_read_gbps", r->bw.host_read_gbps);
    cJSON_AddStringToObject(o, "hybrid", r->hybrid >= 0 && r->hybrid < 3
                                             ? g_hybrid_names[r->hybrid]
                                             : "unknown");
    cJSON_AddNumberToObject(o, "cpu_experts_per_token", r->cpu_experts_per_token);
    cJSON_AddNumberToObject(o, "cpu_bytes_per_token", r->cpu_bytes_per_token);
    cJSON_AddNumberToObject(o, "cpu_gbps", r->cpu_gbps);
    cJSON_AddNumberToObject(o, "working_set_bytes", (double)r->working_set_bytes);
    cJSON_AddNumberToObject(o, "bound_tokens_per_s", r->bound_tokens_per_s);
    cJSON_AddNumberToObject(o, "fraction_of_bound", r->fraction_of_bound);
    char *text = cJSON_Print(o);
    cJSON_Delete(o);
    FILE *f = text ? fopen(path, "w") : NULL;
    int ok = f && fputs(text, f) >= 0 && fputc('\n', f) != EOF;
    if (f && fclose(f) != 0)
        ok = 0;
    free(text);
    if (!ok) {
        fprintf(stderr, "ferry bench: cannot write %s: %s\n", path, strerror(errno));
        return 1;
    }
    return 0;
}

static int cmd_bench(int argc, char **argv)
{
    ferry_model_params mp;
    if (cli_model_params(&mp))
        return 2;
    ferry_context_params unused = ferry_context_params_default();
    ferry_bench_params bp = ferry_bench_params_default();
    const char *model_dir = NULL, *json_path = NULL;
    int rc;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if ((rc = parse_model_option("bench", argc, argv, &i, &mp, &unused)) >= 0) {
            if (rc)
                return rc;
            continue;
        }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage_bench(stdout);
            return 0;
        }
        if (a[0] != '-') {
            if (model_dir) {
                fprintf(stderr, "ferry bench: one model directory, got '%s' and '%s'\n",
                        model_dir, a);
                return 2;
            }
            model_dir = a;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "ferry bench: unknown option %s (ferry bench --help)\n", a);
            return 2;
        }
        const char *v = argv[++i];
        long long n;
        if (!strcmp(a, "--mode")) {
            static const char *const modes[] = {"decode", "prefill", "batch"};
            if ((rc = parse_name(a, v, modes, 3, "decode, prefill or batch", &bp.mode)))
                return rc;
        } else if (!strcmp(a, "--batch")) {
            if ((rc = parse_i64(a, v, 1, 4096, &n)))
                return rc;
            bp.batch = (int32_t)n;
        } else if (!strcmp(a, "--prompt-len") || !strcmp(a, "--gen-len")) {
            if ((rc = parse_i64(a, v, 1, 1 << 20, &n)))
                return rc;
            if (a[2] == 'p')
                bp.prompt_len = (int32_t)n;
            else
                bp.gen_len = (int32_t)n;
        } else if (!strcmp(a, "--repeat")) {
            if ((rc = parse_i64(a, v, 1, 1000, &n)))
                return rc;
            bp.repeat = (int32_t)n;
        } else if (!strcmp(a, "--bandwidth-size")) {
            unsigned long long bytes;
            if ((rc = parse_size(a, v, &bytes)))
                return rc;
            bp.bandwidth_bytes = bytes;
        } else if (!strcmp(a, "--json")) {
            json_path = v;
        } else {
            fprintf(stderr, "ferry bench: unknown option %s (ferry bench --help)\n", a);
            return 2;
        }
    }
    if (!model_dir) {
        usage_bench(stderr);
        return 2;
    }
    ferry_bench_result r;
    ferry_status st = ferry_bench_run(model_dir, &mp, &bp, &r);
    if (st == FERRY_OK)
        warn_simulated_device(&mp, r.backend);
    if (st)
        return fail_lib("bench", st);
    printf("backend: %s (%s)\n", r.backend == FERRY_BACKEND_CUDA ? "cuda" : "cpu", r.device);
    printf("bandwidth: device %.1f GB/s, pinned host->device %.2f GB/s, pageable host->device "
           "%.2f GB/s, host memory read by all cores %.1f GB/s (%.0f MiB buffers)\n",
           r.bw.device_gbps, r.bw.pinned_h2d_gbps, r.bw.pageable_h2d_gbps, r.bw.host_read_gbps,
           MIB(r.bw.n_bytes));
    if (r.working_set_bytes)
        printf("cpu backend: the device is host memory; device bandwidth: the better of the "
               "copy and all cores reading the decode's %.1f MiB working set\n",
               MIB(r.working_set_bytes));
    if (r.bw.disk_gbps > 0)
        printf("disk: %.2f GB/s reading %s (%s)\n", r.bw.disk_gbps, r.bw.disk_path,
               r.bw.disk_direct ? "O_DIRECT" : "buffered: the page cache may serve it");
    if (bp.mode == FERRY_BENCH_BATCH) {
        printf("batch: %.1f generated tokens/s (%d sequences of %d + %d tokens, median of %d), "
               "%.2f expert loads and %.2f MiB moved per generated token\n",
               r.batch_tokens_per_s, (int)bp.batch, (int)bp.prompt_len, (int)bp.gen_len,
               (int)bp.repeat, r.batch_expert_loads_per_token,
               MIB((uint64_t)r.batch_moved_bytes_per_token));
        return json_path ? write_bench_json(json_path, model_dir, &bp, &r) : 0;
    }
    printf("prefill: %.1f tokens/s (%d-token prompt, median of %d)\n", r.prefill_tokens_per_s,
           (int)bp.prompt_len, (int)bp.repeat);
    if (bp.mode == FERRY_BENCH_DECODE) {
        printf("decode: %.2f tokens/s (median of %d runs of %d), latency median %.3f ms, "
               "p90 %.3f ms\n",
               r.decode_tokens_per_s, (int)bp.repeat, (int)bp.gen_len, r.latency_median_ms,
               r.latency_p90_ms);
        printf("bytes read per token: dense %.1f MiB + experts %.1f MiB + KV cache %.1f MiB\n",
               MIB(r.dense_bytes_per_token), MIB(r.expert_bytes_per_token),
               MIB(r.kv_bytes_per_token));
        if (r.offload)
            printf("offload: hit rate %.1f%%, %.2f MiB moved and %.2f MiB read from disk per "
                   "token, stall %.3f ms per token, fetch rate %.2f GB/s (%.0f%% of pinned)\n",
                   100.0 * r.hit_rate, MIB((uint64_t)r.moved_bytes_per_token),
                   MIB((uint64_t)r.disk_bytes_per_token), r.stall_ms_per_token, r.fetch_gbps,
                   r.bw.pinned_h2d_gbps > 0 ? 100.0 * r.fetch_gbps / r.bw.pinned_h2d_gbps : 0.0);
        if (r.hybrid != FERRY_HYBRID_OFF)
            printf("hybrid %s: %.2f experts (%.2f MiB of weights) computed on the CPU per token, "
                   "at %.2f GB/s\n",
                   r.hybrid == FERRY_HYBRID_AUTO ? "auto" : "cpu-experts",
                   r.cpu_experts_per_token, MIB((uint64_t)r.cpu_bytes_per_token), r.cpu_gbps);
        printf("bound: %.1f tokens/s from the bandwidths above%s; measured %.1f%% of it\n",
               r.bound_tokens_per_s,
               r.hybrid == FERRY_HYBRID_AUTO ? " (bus plus CPU memory for the missing experts)"
               : r.hybrid == FERRY_HYBRID_CPU_EXPERTS ? " (CPU memory for the experts)" : "",
               100.0 * r.fraction_of_bound);
    }
    if (json_path)
        return write_bench_json(json_path, model_dir, &bp, &r);
    return 0;
}

static void usage_perplexity(FILE *f)
{
    fprintf(f,
            "usage: ferry perplexity MODEL_DIR --text FILE [--window N] [options]\n"
            "\n"
            "Perplexity of the model on a text file: the text is tokenized once and cut into\n"
            "windows, each run with BOS on an empty KV cache; every token is scored once by\n"
            "the logits of the position before it.\n"
            "\n"
            "  --text FILE     the text (UTF-8)\n"
            "  --window N      tokens per window, BOS included (default 512, at most the\n"
            "                  model's positions)\n"
            "  and ferry run's model options: --threads --backend --gpu-mem --offload --pack\n"
            "  --host-cache --reader --policy --prefetch --predictor --predictor-stats\n"
            "  --lookahead --slots --hybrid --cpu-kernels --quant-dense\n");
}

static int cmd_perplexity(int argc, char **argv)
{
    ferry_model_params mp;
    if (cli_model_params(&mp))
        return 2;
    ferry_context_params unused = ferry_context_params_default();
    const char *model_dir = NULL, *text_path = NULL;
    long long window = 512;
    int rc;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if ((rc = parse_model_option("perplexity", argc, argv, &i, &mp, &unused)) >= 0) {
            if (rc)
                return rc;
            continue;
        }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage_perplexity(stdout);
            return 0;
        }
        if (a[0] != '-') {
            if (model_dir) {
                fprintf(stderr, "ferry perplexity: one model directory, got '%s' and '%s'\n",
                        model_dir, a);
                return 2;
            }
            model_dir = a;
            continue;
        }
        if ((!strcmp(a, "--text") || !strcmp(a, "--window")) && i + 1 >= argc) {
            fprintf(stderr, "ferry perplexity: %s needs a value\n", a);
            return 2;
        }
        if (!strcmp(a, "--text")) {
            text_path = argv[++i];
        } else if (!strcmp(a, "--window")) {
            if ((rc = parse_i64(a, argv[++i], 2, INT32_MAX, &window)))
                return rc;
        } else {
            fprintf(stderr, "ferry perplexity: unknown option %s (ferry perplexity --help)\n", a);
            return 2;
        }
    }
    if (!model_dir || !text_path) {
        usage_perplexity(stderr);
        return 2;
    }
    size_t len;
    char *text = read_text_file(text_path, &len);
    if (!text)
        return 1;
    ferry_model *m;
    ferry_status st = open_model(model_dir, &mp, &m);
    if (st) {
        free(text);
        return fail_lib("perplexity", st);
    }
    ferry_perplexity_result r;
    st = ferry_perplexity(m, text, len, (int32_t)window, &r);
    ferry_model_info info;
    ferry_model_get_info(m, &info);
    ferry_model_close(m);
    free(text);
    if (st)
        return fail_lib("perplexity", st);
    fprintf(stderr, "backend: %s (%s)\n", info.backend == FERRY_BACKEND_CUDA ? "cuda" : "cpu",
            info.device);
    printf("perplexity: %.4f (mean NLL %.5f nats) over %lld tokens in %d windows of %d, "
           "%.1f tokens/s\n",
           r.perplexity, r.nll, (long long)r.n_scored, (int)r.n_windows, (int)r.window,
           r.seconds > 0 ? (double)r.n_scored / r.seconds : 0.0);
    return 0;
}

/* ---- ferry tokenize ------------------------------------------------------------------- */

static void usage_tokenize(FILE *f)
{
    fprintf(f,
            "usage: ferry tokenize PATH (-p TEXT | -f FILE | --decode IDS) [--json] "
            "[--no-special]\n"
            "\n"
            "Runs a model's tokenizer alone (the weights are not read). PATH is a model folder\n"
            "(its tokenizer.json and tokenizer_config.json) or a tokenizer.json file (with\n"
            "the tokenizer_config.json beside it, when there is one).\n"
            "\n"
            "  -p, --prompt TEXT   encode TEXT: prints the ids on one line, space-separated\n"
            "  -f, --file FILE     encode the contents of FILE\n"
            "      --decode IDS    decode ids (\"1,2,3\" or \"1 2 3\") and print the text\n"
            "      --json          print {\"ids\": [...], \"pieces\": [...]} (encoding; the\n"
            "                      pieces are the tokens as the vocab spells them) or\n"
            "                      {\"ids\": [...], \"text\": \"...\"} (decoding)\n"
            "      --no-special    encode without the special tokens the tokenizer adds (BOS,\n"
            "                      where it asks for one); decode without special tokens\n");
}

/* Loads the tokenizer of a model folder or of a tokenizer.json file; 0, or 1 with the
 * error printed. */
static int tokenize_load(const char *path, ferry_tokenizer **out)
{
    struct stat sb;
    if (stat(path, &sb) != 0) {
        fprintf(stderr, "ferry tokenize: %s: %s\n", path, strerror(errno));
        return 1;
    }
    ferry_status st;
    if (S_ISDIR(sb.st_mode)) {
        st = ferry_tokenizer_load(path, out);
        return st ? fail_lib("tokenize", st) : 0;
    }
    size_t tok_len = 0, cfg_len = 0;
    char *tok = read_text_file(path, &tok_len), *cfg = NULL;
    if (!tok)
        return 1;
    char cfg_path[4096];
    const char *slash = strrchr(path, '/');
    snprintf(cfg_path, sizeof cfg_path, "%.*s/tokenizer_config.json",
             slash ? (int)(slash - path) : 1, slash ? path : ".");
    if (stat(cfg_path, &sb) == 0 && !(cfg = read_text_file(cfg_path, &cfg_len))) {
        free(tok);
        return 1;
    }
    st = ferry_tokenizer_load_json(tok, tok_len, cfg, cfg_len, path, out);
    free(tok);
    free(cfg);
    return st ? fail_lib("tokenize", st) : 0;
}

/* Parses "1,2,3" / "1 2 3" into *ids (malloc'd); a usage error's status if malformed. */
static int parse_ids(const char *s, int32_t **ids, int32_t *n)
{
    size_t cap = strlen(s) / 2 + 2;
    *ids = malloc(cap * sizeof **ids);
    *n = 0;
    if (!*ids)
        return 1;
    const char *p = s;
    for (;;) {
        while (*p == ' ' || *p == ',' || *p == '\t' || *p == '\n')
            p++;
        if (!*p)
            break;
        char *end;
        errno = 0;
        long long v = strtoll(p, &end, 10);
        if (end == p || errno || v < INT32_MIN || v > INT32_MAX ||
            (*end && *end != ',' && *end != ' ' && *end != '\t' && *end != '\n')) {
            fprintf(stderr, "ferry tokenize: --decode expects ids such as 1,2,3, got '%s'\n", s);
            free(*ids);
            *ids = NULL;
            return 2;
        }
        (*ids)[(*n)++] = (int32_t)v;
        p = end;
    }
    return 0;
}

static int print_json(cJSON *o)
{
    char *text = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!text)
        return 1;
    printf("%s\n", text);
    free(text);
    return 0;
}

static int tokenize_encode(const ferry_tokenizer *t, const char *text, size_t len, int special,
                           int json)
{
    int32_t n = 0;
    ferry_status st = ferry_tokenizer_encode(t, text, len, special, NULL, 0, &n);
    if (st && !(st == FERRY_ERR_INVALID && n > 0)) /* a failure, not the empty buffer */
        return fail_lib("tokenize", st);
    int32_t *ids = malloc(((size_t)n + 1) * sizeof *ids);
    if (!ids)
        return 1;
    st = ferry_tokenizer_encode(t, text, len, special, ids, n, &n);
    if (st) {
        free(ids);
        return fail_lib("tokenize", st);
    }
    if (!json) {
        for (int32_t i = 0; i < n; i++)
            printf(i ? " %d" : "%d", (int)ids[i]);
        printf("\n");
        free(ids);
        return 0;
    }
    cJSON *o = cJSON_CreateObject(), *pieces = cJSON_CreateArray();
    cJSON_AddItemToObject(o, "ids", ids_json(ids, n));
    cJSON_AddItemToObject(o, "pieces", pieces);
    for (int32_t i = 0; i < n; i++) {
        const char *s;
        size_t k;
        char *copy = ferry_tokenizer_piece(t, ids[i], &s, &k) == FERRY_OK ? malloc(k + 1) : NULL;
        if (copy) {
            memcpy(copy, s, k);
            copy[k] = 0;
        }
        cJSON_AddItemToArray(pieces, copy ? cJSON_CreateString(copy) : cJSON_CreateNull());
        free(copy);
    }
    free(ids);
    return print_json(o);
}

static int tokenize_decode(const ferry_tokenizer *t, const char *spec, int skip, int json)
{
    int32_t *ids, n;
    int rc = parse_ids(spec, &ids, &n);
    if (rc)
        return rc;
    size_t len = 0;
    ferry_tokenizer_decode(t, ids, n, skip, NULL, 0, &len); /* the length (or a bad id) */
    char *text = malloc(len + 1);
    ferry_status st = FERRY_ERR_NOMEM;
    if (text)
        st = ferry_tokenizer_decode(t, ids, n, skip, text, len + 1, &len);
    if (!text || st) {
        free(ids);
        free(text);
        return text ? fail_lib("tokenize", st) : 1;
    }
    if (json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToObject(o, "ids", ids_json(ids, n));
        cJSON_AddStringToObject(o, "text", text); /* a C string: ends at a decoded NUL */
        rc = print_json(o);
    } else {
        fwrite(text, 1, len, stdout);
        printf("\n");
    }
    free(ids);
    free(text);
    return rc;
}

static int cmd_tokenize(int argc, char **argv)
{
    const char *path = NULL, *prompt = NULL, *file = NULL, *decode = NULL;
    int json = 0, special = 1;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage_tokenize(stdout);
            return 0;
        }
        if (!strcmp(a, "--json")) {
            json = 1;
        } else if (!strcmp(a, "--no-special")) {
            special = 0;
        } else if (!strcmp(a, "-p") || !strcmp(a, "--prompt") || !strcmp(a, "-f") ||
                   !strcmp(a, "--file") || !strcmp(a, "--decode")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "ferry tokenize: %s needs a value\n", a);
                return 2;
            }
            const char **slot = &file;
            if (!strcmp(a, "-p") || !strcmp(a, "--prompt"))
                slot = &prompt;
            else if (!strcmp(a, "--decode"))
                slot = &decode;
            if (*slot) {
                fprintf(stderr, "ferry tokenize: %s given twice\n", a);
                return 2;
            }
            *slot = argv[++i];
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "ferry tokenize: unknown option '%s' (ferry tokenize --help)\n", a);
            return 2;
        } else if (path) {
            fprintf(stderr, "ferry tokenize: one tokenizer path, got '%s' and '%s'\n", path, a);
            return 2;
        } else {
            path = a;
        }
    }
    if (!path || !!prompt + !!file + !!decode != 1) {
        if (path && !!prompt + !!file + !!decode > 1)
            fprintf(stderr, "ferry tokenize: give one of -p, -f and --decode\n");
        usage_tokenize(stderr);
        return 2;
    }
    size_t len = 0;
    char *text = NULL;
    if (file && !(text = read_text_file(file, &len)))
        return 1;
    ferry_tokenizer *t = NULL;
    if (tokenize_load(path, &t)) {
        free(text);
        return 1;
    }
    int rc = decode ? tokenize_decode(t, decode, !special, json)
                    : tokenize_encode(t, file ? text : prompt, file ? len : strlen(prompt),
                                      special, json);
    ferry_tokenizer_free(t);
    free(text);
    return rc;
}

/* The options that take a value, of every command (--json takes one in perplexity but is a
 * flag elsewhere: not listed, so the argument after it may be split). */
static const char *const valued_options[] = {
    "--api-key", "--backend", "--bandwidth-size", "--batch", "--chat-template", "--chunk",
    "--cpu-kernels", "--ctx", "--decode", "--dense-intermediate", "--dtype", "--expert-bytes",
    "--experts", "--file", "--gen-len", "--gpu-mem", "--head-dim", "--heads", "--hidden",
    "--host", "--host-cache", "--hybrid", "--input", "--intermediate", "--kv-heads",
    "--layers", "--logits", "--lookahead", "--max-batch", "--max-body", "--max-queue",
    "--max-seqs", "--max-tokens-default", "--max-wait", "--mode", "--n-predict", "--offload",
    "--out", "--pack", "--policy", "--port", "--predictor", "--predictor-stats", "--prefetch",
    "--preset", "--prompt", "--prompt-len", "--prompts", "--quant", "--quant-dense", "--reader",
    "--reorder", "--repeat", "--seed", "--select", "--seq-len", "--served-model-name",
    "--shard-size", "--shared-intermediate", "--slots", "--step-tokens", "--stop", "--temp",
    "--text", "--threads", "--tokenizer", "--top-k", "--top-p", "--trace", "--vocab",
    "--window", "-f", "-n", "-p"};

/* The table's spelling of the option a[0..len), or NULL when it takes no value. */
static const char *valued_option(const char *a, size_t len)
{
    for (size_t i = 0; i < sizeof valued_options / sizeof valued_options[0]; i++)
        if (strlen(valued_options[i]) == len && !strncmp(a, valued_options[i], len))
            return valued_options[i];
    return NULL;
}

/* GNU style "--opt=value" as "--opt" "value", for the options that take a value; an
 * argument that is itself the value of the option before it (-p "--ctx=3") stays whole.
 * The array is malloc'd (its strings are argv's and the option table's); NULL when out of
 * memory. */
static char **split_equals(int *argc, char **argv)
{
    char **out = calloc((size_t)*argc * 2 + 1, sizeof *out);
    if (!out)
        return NULL;
    int n = 0;
    for (int i = 0; i < *argc; i++) {
        const char *a = argv[i], *eq = strchr(a, '=');
        int is_value = i > 0 && valued_option(argv[i - 1], strlen(argv[i - 1]));
        const char *name = a[0] == '-' && eq ? valued_option(a, (size_t)(eq - a)) : NULL;
        if (!is_value && name) {
            out[n++] = (char *)name; /* the commands only read their arguments */
            out[n++] = (char *)eq + 1;
        } else {
            out[n++] = argv[i];
        }
    }
    *argc = n;
    return out;
}

static int run_command(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "run"))
        return cmd_run(argc - 2, argv + 2);
    if (!strcmp(argv[1], "serve"))
        return cmd_serve(argc - 2, argv + 2);
    if (!strcmp(argv[1], "pack"))
        return cmd_pack(argc - 2, argv + 2);
    if (!strcmp(argv[1], "synth"))
        return cmd_synth(argc - 2, argv + 2);
    if (!strcmp(argv[1], "trace"))
        return cmd_trace(argc - 2, argv + 2);
    if (!strcmp(argv[1], "sim"))
        return cmd_sim(argc - 2, argv + 2);
    if (!strcmp(argv[1], "batch"))
        return cmd_batch(argc - 2, argv + 2);
    if (!strcmp(argv[1], "bench"))
        return cmd_bench(argc - 2, argv + 2);
    if (!strcmp(argv[1], "perplexity"))
        return cmd_perplexity(argc - 2, argv + 2);
    if (!strcmp(argv[1], "predictor"))
        return cmd_predictor(argc - 2, argv + 2);
    if (!strcmp(argv[1], "tokenize"))
        return cmd_tokenize(argc - 2, argv + 2);
    if (!strcmp(argv[1], "version") || !strcmp(argv[1], "--version")) {
        printf("ferry %s\n", ferry_version());
        char desc[128];
        if (ferry_cuda_probe(desc, sizeof desc) == FERRY_OK)
            printf("cuda: %s\n", desc);
        else
            printf("cuda: %s\n", ferry_last_error());
        return 0;
    }
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "ferry: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}

int main(int argc, char **argv)
{
    char **args = split_equals(&argc, argv);
    if (!args) {
        fprintf(stderr, "ferry: out of memory\n");
        return 1;
    }
    /* progress on a terminal; SIGINT, SIGTERM and SIGHUP remove the library's temporary
     * files before the command dies of them (ferry serve waits for them itself) */
    cli_progress_install();
    if (argc < 2 || strcmp(args[1], "serve"))
        cli_signals_install();
    int rc = run_command(argc, args);
    free(args);
    return rc;
}
