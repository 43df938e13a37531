/*
 * tests/test_safetensors.c: the safetensors reader against the real tiny checkpoint, small
 * files built here (single files, single-file and sharded directories) and every kind of
 * malformed header and index, each checked for its exact status and for a message that
 * names the file and the tensor or field at fault.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/error.h"
#include "format/safetensors.h"
#include "tests/check_util.h"

#define TINY_DIR FERRY_SOURCE_DIR "/models/tiny-moe-code"

/* Writes dir/name holding exactly len bytes; returns the path in path (512 bytes). */
static void write_bytes(char *path, const char *dir, const char *name, const void *data,
                        size_t len)
{
    snprintf(path, 512, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "cannot write %s: %s", path, strerror(errno));
    ck_assert(len == 0 || fwrite(data, 1, len, f) == len);
    ck_assert(fclose(f) == 0);
}

/* Serialises a safetensors file: the 8-byte little-endian header length, the header text
 * padded with spaces so the data section starts 8-aligned (as writers do), and data_len
 * data bytes (data, or byte i = i * 7 + 1 when data is NULL). */
static void write_st(char *path, const char *dir, const char *name, const char *header,
                     const void *data, size_t data_len)
{
    size_t text = strlen(header);
    size_t n = (text + 7) / 8 * 8;
    uint8_t *buf = malloc(8 + n + data_len + 1);
    ck_assert(buf != NULL);
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)((uint64_t)n >> (8 * i));
    memcpy(buf + 8, header, text);
    memset(buf + 8 + text, ' ', n - text);
    for (size_t i = 0; i < data_len; i++)
        buf[8 + n + i] = data ? ((const uint8_t *)data)[i] : (uint8_t)(i * 7 + 1);
    write_bytes(path, dir, name, buf, 8 + n + data_len);
    free(buf);
}

static void assert_error_has(const char *what, const char *needle)
{
    const char *msg = ferry_last_error();
    ck_assert_msg(strstr(msg, needle) != NULL, "%s: error \"%s\" lacks \"%s\"", what, msg,
                  needle);
}

static uint64_t read_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* ---- the real checkpoint ------------------------------------------------------------- */

