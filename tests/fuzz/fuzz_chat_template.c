/*
 * tests/fuzz/fuzz_chat_template.c: the chat template renderer (format/chat.h over
 * format/jinja.h): compile a template, render it with JSON variables.
 * Dictionaries: jinja.dict json.dict
 *
 * Input: the template text, then optionally a NUL byte and a JSON value. An array is the
 * messages; an object gives "messages", "add_generation_prompt" (bool) and "extra" (the extra
 * variables: tools, enable_thinking, ...); anything else is passed as the messages (and must
 * be refused). Without the JSON part a fixed two-message conversation is used. The special
 * tokens are a fixed Llama-like set.
 *
 * Limits are set low enough that a hostile template ends quickly (the default depth, since a
 * deep template is one of the things to check; fewer steps, less output and memory), and the
 * checks are that compile and render fail only with the codes the header names and a message
 * starting with the template's name, and that a rendered text is NUL-terminated at its
 * length and within max_output_bytes. ASan and LeakSanitizer check the rest. Deterministic
 * unless a template calls strftime_now.
 */
#include <cjson/cJSON.h>
#include <stdint.h>

#include "core/error.h"
#include "format/chat.h"
#include "format/jinja.h"
#include "tests/fuzz/fuzz_util.h"

static const char k_special[] = "{\"bos_token\": \"<s>\", \"eos_token\": \"</s>\", "
                                "\"unk_token\": \"<unk>\", \"pad_token\": null, "
                                "\"additional_special_tokens\": [\"<tool>\", "
                                "{\"content\": \"</tool>\"}]}";
static const char k_messages[] = "[{\"role\": \"system\", \"content\": \"Be brief.\"}, "
                                 "{\"role\": \"user\", \"content\": \"Hi {{ x }} \\u00e9\"}]";

FUZZ_INITIALIZE_QUIET()

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nul = memchr(data, 0, size);
    size_t tmpl_len = nul ? (size_t)(nul - data) : size;
    cJSON *special = cJSON_Parse(k_special);
    cJSON *vars = nul ? cJSON_ParseWithLength((const char *)nul + 1, size - tmpl_len - 1)
                      : cJSON_Parse(k_messages);
    FUZZ_CHECK(special != NULL, "cannot parse the special tokens");
    if (!vars) { /* JSON that does not parse: nothing to render with */
        cJSON_Delete(special);
        return 0;
    }
    const cJSON *messages = vars, *extra = NULL;
    int agp = 1;
    if (cJSON_IsObject(vars)) {
        messages = cJSON_GetObjectItemCaseSensitive(vars, "messages");
        extra = cJSON_GetObjectItemCaseSensitive(vars, "extra");
        agp = !cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(vars, "add_generation_prompt"));
    }

    ferry_chat_template *t = NULL;
    ferry_status st = ferry_chat_template_create((const char *)data, tmpl_len, special, &t);
    if (st != FERRY_OK) {
        FUZZ_CHECK(t == NULL, "a failed compile (%s) gave a template", ferry_status_name(st));
        FUZZ_CHECK(st == FERRY_ERR_FORMAT || st == FERRY_ERR_UNSUPPORTED, "compile gave %s",
                   ferry_status_name(st));
        FUZZ_CHECK(strncmp(ferry_last_error(), "chat template", 13) == 0,
                   "the compile error does not name the template");
        goto done;
    }
    ferry_jinja_limits lim = ferry_jinja_limits_default();
    lim.max_output_bytes = (size_t)64 << 10;
    lim.max_memory_bytes = (size_t)32 << 20;
    lim.max_steps = 200 * 1000;
    for (int pass = 0; pass < 2; pass++) {
        /* the second pass with no extra variables, as most requests */
        char *out = NULL;
        size_t len = SIZE_MAX;
        st = ferry_chat_template_render_limited(t, messages, agp, pass ? NULL : extra, &lim, &out,
                                                &len);
        if (st == FERRY_OK) {
            FUZZ_CHECK(out != NULL && len <= lim.max_output_bytes && out[len] == 0,
                       "render gave %zu bytes (limit %zu)", len, lim.max_output_bytes);
        } else {
            FUZZ_CHECK(out == NULL && len == SIZE_MAX, "a failed render (%s) wrote its outputs",
                       ferry_status_name(st));
            FUZZ_CHECK(st == FERRY_ERR_INVALID || st == FERRY_ERR_UNSUPPORTED, "render gave %s",
                       ferry_status_name(st));
            FUZZ_CHECK(strncmp(ferry_last_error(), "chat template", 13) == 0,
                       "the render error does not name the template");
        }
        free(out);
        if (!extra)
            break;
    }
    ferry_chat_template_free(t);
done:
    cJSON_Delete(vars);
    cJSON_Delete(special);
    return 0;
}
