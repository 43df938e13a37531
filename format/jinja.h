/*
 * format/jinja.h: a Jinja template engine for Hugging Face chat templates, written to give
 * byte for byte what Jinja2 (3.1) gives when configured as transformers configures it for
 * apply_chat_template: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
 * extensions=[loopcontrols]), without autoescaping, with transformers' tojson filter
 * (json.dumps with ensure_ascii=False) and its raise_exception and strftime_now globals.
 *
 * A template is compiled once (lexed and parsed to a tree, every filter and test name
 * checked) and rendered any number of times, from any number of threads at once: rendering
 * reads the compiled template and writes only to memory of its own.
 *
 * What is supported: the statements if/elif/else, for (else, tuple targets, an inline `if`
 * filter, the loop variable), set (names, tuples, `ns.attr`, block set with filters),
 * macro (defaults, varargs, kwargs), break/continue, with, filter blocks, print, raw and
 * transformers' generation block; every Jinja expression (literals, arithmetic, `~`,
 * comparisons, in, is-tests, and/or/not, conditional expressions, attributes, subscripts,
 * slices, calls, filters); the builtin filters and tests chat templates use; the methods of
 * strings, dicts and lists Python gives; the globals range, dict, namespace,
 * raise_exception and strftime_now. Values follow Python: 64-bit ints (Python's are
 * unbounded: an overflow is an error here), floats printed as Python's repr, insertion
 * ordered dicts, lists and tuples printed as Python's repr, Jinja2's Undefined.
 *
 * Errors name the template (the name given at compile) and the line:
 *   FERRY_ERR_FORMAT       a syntax error, or a name Jinja2 does not know (filter, test, tag)
 *   FERRY_ERR_UNSUPPORTED  a construct Jinja2 has and this engine does not ("chat template
 *                          line 12: the filter 'wordwrap' is not supported"), or a value
 *                          this engine cannot represent exactly (an integer past 64 bits)
 *   FERRY_ERR_INVALID      the template failed while rendering, as Jinja2 would: an
 *                          operation on the wrong types, an undefined value used, a sandbox
 *                          violation (list.append), or raise_exception(msg), which gives
 *                          "NAME: msg" exactly; a limit below was passed
 *   FERRY_ERR_NOMEM        out of memory
 */
#ifndef FERRY_FORMAT_JINJA_H
#define FERRY_FORMAT_JINJA_H

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

#include "ferry.h"

typedef struct ferry_jinja ferry_jinja;

/* Bounds on one render, so that a hostile template or hostile variables cannot hang the
 * caller or exhaust its memory; passing one fails the render with FERRY_ERR_INVALID naming
 * the limit. */
typedef struct {
    size_t max_output_bytes; /* the rendered text, and any one string built on the way */
    size_t max_memory_bytes; /* all values built while rendering, together */
    int64_t max_steps;       /* expression evaluations, statements and loop iterations */
    int32_t max_depth;       /* nested evaluation (macro recursion, deep expressions) */
} ferry_jinja_limits;

/* 16 MiB of output, 256 MiB of memory, 50 million steps, depth 1000. */
ferry_jinja_limits ferry_jinja_limits_default(void);

/* One variable of a render: name and a JSON value (borrowed for the call). */
typedef struct {
    const char *name;
    const cJSON *value;
} ferry_jinja_var;

/* Compiles the template text src[0..len) (UTF-8). name prefixes every error message ("chat
 * template"); it is copied. On success *out owns the template; free it with
 * ferry_jinja_free. FERRY_ERR_FORMAT, FERRY_ERR_UNSUPPORTED (each with the line),
 * FERRY_ERR_INVALID (NULL arguments), FERRY_ERR_NOMEM. Thread-safe. */
ferry_status ferry_jinja_compile(const char *src, size_t len, const char *name, ferry_jinja **out);

/* Renders t with the variables vars[0..n_vars) (a later one of the same name wins; JSON
 * numbers with an integral value are ints, others floats; JSON objects keep their order).
 * The globals range, dict, namespace, raise_exception and strftime_now (local time) are
 * there unless a variable hides them. limits may be NULL for the defaults. On success *out
 * is a malloc'd NUL-terminated string of *len bytes the caller frees. FERRY_ERR_INVALID,
 * FERRY_ERR_UNSUPPORTED, FERRY_ERR_NOMEM as in the file comment. Thread-safe: any number of
 * renders of one template may run at once. */
ferry_status ferry_jinja_render(const ferry_jinja *t, const ferry_jinja_var *vars, int32_t n_vars,
                                const ferry_jinja_limits *limits, char **out, size_t *len);

/* Frees a compiled template. NULL-safe. */
void ferry_jinja_free(ferry_jinja *t);

#endif
