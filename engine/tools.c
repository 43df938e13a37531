/*
 * engine/tools.c: routing traces of text, fitting and evaluating routing predictors, and
 * perplexity, and the packed expert file, quantized or not (the library side of `ferry
 * trace`, `ferry sim`, `ferry predictor fit|eval`, `ferry perplexity` and `ferry pack`).
 *
 * Text is tokenized once, without BOS, and cut into sequences of seq_len - 1 tokens, each
 * run with BOS in front on an empty KV cache, in one forward per sequence with an observer
 * collecting every layer's routing (and hidden states, for predictor evaluation). The BOS
 * position is part of each sequence's trace, as it is part of every real sequence.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/clock.h"
#include "core/error.h"
#include "core/pool.h"
#include "core/progress.h"
#include "engine/context.h"
#include "engine/quantize.h"
#include "engine/sim.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/quant.h"
#include "offload/topology.h"
#include "predictor/predictor.h"
#include "predictor/trace.h"

/* What the observer collects for one sequence. */
typedef struct {
    int32_t n_layers, n_experts, k, d; /* n_layers: the sparse layers, by MoE index */
    int32_t cap;      /* positions */
    uint8_t *experts; /* (cap, n_layers, k) trace order */
    float *probs;     /* (cap, n_layers, n_experts) or NULL */
    float *hidden;    /* (cap, n_layers, d) after each sparse layer, or NULL */
    const ferry_config *cfg; /* maps the observer's decoder layers to MoE indices */
} seq_record;

static void record_route(void *user, int32_t layer, int32_t pos0, int32_t n, const float *logits,
                         const int32_t *experts, const float *weights)
{
    seq_record *r = user;
    (void)weights;
    for (int32_t t = 0; t < n; t++) {
        size_t row = (size_t)(pos0 + t) * (size_t)r->n_layers + (size_t)layer;
        for (int32_t j = 0; j < r->k; j++)
            r->experts[row * (size_t)r->k + (size_t)j] = (uint8_t)experts[(size_t)t * r->k + j];
        if (r->probs) {
            const float *lg = logits + (size_t)t * (size_t)r->n_experts;
            float *p = r->probs + row * (size_t)r->n_experts;
            float mx = lg[0], sum = 0;
            for (int32_t e = 1; e < r->n_experts; e++)
                mx = lg[e] > mx ? lg[e] : mx;
            for (int32_t e = 0; e < r->n_experts; e++)
                sum += p[e] = expf(lg[e] - mx);
            for (int32_t e = 0; e < r->n_experts; e++)
                p[e] /= sum;
        }
    }
}

static void record_hidden(void *user, int32_t layer, int32_t pos0, int32_t n, const float *h)
{
    seq_record *r = user;
    if (!r->hidden || layer < 0 || layer >= r->cfg->n_layers || r->cfg->moe_index[layer] < 0)
        return;
    layer = r->cfg->moe_index[layer]; /* the state after a sparse layer, by its MoE index */
    for (int32_t t = 0; t < n; t++)
        memcpy(r->hidden + ((size_t)(pos0 + t) * (size_t)r->n_layers + (size_t)layer) * (size_t)r->d,
               h + (size_t)t * (size_t)r->d, (size_t)r->d * sizeof(float));
}

/* The text's tokens without BOS, in a fresh array. */
static ferry_status tokenize_all(ferry_model *m, const char *text, size_t len, int32_t **ids,
                                 int32_t *n)
{
    int32_t count = 0;
    ferry_status st = ferry_tokenize(m, text, len, 0, NULL, 0, &count);
    if (st != FERRY_OK && st != FERRY_ERR_INVALID)
        return st;
    if (count == 0)
        return ferry_fail(FERRY_ERR_INVALID, "the text has no tokens");
    int32_t *v = malloc((size_t)count * sizeof *v);
    if (!v)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for %d tokens", (int)count);
    if ((st = ferry_tokenize(m, text, len, 0, v, count, &count))) {
        free(v);
        return st;
    }
    *ids = v;
    *n = count;
    return FERRY_OK;
}

