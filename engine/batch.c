/*
 * engine/batch.c: batch generation over many prompts with cross-batch token reordering
 * (ferry_batch_generate in ferry.h).
 *
 * Each sequence has its own context (KV cache, sampler); one more context, sized for a
 * layer-batch, runs the MoE blocks. A step: every unfinished sequence embeds its next prompt
 * chunk or its last sampled token; then, layer by layer, each sequence runs attention on its
 * own context, its tokens' routing at this layer (and the next layer's router applied to the
 * same state, the prediction the scheduler breaks ties with) is read back, the scheduler
 * (moe/schedule.h) cuts the step's tokens into layer-batches, and each layer-batch's rows are
 * gathered into the MoE context, run through the MoE block (each expert once over its
 * tokens) and scattered back. A row's MoE result does not depend on the rows beside it, so
 * the outputs are the same bit for bit in any order, and the same as generating each prompt
 * alone.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/clock.h"
#include "core/error.h"
#include "engine/context.h"
#include "moe/schedule.h"

typedef struct {
    ferry_context *c;
    const int32_t *prompt;
    int32_t n_prompt, n_predict;
    int32_t fed;    /* prompt tokens run */
    int32_t n_gen;  /* tokens generated */
    int32_t last;   /* the last sampled token, fed at the next step */
    int32_t n_step; /* tokens this step */
    int32_t row0;   /* first row of this step's tokens */
    int done;
    int32_t *out;
} seq_state;

typedef struct {
    ferry_model *m;
    const ferry_batch_params *p;
    seq_state *seq;
    int32_t n_seqs;
    ferry_context *moe; /* runs the layer-batches */
    ferry_schedule *sched;
    int32_t max_rows;
    int32_t *route, *next; /* (max_rows, k) routing at the layer, predicted at the next */
    int32_t *row_seq, *row_local, *order, *starts;
    float *logits;
    ferry_batch_stats stats;
    int64_t *layer_loads;
} batch_run;

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

/* The contexts, with the expert slots planned once all of them exist when offloading. */
static ferry_status create_contexts(batch_run *b)
{
    ferry_model *m = b->m;
    ferry_backend *be = m->be;
    size_t used_before = m->store ? be->ops->mem_used(be) : 0;
    pthread_mutex_lock(&m->lock);
    int deferred = m->store && !m->slots_planned;
    m->defer_plan = deferred;
    pthread_mutex_unlock(&m->lock);
    ferry_context_params cp = b->p->sampling;
    cp.n_ctx = b->p->max_batch;
    cp.n_batch = b->p->max_batch;
    ferry_status st = ferry_context_create_parts(m, &cp, FERRY_CONTEXT_MOE, &b->moe);
    for (int32_t i = 0; i < b->n_seqs && st == FERRY_OK; i++) {
        seq_state *s = &b->seq[i];
        cp = b->p->sampling;
        cp.n_ctx = s->n_prompt + (s->n_predict > 0 ? s->n_predict : 1);
        cp.n_batch = b->p->chunk;
        st = ferry_context_create_parts(m, &cp, FERRY_CONTEXT_ATTENTION, &s->c);
    }
    pthread_mutex_lock(&m->lock);
    m->defer_plan = 0;
    if (st == FERRY_OK && deferred)
        st = ferry_model_plan_slots(m, be->ops->mem_used(be) - used_before);
    pthread_mutex_unlock(&m->lock);
    if (st)
        return st;
    ferry_context_reset(b->moe); /* counters from now, with the cache in place */
    for (int32_t i = 0; i < b->n_seqs; i++)
        ferry_context_reset(b->seq[i].c);
    return FERRY_OK;
}

/* Reads back the routing of a sequence's step tokens at MoE layer l (and the next MoE
 * layer's router on the same state) into b->route / b->next. */
