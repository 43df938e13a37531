/*
 * engine/batcher.c: continuous batching (engine/batcher.h).
 *
 * A step: choose the sequences that run (every decoding one; prompt chunks within the
 * budget), embed each one's tokens in its own context; then, layer by layer, each runs
 * attention on its own context and its tokens' routing at this layer (and the next layer's
 * router applied to the same state, the prediction the scheduler breaks ties with) is read
 * back, the scheduler cuts the step's tokens into layer-batches, and each layer-batch's rows
 * are gathered into the MoE context, run through the MoE block (each expert once over its
 * tokens) and scattered back. Last, each sequence whose prompt is done samples a token.
 */
#include "engine/batcher.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/error.h"
#include "engine/context.h"
#include "moe/schedule.h"

typedef struct {
    ferry_context *c;
    int32_t n_ctx;
    int32_t *prompt;   /* (n_ctx) */
    int32_t n_prompt;
    int32_t fed;       /* prompt tokens run */
    int32_t n_gen;     /* tokens generated */
    int32_t last;      /* the last sampled token, fed at the next step */
    int32_t n_step;    /* tokens this step (0: not in this step) */
    int32_t row0;      /* first row of this step's tokens */
    int32_t waited;    /* steps passed over while pending */
    int64_t arrival;   /* admission order */
    int active;
    int has_sig;
    uint8_t *sig;      /* (n_moe_layers, n_experts): experts its last step routed to */
    ferry_seq_params sp;
} slot_state;

struct ferry_batcher {
    ferry_model *m;
    ferry_batcher_params p;
    slot_state *slot;
    int32_t n_active;
    int64_t n_arrivals;
    ferry_context *moe; /* runs the layer-batches */
    ferry_schedule *sched;
    int32_t max_rows;
    int32_t *route, *next, *prev_next; /* (max_rows, k) */
    int32_t *row_seq, *row_local, *order, *starts;
    int32_t *cand;      /* (max_seqs) pending sequences */
    int32_t *pick_fifo, *pick_greedy; /* (max_seqs) tokens each candidate would feed */
    uint8_t *uni, *uni2, *uni3;       /* (n_moe_layers, n_experts) scratch unions */
    float *logits;
    int64_t *layer_loads;
    ferry_batcher_stats stats;
    int competed;       /* this step's prompt chunks competed for the budget */
};

ferry_batcher_params ferry_batcher_params_default(void)
{
    return (ferry_batcher_params){.max_seqs = 1, .max_batch = 16, .chunk = 64, .max_wait = 4,
                                  .reorder = 1, .select = 1};
}

/* The slots' contexts, with the expert slots planned once all of them exist when
 * offloading. */
static ferry_status create_contexts(ferry_batcher *b)
{
    ferry_model *m = b->m;
    ferry_backend *be = m->be;
    size_t used_before = m->store ? be->ops->mem_used(be) : 0;
    pthread_mutex_lock(&m->lock);
    int deferred = m->store && !m->slots_planned;
    m->defer_plan = deferred;
    pthread_mutex_unlock(&m->lock);
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = b->p.max_batch;
    cp.n_batch = b->p.max_batch;
    ferry_status st = ferry_context_create_parts(m, &cp, FERRY_CONTEXT_MOE, &b->moe);
    for (int32_t i = 0; i < b->p.max_seqs && st == FERRY_OK; i++) {
        cp = ferry_context_params_default();
        cp.n_ctx = b->slot[i].n_ctx;
        cp.n_batch = b->p.chunk;
        st = ferry_context_create_parts(m, &cp, FERRY_CONTEXT_ATTENTION, &b->slot[i].c);
    }
    pthread_mutex_lock(&m->lock);
    m->defer_plan = 0;
    if (st == FERRY_OK && deferred)
        st = ferry_model_plan_slots(m, be->ops->mem_used(be) - used_before);
    pthread_mutex_unlock(&m->lock);
    if (st)
        return st;
    ferry_context_reset(b->moe); /* counters from now, with the cache in place */
    return FERRY_OK;
}

