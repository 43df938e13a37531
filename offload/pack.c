/*
 * offload/pack.c: writes and validates the packed expert file (see pack.h).
 *
 * The file (integers little-endian):
 *   [0, 4096)  the fixed header
 *        0   8  magic "FERRYPK1"
 *        8   4  u32 format version: 2 (written), 1 (read too: the same layout, without the
 *               quantized dtypes)
 *       12   4  u32 header region bytes H: 4096 + 32 x n_layers x n_experts, rounded up to
 *               a multiple of 4096
 *       16   4  u32 n_layers
 *       20   4  u32 n_experts (per layer)
 *       24   4  u32 d_model
 *       28   4  u32 d_ff
 *       32   8  u64 file bytes (the end of the last expert; the file ends there)
 *       40   8  u64 XXH3-64 of the whole header region [0, H) with these 8 bytes zeroed;
 *               kept in the fixed part so it is found before the table is trusted
 *       48   8  u64 fingerprint of the checkpoint the experts came from (pack.h); 0: none
 *               (packs written before it was recorded)
 *       56      zero up to 4096
 *   [4096, H)  the expert table, n_layers x n_experts entries of 32 bytes, layer-major
 *              (entry l x n_experts + e), then zeros up to H:
 *        0   8  u64 offset of the expert's first byte (a multiple of 4096, >= H)
 *        8   8  u64 n_bytes = bytes of w1 + w3 + w2
 *       16   8  u64 XXH3-64 of those n_bytes
 *       24   3  u8 ferry_dtype of w1, w3, w2 (F32 0, F16 1, BF16 2; version 2 also Q8 3
 *               and Q4 4, the group-wise formats of kernels/quant.h, which need d_model
 *               and d_ff to be multiples of 32)
 *       27   5  zero
 *   [H, end)   the experts in table order, each w1 (d_ff x d_model), w3 (d_ff x d_model),
 *              w2 (d_model x d_ff), row-major and contiguous (a quantized matrix is its rows of
 *              groups back to back, kernels/quant.h); each expert starts at the next
 *              multiple of 4096 after the previous one ends (the gap is zeros); the last
 *              expert is not padded, so the file may end off a 4096 boundary.
 *
 * Validation on open, in this order, so that each failure names its real cause: the size
 * covers the fixed header; magic; version; H matches the shape it claims and is inside
 * the file; the checksum; the shape is in range and equals the expected one; the
 * fingerprints agree where both exist; each entry
 * has known dtypes, the size they and the shape imply, an aligned offset after the header
 * and after the previous entry, and ends inside the recorded file bytes; the recorded
 * file bytes equal the file's size (a shorter file names the first expert it cuts off).
 *
 * The writer streams each expert to the temporary "<path>.<id>.tmp" (core/tempfile.h; the
 * gaps are left as holes, which read as zeros), writes the header last, fsyncs, renames over
 * path and fsyncs the folder. It reports "packing experts" in bytes to the progress
 * callback after each expert, the total extrapolated from the first expert (exact when all
 * experts have one size, as they do in every pack ferry writes).
 */
#include "offload/pack.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "core/bytes.h"
#include "core/error.h"
#include "core/fileio.h"
#include "core/progress.h"
#include "core/tempfile.h"

#define PACK_MAGIC "FERRYPK1"
#define PACK_FIXED_BYTES 4096u
#define PACK_ENTRY_BYTES 32u
#define PACK_CHECKSUM_AT 40u
#define PACK_FINGERPRINT_AT 48u
/* Bounds that keep every product below in range and the table a sane size (32 MiB). */
#define PACK_MAX_EXPERTS_TOTAL (1 << 20)
#define PACK_MAX_DIM (1 << 20)
/* One write() moves at most this much (Linux caps a single write near 2 GiB). */

static const char *const part_names[FERRY_PACK_N_PARTS] = {"w1", "w3", "w2"};

struct ferry_pack {
    char *path;
    ferry_pack_shape shape;
    ferry_pack_entry *entries; /* (n_layers, n_experts) */
    uint64_t max_expert_bytes;
    uint64_t file_bytes;
};

static uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

static uint64_t header_region_bytes(uint64_t n_layers, uint64_t n_experts)
{
    return round_up(PACK_FIXED_BYTES + PACK_ENTRY_BYTES * n_layers * n_experts, FERRY_PACK_ALIGN);
}

/* XXH3 of the header region with the checksum field read as zeros (the field is zeroed
 * for the hash and put back). */
