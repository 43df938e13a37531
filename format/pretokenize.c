/*
 * format/pretokenize.c: Split and ByteLevel pre-tokenizers, as tokenizers 0.22 runs them.
 *
 * A piece list goes through the steps in order; each step replaces every piece by the pieces
 * it splits it into and drops the empty ones (PreTokenizedString::split):
 *   Split      the pattern's matches over the piece (onig's find_iter: an empty match right
 *              after the previous match is skipped by one character), as (span, is_match)
 *              covering it; then the behavior: Isolated keeps every span, Removed drops the
 *              matches, MergedWithPrevious / MergedWithNext glue a match to the span before /
 *              after it, Contiguous joins adjacent matches;
 *   ByteLevel  a ' ' before a piece that does not start with one (add_prefix_space), the
 *              GPT-2 pattern Isolated (use_regex), then every byte to its alphabet character.
 * The last ByteLevel step's mapping is left to the caller (ferry_pretok_bytes_out): the BPE
 * model can start from the bytes directly.
 *
 * Owns: the steps and their compiled regexes.
 */
#include "format/pretokenize.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "format/regex.h"

#define PT_MAX_STEPS 64

static const char pt_gpt2[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

enum { PT_SPLIT, PT_BYTELEVEL };
enum { BH_REMOVED, BH_ISOLATED, BH_MERGED_PREV, BH_MERGED_NEXT, BH_CONTIGUOUS };

typedef struct {
    int kind;
    ferry_regex *re; /* PT_SPLIT with a Regex pattern; PT_BYTELEVEL with use_regex */
    char *lit;       /* PT_SPLIT with a String pattern */
    size_t lit_len;
    int behavior;
    int add_prefix_space;
} pt_step;

struct ferry_pretok {
    pt_step steps[PT_MAX_STEPS];
    int n_steps;
};

/* Pieces in one buffer: piece i is buf[off[2i] .. off[2i + 1]). */
typedef struct {
    char *buf;
    size_t n, cap;
    size_t *off;
    size_t n_off, cap_off;
} pt_list;

typedef struct {
    size_t start, end;
    int match;
} pt_span;

struct ferry_pretok_scratch {
    ferry_regex_scratch *rx;
    pt_list a, b;
    pt_span *spans;
    size_t n_spans, cap_spans;
    char *tmp;
    size_t cap_tmp;
};

/* ---- the byte alphabet ------------------------------------------------------------- */

/* Bytes that are printable Latin-1 stand for themselves; the other 68, in order, for
 * U+0100 .. U+0143. */
static uint32_t bl_cp(uint8_t b)
{
    if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE)
        return b;
    if (b <= 0x20)
        return 0x100 + b;
    if (b <= 0xA0)
        return 0x100 + 33 + (uint32_t)(b - 0x7F);
    return 0x100 + 33 + 34; /* 0xAD */
}

size_t ferry_bytelevel_char(uint8_t b, char out[2])
{
    uint32_t c = bl_cp(b);
    if (c < 0x80) {
        out[0] = (char)c;
        return 1;
    }
    out[0] = (char)(0xC0 | c >> 6);
    out[1] = (char)(0x80 | (c & 0x3F));
    return 2;
}

int ferry_bytelevel_byte(uint32_t c)
{
    if (c < 0x100)
        return bl_cp((uint8_t)c) == c ? (int)c : -1;
    if (c <= 0x120)
        return (int)(c - 0x100);
    if (c <= 0x142)
        return (int)(c - 0x100 - 33 + 0x7F);
    return c == 0x143 ? 0xAD : -1;
}

/* ---- lists ------------------------------------------------------------------------- */

/* Room for n more bytes and one more piece. */
static int list_reserve(pt_list *l, size_t n)
{
    if (l->cap - l->n < n) {
        size_t cap = l->cap ? l->cap : 256;
        while (cap - l->n < n)
            cap *= 2;
        char *p = realloc(l->buf, cap);
        if (!p)
            return -1;
        l->buf = p;
        l->cap = cap;
    }
    if (l->n_off + 2 > l->cap_off) {
        size_t cap = l->cap_off ? l->cap_off * 2 : 64;
        size_t *p = realloc(l->off, cap * sizeof *p);
        if (!p)
            return -1;
        l->off = p;
        l->cap_off = cap;
    }
    return 0;
}

