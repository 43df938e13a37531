/*
 * tests/test_families.c: the MoE families beside Mixtral (format/arch.h) against the float64
 * references in ../shared/fixtures/moe-families: one tiny random checkpoint each of
 * Qwen3-MoE (per-head q/k norms, head_dim apart from hidden/heads, a dense MLP layer,
 * renormalised top-k, tied embeddings), Qwen2-MoE (q/k/v biases, a sigmoid-gated shared
 * expert, plain top-k probabilities) and OLMoE (q/k norms over the whole projections,
 * clip_qkv, untied head). The CPU backend must give the last logits within 1e-4 relative
 * L2, the argmax at every position, the routing of every sparse layer, the residual stream
 * after every layer and the 16 greedy tokens; and offloading (RAM and NVMe tiers, a budget
 * of top-k slots, prefetching, hybrid modes), packs and batch generation must reproduce the
 * resident run bit for bit, as they do for Mixtral.
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/context.h"
#include "engine/model.h"
#include "ferry.h"
#include "tests/check_util.h"

#define FAMILIES_DIR FERRY_SOURCE_DIR "/../shared/fixtures/moe-families"
#define LOGITS_TOL 1e-4
#define N_GREEDY 16
#define MAX_POS 128
#define MAX_LAYERS 8
#define MAX_K 8

static const char *const g_families[] = {"tiny-qwen3_moe", "tiny-qwen2_moe", "tiny-olmoe"};
#define N_FAMILIES (int)(sizeof g_families / sizeof g_families[0])

/* The fixture folder (FERRY_FAMILIES_DIR overrides the shared one) and its reference. */
static void fixture_paths(int f, char *dir, size_t dir_len, char *ref, size_t ref_len)
{
    const char *base = getenv("FERRY_FAMILIES_DIR");
    base = base && base[0] ? base : FAMILIES_DIR;
    snprintf(dir, dir_len, "%s/%s", base, g_families[f]);
    snprintf(ref, ref_len, "%s/%s.ref.json", base, g_families[f]);
}

static cJSON *load_ref(int f)
{
    char dir[1024], ref[1024];
    fixture_paths(f, dir, sizeof dir, ref, sizeof ref);
    char *text = tu_read_file(ref, NULL);
    cJSON *root = cJSON_Parse(text);
    free(text);
    ck_assert_msg(root != NULL, "cannot parse %s", ref);
    return root;
}

static ferry_model *open_family(int f, const ferry_model_params *mp)
{
    char dir[1024], ref[1024];
    fixture_paths(f, dir, sizeof dir, ref, sizeof ref);
    ferry_model *m;
    ferry_status st = ferry_model_open(dir, mp, &m);
    ck_assert_msg(st == FERRY_OK, "%s: %s", g_families[f], ferry_last_error());
    return m;
}

static ferry_model_params cpu_params(void)
{
    ferry_model_params mp = ferry_model_params_default();
    mp.backend = FERRY_BACKEND_CPU; /* the reference; test_cuda covers the GPU */
    mp.n_threads = 2;
    return mp;
}

static cJSON *ref_case(const cJSON *ref, int i)
{
    return cJSON_GetArrayItem(cJSON_GetObjectItem(ref, "cases"), i);
}

static int n_cases(const cJSON *ref)
{
    return cJSON_GetArraySize(cJSON_GetObjectItem(ref, "cases"));
}

/* What the observer saw in one prefill: the chosen experts by MoE index and position, and
 * the residual stream at the last position after each decoder layer. */
typedef struct {
    int32_t n_pos, k, d, n_layers;
    int32_t experts[MAX_LAYERS][MAX_POS][MAX_K];
    float *hidden; /* (n_layers + 1, d): the embedding, then after each layer */
} observed;

static void on_route(void *user, int32_t layer, int32_t pos0, int32_t n, const float *logits,
                     const int32_t *experts, const float *weights)
{
    (void)logits;
    (void)weights;
    observed *o = user;
    for (int32_t t = 0; t < n; t++)
        if (layer < MAX_LAYERS && pos0 + t < MAX_POS)
            memcpy(o->experts[layer][pos0 + t], experts + (size_t)t * (size_t)o->k,
                   (size_t)o->k * sizeof(int32_t));
}

static void on_hidden(void *user, int32_t layer, int32_t pos0, int32_t n, const float *hidden)
{
    observed *o = user;
    int32_t last = o->n_pos - 1 - pos0;
    if (last < 0 || last >= n || layer >= o->n_layers) /* not the final norm's */
        return;
    memcpy(o->hidden + (size_t)(layer + 1) * (size_t)o->d, hidden + (size_t)last * (size_t)o->d,
           (size_t)o->d * sizeof(float));
}

