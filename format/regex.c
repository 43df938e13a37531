/*
 * format/regex.c: Oniguruma-compatible regexes on PCRE2, for tokenizer.json's patterns.
 *
 * tokenizers (0.22) compiles Split patterns with the onig crate (Oniguruma 6.9, Ruby syntax,
 * Unicode 16.0 tables). PCRE2's backtracking semantics are the same (leftmost-first
 * alternation, greedy and lazy repeats, lookaround); what differs is rewritten here, once, at
 * compile time:
 *   \s, \S     Unicode White_Space exactly (PCRE2's \s also takes U+180E);
 *   \d, \D     \p{Nd}; \w, \W Oniguruma's word class (L, M, Nd, Pc and a few numbers and
 *              circled letters); \h, \H hex digits (Ruby), not horizontal space;
 *   \p{X}      a general category gains the code points Unicode assigned after the Unicode
 *              version PCRE2 was built with (10.42: 14.0), from the table below; long names
 *              (\p{Letter}) become short ones; \p{^X} is \P{X};
 *   \uHHHH     \x{HHHH};  {,n}  {0,n};  (?m) Ruby's dot-all, PCRE2's (?s);
 *   ^ $        always at line starts/ends (PCRE2_MULTILINE), as in Ruby syntax.
 * Nested classes and && (class intersection) have no PCRE2 equivalent: FERRY_ERR_UNSUPPORTED.
 * The one approximation left: a negated category inside a class ([\P{L}x]) and \b/\B keep
 * PCRE2's tables, which only differs on characters assigned after PCRE2's Unicode version.
 *
 * Owns: the compiled code (JIT-compiled when PCRE2 has a JIT) and the pattern's field name.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "format/regex.h"

#include <pcre2.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

struct ferry_regex {
    pcre2_code *code;
    char *where;
};

struct ferry_regex_scratch {
    pcre2_match_data *md;
    pcre2_match_context *mc;
    pcre2_jit_stack *js; /* NULL without JIT */
};

/* Code points each general category (and Oniguruma's \w beyond L, M, Nd, Pc) has in
 * Oniguruma's Unicode 16.0 tables but not in PCRE2 10.42's Unicode 14.0 ones: the
 * characters assigned since. Derived from tokenizers 0.22.2 itself (a Split pre-tokenizer
 * with the class, probed with every code point) against PCRE2 10.42; nothing is in PCRE2's
 * class and missing from Oniguruma's, except in Mn (one mark recategorized), left out. */
