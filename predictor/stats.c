/*
 * predictor/stats.c: fitted routing transition statistics (ferry_routing_stats, see
 * predictor.h): counting from traces, the smoothed transition tables the stats and
 * combined predictors read, and the binary file.
 *
 * The file (integers little-endian):
 *      0   8  magic "FERRYST1"
 *      8   4  u32 format version (1)
 *     12   4  u32 n_layers L (1..256)
 *     16   4  u32 n_experts E (1..256)
 *     20   4  u32 top_k K (1..E)
 *     24   4  u32 lookahead distances D (FERRY_PREDICT_MAX_LOOKAHEAD = 3)
 *     28   4  u32 zero (reserved)
 *     32   8  u64 tokens counted N (< 2^32)
 *     40      u32 counts, in this order:
 *             freq  (L, E):        tokens choosing e at layer l
 *             pair  (D, L, E, E):  [d-1][l][e][e'] tokens choosing e at l and e' at l+d
 *                                  (zero where l + d >= L)
 *             next  (L, E, E):     [l][e][e'] consecutive tokens t-1, t of one sequence
 *                                  with e chosen for t-1 and e' for t at layer l
 *    end-8 8  u64 XXH3-64 of every byte before it
 * Load checks, in this order: the size covers the fixed header, magic, version, shape,
 * reserved field, the size the shape implies, the checksum, then that the counts agree
 * with each other (each layer's frequencies sum to N x K; each pair row sums to K times
 * the frequency of its expert; next rows stay below that; unused rows are zero).
 *
 * Invariant: the float tables p_pair and p_next are always the smoothed conditionals of
 * the counts held beside them (built by fit and load, never changed after).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "core/bytes.h"
#include "core/error.h"
#include "core/fileio.h"
#include "predictor/predictor.h"

#define STATS_MAGIC "FERRYST1"
#define STATS_VERSION 1u
#define STATS_HEADER_BYTES 40u
#define STATS_MAX_IDS 256u
#define STATS_D FERRY_PREDICT_MAX_LOOKAHEAD

struct ferry_routing_stats {
    int32_t n_layers, n_experts, top_k;
    uint64_t n_tokens;
    uint32_t *counts; /* one block: freq (L, E), pair (D, L, E, E), next (L, E, E) */
    uint32_t *freq, *pair, *next;
    float *p_pair;    /* (D, L, E, E) P(e' at l+d | e at l), add-one smoothed */
    float *p_next;    /* (L, E, E) P(e' for token t | e for token t-1) */
};

static size_t n_counts(size_t L, size_t E) { return L * E + STATS_D * L * E * E + L * E * E; }

static size_t file_bytes(size_t L, size_t E)
{
    return STATS_HEADER_BYTES + 4 * n_counts(L, E) + 8;
}

/* A zeroed stats object of the given shape; NULL when out of memory. */
static ferry_routing_stats *stats_new(int32_t L, int32_t E, int32_t K)
{
    ferry_routing_stats *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    size_t ee = (size_t)E * (size_t)E;
    s->n_layers = L;
    s->n_experts = E;
    s->top_k = K;
    s->counts = calloc(n_counts((size_t)L, (size_t)E), sizeof(uint32_t));
    s->p_pair = malloc(STATS_D * (size_t)L * ee * sizeof(float));
    s->p_next = malloc((size_t)L * ee * sizeof(float));
    if (!s->counts || !s->p_pair || !s->p_next) {
        ferry_routing_stats_free(s);
        return NULL;
    }
    s->freq = s->counts;
    s->pair = s->freq + (size_t)L * (size_t)E;
    s->next = s->pair + STATS_D * (size_t)L * ee;
    return s;
}

void ferry_routing_stats_free(ferry_routing_stats *s)
{
    if (!s)
        return;
    free(s->counts);
    free(s->p_pair);
    free(s->p_next);
    free(s);
}

/* One row of add-one smoothed conditionals from one row of counts. */
static void smooth_row(float *p, const uint32_t *c, int32_t E)
{
    double total = E;
    for (int32_t j = 0; j < E; j++)
        total += c[j];
    for (int32_t j = 0; j < E; j++)
        p[j] = (float)(((double)c[j] + 1.0) / total);
}

