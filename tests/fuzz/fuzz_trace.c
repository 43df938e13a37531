/*
 * tests/fuzz/fuzz_trace.c: routing traces (predictor/trace.c, ferry_trace_load), and what is
 * done with a loaded one: slicing, saving, fitting routing statistics (predictor/stats.c).
 * The input is the whole file, handed over as an in-memory file.
 * Dictionaries: json.dict
 *
 * An accepted trace must keep trace.h's promises: the shape in range, sequence lengths
 * positive and summing to the tokens, the file exactly the header line, the ids and the
 * probabilities, the ids those of the file, each below the expert count and strictly
 * ascending within a (token, layer), each probability in [0, 1] with every row summing to 1.
 * Then: a slice (chosen from the input's hash) holds the same tokens cut at sequence
 * boundaries; saving and loading again gives the same trace; and for small shapes, routing
 * statistics fitted on it save and load back. A rejected trace must get a message naming the
 * path.
 *
 * A mutation of the header's shape or token count leaves a body of the wrong size, which is
 * rejected before anything else is looked at; so when the header line gives a usable shape
 * and its body is missized, the trace is loaded a second time with the body resized to fit
 * (the old bytes first, then valid ids: 0, 1, .. top_k - 1; probability rows 1, 0, .. 0).
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "predictor/predictor.h"
#include "predictor/trace.h"
#include "tests/fuzz/fuzz_util.h"

/* Largest L x E x E for which statistics are fitted (their tables grow as that). */
#define FIT_MAX_LEE (1 << 16)
/* Largest body a missized trace is resized to. */
#define RESIZE_MAX_BODY ((size_t)1 << 20)

static size_t ids_per_token(const ferry_trace *tr)
{
    return (size_t)tr->n_layers * (size_t)tr->top_k;
}

static size_t probs_per_token(const ferry_trace *tr)
{
    return (size_t)tr->n_layers * (size_t)tr->n_experts;
}

static void check_shape(const ferry_trace *tr)
{
    FUZZ_CHECK(tr->n_layers >= 1 && tr->n_layers <= 256 && tr->n_experts >= 1 &&
                   tr->n_experts <= 256 && tr->top_k >= 1 && tr->top_k <= tr->n_experts,
               "shape %d x %d, top_k %d", tr->n_layers, tr->n_experts, tr->top_k);
    FUZZ_CHECK(strnlen(tr->model, sizeof tr->model) < sizeof tr->model, "model not terminated");
    int64_t sum = 0;
    for (int32_t i = 0; i < tr->n_seqs; i++) {
        FUZZ_CHECK(tr->seq_lengths[i] >= 1, "sequence %d has %lld tokens", i,
                   (long long)tr->seq_lengths[i]);
        sum += tr->seq_lengths[i];
    }
    FUZZ_CHECK(tr->n_seqs >= 0 && sum == tr->n_tokens, "sequences sum to %lld, tokens %lld",
               (long long)sum, (long long)tr->n_tokens);
}

/* Two traces hold the same tokens, sequences, ids and probabilities. */
static void check_same(const ferry_trace *a, const ferry_trace *b, const char *what)
{
    FUZZ_CHECK(a->n_layers == b->n_layers && a->n_experts == b->n_experts &&
                   a->top_k == b->top_k && a->n_tokens == b->n_tokens && a->n_seqs == b->n_seqs &&
                   strcmp(a->model, b->model) == 0 && !a->probs == !b->probs,
               "%s: header differs", what);
    FUZZ_CHECK(a->n_seqs == 0 || memcmp(a->seq_lengths, b->seq_lengths,
                                        (size_t)a->n_seqs * sizeof *a->seq_lengths) == 0,
               "%s: sequence lengths differ", what);
    size_t n = (size_t)a->n_tokens;
    FUZZ_CHECK(n == 0 || memcmp(a->experts, b->experts, n * ids_per_token(a)) == 0,
               "%s: ids differ", what);
    FUZZ_CHECK(n == 0 || !a->probs ||
                   memcmp(a->probs, b->probs, n * probs_per_token(a) * sizeof(float)) == 0,
               "%s: probabilities differ", what);
}

