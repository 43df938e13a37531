/*
 * tests/fuzz/fuzz_tokenizer_json.c: tokenizer.json (format/tokenizer.c,
 * ferry_tokenizer_load_json), and what a tokenizer it accepts then does.
 * Dictionaries: json.dict
 *
 * Input: the bytes of a tokenizer.json, optionally followed by a NUL byte and the bytes of a
 * tokenizer_config.json. A file that loads is queried (n_vocab, BOS/EOS, pieces), encodes a
 * few fixed strings and two strings taken from the input itself (its own text, and the
 * concatenated pieces of its first tokens), decodes those ids whole and streamed, and
 * decodes ids taken from the input, some of them outside the vocabulary.
 *
 * Checks (abort on failure; libFuzzer reports it): a load fails only with FORMAT,
 * UNSUPPORTED or NOMEM, a message and no tokenizer; encode agrees with an independent UTF-8
 * check, gives the same count with cap 0 as with room, and fails only as its contract says;
 * decode reports the length it needs and writes a NUL-terminated text of that length; ids
 * outside [0, n_vocab) are refused; a stream never needs more than max_piece_bytes.
 * Deterministic; frees what it allocates.
 */
#include <stdint.h>

#include "core/error.h"
#include "format/tokenizer.h"
#include "tests/fuzz/fuzz_util.h"

#define MAX_TEXT 1024 /* bytes of an input-derived string that are encoded */
#define MAX_IDS 64    /* ids decoded from the input */

/* Decodes ids whole (checking the length contract) and streamed (checking the piece bound). */
static void check_decode(const ferry_tokenizer *t, const int32_t *ids, int32_t n, int skip)
{
    size_t need = SIZE_MAX;
    ferry_status st = ferry_tokenizer_decode(t, ids, n, skip, NULL, 0, &need);
    if (st == FERRY_ERR_FORMAT || st == FERRY_ERR_NOMEM) /* a decoder chain that grows too much */
        return;
    FUZZ_CHECK(st == FERRY_ERR_INVALID && need != SIZE_MAX, "decode with cap 0 gave %s (%s)",
               ferry_status_name(st), ferry_last_error());
    char *text = malloc(need + 1);
    FUZZ_CHECK(text != NULL, "out of memory");
    size_t len = SIZE_MAX;
    if (need > 0) { /* one byte short: refused, with the length and an empty string */
        st = ferry_tokenizer_decode(t, ids, n, skip, text, need, &len);
        FUZZ_CHECK(st == FERRY_ERR_INVALID && len == need && text[0] == 0,
                   "decode into %zu bytes gave %s, length %zu", need, ferry_status_name(st), len);
    }
    st = ferry_tokenizer_decode(t, ids, n, skip, text, need + 1, &len);
    FUZZ_CHECK(st == FERRY_OK && len == need && text[len] == 0, "decode gave %s, %zu of %zu bytes",
               ferry_status_name(st), len, need);
    free(text);

    size_t max_piece = ferry_tokenizer_max_piece_bytes(t);
    char *out = malloc(max_piece + 1);
    FUZZ_CHECK(out != NULL, "out of memory");
    ferry_detok_stream s;
    ferry_detok_stream_init(&s);
    for (int32_t i = 0; i < n; i++) {
        size_t pl = SIZE_MAX;
        st = ferry_detok_stream_push(t, &s, ids[i], skip, out, max_piece + 1, &pl);
        FUZZ_CHECK(st == FERRY_OK && pl <= max_piece && out[pl] == 0,
                   "stream push of id %d gave %s, %zu bytes (max piece %zu)", (int)ids[i],
                   ferry_status_name(st), pl, max_piece);
    }
    size_t pl = SIZE_MAX;
    st = ferry_detok_stream_flush(t, &s, out, max_piece + 1, &pl);
    FUZZ_CHECK(st == FERRY_OK && pl <= max_piece, "stream flush gave %s, %zu bytes",
               ferry_status_name(st), pl);
    free(out);
}

/* Encodes text[0..n) both ways (count first, then with room) and decodes the ids. */
static void check_encode(const ferry_tokenizer *t, const char *text, size_t n, int add_special)
{
    int valid = fuzz_utf8_bad((const uint8_t *)text, n) == n;
    int32_t count = -1;
    ferry_status st = ferry_tokenizer_encode(t, text, n, add_special, NULL, 0, &count);
    if (!valid) {
        FUZZ_CHECK(st == FERRY_ERR_INVALID && count == -1, "invalid UTF-8 encoded: %s (%s)",
                   ferry_status_name(st), ferry_last_error());
        return;
    }
    /* FORMAT: unk needed and missing, or the normalizer grew the text too much; INVALID
     * without a count: a regex gave up */
    if (st == FERRY_ERR_FORMAT || st == FERRY_ERR_NOMEM || (st == FERRY_ERR_INVALID && count < 0))
        return;
    FUZZ_CHECK((st == FERRY_OK && count == 0) || (st == FERRY_ERR_INVALID && count > 0),
               "encode with cap 0 gave %s, count %d", ferry_status_name(st), (int)count);
    int32_t *ids = malloc(((size_t)count + 1) * sizeof *ids);
    FUZZ_CHECK(ids != NULL, "out of memory");
    int32_t n_ids = -1;
    st = ferry_tokenizer_encode(t, text, n, add_special, ids, count, &n_ids);
    FUZZ_CHECK(st == FERRY_OK && n_ids == count, "encode gave %s, %d ids of %d",
               ferry_status_name(st), (int)n_ids, (int)count);
    int32_t n_vocab = ferry_tokenizer_n_vocab(t);
    for (int32_t i = 0; i < n_ids; i++)
        FUZZ_CHECK(ids[i] >= 0 && ids[i] < n_vocab, "ids[%d] = %d outside [0, %d)", (int)i,
                   (int)ids[i], (int)n_vocab);
    check_decode(t, ids, n_ids, 0);
    check_decode(t, ids, n_ids, 1);
    free(ids);
}