/* Rebuilds p_pair and p_next from the counts. */
static void build_tables(ferry_routing_stats *s)
{
    size_t E = (size_t)s->n_experts, L = (size_t)s->n_layers;
    for (size_t r = 0; r < STATS_D * L * E; r++)
        smooth_row(s->p_pair + r * E, s->pair + r * E, (int32_t)E);
    for (size_t r = 0; r < L * E; r++)
        smooth_row(s->p_next + r * E, s->next + r * E, (int32_t)E);
}

void ferry_routing_stats_shape(const ferry_routing_stats *s, int32_t *n_layers,
                               int32_t *n_experts, int32_t *top_k)
{
    if (n_layers)
        *n_layers = s->n_layers;
    if (n_experts)
        *n_experts = s->n_experts;
    if (top_k)
        *top_k = s->top_k;
}

const float *ferry_routing_stats_transition(const ferry_routing_stats *s, int32_t layer,
                                            int32_t d)
{
    if (!s || layer < 0 || d < 0 || d > STATS_D || layer + d >= s->n_layers)
        return NULL;
    size_t ee = (size_t)s->n_experts * (size_t)s->n_experts;
    if (d == 0)
        return s->p_next + (size_t)layer * ee;
    return s->p_pair + ((size_t)(d - 1) * (size_t)s->n_layers + (size_t)layer) * ee;
}

/* ---- fitting ------------------------------------------------------------------------ */

/* Adds one trace's counts. */
static void count_trace(ferry_routing_stats *s, const ferry_trace *tr)
{
    size_t L = (size_t)s->n_layers, E = (size_t)s->n_experts, K = (size_t)s->top_k;
    int64_t t = 0;
    for (int32_t q = 0; q < tr->n_seqs; q++) {
        int64_t end = t + tr->seq_lengths[q];
        for (int64_t first = t; t < end; t++) {
            for (size_t l = 0; l < L; l++) {
                const uint8_t *a = ferry_trace_at(tr, t, (int32_t)l);
                for (size_t i = 0; i < K; i++) {
                    size_t e = a[i];
                    s->freq[l * E + e]++;
                    for (size_t d = 1; d <= STATS_D && l + d < L; d++) {
                        const uint8_t *b = ferry_trace_at(tr, t, (int32_t)(l + d));
                        uint32_t *row = s->pair + (((d - 1) * L + l) * E + e) * E;
                        for (size_t j = 0; j < K; j++)
                            row[b[j]]++;
                    }
                    if (t > first) {
                        const uint8_t *p = ferry_trace_at(tr, t - 1, (int32_t)l);
                        for (size_t j = 0; j < K; j++)
                            s->next[(l * E + p[j]) * E + e]++;
                    }
                }
            }
        }
    }
}

ferry_status ferry_routing_stats_fit(const ferry_trace *const *traces, int32_t n_traces,
                                     ferry_routing_stats **out)
{
    if (!traces || n_traces < 1 || !out)
        return ferry_fail(FERRY_ERR_INVALID, "routing stats fit: no traces given");
    const ferry_trace *t0 = traces[0];
    uint64_t total = 0;
    for (int32_t i = 0; i < n_traces; i++) {
        const ferry_trace *tr = traces[i];
        if (!tr)
            return ferry_fail(FERRY_ERR_INVALID, "routing stats fit: trace %d is NULL", (int)i);
        if (tr->n_layers != t0->n_layers || tr->n_experts != t0->n_experts ||
            tr->top_k != t0->top_k)
            return ferry_fail(FERRY_ERR_INVALID, "routing stats fit: trace %d has layers %d, "
                              "experts %d, top_k %d; trace 0 has %d, %d, %d", (int)i,
                              (int)tr->n_layers, (int)tr->n_experts, (int)tr->top_k,
                              (int)t0->n_layers, (int)t0->n_experts, (int)t0->top_k);
        if (tr->n_experts > (int32_t)STATS_MAX_IDS || tr->n_layers > (int32_t)STATS_MAX_IDS)
            return ferry_fail(FERRY_ERR_INVALID, "routing stats fit: trace %d has more than %u "
                              "layers or experts", (int)i, STATS_MAX_IDS);
        total += (uint64_t)tr->n_tokens;
    }
    if (total > UINT32_MAX)
        return ferry_fail(FERRY_ERR_INVALID, "routing stats fit: %llu tokens overflow the 32-bit "
                          "counts (at most %u)", (unsigned long long)total, UINT32_MAX);
    ferry_routing_stats *s = stats_new(t0->n_layers, t0->n_experts, t0->top_k);
    if (!s)
        return ferry_fail(FERRY_ERR_NOMEM, "routing stats fit: out of memory");
    for (int32_t i = 0; i < n_traces; i++)
        count_trace(s, traces[i]);
    s->n_tokens = total;
    build_tables(s);
    *out = s;
    return FERRY_OK;
}

