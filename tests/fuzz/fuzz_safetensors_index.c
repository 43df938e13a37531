/*
 * tests/fuzz/fuzz_safetensors_index.c: model.safetensors.index.json (format/safetensors.c,
 * ferry_st_open_dir). The input is the index; the folder it sits in holds shards written once
 * at start: three valid shards of a small Mixtral-named checkpoint (the names
 * tests/fuzz/corpus/safetensors_index/ maps), one repeating a tensor of the third
 * (dup.safetensors), one with no tensors (empty.safetensors), one with a broken header
 * (bad.safetensors) and a folder (dir.safetensors), so an index may name any of them.
 * Dictionaries: json.dict
 *
 * An accepted index must give a set in which every tensor the weight_map lists is found, in
 * the file the map names (a plain file name in the folder), every tensor lies inside its file
 * and no name appears twice. A rejected one must get a file error naming the folder.
 */
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "format/safetensors.h"
#include "tests/fuzz/fuzz_util.h"

typedef struct {
    const char *name, *dtype, *shape;
    size_t n_bytes;
} fixture_tensor;

static char g_dir[512];

/* Writes a valid .safetensors file of the given tensors (bytes counting up) to dir/name. */
static void write_shard(const char *name, const fixture_tensor *ts, int n)
{
    char header[2048], path[640];
    size_t used = 0, offset = 0;
    used += (size_t)snprintf(header + used, sizeof header - used,
                             "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = 0; i < n; i++) {
        used += (size_t)snprintf(header + used, sizeof header - used,
                                 ",\"%s\":{\"dtype\":\"%s\",\"shape\":%s,\"data_offsets\":[%zu,"
                                 "%zu]}", ts[i].name, ts[i].dtype, ts[i].shape, offset,
                                 offset + ts[i].n_bytes);
        offset += ts[i].n_bytes;
    }
    used += (size_t)snprintf(header + used, sizeof header - used, "}");
    if (used >= sizeof header)
        fuzz_setup_failed("fixture header too long");
    uint8_t *file = malloc(8 + used + offset + 1);
    if (!file)
        fuzz_setup_failed("malloc");
    for (int i = 0; i < 8; i++)
        file[i] = (uint8_t)((uint64_t)used >> (8 * i));
    memcpy(file + 8, header, used);
    for (size_t i = 0; i < offset; i++)
        file[8 + used + i] = (uint8_t)i;
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    fuzz_write_file(path, file, 8 + used + offset);
    free(file);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_quiet();
    snprintf(g_dir, sizeof g_dir, "%s/model", fuzz_scratch_dir());
    if (mkdir(g_dir, 0755) != 0)
        fuzz_setup_failed(g_dir);
    static const fixture_tensor s1[] = {
        {"model.embed_tokens.weight", "BF16", "[4,2]", 16},
        {"model.layers.0.input_layernorm.weight", "F32", "[2]", 8},
    };
    static const fixture_tensor s2[] = {
        {"model.layers.0.block_sparse_moe.gate.weight", "BF16", "[2,2]", 8},
        {"model.layers.0.block_sparse_moe.experts.0.w1.weight", "F16", "[2,2]", 8},
        {"model.layers.0.self_attn.q_proj.weight", "F8_E4M3", "[2,2]", 4},
    };
    static const fixture_tensor s3[] = {
        {"lm_head.weight", "BF16", "[4,2]", 16},
        {"model.norm.weight", "F32", "[2]", 8},
        {"model.layers.0.post_attention_layernorm.weight", "F4", "[2]", 1},
    };
    static const fixture_tensor dup[] = {{"model.norm.weight", "F32", "[2]", 8}};
    write_shard("model-00001-of-00003.safetensors", s1, 2);
    write_shard("model-00002-of-00003.safetensors", s2, 3);
    write_shard("model-00003-of-00003.safetensors", s3, 3);
    write_shard("dup.safetensors", dup, 1);
    write_shard("empty.safetensors", NULL, 0);
    char path[640];
    snprintf(path, sizeof path, "%s/bad.safetensors", g_dir);
    fuzz_write_file(path, "\x40\0\0\0\0\0\0\0{\"x\":", 13);
    snprintf(path, sizeof path, "%s/dir.safetensors", g_dir);
    if (mkdir(path, 0755) != 0)
        fuzz_setup_failed(path);
    return 0;
}

/* What an accepted index promises, checked against the index text itself. */
static void check_set(const ferry_st_set *s, const uint8_t *data, size_t size)
{
    cJSON *root = cJSON_ParseWithLength((const char *)data, size);
    FUZZ_CHECK(root != NULL, "an index that is not JSON was accepted");
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    FUZZ_CHECK(cJSON_IsObject(map), "an index without a weight_map object was accepted");
    size_t dir_len = strlen(g_dir);
    for (const cJSON *c = map->child; c; c = c->next) {
        const ferry_st_tensor *t = ferry_st_find(s, c->string);
        FUZZ_CHECK(t != NULL, "listed tensor '%s' is not in the set", c->string);
        const char *file = ferry_st_file_path(s, t->file_index);
        FUZZ_CHECK(cJSON_IsString(c) && file && strncmp(file, g_dir, dir_len) == 0 &&
                       file[dir_len] == '/' && strcmp(file + dir_len + 1, c->valuestring) == 0,
                   "tensor '%s' is listed in '%s' but found in '%s'", c->string,
                   cJSON_IsString(c) ? c->valuestring : "?", file ? file : "(none)");
    }
    cJSON_Delete(root);

    int32_t n_files = ferry_st_file_count(s);
    for (int32_t f = 0; f < n_files; f++) {
        const char *file = ferry_st_file_path(s, f);
        FUZZ_CHECK(strncmp(file, g_dir, dir_len) == 0 && file[dir_len] == '/' &&
                       !strchr(file + dir_len + 1, '/'),
                   "shard path '%s' is not a file in the folder", file);
    }
    for (int32_t i = 0; i < ferry_st_count(s); i++) {
        const ferry_st_tensor *t = ferry_st_at(s, i);
        FUZZ_CHECK(ferry_st_find(s, t->name) == t, "tensor '%s' is not unique", t->name);
        struct stat sb;
        const char *file = ferry_st_file_path(s, t->file_index);
        FUZZ_CHECK(file && stat(file, &sb) == 0, "tensor '%s' has no file", t->name);
        FUZZ_CHECK(t->file_offset <= (uint64_t)sb.st_size &&
                       t->n_bytes <= (uint64_t)sb.st_size - t->file_offset,
                   "tensor '%s' at [%llu, +%zu) is outside %s (%lld bytes)", t->name,
                   (unsigned long long)t->file_offset, t->n_bytes, file,
                   (long long)sb.st_size);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char index[640];
    snprintf(index, sizeof index, "%s/model.safetensors.index.json", g_dir);
    fuzz_write_file(index, data, size);
    ferry_st_set *s = NULL;
    ferry_status st = ferry_st_open_dir(g_dir, &s);
    if (st != FERRY_OK) {
        FUZZ_CHECK(s == NULL, "a failed open wrote its output");
        fuzz_check_rejection(st, g_dir);
        return 0;
    }
    check_set(s, data, size);
    ferry_st_close(s);
    return 0;
}
