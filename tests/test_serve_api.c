/*
 * tests/test_serve_api.c: the OpenAI API shapes of `ferry serve` (serve/api.h) and the
 * stop-string matcher (serve/stop.h). Requests: every accepted form of each field, every
 * rejection (status, code, param, a message naming the field), malformed, truncated,
 * non-object, deeply nested and non-UTF-8 bodies, huge numbers. Responses: parsed back with
 * cJSON and checked member by member, escaping of any byte. Stop strings: pieces across
 * boundaries, overlapping strings, a stop at the start, UTF-8 holdback, flush, and seeded
 * random texts against a naive reference of the earliest occurrence and the shortest
 * holdback. Every body is handed over in a buffer of exactly its length (no NUL after it),
 * so ASan sees any read past the end.
 */
#include <check.h>
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "serve/api.h"
#include "serve/stop.h"
#include "tests/check_util.h"

#define N_OF(a) ((int32_t)(sizeof(a) / sizeof((a)[0])))
#define COMPL FERRY_API_COMPLETIONS
#define CHAT FERRY_API_CHAT

/* ---- helpers ------------------------------------------------------------------------ */

/* Parses body (len bytes) from a buffer of exactly that size. */
static int parse_len(ferry_api_kind kind, const char *body, size_t len, ferry_api_request *r,
                     ferry_api_error *e)
{
    char *copy = malloc(len ? len : 1);
    ck_assert_ptr_nonnull(copy);
    memcpy(copy, body, len);
    int st = ferry_api_parse(kind, copy, len, r, e);
    free(copy);
    return st;
}

static void parse_ok(ferry_api_kind kind, const char *body, ferry_api_request *r)
{
    ferry_api_error e;
    int st = parse_len(kind, body, strlen(body), r, &e);
    ck_assert_msg(st == 0, "%s: got %d %s/%s '%s': %s", body, st, e.code, e.param, e.type,
                  e.message);
    ck_assert_int_eq(e.status, 0);
    ck_assert_int_eq(r->kind, kind);
}

/* The body must be rejected with status, code and param; the message must name param. */
static void expect_err_len(ferry_api_kind kind, const char *body, size_t len, int status,
                           const char *code, const char *param)
{
    ferry_api_request r;
    ferry_api_error e;
    int st = parse_len(kind, body, len, &r, &e);
    ck_assert_msg(st == status, "%.*s: got status %d (%s: %s), want %d", (int)len, body, st, e.code,
                  e.message, status);
    ck_assert_int_eq(e.status, status);
    ck_assert_msg(strcmp(e.code, code) == 0, "%.*s: code '%s' (%s), want '%s'", (int)len, body,
                  e.code, e.message, code);
    ck_assert_msg(strcmp(e.param, param) == 0, "%.*s: param '%s' (%s), want '%s'", (int)len, body,
                  e.param, e.message, param);
    ck_assert_str_eq(e.type, status == 400 ? "invalid_request_error" : "server_error");
    ck_assert_msg(e.message[0] != '\0', "%.*s: empty message", (int)len, body);
    if (param[0])
        ck_assert_msg(strstr(e.message, param) != NULL, "%.*s: message '%s' does not name '%s'",
                      (int)len, body, e.message, param);
    /* a rejected request holds nothing and can be freed */
    ck_assert_ptr_null(r.model);
    ck_assert_ptr_null(r.prompt);
    ck_assert_ptr_null(r.prompt_ids);
    ck_assert_ptr_null(r.messages);
    ck_assert_ptr_null(r.stop);
    ck_assert_ptr_null(r.template_kwargs);
    ferry_api_request_free(&r);
}

static void expect_err(ferry_api_kind kind, const char *body, const char *code, const char *param)
{
    expect_err_len(kind, body, strlen(body), 400, code, param);
}

/* A body "{<prefix>, <field>}" for either kind. */
static void with_field(char *buf, size_t cap, ferry_api_kind kind, const char *field)
{
    const char *base = kind == CHAT ? "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]"
                                    : "\"prompt\":\"hi\"";
    snprintf(buf, cap, "{%s%s%s}", base, field[0] ? "," : "", field);
}

static cJSON *parse_json(const char *text)
{
    ck_assert_ptr_nonnull(text);
    cJSON *j = cJSON_Parse(text);
    ck_assert_msg(j != NULL, "not JSON: %s", text);
    return j;
}

static const cJSON *get(const cJSON *obj, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);
    ck_assert_msg(v != NULL, "no member '%s'", name);
    return v;
}

static void expect_str(const cJSON *obj, const char *name, const char *want)
{
    const cJSON *v = get(obj, name);
    ck_assert_msg(cJSON_IsString(v), "'%s' is not a string", name);
    ck_assert_str_eq(v->valuestring, want);
}

static void expect_num(const cJSON *obj, const char *name, double want)
{
    const cJSON *v = get(obj, name);
    ck_assert_msg(cJSON_IsNumber(v), "'%s' is not a number", name);
    ck_assert_msg(v->valuedouble == want, "'%s' = %.17g, want %.17g", name, v->valuedouble, want);
}

static void expect_null(const cJSON *obj, const char *name)
{
    ck_assert_msg(cJSON_IsNull(get(obj, name)), "'%s' is not null", name);
}

static int n_members(const cJSON *obj)
{
    int n = 0;
    for (const cJSON *c = obj->child; c; c = c->next)
        n++;
    return n;
}

/* ---- completions: accepted forms -------------------------------------------------------- */

START_TEST(test_api_completions_defaults)
{
    ferry_api_request r;
    parse_ok(COMPL, "{\"prompt\":\"Hello\"}", &r);
    ck_assert_ptr_null(r.model);
    ck_assert_str_eq(r.prompt, "Hello");
    ck_assert_uint_eq(r.prompt_len, 5);
    ck_assert_ptr_null(r.prompt_ids);
    ck_assert_int_eq(r.n_prompt_ids, 0);
    ck_assert_ptr_null(r.messages);
    ck_assert_ptr_null(r.template_kwargs);
    ck_assert_int_eq(r.max_tokens, -1);
    ck_assert(r.temperature == 1.0);
    ck_assert(r.top_p == 1.0);
    ck_assert_int_eq(r.top_k, 0);
    ck_assert_int_eq(r.ignore_eos, 0);
    ck_assert_int_eq(r.has_seed, 0);
    ck_assert_ptr_null(r.stop);
    ck_assert_int_eq(r.n_stop, 0);
    ck_assert_int_eq(r.stream, 0);
    ck_assert_int_eq(r.include_usage, 0);
    ferry_api_request_free(&r);
    ck_assert_ptr_null(r.prompt);
    ferry_api_request_free(&r); /* twice: zeroed */
    ferry_api_request_free(NULL);
}
END_TEST

START_TEST(test_api_prompt_forms)
{
    ferry_api_request r;
    parse_ok(COMPL, "{\"model\":\"m\",\"prompt\":[\"Once upon\"]}", &r);
    ck_assert_str_eq(r.model, "m");
    ck_assert_str_eq(r.prompt, "Once upon");
    ck_assert_uint_eq(r.prompt_len, 9);
    ferry_api_request_free(&r);

    parse_ok(COMPL, "{\"prompt\":[1, 2.0, 2147483647, 0]}", &r);
    ck_assert_ptr_null(r.prompt);
    ck_assert_int_eq(r.n_prompt_ids, 4);
    ck_assert_int_eq(r.prompt_ids[0], 1);
    ck_assert_int_eq(r.prompt_ids[1], 2);
    ck_assert_int_eq(r.prompt_ids[2], 2147483647);
    ck_assert_int_eq(r.prompt_ids[3], 0);
    ferry_api_request_free(&r);

    parse_ok(COMPL, "{\"prompt\":[[7, 8, 9]]}", &r);
    ck_assert_int_eq(r.n_prompt_ids, 3);
    ck_assert_int_eq(r.prompt_ids[0], 7);
    ck_assert_int_eq(r.prompt_ids[2], 9);
    ferry_api_request_free(&r);

    /* the empty string is accepted, as OpenAI does */
    parse_ok(COMPL, "{\"prompt\":\"\"}", &r);
    ck_assert_str_eq(r.prompt, "");
    ck_assert_uint_eq(r.prompt_len, 0);
    ferry_api_request_free(&r);

    /* escapes decoded, UTF-8 kept, a surrogate pair joined */
    parse_ok(COMPL, "{\"prompt\":\"a\\n\\\"b\\\" caf\\u00e9 \xe2\x82\xac \\ud83d\\ude00\"}", &r);
    ck_assert_str_eq(r.prompt, "a\n\"b\" caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80");
    ck_assert_uint_eq(r.prompt_len, strlen(r.prompt));
    ferry_api_request_free(&r);

    /* null members count as absent; unknown members are ignored */
    parse_ok(COMPL,
             "{\"prompt\":\"x\",\"model\":null,\"max_tokens\":null,\"stop\":null,\"seed\":null,"
             "\"user\":\"u\",\"metadata\":{\"a\":1},\"store\":true,\"service_tier\":\"auto\","
             "\"parallel_tool_calls\":false,\"something_new\":[1,{\"x\":2}]}",
             &r);
    ck_assert_ptr_null(r.model);
    ck_assert_int_eq(r.max_tokens, -1);
    ck_assert_int_eq(r.has_seed, 0);
    ck_assert_int_eq(r.n_stop, 0);
    ferry_api_request_free(&r);
}
END_TEST