/* Runs every sequence of the text through the model; calls each(user, record, n_positions)
 * after each sequence, and reports the tokens run as what (NULL: no progress). */
typedef ferry_status (*seq_fn)(void *user, const seq_record *r, int32_t n);

static ferry_status run_sequences(ferry_model *m, const char *text, size_t len, int32_t seq_len,
                                  int with_probs, int with_hidden, const char *what, seq_fn each,
                                  void *user)
{
    if (seq_len < 2)
        return ferry_fail(FERRY_ERR_INVALID, "sequence length %d: need at least 2 (BOS and a "
                                             "token)", (int)seq_len);
    const ferry_config *cfg = &m->cfg;
    int32_t *ids = NULL, n_ids = 0, *seq = NULL, i = 0;
    int reporting = 0; /* progress reports began: they end at done */
    ferry_context *c = NULL;
    seq_record r = {cfg->n_moe_layers, cfg->n_experts, cfg->n_experts_per_tok, cfg->hidden_size,
                    seq_len, NULL, NULL, NULL, cfg};
    ferry_status st = tokenize_all(m, text, len, &ids, &n_ids);
    if (st)
        return st;
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = seq_len;
    if ((st = ferry_context_create(m, &cp, &c)))
        goto done;
    seq = malloc((size_t)seq_len * sizeof *seq);
    r.experts = malloc((size_t)seq_len * (size_t)r.n_layers * (size_t)r.k);
    if (with_probs)
        r.probs = malloc((size_t)seq_len * (size_t)r.n_layers * (size_t)r.n_experts * sizeof(float));
    if (with_hidden)
        r.hidden = calloc((size_t)seq_len * (size_t)r.n_layers * (size_t)r.d, sizeof(float));
    if (!seq || !r.experts || (with_probs && !r.probs) || (with_hidden && !r.hidden)) {
        st = ferry_fail(FERRY_ERR_NOMEM, "out of memory for a sequence of %d tokens", (int)seq_len);
        goto done;
    }
    ferry_observer obs = {
        .on_route = record_route, .on_hidden = with_hidden ? record_hidden : NULL, .user = &r};
    ferry_context_set_observer(c, &obs);
    int32_t bos = m->cfg.bos_id >= 0 ? m->cfg.bos_id : ferry_tokenizer_bos_id(m->tok);
    if (what)
        ferry_progress_report(what, 0, (uint64_t)n_ids, "tokens");
    reporting = what != NULL;
    for (; i < n_ids; i += seq_len - 1) {
        int32_t n = n_ids - i < seq_len - 1 ? n_ids - i : seq_len - 1;
        int32_t at = 0;
        if (bos >= 0)
            seq[at++] = bos;
        memcpy(seq + at, ids + i, (size_t)n * sizeof *seq);
        ferry_context_reset(c);
        if ((st = ferry_context_forward(c, seq, at + n, NULL, NULL)))
            goto done;
        if ((st = each(user, &r, at + n)))
            goto done;
        if (reporting)
            ferry_progress_report(what, (uint64_t)(i + n), (uint64_t)n_ids, "tokens");
    }
done:
    if (reporting && st)
        ferry_progress_report(what, (uint64_t)i, 0, "tokens");
    free(ids);
    free(seq);
    free(r.experts);
    free(r.probs);
    free(r.hidden);
    ferry_context_free(c);
    return st;
}

static ferry_status append_to_trace(void *user, const seq_record *r, int32_t n)
{
    return ferry_trace_append(user, n, r->experts, r->probs);
}

