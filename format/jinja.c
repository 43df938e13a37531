/*
 * format/jinja.c: see jinja.h. Jinja2 itself is the specification: the lexer follows
 * jinja2/lexer.py rule by rule (newline normalisation, `-`/`+` whitespace control,
 * trim_blocks, lstrip_blocks, bracket balancing), the parser follows jinja2/parser.py
 * function by function (same precedence, same tree), and the evaluator gives each
 * operation Python's result: arithmetic, comparisons, truth, str() and repr(), json.dumps,
 * str methods, Jinja2's Undefined, the sandbox's getattr/getitem (a dict's methods shadow
 * its keys under `.`, a missing key or index is undefined, mutating methods are unsafe).
 *
 * Memory: a compiled template owns one pool (tokens, tree, literals). A render owns another,
 * with a byte budget; every value of the render lives there until the render ends, so
 * values are shared freely and never freed one by one (strings are immutable and slices of
 * them point into them; strings of the JSON variables are borrowed, not copied). Errors
 * unwind with longjmp to the entry point, which frees the pool and any open output
 * buffers: nothing else is allocated, and nothing outside the render is touched, so
 * rendering stays thread-safe. Scopes follow Jinja2: a for loop's body gets a fresh scope
 * per iteration whose reads fall back to the enclosing one, a macro call gets a scope over
 * the macro's defining scope, `if` makes none.
 *
 * Not supported, each an error that names it: printf-style `%` on strings, str.format with
 * format specs, the filters filesizeformat, format, groupby, pprint, random, slice,
 * striptags, urlencode, urlize, wordwrap, xmlattr, the tags include/import/extends/block/
 * call/autoescape, recursive loops, cycler/joiner/lipsum, \N{...} escapes, integers past 64
 * bits, printing what Python prints with an address (generators, methods). Known
 * differences: Markup (|safe) survives `+`, indexing and the methods that only reshape
 * text, but replace/join/format do not escape their arguments into it; `is sameas` is
 * identity only for None, booleans and small ints; character classes and case mappings
 * are utf8proc's (Unicode 13) with every case mapping where Python 3.11 (Unicode 14)
 * differs patched in.
 */
#include "format/jinja.h"

#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <utf8proc.h>

#include "core/error.h"

#define JINJA_MAX_PARSE_DEPTH 300 /* parser recursion (3 per bracket level) */
#define JINJA_MAX_RANGE 100000    /* the sandbox's MAX_RANGE */

/* ---- failure, memory ---------------------------------------------------------------- */

/* Where a failure unwinds to: the entry point (compile or render) that set jb. */
typedef struct {
    jmp_buf jb;
    ferry_status code;
    const char *name; /* the template's name, prefixing messages */
} jcatch;

static void jthrow_v(jcatch *c, ferry_status code, int32_t line, const char *fmt, va_list ap)
{
    char msg[900];
    vsnprintf(msg, sizeof msg, fmt, ap);
    if (line > 0)
        ferry_fail(code, "%s line %d: %s", c->name, (int)line, msg);
    else
        ferry_fail(code, "%s: %s", c->name, msg);
    c->code = code;
}

static _Noreturn FERRY_PRINTF(4, 5) void jthrow(jcatch *c, ferry_status code, int32_t line,
                                                const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    jthrow_v(c, code, line, fmt, ap);
    va_end(ap);
    longjmp(c->jb, 1);
}

typedef struct pool_chunk {
    struct pool_chunk *next;
    size_t used, cap;
    max_align_t data[];
} pool_chunk;

/* A bump allocator: chunks of 64 KiB (or one chunk per larger request). */
typedef struct {
    pool_chunk *head;
    size_t total; /* bytes of all chunks */
    size_t limit; /* 0: none */
    jcatch *c;
} pool;

static void pool_free_all(pool *p)
{
    pool_chunk *ch = p->head;
    while (ch) {
        pool_chunk *next = ch->next;
        free(ch);
        ch = next;
    }
    p->head = NULL;
    p->total = 0;
}

static pool_chunk *pool_new_chunk(pool *p, size_t cap)
{
    if (p->limit && p->total + cap + sizeof(pool_chunk) > p->limit)
        jthrow(p->c, FERRY_ERR_INVALID, 0,
               "rendering needs more than %zu bytes of memory (the limit)", p->limit);
    pool_chunk *nc = malloc(sizeof(pool_chunk) + cap);
    if (!nc)
        jthrow(p->c, FERRY_ERR_NOMEM, 0, "out of memory (%zu bytes)", cap);
    nc->used = 0;
    nc->cap = cap;
    p->total += cap + sizeof(pool_chunk);
    return nc;
}

static void *pool_alloc(pool *p, size_t n)
{
    const size_t align = sizeof(max_align_t);
    if (n > SIZE_MAX / 2)
        jthrow(p->c, FERRY_ERR_NOMEM, 0, "out of memory (%zu bytes)", n);
    n = n ? (n + align - 1) / align * align : align;
    pool_chunk *ch = p->head;
    if (n > 4096) { /* its own chunk, behind the one being filled */
        pool_chunk *nc = pool_new_chunk(p, n);
        nc->used = n;
        if (ch) {
            nc->next = ch->next;
            ch->next = nc;
        } else {
            nc->next = NULL;
            p->head = nc;
        }
        return nc->data;
    }
    if (!ch || ch->cap - ch->used < n) {
        pool_chunk *nc = pool_new_chunk(p, 65536 - sizeof(pool_chunk));
        nc->next = ch;
        p->head = nc;
        ch = nc;
    }
    void *r = (char *)ch->data + ch->used;
    ch->used += n;
    return r;
}

static void *pool_zalloc(pool *p, size_t n)
{
    void *r = pool_alloc(p, n);
    memset(r, 0, n);
    return r;
}

static void *pool_array(pool *p, size_t n, size_t size)
{
    if (size && n > SIZE_MAX / 2 / size)
        jthrow(p->c, FERRY_ERR_INVALID, 0, "an array of %zu elements is too large", n);
    return pool_alloc(p, n * size);
}

static char *pool_strdup(pool *p, const char *s, size_t n)
{
    char *r = pool_alloc(p, n + 1);
    memcpy(r, s, n);
    r[n] = 0;
    return r;
}

/* ---- growable byte buffers ---------------------------------------------------------- */

/* A malloc'd buffer with a size limit. A render's buffers are on its open list (sbuf_new,
 * sbuf_close), so an unwinding error frees them. */
typedef struct sbuf {
    char *p;
    size_t n, cap, limit;
    struct sbuf *prev_open;
    jcatch *c;
} sbuf;

static void sbuf_grow(sbuf *b, size_t extra)
{
    if (extra > b->limit || b->n > b->limit - extra)
        jthrow(b->c, FERRY_ERR_INVALID, 0, "the output would be larger than %zu bytes (the limit)",
               b->limit);
    size_t need = b->n + extra + 1;
    if (need <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    char *np = realloc(b->p, cap);
    if (!np)
        jthrow(b->c, FERRY_ERR_NOMEM, 0, "out of memory (%zu bytes of output)", cap);
    b->p = np;
    b->cap = cap;
}

static void sbuf_put(sbuf *b, const char *s, size_t n)
{
    if (!n)
        return;
    sbuf_grow(b, n);
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void sbuf_putc(sbuf *b, char ch) { sbuf_put(b, &ch, 1); }

static void sbuf_puts(sbuf *b, const char *s) { sbuf_put(b, s, strlen(s)); }

static FERRY_PRINTF(2, 3) void sbuf_printf(sbuf *b, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    sbuf_put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* ---- UTF-8 and Python's character classes ------------------------------------------- */

/* Decodes one code point at s[i..n); invalid bytes decode as themselves + 0xDC00 (Python's
 * surrogateescape), one byte each. Returns the length consumed. */
static size_t utf8_next(const char *s, size_t n, size_t i, int32_t *cp)
{
    utf8proc_int32_t c;
    utf8proc_ssize_t k =
        utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &c);
    if (k <= 0) {
        *cp = 0xDC00 + (unsigned char)s[i];
        return 1;
    }
    *cp = c;
    return (size_t)k;
}

static size_t utf8_put(char *dst, int32_t cp)
{
    if (cp >= 0xDC80 && cp <= 0xDCFF) { /* an escaped invalid byte goes back as it was */
        dst[0] = (char)(cp - 0xDC00);
        return 1;
    }
    return (size_t)utf8proc_encode_char(cp, (utf8proc_uint8_t *)dst);
}

static void sbuf_put_cp(sbuf *b, int32_t cp)
{
    char tmp[4];
    sbuf_put(b, tmp, utf8_put(tmp, cp));
}

static size_t utf8_count(const char *s, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        unsigned char ch = (unsigned char)s[i];
        if (ch < 0x80) {
            i++;
        } else {
            int32_t cp;
            i += utf8_next(s, n, i, &cp);
        }
        k++;
    }
    return k;
}

/* Python's str.isspace(): the whitespace str.split(), str.strip() and re's \s use. */
static bool py_isspace(int32_t c)
{
    if (c < 0x80)
        return c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f);
    return c == 0x85 || c == 0xa0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 ||
           c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

/* Python's line boundaries (str.splitlines). */
static bool py_islinebreak(int32_t c)
{
    return c == '\n' || c == '\r' || c == 0x0b || c == 0x0c || c == 0x1c || c == 0x1d ||
           c == 0x1e || c == 0x85 || c == 0x2028 || c == 0x2029;
}

/* Python's str.isprintable() for one character (what repr() leaves unescaped). */
static bool py_isprintable(int32_t c)
{
    if (c < 0x80)
        return c >= 0x20 && c < 0x7f;
    if (c >= 0xDC80 && c <= 0xDCFF)
        return false;
    switch (utf8proc_category(c)) {
    case UTF8PROC_CATEGORY_CC:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO:
    case UTF8PROC_CATEGORY_CN:
    case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP:
    case UTF8PROC_CATEGORY_ZS: return false;
    default: return true;
    }
}

static bool py_isalpha(int32_t c)
{
    if (c < 0x80)
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LL || k == UTF8PROC_CATEGORY_LT ||
           k == UTF8PROC_CATEGORY_LM || k == UTF8PROC_CATEGORY_LO;
}

static bool py_isdecimal(int32_t c)
{
    if (c < 0x80)
        return c >= '0' && c <= '9';
    return utf8proc_category(c) == UTF8PROC_CATEGORY_ND;
}

/* str.isdigit / isnumeric are wider than isdecimal (superscripts, fractions). */
static bool py_isnumeric(int32_t c)
{
    if (c < 0x80)
        return c >= '0' && c <= '9';
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_ND || k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_NO;
}

static bool py_isalnum(int32_t c) { return py_isalpha(c) || py_isnumeric(c); }

/* \w of Python's re for str patterns: alphanumerics and the underscore. */
static bool py_isword(int32_t c) { return c == '_' || py_isalnum(c); }

static bool py_iscased_lower(int32_t c)
{
    return utf8proc_category(c) == UTF8PROC_CATEGORY_LL || utf8proc_toupper(c) != c;
}

static bool py_iscased_upper(int32_t c)
{
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LT || utf8proc_tolower(c) != c;
}

/* Every character whose case mappings in Python (3.11, Unicode 14: str.upper/lower/title,
 * with SpecialCasing's one-to-many mappings) differ from utf8proc's simple ones, generated
 * by comparing the two over all code points; NULL where they agree. */
typedef struct {
    int32_t c;
    const char *upper, *title, *lower;
} special_case;

static const special_case special_cases[] = {
    {0x00DF, "\x53\x53", "\x53\x73", NULL},
    {0x0130, NULL, NULL, "\x69\xCC\x87"},
    {0x0149, "\xCA\xBC\x4E", "\xCA\xBC\x4E", NULL},
    {0x01F0, "\x4A\xCC\x8C", "\x4A\xCC\x8C", NULL},
    {0x0390, "\xCE\x99\xCC\x88\xCC\x81", "\xCE\x99\xCC\x88\xCC\x81", NULL},
    {0x03B0, "\xCE\xA5\xCC\x88\xCC\x81", "\xCE\xA5\xCC\x88\xCC\x81", NULL},
    {0x0587, "\xD4\xB5\xD5\x92", "\xD4\xB5\xD6\x82", NULL},
    {0x1E96, "\x48\xCC\xB1", "\x48\xCC\xB1", NULL},
    {0x1E97, "\x54\xCC\x88", "\x54\xCC\x88", NULL},
    {0x1E98, "\x57\xCC\x8A", "\x57\xCC\x8A", NULL},
    {0x1E99, "\x59\xCC\x8A", "\x59\xCC\x8A", NULL},
    {0x1E9A, "\x41\xCA\xBE", "\x41\xCA\xBE", NULL},
    {0x1F50, "\xCE\xA5\xCC\x93", "\xCE\xA5\xCC\x93", NULL},
    {0x1F52, "\xCE\xA5\xCC\x93\xCC\x80", "\xCE\xA5\xCC\x93\xCC\x80", NULL},
    {0x1F54, "\xCE\xA5\xCC\x93\xCC\x81", "\xCE\xA5\xCC\x93\xCC\x81", NULL},
    {0x1F56, "\xCE\xA5\xCC\x93\xCD\x82", "\xCE\xA5\xCC\x93\xCD\x82", NULL},
    {0x1F80, "\xE1\xBC\x88\xCE\x99", NULL, NULL},
    {0x1F81, "\xE1\xBC\x89\xCE\x99", NULL, NULL},
    {0x1F82, "\xE1\xBC\x8A\xCE\x99", NULL, NULL},
    {0x1F83, "\xE1\xBC\x8B\xCE\x99", NULL, NULL},
    {0x1F84, "\xE1\xBC\x8C\xCE\x99", NULL, NULL},
    {0x1F85, "\xE1\xBC\x8D\xCE\x99", NULL, NULL},
    {0x1F86, "\xE1\xBC\x8E\xCE\x99", NULL, NULL},
    {0x1F87, "\xE1\xBC\x8F\xCE\x99", NULL, NULL},
    {0x1F88, "\xE1\xBC\x88\xCE\x99", NULL, NULL},
    {0x1F89, "\xE1\xBC\x89\xCE\x99", NULL, NULL},
    {0x1F8A, "\xE1\xBC\x8A\xCE\x99", NULL, NULL},
    {0x1F8B, "\xE1\xBC\x8B\xCE\x99", NULL, NULL},
    {0x1F8C, "\xE1\xBC\x8C\xCE\x99", NULL, NULL},
    {0x1F8D, "\xE1\xBC\x8D\xCE\x99", NULL, NULL},
    {0x1F8E, "\xE1\xBC\x8E\xCE\x99", NULL, NULL},
    {0x1F8F, "\xE1\xBC\x8F\xCE\x99", NULL, NULL},
    {0x1F90, "\xE1\xBC\xA8\xCE\x99", NULL, NULL},
    {0x1F91, "\xE1\xBC\xA9\xCE\x99", NULL, NULL},
    {0x1F92, "\xE1\xBC\xAA\xCE\x99", NULL, NULL},
    {0x1F93, "\xE1\xBC\xAB\xCE\x99", NULL, NULL},
    {0x1F94, "\xE1\xBC\xAC\xCE\x99", NULL, NULL},
    {0x1F95, "\xE1\xBC\xAD\xCE\x99", NULL, NULL},
    {0x1F96, "\xE1\xBC\xAE\xCE\x99", NULL, NULL},
    {0x1F97, "\xE1\xBC\xAF\xCE\x99", NULL, NULL},
    {0x1F98, "\xE1\xBC\xA8\xCE\x99", NULL, NULL},
    {0x1F99, "\xE1\xBC\xA9\xCE\x99", NULL, NULL},
    {0x1F9A, "\xE1\xBC\xAA\xCE\x99", NULL, NULL},
    {0x1F9B, "\xE1\xBC\xAB\xCE\x99", NULL, NULL},
    {0x1F9C, "\xE1\xBC\xAC\xCE\x99", NULL, NULL},
    {0x1F9D, "\xE1\xBC\xAD\xCE\x99", NULL, NULL},
    {0x1F9E, "\xE1\xBC\xAE\xCE\x99", NULL, NULL},
    {0x1F9F, "\xE1\xBC\xAF\xCE\x99", NULL, NULL},
    {0x1FA0, "\xE1\xBD\xA8\xCE\x99", NULL, NULL},
    {0x1FA1, "\xE1\xBD\xA9\xCE\x99", NULL, NULL},
    {0x1FA2, "\xE1\xBD\xAA\xCE\x99", NULL, NULL},
    {0x1FA3, "\xE1\xBD\xAB\xCE\x99", NULL, NULL},
    {0x1FA4, "\xE1\xBD\xAC\xCE\x99", NULL, NULL},
    {0x1FA5, "\xE1\xBD\xAD\xCE\x99", NULL, NULL},
    {0x1FA6, "\xE1\xBD\xAE\xCE\x99", NULL, NULL},
    {0x1FA7, "\xE1\xBD\xAF\xCE\x99", NULL, NULL},
    {0x1FA8, "\xE1\xBD\xA8\xCE\x99", NULL, NULL},
    {0x1FA9, "\xE1\xBD\xA9\xCE\x99", NULL, NULL},
    {0x1FAA, "\xE1\xBD\xAA\xCE\x99", NULL, NULL},
    {0x1FAB, "\xE1\xBD\xAB\xCE\x99", NULL, NULL},
    {0x1FAC, "\xE1\xBD\xAC\xCE\x99", NULL, NULL},
    {0x1FAD, "\xE1\xBD\xAD\xCE\x99", NULL, NULL},
    {0x1FAE, "\xE1\xBD\xAE\xCE\x99", NULL, NULL},
    {0x1FAF, "\xE1\xBD\xAF\xCE\x99", NULL, NULL},
    {0x1FB2, "\xE1\xBE\xBA\xCE\x99", "\xE1\xBE\xBA\xCD\x85", NULL},
    {0x1FB3, "\xCE\x91\xCE\x99", NULL, NULL},
    {0x1FB4, "\xCE\x86\xCE\x99", "\xCE\x86\xCD\x85", NULL},
    {0x1FB6, "\xCE\x91\xCD\x82", "\xCE\x91\xCD\x82", NULL},
    {0x1FB7, "\xCE\x91\xCD\x82\xCE\x99", "\xCE\x91\xCD\x82\xCD\x85", NULL},
    {0x1FBC, "\xCE\x91\xCE\x99", NULL, NULL},
    {0x1FC2, "\xE1\xBF\x8A\xCE\x99", "\xE1\xBF\x8A\xCD\x85", NULL},
    {0x1FC3, "\xCE\x97\xCE\x99", NULL, NULL},
    {0x1FC4, "\xCE\x89\xCE\x99", "\xCE\x89\xCD\x85", NULL},
    {0x1FC6, "\xCE\x97\xCD\x82", "\xCE\x97\xCD\x82", NULL},
    {0x1FC7, "\xCE\x97\xCD\x82\xCE\x99", "\xCE\x97\xCD\x82\xCD\x85", NULL},
    {0x1FCC, "\xCE\x97\xCE\x99", NULL, NULL},
    {0x1FD2, "\xCE\x99\xCC\x88\xCC\x80", "\xCE\x99\xCC\x88\xCC\x80", NULL},
    {0x1FD3, "\xCE\x99\xCC\x88\xCC\x81", "\xCE\x99\xCC\x88\xCC\x81", NULL},
    {0x1FD6, "\xCE\x99\xCD\x82", "\xCE\x99\xCD\x82", NULL},
    {0x1FD7, "\xCE\x99\xCC\x88\xCD\x82", "\xCE\x99\xCC\x88\xCD\x82", NULL},
    {0x1FE2, "\xCE\xA5\xCC\x88\xCC\x80", "\xCE\xA5\xCC\x88\xCC\x80", NULL},
    {0x1FE3, "\xCE\xA5\xCC\x88\xCC\x81", "\xCE\xA5\xCC\x88\xCC\x81", NULL},
    {0x1FE4, "\xCE\xA1\xCC\x93", "\xCE\xA1\xCC\x93", NULL},
    {0x1FE6, "\xCE\xA5\xCD\x82", "\xCE\xA5\xCD\x82", NULL},
    {0x1FE7, "\xCE\xA5\xCC\x88\xCD\x82", "\xCE\xA5\xCC\x88\xCD\x82", NULL},
    {0x1FF2, "\xE1\xBF\xBA\xCE\x99", "\xE1\xBF\xBA\xCD\x85", NULL},
    {0x1FF3, "\xCE\xA9\xCE\x99", NULL, NULL},
    {0x1FF4, "\xCE\x8F\xCE\x99", "\xCE\x8F\xCD\x85", NULL},
    {0x1FF6, "\xCE\xA9\xCD\x82", "\xCE\xA9\xCD\x82", NULL},
    {0x1FF7, "\xCE\xA9\xCD\x82\xCE\x99", "\xCE\xA9\xCD\x82\xCD\x85", NULL},
    {0x1FFC, "\xCE\xA9\xCE\x99", NULL, NULL},
    {0xFB00, "\x46\x46", "\x46\x66", NULL},
    {0xFB01, "\x46\x49", "\x46\x69", NULL},
    {0xFB02, "\x46\x4C", "\x46\x6C", NULL},
    {0xFB03, "\x46\x46\x49", "\x46\x66\x69", NULL},
    {0xFB04, "\x46\x46\x4C", "\x46\x66\x6C", NULL},
    {0xFB05, "\x53\x54", "\x53\x74", NULL},
    {0xFB06, "\x53\x54", "\x53\x74", NULL},
    {0xFB13, "\xD5\x84\xD5\x86", "\xD5\x84\xD5\xB6", NULL},
    {0xFB14, "\xD5\x84\xD4\xB5", "\xD5\x84\xD5\xA5", NULL},
    {0xFB15, "\xD5\x84\xD4\xBB", "\xD5\x84\xD5\xAB", NULL},
    {0xFB16, "\xD5\x8E\xD5\x86", "\xD5\x8E\xD5\xB6", NULL},
    {0xFB17, "\xD5\x84\xD4\xBD", "\xD5\x84\xD5\xAD", NULL},
};

static const special_case *find_special_case(int32_t c)
{
    size_t lo = 0, hi = sizeof special_cases / sizeof special_cases[0];
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (special_cases[mid].c < c)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < sizeof special_cases / sizeof special_cases[0] && special_cases[lo].c == c)
        return &special_cases[lo];
    return NULL;
}

enum { CASE_UPPER, CASE_LOWER, CASE_TITLE };

static void sbuf_put_case(sbuf *b, int32_t c, int mode)
{
    if (c < 0x80) {
        if (mode == CASE_LOWER && c >= 'A' && c <= 'Z')
            c += 32;
        else if (mode != CASE_LOWER && c >= 'a' && c <= 'z')
            c -= 32;
        sbuf_putc(b, (char)c);
        return;
    }
    const special_case *sc = find_special_case(c);
    const char *m = !sc                  ? NULL
                    : mode == CASE_UPPER ? sc->upper
                    : mode == CASE_TITLE ? sc->title
                                         : sc->lower;
    if (m) {
        sbuf_puts(b, m);
        return;
    }
    sbuf_put_cp(b, mode == CASE_UPPER   ? utf8proc_toupper(c)
                   : mode == CASE_TITLE ? utf8proc_totitle(c)
                                        : utf8proc_tolower(c));
}

/* Python's str.lower() also maps a capital sigma to the final form at the end of a word. */
static bool final_sigma(const char *s, size_t n, size_t at, size_t len)
{
    /* preceded by a cased letter (skipping case-ignorable), not followed by one */
    size_t i = at;
    bool before = false;
    while (i > 0) {
        size_t j = i - 1;
        while (j > 0 && ((unsigned char)s[j] & 0xC0) == 0x80)
            j--;
        int32_t cp;
        utf8_next(s, n, j, &cp);
        utf8proc_category_t k = utf8proc_category(cp);
        if (k == UTF8PROC_CATEGORY_MN || k == UTF8PROC_CATEGORY_ME || k == UTF8PROC_CATEGORY_CF ||
            k == UTF8PROC_CATEGORY_LM || k == UTF8PROC_CATEGORY_SK || cp == '\'' || cp == 0x2019 ||
            cp == 0xAD) {
            i = j;
            continue;
        }
        before = py_iscased_lower(cp) || py_iscased_upper(cp);
        break;
    }
    if (!before)
        return false;
    for (i = at + len; i < n;) {
        int32_t cp;
        size_t k2 = utf8_next(s, n, i, &cp);
        utf8proc_category_t k = utf8proc_category(cp);
        if (k == UTF8PROC_CATEGORY_MN || k == UTF8PROC_CATEGORY_ME || k == UTF8PROC_CATEGORY_CF ||
            k == UTF8PROC_CATEGORY_LM || k == UTF8PROC_CATEGORY_SK || cp == '\'' || cp == 0x2019 ||
            cp == 0xAD) {
            i += k2;
            continue;
        }
        return !(py_iscased_lower(cp) || py_iscased_upper(cp));
    }
    return true;
}

/* ---- Python's float repr ------------------------------------------------------------ */

/* repr(x) of a Python float: the shortest digits that read back as x, in fixed notation
 * when the decimal exponent is in [-4, 16), else as d.ddde+XX. */
static void format_py_float(sbuf *b, double x)
{
    if (isnan(x)) {
        sbuf_puts(b, "nan");
        return;
    }
    if (isinf(x)) {
        sbuf_puts(b, x < 0 ? "-inf" : "inf");
        return;
    }
    char tmp[64];
    int prec;
    for (prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec - 1, x);
        if (strtod(tmp, NULL) == x)
            break;
    }
    /* tmp: [-]d[.ddd]e[+-]XX */
    const char *p = tmp;
    bool neg = false;
    if (*p == '-') {
        neg = true;
        p++;
    }
    char digits[32];
    int nd = 0;
    while (*p && *p != 'e') {
        if (*p != '.')
            digits[nd++] = *p;
        p++;
    }
    int exp10 = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    int decpt = exp10 + 1;
    if (neg)
        sbuf_putc(b, '-');
    if (decpt <= -4 || decpt > 16) {
        sbuf_putc(b, digits[0]);
        if (nd > 1) {
            sbuf_putc(b, '.');
            sbuf_put(b, digits + 1, (size_t)nd - 1);
        }
        sbuf_printf(b, "e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
    } else if (decpt <= 0) {
        sbuf_puts(b, "0.");
        for (int i = 0; i < -decpt; i++)
            sbuf_putc(b, '0');
        sbuf_put(b, digits, (size_t)nd);
    } else if (decpt >= nd) {
        sbuf_put(b, digits, (size_t)nd);
        for (int i = nd; i < decpt; i++)
            sbuf_putc(b, '0');
        sbuf_puts(b, ".0");
    } else {
        sbuf_put(b, digits, (size_t)decpt);
        sbuf_putc(b, '.');
        sbuf_put(b, digits + decpt, (size_t)(nd - decpt));
    }
}

/* ---- values ------------------------------------------------------------------------- */

typedef struct node node;
typedef struct frame frame;
typedef struct jlist jlist;
typedef struct jdict jdict;
typedef struct jiter jiter;
typedef struct jmacro jmacro;
typedef struct jloop jloop;

typedef enum {
    JV_UNDEF, /* Jinja2's Undefined; u.msg the hint its errors give */
    JV_NONE,
    JV_BOOL,
    JV_INT, /* 64-bit; Python's ints are unbounded, so an overflow fails the render */
    JV_FLOAT,
    JV_STR,  /* UTF-8, immutable; f: STR_MARKUP after |safe */
    JV_LIST, /* f: LK_LIST, LK_TUPLE or LK_RANGE (a range() object, printed as one) */
    JV_DICT, /* insertion ordered */
    JV_NS,   /* namespace(): a dict that `set ns.x` writes */
    JV_ITER, /* a one-shot iterator: the generators of map/select/..., reversed() */
    JV_VIEW, /* dict.items()/keys()/values(); f: VIEW_* */
    JV_MACRO,
    JV_FUNC, /* a builtin: fn the function, u.self the bound object or NULL */
    JV_LOOP, /* the `loop` of a for loop */
} jtype;

enum { STR_MARKUP = 1 };
enum { LK_LIST = 0, LK_TUPLE = 1, LK_RANGE = 2 };
enum { VIEW_ITEMS, VIEW_KEYS, VIEW_VALUES };
enum { UNDEF_PLAIN = 0, UNDEF_UNSAFE = 1 }; /* UNSAFE: a sandbox violation when used */

typedef struct jval {
    uint8_t t;
    uint8_t f;
    uint16_t fn;
    union {
        bool b;
        int64_t i;
        double dbl;
        struct {
            const char *p;
            size_t n;
        } s;
        jlist *list;
        jdict *dict;
        jiter *it;
        jmacro *macro;
        jloop *loop;
        const char *msg;
        const struct jval *self;
    } u;
} jval;

struct jlist {
    jval *v;
    size_t n, cap;
    int64_t r_start, r_stop, r_step; /* LK_RANGE */
};

struct jdict {
    jval *k, *v;
    size_t n, cap;
    uint32_t *slots; /* open-addressing index (1 + entry), built past 8 entries */
    size_t n_slots;
};

struct jmacro {
    const node *def;
    frame *closure;
};

struct jiter {
    jval *v;
    size_t n, pos;
    const char *type_name; /* "generator", "list_reverseiterator" */
};

typedef struct {
    const char *p;
    size_t n;
} strv;

#define STRV(lit) ((strv){lit, sizeof(lit) - 1})

static bool strv_eq(strv a, const char *lit)
{
    size_t n = strlen(lit);
    return a.n == n && memcmp(a.p, lit, n) == 0;
}

static bool strv_same(strv a, strv b) { return a.n == b.n && (!a.n || !memcmp(a.p, b.p, a.n)); }

/* The render: its catch point, pool, limits, counters, output and scopes. */
typedef struct rctx {
    jcatch c;
    pool mem;
    ferry_jinja_limits lim;
    int64_t steps;
    int32_t depth;
    sbuf *out;                          /* where output goes now */
    sbuf *open_bufs;                    /* every open buffer, freed by an unwinding error */
    const struct repr_guard *repr_open; /* the dicts being printed now */
    frame *globals;
    frame *root;
} rctx;

static _Noreturn FERRY_PRINTF(3, 4) void rfail(rctx *r, int32_t line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    jthrow_v(&r->c, FERRY_ERR_INVALID, line, fmt, ap);
    va_end(ap);
    longjmp(r->c.jb, 1);
}

static _Noreturn FERRY_PRINTF(3, 4) void runsupported(rctx *r, int32_t line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    jthrow_v(&r->c, FERRY_ERR_UNSUPPORTED, line, fmt, ap);
    va_end(ap);
    longjmp(r->c.jb, 1);
}

static inline jval mk_none(void) { return (jval){.t = JV_NONE}; }
static inline jval mk_bool(bool b) { return (jval){.t = JV_BOOL, .u.b = b}; }
static inline jval mk_int(int64_t i) { return (jval){.t = JV_INT, .u.i = i}; }
static inline jval mk_float(double d) { return (jval){.t = JV_FLOAT, .u.dbl = d}; }

static inline jval mk_str(const char *p, size_t n)
{
    jval v = {.t = JV_STR};
    v.u.s.p = p;
    v.u.s.n = n;
    return v;
}

static inline jval mk_strv(strv s) { return mk_str(s.p, s.n); }

static jval mk_undef_msg(const char *msg)
{
    jval v = {.t = JV_UNDEF};
    v.u.msg = msg;
    return v;
}

static FERRY_PRINTF(2, 3) jval mk_undef(rctx *r, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof tmp)
        n = sizeof tmp - 1;
    return mk_undef_msg(pool_strdup(&r->mem, tmp, (size_t)n));
}

static jval mk_list(rctx *r, size_t cap, uint8_t kind)
{
    jlist *l = pool_zalloc(&r->mem, sizeof *l);
    l->cap = cap;
    l->v = cap ? pool_array(&r->mem, cap, sizeof(jval)) : NULL;
    jval v = {.t = JV_LIST, .f = kind};
    v.u.list = l;
    return v;
}

static void list_push(rctx *r, jlist *l, jval x)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 4;
        jval *nv = pool_array(&r->mem, cap, sizeof(jval));
        if (l->n)
            memcpy(nv, l->v, l->n * sizeof(jval));
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = x;
}

static jval mk_tuple2(rctx *r, jval a, jval b)
{
    jval t = mk_list(r, 2, LK_TUPLE);
    t.u.list->v[0] = a;
    t.u.list->v[1] = b;
    t.u.list->n = 2;
    return t;
}

static jval mk_dict(rctx *r)
{
    jval v = {.t = JV_DICT};
    v.u.dict = pool_zalloc(&r->mem, sizeof(jdict));
    return v;
}

static jval mk_iter(rctx *r, jval *items, size_t n, const char *type_name)
{
    jiter *it = pool_zalloc(&r->mem, sizeof *it);
    it->v = items;
    it->n = n;
    it->type_name = type_name;
    jval v = {.t = JV_ITER};
    v.u.it = it;
    return v;
}

static const char *type_name(const jval *v)
{
    switch ((jtype)v->t) {
    case JV_UNDEF: return "Undefined";
    case JV_NONE: return "NoneType";
    case JV_BOOL: return "bool";
    case JV_INT: return "int";
    case JV_FLOAT: return "float";
    case JV_STR: return v->f & STR_MARKUP ? "Markup" : "str";
    case JV_LIST: return v->f == LK_TUPLE ? "tuple" : v->f == LK_RANGE ? "range" : "list";
    case JV_DICT: return "dict";
    case JV_NS: return "Namespace";
    case JV_ITER: return v->u.it->type_name;
    case JV_VIEW:
        return v->f == VIEW_ITEMS ? "dict_items" : v->f == VIEW_KEYS ? "dict_keys" : "dict_values";
    case JV_MACRO: return "Macro";
    case JV_FUNC: return "builtin_function_or_method";
    case JV_LOOP: return "LoopContext";
    }
    return "object";
}

/* Jinja2's object_type_repr, for undefined-attribute hints. */
static const char *object_type_repr(const jval *v)
{
    switch ((jtype)v->t) {
    case JV_NONE: return "None";
    case JV_DICT: return "dict object";
    case JV_LIST: return v->f == LK_TUPLE ? "tuple object" : "list object";
    case JV_STR: return "str object";
    case JV_INT: return "int object";
    case JV_FLOAT: return "float object";
    case JV_BOOL: return "bool object";
    default: return "object";
    }
}