START_TEST(test_api_prompt_rejections)
{
    expect_err(COMPL, "{}", "missing_required_parameter", "prompt");
    expect_err(COMPL, "{\"prompt\":null}", "missing_required_parameter", "prompt");
    expect_err(COMPL, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}",
               "missing_required_parameter", "prompt");
    expect_err(COMPL, "{\"prompt\":5}", "invalid_type", "prompt");
    expect_err(COMPL, "{\"prompt\":true}", "invalid_type", "prompt");
    expect_err(COMPL, "{\"prompt\":{\"text\":\"x\"}}", "invalid_type", "prompt");
    expect_err(COMPL, "{\"prompt\":[]}", "empty_array", "prompt");
    expect_err(COMPL, "{\"prompt\":[[]]}", "empty_array", "prompt[0]");
    expect_err(COMPL, "{\"prompt\":[{}]}", "invalid_type", "prompt");
    expect_err(COMPL, "{\"prompt\":[null]}", "invalid_type", "prompt");
    expect_err(COMPL, "{\"prompt\":[\"a\",\"b\"]}", "unsupported_parameter", "prompt");
    expect_err(COMPL, "{\"prompt\":[[1],[2,3]]}", "unsupported_parameter", "prompt");
    expect_err(COMPL, "{\"prompt\":[\"a\",1]}", "invalid_type", "prompt");
    expect_err(COMPL, "{\"prompt\":[[1],\"a\"]}", "invalid_type", "prompt");
    expect_err(COMPL, "{\"prompt\":[1,\"a\"]}", "invalid_type", "prompt[1]");
    expect_err(COMPL, "{\"prompt\":[1,[2]]}", "invalid_type", "prompt[1]");
    expect_err(COMPL, "{\"prompt\":[-1]}", "integer_below_min_value", "prompt[0]");
    expect_err(COMPL, "{\"prompt\":[5,2147483648]}", "integer_above_max_value", "prompt[1]");
    expect_err(COMPL, "{\"prompt\":[1.5]}", "invalid_type", "prompt[0]");
    expect_err(COMPL, "{\"prompt\":[1e999]}", "integer_above_max_value", "prompt[0]");
    expect_err(COMPL, "{\"prompt\":[[1,-2]]}", "integer_below_min_value", "prompt[0][1]");
    expect_err(COMPL, "{\"prompt\":[[1,true]]}", "invalid_type", "prompt[0][1]");
    expect_err(COMPL, "{\"prompt\":\"x\",\"model\":5}", "invalid_type", "model");
}
END_TEST

/* ---- sampling fields ---------------------------------------------------------------- */

START_TEST(test_api_sampling_accepted)
{
    ferry_api_request r;
    parse_ok(COMPL,
             "{\"prompt\":\"x\",\"max_tokens\":16,\"temperature\":0,\"top_p\":0.5,\"top_k\":40,"
             "\"seed\":42,\"ignore_eos\":true,\"stream\":true,"
             "\"stream_options\":{\"include_usage\":true}}",
             &r);
    ck_assert_int_eq(r.max_tokens, 16);
    ck_assert(r.temperature == 0.0);
    ck_assert(r.top_p == 0.5);
    ck_assert_int_eq(r.top_k, 40);
    ck_assert_int_eq(r.has_seed, 1);
    ck_assert_uint_eq(r.seed, 42);
    ck_assert_int_eq(r.ignore_eos, 1);
    ck_assert_int_eq(r.stream, 1);
    ck_assert_int_eq(r.include_usage, 1);
    ferry_api_request_free(&r);

    /* edges of each range; integers written as decimals; a negative seed is int64 */
    parse_ok(COMPL,
             "{\"prompt\":\"x\",\"max_tokens\":1.0,\"temperature\":2,\"top_p\":1,\"top_k\":-1,"
             "\"seed\":-1,\"ignore_eos\":false,\"stream\":false}",
             &r);
    ck_assert_int_eq(r.max_tokens, 1);
    ck_assert(r.temperature == 2.0);
    ck_assert(r.top_p == 1.0);
    ck_assert_int_eq(r.top_k, -1);
    ck_assert_uint_eq(r.seed, UINT64_MAX);
    ck_assert_int_eq(r.ignore_eos, 0);
    ferry_api_request_free(&r);

    parse_ok(COMPL,
             "{\"prompt\":\"x\",\"max_tokens\":2147483647,\"top_p\":1e-9,\"top_k\":0,"
             "\"seed\":9007199254740992,\"temperature\":0.7}",
             &r);
    ck_assert_int_eq(r.max_tokens, 2147483647);
    ck_assert(r.top_p == 1e-9);
    ck_assert_uint_eq(r.seed, 9007199254740992ull);
    ck_assert(r.temperature == 0.7);
    ferry_api_request_free(&r);

    parse_ok(COMPL, "{\"prompt\":\"x\",\"seed\":-9223372036854775808}", &r);
    ck_assert_uint_eq(r.seed, 0x8000000000000000ull);
    ferry_api_request_free(&r);

    /* max_completion_tokens wins over max_tokens, for both kinds */
    parse_ok(COMPL, "{\"prompt\":\"x\",\"max_completion_tokens\":7,\"max_tokens\":9}", &r);
    ck_assert_int_eq(r.max_tokens, 7);
    ferry_api_request_free(&r);
    parse_ok(CHAT,
             "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":9,"
             "\"max_completion_tokens\":3}",
             &r);
    ck_assert_int_eq(r.max_tokens, 3);
    ferry_api_request_free(&r);

    /* stream_options is ignored when not streaming, whatever it holds */
    parse_ok(COMPL, "{\"prompt\":\"x\",\"stream_options\":\"junk\"}", &r);
    ck_assert_int_eq(r.include_usage, 0);
    ferry_api_request_free(&r);
    parse_ok(COMPL, "{\"prompt\":\"x\",\"stream_options\":{\"include_usage\":true}}", &r);
    ck_assert_int_eq(r.stream, 0);
    ck_assert_int_eq(r.include_usage, 0);
    ferry_api_request_free(&r);
    parse_ok(COMPL,
             "{\"prompt\":\"x\",\"stream\":true,\"stream_options\":{\"include_usage\":false,"
             "\"continuous_usage_stats\":true}}",
             &r);
    ck_assert_int_eq(r.include_usage, 0);
    ferry_api_request_free(&r);
    parse_ok(COMPL, "{\"prompt\":\"x\",\"stream\":true,\"stream_options\":null}", &r);
    ck_assert_int_eq(r.stream, 1);
    ck_assert_int_eq(r.include_usage, 0);
    ferry_api_request_free(&r);
}
END_TEST

START_TEST(test_api_sampling_rejections)
{
    static const struct {
        const char *field, *code, *param;
    } cases[] = {
        {"\"max_tokens\":0", "integer_below_min_value", "max_tokens"},
        {"\"max_tokens\":-5", "integer_below_min_value", "max_tokens"},
        {"\"max_tokens\":2147483648", "integer_above_max_value", "max_tokens"},
        {"\"max_tokens\":1e999", "integer_above_max_value", "max_tokens"},
        {"\"max_tokens\":100000000000000000000000000000000000000000000000000000000000000000000000"
         "000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
         "integer_above_max_value", "max_tokens"},
        {"\"max_tokens\":-1e999", "integer_below_min_value", "max_tokens"},
        {"\"max_tokens\":1.5", "invalid_type", "max_tokens"},
        {"\"max_tokens\":\"16\"", "invalid_type", "max_tokens"},
        {"\"max_tokens\":true", "invalid_type", "max_tokens"},
        {"\"max_tokens\":[16]", "invalid_type", "max_tokens"},
        {"\"max_completion_tokens\":0", "integer_below_min_value", "max_completion_tokens"},
        {"\"max_completion_tokens\":{}", "invalid_type", "max_completion_tokens"},
        {"\"temperature\":-0.01", "decimal_below_min_value", "temperature"},
        {"\"temperature\":2.0001", "decimal_above_max_value", "temperature"},
        {"\"temperature\":1e999", "decimal_above_max_value", "temperature"},
        {"\"temperature\":-1e999", "decimal_below_min_value", "temperature"},
        {"\"temperature\":\"0.5\"", "invalid_type", "temperature"},
        {"\"temperature\":false", "invalid_type", "temperature"},
        {"\"top_p\":0", "decimal_below_min_value", "top_p"},
        {"\"top_p\":-0.5", "decimal_below_min_value", "top_p"},
        {"\"top_p\":1.5", "decimal_above_max_value", "top_p"},
        {"\"top_p\":\"1\"", "invalid_type", "top_p"},
        {"\"top_k\":-2", "integer_below_min_value", "top_k"},
        {"\"top_k\":2.5", "invalid_type", "top_k"},
        {"\"top_k\":4294967296", "integer_above_max_value", "top_k"},
        {"\"top_k\":\"5\"", "invalid_type", "top_k"},
        {"\"seed\":1.5", "invalid_type", "seed"},
        {"\"seed\":\"1\"", "invalid_type", "seed"},
        {"\"seed\":9223372036854775808", "integer_above_max_value", "seed"},
        {"\"seed\":1e400", "integer_above_max_value", "seed"},
        {"\"seed\":-1e19", "integer_below_min_value", "seed"},
        {"\"ignore_eos\":1", "invalid_type", "ignore_eos"},
        {"\"ignore_eos\":\"true\"", "invalid_type", "ignore_eos"},
        {"\"stream\":1", "invalid_type", "stream"},
        {"\"stream\":\"yes\"", "invalid_type", "stream"},
        {"\"stream\":true,\"stream_options\":true", "invalid_type", "stream_options"},
        {"\"stream\":true,\"stream_options\":{\"include_usage\":1}", "invalid_type",
         "stream_options.include_usage"},
    };
    char body[512];
    for (int k = 0; k < 2; k++) {
        ferry_api_kind kind = k ? CHAT : COMPL;
        for (int32_t i = 0; i < N_OF(cases); i++) {
            with_field(body, sizeof(body), kind, cases[i].field);
            expect_err(kind, body, cases[i].code, cases[i].param);
        }
    }
}
END_TEST

