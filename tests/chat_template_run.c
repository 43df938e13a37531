/*
 * tests/chat_template_run.c: ferry's side of tests/test_chat_template.py.
 *
 *   chat_template_run TEMPLATE_FILE CASES.json
 *
 * CASES.json is a list of {"messages": [...], "add_generation_prompt": bool, "vars": {...}}
 * ("vars": the special tokens and extra variables, tools included). The template is the
 * file's text; each case renders with its vars as the extra variables. One JSON line per
 * case on stdout: {"ok": true, "text": "..."} or {"ok": false, "error": "..."}.
 */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileio.h"
#include "format/chat.h"

static void print_line(cJSON *obj)
{
    char *s = cJSON_PrintUnformatted(obj);
    if (!s) {
        fprintf(stderr, "chat_template_run: out of memory\n");
        exit(1);
    }
    fputs(s, stdout);
    fputc('\n', stdout);
    free(s);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: chat_template_run TEMPLATE_FILE CASES.json\n");
        return 2;
    }
    char *tmpl = NULL, *cases_text = NULL;
    size_t tmpl_len, cases_len;
    if (ferry_read_small_file(argv[1], (uint64_t)64 << 20, 0, &tmpl, &tmpl_len) != FERRY_OK ||
        ferry_read_small_file(argv[2], (uint64_t)1 << 30, 0, &cases_text, &cases_len) != FERRY_OK) {
        fprintf(stderr, "chat_template_run: %s\n", ferry_last_error());
        return 1;
    }
    cJSON *cases = cJSON_ParseWithLength(cases_text, cases_len);
    if (!cJSON_IsArray(cases)) {
        fprintf(stderr, "chat_template_run: %s is not a JSON list\n", argv[2]);
        return 1;
    }
    ferry_chat_template *t = NULL;
    ferry_status load = ferry_chat_template_create(tmpl, tmpl_len, NULL, &t);
    char load_error[1100];
    snprintf(load_error, sizeof load_error, "%s: %s", ferry_status_name(load), ferry_last_error());
    const cJSON *c;
    cJSON_ArrayForEach(c, cases)
    {
        cJSON *line = cJSON_CreateObject();
        if (load != FERRY_OK) {
            cJSON_AddFalseToObject(line, "ok");
            cJSON_AddStringToObject(line, "error", load_error);
        } else {
            const cJSON *messages = cJSON_GetObjectItemCaseSensitive(c, "messages");
            const cJSON *agp = cJSON_GetObjectItemCaseSensitive(c, "add_generation_prompt");
            const cJSON *vars = cJSON_GetObjectItemCaseSensitive(c, "vars");
            char *out = NULL;
            size_t len = 0;
            ferry_status st = ferry_chat_template_render(
                t, messages, cJSON_IsTrue(agp), cJSON_IsObject(vars) ? vars : NULL, &out, &len);
            if (st == FERRY_OK) {
                cJSON_AddTrueToObject(line, "ok");
                cJSON_AddStringToObject(line, "text", out);
                if (strlen(out) != len) /* a NUL inside: JSON would cut it; say so */
                    cJSON_AddNumberToObject(line, "length", (double)len);
            } else {
                char msg[1100];
                snprintf(msg, sizeof msg, "%s: %s", ferry_status_name(st), ferry_last_error());
                cJSON_AddFalseToObject(line, "ok");
                cJSON_AddStringToObject(line, "error", msg);
            }
            free(out);
        }
        print_line(line);
        cJSON_Delete(line);
    }
    ferry_chat_template_free(t);
    cJSON_Delete(cases);
    free(tmpl);
    free(cases_text);
    return 0;
}
