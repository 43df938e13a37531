/*
 * tests/fuzz/fuzz_pack.c: the packed expert file (offload/pack.c, ferry_pack_open), and the
 * expert reads that follow it (offload/reader.c, ferry_pack_verify).
 * Dictionaries: pack.dict
 *
 * Input: one control byte, then the file. The header and every expert carry XXH3 checksums a
 * mutation almost never keeps right, so the control byte lets the fuzzer past them:
 *   bit 0  rewrite each table entry's checksum to match the bytes it covers (those inside
 *          the file), so expert reads verify
 *   bit 1  rewrite the header checksum (when the header size field fits the file), so the
 *          table is parsed
 *   bit 2  open with the shape the header records as the expected one (else none)
 *   bit 3  and expect another fingerprint than the one recorded
 *   bit 4  record the file's size as its file bytes (before the header checksum), so a file
 *          whose experts moved is not refused for its size alone
 *
 * An accepted pack must keep pack.h's promises: the shape as recorded and in range, the file
 * exactly file_bytes long, every entry 4096-aligned, after the header and the entry before
 * it, inside the file, with known dtypes (quantized only in version 2 and for multiples of
 * 32) and part sizes that add up to n_bytes and match the dtypes and shape, and the largest
 * n_bytes as max_expert_bytes. Then each expert (up to a byte budget) is read through
 * ferry_reader, must come back as the file's bytes, and ferry_pack_verify must accept it
 * exactly when its XXH3 matches the entry. A rejected pack must get a message naming the path.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

#include "core/bytes.h"
#include "offload/pack.h"
#include "offload/reader.h"
#include "tests/fuzz/fuzz_util.h"

#define FIXED_BYTES 4096u
#define ENTRY_BYTES 32u
#define FILE_BYTES_AT 32u
#define CHECKSUM_AT 40u
#define FINGERPRINT_AT 48u
#define MAX_ENTRIES (1u << 20)
#define READ_BUDGET (4u << 20) /* bytes of experts read back per input */
#define MAX_READS 64

static uint64_t header_region(uint64_t n_entries)
{
    return (FIXED_BYTES + ENTRY_BYTES * n_entries + FERRY_PACK_ALIGN - 1) / FERRY_PACK_ALIGN *
           FERRY_PACK_ALIGN;
}

/* The header region size the fixed header claims, when it is consistent and inside the file;
 * else 0. */
static uint64_t claimed_header(const uint8_t *f, size_t n)
{
    if (n < FIXED_BYTES)
        return 0;
    uint64_t l = ferry_get_u32(f + 16), e = ferry_get_u32(f + 20);
    if (l == 0 || e == 0 || l * e > MAX_ENTRIES)
        return 0;
    uint64_t h = ferry_get_u32(f + 12);
    return h == header_region(l * e) && h <= n ? h : 0;
}

static void fix_checksums(uint8_t *f, size_t n, unsigned control)
{
    uint64_t h = claimed_header(f, n);
    if (!h)
        return;
    if (control & 16)
        ferry_put_u64(f + FILE_BYTES_AT, n);
    if (control & 1) {
        uint64_t n_entries = (uint64_t)ferry_get_u32(f + 16) * ferry_get_u32(f + 20);
        for (uint64_t i = 0; i < n_entries; i++) {
            uint8_t *ent = f + FIXED_BYTES + ENTRY_BYTES * i;
            uint64_t off = ferry_get_u64(ent), len = ferry_get_u64(ent + 8);
            if (off <= n && len <= n - off)
                ferry_put_u64(ent + 16, XXH3_64bits(f + off, (size_t)len));
        }
    }
    if (control & 2) {
        memset(f + CHECKSUM_AT, 0, 8);
        ferry_put_u64(f + CHECKSUM_AT, XXH3_64bits(f, (size_t)h));
    }
}

static uint64_t expected_part_bytes(const ferry_pack_shape *s, int w, ferry_dtype t)
{
    int64_t rows = w == FERRY_PACK_W2 ? s->d_model : s->d_ff;
    int64_t cols = w == FERRY_PACK_W2 ? s->d_ff : s->d_model;
    return (uint64_t)rows * (uint64_t)ferry_dtype_row_bytes(t, cols);
}

