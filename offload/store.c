/*
 * offload/store.c: the expert store's tiers (see store.h).
 *
 * RAM tier: one NUMA-local host buffer with every expert at a fixed offset, filled once at
 * creation; get/put only hand out pointers.
 * NVMe tier: a host cache of n_buffers expert-sized buffers (4 KiB-aligned for O_DIRECT,
 * registered with io_uring as one region), each holding one expert or nothing, evicted
 * least recently used among those no get holds. A miss reads the expert through the
 * reader, verifies its checksum, and only then publishes it to other getters.
 */
#include "offload/store.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/clock.h"
#include "core/error.h"
#include "offload/pack.h"
#include "offload/reader.h"
#include "offload/topology.h"

#define FERRY_PAGE 4096

typedef struct {
    int32_t key;   /* layer * n_experts + expert, or -1 */
    int32_t refs;  /* gets holding it */
    int loading;   /* a read is in flight */
    int failed;    /* the last read failed: the next get retries */
    uint64_t last_use;
} host_buf;

struct ferry_store {
    ferry_tier tier;
    int32_t n_layers, n_experts;
    ferry_expert_layout *layouts; /* (n_layers * n_experts) */
    size_t max_expert_bytes;

    /* RAM tier */
    char *ram;
    size_t ram_bytes;
    size_t *offsets; /* (n_layers * n_experts) */

    /* NVMe tier */
    ferry_pack *pack;
    ferry_reader *reader;
    char *cache_mem;
    size_t cache_bytes, buf_bytes;
    host_buf *bufs;
    int32_t n_bufs;
    int32_t *where; /* (n_layers * n_experts) buffer index or -1 */
    uint64_t clock;
    pthread_mutex_t mu;
    pthread_mutex_t read_mu; /* one reader waiter at a time */
    pthread_cond_t changed;
    ferry_store_stats stats;
    uint64_t *layer_disk; /* (n_layers) bytes read */
};

static ferry_store *store_new(ferry_tier tier, int32_t n_layers, int32_t n_experts)
{
    if (n_layers <= 0 || n_experts <= 0)
        return NULL;
    ferry_store *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->tier = tier;
    s->n_layers = n_layers;
    s->n_experts = n_experts;
    size_t n = (size_t)n_layers * (size_t)n_experts;
    s->layouts = calloc(n, sizeof *s->layouts);
    s->offsets = calloc(n, sizeof *s->offsets);
    s->layer_disk = calloc((size_t)n_layers, sizeof *s->layer_disk);
    pthread_mutex_init(&s->mu, NULL);
    pthread_mutex_init(&s->read_mu, NULL);
    pthread_cond_init(&s->changed, NULL);
    if (!s->layouts || !s->offsets || !s->layer_disk) {
        ferry_store_destroy(s);
        return NULL;
    }
    return s;
}

ferry_status ferry_store_create_ram(int32_t n_layers, int32_t n_experts, ferry_expert_source_fn src,
                                    void *user, ferry_store **out)
{
    ferry_store *s = store_new(FERRY_TIER_RAM, n_layers, n_experts);
    if (!s)
        return ferry_fail(n_layers <= 0 || n_experts <= 0 ? FERRY_ERR_INVALID : FERRY_ERR_NOMEM,
                          "expert store: %d layers x %d experts", (int)n_layers, (int)n_experts);
    ferry_status st;
    const void *parts[3];
    size_t total = 0;
    for (int32_t l = 0; l < n_layers; l++)
        for (int32_t e = 0; e < n_experts; e++) {
            size_t i = (size_t)l * (size_t)n_experts + (size_t)e;
            if ((st = src(user, l, e, parts, &s->layouts[i])))
                goto fail;
            size_t bytes = ferry_expert_layout_bytes(&s->layouts[i]);
            s->offsets[i] = total;
            total += (bytes + 255) / 256 * 256;
            if (bytes > s->max_expert_bytes)
                s->max_expert_bytes = bytes;
        }
    if ((st = ferry_host_alloc(total, (void **)&s->ram)))
        goto fail;
    s->ram_bytes = total;
    for (int32_t l = 0; l < n_layers; l++)
        for (int32_t e = 0; e < n_experts; e++) {
            size_t i = (size_t)l * (size_t)n_experts + (size_t)e;
            ferry_expert_layout layout;
            if ((st = src(user, l, e, parts, &layout)))
                goto fail;
            char *dst = s->ram + s->offsets[i];
            for (int k = 0; k < 3; k++) {
                memcpy(dst, parts[k], layout.part_bytes[k]);
                dst += layout.part_bytes[k];
            }
        }
    *out = s;
    return FERRY_OK;
fail:
    ferry_store_destroy(s);
    return st;
}