ferry_status ferry_trace_text(ferry_model *m, const char *text, size_t len, int32_t seq_len,
                              int with_probs, const char *out_path, int64_t *n_tokens)
{
    if (!m || (!text && len) || !out_path)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_trace_text: NULL argument");
    if (m->cfg.n_experts > 256)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "a trace stores expert ids as bytes: %d experts",
                          (int)m->cfg.n_experts);
    ferry_trace *tr;
    ferry_status st = ferry_trace_create(m->cfg.n_moe_layers, m->cfg.n_experts,
                                         m->cfg.n_experts_per_tok, with_probs, m->name, &tr);
    if (st)
        return st;
    if ((st = run_sequences(m, text, len, seq_len, with_probs, 0, "tracing routing",
                            append_to_trace, tr)) == FERRY_OK)
        st = ferry_trace_save(tr, out_path);
    if (st == FERRY_OK && n_tokens)
        *n_tokens = tr->n_tokens;
    ferry_trace_free(tr);
    return st;
}

ferry_status ferry_predictor_fit(const char *const *trace_paths, int32_t n, const char *out_path)
{
    if (!trace_paths || n <= 0 || !out_path)
        return ferry_fail(FERRY_ERR_INVALID, "predictor fit: no traces");
    ferry_trace **tr = calloc((size_t)n, sizeof *tr);
    if (!tr)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory");
    ferry_status st = FERRY_OK;
    ferry_routing_stats *s = NULL;
    for (int32_t i = 0; i < n && st == FERRY_OK; i++)
        st = ferry_trace_load(trace_paths[i], &tr[i]);
    if (st == FERRY_OK)
        st = ferry_routing_stats_fit((const ferry_trace *const *)tr, n, &s);
    if (st == FERRY_OK)
        st = ferry_routing_stats_save(s, out_path);
    ferry_routing_stats_free(s);
    for (int32_t i = 0; i < n; i++)
        ferry_trace_free(tr[i]);
    free(tr);
    return st;
}

ferry_sim_options ferry_sim_options_default(void)
{
    ferry_sim_options o = {0};
    o.policy = FERRY_CACHE_LRU;
    o.predictor = FERRY_PREDICT_GATE;
    o.lookahead = 1;
    return o;
}

/* Replays tr (with hidden states when given) through the cache, with the predictor p (NULL:
 * the cache alone), as o says. */
static ferry_status sim_replay(const ferry_trace *tr, const float *hidden, int32_t d_model,
                               ferry_predictor *p, ferry_predictor_kind kind,
                               const ferry_sim_options *o, uint64_t expert_bytes,
                               ferry_sim_report *out)
{
    static const ferry_cache_policy policies[] = {FERRY_POLICY_LRU, FERRY_POLICY_LFU,
                                                  FERRY_POLICY_LAYER_LRU, FERRY_POLICY_PREDICTED};
    if (o->policy < FERRY_CACHE_LRU || o->policy > FERRY_CACHE_PREDICTED)
        return ferry_fail(FERRY_ERR_INVALID, "sim: policy %d is not a cache policy",
                          (int)o->policy);
    if (o->policy == FERRY_CACHE_PREDICTED && !p)
        return ferry_fail(FERRY_ERR_INVALID, "sim: the predicted policy needs a predictor");
    int32_t total = tr->n_layers * tr->n_experts;
    if (o->n_slots < 0 || o->n_slots > total)
        return ferry_fail(FERRY_ERR_INVALID, "sim: %d slots: the model has %d experts in all",
                          (int)o->n_slots, (int)total);
    ferry_sim_params sp = ferry_sim_params_default();
    sp.n_slots = o->n_slots ? o->n_slots : (total / 4 > 0 ? total / 4 : 1);
    sp.policy = policies[o->policy];
    sp.predictor = p;
    sp.predictor_kind = kind;
    sp.hidden = p ? hidden : NULL;
    sp.d_model = d_model;
    sp.lookahead = o->lookahead ? o->lookahead : 1;
    sp.expert_bytes = expert_bytes ? expert_bytes : 1;
    ferry_sim_result r;
    ferry_status st = ferry_sim_run(tr, &sp, &r);
    if (st)
        return st;
    memset(out, 0, sizeof *out);
    out->n_slots = sp.n_slots;
    out->n_experts_total = total;
    out->lookups = r.lookups;
    out->hits = r.hits;
    out->hit_rate = r.hit_rate;
    out->prefetch_issued = r.prefetch_issued;
    out->prefetch_used = r.prefetch_used;
    out->prefetch_wasted = r.prefetch_wasted;
    out->experts_moved = r.fills;
    out->expert_bytes = expert_bytes;
    out->bytes_moved = expert_bytes ? r.bytes_moved : 0;
    out->prefetch_bytes_wasted = expert_bytes ? r.prefetch_bytes_wasted : 0;
    out->belady_hit_rate = r.belady_hit_rate;
    return FERRY_OK;
}

