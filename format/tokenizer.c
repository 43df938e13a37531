/*
 * format/tokenizer.c: a Hugging Face tokenizer.json BPE tokenizer that encodes and decodes
 * exactly as the Rust `tokenizers` library (TokenizerImpl, 0.22) does, for both the
 * SentencePiece-style (Llama, Mistral) and the byte-level (Qwen, DeepSeek-V3, OLMoE, gpt-oss)
 * tokenizers. Encoding, in its order:
 *
 *   1. split the raw text on added tokens with normalized:false (leftmost-longest,
 *      honouring single_word, lstrip, rstrip);
 *   2. normalize every remaining non-empty segment (Sequence, Prepend, Replace, NFC), then
 *      split it on added tokens with normalized:true, whose patterns are themselves
 *      normalized; a chain of steps may not grow the text past 16 x + 4096 bytes;
 *   3. pre-tokenize every remaining non-empty piece: none, Metaspace, or Split/ByteLevel
 *      steps (format/pretokenize.c; a final ByteLevel hands over raw bytes);
 *   4. BPE every word: one symbol per character (byte fallback <0xNN>, unk fusing) or, for
 *      byte-level words, per byte; then Word::merge_all's heap of (rank, position) with lazy
 *      invalidation: O(n log n); ignore_merges first; the words of one call are cached;
 *   5. post-process: the TemplateProcessing ids around $A (or, without a template,
 *      tokenizer_config.json's add_bos_token/add_eos_token).
 *
 * Decoding maps each id to its token (added tokens first), drops special tokens when asked,
 * and runs the decoder chain over the list of strings. The steps before the first
 * ByteFallback/Fuse, up to and including a ByteLevel, act on one token at a time (knowing
 * only whether it is the first), so each id's result is computed once at load ("pieces");
 * after ByteLevel the pieces' bytes are joined and made UTF-8 as String::from_utf8_lossy
 * does; the rest run on the list per call.
 *
 * Owns: every string of the vocab, merges, added tokens and decoder in one blob addressed by
 * (offset, length); the hash tables over it; the per-id pieces; the pre-tokenizer steps.
 * Immutable after load. Invariants: every string in the blob is valid UTF-8 (it came from
 * cJSON, which emits UTF-8) except the pieces of a ByteLevel decoder, which are bytes; ids
 * of the vocab and added tokens are in [0, n_vocab); the blob is allocated from the start,
 * so no offset is ever added to a NULL base.
 */
#include "format/tokenizer.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/fileio.h"
#include "format/pretokenize.h"
#include "format/unicode.h"

#define TK_MAX_ID ((1 << 24) - 1) /* larger ids are refused: n_vocab-sized arrays */
#define TK_SHOW 64                /* bytes of a token quoted in an error message */
#define TK_NONE UINT32_MAX        /* tok_len of an id that names no token */

static const char tk_fffd[] = "\xEF\xBF\xBD"; /* U+FFFD REPLACEMENT CHARACTER */

/* ---- growable buffers ---------------------------------------------------------- */

typedef struct {
    char *p;
    size_t n, cap;
} tk_buf;

/* Always leaves b->p allocated, even for extra == 0: an empty buffer is never a NULL base
 * that offsets are added to. */
static int buf_reserve(tk_buf *b, size_t extra)
{
    if (b->p && b->cap - b->n >= extra)
        return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap - b->n < extra) {
        if (cap > SIZE_MAX / 2)
            return -1;
        cap *= 2;
    }
    char *p = realloc(b->p, cap);
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_put(tk_buf *b, const void *s, size_t n)
{
    if (buf_reserve(b, n))
        return -1;
    if (n)
        memcpy(b->p + b->n, s, n);
    b->n += n;
    return 0;
}

typedef struct {
    int32_t *p;
    size_t n, cap;
} tk_ivec;

static int ivec_push(tk_ivec *v, int32_t x)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        int32_t *p = realloc(v->p, cap * sizeof *p);
        if (!p)
            return -1;
        v->p = p;
        v->cap = cap;
    }
    v->p[v->n++] = x;
    return 0;
}

/* A list of strings in one buffer: item i is b.p[off[i] .. off[i + 1]). */
typedef struct {
    tk_buf b;
    size_t *off;
    size_t n, cap;
} tk_list;

static int list_push(tk_list *l, const char *s, size_t n)
{
    if (l->n + 2 > l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        size_t *p = realloc(l->off, cap * sizeof *p);
        if (!p)
            return -1;
        l->off = p;
        l->cap = cap;
    }
    if (l->n == 0)
        l->off[0] = 0;
    if (buf_put(&l->b, s, n))
        return -1;
    l->off[++l->n] = l->b.n;
    return 0;
}

static void list_free(tk_list *l)
{
    free(l->b.p);
    free(l->off);
    memset(l, 0, sizeof *l);
}

/* ---- UTF-8 ----------------------------------------------------------------------- */

/* Byte length of the character starting with lead byte c in a valid string. */
static size_t utf8_len(uint8_t c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

/* 1: s[0..n) is one complete character; 0: a proper prefix of one; -1: neither. Strict as
 * Rust's str::from_utf8 (no overlongs, surrogates or code points above U+10FFFF). */
static int utf8_status(const uint8_t *s, size_t n)
{
    uint8_t c = s[0], lo = 0x80, hi = 0xBF;
    size_t len;
    if (c < 0x80)
        return n == 1 ? 1 : -1;
    if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        lo = c == 0xE0 ? 0xA0 : 0x80;
        hi = c == 0xED ? 0x9F : 0xBF;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        lo = c == 0xF0 ? 0x90 : 0x80;
        hi = c == 0xF4 ? 0x8F : 0xBF;
    } else
        return -1;
    if (n > len)
        return -1;
    for (size_t i = 1; i < n; i++) {
        if (i == 1 ? (s[1] < lo || s[1] > hi) : (s[i] & 0xC0) != 0x80)
            return -1;
    }
    return n == len ? 1 : 0;
}

/* Offset of the first byte that does not start a valid character, or n if s is valid. */
static size_t utf8_check(const char *s, size_t n)
{
    const uint8_t *u = (const uint8_t *)s;
    size_t i = 0;
    while (i < n) {
        if (u[i] < 0x80) {
            i++;
            continue;
        }
        size_t len = utf8_len(u[i]);
        if (len > n - i || utf8_status(u + i, len) != 1)
            return i;
        i += len;
    }
    return n;
}

static uint32_t utf8_decode(const char *s)
{
    const uint8_t *u = (const uint8_t *)s;
    switch (utf8_len(u[0])) {
    case 1: return u[0];
    case 2: return (uint32_t)(u[0] & 0x1F) << 6 | (u[1] & 0x3F);
    case 3: return (uint32_t)(u[0] & 0x0F) << 12 | (uint32_t)(u[1] & 0x3F) << 6 | (u[2] & 0x3F);
    default:
        return (uint32_t)(u[0] & 0x07) << 18 | (uint32_t)(u[1] & 0x3F) << 12 |
               (uint32_t)(u[2] & 0x3F) << 6 | (u[3] & 0x3F);
    }
}

/* The last character of s[0..n) (n > 0, valid UTF-8). */
static uint32_t utf8_last(const char *s, size_t n)
{
    size_t i = n - 1;
    while (i > 0 && ((uint8_t)s[i] & 0xC0) == 0x80)
        i--;
    return utf8_decode(s + i);
}