/* Greedy decoding of n_gen tokens after the prompt ids through the KV cache; the last
 * prompt logits go to last_logits when not NULL. */
static void greedy(ferry_model *m, const int32_t *ids, int32_t n, int32_t n_gen, int32_t *out,
                   float *last_logits)
{
    ferry_model_info info;
    ck_assert_int_eq(ferry_model_get_info(m, &info), FERRY_OK);
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = n + n_gen + 1;
    ferry_context *c;
    ck_assert_msg(ferry_context_create(m, &cp, &c) == FERRY_OK, "%s", ferry_last_error());
    float *logits = malloc((size_t)info.n_vocab * sizeof *logits);
    ck_assert_msg(ferry_eval(c, ids, n, logits) == FERRY_OK, "%s", ferry_last_error());
    if (last_logits)
        memcpy(last_logits, logits, (size_t)info.n_vocab * sizeof *logits);
    for (int32_t i = 0; i < n_gen; i++) {
        int32_t best = 0;
        for (int32_t v = 1; v < info.n_vocab; v++)
            if (logits[v] > logits[best])
                best = v;
        out[i] = best;
        if (i + 1 < n_gen)
            ck_assert_msg(ferry_eval(c, &best, 1, logits) == FERRY_OK, "%s", ferry_last_error());
    }
    free(logits);
    ferry_context_free(c);
}

START_TEST(test_families_config_resolves_options)
{
    ferry_model_params mp = cpu_params();
    ferry_model *m = open_family(0, &mp); /* qwen3_moe */
    const ferry_config *c = &m->cfg;
    ck_assert_str_eq(c->arch->model_type, "qwen3_moe");
    ck_assert_int_eq(c->head_dim, 24);
    ck_assert_int_eq(c->n_moe_layers, 2);
    ck_assert_int_eq(c->moe_index[2], -1);
    ck_assert_int_eq(c->dense_ff, 64);
    ck_assert_int_eq(c->intermediate_size, 32);
    ck_assert_int_eq(c->qk_norm, FERRY_QK_NORM_HEAD);
    ck_assert_int_eq(c->norm_topk, 1);
    ck_assert_int_eq(c->qkv_bias, 0);
    ck_assert_int_eq(c->tie_word_embeddings, 1);
    ferry_model_close(m);
    m = open_family(1, &mp); /* qwen2_moe */
    c = &m->cfg;
    ck_assert_int_eq(c->shared_ff, 64);
    ck_assert_int_eq(c->qkv_bias, 1);
    ck_assert_int_eq(c->o_bias, 0);
    ck_assert_int_eq(c->norm_topk, 0);
    ck_assert_int_eq(c->n_moe_layers, 2);
    ferry_model_close(m);
    m = open_family(2, &mp); /* olmoe */
    c = &m->cfg;
    ck_assert_int_eq(c->qk_norm, FERRY_QK_NORM_FULL);
    ck_assert(c->clip_qkv == 3.0f);
    ck_assert(c->rms_eps == 1e-5f);
    ck_assert_int_eq(c->tie_word_embeddings, 0);
    ferry_model_close(m);
}
END_TEST