void ferry_batcher_free(ferry_batcher *b)
{
    if (!b)
        return;
    if (b->slot)
        for (int32_t i = 0; i < b->p.max_seqs; i++) {
            ferry_context_free(b->slot[i].c);
            free(b->slot[i].prompt);
            free(b->slot[i].sig);
        }
    ferry_context_free(b->moe);
    ferry_schedule_destroy(b->sched);
    free(b->slot);
    free(b->route);
    free(b->next);
    free(b->prev_next);
    free(b->row_seq);
    free(b->row_local);
    free(b->order);
    free(b->starts);
    free(b->cand);
    free(b->pick_fifo);
    free(b->pick_greedy);
    free(b->uni);
    free(b->uni2);
    free(b->uni3);
    free(b->logits);
    free(b->layer_loads);
    free(b);
}

ferry_status ferry_batcher_create(ferry_model *m, const ferry_batcher_params *p,
                                  ferry_batcher **out)
{
    if (!m || !p || !out)
        return ferry_fail(FERRY_ERR_INVALID, "batcher: NULL arguments");
    *out = NULL;
    ferry_batcher_params q = *p;
    if (q.max_batch == 0)
        q.max_batch = 16;
    if (q.chunk == 0)
        q.chunk = 64;
    if (q.max_wait == 0)
        q.max_wait = 4;
    if (q.max_seqs < 1 || q.max_batch < 1 || q.chunk < 1 || q.step_tokens < 0 ||
        q.max_wait < 0)
        return ferry_fail(FERRY_ERR_INVALID, "batcher: %d sequences, layer-batch "
                          "%d, chunk %d, step tokens %d: each must be >= 1 (step tokens >= 0)",
                          (int)q.max_seqs, (int)q.max_batch, (int)q.chunk, (int)q.step_tokens);
    const ferry_config *cfg = &m->cfg;
    for (int32_t i = 0; i < q.max_seqs; i++) {
        int32_t n = q.slot_ctx ? q.slot_ctx[i] : q.n_ctx;
        if (n < 1 || n > cfg->max_positions)
            return ferry_fail(FERRY_ERR_INVALID, "batcher: a context of %d positions (the "
                              "model has %d)", (int)n, (int)cfg->max_positions);
    }
    int64_t rows = (int64_t)q.max_seqs * q.chunk; /* forced chunks may pass the budget */
    if (rows > (1 << 24))
        return ferry_fail(FERRY_ERR_INVALID, "batcher: %lld tokens in one step; lower the "
                          "chunk or the number of sequences", (long long)rows);
    ferry_batcher *b = calloc(1, sizeof *b);
    if (!b)
        return ferry_fail(FERRY_ERR_NOMEM, "batcher: out of memory");
    b->m = m;
    b->p = q;
    b->p.slot_ctx = NULL;
    b->max_rows = (int32_t)rows;
    size_t k = (size_t)cfg->n_experts_per_tok, sig = (size_t)cfg->n_moe_layers * cfg->n_experts;
    size_t nr = (size_t)b->max_rows;
    b->slot = calloc((size_t)q.max_seqs, sizeof *b->slot);
    b->route = malloc(nr * k * sizeof *b->route);
    b->next = malloc(nr * k * sizeof *b->next);
    b->prev_next = malloc(nr * k * sizeof *b->prev_next);
    b->row_seq = malloc(nr * sizeof *b->row_seq);
    b->row_local = malloc(nr * sizeof *b->row_local);
    b->order = malloc(nr * sizeof *b->order);
    b->starts = malloc((nr + 1) * sizeof *b->starts);
    b->cand = malloc((size_t)q.max_seqs * sizeof *b->cand);
    b->pick_fifo = malloc((size_t)q.max_seqs * sizeof *b->pick_fifo);
    b->pick_greedy = malloc((size_t)q.max_seqs * sizeof *b->pick_greedy);
    b->uni = malloc(sig);
    b->uni2 = malloc(sig);
    b->uni3 = malloc(sig);
    b->logits = malloc((size_t)cfg->vocab_size * sizeof *b->logits);
    b->layer_loads = calloc((size_t)cfg->n_layers, sizeof *b->layer_loads);
    int ok = b->slot && b->route && b->next && b->prev_next && b->row_seq && b->row_local &&
             b->order && b->starts && b->cand && b->pick_fifo && b->pick_greedy && b->uni &&
             b->uni2 && b->uni3 && b->logits &&
             b->layer_loads;
    for (int32_t i = 0; ok && i < q.max_seqs; i++) {
        slot_state *s = &b->slot[i];
        s->n_ctx = q.slot_ctx ? q.slot_ctx[i] : q.n_ctx;
        s->prompt = malloc((size_t)s->n_ctx * sizeof *s->prompt);
        s->sig = calloc(sig, 1);
        ok = s->prompt && s->sig;
    }
    ferry_status st;
    if (!ok)
        st = ferry_fail(FERRY_ERR_NOMEM, "batcher: out of memory for %d sequences",
                        (int)q.max_seqs);
    else if (!(st = ferry_schedule_create(cfg->n_experts, b->max_rows, (int32_t)k, &b->sched)))
        st = create_contexts(b);
    if (st) {
        ferry_batcher_free(b);
        return st;
    }
    *out = b;
    return FERRY_OK;
}

