/*
 * tests/fuzz/fuzz_safetensors.c: one .safetensors file (format/safetensors.c,
 * ferry_st_open_file). The input is the whole file, handed over as an in-memory file.
 * Dictionaries: json.dict
 *
 * A mutation inside the JSON header moves its end away from what the 8-byte length says, and
 * the file is then rejected before its tensors are looked at. So when the header parses as
 * JSON but ends elsewhere, the file is opened a second time with the length rewritten to
 * where the JSON ends (the bytes after it become the data section).
 *
 * An accepted file must keep what safetensors.h promises of every tensor it hands out: inside
 * the data section, n_bytes equal to elements x dtype bits / 8 (whole bytes), data pointing
 * at the file's bytes at file_offset, shape entries non-negative and zero past n_dims, no two
 * tensors sharing a byte, every name found by ferry_st_find, and ferry_st_get agreeing with
 * the dtype and shape. A rejected file must get a file error naming the path.
 */
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "format/safetensors.h"
#include "tests/fuzz/fuzz_util.h"

typedef struct {
    uint64_t begin, end;
} extent;

static int cmp_extent(const void *a, const void *b)
{
    const extent *x = a, *y = b;
    return x->begin != y->begin ? (x->begin < y->begin ? -1 : 1)
                                : (x->end > y->end) - (x->end < y->end);
}

static void check_tensor(const ferry_st_set *s, const ferry_st_tensor *t, const uint8_t *data,
                         size_t size, uint64_t data_start)
{
    FUZZ_CHECK(t->name && ferry_st_find(s, t->name) == t, "tensor '%s' is not found by name",
               t->name ? t->name : "(null)");
    FUZZ_CHECK(t->file_index == 0, "tensor '%s' in file %d of a single file", t->name,
               (int)t->file_index);
    FUZZ_CHECK((unsigned)t->dtype < FERRY_ST_DTYPE_COUNT, "tensor '%s' dtype %d", t->name,
               (int)t->dtype);
    FUZZ_CHECK(t->n_dims >= 0 && t->n_dims <= FERRY_ST_MAX_DIMS, "tensor '%s' has %d dims",
               t->name, (int)t->n_dims);
    unsigned __int128 n = 1;
    for (int32_t d = 0; d < FERRY_ST_MAX_DIMS; d++) {
        if (d < t->n_dims) {
            FUZZ_CHECK(t->shape[d] >= 0, "tensor '%s' shape[%d] = %lld", t->name, (int)d,
                       (long long)t->shape[d]);
            n = n * (unsigned __int128)t->shape[d];
            if (n > ((unsigned __int128)1 << 100))
                n = (unsigned __int128)1 << 100; /* stays > any file; no wraparound */
        } else {
            FUZZ_CHECK(t->shape[d] == 0, "tensor '%s' shape[%d] = %lld past n_dims %d", t->name,
                       (int)d, (long long)t->shape[d], (int)t->n_dims);
        }
    }
    unsigned __int128 bits = n * (unsigned)ferry_st_dtype_bits(t->dtype);
    FUZZ_CHECK(bits % 8 == 0 && bits / 8 == t->n_bytes, "tensor '%s': %zu bytes for its shape "
               "and dtype %s", t->name, t->n_bytes, ferry_st_dtype_name(t->dtype));
    FUZZ_CHECK(t->file_offset >= data_start && t->file_offset <= size &&
                   t->n_bytes <= size - t->file_offset,
               "tensor '%s' at [%llu, +%zu) outside the data section [%llu, %zu)", t->name,
               (unsigned long long)t->file_offset, t->n_bytes, (unsigned long long)data_start,
               size);
    FUZZ_CHECK(t->n_bytes == 0 || memcmp(t->data, data + t->file_offset, t->n_bytes) == 0,
               "tensor '%s': data does not point at its file offset", t->name);

    const ferry_st_tensor *got = NULL;
    ferry_dtype dt;
    ferry_status st = ferry_st_get(s, t->name, t->n_dims, t->shape, &got, &dt);
    int computes = t->dtype == FERRY_ST_F32 || t->dtype == FERRY_ST_F16 ||
                   t->dtype == FERRY_ST_BF16;
    FUZZ_CHECK(computes ? st == FERRY_OK && got == t : st == FERRY_ERR_UNSUPPORTED,
               "ferry_st_get of '%s' (%s) gave %s", t->name, ferry_st_dtype_name(t->dtype),
               ferry_status_name(st));
    if (t->n_dims > 0) {
        int64_t other[FERRY_ST_MAX_DIMS];
        memcpy(other, t->shape, sizeof other);
        other[0] ^= 1;
        st = ferry_st_get(s, t->name, t->n_dims, other, NULL, NULL);
        FUZZ_CHECK(st == FERRY_ERR_FORMAT, "ferry_st_get of '%s' with another shape gave %s",
                   t->name, ferry_status_name(st));
    }
}