START_TEST(test_api_stop_field)
{
    ferry_api_request r;
    parse_ok(COMPL, "{\"prompt\":\"x\",\"stop\":\"\\n\\n\"}", &r);
    ck_assert_int_eq(r.n_stop, 1);
    ck_assert_str_eq(r.stop[0], "\n\n");
    ferry_api_request_free(&r);

    parse_ok(CHAT,
             "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
             "\"stop\":[\"a\",\"\xc3\xa9\",\"END\",\"a\"]}",
             &r);
    ck_assert_int_eq(r.n_stop, 4);
    ck_assert_str_eq(r.stop[0], "a");
    ck_assert_str_eq(r.stop[1], "\xc3\xa9");
    ck_assert_str_eq(r.stop[2], "END");
    ck_assert_str_eq(r.stop[3], "a");
    ferry_api_request_free(&r);

    parse_ok(COMPL, "{\"prompt\":\"x\",\"stop\":[]}", &r);
    ck_assert_int_eq(r.n_stop, 0);
    ck_assert_ptr_null(r.stop);
    ferry_api_request_free(&r);

    expect_err(COMPL, "{\"prompt\":\"x\",\"stop\":\"\"}", "invalid_value", "stop");
    expect_err(COMPL, "{\"prompt\":\"x\",\"stop\":[\"a\",\"\"]}", "invalid_value", "stop[1]");
    expect_err(COMPL, "{\"prompt\":\"x\",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}",
               "array_above_max_length", "stop");
    expect_err(COMPL, "{\"prompt\":\"x\",\"stop\":[\"a\",1]}", "invalid_type", "stop[1]");
    expect_err(COMPL, "{\"prompt\":\"x\",\"stop\":[null]}", "invalid_type", "stop[0]");
    expect_err(COMPL, "{\"prompt\":\"x\",\"stop\":5}", "invalid_type", "stop");
    expect_err(COMPL, "{\"prompt\":\"x\",\"stop\":{\"a\":1}}", "invalid_type", "stop");
}
END_TEST

/* ---- fields ferry does not implement ---------------------------------------------------- */

START_TEST(test_api_unsupported)
{
    /* rejected: field, which kinds (1 completions, 2 chat), the code */
    static const struct {
        const char *field;
        int kinds;
        const char *code, *param;
    } rejected[] = {
        {"\"n\":2", 3, "unsupported_parameter", "n"},
        {"\"n\":0", 3, "integer_below_min_value", "n"},
        {"\"n\":\"1\"", 3, "invalid_type", "n"},
        {"\"logit_bias\":{\"50256\":-100}", 3, "unsupported_parameter", "logit_bias"},
        {"\"logit_bias\":[1]", 3, "invalid_type", "logit_bias"},
        {"\"presence_penalty\":0.5", 3, "unsupported_parameter", "presence_penalty"},
        {"\"presence_penalty\":-2", 3, "unsupported_parameter", "presence_penalty"},
        {"\"presence_penalty\":\"0\"", 3, "invalid_type", "presence_penalty"},
        {"\"frequency_penalty\":1", 3, "unsupported_parameter", "frequency_penalty"},
        {"\"repetition_penalty\":1.1", 3, "unsupported_parameter", "repetition_penalty"},
        {"\"repetition_penalty\":0", 3, "unsupported_parameter", "repetition_penalty"},
        {"\"min_p\":0.05", 3, "unsupported_parameter", "min_p"},
        {"\"min_p\":-0.1", 3, "invalid_value", "min_p"},
        {"\"min_tokens\":4", 3, "unsupported_parameter", "min_tokens"},
        {"\"stop_token_ids\":[2]", 3, "unsupported_parameter", "stop_token_ids"},
        {"\"stop_token_ids\":2", 3, "invalid_type", "stop_token_ids"},
        {"\"bad_words\":[\"x\"]", 3, "unsupported_parameter", "bad_words"},
        {"\"allowed_token_ids\":[1]", 3, "unsupported_parameter", "allowed_token_ids"},
        {"\"include_stop_str_in_output\":true", 3, "unsupported_parameter",
         "include_stop_str_in_output"},
        {"\"use_beam_search\":true", 3, "unsupported_parameter", "use_beam_search"},
        {"\"prompt_logprobs\":0", 3, "unsupported_parameter", "prompt_logprobs"},
        {"\"guided_json\":{}", 3, "unsupported_parameter", "guided_json"},
        {"\"guided_regex\":\"a+\"", 3, "unsupported_parameter", "guided_regex"},
        {"\"guided_choice\":[\"a\"]", 3, "unsupported_parameter", "guided_choice"},
        {"\"guided_grammar\":\"g\"", 3, "unsupported_parameter", "guided_grammar"},
        {"\"structured_outputs\":{\"json\":{}}", 3, "unsupported_parameter", "structured_outputs"},
        {"\"echo\":true", 3, "unsupported_parameter", "echo"},
        {"\"echo\":\"yes\"", 3, "invalid_type", "echo"},
        {"\"suffix\":\"end\"", 1, "unsupported_parameter", "suffix"},
        {"\"suffix\":3", 1, "invalid_type", "suffix"},
        {"\"best_of\":3", 1, "unsupported_parameter", "best_of"},
        {"\"best_of\":0", 1, "integer_below_min_value", "best_of"},
        {"\"logprobs\":0", 1, "unsupported_parameter", "logprobs"},
        {"\"logprobs\":5", 1, "unsupported_parameter", "logprobs"},
        {"\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]", 2,
         "unsupported_parameter", "tools"},
        {"\"tools\":{}", 2, "invalid_type", "tools"},
        {"\"functions\":[{\"name\":\"f\"}]", 2, "unsupported_parameter", "functions"},
        {"\"tool_choice\":\"required\"", 2, "unsupported_parameter", "tool_choice"},
        {"\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"f\"}}", 2,
         "unsupported_parameter", "tool_choice"},
        {"\"function_call\":{\"name\":\"f\"}", 2, "unsupported_parameter", "function_call"},
        {"\"logprobs\":true", 2, "unsupported_parameter", "logprobs"},
        {"\"logprobs\":1", 2, "invalid_type", "logprobs"},
        {"\"top_logprobs\":3", 2, "unsupported_parameter", "top_logprobs"},
        {"\"response_format\":{\"type\":\"json_object\"}", 2, "unsupported_parameter",
         "response_format"},
        {"\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{}}", 2,
         "unsupported_parameter", "response_format"},
        {"\"response_format\":\"text\"", 2, "invalid_type", "response_format"},
        {"\"response_format\":{}", 2, "missing_required_parameter", "response_format.type"},
        {"\"response_format\":{\"type\":1}", 2, "invalid_type", "response_format.type"},
        {"\"audio\":{\"voice\":\"alloy\",\"format\":\"wav\"}", 2, "unsupported_parameter", "audio"},
        {"\"modalities\":[\"text\",\"audio\"]", 2, "unsupported_parameter", "modalities"},
        {"\"modalities\":\"text\"", 2, "invalid_type", "modalities"},
        {"\"chat_template\":\"{{ x }}\"", 2, "unsupported_parameter", "chat_template"},
        {"\"add_generation_prompt\":false", 2, "unsupported_parameter", "add_generation_prompt"},
        {"\"continue_final_message\":true", 2, "unsupported_parameter", "continue_final_message"},
        {"\"chat_template_kwargs\":[1]", 2, "invalid_type", "chat_template_kwargs"},
    };
    /* accepted: the neutral values of the same fields, and the fields of the other kind */
    static const struct {
        const char *field;
        int kinds;
    } accepted[] = {
        {"\"n\":1", 3},
        {"\"n\":1.0", 3},
        {"\"logit_bias\":{}", 3},
        {"\"presence_penalty\":0", 3},
        {"\"frequency_penalty\":0.0", 3},
        {"\"repetition_penalty\":1", 3},
        {"\"min_p\":0", 3},
        {"\"min_tokens\":0", 3},
        {"\"stop_token_ids\":[]", 3},
        {"\"bad_words\":[]", 3},
        {"\"include_stop_str_in_output\":false", 3},
        {"\"use_beam_search\":false", 3},
        {"\"echo\":false", 3},
        {"\"prompt_logprobs\":null", 3},
        {"\"guided_json\":null", 3},
        {"\"suffix\":\"\"", 1},
        {"\"best_of\":1", 1},
        {"\"logprobs\":null", 1},
        {"\"tools\":[]", 2},
        {"\"functions\":[]", 2},
        {"\"tool_choice\":\"none\"", 2},
        {"\"tool_choice\":\"auto\"", 2},
        {"\"function_call\":\"none\"", 2},
        {"\"logprobs\":false", 2},
        {"\"top_logprobs\":0", 2},
        {"\"response_format\":{\"type\":\"text\"}", 2},
        {"\"audio\":null", 2},
        {"\"modalities\":[\"text\"]", 2},
        {"\"chat_template\":null", 2},
        {"\"add_generation_prompt\":true", 2},
        {"\"continue_final_message\":false", 2},
        /* the other kind's fields are unknown here, so ignored */
        {"\"suffix\":\"end\",\"best_of\":4", 2},
        {"\"tools\":[{\"type\":\"function\"}],\"response_format\":{\"type\":\"json_object\"},"
         "\"audio\":{},\"modalities\":[\"audio\"],\"top_logprobs\":5,\"chat_template\":\"x\"",
         1},
    };
    char body[512];
    for (int k = 0; k < 2; k++) {
        ferry_api_kind kind = k ? CHAT : COMPL;
        int bit = k ? 2 : 1;
        for (int32_t i = 0; i < N_OF(rejected); i++) {
            if (!(rejected[i].kinds & bit))
                continue;
            with_field(body, sizeof(body), kind, rejected[i].field);
            expect_err(kind, body, rejected[i].code, rejected[i].param);
        }
        for (int32_t i = 0; i < N_OF(accepted); i++) {
            if (!(accepted[i].kinds & bit))
                continue;
            ferry_api_request r;
            with_field(body, sizeof(body), kind, accepted[i].field);
            parse_ok(kind, body, &r);
            ferry_api_request_free(&r);
        }
    }
}
END_TEST

/* ---- chat messages -------------------------------------------------------------------- */

