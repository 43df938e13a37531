/*
 * format/safetensors.c: opens, maps and validates safetensors checkpoints.
 *
 * A .safetensors file (integers little-endian):
 *   [0, 8)         u64 N, the length of the header
 *   [8, 8 + N)     the header: a UTF-8 JSON object, possibly padded with trailing spaces,
 *                    { "__metadata__": { "format": "pt", ... },          (optional, strings)
 *                      "<tensor name>": { "dtype": "BF16", "shape": [d0, d1, ...],
 *                                         "data_offsets": [begin, end] }, ... }
 *   [8 + N, size)  the data section; a tensor's bytes are [8 + N + begin, 8 + N + end),
 *                  row-major, and end - begin = elements x dtype size.
 * A sharded checkpoint adds model.safetensors.index.json:
 *   { "metadata": { "total_size": ... }, "weight_map": { "<tensor name>": "<shard>", ... } }
 *
 * What is checked before any tensor is handed out: the file holds the 8-byte length; the
 * header fits in the file and is at most FERRY_ST_MAX_HEADER bytes; it is a JSON object
 * with nothing but whitespace after it; __metadata__ is an object of strings; each entry
 * is an object with exactly one each of a known "dtype", a "shape" of non-negative
 * integers and two integer "data_offsets" with begin <= end <= the data section's size;
 * elements x dtype size neither overflows nor differs from end - begin; no two tensors of
 * a file overlap; no name appears twice, in one file or across shards. The index must be
 * a JSON object with a weight_map of plain file names (no '/', not "." or ".."), each
 * shard must exist, and every tensor the index lists must be in the shard it names (a
 * shard may hold tensors the index does not list; they are kept, as transformers keeps
 * them). Gaps between tensors are allowed.
 *
 * The set owns: the file paths, one private read-only mapping per file (the descriptor
 * is closed once mapped), the tensor records with their names (one allocation each), and
 * an open-addressing hash table (linear probing, load <= 1/2) of tensor indices by name.
 */
#include "format/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"
#include "core/fileio.h"

#define FERRY_ST_MAX_HEADER (100ull * 1000 * 1000)
#define FERRY_ST_MAX_INDEX (64ull * 1024 * 1024)
#define FERRY_ST_INDEX_NAME "model.safetensors.index.json"
#define FERRY_ST_SINGLE_NAME "model.safetensors"
/* Largest integer a JSON number (a double) holds exactly. */
#define FERRY_ST_MAX_JSON_INT 9007199254740992.0

typedef struct {
    char *path;
    void *map;        /* NULL until mapped */
    size_t map_bytes; /* the whole file */
} st_file;

struct ferry_st_set {
    char *origin; /* named when a tensor is missing: the index, or the single file */
    st_file *files;
    int32_t n_files, cap_files;
    ferry_st_tensor *tensors;
    int32_t n_tensors, cap_tensors;
    int32_t *slots;   /* tensor index or -1 */
    uint32_t n_slots; /* a power of two, 0 while empty */
};

static const struct {
    const char *name;
    int32_t bits;
} g_dtypes[FERRY_ST_DTYPE_COUNT] = {
    [FERRY_ST_BOOL] = {"BOOL", 8},        [FERRY_ST_U8] = {"U8", 8},
    [FERRY_ST_I8] = {"I8", 8},            [FERRY_ST_I16] = {"I16", 16},
    [FERRY_ST_U16] = {"U16", 16},         [FERRY_ST_I32] = {"I32", 32},
    [FERRY_ST_U32] = {"U32", 32},         [FERRY_ST_I64] = {"I64", 64},
    [FERRY_ST_U64] = {"U64", 64},         [FERRY_ST_F16] = {"F16", 16},
    [FERRY_ST_BF16] = {"BF16", 16},       [FERRY_ST_F32] = {"F32", 32},
    [FERRY_ST_F64] = {"F64", 64},         [FERRY_ST_C64] = {"C64", 64},
    [FERRY_ST_F8_E4M3] = {"F8_E4M3", 8},  [FERRY_ST_F8_E5M2] = {"F8_E5M2", 8},
    [FERRY_ST_F8_E8M0] = {"F8_E8M0", 8},  [FERRY_ST_F6_E2M3] = {"F6_E2M3", 6},
    [FERRY_ST_F6_E3M2] = {"F6_E3M2", 6},  [FERRY_ST_F4] = {"F4", 4},
};

