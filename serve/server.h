/*
 * serve/server.h: `ferry serve`, an OpenAI-compatible HTTP server over one model.
 *
 * libmicrohttpd does the HTTP, a thread per connection; serve/api.h parses requests and
 * writes response bodies; one engine thread drives the continuous batcher
 * (engine/batcher.h): requests join between steps, each step runs the decode tokens of every
 * sequence in flight with chunks of the pending prompts, and every sampled token goes
 * through the streaming decoder and the stop strings (serve/stop.h) to the request's
 * connection. A client that goes away (a closed socket, seen within 50 ms while it waits)
 * has its sequence ended before the next step.
 *
 * Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
 * GET /metrics (Prometheus text format).
 */
#ifndef FERRY_SERVE_SERVER_H
#define FERRY_SERVE_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "ferry.h"

typedef struct {
    const char *host;          /* address to bind; "127.0.0.1" when NULL */
    int32_t port;              /* 0: any free port (ferry_server_port says which) */
    const char *api_key;       /* NULL or "": no authentication */
    const char *model_name;    /* the model id clients name; NULL: the folder's name */
    const char *chat_template; /* a file overriding tokenizer_config.json's, or NULL */
    int32_t max_seqs;          /* sequences in flight (each holds a KV cache of n_ctx) */
    int32_t max_queue;         /* requests waiting for a slot; more get 429 */
    int32_t n_ctx;             /* positions per sequence: prompt + generated */
    int32_t chunk;             /* prompt tokens a sequence feeds per step */
    int32_t step_tokens;       /* most tokens per step (0: no limit) */
    int32_t max_batch;         /* tokens per MoE layer-batch */
    int32_t max_wait;          /* steps a pending prompt may be passed over */
    int32_t select;            /* choose prompt chunks for fewer distinct experts */
    size_t max_body;           /* largest request body; larger ones get 413 */
    int32_t max_tokens_default; /* tokens for a request without max_tokens; 0: until EOS
                                   or the context's end */
} ferry_server_params;

/* 127.0.0.1:8080, 8 sequences, queue 64, n_ctx 4096 (or the model's positions, if fewer),
 * chunk 64, step_tokens 256, layer-batch 16, max_wait 4, select on, 1 MiB bodies. */
ferry_server_params ferry_server_params_default(void);

typedef struct ferry_server ferry_server;

/* Loads the chat template (when the model has one or chat_template is given), makes the
 * batcher's contexts, binds the address and starts serving; *out runs until
 * ferry_server_stop. model_dir names the model (its id, its tokenizer_config.json).
 * FERRY_ERR_INVALID (bad params, an address that does not parse), FERRY_ERR_IO (the address
 * cannot be bound: in use, not local), the batcher's and chat template's errors. */
ferry_status ferry_server_start(ferry_model *m, const char *model_dir,
                                const ferry_server_params *p, ferry_server **out);

/* The port bound (the one chosen when params.port was 0). */
int32_t ferry_server_port(const ferry_server *s);

/* Stops accepting, ends what is in flight (their clients get an error), joins the threads
 * and frees everything. NULL-safe. */
void ferry_server_stop(ferry_server *s);

/* The server's counters as `ferry serve --stats` prints them at exit, into buf (NUL-ended,
 * truncated to cap). */
void ferry_server_summary(ferry_server *s, char *buf, size_t cap);

#endif
