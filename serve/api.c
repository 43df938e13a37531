/*
 * serve/api.c: OpenAI request parsing and validation, and the response bodies (see api.h).
 *
 * Parsing: the body is checked for NUL bytes and well-formed UTF-8 first (so every string
 * taken from it is UTF-8), then parsed by cJSON (whose nesting limit, 1000, bounds the
 * recursion of both parse and free), then each field is read by one helper per JSON type
 * that names the field in its error. The rejection table `unsupported` lists the fields
 * that would change the result and their neutral values.
 *
 * Responses: a small growable buffer with an escaper (jb_*), so the output is valid JSON
 * whatever bytes the text holds.
 */
#include "serve/api.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "serve/stop.h"

#define INVALID "invalid_request_error"

/* ---- errors ----------------------------------------------------------------------- */

static void copy_field(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src ? src : "");
}

static int verror_set(ferry_api_error *e, int status, const char *type, const char *code,
                      const char *param, const char *fmt, va_list ap)
{
    if (!e)
        return status;
    e->status = status;
    copy_field(e->type, sizeof(e->type), type);
    copy_field(e->code, sizeof(e->code), code);
    copy_field(e->param, sizeof(e->param), param);
    if (fmt)
        vsnprintf(e->message, sizeof(e->message), fmt, ap);
    else
        e->message[0] = '\0';
    return status;
}

int ferry_api_error_set(ferry_api_error *e, int status, const char *type, const char *code,
                        const char *param, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int st = verror_set(e, status, type, code, param, fmt, ap);
    va_end(ap);
    return st;
}

/* A 400 invalid_request_error. */
static int FERRY_PRINTF(4, 5)
    bad(ferry_api_error *e, const char *code, const char *param, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int st = verror_set(e, 400, INVALID, code, param, fmt, ap);
    va_end(ap);
    return st;
}

static int nomem(ferry_api_error *e)
{
    return ferry_api_error_set(e, 500, "server_error", "", "", "out of memory");
}

static int unsupported(ferry_api_error *e, const char *param, const char *what)
{
    return bad(e, "unsupported_parameter", param,
               "Unsupported parameter: '%s' %s is not supported by ferry.", param, what);
}

/* ---- typed field readers ------------------------------------------------------------ */

/* The member name of obj, or NULL when it is absent or null. */
static const cJSON *field(const cJSON *obj, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);
    return v && !cJSON_IsNull(v) ? v : NULL;
}

static const char *json_type_name(const cJSON *v)
{
    if (cJSON_IsBool(v))
        return "a boolean";
    if (cJSON_IsNumber(v))
        return "a number";
    if (cJSON_IsString(v))
        return "a string";
    if (cJSON_IsArray(v))
        return "an array";
    if (cJSON_IsObject(v))
        return "an object";
    return "null";
}

static int wrong_type(ferry_api_error *e, const char *param, const char *expected, const cJSON *v)
{
    return bad(e, "invalid_type", param, "'%s' must be %s, got %s.", param, expected,
               json_type_name(v));
}

/* An integer in [min, max] (written 3 or 3.0; max <= INT64_MAX). */
static int read_int(const cJSON *v, const char *param, int64_t min, int64_t max, int64_t *out,
                    ferry_api_error *e)
{
    if (!cJSON_IsNumber(v))
        return wrong_type(e, param, "an integer", v);
    double d = v->valuedouble;
    if (isfinite(d) && d != floor(d))
        return bad(e, "invalid_type", param, "'%s' must be an integer, got %.17g.", param, d);
    if (d < (double)min)
        return bad(e, "integer_below_min_value", param,
                   "Invalid '%s': integer below minimum value. Expected a value >= %lld, but "
                   "got %.17g instead.",
                   param, (long long)min, d);
    /* (double)INT64_MAX rounds up to 2^63, itself out of range */
    if (d > (double)max || d >= 9223372036854775808.0)
        return bad(e, "integer_above_max_value", param,
                   "Invalid '%s': integer above maximum value. Expected a value <= %lld, but "
                   "got %.17g instead.",
                   param, (long long)max, d);
    *out = (int64_t)d;
    return 0;
}

static int read_number(const cJSON *v, const char *param, double *out, ferry_api_error *e)
{
    if (!cJSON_IsNumber(v))
        return wrong_type(e, param, "a number", v);
    *out = v->valuedouble;
    return 0;
}

/* A number in [lo, hi], or (lo, hi] when lo_open. */
static int read_decimal(const cJSON *v, const char *param, double lo, int lo_open, double hi,
                        double *out, ferry_api_error *e)
{
    double d = 0;
    int st = read_number(v, param, &d, e);
    if (st)
        return st;
    if (lo_open ? !(d > lo) : !(d >= lo))
        return bad(e, "decimal_below_min_value", param,
                   "Invalid '%s': decimal below minimum value. Expected a value %s %g, but got "
                   "%.17g instead.",
                   param, lo_open ? ">" : ">=", lo, d);
    if (!(d <= hi))
        return bad(e, "decimal_above_max_value", param,
                   "Invalid '%s': decimal above maximum value. Expected a value <= %g, but got "
                   "%.17g instead.",
                   param, hi, d);
    *out = d;
    return 0;
}

