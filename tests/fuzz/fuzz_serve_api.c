/*
 * tests/fuzz/fuzz_serve_api.c: the server's request handling free of HTTP (serve/api.h,
 * serve/stop.h), as serve/server.c uses it.
 * Dictionaries: api.dict json.dict
 *
 * The input is a request body, parsed as both a POST /v1/completions and a POST
 * /v1/chat/completions body. A rejected body must give a 400 with a type, a message and an
 * error JSON that parses; nothing may be left in the request. An accepted one must hold what
 * api.h promises (one prompt form, a non-empty messages array of known roles, values in
 * their ranges, at most FERRY_API_MAX_STOP non-empty stop strings). Then, as the server
 * would: the messages are rendered with a ChatML template and the request's
 * chat_template_kwargs; every response body (full, chunks, usage chunk, model list, with
 * the prompt and with the raw input as the generated text) must be well-formed UTF-8 without
 * raw control characters, parse as JSON, and give back the text, id and model it was given;
 * the raw input fed to a stop matcher of the request's stop strings in input-derived pieces
 * must come out cut exactly before the earliest stop string complete when the first one
 * completes (generation stops there), never handing out a byte of it early.
 */
#include <cjson/cJSON.h>
#include <stdint.h>

#include "core/error.h"
#include "format/chat.h"
#include "serve/api.h"
#include "serve/stop.h"
#include "tests/fuzz/fuzz_util.h"

static const char k_template[] =
    "{%- if tools %}{{- '<|im_start|>system\\n' + (tools | tojson) + '<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- endif %}"
    "{%- for tc in message.tool_calls | default([]) %}{{- '\\n<tool_call>' }}"
    "{{- tc.function | tojson if tc.function is defined else tc | tojson }}"
    "{{- '</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}";

static ferry_chat_template *g_tmpl;

static void free_template(void) { ferry_chat_template_free(g_tmpl); }

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_quiet();
    FUZZ_CHECK(ferry_chat_template_create(k_template, sizeof k_template - 1, NULL, &g_tmpl) ==
                   FERRY_OK,
               "the template: %s", ferry_last_error());
    atexit(free_template);
    return 0;
}

/* Checks a response body and returns it parsed (the caller deletes it). */
static cJSON *check_json(char *s, const char *what)
{
    FUZZ_CHECK(s != NULL, "%s: out of memory", what);
    size_t n = strlen(s);
    FUZZ_CHECK(fuzz_utf8_bad(s, n) == n, "%s: not UTF-8 at byte %zu: %s", what,
               fuzz_utf8_bad(s, n), s);
    for (size_t i = 0; i < n; i++)
        FUZZ_CHECK((unsigned char)s[i] >= 0x20, "%s: raw control byte 0x%02x at %zu", what,
                   (unsigned)(unsigned char)s[i], i);
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithOpts(s, &end, 1);
    FUZZ_CHECK(j != NULL, "%s: does not parse: %s", what, s);
    free(s);
    return j;
}

static const cJSON *path(const cJSON *j, const char *a, int idx, const char *b, const char *c)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(j, a);
    if (idx >= 0)
        x = cJSON_GetArrayItem(x, idx);
    if (b)
        x = cJSON_GetObjectItemCaseSensitive(x, b);
    if (c)
        x = cJSON_GetObjectItemCaseSensitive(x, c);
    return x;
}

/* Whether a JSON string value holds text[0..len) exactly (only checkable for text that is
 * well-formed UTF-8 without NUL, which the escaper passes through unchanged). */
static void expect_text(const cJSON *v, const char *text, size_t len, const char *what)
{
    FUZZ_CHECK(cJSON_IsString(v), "%s: not a string", what);
    if (fuzz_utf8_bad(text, len) < len || memchr(text, 0, len))
        return;
    FUZZ_CHECK(strlen(v->valuestring) == len && memcmp(v->valuestring, text, len) == 0,
               "%s: the text came back as \"%s\"", what, v->valuestring);
}

static void check_responses(const ferry_api_request *r, const char *text, size_t len)
{
    const char *id = r->kind == FERRY_API_CHAT ? "chatcmpl-1" : "cmpl-1";
    const char *model = r->model ? r->model : "tiny-moe-code";
    int chat = r->kind == FERRY_API_CHAT;
    cJSON *j =
        check_json(ferry_api_response_json(r->kind, id, model, 1700000000, text, len, "stop", 3, 4),
                   "response");
    expect_text(path(j, "model", -1, NULL, NULL), model, strlen(model), "response model");
    expect_text(path(j, "id", -1, NULL, NULL), id, strlen(id), "response id");
    expect_text(chat ? path(j, "choices", 0, "message", "content")
                     : path(j, "choices", 0, "text", NULL),
                text, len, "response text");
    cJSON_Delete(j);
    j = check_json(
        ferry_api_chunk_json(r->kind, id, model, 1, text, len, 1, NULL, r->include_usage),
        "first chunk");
    expect_text(chat ? path(j, "choices", 0, "delta", "content")
                     : path(j, "choices", 0, "text", NULL),
                text, len, "chunk text");
    cJSON_Delete(j);
    cJSON_Delete(check_json(
        ferry_api_chunk_json(r->kind, id, model, 1, text, len, 0, "length", r->include_usage),
        "last chunk"));
    cJSON_Delete(check_json(ferry_api_usage_chunk_json(r->kind, id, model, 1, INT32_MAX, INT32_MAX),
                            "usage chunk"));
    j = check_json(ferry_api_models_json(model, 0), "models");
    expect_text(path(j, "data", 0, "id", NULL), model, strlen(model), "models id");
    cJSON_Delete(j);
}