const char *ferry_st_dtype_name(ferry_st_dtype t)
{
    return (unsigned)t < FERRY_ST_DTYPE_COUNT ? g_dtypes[t].name : "?";
}

int32_t ferry_st_dtype_bits(ferry_st_dtype t)
{
    return (unsigned)t < FERRY_ST_DTYPE_COUNT ? g_dtypes[t].bits : 0;
}

static int dtype_from_name(const char *name, ferry_st_dtype *out)
{
    for (int i = 0; i < FERRY_ST_DTYPE_COUNT; i++) {
        if (strcmp(name, g_dtypes[i].name) == 0) {
            *out = (ferry_st_dtype)i;
            return 1;
        }
    }
    return 0;
}

/* ---- the set: files, tensors, hash table ------------------------------------------- */

static uint64_t hash_name(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
    return h;
}

/* The slot holding name, or the empty slot where it would go. n_slots must be > 0. */
static uint32_t find_slot(const ferry_st_set *s, const char *name)
{
    uint32_t mask = s->n_slots - 1;
    uint32_t i = (uint32_t)hash_name(name) & mask;
    while (s->slots[i] >= 0 && strcmp(s->tensors[s->slots[i]].name, name) != 0)
        i = (i + 1) & mask;
    return i;
}

static ferry_status grow_table(ferry_st_set *s)
{
    uint32_t n = s->n_slots ? s->n_slots * 2 : 64;
    int32_t *slots = malloc((size_t)n * sizeof *slots);
    if (!slots)
        return ferry_fail(FERRY_ERR_NOMEM, "safetensors: out of memory for %u hash slots", n);
    for (uint32_t i = 0; i < n; i++)
        slots[i] = -1;
    free(s->slots);
    s->slots = slots;
    s->n_slots = n;
    for (int32_t t = 0; t < s->n_tensors; t++)
        s->slots[find_slot(s, s->tensors[t].name)] = t;
    return FERRY_OK;
}

static ferry_st_set *set_new(const char *origin)
{
    ferry_st_set *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->origin = strdup(origin);
    if (!s->origin) {
        free(s);
        return NULL;
    }
    return s;
}

void ferry_st_close(ferry_st_set *s)
{
    if (!s)
        return;
    for (int32_t i = 0; i < s->n_files; i++) {
        if (s->files[i].map)
            munmap(s->files[i].map, s->files[i].map_bytes);
        free(s->files[i].path);
    }
    for (int32_t i = 0; i < s->n_tensors; i++)
        free((char *)s->tensors[i].name);
    free(s->files);
    free(s->tensors);
    free(s->slots);
    free(s->origin);
    free(s);
}

/* Appends an unmapped file; its index is s->n_files - 1 on success. */
static ferry_status add_file(ferry_st_set *s, const char *path)
{
    if (s->n_files == s->cap_files) {
        int32_t cap = s->cap_files ? s->cap_files * 2 : 4;
        st_file *f = realloc(s->files, (size_t)cap * sizeof *f);
        if (!f)
            return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", path);
        s->files = f;
        s->cap_files = cap;
    }
    st_file *f = &s->files[s->n_files];
    f->path = strdup(path);
    if (!f->path)
        return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", path);
    f->map = NULL;
    f->map_bytes = 0;
    s->n_files++;
    return FERRY_OK;
}

/* Adds a tensor (taking ownership of t->name, which is freed on failure too); fails when
 * the name is already in the set. */