static void exercise(const ferry_tokenizer *t, const uint8_t *data, size_t size)
{
    int32_t n_vocab = ferry_tokenizer_n_vocab(t);
    FUZZ_CHECK(n_vocab >= 0, "n_vocab %d", (int)n_vocab);
    int32_t bos = ferry_tokenizer_bos_id(t), eos = ferry_tokenizer_eos_id(t);
    FUZZ_CHECK(bos >= -1 && bos < n_vocab && eos >= -1 && eos < n_vocab, "bos %d eos %d of %d",
               (int)bos, (int)eos, (int)n_vocab);
    (void)ferry_tokenizer_adds_bos(t);

    static const char *const fixed[] = {
        "",
        "Hello world",
        " a  b\n\tc\r\n",
        "h\xc3\xa9llo \xe2\x96\x81 <s> </s> <unk> \xe6\x97\xa5 \xf0\x9f\x98\x80",
        "e\xcc\x81 \xef\xac\x81 'S 'll 1234567",
        "\xff\xfe",      /* invalid UTF-8 */
        "a\xed\xa0\x80", /* a surrogate */
    };
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
        check_encode(t, fixed[i], strlen(fixed[i]), (int)(i & 1));
    check_encode(t, "a\0b", 3, 1);

    /* the input's own text, and the pieces of its first tokens joined */
    check_encode(t, (const char *)data, size < MAX_TEXT ? size : MAX_TEXT, 1);
    char pieces[MAX_TEXT];
    size_t n_pieces = 0;
    for (int32_t id = 0; id < n_vocab && id < 64; id++) {
        const char *s = NULL;
        size_t len = 0;
        ferry_status st = ferry_tokenizer_piece(t, id, &s, &len);
        (void)ferry_tokenizer_is_special(t, id);
        if (st != FERRY_OK)
            continue;
        if (len > sizeof pieces - n_pieces)
            break;
        if (len)
            memcpy(pieces + n_pieces, s, len);
        n_pieces += len;
    }
    check_encode(t, pieces, n_pieces, 0);

    /* ids from the input's last bytes: most inside the vocab, some just outside */
    int32_t ids[MAX_IDS];
    int32_t n_ids = 0, bad = -1;
    for (size_t i = size; i >= 2 && n_ids < MAX_IDS; i -= 2) {
        int32_t v = (int32_t)(data[i - 1] | data[i - 2] << 8);
        ids[n_ids] = v % (n_vocab + 2) - 1;
        if (bad < 0 && (ids[n_ids] < 0 || ids[n_ids] >= n_vocab))
            bad = n_ids;
        n_ids++;
    }
    size_t len = SIZE_MAX;
    char text[16];
    ferry_status st = ferry_tokenizer_decode(t, ids, n_ids, 0, text, sizeof text, &len);
    if (bad >= 0) {
        FUZZ_CHECK(st == FERRY_ERR_INVALID && len == SIZE_MAX, "ids[%d] = %d decoded: %s (%s)",
                   (int)bad, (int)ids[bad], ferry_status_name(st), ferry_last_error());
        ferry_detok_stream s;
        ferry_detok_stream_init(&s);
        st = ferry_detok_stream_push(t, &s, ids[bad], 0, text, sizeof text, &len);
        FUZZ_CHECK(st == FERRY_ERR_INVALID, "stream took id %d: %s (%s)", (int)ids[bad],
                   ferry_status_name(st), ferry_last_error());
        n_ids = bad; /* the valid ones before it */
    }
    check_decode(t, ids, n_ids, 0);
    check_decode(t, ids, n_ids, 1);
}

FUZZ_INITIALIZE_QUIET()

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nul = memchr(data, 0, size);
    size_t tok_len = nul ? (size_t)(nul - data) : size;
    const char *config = nul ? (const char *)nul + 1 : NULL;
    size_t config_len = nul ? size - tok_len - 1 : 0;
    ferry_tokenizer *t = NULL;
    ferry_status st =
        ferry_tokenizer_load_json((const char *)data, tok_len, config, config_len, "fuzz.json", &t);
    if (st != FERRY_OK) {
        FUZZ_CHECK(t == NULL, "failed load (%s) set the tokenizer (%s)", ferry_status_name(st),
                   ferry_last_error());
        FUZZ_CHECK(st == FERRY_ERR_FORMAT || st == FERRY_ERR_UNSUPPORTED || st == FERRY_ERR_NOMEM,
                   "load gave %s (%s)", ferry_status_name(st), ferry_last_error());
        FUZZ_CHECK(strncmp(ferry_last_error(), "fuzz.json", 9) == 0,
                   "the load error does not name the file");
        return 0;
    }
    FUZZ_CHECK(t != NULL, "load succeeded without a tokenizer");
    exercise(t, data, tok_len);
    ferry_tokenizer_free(t);
    return 0;
}