ferry_status ferry_store_create_nvme(const ferry_store_nvme_params *p, ferry_store **out)
{
    if (!p || !p->pack_path)
        return ferry_fail(FERRY_ERR_INVALID, "NVMe tier: no pack file given (--pack FILE)");
    ferry_store *s = store_new(FERRY_TIER_NVME, p->n_layers, p->n_experts);
    if (!s)
        return ferry_fail(FERRY_ERR_NOMEM, "expert store: out of memory");
    ferry_status st;
    ferry_pack_shape shape = {p->n_layers, p->n_experts, p->d_model, p->d_ff, p->fingerprint};
    if ((st = ferry_pack_open(p->pack_path, &shape, &s->pack)))
        goto fail;
    for (int32_t l = 0; l < p->n_layers; l++)
        for (int32_t e = 0; e < p->n_experts; e++) {
            const ferry_pack_entry *en = ferry_pack_get(s->pack, l, e);
            ferry_expert_layout *lay = &s->layouts[(size_t)l * (size_t)p->n_experts + (size_t)e];
            for (int k = 0; k < 3; k++) {
                lay->part_bytes[k] = (size_t)en->part_bytes[k];
                lay->dtype[k] = en->dtype[k];
            }
            if (ferry_expert_layout_bytes(lay) > s->max_expert_bytes)
                s->max_expert_bytes = ferry_expert_layout_bytes(lay);
        }
    s->buf_bytes = (s->max_expert_bytes + FERRY_PAGE - 1) / FERRY_PAGE * FERRY_PAGE;
    s->n_bufs = (int32_t)(p->host_cache_bytes / s->buf_bytes);
    if (s->n_bufs < 1) {
        st = ferry_fail(FERRY_ERR_INVALID, "host cache of %zu bytes cannot hold one expert (%zu "
                        "bytes)", p->host_cache_bytes, s->buf_bytes);
        goto fail;
    }
    if (s->n_bufs > p->n_layers * p->n_experts)
        s->n_bufs = p->n_layers * p->n_experts;
    s->cache_bytes = (size_t)s->n_bufs * s->buf_bytes;
    s->bufs = calloc((size_t)s->n_bufs, sizeof *s->bufs);
    s->where = malloc((size_t)p->n_layers * (size_t)p->n_experts * sizeof *s->where);
    if (!s->bufs || !s->where) {
        st = ferry_fail(FERRY_ERR_NOMEM, "expert store: out of memory");
        goto fail;
    }
    for (int32_t i = 0; i < s->n_bufs; i++)
        s->bufs[i].key = -1;
    for (int32_t i = 0; i < p->n_layers * p->n_experts; i++)
        s->where[i] = -1;
    if ((st = ferry_host_alloc(s->cache_bytes, (void **)&s->cache_mem)))
        goto fail;
    if ((st = ferry_reader_create(p->pack_path, (ferry_reader_mode)p->reader_mode, 32,
                                  s->cache_mem, s->cache_bytes, &s->reader)))
        goto fail;
    s->stats.uses_uring = ferry_reader_uses_uring(s->reader);
    *out = s;
    return FERRY_OK;
fail:
    ferry_store_destroy(s);
    return st;
}

void ferry_store_destroy(ferry_store *s)
{
    if (!s)
        return;
    ferry_reader_destroy(s->reader);
    ferry_pack_close(s->pack);
    ferry_host_free(s->cache_mem, s->cache_bytes);
    ferry_host_free(s->ram, s->ram_bytes);
    free(s->bufs);
    free(s->where);
    free(s->layouts);
    free(s->offsets);
    free(s->layer_disk);
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->read_mu);
    pthread_cond_destroy(&s->changed);
    free(s);
}

ferry_tier ferry_store_tier(const ferry_store *s) { return s->tier; }

void ferry_store_host_memory(const ferry_store *s, void **h, size_t *n_bytes)
{
    *h = s->tier == FERRY_TIER_RAM ? (void *)s->ram : (void *)s->cache_mem;
    *n_bytes = s->tier == FERRY_TIER_RAM ? s->ram_bytes : s->cache_bytes;
}

const ferry_expert_layout *ferry_store_layout(const ferry_store *s, int32_t layer, int32_t expert)
{
    return &s->layouts[(size_t)layer * (size_t)s->n_experts + (size_t)expert];
}

size_t ferry_store_max_expert_bytes(const ferry_store *s) { return s->max_expert_bytes; }

