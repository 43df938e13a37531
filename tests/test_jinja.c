/*
 * tests/test_jinja.c: the Jinja engine (format/jinja.c) and the chat-template layer
 * (format/chat.c). The expected texts of the table cases were produced by Jinja2 3.1.6,
 * configured as transformers configures it (tests/test_chat_template.py's make_env), on the
 * variables VARS; tests/test_chat_template.py compares whole real templates against Jinja2.
 * Also: errors that name the construct and the line, raise_exception, every limit,
 * templates truncated at every byte and fuzzed, a missing template, tokenizer_config.json
 * shapes, and concurrent renders of one template.
 */
#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "format/chat.h"
#include "format/jinja.h"
#include "tests/check_util.h"

#define N_OF(a) ((int32_t)(sizeof(a) / sizeof((a)[0])))

typedef struct {
    const char *src;
    const char *want;
} render_case;

/* The variables of every table case. */
static const char VARS[] =
    "{\"d\": {\"a\": 1, \"keys\": 5, \"b\": [1, 2, {\"c\": \"x\"}]}, \"l\": [3, 1, 2], \"n"
    "\": null, \"s\": \"H\303\251llo W\303\266rld  \", \"i\": 7, \"f\": 2.5, \"msgs\": [{\""
    "role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\","
    " \"tool_calls\": [{\"function\": {\"name\": \"f\", \"arguments\": {\"x\": 1}}}]}]}";

