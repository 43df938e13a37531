/*
 * format/chat.c: see chat.h. tokenizer_config.json's fields used here:
 *   "chat_template": string | [{"name": string, "template": string}, ...]
 *   "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
 *   "mask_token": string | {"content": string, ...} (an AddedToken) | null
 *   "additional_special_tokens": [string | {"content": string, ...}, ...]
 * The template owns its compiled form and a JSON object of the special tokens' strings.
 */
#include "format/chat.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/error.h"
#include "core/fileio.h"

#define CONFIG_LIMIT ((uint64_t)64 << 20)   /* tokenizer_config.json */
#define TEMPLATE_LIMIT ((uint64_t)16 << 20) /* a template file */

struct ferry_chat_template {
    ferry_jinja *jinja;
    cJSON *special; /* object: name -> string or list of strings */
};

static const char *const special_names[] = {
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
};

void ferry_chat_template_free(ferry_chat_template *t)
{
    if (!t)
        return;
    ferry_jinja_free(t->jinja);
    cJSON_Delete(t->special);
    free(t);
}

ferry_status ferry_chat_template_create(const char *text, size_t len, const cJSON *special,
                                        ferry_chat_template **out)
{
    if (!text || !out)
        return ferry_fail(FERRY_ERR_INVALID, "chat template: NULL text or output");
    if (special && !cJSON_IsObject(special))
        return ferry_fail(FERRY_ERR_INVALID, "chat template: the special tokens are not an "
                                             "object");
    ferry_chat_template *t = calloc(1, sizeof *t);
    if (!t)
        return ferry_fail(FERRY_ERR_NOMEM, "chat template: out of memory");
    t->special = special ? cJSON_Duplicate(special, 1) : cJSON_CreateObject();
    if (!t->special) {
        free(t);
        return ferry_fail(FERRY_ERR_NOMEM, "chat template: out of memory");
    }
    ferry_status st = ferry_jinja_compile(text, len, "chat template", &t->jinja);
    if (st != FERRY_OK) {
        ferry_chat_template_free(t);
        return st;
    }
    *out = t;
    return FERRY_OK;
}

/* A special token's string: a string, or an AddedToken's "content"; NULL when absent. */
static ferry_status token_string(const cJSON *v, const char *path, const char *field,
                                 const char **out)
{
    *out = NULL;
    if (!v || cJSON_IsNull(v))
        return FERRY_OK;
    if (cJSON_IsString(v)) {
        *out = v->valuestring;
        return FERRY_OK;
    }
    const cJSON *c = cJSON_IsObject(v) ? cJSON_GetObjectItemCaseSensitive(v, "content") : NULL;
    if (cJSON_IsString(c)) {
        *out = c->valuestring;
        return FERRY_OK;
    }
    return ferry_fail(FERRY_ERR_FORMAT,
                      "%s: '%s' is neither a string nor an object with a "
                      "string \"content\"",
                      path, field);
}

