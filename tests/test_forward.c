/*
 * tests/test_forward.c: the forward pass on checkpoints of shapes and dtypes other than the
 * bundled model's. Each test writes a small random Mixtral checkpoint (config.json, the
 * bundled tokenizer, weights in safetensors, one file or two shards with an index) to a
 * scratch folder, opens it with ferry_model_open and compares ferry's logits and routing
 * at every position with a plain double-precision reference forward written here from the
 * Hugging Face MixtralForCausalLM definition; greedy decoding through the KV cache must
 * reproduce the one-step prefill bit for bit. The loader must also reject checkpoints
 * whose tensors disagree with config.json or are missing, naming the tensor.
 *
 * The reference uses exactly the values stored in the file (each weight is rounded to its
 * dtype before the reference sees it), so the only difference left is ferry's float32
 * arithmetic; 1e-4 relative L2 per position bounds that for every dtype.
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/context.h"
#include "engine/sampler.h"
#include "ferry.h"
#include "kernels/dtype.h"
#include "tests/check_util.h"

#define TOKENIZER_DIR FERRY_SOURCE_DIR "/models/tiny-moe-code"
#define DTYPE_MIXED (-1) /* tensors cycle through F32, F16, BF16 */
#define MAX_EXPERTS 16
#define LOGITS_TOL 1e-4
#define RMS_EPS 1e-5
/* A position whose k-th and (k+1)-th reference router probabilities are closer than this
 * may legitimately route differently in float32; run_case refuses seeds that have one. */
#define TIE_MARGIN 1e-6

/* The CPU reference backend, whatever the machine has (test_cuda covers the GPU). */
static ferry_model_params cpu_params(void)
{
    ferry_model_params p = ferry_model_params_default();
    p.backend = FERRY_BACKEND_CPU;
    return p;
}

/* ---- the random checkpoint -------------------------------------------------------- */

typedef struct {
    const char *name;       /* scratch folder */
    int32_t vocab, d, ff, n_layers, n_heads, n_kv_heads;
    int32_t head_dim;       /* 0: left out of config.json (hidden_size / heads) */
    int32_t n_experts, k;
    int32_t sliding_window; /* 0: null */
    double rope_theta;
    int tied;
    int dtype;              /* a ferry_dtype, or DTYPE_MIXED */
    int n_shards;           /* 1: model.safetensors; 2: two shards and an index */
    int32_t n_batch;        /* context chunk size (0: default) */
    uint64_t seed;
    int32_t n_prompt, n_gen;
} fw_spec;

typedef struct {
    char name[96];
    int32_t n_dims;
    int64_t rows, cols; /* (rows, cols) row-major; a 1-D tensor of n is (1, n) */
    ferry_dtype dtype;
    float *w;           /* the values exactly as stored */
} fw_tensor;

typedef struct {
    fw_spec s;
    int32_t hd;         /* head_dim in effect */
    fw_tensor *t;
    int32_t n_t, cap_t;
} fw_model;

static float round_to(ferry_dtype dt, float v)
{
    switch (dt) {
    case FERRY_DTYPE_BF16: return ferry_bf16_to_f32(ferry_f32_to_bf16(v));
    case FERRY_DTYPE_F16: return ferry_f16_to_f32(ferry_f32_to_f16(v));
    default: return v;
    }
}

/* Adds a tensor of uniform values in [center - half, center + half], rounded to its dtype. */
static void add_tensor(fw_model *m, uint64_t *rng, int32_t n_dims, int64_t rows, int64_t cols,
                       float center, float half, const char *fmt, ...)
{
    if (m->n_t == m->cap_t) {
        m->cap_t = m->cap_t ? 2 * m->cap_t : 64;
        m->t = realloc(m->t, (size_t)m->cap_t * sizeof *m->t);
        ck_assert(m->t != NULL);
    }
    fw_tensor *t = &m->t[m->n_t];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->n_dims = n_dims;
    t->rows = rows;
    t->cols = cols;
    t->dtype = m->s.dtype == DTYPE_MIXED ? (ferry_dtype)(m->n_t % 3) : (ferry_dtype)m->s.dtype;
    t->w = malloc((size_t)(rows * cols) * sizeof *t->w);
    ck_assert(t->w != NULL);
    for (int64_t i = 0; i < rows * cols; i++)
        t->w[i] = round_to(t->dtype, tu_rand_uniform(rng, center - half, center + half));
    m->n_t++;
}

/* Linear layers get uniform +-1/sqrt(fan_in) so activations stay O(1); norms ~1. */
static void add_linear(fw_model *m, uint64_t *rng, int64_t out, int64_t in, const char *fmt,
                       int32_t l, int32_t e)
{
    char name[96];
    snprintf(name, sizeof name, fmt, (int)l, (int)e);
    add_tensor(m, rng, 2, out, in, 0.0f, 1.0f / sqrtf((float)in), "%s", name);
}