static const render_case whitespace_cases[] = {
    {"  {%- if true %}\nx{% endif %}", "x"},
    {"line1\n    {% if true %}    \ninner\n"
     "    {% endif %}\nline2",
     "line1\n    \ninner\nline2"},
    {"   {%+ if true %}keep{% endif %}", "   keep"},
    {"{% if true +%}\nx\n{%- endif %}", "\nx"},
    {"a {{- ' b ' -}} c", "a b c"},
    {"{{ 'a' }}\n{{ 'b' }}", "a\nb"},
    {"text {# c -#}   after", "text after"},
    {"{# comment #}\nline\n  {# indented comment #}\n"
     "after",
     "line\nafter"},
    {"{%- raw -%}   {{ x }}   {%- endraw -%}   z", "{{ x }}z"},
    {"x {% if true %}\n  {% for i in [1,2] %}\n"
     "    {{ i }}\n  {% endfor %}\n{% endif %}\n"
     "end",
     "x     1\n    2\nend"},
    {"one\r\ntwo\rthree{{ 'x' }}", "one\ntwo\nthreex"},
    {"trailing newline dropped\n", "trailing newline dropped"},
};
static const render_case statements_cases[] = {
    {"{% if i > 5 %}big{% elif i > 2 %}mid{% else %}small{% endif %}|{% if n %}x{% elif not"
     " n %}none{% endif %}",
     "big|none"},
    {"{% set x = 1 %}{% for k in [1,2] %}{{ x }}{% set x = 2 %}{{ x }}{% endfor %}{{ x }}",
     "12121"},
    {"{% for k in [1,2] %}{{ y|default('u') }}{% set y = k %}{% endfor %}{{ y|default('o') "
     "}}",
     "uuo"},
    {"{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set t = (1,) %}{{ t }}", "12(1,)"},
    {"{% set ns = namespace(a=1, items=[]) %}{% for k in l %}{% set ns.a = ns.a + k %}{% en"
     "dfor %}{{ ns.a }} {{ ns }}",
     "7 <Namespace {'a': 7, 'items': []}>"},
    {"{% set x %}block {{ 1 + 2 }}{% endset %}{{ x }}|{% set y | upper | replace('B', 'b') "
     "%}abc{% endset %}{{ y }}",
     "block 3|AbC"},
    {"{% macro m(a, b=2) %}{{ a }}-{{ b }}-{{ varargs }}-{{ kwargs }}{% endmacro %}{{ m(1) "
     "}}|{{ m(1, 3, 4, z=5) }}|{{ m(b=0, a=9) }}",
     "1-2-()-{}|1-3-(4,)-{'z': 5}|9-0-()-{}"},
    {"{% macro rec(k) %}{% if k > 0 %}{{ k }}{{ rec(k - 1) }}{% endif %}{% endmacro %}{{ re"
     "c(4) }}|{{ rec }}",
     "4321|<Macro 'rec'>"},
    {"{% for k in range(10) %}{% if k == 2 %}{% continue %}{% endif %}{% if k == 5 %}{% bre"
     "ak %}{% endif %}{{ k }}{% endfor %}",
     "0134"},
    {"{% with a = 1, b = 2 %}{{ a + b }}{% endwith %}[{{ a }}]", "3[]"},
    {"{% filter upper %}hello {{ 'x' }}{% endfilter %}", "HELLO X"},
    {"{% print 1, 'a' %}", "1a"},
    {"{% generation %}{{ 'kept' }}{% endgeneration %}", "kept"},
};
static const render_case loops_cases[] = {
    {"{% for m in msgs %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revind"
     "ex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }};{% endfor %}",
     "1021TrueFalse2;2110FalseTrue2;"},
    {"{% for x in l %}{{ loop.previtem|default('-') }}>{{ x }}>{{ loop.nextitem|default('-'"
     ") }} {% endfor %}",
     "->3>1 3>1>2 1>2>- "},
    {"{% for x in l if x > 1 %}{{ loop.index }}/{{ loop.length }}/{{ loop.last }} {% else %"
     "}none{% endfor %}",
     "1/2/False 2/2/True "},
    {"{% for x in [] %}a{% else %}empty{% endfor %}|{% for x in und %}b{% else %}undefined "
     "is empty{% endfor %}",
     "empty|undefined is empty"},
    {"{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}|{% for k in d %}{{ k }}{% end"
     "for %}|{% for c in 'h\303\251' %}[{{ c }}]{% endfor %}",
     "a=1;keys=5;b=[1, 2, {'c': 'x'}];|akeysb|[h][\303\251]"},
    {"{% for x in l %}{% for y in [1, 2] %}{{ loop.index }}{% endfor %}{{ loop.index }} {% "
     "endfor %}",
     "121 122 123 "},
    {"{% for x in l %}{{ loop.cycle('a', 'b') }}{{ loop.changed(x > 1) }}{% endfor %}",
     "aTruebTrueaTrue"},
    {"{% for m in msgs[::-1] %}{{ m.role }}{% endfor %}|{% for m in msgs|reverse %}{{ m.rol"
     "e }}{% endfor %}",
     "assistantuser|assistantuser"},
};
static const render_case expressions_cases[] = {
    {"{{ [1, 'a', 2.5, none, true, {'k': (1, 2)}, (1,), \"it's\", 'say \"hi\"'] }}",
     "[1, 'a', 2.5, None, True, {'k': (1, 2)}, (1,), \"it's\", 'say \"hi\"']"},
    {"{{ 1e16 }} {{ 1.0 }} {{ 0.0001 }} {{ 1e-5 }} {{ 2**0.5 }} {{ 0.1 + 0.2 }} {{ 12345678"
     "9012345678.0 }} {{ -0.0 }} {{ 1e300 * 1e300 }}",
     "1e+16 1.0 0.0001 1e-05 1.4142135623730951 0.30000000000000004 1.2345678901234568e+17 "
     "-0.0 inf"},
    {"{{ 7 // -2 }} {{ -7 % 3 }} {{ 2**3**2 }} {{ -2**2 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }} {{"
     " 10 / 4 }} {{ 2 ** -1 }} {{ true + true }}",
     "-4 2 64 4 3.0 0.5 2.5 0.5 2"},
    {"{{ \"a\\x41\\u00e9\\d\\n\" }}|{{ 'it''s' }}|{{ 'a' \"b\" }}|{{ '\\'' }}",
     "aA\303\251\\d\n|its|ab|'"},
    {"{{ 'abc' * 2 }}{{ [1] * 2 }}{{ 'a' ~ 1 ~ none ~ d.zz }}{{ [1, 2] + [3] }}{{ (1,) + (2"
     ",) }}",
     "abcabc[1, 1]a1None[1, 2, 3](1, 2)"},
    {"{{ 1 < 2 < 3 }}{{ 1 < 3 < 2 }}{{ 'a' < 'b' }}{{ [1, 2] < [1, 3] }}{{ 1 == 1.0 }}{{ 'a"
     "' in 'cat' }}{{ 2 in l }}{{ 'a' in d }}{{ 'z' not in d }}",
     "TrueFalseTrueTrueTrueTrueTrueTrueTrue"},
    {"{{ 1 if false }}|{{ 1 if true else 2 }}|{{ 0 or 'x' }}|{{ 'y' and 0 }}|{{ not 1 == 2 "
     "}}",
     "|1|x|0|True"},
    {"{{ d['keys'] }}|{{ d.a }}|{{ d.b.2.c }}|{{ d.b[2]['c'] }}|{{ n.x }}|{{ d.zz is define"
     "d }}|{{ l[5] is defined }}|{{ msgs[0]['role'] }}",
     "5|1|x|x||False|False|user"},
    {"{{ 'h\303\251llo'[1] }}{{ 'h\303\251llo'[::-1] }}{{ s[1:4] }}{{ s[-3:] }}{{ l[::2] }}"
     "{{ l[-1] }}{{ l[1:] }}",
     "\303\251oll\303\251h\303\251lld  [3, 2]2[1, 2]"},
    {"{{ none is none }}{{ 1 is number }}{{ 'a' is string }}{{ d is mapping }}{{ l is seque"
     "nce }}{{ 3 is odd }}{{ 4 is even }}{{ und is defined }}{{ und is undefined }}{{ 6 is "
     "divisibleby 3 }}{{ 1 is integer }}{{ 1.0 is float }}{{ true is boolean }}{{ false is "
     "false }}{{ n is not none }}{{ l is iterable }}{{ 'A' is upper }}{{ 1 is eq 1 }}{{ 2 i"
     "s gt 1 }}{{ 1 is in l }}",
     "TrueTrueTrueTrueTrueTrueTrueFalseTrueTrueTrueTrueTrueTrueFalseTrueTrueTrueTrueTrue"},
    {"{{ range(3)|list }}{{ range(1, 10, 3)|list }}{{ range(5) }}{{ dict(a=1, b=2) }}{{ nam"
     "espace(x=1).x }}",
     "[0, 1, 2][1, 4, 7]range(0, 5){'a': 1, 'b': 2}1"},
};
static const render_case filters_cases[] = {
    {"{{ d|tojson }}|{{ [1.5, true, none, '\303\251\\n\"']|tojson }}|{{ d|tojson(sort_keys="
     "true) }}|{{ d|tojson(separators=(',', ':')) }}",
     "{\"a\": 1, \"keys\": 5, \"b\": [1, 2, {\"c\": \"x\"}]}|[1.5, true, null, \"\303\251\\"
     "n\\\"\"]|{\"a\": 1, \"b\": [1, 2, {\"c\": \"x\"}], \"keys\": 5}|{\"a\":1,\"keys\":5,"
     "\"b\":[1,2,{\"c\":\"x\"}]}"},
    {"{{ msgs|tojson(indent=2) }}", "[\n  {\n    \"role\": \"user\",\n"
                                    "    \"content\": \"hi\"\n  },\n"
                                    "  {\n    \"role\": \"assistant\",\n"
                                    "    \"content\": \"yo\",\n    \"tool_calls\": [\n"
                                    "      {\n        \"function\": {\n"
                                    "          \"name\": \"f\",\n          \"arguments\": {\n"
                                    "            \"x\": 1\n          }\n"
                                    "        }\n      }\n    ]\n  }\n"
                                    "]"},
    {"{{ '\303\251\360\237\230\200'|tojson(ensure_ascii=true) }}{{ {1: 'a', none: 'b', true"
     ": 'c', 2.5: 'd'}|tojson }}",
     "\"\\u00e9\\ud83d\\ude00\"{\"1\": \"c\", \"null\": \"b\", \"2.5\": \"d\"}"},
    {"{{ l|length }}{{ d|count }}{{ s|length }}{{ und|length }}|{{ s|upper }}|{{ s|lower }}"
     "|{{ s|title }}|{{ s|capitalize }}|{{ s|trim }}|{{ 'xax'|trim('x') }}",
     "33130|H\303\211LLO W\303\226RLD  |h\303\251llo w\303\266rld  |H\303\251llo W\303\266r"
     "ld  |H\303\251llo w\303\266rld  |H\303\251llo W\303\266rld|a"},
    {"{{ 'abcb'|replace('b', 'X') }}|{{ 'aaa'|replace('a', 'b', 2) }}|{{ l|join('-') }}|{{ "
     "msgs|join(', ', attribute='role') }}|{{ l|first }}|{{ l|last }}|{{ 'ab'|list }}",
     "aXcX|bba|3-1-2|user, assistant|3|2|['a', 'b']"},
    {"{{ und|default('x') }}|{{ ''|default('y') }}|{{ ''|default('y', true) }}|{{ und|d('z'"
     ") }}|{{ none|default('w') }}",
     "x||y|z|None"},
    {"{{ 3.7|int }}{{ '42'|int }}{{ 'x'|int }}{{ '4.5'|int }}{{ '0x1A'|int(0, 16) }}|{{ '3."
     "5'|float }}{{ 'x'|float }}{{ 3|float }}|{{ -3|abs }}{{ -2.5|abs }}|{{ 2.567|round(2) "
     "}}{{ 2.5|round }}{{ 3.5|round }}{{ 3|round }}{{ 2.1|round(0, 'ceil') }}{{ 2.9|round(0"
     ", 'floor') }}",
     "3420426|3.50.03.0|32.5|2.572.04.033.02.0"},
    {"{{ d|items|list }}|{{ d|dictsort }}|{{ {'b': 2, 'A': 1}|dictsort }}|{{ {'b': 1, 'a': "
     "2}|dictsort(by='value', reverse=true) }}",
     "[('a', 1), ('keys', 5), ('b', [1, 2, {'c': 'x'}])]|[('a', 1), ('b', [1, 2, {'c': 'x'}"
     "]), ('keys', 5)]|[('A', 1), ('b', 2)]|[('a', 2), ('b', 1)]"},
    {"{{ msgs|selectattr('role', 'equalto', 'user')|list }}|{{ msgs|rejectattr('tool_calls'"
     ", 'defined')|map(attribute='content')|list }}|{{ msgs|selectattr('tool_calls')|list|l"
     "ength }}",
     "[{'role': 'user', 'content': 'hi'}]|['hi']|1"},
    {"{{ [1, 2, 3, 4]|select('odd')|list }}{{ [1, 2, 3, 4]|reject('even')|list }}{{ [0, 1, "
     "'', 'a']|select|list }}{{ ['A', 'b']|map('lower')|list }}{{ [1, 2]|map('string')|join"
     " }}{{ [{'a': 1}, {}]|map(attribute='a', default=0)|list }}",
     "[1, 3][1, 3][1, 'a']['a', 'b']12[1, 0]"},
    {"{{ l|sort }}{{ l|sort(reverse=true) }}{{ ['b', 'A', 'c']|sort }}{{ ['b', 'A', 'c']|so"
     "rt(case_sensitive=true) }}{{ [{'n': 2}, {'n': 1}]|sort(attribute='n') }}",
     "[1, 2, 3][3, 2, 1]['A', 'b', 'c']['A', 'b', 'c'][{'n': 1}, {'n': 2}]"},
    {"{{ l|max }}{{ l|min }}{{ l|sum }}{{ [{'p': 2}, {'p': 3}]|sum(attribute='p') }}{{ ['a'"
     ", 'B', 'a', 'b']|unique|list }}{{ l|reverse|list }}{{ 'abc'|reverse }}",
     "3165['a', 'B'][2, 1, 3]cba"},
    {"{{ \"a\\n b\\n\\n c\"|indent(2) }}|{{ \"a\\nb\"|indent(2, true) }}|{{ \"a\\n\\nb\"|in"
     "dent('> ', blank=true) }}",
     "a\n   b\n\n   c|  a\n  b|a\n> \n"
     "> b"},
    {"{{ 'a b c d'|wordcount }}|{{ 'x'|center(7) }}|{{ 'hello world foo bar baz'|truncate(1"
     "2) }}|{{ l|batch(2)|list }}|{{ 'x'|string }}{{ 1|string }}{{ l|string }}",
     "4|   x   |hello...|[[3, 1], [2]]|x1[3, 1, 2]"},
    {"{{ '<a>'|safe + '<b>' }}|{{ '<a>'|e }}|{{ '<x>'|escape|string }}",
     "<a>&lt;b&gt;|&lt;a&gt;|&lt;x&gt;"},
};
static const render_case methods_cases[] = {
    {"{{ s.strip() }}|{{ s.split() }}|{{ s.split('l') }}|{{ s.split('l', 1) }}|{{ s.rsplit("
     "'l', 1) }}|{{ ' a  b '.split(' ') }}|{{ 'a\\nb\\r\\nc'.splitlines() }}",
     "H\303\251llo W\303\266rld|['H\303\251llo', 'W\303\266rld']|['H\303\251', '', 'o W\303"
     "\266r', 'd  ']|['H\303\251', 'lo W\303\266rld  ']|['H\303\251llo W\303\266r', 'd  ']|"
     "['', 'a', '', 'b', '']|['a', 'b', 'c']"},
    {"{{ s.upper() }}|{{ s.lower() }}|{{ s.title() }}|{{ 'stra\303\237e'.upper() }}|{{ '"
     "\316\243\316\221\316\243 \316\237\316\224\316\237\316\243'.lower() }}",
     "H\303\211LLO W\303\226RLD  |h\303\251llo w\303\266rld  |H\303\251llo W\303\266rld  |S"
     "TRASSE|\317\203\316\261\317\202 \316\277\316\264\316\277\317\202"},
    {"{{ s.startswith('H\303\251') }}{{ s.startswith(('x', 'H')) }}{{ s.endswith(' ') }}{{ "
     "s.find('l') }}{{ s.rfind('l') }}{{ s.find('zz') }}{{ s.count('l') }}{{ s.replace('l',"
     " 'L', 1) }}|{{ s.lstrip('H') }}|{{ s.rstrip() }}|",
     "TrueTrueTrue29-13H\303\251Llo W\303\266rld  |\303\251llo W\303\266rld  |H\303\251llo "
     "W\303\266rld|"},
    {"{{ ', '.join(['a', 'b']) }}|{{ 'a=b=c'.partition('=') }}|{{ 'a=b=c'.rpartition('=') }"
     "}|{{ 'x'.ljust(3, '.') }}|{{ '7'.zfill(3) }}|{{ 'abc'.removeprefix('a') }}|{{ '12'.is"
     "digit() }}{{ 'ab'.isalpha() }}{{ ' '.isspace() }}",
     "a, b|('a', '=', 'b=c')|('a=b', '=', 'c')|x..|007|bc|TrueTrueTrue"},
    {"{{ d.get('zz', 3) }}|{{ d.get('a') }}|{{ d.items() }}|{{ d.keys()|list }}|{{ d.values"
     "()|list }}|{{ l.index(1) }}|{{ l.count(3) }}",
     "3|1|dict_items([('a', 1), ('keys', 5), ('b', [1, 2, {'c': 'x'}])])|['a', 'keys', 'b']"
     "|[1, 5, [1, 2, {'c': 'x'}]]|1|1"},
    {"{{ '{} and {name}'.format(1, name='n') }}|{{ '{0}{0}'.format('x') }}\n", "1 and n|xx"},
};