/* What a request accepted by ferry_api_parse must hold (api.h). */
static void check_request(const ferry_api_request *r, ferry_api_kind kind)
{
    FUZZ_CHECK(r->kind == kind, "kind %d for %d", (int)r->kind, (int)kind);
    if (kind == FERRY_API_COMPLETIONS) {
        FUZZ_CHECK((r->prompt != NULL) != (r->prompt_ids != NULL), "not exactly one prompt form");
        FUZZ_CHECK(r->messages == NULL && r->template_kwargs == NULL, "chat fields in completions");
        if (r->prompt)
            FUZZ_CHECK(strlen(r->prompt) == r->prompt_len &&
                           fuzz_utf8_bad(r->prompt, r->prompt_len) == r->prompt_len,
                       "prompt of %zu bytes is not NUL-terminated UTF-8", r->prompt_len);
        else
            FUZZ_CHECK(r->n_prompt_ids >= 1, "%d prompt ids", (int)r->n_prompt_ids);
        for (int32_t i = 0; i < r->n_prompt_ids; i++)
            FUZZ_CHECK(r->prompt_ids[i] >= 0, "prompt id %d", (int)r->prompt_ids[i]);
    } else {
        FUZZ_CHECK(r->prompt == NULL && r->prompt_ids == NULL, "a prompt in a chat request");
        FUZZ_CHECK(cJSON_IsArray(r->messages) && cJSON_GetArraySize(r->messages) > 0,
                   "no messages");
        FUZZ_CHECK(!r->template_kwargs || cJSON_IsObject(r->template_kwargs),
                   "chat_template_kwargs is not an object");
        static const char *const roles[] = {"system", "user", "assistant", "tool", "developer"};
        const cJSON *m;
        cJSON_ArrayForEach(m, r->messages)
        {
            FUZZ_CHECK(cJSON_IsObject(m), "a message is not an object");
            const char *role = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "role"));
            int known = 0;
            for (size_t i = 0; role && i < sizeof roles / sizeof roles[0]; i++)
                known |= strcmp(role, roles[i]) == 0;
            FUZZ_CHECK(known, "role %s", role ? role : "(none)");
            const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
            FUZZ_CHECK(cJSON_IsString(c) ||
                           (cJSON_IsNull(c) && strcmp(role, "assistant") == 0 &&
                            (cJSON_GetObjectItemCaseSensitive(m, "tool_calls") ||
                             cJSON_GetObjectItemCaseSensitive(m, "function_call"))),
                       "content of a %s message", role);
        }
    }
    FUZZ_CHECK(r->max_tokens == -1 || r->max_tokens >= 1, "max_tokens %d", (int)r->max_tokens);
    FUZZ_CHECK(r->temperature >= 0 && r->temperature <= 2, "temperature %g", r->temperature);
    FUZZ_CHECK(r->top_p > 0 && r->top_p <= 1, "top_p %g", r->top_p);
    FUZZ_CHECK(r->top_k >= -1, "top_k %d", (int)r->top_k);
    FUZZ_CHECK(r->n_stop >= 0 && r->n_stop <= FERRY_API_MAX_STOP && (r->n_stop == 0) == !r->stop,
               "%d stop strings", (int)r->n_stop);
    for (int32_t i = 0; i < r->n_stop; i++)
        FUZZ_CHECK(r->stop[i] && r->stop[i][0], "stop[%d] is empty", (int)i);
    FUZZ_CHECK(!r->include_usage || r->stream, "include_usage without streaming");
}

/* The earliest occurrence of a stop string wholly inside text[0..n): its offset and index
 * into *index, or n and -1. */
static size_t first_stop(const ferry_api_request *r, const char *text, size_t n, int32_t *index)
{
    size_t first = n;
    *index = -1;
    for (int32_t i = 0; i < r->n_stop; i++) {
        const char *p = memmem(text, n, r->stop[i], strlen(r->stop[i]));
        if (p && (size_t)(p - text) < first) {
            first = (size_t)(p - text);
            *index = i;
        }
    }
    return first;
}

