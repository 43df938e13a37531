/*
 * offload/store.h: where experts live when they are not in a device slot.
 *
 * Every expert is one contiguous block [w1 | w3 | w2] (w1 and w3: d_ff x d_model, w2:
 * d_model x d_ff, each in its checkpoint dtype), the layout of a device slot and of the
 * packed expert file. Tiers:
 * - RAM: every expert copied once into host memory (NUMA-local; pinned when a GPU backend
 *   registers it), read in place.
 * - NVMe: experts read from a pack file (offload/pack.h) through the reader
 *   (offload/reader.h), verified against their checksums, into a host-RAM cache of
 *   configurable size (device slots, then host cache, then disk).
 * ferry_store_get may be called from several threads; the bytes it returns stay valid and
 * unchanged until the matching ferry_store_put.
 */
#ifndef FERRY_OFFLOAD_STORE_H
#define FERRY_OFFLOAD_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "ferry.h"
#include "kernels/dtype.h"

typedef struct {
    size_t part_bytes[3]; /* w1, w3, w2 */
    ferry_dtype dtype[3];
} ferry_expert_layout;

static inline size_t ferry_expert_layout_bytes(const ferry_expert_layout *l)
{
    return l->part_bytes[0] + l->part_bytes[1] + l->part_bytes[2];
}

/* Gives the three matrices of one expert (host pointers, valid while the store is built)
 * and their layout. */
typedef ferry_status (*ferry_expert_source_fn)(void *user, int32_t layer, int32_t expert,
                                               const void *parts[3], ferry_expert_layout *layout);

typedef enum { FERRY_TIER_RAM = 0, FERRY_TIER_NVME = 1 } ferry_tier;

typedef struct ferry_store ferry_store;

/* Builds the RAM tier: copies every expert from src into host memory. On success *out owns
 * the store. FERRY_ERR_NOMEM naming the size, or the source's error. */
ferry_status ferry_store_create_ram(int32_t n_layers, int32_t n_experts, ferry_expert_source_fn src,
                                    void *user, ferry_store **out);

typedef struct {
    const char *pack_path;
    int32_t n_layers, n_experts, d_model, d_ff; /* the model the pack must match */
    uint64_t fingerprint;                       /* of the model's checkpoint; 0: unchecked */
    size_t host_cache_bytes;                    /* RAM in front of the disk; at least one expert */
    int32_t reader_mode;                        /* ferry_reader_mode */
} ferry_store_nvme_params;

/* Opens the NVMe tier over a pack file. FERRY_ERR_IO, FERRY_ERR_FORMAT (the pack does not
 * match the model, or is corrupt: the message names what), FERRY_ERR_INVALID (a host cache
 * smaller than one expert), FERRY_ERR_NOMEM. */
ferry_status ferry_store_create_nvme(const ferry_store_nvme_params *p, ferry_store **out);

/* Frees the store. NULL-safe. No get may be outstanding. */
void ferry_store_destroy(ferry_store *s);

ferry_tier ferry_store_tier(const ferry_store *s);

/* The one block of host memory every copy to the device reads from (the RAM tier's experts,
 * the NVMe tier's host cache), for the backend to pin. */
void ferry_store_host_memory(const ferry_store *s, void **h, size_t *n_bytes);

/* The layout of one expert. */
const ferry_expert_layout *ferry_store_layout(const ferry_store *s, int32_t layer, int32_t expert);

/* The largest expert in bytes (the size of a device slot). */
size_t ferry_store_max_expert_bytes(const ferry_store *s);

/* Host memory holding the expert's bytes; blocks while they are read from disk. Valid until
 * ferry_store_put. FERRY_ERR_IO / FERRY_ERR_FORMAT (read failure, checksum mismatch: the
 * message names the layer and expert), FERRY_ERR_NOMEM (every host cache buffer is held).
 * Thread-safe. */
ferry_status ferry_store_get(ferry_store *s, int32_t layer, int32_t expert, const void **bytes);

/* Ends a ferry_store_get. Thread-safe. */
void ferry_store_put(ferry_store *s, int32_t layer, int32_t expert);

typedef struct {
    uint64_t disk_bytes;     /* read from the pack file */
    uint64_t disk_reads;     /* experts read */
    uint64_t host_hits;      /* NVMe tier: gets served by the host cache */
    double disk_seconds;     /* time spent waiting for reads */
    int uses_uring;          /* NVMe tier: io_uring (1) or the pread fallback (0) */
} ferry_store_stats;

void ferry_store_get_stats(const ferry_store *s, ferry_store_stats *out);

/* Bytes read from disk for each layer's experts: out[n_layers]. */
void ferry_store_layer_disk_bytes(const ferry_store *s, uint64_t *out);

#endif