START_TEST(test_api_chat_messages)
{
    ferry_api_request r;
    parse_ok(
        CHAT,
        "{\"model\":\"tiny\",\"messages\":["
        "{\"role\":\"system\",\"content\":\"Be brief.\"},"
        "{\"role\":\"developer\",\"content\":\"dev\"},"
        "{\"role\":\"user\",\"name\":\"ann\",\"content\":[{\"type\":\"text\",\"text\":\"one\"},"
        "{\"type\":\"text\",\"text\":\"two\"},{\"type\":\"text\",\"text\":\"\"}]},"
        "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"c1\","
        "\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]},"
        "{\"role\":\"tool\",\"tool_call_id\":\"c1\",\"content\":\"42\"},"
        "{\"role\":\"assistant\",\"tool_calls\":[]},"
        "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"solo\"}],"
        "\"extra\":7}],"
        "\"chat_template_kwargs\":{\"enable_thinking\":false}}",
        &r);
    ck_assert_str_eq(r.model, "tiny");
    ck_assert_ptr_null(r.prompt);
    ck_assert_ptr_nonnull(r.messages);
    ck_assert(cJSON_IsArray(r.messages));
    ck_assert_int_eq(cJSON_GetArraySize(r.messages), 7);
    const cJSON *m0 = cJSON_GetArrayItem(r.messages, 0);
    expect_str(m0, "role", "system");
    expect_str(m0, "content", "Be brief.");
    expect_str(cJSON_GetArrayItem(r.messages, 1), "role", "developer");
    const cJSON *m2 = cJSON_GetArrayItem(r.messages, 2);
    /* text parts joined with "\n", as vLLM does */
    expect_str(m2, "content", "one\ntwo\n");
    expect_str(m2, "name", "ann");
    const cJSON *m3 = cJSON_GetArrayItem(r.messages, 3);
    expect_null(m3, "content");
    ck_assert(cJSON_IsArray(get(m3, "tool_calls")));
    expect_str(cJSON_GetArrayItem(r.messages, 4), "tool_call_id", "c1");
    /* a missing content beside tool_calls becomes null */
    expect_null(cJSON_GetArrayItem(r.messages, 5), "content");
    const cJSON *m6 = cJSON_GetArrayItem(r.messages, 6);
    expect_str(m6, "content", "solo");
    expect_num(m6, "extra", 7);
    ck_assert(cJSON_IsObject(r.template_kwargs));
    ck_assert(cJSON_IsFalse(get(r.template_kwargs, "enable_thinking")));
    ferry_api_request_free(&r);

    /* chat_template_kwargs null; content with every escape */
    parse_ok(CHAT,
             "{\"messages\":[{\"role\":\"user\",\"content\":\"tab\\there \\u00e9\"}],"
             "\"chat_template_kwargs\":null}",
             &r);
    expect_str(cJSON_GetArrayItem(r.messages, 0), "content", "tab\there \xc3\xa9");
    ck_assert_ptr_null(r.template_kwargs);
    ferry_api_request_free(&r);
}
END_TEST

START_TEST(test_api_chat_rejections)
{
    static const struct {
        const char *body, *code, *param;
    } cases[] = {
        {"{}", "missing_required_parameter", "messages"},
        {"{\"messages\":null}", "missing_required_parameter", "messages"},
        {"{\"prompt\":\"x\"}", "missing_required_parameter", "messages"},
        {"{\"messages\":[]}", "empty_array", "messages"},
        {"{\"messages\":{}}", "invalid_type", "messages"},
        {"{\"messages\":\"hi\"}", "invalid_type", "messages"},
        {"{\"messages\":[\"hi\"]}", "invalid_type", "messages[0]"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},null]}", "invalid_type",
         "messages[1]"},
        {"{\"messages\":[{\"content\":\"a\"}]}", "missing_required_parameter", "messages[0].role"},
        {"{\"messages\":[{\"role\":null,\"content\":\"a\"}]}", "missing_required_parameter",
         "messages[0].role"},
        {"{\"messages\":[{\"role\":1,\"content\":\"a\"}]}", "invalid_type", "messages[0].role"},
        {"{\"messages\":[{\"role\":\"User\",\"content\":\"a\"}]}", "invalid_value",
         "messages[0].role"},
        {"{\"messages\":[{\"role\":\"function\",\"content\":\"a\"}]}", "invalid_value",
         "messages[0].role"},
        {"{\"messages\":[{\"role\":\"user\"}]}", "missing_required_parameter",
         "messages[0].content"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":null}]}", "missing_required_parameter",
         "messages[0].content"},
        {"{\"messages\":[{\"role\":\"assistant\",\"content\":null}]}", "missing_required_parameter",
         "messages[0].content"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":null,\"tool_calls\":[]}]}",
         "missing_required_parameter", "messages[0].content"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":5}]}", "invalid_type",
         "messages[0].content"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":{\"type\":\"text\"}}]}", "invalid_type",
         "messages[0].content"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":[]}]}", "empty_array",
         "messages[0].content"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":[\"text\"]}]}", "invalid_type",
         "messages[0].content[0]"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":[{\"text\":\"a\"}]}]}",
         "missing_required_parameter", "messages[0].content[0].type"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":3}]}]}", "invalid_type",
         "messages[0].content[0].type"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\"}]}]}",
         "missing_required_parameter", "messages[0].content[0].text"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":[]}]}]}",
         "invalid_type", "messages[0].content[0].text"},
        {"{\"messages\":[{\"role\":\"system\",\"content\":\"s\"},{\"role\":\"user\","
         "\"content\":[{\"type\":\"text\",\"text\":\"look\"},{\"type\":\"image_url\","
         "\"image_url\":{\"url\":\"http://x/y.png\"}}]}]}",
         "unsupported_parameter", "messages[1].content[1].type"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"input_audio\","
         "\"input_audio\":{}}]}]}",
         "unsupported_parameter", "messages[0].content[0].type"},
        {"{\"messages\":[{\"role\":\"assistant\",\"content\":[{\"type\":\"refusal\","
         "\"refusal\":\"no\"}]}]}",
         "unsupported_parameter", "messages[0].content[0].type"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":\"a\",\"name\":5}]}", "invalid_type",
         "messages[0].name"},
        {"{\"messages\":[{\"role\":\"tool\",\"content\":\"a\",\"tool_call_id\":5}]}",
         "invalid_type", "messages[0].tool_call_id"},
        {"{\"messages\":[{\"role\":\"assistant\",\"content\":\"a\",\"tool_calls\":{}}]}",
         "invalid_type", "messages[0].tool_calls"},
    };
    for (int32_t i = 0; i < N_OF(cases); i++)
        expect_err(CHAT, cases[i].body, cases[i].code, cases[i].param);
}
END_TEST

/* ---- malformed bodies ----------------------------------------------------------------- */

START_TEST(test_api_malformed_bodies)
{
    static const char *invalid[] = {
        "",
        "   \n\t ",
        "{",
        "{\"prompt\":",
        "{\"prompt\": }",
        "{\"prompt\":\"x\",}",
        "{\"prompt\":\"x\"} x",
        "{\"prompt\":\"x\"}{}",
        "{'prompt':'x'}",
        "{\"prompt\":\"unterminated}",
        "{\"prompt\":\"x\",\"temperature\":NaN}",
        "{\"prompt\":\"x\",\"temperature\":Infinity}",
        "{\"prompt\":\"x\",\"temperature\":-Infinity}",
        "{\"prompt\":\"x\",\"max_tokens\":0x10}",
        "{\"prompt\":\"bad \\q escape\"}",
        "{\"prompt\":\"lone \\ud800 surrogate\"}",
        "{\"prompt\":\"lone \\udc00 low\"}",
        "{\"prompt\":\"\xff\"}",
        "{\"prompt\":\"\xc0\xaf\"}",         /* overlong '/' */
        "{\"prompt\":\"\xed\xa0\x80\"}",     /* a surrogate in UTF-8 */
        "{\"prompt\":\"\xf4\x90\x80\x80\"}", /* above U+10FFFF */
        "{\"prompt\":\"\xe2\x82\"}",         /* truncated sequence */
        "{\"prompt\":\"x\"}\xe2\x82",        /* truncated at the end */
    };
    for (int32_t i = 0; i < N_OF(invalid); i++)
        expect_err(COMPL, invalid[i], "invalid_json", "");

    /* a NUL byte inside the body */
    static const char with_nul[] = "{\"prompt\":\"a\0b\"}";
    expect_err_len(COMPL, with_nul, sizeof(with_nul) - 1, 400, "invalid_json", "");

    /* valid JSON that is not an object */
    static const char *not_object[] = {"[]",  "[{\"prompt\":\"x\"}]", "\"prompt\"", "1", "null",
                                       "true"};
    for (int32_t i = 0; i < N_OF(not_object); i++) {
        expect_err(COMPL, not_object[i], "invalid_type", "");
        expect_err(CHAT, not_object[i], "invalid_type", "");
    }

    /* where the error is */
    ferry_api_request r;
    ferry_api_error e;
    const char *b = "{\"prompt\": \"x\", \"max_tokens\": ?}";
    ck_assert_int_eq(parse_len(COMPL, b, strlen(b), &r, &e), 400);
    ck_assert_msg(strstr(e.message, "byte 30") != NULL, "%s", e.message);
    b = "{\"prompt\":\"x\"}  ]";
    ck_assert_int_eq(parse_len(COMPL, b, strlen(b), &r, &e), 400);
    ck_assert_msg(strstr(e.message, "byte 16") != NULL, "%s", e.message);
    b = "{\"prompt\":\"\xff\"}";
    ck_assert_int_eq(parse_len(COMPL, b, strlen(b), &r, &e), 400);
    ck_assert_msg(strstr(e.message, "UTF-8") && strstr(e.message, "byte 11"), "%s", e.message);

    /* surrounding whitespace and a BOM-less body with CRLF are fine */
    parse_ok(COMPL, " \r\n{\"prompt\" : \"x\"}\r\n ", &r);
    ferry_api_request_free(&r);

    /* NULL body, NULL request, unknown kind */
    ck_assert_int_eq(ferry_api_parse(COMPL, NULL, 0, &r, &e), 400);
    ck_assert_str_eq(e.code, "invalid_json");
    ck_assert_int_eq(ferry_api_parse(COMPL, "{}", 2, NULL, &e), 500);
    ck_assert_int_eq(ferry_api_parse((ferry_api_kind)7, "{}", 2, &r, &e), 500);
    ck_assert_int_eq(ferry_api_parse(COMPL, "{}", 2, &r, NULL), 400); /* no error record */
}
END_TEST

