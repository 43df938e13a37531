/*
 * tests/test_perplexity.c: ferry_perplexity on the bundled model. The mean negative
 * log-likelihood against an independent computation from token-by-token decode logits,
 * every text token scored exactly once whatever the window, held-out code scoring far
 * better than random letters, the same figure with experts offloaded or on the CPU, and
 * bad arguments.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check_util.h"
#include "ferry.h"

#define MODEL_DIR FERRY_SOURCE_DIR "/models/tiny-moe-code"
#define HELDOUT FERRY_SOURCE_DIR "/tests/fixtures/heldout-python.txt"
#define SHORT "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"

static ferry_model *open_cpu(int32_t hybrid, uint64_t gpu_mem)
{
    ferry_model_params mp = ferry_model_params_default();
    mp.backend = FERRY_BACKEND_CPU;
    mp.n_threads = 2;
    mp.hybrid = hybrid;
    mp.gpu_mem_bytes = gpu_mem;
    ferry_model *m;
    ck_assert_msg(ferry_model_open(MODEL_DIR, &mp, &m) == FERRY_OK, "%s", ferry_last_error());
    return m;
}

START_TEST(test_perplexity_matches_decode_logits)
{
    ferry_model *m = open_cpu(FERRY_HYBRID_OFF, 0);
    ferry_model_info info;
    ferry_model_get_info(m, &info);
    int32_t ids[256], n;
    ck_assert_int_eq(ferry_tokenize(m, SHORT, strlen(SHORT), 1, ids, 256, &n), FERRY_OK);
    ck_assert_int_eq(ids[0], info.bos_id);
    ck_assert(n > 8);
    /* reference: BOS then each token fed one at a time; log-softmax written out here */
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = 256;
    ferry_context *c;
    ck_assert_int_eq(ferry_context_create(m, &cp, &c), FERRY_OK);
    float *logits = malloc((size_t)info.n_vocab * sizeof(float));
    double ref = 0;
    for (int32_t p = 0; p + 1 < n; p++) {
        ck_assert_int_eq(ferry_eval(c, &ids[p], 1, logits), FERRY_OK);
        double mx = -INFINITY, sum = 0;
        for (int32_t v = 0; v < info.n_vocab; v++)
            mx = fmax(mx, logits[v]);
        for (int32_t v = 0; v < info.n_vocab; v++)
            sum += exp(logits[v] - mx);
        ref += -(logits[ids[p + 1]] - mx - log(sum));
    }
    ref /= n - 1;
    ferry_context_free(c);
    free(logits);

    ferry_perplexity_result r;
    ck_assert_int_eq(ferry_perplexity(m, SHORT, strlen(SHORT), 256, &r), FERRY_OK);
    ck_assert_int_eq(r.n_scored, n - 1);
    ck_assert_int_eq(r.n_windows, 1);
    ck_assert_int_eq(r.window, 256);
    ck_assert_msg(fabs(r.nll - ref) <= 1e-9 * ref, "nll %.12f, decode reference %.12f", r.nll,
                  ref);
    ck_assert(fabs(r.perplexity - exp(ref)) <= 1e-9 * exp(ref));
    ferry_model_close(m);
}
END_TEST

START_TEST(test_perplexity_scores_each_token_once)
{
    ferry_model *m = open_cpu(FERRY_HYBRID_OFF, 0);
    size_t len;
    char *text = tu_read_file(HELDOUT, &len);
    text[4000] = '\0'; /* a few windows' worth, quick */
    len = 4000;
    int32_t n_ids;
    ck_assert_int_eq(ferry_tokenize(m, text, len, 0, NULL, 0, &n_ids), FERRY_ERR_INVALID);
    ck_assert(n_ids > 300);
    const int32_t windows[] = {2, 9, 64, 257, 4096};
    for (size_t i = 0; i < sizeof windows / sizeof windows[0]; i++) {
        ferry_perplexity_result r;
        ck_assert_msg(ferry_perplexity(m, text, len, windows[i], &r) == FERRY_OK, "%s",
                      ferry_last_error());
        ck_assert_int_eq(r.n_scored, n_ids);
        ck_assert_int_eq(r.n_windows, (n_ids + windows[i] - 2) / (windows[i] - 1));
        ck_assert(isfinite(r.perplexity) && r.perplexity > 1);
    }
    free(text);
    ferry_model_close(m);
}
END_TEST

START_TEST(test_perplexity_prefers_code_to_noise)
{
    ferry_model *m = open_cpu(FERRY_HYBRID_OFF, 0);
    size_t len;
    char *text = tu_read_file(HELDOUT, &len);
    len = 6000;
    char *noise = malloc(len);
    uint64_t rng = 7;
    for (size_t i = 0; i < len; i++)
        noise[i] = i % 7 == 6 ? ' ' : (char)('a' + tu_rand_u64(&rng) % 26);
    ferry_perplexity_result code, junk;
    ck_assert_int_eq(ferry_perplexity(m, text, len, 256, &code), FERRY_OK);
    ck_assert_int_eq(ferry_perplexity(m, noise, len, 256, &junk), FERRY_OK);
    printf("perplexity, window 256: held-out code %.3f, random letters %.3f\n", code.perplexity,
           junk.perplexity);
    ck_assert(code.perplexity > 1 && code.perplexity < 100);
    ck_assert(junk.perplexity > 4 * code.perplexity);
    /* experts offloaded, or computed by the hybrid CPU worker: the same figure, bit for bit */
    ferry_model *m2 = open_cpu(FERRY_HYBRID_CPU_EXPERTS, 20ull << 20);
    ferry_perplexity_result cpu;
    ck_assert_int_eq(ferry_perplexity(m2, text, len, 256, &cpu), FERRY_OK);
    ck_assert(cpu.nll == code.nll && cpu.n_scored == code.n_scored);
    ferry_model_close(m2);
    free(noise);
    free(text);
    ferry_model_close(m);
}
END_TEST

START_TEST(test_perplexity_bad_arguments)
{
    ferry_model *m = open_cpu(FERRY_HYBRID_OFF, 0);
    ferry_perplexity_result r;
    ck_assert_int_eq(ferry_perplexity(m, SHORT, strlen(SHORT), 1, &r), FERRY_ERR_INVALID);
    ck_assert(strstr(ferry_last_error(), "window of 1 tokens") != NULL);
    ck_assert_int_eq(ferry_perplexity(m, SHORT, strlen(SHORT), 4097, &r), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_perplexity(m, "", 0, 64, &r), FERRY_ERR_INVALID);
    ck_assert(strstr(ferry_last_error(), "no tokens") != NULL);
    ck_assert_int_eq(ferry_perplexity(m, NULL, 5, 64, &r), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_perplexity(NULL, SHORT, 5, 64, &r), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_perplexity(m, SHORT, 5, 64, NULL), FERRY_ERR_INVALID);
    ferry_model_close(m);
}
END_TEST

static Suite *perplexity_suite(void)
{
    Suite *s = suite_create("perplexity");
    TCase *tc = tcase_create("perplexity");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_perplexity_matches_decode_logits);
    tcase_add_test(tc, test_perplexity_scores_each_token_once);
    tcase_add_test(tc, test_perplexity_prefers_code_to_noise);
    tcase_add_test(tc, test_perplexity_bad_arguments);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(perplexity_suite()); }