static const uint32_t rx_extra[][2] = {
    /* L */ {0x1C89, 0x1C8A}, {0xA7CB, 0xA7CD}, {0xA7DA, 0xA7DC}, {0x105C0, 0x105F3},
    {0x10D4A, 0x10D65}, {0x10D6F, 0x10D85}, {0x10EC2, 0x10EC4}, {0x1123F, 0x11240},
    {0x11380, 0x11389}, {0x1138B, 0x1138B}, {0x1138E, 0x1138E}, {0x11390, 0x113B5},
    {0x113B7, 0x113B7}, {0x113D1, 0x113D1}, {0x113D3, 0x113D3}, {0x11BC0, 0x11BE0},
    {0x11F02, 0x11F02}, {0x11F04, 0x11F10}, {0x11F12, 0x11F33}, {0x1342F, 0x1342F},
    {0x13441, 0x13446}, {0x13460, 0x143FA}, {0x16100, 0x1611D}, {0x16D40, 0x16D6C},
    {0x18CFF, 0x18CFF}, {0x1B132, 0x1B132}, {0x1B155, 0x1B155}, {0x1DF25, 0x1DF2A},
    {0x1E030, 0x1E06D}, {0x1E4D0, 0x1E4EB}, {0x1E5D0, 0x1E5ED}, {0x1E5F0, 0x1E5F0},
    {0x2B739, 0x2B739}, {0x2EBF0, 0x2EE5D}, {0x31350, 0x323AF},
    /* Lu */ {0x1C89, 0x1C89}, {0xA7CB, 0xA7CC}, {0xA7DA, 0xA7DA}, {0xA7DC, 0xA7DC},
    {0x10D50, 0x10D65},
    /* Ll */ {0x1C8A, 0x1C8A}, {0xA7CD, 0xA7CD}, {0xA7DB, 0xA7DB}, {0x10D70, 0x10D85},
    {0x1DF25, 0x1DF2A},
    /* Lm */ {0x10D4E, 0x10D4E}, {0x10D6F, 0x10D6F}, {0x16D40, 0x16D42}, {0x16D6B, 0x16D6C},
    {0x1E030, 0x1E06D}, {0x1E4EB, 0x1E4EB},
    /* Lo */ {0x105C0, 0x105F3}, {0x10D4A, 0x10D4D}, {0x10D4F, 0x10D4F}, {0x10EC2, 0x10EC4},
    {0x1123F, 0x11240}, {0x11380, 0x11389}, {0x1138B, 0x1138B}, {0x1138E, 0x1138E},
    {0x11390, 0x113B5}, {0x113B7, 0x113B7}, {0x113D1, 0x113D1}, {0x113D3, 0x113D3},
    {0x11BC0, 0x11BE0}, {0x11F02, 0x11F02}, {0x11F04, 0x11F10}, {0x11F12, 0x11F33},
    {0x1342F, 0x1342F}, {0x13441, 0x13446}, {0x13460, 0x143FA}, {0x16100, 0x1611D},
    {0x16D43, 0x16D6A}, {0x18CFF, 0x18CFF}, {0x1B132, 0x1B132}, {0x1B155, 0x1B155},
    {0x1E4D0, 0x1E4EA}, {0x1E5D0, 0x1E5ED}, {0x1E5F0, 0x1E5F0}, {0x2B739, 0x2B739},
    {0x2EBF0, 0x2EE5D}, {0x31350, 0x323AF},
    /* M */ {0x897, 0x897}, {0xCF3, 0xCF3}, {0xECE, 0xECE}, {0x10D69, 0x10D6D},
    {0x10EFC, 0x10EFF}, {0x11241, 0x11241}, {0x113B8, 0x113C0}, {0x113C2, 0x113C2},
    {0x113C5, 0x113C5}, {0x113C7, 0x113CA}, {0x113CC, 0x113D0}, {0x113D2, 0x113D2},
    {0x113E1, 0x113E2}, {0x11F00, 0x11F01}, {0x11F03, 0x11F03}, {0x11F34, 0x11F3A},
    {0x11F3E, 0x11F42}, {0x11F5A, 0x11F5A}, {0x13440, 0x13440}, {0x13447, 0x13455},
    {0x1611E, 0x1612F}, {0x1E08F, 0x1E08F}, {0x1E4EC, 0x1E4EF}, {0x1E5EE, 0x1E5EF},
    /* Mc */ {0xCF3, 0xCF3}, {0x113B8, 0x113BA}, {0x113C2, 0x113C2}, {0x113C5, 0x113C5},
    {0x113C7, 0x113CA}, {0x113CC, 0x113CD}, {0x113CF, 0x113CF}, {0x1171E, 0x1171E},
    {0x11F03, 0x11F03}, {0x11F34, 0x11F35}, {0x11F3E, 0x11F3F}, {0x11F41, 0x11F41},
    {0x1612A, 0x1612C},
    /* N */ {0x10D40, 0x10D49}, {0x116D0, 0x116E3}, {0x11BF0, 0x11BF9}, {0x11F50, 0x11F59},
    {0x16130, 0x16139}, {0x16D70, 0x16D79}, {0x1CCF0, 0x1CCF9}, {0x1D2C0, 0x1D2D3},
    {0x1E4F0, 0x1E4F9}, {0x1E5F1, 0x1E5FA},
    /* Nd */ {0x10D40, 0x10D49}, {0x116D0, 0x116E3}, {0x11BF0, 0x11BF9}, {0x11F50, 0x11F59},
    {0x16130, 0x16139}, {0x16D70, 0x16D79}, {0x1CCF0, 0x1CCF9}, {0x1E4F0, 0x1E4F9},
    {0x1E5F1, 0x1E5FA},
    /* No */ {0x1D2C0, 0x1D2D3},
    /* P */ {0x1B4E, 0x1B4F}, {0x1B7F, 0x1B7F}, {0x10D6E, 0x10D6E}, {0x113D4, 0x113D5},
    {0x113D7, 0x113D8}, {0x11B00, 0x11B09}, {0x11BE1, 0x11BE1}, {0x11F43, 0x11F4F},
    {0x16D6D, 0x16D6F}, {0x1E5FF, 0x1E5FF},
    /* Pd */ {0x10D6E, 0x10D6E},
    /* Po */ {0x1B4E, 0x1B4F}, {0x1B7F, 0x1B7F}, {0x113D4, 0x113D5}, {0x113D7, 0x113D8},
    {0x11B00, 0x11B09}, {0x11BE1, 0x11BE1}, {0x11F43, 0x11F4F}, {0x16D6D, 0x16D6F},
    {0x1E5FF, 0x1E5FF},
    /* S */ {0x2427, 0x2429}, {0x2FFC, 0x2FFF}, {0x31E4, 0x31E5}, {0x31EF, 0x31EF},
    {0x10D8E, 0x10D8F}, {0x1CC00, 0x1CCEF}, {0x1CD00, 0x1CEB3}, {0x1F6DC, 0x1F6DC},
    {0x1F774, 0x1F776}, {0x1F77B, 0x1F77F}, {0x1F7D9, 0x1F7D9}, {0x1F8B2, 0x1F8BB},
    {0x1F8C0, 0x1F8C1}, {0x1FA75, 0x1FA77}, {0x1FA87, 0x1FA89}, {0x1FA8F, 0x1FA8F},
    {0x1FAAD, 0x1FAAF}, {0x1FABB, 0x1FABF}, {0x1FAC6, 0x1FAC6}, {0x1FACE, 0x1FACF},
    {0x1FADA, 0x1FADC}, {0x1FADF, 0x1FADF}, {0x1FAE8, 0x1FAE9}, {0x1FAF7, 0x1FAF8},
    {0x1FBCB, 0x1FBEF},
    /* Sm */ {0x10D8E, 0x10D8F},
    /* So */ {0x2427, 0x2429}, {0x2FFC, 0x2FFF}, {0x31E4, 0x31E5}, {0x31EF, 0x31EF},
    {0x1CC00, 0x1CCEF}, {0x1CD00, 0x1CEB3}, {0x1F6DC, 0x1F6DC}, {0x1F774, 0x1F776},
    {0x1F77B, 0x1F77F}, {0x1F7D9, 0x1F7D9}, {0x1F8B2, 0x1F8BB}, {0x1F8C0, 0x1F8C1},
    {0x1FA75, 0x1FA77}, {0x1FA87, 0x1FA89}, {0x1FA8F, 0x1FA8F}, {0x1FAAD, 0x1FAAF},
    {0x1FABB, 0x1FABF}, {0x1FAC6, 0x1FAC6}, {0x1FACE, 0x1FACF}, {0x1FADA, 0x1FADC},
    {0x1FADF, 0x1FADF}, {0x1FAE8, 0x1FAE9}, {0x1FAF7, 0x1FAF8}, {0x1FBCB, 0x1FBEF},
    /* \w beyond L, M, Nd, Pc */ {0xB2, 0xB3}, {0xB9, 0xB9}, {0xBC, 0xBE}, {0x16EE, 0x16F0},
    {0x2160, 0x2182}, {0x2185, 0x2188}, {0x24B6, 0x24E9}, {0x3007, 0x3007}, {0x3021, 0x3029},
    {0x3038, 0x303A}, {0xA6E6, 0xA6EF}, {0x10140, 0x10174}, {0x10341, 0x10341},
    {0x1034A, 0x1034A}, {0x103D1, 0x103D5}, {0x12400, 0x1246E}, {0x1F130, 0x1F149},
    {0x1F150, 0x1F169}, {0x1F170, 0x1F189},
};

