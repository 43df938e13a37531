/*
 * predictor/predictor.c: the gate, stats and combined routing predictors, top-k, and
 * their evaluation (see predictor.h).
 *
 * Per token, the predictor keeps what was observed at each layer (the hidden state, its
 * inverse RMS, the experts) stamped with a token number, and the previous token's hidden
 * states; predict reads only what is stamped with the current (or, for the previous
 * token's, the current minus one) number, so a reset is a bump of the number. Everything
 * is sized at create: observe and predict allocate nothing.
 *
 * gate: the router of layer l+d applied to the hidden state after layer l:
 *   softmax_e( sum_i gate[l+d][e][i] * ffn_norm[l+d][i] * h[i] / rms(h) ).
 *   The norm weights are folded into a float32 copy of the gate rows at create, and
 *   1/rms(h) is computed once per observed layer, so a prediction is one E x d_model
 *   product.
 * stats: score(e') = mean over the token's experts e at layer l of P(e' at l+d | e at l).
 * combined: the gate, applied to the hidden state corrected by the previous token's residual
 *   update over the same layers, h_l(t) + g_d * (h_{l+d}(t-1) - h_l(t-1)) (with l+d-1 in
 *   place of l+d when the previous token's state after l+d was not observed): the layers
 *   between l and l+d, attention first, move consecutive tokens' states in similar
 *   directions, and the plain gate misses exactly that move. This is how the same-layer
 *   recency enters: as the previous token's whole state rather than its expert ids. Where
 *   no hidden state was observed (a trace replay), the statistics predict alone, and they
 *   predict the next token's experts. Why not a product with the statistics: see
 *   COMBINED_SHIFT.
 */
#include "predictor/predictor.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

#define MAXD FERRY_PREDICT_MAX_LOOKAHEAD

/* g_d, the share of the previous token's update the combined predictor adds to the hidden
 * state, chosen by grid search on the bundled model over tests/fixtures/heldout-python.txt
 * (sequences of BOS + 511 tokens), maximising recall@2, and confirmed on each half of the
 * text separately (the optimum moved by less than 0.001): recall@2 of the plain gate
 * 0.884 / 0.811 / 0.758 at d = 1 / 2 / 3 becomes 0.892 / 0.830 / 0.792 (tests/
 * test_predictor.c; the search ran without the last layer's state, where 0.797 was
 * measured at d = 3); beyond 0.6 it falls
 * again. Measured the same way and rejected: multiplying in the statistics'
 * probabilities and the same-layer recency (P(e' | the previous token's experts at l+d))
 * with exponents from 0.02 to 0.5. On the plain gate they add at most 0.003 at d = 3 and
 * nothing at d = 1; on the corrected gate every such product lowers recall (by 0.0005 at
 * exponent 0.02, 0.003 at 0.05), because the corrected state already carries what the
 * previous token's and this token's expert ids say. */
static const float COMBINED_SHIFT[MAXD + 1] = {0.0f, 0.3f, 0.4f, 0.5f};

struct ferry_predictor {
    ferry_predictor_kind kind;
    int32_t n_layers, n_experts, top_k, d_model;
    float rms_eps;
    const ferry_routing_stats *stats; /* borrowed; NULL for gate */
    float *w;           /* (n_layers, n_experts, d_model) gate rows x ffn_norm; NULL for stats */
    /* hidden states of the current and the previous token: slot `cur_slot` is the current
     * one; the slots swap at each new token, so nothing is copied */
    float *hidden[2];   /* (n_layers, d_model) each */
    float *inv_rms[2];  /* (n_layers) 1 / rms of each */
    int64_t *hidden_at[2]; /* (n_layers) token number whose hidden state the slot holds */
    int32_t cur_slot;
    int32_t *cur;       /* (n_layers, top_k) experts of the current token */
    int64_t *seen_at;   /* (n_layers) token number whose experts cur holds */
    float *scores;      /* (n_experts) scratch of ferry_predictor_eval_trace */
    float *x;           /* (d_model) scratch: the corrected hidden state */
    int64_t token;      /* number of the current token; bumped by reset too */
};

