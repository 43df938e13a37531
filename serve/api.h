/*
 * serve/api.h: the OpenAI API shapes for `ferry serve`, free of HTTP: request bodies of
 * POST /v1/completions and POST /v1/chat/completions parsed and validated into a
 * ferry_api_request, and every response body (errors, full responses, streaming chunks,
 * the usage chunk, the model list) built as JSON text.
 *
 * Requests follow OpenAI's create-completion and create-chat-completion bodies plus the
 * vLLM extensions top_k, ignore_eos and chat_template_kwargs. A field that would change the
 * result in a way ferry does not implement (n > 1, penalties, logit_bias, logprobs, tools,
 * non-text content, ...) is rejected with 400 naming it rather than ignored; fields that do
 * not change the result are accepted and ignored, as OpenAI-compatible servers do.
 *
 * Responses are written by hand, not through cJSON, so that any byte string is escaped to
 * valid JSON: control characters (U+0000 included) become \u00XX or their short escapes,
 * and a byte that is not part of well-formed UTF-8 becomes U+FFFD.
 */
#ifndef FERRY_SERVE_API_H
#define FERRY_SERVE_API_H

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

typedef enum {
    FERRY_API_COMPLETIONS, /* POST /v1/completions: "prompt" */
    FERRY_API_CHAT,        /* POST /v1/chat/completions: "messages" */
} ferry_api_kind;

/* OpenAI's limit on "stop" strings. */
#define FERRY_API_MAX_STOP 4

/* An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}. */
typedef struct {
    int status;        /* HTTP status: 400, 401, 404, 405, 413, 429, 500, 503 */
    char type[48];     /* "invalid_request_error", "authentication_error", "server_error", ... */
    char code[48];     /* "invalid_json", "invalid_type", "unsupported_parameter",
                        * "context_length_exceeded", ...; "" for none (JSON null) */
    char param[64];    /* the field at fault ("messages[2].content"), "" for none */
    char message[512]; /* one line for a person; names the field */
} ferry_api_error;

/* Fills e: status, type, code and param copied (NULL as ""; truncated to fit), message from
 * the printf format (truncated to fit). Returns e->status. Thread-safe. */
int ferry_api_error_set(ferry_api_error *e, int status, const char *type, const char *code,
                        const char *param, const char *fmt, ...) FERRY_PRINTF(6, 7);

/* A parsed request. Strings and arrays are owned by the request (ferry_api_request_free). */
typedef struct {
    ferry_api_kind kind;
    char *model; /* "model", NULL when absent */
    /* completions: exactly one of prompt / prompt_ids is set. prompt: a string prompt (or
     * a one-element array of a string), NUL-terminated, valid UTF-8, prompt_len bytes
     * (may be 0: "" is accepted as OpenAI does; the caller decides what an empty token
     * sequence means). A "\u0000" escape cuts the string there. */
    char *prompt;
    size_t prompt_len;
    /* completions: a prompt of token ids (an array of ints, or a one-element array of
     * such an array), n_prompt_ids >= 1, each in [0, INT32_MAX]; the caller checks them
     * against the vocabulary. */
    int32_t *prompt_ids;
    int32_t n_prompt_ids;
    /* chat: the validated messages array (owned, detached from the body). Each element is
     * an object with "role" one of system/user/assistant/tool/developer and "content" a
     * string (text-part arrays already flattened) or null (only an assistant message with
     * "tool_calls" or "function_call"); other members ("name", "tool_calls",
     * "tool_call_id", ...) are kept as sent, for the chat template. */
    cJSON *messages;
    cJSON *template_kwargs; /* chat: "chat_template_kwargs" object (vLLM), or NULL */
    int32_t max_tokens;     /* max_completion_tokens, else max_tokens; >= 1; -1 when absent */
    double temperature;     /* [0, 2], default 1.0 as OpenAI */
    double top_p;           /* (0, 1], default 1.0 */
    int32_t top_k;          /* extension (vLLM): default 0 = off; -1 also means off */
    int ignore_eos;         /* extension (vLLM): 1 = keep generating past end of sequence */
    int has_seed;
    uint64_t seed;  /* "seed" as int64 stored as uint64 (two's complement) */
    char **stop;    /* "stop": n_stop non-empty NUL-terminated strings, or NULL */
    int32_t n_stop; /* 0..FERRY_API_MAX_STOP */
    int stream;
    int include_usage; /* stream_options.include_usage (only when streaming) */
} ferry_api_request;