START_TEST(test_st_open_real_checkpoint)
{
    ferry_st_set *s = NULL;
    ck_assert_msg(ferry_st_open_dir(TINY_DIR, &s) == FERRY_OK, "%s", ferry_last_error());
    /* 6 layers x (8 experts x 3 + router gate + q, k, v, o + 2 norms) + embed + norm + head */
    ck_assert_int_eq(ferry_st_count(s), 6 * (8 * 3 + 1 + 4 + 2) + 3);
    ck_assert_int_eq(ferry_st_file_count(s), 3);

    int n_experts = 0;
    for (int32_t i = 0; i < ferry_st_count(s); i++) {
        const ferry_st_tensor *t = ferry_st_at(s, i);
        ck_assert_ptr_eq(ferry_st_find(s, t->name), t);
        ck_assert_int_eq(t->dtype, FERRY_ST_BF16);
        n_experts += strstr(t->name, ".experts.") != NULL;
    }
    ck_assert_int_eq(n_experts, 6 * 8 * 3);
    ck_assert_ptr_null(ferry_st_at(s, ferry_st_count(s)));
    ck_assert_ptr_null(ferry_st_at(s, -1));
    ck_assert_ptr_null(ferry_st_find(s, "model.layers.6.self_attn.q_proj.weight"));

    /* embed_tokens has data_offsets [0, ...] in shard 1: its bytes start right after the
     * header, whose length the file's first 8 bytes give. */
    const ferry_st_tensor *t = NULL;
    ferry_dtype dt;
    const int64_t embed_shape[2] = {4096, 192};
    ck_assert_msg(ferry_st_get(s, "model.embed_tokens.weight", 2, embed_shape, &t, &dt) ==
                      FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(dt, FERRY_DTYPE_BF16);
    ck_assert_uint_eq(t->n_bytes, 4096u * 192u * 2u);
    const char *path = ferry_st_file_path(s, t->file_index);
    ck_assert_ptr_nonnull(strstr(path, "model-00001-of-00003.safetensors"));
    size_t len;
    uint8_t *raw = (uint8_t *)tu_read_file(path, &len);
    uint64_t start = 8 + read_le64(raw);
    ck_assert_uint_eq(t->file_offset, start);
    ck_assert(memcmp(t->data, raw + start, 4096) == 0);
    int nonzero = 0;
    for (int i = 0; i < 4096; i++)
        nonzero += raw[start + i] != 0;
    ck_assert_int_gt(nonzero, 1000);
    free(raw);

    /* An expert in the middle shard, checked the same way through its file offset. */
    const int64_t w2_shape[2] = {192, 384};
    const char *w2 = "model.layers.3.block_sparse_moe.experts.5.w2.weight";
    ck_assert_msg(ferry_st_get(s, w2, 2, w2_shape, &t, &dt) == FERRY_OK, "%s",
                  ferry_last_error());
    raw = (uint8_t *)tu_read_file(ferry_st_file_path(s, t->file_index), &len);
    ck_assert_uint_le(t->file_offset + t->n_bytes, len);
    ck_assert(memcmp(t->data, raw + t->file_offset, t->n_bytes) == 0);
    free(raw);

    ferry_st_close(s);
}
END_TEST

START_TEST(test_st_get_reports_shape_dtype_missing)
{
    ferry_st_set *s = NULL;
    ck_assert_int_eq(ferry_st_open_dir(TINY_DIR, &s), FERRY_OK);
    const ferry_st_tensor *t = (const ferry_st_tensor *)&s; /* sentinel: must stay put */
    ferry_dtype dt = FERRY_DTYPE_COUNT;

    const int64_t wrong[2] = {384, 193};
    const char *w1 = "model.layers.0.block_sparse_moe.experts.0.w1.weight";
    ck_assert_int_eq(ferry_st_get(s, w1, 2, wrong, &t, &dt), FERRY_ERR_FORMAT);
    assert_error_has("shape", "model-00001-of-00003.safetensors: tensor "
                     "'model.layers.0.block_sparse_moe.experts.0.w1.weight' has shape "
                     "[384, 192], config.json implies [384, 193]");
    const int64_t flat[1] = {384 * 192};
    ck_assert_int_eq(ferry_st_get(s, w1, 1, flat, &t, &dt), FERRY_ERR_FORMAT);
    assert_error_has("rank", "implies [73728]");

    ck_assert_int_eq(ferry_st_get(s, "model.layers.9.mlp.weight", 1, flat, &t, &dt),
                     FERRY_ERR_FORMAT);
    assert_error_has("missing", "model.safetensors.index.json: tensor "
                     "'model.layers.9.mlp.weight' is missing");
    ck_assert_ptr_eq(t, (const ferry_st_tensor *)&s);
    ck_assert_int_eq(dt, FERRY_DTYPE_COUNT);

    ck_assert_int_eq(ferry_st_get(NULL, w1, 2, wrong, &t, &dt), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_st_get(s, w1, 9, wrong, &t, &dt), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_st_get(s, w1, 2, NULL, &t, &dt), FERRY_ERR_INVALID);
    ferry_st_close(s);
}
END_TEST

/* ---- valid files built here ---------------------------------------------------------- */

START_TEST(test_st_metadata_scalar_and_empty_tensors)
{
    char dir[512], path[512];
    tu_scratch_dir(dir, "st_valid");
    float data[3] = {1.5f, -2.0f, 3.25f};
    /* a scalar, a zero-size tensor sharing its end, a 2-element F32, packed F4, trailing
     * padding spaces as writers use to align the data */
    const char *header =
        "{\"__metadata__\": {\"format\": \"pt\", \"note\": \"x\"},"
        " \"scalar\": {\"dtype\": \"F32\", \"shape\": [], \"data_offsets\": [0, 4]},"
        " \"empty\": {\"dtype\": \"F32\", \"shape\": [0, 3], \"data_offsets\": [4, 4]},"
        " \"pair\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12],"
        " \"extra\": 1},"
        " \"nibbles\": {\"dtype\": \"F4\", \"shape\": [2, 1], \"data_offsets\": [12, 13]}}   ";
    uint8_t bytes[13];
    memcpy(bytes, data, 12);
    bytes[12] = 0x5a;
    write_st(path, dir, "valid.safetensors", header, bytes, sizeof bytes);

    ferry_st_set *s = NULL;
    ck_assert_msg(ferry_st_open_file(path, &s) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(ferry_st_count(s), 4);
    ck_assert_ptr_null(ferry_st_find(s, "__metadata__"));
    ck_assert_str_eq(ferry_st_file_path(s, 0), path);
    ck_assert_ptr_null(ferry_st_file_path(s, 1));

    const ferry_st_tensor *t;
    ferry_dtype dt;
    ck_assert_int_eq(ferry_st_get(s, "scalar", 0, NULL, &t, &dt), FERRY_OK);
    ck_assert_int_eq(t->n_dims, 0);
    ck_assert_uint_eq(t->n_bytes, 4);
    ck_assert(*(const float *)t->data == 1.5f);

    const int64_t empty_shape[2] = {0, 3};
    ck_assert_int_eq(ferry_st_get(s, "empty", 2, empty_shape, &t, &dt), FERRY_OK);
    ck_assert_uint_eq(t->n_bytes, 0);

    const int64_t pair_shape[1] = {2};
    ck_assert_int_eq(ferry_st_get(s, "pair", 1, pair_shape, &t, &dt), FERRY_OK);
    ck_assert_int_eq(dt, FERRY_DTYPE_F32);
    ck_assert(((const float *)t->data)[0] == -2.0f && ((const float *)t->data)[1] == 3.25f);

    t = ferry_st_find(s, "nibbles");
    ck_assert_ptr_nonnull(t);
    ck_assert_int_eq(t->dtype, FERRY_ST_F4);
    ck_assert_uint_eq(t->n_bytes, 1);
    ck_assert_int_eq(*(const uint8_t *)t->data, 0x5a);
    const int64_t nib_shape[2] = {2, 1};
    ck_assert_int_eq(ferry_st_get(s, "nibbles", 2, nib_shape, &t, &dt), FERRY_ERR_UNSUPPORTED);
    assert_error_has("dtype", "tensor 'nibbles' has dtype F4");
    ferry_st_close(s);

    /* No tensors at all and an empty data section. */
    write_st(path, dir, "empty.safetensors", "{}", NULL, 0);
    ck_assert_msg(ferry_st_open_file(path, &s) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(ferry_st_count(s), 0);
    ck_assert_ptr_null(ferry_st_find(s, "x"));
    ck_assert_int_eq(ferry_st_get(s, "x", 0, NULL, NULL, NULL), FERRY_ERR_FORMAT);
    assert_error_has("missing", "empty.safetensors: tensor 'x' is missing");
    ferry_st_close(s);
    ferry_st_close(NULL);
}
END_TEST

START_TEST(test_st_get_rejects_other_dtypes)
{
    char dir[512], path[512];
    tu_scratch_dir(dir, "st_dtypes");
    const char *header =
        "{\"ids\": {\"dtype\": \"I32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
        " \"byte\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [8, 9]},"
        " \"odd\": {\"dtype\": \"BF16\", \"shape\": [2], \"data_offsets\": [9, 13]},"
        " \"f8\": {\"dtype\": \"F8_E4M3\", \"shape\": [3], \"data_offsets\": [13, 16]},"
        " \"h\": {\"dtype\": \"F16\", \"shape\": [1, 2], \"data_offsets\": [16, 20]}}";
    write_st(path, dir, "dtypes.safetensors", header, NULL, 20);
    ferry_st_set *s = NULL;
    ck_assert_msg(ferry_st_open_file(path, &s) == FERRY_OK, "%s", ferry_last_error());

    const ferry_st_tensor *t;
    ferry_dtype dt;
    const int64_t two[1] = {2}, one[1] = {1}, three[1] = {3}, h_shape[2] = {1, 2};
    ck_assert_int_eq(ferry_st_get(s, "ids", 1, two, &t, &dt), FERRY_ERR_UNSUPPORTED);
    assert_error_has("I32", "dtypes.safetensors: tensor 'ids' has dtype I32");
    ck_assert_int_eq(ferry_st_get(s, "byte", 1, one, &t, &dt), FERRY_ERR_UNSUPPORTED);
    assert_error_has("U8", "tensor 'byte' has dtype U8");
    ck_assert_int_eq(ferry_st_get(s, "f8", 1, three, &t, &dt), FERRY_ERR_UNSUPPORTED);
    assert_error_has("F8", "tensor 'f8' has dtype F8_E4M3");
    /* misaligned data is handed out as is; the model loader copies it */
    ck_assert_int_eq(ferry_st_get(s, "odd", 1, two, &t, &dt), FERRY_OK);
    ck_assert_int_eq(dt, FERRY_DTYPE_BF16);
    ck_assert_uint_eq(t->file_offset % 2, 1);
    ck_assert_int_eq(ferry_st_get(s, "h", 2, h_shape, &t, &dt), FERRY_OK);
    ck_assert_int_eq(dt, FERRY_DTYPE_F16);
    ck_assert_int_eq(t->dtype, FERRY_ST_F16);
    ck_assert_str_eq(ferry_st_dtype_name(t->dtype), "F16");
    ck_assert_int_eq(ferry_st_dtype_bits(FERRY_ST_F6_E2M3), 6);
    ferry_st_close(s);
}
END_TEST

enum { n_hash_layers = 32, n_hash_experts = 8 };

/* Tensor j of layer l in Mixtral-8x7B's layout: 8 experts x 3 matrices, then 7 dense. */
static void hash_test_name(char *name, size_t cap, int l, int j)
{
    if (j < n_hash_experts * 3)
        snprintf(name, cap, "model.layers.%d.block_sparse_moe.experts.%d.w%d.weight", l, j / 3,
                 j % 3 + 1);
    else
        snprintf(name, cap, "model.layers.%d.dense.%d.weight", l, j);
}

START_TEST(test_st_hash_finds_thousands_of_tensors)
{
    const int n_layers = n_hash_layers, n_experts = n_hash_experts;
    int n = n_layers * n_experts * 3 + n_layers * 7;
    size_t cap = (size_t)n * 160 + 64;
    char *header = malloc(cap);
    float *data = malloc((size_t)n * sizeof *data);
    ck_assert(header && data);
    size_t used = (size_t)snprintf(header, cap, "{");
    char name[128];
    int k = 0;
    for (int l = 0; l < n_layers; l++) {
        for (int j = 0; j < n_experts * 3 + 7; j++, k++) {
            hash_test_name(name, sizeof name, l, j);
            used += (size_t)snprintf(header + used, cap - used,
                                     "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[1],"
                                     "\"data_offsets\":[%d,%d]}",
                                     k ? "," : "", name, 4 * k, 4 * k + 4);
            data[k] = (float)k;
        }
    }
    snprintf(header + used, cap - used, "}");
    char dir[512], path[512];
    tu_scratch_dir(dir, "st_hash");
    write_st(path, dir, "many.safetensors", header, data, (size_t)n * sizeof *data);

    ferry_st_set *s = NULL;
    ck_assert_msg(ferry_st_open_file(path, &s) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(ferry_st_count(s), n);
    k = 0;
    for (int l = 0; l < n_layers; l++) {
        for (int j = 0; j < n_experts * 3 + 7; j++, k++) {
            hash_test_name(name, sizeof name, l, j);
            const ferry_st_tensor *t = ferry_st_find(s, name);
            ck_assert_msg(t != NULL, "%s not found", name);
            ck_assert_str_eq(t->name, name);
            ck_assert(*(const float *)t->data == (float)k);
            ck_assert_ptr_eq(ferry_st_at(s, k), t);
        }
    }
    ck_assert_ptr_null(ferry_st_find(s, "model.layers.32.block_sparse_moe.experts.0.w1.weight"));
    ck_assert_ptr_null(ferry_st_find(s, ""));
    ferry_st_close(s);
    free(header);
    free(data);
}
END_TEST

/* ---- malformed files ------------------------------------------------------------------- */

START_TEST(test_st_rejects_bad_framing)
{
    char dir[512], path[512];
    tu_scratch_dir(dir, "st_framing");
    ferry_st_set *s = (ferry_st_set *)&dir; /* sentinel: must stay put on failure */
    ferry_st_set *const sentinel = s;

    write_bytes(path, dir, "empty.safetensors", "", 0);
    ck_assert_int_eq(ferry_st_open_file(path, &s), FERRY_ERR_FORMAT);
    assert_error_has("empty", "empty.safetensors: file is 0 bytes, too short");

    write_bytes(path, dir, "five.safetensors", "\x10\0\0\0\0", 5);
    ck_assert_int_eq(ferry_st_open_file(path, &s), FERRY_ERR_FORMAT);
    assert_error_has("5 bytes", "five.safetensors: file is 5 bytes, too short");

    uint8_t buf[64] = {0};
    uint64_t huge = 200ull * 1000 * 1000;
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(huge >> (8 * i));
    write_bytes(path, dir, "absurd.safetensors", buf, sizeof buf);
    ck_assert_int_eq(ferry_st_open_file(path, &s), FERRY_ERR_FORMAT);
    assert_error_has("absurd", "absurd.safetensors: header length 200000000 is absurd");

    memset(buf, ' ', sizeof buf);
    memcpy(buf, "\x64\0\0\0\0\0\0\0{}", 10); /* claims 100 header bytes, has 56 */
    write_bytes(path, dir, "truncated.safetensors", buf, sizeof buf);
    ck_assert_int_eq(ferry_st_open_file(path, &s), FERRY_ERR_FORMAT);
    assert_error_has("truncated", "truncated.safetensors: header length 100 exceeds the 56");

    buf[0] = 0xff;
    for (int i = 1; i < 8; i++)
        buf[i] = 0xff;
    write_bytes(path, dir, "max.safetensors", buf, sizeof buf);
    ck_assert_int_eq(ferry_st_open_file(path, &s), FERRY_ERR_FORMAT);
    assert_error_has("u64 max", "max.safetensors: header length 18446744073709551615 is absurd");

    write_bytes(path, dir, "zero.safetensors", "\0\0\0\0\0\0\0\0", 8);
    ck_assert_int_eq(ferry_st_open_file(path, &s), FERRY_ERR_FORMAT);
    assert_error_has("zero", "zero.safetensors: header is not valid JSON");

    char absent[600];
    snprintf(absent, sizeof absent, "%s/absent.safetensors", dir);
    ck_assert_int_eq(ferry_st_open_file(absent, &s), FERRY_ERR_IO);
    assert_error_has("absent", "absent.safetensors: cannot open: No such file or directory");

    ck_assert_int_eq(ferry_st_open_file(dir, &s), FERRY_ERR_IO);
    assert_error_has("dir", "not a regular file");

    ck_assert_int_eq(ferry_st_open_file(NULL, &s), FERRY_ERR_INVALID);
    ck_assert_ptr_eq(s, sentinel);
}
END_TEST

typedef struct {
    const char *header;
    size_t data_len;
    ferry_status want;
    const char *want_msg; /* follows "bad.safetensors: " in the message */
} bad_header;

static const bad_header g_bad_headers[] = {
    {"{\"w\": ", 0, FERRY_ERR_FORMAT, "header is not valid JSON"},
    {"[1, 2]", 0, FERRY_ERR_FORMAT, "header is not a JSON object"},
    {"\"w\"", 0, FERRY_ERR_FORMAT, "header is not a JSON object"},
    {"{} x", 0, FERRY_ERR_FORMAT, "header has bytes after its JSON object"},
    {"{\"w\": 3}", 0, FERRY_ERR_FORMAT, "tensor 'w': entry is not a JSON object"},
    {"{\"w\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4, FERRY_ERR_FORMAT,
     "tensor 'w' has no 'dtype'"},
    {"{\"w\": {\"dtype\": 5, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, FERRY_ERR_FORMAT,
     "tensor 'w': 'dtype' is not a string"},
    {"{\"w\": {\"dtype\": \"Q8\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
     FERRY_ERR_FORMAT, "tensor 'w' has unknown dtype 'Q8'"},
    {"{\"w\": {\"dtype\": \"bf16\", \"shape\": [1], \"data_offsets\": [0, 2]}}", 2,
     FERRY_ERR_FORMAT, "tensor 'w' has unknown dtype 'bf16'"},
    {"{\"w\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", 4, FERRY_ERR_FORMAT,
     "tensor 'w' has no 'shape'"},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": 1, \"data_offsets\": [0, 4]}}", 4,
     FERRY_ERR_FORMAT, "tensor 'w': 'shape' is not an array"},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [2, -3], \"data_offsets\": [0, 4]}}", 4,
     FERRY_ERR_FORMAT, "tensor 'w': shape[1] is negative (-3)"},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [2.5], \"data_offsets\": [0, 4]}}", 4,
     FERRY_ERR_FORMAT, "tensor 'w': shape[0] is not an integer"},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [\"2\"], \"data_offsets\": [0, 8]}}", 8,
     FERRY_ERR_FORMAT, "tensor 'w': shape[0] is not an integer"},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [1e300], \"data_offsets\": [0, 8]}}", 8,
     FERRY_ERR_FORMAT, "tensor 'w': shape[0] is not an integer"},
    {"{\"w\": {\"dtype\": \"U8\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 1]}}", 1,
     FERRY_ERR_UNSUPPORTED, "tensor 'w' has 9 dimensions, at most 8"},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, FERRY_ERR_FORMAT,
     "tensor 'w' has no 'data_offsets'"},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4]}}", 4, FERRY_ERR_FORMAT,
     "tensor 'w': 'data_offsets' is not an array of two non-negative integers"},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4, 8]}}", 8,
     FERRY_ERR_FORMAT, "tensor 'w': 'data_offsets' is not an array of two"},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [-4, 0]}}", 4,
     FERRY_ERR_FORMAT, "tensor 'w': 'data_offsets' is not an array of two"},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": \"0,4\"}}", 4,
     FERRY_ERR_FORMAT, "tensor 'w': 'data_offsets' is not an array of two"},
    {"{\"w\": {\"dtype\": \"F32\", \"dtype\": \"F16\", \"shape\": [1], \"data_offsets\": [0, 4]}}",
     4, FERRY_ERR_FORMAT, "tensor 'w': key 'dtype' appears twice"},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296, 16], "
     "\"data_offsets\": [0, 4]}}", 4, FERRY_ERR_FORMAT, "tensor 'w': element count of shape x "
     "F32 overflows"},
    {"{\"w\": {\"dtype\": \"F64\", \"shape\": [4294967296, 536870912], "
     "\"data_offsets\": [0, 4]}}", 4, FERRY_ERR_FORMAT, "tensor 'w': element count"},
    {"{\"w\": {\"dtype\": \"F4\", \"shape\": [3], \"data_offsets\": [0, 2]}}", 2,
     FERRY_ERR_FORMAT, "tensor 'w': 3 F4 elements do not fill whole bytes"},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 3], \"data_offsets\": [0, 20]}}", 24,
     FERRY_ERR_FORMAT, "tensor 'w' has 20 bytes in data_offsets but its shape and dtype F32 "
     "need 24"},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 4]}}", 8,
     FERRY_ERR_FORMAT, "tensor 'w': data_offsets begin 8 is after end 4"},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 3], \"data_offsets\": [0, 24]}}", 16,
     FERRY_ERR_FORMAT, "tensor 'w' ends at byte 24, the data section has 16"},
    {"{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]},"
     " \"b\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [8, 24]}}", 24,
     FERRY_ERR_FORMAT, "tensor 'b' (bytes 8..24) overlaps tensor 'a' (bytes 0..16)"},
    {"{\"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]},"
     " \"a\": {\"dtype\": \"F32\", \"shape\": [6], \"data_offsets\": [0, 24]},"
     " \"c\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [24, 28]}}", 28,
     FERRY_ERR_FORMAT, "tensor 'b' (bytes 4..8) overlaps tensor 'a' (bytes 0..24)"},
    {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
     " \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", 8,
     FERRY_ERR_FORMAT, "tensor 'b' (bytes 0..8) overlaps tensor 'a' (bytes 0..8)"},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
     " \"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", 8,
     FERRY_ERR_FORMAT, "tensor 'w' appears twice in the header"},
    {"{\"__metadata__\": 3}", 0, FERRY_ERR_FORMAT, "__metadata__ is not a JSON object"},
    {"{\"__metadata__\": {\"format\": \"pt\", \"n\": 1}}", 0, FERRY_ERR_FORMAT,
     "__metadata__ value 'n' is not a string"},
    {"{\"__metadata__\": {}, \"__metadata__\": {}}", 0, FERRY_ERR_FORMAT,
     "__metadata__ appears twice"},
};