/* ---- helpers ------------------------------------------------------------------- */

/* Compiles and renders src with the JSON object vars_json's members as variables. Returns
 * the status; *out (malloc'd) on success. */
static ferry_status render_with(const char *src, const char *vars_json,
                                const ferry_jinja_limits *lim, char **out)
{
    ferry_jinja *t = NULL;
    *out = NULL;
    ferry_status st = ferry_jinja_compile(src, strlen(src), "chat template", &t);
    if (st != FERRY_OK)
        return st;
    cJSON *vars = cJSON_Parse(vars_json ? vars_json : "{}");
    ck_assert_msg(vars != NULL, "bad test JSON");
    ferry_jinja_var v[32];
    int32_t n = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, vars)
    {
        ck_assert(n < N_OF(v));
        v[n++] = (ferry_jinja_var){e->string, e};
    }
    size_t len = 0;
    st = ferry_jinja_render(t, v, n, lim, out, &len);
    if (st == FERRY_OK)
        ck_assert_uint_eq(len, strlen(*out));
    cJSON_Delete(vars);
    ferry_jinja_free(t);
    return st;
}

static void check_cases(const render_case *cases, int32_t n)
{
    for (int32_t i = 0; i < n; i++) {
        char *out = NULL;
        ferry_status st = render_with(cases[i].src, VARS, NULL, &out);
        ck_assert_msg(st == FERRY_OK, "case %d %s: %s", i, cases[i].src, ferry_last_error());
        ck_assert_msg(!strcmp(out, cases[i].want), "case %d %s:\n  got  [%s]\n  want [%s]", i,
                      cases[i].src, out, cases[i].want);
        free(out);
    }
}