/* Parses body (len bytes, not NUL-terminated; NUL bytes in it are an error) as a request
 * of kind. Returns 0 and fills *out (which the caller frees with ferry_api_request_free)
 * on success; otherwise fills *err, leaves *out empty (safe to free) and returns the HTTP
 * status: 400 with type "invalid_request_error", param naming the field, code one of the
 * following, and a message naming the field:
 *  - "invalid_json": empty body, malformed JSON ("at byte N"), not UTF-8, nesting deeper
 *    than cJSON's limit (1000);
 *  - "invalid_type": the body is not an object; a field of the wrong JSON type ("'max_tokens'
 *    must be an integer"); number fields take integers written as 3 or 3.0;
 *  - "missing_required_parameter": no "prompt" / "messages", a message without "role",
 *    "content" missing or null where it is required, a text part without "text";
 *  - "integer_below_min_value", "integer_above_max_value", "decimal_below_min_value",
 *    "decimal_above_max_value": temperature outside [0, 2], top_p outside (0, 1],
 *    max_tokens / max_completion_tokens < 1 or > INT32_MAX, top_k < -1 or > INT32_MAX,
 *    seed outside the int64 range, n < 1, best_of < 1, a token id outside [0, INT32_MAX];
 *  - "invalid_value": an unknown role, a stop string that is empty;
 *  - "empty_array": "messages": [], "prompt": [] or [[]], a content part array [];
 *  - "array_above_max_length": more than FERRY_API_MAX_STOP stop strings;
 *  - "unsupported_parameter" (the field is valid but ferry does not implement it):
 *    both kinds: n > 1, non-empty logit_bias, presence_penalty or frequency_penalty
 *    nonzero, repetition_penalty != 1, min_p > 0, and the vLLM extensions min_tokens > 0,
 *    non-empty stop_token_ids / bad_words / allowed_token_ids, include_stop_str_in_output
 *    true, use_beam_search true, prompt_logprobs, guided_json / guided_regex /
 *    guided_choice / guided_grammar / structured_outputs non-null;
 *    completions: a batch of several prompts ('prompt', one prompt per request), echo
 *    true, a non-empty suffix, best_of > 1, logprobs non-null;
 *    chat: non-empty tools / functions, tool_choice / function_call other than "none" /
 *    "auto", logprobs true, top_logprobs > 0, response_format other than {"type":"text"},
 *    audio non-null, modalities other than ["text"], a non-text content part
 *    ('messages[i].content[j].type'), and the vLLM extensions chat_template non-null,
 *    add_generation_prompt false, continue_final_message true, echo true.
 * A null value counts as absent for every optional field. Unknown fields are ignored, and
 * so are user, metadata, store, parallel_tool_calls, service_tier, and stream_options when
 * not streaming. Out of memory: 500 "server_error". Thread-safe (cJSON records its last
 * parse error in a global that nothing here reads). */
int ferry_api_parse(ferry_api_kind kind, const char *body, size_t len, ferry_api_request *out,
                    ferry_api_error *err);

/* Frees what r owns and zeroes it. NULL-safe; safe on a zeroed or half-filled request. */
void ferry_api_request_free(ferry_api_request *r);

/* Response bodies. Each returns a malloc'd NUL-terminated JSON text the caller frees, or
 * NULL only when out of memory. Text arguments are len bytes (NULL allowed when len is 0),
 * escaped as the file comment says; id and model are NUL-terminated. Thread-safe. */

/* {"error": {"message", "type", "param", "code"}}; param and code are null when "". */
char *ferry_api_error_json(const ferry_api_error *e);

/* The full (non-streaming) response: completions: {"id", "object": "text_completion",
 * "created", "model", "choices": [{"index": 0, "text", "logprobs": null, "finish_reason"}],
 * "usage"}; chat: {"id", "object": "chat.completion", "created", "model", "choices":
 * [{"index": 0, "message": {"role": "assistant", "content"}, "logprobs": null,
 * "finish_reason"}], "usage"}; usage is {"prompt_tokens", "completion_tokens",
 * "total_tokens"}. finish_reason is "stop" or "length" (NULL: null). */
char *ferry_api_response_json(ferry_api_kind kind, const char *id, const char *model,
                              int64_t created, const char *text, size_t len,
                              const char *finish_reason, int32_t prompt_tokens,
                              int32_t completion_tokens);

/* One streaming chunk (without the "data: " framing). completions: {"id", "object":
 * "text_completion", "created", "model", "choices": [{"index": 0, "text", "logprobs": null,
 * "finish_reason"}]}; chat: {"id", "object": "chat.completion.chunk", "created", "model",
 * "choices": [{"index": 0, "delta", "logprobs": null, "finish_reason"}]}. finish_reason is
 * NULL (null) until the last chunk. The chat delta holds "role": "assistant" when first is
 * nonzero, and "content" when first is nonzero (then "" for no text), when there is text,
 * or when finish_reason is NULL; so the first chunk is {"role": "assistant", "content": ""}
 * and a final chunk without text is {}. With include_usage every chunk carries "usage":
 * null, and the stream ends with ferry_api_usage_chunk_json's chunk. */
char *ferry_api_chunk_json(ferry_api_kind kind, const char *id, const char *model, int64_t created,
                           const char *text, size_t len, int first, const char *finish_reason,
                           int include_usage);

/* The last chunk of a stream with include_usage: the kind's chunk shape with "choices": []
 * and "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}. */
char *ferry_api_usage_chunk_json(ferry_api_kind kind, const char *id, const char *model,
                                 int64_t created, int32_t prompt_tokens, int32_t completion_tokens);

/* GET /v1/models: {"object": "list", "data": [{"id", "object": "model", "created",
 * "owned_by": "ferry"}]}. */
char *ferry_api_models_json(const char *model_id, int64_t created);

#endif