/* Reads expert key into buffer b and verifies it; called without s->mu held. */
static ferry_status read_expert(ferry_store *s, int32_t layer, int32_t expert, int32_t b)
{
    const ferry_pack_entry *en = ferry_pack_get(s->pack, layer, expert);
    char *dst = s->cache_mem + (size_t)b * s->buf_bytes;
    size_t n = (size_t)en->n_bytes;
    double t0 = ferry_now_seconds();
    uint64_t tag = ((uint64_t)(uint32_t)layer << 32) | (uint32_t)expert;
    ferry_status st, result = FERRY_OK;
    /* one request at a time per store keeps the tag matching simple; each request is split
     * into many chunks in flight by the reader */
    pthread_mutex_lock(&s->read_mu);
    st = ferry_reader_submit(s->reader, en->offset, n, dst, tag);
    uint64_t got = 0;
    int completed = 0;
    if (st == FERRY_OK)
        st = ferry_reader_wait(s->reader, -1, &got, &result, &completed);
    pthread_mutex_unlock(&s->read_mu);
    if (st == FERRY_OK)
        st = result;
    if (st == FERRY_OK && got != tag)
        st = ferry_fail(FERRY_ERR_IO, "%s: reader returned request %llu, expected %llu",
                        ferry_pack_path(s->pack), (unsigned long long)got,
                        (unsigned long long)tag);
    if (st == FERRY_OK)
        st = ferry_pack_verify(s->pack, layer, expert, dst);
    pthread_mutex_lock(&s->mu);
    s->stats.disk_seconds += ferry_now_seconds() - t0;
    if (st == FERRY_OK) {
        s->stats.disk_bytes += n;
        s->layer_disk[layer] += n;
        s->stats.disk_reads++;
    }
    pthread_mutex_unlock(&s->mu);
    return st;
}

ferry_status ferry_store_get(ferry_store *s, int32_t layer, int32_t expert, const void **bytes)
{
    if (layer < 0 || layer >= s->n_layers || expert < 0 || expert >= s->n_experts)
        return ferry_fail(FERRY_ERR_INVALID, "expert store: no layer %d expert %d", (int)layer,
                          (int)expert);
    size_t key = (size_t)layer * (size_t)s->n_experts + (size_t)expert;
    if (s->tier == FERRY_TIER_RAM) {
        *bytes = s->ram + s->offsets[key];
        return FERRY_OK;
    }
    pthread_mutex_lock(&s->mu);
    for (;;) {
        int32_t b = s->where[key];
        if (b >= 0 && s->bufs[b].loading) {
            pthread_cond_wait(&s->changed, &s->mu);
            continue;
        }
        if (b >= 0 && !s->bufs[b].failed) {
            s->bufs[b].refs++;
            s->bufs[b].last_use = ++s->clock;
            s->stats.host_hits++;
            *bytes = s->cache_mem + (size_t)b * s->buf_bytes;
            pthread_mutex_unlock(&s->mu);
            return FERRY_OK;
        }
        /* a miss (or a retry after a failed read): take the least recently used free buffer */
        int32_t victim = b >= 0 && s->bufs[b].refs == 0 ? b : -1; /* retry in place */
        for (int32_t i = 0; b < 0 && i < s->n_bufs; i++)
            if (s->bufs[i].refs == 0 && !s->bufs[i].loading &&
                (victim < 0 || s->bufs[i].last_use < s->bufs[victim].last_use))
                victim = i;
        if (victim < 0 && b >= 0) {
            /* a failed read still held by an earlier getter: wait for its put */
            pthread_cond_wait(&s->changed, &s->mu);
            continue;
        }
        if (victim < 0) {
            pthread_mutex_unlock(&s->mu);
            return ferry_fail(FERRY_ERR_NOMEM, "host expert cache: all %d buffers are in use",
                              (int)s->n_bufs);
        }
        if (s->bufs[victim].key >= 0 && s->where[s->bufs[victim].key] == victim)
            s->where[s->bufs[victim].key] = -1;
        s->bufs[victim] = (host_buf){(int32_t)key, 1, 1, 0, ++s->clock};
        s->where[key] = victim;
        pthread_mutex_unlock(&s->mu);

        ferry_status st = read_expert(s, layer, expert, victim);

        pthread_mutex_lock(&s->mu);
        s->bufs[victim].loading = 0;
        pthread_cond_broadcast(&s->changed);
        if (st != FERRY_OK) {
            s->bufs[victim].failed = 1;
            s->bufs[victim].refs--;
            pthread_mutex_unlock(&s->mu);
            return st;
        }
        *bytes = s->cache_mem + (size_t)victim * s->buf_bytes;
        pthread_mutex_unlock(&s->mu);
        return FERRY_OK;
    }
}

void ferry_store_put(ferry_store *s, int32_t layer, int32_t expert)
{
    if (s->tier == FERRY_TIER_RAM)
        return;
    size_t key = (size_t)layer * (size_t)s->n_experts + (size_t)expert;
    pthread_mutex_lock(&s->mu);
    int32_t b = s->where[key];
    if (b >= 0 && s->bufs[b].refs > 0 && --s->bufs[b].refs == 0)
        pthread_cond_broadcast(&s->changed);
    pthread_mutex_unlock(&s->mu);
}

void ferry_store_get_stats(const ferry_store *s, ferry_store_stats *out)
{
    ferry_store *m = (ferry_store *)s;
    pthread_mutex_lock(&m->mu);
    *out = s->stats;
    pthread_mutex_unlock(&m->mu);
}

void ferry_store_layer_disk_bytes(const ferry_store *s, uint64_t *out)
{
    ferry_store *m = (ferry_store *)s;
    pthread_mutex_lock(&m->mu);
    memcpy(out, s->layer_disk, (size_t)s->n_layers * sizeof *out);
    pthread_mutex_unlock(&m->mu);
}
