/*
 * tests/test_batcher.c: continuous batching (engine/batcher.h) on the bundled model.
 * Sequences that join and leave between steps, sampled or greedy, with a step budget and
 * the expert-aware choice of prompt chunks or arrival order, give the tokens each prompt
 * gives alone through ferry_generate; a cancelled sequence frees its slot without touching
 * the others; no pending prompt waits past the bound; a slot's context end finishes a
 * sequence; bad additions are refused with the reason.
 */
#include <check.h>
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check_util.h"
#include "engine/batcher.h"
#include "ferry.h"

#define MODEL_DIR FERRY_SOURCE_DIR "/models/tiny-moe-code"
#define PROMPTS FERRY_SOURCE_DIR "/tests/fixtures/batch-prompts.jsonl"
#define N_PROMPTS 32
#define MAX_GEN 24

typedef struct {
    int32_t *ids[N_PROMPTS];
    int32_t n_ids[N_PROMPTS];
    ferry_seq_params sp[N_PROMPTS];
    int32_t ref[N_PROMPTS][MAX_GEN]; /* each prompt alone */
    int32_t n_ref[N_PROMPTS];
} work;

static ferry_model *open_cpu(void)
{
    ferry_model_params mp = ferry_model_params_default();
    mp.backend = FERRY_BACKEND_CPU; /* the reference; test_cuda covers the GPU */
    ferry_model *m = NULL;
    ck_assert_msg(ferry_model_open(MODEL_DIR, &mp, &m) == FERRY_OK, "%s", ferry_last_error());
    return m;
}

/* The fixture's prompts (the odd ones repeated three times over, so prompts run past one
 * chunk); every third greedy, the others sampled with their own seed; token budgets from 1
 * to MAX_GEN; the reference tokens of each prompt alone. */
static void load_work(ferry_model *m, work *w)
{
    size_t len;
    char *text = tu_read_file(PROMPTS, &len);
    ck_assert_ptr_nonnull(text);
    memset(w, 0, sizeof *w);
    int32_t i = 0;
    for (char *line = strtok(text, "\n"); line && i < N_PROMPTS; line = strtok(NULL, "\n")) {
        cJSON *o = cJSON_Parse(line);
        ck_assert_ptr_nonnull(o);
        const char *p = cJSON_GetObjectItem(o, "prompt")->valuestring;
        char buf[4096];
        snprintf(buf, sizeof buf, i % 2 ? "%s\n%s\n%s" : "%s", p, p, p);
        int32_t n = 0;
        ferry_tokenize(m, buf, strlen(buf), 1, NULL, 0, &n);
        w->ids[i] = malloc((size_t)n * sizeof(int32_t));
        ck_assert_int_eq(ferry_tokenize(m, buf, strlen(buf), 1, w->ids[i], n, &n), FERRY_OK);
        w->n_ids[i] = n;
        w->sp[i] = (ferry_seq_params){.temperature = i % 3 == 0 ? 0.0f : 0.9f, .top_k = 40,
                                      .top_p = 0.95f, .seed = 1000u + (uint64_t)i,
                                      .max_tokens = 1 + (i * 7) % MAX_GEN, .stop_at_eos = 1};
        cJSON_Delete(o);
        i++;
    }
    free(text);
    ck_assert_int_eq(i, N_PROMPTS);
    for (i = 0; i < N_PROMPTS; i++) {
        ferry_context_params cp = ferry_context_params_default();
        cp.n_ctx = 512;
        cp.temperature = w->sp[i].temperature;
        cp.top_k = w->sp[i].top_k;
        cp.top_p = w->sp[i].top_p;
        cp.seed = w->sp[i].seed;
        ferry_context *c = NULL;
        ck_assert_int_eq(ferry_context_create(m, &cp, &c), FERRY_OK);
        ferry_generate_params gp = ferry_generate_params_default();
        gp.n_predict = w->sp[i].max_tokens;
        ck_assert_int_eq(ferry_generate(c, w->ids[i], w->n_ids[i], &gp, NULL, NULL, w->ref[i],
                                        MAX_GEN, &w->n_ref[i]),
                         FERRY_OK);
        ferry_context_free(c);
    }
}

static void free_work(work *w)
{
    for (int32_t i = 0; i < N_PROMPTS; i++)
        free(w->ids[i]);
}

typedef struct {
    int32_t out[N_PROMPTS][MAX_GEN];
    int32_t n_out[N_PROMPTS];
    int32_t finish[N_PROMPTS];
    int32_t added_step[N_PROMPTS], first_step[N_PROMPTS];
    ferry_batcher_stats stats;
} result;

/* Runs the prompts through a batcher of max_seqs slots: one more prompt joins each step
 * while a slot is free (arrivals spread over time); cancel_at >= 0 cancels that prompt
 * after its first token. */