/* A general category: its short name, the long names Oniguruma also takes (loose: case,
 * spaces, '-' and '_' ignored), and its slice of rx_extra. */
typedef struct {
    const char *name, *long1, *long2;
    int16_t extra, n_extra;
} rx_prop;

static const rx_prop rx_props[] = {
    {"L", "letter", NULL, 0, 35},
    {"Lu", "uppercaseletter", NULL, 35, 5},
    {"Ll", "lowercaseletter", NULL, 40, 5},
    {"Lt", "titlecaseletter", NULL, 0, 0},
    {"Lm", "modifierletter", NULL, 45, 6},
    {"Lo", "otherletter", NULL, 51, 30},
    {"M", "mark", "combiningmark", 81, 24},
    {"Mn", "nonspacingmark", NULL, 0, 0},
    {"Mc", "spacingmark", NULL, 105, 13},
    {"Me", "enclosingmark", NULL, 0, 0},
    {"N", "number", NULL, 118, 10},
    {"Nd", "decimalnumber", "digit", 128, 9},
    {"Nl", "letternumber", NULL, 0, 0},
    {"No", "othernumber", NULL, 137, 1},
    {"P", "punctuation", "punct", 138, 10},
    {"Pc", "connectorpunctuation", NULL, 0, 0},
    {"Pd", "dashpunctuation", NULL, 148, 1},
    {"Ps", "openpunctuation", NULL, 0, 0},
    {"Pe", "closepunctuation", NULL, 0, 0},
    {"Pi", "initialpunctuation", NULL, 0, 0},
    {"Pf", "finalpunctuation", NULL, 0, 0},
    {"Po", "otherpunctuation", NULL, 149, 9},
    {"S", "symbol", NULL, 158, 25},
    {"Sm", "mathsymbol", NULL, 183, 1},
    {"Sc", "currencysymbol", NULL, 0, 0},
    {"Sk", "modifiersymbol", NULL, 0, 0},
    {"So", "othersymbol", NULL, 184, 24},
    {"Z", "separator", NULL, 0, 0},
    {"Zs", "spaceseparator", NULL, 0, 0},
    {"Zl", "lineseparator", NULL, 0, 0},
    {"Zp", "paragraphseparator", NULL, 0, 0},
};
#define RX_W_EXTRA 208
#define RX_W_N_EXTRA 19
_Static_assert(sizeof rx_extra / sizeof rx_extra[0] == RX_W_EXTRA + RX_W_N_EXTRA,
               "rx_props' slices must cover rx_extra");

