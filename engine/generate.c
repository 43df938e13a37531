/*
 * engine/generate.c: the generation loop: prefill the prompt in one forward, then sample
 * and decode one token at a time over the KV cache, streaming complete UTF-8 text.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/clock.h"
#include "core/error.h"
#include "engine/context.h"

ferry_generate_params ferry_generate_params_default(void)
{
    ferry_generate_params p = {.n_predict = 64, .stop_at_eos = 1, .prompt_logits = NULL};
    return p;
}

int ferry_token_is_eos(const ferry_model *m, int32_t id)
{
    if (!m)
        return 0;
    const ferry_config *cfg = &m->cfg;
    for (int32_t i = 0; i < cfg->n_eos; i++)
        if (cfg->eos_ids[i] == id)
            return 1;
    return cfg->n_eos == 0 && id == ferry_tokenizer_eos_id(m->tok);
}

ferry_status ferry_generate(ferry_context *c, const int32_t *prompt_ids, int32_t n_prompt,
                            const ferry_generate_params *p, ferry_token_fn fn, void *user,
                            int32_t *out_ids, int32_t out_cap, int32_t *n_out)
{
    ferry_generate_params defaults = ferry_generate_params_default();
    if (!p)
        p = &defaults;
    if (!c || !prompt_ids || n_prompt <= 0 || !n_out || out_cap < 0 || (out_cap > 0 && !out_ids))
        return ferry_fail(FERRY_ERR_INVALID, "ferry_generate: invalid arguments (an empty "
                                             "prompt, or NULL buffers)");
    if (p->n_predict < 0)
        return ferry_fail(FERRY_ERR_INVALID, "token count %d must be >= 0", (int)p->n_predict);
    /* the last sampled token is never fed back, so n_predict - 1 positions follow */
    int64_t need = (int64_t)n_prompt + (p->n_predict > 0 ? p->n_predict - 1 : 0);
    if (need > c->n_ctx)
        return ferry_fail(FERRY_ERR_INVALID,
                          "prompt of %d tokens + %d to generate needs %lld positions, the "
                          "context holds %d (raise --ctx, up to %d)",
                          (int)n_prompt, (int)p->n_predict, (long long)need, (int)c->n_ctx,
                          (int)c->m->cfg.max_positions);

    ferry_context_reset(c);
    const ferry_tokenizer *tok = c->m->tok;
    int32_t V = c->m->cfg.vocab_size, n_tok_vocab = ferry_tokenizer_n_vocab(tok);
    char *piece = NULL;
    float *logits = malloc((size_t)V * sizeof *logits);
    if (!logits)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for logits");
    ferry_status st = ferry_eval(c, prompt_ids, n_prompt, logits);
    if (st)
        goto done;
    if (p->prompt_logits)
        memcpy(p->prompt_logits, logits, (size_t)V * sizeof *logits);

    /* The stream first sees the prompt (its text discarded), so the generated text is
     * exactly decode(prompt + generated) minus decode(prompt): no leading space stripped
     * from the first generated token, and a character split across the boundary joined. */
    ferry_detok_stream stream;
    ferry_detok_stream_init(&stream);
    size_t piece_cap = ferry_tokenizer_max_piece_bytes(tok) + 1;
    size_t piece_len = 0;
    piece = malloc(piece_cap);
    if (!piece) {
        st = ferry_fail(FERRY_ERR_NOMEM, "out of memory for text");
        goto done;
    }
    for (int32_t i = 0; i < n_prompt; i++)
        if (prompt_ids[i] < n_tok_vocab &&
            (st = ferry_detok_stream_push(tok, &stream, prompt_ids[i], 1, piece, piece_cap,
                                          &piece_len)))
            goto done;
    int32_t n = 0;
    for (int32_t i = 0; i < p->n_predict; i++) {
        double t0 = ferry_now_seconds();
        int32_t id = ferry_sampler_sample(&c->sampler, logits);
        c->stats.sample_seconds += ferry_now_seconds() - t0;
        if (n < out_cap)
            out_ids[n] = id;
        n++;
        piece_len = 0;
        piece[0] = 0;
        /* ids the tokenizer does not know (padding rows of a larger embedding) print nothing */
        if (id < n_tok_vocab &&
            (st = ferry_detok_stream_push(tok, &stream, id, 1, piece, piece_cap, &piece_len)))
            goto done;
        if (fn && fn(id, piece, piece_len, user))
            break;
        if (p->stop_at_eos && ferry_token_is_eos(c->m, id))
            break;
        if (i + 1 == p->n_predict)
            break;
        if ((st = ferry_eval(c, &id, 1, logits)))
            goto done;
    }
    if ((st = ferry_detok_stream_flush(tok, &stream, piece, piece_cap, &piece_len)))
        goto done;
    if (piece_len && fn)
        fn(-1, piece, piece_len, user);
    *n_out = n;
done:
    free(piece);
    free(logits);
    return st;
}
