/*
 * tests/test_batch.c: batch generation on the bundled model. Reordered and arrival order
 * give bit-identical tokens, equal to generating each prompt alone, resident and offloaded;
 * on 32 mixed prompts reordering loads fewer experts per layer-batch than arrival order.
 */
#include <check.h>
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check_util.h"
#include "engine/context.h"
#include "engine/model.h"
#include "ferry.h"

#define MODEL_DIR FERRY_SOURCE_DIR "/models/tiny-moe-code"
#define PROMPTS FERRY_SOURCE_DIR "/tests/fixtures/batch-prompts.jsonl"
#define MAX_PROMPTS 64
#define N_PREDICT 20

/* The CPU reference backend, whatever the machine has (test_cuda covers the GPU). */
static ferry_model_params cpu_params(void)
{
    ferry_model_params p = ferry_model_params_default();
    p.backend = FERRY_BACKEND_CPU;
    return p;
}

typedef struct {
    int32_t n;
    int32_t *ids[MAX_PROMPTS];
    int32_t n_ids[MAX_PROMPTS];
    int32_t n_predict[MAX_PROMPTS];
    int32_t *out[MAX_PROMPTS];
    int32_t n_out[MAX_PROMPTS];
} work;

/* The fixture's prompts, tokenized with BOS; each generates N_PREDICT tokens. */
static void load_work(ferry_model *m, work *w)
{
    size_t len;
    char *text = tu_read_file(PROMPTS, &len);
    ck_assert_ptr_nonnull(text);
    memset(w, 0, sizeof *w);
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        cJSON *o = cJSON_Parse(line);
        ck_assert_ptr_nonnull(o);
        const char *p = cJSON_GetObjectItem(o, "prompt")->valuestring;
        int32_t n = 0;
        ferry_tokenize(m, p, strlen(p), 1, NULL, 0, &n);
        ck_assert(w->n < MAX_PROMPTS);
        w->ids[w->n] = malloc((size_t)n * sizeof(int32_t));
        ck_assert_int_eq(ferry_tokenize(m, p, strlen(p), 1, w->ids[w->n], n, &n), FERRY_OK);
        w->n_ids[w->n] = n;
        w->n_predict[w->n] = N_PREDICT;
        w->out[w->n] = malloc(N_PREDICT * sizeof(int32_t));
        w->n++;
        cJSON_Delete(o);
    }
    free(text);
}

static void free_work(work *w)
{
    for (int32_t i = 0; i < w->n; i++) {
        free(w->ids[i]);
        free(w->out[i]);
    }
}

static ferry_batch_stats run_batch(ferry_model *m, work *w, int reorder, int32_t max_batch,
                                   int32_t chunk, int64_t *loads)
{
    ferry_batch_params p = ferry_batch_params_default();
    p.reorder = reorder;
    p.max_batch = max_batch;
    p.chunk = chunk;
    p.stop_at_eos = 0;
    ferry_batch_stats s;
    ferry_status st = ferry_batch_generate(m, (const int32_t *const *)w->ids, w->n_ids,
                                           w->n_predict, w->n, &p, w->out, w->n_out, &s, loads);
    ck_assert_msg(st == FERRY_OK, "%s", ferry_last_error());
    return s;
}

static void assert_same_outputs(const work *a, const work *b, const char *what)
{
    for (int32_t i = 0; i < a->n; i++) {
        ck_assert_msg(a->n_out[i] == b->n_out[i], "%s: prompt %d: %d vs %d tokens", what, (int)i,
                      (int)a->n_out[i], (int)b->n_out[i]);
        ck_assert_msg(!memcmp(a->out[i], b->out[i], (size_t)a->n_out[i] * sizeof(int32_t)),
                      "%s: prompt %d differs", what, (int)i);
    }
}

