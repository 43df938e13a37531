/*
 * format/chat.h: a checkpoint's chat template, rendered as transformers'
 * apply_chat_template(messages, add_generation_prompt=..., tokenize=False) renders it: the
 * template text with format/jinja (Jinja2's behaviour, byte for byte), the variables
 * messages, add_generation_prompt, tools and documents (None unless given), every special
 * token of tokenizer_config.json as its string (bos_token, eos_token, unk_token, sep_token,
 * pad_token, cls_token, mask_token, additional_special_tokens; an AddedToken object gives
 * its "content"; null ones are left out, as transformers leaves them out), and any extra
 * variables of the request (Qwen3's enable_thinking).
 *
 * Where the template comes from: an override file when given, else the model folder's
 * chat_template.jinja (what transformers saves now, and prefers), else tokenizer_config.json's
 * "chat_template": a string, or a list of {"name", "template"} of which the one named
 * "default" is used.
 *
 * A template is parsed once at load; rendering only reads it, so any number of threads may
 * render one template at once.
 */
#ifndef FERRY_FORMAT_CHAT_H
#define FERRY_FORMAT_CHAT_H

#include <cjson/cJSON.h>
#include <stddef.h>

#include "ferry.h"
#include "format/jinja.h"

typedef struct ferry_chat_template ferry_chat_template;

/* Loads the template of the model in model_dir, or the template text in the file
 * override_path when that is not NULL (special tokens still come from model_dir's
 * tokenizer_config.json when it has one). On success *out owns the template; free it with
 * ferry_chat_template_free. FERRY_ERR_UNSUPPORTED: no template ("MODEL has no chat_template
 * in tokenizer_config.json; pass --chat-template FILE"), a list without a "default" one, or
 * a construct the engine does not support (the message names it and its line);
 * FERRY_ERR_FORMAT: tokenizer_config.json is not valid JSON, a field has the wrong type, or
 * the template has a syntax error (with its line); FERRY_ERR_IO: a file cannot be read;
 * FERRY_ERR_INVALID (NULL arguments); FERRY_ERR_NOMEM. Thread-safe. */
ferry_status ferry_chat_template_load(const char *model_dir, const char *override_path,
                                      ferry_chat_template **out);

/* Creates a template from the text text[0..len) and the variables special (a JSON object
 * of name -> value, for example {"bos_token": "<s>"}; NULL for none; copied). Errors as
 * ferry_chat_template_load. Thread-safe. */
ferry_status ferry_chat_template_create(const char *text, size_t len, const cJSON *special,
                                        ferry_chat_template **out);

/* Renders messages (a JSON array of message objects: role, content as a string or a list
 * of parts, tool_calls, ... all passed through as values; a JSON number with an integral
 * value is an int, 3.0 included, as cJSON keeps no difference) with add_generation_prompt and
 * the extra variables in extra (a JSON object, or NULL: {"enable_thinking": false},
 * "tools", "documents"; an extra variable named like a special token replaces it;
 * "messages" and "add_generation_prompt" may not be given there). On success *out is a
 * malloc'd NUL-terminated string of *len bytes the caller frees. FERRY_ERR_INVALID: bad
 * arguments, or the template failed as Jinja2 would fail (raise_exception(msg) gives
 * "chat template: msg"; an undefined value used, a type error, a limit passed: each with
 * the template line); FERRY_ERR_UNSUPPORTED: the template reached something the engine
 * does not support; FERRY_ERR_NOMEM. Thread-safe on a shared template. */
ferry_status ferry_chat_template_render(const ferry_chat_template *t, const cJSON *messages,
                                        int add_generation_prompt, const cJSON *extra, char **out,
                                        size_t *len);

/* As ferry_chat_template_render, with explicit limits (NULL: the defaults of
 * ferry_jinja_limits_default). */
ferry_status ferry_chat_template_render_limited(const ferry_chat_template *t, const cJSON *messages,
                                                int add_generation_prompt, const cJSON *extra,
                                                const ferry_jinja_limits *limits, char **out,
                                                size_t *len);

/* Frees a template. NULL-safe. */
void ferry_chat_template_free(ferry_chat_template *t);

#endif