static int read_bool(const cJSON *v, const char *param, int *out, ferry_api_error *e)
{
    if (!cJSON_IsBool(v))
        return wrong_type(e, param, "a boolean", v);
    *out = cJSON_IsTrue(v);
    return 0;
}

static char *dup_string(const char *s, size_t *len)
{
    size_t n = strlen(s);
    char *d = malloc(n + 1);
    if (d)
        memcpy(d, s, n + 1);
    if (len)
        *len = n;
    return d;
}

/* ---- fields ferry rejects ------------------------------------------------------------ */

typedef enum {
    REJ_NONNULL,        /* any value */
    REJ_TRUE,           /* a boolean; true */
    REJ_FALSE,          /* a boolean; false */
    REJ_NONEMPTY_ARRAY, /* an array; non-empty */
    REJ_NONEMPTY_OBJ,   /* an object; non-empty */
    REJ_NONZERO,        /* a number; nonzero */
    REJ_NOT_ONE,        /* a number; other than 1 */
    REJ_POSITIVE,       /* a number >= 0; positive */
    REJ_COUNT,          /* an integer >= 1; above 1 */
    REJ_NOT_NONE_AUTO,  /* anything but the strings "none" and "auto" */
    REJ_NONEMPTY_STR,   /* a string; non-empty */
} reject_rule;

#define FOR_COMPL 1
#define FOR_CHAT 2
#define FOR_BOTH 3

static const struct {
    const char *name;
    reject_rule rule;
    int kinds;
} unsupported_fields[] = {
    {"n", REJ_COUNT, FOR_BOTH},
    {"logit_bias", REJ_NONEMPTY_OBJ, FOR_BOTH},
    {"presence_penalty", REJ_NONZERO, FOR_BOTH},
    {"frequency_penalty", REJ_NONZERO, FOR_BOTH},
    {"repetition_penalty", REJ_NOT_ONE, FOR_BOTH},
    {"min_p", REJ_POSITIVE, FOR_BOTH},
    /* vLLM's sampling extensions */
    {"min_tokens", REJ_POSITIVE, FOR_BOTH},
    {"stop_token_ids", REJ_NONEMPTY_ARRAY, FOR_BOTH},
    {"bad_words", REJ_NONEMPTY_ARRAY, FOR_BOTH},
    {"allowed_token_ids", REJ_NONEMPTY_ARRAY, FOR_BOTH},
    {"include_stop_str_in_output", REJ_TRUE, FOR_BOTH},
    {"use_beam_search", REJ_TRUE, FOR_BOTH},
    {"prompt_logprobs", REJ_NONNULL, FOR_BOTH},
    {"guided_json", REJ_NONNULL, FOR_BOTH},
    {"guided_regex", REJ_NONNULL, FOR_BOTH},
    {"guided_choice", REJ_NONNULL, FOR_BOTH},
    {"guided_grammar", REJ_NONNULL, FOR_BOTH},
    {"structured_outputs", REJ_NONNULL, FOR_BOTH},
    /* completions */
    {"echo", REJ_TRUE, FOR_BOTH}, /* chat: vLLM's echo of the last message */
    {"suffix", REJ_NONEMPTY_STR, FOR_COMPL},
    {"best_of", REJ_COUNT, FOR_COMPL},
    {"logprobs", REJ_NONNULL, FOR_COMPL},
    /* chat */
    {"tools", REJ_NONEMPTY_ARRAY, FOR_CHAT},
    {"functions", REJ_NONEMPTY_ARRAY, FOR_CHAT},
    {"tool_choice", REJ_NOT_NONE_AUTO, FOR_CHAT},
    {"function_call", REJ_NOT_NONE_AUTO, FOR_CHAT},
    {"logprobs", REJ_TRUE, FOR_CHAT},
    {"top_logprobs", REJ_POSITIVE, FOR_CHAT},
    {"audio", REJ_NONNULL, FOR_CHAT},
    {"chat_template", REJ_NONNULL, FOR_CHAT},
    {"add_generation_prompt", REJ_FALSE, FOR_CHAT},
    {"continue_final_message", REJ_TRUE, FOR_CHAT},
};

