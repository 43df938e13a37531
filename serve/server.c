/*
 * serve/server.c: the HTTP server and its engine loop (serve/server.h).
 *
 * Threads: libmicrohttpd runs a thread per connection; the engine thread owns the batcher.
 * One mutex (mu) guards the queue, every request's shared fields and the counters. A request
 * is held by its connection and, once queued, by the engine (refs); whichever lets go last
 * frees it. The connection side waits on the request's condition variable in steps of 50 ms
 * and looks at its socket each time (a zero-byte peek: the client closed it), so a client
 * that goes away has its sequence ended before the next step.
 */
#include "serve/server.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "core/clock.h"
#include "core/error.h"
#include "engine/batcher.h"
#include "engine/model.h"
#include "format/chat.h"
#include "format/tokenizer.h"
#include "serve/api.h"
#include "serve/stop.h"

enum { REQ_QUEUED, REQ_RUNNING, REQ_DONE };
enum { EP_COMPLETIONS, EP_CHAT, EP_MODELS, EP_HEALTH, EP_METRICS, EP_OTHER, EP_COUNT };
static const char *const ep_names[EP_COUNT] = {"/v1/completions", "/v1/chat/completions",
                                               "/v1/models", "/health", "/metrics", "other"};
static const int status_codes[] = {200, 400, 401, 404, 405, 413, 429, 500, 503};
#define N_STATUS ((int)(sizeof status_codes / sizeof status_codes[0]))

typedef struct ferry_server ferry_server;

typedef struct request {
    struct request *next; /* the queue */
    ferry_server *srv;
    ferry_api_request api;
    int32_t *ids;
    int32_t n_ids;
    ferry_seq_params sp;
    char id[48];
    int64_t created;
    int state;
    int cancelled;  /* the client went away: end it */
    int refs;
    int32_t slot;
    ferry_detok_stream ds;
    ferry_stop *stop;
    char *text;     /* handed out so far */
    size_t len, cap;
    int32_t n_gen;
    const char *finish;
    ferry_api_error err; /* err.status != 0: failed after admission */
    pthread_cond_t cv;
    int fd;
    /* the connection's side of a stream */
    size_t sent;
    int first_sent, final_sent, usage_sent, done_sent;
    char *out;
    size_t out_len, out_off, out_cap;
} request;

typedef struct {
    char *body;
    size_t len, cap;
    int too_big;
} conn_state;

struct ferry_server {
    ferry_model *m;
    ferry_server_params p;
    char model_name[256];
    ferry_chat_template *tmpl;
    int tmpl_missing;     /* the model has none (else tmpl_error says why it did not load) */
    char tmpl_error[400];
    ferry_batcher *b;
    struct MHD_Daemon *d;
    pthread_t engine;
    int engine_started;
    pthread_mutex_t mu;
    pthread_cond_t engine_cv;
    int stopping;
    request *q_head, *q_tail;
    int32_t n_queued, n_running;
    request **slot_req; /* (max_seqs) */
    ferry_batcher_event *ev;
    char *piece;
    size_t piece_cap;
    int32_t n_tok_vocab;
    int32_t port;
    int64_t created;
    uint64_t id_counter;
    /* counters (mu) */
    int64_t requests[EP_COUNT][N_STATUS];
    int64_t prompt_tokens, generated_tokens, cancelled;
    ferry_batcher_stats bstats;
    ferry_offload_stats ostats;
    int have_ostats;
};

ferry_server_params ferry_server_params_default(void)
{
    return (ferry_server_params){.host = "127.0.0.1", .port = 8080, .max_seqs = 8,
                                 .max_queue = 64, .n_ctx = 4096, .chunk = 64,
                                 .step_tokens = 256, .max_batch = 16, .max_wait = 4,
                                 .select = 1, .max_body = (size_t)1 << 20};
}

/* ---- requests ---------------------------------------------------------------------------- */

static void request_free(request *r)
{
    ferry_api_request_free(&r->api);
    ferry_stop_destroy(r->stop);
    pthread_cond_destroy(&r->cv);
    free(r->ids);
    free(r->text);
    free(r->out);
    free(r);
}

/* Lets go of one hold on r (mu held). */
static void request_release(request *r)
{
    if (--r->refs == 0)
        request_free(r);
}

