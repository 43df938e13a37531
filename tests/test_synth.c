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
 * removes what it wrote.
 */
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
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(synth_suite()); }