/* Every proper prefix of a valid body is malformed JSON; the whole one parses. */
START_TEST(test_api_truncated_bodies)
{
    static const char *bodies[] = {
        "{\"model\":\"m\",\"prompt\":[[1,2,3]],\"max_tokens\":5,\"stop\":[\"\\n\",\"\xc3\xa9\"],"
        "\"temperature\":0.5,\"stream\":true,\"stream_options\":{\"include_usage\":true}}",
        "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"h\\u00e9\"}"
        "]}],\"seed\":-3,\"chat_template_kwargs\":{\"a\":[true,null]}}",
    };
    for (int k = 0; k < 2; k++) {
        ferry_api_kind kind = k ? CHAT : COMPL;
        size_t n = strlen(bodies[k]);
        for (size_t len = 0; len < n; len++)
            expect_err_len(kind, bodies[k], len, 400, "invalid_json", "");
        ferry_api_request r;
        parse_ok(kind, bodies[k], &r);
        ferry_api_request_free(&r);
    }
}
END_TEST

/* Random bytes flipped in valid bodies: never a crash or a leak; 0 or 400. */
START_TEST(test_api_mutated_bodies)
{
    static const char *bodies[] = {
        "{\"model\":\"m\",\"prompt\":[1,2,3],\"max_tokens\":5,\"stop\":[\"a\",\"bc\"],"
        "\"top_k\":3,\"seed\":7}",
        "{\"messages\":[{\"role\":\"system\",\"content\":\"s\"},{\"role\":\"user\",\"content\":"
        "[{\"type\":\"text\",\"text\":\"x\"}]}],\"stream\":true,\"stream_options\":"
        "{\"include_usage\":true},\"chat_template_kwargs\":{}}",
    };
    static const char alphabet[] = "{}[]\",:0123456789.-eEtrufalsn \\\x01\x80\xc3\xa9";
    uint64_t rng = 1234;
    char buf[512];
    int n_ok = 0, n_bad = 0;
    for (int iter = 0; iter < 20000; iter++) {
        int k = (int)(tu_rand_u64(&rng) % 2);
        size_t n = strlen(bodies[k]);
        memcpy(buf, bodies[k], n);
        int flips = 1 + (int)(tu_rand_u64(&rng) % 3);
        for (int f = 0; f < flips; f++)
            buf[tu_rand_u64(&rng) % n] = alphabet[tu_rand_u64(&rng) % (sizeof(alphabet) - 1)];
        ferry_api_request r;
        ferry_api_error e;
        int st = parse_len(k ? CHAT : COMPL, buf, n, &r, &e);
        ck_assert_msg(st == 0 || st == 400, "status %d: %s", st, e.message);
        if (st == 0)
            n_ok++;
        else
            n_bad++;
        ferry_api_request_free(&r);
    }
    ck_assert_int_gt(n_ok, 100);
    ck_assert_int_gt(n_bad, 100);
}
END_TEST

/* Nesting past cJSON's limit is a 400, not a crash; under it, an unknown field is fine. */
START_TEST(test_api_deep_nesting)
{
    static const int depths[] = {CJSON_NESTING_LIMIT + 1, 100000, 1000000};
    for (int32_t d = 0; d < N_OF(depths); d++) {
        int depth = depths[d];
        size_t cap = (size_t)depth * 2 + 64;
        char *b = malloc(cap);
        ck_assert_ptr_nonnull(b);
        size_t n = (size_t)snprintf(b, cap, "{\"prompt\":\"x\",\"deep\":");
        for (int i = 0; i < depth; i++)
            b[n++] = '[';
        /* unterminated too: cJSON must stop at the limit, not walk on */
        expect_err_len(COMPL, b, n, 400, "invalid_json", "");
        for (int i = 0; i < depth; i++)
            b[n++] = ']';
        b[n++] = '}';
        ferry_api_request r;
        ferry_api_error e;
        ck_assert_int_eq(parse_len(COMPL, b, n, &r, &e), 400);
        ck_assert_str_eq(e.code, "invalid_json");
        ck_assert_msg(strstr(e.message, "nested deeper than 1000") != NULL, "%s", e.message);
        free(b);
    }
    /* objects too: {"a":{"a":...}} */
    char *o = malloc(2000 * 6 + 2001 + 64);
    ck_assert_ptr_nonnull(o);
    size_t on = (size_t)sprintf(o, "{\"prompt\":\"x\",\"deep\":");
    for (int i = 0; i < 2000; i++)
        on += (size_t)sprintf(o + on, "{\"a\":");
    o[on++] = '1';
    for (int i = 0; i < 2001; i++)
        o[on++] = '}';
    expect_err_len(COMPL, o, on, 400, "invalid_json", "");
    free(o);
    /* 999 arrays inside the body object: 1000 levels, cJSON's limit, accepted */
    char b[4096];
    size_t n = (size_t)snprintf(b, sizeof(b), "{\"prompt\":\"x\",\"deep\":");
    for (int i = 0; i < CJSON_NESTING_LIMIT - 1; i++)
        b[n++] = '[';
    for (int i = 0; i < CJSON_NESTING_LIMIT - 1; i++)
        b[n++] = ']';
    b[n++] = '}';
    b[n] = '\0';
    ferry_api_request r;
    parse_ok(COMPL, b, &r);
    ferry_api_request_free(&r);
}
END_TEST

/* ---- response bodies -------------------------------------------------------------------- */

START_TEST(test_api_error_json)
{
    ferry_api_error e;
    ck_assert_int_eq(ferry_api_error_set(&e, 400, "invalid_request_error", "invalid_type",
                                         "max_tokens", "'%s' must be %s", "max_tokens",
                                         "an \"integer\"\n"),
                     400);
    char *s = ferry_api_error_json(&e);
    cJSON *j = parse_json(s);
    ck_assert_int_eq(n_members(j), 1);
    const cJSON *err = get(j, "error");
    ck_assert_int_eq(n_members(err), 4);
    expect_str(err, "message", "'max_tokens' must be an \"integer\"\n");
    expect_str(err, "type", "invalid_request_error");
    expect_str(err, "param", "max_tokens");
    expect_str(err, "code", "invalid_type");
    cJSON_Delete(j);
    free(s);

    /* empty param and code are null */
    ck_assert_int_eq(
        ferry_api_error_set(&e, 401, "authentication_error", NULL, "", "Invalid API key."), 401);
    s = ferry_api_error_json(&e);
    j = parse_json(s);
    err = get(j, "error");
    expect_str(err, "message", "Invalid API key.");
    expect_str(err, "type", "authentication_error");
    expect_null(err, "param");
    expect_null(err, "code");
    cJSON_Delete(j);
    free(s);

    /* long inputs are truncated, not overflowed */
    char big[2000];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    ferry_api_error_set(&e, 503, big, big, big, "%s", big);
    ck_assert_uint_eq(strlen(e.type), sizeof(e.type) - 1);
    ck_assert_uint_eq(strlen(e.code), sizeof(e.code) - 1);
    ck_assert_uint_eq(strlen(e.param), sizeof(e.param) - 1);
    ck_assert_uint_eq(strlen(e.message), sizeof(e.message) - 1);
    ck_assert_int_eq(e.status, 503);
    ck_assert_int_eq(ferry_api_error_set(NULL, 429, "x", "", "", "y"), 429);

    /* a parse error round-trips with its fields */
    ferry_api_request r;
    ck_assert_int_eq(ferry_api_parse(COMPL, "{\"prompt\":1}", 12, &r, &e), 400);
    s = ferry_api_error_json(&e);
    j = parse_json(s);
    err = get(j, "error");
    expect_str(err, "param", "prompt");
    expect_str(err, "code", "invalid_type");
    expect_str(err, "type", "invalid_request_error");
    cJSON_Delete(j);
    free(s);
}
END_TEST

static void check_usage(const cJSON *u, double p, double c)
{
    ck_assert_int_eq(n_members(u), 3);
    expect_num(u, "prompt_tokens", p);
    expect_num(u, "completion_tokens", c);
    expect_num(u, "total_tokens", p + c);
}

START_TEST(test_api_response_json)
{
    const char *text = "Hi \"you\"\n\t\\ caf\xc3\xa9 \xf0\x9f\x98\x80";
    char *s = ferry_api_response_json(COMPL, "cmpl-1", "tiny", 1700000000, text, strlen(text),
                                      "stop", 5, 7);
    cJSON *j = parse_json(s);
    ck_assert_int_eq(n_members(j), 6);
    expect_str(j, "id", "cmpl-1");
    expect_str(j, "object", "text_completion");
    expect_num(j, "created", 1700000000);
    expect_str(j, "model", "tiny");
    const cJSON *ch = get(j, "choices");
    ck_assert_int_eq(cJSON_GetArraySize(ch), 1);
    const cJSON *c0 = cJSON_GetArrayItem(ch, 0);
    ck_assert_int_eq(n_members(c0), 4);
    expect_num(c0, "index", 0);
    expect_str(c0, "text", text);
    expect_null(c0, "logprobs");
    expect_str(c0, "finish_reason", "stop");
    check_usage(get(j, "usage"), 5, 7);
    cJSON_Delete(j);
    free(s);

    s = ferry_api_response_json(CHAT, "chatcmpl-9", "m/x", 1, text, strlen(text), "length",
                                2147483647, 2147483647);
    j = parse_json(s);
    ck_assert_int_eq(n_members(j), 6);
    expect_str(j, "object", "chat.completion");
    expect_str(j, "id", "chatcmpl-9");
    expect_str(j, "model", "m/x");
    c0 = cJSON_GetArrayItem(get(j, "choices"), 0);
    ck_assert_int_eq(n_members(c0), 4);
    expect_num(c0, "index", 0);
    const cJSON *msg = get(c0, "message");
    ck_assert_int_eq(n_members(msg), 2);
    expect_str(msg, "role", "assistant");
    expect_str(msg, "content", text);
    expect_null(c0, "logprobs");
    expect_str(c0, "finish_reason", "length");
    check_usage(get(j, "usage"), 2147483647.0, 2147483647.0); /* no int32 overflow */
    cJSON_Delete(j);
    free(s);

    /* empty text (NULL), no finish reason */
    s = ferry_api_response_json(CHAT, "i", "m", 0, NULL, 0, NULL, 0, 0);
    j = parse_json(s);
    c0 = cJSON_GetArrayItem(get(j, "choices"), 0);
    expect_str(get(c0, "message"), "content", "");
    expect_null(c0, "finish_reason");
    cJSON_Delete(j);
    free(s);
}
END_TEST

/* Any byte string becomes valid JSON: control characters escaped (NUL included), malformed
 * UTF-8 replaced by U+FFFD, well-formed UTF-8 kept. */