/* Fails unless rendering src gives code with a message containing each of the strings. */
static void check_error(const char *src, const char *vars_json, ferry_status code, const char *has1,
                        const char *has2)
{
    char *out = NULL;
    ferry_status st = render_with(src, vars_json, NULL, &out);
    ck_assert_msg(st == code, "%s: status %s (%s), expected %s; output [%s]", src,
                  ferry_status_name(st), ferry_last_error(), ferry_status_name(code),
                  out ? out : "");
    const char *msg = ferry_last_error();
    ck_assert_msg(!has1 || strstr(msg, has1), "%s: message [%s] lacks [%s]", src, msg, has1);
    ck_assert_msg(!has2 || strstr(msg, has2), "%s: message [%s] lacks [%s]", src, msg, has2);
    free(out);
}

/* ---- rendering, against Jinja2's output ------------------------------------------ */

START_TEST(test_jinja_whitespace_control) { check_cases(whitespace_cases, N_OF(whitespace_cases)); }
END_TEST

START_TEST(test_jinja_statements) { check_cases(statements_cases, N_OF(statements_cases)); }
END_TEST

START_TEST(test_jinja_loop_variables) { check_cases(loops_cases, N_OF(loops_cases)); }
END_TEST

START_TEST(test_jinja_expressions) { check_cases(expressions_cases, N_OF(expressions_cases)); }
END_TEST

START_TEST(test_jinja_filters) { check_cases(filters_cases, N_OF(filters_cases)); }
END_TEST

START_TEST(test_jinja_methods) { check_cases(methods_cases, N_OF(methods_cases)); }
END_TEST

/* ---- errors ---------------------------------------------------------------------- */

START_TEST(test_jinja_syntax_errors_name_the_line)
{
    check_error("a\n{% if x %}\nb", NULL, FERRY_ERR_FORMAT, "line 3", "endif");
    check_error("{{ 1 + }}", NULL, FERRY_ERR_FORMAT, "chat template line 1:", NULL);
    check_error("\n\n{% endif %}", NULL, FERRY_ERR_FORMAT, "line 3", "endif");
    check_error("{% for %}{% endfor %}", NULL, FERRY_ERR_FORMAT, "line 1", NULL);
    check_error("x\n{{ 'abc }}", NULL, FERRY_ERR_FORMAT, "line 2", NULL);
    check_error("{# never closed", NULL, FERRY_ERR_FORMAT, "Missing end of comment", NULL);
    check_error("{% raw %}never closed", NULL, FERRY_ERR_FORMAT, "raw", NULL);
    check_error("{{ (1, 2 }}", NULL, FERRY_ERR_FORMAT, "line 1", NULL);
    check_error("{{ x ]] }}", NULL, FERRY_ERR_FORMAT, "unexpected ']'", NULL);
    check_error("{% set 1 = 2 %}", NULL, FERRY_ERR_FORMAT, "assign", NULL);
    check_error("{% break %}", NULL, FERRY_ERR_FORMAT, "outside a loop", NULL);
    check_error("{% do x %}", NULL, FERRY_ERR_FORMAT, "unknown tag 'do'", NULL);
    check_error("{% macro m(a=1, b) %}{% endmacro %}", NULL, FERRY_ERR_FORMAT, "non-default", NULL);
    check_error("{{ '\\x4' }}", NULL, FERRY_ERR_FORMAT, "truncated", NULL);
    check_error("\n{{ x|nosuchfilter }}", NULL, FERRY_ERR_FORMAT, "line 2",
                "No filter named 'nosuchfilter'");
    check_error("{{ x is nosuchtest }}", NULL, FERRY_ERR_FORMAT, "No test named", NULL);
    check_error("{{ x is not }}", NULL, FERRY_ERR_FORMAT, "line 1", NULL);
}
END_TEST