START_TEST(test_st_rejects_malformed_header)
{
    const bad_header *b = &g_bad_headers[_i];
    char dir[512], path[512], what[64];
    snprintf(what, sizeof what, "g_bad_headers[%d]", _i);
    tu_scratch_dir(dir, "st_bad");
    write_st(path, dir, "bad.safetensors", b->header, NULL, b->data_len);
    ferry_st_set *s = NULL;
    ferry_status st = ferry_st_open_file(path, &s);
    ck_assert_msg(st == b->want, "%s: got %s (%s), want %s", what, ferry_status_name(st),
                  ferry_last_error(), ferry_status_name(b->want));
    ck_assert_ptr_null(s);
    char full[600];
    snprintf(full, sizeof full, "%s: %s", path, b->want_msg);
    assert_error_has(what, full);
}
END_TEST

/* ---- directories and indexes ----------------------------------------------------------- */

/* Two shards: a.safetensors holds t0 (F32 [2]) and t1 (BF16 [4]), b.safetensors holds t2
 * (F32 [1]). */
static void write_two_shards(const char *dir)
{
    char path[512];
    write_st(path, dir, "a.safetensors",
             "{\"t0\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
             " \"t1\": {\"dtype\": \"BF16\", \"shape\": [4], \"data_offsets\": [8, 16]}}",
             NULL, 16);
    float v = 42.0f;
    write_st(path, dir, "b.safetensors",
             "{\"t2\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", &v, 4);
}