/* The undefined's error when it is used as a value (Jinja2's UndefinedError). */
static _Noreturn void fail_undefined(rctx *r, int32_t line, const jval *v)
{
    rfail(r, line, "%s", v->u.msg ? v->u.msg : "a value is undefined");
}

static bool truthy(const jval *v)
{
    switch ((jtype)v->t) {
    case JV_UNDEF:
    case JV_NONE: return false;
    case JV_BOOL: return v->u.b;
    case JV_INT: return v->u.i != 0;
    case JV_FLOAT: return v->u.dbl != 0.0;
    case JV_STR: return v->u.s.n != 0;
    case JV_LIST: return v->u.list->n != 0;
    case JV_DICT:
    case JV_VIEW: return v->u.dict->n != 0;
    default: return true;
    }
}

static bool is_number(const jval *v)
{
    return v->t == JV_INT || v->t == JV_FLOAT || v->t == JV_BOOL;
}

static double num_as_double(const jval *v)
{
    return v->t == JV_FLOAT ? v->u.dbl : v->t == JV_INT ? (double)v->u.i : (double)v->u.b;
}

static int64_t num_as_int(const jval *v) { return v->t == JV_INT ? v->u.i : (int64_t)v->u.b; }

/* ---- hashing and equality (Python's) ------------------------------------------------- */

static uint64_t hash_bytes(const char *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)p[i]) * 1099511628211ull;
    return h;
}

static uint64_t hash_int(int64_t i)
{
    uint64_t x = (uint64_t)i * 0x9E3779B97F4A7C15ull;
    return x ^ (x >> 29);
}

static uint64_t py_hash(rctx *r, int32_t line, const jval *v)
{
    switch ((jtype)v->t) {
    case JV_NONE: return 0x1234567;
    case JV_UNDEF: return 0x7654321;
    case JV_BOOL: return hash_int(v->u.b);
    case JV_INT: return hash_int(v->u.i);
    case JV_FLOAT: {
        double d = v->u.dbl;
        if (d == floor(d) && fabs(d) < 9.2e18) /* equal to an int: hash as that int */
            return hash_int((int64_t)d);
        uint64_t bits;
        memcpy(&bits, &d, sizeof bits);
        return hash_int((int64_t)bits);
    }
    case JV_STR: return hash_bytes(v->u.s.p, v->u.s.n);
    case JV_LIST:
        if (v->f != LK_LIST) {
            uint64_t h = 0x345678;
            for (size_t i = 0; i < v->u.list->n; i++)
                h = (h ^ py_hash(r, line, &v->u.list->v[i])) * 1000003ull;
            return h;
        }
        break;
    default: break;
    }
    rfail(r, line, "unhashable type: '%s'", type_name(v));
}

static bool py_eq(const jval *a, const jval *b);

static bool list_eq(const jlist *a, const jlist *b)
{
    if (a->n != b->n)
        return false;
    for (size_t i = 0; i < a->n; i++)
        if (!py_eq(&a->v[i], &b->v[i]))
            return false;
    return true;
}

static const jval *dict_get_eq(const jdict *d, const jval *k);

static bool dict_eq(const jdict *a, const jdict *b)
{
    if (a->n != b->n)
        return false;
    for (size_t i = 0; i < a->n; i++) {
        const jval *w = dict_get_eq(b, &a->k[i]);
        if (!w || !py_eq(&a->v[i], w))
            return false;
    }
    return true;
}

static bool py_eq(const jval *a, const jval *b)
{
    if (is_number(a) && is_number(b)) {
        if (a->t != JV_FLOAT && b->t != JV_FLOAT)
            return num_as_int(a) == num_as_int(b);
        return num_as_double(a) == num_as_double(b);
    }
    if (a->t != b->t)
        return false;
    switch ((jtype)a->t) {
    case JV_UNDEF:
    case JV_NONE: return true;
    case JV_STR: return a->u.s.n == b->u.s.n && !memcmp(a->u.s.p, b->u.s.p, a->u.s.n);
    case JV_LIST:
        if ((a->f == LK_TUPLE) != (b->f == LK_TUPLE))
            return false;
        return list_eq(a->u.list, b->u.list);
    case JV_DICT: return dict_eq(a->u.dict, b->u.dict);
    case JV_NS: return a->u.dict == b->u.dict;
    case JV_ITER: return a->u.it == b->u.it;
    case JV_MACRO: return a->u.macro == b->u.macro;
    case JV_LOOP: return a->u.loop == b->u.loop;
    case JV_FUNC: return a->fn == b->fn && a->u.self == b->u.self;
    case JV_VIEW: return a->f == b->f && a->u.dict == b->u.dict;
    default: return false;
    }
}

/* Keys of the dict: linear search when small, the index past 8 entries. The index needs a
 * hash, and only hashable keys are ever stored, so lookups with an unhashable key simply
 * find nothing (Python raises; callers check hashability first where it matters). */
static uint64_t hash_quiet(const jval *v)
{
    switch ((jtype)v->t) {
    case JV_NONE: return 0x1234567;
    case JV_UNDEF: return 0x7654321;
    case JV_BOOL: return hash_int(v->u.b);
    case JV_INT: return hash_int(v->u.i);
    case JV_FLOAT: {
        double d = v->u.dbl;
        if (d == floor(d) && fabs(d) < 9.2e18)
            return hash_int((int64_t)d);
        uint64_t bits;
        memcpy(&bits, &d, sizeof bits);
        return hash_int((int64_t)bits);
    }
    case JV_STR: return hash_bytes(v->u.s.p, v->u.s.n);
    case JV_LIST: {
        uint64_t h = 0x345678;
        for (size_t i = 0; i < v->u.list->n; i++)
            h = (h ^ hash_quiet(&v->u.list->v[i])) * 1000003ull;
        return h;
    }
    default: return 0;
    }
}

static long dict_find(const jdict *d, const jval *k)
{
    if (!d->slots) {
        for (size_t i = 0; i < d->n; i++)
            if (py_eq(&d->k[i], k))
                return (long)i;
        return -1;
    }
    size_t mask = d->n_slots - 1;
    for (size_t s = hash_quiet(k) & mask;; s = (s + 1) & mask) {
        uint32_t e = d->slots[s];
        if (!e)
            return -1;
        if (py_eq(&d->k[e - 1], k))
            return (long)(e - 1);
    }
}

static const jval *dict_get_eq(const jdict *d, const jval *k)
{
    long i = dict_find(d, k);
    return i < 0 ? NULL : &d->v[i];
}

static const jval *dict_get_str(const jdict *d, const char *p, size_t n)
{
    jval k = mk_str(p, n);
    return dict_get_eq(d, &k);
}

static void dict_reindex(rctx *r, jdict *d)
{
    size_t ns = 16;
    while (ns < d->cap * 2)
        ns *= 2;
    d->slots = pool_zalloc(&r->mem, ns * sizeof(uint32_t));
    d->n_slots = ns;
    for (size_t i = 0; i < d->n; i++) {
        size_t s = hash_quiet(&d->k[i]) & (ns - 1);
        while (d->slots[s])
            s = (s + 1) & (ns - 1);
        d->slots[s] = (uint32_t)(i + 1);
    }
}

/* d[k] = v (k hashable: the caller checked). */
static void dict_set(rctx *r, int32_t line, jdict *d, jval k, jval v)
{
    (void)py_hash(r, line, &k);
    long i = dict_find(d, &k);
    if (i >= 0) {
        d->v[i] = v;
        return;
    }
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 4;
        if (cap > UINT32_MAX / 4)
            rfail(r, line, "a dict of more than %zu entries", d->cap);
        jval *nk = pool_array(&r->mem, cap, sizeof(jval));
        jval *nv = pool_array(&r->mem, cap, sizeof(jval));
        if (d->n) {
            memcpy(nk, d->k, d->n * sizeof(jval));
            memcpy(nv, d->v, d->n * sizeof(jval));
        }
        d->k = nk;
        d->v = nv;
        d->cap = cap;
        if (d->slots || cap > 8)
            dict_reindex(r, d); /* the entries so far; the new one is placed below */
    }
    d->k[d->n] = k;
    d->v[d->n] = v;
    d->n++;
    if (d->slots) {
        size_t mask = d->n_slots - 1;
        size_t s = hash_quiet(&k) & mask;
        while (d->slots[s])
            s = (s + 1) & mask;
        d->slots[s] = (uint32_t)d->n;
    }
}

/* ---- str() and repr() --------------------------------------------------------------- */

static const char *macro_name_p(const node *d);
static size_t macro_name_n(const node *d);

static void put_repr(rctx *r, int32_t line, sbuf *b, const jval *v);

static void put_str_repr(sbuf *b, const char *p, size_t n)
{
    bool has_sq = memchr(p, '\'', n) != NULL, has_dq = memchr(p, '"', n) != NULL;
    char q = has_sq && !has_dq ? '"' : '\'';
    sbuf_putc(b, q);
    for (size_t i = 0; i < n;) {
        int32_t c;
        size_t k = utf8_next(p, n, i, &c);
        if (c == q || c == '\\') {
            sbuf_putc(b, '\\');
            sbuf_putc(b, (char)c);
        } else if (c == '\t') {
            sbuf_puts(b, "\\t");
        } else if (c == '\n') {
            sbuf_puts(b, "\\n");
        } else if (c == '\r') {
            sbuf_puts(b, "\\r");
        } else if (c < 0x80 && c >= 0x20 && c < 0x7f) {
            sbuf_putc(b, (char)c);
        } else if (py_isprintable(c)) {
            sbuf_put(b, p + i, k);
        } else if (c <= 0xff) {
            sbuf_printf(b, "\\x%02x", (unsigned)c);
        } else if (c <= 0xffff) {
            sbuf_printf(b, "\\u%04x", (unsigned)c);
        } else {
            sbuf_printf(b, "\\U%08x", (unsigned)c);
        }
        i += k;
    }
    sbuf_putc(b, q);
}

static void put_seq_repr(rctx *r, int32_t line, sbuf *b, const jval *items, size_t n,
                         const char *open, const char *close, bool tuple)
{
    sbuf_puts(b, open);
    for (size_t i = 0; i < n; i++) {
        if (i)
            sbuf_puts(b, ", ");
        put_repr(r, line, b, &items[i]);
    }
    if (tuple && n == 1)
        sbuf_putc(b, ',');
    sbuf_puts(b, close);
}

/* A dict being printed: a namespace can hold itself, and Python then prints the inner
 * occurrence as {...}. */
struct repr_guard {
    const jdict *d;
    const struct repr_guard *prev;
};

static void put_dict_repr(rctx *r, int32_t line, sbuf *b, const jdict *d)
{
    for (const struct repr_guard *g = r->repr_open; g; g = g->prev)
        if (g->d == d) {
            sbuf_puts(b, "{...}");
            return;
        }
    struct repr_guard guard = {d, r->repr_open};
    r->repr_open = &guard;
    sbuf_putc(b, '{');
    for (size_t i = 0; i < d->n; i++) {
        if (i)
            sbuf_puts(b, ", ");
        put_repr(r, line, b, &d->k[i]);
        sbuf_puts(b, ": ");
        put_repr(r, line, b, &d->v[i]);
    }
    sbuf_putc(b, '}');
    r->repr_open = guard.prev;
}

static void count_step(rctx *r, int32_t line);
static void enter_depth(rctx *r, int32_t line);
static void put_repr_value(rctx *r, int32_t line, sbuf *b, const jval *v);

/* str(v) appended to b. */
static void put_str(rctx *r, int32_t line, sbuf *b, const jval *v)
{
    switch ((jtype)v->t) {
    case JV_UNDEF: return;
    case JV_STR: sbuf_put(b, v->u.s.p, v->u.s.n); return;
    default: put_repr(r, line, b, v); return;
    }
}

/* repr(v) appended to b. */
static void put_repr(rctx *r, int32_t line, sbuf *b, const jval *v)
{
    count_step(r, line);
    enter_depth(r, line);
    put_repr_value(r, line, b, v);
    r->depth--;
}

static void put_repr_value(rctx *r, int32_t line, sbuf *b, const jval *v)
{
    switch ((jtype)v->t) {
    case JV_UNDEF: sbuf_puts(b, "Undefined"); return;
    case JV_NONE: sbuf_puts(b, "None"); return;
    case JV_BOOL: sbuf_puts(b, v->u.b ? "True" : "False"); return;
    case JV_INT: sbuf_printf(b, "%" PRId64, v->u.i); return;
    case JV_FLOAT: format_py_float(b, v->u.dbl); return;
    case JV_STR:
        if (v->f & STR_MARKUP) {
            sbuf_puts(b, "Markup(");
            put_str_repr(b, v->u.s.p, v->u.s.n);
            sbuf_putc(b, ')');
        } else {
            put_str_repr(b, v->u.s.p, v->u.s.n);
        }
        return;
    case JV_LIST: {
        const jlist *l = v->u.list;
        if (v->f == LK_RANGE) {
            if (l->r_step == 1)
                sbuf_printf(b, "range(%" PRId64 ", %" PRId64 ")", l->r_start, l->r_stop);
            else
                sbuf_printf(b, "range(%" PRId64 ", %" PRId64 ", %" PRId64 ")", l->r_start,
                            l->r_stop, l->r_step);
            return;
        }
        bool tuple = v->f == LK_TUPLE;
        put_seq_repr(r, line, b, l->v, l->n, tuple ? "(" : "[", tuple ? ")" : "]", tuple);
        return;
    }
    case JV_DICT: put_dict_repr(r, line, b, v->u.dict); return;
    case JV_NS:
        sbuf_puts(b, "<Namespace ");
        put_dict_repr(r, line, b, v->u.dict);
        sbuf_putc(b, '>');
        return;
    case JV_VIEW: {
        const jdict *d = v->u.dict;
        sbuf_puts(b, type_name(v));
        sbuf_puts(b, "([");
        for (size_t i = 0; i < d->n; i++) {
            if (i)
                sbuf_puts(b, ", ");
            if (v->f == VIEW_ITEMS) {
                sbuf_putc(b, '(');
                put_repr(r, line, b, &d->k[i]);
                sbuf_puts(b, ", ");
                put_repr(r, line, b, &d->v[i]);
                sbuf_putc(b, ')');
            } else {
                put_repr(r, line, b, v->f == VIEW_KEYS ? &d->k[i] : &d->v[i]);
            }
        }
        sbuf_puts(b, "])");
        return;
    }
    case JV_MACRO: {
        const node *d = v->u.macro->def;
        sbuf_puts(b, "<Macro ");
        put_str_repr(b, macro_name_p(d), macro_name_n(d));
        sbuf_putc(b, '>');
        return;
    }
    default:
        /* Python prints these with a memory address: nothing to match */
        runsupported(r, line, "printing a %s object is not supported", type_name(v));
    }
}

/* ---- JSON (json.dumps as transformers' tojson calls it) ------------------------------ */

typedef struct {
    bool ensure_ascii, sort_keys, has_indent;
    strv indent; /* when has_indent */
    strv item_sep, key_sep;
} json_opts;

static void json_put_string(sbuf *b, const char *p, size_t n, bool ensure_ascii)
{
    sbuf_putc(b, '"');
    for (size_t i = 0; i < n;) {
        unsigned char ch = (unsigned char)p[i];
        if (ch < 0x80) {
            switch (ch) {
            case '"': sbuf_puts(b, "\\\""); break;
            case '\\': sbuf_puts(b, "\\\\"); break;
            case '\n': sbuf_puts(b, "\\n"); break;
            case '\r': sbuf_puts(b, "\\r"); break;
            case '\t': sbuf_puts(b, "\\t"); break;
            case '\b': sbuf_puts(b, "\\b"); break;
            case '\f': sbuf_puts(b, "\\f"); break;
            default:
                if (ch < 0x20 || (ensure_ascii && ch == 0x7f))
                    sbuf_printf(b, "\\u%04x", ch);
                else
                    sbuf_putc(b, (char)ch);
            }
            i++;
            continue;
        }
        int32_t c;
        size_t k = utf8_next(p, n, i, &c);
        if (!ensure_ascii) {
            sbuf_put(b, p + i, k);
        } else if (c >= 0x10000) {
            int32_t v = c - 0x10000;
            sbuf_printf(b, "\\u%04x\\u%04x", (unsigned)(0xD800 + (v >> 10)),
                        (unsigned)(0xDC00 + (v & 0x3FF)));
        } else {
            sbuf_printf(b, "\\u%04x", (unsigned)c);
        }
        i += k;
    }
    sbuf_putc(b, '"');
}

static void json_newline(sbuf *b, const json_opts *o, int level)
{
    sbuf_putc(b, '\n');
    for (int i = 0; i < level; i++)
        sbuf_put(b, o->indent.p, o->indent.n);
}

static int py_cmp_values(rctx *r, int32_t line, const jval *a, const jval *b);
static void sort_values(rctx *r, int32_t line, jval *v, size_t n, const jval *keys, bool reverse);

static void json_put(rctx *r, int32_t line, sbuf *b, const jval *v, const json_opts *o, int level)
{
    count_step(r, line);
    if (level > r->lim.max_depth)
        rfail(r, line, "tojson: nesting deeper than %d levels (the limit)", (int)r->lim.max_depth);
    switch ((jtype)v->t) {
    case JV_NONE: sbuf_puts(b, "null"); return;
    case JV_BOOL: sbuf_puts(b, v->u.b ? "true" : "false"); return;
    case JV_INT: sbuf_printf(b, "%" PRId64, v->u.i); return;
    case JV_FLOAT:
        if (isnan(v->u.dbl))
            sbuf_puts(b, "NaN");
        else if (isinf(v->u.dbl))
            sbuf_puts(b, v->u.dbl < 0 ? "-Infinity" : "Infinity");
        else
            format_py_float(b, v->u.dbl);
        return;
    case JV_STR: json_put_string(b, v->u.s.p, v->u.s.n, o->ensure_ascii); return;
    case JV_LIST:
        if (v->f != LK_RANGE) {
            const jlist *l = v->u.list;
            if (!l->n) {
                sbuf_puts(b, "[]");
                return;
            }
            sbuf_putc(b, '[');
            for (size_t i = 0; i < l->n; i++) {
                if (i)
                    sbuf_put(b, o->item_sep.p, o->item_sep.n);
                if (o->has_indent)
                    json_newline(b, o, level + 1);
                json_put(r, line, b, &l->v[i], o, level + 1);
            }
            if (o->has_indent)
                json_newline(b, o, level);
            sbuf_putc(b, ']');
            return;
        }
        break;
    case JV_DICT: {
        const jdict *d = v->u.dict;
        if (!d->n) {
            sbuf_puts(b, "{}");
            return;
        }
        size_t *order = pool_array(&r->mem, d->n, sizeof(size_t));
        for (size_t i = 0; i < d->n; i++)
            order[i] = i;
        if (o->sort_keys) { /* sorted(dct.items()): by key, Python's comparison */
            jval *idx = pool_array(&r->mem, d->n, sizeof(jval));
            for (size_t i = 0; i < d->n; i++)
                idx[i] = mk_int((int64_t)i);
            sort_values(r, line, idx, d->n, d->k, false);
            for (size_t i = 0; i < d->n; i++)
                order[i] = (size_t)idx[i].u.i;
        }
        sbuf_putc(b, '{');
        for (size_t j = 0; j < d->n; j++) {
            const jval *k = &d->k[order[j]];
            if (j)
                sbuf_put(b, o->item_sep.p, o->item_sep.n);
            if (o->has_indent)
                json_newline(b, o, level + 1);
            switch ((jtype)k->t) {
            case JV_STR: json_put_string(b, k->u.s.p, k->u.s.n, o->ensure_ascii); break;
            case JV_NONE: sbuf_puts(b, "\"null\""); break;
            case JV_BOOL: sbuf_puts(b, k->u.b ? "\"true\"" : "\"false\""); break;
            case JV_INT:
            case JV_FLOAT:
                sbuf_putc(b, '"');
                json_put(r, line, b, k, o, level + 1);
                sbuf_putc(b, '"');
                break;
            default:
                rfail(r, line, "tojson: keys must be str, int, float, bool or None, not %s",
                      type_name(k));
            }
            sbuf_put(b, o->key_sep.p, o->key_sep.n);
            json_put(r, line, b, &d->v[order[j]], o, level + 1);
        }
        if (o->has_indent)
            json_newline(b, o, level);
        sbuf_putc(b, '}');
        return;
    }
    default: break;
    }
    rfail(r, line, "tojson: Object of type %s is not JSON serializable", type_name(v));
}

/* A JSON value (cJSON) as a render value: integral numbers become ints. */
static jval from_json(rctx *r, const cJSON *j, int level)
{
    if (level > 1000)
        rfail(r, 0, "a variable nests deeper than 1000 levels");
    if (!j || cJSON_IsNull(j))
        return mk_none();
    if (cJSON_IsBool(j))
        return mk_bool(cJSON_IsTrue(j));
    if (cJSON_IsNumber(j)) {
        double d = j->valuedouble;
        if (d == floor(d) && fabs(d) < 9.2e18)
            return mk_int((int64_t)d);
        return mk_float(d);
    }
    if (cJSON_IsString(j)) {
        const char *s = j->valuestring ? j->valuestring : "";
        return mk_str(s, strlen(s));
    }
    if (cJSON_IsArray(j)) {
        jval l = mk_list(r, (size_t)cJSON_GetArraySize(j), LK_LIST);
        for (const cJSON *e = j->child; e; e = e->next)
            list_push(r, l.u.list, from_json(r, e, level + 1));
        return l;
    }
    if (cJSON_IsObject(j)) {
        jval d = mk_dict(r);
        for (const cJSON *e = j->child; e; e = e->next) {
            const char *k = e->string ? e->string : "";
            dict_set(r, 0, d.u.dict, mk_str(k, strlen(k)), from_json(r, e, level + 1));
        }
        return d;
    }
    return mk_none();
}

/* ---- the compiled template ---------------------------------------------------------- */

typedef enum {
    /* expressions */
    N_CONST,
    N_NAME,
    N_LIST,
    N_TUPLE,
    N_DICT,
    N_GETATTR,
    N_GETITEM,
    N_SLICE,
    N_BINOP,
    N_NEG,
    N_POS,
    N_NOT,
    N_AND,
    N_OR,
    N_CONCAT,
    N_COMPARE,
    N_COND,
    N_CALL,
    N_FILTER,
    N_TEST,
    N_NSREF,
    /* statements */
    N_OUTPUT,
    N_IF,
    N_FOR,
    N_SET,
    N_SETBLOCK,
    N_MACRO,
    N_BREAK,
    N_CONTINUE,
    N_WITH,
    N_FILTERBLOCK,
    N_SCOPE,
} nkind;

enum { OPB_ADD, OPB_SUB, OPB_MUL, OPB_DIV, OPB_FLOORDIV, OPB_MOD, OPB_POW };
enum { CMP_EQ, CMP_NE, CMP_LT, CMP_LTEQ, CMP_GT, CMP_GTEQ, CMP_IN, CMP_NOTIN };
enum { MACRO_VARARGS = 1, MACRO_KWARGS = 2, MACRO_CALLER = 4 };

/* One tree node. Which fields a kind uses:
 *   CONST k; NAME name; LIST/TUPLE items; DICT items (keys) + items2 (values);
 *   GETATTR a.name; GETITEM a[b]; SLICE a:b:c (each may be NULL); BINOP a op b;
 *   NEG/POS/NOT a; AND/OR a, b; CONCAT items; COMPARE a, then ops[i] items[i];
 *   COND b if a else c (c NULL: undefined); NSREF name.attr;
 *   CALL a(items, names=items2, *c, **d); FILTER/TEST a|name(...) with fid, the arguments
 *   as CALL (a NULL: a filter block's body);
 *   OUTPUT items (CONST strings and expressions); IF a: items else items2;
 *   FOR a in b if c: items else items2; SET a = b; SETBLOCK a | c: items;
 *   MACRO name(items = items2 defaults, NULL where none): items3, op the MACRO_ flags;
 *   WITH items = items2: items3; FILTERBLOCK c: items; SCOPE items. */
struct node {
    uint8_t kind;
    uint8_t op;
    uint16_t fid;
    int32_t line;
    node *a, *b, *c, *d;
    node **items, **items2, **items3;
    int32_t n_items, n_items2, n_items3;
    strv name, attr;
    strv *names; /* keyword argument names, n_items2 of them */
    uint8_t *ops;
    jval k;
};

static const char *macro_name_p(const node *d) { return d->name.p; }
static size_t macro_name_n(const node *d) { return d->name.n; }

struct ferry_jinja {
    pool mem;
    jcatch c; /* only its name is used after compile */
    char *name;
    node **body;
    int32_t n_body;
};

/* ---- lexer -------------------------------------------------------------------------- */

typedef enum {
    T_EOF,
    T_DATA,
    T_VAR_BEGIN,
    T_VAR_END,
    T_BLOCK_BEGIN,
    T_BLOCK_END,
    T_NAME,
    T_STRING,
    T_INT,
    T_FLOAT,
    T_OP,
} ttype;

typedef enum {
    OP_ADD,
    OP_SUB,
    OP_DIV,
    OP_FLOORDIV,
    OP_MUL,
    OP_MOD,
    OP_POW,
    OP_TILDE,
    OP_LBRACKET,
    OP_RBRACKET,
    OP_LPAREN,
    OP_RPAREN,
    OP_LBRACE,
    OP_RBRACE,
    OP_EQ,
    OP_NE,
    OP_GT,
    OP_GTEQ,
    OP_LT,
    OP_LTEQ,
    OP_ASSIGN,
    OP_DOT,
    OP_COLON,
    OP_PIPE,
    OP_COMMA,
    OP_SEMICOLON,
} opcode;

static const struct {
    const char *s;
    opcode op;
} op_table[] = {
    /* longest first, as Jinja2's operator regex */
    {"//", OP_FLOORDIV}, {"**", OP_POW},   {"==", OP_EQ},      {"!=", OP_NE},      {">=", OP_GTEQ},
    {"<=", OP_LTEQ},     {"+", OP_ADD},    {"-", OP_SUB},      {"/", OP_DIV},      {"*", OP_MUL},
    {"%", OP_MOD},       {"~", OP_TILDE},  {"[", OP_LBRACKET}, {"]", OP_RBRACKET}, {"(", OP_LPAREN},
    {")", OP_RPAREN},    {"{", OP_LBRACE}, {"}", OP_RBRACE},   {">", OP_GT},       {"<", OP_LT},
    {"=", OP_ASSIGN},    {".", OP_DOT},    {":", OP_COLON},    {"|", OP_PIPE},     {",", OP_COMMA},
    {";", OP_SEMICOLON},
};

typedef struct {
    uint8_t type, op;
    int32_t line;
    const char *p; /* DATA, NAME, STRING (decoded) */
    size_t n;
    int64_t i;
    double d;
} token;

typedef struct {
    jcatch *c;
    pool *mem;
    const char *s; /* the normalised source */
    size_t n;
    token *toks;
    size_t n_toks, cap_toks;
    size_t line_pos; /* line counting: newlines before line_pos are counted in line */
    int32_t line;
} lexer;

static int32_t lex_line_at(lexer *lx, size_t pos)
{
    for (; lx->line_pos < pos && lx->line_pos < lx->n; lx->line_pos++)
        if (lx->s[lx->line_pos] == '\n')
            lx->line++;
    return lx->line;
}

static _Noreturn FERRY_PRINTF(4, 5) void lex_fail(lexer *lx, ferry_status code, size_t pos,
                                                  const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    jthrow_v(lx->c, code, lex_line_at(lx, pos), fmt, ap);
    va_end(ap);
    longjmp(lx->c->jb, 1);
}

static token *lex_push(lexer *lx, ttype type, size_t pos)
{
    if (lx->n_toks == lx->cap_toks) {
        size_t cap = lx->cap_toks ? lx->cap_toks * 2 : 256;
        token *nt = pool_array(lx->mem, cap, sizeof(token));
        if (lx->n_toks)
            memcpy(nt, lx->toks, lx->n_toks * sizeof(token));
        lx->toks = nt;
        lx->cap_toks = cap;
    }
    token *t = &lx->toks[lx->n_toks++];
    memset(t, 0, sizeof *t);
    t->type = (uint8_t)type;
    t->line = lex_line_at(lx, pos);
    return t;
}

/* Length of Python-\s whitespace at s[i..n). */
static size_t ws_span(const char *s, size_t n, size_t i)
{
    size_t j = i;
    while (j < n) {
        int32_t cp;
        size_t k = utf8_next(s, n, j, &cp);
        if (!py_isspace(cp))
            break;
        j += k;
    }
    return j - i;
}

/* Python's text.rstrip(): the length without trailing whitespace. */
static size_t rstrip_len(const char *s, size_t n)
{
    while (n > 0) {
        size_t j = n - 1;
        while (j > 0 && ((unsigned char)s[j] & 0xC0) == 0x80)
            j--;
        int32_t cp;
        utf8_next(s, n, j, &cp);
        if (!py_isspace(cp))
            break;
        n = j;
    }
    return n;
}

static bool all_space(const char *s, size_t n) { return ws_span(s, n, 0) == n; }

/* The data before a tag, with the tag's whitespace control applied (OptionalLStrip). */
static void lex_data(lexer *lx, size_t start, size_t end, char sign, bool lstrip,
                     bool line_starting)
{
    const char *text = lx->s + start;
    size_t n = end - start;
    if (sign == '-') {
        n = rstrip_len(text, n);
    } else if (sign != '+' && lstrip) {
        size_t l_pos = 0;
        for (size_t i = n; i > 0; i--)
            if (text[i - 1] == '\n') {
                l_pos = i;
                break;
            }
        if ((l_pos > 0 || line_starting) && n > l_pos && all_space(text + l_pos, n - l_pos))
            n = l_pos;
    }
    if (n) {
        token *t = lex_push(lx, T_DATA, start);
        t->p = text;
        t->n = n;
    }
}

static bool hexval(char ch, int *v)
{
    if (ch >= '0' && ch <= '9')
        *v = ch - '0';
    else if (ch >= 'a' && ch <= 'f')
        *v = ch - 'a' + 10;
    else if (ch >= 'A' && ch <= 'F')
        *v = ch - 'A' + 10;
    else
        return false;
    return true;
}

/* A string literal's body, decoded as Jinja2 does: the text encoded to ASCII with
 * backslashreplace, then decoded with Python's unicode-escape codec. */
static void lex_string(lexer *lx, token *t, size_t pos, const char *p, size_t n)
{
    sbuf b = {.limit = SIZE_MAX / 4, .c = lx->c};
    /* the buffer is malloc'd: copy out and free before anything can fail past here */
    const char *err = NULL;
    ferry_status code = FERRY_ERR_FORMAT;
    for (size_t i = 0; i < n && !err;) {
        unsigned char ch = (unsigned char)p[i];
        if (ch != '\\') {
            sbuf_putc(&b, (char)ch);
            i++;
            continue;
        }
        if (i + 1 >= n) {
            err = "\\ at end of string";
            break;
        }
        unsigned char e = (unsigned char)p[i + 1];
        i += 2;
        int32_t cp = -1;
        switch (e) {
        case '\n': break;
        case '\\': cp = '\\'; break;
        case '\'': cp = '\''; break;
        case '"': cp = '"'; break;
        case 'a': cp = 7; break;
        case 'b': cp = 8; break;
        case 'f': cp = 12; break;
        case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;
        case 't': cp = '\t'; break;
        case 'v': cp = 11; break;
        case 'x':
        case 'u':
        case 'U': {
            int want = e == 'x' ? 2 : e == 'u' ? 4 : 8;
            int32_t v = 0;
            int got = 0;
            for (; got < want && i < n; got++, i++) {
                int h;
                if (!hexval(p[i], &h))
                    break;
                v = v * 16 + h;
            }
            if (got < want) {
                err = e == 'x'   ? "truncated \\xXX escape"
                      : e == 'u' ? "truncated \\uXXXX escape"
                                 : "truncated \\UXXXXXXXX escape";
                break;
            }
            if (v > 0x10FFFF) {
                err = "illegal Unicode character";
                break;
            }
            if (v >= 0xD800 && v <= 0xDFFF) {
                err = "a lone surrogate in a string literal is not supported";
                code = FERRY_ERR_UNSUPPORTED;
                break;
            }
            cp = v;
            break;
        }
        case 'N':
            err = "\\N{...} escapes in string literals are not supported";
            code = FERRY_ERR_UNSUPPORTED;
            break;
        default:
            if (e >= '0' && e <= '7') {
                int32_t v = e - '0';
                for (int k = 0; k < 2 && i < n && p[i] >= '0' && p[i] <= '7'; k++, i++)
                    v = v * 8 + (p[i] - '0');
                cp = v;
            } else if (e >= 0x80) {
                /* backslashreplace turned the character into \xhh, \uhhhh or \Uhhhhhhhh,
                 * and the backslash before it escapes that escape's own backslash */
                int32_t c;
                size_t k = utf8_next(p, n, i - 1, &c);
                i = i - 1 + k;
                sbuf_putc(&b, '\\');
                char tmp[16];
                snprintf(tmp, sizeof tmp,
                         c <= 0xff     ? "x%02x"
                         : c <= 0xffff ? "u%04x"
                                       : "U%08x",
                         (unsigned)c);
                sbuf_puts(&b, tmp);
            } else {
                sbuf_putc(&b, '\\');
                sbuf_putc(&b, (char)e);
            }
        }
        if (cp >= 0)
            sbuf_put_cp(&b, cp);
    }
    if (err) {
        free(b.p);
        lex_fail(lx, code, pos, "%s", err);
    }
    t->p = b.n ? pool_strdup(lx->mem, b.p, b.n) : "";
    t->n = b.n;
    free(b.p);
}

/* Integers as Jinja2's integer_re (0b/0o/0x, decimal, zero, with `_` separators). Returns
 * the length matched, 0 if none. */