/* Every case of fixture f against its reference on the CPU backend. */
static void check_reference(int f)
{
    cJSON *ref = load_ref(f);
    ferry_model_params mp = cpu_params();
    ferry_model *m = open_family(f, &mp);
    ferry_model_info info;
    ck_assert_int_eq(ferry_model_get_info(m, &info), FERRY_OK);
    const ferry_config *cfg = &m->cfg;
    int32_t V = info.n_vocab, d = info.d_model, k = cfg->n_experts_per_tok;
    ck_assert(cfg->n_layers + 1 <= MAX_LAYERS && k <= MAX_K);
    for (int i = 0; i < n_cases(ref); i++) {
        cJSON *rc = ref_case(ref, i);
        int32_t n, n_ref;
        int32_t *ids = tu_json_ints(cJSON_GetObjectItem(rc, "ids"), &n);
        ck_assert(n <= MAX_POS);

        /* prefill with every position's logits and the observer */
        observed *o = calloc(1, sizeof *o);
        o->n_pos = n;
        o->k = k;
        o->d = d;
        o->n_layers = cfg->n_layers;
        o->hidden = calloc((size_t)(cfg->n_layers + 1) * (size_t)d, sizeof(float));
        ferry_context_params cp = ferry_context_params_default();
        cp.n_ctx = 256;
        ferry_context *c;
        ck_assert_msg(ferry_context_create(m, &cp, &c) == FERRY_OK, "%s", ferry_last_error());
        ferry_observer obs = {.on_route = on_route, .on_hidden = on_hidden, .user = o};
        ferry_context_set_observer(c, &obs);
        float *all = malloc((size_t)n * (size_t)V * sizeof *all);
        ck_assert_msg(ferry_context_forward(c, ids, n, all, NULL) == FERRY_OK, "%s",
                      ferry_last_error());
        ferry_context_free(c);

        float *last = tu_json_floats(cJSON_GetObjectItem(rc, "last_logits"), &n_ref);
        ck_assert_int_eq(n_ref, V);
        double err = tu_rel_l2(all + (size_t)(n - 1) * (size_t)V, last, (size_t)V);
        printf("test_families: %s case %d: last logits rel L2 %.3g against float64\n",
               g_families[f], i, err);
        fflush(stdout);
        ck_assert_msg(err < LOGITS_TOL, "%s case %d: last logits relative error %.3g",
                      g_families[f], i, err);

        int32_t *am = tu_json_ints(cJSON_GetObjectItem(rc, "argmax_each_pos"), &n_ref);
        ck_assert_int_eq(n_ref, n);
        for (int32_t p = 0; p < n; p++) {
            const float *row = all + (size_t)p * (size_t)V;
            int32_t best = 0;
            for (int32_t v = 1; v < V; v++)
                if (row[v] > row[best])
                    best = v;
            ck_assert_msg(best == am[p], "%s case %d position %d: argmax %d, reference %d",
                          g_families[f], i, p, best, am[p]);
        }

        /* routing: the reference lists every decoder layer, null for a dense one */
        cJSON *topk = cJSON_GetObjectItem(rc, "topk_experts");
        ck_assert_int_eq(cJSON_GetArraySize(topk), cfg->n_layers);
        for (int32_t l = 0; l < cfg->n_layers; l++) {
            cJSON *layer = cJSON_GetArrayItem(topk, l);
            ck_assert_msg(cJSON_IsNull(layer) == (cfg->moe_index[l] < 0),
                          "%s layer %d: dense in one, sparse in the other", g_families[f], l);
            if (cJSON_IsNull(layer))
                continue;
            for (int32_t p = 0; p < n; p++) {
                int32_t nk;
                int32_t *want = tu_json_ints(cJSON_GetArrayItem(layer, p), &nk);
                ck_assert_int_eq(nk, k);
                for (int32_t j = 0; j < k; j++)
                    ck_assert_msg(o->experts[cfg->moe_index[l]][p][j] == want[j],
                                  "%s case %d layer %d position %d: expert %d, reference %d",
                                  g_families[f], i, l, p, o->experts[cfg->moe_index[l]][p][j],
                                  want[j]);
                free(want);
            }
        }

        /* the residual stream at the last position: the embedding, then each layer */
        cJSON *res = cJSON_GetObjectItem(rc, "residual_last_pos_each_layer");
        ck_assert_int_eq(cJSON_GetArraySize(res), cfg->n_layers + 1);
        for (int32_t l = 0; l <= cfg->n_layers; l++) {
            int32_t nd;
            float *want = tu_json_floats(cJSON_GetArrayItem(res, l), &nd);
            ck_assert_int_eq(nd, d);
            double e = tu_rel_l2(o->hidden + (size_t)l * (size_t)d, want, (size_t)d);
            ck_assert_msg(e < LOGITS_TOL, "%s case %d: residual after layer %d off by %.3g",
                          g_families[f], i, l - 1, e);
            free(want);
        }

        int32_t gen[N_GREEDY], n_g;
        int32_t *want_g = tu_json_ints(cJSON_GetObjectItem(rc, "greedy_ids"), &n_g);
        ck_assert_int_eq(n_g, N_GREEDY);
        greedy(m, ids, n, N_GREEDY, gen, NULL);
        for (int32_t j = 0; j < N_GREEDY; j++)
            ck_assert_msg(gen[j] == want_g[j], "%s case %d greedy token %d: %d, reference %d",
                          g_families[f], i, j, gen[j], want_g[j]);

        /* the tokenizer: the prompt's ids (no BOS: none of these tokenizers adds one), and
         * the prompt and continuation decoded with special tokens skipped */
        const char *prompt = cJSON_GetObjectItem(rc, "prompt")->valuestring;
        int32_t tids[MAX_POS], n_t;
        ck_assert_msg(ferry_tokenize(m, prompt, strlen(prompt), 1, tids, MAX_POS, &n_t) ==
                          FERRY_OK, "%s", ferry_last_error());
        ck_assert_msg(n_t == n && memcmp(tids, ids, (size_t)n * sizeof *ids) == 0,
                      "%s case %d: the prompt tokenizes to other ids", g_families[f], i);
        int32_t both[MAX_POS + N_GREEDY];
        memcpy(both, ids, (size_t)n * sizeof *ids);
        memcpy(both + n, gen, sizeof gen);
        char text[4096];
        size_t len;
        ck_assert_msg(ferry_detokenize(m, both, n + N_GREEDY, 1, text, sizeof text, &len) ==
                          FERRY_OK, "%s", ferry_last_error());
        const char *want_text = cJSON_GetObjectItem(rc, "greedy_text")->valuestring;
        ck_assert_msg(strcmp(text, want_text) == 0, "%s case %d: text '%s', reference '%s'",
                      g_families[f], i, text, want_text);
        free(want_g);
        free(am);
        free(last);
        free(all);
        free(o->hidden);
        free(o);
        free(ids);
    }
    ferry_model_close(m);
    cJSON_Delete(ref);
}

