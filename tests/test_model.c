/*
 * tests/test_model.c: the bundled model (models/tiny-moe-code) against the Hugging Face
 * transformers reference outputs in tests/fixtures/tiny-moe-code.ref.json: token ids,
 * logits, routing, hidden states and greedy continuations; and the invariants the rest
 * of the engine builds on (prefill, decode and any chunking give bit-identical logits).
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/context.h"
#include "engine/sampler.h"
#include "ferry.h"
#include "tests/check_util.h"

#define MODEL_DIR FERRY_SOURCE_DIR "/models/tiny-moe-code"
#define REF_PATH FERRY_SOURCE_DIR "/tests/fixtures/tiny-moe-code.ref.json"

static ferry_model *g_model;
static cJSON *g_ref;
static int32_t g_vocab;

static void setup(void)
{
    ferry_model_params mp = ferry_model_params_default();
    mp.backend = FERRY_BACKEND_CPU; /* the reference; test_cuda covers the GPU */
    mp.n_threads = 2;
    ferry_status st = ferry_model_open(MODEL_DIR, &mp, &g_model);
    ck_assert_msg(st == FERRY_OK, "open: %s", ferry_last_error());
    ferry_model_info info;
    ck_assert_int_eq(ferry_model_get_info(g_model, &info), FERRY_OK);
    g_vocab = info.n_vocab;
    char *text = tu_read_file(REF_PATH, NULL);
    g_ref = cJSON_Parse(text);
    free(text);
    ck_assert_msg(g_ref != NULL, "cannot parse %s", REF_PATH);
}

static void teardown(void)
{
    cJSON_Delete(g_ref);
    ferry_model_close(g_model);
    g_ref = NULL;
    g_model = NULL;
}

static int n_cases(void) { return cJSON_GetArraySize(cJSON_GetObjectItem(g_ref, "cases")); }

static cJSON *ref_case(int i) { return cJSON_GetArrayItem(cJSON_GetObjectItem(g_ref, "cases"), i); }

static ferry_context *new_context(int32_t n_batch)
{
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = 256;
    cp.n_batch = n_batch;
    ferry_context *c;
    ck_assert_msg(ferry_context_create(g_model, &cp, &c) == FERRY_OK, "%s", ferry_last_error());
    return c;
}

START_TEST(test_model_tokenize_matches_fixture)
{
    for (int i = 0; i < n_cases(); i++) {
        cJSON *rc = ref_case(i);
        const char *prompt = cJSON_GetObjectItem(rc, "prompt")->valuestring;
        int32_t n_ref;
        int32_t *ref = tu_json_ints(cJSON_GetObjectItem(rc, "ids"), &n_ref);
        int32_t ids[512], n;
        ck_assert_int_eq(ferry_tokenize(g_model, prompt, strlen(prompt), 1, ids, 512, &n), FERRY_OK);
        ck_assert_int_eq(n, n_ref);
        for (int32_t j = 0; j < n; j++)
            ck_assert_msg(ids[j] == ref[j], "case %d token %d: %d vs %d", i, j, ids[j], ref[j]);
        free(ref);
    }
}
END_TEST

typedef struct {
    int32_t n_layers, n_pos, k;
    int32_t *experts; /* (n_layers, n_pos, k) */
    float *router;    /* (n_layers, n_pos, n_experts) */
    int32_t n_experts;
    float *hidden;    /* (n_layers + 2, d) at the last position: embedding, layers, final */
    int32_t d;
} route_log;

static void on_route(void *user, int32_t layer, int32_t pos0, int32_t n, const float *logits,
                     const int32_t *experts, const float *weights)
{
    route_log *r = user;
    (void)weights;
    for (int32_t t = 0; t < n; t++) {
        int32_t pos = pos0 + t;
        memcpy(r->experts + ((size_t)layer * r->n_pos + pos) * r->k, experts + (size_t)t * r->k,
               (size_t)r->k * sizeof(int32_t));
        memcpy(r->router + ((size_t)layer * r->n_pos + pos) * r->n_experts,
               logits + (size_t)t * r->n_experts, (size_t)r->n_experts * sizeof(float));
    }
}

