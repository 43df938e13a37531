/*
 * engine/context.c: the generation context and the forward pass (see context.h).
 *
 * One layer, for n tokens at positions pos0..pos0+n-1 (Hugging Face MixtralDecoderLayer):
 *   h = rmsnorm(x); q, k, v = h Wq^T, h Wk^T, h Wv^T; rope(q, k); k, v -> KV cache
 *   x = x + attention(q, cache) Wo^T
 *   h = rmsnorm(x); p = softmax(h Wg^T); top-k of p, renormalised
 *   x = x + sum_j w_j * (silu(h W1_e^T) * (h W3_e^T)) W2_e^T   over the chosen experts e
 * Experts run grouped: each chosen expert once over all the tokens routed to it.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/clock.h"
#include "core/error.h"
#include "engine/context.h"

#define FERRY_DEFAULT_BATCH 128
#define FERRY_LOGIT_ROWS 16
#define MIB(x) ((double)(x) / (1024.0 * 1024.0))
#define FERRY_DEFAULT_CTX_CAP 4096

ferry_context_params ferry_context_params_default(void)
{
    ferry_context_params p = {.n_ctx = 0, .n_batch = 0, .temperature = 0.0f, .top_k = 0, .top_p = 1.0f,
                              .seed = 0};
    return p;
}

static ferry_status dalloc(ferry_context *c, void **out, size_t n_elems, size_t elem_bytes,
                           const char *what)
{
    ferry_backend *be = c->m->be;
    if (n_elems != 0 && elem_bytes > SIZE_MAX / n_elems)
        return ferry_fail(FERRY_ERR_NOMEM, "context: %s needs more than SIZE_MAX bytes", what);
    ferry_status st = be->ops->alloc(be, n_elems * elem_bytes, out);
    if (st)
        return ferry_fail_prefix(st, "context: %s (%zu bytes)", what, n_elems * elem_bytes);
    return FERRY_OK;
}

static ferry_status halloc(void **out, size_t n_elems, size_t elem_bytes, const char *what)
{
    *out = calloc(n_elems ? n_elems : 1, elem_bytes);
    if (!*out)
        return ferry_fail(FERRY_ERR_NOMEM, "context: out of memory for %s", what);
    return FERRY_OK;
}

/* RoPE tables computed as Hugging Face does in float32: inv_freq = 1 / theta^(2i/dim),
 * angle = pos * inv_freq, then cos and sin of the float32 angle. */
static ferry_status build_rope_tables(ferry_context *c)
{
    const ferry_config *cfg = &c->m->cfg;
    int32_t half = cfg->head_dim / 2;
    size_t n = (size_t)c->n_ctx * (size_t)half;
    float *h_cos = malloc(n * sizeof *h_cos), *h_sin = malloc(n * sizeof *h_sin);
    float *inv = malloc((size_t)half * sizeof *inv);
    ferry_status st = FERRY_OK;
    if (!h_cos || !h_sin || !inv) {
        st = ferry_fail(FERRY_ERR_NOMEM, "context: out of memory for RoPE tables");
        goto done;
    }
    for (int32_t i = 0; i < half; i++) {
        float ex = (float)(2 * i) / (float)cfg->head_dim;
        inv[i] = 1.0f / powf(cfg->rope_theta, ex);
    }
    for (int32_t pos = 0; pos < c->n_ctx; pos++)
        for (int32_t i = 0; i < half; i++) {
            float angle = (float)pos * inv[i];
            h_cos[(size_t)pos * (size_t)half + (size_t)i] = (float)cos((double)angle);
            h_sin[(size_t)pos * (size_t)half + (size_t)i] = (float)sin((double)angle);
        }
    ferry_backend *be = c->m->be;
    if ((st = be->ops->upload(be, c->d_cos, h_cos, n * sizeof(float))))
        goto done;
    st = be->ops->upload(be, c->d_sin, h_sin, n * sizeof(float));
done:
    free(h_cos);
    free(h_sin);
    free(inv);
    return st;
}

/* The model's offload counters are shared by its contexts: a context reports the change
 * since it was created or reset. */
static void snapshot_offload_counters(ferry_context *c)
{
    ferry_prefetch_stats ps;
    ferry_store_stats ss;
    ferry_cache_get_stats(c->m->cache, c->layer_stats0);
    ferry_prefetch_get_stats(c->m->prefetch, &ps);
    ferry_store_get_stats(c->m->store, &ss);
    c->bytes_to_device0 = ps.bytes_to_device;
    c->copy_seconds0 = ps.copy_seconds;
    c->bytes_from_disk0 = ss.disk_bytes;
    ferry_prefetch_layer_bytes(c->m->prefetch, c->layer_device0);
    ferry_store_layer_disk_bytes(c->m->store, c->layer_disk0);
    memset(c->layer_stall, 0, (size_t)c->m->cfg.n_moe_layers * sizeof *c->layer_stall);
}

/* A device buffer of a context and the parts that use it (0: every context). */
typedef struct {
    void **ptr;
    size_t n_elems, elem_bytes;
    const char *what;
    unsigned part;
} ctx_buf;

ferry_status ferry_context_create(ferry_model *m, const ferry_context_params *p,
                                  ferry_context **out)
{
    return ferry_context_create_parts(m, p, FERRY_CONTEXT_ATTENTION | FERRY_CONTEXT_MOE, out);
}

