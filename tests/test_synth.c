/*
 * tests/test_synth.c: synthetic checkpoints (ferry_synth). A tiny-shaped model with 2
 * layers and 1 MiB shards must shard, open with ferry_model_open and give finite, varied
 * logits; every tensor is where config.json says with the documented values (norms 1,
 * matrices uniform with std 1/sqrt(columns), element i of a tensor exactly the counter-based
 * formula of engine/synth.c); the same seed gives the same bytes whatever the thread count,
 * another seed other weights; f32 and f16 load; every bad parameter fails with
 * FERRY_ERR_INVALID (or FERRY_ERR_IO for a missing tokenizer folder) naming what is wrong
 * and creates nothing; a non-empty folder is refused and left as it was; and while the
 * shards are being written the folder never opens as a checkpoint, and a failing run
 * removes what it wrote. The other families' presets (qwen3-30b-a3b, qwen3-235b-a22b,
 * qwen1.5-moe-a2.7b, olmoe-1b-7b) have their real models' shapes, open shrunk through
 * ferry_model_open with that shape and run, write the family's tensors (q/k norms, biases,
 * shared expert, dense layer, tied head) and config.json keys, the same names, shapes and
 * keys as the fixtures in ../shared/fixtures/moe-families when given their shapes; their
 * generated tokenizer has the fixtures' layout, GPT-2's byte symbols, valid merges and the
 * real special ids, is the same whatever the seed, loads and round-trips text; and every
 * option a family cannot express is refused naming it.
 */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "format/safetensors.h"
#include "ferry.h"
#include "kernels/dtype.h"
#include "tests/check_util.h"

#define TINY_DIR FERRY_SOURCE_DIR "/models/tiny-moe-code"
#define MAX_FILES 64

static void expect_fail(ferry_status got, ferry_status want, const char *what, const char *a,
                        const char *b)
{
    const char *msg = ferry_last_error();
    ck_assert_msg(got == want, "%s: got %s (%s), want %s", what, ferry_status_name(got), msg,
                  ferry_status_name(want));
    ck_assert_msg(!a || strstr(msg, a), "%s: error \"%s\" lacks \"%s\"", what, msg, a);
    ck_assert_msg(!b || strstr(msg, b), "%s: error \"%s\" lacks \"%s\"", what, msg, b);
}

/* The tiny shape with `layers` layers, the bundled tokenizer, 1 MiB shards. */
static ferry_synth_params tiny_params(int32_t layers)
{
    ferry_synth_params p = ferry_synth_params_default();
    ck_assert_int_eq(ferry_synth_preset("tiny", &p), FERRY_OK);
    p.n_layers = layers;
    p.shard_bytes = 1 << 20;
    p.n_threads = 3;
    p.tokenizer_dir = TINY_DIR;
    return p;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The sorted names in dir (without . and ..); returns the count, caller frees names. */
static int list_dir(const char *dir, char **names)
{
    DIR *d = opendir(dir);
    ck_assert_msg(d != NULL, "cannot list %s: %s", dir, strerror(errno));
    int n = 0;
    const struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            ck_assert(n < MAX_FILES);
            names[n++] = strdup(e->d_name);
        }
    closedir(d);
    qsort(names, (size_t)n, sizeof *names, cmp_names);
    return n;
}

static void free_names(char **names, int n)
{
    for (int i = 0; i < n; i++)
        free(names[i]);
}

static int exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* Whether files a/name and b/name have the same bytes. */
static int same_file(const char *a, const char *b, const char *name)
{
    char pa[1024], pb[1024];
    snprintf(pa, sizeof pa, "%s/%s", a, name);
    snprintf(pb, sizeof pb, "%s/%s", b, name);
    size_t la, lb;
    char *x = tu_read_file(pa, &la), *y = tu_read_file(pb, &lb);
    int same = la == lb && memcmp(x, y, la) == 0;
    free(x);
    free(y);
    return same;
}

/* Opens dir on the CPU backend, evaluates a prompt and one more token and checks the
 * logits are finite and not all alike. */
static void check_runs(const char *dir, int32_t layers)
{
    ferry_model_params mp = ferry_model_params_default();
    mp.backend = FERRY_BACKEND_CPU;
    mp.n_threads = 2;
    ferry_model *m = NULL;
    ck_assert_msg(ferry_model_open(dir, &mp, &m) == FERRY_OK, "open %s: %s", dir,
                  ferry_last_error());
    ferry_model_info info;
    ck_assert_int_eq(ferry_model_get_info(m, &info), FERRY_OK);
    ck_assert_int_eq(info.n_layers, layers);
    ck_assert(info.d_model == 192 && info.d_ff == 384 && info.n_heads == 6 &&
              info.n_kv_heads == 2 && info.n_experts == 8 && info.n_experts_used == 2 &&
              info.n_vocab == 4096 && info.head_dim == 32);
    ck_assert_int_eq(info.bos_id, 1);
    ck_assert_int_eq(info.eos_id, 2);
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = 64;
    ferry_context *c = NULL;
    ck_assert_msg(ferry_context_create(m, &cp, &c) == FERRY_OK, "%s", ferry_last_error());
    int32_t ids[32], n = 0;
    const char *text = "def add(a, b):";
    ck_assert_int_eq(ferry_tokenize(m, text, strlen(text), 1, ids, 32, &n), FERRY_OK);
    ck_assert_int_ge(n, 4);
    float *logits = malloc((size_t)info.n_vocab * sizeof *logits);
    ck_assert(logits != NULL);
    for (int step = 0; step < 2; step++) {
        ck_assert_msg(ferry_eval(c, step ? &ids[1] : ids, step ? 1 : n, logits) == FERRY_OK, "%s",
                      ferry_last_error());
        double sum = 0, sq = 0;
        for (int32_t v = 0; v < info.n_vocab; v++) {
            ck_assert_msg(isfinite(logits[v]), "%s: logit %d is %g", dir, v, (double)logits[v]);
            sum += logits[v];
            sq += (double)logits[v] * logits[v];
        }
        double mean = sum / info.n_vocab, sd = sqrt(sq / info.n_vocab - mean * mean);
        ck_assert_msg(sd > 0.05 && sd < 100, "%s: logits have std %g", dir, sd);
    }
    free(logits);
    ferry_context_free(c);
    ferry_model_close(m);
}