static ferry_status read_routing(batch_run *b, seq_state *s, int32_t l)
{
    ferry_model *m = b->m;
    ferry_backend *be = m->be;
    const ferry_backend_ops *o = be->ops;
    int32_t E = m->cfg.n_experts, k = m->cfg.n_experts_per_tok, n = s->n_step;
    ferry_context *c = s->c;
    size_t bytes = (size_t)n * (size_t)k * sizeof(int32_t);
    int norm = m->cfg.norm_topk;
    TRY(o->matmul(be, c->d_router, c->d_h, &m->moe[l].gate, n));
    TRY(o->router_topk(be, c->d_experts, c->d_weights, c->d_router, n, E, k, norm));
    TRY(o->download(be, b->route + (size_t)s->row0 * (size_t)k, c->d_experts, bytes));
    if (l + 1 < m->cfg.n_moe_layers) {
        TRY(o->matmul(be, c->d_router, c->d_h, &m->moe[l + 1].gate, n));
        TRY(o->router_topk(be, c->d_experts, c->d_weights, c->d_router, n, E, k, norm));
        TRY(o->download(be, b->next + (size_t)s->row0 * (size_t)k, c->d_experts, bytes));
    }
    return FERRY_OK;
}

/* Layer l's MoE over the step's n_rows rows, in the scheduler's layer-batches. */
static ferry_status moe_layer(batch_run *b, int32_t l, int32_t n_rows)
{
    ferry_model *m = b->m;
    ferry_backend *be = m->be;
    const ferry_backend_ops *o = be->ops;
    int32_t d = m->cfg.hidden_size;
    ferry_context *mc = b->moe;
    ferry_schedule_result r;
    int32_t ml = m->cfg.moe_index[l];
    TRY(ferry_schedule_groups(b->sched, b->route, ml + 1 < m->cfg.n_moe_layers ? b->next : NULL,
                              n_rows, b->p->max_batch, b->p->reorder, b->order, b->starts, &r));
    b->stats.layer_batches += r.n_groups;
    b->stats.expert_loads += r.loads;
    if (b->layer_loads)
        b->layer_loads[l] += r.loads;
    for (int32_t g = 0; g < r.n_groups; g++) {
        int32_t g0 = b->starts[g], n_g = b->starts[g + 1] - g0;
        for (int32_t j = 0; j < n_g; j++) {
            int32_t row = b->order[g0 + j];
            ferry_context *c = b->seq[b->row_seq[row]].c;
            const int32_t *t = &b->row_local[row];
            TRY(o->gather_rows(be, mc->d_h + (size_t)j * (size_t)d, c->d_h, t, 1, d));
            TRY(o->gather_rows(be, mc->d_x + (size_t)j * (size_t)d, c->d_x, t, 1, d));
        }
        TRY(ferry_context_moe(mc, l, n_g));
        for (int32_t j = 0; j < n_g; j++) {
            int32_t row = b->order[g0 + j];
            ferry_context *c = b->seq[b->row_seq[row]].c;
            TRY(o->scatter_rows(be, c->d_x, mc->d_x + (size_t)j * (size_t)d, &b->row_local[row],
                                1, d));
        }
    }
    return FERRY_OK;
}

/* One step over every unfinished sequence. */
static ferry_status step(batch_run *b)
{
    ferry_model *m = b->m;
    int32_t n_rows = 0;
    for (int32_t i = 0; i < b->n_seqs; i++) {
        seq_state *s = &b->seq[i];
        if (s->done)
            continue;
        int32_t left = s->n_prompt - s->fed;
        s->n_step = left > 0 ? (left < b->p->chunk ? left : b->p->chunk) : 1;
        s->row0 = n_rows;
        for (int32_t t = 0; t < s->n_step; t++) {
            b->row_seq[n_rows + t] = i;
            b->row_local[n_rows + t] = t;
        }
        n_rows += s->n_step;
        TRY(ferry_context_embed(s->c, left > 0 ? s->prompt + s->fed : &s->last, s->n_step));
    }
    for (int32_t l = 0; l < m->cfg.n_layers; l++) {
        for (int32_t i = 0; i < b->n_seqs; i++) {
            seq_state *s = &b->seq[i];
            if (s->done)
                continue;
            TRY(ferry_context_attention(s->c, l, s->n_step));
            if (m->cfg.moe_index[l] < 0) /* a dense MLP: each sequence's rows on their own */
                TRY(ferry_context_moe(s->c, l, s->n_step));
            else
                TRY(read_routing(b, s, m->cfg.moe_index[l]));
        }
        if (m->cfg.moe_index[l] >= 0)
            TRY(moe_layer(b, l, n_rows));
    }
    for (int32_t i = 0; i < b->n_seqs; i++) {
        seq_state *s = &b->seq[i];
        if (s->done)
            continue;
        int sample = s->fed + s->n_step >= s->n_prompt; /* the prompt's end, or a decode */
        TRY(ferry_context_finish(s->c, s->n_step, NULL, sample ? b->logits : NULL));
        if (s->fed < s->n_prompt)
            s->fed += s->n_step;
        if (!sample)
            continue;
        int32_t id = ferry_sampler_sample(&s->c->sampler, b->logits);
        s->out[s->n_gen++] = id;
        s->last = id;
        if (s->n_gen == s->n_predict || (b->p->stop_at_eos && ferry_token_is_eos(b->m, id)))
            s->done = 1;
    }
    b->stats.tokens += n_rows;
    b->stats.steps++;
    return FERRY_OK;
}