static int check_rejected(const cJSON *root, int kind_bit, ferry_api_error *e)
{
    for (size_t i = 0; i < sizeof(unsupported_fields) / sizeof(unsupported_fields[0]); i++) {
        if (!(unsupported_fields[i].kinds & kind_bit))
            continue;
        const char *name = unsupported_fields[i].name;
        const cJSON *v = field(root, name);
        if (!v)
            continue;
        int b = 0, st = 0;
        double d = 0;
        int64_t k = 0;
        switch (unsupported_fields[i].rule) {
        case REJ_NONNULL:
            return unsupported(e, name, "(any non-null value)");
        case REJ_TRUE:
        case REJ_FALSE:
            if ((st = read_bool(v, name, &b, e)))
                return st;
            if (b == (unsupported_fields[i].rule == REJ_TRUE))
                return unsupported(e, name, b ? "true" : "false");
            break;
        case REJ_NONEMPTY_ARRAY:
            if (!cJSON_IsArray(v))
                return wrong_type(e, name, "an array", v);
            if (cJSON_GetArraySize(v) > 0)
                return unsupported(e, name, "(a non-empty array)");
            break;
        case REJ_NONEMPTY_OBJ:
            if (!cJSON_IsObject(v))
                return wrong_type(e, name, "an object", v);
            if (v->child)
                return unsupported(e, name, "(a non-empty object)");
            break;
        case REJ_NONZERO:
            if ((st = read_number(v, name, &d, e)))
                return st;
            if (d != 0)
                return unsupported(e, name, "other than 0");
            break;
        case REJ_NOT_ONE:
            if ((st = read_number(v, name, &d, e)))
                return st;
            if (d != 1)
                return unsupported(e, name, "other than 1");
            break;
        case REJ_POSITIVE:
            if ((st = read_number(v, name, &d, e)))
                return st;
            if (!(d >= 0))
                return bad(e, "invalid_value", name, "Invalid '%s': must be >= 0, got %.17g.", name,
                           d);
            if (d > 0)
                return unsupported(e, name, "above 0");
            break;
        case REJ_COUNT:
            if ((st = read_int(v, name, 1, INT32_MAX, &k, e)))
                return st;
            if (k > 1)
                return unsupported(e, name, "above 1");
            break;
        case REJ_NOT_NONE_AUTO:
            if (!cJSON_IsString(v) ||
                (strcmp(v->valuestring, "none") && strcmp(v->valuestring, "auto")))
                return unsupported(e, name, "other than \"none\" or \"auto\"");
            break;
        case REJ_NONEMPTY_STR:
            if (!cJSON_IsString(v))
                return wrong_type(e, name, "a string", v);
            if (v->valuestring[0])
                return unsupported(e, name, "(a non-empty string)");
            break;
        }
    }
    if (kind_bit == FOR_CHAT) {
        const cJSON *v = field(root, "response_format");
        if (v) {
            if (!cJSON_IsObject(v))
                return wrong_type(e, "response_format", "an object", v);
            const cJSON *t = field(v, "type");
            if (!cJSON_IsString(t))
                return bad(e, t ? "invalid_type" : "missing_required_parameter",
                           "response_format.type", "'response_format.type' must be a string.");
            if (strcmp(t->valuestring, "text") != 0)
                return unsupported(e, "response_format", "other than {\"type\": \"text\"}");
        }
        v = field(root, "modalities");
        if (v) {
            if (!cJSON_IsArray(v))
                return wrong_type(e, "modalities", "an array", v);
            for (const cJSON *m = v->child; m; m = m->next)
                if (!cJSON_IsString(m) || strcmp(m->valuestring, "text") != 0)
                    return unsupported(e, "modalities", "other than [\"text\"]");
        }
    }
    return 0;
}

/* ---- the prompt (completions) -------------------------------------------------------- */

/* Token ids from the array a into out->prompt_ids; path names a in errors. */
static int read_ids(const cJSON *a, const char *path, ferry_api_request *out, ferry_api_error *e)
{
    int n = cJSON_GetArraySize(a);
    if (n == 0)
        return bad(e, "empty_array", path,
                   "Invalid '%s': empty array. Expected at least one token id.", path);
    out->prompt_ids = malloc((size_t)n * sizeof(int32_t));
    if (!out->prompt_ids)
        return nomem(e);
    int32_t i = 0;
    for (const cJSON *t = a->child; t; t = t->next, i++) {
        char param[64];
        snprintf(param, sizeof(param), "%s[%d]", path, (int)i);
        if (!cJSON_IsNumber(t))
            return bad(e, "invalid_type", param,
                       "'%s' must be a token id (an integer), got %s; 'prompt' must be a "
                       "string, an array of one string, an array of token ids or an array of "
                       "one array of token ids.",
                       param, json_type_name(t));
        int64_t id = 0;
        int st = read_int(t, param, 0, INT32_MAX, &id, e);
        if (st)
            return st;
        out->prompt_ids[i] = (int32_t)id;
    }
    out->n_prompt_ids = i;
    return 0;
}