static int append(char **buf, size_t *len, size_t *cap, const char *s, size_t n)
{
    if (*len + n + 1 > *cap) {
        size_t c = *cap ? *cap : 256;
        while (c < *len + n + 1)
            c *= 2;
        char *nb = realloc(*buf, c);
        if (!nb)
            return -1;
        *buf = nb;
        *cap = c;
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = 0;
    return 0;
}

/* Ends r (mu held) with a reason or, when status != 0, an error; wakes its connection. */
static void request_finish(request *r, const char *finish, int status, const char *fmt, ...)
{
    if (r->state == REQ_DONE)
        return;
    if (r->state == REQ_RUNNING)
        r->srv->n_running--;
    r->state = REQ_DONE;
    r->finish = finish;
    if (status) {
        char msg[400];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        ferry_api_error_set(&r->err, status, status >= 500 ? "server_error" :
                            "invalid_request_error", "", "", "%s", msg);
    }
    pthread_cond_broadcast(&r->cv);
}

/* Whether the client closed its socket: a zero-byte peek (data waiting is not a close). */
static int client_gone(int fd)
{
    if (fd < 0)
        return 0;
    char ch;
    ssize_t n = recv(fd, &ch, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

static void wait_50ms(pthread_cond_t *cv, pthread_mutex_t *mu)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 50 * 1000 * 1000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    pthread_cond_timedwait(cv, mu, &ts);
}

/* ---- the engine thread ------------------------------------------------------------------- */

/* Adds text from the decoder through the stop strings to r (mu held); returns nonzero when a
 * stop string ended it. */
static int emit(ferry_server *s, request *r, const char *piece, size_t n, int flush)
{
    ferry_stop_result sr;
    if (ferry_stop_feed(r->stop, piece, n, &sr) ||
        append(&r->text, &r->len, &r->cap, sr.text, sr.len)) {
        request_finish(r, NULL, 500, "out of memory for the generated text");
        return 1;
    }
    if (sr.stopped)
        return 1;
    if (flush && (ferry_stop_flush(r->stop, &sr) ||
                  append(&r->text, &r->len, &r->cap, sr.text, sr.len))) {
        request_finish(r, NULL, 500, "out of memory for the generated text");
        return 1;
    }
    (void)s;
    return 0;
}

/* One sampled token for r (mu held). */
static void on_token(ferry_server *s, request *r, const ferry_batcher_event *e)
{
    const ferry_tokenizer *tok = s->m->tok;
    size_t n = 0;
    r->n_gen++;
    s->generated_tokens++;
    if (e->token < s->n_tok_vocab &&
        ferry_detok_stream_push(tok, &r->ds, e->token, 1, s->piece, s->piece_cap, &n)) {
        request_finish(r, NULL, 500, "decoding token %d: %s", (int)e->token,
                       ferry_last_error());
        ferry_batcher_cancel(s->b, e->slot);
        return;
    }
    int stopped = emit(s, r, s->piece, n, 0);
    if (!stopped && e->finish) {
        if (ferry_detok_stream_flush(tok, &r->ds, s->piece, s->piece_cap, &n))
            n = 0;
        stopped = emit(s, r, s->piece, n, 1);
        if (!stopped) {
            request_finish(r, e->finish == FERRY_FINISH_EOS ? "stop" : "length", 0, NULL);
            return;
        }
    }
    if (stopped) {
        if (!e->finish)
            ferry_batcher_cancel(s->b, e->slot);
        request_finish(r, "stop", 0, NULL);
    } else {
        pthread_cond_broadcast(&r->cv);
    }
}

/* Starts r in the batcher (mu held). */
static void admit(ferry_server *s, request *r)
{
    int32_t slot = -1;
    if (ferry_batcher_add(s->b, r->ids, r->n_ids, &r->sp, &slot)) {
        request_finish(r, NULL, 400, "%s", ferry_last_error());
        request_release(r);
        return;
    }
    r->state = REQ_RUNNING;
    r->slot = slot;
    s->slot_req[slot] = r;
    s->n_running++;
    s->prompt_tokens += r->n_ids;
    /* the decoder first sees the prompt (its text discarded), as ferry run's does */
    ferry_detok_stream_init(&r->ds);
    size_t n;
    for (int32_t i = 0; i < r->n_ids; i++)
        if (r->ids[i] < s->n_tok_vocab)
            (void)ferry_detok_stream_push(s->m->tok, &r->ds, r->ids[i], 1, s->piece,
                                          s->piece_cap, &n);
}

static void *engine_main(void *arg)
{
    ferry_server *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->stopping && !s->q_head && ferry_batcher_active(s->b) == 0)
            pthread_cond_wait(&s->engine_cv, &s->mu);
        if (s->stopping)
            break;
        for (int32_t i = 0; i < s->p.max_seqs; i++) { /* clients that went away */
            request *r = s->slot_req[i];
            if (r && r->cancelled) {
                ferry_batcher_cancel(s->b, i);
                request_finish(r, NULL, 0, NULL);
                s->slot_req[i] = NULL;
                s->cancelled++;
                request_release(r);
            }
        }
        s->q_tail = NULL; /* queued requests whose clients went away leave the queue */
        for (request **pp = &s->q_head; *pp;) {
            request *r = *pp;
            if (r->cancelled) {
                *pp = r->next;
                s->n_queued--;
                request_finish(r, NULL, 0, NULL);
                s->cancelled++;
                request_release(r);
            } else {
                s->q_tail = r;
                pp = &r->next;
            }
        }
        while (s->q_head && ferry_batcher_free_slots(s->b) > 0) {
            request *r = s->q_head;
            s->q_head = r->next;
            if (!s->q_head)
                s->q_tail = NULL;
            s->n_queued--;
            admit(s, r);
        }
        if (ferry_batcher_active(s->b) == 0)
            continue;
        pthread_mutex_unlock(&s->mu);
        int32_t n_ev = 0;
        ferry_status st = ferry_batcher_step(s->b, s->ev, &n_ev);
        ferry_batcher_stats bs;
        ferry_batcher_get_stats(s->b, &bs);
        ferry_offload_stats os;
        int have_os = ferry_context_get_offload_stats(ferry_batcher_moe_context(s->b), &os,
                                                      NULL, 0) == FERRY_OK;
        pthread_mutex_lock(&s->mu);
        s->bstats = bs;
        if (have_os) {
            s->ostats = os;
            s->have_ostats = 1;
        }
        if (st) { /* the batcher ended every sequence */
            const char *msg = ferry_last_error();
            for (int32_t i = 0; i < s->p.max_seqs; i++) {
                request *r = s->slot_req[i];
                if (!r)
                    continue;
                request_finish(r, NULL, 500, "the forward pass failed: %s", msg);
                s->slot_req[i] = NULL;
                request_release(r);
            }
            continue;
        }
        for (int32_t j = 0; j < n_ev; j++) {
            request *r = s->slot_req[s->ev[j].slot];
            if (!r)
                continue;
            on_token(s, r, &s->ev[j]);
            if (r->state == REQ_DONE) {
                s->slot_req[s->ev[j].slot] = NULL;
                request_release(r);
            }
        }
    }
    /* shutting down: what is in flight or queued ends with an error */
    for (int32_t i = 0; i < s->p.max_seqs; i++) {
        request *r = s->slot_req[i];
        if (!r)
            continue;
        ferry_batcher_cancel(s->b, i);
        request_finish(r, NULL, 503, "the server is shutting down");
        s->slot_req[i] = NULL;
        request_release(r);
    }
    while (s->q_head) {
        request *r = s->q_head;
        s->q_head = r->next;
        s->n_queued--;
        request_finish(r, NULL, 503, "the server is shutting down");
        request_release(r);
    }
    s->q_tail = NULL;
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- responses --------------------------------------------------------------------------- */

static void count(ferry_server *s, int ep, int status)
{
    int k = 0;
    while (k < N_STATUS - 1 && status_codes[k] != status)
        k++;
    pthread_mutex_lock(&s->mu);
    s->requests[ep][k]++;
    pthread_mutex_unlock(&s->mu);
}

/* Queues body (malloc'd, taken) with status; NULL body: out of memory, a 500. */
static enum MHD_Result send_body(ferry_server *s, struct MHD_Connection *c, int ep, int status,
                                 char *body, const char *content_type)
{
    static const char oom[] = "{\"error\": {\"message\": \"out of memory\", \"type\": "
                              "\"server_error\", \"param\": null, \"code\": null}}";
    struct MHD_Response *resp;
    if (!body) {
        status = 500;
        resp = MHD_create_response_from_buffer(sizeof oom - 1, (void *)oom,
                                               MHD_RESPMEM_PERSISTENT);
    } else {
        resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    }
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    if (status == 429 || status == 503)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, "1");
    if (status == 401)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    enum MHD_Result rc = MHD_queue_response(c, (unsigned)status, resp);
    MHD_destroy_response(resp);
    count(s, ep, status);
    return rc;
}