static void model_build(const fw_spec *s, fw_model *m)
{
    memset(m, 0, sizeof *m);
    m->s = *s;
    m->hd = s->head_dim ? s->head_dim : s->d / s->n_heads;
    uint64_t rng = s->seed * 0x9e3779b97f4a7c15ull + 12345;
    int64_t d = s->d, ff = s->ff, q_dim = (int64_t)s->n_heads * m->hd;
    int64_t kv_dim = (int64_t)s->n_kv_heads * m->hd;
    add_tensor(m, &rng, 2, s->vocab, d, 0.0f, 1.0f, "model.embed_tokens.weight");
    for (int32_t l = 0; l < s->n_layers; l++) {
        add_tensor(m, &rng, 1, 1, d, 1.0f, 0.25f, "model.layers.%d.input_layernorm.weight", l);
        add_linear(m, &rng, q_dim, d, "model.layers.%d.self_attn.q_proj.weight", l, 0);
        add_linear(m, &rng, kv_dim, d, "model.layers.%d.self_attn.k_proj.weight", l, 0);
        add_linear(m, &rng, kv_dim, d, "model.layers.%d.self_attn.v_proj.weight", l, 0);
        add_linear(m, &rng, d, q_dim, "model.layers.%d.self_attn.o_proj.weight", l, 0);
        add_tensor(m, &rng, 1, 1, d, 1.0f, 0.25f,
                   "model.layers.%d.post_attention_layernorm.weight", l);
        /* a wider router spreads the probabilities, so routing depends on the input */
        add_tensor(m, &rng, 2, s->n_experts, d, 0.0f, 3.0f / sqrtf((float)d),
                   "model.layers.%d.block_sparse_moe.gate.weight", l);
        for (int32_t e = 0; e < s->n_experts; e++) {
            add_linear(m, &rng, ff, d, "model.layers.%d.block_sparse_moe.experts.%d.w1.weight",
                       l, e);
            add_linear(m, &rng, d, ff, "model.layers.%d.block_sparse_moe.experts.%d.w2.weight",
                       l, e);
            add_linear(m, &rng, ff, d, "model.layers.%d.block_sparse_moe.experts.%d.w3.weight",
                       l, e);
        }
    }
    add_tensor(m, &rng, 1, 1, d, 1.0f, 0.25f, "model.norm.weight");
    if (!s->tied)
        add_tensor(m, &rng, 2, s->vocab, d, 0.0f, 1.0f / sqrtf((float)d), "lm_head.weight");
}

static void model_free(fw_model *m)
{
    for (int32_t i = 0; i < m->n_t; i++)
        free(m->t[i].w);
    free(m->t);
    memset(m, 0, sizeof *m);
}

static fw_tensor *find_tensor(const fw_model *m, const char *fmt, ...)
{
    char name[96];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    for (int32_t i = 0; i < m->n_t; i++)
        if (strcmp(m->t[i].name, name) == 0)
            return &m->t[i];
    ck_abort_msg("test model has no tensor %s", name);
    return NULL;
}

/* Faults for the loader tests: give a tensor another shape, or leave one out. */
static void grow_first_dim(fw_model *m, const char *name)
{
    fw_tensor *t = find_tensor(m, "%s", name);
    int64_t old = t->rows * t->cols;
    if (t->n_dims == 1)
        t->cols++;
    else
        t->rows++;
    t->w = realloc(t->w, (size_t)(t->rows * t->cols) * sizeof *t->w);
    ck_assert(t->w != NULL);
    for (int64_t i = old; i < t->rows * t->cols; i++)
        t->w[i] = 0.0f;
}

static void transpose_shape(fw_model *m, const char *name)
{
    fw_tensor *t = find_tensor(m, "%s", name);
    int64_t r = t->rows;
    t->rows = t->cols;
    t->cols = r;
}

static void omit(fw_model *m, const char *name)
{
    fw_tensor *t = find_tensor(m, "%s", name);
    free(t->w);
    int32_t i = (int32_t)(t - m->t);
    memmove(t, t + 1, (size_t)(m->n_t - i - 1) * sizeof *t);
    m->n_t--;
}

static void write_bytes(const char *dir, const char *name, const void *data, size_t len)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "cannot write %s", path);
    ck_assert(len == 0 || fwrite(data, 1, len, f) == len);
    ck_assert(fclose(f) == 0);
}

static void write_json(const char *dir, const char *name, cJSON *root)
{
    char *text = cJSON_Print(root);
    ck_assert(text != NULL);
    write_bytes(dir, name, text, strlen(text));
    free(text);
    cJSON_Delete(root);
}

static void copy_file(const char *dir, const char *name)
{
    char src[1024];
    snprintf(src, sizeof src, "%s/%s", TOKENIZER_DIR, name);
    size_t len;
    char *data = tu_read_file(src, &len);
    write_bytes(dir, name, data, len);
    free(data);
}

