/*
 * predictor/trace.c: routing traces, "moe-routing-trace v1" (see trace.h): loading with
 * full validation, in-memory building, atomic saving, slicing.
 *
 * The file:
 *   one JSON header line terminated by '\n':
 *     {"format": "moe-routing-trace v1", "model": "<name>", "layers": L, "experts": E,
 *      "top_k": K, "tokens": T, "sequence_lengths": [n0, n1, ...], "body": "<text>"
 *      [, "probs": "<text>"]}
 *     "model" may be absent (read as ""); "body" and "probs" are descriptions, and the
 *     presence of "probs" says that probabilities follow the ids. Unknown fields are
 *     ignored. 1 <= L, E <= 256 (ids are bytes), 1 <= K <= E, every n_i >= 1, sum n_i = T.
 *   then T x L x K uint8 expert ids, [token][layer][slot], strictly ascending within a
 *   (token, layer), each < E;
 *   then, with "probs", T x L x E little-endian float32 router probabilities
 *   [token][layer][expert], each in [0, 1], each (token, layer) summing to 1 (+- 1e-3);
 *   then nothing.
 * The writer produces the header exactly as Python's json.dumps does (", " and ": "
 * separators, the key order above), so a trace written by the reference tools survives a
 * load and save byte for byte.
 *
 * Invariant: every ferry_trace handed out is the first member of a trace_box, whose
 * capacities let ferry_trace_append grow the arrays geometrically.
 */
#include "predictor/trace.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"
#include "core/fileio.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "trace.c reads and writes float32 probabilities in host order: little-endian only"
#endif

#define TRACE_FORMAT "moe-routing-trace v1"
#define TRACE_BODY_TEXT                                                                         \
    "uint8 expert ids [tokens][layers][top_k], ascending within a token, row-major, after "   \
    "this header line"
#define TRACE_PROBS_TEXT "float32 [tokens][layers][experts] after the expert ids"
#define TRACE_MAX_IDS 256
#define TRACE_MAX_HEADER_BYTES ((size_t)1 << 30)
#define TRACE_PROB_SUM_TOL 1e-3

typedef struct {
    ferry_trace pub;   /* first: a ferry_trace pointer is a trace_box pointer */
    int64_t cap_tokens; /* rows allocated in pub.experts (and pub.probs) */
    int32_t cap_seqs;   /* entries allocated in pub.seq_lengths */
} trace_box;

static size_t ids_per_token(const ferry_trace *tr)
{
    return (size_t)tr->n_layers * (size_t)tr->top_k;
}

static size_t probs_per_token(const ferry_trace *tr)
{
    return (size_t)tr->n_layers * (size_t)tr->n_experts;
}

/* A fresh empty box of the given shape; NULL when out of memory. */
static trace_box *box_new(int32_t n_layers, int32_t n_experts, int32_t top_k, const char *model)
{
    trace_box *b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    b->pub.n_layers = n_layers;
    b->pub.n_experts = n_experts;
    b->pub.top_k = top_k;
    if (model)
        snprintf(b->pub.model, sizeof b->pub.model, "%s", model);
    return b;
}

/* Grows the box to hold at least n_tokens rows and n_seqs sequences. FERRY_ERR_NOMEM leaves
 * the box as it was. */