static void run_free(batch_run *b)
{
    if (b->seq)
        for (int32_t i = 0; i < b->n_seqs; i++)
            ferry_context_free(b->seq[i].c);
    ferry_context_free(b->moe);
    ferry_schedule_destroy(b->sched);
    free(b->seq);
    free(b->route);
    free(b->next);
    free(b->row_seq);
    free(b->row_local);
    free(b->order);
    free(b->starts);
    free(b->logits);
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
    int32_t k = cfg->n_experts_per_tok;
    batch_run b = {.m = m, .p = p, .n_seqs = n_seqs, .layer_loads = layer_loads};
    int64_t rows = 0;
    for (int32_t i = 0; i < n_seqs; i++)
        rows += n_prompt[i] < p->chunk ? n_prompt[i] : p->chunk;
    if (rows > (1 << 24))
        return ferry_fail(FERRY_ERR_INVALID, "batch: %lld tokens in one step; lower the chunk "
                          "or the number of prompts", (long long)rows);
    b.max_rows = (int32_t)rows;
    b.seq = calloc((size_t)n_seqs, sizeof *b.seq);
    b.route = malloc((size_t)b.max_rows * (size_t)k * sizeof *b.route);
    b.next = malloc((size_t)b.max_rows * (size_t)k * sizeof *b.next);
    b.row_seq = malloc((size_t)b.max_rows * sizeof *b.row_seq);
    b.row_local = malloc((size_t)b.max_rows * sizeof *b.row_local);
    b.order = malloc((size_t)b.max_rows * sizeof *b.order);
    b.starts = malloc(((size_t)b.max_rows + 1) * sizeof *b.starts);
    b.logits = malloc((size_t)cfg->vocab_size * sizeof *b.logits);
    if (!b.seq || !b.route || !b.next || !b.row_seq || !b.row_local || !b.order || !b.starts ||
        !b.logits) {
        run_free(&b);
        return ferry_fail(FERRY_ERR_NOMEM, "batch: out of memory for %d prompts", (int)n_seqs);
    }
    for (int32_t i = 0; i < n_seqs; i++) {
        seq_state *s = &b.seq[i];
        s->prompt = prompts[i];
        s->n_prompt = n_prompt[i];
        s->n_predict = n_predict[i];
        s->out = out_ids[i];
        s->done = n_predict[i] == 0;
    }
    if (layer_loads)
        memset(layer_loads, 0, (size_t)cfg->n_layers * sizeof *layer_loads);
    double t0 = ferry_now_seconds();
    if ((st = ferry_schedule_create(cfg->n_experts, b.max_rows, k, &b.sched)) ||
        (st = create_contexts(&b)))
        goto done;
    pthread_mutex_lock(&m->lock);
    for (;;) {
        int active = 0;
        for (int32_t i = 0; i < n_seqs; i++)
            active |= !b.seq[i].done;
        if (!active || (st = step(&b)))
            break;
    }
    pthread_mutex_unlock(&m->lock);
    if (st)
        goto done;
    b.stats.seconds = ferry_now_seconds() - t0;
    b.stats.expert_bytes = ferry_model_expert_bytes(m);
    if (m->cache || m->hybrid != FERRY_HYBRID_OFF) {
        ferry_offload_stats os;
        if ((st = ferry_context_get_offload_stats(b.moe, &os, NULL, 0)))
            goto done;
        b.stats.bytes_to_device = os.bytes_to_device;
        b.stats.hits = os.hits;
        b.stats.misses = os.misses;
        b.stats.cpu_experts = os.cpu_experts;
    }
    for (int32_t i = 0; i < n_seqs; i++)
        n_out[i] = b.seq[i].n_gen;
    if (stats)
        *stats = b.stats;
done:
    run_free(&b);
    return st;
}