static ferry_status add_tensor(ferry_st_set *s, ferry_st_tensor *t)
{
    ferry_status st;
    const char *path = s->files[t->file_index].path;
    if ((uint64_t)(s->n_tensors + 1) * 2 > s->n_slots) {
        if (s->n_tensors >= INT32_MAX / 4) {
            st = ferry_fail(FERRY_ERR_FORMAT, "%s: too many tensors", path);
            goto fail;
        }
        if ((st = grow_table(s)) != FERRY_OK)
            goto fail;
    }
    uint32_t slot = find_slot(s, t->name);
    if (s->slots[slot] >= 0) {
        const ferry_st_tensor *old = &s->tensors[s->slots[slot]];
        if (old->file_index == t->file_index)
            st = ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s' appears twice in the header", path,
                            t->name);
        else
            st = ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s' is also in %s", path, t->name,
                            s->files[old->file_index].path);
        goto fail;
    }
    if (s->n_tensors == s->cap_tensors) {
        int32_t cap = s->cap_tensors ? s->cap_tensors * 2 : 64;
        ferry_st_tensor *ts = realloc(s->tensors, (size_t)cap * sizeof *ts);
        if (!ts) {
            st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory for tensor '%s'", path, t->name);
            goto fail;
        }
        s->tensors = ts;
        s->cap_tensors = cap;
    }
    s->tensors[s->n_tensors] = *t;
    s->slots[slot] = s->n_tensors;
    s->n_tensors++;
    return FERRY_OK;
fail:
    free((char *)t->name);
    t->name = NULL;
    return st;
}

/* ---- one file ------------------------------------------------------------------------ */

static ferry_status map_file(st_file *f)
{
    ferry_status st;
    struct stat sb;
    int fd = open(f->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot open: %s", f->path, strerror(errno));
    if (fstat(fd, &sb) != 0) {
        st = ferry_fail(FERRY_ERR_IO, "%s: cannot stat: %s", f->path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(sb.st_mode)) {
        st = ferry_fail(FERRY_ERR_IO, "%s: not a regular file", f->path);
        goto fail;
    }
    if (sb.st_size < 8) {
        st = ferry_fail(FERRY_ERR_FORMAT,
                        "%s: file is %lld bytes, too short for the 8-byte header length",
                        f->path, (long long)sb.st_size);
        goto fail;
    }
    void *map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
        st = ferry_fail(FERRY_ERR_IO, "%s: cannot map %lld bytes: %s", f->path,
                        (long long)sb.st_size, strerror(errno));
        goto fail;
    }
    close(fd);
    f->map = map;
    f->map_bytes = (size_t)sb.st_size;
    return FERRY_OK;
fail:
    close(fd);
    return st;
}

/* A JSON number that is a non-negative integer a double holds exactly. */
static int json_uint(const cJSON *v, uint64_t *out)
{
    if (!cJSON_IsNumber(v))
        return 0;
    double d = v->valuedouble;
    if (!(d >= 0 && d <= FERRY_ST_MAX_JSON_INT) || d != (double)(uint64_t)d)
        return 0;
    *out = (uint64_t)d;
    return 1;
}

static void format_dims(char *buf, size_t cap, int32_t n, const int64_t *dims)
{
    size_t used = (size_t)snprintf(buf, cap, "[");
    for (int32_t i = 0; i < n && used < cap; i++)
        used += (size_t)snprintf(buf + used, cap - used, "%s%lld", i ? ", " : "",
                                 (long long)dims[i]);
    if (used < cap)
        snprintf(buf + used, cap - used, "]");
}

/* Parses one header entry into *t (name not yet set). data_bytes: size of the data
 * section. */
static ferry_status parse_entry(const char *path, const char *name, const cJSON *e,
                                uint64_t data_bytes, ferry_st_tensor *t)
{
    const cJSON *dtype = NULL, *shape = NULL, *offsets = NULL;
    if (!cJSON_IsObject(e))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s': entry is not a JSON object", path,
                          name);
    for (const cJSON *c = e->child; c; c = c->next) {
        const cJSON **slot = strcmp(c->string, "dtype") == 0          ? &dtype
                             : strcmp(c->string, "shape") == 0        ? &shape
                             : strcmp(c->string, "data_offsets") == 0 ? &offsets
                                                                      : NULL;
        if (!slot)
            continue; /* unknown keys are ignored, as the reference implementation does */
        if (*slot)
            return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s': key '%s' appears twice", path,
                              name, c->string);
        *slot = c;
    }

    if (!dtype)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s' has no 'dtype'", path, name);
    if (!cJSON_IsString(dtype))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s': 'dtype' is not a string", path,
                          name);
    if (!dtype_from_name(dtype->valuestring, &t->dtype))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s' has unknown dtype '%s'", path, name,
                          dtype->valuestring);

    if (!shape)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s' has no 'shape'", path, name);
    if (!cJSON_IsArray(shape))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s': 'shape' is not an array", path,
                          name);
    int n_dims = cJSON_GetArraySize(shape);
    if (n_dims > FERRY_ST_MAX_DIMS)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: tensor '%s' has %d dimensions, at most %d "
                          "are supported", path, name, n_dims, FERRY_ST_MAX_DIMS);
    t->n_dims = n_dims;
    memset(t->shape, 0, sizeof t->shape);
    uint64_t n_elements = 1;
    int any_zero = 0, overflow = 0;
    int i = 0;
    for (const cJSON *d = shape->child; d; d = d->next, i++) {
        uint64_t v;
        if (cJSON_IsNumber(d) && d->valuedouble < 0)
            return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s': shape[%d] is negative (%g)",
                              path, name, i, d->valuedouble);
        if (!json_uint(d, &v))
            return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s': shape[%d] is not an integer "
                              "in [0, 2^53]",
                              path, name, i);
        t->shape[i] = (int64_t)v;
        if (v == 0)
            any_zero = 1;
        else if (n_elements > UINT64_MAX / v)
            overflow = 1;
        else
            n_elements *= v;
    }
    if (any_zero)
        n_elements = 0;
    uint64_t bits = (uint64_t)ferry_st_dtype_bits(t->dtype);
    if (!any_zero && (overflow || n_elements > UINT64_MAX / bits))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s': element count of shape x %s "
                          "overflows 64 bits", path, name, dtype->valuestring);
    if (n_elements * bits % 8 != 0)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s': %llu %s elements do not fill whole "
                          "bytes", path, name, (unsigned long long)n_elements,
                          dtype->valuestring);
    uint64_t need = n_elements * bits / 8;

    if (!offsets)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s' has no 'data_offsets'", path, name);
    uint64_t begin, end;
    if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2 ||
        !json_uint(offsets->child, &begin) || !json_uint(offsets->child->next, &end))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s': 'data_offsets' is not an array of "
                          "two non-negative integers", path, name);
    if (begin > end)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s': data_offsets begin %llu is after "
                          "end %llu", path, name, (unsigned long long)begin,
                          (unsigned long long)end);
    if (end - begin != need)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s' has %llu bytes in data_offsets but "
                          "its shape and dtype %s need %llu", path, name,
                          (unsigned long long)(end - begin), dtype->valuestring,
                          (unsigned long long)need);
    if (end > data_bytes)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s' ends at byte %llu, the data "
                          "section has %llu", path, name, (unsigned long long)end,
                          (unsigned long long)data_bytes);
    t->n_bytes = (size_t)need;
    t->file_offset = begin; /* made absolute by the caller */
    return FERRY_OK;
}