START_TEST(test_reordering_is_lossless_and_loads_fewer_experts)
{
    ferry_model *m = NULL;
    ferry_model_params mp = cpu_params();
    ck_assert_int_eq(ferry_model_open(MODEL_DIR, &mp, &m), FERRY_OK);
    work ro, ar;
    load_work(m, &ro);
    load_work(m, &ar);
    ck_assert_int_eq(ro.n, 32);
    int64_t loads_ro[16], loads_ar[16];
    ferry_batch_stats s_ro = run_batch(m, &ro, 1, 8, 16, loads_ro);
    ferry_batch_stats s_ar = run_batch(m, &ar, 0, 8, 16, loads_ar);
    assert_same_outputs(&ro, &ar, "reordered vs arrival order");
    ck_assert_int_eq(s_ro.layer_batches, s_ar.layer_batches);
    ck_assert_int_eq(s_ro.tokens, s_ar.tokens);
    printf("32 prompts, layer-batches of 8: %lld expert loads reordered, %lld in arrival order "
           "(%.2f vs %.2f per layer-batch)\n",
           (long long)s_ro.expert_loads, (long long)s_ar.expert_loads,
           (double)s_ro.expert_loads / (double)s_ro.layer_batches,
           (double)s_ar.expert_loads / (double)s_ar.layer_batches);
    /* measured: 3366 vs 5184 with 20-token runs of 32 tokens; every layer must gain */
    ck_assert(s_ro.expert_loads * 10 < s_ar.expert_loads * 8);
    for (int32_t l = 0; l < 6; l++)
        ck_assert_int_lt(loads_ro[l], loads_ar[l]);

    /* each prompt alone, through ferry_generate, gives the same tokens */
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = 256;
    ferry_context *c = NULL;
    ck_assert_int_eq(ferry_context_create(m, &cp, &c), FERRY_OK);
    ferry_generate_params gp = ferry_generate_params_default();
    gp.n_predict = N_PREDICT;
    gp.stop_at_eos = 0;
    for (int32_t i = 0; i < ro.n; i++) {
        int32_t ids[N_PREDICT], n = 0;
        ck_assert_int_eq(ferry_generate(c, ro.ids[i], ro.n_ids[i], &gp, NULL, NULL, ids,
                                        N_PREDICT, &n),
                         FERRY_OK);
        ck_assert_int_eq(n, ro.n_out[i]);
        ck_assert_msg(!memcmp(ids, ro.out[i], (size_t)n * sizeof(int32_t)),
                      "prompt %d alone differs from the batch", (int)i);
    }
    ferry_context_free(c);
    free_work(&ro);
    free_work(&ar);
    ferry_model_close(m);
}
END_TEST

START_TEST(test_batch_shapes_and_offload_give_the_same_tokens)
{
    ferry_model *m = NULL;
    ferry_model_params mp = cpu_params();
    ck_assert_int_eq(ferry_model_open(MODEL_DIR, &mp, &m), FERRY_OK);
    work ref;
    load_work(m, &ref);
    run_batch(m, &ref, 0, 16, 64, NULL);
    ferry_model_close(m);

    /* other layer-batch and chunk sizes, an expert cache smaller than one layer's experts
     * on the RAM and NVMe tiers (every miss fetched), and hybrid execution (misses split
     * between fetching and the CPU, or every expert on the CPU) */
    const struct {
        int32_t max_batch, chunk, slots, nvme, hybrid;
    } cases[] = {{1, 1, 0, 0, FERRY_HYBRID_OFF},         {3, 5, 0, 0, FERRY_HYBRID_OFF},
                 {8, 16, 2, 0, FERRY_HYBRID_OFF},        {8, 16, 5, 1, FERRY_HYBRID_OFF},
                 {64, 64, 12, 0, FERRY_HYBRID_OFF},      {8, 16, 3, 0, FERRY_HYBRID_AUTO},
                 {8, 16, 0, 0, FERRY_HYBRID_CPU_EXPERTS}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        ferry_model_params mp = ferry_model_params_default();
        mp.backend = FERRY_BACKEND_CPU; /* the reference; test_cuda covers the GPU */
        mp.hybrid = cases[ci].hybrid;
        char pack[4096];
        if (cases[ci].slots) {
            mp.gpu_mem_bytes = 64ull << 20;
            mp.max_slots = cases[ci].slots;
            if (cases[ci].nvme) {
                tu_scratch_dir(pack, "batch");
                strcat(pack, "/tiny.pack");
                ck_assert_int_eq(ferry_pack_model(MODEL_DIR, pack, NULL), FERRY_OK);
                mp.offload = FERRY_OFFLOAD_NVME;
                mp.pack_path = pack;
            }
        }
        ck_assert_msg(ferry_model_open(MODEL_DIR, &mp, &m) == FERRY_OK, "%s", ferry_last_error());
        work w;
        load_work(m, &w);
        int reorder = (int)(ci % 2 == 0);
        ferry_batch_stats s = run_batch(m, &w, reorder, cases[ci].max_batch, cases[ci].chunk, NULL);
        char what[64];
        snprintf(what, sizeof what, "case %zu", ci);
        assert_same_outputs(&ref, &w, what);
        if (cases[ci].hybrid == FERRY_HYBRID_CPU_EXPERTS) {
            ck_assert(s.cpu_experts > 0);
            ck_assert_int_eq(s.cpu_experts, s.expert_loads); /* every load ran on the CPU */
            ck_assert_int_eq(s.hits + s.misses, 0);
        } else if (cases[ci].hybrid == FERRY_HYBRID_OFF) {
            ck_assert_int_eq(s.cpu_experts, 0);
        }
        if (cases[ci].slots && cases[ci].hybrid == FERRY_HYBRID_OFF) {
            ck_assert(s.misses > 0 && s.bytes_to_device > 0);
            ck_assert_int_eq(s.bytes_to_device % s.expert_bytes, 0);
        }
        free_work(&w);
        ferry_model_close(m);
    }
    free_work(&ref);
}
END_TEST

/* The per-sequence contexts hold only the attention half and the shared MoE context only
 * the MoE block: each takes less of the device than a whole context, the halves add up to
 * one whole, and the missing half refuses to run. */