static ferry_status box_reserve(trace_box *b, int64_t n_tokens, int64_t n_seqs, int with_probs)
{
    ferry_trace *tr = &b->pub;
    if (n_seqs > INT32_MAX)
        return ferry_fail(FERRY_ERR_INVALID, "trace: more than %d sequences", (int)INT32_MAX);
    if (n_tokens > b->cap_tokens) {
        int64_t cap = b->cap_tokens > 0 ? b->cap_tokens : 256;
        while (cap < n_tokens)
            cap = cap > INT64_MAX / 2 ? n_tokens : cap * 2;
        size_t per = ids_per_token(tr), per_p = probs_per_token(tr);
        if ((uint64_t)cap > SIZE_MAX / (per_p * sizeof(float)))
            return ferry_fail(FERRY_ERR_NOMEM, "trace: %lld tokens do not fit in memory",
                              (long long)n_tokens);
        uint8_t *ids = realloc(tr->experts, (size_t)cap * per);
        if (!ids)
            return ferry_fail(FERRY_ERR_NOMEM, "trace: out of memory for %lld tokens",
                              (long long)cap);
        tr->experts = ids;
        if (with_probs) {
            float *p = realloc(tr->probs, (size_t)cap * per_p * sizeof(float));
            if (!p)
                return ferry_fail(FERRY_ERR_NOMEM, "trace: out of memory for %lld tokens' "
                                  "probabilities", (long long)cap);
            tr->probs = p;
        }
        b->cap_tokens = cap;
    }
    if (n_seqs > b->cap_seqs) {
        int64_t cap = b->cap_seqs > 0 ? b->cap_seqs : 16;
        while (cap < n_seqs)
            cap *= 2;
        if (cap > INT32_MAX)
            cap = INT32_MAX;
        int64_t *s = realloc(tr->seq_lengths, (size_t)cap * sizeof *s);
        if (!s)
            return ferry_fail(FERRY_ERR_NOMEM, "trace: out of memory for %lld sequences",
                              (long long)cap);
        tr->seq_lengths = s;
        b->cap_seqs = (int32_t)cap;
    }
    return FERRY_OK;
}

void ferry_trace_free(ferry_trace *tr)
{
    if (!tr)
        return;
    free(tr->seq_lengths);
    free(tr->experts);
    free(tr->probs);
    free((trace_box *)tr);
}

/* Checks the ids of one (token, layer): each < n_experts, strictly ascending. Returns the
 * first offending slot, or -1. */
static int32_t bad_ids(const uint8_t *ids, int32_t top_k, int32_t n_experts)
{
    for (int32_t j = 0; j < top_k; j++) {
        if (ids[j] >= n_experts)
            return j;
        if (j > 0 && ids[j] <= ids[j - 1])
            return j;
    }
    return -1;
}

/* ---- loading ------------------------------------------------------------------------ */

/* An integer header field in [lo, hi]. */
static ferry_status header_int(const char *path, const cJSON *h, const char *name, int64_t lo,
                               int64_t hi, int64_t *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(h, name);
    if (!v)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: header field '%s' is missing", path, name);
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: header field '%s' is not an integer", path,
                          name);
    if (!(v->valuedouble >= (double)lo && v->valuedouble <= (double)hi))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: header field '%s' = %.17g is outside [%lld, %lld]",
                          path, name, v->valuedouble, (long long)lo, (long long)hi);
    *out = (int64_t)v->valuedouble;
    return FERRY_OK;
}

/* Reads the header line (up to the first '\n') into a fresh NUL-terminated buffer. */
static ferry_status read_header_line(const char *path, FILE *f, char **out, size_t *len_out)
{
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap + 1);
    if (!buf)
        return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory for the header", path);
    for (;;) {
        if (len == cap) {
            if (cap >= TRACE_MAX_HEADER_BYTES) {
                free(buf);
                return ferry_fail(FERRY_ERR_FORMAT, "%s: no header line ('\\n') in the first "
                                  "%zu bytes", path, cap);
            }
            char *nb = realloc(buf, cap * 2 + 1);
            if (!nb) {
                free(buf);
                return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory for the header", path);
            }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + len, 1, cap - len, f);
        char *nl = memchr(buf + len, '\n', got);
        if (nl) {
            *nl = 0;
            *out = buf;
            *len_out = (size_t)(nl - buf);
            return FERRY_OK;
        }
        len += got;
        if (got == 0) {
            int err = ferror(f);
            free(buf);
            if (err)
                return ferry_fail(FERRY_ERR_IO, "%s: read failed: %s", path, strerror(errno));
            return ferry_fail(FERRY_ERR_FORMAT, "%s: no header line: the file has no '\\n'%s",
                              path, len == 0 ? " (it is empty)" : "");
        }
    }
}

/* Validates the parsed header and builds an empty box of its shape holding the sequence
 * lengths; *with_probs says whether probabilities follow the ids. */