START_TEST(test_jinja_unsupported_constructs_name_themselves)
{
    check_error("{% if true %}\n\n  {{ 'x'|wordwrap }}{% endif %}", NULL, FERRY_ERR_UNSUPPORTED,
                "chat template line 3: the filter 'wordwrap' is not supported", NULL);
    /* unsupported but never reached: renders, as Jinja2 does */
    char *out = NULL;
    ck_assert_int_eq(render_with("{% if false %}{{ x|wordwrap }}{% endif %}ok", NULL, NULL, &out),
                     FERRY_OK);
    ck_assert_str_eq(out, "ok");
    free(out);
    check_error("a\n{% include 'x.jinja' %}", NULL, FERRY_ERR_UNSUPPORTED, "line 2",
                "the tag 'include' is not supported");
    check_error("{% for x in y recursive %}{% endfor %}", NULL, FERRY_ERR_UNSUPPORTED, "recursive",
                NULL);
    check_error("{{ '\\N{BULLET}' }}", NULL, FERRY_ERR_UNSUPPORTED, "\\N{", NULL);
    check_error("{{ 2 ** 64 }}", NULL, FERRY_ERR_UNSUPPORTED, "64 bits", NULL);
    check_error("{{ 99999999999999999999 }}", NULL, FERRY_ERR_UNSUPPORTED, "64 bits", NULL);
    check_error("{{ '%s' % 1 }}", NULL, FERRY_ERR_UNSUPPORTED, "formatting", NULL);
    check_error("{{ 'x'.casefold() }}", NULL, FERRY_ERR_UNSUPPORTED, "'casefold'", NULL);
    check_error("{{ cycler(1, 2) }}", NULL, FERRY_ERR_UNSUPPORTED, "'cycler'", NULL);
    check_error("{{ 'x'.upper }}", NULL, FERRY_ERR_UNSUPPORTED, "printing", NULL);
    check_error("{{ [1]|select }}", NULL, FERRY_ERR_UNSUPPORTED, "generator", NULL);
}
END_TEST

START_TEST(test_jinja_runtime_errors)
{
    /* an unknown filter inside an if compiles (Jinja2's soft frames) and fails when run */
    check_error("{% if true %}\n{{ 1|nosuch }}{% endif %}", NULL, FERRY_ERR_INVALID, "line 2",
                "No filter named 'nosuch'");
    check_error("\n{{ 1 + 'a' }}", NULL, FERRY_ERR_INVALID, "line 2",
                "unsupported operand type(s) for +: 'int' and 'str'");
    check_error("{{ 'a' + 1 }}", NULL, FERRY_ERR_INVALID, "can only concatenate str", NULL);
    check_error("{{ x.y }}", NULL, FERRY_ERR_INVALID, "'x' is undefined", NULL);
    check_error("{{ m.content.strip() }}", "{\"m\": {}}", FERRY_ERR_INVALID,
                "'dict object' has no attribute 'content'", NULL);
    check_error("{{ l.append(4) }}", "{\"l\": [1]}", FERRY_ERR_INVALID,
                "access to attribute 'append' of 'list' object is unsafe", NULL);
    check_error("{{ d.update({}) }}", "{\"d\": {}}", FERRY_ERR_INVALID, "unsafe", NULL);
    check_error("{{ 1 / 0 }}", NULL, FERRY_ERR_INVALID, "division by zero", NULL);
    check_error("{{ 1 < 'a' }}", NULL, FERRY_ERR_INVALID, "not supported between", NULL);
    check_error("{% for x in 5 %}{% endfor %}", NULL, FERRY_ERR_INVALID, "not iterable", NULL);
    check_error("{% set a, b = [1] %}", NULL, FERRY_ERR_INVALID, "not enough values", NULL);
    check_error("{% set x = 1 %}{% set x.y = 2 %}", NULL, FERRY_ERR_INVALID, "namespace", NULL);
    check_error("{{ 'a' in 1 }}", NULL, FERRY_ERR_INVALID, "not iterable", NULL);
    check_error("{{ 1 in 'a' }}", NULL, FERRY_ERR_INVALID, "requires string", NULL);
    check_error("{{ none|tojson }}{{ x|tojson }}", NULL, FERRY_ERR_INVALID, "not JSON serializable",
                NULL);
    check_error("{% macro m(a) %}{% endmacro %}{{ m(1, 2) }}", NULL, FERRY_ERR_INVALID,
                "takes not more than 1", NULL);
    check_error("{% macro m(a) %}{% endmacro %}{{ m(b=2) }}", NULL, FERRY_ERR_INVALID,
                "no keyword argument 'b'", NULL);
    check_error("{{ 'x'.split('') }}", NULL, FERRY_ERR_INVALID, "empty separator", NULL);
    check_error("{{ ', '.join([1]) }}", NULL, FERRY_ERR_INVALID, "expected str instance", NULL);
    check_error("{{ [1]|batch }}", NULL, FERRY_ERR_INVALID, "missing", NULL);
    check_error("{{ 'x'|replace('a', 'b', 1, 2) }}", NULL, FERRY_ERR_INVALID, "at most 3", NULL);
    check_error("{{ 'x'|tojson(bogus=1) }}", NULL, FERRY_ERR_INVALID,
                "unexpected keyword argument 'bogus'", NULL);
    check_error("{{ {[1]: 2} }}", NULL, FERRY_ERR_INVALID, "unhashable type: 'list'", NULL);
}
END_TEST