int32_t ferry_batcher_active(const ferry_batcher *b) { return b ? b->n_active : 0; }

int32_t ferry_batcher_free_slots(const ferry_batcher *b)
{
    return b ? b->p.max_seqs - b->n_active : 0;
}

int32_t ferry_batcher_slot_ctx(const ferry_batcher *b, int32_t slot)
{
    return b && slot >= 0 && slot < b->p.max_seqs ? b->slot[slot].n_ctx : 0;
}

ferry_status ferry_batcher_add(ferry_batcher *b, const int32_t *prompt, int32_t n_prompt,
                               const ferry_seq_params *sp, int32_t *slot)
{
    if (!b || !prompt || !sp || !slot)
        return ferry_fail(FERRY_ERR_INVALID, "batcher: NULL arguments");
    int32_t i = 0;
    while (i < b->p.max_seqs && b->slot[i].active)
        i++;
    if (i == b->p.max_seqs)
        return ferry_fail(FERRY_ERR_INVALID, "batcher: all %d slots are in use",
                          (int)b->p.max_seqs);
    slot_state *s = &b->slot[i];
    int32_t V = b->m->cfg.vocab_size;
    if (n_prompt < 1)
        return ferry_fail(FERRY_ERR_INVALID, "batcher: the prompt is empty");
    if (n_prompt > s->n_ctx)
        return ferry_fail(FERRY_ERR_INVALID, "batcher: a prompt of %d tokens leaves no room "
                          "in a context of %d", (int)n_prompt, (int)s->n_ctx);
    if (sp->max_tokens < 1)
        return ferry_fail(FERRY_ERR_INVALID, "batcher: max_tokens %d must be >= 1",
                          (int)sp->max_tokens);
    if (!(sp->temperature >= 0) || !isfinite(sp->temperature) || !(sp->top_p > 0) ||
        sp->top_p > 1 || sp->top_k < 0)
        return ferry_fail(FERRY_ERR_INVALID, "batcher: temperature %g (>= 0), top-p %g "
                          "(in (0, 1]), top-k %d (>= 0)", (double)sp->temperature,
                          (double)sp->top_p, (int)sp->top_k);
    for (int32_t t = 0; t < n_prompt; t++)
        if (prompt[t] < 0 || prompt[t] >= V)
            return ferry_fail(FERRY_ERR_INVALID, "batcher: token %d at index %d is outside "
                              "[0, %d)", (int)prompt[t], (int)t, (int)V);
    memcpy(s->prompt, prompt, (size_t)n_prompt * sizeof *prompt);
    s->n_prompt = n_prompt;
    s->fed = s->n_gen = s->n_step = s->waited = 0;
    s->has_sig = 0;
    s->arrival = b->n_arrivals++;
    s->sp = *sp;
    ferry_context_reset(s->c);
    s->c->sampler.temperature = sp->temperature;
    s->c->sampler.top_k = sp->top_k;
    s->c->sampler.top_p = sp->top_p;
    ferry_sampler_reseed(&s->c->sampler, sp->seed);
    s->active = 1;
    b->n_active++;
    *slot = i;
    return FERRY_OK;
}

void ferry_batcher_cancel(ferry_batcher *b, int32_t slot)
{
    if (!b || slot < 0 || slot >= b->p.max_seqs || !b->slot[slot].active)
        return;
    b->slot[slot].active = 0;
    b->n_active--;
}