/* Unicode White_Space, Oniguruma's \s, and its complement. */
static const uint32_t rx_space[][2] = {
    {0x9, 0xD}, {0x20, 0x20}, {0x85, 0x85}, {0xA0, 0xA0}, {0x1680, 0x1680}, {0x2000, 0x200A},
    {0x2028, 0x2029}, {0x202F, 0x202F}, {0x205F, 0x205F}, {0x3000, 0x3000},
};
static const uint32_t rx_nonspace[][2] = {
    {0x0, 0x8}, {0xE, 0x1F}, {0x21, 0x84}, {0x86, 0x9F}, {0xA1, 0x167F}, {0x1681, 0x1FFF},
    {0x200B, 0x2027}, {0x202A, 0x202E}, {0x2030, 0x205E}, {0x2060, 0x2FFF},
    {0x3001, 0x10FFFF},
};
static const uint32_t rx_nonhex[][2] = {
    {0x0, 0x2F}, {0x3A, 0x40}, {0x47, 0x60}, {0x67, 0x10FFFF},
};

/* ---- the rewritten pattern --------------------------------------------------------- */

typedef struct {
    char *p;
    size_t n, cap;
    int oom;
} rx_out;

static void out_put(rx_out *o, const char *s, size_t n)
{
    if (o->oom)
        return;
    if (o->cap - o->n < n + 1) {
        size_t cap = o->cap ? o->cap : 256;
        while (cap - o->n < n + 1)
            cap *= 2;
        char *p = realloc(o->p, cap);
        if (!p) {
            o->oom = 1;
            return;
        }
        o->p = p;
        o->cap = cap;
    }
    memcpy(o->p + o->n, s, n);
    o->n += n;
    o->p[o->n] = 0;
}