static void run(ferry_model *m, const work *w, const ferry_batcher_params *bp, int cancel_at,
                result *r)
{
    ferry_batcher *b = NULL;
    ck_assert_msg(ferry_batcher_create(m, bp, &b) == FERRY_OK, "%s", ferry_last_error());
    memset(r, 0, sizeof *r);
    int32_t slot_seq[64], next = 0, step = 0;
    ferry_batcher_event ev[64];
    while (next < N_PROMPTS || ferry_batcher_active(b) > 0) {
        if (next < N_PROMPTS && ferry_batcher_free_slots(b) > 0) {
            int32_t slot = -1;
            ck_assert_int_eq(ferry_batcher_add(b, w->ids[next], w->n_ids[next], &w->sp[next],
                                               &slot),
                             FERRY_OK);
            slot_seq[slot] = next;
            r->added_step[next] = step;
            r->first_step[next] = -1;
            next++;
        }
        int32_t n_ev = 0;
        ck_assert_msg(ferry_batcher_step(b, ev, &n_ev) == FERRY_OK, "%s", ferry_last_error());
        step++;
        for (int32_t j = 0; j < n_ev; j++) {
            int32_t i = slot_seq[ev[j].slot];
            ck_assert_int_lt(r->n_out[i], MAX_GEN);
            if (r->n_out[i] == 0)
                r->first_step[i] = step;
            r->out[i][r->n_out[i]++] = ev[j].token;
            r->finish[i] = ev[j].finish;
            if (i == cancel_at && !ev[j].finish) {
                ferry_batcher_cancel(b, ev[j].slot);
                ferry_batcher_cancel(b, ev[j].slot); /* twice: ignored */
            }
        }
    }
    ferry_batcher_get_stats(b, &r->stats);
    ferry_batcher_free(b);
}

static void assert_matches(const work *w, const result *r, int cancel_at, const char *what)
{
    for (int32_t i = 0; i < N_PROMPTS; i++) {
        if (i == cancel_at) {
            ck_assert_int_eq(r->n_out[i], 1);
            ck_assert_int_eq(r->out[i][0], w->ref[i][0]);
            continue;
        }
        ck_assert_msg(r->n_out[i] == w->n_ref[i], "%s: prompt %d: %d tokens, alone %d", what,
                      (int)i, (int)r->n_out[i], (int)w->n_ref[i]);
        ck_assert_msg(!memcmp(r->out[i], w->ref[i], (size_t)r->n_out[i] * sizeof(int32_t)),
                      "%s: prompt %d differs from the prompt alone", what, (int)i);
        ck_assert_int_ne(r->finish[i], FERRY_FINISH_NONE);
    }
}

START_TEST(test_joining_and_leaving_is_lossless)
{
    ferry_model *m = open_cpu();
    static work w;
    load_work(m, &w);
    static result r;
    const struct {
        int32_t max_seqs, chunk, step_tokens, select, reorder, max_batch;
    } cases[] = {{4, 8, 12, 1, 1, 8}, {4, 8, 12, 0, 0, 8}, {6, 5, 0, 1, 1, 16},
                 {3, 64, 20, 1, 1, 4}, {8, 16, 8, 1, 0, 32}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        ferry_batcher_params bp = ferry_batcher_params_default();
        bp.max_seqs = cases[c].max_seqs;
        bp.n_ctx = 256;
        bp.chunk = cases[c].chunk;
        bp.step_tokens = cases[c].step_tokens;
        bp.select = cases[c].select;
        bp.reorder = cases[c].reorder;
        bp.max_batch = cases[c].max_batch;
        int cancel_at = c == 0 ? 5 : -1;
        run(m, &w, &bp, cancel_at, &r);
        char what[64];
        snprintf(what, sizeof what, "case %zu", c);
        assert_matches(&w, &r, cancel_at, what);
        ck_assert_int_gt(r.stats.steps, 0);
        ck_assert_int_gt(r.stats.step_experts, 0);
        ck_assert(r.stats.predicted > 0 && r.stats.predicted_hits <= r.stats.predicted);
        if (bp.step_tokens > 0 && bp.step_tokens < bp.chunk * bp.max_seqs)
            ck_assert_int_gt(r.stats.selected_steps, 0);
        /* the choice stands only where it is estimated to beat arrival order */
        ck_assert_int_le(r.stats.step_experts_planned, r.stats.step_experts_arrival);
        if (!bp.select)
            ck_assert_int_eq(r.stats.step_experts_planned, r.stats.step_experts_arrival);
        printf("%s: %lld steps, %.2f distinct experts per step; %lld steps choosing prompt "
               "chunks: estimated %lld experts for the choice, %lld in arrival order\n", what,
               (long long)r.stats.steps, (double)r.stats.step_experts / (double)r.stats.steps,
               (long long)r.stats.selected_steps, (long long)r.stats.step_experts_planned,
               (long long)r.stats.step_experts_arrival);
    }
    free_work(&w);
    ferry_model_close(m);
}
END_TEST

