/*
 * examples/generate.c: embedding ferry in a C program through include/ferry.h alone.
 *
 *   example_generate MODEL_DIR PROMPT [N_TOKENS]
 *
 * Opens the model (on the GPU when there is one, else the CPU), streams a greedy
 * continuation of PROMPT to stdout, then prints the speed to stderr. Link with -lferry.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ferry.h"

/* Called for each generated token with its text; returning nonzero would stop. */
static int on_token(int32_t id, const char *text, size_t len, void *user)
{
    (void)id;
    (void)user;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return 0;
}

static int fail(const char *what, ferry_status st)
{
    fprintf(stderr, "example: %s: %s (%s)\n", what, ferry_last_error(), ferry_status_name(st));
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: %s MODEL_DIR PROMPT [N_TOKENS]\n", argv[0]);
        return 2;
    }
    int n_tokens = argc == 4 ? atoi(argv[3]) : 64;
    if (n_tokens <= 0) {
        fprintf(stderr, "example: N_TOKENS must be a positive integer, got '%s'\n", argv[3]);
        return 2;
    }

    ferry_model *m = NULL;
    ferry_context *c = NULL;
    int32_t *prompt = NULL, *out = NULL;
    int rc = 1;
    ferry_status st = ferry_model_open(argv[1], NULL, &m); /* NULL: default parameters */
    if (st) {
        rc = fail("cannot open the model", st);
        goto done;
    }
    if ((st = ferry_context_create(m, NULL, &c))) { /* greedy sampling, default context */
        rc = fail("context", st);
        goto done;
    }

    /* tokenize: the first call with no buffer asks for the count */
    const char *text = argv[2];
    int32_t n_prompt = 0;
    st = ferry_tokenize(m, text, strlen(text), 1, NULL, 0, &n_prompt);
    if (st != FERRY_OK && st != FERRY_ERR_INVALID) {
        rc = fail("tokenize", st);
        goto done;
    }
    prompt = malloc(((size_t)n_prompt + 1) * sizeof *prompt);
    out = malloc((size_t)n_tokens * sizeof *out);
    if (!prompt || !out) {
        fprintf(stderr, "example: out of memory\n");
        goto done;
    }
    if ((st = ferry_tokenize(m, text, strlen(text), 1, prompt, n_prompt, &n_prompt))) {
        rc = fail("tokenize", st);
        goto done;
    }

    ferry_generate_params gp = ferry_generate_params_default();
    gp.n_predict = n_tokens;
    int32_t n_out = 0;
    fputs(text, stdout);
    if ((st = ferry_generate(c, prompt, n_prompt, &gp, on_token, NULL, out, n_tokens, &n_out))) {
        rc = fail("generate", st);
        goto done;
    }
    putchar('\n');

    ferry_stats stats;
    ferry_model_info info;
    ferry_context_get_stats(c, &stats);
    ferry_model_get_info(m, &info);
    fprintf(stderr, "%d tokens on %s: prefill %.1f tokens/s, decode %.1f tokens/s\n", (int)n_out,
            info.device, stats.prefill_tokens_per_s, stats.decode_tokens_per_s);
    rc = 0;
done:
    free(prompt);
    free(out);
    ferry_context_free(c);
    ferry_model_close(m);
    return rc;
}