static void out_str(rx_out *o, const char *s) { out_put(o, s, strlen(s)); }

/* Class items for ranges: \x{A}-\x{B} ... */
static void out_ranges(rx_out *o, const uint32_t (*r)[2], size_t n)
{
    char item[40];
    for (size_t i = 0; i < n; i++) {
        int k = r[i][0] == r[i][1] ? snprintf(item, sizeof item, "\\x{%X}", (unsigned)r[i][0])
                                   : snprintf(item, sizeof item, "\\x{%X}-\\x{%X}",
                                              (unsigned)r[i][0], (unsigned)r[i][1]);
        out_put(o, item, (size_t)k);
    }
}

/* Class items of a property: \p{X} and the code points assigned since PCRE2's tables. */
static void out_prop_items(rx_out *o, const rx_prop *p)
{
    out_str(o, "\\p{");
    out_str(o, p->name);
    out_str(o, "}");
    out_ranges(o, rx_extra + p->extra, (size_t)p->n_extra);
}

/* Oniguruma's \w as class items. */
static void out_word_items(rx_out *o)
{
    static const int word_props[] = {0, 6, 11, 15}; /* L, M, Nd, Pc */
    for (size_t k = 0; k < sizeof word_props / sizeof word_props[0]; k++)
        out_prop_items(o, &rx_props[word_props[k]]);
    out_ranges(o, rx_extra + RX_W_EXTRA, RX_W_N_EXTRA);
}

/* Loose property name match: case, ' ', '-' and '_' ignored. */
static int loose_eq(const char *a, size_t na, const char *b)
{
    size_t i = 0;
    for (; *b; b++) {
        while (i < na && (a[i] == ' ' || a[i] == '-' || a[i] == '_'))
            i++;
        if (i == na)
            return 0;
        char c = a[i++];
        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        char d = *b >= 'A' && *b <= 'Z' ? (char)(*b - 'A' + 'a') : *b;
        if (c != d)
            return 0;
    }
    while (i < na && (a[i] == ' ' || a[i] == '-' || a[i] == '_'))
        i++;
    return i == na;
}

static const rx_prop *find_prop(const char *name, size_t n)
{
    for (size_t k = 0; k < sizeof rx_props / sizeof rx_props[0]; k++) {
        const rx_prop *p = &rx_props[k];
        if (loose_eq(name, n, p->name) || loose_eq(name, n, p->long1) ||
            (p->long2 && loose_eq(name, n, p->long2)))
            return p;
    }
    return NULL;
}

typedef struct {
    const char *s;
    size_t n, i;
    const char *where;
    rx_out o;
} rx_rw;

static ferry_status rw_unsupported(rx_rw *w, const char *what)
{
    return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: %s at offset %zu of the regex (Oniguruma "
                      "syntax with no PCRE2 equivalent)", w->where, what, w->i);
}