START_TEST(test_api_text_escaping)
{
    static const char raw[] = "a\0b\x01\x1f\x7f\"\\/\b\f\r\n\t\xff\xc3\xa9\xc3\xe2\x82\xac\xed\xa0"
                              "\x80z\xf0\x9f";
    size_t n = sizeof(raw) - 1;
    char *s = ferry_api_response_json(COMPL, "i", "m", 0, raw, n, "stop", 1, 1);
    ck_assert_ptr_nonnull(s);
    ck_assert_msg(strstr(s, "\"text\":\"a\\u0000b\\u0001\\u001f\x7f\\\"\\\\/\\b\\f\\r\\n\\t"
                            "\xef\xbf\xbd\xc3\xa9\xef\xbf\xbd\xe2\x82\xac\xef\xbf\xbd\xef\xbf\xbd"
                            "\xef\xbf\xbdz\xef\xbf\xbd\xef\xbf\xbd\"") != NULL,
                  "%s", s);
    /* the whole body is well-formed UTF-8 and parses */
    for (size_t i = 0, len = strlen(s); i < len;) {
        int32_t k = ferry_utf8_seq(s + i, len - i);
        ck_assert_msg(k > 0, "malformed UTF-8 at %zu", i);
        i += (size_t)k;
    }
    cJSON *j = parse_json(s);
    cJSON_Delete(j);
    free(s);

    /* id and model are escaped too */
    s = ferry_api_models_json("we\"ird\n", 5);
    j = parse_json(s);
    expect_str(cJSON_GetArrayItem(get(j, "data"), 0), "id", "we\"ird\n");
    cJSON_Delete(j);
    free(s);

    /* a long text */
    size_t big = 1 << 20;
    char *t = malloc(big);
    ck_assert_ptr_nonnull(t);
    for (size_t i = 0; i < big; i++)
        t[i] = (char)('a' + i % 26);
    t[big - 1] = '\n';
    s = ferry_api_chunk_json(CHAT, "i", "m", 0, t, big, 0, NULL, 0);
    j = parse_json(s);
    const cJSON *d = get(cJSON_GetArrayItem(get(j, "choices"), 0), "delta");
    ck_assert_uint_eq(strlen(get(d, "content")->valuestring), big);
    cJSON_Delete(j);
    free(s);
    free(t);
}
END_TEST

static const cJSON *chunk_choice(const cJSON *j)
{
    const cJSON *ch = get(j, "choices");
    ck_assert_int_eq(cJSON_GetArraySize(ch), 1);
    const cJSON *c0 = cJSON_GetArrayItem(ch, 0);
    ck_assert_int_eq(n_members(c0), 4);
    expect_num(c0, "index", 0);
    expect_null(c0, "logprobs");
    return c0;
}

START_TEST(test_api_chunk_json)
{
    /* completions: text, then the finish reason */
    for (int usage = 0; usage < 2; usage++) {
        char *s = ferry_api_chunk_json(COMPL, "cmpl-2", "tiny", 77, "Hel", 3, 1, NULL, usage);
        cJSON *j = parse_json(s);
        ck_assert_int_eq(n_members(j), 5 + usage);
        expect_str(j, "id", "cmpl-2");
        expect_str(j, "object", "text_completion");
        expect_num(j, "created", 77);
        expect_str(j, "model", "tiny");
        const cJSON *c0 = chunk_choice(j);
        expect_str(c0, "text", "Hel");
        expect_null(c0, "finish_reason");
        if (usage)
            expect_null(j, "usage");
        else
            ck_assert_ptr_null(cJSON_GetObjectItemCaseSensitive(j, "usage"));
        cJSON_Delete(j);
        free(s);

        s = ferry_api_chunk_json(COMPL, "cmpl-2", "tiny", 77, "", 0, 0, "length", usage);
        j = parse_json(s);
        c0 = chunk_choice(j);
        expect_str(c0, "text", "");
        expect_str(c0, "finish_reason", "length");
        cJSON_Delete(j);
        free(s);
    }

    /* chat: the role first, then content deltas, then {} with the finish reason */
    for (int usage = 0; usage < 2; usage++) {
        char *s = ferry_api_chunk_json(CHAT, "chatcmpl-3", "tiny", 78, NULL, 0, 1, NULL, usage);
        cJSON *j = parse_json(s);
        ck_assert_int_eq(n_members(j), 5 + usage);
        expect_str(j, "object", "chat.completion.chunk");
        expect_str(j, "id", "chatcmpl-3");
        expect_num(j, "created", 78);
        if (usage)
            expect_null(j, "usage");
        const cJSON *c0 = chunk_choice(j);
        const cJSON *d = get(c0, "delta");
        ck_assert_int_eq(n_members(d), 2);
        expect_str(d, "role", "assistant");
        expect_str(d, "content", "");
        expect_null(c0, "finish_reason");
        cJSON_Delete(j);
        free(s);

        s = ferry_api_chunk_json(CHAT, "chatcmpl-3", "tiny", 78, "lo\n", 3, 0, NULL, usage);
        j = parse_json(s);
        c0 = chunk_choice(j);
        d = get(c0, "delta");
        ck_assert_int_eq(n_members(d), 1);
        expect_str(d, "content", "lo\n");
        expect_null(c0, "finish_reason");
        cJSON_Delete(j);
        free(s);

        s = ferry_api_chunk_json(CHAT, "chatcmpl-3", "tiny", 78, NULL, 0, 0, "stop", usage);
        j = parse_json(s);
        c0 = chunk_choice(j);
        d = get(c0, "delta");
        ck_assert(cJSON_IsObject(d));
        ck_assert_int_eq(n_members(d), 0);
        expect_str(c0, "finish_reason", "stop");
        cJSON_Delete(j);
        free(s);
    }

    /* the last text may travel with the finish reason; the first chunk may carry text */
    char *s = ferry_api_chunk_json(CHAT, "c", "m", 1, "end", 3, 0, "length", 0);
    cJSON *j = parse_json(s);
    const cJSON *c0 = chunk_choice(j);
    expect_str(get(c0, "delta"), "content", "end");
    expect_str(c0, "finish_reason", "length");
    cJSON_Delete(j);
    free(s);
    s = ferry_api_chunk_json(CHAT, "c", "m", 1, "Hi", 2, 1, NULL, 0);
    j = parse_json(s);
    const cJSON *d = get(chunk_choice(j), "delta");
    ck_assert_int_eq(n_members(d), 2);
    expect_str(d, "role", "assistant");
    expect_str(d, "content", "Hi");
    cJSON_Delete(j);
    free(s);

    /* the usage chunk: no choices */
    for (int k = 0; k < 2; k++) {
        s = ferry_api_usage_chunk_json(k ? CHAT : COMPL, "u-1", "tiny", 79, 11, 4);
        j = parse_json(s);
        ck_assert_int_eq(n_members(j), 6);
        expect_str(j, "id", "u-1");
        expect_str(j, "object", k ? "chat.completion.chunk" : "text_completion");
        expect_num(j, "created", 79);
        expect_str(j, "model", "tiny");
        const cJSON *ch = get(j, "choices");
        ck_assert(cJSON_IsArray(ch));
        ck_assert_int_eq(cJSON_GetArraySize(ch), 0);
        check_usage(get(j, "usage"), 11, 4);
        cJSON_Delete(j);
        free(s);
    }
}
END_TEST

START_TEST(test_api_models_json)
{
    char *s = ferry_api_models_json("tiny-moe", 1700000001);
    cJSON *j = parse_json(s);
    ck_assert_int_eq(n_members(j), 2);
    expect_str(j, "object", "list");
    const cJSON *data = get(j, "data");
    ck_assert_int_eq(cJSON_GetArraySize(data), 1);
    const cJSON *m = cJSON_GetArrayItem(data, 0);
    ck_assert_int_eq(n_members(m), 4);
    expect_str(m, "id", "tiny-moe");
    expect_str(m, "object", "model");
    expect_num(m, "created", 1700000001);
    expect_str(m, "owned_by", "ferry");
    cJSON_Delete(j);
    free(s);
}
END_TEST

/* ---- stop strings ----------------------------------------------------------------------- */

/* Feeds pieces one by one; returns everything handed out (feeds, then a flush when
 * flush is set) in a static buffer, and each feed's count in lens. */
typedef struct {
    char out[4096];
    size_t n_out;
    size_t lens[64];
    int stopped;
    int32_t stop_index;
} run_result;

static void run_pieces(const char *const *stops, int32_t n_stops, const char *const *pieces,
                       int32_t n_pieces, int flush, run_result *res)
{
    ferry_stop *m = NULL;
    ck_assert_int_eq(ferry_stop_create(stops, n_stops, 1, &m), FERRY_OK);
    memset(res, 0, sizeof(*res));
    ferry_stop_result r;
    for (int32_t i = 0; i < n_pieces; i++) {
        ck_assert_int_eq(ferry_stop_feed(m, pieces[i], strlen(pieces[i]), &r), FERRY_OK);
        memcpy(res->out + res->n_out, r.text, r.len);
        res->n_out += r.len;
        res->lens[i] = r.len;
    }
    if (flush) {
        ck_assert_int_eq(ferry_stop_flush(m, &r), FERRY_OK);
        memcpy(res->out + res->n_out, r.text, r.len);
        res->n_out += r.len;
    }
    res->stopped = r.stopped;
    res->stop_index = r.stop_index;
    size_t tl;
    const char *t = ferry_stop_text(m, &tl);
    ck_assert_uint_eq(tl, res->n_out);
    ck_assert(tl == 0 || memcmp(t, res->out, tl) == 0);
    res->out[res->n_out] = '\0';
    ferry_stop_destroy(m);
}