/* Rust's char::is_whitespace (the Unicode White_Space property). */
static int is_space(uint32_t c)
{
    return (c >= 9 && c <= 13) || c == 32 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

/* The code points of the regex class \w (Alphabetic, marks, decimal digits, connector
 * punctuation, join controls) that single_word tokens test, as inclusive ranges. Derived
 * from tokenizers 0.23.2 itself: one probe "c<W>" per code point with <W> single_word. */
static const uint32_t tk_word_ranges[][2] = {
    {0x30, 0x39}, {0x41, 0x5A}, {0x5F, 0x5F}, {0x61, 0x7A}, {0xAA, 0xAA}, {0xB5, 0xB5},
    {0xBA, 0xBA}, {0xC0, 0xD6}, {0xD8, 0xF6}, {0xF8, 0x2C1}, {0x2C6, 0x2D1}, {0x2E0, 0x2E4},
    {0x2EC, 0x2EC}, {0x2EE, 0x2EE}, {0x300, 0x374}, {0x376, 0x377}, {0x37A, 0x37D}, {0x37F, 0x37F},
    {0x386, 0x386}, {0x388, 0x38A}, {0x38C, 0x38C}, {0x38E, 0x3A1}, {0x3A3, 0x3F5}, {0x3F7, 0x481},
    {0x483, 0x52F}, {0x531, 0x556}, {0x559, 0x559}, {0x560, 0x588}, {0x591, 0x5BD}, {0x5BF, 0x5BF},
    {0x5C1, 0x5C2}, {0x5C4, 0x5C5}, {0x5C7, 0x5C7}, {0x5D0, 0x5EA}, {0x5EF, 0x5F2}, {0x610, 0x61A},
    {0x620, 0x669}, {0x66E, 0x6D3}, {0x6D5, 0x6DC}, {0x6DF, 0x6E8}, {0x6EA, 0x6FC}, {0x6FF, 0x6FF},
    {0x710, 0x74A}, {0x74D, 0x7B1}, {0x7C0, 0x7F5}, {0x7FA, 0x7FA}, {0x7FD, 0x7FD}, {0x800, 0x82D},
    {0x840, 0x85B}, {0x860, 0x86A}, {0x870, 0x887}, {0x889, 0x88E}, {0x897, 0x8E1}, {0x8E3, 0x963},
    {0x966, 0x96F}, {0x971, 0x983}, {0x985, 0x98C}, {0x98F, 0x990}, {0x993, 0x9A8}, {0x9AA, 0x9B0},
    {0x9B2, 0x9B2}, {0x9B6, 0x9B9}, {0x9BC, 0x9C4}, {0x9C7, 0x9C8}, {0x9CB, 0x9CE}, {0x9D7, 0x9D7},
    {0x9DC, 0x9DD}, {0x9DF, 0x9E3}, {0x9E6, 0x9F1}, {0x9FC, 0x9FC}, {0x9FE, 0x9FE}, {0xA01, 0xA03},
    {0xA05, 0xA0A}, {0xA0F, 0xA10}, {0xA13, 0xA28}, {0xA2A, 0xA30}, {0xA32, 0xA33}, {0xA35, 0xA36},
    {0xA38, 0xA39}, {0xA3C, 0xA3C}, {0xA3E, 0xA42}, {0xA47, 0xA48}, {0xA4B, 0xA4D}, {0xA51, 0xA51},
    {0xA59, 0xA5C}, {0xA5E, 0xA5E}, {0xA66, 0xA75}, {0xA81, 0xA83}, {0xA85, 0xA8D}, {0xA8F, 0xA91},
    {0xA93, 0xAA8}, {0xAAA, 0xAB0}, {0xAB2, 0xAB3}, {0xAB5, 0xAB9}, {0xABC, 0xAC5}, {0xAC7, 0xAC9},
    {0xACB, 0xACD}, {0xAD0, 0xAD0}, {0xAE0, 0xAE3}, {0xAE6, 0xAEF}, {0xAF9, 0xAFF}, {0xB01, 0xB03},
    {0xB05, 0xB0C}, {0xB0F, 0xB10}, {0xB13, 0xB28}, {0xB2A, 0xB30}, {0xB32, 0xB33}, {0xB35, 0xB39},
    {0xB3C, 0xB44}, {0xB47, 0xB48}, {0xB4B, 0xB4D}, {0xB55, 0xB57}, {0xB5C, 0xB5D}, {0xB5F, 0xB63},
    {0xB66, 0xB6F}, {0xB71, 0xB71}, {0xB82, 0xB83}, {0xB85, 0xB8A}, {0xB8E, 0xB90}, {0xB92, 0xB95},
    {0xB99, 0xB9A}, {0xB9C, 0xB9C}, {0xB9E, 0xB9F}, {0xBA3, 0xBA4}, {0xBA8, 0xBAA}, {0xBAE, 0xBB9},
    {0xBBE, 0xBC2}, {0xBC6, 0xBC8}, {0xBCA, 0xBCD}, {0xBD0, 0xBD0}, {0xBD7, 0xBD7}, {0xBE6, 0xBEF},
    {0xC00, 0xC0C}, {0xC0E, 0xC10}, {0xC12, 0xC28}, {0xC2A, 0xC39}, {0xC3C, 0xC44}, {0xC46, 0xC48},
    {0xC4A, 0xC4D}, {0xC55, 0xC56}, {0xC58, 0xC5A}, {0xC5D, 0xC5D}, {0xC60, 0xC63}, {0xC66, 0xC6F},
    {0xC80, 0xC83}, {0xC85, 0xC8C}, {0xC8E, 0xC90}, {0xC92, 0xCA8}, {0xCAA, 0xCB3}, {0xCB5, 0xCB9},
    {0xCBC, 0xCC4}, {0xCC6, 0xCC8}, {0xCCA, 0xCCD}, {0xCD5, 0xCD6}, {0xCDD, 0xCDE}, {0xCE0, 0xCE3},
    {0xCE6, 0xCEF}, {0xCF1, 0xCF3}, {0xD00, 0xD0C}, {0xD0E, 0xD10}, {0xD12, 0xD44}, {0xD46, 0xD48},
    {0xD4A, 0xD4E}, {0xD54, 0xD57}, {0xD5F, 0xD63}, {0xD66, 0xD6F}, {0xD7A, 0xD7F}, {0xD81, 0xD83},
    {0xD85, 0xD96}, {0xD9A, 0xDB1}, {0xDB3, 0xDBB}, {0xDBD, 0xDBD}, {0xDC0, 0xDC6}, {0xDCA, 0xDCA},
    {0xDCF, 0xDD4}, {0xDD6, 0xDD6}, {0xDD8, 0xDDF}, {0xDE6, 0xDEF}, {0xDF2, 0xDF3}, {0xE01, 0xE3A},
    {0xE40, 0xE4E}, {0xE50, 0xE59}, {0xE81, 0xE82}, {0xE84, 0xE84}, {0xE86, 0xE8A}, {0xE8C, 0xEA3},
    {0xEA5, 0xEA5}, {0xEA7, 0xEBD}, {0xEC0, 0xEC4}, {0xEC6, 0xEC6}, {0xEC8, 0xECE}, {0xED0, 0xED9},
    {0xEDC, 0xEDF}, {0xF00, 0xF00}, {0xF18, 0xF19}, {0xF20, 0xF29}, {0xF35, 0xF35}, {0xF37, 0xF37},
    {0xF39, 0xF39}, {0xF3E, 0xF47}, {0xF49, 0xF6C}, {0xF71, 0xF84}, {0xF86, 0xF97}, {0xF99, 0xFBC},
    {0xFC6, 0xFC6}, {0x1000, 0x1049}, {0x1050, 0x109D}, {0x10A0, 0x10C5}, {0x10C7, 0x10C7},
    {0x10CD, 0x10CD}, {0x10D0, 0x10FA}, {0x10FC, 0x1248}, {0x124A, 0x124D}, {0x1250, 0x1256},
    {0x1258, 0x1258}, {0x125A, 0x125D}, {0x1260, 0x1288}, {0x128A, 0x128D}, {0x1290, 0x12B0},
    {0x12B2, 0x12B5}, {0x12B8, 0x12BE}, {0x12C0, 0x12C0}, {0x12C2, 0x12C5}, {0x12C8, 0x12D6},
    {0x12D8, 0x1310}, {0x1312, 0x1315}, {0x1318, 0x135A}, {0x135D, 0x135F}, {0x1380, 0x138F},
    {0x13A0, 0x13F5}, {0x13F8, 0x13FD}, {0x1401, 0x166C}, {0x166F, 0x167F}, {0x1681, 0x169A},
    {0x16A0, 0x16EA}, {0x16EE, 0x16F8}, {0x1700, 0x1715}, {0x171F, 0x1734}, {0x1740, 0x1753},
    {0x1760, 0x176C}, {0x176E, 0x1770}, {0x1772, 0x1773}, {0x1780, 0x17D3}, {0x17D7, 0x17D7},
    {0x17DC, 0x17DD}, {0x17E0, 0x17E9}, {0x180B, 0x180D}, {0x180F, 0x1819}, {0x1820, 0x1878},
    {0x1880, 0x18AA}, {0x18B0, 0x18F5}, {0x1900, 0x191E}, {0x1920, 0x192B}, {0x1930, 0x193B},
    {0x1946, 0x196D}, {0x1970, 0x1974}, {0x1980, 0x19AB}, {0x19B0, 0x19C9}, {0x19D0, 0x19D9},
    {0x1A00, 0x1A1B}, {0x1A20, 0x1A5E}, {0x1A60, 0x1A7C}, {0x1A7F, 0x1A89}, {0x1A90, 0x1A99},
    {0x1AA7, 0x1AA7}, {0x1AB0, 0x1ACE}, {0x1B00, 0x1B4C}, {0x1B50, 0x1B59}, {0x1B6B, 0x1B73},
    {0x1B80, 0x1BF3}, {0x1C00, 0x1C37}, {0x1C40, 0x1C49}, {0x1C4D, 0x1C7D}, {0x1C80, 0x1C8A},
    {0x1C90, 0x1CBA}, {0x1CBD, 0x1CBF}, {0x1CD0, 0x1CD2}, {0x1CD4, 0x1CFA}, {0x1D00, 0x1F15},
    {0x1F18, 0x1F1D}, {0x1F20, 0x1F45}, {0x1F48, 0x1F4D}, {0x1F50, 0x1F57}, {0x1F59, 0x1F59},
    {0x1F5B, 0x1F5B}, {0x1F5D, 0x1F5D}, {0x1F5F, 0x1F7D}, {0x1F80, 0x1FB4}, {0x1FB6, 0x1FBC},
    {0x1FBE, 0x1FBE}, {0x1FC2, 0x1FC4}, {0x1FC6, 0x1FCC}, {0x1FD0, 0x1FD3}, {0x1FD6, 0x1FDB},
    {0x1FE0, 0x1FEC}, {0x1FF2, 0x1FF4}, {0x1FF6, 0x1FFC}, {0x200C, 0x200D}, {0x203F, 0x2040},
    {0x2054, 0x2054}, {0x2071, 0x2071}, {0x207F, 0x207F}, {0x2090, 0x209C}, {0x20D0, 0x20F0},
    {0x2102, 0x2102}, {0x2107, 0x2107}, {0x210A, 0x2113}, {0x2115, 0x2115}, {0x2119, 0x211D},
    {0x2124, 0x2124}, {0x2126, 0x2126}, {0x2128, 0x2128}, {0x212A, 0x212D}, {0x212F, 0x2139},
    {0x213C, 0x213F}, {0x2145, 0x2149}, {0x214E, 0x214E}, {0x2160, 0x2188}, {0x24B6, 0x24E9},
    {0x2C00, 0x2CE4}, {0x2CEB, 0x2CF3}, {0x2D00, 0x2D25}, {0x2D27, 0x2D27}, {0x2D2D, 0x2D2D},
    {0x2D30, 0x2D67}, {0x2D6F, 0x2D6F}, {0x2D7F, 0x2D96}, {0x2DA0, 0x2DA6}, {0x2DA8, 0x2DAE},
    {0x2DB0, 0x2DB6}, {0x2DB8, 0x2DBE}, {0x2DC0, 0x2DC6}, {0x2DC8, 0x2DCE}, {0x2DD0, 0x2DD6},
    {0x2DD8, 0x2DDE}, {0x2DE0, 0x2DFF}, {0x2E2F, 0x2E2F}, {0x3005, 0x3007}, {0x3021, 0x302F},
    {0x3031, 0x3035}, {0x3038, 0x303C}, {0x3041, 0x3096}, {0x3099, 0x309A}, {0x309D, 0x309F},
    {0x30A1, 0x30FA}, {0x30FC, 0x30FF}, {0x3105, 0x312F}, {0x3131, 0x318E}, {0x31A0, 0x31BF},
    {0x31F0, 0x31FF}, {0x3400, 0x4DBF}, {0x4E00, 0xA48C}, {0xA4D0, 0xA4FD}, {0xA500, 0xA60C},
    {0xA610, 0xA62B}, {0xA640, 0xA672}, {0xA674, 0xA67D}, {0xA67F, 0xA6F1}, {0xA717, 0xA71F},
    {0xA722, 0xA788}, {0xA78B, 0xA7CD}, {0xA7D0, 0xA7D1}, {0xA7D3, 0xA7D3}, {0xA7D5, 0xA7DC},
    {0xA7F2, 0xA827}, {0xA82C, 0xA82C}, {0xA840, 0xA873}, {0xA880, 0xA8C5}, {0xA8D0, 0xA8D9},
    {0xA8E0, 0xA8F7}, {0xA8FB, 0xA8FB}, {0xA8FD, 0xA92D}, {0xA930, 0xA953}, {0xA960, 0xA97C},
    {0xA980, 0xA9C0}, {0xA9CF, 0xA9D9}, {0xA9E0, 0xA9FE}, {0xAA00, 0xAA36}, {0xAA40, 0xAA4D},
    {0xAA50, 0xAA59}, {0xAA60, 0xAA76}, {0xAA7A, 0xAAC2}, {0xAADB, 0xAADD}, {0xAAE0, 0xAAEF},
    {0xAAF2, 0xAAF6}, {0xAB01, 0xAB06}, {0xAB09, 0xAB0E}, {0xAB11, 0xAB16}, {0xAB20, 0xAB26},
    {0xAB28, 0xAB2E}, {0xAB30, 0xAB5A}, {0xAB5C, 0xAB69}, {0xAB70, 0xABEA}, {0xABEC, 0xABED},
    {0xABF0, 0xABF9}, {0xAC00, 0xD7A3}, {0xD7B0, 0xD7C6}, {0xD7CB, 0xD7FB}, {0xF900, 0xFA6D},
    {0xFA70, 0xFAD9}, {0xFB00, 0xFB06}, {0xFB13, 0xFB17}, {0xFB1D, 0xFB28}, {0xFB2A, 0xFB36},
    {0xFB38, 0xFB3C}, {0xFB3E, 0xFB3E}, {0xFB40, 0xFB41}, {0xFB43, 0xFB44}, {0xFB46, 0xFBB1},
    {0xFBD3, 0xFD3D}, {0xFD50, 0xFD8F}, {0xFD92, 0xFDC7}, {0xFDF0, 0xFDFB}, {0xFE00, 0xFE0F},
    {0xFE20, 0xFE2F}, {0xFE33, 0xFE34}, {0xFE4D, 0xFE4F}, {0xFE70, 0xFE74}, {0xFE76, 0xFEFC},
    {0xFF10, 0xFF19}, {0xFF21, 0xFF3A}, {0xFF3F, 0xFF3F}, {0xFF41, 0xFF5A}, {0xFF66, 0xFFBE},
    {0xFFC2, 0xFFC7}, {0xFFCA, 0xFFCF}, {0xFFD2, 0xFFD7}, {0xFFDA, 0xFFDC}, {0x10000, 0x1000B},
    {0x1000D, 0x10026}, {0x10028, 0x1003A}, {0x1003C, 0x1003D}, {0x1003F, 0x1004D},
    {0x10050, 0x1005D}, {0x10080, 0x100FA}, {0x10140, 0x10174}, {0x101FD, 0x101FD},
    {0x10280, 0x1029C}, {0x102A0, 0x102D0}, {0x102E0, 0x102E0}, {0x10300, 0x1031F},
    {0x1032D, 0x1034A}, {0x10350, 0x1037A}, {0x10380, 0x1039D}, {0x103A0, 0x103C3},
    {0x103C8, 0x103CF}, {0x103D1, 0x103D5}, {0x10400, 0x1049D}, {0x104A0, 0x104A9},
    {0x104B0, 0x104D3}, {0x104D8, 0x104FB}, {0x10500, 0x10527}, {0x10530, 0x10563},
    {0x10570, 0x1057A}, {0x1057C, 0x1058A}, {0x1058C, 0x10592}, {0x10594, 0x10595},
    {0x10597, 0x105A1}, {0x105A3, 0x105B1}, {0x105B3, 0x105B9}, {0x105BB, 0x105BC},
    {0x105C0, 0x105F3}, {0x10600, 0x10736}, {0x10740, 0x10755}, {0x10760, 0x10767},
    {0x10780, 0x10785}, {0x10787, 0x107B0}, {0x107B2, 0x107BA}, {0x10800, 0x10805},
    {0x10808, 0x10808}, {0x1080A, 0x10835}, {0x10837, 0x10838}, {0x1083C, 0x1083C},
    {0x1083F, 0x10855}, {0x10860, 0x10876}, {0x10880, 0x1089E}, {0x108E0, 0x108F2},
    {0x108F4, 0x108F5}, {0x10900, 0x10915}, {0x10920, 0x10939}, {0x10980, 0x109B7},
    {0x109BE, 0x109BF}, {0x10A00, 0x10A03}, {0x10A05, 0x10A06}, {0x10A0C, 0x10A13},
    {0x10A15, 0x10A17}, {0x10A19, 0x10A35}, {0x10A38, 0x10A3A}, {0x10A3F, 0x10A3F},
    {0x10A60, 0x10A7C}, {0x10A80, 0x10A9C}, {0x10AC0, 0x10AC7}, {0x10AC9, 0x10AE6},
    {0x10B00, 0x10B35}, {0x10B40, 0x10B55}, {0x10B60, 0x10B72}, {0x10B80, 0x10B91},
    {0x10C00, 0x10C48}, {0x10C80, 0x10CB2}, {0x10CC0, 0x10CF2}, {0x10D00, 0x10D27},
    {0x10D30, 0x10D39}, {0x10D40, 0x10D65}, {0x10D69, 0x10D6D}, {0x10D6F, 0x10D85},
    {0x10E80, 0x10EA9}, {0x10EAB, 0x10EAC}, {0x10EB0, 0x10EB1}, {0x10EC2, 0x10EC4},
    {0x10EFC, 0x10F1C}, {0x10F27, 0x10F27}, {0x10F30, 0x10F50}, {0x10F70, 0x10F85},
    {0x10FB0, 0x10FC4}, {0x10FE0, 0x10FF6}, {0x11000, 0x11046}, {0x11066, 0x11075},
    {0x1107F, 0x110BA}, {0x110C2, 0x110C2}, {0x110D0, 0x110E8}, {0x110F0, 0x110F9},
    {0x11100, 0x11134}, {0x11136, 0x1113F}, {0x11144, 0x11147}, {0x11150, 0x11173},
    {0x11176, 0x11176}, {0x11180, 0x111C4}, {0x111C9, 0x111CC}, {0x111CE, 0x111DA},
    {0x111DC, 0x111DC}, {0x11200, 0x11211}, {0x11213, 0x11237}, {0x1123E, 0x11241},
    {0x11280, 0x11286}, {0x11288, 0x11288}, {0x1128A, 0x1128D}, {0x1128F, 0x1129D},
    {0x1129F, 0x112A8}, {0x112B0, 0x112EA}, {0x112F0, 0x112F9}, {0x11300, 0x11303},
    {0x11305, 0x1130C}, {0x1130F, 0x11310}, {0x11313, 0x11328}, {0x1132A, 0x11330},
    {0x11332, 0x11333}, {0x11335, 0x11339}, {0x1133B, 0x11344}, {0x11347, 0x11348},
    {0x1134B, 0x1134D}, {0x11350, 0x11350}, {0x11357, 0x11357}, {0x1135D, 0x11363},
    {0x11366, 0x1136C}, {0x11370, 0x11374}, {0x11380, 0x11389}, {0x1138B, 0x1138B},
    {0x1138E, 0x1138E}, {0x11390, 0x113B5}, {0x113B7, 0x113C0}, {0x113C2, 0x113C2},
    {0x113C5, 0x113C5}, {0x113C7, 0x113CA}, {0x113CC, 0x113D3}, {0x113E1, 0x113E2},
    {0x11400, 0x1144A}, {0x11450, 0x11459}, {0x1145E, 0x11461}, {0x11480, 0x114C5},
    {0x114C7, 0x114C7}, {0x114D0, 0x114D9}, {0x11580, 0x115B5}, {0x115B8, 0x115C0},
    {0x115D8, 0x115DD}, {0x11600, 0x11640}, {0x11644, 0x11644}, {0x11650, 0x11659},
    {0x11680, 0x116B8}, {0x116C0, 0x116C9}, {0x116D0, 0x116E3}, {0x11700, 0x1171A},
    {0x1171D, 0x1172B}, {0x11730, 0x11739}, {0x11740, 0x11746}, {0x11800, 0x1183A},
    {0x118A0, 0x118E9}, {0x118FF, 0x11906}, {0x11909, 0x11909}, {0x1190C, 0x11913},
    {0x11915, 0x11916}, {0x11918, 0x11935}, {0x11937, 0x11938}, {0x1193B, 0x11943},
    {0x11950, 0x11959}, {0x119A0, 0x119A7}, {0x119AA, 0x119D7}, {0x119DA, 0x119E1},
    {0x119E3, 0x119E4}, {0x11A00, 0x11A3E}, {0x11A47, 0x11A47}, {0x11A50, 0x11A99},
    {0x11A9D, 0x11A9D}, {0x11AB0, 0x11AF8}, {0x11BC0, 0x11BE0}, {0x11BF0, 0x11BF9},
    {0x11C00, 0x11C08}, {0x11C0A, 0x11C36}, {0x11C38, 0x11C40}, {0x11C50, 0x11C59},
    {0x11C72, 0x11C8F}, {0x11C92, 0x11CA7}, {0x11CA9, 0x11CB6}, {0x11D00, 0x11D06},
    {0x11D08, 0x11D09}, {0x11D0B, 0x11D36}, {0x11D3A, 0x11D3A}, {0x11D3C, 0x11D3D},
    {0x11D3F, 0x11D47}, {0x11D50, 0x11D59}, {0x11D60, 0x11D65}, {0x11D67, 0x11D68},
    {0x11D6A, 0x11D8E}, {0x11D90, 0x11D91}, {0x11D93, 0x11D98}, {0x11DA0, 0x11DA9},
    {0x11EE0, 0x11EF6}, {0x11F00, 0x11F10}, {0x11F12, 0x11F3A}, {0x11F3E, 0x11F42},
    {0x11F50, 0x11F5A}, {0x11FB0, 0x11FB0}, {0x12000, 0x12399}, {0x12400, 0x1246E},
    {0x12480, 0x12543}, {0x12F90, 0x12FF0}, {0x13000, 0x1342F}, {0x13440, 0x13455},
    {0x13460, 0x143FA}, {0x14400, 0x14646}, {0x16100, 0x16139}, {0x16800, 0x16A38},
    {0x16A40, 0x16A5E}, {0x16A60, 0x16A69}, {0x16A70, 0x16ABE}, {0x16AC0, 0x16AC9},
    {0x16AD0, 0x16AED}, {0x16AF0, 0x16AF4}, {0x16B00, 0x16B36}, {0x16B40, 0x16B43},
    {0x16B50, 0x16B59}, {0x16B63, 0x16B77}, {0x16B7D, 0x16B8F}, {0x16D40, 0x16D6C},
    {0x16D70, 0x16D79}, {0x16E40, 0x16E7F}, {0x16F00, 0x16F4A}, {0x16F4F, 0x16F87},
    {0x16F8F, 0x16F9F}, {0x16FE0, 0x16FE1}, {0x16FE3, 0x16FE4}, {0x16FF0, 0x16FF1},
    {0x17000, 0x187F7}, {0x18800, 0x18CD5}, {0x18CFF, 0x18D08}, {0x1AFF0, 0x1AFF3},
    {0x1AFF5, 0x1AFFB}, {0x1AFFD, 0x1AFFE}, {0x1B000, 0x1B122}, {0x1B132, 0x1B132},
    {0x1B150, 0x1B152}, {0x1B155, 0x1B155}, {0x1B164, 0x1B167}, {0x1B170, 0x1B2FB},
    {0x1BC00, 0x1BC6A}, {0x1BC70, 0x1BC7C}, {0x1BC80, 0x1BC88}, {0x1BC90, 0x1BC99},
    {0x1BC9D, 0x1BC9E}, {0x1CCF0, 0x1CCF9}, {0x1CF00, 0x1CF2D}, {0x1CF30, 0x1CF46},
    {0x1D165, 0x1D169}, {0x1D16D, 0x1D172}, {0x1D17B, 0x1D182}, {0x1D185, 0x1D18B},
    {0x1D1AA, 0x1D1AD}, {0x1D242, 0x1D244}, {0x1D400, 0x1D454}, {0x1D456, 0x1D49C},
    {0x1D49E, 0x1D49F}, {0x1D4A2, 0x1D4A2}, {0x1D4A5, 0x1D4A6}, {0x1D4A9, 0x1D4AC},
    {0x1D4AE, 0x1D4B9}, {0x1D4BB, 0x1D4BB}, {0x1D4BD, 0x1D4C3}, {0x1D4C5, 0x1D505},
    {0x1D507, 0x1D50A}, {0x1D50D, 0x1D514}, {0x1D516, 0x1D51C}, {0x1D51E, 0x1D539},
    {0x1D53B, 0x1D53E}, {0x1D540, 0x1D544}, {0x1D546, 0x1D546}, {0x1D54A, 0x1D550},
    {0x1D552, 0x1D6A5}, {0x1D6A8, 0x1D6C0}, {0x1D6C2, 0x1D6DA}, {0x1D6DC, 0x1D6FA},
    {0x1D6FC, 0x1D714}, {0x1D716, 0x1D734}, {0x1D736, 0x1D74E}, {0x1D750, 0x1D76E},
    {0x1D770, 0x1D788}, {0x1D78A, 0x1D7A8}, {0x1D7AA, 0x1D7C2}, {0x1D7C4, 0x1D7CB},
    {0x1D7CE, 0x1D7FF}, {0x1DA00, 0x1DA36}, {0x1DA3B, 0x1DA6C}, {0x1DA75, 0x1DA75},
    {0x1DA84, 0x1DA84}, {0x1DA9B, 0x1DA9F}, {0x1DAA1, 0x1DAAF}, {0x1DF00, 0x1DF1E},
    {0x1DF25, 0x1DF2A}, {0x1E000, 0x1E006}, {0x1E008, 0x1E018}, {0x1E01B, 0x1E021},
    {0x1E023, 0x1E024}, {0x1E026, 0x1E02A}, {0x1E030, 0x1E06D}, {0x1E08F, 0x1E08F},
    {0x1E100, 0x1E12C}, {0x1E130, 0x1E13D}, {0x1E140, 0x1E149}, {0x1E14E, 0x1E14E},
    {0x1E290, 0x1E2AE}, {0x1E2C0, 0x1E2F9}, {0x1E4D0, 0x1E4F9}, {0x1E5D0, 0x1E5FA},
    {0x1E7E0, 0x1E7E6}, {0x1E7E8, 0x1E7EB}, {0x1E7ED, 0x1E7EE}, {0x1E7F0, 0x1E7FE},
    {0x1E800, 0x1E8C4}, {0x1E8D0, 0x1E8D6}, {0x1E900, 0x1E94B}, {0x1E950, 0x1E959},
    {0x1EE00, 0x1EE03}, {0x1EE05, 0x1EE1F}, {0x1EE21, 0x1EE22}, {0x1EE24, 0x1EE24},
    {0x1EE27, 0x1EE27}, {0x1EE29, 0x1EE32}, {0x1EE34, 0x1EE37}, {0x1EE39, 0x1EE39},
    {0x1EE3B, 0x1EE3B}, {0x1EE42, 0x1EE42}, {0x1EE47, 0x1EE47}, {0x1EE49, 0x1EE49},
    {0x1EE4B, 0x1EE4B}, {0x1EE4D, 0x1EE4F}, {0x1EE51, 0x1EE52}, {0x1EE54, 0x1EE54},
    {0x1EE57, 0x1EE57}, {0x1EE59, 0x1EE59}, {0x1EE5B, 0x1EE5B}, {0x1EE5D, 0x1EE5D},
    {0x1EE5F, 0x1EE5F}, {0x1EE61, 0x1EE62}, {0x1EE64, 0x1EE64}, {0x1EE67, 0x1EE6A},
    {0x1EE6C, 0x1EE72}, {0x1EE74, 0x1EE77}, {0x1EE79, 0x1EE7C}, {0x1EE7E, 0x1EE7E},
    {0x1EE80, 0x1EE89}, {0x1EE8B, 0x1EE9B}, {0x1EEA1, 0x1EEA3}, {0x1EEA5, 0x1EEA9},
    {0x1EEAB, 0x1EEBB}, {0x1F130, 0x1F149}, {0x1F150, 0x1F169}, {0x1F170, 0x1F189},
    {0x1FBF0, 0x1FBF9}, {0x20000, 0x2A6DF}, {0x2A700, 0x2B739}, {0x2B740, 0x2B81D},
    {0x2B820, 0x2CEA1}, {0x2CEB0, 0x2EBE0}, {0x2EBF0, 0x2EE5D}, {0x2F800, 0x2FA1D},
    {0x30000, 0x3134A}, {0x31350, 0x323AF}, {0xE0100, 0xE01EF},
};

static int is_word(uint32_t c)
{
    return ferry_unicode_in_ranges(tk_word_ranges, sizeof tk_word_ranges / sizeof tk_word_ranges[0],
                                   c);
}

/* ---- hash tables ------------------------------------------------------------------ */

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)s[i]) * 0x100000001b3ull;
    return h ^ (h >> 29);
}