const char *ferry_predictor_kind_name(ferry_predictor_kind k)
{
    switch (k) {
    case FERRY_PREDICTOR_GATE: return "gate";
    case FERRY_PREDICTOR_STATS: return "stats";
    case FERRY_PREDICTOR_COMBINED: return "combined";
    }
    return "unknown";
}

ferry_status ferry_predictor_kind_parse(const char *s, ferry_predictor_kind *out)
{
    static const ferry_predictor_kind kinds[] = {FERRY_PREDICTOR_GATE, FERRY_PREDICTOR_STATS,
                                                 FERRY_PREDICTOR_COMBINED};
    for (size_t i = 0; s && i < sizeof kinds / sizeof kinds[0]; i++)
        if (strcmp(s, ferry_predictor_kind_name(kinds[i])) == 0) {
            if (out)
                *out = kinds[i];
            return FERRY_OK;
        }
    return ferry_fail(FERRY_ERR_INVALID, "unknown predictor '%s' (expected gate, stats or "
                      "combined)", s ? s : "(null)");
}

void ferry_predictor_destroy(ferry_predictor *p)
{
    if (!p)
        return;
    free(p->w);
    for (int i = 0; i < 2; i++) {
        free(p->hidden[i]);
        free(p->inv_rms[i]);
        free(p->hidden_at[i]);
    }
    free(p->cur);
    free(p->seen_at);
    free(p->scores);
    free(p->x);
    free(p);
}

static float weight_at(const ferry_weight *w, size_t i)
{
    switch (w->dtype) {
    case FERRY_DTYPE_F32: return ((const float *)w->d_data)[i];
    case FERRY_DTYPE_F16: return ferry_f16_to_f32(((const uint16_t *)w->d_data)[i]);
    case FERRY_DTYPE_BF16: return ferry_bf16_to_f32(((const uint16_t *)w->d_data)[i]);
    default: return 0.0f;
    }
}

/* Checks the routers and norms a gate-based kind needs. */
static ferry_status check_gates(const ferry_predictor_params *pp, const char *kind)
{
    if (!pp->gates || !pp->ffn_norms)
        return ferry_fail(FERRY_ERR_INVALID, "predictor %s: needs each layer's router (gates) "
                          "and post-attention norm (ffn_norms)", kind);
    if (pp->d_model < 1 || !(pp->rms_eps > 0.0f))
        return ferry_fail(FERRY_ERR_INVALID, "predictor %s: d_model %d and rms_eps %g must be "
                          "positive", kind, (int)pp->d_model, (double)pp->rms_eps);
    for (int32_t l = 0; l < pp->n_layers; l++) {
        const ferry_weight *g = &pp->gates[l], *nw = &pp->ffn_norms[l];
        if (!g->d_data || g->rows != pp->n_experts || g->cols != pp->d_model ||
            (unsigned)g->dtype >= FERRY_DTYPE_COUNT)
            return ferry_fail(FERRY_ERR_INVALID, "predictor %s: layer %d router is (%lld, %lld) "
                              "%s, expected (%d, %d) in host memory", kind, (int)l,
                              (long long)g->rows, (long long)g->cols,
                              g->d_data ? "" : "with no data", (int)pp->n_experts,
                              (int)pp->d_model);
        if (!nw->d_data || nw->rows * nw->cols != pp->d_model ||
            (unsigned)nw->dtype >= FERRY_DTYPE_COUNT)
            return ferry_fail(FERRY_ERR_INVALID, "predictor %s: layer %d ffn_norm has %lld "
                              "elements%s, expected %d", kind, (int)l,
                              (long long)(nw->rows * nw->cols), nw->d_data ? "" : " and no data",
                              (int)pp->d_model);
    }
    return FERRY_OK;
}