static void check_entries(const ferry_pack *p, const uint8_t *f, size_t n)
{
    ferry_pack_shape s = ferry_pack_get_shape(p);
    uint32_t version = ferry_get_u32(f + 8);
    uint64_t prev_end = header_region((uint64_t)s.n_layers * (uint64_t)s.n_experts);
    uint64_t max_bytes = 0;
    for (int32_t l = 0; l < s.n_layers; l++) {
        for (int32_t e = 0; e < s.n_experts; e++) {
            const ferry_pack_entry *pe = ferry_pack_get(p, l, e);
            FUZZ_CHECK(pe != NULL, "no entry for layer %d expert %d", l, e);
            FUZZ_CHECK(pe->offset % FERRY_PACK_ALIGN == 0 && pe->offset >= prev_end,
                       "layer %d expert %d at %llu (the one before ends at %llu)", l, e,
                       (unsigned long long)pe->offset, (unsigned long long)prev_end);
            FUZZ_CHECK(pe->offset <= n && pe->n_bytes <= n - pe->offset,
                       "layer %d expert %d: [%llu, +%llu) outside the %zu-byte file", l, e,
                       (unsigned long long)pe->offset, (unsigned long long)pe->n_bytes, n);
            uint64_t sum = 0;
            for (int w = 0; w < FERRY_PACK_N_PARTS; w++) {
                ferry_dtype t = pe->dtype[w];
                FUZZ_CHECK((unsigned)t < FERRY_DTYPE_COUNT, "layer %d expert %d dtype %d", l, e,
                           (int)t);
                FUZZ_CHECK(!ferry_dtype_is_quant(t) ||
                               (version >= 2 && s.d_model % FERRY_QUANT_GROUP == 0 &&
                                s.d_ff % FERRY_QUANT_GROUP == 0),
                           "layer %d expert %d: quantized part in version %u, d_model %d, "
                           "d_ff %d", l, e, version, s.d_model, s.d_ff);
                FUZZ_CHECK(pe->part_bytes[w] == expected_part_bytes(&s, w, t),
                           "layer %d expert %d part %d: %llu bytes", l, e, w,
                           (unsigned long long)pe->part_bytes[w]);
                sum += pe->part_bytes[w];
            }
            FUZZ_CHECK(sum == pe->n_bytes && sum > 0, "layer %d expert %d: parts %llu, "
                       "n_bytes %llu", l, e, (unsigned long long)sum,
                       (unsigned long long)pe->n_bytes);
            prev_end = pe->offset + pe->n_bytes;
            if (pe->n_bytes > max_bytes)
                max_bytes = pe->n_bytes;
        }
    }
    FUZZ_CHECK(ferry_pack_max_expert_bytes(p) == max_bytes, "max_expert_bytes %llu, largest "
               "%llu", (unsigned long long)ferry_pack_max_expert_bytes(p),
               (unsigned long long)max_bytes);
    FUZZ_CHECK(ferry_pack_get(p, s.n_layers, 0) == NULL && ferry_pack_get(p, 0, s.n_experts) ==
                   NULL && ferry_pack_get(p, -1, 0) == NULL && ferry_pack_get(p, 0, -1) == NULL,
               "entries out of range");
}