static uint64_t header_checksum(uint8_t *header, uint64_t header_bytes)
{
    uint8_t saved[8];
    memcpy(saved, header + PACK_CHECKSUM_AT, 8);
    memset(header + PACK_CHECKSUM_AT, 0, 8);
    uint64_t h = XXH3_64bits(header, (size_t)header_bytes);
    memcpy(header + PACK_CHECKSUM_AT, saved, 8);
    return h;
}

/* Bytes of one part: w1 and w3 are (d_ff, d_model), w2 (d_model, d_ff). */
static uint64_t part_bytes(const ferry_pack_shape *s, int32_t which, ferry_dtype t)
{
    int64_t rows = which == FERRY_PACK_W2 ? s->d_model : s->d_ff;
    int64_t cols = which == FERRY_PACK_W2 ? s->d_ff : s->d_model;
    return (uint64_t)rows * (uint64_t)ferry_dtype_row_bytes(t, cols);
}

/* Why a part of this dtype cannot be stored for this shape, or NULL when it can. */
static const char *dtype_problem(const ferry_pack_shape *s, uint32_t dt, uint32_t version)
{
    if (dt >= FERRY_DTYPE_COUNT)
        return "is unknown";
    if (ferry_dtype_is_quant((ferry_dtype)dt) && version < 2)
        return "is quantized, which pack format version 1 does not hold";
    if (ferry_dtype_is_quant((ferry_dtype)dt) &&
        (s->d_model % FERRY_QUANT_GROUP || s->d_ff % FERRY_QUANT_GROUP))
        return "is quantized in groups of 32, which d_model and d_ff must be multiples of";
    return NULL;
}

/* Which field of the shape is out of range, or NULL when it is fine. */
static const char *shape_problem(const ferry_pack_shape *s)
{
    if (s->n_layers < 1 || s->n_layers > PACK_MAX_EXPERTS_TOTAL)
        return "n_layers";
    if (s->n_experts < 1 || s->n_experts > PACK_MAX_EXPERTS_TOTAL)
        return "n_experts";
    if ((int64_t)s->n_layers * s->n_experts > PACK_MAX_EXPERTS_TOTAL)
        return "n_layers x n_experts";
    if (s->d_model < 1 || s->d_model > PACK_MAX_DIM)
        return "d_model";
    if (s->d_ff < 1 || s->d_ff > PACK_MAX_DIM)
        return "d_ff";
    return NULL;
}

/* ---- writer ------------------------------------------------------------------------ */

/* fsync of the folder holding path, so the rename itself is durable. Best effort: some
 * filesystems refuse fsync on a folder, and the file is complete and valid either way. */
static void sync_parent(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *dir = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : strdup(".");
    if (!dir)
        return;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
    free(dir);
}