static uint64_t hash_u64(uint64_t x)
{
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull; /* splitmix64 finalizer */
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static size_t table_cap(size_t n)
{
    size_t cap = 16;
    while (cap < 2 * n + 16)
        cap *= 2;
    return cap;
}

/* String -> id, open addressing with linear probing; keys are (offset, length) in the
 * tokenizer's blob. Sized once for its final count, never rehashed. */
typedef struct {
    uint32_t off, len;
    int32_t val; /* -1: empty slot */
} tk_sslot;

typedef struct {
    tk_sslot *slots;
    size_t mask;
} tk_smap;

static int smap_init(tk_smap *m, size_t n)
{
    size_t cap = table_cap(n);
    m->slots = malloc(cap * sizeof *m->slots);
    if (!m->slots)
        return -1;
    for (size_t i = 0; i < cap; i++)
        m->slots[i].val = -1;
    m->mask = cap - 1;
    return 0;
}

static int32_t smap_get(const tk_smap *m, const char *blob, const char *s, size_t n)
{
    if (!m->slots)
        return -1;
    for (size_t i = hash_bytes(s, n) & m->mask;; i = (i + 1) & m->mask) {
        const tk_sslot *e = &m->slots[i];
        if (e->val < 0)
            return -1;
        if (e->len == n && memcmp(blob + e->off, s, n) == 0)
            return e->val;
    }
}

/* Inserts the key unless present; returns -1 if inserted, else the id already there. */
static int32_t smap_put(tk_smap *m, const char *blob, uint32_t off, uint32_t len, int32_t val)
{
    for (size_t i = hash_bytes(blob + off, len) & m->mask;; i = (i + 1) & m->mask) {
        tk_sslot *e = &m->slots[i];
        if (e->val < 0) {
            e->off = off;
            e->len = len;
            e->val = val;
            return -1;
        }
        if (e->len == len && memcmp(blob + e->off, blob + off, len) == 0)
            return e->val;
    }
}

/* (left id, right id) -> (rank, merged id). */
typedef struct {
    uint64_t key; /* UINT64_MAX: empty slot */
    int32_t rank, new_id;
} tk_pslot;

typedef struct {
    tk_pslot *slots;
    size_t mask;
} tk_pmap;

static int pmap_init(tk_pmap *m, size_t n)
{
    size_t cap = table_cap(n);
    m->slots = malloc(cap * sizeof *m->slots);
    if (!m->slots)
        return -1;
    for (size_t i = 0; i < cap; i++)
        m->slots[i].key = UINT64_MAX;
    m->mask = cap - 1;
    return 0;
}

static uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t)(uint32_t)a << 32 | (uint32_t)b; }

static const tk_pslot *pmap_get(const tk_pmap *m, int32_t a, int32_t b)
{
    if (!m->slots)
        return NULL;
    uint64_t key = pair_key(a, b);
    for (size_t i = hash_u64(key) & m->mask;; i = (i + 1) & m->mask) {
        const tk_pslot *e = &m->slots[i];
        if (e->key == key)
            return e;
        if (e->key == UINT64_MAX)
            return NULL;
    }
}

/* A later merge of the same pair replaces the earlier, as collecting into tokenizers'
 * HashMap does. */
static void pmap_put(tk_pmap *m, int32_t a, int32_t b, int32_t rank, int32_t new_id)
{
    uint64_t key = pair_key(a, b);
    for (size_t i = hash_u64(key) & m->mask;; i = (i + 1) & m->mask) {
        tk_pslot *e = &m->slots[i];
        if (e->key == key || e->key == UINT64_MAX) {
            e->key = key;
            e->rank = rank;
            e->new_id = new_id;
            return;
        }
    }
}

/* ---- the tokenizer ------------------------------------------------------------------ */

enum {
    STEP_PREPEND,      /* normalizer: a before a non-empty string */
    STEP_REPLACE,      /* normalizer or decoder: every a by b */
    STEP_BYTEFALLBACK, /* decoder: <0xNN> runs to UTF-8 */
    STEP_FUSE,         /* decoder: join every string */
    STEP_STRIP,        /* decoder: drop up to start leading / stop trailing a */
    STEP_METASPACE,    /* decoder: a to ' ', dropped in the first token unless never */
    STEP_NFC,          /* normalizer: Unicode NFC */
    STEP_BYTELEVEL,    /* decoder: the byte alphabet back to bytes, then lossy UTF-8 */
};

enum { SCHEME_ALWAYS, SCHEME_FIRST, SCHEME_NEVER };

typedef struct {
    int kind;
    uint32_t a_off, a_len, b_off, b_len; /* strings in the blob */
    int32_t start, stop;                 /* STEP_STRIP */
    int never;                           /* STEP_METASPACE: prepend_scheme never */
} tk_step;

typedef struct {
    uint32_t off, len; /* content */
    uint32_t pat_off, pat_len; /* the pattern matched: content, normalized if normalized */
    int32_t id;
    uint8_t single_word, lstrip, rstrip, normalized, special;
} tk_added;

/* A byte trie of added-token patterns for leftmost-longest matching. */
typedef struct {
    int32_t child, sibling, added; /* added: index in t->added ending here, or -1 */
    uint8_t byte;
} tk_node;

typedef struct {
    tk_node *nodes;
    size_t n, cap;
    int32_t root[256]; /* node for the first byte, or -1 */
} tk_trie;

struct ferry_tokenizer {
    char *origin;
    tk_buf blob;
    tk_smap vocab; /* model vocab: token -> id */
    tk_pmap merges;
    int32_t n_vocab;
    uint32_t *tok_off, *tok_len;          /* (n_vocab) each id's token; tok_len TK_NONE: none */
    uint8_t *special;                     /* (n_vocab) 1 if the token is a special added token */
    uint32_t *piece_off[2], *piece_len[2]; /* (n_vocab) after the per-token decoder steps;
                                             [0]: as the first token, [1]: later */
    int32_t byte_id[256];                 /* id of <0xNN>, or -1 */
    int has_unk;
    int32_t unk_id; /* -1 when unk_token is not in the vocab */
    uint32_t unk_off, unk_len;
    int byte_fallback, fuse_unk, ignore_merges;

    tk_added *added;
    int32_t n_added;
    tk_trie raw_trie, norm_trie;

    tk_step *norm;
    int32_t n_norm;

    int metaspace; /* pre-tokenizer: Metaspace, or pretok (Split/ByteLevel steps), or none */
    uint32_t ms_off, ms_len;
    int ms_scheme, ms_split;
    ferry_pretok *pretok;
    int bytes_direct;      /* pretok gives raw bytes and BPE starts from byte_sym */
    int32_t byte_sym[256]; /* id of the byte-alphabet character of each byte, or -1 */

    tk_ivec prefix, suffix; /* ids added around the text when add_special */
    int32_t bos_id, eos_id;

    int has_decoder;
    tk_step *dec;
    int32_t n_dec, n_dec_pre; /* dec[0 .. n_dec_pre) act per token */
    int dec_bytelevel;        /* dec[n_dec_pre - 1] is ByteLevel: pieces are bytes, joined
                                 and made UTF-8 (lossy) before the rest */
    int stream_bytes;         /* the stream groups byte tokens */
    int32_t strip_start;      /* the stream drops up to this many leading strip chars */
    uint32_t strip_off, strip_len;
    size_t max_piece;
};

static ferry_status nomem(const ferry_tokenizer *t)
{
    return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", t->origin);
}

static int blob_add(ferry_tokenizer *t, const char *s, size_t n, uint32_t *off)
{
    if (t->blob.n + n > UINT32_MAX - 1 || buf_put(&t->blob, s, n))
        return -1;
    *off = (uint32_t)(t->blob.n - n);
    return 0;
}

static const char *blob_at(const ferry_tokenizer *t, uint32_t off) { return t->blob.p + off; }

/* ---- added-token matching (AddedVocabulary::find_matches) ------------------------------ */

static int trie_insert(tk_trie *tr, const char *s, size_t n, int32_t added)
{
    if (n == 0)
        return 0;
    int32_t node = -1;
    for (size_t i = 0; i < n; i++) {
        uint8_t c = (uint8_t)s[i];
        int32_t next = node < 0 ? tr->root[c] : tr->nodes[node].child;
        while (node >= 0 && next >= 0 && tr->nodes[next].byte != c)
            next = tr->nodes[next].sibling;
        if (next < 0) {
            if (tr->n == tr->cap) {
                size_t cap = tr->cap ? tr->cap * 2 : 64;
                tk_node *p = realloc(tr->nodes, cap * sizeof *p);
                if (!p)
                    return -1;
                tr->nodes = p;
                tr->cap = cap;
            }
            next = (int32_t)tr->n++;
            tr->nodes[next] = (tk_node){.child = -1, .sibling = -1, .added = -1, .byte = c};
            if (node < 0)
                tr->root[c] = next;
            else {
                tr->nodes[next].sibling = tr->nodes[node].child;
                tr->nodes[node].child = next;
            }
        }
        node = next;
    }
    /* the first token with a given pattern wins, as in an Aho-Corasick automaton */
    if (tr->nodes[node].added < 0)
        tr->nodes[node].added = added;
    return 0;
}

/* The longest pattern starting at s[i]: its added index (end in *end), or -1. */
static int32_t trie_longest(const tk_trie *tr, const char *s, size_t n, size_t i, size_t *end)
{
    int32_t node = tr->root[(uint8_t)s[i]], best = -1;
    size_t j = i + 1;
    while (node >= 0) {
        if (tr->nodes[node].added >= 0) {
            best = tr->nodes[node].added;
            *end = j;
        }
        if (j == n)
            break;
        uint8_t c = (uint8_t)s[j++];
        node = tr->nodes[node].child;
        while (node >= 0 && tr->nodes[node].byte != c)
            node = tr->nodes[node].sibling;
    }
    return best;
}

typedef struct {
    size_t start, end;
    int32_t added; /* index in t->added, or -1 for text */
} tk_seg;

typedef struct {
    tk_seg *p;
    size_t n, cap;
} tk_segvec;

static int seg_push(tk_segvec *v, size_t start, size_t end, int32_t added)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 16;
        tk_seg *p = realloc(v->p, cap * sizeof *p);
        if (!p)
            return -1;
        v->p = p;
        v->cap = cap;
    }
    v->p[v->n++] = (tk_seg){start, end, added};
    return 0;
}

/* Splits s[0..n) into text and added-token segments (empty text segments omitted). Scanning
 * resumes after each pattern match even when the match is then discarded (single_word), as
 * the Aho-Corasick iterator does; lstrip/rstrip widen a match over adjacent whitespace. */