typedef struct {
    uint64_t begin, end;
    int32_t index;
} st_extent;

static int cmp_extent(const void *a, const void *b)
{
    const st_extent *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return (x->index > y->index) - (x->index < y->index); /* header order: stable messages */
}

/* Tensors first..n_tensors-1 all come from one file: no two may share a byte. */
static ferry_status check_overlap(const ferry_st_set *s, int32_t first, uint64_t data_start)
{
    int32_t n = s->n_tensors - first;
    if (n < 2)
        return FERRY_OK;
    ferry_status st = FERRY_OK;
    st_extent *ext = malloc((size_t)n * sizeof *ext);
    if (!ext)
        return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory",
                          s->files[s->tensors[first].file_index].path);
    for (int32_t i = 0; i < n; i++) {
        const ferry_st_tensor *t = &s->tensors[first + i];
        ext[i].begin = t->file_offset - data_start;
        ext[i].end = ext[i].begin + t->n_bytes;
        ext[i].index = first + i;
    }
    qsort(ext, (size_t)n, sizeof *ext, cmp_extent);
    int32_t reach = 0; /* the extent ending last so far */
    for (int32_t i = 1; i < n; i++) {
        if (ext[i].begin < ext[reach].end) {
            const ferry_st_tensor *a = &s->tensors[ext[reach].index];
            const ferry_st_tensor *b = &s->tensors[ext[i].index];
            st = ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s' (bytes %llu..%llu) overlaps "
                            "tensor '%s' (bytes %llu..%llu)", s->files[a->file_index].path,
                            b->name, (unsigned long long)ext[i].begin,
                            (unsigned long long)ext[i].end, a->name,
                            (unsigned long long)ext[reach].begin,
                            (unsigned long long)ext[reach].end);
            goto fail;
        }
        if (ext[i].end > ext[reach].end)
            reach = i;
    }