ferry_status ferry_pack_write(const char *path, const ferry_pack_shape *shape,
                              ferry_pack_source_fn src, ferry_pack_progress_fn progress,
                              void *user)
{
    if (!path || !shape || !src)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_pack_write: NULL argument");
    const char *bad = shape_problem(shape);
    if (bad)
        return ferry_fail(FERRY_ERR_INVALID, "%s: cannot pack a model with %s out of range "
                          "(n_layers %d, n_experts %d, d_model %d, d_ff %d)", path, bad,
                          shape->n_layers, shape->n_experts, shape->d_model, shape->d_ff);

    ferry_status st = FERRY_OK;
    const int32_t n_total = shape->n_layers * shape->n_experts;
    const uint64_t header_bytes = header_region_bytes((uint64_t)shape->n_layers,
                                                      (uint64_t)shape->n_experts);
    int fd = -1;
    ferry_temp temp = {0};
    const char *tmp = NULL;
    uint64_t pos = header_bytes, est_bytes = 0; /* written so far; the file's size, estimated */
    uint8_t *header = calloc(1, (size_t)header_bytes);
    XXH3_state_t *xs = XXH3_createState();
    if (!header || !xs) {
        st = ferry_fail(FERRY_ERR_NOMEM, "%s: no memory for the pack header", path);
        goto fail;
    }
    if ((st = ferry_temp_create(path, &temp, &fd)))
        goto fail;
    tmp = temp.path;

    for (int32_t l = 0; l < shape->n_layers; l++) {
        for (int32_t e = 0; e < shape->n_experts; e++) {
            uint8_t *ent = header + PACK_FIXED_BYTES
                           + PACK_ENTRY_BYTES * ((uint64_t)l * shape->n_experts + e);
            uint64_t start = round_up(pos, FERRY_PACK_ALIGN);
            pos = start;
            XXH3_64bits_reset(xs);
            for (int32_t w = 0; w < FERRY_PACK_N_PARTS; w++) {
                const void *data = NULL;
                ferry_dtype dt = FERRY_DTYPE_COUNT;
                st = src(user, l, e, w, &data, &dt);
                if (st != FERRY_OK) {
                    ferry_fail_prefix(st, "%s: layer %d expert %d %s", path, l, e,
                                      part_names[w]);
                    goto fail;
                }
                const char *why = dtype_problem(shape, (uint32_t)dt, FERRY_PACK_VERSION);
                if (why || !data) {
                    st = ferry_fail(FERRY_ERR_INVALID, "%s: layer %d expert %d %s: %s%s", path,
                                    l, e, part_names[w], data ? "the source's dtype " : "the "
                                    "source gave no data", data ? why : "");
                    goto fail;
                }
                uint64_t n = part_bytes(shape, w, dt);
                st = ferry_pwrite_all(fd, tmp, data, n, pos);
                if (st != FERRY_OK)
                    goto fail;
                XXH3_64bits_update(xs, data, (size_t)n);
                pos += n;
                ent[24 + w] = (uint8_t)dt;
            }
            ferry_put_u64(ent, start);
            ferry_put_u64(ent + 8, pos - start);
            ferry_put_u64(ent + 16, XXH3_64bits_digest(xs));
            int32_t n_done = l * shape->n_experts + e + 1;
            if (n_done == 1) /* the others are as large as the first: exact when they are */
                est_bytes = header_bytes +
                            round_up(pos - start, FERRY_PACK_ALIGN) * (uint64_t)(n_total - 1) +
                            (pos - start);
            if (n_done < n_total)
                ferry_progress_report("packing experts", pos, est_bytes > pos ? est_bytes : pos,
                                      "bytes");
            if (progress)
                progress(user, n_done, n_total);
        }
    }

    memcpy(header, PACK_MAGIC, 8);
    ferry_put_u32(header + 8, FERRY_PACK_VERSION);
    ferry_put_u32(header + 12, (uint32_t)header_bytes);
    ferry_put_u32(header + 16, (uint32_t)shape->n_layers);
    ferry_put_u32(header + 20, (uint32_t)shape->n_experts);
    ferry_put_u32(header + 24, (uint32_t)shape->d_model);
    ferry_put_u32(header + 28, (uint32_t)shape->d_ff);
    ferry_put_u64(header + 32, pos);
    ferry_put_u64(header + PACK_FINGERPRINT_AT, shape->fingerprint);
    ferry_put_u64(header + PACK_CHECKSUM_AT, header_checksum(header, header_bytes));
    st = ferry_pwrite_all(fd, tmp, header, header_bytes, 0);
    if (st != FERRY_OK)
        goto fail;
    if (fsync(fd) != 0) {
        st = ferry_fail(FERRY_ERR_IO, "%s: fsync failed: %s", tmp, strerror(errno));
        goto fail;
    }
    int rc = close(fd);
    fd = -1;
    if (rc != 0) {
        st = ferry_fail(FERRY_ERR_IO, "%s: close failed: %s", tmp, strerror(errno));
        goto fail;
    }
    if ((st = ferry_temp_commit(&temp, path)))
        goto fail;
    sync_parent(path);
    ferry_progress_report("packing experts", pos, pos, "bytes");
    free(header);
    XXH3_freeState(xs);
    return FERRY_OK;

fail:
    if (fd >= 0)
        close(fd);
    ferry_temp_abort(&temp);
    if (est_bytes) /* reported: end the report */
        ferry_progress_report("packing experts", pos, 0, "bytes");
    free(header);
    if (xs)
        XXH3_freeState(xs);
    return st;
}

/* ---- reader ------------------------------------------------------------------------ */

/* Reads n bytes at offset; returns the count read (short only at end of file) or -errno. */
static int64_t read_at(int fd, void *dst, uint64_t n, uint64_t offset)
{
    uint8_t *p = dst;
    uint64_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, p + got, (size_t)(n - got), (off_t)(offset + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -(int64_t)errno;
        if (r == 0)
            break;
        got += (uint64_t)r;
    }
    return (int64_t)got;
}