static void check_body(const ferry_trace *tr, const uint8_t *data, size_t size)
{
    const uint8_t *nl = memchr(data, '\n', size);
    FUZZ_CHECK(nl != NULL, "accepted a trace without a header line");
    size_t at = (size_t)(nl - data) + 1;
    size_t n = (size_t)tr->n_tokens, id_bytes = n * ids_per_token(tr);
    size_t prob_bytes = tr->probs ? n * probs_per_token(tr) * sizeof(float) : 0;
    FUZZ_CHECK(size - at == id_bytes + prob_bytes, "body of %zu bytes, ids %zu, probs %zu",
               size - at, id_bytes, prob_bytes);
    FUZZ_CHECK(n == 0 || memcmp(tr->experts, data + at, id_bytes) == 0, "ids differ from the "
               "file's");
    FUZZ_CHECK(n == 0 || !tr->probs || memcmp(tr->probs, data + at + id_bytes, prob_bytes) == 0,
               "probabilities differ from the file's");
    for (int64_t t = 0; t < tr->n_tokens; t++) {
        for (int32_t l = 0; l < tr->n_layers; l++) {
            const uint8_t *ids = ferry_trace_at(tr, t, l);
            for (int32_t j = 0; j < tr->top_k; j++)
                FUZZ_CHECK(ids[j] < tr->n_experts && (j == 0 || ids[j] > ids[j - 1]),
                           "token %lld layer %d slot %d: id %d", (long long)t, l, j, ids[j]);
            if (!tr->probs)
                continue;
            const float *p = tr->probs + ((size_t)t * (size_t)tr->n_layers + (size_t)l) *
                                             (size_t)tr->n_experts;
            double s = 0;
            for (int32_t e = 0; e < tr->n_experts; e++) {
                FUZZ_CHECK(p[e] >= 0.0f && p[e] <= 1.0f, "token %lld layer %d: probability %g",
                           (long long)t, l, (double)p[e]);
                s += p[e];
            }
            FUZZ_CHECK(fabs(s - 1.0) <= 1e-3, "token %lld layer %d: probabilities sum to %g",
                       (long long)t, l, s);
        }
    }
}

static void check_slice(const ferry_trace *tr, uint64_t h)
{
    int64_t t0 = (int64_t)(h % (uint64_t)(tr->n_tokens + 1));
    int64_t n = (int64_t)((h >> 24) % (uint64_t)(tr->n_tokens - t0 + 1));
    ferry_trace *s = NULL;
    ferry_status st = ferry_trace_slice(tr, t0, n, &s);
    FUZZ_CHECK(st == FERRY_OK, "slice [%lld, +%lld): %s", (long long)t0, (long long)n,
               ferry_last_error());
    check_shape(s);
    FUZZ_CHECK(s->n_tokens == n && !s->probs == !tr->probs, "slice of %lld tokens has %lld",
               (long long)n, (long long)s->n_tokens);
    FUZZ_CHECK(n == 0 || memcmp(s->experts, ferry_trace_at(tr, t0, 0),
                                (size_t)n * ids_per_token(tr)) == 0,
               "slice ids differ");
    FUZZ_CHECK(n == 0 || !tr->probs ||
                   memcmp(s->probs, tr->probs + (size_t)t0 * probs_per_token(tr),
                          (size_t)n * probs_per_token(tr) * sizeof(float)) == 0,
               "slice probabilities differ");
    ferry_trace_free(s);
}