static int parse_prompt(const cJSON *root, ferry_api_request *out, ferry_api_error *e)
{
    static const char *forms = "a string, an array of one string, an array of token ids or an "
                               "array of one array of token ids";
    const cJSON *p = field(root, "prompt");
    if (!p)
        return bad(e, "missing_required_parameter", "prompt",
                   "Missing required parameter: 'prompt'.");
    if (cJSON_IsString(p)) {
        out->prompt = dup_string(p->valuestring, &out->prompt_len);
        return out->prompt ? 0 : nomem(e);
    }
    if (!cJSON_IsArray(p))
        return bad(e, "invalid_type", "prompt", "'prompt' must be %s, got %s.", forms,
                   json_type_name(p));
    int n = cJSON_GetArraySize(p);
    if (n == 0)
        return bad(e, "empty_array", "prompt", "Invalid 'prompt': empty array.");
    const cJSON *first = p->child;
    if (cJSON_IsNumber(first))
        return read_ids(p, "prompt", out, e);
    if (!cJSON_IsString(first) && !cJSON_IsArray(first))
        return bad(e, "invalid_type", "prompt", "'prompt' must be %s, got an array of %s.", forms,
                   json_type_name(first));
    for (const cJSON *q = first->next; q; q = q->next)
        if (cJSON_IsString(q) != cJSON_IsString(first) || cJSON_IsArray(q) != cJSON_IsArray(first))
            return bad(e, "invalid_type", "prompt",
                       "'prompt' must be %s; its elements are of mixed types.", forms);
    if (n > 1)
        return bad(e, "unsupported_parameter", "prompt",
                   "Unsupported parameter: 'prompt' holds %d prompts; ferry takes one prompt "
                   "per request.",
                   n);
    if (cJSON_IsString(first)) {
        out->prompt = dup_string(first->valuestring, &out->prompt_len);
        return out->prompt ? 0 : nomem(e);
    }
    return read_ids(first, "prompt[0]", out, e);
}

/* ---- messages (chat) ------------------------------------------------------------------ */

static int known_role(const char *r)
{
    static const char *roles[] = {"system", "user", "assistant", "tool", "developer"};
    for (size_t i = 0; i < sizeof(roles) / sizeof(roles[0]); i++)
        if (strcmp(r, roles[i]) == 0)
            return 1;
    return 0;
}

/* Replaces msg's "content" array of text parts (already in c) by their texts joined with
 * "\n", as vLLM does (chat_utils.py, _parse_chat_message_content_parts: "\n".join(texts)
 * for the "string" content format that text-only chat templates get). */
static int flatten_parts(cJSON *msg, cJSON *c, int i, ferry_api_error *e)
{
    char param[64];
    int n = cJSON_GetArraySize(c);
    if (n == 0) {
        snprintf(param, sizeof(param), "messages[%d].content", i);
        return bad(e, "empty_array", param,
                   "Invalid '%s': empty array. Expected an array with at least one content "
                   "part.",
                   param);
    }
    size_t total = 0;
    int j = 0;
    for (const cJSON *part = c->child; part; part = part->next, j++) {
        snprintf(param, sizeof(param), "messages[%d].content[%d]", i, j);
        if (!cJSON_IsObject(part))
            return wrong_type(e, param, "a content part object", part);
        const cJSON *t = field(part, "type");
        snprintf(param, sizeof(param), "messages[%d].content[%d].type", i, j);
        if (!t)
            return bad(e, "missing_required_parameter", param, "Missing required parameter: '%s'.",
                       param);
        if (!cJSON_IsString(t))
            return wrong_type(e, param, "a string", t);
        if (strcmp(t->valuestring, "text") != 0)
            return bad(e, "unsupported_parameter", param,
                       "Unsupported parameter: '%s' is '%.64s'; ferry takes text content parts "
                       "only.",
                       param, t->valuestring);
        const cJSON *text = field(part, "text");
        snprintf(param, sizeof(param), "messages[%d].content[%d].text", i, j);
        if (!text)
            return bad(e, "missing_required_parameter", param, "Missing required parameter: '%s'.",
                       param);
        if (!cJSON_IsString(text))
            return wrong_type(e, param, "a string", text);
        total += strlen(text->valuestring) + 1;
    }
    char *joined = malloc(total);
    if (!joined)
        return nomem(e);
    size_t at = 0;
    for (const cJSON *part = c->child; part; part = part->next) {
        const char *s = field(part, "text")->valuestring;
        size_t sl = strlen(s);
        if (part != c->child)
            joined[at++] = '\n';
        memcpy(joined + at, s, sl);
        at += sl;
    }
    joined[at] = '\0';
    cJSON *str = cJSON_CreateString(joined);
    free(joined);
    if (!str)
        return nomem(e);
    /* by name, so the replacement gets the key (c is the first "content" member) */
    if (!cJSON_ReplaceItemInObjectCaseSensitive(msg, "content", str)) {
        cJSON_Delete(str);
        return nomem(e);
    }
    return 0;
}