static ferry_status parse_header(const char *path, const cJSON *h, trace_box **out,
                                 int *with_probs)
{
    if (!cJSON_IsObject(h))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: the header line is not a JSON object", path);
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(h, "format");
    if (!fmt)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: header field 'format' is missing", path);
    if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, TRACE_FORMAT) != 0)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: header field 'format' is not \"%s\"", path,
                          TRACE_FORMAT);
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(h, "model");
    const char *model_name = "";
    if (model) {
        if (!cJSON_IsString(model))
            return ferry_fail(FERRY_ERR_FORMAT, "%s: header field 'model' is not a string", path);
        if (strlen(model->valuestring) >= sizeof(((ferry_trace *)0)->model))
            return ferry_fail(FERRY_ERR_FORMAT, "%s: header field 'model' is longer than %zu "
                              "bytes", path, sizeof(((ferry_trace *)0)->model) - 1);
        model_name = model->valuestring;
    }
    const char *text_fields[] = {"body", "probs"};
    for (int i = 0; i < 2; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(h, text_fields[i]);
        if (v && !cJSON_IsString(v))
            return ferry_fail(FERRY_ERR_FORMAT, "%s: header field '%s' is not a string", path,
                              text_fields[i]);
    }
    int64_t layers, experts, top_k, tokens;
    ferry_status st;
    if ((st = header_int(path, h, "layers", 1, TRACE_MAX_IDS, &layers)) ||
        (st = header_int(path, h, "experts", 1, TRACE_MAX_IDS, &experts)) ||
        (st = header_int(path, h, "top_k", 1, experts, &top_k)) ||
        (st = header_int(path, h, "tokens", 0, (int64_t)1 << 52, &tokens)))
        return st;

    const cJSON *lens = cJSON_GetObjectItemCaseSensitive(h, "sequence_lengths");
    if (!lens)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: header field 'sequence_lengths' is missing",
                          path);
    if (!cJSON_IsArray(lens))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: header field 'sequence_lengths' is not a list",
                          path);
    int n_seqs = cJSON_GetArraySize(lens);
    trace_box *b = box_new((int32_t)layers, (int32_t)experts, (int32_t)top_k, model_name);
    if (!b)
        return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", path);
    if (n_seqs > 0 && (st = box_reserve(b, 0, n_seqs, 0)) != FERRY_OK) {
        ferry_trace_free(&b->pub);
        return ferry_fail_prefix(st, "%s", path);
    }
    int64_t sum = 0;
    int i = 0;
    for (const cJSON *v = lens->child; v; v = v->next, i++) {
        if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) ||
            !(v->valuedouble >= 1 && v->valuedouble <= (double)tokens)) {
            ferry_trace_free(&b->pub);
            return ferry_fail(FERRY_ERR_FORMAT, "%s: sequence_lengths[%d] is not an integer in "
                              "[1, tokens = %lld]", path, i, (long long)tokens);
        }
        b->pub.seq_lengths[i] = (int64_t)v->valuedouble;
        sum += b->pub.seq_lengths[i];
        if (sum > tokens) {
            ferry_trace_free(&b->pub);
            return ferry_fail(FERRY_ERR_FORMAT, "%s: sequence_lengths[0..%d] already sum to "
                              "%lld, more than tokens = %lld", path, i, (long long)sum,
                              (long long)tokens);
        }
    }
    if (sum != tokens) {
        ferry_trace_free(&b->pub);
        return ferry_fail(FERRY_ERR_FORMAT, "%s: sequence_lengths sum to %lld, header field "
                          "'tokens' says %lld", path, (long long)sum, (long long)tokens);
    }
    b->pub.n_seqs = n_seqs;
    b->pub.n_tokens = tokens;
    *with_probs = cJSON_GetObjectItemCaseSensitive(h, "probs") != NULL;
    *out = b;
    return FERRY_OK;
}