static int find_matches(const ferry_tokenizer *t, const tk_trie *tr, const char *s, size_t n,
                        tk_segvec *out)
{
    size_t start_offset = 0, i = 0;
    out->n = 0;
    while (tr->n && i < n) {
        size_t start = i, stop = 0;
        int32_t a = trie_longest(tr, s, n, i, &stop);
        if (a < 0) {
            i++;
            continue;
        }
        i = stop;
        const tk_added *tok = &t->added[a];
        if (tok->single_word) {
            int start_space = start == 0 || !is_word(utf8_last(s, start));
            int stop_space = stop == n || !is_word(utf8_decode(s + stop));
            if (!start_space || !stop_space)
                continue;
        }
        if (tok->lstrip) {
            size_t k = start;
            while (k > 0) {
                size_t c = k - 1;
                while (c > 0 && ((uint8_t)s[c] & 0xC0) == 0x80)
                    c--;
                if (!is_space(utf8_decode(s + c)))
                    break;
                k = c;
            }
            start = k;
        }
        if (tok->rstrip) {
            while (stop < n && is_space(utf8_decode(s + stop)))
                stop += utf8_len((uint8_t)s[stop]);
        }
        if (start < start_offset) /* whitespace an earlier match already took */
            start = start_offset;
        if (start > start_offset && seg_push(out, start_offset, start, -1))
            return -1;
        if (seg_push(out, start, stop, a))
            return -1;
        start_offset = stop;
    }
    if (start_offset < n && seg_push(out, start_offset, n, -1))
        return -1;
    return 0;
}

/* ---- normalizer ------------------------------------------------------------------- */

/* The most bytes a chain of normalizer steps, or of decoder steps, may make of n bytes:
 * far above what real tokenizers do (Llama's Replace ' ' -> U+2581 triples the text), low
 * enough that chained Replace steps ("a" -> "aa", 40 times) cannot amplify without bound. */
#define TK_GROWTH_TEXT "16 x its input + 4096 bytes"
static size_t growth_limit(size_t n)
{
    return n > (SIZE_MAX - 4096) / 16 ? SIZE_MAX : 16 * n + 4096;
}

/* Replaces every occurrence of a in s[0..n) by b, appending to out. Returns 0, -1 when out
 * of memory, 1 (out unfinished) when out would grow past limit bytes. */
static int replace_all(const char *s, size_t n, const char *a, size_t na, const char *b,
                       size_t nb, tk_buf *out, size_t limit)
{
    size_t i = 0, done = 0;
    while (i + na <= n) {
        const char *p = memchr(s + i, a[0], n - i - na + 1);
        if (!p)
            break;
        i = (size_t)(p - s);
        if (memcmp(p, a, na) == 0) {
            if (out->n + (i - done) + nb > limit)
                return 1;
            if (buf_put(out, s + done, i - done) || buf_put(out, b, nb))
                return -1;
            i += na;
            done = i;
        } else
            i++;
    }
    if (out->n + (n - done) > limit)
        return 1;
    return buf_put(out, s + done, n - done);
}

/* The failure of a normalizer (chain "normalizer") or decoder step k that grew the text of
 * n bytes past the limit. */
static ferry_status too_long(const ferry_tokenizer *t, const char *chain, int32_t k,
                             const tk_step *st, size_t n)
{
    const char *a = blob_at(t, st->a_off), *b = blob_at(t, st->b_off);
    int na = (int)(st->a_len < TK_SHOW ? st->a_len : TK_SHOW);
    int nb = (int)(st->b_len < TK_SHOW ? st->b_len : TK_SHOW);
    if (st->kind == STEP_REPLACE)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: %s step %d (Replace '%.*s' -> '%.*s') makes "
                          "%zu bytes of text longer than " TK_GROWTH_TEXT, t->origin, chain,
                          (int)k, na, a, nb, b, n);
    return ferry_fail(FERRY_ERR_FORMAT, "%s: %s step %d (%s) makes %zu bytes of text longer "
                      "than " TK_GROWTH_TEXT, t->origin, chain, (int)k,
                      st->kind == STEP_PREPEND ? "Prepend" : "NFC", n);
}

/* Normalizes s[0..n) into *cur (using *tmp as scratch; the two may be swapped). Returns
 * FERRY_ERR_FORMAT when a step grows the text past growth_limit(n), FERRY_ERR_NOMEM. */
static ferry_status normalize(const ferry_tokenizer *t, const char *s, size_t n, tk_buf *cur,
                              tk_buf *tmp)
{
    size_t limit = growth_limit(n);
    cur->n = 0;
    if (buf_put(cur, s, n))
        return nomem(t);
    for (int32_t k = 0; k < t->n_norm; k++) {
        const tk_step *st = &t->norm[k];
        int rc = 0;
        tmp->n = 0;
        if (st->kind == STEP_PREPEND) {
            if (cur->n == 0)
                continue;
            rc = cur->n + st->a_len > limit ? 1
                 : buf_put(tmp, blob_at(t, st->a_off), st->a_len) || buf_put(tmp, cur->p, cur->n)
                     ? -1 : 0;
        } else if (st->kind == STEP_NFC) {
            char *o;
            size_t on;
            if (ferry_unicode_nfc(cur->p, cur->n, &o, &on))
                return nomem(t);
            if (!o)
                continue;
            rc = on > limit ? 1 : buf_put(tmp, o, on) ? -1 : 0;
            free(o);
        } else {
            rc = replace_all(cur->p, cur->n, blob_at(t, st->a_off), st->a_len,
                             blob_at(t, st->b_off), st->b_len, tmp, limit);
        }
        if (rc < 0)
            return nomem(t);
        if (rc > 0)
            return too_long(t, "normalizer", k, st, n);
        tk_buf swap = *cur;
        *cur = *tmp;
        *tmp = swap;
    }
    return FERRY_OK;
}

/* ---- BPE (tokenizers' BPE::merge_word and Word::merge_all) ------------------------------ */

typedef struct {
    int32_t id, prev, next, len; /* len 0: merged into its left neighbour */
} tk_sym;

typedef struct {
    int32_t rank, pos, new_id;
} tk_merge;

typedef struct {
    uint32_t key_off, key_len; /* in cache_keys; key_len UINT32_MAX: empty slot */
    uint32_t ids_off, n_ids;   /* in cache_ids */
} tk_cslot;

#define TK_CACHE_WORD 64      /* longer words are not cached */
#define TK_CACHE_MAX (1 << 14) /* entries; the cache starts over when full */

typedef struct {
    tk_buf norm, tmp, word, mapped;
    tk_segvec segs, nsegs;
    tk_sym *syms;
    tk_merge *heap;
    size_t syms_cap, heap_cap;
    tk_ivec ids;
    ferry_pretok_scratch *pts;
    /* word -> ids of the words BPE'd in this call (BPE is a pure function of the word) */
    tk_cslot *cache;
    size_t cache_mask, cache_n;
    tk_buf cache_keys;
    tk_ivec cache_ids;
} tk_enc;

static void enc_free(tk_enc *e)
{
    free(e->norm.p);
    free(e->tmp.p);
    free(e->word.p);
    free(e->mapped.p);
    free(e->segs.p);
    free(e->nsegs.p);
    free(e->syms);
    free(e->heap);
    free(e->ids.p);
    ferry_pretok_scratch_free(e->pts);
    free(e->cache);
    free(e->cache_keys.p);
    free(e->cache_ids.p);
}

static int merge_less(const tk_merge *a, const tk_merge *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(tk_merge *h, size_t *n, tk_merge m)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!merge_less(&m, &h[p]))
            break;
        h[i] = h[p];
        i = p;
    }
    h[i] = m;
}

static tk_merge heap_pop(tk_merge *h, size_t *n)
{
    tk_merge top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n)
            break;
        if (c + 1 < *n && merge_less(&h[c + 1], &h[c]))
            c++;
        if (!merge_less(&h[c], &last))
            break;
        h[i] = h[c];
        i = c;
    }
    if (*n > 0)
        h[i] = last;
    return top;
}

static void sym_add(tk_sym *syms, size_t *n, int32_t id, int32_t len)
{
    int32_t i = (int32_t)*n;
    syms[i] = (tk_sym){.id = id, .prev = i - 1, .next = -1, .len = len};
    if (i > 0)
        syms[i - 1].next = i;
    (*n)++;
}

/* Room for n symbols and their merges. */
static ferry_status syms_reserve(const ferry_tokenizer *t, tk_enc *e, size_t n)
{
    if (n <= e->syms_cap)
        return FERRY_OK;
    if (n > (size_t)INT32_MAX / 3)
        return ferry_fail(FERRY_ERR_INVALID, "text: a word of %zu bytes is too long", n);
    tk_sym *s = realloc(e->syms, n * sizeof *s);
    if (!s)
        return nomem(t);
    e->syms = s;
    e->syms_cap = n;
    tk_merge *h = realloc(e->heap, 3 * n * sizeof *h);
    if (!h)
        return nomem(t);
    e->heap = h;
    e->heap_cap = 3 * n; /* n - 1 initial pairs + at most 2 per merge */
    return FERRY_OK;
}

/* Word::merge_all over e->syms[0 .. n_syms); appends the ids left to e->ids. */
static ferry_status bpe_merge(const ferry_tokenizer *t, tk_enc *e, size_t n_syms)
{
    tk_sym *syms = e->syms;
    tk_merge *heap = e->heap;
    size_t n_heap = 0;
    for (size_t i = 0; i + 1 < n_syms; i++) {
        const tk_pslot *m = pmap_get(&t->merges, syms[i].id, syms[i + 1].id);
        if (m)
            heap_push(heap, &n_heap, (tk_merge){m->rank, (int32_t)i, m->new_id});
    }
    while (n_heap > 0) {
        tk_merge top = heap_pop(heap, &n_heap);
        tk_sym *cur = &syms[top.pos];
        if (cur->len == 0 || cur->next < 0)
            continue;
        tk_sym right = syms[cur->next];
        const tk_pslot *m = pmap_get(&t->merges, cur->id, right.id);
        if (!m || m->new_id != top.new_id) /* an entry made stale by an earlier merge */
            continue;
        syms[cur->next].len = 0;
        cur->id = top.new_id;
        cur->len += right.len;
        cur->next = right.next;
        if (right.next >= 0)
            syms[right.next].prev = top.pos;
        if (cur->prev >= 0) {
            m = pmap_get(&t->merges, syms[cur->prev].id, cur->id);
            if (m)
                heap_push(heap, &n_heap, (tk_merge){m->rank, cur->prev, m->new_id});
        }
        if (cur->next >= 0) {
            m = pmap_get(&t->merges, cur->id, syms[cur->next].id);
            if (m)
                heap_push(heap, &n_heap, (tk_merge){m->rank, top.pos, m->new_id});
        }
    }
    for (size_t i = 0; i < n_syms; i++) {
        if (syms[i].len != 0 && ivec_push(&e->ids, syms[i].id))
            return nomem(t);
    }
    return FERRY_OK;
}

/* Appends the ids of one word to e->ids: one symbol per character (byte fallback, unk). */
static ferry_status bpe_word(const ferry_tokenizer *t, tk_enc *e, const char *w, size_t n)
{
    if (n == 0)
        return FERRY_OK;
    if (t->ignore_merges) {
        int32_t id = smap_get(&t->vocab, t->blob.p, w, n);
        if (id >= 0)
            return ivec_push(&e->ids, id) ? nomem(t) : FERRY_OK;
    }
    ferry_status st = syms_reserve(t, e, n);
    if (st)
        return st;
    tk_sym *syms = e->syms;
    size_t n_syms = 0;
    int unk_on = 0;
    int32_t unk_len = 0;
    for (size_t i = 0; i < n;) {
        size_t clen = utf8_len((uint8_t)w[i]);
        int32_t id = smap_get(&t->vocab, t->blob.p, w + i, clen);
        if (id >= 0) {
            if (unk_on)
                sym_add(syms, &n_syms, t->unk_id, unk_len);
            unk_on = 0;
            sym_add(syms, &n_syms, id, (int32_t)clen);
        } else {
            int bytes_ok = t->byte_fallback;
            for (size_t k = 0; bytes_ok && k < clen; k++)
                bytes_ok = t->byte_id[(uint8_t)w[i + k]] >= 0;
            if (bytes_ok) {
                /* as in tokenizers, a pending unk is not flushed first: it lands after */
                for (size_t k = 0; k < clen; k++)
                    sym_add(syms, &n_syms, t->byte_id[(uint8_t)w[i + k]], 1);
            } else if (t->has_unk) {
                if (t->unk_id < 0)
                    return ferry_fail(FERRY_ERR_FORMAT,
                                      "%s: model.unk_token '%.*s' is not in the vocab", t->origin,
                                      (int)(t->unk_len < TK_SHOW ? t->unk_len : TK_SHOW),
                                      blob_at(t, t->unk_off));
                if (unk_on && t->fuse_unk)
                    unk_len += (int32_t)clen;
                else {
                    if (unk_on)
                        sym_add(syms, &n_syms, t->unk_id, unk_len);
                    unk_on = 1;
                    unk_len = (int32_t)clen;
                }
            }
        }
        i += clen;
    }
    if (unk_on)
        sym_add(syms, &n_syms, t->unk_id, unk_len);
    return bpe_merge(t, e, n_syms);
}

/* Maps raw bytes to the byte-level alphabet into e->mapped. */
static int map_bytes(tk_enc *e, const char *w, size_t n)
{
    e->mapped.n = 0;
    if (n > SIZE_MAX / 2 || buf_reserve(&e->mapped, 2 * n))
        return -1;
    for (size_t i = 0; i < n; i++)
        e->mapped.n += ferry_bytelevel_char((uint8_t)w[i], e->mapped.p + e->mapped.n);
    return 0;
}

/* bpe_word for a word of raw bytes whose alphabet characters are all in the vocab: one
 * symbol per byte (the same symbols bpe_word makes of the mapped word). */
static ferry_status bpe_bytes(const ferry_tokenizer *t, tk_enc *e, const char *w, size_t n)
{
    if (t->ignore_merges) {
        if (map_bytes(e, w, n))
            return nomem(t);
        int32_t id = smap_get(&t->vocab, t->blob.p, e->mapped.p, e->mapped.n);
        if (id >= 0)
            return ivec_push(&e->ids, id) ? nomem(t) : FERRY_OK;
    }
    ferry_status st = syms_reserve(t, e, n);
    if (st)
        return st;
    size_t n_syms = 0;
    for (size_t i = 0; i < n; i++)
        sym_add(e->syms, &n_syms, t->byte_sym[(uint8_t)w[i]], 1);
    return bpe_merge(t, e, n_syms);
}

/* ---- the word cache ---------------------------------------------------------------- */

static int cache_grow(tk_enc *e, size_t cap)
{
    tk_cslot *slots = malloc(cap * sizeof *slots);
    if (!slots)
        return -1;
    for (size_t i = 0; i < cap; i++)
        slots[i].key_len = UINT32_MAX;
    for (size_t i = 0; e->cache && i <= e->cache_mask; i++) {
        tk_cslot c = e->cache[i];
        if (c.key_len == UINT32_MAX)
            continue;
        size_t j = hash_bytes(e->cache_keys.p + c.key_off, c.key_len) & (cap - 1);
        while (slots[j].key_len != UINT32_MAX)
            j = (j + 1) & (cap - 1);
        slots[j] = c;
    }
    free(e->cache);
    e->cache = slots;
    e->cache_mask = cap - 1;
    return 0;
}

/* The cached ids of a word, or NULL. */
static const tk_cslot *cache_get(const tk_enc *e, const char *w, size_t n, uint64_t h)
{
    if (!e->cache)
        return NULL;
    for (size_t i = h & e->cache_mask;; i = (i + 1) & e->cache_mask) {
        const tk_cslot *c = &e->cache[i];
        if (c->key_len == UINT32_MAX)
            return NULL;
        if (c->key_len == n && memcmp(e->cache_keys.p + c->key_off, w, n) == 0)
            return c;
    }
}