static int check_message(cJSON *msg, int i, ferry_api_error *e)
{
    char param[64];
    snprintf(param, sizeof(param), "messages[%d]", i);
    if (!cJSON_IsObject(msg))
        return wrong_type(e, param, "an object", msg);
    const cJSON *role = field(msg, "role");
    snprintf(param, sizeof(param), "messages[%d].role", i);
    if (!role)
        return bad(e, "missing_required_parameter", param, "Missing required parameter: '%s'.",
                   param);
    if (!cJSON_IsString(role))
        return wrong_type(e, param, "a string", role);
    if (!known_role(role->valuestring))
        return bad(e, "invalid_value", param,
                   "Invalid value for '%s': '%.64s'. Supported values are: 'system', 'user', "
                   "'assistant', 'tool' and 'developer'.",
                   param, role->valuestring);
    static const struct {
        const char *name;
        int array; /* 1: an array, 0: a string */
    } optional[] = {{"name", 0}, {"tool_call_id", 0}, {"tool_calls", 1}};
    for (size_t k = 0; k < sizeof(optional) / sizeof(optional[0]); k++) {
        const cJSON *v = field(msg, optional[k].name);
        snprintf(param, sizeof(param), "messages[%d].%s", i, optional[k].name);
        if (v && (optional[k].array ? !cJSON_IsArray(v) : !cJSON_IsString(v)))
            return wrong_type(e, param, optional[k].array ? "an array" : "a string", v);
    }
    cJSON *c = cJSON_GetObjectItemCaseSensitive(msg, "content");
    snprintf(param, sizeof(param), "messages[%d].content", i);
    if (!c || cJSON_IsNull(c)) {
        if (strcmp(role->valuestring, "assistant") == 0 &&
            (field(msg, "tool_calls") || field(msg, "function_call"))) {
            if (!c && !cJSON_AddNullToObject(msg, "content"))
                return nomem(e);
            return 0;
        }
        return bad(e, "missing_required_parameter", param,
                   "Missing required parameter: '%s' (only an assistant message with "
                   "'tool_calls' may have null content).",
                   param);
    }
    if (cJSON_IsString(c))
        return 0;
    if (cJSON_IsArray(c))
        return flatten_parts(msg, c, i, e);
    return wrong_type(e, param, "a string or an array of content parts", c);
}

static int parse_messages(cJSON *root, ferry_api_request *out, ferry_api_error *e)
{
    cJSON *m = cJSON_GetObjectItemCaseSensitive(root, "messages");
    if (!m || cJSON_IsNull(m))
        return bad(e, "missing_required_parameter", "messages",
                   "Missing required parameter: 'messages'.");
    if (!cJSON_IsArray(m))
        return wrong_type(e, "messages", "an array", m);
    if (!m->child)
        return bad(e, "empty_array", "messages",
                   "Invalid 'messages': empty array. Expected an array with at least one "
                   "message.");
    int i = 0;
    for (cJSON *msg = m->child; msg; msg = msg->next, i++) {
        int st = check_message(msg, i, e);
        if (st)
            return st;
    }
    out->messages = cJSON_DetachItemViaPointer(root, m);
    return 0;
}

/* ---- the whole request ---------------------------------------------------------------- */

static int parse_stop(const cJSON *root, ferry_api_request *out, ferry_api_error *e)
{
    const cJSON *s = field(root, "stop");
    if (!s)
        return 0;
    int n;
    if (cJSON_IsString(s)) {
        n = 1;
    } else if (cJSON_IsArray(s)) {
        n = cJSON_GetArraySize(s);
        if (n > FERRY_API_MAX_STOP)
            return bad(e, "array_above_max_length", "stop",
                       "Invalid 'stop': array too long. Expected an array with maximum length "
                       "%d, but got an array with length %d instead.",
                       FERRY_API_MAX_STOP, n);
    } else {
        return wrong_type(e, "stop", "a string or an array of strings", s);
    }
    if (n == 0)
        return 0;
    out->stop = calloc((size_t)n, sizeof(char *));
    if (!out->stop)
        return nomem(e);
    const cJSON *item = cJSON_IsString(s) ? s : s->child;
    for (int i = 0; i < n; i++, item = item->next) {
        char param[32];
        if (cJSON_IsString(s))
            snprintf(param, sizeof(param), "stop");
        else
            snprintf(param, sizeof(param), "stop[%d]", i);
        if (!cJSON_IsString(item))
            return wrong_type(e, param, "a string", item);
        if (!item->valuestring[0])
            return bad(e, "invalid_value", param,
                       "Invalid '%s': empty string. Stop strings must be non-empty.", param);
        out->stop[i] = dup_string(item->valuestring, NULL);
        if (!out->stop[i])
            return nomem(e);
        out->n_stop = i + 1;
    }
    return 0;
}