/* Checks every id and probability of a loaded trace. */
static ferry_status validate_body(const char *path, const ferry_trace *tr)
{
    int64_t seq = 0, seq_end = tr->n_seqs > 0 ? tr->seq_lengths[0] : 0, seq_start = 0;
    for (int64_t t = 0; t < tr->n_tokens; t++) {
        while (t >= seq_end) {
            seq_start = seq_end;
            seq_end += tr->seq_lengths[++seq];
        }
        for (int32_t l = 0; l < tr->n_layers; l++) {
            const uint8_t *ids = ferry_trace_at(tr, t, l);
            int32_t j = bad_ids(ids, tr->top_k, tr->n_experts);
            if (j < 0)
                continue;
            if (ids[j] >= tr->n_experts)
                return ferry_fail(FERRY_ERR_FORMAT, "%s: token %lld (sequence %lld, position "
                                  "%lld) layer %d: expert id %d >= experts = %d", path,
                                  (long long)t, (long long)seq, (long long)(t - seq_start),
                                  (int)l, (int)ids[j], (int)tr->n_experts);
            return ferry_fail(FERRY_ERR_FORMAT, "%s: token %lld (sequence %lld, position %lld) "
                              "layer %d: expert ids %d, %d are not strictly ascending", path,
                              (long long)t, (long long)seq, (long long)(t - seq_start), (int)l,
                              (int)ids[j - 1], (int)ids[j]);
        }
        if (!tr->probs)
            continue;
        for (int32_t l = 0; l < tr->n_layers; l++) {
            const float *p = tr->probs + ((size_t)t * (size_t)tr->n_layers + (size_t)l) *
                                             (size_t)tr->n_experts;
            double s = 0;
            for (int32_t e = 0; e < tr->n_experts; e++) {
                if (!(p[e] >= 0.0f && p[e] <= 1.0f))
                    return ferry_fail(FERRY_ERR_FORMAT, "%s: probs of token %lld layer %d "
                                      "expert %d is %g, not a probability", path, (long long)t,
                                      (int)l, (int)e, (double)p[e]);
                s += p[e];
            }
            if (fabs(s - 1.0) > TRACE_PROB_SUM_TOL)
                return ferry_fail(FERRY_ERR_FORMAT, "%s: probs of token %lld layer %d sum to "
                                  "%.6f, not 1", path, (long long)t, (int)l, s);
        }
    }
    return FERRY_OK;
}