/* Element i of the tensor `name` as engine/synth.c documents it, in f32. */
static float expected_value(const char *name, uint64_t seed, int64_t cols, uint64_t i)
{
    uint64_t key = XXH3_64bits_withSeed(name, strlen(name), seed);
    uint64_t z = key + (i / 4 + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    uint32_t bits = (uint32_t)(z >> (16 * (i % 4))) & 0xffff;
    const float a = (float)sqrt(3.0 / (double)cols), step = 2.0f * a / 65536.0f;
    return ((float)bits + 0.5f) * step - a;
}

static float element(const ferry_st_tensor *t, uint64_t i)
{
    uint16_t h;
    float f;
    switch (t->dtype) {
    case FERRY_ST_F32:
        memcpy(&f, (const uint8_t *)t->data + 4 * i, 4);
        return f;
    case FERRY_ST_BF16:
        memcpy(&h, (const uint8_t *)t->data + 2 * i, 2);
        return ferry_bf16_to_f32(h);
    case FERRY_ST_F16:
        memcpy(&h, (const uint8_t *)t->data + 2 * i, 2);
        return ferry_f16_to_f32(h);
    default:
        ck_abort_msg("tensor '%s' has dtype %s", t->name, ferry_st_dtype_name(t->dtype));
    }
    return 0;
}

/* ---- a sharded tiny model runs ------------------------------------------------------------ */

START_TEST(test_synth_tiny_sharded_runs)
{
    char dir[512], out[600], path[700];
    tu_scratch_dir(dir, "synth-tiny");
    snprintf(out, sizeof out, "%s/model", dir); /* does not exist yet: ferry_synth makes it */
    ferry_synth_params p = tiny_params(2);
    ferry_synth_info info;
    ck_assert_msg(ferry_synth_plan(&p, &info) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(info.n_tensors, 3 + 2 * (7 + 3 * 8));
    ck_assert_int_ge(info.n_shards, 5);
    ck_assert_int_eq(info.n_threads, 3);
    ck_assert_int_eq(info.n_params, 2 * 4096 * 192 + 192 +
                                        2 * (2 * 192 + 2 * 192 * 192 + 2 * 64 * 192 + 8 * 192 +
                                             8 * 3 * 192 * 384));
    ck_assert_msg(ferry_synth(&p, out) == FERRY_OK, "%s", ferry_last_error());

    /* exactly the checkpoint's files, no temporaries, as many bytes as planned */
    char *names[MAX_FILES];
    int n = list_dir(out, names);
    ck_assert_int_eq(n, 6 + info.n_shards);
    uint64_t shard_bytes = 0;
    int n_shards = 0;
    for (int i = 0; i < n; i++) {
        ck_assert_msg(!strstr(names[i], ".tmp"), "%s left behind", names[i]);
        char want[64];
        snprintf(want, sizeof want, "model-%05d-of-%05d.safetensors", n_shards + 1,
                 (int)info.n_shards);
        if (!strcmp(names[i], want)) {
            struct stat sb;
            snprintf(path, sizeof path, "%s/%s", out, names[i]);
            ck_assert(stat(path, &sb) == 0);
            shard_bytes += (uint64_t)sb.st_size;
            n_shards++;
        }
    }
    ck_assert_int_eq(n_shards, info.n_shards);
    ck_assert_uint_eq(shard_bytes, info.total_bytes);
    static const char *const want_files[] = {
        "config.json", "model.safetensors.index.json", "special_tokens_map.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"};
    for (int k = 0; k < 6; k++) {
        snprintf(path, sizeof path, "%s/%s", out, want_files[k]);
        ck_assert_msg(exists(path), "%s is missing", path);
    }
    ck_assert(same_file(out, TINY_DIR, "tokenizer.json"));
    ck_assert(same_file(out, TINY_DIR, "tokenizer_config.json"));
    free_names(names, n);
    snprintf(path, sizeof path, "%s/config.json", out);
    char *config = tu_read_file(path, NULL);
    ck_assert(strstr(config, "\"torch_dtype\":\t\"bfloat16\"") != NULL);
    ck_assert(strstr(config, "\"architectures\":\t[\"MixtralForCausalLM\"]") != NULL);
    free(config);

    check_runs(out, 2);

    /* the values: norms 1; matrices uniform in [-a, a) with std 1/sqrt(columns) */
    ferry_st_set *st = NULL;
    ck_assert_msg(ferry_st_open_dir(out, &st) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(ferry_st_count(st), info.n_tensors);
    ck_assert_int_eq(ferry_st_file_count(st), info.n_shards);
    const ferry_st_tensor *norm =
        ferry_st_find(st, "model.layers.1.post_attention_layernorm.weight");
    ck_assert(norm && norm->dtype == FERRY_ST_BF16 && norm->n_dims == 1 && norm->shape[0] == 192);
    for (int i = 0; i < 192; i++)
        ck_assert(element(norm, (uint64_t)i) == 1.0f);
    const ferry_st_tensor *w2 =
        ferry_st_find(st, "model.layers.1.block_sparse_moe.experts.5.w2.weight");
    ck_assert(w2 && w2->n_dims == 2 && w2->shape[0] == 192 && w2->shape[1] == 384);
    double a = sqrt(3.0 / 384), sum = 0, sq = 0;
    uint64_t count = 192 * 384;
    for (uint64_t i = 0; i < count; i++) {
        float v = element(w2, i);
        ck_assert_msg(fabs(v) <= a * 1.004, "w2[%llu] = %g outside +-%g", (unsigned long long)i,
                      (double)v, a);
        ck_assert(v == ferry_bf16_to_f32(ferry_f32_to_bf16(expected_value(w2->name, 0, 384, i))));
        sum += v;
        sq += (double)v * v;
    }
    double mean = sum / (double)count, sd = sqrt(sq / (double)count - mean * mean);
    ck_assert_msg(fabs(mean) < 0.002 && fabs(sd * sqrt(384.0) - 1) < 0.01,
                  "w2: mean %g, std %g x sqrt(384)", mean, sd * sqrt(384.0));
    ferry_st_close(st);
}
END_TEST

/* ---- determinism ------------------------------------------------------------------------- */

static void synth_into(const char *out, int32_t layers, uint64_t seed, int32_t threads,
                       int32_t dtype)
{
    ferry_synth_params p = tiny_params(layers);
    p.seed = seed;
    p.n_threads = threads;
    p.dtype = dtype;
    p.n_vocab = 8192; /* an f32 embedding of 6 MiB: more than one 4 MiB chunk */
    ck_assert_msg(ferry_synth(&p, out) == FERRY_OK, "%s: %s", out, ferry_last_error());
}

START_TEST(test_synth_is_deterministic)
{
    char dir[512], a[600], b[600], c[600], d[600];
    tu_scratch_dir(dir, "synth-seed");
    snprintf(a, sizeof a, "%s/a", dir);
    snprintf(b, sizeof b, "%s/b", dir);
    snprintf(c, sizeof c, "%s/c", dir);
    snprintf(d, sizeof d, "%s/d", dir);
    synth_into(a, 1, 7, 1, FERRY_SYNTH_F32);
    synth_into(b, 1, 7, 4, FERRY_SYNTH_F32);
    synth_into(c, 1, 8, 2, FERRY_SYNTH_F32);
    synth_into(d, 2, 7, 2, FERRY_SYNTH_F32);

    char *names[MAX_FILES], *others[MAX_FILES];
    int n = list_dir(a, names);
    ck_assert_int_eq(list_dir(b, others), n);
    int n_shards = 0;
    for (int i = 0; i < n; i++) {
        ck_assert_str_eq(names[i], others[i]);
        ck_assert_msg(same_file(a, b, names[i]), "%s differs between 1 and 4 threads", names[i]);
        if (strstr(names[i], ".safetensors") && !strstr(names[i], ".json")) {
            n_shards++;
            ck_assert_msg(!same_file(a, c, names[i]), "%s is the same with seeds 7 and 8",
                          names[i]);
        }
    }
    ck_assert_int_ge(n_shards, 3);
    ck_assert(!same_file(a, c, "config.json")); /* it records the seed */
    ck_assert(same_file(a, c, "tokenizer.json"));
    free_names(others, n);
    free_names(names, n);

    /* every value is the documented function of the seed and the tensor's name: the same
     * tensor of a 1-layer and a 2-layer model is the same, across chunk boundaries */
    ferry_st_set *sa = NULL, *sd = NULL;
    ck_assert_msg(ferry_st_open_dir(a, &sa) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_msg(ferry_st_open_dir(d, &sd) == FERRY_OK, "%s", ferry_last_error());
    static const char *const shared[] = {"model.embed_tokens.weight", "lm_head.weight",
                                         "model.layers.0.self_attn.k_proj.weight",
                                         "model.layers.0.block_sparse_moe.experts.7.w3.weight"};
    for (int k = 0; k < 4; k++) {
        const ferry_st_tensor *x = ferry_st_find(sa, shared[k]), *y = ferry_st_find(sd, shared[k]);
        ck_assert_msg(x && y, "%s missing", shared[k]);
        ck_assert(x->dtype == FERRY_ST_F32 && x->n_bytes == y->n_bytes);
        ck_assert_msg(memcmp(x->data, y->data, x->n_bytes) == 0, "%s differs with 2 layers",
                      shared[k]);
        uint64_t n_elems = x->n_bytes / 4;
        /* the first and last elements, and both sides of each 4 MiB chunk boundary */
        uint64_t at[6] = {0, 1, n_elems - 1, (1u << 20) - 1, 1u << 20, (1u << 20) + 1};
        for (int j = 0; j < 6; j++) {
            if (at[j] >= n_elems)
                continue;
            float want = expected_value(shared[k], 7, x->shape[1], at[j]);
            ck_assert_msg(element(x, at[j]) == want, "%s[%llu] = %.9g, want %.9g", shared[k],
                          (unsigned long long)at[j], (double)element(x, at[j]), (double)want);
        }
    }
    const ferry_st_tensor *e = ferry_st_find(sa, "model.embed_tokens.weight");
    ck_assert_uint_gt(e->n_bytes, 4u << 20);
    ferry_st_close(sa);
    ferry_st_close(sd);

    /* a shape whose tensors do not end on a 4-element boundary: w1 is 385 x 186 */
    char odd[600];
    snprintf(odd, sizeof odd, "%s/odd", dir);
    ferry_synth_params p = tiny_params(1);
    p.d_model = 186;
    p.n_heads = 3;
    p.n_kv_heads = 1;
    p.d_ff = 385;
    p.dtype = FERRY_SYNTH_F32;
    p.seed = 11;
    ck_assert_msg(ferry_synth(&p, odd) == FERRY_OK, "%s", ferry_last_error());
    ferry_st_set *so = NULL;
    ck_assert_msg(ferry_st_open_dir(odd, &so) == FERRY_OK, "%s", ferry_last_error());
    const char *name = "model.layers.0.block_sparse_moe.experts.2.w1.weight";
    const ferry_st_tensor *w1 = ferry_st_find(so, name);
    ck_assert(w1 && w1->shape[0] == 385 && w1->shape[1] == 186);
    uint64_t n_elems = 385 * 186;
    ck_assert_uint_eq(n_elems % 4, 2);
    for (uint64_t i = n_elems - 9; i < n_elems; i++)
        ck_assert_msg(element(w1, i) == expected_value(name, 11, 186, i), "%s[%llu]", name,
                      (unsigned long long)i);
    ferry_st_close(so);
}
END_TEST

/* ---- dtypes -------------------------------------------------------------------------------- */

START_TEST(test_synth_dtypes_load)
{
    static const int32_t dtypes[2] = {FERRY_SYNTH_F32, FERRY_SYNTH_F16};
    static const ferry_st_dtype st_dtypes[2] = {FERRY_ST_F32, FERRY_ST_F16};
    static const char *const torch[2] = {"\"float32\"", "\"float16\""};
    for (int k = 0; k < 2; k++) {
        char dir[512], path[700];
        tu_scratch_dir(dir, k ? "synth-f16" : "synth-f32");
        ferry_synth_params p = tiny_params(2);
        p.dtype = dtypes[k];
        p.shard_bytes = 1ull << 30; /* one shard: model.safetensors, no index */
        ferry_synth_info info;
        ck_assert_int_eq(ferry_synth_plan(&p, &info), FERRY_OK);
        ck_assert_int_eq(info.n_shards, 1);
        ck_assert_msg(ferry_synth(&p, dir) == FERRY_OK, "%s", ferry_last_error());
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
        ck_assert(!exists(path));
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        struct stat sb;
        ck_assert(stat(path, &sb) == 0 && (uint64_t)sb.st_size == info.total_bytes);
        snprintf(path, sizeof path, "%s/config.json", dir);
        char *config = tu_read_file(path, NULL);
        ck_assert_msg(strstr(config, torch[k]) != NULL, "config.json lacks %s", torch[k]);
        free(config);
        ferry_st_set *st = NULL;
        ck_assert_msg(ferry_st_open_dir(dir, &st) == FERRY_OK, "%s", ferry_last_error());
        for (int32_t i = 0; i < ferry_st_count(st); i++)
            ck_assert_msg(ferry_st_at(st, i)->dtype == st_dtypes[k], "%s: %s",
                          ferry_st_at(st, i)->name, ferry_st_dtype_name(ferry_st_at(st, i)->dtype));
        ferry_st_close(st);
        check_runs(dir, 2);
    }
}
END_TEST

/* ---- bad input ----------------------------------------------------------------------------- */

typedef struct {
    const char *what;
    ferry_status code;
    const char *needle;
} bad_case;

START_TEST(test_synth_rejects_bad_input)
{
    char dir[512], out[600];
    tu_scratch_dir(dir, "synth-bad");
    snprintf(out, sizeof out, "%s/never", dir);
    static const bad_case cases[] = {
        {"vocab 0", FERRY_ERR_INVALID, "vocab (vocab_size) is 0, must be in [1, "},
        {"hidden -4", FERRY_ERR_INVALID, "hidden (hidden_size) is -4"},
        {"intermediate 0", FERRY_ERR_INVALID, "intermediate (intermediate_size) is 0"},
        {"layers 0", FERRY_ERR_INVALID, "layers (num_hidden_layers) is 0"},
        {"heads 0", FERRY_ERR_INVALID, "heads (num_attention_heads) is 0"},
        {"kv heads -1", FERRY_ERR_INVALID, "kv heads (num_key_value_heads) is -1"},
        {"experts 0", FERRY_ERR_INVALID, "experts (num_local_experts) is 0"},
        {"top-k 0", FERRY_ERR_INVALID, "top-k (num_experts_per_tok) is 0"},
        {"max positions 0", FERRY_ERR_INVALID, "max positions (max_position_embeddings) is 0"},
        {"hidden 200 / 6 heads", FERRY_ERR_INVALID,
         "hidden (hidden_size) 200 is not a multiple of heads (num_attention_heads) 6"},
        {"head dim 33", FERRY_ERR_INVALID, "hidden / heads = 198 / 6 = 33 is odd"},
        {"6 heads / 4 kv heads", FERRY_ERR_INVALID,
         "heads (num_attention_heads) 6 is not a multiple of kv heads (num_key_value_heads) 4"},
        {"top-9 of 8", FERRY_ERR_INVALID,
         "top-k (num_experts_per_tok) 9 exceeds experts (num_local_experts) 8"},
        {"dtype 3", FERRY_ERR_INVALID, "dtype 3 is not bf16 (0), f16 (1) or f32 (2)"},
        {"rms eps 0", FERRY_ERR_INVALID, "rms eps 0 must be a positive float"},
        {"threads -1", FERRY_ERR_INVALID, "threads is -1"},
        {"shard size 0", FERRY_ERR_INVALID, "shard size is 0 bytes"},
        {"no tokenizer", FERRY_ERR_INVALID, "no tokenizer folder given"},
        {"missing tokenizer", FERRY_ERR_IO, "/no-such-tokenizer: No such file or directory"},
        {"vocab below the tokenizer's", FERRY_ERR_INVALID,
         "vocab (vocab_size) 100 is smaller than the 4096 tokens of"},
    };
    const int n_cases = (int)(sizeof cases / sizeof cases[0]);
    for (int k = 0; k < n_cases; k++) {
        ferry_synth_params p = tiny_params(1);
        switch (k) {
        case 0: p.n_vocab = 0; break;
        case 1: p.d_model = -4; break;
        case 2: p.d_ff = 0; break;
        case 3: p.n_layers = 0; break;
        case 4: p.n_heads = 0; break;
        case 5: p.n_kv_heads = -1; break;
        case 6: p.n_experts = 0; break;
        case 7: p.n_experts_used = 0; break;
        case 8: p.max_positions = 0; break;
        case 9: p.d_model = 200; break;
        case 10: p.d_model = 198; break;
        case 11: p.n_kv_heads = 4; break;
        case 12: p.n_experts_used = 9; break;
        case 13: p.dtype = 3; break;
        case 14: p.rms_eps = 0; break;
        case 15: p.n_threads = -1; break;
        case 16: p.shard_bytes = 0; break;
        case 17: p.tokenizer_dir = NULL; break;
        case 18: p.tokenizer_dir = FERRY_BINARY_DIR "/no-such-tokenizer"; break;
        case 19: p.n_vocab = 100; break;
        }
        expect_fail(ferry_synth(&p, out), cases[k].code, cases[k].what, cases[k].needle, NULL);
        ck_assert_msg(!exists(out), "%s: %s was created", cases[k].what, out);
        ferry_synth_info info = {.n_shards = -7};
        expect_fail(ferry_synth_plan(&p, &info), cases[k].code, cases[k].what, cases[k].needle,
                    NULL);
        ck_assert_int_eq(info.n_shards, -7);
    }

    /* presets: known names set the shape, others fail and leave the parameters alone */
    ferry_synth_params p = ferry_synth_params_default();
    ck_assert(p.n_layers == 32 && p.d_model == 4096 && p.d_ff == 14336 && p.n_vocab == 32000 &&
              p.n_heads == 32 && p.n_kv_heads == 8 && p.n_experts == 8 &&
              p.n_experts_used == 2 && p.max_positions == 32768 && p.rope_theta == 1e6 &&
              p.rms_eps == 1e-5 && p.dtype == FERRY_SYNTH_BF16 && p.shard_bytes == 4ull << 30);
    ck_assert_int_eq(ferry_synth_preset("tiny", &p), FERRY_OK);
    ck_assert(p.n_layers == 6 && p.d_model == 192 && p.d_ff == 384 && p.n_vocab == 4096 &&
              p.n_heads == 6 && p.n_kv_heads == 2 && p.max_positions == 4096);
    ferry_synth_params before = p;
    expect_fail(ferry_synth_preset("mixtral-9x9b", &p), FERRY_ERR_INVALID, "preset",
                "unknown preset 'mixtral-9x9b'", "mixtral-8x7b, tiny");
    ck_assert(memcmp(&before, &p, sizeof p) == 0);
    expect_fail(ferry_synth(NULL, out), FERRY_ERR_INVALID, "NULL params", "NULL", NULL);
    p.tokenizer_dir = TINY_DIR;
    expect_fail(ferry_synth(&p, NULL), FERRY_ERR_INVALID, "NULL folder", "NULL", NULL);
    ck_assert(!exists(out));
    rmdir(dir);
}
END_TEST

START_TEST(test_synth_refuses_non_empty_folder)
{
    char dir[512], path[700], file[600];
    tu_scratch_dir(dir, "synth-full");
    snprintf(path, sizeof path, "%s/keep.txt", dir);
    FILE *f = fopen(path, "w");
    ck_assert(f != NULL);
    fputs("hello", f);
    fclose(f);
    ferry_synth_params p = tiny_params(1);
    expect_fail(ferry_synth(&p, dir), FERRY_ERR_INVALID, "non-empty", dir,
                "is not empty (it holds keep.txt)");
    char *names[MAX_FILES];
    int n = list_dir(dir, names);
    ck_assert_int_eq(n, 1);
    ck_assert_str_eq(names[0], "keep.txt");
    free_names(names, n);
    char *text = tu_read_file(path, NULL);
    ck_assert_str_eq(text, "hello");
    free(text);

    /* a file where the folder should be */
    expect_fail(ferry_synth(&p, path), FERRY_ERR_INVALID, "a file", path, "is not a folder");
    text = tu_read_file(path, NULL);
    ck_assert_str_eq(text, "hello");
    free(text);
    /* a parent that does not exist */
    snprintf(file, sizeof file, "%s/no/such", dir);
    expect_fail(ferry_synth(&p, file), FERRY_ERR_IO, "no parent", file, "cannot create");

    /* an empty folder is fine */
    unlink(path);
    ck_assert_msg(ferry_synth(&p, dir) == FERRY_OK, "%s", ferry_last_error());
    snprintf(path, sizeof path, "%s/config.json", dir);
    ck_assert(exists(path));
}
END_TEST

/* ---- never a checkpoint before the end, nothing left after a failure ------------------------ */

typedef struct {
    const char *dir;
    pthread_mutex_t mu;
    int n_calls, n_midway, n_opened;
    uint64_t last, total;
    int backwards;
    char seen[800];
} watch;

static void watch_progress(uint64_t done, uint64_t total, void *user)
{
    watch *w = user;
    pthread_mutex_lock(&w->mu);
    w->n_calls++;
    if (done < w->last || done > total)
        w->backwards = 1;
    w->last = done;
    w->total = total;
    if (done < total) {
        w->n_midway++;
        ferry_st_set *st = NULL;
        if (ferry_st_open_dir(w->dir, &st) == FERRY_OK) {
            w->n_opened++;
            ferry_st_close(st);
        }
        /* the commit files are not there yet */
        char path[700];
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", w->dir);
        if (exists(path))
            snprintf(w->seen, sizeof w->seen, "%s", path);
        snprintf(path, sizeof path, "%s/model.safetensors", w->dir);
        if (exists(path))
            snprintf(w->seen, sizeof w->seen, "%s", path);
    }
    pthread_mutex_unlock(&w->mu);
}

START_TEST(test_synth_never_looks_complete_midway)
{
    for (int sharded = 0; sharded < 2; sharded++) {
        char dir[512];
        tu_scratch_dir(dir, sharded ? "synth-mid-sharded" : "synth-mid-single");
        watch w = {.dir = dir};
        pthread_mutex_init(&w.mu, NULL);
        ferry_synth_params p = tiny_params(2);
        p.shard_bytes = sharded ? 1 << 20 : 1ull << 30;
        p.progress = watch_progress;
        p.progress_user = &w;
        ck_assert_msg(ferry_synth(&p, dir) == FERRY_OK, "%s", ferry_last_error());
        pthread_mutex_destroy(&w.mu);
        ck_assert_int_ge(w.n_midway, 5);
        ck_assert_int_eq(w.n_opened, 0);
        ck_assert_msg(w.seen[0] == 0, "%s existed while the shards were written", w.seen);
        ck_assert(!w.backwards);
        /* the last call says everything is written: the tensors, not the headers */
        ferry_synth_info info;
        ck_assert_int_eq(ferry_synth_plan(&p, &info), FERRY_OK);
        ck_assert_uint_eq(w.last, w.total);
        ck_assert(w.total < info.total_bytes && w.total > info.total_bytes * 99 / 100);
        ferry_st_set *st = NULL;
        ck_assert_msg(ferry_st_open_dir(dir, &st) == FERRY_OK, "%s", ferry_last_error());
        ferry_st_close(st);
    }
}
END_TEST

START_TEST(test_synth_failure_removes_what_it_wrote)
{
    /* a tokenizer folder whose special_tokens_map.json is a folder: copying it fails after
     * out_dir, tokenizer.json and tokenizer_config.json were written */
    char dir[512], tok[600], path[700], out[600];
    tu_scratch_dir(dir, "synth-fail");
    snprintf(tok, sizeof tok, "%s/tok", dir);
    ck_assert(mkdir(tok, 0755) == 0);
    static const char *const files[2] = {"tokenizer.json", "tokenizer_config.json"};
    for (int k = 0; k < 2; k++) {
        size_t len;
        snprintf(path, sizeof path, "%s/%s", TINY_DIR, files[k]);
        char *data = tu_read_file(path, &len);
        snprintf(path, sizeof path, "%s/%s", tok, files[k]);
        FILE *f = fopen(path, "wb");
        ck_assert(f && fwrite(data, 1, len, f) == len && fclose(f) == 0);
        free(data);
    }
    snprintf(path, sizeof path, "%s/special_tokens_map.json", tok);
    ck_assert(mkdir(path, 0755) == 0);

    ferry_synth_params p = tiny_params(1);
    p.tokenizer_dir = tok;
    snprintf(out, sizeof out, "%s/out", dir);
    expect_fail(ferry_synth(&p, out), FERRY_ERR_IO, "unreadable tokenizer file",
                "special_tokens_map.json", "cannot read");
    ck_assert_msg(!exists(out), "%s was left behind", out);
    /* a folder that existed (empty) stays, empty */
    ck_assert(mkdir(out, 0755) == 0);
    expect_fail(ferry_synth(&p, out), FERRY_ERR_IO, "again", "special_tokens_map.json", NULL);
    char *names[MAX_FILES];
    ck_assert_int_eq(list_dir(out, names), 0);
}
END_TEST

/* ---- the other families ------------------------------------------------------------------- */

#define FAMILIES_DIR FERRY_SOURCE_DIR "/../shared/fixtures/moe-families"

/* A preset of another family as its real config.json has it. */
typedef struct {
    const char *preset, *model_type, *architecture, *key_experts, *key_ff;
    int32_t layers, hidden, ff, heads, kv_heads, head_dim, experts, top_k, vocab, max_pos,
        dense_ff, shared_ff, norm_topk, n_bpe;
    double rope_theta, rms_eps;
} family_case;

static const family_case g_cases[] = {
    {"qwen3-30b-a3b", "qwen3_moe", "Qwen3MoeForCausalLM", "num_experts", "moe_intermediate_size",
     48, 2048, 768, 32, 4, 128, 128, 8, 151936, 40960, 6144, 0, 1, 151643, 1e6, 1e-6},
    {"qwen3-235b-a22b", "qwen3_moe", "Qwen3MoeForCausalLM", "num_experts",
     "moe_intermediate_size", 94, 4096, 1536, 64, 4, 128, 128, 8, 151936, 40960, 12288, 0, 1,
     151643, 1e6, 1e-6},
    {"qwen1.5-moe-a2.7b", "qwen2_moe", "Qwen2MoeForCausalLM", "num_experts",
     "moe_intermediate_size", 24, 2048, 1408, 16, 16, 0, 60, 4, 151936, 8192, 5632, 5632, 0,
     151643, 1e6, 1e-6},
    {"olmoe-1b-7b", "olmoe", "OlmoeForCausalLM", "num_experts", "intermediate_size", 16, 2048,
     1024, 16, 16, 0, 64, 8, 50304, 4096, 0, 0, 0, 50277, 1e4, 1e-5},
};
#define N_CASES (int)(sizeof g_cases / sizeof g_cases[0])

static const int32_t g_dense_layer_1[1] = {1};

/* Preset k as it is, checked, then shrunk so a test runs in a moment: hidden 64, experts of
 * 32 (the preset's expert count and top-k kept but for qwen3-30b-a3b), 2 layers (1 for
 * qwen3-235b-a22b), and each family's options exercised: qwen3-30b-a3b a head_dim apart
 * from hidden / heads and a dense layer 1; qwen3-235b-a22b 128 experts and tied
 * embeddings; qwen1.5-moe-a2.7b a shared expert of 48; olmoe-1b-7b clip_qkv 8. vocab 4096
 * with tok_dir (the bundled tokenizer), else vocab and the generated tokenizer 1024. */
static ferry_synth_params small_params(int k, const char *tok_dir)
{
    const family_case *c = &g_cases[k];
    ferry_synth_params p = ferry_synth_params_default();
    ck_assert_int_eq(ferry_synth_preset(c->preset, &p), FERRY_OK);
    ck_assert_msg(!strcmp(p.model_type, c->model_type) && p.n_layers == c->layers &&
                      p.d_model == c->hidden && p.d_ff == c->ff && p.n_heads == c->heads &&
                      p.n_kv_heads == c->kv_heads && p.head_dim == c->head_dim &&
                      p.n_experts == c->experts && p.n_experts_used == c->top_k &&
                      p.n_vocab == c->vocab && p.max_positions == c->max_pos &&
                      p.d_ff_dense == c->dense_ff && p.d_ff_shared == c->shared_ff &&
                      p.norm_topk_prob == c->norm_topk && p.n_bpe_tokens == c->n_bpe &&
                      p.rope_theta == c->rope_theta && p.rms_eps == c->rms_eps &&
                      p.n_dense_layers == 0 && p.attention_bias == 0 && p.clip_qkv == 0 &&
                      p.tie_embeddings == 0,
                  "preset %s has another shape", c->preset);
    p.n_layers = 2;
    p.d_model = 64;
    p.d_ff = 32;
    p.n_heads = 4;
    p.n_kv_heads = c->kv_heads < 4 ? c->kv_heads : 4;
    p.head_dim = 0;
    p.shard_bytes = 1ull << 30;
    p.n_threads = 2;
    p.tokenizer_dir = tok_dir;
    p.n_vocab = tok_dir ? 4096 : 1024;
    p.n_bpe_tokens = 0;
    switch (k) {
    case 0:
        p.head_dim = 32;
        p.n_experts = 8;
        p.n_experts_used = 4;
        p.d_ff_dense = 48;
        p.dense_layers = g_dense_layer_1;
        p.n_dense_layers = 1;
        break;
    case 1:
        p.n_layers = 1;
        p.n_heads = 8;
        p.head_dim = 16;
        p.d_ff = 16;
        p.d_ff_dense = 48;
        p.tie_embeddings = 1;
        break;
    case 2:
        p.d_ff_dense = 48;
        p.d_ff_shared = 48;
        break;
    case 3:
        p.clip_qkv = 8;
        break;
    }
    return p;
}

/* The tensors small_params(k) makes: embedding, final norm and head (unless tied), per
 * layer 2 norms and 4 projections, then qwen3 2 q/k norms, a router and 3 per expert (or a
 * dense MLP's 3); qwen2 3 biases, a router, 3 per expert, the shared expert's 3 and its gate;
 * olmoe 2 q/k norms, a router and 3 per expert. */
static const int32_t g_small_tensors[N_CASES] = {
    3 + (6 + 2 + 1 + 3 * 8) + (6 + 2 + 3), 2 + 6 + 2 + 1 + 3 * 128,
    3 + 2 * (6 + 3 + 1 + 3 * 60 + 3 + 1), 3 + 2 * (6 + 2 + 1 + 3 * 64)};

/* Whether key is a word of the space-separated list. */
static int in_list(const char *list, const char *key)
{
    size_t n = strlen(key);
    for (const char *w = list; *w; w += strcspn(w, " "), w += *w == ' ')
        if (strcspn(w, " ") == n && !strncmp(w, key, n))
            return 1;
    return 0;
}

static cJSON *read_json(const char *dir, const char *name)
{
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    char *text = tu_read_file(path, NULL);
    cJSON *j = cJSON_Parse(text);
    free(text);
    ck_assert_msg(j != NULL, "%s is not JSON", path);
    return j;
}

static double json_num(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    ck_assert_msg(cJSON_IsNumber(v), "config.json: '%s' is not a number", key);
    return v->valuedouble;
}

/* Every value of t within [-a, a], not all the same. */
static void check_random(const ferry_st_tensor *t, double a)
{
    uint64_t n = t->n_bytes / 2;
    int varied = 0;
    for (uint64_t i = 0; i < n; i++) {
        float v = element(t, i);
        ck_assert_msg(fabs(v) <= a * 1.004, "%s[%llu] = %g outside +-%g", t->name,
                      (unsigned long long)i, (double)v, a);
        varied |= v != element(t, 0);
    }
    ck_assert_msg(varied, "%s: every value is %g", t->name, (double)element(t, 0));
}

/* config.json of small_params(k): the family's keys and values. */
static void check_family_config(int k, const char *dir, const ferry_synth_params *p)
{
    const family_case *c = &g_cases[k];
    cJSON *cfg = read_json(dir, "config.json");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(cfg, "model_type");
    const cJSON *arch = cJSON_GetObjectItemCaseSensitive(cfg, "architectures");
    ck_assert(cJSON_IsString(type) && !strcmp(type->valuestring, c->model_type));
    ck_assert(cJSON_GetArraySize(arch) == 1 &&
              !strcmp(cJSON_GetArrayItem(arch, 0)->valuestring, c->architecture));
    ck_assert_int_eq(json_num(cfg, c->key_experts), p->n_experts);
    ck_assert_int_eq(json_num(cfg, c->key_ff), p->d_ff);
    ck_assert(!cJSON_GetObjectItem(cfg, "num_local_experts"));
    ck_assert_int_eq(json_num(cfg, "num_experts_per_tok"), p->n_experts_used);
    ck_assert_int_eq(json_num(cfg, "num_hidden_layers"), p->n_layers);
    ck_assert_int_eq(json_num(cfg, "vocab_size"), p->n_vocab);
    ck_assert(json_num(cfg, "rope_theta") == c->rope_theta);
    ck_assert(json_num(cfg, "rms_norm_eps") == c->rms_eps);
    ck_assert(cJSON_IsBool(cJSON_GetObjectItem(cfg, "norm_topk_prob")) &&
              cJSON_IsTrue(cJSON_GetObjectItem(cfg, "norm_topk_prob")) == c->norm_topk);
    ck_assert(cJSON_IsTrue(cJSON_GetObjectItem(cfg, "tie_word_embeddings")) == (k == 1));
    const cJSON *shared = cJSON_GetObjectItem(cfg, "shared_expert_intermediate_size");
    ck_assert(k == 2 ? cJSON_IsNumber(shared) && shared->valueint == 48 : shared == NULL);
    const cJSON *head_dim = cJSON_GetObjectItem(cfg, "head_dim");
    ck_assert(k < 2 ? cJSON_IsNumber(head_dim) && head_dim->valueint == p->head_dim
                    : head_dim == NULL);
    if (k < 3) /* Qwen: the dense width and which layers are dense */
        ck_assert_int_eq(json_num(cfg, "intermediate_size"), p->d_ff_dense);
    const cJSON *only = cJSON_GetObjectItem(cfg, "mlp_only_layers");
    if (k == 0)
        ck_assert(cJSON_GetArraySize(only) == 1 && cJSON_GetArrayItem(only, 0)->valueint == 1);
    const cJSON *clip = cJSON_GetObjectItem(cfg, "clip_qkv");
    ck_assert(k == 3 ? cJSON_IsNumber(clip) && clip->valuedouble == 8 : clip == NULL);
    /* the ids of a tokenizer copied from models/tiny-moe-code, or Qwen's / OLMoE's specials */
    const cJSON *bos = cJSON_GetObjectItem(cfg, "bos_token_id");
    if (k == 3)
        ck_assert(bos == NULL && json_num(cfg, "eos_token_id") >= 0);
    else
        ck_assert(cJSON_IsNumber(bos));
    /* the keys are sorted, as transformers writes them, ferry_synth last */
    const cJSON *prev = NULL;
    for (const cJSON *e = cfg->child; e && e->next; prev = e, e = e->next)
        ck_assert_msg(!prev || strcmp(prev->string, e->string) < 0, "config.json: '%s' before "
                      "'%s'", prev ? prev->string : "", e->string);
    cJSON_Delete(cfg);
}

/* Opens dir, checks its info against p, evaluates 5 tokens and one more and checks the
 * logits are finite and varied. */
static void check_family_runs(const char *dir, const ferry_synth_params *p, int32_t head_dim)
{
    ferry_model_params mp = ferry_model_params_default();
    mp.backend = FERRY_BACKEND_CPU;
    mp.n_threads = 2;
    ferry_model *m = NULL;
    ck_assert_msg(ferry_model_open(dir, &mp, &m) == FERRY_OK, "open %s: %s", dir,
                  ferry_last_error());
    ferry_model_info info;
    ck_assert_int_eq(ferry_model_get_info(m, &info), FERRY_OK);
    ck_assert_msg(info.n_layers == p->n_layers && info.d_model == p->d_model &&
                      info.d_ff == p->d_ff && info.n_heads == p->n_heads &&
                      info.n_kv_heads == p->n_kv_heads && info.head_dim == head_dim &&
                      info.n_experts == p->n_experts && info.n_experts_used == p->n_experts_used &&
                      info.n_vocab == p->n_vocab && info.max_positions == p->max_positions &&
                      info.rope_theta == (float)p->rope_theta &&
                      info.rms_eps == (float)p->rms_eps,
                  "%s: info has another shape (layers %d, hidden %d, ff %d, heads %d/%d of %d, "
                  "experts %d top-%d, vocab %d)", dir, (int)info.n_layers, (int)info.d_model,
                  (int)info.d_ff, (int)info.n_heads, (int)info.n_kv_heads, (int)info.head_dim,
                  (int)info.n_experts, (int)info.n_experts_used, (int)info.n_vocab);
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = 32;
    ferry_context *c = NULL;
    ck_assert_msg(ferry_context_create(m, &cp, &c) == FERRY_OK, "%s", ferry_last_error());
    float *logits = malloc((size_t)info.n_vocab * sizeof *logits);
    ck_assert(logits != NULL);
    const int32_t ids[5] = {11, 300, 7, 1000, 42};
    for (int step = 0; step < 2; step++) {
        ck_assert_msg(ferry_eval(c, step ? &ids[2] : ids, step ? 1 : 5, logits) == FERRY_OK,
                      "%s", ferry_last_error());
        double sum = 0, sq = 0;
        for (int32_t v = 0; v < info.n_vocab; v++) {
            ck_assert_msg(isfinite(logits[v]), "%s: logit %d is %g", dir, v, (double)logits[v]);
            sum += logits[v];
            sq += (double)logits[v] * logits[v];
        }
        double mean = sum / info.n_vocab, sd = sqrt(sq / info.n_vocab - mean * mean);
        ck_assert_msg(sd > 0.05 && sd < 100, "%s: logits have std %g", dir, sd);
    }
    free(logits);
    ferry_context_free(c);
    ferry_model_close(m);
}

START_TEST(test_synth_families_open)
{
    for (int k = 0; k < N_CASES; k++) {
        char dir[512];
        char name[64];
        snprintf(name, sizeof name, "synth-%s", g_cases[k].preset);
        tu_scratch_dir(dir, name);
        ferry_synth_params p = small_params(k, TINY_DIR);
        ferry_synth_info info;
        ck_assert_msg(ferry_synth_plan(&p, &info) == FERRY_OK, "%s", ferry_last_error());
        ck_assert_msg(info.n_tensors == g_small_tensors[k], "%s: %d tensors, want %d",
                      g_cases[k].preset, (int)info.n_tensors, (int)g_small_tensors[k]);
        ck_assert_msg(ferry_synth(&p, dir) == FERRY_OK, "%s: %s", g_cases[k].preset,
                      ferry_last_error());
        ck_assert(same_file(dir, TINY_DIR, "tokenizer.json"));
        check_family_config(k, dir, &p);
        int32_t head_dim = p.head_dim ? p.head_dim : p.d_model / p.n_heads;
        check_family_runs(dir, &p, head_dim);

        /* the family's tensors: q/k norms, biases, shared expert, dense layer, tied head */
        ferry_st_set *st = NULL;
        ck_assert_msg(ferry_st_open_dir(dir, &st) == FERRY_OK, "%s", ferry_last_error());
        ck_assert_int_eq(ferry_st_count(st), info.n_tensors);
        const ferry_st_tensor *qn = ferry_st_find(st, "model.layers.0.self_attn.q_norm.weight");
        const ferry_st_tensor *kn = ferry_st_find(st, "model.layers.0.self_attn.k_norm.weight");
        const ferry_st_tensor *qb = ferry_st_find(st, "model.layers.0.self_attn.q_proj.bias");
        const ferry_st_tensor *vb = ferry_st_find(st, "model.layers.0.self_attn.v_proj.bias");
        const ferry_st_tensor *ob = ferry_st_find(st, "model.layers.0.self_attn.o_proj.bias");
        const ferry_st_tensor *sg =
            ferry_st_find(st, "model.layers.1.mlp.shared_expert_gate.weight");
        const ferry_st_tensor *sd =
            ferry_st_find(st, "model.layers.1.mlp.shared_expert.down_proj.weight");
        const ferry_st_tensor *o = ferry_st_find(st, "model.layers.0.self_attn.o_proj.weight");
        const ferry_st_tensor *e =
            ferry_st_find(st, "model.layers.0.mlp.experts.3.down_proj.weight");
        ck_assert(e && e->shape[0] == 64 && e->shape[1] == p.d_ff);
        ck_assert(o && o->shape[0] == 64 && o->shape[1] == (int64_t)p.n_heads * head_dim);
        ck_assert((ferry_st_find(st, "lm_head.weight") != NULL) == (k != 1));
        ck_assert(!ferry_st_find(st, "model.layers.0.block_sparse_moe.gate.weight"));
        ck_assert(!ob);
        if (k < 2) { /* per-head norms of head_dim, ones */
            ck_assert(qn && kn && qn->n_dims == 1 && qn->shape[0] == head_dim &&
                      kn->shape[0] == head_dim);
            for (int i = 0; i < head_dim; i++)
                ck_assert(element(qn, (uint64_t)i) == 1.0f && element(kn, (uint64_t)i) == 1.0f);
        } else if (k == 3) { /* over the whole projections */
            ck_assert(qn && kn && qn->shape[0] == 4 * head_dim && kn->shape[0] == 4 * head_dim);
        } else {
            ck_assert(!qn && !kn);
        }
        if (k == 2) { /* q/k/v biases, random at the projection's fan-in; the shared expert */
            ck_assert(qb && vb && qb->shape[0] == 64 && vb->shape[0] == 64);
            check_random(qb, sqrt(3.0 / 64));
            check_random(vb, sqrt(3.0 / 64));
            ck_assert(sg && sg->n_dims == 2 && sg->shape[0] == 1 && sg->shape[1] == 64);
            ck_assert(sd && sd->shape[0] == 64 && sd->shape[1] == 48);
            check_random(sd, sqrt(3.0 / 48));
        } else {
            ck_assert(!qb && !vb && !sg && !sd);
        }
        if (k == 0) { /* layer 1 dense: an MLP of 48, no router, no experts */
            const ferry_st_tensor *g = ferry_st_find(st, "model.layers.1.mlp.gate_proj.weight");
            ck_assert(g && g->shape[0] == 48 && g->shape[1] == 64);
            ck_assert(!ferry_st_find(st, "model.layers.1.mlp.gate.weight"));
            ck_assert(!ferry_st_find(st, "model.layers.1.mlp.experts.0.up_proj.weight"));
            ck_assert(ferry_st_find(st, "model.layers.0.mlp.gate.weight"));
        }
        ferry_st_close(st);
    }
}
END_TEST

/* The fixtures' shapes (../shared/fixtures/moe-families) written by ferry synth: the same
 * tensor names and shapes, and config.json the same keys but for what the real models'
 * config.json has beyond them (Qwen3's max_window_layers) or lacks (Qwen1.5-MoE's
 * mlp_only_layers and rope_scaling). */
START_TEST(test_synth_families_match_fixtures)
{
    static const char *const fixtures[3] = {"tiny-qwen3_moe", "tiny-qwen2_moe", "tiny-olmoe"};
    static const char *const presets[3] = {"qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "olmoe-1b-7b"};
    static const char *const ours_only[3] = {"max_window_layers", "", ""};
    static const char *const theirs_only[3] = {"", "mlp_only_layers rope_scaling", ""};
    /* values that differ: the copied tokenizer's ids, the fixtures' init range and length,
     * Qwen1.5-MoE's window (set, unused) */
    static const char *const other_value[3] = {
        "bos_token_id eos_token_id initializer_range max_position_embeddings",
        "bos_token_id eos_token_id initializer_range max_position_embeddings sliding_window",
        "eos_token_id initializer_range max_position_embeddings"};
    static const int32_t dense_layer_2[1] = {2};
    for (int f = 0; f < 3; f++) {
        char fixture[700], dir[512];
        snprintf(fixture, sizeof fixture, "%s/%s", FAMILIES_DIR, fixtures[f]);
        tu_scratch_dir(dir, fixtures[f]);
        cJSON *want = read_json(fixture, "config.json");
        ferry_synth_params p = ferry_synth_params_default();
        ck_assert_int_eq(ferry_synth_preset(presets[f], &p), FERRY_OK);
        p.n_layers = (int32_t)json_num(want, "num_hidden_layers");
        p.d_model = (int32_t)json_num(want, "hidden_size");
        p.n_heads = (int32_t)json_num(want, "num_attention_heads");
        p.n_kv_heads = (int32_t)json_num(want, "num_key_value_heads");
        p.n_experts = (int32_t)json_num(want, "num_experts");
        p.n_experts_used = (int32_t)json_num(want, "num_experts_per_tok");
        p.head_dim = f == 0 ? (int32_t)json_num(want, "head_dim") : 0;
        p.d_ff = (int32_t)json_num(want, f < 2 ? "moe_intermediate_size" : "intermediate_size");
        p.d_ff_dense = f < 2 ? (int32_t)json_num(want, "intermediate_size") : 0;
        p.d_ff_shared = f == 1 ? (int32_t)json_num(want, "shared_expert_intermediate_size") : 0;
        p.dense_layers = f == 0 ? dense_layer_2 : NULL;
        p.n_dense_layers = f == 0;
        p.tie_embeddings = cJSON_IsTrue(cJSON_GetObjectItem(want, "tie_word_embeddings"));
        p.clip_qkv = f == 2 ? json_num(want, "clip_qkv") : 0;
        p.shard_bytes = 1ull << 30;
        p.tokenizer_dir = TINY_DIR;
        ck_assert_msg(ferry_synth(&p, dir) == FERRY_OK, "%s: %s", fixtures[f], ferry_last_error());

        ferry_st_set *a = NULL, *b = NULL;
        ck_assert_msg(ferry_st_open_dir(dir, &a) == FERRY_OK, "%s", ferry_last_error());
        ck_assert_msg(ferry_st_open_dir(fixture, &b) == FERRY_OK, "%s", ferry_last_error());
        ck_assert_int_eq(ferry_st_count(a), ferry_st_count(b));
        for (int32_t i = 0; i < ferry_st_count(b); i++) {
            const ferry_st_tensor *t = ferry_st_at(b, i), *u = ferry_st_find(a, t->name);
            ck_assert_msg(u != NULL, "%s: no tensor '%s'", fixtures[f], t->name);
            ck_assert_msg(u->n_dims == t->n_dims && u->shape[0] == t->shape[0] &&
                              (t->n_dims == 1 || u->shape[1] == t->shape[1]),
                          "%s: '%s' has another shape", fixtures[f], t->name);
        }
        ferry_st_close(a);
        ferry_st_close(b);

        cJSON *got = read_json(dir, "config.json");
        for (const cJSON *e = got->child; e; e = e->next)
            ck_assert_msg(cJSON_GetObjectItemCaseSensitive(want, e->string) ||
                              !strcmp(e->string, "ferry_synth") || in_list(ours_only[f], e->string),
                          "%s: config.json has '%s', the fixture's has not", fixtures[f],
                          e->string);
        for (const cJSON *e = want->child; e; e = e->next) {
            const cJSON *g = cJSON_GetObjectItemCaseSensitive(got, e->string);
            ck_assert_msg(g || in_list(theirs_only[f], e->string), "%s: config.json lacks '%s'",
                          fixtures[f], e->string);
            if (g && !in_list(other_value[f], e->string)) {
                char *x = cJSON_PrintUnformatted(e), *y = cJSON_PrintUnformatted(g);
                ck_assert_msg(!strcmp(x, y), "%s: config.json's '%s' is %s, the fixture's %s",
                              fixtures[f], e->string, y, x);
                free(x);
                free(y);
            }
        }
        cJSON_Delete(got);
        cJSON_Delete(want);
    }
}
END_TEST

/* A JSON value printed compactly (caller frees). */
static char *compact(const cJSON *v)
{
    char *s = cJSON_PrintUnformatted(v);
    ck_assert(s != NULL);
    return s;
}

static int cmp_items(const void *a, const void *b)
{
    return strcmp((*(cJSON *const *)a)->string, (*(cJSON *const *)b)->string);
}

/* The id of token s in a vocabulary sorted by cmp_items, or -1. */
static int vocab_id(cJSON *const *sorted, int n, const char *s)
{
    cJSON key = {.string = (char *)s}, *k = &key;
    cJSON *const *hit = bsearch(&k, sorted, (size_t)n, sizeof *sorted, cmp_items);
    return hit ? (*hit)->valueint : -1;
}

/* Checks dir's generated tokenizer against the fixture of its layout: n_bpe byte and merged
 * tokens, every merge "a b" of two earlier tokens making token 256 + its rank, the special
 * tokens after them as config.json's BOS/EOS. */
static void check_generated_tokenizer(const char *dir, const char *fixture, int32_t n_bpe,
                                      const char *const special[3], int32_t bos, int32_t eos)
{
    char path[700];
    snprintf(path, sizeof path, "%s/%s", FAMILIES_DIR, fixture);
    cJSON *tok = read_json(dir, "tokenizer.json"), *ref = read_json(path, "tokenizer.json");
    /* the layout: the same keys in the same order, the same pipeline around the model */
    const cJSON *x = tok->child, *y = ref->child;
    for (; x && y; x = x->next, y = y->next)
        ck_assert_msg(!strcmp(x->string, y->string), "tokenizer.json: '%s' where the fixture "
                      "has '%s'", x->string, y->string);
    ck_assert(!x && !y);
    static const char *const same[6] = {"version",      "truncation",     "padding",
                                        "normalizer", "pre_tokenizer", "post_processor"};
    for (int i = 0; i < 6; i++) {
        char *a = compact(cJSON_GetObjectItem(tok, same[i]));
        char *b = compact(cJSON_GetObjectItem(ref, same[i]));
        ck_assert_msg(!strcmp(a, b), "tokenizer.json: %s is %s, the fixture's %s", same[i], a, b);
        free(a);
        free(b);
    }
    const cJSON *model = cJSON_GetObjectItem(tok, "model");
    const cJSON *ref_model = cJSON_GetObjectItem(ref, "model");
    for (x = model->child, y = ref_model->child; x && y; x = x->next, y = y->next) {
        ck_assert_str_eq(x->string, y->string);
        if (strcmp(x->string, "vocab") && strcmp(x->string, "merges")) {
            char *a = compact(x), *b = compact(y);
            ck_assert_msg(!strcmp(a, b), "model.%s is %s, the fixture's %s", x->string, a, b);
            free(a);
            free(b);
        }
    }
    /* the vocabulary: ids 0..n_bpe-1 once each, the byte symbols as GPT-2 (and Qwen) has them */
    const cJSON *vocab = cJSON_GetObjectItem(model, "vocab");
    const cJSON *ref_vocab = cJSON_GetObjectItem(ref_model, "vocab");
    ck_assert_int_eq(cJSON_GetArraySize(vocab), n_bpe);
    char *seen = calloc((size_t)n_bpe, 1);
    cJSON **sorted = malloc((size_t)n_bpe * sizeof *sorted);
    ck_assert(seen && sorted);
    int n_sorted = 0;
    for (cJSON *e = vocab->child; e; e = e->next)
        sorted[n_sorted++] = e;
    qsort(sorted, (size_t)n_sorted, sizeof *sorted, cmp_items);
    for (const cJSON *e = vocab->child; e; e = e->next) {
        int id = e->valueint;
        ck_assert_msg(id >= 0 && id < n_bpe && !seen[id], "vocab['%s'] = %d", e->string, id);
        seen[id] = 1;
        if (id < 256) {
            const cJSON *r = cJSON_GetObjectItemCaseSensitive(ref_vocab, e->string);
            ck_assert_msg(r && r->valueint == id, "byte symbol '%s' is %d, the fixture's %d",
                          e->string, id, r ? r->valueint : -1);
        }
    }
    free(seen);
    ck_assert_int_eq(vocab_id(sorted, n_sorted, "\xc4\xa0"), 220); /* the space, 'Ġ' */
    /* the merges: rank i makes token 256 + i from two tokens before it */
    const cJSON *merges = cJSON_GetObjectItem(model, "merges");
    ck_assert_int_eq(cJSON_GetArraySize(merges), n_bpe - 256);
    int rank = 0, words = 0;
    for (const cJSON *m = merges->child; m; m = m->next, rank++) {
        ck_assert(cJSON_IsString(m));
        const char *s = m->valuestring, *sp = strchr(s, ' ');
        ck_assert_msg(sp && !strchr(sp + 1, ' '), "merge %d is '%s'", rank, s);
        char a[64], whole[128];
        snprintf(a, sizeof a, "%.*s", (int)(sp - s), s);
        snprintf(whole, sizeof whole, "%s%s", a, sp + 1);
        int ia = vocab_id(sorted, n_sorted, a), ib = vocab_id(sorted, n_sorted, sp + 1);
        int ic = vocab_id(sorted, n_sorted, whole);
        ck_assert_msg(ia >= 0 && ib >= 0 && ia < 256 + rank && ib < 256 + rank &&
                          ic == 256 + rank,
                      "merge %d '%s' makes no token %d of two earlier ones", rank, s, 256 + rank);
        words += !strncmp(whole, "\xc4\xa0", 2);
    }
    ck_assert_msg(words > rank / 4, "%d of %d merges start a word", words, rank);
    free(sorted);
    /* the special tokens */
    const cJSON *added = cJSON_GetObjectItem(tok, "added_tokens");
    ck_assert_int_eq(cJSON_GetArraySize(added), 3);
    for (int k = 0; k < 3; k++) {
        const cJSON *t = cJSON_GetArrayItem(added, k);
        ck_assert_int_eq(cJSON_GetObjectItem(t, "id")->valueint, n_bpe + k);
        ck_assert_str_eq(cJSON_GetObjectItem(t, "content")->valuestring, special[k]);
        ck_assert(cJSON_IsTrue(cJSON_GetObjectItem(t, "special")));
    }
    cJSON *cfg = read_json(dir, "config.json");
    const cJSON *b = cJSON_GetObjectItem(cfg, "bos_token_id");
    ck_assert(bos < 0 ? b == NULL : b && b->valueint == bos);
    ck_assert_int_eq(json_num(cfg, "eos_token_id"), eos);
    cJSON *tc = read_json(dir, "tokenizer_config.json");
    ck_assert(cJSON_IsFalse(cJSON_GetObjectItem(tc, "add_bos_token")));
    ck_assert_str_eq(cJSON_GetObjectItem(tc, "eos_token")->valuestring, special[eos - n_bpe]);
    char id[16];
    snprintf(id, sizeof id, "%d", (int)(n_bpe + 2));
    ck_assert(cJSON_GetObjectItem(cJSON_GetObjectItem(tc, "added_tokens_decoder"), id));
    cJSON_Delete(tc);
    cJSON_Delete(cfg);
    cJSON_Delete(ref);
    cJSON_Delete(tok);
}

/* Opens dir with its generated tokenizer of n_bpe BPE tokens: text round-trips, words take
 * fewer tokens than bytes, <|endoftext|> (id endoftext) is one token and the others are
 * BPE tokens, eos ends generation, and the model runs. */
static void check_generated_opens(const char *dir, const ferry_synth_params *p, int32_t n_bpe,
                                  int32_t endoftext, int32_t eos)
{
    ferry_model_params mp = ferry_model_params_default();
    mp.backend = FERRY_BACKEND_CPU;
    mp.n_threads = 2;
    ferry_model *m = NULL;
    ck_assert_msg(ferry_model_open(dir, &mp, &m) == FERRY_OK, "open %s: %s", dir,
                  ferry_last_error());
    const char *text = "hello world, the quick brown fox: naïve café 2024!<|endoftext|>";
    int32_t ids[128], n = 0;
    ck_assert_msg(ferry_tokenize(m, text, strlen(text), 1, ids, 128, &n) == FERRY_OK, "%s",
                  ferry_last_error());
    ck_assert_msg(n > 8 && n < (int32_t)strlen(text) - 8, "%d tokens for %zu bytes", (int)n,
                  strlen(text));
    ck_assert_msg(ids[n - 1] == endoftext, "'<|endoftext|>' is %d, not %d", (int)ids[n - 1],
                  (int)endoftext);
    for (int32_t i = 0; i + 1 < n; i++)
        ck_assert_int_lt(ids[i], n_bpe);
    char back[256];
    size_t len = 0;
    ck_assert_msg(ferry_detokenize(m, ids, n, 0, back, sizeof back, &len) == FERRY_OK, "%s",
                  ferry_last_error());
    ck_assert_str_eq(back, text);
    ck_assert(ferry_token_is_eos(m, eos));
    check_family_runs(dir, p, p->head_dim ? p->head_dim : p->d_model / p->n_heads);
    ferry_model_close(m);
}

START_TEST(test_synth_generated_tokenizer)
{
    static const char *const qwen[3] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
    static const char *const olmoe[3] = {"<|extra_id_0|>", "<|extra_id_1|>", "<|endoftext|>"};
    char dir[512], again[512], fewer[512];
    /* qwen3: the tokenizer fills vocab 1024; BOS <|endoftext|>, EOS <|im_end|> */
    tu_scratch_dir(dir, "synth-tok-qwen3");
    ferry_synth_params p = small_params(0, NULL);
    ck_assert_msg(ferry_synth(&p, dir) == FERRY_OK, "%s", ferry_last_error());
    char *names[MAX_FILES];
    int n = list_dir(dir, names);
    ck_assert_int_eq(n, 4); /* config.json, model.safetensors, tokenizer.json, its config */
    free_names(names, n);
    check_generated_tokenizer(dir, "tiny-qwen3_moe", 1021, qwen, 1021, 1023);
    /* the same whatever the seed; the first 700 tokens of a 700-token one are these */
    tu_scratch_dir(again, "synth-tok-qwen3-again");
    p.seed = 5;
    ck_assert_msg(ferry_synth(&p, again) == FERRY_OK, "%s", ferry_last_error());
    ck_assert(same_file(dir, again, "tokenizer.json"));
    ck_assert(!same_file(dir, again, "model.safetensors"));
    tu_scratch_dir(fewer, "synth-tok-qwen3-fewer");
    p.n_bpe_tokens = 700;
    ck_assert_msg(ferry_synth(&p, fewer) == FERRY_OK, "%s", ferry_last_error());
    check_generated_tokenizer(fewer, "tiny-qwen3_moe", 700, qwen, 700, 702);
    cJSON *big = read_json(dir, "tokenizer.json"), *small = read_json(fewer, "tokenizer.json");
    const cJSON *bv = cJSON_GetObjectItem(cJSON_GetObjectItem(big, "model"), "vocab");
    const cJSON *sv = cJSON_GetObjectItem(cJSON_GetObjectItem(small, "model"), "vocab");
    for (const cJSON *e = sv->child; e; e = e->next) {
        const cJSON *f = cJSON_GetObjectItemCaseSensitive(bv, e->string);
        ck_assert_msg(f && f->valueint == e->valueint, "'%s' is %d of 700, %d of 1021", e->string,
                      e->valueint, f ? f->valueint : -1);
    }
    cJSON_Delete(small);
    cJSON_Delete(big);

    /* qwen1.5-moe: BOS = EOS = <|endoftext|> */
    tu_scratch_dir(dir, "synth-tok-qwen2");
    p = small_params(2, NULL);
    ck_assert_msg(ferry_synth(&p, dir) == FERRY_OK, "%s", ferry_last_error());
    check_generated_tokenizer(dir, "tiny-qwen2_moe", 1021, qwen, 1021, 1021);

    /* olmoe: GPT-NeoX's layout, 500 tokens in a vocab of 700, no BOS, EOS <|endoftext|> */
    tu_scratch_dir(dir, "synth-tok-olmoe");
    p = small_params(3, NULL);
    p.n_vocab = 700;
    p.n_bpe_tokens = 500;
    ck_assert_msg(ferry_synth(&p, dir) == FERRY_OK, "%s", ferry_last_error());
    check_generated_tokenizer(dir, "tiny-olmoe", 500, olmoe, -1, 502);

    /* the real sizes: Qwen's 151643 tokens and 151387 merges, its special ids; OLMoE's */
    tu_scratch_dir(dir, "synth-tok-qwen3-full");
    p = small_params(0, NULL);
    p.n_vocab = 151936;
    p.n_bpe_tokens = 151643;
    p.n_layers = 1;
    p.n_dense_layers = 0;
    ck_assert_msg(ferry_synth(&p, dir) == FERRY_OK, "%s", ferry_last_error());
    check_generated_tokenizer(dir, "tiny-qwen3_moe", 151643, qwen, 151643, 151645);
    check_generated_opens(dir, &p, 151643, 151643, 151645);
    tu_scratch_dir(dir, "synth-tok-olmoe-full");
    p = small_params(3, NULL);
    ck_assert_int_eq(ferry_synth_preset("olmoe-1b-7b", &p), FERRY_OK);
    p.n_layers = 1;
    p.d_model = 64;
    p.d_ff = 32;
    p.n_heads = 4;
    p.n_kv_heads = 4;
    ck_assert_msg(ferry_synth(&p, dir) == FERRY_OK, "%s", ferry_last_error());
    check_generated_tokenizer(dir, "tiny-olmoe", 50277, olmoe, -1, 50279);
    check_generated_opens(dir, &p, 50277, 50279, 50279);
}
END_TEST

START_TEST(test_synth_families_reject_bad_input)
{
    char dir[512], out[600];
    tu_scratch_dir(dir, "synth-families-bad");
    snprintf(out, sizeof out, "%s/never", dir);
    static const int32_t layer_2[1] = {2}, twice[2] = {0, 0}, both[2] = {0, 1};
    static const bad_case cases[] = {
        {"unknown family", FERRY_ERR_INVALID, "model type 'llama' is not a family"},
        {"top-9 of 8", FERRY_ERR_INVALID,
         "top-k (num_experts_per_tok) 9 exceeds experts (num_experts) 8"},
        {"experts 0", FERRY_ERR_INVALID, "experts (num_experts) is 0"},
        {"expert width 0", FERRY_ERR_INVALID, "intermediate (moe_intermediate_size) is 0"},
        {"odd head_dim", FERRY_ERR_INVALID, "head dim (head_dim) 31 is odd"},
        {"head_dim olmoe", FERRY_ERR_INVALID, "olmoe's config.json has no head_dim"},
        {"no dense width", FERRY_ERR_INVALID, "dense intermediate (intermediate_size) is 0"},
        {"olmoe dense width", FERRY_ERR_INVALID, "must be 0: olmoe has no dense MLP layers"},
        {"dense layer 2 of 2", FERRY_ERR_INVALID, "mlp_only_layers[0]) 2 is not a layer in [0, 2)"},
        {"dense twice", FERRY_ERR_INVALID, "dense layer 0 is listed twice"},
        {"every layer dense", FERRY_ERR_INVALID, "at least one layer must be sparse"},
        {"olmoe dense layers", FERRY_ERR_INVALID, "olmoe has no dense MLP layers"},
        {"no shared width", FERRY_ERR_INVALID,
         "shared intermediate (shared_expert_intermediate_size) is 0"},
        {"mixtral shared", FERRY_ERR_INVALID, "must be 0: mixtral has no shared expert"},
        {"mixtral norm_topk", FERRY_ERR_INVALID, "mixtral always renormalises"},
        {"norm_topk 2", FERRY_ERR_INVALID, "norm topk prob (norm_topk_prob) is 2"},
        {"qwen2 attention_bias", FERRY_ERR_INVALID,
         "qwen2_moe's config.json has no attention_bias"},
        {"mixtral clip", FERRY_ERR_INVALID, "only olmoe clamps"},
        {"clip -1", FERRY_ERR_INVALID, "clip qkv (clip_qkv) -1 must be a float >= 0"},
        {"tokenizer too big", FERRY_ERR_INVALID,
         "151643 BPE tokens (n_bpe_tokens 151643) and 3 special tokens do not fit vocab "
         "(vocab_size) 1024"},
        {"vocab too small", FERRY_ERR_INVALID, "it needs 256 byte tokens at least"},
    };
    /* the case of g_cases each starts from: 0 qwen3-30b-a3b, 2 qwen1.5-moe-a2.7b, 3 olmoe */
    static const int family[] = {0, 0, 0, 0, 0, 3, 0, 3, 0, 0, 0, 3, 2, 0, 0, 0, 2, 0, 3, 0, 0};
    const int n_cases = (int)(sizeof cases / sizeof cases[0]);
    ck_assert_int_eq(n_cases, (int)(sizeof family / sizeof family[0]));
    for (int k = 0; k < n_cases; k++) {
        ferry_synth_params p = small_params(family[k], NULL);
        switch (k) {
        case 0: p.model_type = "llama"; break;
        case 1: p.n_experts_used = 9; break;
        case 2: p.n_experts = 0; break;
        case 3: p.d_ff = 0; break;
        case 4: p.head_dim = 31; break;
        case 5: p.head_dim = 32; break;
        case 6: p.d_ff_dense = 0; break;
        case 7: p.d_ff_dense = 5; break;
        case 8: p.dense_layers = layer_2; break;
        case 9: p.dense_layers = twice; p.n_dense_layers = 2; p.n_layers = 3; break;
        case 10: p.dense_layers = both; p.n_dense_layers = 2; break;
        case 11: p.dense_layers = both; p.n_dense_layers = 1; break;
        case 12: p.d_ff_shared = 0; break;
        case 13: p = tiny_params(1); p.d_ff_shared = 5; break;
        case 14: p = tiny_params(1); p.norm_topk_prob = 0; break;
        case 15: p.norm_topk_prob = 2; break;
        case 16: p.attention_bias = 1; break;
        case 17: p = tiny_params(1); p.clip_qkv = 3; break;
        case 18: p.clip_qkv = -1; break;
        case 19: p.n_bpe_tokens = 151643; break;
        case 20: p.n_vocab = 200; break;
        }
        expect_fail(ferry_synth(&p, out), cases[k].code, cases[k].what, cases[k].needle, NULL);
        ck_assert_msg(!exists(out), "%s: %s was created", cases[k].what, out);
        ferry_synth_info info = {.n_shards = -7};
        expect_fail(ferry_synth_plan(&p, &info), cases[k].code, cases[k].what, cases[k].needle,
                    NULL);
        ck_assert_int_eq(info.n_shards, -7);
    }
    /* a mixtral shape still needs a tokenizer folder; the others write their own */
    ferry_synth_params p = tiny_params(1);
    p.tokenizer_dir = NULL;
    expect_fail(ferry_synth(&p, out), FERRY_ERR_INVALID, "mixtral without a tokenizer",
                "no tokenizer folder given", NULL);
    ck_assert(!exists(out));
}
END_TEST

static Suite *synth_suite(void)
{
    Suite *s = suite_create("synth");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_synth_tiny_sharded_runs);
    tcase_add_test(tc, test_synth_is_deterministic);
    tcase_add_test(tc, test_synth_dtypes_load);
    tcase_add_test(tc, test_synth_rejects_bad_input);
    tcase_add_test(tc, test_synth_refuses_non_empty_folder);
    tcase_add_test(tc, test_synth_never_looks_complete_midway);
    tcase_add_test(tc, test_synth_failure_removes_what_it_wrote);
    tcase_add_test(tc, test_synth_families_open);
    tcase_add_test(tc, test_synth_families_match_fixtures);
    tcase_add_test(tc, test_synth_generated_tokenizer);
    tcase_add_test(tc, test_synth_families_reject_bad_input);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(synth_suite()); }
