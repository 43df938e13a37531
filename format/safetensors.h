/*
 * format/safetensors.h: memory-mapped, validated safetensors checkpoints.
 *
 * A ferry_st_set holds every tensor of one checkpoint, whether it is one .safetensors
 * file or several shards listed in model.safetensors.index.json. The set owns the
 * read-only private mappings of its files and the tensor records; a tensor's `data`
 * points into a mapping and stays valid until ferry_st_close. Every header is fully
 * validated when the set is opened (see safetensors.c for the format and the checks),
 * so a tensor handed out by the set always lies inside its file with a size that
 * matches its dtype and shape. An open set is immutable: lookups are thread-safe.
 */
#ifndef FERRY_ENGINE_SAFETENSORS_H
#define FERRY_ENGINE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "ferry.h"
#include "kernels/dtype.h"

#define FERRY_ST_MAX_DIMS 8

/* Element types of the safetensors format, as spelled in the header ("BF16"). */
typedef enum {
    FERRY_ST_BOOL = 0,
    FERRY_ST_U8,
    FERRY_ST_I8,
    FERRY_ST_I16,
    FERRY_ST_U16,
    FERRY_ST_I32,
    FERRY_ST_U32,
    FERRY_ST_I64,
    FERRY_ST_U64,
    FERRY_ST_F16,
    FERRY_ST_BF16,
    FERRY_ST_F32,
    FERRY_ST_F64,
    FERRY_ST_C64,
    FERRY_ST_F8_E4M3,
    FERRY_ST_F8_E5M2,
    FERRY_ST_F8_E8M0,
    FERRY_ST_F6_E2M3, /* sub-byte types are packed; a tensor's bits must fill whole bytes */
    FERRY_ST_F6_E3M2,
    FERRY_ST_F4,
    FERRY_ST_DTYPE_COUNT
} ferry_st_dtype;

/* The header spelling of a dtype ("F8_E4M3"); "?" when out of range. Thread-safe. */
const char *ferry_st_dtype_name(ferry_st_dtype t);

/* Bits per element of a dtype (1 byte for BOOL); 0 when out of range. Thread-safe. */
int32_t ferry_st_dtype_bits(ferry_st_dtype t);

typedef struct {
    const char *name;         /* owned by the set */
    ferry_st_dtype dtype;     /* as stored in the file */
    int32_t n_dims;           /* 0 (a scalar) .. FERRY_ST_MAX_DIMS */
    int64_t shape[FERRY_ST_MAX_DIMS]; /* shape[i] >= 0; entries past n_dims are 0 */
    const void *data;         /* into the file's mapping; alignment is whatever the file has */
    size_t n_bytes;           /* equals elements x dtype size; may be 0 */
    uint64_t file_offset;     /* absolute offset of data[0] in its file (for direct reads) */
    int32_t file_index;       /* which file of the set; see ferry_st_file_path */
} ferry_st_tensor;

/* All tensors of one checkpoint (one or many files); owns the mappings. */
typedef struct ferry_st_set ferry_st_set;

/* Opens, maps and validates one .safetensors file. On success *out owns the set; free it
 * with ferry_st_close. Returns FERRY_ERR_IO (cannot open, stat or map: the message names
 * the path and strerror), FERRY_ERR_FORMAT (malformed header: the message names the file
 * and the tensor or field), FERRY_ERR_UNSUPPORTED (a valid file with more than
 * FERRY_ST_MAX_DIMS dimensions), FERRY_ERR_NOMEM, FERRY_ERR_INVALID (NULL arguments).
 * Thread-safe (the set is not shared until returned). */
ferry_status ferry_st_open_file(const char *path, ferry_st_set **out);

/* Opens the checkpoint in directory dir: the shards listed in
 * dir/model.safetensors.index.json when that file exists, else dir/model.safetensors.
 * The index must name plain file names in dir, and every tensor it lists must be in the
 * shard it names; a tensor a shard holds but the index omits is kept (and logged); no
 * name may appear twice. Ownership and return codes as ferry_st_open_file; FERRY_ERR_IO also when
 * neither file exists or a shard is missing. Thread-safe. */
ferry_status ferry_st_open_dir(const char *dir, ferry_st_set **out);

/* Unmaps the files and frees the set; every tensor pointer from it becomes invalid.
 * NULL-safe. */
void ferry_st_close(ferry_st_set *s);

/* Number of tensors in the set. Thread-safe. */
int32_t ferry_st_count(const ferry_st_set *s);

/* The i-th tensor (0 <= i < count: files in order, tensors in header order), or NULL
 * when i is out of range. Borrowed from the set. Thread-safe. */
const ferry_st_tensor *ferry_st_at(const ferry_st_set *s, int32_t i);

/* The tensor called name (hash lookup), or NULL when the set has none. Borrowed from the
 * set. Thread-safe. */
const ferry_st_tensor *ferry_st_find(const ferry_st_set *s, const char *name);

/* Number of files in the set (1 for a single file). Thread-safe. */
int32_t ferry_st_file_count(const ferry_st_set *s);

/* Path of file file_index as opened (dir/shard name), or NULL when out of range. Borrowed
 * from the set. Thread-safe. */
const char *ferry_st_file_path(const ferry_st_set *s, int32_t file_index);

/* The binding helper of the model loader: finds name, checks it has exactly n_dims
 * dimensions of the given shape and a dtype ferry computes with (F32, F16, BF16), and on
 * success writes the tensor to *t and its dtype to *dtype (either may be NULL). The data
 * may be misaligned for its dtype (the format does not require alignment): the caller
 * copies such a tensor before reading it as typed elements. Returns FERRY_ERR_FORMAT when
 * the tensor is missing (naming the index or file) or has another shape ("<file>: tensor
 * 'X' has shape [384, 192], config.json implies [384, 193]"), FERRY_ERR_UNSUPPORTED for
 * any other dtype (naming file, tensor and dtype), FERRY_ERR_INVALID for NULL arguments or
 * n_dims out of range. Thread-safe. */
ferry_status ferry_st_get(const ferry_st_set *s, const char *name, int32_t n_dims,
                          const int64_t *shape, const ferry_st_tensor **t, ferry_dtype *dtype);

#endif