static int cache_put(tk_enc *e, const char *w, size_t n, uint64_t h, const int32_t *ids,
                     size_t n_ids)
{
    if (e->cache_n >= TK_CACHE_MAX) { /* start over rather than grow without bound */
        for (size_t i = 0; i <= e->cache_mask; i++)
            e->cache[i].key_len = UINT32_MAX;
        e->cache_n = 0;
        e->cache_keys.n = 0;
        e->cache_ids.n = 0;
    }
    if ((!e->cache || 2 * (e->cache_n + 1) > e->cache_mask + 1) &&
        cache_grow(e, e->cache ? 2 * (e->cache_mask + 1) : 256))
        return -1;
    tk_cslot c = {(uint32_t)e->cache_keys.n, (uint32_t)n, (uint32_t)e->cache_ids.n,
                  (uint32_t)n_ids};
    if (buf_put(&e->cache_keys, w, n))
        return -1;
    for (size_t k = 0; k < n_ids; k++)
        if (ivec_push(&e->cache_ids, ids[k]))
            return -1;
    size_t i = h & e->cache_mask;
    while (e->cache[i].key_len != UINT32_MAX)
        i = (i + 1) & e->cache_mask;
    e->cache[i] = c;
    e->cache_n++;
    return 0;
}

/* BPE of one word through the cache; bytes: w is raw bytes for bpe_bytes. */
static ferry_status bpe_cached(const ferry_tokenizer *t, tk_enc *e, const char *w, size_t n,
                               int bytes)
{
    if (n == 0 || n > TK_CACHE_WORD)
        return bytes ? bpe_bytes(t, e, w, n) : bpe_word(t, e, w, n);
    uint64_t h = hash_bytes(w, n);
    const tk_cslot *c = cache_get(e, w, n, h);
    if (c) {
        for (uint32_t k = 0; k < c->n_ids; k++)
            if (ivec_push(&e->ids, e->cache_ids.p[c->ids_off + k]))
                return nomem(t);
        return FERRY_OK;
    }
    size_t before = e->ids.n;
    ferry_status st = bytes ? bpe_bytes(t, e, w, n) : bpe_word(t, e, w, n);
    if (st)
        return st;
    /* a word may give no ids (characters outside a vocab without unk): e->ids.p can still
     * be NULL, and NULL + 0 is undefined */
    const int32_t *ids = e->ids.n > before ? e->ids.p + before : NULL;
    return cache_put(e, w, n, h, ids, e->ids.n - before) ? nomem(t) : FERRY_OK;
}

typedef struct {
    const ferry_tokenizer *t;
    tk_enc *e;
} tk_word_ctx;

/* One word of the Split/ByteLevel pre-tokenizer. */
static ferry_status on_word(const char *w, size_t n, void *user)
{
    tk_word_ctx *c = user;
    if (c->t->bytes_direct)
        return bpe_cached(c->t, c->e, w, n, 1);
    if (!ferry_pretok_bytes_out(c->t->pretok))
        return bpe_cached(c->t, c->e, w, n, 0);
    if (map_bytes(c->e, w, n))
        return nomem(c->t);
    return bpe_cached(c->t, c->e, c->e->mapped.p, c->e->mapped.n, 0);
}

/* Pre-tokenizes one normalized piece and BPEs its words. at_origin: the piece starts at
 * offset 0 of the original text (Metaspace's prepend_scheme "first"). */
static ferry_status encode_piece(const ferry_tokenizer *t, tk_enc *e, const char *s, size_t n,
                                 int at_origin)
{
    if (t->pretok) {
        ferry_status st;
        if (!e->pts && (st = ferry_pretok_scratch_create(&e->pts)))
            return st;
        tk_word_ctx c = {t, e};
        return ferry_pretok_run(t->pretok, e->pts, s, n, on_word, &c);
    }
    if (!t->metaspace || n == 0)
        return bpe_cached(t, e, s, n, 0);
    const char *r = blob_at(t, t->ms_off);
    size_t nr = t->ms_len;
    e->word.n = 0;
    int starts = s[0] == ' ' || (n >= nr && memcmp(s, r, nr) == 0);
    int prepend = t->ms_scheme == SCHEME_ALWAYS || (t->ms_scheme == SCHEME_FIRST && at_origin);
    if (prepend && !starts && buf_put(&e->word, r, nr))
        return nomem(t);
    if (replace_all(s, n, " ", 1, r, nr, &e->word, SIZE_MAX))
        return nomem(t);
    const char *w = e->word.p;
    size_t nw = e->word.n;
    if (!t->ms_split)
        return bpe_cached(t, e, w, nw, 0);
    /* SplitDelimiterBehavior::MergedWithNext: every replacement char starts a word */
    size_t start = 0;
    for (size_t i = nr; i + nr <= nw; i++) {
        if (memcmp(w + i, r, nr) != 0)
            continue;
        ferry_status st = bpe_cached(t, e, w + start, i - start, 0);
        if (st)
            return st;
        start = i;
        i += nr - 1;
    }
    return bpe_cached(t, e, w + start, nw - start, 0);
}

static ferry_status encode_text(const ferry_tokenizer *t, tk_enc *e, const char *text, size_t len)
{
    ferry_status st;
    if (find_matches(t, &t->raw_trie, text, len, &e->segs))
        return nomem(t);
    for (size_t k = 0; k < e->segs.n; k++) {
        const tk_seg *seg = &e->segs.p[k];
        if (seg->added >= 0) {
            if (ivec_push(&e->ids, t->added[seg->added].id))
                return nomem(t);
            continue;
        }
        if ((st = normalize(t, text + seg->start, seg->end - seg->start, &e->norm, &e->tmp)))
            return st;
        if (find_matches(t, &t->norm_trie, e->norm.p, e->norm.n, &e->nsegs))
            return nomem(t);
        for (size_t j = 0; j < e->nsegs.n; j++) {
            const tk_seg *ns = &e->nsegs.p[j];
            if (ns->added >= 0) {
                if (ivec_push(&e->ids, t->added[ns->added].id))
                    return nomem(t);
                continue;
            }
            st = encode_piece(t, e, e->norm.p + ns->start, ns->end - ns->start,
                              seg->start == 0 && ns->start == 0);
            if (st)
                return st;
        }
    }
    return FERRY_OK;
}

ferry_status ferry_tokenizer_encode(const ferry_tokenizer *t, const char *text, size_t len,
                                    int add_special, int32_t *ids, int32_t cap, int32_t *n_out)
{
    ferry_status st = FERRY_OK;
    tk_enc e;
    memset(&e, 0, sizeof e);
    if (!t || !n_out || (!text && len) || cap < 0 || (!ids && cap > 0))
        return ferry_fail(FERRY_ERR_INVALID, "ferry_tokenizer_encode: invalid arguments");
    size_t bad = utf8_check(text, len);
    if (bad < len)
        return ferry_fail(FERRY_ERR_INVALID, "text: invalid UTF-8 at byte %zu", bad);
    if (add_special) {
        for (size_t i = 0; i < t->prefix.n; i++)
            if (ivec_push(&e.ids, t->prefix.p[i])) {
                st = nomem(t);
                goto fail;
            }
    }
    st = encode_text(t, &e, text, len);
    if (st)
        goto fail;
    if (add_special) {
        for (size_t i = 0; i < t->suffix.n; i++)
            if (ivec_push(&e.ids, t->suffix.p[i])) {
                st = nomem(t);
                goto fail;
            }
    }
    if (e.ids.n > INT32_MAX) {
        st = ferry_fail(FERRY_ERR_INVALID, "text: %zu tokens do not fit an int32 count", e.ids.n);
        goto fail;
    }
    size_t n_copy = e.ids.n < (size_t)cap ? e.ids.n : (size_t)cap;
    if (n_copy)
        memcpy(ids, e.ids.p, n_copy * sizeof *ids);
    *n_out = (int32_t)e.ids.n;
    if (e.ids.n > (size_t)cap)
        st = ferry_fail(FERRY_ERR_INVALID, "ferry_tokenizer_encode: %zu ids do not fit in %d",
                        e.ids.n, (int)cap);
fail:
    enc_free(&e);
    return st;
}

/* ---- decoding -------------------------------------------------------------------- */