static int list_add(pt_list *l, const char *s, size_t n)
{
    if (list_reserve(l, n))
        return -1;
    memcpy(l->buf + l->n, s, n);
    l->off[l->n_off++] = l->n;
    l->n += n;
    l->off[l->n_off++] = l->n;
    return 0;
}

static void list_free(pt_list *l)
{
    free(l->buf);
    free(l->off);
}

static int span_add(ferry_pretok_scratch *sc, size_t start, size_t end, int match)
{
    if (sc->n_spans == sc->cap_spans) {
        size_t cap = sc->cap_spans ? sc->cap_spans * 2 : 64;
        pt_span *p = realloc(sc->spans, cap * sizeof *p);
        if (!p)
            return -1;
        sc->spans = p;
        sc->cap_spans = cap;
    }
    sc->spans[sc->n_spans++] = (pt_span){start, end, match};
    return 0;
}

static size_t utf8_len(uint8_t c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

/* ---- running ----------------------------------------------------------------------- */

/* The (span, is_match) list covering s[0..n) for a pattern (Pattern::find_matches). */
static ferry_status find_matches(ferry_pretok_scratch *sc, const ferry_regex *re,
                                 const char *lit, size_t lit_len, const char *s, size_t n)
{
    sc->n_spans = 0;
    size_t prev = 0;
    if (n == 0)
        return span_add(sc, 0, 0, 0) ? ferry_fail(FERRY_ERR_NOMEM, "pre_tokenizer: out of memory")
                                     : FERRY_OK;
    if (!re) {
        size_t pos = 0;
        const char *p;
        while (pos < n && (p = memmem(s + pos, n - pos, lit, lit_len)) != NULL) {
            size_t a = (size_t)(p - s);
            if ((prev != a && span_add(sc, prev, a, 0)) || span_add(sc, a, a + lit_len, 1))
                return ferry_fail(FERRY_ERR_NOMEM, "pre_tokenizer: out of memory");
            prev = pos = a + lit_len;
        }
    } else {
        size_t last_end = 0, last_match_end = 0, a, b;
        int have_last = 0;
        while (last_end <= n) {
            int r = ferry_regex_find(re, sc->rx, s, n, last_end, &a, &b);
            if (r < 0)
                return FERRY_ERR_INVALID;
            if (r == 0)
                break;
            if (a == b && have_last && last_match_end == b) {
                last_end += last_end < n ? utf8_len((uint8_t)s[last_end]) : 1;
                continue;
            }
            last_end = last_match_end = b;
            have_last = 1;
            if ((prev != a && span_add(sc, prev, a, 0)) || span_add(sc, a, b, 1))
                return ferry_fail(FERRY_ERR_NOMEM, "pre_tokenizer: out of memory");
            prev = b;
        }
    }
    if (prev != n && span_add(sc, prev, n, 0))
        return ferry_fail(FERRY_ERR_NOMEM, "pre_tokenizer: out of memory");
    return FERRY_OK;
}

/* Applies the behavior to sc->spans in place (NormalizedString::split); spans with
 * match == 2 are removed. */
static void apply_behavior(ferry_pretok_scratch *sc, int behavior)
{
    pt_span *v = sc->spans;
    size_t n = sc->n_spans, k = 0;
    int prev_match = 0;
    switch (behavior) {
    case BH_ISOLATED:
        for (size_t i = 0; i < n; i++)
            v[i].match = 0;
        return;
    case BH_REMOVED:
        for (size_t i = 0; i < n; i++)
            v[i].match = v[i].match ? 2 : 0;
        return;
    case BH_CONTIGUOUS:
        for (size_t i = 0; i < n; i++) {
            pt_span s = v[i];
            if (s.match == prev_match && k > 0)
                v[k - 1].end = s.end;
            else
                v[k++] = (pt_span){s.start, s.end, 0};
            prev_match = s.match;
        }
        break;
    case BH_MERGED_PREV:
        for (size_t i = 0; i < n; i++) {
            pt_span s = v[i];
            if (s.match && !prev_match && k > 0)
                v[k - 1].end = s.end;
            else
                v[k++] = (pt_span){s.start, s.end, 0};
            prev_match = s.match;
        }
        break;
    default: /* BH_MERGED_NEXT: the same from the end */
        for (size_t i = n; i-- > 0;) {
            pt_span s = v[i];
            if (s.match && !prev_match && k > 0)
                v[n - k].start = s.start;
            else {
                k++;
                v[n - k] = (pt_span){s.start, s.end, 0};
            }
            prev_match = s.match;
        }
        memmove(v, v + n - k, k * sizeof *v);
        break;
    }
    sc->n_spans = k;
}

static ferry_status split_piece(ferry_pretok_scratch *sc, const ferry_regex *re, const char *lit,
                                size_t lit_len, int behavior, const char *s, size_t n,
                                pt_list *out)
{
    ferry_status st = find_matches(sc, re, lit, lit_len, s, n);
    if (st)
        return st;
    apply_behavior(sc, behavior);
    for (size_t i = 0; i < sc->n_spans; i++) {
        const pt_span *p = &sc->spans[i];
        if (p->match != 2 && p->end > p->start && list_add(out, s + p->start, p->end - p->start))
            return ferry_fail(FERRY_ERR_NOMEM, "pre_tokenizer: out of memory");
    }
    return FERRY_OK;
}

/* Maps every piece of `in` to the byte alphabet, into `out`. */
static ferry_status map_bytes(const pt_list *in, pt_list *out)
{
    for (size_t i = 0; i < in->n_off; i += 2) {
        size_t a = in->off[i], b = in->off[i + 1], start = out->n;
        if (list_reserve(out, 2 * (b - a)))
            return ferry_fail(FERRY_ERR_NOMEM, "pre_tokenizer: out of memory");
        for (size_t j = a; j < b; j++)
            out->n += ferry_bytelevel_char((uint8_t)in->buf[j], out->buf + out->n);
        out->off[out->n_off++] = start;
        out->off[out->n_off++] = out->n;
    }
    return FERRY_OK;
}

static ferry_status run_step(const ferry_pretok *p, int k, ferry_pretok_scratch *sc,
                             const pt_list *in, pt_list *out)
{
    const pt_step *st = &p->steps[k];
    ferry_status rc;
    out->n = out->n_off = 0;
    if (st->kind == PT_SPLIT) {
        for (size_t i = 0; i < in->n_off; i += 2) {
            rc = split_piece(sc, st->re, st->lit, st->lit_len, st->behavior,
                             in->buf + in->off[i], in->off[i + 1] - in->off[i], out);
            if (rc)
                return rc;
        }
        return FERRY_OK;
    }
    pt_list mid = {0};
    pt_list *dst = out;
    int last = k == p->n_steps - 1;
    if (!last)
        dst = &mid;
    for (size_t i = 0; i < in->n_off; i += 2) {
        const char *s = in->buf + in->off[i];
        size_t n = in->off[i + 1] - in->off[i];
        if (st->add_prefix_space && s[0] != ' ') {
            if (sc->cap_tmp < n + 1) {
                char *t = realloc(sc->tmp, n + 1);
                if (!t) {
                    rc = ferry_fail(FERRY_ERR_NOMEM, "pre_tokenizer: out of memory");
                    goto fail;
                }
                sc->tmp = t;
                sc->cap_tmp = n + 1;
            }
            sc->tmp[0] = ' ';
            memcpy(sc->tmp + 1, s, n);
            s = sc->tmp;
            n++;
        }
        if (st->re)
            rc = split_piece(sc, st->re, NULL, 0, BH_ISOLATED, s, n, dst);
        else
            rc = list_add(dst, s, n) ? ferry_fail(FERRY_ERR_NOMEM, "pre_tokenizer: out of memory")
                                     : FERRY_OK;
        if (rc)
            goto fail;
    }
    rc = last ? FERRY_OK : map_bytes(&mid, out);
fail:
    list_free(&mid);
    return rc;
}

ferry_status ferry_pretok_run(const ferry_pretok *p, ferry_pretok_scratch *sc, const char *s,
                              size_t n, ferry_pretok_word_fn fn, void *user)
{
    pt_list *in = &sc->a, *out = &sc->b;
    in->n = in->n_off = 0;
    if (n == 0)
        return FERRY_OK;
    if (list_add(in, s, n))
        return ferry_fail(FERRY_ERR_NOMEM, "pre_tokenizer: out of memory");
    for (int k = 0; k < p->n_steps; k++) {
        const pt_step *st = &p->steps[k];
        /* a last ByteLevel without prefix space or pattern leaves the pieces as they are */
        if (k == p->n_steps - 1 && st->kind == PT_BYTELEVEL && !st->re && !st->add_prefix_space)
            break;
        ferry_status rc = run_step(p, k, sc, in, out);
        if (rc)
            return rc;
        pt_list *swap = in;
        in = out;
        out = swap;
    }
    for (size_t i = 0; i < in->n_off; i += 2) {
        size_t len = in->off[i + 1] - in->off[i];
        if (len == 0)
            continue;
        ferry_status rc = fn(in->buf + in->off[i], len, user);
        if (rc)
            return rc;
    }
    return FERRY_OK;
}

int ferry_pretok_bytes_out(const ferry_pretok *p)
{
    return p->n_steps > 0 && p->steps[p->n_steps - 1].kind == PT_BYTELEVEL;
}

ferry_status ferry_pretok_scratch_create(ferry_pretok_scratch **out)
{
    ferry_pretok_scratch *sc = calloc(1, sizeof *sc);
    if (!sc)
        return ferry_fail(FERRY_ERR_NOMEM, "pre_tokenizer: out of memory");
    ferry_status st = ferry_regex_scratch_create(&sc->rx);
    if (st) {
        free(sc);
        return st;
    }
    *out = sc;
    return FERRY_OK;
}

void ferry_pretok_scratch_free(ferry_pretok_scratch *sc)
{
    if (!sc)
        return;
    ferry_regex_scratch_free(sc->rx);
    list_free(&sc->a);
    list_free(&sc->b);
    free(sc->spans);
    free(sc->tmp);
    free(sc);
}

void ferry_pretok_free(ferry_pretok *p)
{
    if (!p)
        return;
    for (int k = 0; k < p->n_steps; k++) {
        ferry_regex_free(p->steps[k].re);
        free(p->steps[k].lit);
    }
    free(p);
}

/* ---- parsing ----------------------------------------------------------------------- *
 *
 * {"type": "Sequence", "pretokenizers": [step, ...]}
 * {"type": "Split", "pattern": {"Regex": "..."} | {"String": "..."},
 *  "behavior": "Removed" | "Isolated" | "MergedWithPrevious" | "MergedWithNext"
 *              | "Contiguous", "invert": false}
 * {"type": "ByteLevel", "add_prefix_space": bool (default true), "trim_offsets": bool
 *  (offsets only), "use_regex": bool (default true)}
 */

static const cJSON *pt_field(const cJSON *obj, const char *name)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(obj, name);
    return cJSON_IsNull(f) ? NULL : f;
}