ferry_status ferry_predictor_create(ferry_predictor_kind kind, const ferry_predictor_params *pp,
                                    ferry_predictor **out)
{
    if (!pp || !out)
        return ferry_fail(FERRY_ERR_INVALID, "predictor create: NULL argument");
    if (kind != FERRY_PREDICTOR_GATE && kind != FERRY_PREDICTOR_STATS &&
        kind != FERRY_PREDICTOR_COMBINED)
        return ferry_fail(FERRY_ERR_INVALID, "predictor create: unknown kind %d (expected gate, "
                          "stats or combined)", (int)kind);
    const char *name = ferry_predictor_kind_name(kind);
    if (pp->n_layers < 1 || pp->n_experts < 1 || pp->top_k < 1 || pp->top_k > pp->n_experts)
        return ferry_fail(FERRY_ERR_INVALID, "predictor %s: layers %d, experts %d, top_k %d: "
                          "need at least one layer and 1 <= top_k <= experts", name,
                          (int)pp->n_layers, (int)pp->n_experts, (int)pp->top_k);
    int use_gate = kind != FERRY_PREDICTOR_STATS, use_stats = kind != FERRY_PREDICTOR_GATE;
    ferry_status st;
    if (use_gate && (st = check_gates(pp, name)) != FERRY_OK)
        return st;
    if (use_stats) {
        if (!pp->stats)
            return ferry_fail(FERRY_ERR_INVALID, "predictor %s: needs fitted routing statistics "
                              "(stats)", name);
        int32_t L, E, K;
        ferry_routing_stats_shape(pp->stats, &L, &E, &K);
        if (L != pp->n_layers || E != pp->n_experts || K != pp->top_k)
            return ferry_fail(FERRY_ERR_INVALID, "predictor %s: the statistics were fitted on "
                              "layers %d, experts %d, top_k %d; the model has %d, %d, %d", name,
                              (int)L, (int)E, (int)K, (int)pp->n_layers, (int)pp->n_experts,
                              (int)pp->top_k);
    }

    size_t L = (size_t)pp->n_layers, E = (size_t)pp->n_experts, K = (size_t)pp->top_k;
    size_t D = use_gate ? (size_t)pp->d_model : 0;
    ferry_predictor *p = calloc(1, sizeof *p);
    if (!p)
        return ferry_fail(FERRY_ERR_NOMEM, "predictor %s: out of memory", name);
    p->kind = kind;
    p->n_layers = pp->n_layers;
    p->n_experts = pp->n_experts;
    p->top_k = pp->top_k;
    p->d_model = (int32_t)D;
    p->rms_eps = pp->rms_eps;
    p->stats = use_stats ? pp->stats : NULL;
    p->cur = malloc(L * K * sizeof *p->cur);
    p->seen_at = malloc(L * sizeof *p->seen_at);
    p->scores = malloc(E * sizeof *p->scores);
    int ok = p->cur && p->seen_at && p->scores;
    if (use_gate) {
        p->w = malloc(L * E * D * sizeof *p->w);
        p->x = malloc(D * sizeof *p->x);
        ok = ok && p->w && p->x;
        for (int i = 0; i < 2; i++) {
            p->hidden[i] = malloc(L * D * sizeof(float));
            p->inv_rms[i] = malloc(L * sizeof(float));
            p->hidden_at[i] = malloc(L * sizeof(int64_t));
            ok = ok && p->hidden[i] && p->inv_rms[i] && p->hidden_at[i];
        }
    }
    if (!ok) {
        ferry_predictor_destroy(p);
        return ferry_fail(FERRY_ERR_NOMEM, "predictor %s: out of memory (%zu layers x %zu "
                          "experts x %zu)", name, L, E, D);
    }
    for (size_t l = 0; l < L; l++) {
        p->seen_at[l] = -1;
        if (!use_gate)
            continue;
        p->hidden_at[0][l] = p->hidden_at[1][l] = -1;
        for (size_t e = 0; e < E; e++)
            for (size_t i = 0; i < D; i++)
                p->w[(l * E + e) * D + i] =
                    weight_at(&pp->gates[l], e * D + i) * weight_at(&pp->ffn_norms[l], i);
    }
    *out = p;
    return FERRY_OK;
}