START_TEST(test_batch_contexts_hold_only_their_half)
{
    ferry_model_params mp = cpu_params();
    ferry_model *m = NULL;
    ck_assert_int_eq(ferry_model_open(MODEL_DIR, &mp, &m), FERRY_OK);
    ferry_backend *be = m->be;
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = 256;
    cp.n_batch = 16;
    size_t used[3];
    const unsigned parts[3] = {FERRY_CONTEXT_ATTENTION | FERRY_CONTEXT_MOE,
                               FERRY_CONTEXT_ATTENTION, FERRY_CONTEXT_MOE};
    for (int i = 0; i < 3; i++) {
        size_t before = be->ops->mem_used(be);
        ferry_context *c = NULL;
        ck_assert_int_eq(ferry_context_create_parts(m, &cp, parts[i], &c), FERRY_OK);
        used[i] = be->ops->mem_used(be) - before;
        int32_t id = 1;
        if (parts[i] == FERRY_CONTEXT_ATTENTION) {
            ck_assert_int_eq(ferry_context_embed(c, &id, 1), FERRY_OK);
            ck_assert_int_eq(ferry_context_attention(c, 0, 1), FERRY_OK);
            ck_assert_int_eq(ferry_context_moe(c, 0, 1), FERRY_ERR_INVALID);
        } else if (parts[i] == FERRY_CONTEXT_MOE) {
            float row[192] = {0}; /* the bundled model's hidden size */
            row[0] = 1.0f;
            ck_assert_int_eq(be->ops->upload(be, c->d_h, row, sizeof row), FERRY_OK);
            ck_assert_int_eq(be->ops->upload(be, c->d_x, row, sizeof row), FERRY_OK);
            ck_assert_int_eq(ferry_context_attention(c, 0, 1), FERRY_ERR_INVALID);
            ck_assert_int_eq(ferry_context_moe(c, 0, 1), FERRY_OK);
        }
        ferry_context_free(c);
    }
    ck_assert_uint_lt(used[1], used[0]);
    ck_assert_uint_lt(used[2], used[0]);
    /* the buffers every context has (residual, norm, routing, logits) count in both halves */
    ck_assert_uint_gt(used[1] + used[2], used[0]);
    ferry_context *c = NULL;
    ck_assert_int_eq(ferry_context_create_parts(m, &cp, 0, &c), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_context_create_parts(m, &cp, 4, &c), FERRY_ERR_INVALID);
    ck_assert_ptr_null(c);
    ferry_model_close(m);
}
END_TEST

START_TEST(test_batch_errors)
{
    ferry_model *m = NULL;
    ferry_model_params mp = cpu_params();
    ck_assert_int_eq(ferry_model_open(MODEL_DIR, &mp, &m), FERRY_OK);
    int32_t ids[] = {1, 100, 5000};
    const int32_t *prompts[] = {ids};
    int32_t n_ids = 2, n_pred = 4, out[4], n_out;
    int32_t *outs[] = {out};
    ferry_batch_params p = ferry_batch_params_default();
    ck_assert_int_eq(ferry_batch_generate(m, prompts, &n_ids, &n_pred, 0, &p, outs, &n_out, NULL,
                                          NULL),
                     FERRY_ERR_INVALID);
    n_ids = 3; /* 5000 is outside the 4096-token vocabulary */
    ck_assert_int_eq(ferry_batch_generate(m, prompts, &n_ids, &n_pred, 1, &p, outs, &n_out, NULL,
                                          NULL),
                     FERRY_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(ferry_last_error(), "5000"));
    n_ids = 2;
    p.max_batch = 0;
    ck_assert_int_eq(ferry_batch_generate(m, prompts, &n_ids, &n_pred, 1, &p, outs, &n_out, NULL,
                                          NULL),
                     FERRY_ERR_INVALID);
    p = ferry_batch_params_default();
    n_pred = 5000; /* past the 4096 positions */
    ck_assert_int_eq(ferry_batch_generate(m, prompts, &n_ids, &n_pred, 1, &p, outs, &n_out, NULL,
                                          NULL),
                     FERRY_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(ferry_last_error(), "positions"));
    n_pred = 0; /* nothing to generate: nothing runs */
    ck_assert_int_eq(ferry_batch_generate(m, prompts, &n_ids, &n_pred, 1, &p, outs, &n_out, NULL,
                                          NULL),
                     FERRY_OK);
    ck_assert_int_eq(n_out, 0);
    ferry_model_close(m);
}
END_TEST

static Suite *batch_suite(void)
{
    Suite *s = suite_create("batch");
    TCase *tc = tcase_create("batch");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_reordering_is_lossless_and_loads_fewer_experts);
    tcase_add_test(tc, test_batch_shapes_and_offload_give_the_same_tokens);
    tcase_add_test(tc, test_batch_contexts_hold_only_their_half);
    tcase_add_test(tc, test_batch_errors);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(batch_suite()); }