static int parse_sampling(const cJSON *root, ferry_api_request *out, ferry_api_error *e)
{
    const cJSON *v;
    int64_t k;
    int st;
    /* max_completion_tokens is OpenAI's newer name; it wins when both are sent, as in vLLM */
    static const char *limits[] = {"max_tokens", "max_completion_tokens"};
    for (size_t i = 0; i < 2; i++) {
        if ((v = field(root, limits[i]))) {
            if ((st = read_int(v, limits[i], 1, INT32_MAX, &k, e)))
                return st;
            out->max_tokens = (int32_t)k;
        }
    }
    if ((v = field(root, "temperature")) &&
        (st = read_decimal(v, "temperature", 0, 0, 2, &out->temperature, e)))
        return st;
    if ((v = field(root, "top_p")) && (st = read_decimal(v, "top_p", 0, 1, 1, &out->top_p, e)))
        return st;
    if ((v = field(root, "top_k"))) {
        if ((st = read_int(v, "top_k", -1, INT32_MAX, &k, e)))
            return st;
        out->top_k = (int32_t)k;
    }
    if ((v = field(root, "ignore_eos")) && (st = read_bool(v, "ignore_eos", &out->ignore_eos, e)))
        return st;
    if ((v = field(root, "seed"))) {
        if ((st = read_int(v, "seed", INT64_MIN, INT64_MAX, &k, e)))
            return st;
        out->has_seed = 1;
        out->seed = (uint64_t)k;
    }
    if ((v = field(root, "stream")) && (st = read_bool(v, "stream", &out->stream, e)))
        return st;
    if (out->stream && (v = field(root, "stream_options"))) {
        if (!cJSON_IsObject(v))
            return wrong_type(e, "stream_options", "an object", v);
        const cJSON *u = field(v, "include_usage");
        if (u && (st = read_bool(u, "stream_options.include_usage", &out->include_usage, e)))
            return st;
    }
    return 0;
}

/* The nesting depth of JSON text, for the message when cJSON gives up. */
static int json_depth(const char *s, size_t n)
{
    int depth = 0, max = 0, in_str = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (in_str) {
            if (c == '\\')
                i++;
            else if (c == '"')
                in_str = 0;
        } else if (c == '"') {
            in_str = 1;
        } else if (c == '[' || c == '{') {
            if (++depth > max)
                max = depth;
        } else if (c == ']' || c == '}') {
            depth--;
        }
    }
    return max;
}

static int parse_body(const char *body, size_t len, cJSON **root, ferry_api_error *e)
{
    if (!body || len == 0)
        return bad(e, "invalid_json", "", "The request body is empty; expected a JSON object.");
    const char *nul = memchr(body, '\0', len);
    if (nul)
        return bad(e, "invalid_json", "", "The request body holds a NUL byte at byte %zu.",
                   (size_t)(nul - body));
    for (size_t i = 0; i < len;) {
        int32_t k = ferry_utf8_seq(body + i, len - i);
        if (k <= 0)
            return bad(e, "invalid_json", "", "The request body is not valid UTF-8 (byte %zu).", i);
        i += (size_t)k;
    }
    const char *end = NULL;
    *root = cJSON_ParseWithLengthOpts(body, len, &end, 0);
    if (!*root) {
        if (json_depth(body, len) > CJSON_NESTING_LIMIT)
            return bad(e, "invalid_json", "",
                       "The request body is not valid JSON: nested deeper than %d levels.",
                       CJSON_NESTING_LIMIT);
        size_t at = end && end >= body && end <= body + len ? (size_t)(end - body) : 0;
        return bad(e, "invalid_json", "",
                   "The request body is not valid JSON (parse error at byte %zu).", at);
    }
    for (const char *p = end; p && p < body + len; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r')
            return bad(e, "invalid_json", "",
                       "The request body is not valid JSON: unexpected data at byte %zu after "
                       "the value.",
                       (size_t)(p - body));
    }
    if (!cJSON_IsObject(*root))
        return bad(e, "invalid_type", "", "The request body must be a JSON object, got %s.",
                   json_type_name(*root));
    return 0;
}