/* ---- choosing the prompt chunks of a step --------------------------------------------- */

/* Adds set (n_moe_layers x E flags) into u, returning how many flags were new. */
static int64_t merge(uint8_t *u, const uint8_t *set, size_t n)
{
    int64_t added = 0;
    for (size_t i = 0; i < n; i++)
        if (set[i] && !u[i]) {
            u[i] = 1;
            added++;
        }
    return added;
}

/* The experts a chunk of n tokens with no signature is expected to add to u, were each
 * token's k experts drawn uniformly: per layer, (E - |u_l|) (1 - (1 - k/E)^n). */
static double expected_new(const ferry_batcher *b, const uint8_t *u, int32_t n)
{
    const ferry_config *cfg = &b->m->cfg;
    int32_t E = cfg->n_experts, L = cfg->n_moe_layers;
    double miss = pow(1.0 - (double)cfg->n_experts_per_tok / E, n), sum = 0;
    for (int32_t l = 0; l < L; l++) {
        int32_t used = 0;
        for (int32_t e = 0; e < E; e++)
            used += u[(size_t)l * E + e];
        sum += (E - used) * (1.0 - miss);
    }
    return sum;
}

/* A pending sequence's cost against union u: the experts it would add. */
static double chunk_cost(const ferry_batcher *b, const slot_state *s, const uint8_t *u,
                         int32_t n)
{
    if (!s->has_sig)
        return expected_new(b, u, n);
    size_t sz = (size_t)b->m->cfg.n_moe_layers * b->m->cfg.n_experts;
    int64_t c = 0;
    for (size_t i = 0; i < sz; i++)
        c += s->sig[i] && !u[i];
    return (double)c;
}

/* Adds sequence s's chunk of n tokens to u (its signature, or the expectation's count to
 * *est when it has none); returns the estimated new experts. */
static double take(const ferry_batcher *b, const slot_state *s, uint8_t *u, int32_t n)
{
    size_t sz = (size_t)b->m->cfg.n_moe_layers * b->m->cfg.n_experts;
    if (s->has_sig)
        return (double)merge(u, s->sig, sz);
    return expected_new(b, u, n);
}

static int32_t chunk_len(const ferry_batcher *b, const slot_state *s, int32_t budget)
{
    int32_t left = s->n_prompt - s->fed, n = left < b->p.chunk ? left : b->p.chunk;
    return budget >= 0 && n > budget ? budget : n;
}

static int by_arrival(const void *x, const void *y, void *ctx)
{
    const ferry_batcher *b = ctx;
    int64_t a = b->slot[*(const int32_t *)x].arrival, c = b->slot[*(const int32_t *)y].arrival;
    return (a > c) - (a < c);
}

/* Insertion sort of the candidate slots by arrival (max_seqs is small). */
static void sort_arrival(ferry_batcher *b, int32_t *v, int32_t n)
{
    for (int32_t i = 1; i < n; i++)
        for (int32_t j = i; j > 0 && by_arrival(&v[j - 1], &v[j], b) > 0; j--) {
            int32_t t = v[j];
            v[j] = v[j - 1];
            v[j - 1] = t;
        }
}