static size_t match_int(const char *s, size_t n, size_t i)
{
    if (i >= n)
        return 0;
    if (s[i] == '0' && i + 1 < n && strchr("bBoOxX", s[i + 1]) && s[i + 1]) {
        char k = (char)(s[i + 1] | 0x20);
        size_t j = i + 2, last = 0;
        for (;;) {
            size_t q = j;
            if (q < n && s[q] == '_')
                q++;
            int h;
            bool ok = q < n && (k == 'b'   ? (s[q] == '0' || s[q] == '1')
                                : k == 'o' ? (s[q] >= '0' && s[q] <= '7')
                                           : hexval(s[q], &h));
            if (!ok)
                break;
            j = q + 1;
            last = j;
        }
        if (last)
            return last - i;
    }
    if (s[i] >= '1' && s[i] <= '9') {
        size_t j = i + 1;
        for (;;) {
            size_t q = j;
            if (q < n && s[q] == '_')
                q++;
            if (q < n && s[q] >= '0' && s[q] <= '9')
                j = q + 1;
            else
                break;
        }
        return j - i;
    }
    if (s[i] == '0') {
        size_t j = i + 1;
        for (;;) {
            size_t q = j;
            if (q < n && s[q] == '_')
                q++;
            if (q < n && s[q] == '0')
                j = q + 1;
            else
                break;
        }
        return j - i;
    }
    return 0;
}

/* (\d+_)*\d+ at i: length, 0 if none. */
static size_t match_digits(const char *s, size_t n, size_t i)
{
    size_t j = i;
    if (j >= n || s[j] < '0' || s[j] > '9')
        return 0;
    for (;;) {
        while (j < n && s[j] >= '0' && s[j] <= '9')
            j++;
        if (j + 1 < n && s[j] == '_' && s[j + 1] >= '0' && s[j + 1] <= '9')
            j++;
        else
            break;
    }
    return j - i;
}

/* Jinja2's float_re: digits, then an exponent (optionally after a fraction) or a
 * fraction; not right after a '.'. */
static size_t match_float(const char *s, size_t n, size_t i)
{
    if (i > 0 && s[i - 1] == '.')
        return 0;
    size_t d = match_digits(s, n, i);
    if (!d)
        return 0;
    size_t j = i + d;
    size_t frac = 0;
    if (j < n && s[j] == '.')
        frac = match_digits(s, n, j + 1);
    size_t k = frac ? j + 1 + frac : j;
    if (k < n && (s[k] == 'e' || s[k] == 'E')) {
        size_t q = k + 1;
        if (q < n && (s[q] == '+' || s[q] == '-'))
            q++;
        size_t ed = match_digits(s, n, q);
        if (ed)
            return q + ed - i;
    }
    if (frac)
        return j + 1 + frac - i;
    return 0;
}

static void lex_number(lexer *lx, size_t pos, size_t len, bool is_float)
{
    char tmp[128];
    size_t k = 0;
    for (size_t i = 0; i < len && k + 1 < sizeof tmp; i++)
        if (lx->s[pos + i] != '_')
            tmp[k++] = lx->s[pos + i];
    tmp[k] = 0;
    token *t = lex_push(lx, is_float ? T_FLOAT : T_INT, pos);
    if (is_float) {
        t->d = strtod(tmp, NULL);
        return;
    }
    int base = 10;
    const char *digits = tmp;
    if (k > 1 && tmp[0] == '0' && (tmp[1] | 0x20) != '0' && strchr("box", tmp[1] | 0x20)) {
        base = (tmp[1] | 0x20) == 'b' ? 2 : (tmp[1] | 0x20) == 'o' ? 8 : 16;
        digits = tmp + 2;
    }
    errno = 0;
    unsigned long long v = strtoull(digits, NULL, base);
    if (errno == ERANGE || v > (unsigned long long)INT64_MAX || len >= sizeof tmp)
        lex_fail(lx, FERRY_ERR_UNSUPPORTED, pos, "the integer literal %.*s is larger than 64 bits",
                 (int)(len > 40 ? 40 : len), lx->s + pos);
    t->i = (int64_t)v;
}

/* The tokens of an expression, from pos until the closing delimiter ("%}" for blocks,
 * "}}" for variables) when brackets are balanced. Returns the position after the end. */
static size_t lex_tag(lexer *lx, size_t pos, bool block, bool *ends_newline)
{
    const char *s = lx->s;
    size_t n = lx->n;
    char stack[256];
    int depth = 0;
    for (;;) {
        if (pos >= n)
            return pos; /* the parser reports the unexpected end */
        if (depth == 0) {
            /* the end rule: +%} | -%}\s* | %}\n? (blocks, trim_blocks); -}}\s* | }} */
            const char *end = block ? "%}" : "}}";
            size_t e = 0;
            char sign = 0;
            if (pos + 2 < n && (s[pos] == '-' || (block && s[pos] == '+')) &&
                s[pos + 1] == end[0] && s[pos + 2] == end[1]) {
                sign = s[pos];
                e = pos + 3;
            } else if (pos + 1 < n && s[pos] == end[0] && s[pos + 1] == end[1]) {
                e = pos + 2;
            }
            if (e) {
                lex_push(lx, block ? T_BLOCK_END : T_VAR_END, pos);
                if (sign == '-')
                    e += ws_span(s, n, e);
                else if (!sign && block && e < n && s[e] == '\n')
                    e++;
                *ends_newline = s[e - 1] == '\n';
                return e;
            }
        }
        size_t w = ws_span(s, n, pos);
        if (w) {
            pos += w;
            continue;
        }
        size_t m = match_float(s, n, pos);
        if (m) {
            lex_number(lx, pos, m, true);
            pos += m;
            continue;
        }
        m = match_int(s, n, pos);
        if (m) {
            lex_number(lx, pos, m, false);
            pos += m;
            continue;
        }
        unsigned char ch = (unsigned char)s[pos];
        if (ch == '_' || ((ch | 0x20) >= 'a' && (ch | 0x20) <= 'z')) {
            size_t j = pos + 1;
            while (j < n && (s[j] == '_' || (s[j] >= '0' && s[j] <= '9') ||
                             ((s[j] | 0x20) >= 'a' && (s[j] | 0x20) <= 'z')))
                j++;
            int32_t next_cp = 0;
            if (j < n && (unsigned char)s[j] >= 0x80)
                utf8_next(s, n, j, &next_cp);
            if (next_cp && !py_isspace(next_cp))
                lex_fail(lx, FERRY_ERR_UNSUPPORTED, pos, "non-ASCII names are not supported");
            token *t = lex_push(lx, T_NAME, pos);
            t->p = s + pos;
            t->n = j - pos;
            pos = j;
            continue;
        }
        if (ch >= 0x80)
            lex_fail(lx, FERRY_ERR_UNSUPPORTED, pos, "non-ASCII names are not supported");
        if (ch == '\'' || ch == '"') {
            size_t j = pos + 1;
            while (j < n && s[j] != (char)ch) {
                if (s[j] == '\\') {
                    if (j + 1 >= n)
                        break;
                    j++;
                }
                j++;
            }
            if (j >= n)
                lex_fail(lx, FERRY_ERR_FORMAT, pos, "unexpected char '%c' at %zu", ch, pos);
            token *t = lex_push(lx, T_STRING, pos);
            lex_string(lx, t, pos, s + pos + 1, j - pos - 1);
            pos = j + 1;
            continue;
        }
        size_t k;
        for (k = 0; k < sizeof op_table / sizeof op_table[0]; k++) {
            size_t l = strlen(op_table[k].s);
            if (pos + l <= n && !memcmp(s + pos, op_table[k].s, l))
                break;
        }
        if (k == sizeof op_table / sizeof op_table[0])
            lex_fail(lx, FERRY_ERR_FORMAT, pos, "unexpected char '%c' at %zu", ch, pos);
        opcode op = op_table[k].op;
        if (op == OP_LBRACE || op == OP_LPAREN || op == OP_LBRACKET) {
            if (depth == (int)sizeof stack)
                lex_fail(lx, FERRY_ERR_FORMAT, pos, "brackets nested too deeply");
            stack[depth++] = op == OP_LBRACE ? '}' : op == OP_LPAREN ? ')' : ']';
        } else if (op == OP_RBRACE || op == OP_RPAREN || op == OP_RBRACKET) {
            if (!depth)
                lex_fail(lx, FERRY_ERR_FORMAT, pos, "unexpected '%c'", ch);
            char want = stack[--depth];
            if (want != (char)ch)
                lex_fail(lx, FERRY_ERR_FORMAT, pos, "unexpected '%c', expected '%c'", ch, want);
        }
        token *t = lex_push(lx, T_OP, pos);
        t->op = (uint8_t)op;
        pos += strlen(op_table[k].s);
    }
}

/* Matches `{%[-+]?\s*raw\s*(-%}\s*|%})` at pos; returns the end, 0 if not. */
static size_t match_raw_begin(const char *s, size_t n, size_t pos)
{
    size_t j = pos + 2;
    if (j < n && (s[j] == '-' || s[j] == '+'))
        j++;
    j += ws_span(s, n, j);
    if (j + 3 > n || memcmp(s + j, "raw", 3))
        return 0;
    j += 3;
    j += ws_span(s, n, j);
    if (j + 3 <= n && !memcmp(s + j, "-%}", 3))
        return j + 3 + ws_span(s, n, j + 3);
    if (j + 2 <= n && !memcmp(s + j, "%}", 2))
        return j + 2;
    return 0;
}

/* At pos: `{%[-+]?\s*endraw\s*(+%}|-%}\s*|%}\n?)`; the end, 0 if not; *sign the start's. */
static size_t match_raw_end(const char *s, size_t n, size_t pos, char *sign)
{
    if (pos + 2 > n || s[pos] != '{' || s[pos + 1] != '%')
        return 0;
    size_t j = pos + 2;
    *sign = 0;
    if (j < n && (s[j] == '-' || s[j] == '+'))
        *sign = s[j++];
    j += ws_span(s, n, j);
    if (j + 6 > n || memcmp(s + j, "endraw", 6))
        return 0;
    j += 6;
    j += ws_span(s, n, j);
    if (j + 3 <= n && !memcmp(s + j, "+%}", 3))
        return j + 3;
    if (j + 3 <= n && !memcmp(s + j, "-%}", 3))
        return j + 3 + ws_span(s, n, j + 3);
    if (j + 2 <= n && !memcmp(s + j, "%}", 2))
        return j + 2 + (j + 2 < n && s[j + 2] == '\n');
    return 0;
}

static void lex_all(lexer *lx)
{
    const char *s = lx->s;
    size_t n = lx->n, pos = 0;
    bool line_starting = true;
    while (pos < n) {
        size_t q = pos;
        const char *hit = NULL;
        while (q + 1 < n) {
            const char *b = memchr(s + q, '{', n - q - 1);
            if (!b)
                break;
            if (b[1] == '{' || b[1] == '%' || b[1] == '#') {
                hit = b;
                break;
            }
            q = (size_t)(b - s) + 1;
        }
        if (!hit) {
            token *t = lex_push(lx, T_DATA, pos);
            t->p = s + pos;
            t->n = n - pos;
            break;
        }
        size_t at = (size_t)(hit - s);
        char kind = hit[1];
        char sign = at + 2 < n && (hit[2] == '-' || hit[2] == '+') ? hit[2] : 0;
        size_t raw_end = kind == '%' ? match_raw_begin(s, n, at) : 0;
        lex_data(lx, pos, at, sign, kind != '{', line_starting);
        if (raw_end) {
            /* raw: the data up to {% endraw %}, stripped by that tag's own controls */
            size_t p2 = raw_end, e = 0;
            char esign = 0;
            bool ls = s[raw_end - 1] == '\n';
            for (; p2 < n; p2++)
                if (s[p2] == '{' && (e = match_raw_end(s, n, p2, &esign)))
                    break;
            if (!e)
                lex_fail(lx, FERRY_ERR_FORMAT, at, "Missing end of raw directive");
            lex_data(lx, raw_end, p2, esign, true, ls);
            line_starting = s[e - 1] == '\n';
            pos = e;
            continue;
        }
        size_t body = at + 2 + (sign ? 1 : 0);
        if (kind == '#') {
            /* (.*?)(\+#}|-#}\s*|#}\n?) */
            size_t p2 = body, e = 0;
            for (; p2 + 1 < n; p2++) {
                if ((s[p2] == '+' || s[p2] == '-') && p2 + 2 < n && s[p2 + 1] == '#' &&
                    s[p2 + 2] == '}') {
                    e = p2 + 3;
                    if (s[p2] == '-')
                        e += ws_span(s, n, e);
                    break;
                }
                if (s[p2] == '#' && s[p2 + 1] == '}') {
                    e = p2 + 2;
                    if (e < n && s[e] == '\n')
                        e++;
                    break;
                }
            }
            if (!e)
                lex_fail(lx, FERRY_ERR_FORMAT, at, "Missing end of comment tag");
            line_starting = s[e - 1] == '\n';
            pos = e;
            continue;
        }
        bool block = kind == '%';
        lex_push(lx, block ? T_BLOCK_BEGIN : T_VAR_BEGIN, at);
        bool nl = false;
        pos = lex_tag(lx, body, block, &nl);
        line_starting = nl;
    }
    lex_push(lx, T_EOF, n);
}

/* ---- parser ------------------------------------------------------------------------- */

typedef struct {
    jcatch *c;
    pool *mem;
    token *t;
    size_t pos;
    int32_t depth;
    int32_t loop_depth; /* for break/continue */
} parser;

typedef struct {
    node **v;
    int32_t n, cap;
} nvec;

static void nvec_push(parser *ps, nvec *v, node *x)
{
    if (v->n == v->cap) {
        int32_t cap = v->cap ? v->cap * 2 : 4;
        node **nv = pool_array(ps->mem, (size_t)cap, sizeof(node *));
        if (v->n)
            memcpy(nv, v->v, (size_t)v->n * sizeof(node *));
        v->v = nv;
        v->cap = cap;
    }
    v->v[v->n++] = x;
}

static token *cur(parser *ps) { return &ps->t[ps->pos]; }
static token *look(parser *ps)
{
    return ps->t[ps->pos].type == T_EOF ? &ps->t[ps->pos] : &ps->t[ps->pos + 1];
}
static void advance(parser *ps)
{
    if (ps->t[ps->pos].type != T_EOF)
        ps->pos++;
}

static _Noreturn FERRY_PRINTF(3, 4) void psyntax(parser *ps, int32_t line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    jthrow_v(ps->c, FERRY_ERR_FORMAT, line, fmt, ap);
    va_end(ap);
    longjmp(ps->c->jb, 1);
}

static bool is_name(const token *t, const char *s)
{
    return t->type == T_NAME && t->n == strlen(s) && !memcmp(t->p, s, t->n);
}
static bool is_op(const token *t, opcode op) { return t->type == T_OP && t->op == op; }

static const char *describe(const token *t)
{
    static const char *const ops[] = {
        "+", "-",  "/",  "//", "*",  "%", "**", "~", "[", "]", "(", ")", "{",
        "}", "==", "!=", ">",  ">=", "<", "<=", "=", ".", ":", "|", ",", ";",
    };
    switch ((ttype)t->type) {
    case T_EOF: return "end of template";
    case T_DATA: return "template data";
    case T_VAR_BEGIN: return "begin of print statement";
    case T_VAR_END: return "end of print statement";
    case T_BLOCK_BEGIN: return "begin of statement block";
    case T_BLOCK_END: return "end of statement block";
    case T_NAME: return "name";
    case T_STRING: return "string";
    case T_INT: return "integer";
    case T_FLOAT: return "float";
    case T_OP: return ops[t->op];
    }
    return "token";
}

static void expect_op(parser *ps, opcode op, const char *what)
{
    token *t = cur(ps);
    if (!is_op(t, op)) {
        if (t->type == T_EOF)
            psyntax(ps, t->line, "unexpected end of template, expected '%s'", what);
        psyntax(ps, t->line, "expected token '%s', got '%s'", what, describe(t));
    }
    advance(ps);
}

static void expect_type(parser *ps, ttype type, const char *what)
{
    token *t = cur(ps);
    if (t->type != type) {
        if (t->type == T_EOF)
            psyntax(ps, t->line, "unexpected end of template, expected '%s'", what);
        psyntax(ps, t->line, "expected token '%s', got '%s'", what, describe(t));
    }
    advance(ps);
}

static node *mk_node(parser *ps, nkind kind, int32_t line)
{
    node *x = pool_zalloc(ps->mem, sizeof *x);
    x->kind = (uint8_t)kind;
    x->line = line;
    return x;
}

static void enter(parser *ps)
{
    if (++ps->depth > JINJA_MAX_PARSE_DEPTH)
        psyntax(ps, cur(ps)->line, "expressions or statements nested deeper than %d levels",
                JINJA_MAX_PARSE_DEPTH);
}
static void leave(parser *ps) { ps->depth--; }

static node *parse_expression(parser *ps, bool with_condexpr);
static node *parse_tuple(parser *ps, bool simplified, bool with_condexpr, const char *extra_end,
                         bool explicit_parens);
static node *parse_unary(parser *ps, bool with_filter);
static node *parse_primary(parser *ps);
static node *parse_postfix(parser *ps, node *x);
static node *parse_filter(parser *ps, node *x, bool start_inline);

/* (args, kwargs, *dyn, **dyn) after a '(' into x's items/items2/names/c/d. */
static void parse_call_args(parser *ps, node *x)
{
    int32_t line = cur(ps)->line;
    expect_op(ps, OP_LPAREN, "(");
    nvec args = {0}, kwv = {0};
    strv *kwn = NULL;
    int32_t cap_kw = 0;
    bool require_comma = false;
    while (!is_op(cur(ps), OP_RPAREN)) {
        if (require_comma) {
            expect_op(ps, OP_COMMA, ",");
            if (is_op(cur(ps), OP_RPAREN))
                break;
        }
        if (is_op(cur(ps), OP_MUL)) {
            if (x->c || x->d)
                psyntax(ps, line, "invalid syntax for function call expression");
            advance(ps);
            x->c = parse_expression(ps, true);
        } else if (is_op(cur(ps), OP_POW)) {
            if (x->d)
                psyntax(ps, line, "invalid syntax for function call expression");
            advance(ps);
            x->d = parse_expression(ps, true);
        } else if (cur(ps)->type == T_NAME && is_op(look(ps), OP_ASSIGN)) {
            if (x->d)
                psyntax(ps, line, "invalid syntax for function call expression");
            strv key = {cur(ps)->p, cur(ps)->n};
            advance(ps);
            advance(ps);
            if (kwv.n == cap_kw) {
                int32_t cap = cap_kw ? cap_kw * 2 : 4;
                strv *nk = pool_array(ps->mem, (size_t)cap, sizeof(strv));
                if (kwv.n)
                    memcpy(nk, kwn, (size_t)kwv.n * sizeof(strv));
                kwn = nk;
                cap_kw = cap;
            }
            kwn[kwv.n] = key;
            nvec_push(ps, &kwv, parse_expression(ps, true));
        } else {
            if (x->c || x->d || kwv.n)
                psyntax(ps, line, "invalid syntax for function call expression");
            nvec_push(ps, &args, parse_expression(ps, true));
        }
        require_comma = true;
    }
    expect_op(ps, OP_RPAREN, ")");
    x->items = args.v;
    x->n_items = args.n;
    x->items2 = kwv.v;
    x->n_items2 = kwv.n;
    x->names = kwn;
}

static node *parse_call(parser *ps, node *callee)
{
    node *x = mk_node(ps, N_CALL, cur(ps)->line);
    x->a = callee;
    parse_call_args(ps, x);
    return x;
}

static strv parse_dotted_name(parser *ps)
{
    token *t = cur(ps);
    expect_type(ps, T_NAME, "name");
    strv name = {t->p, t->n};
    if (!is_op(cur(ps), OP_DOT))
        return name;
    sbuf b = {.limit = SIZE_MAX / 4, .c = ps->c};
    sbuf_put(&b, name.p, name.n);
    while (is_op(cur(ps), OP_DOT)) {
        advance(ps);
        token *u = cur(ps);
        if (u->type != T_NAME) {
            free(b.p);
            expect_type(ps, T_NAME, "name");
        }
        sbuf_putc(&b, '.');
        sbuf_put(&b, u->p, u->n);
        advance(ps);
    }
    strv r = {pool_strdup(ps->mem, b.p, b.n), b.n};
    free(b.p);
    return r;
}

static node *parse_filter(parser *ps, node *x, bool start_inline)
{
    while (is_op(cur(ps), OP_PIPE) || start_inline) {
        if (!start_inline)
            advance(ps);
        int32_t line = cur(ps)->line;
        strv name = parse_dotted_name(ps);
        node *f = mk_node(ps, N_FILTER, line);
        f->a = x;
        f->name = name;
        if (is_op(cur(ps), OP_LPAREN))
            parse_call_args(ps, f);
        x = f;
        start_inline = false;
    }
    return x;
}

static node *parse_test(parser *ps, node *x)
{
    int32_t line = cur(ps)->line;
    advance(ps); /* is */
    bool negated = false;
    if (is_name(cur(ps), "not")) {
        advance(ps);
        negated = true;
    }
    strv name = parse_dotted_name(ps);
    node *t = mk_node(ps, N_TEST, line);
    t->a = x;
    t->name = name;
    token *c = cur(ps);
    if (is_op(c, OP_LPAREN)) {
        parse_call_args(ps, t);
    } else if ((c->type == T_NAME || c->type == T_STRING || c->type == T_INT ||
                c->type == T_FLOAT || is_op(c, OP_LPAREN) || is_op(c, OP_LBRACKET) ||
                is_op(c, OP_LBRACE)) &&
               !is_name(c, "else") && !is_name(c, "or") && !is_name(c, "and")) {
        if (is_name(c, "is"))
            psyntax(ps, c->line, "You cannot chain multiple tests with is");
        node *arg = parse_postfix(ps, parse_primary(ps));
        t->items = pool_array(ps->mem, 1, sizeof(node *));
        t->items[0] = arg;
        t->n_items = 1;
    }
    if (negated) {
        node *n = mk_node(ps, N_NOT, line);
        n->a = t;
        return n;
    }
    return t;
}

static node *parse_filter_expr(parser *ps, node *x)
{
    for (;;) {
        token *t = cur(ps);
        if (is_op(t, OP_PIPE))
            x = parse_filter(ps, x, false);
        else if (is_name(t, "is"))
            x = parse_test(ps, x);
        else if (is_op(t, OP_LPAREN))
            x = parse_call(ps, x);
        else
            return x;
    }
}

static node *parse_subscribed(parser *ps)
{
    int32_t line = cur(ps)->line;
    node *args[3] = {NULL, NULL, NULL};
    if (is_op(cur(ps), OP_COLON)) {
        advance(ps);
    } else {
        node *x = parse_expression(ps, true);
        if (!is_op(cur(ps), OP_COLON))
            return x;
        advance(ps);
        args[0] = x;
    }
    if (!is_op(cur(ps), OP_COLON) && !is_op(cur(ps), OP_RBRACKET) && !is_op(cur(ps), OP_COMMA))
        args[1] = parse_expression(ps, true);
    if (is_op(cur(ps), OP_COLON)) {
        advance(ps);
        if (!is_op(cur(ps), OP_RBRACKET) && !is_op(cur(ps), OP_COMMA))
            args[2] = parse_expression(ps, true);
    }
    node *s = mk_node(ps, N_SLICE, line);
    s->a = args[0];
    s->b = args[1];
    s->c = args[2];
    return s;
}

static node *parse_subscript(parser *ps, node *x)
{
    token *t = cur(ps);
    advance(ps);
    if (t->type == T_OP && t->op == OP_DOT) {
        token *a = cur(ps);
        advance(ps);
        if (a->type == T_NAME) {
            node *g = mk_node(ps, N_GETATTR, t->line);
            g->a = x;
            g->name = (strv){a->p, a->n};
            return g;
        }
        if (a->type != T_INT)
            psyntax(ps, a->line, "expected name or number");
        node *k = mk_node(ps, N_CONST, a->line);
        k->k = mk_int(a->i);
        node *g = mk_node(ps, N_GETITEM, t->line);
        g->a = x;
        g->b = k;
        return g;
    }
    /* '[' */
    nvec args = {0};
    while (!is_op(cur(ps), OP_RBRACKET)) {
        if (args.n)
            expect_op(ps, OP_COMMA, ",");
        nvec_push(ps, &args, parse_subscribed(ps));
    }
    expect_op(ps, OP_RBRACKET, "]");
    node *g = mk_node(ps, N_GETITEM, t->line);
    g->a = x;
    if (args.n == 1) {
        g->b = args.v[0];
    } else {
        node *tu = mk_node(ps, N_TUPLE, t->line);
        tu->items = args.v;
        tu->n_items = args.n;
        g->b = tu;
    }
    return g;
}

static node *parse_postfix(parser *ps, node *x)
{
    for (;;) {
        token *t = cur(ps);
        if (is_op(t, OP_DOT) || is_op(t, OP_LBRACKET))
            x = parse_subscript(ps, x);
        else if (is_op(t, OP_LPAREN))
            x = parse_call(ps, x);
        else
            return x;
    }
}

static node *parse_list(parser *ps)
{
    int32_t line = cur(ps)->line;
    expect_op(ps, OP_LBRACKET, "[");
    nvec items = {0};
    while (!is_op(cur(ps), OP_RBRACKET)) {
        if (items.n)
            expect_op(ps, OP_COMMA, ",");
        if (is_op(cur(ps), OP_RBRACKET))
            break;
        nvec_push(ps, &items, parse_expression(ps, true));
    }
    expect_op(ps, OP_RBRACKET, "]");
    node *x = mk_node(ps, N_LIST, line);
    x->items = items.v;
    x->n_items = items.n;
    return x;
}

static node *parse_dict(parser *ps)
{
    int32_t line = cur(ps)->line;
    expect_op(ps, OP_LBRACE, "{");
    nvec keys = {0}, vals = {0};
    while (!is_op(cur(ps), OP_RBRACE)) {
        if (keys.n)
            expect_op(ps, OP_COMMA, ",");
        if (is_op(cur(ps), OP_RBRACE))
            break;
        nvec_push(ps, &keys, parse_expression(ps, true));
        expect_op(ps, OP_COLON, ":");
        nvec_push(ps, &vals, parse_expression(ps, true));
    }
    expect_op(ps, OP_RBRACE, "}");
    node *x = mk_node(ps, N_DICT, line);
    x->items = keys.v;
    x->n_items = keys.n;
    x->items2 = vals.v;
    x->n_items2 = vals.n;
    return x;
}

static node *parse_primary(parser *ps)
{
    token *t = cur(ps);
    node *x;
    enter(ps);
    if (t->type == T_NAME) {
        strv v = {t->p, t->n};
        if (strv_eq(v, "true") || strv_eq(v, "false") || strv_eq(v, "True") ||
            strv_eq(v, "False")) {
            x = mk_node(ps, N_CONST, t->line);
            x->k = mk_bool(strv_eq(v, "true") || strv_eq(v, "True"));
        } else if (strv_eq(v, "none") || strv_eq(v, "None")) {
            x = mk_node(ps, N_CONST, t->line);
            x->k = mk_none();
        } else {
            x = mk_node(ps, N_NAME, t->line);
            x->name = v;
        }
        advance(ps);
    } else if (t->type == T_STRING) {
        int32_t line = t->line;
        advance(ps);
        if (cur(ps)->type != T_STRING) {
            x = mk_node(ps, N_CONST, line);
            x->k = mk_str(t->p, t->n);
        } else { /* adjacent literals concatenate */
            sbuf b = {.limit = SIZE_MAX / 4, .c = ps->c};
            sbuf_put(&b, t->p, t->n);
            while (cur(ps)->type == T_STRING) {
                sbuf_put(&b, cur(ps)->p, cur(ps)->n);
                advance(ps);
            }
            x = mk_node(ps, N_CONST, line);
            x->k = mk_str(b.n ? pool_strdup(ps->mem, b.p, b.n) : "", b.n);
            free(b.p);
        }
    } else if (t->type == T_INT || t->type == T_FLOAT) {
        x = mk_node(ps, N_CONST, t->line);
        x->k = t->type == T_INT ? mk_int(t->i) : mk_float(t->d);
        advance(ps);
    } else if (is_op(t, OP_LPAREN)) {
        advance(ps);
        x = parse_tuple(ps, false, true, NULL, true);
        expect_op(ps, OP_RPAREN, ")");
    } else if (is_op(t, OP_LBRACKET)) {
        x = parse_list(ps);
    } else if (is_op(t, OP_LBRACE)) {
        x = parse_dict(ps);
    } else {
        if (t->type == T_EOF)
            psyntax(ps, t->line, "unexpected end of template");
        psyntax(ps, t->line, "unexpected '%s'", describe(t));
    }
    leave(ps);
    return x;
}

static node *parse_unary(parser *ps, bool with_filter)
{
    token *t = cur(ps);
    node *x;
    enter(ps);
    if (is_op(t, OP_SUB) || is_op(t, OP_ADD)) {
        advance(ps);
        x = mk_node(ps, t->op == OP_SUB ? N_NEG : N_POS, t->line);
        x->a = parse_unary(ps, false);
    } else {
        x = parse_primary(ps);
    }
    x = parse_postfix(ps, x);
    if (with_filter)
        x = parse_filter_expr(ps, x);
    leave(ps);
    return x;
}

static node *mk_bin(parser *ps, nkind kind, uint8_t op, int32_t line, node *a, node *b)
{
    node *x = mk_node(ps, kind, line);
    x->op = op;
    x->a = a;
    x->b = b;
    return x;
}

static node *parse_pow(parser *ps)
{
    int32_t line = cur(ps)->line;
    node *left = parse_unary(ps, true);
    while (is_op(cur(ps), OP_POW)) {
        advance(ps);
        left = mk_bin(ps, N_BINOP, OPB_POW, line, left, parse_unary(ps, true));
        line = cur(ps)->line;
    }
    return left;
}

static node *parse_math2(parser *ps)
{
    int32_t line = cur(ps)->line;
    node *left = parse_pow(ps);
    for (;;) {
        token *t = cur(ps);
        uint8_t op;
        if (is_op(t, OP_MUL))
            op = OPB_MUL;
        else if (is_op(t, OP_DIV))
            op = OPB_DIV;
        else if (is_op(t, OP_FLOORDIV))
            op = OPB_FLOORDIV;
        else if (is_op(t, OP_MOD))
            op = OPB_MOD;
        else
            return left;
        advance(ps);
        left = mk_bin(ps, N_BINOP, op, line, left, parse_pow(ps));
        line = cur(ps)->line;
    }
}

static node *parse_concat(parser *ps)
{
    int32_t line = cur(ps)->line;
    node *first = parse_math2(ps);
    if (!is_op(cur(ps), OP_TILDE))
        return first;
    nvec args = {0};
    nvec_push(ps, &args, first);
    while (is_op(cur(ps), OP_TILDE)) {
        advance(ps);
        nvec_push(ps, &args, parse_math2(ps));
    }
    node *x = mk_node(ps, N_CONCAT, line);
    x->items = args.v;
    x->n_items = args.n;
    return x;
}

static node *parse_math1(parser *ps)
{
    int32_t line = cur(ps)->line;
    node *left = parse_concat(ps);
    while (is_op(cur(ps), OP_ADD) || is_op(cur(ps), OP_SUB)) {
        uint8_t op = is_op(cur(ps), OP_ADD) ? OPB_ADD : OPB_SUB;
        advance(ps);
        left = mk_bin(ps, N_BINOP, op, line, left, parse_concat(ps));
        line = cur(ps)->line;
    }
    return left;
}

static node *parse_compare(parser *ps)
{
    int32_t line = cur(ps)->line;
    node *expr = parse_math1(ps);
    nvec operands = {0};
    uint8_t ops[64];
    for (;;) {
        token *t = cur(ps);
        uint8_t op;
        if (t->type == T_OP && (t->op == OP_EQ || t->op == OP_NE || t->op == OP_LT ||
                                t->op == OP_LTEQ || t->op == OP_GT || t->op == OP_GTEQ)) {
            op = t->op == OP_EQ     ? CMP_EQ
                 : t->op == OP_NE   ? CMP_NE
                 : t->op == OP_LT   ? CMP_LT
                 : t->op == OP_LTEQ ? CMP_LTEQ
                 : t->op == OP_GT   ? CMP_GT
                                    : CMP_GTEQ;
            advance(ps);
        } else if (is_name(t, "in")) {
            op = CMP_IN;
            advance(ps);
        } else if (is_name(t, "not") && is_name(look(ps), "in")) {
            op = CMP_NOTIN;
            advance(ps);
            advance(ps);
        } else {
            break;
        }
        if (operands.n == (int32_t)sizeof ops)
            psyntax(ps, t->line, "more than %d chained comparisons", (int)sizeof ops);
        ops[operands.n] = op;
        nvec_push(ps, &operands, parse_math1(ps));
        line = cur(ps)->line;
    }
    if (!operands.n)
        return expr;
    node *x = mk_node(ps, N_COMPARE, line);
    x->a = expr;
    x->items = operands.v;
    x->n_items = operands.n;
    x->ops = pool_alloc(ps->mem, (size_t)operands.n);
    memcpy(x->ops, ops, (size_t)operands.n);
    return x;
}

static node *parse_not(parser *ps)
{
    if (is_name(cur(ps), "not")) {
        int32_t line = cur(ps)->line;
        advance(ps);
        enter(ps);
        node *x = mk_node(ps, N_NOT, line);
        x->a = parse_not(ps);
        leave(ps);
        return x;
    }
    return parse_compare(ps);
}

static node *parse_and(parser *ps)
{
    int32_t line = cur(ps)->line;
    node *left = parse_not(ps);
    while (is_name(cur(ps), "and")) {
        advance(ps);
        left = mk_bin(ps, N_AND, 0, line, left, parse_not(ps));
        line = cur(ps)->line;
    }
    return left;
}

static node *parse_or(parser *ps)
{
    int32_t line = cur(ps)->line;
    node *left = parse_and(ps);
    while (is_name(cur(ps), "or")) {
        advance(ps);
        left = mk_bin(ps, N_OR, 0, line, left, parse_and(ps));
        line = cur(ps)->line;
    }
    return left;
}