START_TEST(test_families_qwen3_moe_matches_reference) { check_reference(0); }
END_TEST

START_TEST(test_families_qwen2_moe_matches_reference) { check_reference(1); }
END_TEST

START_TEST(test_families_olmoe_matches_reference) { check_reference(2); }
END_TEST

/* The resident run's greedy tokens and last logits of each case, to compare others with. */
typedef struct {
    int32_t n_cases;
    int32_t *ids[8], n_ids[8];
    int32_t gen[8][N_GREEDY];
    float *logits[8];
} resident_run;

static void run_all(int f, const ferry_model_params *mp, const cJSON *ref, resident_run *r)
{
    ferry_model *m = open_family(f, mp);
    ferry_model_info info;
    ck_assert_int_eq(ferry_model_get_info(m, &info), FERRY_OK);
    r->n_cases = n_cases(ref);
    ck_assert(r->n_cases <= 8);
    for (int i = 0; i < r->n_cases; i++) {
        r->ids[i] = tu_json_ints(cJSON_GetObjectItem(ref_case(ref, i), "ids"), &r->n_ids[i]);
        r->logits[i] = malloc((size_t)info.n_vocab * sizeof(float));
        greedy(m, r->ids[i], r->n_ids[i], N_GREEDY, r->gen[i], r->logits[i]);
    }
    ferry_model_close(m);
}

static void free_run(resident_run *r)
{
    for (int i = 0; i < r->n_cases; i++) {
        free(r->ids[i]);
        free(r->logits[i]);
    }
}

static void expect_same(int f, const char *what, const resident_run *a, const resident_run *b,
                        int32_t n_vocab)
{
    for (int i = 0; i < a->n_cases; i++) {
        ck_assert_msg(memcmp(a->logits[i], b->logits[i], (size_t)n_vocab * sizeof(float)) == 0,
                      "%s %s case %d: last logits differ from the resident run (rel %.3g)",
                      g_families[f], what, i,
                      tu_rel_l2(b->logits[i], a->logits[i], (size_t)n_vocab));
        ck_assert_msg(memcmp(a->gen[i], b->gen[i], sizeof a->gen[i]) == 0,
                      "%s %s case %d: greedy tokens differ from the resident run", g_families[f],
                      what, i);
    }
}

/* Offloading of every kind gives the resident run's bits, on each family. */
static void check_offload(int f)
{
    cJSON *ref = load_ref(f);
    ferry_model_params mp = cpu_params();
    resident_run base;
    run_all(f, &mp, ref, &base);
    ferry_model *m = open_family(f, &mp);
    int32_t V = m->cfg.vocab_size, k = m->cfg.n_experts_per_tok;
    ferry_model_close(m);

    char pack[1200], cache_dir[1024];
    tu_scratch_dir(cache_dir, "families_cache");
    snprintf(pack, sizeof pack, "%s/%s.pack", cache_dir, g_families[f]);
    char dir[1024], refp[1024];
    fixture_paths(f, dir, sizeof dir, refp, sizeof refp);
    ck_assert_msg(ferry_pack_model(dir, pack, NULL) == FERRY_OK, "%s", ferry_last_error());

    struct {
        const char *what;
        int32_t offload, max_slots, hybrid, prefetch, predictor;
        int use_pack;
    } modes[] = {
        {"ram, top-k slots", FERRY_OFFLOAD_RAM, k, FERRY_HYBRID_OFF, 0, FERRY_PREDICT_RECENCY, 0},
        {"ram, prefetch gate", FERRY_OFFLOAD_RAM, k + 1, FERRY_HYBRID_OFF, 1, FERRY_PREDICT_GATE,
         0},
        {"ram, hybrid auto", FERRY_OFFLOAD_RAM, k, FERRY_HYBRID_AUTO, 1, FERRY_PREDICT_RECENCY, 0},
        {"cpu-experts", FERRY_OFFLOAD_RAM, 0, FERRY_HYBRID_CPU_EXPERTS, 0, FERRY_PREDICT_RECENCY,
         0},
        {"nvme, pack", FERRY_OFFLOAD_NVME, k, FERRY_HYBRID_OFF, 1, FERRY_PREDICT_RECENCY, 1},
        {"resident pack", -1, 0, FERRY_HYBRID_OFF, 0, FERRY_PREDICT_RECENCY, 1},
    };
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        ferry_model_params p = cpu_params();
        if (modes[i].offload >= 0) {
            p.gpu_mem_bytes = 256ull << 20;
            p.offload = modes[i].offload;
        }
        p.max_slots = modes[i].max_slots;
        p.hybrid = modes[i].hybrid;
        p.prefetch = modes[i].prefetch;
        p.predictor = modes[i].predictor;
        p.pack_path = modes[i].use_pack ? pack : NULL;
        resident_run r;
        run_all(f, &p, ref, &r);
        expect_same(f, modes[i].what, &base, &r, V);
        free_run(&r);
    }
    /* perplexity of the prompts' text: resident and offloaded through top-k slots agree */
    const char *text = cJSON_GetObjectItem(ref_case(ref, 2), "greedy_text")->valuestring;
    double ppl[2];
    for (int off = 0; off < 2; off++) {
        ferry_model_params p = cpu_params();
        if (off) {
            p.gpu_mem_bytes = 256ull << 20;
            p.max_slots = k;
            p.prefetch = 1;
        }
        ferry_model *pm = open_family(f, &p);
        ferry_perplexity_result pr;
        ck_assert_msg(ferry_perplexity(pm, text, strlen(text), 16, &pr) == FERRY_OK, "%s",
                      ferry_last_error());
        ck_assert(pr.n_scored > 8 && isfinite(pr.perplexity) && pr.perplexity > 1);
        ppl[off] = pr.perplexity;
        ferry_model_close(pm);
    }
    ck_assert_msg(ppl[0] == ppl[1], "%s: perplexity %.17g resident, %.17g offloaded",
                  g_families[f], ppl[0], ppl[1]);
    remove(pack);
    free_run(&base);
    cJSON_Delete(ref);
}