ferry_status ferry_context_create_parts(ferry_model *m, const ferry_context_params *p,
                                        unsigned parts, ferry_context **out)
{
    if (!m || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_context_create: NULL argument");
    if (!parts || (parts & ~(unsigned)(FERRY_CONTEXT_ATTENTION | FERRY_CONTEXT_MOE)))
        return ferry_fail(FERRY_ERR_INVALID, "context parts 0x%x", parts);
    ferry_context_params defaults = ferry_context_params_default();
    if (!p)
        p = &defaults;
    const ferry_config *cfg = &m->cfg;
    int32_t n_ctx = p->n_ctx;
    if (n_ctx < 0)
        return ferry_fail(FERRY_ERR_INVALID, "context size %d must be positive", (int)n_ctx);
    if (n_ctx == 0)
        n_ctx = cfg->max_positions < FERRY_DEFAULT_CTX_CAP ? cfg->max_positions
                                                           : FERRY_DEFAULT_CTX_CAP;
    if (p->n_batch < 0)
        return ferry_fail(FERRY_ERR_INVALID, "batch size %d must be positive", (int)p->n_batch);
    if (n_ctx > cfg->max_positions)
        return ferry_fail(FERRY_ERR_INVALID,
                          "context size %d exceeds the model's max_position_embeddings %d",
                          (int)n_ctx, (int)cfg->max_positions);

    ferry_context *c = calloc(1, sizeof *c);
    if (!c)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for a context");
    c->m = m;
    c->p = *p;
    c->parts = parts;
    c->n_ctx = n_ctx;
    c->n_batch = p->n_batch ? p->n_batch : FERRY_DEFAULT_BATCH;
    if (c->n_batch > n_ctx)
        c->n_batch = n_ctx;

    size_t B = (size_t)c->n_batch, d = (size_t)cfg->hidden_size, ff = (size_t)cfg->intermediate_size;
    size_t dense_ff = (size_t)(cfg->dense_ff > cfg->shared_ff ? cfg->dense_ff : cfg->shared_ff);
    size_t k = (size_t)cfg->n_experts_per_tok, E = (size_t)cfg->n_experts;
    size_t q_dim = (size_t)cfg->n_heads * (size_t)cfg->head_dim;
    size_t kv_dim = (size_t)cfg->n_kv_heads * (size_t)cfg->head_dim;
    size_t kv_elems = (size_t)cfg->n_layers * (size_t)n_ctx * kv_dim;
    size_t rope_elems = (size_t)n_ctx * (size_t)(cfg->head_dim / 2);
    size_t used_before = m->be->ops->mem_used(m->be);
    ferry_status st;
    if ((st = ferry_sampler_init(&c->sampler, cfg->vocab_size, p->temperature, p->top_k, p->top_p,
                                 p->seed)))
        goto fail;
    /* each buffer with the parts that use it (0: every context) */
    const unsigned A = FERRY_CONTEXT_ATTENTION, M = FERRY_CONTEXT_MOE;
    const ctx_buf all_bufs[] = {
        {(void **)&c->d_k, kv_elems, sizeof(float), "key cache", A},
        {(void **)&c->d_v, kv_elems, sizeof(float), "value cache", A},
        {(void **)&c->d_cos, rope_elems, sizeof(float), "RoPE cos", A},
        {(void **)&c->d_sin, rope_elems, sizeof(float), "RoPE sin", A},
        {(void **)&c->d_x, B * d, sizeof(float), "residual", 0},
        {(void **)&c->d_h, B * d, sizeof(float), "normed", 0},
        {(void **)&c->d_q, B * q_dim, sizeof(float), "queries", A},
        {(void **)&c->d_att, B * q_dim, sizeof(float), "attention", A},
        {(void **)&c->d_router, B * E, sizeof(float), "router logits", 0},
        {(void **)&c->d_experts, B * k, sizeof(int32_t), "routing", 0},
        {(void **)&c->d_weights, B * k, sizeof(float), "routing weights", 0},
        {(void **)&c->d_xe, B * d, sizeof(float), "expert input", M},
        {(void **)&c->d_a, B * ff, sizeof(float), "expert gate", M},
        {(void **)&c->d_b, B * ff, sizeof(float), "expert up", M},
        {(void **)&c->d_ye, B * d, sizeof(float), "expert output", M},
        {(void **)&c->d_eo, B * k * d, sizeof(float), "expert outputs", M},
        {(void **)&c->d_moe, B * d, sizeof(float), "MoE output", M},
        {(void **)&c->d_fa, B * dense_ff, sizeof(float), "dense MLP gate", 0},
        {(void **)&c->d_fb, B * dense_ff, sizeof(float), "dense MLP up", 0},
        {(void **)&c->d_fo, dense_ff ? B * d : 0, sizeof(float), "dense MLP output", 0},
        {(void **)&c->d_sg, cfg->shared_ff ? B : 0, sizeof(float), "shared expert gate", M},
        {(void **)&c->d_cpu_out, m->hybrid != FERRY_HYBRID_OFF ? B * k * d : 0, sizeof(float),
         "CPU expert outputs", M},
        {(void **)&c->d_logits, (B < FERRY_LOGIT_ROWS ? B : FERRY_LOGIT_ROWS) *
                                    (size_t)cfg->vocab_size, sizeof(float), "logits", 0},
    };
    ctx_buf bufs[sizeof all_bufs / sizeof all_bufs[0]];
    size_t n_bufs = 0;
    for (size_t i = 0; i < sizeof all_bufs / sizeof all_bufs[0]; i++)
        if (all_bufs[i].n_elems > 0 && (!all_bufs[i].part || (all_bufs[i].part & parts)))
            bufs[n_bufs++] = all_bufs[i];
    if (m->store) {
        /* with a device budget, say up front what this context needs next to the rest */
        size_t kv_bytes = 2 * kv_elems * sizeof(float), all = 0;
        for (size_t i = 0; i < n_bufs; i++)
            all += (bufs[i].n_elems * bufs[i].elem_bytes + 255) / 256 * 256;
        size_t slot = (ferry_store_max_expert_bytes(m->store) + 255) / 256 * 256;
        size_t slots = m->cache ? 0 : (size_t)cfg->n_experts_per_tok * slot;
        size_t budget = m->be->ops->mem_capacity(m->be);
        if (used_before + all + slots > budget) {
            st = ferry_fail(FERRY_ERR_NOMEM,
                            "--gpu-mem %.1f MiB is too small for a context of %d tokens: dense "
                            "weights %.1f MiB + KV cache %.1f MiB + workspace %.1f MiB + %d "
                            "expert slots x %.2f MiB need %.1f MiB (%zu bytes); raise --gpu-mem "
                            "or lower --ctx",
                            MIB(budget), (int)n_ctx, MIB(m->dense_bytes), MIB(kv_bytes),
                            MIB(all - kv_bytes), m->cache ? 0 : (int)cfg->n_experts_per_tok,
                            MIB(slot), MIB(used_before + all + slots), used_before + all + slots);
            goto fail;
        }
    }
    for (size_t i = 0; i < n_bufs; i++)
        if ((st = dalloc(c, bufs[i].ptr, bufs[i].n_elems, bufs[i].elem_bytes, bufs[i].what)))
            goto fail;
    if ((st = halloc((void **)&c->h_router, B * E, sizeof(float), "router logits")) ||
        (st = halloc((void **)&c->h_experts, B * k, sizeof(int32_t), "routing")) ||
        (st = halloc((void **)&c->h_weights, B * k, sizeof(float), "routing weights")) ||
        (st = halloc((void **)&c->h_hidden, B * d, sizeof(float), "hidden states")))
        goto fail;
    if ((st = ferry_dispatch_init(&c->dispatch, cfg->n_experts, (int32_t)(B * k))))
        goto fail;
    if ((parts & FERRY_CONTEXT_ATTENTION) && (st = build_rope_tables(c)))
        goto fail;
    if (m->hybrid != FERRY_HYBRID_OFF && (parts & FERRY_CONTEXT_MOE)) {
        if ((st = ferry_hybrid_create(m, c->n_batch, &c->hybrid)) ||
            (st = halloc((void **)&c->h_on_cpu, E, 1, "hybrid plan")) ||
            (st = halloc((void **)&c->h_cpu_list, E, sizeof(int32_t), "hybrid plan")) ||
            (st = halloc((void **)&c->h_miss, E, sizeof(int32_t), "hybrid plan")) ||
            (st = halloc((void **)&c->h_items, E, sizeof(ferry_hybrid_item), "hybrid plan")) ||
            (st = halloc((void **)&c->layer_cpu_experts, (size_t)cfg->n_moe_layers, sizeof(int64_t),
                         "statistics")) ||
            (st = halloc((void **)&c->layer_cpu_tokens, (size_t)cfg->n_moe_layers, sizeof(int64_t),
                         "statistics")))
            goto fail;
    }
    if (m->store) {
        if ((st = halloc((void **)&c->prev_used, (size_t)cfg->n_moe_layers * E, 1, "routing history")) ||
            (st = halloc((void **)&c->held_slot, E, sizeof(int32_t), "expert slots")) ||
            (st = halloc((void **)&c->held_expert, E, sizeof(int32_t), "expert slots")) ||
            (st = halloc((void **)&c->held_ready, E, 1, "expert slots")) ||
            (st = halloc((void **)&c->layer_stats0, (size_t)cfg->n_moe_layers,
                         sizeof(ferry_cache_layer_stats), "cache statistics")) ||
            (st = halloc((void **)&c->layer_device0, (size_t)cfg->n_moe_layers, sizeof(uint64_t),
                         "statistics")) ||
            (st = halloc((void **)&c->layer_disk0, (size_t)cfg->n_moe_layers, sizeof(uint64_t),
                         "statistics")) ||
            (st = halloc((void **)&c->layer_stall, (size_t)cfg->n_moe_layers, sizeof(double),
                         "statistics")))
            goto fail;
        if (m->params.predictor != FERRY_PREDICT_RECENCY) {
            ferry_predictor_params pp = {.n_layers = cfg->n_moe_layers,
                                         .n_experts = cfg->n_experts,
                                         .top_k = cfg->n_experts_per_tok,
                                         .d_model = cfg->hidden_size,
                                         .rms_eps = cfg->rms_eps,
                                         .gates = m->gates,
                                         .ffn_norms = m->ffn_norms,
                                         .stats = m->route_stats};
            if ((st = ferry_predictor_create(ferry_predictor_kind_of(m->params.predictor), &pp,
                                              &c->predictor)) ||
                (st = halloc((void **)&c->h_scores, E, sizeof(float), "predictor scores")) ||
                (st = halloc((void **)&c->h_top, E, sizeof(int32_t), "predictor scores")) ||
                (st = halloc((void **)&c->pred_top, (size_t)cfg->n_moe_layers * 4 * k, sizeof(int32_t),
                             "predictions")) ||
                (st = halloc((void **)&c->pred_valid, (size_t)cfg->n_moe_layers * 4, 1, "predictions")))
                goto fail;
        }
        pthread_mutex_lock(&m->lock);
        if (!m->slots_planned && !m->defer_plan)
            st = ferry_model_plan_slots(m, m->be->ops->mem_used(m->be) - used_before);
        pthread_mutex_unlock(&m->lock);
        if (st)
            goto fail;
        if (m->cache)
            snapshot_offload_counters(c);
    }
    *out = c;
    return FERRY_OK;
fail:
    ferry_context_free(c);
    return st;
}

void ferry_context_free(ferry_context *c)
{
    if (!c)
        return;
    ferry_backend *be = c->m->be;
    void *dev[] = {c->d_k,  c->d_v,      c->d_cos,     c->d_sin,     c->d_x,  c->d_h,
                   c->d_q,  c->d_att,    c->d_router,  c->d_experts, c->d_weights,
                   c->d_xe, c->d_a,      c->d_b,       c->d_ye,      c->d_eo, c->d_moe,
                   c->d_logits, c->d_cpu_out, c->d_fa, c->d_fb, c->d_fo, c->d_sg};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        if (dev[i])
            be->ops->free(be, dev[i]);
    free(c->h_router);
    free(c->h_experts);
    free(c->h_weights);
    free(c->h_hidden);
    free(c->prev_used);
    free(c->held_slot);
    free(c->held_expert);
    free(c->held_ready);
    free(c->layer_stats0);
    free(c->layer_device0);
    free(c->layer_disk0);
    free(c->layer_stall);
    ferry_predictor_destroy(c->predictor);
    free(c->h_scores);
    free(c->h_top);
    free(c->pred_top);
    free(c->pred_valid);
    ferry_hybrid_destroy(c->hybrid); /* first: its worker may read the dispatch */
    free(c->h_on_cpu);
    free(c->h_cpu_list);
    free(c->h_miss);
    free(c->h_items);
    free(c->layer_cpu_experts);
    free(c->layer_cpu_tokens);
    ferry_dispatch_free(&c->dispatch);
    ferry_sampler_free(&c->sampler);
    free(c);
}

void ferry_context_reset(ferry_context *c)
{
    if (!c)
        return;
    c->n_past = 0;
    ferry_sampler_reseed(&c->sampler, c->p.seed); /* the same seed samples the same text */
    memset(&c->stats, 0, sizeof c->stats);
    c->stall_seconds = 0;
    if (c->m->cache)
        snapshot_offload_counters(c);
    if (c->hybrid) {
        memset(c->layer_cpu_experts, 0, (size_t)c->m->cfg.n_moe_layers * sizeof(int64_t));
        memset(c->layer_cpu_tokens, 0, (size_t)c->m->cfg.n_moe_layers * sizeof(int64_t));
        c->cpu_bytes = 0;
        c->cpu_seconds = c->cpu_wait_seconds = 0;
    }
    if (c->predictor) {
        ferry_predictor_reset(c->predictor);
        memset(c->pred_valid, 0, (size_t)c->m->cfg.n_moe_layers * 4);
        memset(c->pred_n, 0, sizeof c->pred_n);
        memset(c->pred_correct, 0, sizeof c->pred_correct);
    }
}

int32_t ferry_context_n_past(const ferry_context *c) { return c ? c->n_past : 0; }

int32_t ferry_context_n_ctx(const ferry_context *c) { return c ? c->n_ctx : 0; }

void ferry_context_set_observer(ferry_context *c, const ferry_observer *obs)
{
    if (obs)
        c->obs = *obs;
    else
        memset(&c->obs, 0, sizeof c->obs);
}

/* Applies expert e to the tokens the dispatch routed to it, writing their output rows. */
static ferry_status run_expert(ferry_context *c, int32_t e, const ferry_expert_weights *X)
{
    ferry_backend *be = c->m->be;
    const ferry_backend_ops *o = be->ops;
    int32_t d = c->m->cfg.hidden_size;
    int32_t me = ferry_dispatch_count(&c->dispatch, e), off = c->dispatch.offsets[e];
    TRY(o->gather_rows(be, c->d_xe, c->d_h, c->dispatch.tokens + off, me, d));
    TRY(ferry_expert_ffn(be, X, c->d_xe, me, c->d_a, c->d_b, c->d_ye));
    TRY(o->scatter_rows(be, c->d_eo, c->d_ye, c->dispatch.rows + off, me, d));
    return FERRY_OK;
}

/* The weights of the expert held in a device slot: [w1 | w3 | w2] as the store lays it out. */
static ferry_expert_weights slot_weights(const ferry_model *m, int32_t layer, int32_t e,
                                         int32_t slot)
{
    return ferry_model_expert_at(m, layer, e, m->d_slots + (size_t)slot * m->slot_bytes);
}

/* Computes and releases the experts held in this wave: ready ones first, then each one in
 * flight as soon as it lands, so a miss only holds up the work that needs it. */
static ferry_status run_wave(ferry_context *c, int32_t layer, int32_t n_held)
{
    ferry_model *m = c->m;
    ferry_status st = FERRY_OK;
    for (int pass = 0; pass < 2; pass++)
        for (int32_t i = 0; i < n_held; i++) {
            if (c->held_slot[i] < 0 || (pass == 0 && !c->held_ready[i]))
                continue;
            int32_t slot = c->held_slot[i], e = c->held_expert[i];
            if (st == FERRY_OK && pass == 1) {
                double t0 = ferry_now_seconds();
                if (ferry_cache_wait_ready(m->cache, slot) != FERRY_OK)
                    st = ferry_prefetch_failure(m->prefetch, layer, e);
                double dt = ferry_now_seconds() - t0;
                c->stall_seconds += dt;
                c->layer_stall[layer] += dt;
            }
            if (st == FERRY_OK) {
                ferry_expert_weights X = slot_weights(m, layer, e, slot);
                st = run_expert(c, e, &X);
            }
            ferry_cache_release(m->cache, slot);
            c->held_slot[i] = -1;
        }
    return st;
}

/* The CPU's share of layer l: experts[0..n_experts) over their tokens among the n rows of
 * c->d_h, computed by the hybrid worker while this thread goes on with the device. */
static ferry_status cpu_share_start(ferry_context *c, int32_t l, const int32_t *experts,
                                    int32_t n_experts, int32_t n)
{
    ferry_backend *be = c->m->be;
    size_t d = (size_t)c->m->cfg.hidden_size;
    TRY(be->ops->download(be, ferry_hybrid_input(c->hybrid), c->d_h,
                          (size_t)n * d * sizeof(float)));
    TRY(ferry_hybrid_start(c->hybrid, l, &c->dispatch, experts, n_experts));
    c->layer_cpu_experts[l] += n_experts;
    for (int32_t i = 0; i < n_experts; i++)
        c->layer_cpu_tokens[l] += ferry_dispatch_count(&c->dispatch, experts[i]);
    return FERRY_OK;
}

/* Waits for the CPU's share and, when apply, puts its rows into the expert outputs. Always
 * called after a successful start, also when the device's share failed (apply 0), so the
 * worker is done with the dispatch before anything changes it. */
static ferry_status cpu_share_finish(ferry_context *c, int apply)
{
    ferry_backend *be = c->m->be;
    int32_t d = c->m->cfg.hidden_size;
    const float *out;
    const int32_t *rows;
    int32_t n_rows;
    uint64_t n_bytes;
    double busy, t0 = ferry_now_seconds();
    ferry_status st = ferry_hybrid_finish(c->hybrid, &out, &rows, &n_rows, &n_bytes, &busy);
    c->cpu_wait_seconds += ferry_now_seconds() - t0;
    if (st || !apply)
        return st;
    c->cpu_bytes += n_bytes;
    c->cpu_seconds += busy;
    TRY(be->ops->upload(be, c->d_cpu_out, out, (size_t)n_rows * (size_t)d * sizeof(float)));
    TRY(be->ops->scatter_rows(be, c->d_eo, c->d_cpu_out, rows, n_rows, d));
    return FERRY_OK;
}

/* --hybrid cpu-experts: every expert of the layer-batch on the CPU. */
static ferry_status moe_cpu_experts(ferry_context *c, int32_t l, int32_t n)
{
    int32_t n_cpu = 0;
    for (int32_t e = 0; e < c->m->cfg.n_experts; e++)
        if (ferry_dispatch_count(&c->dispatch, e) > 0)
            c->h_cpu_list[n_cpu++] = e;
    if (n_cpu == 0)
        return FERRY_OK;
    TRY(cpu_share_start(c, l, c->h_cpu_list, n_cpu, n));
    return cpu_share_finish(c, 1);
}

/* --hybrid auto: the cost model splits the layer-batch's misses (experts in no slot, not
 * even in flight) between fetching and the CPU. Marks the CPU's in h_on_cpu and lists them
 * in h_cpu_list; returns how many. */
static int32_t plan_misses(ferry_context *c, int32_t l)
{
    ferry_model *m = c->m;
    int32_t E = m->cfg.n_experts, n_miss = 0, n_cpu = 0;
    size_t n_bytes = ferry_model_expert_bytes(m);
    memset(c->h_on_cpu, 0, (size_t)E);
    if (m->hybrid != FERRY_HYBRID_AUTO)
        return 0;
    for (int32_t e = 0; e < E; e++) {
        int32_t me = ferry_dispatch_count(&c->dispatch, e);
        if (me > 0 && ferry_cache_find(m->cache, l, e, NULL) < 0) {
            c->h_miss[n_miss] = e;
            c->h_items[n_miss] = (ferry_hybrid_item){n_bytes, me};
            n_miss++;
        }
    }
    uint8_t on_cpu[FERRY_CONFIG_MAX_EXPERTS];
    ferry_hybrid_plan(&m->hybrid_cost, c->h_items, n_miss, on_cpu, NULL, NULL);
    for (int32_t i = 0; i < n_miss; i++)
        if (on_cpu[i]) {
            c->h_on_cpu[c->h_miss[i]] = 1;
            c->h_cpu_list[n_cpu++] = c->h_miss[i];
        }
    return n_cpu;
}

/* Experts come through the cache, except those the CPU computes: acquire every other
 * expert the layer needs (hits are pinned, misses queued as demand fills), in waves when
 * the cache cannot pin them all at once; then tell the prefetcher what the next layer used
 * last time. */
static ferry_status moe_device_share(ferry_context *c, int32_t l)
{
    ferry_model *m = c->m;
    const ferry_config *cfg = &m->cfg;
    int32_t E = cfg->n_experts;
    uint8_t *used = c->prev_used + (size_t)l * (size_t)E;

    /* The recency guess for the next layer: the experts it used in the previous step. It
     * drives prefetching and the predicted eviction policy when no predictor is chosen. */
    int recency = m->params.predictor == FERRY_PREDICT_RECENCY;
    if (recency && m->params.policy == FERRY_CACHE_PREDICTED && l + 1 < cfg->n_moe_layers) {
        const uint8_t *next = c->prev_used + (size_t)(l + 1) * (size_t)E;
        float scores[1024];
        for (int32_t e = 0; e < E && e < 1024; e++)
            scores[e] = next[e] ? 1.0f : 0.0f;
        ferry_cache_set_scores(m->cache, l + 1, scores);
    }
    if (recency && m->params.prefetch && l + 1 < cfg->n_moe_layers) {
        const uint8_t *next = c->prev_used + (size_t)(l + 1) * (size_t)E;
        int32_t hint[1024], n_hint = 0;
        for (int32_t e = 0; e < E && n_hint < 1024; e++)
            if (next[e])
                hint[n_hint++] = e;
        if (n_hint > 0)
            ferry_prefetch_hint(m->prefetch, l + 1, hint, NULL, n_hint);
    }

    int32_t e = 0, n_held = 0;
    while (e < E) {
        if (ferry_dispatch_count(&c->dispatch, e) == 0 || (c->h_on_cpu && c->h_on_cpu[e])) {
            used[e] = ferry_dispatch_count(&c->dispatch, e) > 0;
            e++;
            continue;
        }
        int32_t slot;
        ferry_cache_result res;
        ferry_status st = ferry_cache_acquire(m->cache, l, e, 1, &slot, &res);
        if (st == FERRY_ERR_NOMEM) {
            if (n_held > 0) {
                TRY(run_wave(c, l, n_held)); /* frees our pins, then retry */
                n_held = 0;
                continue;
            }
            /* every slot is pinned by prefetches in flight: they finish on their own */
            struct timespec ts = {0, 100000};
            nanosleep(&ts, NULL);
            continue;
        }
        if (st)
            return st;
        used[e] = 1;
        if (res == FERRY_CACHE_FILL) {
            if ((st = ferry_prefetch_demand(m->prefetch, l, e, slot))) {
                ferry_cache_mark_failed(m->cache, slot);
                ferry_cache_release(m->cache, slot);
                return st;
            }
        } else if (res == FERRY_CACHE_PENDING) {
            ferry_prefetch_promote(m->prefetch, l, e);
        }
        c->held_slot[n_held] = slot;
        c->held_expert[n_held] = e;
        c->held_ready[n_held] = res == FERRY_CACHE_HIT;
        n_held++;
        e++;
    }
    ferry_prefetch_cancel(m->prefetch, l); /* queued prefetches this layer did not need */
    return run_wave(c, l, n_held);
}

/* The offloaded MoE block's experts: the CPU's share (--hybrid auto) started first, the
 * device's share meanwhile, then the CPU's rows put in place. */
static ferry_status moe_offloaded(ferry_context *c, int32_t l, int32_t n)
{
    int32_t n_cpu = c->hybrid ? plan_misses(c, l) : 0;
    if (n_cpu > 0)
        TRY(cpu_share_start(c, l, c->h_cpu_list, n_cpu, n));
    ferry_status st = moe_device_share(c, l);
    if (n_cpu > 0) {
        ferry_status st2 = cpu_share_finish(c, st == FERRY_OK);
        if (st == FERRY_OK)
            st = st2;
    }
    return st;
}

/* During decode, after layer l: scores the live prediction made earlier for this layer,
 * feeds the predictor the token's hidden state and experts, and prefetches (and scores,
 * for the predicted policy) the experts it names for layers l+1 .. l+lookahead. */
static ferry_status predict_after_layer(ferry_context *c, int32_t l)
{
    ferry_model *m = c->m;
    const ferry_config *cfg = &m->cfg;
    int32_t E = cfg->n_experts, k = cfg->n_experts_per_tok;
    ferry_backend *be = m->be;
    for (int32_t d = 1; d <= 3; d++) {
        uint8_t *valid = &c->pred_valid[(size_t)l * 4 + (size_t)d];
        if (!*valid)
            continue;
        const int32_t *pred = c->pred_top + ((size_t)l * 4 + (size_t)d) * (size_t)k;
        for (int32_t i = 0; i < k; i++)
            for (int32_t j = 0; j < k; j++)
                c->pred_correct[d] += pred[i] == c->h_experts[j];
        c->pred_n[d]++;
        *valid = 0;
    }
    TRY(be->ops->download(be, c->h_hidden, c->d_x, (size_t)cfg->hidden_size * sizeof(float)));
    ferry_predictor_observe(c->predictor, l, c->h_hidden, c->h_experts);
    for (int32_t d = 1; d <= m->params.lookahead && l + d < cfg->n_moe_layers; d++) {
        TRY(ferry_predictor_predict(c->predictor, l, d, c->h_scores));
        int32_t *pred = c->pred_top + ((size_t)(l + d) * 4 + (size_t)d) * (size_t)k;
        ferry_predictor_top(c->h_scores, E, k, pred);
        c->pred_valid[(size_t)(l + d) * 4 + (size_t)d] = 1;
        if (m->params.policy == FERRY_CACHE_PREDICTED)
            ferry_cache_set_scores(m->cache, l + d, c->h_scores);
        if (m->params.prefetch) {
            float s[FERRY_CONFIG_MAX_EXPERTS];
            for (int32_t i = 0; i < k; i++)
                s[i] = c->h_scores[pred[i]];
            ferry_prefetch_hint(m->prefetch, l + d, pred, s, k);
        }
    }
    /* after the last layer, the next token's layer 0: the statistics' guess where the
     * predictor has one, else the experts this token used there */
    if (l == cfg->n_moe_layers - 1 && m->params.prefetch) {
        int32_t n = 0;
        if (ferry_predictor_predict_next_token(c->predictor, 0, c->h_scores) == FERRY_OK) {
            ferry_predictor_top(c->h_scores, E, k, c->h_top);
            n = k;
        } else {
            for (int32_t e = 0; e < E; e++)
                if (c->prev_used[e])
                    c->h_top[n++] = e;
        }
        ferry_prefetch_hint(m->prefetch, 0, c->h_top, NULL, n);
    }
    return FERRY_OK;
}

/* A dense SwiGLU MLP (a dense layer's, or a shared expert) over the n rows of c->d_h, into
 * c->d_fo. */
static ferry_status dense_ffn(ferry_context *c, const ferry_expert_weights *X, int32_t n)
{
    return ferry_expert_ffn(c->m->be, X, c->d_h, n, c->d_fa, c->d_fb, c->d_fo);
}

/* The MoE block of decoder layer l (MoE index ml) for n tokens: router, grouping by expert,
 * each chosen expert once over its tokens, weighted combine, plus the shared expert scaled
 * by its sigmoid gate where the family has one. Reads c->d_h, adds into c->d_x. */
static ferry_status moe_block(ferry_context *c, int32_t l, int32_t pos0, int32_t n)
{
    ferry_model *m = c->m;
    ferry_backend *be = m->be;
    const ferry_backend_ops *o = be->ops;
    const ferry_config *cfg = &m->cfg;
    const ferry_layer_weights *L = &m->layers[l];
    int32_t ml = L->moe;
    const ferry_moe_weights *M = &m->moe[ml];
    int32_t d = cfg->hidden_size, k = cfg->n_experts_per_tok;
    int32_t E = cfg->n_experts;
    if (!(c->parts & FERRY_CONTEXT_MOE))
        return ferry_fail(FERRY_ERR_INVALID, "an MoE block on a context made without one");

    TRY(o->matmul(be, c->d_router, c->d_h, &M->gate, n));
    TRY(o->router_topk(be, c->d_experts, c->d_weights, c->d_router, n, E, k, cfg->norm_topk));
    TRY(o->download(be, c->h_experts, c->d_experts, (size_t)n * (size_t)k * sizeof(int32_t)));
    if (c->obs.on_route) {
        TRY(o->download(be, c->h_weights, c->d_weights, (size_t)n * (size_t)k * sizeof(float)));
        TRY(o->download(be, c->h_router, c->d_router, (size_t)n * (size_t)E * sizeof(float)));
        c->obs.on_route(c->obs.user, ml, pos0, n, c->h_router, c->h_experts, c->h_weights);
    }
    TRY(ferry_dispatch_build(&c->dispatch, c->h_experts, n, k));
    if (m->hybrid == FERRY_HYBRID_CPU_EXPERTS) {
        TRY(moe_cpu_experts(c, ml, n));
    } else if (m->store) {
        TRY(moe_offloaded(c, ml, n));
    } else {
        for (int32_t e = 0; e < E; e++)
            if (ferry_dispatch_count(&c->dispatch, e) > 0)
                TRY(run_expert(c, e, &M->experts[e]));
    }
    TRY(o->combine(be, c->d_moe, c->d_eo, c->d_weights, n, k, d));
    if (cfg->shared_ff > 0) { /* routed sum + sigmoid(x . g) * shared(x), as Qwen2-MoE adds */
        TRY(dense_ffn(c, &L->shared, n));
        TRY(o->matmul(be, c->d_sg, c->d_h, &L->shared_gate, n));
        TRY(o->gate_rows(be, c->d_fo, c->d_sg, n, d));
        TRY(o->add(be, c->d_moe, c->d_fo, (size_t)n * (size_t)d));
    }
    TRY(o->add(be, c->d_x, c->d_moe, (size_t)n * (size_t)d));
    return FERRY_OK;
}

static ferry_status observe_hidden(ferry_context *c, int32_t layer, int32_t pos0, int32_t n,
                                   const float *d_rows)
{
    if (!c->obs.on_hidden)
        return FERRY_OK;
    ferry_backend *be = c->m->be;
    size_t bytes = (size_t)n * (size_t)c->m->cfg.hidden_size * sizeof(float);
    TRY(be->ops->download(be, c->h_hidden, d_rows, bytes));
    c->obs.on_hidden(c->obs.user, layer, pos0, n, c->h_hidden);
    return FERRY_OK;
}

/* The family's steps between the q/k/v projections and RoPE, in the Hugging Face order:
 * biases, then the q/k RMSNorms (over each head, or over the whole projection), then the
 * clamp of q, k and v. */
static ferry_status qkv_options(ferry_context *c, const ferry_layer_weights *L, float *k_new,
                                float *v_new, int32_t n)
{
    ferry_backend *be = c->m->be;
    const ferry_backend_ops *o = be->ops;
    const ferry_config *cfg = &c->m->cfg;
    int32_t q_dim = cfg->n_heads * cfg->head_dim, kv_dim = cfg->n_kv_heads * cfg->head_dim;
    if (cfg->qkv_bias) {
        TRY(o->add_bias(be, c->d_q, &L->bq, n, q_dim));
        TRY(o->add_bias(be, k_new, &L->bk, n, kv_dim));
        TRY(o->add_bias(be, v_new, &L->bv, n, kv_dim));
    }
    if (cfg->qk_norm == FERRY_QK_NORM_HEAD) {
        TRY(o->rmsnorm(be, c->d_q, c->d_q, &L->q_norm, n * cfg->n_heads, cfg->head_dim,
                       cfg->rms_eps));
        TRY(o->rmsnorm(be, k_new, k_new, &L->k_norm, n * cfg->n_kv_heads, cfg->head_dim,
                       cfg->rms_eps));
    } else if (cfg->qk_norm == FERRY_QK_NORM_FULL) {
        TRY(o->rmsnorm(be, c->d_q, c->d_q, &L->q_norm, n, q_dim, cfg->rms_eps));
        TRY(o->rmsnorm(be, k_new, k_new, &L->k_norm, n, kv_dim, cfg->rms_eps));
    }
    if (cfg->clip_qkv > 0) {
        TRY(o->clamp(be, c->d_q, (size_t)n * (size_t)q_dim, cfg->clip_qkv));
        TRY(o->clamp(be, k_new, (size_t)n * (size_t)kv_dim, cfg->clip_qkv));
        TRY(o->clamp(be, v_new, (size_t)n * (size_t)kv_dim, cfg->clip_qkv));
    }
    return FERRY_OK;
}

/* Layer l's attention half for the n tokens at positions n_past.. in c->d_x: attention
 * over the KV cache (appending the tokens' keys and values) added into c->d_x, then the
 * post-attention norm into c->d_h, ready for the MoE block. */
ferry_status ferry_context_attention(ferry_context *c, int32_t l, int32_t n)
{
    ferry_model *m = c->m;
    ferry_backend *be = m->be;
    const ferry_backend_ops *o = be->ops;
    const ferry_config *cfg = &m->cfg;
    const ferry_layer_weights *L = &m->layers[l];
    int32_t d = cfg->hidden_size, pos0 = c->n_past;
    size_t kv_dim = (size_t)cfg->n_kv_heads * (size_t)cfg->head_dim;
    size_t layer_kv = (size_t)c->n_ctx * kv_dim;
    ferry_attn_shape shape = {
        .n_heads = cfg->n_heads,
        .n_kv_heads = cfg->n_kv_heads,
        .head_dim = cfg->head_dim,
        .sliding_window = l >= cfg->sliding_from ? cfg->sliding_window : 0,
        .scale = 1.0f / sqrtf((float)cfg->head_dim),
    };
    if (!(c->parts & FERRY_CONTEXT_ATTENTION))
        return ferry_fail(FERRY_ERR_INVALID, "attention on a context made without it");
    float *k_cache = c->d_k + (size_t)l * layer_kv, *v_cache = c->d_v + (size_t)l * layer_kv;
    float *k_new = k_cache + (size_t)pos0 * kv_dim, *v_new = v_cache + (size_t)pos0 * kv_dim;

    TRY(o->rmsnorm(be, c->d_h, c->d_x, &L->attn_norm, n, d, cfg->rms_eps));
    TRY(o->matmul(be, c->d_q, c->d_h, &L->wq, n));
    TRY(o->matmul(be, k_new, c->d_h, &L->wk, n));
    TRY(o->matmul(be, v_new, c->d_h, &L->wv, n));
    TRY(qkv_options(c, L, k_new, v_new, n));
    TRY(o->rope(be, c->d_q, n, cfg->n_heads, cfg->head_dim, pos0, c->d_cos, c->d_sin));
    TRY(o->rope(be, k_new, n, cfg->n_kv_heads, cfg->head_dim, pos0, c->d_cos, c->d_sin));
    TRY(o->attention(be, c->d_att, c->d_q, k_cache, v_cache, n, pos0, &shape));
    TRY(o->matmul(be, c->d_h, c->d_att, &L->wo, n));
    if (cfg->o_bias)
        TRY(o->add_bias(be, c->d_h, &L->bo, n, d));
    TRY(o->add(be, c->d_x, c->d_h, (size_t)n * (size_t)d));
    TRY(o->rmsnorm(be, c->d_h, c->d_x, &L->ffn_norm, n, d, cfg->rms_eps));
    return FERRY_OK;
}

ferry_status ferry_context_moe(ferry_context *c, int32_t l, int32_t n)
{
    if (c->m->layers[l].moe >= 0)
        return moe_block(c, l, c->n_past, n);
    /* a dense MLP layer */
    ferry_backend *be = c->m->be;
    TRY(dense_ffn(c, &c->m->layers[l].mlp, n));
    return be->ops->add(be, c->d_x, c->d_fo, (size_t)n * (size_t)c->m->cfg.hidden_size);
}

ferry_status ferry_context_embed(ferry_context *c, const int32_t *ids, int32_t n)
{
    ferry_model *m = c->m;
    TRY(m->be->ops->embedding(m->be, c->d_x, &m->embed, ids, n));
    return observe_hidden(c, -1, c->n_past, n, c->d_x);
}

/* The final norm and LM head for the n tokens in c->d_x; writes logits of every row to
 * logits_all (n, V) and/or of the last row to logits_last, when not NULL; then the tokens
 * count as cached (n_past += n). */
ferry_status ferry_context_finish(ferry_context *c, int32_t n, float *logits_all,
                                  float *logits_last)
{
    ferry_model *m = c->m;
    ferry_backend *be = m->be;
    const ferry_backend_ops *o = be->ops;
    const ferry_config *cfg = &m->cfg;
    int32_t d = cfg->hidden_size, pos0 = c->n_past;
    int32_t first = logits_all ? 0 : n - 1;
    int32_t rows = n - first;
    if (logits_all || logits_last || c->obs.on_hidden) {
        size_t V = (size_t)cfg->vocab_size;
        TRY(o->rmsnorm(be, c->d_h, c->d_x + (size_t)first * (size_t)d, &m->final_norm, rows, d,
                       cfg->rms_eps));
        TRY(observe_hidden(c, cfg->n_layers, pos0 + first, rows, c->d_h));
        /* the LM head in groups of FERRY_LOGIT_ROWS rows: its output is the largest buffer */
        for (int32_t r0 = 0; r0 < rows; r0 += FERRY_LOGIT_ROWS) {
            int32_t nr = rows - r0 < FERRY_LOGIT_ROWS ? rows - r0 : FERRY_LOGIT_ROWS;
            TRY(o->matmul(be, c->d_logits, c->d_h + (size_t)r0 * (size_t)d, &m->lm_head, nr));
            if (logits_all)
                TRY(o->download(be, logits_all + (size_t)r0 * V, c->d_logits,
                                (size_t)nr * V * sizeof(float)));
            if (logits_last && r0 + nr == rows)
                TRY(o->download(be, logits_last, c->d_logits + (size_t)(nr - 1) * V,
                                V * sizeof(float)));
        }
    }
    c->n_past += n;
    return FERRY_OK;
}

/* One chunk of n <= n_batch tokens at positions n_past.. . Writes logits of every row to
 * logits_all (n, V) and/or of the last row to logits_last, when not NULL. */
static ferry_status forward_chunk(ferry_context *c, const int32_t *ids, int32_t n,
                                  float *logits_all, float *logits_last)
{
    const ferry_config *cfg = &c->m->cfg;
    TRY(ferry_context_embed(c, ids, n));
    for (int32_t l = 0; l < cfg->n_layers; l++) {
        TRY(ferry_context_attention(c, l, n));
        TRY(ferry_context_moe(c, l, n));
        if (c->predictor && n == 1 && cfg->moe_index[l] >= 0)
            TRY(predict_after_layer(c, cfg->moe_index[l]));
        TRY(observe_hidden(c, l, c->n_past, n, c->d_x));
    }
    return ferry_context_finish(c, n, logits_all, logits_last);
}

ferry_status ferry_context_forward(ferry_context *c, const int32_t *ids, int32_t n,
                                   float *logits_all, float *logits_last)
{
    if (!c || n <= 0 || !ids)
        return ferry_fail(FERRY_ERR_INVALID, "eval: need at least one token");
    if ((int64_t)c->n_past + n > c->n_ctx)
        return ferry_fail(FERRY_ERR_INVALID,
                          "context is full: %d tokens held + %d new exceed its capacity of %d "
                          "(raise --ctx, up to max_position_embeddings %d)",
                          (int)c->n_past, (int)n, (int)c->n_ctx, (int)c->m->cfg.max_positions);
    int32_t V = c->m->cfg.vocab_size;
    for (int32_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= V)
            return ferry_fail(FERRY_ERR_INVALID, "eval: token %d at index %d is outside [0, %d)",
                              (int)ids[i], (int)i, (int)V);

    double t0 = ferry_now_seconds();
    int32_t start_past = c->n_past;
    ferry_status st = FERRY_OK;
    pthread_mutex_lock(&c->m->lock);
    for (int32_t i = 0; i < n && st == FERRY_OK; i += c->n_batch) {
        int32_t chunk = n - i < c->n_batch ? n - i : c->n_batch;
        int last = i + chunk == n;
        st = forward_chunk(c, ids + i, chunk, logits_all ? logits_all + (size_t)i * (size_t)V : NULL,
                           last ? logits_last : NULL);
    }
    if (st == FERRY_OK) /* the work queued after the last download counts in the time */
        st = c->m->be->ops->synchronize(c->m->be);
    pthread_mutex_unlock(&c->m->lock);
    if (st) {
        c->n_past = start_past; /* the cache rows past n_past are garbage and get overwritten */
        return st;
    }
    double dt = ferry_now_seconds() - t0;
    if (n > 1) {
        c->stats.n_prompt_tokens += n;
        c->stats.prefill_seconds += dt;
    } else {
        c->stats.n_decode_tokens += n;
        c->stats.decode_seconds += dt;
    }
    return FERRY_OK;
}

ferry_status ferry_eval(ferry_context *c, const int32_t *ids, int32_t n, float *logits)
{
    return ferry_context_forward(c, ids, n, NULL, logits);
}

ferry_status ferry_context_get_stats(const ferry_context *c, ferry_stats *out)
{
    if (!c || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_context_get_stats: NULL argument");
    ferry_stats s = c->stats;
    s.prefill_tokens_per_s = s.prefill_seconds > 0 ? (double)s.n_prompt_tokens / s.prefill_seconds : 0;
    s.decode_tokens_per_s = s.decode_seconds > 0 ? (double)s.n_decode_tokens / s.decode_seconds : 0;
    *out = s;
    return FERRY_OK;
}

double ferry_expert_hit_rate(int64_t hits, int64_t misses, int64_t cpu_experts)
{
    int64_t uses = hits + misses + cpu_experts;
    return uses > 0 ? (double)hits / (double)uses : 0.0;
}

ferry_status ferry_context_get_offload_stats(const ferry_context *c, ferry_offload_stats *out,
                                             ferry_layer_stats *layers, int32_t n_layers)
{
    if (!c || !out || n_layers < 0 || (n_layers > 0 && !layers))
        return ferry_fail(FERRY_ERR_INVALID, "ferry_context_get_offload_stats: bad arguments");
    const ferry_model *m = c->m;
    ferry_offload_stats o;
    memset(&o, 0, sizeof o);
    o.hybrid = m->hybrid;
    for (int32_t l = 0; l < n_layers; l++)
        memset(&layers[l], 0, sizeof layers[l]);
    if (c->hybrid) {
        for (int32_t l = 0; l < m->cfg.n_moe_layers; l++) {
            int32_t dl = m->cfg.moe_layer[l]; /* the decoder layer the caller's table counts */
            o.cpu_experts += c->layer_cpu_experts[l];
            o.cpu_tokens += c->layer_cpu_tokens[l];
            if (dl < n_layers) {
                layers[dl].cpu_experts = c->layer_cpu_experts[l];
                layers[dl].cpu_tokens = c->layer_cpu_tokens[l];
            }
        }
        o.cpu_bytes = c->cpu_bytes;
        o.cpu_seconds = c->cpu_seconds;
        o.cpu_wait_seconds = c->cpu_wait_seconds;
        if (m->hybrid == FERRY_HYBRID_AUTO) {
            o.cost_fetch_bytes_per_s = m->hybrid_cost.fetch_bytes_per_s;
            o.cost_cpu_bytes_per_s = m->hybrid_cost.ref_bytes / m->hybrid_cost.cpu_seconds_1;
        }
    }
    if (m->hybrid == FERRY_HYBRID_CPU_EXPERTS) { /* experts on the host, none on the device */
        o.enabled = 1;
        o.tier = FERRY_OFFLOAD_RAM;
        o.budget_bytes = m->be->ops->mem_capacity(m->be);
        o.dense_bytes = m->dense_bytes;
    }
    if (!m->cache) {
        *out = o;
        return FERRY_OK;
    }
    int32_t L = m->cfg.n_moe_layers;
    ferry_cache_layer_stats *now = calloc((size_t)L, sizeof *now);
    uint64_t *dev = calloc((size_t)L, sizeof *dev), *disk = calloc((size_t)L, sizeof *disk);
    if (!now || !dev || !disk) {
        free(now);
        free(dev);
        free(disk);
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory");
    }
    ferry_cache_get_stats(m->cache, now);
    ferry_prefetch_layer_bytes(m->prefetch, dev);
    ferry_store_layer_disk_bytes(m->store, disk);
    for (int32_t l = 0; l < L; l++) {
        const ferry_cache_layer_stats *a = &now[l], *b = &c->layer_stats0[l];
        ferry_layer_stats d = {a->hits - b->hits,
                               a->misses - b->misses,
                               a->prefetch_issued - b->prefetch_issued,
                               a->prefetch_used - b->prefetch_used,
                               a->prefetch_wasted - b->prefetch_wasted,
                               a->evictions - b->evictions,
                               dev[l] - c->layer_device0[l],
                               disk[l] - c->layer_disk0[l],
                               c->layer_stall[l],
                               c->hybrid ? c->layer_cpu_experts[l] : 0,
                               c->hybrid ? c->layer_cpu_tokens[l] : 0};
        if (m->cfg.moe_layer[l] < n_layers)
            layers[m->cfg.moe_layer[l]] = d;
        o.hits += d.hits;
        o.misses += d.misses;
        o.prefetch_issued += d.prefetch_issued;
        o.prefetch_used += d.prefetch_used;
        o.prefetch_wasted += d.prefetch_wasted;
    }
    free(now);
    free(dev);
    free(disk);
    ferry_prefetch_stats ps;
    ferry_prefetch_get_stats(m->prefetch, &ps);
    ferry_store_stats ss;
    ferry_store_get_stats(m->store, &ss);
    o.enabled = 1;
    o.tier = ferry_store_tier(m->store) == FERRY_TIER_NVME ? FERRY_OFFLOAD_NVME : FERRY_OFFLOAD_RAM;
    o.uses_uring = ss.uses_uring;
    o.n_slots = m->n_slots;
    o.slot_bytes = m->slot_bytes;
    o.budget_bytes = m->be->ops->mem_capacity(m->be);
    o.dense_bytes = m->dense_bytes;
    o.context_bytes = m->context_bytes;
    o.slots_bytes = (uint64_t)m->n_slots * m->slot_bytes;
    o.bytes_to_device = ps.bytes_to_device - c->bytes_to_device0;
    o.copy_seconds = ps.copy_seconds - c->copy_seconds0;
    o.bytes_from_disk = ss.disk_bytes - c->bytes_from_disk0;
    o.stall_seconds = c->stall_seconds;
    o.predictor = m->params.predictor;
    for (int32_t d = 1; d <= 3; d++) {
        int32_t k = m->cfg.n_experts_per_tok;
        o.predictions[d] = c->pred_n[d];
        o.precision[d] = c->pred_n[d] ? (double)c->pred_correct[d] / ((double)c->pred_n[d] * k) : 0;
        o.recall[d] = o.precision[d]; /* k predicted, k chosen */
    }
    *out = o;
    return FERRY_OK;
}