static void write_config(const fw_model *m, const char *dir)
{
    const fw_spec *s = &m->s;
    cJSON *c = cJSON_CreateObject();
    const char *arch[] = {"MixtralForCausalLM"};
    cJSON_AddItemToObject(c, "architectures", cJSON_CreateStringArray(arch, 1));
    cJSON_AddStringToObject(c, "model_type", "mixtral");
    cJSON_AddNumberToObject(c, "vocab_size", s->vocab);
    cJSON_AddNumberToObject(c, "hidden_size", s->d);
    cJSON_AddNumberToObject(c, "intermediate_size", s->ff);
    cJSON_AddNumberToObject(c, "num_hidden_layers", s->n_layers);
    cJSON_AddNumberToObject(c, "num_attention_heads", s->n_heads);
    cJSON_AddNumberToObject(c, "num_key_value_heads", s->n_kv_heads);
    if (s->head_dim)
        cJSON_AddNumberToObject(c, "head_dim", s->head_dim);
    cJSON_AddNumberToObject(c, "num_local_experts", s->n_experts);
    cJSON_AddNumberToObject(c, "num_experts_per_tok", s->k);
    cJSON_AddNumberToObject(c, "max_position_embeddings", 512);
    cJSON_AddNumberToObject(c, "rms_norm_eps", RMS_EPS);
    cJSON_AddNumberToObject(c, "rope_theta", s->rope_theta);
    cJSON_AddBoolToObject(c, "tie_word_embeddings", s->tied);
    cJSON_AddNumberToObject(c, "bos_token_id", 1);
    cJSON_AddNumberToObject(c, "eos_token_id", 2);
    if (s->sliding_window)
        cJSON_AddNumberToObject(c, "sliding_window", s->sliding_window);
    else
        cJSON_AddNullToObject(c, "sliding_window");
    cJSON_AddStringToObject(c, "hidden_act", "silu");
    write_json(dir, "config.json", c);
}

/* One safetensors file holding the tensors i with i % n_files == file (names in the header
 * in that order): u64 header length N, N bytes of JSON padded with spaces so the data
 * section starts 8-byte aligned, then each tensor's bytes at data_offsets. */
static void write_safetensors(const fw_model *m, const char *dir, const char *fname,
                              int32_t file, int32_t n_files)
{
    cJSON *h = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(h, "__metadata__");
    cJSON_AddStringToObject(meta, "format", "pt");
    size_t off = 0;
    for (int32_t i = file; i < m->n_t; i += n_files) {
        const fw_tensor *t = &m->t[i];
        size_t bytes = (size_t)(t->rows * t->cols) * ferry_dtype_size(t->dtype);
        cJSON *e = cJSON_AddObjectToObject(h, t->name);
        cJSON_AddStringToObject(e, "dtype", ferry_dtype_name(t->dtype));
        cJSON *shape = cJSON_AddArrayToObject(e, "shape");
        if (t->n_dims == 2)
            cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->rows));
        cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->cols));
        cJSON *offs = cJSON_AddArrayToObject(e, "data_offsets");
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(off + bytes)));
        off += bytes;
    }
    char *json = cJSON_PrintUnformatted(h);
    ck_assert(json != NULL);
    cJSON_Delete(h);
    size_t json_len = strlen(json), padded = (json_len + 7) & ~(size_t)7;
    size_t total = 8 + padded + off;
    uint8_t *buf = malloc(total);
    ck_assert(buf != NULL);
    for (int b = 0; b < 8; b++)
        buf[b] = (uint8_t)((uint64_t)padded >> (8 * b));
    memcpy(buf + 8, json, json_len);
    memset(buf + 8 + json_len, ' ', padded - json_len);
    free(json);
    uint8_t *p = buf + 8 + padded;
    for (int32_t i = file; i < m->n_t; i += n_files) {
        const fw_tensor *t = &m->t[i];
        for (int64_t j = 0; j < t->rows * t->cols; j++) {
            if (t->dtype == FERRY_DTYPE_F32) {
                uint32_t u;
                memcpy(&u, &t->w[j], 4);
                for (int b = 0; b < 4; b++)
                    *p++ = (uint8_t)(u >> (8 * b));
            } else {
                uint16_t u = t->dtype == FERRY_DTYPE_BF16 ? ferry_f32_to_bf16(t->w[j])
                                                          : ferry_f32_to_f16(t->w[j]);
                *p++ = (uint8_t)u;
                *p++ = (uint8_t)(u >> 8);
            }
        }
    }
    ck_assert(p == buf + total);
    write_bytes(dir, fname, buf, total);
    free(buf);
}

/* Writes the checkpoint to a fresh scratch folder; dir receives its path (512 bytes). */
static void model_write(const fw_model *m, char *dir)
{
    tu_scratch_dir(dir, m->s.name);
    write_config(m, dir);
    copy_file(dir, "tokenizer.json");
    copy_file(dir, "tokenizer_config.json");
    if (m->s.n_shards <= 1) {
        write_safetensors(m, dir, "model.safetensors", 0, 1);
        return;
    }
    cJSON *index = cJSON_CreateObject();
    cJSON_AddObjectToObject(index, "metadata");
    cJSON *map = cJSON_AddObjectToObject(index, "weight_map");
    for (int32_t f = 0; f < m->s.n_shards; f++) {
        char fname[64];
        snprintf(fname, sizeof fname, "model-%05d-of-%05d.safetensors", (int)f + 1,
                 (int)m->s.n_shards);
        write_safetensors(m, dir, fname, f, m->s.n_shards);
        for (int32_t i = f; i < m->n_t; i += m->s.n_shards)
            cJSON_AddStringToObject(map, m->t[i].name, fname);
    }
    write_json(dir, "model.safetensors.index.json", index);
}

static void remove_dir(const char *dir)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert(system(cmd) == 0);
}

/* ---- the reference forward (double precision, Hugging Face semantics) ------------- */