ferry_status ferry_trace_load(const char *path, ferry_trace **out)
{
    if (!path || !out)
        return ferry_fail(FERRY_ERR_INVALID, "trace load: NULL argument");
    ferry_status st = FERRY_OK;
    char *header = NULL;
    cJSON *h = NULL;
    trace_box *b = NULL;
    size_t header_len = 0;
    int with_probs = 0;
    struct stat sb;

    FILE *f = fopen(path, "rb");
    if (!f)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (fstat(fileno(f), &sb) != 0) {
        st = ferry_fail(FERRY_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    if ((st = read_header_line(path, f, &header, &header_len)) != FERRY_OK)
        goto fail;
    h = cJSON_ParseWithLength(header, header_len);
    if (!h) {
        const char *at = cJSON_GetErrorPtr();
        long off = at && at >= header && at <= header + header_len ? (long)(at - header) : -1;
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: the header line is not valid JSON (near byte %ld)",
                        path, off);
        goto fail;
    }
    if ((st = parse_header(path, h, &b, &with_probs)) != FERRY_OK)
        goto fail;
    ferry_trace *tr = &b->pub;

    /* sizes: every factor is small (<= 256 or 256 x 256 x 4) and tokens < 2^52 */
    uint64_t body_bytes = (uint64_t)sb.st_size - (uint64_t)header_len - 1;
    uint64_t id_bytes = (uint64_t)tr->n_tokens * ids_per_token(tr);
    uint64_t prob_bytes = with_probs ? (uint64_t)tr->n_tokens * probs_per_token(tr) * 4 : 0;
    if (tr->n_tokens > 0 && (uint64_t)tr->n_tokens > body_bytes / ids_per_token(tr)) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: body has %llu bytes, the header needs %llu "
                        "(tokens %lld x layers %d x top_k %d): truncated", path,
                        (unsigned long long)body_bytes, (unsigned long long)id_bytes,
                        (long long)tr->n_tokens, (int)tr->n_layers, (int)tr->top_k);
        goto fail;
    }
    if (body_bytes < id_bytes + prob_bytes) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: probs section has %llu bytes, the header needs "
                        "%llu (tokens %lld x layers %d x experts %d x 4): truncated", path,
                        (unsigned long long)(body_bytes - id_bytes),
                        (unsigned long long)prob_bytes, (long long)tr->n_tokens,
                        (int)tr->n_layers, (int)tr->n_experts);
        goto fail;
    }
    if (body_bytes > id_bytes + prob_bytes) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: %llu bytes after the %s, where the file should "
                        "end (the header says tokens %lld)", path,
                        (unsigned long long)(body_bytes - id_bytes - prob_bytes),
                        with_probs ? "probs section" : "expert ids", (long long)tr->n_tokens);
        goto fail;
    }
    if (with_probs && !(tr->probs = malloc(sizeof(float)))) {
        st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", path);
        goto fail;
    }
    if (tr->n_tokens > 0 &&
        (st = box_reserve(b, tr->n_tokens, tr->n_seqs, with_probs)) != FERRY_OK) {
        st = ferry_fail_prefix(st, "%s", path);
        goto fail;
    }
    if (fseek(f, (long)header_len + 1, SEEK_SET) != 0 ||
        fread(tr->experts, 1, (size_t)id_bytes, f) != (size_t)id_bytes ||
        (with_probs && fread(tr->probs, 1, (size_t)prob_bytes, f) != (size_t)prob_bytes)) {
        st = ferry_fail(FERRY_ERR_IO, "%s: read of the body failed: %s", path,
                        ferror(f) ? strerror(errno) : "the file shrank while being read");
        goto fail;
    }
    if ((st = validate_body(path, tr)) != FERRY_OK)
        goto fail;
    fclose(f);
    cJSON_Delete(h);
    free(header);
    *out = tr;
    return FERRY_OK;

fail:
    if (b)
        ferry_trace_free(&b->pub);
    cJSON_Delete(h);
    free(header);
    fclose(f);
    return st;
}

/* ---- building ----------------------------------------------------------------------- */

ferry_status ferry_trace_create(int32_t n_layers, int32_t n_experts, int32_t top_k, int with_probs,
                                const char *model, ferry_trace **out)
{
    if (!out)
        return ferry_fail(FERRY_ERR_INVALID, "trace create: NULL out");
    if (n_layers < 1 || n_layers > TRACE_MAX_IDS || n_experts < 1 || n_experts > TRACE_MAX_IDS ||
        top_k < 1 || top_k > n_experts)
        return ferry_fail(FERRY_ERR_INVALID, "trace create: layers %d, experts %d, top_k %d: "
                          "need 1 <= layers, experts <= %d and 1 <= top_k <= experts",
                          (int)n_layers, (int)n_experts, (int)top_k, TRACE_MAX_IDS);
    if (model && strlen(model) >= sizeof(((ferry_trace *)0)->model))
        return ferry_fail(FERRY_ERR_INVALID, "trace create: model name '%.40s...' is longer "
                          "than %zu bytes", model, sizeof(((ferry_trace *)0)->model) - 1);
    trace_box *b = box_new(n_layers, n_experts, top_k, model);
    if (!b)
        return ferry_fail(FERRY_ERR_NOMEM, "trace create: out of memory");
    if (with_probs) {
        /* an empty probs array marks the trace as keeping probabilities */
        b->pub.probs = malloc(sizeof(float));
        if (!b->pub.probs) {
            ferry_trace_free(&b->pub);
            return ferry_fail(FERRY_ERR_NOMEM, "trace create: out of memory");
        }
    }
    *out = &b->pub;
    return FERRY_OK;
}