static int hex_val(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* The byte of a "<0xNN>" token as ByteFallback reads it (u8::from_str_radix, which also
 * takes a '+' sign), or -1. */
static int byte_token(const char *s, size_t n)
{
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>')
        return -1;
    int hi = hex_val(s[3]), lo = hex_val(s[4]);
    if (s[3] == '+')
        return lo;
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

/* One decoder step on one token (Replace, Metaspace, Strip, ByteLevel), appending to out.
 * Returns 0, -1 when out of memory, 1 when out would grow past limit bytes. */
static int step_token(const ferry_tokenizer *t, const tk_step *st, const char *s, size_t n,
                      int first, tk_buf *out, size_t limit)
{
    const char *a = blob_at(t, st->a_off);
    size_t na = st->a_len;
    if (st->kind == STEP_REPLACE)
        return replace_all(s, n, a, na, blob_at(t, st->b_off), st->b_len, out, limit);
    if (st->kind == STEP_METASPACE) {
        if (first && !st->never) /* tokenizers drops every one of them in the first token */
            return replace_all(s, n, a, na, "", 0, out, limit);
        return replace_all(s, n, a, na, " ", 1, out, limit);
    }
    if (st->kind == STEP_BYTELEVEL) {
        /* every character to its byte; a token with a character outside the alphabet (an
         * added token such as <｜User｜>) stays as its UTF-8 */
        size_t start = out->n;
        if (buf_reserve(out, n))
            return -1;
        for (size_t i = 0; i < n; i += utf8_len((uint8_t)s[i])) {
            int b = ferry_bytelevel_byte(utf8_decode(s + i));
            if (b < 0) {
                out->n = start;
                return buf_put(out, s, n);
            }
            out->p[out->n++] = (char)b;
        }
        return 0;
    }
    size_t p = 0, q = n; /* STEP_STRIP */
    for (int32_t k = 0; k < st->start && p + na <= n && memcmp(s + p, a, na) == 0; k++)
        p += na;
    for (int32_t k = 0; k < st->stop && q >= na && memcmp(s + q - na, a, na) == 0; k++)
        q -= na;
    return p < q ? buf_put(out, s + p, q - p) : 0;
}

/* Feeds byte b to a lossy UTF-8 decoder (Rust's String::from_utf8_lossy: complete valid
 * characters as they are, U+FFFD for each maximal invalid subpart) whose incomplete
 * character waits in pending[0 .. *n_pending). Writes what is now decided to out (at most
 * U+FFFD and a 4-byte character) and returns its length. */
static size_t lossy_byte(uint8_t *pending, int32_t *n_pending, uint8_t b, char out[8])
{
    size_t k = 0;
    for (;;) {
        if (*n_pending == 0) {
            if (b < 0x80) {
                out[k] = (char)b;
                return k + 1;
            }
            if (b >= 0xC2 && b <= 0xF4) {
                pending[0] = b;
                *n_pending = 1;
                return k;
            }
            memcpy(out + k, tk_fffd, 3);
            return k + 3;
        }
        pending[*n_pending] = b;
        int r = utf8_status(pending, (size_t)*n_pending + 1);
        if (r == 1) {
            memcpy(out + k, pending, (size_t)*n_pending + 1);
            k += (size_t)*n_pending + 1;
            *n_pending = 0;
            return k;
        }
        if (r == 0) {
            (*n_pending)++;
            return k;
        }
        /* the pending prefix is a maximal invalid subpart; b starts afresh */
        memcpy(out + k, tk_fffd, 3);
        k += 3;
        *n_pending = 0;
    }
}

/* s[0..n) made valid UTF-8 as String::from_utf8_lossy does, appended to out. */
static int lossy_append(tk_buf *out, const char *s, size_t n)
{
    uint8_t pending[4];
    int32_t n_pending = 0;
    char piece[8];
    if (buf_reserve(out, n))
        return -1;
    for (size_t i = 0; i < n; i++) {
        size_t k = lossy_byte(pending, &n_pending, (uint8_t)s[i], piece);
        if (buf_put(out, piece, k))
            return -1;
    }
    return n_pending > 0 ? buf_put(out, tk_fffd, 3) : 0;
}

/* Runs the decoder steps from dec[n_dec_pre] on over the list *l (replaced). Returns
 * FERRY_ERR_FORMAT when a Replace chain grows the text past its limit, FERRY_ERR_NOMEM. */
static ferry_status decode_steps(const ferry_tokenizer *t, tk_list *l)
{
    tk_list nl;
    tk_buf run, tmp;
    memset(&nl, 0, sizeof nl);
    memset(&run, 0, sizeof run);
    memset(&tmp, 0, sizeof tmp);
    ferry_status rc = FERRY_OK;
    int finished = 0;
    size_t n_in = l->b.n, limit = growth_limit(n_in); /* the message names the input's size */
    for (int32_t k = t->n_dec_pre; k < t->n_dec && l->n > 0; k++) {
        const tk_step *st = &t->dec[k];
        nl.n = 0;
        nl.b.n = 0;
        if (st->kind == STEP_FUSE) {
            if (list_push(&nl, l->b.p, l->b.n))
                goto fail;
        } else if (st->kind == STEP_BYTEFALLBACK) {
            run.n = 0;
            for (size_t i = 0; i <= l->n; i++) {
                const char *s = i < l->n ? l->b.p + l->off[i] : NULL;
                size_t n = i < l->n ? l->off[i + 1] - l->off[i] : 0;
                int b = s ? byte_token(s, n) : -1;
                if (b >= 0) {
                    char c = (char)b;
                    if (buf_put(&run, &c, 1))
                        goto fail;
                    continue;
                }
                if (run.n > 0) {
                    if (utf8_check(run.p, run.n) == run.n) {
                        if (list_push(&nl, run.p, run.n))
                            goto fail;
                    } else {
                        for (size_t j = 0; j < run.n; j++)
                            if (list_push(&nl, tk_fffd, 3))
                                goto fail;
                    }
                    run.n = 0;
                }
                if (s && list_push(&nl, s, n))
                    goto fail;
            }
        } else {
            for (size_t i = 0; i < l->n; i++) {
                tmp.n = 0;
                int r = step_token(t, st, l->b.p + l->off[i], l->off[i + 1] - l->off[i], i == 0,
                                   &tmp, limit > nl.b.n ? limit - nl.b.n : 0);
                if (r > 0) {
                    rc = too_long(t, "decoder", k, st, n_in);
                    goto fail;
                }
                if (r < 0 || list_push(&nl, tmp.p, tmp.n))
                    goto fail;
            }
        }
        tk_list swap = *l;
        *l = nl;
        nl = swap;
    }
    finished = 1;
fail:
    if (!finished && rc == FERRY_OK) /* every other way here is out of memory */
        rc = nomem(t);
    list_free(&nl);
    free(run.p);
    free(tmp.p);
    return rc;
}

static int is_piece(const ferry_tokenizer *t, int32_t id, int skip_special)
{
    return t->tok_len[id] != TK_NONE && !(skip_special && t->special[id]);
}

ferry_status ferry_tokenizer_decode(const ferry_tokenizer *t, const int32_t *ids, int32_t n,
                                    int skip_special, char *text, size_t cap, size_t *len_out)
{
    ferry_status st = FERRY_OK;
    tk_list l;
    memset(&l, 0, sizeof l);
    if (!t || !len_out || n < 0 || (!ids && n > 0) || (!text && cap > 0))
        return ferry_fail(FERRY_ERR_INVALID, "ferry_tokenizer_decode: invalid arguments");
    for (int32_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab)
            return ferry_fail(FERRY_ERR_INVALID, "ids[%d] = %d is outside the vocab [0, %d)",
                              (int)i, (int)ids[i], (int)t->n_vocab);
    }
    for (int32_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (!is_piece(t, id, skip_special))
            continue;
        int k = l.n == 0 ? 0 : 1;
        if (l.n > 0 && !t->has_decoder && list_push(&l, " ", 1)) /* tokens.join(" ") */
            goto oom;
        if (list_push(&l, blob_at(t, t->piece_off[k][id]), t->piece_len[k][id]))
            goto oom;
    }
    if (t->dec_bytelevel && l.n > 0) { /* ByteLevel joins the bytes into one string */
        tk_buf joined;
        memset(&joined, 0, sizeof joined);
        if (lossy_append(&joined, l.b.p, l.b.n)) {
            free(joined.p);
            goto oom;
        }
        l.n = 0;
        l.b.n = 0;
        int bad = list_push(&l, joined.p, joined.n);
        free(joined.p);
        if (bad)
            goto oom;
    }
    if ((st = decode_steps(t, &l))) {
        list_free(&l);
        return st;
    }
    *len_out = l.b.n;
    if (l.b.n + 1 > cap) {
        if (cap > 0)
            text[0] = 0;
        st = ferry_fail(FERRY_ERR_INVALID, "ferry_tokenizer_decode: %zu bytes do not fit in %zu",
                        l.b.n + 1, cap);
    } else {
        if (l.b.n)
            memcpy(text, l.b.p, l.b.n);
        text[l.b.n] = 0;
    }
    list_free(&l);
    return st;
oom:
    list_free(&l);
    return nomem(t);
}

/* ---- streaming decode -------------------------------------------------------------- */

typedef struct {
    char *out;
    size_t cap, len;
} tk_emit;

static void emit_raw(tk_emit *em, const char *s, size_t n)
{
    if (em->len < em->cap && n)
        memcpy(em->out + em->len, s, em->len + n <= em->cap ? n : em->cap - em->len);
    em->len += n;
}

/* Emits text, first dropping the leading Strip characters still due. */
static void emit(const ferry_tokenizer *t, ferry_detok_stream *s, tk_emit *em, const char *p,
                 size_t n)
{
    if (s->stripping && n > 0) {
        const char *c = blob_at(t, t->strip_off);
        size_t nc = t->strip_len;
        while (s->n_stripped < t->strip_start && n >= nc && nc > 0 && memcmp(p, c, nc) == 0) {
            p += nc;
            n -= nc;
            s->n_stripped++;
        }
        if (n > 0)
            s->stripping = 0;
    }
    emit_raw(em, p, n);
}

static void emit_pending_fffd(const ferry_tokenizer *t, ferry_detok_stream *s, tk_emit *em)
{
    for (int32_t i = 0; i < s->n_pending; i++)
        emit(t, s, em, tk_fffd, 3);
    s->n_pending = 0;
}

void ferry_detok_stream_init(ferry_detok_stream *s)
{
    if (!s)
        return;
    memset(s, 0, sizeof *s);
    s->stripping = 1;
}

static ferry_status stream_finish(const ferry_detok_stream *local, ferry_detok_stream *s,
                                  const tk_emit *em, size_t *len_out)
{
    *len_out = em->len;
    if (em->len >= em->cap) /* no room for the text and its NUL */
        return ferry_fail(FERRY_ERR_INVALID, "detok stream: %zu bytes do not fit in %zu",
                          em->len + 1, em->cap);
    em->out[em->len] = 0;
    *s = *local;
    return FERRY_OK;
}

ferry_status ferry_detok_stream_push(const ferry_tokenizer *t, ferry_detok_stream *s, int32_t id,
                                     int skip_special, char *out, size_t cap, size_t *len_out)
{
    if (!t || !s || !len_out || (!out && cap > 0))
        return ferry_fail(FERRY_ERR_INVALID, "ferry_detok_stream_push: invalid arguments");
    if (id < 0 || id >= t->n_vocab)
        return ferry_fail(FERRY_ERR_INVALID, "id %d is outside the vocab [0, %d)", (int)id,
                          (int)t->n_vocab);
    ferry_detok_stream local = *s;
    tk_emit em = {out, cap, 0};
    if (local.n_pending < 0 || local.n_pending > 3)
        local.n_pending = 0;
    if (is_piece(t, id, skip_special)) {
        int k = local.n_emitted_tokens == 0 ? 0 : 1;
        const char *p = blob_at(t, t->piece_off[k][id]);
        size_t n = t->piece_len[k][id];
        if (k == 1 && !t->has_decoder)
            emit(t, &local, &em, " ", 1);
        if (local.n_emitted_tokens < INT32_MAX)
            local.n_emitted_tokens++;
        if (t->dec_bytelevel) { /* the piece is bytes: lossy UTF-8 across tokens */
            char out8[8];
            for (size_t i = 0; i < n; i++) {
                size_t m = lossy_byte(local.pending, &local.n_pending, (uint8_t)p[i], out8);
                emit(t, &local, &em, out8, m);
            }
            return stream_finish(&local, s, &em, len_out);
        }
        int b = t->stream_bytes ? byte_token(p, n) : -1;
        if (b >= 0 && local.run_bad) {
            emit(t, &local, &em, tk_fffd, 3);
        } else if (b >= 0) {
            local.pending[local.n_pending++] = (uint8_t)b;
            int r = utf8_status(local.pending, (size_t)local.n_pending);
            if (r == 1) {
                emit(t, &local, &em, (const char *)local.pending, (size_t)local.n_pending);
                local.n_pending = 0;
            } else if (r < 0) {
                /* the whole run is invalid for ByteFallback: U+FFFD per byte from here */
                emit_pending_fffd(t, &local, &em);
                local.run_bad = 1;
            }
        } else {
            emit_pending_fffd(t, &local, &em);
            local.run_bad = 0;
            emit(t, &local, &em, p, n);
        }
    }
    return stream_finish(&local, s, &em, len_out);
}

ferry_status ferry_detok_stream_flush(const ferry_tokenizer *t, ferry_detok_stream *s, char *out,
                                      size_t cap, size_t *len_out)
{
    if (!t || !s || !len_out || (!out && cap > 0))
        return ferry_fail(FERRY_ERR_INVALID, "ferry_detok_stream_flush: invalid arguments");
    ferry_detok_stream local = *s;
    tk_emit em = {out, cap, 0};
    if (local.n_pending < 0 || local.n_pending > 3)
        local.n_pending = 0;
    if (t->dec_bytelevel && local.n_pending > 0) { /* one U+FFFD for an incomplete character */
        emit(t, &local, &em, tk_fffd, 3);
        local.n_pending = 0;
    }
    emit_pending_fffd(t, &local, &em);
    local.run_bad = 0;
    return stream_finish(&local, s, &em, len_out);
}

/* ---- accessors --------------------------------------------------------------------- */

int32_t ferry_tokenizer_n_vocab(const ferry_tokenizer *t) { return t ? t->n_vocab : 0; }
int32_t ferry_tokenizer_bos_id(const ferry_tokenizer *t) { return t ? t->bos_id : -1; }
int32_t ferry_tokenizer_eos_id(const ferry_tokenizer *t) { return t ? t->eos_id : -1; }
size_t ferry_tokenizer_max_piece_bytes(const ferry_tokenizer *t) { return t ? t->max_piece : 0; }

int ferry_tokenizer_is_special(const ferry_tokenizer *t, int32_t id)
{
    return t && id >= 0 && id < t->n_vocab && t->special[id];
}

int ferry_tokenizer_adds_bos(const ferry_tokenizer *t)
{
    return t && t->bos_id >= 0 && t->prefix.n > 0 && t->prefix.p[0] == t->bos_id;
}

ferry_status ferry_tokenizer_piece(const ferry_tokenizer *t, int32_t id, const char **s,
                                   size_t *len)
{
    if (!t || !s || !len)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_tokenizer_piece: invalid arguments");
    if (id < 0 || id >= t->n_vocab || t->tok_len[id] == TK_NONE)
        return ferry_fail(FERRY_ERR_INVALID, "id %d names no token (the vocab is [0, %d))",
                          (int)id, (int)t->n_vocab);
    for (int32_t i = t->n_added - 1; i >= 0; i--) { /* the last entry of an id wins */
        if (t->added[i].id == id) {
            *s = blob_at(t, t->added[i].off);
            *len = t->added[i].len;
            return FERRY_OK;
        }
    }
    *s = blob_at(t, t->tok_off[id]);
    *len = t->tok_len[id];
    return FERRY_OK;
}

void ferry_tokenizer_free(ferry_tokenizer *t)
{
    if (!t)
        return;
    free(t->origin);
    free(t->blob.p);
    free(t->vocab.slots);
    free(t->merges.slots);
    free(t->tok_off);
    free(t->tok_len);
    free(t->special);
    for (int k = 0; k < 2; k++) {
        if (k == 0 || t->piece_off[1] != t->piece_off[0]) {
            free(t->piece_off[k]);
            free(t->piece_len[k]);
        }
    }
    free(t->added);
    free(t->raw_trie.nodes);
    free(t->norm_trie.nodes);
    free(t->norm);
    free(t->prefix.p);
    free(t->suffix.p);
    free(t->dec);
    ferry_pretok_free(t->pretok);
    free(t);
}

/* ---- loading: tokenizer.json ------------------------------------------------------ *
 *
 * {
 *   "added_tokens": [{"id": 1, "content": "<s>", "single_word": false, "lstrip": false,
 *                     "rstrip": false, "normalized": false, "special": true}, ...],
 *   "normalizer": null | {"type": "Sequence", "normalizers": [...]}
 *                 | {"type": "Prepend", "prepend": "▁"}
 *                 | {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
 *   "pre_tokenizer": null | {"type": "Metaspace", "replacement": "▁",
 *                    "prepend_scheme": "first"|"always"|"never", "split": bool}
 *                    (legacy: "add_prefix_space": bool instead of prepend_scheme),
 *   "post_processor": null | {"type": "TemplateProcessing", "single": [{"SpecialToken":
 *                     {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", ...}}], ...,
 *                     "special_tokens": {"<s>": {"id": "<s>", "ids": [1], ...}}},
 *   "decoder": null | {"type": "Sequence", "decoders": [...]} | Replace | ByteFallback
 *              | Fuse | {"type": "Strip", "content": " ", "start": 1, "stop": 0}
 *              | Metaspace,
 *   "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
 *             "continuing_subword_prefix": null, "end_of_word_suffix": null,
 *             "fuse_unk": bool, "byte_fallback": bool, "ignore_merges": bool,
 *             "vocab": {"token": id, ...}, "merges": ["a b", ...] | [["a", "b"], ...]}
 * }
 */

typedef struct {
    ferry_tokenizer *t;
    const char *o; /* origin for messages */
} tk_load;

static const cJSON *field(const cJSON *obj, const char *name)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(obj, name);
    return cJSON_IsNull(f) ? NULL : f;
}

static int flag(const cJSON *obj, const char *name, int dflt)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(obj, name);
    return cJSON_IsBool(f) ? cJSON_IsTrue(f) : dflt;
}

/* A non-negative integer id <= TK_MAX_ID, or -1. */
static int32_t json_id(const cJSON *v)
{
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0) || v->valuedouble > TK_MAX_ID)
        return -1;
    int32_t id = (int32_t)v->valuedouble;
    return (double)id == v->valuedouble ? id : -1;
}

/* A string field with exactly one character (Metaspace replacement, Strip content). */
static ferry_status one_char(tk_load *L, const cJSON *obj, const char *name, const char *where,
                             const char *dflt, uint32_t *off, uint32_t *len)
{
    const cJSON *f = field(obj, name);
    const char *s = dflt;
    if (f && !cJSON_IsString(f))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: %s.%s is not a string", L->o, where, name);
    if (f)
        s = f->valuestring;
    if (!s)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: %s.%s is missing", L->o, where, name);
    size_t n = strlen(s);
    if (n == 0 || utf8_len((uint8_t)s[0]) != n)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: %s.%s '%.*s' is not one character", L->o, where,
                          name, (int)(n < TK_SHOW ? n : TK_SHOW), s);
    *len = (uint32_t)n;
    return blob_add(L->t, s, n, off) ? nomem(L->t) : FERRY_OK;
}

/* Replace's {"String": "x"} pattern and content. */
static ferry_status parse_replace(tk_load *L, const cJSON *obj, const char *where, tk_step *st)
{
    const cJSON *pat = field(obj, "pattern");
    const cJSON *str = pat ? field(pat, "String") : NULL;
    const cJSON *content = field(obj, "content");
    if (pat && field(pat, "Regex"))
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: %s: Replace with a Regex pattern", L->o,
                          where);
    if (!cJSON_IsString(str) || !str->valuestring[0])
        return ferry_fail(FERRY_ERR_FORMAT, "%s: %s.pattern is not {\"String\": non-empty}",
                          L->o, where);
    if (!cJSON_IsString(content))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: %s.content is not a string", L->o, where);
    st->kind = STEP_REPLACE;
    st->a_len = (uint32_t)strlen(str->valuestring);
    st->b_len = (uint32_t)strlen(content->valuestring);
    if (blob_add(L->t, str->valuestring, st->a_len, &st->a_off) ||
        blob_add(L->t, content->valuestring, st->b_len, &st->b_off))
        return nomem(L->t);
    return FERRY_OK;
}

static const char *type_of(const cJSON *obj)
{
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(obj, "type");
    return cJSON_IsString(ty) ? ty->valuestring : NULL;
}

static ferry_status push_step(tk_load *L, tk_step **steps, int32_t *n, tk_step st)
{
    tk_step *p = realloc(*steps, (size_t)(*n + 1) * sizeof *p);
    if (!p)
        return nomem(L->t);
    p[(*n)++] = st;
    *steps = p;
    return FERRY_OK;
}

static ferry_status parse_normalizer(tk_load *L, const cJSON *obj, int depth)
{
    const char *ty = type_of(obj);
    tk_step st;
    memset(&st, 0, sizeof st);
    if (!cJSON_IsObject(obj) || !ty)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: normalizer has no type", L->o);
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *list = field(obj, "normalizers"), *it;
        if (!cJSON_IsArray(list) || depth > 16)
            return ferry_fail(FERRY_ERR_FORMAT, "%s: normalizer Sequence has no normalizers list",
                              L->o);
        cJSON_ArrayForEach(it, list)
        {
            ferry_status s = parse_normalizer(L, it, depth + 1);
            if (s)
                return s;
        }
        return FERRY_OK;
    }
    if (strcmp(ty, "Prepend") == 0) {
        const cJSON *p = field(obj, "prepend");
        if (!cJSON_IsString(p))
            return ferry_fail(FERRY_ERR_FORMAT, "%s: normalizer Prepend.prepend is not a string",
                              L->o);
        st.kind = STEP_PREPEND;
        st.a_len = (uint32_t)strlen(p->valuestring);
        if (blob_add(L->t, p->valuestring, st.a_len, &st.a_off))
            return nomem(L->t);
    } else if (strcmp(ty, "Replace") == 0) {
        ferry_status s = parse_replace(L, obj, "normalizer Replace", &st);
        if (s)
            return s;
    } else if (strcmp(ty, "NFC") == 0) {
        st.kind = STEP_NFC;
    } else {
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: normalizer '%s' is not supported", L->o,
                          ty);
    }
    return push_step(L, &L->t->norm, &L->t->n_norm, st);
}

static ferry_status parse_metaspace(tk_load *L, const cJSON *obj, const char *where,
                                    uint32_t *off, uint32_t *len, int *scheme, int *split)
{
    ferry_status s = one_char(L, obj, "replacement", where, NULL, off, len);
    if (s)
        return s;
    const cJSON *ps = field(obj, "prepend_scheme");
    *scheme = flag(obj, "add_prefix_space", 1) ? SCHEME_ALWAYS : SCHEME_NEVER;
    if (ps) {
        const char *v = cJSON_IsString(ps) ? ps->valuestring : "";
        if (strcmp(v, "always") == 0)
            *scheme = SCHEME_ALWAYS;
        else if (strcmp(v, "first") == 0)
            *scheme = SCHEME_FIRST;
        else if (strcmp(v, "never") == 0)
            *scheme = SCHEME_NEVER;
        else
            return ferry_fail(FERRY_ERR_FORMAT, "%s: %s.prepend_scheme '%s' is not "
                              "first, always or never", L->o, where, v);
    }
    *split = flag(obj, "split", 1);
    return FERRY_OK;
}