START_TEST(test_jinja_raise_exception)
{
    check_error("{% if true %}\n{{ raise_exception('Conversation roles must alternate') }}"
                "{% endif %}",
                NULL, FERRY_ERR_INVALID, NULL, NULL);
    ck_assert_str_eq(ferry_last_error(), "chat template: Conversation roles must alternate");
    /* the message as str() gives it; text rendered before is discarded */
    char *out = NULL;
    ck_assert_int_eq(render_with("before{{ raise_exception(42) }}after", NULL, NULL, &out),
                     FERRY_ERR_INVALID);
    ck_assert_ptr_null(out);
    ck_assert_str_eq(ferry_last_error(), "chat template: 42");
    check_error("{{ raise_exception() }}", NULL, FERRY_ERR_INVALID, "missing", NULL);
}
END_TEST

/* ---- limits ---------------------------------------------------------------------- */

START_TEST(test_jinja_limits)
{
    ferry_jinja_limits lim = ferry_jinja_limits_default();
    char *out = NULL;
    /* output */
    lim.max_output_bytes = 1 << 20;
    ck_assert_int_eq(
        render_with("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", NULL, &lim, &out),
        FERRY_ERR_INVALID);
    ck_assert_msg(strstr(ferry_last_error(), "larger than 1048576 bytes"), "%s",
                  ferry_last_error());
    ck_assert_int_eq(render_with("{{ 'x' * 10000000000 }}", NULL, &lim, &out), FERRY_ERR_INVALID);
    ck_assert_int_eq(render_with("{% set x %}{% for i in range(100000) %}{{ 'xxxxxxxxxxxxxxx' }}"
                                 "{% endfor %}{% endset %}",
                                 NULL, &lim, &out),
                     FERRY_ERR_INVALID);
    /* steps: nested loops that would run 10^10 times */
    lim = ferry_jinja_limits_default();
    lim.max_steps = 1000000;
    ck_assert_int_eq(render_with("{% for i in range(100000) %}{% for j in range(100000) %}"
                                 "{% endfor %}{% endfor %}",
                                 NULL, &lim, &out),
                     FERRY_ERR_INVALID);
    ck_assert_msg(strstr(ferry_last_error(), "steps"), "%s", ferry_last_error());
    /* memory: a string doubling in a loop */
    lim = ferry_jinja_limits_default();
    lim.max_memory_bytes = 8 << 20;
    ck_assert_int_eq(render_with("{% set ns = namespace(s='x' * 1000) %}"
                                 "{% for i in range(100000) %}{% set ns.s = ns.s + 'y' * 1000 %}"
                                 "{% endfor %}{{ ns.s|length }}",
                                 NULL, &lim, &out),
                     FERRY_ERR_INVALID);
    ck_assert_msg(strstr(ferry_last_error(), "memory"), "%s", ferry_last_error());
    /* depth: unbounded recursion */
    ck_assert_int_eq(
        render_with("{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}", NULL, NULL, &out),
        FERRY_ERR_INVALID);
    ck_assert_msg(strstr(ferry_last_error(), "deeper"), "%s", ferry_last_error());
    /* the sandbox's range limit */
    ck_assert_int_eq(render_with("{{ range(1000000)|length }}", NULL, NULL, &out),
                     FERRY_ERR_INVALID);
    ck_assert_msg(strstr(ferry_last_error(), "Range too big"), "%s", ferry_last_error());
    /* nesting at compile time: brackets (the lexer) and expressions (the parser) */
    for (int depth = 200; depth <= 500; depth += 300) {
        char deep[1100];
        size_t k = (size_t)sprintf(deep, "{{ ");
        for (int i = 0; i < depth; i++)
            deep[k++] = '(';
        deep[k++] = '1';
        for (int i = 0; i < depth; i++)
            deep[k++] = ')';
        strcpy(deep + k, " }}");
        ck_assert_int_eq(render_with(deep, NULL, NULL, &out), FERRY_ERR_FORMAT);
        ck_assert_msg(strstr(ferry_last_error(), "nested"), "%s", ferry_last_error());
    }
    /* within the limits, the same shapes render */
    ck_assert_int_eq(render_with("{% macro r(n) %}{% if n < 50 %}{{ r(n + 1) }}{% else %}{{ n }}"
                                 "{% endif %}{% endmacro %}{{ r(0) }}",
                                 NULL, NULL, &out),
                     FERRY_OK);
    ck_assert_str_eq(out, "50");
    free(out);
}
END_TEST

/* ---- robustness: truncated and fuzzed templates ---------------------------------- */

static const char QWEN_LIKE[] =
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- for tool in tools %}{{- '\\n' }}"
    "{{- tool | tojson }}{%- endfor %}{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and not("
    "message.content.startswith('<tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'assistant' and '</think>' in message.content %}\n"
    "        {{- message.content.split('</think>')[-1].lstrip('\\n') }}\n"
    "    {%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
    "'<|im_end|>\\n' }}{%- endif %}\n"
    "{%- endfor %}\n"
    "{# a comment #}{% raw %}{{ raw }}{% endraw %}{{ [1, 2.5, 'x']|join(',') }}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n";

static const char QWEN_VARS[] =
    "{\"messages\": [{\"role\": \"system\", \"content\": \"sys\"}, {\"role\": \"user\", "
    "\"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"<think>x</think>\\nyo\"}],"
    " \"add_generation_prompt\": true, \"tools\": [{\"name\": \"f\"}]}";

static int status_ok(ferry_status st)
{
    return st == FERRY_OK || st == FERRY_ERR_FORMAT || st == FERRY_ERR_UNSUPPORTED ||
           st == FERRY_ERR_INVALID;
}