static float inv_rms(const float *h, size_t n, float eps)
{
    double ss = 0;
    for (size_t i = 0; i < n; i++)
        ss += (double)h[i] * (double)h[i];
    return (float)(1.0 / sqrt(ss / (double)n + (double)eps));
}

void ferry_predictor_reset(ferry_predictor *p)
{
    if (!p)
        return;
    p->token++; /* nothing stamped with the previous number is the previous token now */
}

void ferry_predictor_observe(ferry_predictor *p, int32_t layer, const float *hidden,
                             const int32_t *experts)
{
    if (!p || layer < 0 || layer >= p->n_layers || !experts)
        return;
    if (layer == 0) {
        /* a new token: the current hidden states become the previous token's */
        p->token++;
        p->cur_slot ^= 1;
    }
    for (int32_t j = 0; j < p->top_k; j++)
        if (experts[j] < 0 || experts[j] >= p->n_experts)
            return; /* nonsense: leave the layer unobserved, so predict reports it */
    memcpy(p->cur + (size_t)layer * (size_t)p->top_k, experts, (size_t)p->top_k * sizeof(int32_t));
    p->seen_at[layer] = p->token;
    if (hidden && p->w) {
        size_t D = (size_t)p->d_model;
        float *h = p->hidden[p->cur_slot] + (size_t)layer * D;
        memcpy(h, hidden, D * sizeof(float));
        p->inv_rms[p->cur_slot][layer] = inv_rms(h, D, p->rms_eps);
        p->hidden_at[p->cur_slot][layer] = p->token;
    }
}

/* Dot product of n floats in 8 interleaved partial sums, which the compiler keeps in one
 * vector register (a single running sum is a dependency chain it may not reorder). */
static float dot(const float *a, const float *b, size_t n)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (size_t j = 0; j < 8; j++)
            acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* Router probabilities of layer `target` for the hidden state h whose 1/rms is inv. */
static void gate_probs(const ferry_predictor *p, const float *h, float inv, int32_t target,
                       float *out)
{
    size_t D = (size_t)p->d_model, E = (size_t)p->n_experts;
    const float *w = p->w + (size_t)target * E * D;
    float mx = -INFINITY;
    for (size_t e = 0; e < E; e++) {
        out[e] = dot(w + e * D, h, D) * inv;
        if (out[e] > mx)
            mx = out[e];
    }
    float sum = 0.0f;
    for (size_t e = 0; e < E; e++) {
        out[e] = expf(out[e] - mx);
        sum += out[e];
    }
    for (size_t e = 0; e < E; e++)
        out[e] /= sum;
}

/* The combined predictor's gate factor: the hidden state at `layer` plus g_d times the
 * previous token's update from `layer` to `layer + d` (or `layer + d - 1`), when the
 * previous token's states were observed. */
static void corrected_gate_probs(ferry_predictor *p, int32_t layer, int32_t d, float *out)
{
    size_t D = (size_t)p->d_model;
    int32_t c = p->cur_slot, q = c ^ 1;
    const float *h = p->hidden[c] + (size_t)layer * D;
    int64_t prev_token = p->token - 1;
    int32_t to = layer + d;
    if (p->hidden_at[q][to] != prev_token)
        to--;
    if (to == layer || p->hidden_at[q][layer] != prev_token || p->hidden_at[q][to] != prev_token) {
        gate_probs(p, h, p->inv_rms[c][layer], layer + d, out);
        return;
    }
    const float *a = p->hidden[q] + (size_t)layer * D, *b = p->hidden[q] + (size_t)to * D;
    float g = COMBINED_SHIFT[d];
    for (size_t i = 0; i < D; i++)
        p->x[i] = h[i] + g * (b[i] - a[i]);
    gate_probs(p, p->x, inv_rms(p->x, D, p->rms_eps), layer + d, out);
}