/* The magic as printable text for a message ("FERRYPK1", or "\x00\x01..."). */
static void printable_magic(const uint8_t *m, char *out, size_t cap)
{
    size_t used = 0;
    for (int i = 0; i < 8 && used + 5 < cap; i++) {
        if (m[i] >= 0x20 && m[i] < 0x7f && m[i] != '\'' && m[i] != '\\')
            out[used++] = (char)m[i];
        else
            used += (size_t)snprintf(out + used, cap - used, "\\x%02x", m[i]);
    }
    out[used] = 0;
}

/* Checks the shape fields of the header against the expected shape. */
static ferry_status check_expected(const char *path, const ferry_pack_shape *got,
                                   const ferry_pack_shape *want)
{
    static const char *const names[4] = {"n_layers", "n_experts", "d_model", "d_ff"};
    const int32_t g[4] = {got->n_layers, got->n_experts, got->d_model, got->d_ff};
    const int32_t w[4] = {want->n_layers, want->n_experts, want->d_model, want->d_ff};
    for (int i = 0; i < 4; i++)
        if (g[i] != w[i])
            return ferry_fail(FERRY_ERR_FORMAT, "%s: pack holds %s %d, the model has %d (a pack "
                              "of another model?)", path, names[i], g[i], w[i]);
    if (got->fingerprint && want->fingerprint && got->fingerprint != want->fingerprint)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: pack written from another checkpoint of the same "
                          "shape (fingerprint %016llx, the model's %016llx: the routers differ); "
                          "pack this model with ferry pack", path,
                          (unsigned long long)got->fingerprint,
                          (unsigned long long)want->fingerprint);
    return FERRY_OK;
}

/* Decodes and checks the table; fills p->entries and p->max_expert_bytes. */
static ferry_status parse_table(ferry_pack *p, const uint8_t *header, uint64_t header_bytes,
                                uint32_t version)
{
    const ferry_pack_shape *s = &p->shape;
    uint64_t prev_end = header_bytes;
    for (int32_t l = 0; l < s->n_layers; l++) {
        for (int32_t e = 0; e < s->n_experts; e++) {
            uint64_t idx = (uint64_t)l * s->n_experts + e;
            const uint8_t *ent = header + PACK_FIXED_BYTES + PACK_ENTRY_BYTES * idx;
            ferry_pack_entry *pe = &p->entries[idx];
            pe->offset = ferry_get_u64(ent);
            pe->n_bytes = ferry_get_u64(ent + 8);
            pe->checksum = ferry_get_u64(ent + 16);
            uint64_t want = 0;
            for (int w = 0; w < FERRY_PACK_N_PARTS; w++) {
                const char *why = dtype_problem(s, ent[24 + w], version);
                if (why)
                    return ferry_fail(FERRY_ERR_FORMAT, "%s: layer %d expert %d: %s dtype %u %s",
                                      p->path, l, e, part_names[w], ent[24 + w], why);
                pe->dtype[w] = (ferry_dtype)ent[24 + w];
                pe->part_bytes[w] = part_bytes(s, w, pe->dtype[w]);
                want += pe->part_bytes[w];
            }
            if (pe->n_bytes != want)
                return ferry_fail(FERRY_ERR_FORMAT, "%s: layer %d expert %d: %llu bytes, its "
                                  "dtypes %s/%s/%s and d_model %d, d_ff %d imply %llu", p->path,
                                  l, e, (unsigned long long)pe->n_bytes,
                                  ferry_dtype_name(pe->dtype[0]), ferry_dtype_name(pe->dtype[1]),
                                  ferry_dtype_name(pe->dtype[2]), s->d_model, s->d_ff,
                                  (unsigned long long)want);
            if (pe->offset % FERRY_PACK_ALIGN != 0)
                return ferry_fail(FERRY_ERR_FORMAT, "%s: layer %d expert %d: offset %llu is not "
                                  "a multiple of %d", p->path, l, e,
                                  (unsigned long long)pe->offset, FERRY_PACK_ALIGN);
            if (pe->offset < prev_end)
                return ferry_fail(FERRY_ERR_FORMAT, "%s: layer %d expert %d: offset %llu overlaps "
                                  "%s (which ends at %llu)", p->path, l, e,
                                  (unsigned long long)pe->offset,
                                  idx == 0 ? "the header" : "the expert before it",
                                  (unsigned long long)prev_end);
            if (pe->offset > p->file_bytes || pe->n_bytes > p->file_bytes - pe->offset)
                return ferry_fail(FERRY_ERR_FORMAT, "%s: layer %d expert %d: bytes [%llu, %llu) "
                                  "end past the recorded file size %llu", p->path, l, e,
                                  (unsigned long long)pe->offset,
                                  (unsigned long long)(pe->offset + pe->n_bytes),
                                  (unsigned long long)p->file_bytes);
            prev_end = pe->offset + pe->n_bytes;
            if (pe->n_bytes > p->max_expert_bytes)
                p->max_expert_bytes = pe->n_bytes;
        }
    }
    return FERRY_OK;
}