/* ---- the file ----------------------------------------------------------------------- */

ferry_status ferry_routing_stats_save(const ferry_routing_stats *s, const char *path)
{
    if (!s || !path)
        return ferry_fail(FERRY_ERR_INVALID, "routing stats save: NULL argument");
    size_t L = (size_t)s->n_layers, E = (size_t)s->n_experts, n = n_counts(L, E);
    size_t bytes = file_bytes(L, E);
    uint8_t *buf = malloc(bytes);
    if (!buf)
        return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", path);
    memcpy(buf, STATS_MAGIC, 8);
    ferry_put_u32(buf + 8, STATS_VERSION);
    ferry_put_u32(buf + 12, (uint32_t)L);
    ferry_put_u32(buf + 16, (uint32_t)E);
    ferry_put_u32(buf + 20, (uint32_t)s->top_k);
    ferry_put_u32(buf + 24, STATS_D);
    ferry_put_u32(buf + 28, 0);
    ferry_put_u64(buf + 32, s->n_tokens);
    for (size_t i = 0; i < n; i++)
        ferry_put_u32(buf + STATS_HEADER_BYTES + 4 * i, s->counts[i]);
    ferry_put_u64(buf + bytes - 8, XXH3_64bits(buf, bytes - 8));
    ferry_file_part part = {buf, bytes};
    ferry_status st = ferry_replace_file(path, &part, 1);
    free(buf);
    return st;
}

/* Checks that the counts agree with each other (see the file comment). */
static ferry_status check_counts(const char *path, const ferry_routing_stats *s)
{
    size_t L = (size_t)s->n_layers, E = (size_t)s->n_experts;
    uint64_t K = (uint64_t)s->top_k;
    for (size_t l = 0; l < L; l++) {
        uint64_t sum = 0;
        for (size_t e = 0; e < E; e++)
            sum += s->freq[l * E + e];
        if (sum != s->n_tokens * K)
            return ferry_fail(FERRY_ERR_FORMAT, "%s: layer %zu expert frequencies sum to %llu, "
                              "expected tokens %llu x top_k %llu", path, l,
                              (unsigned long long)sum, (unsigned long long)s->n_tokens,
                              (unsigned long long)K);
    }
    for (size_t d = 1; d <= STATS_D; d++)
        for (size_t l = 0; l < L; l++)
            for (size_t e = 0; e < E; e++) {
                const uint32_t *row = s->pair + (((d - 1) * L + l) * E + e) * E;
                uint64_t sum = 0;
                for (size_t j = 0; j < E; j++)
                    sum += row[j];
                uint64_t want = l + d < L ? K * s->freq[l * E + e] : 0;
                if (sum != want)
                    return ferry_fail(FERRY_ERR_FORMAT, "%s: counts of (layer %zu expert %zu, "
                                      "layer %zu) sum to %llu, expected %llu", path, l, e,
                                      l + d, (unsigned long long)sum, (unsigned long long)want);
            }
    for (size_t l = 0; l < L; l++)
        for (size_t e = 0; e < E; e++) {
            const uint32_t *row = s->next + (l * E + e) * E;
            uint64_t sum = 0;
            for (size_t j = 0; j < E; j++)
                sum += row[j];
            if (sum > K * s->freq[l * E + e])
                return ferry_fail(FERRY_ERR_FORMAT, "%s: next-token counts of layer %zu expert "
                                  "%zu sum to %llu, more than top_k x its frequency %llu", path,
                                  l, e, (unsigned long long)sum,
                                  (unsigned long long)(K * s->freq[l * E + e]));
        }
    return FERRY_OK;
}