START_TEST(test_jinja_truncated_and_fuzzed)
{
    char *out = NULL;
    ck_assert_int_eq(render_with(QWEN_LIKE, QWEN_VARS, NULL, &out), FERRY_OK);
    ck_assert_msg(strstr(out, "<|im_start|>user\nhi<|im_end|>\n") && strstr(out, "yo") &&
                      strstr(out, "{{ raw }}1,2.5,x<|im_start|>assistant\n"),
                  "%s", out);
    free(out);
    size_t n = strlen(QWEN_LIKE);
    char *buf = malloc(n + 1);
    ck_assert_ptr_nonnull(buf);
    /* every prefix: a result or a clean error, never a crash */
    for (size_t k = 0; k <= n; k++) {
        memcpy(buf, QWEN_LIKE, k);
        buf[k] = 0;
        ferry_status st = render_with(buf, QWEN_VARS, NULL, &out);
        ck_assert_msg(status_ok(st), "prefix %zu: %s", k, ferry_status_name(st));
        free(out);
    }
    /* seeded byte mutations */
    uint64_t rng = 12345;
    static const char alphabet[] = "{}%#-+()[]'\"|.,:~=<>!*/ \n\\xab0123";
    for (int iter = 0; iter < 3000; iter++) {
        memcpy(buf, QWEN_LIKE, n + 1);
        int n_mut = 1 + (int)(tu_rand_u64(&rng) % 4);
        for (int m = 0; m < n_mut; m++) {
            size_t at = (size_t)(tu_rand_u64(&rng) % n);
            uint64_t pick = tu_rand_u64(&rng);
            buf[at] =
                (pick & 7) == 0 ? (char)(pick >> 8) : alphabet[(pick >> 8) % (sizeof alphabet - 1)];
            if (!buf[at])
                buf[at] = '{';
        }
        ferry_status st = render_with(buf, QWEN_VARS, NULL, &out);
        ck_assert_msg(status_ok(st), "mutation %d: %s", iter, ferry_status_name(st));
        free(out);
    }
    free(buf);
}
END_TEST

/* ---- threads --------------------------------------------------------------------- */

typedef struct {
    const ferry_chat_template *t;
    const cJSON *messages;
    char *first;
    int mismatches;
} thread_arg;

static void *render_thread(void *p)
{
    thread_arg *a = p;
    for (int i = 0; i < 200; i++) {
        char *out = NULL;
        size_t len;
        if (ferry_chat_template_render(a->t, a->messages, 1, NULL, &out, &len) != FERRY_OK) {
            a->mismatches++;
            continue;
        }
        if (!a->first)
            a->first = out;
        else {
            a->mismatches += strcmp(a->first, out) != 0;
            free(out);
        }
    }
    return NULL;
}

START_TEST(test_jinja_concurrent_renders)
{
    ferry_chat_template *t = NULL;
    ck_assert_int_eq(ferry_chat_template_create(QWEN_LIKE, strlen(QWEN_LIKE), NULL, &t), FERRY_OK);
    cJSON *vars = cJSON_Parse(QWEN_VARS);
    const cJSON *messages = cJSON_GetObjectItemCaseSensitive(vars, "messages");
    thread_arg args[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (thread_arg){t, messages, NULL, 0};
        ck_assert_int_eq(pthread_create(&th[i], NULL, render_thread, &args[i]), 0);
    }
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(pthread_join(th[i], NULL), 0);
    for (int i = 0; i < 4; i++) {
        ck_assert_int_eq(args[i].mismatches, 0);
        ck_assert_ptr_nonnull(args[i].first);
        ck_assert_str_eq(args[i].first, args[0].first);
    }
    for (int i = 0; i < 4; i++)
        free(args[i].first);
    cJSON_Delete(vars);
    ferry_chat_template_free(t);
}
END_TEST

/* ---- the chat layer -------------------------------------------------------------- */

static void write_config(const char *dir, const char *json)
{
    char path[600];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    fputs(json, f);
    fclose(f);
}

static char *chat_render(const ferry_chat_template *t, const char *messages_json, int agp,
                         const char *extra_json)
{
    cJSON *m = cJSON_Parse(messages_json);
    cJSON *x = extra_json ? cJSON_Parse(extra_json) : NULL;
    char *out = NULL;
    size_t len;
    ferry_status st = ferry_chat_template_render(t, m, agp, x, &out, &len);
    ck_assert_msg(st == FERRY_OK, "%s", ferry_last_error());
    cJSON_Delete(m);
    cJSON_Delete(x);
    return out;
}

START_TEST(test_chat_template_missing)
{
    char dir[512];
    tu_scratch_dir(dir, "chat-missing");
    ferry_chat_template *t = NULL;
    /* no tokenizer_config.json at all */
    ck_assert_int_eq(ferry_chat_template_load(dir, NULL, &t), FERRY_ERR_UNSUPPORTED);
    ck_assert_msg(strstr(ferry_last_error(), "pass --chat-template FILE"), "%s",
                  ferry_last_error());
    /* a config without chat_template */
    write_config(dir, "{\"bos_token\": \"<s>\"}");
    ck_assert_int_eq(ferry_chat_template_load(dir, NULL, &t), FERRY_ERR_UNSUPPORTED);
    char want[700];
    snprintf(want, sizeof want,
             "%s has no chat_template in tokenizer_config.json; pass "
             "--chat-template FILE",
             dir);
    ck_assert_str_eq(ferry_last_error(), want);
    ck_assert_ptr_null(t);
    /* an override file: loads, with the config's special tokens */
    char path[512];
    const char *text = "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}";
    tu_write_file(path, "chat-override.jinja", text, strlen(text));
    ck_assert_int_eq(ferry_chat_template_load(dir, path, &t), FERRY_OK);
    char *out = chat_render(t, "[{\"role\": \"user\", \"content\": \"a\"}]", 1, NULL);
    ck_assert_str_eq(out, "<s>[a]");
    free(out);
    ferry_chat_template_free(t);
    t = NULL;
    /* an override that does not exist */
    ck_assert_int_eq(ferry_chat_template_load(dir, "/nonexistent/x.jinja", &t), FERRY_ERR_IO);
    ck_assert_int_eq(ferry_chat_template_load(NULL, NULL, &t), FERRY_ERR_INVALID);
}
END_TEST