START_TEST(test_families_qwen3_moe_offload_equal) { check_offload(0); }
END_TEST

START_TEST(test_families_qwen2_moe_offload_equal) { check_offload(1); }
END_TEST

START_TEST(test_families_olmoe_offload_equal) { check_offload(2); }
END_TEST

/* Batch generation, reordered across prompts, gives each prompt's greedy tokens alone. */
static void check_batch(int f)
{
    cJSON *ref = load_ref(f);
    ferry_model_params mp = cpu_params();
    ferry_model *m = open_family(f, &mp);
    int n = n_cases(ref);
    const int32_t *prompts[8];
    int32_t n_prompt[8], n_predict[8], *out[8], n_out[8], *want[8], n_want;
    for (int i = 0; i < n; i++) {
        int32_t *ids = tu_json_ints(cJSON_GetObjectItem(ref_case(ref, i), "ids"), &n_prompt[i]);
        prompts[i] = ids;
        n_predict[i] = N_GREEDY;
        out[i] = calloc(N_GREEDY, sizeof(int32_t));
        want[i] = tu_json_ints(cJSON_GetObjectItem(ref_case(ref, i), "greedy_ids"), &n_want);
    }
    for (int reorder = 0; reorder <= 1; reorder++) {
        ferry_batch_params bp = ferry_batch_params_default();
        bp.reorder = reorder;
        bp.stop_at_eos = 0;
        bp.max_batch = 4;
        bp.chunk = 5;
        ferry_batch_stats bs;
        ck_assert_msg(ferry_batch_generate(m, prompts, n_prompt, n_predict, n, &bp, out, n_out,
                                           &bs, NULL) == FERRY_OK,
                      "%s", ferry_last_error());
        for (int i = 0; i < n; i++) {
            ck_assert_int_eq(n_out[i], N_GREEDY);
            for (int j = 0; j < N_GREEDY; j++)
                ck_assert_msg(out[i][j] == want[i][j],
                              "%s batch (reorder %d) prompt %d token %d: %d, reference %d",
                              g_families[f], reorder, i, j, out[i][j], want[i][j]);
        }
    }
    for (int i = 0; i < n; i++) {
        free((void *)prompts[i]);
        free(out[i]);
        free(want[i]);
    }
    ferry_model_close(m);
    cJSON_Delete(ref);
}

START_TEST(test_families_batch_matches_reference)
{
    for (int f = 0; f < N_FAMILIES; f++)
        check_batch(f);
}
END_TEST

