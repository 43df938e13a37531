/*
 * tests/test_config.c: config.json parsing: the real tiny checkpoint's values, defaults
 * and derived fields, and every rejected field (each case edits one field of a valid
 * config with cJSON and checks the status and that the message names origin and field).
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "format/config.h"
#include "tests/check_util.h"

#define TINY_DIR FERRY_SOURCE_DIR "/models/tiny-moe-code"
#define ORIGIN "test/config.json"

static const char *g_base =
    "{\"architectures\": [\"MixtralForCausalLM\"], \"model_type\": \"mixtral\","
    " \"bos_token_id\": 1, \"eos_token_id\": 2, \"hidden_size\": 192,"
    " \"intermediate_size\": 384, \"max_position_embeddings\": 4096,"
    " \"num_attention_heads\": 6, \"num_experts_per_tok\": 2, \"num_hidden_layers\": 6,"
    " \"num_key_value_heads\": 2, \"num_local_experts\": 8, \"rms_norm_eps\": 1e-05,"
    " \"rope_theta\": 1000000.0, \"sliding_window\": null, \"rope_scaling\": null,"
    " \"tie_word_embeddings\": false, \"vocab_size\": 4096}";

static void assert_error_has(const char *what, const char *needle)
{
    const char *msg = ferry_last_error();
    ck_assert_msg(strstr(msg, needle) != NULL, "%s: error \"%s\" lacks \"%s\"", what, msg,
                  needle);
}

/* Parses the base config with key set to value_json (NULL: key removed). */
static ferry_status parse_edited(const char *key, const char *value_json, ferry_config *out)
{
    cJSON *root = cJSON_Parse(g_base);
    ck_assert_ptr_nonnull(root);
    cJSON_DeleteItemFromObjectCaseSensitive(root, key);
    if (value_json) {
        cJSON *v = cJSON_Parse(value_json);
        ck_assert_msg(v != NULL, "bad test value %s", value_json);
        cJSON_AddItemToObject(root, key, v);
    }
    char *text = cJSON_PrintUnformatted(root);
    ck_assert_ptr_nonnull(text);
    ferry_status st = ferry_config_parse(text, strlen(text), ORIGIN, out);
    free(text);
    cJSON_Delete(root);
    return st;
}