/* A class (items: in_class) or a whole atom for ranges r and their complement rc. */
static void out_set(rx_rw *w, int in_class, int negate, const uint32_t (*r)[2], size_t n,
                    const uint32_t (*rc)[2], size_t nc)
{
    if (in_class) {
        out_ranges(&w->o, negate ? rc : r, negate ? nc : n);
        return;
    }
    out_str(&w->o, negate ? "[^" : "[");
    out_ranges(&w->o, r, n);
    out_str(&w->o, "]");
}

/* A property (\p{X}, \P{X}, \p{^X}, \d, \D). */
static void out_prop(rx_rw *w, int in_class, int negate, const char *name, size_t n)
{
    const rx_prop *p = find_prop(name, n);
    if (!p || p->n_extra == 0 || (in_class && negate)) {
        out_str(&w->o, negate ? "\\P{" : "\\p{");
        if (p)
            out_str(&w->o, p->name);
        else
            out_put(&w->o, name, n);
        out_str(&w->o, "}");
        return;
    }
    if (!in_class)
        out_str(&w->o, negate ? "[^" : "[");
    out_prop_items(&w->o, p);
    if (!in_class)
        out_str(&w->o, "]");
}

/* One escape starting at s[i] == '\\'; moves w->i past it. */
static ferry_status rw_escape(rx_rw *w, int in_class)
{
    const char *s = w->s;
    size_t n = w->n, i = w->i;
    if (i + 1 >= n) { /* a trailing backslash: let PCRE2 report it */
        out_put(&w->o, s + i, 1);
        w->i = i + 1;
        return FERRY_OK;
    }
    char c = s[i + 1];
    w->i = i + 2;
    switch (c) {
    case 's':
    case 'S':
        out_set(w, in_class, c == 'S', rx_space, sizeof rx_space / sizeof rx_space[0],
                rx_nonspace, sizeof rx_nonspace / sizeof rx_nonspace[0]);
        return FERRY_OK;
    case 'h':
    case 'H': {
        static const uint32_t hex[][2] = {{'0', '9'}, {'A', 'F'}, {'a', 'f'}};
        out_set(w, in_class, c == 'H', hex, 3, rx_nonhex, sizeof rx_nonhex / sizeof rx_nonhex[0]);
        return FERRY_OK;
    }
    case 'd':
    case 'D':
        out_prop(w, in_class, c == 'D', "Nd", 2);
        return FERRY_OK;
    case 'w':
    case 'W':
        if (in_class && c == 'W')
            return rw_unsupported(w, "\\W inside a character class");
        if (!in_class)
            out_str(&w->o, c == 'W' ? "[^" : "[");
        out_word_items(&w->o);
        if (!in_class)
            out_str(&w->o, "]");
        return FERRY_OK;
    case 'p':
    case 'P': {
        int negate = c == 'P';
        const char *name;
        size_t nn;
        if (i + 2 < n && s[i + 2] == '{') {
            const char *end = memchr(s + i + 3, '}', n - i - 3);
            if (!end)
                break; /* PCRE2 reports the malformed property */
            name = s + i + 3;
            nn = (size_t)(end - name);
            w->i = (size_t)(end - s) + 1;
            if (nn > 0 && name[0] == '^') {
                negate = !negate;
                name++;
                nn--;
            }
        } else if (i + 2 < n) {
            name = s + i + 2;
            nn = 1;
            w->i = i + 3;
        } else {
            break;
        }
        out_prop(w, in_class, negate, name, nn);
        return FERRY_OK;
    }
    case 'u': {
        size_t k = 0;
        while (k < 4 && i + 2 + k < n && strchr("0123456789abcdefABCDEF", s[i + 2 + k]) &&
               s[i + 2 + k])
            k++;
        if (k != 4)
            break;
        out_str(&w->o, "\\x{");
        out_put(&w->o, s + i + 2, 4);
        out_str(&w->o, "}");
        w->i = i + 6;
        return FERRY_OK;
    }
    default:
        break;
    }
    /* anything else means the same to PCRE2: copy the backslash and one whole character */
    size_t len = 1;
    uint8_t lead = (uint8_t)c;
    if (lead >= 0xC0)
        len = lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
    if (i + 1 + len > n)
        len = n - i - 1;
    out_put(&w->o, s + i, 1 + len);
    w->i = i + 1 + len;
    return FERRY_OK;
}