fail:
    free(ext);
    return st;
}

static ferry_status check_metadata(const char *path, const cJSON *m)
{
    if (!cJSON_IsObject(m))
        return ferry_fail(FERRY_ERR_FORMAT, "%s: __metadata__ is not a JSON object", path);
    for (const cJSON *c = m->child; c; c = c->next)
        if (!cJSON_IsString(c))
            return ferry_fail(FERRY_ERR_FORMAT, "%s: __metadata__ value '%s' is not a string",
                              path, c->string);
    return FERRY_OK;
}

/* Maps file fi of the set, parses its header and adds its tensors. */
static ferry_status load_file(ferry_st_set *s, int32_t fi)
{
    ferry_status st;
    cJSON *root = NULL;
    st_file *f = &s->files[fi];
    if ((st = map_file(f)) != FERRY_OK)
        return st;
    const char *path = f->path;
    const uint8_t *base = f->map;
    uint64_t header_bytes = 0;
    for (int i = 7; i >= 0; i--)
        header_bytes = header_bytes << 8 | base[i];
    uint64_t after = (uint64_t)f->map_bytes - 8;
    if (header_bytes > FERRY_ST_MAX_HEADER)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: header length %llu is absurd (limit %llu)",
                          path, (unsigned long long)header_bytes, FERRY_ST_MAX_HEADER);
    if (header_bytes > after)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: header length %llu exceeds the %llu bytes of "
                          "the file after the length (truncated?)", path,
                          (unsigned long long)header_bytes, (unsigned long long)after);

    const char *json = (const char *)base + 8;
    const char *json_end = NULL;
    root = cJSON_ParseWithLengthOpts(json, (size_t)header_bytes, &json_end, 0);
    if (!root) {
        long at = json_end && json_end >= json ? (long)(json_end - json) : -1;
        return ferry_fail(FERRY_ERR_FORMAT, "%s: header is not valid JSON (error near header "
                          "byte %ld)", path, at);
    }
    for (const char *p = json_end; p < json + header_bytes; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            st = ferry_fail(FERRY_ERR_FORMAT, "%s: header has bytes after its JSON object "
                            "(at header byte %ld)", path, (long)(p - json));
            goto fail;
        }
    }
    if (!cJSON_IsObject(root)) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: header is not a JSON object", path);
        goto fail;
    }

    uint64_t data_start = 8 + header_bytes;
    uint64_t data_bytes = (uint64_t)f->map_bytes - data_start;
    int32_t first = s->n_tensors;
    int seen_metadata = 0;
    for (const cJSON *c = root->child; c; c = c->next) {
        if (strcmp(c->string, "__metadata__") == 0) {
            if (seen_metadata) {
                st = ferry_fail(FERRY_ERR_FORMAT, "%s: __metadata__ appears twice", path);
                goto fail;
            }
            seen_metadata = 1;
            if ((st = check_metadata(path, c)) != FERRY_OK)
                goto fail;
            continue;
        }
        ferry_st_tensor t = {0};
        if ((st = parse_entry(path, c->string, c, data_bytes, &t)) != FERRY_OK)
            goto fail;
        t.file_offset += data_start;
        t.data = base + t.file_offset;
        t.file_index = fi;
        t.name = strdup(c->string);
        if (!t.name) {
            st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory for tensor '%s'", path,
                            c->string);
            goto fail;
        }
        if ((st = add_tensor(s, &t)) != FERRY_OK)
            goto fail;
    }
    st = check_overlap(s, first, data_start);
fail:
    cJSON_Delete(root);
    return st;
}

ferry_status ferry_st_open_file(const char *path, ferry_st_set **out)
{
    ferry_status st;
    if (!path || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_st_open_file: NULL argument");
    ferry_st_set *s = set_new(path);
    if (!s)
        return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", path);
    if ((st = add_file(s, path)) != FERRY_OK)
        goto fail;
    if ((st = load_file(s, 0)) != FERRY_OK)
        goto fail;
    *out = s;
    return FERRY_OK;
fail:
    ferry_st_close(s);
    return st;
}

/* ---- a directory, with or without an index --------------------------------------------- */

static char *join_path(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p)
        return NULL;
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b + 1);
    return p;
}