typedef struct {
    double *logits;  /* (n, vocab) */
    double *router;  /* (n_layers, n, n_experts) router logits */
    int32_t *experts; /* (n_layers, n, k) ascending */
    double *weights; /* (n_layers, n, k) renormalised, in the order of experts */
    uint8_t *tie;    /* (n_layers, n) k-th and (k+1)-th probabilities within TIE_MARGIN */
} ref_out;

/* y (n, rows) = x (n, cols) W^T */
static void ref_linear(double *y, const double *x, int32_t n, const fw_tensor *w)
{
    for (int32_t t = 0; t < n; t++)
        for (int64_t j = 0; j < w->rows; j++) {
            const float *wr = w->w + j * w->cols;
            const double *xr = x + (size_t)t * (size_t)w->cols;
            double s = 0;
            for (int64_t i = 0; i < w->cols; i++)
                s += xr[i] * (double)wr[i];
            y[(size_t)t * (size_t)w->rows + (size_t)j] = s;
        }
}

static void ref_rmsnorm(double *y, const double *x, int32_t n, int32_t d, const fw_tensor *w)
{
    for (int32_t t = 0; t < n; t++) {
        const double *xr = x + (size_t)t * d;
        double ss = 0;
        for (int32_t i = 0; i < d; i++)
            ss += xr[i] * xr[i];
        double inv = 1.0 / sqrt(ss / d + RMS_EPS);
        for (int32_t i = 0; i < d; i++)
            y[(size_t)t * d + i] = xr[i] * inv * (double)w->w[i];
    }
}