/* out(e') = mean over the experts e in ids (top_k) of table[e][e']. */
static void transition_mean(const ferry_predictor *p, const float *table, const int32_t *ids,
                            float *out)
{
    size_t E = (size_t)p->n_experts;
    for (size_t e = 0; e < E; e++)
        out[e] = 0.0f;
    for (int32_t j = 0; j < p->top_k; j++) {
        const float *row = table + (size_t)ids[j] * E;
        for (size_t e = 0; e < E; e++)
            out[e] += row[e];
    }
    for (size_t e = 0; e < E; e++)
        out[e] /= (float)p->top_k;
}

ferry_status ferry_predictor_predict(ferry_predictor *p, int32_t layer, int32_t d, float *scores)
{
    if (!p || !scores)
        return ferry_fail(FERRY_ERR_INVALID, "predict: NULL argument");
    if (d < 1 || d > MAXD || layer < 0 || layer + d >= p->n_layers)
        return ferry_fail(FERRY_ERR_INVALID, "predict: layer %d + d %d is outside the model's "
                          "layers 0..%d (d in 1..%d)", (int)layer, (int)d, (int)p->n_layers - 1,
                          MAXD);
    int32_t target = layer + d;
    int have_ids = p->seen_at[layer] == p->token;
    int have_hidden = p->w && p->hidden_at[p->cur_slot][layer] == p->token;

    if (p->kind == FERRY_PREDICTOR_GATE) {
        if (!have_hidden)
            return ferry_fail(FERRY_ERR_INVALID, "predict: no hidden state observed at layer %d "
                              "for this token (the gate predictor needs one)", (int)layer);
        gate_probs(p, p->hidden[p->cur_slot] + (size_t)layer * (size_t)p->d_model,
                   p->inv_rms[p->cur_slot][layer], target, scores);
        return FERRY_OK;
    }
    if (!have_ids)
        return ferry_fail(FERRY_ERR_INVALID, "predict: nothing observed at layer %d for this "
                          "token", (int)layer);
    if (p->kind == FERRY_PREDICTOR_STATS) {
        transition_mean(p, ferry_routing_stats_transition(p->stats, layer, d),
                        p->cur + (size_t)layer * (size_t)p->top_k, scores);
        return FERRY_OK;
    }

    /* combined */
    if (have_hidden)
        corrected_gate_probs(p, layer, d, scores);
    else
        transition_mean(p, ferry_routing_stats_transition(p->stats, layer, d),
                        p->cur + (size_t)layer * (size_t)p->top_k, scores);
    return FERRY_OK;
}

ferry_status ferry_predictor_predict_next_token(ferry_predictor *p, int32_t layer, float *scores)
{
    if (!p || !scores)
        return ferry_fail(FERRY_ERR_INVALID, "predict next token: NULL argument");
    if (p->kind == FERRY_PREDICTOR_GATE)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "predict next token: the gate predictor cannot "
                          "see the next token (use stats or combined)");
    if (layer < 0 || layer >= p->n_layers)
        return ferry_fail(FERRY_ERR_INVALID, "predict next token: layer %d is outside 0..%d",
                          (int)layer, (int)p->n_layers - 1);
    if (p->seen_at[layer] != p->token)
        return ferry_fail(FERRY_ERR_INVALID, "predict next token: nothing observed at layer %d "
                          "for this token", (int)layer);
    transition_mean(p, ferry_routing_stats_transition(p->stats, layer, 0),
                    p->cur + (size_t)layer * (size_t)p->top_k, scores);
    return FERRY_OK;
}

/* ---- evaluation ------------------------------------------------------------------------ */

/* a ranks above b: higher, NaN lowest */
static int ranks_above(float a, float b) { return !isnan(a) && (isnan(b) || a > b); }

void ferry_predictor_top(const float *scores, int32_t n, int32_t k, int32_t *top)
{
    if (k > n)
        k = n;
    for (int32_t i = 0; i < k; i++) {
        int32_t best = -1;
        for (int32_t e = 0; e < n; e++) {
            int taken = 0;
            for (int32_t j = 0; j < i && !taken; j++)
                taken = top[j] == e;
            /* scanning upwards and replacing only on strictly better keeps ties on the lower id */
            if (!taken && (best < 0 || ranks_above(scores[e], scores[best])))
                best = e;
        }
        top[i] = best;
    }
    for (int32_t i = 1; i < k; i++)
        for (int32_t j = i; j > 0 && top[j - 1] > top[j]; j--) {
            int32_t t = top[j];
            top[j] = top[j - 1];
            top[j - 1] = t;
        }
}