static int plain_file_name(const char *name)
{
    return name[0] != 0 && strchr(name, '/') == NULL && strcmp(name, ".") != 0 &&
           strcmp(name, "..") != 0;
}

static ferry_status open_index(const char *dir, const char *index_path, ferry_st_set **out)
{
    ferry_status st;
    char *text = NULL, *shard_path = NULL;
    const char **shards = NULL; /* distinct shard names, borrowed from the JSON */
    uint8_t *listed = NULL;
    cJSON *root = NULL;
    size_t len = 0;
    ferry_st_set *s = set_new(index_path);
    if (!s)
        return ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", index_path);
    if ((st = ferry_read_small_file(index_path, FERRY_ST_MAX_INDEX, 0, &text, &len)) != FERRY_OK)
        goto fail;
    root = cJSON_ParseWithLength(text, len);
    if (!root) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: not valid JSON", index_path);
        goto fail;
    }
    if (!cJSON_IsObject(root)) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: not a JSON object", index_path);
        goto fail;
    }
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(map)) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: %s", index_path,
                        map ? "'weight_map' is not a JSON object" : "has no 'weight_map'");
        goto fail;
    }

    int32_t n_entries = 0, n_shards = 0;
    for (const cJSON *c = map->child; c; c = c->next)
        n_entries++;
    shards = malloc(((size_t)n_entries + 1) * sizeof *shards);
    if (!shards) {
        st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", index_path);
        goto fail;
    }
    for (const cJSON *c = map->child; c; c = c->next) {
        if (!cJSON_IsString(c)) {
            st = ferry_fail(FERRY_ERR_FORMAT, "%s: weight_map entry for tensor '%s' is not a "
                            "string", index_path, c->string);
            goto fail;
        }
        if (!plain_file_name(c->valuestring)) {
            st = ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s' is mapped to '%s', which is not a "
                            "plain file name", index_path, c->string, c->valuestring);
            goto fail;
        }
        int32_t k = 0;
        while (k < n_shards && strcmp(shards[k], c->valuestring) != 0)
            k++;
        if (k == n_shards)
            shards[n_shards++] = c->valuestring;
    }

    /* Files are added in order of first mention, so shard k is file k. */
    for (int32_t k = 0; k < n_shards; k++) {
        shard_path = join_path(dir, shards[k]);
        if (!shard_path) {
            st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", index_path);
            goto fail;
        }
        if ((st = add_file(s, shard_path)) != FERRY_OK)
            goto fail;
        free(shard_path);
        shard_path = NULL;
        if ((st = load_file(s, k)) != FERRY_OK)
            goto fail;
    }

    listed = calloc((size_t)s->n_tensors + 1, 1);
    if (!listed) {
        st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", index_path);
        goto fail;
    }
    for (const cJSON *c = map->child; c; c = c->next) {
        const ferry_st_tensor *t = ferry_st_find(s, c->string);
        if (!t) {
            st = ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s' is listed in shard %s, which does "
                            "not contain it", index_path, c->string, c->valuestring);
            goto fail;
        }
        const char *holder = s->files[t->file_index].path;
        if (strcmp(shards[t->file_index], c->valuestring) != 0) {
            st = ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s' is listed in shard %s but is in "
                            "%s", index_path, c->string, c->valuestring, holder);
            goto fail;
        }
        int32_t i = (int32_t)(t - s->tensors);
        if (listed[i]) {
            st = ferry_fail(FERRY_ERR_FORMAT, "%s: weight_map lists tensor '%s' twice",
                            index_path, c->string);
            goto fail;
        }
        listed[i] = 1;
    }
    /* Loaders such as transformers read whole shards, so a tensor the index forgot is
     * still part of the checkpoint: keep it, and say so. */
    for (int32_t i = 0; i < s->n_tensors; i++)
        if (!listed[i])
            ferry_log(FERRY_LOG_INFO, "%s: tensor '%s' is in shard %s but not in the weight_map",
                      index_path, s->tensors[i].name, s->files[s->tensors[i].file_index].path);
    free(listed);
    free(shards);
    cJSON_Delete(root);
    free(text);
    *out = s;
    return FERRY_OK;
