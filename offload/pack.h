/*
 * offload/pack.h: the packed expert file, which holds every expert of a model (w1, w3, w2
 * contiguous, each expert 4096-aligned) behind a checksummed table, so the NVMe tier can
 * fetch one expert with one large O_DIRECT read and check what it got.
 *
 * The layout is spelled out in pack.c. The writer pulls the matrices from a callback and
 * writes the file atomically; the reader side (ferry_pack_open) validates the whole
 * header before any entry is handed out, so an entry of an open pack always lies inside
 * the file, 4096-aligned, with a size that matches its dtypes (which may be the quantized
 * Q8 and Q4 of kernels/quant.h) and the model's shape. An
 * open pack is immutable: every query is thread-safe. Reading the bytes is the job of
 * offload/reader.h.
 */
#ifndef FERRY_OFFLOAD_PACK_H
#define FERRY_OFFLOAD_PACK_H

#include <stddef.h>
#include <stdint.h>

#include "ferry.h"
#include "kernels/dtype.h"

#define FERRY_PACK_VERSION 2 /* written; versions 1 and 2 are read */
#define FERRY_PACK_ALIGN 4096 /* header region and every expert start are multiples */

/* The model a pack is written for and checked against: its shape, and a fingerprint of the
 * checkpoint (engine/model.h's ferry_model_pack_shape: its routers), 0 meaning none: a pack
 * written with none records none, and opening with none checks none. */
typedef struct {
    int32_t n_layers;
    int32_t n_experts;    /* per layer */
    int32_t d_model;      /* hidden_size */
    int32_t d_ff;         /* intermediate_size of one expert */
    uint64_t fingerprint; /* of the checkpoint; 0: none */
} ferry_pack_shape;

/* The parts of an expert, in file order. */
enum { FERRY_PACK_W1 = 0, FERRY_PACK_W3 = 1, FERRY_PACK_W2 = 2, FERRY_PACK_N_PARTS = 3 };

/* One expert of an open pack. */
typedef struct {
    uint64_t offset;        /* file offset of w1's first byte; a multiple of 4096 */
    uint64_t n_bytes;       /* w1 + w3 + w2 bytes (no padding) */
    uint64_t checksum;      /* XXH3-64 of those n_bytes */
    ferry_dtype dtype[FERRY_PACK_N_PARTS];    /* w1 (d_ff, d_model), w3 (d_ff, d_model),
                                                 w2 (d_model, d_ff) */
    uint64_t part_bytes[FERRY_PACK_N_PARTS];  /* w1 at offset, w3 after it, w2 after w3 */
} ferry_pack_entry;

/* Hands the writer one matrix of one expert: which is FERRY_PACK_W1, _W3 or _W2. On
 * success writes a pointer to the row-major elements to *data (w1 and w3 hold d_ff x
 * d_model elements, w2 d_model x d_ff; quantized: those rows as groups, kernels/quant.h)
 * and their type to *dtype; the data is borrowed and
 * must stay valid until the callback is called again or ferry_pack_write returns. A
 * failure returns its status with the message set through ferry_fail; the writer adds the
 * layer, expert and part. Called from the writing thread only, in file order. */
typedef ferry_status (*ferry_pack_source_fn)(void *user, int32_t layer, int32_t expert,
                                             int32_t which, const void **data,
                                             ferry_dtype *dtype);

/* Told after each expert is written (n_done of n_total). */
typedef void (*ferry_pack_progress_fn)(void *user, int32_t n_done, int32_t n_total);

/* Writes the pack of a model of the given shape to path, pulling every expert from src
 * (layer-major: layer 0 experts 0..E-1, then layer 1, ...). The file is written as the
 * temporary "<path>.<id>.tmp" (core/tempfile.h: unique to the writing thread, removed by
 * ferry_remove_temporaries; stale ones of path are swept first), fsynced and renamed over
 * path, and the folder is fsynced, so an interrupted or failed write never leaves a file at
 * path that looks valid (a previous file at path stays as it was) and a failed write
 * removes the temporary. Progress goes to the process-wide callback ("packing experts",
 * bytes) and to progress, which may be NULL; user goes to src and progress. Returns FERRY_ERR_INVALID (NULL arguments, a shape
 * out of range, a dtype the callback gives that ferry does not know or a quantized one
 * for dimensions that are not multiples of 32), FERRY_ERR_IO
 * (create, write, fsync or rename failed: the message names the path and strerror),
 * FERRY_ERR_NOMEM, or the callback's status with "<path>: layer L expert E w2: " put in
 * front of its message. Thread-safe (shares nothing between calls). */
ferry_status ferry_pack_write(const char *path, const ferry_pack_shape *shape,
                              ferry_pack_source_fn src, ferry_pack_progress_fn progress,
                              void *user);

/* An open, validated pack: its path, shape and expert table. */
typedef struct ferry_pack ferry_pack;

/* Opens path and validates it: the magic, the format version ("<path>: pack format version
 * 7, this build reads 1 to 2"), the header's size and checksum (a corrupt table is caught
 * here), the shape against *expect when expect is not NULL ("<path>: pack holds d_ff 384,
 * the model has 385 (a pack of another model?)"), the fingerprint when both the pack and
 * *expect have one ("<path>: pack written from another checkpoint (fingerprint ..., the
 * model's ...)"), and every entry: dtypes known, size
 * equal to what the dtypes and the shape imply, 4096-aligned, after the header, in order
 * without overlap, inside the file. A file shorter than the header says so; a truncated
 * file names the first layer/expert it cuts off. On success *out owns the pack (free with
 * ferry_pack_close); the file is not kept open. Returns FERRY_ERR_IO (cannot open, stat
 * or read: the message names the path and strerror), FERRY_ERR_FORMAT (any check above,
 * naming the path and the field, layer or expert), FERRY_ERR_NOMEM, FERRY_ERR_INVALID
 * (NULL path or out). Thread-safe. */
ferry_status ferry_pack_open(const char *path, const ferry_pack_shape *expect, ferry_pack **out);

/* Frees the pack. NULL-safe. */
void ferry_pack_close(ferry_pack *p);

/* The entry of (layer, expert), borrowed from the pack; NULL when either is out of range.
 * Thread-safe. */
const ferry_pack_entry *ferry_pack_get(const ferry_pack *p, int32_t layer, int32_t expert);

/* The path the pack was opened from, borrowed from the pack. Thread-safe. */
const char *ferry_pack_path(const ferry_pack *p);

/* The shape and fingerprint recorded in the pack. Thread-safe. */
ferry_pack_shape ferry_pack_get_shape(const ferry_pack *p);

/* The largest n_bytes of any expert (a staging buffer of this size, rounded up to 4096,
 * holds any expert). Thread-safe. */
uint64_t ferry_pack_max_expert_bytes(const ferry_pack *p);

/* The file's size in bytes as recorded (and checked) when opened. Thread-safe. */
uint64_t ferry_pack_file_bytes(const ferry_pack *p);

/* Checks the n_bytes at bytes, read for (layer, expert), against the entry's checksum.
 * Returns FERRY_OK, FERRY_ERR_FORMAT ("<path>: layer 3 expert 5: checksum mismatch
 * (corrupt pack file)"), FERRY_ERR_INVALID (NULL arguments, layer or expert out of
 * range). Thread-safe. */
ferry_status ferry_pack_verify(const ferry_pack *p, int32_t layer, int32_t expert,
                               const void *bytes);

#endif