/* The special tokens of a parsed tokenizer_config.json as a new object (into *out). */
static ferry_status special_tokens(const cJSON *cfg, const char *path, cJSON **out)
{
    cJSON *sp = cJSON_CreateObject();
    if (!sp)
        return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", path);
    ferry_status st = FERRY_OK;
    for (size_t i = 0; i < sizeof special_names / sizeof special_names[0]; i++) {
        const char *s;
        st = token_string(cJSON_GetObjectItemCaseSensitive(cfg, special_names[i]), path,
                          special_names[i], &s);
        if (st != FERRY_OK)
            goto fail;
        /* transformers passes only the tokens that are set (special_tokens_map) */
        if (s && *s && !cJSON_AddStringToObject(sp, special_names[i], s)) {
            st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", path);
            goto fail;
        }
    }
    const cJSON *extra = cJSON_GetObjectItemCaseSensitive(cfg, "additional_special_tokens");
    if (extra && !cJSON_IsNull(extra)) {
        if (!cJSON_IsArray(extra)) {
            st =
                ferry_fail(FERRY_ERR_FORMAT, "%s: 'additional_special_tokens' is not a list", path);
            goto fail;
        }
        cJSON *list = cJSON_CreateArray();
        if (!list || !cJSON_AddItemToObject(sp, "additional_special_tokens", list)) {
            cJSON_Delete(list);
            st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", path);
            goto fail;
        }
        const cJSON *e;
        cJSON_ArrayForEach(e, extra)
        {
            const char *s;
            st = token_string(e, path, "additional_special_tokens", &s);
            if (st != FERRY_OK)
                goto fail;
            cJSON *item = cJSON_CreateString(s ? s : "");
            if (!item || !cJSON_AddItemToArray(list, item)) {
                cJSON_Delete(item);
                st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", path);
                goto fail;
            }
        }
        if (!cJSON_GetArraySize(list))
            cJSON_DeleteItemFromObjectCaseSensitive(sp, "additional_special_tokens");
    }
    *out = sp;
    return FERRY_OK;
fail:
    cJSON_Delete(sp);
    return st;
}

/* The template text of tokenizer_config.json's chat_template (borrowed from cfg). */
static ferry_status config_template(const cJSON *cfg, const char *path, const char *model_dir,
                                    const char **out)
{
    const cJSON *ct = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
    if (!ct || cJSON_IsNull(ct))
        return ferry_fail(FERRY_ERR_UNSUPPORTED,
                          "%s has no chat_template in "
                          "tokenizer_config.json; pass --chat-template FILE",
                          model_dir);
    if (cJSON_IsString(ct)) {
        *out = ct->valuestring;
        return FERRY_OK;
    }
    if (!cJSON_IsArray(ct))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: 'chat_template' is neither a string nor a list",
                          path);
    const cJSON *e;
    cJSON_ArrayForEach(e, ct)
    {
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(e, "name");
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(e, "template");
        if (!cJSON_IsString(name) || !cJSON_IsString(text))
            return ferry_fail(FERRY_ERR_FORMAT,
                              "%s: an entry of 'chat_template' lacks a string "
                              "\"name\" or \"template\"",
                              path);
        if (!strcmp(name->valuestring, "default")) {
            *out = text->valuestring;
            return FERRY_OK;
        }
    }
    return ferry_fail(FERRY_ERR_UNSUPPORTED,
                      "%s: 'chat_template' lists templates but none "
                      "named \"default\"; pass --chat-template FILE",
                      path);
}

static int file_exists(const char *path)
{
    struct stat s;
    return stat(path, &s) == 0;
}

ferry_status ferry_chat_template_load(const char *model_dir, const char *override_path,
                                      ferry_chat_template **out)
{
    if (!model_dir || !out)
        return ferry_fail(FERRY_ERR_INVALID, "chat template: NULL model folder or output");
    ferry_status st;
    char path[4096], jinja_path[4096];
    char *cfg_text = NULL, *tmpl_text = NULL;
    size_t cfg_len = 0, tmpl_len = 0;
    cJSON *cfg = NULL, *special = NULL;
    const char *text = NULL;
    size_t text_len = 0;
    if ((size_t)snprintf(path, sizeof path, "%s/tokenizer_config.json", model_dir) >= sizeof path ||
        (size_t)snprintf(jinja_path, sizeof jinja_path, "%s/chat_template.jinja", model_dir) >=
            sizeof jinja_path)
        return ferry_fail(FERRY_ERR_INVALID, "%s: the path is too long", model_dir);
    st = ferry_read_small_file(path, CONFIG_LIMIT, 1, &cfg_text, &cfg_len);
    if (st != FERRY_OK)
        goto fail;
    if (cfg_text) {
        cfg = cJSON_ParseWithLength(cfg_text, cfg_len);
        if (!cJSON_IsObject(cfg)) {
            st = ferry_fail(FERRY_ERR_FORMAT, "%s: not a JSON object", path);
            goto fail;
        }
        st = special_tokens(cfg, path, &special);
        if (st != FERRY_OK)
            goto fail;
    }
    if (override_path || file_exists(jinja_path)) {
        const char *p = override_path ? override_path : jinja_path;
        st = ferry_read_small_file(p, TEMPLATE_LIMIT, 0, &tmpl_text, &tmpl_len);
        if (st != FERRY_OK)
            goto fail;
        text = tmpl_text;
        text_len = tmpl_len;
    } else {
        if (!cfg) {
            st = ferry_fail(FERRY_ERR_UNSUPPORTED,
                            "%s has no chat_template in "
                            "tokenizer_config.json (it has no tokenizer_config.json); pass "
                            "--chat-template FILE",
                            model_dir);
            goto fail;
        }
        st = config_template(cfg, path, model_dir, &text);
        if (st != FERRY_OK)
            goto fail;
        text_len = strlen(text);
    }
    st = ferry_chat_template_create(text, text_len, special, out);
fail:
    cJSON_Delete(special);
    cJSON_Delete(cfg);
    free(cfg_text);
    free(tmpl_text);
    return st;
}