static void on_hidden(void *user, int32_t layer, int32_t pos0, int32_t n, const float *h)
{
    route_log *r = user;
    if (pos0 + n != r->n_pos || layer == r->n_layers - 1)
        return;
    /* fixture order: embedding, layers 0..n_layers-2, then the final norm's output */
    int32_t at = layer == r->n_layers ? r->n_layers : layer + 1;
    memcpy(r->hidden + (size_t)at * r->d, h + (size_t)(n - 1) * r->d,
           (size_t)r->d * sizeof(float));
}

START_TEST(test_model_prefill_matches_reference)
{
    ferry_model_info info;
    ferry_model_get_info(g_model, &info);
    for (int ci = 0; ci < n_cases(); ci++) {
        cJSON *rc = ref_case(ci);
        int32_t n;
        int32_t *ids = tu_json_ints(cJSON_GetObjectItem(rc, "ids"), &n);
        route_log r = {.n_layers = info.n_layers, .n_pos = n, .k = info.n_experts_used,
                       .n_experts = info.n_experts, .d = info.d_model};
        r.experts = calloc((size_t)info.n_layers * n * r.k, sizeof(int32_t));
        r.router = calloc((size_t)info.n_layers * n * r.n_experts, sizeof(float));
        r.hidden = calloc((size_t)(info.n_layers + 2) * r.d, sizeof(float));
        float *logits = malloc((size_t)n * g_vocab * sizeof(float));
        ck_assert(r.experts && r.router && r.hidden && logits);

        ferry_context *c = new_context(0);
        ferry_observer obs = {.on_route = on_route, .on_hidden = on_hidden, .user = &r};
        ferry_context_set_observer(c, &obs);
        ck_assert_msg(ferry_context_forward(c, ids, n, logits, NULL) == FERRY_OK, "%s",
                      ferry_last_error());

        /* last-position logits: relative L2 error below 1e-4 */
        int32_t nl;
        float *ref_last = tu_json_floats(cJSON_GetObjectItem(rc, "last_logits"), &nl);
        ck_assert_int_eq(nl, g_vocab);
        double err = tu_rel_l2(logits + (size_t)(n - 1) * g_vocab, ref_last, (size_t)g_vocab);
        ck_assert_msg(err < 1e-4, "case %d: last logits relative L2 error %.3g", ci, err);

        /* argmax and first logits at every position */
        int32_t na;
        int32_t *ref_argmax = tu_json_ints(cJSON_GetObjectItem(rc, "argmax_each_pos"), &na);
        ck_assert_int_eq(na, n);
        cJSON *first8 = cJSON_GetObjectItem(rc, "logits_first8_each_pos");
        for (int32_t t = 0; t < n; t++) {
            const float *row = logits + (size_t)t * g_vocab;
            ck_assert_msg(ferry_argmax(row, g_vocab) == ref_argmax[t],
                          "case %d pos %d: argmax %d vs %d", ci, t, ferry_argmax(row, g_vocab),
                          ref_argmax[t]);
            int32_t n8;
            float *ref8 = tu_json_floats(cJSON_GetArrayItem(first8, t), &n8);
            tu_assert_close("first logits", row, ref8, (size_t)n8, 1e-3, 1e-3);
            free(ref8);
        }

        /* routing: the chosen experts at every layer and position, router logits close */
        cJSON *topk = cJSON_GetObjectItem(rc, "topk_experts");
        cJSON *router = cJSON_GetObjectItem(rc, "router_logits");
        for (int32_t l = 0; l < info.n_layers; l++)
            for (int32_t t = 0; t < n; t++) {
                int32_t nk;
                int32_t *ref_e = tu_json_ints(cJSON_GetArrayItem(cJSON_GetArrayItem(topk, l), t), &nk);
                ck_assert_int_eq(nk, r.k);
                for (int32_t j = 0; j < nk; j++)
                    ck_assert_msg(r.experts[((size_t)l * n + t) * r.k + j] == ref_e[j],
                                  "case %d layer %d pos %d slot %d: expert %d vs %d", ci, l, t, j,
                                  r.experts[((size_t)l * n + t) * r.k + j], ref_e[j]);
                free(ref_e);
                int32_t ne;
                float *ref_r = tu_json_floats(cJSON_GetArrayItem(cJSON_GetArrayItem(router, l), t), &ne);
                tu_assert_close("router logits", r.router + ((size_t)l * n + t) * r.n_experts,
                                ref_r, (size_t)ne, 1e-4, 1e-4);
                free(ref_r);
            }

        /* hidden states at the last position after every layer */
        cJSON *hid = cJSON_GetObjectItem(rc, "hidden_last_pos_each_layer");
        for (int32_t i = 0; i < cJSON_GetArraySize(hid); i++) {
            int32_t nd;
            float *ref_h = tu_json_floats(cJSON_GetArrayItem(hid, i), &nd);
            ck_assert_int_eq(nd, r.d);
            double he = tu_rel_l2(r.hidden + (size_t)i * r.d, ref_h, (size_t)nd);
            ck_assert_msg(he < 1e-5, "case %d hidden %d: relative L2 error %.3g", ci, i, he);
            free(ref_h);
        }

        ferry_context_free(c);
        free(ref_argmax);
        free(ref_last);
        free(logits);
        free(r.experts);
        free(r.router);
        free(r.hidden);
        free(ids);
    }
}
END_TEST