ferry_status ferry_routing_stats_load(const char *path, ferry_routing_stats **out)
{
    if (!path || !out)
        return ferry_fail(FERRY_ERR_INVALID, "routing stats load: NULL argument");
    ferry_status st = FERRY_OK;
    ferry_routing_stats *s = NULL;
    uint8_t *buf = NULL;
    uint8_t hdr[STATS_HEADER_BYTES];
    struct stat sb;
    FILE *f = fopen(path, "rb");
    if (!f)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (fstat(fileno(f), &sb) != 0) {
        st = ferry_fail(FERRY_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    uint64_t size = (uint64_t)sb.st_size;
    if (size < STATS_HEADER_BYTES + 8) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: %llu bytes, shorter than the %u-byte header and "
                        "checksum of a routing stats file", path, (unsigned long long)size,
                        STATS_HEADER_BYTES + 8);
        goto fail;
    }
    if (fread(hdr, 1, sizeof hdr, f) != sizeof hdr) {
        st = ferry_fail(FERRY_ERR_IO, "%s: read failed: %s", path, strerror(errno));
        goto fail;
    }
    if (memcmp(hdr, STATS_MAGIC, 8) != 0) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: not a routing stats file (magic is not \"%s\")",
                        path, STATS_MAGIC);
        goto fail;
    }
    uint32_t version = ferry_get_u32(hdr + 8), L = ferry_get_u32(hdr + 12);
    uint32_t E = ferry_get_u32(hdr + 16), K = ferry_get_u32(hdr + 20);
    uint32_t D = ferry_get_u32(hdr + 24), reserved = ferry_get_u32(hdr + 28);
    uint64_t n_tokens = ferry_get_u64(hdr + 32);
    if (version != STATS_VERSION) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: format version %u, this build reads %u", path,
                        version, STATS_VERSION);
        goto fail;
    }
    if (L < 1 || L > STATS_MAX_IDS || E < 1 || E > STATS_MAX_IDS || K < 1 || K > E) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: shape layers %u, experts %u, top_k %u is out of "
                        "range (1..%u, 1..%u, 1..experts)", path, L, E, K, STATS_MAX_IDS,
                        STATS_MAX_IDS);
        goto fail;
    }
    if (D != STATS_D || reserved != 0) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: lookahead field %u (expected %d) or reserved "
                        "field %u (expected 0) is wrong", path, D, STATS_D, reserved);
        goto fail;
    }
    uint64_t want = file_bytes(L, E);
    if (size != want) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: %llu bytes, a file of layers %u, experts %u has "
                        "%llu (%s)", path, (unsigned long long)size, L, E,
                        (unsigned long long)want, size < want ? "truncated" : "trailing bytes");
        goto fail;
    }
    if (!(buf = malloc((size_t)size))) {
        st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", path);
        goto fail;
    }
    memcpy(buf, hdr, sizeof hdr);
    if (fread(buf + sizeof hdr, 1, (size_t)size - sizeof hdr, f) != (size_t)size - sizeof hdr) {
        st = ferry_fail(FERRY_ERR_IO, "%s: read failed: %s", path,
                        ferror(f) ? strerror(errno) : "the file shrank while being read");
        goto fail;
    }
    uint64_t sum = XXH3_64bits(buf, (size_t)size - 8), stored = ferry_get_u64(buf + size - 8);
    if (sum != stored) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: checksum mismatch (stored %016llx, computed "
                        "%016llx): the file is corrupt", path, (unsigned long long)stored,
                        (unsigned long long)sum);
        goto fail;
    }
    if (n_tokens > UINT32_MAX) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: tokens %llu overflow the 32-bit counts", path,
                        (unsigned long long)n_tokens);
        goto fail;
    }
    if (!(s = stats_new((int32_t)L, (int32_t)E, (int32_t)K))) {
        st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", path);
        goto fail;
    }
    s->n_tokens = n_tokens;
    size_t n = n_counts(L, E);
    for (size_t i = 0; i < n; i++)
        s->counts[i] = ferry_get_u32(buf + STATS_HEADER_BYTES + 4 * i);
    if ((st = check_counts(path, s)) != FERRY_OK)
        goto fail;
    build_tables(s);
    free(buf);
    fclose(f);
    *out = s;
    return FERRY_OK;

fail:
    ferry_routing_stats_free(s);
    free(buf);
    fclose(f);
    return st;
}