/* Sets n_step of every active sequence for this step. */
static void choose(ferry_batcher *b)
{
    const ferry_config *cfg = &b->m->cfg;
    size_t sz = (size_t)cfg->n_moe_layers * cfg->n_experts;
    int32_t n_decode = 0, n_cand = 0;
    b->competed = 0;
    memset(b->uni, 0, sz);
    for (int32_t i = 0; i < b->p.max_seqs; i++) {
        slot_state *s = &b->slot[i];
        s->n_step = 0;
        if (!s->active)
            continue;
        if (s->fed == s->n_prompt) {
            s->n_step = 1;
            n_decode++;
            if (s->has_sig)
                merge(b->uni, s->sig, sz);
        } else {
            b->cand[n_cand++] = i;
        }
    }
    if (n_cand == 0)
        return;
    b->competed = 0;
    sort_arrival(b, b->cand, n_cand);
    if (b->p.step_tokens == 0) { /* no budget: every prompt feeds a chunk */
        for (int32_t j = 0; j < n_cand; j++)
            b->slot[b->cand[j]].n_step = chunk_len(b, &b->slot[b->cand[j]], -1);
        return;
    }
    int32_t budget = b->p.step_tokens - n_decode;
    int64_t base = 0; /* the decode tokens' experts, as their last step's */
    for (size_t i = 0; i < sz; i++)
        base += b->uni[i];
    /* prompts compete when the budget cannot take a chunk of each */
    int32_t want = 0;
    for (int32_t j = 0; j < n_cand; j++)
        want += chunk_len(b, &b->slot[b->cand[j]], -1);
    int competed = want > budget && n_cand > 1;
    /* the prompts passed over max_wait times go first: within the budget, but a token at
     * least */
    double planned = 0;
    for (int32_t j = 0; j < n_cand; j++) {
        slot_state *s = &b->slot[b->cand[j]];
        if (s->waited >= b->p.max_wait) {
            s->n_step = chunk_len(b, s, budget > 1 ? budget : 1);
            planned += take(b, s, b->uni, s->n_step);
            budget -= s->n_step;
        }
    }
    /* the rest of the budget in arrival order, and (select) greedily, cheapest chunk first;
     * the greedy choice stands where it is estimated to add fewer experts */
    memcpy(b->uni3, b->uni, sz);
    double fifo = 0, greedy = 0;
    int32_t left = budget;
    for (int32_t j = 0; j < n_cand; j++) {
        slot_state *s = &b->slot[b->cand[j]];
        b->pick_fifo[j] = s->n_step || left <= 0 ? 0 : chunk_len(b, s, left);
        if (b->pick_fifo[j]) {
            fifo += take(b, s, b->uni3, b->pick_fifo[j]);
            left -= b->pick_fifo[j];
        }
        b->pick_greedy[j] = 0;
    }
    int use_greedy = 0;
    if (b->p.select) {
        memcpy(b->uni3, b->uni, sz);
        left = budget;
        for (;;) {
            int32_t best = -1;
            double best_cost = 0;
            for (int32_t j = 0; j < n_cand && left > 0; j++) {
                slot_state *s = &b->slot[b->cand[j]];
                if (s->n_step || b->pick_greedy[j])
                    continue;
                double cost = chunk_cost(b, s, b->uni3, chunk_len(b, s, left));
                if (best < 0 || cost < best_cost) {
                    best = j;
                    best_cost = cost;
                }
            }
            if (best < 0)
                break;
            slot_state *s = &b->slot[b->cand[best]];
            b->pick_greedy[best] = chunk_len(b, s, left);
            greedy += take(b, s, b->uni3, b->pick_greedy[best]);
            left -= b->pick_greedy[best];
        }
        use_greedy = greedy < fifo;
    }
    for (int32_t j = 0; j < n_cand; j++) {
        slot_state *s = &b->slot[b->cand[j]];
        if (!s->n_step)
            s->n_step = use_greedy ? b->pick_greedy[j] : b->pick_fifo[j];
    }
    double arrival = planned + fifo; /* what --select off would have taken here */
    planned += use_greedy ? greedy : fifo;
    int any = n_decode > 0;
    for (int32_t j = 0; j < n_cand; j++)
        any |= b->slot[b->cand[j]].n_step > 0;
    if (!any) { /* no decode tokens and a budget under one token: the oldest goes */
        slot_state *s = &b->slot[b->cand[0]];
        s->n_step = chunk_len(b, s, -1);
    }
    for (int32_t j = 0; j < n_cand; j++) {
        slot_state *s = &b->slot[b->cand[j]];
        s->waited = s->n_step ? 0 : s->waited + 1;
        if (s->waited > b->stats.max_waited)
            b->stats.max_waited = s->waited;
    }
    b->competed = competed;
    if (competed) { /* both estimates count the decode tokens' experts too */
        b->stats.selected_steps++;
        b->stats.step_experts_planned += (int64_t)llround(planned) + base;
        b->stats.step_experts_arrival += (int64_t)llround(arrival) + base;
    }
}

/* ---- the step ----------------------------------------------------------------------------- */

/* Reads back the routing of a sequence's step tokens at MoE layer l (and the next MoE
 * layer's router on the same state) into b->route / b->next, and its signature. */