ferry_status ferry_trace_append(ferry_trace *tr, int64_t n, const uint8_t *experts,
                                const float *probs)
{
    if (!tr || !experts)
        return ferry_fail(FERRY_ERR_INVALID, "trace append: NULL argument");
    if (n < 1)
        return ferry_fail(FERRY_ERR_INVALID, "trace append: a sequence needs at least one token "
                          "(got %lld)", (long long)n);
    if (tr->probs && !probs)
        return ferry_fail(FERRY_ERR_INVALID, "trace append: this trace keeps router "
                          "probabilities and none were given");
    if (n > ((int64_t)1 << 52) - tr->n_tokens)
        return ferry_fail(FERRY_ERR_INVALID, "trace append: %lld more tokens is too many",
                          (long long)n);
    for (int64_t t = 0; t < n; t++)
        for (int32_t l = 0; l < tr->n_layers; l++) {
            const uint8_t *ids = experts + ((size_t)t * (size_t)tr->n_layers + (size_t)l) *
                                               (size_t)tr->top_k;
            int32_t j = bad_ids(ids, tr->top_k, tr->n_experts);
            if (j >= 0)
                return ferry_fail(FERRY_ERR_INVALID, "trace append: token %lld layer %d: expert "
                                  "ids must be < %d and strictly ascending (slot %d is %d)",
                                  (long long)t, (int)l, (int)tr->n_experts, (int)j, (int)ids[j]);
        }
    trace_box *b = (trace_box *)tr;
    ferry_status st = box_reserve(b, tr->n_tokens + n, (int64_t)tr->n_seqs + 1, tr->probs != NULL);
    if (st != FERRY_OK)
        return st;
    memcpy(tr->experts + (size_t)tr->n_tokens * ids_per_token(tr), experts,
           (size_t)n * ids_per_token(tr));
    if (tr->probs)
        memcpy(tr->probs + (size_t)tr->n_tokens * probs_per_token(tr), probs,
               (size_t)n * probs_per_token(tr) * sizeof(float));
    tr->seq_lengths[tr->n_seqs++] = n;
    tr->n_tokens += n;
    return FERRY_OK;
}

ferry_status ferry_trace_slice(const ferry_trace *tr, int64_t t0, int64_t n, ferry_trace **out)
{
    if (!tr || !out)
        return ferry_fail(FERRY_ERR_INVALID, "trace slice: NULL argument");
    if (t0 < 0 || n < 0 || t0 > tr->n_tokens || n > tr->n_tokens - t0)
        return ferry_fail(FERRY_ERR_INVALID, "trace slice: tokens [%lld, %lld) are outside the "
                          "trace's [0, %lld)", (long long)t0, (long long)(t0 + n),
                          (long long)tr->n_tokens);
    trace_box *b = box_new(tr->n_layers, tr->n_experts, tr->top_k, tr->model);
    if (!b)
        return ferry_fail(FERRY_ERR_NOMEM, "trace slice: out of memory");
    ferry_trace *s = &b->pub;
    ferry_status st = FERRY_OK;
    int64_t t1 = t0 + n, start = 0;
    int32_t n_pieces = 0;
    for (int32_t i = 0; i < tr->n_seqs; start += tr->seq_lengths[i], i++)
        if (start < t1 && start + tr->seq_lengths[i] > t0)
            n_pieces++;
    if (tr->probs && !(s->probs = malloc(sizeof(float)))) {
        st = ferry_fail(FERRY_ERR_NOMEM, "trace slice: out of memory");
        goto fail;
    }
    if (n > 0 && (st = box_reserve(b, n, n_pieces, tr->probs != NULL)) != FERRY_OK)
        goto fail;
    start = 0;
    for (int32_t i = 0; i < tr->n_seqs; start += tr->seq_lengths[i], i++) {
        int64_t lo = start > t0 ? start : t0;
        int64_t hi = start + tr->seq_lengths[i] < t1 ? start + tr->seq_lengths[i] : t1;
        if (lo < hi)
            s->seq_lengths[s->n_seqs++] = hi - lo;
    }
    if (n > 0)
        memcpy(s->experts, ferry_trace_at(tr, t0, 0), (size_t)n * ids_per_token(tr));
    if (n > 0 && tr->probs)
        memcpy(s->probs, tr->probs + (size_t)t0 * probs_per_token(tr),
               (size_t)n * probs_per_token(tr) * sizeof(float));
    s->n_tokens = n;
    *out = s;
    return FERRY_OK;

fail:
    ferry_trace_free(s);
    return st;
}

