/*
 * engine/hybrid.h: the CPU's share of hybrid execution (--hybrid). A context that may send
 * experts to the CPU owns one ferry_hybrid: host buffers sized for its layer-batch and a
 * worker thread that computes experts with the model's CPU backend (m->cpu_be) from host
 * memory (the expert store, or the checkpoint's host tensors), while the thread running
 * the forward pass drives the device's share.
 *
 * One job at a time: the forward pass writes the layer-batch's normed rows into
 * ferry_hybrid_input, starts a job naming the experts, runs the rest on the device, and
 * finishes the job, which hands back the CPU's output rows and where each belongs in the
 * per-token expert outputs. The dispatch passed to start is read by the worker until
 * finish returns and must not change meanwhile.
 *
 * Also here: measuring the cost model's rates (moe/hybrid.h) once the slots exist.
 */
#ifndef FERRY_ENGINE_HYBRID_H
#define FERRY_ENGINE_HYBRID_H

#include <stdint.h>

#include "engine/model.h"
#include "ferry.h"
#include "moe/dispatch.h"
#include "moe/hybrid.h"

typedef struct ferry_hybrid ferry_hybrid;

/* Creates the executor for layer-batches of up to max_tokens tokens of model m, which must
 * have a CPU backend (m->cpu_be). Starts the worker. On success *out owns it.
 * FERRY_ERR_NOMEM, FERRY_ERR_INVALID. */
ferry_status ferry_hybrid_create(ferry_model *m, int32_t max_tokens, ferry_hybrid **out);

/* Stops the worker (after the job in progress) and frees everything. NULL-safe. */
void ferry_hybrid_destroy(ferry_hybrid *h);

/* Host buffer (max_tokens, d_model) the caller fills with the layer-batch's normed rows
 * before ferry_hybrid_start. */
float *ferry_hybrid_input(ferry_hybrid *h);

/* Starts computing experts[0..n) of layer on the worker, each over the tokens dispatch
 * routes to it. FERRY_ERR_INVALID when a job is already running or n is out of range. */
ferry_status ferry_hybrid_start(ferry_hybrid *h, int32_t layer, const ferry_dispatch *dispatch,
                                const int32_t *experts, int32_t n);

/* Waits for the job. On success *out points to its output rows (n_rows, d_model), *rows to
 * the expert-output row (token * k + j) of each, valid until the next start; *n_bytes is
 * the expert weight bytes read and *busy_seconds the worker's time. On failure the worker's
 * error (store read, checksum, kernel) is returned with its message. */
ferry_status ferry_hybrid_finish(ferry_hybrid *h, const float **out, const int32_t **rows,
                                 int32_t *n_rows, uint64_t *n_bytes, double *busy_seconds);

/* Measures the cost model's rates on model m, whose slots exist: copies of one expert from
 * host memory into slot 0 (the best of three), and the CPU computing that expert for 1 and
 * for 8 tokens (the best of two each). Takes some tens of milliseconds for a Mixtral expert.
 * The codes of the store and the backends. */
ferry_status ferry_hybrid_measure(ferry_model *m, ferry_hybrid_cost *out);

#endif