static node *parse_condexpr(parser *ps)
{
    int32_t line = cur(ps)->line;
    enter(ps);
    node *expr1 = parse_or(ps);
    while (is_name(cur(ps), "if")) {
        advance(ps);
        node *x = mk_node(ps, N_COND, line);
        x->a = parse_or(ps);
        x->b = expr1;
        if (is_name(cur(ps), "else")) {
            advance(ps);
            x->c = parse_condexpr(ps);
        }
        expr1 = x;
        line = cur(ps)->line;
    }
    leave(ps);
    return expr1;
}

static node *parse_expression(parser *ps, bool with_condexpr)
{
    return with_condexpr ? parse_condexpr(ps) : parse_or(ps);
}

static bool is_tuple_end(parser *ps, const char *extra_end)
{
    token *t = cur(ps);
    if (t->type == T_VAR_END || t->type == T_BLOCK_END || is_op(t, OP_RPAREN))
        return true;
    return extra_end && is_name(t, extra_end);
}

static node *parse_tuple(parser *ps, bool simplified, bool with_condexpr, const char *extra_end,
                         bool explicit_parens)
{
    int32_t line = cur(ps)->line;
    nvec args = {0};
    bool is_tuple = false;
    for (;;) {
        if (args.n)
            expect_op(ps, OP_COMMA, ",");
        if (is_tuple_end(ps, extra_end))
            break;
        nvec_push(ps, &args, simplified ? parse_primary(ps) : parse_expression(ps, with_condexpr));
        if (is_op(cur(ps), OP_COMMA))
            is_tuple = true;
        else
            break;
        line = cur(ps)->line;
    }
    if (!is_tuple) {
        if (args.n)
            return args.v[0];
        if (!explicit_parens) {
            token *t = cur(ps);
            psyntax(ps, t->line, "Expected an expression, got '%s'", describe(t));
        }
    }
    node *x = mk_node(ps, N_TUPLE, line);
    x->items = args.v;
    x->n_items = args.n;
    return x;
}

static bool is_reserved_name(strv s)
{
    return strv_eq(s, "true") || strv_eq(s, "false") || strv_eq(s, "none") || strv_eq(s, "True") ||
           strv_eq(s, "False") || strv_eq(s, "None");
}

static bool can_assign(const node *x)
{
    if (x->kind == N_NAME)
        return !is_reserved_name(x->name);
    if (x->kind == N_TUPLE) {
        for (int32_t i = 0; i < x->n_items; i++)
            if (!can_assign(x->items[i]))
                return false;
        return true;
    }
    return x->kind == N_NSREF;
}

static node *parse_assign_target(parser *ps, bool with_tuple, bool name_only, const char *extra_end,
                                 bool with_namespace)
{
    token *t = cur(ps);
    node *x;
    if (with_namespace && t->type == T_NAME && is_op(look(ps), OP_DOT)) {
        advance(ps);
        advance(ps);
        token *a = cur(ps);
        expect_type(ps, T_NAME, "name");
        x = mk_node(ps, N_NSREF, t->line);
        x->name = (strv){t->p, t->n};
        x->attr = (strv){a->p, a->n};
    } else if (name_only) {
        expect_type(ps, T_NAME, "name");
        x = mk_node(ps, N_NAME, t->line);
        x->name = (strv){t->p, t->n};
    } else if (with_tuple) {
        x = parse_tuple(ps, true, true, extra_end, false);
    } else {
        x = parse_primary(ps);
    }
    if (!can_assign(x))
        psyntax(ps, x->line, "can't assign to this expression");
    return x;
}

static nvec subparse(parser *ps, const char *const *end_tokens);

/* ':'? block_end, then statements until one of end_tokens (left current unless drop). */
static nvec parse_statements(parser *ps, const char *const *end_tokens, bool drop_needle)
{
    if (is_op(cur(ps), OP_COLON))
        advance(ps);
    expect_type(ps, T_BLOCK_END, "end of statement block");
    nvec body = subparse(ps, end_tokens);
    if (cur(ps)->type == T_EOF) {
        char want[256];
        size_t k = 0;
        for (int i = 0; end_tokens[i] && k < sizeof want - 32; i++)
            k += (size_t)snprintf(want + k, sizeof want - k, "%s'%s'", i ? " or " : "",
                                  end_tokens[i]);
        psyntax(ps, cur(ps)->line, "Unexpected end of template. Jinja was looking for %s", want);
    }
    if (drop_needle)
        advance(ps);
    return body;
}

static node *parse_for(parser *ps)
{
    int32_t line = cur(ps)->line;
    advance(ps);
    node *x = mk_node(ps, N_FOR, line);
    x->a = parse_assign_target(ps, true, false, "in", false);
    if (!is_name(cur(ps), "in"))
        psyntax(ps, cur(ps)->line, "expected token 'in', got '%s'", describe(cur(ps)));
    advance(ps);
    x->b = parse_tuple(ps, false, false, "recursive", false);
    if (is_name(cur(ps), "if")) {
        advance(ps);
        x->c = parse_expression(ps, true);
    }
    if (is_name(cur(ps), "recursive"))
        jthrow(ps->c, FERRY_ERR_UNSUPPORTED, line, "recursive for loops are not supported");
    static const char *const ends[] = {"endfor", "else", NULL};
    ps->loop_depth++;
    nvec body = parse_statements(ps, ends, false);
    ps->loop_depth--;
    x->items = body.v;
    x->n_items = body.n;
    bool is_else = is_name(cur(ps), "else");
    advance(ps);
    if (is_else) {
        static const char *const ends2[] = {"endfor", NULL};
        nvec eb = parse_statements(ps, ends2, true);
        x->items2 = eb.v;
        x->n_items2 = eb.n;
    }
    return x;
}

static node *parse_if(parser *ps)
{
    int32_t line = cur(ps)->line;
    advance(ps);
    node *result = mk_node(ps, N_IF, line), *x = result;
    static const char *const ends[] = {"elif", "else", "endif", NULL};
    static const char *const ends2[] = {"endif", NULL};
    for (;;) {
        x->a = parse_tuple(ps, false, false, NULL, false);
        nvec body = parse_statements(ps, ends, false);
        x->items = body.v;
        x->n_items = body.n;
        token *t = cur(ps);
        advance(ps);
        if (is_name(t, "elif")) {
            node *e = mk_node(ps, N_IF, cur(ps)->line);
            x->items2 = pool_array(ps->mem, 1, sizeof(node *));
            x->items2[0] = e;
            x->n_items2 = 1;
            x = e;
            continue;
        }
        if (is_name(t, "else")) {
            nvec eb = parse_statements(ps, ends2, true);
            x->items2 = eb.v;
            x->n_items2 = eb.n;
        }
        return result;
    }
}

static node *parse_set(parser *ps)
{
    int32_t line = cur(ps)->line;
    advance(ps);
    node *target = parse_assign_target(ps, true, false, NULL, true);
    if (is_op(cur(ps), OP_ASSIGN)) {
        advance(ps);
        node *x = mk_node(ps, N_SET, line);
        x->a = target;
        x->b = parse_tuple(ps, false, true, NULL, false);
        return x;
    }
    node *x = mk_node(ps, N_SETBLOCK, line);
    x->a = target;
    x->c = parse_filter(ps, NULL, false);
    static const char *const ends[] = {"endset", NULL};
    nvec body = parse_statements(ps, ends, true);
    x->items = body.v;
    x->n_items = body.n;
    return x;
}

static bool refers_to(const node *x, const char *name);

static bool refers_to_list(node *const *v, int32_t n, const char *name)
{
    for (int32_t i = 0; i < n; i++)
        if (v[i] && refers_to(v[i], name))
            return true;
    return false;
}

/* Whether the tree loads the name (Jinja2 decides a macro's varargs/kwargs/caller so). */
static bool refers_to(const node *x, const char *name)
{
    if (!x)
        return false;
    if (x->kind == N_NAME && strv_eq(x->name, name))
        return true;
    return refers_to(x->a, name) || refers_to(x->b, name) || refers_to(x->c, name) ||
           refers_to(x->d, name) || refers_to_list(x->items, x->n_items, name) ||
           refers_to_list(x->items2, x->n_items2, name) ||
           refers_to_list(x->items3, x->n_items3, name);
}

static node *parse_macro(parser *ps)
{
    int32_t line = cur(ps)->line;
    advance(ps);
    node *x = mk_node(ps, N_MACRO, line);
    node *nm = parse_assign_target(ps, false, true, NULL, false);
    x->name = nm->name;
    expect_op(ps, OP_LPAREN, "(");
    nvec args = {0}, defs = {0};
    bool any_default = false;
    while (!is_op(cur(ps), OP_RPAREN)) {
        if (args.n)
            expect_op(ps, OP_COMMA, ",");
        node *arg = parse_assign_target(ps, false, true, NULL, false);
        node *def = NULL;
        if (is_op(cur(ps), OP_ASSIGN)) {
            advance(ps);
            def = parse_expression(ps, true);
            any_default = true;
        } else if (any_default) {
            psyntax(ps, arg->line, "non-default argument follows default argument");
        }
        nvec_push(ps, &args, arg);
        nvec_push(ps, &defs, def);
    }
    expect_op(ps, OP_RPAREN, ")");
    x->items = args.v;
    x->n_items = args.n;
    x->items2 = defs.v;
    x->n_items2 = defs.n;
    static const char *const ends[] = {"endmacro", NULL};
    int32_t saved = ps->loop_depth;
    ps->loop_depth = 0;
    nvec body = parse_statements(ps, ends, true);
    ps->loop_depth = saved;
    x->items3 = body.v;
    x->n_items3 = body.n;
    bool declared_varargs = false, declared_kwargs = false, declared_caller = false;
    for (int32_t i = 0; i < args.n; i++) {
        declared_varargs |= strv_eq(args.v[i]->name, "varargs");
        declared_kwargs |= strv_eq(args.v[i]->name, "kwargs");
        declared_caller |= strv_eq(args.v[i]->name, "caller");
    }
    if (!declared_varargs && refers_to_list(body.v, body.n, "varargs"))
        x->op |= MACRO_VARARGS;
    if (!declared_kwargs && refers_to_list(body.v, body.n, "kwargs"))
        x->op |= MACRO_KWARGS;
    if (!declared_caller && refers_to_list(body.v, body.n, "caller"))
        x->op |= MACRO_CALLER;
    return x;
}

static node *parse_with(parser *ps)
{
    int32_t line = cur(ps)->line;
    advance(ps);
    node *x = mk_node(ps, N_WITH, line);
    nvec targets = {0}, values = {0};
    while (cur(ps)->type != T_BLOCK_END) {
        if (targets.n)
            expect_op(ps, OP_COMMA, ",");
        nvec_push(ps, &targets, parse_assign_target(ps, true, false, NULL, false));
        expect_op(ps, OP_ASSIGN, "=");
        nvec_push(ps, &values, parse_expression(ps, true));
    }
    static const char *const ends[] = {"endwith", NULL};
    nvec body = parse_statements(ps, ends, true);
    x->items = targets.v;
    x->n_items = targets.n;
    x->items2 = values.v;
    x->n_items2 = values.n;
    x->items3 = body.v;
    x->n_items3 = body.n;
    return x;
}

static node *parse_statement(parser *ps)
{
    token *t = cur(ps);
    if (t->type != T_NAME)
        psyntax(ps, t->line, "tag name expected");
    strv name = {t->p, t->n};
    enter(ps);
    node *x = NULL;
    if (strv_eq(name, "for")) {
        x = parse_for(ps);
    } else if (strv_eq(name, "if")) {
        x = parse_if(ps);
    } else if (strv_eq(name, "set")) {
        x = parse_set(ps);
    } else if (strv_eq(name, "macro")) {
        x = parse_macro(ps);
    } else if (strv_eq(name, "with")) {
        x = parse_with(ps);
    } else if (strv_eq(name, "filter")) {
        advance(ps);
        x = mk_node(ps, N_FILTERBLOCK, t->line);
        x->c = parse_filter(ps, NULL, true);
        static const char *const ends[] = {"endfilter", NULL};
        nvec body = parse_statements(ps, ends, true);
        x->items = body.v;
        x->n_items = body.n;
    } else if (strv_eq(name, "print")) {
        advance(ps);
        nvec items = {0};
        while (cur(ps)->type != T_BLOCK_END) {
            if (items.n)
                expect_op(ps, OP_COMMA, ",");
            nvec_push(ps, &items, parse_expression(ps, true));
        }
        x = mk_node(ps, N_OUTPUT, t->line);
        x->items = items.v;
        x->n_items = items.n;
    } else if (strv_eq(name, "break") || strv_eq(name, "continue")) {
        if (!ps->loop_depth)
            psyntax(ps, t->line, "'%.*s' outside a loop", (int)name.n, name.p);
        advance(ps);
        x = mk_node(ps, strv_eq(name, "break") ? N_BREAK : N_CONTINUE, t->line);
    } else if (strv_eq(name, "generation")) {
        /* transformers' AssistantTracker: {% generation %}...{% endgeneration %} renders its
         * body (a call block, so a scope of its own) */
        advance(ps);
        x = mk_node(ps, N_SCOPE, t->line);
        static const char *const ends[] = {"endgeneration", NULL};
        int32_t saved = ps->loop_depth;
        ps->loop_depth = 0;
        nvec body = parse_statements(ps, ends, true);
        ps->loop_depth = saved;
        x->items = body.v;
        x->n_items = body.n;
    } else if (strv_eq(name, "block") || strv_eq(name, "extends") || strv_eq(name, "include") ||
               strv_eq(name, "import") || strv_eq(name, "from") || strv_eq(name, "call") ||
               strv_eq(name, "autoescape")) {
        jthrow(ps->c, FERRY_ERR_UNSUPPORTED, t->line, "the tag '%.*s' is not supported",
               (int)name.n, name.p);
    } else {
        psyntax(ps, t->line, "Encountered unknown tag '%.*s'.", (int)name.n, name.p);
    }
    leave(ps);
    return x;
}

static bool at_end_token(parser *ps, const char *const *end_tokens)
{
    if (!end_tokens)
        return false;
    for (int i = 0; end_tokens[i]; i++)
        if (is_name(cur(ps), end_tokens[i]))
            return true;
    return false;
}

static nvec subparse(parser *ps, const char *const *end_tokens)
{
    nvec body = {0}, data = {0};
    int32_t data_line = 0;
    for (;;) {
        token *t = cur(ps);
        if (t->type == T_DATA || t->type == T_VAR_BEGIN) {
            if (!data.n)
                data_line = t->line;
            if (t->type == T_DATA) {
                node *k = mk_node(ps, N_CONST, t->line);
                k->k = mk_str(t->p, t->n);
                nvec_push(ps, &data, k);
                advance(ps);
            } else {
                advance(ps);
                nvec_push(ps, &data, parse_tuple(ps, false, true, NULL, false));
                expect_type(ps, T_VAR_END, "end of print statement");
            }
            continue;
        }
        if (data.n) {
            node *o = mk_node(ps, N_OUTPUT, data_line);
            o->items = data.v;
            o->n_items = data.n;
            nvec_push(ps, &body, o);
            data = (nvec){0};
        }
        if (t->type == T_EOF)
            return body;
        if (t->type != T_BLOCK_BEGIN)
            psyntax(ps, t->line, "unexpected '%s'", describe(t));
        advance(ps);
        if (at_end_token(ps, end_tokens))
            return body;
        node *x = parse_statement(ps);
        nvec_push(ps, &body, x);
        expect_type(ps, T_BLOCK_END, "end of statement block");
    }
}

/* ---- scopes ------------------------------------------------------------------------- */

struct frame {
    frame *parent;
    strv *names;
    jval *vals;
    int32_t n, cap;
    bool captured; /* a macro closes over it: never reused */
};

static frame *frame_new(rctx *r, frame *parent)
{
    frame *f = pool_zalloc(&r->mem, sizeof *f);
    f->parent = parent;
    return f;
}

static jval *frame_find_local(frame *f, strv name)
{
    for (int32_t i = f->n - 1; i >= 0; i--)
        if (strv_same(f->names[i], name))
            return &f->vals[i];
    return NULL;
}

static jval *frame_lookup(frame *f, strv name)
{
    for (; f; f = f->parent) {
        jval *v = frame_find_local(f, name);
        if (v)
            return v;
    }
    return NULL;
}

static void frame_set(rctx *r, frame *f, strv name, jval v)
{
    jval *slot = frame_find_local(f, name);
    if (slot) {
        *slot = v;
        return;
    }
    if (f->n == f->cap) {
        int32_t cap = f->cap ? f->cap * 2 : 8;
        strv *nn = pool_array(&r->mem, (size_t)cap, sizeof(strv));
        jval *nv = pool_array(&r->mem, (size_t)cap, sizeof(jval));
        if (f->n) {
            memcpy(nn, f->names, (size_t)f->n * sizeof(strv));
            memcpy(nv, f->vals, (size_t)f->n * sizeof(jval));
        }
        f->names = nn;
        f->vals = nv;
        f->cap = cap;
    }
    f->names[f->n] = name;
    f->vals[f->n] = v;
    f->n++;
}

/* ---- limits ------------------------------------------------------------------------- */

static void count_step(rctx *r, int32_t line)
{
    if (++r->steps > r->lim.max_steps)
        rfail(r, line, "rendering takes more than %" PRId64 " steps (the limit)", r->lim.max_steps);
}

static void enter_depth(rctx *r, int32_t line)
{
    if (++r->depth > r->lim.max_depth)
        rfail(r, line, "rendering nests deeper than %d levels (the limit)", (int)r->lim.max_depth);
}

/* A buffer for output being captured (set blocks, macros) or a string being built. The
 * struct lives in the pool and is on the render's open list until sbuf_close, so an
 * unwinding error frees its memory. */
static sbuf *sbuf_new(rctx *r)
{
    sbuf *b = pool_zalloc(&r->mem, sizeof *b);
    b->limit = r->lim.max_output_bytes;
    b->c = &r->c;
    b->prev_open = r->open_bufs;
    r->open_bufs = b;
    return b;
}

static void sbuf_close(rctx *r, sbuf *b)
{
    /* buffers close in the reverse order they opened */
    r->open_bufs = b->prev_open;
    free(b->p);
    b->p = NULL;
}

/* The buffer's text copied into the pool. */
static jval sbuf_to_str(rctx *r, const sbuf *b)
{
    if (!b->n)
        return mk_str("", 0);
    return mk_str(pool_strdup(&r->mem, b->p, b->n), b->n);
}

static jval sbuf_done(rctx *r, sbuf *b)
{
    jval v = sbuf_to_str(r, b);
    sbuf_close(r, b);
    return v;
}

/* ---- strings ------------------------------------------------------------------------ */

static bool is_ascii(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] >= 0x80)
            return false;
    return true;
}

/* Byte offsets of the code points of s (n_cp + 1 entries, the last = s.n). NULL when s is
 * ASCII (offset = index). */
static size_t *cp_offsets(rctx *r, strv s, size_t *n_cp)
{
    if (is_ascii(s.p, s.n)) {
        *n_cp = s.n;
        return NULL;
    }
    size_t k = utf8_count(s.p, s.n);
    size_t *off = pool_array(&r->mem, k + 1, sizeof(size_t));
    size_t j = 0;
    for (size_t i = 0; i < s.n;) {
        int32_t cp;
        off[j++] = i;
        i += utf8_next(s.p, s.n, i, &cp);
    }
    off[k] = s.n;
    *n_cp = k;
    return off;
}

static size_t cp_len(strv s) { return is_ascii(s.p, s.n) ? s.n : utf8_count(s.p, s.n); }

/* The code point index of byte offset b in s. */
static int64_t cp_index(strv s, size_t b)
{
    return is_ascii(s.p, b) ? (int64_t)b : (int64_t)utf8_count(s.p, b);
}

/* str(v) as a string. */
static strv str_of(rctx *r, int32_t line, const jval *v)
{
    if (v->t == JV_STR)
        return (strv){v->u.s.p, v->u.s.n};
    if (v->t == JV_UNDEF)
        return (strv){"", 0};
    sbuf *b = sbuf_new(r);
    put_str(r, line, b, v);
    jval s = sbuf_done(r, b);
    return (strv){s.u.s.p, s.u.s.n};
}

static jval str_case(rctx *r, strv s, int mode)
{
    sbuf *b = sbuf_new(r);
    for (size_t i = 0; i < s.n;) {
        int32_t c;
        size_t k = utf8_next(s.p, s.n, i, &c);
        if (mode == CASE_LOWER && c == 0x03A3 && final_sigma(s.p, s.n, i, k))
            sbuf_put_cp(b, 0x03C2);
        else
            sbuf_put_case(b, c, mode);
        i += k;
    }
    return sbuf_done(r, b);
}

static bool is_cased(int32_t c)
{
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LL || k == UTF8PROC_CATEGORY_LT ||
           utf8proc_tolower(c) != c || utf8proc_toupper(c) != c;
}

/* Python's str.title(). */
static jval str_title_py(rctx *r, strv s)
{
    sbuf *b = sbuf_new(r);
    bool prev_cased = false;
    for (size_t i = 0; i < s.n;) {
        int32_t c;
        size_t k = utf8_next(s.p, s.n, i, &c);
        if (prev_cased) {
            if (c == 0x03A3 && final_sigma(s.p, s.n, i, k))
                sbuf_put_cp(b, 0x03C2);
            else
                sbuf_put_case(b, c, CASE_LOWER);
        } else {
            sbuf_put_case(b, c, CASE_TITLE);
        }
        prev_cased = is_cased(c);
        i += k;
    }
    return sbuf_done(r, b);
}

/* Python's str.capitalize() (3.8+: the first character title-cased). */
static jval str_capitalize(rctx *r, strv s)
{
    sbuf *b = sbuf_new(r);
    for (size_t i = 0; i < s.n;) {
        int32_t c;
        size_t k = utf8_next(s.p, s.n, i, &c);
        if (i == 0)
            sbuf_put_case(b, c, CASE_TITLE);
        else if (c == 0x03A3 && final_sigma(s.p, s.n, i, k))
            sbuf_put_cp(b, 0x03C2);
        else
            sbuf_put_case(b, c, CASE_LOWER);
        i += k;
    }
    return sbuf_done(r, b);
}

/* Jinja2's title filter: each piece after a run of [-\s({\[<] gets item[0].upper() +
 * item[1:].lower(). */
static jval str_title_jinja(rctx *r, strv s)
{
    sbuf *b = sbuf_new(r);
    size_t i = 0;
    while (i < s.n) {
        /* a delimiter run, then a word */
        bool delim_run = false;
        size_t start = i;
        for (;;) {
            if (i >= s.n)
                break;
            int32_t c;
            size_t k = utf8_next(s.p, s.n, i, &c);
            bool d = c == '-' || c == '(' || c == '{' || c == '[' || c == '<' || py_isspace(c);
            if (i == start)
                delim_run = d;
            if (d != delim_run)
                break;
            i += k;
        }
        strv piece = {s.p + start, i - start};
        int32_t c0;
        size_t k0 = utf8_next(piece.p, piece.n, 0, &c0);
        sbuf_put_case(b, c0, CASE_UPPER);
        strv rest = {piece.p + k0, piece.n - k0};
        for (size_t j = 0; j < rest.n;) {
            int32_t c;
            size_t k = utf8_next(rest.p, rest.n, j, &c);
            if (c == 0x03A3 && final_sigma(rest.p, rest.n, j, k))
                sbuf_put_cp(b, 0x03C2);
            else
                sbuf_put_case(b, c, CASE_LOWER);
            j += k;
        }
    }
    return sbuf_done(r, b);
}

/* Whether c is one of the code points of chars. */
static bool in_chars(strv chars, int32_t c)
{
    for (size_t i = 0; i < chars.n;) {
        int32_t d;
        i += utf8_next(chars.p, chars.n, i, &d);
        if (d == c)
            return true;
    }
    return false;
}

/* Python's strip/lstrip/rstrip; chars NULL: whitespace. */
static strv str_strip(strv s, const strv *chars, bool left, bool right)
{
    size_t a = 0, z = s.n;
    if (left)
        while (a < z) {
            int32_t c;
            size_t k = utf8_next(s.p, z, a, &c);
            if (chars ? !in_chars(*chars, c) : !py_isspace(c))
                break;
            a += k;
        }
    if (right)
        while (z > a) {
            size_t j = z - 1;
            while (j > a && ((unsigned char)s.p[j] & 0xC0) == 0x80)
                j--;
            int32_t c;
            utf8_next(s.p, z, j, &c);
            if (chars ? !in_chars(*chars, c) : !py_isspace(c))
                break;
            z = j;
        }
    return (strv){s.p + a, z - a};
}

static const char *memmem_s(const char *h, size_t hn, const char *nd, size_t nn)
{
    if (!nn)
        return h;
    if (nn > hn)
        return NULL;
    return memmem(h, hn, nd, nn);
}

static const char *memrmem_s(const char *h, size_t hn, const char *nd, size_t nn)
{
    if (nn > hn)
        return NULL;
    for (size_t i = hn - nn + 1; i > 0; i--)
        if (!memcmp(h + i - 1, nd, nn))
            return h + i - 1;
    return NULL;
}

/* Python's str.replace. */
static jval str_replace(rctx *r, int32_t line, strv s, strv old, strv new_, int64_t count)
{
    sbuf *b = sbuf_new(r);
    if (!old.n) {
        /* between every character, count times at most */
        size_t i = 0;
        int64_t done = 0;
        for (;;) {
            count_step(r, line);
            if (count < 0 || done < count) {
                sbuf_put(b, new_.p, new_.n);
                done++;
            }
            if (i >= s.n)
                break;
            int32_t c;
            size_t k = utf8_next(s.p, s.n, i, &c);
            sbuf_put(b, s.p + i, k);
            i += k;
        }
        return sbuf_done(r, b);
    }
    size_t i = 0;
    int64_t done = 0;
    while (i <= s.n && (count < 0 || done < count)) {
        const char *hit = memmem_s(s.p + i, s.n - i, old.p, old.n);
        if (!hit)
            break;
        size_t at = (size_t)(hit - s.p);
        sbuf_put(b, s.p + i, at - i);
        sbuf_put(b, new_.p, new_.n);
        i = at + old.n;
        done++;
        count_step(r, line);
    }
    sbuf_put(b, s.p + i, s.n - i);
    return sbuf_done(r, b);
}

/* Python's str.split / rsplit. */
static jval str_split(rctx *r, int32_t line, strv s, const strv *sep, int64_t maxsplit,
                      bool from_right)
{
    jval out = mk_list(r, 0, LK_LIST);
    jlist *l = out.u.list;
    if (sep && !sep->n)
        rfail(r, line, "empty separator");
    if (maxsplit < 0)
        maxsplit = INT64_MAX;
    if (!from_right) {
        if (!sep) {
            size_t i = 0;
            int64_t splits = 0;
            for (;;) {
                /* skip whitespace */
                while (i < s.n) {
                    int32_t c;
                    size_t k = utf8_next(s.p, s.n, i, &c);
                    if (!py_isspace(c))
                        break;
                    i += k;
                }
                if (i >= s.n)
                    break;
                if (splits == maxsplit) {
                    list_push(r, l, mk_str(s.p + i, s.n - i));
                    break;
                }
                size_t start = i;
                while (i < s.n) {
                    int32_t c;
                    size_t k = utf8_next(s.p, s.n, i, &c);
                    if (py_isspace(c))
                        break;
                    i += k;
                }
                list_push(r, l, mk_str(s.p + start, i - start));
                splits++;
                count_step(r, line);
            }
            return out;
        }
        size_t i = 0;
        int64_t splits = 0;
        for (;;) {
            const char *hit = splits < maxsplit ? memmem_s(s.p + i, s.n - i, sep->p, sep->n) : NULL;
            if (!hit) {
                list_push(r, l, mk_str(s.p + i, s.n - i));
                return out;
            }
            size_t at = (size_t)(hit - s.p);
            list_push(r, l, mk_str(s.p + i, at - i));
            i = at + sep->n;
            splits++;
            count_step(r, line);
        }
    }
    /* from the right: collect reversed, then reverse */
    if (!sep) {
        size_t z = s.n;
        int64_t splits = 0;
        for (;;) {
            while (z > 0) {
                size_t j = z - 1;
                while (j > 0 && ((unsigned char)s.p[j] & 0xC0) == 0x80)
                    j--;
                int32_t c;
                utf8_next(s.p, s.n, j, &c);
                if (!py_isspace(c))
                    break;
                z = j;
            }
            if (z == 0)
                break;
            if (splits == maxsplit) {
                list_push(r, l, mk_str(s.p, z));
                break;
            }
            size_t end = z;
            while (z > 0) {
                size_t j = z - 1;
                while (j > 0 && ((unsigned char)s.p[j] & 0xC0) == 0x80)
                    j--;
                int32_t c;
                utf8_next(s.p, s.n, j, &c);
                if (py_isspace(c))
                    break;
                z = j;
            }
            list_push(r, l, mk_str(s.p + z, end - z));
            splits++;
            count_step(r, line);
        }
    } else {
        size_t z = s.n;
        int64_t splits = 0;
        for (;;) {
            const char *hit = splits < maxsplit ? memrmem_s(s.p, z, sep->p, sep->n) : NULL;
            if (!hit) {
                list_push(r, l, mk_str(s.p, z));
                break;
            }
            size_t at = (size_t)(hit - s.p);
            list_push(r, l, mk_str(s.p + at + sep->n, z - at - sep->n));
            z = at;
            splits++;
            count_step(r, line);
        }
    }
    for (size_t i = 0; i < l->n / 2; i++) {
        jval t = l->v[i];
        l->v[i] = l->v[l->n - 1 - i];
        l->v[l->n - 1 - i] = t;
    }
    return out;
}

/* Python's str.splitlines. */
static jval str_splitlines(rctx *r, int32_t line, strv s, bool keepends)
{
    jval out = mk_list(r, 0, LK_LIST);
    size_t i = 0, start = 0;
    while (i < s.n) {
        int32_t c;
        size_t k = utf8_next(s.p, s.n, i, &c);
        if (py_islinebreak(c)) {
            size_t end = i;
            i += k;
            if (c == '\r' && i < s.n && s.p[i] == '\n')
                i++;
            list_push(r, out.u.list, mk_str(s.p + start, (keepends ? i : end) - start));
            start = i;
            count_step(r, line);
        } else {
            i += k;
        }
    }
    if (start < s.n)
        list_push(r, out.u.list, mk_str(s.p + start, s.n - start));
    return out;
}

/* markupsafe.escape of a plain string. */
static jval html_escape(rctx *r, strv s)
{
    sbuf *b = sbuf_new(r);
    for (size_t i = 0; i < s.n; i++) {
        switch (s.p[i]) {
        case '&': sbuf_puts(b, "&amp;"); break;
        case '<': sbuf_puts(b, "&lt;"); break;
        case '>': sbuf_puts(b, "&gt;"); break;
        case '\'': sbuf_puts(b, "&#39;"); break;
        case '"': sbuf_puts(b, "&#34;"); break;
        default: sbuf_putc(b, s.p[i]);
        }
    }
    jval v = sbuf_done(r, b);
    v.f = STR_MARKUP;
    return v;
}

/* escape(v): a Markup stays, anything else is str()'d and escaped. */
static jval markup_escape(rctx *r, int32_t line, const jval *v)
{
    if (v->t == JV_STR && (v->f & STR_MARKUP))
        return *v;
    return html_escape(r, str_of(r, line, v));
}

/* ---- iteration ---------------------------------------------------------------------- */

/* The items iterating v gives (Python's iter()): an array that must not be modified, and
 * its count. Consumes a one-shot iterator. Fails for what is not iterable. */
static const jval *iterate(rctx *r, int32_t line, const jval *v, size_t *n)
{
    switch ((jtype)v->t) {
    case JV_UNDEF: *n = 0; return NULL;
    case JV_LIST: *n = v->u.list->n; return v->u.list->v;
    case JV_DICT: *n = v->u.dict->n; return v->u.dict->k;
    case JV_ITER: {
        jiter *it = v->u.it;
        const jval *p = it->v + it->pos;
        *n = it->n - it->pos;
        it->pos = it->n;
        return p;
    }
    case JV_VIEW: {
        const jdict *d = v->u.dict;
        *n = d->n;
        if (v->f == VIEW_KEYS)
            return d->k;
        if (v->f == VIEW_VALUES)
            return d->v;
        jval *items = pool_array(&r->mem, d->n ? d->n : 1, sizeof(jval));
        for (size_t i = 0; i < d->n; i++)
            items[i] = mk_tuple2(r, d->k[i], d->v[i]);
        return items;
    }
    case JV_STR: {
        strv s = {v->u.s.p, v->u.s.n};
        size_t k;
        size_t *off = cp_offsets(r, s, &k);
        jval *items = pool_array(&r->mem, k ? k : 1, sizeof(jval));
        for (size_t i = 0; i < k; i++)
            items[i] = off ? mk_str(s.p + off[i], off[i + 1] - off[i]) : mk_str(s.p + i, 1);
        *n = k;
        return items;
    }
    default: rfail(r, line, "'%s' object is not iterable", type_name(v));
    }
}

/* len(v). */
static int64_t py_len(rctx *r, int32_t line, const jval *v)
{
    switch ((jtype)v->t) {
    case JV_UNDEF: return 0;
    case JV_STR: return (int64_t)cp_len((strv){v->u.s.p, v->u.s.n});
    case JV_LIST: return (int64_t)v->u.list->n;
    case JV_DICT:
    case JV_VIEW: return (int64_t)v->u.dict->n;
    default: rfail(r, line, "object of type '%s' has no len()", type_name(v));
    }
}

/* ---- attributes and items (the sandbox's getattr/getitem) ---------------------------- */