fail:
    free(listed);
    free(shard_path);
    free(shards);
    cJSON_Delete(root);
    free(text);
    ferry_st_close(s);
    return st;
}

ferry_status ferry_st_open_dir(const char *dir, ferry_st_set **out)
{
    ferry_status st;
    struct stat sb;
    char *index_path = NULL, *single_path = NULL;
    if (!dir || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_st_open_dir: NULL argument");
    index_path = join_path(dir, FERRY_ST_INDEX_NAME);
    single_path = join_path(dir, FERRY_ST_SINGLE_NAME);
    if (!index_path || !single_path) {
        st = ferry_fail(FERRY_ERR_NOMEM, "%s: out of memory", dir);
        goto fail;
    }
    if (stat(index_path, &sb) == 0) {
        st = open_index(dir, index_path, out);
    } else if (errno != ENOENT) {
        st = ferry_fail(FERRY_ERR_IO, "%s: cannot stat: %s", index_path, strerror(errno));
    } else if (stat(single_path, &sb) != 0 && errno == ENOENT) {
        st = ferry_fail(FERRY_ERR_IO, "%s: has neither %s nor %s", dir, FERRY_ST_INDEX_NAME,
                        FERRY_ST_SINGLE_NAME);
    } else {
        st = ferry_st_open_file(single_path, out);
    }
fail:
    free(index_path);
    free(single_path);
    return st;
}

/* ---- lookups ------------------------------------------------------------------------- */

int32_t ferry_st_count(const ferry_st_set *s) { return s ? s->n_tensors : 0; }

const ferry_st_tensor *ferry_st_at(const ferry_st_set *s, int32_t i)
{
    return s && i >= 0 && i < s->n_tensors ? &s->tensors[i] : NULL;
}

const ferry_st_tensor *ferry_st_find(const ferry_st_set *s, const char *name)
{
    if (!s || !name || s->n_slots == 0)
        return NULL;
    int32_t i = s->slots[find_slot(s, name)];
    return i >= 0 ? &s->tensors[i] : NULL;
}

int32_t ferry_st_file_count(const ferry_st_set *s) { return s ? s->n_files : 0; }

const char *ferry_st_file_path(const ferry_st_set *s, int32_t file_index)
{
    return s && file_index >= 0 && file_index < s->n_files ? s->files[file_index].path : NULL;
}

ferry_status ferry_st_get(const ferry_st_set *s, const char *name, int32_t n_dims,
                          const int64_t *shape, const ferry_st_tensor **t, ferry_dtype *dtype)
{
    if (!s || !name || n_dims < 0 || n_dims > FERRY_ST_MAX_DIMS || (n_dims > 0 && !shape))
        return ferry_fail(FERRY_ERR_INVALID, "ferry_st_get: NULL argument or n_dims %d out of "
                          "range", (int)n_dims);
    const ferry_st_tensor *x = ferry_st_find(s, name);
    if (!x)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s' is missing", s->origin, name);
    const char *path = s->files[x->file_index].path;
    int same = x->n_dims == n_dims;
    for (int32_t i = 0; same && i < n_dims; i++)
        same = x->shape[i] == shape[i];
    if (!same) {
        char have[256], want[256];
        format_dims(have, sizeof have, x->n_dims, x->shape);
        format_dims(want, sizeof want, n_dims, shape);
        return ferry_fail(FERRY_ERR_FORMAT, "%s: tensor '%s' has shape %s, config.json implies %s",
                          path, name, have, want);
    }
    ferry_dtype d;
    switch (x->dtype) {
    case FERRY_ST_F32: d = FERRY_DTYPE_F32; break;
    case FERRY_ST_F16: d = FERRY_DTYPE_F16; break;
    case FERRY_ST_BF16: d = FERRY_DTYPE_BF16; break;
    default:
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: tensor '%s' has dtype %s; ferry computes "
                          "with F32, F16 or BF16", path, name, ferry_st_dtype_name(x->dtype));
    }
    if (t)
        *t = x;
    if (dtype)
        *dtype = d;
    return FERRY_OK;
}