/* Options a family does not take, and unknown families, are errors naming them. */
START_TEST(test_families_config_errors)
{
    struct {
        const char *json, *msg;
        ferry_status st;
    } cases[] = {
        {"{\"model_type\":\"deepseek_v3\"}", "model_type 'deepseek_v3' is not supported",
         FERRY_ERR_UNSUPPORTED},
        {"{\"architectures\":[\"GptOssForCausalLM\"]}", "include no class ferry runs",
         FERRY_ERR_UNSUPPORTED},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ferry_config c;
        ck_assert_int_eq(ferry_config_parse(cases[i].json, strlen(cases[i].json), "x", &c),
                         cases[i].st);
        ck_assert_msg(strstr(ferry_last_error(), cases[i].msg), "%s", ferry_last_error());
    }
    /* rms_norm_eps and rope_theta left out: the configuration class's defaults (the
     * OLMoE-1B-7B-0924 config.json has no rms_norm_eps) */
    const char *bare[] = {"olmoe", "qwen3_moe", "qwen2_moe", "mixtral"};
    const char *key_ff[] = {"intermediate_size", "moe_intermediate_size", "moe_intermediate_size",
                            "intermediate_size"};
    const float eps[] = {1e-5f, 1e-6f, 1e-6f, 1e-5f}, theta[] = {1e4f, 1e4f, 1e4f, 1e6f};
    for (int i = 0; i < 4; i++) {
        char json[512];
        snprintf(json, sizeof json, "{\"model_type\":\"%s\",\"vocab_size\":64,"
                 "\"hidden_size\":32,\"%s\":32,\"num_hidden_layers\":2,"
                 "\"num_attention_heads\":2,\"%s\":4,\"num_experts_per_tok\":2,"
                 "\"max_position_embeddings\":64,\"shared_expert_intermediate_size\":8}",
                 bare[i], key_ff[i], i == 3 ? "num_local_experts" : "num_experts");
        ferry_config c;
        ck_assert_msg(ferry_config_parse(json, strlen(json), "x", &c) == FERRY_OK, "%s: %s",
                      bare[i], ferry_last_error());
        ck_assert_msg(c.rms_eps == eps[i] && c.rope_theta == theta[i], "%s: eps %g theta %g",
                      bare[i], (double)c.rms_eps, (double)c.rope_theta);
    }
    /* a qwen3_moe config whose every layer is dense, and one naming a layer it lacks */
    const char *base = "{\"model_type\":\"qwen3_moe\",\"vocab_size\":64,\"hidden_size\":32,"
                       "\"intermediate_size\":64,\"moe_intermediate_size\":32,"
                       "\"num_hidden_layers\":2,\"num_attention_heads\":2,\"num_experts\":4,"
                       "\"num_experts_per_tok\":2,\"max_position_embeddings\":64,"
                       "\"rms_norm_eps\":1e-6,";
    struct {
        const char *tail, *msg;
        ferry_status st;
    } bad[] = {
        {"\"mlp_only_layers\":[0,1]}", "no layer is sparse", FERRY_ERR_UNSUPPORTED},
        {"\"mlp_only_layers\":[2]}", "'mlp_only_layers'[0] is not a layer in [0, 2)",
         FERRY_ERR_FORMAT},
        {"\"decoder_sparse_step\":0}", "'decoder_sparse_step' is 0", FERRY_ERR_FORMAT},
        {"\"norm_topk_prob\":1}", "'norm_topk_prob' is not a bool", FERRY_ERR_FORMAT},
        {"\"use_sliding_window\":\"yes\"}", "'use_sliding_window' is not a bool",
         FERRY_ERR_FORMAT},
        {"\"hidden_act\":\"gelu\"}", "hidden_act 'gelu' is not supported",
         FERRY_ERR_UNSUPPORTED},
        {"\"mlp_only_layers\":[1]}", NULL, FERRY_OK},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char json[1024];
        snprintf(json, sizeof json, "%s%s", base, bad[i].tail);
        ferry_config c;
        ferry_status st = ferry_config_parse(json, strlen(json), "x", &c);
        ck_assert_msg(st == bad[i].st, "%s: %d (%s)", bad[i].tail, st, ferry_last_error());
        if (bad[i].msg)
            ck_assert_msg(strstr(ferry_last_error(), bad[i].msg), "%s", ferry_last_error());
        else
            ck_assert(c.n_moe_layers == 1 && c.moe_index[1] == -1 && c.moe_layer[0] == 0 &&
                      c.dense_ff == 64);
    }
}
END_TEST

/* Scale of many small experts: a Qwen3-30B-A3B-shaped checkpoint (48 layers x 128 experts,
 * top-8) with tiny matrices, two of its layers dense. Offloaded through 64 slots (one
 * percent of the 6,144 experts) with prefetching by the gate predictor, hybrid, and from
 * q8 and q4 packs on the NVMe tier, it gives the resident run's bits. */