static ferry_status parse_pre_tokenizer(tk_load *L, const cJSON *obj)
{
    const char *ty = type_of(obj);
    if (!cJSON_IsObject(obj) || !ty)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: pre_tokenizer has no type", L->o);
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *list = field(obj, "pretokenizers");
        int n = cJSON_IsArray(list) ? cJSON_GetArraySize(list) : -1;
        if (n < 0)
            return ferry_fail(FERRY_ERR_FORMAT, "%s: pre_tokenizer Sequence has no "
                              "pretokenizers list", L->o);
        if (n == 0)
            return FERRY_OK;
        const char *only = n == 1 ? type_of(cJSON_GetArrayItem(list, 0)) : NULL;
        if (only && strcmp(only, "Metaspace") == 0)
            return parse_pre_tokenizer(L, cJSON_GetArrayItem(list, 0));
    }
    if (strcmp(ty, "Metaspace") != 0) /* Split and ByteLevel steps */
        return ferry_pretok_parse(obj, L->o, &L->t->pretok);
    L->t->metaspace = 1;
    return parse_metaspace(L, obj, "pre_tokenizer Metaspace", &L->t->ms_off, &L->t->ms_len,
                           &L->t->ms_scheme, &L->t->ms_split);
}

static ferry_status parse_decoder(tk_load *L, const cJSON *obj, int depth)
{
    const char *ty = type_of(obj);
    tk_step st;
    memset(&st, 0, sizeof st);
    if (!cJSON_IsObject(obj) || !ty)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: decoder has no type", L->o);
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *list = field(obj, "decoders"), *it;
        if (!cJSON_IsArray(list) || depth > 16)
            return ferry_fail(FERRY_ERR_FORMAT, "%s: decoder Sequence has no decoders list", L->o);
        cJSON_ArrayForEach(it, list)
        {
            ferry_status s = parse_decoder(L, it, depth + 1);
            if (s)
                return s;
        }
        return FERRY_OK;
    }
    if (strcmp(ty, "Replace") == 0) {
        ferry_status s = parse_replace(L, obj, "decoder Replace", &st);
        if (s)
            return s;
    } else if (strcmp(ty, "ByteFallback") == 0) {
        st.kind = STEP_BYTEFALLBACK;
    } else if (strcmp(ty, "ByteLevel") == 0) { /* its flags only matter to offsets */
        st.kind = STEP_BYTELEVEL;
    } else if (strcmp(ty, "Fuse") == 0) {
        st.kind = STEP_FUSE;
    } else if (strcmp(ty, "Strip") == 0) {
        ferry_status s = one_char(L, obj, "content", "decoder Strip", " ", &st.a_off, &st.a_len);
        if (s)
            return s;
        const cJSON *a = field(obj, "start"), *b = field(obj, "stop");
        st.kind = STEP_STRIP;
        st.start = a ? json_id(a) : 0;
        st.stop = b ? json_id(b) : 0;
        if (st.start < 0 || st.stop < 0)
            return ferry_fail(FERRY_ERR_FORMAT, "%s: decoder Strip start/stop are not "
                              "non-negative integers", L->o);
    } else if (strcmp(ty, "Metaspace") == 0) {
        int scheme, split;
        ferry_status s = parse_metaspace(L, obj, "decoder Metaspace", &st.a_off, &st.a_len,
                                         &scheme, &split);
        if (s)
            return s;
        st.kind = STEP_METASPACE;
        st.never = scheme == SCHEME_NEVER;
    } else {
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: decoder '%s' is not supported", L->o, ty);
    }
    return push_step(L, &L->t->dec, &L->t->n_dec, st);
}

/* The id of a token string: added tokens first, then the model vocab (token_to_id). */
static int32_t token_id(const ferry_tokenizer *t, const char *s, size_t n)
{
    for (int32_t i = 0; i < t->n_added; i++) {
        if (t->added[i].len == n && memcmp(blob_at(t, t->added[i].off), s, n) == 0)
            return t->added[i].id;
    }
    return smap_get(&t->vocab, t->blob.p, s, n);
}

typedef struct {
    uint32_t off, len;
    int32_t id;
} tk_entry;

static ferry_status parse_vocab(tk_load *L, const cJSON *vocab, tk_entry **out, size_t *n_out)
{
    ferry_tokenizer *t = L->t;
    if (!cJSON_IsObject(vocab))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: model.vocab is %s", L->o,
                          vocab ? "not an object" : "missing");
    size_t n = (size_t)cJSON_GetArraySize(vocab), i = 0;
    tk_entry *ents = calloc(n ? n : 1, sizeof *ents);
    if (!ents || smap_init(&t->vocab, n)) {
        free(ents);
        return nomem(t);
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, vocab)
    {
        const char *key = it->string ? it->string : "";
        size_t klen = strlen(key);
        int32_t id = json_id(it);
        if (id < 0) {
            free(ents);
            return ferry_fail(FERRY_ERR_FORMAT, "%s: model.vocab: token '%.*s' has id %s, not an "
                              "integer in [0, %d]", L->o, (int)(klen < TK_SHOW ? klen : TK_SHOW),
                              key, cJSON_IsNumber(it) ? "out of range" : "that is not a number",
                              TK_MAX_ID);
        }
        if (blob_add(t, key, klen, &ents[i].off)) {
            free(ents);
            return nomem(t);
        }
        ents[i].len = (uint32_t)klen;
        ents[i].id = id;
        if (smap_put(&t->vocab, t->blob.p, ents[i].off, ents[i].len, id) >= 0) {
            free(ents);
            return ferry_fail(FERRY_ERR_FORMAT, "%s: model.vocab: token '%.*s' appears twice",
                              L->o, (int)(klen < TK_SHOW ? klen : TK_SHOW), key);
        }
        i++;
    }
    *out = ents;
    *n_out = n;
    return FERRY_OK;
}

static ferry_status parse_merges(tk_load *L, const cJSON *merges)
{
    ferry_tokenizer *t = L->t;
    tk_buf cat;
    memset(&cat, 0, sizeof cat);
    if (merges && !cJSON_IsArray(merges))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: model.merges is not an array", L->o);
    size_t n = merges ? (size_t)cJSON_GetArraySize(merges) : 0;
    if (pmap_init(&t->merges, n))
        return nomem(t);
    const cJSON *it;
    int32_t rank = 0;
    ferry_status st = FERRY_OK;
    cJSON_ArrayForEach(it, merges)
    {
        const char *a = NULL, *b = NULL;
        size_t na = 0, nb = 0;
        if (cJSON_IsString(it)) {
            /* legacy "a b": exactly one space (tokens with spaces need the array form) */
            const char *s = it->valuestring, *sp = strchr(s, ' ');
            if (sp && !strchr(sp + 1, ' ')) {
                a = s;
                na = (size_t)(sp - s);
                b = sp + 1;
                nb = strlen(b);
            }
        } else if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 &&
                   cJSON_IsString(cJSON_GetArrayItem(it, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(it, 1))) {
            a = cJSON_GetArrayItem(it, 0)->valuestring;
            b = cJSON_GetArrayItem(it, 1)->valuestring;
            na = strlen(a);
            nb = strlen(b);
        }
        if (!a) {
            char *shown = cJSON_PrintUnformatted(it);
            st = ferry_fail(FERRY_ERR_FORMAT, "%s: model.merges[%d] %.*s is not \"a b\" or "
                            "[\"a\", \"b\"]", L->o, (int)rank, TK_SHOW, shown ? shown : "");
            free(shown);
            goto fail;
        }
        int32_t ia = smap_get(&t->vocab, t->blob.p, a, na);
        int32_t ib = smap_get(&t->vocab, t->blob.p, b, nb);
        cat.n = 0;
        if (buf_put(&cat, a, na) || buf_put(&cat, b, nb)) {
            st = nomem(t);
            goto fail;
        }
        int32_t ic = smap_get(&t->vocab, t->blob.p, cat.p, cat.n);
        if (ia < 0 || ib < 0 || ic < 0) {
            const char *miss = ia < 0 ? a : ib < 0 ? b : cat.p;
            size_t nm = ia < 0 ? na : ib < 0 ? nb : cat.n;
            st = ferry_fail(FERRY_ERR_FORMAT, "%s: model.merges[%d] ('%.*s' '%.*s'): '%.*s' is "
                            "not in the vocab", L->o, (int)rank, (int)(na < TK_SHOW ? na : TK_SHOW),
                            a, (int)(nb < TK_SHOW ? nb : TK_SHOW), b,
                            (int)(nm < TK_SHOW ? nm : TK_SHOW), miss);
            goto fail;
        }
        pmap_put(&t->merges, ia, ib, rank, ic);
        rank++;
    }
fail:
    free(cat.p);
    return st;
}

static ferry_status parse_model(tk_load *L, const cJSON *model, tk_entry **ents, size_t *n_ents)
{
    ferry_tokenizer *t = L->t;
    if (!cJSON_IsObject(model))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: \"model\" is %s", L->o,
                          model ? "not an object" : "missing");
    const char *ty = type_of(model);
    if (!ty && !field(model, "merges"))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: model.type is missing", L->o);
    if (ty && strcmp(ty, "BPE") != 0) {
        int known = strcmp(ty, "Unigram") == 0 || strcmp(ty, "WordPiece") == 0 ||
                    strcmp(ty, "WordLevel") == 0;
        return ferry_fail(known ? FERRY_ERR_UNSUPPORTED : FERRY_ERR_FORMAT,
                          "%s: model.type '%s' is %s", L->o, ty,
                          known ? "not supported (only BPE)" : "unknown (expected BPE)");
    }
    const cJSON *drop = field(model, "dropout");
    if (drop && !(cJSON_IsNumber(drop) && drop->valuedouble == 0))
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: model.dropout is not supported", L->o);
    static const char *affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int k = 0; k < 2; k++) {
        const cJSON *f = field(model, affixes[k]);
        if (f && !(cJSON_IsString(f) && f->valuestring[0] == 0))
            return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: model.%s is not supported", L->o,
                              affixes[k]);
    }
    t->fuse_unk = flag(model, "fuse_unk", 0);
    t->byte_fallback = flag(model, "byte_fallback", 0);
    t->ignore_merges = flag(model, "ignore_merges", 0);
    ferry_status st = parse_vocab(L, field(model, "vocab"), ents, n_ents);
    if (st)
        return st;
    const cJSON *unk = field(model, "unk_token");
    t->unk_id = -1;
    if (unk) {
        if (!cJSON_IsString(unk))
            return ferry_fail(FERRY_ERR_FORMAT, "%s: model.unk_token is not a string", L->o);
        t->has_unk = 1;
        t->unk_len = (uint32_t)strlen(unk->valuestring);
        if (blob_add(t, unk->valuestring, t->unk_len, &t->unk_off))
            return nomem(t);
        t->unk_id = smap_get(&t->vocab, t->blob.p, unk->valuestring, t->unk_len);
    }
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_id[b] = smap_get(&t->vocab, t->blob.p, name, 6);
    }
    return parse_merges(L, field(model, "merges"));
}

static ferry_status parse_added(tk_load *L, const cJSON *list)
{
    ferry_tokenizer *t = L->t;
    if (!list)
        return FERRY_OK;
    if (!cJSON_IsArray(list))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: added_tokens is not an array", L->o);
    int n = cJSON_GetArraySize(list), i = 0;
    t->added = calloc(n ? (size_t)n : 1, sizeof *t->added);
    if (!t->added)
        return nomem(t);
    const cJSON *it;
    cJSON_ArrayForEach(it, list)
    {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(it, "id");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(it, "content");
        tk_added *a = &t->added[i];
        if (!cJSON_IsObject(it) || !id || !content)
            return ferry_fail(FERRY_ERR_FORMAT, "%s: added_tokens[%d] has no %s", L->o, i,
                              !cJSON_IsObject(it) ? "object" : !id ? "\"id\"" : "\"content\"");
        if (!cJSON_IsString(content))
            return ferry_fail(FERRY_ERR_FORMAT, "%s: added_tokens[%d].content is not a string",
                              L->o, i);
        a->id = json_id(id);
        a->len = (uint32_t)strlen(content->valuestring);
        if (a->id < 0)
            return ferry_fail(FERRY_ERR_FORMAT, "%s: added_tokens[%d] ('%.*s'): id is not an "
                              "integer in [0, %d]", L->o, i,
                              (int)(a->len < TK_SHOW ? a->len : TK_SHOW), content->valuestring,
                              TK_MAX_ID);
        if (blob_add(t, content->valuestring, a->len, &a->off))
            return nomem(t);
        a->single_word = (uint8_t)flag(it, "single_word", 0);
        a->lstrip = (uint8_t)flag(it, "lstrip", 0);
        a->rstrip = (uint8_t)flag(it, "rstrip", 0);
        a->normalized = (uint8_t)flag(it, "normalized", 1);
        a->special = (uint8_t)flag(it, "special", 0);
        t->n_added = ++i;
    }
    return FERRY_OK;
}

/* Builds the tries; a normalized token's pattern is its content normalized (so "def" under
 * Prepend("▁") matches "▁def"). Special tokens go first: they win a tie on the pattern. */
static ferry_status build_tries(ferry_tokenizer *t)
{
    tk_buf cur, tmp;
    memset(&cur, 0, sizeof cur);
    memset(&tmp, 0, sizeof tmp);
    ferry_status st = FERRY_OK;
    for (int i = 0; i < 256; i++)
        t->raw_trie.root[i] = t->norm_trie.root[i] = -1;
    for (int pass = 0; pass < 2; pass++) {
        for (int32_t i = 0; i < t->n_added; i++) {
            tk_added *a = &t->added[i];
            if (a->special != (pass == 0))
                continue;
            a->pat_off = a->off;
            a->pat_len = a->len;
            if (a->normalized) {
                /* the blob may move while normalizing: copy the content first */
                tmp.n = 0;
                if (buf_put(&tmp, blob_at(t, a->off), a->len) ||
                    normalize(t, tmp.p, tmp.n, &cur, &tmp) ||
                    blob_add(t, cur.p, cur.n, &a->pat_off)) {
                    st = nomem(t);
                    goto fail;
                }
                a->pat_len = (uint32_t)cur.n;
            }
            if (trie_insert(a->normalized ? &t->norm_trie : &t->raw_trie, blob_at(t, a->pat_off),
                            a->pat_len, i)) {
                st = nomem(t);
                goto fail;
            }
        }
    }
fail:
    free(cur.p);
    free(tmp.p);
    return st;
}

/* Fills the id -> token table (added tokens over the model vocab) and the special flags. */
static ferry_status build_id_table(tk_load *L, const tk_entry *ents, size_t n_ents)
{
    ferry_tokenizer *t = L->t;
    int32_t max_id = -1;
    for (size_t i = 0; i < n_ents; i++)
        max_id = ents[i].id > max_id ? ents[i].id : max_id;
    for (int32_t i = 0; i < t->n_added; i++)
        max_id = t->added[i].id > max_id ? t->added[i].id : max_id;
    t->n_vocab = max_id + 1;
    size_t n = t->n_vocab ? (size_t)t->n_vocab : 1;
    t->tok_off = malloc(n * sizeof *t->tok_off);
    t->tok_len = malloc(n * sizeof *t->tok_len);
    t->special = calloc(n, 1);
    if (!t->tok_off || !t->tok_len || !t->special)
        return nomem(t);
    for (size_t i = 0; i < n; i++)
        t->tok_len[i] = TK_NONE;
    for (size_t i = 0; i < n_ents; i++) {
        int32_t id = ents[i].id;
        if (t->tok_len[id] != TK_NONE) {
            uint32_t l0 = t->tok_len[id], l1 = ents[i].len;
            return ferry_fail(FERRY_ERR_FORMAT, "%s: model.vocab: tokens '%.*s' and '%.*s' both "
                              "have id %d", L->o, (int)(l0 < TK_SHOW ? l0 : TK_SHOW),
                              blob_at(t, t->tok_off[id]), (int)(l1 < TK_SHOW ? l1 : TK_SHOW),
                              blob_at(t, ents[i].off), (int)id);
        }
        t->tok_off[id] = ents[i].off;
        t->tok_len[id] = ents[i].len;
    }
    /* tokenizers (0.22 on) decodes a normalized added token as its normalized form */
    for (int32_t i = 0; i < t->n_added; i++) {
        t->tok_off[t->added[i].id] = t->added[i].pat_off;
        t->tok_len[t->added[i].id] = t->added[i].pat_len;
    }
    /* skip_special drops an id when its decode string is the content of a special added
     * token (is_special_token), so a special normalized token is never dropped */
    tk_smap set;
    if (smap_init(&set, (size_t)t->n_added))
        return nomem(t);
    for (int32_t i = 0; i < t->n_added; i++) {
        if (t->added[i].special)
            smap_put(&set, t->blob.p, t->added[i].off, t->added[i].len, 0);
    }
    for (size_t id = 0; id < (size_t)t->n_vocab; id++) {
        if (t->tok_len[id] != TK_NONE)
            t->special[id] = smap_get(&set, t->blob.p, blob_at(t, t->tok_off[id]),
                                      t->tok_len[id]) >= 0;
    }
    free(set.slots);
    return FERRY_OK;
}