/* A character class starting at s[i] == '['. */
static ferry_status rw_class(rx_rw *w)
{
    const char *s = w->s;
    size_t n = w->n;
    out_put(&w->o, "[", 1);
    w->i++;
    if (w->i < n && s[w->i] == '^') {
        out_put(&w->o, "^", 1);
        w->i++;
    }
    if (w->i < n && s[w->i] == ']') { /* a leading ']' is literal in both */
        out_put(&w->o, "\\]", 2);
        w->i++;
    }
    while (w->i < n) {
        char c = s[w->i];
        if (c == ']') {
            out_put(&w->o, "]", 1);
            w->i++;
            return FERRY_OK;
        }
        if (c == '\\') {
            ferry_status st = rw_escape(w, 1);
            if (st)
                return st;
            continue;
        }
        if (c == '[') {
            if (w->i + 1 < n && s[w->i + 1] == ':') { /* [:alpha:] */
                const char *end = NULL;
                for (size_t k = w->i + 2; k + 1 < n; k++)
                    if (s[k] == ':' && s[k + 1] == ']') {
                        end = s + k + 2;
                        break;
                    }
                if (end) {
                    out_put(&w->o, s + w->i, (size_t)(end - (s + w->i)));
                    w->i = (size_t)(end - s);
                    continue;
                }
            }
            return rw_unsupported(w, "a nested character class");
        }
        if (c == '&' && w->i + 1 < n && s[w->i + 1] == '&')
            return rw_unsupported(w, "a class intersection (&&)");
        out_put(&w->o, s + w->i, 1);
        w->i++;
    }
    return FERRY_OK; /* unterminated: PCRE2 reports it */
}

static ferry_status rewrite(rx_rw *w)
{
    const char *s = w->s;
    size_t n = w->n;
    while (w->i < n) {
        char c = s[w->i];
        ferry_status st = FERRY_OK;
        if (c == '\\') {
            st = rw_escape(w, 0);
        } else if (c == '[') {
            st = rw_class(w);
        } else if (c == '(' && w->i + 2 < n && s[w->i + 1] == '?' &&
                   strchr("imx-", s[w->i + 2]) && s[w->i + 2]) {
            /* inline options: Ruby's m is dot-all (PCRE2's s) */
            size_t k = w->i + 2;
            while (k < n && s[k] && strchr("imx-", s[k]))
                k++;
            if (k < n && (s[k] == ':' || s[k] == ')')) {
                out_put(&w->o, "(?", 2);
                for (size_t j = w->i + 2; j < k; j++)
                    out_put(&w->o, s[j] == 'm' ? "s" : s + j, 1);
                w->i = k;
            } else {
                out_put(&w->o, s + w->i, 1);
                w->i++;
            }
        } else if (c == '{' && w->i + 1 < n && s[w->i + 1] == ',') {
            /* {,n} is {0,n} in Oniguruma, a literal in PCRE2 */
            size_t k = w->i + 2;
            while (k < n && s[k] >= '0' && s[k] <= '9')
                k++;
            if (k > w->i + 2 && k < n && s[k] == '}') {
                out_str(&w->o, "{0");
                out_put(&w->o, s + w->i + 1, k + 1 - (w->i + 1));
                w->i = k + 1;
            } else {
                out_put(&w->o, s + w->i, 1);
                w->i++;
            }
        } else {
            out_put(&w->o, s + w->i, 1);
            w->i++;
        }
        if (st)
            return st;
    }
    return FERRY_OK;
}