int ferry_api_parse(ferry_api_kind kind, const char *body, size_t len, ferry_api_request *out,
                    ferry_api_error *err)
{
    if (!out)
        return ferry_api_error_set(err, 500, "server_error", "", "",
                                   "ferry_api_parse: no request to fill");
    memset(out, 0, sizeof(*out));
    out->kind = kind;
    out->max_tokens = -1;
    out->temperature = 1.0;
    out->top_p = 1.0;
    if (err)
        ferry_api_error_set(err, 0, "", "", "", "%s", "");
    if (kind != FERRY_API_COMPLETIONS && kind != FERRY_API_CHAT)
        return ferry_api_error_set(err, 500, "server_error", "", "",
                                   "ferry_api_parse: unknown request kind %d", (int)kind);

    cJSON *root = NULL;
    int st = parse_body(body, len, &root, err);
    const cJSON *v;
    if (st)
        goto fail;
    if ((v = field(root, "model"))) {
        if (!cJSON_IsString(v)) {
            st = wrong_type(err, "model", "a string", v);
            goto fail;
        }
        if (!(out->model = dup_string(v->valuestring, NULL))) {
            st = nomem(err);
            goto fail;
        }
    }
    st = kind == FERRY_API_CHAT ? parse_messages(root, out, err) : parse_prompt(root, out, err);
    if (st)
        goto fail;
    if ((st = parse_sampling(root, out, err)) || (st = parse_stop(root, out, err)) ||
        (st = check_rejected(root, kind == FERRY_API_CHAT ? FOR_CHAT : FOR_COMPL, err)))
        goto fail;
    if (kind == FERRY_API_CHAT) {
        cJSON *kw = cJSON_GetObjectItemCaseSensitive(root, "chat_template_kwargs");
        if (kw && !cJSON_IsNull(kw)) {
            if (!cJSON_IsObject(kw)) {
                st = wrong_type(err, "chat_template_kwargs", "an object", kw);
                goto fail;
            }
            out->template_kwargs = cJSON_DetachItemViaPointer(root, kw);
        }
    }
    cJSON_Delete(root);
    return 0;
fail:
    cJSON_Delete(root);
    ferry_api_request_free(out);
    out->kind = kind;
    return st;
}

void ferry_api_request_free(ferry_api_request *r)
{
    if (!r)
        return;
    free(r->model);
    free(r->prompt);
    free(r->prompt_ids);
    cJSON_Delete(r->messages);
    cJSON_Delete(r->template_kwargs);
    if (r->stop)
        for (int32_t i = 0; i < r->n_stop; i++)
            free(r->stop[i]);
    free(r->stop);
    memset(r, 0, sizeof(*r));
}

/* ---- response bodies ------------------------------------------------------------------ */

typedef struct {
    char *p;
    size_t n, cap;
    int oom;
} jbuf;