static ferry_status pt_flag(const cJSON *obj, const char *name, int dflt, const char *o,
                            const char *path, int *out)
{
    const cJSON *f = pt_field(obj, name);
    if (f && !cJSON_IsBool(f))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: %s.%s is not true or false", o, path, name);
    *out = f ? cJSON_IsTrue(f) : dflt;
    return FERRY_OK;
}

static ferry_status parse_split(ferry_pretok *p, const cJSON *obj, const char *o,
                                const char *path)
{
    static const char *const names[] = {"Removed", "Isolated", "MergedWithPrevious",
                                        "MergedWithNext", "Contiguous"};
    pt_step *st = &p->steps[p->n_steps];
    const cJSON *pat = pt_field(obj, "pattern"), *bh = pt_field(obj, "behavior");
    const cJSON *rx = pat ? pt_field(pat, "Regex") : NULL, *str = pat ? pt_field(pat, "String")
                                                                      : NULL;
    int invert = 0;
    ferry_status rc = pt_flag(obj, "invert", 0, o, path, &invert);
    if (rc)
        return rc;
    if (invert)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: %s.invert true is not supported", o,
                          path);
    if (!cJSON_IsObject(pat) || (!cJSON_IsString(rx) && !cJSON_IsString(str)) || (rx && str))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: %s.pattern is not {\"Regex\": \"...\"} or "
                          "{\"String\": \"...\"}", o, path);
    if (!cJSON_IsString(bh))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: %s.behavior is %s", o, path,
                          bh ? "not a string" : "missing");
    st->behavior = -1;
    for (int k = 0; k < 5; k++)
        if (strcmp(bh->valuestring, names[k]) == 0)
            st->behavior = k;
    if (st->behavior < 0)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: %s.behavior '%.64s' is not Removed, Isolated, "
                          "MergedWithPrevious, MergedWithNext or Contiguous", o, path,
                          bh->valuestring);
    st->kind = PT_SPLIT;
    if (str) {
        st->lit_len = strlen(str->valuestring);
        if (st->lit_len == 0)
            return ferry_fail(FERRY_ERR_FORMAT, "%s: %s.pattern.String is empty", o, path);
        st->lit = strdup(str->valuestring);
        if (!st->lit)
            return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", o);
    } else {
        char where[300];
        snprintf(where, sizeof where, "%s: %s.pattern.Regex", o, path);
        rc = ferry_regex_compile(rx->valuestring, strlen(rx->valuestring), where, &st->re);
        if (rc)
            return rc;
    }
    p->n_steps++;
    return FERRY_OK;
}

