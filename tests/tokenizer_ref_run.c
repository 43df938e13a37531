/*
 * tests/tokenizer_ref_run.c: ferry's side of tests/test_tokenizer_ref.py. Loads one
 * tokenizer.json (with or without a tokenizer_config.json), encodes every string of the
 * input and decodes every id sequence, and writes the results as JSON for the script to
 * compare with the Rust library's. Every decode is also streamed through
 * ferry_detok_stream_push/flush, and the streams that differ from decode are listed.
 *
 *   tokenizer_ref_run TOKENIZER_JSON CONFIG_JSON|- IN.json OUT.json
 *
 * IN.json:  {"strings_hex": ["68656c6c6f", ...], "id_seqs": [[1, 2, 3], ...]}
 * OUT.json: {"n_vocab": N, "bos_id": B, "adds_bos": bool,
 *            "encode": [[ids] per string, add_special], "encode_plain": [... without],
 *            "decode_hex": [decode(encode ids)], "decode_skip_hex": [... skip_special],
 *            "seq_decode_hex": [decode(seq)], "seq_decode_skip_hex": [...],
 *            "stream_bad_encode": [string indices], "stream_bad_seq": [sequence indices]}
 * Strings travel as hex so that any bytes (NUL included) get through.
 */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/fileio.h"
#include "format/tokenizer.h"

/* The whole file, NUL-terminated; NULL (the reason on stderr) when it cannot be read. */
static char *read_all(const char *path, size_t *len)
{
    char *buf;
    if (ferry_read_small_file(path, 1ull << 30, 0, &buf, len) != FERRY_OK) {
        fprintf(stderr, "%s: %s\n", "tokenizer_ref_run", ferry_last_error());
        return NULL;
    }
    return buf;
}

static char *to_hex(const char *s, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    char *h = malloc(2 * n + 1);
    if (!h)
        exit(1);
    for (size_t i = 0; i < n; i++) {
        h[2 * i] = digits[(unsigned char)s[i] >> 4];
        h[2 * i + 1] = digits[(unsigned char)s[i] & 15];
    }
    h[2 * n] = 0;
    return h;
}

static char *from_hex(const char *h, size_t *n)
{
    size_t len = strlen(h) / 2;
    char *s = malloc(len + 1);
    if (!s)
        exit(1);
    for (size_t i = 0; i < len; i++) {
        unsigned v;
        sscanf(h + 2 * i, "%2x", &v);
        s[i] = (char)v;
    }
    *n = len;
    return s;
}

static cJSON *ids_array(const int32_t *ids, int32_t n)
{
    cJSON *a = cJSON_CreateArray();
    for (int32_t i = 0; i < n; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(ids[i]));
    return a;
}

static void die(const char *what)
{
    fprintf(stderr, "tokenizer_ref_run: %s: %s\n", what, ferry_last_error());
    exit(1);
}

static int32_t *encode(const ferry_tokenizer *t, const char *s, size_t n, int special,
                       int32_t *n_ids)
{
    int32_t cap = (int32_t)n + 16;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    if (!ids || ferry_tokenizer_encode(t, s, n, special, ids, cap, n_ids) != FERRY_OK)
        die("encode");
    return ids;
}