/* Reads experts back through the reader and verifies them against their checksums. */
static void read_experts(const ferry_pack *p, const char *path, const uint8_t *f)
{
    ferry_pack_shape s = ferry_pack_get_shape(p);
    size_t cap = (size_t)((ferry_pack_max_expert_bytes(p) + FERRY_READER_ALIGN - 1) /
                          FERRY_READER_ALIGN * FERRY_READER_ALIGN);
    if (cap > READ_BUDGET)
        return;
    ferry_reader *r = NULL;
    ferry_status st = ferry_reader_create(path, FERRY_READER_AUTO, 4, NULL, 0, &r);
    FUZZ_CHECK(st == FERRY_OK, "reader on an open pack: %s", ferry_last_error());
    uint8_t *dst = aligned_alloc(FERRY_READER_ALIGN, cap);
    if (!dst)
        fuzz_setup_failed("aligned_alloc");
    uint64_t budget = READ_BUDGET;
    int32_t n_total = s.n_layers * s.n_experts;
    for (int32_t i = 0; i < n_total && i < MAX_READS; i++) {
        int32_t l = i / s.n_experts, e = i % s.n_experts;
        const ferry_pack_entry *pe = ferry_pack_get(p, l, e);
        if (pe->n_bytes > budget)
            break;
        budget -= pe->n_bytes;
        st = ferry_reader_submit(r, pe->offset, (size_t)pe->n_bytes, dst, (uint64_t)i);
        FUZZ_CHECK(st == FERRY_OK, "submit of layer %d expert %d: %s", l, e, ferry_last_error());
        uint64_t tag = 0;
        ferry_status result = FERRY_OK;
        int done = 0;
        st = ferry_reader_wait(r, -1, &tag, &result, &done);
        FUZZ_CHECK(st == FERRY_OK && done && tag == (uint64_t)i && result == FERRY_OK,
                   "read of layer %d expert %d [%llu, +%llu): %s", l, e,
                   (unsigned long long)pe->offset, (unsigned long long)pe->n_bytes,
                   ferry_last_error());
        FUZZ_CHECK(memcmp(dst, f + pe->offset, (size_t)pe->n_bytes) == 0,
                   "layer %d expert %d read other bytes than the file's", l, e);
        int match = XXH3_64bits(dst, (size_t)pe->n_bytes) == pe->checksum;
        st = ferry_pack_verify(p, l, e, dst);
        FUZZ_CHECK(match ? st == FERRY_OK : st == FERRY_ERR_FORMAT,
                   "verify of layer %d expert %d gave %s, checksum %s", l, e,
                   ferry_status_name(st), match ? "matches" : "differs");
    }
    free(dst);
    ferry_reader_destroy(r);
}

FUZZ_INITIALIZE_QUIET()

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    unsigned control = data[0];
    size_t n = size - 1;
    uint8_t *f = malloc(n ? n : 1);
    if (!f)
        fuzz_setup_failed("malloc");
    memcpy(f, data + 1, n);
    fix_checksums(f, n, control);

    ferry_pack_shape want, *expect = NULL;
    if ((control & 4) && n >= FIXED_BYTES) {
        want = (ferry_pack_shape){(int32_t)ferry_get_u32(f + 16), (int32_t)ferry_get_u32(f + 20),
                                  (int32_t)ferry_get_u32(f + 24), (int32_t)ferry_get_u32(f + 28),
                                  ferry_get_u64(f + FINGERPRINT_AT)};
        if (control & 8)
            want.fingerprint = ~want.fingerprint;
        expect = &want;
    }
    char path[64];
    int fd = fuzz_memfd(f, n, path, sizeof path);
    ferry_pack *p = NULL;
    ferry_status st = ferry_pack_open(path, expect, &p);
    if (st != FERRY_OK) {
        FUZZ_CHECK(p == NULL, "a failed open wrote its output");
        fuzz_check_rejection(st, path);
    } else {
        ferry_pack_shape s = ferry_pack_get_shape(p);
        FUZZ_CHECK(s.n_layers == (int32_t)ferry_get_u32(f + 16) &&
                       s.n_experts == (int32_t)ferry_get_u32(f + 20) &&
                       s.d_model == (int32_t)ferry_get_u32(f + 24) &&
                       s.d_ff == (int32_t)ferry_get_u32(f + 28) &&
                       s.fingerprint == ferry_get_u64(f + FINGERPRINT_AT),
                   "shape differs from the header");
        FUZZ_CHECK(s.n_layers >= 1 && s.n_experts >= 1 && s.d_model >= 1 && s.d_ff >= 1 &&
                       (uint64_t)s.n_layers * (uint64_t)s.n_experts <= MAX_ENTRIES,
                   "shape out of range: %d x %d, %d, %d", s.n_layers, s.n_experts, s.d_model,
                   s.d_ff);
        FUZZ_CHECK(!expect || !expect->fingerprint || !s.fingerprint ||
                       expect->fingerprint == s.fingerprint,
                   "another checkpoint's pack was accepted");
        FUZZ_CHECK(ferry_pack_file_bytes(p) == n, "file_bytes %llu, the file has %zu",
                   (unsigned long long)ferry_pack_file_bytes(p), n);
        FUZZ_CHECK(strcmp(ferry_pack_path(p), path) == 0, "path '%s'", ferry_pack_path(p));
        check_entries(p, f, n);
        read_experts(p, path, f);
        ferry_pack_close(p);
    }
    close(fd);
    free(f);
    return 0;
}