double ferry_predictor_eval_precision(const ferry_predictor_eval *e, int32_t d)
{
    if (!e || d < 0 || d > MAXD || e->n_predictions[d] == 0 || e->k < 1)
        return 0.0;
    return (double)e->n_correct[d] / ((double)e->n_predictions[d] * (double)e->k);
}

double ferry_predictor_eval_recall(const ferry_predictor_eval *e, int32_t d, int32_t top_k)
{
    if (!e || d < 0 || d > MAXD || e->n_predictions[d] == 0 || top_k < 1)
        return 0.0;
    return (double)e->n_correct[d] / ((double)e->n_predictions[d] * (double)top_k);
}

/* How many of the k predicted ids are among the top_k actual ones. */
static int32_t overlap(const int32_t *pred, int32_t k, const uint8_t *actual, int32_t top_k)
{
    int32_t n = 0;
    for (int32_t i = 0; i < k; i++)
        for (int32_t j = 0; j < top_k; j++)
            n += pred[i] == actual[j];
    return n;
}

ferry_status ferry_predictor_eval_trace(ferry_predictor *p, const ferry_trace *tr,
                                        ferry_predictor_eval *e)
{
    if (!p || !tr || !e)
        return ferry_fail(FERRY_ERR_INVALID, "predictor eval: NULL argument");
    if (p->kind == FERRY_PREDICTOR_GATE)
        return ferry_fail(FERRY_ERR_INVALID, "predictor eval: a trace has no hidden states, so "
                          "the gate predictor cannot be replayed over it (use stats or combined)");
    if (tr->n_layers != p->n_layers || tr->n_experts != p->n_experts || tr->top_k != p->top_k)
        return ferry_fail(FERRY_ERR_INVALID, "predictor eval: the trace has layers %d, experts "
                          "%d, top_k %d; the predictor %d, %d, %d", (int)tr->n_layers,
                          (int)tr->n_experts, (int)tr->top_k, (int)p->n_layers,
                          (int)p->n_experts, (int)p->top_k);
    if (e->k == 0)
        e->k = tr->top_k;
    if (e->k < 1 || e->k > p->n_experts)
        return ferry_fail(FERRY_ERR_INVALID, "predictor eval: k = %d is outside 1..%d",
                          (int)e->k, (int)p->n_experts);
    int32_t L = tr->n_layers, K = tr->top_k, k = e->k;
    float *scores = p->scores;
    int32_t top[256], ids[256];
    int64_t t = 0;
    for (int32_t q = 0; q < tr->n_seqs; q++) {
        int64_t end = t + tr->seq_lengths[q];
        ferry_predictor_reset(p);
        for (; t < end; t++) {
            for (int32_t l = 0; l < L; l++) {
                const uint8_t *a = ferry_trace_at(tr, t, l);
                for (int32_t j = 0; j < K; j++)
                    ids[j] = a[j];
                ferry_predictor_observe(p, l, NULL, ids);
                for (int32_t d = 1; d <= MAXD && l + d < L; d++) {
                    ferry_status st = ferry_predictor_predict(p, l, d, scores);
                    if (st != FERRY_OK)
                        return st;
                    ferry_predictor_top(scores, p->n_experts, k, top);
                    e->n_predictions[d]++;
                    e->n_correct[d] += overlap(top, k, ferry_trace_at(tr, t, l + d), K);
                }
                if (t + 1 < end) {
                    ferry_status st = ferry_predictor_predict_next_token(p, l, scores);
                    if (st != FERRY_OK)
                        return st;
                    ferry_predictor_top(scores, p->n_experts, k, top);
                    e->n_predictions[0]++;
                    e->n_correct[0] += overlap(top, k, ferry_trace_at(tr, t + 1, l), K);
                }
            }
        }
    }
    return FERRY_OK;
}