START_TEST(test_chat_template_config_shapes)
{
    char dir[512];
    tu_scratch_dir(dir, "chat-shapes");
    ferry_chat_template *t = NULL;
    /* AddedToken objects, null tokens, the list form with "default" */
    write_config(dir, "{\"bos_token\": {\"__type\": \"AddedToken\", \"content\": \"<B>\"}, "
                      "\"eos_token\": \"</E>\", \"unk_token\": null, \"pad_token\": \"\", "
                      "\"additional_special_tokens\": [\"<x>\", {\"content\": \"<y>\"}], "
                      "\"chat_template\": [{\"name\": \"tool_use\", \"template\": \"T\"}, "
                      "{\"name\": \"default\", \"template\": \"{{ bos_token }}|{{ eos_token }}|"
                      "{{ unk_token is defined }}|{{ pad_token is defined }}|"
                      "{{ additional_special_tokens }}|{{ tools }}|{{ documents }}|"
                      "{{ add_generation_prompt }}|{{ enable_thinking }}\"}]}");
    ck_assert_int_eq(ferry_chat_template_load(dir, NULL, &t), FERRY_OK);
    char *out = chat_render(t, "[]", 0, "{\"enable_thinking\": false}");
    ck_assert_str_eq(out, "<B>|</E>|False|False|['<x>', '<y>']|None|None|False|False");
    free(out);
    /* an extra variable replaces a special token; tools given through extra */
    out = chat_render(t, "[]", 1, "{\"bos_token\": \"<b2>\", \"tools\": [1]}");
    ck_assert_str_eq(out, "<b2>|</E>|False|False|['<x>', '<y>']|[1]|None|True|");
    free(out);
    /* messages may not come through extra; messages must be a list */
    cJSON *m = cJSON_Parse("[]"), *x = cJSON_Parse("{\"messages\": []}");
    size_t len;
    ck_assert_int_eq(ferry_chat_template_render(t, m, 1, x, &out, &len), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_chat_template_render(t, x, 1, NULL, &out, &len), FERRY_ERR_INVALID);
    cJSON_Delete(m);
    cJSON_Delete(x);
    ferry_chat_template_free(t);
    t = NULL;
    /* chat_template.jinja beside the config wins */
    char path[600];
    snprintf(path, sizeof path, "%s/chat_template.jinja", dir);
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    fputs("from the file {{ eos_token }}\n", f);
    fclose(f);
    ck_assert_int_eq(ferry_chat_template_load(dir, NULL, &t), FERRY_OK);
    out = chat_render(t, "[]", 1, NULL);
    ck_assert_str_eq(out, "from the file </E>");
    free(out);
    ferry_chat_template_free(t);
    t = NULL;
    remove(path);
    /* a list without "default" */
    write_config(dir, "{\"chat_template\": [{\"name\": \"tool_use\", \"template\": \"x\"}]}");
    ck_assert_int_eq(ferry_chat_template_load(dir, NULL, &t), FERRY_ERR_UNSUPPORTED);
    ck_assert_msg(strstr(ferry_last_error(), "default"), "%s", ferry_last_error());
    /* malformed: not JSON, truncated, wrong types */
    write_config(dir, "{\"chat_template\": \"x\"");
    ck_assert_int_eq(ferry_chat_template_load(dir, NULL, &t), FERRY_ERR_FORMAT);
    write_config(dir, "not json");
    ck_assert_int_eq(ferry_chat_template_load(dir, NULL, &t), FERRY_ERR_FORMAT);
    write_config(dir, "{\"chat_template\": 5}");
    ck_assert_int_eq(ferry_chat_template_load(dir, NULL, &t), FERRY_ERR_FORMAT);
    write_config(dir, "{\"chat_template\": [{\"name\": \"default\"}]}");
    ck_assert_int_eq(ferry_chat_template_load(dir, NULL, &t), FERRY_ERR_FORMAT);
    write_config(dir, "{\"chat_template\": \"x\", \"bos_token\": 5}");
    ck_assert_int_eq(ferry_chat_template_load(dir, NULL, &t), FERRY_ERR_FORMAT);
    write_config(dir, "{\"chat_template\": \"{% if %}\"}");
    ck_assert_int_eq(ferry_chat_template_load(dir, NULL, &t), FERRY_ERR_FORMAT);
    ck_assert_msg(strstr(ferry_last_error(), "chat template line 1"), "%s", ferry_last_error());
    ck_assert_ptr_null(t);
}
END_TEST

START_TEST(test_chat_template_fixture_qwen3)
{
    /* the fixture's real Qwen3 template; the expected text is Jinja2's */
    const char *dir = FERRY_SOURCE_DIR "/../shared/fixtures/moe-families/tiny-qwen3_moe";
    ferry_chat_template *t = NULL;
    ferry_status st = ferry_chat_template_load(dir, NULL, &t);
    if (st == FERRY_ERR_IO || (st == FERRY_ERR_UNSUPPORTED && !strstr(ferry_last_error(), "line")))
        return; /* the shared fixtures are not there */
    ck_assert_msg(st == FERRY_OK, "%s", ferry_last_error());
    char *out = chat_render(t,
                            "[{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": "
                            "\"user\", \"content\": \"2+2?\"}, {\"role\": \"assistant\", "
                            "\"content\": \"<think>\\nadd\\n</think>\\n\\n4\"}, {\"role\": "
                            "\"user\", \"content\": \"and 3+3?\"}]",
                            1, "{\"enable_thinking\": false}");
    ck_assert_str_eq(out, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?"
                          "<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n"
                          "and 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
    free(out);
    ferry_chat_template_free(t);
}
END_TEST

static Suite *jinja_suite(void)
{
    Suite *s = suite_create("jinja");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_jinja_whitespace_control);
    tcase_add_test(tc, test_jinja_statements);
    tcase_add_test(tc, test_jinja_loop_variables);
    tcase_add_test(tc, test_jinja_expressions);
    tcase_add_test(tc, test_jinja_filters);
    tcase_add_test(tc, test_jinja_methods);
    tcase_add_test(tc, test_jinja_syntax_errors_name_the_line);
    tcase_add_test(tc, test_jinja_unsupported_constructs_name_themselves);
    tcase_add_test(tc, test_jinja_runtime_errors);
    tcase_add_test(tc, test_jinja_raise_exception);
    tcase_add_test(tc, test_jinja_limits);
    tcase_add_test(tc, test_jinja_truncated_and_fuzzed);
    tcase_add_test(tc, test_jinja_concurrent_renders);
    tcase_add_test(tc, test_chat_template_missing);
    tcase_add_test(tc, test_chat_template_config_shapes);
    tcase_add_test(tc, test_chat_template_fixture_qwen3);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(jinja_suite()); }