ferry_status ferry_regex_compile(const char *pattern, size_t len, const char *where,
                                 ferry_regex **out)
{
    rx_rw w = {pattern, len, 0, where, {NULL, 0, 0, 0}};
    pcre2_compile_context *cc = NULL;
    ferry_regex *re = NULL;
    ferry_status st = rewrite(&w);
    if (st)
        goto fail;
    out_put(&w.o, "", 0);
    if (w.o.oom) {
        st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", where);
        goto fail;
    }
    re = calloc(1, sizeof *re);
    cc = pcre2_compile_context_create(NULL);
    if (!re || !cc || !(re->where = strdup(where))) {
        st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", where);
        goto fail;
    }
    pcre2_set_newline(cc, PCRE2_NEWLINE_LF);
    int err;
    PCRE2_SIZE at;
    re->code = pcre2_compile((PCRE2_SPTR)w.o.p, w.o.n, PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE,
                             &err, &at, cc);
    if (!re->code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        /* the offset is in the rewritten pattern; quote the original */
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: invalid regex '%.*s': %s", where,
                        (int)(len < 200 ? len : 200), pattern, (const char *)msg);
        goto fail;
    }
    pcre2_jit_compile(re->code, PCRE2_JIT_COMPLETE); /* without a JIT: the interpreter */
    pcre2_compile_context_free(cc);
    free(w.o.p);
    *out = re;
    return FERRY_OK;
fail:
    pcre2_compile_context_free(cc);
    free(w.o.p);
    ferry_regex_free(re);
    return st;
}

void ferry_regex_free(ferry_regex *re)
{
    if (!re)
        return;
    pcre2_code_free(re->code);
    free(re->where);
    free(re);
}

ferry_status ferry_regex_scratch_create(ferry_regex_scratch **out)
{
    ferry_regex_scratch *sc = calloc(1, sizeof *sc);
    if (!sc)
        return ferry_fail(FERRY_ERR_NOMEM, "regex scratch: out of memory");
    sc->md = pcre2_match_data_create(1, NULL);
    sc->mc = pcre2_match_context_create(NULL);
    if (!sc->md || !sc->mc) {
        ferry_regex_scratch_free(sc);
        return ferry_fail(FERRY_ERR_NOMEM, "regex scratch: out of memory");
    }
    uint32_t jit = 0;
    pcre2_config(PCRE2_CONFIG_JIT, &jit);
    if (jit) {
        sc->js = pcre2_jit_stack_create(32 * 1024, 1024 * 1024, NULL);
        if (sc->js)
            pcre2_jit_stack_assign(sc->mc, NULL, sc->js);
    }
    *out = sc;
    return FERRY_OK;
}

void ferry_regex_scratch_free(ferry_regex_scratch *sc)
{
    if (!sc)
        return;
    pcre2_match_data_free(sc->md);
    pcre2_match_context_free(sc->mc);
    pcre2_jit_stack_free(sc->js);
    free(sc);
}

int ferry_regex_find(const ferry_regex *re, ferry_regex_scratch *sc, const char *s, size_t n,
                     size_t start, size_t *m_start, size_t *m_end)
{
    static const char empty[1] = "";
    PCRE2_SPTR subject = (PCRE2_SPTR)(s ? s : empty);
    int rc = pcre2_match(re->code, subject, n, start, PCRE2_NO_UTF_CHECK, sc->md, sc->mc);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT) /* the interpreter keeps its frames on the heap */
        rc = pcre2_match(re->code, subject, n, start, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, sc->md,
                         sc->mc);
    if (rc == PCRE2_ERROR_NOMATCH)
        return 0;
    if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        ferry_fail(FERRY_ERR_INVALID, "%s: matching %zu bytes of text failed: %s", re->where, n,
                   (const char *)msg);
        return -1;
    }
    const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(sc->md);
    *m_start = ov[0];
    *m_end = ov[1] < ov[0] ? ov[0] : ov[1]; /* \K in a lookahead can put the end first */
    return 1;
}
