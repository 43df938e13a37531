/*
 * engine/sampler.h: picks the next token from logits: greedy, or temperature with
 * optional top-k and top-p (nucleus), applied in that order as Hugging Face's
 * generate() does. Seeded, so a run is reproducible.
 *
 * The sampler owns buffers sized for the vocabulary at init; sampling allocates nothing.
 */
#ifndef FERRY_ENGINE_SAMPLER_H
#define FERRY_ENGINE_SAMPLER_H

#include <stdint.h>

#include "ferry.h"

typedef struct {
    int32_t n_vocab;
    float temperature; /* <= 0: greedy */
    int32_t top_k;     /* <= 0: off */
    float top_p;       /* >= 1: off */
    uint64_t rng;
    float *probs;      /* (n_vocab) */
    int32_t *cand;     /* (n_vocab) candidate ids */
} ferry_sampler;

/* Validates the settings (temperature >= 0 and finite, 0 < top_p <= 1, top_k >= 0) and
 * allocates the buffers. FERRY_ERR_INVALID naming the setting, FERRY_ERR_NOMEM. */
ferry_status ferry_sampler_init(ferry_sampler *s, int32_t n_vocab, float temperature,
                                int32_t top_k, float top_p, uint64_t seed);

/* Restarts the random stream from the seed given to ferry_sampler_init, so the same seed
 * draws the same tokens again. */
void ferry_sampler_reseed(ferry_sampler *s, uint64_t seed);

/* Frees the buffers. Safe on a zeroed struct. */
void ferry_sampler_free(ferry_sampler *s);

/* The id of the largest logit (the lowest id among equals). */
int32_t ferry_argmax(const float *logits, int32_t n);

/* Samples one id from the n_vocab logits. */
int32_t ferry_sampler_sample(ferry_sampler *s, const float *logits);

#endif