static void write_index(const char *dir, const char *text)
{
    char path[512];
    write_bytes(path, dir, "model.safetensors.index.json", text, strlen(text));
}

START_TEST(test_st_open_sharded_dir)
{
    char dir[512];
    tu_scratch_dir(dir, "st_shards");
    write_two_shards(dir);
    write_index(dir, "{\"metadata\": {\"total_size\": 20}, \"weight_map\": {"
                     "\"t2\": \"b.safetensors\", \"t0\": \"a.safetensors\","
                     " \"t1\": \"a.safetensors\"}}");
    ferry_st_set *s = NULL;
    ck_assert_msg(ferry_st_open_dir(dir, &s) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(ferry_st_count(s), 3);
    ck_assert_int_eq(ferry_st_file_count(s), 2);
    const ferry_st_tensor *t = ferry_st_find(s, "t2");
    ck_assert_ptr_nonnull(t);
    ck_assert(*(const float *)t->data == 42.0f);
    ck_assert_ptr_nonnull(strstr(ferry_st_file_path(s, t->file_index), "/b.safetensors"));
    t = ferry_st_find(s, "t1");
    ck_assert_ptr_nonnull(strstr(ferry_st_file_path(s, t->file_index), "/a.safetensors"));
    ck_assert_int_eq(((const uint8_t *)t->data)[0], (uint8_t)(8 * 7 + 1));
    ferry_st_close(s);
}
END_TEST

START_TEST(test_st_open_single_file_dir)
{
    char dir[512], path[512];
    tu_scratch_dir(dir, "st_single");
    write_st(path, dir, "model.safetensors",
             "{\"w\": {\"dtype\": \"BF16\", \"shape\": [2, 2], \"data_offsets\": [0, 8]}}",
             NULL, 8);
    ferry_st_set *s = NULL;
    ck_assert_msg(ferry_st_open_dir(dir, &s) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_int_eq(ferry_st_count(s), 1);
    ck_assert_int_eq(ferry_st_file_count(s), 1);
    const int64_t shape[2] = {2, 2};
    const ferry_st_tensor *t;
    ck_assert_int_eq(ferry_st_get(s, "w", 2, shape, &t, NULL), FERRY_OK);
    ck_assert_int_eq(((const uint8_t *)t->data)[7], 7 * 7 + 1);
    ck_assert_int_eq(ferry_st_get(s, "v", 2, shape, &t, NULL), FERRY_ERR_FORMAT);
    assert_error_has("missing", "/model.safetensors: tensor 'v' is missing");
    ferry_st_close(s);

    /* A malformed single file is reported by its path. */
    write_st(path, dir, "model.safetensors", "{\"w\": 1}", NULL, 0);
    ck_assert_int_eq(ferry_st_open_dir(dir, &s), FERRY_ERR_FORMAT);
    assert_error_has("bad single", "/model.safetensors: tensor 'w': entry is not");

    tu_scratch_dir(dir, "st_nothing");
    ck_assert_int_eq(ferry_st_open_dir(dir, &s), FERRY_ERR_IO);
    assert_error_has("nothing", "has neither model.safetensors.index.json nor model.safetensors");
}
END_TEST

typedef struct {
    const char *index;
    ferry_status want;
    const char *want_msg;
} bad_index;

static const bad_index g_bad_indexes[] = {
    {"{\"weight_map\": {", FERRY_ERR_FORMAT, "model.safetensors.index.json: not valid JSON"},
    {"", FERRY_ERR_FORMAT, "model.safetensors.index.json: not valid JSON"},
    {"[]", FERRY_ERR_FORMAT, "model.safetensors.index.json: not a JSON object"},
    {"{\"metadata\": {}}", FERRY_ERR_FORMAT, "model.safetensors.index.json: has no 'weight_map'"},
    {"{\"weight_map\": [\"a.safetensors\"]}", FERRY_ERR_FORMAT,
     "model.safetensors.index.json: 'weight_map' is not a JSON object"},
    {"{\"weight_map\": {\"t0\": 1}}", FERRY_ERR_FORMAT,
     "weight_map entry for tensor 't0' is not a string"},
    {"{\"weight_map\": {\"t0\": \"../a.safetensors\"}}", FERRY_ERR_FORMAT,
     "tensor 't0' is mapped to '../a.safetensors', which is not a plain file name"},
    {"{\"weight_map\": {\"t0\": \"/etc/passwd\"}}", FERRY_ERR_FORMAT,
     "tensor 't0' is mapped to '/etc/passwd', which is not a plain file name"},
    {"{\"weight_map\": {\"t0\": \"..\"}}", FERRY_ERR_FORMAT, "which is not a plain file name"},
    {"{\"weight_map\": {\"t0\": \"\"}}", FERRY_ERR_FORMAT, "which is not a plain file name"},
    {"{\"weight_map\": {\"t0\": \"a.safetensors\", \"t1\": \"a.safetensors\","
     " \"t2\": \"c.safetensors\"}}", FERRY_ERR_IO,
     "/c.safetensors: cannot open: No such file or directory"},
    {"{\"weight_map\": {\"t0\": \"a.safetensors\", \"t1\": \"a.safetensors\","
     " \"t2\": \"b.safetensors\", \"t3\": \"b.safetensors\"}}", FERRY_ERR_FORMAT,
     "model.safetensors.index.json: tensor 't3' is listed in shard b.safetensors, which does "
     "not contain it"},
    {"{\"weight_map\": {\"t0\": \"a.safetensors\", \"t1\": \"b.safetensors\","
     " \"t2\": \"b.safetensors\"}}", FERRY_ERR_FORMAT,
     "model.safetensors.index.json: tensor 't1' is listed in shard b.safetensors but is in "},
    {"{\"weight_map\": {\"t0\": \"a.safetensors\", \"t1\": \"a.safetensors\","
     " \"t2\": \"b.safetensors\", \"t0\": \"a.safetensors\"}}", FERRY_ERR_FORMAT,
     "model.safetensors.index.json: weight_map lists tensor 't0' twice"},
    {"{\"weight_map\": {\"t0\": \"a.safetensors\", \"t1\": \"a.safetensors\","
     " \"t2\": \"b.safetensors\", \"t9\": \"dup.safetensors\"}}", FERRY_ERR_FORMAT,
     "/dup.safetensors: tensor 't0' is also in "},
    {"{\"weight_map\": {\"t0\": \"a.safetensors\", \"t1\": \"a.safetensors\","
     " \"x\": \"broken.safetensors\"}}", FERRY_ERR_FORMAT,
     "/broken.safetensors: tensor 'x' ends at byte 8, the data section has 4"},
};

START_TEST(test_st_rejects_bad_index)
{
    const bad_index *b = &g_bad_indexes[_i];
    char dir[512], path[512], what[64];
    snprintf(what, sizeof what, "g_bad_indexes[%d]", _i);
    tu_scratch_dir(dir, "st_badindex");
    write_two_shards(dir);
    /* a shard repeating t0 (and holding t9) and a shard whose tensor overruns its data */
    write_st(path, dir, "dup.safetensors",
             "{\"t9\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
             " \"t0\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}",
             NULL, 12);
    write_st(path, dir, "broken.safetensors",
             "{\"x\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", NULL, 4);
    write_index(dir, b->index);
    ferry_st_set *s = NULL;
    ferry_status st = ferry_st_open_dir(dir, &s);
    ck_assert_msg(st == b->want, "%s: got %s (%s), want %s", what, ferry_status_name(st),
                  ferry_last_error(), ferry_status_name(b->want));
    ck_assert_ptr_null(s);
    assert_error_has(what, b->want_msg);
    assert_error_has(what, dir);
}
END_TEST

/* A tensor in a shard that the index forgot is kept, as transformers keeps it. */
START_TEST(test_st_index_may_omit_a_tensor)
{
    char dir[512];
    tu_scratch_dir(dir, "st_omitted");
    write_two_shards(dir);
    write_index(dir, "{\"weight_map\": {\"t0\": \"a.safetensors\", \"t2\": \"b.safetensors\"}}");
    ferry_st_set *s = NULL;
    ck_assert_msg(ferry_st_open_dir(dir, &s) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_ptr_nonnull(ferry_st_find(s, "t1"));
    ck_assert_int_eq(ferry_st_count(s), 3);
    ferry_st_close(s);
}
END_TEST

static Suite *safetensors_suite(void)
{
    Suite *s = suite_create("safetensors");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_st_open_real_checkpoint);
    tcase_add_test(tc, test_st_get_reports_shape_dtype_missing);
    tcase_add_test(tc, test_st_metadata_scalar_and_empty_tensors);
    tcase_add_test(tc, test_st_get_rejects_other_dtypes);
    tcase_add_test(tc, test_st_hash_finds_thousands_of_tensors);
    tcase_add_test(tc, test_st_rejects_bad_framing);
    tcase_add_loop_test(tc, test_st_rejects_malformed_header, 0,
                        (int)(sizeof g_bad_headers / sizeof g_bad_headers[0]));
    tcase_add_test(tc, test_st_open_sharded_dir);
    tcase_add_test(tc, test_st_open_single_file_dir);
    tcase_add_test(tc, test_st_index_may_omit_a_tensor);
    tcase_add_loop_test(tc, test_st_rejects_bad_index, 0,
                        (int)(sizeof g_bad_indexes / sizeof g_bad_indexes[0]));
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(safetensors_suite()); }