START_TEST(test_config_real_tiny)
{
    ferry_config c;
    ck_assert_msg(ferry_config_load(TINY_DIR, &c) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(c.vocab_size, 4096);
    ck_assert_int_eq(c.hidden_size, 192);
    ck_assert_int_eq(c.intermediate_size, 384);
    ck_assert_int_eq(c.n_layers, 6);
    ck_assert_int_eq(c.n_heads, 6);
    ck_assert_int_eq(c.n_kv_heads, 2);
    ck_assert_int_eq(c.head_dim, 32);
    ck_assert_int_eq(c.n_experts, 8);
    ck_assert_int_eq(c.n_experts_per_tok, 2);
    ck_assert_int_eq(c.max_positions, 4096);
    ck_assert_int_eq(c.sliding_window, 0);
    ck_assert_int_eq(c.bos_id, 1);
    ck_assert_int_eq(c.n_eos, 1);
    ck_assert_int_eq(c.eos_ids[0], 2);
    ck_assert(c.rope_theta == 1e6f);
    ck_assert(c.rms_eps == 1e-5f);
    ck_assert_int_eq(c.tie_word_embeddings, 0);
}
END_TEST

START_TEST(test_config_head_dim_explicit_vs_derived)
{
    ferry_config c;
    ck_assert_int_eq(parse_edited("head_dim", NULL, &c), FERRY_OK);
    ck_assert_int_eq(c.head_dim, 32);
    ck_assert_int_eq(parse_edited("head_dim", "null", &c), FERRY_OK);
    ck_assert_int_eq(c.head_dim, 32);
    ck_assert_int_eq(parse_edited("head_dim", "64", &c), FERRY_OK);
    ck_assert_int_eq(c.head_dim, 64);
    ck_assert_int_eq(c.hidden_size, 192);
}
END_TEST

START_TEST(test_config_defaults_and_optional_forms)
{
    ferry_config c;
    ck_assert_int_eq(parse_edited("eos_token_id", "[2, 7, 4095]", &c), FERRY_OK);
    ck_assert_int_eq(c.n_eos, 3);
    ck_assert_int_eq(c.eos_ids[0], 2);
    ck_assert_int_eq(c.eos_ids[1], 7);
    ck_assert_int_eq(c.eos_ids[2], 4095);
    ck_assert_int_eq(parse_edited("eos_token_id", "null", &c), FERRY_OK);
    ck_assert_int_eq(c.n_eos, 0);
    ck_assert_int_eq(parse_edited("eos_token_id", "[]", &c), FERRY_OK);
    ck_assert_int_eq(c.n_eos, 0);
    ck_assert_int_eq(parse_edited("bos_token_id", NULL, &c), FERRY_OK);
    ck_assert_int_eq(c.bos_id, -1);
    ck_assert_int_eq(parse_edited("bos_token_id", "null", &c), FERRY_OK);
    ck_assert_int_eq(c.bos_id, -1);

    ck_assert_int_eq(parse_edited("num_key_value_heads", NULL, &c), FERRY_OK);
    ck_assert_int_eq(c.n_kv_heads, 6);
    ck_assert_int_eq(parse_edited("rope_theta", NULL, &c), FERRY_OK);
    ck_assert(c.rope_theta == 1e6f);
    ck_assert_int_eq(parse_edited("rope_theta", "10000.0", &c), FERRY_OK);
    ck_assert(c.rope_theta == 1e4f);
    ck_assert_int_eq(parse_edited("tie_word_embeddings", NULL, &c), FERRY_OK);
    ck_assert_int_eq(c.tie_word_embeddings, 0);
    ck_assert_int_eq(parse_edited("tie_word_embeddings", "true", &c), FERRY_OK);
    ck_assert_int_eq(c.tie_word_embeddings, 1);
    ck_assert_int_eq(parse_edited("sliding_window", "4096", &c), FERRY_OK);
    ck_assert_int_eq(c.sliding_window, 4096);
    ck_assert_int_eq(parse_edited("sliding_window", NULL, &c), FERRY_OK);
    ck_assert_int_eq(c.sliding_window, 0);
    ck_assert_int_eq(parse_edited("rope_scaling", NULL, &c), FERRY_OK);

    /* model_type may be absent when architectures names Mixtral. */
    ck_assert_int_eq(parse_edited("model_type", NULL, &c), FERRY_OK);
    ck_assert_int_eq(parse_edited("architectures", "[\"Other\", \"MixtralForCausalLM\"]", &c),
                     FERRY_OK);
}
END_TEST

START_TEST(test_config_parse_uses_len_not_nul)
{
    size_t n = strlen(g_base);
    char *buf = malloc(n + 8);
    ck_assert_ptr_nonnull(buf);
    memcpy(buf, g_base, n);
    memcpy(buf + n, "garbage", 8); /* beyond len: must not be read as part of the JSON */
    ferry_config c;
    ck_assert_msg(ferry_config_parse(buf, n, ORIGIN, &c) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(c.vocab_size, 4096);
    /* and a prefix cut mid-object is invalid */
    ck_assert_int_eq(ferry_config_parse(buf, n / 2, ORIGIN, &c), FERRY_ERR_FORMAT);
    assert_error_has("prefix", ORIGIN ": not valid JSON");
    free(buf);
}
END_TEST

START_TEST(test_config_rejects_invalid_json)
{
    ferry_config c;
    memset(&c, 0xab, sizeof c);
    ferry_config before = c;
    ck_assert_int_eq(ferry_config_parse("", 0, ORIGIN, &c), FERRY_ERR_FORMAT);
    assert_error_has("empty", ORIGIN ": not valid JSON");
    ck_assert_int_eq(ferry_config_parse("{\"vocab_size\": ", 15, ORIGIN, &c), FERRY_ERR_FORMAT);
    assert_error_has("truncated", ORIGIN ": not valid JSON");
    ck_assert_int_eq(ferry_config_parse("[1, 2]", 6, ORIGIN, &c), FERRY_ERR_FORMAT);
    assert_error_has("array", ORIGIN ": not a JSON object");
    ck_assert_int_eq(ferry_config_parse(NULL, 0, ORIGIN, &c), FERRY_ERR_INVALID);
    ck_assert(memcmp(&c, &before, sizeof c) == 0);
}
END_TEST

START_TEST(test_config_load_reports_missing_file)
{
    char dir[512];
    tu_scratch_dir(dir, "config_missing");
    ferry_config c;
    ck_assert_int_eq(ferry_config_load(dir, &c), FERRY_ERR_IO);
    assert_error_has("missing", "/config.json: cannot open: No such file or directory");
    assert_error_has("missing dir", dir);
}
END_TEST

typedef struct {
    const char *key;
    const char *value; /* JSON; NULL removes the key */
    ferry_status want;
    const char *want_msg; /* follows ORIGIN ": " */
} bad_field;

static const bad_field g_bad_fields[] = {
    {"model_type", "\"llama\"", FERRY_ERR_UNSUPPORTED, "model_type 'llama' is not supported"},
    {"model_type", "7", FERRY_ERR_FORMAT, "field 'model_type' is not a string"},
    {"rope_scaling", "{\"type\": \"linear\", \"factor\": 2.0}", FERRY_ERR_UNSUPPORTED,
     "field 'rope_scaling' is set"},
    {"vocab_size", NULL, FERRY_ERR_FORMAT, "required field 'vocab_size' is missing"},
    {"hidden_size", NULL, FERRY_ERR_FORMAT, "required field 'hidden_size' is missing"},
    {"intermediate_size", NULL, FERRY_ERR_FORMAT, "required field 'intermediate_size' is missing"},
    {"num_hidden_layers", NULL, FERRY_ERR_FORMAT, "required field 'num_hidden_layers' is missing"},
    {"num_attention_heads", NULL, FERRY_ERR_FORMAT,
     "required field 'num_attention_heads' is missing"},
    {"num_local_experts", NULL, FERRY_ERR_FORMAT, "required field 'num_local_experts' is missing"},
    {"num_experts_per_tok", NULL, FERRY_ERR_FORMAT,
     "required field 'num_experts_per_tok' is missing"},
    {"max_position_embeddings", NULL, FERRY_ERR_FORMAT,
     "required field 'max_position_embeddings' is missing"},
    {"hidden_size", "null", FERRY_ERR_FORMAT, "required field 'hidden_size' is missing"},
    {"hidden_size", "\"192\"", FERRY_ERR_FORMAT, "field 'hidden_size' is not an integer"},
    {"hidden_size", "192.5", FERRY_ERR_FORMAT, "field 'hidden_size' is not an integer"},
    {"vocab_size", "[4096]", FERRY_ERR_FORMAT, "field 'vocab_size' is not an integer"},
    {"num_local_experts", "true", FERRY_ERR_FORMAT, "field 'num_local_experts' is not an integer"},
    {"hidden_size", "0", FERRY_ERR_FORMAT, "field 'hidden_size' is 0, outside [1, 1048576]"},
    {"intermediate_size", "-384", FERRY_ERR_FORMAT, "field 'intermediate_size' is -384, outside"},
    {"num_hidden_layers", "0", FERRY_ERR_FORMAT, "field 'num_hidden_layers' is 0"},
    {"num_attention_heads", "0", FERRY_ERR_FORMAT, "field 'num_attention_heads' is 0"},
    {"num_key_value_heads", "0", FERRY_ERR_FORMAT, "field 'num_key_value_heads' is 0"},
    {"num_local_experts", "0", FERRY_ERR_FORMAT, "field 'num_local_experts' is 0"},
    {"num_experts_per_tok", "0", FERRY_ERR_FORMAT, "field 'num_experts_per_tok' is 0"},
    {"max_position_embeddings", "0", FERRY_ERR_FORMAT, "field 'max_position_embeddings' is 0"},
    {"hidden_size", "2097152", FERRY_ERR_FORMAT, "field 'hidden_size' is 2097152, outside"},
    {"intermediate_size", "1e12", FERRY_ERR_FORMAT, "field 'intermediate_size' is 1000000000000"},
    {"vocab_size", "33554432", FERRY_ERR_FORMAT, "field 'vocab_size' is 33554432, outside"},
    {"num_hidden_layers", "1e30", FERRY_ERR_FORMAT, "field 'num_hidden_layers' is not an integer"},
    {"num_attention_heads", "8192", FERRY_ERR_FORMAT, "field 'num_attention_heads' is 8192"},
    {"max_position_embeddings", "4294967296", FERRY_ERR_FORMAT,
     "field 'max_position_embeddings' is 4294967296"},
    {"num_key_value_heads", "4", FERRY_ERR_FORMAT,
     "num_attention_heads 6 is not a multiple of num_key_value_heads 4"},
    {"num_key_value_heads", "12", FERRY_ERR_FORMAT,
     "num_attention_heads 6 is not a multiple of num_key_value_heads 12"},
    {"num_experts_per_tok", "9", FERRY_ERR_FORMAT,
     "num_experts_per_tok 9 exceeds num_local_experts 8"},
    {"num_local_experts", "1025", FERRY_ERR_UNSUPPORTED,
     "num_local_experts 1025 is more than the 1024 this build routes"},
    {"head_dim", "33", FERRY_ERR_FORMAT, "head_dim 33 is odd"},
    {"head_dim", "0", FERRY_ERR_FORMAT, "field 'head_dim' is 0"},
    {"head_dim", "\"32\"", FERRY_ERR_FORMAT, "field 'head_dim' is not an integer"},
    {"head_dim", "524288", FERRY_ERR_FORMAT, "num_attention_heads 6 x head_dim 524288 exceeds"},
    {"hidden_size", "190", FERRY_ERR_FORMAT,
     "no 'head_dim', and hidden_size 190 is not a multiple of num_attention_heads 6"},
    {"hidden_size", "198", FERRY_ERR_FORMAT, "head_dim 33 is odd"},
    {"rms_norm_eps", "0", FERRY_ERR_FORMAT, "field 'rms_norm_eps' is 0, must be a positive"},
    {"rms_norm_eps", "-1e-5", FERRY_ERR_FORMAT, "field 'rms_norm_eps' is -1e-05"},
    {"rms_norm_eps", "1e-50", FERRY_ERR_FORMAT, "field 'rms_norm_eps' is 1e-50"},
    {"rms_norm_eps", "\"1e-5\"", FERRY_ERR_FORMAT, "field 'rms_norm_eps' is not a number"},
    {"rope_theta", "0", FERRY_ERR_FORMAT, "field 'rope_theta' is 0"},
    {"rope_theta", "1e300", FERRY_ERR_FORMAT, "field 'rope_theta' is 1e+300"},
    {"rope_theta", "\"big\"", FERRY_ERR_FORMAT, "field 'rope_theta' is not a number"},
    {"sliding_window", "-1", FERRY_ERR_FORMAT, "field 'sliding_window' is -1, outside"},
    {"sliding_window", "\"4096\"", FERRY_ERR_FORMAT, "field 'sliding_window' is not an integer"},
    {"tie_word_embeddings", "1", FERRY_ERR_FORMAT, "field 'tie_word_embeddings' is not a bool"},
    {"bos_token_id", "4096", FERRY_ERR_FORMAT, "field 'bos_token_id' is 4096, outside [0, 4095]"},
    {"bos_token_id", "\"<s>\"", FERRY_ERR_FORMAT, "field 'bos_token_id' is not an integer"},
    {"eos_token_id", "-2", FERRY_ERR_FORMAT, "field 'eos_token_id' is -2, outside [0, 4095]"},
    {"eos_token_id", "\"</s>\"", FERRY_ERR_FORMAT,
     "field 'eos_token_id' is neither an integer nor a list"},
    {"eos_token_id", "[2, \"x\"]", FERRY_ERR_FORMAT, "field 'eos_token_id'[1] is not a token id"},
    {"eos_token_id", "[2, 99999]", FERRY_ERR_FORMAT, "field 'eos_token_id'[1] is not a token id"},
    {"eos_token_id", "[2, 2.5]", FERRY_ERR_FORMAT, "field 'eos_token_id'[1] is not a token id"},
    {"eos_token_id", "[1,2,3,4,5,6,7,8,9]", FERRY_ERR_UNSUPPORTED,
     "field 'eos_token_id' lists 9 ids, at most 8"},
};

START_TEST(test_config_rejects_bad_field)
{
    const bad_field *b = &g_bad_fields[_i];
    char what[128], want[256];
    snprintf(what, sizeof what, "%s = %s", b->key, b->value ? b->value : "(removed)");
    ferry_config c;
    memset(&c, 0xab, sizeof c);
    ferry_config before = c;
    ferry_status st = parse_edited(b->key, b->value, &c);
    ck_assert_msg(st == b->want, "%s: got %s (%s), want %s", what, ferry_status_name(st),
                  ferry_last_error(), ferry_status_name(b->want));
    snprintf(want, sizeof want, "%s: %s", ORIGIN, b->want_msg);
    assert_error_has(what, want);
    ck_assert_msg(memcmp(&c, &before, sizeof c) == 0, "%s: *out written on failure", what);
}
END_TEST

START_TEST(test_config_rejects_other_architectures)
{
    ferry_config c;
    cJSON *root = cJSON_Parse(g_base);
    cJSON_DeleteItemFromObjectCaseSensitive(root, "model_type");
    cJSON_ReplaceItemInObjectCaseSensitive(root, "architectures",
                                           cJSON_Parse("[\"LlamaForCausalLM\"]"));
    char *text = cJSON_PrintUnformatted(root);
    ck_assert_int_eq(ferry_config_parse(text, strlen(text), ORIGIN, &c), FERRY_ERR_UNSUPPORTED);
    assert_error_has("llama arch", ORIGIN ": architectures ['LlamaForCausalLM'] include no class "
                     "ferry runs (the families mixtral, qwen3_moe, qwen2_moe, olmoe)");
    free(text);

    cJSON_DeleteItemFromObjectCaseSensitive(root, "architectures");
    text = cJSON_PrintUnformatted(root);
    ck_assert_int_eq(ferry_config_parse(text, strlen(text), ORIGIN, &c), FERRY_ERR_FORMAT);
    assert_error_has("neither", ORIGIN ": neither 'model_type' nor 'architectures'");
    free(text);

    cJSON_AddItemToObject(root, "architectures", cJSON_CreateString("MixtralForCausalLM"));
    text = cJSON_PrintUnformatted(root);
    ck_assert_int_eq(ferry_config_parse(text, strlen(text), ORIGIN, &c), FERRY_ERR_FORMAT);
    assert_error_has("arch string", ORIGIN ": field 'architectures' is not a list");
    free(text);
    cJSON_Delete(root);
}
END_TEST

static Suite *config_suite(void)
{
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_config_real_tiny);
    tcase_add_test(tc, test_config_head_dim_explicit_vs_derived);
    tcase_add_test(tc, test_config_defaults_and_optional_forms);
    tcase_add_test(tc, test_config_parse_uses_len_not_nul);
    tcase_add_test(tc, test_config_rejects_invalid_json);
    tcase_add_test(tc, test_config_load_reports_missing_file);
    tcase_add_loop_test(tc, test_config_rejects_bad_field, 0,
                        (int)(sizeof g_bad_fields / sizeof g_bad_fields[0]));
    tcase_add_test(tc, test_config_rejects_other_architectures);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(config_suite()); }