/* Builtin functions and methods: JV_FUNC's fn. */
typedef enum {
    FN_NONE,
    /* globals */
    FN_RANGE,
    FN_DICT,
    FN_NAMESPACE,
    FN_RAISE,
    FN_STRFTIME,
    FN_LIPSUM,
    FN_CYCLER,
    FN_JOINER,
    /* str */
    FN_S_FIRST,
    FN_CAPITALIZE = FN_S_FIRST,
    FN_CASEFOLD,
    FN_CENTER,
    FN_COUNT,
    FN_ENCODE,
    FN_ENDSWITH,
    FN_EXPANDTABS,
    FN_FIND,
    FN_FORMAT,
    FN_FORMAT_MAP,
    FN_INDEX,
    FN_ISALNUM,
    FN_ISALPHA,
    FN_ISASCII,
    FN_ISDECIMAL,
    FN_ISDIGIT,
    FN_ISIDENTIFIER,
    FN_ISLOWER,
    FN_ISNUMERIC,
    FN_ISPRINTABLE,
    FN_ISSPACE,
    FN_ISTITLE,
    FN_ISUPPER,
    FN_JOIN,
    FN_LJUST,
    FN_LOWER,
    FN_LSTRIP,
    FN_MAKETRANS,
    FN_PARTITION,
    FN_REMOVEPREFIX,
    FN_REMOVESUFFIX,
    FN_REPLACE,
    FN_RFIND,
    FN_RINDEX,
    FN_RJUST,
    FN_RPARTITION,
    FN_RSPLIT,
    FN_RSTRIP,
    FN_SPLIT,
    FN_SPLITLINES,
    FN_STARTSWITH,
    FN_STRIP,
    FN_SWAPCASE,
    FN_TITLE,
    FN_TRANSLATE,
    FN_UPPER,
    FN_ZFILL,
    FN_S_END,
    /* dict */
    FN_D_FIRST = FN_S_END,
    FN_D_CLEAR = FN_D_FIRST,
    FN_D_COPY,
    FN_D_FROMKEYS,
    FN_D_GET,
    FN_D_ITEMS,
    FN_D_KEYS,
    FN_D_POP,
    FN_D_POPITEM,
    FN_D_SETDEFAULT,
    FN_D_UPDATE,
    FN_D_VALUES,
    FN_D_END,
    /* list / tuple */
    FN_L_FIRST = FN_D_END,
    FN_L_APPEND = FN_L_FIRST,
    FN_L_CLEAR,
    FN_L_COPY,
    FN_L_COUNT,
    FN_L_EXTEND,
    FN_L_INDEX,
    FN_L_INSERT,
    FN_L_POP,
    FN_L_REMOVE,
    FN_L_REVERSE,
    FN_L_SORT,
    FN_L_END,
    /* loop */
    FN_LOOP_CYCLE = FN_L_END,
    FN_LOOP_CHANGED,
} fn_id;

static const char *const fn_names[] = {
    [FN_RANGE] = "range",
    [FN_DICT] = "dict",
    [FN_NAMESPACE] = "namespace",
    [FN_RAISE] = "raise_exception",
    [FN_STRFTIME] = "strftime_now",
    [FN_LIPSUM] = "lipsum",
    [FN_CYCLER] = "cycler",
    [FN_JOINER] = "joiner",
    [FN_CAPITALIZE] = "capitalize",
    [FN_CASEFOLD] = "casefold",
    [FN_CENTER] = "center",
    [FN_COUNT] = "count",
    [FN_ENCODE] = "encode",
    [FN_ENDSWITH] = "endswith",
    [FN_EXPANDTABS] = "expandtabs",
    [FN_FIND] = "find",
    [FN_FORMAT] = "format",
    [FN_FORMAT_MAP] = "format_map",
    [FN_INDEX] = "index",
    [FN_ISALNUM] = "isalnum",
    [FN_ISALPHA] = "isalpha",
    [FN_ISASCII] = "isascii",
    [FN_ISDECIMAL] = "isdecimal",
    [FN_ISDIGIT] = "isdigit",
    [FN_ISIDENTIFIER] = "isidentifier",
    [FN_ISLOWER] = "islower",
    [FN_ISNUMERIC] = "isnumeric",
    [FN_ISPRINTABLE] = "isprintable",
    [FN_ISSPACE] = "isspace",
    [FN_ISTITLE] = "istitle",
    [FN_ISUPPER] = "isupper",
    [FN_JOIN] = "join",
    [FN_LJUST] = "ljust",
    [FN_LOWER] = "lower",
    [FN_LSTRIP] = "lstrip",
    [FN_MAKETRANS] = "maketrans",
    [FN_PARTITION] = "partition",
    [FN_REMOVEPREFIX] = "removeprefix",
    [FN_REMOVESUFFIX] = "removesuffix",
    [FN_REPLACE] = "replace",
    [FN_RFIND] = "rfind",
    [FN_RINDEX] = "rindex",
    [FN_RJUST] = "rjust",
    [FN_RPARTITION] = "rpartition",
    [FN_RSPLIT] = "rsplit",
    [FN_RSTRIP] = "rstrip",
    [FN_SPLIT] = "split",
    [FN_SPLITLINES] = "splitlines",
    [FN_STARTSWITH] = "startswith",
    [FN_STRIP] = "strip",
    [FN_SWAPCASE] = "swapcase",
    [FN_TITLE] = "title",
    [FN_TRANSLATE] = "translate",
    [FN_UPPER] = "upper",
    [FN_ZFILL] = "zfill",
    [FN_D_CLEAR] = "clear",
    [FN_D_COPY] = "copy",
    [FN_D_FROMKEYS] = "fromkeys",
    [FN_D_GET] = "get",
    [FN_D_ITEMS] = "items",
    [FN_D_KEYS] = "keys",
    [FN_D_POP] = "pop",
    [FN_D_POPITEM] = "popitem",
    [FN_D_SETDEFAULT] = "setdefault",
    [FN_D_UPDATE] = "update",
    [FN_D_VALUES] = "values",
    [FN_L_APPEND] = "append",
    [FN_L_CLEAR] = "clear",
    [FN_L_COPY] = "copy",
    [FN_L_COUNT] = "count",
    [FN_L_EXTEND] = "extend",
    [FN_L_INDEX] = "index",
    [FN_L_INSERT] = "insert",
    [FN_L_POP] = "pop",
    [FN_L_REMOVE] = "remove",
    [FN_L_REVERSE] = "reverse",
    [FN_L_SORT] = "sort",
    [FN_LOOP_CYCLE] = "cycle",
    [FN_LOOP_CHANGED] = "changed",
};

static int find_fn(strv name, int first, int end)
{
    for (int i = first; i < end; i++)
        if (fn_names[i] && strv_eq(name, fn_names[i]))
            return i;
    return -1;
}

static bool fn_unsafe(int fn)
{
    return fn == FN_D_CLEAR || fn == FN_D_POP || fn == FN_D_POPITEM || fn == FN_D_SETDEFAULT ||
           fn == FN_D_UPDATE || fn == FN_L_APPEND || fn == FN_L_CLEAR || fn == FN_L_EXTEND ||
           fn == FN_L_INSERT || fn == FN_L_POP || fn == FN_L_REMOVE || fn == FN_L_REVERSE ||
           fn == FN_L_SORT;
}

static jval mk_method(rctx *r, int fn, const jval *self)
{
    jval *copy = pool_alloc(&r->mem, sizeof(jval));
    *copy = *self;
    jval v = {.t = JV_FUNC, .fn = (uint16_t)fn};
    v.u.self = copy;
    return v;
}

/* The attribute `name` of obj as Python has it (methods of str, dict, list and tuple; the
 * loop's fields), or found=false. A method that would modify its object is "unsafe". */
static jval loop_attr(rctx *r, int32_t line, jloop *lp, strv name, bool *found);

static jval py_getattr(rctx *r, int32_t line, const jval *obj, strv name, bool *found)
{
    *found = false;
    if (name.n && name.p[0] == '_')
        return mk_none();
    int fn = -1;
    switch ((jtype)obj->t) {
    case JV_STR: fn = find_fn(name, FN_S_FIRST, FN_S_END); break;
    case JV_DICT: fn = find_fn(name, FN_D_FIRST, FN_D_END); break;
    case JV_LIST:
        if (obj->f == LK_LIST) {
            fn = find_fn(name, FN_L_FIRST, FN_L_END);
        } else if (strv_eq(name, "index") || strv_eq(name, "count")) {
            fn = strv_eq(name, "index") ? FN_L_INDEX : FN_L_COUNT;
        } else if (obj->f == LK_RANGE &&
                   (strv_eq(name, "start") || strv_eq(name, "stop") || strv_eq(name, "step"))) {
            *found = true;
            const jlist *l = obj->u.list;
            return mk_int(strv_eq(name, "start")  ? l->r_start
                          : strv_eq(name, "stop") ? l->r_stop
                                                  : l->r_step);
        }
        break;
    case JV_NS: {
        const jval *v = dict_get_str(obj->u.dict, name.p, name.n);
        if (v) {
            *found = true;
            return *v;
        }
        return mk_none();
    }
    case JV_LOOP: return loop_attr(r, line, obj->u.loop, name, found);
    default: break;
    }
    if (fn < 0)
        return mk_none();
    *found = true;
    if (fn_unsafe(fn)) {
        jval u = mk_undef(r, "access to attribute '%.*s' of '%s' object is unsafe.", (int)name.n,
                          name.p, type_name(obj));
        u.f = UNDEF_UNSAFE;
        return u;
    }
    return mk_method(r, fn, obj);
}

static jval undef_attr(rctx *r, const jval *obj, strv name)
{
    return mk_undef(r, "'%s' has no attribute '%.*s'", object_type_repr(obj),
                    (int)(name.n > 100 ? 100 : name.n), name.p);
}

/* obj.name: environment.getattr, then obj[name]. */
static jval get_attr(rctx *r, int32_t line, const jval *obj, strv name)
{
    if (obj->t == JV_UNDEF)
        fail_undefined(r, line, obj);
    bool found;
    jval v = py_getattr(r, line, obj, name, &found);
    if (found)
        return v;
    if (obj->t == JV_DICT) {
        const jval *w = dict_get_str(obj->u.dict, name.p, name.n);
        if (w)
            return *w;
    }
    return undef_attr(r, obj, name);
}

/* Python's slice.indices for a sequence of length len. */
static void slice_indices(rctx *r, int32_t line, const jval *sl, int64_t len, int64_t *start,
                          int64_t *stop, int64_t *step)
{
    const jval *a = &sl[0], *b = &sl[1], *c = &sl[2];
    *step = c->t == JV_NONE ? 1 : num_as_int(c);
    if (*step == 0)
        rfail(r, line, "slice step cannot be zero");
    if (*step == INT64_MIN)
        *step = -INT64_MAX;
    int64_t lower = *step < 0 ? -1 : 0, upper = *step < 0 ? len - 1 : len;
    if (a->t == JV_NONE) {
        *start = *step < 0 ? upper : lower;
    } else {
        int64_t v = num_as_int(a);
        if (v < 0) {
            v = v < -len ? lower : v + len;
            if (v < lower)
                v = lower;
        } else if (v > upper) {
            v = upper;
        }
        *start = v;
    }
    if (b->t == JV_NONE) {
        *stop = *step < 0 ? lower : upper;
    } else {
        int64_t v = num_as_int(b);
        if (v < 0) {
            v = v < -len ? lower : v + len;
            if (v < lower)
                v = lower;
        } else if (v > upper) {
            v = upper;
        }
        *stop = v;
    }
}

static bool slice_arg_ok(const jval *v)
{
    return v->t == JV_NONE || v->t == JV_INT || v->t == JV_BOOL;
}

/* obj[key], key a Python slice (3 values: start, stop, step; none for empty). */
static jval get_slice(rctx *r, int32_t line, const jval *obj, const jval *sl)
{
    if (!slice_arg_ok(&sl[0]) || !slice_arg_ok(&sl[1]) || !slice_arg_ok(&sl[2]))
        return mk_undef(r, "'%s' object has no element slice", object_type_repr(obj));
    if (obj->t == JV_STR) {
        strv s = {obj->u.s.p, obj->u.s.n};
        size_t k;
        size_t *off = cp_offsets(r, s, &k);
        int64_t start, stop, step;
        slice_indices(r, line, sl, (int64_t)k, &start, &stop, &step);
        if (step == 1) {
            if (stop <= start)
                return mk_str("", 0);
            size_t a = off ? off[start] : (size_t)start, z = off ? off[stop] : (size_t)stop;
            return mk_str(s.p + a, z - a);
        }
        sbuf *b = sbuf_new(r);
        for (int64_t i = start; step > 0 ? i < stop : i > stop;) {
            size_t a = off ? off[i] : (size_t)i, z = off ? off[i + 1] : (size_t)i + 1;
            sbuf_put(b, s.p + a, z - a);
            count_step(r, line);
            if (__builtin_add_overflow(i, step, &i))
                break;
        }
        return sbuf_done(r, b);
    }
    if (obj->t == JV_LIST) {
        const jlist *l = obj->u.list;
        int64_t start, stop, step;
        slice_indices(r, line, sl, (int64_t)l->n, &start, &stop, &step);
        jval out = mk_list(r, 0, obj->f == LK_TUPLE ? LK_TUPLE : LK_LIST);
        for (int64_t i = start; step > 0 ? i < stop : i > stop;) {
            list_push(r, out.u.list, l->v[i]);
            count_step(r, line);
            if (__builtin_add_overflow(i, step, &i))
                break;
        }
        jlist *o = out.u.list;
        if (obj->f == LK_RANGE && /* a range's slice is a range (unless it overflows) */
            !__builtin_mul_overflow(l->r_step, step, &o->r_step) &&
            !__builtin_mul_overflow(start, l->r_step, &o->r_start) &&
            !__builtin_add_overflow(o->r_start, l->r_start, &o->r_start) &&
            !__builtin_mul_overflow(stop, l->r_step, &o->r_stop) &&
            !__builtin_add_overflow(o->r_stop, l->r_start, &o->r_stop))
            out.f = LK_RANGE;
        return out;
    }
    if (obj->t == JV_UNDEF)
        fail_undefined(r, line, obj);
    return mk_undef(r, "'%s' object has no element slice", object_type_repr(obj));
}

/* obj[key]: environment.getitem (then getattr for string keys). */
static jval get_item(rctx *r, int32_t line, const jval *obj, const jval *key)
{
    if (obj->t == JV_UNDEF)
        fail_undefined(r, line, obj);
    switch ((jtype)obj->t) {
    case JV_DICT:
        if (key->t != JV_LIST || key->f != LK_LIST) {
            if (key->t == JV_LIST) /* a tuple key: hashable only if its items are */
                (void)py_hash(r, line, key);
            const jval *v = dict_get_eq(obj->u.dict, key);
            if (v)
                return *v;
            if (key->t != JV_STR)
                return mk_undef(r, "'dict object' has no element");
        }
        break;
    case JV_LIST:
        if (key->t == JV_INT || key->t == JV_BOOL) {
            const jlist *l = obj->u.list;
            int64_t i = num_as_int(key);
            if (i < 0)
                i += (int64_t)l->n;
            if (i >= 0 && i < (int64_t)l->n)
                return l->v[i];
            return mk_undef(r, "%s has no element %" PRId64, object_type_repr(obj),
                            num_as_int(key));
        }
        break;
    case JV_STR:
        if (key->t == JV_INT || key->t == JV_BOOL) {
            strv s = {obj->u.s.p, obj->u.s.n};
            size_t k;
            size_t *off = cp_offsets(r, s, &k);
            int64_t i = num_as_int(key);
            if (i < 0)
                i += (int64_t)k;
            if (i >= 0 && i < (int64_t)k)
                return off ? mk_str(s.p + off[i], off[i + 1] - off[i]) : mk_str(s.p + i, 1);
            return mk_undef(r, "str object has no element %" PRId64, num_as_int(key));
        }
        break;
    default: break;
    }
    if (key->t == JV_STR) {
        strv name = {key->u.s.p, key->u.s.n};
        bool found;
        jval v = py_getattr(r, line, obj, name, &found);
        if (found)
            return v;
        return undef_attr(r, obj, name);
    }
    return mk_undef(r, "%s has no element", object_type_repr(obj));
}

/* ---- arithmetic and comparison (Python's) ------------------------------------------- */

static _Noreturn void fail_operands(rctx *r, int32_t line, const char *op, const jval *a,
                                    const jval *b)
{
    if (a->t == JV_UNDEF)
        fail_undefined(r, line, a);
    if (b->t == JV_UNDEF)
        fail_undefined(r, line, b);
    if (a->t == JV_STR && !strcmp(op, "+"))
        rfail(r, line, "can only concatenate str (not \"%s\") to str", type_name(b));
    if (a->t == JV_LIST && a->f == LK_LIST && !strcmp(op, "+"))
        rfail(r, line, "can only concatenate list (not \"%s\") to list", type_name(b));
    rfail(r, line, "unsupported operand type(s) for %s: '%s' and '%s'", op, type_name(a),
          type_name(b));
}

static _Noreturn void fail_overflow(rctx *r, int32_t line)
{
    runsupported(r, line,
                 "an integer result past 64 bits (Python's integers are unbounded) is not "
                 "supported");
}

/* s * k (repetition), bounded by the output limit. */
static jval repeat_seq(rctx *r, int32_t line, const jval *s, int64_t k)
{
    if (k < 0)
        k = 0;
    if (s->t == JV_STR) {
        size_t n = s->u.s.n;
        if (n && (uint64_t)k > r->lim.max_output_bytes / n)
            rfail(r, line, "a string longer than %zu bytes (the limit)", r->lim.max_output_bytes);
        sbuf *b = sbuf_new(r);
        for (int64_t i = 0; i < k && n; i++)
            sbuf_put(b, s->u.s.p, n);
        jval v = sbuf_done(r, b);
        v.f = s->f & STR_MARKUP;
        return v;
    }
    const jlist *l = s->u.list;
    if (l->n && (uint64_t)k > r->lim.max_output_bytes / 16 / l->n)
        rfail(r, line, "a list of more than %zu items (the limit)", r->lim.max_output_bytes / 16);
    jval out = mk_list(r, (size_t)k * l->n, s->f == LK_TUPLE ? LK_TUPLE : LK_LIST);
    for (int64_t i = 0; i < k; i++)
        for (size_t j = 0; j < l->n; j++)
            list_push(r, out.u.list, l->v[j]);
    return out;
}

static double py_fmod(double a, double b)
{
    double m = fmod(a, b);
    if (m) {
        if ((b < 0) != (m < 0))
            m += b;
    } else {
        m = copysign(0.0, b);
    }
    return m;
}

/* Python's float floor division (float_floor_div: divmod's quotient). */
static double py_floordiv(double vx, double wx)
{
    double mod = fmod(vx, wx);
    double div = (vx - mod) / wx;
    if (mod) {
        if ((wx < 0) != (mod < 0))
            div -= 1.0;
    }
    double floordiv;
    if (div) {
        floordiv = floor(div);
        if (div - floordiv > 0.5)
            floordiv += 1.0;
    } else {
        floordiv = copysign(0.0, vx / wx);
    }
    return floordiv;
}

static jval binop(rctx *r, int32_t line, int op, const jval *a, const jval *b)
{
    static const char *const sym[] = {"+", "-", "*", "/", "//", "%", "** or pow()"};
    if (is_number(a) && is_number(b)) {
        bool flt = a->t == JV_FLOAT || b->t == JV_FLOAT;
        if (!flt) {
            int64_t x = num_as_int(a), y = num_as_int(b), z;
            switch (op) {
            case OPB_ADD:
                if (__builtin_add_overflow(x, y, &z))
                    fail_overflow(r, line);
                return mk_int(z);
            case OPB_SUB:
                if (__builtin_sub_overflow(x, y, &z))
                    fail_overflow(r, line);
                return mk_int(z);
            case OPB_MUL:
                if (__builtin_mul_overflow(x, y, &z))
                    fail_overflow(r, line);
                return mk_int(z);
            case OPB_DIV:
                if (!y)
                    rfail(r, line, "division by zero");
                return mk_float((double)x / (double)y);
            case OPB_FLOORDIV:
            case OPB_MOD: {
                if (!y)
                    rfail(r, line,
                          op == OPB_MOD ? "integer modulo by zero"
                                        : "integer division or modulo by zero");
                if (x == INT64_MIN && y == -1)
                    fail_overflow(r, line);
                int64_t q = x / y, m = x % y;
                if (m && ((m < 0) != (y < 0))) {
                    q -= 1;
                    m += y;
                }
                return mk_int(op == OPB_MOD ? m : q);
            }
            case OPB_POW: {
                if (y < 0) {
                    if (!x)
                        rfail(r, line, "0.0 cannot be raised to a negative power");
                    return mk_float(pow((double)x, (double)y));
                }
                int64_t res = 1, base = x;
                while (y) {
                    if (y & 1) {
                        if (__builtin_mul_overflow(res, base, &res))
                            fail_overflow(r, line);
                    }
                    y >>= 1;
                    if (y && __builtin_mul_overflow(base, base, &base))
                        fail_overflow(r, line);
                }
                return mk_int(res);
            }
            }
        }
        double x = num_as_double(a), y = num_as_double(b);
        switch (op) {
        case OPB_ADD: return mk_float(x + y);
        case OPB_SUB: return mk_float(x - y);
        case OPB_MUL: return mk_float(x * y);
        case OPB_DIV:
            if (y == 0)
                rfail(r, line, "float division by zero");
            return mk_float(x / y);
        case OPB_FLOORDIV:
            if (y == 0)
                rfail(r, line, "float floor division by zero");
            return mk_float(py_floordiv(x, y));
        case OPB_MOD:
            if (y == 0)
                rfail(r, line, "float modulo");
            return mk_float(py_fmod(x, y));
        case OPB_POW:
            if (x == 0 && y < 0)
                rfail(r, line, "0.0 cannot be raised to a negative power");
            if (x < 0 && y != floor(y))
                runsupported(r, line, "complex numbers are not supported");
            return mk_float(pow(x, y));
        }
    }
    if (op == OPB_ADD) {
        if (a->t == JV_STR && b->t == JV_STR) {
            /* Markup on either side escapes the plain other side and stays Markup */
            bool ma = a->f & STR_MARKUP, mb = b->f & STR_MARKUP;
            jval x = *a, y = *b;
            if (ma && !mb)
                y = html_escape(r, (strv){b->u.s.p, b->u.s.n});
            else if (mb && !ma)
                x = html_escape(r, (strv){a->u.s.p, a->u.s.n});
            size_t n = x.u.s.n + y.u.s.n;
            if (n > r->lim.max_output_bytes)
                rfail(r, line, "a string longer than %zu bytes (the limit)",
                      r->lim.max_output_bytes);
            char *p = pool_alloc(&r->mem, n + 1);
            memcpy(p, x.u.s.p, x.u.s.n);
            memcpy(p + x.u.s.n, y.u.s.p, y.u.s.n);
            p[n] = 0;
            jval v = mk_str(p, n);
            v.f = (ma || mb) ? STR_MARKUP : 0;
            return v;
        }
        if (a->t == JV_LIST && b->t == JV_LIST && a->f != LK_RANGE && a->f == b->f) {
            const jlist *x = a->u.list, *y = b->u.list;
            jval out = mk_list(r, x->n + y->n, a->f);
            for (size_t i = 0; i < x->n; i++)
                list_push(r, out.u.list, x->v[i]);
            for (size_t i = 0; i < y->n; i++)
                list_push(r, out.u.list, y->v[i]);
            count_step(r, line);
            return out;
        }
    }
    if (op == OPB_MUL) {
        const jval *seq = NULL, *k = NULL;
        if ((a->t == JV_STR || (a->t == JV_LIST && a->f != LK_RANGE)) &&
            (b->t == JV_INT || b->t == JV_BOOL)) {
            seq = a;
            k = b;
        } else if ((b->t == JV_STR || (b->t == JV_LIST && b->f != LK_RANGE)) &&
                   (a->t == JV_INT || a->t == JV_BOOL)) {
            seq = b;
            k = a;
        }
        if (seq)
            return repeat_seq(r, line, seq, num_as_int(k));
    }
    if (op == OPB_MOD && a->t == JV_STR)
        runsupported(r, line, "printf-style formatting with %% is not supported");
    fail_operands(r, line, op >= 0 && op <= OPB_POW ? sym[op] : "?", a, b);
}

/* Python's ordering of two values: <0, 0, >0; TypeError for what does not order. */
static int py_cmp_values(rctx *r, int32_t line, const jval *a, const jval *b)
{
    if (is_number(a) && is_number(b)) {
        if (a->t != JV_FLOAT && b->t != JV_FLOAT) {
            int64_t x = num_as_int(a), y = num_as_int(b);
            return x < y ? -1 : x > y;
        }
        double x = num_as_double(a), y = num_as_double(b);
        if (isnan(x) || isnan(y))
            return 2; /* unordered: every comparison false */
        return x < y ? -1 : x > y;
    }
    if (a->t == JV_STR && b->t == JV_STR) {
        size_t n = a->u.s.n < b->u.s.n ? a->u.s.n : b->u.s.n;
        int c = memcmp(a->u.s.p, b->u.s.p, n);
        if (c)
            return c < 0 ? -1 : 1;
        return a->u.s.n < b->u.s.n ? -1 : a->u.s.n > b->u.s.n;
    }
    if (a->t == JV_LIST && b->t == JV_LIST && (a->f == LK_TUPLE) == (b->f == LK_TUPLE) &&
        a->f != LK_RANGE && b->f != LK_RANGE) {
        const jlist *x = a->u.list, *y = b->u.list;
        for (size_t i = 0; i < x->n && i < y->n; i++) {
            if (!py_eq(&x->v[i], &y->v[i]))
                return py_cmp_values(r, line, &x->v[i], &y->v[i]);
        }
        return x->n < y->n ? -1 : x->n > y->n;
    }
    if (a->t == JV_UNDEF)
        fail_undefined(r, line, a);
    if (b->t == JV_UNDEF)
        fail_undefined(r, line, b);
    rfail(r, line, "'<' not supported between instances of '%s' and '%s'", type_name(a),
          type_name(b));
}

static bool py_contains(rctx *r, int32_t line, const jval *container, const jval *item)
{
    switch ((jtype)container->t) {
    case JV_STR:
        if (item->t != JV_STR) {
            if (item->t == JV_UNDEF)
                fail_undefined(r, line, item);
            rfail(r, line, "'in <string>' requires string as left operand, not %s",
                  type_name(item));
        }
        return memmem_s(container->u.s.p, container->u.s.n, item->u.s.p, item->u.s.n) != NULL;
    case JV_DICT:
    case JV_VIEW:
        if (container->t == JV_DICT || container->f == VIEW_KEYS) {
            (void)py_hash(r, line, item);
            return dict_find(container->u.dict, item) >= 0;
        }
        break;
    case JV_NS: rfail(r, line, "argument of type 'Namespace' is not iterable");
    default: break;
    }
    size_t n;
    const jval *items = iterate(r, line, container, &n);
    for (size_t i = 0; i < n; i++)
        if (py_eq(&items[i], item))
            return true;
    return false;
}

static bool compare_op(rctx *r, int32_t line, int op, const jval *a, const jval *b)
{
    switch (op) {
    case CMP_EQ: return py_eq(a, b);
    case CMP_NE: return !py_eq(a, b);
    case CMP_IN: return py_contains(r, line, b, a);
    case CMP_NOTIN: return !py_contains(r, line, b, a);
    default: break;
    }
    int c = py_cmp_values(r, line, a, b);
    if (c == 2)
        return false;
    switch (op) {
    case CMP_LT: return c < 0;
    case CMP_LTEQ: return c <= 0;
    case CMP_GT: return c > 0;
    default: return c >= 0;
    }
}

/* A stable sort (merge sort) of v[0..n) by keys[v[i].u.i] when keys is given, else by the
 * values themselves (Python's sorted; reverse keeps stability as Python's does). */
static void sort_values(rctx *r, int32_t line, jval *v, size_t n, const jval *keys, bool reverse)
{
    if (n < 2)
        return;
    jval *tmp = pool_array(&r->mem, n, sizeof(jval));
    for (size_t width = 1; width < n; width *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * width) {
            size_t mid = lo + width < n ? lo + width : n;
            size_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            size_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) {
                const jval *x = keys ? &keys[v[i].u.i] : &v[i];
                const jval *y = keys ? &keys[v[j].u.i] : &v[j];
                count_step(r, line);
                /* take from the right only when it is strictly before the left */
                int c = reverse ? py_cmp_values(r, line, x, y) : py_cmp_values(r, line, y, x);
                if (c < 0 && c != 2)
                    tmp[k++] = v[j++];
                else
                    tmp[k++] = v[i++];
            }
            while (i < mid)
                tmp[k++] = v[i++];
            while (j < hi)
                tmp[k++] = v[j++];
        }
        memcpy(v, tmp, n * sizeof(jval));
    }
}

/* ---- the evaluator ------------------------------------------------------------------ */

enum { FLOW_NORMAL, FLOW_BREAK, FLOW_CONTINUE };
enum { FOR_USES_LOOP = 1 };

static jval eval(rctx *r, frame *f, const node *x);
static int exec_body(rctx *r, frame *f, node *const *body, int32_t n);

/* The loop variable: the items the loop goes over, filtered lazily (as Jinja2's generator
 * does) when the loop has an `if`. */
struct jloop {
    const jval *src;
    size_t n_src, src_pos;
    jval *items;
    size_t n, cap;
    bool done;
    const node *test, *target;
    frame *scratch;
    size_t i; /* index0 of the current item */
    bool has_changed;
    jval last_changed;
};

static void assign_target(rctx *r, frame *f, const node *target, jval v);

/* Makes items[want] known, if the loop has that many. */
static void loop_fill(rctx *r, jloop *lp, size_t want)
{
    while (!lp->done && lp->n <= want) {
        if (lp->src_pos >= lp->n_src) {
            lp->done = true;
            break;
        }
        jval item = lp->src[lp->src_pos++];
        lp->scratch->n = 0;
        assign_target(r, lp->scratch, lp->target, item);
        jval ok = eval(r, lp->scratch, lp->test);
        if (!truthy(&ok))
            continue;
        if (lp->n == lp->cap) {
            size_t cap = lp->cap ? lp->cap * 2 : 8;
            jval *nv = pool_array(&r->mem, cap, sizeof(jval));
            if (lp->n)
                memcpy(nv, lp->items, lp->n * sizeof(jval));
            lp->items = nv;
            lp->cap = cap;
        }
        lp->items[lp->n++] = item;
    }
}

static size_t loop_length(rctx *r, jloop *lp)
{
    loop_fill(r, lp, SIZE_MAX - 1);
    return lp->n;
}

static jval loop_attr(rctx *r, int32_t line, jloop *lp, strv name, bool *found)
{
    (void)line;
    *found = true;
    jval self = {.t = JV_LOOP};
    self.u.loop = lp;
    if (strv_eq(name, "index0"))
        return mk_int((int64_t)lp->i);
    if (strv_eq(name, "index"))
        return mk_int((int64_t)lp->i + 1);
    if (strv_eq(name, "first"))
        return mk_bool(lp->i == 0);
    if (strv_eq(name, "length"))
        return mk_int((int64_t)loop_length(r, lp));
    if (strv_eq(name, "revindex"))
        return mk_int((int64_t)(loop_length(r, lp) - lp->i));
    if (strv_eq(name, "revindex0"))
        return mk_int((int64_t)(loop_length(r, lp) - lp->i - 1));
    if (strv_eq(name, "last")) {
        loop_fill(r, lp, lp->i + 1);
        return mk_bool(lp->i + 1 >= lp->n);
    }
    if (strv_eq(name, "previtem"))
        return lp->i ? lp->items[lp->i - 1] : mk_undef(r, "there is no previous item");
    if (strv_eq(name, "nextitem")) {
        loop_fill(r, lp, lp->i + 1);
        return lp->i + 1 < lp->n ? lp->items[lp->i + 1] : mk_undef(r, "there is no next item");
    }
    if (strv_eq(name, "depth"))
        return mk_int(1);
    if (strv_eq(name, "depth0"))
        return mk_int(0);
    if (strv_eq(name, "cycle"))
        return mk_method(r, FN_LOOP_CYCLE, &self);
    if (strv_eq(name, "changed"))
        return mk_method(r, FN_LOOP_CHANGED, &self);
    *found = false;
    return mk_none();
}

/* Unpacks v into a tuple target (Python's iterable unpacking) or binds a name. */
static void assign_target(rctx *r, frame *f, const node *target, jval v)
{
    if (target->kind == N_NAME) {
        frame_set(r, f, target->name, v);
        return;
    }
    if (target->kind == N_NSREF) {
        jval *ns = frame_lookup(f, target->name);
        if (!ns || ns->t != JV_NS)
            rfail(r, target->line, "cannot assign attribute on non-namespace object");
        dict_set(r, target->line, ns->u.dict, mk_strv(target->attr), v);
        return;
    }
    size_t n;
    const jval *items = iterate(r, target->line, &v, &n);
    if (n < (size_t)target->n_items)
        rfail(r, target->line, "not enough values to unpack (expected %d, got %zu)",
              (int)target->n_items, n);
    if (n > (size_t)target->n_items)
        rfail(r, target->line, "too many values to unpack (expected %d)", (int)target->n_items);
    for (int32_t i = 0; i < target->n_items; i++)
        assign_target(r, f, target->items[i], items[i]);
}

/* ---- calls -------------------------------------------------------------------------- */

typedef struct {
    jval *pos;
    int32_t n_pos;
    strv *kwn;
    jval *kwv;
    int32_t n_kw;
} cargs;

static void cargs_add_kw(rctx *r, int32_t line, cargs *a, int32_t *cap, strv name, jval v)
{
    for (int32_t i = 0; i < a->n_kw; i++)
        if (strv_same(a->kwn[i], name))
            rfail(r, line, "got multiple values for keyword argument '%.*s'", (int)name.n, name.p);
    if (a->n_kw == *cap) {
        int32_t nc = *cap ? *cap * 2 : 4;
        strv *nn = pool_array(&r->mem, (size_t)nc, sizeof(strv));
        jval *nv = pool_array(&r->mem, (size_t)nc, sizeof(jval));
        if (a->n_kw) {
            memcpy(nn, a->kwn, (size_t)a->n_kw * sizeof(strv));
            memcpy(nv, a->kwv, (size_t)a->n_kw * sizeof(jval));
        }
        a->kwn = nn;
        a->kwv = nv;
        *cap = nc;
    }
    a->kwn[a->n_kw] = name;
    a->kwv[a->n_kw] = v;
    a->n_kw++;
}