/* decode() as hex; *stream_ok = whether streaming the ids gives the same text. */
static char *decode_hex(const ferry_tokenizer *t, const int32_t *ids, int32_t n, int skip,
                        int *stream_ok)
{
    size_t len = 0;
    if (ferry_tokenizer_decode(t, ids, n, skip, NULL, 0, &len) != FERRY_ERR_INVALID)
        die("decode size");
    char *text = malloc(len + 1);
    if (!text || ferry_tokenizer_decode(t, ids, n, skip, text, len + 1, &len) != FERRY_OK)
        die("decode");
    size_t cap = ferry_tokenizer_max_piece_bytes(t) + 1, got = 0, k;
    char *piece = malloc(cap), *all = malloc(len + 16 + (size_t)n * cap);
    if (!piece || !all)
        exit(1);
    ferry_detok_stream st;
    ferry_detok_stream_init(&st);
    for (int32_t i = 0; i <= n; i++) {
        ferry_status rc = i < n ? ferry_detok_stream_push(t, &st, ids[i], skip, piece, cap, &k)
                                : ferry_detok_stream_flush(t, &st, piece, cap, &k);
        if (rc != FERRY_OK)
            die("stream");
        memcpy(all + got, piece, k);
        got += k;
    }
    *stream_ok = got == len && memcmp(all, text, len) == 0;
    char *h = to_hex(text, len);
    free(text);
    free(piece);
    free(all);
    return h;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: tokenizer_ref_run TOKENIZER_JSON CONFIG_JSON|- IN.json "
                        "OUT.json\n");
        return 2;
    }
    size_t tok_len, cfg_len = 0, in_len;
    char *tok = read_all(argv[1], &tok_len), *cfg = NULL, *in = read_all(argv[3], &in_len);
    if (strcmp(argv[2], "-") != 0)
        cfg = read_all(argv[2], &cfg_len);
    if (!tok || !in || (strcmp(argv[2], "-") != 0 && !cfg)) {
        fprintf(stderr, "tokenizer_ref_run: cannot read the input files\n");
        return 1;
    }
    ferry_tokenizer *t = NULL;
    if (ferry_tokenizer_load_json(tok, tok_len, cfg, cfg_len, argv[1], &t) != FERRY_OK)
        die("load");
    cJSON *input = cJSON_ParseWithLength(in, in_len);
    if (!input) {
        fprintf(stderr, "tokenizer_ref_run: %s is not JSON\n", argv[3]);
        return 1;
    }
    cJSON *out = cJSON_CreateObject();
    cJSON_AddNumberToObject(out, "n_vocab", ferry_tokenizer_n_vocab(t));
    cJSON_AddNumberToObject(out, "bos_id", ferry_tokenizer_bos_id(t));
    cJSON_AddBoolToObject(out, "adds_bos", ferry_tokenizer_adds_bos(t));
    cJSON *enc = cJSON_AddArrayToObject(out, "encode");
    cJSON *enc_plain = cJSON_AddArrayToObject(out, "encode_plain");
    cJSON *dec = cJSON_AddArrayToObject(out, "decode_hex");
    cJSON *dec_skip = cJSON_AddArrayToObject(out, "decode_skip_hex");
    cJSON *bad_enc = cJSON_AddArrayToObject(out, "stream_bad_encode");
    cJSON *it;
    int idx = 0;
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(input, "strings_hex"))
    {
        size_t n;
        char *s = from_hex(it->valuestring, &n);
        int32_t n_ids, n_plain, ok1, ok2;
        int32_t *ids = encode(t, s, n, 1, &n_ids), *plain = encode(t, s, n, 0, &n_plain);
        cJSON_AddItemToArray(enc, ids_array(ids, n_ids));
        cJSON_AddItemToArray(enc_plain, ids_array(plain, n_plain));
        char *h = decode_hex(t, ids, n_ids, 0, &ok1);
        cJSON_AddItemToArray(dec, cJSON_CreateString(h));
        free(h);
        h = decode_hex(t, ids, n_ids, 1, &ok2);
        cJSON_AddItemToArray(dec_skip, cJSON_CreateString(h));
        free(h);
        if (!ok1 || !ok2)
            cJSON_AddItemToArray(bad_enc, cJSON_CreateNumber(idx));
        free(ids);
        free(plain);
        free(s);
        idx++;
    }
    cJSON *sdec = cJSON_AddArrayToObject(out, "seq_decode_hex");
    cJSON *sdec_skip = cJSON_AddArrayToObject(out, "seq_decode_skip_hex");
    cJSON *bad_seq = cJSON_AddArrayToObject(out, "stream_bad_seq");
    idx = 0;
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(input, "id_seqs"))
    {
        int32_t n = cJSON_GetArraySize(it), k = 0, ok1, ok2;
        int32_t *ids = malloc(((size_t)n + 1) * sizeof *ids);
        cJSON *v;
        cJSON_ArrayForEach(v, it) ids[k++] = (int32_t)v->valuedouble;
        char *h = decode_hex(t, ids, n, 0, &ok1);
        cJSON_AddItemToArray(sdec, cJSON_CreateString(h));
        free(h);
        h = decode_hex(t, ids, n, 1, &ok2);
        cJSON_AddItemToArray(sdec_skip, cJSON_CreateString(h));
        free(h);
        if (!ok1 || !ok2)
            cJSON_AddItemToArray(bad_seq, cJSON_CreateNumber(idx));
        free(ids);
        idx++;
    }
    char *text = cJSON_PrintUnformatted(out);
    FILE *f = fopen(argv[4], "wb");
    if (!text || !f || fputs(text, f) < 0 || fclose(f) != 0) {
        fprintf(stderr, "tokenizer_ref_run: cannot write %s\n", argv[4]);
        return 1;
    }
    free(text);
    cJSON_Delete(out);
    cJSON_Delete(input);
    ferry_tokenizer_free(t);
    free(tok);
    free(cfg);
    free(in);
    return 0;
}