/* Rotate-half RoPE on n rows of n_heads heads of hd, row t at position t. */
static void ref_rope(double *x, int32_t n, int32_t n_heads, int32_t hd, double theta)
{
    int32_t half = hd / 2;
    for (int32_t t = 0; t < n; t++)
        for (int32_t h = 0; h < n_heads; h++) {
            double *v = x + ((size_t)t * n_heads + h) * hd;
            for (int32_t i = 0; i < half; i++) {
                double ang = (double)t / pow(theta, (double)(2 * i) / hd);
                double c = cos(ang), s = sin(ang), a = v[i], b = v[i + half];
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
}

static void ref_forward(const fw_model *m, const int32_t *ids, int32_t n, ref_out *r)
{
    const fw_spec *s = &m->s;
    int32_t d = s->d, hd = m->hd, H = s->n_heads, KV = s->n_kv_heads, E = s->n_experts;
    int32_t k = s->k, ff = s->ff, V = s->vocab, group = H / KV;
    size_t q_dim = (size_t)H * hd, kv_dim = (size_t)KV * hd;
    double *x = calloc((size_t)n * d, sizeof *x), *h = calloc((size_t)n * d, sizeof *h);
    double *q = calloc((size_t)n * q_dim, sizeof *q), *att = calloc((size_t)n * q_dim, sizeof *q);
    double *kk = calloc((size_t)n * kv_dim, sizeof *kk);
    double *vv = calloc((size_t)n * kv_dim, sizeof *vv);
    double *y = calloc((size_t)n * d, sizeof *y), *sc = calloc((size_t)n, sizeof *sc);
    double *a = calloc((size_t)ff, sizeof *a), *b = calloc((size_t)ff, sizeof *b);
    double *ye = calloc((size_t)d, sizeof *ye), *rl = calloc((size_t)n * E, sizeof *rl);
    ck_assert(x && h && q && att && kk && vv && y && sc && a && b && ye && rl);

    const fw_tensor *emb = find_tensor(m, "model.embed_tokens.weight");
    for (int32_t t = 0; t < n; t++)
        for (int32_t i = 0; i < d; i++)
            x[(size_t)t * d + i] = emb->w[(size_t)ids[t] * d + i];

    for (int32_t l = 0; l < s->n_layers; l++) {
        ref_rmsnorm(h, x, n, d, find_tensor(m, "model.layers.%d.input_layernorm.weight", l));
        ref_linear(q, h, n, find_tensor(m, "model.layers.%d.self_attn.q_proj.weight", l));
        ref_linear(kk, h, n, find_tensor(m, "model.layers.%d.self_attn.k_proj.weight", l));
        ref_linear(vv, h, n, find_tensor(m, "model.layers.%d.self_attn.v_proj.weight", l));
        ref_rope(q, n, H, hd, s->rope_theta);
        ref_rope(kk, n, KV, hd, s->rope_theta);
        for (int32_t t = 0; t < n; t++)
            for (int32_t hh = 0; hh < H; hh++) {
                const double *qr = q + (size_t)t * q_dim + (size_t)hh * hd;
                size_t kv_off = (size_t)(hh / group) * hd;
                int32_t first = 0;
                if (s->sliding_window && t - s->sliding_window + 1 > 0)
                    first = t - s->sliding_window + 1; /* sees j with t - j < window */
                double mx = -INFINITY, sum = 0;
                for (int32_t j = first; j <= t; j++) {
                    double dot = 0;
                    for (int32_t i = 0; i < hd; i++)
                        dot += qr[i] * kk[(size_t)j * kv_dim + kv_off + i];
                    sc[j] = dot / sqrt((double)hd);
                    mx = sc[j] > mx ? sc[j] : mx;
                }
                for (int32_t j = first; j <= t; j++)
                    sum += (sc[j] = exp(sc[j] - mx));
                double *o = att + (size_t)t * q_dim + (size_t)hh * hd;
                for (int32_t i = 0; i < hd; i++) {
                    double acc = 0;
                    for (int32_t j = first; j <= t; j++)
                        acc += sc[j] * vv[(size_t)j * kv_dim + kv_off + i];
                    o[i] = acc / sum;
                }
            }
        ref_linear(y, att, n, find_tensor(m, "model.layers.%d.self_attn.o_proj.weight", l));
        for (size_t i = 0; i < (size_t)n * d; i++)
            x[i] += y[i];

        ref_rmsnorm(h, x, n, d,
                    find_tensor(m, "model.layers.%d.post_attention_layernorm.weight", l));
        ref_linear(rl, h, n, find_tensor(m, "model.layers.%d.block_sparse_moe.gate.weight", l));
        for (int32_t t = 0; t < n; t++) {
            const double *lg = rl + (size_t)t * E;
            double p[MAX_EXPERTS], mx = lg[0], sum = 0;
            for (int32_t e = 0; e < E; e++)
                mx = lg[e] > mx ? lg[e] : mx;
            for (int32_t e = 0; e < E; e++)
                sum += (p[e] = exp(lg[e] - mx));
            for (int32_t e = 0; e < E; e++)
                p[e] /= sum;
            /* top-k by probability, ties to the lower index */
            int32_t pick[MAX_EXPERTS + 1];
            uint8_t taken[MAX_EXPERTS] = {0};
            for (int32_t j = 0; j < k + 1 && j < E; j++) {
                int32_t best = -1;
                for (int32_t e = 0; e < E; e++)
                    if (!taken[e] && (best < 0 || p[e] > p[best]))
                        best = e;
                pick[j] = best;
                taken[best] = 1;
            }
            size_t lt = (size_t)l * n + t;
            r->tie[lt] = k < E && p[pick[k - 1]] - p[pick[k]] < TIE_MARGIN;
            double wsum = 0;
            for (int32_t j = 0; j < k; j++)
                wsum += p[pick[j]];
            for (int32_t j = 1; j < k; j++) /* ascending expert order, as ferry reports */
                for (int32_t i = j; i > 0 && pick[i - 1] > pick[i]; i--) {
                    int32_t tmp = pick[i];
                    pick[i] = pick[i - 1];
                    pick[i - 1] = tmp;
                }
            memcpy(r->router + lt * E, lg, (size_t)E * sizeof *lg);
            const double *hr = h + (size_t)t * d;
            double *xr = x + (size_t)t * d;
            for (int32_t j = 0; j < k; j++) {
                int32_t e = pick[j];
                double w = p[e] / wsum;
                r->experts[lt * k + j] = e;
                r->weights[lt * k + j] = w;
                ref_linear(a, hr, 1,
                           find_tensor(m, "model.layers.%d.block_sparse_moe.experts.%d.w1.weight",
                                       l, e));
                ref_linear(b, hr, 1,
                           find_tensor(m, "model.layers.%d.block_sparse_moe.experts.%d.w3.weight",
                                       l, e));
                for (int32_t i = 0; i < ff; i++)
                    a[i] = a[i] / (1.0 + exp(-a[i])) * b[i];
                ref_linear(ye, a, 1,
                           find_tensor(m, "model.layers.%d.block_sparse_moe.experts.%d.w2.weight",
                                       l, e));
                for (int32_t i = 0; i < d; i++) /* h is a copy: x may change under it */
                    xr[i] += w * ye[i];
            }
        }
    }
    ref_rmsnorm(h, x, n, d, find_tensor(m, "model.norm.weight"));
    const fw_tensor *head = s->tied ? emb : find_tensor(m, "lm_head.weight");
    ck_assert_int_eq(head->rows, V);
    ref_linear(r->logits, h, n, head);
    double *bufs[] = {x, h, q, att, kk, vv, y, sc, a, b, ye, rl};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(bufs[i]);
}

/* ---- ferry's side ------------------------------------------------------------------ */

typedef struct {
    int32_t n_pos, k, n_experts, n_calls;
    int32_t *experts; /* (n_layers, n_pos, k) */
    float *weights;   /* (n_layers, n_pos, k) */
    float *router;    /* (n_layers, n_pos, n_experts) */
} route_log;

static void on_route(void *user, int32_t layer, int32_t pos0, int32_t n, const float *logits,
                     const int32_t *experts, const float *weights)
{
    route_log *r = user;
    r->n_calls++;
    ck_assert(pos0 >= 0 && pos0 + n <= r->n_pos);
    for (int32_t t = 0; t < n; t++) {
        size_t lt = (size_t)layer * r->n_pos + (size_t)(pos0 + t);
        memcpy(r->experts + lt * r->k, experts + (size_t)t * r->k, (size_t)r->k * sizeof *experts);
        memcpy(r->weights + lt * r->k, weights + (size_t)t * r->k, (size_t)r->k * sizeof *weights);
        memcpy(r->router + lt * r->n_experts, logits + (size_t)t * r->n_experts,
               (size_t)r->n_experts * sizeof *logits);
    }
}

static ferry_context *new_context(ferry_model *fm, int32_t n_batch)
{
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = 64;
    cp.n_batch = n_batch;
    ferry_context *c = NULL;
    ck_assert_msg(ferry_context_create(fm, &cp, &c) == FERRY_OK, "%s", ferry_last_error());
    return c;
}

/* Writes the checkpoint of spec s, decodes greedily after a random prompt, prefills the
 * whole sequence with the observer on, and checks both against the reference. */
static void run_case(const fw_spec *s)
{
    ck_assert(s->n_experts <= MAX_EXPERTS && s->vocab >= 4096);
    fw_model m;
    model_build(s, &m);
    char dir[512];
    model_write(&m, dir);

    ferry_model_params mp = ferry_model_params_default();
    mp.backend = FERRY_BACKEND_CPU; /* the reference; test_cuda covers the GPU */
    mp.n_threads = 2;
    ferry_model *fm = NULL;
    ck_assert_msg(ferry_model_open(dir, &mp, &fm) == FERRY_OK, "%s: open: %s", s->name,
                  ferry_last_error());
    ferry_model_info info;
    ck_assert_int_eq(ferry_model_get_info(fm, &info), FERRY_OK);
    ck_assert_int_eq(info.n_vocab, s->vocab);
    ck_assert_int_eq(info.d_model, s->d);
    ck_assert_int_eq(info.d_ff, s->ff);
    ck_assert_int_eq(info.n_layers, s->n_layers);
    ck_assert_int_eq(info.n_heads, s->n_heads);
    ck_assert_int_eq(info.n_kv_heads, s->n_kv_heads);
    ck_assert_int_eq(info.head_dim, m.hd);
    ck_assert_int_eq(info.n_experts, s->n_experts);
    ck_assert_int_eq(info.n_experts_used, s->k);

    int32_t n = s->n_prompt + s->n_gen, V = s->vocab, L = s->n_layers, k = s->k;
    int32_t *seq = malloc((size_t)n * sizeof *seq);
    float *dec = malloc((size_t)n * V * sizeof *dec), *all = malloc((size_t)n * V * sizeof *all);
    float *ref_row = malloc((size_t)V * sizeof *ref_row);
    ck_assert(seq && dec && all && ref_row);
    uint64_t rng = s->seed ^ 0x5eedull;
    for (int32_t t = 0; t < s->n_prompt; t++)
        seq[t] = (int32_t)(tu_rand_u64(&rng) % (uint64_t)V);

    /* greedy decoding: the prompt in one call, then one token at a time */
    ferry_context *c = new_context(fm, s->n_batch);
    ck_assert_msg(ferry_eval(c, seq, s->n_prompt, dec + (size_t)(s->n_prompt - 1) * V) == FERRY_OK,
                  "%s", ferry_last_error());
    for (int32_t t = s->n_prompt; t < n; t++) {
        seq[t] = ferry_argmax(dec + (size_t)(t - 1) * V, V);
        ck_assert_msg(ferry_eval(c, seq + t, 1, dec + (size_t)t * V) == FERRY_OK, "%s",
                      ferry_last_error());
    }
    ck_assert_int_eq(ferry_context_n_past(c), n);
    ferry_context_free(c);

    /* the whole sequence in one forward call, routing observed */
    route_log r = {.n_pos = n, .k = k, .n_experts = s->n_experts};
    r.experts = calloc((size_t)L * n * k, sizeof *r.experts);
    r.weights = calloc((size_t)L * n * k, sizeof *r.weights);
    r.router = calloc((size_t)L * n * s->n_experts, sizeof *r.router);
    ck_assert(r.experts && r.weights && r.router);
    for (size_t i = 0; i < (size_t)L * n * k; i++)
        r.experts[i] = -1;
    c = new_context(fm, s->n_batch);
    ferry_observer obs = {.on_route = on_route, .on_hidden = NULL, .user = &r};
    ferry_context_set_observer(c, &obs);
    ck_assert_msg(ferry_context_forward(c, seq, n, all, NULL) == FERRY_OK, "%s",
                  ferry_last_error());
    ferry_context_free(c);
    int32_t B = s->n_batch ? s->n_batch : n;
    ck_assert_int_eq(r.n_calls, L * ((n + B - 1) / B));

    for (int32_t t = s->n_prompt - 1; t < n; t++) {
        const float *a = dec + (size_t)t * V, *b = all + (size_t)t * V;
        ck_assert_msg(memcmp(a, b, (size_t)V * sizeof(float)) == 0,
                      "%s: decode logits at position %d differ from prefill (rel L2 %.3g)",
                      s->name, t, tu_rel_l2(a, b, (size_t)V));
    }

    ref_out ro;
    ro.logits = malloc((size_t)n * V * sizeof *ro.logits);
    ro.router = malloc((size_t)L * n * s->n_experts * sizeof *ro.router);
    ro.experts = malloc((size_t)L * n * k * sizeof *ro.experts);
    ro.weights = malloc((size_t)L * n * k * sizeof *ro.weights);
    ro.tie = malloc((size_t)L * n);
    ck_assert(ro.logits && ro.router && ro.experts && ro.weights && ro.tie);
    ref_forward(&m, seq, n, &ro);
    /* A near-tie between router probabilities is an accident of the seed (it could flip
     * the routing, and with it the logits); the seeds here have none. */
    int32_t n_ties = 0;
    for (size_t i = 0; i < (size_t)L * n; i++)
        n_ties += ro.tie[i];
    ck_assert_msg(n_ties == 0, "%s: %d near-ties in routing; pick another seed", s->name, n_ties);

    for (int32_t t = 0; t < n; t++) {
        for (int32_t i = 0; i < V; i++)
            ref_row[i] = (float)ro.logits[(size_t)t * V + i];
        double err = tu_rel_l2(all + (size_t)t * V, ref_row, (size_t)V);
        ck_assert_msg(err < LOGITS_TOL, "%s: position %d logits: relative L2 error %.3g", s->name,
                      t, err);
    }

    int32_t n_distinct = 0, seen[MAX_EXPERTS] = {0};
    for (int32_t l = 0; l < L; l++)
        for (int32_t t = 0; t < n; t++) {
            size_t lt = (size_t)l * n + t;
            for (int32_t e = 0; e < s->n_experts; e++) {
                double want = ro.router[lt * s->n_experts + e];
                double got = r.router[lt * s->n_experts + e];
                ck_assert_msg(fabs(got - want) <= 1e-4 + 1e-4 * fabs(want),
                              "%s: layer %d position %d router logit %d: %.7g vs %.7g", s->name,
                              l, t, e, got, want);
            }
            for (int32_t j = 0; j < k; j++) {
                int32_t got = r.experts[lt * k + j], want = ro.experts[lt * k + j];
                ck_assert_msg(got == want, "%s: layer %d position %d slot %d: expert %d vs %d",
                              s->name, l, t, j, got, want);
                double gw = r.weights[lt * k + j], ww = ro.weights[lt * k + j];
                ck_assert_msg(fabs(gw - ww) <= 1e-5, "%s: layer %d position %d slot %d: "
                              "weight %.7g vs %.7g", s->name, l, t, j, gw, ww);
                if (!seen[want]++)
                    n_distinct++;
            }
        }
    /* routing that used only k experts would make this check vacuous */
    ck_assert_msg(k == s->n_experts || n_distinct > k, "%s: routing used only %d experts",
                  s->name, n_distinct);

    void *bufs[] = {ro.logits, ro.router, ro.experts, ro.weights, ro.tie, r.experts,
                    r.weights, r.router, seq, dec, all, ref_row};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(bufs[i]);
    ferry_model_close(fm);
    model_free(&m);
    remove_dir(dir);
}

/* ---- the shapes --------------------------------------------------------------------- */

/* Multi-head attention (GQA ratio 1), f32, one file, top-2 of 4, rope_theta 1e4. */
START_TEST(test_forward_mha_f32_single_file)
{
    fw_spec s = {.name = "fw_mha_f32", .vocab = 4096, .d = 32, .ff = 48, .n_layers = 2,
                 .n_heads = 4, .n_kv_heads = 4, .n_experts = 4, .k = 2, .rope_theta = 1e4,
                 .dtype = FERRY_DTYPE_F32, .n_shards = 1, .seed = 1, .n_prompt = 7, .n_gen = 9};
    run_case(&s);
}
END_TEST

/* GQA ratio 2, bf16, two shards, top-3 of 6, three layers, vocab beyond the tokenizer. */
START_TEST(test_forward_gqa2_bf16_sharded)
{
    fw_spec s = {.name = "fw_gqa2_bf16", .vocab = 4100, .d = 48, .ff = 64, .n_layers = 3,
                 .n_heads = 4, .n_kv_heads = 2, .n_experts = 6, .k = 3, .rope_theta = 1e6,
                 .dtype = FERRY_DTYPE_BF16, .n_shards = 2, .seed = 2, .n_prompt = 6,
                 .n_gen = 10};
    run_case(&s);
}
END_TEST

/* GQA ratio 4, f16, tied embeddings, head_dim 16 given explicitly (hidden / heads is 8, so
 * heads x head_dim = 128 is twice the hidden size), top-1 of 8. */
START_TEST(test_forward_gqa4_f16_tied_head_dim)
{
    fw_spec s = {.name = "fw_gqa4_f16", .vocab = 4096, .d = 64, .ff = 96, .n_layers = 2,
                 .n_heads = 8, .n_kv_heads = 2, .head_dim = 16, .n_experts = 8, .k = 1,
                 .rope_theta = 1e6, .tied = 1, .dtype = FERRY_DTYPE_F16, .n_shards = 1,
                 .seed = 3, .n_prompt = 10, .n_gen = 8};
    run_case(&s);
}
END_TEST

/* A sliding window of 4 over 18 tokens, prefilled in chunks of 5 (so windows cross chunk
 * boundaries); head_dim 12 explicit (hidden / heads is 8); bf16, two shards. */
START_TEST(test_forward_sliding_window_chunked)
{
    fw_spec s = {.name = "fw_window", .vocab = 4096, .d = 32, .ff = 48, .n_layers = 2,
                 .n_heads = 4, .n_kv_heads = 2, .head_dim = 12, .n_experts = 4, .k = 2,
                 .sliding_window = 4, .rope_theta = 1e4, .dtype = FERRY_DTYPE_BF16,
                 .n_shards = 2, .n_batch = 5, .seed = 4, .n_prompt = 8, .n_gen = 10};
    run_case(&s);
}
END_TEST

/* F32, F16 and BF16 tensors in one checkpoint (cycling tensor by tensor); one KV head for
 * four query heads (head_dim 10); top-3 of 8; a sliding window of 6 over 20 tokens. */
START_TEST(test_forward_mixed_dtypes_top3_of_8)
{
    fw_spec s = {.name = "fw_mixed", .vocab = 4100, .d = 40, .ff = 56, .n_layers = 1,
                 .n_heads = 4, .n_kv_heads = 1, .n_experts = 8, .k = 3, .sliding_window = 6,
                 .rope_theta = 5e5, .dtype = DTYPE_MIXED, .n_shards = 2, .seed = 5,
                 .n_prompt = 10, .n_gen = 10};
    run_case(&s);
}
END_TEST

/* ---- the loader's shape checks -------------------------------------------------------- */

typedef enum {
    FAULT_GROW,      /* the tensor's first dimension one larger */
    FAULT_TRANSPOSE, /* its dimensions swapped */
    FAULT_HEAD_DIM,  /* config.json says head_dim is 4 larger than the tensors were made for */
    FAULT_OMIT,      /* left out (of the index too) */
} fault_kind;

/* Writes spec s with one fault applied to tensor `name` and checks that opening it fails
 * with FERRY_ERR_FORMAT naming the tensor, leaving the out-parameter alone. */
static void expect_rejected(const fw_spec *s, fault_kind fault, const char *name)
{
    fw_model m;
    model_build(s, &m);
    if (fault == FAULT_GROW)
        grow_first_dim(&m, name);
    else if (fault == FAULT_TRANSPOSE)
        transpose_shape(&m, name);
    else if (fault == FAULT_HEAD_DIM)
        m.s.head_dim = m.hd + 4;
    else
        omit(&m, name);
    char dir[512];
    model_write(&m, dir);
    static char sentinel;
    ferry_model *fm = (ferry_model *)(void *)&sentinel;
    ferry_model_params mp = cpu_params();
    ferry_status st = ferry_model_open(dir, &mp, &fm);
    ck_assert_msg(st == FERRY_ERR_FORMAT, "%s (%s): status %s: %s", s->name, name,
                  ferry_status_name(st), ferry_last_error());
    ck_assert_msg(strstr(ferry_last_error(), name) != NULL, "%s: error \"%s\" does not name %s",
                  s->name, ferry_last_error(), name);
    if (fault != FAULT_OMIT)
        ck_assert_msg(strstr(ferry_last_error(), "shape") != NULL,
                      "%s: error \"%s\" is not about the shape", s->name, ferry_last_error());
    ck_assert_ptr_eq(fm, (ferry_model *)(void *)&sentinel);
    model_free(&m);
    remove_dir(dir);
}

static const fw_spec g_small = {.name = "fw_bad", .vocab = 4096, .d = 32, .ff = 48,
                                .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .n_experts = 4,
                                .k = 2, .rope_theta = 1e4, .dtype = FERRY_DTYPE_BF16,
                                .n_shards = 1, .seed = 9};

START_TEST(test_forward_open_rejects_wrong_shape)
{
    fw_spec s = g_small;
    expect_rejected(&s, FAULT_GROW, "model.layers.1.block_sparse_moe.experts.2.w1.weight");
    expect_rejected(&s, FAULT_TRANSPOSE, "model.layers.0.block_sparse_moe.experts.3.w2.weight");
    expect_rejected(&s, FAULT_GROW, "model.layers.1.post_attention_layernorm.weight");
    s.n_shards = 2;
    expect_rejected(&s, FAULT_GROW, "model.layers.0.self_attn.k_proj.weight");
    expect_rejected(&s, FAULT_HEAD_DIM, "model.layers.0.self_attn.q_proj.weight");
}
END_TEST

START_TEST(test_forward_open_rejects_missing_tensor)
{
    fw_spec s = g_small;
    expect_rejected(&s, FAULT_OMIT, "model.layers.1.self_attn.v_proj.weight");
    expect_rejected(&s, FAULT_OMIT, "model.layers.0.block_sparse_moe.experts.3.w3.weight");
    s.n_shards = 2;
    expect_rejected(&s, FAULT_OMIT, "lm_head.weight");
    expect_rejected(&s, FAULT_OMIT, "model.norm.weight");
    s.tied = 1;
    expect_rejected(&s, FAULT_OMIT, "model.embed_tokens.weight");
}
END_TEST

static Suite *forward_suite(void)
{
    Suite *s = suite_create("forward");
    TCase *tc = tcase_create("random-checkpoints");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_forward_mha_f32_single_file);
    tcase_add_test(tc, test_forward_gqa2_bf16_sharded);
    tcase_add_test(tc, test_forward_gqa4_f16_tied_head_dim);
    tcase_add_test(tc, test_forward_sliding_window_chunked);
    tcase_add_test(tc, test_forward_mixed_dtypes_top3_of_8);
    tcase_add_test(tc, test_forward_open_rejects_wrong_shape);
    tcase_add_test(tc, test_forward_open_rejects_missing_tensor);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(forward_suite()); }