static ferry_status parse_template(tk_load *L, const cJSON *pp)
{
    ferry_tokenizer *t = L->t;
    const cJSON *single = field(pp, "single"), *specials = field(pp, "special_tokens"), *it;
    int seen_a = 0, i = 0;
    if (!cJSON_IsArray(single))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: post_processor.single is not an array", L->o);
    cJSON_ArrayForEach(it, single)
    {
        const cJSON *sp = field(it, "SpecialToken"), *sq = field(it, "Sequence");
        const cJSON *name = sp ? field(sp, "id") : sq ? field(sq, "id") : NULL;
        if (!cJSON_IsString(name))
            return ferry_fail(FERRY_ERR_FORMAT, "%s: post_processor.single[%d] is not "
                              "{\"SpecialToken\"|\"Sequence\": {\"id\": ...}}", L->o, i);
        if (sq) {
            if (strcmp(name->valuestring, "A") != 0 || seen_a)
                return ferry_fail(FERRY_ERR_FORMAT, "%s: post_processor.single[%d]: sequence "
                                  "'%s' (single takes $A once)", L->o, i, name->valuestring);
            seen_a = 1;
        } else {
            const cJSON *entry = specials ? field(specials, name->valuestring) : NULL;
            const cJSON *ids = entry ? field(entry, "ids") : NULL, *v;
            if (!cJSON_IsArray(ids))
                return ferry_fail(FERRY_ERR_FORMAT, "%s: post_processor: special token '%s' has "
                                  "no ids in special_tokens", L->o, name->valuestring);
            cJSON_ArrayForEach(v, ids)
            {
                int32_t id = json_id(v);
                if (id < 0 || id >= t->n_vocab)
                    return ferry_fail(FERRY_ERR_FORMAT, "%s: post_processor: special token '%s' "
                                      "has an id outside the vocab [0, %d)", L->o,
                                      name->valuestring, (int)t->n_vocab);
                if (ivec_push(seen_a ? &t->suffix : &t->prefix, id))
                    return nomem(t);
            }
        }
        i++;
    }
    if (!seen_a)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: post_processor.single has no $A", L->o);
    return FERRY_OK;
}

/* Returns 1 if a template was found (Sequence entries other than it must be ByteLevel,
 * which only trims offsets), 0 if the processor adds nothing. */
static ferry_status parse_post_processor(tk_load *L, const cJSON *pp, int *found)
{
    const char *ty = type_of(pp);
    if (!cJSON_IsObject(pp) || !ty)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: post_processor has no type", L->o);
    if (strcmp(ty, "TemplateProcessing") == 0) {
        if (*found)
            return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: two TemplateProcessing post-processors",
                              L->o);
        *found = 1;
        return parse_template(L, pp);
    }
    if (strcmp(ty, "ByteLevel") == 0)
        return FERRY_OK;
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *list = field(pp, "processors"), *it;
        if (!cJSON_IsArray(list))
            return ferry_fail(FERRY_ERR_FORMAT, "%s: post_processor Sequence has no processors",
                              L->o);
        cJSON_ArrayForEach(it, list)
        {
            if (type_of(it) && strcmp(type_of(it), "Sequence") == 0)
                return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: nested post_processor Sequence",
                                  L->o);
            ferry_status st = parse_post_processor(L, it, found);
            if (st)
                return st;
        }
        return FERRY_OK;
    }
    return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: post_processor '%s' is not supported", L->o, ty);
}

/* bos_token/eos_token of tokenizer_config.json: a string or {"content": ...}; NULL if none. */
static const char *config_token(const cJSON *cfg, const char *name)
{
    const cJSON *f = field(cfg, name);
    if (cJSON_IsObject(f))
        f = field(f, "content");
    return cJSON_IsString(f) ? f->valuestring : NULL;
}

/* Without a post-processor, transformers' Llama tokenizers add bos/eos per
 * tokenizer_config.json (add_bos_token defaults to true for them, add_eos_token to false). */
static ferry_status apply_config(tk_load *L, const cJSON *cfg, const char *cfg_origin,
                                 int have_template)
{
    ferry_tokenizer *t = L->t;
    const char *bos = cfg ? config_token(cfg, "bos_token") : NULL;
    const char *eos = cfg ? config_token(cfg, "eos_token") : NULL;
    int32_t bos_id = bos ? token_id(t, bos, strlen(bos)) : -1;
    int32_t eos_id = eos ? token_id(t, eos, strlen(eos)) : -1;
    if (cfg && !have_template) {
        const cJSON *cls = field(cfg, "tokenizer_class");
        int llama = cJSON_IsString(cls) && strstr(cls->valuestring, "Llama") != NULL;
        int add_bos = flag(cfg, "add_bos_token", llama);
        int add_eos = flag(cfg, "add_eos_token", 0);
        if ((add_bos && bos_id < 0) || (add_eos && eos_id < 0)) {
            const char *which = add_bos && bos_id < 0 ? "bos" : "eos";
            const char *tok = add_bos && bos_id < 0 ? bos : eos;
            if (!tok)
                return ferry_fail(FERRY_ERR_FORMAT, "%s: add_%s_token is true but there is no "
                                  "%s_token", cfg_origin, which, which);
            return ferry_fail(FERRY_ERR_FORMAT, "%s: add_%s_token is true but %s_token '%.*s' is "
                              "not a token", cfg_origin, which, which, TK_SHOW, tok);
        }
        if ((add_bos && ivec_push(&t->prefix, bos_id)) ||
            (add_eos && ivec_push(&t->suffix, eos_id)))
            return nomem(t);
    }
    t->bos_id = bos_id >= 0 ? bos_id : t->prefix.n ? t->prefix.p[0] : token_id(t, "<s>", 3);
    t->eos_id = eos_id >= 0 ? eos_id
                : t->suffix.n ? t->suffix.p[t->suffix.n - 1] : token_id(t, "</s>", 4);
    return FERRY_OK;
}

/* Splits the decoder chain into per-token steps and the rest, computes every id's piece
 * and what the stream can follow exactly. */
static ferry_status build_pieces(ferry_tokenizer *t)
{
    tk_buf a, b;
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    ferry_status st = FERRY_OK;
    int metaspace = 0;
    t->n_dec_pre = 0;
    while (t->n_dec_pre < t->n_dec && t->dec[t->n_dec_pre].kind != STEP_BYTEFALLBACK &&
           t->dec[t->n_dec_pre].kind != STEP_FUSE) {
        metaspace |= t->dec[t->n_dec_pre].kind == STEP_METASPACE;
        if (t->dec[t->n_dec_pre++].kind == STEP_BYTELEVEL) {
            t->dec_bytelevel = 1;
            break;
        }
    }
    for (int32_t j = t->n_dec_pre; j < t->n_dec; j++) {
        if (t->dec[j].kind == STEP_BYTELEVEL)
            return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: decoder ByteLevel after ByteFallback, "
                              "Fuse or another ByteLevel is not supported", t->origin);
    }
    int32_t k = t->n_dec_pre;
    if (k < t->n_dec && t->dec[k].kind == STEP_BYTEFALLBACK) {
        t->stream_bytes = 1;
        k++;
    }
    if (k < t->n_dec && t->dec[k].kind == STEP_FUSE) {
        k++;
        if (k < t->n_dec && t->dec[k].kind == STEP_STRIP && t->dec[k].stop == 0) {
            t->strip_start = t->dec[k].start;
            t->strip_off = t->dec[k].a_off;
            t->strip_len = t->dec[k].a_len;
        }
    }
    size_t n = (size_t)t->n_vocab;
    for (int f = 0; f < 2; f++) {
        if (f == 1 && !metaspace) {
            t->piece_off[1] = t->piece_off[0];
            t->piece_len[1] = t->piece_len[0];
            break;
        }
        t->piece_off[f] = calloc(n ? n : 1, sizeof *t->piece_off[f]);
        t->piece_len[f] = calloc(n ? n : 1, sizeof *t->piece_len[f]);
        if (!t->piece_off[f] || !t->piece_len[f])
            return nomem(t);
    }
    size_t max_piece = 0;
    for (size_t id = 0; id < n; id++) {
        if (t->tok_len[id] == TK_NONE)
            continue;
        for (int f = 0; f < (metaspace ? 2 : 1); f++) {
            a.n = 0;
            if (buf_put(&a, blob_at(t, t->tok_off[id]), t->tok_len[id])) {
                st = nomem(t);
                goto fail;
            }
            size_t limit = growth_limit(t->tok_len[id]);
            for (int32_t s = 0; s < t->n_dec_pre; s++) {
                b.n = 0;
                int r = step_token(t, &t->dec[s], a.p, a.n, f == 0, &b, limit);
                if (r) {
                    st = r < 0 ? nomem(t) : too_long(t, "decoder", s, &t->dec[s], t->tok_len[id]);
                    goto fail;
                }
                tk_buf swap = a;
                a = b;
                b = swap;
            }
            if (blob_add(t, a.p, a.n, &t->piece_off[f][id])) {
                st = nomem(t);
                goto fail;
            }
            t->piece_len[f][id] = (uint32_t)a.n;
            max_piece = a.n > max_piece ? a.n : max_piece;
        }
    }
    /* a separator, U+FFFD for 3 pending bytes + 1, then the piece; ByteLevel: U+FFFD for
     * the pending bytes, then at most U+FFFD (3 bytes) per byte of the piece */
    t->max_piece = t->dec_bytelevel ? 3 * (max_piece + 3) + 1 : max_piece + 1 + 4 * 3;
fail:
    free(a.p);
    free(b.p);
    return st;
}

static cJSON *parse_json(const char *s, size_t n, const char *origin, ferry_status *st)
{
    const char *end = NULL;
    size_t bad = utf8_check(s, n);
    if (bad < n) { /* so that every string cJSON hands back is valid UTF-8 */
        *st = ferry_fail(FERRY_ERR_FORMAT, "%s: not valid UTF-8 at byte %zu", origin, bad);
        return NULL;
    }
    cJSON *root = n ? cJSON_ParseWithLengthOpts(s, n, &end, 0) : NULL;
    if (!root) {
        size_t at = end && end >= s && end <= s + n ? (size_t)(end - s) : 0;
        *st = ferry_fail(FERRY_ERR_FORMAT, "%s: invalid JSON near byte %zu", origin, at);
        return NULL;
    }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        *st = ferry_fail(FERRY_ERR_FORMAT, "%s: the top level is not a JSON object", origin);
        return NULL;
    }
    return root;
}

static ferry_status load_impl(const char *tok_json, size_t tok_len, const char *config_json,
                              size_t config_len, const char *origin, const char *cfg_origin,
                              ferry_tokenizer **out)
{
    ferry_status st = FERRY_OK;
    cJSON *root = NULL, *cfg = NULL;
    tk_entry *ents = NULL;
    size_t n_ents = 0;
    ferry_tokenizer *t = calloc(1, sizeof *t);
    if (!t)
        return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", origin);
    tk_load L = {t, origin};
    t->origin = strdup(origin);
    if (!t->origin || buf_reserve(&t->blob, 1)) {
        st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", origin);
        goto fail;
    }
    root = parse_json(tok_json, tok_len, origin, &st);
    if (!root)
        goto fail;
    if (config_json) {
        cfg = parse_json(config_json, config_len, cfg_origin, &st);
        if (!cfg)
            goto fail;
    }
    const cJSON *norm = field(root, "normalizer"), *pre = field(root, "pre_tokenizer");
    const cJSON *post = field(root, "post_processor"), *dec = field(root, "decoder");
    if ((st = parse_model(&L, field(root, "model"), &ents, &n_ents)) ||
        (st = parse_added(&L, field(root, "added_tokens"))))
        goto fail;
    if (norm && (st = parse_normalizer(&L, norm, 0)))
        goto fail;
    if ((st = build_tries(t)) || (st = build_id_table(&L, ents, n_ents)))
        goto fail;
    if (pre && (st = parse_pre_tokenizer(&L, pre)))
        goto fail;
    if (t->pretok && ferry_pretok_bytes_out(t->pretok)) {
        /* BPE can start from the bytes when each byte's character is a token */
        t->bytes_direct = 1;
        for (int b = 0; b < 256; b++) {
            char ch[2];
            size_t k = ferry_bytelevel_char((uint8_t)b, ch);
            t->byte_sym[b] = smap_get(&t->vocab, t->blob.p, ch, k);
            t->bytes_direct &= t->byte_sym[b] >= 0;
        }
    }
    int have_template = 0;
    if (post && (st = parse_post_processor(&L, post, &have_template)))
        goto fail;
    /* a post-processor without a template (none, or ByteLevel, which adds nothing) defers to
     * tokenizer_config.json, as transformers' Llama/GPT-NeoX tokenizers rebuild theirs from
     * add_bos_token (DeepSeek-V3: ByteLevel post-processor, add_bos_token true) */
    if ((st = apply_config(&L, cfg, cfg_origin, have_template)))
        goto fail;
    t->has_decoder = dec != NULL;
    if (dec && (st = parse_decoder(&L, dec, 0)))
        goto fail;
    if ((st = build_pieces(t)))
        goto fail;
    *out = t;
    t = NULL;
fail:
    free(ents);
    cJSON_Delete(root);
    cJSON_Delete(cfg);
    ferry_tokenizer_free(t);
    return st;
}

ferry_status ferry_tokenizer_load_json(const char *tok_json, size_t tok_len,
                                       const char *config_json, size_t config_len,
                                       const char *origin, ferry_tokenizer **out)
{
    if (!tok_json || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_tokenizer_load_json: invalid arguments");
    char cfg_origin[512];
    origin = origin ? origin : "tokenizer.json";
    snprintf(cfg_origin, sizeof cfg_origin, "%s (tokenizer_config.json)", origin);
    return load_impl(tok_json, tok_len, config_json, config_len, origin, cfg_origin, out);
}

/* The largest tokenizer.json or tokenizer_config.json read: real ones are tens of MB. */
#define TK_MAX_FILE (1ull << 30)

ferry_status ferry_tokenizer_load(const char *dir, ferry_tokenizer **out)
{
    if (!dir || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_tokenizer_load: invalid arguments");
    char tok_path[4096], cfg_path[4096];
    char *tok = NULL, *cfg = NULL;
    size_t tok_len = 0, cfg_len = 0;
    if (snprintf(tok_path, sizeof tok_path, "%s/tokenizer.json", dir) >= (int)sizeof tok_path ||
        snprintf(cfg_path, sizeof cfg_path, "%s/tokenizer_config.json", dir) >=
            (int)sizeof cfg_path)
        return ferry_fail(FERRY_ERR_INVALID, "%s: path too long", dir);
    ferry_status st = ferry_read_small_file(tok_path, TK_MAX_FILE, 0, &tok, &tok_len);
    if (st)
        goto fail;
    st = ferry_read_small_file(cfg_path, TK_MAX_FILE, 1, &cfg, &cfg_len);
    if (st)
        goto fail;
    st = load_impl(tok, tok_len, cfg, cfg_len, tok_path, cfg_path, out);
fail:
    free(tok);
    free(cfg);
    return st;
}