START_TEST(test_model_greedy_full_recompute)
{
    for (int ci = 0; ci < n_cases(); ci++) {
        cJSON *rc = ref_case(ci);
        int32_t n, n_greedy;
        int32_t *ids = tu_json_ints(cJSON_GetObjectItem(rc, "ids"), &n);
        int32_t *greedy = tu_json_ints(cJSON_GetObjectItem(rc, "greedy_ids"), &n_greedy);
        int32_t *seq = malloc(((size_t)n + n_greedy) * sizeof *seq);
        float *logits = malloc((size_t)g_vocab * sizeof *logits);
        ck_assert(seq && logits);
        memcpy(seq, ids, (size_t)n * sizeof *seq);
        ferry_context *c = new_context(0);
        for (int32_t i = 0; i < n_greedy; i++) {
            ferry_context_reset(c);
            ck_assert_int_eq(ferry_eval(c, seq, n + i, logits), FERRY_OK);
            seq[n + i] = ferry_argmax(logits, g_vocab);
            ck_assert_msg(seq[n + i] == greedy[i], "case %d step %d: %d vs %d", ci, i, seq[n + i],
                          greedy[i]);
        }
        ferry_context_free(c);
        free(seq);
        free(logits);
        free(ids);
        free(greedy);
    }
}
END_TEST

typedef struct {
    char text[4096];
    size_t len;
} text_sink;

static int collect(int32_t id, const char *text, size_t len, void *user)
{
    (void)id;
    text_sink *s = user;
    ck_assert(s->len + len < sizeof s->text);
    memcpy(s->text + s->len, text, len);
    s->len += len;
    s->text[s->len] = 0;
    return 0;
}