static void synth_family(const char *dir, const char *preset, const int32_t *dense,
                         int32_t n_dense)
{
    ferry_synth_params sp = ferry_synth_params_default();
    ck_assert_int_eq(ferry_synth_preset(preset, &sp), FERRY_OK);
    sp.n_vocab = 4096;
    sp.d_model = 64;
    sp.d_ff = 32;
    sp.d_ff_dense = sp.d_ff_dense ? 96 : 0;
    sp.d_ff_shared = sp.d_ff_shared ? 64 : 0;
    sp.n_heads = 4;
    sp.n_kv_heads = sp.n_kv_heads < sp.n_heads ? 2 : 4;
    sp.head_dim = strcmp(sp.model_type, "qwen3_moe") == 0 ? 32 : 0;
    sp.max_positions = 256;
    sp.dense_layers = dense;
    sp.n_dense_layers = n_dense;
    sp.tokenizer_dir = FERRY_SOURCE_DIR "/models/tiny-moe-code";
    sp.shard_bytes = 8u << 20;
    sp.seed = 7;
    ck_assert_msg(ferry_synth(&sp, dir) == FERRY_OK, "%s: %s", preset, ferry_last_error());
}

/* Greedy tokens and last logits of fixed prompts, to compare runs with. */
static void synth_run(const char *dir, const ferry_model_params *mp, int32_t gen[2][N_GREEDY],
                      float *logits[2])
{
    static const int32_t prompts[2][6] = {{1, 17, 300, 4000, 9, 12}, {1, 3000, 2, 2, 2, 511}};
    ferry_model *m;
    ck_assert_msg(ferry_model_open(dir, mp, &m) == FERRY_OK, "%s", ferry_last_error());
    for (int i = 0; i < 2; i++)
        greedy(m, prompts[i], 6, N_GREEDY, gen[i], logits[i]);
    ferry_model_close(m);
}

START_TEST(test_families_many_small_experts)
{
    char dir[1024], pack[1100];
    tu_scratch_dir(dir, "families_qwen3_scale");
    const int32_t dense[2] = {0, 30};
    synth_family(dir, "qwen3-30b-a3b", dense, 2);
    ferry_model_params mp = cpu_params();
    ferry_model *m;
    ck_assert_msg(ferry_model_open(dir, &mp, &m) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(m->cfg.n_layers, 48);
    ck_assert_int_eq(m->cfg.n_moe_layers, 46);
    ck_assert_int_eq(m->cfg.n_experts, 128);
    ck_assert_int_eq(m->cfg.n_experts_per_tok, 8);
    /* layers 1..29 are MoE layers 0..28, layer 30 is dense, 31..47 are 29..45 */
    ck_assert_int_eq(m->cfg.moe_index[0], -1);
    ck_assert_int_eq(m->cfg.moe_index[30], -1);
    ck_assert_int_eq(m->cfg.moe_layer[29], 31);
    ck_assert_int_eq(m->cfg.moe_index[47], 45);
    ferry_model_close(m);

    int32_t base_gen[2][N_GREEDY], gen[2][N_GREEDY];
    float *base_logits[2], *logits[2];
    for (int i = 0; i < 2; i++) {
        base_logits[i] = malloc(4096 * sizeof(float));
        logits[i] = malloc(4096 * sizeof(float));
    }
    synth_run(dir, &mp, base_gen, base_logits);

    struct {
        const char *what;
        int32_t offload, hybrid, prefetch, predictor, pack;
    } modes[] = {
        {"ram, 64 slots, gate prefetch", FERRY_OFFLOAD_RAM, FERRY_HYBRID_OFF, 1,
         FERRY_PREDICT_GATE, -1},
        {"ram, 64 slots, hybrid auto", FERRY_OFFLOAD_RAM, FERRY_HYBRID_AUTO, 1,
         FERRY_PREDICT_RECENCY, -1},
        {"nvme, as stored", FERRY_OFFLOAD_NVME, FERRY_HYBRID_OFF, 1, FERRY_PREDICT_GATE,
         FERRY_PACK_AS_STORED},
    };
    snprintf(pack, sizeof pack, "%s/experts.pack", dir);
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        ferry_model_params p = cpu_params();
        p.gpu_mem_bytes = 64ull << 20;
        p.max_slots = 64;
        p.offload = modes[i].offload;
        p.hybrid = modes[i].hybrid;
        p.prefetch = modes[i].prefetch;
        p.predictor = modes[i].predictor;
        if (modes[i].pack >= 0) {
            ferry_pack_params pk = {.format = modes[i].pack};
            ck_assert_msg(ferry_pack_model(dir, pack, &pk) == FERRY_OK, "%s", ferry_last_error());
            p.pack_path = pack;
        }
        synth_run(dir, &p, gen, logits);
        for (int c = 0; c < 2; c++)
            ck_assert_msg(memcmp(gen[c], base_gen[c], sizeof gen[c]) == 0 &&
                              memcmp(logits[c], base_logits[c], 4096 * sizeof(float)) == 0,
                          "%s: prompt %d differs from the resident run", modes[i].what, c);
    }
    /* quantized packs: offloaded from the NVMe tier, the resident run of the same pack */
    for (int32_t q = FERRY_PACK_Q8; q <= FERRY_PACK_Q4; q++) {
        ferry_pack_params pk = {.format = q};
        ck_assert_msg(ferry_pack_model(dir, pack, &pk) == FERRY_OK, "%s", ferry_last_error());
        ferry_model_params p = cpu_params();
        p.pack_path = pack;
        synth_run(dir, &p, base_gen, base_logits);
        p.gpu_mem_bytes = 64ull << 20;
        p.max_slots = 64;
        p.offload = FERRY_OFFLOAD_NVME;
        p.prefetch = 1;
        p.hybrid = FERRY_HYBRID_OFF;
        synth_run(dir, &p, gen, logits);
        for (int c = 0; c < 2; c++)
            ck_assert_msg(memcmp(gen[c], base_gen[c], sizeof gen[c]) == 0 &&
                              memcmp(logits[c], base_logits[c], 4096 * sizeof(float)) == 0,
                          "q%d pack on the NVMe tier: prompt %d differs from resident",
                          q == FERRY_PACK_Q8 ? 8 : 4, c);
    }
    remove(pack);
    for (int i = 0; i < 2; i++) {
        free(base_logits[i]);
        free(logits[i]);
    }
}
END_TEST