static void jb_put(jbuf *b, const char *s, size_t n)
{
    if (b->oom || (n == 0 && b->p))
        return;
    if (n + 1 > b->cap - b->n) {
        size_t cap = b->cap ? b->cap : 256;
        while (n + 1 > cap - b->n) {
            if (cap > SIZE_MAX / 2) {
                b->oom = 1;
                return;
            }
            cap *= 2;
        }
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    if (n > 0)
        memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void jb_lit(jbuf *b, const char *s) { jb_put(b, s, strlen(s)); }

/* s[0..len) as a JSON string: quotes, backslashes and control characters escaped, each
 * byte outside well-formed UTF-8 replaced by U+FFFD. */
static void jb_str(jbuf *b, const char *s, size_t len)
{
    if (!s)
        s = "";
    jb_put(b, "\"", 1);
    size_t run = 0; /* start of the bytes copied as they are */
    for (size_t i = 0; i < len;) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char hex[8];
        if (c >= 0x80) {
            int32_t k = ferry_utf8_seq(s + i, len - i);
            if (k > 0) {
                i += (size_t)k;
                continue;
            }
            esc = "\xEF\xBF\xBD";
        } else if (c == '"') {
            esc = "\\\"";
        } else if (c == '\\') {
            esc = "\\\\";
        } else if (c < 0x20) {
            switch (c) {
            case '\b':
                esc = "\\b";
                break;
            case '\f':
                esc = "\\f";
                break;
            case '\n':
                esc = "\\n";
                break;
            case '\r':
                esc = "\\r";
                break;
            case '\t':
                esc = "\\t";
                break;
            default:
                snprintf(hex, sizeof(hex), "\\u%04x", c);
                esc = hex;
            }
        } else {
            i++;
            continue;
        }
        jb_put(b, s + run, i - run);
        jb_lit(b, esc);
        run = ++i;
    }
    jb_put(b, s + run, len - run);
    jb_put(b, "\"", 1);
}

/* A NUL-terminated string, or null for NULL. */
static void jb_cstr(jbuf *b, const char *s)
{
    if (s)
        jb_str(b, s, strlen(s));
    else
        jb_lit(b, "null");
}

static void jb_i64(jbuf *b, int64_t v)
{
    char num[24];
    snprintf(num, sizeof(num), "%lld", (long long)v);
    jb_lit(b, num);
}

static char *jb_finish(jbuf *b)
{
    if (b->oom || !b->p) {
        free(b->p);
        return NULL;
    }
    return b->p;
}

/* {"id":..,"object":..,"created":..,"model":.., — the members every body starts with. */
static void jb_head(jbuf *b, const char *id, const char *object, int64_t created, const char *model)
{
    jb_lit(b, "{\"id\":");
    jb_str(b, id ? id : "", id ? strlen(id) : 0);
    jb_lit(b, ",\"object\":\"");
    jb_lit(b, object);
    jb_lit(b, "\",\"created\":");
    jb_i64(b, created);
    jb_lit(b, ",\"model\":");
    jb_str(b, model ? model : "", model ? strlen(model) : 0);
}

static void jb_usage(jbuf *b, int32_t prompt_tokens, int32_t completion_tokens)
{
    jb_lit(b, "{\"prompt_tokens\":");
    jb_i64(b, prompt_tokens);
    jb_lit(b, ",\"completion_tokens\":");
    jb_i64(b, completion_tokens);
    jb_lit(b, ",\"total_tokens\":");
    jb_i64(b, (int64_t)prompt_tokens + completion_tokens);
    jb_lit(b, "}");
}

char *ferry_api_error_json(const ferry_api_error *e)
{
    jbuf b = {0};
    jb_lit(&b, "{\"error\":{\"message\":");
    jb_cstr(&b, e ? e->message : "");
    jb_lit(&b, ",\"type\":");
    jb_cstr(&b, e ? e->type : "server_error");
    jb_lit(&b, ",\"param\":");
    jb_cstr(&b, e && e->param[0] ? e->param : NULL);
    jb_lit(&b, ",\"code\":");
    jb_cstr(&b, e && e->code[0] ? e->code : NULL);
    jb_lit(&b, "}}");
    return jb_finish(&b);
}

char *ferry_api_response_json(ferry_api_kind kind, const char *id, const char *model,
                              int64_t created, const char *text, size_t len,
                              const char *finish_reason, int32_t prompt_tokens,
                              int32_t completion_tokens)
{
    jbuf b = {0};
    int chat = kind == FERRY_API_CHAT;
    jb_head(&b, id, chat ? "chat.completion" : "text_completion", created, model);
    if (chat) {
        jb_lit(&b, ",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":");
        jb_str(&b, text, len);
        jb_lit(&b, "}");
    } else {
        jb_lit(&b, ",\"choices\":[{\"index\":0,\"text\":");
        jb_str(&b, text, len);
    }
    jb_lit(&b, ",\"logprobs\":null,\"finish_reason\":");
    jb_cstr(&b, finish_reason);
    jb_lit(&b, "}],\"usage\":");
    jb_usage(&b, prompt_tokens, completion_tokens);
    jb_lit(&b, "}");
    return jb_finish(&b);
}

char *ferry_api_chunk_json(ferry_api_kind kind, const char *id, const char *model, int64_t created,
                           const char *text, size_t len, int first, const char *finish_reason,
                           int include_usage)
{
    jbuf b = {0};
    int chat = kind == FERRY_API_CHAT;
    jb_head(&b, id, chat ? "chat.completion.chunk" : "text_completion", created, model);
    if (chat) {
        jb_lit(&b, ",\"choices\":[{\"index\":0,\"delta\":{");
        if (first)
            jb_lit(&b, "\"role\":\"assistant\"");
        if (first || len > 0 || !finish_reason) {
            jb_lit(&b, first ? ",\"content\":" : "\"content\":");
            jb_str(&b, text, len);
        }
        jb_lit(&b, "}");
    } else {
        jb_lit(&b, ",\"choices\":[{\"index\":0,\"text\":");
        jb_str(&b, text, len);
    }
    jb_lit(&b, ",\"logprobs\":null,\"finish_reason\":");
    jb_cstr(&b, finish_reason);
    jb_lit(&b, "}]");
    if (include_usage)
        jb_lit(&b, ",\"usage\":null");
    jb_lit(&b, "}");
    return jb_finish(&b);
}

char *ferry_api_usage_chunk_json(ferry_api_kind kind, const char *id, const char *model,
                                 int64_t created, int32_t prompt_tokens, int32_t completion_tokens)
{
    jbuf b = {0};
    jb_head(&b, id, kind == FERRY_API_CHAT ? "chat.completion.chunk" : "text_completion", created,
            model);
    jb_lit(&b, ",\"choices\":[],\"usage\":");
    jb_usage(&b, prompt_tokens, completion_tokens);
    jb_lit(&b, "}");
    return jb_finish(&b);
}

char *ferry_api_models_json(const char *model_id, int64_t created)
{
    jbuf b = {0};
    jb_lit(&b, "{\"object\":\"list\",\"data\":[{\"id\":");
    jb_str(&b, model_id ? model_id : "", model_id ? strlen(model_id) : 0);
    jb_lit(&b, ",\"object\":\"model\",\"created\":");
    jb_i64(&b, created);
    jb_lit(&b, ",\"owned_by\":\"ferry\"}]}");
    return jb_finish(&b);
}