START_TEST(test_model_greedy_kv_cache)
{
    for (int ci = 0; ci < n_cases(); ci++) {
        cJSON *rc = ref_case(ci);
        int32_t n, n_greedy;
        int32_t *ids = tu_json_ints(cJSON_GetObjectItem(rc, "ids"), &n);
        int32_t *greedy = tu_json_ints(cJSON_GetObjectItem(rc, "greedy_ids"), &n_greedy);
        ferry_context *c = new_context(0);
        ferry_generate_params gp = ferry_generate_params_default();
        gp.n_predict = n_greedy;
        gp.stop_at_eos = 0;
        int32_t out[64], n_out;
        text_sink sink = {.len = 0};
        ck_assert_msg(ferry_generate(c, ids, n, &gp, collect, &sink, out, 64, &n_out) == FERRY_OK,
                      "%s", ferry_last_error());
        ck_assert_int_eq(n_out, n_greedy);
        for (int32_t i = 0; i < n_greedy; i++)
            ck_assert_msg(out[i] == greedy[i], "case %d step %d: %d vs %d", ci, i, out[i],
                          greedy[i]);
        /* the streamed text is the reference text after the prompt */
        const char *prompt = cJSON_GetObjectItem(rc, "prompt")->valuestring;
        const char *ref_text = cJSON_GetObjectItem(rc, "greedy_text")->valuestring;
        ck_assert_int_eq(strncmp(ref_text, prompt, strlen(prompt)), 0);
        ck_assert_str_eq(sink.text, ref_text + strlen(prompt));
        ferry_stats stats;
        ck_assert_int_eq(ferry_context_get_stats(c, &stats), FERRY_OK);
        ck_assert_int_eq(stats.n_prompt_tokens, n);
        ck_assert_int_eq(stats.n_decode_tokens, n_greedy - 1);
        ferry_context_free(c);
        free(ids);
        free(greedy);
    }
}
END_TEST

/* Prefill in one step, token by token, and in odd-sized chunks: bit-identical logits. */
START_TEST(test_model_chunking_is_bit_identical)
{
    cJSON *rc = ref_case(2);
    int32_t n;
    int32_t *ids = tu_json_ints(cJSON_GetObjectItem(rc, "ids"), &n);
    float *ref = malloc((size_t)n * g_vocab * sizeof(float));
    float *got = malloc((size_t)n * g_vocab * sizeof(float));
    ck_assert(ref && got);
    ferry_context *c = new_context(0);
    ck_assert_int_eq(ferry_context_forward(c, ids, n, ref, NULL), FERRY_OK);
    ferry_context_free(c);
    const int32_t batches[] = {1, 3, 7};
    for (size_t b = 0; b < sizeof batches / sizeof batches[0]; b++) {
        c = new_context(batches[b]);
        ck_assert_int_eq(ferry_context_forward(c, ids, n, got, NULL), FERRY_OK);
        ck_assert_msg(memcmp(ref, got, (size_t)n * g_vocab * sizeof(float)) == 0,
                      "n_batch %d differs from one-step prefill", batches[b]);
        ferry_context_free(c);
    }
    /* one token at a time through ferry_eval */
    c = new_context(0);
    for (int32_t t = 0; t < n; t++) {
        ck_assert_int_eq(ferry_eval(c, ids + t, 1, got), FERRY_OK);
        ck_assert_msg(memcmp(ref + (size_t)t * g_vocab, got, (size_t)g_vocab * sizeof(float)) == 0,
                      "decode at position %d differs from prefill", t);
    }
    ck_assert_int_eq(ferry_context_n_past(c), n);
    ferry_context_free(c);
    free(ref);
    free(got);
    free(ids);
}
END_TEST