static enum MHD_Result send_error(ferry_server *s, struct MHD_Connection *c, int ep,
                                  const ferry_api_error *e)
{
    return send_body(s, c, ep, e->status, ferry_api_error_json(e), "application/json");
}

static enum MHD_Result send_errorf(ferry_server *s, struct MHD_Connection *c, int ep,
                                   int status, const char *type, const char *code,
                                   const char *param, const char *fmt, ...)
    FERRY_PRINTF(8, 9);
static enum MHD_Result send_errorf(ferry_server *s, struct MHD_Connection *c, int ep,
                                   int status, const char *type, const char *code,
                                   const char *param, const char *fmt, ...)
{
    char msg[450];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    ferry_api_error e;
    ferry_api_error_set(&e, status, type, code, param, "%s", msg);
    return send_error(s, c, ep, &e);
}

/* ---- /metrics ------------------------------------------------------------------------------ */

typedef struct {
    char *buf;
    size_t len, cap;
    int failed;
} text_buf;

static void tb_printf(text_buf *t, const char *fmt, ...) FERRY_PRINTF(2, 3);
static void tb_printf(text_buf *t, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof line || append(&t->buf, &t->len, &t->cap, line, (size_t)n))
        t->failed = 1;
}

static void metric(text_buf *t, const char *name, const char *type, const char *help,
                   double v)
{
    tb_printf(t, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", name, help, name, type, name, v);
}

static char *metrics_text(ferry_server *s)
{
    text_buf t = {0};
    pthread_mutex_lock(&s->mu);
    tb_printf(&t, "# HELP ferry_requests_total HTTP requests answered, by endpoint and "
              "status.\n# TYPE ferry_requests_total counter\n");
    for (int e = 0; e < EP_COUNT; e++)
        for (int k = 0; k < N_STATUS; k++)
            if (s->requests[e][k] || (k == 0 && e < EP_OTHER))
                tb_printf(&t, "ferry_requests_total{endpoint=\"%s\",status=\"%d\"} %" PRId64
                          "\n", ep_names[e], status_codes[k], s->requests[e][k]);
    const ferry_batcher_stats *b = &s->bstats;
    const ferry_offload_stats *o = &s->ostats;
    metric(&t, "ferry_queue_depth", "gauge", "Requests waiting for a sequence slot.",
           s->n_queued);
    metric(&t, "ferry_active_sequences", "gauge", "Sequences in flight.", s->n_running);
    metric(&t, "ferry_max_sequences", "gauge", "Sequence slots (--max-seqs).",
           s->p.max_seqs);
    metric(&t, "ferry_prompt_tokens_total", "counter", "Prompt tokens admitted.",
           (double)s->prompt_tokens);
    metric(&t, "ferry_generated_tokens_total", "counter", "Tokens generated.",
           (double)s->generated_tokens);
    metric(&t, "ferry_cancelled_total", "counter",
           "Requests ended because their client went away.", (double)s->cancelled);
    metric(&t, "ferry_tokens_per_second", "gauge",
           "Tokens through the model (prompt and generated) per second of engine steps.",
           b->seconds > 0 ? (double)b->tokens / b->seconds : 0);
    metric(&t, "ferry_generated_tokens_per_second", "gauge",
           "Generated tokens per second of engine steps.",
           b->seconds > 0 ? (double)b->generated_tokens / b->seconds : 0);
    metric(&t, "ferry_steps_total", "counter", "Engine steps.", (double)b->steps);
    metric(&t, "ferry_step_seconds_total", "counter", "Time inside engine steps.", b->seconds);
    metric(&t, "ferry_layer_batches_total", "counter", "MoE block runs (layer-batches).",
           (double)b->layer_batches);
    metric(&t, "ferry_expert_loads_total", "counter",
           "Distinct experts summed over layer-batches: each one read or fetched once.",
           (double)b->expert_loads);
    metric(&t, "ferry_step_experts_total", "counter",
           "Distinct (layer, expert) pairs each step activated, summed over steps.",
           (double)b->step_experts);
    metric(&t, "ferry_selected_steps_total", "counter",
           "Steps where pending prompts competed for the step budget.",
           (double)b->selected_steps);
    metric(&t, "ferry_selected_step_experts_total", "counter",
           "ferry_step_experts_total over the steps where prompts competed.",
           (double)b->selected_step_experts);
    metric(&t, "ferry_step_experts_planned_total", "counter",
           "Where prompts competed: the experts estimated for the chunks chosen.",
           (double)b->step_experts_planned);
    metric(&t, "ferry_step_experts_arrival_total", "counter",
           "Where prompts competed: the same estimate had arrival order chosen.",
           (double)b->step_experts_arrival);
    int64_t uses = o->hits + o->misses + o->cpu_experts;
    metric(&t, "ferry_expert_hit_rate", "gauge",
           "Expert uses served from a device slot: hits / (hits + misses + CPU experts); 1 "
           "when every expert is resident.",
           s->have_ostats && uses > 0 ? ferry_expert_hit_rate(o->hits, o->misses,
                                                              o->cpu_experts) : 1.0);
    metric(&t, "ferry_expert_hits_total", "counter", "Expert cache hits.", (double)o->hits);
    metric(&t, "ferry_expert_misses_total", "counter", "Expert cache misses.",
           (double)o->misses);
    metric(&t, "ferry_bytes_to_device_total", "counter",
           "Expert bytes copied into device slots.", (double)o->bytes_to_device);
    metric(&t, "ferry_bytes_from_disk_total", "counter", "Expert bytes read from the pack.",
           (double)o->bytes_from_disk);
    metric(&t, "ferry_cpu_experts_total", "counter",
           "Expert computations done on the CPU instead of fetched (--hybrid).",
           (double)o->cpu_experts);
    metric(&t, "ferry_predictor_recall", "gauge",
           "The next layer's router on a layer's input as a predictor of the next layer's "
           "experts: the share of chosen experts it named.",
           b->predicted > 0 ? (double)b->predicted_hits / (double)b->predicted : 0);
    pthread_mutex_unlock(&s->mu);
    if (t.failed) {
        free(t.buf);
        return NULL;
    }
    return t.buf;
}

/* ---- streaming ----------------------------------------------------------------------------- */

static int out_add_data(request *r, char *json)
{
    if (!json)
        return -1;
    int rc = append(&r->out, &r->out_len, &r->out_cap, "data: ", 6) ||
             append(&r->out, &r->out_len, &r->out_cap, json, strlen(json)) ||
             append(&r->out, &r->out_len, &r->out_cap, "\n\n", 2);
    free(json);
    return rc ? -1 : 0;
}

/* Fills r->out with the next events (mu held); 1 when there was something, 0 when it
 * must wait, -1 at the end of the stream or on failure. */
static int next_events(request *r)
{
    ferry_server *s = r->srv;
    const char *id = r->id, *model = s->model_name;
    ferry_api_kind kind = r->api.kind;
    int usage = r->api.include_usage;
    r->out_len = r->out_off = 0;
    if (!r->first_sent && kind == FERRY_API_CHAT && !r->err.status) {
        r->first_sent = 1;
        return out_add_data(r, ferry_api_chunk_json(kind, id, model, r->created, "", 0, 1,
                                                    NULL, usage)) ? -1 : 1;
    }
    if (r->sent < r->len) {
        size_t n = r->len - r->sent;
        int rc = out_add_data(r, ferry_api_chunk_json(kind, id, model, r->created,
                                                      r->text + r->sent, n, 0, NULL, usage));
        r->sent = r->len;
        return rc ? -1 : 1;
    }
    if (r->state != REQ_DONE)
        return 0;
    if (!r->final_sent) {
        r->final_sent = 1;
        if (r->err.status)
            return out_add_data(r, ferry_api_error_json(&r->err)) ? -1 : 1;
        return out_add_data(r, ferry_api_chunk_json(kind, id, model, r->created, "", 0, 0,
                                                    r->finish ? r->finish : "stop",
                                                    usage)) ? -1 : 1;
    }
    if (usage && !r->usage_sent && !r->err.status) {
        r->usage_sent = 1;
        return out_add_data(r, ferry_api_usage_chunk_json(kind, id, model, r->created,
                                                          r->n_ids, r->n_gen)) ? -1 : 1;
    }
    if (!r->done_sent) {
        r->done_sent = 1;
        return append(&r->out, &r->out_len, &r->out_cap, "data: [DONE]\n\n", 14) ? -1 : 1;
    }
    return -1;
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    request *r = cls;
    ferry_server *s = r->srv;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        if (r->out_off < r->out_len) {
            size_t n = r->out_len - r->out_off;
            if (n > max)
                n = max;
            memcpy(buf, r->out + r->out_off, n);
            r->out_off += n;
            pthread_mutex_unlock(&s->mu);
            return (ssize_t)n;
        }
        int rc = next_events(r);
        if (rc < 0) {
            pthread_mutex_unlock(&s->mu);
            return r->done_sent ? MHD_CONTENT_READER_END_OF_STREAM
                                : MHD_CONTENT_READER_END_WITH_ERROR;
        }
        if (rc > 0)
            continue;
        wait_50ms(&r->cv, &s->mu);
        if (r->state != REQ_DONE && client_gone(r->fd)) {
            r->cancelled = 1;
            pthread_cond_signal(&s->engine_cv);
            pthread_mutex_unlock(&s->mu);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
    }
}

static void stream_free(void *cls)
{
    request *r = cls;
    ferry_server *s = r->srv;
    pthread_mutex_lock(&s->mu);
    if (r->state != REQ_DONE) {
        r->cancelled = 1;
        pthread_cond_signal(&s->engine_cv);
    }
    request_release(r);
    pthread_mutex_unlock(&s->mu);
}

/* ---- completions ----------------------------------------------------------------------- */

/* The prompt's token ids into r->ids. 0, or an error in e. */
static int prompt_ids(ferry_server *s, request *r, ferry_api_error *e)
{
    const ferry_api_request *a = &r->api;
    int32_t V = s->m->cfg.vocab_size;
    if (a->kind == FERRY_API_COMPLETIONS && a->prompt_ids) {
        for (int32_t i = 0; i < a->n_prompt_ids; i++)
            if (a->prompt_ids[i] >= V)
                return ferry_api_error_set(e, 400, "invalid_request_error", "invalid_value",
                                           "prompt", "prompt token %d at index %d is outside "
                                           "the vocabulary [0, %d)", (int)a->prompt_ids[i],
                                           (int)i, (int)V);
        r->ids = malloc((size_t)a->n_prompt_ids * sizeof *r->ids);
        if (!r->ids)
            return ferry_api_error_set(e, 500, "server_error", "", "", "out of memory");
        memcpy(r->ids, a->prompt_ids, (size_t)a->n_prompt_ids * sizeof *r->ids);
        r->n_ids = a->n_prompt_ids;
        return 0;
    }
    const char *text = a->prompt;
    size_t len = a->prompt_len;
    char *rendered = NULL;
    int add_special = 1;
    if (a->kind == FERRY_API_CHAT) {
        if (!s->tmpl && s->tmpl_missing)
            return ferry_api_error_set(e, 400, "invalid_request_error", "no_chat_template",
                                       "messages", "the model has no chat template; start "
                                       "the server with --chat-template FILE");
        if (!s->tmpl)
            return ferry_api_error_set(e, 500, "server_error", "chat_template_unusable", "",
                                       "the model's chat template cannot be used (%.300s); "
                                       "start the server with --chat-template FILE",
                                       s->tmpl_error);
        ferry_status st = ferry_chat_template_render(s->tmpl, a->messages, 1,
                                                     a->template_kwargs, &rendered, &len);
        if (st)
            return ferry_api_error_set(e, st == FERRY_ERR_NOMEM ? 500 : 400,
                                       st == FERRY_ERR_NOMEM ? "server_error" :
                                       "invalid_request_error", "", "messages", "%s",
                                       ferry_last_error());
        text = rendered;
        add_special = 0; /* the template writes them, as transformers' chat path does */
    }
    int32_t n = 0, cap = (int32_t)(len < 4096 ? 4096 : len + 16);
    ferry_status st;
    for (;;) {
        free(r->ids);
        r->ids = malloc((size_t)cap * sizeof *r->ids);
        if (!r->ids) {
            free(rendered);
            return ferry_api_error_set(e, 500, "server_error", "", "", "out of memory");
        }
        st = ferry_tokenize(s->m, text, len, add_special, r->ids, cap, &n);
        if (st != FERRY_ERR_INVALID || n <= cap)
            break;
        cap = n;
    }
    free(rendered);
    if (st)
        return ferry_api_error_set(e, 400, "invalid_request_error", "", a->kind ==
                                   FERRY_API_CHAT ? "messages" : "prompt", "%s",
                                   ferry_last_error());
    r->n_ids = n;
    return 0;
}

static enum MHD_Result completions(ferry_server *s, struct MHD_Connection *c, int ep,
                                   const conn_state *cs)
{
    ferry_api_kind kind = ep == EP_CHAT ? FERRY_API_CHAT : FERRY_API_COMPLETIONS;
    ferry_api_error e;
    request *r = calloc(1, sizeof *r);
    if (!r)
        return send_errorf(s, c, ep, 500, "server_error", "", "", "out of memory");
    r->srv = s;
    r->slot = -1;
    r->fd = -1;
    pthread_cond_init(&r->cv, NULL);
    if (ferry_api_parse(kind, cs->body ? cs->body : "", cs->len, &r->api, &e)) {
        request_free(r);
        return send_error(s, c, ep, &e);
    }
    const ferry_api_request *a = &r->api;
    if (a->model && strcmp(a->model, s->model_name)) {
        ferry_api_error_set(&e, 404, "invalid_request_error", "model_not_found", "model",
                            "the model '%.200s' does not exist; this server serves '%.200s'",
                            a->model, s->model_name);
        request_free(r);
        return send_error(s, c, ep, &e);
    }
    if (prompt_ids(s, r, &e)) {
        request_free(r);
        return send_error(s, c, ep, &e);
    }
    int32_t ctx = s->p.n_ctx;
    const char *pparam = kind == FERRY_API_CHAT ? "messages" : "prompt";
    if (r->n_ids == 0) {
        ferry_api_error_set(&e, 400, "invalid_request_error", "", pparam,
                            "the prompt has no tokens");
    } else if (a->max_tokens > 0 && (int64_t)r->n_ids + a->max_tokens > ctx) {
        ferry_api_error_set(&e, 400, "invalid_request_error", "context_length_exceeded",
                            "max_tokens", "this server's context is %d tokens, but the "
                            "request has %d prompt tokens and asks for %d more (max_tokens): "
                            "%lld in all", (int)ctx, (int)r->n_ids, (int)a->max_tokens,
                            (long long)r->n_ids + a->max_tokens);
    } else if (a->max_tokens <= 0 && r->n_ids >= ctx) {
        ferry_api_error_set(&e, 400, "invalid_request_error", "context_length_exceeded",
                            pparam, "this server's context is %d tokens, and the prompt alone "
                            "has %d: no room to generate", (int)ctx, (int)r->n_ids);
    } else {
        e.status = 0;
    }
    if (e.status) {
        request_free(r);
        return send_error(s, c, ep, &e);
    }
    r->sp.max_tokens = a->max_tokens > 0 ? a->max_tokens : ctx - r->n_ids;
    if (a->max_tokens <= 0 && s->p.max_tokens_default > 0 &&
        s->p.max_tokens_default < r->sp.max_tokens)
        r->sp.max_tokens = s->p.max_tokens_default;
    r->sp.temperature = (float)a->temperature;
    r->sp.top_k = a->top_k > 0 ? a->top_k : 0;
    r->sp.top_p = (float)a->top_p;
    r->sp.stop_at_eos = !a->ignore_eos;
    if (ferry_stop_create((const char *const *)a->stop, a->n_stop, 0, &r->stop)) {
        request_free(r);
        return send_errorf(s, c, ep, 500, "server_error", "", "", "%s", ferry_last_error());
    }
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    r->fd = ci ? ci->connect_fd : -1;
    r->created = (int64_t)time(NULL);

    pthread_mutex_lock(&s->mu);
    uint64_t serial = ++s->id_counter;
    r->sp.seed = a->has_seed ? a->seed
                             : (uint64_t)ferry_now_seconds() * 1000003u ^ serial * 0x9E3779B97F4A7C15u;
    snprintf(r->id, sizeof r->id, "%s-%" PRIx64 "%06" PRIu64, kind == FERRY_API_CHAT ?
             "chatcmpl" : "cmpl", (uint64_t)s->created, serial);
    if (s->stopping || s->n_queued + s->n_running >= s->p.max_seqs + s->p.max_queue) {
        int stopping = s->stopping;
        int32_t busy = s->n_running, queued = s->n_queued;
        pthread_mutex_unlock(&s->mu);
        request_free(r);
        if (stopping)
            return send_errorf(s, c, ep, 503, "server_error", "", "",
                               "the server is shutting down");
        return send_errorf(s, c, ep, 429, "rate_limit_error", "queue_full", "",
                           "the server is full: %d sequences in flight and %d waiting "
                           "(--max-seqs %d, --max-queue %d); retry later", (int)busy,
                           (int)queued, (int)s->p.max_seqs, (int)s->p.max_queue);
    }
    r->refs = 2; /* the connection and the engine */
    r->state = REQ_QUEUED;
    if (s->q_tail)
        s->q_tail->next = r;
    else
        s->q_head = r;
    s->q_tail = r;
    s->n_queued++;
    pthread_cond_signal(&s->engine_cv);

    if (a->stream) {
        pthread_mutex_unlock(&s->mu);
        struct MHD_Response *resp = MHD_create_response_from_callback(
            MHD_SIZE_UNKNOWN, 16384, stream_reader, r, stream_free);
        if (!resp) {
            stream_free(r);
            return MHD_NO;
        }
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        enum MHD_Result rc = MHD_queue_response(c, 200, resp);
        MHD_destroy_response(resp);
        count(s, ep, 200);
        return rc;
    }
    while (r->state != REQ_DONE) {
        wait_50ms(&r->cv, &s->mu);
        if (r->state != REQ_DONE && client_gone(r->fd)) {
            r->cancelled = 1;
            pthread_cond_signal(&s->engine_cv);
            request_release(r);
            pthread_mutex_unlock(&s->mu);
            return MHD_NO; /* nobody to answer */
        }
    }
    char *body;
    int status = 200;
    if (r->err.status) {
        status = r->err.status;
        body = ferry_api_error_json(&r->err);
    } else {
        body = ferry_api_response_json(kind, r->id, s->model_name, r->created, r->text,
                                       r->len, r->finish ? r->finish : "stop", r->n_ids,
                                       r->n_gen);
    }
    request_release(r);
    pthread_mutex_unlock(&s->mu);
    return send_body(s, c, ep, status, body, "application/json");
}

/* ---- routing ---------------------------------------------------------------------------- */

static int authorized(const ferry_server *s, struct MHD_Connection *c)
{
    if (!s->p.api_key || !s->p.api_key[0])
        return 1;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7))
        return 0;
    h += 7;
    while (*h == ' ')
        h++;
    /* compares every byte whatever matches, so the time does not tell a prefix */
    size_t n = strlen(h), k = strlen(s->p.api_key);
    unsigned diff = (unsigned)(n != k);
    for (size_t i = 0; i < n; i++)
        diff |= (unsigned char)h[i] ^ (unsigned char)s->p.api_key[i < k ? i : 0];
    return diff == 0;
}