ferry_status ferry_sim_trace_file(const char *trace_path, const ferry_sim_options *o,
                                  ferry_sim_report *out)
{
    if (!trace_path || !o || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_sim_trace_file: NULL argument");
    if (o->prefetch && o->predictor != FERRY_PREDICT_STATS)
        return ferry_fail(FERRY_ERR_INVALID, "sim: a trace has no hidden states, so it replays "
                                             "with the stats predictor only (the gate and the "
                                             "combined one need the model: ferry predictor eval "
                                             "--text)");
    if (o->prefetch && !o->predictor_stats_path)
        return ferry_fail(FERRY_ERR_INVALID, "sim: the stats predictor needs a statistics file "
                                             "(ferry predictor fit)");
    ferry_trace *tr = NULL;
    ferry_routing_stats *rs = NULL;
    ferry_predictor *p = NULL;
    ferry_status st = ferry_trace_load(trace_path, &tr);
    if (st == FERRY_OK && o->prefetch) {
        ferry_predictor_params pp = {.n_layers = tr->n_layers, .n_experts = tr->n_experts,
                                     .top_k = tr->top_k};
        if ((st = ferry_routing_stats_load(o->predictor_stats_path, &rs)) == FERRY_OK) {
            pp.stats = rs;
            st = ferry_predictor_create(FERRY_PREDICTOR_STATS, &pp, &p);
        }
    }
    if (st == FERRY_OK)
        st = sim_replay(tr, NULL, 0, p, FERRY_PREDICTOR_STATS, o, o->expert_bytes, out);
    ferry_predictor_destroy(p);
    ferry_routing_stats_free(rs);
    ferry_trace_free(tr);
    return st;
}

/* Both replays of an evaluation: the cache alone, then with p prefetching. */
static ferry_status sim_pair(const ferry_trace *tr, const float *hidden, int32_t d_model,
                             ferry_predictor *p, ferry_predictor_kind kind,
                             const ferry_sim_options *sim, uint64_t expert_bytes,
                             ferry_predictor_report *out)
{
    ferry_sim_options o = sim ? *sim : ferry_sim_options_default();
    ferry_sim_options alone = o;
    if (alone.policy == FERRY_CACHE_PREDICTED)
        alone.policy = FERRY_CACHE_LRU;
    ferry_status st = sim_replay(tr, NULL, 0, NULL, kind, &alone, expert_bytes, &out->cache_only);
    if (st == FERRY_OK)
        st = sim_replay(tr, hidden, d_model, p, kind, &o, expert_bytes, &out->with_prefetch);
    return st;
}

static void report_from_eval(const ferry_predictor_eval *e, int32_t k, ferry_predictor_report *out)
{
    memset(out, 0, sizeof *out);
    out->k = k;
    for (int32_t d = 1; d <= 3; d++) {
        out->predictions[d] = e->n_predictions[d];
        out->precision[d] = ferry_predictor_eval_precision(e, d);
        out->recall[d] = ferry_predictor_eval_recall(e, d, k);
    }
}

typedef struct {
    ferry_predictor *p;
    ferry_predictor_eval e;
    float *scores;
    int32_t *top;
    double seconds;
    int64_t tokens;
    ferry_trace *tr;  /* every sequence's routing, for the cache replays */
    float *hidden;    /* (tokens, n_layers, d) every sequence's hidden states */
    size_t hidden_cap; /* tokens */
} live_eval;

/* Keeps a sequence's routing and hidden states for the cache replays. */
static ferry_status keep_sequence(live_eval *le, const seq_record *r, int32_t n)
{
    size_t per = (size_t)r->n_layers * (size_t)r->d;
    size_t have = (size_t)le->tr->n_tokens;
    if (have + (size_t)n > le->hidden_cap) {
        size_t cap = le->hidden_cap ? le->hidden_cap * 2 : 4096;
        while (cap < have + (size_t)n)
            cap *= 2;
        float *h = realloc(le->hidden, cap * per * sizeof(float));
        if (!h)
            return ferry_fail(FERRY_ERR_NOMEM, "out of memory for the hidden states of %zu "
                                               "tokens", cap);
        le->hidden = h;
        le->hidden_cap = cap;
    }
    memcpy(le->hidden + have * per, r->hidden, (size_t)n * per * sizeof(float));
    return ferry_trace_append(le->tr, n, r->experts, NULL);
}

/* Replays one recorded sequence through the predictor, token by token. */
static ferry_status eval_sequence(void *user, const seq_record *r, int32_t n)
{
    live_eval *le = user;
    ferry_status kept = keep_sequence(le, r, n);
    if (kept)
        return kept;
    ferry_predictor_reset(le->p);
    int32_t experts[64];
    for (int32_t t = 0; t < n; t++) {
        for (int32_t l = 0; l < r->n_layers; l++) {
            size_t row = (size_t)t * (size_t)r->n_layers + (size_t)l;
            for (int32_t j = 0; j < r->k; j++)
                experts[j] = r->experts[row * (size_t)r->k + (size_t)j];
            double t0 = ferry_now_seconds();
            ferry_predictor_observe(le->p, l, r->hidden + row * (size_t)r->d, experts);
            for (int32_t d = 1; d <= 3 && l + d < r->n_layers; d++) {
                ferry_status st = ferry_predictor_predict(le->p, l, d, le->scores);
                if (st)
                    return st;
                ferry_predictor_top(le->scores, r->n_experts, r->k, le->top);
                le->seconds += ferry_now_seconds() - t0;
                const uint8_t *actual = r->experts + (row + (size_t)d) * (size_t)r->k;
                for (int32_t i = 0; i < r->k; i++)
                    for (int32_t j = 0; j < r->k; j++)
                        le->e.n_correct[d] += le->top[i] == actual[j];
                le->e.n_predictions[d]++;
                t0 = ferry_now_seconds();
            }
        }
        le->tokens++;
    }
    return FERRY_OK;
}

ferry_status ferry_predictor_eval_text(ferry_model *m, const char *text, size_t len,
                                       int32_t seq_len, int32_t predictor,
                                       const char *stats_path, const ferry_sim_options *sim,
                                       ferry_predictor_report *out)
{
    if (!m || (!text && len) || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_predictor_eval_text: NULL argument");
    if (predictor < FERRY_PREDICT_GATE || predictor > FERRY_PREDICT_COMBINED)
        return ferry_fail(FERRY_ERR_INVALID, "predictor %d: evaluate gate, stats or combined",
                          (int)predictor);
    const ferry_config *cfg = &m->cfg;
    if (cfg->n_experts_per_tok > 64)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "top-%d routing", (int)cfg->n_experts_per_tok);
    ferry_routing_stats *rs = NULL;
    ferry_weight *gates = calloc((size_t)cfg->n_moe_layers, sizeof *gates);
    ferry_weight *norms = calloc((size_t)cfg->n_moe_layers, sizeof *norms);
    live_eval le;
    memset(&le, 0, sizeof le);
    le.scores = malloc((size_t)cfg->n_experts * sizeof *le.scores);
    le.top = malloc((size_t)cfg->n_experts * sizeof *le.top);
    ferry_status st = FERRY_OK;
    if (!gates || !norms || !le.scores || !le.top) {
        st = ferry_fail(FERRY_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (int32_t l = 0; l < cfg->n_moe_layers; l++) { /* host views: the predictor runs here */
        gates[l] = m->gates[l];
        norms[l] = m->ffn_norms[l];
    }
    if (predictor != FERRY_PREDICT_GATE) {
        if (!stats_path) {
            st = ferry_fail(FERRY_ERR_INVALID, "the stats and combined predictors need a "
                                               "statistics file (ferry predictor fit)");
            goto done;
        }
        if ((st = ferry_routing_stats_load(stats_path, &rs)))
            goto done;
    }
    ferry_predictor_params pp = {.n_layers = cfg->n_moe_layers,
                                 .n_experts = cfg->n_experts,
                                 .top_k = cfg->n_experts_per_tok,
                                 .d_model = cfg->hidden_size,
                                 .rms_eps = cfg->rms_eps,
                                 .gates = gates,
                                 .ffn_norms = norms,
                                 .stats = rs};
    if ((st = ferry_predictor_create(ferry_predictor_kind_of(predictor), &pp, &le.p)))
        goto done;
    le.e.k = cfg->n_experts_per_tok;
    if (cfg->n_experts > 256) {
        st = ferry_fail(FERRY_ERR_UNSUPPORTED, "a trace stores expert ids as bytes: %d experts",
                        (int)cfg->n_experts);
        goto done;
    }
    if ((st = ferry_trace_create(cfg->n_moe_layers, cfg->n_experts, cfg->n_experts_per_tok, 0,
                                 m->name, &le.tr)))
        goto done;
    if ((st = run_sequences(m, text, len, seq_len, 0, 1, NULL, eval_sequence, &le)))
        goto done;
    report_from_eval(&le.e, cfg->n_experts_per_tok, out);
    out->seconds_per_token = le.tokens ? le.seconds / (double)le.tokens : 0;
    uint64_t expert_bytes = sim && sim->expert_bytes ? sim->expert_bytes
                                                     : ferry_model_expert_bytes(m);
    st = sim_pair(le.tr, le.hidden, cfg->hidden_size, le.p, ferry_predictor_kind_of(predictor), sim,
                  expert_bytes, out);
done:
    ferry_trace_free(le.tr);
    free(le.hidden);
    ferry_predictor_destroy(le.p);
    ferry_routing_stats_free(rs);
    free(gates);
    free(norms);
    free(le.scores);
    free(le.top);
    return st;
}

ferry_status ferry_predictor_eval_trace_file(const char *trace_path, const char *stats_path,
                                             const ferry_sim_options *sim,
                                             ferry_predictor_report *out)
{
    if (!trace_path || !stats_path || !out)
        return ferry_fail(FERRY_ERR_INVALID, "predictor eval: a trace and a statistics file are "
                                             "needed");
    ferry_trace *tr = NULL;
    ferry_routing_stats *rs = NULL;
    ferry_predictor *p = NULL;
    ferry_status st;
    if ((st = ferry_trace_load(trace_path, &tr)) || (st = ferry_routing_stats_load(stats_path, &rs)))
        goto done;
    ferry_predictor_params pp = {.n_layers = tr->n_layers,
                                 .n_experts = tr->n_experts,
                                 .top_k = tr->top_k,
                                 .stats = rs};
    if ((st = ferry_predictor_create(FERRY_PREDICTOR_STATS, &pp, &p)))
        goto done;
    ferry_predictor_eval e;
    memset(&e, 0, sizeof e);
    e.k = tr->top_k;
    double t0 = ferry_now_seconds();
    if ((st = ferry_predictor_eval_trace(p, tr, &e)))
        goto done;
    report_from_eval(&e, tr->top_k, out);
    out->seconds_per_token = tr->n_tokens ? (ferry_now_seconds() - t0) / (double)tr->n_tokens : 0;
    st = sim_pair(tr, NULL, 0, p, FERRY_PREDICTOR_STATS, sim, sim ? sim->expert_bytes : 0, out);
done:
    ferry_predictor_destroy(p);
    ferry_routing_stats_free(rs);
    ferry_trace_free(tr);
    return st;
}

/* ---- perplexity ---------------------------------------------------------------------- */

ferry_status ferry_perplexity(ferry_model *m, const char *text, size_t len, int32_t window,
                              ferry_perplexity_result *out)
{
    if (!m || (!text && len) || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_perplexity: NULL argument");
    if (window < 2 || window > m->cfg.max_positions)
        return ferry_fail(FERRY_ERR_INVALID, "perplexity window of %d tokens: need 2 to %d (the "
                          "model's positions)", (int)window, (int)m->cfg.max_positions);
    int32_t V = m->cfg.vocab_size;
    int32_t bos = m->cfg.bos_id >= 0 ? m->cfg.bos_id : ferry_tokenizer_bos_id(m->tok);
    int32_t *ids = NULL, n_ids = 0, *seq = NULL, i = 0;
    int reporting = 0; /* progress reports began: they end at done */
    float *logits = NULL;
    ferry_context *c = NULL;
    ferry_status st = tokenize_all(m, text, len, &ids, &n_ids);
    if (st)
        return st;
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = window;
    if ((st = ferry_context_create(m, &cp, &c)))
        goto done;
    seq = malloc((size_t)window * sizeof *seq);
    logits = malloc((size_t)window * (size_t)V * sizeof *logits);
    if (!seq || !logits) {
        st = ferry_fail(FERRY_ERR_NOMEM, "out of memory for a window of %d tokens", (int)window);
        goto done;
    }
    /* each window: BOS, then the next window - 1 tokens of the text; position p's logits
     * score the token at p + 1 (without a BOS the first token of a window is not scored) */
    int32_t per = bos >= 0 ? window - 1 : window;
    double nll = 0;
    int64_t n_scored = 0;
    int32_t n_windows = 0;
    double t0 = ferry_now_seconds();
    ferry_progress_report("computing perplexity", 0, (uint64_t)n_ids, "tokens");
    reporting = 1;
    for (; i < n_ids; i += per) {
        int32_t n = n_ids - i < per ? n_ids - i : per, at = 0;
        if (bos >= 0)
            seq[at++] = bos;
        memcpy(seq + at, ids + i, (size_t)n * sizeof *seq);
        ferry_context_reset(c);
        if ((st = ferry_context_forward(c, seq, at + n, logits, NULL)))
            goto done;
        for (int32_t p = 0; p + 1 < at + n; p++) {
            const float *l = logits + (size_t)p * (size_t)V;
            double mx = l[0];
            for (int32_t v = 1; v < V; v++)
                mx = l[v] > mx ? l[v] : mx;
            double sum = 0;
            for (int32_t v = 0; v < V; v++)
                sum += exp((double)l[v] - mx);
            nll -= (double)l[seq[p + 1]] - mx - log(sum);
            n_scored++;
        }
        n_windows++;
        ferry_progress_report("computing perplexity", (uint64_t)(i + n), (uint64_t)n_ids,
                              "tokens");
    }
    if (n_scored == 0) {
        st = ferry_fail(FERRY_ERR_INVALID, "perplexity: the text's %d token(s) leave nothing to "
                        "score", (int)n_ids);
        goto done;
    }
    *out = (ferry_perplexity_result){.perplexity = exp(nll / (double)n_scored),
                                     .nll = nll / (double)n_scored,
                                     .n_scored = n_scored,
                                     .n_windows = n_windows,
                                     .window = window,
                                     .seconds = ferry_now_seconds() - t0};
done:
    if (reporting && st)
        ferry_progress_report("computing perplexity", (uint64_t)i, 0, "tokens");
    ferry_context_free(c);
    free(logits);
    free(seq);
    free(ids);
    return st;
}

/* ---- ferry pack ---------------------------------------------------------------------- */

/* The pack writer's source for a quantized pack: each matrix of the open model quantized
 * on the pool (engine/quantize.h). */
typedef struct {
    const ferry_model *m;
    ferry_dtype quant; /* FERRY_DTYPE_Q8 or FERRY_DTYPE_Q4 */
    ferry_pool *pool;
    uint8_t *buf;      /* the part being handed out */
    size_t cap;
} quant_source;

static ferry_status quant_model_source(void *user, int32_t layer, int32_t expert, int32_t which,
                                       const void **data, ferry_dtype *dtype)
{
    quant_source *q = user;
    const ferry_expert_weights *X = &q->m->moe[layer].experts[expert];
    const ferry_weight *w = which == FERRY_PACK_W1 ? &X->w1 : which == FERRY_PACK_W3 ? &X->w3 : &X->w2;
    size_t n_bytes = (size_t)w->rows * ferry_dtype_row_bytes(q->quant, w->cols);
    if (n_bytes > q->cap) {
        free(q->buf);
        q->buf = malloc(n_bytes);
        q->cap = q->buf ? n_bytes : 0;
        if (!q->buf)
            return ferry_fail(FERRY_ERR_NOMEM, "no memory for %zu bytes of quantized weights",
                              n_bytes);
    }
    TRY(ferry_quantize_matrix(w, q->quant, q->pool, q->buf));
    *data = q->buf;
    *dtype = q->quant;
    return FERRY_OK;
}

ferry_pack_params ferry_pack_params_default(void)
{
    return (ferry_pack_params){.format = FERRY_PACK_AS_STORED};
}

ferry_status ferry_pack_model(const char *model_dir, const char *out_path,
                              const ferry_pack_params *params)
{
    ferry_pack_params defaults = ferry_pack_params_default();
    const ferry_pack_params *p = params ? params : &defaults;
    if (!model_dir || !out_path)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_pack_model: NULL argument");
    if (p->format != FERRY_PACK_AS_STORED && p->format != FERRY_PACK_Q8 &&
        p->format != FERRY_PACK_Q4)
        return ferry_fail(FERRY_ERR_INVALID, "pack format %d is not as-stored (0), q8 (1) or q4 "
                          "(2)", (int)p->format);
    /* open the whole model, so every shape is checked against config.json first; on the
     * CPU backend, which reads the experts where the checkpoint is mapped */
    ferry_model *m;
    ferry_model_params mp = ferry_model_params_default();
    mp.backend = FERRY_BACKEND_CPU;
    mp.n_threads = 1;
    ferry_status st = ferry_model_open(model_dir, &mp, &m);
    if (st)
        return st;
    ferry_pack_shape shape;
    if ((st = ferry_model_pack_shape(m, &shape))) {
        ferry_model_close(m);
        return st;
    }
    if (p->format == FERRY_PACK_AS_STORED) {
        st = ferry_pack_write(out_path, &shape, ferry_model_pack_source, NULL, m);
        ferry_model_close(m);
        return st;
    }
    quant_source q = {.m = m, .quant = p->format == FERRY_PACK_Q8 ? FERRY_DTYPE_Q8 : FERRY_DTYPE_Q4};
    if (shape.d_model % FERRY_QUANT_GROUP || shape.d_ff % FERRY_QUANT_GROUP) {
        st = ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: hidden_size %d and intermediate_size %d must "
                        "be multiples of %d to quantize the experts in groups of %d", model_dir,
                        (int)shape.d_model, (int)shape.d_ff, FERRY_QUANT_GROUP, FERRY_QUANT_GROUP);
        goto done;
    }
    if ((st = ferry_pool_create(ferry_topology_default_threads(), &q.pool)))
        goto done;
    st = ferry_pack_write(out_path, &shape, quant_model_source, NULL, &q);
done:
    ferry_pool_destroy(q.pool);
    free(q.buf);
    ferry_model_close(m);
    return st;
}
