/*
 * engine/sampler.c: see sampler.h.
 *
 * Top-p without a full sort: a token whose probability is below (1 - p) / (V - 1) can
 * never be inside the nucleus (the tokens above it already sum past p), so only the
 * candidates above that cut are sorted.
 */
#include "engine/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

void ferry_sampler_reseed(ferry_sampler *s, uint64_t seed) { s->rng = seed ^ 0x9e3779b97f4a7c15ull; }

ferry_status ferry_sampler_init(ferry_sampler *s, int32_t n_vocab, float temperature,
                                int32_t top_k, float top_p, uint64_t seed)
{
    memset(s, 0, sizeof *s);
    if (n_vocab <= 0)
        return ferry_fail(FERRY_ERR_INVALID, "sampler: vocabulary of %d tokens", (int)n_vocab);
    if (!(temperature >= 0) || !isfinite(temperature))
        return ferry_fail(FERRY_ERR_INVALID, "temperature %g must be >= 0", (double)temperature);
    if (!(top_p > 0 && top_p <= 1))
        return ferry_fail(FERRY_ERR_INVALID, "top-p %g must be in (0, 1]", (double)top_p);
    if (top_k < 0)
        return ferry_fail(FERRY_ERR_INVALID, "top-k %d must be >= 0", (int)top_k);
    s->n_vocab = n_vocab;
    s->temperature = temperature;
    s->top_k = top_k;
    s->top_p = top_p;
    ferry_sampler_reseed(s, seed);
    s->probs = malloc((size_t)n_vocab * sizeof *s->probs);
    s->cand = malloc((size_t)n_vocab * sizeof *s->cand);
    if (!s->probs || !s->cand) {
        ferry_sampler_free(s);
        return ferry_fail(FERRY_ERR_NOMEM, "sampler: out of memory");
    }
    return FERRY_OK;
}

void ferry_sampler_free(ferry_sampler *s)
{
    free(s->probs);
    free(s->cand);
    memset(s, 0, sizeof *s);
}

int32_t ferry_argmax(const float *logits, int32_t n)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (logits[i] > logits[best])
            best = i;
    return best;
}

static uint64_t next_u64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* uniform in [0, 1) */
static double next_unit(uint64_t *state) { return (double)(next_u64(state) >> 11) * 0x1.0p-53; }

static int by_prob_desc(const void *a, const void *b, void *probs)
{
    const float *p = probs;
    float pa = p[*(const int32_t *)a], pb = p[*(const int32_t *)b];
    if (pa != pb)
        return pa > pb ? -1 : 1;
    return *(const int32_t *)a - *(const int32_t *)b;
}

/* Sorts cand[0..n) by probability, descending (ties: lower id first). */
static void sort_candidates(int32_t *cand, int32_t n, const float *probs)
{
    if (n <= 64) {
        for (int32_t j = 1; j < n; j++) {
            int32_t c = cand[j], i = j;
            while (i > 0 && (probs[cand[i - 1]] < probs[c] ||
                             (probs[cand[i - 1]] == probs[c] && cand[i - 1] > c))) {
                cand[i] = cand[i - 1];
                i--;
            }
            cand[i] = c;
        }
        return;
    }
    qsort_r(cand, (size_t)n, sizeof *cand, by_prob_desc, (void *)probs);
}

int32_t ferry_sampler_sample(ferry_sampler *s, const float *logits)
{
    int32_t V = s->n_vocab;
    if (s->temperature <= 0)
        return ferry_argmax(logits, V);

    /* softmax(logits / T) */
    float mx = logits[ferry_argmax(logits, V)];
    double sum = 0;
    for (int32_t i = 0; i < V; i++) {
        s->probs[i] = expf((logits[i] - mx) / s->temperature);
        sum += s->probs[i];
    }
    for (int32_t i = 0; i < V; i++)
        s->probs[i] = (float)(s->probs[i] / sum);

    int32_t n = 0;
    if (s->top_k > 0 && s->top_k < V) {
        /* keep the k most probable: a running sorted list of k (k is small in practice) */
        for (int32_t i = 0; i < V; i++) {
            if (n == s->top_k && s->probs[i] <= s->probs[s->cand[n - 1]])
                continue;
            int32_t at = n < s->top_k ? n++ : n - 1;
            while (at > 0 && s->probs[s->cand[at - 1]] < s->probs[i]) {
                s->cand[at] = s->cand[at - 1];
                at--;
            }
            s->cand[at] = i;
        }
    } else {
        float cut = s->top_p < 1 ? (1.0f - s->top_p) / (float)(V > 1 ? V - 1 : 1) : 0;
        for (int32_t i = 0; i < V; i++)
            if (s->probs[i] >= cut)
                s->cand[n++] = i;
        if (s->top_p < 1)
            sort_candidates(s->cand, n, s->probs);
    }

    /* nucleus: the smallest prefix whose mass reaches top_p */
    double mass = 0;
    int32_t keep = n;
    for (int32_t i = 0; i < n; i++) {
        mass += s->probs[s->cand[i]];
        if (s->top_p < 1 && mass >= s->top_p) {
            keep = i + 1;
            break;
        }
    }
    double total = 0;
    for (int32_t i = 0; i < keep; i++)
        total += s->probs[s->cand[i]];
    double r = next_unit(&s->rng) * total, acc = 0;
    for (int32_t i = 0; i < keep; i++) {
        acc += s->probs[s->cand[i]];
        if (r < acc)
            return s->cand[i];
    }
    return s->cand[keep - 1];
}