START_TEST(test_stop_across_pieces)
{
    static const char *stops[] = {"STOP"};
    static const char *pieces[] = {"Hel", "lo ST", "O", "P and more", "ignored"};
    run_result res;
    run_pieces(stops, 1, pieces, 5, 0, &res);
    ck_assert_str_eq(res.out, "Hello ");
    ck_assert_uint_eq(res.lens[0], 3);
    ck_assert_uint_eq(res.lens[1], 3); /* "ST" held */
    ck_assert_uint_eq(res.lens[2], 0); /* "STO" held */
    ck_assert_uint_eq(res.lens[3], 0); /* stop: nothing more */
    ck_assert_uint_eq(res.lens[4], 0);
    ck_assert_int_eq(res.stopped, 1);
    ck_assert_int_eq(res.stop_index, 0);

    /* in one piece, with text after it */
    static const char *one[] = {"Hello STOP world STOP"};
    run_pieces(stops, 1, one, 1, 1, &res);
    ck_assert_str_eq(res.out, "Hello ");
    ck_assert_int_eq(res.stopped, 1);

    /* a false start is released as soon as it cannot match */
    static const char *false_start[] = {"a ST", "X b", "S"};
    run_pieces(stops, 1, false_start, 3, 0, &res);
    ck_assert_str_eq(res.out, "a STX b");
    ck_assert_uint_eq(res.lens[0], 2);
    ck_assert_uint_eq(res.lens[1], 5);
    ck_assert_uint_eq(res.lens[2], 0);
    ck_assert_int_eq(res.stopped, 0);
    ck_assert_int_eq(res.stop_index, -1);
    run_pieces(stops, 1, false_start, 3, 1, &res); /* flush releases "S" */
    ck_assert_str_eq(res.out, "a STX bS");
    ck_assert_int_eq(res.stopped, 0);

    /* a byte at a time */
    static const char *bytes[] = {"x", "S", "T", "O", "P"};
    run_pieces(stops, 1, bytes, 5, 1, &res);
    ck_assert_str_eq(res.out, "x");
    ck_assert_int_eq(res.stopped, 1);
}
END_TEST

START_TEST(test_stop_overlapping)
{
    run_result res;
    /* the held-back tail is the longest suffix that can still grow into a stop */
    static const char *aab[] = {"aab"};
    static const char *a3b[] = {"a", "a", "a", "b"};
    run_pieces(aab, 1, a3b, 4, 0, &res);
    ck_assert_str_eq(res.out, "a");
    ck_assert_uint_eq(res.lens[0], 0);
    ck_assert_uint_eq(res.lens[1], 0);
    ck_assert_uint_eq(res.lens[2], 1); /* "aaa": only "aa" can still start "aab" */
    ck_assert_int_eq(res.stopped, 1);

    /* the earliest occurrence wins, whichever string it is */
    static const char *two[] = {"abcd", "bce"};
    static const char *abce[] = {"abc", "e"};
    run_pieces(two, 2, abce, 2, 0, &res);
    ck_assert_str_eq(res.out, "a");
    ck_assert_uint_eq(res.lens[0], 0); /* "abc" may become "abcd" */
    ck_assert_int_eq(res.stop_index, 1);

    static const char *xs[] = {"x", "yx"};
    static const char *yx[] = {"ayx"};
    run_pieces(xs, 2, yx, 1, 0, &res);
    ck_assert_str_eq(res.out, "a");
    ck_assert_int_eq(res.stop_index, 1); /* "yx" starts before "x" */

    /* a longer string starting earlier, completed in the same piece as a shorter one */
    static const char *long_short[] = {"c", "abcd"};
    static const char *abcd[] = {"zab", "cd"};
    run_pieces(long_short, 2, abcd, 2, 0, &res);
    ck_assert_str_eq(res.out, "z");
    ck_assert_int_eq(res.stop_index, 1);

    /* a complete short one ends generation before a longer one could complete */
    static const char *abx[] = {"zab", "cx"};
    run_pieces(long_short, 2, abx, 2, 0, &res);
    ck_assert_str_eq(res.out, "zab");
    ck_assert_int_eq(res.stop_index, 0);

    /* two starting at the same place: the cut is the same, the first listed is named */
    static const char *same[] = {"ab", "abc"};
    static const char *abc[] = {"xabc"};
    run_pieces(same, 2, abc, 1, 0, &res);
    ck_assert_str_eq(res.out, "x");
    ck_assert_int_eq(res.stop_index, 0);

    /* a stop string that is the suffix of a held-back one */
    static const char *nested[] = {"hello", "ll"};
    static const char *hel[] = {"hel", "l"};
    run_pieces(nested, 2, hel, 2, 0, &res);
    ck_assert_str_eq(res.out, "he");
    ck_assert_int_eq(res.stop_index, 1);
}
END_TEST

START_TEST(test_stop_at_start)
{
    static const char *stops[] = {"\n\n", "###"};
    static const char *pieces[] = {"###", " more", "text"};
    run_result res;
    run_pieces(stops, 2, pieces, 3, 1, &res);
    ck_assert_uint_eq(res.n_out, 0);
    ck_assert_int_eq(res.stopped, 1);
    ck_assert_int_eq(res.stop_index, 1);
    static const char *split[] = {"\n", "\n"};
    run_pieces(stops, 2, split, 2, 1, &res);
    ck_assert_uint_eq(res.n_out, 0);
    ck_assert_int_eq(res.stop_index, 0);
    /* the whole stop string in the first piece of several */
    static const char *first[] = {"\n\nabc"};
    run_pieces(stops, 2, first, 1, 1, &res);
    ck_assert_uint_eq(res.n_out, 0);
    ck_assert_int_eq(res.stopped, 1);
}
END_TEST

START_TEST(test_stop_utf8_holdback)
{
    run_result res;
    /* no stop strings: only incomplete characters are held */
    static const char *emoji[] = {"a\xf0", "\x9f", "\x98", "\x80\x62"}; /* \x62: 'b' */
    run_pieces(NULL, 0, emoji, 4, 0, &res);
    ck_assert_str_eq(res.out, "a\xf0\x9f\x98\x80\x62");
    ck_assert_uint_eq(res.lens[0], 1);
    ck_assert_uint_eq(res.lens[1], 0);
    ck_assert_uint_eq(res.lens[2], 0);
    ck_assert_uint_eq(res.lens[3], 5);

    /* flush releases an incomplete tail */
    static const char *cut[] = {"x\xe2\x82"};
    run_pieces(NULL, 0, cut, 1, 0, &res);
    ck_assert_str_eq(res.out, "x");
    run_pieces(NULL, 0, cut, 1, 1, &res);
    ck_assert_str_eq(res.out, "x\xe2\x82");

    /* malformed bytes are not held (they can never complete) */
    static const char *junk[] = {"\xff", "\x80", "\xe2\x28", "\xc0"};
    run_pieces(NULL, 0, junk, 4, 0, &res);
    ck_assert_uint_eq(res.lens[0], 1);
    ck_assert_uint_eq(res.lens[1], 1);
    ck_assert_uint_eq(res.lens[2], 2);
    ck_assert_uint_eq(res.lens[3], 1);

    /* with a multi-byte stop string */
    static const char *accent[] = {"\xc3\xa9"};
    static const char *cafe[] = {"caf\xc3", "\xa9!"};
    run_pieces(accent, 1, cafe, 2, 0, &res);
    ck_assert_str_eq(res.out, "caf");
    ck_assert_uint_eq(res.lens[0], 3);
    ck_assert_int_eq(res.stopped, 1);
    static const char *other[] = {"caf\xc3", "\xa8!"}; /* U+00E8: not the stop */
    run_pieces(accent, 1, other, 2, 0, &res);
    ck_assert_str_eq(res.out, "caf\xc3\xa8!");
    ck_assert_uint_eq(res.lens[1], 3);

    /* a stop prefix and an incomplete character: the earlier start is held */
    static const char *stop_e[] = {"e\xcc\x81"}; /* e + combining acute */
    static const char *e_part[] = {"ok e\xcc"};
    run_pieces(stop_e, 1, e_part, 1, 0, &res);
    ck_assert_str_eq(res.out, "ok ");
}
END_TEST

START_TEST(test_stop_flush_and_reset)
{
    static const char *stops[] = {"END"};
    ferry_stop *m = NULL;
    ck_assert_int_eq(ferry_stop_create(stops, 1, 0, &m), FERRY_OK);
    ferry_stop_result r;
    ck_assert_int_eq(ferry_stop_feed(m, "the EN", 6, &r), FERRY_OK);
    ck_assert_uint_eq(r.len, 4);
    ck_assert_int_eq(memcmp(r.text, "the ", 4), 0);
    ck_assert_int_eq(ferry_stop_flush(m, &r), FERRY_OK);
    ck_assert_uint_eq(r.len, 2);
    ck_assert_int_eq(memcmp(r.text, "EN", 2), 0);
    ck_assert_int_eq(r.stopped, 0);
    ck_assert_int_eq(ferry_stop_flush(m, &r), FERRY_OK); /* again: nothing */
    ck_assert_uint_eq(r.len, 0);
    size_t tl;
    const char *t = ferry_stop_text(m, &tl);
    ck_assert_uint_eq(tl, 6);
    ck_assert_int_eq(memcmp(t, "the EN", 6), 0);

    /* after a reset the next generation starts clean, stop strings kept */
    ferry_stop_reset(m);
    ferry_stop_text(m, &tl);
    ck_assert_uint_eq(tl, 0);
    ck_assert_int_eq(ferry_stop_feed(m, "xEND", 4, &r), FERRY_OK);
    ck_assert_uint_eq(r.len, 1);
    ck_assert_int_eq(r.stopped, 1);
    ck_assert_int_eq(r.stop_index, 0);
    ck_assert_int_eq(ferry_stop_feed(m, "more", 4, &r), FERRY_OK);
    ck_assert_uint_eq(r.len, 0);
    ck_assert_int_eq(r.stopped, 1);
    ck_assert_int_eq(r.stop_index, 0);
    ck_assert_int_eq(ferry_stop_flush(m, &r), FERRY_OK);
    ck_assert_uint_eq(r.len, 0);
    ck_assert_int_eq(r.stopped, 1);
    t = ferry_stop_text(m, &tl);
    ck_assert_uint_eq(tl, 1);
    ck_assert_int_eq(t[0], 'x');
    ferry_stop_reset(m);
    ck_assert_int_eq(ferry_stop_feed(m, NULL, 0, &r), FERRY_OK); /* an empty piece */
    ck_assert_uint_eq(r.len, 0);
    ck_assert_int_eq(r.stopped, 0);
    ck_assert_int_eq(r.stop_index, -1);
    ferry_stop_destroy(m);
    ferry_stop_destroy(NULL);
    ferry_stop_reset(NULL);
}
END_TEST