/* With a budget that fits one chunk beside the decode tokens, prompts compete every step:
 * none is passed over more than max_wait steps in a row. */
START_TEST(test_no_prompt_starves)
{
    ferry_model *m = open_cpu();
    static work w;
    load_work(m, &w);
    static result r;
    ferry_batcher_params bp = ferry_batcher_params_default();
    bp.max_seqs = 8;
    bp.n_ctx = 256;
    bp.chunk = 8;
    bp.step_tokens = 9;
    bp.max_wait = 3;
    run(m, &w, &bp, -1, &r);
    assert_matches(&w, &r, -1, "budget 9");
    ck_assert_int_gt(r.stats.selected_steps, 0);
    ck_assert_int_gt(r.stats.max_waited, 0); /* prompts were passed over, */
    ck_assert_int_le(r.stats.max_waited, bp.max_wait); /* never more than the bound */
    for (int32_t i = 0; i < N_PROMPTS; i++) /* and each reached its first token */
        ck_assert_int_gt(r.first_step[i], r.added_step[i]);
    free_work(&w);
    ferry_model_close(m);
}
END_TEST

START_TEST(test_context_end_and_bad_additions)
{
    ferry_model *m = open_cpu();
    int32_t prompt[6];
    int32_t n = 0;
    ck_assert_int_eq(ferry_tokenize(m, "def f(x):", 9, 1, prompt, 6, &n), FERRY_OK);
    ferry_batcher_params bp = ferry_batcher_params_default();
    bp.max_seqs = 2;
    bp.n_ctx = n + 3; /* room to feed 3 generated tokens back: 4 come out */
    ferry_batcher *b = NULL;
    ck_assert_int_eq(ferry_batcher_create(m, &bp, &b), FERRY_OK);
    ferry_seq_params sp = {.top_p = 1, .max_tokens = 100, .stop_at_eos = 0};
    int32_t slot = -1;
    ck_assert_int_eq(ferry_batcher_add(b, prompt, n, &sp, &slot), FERRY_OK);
    ferry_batcher_event ev[2];
    int32_t n_ev, got = 0, finish = 0;
    while (ferry_batcher_active(b) > 0) {
        ck_assert_int_eq(ferry_batcher_step(b, ev, &n_ev), FERRY_OK);
        got += n_ev;
        if (n_ev)
            finish = ev[0].finish;
    }
    ck_assert_int_eq(got, 4);
    ck_assert_int_eq(finish, FERRY_FINISH_LENGTH);

    /* refusals, each naming its reason */
    int32_t bad[2] = {prompt[0], 999999};
    ck_assert_int_eq(ferry_batcher_add(b, bad, 2, &sp, &slot), FERRY_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(ferry_last_error(), "999999"));
    ck_assert_int_eq(ferry_batcher_add(b, prompt, 0, &sp, &slot), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_batcher_add(b, prompt, n + 4, &sp, &slot), FERRY_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(ferry_last_error(), "context"));
    ferry_seq_params hot = sp;
    hot.temperature = -1;
    ck_assert_int_eq(ferry_batcher_add(b, prompt, n, &hot, &slot), FERRY_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(ferry_last_error(), "temperature"));
    ck_assert_int_eq(ferry_batcher_add(b, prompt, n, &sp, &slot), FERRY_OK);
    ck_assert_int_eq(ferry_batcher_add(b, prompt, n, &sp, &slot), FERRY_OK);
    ck_assert_int_eq(ferry_batcher_free_slots(b), 0);
    ck_assert_int_eq(ferry_batcher_add(b, prompt, n, &sp, &slot), FERRY_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(ferry_last_error(), "slots"));
    ferry_batcher_cancel(b, 0);
    ferry_batcher_cancel(b, 1);
    ferry_batcher_cancel(b, 7); /* out of range: ignored */
    ck_assert_int_eq(ferry_batcher_active(b), 0);
    ck_assert_int_eq(ferry_batcher_step(b, ev, &n_ev), FERRY_OK);
    ck_assert_int_eq(n_ev, 0);
    ferry_batcher_free(b);

    bp.n_ctx = 1 << 30;
    ck_assert_int_eq(ferry_batcher_create(m, &bp, &b), FERRY_ERR_INVALID);
    bp.n_ctx = 64;
    bp.max_seqs = 0;
    ck_assert_int_eq(ferry_batcher_create(m, &bp, &b), FERRY_ERR_INVALID);
    ferry_model_close(m);
}
END_TEST

static Suite *batcher_suite(void)
{
    Suite *s = suite_create("batcher");
    TCase *tc = tcase_create("batcher");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_joining_and_leaving_is_lossless);
    tcase_add_test(tc, test_no_prompt_starves);
    tcase_add_test(tc, test_context_end_and_bad_additions);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(batcher_suite()); }
