/*
 * engine/batch.c: batch generation over many prompts with cross-batch token reordering
 * (ferry_batch_generate in ferry.h).
 *
 * The continuous batcher (engine/batcher.h) with every prompt admitted at once, each into
 * the slot of its own number, and no step budget: every unfinished sequence feeds its next
 * prompt chunk or its last sampled token each step. A row's MoE result does not depend on
 * the rows beside it, so the outputs are the same bit for bit in any order, and the same as
 * generating each prompt alone.
 */
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/error.h"
#include "engine/batcher.h"
#include "engine/context.h"

ferry_batch_params ferry_batch_params_default(void)
{
    ferry_batch_params p = {.max_batch = 16, .chunk = 64, .reorder = 1, .stop_at_eos = 1};
    p.sampling = ferry_context_params_default();
    return p;
}

static ferry_status check_args(const ferry_model *m, const int32_t *const *prompts,
                               const int32_t *n_prompt, const int32_t *n_predict, int32_t n_seqs,
                               const ferry_batch_params *p, int32_t *const *out_ids,
                               const int32_t *n_out)
{
    if (!m || !prompts || !n_prompt || !n_predict || !out_ids || !n_out || n_seqs < 1)
        return ferry_fail(FERRY_ERR_INVALID, "batch: NULL arguments or no prompts");
    if (p->max_batch < 1 || p->chunk < 1)
        return ferry_fail(FERRY_ERR_INVALID, "batch: max_batch %d and chunk %d must be >= 1",
                          (int)p->max_batch, (int)p->chunk);
    int32_t V = m->cfg.vocab_size;
    for (int32_t i = 0; i < n_seqs; i++) {
        if (n_prompt[i] < 1 || !prompts[i])
            return ferry_fail(FERRY_ERR_INVALID, "batch: prompt %d is empty", (int)i);
        if (n_predict[i] < 0 || (n_predict[i] > 0 && !out_ids[i]))
            return ferry_fail(FERRY_ERR_INVALID, "batch: prompt %d: %d tokens to generate",
                              (int)i, (int)n_predict[i]);
        int64_t need = (int64_t)n_prompt[i] + (n_predict[i] > 0 ? n_predict[i] - 1 : 0);
        if (need > m->cfg.max_positions)
            return ferry_fail(FERRY_ERR_INVALID, "batch: prompt %d: %d tokens + %d to generate "
                              "exceed the model's %d positions", (int)i, (int)n_prompt[i],
                              (int)n_predict[i], (int)m->cfg.max_positions);
        for (int32_t t = 0; t < n_prompt[i]; t++)
            if (prompts[i][t] < 0 || prompts[i][t] >= V)
                return ferry_fail(FERRY_ERR_INVALID, "batch: prompt %d: token %d at index %d is "
                                  "outside [0, %d)", (int)i, (int)prompts[i][t], (int)t, (int)V);
    }
    return FERRY_OK;
}

ferry_status ferry_batch_generate(ferry_model *m, const int32_t *const *prompts,
                                  const int32_t *n_prompt, const int32_t *n_predict, int32_t n_seqs,
                                  const ferry_batch_params *p, int32_t *const *out_ids,
                                  int32_t *n_out, ferry_batch_stats *stats, int64_t *layer_loads)
{
    ferry_batch_params defaults = ferry_batch_params_default();
    if (!p)
        p = &defaults;
    ferry_status st = check_args(m, prompts, n_prompt, n_predict, n_seqs, p, out_ids, n_out);
    if (st)
        return st;
    const ferry_config *cfg = &m->cfg;
    int64_t rows = 0;
    for (int32_t i = 0; i < n_seqs; i++)
        rows += n_prompt[i] < p->chunk ? n_prompt[i] : p->chunk;
    if (rows > (1 << 24))
        return ferry_fail(FERRY_ERR_INVALID, "batch: %lld tokens in one step; lower the chunk "
                          "or the number of prompts", (long long)rows);
    int32_t *ctx = malloc((size_t)n_seqs * sizeof *ctx);
    int32_t *slot_seq = malloc((size_t)n_seqs * sizeof *slot_seq);
    ferry_batcher_event *ev = malloc((size_t)n_seqs * sizeof *ev);
    if (!ctx || !slot_seq || !ev) {
        st = ferry_fail(FERRY_ERR_NOMEM, "batch: out of memory for %d prompts", (int)n_seqs);
        goto done;
    }
    for (int32_t i = 0; i < n_seqs; i++) {
        ctx[i] = n_prompt[i] + (n_predict[i] > 0 ? n_predict[i] : 1);
        n_out[i] = 0;
    }
    double t0 = ferry_now_seconds();
    ferry_batcher_params bp = ferry_batcher_params_default();
    bp.max_seqs = n_seqs;
    bp.slot_ctx = ctx;
    bp.max_batch = p->max_batch;
    bp.chunk = p->chunk;
    bp.reorder = p->reorder;
    ferry_batcher *b = NULL;
    if ((st = ferry_batcher_create(m, &bp, &b)))
        goto done;
    /* every prompt at once, each into the slot of its own number */
    for (int32_t i = 0; i < n_seqs && st == FERRY_OK; i++) {
        ferry_seq_params sp = {.temperature = p->sampling.temperature,
                               .top_k = p->sampling.top_k, .top_p = p->sampling.top_p,
                               .seed = p->sampling.seed, .max_tokens = n_predict[i],
                               .stop_at_eos = p->stop_at_eos};
        int32_t slot = -1;
        if (n_predict[i] == 0)
            sp.max_tokens = 1; /* holds the slot: ended below, before any step */
        st = ferry_batcher_add(b, prompts[i], n_prompt[i], &sp, &slot);
        slot_seq[slot < 0 ? 0 : slot] = i;
        if (st == FERRY_OK && n_predict[i] == 0)
            ferry_batcher_cancel(b, slot);
    }
    while (st == FERRY_OK && ferry_batcher_active(b) > 0) {
        int32_t n_ev = 0;
        if ((st = ferry_batcher_step(b, ev, &n_ev)))
            break;
        for (int32_t j = 0; j < n_ev; j++) {
            int32_t i = slot_seq[ev[j].slot];
            out_ids[i][n_out[i]++] = ev[j].token;
        }
    }
    if (st == FERRY_OK) {
        ferry_batcher_stats bs;
        ferry_batcher_get_stats(b, &bs);
        ferry_batch_stats r = {.steps = bs.steps, .tokens = bs.tokens,
                               .layer_batches = bs.layer_batches,
                               .expert_loads = bs.expert_loads};
        r.seconds = ferry_now_seconds() - t0;
        r.expert_bytes = ferry_model_expert_bytes(m);
        if (m->cache || m->hybrid != FERRY_HYBRID_OFF) {
            ferry_offload_stats os;
            st = ferry_context_get_offload_stats(ferry_batcher_moe_context(b), &os, NULL, 0);
            r.bytes_to_device = os.bytes_to_device;
            r.hits = os.hits;
            r.misses = os.misses;
            r.cpu_experts = os.cpu_experts;
        }
        if (layer_loads)
            memcpy(layer_loads, ferry_batcher_layer_loads(b),
                   (size_t)cfg->n_layers * sizeof *layer_loads);
        if (stats && st == FERRY_OK)
            *stats = r;
    }
    ferry_batcher_free(b);
done:
    free(ctx);
    free(slot_seq);
    free(ev);
    return st;
}