/* ---- saving ------------------------------------------------------------------------- */

/* A growing text buffer for the header. */
typedef struct {
    char *p;
    size_t len, cap;
    int oom;
} text_buf;

static void tb_putc(text_buf *tb, char c)
{
    if (tb->oom)
        return;
    if (tb->len + 1 >= tb->cap) {
        size_t cap = tb->cap ? tb->cap * 2 : 4096;
        char *p = realloc(tb->p, cap);
        if (!p) {
            tb->oom = 1;
            return;
        }
        tb->p = p;
        tb->cap = cap;
    }
    tb->p[tb->len++] = c;
}

static void tb_puts(text_buf *tb, const char *s)
{
    while (*s)
        tb_putc(tb, *s++);
}

static void tb_int(text_buf *tb, long long v)
{
    char num[32];
    snprintf(num, sizeof num, "%lld", v);
    tb_puts(tb, num);
}

/* A JSON string literal, escaped as json.dumps escapes ASCII (other bytes pass through). */
static void tb_json_string(text_buf *tb, const char *s)
{
    tb_putc(tb, '"');
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        char esc[8];
        switch (*c) {
        case '"': tb_puts(tb, "\\\""); break;
        case '\\': tb_puts(tb, "\\\\"); break;
        case '\n': tb_puts(tb, "\\n"); break;
        case '\r': tb_puts(tb, "\\r"); break;
        case '\t': tb_puts(tb, "\\t"); break;
        case '\b': tb_puts(tb, "\\b"); break;
        case '\f': tb_puts(tb, "\\f"); break;
        default:
            if (*c < 0x20 || *c == 0x7f) {
                snprintf(esc, sizeof esc, "\\u%04x", (unsigned)*c);
                tb_puts(tb, esc);
            } else {
                tb_putc(tb, (char)*c);
            }
        }
    }
    tb_putc(tb, '"');
}

ferry_status ferry_trace_save(const ferry_trace *tr, const char *path)
{
    if (!tr || !path)
        return ferry_fail(FERRY_ERR_INVALID, "trace save: NULL argument");
    text_buf tb = {0};
    tb_puts(&tb, "{\"format\": \"" TRACE_FORMAT "\", \"model\": ");
    tb_json_string(&tb, tr->model);
    tb_puts(&tb, ", \"layers\": ");
    tb_int(&tb, tr->n_layers);
    tb_puts(&tb, ", \"experts\": ");
    tb_int(&tb, tr->n_experts);
    tb_puts(&tb, ", \"top_k\": ");
    tb_int(&tb, tr->top_k);
    tb_puts(&tb, ", \"tokens\": ");
    tb_int(&tb, (long long)tr->n_tokens);
    tb_puts(&tb, ", \"sequence_lengths\": [");
    for (int32_t i = 0; i < tr->n_seqs; i++) {
        if (i > 0)
            tb_puts(&tb, ", ");
        tb_int(&tb, (long long)tr->seq_lengths[i]);
    }
    tb_puts(&tb, "], \"body\": \"" TRACE_BODY_TEXT "\"");
    if (tr->probs)
        tb_puts(&tb, ", \"probs\": \"" TRACE_PROBS_TEXT "\"");
    tb_puts(&tb, "}\n");
    if (tb.oom) {
        free(tb.p);
        return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory for the header", path);
    }

    size_t id_bytes = (size_t)tr->n_tokens * ids_per_token(tr);
    size_t prob_bytes = tr->probs ? (size_t)tr->n_tokens * probs_per_token(tr) * sizeof(float) : 0;
    const ferry_file_part parts[] = {{tb.p, tb.len}, {tr->experts, id_bytes}, {tr->probs, prob_bytes}};
    ferry_status st = ferry_replace_file(path, parts, 3);
    free(tb.p);
    return st;
}