static void eval_args(rctx *r, frame *f, const node *x, cargs *a)
{
    memset(a, 0, sizeof *a);
    size_t n_dyn = 0;
    const jval *dyn = NULL;
    if (x->c) {
        jval d = eval(r, f, x->c);
        dyn = iterate(r, x->line, &d, &n_dyn);
    }
    size_t n_pos = (size_t)x->n_items + n_dyn;
    a->pos = pool_array(&r->mem, n_pos ? n_pos : 1, sizeof(jval));
    for (int32_t i = 0; i < x->n_items; i++)
        a->pos[a->n_pos++] = eval(r, f, x->items[i]);
    for (size_t i = 0; i < n_dyn; i++)
        a->pos[a->n_pos++] = dyn[i];
    int32_t cap = 0;
    for (int32_t i = 0; i < x->n_items2; i++)
        cargs_add_kw(r, x->line, a, &cap, x->names[i], eval(r, f, x->items2[i]));
    if (x->d) {
        jval d = eval(r, f, x->d);
        if (d.t != JV_DICT)
            rfail(r, x->line, "argument after ** must be a mapping, not %s", type_name(&d));
        for (size_t i = 0; i < d.u.dict->n; i++) {
            const jval *k = &d.u.dict->k[i];
            if (k->t != JV_STR)
                rfail(r, x->line, "keywords must be strings");
            cargs_add_kw(r, x->line, a, &cap, (strv){k->u.s.p, k->u.s.n}, d.u.dict->v[i]);
        }
    }
}

/* Binds a to the parameters named in params (space separated, at most 8), as Python binds
 * a call: slots[i] and given[i]. */
static void bind_args(rctx *r, int32_t line, const char *fname, const char *params, const cargs *a,
                      jval *slots, bool *given)
{
    strv names[8];
    int np = 0;
    for (const char *p = params; *p && np < 8;) {
        while (*p == ' ')
            p++;
        const char *q = p;
        while (*q && *q != ' ')
            q++;
        if (q > p)
            names[np++] = (strv){p, (size_t)(q - p)};
        p = q;
    }
    for (int i = 0; i < np; i++)
        given[i] = false;
    if (a->n_pos > np)
        rfail(r, line, "%s() takes at most %d argument%s (%d given)", fname, np, np == 1 ? "" : "s",
              (int)a->n_pos);
    for (int32_t i = 0; i < a->n_pos; i++) {
        slots[i] = a->pos[i];
        given[i] = true;
    }
    for (int32_t k = 0; k < a->n_kw; k++) {
        int i;
        for (i = 0; i < np; i++)
            if (strv_same(names[i], a->kwn[k]))
                break;
        if (i == np)
            rfail(r, line, "%s() got an unexpected keyword argument '%.*s'", fname,
                  (int)a->kwn[k].n, a->kwn[k].p);
        if (given[i])
            rfail(r, line, "%s() got multiple values for argument '%.*s'", fname, (int)names[i].n,
                  names[i].p);
        slots[i] = a->kwv[k];
        given[i] = true;
    }
}

static void require_args(rctx *r, int32_t line, const char *fname, int n_required,
                         const bool *given)
{
    for (int i = 0; i < n_required; i++)
        if (!given[i])
            rfail(r, line, "%s() missing a required argument", fname);
}

static int64_t arg_int(rctx *r, int32_t line, const jval *v)
{
    if (v->t == JV_INT || v->t == JV_BOOL)
        return num_as_int(v);
    if (v->t == JV_UNDEF)
        fail_undefined(r, line, v);
    rfail(r, line, "'%s' object cannot be interpreted as an integer", type_name(v));
}

static strv arg_str(rctx *r, int32_t line, const jval *v, const char *what)
{
    if (v->t == JV_STR)
        return (strv){v->u.s.p, v->u.s.n};
    if (v->t == JV_UNDEF)
        fail_undefined(r, line, v);
    rfail(r, line, "%s must be str, not %s", what, type_name(v));
}

static jval call_macro(rctx *r, int32_t line, const jmacro *m, const cargs *a)
{
    const node *d = m->def;
    frame *mf = frame_new(r, m->closure);
    int32_t np = d->n_items;
    bool *set = pool_zalloc(&r->mem, (size_t)(np ? np : 1));
    bool *kw_used = pool_zalloc(&r->mem, (size_t)(a->n_kw ? a->n_kw : 1));
    int32_t n_taken = a->n_pos < np ? a->n_pos : np;
    for (int32_t i = 0; i < n_taken; i++) {
        frame_set(r, mf, d->items[i]->name, a->pos[i]);
        set[i] = true;
    }
    for (int32_t i = n_taken; i < np; i++)
        for (int32_t k = 0; k < a->n_kw; k++)
            if (!kw_used[k] && strv_same(a->kwn[k], d->items[i]->name)) {
                frame_set(r, mf, d->items[i]->name, a->kwv[k]);
                set[i] = true;
                kw_used[k] = true;
            }
    if (d->op & MACRO_CALLER) {
        jval caller = mk_undef(r, "No caller defined");
        for (int32_t k = 0; k < a->n_kw; k++)
            if (!kw_used[k] && strv_eq(a->kwn[k], "caller")) {
                caller = a->kwv[k];
                kw_used[k] = true;
            }
        frame_set(r, mf, STRV("caller"), caller);
    }
    if (d->op & MACRO_KWARGS) {
        jval kw = mk_dict(r);
        for (int32_t k = 0; k < a->n_kw; k++)
            if (!kw_used[k])
                dict_set(r, line, kw.u.dict, mk_strv(a->kwn[k]), a->kwv[k]);
        frame_set(r, mf, STRV("kwargs"), kw);
    } else {
        for (int32_t k = 0; k < a->n_kw; k++)
            if (!kw_used[k])
                rfail(r, line, "macro '%.*s' takes no keyword argument '%.*s'", (int)d->name.n,
                      d->name.p, (int)a->kwn[k].n, a->kwn[k].p);
    }
    if (d->op & MACRO_VARARGS) {
        jval va = mk_list(r, 0, LK_TUPLE);
        for (int32_t i = np; i < a->n_pos; i++)
            list_push(r, va.u.list, a->pos[i]);
        frame_set(r, mf, STRV("varargs"), va);
    } else if (a->n_pos > np) {
        rfail(r, line, "macro '%.*s' takes not more than %d argument(s)", (int)d->name.n, d->name.p,
              (int)np);
    }
    for (int32_t i = 0; i < np; i++) {
        if (set[i])
            continue;
        if (d->items2[i])
            frame_set(r, mf, d->items[i]->name, eval(r, mf, d->items2[i]));
        else
            frame_set(r, mf, d->items[i]->name,
                      mk_undef(r, "parameter '%.*s' was not provided", (int)d->items[i]->name.n,
                               d->items[i]->name.p));
    }
    sbuf *b = sbuf_new(r);
    sbuf *saved = r->out;
    r->out = b;
    exec_body(r, mf, d->items3, d->n_items3);
    r->out = saved;
    return sbuf_done(r, b);
}

/* The value's float(), as Python converts a string (whitespace around, `_` between digits,
 * inf/nan spellings). false when it does not convert. */
static bool parse_py_float(strv s, double *out)
{
    s = str_strip(s, NULL, true, true);
    if (!s.n || s.n > 400)
        return false;
    char tmp[512];
    size_t k = 0;
    for (size_t i = 0; i < s.n; i++) {
        char c = s.p[i];
        if (c == '_') {
            bool ok = i > 0 && i + 1 < s.n && s.p[i - 1] >= '0' && s.p[i - 1] <= '9' &&
                      s.p[i + 1] >= '0' && s.p[i + 1] <= '9';
            if (!ok)
                return false;
            continue;
        }
        if ((unsigned char)c >= 0x80)
            return false;
        tmp[k++] = c;
    }
    tmp[k] = 0;
    const char *p = tmp;
    if (*p == '+' || *p == '-')
        p++;
    bool special = !strcasecmp(p, "inf") || !strcasecmp(p, "infinity") || !strcasecmp(p, "nan");
    if (!special) {
        /* digits with an optional fraction and exponent; no hex, no bare '.' */
        const char *q = p;
        size_t nd = 0;
        while (*q >= '0' && *q <= '9')
            q++, nd++;
        if (*q == '.') {
            q++;
            while (*q >= '0' && *q <= '9')
                q++, nd++;
        }
        if (!nd)
            return false;
        if (*q == 'e' || *q == 'E') {
            q++;
            if (*q == '+' || *q == '-')
                q++;
            if (!(*q >= '0' && *q <= '9'))
                return false;
            while (*q >= '0' && *q <= '9')
                q++;
        }
        if (*q)
            return false;
    }
    *out = strtod(tmp, NULL);
    return true;
}

/* int(s, base) for a Python string; false when it does not convert. */
static bool parse_py_int(strv s, int base, int64_t *out, bool *overflow)
{
    *overflow = false;
    s = str_strip(s, NULL, true, true);
    if (!s.n)
        return false;
    size_t i = 0;
    bool neg = false;
    if (s.p[0] == '+' || s.p[0] == '-') {
        neg = s.p[0] == '-';
        i++;
    }
    if (base == 0 || base == 16 || base == 8 || base == 2) {
        if (i + 1 < s.n && s.p[i] == '0') {
            char k = (char)(s.p[i + 1] | 0x20);
            int b = k == 'x' ? 16 : k == 'o' ? 8 : k == 'b' ? 2 : 0;
            if (b && (base == 0 || base == b)) {
                base = b;
                i += 2;
                if (i < s.n && s.p[i] == '_')
                    i++;
            }
        }
        if (base == 0)
            base = 10;
    }
    if (base < 2 || base > 36)
        return false;
    uint64_t v = 0;
    size_t digits = 0;
    for (; i < s.n; i++) {
        char c = s.p[i];
        if (c == '_' && digits && i + 1 < s.n && s.p[i + 1] != '_')
            continue;
        int d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z')
            d = (c | 0x20) - 'a' + 10;
        else
            return false;
        if (d >= base)
            return false;
        if (v > (UINT64_MAX - (uint64_t)d) / (uint64_t)base)
            *overflow = true;
        else
            v = v * (uint64_t)base + (uint64_t)d;
        digits++;
    }
    if (!digits)
        return false;
    if (v > (uint64_t)INT64_MAX + (neg ? 1 : 0))
        *overflow = true;
    *out = neg ? (int64_t)(0 - v) : (int64_t)v;
    return true;
}

static jval call_function(rctx *r, int32_t line, const jval *fnv, const cargs *a);

/* ---- filters and tests -------------------------------------------------------------- */

typedef enum {
    F_ABS,
    F_ATTR,
    F_BATCH,
    F_CAPITALIZE,
    F_CENTER,
    F_COUNT,
    F_D,
    F_DEFAULT,
    F_DICTSORT,
    F_E,
    F_ESCAPE,
    F_FILESIZEFORMAT,
    F_FIRST,
    F_FLOAT,
    F_FORCEESCAPE,
    F_FORMAT,
    F_GROUPBY,
    F_INDENT,
    F_INT,
    F_ITEMS,
    F_JOIN,
    F_LAST,
    F_LENGTH,
    F_LIST,
    F_LOWER,
    F_MAP,
    F_MAX,
    F_MIN,
    F_PPRINT,
    F_RANDOM,
    F_REJECT,
    F_REJECTATTR,
    F_REPLACE,
    F_REVERSE,
    F_ROUND,
    F_SAFE,
    F_SELECT,
    F_SELECTATTR,
    F_SLICE,
    F_SORT,
    F_STRING,
    F_STRIPTAGS,
    F_SUM,
    F_TITLE,
    F_TOJSON,
    F_TRIM,
    F_TRUNCATE,
    F_UNIQUE,
    F_UPPER,
    F_URLENCODE,
    F_URLIZE,
    F_WORDCOUNT,
    F_WORDWRAP,
    F_XMLATTR,
    F_COUNT_OF,
    F_UNKNOWN = 0xFFFF,
} filter_id;

/* Jinja2's builtin filters (transformers' tojson replacing Jinja2's); those this engine
 * does not implement fail when used. */
static const struct {
    const char *name;
    bool supported;
} filters[] = {
    [F_ABS] = {"abs", 1},
    [F_ATTR] = {"attr", 1},
    [F_BATCH] = {"batch", 1},
    [F_CAPITALIZE] = {"capitalize", 1},
    [F_CENTER] = {"center", 1},
    [F_COUNT] = {"count", 1},
    [F_D] = {"d", 1},
    [F_DEFAULT] = {"default", 1},
    [F_DICTSORT] = {"dictsort", 1},
    [F_E] = {"e", 1},
    [F_ESCAPE] = {"escape", 1},
    [F_FILESIZEFORMAT] = {"filesizeformat", 0},
    [F_FIRST] = {"first", 1},
    [F_FLOAT] = {"float", 1},
    [F_FORCEESCAPE] = {"forceescape", 1},
    [F_FORMAT] = {"format", 0},
    [F_GROUPBY] = {"groupby", 0},
    [F_INDENT] = {"indent", 1},
    [F_INT] = {"int", 1},
    [F_ITEMS] = {"items", 1},
    [F_JOIN] = {"join", 1},
    [F_LAST] = {"last", 1},
    [F_LENGTH] = {"length", 1},
    [F_LIST] = {"list", 1},
    [F_LOWER] = {"lower", 1},
    [F_MAP] = {"map", 1},
    [F_MAX] = {"max", 1},
    [F_MIN] = {"min", 1},
    [F_PPRINT] = {"pprint", 0},
    [F_RANDOM] = {"random", 0},
    [F_REJECT] = {"reject", 1},
    [F_REJECTATTR] = {"rejectattr", 1},
    [F_REPLACE] = {"replace", 1},
    [F_REVERSE] = {"reverse", 1},
    [F_ROUND] = {"round", 1},
    [F_SAFE] = {"safe", 1},
    [F_SELECT] = {"select", 1},
    [F_SELECTATTR] = {"selectattr", 1},
    [F_SLICE] = {"slice", 0},
    [F_SORT] = {"sort", 1},
    [F_STRING] = {"string", 1},
    [F_STRIPTAGS] = {"striptags", 0},
    [F_SUM] = {"sum", 1},
    [F_TITLE] = {"title", 1},
    [F_TOJSON] = {"tojson", 1},
    [F_TRIM] = {"trim", 1},
    [F_TRUNCATE] = {"truncate", 1},
    [F_UNIQUE] = {"unique", 1},
    [F_UPPER] = {"upper", 1},
    [F_URLENCODE] = {"urlencode", 0},
    [F_URLIZE] = {"urlize", 0},
    [F_WORDCOUNT] = {"wordcount", 1},
    [F_WORDWRAP] = {"wordwrap", 0},
    [F_XMLATTR] = {"xmlattr", 0},
};

typedef enum {
    T_ODD,
    T_EVEN,
    T_DIVISIBLEBY,
    T_DEFINED,
    T_UNDEFINED,
    T_FILTER,
    T_TEST,
    T_NONE,
    T_BOOLEAN,
    T_FALSE,
    T_TRUE,
    T_INTEGER,
    T_FLOAT_,
    T_LOWER,
    T_UPPER,
    T_STRING_,
    T_MAPPING,
    T_NUMBER,
    T_SEQUENCE,
    T_ITERABLE,
    T_CALLABLE,
    T_SAMEAS,
    T_ESCAPED,
    T_IN,
    T_EQ1,
    T_EQ2,
    T_EQ3,
    T_NE1,
    T_NE2,
    T_GT1,
    T_GT2,
    T_GT3,
    T_GE1,
    T_GE2,
    T_LT1,
    T_LT2,
    T_LT3,
    T_LE1,
    T_LE2,
    T_COUNT_OF,
    T_UNKNOWN = 0xFFFF,
} test_id;

static const char *const tests[] = {
    [T_ODD] = "odd",
    [T_EVEN] = "even",
    [T_DIVISIBLEBY] = "divisibleby",
    [T_DEFINED] = "defined",
    [T_UNDEFINED] = "undefined",
    [T_FILTER] = "filter",
    [T_TEST] = "test",
    [T_NONE] = "none",
    [T_BOOLEAN] = "boolean",
    [T_FALSE] = "false",
    [T_TRUE] = "true",
    [T_INTEGER] = "integer",
    [T_FLOAT_] = "float",
    [T_LOWER] = "lower",
    [T_UPPER] = "upper",
    [T_STRING_] = "string",
    [T_MAPPING] = "mapping",
    [T_NUMBER] = "number",
    [T_SEQUENCE] = "sequence",
    [T_ITERABLE] = "iterable",
    [T_CALLABLE] = "callable",
    [T_SAMEAS] = "sameas",
    [T_ESCAPED] = "escaped",
    [T_IN] = "in",
    [T_EQ1] = "==",
    [T_EQ2] = "eq",
    [T_EQ3] = "equalto",
    [T_NE1] = "!=",
    [T_NE2] = "ne",
    [T_GT1] = ">",
    [T_GT2] = "gt",
    [T_GT3] = "greaterthan",
    [T_GE1] = "ge",
    [T_GE2] = ">=",
    [T_LT1] = "<",
    [T_LT2] = "lt",
    [T_LT3] = "lessthan",
    [T_LE1] = "<=",
    [T_LE2] = "le",
};

static int find_filter(strv name)
{
    for (int i = 0; i < F_COUNT_OF; i++)
        if (strv_eq(name, filters[i].name))
            return i;
    return -1;
}

static int find_test(strv name)
{
    for (int i = 0; i < T_COUNT_OF; i++)
        if (strv_eq(name, tests[i]))
            return i;
    return -1;
}

static jval apply_filter(rctx *r, int32_t line, int fid, strv name, jval v, const cargs *a);
static bool apply_test(rctx *r, int32_t line, int tid, strv name, const jval *v, const cargs *a);

/* make_attrgetter: the value at a dotted path ("a.0.b": digits index as ints). */
static jval attr_path(rctx *r, int32_t line, jval item, const jval *attribute, const jval *dflt)
{
    if (attribute->t == JV_NONE)
        return item;
    if (attribute->t != JV_STR) {
        item = get_item(r, line, &item, attribute);
        if (dflt && item.t == JV_UNDEF)
            item = *dflt;
        return item;
    }
    strv s = {attribute->u.s.p, attribute->u.s.n};
    size_t i = 0;
    for (;;) {
        const char *dot = memchr(s.p + i, '.', s.n - i);
        size_t end = dot ? (size_t)(dot - s.p) : s.n;
        strv part = {s.p + i, end - i};
        bool digits = part.n > 0;
        for (size_t k = 0; k < part.n; k++)
            digits &= py_isdecimal((unsigned char)part.p[k]);
        jval key;
        if (digits && part.n < 19)
            key = mk_int(strtoll(pool_strdup(&r->mem, part.p, part.n), NULL, 10));
        else
            key = mk_strv(part);
        item = get_item(r, line, &item, &key);
        if (dflt && item.t == JV_UNDEF)
            item = *dflt;
        if (!dot)
            return item;
        i = end + 1;
    }
}

static jval lower_if_str(rctx *r, jval v)
{
    if (v.t == JV_STR)
        return str_case(r, (strv){v.u.s.p, v.u.s.n}, CASE_LOWER);
    return v;
}

/* select/reject/selectattr/rejectattr (Jinja2's select_or_reject). */
static jval select_reject(rctx *r, int32_t line, jval v, const cargs *a, bool reject, bool attr)
{
    size_t n = 0;
    const jval *items = NULL;
    if (truthy(&v))
        items = iterate(r, line, &v, &n);
    int32_t off = 0;
    jval attribute = mk_none();
    if (attr) {
        if (a->n_pos < 1)
            rfail(r, line, "Missing parameter for attribute name");
        attribute = a->pos[0];
        off = 1;
    }
    bool have_test = a->n_pos > off;
    strv tname = {0};
    int tid = -1;
    cargs targs = {0};
    if (have_test) {
        tname = arg_str(r, line, &a->pos[off], "the test name");
        tid = find_test(tname);
        if (tid < 0)
            rfail(r, line, "No test named '%.*s'.", (int)tname.n, tname.p);
        targs.pos = a->pos + off + 1;
        targs.n_pos = a->n_pos - off - 1;
        targs.kwn = a->kwn;
        targs.kwv = a->kwv;
        targs.n_kw = a->n_kw;
    }
    jval *out = pool_array(&r->mem, n ? n : 1, sizeof(jval));
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        count_step(r, line);
        jval x = attr ? attr_path(r, line, items[i], &attribute, NULL) : items[i];
        bool ok = have_test ? apply_test(r, line, tid, tname, &x, &targs) : truthy(&x);
        if (ok != reject)
            out[k++] = items[i];
    }
    return mk_iter(r, out, k, "generator");
}

static jval do_map(rctx *r, int32_t line, jval v, const cargs *a)
{
    size_t n = 0;
    const jval *items = NULL;
    if (truthy(&v))
        items = iterate(r, line, &v, &n);
    jval *out = pool_array(&r->mem, n ? n : 1, sizeof(jval));
    if (!a->n_pos) {
        jval attribute = mk_none(), dflt = mk_none();
        bool have_attr = false, have_default = false;
        for (int32_t k = 0; k < a->n_kw; k++) {
            if (strv_eq(a->kwn[k], "attribute")) {
                attribute = a->kwv[k];
                have_attr = true;
            } else if (strv_eq(a->kwn[k], "default")) {
                dflt = a->kwv[k];
                have_default = true;
            } else if (n) {
                rfail(r, line, "Unexpected keyword argument '%.*s'", (int)a->kwn[k].n, a->kwn[k].p);
            }
        }
        if (!have_attr && n)
            rfail(r, line, "map requires a filter argument");
        bool use_default = have_default && dflt.t != JV_NONE;
        for (size_t i = 0; i < n; i++) {
            count_step(r, line);
            out[i] = attr_path(r, line, items[i], &attribute, use_default ? &dflt : NULL);
        }
        return mk_iter(r, out, n, "generator");
    }
    strv fname = arg_str(r, line, &a->pos[0], "the filter name");
    int fid = find_filter(fname);
    if (fid < 0 && n)
        rfail(r, line, "No filter named '%.*s'.", (int)fname.n, fname.p);
    cargs fa = {a->pos + 1, a->n_pos - 1, a->kwn, a->kwv, a->n_kw};
    for (size_t i = 0; i < n; i++) {
        count_step(r, line);
        out[i] = apply_filter(r, line, fid, fname, items[i], &fa);
    }
    return mk_iter(r, out, n, "generator");
}

static jval do_tojson(rctx *r, int32_t line, const jval *v, const cargs *a)
{
    jval s[4];
    bool g[4];
    bind_args(r, line, "tojson", "ensure_ascii indent separators sort_keys", a, s, g);
    json_opts o = {0};
    o.ensure_ascii = g[0] && truthy(&s[0]);
    o.sort_keys = g[3] && truthy(&s[3]);
    if (g[1] && s[1].t != JV_NONE) {
        o.has_indent = true;
        if (s[1].t == JV_STR) {
            o.indent = (strv){s[1].u.s.p, s[1].u.s.n};
        } else if (s[1].t == JV_INT || s[1].t == JV_BOOL) {
            int64_t k = num_as_int(&s[1]);
            if (k > 4096)
                runsupported(r, line, "tojson: an indent of more than 4096 is not supported");
            char *sp = pool_alloc(&r->mem, (size_t)(k > 0 ? k : 0) + 1);
            memset(sp, ' ', (size_t)(k > 0 ? k : 0));
            o.indent = (strv){sp, (size_t)(k > 0 ? k : 0)};
        } else {
            rfail(r, line, "tojson: can't multiply sequence by non-int of type '%s'",
                  type_name(&s[1]));
        }
    }
    o.item_sep = o.has_indent ? STRV(",") : STRV(", ");
    o.key_sep = STRV(": ");
    if (g[2] && s[2].t != JV_NONE) {
        size_t n;
        const jval *items = iterate(r, line, &s[2], &n);
        if (n != 2)
            rfail(r, line, "tojson: separators must be a pair of strings");
        o.item_sep = arg_str(r, line, &items[0], "tojson separators");
        o.key_sep = arg_str(r, line, &items[1], "tojson separators");
    }
    sbuf *b = sbuf_new(r);
    json_put(r, line, b, v, &o, 0);
    return sbuf_done(r, b);
}

/* Python's round(x, n) for a float: correctly rounded, halves to even. */
static double py_round(double x, int64_t n)
{
    if (!isfinite(x))
        return x;
    if (n > 300)
        return x;
    if (n >= 0) {
        char tmp[512];
        snprintf(tmp, sizeof tmp, "%.*f", (int)n, x);
        return strtod(tmp, NULL);
    }
    double p = pow(10.0, (double)-n);
    double y = x / p;
    double rr = nearbyint(y);
    return rr * p;
}

static jval do_indent(rctx *r, int32_t line, const jval *v, const cargs *a)
{
    jval s[3];
    bool g[3];
    bind_args(r, line, "indent", "width first blank", a, s, g);
    if (v->t != JV_STR) {
        if (v->t == JV_UNDEF)
            fail_undefined(r, line, v);
        rfail(r, line, "unsupported operand type(s) for +=: '%s' and 'str'", type_name(v));
    }
    strv ind;
    if (g[0] && s[0].t == JV_STR) {
        ind = (strv){s[0].u.s.p, s[0].u.s.n};
    } else {
        int64_t k = g[0] ? arg_int(r, line, &s[0]) : 4;
        if (k < 0)
            k = 0;
        if (k > 4096)
            runsupported(r, line, "indent: a width of more than 4096 is not supported");
        char *sp = pool_alloc(&r->mem, (size_t)k + 1);
        memset(sp, ' ', (size_t)k);
        ind = (strv){sp, (size_t)k};
    }
    bool first = g[1] && truthy(&s[1]), blank = g[2] && truthy(&s[2]);
    /* s += "\n"; lines = s.splitlines() */
    sbuf *t = sbuf_new(r);
    sbuf_put(t, v->u.s.p, v->u.s.n);
    sbuf_putc(t, '\n');
    jval lines = str_splitlines(r, line, (strv){t->p, t->n}, false);
    const jlist *l = lines.u.list;
    sbuf *b = sbuf_new(r);
    if (first)
        sbuf_put(b, ind.p, ind.n);
    for (size_t i = 0; i < l->n; i++) {
        const jval *x = &l->v[i];
        if (i) {
            sbuf_putc(b, '\n');
            if (blank || x->u.s.n)
                sbuf_put(b, ind.p, ind.n);
        }
        sbuf_put(b, x->u.s.p, x->u.s.n);
    }
    jval out = sbuf_to_str(r, b);
    sbuf_close(r, b);
    sbuf_close(r, t);
    return out;
}

static jval do_truncate(rctx *r, int32_t line, const jval *v, const cargs *a)
{
    jval s[4];
    bool g[4];
    bind_args(r, line, "truncate", "length killwords end leeway", a, s, g);
    int64_t length = g[0] ? arg_int(r, line, &s[0]) : 255;
    bool killwords = g[1] && truthy(&s[1]);
    strv end = g[2] ? arg_str(r, line, &s[2], "end") : STRV("...");
    int64_t leeway = g[3] && s[3].t != JV_NONE ? arg_int(r, line, &s[3]) : 5;
    size_t n_end = cp_len(end), k;
    if (length < (int64_t)n_end)
        rfail(r, line, "expected length >= %zu, got %" PRId64, n_end, length);
    if (leeway < 0)
        rfail(r, line, "expected leeway >= 0, got %" PRId64, leeway);
    if (v->t != JV_STR) { /* len(s) <= length + leeway returns s, whatever it is */
        if (py_len(r, line, v) <= length + leeway)
            return *v;
        rfail(r, line, "truncate: '%s' object has no attribute 'rsplit'", type_name(v));
    }
    strv str = {v->u.s.p, v->u.s.n};
    size_t *off = cp_offsets(r, str, &k);
    if ((int64_t)k <= length + leeway)
        return *v;
    size_t cut = (size_t)(length - (int64_t)n_end);
    strv head = {str.p, off ? off[cut] : cut};
    if (!killwords) {
        const char *sp = memrmem_s(head.p, head.n, " ", 1);
        if (sp)
            head.n = (size_t)(sp - head.p);
    }
    sbuf *b = sbuf_new(r);
    sbuf_put(b, head.p, head.n);
    sbuf_put(b, end.p, end.n);
    return sbuf_done(r, b);
}

/* min/max (Python's: the first of equal extremes). */
static jval do_minmax(rctx *r, int32_t line, const jval *v, const cargs *a, bool is_max)
{
    jval s[2];
    bool g[2];
    bind_args(r, line, is_max ? "max" : "min", "case_sensitive attribute", a, s, g);
    size_t n;
    const jval *items = iterate(r, line, v, &n);
    if (!n)
        return mk_undef(r, "No aggregated item, sequence was empty.");
    bool cs = g[0] && truthy(&s[0]);
    jval attribute = g[1] ? s[1] : mk_none();
    size_t best = 0;
    jval bk = attr_path(r, line, items[0], &attribute, NULL);
    if (!cs)
        bk = lower_if_str(r, bk);
    for (size_t i = 1; i < n; i++) {
        count_step(r, line);
        jval k = attr_path(r, line, items[i], &attribute, NULL);
        if (!cs)
            k = lower_if_str(r, k);
        int c = py_cmp_values(r, line, &k, &bk);
        if (c != 2 && (is_max ? c > 0 : c < 0)) {
            best = i;
            bk = k;
        }
    }
    return items[best];
}

/* sort (stable; keys as make_multi_attrgetter gives them, lowercased unless
 * case_sensitive). */
static jval do_sort(rctx *r, int32_t line, const jval *v, const cargs *a)
{
    jval s[3];
    bool g[3];
    bind_args(r, line, "sort", "reverse case_sensitive attribute", a, s, g);
    bool reverse = g[0] && truthy(&s[0]), cs = g[1] && truthy(&s[1]);
    jval attribute = g[2] ? s[2] : mk_none();
    size_t n;
    const jval *items = iterate(r, line, v, &n);
    jval *keys = pool_array(&r->mem, n ? n : 1, sizeof(jval));
    jval *idx = pool_array(&r->mem, n ? n : 1, sizeof(jval));
    /* attribute "a,b": a list of keys per item */
    strv attrs[16];
    int n_attr = 0;
    if (attribute.t == JV_STR) {
        strv as = {attribute.u.s.p, attribute.u.s.n};
        size_t i = 0;
        for (;;) {
            const char *comma = memchr(as.p + i, ',', as.n - i);
            size_t end = comma ? (size_t)(comma - as.p) : as.n;
            if (n_attr == 16)
                runsupported(r, line, "sort by more than 16 attributes is not supported");
            attrs[n_attr++] = (strv){as.p + i, end - i};
            if (!comma)
                break;
            i = end + 1;
        }
    }
    for (size_t i = 0; i < n; i++) {
        count_step(r, line);
        idx[i] = mk_int((int64_t)i);
        jval key = mk_list(r, n_attr ? (size_t)n_attr : 1, LK_LIST);
        if (n_attr) {
            for (int k = 0; k < n_attr; k++) {
                jval at = mk_strv(attrs[k]);
                jval x = attr_path(r, line, items[i], &at, NULL);
                list_push(r, key.u.list, cs ? x : lower_if_str(r, x));
            }
        } else {
            jval x = attr_path(r, line, items[i], &attribute, NULL);
            list_push(r, key.u.list, cs ? x : lower_if_str(r, x));
        }
        keys[i] = key;
    }
    sort_values(r, line, idx, n, keys, reverse);
    jval out = mk_list(r, n, LK_LIST);
    for (size_t i = 0; i < n; i++)
        list_push(r, out.u.list, items[idx[i].u.i]);
    return out;
}

static jval do_dictsort(rctx *r, int32_t line, const jval *v, const cargs *a)
{
    jval s[3];
    bool g[3];
    bind_args(r, line, "dictsort", "case_sensitive by reverse", a, s, g);
    bool cs = g[0] && truthy(&s[0]), reverse = g[2] && truthy(&s[2]);
    int pos = 0;
    if (g[1]) {
        strv by = arg_str(r, line, &s[1], "by");
        if (strv_eq(by, "value"))
            pos = 1;
        else if (!strv_eq(by, "key"))
            rfail(r, line, "You can only sort by either \"key\" or \"value\"");
    }
    if (v->t != JV_DICT) {
        if (v->t == JV_UNDEF)
            fail_undefined(r, line, v);
        rfail(r, line, "'%s' object has no attribute 'items'", type_name(v));
    }
    const jdict *d = v->u.dict;
    jval *keys = pool_array(&r->mem, d->n ? d->n : 1, sizeof(jval));
    jval *idx = pool_array(&r->mem, d->n ? d->n : 1, sizeof(jval));
    for (size_t i = 0; i < d->n; i++) {
        idx[i] = mk_int((int64_t)i);
        jval k = pos ? d->v[i] : d->k[i];
        keys[i] = cs ? k : lower_if_str(r, k);
    }
    sort_values(r, line, idx, d->n, keys, reverse);
    jval out = mk_list(r, d->n, LK_LIST);
    for (size_t i = 0; i < d->n; i++)
        list_push(r, out.u.list, mk_tuple2(r, d->k[idx[i].u.i], d->v[idx[i].u.i]));
    return out;
}

static jval do_unique(rctx *r, int32_t line, const jval *v, const cargs *a)
{
    jval s[2];
    bool g[2];
    bind_args(r, line, "unique", "case_sensitive attribute", a, s, g);
    bool cs = g[0] && truthy(&s[0]);
    jval attribute = g[1] ? s[1] : mk_none();
    size_t n;
    const jval *items = iterate(r, line, v, &n);
    jval seen = mk_dict(r);
    jval *out = pool_array(&r->mem, n ? n : 1, sizeof(jval));
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        count_step(r, line);
        jval key = attr_path(r, line, items[i], &attribute, NULL);
        if (!cs)
            key = lower_if_str(r, key);
        (void)py_hash(r, line, &key);
        if (dict_find(seen.u.dict, &key) >= 0)
            continue;
        dict_set(r, line, seen.u.dict, key, mk_none());
        out[k++] = items[i];
    }
    return mk_iter(r, out, k, "generator");
}