static enum MHD_Result route(ferry_server *s, struct MHD_Connection *c, const char *url,
                             const char *method, conn_state *cs)
{
    int ep = EP_OTHER;
    const char *want = "GET";
    if (!strcmp(url, "/v1/completions")) {
        ep = EP_COMPLETIONS;
        want = "POST";
    } else if (!strcmp(url, "/v1/chat/completions")) {
        ep = EP_CHAT;
        want = "POST";
    } else if (!strcmp(url, "/v1/models")) {
        ep = EP_MODELS;
    } else if (!strcmp(url, "/health")) {
        ep = EP_HEALTH;
    } else if (!strcmp(url, "/metrics")) {
        ep = EP_METRICS;
    }
    if (ep == EP_OTHER)
        return send_errorf(s, c, ep, 404, "invalid_request_error", "not_found", "",
                           "no such endpoint: %s %.200s", method, url);
    if (strcmp(method, want) && !(ep != EP_COMPLETIONS && ep != EP_CHAT &&
                                  !strcmp(method, "HEAD")))
        return send_errorf(s, c, ep, 405, "invalid_request_error", "method_not_allowed", "",
                           "%s takes %s, not %.20s", url, want, method);
    if (!authorized(s, c)) /* every endpoint, /health and /metrics too */
        return send_errorf(s, c, ep, 401, "authentication_error", "invalid_api_key", "",
                           "a valid API key is required: send 'Authorization: Bearer KEY'");
    if (cs->too_big)
        return send_errorf(s, c, ep, 413, "invalid_request_error", "request_too_large", "",
                           "the request body is over this server's limit of %zu bytes "
                           "(--max-body)", s->p.max_body);
    switch (ep) {
    case EP_HEALTH: {
        pthread_mutex_lock(&s->mu);
        int stopping = s->stopping;
        pthread_mutex_unlock(&s->mu);
        if (stopping)
            return send_errorf(s, c, ep, 503, "server_error", "", "", "shutting down");
        char *b = strdup("{\"status\":\"ok\"}");
        return send_body(s, c, ep, 200, b, "application/json");
    }
    case EP_MODELS:
        return send_body(s, c, ep, 200, ferry_api_models_json(s->model_name, s->created),
                         "application/json");
    case EP_METRICS:
        return send_body(s, c, ep, 200, metrics_text(s), "text/plain; version=0.0.4");
    default:
        return completions(s, c, ep, cs);
    }
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_size, void **con_cls)
{
    (void)version;
    ferry_server *s = cls;
    conn_state *cs = *con_cls;
    if (!cs) {
        cs = calloc(1, sizeof *cs);
        if (!cs)
            return MHD_NO;
        *con_cls = cs;
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND,
                                                     MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > s->p.max_body)
            cs->too_big = 1; /* answered at once, the body unread */
        if (!cs->too_big)
            return MHD_YES;
        return route(s, c, url, method, cs);
    }
    if (*upload_size) {
        if (!cs->too_big) {
            if (cs->len + *upload_size > s->p.max_body) {
                cs->too_big = 1;
                free(cs->body);
                cs->body = NULL;
                cs->len = cs->cap = 0;
            } else if (append(&cs->body, &cs->len, &cs->cap, upload_data, *upload_size)) {
                return MHD_NO;
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    return route(s, c, url, method, cs);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode code)
{
    (void)cls;
    (void)c;
    (void)code;
    conn_state *cs = *con_cls;
    if (cs) {
        free(cs->body);
        free(cs);
        *con_cls = NULL;
    }
}

/* ---- start and stop ----------------------------------------------------------------------- */

static void log_mhd(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    size_t n = strlen(line);
    while (n && line[n - 1] == '\n')
        line[--n] = 0;
    ferry_log(FERRY_LOG_INFO, "serve: %s", line); /* mostly clients that went away */
}

ferry_status ferry_server_start(ferry_model *m, const char *model_dir,
                                const ferry_server_params *p, ferry_server **out)
{
    if (!m || !model_dir || !p || !out)
        return ferry_fail(FERRY_ERR_INVALID, "serve: NULL arguments");
    *out = NULL;
    if (p->port < 0 || p->port > 65535 || p->max_seqs < 1 || p->max_queue < 0 ||
        p->n_ctx < 2 || p->max_body < 1)
        return ferry_fail(FERRY_ERR_INVALID, "serve: port %d (0 to 65535), %d sequences (>= 1),"
                          " queue %d (>= 0), context %d (>= 2)", (int)p->port,
                          (int)p->max_seqs, (int)p->max_queue, (int)p->n_ctx);
    if (p->n_ctx > m->cfg.max_positions)
        return ferry_fail(FERRY_ERR_INVALID, "serve: a context of %d positions is over the "
                          "model's %d", (int)p->n_ctx, (int)m->cfg.max_positions);
    const char *host = p->host ? p->host : "127.0.0.1";
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV | AI_PASSIVE}, *ai = NULL;
    char port_s[16];
    snprintf(port_s, sizeof port_s, "%d", (int)p->port);
    int gai = getaddrinfo(host, port_s, &hints, &ai);
    if (gai)
        return ferry_fail(FERRY_ERR_INVALID, "serve: the address '%s' does not resolve: %s",
                          host, gai_strerror(gai));
    ferry_server *s = calloc(1, sizeof *s);
    if (!s) {
        freeaddrinfo(ai);
        return ferry_fail(FERRY_ERR_NOMEM, "serve: out of memory");
    }
    s->m = m;
    s->p = *p;
    s->p.host = NULL; /* the caller's strings are not kept */
    s->created = (int64_t)time(NULL);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->engine_cv, NULL);
    ferry_status st = FERRY_OK;
    if (p->model_name && p->model_name[0]) {
        snprintf(s->model_name, sizeof s->model_name, "%s", p->model_name);
    } else {
        size_t n = strlen(model_dir);
        while (n > 1 && model_dir[n - 1] == '/')
            n--;
        size_t b = n;
        while (b > 0 && model_dir[b - 1] != '/')
            b--;
        snprintf(s->model_name, sizeof s->model_name, "%.*s", (int)(n - b), model_dir + b);
    }
    s->p.model_name = NULL;
    s->p.chat_template = NULL;
    s->p.api_key = p->api_key && p->api_key[0] ? strdup(p->api_key) : NULL;
    if (p->api_key && p->api_key[0] && !s->p.api_key)
        st = ferry_fail(FERRY_ERR_NOMEM, "serve: out of memory");
    /* a checkpoint without a usable template still serves completions, and chat says why
     * not; a template file the user names must load */
    if (!st) {
        st = ferry_chat_template_load(model_dir, p->chat_template, &s->tmpl);
        if (st && !p->chat_template && st != FERRY_ERR_NOMEM) {
            const char *msg = ferry_last_error();
            s->tmpl_missing = st == FERRY_ERR_UNSUPPORTED && strstr(msg, "no chat_template");
            snprintf(s->tmpl_error, sizeof s->tmpl_error, "%s", msg);
            ferry_log(s->tmpl_missing ? FERRY_LOG_INFO : FERRY_LOG_WARN,
                      "serve: /v1/chat/completions is off: %s", msg);
            st = FERRY_OK;
        }
    }
    s->n_tok_vocab = ferry_tokenizer_n_vocab(m->tok);
    s->piece_cap = ferry_tokenizer_max_piece_bytes(m->tok) + 1;
    s->piece = malloc(s->piece_cap);
    s->slot_req = calloc((size_t)p->max_seqs, sizeof *s->slot_req);
    s->ev = malloc((size_t)p->max_seqs * sizeof *s->ev);
    if (!st && (!s->piece || !s->slot_req || !s->ev))
        st = ferry_fail(FERRY_ERR_NOMEM, "serve: out of memory");
    if (!st) {
        ferry_batcher_params bp = ferry_batcher_params_default();
        bp.max_seqs = p->max_seqs;
        bp.n_ctx = p->n_ctx;
        bp.chunk = p->chunk;
        bp.step_tokens = p->step_tokens;
        bp.max_batch = p->max_batch;
        bp.max_wait = p->max_wait;
        bp.select = p->select;
        st = ferry_batcher_create(m, &bp, &s->b);
    }
    if (!st) {
        if (pthread_create(&s->engine, NULL, engine_main, s))
            st = ferry_fail(FERRY_ERR_NOMEM, "serve: cannot start the engine thread");
        else
            s->engine_started = 1;
    }
    if (!st) {
        unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                         MHD_USE_ERROR_LOG | MHD_USE_ITC; /* ITC: quiescing a running daemon */
        if (ai->ai_family == AF_INET6)
            flags |= MHD_USE_IPv6;
        unsigned limit = (unsigned)(2 * (p->max_seqs + p->max_queue) + 64);
        s->d = MHD_start_daemon(flags, (uint16_t)p->port, NULL, NULL, on_request, s,
                                MHD_OPTION_EXTERNAL_LOGGER, log_mhd, s,
                                MHD_OPTION_SOCK_ADDR, ai->ai_addr,
                                MHD_OPTION_CONNECTION_LIMIT, limit,
                                MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)120,
                                MHD_OPTION_NOTIFY_COMPLETED, on_completed, s, MHD_OPTION_END);
        if (!s->d) {
            st = ferry_fail(FERRY_ERR_IO, "serve: cannot listen on %s port %d (in use, or not "
                            "an address of this machine?)", host, (int)p->port);
        } else {
            const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d,
                                                                 MHD_DAEMON_INFO_BIND_PORT);
            s->port = di ? di->port : p->port;
        }
    }
    freeaddrinfo(ai);
    if (st) {
        ferry_server_stop(s);
        return st;
    }
    *out = s;
    return FERRY_OK;
}