/* Feeds text through a matcher of r's stop strings, in pieces whose sizes come from the
 * text's own bytes, as generated text arrives. Generation stops after the first piece that
 * completes a stop string; the output must be the text cut at the earliest stop string
 * complete by then (one that would only have completed later never counts), and nothing of
 * it may be handed out early. */
static void check_stop(const ferry_api_request *r, const char *text, size_t len)
{
    ferry_stop *m = NULL;
    FUZZ_CHECK(ferry_stop_create((const char *const *)r->stop, r->n_stop, 16, &m) == FERRY_OK,
               "stop matcher: %s", ferry_last_error());
    size_t at = 0, out = 0, want = len;
    int32_t want_index = -1;
    ferry_stop_result res = {0};
    while (at < len && want_index < 0) {
        size_t piece = 1 + (unsigned char)text[at] % 7;
        if (piece > len - at)
            piece = len - at;
        at += piece;
        want = first_stop(r, text, at, &want_index);
        FUZZ_CHECK(ferry_stop_feed(m, text + at - piece, piece, &res) == FERRY_OK, "feed");
        FUZZ_CHECK(out + res.len <= want && memcmp(text + out, res.text, res.len) == 0,
                   "after %zu bytes the matcher handed out %zu bytes from %zu: past %zu, or "
                   "different ones",
                   at, res.len, out, want);
        FUZZ_CHECK(res.stopped == (want_index >= 0), "stopped %d after %zu bytes, want stop %d",
                   res.stopped, at, (int)want_index);
        out += res.len;
    }
    if (want_index < 0)
        want = len;
    FUZZ_CHECK(ferry_stop_flush(m, &res) == FERRY_OK, "flush");
    FUZZ_CHECK(out + res.len <= want && memcmp(text + out, res.text, res.len) == 0,
               "the flush handed out bytes past %zu or different ones", want);
    out += res.len;
    FUZZ_CHECK(out == want && res.stopped == (want_index >= 0),
               "handed out %zu bytes, want %zu (stopped %d, want stop %d)", out, want, res.stopped,
               (int)want_index);
    /* several stop strings may start at that offset: any of them may be reported */
    FUZZ_CHECK(want_index < 0 || (res.stop_index >= 0 && res.stop_index < r->n_stop &&
                                  strlen(r->stop[res.stop_index]) <= at - want &&
                                  memcmp(text + want, r->stop[res.stop_index],
                                         strlen(r->stop[res.stop_index])) == 0),
               "stop index %d", (int)res.stop_index);
    ferry_stop_destroy(m);
}

static void check_render(const ferry_api_request *r)
{
    char *out = NULL;
    size_t len = 0;
    ferry_status st =
        ferry_chat_template_render(g_tmpl, r->messages, 1, r->template_kwargs, &out, &len);
    FUZZ_CHECK(st == FERRY_OK || st == FERRY_ERR_INVALID || st == FERRY_ERR_UNSUPPORTED,
               "render gave %s: %s", ferry_status_name(st), ferry_last_error());
    if (st == FERRY_OK)
        FUZZ_CHECK(out && out[len] == 0, "render output not NUL-terminated");
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *body = (const char *)data;
    for (int k = 0; k < 2; k++) {
        ferry_api_kind kind = k ? FERRY_API_CHAT : FERRY_API_COMPLETIONS;
        ferry_api_request r;
        ferry_api_error e;
        memset(&r, 0xA5, sizeof r); /* parse must fill or empty every field */
        memset(&e, 0, sizeof e);
        int status = ferry_api_parse(kind, body, size, &r, &e);
        if (status != 0) {
            FUZZ_CHECK(status == 400 && e.status == 400, "status %d (error %d): %s", status,
                       e.status, e.message);
            FUZZ_CHECK(strcmp(e.type, "invalid_request_error") == 0 && e.message[0] &&
                           memchr(e.message, 0, sizeof e.message),
                       "error type '%s' message '%s'", e.type, e.message);
            FUZZ_CHECK(!r.model && !r.prompt && !r.prompt_ids && !r.messages &&
                           !r.template_kwargs && !r.stop,
                       "a rejected request holds something");
            cJSON *j = check_json(ferry_api_error_json(&e), "error");
            expect_text(path(j, "error", -1, "message", NULL), e.message, strlen(e.message),
                        "error message");
            cJSON_Delete(j);
            ferry_api_request_free(&r);
            continue;
        }
        check_request(&r, kind);
        if (kind == FERRY_API_CHAT)
            check_render(&r);
        if (r.prompt)
            check_responses(&r, r.prompt, r.prompt_len);
        check_responses(&r, body, size);
        check_stop(&r, body, size);
        ferry_api_request_free(&r);
        FUZZ_CHECK(!r.model && !r.prompt && !r.messages && !r.stop, "free left fields set");
    }
    return 0;
}