static jval do_sum(rctx *r, int32_t line, const jval *v, const cargs *a)
{
    jval s[2];
    bool g[2];
    bind_args(r, line, "sum", "attribute start", a, s, g);
    jval attribute = g[0] ? s[0] : mk_none();
    jval acc = g[1] ? s[1] : mk_int(0);
    if (acc.t == JV_STR)
        rfail(r, line, "sum() can't sum strings [use ''.join(seq) instead]");
    size_t n;
    const jval *items = iterate(r, line, v, &n);
    for (size_t i = 0; i < n; i++) {
        count_step(r, line);
        jval x = attr_path(r, line, items[i], &attribute, NULL);
        acc = binop(r, line, OPB_ADD, &acc, &x);
    }
    return acc;
}

static jval do_batch(rctx *r, int32_t line, const jval *v, const cargs *a)
{
    jval s[2];
    bool g[2];
    bind_args(r, line, "batch", "linecount fill_with", a, s, g);
    require_args(r, line, "batch", 1, g);
    int64_t k = arg_int(r, line, &s[0]);
    bool fill = g[1] && s[1].t != JV_NONE;
    size_t n;
    const jval *items = iterate(r, line, v, &n);
    if (k <= 0) {
        if (n)
            rfail(r, line, "batch: the line count must be positive");
        k = 1;
    }
    size_t n_out = (n + (size_t)k - 1) / (size_t)k;
    jval *out = pool_array(&r->mem, n_out ? n_out : 1, sizeof(jval));
    for (size_t i = 0; i < n_out; i++) {
        jval row = mk_list(r, (size_t)k < n ? (size_t)k : n, LK_LIST);
        for (size_t j = i * (size_t)k; j < n && j < (i + 1) * (size_t)k; j++)
            list_push(r, row.u.list, items[j]);
        while (fill && row.u.list->n < (size_t)k)
            list_push(r, row.u.list, s[1]);
        out[i] = row;
    }
    return mk_iter(r, out, n_out, "generator");
}

static jval do_round(rctx *r, int32_t line, const jval *v, const cargs *a)
{
    jval s[2];
    bool g[2];
    bind_args(r, line, "round", "precision method", a, s, g);
    int64_t prec = g[0] ? arg_int(r, line, &s[0]) : 0;
    strv method = g[1] ? arg_str(r, line, &s[1], "method") : STRV("common");
    if (!strv_eq(method, "common") && !strv_eq(method, "ceil") && !strv_eq(method, "floor"))
        rfail(r, line, "method must be common, ceil or floor");
    if (!is_number(v)) {
        if (v->t == JV_UNDEF)
            fail_undefined(r, line, v);
        rfail(r, line, "type %s doesn't define __round__ method", type_name(v));
    }
    if (strv_eq(method, "common")) {
        if (v->t != JV_FLOAT) {
            int64_t x = num_as_int(v);
            if (prec >= 0)
                return mk_int(x);
            if (prec < -18)
                return mk_int(0);
            int64_t p = 1;
            for (int64_t i = 0; i < -prec; i++)
                p *= 10;
            /* round half to even on the integer */
            int64_t q = x / p, m = x % p;
            if (m < 0) {
                m += p;
                q -= 1;
            }
            if (m * 2 > p || (m * 2 == p && (q & 1)))
                q += 1;
            int64_t z;
            if (__builtin_mul_overflow(q, p, &z))
                fail_overflow(r, line);
            return mk_int(z);
        }
        return mk_float(py_round(v->u.dbl, prec));
    }
    /* func(value * 10**precision) / 10**precision */
    jval ten = mk_int(10), pv = mk_int(prec);
    jval scale = binop(r, line, OPB_POW, &ten, &pv);
    jval prod = binop(r, line, OPB_MUL, v, &scale);
    double x = num_as_double(&prod);
    double y = strv_eq(method, "ceil") ? ceil(x) : floor(x);
    if (!isfinite(y) || fabs(y) >= 9.2e18)
        runsupported(r, line, "round: a result past 64 bits is not supported");
    jval iv = mk_int((int64_t)y);
    return binop(r, line, OPB_DIV, &iv, &scale);
}

static jval do_int(rctx *r, int32_t line, const jval *v, const cargs *a)
{
    jval s[2];
    bool g[2];
    bind_args(r, line, "int", "default base", a, s, g);
    jval dflt = g[0] ? s[0] : mk_int(0);
    int64_t base = g[1] ? arg_int(r, line, &s[1]) : 10;
    switch ((jtype)v->t) {
    case JV_UNDEF: fail_undefined(r, line, v);
    case JV_INT: return *v;
    case JV_BOOL: return mk_int(v->u.b);
    case JV_FLOAT:
        if (!isfinite(v->u.dbl))
            return dflt;
        if (fabs(v->u.dbl) >= 9.2e18)
            fail_overflow(r, line);
        return mk_int((int64_t)v->u.dbl);
    case JV_STR: {
        int64_t out;
        bool overflow;
        if (parse_py_int((strv){v->u.s.p, v->u.s.n}, (int)base, &out, &overflow)) {
            if (overflow)
                fail_overflow(r, line);
            return mk_int(out);
        }
        double d;
        if (parse_py_float((strv){v->u.s.p, v->u.s.n}, &d) && isfinite(d)) {
            if (fabs(d) >= 9.2e18)
                fail_overflow(r, line);
            return mk_int((int64_t)d);
        }
        return dflt;
    }
    default: return dflt;
    }
}

static jval do_float(rctx *r, int32_t line, const jval *v, const cargs *a)
{
    jval s[1];
    bool g[1];
    bind_args(r, line, "float", "default", a, s, g);
    jval dflt = g[0] ? s[0] : mk_float(0.0);
    switch ((jtype)v->t) {
    case JV_UNDEF: fail_undefined(r, line, v);
    case JV_INT:
    case JV_BOOL: return mk_float(num_as_double(v));
    case JV_FLOAT: return *v;
    case JV_STR: {
        double d;
        if (parse_py_float((strv){v->u.s.p, v->u.s.n}, &d))
            return mk_float(d);
        return dflt;
    }
    default: return dflt;
    }
}

static jval do_reverse(rctx *r, int32_t line, const jval *v)
{
    if (v->t == JV_STR) {
        strv s = {v->u.s.p, v->u.s.n};
        size_t k;
        size_t *off = cp_offsets(r, s, &k);
        char *p = pool_alloc(&r->mem, s.n + 1);
        size_t o = 0;
        for (size_t i = k; i > 0; i--) {
            size_t a = off ? off[i - 1] : i - 1, z = off ? off[i] : i;
            memcpy(p + o, s.p + a, z - a);
            o += z - a;
        }
        p[o] = 0;
        return mk_str(p, o);
    }
    size_t n;
    bool listy = v->t == JV_LIST || v->t == JV_DICT || v->t == JV_VIEW || v->t == JV_UNDEF;
    const jval *items = iterate(r, line, v, &n);
    jval *out = pool_array(&r->mem, n ? n : 1, sizeof(jval));
    for (size_t i = 0; i < n; i++)
        out[i] = items[n - 1 - i];
    if (listy) {
        const char *tn = v->t == JV_DICT                       ? "dict_reversekeyiterator"
                         : v->t == JV_VIEW                     ? "dict_reverseitemiterator"
                         : v->t == JV_LIST && v->f == LK_TUPLE ? "reversed"
                         : v->t == JV_LIST && v->f == LK_RANGE ? "range_iterator"
                         : v->t == JV_UNDEF                    ? "reversed"
                                                               : "list_reverseiterator";
        return mk_iter(r, out, n, tn);
    }
    /* a generator: list(value), reversed in place, is returned */
    jval l = mk_list(r, n, LK_LIST);
    for (size_t i = 0; i < n; i++)
        list_push(r, l.u.list, out[i]);
    return l;
}

static jval do_join(rctx *r, int32_t line, const jval *v, const cargs *a)
{
    jval s[2];
    bool g[2];
    bind_args(r, line, "join", "d attribute", a, s, g);
    strv sep = g[0] ? str_of(r, line, &s[0]) : STRV("");
    jval attribute = g[1] ? s[1] : mk_none();
    size_t n;
    const jval *items = iterate(r, line, v, &n);
    sbuf *b = sbuf_new(r);
    for (size_t i = 0; i < n; i++) {
        count_step(r, line);
        if (i)
            sbuf_put(b, sep.p, sep.n);
        jval x = attr_path(r, line, items[i], &attribute, NULL);
        put_str(r, line, b, &x);
    }
    return sbuf_done(r, b);
}

static jval apply_filter(rctx *r, int32_t line, int fid, strv name, jval v, const cargs *a)
{
    count_step(r, line);
    if (fid < 0 || fid == F_UNKNOWN)
        rfail(r, line, "No filter named '%.*s' found.", (int)name.n, name.p);
    if (!filters[fid].supported)
        runsupported(r, line, "the filter '%s' is not supported", filters[fid].name);
    jval s[4];
    bool g[4];
    switch ((filter_id)fid) {
    case F_ABS:
        bind_args(r, line, "abs", "", a, s, g);
        if (v.t == JV_INT) {
            if (v.u.i == INT64_MIN)
                fail_overflow(r, line);
            return mk_int(v.u.i < 0 ? -v.u.i : v.u.i);
        }
        if (v.t == JV_BOOL)
            return mk_int(v.u.b);
        if (v.t == JV_FLOAT)
            return mk_float(fabs(v.u.dbl));
        rfail(r, line, "bad operand type for abs(): '%s'", type_name(&v));
    case F_ATTR: {
        bind_args(r, line, "attr", "name", a, s, g);
        require_args(r, line, "attr", 1, g);
        if (v.t == JV_UNDEF)
            fail_undefined(r, line, &v);
        strv nm = arg_str(r, line, &s[0], "attribute name");
        bool found;
        jval x = py_getattr(r, line, &v, nm, &found);
        return found ? x : undef_attr(r, &v, nm);
    }
    case F_BATCH: return do_batch(r, line, &v, a);
    case F_CAPITALIZE:
        bind_args(r, line, "capitalize", "", a, s, g);
        return str_capitalize(r, str_of(r, line, &v));
    case F_CENTER: {
        bind_args(r, line, "center", "width", a, s, g);
        int64_t width = g[0] ? arg_int(r, line, &s[0]) : 80;
        jval sv = mk_strv(str_of(r, line, &v));
        jval w = mk_int(width);
        cargs ca = {&w, 1, NULL, NULL, 0};
        jval m = mk_method(r, FN_CENTER, &sv);
        return call_function(r, line, &m, &ca);
    }
    case F_COUNT:
    case F_LENGTH: bind_args(r, line, "length", "", a, s, g); return mk_int(py_len(r, line, &v));
    case F_D:
    case F_DEFAULT:
        bind_args(r, line, "default", "default_value boolean", a, s, g);
        if (v.t == JV_UNDEF || (g[1] && truthy(&s[1]) && !truthy(&v)))
            return g[0] ? s[0] : mk_str("", 0);
        return v;
    case F_DICTSORT: return do_dictsort(r, line, &v, a);
    case F_E:
    case F_ESCAPE:
    case F_FORCEESCAPE:
        bind_args(r, line, "escape", "", a, s, g);
        if (fid == F_FORCEESCAPE && v.t == JV_STR)
            return html_escape(r, (strv){v.u.s.p, v.u.s.n});
        return markup_escape(r, line, &v);
    case F_FIRST: {
        bind_args(r, line, "first", "", a, s, g);
        size_t n;
        if (v.t == JV_ITER) { /* next(): one item */
            jiter *it = v.u.it;
            if (it->pos < it->n)
                return it->v[it->pos++];
            return mk_undef(r, "No first item, sequence was empty.");
        }
        const jval *items = iterate(r, line, &v, &n);
        return n ? items[0] : mk_undef(r, "No first item, sequence was empty.");
    }
    case F_FLOAT: return do_float(r, line, &v, a);
    case F_INDENT: return do_indent(r, line, &v, a);
    case F_INT: return do_int(r, line, &v, a);
    case F_ITEMS: {
        bind_args(r, line, "items", "", a, s, g);
        if (v.t == JV_UNDEF)
            return mk_iter(r, NULL, 0, "generator");
        if (v.t != JV_DICT)
            rfail(r, line, "Can only get item pairs from a mapping.");
        const jdict *d = v.u.dict;
        jval *out = pool_array(&r->mem, d->n ? d->n : 1, sizeof(jval));
        for (size_t i = 0; i < d->n; i++)
            out[i] = mk_tuple2(r, d->k[i], d->v[i]);
        return mk_iter(r, out, d->n, "generator");
    }
    case F_JOIN: return do_join(r, line, &v, a);
    case F_LAST: {
        bind_args(r, line, "last", "", a, s, g);
        if (v.t == JV_ITER)
            rfail(r, line, "'%s' object is not reversible", type_name(&v));
        size_t n;
        const jval *items = iterate(r, line, &v, &n);
        return n ? items[n - 1] : mk_undef(r, "No last item, sequence was empty.");
    }
    case F_LIST: {
        bind_args(r, line, "list", "", a, s, g);
        size_t n;
        const jval *items = iterate(r, line, &v, &n);
        jval out = mk_list(r, n, LK_LIST);
        if (n)
            memcpy(out.u.list->v, items, n * sizeof(jval));
        out.u.list->n = n;
        return out;
    }
    case F_LOWER:
        bind_args(r, line, "lower", "", a, s, g);
        return str_case(r, str_of(r, line, &v), CASE_LOWER);
    case F_UPPER:
        bind_args(r, line, "upper", "", a, s, g);
        return str_case(r, str_of(r, line, &v), CASE_UPPER);
    case F_MAP: return do_map(r, line, v, a);
    case F_MAX: return do_minmax(r, line, &v, a, true);
    case F_MIN: return do_minmax(r, line, &v, a, false);
    case F_REJECT: return select_reject(r, line, v, a, true, false);
    case F_SELECT: return select_reject(r, line, v, a, false, false);
    case F_REJECTATTR: return select_reject(r, line, v, a, true, true);
    case F_SELECTATTR: return select_reject(r, line, v, a, false, true);
    case F_REPLACE: {
        bind_args(r, line, "replace", "old new count", a, s, g);
        require_args(r, line, "replace", 2, g);
        int64_t count = g[2] && s[2].t != JV_NONE ? arg_int(r, line, &s[2]) : -1;
        return str_replace(r, line, str_of(r, line, &v), str_of(r, line, &s[0]),
                           str_of(r, line, &s[1]), count);
    }
    case F_REVERSE: bind_args(r, line, "reverse", "", a, s, g); return do_reverse(r, line, &v);
    case F_ROUND: return do_round(r, line, &v, a);
    case F_SAFE: {
        bind_args(r, line, "safe", "", a, s, g);
        jval m = mk_strv(str_of(r, line, &v));
        m.f = STR_MARKUP;
        return m;
    }
    case F_SORT: return do_sort(r, line, &v, a);
    case F_STRING:
        bind_args(r, line, "string", "", a, s, g);
        if (v.t == JV_STR)
            return v;
        return mk_strv(str_of(r, line, &v));
    case F_SUM: return do_sum(r, line, &v, a);
    case F_TITLE:
        bind_args(r, line, "title", "", a, s, g);
        return str_title_jinja(r, str_of(r, line, &v));
    case F_TOJSON: return do_tojson(r, line, &v, a);
    case F_TRIM: {
        bind_args(r, line, "trim", "chars", a, s, g);
        strv str = str_of(r, line, &v);
        if (g[0] && s[0].t != JV_NONE) {
            strv chars = arg_str(r, line, &s[0], "strip arg");
            return mk_strv(str_strip(str, &chars, true, true));
        }
        return mk_strv(str_strip(str, NULL, true, true));
    }
    case F_TRUNCATE: return do_truncate(r, line, &v, a);
    case F_UNIQUE: return do_unique(r, line, &v, a);
    case F_WORDCOUNT: {
        bind_args(r, line, "wordcount", "", a, s, g);
        strv str = str_of(r, line, &v);
        int64_t words = 0;
        bool in_word = false;
        for (size_t i = 0; i < str.n;) {
            int32_t c;
            i += utf8_next(str.p, str.n, i, &c);
            bool w = py_isword(c);
            if (w && !in_word)
                words++;
            in_word = w;
        }
        return mk_int(words);
    }
    default: break;
    }
    runsupported(r, line, "the filter '%s' is not supported", filters[fid].name);
}

static bool str_all(strv s, bool (*pred)(int32_t))
{
    if (!s.n)
        return false;
    for (size_t i = 0; i < s.n;) {
        int32_t c;
        i += utf8_next(s.p, s.n, i, &c);
        if (!pred(c))
            return false;
    }
    return true;
}

/* str.islower / isupper: some cased character, none of the other case. */
static bool str_is_case(strv s, bool lower)
{
    bool cased = false;
    for (size_t i = 0; i < s.n;) {
        int32_t c;
        i += utf8_next(s.p, s.n, i, &c);
        utf8proc_category_t k = utf8proc_category(c);
        bool is_up = k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LT;
        bool is_low = k == UTF8PROC_CATEGORY_LL || (!is_up && utf8proc_toupper(c) != c);
        if (lower ? is_up : is_low)
            return false;
        if (lower ? is_low : is_up)
            cased = true;
    }
    return cased;
}

static bool test_sameas(const jval *a, const jval *b)
{
    if (a->t != b->t)
        return false;
    switch ((jtype)a->t) {
    case JV_NONE:
    case JV_UNDEF: return a->t == JV_NONE;
    case JV_BOOL: return a->u.b == b->u.b;
    case JV_INT: return a->u.i == b->u.i && a->u.i >= -5 && a->u.i <= 256; /* CPython's cache */
    case JV_STR: return a->u.s.p == b->u.s.p && a->u.s.n == b->u.s.n;
    case JV_LIST: return a->u.list == b->u.list;
    case JV_DICT:
    case JV_NS: return a->u.dict == b->u.dict;
    default: return py_eq(a, b);
    }
}

static bool apply_test(rctx *r, int32_t line, int tid, strv name, const jval *v, const cargs *a)
{
    count_step(r, line);
    if (tid < 0 || tid == T_UNKNOWN)
        rfail(r, line, "No test named '%.*s' found.", (int)name.n, name.p);
    jval s[1];
    bool g[1];
    const char *tn = tests[tid];
    switch ((test_id)tid) {
    case T_ODD:
    case T_EVEN:
    case T_DIVISIBLEBY: {
        jval two = mk_int(2);
        if (tid == T_DIVISIBLEBY) {
            bind_args(r, line, tn, "num", a, s, g);
            require_args(r, line, tn, 1, g);
            two = s[0];
        } else {
            bind_args(r, line, tn, "", a, s, g);
        }
        jval m = binop(r, line, OPB_MOD, v, &two);
        jval want = mk_int(tid == T_ODD ? 1 : 0);
        return py_eq(&m, &want);
    }
    case T_SAMEAS:
    case T_IN:
    case T_EQ1:
    case T_EQ2:
    case T_EQ3:
    case T_NE1:
    case T_NE2:
    case T_GT1:
    case T_GT2:
    case T_GT3:
    case T_GE1:
    case T_GE2:
    case T_LT1:
    case T_LT2:
    case T_LT3:
    case T_LE1:
    case T_LE2: {
        bind_args(r, line, tn, tid == T_IN ? "seq" : "other", a, s, g);
        require_args(r, line, tn, 1, g);
        if (tid == T_SAMEAS)
            return test_sameas(v, &s[0]);
        if (tid == T_IN)
            return py_contains(r, line, &s[0], v);
        int op = tid <= T_EQ3   ? CMP_EQ
                 : tid <= T_NE2 ? CMP_NE
                 : tid <= T_GT3 ? CMP_GT
                 : tid <= T_GE2 ? CMP_GTEQ
                 : tid <= T_LT3 ? CMP_LT
                                : CMP_LTEQ;
        return compare_op(r, line, op, v, &s[0]);
    }
    default: break;
    }
    bind_args(r, line, tn, "", a, s, g);
    switch ((test_id)tid) {
    case T_DEFINED: return v->t != JV_UNDEF;
    case T_UNDEFINED: return v->t == JV_UNDEF;
    case T_NONE: return v->t == JV_NONE;
    case T_BOOLEAN: return v->t == JV_BOOL;
    case T_FALSE: return v->t == JV_BOOL && !v->u.b;
    case T_TRUE: return v->t == JV_BOOL && v->u.b;
    case T_INTEGER: return v->t == JV_INT;
    case T_FLOAT_: return v->t == JV_FLOAT;
    case T_STRING_: return v->t == JV_STR;
    case T_MAPPING: return v->t == JV_DICT;
    case T_NUMBER: return is_number(v);
    case T_SEQUENCE:
        return v->t == JV_STR || v->t == JV_LIST || v->t == JV_DICT || v->t == JV_UNDEF;
    case T_ITERABLE:
        return v->t == JV_STR || v->t == JV_LIST || v->t == JV_DICT || v->t == JV_UNDEF ||
               v->t == JV_ITER || v->t == JV_VIEW || v->t == JV_LOOP;
    case T_CALLABLE:
        return v->t == JV_MACRO || v->t == JV_FUNC || v->t == JV_UNDEF || v->t == JV_LOOP;
    case T_ESCAPED: return v->t == JV_STR && (v->f & STR_MARKUP);
    case T_LOWER: return str_is_case(str_of(r, line, v), true);
    case T_UPPER: return str_is_case(str_of(r, line, v), false);
    case T_FILTER: return v->t == JV_STR && find_filter((strv){v->u.s.p, v->u.s.n}) >= 0;
    case T_TEST: return v->t == JV_STR && find_test((strv){v->u.s.p, v->u.s.n}) >= 0;
    default: break;
    }
    rfail(r, line, "No test named '%s' found.", tn);
}

/* ---- builtin functions and methods -------------------------------------------------- */

/* start/end arguments of find/count/startswith as code point indexes, clamped (Python's
 * ADJUST_INDICES); returns byte offsets into s. */
static void adjust_range(rctx *r, int32_t line, strv s, const jval *start, bool has_start,
                         const jval *end, bool has_end, size_t *a, size_t *z, int64_t *cp_a)
{
    size_t k;
    size_t *off = cp_offsets(r, s, &k);
    int64_t lo = 0, hi = (int64_t)k;
    if (has_start && start->t != JV_NONE)
        lo = arg_int(r, line, start);
    if (has_end && end->t != JV_NONE)
        hi = arg_int(r, line, end);
    if (hi > (int64_t)k)
        hi = (int64_t)k;
    else if (hi < 0) {
        hi += (int64_t)k;
        if (hi < 0)
            hi = 0;
    }
    if (lo < 0) {
        lo += (int64_t)k;
        if (lo < 0)
            lo = 0;
    }
    *cp_a = lo;
    if (lo > hi) { /* an empty range past the end: find gives -1, count 0 */
        *a = SIZE_MAX;
        *z = 0;
        return;
    }
    *a = off ? off[lo] : (size_t)lo;
    *z = off ? off[hi] : (size_t)hi;
}

static bool affix_match(rctx *r, int32_t line, strv s, size_t a, size_t z, const jval *affix,
                        bool suffix)
{
    if (affix->t == JV_LIST && affix->f == LK_TUPLE) {
        for (size_t i = 0; i < affix->u.list->n; i++)
            if (affix_match(r, line, s, a, z, &affix->u.list->v[i], suffix))
                return true;
        return false;
    }
    if (affix->t != JV_STR)
        rfail(r, line, "%s first arg must be str or a tuple of str, not %s",
              suffix ? "endswith" : "startswith", type_name(affix));
    if (a == SIZE_MAX)
        return false;
    size_t n = affix->u.s.n;
    if (n > z - a)
        return false;
    return !memcmp(s.p + (suffix ? z - n : a), affix->u.s.p, n);
}

static jval str_pad(rctx *r, int32_t line, strv s, int64_t width, const jval *fill, int mode)
{
    int32_t fc = ' ';
    if (fill) {
        strv f = arg_str(r, line, fill, "fill character");
        if (cp_len(f) != 1)
            rfail(r, line, "The fill character must be exactly one character long");
        utf8_next(f.p, f.n, 0, &fc);
    }
    int64_t len = (int64_t)cp_len(s);
    if (width <= len)
        return mk_strv(s);
    if (width - len > (int64_t)r->lim.max_output_bytes)
        rfail(r, line, "a string longer than %zu bytes (the limit)", r->lim.max_output_bytes);
    int64_t marg = width - len, left;
    if (mode == 0) /* center */
        left = marg / 2 + (marg & width & 1);
    else if (mode == 1) /* ljust */
        left = 0;
    else
        left = marg;
    sbuf *b = sbuf_new(r);
    for (int64_t i = 0; i < left; i++)
        sbuf_put_cp(b, fc);
    sbuf_put(b, s.p, s.n);
    for (int64_t i = 0; i < marg - left; i++)
        sbuf_put_cp(b, fc);
    return sbuf_done(r, b);
}

/* str.format with plain fields ({}, {0}, {name}, {name.attr}, {name[key]}, !s/!r); format
 * specs are not supported. */
static jval str_format(rctx *r, int32_t line, strv fmt, const cargs *a)
{
    sbuf *b = sbuf_new(r);
    int32_t auto_idx = 0;
    bool manual = false;
    for (size_t i = 0; i < fmt.n;) {
        char c = fmt.p[i];
        if (c == '}') {
            if (i + 1 < fmt.n && fmt.p[i + 1] == '}') {
                sbuf_putc(b, '}');
                i += 2;
                continue;
            }
            rfail(r, line, "Single '}' encountered in format string");
        }
        if (c != '{') {
            sbuf_putc(b, c);
            i++;
            continue;
        }
        if (i + 1 < fmt.n && fmt.p[i + 1] == '{') {
            sbuf_putc(b, '{');
            i += 2;
            continue;
        }
        const char *close = memchr(fmt.p + i, '}', fmt.n - i);
        if (!close)
            rfail(r, line, "Single '{' encountered in format string");
        strv field = {fmt.p + i + 1, (size_t)(close - fmt.p) - i - 1};
        i = (size_t)(close - fmt.p) + 1;
        char conv = 0;
        const char *bang = memchr(field.p, '!', field.n);
        if (memchr(field.p, ':', field.n) || memchr(field.p, '{', field.n))
            runsupported(r, line, "str.format with a format spec is not supported");
        if (bang) {
            if ((size_t)(bang - field.p) + 2 != field.n || (bang[1] != 's' && bang[1] != 'r'))
                runsupported(r, line, "str.format conversion '%.*s' is not supported",
                             (int)(field.n - (size_t)(bang - field.p)), bang);
            conv = bang[1];
            field.n = (size_t)(bang - field.p);
        }
        size_t k = 0;
        while (k < field.n && field.p[k] != '.' && field.p[k] != '[')
            k++;
        strv head = {field.p, k};
        jval val;
        if (!head.n || (head.p[0] >= '0' && head.p[0] <= '9')) {
            if (head.n ? auto_idx > 0 : manual)
                rfail(r, line,
                      "cannot switch between manual field specification and "
                      "automatic field numbering");
            manual |= head.n > 0;
            int64_t idx =
                head.n ? strtoll(pool_strdup(&r->mem, head.p, head.n), NULL, 10) : auto_idx++;
            if (idx >= a->n_pos)
                rfail(r, line,
                      "Replacement index %" PRId64 " out of range for positional args "
                      "tuple",
                      idx);
            val = a->pos[idx];
        } else {
            int32_t kk;
            for (kk = 0; kk < a->n_kw; kk++)
                if (strv_same(a->kwn[kk], head))
                    break;
            if (kk == a->n_kw)
                rfail(r, line, "KeyError: '%.*s'", (int)head.n, head.p);
            val = a->kwv[kk];
        }
        while (k < field.n) { /* .attr or [key] */
            if (field.p[k] == '.') {
                size_t q = k + 1;
                while (q < field.n && field.p[q] != '.' && field.p[q] != '[')
                    q++;
                strv an = {field.p + k + 1, q - k - 1};
                bool found;
                jval x = py_getattr(r, line, &val, an, &found);
                if (!found)
                    rfail(r, line, "'%s' object has no attribute '%.*s'", type_name(&val),
                          (int)an.n, an.p);
                val = x;
                k = q;
            } else {
                const char *rb = memchr(field.p + k, ']', field.n - k);
                if (!rb)
                    rfail(r, line, "Missing ']' in format string");
                strv key = {field.p + k + 1, (size_t)(rb - field.p) - k - 1};
                bool digits = key.n > 0;
                for (size_t q = 0; q < key.n; q++)
                    digits &= key.p[q] >= '0' && key.p[q] <= '9';
                jval kv = digits && key.n < 19
                              ? mk_int(strtoll(pool_strdup(&r->mem, key.p, key.n), NULL, 10))
                              : mk_strv(key);
                jval x = get_item(r, line, &val, &kv);
                if (x.t == JV_UNDEF)
                    rfail(r, line, "KeyError: '%.*s'", (int)key.n, key.p);
                val = x;
                k = (size_t)(rb - field.p) + 1;
            }
        }
        if (conv == 'r')
            put_repr(r, line, b, &val);
        else
            put_str(r, line, b, &val);
    }
    return sbuf_done(r, b);
}

static jval str_method(rctx *r, int32_t line, int fn, strv s, const cargs *a)
{
    jval v[3];
    bool g[3];
    const char *name = fn_names[fn];
    switch ((fn_id)fn) {
    case FN_UPPER:
    case FN_LOWER:
        bind_args(r, line, name, "", a, v, g);
        return str_case(r, s, fn == FN_UPPER ? CASE_UPPER : CASE_LOWER);
    case FN_TITLE: bind_args(r, line, name, "", a, v, g); return str_title_py(r, s);
    case FN_CAPITALIZE: bind_args(r, line, name, "", a, v, g); return str_capitalize(r, s);
    case FN_SWAPCASE: {
        bind_args(r, line, name, "", a, v, g);
        sbuf *b = sbuf_new(r);
        for (size_t i = 0; i < s.n;) {
            int32_t c;
            i += utf8_next(s.p, s.n, i, &c);
            utf8proc_category_t k = utf8proc_category(c);
            if (k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LL)
                sbuf_put_case(b, c, k == UTF8PROC_CATEGORY_LU ? CASE_LOWER : CASE_UPPER);
            else
                sbuf_put_cp(b, c);
        }
        return sbuf_done(r, b);
    }
    case FN_STRIP:
    case FN_LSTRIP:
    case FN_RSTRIP: {
        bind_args(r, line, name, "chars", a, v, g);
        bool l = fn != FN_RSTRIP, rr = fn != FN_LSTRIP;
        if (g[0] && v[0].t != JV_NONE) {
            strv chars = arg_str(r, line, &v[0], "strip arg");
            return mk_strv(str_strip(s, &chars, l, rr));
        }
        return mk_strv(str_strip(s, NULL, l, rr));
    }
    case FN_SPLIT:
    case FN_RSPLIT: {
        bind_args(r, line, name, "sep maxsplit", a, v, g);
        int64_t maxsplit = g[1] ? arg_int(r, line, &v[1]) : -1;
        if (g[0] && v[0].t != JV_NONE) {
            strv sep = arg_str(r, line, &v[0], "sep");
            return str_split(r, line, s, &sep, maxsplit, fn == FN_RSPLIT);
        }
        return str_split(r, line, s, NULL, maxsplit, fn == FN_RSPLIT);
    }
    case FN_SPLITLINES:
        bind_args(r, line, name, "keepends", a, v, g);
        return str_splitlines(r, line, s, g[0] && truthy(&v[0]));
    case FN_STARTSWITH:
    case FN_ENDSWITH: {
        bind_args(r, line, name, "prefix start end", a, v, g);
        require_args(r, line, name, 1, g);
        size_t lo, hi;
        int64_t cpa;
        adjust_range(r, line, s, &v[1], g[1], &v[2], g[2], &lo, &hi, &cpa);
        return mk_bool(affix_match(r, line, s, lo, hi, &v[0], fn == FN_ENDSWITH));
    }
    case FN_FIND:
    case FN_RFIND:
    case FN_INDEX:
    case FN_RINDEX:
    case FN_COUNT: {
        bind_args(r, line, name, "sub start end", a, v, g);
        require_args(r, line, name, 1, g);
        strv sub = arg_str(r, line, &v[0], "the substring");
        size_t lo, hi;
        int64_t cpa;
        adjust_range(r, line, s, &v[1], g[1], &v[2], g[2], &lo, &hi, &cpa);
        if (fn == FN_COUNT) {
            if (lo == SIZE_MAX)
                return mk_int(0);
            strv w = {s.p + lo, hi - lo};
            if (!sub.n)
                return mk_int((int64_t)cp_len(w) + 1);
            int64_t c = 0;
            for (size_t i = 0;;) {
                const char *h = memmem_s(w.p + i, w.n - i, sub.p, sub.n);
                if (!h)
                    break;
                c++;
                i = (size_t)(h - w.p) + sub.n;
            }
            return mk_int(c);
        }
        const char *h = NULL;
        if (lo != SIZE_MAX)
            h = fn == FN_FIND || fn == FN_INDEX ? memmem_s(s.p + lo, hi - lo, sub.p, sub.n)
                                                : memrmem_s(s.p + lo, hi - lo, sub.p, sub.n);
        if (!h) {
            if (fn == FN_INDEX || fn == FN_RINDEX)
                rfail(r, line, "substring not found");
            return mk_int(-1);
        }
        return mk_int(cp_index(s, (size_t)(h - s.p)));
    }
    case FN_REPLACE: {
        bind_args(r, line, name, "old new count", a, v, g);
        require_args(r, line, name, 2, g);
        int64_t count = g[2] ? arg_int(r, line, &v[2]) : -1;
        return str_replace(r, line, s, arg_str(r, line, &v[0], "replace() argument 1"),
                           arg_str(r, line, &v[1], "replace() argument 2"), count);
    }
    case FN_JOIN: {
        bind_args(r, line, name, "iterable", a, v, g);
        require_args(r, line, name, 1, g);
        size_t n;
        const jval *items = iterate(r, line, &v[0], &n);
        sbuf *b = sbuf_new(r);
        for (size_t i = 0; i < n; i++) {
            if (items[i].t != JV_STR)
                rfail(r, line, "sequence item %zu: expected str instance, %s found", i,
                      type_name(&items[i]));
            if (i)
                sbuf_put(b, s.p, s.n);
            sbuf_put(b, items[i].u.s.p, items[i].u.s.n);
            count_step(r, line);
        }
        return sbuf_done(r, b);
    }
    case FN_PARTITION:
    case FN_RPARTITION: {
        bind_args(r, line, name, "sep", a, v, g);
        require_args(r, line, name, 1, g);
        strv sep = arg_str(r, line, &v[0], "sep");
        if (!sep.n)
            rfail(r, line, "empty separator");
        const char *h = fn == FN_PARTITION ? memmem_s(s.p, s.n, sep.p, sep.n)
                                           : memrmem_s(s.p, s.n, sep.p, sep.n);
        jval t = mk_list(r, 3, LK_TUPLE);
        if (!h) {
            jval e = mk_str("", 0);
            if (fn == FN_PARTITION) {
                list_push(r, t.u.list, mk_strv(s));
                list_push(r, t.u.list, e);
                list_push(r, t.u.list, e);
            } else {
                list_push(r, t.u.list, e);
                list_push(r, t.u.list, e);
                list_push(r, t.u.list, mk_strv(s));
            }
            return t;
        }
        size_t at = (size_t)(h - s.p);
        list_push(r, t.u.list, mk_str(s.p, at));
        list_push(r, t.u.list, mk_str(s.p + at, sep.n));
        list_push(r, t.u.list, mk_str(s.p + at + sep.n, s.n - at - sep.n));
        return t;
    }
    case FN_REMOVEPREFIX:
    case FN_REMOVESUFFIX: {
        bind_args(r, line, name, "affix", a, v, g);
        require_args(r, line, name, 1, g);
        strv x = arg_str(r, line, &v[0], name);
        if (x.n <= s.n && fn == FN_REMOVEPREFIX && !memcmp(s.p, x.p, x.n))
            return mk_str(s.p + x.n, s.n - x.n);
        if (x.n <= s.n && fn == FN_REMOVESUFFIX && !memcmp(s.p + s.n - x.n, x.p, x.n))
            return mk_str(s.p, s.n - x.n);
        return mk_strv(s);
    }
    case FN_CENTER:
    case FN_LJUST:
    case FN_RJUST: {
        bind_args(r, line, name, "width fillchar", a, v, g);
        require_args(r, line, name, 1, g);
        return str_pad(r, line, s, arg_int(r, line, &v[0]), g[1] ? &v[1] : NULL,
                       fn == FN_CENTER  ? 0
                       : fn == FN_LJUST ? 1
                                        : 2);
    }
    case FN_ZFILL: {
        bind_args(r, line, name, "width", a, v, g);
        require_args(r, line, name, 1, g);
        int64_t width = arg_int(r, line, &v[0]);
        int64_t len = (int64_t)cp_len(s);
        if (width <= len)
            return mk_strv(s);
        if (width - len > (int64_t)r->lim.max_output_bytes)
            rfail(r, line, "a string longer than %zu bytes (the limit)", r->lim.max_output_bytes);
        sbuf *b = sbuf_new(r);
        size_t start = 0;
        if (s.n && (s.p[0] == '+' || s.p[0] == '-')) {
            sbuf_putc(b, s.p[0]);
            start = 1;
        }
        for (int64_t i = 0; i < width - len; i++)
            sbuf_putc(b, '0');
        sbuf_put(b, s.p + start, s.n - start);
        return sbuf_done(r, b);
    }
    case FN_ISALNUM:
    case FN_ISALPHA:
    case FN_ISDECIMAL:
    case FN_ISDIGIT:
    case FN_ISNUMERIC:
    case FN_ISSPACE:
    case FN_ISASCII:
    case FN_ISPRINTABLE:
    case FN_ISLOWER:
    case FN_ISUPPER:
        bind_args(r, line, name, "", a, v, g);
        switch ((fn_id)fn) {
        case FN_ISALNUM: return mk_bool(str_all(s, py_isalnum));
        case FN_ISALPHA: return mk_bool(str_all(s, py_isalpha));
        case FN_ISDECIMAL: return mk_bool(str_all(s, py_isdecimal));
        case FN_ISDIGIT:
        case FN_ISNUMERIC: return mk_bool(str_all(s, py_isnumeric));
        case FN_ISSPACE: return mk_bool(str_all(s, py_isspace));
        case FN_ISASCII: return mk_bool(is_ascii(s.p, s.n));
        case FN_ISPRINTABLE: return mk_bool(!s.n || str_all(s, py_isprintable));
        case FN_ISLOWER: return mk_bool(str_is_case(s, true));
        default: return mk_bool(str_is_case(s, false));
        }
    case FN_FORMAT: return str_format(r, line, s, a);
    default: break;
    }
    runsupported(r, line, "the string method '%s' is not supported", name);
}