int32_t ferry_server_port(const ferry_server *s) { return s ? s->port : 0; }

void ferry_server_summary(ferry_server *s, char *buf, size_t cap)
{
    if (!s || !buf || !cap)
        return;
    pthread_mutex_lock(&s->mu);
    const ferry_batcher_stats *b = &s->bstats;
    int64_t answered = 0;
    for (int e = 0; e < EP_COUNT; e++)
        for (int k = 0; k < N_STATUS; k++)
            answered += s->requests[e][k];
    double tps = b->seconds > 0 ? (double)b->generated_tokens / b->seconds : 0;
    int n = snprintf(buf, cap, "serve: %lld requests answered, %lld cancelled; %lld prompt + "
                     "%lld generated tokens in %lld steps (%.2f s in steps, %.1f generated "
                     "tokens/s)\n", (long long)answered, (long long)s->cancelled,
                     (long long)s->prompt_tokens, (long long)s->generated_tokens,
                     (long long)b->steps, b->seconds, tps);
    if (n >= 0 && (size_t)n < cap && b->steps > 0)
        n += snprintf(buf + n, cap - (size_t)n, "serve: %.1f distinct experts per step; "
                      "%lld layer-batches, %lld expert loads\n",
                      (double)b->step_experts / (double)b->steps, (long long)b->layer_batches,
                      (long long)b->expert_loads);
    if (n >= 0 && (size_t)n < cap && b->selected_steps > 0)
        snprintf(buf + n, cap - (size_t)n, "serve: %lld steps where prompts competed: %.1f "
                 "experts per step activated; estimated %.1f for the chunks chosen against "
                 "%.1f in arrival order\n", (long long)b->selected_steps,
                 (double)b->selected_step_experts / (double)b->selected_steps,
                 (double)b->step_experts_planned / (double)b->selected_steps,
                 (double)b->step_experts_arrival / (double)b->selected_steps);
    pthread_mutex_unlock(&s->mu);
}

void ferry_server_stop(ferry_server *s)
{
    if (!s)
        return;
    if (s->d)
        MHD_quiesce_daemon(s->d);
    pthread_mutex_lock(&s->mu);
    s->stopping = 1;
    pthread_cond_broadcast(&s->engine_cv);
    pthread_mutex_unlock(&s->mu);
    if (s->engine_started)
        pthread_join(s->engine, NULL);
    if (s->d)
        MHD_stop_daemon(s->d); /* connections answer their errors, then close */
    ferry_batcher_free(s->b);
    ferry_chat_template_free(s->tmpl);
    free((char *)s->p.api_key);
    free(s->piece);
    free(s->slot_req);
    free(s->ev);
    pthread_cond_destroy(&s->engine_cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
}
