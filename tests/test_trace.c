/*
 * tests/test_trace.c: routing traces ("moe-routing-trace v1", predictor/trace.h): the
 * bundled trace of tiny-moe-code (tests/fixtures/tiny-moe-code.trace, a copy of
 * ../shared/fixtures/tiny-moe-code.trace), byte-identical save, building with and without
 * probabilities, slicing, and every malformed file the loader must refuse with a message
 * naming the file and the field or token at fault.
 */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "predictor/trace.h"
#include "tests/check_util.h"

#define FIXTURE FERRY_SOURCE_DIR "/tests/fixtures/tiny-moe-code.trace"

/* ---- the bundled trace ---------------------------------------------------------------- */

START_TEST(test_trace_load_fixture)
{
    ferry_trace *tr = NULL;
    ck_assert_msg(ferry_trace_load(FIXTURE, &tr) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(tr->n_layers, 6);
    ck_assert_int_eq(tr->n_experts, 8);
    ck_assert_int_eq(tr->top_k, 2);
    ck_assert_int_eq(tr->n_tokens, 120397);
    ck_assert_int_eq(tr->n_seqs, 246);
    ck_assert_str_eq(tr->model, "tiny-moe-code");
    ck_assert_ptr_null(tr->probs);
    int64_t sum = 0;
    for (int32_t i = 0; i < tr->n_seqs; i++) {
        ck_assert(tr->seq_lengths[i] >= 1 && tr->seq_lengths[i] <= 512);
        sum += tr->seq_lengths[i];
    }
    ck_assert_int_eq(sum, 120397);
    ck_assert_int_eq(tr->seq_lengths[0], 512);

    /* the body is the bytes after the first '\n', in order */
    size_t len;
    char *raw = tu_read_file(FIXTURE, &len);
    const char *nl = memchr(raw, '\n', len);
    ck_assert_ptr_nonnull(nl);
    size_t body = (size_t)(nl + 1 - raw);
    ck_assert_uint_eq(len - body, (size_t)120397 * 6 * 2);
    ck_assert(memcmp(tr->experts, raw + body, len - body) == 0);
    ck_assert(memcmp(ferry_trace_at(tr, 1000, 3), raw + body + (1000 * 6 + 3) * 2, 2) == 0);
    free(raw);

    /* routing is far from uniform: some experts of some layers dominate */
    int64_t count[8] = {0};
    for (int64_t t = 0; t < tr->n_tokens; t++)
        for (int32_t j = 0; j < 2; j++)
            count[ferry_trace_at(tr, t, 0)[j]]++;
    int64_t mx = 0;
    for (int e = 0; e < 8; e++)
        mx = count[e] > mx ? count[e] : mx;
    ck_assert(mx > 2 * 120397 * 2 / 8);
    ferry_trace_free(tr);
}
END_TEST

START_TEST(test_trace_save_is_byte_identical)
{
    char dir[512], path[600];
    tu_scratch_dir(dir, "trace_round_trip");
    snprintf(path, sizeof path, "%s/copy.trace", dir);
    ferry_trace *tr = NULL, *back = NULL;
    ck_assert_msg(ferry_trace_load(FIXTURE, &tr) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_msg(ferry_trace_save(tr, path) == FERRY_OK, "%s", ferry_last_error());
    size_t a_len, b_len;
    char *a = tu_read_file(FIXTURE, &a_len);
    char *b = tu_read_file(path, &b_len);
    ck_assert_uint_eq(a_len, b_len);
    ck_assert_msg(memcmp(a, b, a_len) == 0, "saved trace differs from the fixture");
    free(a);
    free(b);

    ck_assert_msg(ferry_trace_load(path, &back) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(back->n_tokens, tr->n_tokens);
    ck_assert_int_eq(back->n_seqs, tr->n_seqs);
    ck_assert(memcmp(back->seq_lengths, tr->seq_lengths, (size_t)tr->n_seqs * 8) == 0);
    ck_assert(memcmp(back->experts, tr->experts, (size_t)tr->n_tokens * 12) == 0);
    /* no temporary file ("copy.trace.<id>.tmp") is left behind: the folder holds the trace */
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    const struct dirent *e;
    while ((e = readdir(d)))
        ck_assert_msg(!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") ||
                      !strcmp(e->d_name, "copy.trace"), "%s left behind", e->d_name);
    closedir(d);
    ferry_trace_free(back);
    ferry_trace_free(tr);
}
END_TEST

START_TEST(test_trace_save_to_missing_folder_is_io)
{
    ferry_trace *tr = NULL;
    ck_assert_int_eq(ferry_trace_create(2, 4, 2, 0, "m", &tr), FERRY_OK);
    const char *path = FERRY_BINARY_DIR "/no/such/folder/x.trace";
    ck_assert_int_eq(ferry_trace_save(tr, path), FERRY_ERR_IO);
    /* the temporary it could not create: "x.trace.<id>.tmp" */
    const char *tmp = strstr(ferry_last_error(), "x.trace.");
    ck_assert_msg(tmp && strstr(tmp, ".tmp: cannot create"), "%s", ferry_last_error());
    ferry_trace_free(tr);
}
END_TEST

/* ---- building ---------------------------------------------------------------------- */

/* Fills probs (n, L, E) with a normalised pattern that depends on t, l, e. */
static void fill_probs(float *p, int64_t n, int32_t L, int32_t E, int32_t salt)
{
    for (int64_t t = 0; t < n; t++)
        for (int32_t l = 0; l < L; l++) {
            float *r = p + ((size_t)t * (size_t)L + (size_t)l) * (size_t)E;
            float s = 0;
            for (int32_t e = 0; e < E; e++)
                s += r[e] = (float)(1 + ((t * 7 + l * 3 + e * 5 + salt) % 11));
            for (int32_t e = 0; e < E; e++)
                r[e] /= s;
        }
}

START_TEST(test_trace_create_append_save_load_with_probs)
{
    enum { L = 3, E = 5, K = 2 };
    ferry_trace *tr = NULL, *back = NULL;
    ck_assert_int_eq(ferry_trace_create(L, E, K, 1, "hand \"made\"\n", &tr), FERRY_OK);
    ck_assert_ptr_nonnull(tr->probs);
    uint8_t ids[4 * L * K];
    float probs[4 * L * E];
    uint64_t rng = 7;
    for (int i = 0; i < 4 * L; i++) {
        uint8_t a = (uint8_t)(tu_rand_u64(&rng) % (E - 1));
        ids[i * K] = a;
        ids[i * K + 1] = (uint8_t)(a + 1 + tu_rand_u64(&rng) % (uint64_t)(E - 1 - a));
    }
    fill_probs(probs, 4, L, E, 0);
    ck_assert_int_eq(ferry_trace_append(tr, 3, ids, probs), FERRY_OK);
    ck_assert_int_eq(ferry_trace_append(tr, 1, ids + 3 * L * K, probs + 3 * L * E), FERRY_OK);
    ck_assert_int_eq(tr->n_tokens, 4);
    ck_assert_int_eq(tr->n_seqs, 2);

    char dir[512], path[600];
    tu_scratch_dir(dir, "trace_probs");
    snprintf(path, sizeof path, "%s/p.trace", dir);
    ck_assert_msg(ferry_trace_save(tr, path) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_msg(ferry_trace_load(path, &back) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_str_eq(back->model, "hand \"made\"\n");
    ck_assert_int_eq(back->n_tokens, 4);
    ck_assert_int_eq(back->n_seqs, 2);
    ck_assert_int_eq(back->seq_lengths[0], 3);
    ck_assert_int_eq(back->seq_lengths[1], 1);
    ck_assert(memcmp(back->experts, ids, sizeof ids) == 0);
    ck_assert_ptr_nonnull(back->probs);
    ck_assert(memcmp(back->probs, probs, sizeof probs) == 0);
    size_t len;
    char *raw = tu_read_file(path, &len);
    ck_assert_ptr_nonnull(strstr(raw, "\"probs\": \"float32 [tokens][layers][experts]"));
    ck_assert_uint_eq(len, strchr(raw, '\n') + 1 - raw + sizeof ids + sizeof probs);
    free(raw);
    ferry_trace_free(back);
    ferry_trace_free(tr);
}
END_TEST

START_TEST(test_trace_empty_round_trip)
{
    ferry_trace *tr = NULL, *back = NULL;
    ck_assert_int_eq(ferry_trace_create(4, 8, 2, 1, NULL, &tr), FERRY_OK);
    char dir[512], path[600];
    tu_scratch_dir(dir, "trace_empty");
    snprintf(path, sizeof path, "%s/e.trace", dir);
    ck_assert_msg(ferry_trace_save(tr, path) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_msg(ferry_trace_load(path, &back) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(back->n_tokens, 0);
    ck_assert_int_eq(back->n_seqs, 0);
    ck_assert_int_eq(back->n_layers, 4);
    ck_assert_ptr_nonnull(back->probs); /* still a trace that keeps probabilities */
    ck_assert_str_eq(back->model, "");
    ferry_trace_free(back);
    ferry_trace_free(tr);
}
END_TEST

START_TEST(test_trace_append_rejects_bad_input)
{
    ferry_trace *tr = NULL;
    ck_assert_int_eq(ferry_trace_create(2, 4, 2, 0, "m", &tr), FERRY_OK);
    uint8_t good[2 * 2 * 2] = {0, 1, 2, 3, 1, 3, 0, 2};
    ck_assert_int_eq(ferry_trace_append(tr, 2, good, NULL), FERRY_OK);

    uint8_t big[4] = {0, 1, 2, 4};
    ck_assert_int_eq(ferry_trace_append(tr, 1, big, NULL), FERRY_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(ferry_last_error(), "token 0 layer 1"));
    uint8_t same[4] = {1, 1, 2, 3};
    ck_assert_int_eq(ferry_trace_append(tr, 1, same, NULL), FERRY_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(ferry_last_error(), "token 0 layer 0"));
    uint8_t down[4] = {0, 1, 3, 2};
    ck_assert_int_eq(ferry_trace_append(tr, 1, down, NULL), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_trace_append(tr, 0, good, NULL), FERRY_ERR_INVALID);
    /* the failures changed nothing */
    ck_assert_int_eq(tr->n_tokens, 2);
    ck_assert_int_eq(tr->n_seqs, 1);
    ck_assert(memcmp(tr->experts, good, sizeof good) == 0);

    ferry_trace *tp = NULL;
    ck_assert_int_eq(ferry_trace_create(2, 4, 2, 1, "m", &tp), FERRY_OK);
    ck_assert_int_eq(ferry_trace_append(tp, 1, good, NULL), FERRY_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(ferry_last_error(), "probabilities"));
    ferry_trace_free(tp);

    ck_assert_int_eq(ferry_trace_create(2, 300, 2, 0, "m", &tp), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_trace_create(2, 4, 5, 0, "m", &tp), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_trace_create(0, 4, 2, 0, "m", &tp), FERRY_ERR_INVALID);
    char long_name[200];
    memset(long_name, 'x', sizeof long_name - 1);
    long_name[sizeof long_name - 1] = 0;
    ck_assert_int_eq(ferry_trace_create(2, 4, 2, 0, long_name, &tp), FERRY_ERR_INVALID);
    ferry_trace_free(tr);
}
END_TEST

/* ---- slicing ---------------------------------------------------------------------- */

START_TEST(test_trace_slice_cuts_sequences)
{
    ferry_trace *tr = NULL, *s = NULL;
    ck_assert_msg(ferry_trace_load(FIXTURE, &tr) == FERRY_OK, "%s", ferry_last_error());
    /* [500, 1100) cuts the first sequence (512) and the third (512, starting at 1024) */
    ck_assert_int_eq(ferry_trace_slice(tr, 500, 600, &s), FERRY_OK);
    ck_assert_int_eq(s->n_tokens, 600);
    ck_assert_int_eq(s->n_seqs, 3);
    ck_assert_int_eq(s->seq_lengths[0], 12);
    ck_assert_int_eq(s->seq_lengths[1], 512);
    ck_assert_int_eq(s->seq_lengths[2], 76);
    ck_assert(memcmp(s->experts, ferry_trace_at(tr, 500, 0), 600 * 12) == 0);
    ck_assert_str_eq(s->model, "tiny-moe-code");
    ferry_trace_free(s);

    /* 80% / 20%: the two parts hold every token once */
    int64_t n_fit = tr->n_tokens * 8 / 10;
    ferry_trace *a = NULL, *b = NULL;
    ck_assert_int_eq(ferry_trace_slice(tr, 0, n_fit, &a), FERRY_OK);
    ck_assert_int_eq(ferry_trace_slice(tr, n_fit, tr->n_tokens - n_fit, &b), FERRY_OK);
    ck_assert_int_eq(a->n_tokens + b->n_tokens, tr->n_tokens);
    int64_t sa = 0, sb = 0;
    for (int32_t i = 0; i < a->n_seqs; i++)
        sa += a->seq_lengths[i];
    for (int32_t i = 0; i < b->n_seqs; i++)
        sb += b->seq_lengths[i];
    ck_assert_int_eq(sa, a->n_tokens);
    ck_assert_int_eq(sb, b->n_tokens);
    ck_assert(a->n_seqs + b->n_seqs >= tr->n_seqs);
    ck_assert(memcmp(b->experts, ferry_trace_at(tr, n_fit, 0), (size_t)b->n_tokens * 12) == 0);
    ferry_trace_free(a);
    ferry_trace_free(b);

    /* empty and out of range */
    ck_assert_int_eq(ferry_trace_slice(tr, 10, 0, &s), FERRY_OK);
    ck_assert_int_eq(s->n_tokens, 0);
    ck_assert_int_eq(s->n_seqs, 0);
    ferry_trace_free(s);
    s = NULL;
    ck_assert_int_eq(ferry_trace_slice(tr, 120000, 398, &s), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_trace_slice(tr, -1, 10, &s), FERRY_ERR_INVALID);
    ck_assert_ptr_null(s);
    ferry_trace_free(tr);
}
END_TEST

START_TEST(test_trace_slice_keeps_probs)
{
    enum { L = 2, E = 4, K = 2 };
    ferry_trace *tr = NULL, *s = NULL;
    ck_assert_int_eq(ferry_trace_create(L, E, K, 1, "p", &tr), FERRY_OK);
    uint8_t ids[5 * L * K];
    float probs[5 * L * E];
    for (int i = 0; i < 5 * L; i++) {
        ids[2 * i] = (uint8_t)(i % 3);
        ids[2 * i + 1] = 3;
    }
    fill_probs(probs, 5, L, E, 1);
    ck_assert_int_eq(ferry_trace_append(tr, 2, ids, probs), FERRY_OK);
    ck_assert_int_eq(ferry_trace_append(tr, 3, ids + 2 * L * K, probs + 2 * L * E), FERRY_OK);
    ck_assert_int_eq(ferry_trace_slice(tr, 1, 3, &s), FERRY_OK);
    ck_assert_int_eq(s->n_seqs, 2);
    ck_assert_int_eq(s->seq_lengths[0], 1);
    ck_assert_int_eq(s->seq_lengths[1], 2);
    ck_assert_ptr_nonnull(s->probs);
    ck_assert(memcmp(s->probs, probs + L * E, 3 * L * E * sizeof(float)) == 0);
    ck_assert(memcmp(s->experts, ids + L * K, 3 * L * K) == 0);
    ferry_trace_free(s);
    ferry_trace_free(tr);
}
END_TEST

/* ---- malformed files -------------------------------------------------------------- */

/* A valid small trace: 2 layers, 4 experts, top 2, 3 tokens in sequences [2, 1]. */
#define GOOD_HEADER                                                                             \
    "{\"format\": \"moe-routing-trace v1\", \"model\": \"m\", \"layers\": 2, \"experts\": 4, " \
    "\"top_k\": 2, \"tokens\": 3, \"sequence_lengths\": [2, 1], \"body\": \"ids\"}\n"
static const uint8_t GOOD_BODY[12] = {0, 1, 2, 3, 1, 2, 0, 3, 0, 2, 1, 3};

/* Writes header + body to a scratch file and loads it; the load must fail with code and a
 * message that names the file and contains want. */
static void expect_bad(const char *name, const char *header, const uint8_t *body, size_t body_len,
                       ferry_status code, const char *want)
{
    size_t hl = strlen(header);
    char *buf = malloc(hl + body_len + 1);
    ck_assert_ptr_nonnull(buf);
    memcpy(buf, header, hl);
    if (body_len)
        memcpy(buf + hl, body, body_len);
    char path[512];
    tu_write_file(path, name, buf, hl + body_len);
    free(buf);
    ferry_trace *tr = (ferry_trace *)0x1;
    ferry_status st = ferry_trace_load(path, &tr);
    ck_assert_msg(st == code, "%s: status %d, expected %d (%s)", name, (int)st, (int)code,
                  ferry_last_error());
    ck_assert_msg(tr == (ferry_trace *)0x1, "%s: out written on failure", name);
    ck_assert_msg(strstr(ferry_last_error(), path) != NULL, "%s: message '%s' does not name %s",
                  name, ferry_last_error(), path);
    ck_assert_msg(strstr(ferry_last_error(), want) != NULL, "%s: message '%s' lacks '%s'", name,
                  ferry_last_error(), want);
}

START_TEST(test_trace_good_small_file_loads)
{
    char path[512];
    char buf[512];
    size_t hl = strlen(GOOD_HEADER);
    memcpy(buf, GOOD_HEADER, hl);
    memcpy(buf + hl, GOOD_BODY, sizeof GOOD_BODY);
    tu_write_file(path, "good.trace", buf, hl + sizeof GOOD_BODY);
    ferry_trace *tr = NULL;
    ck_assert_msg(ferry_trace_load(path, &tr) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(tr->n_tokens, 3);
    ck_assert_int_eq(ferry_trace_at(tr, 2, 1)[0], 1);
    ferry_trace_free(tr);
}
END_TEST

START_TEST(test_trace_malformed_body)
{
    expect_bad("truncated.trace", GOOD_HEADER, GOOD_BODY, 11, FERRY_ERR_FORMAT, "truncated");
    expect_bad("headeronly.trace", GOOD_HEADER, NULL, 0, FERRY_ERR_FORMAT, "body has 0 bytes");
    uint8_t longer[13];
    memcpy(longer, GOOD_BODY, 12);
    longer[12] = 0;
    expect_bad("trailing.trace", GOOD_HEADER, longer, 13, FERRY_ERR_FORMAT, "1 bytes after");

    uint8_t b[12];
    memcpy(b, GOOD_BODY, 12);
    b[7] = 4; /* token 1, layer 1, slot 1 */
    expect_bad("idbig.trace", GOOD_HEADER, b, 12, FERRY_ERR_FORMAT,
               "token 1 (sequence 0, position 1) layer 1: expert id 4 >= experts = 4");
    memcpy(b, GOOD_BODY, 12);
    b[8] = 2; /* token 2, layer 0: 2, 2 */
    expect_bad("idsame.trace", GOOD_HEADER, b, 12, FERRY_ERR_FORMAT,
               "token 2 (sequence 1, position 0) layer 0: expert ids 2, 2 are not strictly "
               "ascending");
    memcpy(b, GOOD_BODY, 12);
    b[2] = 3;
    b[3] = 2; /* token 0, layer 1: 3, 2 */
    expect_bad("iddown.trace", GOOD_HEADER, b, 12, FERRY_ERR_FORMAT, "token 0 (sequence 0, "
               "position 0) layer 1: expert ids 3, 2");
}
END_TEST

START_TEST(test_trace_malformed_header)
{
    expect_bad("empty.trace", "", NULL, 0, FERRY_ERR_FORMAT, "empty");
    expect_bad("nonewline.trace", "{\"format\": \"moe-routing-trace v1\"", NULL, 0,
               FERRY_ERR_FORMAT, "no header line");
    expect_bad("badjson.trace", "{\"format\": \"moe-routing-trace v1\", \"layers\": }\n",
               GOOD_BODY, 12, FERRY_ERR_FORMAT, "not valid JSON");
    expect_bad("array.trace", "[1, 2]\n", NULL, 0, FERRY_ERR_FORMAT, "not a JSON object");
    expect_bad("format.trace",
               "{\"format\": \"moe-routing-trace v2\", \"layers\": 2, \"experts\": 4, \"top_k\": "
               "2, \"tokens\": 3, \"sequence_lengths\": [2, 1]}\n",
               GOOD_BODY, 12, FERRY_ERR_FORMAT, "'format'");

    /* each required field missing in turn */
    static const char *fields[] = {"format", "layers", "experts", "top_k", "tokens",
                                   "sequence_lengths"};
    static const char *values[] = {"\"moe-routing-trace v1\"", "2", "4", "2", "3", "[2, 1]"};
    for (int skip = 0; skip < 6; skip++) {
        char h[512] = "{";
        for (int i = 0; i < 6; i++) {
            if (i == skip)
                continue;
            char part[128];
            snprintf(part, sizeof part, "%s\"%s\": %s", strlen(h) > 1 ? ", " : "", fields[i],
                     values[i]);
            strcat(h, part);
        }
        strcat(h, "}\n");
        char name[64], want[64];
        snprintf(name, sizeof name, "missing_%s.trace", fields[skip]);
        snprintf(want, sizeof want, "header field '%s' is missing", fields[skip]);
        expect_bad(name, h, GOOD_BODY, 12, FERRY_ERR_FORMAT, want);
    }
}
END_TEST

/* A header with the given field values (strings spliced in as JSON). */
static void header_with(char *h, size_t cap, const char *layers, const char *experts,
                        const char *top_k, const char *tokens, const char *lens)
{
    snprintf(h, cap,
             "{\"format\": \"moe-routing-trace v1\", \"model\": \"m\", \"layers\": %s, "
             "\"experts\": %s, \"top_k\": %s, \"tokens\": %s, \"sequence_lengths\": %s}\n",
             layers, experts, top_k, tokens, lens);
}

START_TEST(test_trace_malformed_fields)
{
    char h[512];
    header_with(h, sizeof h, "0", "4", "2", "3", "[2, 1]");
    expect_bad("layers0.trace", h, GOOD_BODY, 12, FERRY_ERR_FORMAT, "'layers' = 0 is outside");
    header_with(h, sizeof h, "2", "257", "2", "3", "[2, 1]");
    expect_bad("experts257.trace", h, GOOD_BODY, 12, FERRY_ERR_FORMAT, "'experts' = 257");
    header_with(h, sizeof h, "2", "4", "5", "3", "[2, 1]");
    expect_bad("topk.trace", h, GOOD_BODY, 12, FERRY_ERR_FORMAT, "'top_k' = 5 is outside [1, 4]");
    header_with(h, sizeof h, "2", "4", "2", "2.5", "[2, 1]");
    expect_bad("tokensfrac.trace", h, GOOD_BODY, 12, FERRY_ERR_FORMAT,
               "'tokens' is not an integer");
    header_with(h, sizeof h, "\"2\"", "4", "2", "3", "[2, 1]");
    expect_bad("layersstr.trace", h, GOOD_BODY, 12, FERRY_ERR_FORMAT,
               "'layers' is not an integer");
    header_with(h, sizeof h, "2", "4", "2", "-3", "[2, 1]");
    expect_bad("tokensneg.trace", h, GOOD_BODY, 12, FERRY_ERR_FORMAT, "'tokens' = -3");
    header_with(h, sizeof h, "2", "4", "2", "1e300", "[2, 1]");
    expect_bad("tokenshuge.trace", h, GOOD_BODY, 12, FERRY_ERR_FORMAT, "'tokens'");

    header_with(h, sizeof h, "2", "4", "2", "3", "[2, 2]");
    expect_bad("sumover.trace", h, GOOD_BODY, 12, FERRY_ERR_FORMAT, "more than tokens = 3");
    header_with(h, sizeof h, "2", "4", "2", "3", "[1, 1]");
    expect_bad("sumunder.trace", h, GOOD_BODY, 12, FERRY_ERR_FORMAT,
               "sequence_lengths sum to 2, header field 'tokens' says 3");
    header_with(h, sizeof h, "2", "4", "2", "3", "[3, 0]");
    expect_bad("lenzero.trace", h, GOOD_BODY, 12, FERRY_ERR_FORMAT, "sequence_lengths[1]");
    header_with(h, sizeof h, "2", "4", "2", "3", "[2, \"1\"]");
    expect_bad("lenstr.trace", h, GOOD_BODY, 12, FERRY_ERR_FORMAT, "sequence_lengths[1]");
    header_with(h, sizeof h, "2", "4", "2", "3", "3");
    expect_bad("lensnotlist.trace", h, GOOD_BODY, 12, FERRY_ERR_FORMAT, "is not a list");

    expect_bad("model.trace",
               "{\"format\": \"moe-routing-trace v1\", \"model\": 5, \"layers\": 2, \"experts\": "
               "4, \"top_k\": 2, \"tokens\": 3, \"sequence_lengths\": [2, 1]}\n",
               GOOD_BODY, 12, FERRY_ERR_FORMAT, "'model' is not a string");
}
END_TEST

START_TEST(test_trace_malformed_probs)
{
    const char *h = "{\"format\": \"moe-routing-trace v1\", \"model\": \"m\", \"layers\": 2, "
                    "\"experts\": 4, \"top_k\": 2, \"tokens\": 3, \"sequence_lengths\": [2, 1], "
                    "\"body\": \"ids\", \"probs\": \"float32\"}\n";
    uint8_t body[12 + 3 * 2 * 4 * 4];
    float probs[3 * 2 * 4];
    fill_probs(probs, 3, 2, 4, 3);
    memcpy(body, GOOD_BODY, 12);
    memcpy(body + 12, probs, sizeof probs);

    /* the good one loads */
    char path[512];
    size_t hl = strlen(h);
    char *buf = malloc(hl + sizeof body);
    memcpy(buf, h, hl);
    memcpy(buf + hl, body, sizeof body);
    tu_write_file(path, "probs_good.trace", buf, hl + sizeof body);
    free(buf);
    ferry_trace *tr = NULL;
    ck_assert_msg(ferry_trace_load(path, &tr) == FERRY_OK, "%s", ferry_last_error());
    ck_assert(memcmp(tr->probs, probs, sizeof probs) == 0);
    ferry_trace_free(tr);

    expect_bad("probs_short.trace", h, body, sizeof body - 4, FERRY_ERR_FORMAT,
               "probs section has 92 bytes, the header needs 96");
    expect_bad("probs_none.trace", h, body, 12, FERRY_ERR_FORMAT, "probs section has 0 bytes");

    float bad[3 * 2 * 4];
    memcpy(bad, probs, sizeof bad);
    bad[2 * 4 + 1] = -0.25f; /* token 1, layer 0, expert 1 */
    memcpy(body + 12, bad, sizeof bad);
    expect_bad("probs_neg.trace", h, body, sizeof body, FERRY_ERR_FORMAT,
               "probs of token 1 layer 0 expert 1 is -0.25");
    memcpy(bad, probs, sizeof bad);
    bad[5 * 4 + 3] = NAN; /* token 2, layer 1, expert 3 */
    memcpy(body + 12, bad, sizeof bad);
    expect_bad("probs_nan.trace", h, body, sizeof body, FERRY_ERR_FORMAT,
               "probs of token 2 layer 1 expert 3");
    memcpy(bad, probs, sizeof bad);
    bad[0] *= 0.5f; /* token 0, layer 0 no longer sums to 1 */
    memcpy(body + 12, bad, sizeof bad);
    expect_bad("probs_sum.trace", h, body, sizeof body, FERRY_ERR_FORMAT,
               "probs of token 0 layer 0 sum to");
}
END_TEST

START_TEST(test_trace_missing_file_is_io)
{
    ferry_trace *tr = NULL;
    const char *path = FERRY_BINARY_DIR "/no-such.trace";
    ck_assert_int_eq(ferry_trace_load(path, &tr), FERRY_ERR_IO);
    ck_assert_ptr_nonnull(strstr(ferry_last_error(), path));
    ck_assert_ptr_null(tr);
}
END_TEST

static Suite *trace_suite(void)
{
    Suite *s = suite_create("trace");
    TCase *tc = tcase_create("trace");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_trace_load_fixture);
    tcase_add_test(tc, test_trace_save_is_byte_identical);
    tcase_add_test(tc, test_trace_save_to_missing_folder_is_io);
    tcase_add_test(tc, test_trace_create_append_save_load_with_probs);
    tcase_add_test(tc, test_trace_empty_round_trip);
    tcase_add_test(tc, test_trace_append_rejects_bad_input);
    tcase_add_test(tc, test_trace_slice_cuts_sequences);
    tcase_add_test(tc, test_trace_slice_keeps_probs);
    tcase_add_test(tc, test_trace_good_small_file_loads);
    tcase_add_test(tc, test_trace_malformed_body);
    tcase_add_test(tc, test_trace_malformed_header);
    tcase_add_test(tc, test_trace_malformed_fields);
    tcase_add_test(tc, test_trace_malformed_probs);
    tcase_add_test(tc, test_trace_missing_file_is_io);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(trace_suite()); }