static jval strftime_now(rctx *r, int32_t line, strv fmt)
{
    if (fmt.n > 4096)
        runsupported(r, line, "strftime_now: a format longer than 4096 bytes");
    struct timeval tv;
    gettimeofday(&tv, NULL);
    time_t now = tv.tv_sec;
    struct tm tm;
    localtime_r(&now, &tm);
    /* datetime.strftime: %f is the microseconds, %z and %Z are empty for a naive time */
    sbuf *f = sbuf_new(r);
    for (size_t i = 0; i < fmt.n; i++) {
        if (fmt.p[i] == '%' && i + 1 < fmt.n) {
            char k = fmt.p[i + 1];
            if (k == 'f') {
                sbuf_printf(f, "%06ld", (long)tv.tv_usec);
                i++;
                continue;
            }
            if (k == 'z' || k == 'Z') {
                i++;
                continue;
            }
            sbuf_putc(f, '%');
            sbuf_putc(f, k);
            i++;
            continue;
        }
        sbuf_putc(f, fmt.p[i]);
    }
    if (!f->n) {
        sbuf_close(r, f);
        return mk_str("", 0);
    }
    size_t cap = 256 + f->n * 16;
    char *out = pool_alloc(&r->mem, cap);
    size_t n = strftime(out, cap, f->p, &tm);
    sbuf_close(r, f);
    return mk_str(out, n);
}

static jval dict_from_args(rctx *r, int32_t line, const cargs *a, const char *fname)
{
    jval d = mk_dict(r);
    if (a->n_pos > 1)
        rfail(r, line, "%s expected at most 1 argument, got %d", fname, (int)a->n_pos);
    if (a->n_pos == 1) {
        const jval *src = &a->pos[0];
        if (src->t == JV_DICT || src->t == JV_NS) {
            for (size_t i = 0; i < src->u.dict->n; i++)
                dict_set(r, line, d.u.dict, src->u.dict->k[i], src->u.dict->v[i]);
        } else {
            size_t n;
            const jval *items = iterate(r, line, src, &n);
            for (size_t i = 0; i < n; i++) {
                size_t m;
                const jval *kv = iterate(r, line, &items[i], &m);
                if (m != 2)
                    rfail(r, line,
                          "dictionary update sequence element #%zu has length %zu; 2 "
                          "is required",
                          i, m);
                dict_set(r, line, d.u.dict, kv[0], kv[1]);
            }
        }
    }
    for (int32_t k = 0; k < a->n_kw; k++)
        dict_set(r, line, d.u.dict, mk_strv(a->kwn[k]), a->kwv[k]);
    return d;
}

/* Markup's methods that only reshape the text give Markup back (markupsafe wraps them);
 * those that take text to insert (replace, join, format) escape it there, which this
 * engine does not do: they give plain strings. */
static jval markup_result(rctx *r, int fn, const jval *self, jval res)
{
    if (!(self->f & STR_MARKUP))
        return res;
    switch ((fn_id)fn) {
    case FN_CAPITALIZE:
    case FN_CENTER:
    case FN_LJUST:
    case FN_LOWER:
    case FN_LSTRIP:
    case FN_PARTITION:
    case FN_REMOVEPREFIX:
    case FN_REMOVESUFFIX:
    case FN_RJUST:
    case FN_RPARTITION:
    case FN_RSPLIT:
    case FN_RSTRIP:
    case FN_SPLIT:
    case FN_SPLITLINES:
    case FN_STRIP:
    case FN_SWAPCASE:
    case FN_TITLE:
    case FN_UPPER:
    case FN_ZFILL: break;
    default: return res;
    }
    if (res.t == JV_STR) {
        res.f |= STR_MARKUP;
    } else if (res.t == JV_LIST) {
        jval copy = mk_list(r, res.u.list->n, res.f);
        for (size_t i = 0; i < res.u.list->n; i++) {
            jval x = res.u.list->v[i];
            x.f |= STR_MARKUP;
            list_push(r, copy.u.list, x);
        }
        res = copy;
    }
    return res;
}

static jval call_function(rctx *r, int32_t line, const jval *fnv, const cargs *a)
{
    int fn = fnv->fn;
    const jval *self = fnv->u.self;
    jval v[3];
    bool g[3];
    count_step(r, line);
    if (fn >= FN_S_FIRST && fn < FN_S_END)
        return markup_result(r, fn, self,
                             str_method(r, line, fn, (strv){self->u.s.p, self->u.s.n}, a));
    switch ((fn_id)fn) {
    case FN_RANGE: {
        if (a->n_kw)
            rfail(r, line, "range() takes no keyword arguments");
        if (a->n_pos < 1 || a->n_pos > 3)
            rfail(r, line, "range expected at least 1 argument, got %d", (int)a->n_pos);
        int64_t start = 0, stop, step = 1;
        if (a->n_pos == 1) {
            stop = arg_int(r, line, &a->pos[0]);
        } else {
            start = arg_int(r, line, &a->pos[0]);
            stop = arg_int(r, line, &a->pos[1]);
            if (a->n_pos == 3)
                step = arg_int(r, line, &a->pos[2]);
        }
        if (!step)
            rfail(r, line, "range() arg 3 must not be zero");
        /* len(range): computed in 128 bits, then the sandbox's MAX_RANGE */
        __int128 len = 0;
        if (step > 0 && stop > start)
            len = ((__int128)stop - start - 1) / step + 1;
        else if (step < 0 && stop < start)
            len = ((__int128)start - stop - 1) / -(__int128)step + 1;
        if (len > JINJA_MAX_RANGE)
            rfail(r, line,
                  "Range too big. The sandbox blocks ranges larger than MAX_RANGE "
                  "(%d).",
                  JINJA_MAX_RANGE);
        jval l = mk_list(r, (size_t)len, LK_RANGE);
        for (int64_t i = 0; i < (int64_t)len; i++)
            list_push(r, l.u.list, mk_int((int64_t)(start + (__int128)i * step)));
        l.u.list->r_start = start;
        l.u.list->r_stop = stop;
        l.u.list->r_step = step;
        return l;
    }
    case FN_DICT: return dict_from_args(r, line, a, "dict");
    case FN_NAMESPACE: {
        jval d = dict_from_args(r, line, a, "namespace");
        d.t = JV_NS;
        return d;
    }
    case FN_RAISE: {
        bind_args(r, line, "raise_exception", "message", a, v, g);
        require_args(r, line, "raise_exception", 1, g);
        strv msg = str_of(r, line, &v[0]);
        ferry_fail(FERRY_ERR_INVALID, "%s: %.*s", r->c.name, (int)msg.n, msg.p);
        r->c.code = FERRY_ERR_INVALID;
        longjmp(r->c.jb, 1);
    }
    case FN_STRFTIME:
        bind_args(r, line, "strftime_now", "format", a, v, g);
        require_args(r, line, "strftime_now", 1, g);
        return strftime_now(r, line, arg_str(r, line, &v[0], "format"));
    case FN_LIPSUM:
    case FN_CYCLER:
    case FN_JOINER: runsupported(r, line, "the global '%s' is not supported", fn_names[fn]);
    case FN_D_GET: {
        bind_args(r, line, "get", "key default", a, v, g);
        require_args(r, line, "get", 1, g);
        (void)py_hash(r, line, &v[0]);
        const jval *x = dict_get_eq(self->u.dict, &v[0]);
        return x ? *x : g[1] ? v[1] : mk_none();
    }
    case FN_D_ITEMS:
    case FN_D_KEYS:
    case FN_D_VALUES: {
        bind_args(r, line, fn_names[fn], "", a, v, g);
        jval view = {.t = JV_VIEW,
                     .f = fn == FN_D_ITEMS  ? VIEW_ITEMS
                          : fn == FN_D_KEYS ? VIEW_KEYS
                                            : VIEW_VALUES};
        view.u.dict = self->u.dict;
        return view;
    }
    case FN_D_COPY: {
        bind_args(r, line, "copy", "", a, v, g);
        jval d = mk_dict(r);
        for (size_t i = 0; i < self->u.dict->n; i++)
            dict_set(r, line, d.u.dict, self->u.dict->k[i], self->u.dict->v[i]);
        return d;
    }
    case FN_L_COPY: {
        bind_args(r, line, "copy", "", a, v, g);
        jval l = mk_list(r, self->u.list->n, LK_LIST);
        for (size_t i = 0; i < self->u.list->n; i++)
            list_push(r, l.u.list, self->u.list->v[i]);
        return l;
    }
    case FN_L_COUNT: {
        bind_args(r, line, "count", "value", a, v, g);
        require_args(r, line, "count", 1, g);
        int64_t c = 0;
        for (size_t i = 0; i < self->u.list->n; i++)
            c += py_eq(&self->u.list->v[i], &v[0]);
        return mk_int(c);
    }
    case FN_L_INDEX: {
        bind_args(r, line, "index", "value start stop", a, v, g);
        require_args(r, line, "index", 1, g);
        const jlist *l = self->u.list;
        int64_t lo = g[1] ? arg_int(r, line, &v[1]) : 0,
                hi = g[2] ? arg_int(r, line, &v[2]) : (int64_t)l->n;
        if (lo < 0 && (lo += (int64_t)l->n) < 0)
            lo = 0;
        if (hi < 0 && (hi += (int64_t)l->n) < 0)
            hi = 0;
        for (int64_t i = lo; i < hi && i < (int64_t)l->n; i++)
            if (py_eq(&l->v[i], &v[0]))
                return mk_int(i);
        rfail(r, line, "%s.index(x): x not in %s", type_name(self), type_name(self));
    }
    case FN_LOOP_CYCLE: {
        if (!a->n_pos)
            rfail(r, line, "no items for cycling given");
        return a->pos[self->u.loop->i % (size_t)a->n_pos];
    }
    case FN_LOOP_CHANGED: {
        jloop *lp = self->u.loop;
        jval t = mk_list(r, (size_t)a->n_pos, LK_TUPLE);
        for (int32_t i = 0; i < a->n_pos; i++)
            list_push(r, t.u.list, a->pos[i]);
        if (!lp->has_changed || !py_eq(&lp->last_changed, &t)) {
            lp->has_changed = true;
            lp->last_changed = t;
            return mk_bool(true);
        }
        return mk_bool(false);
    }
    default: break;
    }
    runsupported(r, line, "the method '%s' of %s is not supported", fn_names[fn], type_name(self));
}

/* v(args): a macro, a builtin, or an error as Python gives one. */
static jval call_value(rctx *r, int32_t line, const jval *v, const cargs *a)
{
    switch ((jtype)v->t) {
    case JV_MACRO: return call_macro(r, line, v->u.macro, a);
    case JV_FUNC: return call_function(r, line, v, a);
    case JV_UNDEF:
        if (v->f == UNDEF_UNSAFE)
            rfail(r, line, "%s", v->u.msg);
        fail_undefined(r, line, v);
    case JV_LOOP: runsupported(r, line, "recursive loops are not supported");
    default: rfail(r, line, "'%s' object is not callable", type_name(v));
    }
}

/* ---- expressions -------------------------------------------------------------------- */

static jval eval_filter(rctx *r, frame *f, const node *x, jval *body_value)
{
    jval v = x->a ? eval(r, f, x->a) : *body_value;
    cargs a;
    eval_args(r, f, x, &a);
    return apply_filter(r, x->line, x->fid, x->name, v, &a);
}

/* A filter chain whose innermost value is a block's text (set blocks, filter blocks). */
static jval eval_filter_chain(rctx *r, frame *f, const node *x, jval body)
{
    if (!x)
        return body;
    jval inner = x->a ? eval_filter_chain(r, f, x->a, body) : body;
    cargs a;
    eval_args(r, f, x, &a);
    return apply_filter(r, x->line, x->fid, x->name, inner, &a);
}

static jval eval_compare(rctx *r, frame *f, const node *x)
{
    jval left = eval(r, f, x->a);
    for (int32_t i = 0; i < x->n_items; i++) {
        jval right = eval(r, f, x->items[i]);
        if (!compare_op(r, x->line, x->ops[i], &left, &right))
            return mk_bool(false);
        left = right;
    }
    return mk_bool(true);
}

static jval eval_getitem(rctx *r, frame *f, const node *x)
{
    jval obj = eval(r, f, x->a);
    if (x->b->kind == N_SLICE) {
        jval sl[3] = {mk_none(), mk_none(), mk_none()};
        if (x->b->a)
            sl[0] = eval(r, f, x->b->a);
        if (x->b->b)
            sl[1] = eval(r, f, x->b->b);
        if (x->b->c)
            sl[2] = eval(r, f, x->b->c);
        if (obj.t == JV_UNDEF)
            fail_undefined(r, x->line, &obj);
        jval v = get_slice(r, x->line, &obj, sl);
        if (obj.t == JV_STR && v.t == JV_STR) /* a Markup's piece is Markup */
            v.f = obj.f;
        return v;
    }
    jval key = eval(r, f, x->b);
    jval v = get_item(r, x->line, &obj, &key);
    if (obj.t == JV_STR && v.t == JV_STR && (key.t == JV_INT || key.t == JV_BOOL))
        v.f = obj.f;
    return v;
}

static jval eval_call(rctx *r, frame *f, const node *x)
{
    jval callee = eval(r, f, x->a);
    cargs a;
    eval_args(r, f, x, &a);
    return call_value(r, x->line, &callee, &a);
}

static jval eval_concat(rctx *r, frame *f, const node *x)
{
    jval *parts = pool_array(&r->mem, (size_t)x->n_items, sizeof(jval));
    for (int32_t i = 0; i < x->n_items; i++)
        parts[i] = eval(r, f, x->items[i]);
    sbuf *b = sbuf_new(r);
    for (int32_t i = 0; i < x->n_items; i++)
        put_str(r, x->line, b, &parts[i]);
    return sbuf_done(r, b);
}

static jval eval_collection(rctx *r, frame *f, const node *x)
{
    if (x->kind == N_DICT) {
        jval d = mk_dict(r);
        for (int32_t i = 0; i < x->n_items; i++) {
            jval k = eval(r, f, x->items[i]);
            jval v = eval(r, f, x->items2[i]);
            dict_set(r, x->line, d.u.dict, k, v);
        }
        return d;
    }
    jval l = mk_list(r, (size_t)x->n_items, x->kind == N_TUPLE ? LK_TUPLE : LK_LIST);
    for (int32_t i = 0; i < x->n_items; i++)
        list_push(r, l.u.list, eval(r, f, x->items[i]));
    return l;
}

static jval eval_unary(rctx *r, frame *f, const node *x)
{
    jval v = eval(r, f, x->a);
    if (x->kind == N_NOT)
        return mk_bool(!truthy(&v));
    if (v.t == JV_INT) {
        if (x->kind == N_NEG && v.u.i == INT64_MIN)
            fail_overflow(r, x->line);
        return x->kind == N_NEG ? mk_int(-v.u.i) : v;
    }
    if (v.t == JV_BOOL)
        return mk_int(x->kind == N_NEG ? -(int64_t)v.u.b : v.u.b);
    if (v.t == JV_FLOAT)
        return x->kind == N_NEG ? mk_float(-v.u.dbl) : v;
    if (v.t == JV_UNDEF)
        fail_undefined(r, x->line, &v);
    rfail(r, x->line, "bad operand type for unary %c: '%s'", x->kind == N_NEG ? '-' : '+',
          type_name(&v));
}

static jval eval(rctx *r, frame *f, const node *x)
{
    count_step(r, x->line);
    enter_depth(r, x->line);
    jval v;
    switch ((nkind)x->kind) {
    case N_CONST: v = x->k; break;
    case N_NAME: {
        const jval *p = frame_lookup(f, x->name);
        v = p ? *p
              : mk_undef(r, "'%.*s' is undefined", (int)(x->name.n > 100 ? 100 : x->name.n),
                         x->name.p);
        break;
    }
    case N_LIST:
    case N_TUPLE:
    case N_DICT: v = eval_collection(r, f, x); break;
    case N_GETATTR: {
        jval obj = eval(r, f, x->a);
        v = get_attr(r, x->line, &obj, x->name);
        break;
    }
    case N_GETITEM: v = eval_getitem(r, f, x); break;
    case N_BINOP: {
        jval a = eval(r, f, x->a);
        jval b = eval(r, f, x->b);
        v = binop(r, x->line, x->op, &a, &b);
        break;
    }
    case N_NEG:
    case N_POS:
    case N_NOT: v = eval_unary(r, f, x); break;
    case N_AND:
        v = eval(r, f, x->a);
        if (truthy(&v))
            v = eval(r, f, x->b);
        break;
    case N_OR:
        v = eval(r, f, x->a);
        if (!truthy(&v))
            v = eval(r, f, x->b);
        break;
    case N_CONCAT: v = eval_concat(r, f, x); break;
    case N_COMPARE: v = eval_compare(r, f, x); break;
    case N_COND: {
        jval t = eval(r, f, x->a);
        if (truthy(&t))
            v = eval(r, f, x->b);
        else if (x->c)
            v = eval(r, f, x->c);
        else
            v = mk_undef(r,
                         "the inline if-expression on line %d evaluated to false and no "
                         "else section was defined.",
                         (int)x->line);
        break;
    }
    case N_CALL: v = eval_call(r, f, x); break;
    case N_FILTER: v = eval_filter(r, f, x, NULL); break;
    case N_TEST: {
        jval t = eval(r, f, x->a);
        cargs a;
        eval_args(r, f, x, &a);
        v = mk_bool(apply_test(r, x->line, x->fid, x->name, &t, &a));
        break;
    }
    default: rfail(r, x->line, "internal error: node %d is not an expression", (int)x->kind);
    }
    r->depth--;
    return v;
}

/* ---- statements --------------------------------------------------------------------- */

/* Renders body into a fresh buffer, in a child scope of f. */
static jval capture(rctx *r, frame *f, node *const *body, int32_t n, int *flow)
{
    sbuf *b = sbuf_new(r);
    sbuf *saved = r->out;
    r->out = b;
    *flow = exec_body(r, frame_new(r, f), body, n);
    r->out = saved;
    return sbuf_done(r, b);
}

static int exec_for(rctx *r, frame *f, const node *x)
{
    jval seq = eval(r, f, x->b);
    size_t n;
    const jval *items = iterate(r, x->line, &seq, &n);
    jloop *lp = pool_zalloc(&r->mem, sizeof *lp);
    lp->src = items;
    lp->n_src = n;
    if (x->c) {
        lp->test = x->c;
        lp->target = x->a;
        lp->scratch = frame_new(r, f);
    } else {
        lp->items = (jval *)items;
        lp->n = n;
        lp->done = true;
    }
    jval loopv = {.t = JV_LOOP};
    loopv.u.loop = lp;
    frame *it = NULL;
    bool any = false;
    for (size_t i = 0;; i++) {
        loop_fill(r, lp, i);
        if (i >= lp->n)
            break;
        count_step(r, x->line);
        any = true;
        if (!it || it->captured)
            it = frame_new(r, f);
        else
            it->n = 0;
        lp->i = i;
        assign_target(r, it, x->a, lp->items[i]);
        if (x->op & FOR_USES_LOOP)
            frame_set(r, it, STRV("loop"), loopv);
        if (exec_body(r, it, x->items, x->n_items) == FLOW_BREAK)
            break;
    }
    if (!any && x->n_items2)
        return exec_body(r, frame_new(r, f), x->items2, x->n_items2);
    return FLOW_NORMAL;
}

static int exec_stmt(rctx *r, frame *f, const node *x)
{
    count_step(r, x->line);
    switch ((nkind)x->kind) {
    case N_OUTPUT:
        for (int32_t i = 0; i < x->n_items; i++) {
            const node *e = x->items[i];
            if (e->kind == N_CONST && e->k.t == JV_STR) {
                sbuf_put(r->out, e->k.u.s.p, e->k.u.s.n);
            } else {
                jval v = eval(r, f, e);
                put_str(r, e->line, r->out, &v);
            }
        }
        return FLOW_NORMAL;
    case N_IF: {
        jval t = eval(r, f, x->a);
        if (truthy(&t))
            return exec_body(r, f, x->items, x->n_items);
        return exec_body(r, f, x->items2, x->n_items2);
    }
    case N_FOR: return exec_for(r, f, x);
    case N_SET: assign_target(r, f, x->a, eval(r, f, x->b)); return FLOW_NORMAL;
    case N_SETBLOCK: {
        int flow;
        jval body = capture(r, f, x->items, x->n_items, &flow);
        assign_target(r, f, x->a, eval_filter_chain(r, f, x->c, body));
        return flow;
    }
    case N_MACRO: {
        jmacro *m = pool_zalloc(&r->mem, sizeof *m);
        m->def = x;
        m->closure = f;
        f->captured = true;
        jval v = {.t = JV_MACRO};
        v.u.macro = m;
        frame_set(r, f, x->name, v);
        return FLOW_NORMAL;
    }
    case N_BREAK: return FLOW_BREAK;
    case N_CONTINUE: return FLOW_CONTINUE;
    case N_WITH: {
        frame *w = frame_new(r, f);
        for (int32_t i = 0; i < x->n_items; i++)
            assign_target(r, w, x->items[i], eval(r, f, x->items2[i]));
        return exec_body(r, w, x->items3, x->n_items3);
    }
    case N_FILTERBLOCK: {
        int flow;
        jval body = capture(r, f, x->items, x->n_items, &flow);
        jval v = eval_filter_chain(r, f, x->c, body);
        put_str(r, x->line, r->out, &v);
        return flow;
    }
    case N_SCOPE: return exec_body(r, frame_new(r, f), x->items, x->n_items);
    default: rfail(r, x->line, "internal error: node %d is not a statement", (int)x->kind);
    }
}

static int exec_body(rctx *r, frame *f, node *const *body, int32_t n)
{
    enter_depth(r, n ? body[0]->line : 0);
    for (int32_t i = 0; i < n; i++) {
        int flow = exec_stmt(r, f, body[i]);
        if (flow != FLOW_NORMAL) {
            r->depth--;
            return flow;
        }
    }
    r->depth--;
    return FLOW_NORMAL;
}

/* ---- compile ------------------------------------------------------------------------ */

/* Resolves filter and test names. Jinja2 rejects an unknown name at compile time unless it
 * sits in an if statement or a conditional expression of the same scope ("soft"), where it
 * fails only when evaluated. */
static void resolve_names(parser *ps, node *x, bool soft);

static void resolve_list(parser *ps, node **v, int32_t n, bool soft)
{
    for (int32_t i = 0; i < n; i++)
        if (v[i])
            resolve_names(ps, v[i], soft);
}

static void resolve_names(parser *ps, node *x, bool soft)
{
    if (!x)
        return;
    switch ((nkind)x->kind) {
    case N_FILTER: {
        int id = find_filter(x->name);
        if (id < 0 && !soft)
            psyntax(ps, x->line, "No filter named '%.*s'.", (int)x->name.n, x->name.p);
        x->fid = (uint16_t)(id < 0 ? F_UNKNOWN : id);
        break;
    }
    case N_TEST: {
        int id = find_test(x->name);
        if (id < 0 && !soft)
            psyntax(ps, x->line, "No test named '%.*s'.", (int)x->name.n, x->name.p);
        x->fid = (uint16_t)(id < 0 ? T_UNKNOWN : id);
        break;
    }
    case N_IF:
    case N_COND:
        resolve_names(ps, x->a, true);
        resolve_names(ps, x->b, true);
        resolve_names(ps, x->c, true);
        resolve_list(ps, x->items, x->n_items, true);
        resolve_list(ps, x->items2, x->n_items2, true);
        return;
    case N_FOR:
        resolve_names(ps, x->b, soft);
        resolve_names(ps, x->c, false);
        resolve_list(ps, x->items, x->n_items, false);
        resolve_list(ps, x->items2, x->n_items2, soft);
        if (refers_to_list(x->items, x->n_items, "loop"))
            x->op |= FOR_USES_LOOP;
        return;
    case N_MACRO:
    case N_SETBLOCK:
    case N_FILTERBLOCK:
    case N_SCOPE:
        resolve_names(ps, x->c, false);
        resolve_list(ps, x->items2, x->n_items2, false);
        resolve_list(ps, x->items, x->kind == N_MACRO ? 0 : x->n_items, false);
        resolve_list(ps, x->items3, x->n_items3, false);
        return;
    case N_WITH:
        resolve_list(ps, x->items2, x->n_items2, soft);
        resolve_list(ps, x->items3, x->n_items3, false);
        return;
    default: break;
    }
    resolve_names(ps, x->a, soft);
    resolve_names(ps, x->b, soft);
    resolve_names(ps, x->c, soft);
    resolve_names(ps, x->d, soft);
    resolve_list(ps, x->items, x->n_items, soft);
    resolve_list(ps, x->items2, x->n_items2, soft);
    resolve_list(ps, x->items3, x->n_items3, soft);
}

ferry_jinja_limits ferry_jinja_limits_default(void)
{
    return (ferry_jinja_limits){
        .max_output_bytes = (size_t)16 << 20,
        .max_memory_bytes = (size_t)256 << 20,
        .max_steps = 50 * 1000 * 1000,
        .max_depth = 1000,
    };
}

void ferry_jinja_free(ferry_jinja *t)
{
    if (!t)
        return;
    pool_free_all(&t->mem);
    free(t->name);
    free(t);
}

/* Lexes and parses src into t (errors unwind to t->c). */
static void compile_run(ferry_jinja *t, const char *src, size_t len)
{
    /* newlines: \r\n and \r become \n; one trailing newline is dropped (Jinja2's
     * keep_trailing_newline=False) */
    char *s = pool_alloc(&t->mem, len + 1);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            s[n++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n')
                i++;
        } else {
            s[n++] = src[i];
        }
    }
    if (n && s[n - 1] == '\n')
        n--;
    s[n] = 0;
    lexer lx = {.c = &t->c, .mem = &t->mem, .s = s, .n = n, .line = 1};
    lex_all(&lx);
    parser ps = {.c = &t->c, .mem = &t->mem, .t = lx.toks};
    nvec body = subparse(&ps, NULL);
    resolve_list(&ps, body.v, body.n, false);
    t->body = body.v;
    t->n_body = body.n;
}

ferry_status ferry_jinja_compile(const char *src, size_t len, const char *name, ferry_jinja **out)
{
    if (!src || !out)
        return ferry_fail(FERRY_ERR_INVALID, "jinja: NULL template or output");
    ferry_jinja *t = calloc(1, sizeof *t);
    if (!t)
        return ferry_fail(FERRY_ERR_NOMEM, "jinja: out of memory");
    t->name = strdup(name ? name : "template");
    if (!t->name) {
        free(t);
        return ferry_fail(FERRY_ERR_NOMEM, "jinja: out of memory");
    }
    t->c.name = t->name;
    t->mem.c = &t->c;
    if (setjmp(t->c.jb)) {
        ferry_status code = t->c.code;
        ferry_jinja_free(t);
        return code;
    }
    compile_run(t, src, len);
    *out = t;
    return FERRY_OK;
}

static const struct {
    const char *name;
    fn_id fn;
} globals[] = {
    {"range", FN_RANGE},           {"dict", FN_DICT},
    {"namespace", FN_NAMESPACE},   {"raise_exception", FN_RAISE},
    {"strftime_now", FN_STRFTIME}, {"lipsum", FN_LIPSUM},
    {"cycler", FN_CYCLER},         {"joiner", FN_JOINER},
};

/* The render itself (errors unwind to r->c); returns the open output buffer. */
static sbuf *render_run(rctx *r, const ferry_jinja *t, const ferry_jinja_var *vars, int32_t n_vars)
{
    r->globals = frame_new(r, NULL);
    for (size_t i = 0; i < sizeof globals / sizeof globals[0]; i++) {
        jval fnv = {.t = JV_FUNC, .fn = (uint16_t)globals[i].fn};
        frame_set(r, r->globals, (strv){globals[i].name, strlen(globals[i].name)}, fnv);
    }
    r->root = frame_new(r, r->globals);
    for (int32_t i = 0; i < n_vars; i++) {
        if (!vars[i].name)
            rfail(r, 0, "a variable without a name");
        size_t nl = strlen(vars[i].name);
        frame_set(r, r->root, (strv){pool_strdup(&r->mem, vars[i].name, nl), nl},
                  from_json(r, vars[i].value, 0));
    }
    sbuf *main_out = sbuf_new(r);
    r->out = main_out;
    exec_body(r, r->root, t->body, t->n_body);
    if (!main_out->p) {
        main_out->p = malloc(1);
        if (!main_out->p)
            jthrow(&r->c, FERRY_ERR_NOMEM, 0, "out of memory");
        main_out->p[0] = 0;
    }
    return main_out;
}

ferry_status ferry_jinja_render(const ferry_jinja *t, const ferry_jinja_var *vars, int32_t n_vars,
                                const ferry_jinja_limits *limits, char **out, size_t *len)
{
    if (!t || !out || !len || (n_vars && !vars))
        return ferry_fail(FERRY_ERR_INVALID, "jinja: NULL template, variables or output");
    rctx *r = calloc(1, sizeof *r);
    if (!r)
        return ferry_fail(FERRY_ERR_NOMEM, "jinja: out of memory");
    r->c.name = t->name;
    r->lim = limits ? *limits : ferry_jinja_limits_default();
    r->mem.c = &r->c;
    r->mem.limit = r->lim.max_memory_bytes;
    if (setjmp(r->c.jb)) {
        ferry_status code = r->c.code;
        for (sbuf *b = r->open_bufs; b; b = b->prev_open)
            free(b->p);
        pool_free_all(&r->mem);
        free(r);
        return code;
    }
    sbuf *main_out = render_run(r, t, vars, n_vars);
    *out = main_out->p;
    *len = main_out->n;
    r->open_bufs = main_out->prev_open;
    pool_free_all(&r->mem);
    free(r);
    return FERRY_OK;
}