START_TEST(test_model_context_overflow_is_an_error)
{
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = 8;
    ferry_context *c;
    ck_assert_int_eq(ferry_context_create(g_model, &cp, &c), FERRY_OK);
    int32_t ids[12] = {1, 438, 285, 837, 265, 820, 1843, 3805, 3791, 325, 13, 13};
    float *logits = malloc((size_t)g_vocab * sizeof(float));
    ck_assert_int_eq(ferry_eval(c, ids, 6, logits), FERRY_OK);
    ck_assert_int_eq(ferry_eval(c, ids, 3, logits), FERRY_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(ferry_last_error(), "context is full"));
    ck_assert_int_eq(ferry_context_n_past(c), 6); /* unchanged */
    ck_assert_int_eq(ferry_eval(c, ids, 2, logits), FERRY_OK);

    /* generation that cannot fit is refused before anything runs */
    ferry_generate_params gp = ferry_generate_params_default();
    gp.n_predict = 5;
    int32_t out[8], n_out = -1;
    ck_assert_int_eq(ferry_generate(c, ids, 6, &gp, NULL, NULL, out, 8, &n_out), FERRY_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(ferry_last_error(), "context holds 8"));
    ck_assert_int_eq(n_out, -1);
    gp.n_predict = 3; /* 6 + 3 - 1 = 8 positions: fits */
    ck_assert_int_eq(ferry_generate(c, ids, 6, &gp, NULL, NULL, out, 8, &n_out), FERRY_OK);
    ck_assert_int_eq(n_out, 3);

    /* bad ids and sizes */
    int32_t bad = g_vocab;
    ferry_context_reset(c);
    ck_assert_int_eq(ferry_eval(c, &bad, 1, logits), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_eval(c, ids, 0, logits), FERRY_ERR_INVALID);
    ferry_context_free(c);

    cp.n_ctx = 1 << 30;
    c = NULL;
    ck_assert_int_eq(ferry_context_create(g_model, &cp, &c), FERRY_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(ferry_last_error(), "max_position_embeddings"));
    ck_assert_ptr_null(c);
    free(logits);
}
END_TEST

START_TEST(test_model_sampling_is_seeded)
{
    cJSON *rc = ref_case(0);
    int32_t n;
    int32_t *ids = tu_json_ints(cJSON_GetObjectItem(rc, "ids"), &n);
    int32_t a[24], b[24], g[24], n_a, n_b, n_g;
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = 128;
    cp.temperature = 1.0f;
    cp.top_k = 40;
    cp.top_p = 0.9f;
    cp.seed = 1234;
    ferry_generate_params gp = ferry_generate_params_default();
    gp.n_predict = 24;
    gp.stop_at_eos = 0;
    ferry_context *c;
    ck_assert_int_eq(ferry_context_create(g_model, &cp, &c), FERRY_OK);
    ck_assert_int_eq(ferry_generate(c, ids, n, &gp, NULL, NULL, a, 24, &n_a), FERRY_OK);
    ferry_context_free(c);
    ck_assert_int_eq(ferry_context_create(g_model, &cp, &c), FERRY_OK);
    ck_assert_int_eq(ferry_generate(c, ids, n, &gp, NULL, NULL, b, 24, &n_b), FERRY_OK);
    ferry_context_free(c);
    ck_assert_int_eq(n_a, 24);
    ck_assert_int_eq(n_b, 24);
    ck_assert_mem_eq(a, b, sizeof a);
    /* at temperature 1 it wanders off the greedy path */
    cp.temperature = 0;
    ck_assert_int_eq(ferry_context_create(g_model, &cp, &c), FERRY_OK);
    ck_assert_int_eq(ferry_generate(c, ids, n, &gp, NULL, NULL, g, 24, &n_g), FERRY_OK);
    ferry_context_free(c);
    ck_assert_msg(memcmp(a, g, sizeof a) != 0, "sampling at T=1 reproduced greedy decoding");
    free(ids);
}
END_TEST

static Suite *model_suite(void)
{
    Suite *s = suite_create("model");
    TCase *tc = tcase_create("tiny-moe-code");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_model_tokenize_matches_fixture);
    tcase_add_test(tc, test_model_prefill_matches_reference);
    tcase_add_test(tc, test_model_greedy_full_recompute);
    tcase_add_test(tc, test_model_greedy_kv_cache);
    tcase_add_test(tc, test_model_chunking_is_bit_identical);
    tcase_add_test(tc, test_model_context_overflow_is_an_error);
    tcase_add_test(tc, test_model_sampling_is_seeded);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(model_suite()); }