ferry_status ferry_chat_template_render_limited(const ferry_chat_template *t, const cJSON *messages,
                                                int add_generation_prompt, const cJSON *extra,
                                                const ferry_jinja_limits *limits, char **out,
                                                size_t *len)
{
    if (!t || !out || !len)
        return ferry_fail(FERRY_ERR_INVALID, "chat template: NULL template or output");
    if (!cJSON_IsArray(messages))
        return ferry_fail(FERRY_ERR_INVALID, "chat template: messages must be a list");
    if (extra && !cJSON_IsObject(extra))
        return ferry_fail(FERRY_ERR_INVALID, "chat template: the extra variables must be an "
                                             "object");
    int n_special = cJSON_GetArraySize(t->special), n_extra = extra ? cJSON_GetArraySize(extra) : 0;
    ferry_jinja_var *vars = calloc((size_t)(n_special + n_extra + 4), sizeof *vars);
    cJSON *agp = cJSON_CreateBool(add_generation_prompt != 0);
    cJSON *none = cJSON_CreateNull();
    ferry_status st = FERRY_OK;
    if (!vars || !agp || !none) {
        st = ferry_fail(FERRY_ERR_NOMEM, "chat template: out of memory");
        goto done;
    }
    /* {**special_tokens_map, **kwargs}, then messages, tools, documents and
     * add_generation_prompt as apply_chat_template passes them */
    int32_t n = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, t->special) vars[n++] = (ferry_jinja_var){e->string, e};
    vars[n++] = (ferry_jinja_var){"tools", none};
    vars[n++] = (ferry_jinja_var){"documents", none};
    if (extra) {
        cJSON_ArrayForEach(e, extra)
        {
            if (!e->string || !strcmp(e->string, "messages") ||
                !strcmp(e->string, "add_generation_prompt")) {
                st = ferry_fail(FERRY_ERR_INVALID,
                                "chat template: the extra variable '%s' is "
                                "not allowed",
                                e->string ? e->string : "");
                goto done;
            }
            vars[n++] = (ferry_jinja_var){e->string, e};
        }
    }
    vars[n++] = (ferry_jinja_var){"messages", messages};
    vars[n++] = (ferry_jinja_var){"add_generation_prompt", agp};
    st = ferry_jinja_render(t->jinja, vars, n, limits, out, len);
done:
    free(vars);
    cJSON_Delete(agp);
    cJSON_Delete(none);
    return st;
}

ferry_status ferry_chat_template_render(const ferry_chat_template *t, const cJSON *messages,
                                        int add_generation_prompt, const cJSON *extra, char **out,
                                        size_t *len)
{
    return ferry_chat_template_render_limited(t, messages, add_generation_prompt, extra, NULL, out,
                                              len);
}