/* Qwen2-MoE and OLMoE shapes through q8 and q4 packs (the fixtures' hidden 48 cannot be
 * quantized in groups of 32): resident and offloaded runs of one pack agree bit for bit. */
START_TEST(test_families_quantized_packs)
{
    const char *presets[] = {"qwen1.5-moe-a2.7b", "olmoe-1b-7b"};
    for (int f = 0; f < 2; f++) {
        char dir[1024], pack[1100], name[64];
        snprintf(name, sizeof name, "families_pack_%d", f);
        tu_scratch_dir(dir, name);
        synth_family(dir, presets[f], NULL, 0);
        snprintf(pack, sizeof pack, "%s/experts.pack", dir);
        int32_t base_gen[2][N_GREEDY], gen[2][N_GREEDY];
        float *base_logits[2], *logits[2];
        for (int i = 0; i < 2; i++) {
            base_logits[i] = malloc(4096 * sizeof(float));
            logits[i] = malloc(4096 * sizeof(float));
        }
        for (int32_t q = FERRY_PACK_Q8; q <= FERRY_PACK_Q4; q++) {
            ferry_pack_params pk = {.format = q};
            ck_assert_msg(ferry_pack_model(dir, pack, &pk) == FERRY_OK, "%s",
                          ferry_last_error());
            ferry_model_params p = cpu_params();
            p.pack_path = pack;
            synth_run(dir, &p, base_gen, base_logits);
            p.gpu_mem_bytes = 64ull << 20;
            p.max_slots = 8;
            p.offload = q == FERRY_PACK_Q8 ? FERRY_OFFLOAD_RAM : FERRY_OFFLOAD_NVME;
            p.hybrid = FERRY_HYBRID_AUTO;
            synth_run(dir, &p, gen, logits);
            for (int c = 0; c < 2; c++)
                ck_assert_msg(memcmp(gen[c], base_gen[c], sizeof gen[c]) == 0 &&
                                  memcmp(logits[c], base_logits[c], 4096 * sizeof(float)) == 0,
                              "%s q%d pack offloaded: prompt %d differs from resident",
                              presets[f], q == FERRY_PACK_Q8 ? 8 : 4, c);
        }
        remove(pack);
        for (int i = 0; i < 2; i++) {
            free(base_logits[i]);
            free(logits[i]);
        }
    }
}
END_TEST

static Suite *families_suite(void)
{
    Suite *s = suite_create("families");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_families_config_resolves_options);
    tcase_add_test(tc, test_families_config_errors);
    tcase_add_test(tc, test_families_qwen3_moe_matches_reference);
    tcase_add_test(tc, test_families_qwen2_moe_matches_reference);
    tcase_add_test(tc, test_families_olmoe_matches_reference);
    tcase_add_test(tc, test_families_qwen3_moe_offload_equal);
    tcase_add_test(tc, test_families_qwen2_moe_offload_equal);
    tcase_add_test(tc, test_families_olmoe_offload_equal);
    tcase_add_test(tc, test_families_batch_matches_reference);
    suite_add_tcase(s, tc);
    TCase *scale = tcase_create("synthetic");
    tcase_set_timeout(scale, 600);
    tcase_add_test(scale, test_families_many_small_experts);
    tcase_add_test(scale, test_families_quantized_packs);
    suite_add_tcase(s, scale);
    return s;
}

int main(void) { return tu_run_suite(families_suite()); }