static ferry_status parse_step(ferry_pretok *p, const cJSON *obj, const char *o,
                               const char *path, int depth)
{
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(obj, "type");
    if (!cJSON_IsObject(obj) || !cJSON_IsString(ty))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: %s has no type", o, path);
    const char *t = ty->valuestring;
    if (strcmp(t, "Sequence") == 0) {
        const cJSON *list = pt_field(obj, "pretokenizers"), *it;
        if (!cJSON_IsArray(list))
            return ferry_fail(FERRY_ERR_FORMAT, "%s: %s.pretokenizers is not a list", o, path);
        if (depth > 8)
            return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: %s: Sequences nested too deep", o,
                              path);
        int i = 0;
        cJSON_ArrayForEach(it, list)
        {
            char sub[256];
            snprintf(sub, sizeof sub, "%s.pretokenizers[%d]", path, i++);
            ferry_status rc = parse_step(p, it, o, sub, depth + 1);
            if (rc)
                return rc;
        }
        return FERRY_OK;
    }
    if (p->n_steps == PT_MAX_STEPS)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: %s: more than %d pre-tokenizer steps", o,
                          path, PT_MAX_STEPS);
    if (strcmp(t, "Split") == 0)
        return parse_split(p, obj, o, path);
    if (strcmp(t, "ByteLevel") == 0) {
        pt_step *st = &p->steps[p->n_steps];
        int use_regex = 1;
        ferry_status rc = pt_flag(obj, "add_prefix_space", 1, o, path, &st->add_prefix_space);
        if (rc || (rc = pt_flag(obj, "use_regex", 1, o, path, &use_regex)))
            return rc;
        st->kind = PT_BYTELEVEL;
        if (use_regex) {
            char where[300];
            snprintf(where, sizeof where, "%s: %s (GPT-2 pattern)", o, path);
            rc = ferry_regex_compile(pt_gpt2, sizeof pt_gpt2 - 1, where, &st->re);
            if (rc)
                return rc;
        }
        p->n_steps++;
        return FERRY_OK;
    }
    return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: %s: pre_tokenizer '%.64s' is not supported%s",
                      o, path, t,
                      depth > 0 && strcmp(t, "Metaspace") == 0 ? " inside a Sequence" : "");
}

ferry_status ferry_pretok_parse(const cJSON *obj, const char *origin, ferry_pretok **out)
{
    ferry_pretok *p = calloc(1, sizeof *p);
    if (!p)
        return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", origin);
    ferry_status rc = parse_step(p, obj, origin, "pre_tokenizer", 0);
    if (rc) {
        ferry_pretok_free(p);
        return rc;
    }
    *out = p;
    return FERRY_OK;
}