/* The file is shorter than recorded: names the first expert it cuts off. */
static ferry_status report_truncation(const ferry_pack *p, uint64_t size)
{
    int32_t n_total = p->shape.n_layers * p->shape.n_experts;
    for (int32_t i = 0; i < n_total; i++) {
        const ferry_pack_entry *pe = &p->entries[i];
        if (pe->offset + pe->n_bytes > size)
            return ferry_fail(FERRY_ERR_FORMAT, "%s: truncated: layer %d expert %d ends at byte "
                              "%llu, the file has %llu bytes (the header records %llu)", p->path,
                              i / p->shape.n_experts, i % p->shape.n_experts,
                              (unsigned long long)(pe->offset + pe->n_bytes),
                              (unsigned long long)size, (unsigned long long)p->file_bytes);
    }
    return ferry_fail(FERRY_ERR_FORMAT, "%s: truncated: the file has %llu bytes, the header "
                      "records %llu", p->path, (unsigned long long)size,
                      (unsigned long long)p->file_bytes);
}

ferry_status ferry_pack_open(const char *path, const ferry_pack_shape *expect, ferry_pack **out)
{
    if (!path || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_pack_open: NULL argument");

    ferry_status st = FERRY_OK;
    uint8_t *header = NULL;
    ferry_pack *p = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        st = ferry_fail(FERRY_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    const uint64_t size = (uint64_t)sb.st_size;
    if (size < PACK_FIXED_BYTES) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: the file has %llu bytes, shorter than the %u-byte "
                        "pack header", path, (unsigned long long)size, PACK_FIXED_BYTES);
        goto fail;
    }
    uint8_t fixed[PACK_FIXED_BYTES];
    int64_t got = read_at(fd, fixed, PACK_FIXED_BYTES, 0);
    if (got != (int64_t)PACK_FIXED_BYTES) {
        st = ferry_fail(FERRY_ERR_IO, "%s: cannot read the header: %s", path,
                        got < 0 ? strerror((int)-got) : "file shrank while reading");
        goto fail;
    }
    if (memcmp(fixed, PACK_MAGIC, 8) != 0) {
        char shown[40];
        printable_magic(fixed, shown, sizeof shown);
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: not a ferry pack file (magic '%s', expected '%s')",
                        path, shown, PACK_MAGIC);
        goto fail;
    }
    uint32_t version = ferry_get_u32(fixed + 8);
    if (version < 1 || version > FERRY_PACK_VERSION) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: pack format version %u, this build reads 1 to %d",
                        path, version, FERRY_PACK_VERSION);
        goto fail;
    }
    const uint64_t header_bytes = ferry_get_u32(fixed + 12);
    const uint64_t n_layers = ferry_get_u32(fixed + 16), n_experts = ferry_get_u32(fixed + 20);
    /* n_layers x n_experts may be garbage here; the checksum has not been checked yet. */
    if (n_layers == 0 || n_experts == 0 || n_layers * n_experts > PACK_MAX_EXPERTS_TOTAL
        || header_bytes != header_region_bytes(n_layers, n_experts)) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: header region of %llu bytes does not fit %llu "
                        "layers x %llu experts (corrupt header)", path,
                        (unsigned long long)header_bytes, (unsigned long long)n_layers,
                        (unsigned long long)n_experts);
        goto fail;
    }
    if (size < header_bytes) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: the file has %llu bytes, shorter than its %llu-byte "
                        "header", path, (unsigned long long)size,
                        (unsigned long long)header_bytes);
        goto fail;
    }
    header = malloc((size_t)header_bytes);
    if (!header) {
        st = ferry_fail(FERRY_ERR_NOMEM, "%s: no memory for a %llu-byte header", path,
                        (unsigned long long)header_bytes);
        goto fail;
    }
    got = read_at(fd, header, header_bytes, 0);
    if (got != (int64_t)header_bytes) {
        st = ferry_fail(FERRY_ERR_IO, "%s: cannot read the header: %s", path,
                        got < 0 ? strerror((int)-got) : "file shrank while reading");
        goto fail;
    }
    uint64_t stored = ferry_get_u64(header + PACK_CHECKSUM_AT);
    uint64_t computed = header_checksum(header, header_bytes);
    if (stored != computed) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: header checksum mismatch (stored %016llx, computed "
                        "%016llx): the header or expert table is corrupt", path,
                        (unsigned long long)stored, (unsigned long long)computed);
        goto fail;
    }

    p = calloc(1, sizeof *p);
    if (!p || !(p->path = strdup(path))) {
        st = ferry_fail(FERRY_ERR_NOMEM, "%s: no memory", path);
        goto fail;
    }
    const uint32_t d_model = ferry_get_u32(header + 24), d_ff = ferry_get_u32(header + 28);
    p->shape = (ferry_pack_shape){(int32_t)n_layers, (int32_t)n_experts,
                                  d_model > PACK_MAX_DIM ? -1 : (int32_t)d_model,
                                  d_ff > PACK_MAX_DIM ? -1 : (int32_t)d_ff,
                                  ferry_get_u64(header + PACK_FINGERPRINT_AT)};
    const char *bad = shape_problem(&p->shape);
    if (bad) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: %s out of range (n_layers %llu, n_experts %llu, "
                        "d_model %u, d_ff %u)", path, bad, (unsigned long long)n_layers,
                        (unsigned long long)n_experts, d_model, d_ff);
        goto fail;
    }
    if (expect && (st = check_expected(path, &p->shape, expect)) != FERRY_OK)
        goto fail;
    p->file_bytes = ferry_get_u64(header + 32);
    p->entries = calloc((size_t)(n_layers * n_experts), sizeof *p->entries);
    if (!p->entries) {
        st = ferry_fail(FERRY_ERR_NOMEM, "%s: no memory for %llu table entries", path,
                        (unsigned long long)(n_layers * n_experts));
        goto fail;
    }
    if ((st = parse_table(p, header, header_bytes, version)) != FERRY_OK)
        goto fail;
    if (size < p->file_bytes) {
        st = report_truncation(p, size);
        goto fail;
    }
    if (size > p->file_bytes) {
        st = ferry_fail(FERRY_ERR_FORMAT, "%s: the file has %llu bytes, the header records %llu "
                        "(trailing data)", path, (unsigned long long)size,
                        (unsigned long long)p->file_bytes);
        goto fail;
    }
    close(fd);
    free(header);
    *out = p;
    return FERRY_OK;