FUZZ_INITIALIZE_QUIET()

/* Opens the file data[0, size) and checks what the open gives. */
static void open_and_check(const uint8_t *data, size_t size)
{
    char path[64];
    int fd = fuzz_memfd(data, size, path, sizeof path);
    ferry_st_set *s = NULL;
    ferry_status st = ferry_st_open_file(path, &s);
    if (st != FERRY_OK) {
        FUZZ_CHECK(s == NULL, "a failed open wrote its output");
        fuzz_check_rejection(st, path);
        close(fd);
        return;
    }
    FUZZ_CHECK(size >= 8, "accepted a %zu-byte file", size);
    uint64_t header_bytes = 0;
    for (int i = 7; i >= 0; i--)
        header_bytes = header_bytes << 8 | data[i];
    FUZZ_CHECK(header_bytes <= size - 8, "accepted header length %llu in %zu bytes",
               (unsigned long long)header_bytes, size);
    FUZZ_CHECK(ferry_st_file_count(s) == 1 && strcmp(ferry_st_file_path(s, 0), path) == 0 &&
                   ferry_st_file_path(s, 1) == NULL,
               "file table of a single file");

    int32_t n = ferry_st_count(s);
    FUZZ_CHECK(n >= 0 && ferry_st_at(s, n) == NULL && ferry_st_at(s, -1) == NULL,
               "count %d", (int)n);
    extent *ext = malloc(((size_t)n + 1) * sizeof *ext);
    if (!ext)
        fuzz_setup_failed("malloc");
    for (int32_t i = 0; i < n; i++) {
        const ferry_st_tensor *t = ferry_st_at(s, i);
        FUZZ_CHECK(t != NULL, "tensor %d of %d is NULL", (int)i, (int)n);
        check_tensor(s, t, data, size, 8 + header_bytes);
        ext[i] = (extent){t->file_offset, t->file_offset + t->n_bytes};
    }
    qsort(ext, (size_t)n, sizeof *ext, cmp_extent);
    uint64_t reach = 0; /* the end of the non-empty extents so far */
    for (int32_t i = 0; i < n; i++) {
        if (ext[i].begin == ext[i].end)
            continue;
        FUZZ_CHECK(ext[i].begin >= reach, "tensor at [%llu, %llu) overlaps one ending at %llu",
                   (unsigned long long)ext[i].begin, (unsigned long long)ext[i].end,
                   (unsigned long long)reach);
        reach = ext[i].end;
    }
    free(ext);
    ferry_st_close(s);
    close(fd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    open_and_check(data, size);
    if (size < 8)
        return 0;
    const char *json = (const char *)data + 8, *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, size - 8, &end, 0);
    cJSON_Delete(root);
    uint64_t header_bytes = 0;
    for (int i = 7; i >= 0; i--)
        header_bytes = header_bytes << 8 | data[i];
    if (!root || !end || (uint64_t)(end - json) == header_bytes)
        return 0;
    uint8_t *fixed = malloc(size);
    if (!fixed)
        fuzz_setup_failed("malloc");
    memcpy(fixed, data, size);
    for (int i = 0; i < 8; i++)
        fixed[i] = (uint8_t)((uint64_t)(end - json) >> (8 * i));
    open_and_check(fixed, size);
    free(fixed);
    return 0;
}