static ferry_status read_routing(ferry_batcher *b, slot_state *s, int32_t l)
{
    ferry_model *m = b->m;
    ferry_backend *be = m->be;
    const ferry_backend_ops *o = be->ops;
    int32_t E = m->cfg.n_experts, k = m->cfg.n_experts_per_tok, n = s->n_step;
    ferry_context *c = s->c;
    size_t bytes = (size_t)n * (size_t)k * sizeof(int32_t);
    int norm = m->cfg.norm_topk;
    int32_t *route = b->route + (size_t)s->row0 * (size_t)k;
    TRY(o->matmul(be, c->d_router, c->d_h, &m->moe[l].gate, n));
    TRY(o->router_topk(be, c->d_experts, c->d_weights, c->d_router, n, E, k, norm));
    TRY(o->download(be, route, c->d_experts, bytes));
    if (l + 1 < m->cfg.n_moe_layers) {
        TRY(o->matmul(be, c->d_router, c->d_h, &m->moe[l + 1].gate, n));
        TRY(o->router_topk(be, c->d_experts, c->d_weights, c->d_router, n, E, k, norm));
        TRY(o->download(be, b->next + (size_t)s->row0 * (size_t)k, c->d_experts, bytes));
    }
    uint8_t *sig = s->sig + (size_t)l * E;
    memset(sig, 0, (size_t)E);
    for (size_t i = 0; i < (size_t)n * k; i++)
        sig[route[i]] = 1;
    if (l + 1 == m->cfg.n_moe_layers)
        s->has_sig = 1;
    if (l > 0) { /* the previous layer's prediction of this one */
        const int32_t *pred = b->prev_next + (size_t)s->row0 * (size_t)k;
        for (int32_t t = 0; t < n; t++)
            for (int32_t i = 0; i < k; i++)
                for (int32_t j = 0; j < k; j++)
                    if (pred[(size_t)t * k + i] == route[(size_t)t * k + j]) {
                        b->stats.predicted_hits++;
                        break;
                    }
        b->stats.predicted += (int64_t)n * k;
    }
    return FERRY_OK;
}

/* Layer l's MoE over the step's n_rows rows, in the scheduler's layer-batches. */
static ferry_status moe_layer(ferry_batcher *b, int32_t l, int32_t n_rows)
{
    ferry_model *m = b->m;
    ferry_backend *be = m->be;
    const ferry_backend_ops *o = be->ops;
    int32_t d = m->cfg.hidden_size, E = m->cfg.n_experts, k = m->cfg.n_experts_per_tok;
    ferry_context *mc = b->moe;
    ferry_schedule_result r;
    int32_t ml = m->cfg.moe_index[l];
    TRY(ferry_schedule_groups(b->sched, b->route, ml + 1 < m->cfg.n_moe_layers ? b->next : NULL,
                              n_rows, b->p.max_batch, b->p.reorder, b->order, b->starts, &r));
    b->stats.layer_batches += r.n_groups;
    b->stats.expert_loads += r.loads;
    b->layer_loads[l] += r.loads;
    uint8_t *seen = b->uni2;
    memset(seen, 0, (size_t)E);
    for (size_t i = 0; i < (size_t)n_rows * k; i++)
        if (!seen[b->route[i]]) {
            seen[b->route[i]] = 1;
            b->stats.step_experts++;
            b->stats.selected_step_experts += b->competed;
        }
    for (int32_t g = 0; g < r.n_groups; g++) {
        int32_t g0 = b->starts[g], n_g = b->starts[g + 1] - g0;
        for (int32_t j = 0; j < n_g; j++) {
            int32_t row = b->order[g0 + j];
            ferry_context *c = b->slot[b->row_seq[row]].c;
            const int32_t *t = &b->row_local[row];
            TRY(o->gather_rows(be, mc->d_h + (size_t)j * (size_t)d, c->d_h, t, 1, d));
            TRY(o->gather_rows(be, mc->d_x + (size_t)j * (size_t)d, c->d_x, t, 1, d));
        }
        TRY(ferry_context_moe(mc, l, n_g));
        for (int32_t j = 0; j < n_g; j++) {
            int32_t row = b->order[g0 + j];
            ferry_context *c = b->slot[b->row_seq[row]].c;
            TRY(o->scatter_rows(be, c->d_x, mc->d_x + (size_t)j * (size_t)d, &b->row_local[row],
                                1, d));
        }
    }
    int32_t *t = b->prev_next; /* this layer's prediction of the next, kept for it */
    b->prev_next = b->next;
    b->next = t;
    return FERRY_OK;
}