START_TEST(test_stop_invalid_arguments)
{
    ferry_stop *m = NULL;
    static const char *empty[] = {"a", ""};
    static const char *null_one[] = {"a", NULL};
    ck_assert_int_eq(ferry_stop_create(empty, 2, 0, &m), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_stop_create(null_one, 2, 0, &m), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_stop_create(NULL, 1, 0, &m), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_stop_create(empty, -1, 0, &m), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_stop_create(empty, 1, 0, NULL), FERRY_ERR_INVALID);
    ck_assert_ptr_null(m);
    ck_assert_int_eq(ferry_stop_create(empty, 1, 0, &m), FERRY_OK);
    ferry_stop_result r;
    ck_assert_int_eq(ferry_stop_feed(m, NULL, 3, &r), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_stop_feed(m, "x", 1, NULL), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_stop_feed(NULL, "x", 1, &r), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_stop_flush(NULL, &r), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_stop_flush(m, NULL), FERRY_ERR_INVALID);
    ferry_stop_destroy(m);
}
END_TEST

START_TEST(test_stop_long_text)
{
    /* 1 MiB in pieces of 1..64 bytes from a 1-byte buffer: growth, then a stop at the end */
    static const char *stops[] = {"<|end|>", "<|e"};
    ferry_stop *m = NULL;
    ck_assert_int_eq(ferry_stop_create(stops, 2, 1, &m), FERRY_OK);
    size_t total = 1 << 20;
    char *text = malloc(total + 16);
    ck_assert_ptr_nonnull(text);
    uint64_t rng = 99;
    for (size_t i = 0; i < total; i++)
        text[i] = "<|ed>x"[tu_rand_u64(&rng) % 6];
    /* no "<|e" inside: break up every "<|" followed by "e" */
    for (size_t i = 0; i + 2 < total; i++)
        if (text[i] == '<' && text[i + 1] == '|' && text[i + 2] == 'e')
            text[i + 2] = 'x';
    memcpy(text + total, "<|end|>tail", 11);
    size_t n = total + 11, at = 0, out = 0;
    ferry_stop_result r;
    while (at < n) {
        size_t k = 1 + tu_rand_u64(&rng) % 64;
        if (k > n - at)
            k = n - at;
        ck_assert_int_eq(ferry_stop_feed(m, text + at, k, &r), FERRY_OK);
        ck_assert_int_eq(memcmp(r.text, text + out, r.len), 0);
        out += r.len;
        at += k;
    }
    ck_assert_int_eq(r.stopped, 1);
    ck_assert_uint_eq(out, total);
    free(text);
    ferry_stop_destroy(m);
}
END_TEST

/* The reference: the earliest start of any stop string in t[0..n), or n. */
static size_t ref_first_stop(const char *t, size_t n, char stops[][8], int n_stops)
{
    size_t best = n;
    for (int s = 0; s < n_stops; s++) {
        size_t sl = strlen(stops[s]);
        for (size_t p = 0; p + sl <= n && p < best; p++)
            if (memcmp(t + p, stops[s], sl) == 0) {
                best = p;
                break;
            }
    }
    return best;
}

/* The reference holdback: the smallest p such that t[p..n) is a proper prefix of a stop. */
static size_t ref_safe(const char *t, size_t n, char stops[][8], int n_stops)
{
    for (size_t p = 0; p < n; p++)
        for (int s = 0; s < n_stops; s++)
            if (n - p < strlen(stops[s]) && memcmp(t + p, stops[s], n - p) == 0)
                return p;
    return n;
}

/* Seeded random texts over 2-3 letters, 1-4 stop strings of 1-5 letters, random pieces.
 * Reference: after each piece, if some stop string occurs whole in the text so far, the
 * output ends at the earliest such occurrence (generation stops at that piece); otherwise
 * everything before the shortest held-back suffix has been handed out. */
START_TEST(test_stop_random_vs_reference)
{
    uint64_t rng = 2024;
    int n_stopped = 0;
    for (int iter = 0; iter < 20000; iter++) {
        char stops[4][8];
        const char *ptrs[4];
        int n_stops = 1 + (int)(tu_rand_u64(&rng) % 4);
        int alpha = 2 + (int)(tu_rand_u64(&rng) % 2);
        for (int s = 0; s < n_stops; s++) {
            int sl = 1 + (int)(tu_rand_u64(&rng) % 5);
            for (int i = 0; i < sl; i++)
                stops[s][i] = (char)('a' + tu_rand_u64(&rng) % (uint64_t)alpha);
            stops[s][sl] = '\0';
            ptrs[s] = stops[s];
        }
        char text[64];
        size_t n = tu_rand_u64(&rng) % 40;
        for (size_t i = 0; i < n; i++)
            text[i] = (char)('a' + tu_rand_u64(&rng) % (uint64_t)alpha);
        ferry_stop *m = NULL;
        ck_assert_int_eq(ferry_stop_create(ptrs, n_stops, 4, &m), FERRY_OK);
        size_t at = 0, out = 0, cut = SIZE_MAX;
        ferry_stop_result r = {0};
        while (at < n) {
            size_t k = 1 + tu_rand_u64(&rng) % 6;
            if (k > n - at)
                k = n - at;
            ck_assert_int_eq(ferry_stop_feed(m, text + at, k, &r), FERRY_OK);
            ck_assert_int_eq(memcmp(r.text, text + out, r.len), 0);
            out += r.len;
            at += k;
            if (cut == SIZE_MAX && ref_first_stop(text, at, stops, n_stops) < at)
                cut = ref_first_stop(text, at, stops, n_stops);
            if (cut != SIZE_MAX) {
                ck_assert_msg(r.stopped, "iter %d: a complete stop string was missed", iter);
                ck_assert_msg(out == cut, "iter %d: %zu bytes, want %zu", iter, out, cut);
                size_t sl = strlen(stops[r.stop_index]);
                ck_assert(memcmp(text + cut, stops[r.stop_index], sl) == 0);
            } else {
                size_t want = ref_safe(text, at, stops, n_stops);
                ck_assert_msg(!r.stopped, "iter %d: stopped without a stop string", iter);
                ck_assert_msg(out == want, "iter %d: handed out %zu of %zu, want %zu", iter, out,
                              at, want);
            }
        }
        ck_assert_int_eq(ferry_stop_flush(m, &r), FERRY_OK);
        out += r.len;
        ck_assert_uint_eq(out, cut != SIZE_MAX ? cut : n);
        ck_assert_int_eq(r.stopped, cut != SIZE_MAX);
        n_stopped += r.stopped;
        ferry_stop_destroy(m);
    }
    ck_assert_int_gt(n_stopped, 5000);
    ck_assert_int_lt(n_stopped, 19000);
}
END_TEST

START_TEST(test_utf8_seq)
{
    static const struct {
        const char *s;
        size_t n;
        int32_t want;
    } cases[] = {
        {"", 0, 0},
        {"a", 1, 1},
        {"\x7f", 1, 1},
        {"\xc2\x80", 2, 2},
        {"\xc3\xa9x", 3, 2},
        {"\xc3", 1, 0},
        {"\xc3x", 2, -1},
        {"\xc0\x80", 2, -1},
        {"\xc1\xbf", 2, -1},
        {"\x80", 1, -1},
        {"\xbf", 1, -1},
        {"\xe2\x82\xac", 3, 3},
        {"\xe2\x82", 2, 0},
        {"\xe0\x80\x80", 3, -1},
        {"\xe0\xa0\x80", 3, 3},
        {"\xed\x9f\xbf", 3, 3},
        {"\xed\xa0\x80", 3, -1},
        {"\xef\xbf\xbf", 3, 3},
        {"\xf0\x9f\x98\x80", 4, 4},
        {"\xf0\x9f\x98", 3, 0},
        {"\xf0", 1, 0},
        {"\xf0\x80\x80\x80", 4, -1},
        {"\xf4\x8f\xbf\xbf", 4, 4},
        {"\xf4\x90\x80\x80", 4, -1},
        {"\xf5\x80\x80\x80", 4, -1},
        {"\xff", 1, -1},
    };
    for (int32_t i = 0; i < N_OF(cases); i++)
        ck_assert_msg(ferry_utf8_seq(cases[i].s, cases[i].n) == cases[i].want,
                      "case %d: got %d, want %d", (int)i,
                      (int)ferry_utf8_seq(cases[i].s, cases[i].n), (int)cases[i].want);
}
END_TEST

static Suite *serve_api_suite(void)
{
    Suite *s = suite_create("serve_api");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_api_completions_defaults);
    tcase_add_test(tc, test_api_prompt_forms);
    tcase_add_test(tc, test_api_prompt_rejections);
    tcase_add_test(tc, test_api_sampling_accepted);
    tcase_add_test(tc, test_api_sampling_rejections);
    tcase_add_test(tc, test_api_stop_field);
    tcase_add_test(tc, test_api_unsupported);
    tcase_add_test(tc, test_api_chat_messages);
    tcase_add_test(tc, test_api_chat_rejections);
    tcase_add_test(tc, test_api_malformed_bodies);
    tcase_add_test(tc, test_api_truncated_bodies);
    tcase_add_test(tc, test_api_mutated_bodies);
    tcase_add_test(tc, test_api_deep_nesting);
    tcase_add_test(tc, test_api_error_json);
    tcase_add_test(tc, test_api_response_json);
    tcase_add_test(tc, test_api_text_escaping);
    tcase_add_test(tc, test_api_chunk_json);
    tcase_add_test(tc, test_api_models_json);
    tcase_add_test(tc, test_stop_across_pieces);
    tcase_add_test(tc, test_stop_overlapping);
    tcase_add_test(tc, test_stop_at_start);
    tcase_add_test(tc, test_stop_utf8_holdback);
    tcase_add_test(tc, test_stop_flush_and_reset);
    tcase_add_test(tc, test_stop_invalid_arguments);
    tcase_add_test(tc, test_stop_long_text);
    tcase_add_test(tc, test_stop_random_vs_reference);
    tcase_add_test(tc, test_utf8_seq);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(serve_api_suite()); }