fail:
    close(fd);
    free(header);
    ferry_pack_close(p);
    return st;
}

void ferry_pack_close(ferry_pack *p)
{
    if (!p)
        return;
    free(p->entries);
    free(p->path);
    free(p);
}

const ferry_pack_entry *ferry_pack_get(const ferry_pack *p, int32_t layer, int32_t expert)
{
    if (!p || layer < 0 || layer >= p->shape.n_layers || expert < 0
        || expert >= p->shape.n_experts)
        return NULL;
    return &p->entries[(int64_t)layer * p->shape.n_experts + expert];
}

const char *ferry_pack_path(const ferry_pack *p) { return p->path; }

ferry_pack_shape ferry_pack_get_shape(const ferry_pack *p) { return p->shape; }

uint64_t ferry_pack_max_expert_bytes(const ferry_pack *p) { return p->max_expert_bytes; }

uint64_t ferry_pack_file_bytes(const ferry_pack *p) { return p->file_bytes; }

ferry_status ferry_pack_verify(const ferry_pack *p, int32_t layer, int32_t expert,
                               const void *bytes)
{
    const ferry_pack_entry *pe = ferry_pack_get(p, layer, expert);
    if (!pe || !bytes)
        return ferry_fail(FERRY_ERR_INVALID, "%s: verify of layer %d expert %d: %s",
                          p ? p->path : "(no pack)", layer, expert,
                          pe ? "NULL bytes" : "no such expert");
    uint64_t h = XXH3_64bits(bytes, (size_t)pe->n_bytes);
    if (h != pe->checksum)
        return ferry_fail(FERRY_ERR_FORMAT, "%s: layer %d expert %d: checksum mismatch (corrupt "
                          "pack file)", p->path, layer, expert);
    return FERRY_OK;
}