static void check_save_and_fit(const ferry_trace *tr)
{
    char path[512];
    snprintf(path, sizeof path, "%s/trace", fuzz_scratch_dir());
    ferry_status st = ferry_trace_save(tr, path);
    FUZZ_CHECK(st == FERRY_OK, "save: %s", ferry_last_error());
    ferry_trace *again = NULL;
    st = ferry_trace_load(path, &again);
    FUZZ_CHECK(st == FERRY_OK, "a saved trace does not load: %s", ferry_last_error());
    check_same(tr, again, "saved and loaded again");
    ferry_trace_free(again);

    if ((int64_t)tr->n_layers * tr->n_experts * tr->n_experts > FIT_MAX_LEE)
        return;
    ferry_routing_stats *s = NULL, *loaded = NULL;
    st = ferry_routing_stats_fit(&tr, 1, &s);
    FUZZ_CHECK(st == FERRY_OK, "fit: %s", ferry_last_error());
    snprintf(path, sizeof path, "%s/stats", fuzz_scratch_dir());
    st = ferry_routing_stats_save(s, path);
    FUZZ_CHECK(st == FERRY_OK, "stats save: %s", ferry_last_error());
    st = ferry_routing_stats_load(path, &loaded);
    FUZZ_CHECK(st == FERRY_OK, "fitted statistics do not load: %s", ferry_last_error());
    for (int32_t l = 0; l < tr->n_layers; l++)
        for (int32_t d = 0; d <= FERRY_PREDICT_MAX_LOOKAHEAD && l + d < tr->n_layers; d++) {
            const float *a = ferry_routing_stats_transition(s, l, d);
            const float *b = ferry_routing_stats_transition(loaded, l, d);
            FUZZ_CHECK(a && b && memcmp(a, b, (size_t)tr->n_experts * (size_t)tr->n_experts *
                                                  sizeof(float)) == 0,
                       "layer %d lookahead %d: loaded statistics differ from the fitted", l, d);
        }
    ferry_routing_stats_free(loaded);
    ferry_routing_stats_free(s);
}

FUZZ_INITIALIZE_QUIET()

/* Loads the trace data[0, size) and checks what the load gives. */
static void load_and_check(const uint8_t *data, size_t size)
{
    char path[64];
    int fd = fuzz_memfd(data, size, path, sizeof path);
    ferry_trace *tr = NULL;
    ferry_status st = ferry_trace_load(path, &tr);
    close(fd);
    if (st != FERRY_OK) {
        FUZZ_CHECK(tr == NULL, "a failed load wrote its output");
        fuzz_check_rejection(st, path);
        return;
    }
    check_shape(tr);
    check_body(tr, data, size);
    check_slice(tr, fuzz_hash(data, size));
    check_save_and_fit(tr);
    ferry_trace_free(tr);
}

static double header_number(const cJSON *h, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(h, key);
    return cJSON_IsNumber(v) ? v->valuedouble : -1;
}

/* The trace with its body resized to what its header line implies (see the top), or NULL when
 * the header gives no usable shape, the body already fits, or it would be too large. */
static uint8_t *resize_body(const uint8_t *data, size_t size, size_t *out_size)
{
    const uint8_t *nl = memchr(data, '\n', size);
    if (!nl)
        return NULL;
    size_t head = (size_t)(nl - data) + 1;
    cJSON *h = cJSON_ParseWithLength((const char *)data, head - 1);
    if (!h)
        return NULL;
    double l = header_number(h, "layers"), e = header_number(h, "experts");
    double k = header_number(h, "top_k"), t = header_number(h, "tokens");
    int probs = cJSON_GetObjectItemCaseSensitive(h, "probs") != NULL;
    cJSON_Delete(h);
    if (!(l >= 1 && l <= 256 && e >= 1 && e <= 256 && k >= 1 && k <= e && t >= 0 &&
          t <= (double)RESIZE_MAX_BODY))
        return NULL;
    size_t n_l = (size_t)l, n_e = (size_t)e, n_k = (size_t)k, n_t = (size_t)t;
    size_t id_bytes = n_t * n_l * n_k, prob_bytes = probs ? n_t * n_l * n_e * 4 : 0;
    if (id_bytes + prob_bytes > RESIZE_MAX_BODY || head + id_bytes + prob_bytes == size)
        return NULL;
    uint8_t *f = malloc(head + id_bytes + prob_bytes + 1);
    if (!f)
        fuzz_setup_failed("malloc");
    memcpy(f, data, head);
    size_t old = size - head < id_bytes ? size - head : id_bytes;
    memcpy(f + head, data + head, old);
    for (size_t i = old; i < id_bytes; i++)
        f[head + i] = (uint8_t)(i % n_k);
    const float one = 1.0f, zero = 0.0f;
    for (size_t i = 0; i < prob_bytes / 4; i++)
        memcpy(f + head + id_bytes + 4 * i, i % n_e == 0 ? &one : &zero, 4);
    *out_size = head + id_bytes + prob_bytes;
    return f;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    load_and_check(data, size);
    size_t resized_size = 0;
    uint8_t *resized = resize_body(data, size, &resized_size);
    if (resized) {
        load_and_check(resized, resized_size);
        free(resized);
    }
    return 0;
}