static ferry_status run_step(ferry_batcher *b, ferry_batcher_event *ev, int32_t *n_ev)
{
    ferry_model *m = b->m;
    int32_t n_rows = 0;
    for (int32_t i = 0; i < b->p.max_seqs; i++) {
        slot_state *s = &b->slot[i];
        if (!s->n_step)
            continue;
        int prefill = s->fed < s->n_prompt;
        s->row0 = n_rows;
        for (int32_t t = 0; t < s->n_step; t++) {
            b->row_seq[n_rows + t] = i;
            b->row_local[n_rows + t] = t;
        }
        n_rows += s->n_step;
        TRY(ferry_context_embed(s->c, prefill ? s->prompt + s->fed : &s->last, s->n_step));
        if (prefill)
            b->stats.prompt_tokens += s->n_step;
    }
    for (int32_t l = 0; l < m->cfg.n_layers; l++) {
        int32_t ml = m->cfg.moe_index[l];
        for (int32_t i = 0; i < b->p.max_seqs; i++) {
            slot_state *s = &b->slot[i];
            if (!s->n_step)
                continue;
            TRY(ferry_context_attention(s->c, l, s->n_step));
            if (ml < 0) /* a dense MLP: each sequence's rows on their own */
                TRY(ferry_context_moe(s->c, l, s->n_step));
            else
                TRY(read_routing(b, s, ml));
        }
        if (ml >= 0)
            TRY(moe_layer(b, l, n_rows));
    }
    for (int32_t i = 0; i < b->p.max_seqs; i++) {
        slot_state *s = &b->slot[i];
        if (!s->n_step)
            continue;
        int sample = s->fed + s->n_step >= s->n_prompt; /* the prompt's end, or a decode */
        TRY(ferry_context_finish(s->c, s->n_step, NULL, sample ? b->logits : NULL));
        if (s->fed < s->n_prompt)
            s->fed += s->n_step;
        if (!sample)
            continue;
        int32_t id = ferry_sampler_sample(&s->c->sampler, b->logits);
        s->n_gen++;
        s->last = id;
        int32_t finish = FERRY_FINISH_NONE;
        if (s->sp.stop_at_eos && ferry_token_is_eos(m, id))
            finish = FERRY_FINISH_EOS;
        else if (s->n_gen == s->sp.max_tokens || s->n_prompt + s->n_gen - 1 >= s->n_ctx)
            finish = FERRY_FINISH_LENGTH; /* no room to feed this token back */
        ev[(*n_ev)++] = (ferry_batcher_event){.slot = i, .token = id, .finish = finish};
        b->stats.generated_tokens++;
        if (finish) {
            s->active = 0;
            b->n_active--;
        }
    }
    b->stats.tokens += n_rows;
    b->stats.steps++;
    return FERRY_OK;
}

ferry_status ferry_batcher_step(ferry_batcher *b, ferry_batcher_event *ev, int32_t *n_events)
{
    if (!b || !ev || !n_events)
        return ferry_fail(FERRY_ERR_INVALID, "batcher: NULL arguments");
    *n_events = 0;
    if (b->n_active == 0)
        return FERRY_OK;
    double t0 = ferry_now_seconds();
    choose(b);
    pthread_mutex_lock(&b->m->lock);
    ferry_status st = run_step(b, ev, n_events);
    pthread_mutex_unlock(&b->m->lock);
    if (st) { /* the sequences' states are unknown now: end them all */
        for (int32_t i = 0; i < b->p.max_seqs; i++)
            b->slot[i].active = 0;
        b->n_active = 0;
        *n_events = 0;
    }
    b->stats.seconds += ferry_now_seconds() - t0;
    return st;
}

void ferry_batcher_get_stats(const ferry_batcher *b, ferry_batcher_stats *out)
{
    if (b && out)
        *out = b->stats;
}

const int64_t *ferry_batcher_layer_loads(const ferry_batcher *b)
{
    return b ? b->layer_loads : NULL;
}

ferry_context *ferry_batcher_moe_context(ferry_batcher *b) { return b ? b->moe : NULL; }
