/*
 * engine/model.c: opening a checkpoint directory and binding its tensors (see model.h),
 * plus the public model-level calls (info, tokenize, detokenize).
 *
 * Tensor names are the Hugging Face Mixtral names:
 *   model.embed_tokens.weight                                     (vocab, hidden)
 *   model.layers.N.input_layernorm.weight                         (hidden)
 *   model.layers.N.self_attn.{q,k,v,o}_proj.weight
 *   model.layers.N.post_attention_layernorm.weight                (hidden)
 *   model.layers.N.block_sparse_moe.gate.weight                   (experts, hidden)
 *   model.layers.N.block_sparse_moe.experts.E.{w1,w3}.weight      (ffn, hidden)
 *   model.layers.N.block_sparse_moe.experts.E.w2.weight           (hidden, ffn)
 *   model.norm.weight                                             (hidden)
 *   lm_head.weight                                                (vocab, hidden), absent when tied
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "core/bytes.h"
#include "core/error.h"
#include "core/progress.h"
#include "engine/model.h"
#include "engine/hybrid.h"
#include "engine/quantize.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/quant.h"
#include "offload/pack.h"
#include "offload/reader.h"
#include "offload/topology.h"

ferry_model_params ferry_model_params_default(void)
{
    ferry_model_params p = {.n_threads = 0,
                            .backend = FERRY_BACKEND_AUTO,
                            .gpu_mem_bytes = 0,
                            .offload = FERRY_OFFLOAD_RAM,
                            .pack_path = NULL,
                            .host_cache_bytes = 0,
                            .reader = FERRY_READ_AUTO,
                            .policy = FERRY_CACHE_LRU,
                            .prefetch = 1,
                            .predictor = FERRY_PREDICT_GATE,
                            .predictor_stats_path = NULL,
                            .lookahead = 1,
                            .max_slots = 0,
                            .hybrid = FERRY_HYBRID_AUTO,
                            .cpu_kernels = FERRY_CPU_KERNELS_AUTO,
                            .quant_dense = FERRY_PACK_AS_STORED};
    return p;
}

#define FERRY_DEFAULT_HOST_CACHE (1ull << 30)
#define MIB(x) ((double)(x) / (1024.0 * 1024.0))

static ferry_status check_offload_params(const ferry_model_params *p)
{
    if (p->gpu_mem_bytes == 0)
        return FERRY_OK;
    if (p->offload != FERRY_OFFLOAD_RAM && p->offload != FERRY_OFFLOAD_NVME)
        return ferry_fail(FERRY_ERR_INVALID, "offload tier %d is neither ram (0) nor nvme (1)",
                          (int)p->offload);
    if (p->policy < FERRY_CACHE_LRU || p->policy > FERRY_CACHE_PREDICTED)
        return ferry_fail(FERRY_ERR_INVALID, "cache policy %d is not one of 0..3", (int)p->policy);
    if (p->reader < FERRY_READ_AUTO || p->reader > FERRY_READ_PREAD)
        return ferry_fail(FERRY_ERR_INVALID, "reader %d is not one of 0..2", (int)p->reader);
    if (p->predictor < FERRY_PREDICT_RECENCY || p->predictor > FERRY_PREDICT_COMBINED)
        return ferry_fail(FERRY_ERR_INVALID, "predictor %d is not one of 0..3", (int)p->predictor);
    if ((p->predictor == FERRY_PREDICT_STATS || p->predictor == FERRY_PREDICT_COMBINED) &&
        (!p->predictor_stats_path || !p->predictor_stats_path[0]))
        return ferry_fail(FERRY_ERR_INVALID, "the stats and combined predictors need a "
                                             "statistics file (--predictor-stats FILE, written by "
                                             "ferry predictor fit)");
    if (p->lookahead < 1 || p->lookahead > 3)
        return ferry_fail(FERRY_ERR_INVALID, "lookahead %d is not in 1..3", (int)p->lookahead);
    if (p->max_slots < 0)
        return ferry_fail(FERRY_ERR_INVALID, "slot count %d must be >= 0", (int)p->max_slots);
    return FERRY_OK;
}

/* --cpu-kernels passes straight through to the CPU backend's kernel choice */
_Static_assert((int)FERRY_CPU_KERNELS_AUTO == (int)FERRY_CPU_ISA_AUTO &&
                   (int)FERRY_CPU_KERNELS_REFERENCE == (int)FERRY_CPU_ISA_REFERENCE &&
                   (int)FERRY_CPU_KERNELS_AVX2 == (int)FERRY_CPU_ISA_AVX2 &&
                   (int)FERRY_CPU_KERNELS_AVX512 == (int)FERRY_CPU_ISA_AVX512 &&
                   (int)FERRY_CPU_KERNELS_AVX512BF16 == (int)FERRY_CPU_ISA_AVX512BF16,
               "ferry_cpu_kernels_id and ferry_cpu_isa must agree");

static ferry_status check_hybrid_params(const ferry_model_params *p)
{
    if (p->hybrid < FERRY_HYBRID_AUTO || p->hybrid > FERRY_HYBRID_CPU_EXPERTS)
        return ferry_fail(FERRY_ERR_INVALID, "hybrid mode %d is not auto (0), off (1) or "
                          "cpu-experts (2)", (int)p->hybrid);
    if (p->cpu_kernels < FERRY_CPU_KERNELS_AUTO || p->cpu_kernels > FERRY_CPU_KERNELS_AVX512BF16)
        return ferry_fail(FERRY_ERR_INVALID, "CPU kernel set %d is not one of 0..4",
                          (int)p->cpu_kernels);
    if (p->quant_dense != FERRY_PACK_AS_STORED && p->quant_dense != FERRY_PACK_Q8 &&
        p->quant_dense != FERRY_PACK_Q4)
        return ferry_fail(FERRY_ERR_INVALID, "dense weight format %d is not as-stored (0), q8 "
                          "(1) or q4 (2)", (int)p->quant_dense);
    if (p->hybrid == FERRY_HYBRID_CPU_EXPERTS && p->gpu_mem_bytes > 0 &&
        p->offload == FERRY_OFFLOAD_NVME)
        return ferry_fail(FERRY_ERR_INVALID, "--hybrid cpu-experts computes the experts where "
                          "the checkpoint is mapped in RAM; it does not combine with --offload "
                          "nvme");
    return FERRY_OK;
}

/* The RAM tier's source: the experts' host tensors. It reports "copying experts" as it is
 * asked for them, in bytes before the expert asked for (the store asks in order, once to
 * size them and once to copy them: each pass counts from 0); the caller reports the end. */
static ferry_status expert_source(void *user, int32_t layer, int32_t expert, const void *parts[3],
                                  ferry_expert_layout *layout)
{
    const ferry_model *m = user;
    const ferry_expert_weights *X = &m->moe[layer].experts[expert];
    const ferry_weight *w[3] = {&X->w1, &X->w3, &X->w2};
    for (int k = 0; k < 3; k++) {
        parts[k] = w[k]->d_data;
        layout->dtype[k] = w[k]->dtype;
        layout->part_bytes[k] = (size_t)w[k]->rows * ferry_dtype_row_bytes(w[k]->dtype, w[k]->cols);
    }
    uint64_t n_total = (uint64_t)m->cfg.n_moe_layers * (uint64_t)m->cfg.n_experts;
    uint64_t i = (uint64_t)layer * (uint64_t)m->cfg.n_experts + (uint64_t)expert;
    uint64_t one = ferry_expert_layout_bytes(layout);
    ferry_progress_report("copying experts", i * one, n_total * one, "bytes");
    return FERRY_OK;
}

ferry_status ferry_model_pack_shape(const ferry_model *m, ferry_pack_shape *out)
{
    const ferry_config *c = &m->cfg;
    ferry_pack_shape s = {c->n_moe_layers, c->n_experts, c->hidden_size, c->intermediate_size, 0};
    uint8_t head[16];
    ferry_put_u32(head, (uint32_t)s.n_layers);
    ferry_put_u32(head + 4, (uint32_t)s.n_experts);
    ferry_put_u32(head + 8, (uint32_t)s.d_model);
    ferry_put_u32(head + 12, (uint32_t)s.d_ff);
    XXH3_state_t *h = XXH3_createState();
    char *raw = malloc((size_t)s.d_model * sizeof(float)); /* a row of the widest dtype */
    float *row = malloc((size_t)s.d_model * sizeof *row);
    ferry_status st = FERRY_OK;
    if (!h || !raw || !row) {
        st = ferry_fail(FERRY_ERR_NOMEM, "out of memory");
        goto done;
    }
    XXH3_64bits_reset(h);
    XXH3_64bits_update(h, head, sizeof head);
    for (int32_t l = 0; l < s.n_layers && !st; l++) {
        char name[256];
        snprintf(name, sizeof name, c->arch->router, (int)c->moe_layer[l]);
        const int64_t shape[2] = {s.n_experts, s.d_model};
        const ferry_st_tensor *t;
        ferry_dtype dt;
        if ((st = ferry_st_get(m->st, name, 2, shape, &t, &dt)))
            break;
        size_t rb = (size_t)s.d_model * ferry_dtype_size(dt);
        ferry_weight w = {.d_data = raw, .dtype = dt, .rows = 1, .cols = s.d_model};
        for (int32_t e = 0; e < s.n_experts; e++) {
            memcpy(raw, (const char *)t->data + (size_t)e * rb, rb); /* may be misaligned */
            ferry_cpu_widen(row, &w, 0, 0, s.d_model);
            XXH3_64bits_update(h, row, (size_t)s.d_model * sizeof *row);
        }
    }
    s.fingerprint = XXH3_64bits_digest(h);
    s.fingerprint += s.fingerprint == 0;
    *out = s;
done:
    XXH3_freeState(h);
    free(raw);
    free(row);
    return st;
}

ferry_status ferry_model_pack_source(void *user, int32_t layer, int32_t expert, int32_t which,
                                     const void **data, ferry_dtype *dtype)
{
    const ferry_model *m = user;
    const ferry_expert_weights *X = &m->moe[layer].experts[expert];
    const ferry_weight *w = which == FERRY_PACK_W1 ? &X->w1 : which == FERRY_PACK_W3 ? &X->w3 : &X->w2;
    *data = w->d_data;
    *dtype = w->dtype;
    return FERRY_OK;
}

/* Whether the pack at path exists and is no older than every shard of the checkpoint. */
static int pack_is_fresh(const ferry_model *m, const char *path)
{
    struct stat ps;
    if (stat(path, &ps) != 0)
        return 0;
    for (int32_t i = 0; i < ferry_st_file_count(m->st); i++) {
        struct stat ss;
        if (stat(ferry_st_file_path(m->st, i), &ss) != 0 || ss.st_mtime > ps.st_mtime)
            return 0;
    }
    return 1;
}

/* Holds "<path>.lock" exclusively (flock) in *fd_out, saying once that it waits when another
 * process (or thread) holds it. The lock goes with the descriptor: close it to let go. */
static ferry_status lock_pack(const char *path, int *fd_out)
{
    char lock[4200];
    snprintf(lock, sizeof lock, "%s.lock", path);
    int fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot create the lock file: %s", lock,
                          strerror(errno));
    int rc = flock(fd, LOCK_EX | LOCK_NB);
    if (rc != 0 && errno == EWOULDBLOCK) {
        ferry_log(FERRY_LOG_WARN, "another process is writing the packed expert file %s: "
                  "waiting for it", path);
        while ((rc = flock(fd, LOCK_EX)) != 0 && errno == EINTR)
            ;
    }
    if (rc != 0) {
        int err = errno;
        close(fd);
        return ferry_fail(FERRY_ERR_IO, "%s: cannot lock: %s", lock, strerror(err));
    }
    *fd_out = fd;
    return FERRY_OK;
}

/* With --offload nvme and no --pack, the pack lives in ferry's cache folder
 * ($FERRY_CACHE_DIR, else $XDG_CACHE_HOME/ferry, else ~/.cache/ferry), named after the
 * model folder's real path, and is (re)written when missing or older than a shard. Writers
 * take "<pack>.lock" (flock; the empty file stays) and check again once they hold it, so of
 * processes starting together one writes and the others wait and use its pack. */
static ferry_status default_pack(ferry_model *m, const char *dir)
{
    const char *base = getenv("FERRY_CACHE_DIR");
    char folder[3800], path[4096];
    if (base && base[0]) {
        snprintf(folder, sizeof folder, "%s", base);
    } else if ((base = getenv("XDG_CACHE_HOME")) && base[0]) {
        snprintf(folder, sizeof folder, "%s/ferry", base);
    } else if ((base = getenv("HOME")) && base[0]) {
        snprintf(folder, sizeof folder, "%s/.cache/ferry", base);
    } else {
        return ferry_fail(FERRY_ERR_INVALID, "--offload nvme without --pack needs a cache "
                          "folder: set FERRY_CACHE_DIR or HOME, or give --pack FILE");
    }
    char *real = realpath(dir, NULL);
    if (!real)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot resolve the path: %s", dir, strerror(errno));
    const char *name = strrchr(real, '/');
    name = name && name[1] ? name + 1 : "model";
    int len = snprintf(path, sizeof path, "%.3800s/%.200s-%016llx.pack", folder, name,
                       (unsigned long long)XXH3_64bits(real, strlen(real)));
    free(real);
    if (len < 0 || (size_t)len >= sizeof path)
        return ferry_fail(FERRY_ERR_INVALID, "%s: cache folder path too long", folder);

    if (!pack_is_fresh(m, path)) {
        /* create the folder and its parents */
        for (char *q = folder + 1; *q; q++)
            if (*q == '/') {
                *q = 0;
                mkdir(folder, 0755);
                *q = '/';
            }
        if (mkdir(folder, 0755) != 0 && errno != EEXIST)
            return ferry_fail(FERRY_ERR_IO, "%s: cannot create the cache folder: %s", folder,
                              strerror(errno));
        int lock_fd = -1;
        TRY(lock_pack(path, &lock_fd));
        ferry_status st = FERRY_OK;
        if (!pack_is_fresh(m, path)) { /* else another process wrote it while we waited */
            ferry_log(FERRY_LOG_WARN, "no --pack given: writing the packed expert file %s "
                      "(once)", path);
            ferry_pack_shape shape;
            st = ferry_model_pack_shape(m, &shape);
            if (!st)
                st = ferry_pack_write(path, &shape, ferry_model_pack_source, NULL, m);
        }
        close(lock_fd);
        if (st)
            return st;
    }
    m->pack_path = strdup(path);
    if (!m->pack_path)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory");
    m->params.pack_path = m->pack_path;
    return FERRY_OK;
}

static ferry_status bind_tensor(ferry_model *m, const char *name, int32_t n_dims, int64_t d0,
                                int64_t d1, int on_host, ferry_weight *out);

/* What the contexts' predictors read on the host: each layer's router and post-attention
 * norm (the checkpoint's own bytes; the device copies may not be readable from the host),
 * and the fitted statistics. */
static ferry_status open_predictor_inputs(ferry_model *m)
{
    const ferry_config *c = &m->cfg;
    m->gates = calloc((size_t)c->n_moe_layers, sizeof *m->gates);
    m->ffn_norms = calloc((size_t)c->n_moe_layers, sizeof *m->ffn_norms);
    if (!m->gates || !m->ffn_norms)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory");
    int64_t n_params = m->n_params; /* views, not more parameters */
    for (int32_t l = 0; l < c->n_moe_layers; l++) {
        char name[256];
        ferry_status st;
        snprintf(name, sizeof name, c->arch->router, (int)c->moe_layer[l]);
        if ((st = bind_tensor(m, name, 2, c->n_experts, c->hidden_size, 1, &m->gates[l])))
            return st;
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight",
                 (int)c->moe_layer[l]);
        if ((st = bind_tensor(m, name, 1, c->hidden_size, 0, 1, &m->ffn_norms[l])))
            return st;
    }
    m->n_params = n_params;
    if (m->params.gpu_mem_bytes > 0 && (m->params.predictor == FERRY_PREDICT_STATS ||
                                        m->params.predictor == FERRY_PREDICT_COMBINED)) {
        ferry_status st = ferry_routing_stats_load(m->params.predictor_stats_path, &m->route_stats);
        if (st)
            return st;
        int32_t L, E, K;
        ferry_routing_stats_shape(m->route_stats, &L, &E, &K);
        if (L != c->n_moe_layers || E != c->n_experts || K != c->n_experts_per_tok)
            return ferry_fail(FERRY_ERR_INVALID,
                              "%s: statistics of %d layers x %d experts (top-%d), the model has "
                              "%d x %d (top-%d)",
                              m->params.predictor_stats_path, (int)L, (int)E, (int)K,
                              (int)c->n_moe_layers, (int)c->n_experts, (int)c->n_experts_per_tok);
    }
    m->params.predictor_stats_path = NULL; /* borrowed from the caller; loaded now */
    return FERRY_OK;
}

static ferry_status open_store(ferry_model *m, const char *dir)
{
    const ferry_config *c = &m->cfg;
    if (m->params.offload == FERRY_OFFLOAD_RAM) {
        uint64_t bytes = (uint64_t)c->n_moe_layers * (uint64_t)c->n_experts *
                         ferry_model_expert_bytes(m);
        ferry_status st = ferry_store_create_ram(c->n_moe_layers, c->n_experts, expert_source, m,
                                                 &m->store);
        ferry_progress_report("copying experts", bytes, st ? 0 : bytes, "bytes");
        TRY(st);
        for (int32_t l = 0; m->pack && l < c->n_moe_layers; l++) /* the copies of a --pack */
            for (int32_t e = 0; e < c->n_experts; e++) {
                const void *bytes;
                TRY(ferry_store_get(m->store, l, e, &bytes));
                ferry_status st = ferry_pack_verify(m->pack, l, e, bytes);
                ferry_store_put(m->store, l, e);
                TRY(st);
            }
        return FERRY_OK;
    }
    ferry_pack_shape shape;
    ferry_status st = m->pack_path ? FERRY_OK : default_pack(m, dir);
    if (!st)
        st = ferry_model_pack_shape(m, &shape);
    if (st)
        return st;
    ferry_store_nvme_params np = {
        .pack_path = m->pack_path,
        .n_layers = c->n_moe_layers,
        .n_experts = c->n_experts,
        .d_model = c->hidden_size,
        .d_ff = c->intermediate_size,
        .fingerprint = shape.fingerprint,
        .host_cache_bytes = m->params.host_cache_bytes ? (size_t)m->params.host_cache_bytes
                                                        : (size_t)FERRY_DEFAULT_HOST_CACHE,
        .reader_mode = m->params.reader == FERRY_READ_URING   ? FERRY_READER_URING
                       : m->params.reader == FERRY_READ_PREAD ? FERRY_READER_PREAD
                                                              : FERRY_READER_AUTO,
    };
    return ferry_store_create_nvme(&np, &m->store);
}

uint64_t ferry_model_expert_bytes(const ferry_model *m)
{
    const ferry_expert_weights *X = &m->moe[0].experts[0];
    const ferry_weight *w[3] = {&X->w1, &X->w3, &X->w2};
    uint64_t bytes = 0;
    for (int i = 0; i < 3; i++)
        bytes += (uint64_t)w[i]->rows * ferry_dtype_row_bytes(w[i]->dtype, w[i]->cols);
    return bytes;
}

ferry_expert_weights ferry_model_expert_at(const ferry_model *m, int32_t layer, int32_t e,
                                           const void *base)
{
    const ferry_expert_layout *lay = ferry_store_layout(m->store, layer, e);
    const char *p = base;
    ferry_expert_weights X = m->moe[layer].experts[e]; /* shapes */
    X.w1.d_data = p;
    X.w1.dtype = lay->dtype[0];
    X.w3.d_data = p + lay->part_bytes[0];
    X.w3.dtype = lay->dtype[1];
    X.w2.d_data = p + lay->part_bytes[0] + lay->part_bytes[1];
    X.w2.dtype = lay->dtype[2];
    return X;
}

ferry_status ferry_expert_ffn(ferry_backend *be, const ferry_expert_weights *X, const float *d_x,
                              int32_t m, float *d_a, float *d_b, float *d_out)
{
    const ferry_backend_ops *o = be->ops;
    TRY(o->matmul(be, d_a, d_x, &X->w1, m));
    TRY(o->matmul(be, d_b, d_x, &X->w3, m));
    TRY(o->silu_mul(be, d_a, d_a, d_b, (size_t)m * (size_t)X->w1.rows));
    TRY(o->matmul(be, d_out, d_a, &X->w2, m));
    return FERRY_OK;
}

ferry_status ferry_model_expert_host(ferry_model *m, int32_t layer, int32_t e,
                                     ferry_expert_weights *out)
{
    if (!m->store) {
        *out = m->moe[layer].experts[e];
        return FERRY_OK;
    }
    const void *bytes;
    /* A small NVMe host cache can have every buffer held by the prefetcher's fetch in
     * flight; it puts each one back once its copy lands, so wait for one (bounded, in case
     * something never does). */
    ferry_status st;
    for (int tries = 0;; tries++) {
        st = ferry_store_get(m->store, layer, e, &bytes);
        if (st != FERRY_ERR_NOMEM || tries == 100000)
            break;
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    if (st)
        return st;
    *out = ferry_model_expert_at(m, layer, e, bytes);
    return FERRY_OK;
}

void ferry_model_expert_host_done(ferry_model *m, int32_t layer, int32_t e)
{
    if (m->store)
        ferry_store_put(m->store, layer, e);
}

ferry_status ferry_model_plan_slots(ferry_model *m, size_t context_bytes)
{
    ferry_backend *be = m->be;
    if (m->slots_planned)
        return FERRY_OK;
    size_t budget = be->ops->mem_capacity(be), used = be->ops->mem_used(be);
    size_t slot = (ferry_store_max_expert_bytes(m->store) + 255) / 256 * 256;
    int32_t k = m->cfg.n_experts_per_tok, total = m->cfg.n_moe_layers * m->cfg.n_experts;
    size_t left = budget > used ? budget - used : 0;
    size_t n = left / slot;
    if (n > (size_t)total)
        n = (size_t)total;
    if (m->params.max_slots > 0 && n > (size_t)m->params.max_slots)
        n = (size_t)m->params.max_slots;
    if (n < (size_t)k) {
        size_t need = used + (size_t)k * slot;
        return ferry_fail(FERRY_ERR_NOMEM,
                          "--gpu-mem %.1f MiB is too small: dense weights %.1f MiB + KV cache and "
                          "workspace %.1f MiB + %d expert slots x %.2f MiB (the top-%d of one "
                          "layer) need %.1f MiB (%zu bytes)",
                          MIB(budget), MIB(m->dense_bytes), MIB(context_bytes), (int)k, MIB(slot),
                          (int)k, MIB(need), need);
    }
    ferry_status st = be->ops->alloc(be, n * slot, (void **)&m->d_slots);
    if (st)
        return st;
    m->slot_bytes = slot;
    m->n_slots = (int32_t)n;
    m->context_bytes = context_bytes;
    ferry_cache_params cp = {.n_slots = (int32_t)n,
                             .n_layers = m->cfg.n_moe_layers,
                             .n_experts = m->cfg.n_experts,
                             .policy = (ferry_cache_policy)m->params.policy};
    if ((st = ferry_cache_create(&cp, &m->cache)))
        return st;
    ferry_prefetch_params pp = {.d_slots = m->d_slots,
                                .slot_bytes = slot,
                                .n_slots = (int32_t)n,
                                .n_layers = m->cfg.n_moe_layers,
                                .max_prefetch_bytes = (n / 2 > 0 ? n / 2 : 1) * slot};
    if ((st = ferry_prefetch_create(&pp, be, m->store, m->cache, &m->prefetch)))
        return st;
    ferry_log(FERRY_LOG_INFO,
              "device budget %.1f MiB: dense %.1f MiB, context %.1f MiB, %d expert slots x %.2f "
              "MiB",
              MIB(budget), MIB(m->dense_bytes), MIB(context_bytes), (int)n, MIB(slot));
    if (m->hybrid == FERRY_HYBRID_AUTO) {
        if ((st = ferry_hybrid_measure(m, &m->hybrid_cost)))
            return st;
        const ferry_hybrid_cost *hc = &m->hybrid_cost;
        ferry_log(FERRY_LOG_INFO,
                  "hybrid cost model: fetch %.2f GB/s; CPU %.2f ms per expert for 1 token "
                  "(%.2f GB/s), +%.3f ms per further token",
                  hc->fetch_bytes_per_s / 1e9, hc->cpu_seconds_1 * 1e3,
                  hc->ref_bytes / hc->cpu_seconds_1 / 1e9, hc->cpu_seconds_per_token * 1e3);
    }
    m->slots_planned = 1;
    return FERRY_OK;
}

/* Records a copy the model frees at close: device memory or (on_device 0) host memory. */
static ferry_status keep_owned(ferry_model *m, void *ptr, int on_device)
{
    if (m->n_owned == m->cap_owned) {
        int32_t cap = m->cap_owned ? m->cap_owned * 2 : 64;
        ferry_owned *grown = realloc(m->owned, (size_t)cap * sizeof *grown);
        if (!grown)
            return ferry_fail(FERRY_ERR_NOMEM, "out of memory binding tensors");
        m->owned = grown;
        m->cap_owned = cap;
    }
    m->owned[m->n_owned++] = (ferry_owned){ptr, on_device};
    return FERRY_OK;
}


/* A device copy of n_bytes at data, freed at close; *out is the copy. */
static ferry_status upload_owned(ferry_model *m, const void *data, size_t n_bytes, void **out)
{
    void *copy;
    TRY(m->be->ops->alloc(m->be, n_bytes, &copy));
    ferry_status st = keep_owned(m, copy, 1);
    if (st) {
        m->be->ops->free(m->be, copy);
        return st;
    }
    TRY(m->be->ops->upload(m->be, copy, data, n_bytes));
    *out = copy;
    return FERRY_OK;
}

/* Finds `name` with the given shape and binds it as a weight of rows x cols (a 1-D
 * tensor of d elements binds as 1 x d). Dense weights go to the device (in place when the
 * backend may use host memory); experts (on_host) stay in host memory, where the expert
 * store reads them, copied only when misaligned for their dtype. */
static ferry_status bind_tensor(ferry_model *m, const char *name, int32_t n_dims, int64_t d0,
                                int64_t d1, int on_host, ferry_weight *out)
{
    const int64_t shape[2] = {d0, d1};
    const ferry_st_tensor *t;
    ferry_dtype dtype;
    ferry_status st = ferry_st_get(m->st, name, n_dims, shape, &t, &dtype);
    if (st)
        return st;
    const void *data = t->data;
    int misaligned = ((uintptr_t)data % ferry_dtype_size(dtype)) != 0;
    if (on_host && misaligned) {
        void *copy = malloc(t->n_bytes ? t->n_bytes : 1);
        if (!copy)
            return ferry_fail(FERRY_ERR_NOMEM, "tensor '%s': out of memory", name);
        if ((st = keep_owned(m, copy, 0))) {
            free(copy);
            return st;
        }
        memcpy(copy, data, t->n_bytes);
        data = copy;
    } else if (!on_host && (!m->be->map_host_weights || misaligned)) {
        void *copy;
        if ((st = upload_owned(m, data, t->n_bytes, &copy)))
            return ferry_fail_prefix(st, "tensor '%s'", name);
        data = copy;
    }
    out->d_data = data;
    out->dtype = dtype;
    out->rows = n_dims == 1 ? 1 : d0;
    out->cols = n_dims == 1 ? d0 : d1;
    m->n_params += d0 * (n_dims == 1 ? 1 : d1);
    return FERRY_OK;
}

static ferry_status bind(ferry_model *m, const char *name, int32_t n_dims, int64_t d0, int64_t d1,
                         ferry_weight *out)
{
    return bind_tensor(m, name, n_dims, d0, d1, 0, out);
}

/* A dense matmul weight (d0 x d1): as the checkpoint has it, or with --quant-dense
 * quantized on all cores into host memory, then copied to the device unless the backend
 * computes from host memory. */
static ferry_status bind_matmul(ferry_model *m, const char *name, int64_t d0, int64_t d1,
                                ferry_weight *out)
{
    int32_t f = m->params.quant_dense;
    if (f == FERRY_PACK_AS_STORED)
        return bind(m, name, 2, d0, d1, out);
    ferry_dtype q = f == FERRY_PACK_Q8 ? FERRY_DTYPE_Q8 : FERRY_DTYPE_Q4;
    if (d1 % FERRY_QUANT_GROUP)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "--quant-dense %s: tensor '%s' has %lld columns, "
                          "not a multiple of %d", ferry_quant_name(q), name, (long long)d1,
                          FERRY_QUANT_GROUP);
    ferry_weight host;
    TRY(bind_tensor(m, name, 2, d0, d1, 1, &host));
    if (!m->bind_pool)
        TRY(ferry_pool_create(ferry_topology_default_threads(), &m->bind_pool));
    size_t n_bytes = (size_t)d0 * ferry_dtype_row_bytes(q, d1);
    void *buf = malloc(n_bytes), *data = buf;
    if (!buf)
        return ferry_fail(FERRY_ERR_NOMEM, "tensor '%s': no memory for %zu bytes of %s", name,
                          n_bytes, ferry_quant_name(q));
    ferry_status st = ferry_quantize_matrix(&host, q, m->bind_pool, buf);
    if (st) {
        free(buf);
        return ferry_fail_prefix(st, "--quant-dense %s: tensor '%s'", ferry_quant_name(q), name);
    }
    if (m->be->map_host_weights) {
        if ((st = keep_owned(m, buf, 0)))
            free(buf);
    } else {
        st = upload_owned(m, buf, n_bytes, &data);
        free(buf);
    }
    if (st)
        return st;
    *out = (ferry_weight){.d_data = data, .dtype = q, .rows = d0, .cols = d1};
    return FERRY_OK;
}

/* Binds expert e of layer l from the caller's pack: views into its mapping (copied to the
 * device when experts do not stay on the host). */
static ferry_status bind_pack_expert(ferry_model *m, int32_t l, int32_t e, ferry_expert_weights *X)
{
    const ferry_pack_entry *pe = ferry_pack_get(m->pack, l, e);
    int64_t d = m->cfg.hidden_size, ff = m->cfg.intermediate_size;
    ferry_weight *w[3] = {&X->w1, &X->w3, &X->w2};
    const char *p = (const char *)m->pack_map + pe->offset;
    for (int k = 0; k < 3; k++) {
        void *data = (void *)p;
        ferry_status st;
        if (!m->experts_on_host && (st = upload_owned(m, p, pe->part_bytes[k], &data)))
            return ferry_fail_prefix(st, "%s: layer %d expert %d", m->pack_path, (int)l, (int)e);
        *w[k] = (ferry_weight){.d_data = data,
                               .dtype = pe->dtype[k],
                               .rows = k == 2 ? d : ff,
                               .cols = k == 2 ? ff : d};
        m->n_params += d * ff;
        p += pe->part_bytes[k];
    }
    return FERRY_OK;
}

/* Binds the triple of SwiGLU projections named by fmt[0..2] (gate, up, down: "%d" the
 * decoder layer l, then the expert e when e >= 0) of width ff: a routed expert's as
 * bind_tensor binds experts (on_host), a dense MLP's as dense matmul weights. */
static ferry_status bind_ffn(ferry_model *m, const char *const fmt[3], int32_t l, int32_t e,
                             int64_t ff, int on_host, ferry_expert_weights *X)
{
    int64_t d = m->cfg.hidden_size;
    ferry_weight *w[3] = {&X->w1, &X->w3, &X->w2};
    for (int k = 0; k < 3; k++) {
        char name[256];
        snprintf(name, sizeof name, fmt[k], (int)l, (int)e);
        if (e >= 0)
            TRY(bind_tensor(m, name, 2, k == 2 ? d : ff, k == 2 ? ff : d, on_host, w[k]));
        else
            TRY(bind_matmul(m, name, k == 2 ? d : ff, k == 2 ? ff : d, w[k]));
    }
    return FERRY_OK;
}

/* Binds decoder layer l: norms and attention (with the family's biases and q/k norms), then
 * its MLP: dense, or router, shared expert and routed experts (MoE index L->moe). */
static ferry_status bind_layer(ferry_model *m, int32_t l)
{
    const ferry_config *c = &m->cfg;
    const ferry_arch *a = c->arch;
    ferry_layer_weights *L = &m->layers[l];
    int64_t d = c->hidden_size;
    int64_t q_dim = (int64_t)c->n_heads * c->head_dim, kv_dim = (int64_t)c->n_kv_heads * c->head_dim;
    char name[256];
#define NAME(...) snprintf(name, sizeof name, __VA_ARGS__)
    NAME("model.layers.%d.input_layernorm.weight", (int)l);
    TRY(bind(m, name, 1, d, 0, &L->attn_norm));
    NAME("model.layers.%d.post_attention_layernorm.weight", (int)l);
    TRY(bind(m, name, 1, d, 0, &L->ffn_norm));
    const char *proj[4] = {"q", "k", "v", "o"};
    ferry_weight *w[4] = {&L->wq, &L->wk, &L->wv, &L->wo}, *b[4] = {&L->bq, &L->bk, &L->bv, &L->bo};
    const int64_t rows[4] = {q_dim, kv_dim, kv_dim, d}, cols[4] = {d, d, d, q_dim};
    for (int i = 0; i < 4; i++) {
        NAME("model.layers.%d.self_attn.%s_proj.weight", (int)l, proj[i]);
        TRY(bind_matmul(m, name, rows[i], cols[i], w[i]));
        if (i < 3 ? c->qkv_bias : c->o_bias) {
            NAME("model.layers.%d.self_attn.%s_proj.bias", (int)l, proj[i]);
            TRY(bind(m, name, 1, rows[i], 0, b[i]));
        }
    }
    if (c->qk_norm != FERRY_QK_NORM_NONE) {
        int head = c->qk_norm == FERRY_QK_NORM_HEAD;
        NAME(a->q_norm, (int)l);
        TRY(bind(m, name, 1, head ? c->head_dim : q_dim, 0, &L->q_norm));
        NAME(a->k_norm, (int)l);
        TRY(bind(m, name, 1, head ? c->head_dim : kv_dim, 0, &L->k_norm));
    }
    L->moe = c->moe_index[l];
    if (L->moe < 0)
        return bind_ffn(m, a->dense_mlp, l, -1, c->dense_ff, 0, &L->mlp);
    if (c->shared_ff > 0) {
        TRY(bind_ffn(m, a->shared, l, -1, c->shared_ff, 0, &L->shared));
        NAME(a->shared_gate, (int)l);
        TRY(bind(m, name, 2, 1, d, &L->shared_gate));
    }
    ferry_moe_weights *M = &m->moe[L->moe];
    NAME(a->router, (int)l);
    TRY(bind(m, name, 2, c->n_experts, d, &M->gate));
#undef NAME
    M->experts = calloc((size_t)c->n_experts, sizeof *M->experts);
    if (!M->experts)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory for layer %d's experts", (int)l);
    for (int32_t e = 0; e < c->n_experts && m->pack; e++)
        TRY(bind_pack_expert(m, L->moe, e, &M->experts[e]));
    for (int32_t e = 0; e < c->n_experts && !m->pack; e++)
        TRY(bind_ffn(m, a->expert, l, e, c->intermediate_size, m->experts_on_host,
                     &M->experts[e]));
    return FERRY_OK;
}

/* Whether open_store will build the RAM tier, which copies every expert. */
static int builds_ram_store(const ferry_model *m)
{
    return m->params.gpu_mem_bytes > 0 && m->params.offload == FERRY_OFFLOAD_RAM &&
           m->hybrid != FERRY_HYBRID_CPU_EXPERTS;
}

/* --pack FILE: the experts come from the pack instead of the checkpoint. It is checked
 * against the model's shape and mapped read-only; every expert's checksum is checked once
 * at open, so a corrupt pack fails there and never computes: here, over the mapping, or
 * where the experts are copied anyway, over the copies (the RAM tier: open_store, so the
 * pack is read once), or on each read (the NVMe tier). */
static ferry_status open_user_pack(ferry_model *m)
{
    const ferry_config *c = &m->cfg;
    ferry_pack_shape shape;
    TRY(ferry_model_pack_shape(m, &shape));
    TRY(ferry_pack_open(m->pack_path, &shape, &m->pack));
    if (!ferry_pack_get_shape(m->pack).fingerprint)
        ferry_log(FERRY_LOG_WARN, "%s records no checkpoint fingerprint (an older ferry wrote it): "
                  "only its shape is checked against the model", m->pack_path);
    int fd = open(m->pack_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot open: %s", m->pack_path, strerror(errno));
    size_t n_bytes = (size_t)ferry_pack_file_bytes(m->pack);
    void *map = mmap(NULL, n_bytes, PROT_READ, MAP_SHARED, fd, 0);
    int err = errno;
    close(fd);
    if (map == MAP_FAILED)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot map %zu bytes: %s", m->pack_path, n_bytes,
                          strerror(err));
    m->pack_map = map;
    m->pack_map_bytes = n_bytes;
    if ((m->params.gpu_mem_bytes > 0 && m->params.offload == FERRY_OFFLOAD_NVME) ||
        builds_ram_store(m))
        return FERRY_OK;
    madvise(map, n_bytes, MADV_SEQUENTIAL);
    for (int32_t l = 0; l < c->n_moe_layers; l++)
        for (int32_t e = 0; e < c->n_experts; e++) {
            const ferry_pack_entry *pe = ferry_pack_get(m->pack, l, e);
            ferry_progress_report("checking the pack", pe->offset, n_bytes, "bytes");
            ferry_status st = ferry_pack_verify(m->pack, l, e, (const char *)map + pe->offset);
            if (st)
                ferry_progress_report("checking the pack", pe->offset, 0, "bytes");
            TRY(st);
        }
    ferry_progress_report("checking the pack", n_bytes, n_bytes, "bytes");
    madvise(map, n_bytes, MADV_NORMAL);
    return FERRY_OK;
}

/* A CPU backend with the params' kernels, its workers pinned one per physical core (hwloc)
 * so the matmul threads neither share a core's hardware threads nor wander between runs. */
static ferry_status cpu_backend_pinned(const ferry_model_params *p, int32_t n_threads,
                                       size_t device_bytes, ferry_backend **out)
{
    TRY(ferry_backend_cpu_create_isa(n_threads, device_bytes, p->cpu_kernels, out));
    int32_t cpus[1024];
    int32_t n = ferry_topology_core_cpus(cpus, 1024);
    int32_t pinned = n > 0 ? ferry_backend_cpu_pin(*out, cpus, n) : 0;
    ferry_log(FERRY_LOG_DEBUG, "%s: %d worker threads pinned over %d cores", (*out)->device,
              (int)pinned, (int)n);
    return FERRY_OK;
}

ferry_status ferry_backend_for_params(const ferry_model_params *p, size_t device_bytes,
                                      ferry_backend **out)
{
    int32_t n_threads = p->n_threads ? p->n_threads : ferry_topology_default_threads();
    switch (p->backend) {
    case FERRY_BACKEND_CPU:
        return cpu_backend_pinned(p, n_threads, device_bytes, out);
    case FERRY_BACKEND_CUDA:
        return ferry_backend_cuda_create(device_bytes, out);
    case FERRY_BACKEND_AUTO:
        break;
    default:
        return ferry_fail(FERRY_ERR_INVALID, "backend %d is not auto, cpu or cuda", (int)p->backend);
    }
    ferry_status st = ferry_backend_cuda_probe(NULL, 0);
    if (st == FERRY_OK) {
        st = ferry_backend_cuda_create(device_bytes, out);
        if (st != FERRY_ERR_DEVICE)
            return st; /* the GPU, or a real failure such as a budget larger than the GPU */
    }
    if (st != FERRY_ERR_UNSUPPORTED) /* a CUDA build without a GPU: say why the CPU runs */
        ferry_log(FERRY_LOG_WARN, "%s; running on the CPU backend", ferry_last_error());
    return cpu_backend_pinned(p, n_threads, device_bytes, out);
}

ferry_status ferry_model_open(const char *dir, const ferry_model_params *p, ferry_model **out)
{
    if (!dir || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_model_open: NULL argument");
    ferry_model_params defaults = ferry_model_params_default();
    if (!p)
        p = &defaults;
    if (p->n_threads < 0)
        return ferry_fail(FERRY_ERR_INVALID, "thread count %d must be >= 0", (int)p->n_threads);
    ferry_model *m = calloc(1, sizeof *m);
    if (!m)
        return ferry_fail(FERRY_ERR_NOMEM, "out of memory opening %s", dir);
    ferry_status st;
    {
        size_t n = strlen(dir);
        while (n > 1 && dir[n - 1] == '/')
            n--;
        size_t b = n;
        while (b > 0 && dir[b - 1] != '/')
            b--;
        snprintf(m->name, sizeof m->name, "%.*s", (int)(n - b), dir + b);
    }
    if ((st = ferry_config_load(dir, &m->cfg)))
        goto fail;
    if ((st = ferry_tokenizer_load(dir, &m->tok)))
        goto fail;
    if (ferry_tokenizer_n_vocab(m->tok) > m->cfg.vocab_size) {
        st = ferry_fail(FERRY_ERR_FORMAT,
                        "%s: tokenizer.json has %d tokens, config.json vocab_size is %d", dir,
                        (int)ferry_tokenizer_n_vocab(m->tok), (int)m->cfg.vocab_size);
        goto fail;
    }
    if ((st = ferry_st_open_dir(dir, &m->st)))
        goto fail;
    if ((st = check_offload_params(p)) || (st = check_hybrid_params(p)))
        goto fail;
    m->params = *p;
    if (p->pack_path) {
        m->pack_path = strdup(p->pack_path);
        if (!m->pack_path) {
            st = ferry_fail(FERRY_ERR_NOMEM, "out of memory");
            goto fail;
        }
        m->params.pack_path = m->pack_path;
    }
    if ((st = ferry_backend_for_params(p, (size_t)p->gpu_mem_bytes, &m->be)))
        goto fail;
    /* without offloading, experts are device weights like the rest, unless the backend
     * computes on host memory in place */
    m->experts_on_host = p->gpu_mem_bytes > 0 || m->be->map_host_weights ||
                         p->hybrid == FERRY_HYBRID_CPU_EXPERTS;
    /* AUTO decides between fetching and the CPU only where there is something to fetch */
    m->hybrid = p->hybrid;
    if (m->hybrid == FERRY_HYBRID_AUTO && p->gpu_mem_bytes == 0)
        m->hybrid = FERRY_HYBRID_OFF;
    if (m->hybrid != FERRY_HYBRID_OFF) {
        int32_t n_threads = p->n_threads ? p->n_threads : ferry_topology_default_threads();
        if ((st = cpu_backend_pinned(p, n_threads, 0, &m->cpu_be)))
            goto fail;
    }
    if (pthread_mutex_init(&m->lock, NULL) != 0) {
        st = ferry_fail(FERRY_ERR_NOMEM, "cannot create the model lock");
        goto fail;
    }
    m->lock_ready = 1;

    const ferry_config *c = &m->cfg;
    if (p->gpu_mem_bytes > 0) {
        /* dense bytes = the checkpoint minus its experts: say so before failing a bind */
        uint64_t all = 0, experts = 0;
        for (int32_t i = 0; i < ferry_st_count(m->st); i++) {
            const ferry_st_tensor *t = ferry_st_at(m->st, i);
            all += t->n_bytes;
            if (strstr(t->name, ".experts.")) /* Mixtral's and Qwen's routed experts */
                experts += t->n_bytes;
        }
        if (all - experts > p->gpu_mem_bytes) {
            st = ferry_fail(FERRY_ERR_NOMEM, "--gpu-mem %.1f MiB cannot hold the dense weights "
                            "(%.1f MiB) and the experts of one layer", MIB(p->gpu_mem_bytes),
                            MIB(all - experts));
            goto fail;
        }
    }
    if ((st = bind(m, "model.embed_tokens.weight", 2, c->vocab_size, c->hidden_size, &m->embed)))
        goto fail;
    if ((st = bind(m, "model.norm.weight", 1, c->hidden_size, 0, &m->final_norm)))
        goto fail;
    if (c->tie_word_embeddings) {
        m->lm_head = m->embed;
    } else if ((st = bind_matmul(m, "lm_head.weight", c->vocab_size, c->hidden_size,
                                 &m->lm_head))) {
        goto fail;
    }
    if (m->pack_path && (st = open_user_pack(m)))
        goto fail;
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    if (!m->layers) {
        st = ferry_fail(FERRY_ERR_NOMEM, "out of memory for %d layers", (int)c->n_layers);
        goto fail;
    }
    m->moe = calloc((size_t)c->n_moe_layers, sizeof *m->moe);
    if (!m->moe) {
        st = ferry_fail(FERRY_ERR_NOMEM, "out of memory for %d layers", (int)c->n_moe_layers);
        goto fail;
    }
    ferry_progress_report("loading the model", 0, (uint64_t)c->n_layers, "layers");
    for (int32_t l = 0; l < c->n_layers; l++) {
        if ((st = bind_layer(m, l))) {
            ferry_progress_report("loading the model", (uint64_t)l, 0, "layers");
            goto fail;
        }
        ferry_progress_report("loading the model", (uint64_t)l + 1, (uint64_t)c->n_layers,
                              "layers");
    }
    ferry_pool_destroy(m->bind_pool);
    m->bind_pool = NULL;
    m->dense_bytes = m->be->ops->mem_used(m->be);
    /* CPU_EXPERTS computes every expert where the checkpoint maps it: no store, no slots */
    if (p->gpu_mem_bytes > 0 && m->hybrid != FERRY_HYBRID_CPU_EXPERTS &&
        (st = open_store(m, dir)))
        goto fail;
    if (m->store) {
        void *h;
        size_t n_bytes;
        ferry_store_host_memory(m->store, &h, &n_bytes);
        if (m->be->ops->host_register(m->be, h, n_bytes) == FERRY_OK)
            m->h_pinned = h;
        else
            ferry_log(FERRY_LOG_WARN, "%s; experts will be copied from pageable memory, several "
                      "times slower", ferry_last_error());
    }
    if ((st = open_predictor_inputs(m)))
        goto fail;
    ferry_log(FERRY_LOG_INFO, "%s: %d layers, %d experts (top-%d), %lld parameters", dir,
              (int)c->n_layers, (int)c->n_experts, (int)c->n_experts_per_tok,
              (long long)m->n_params);
    *out = m;
    return FERRY_OK;
fail:
    ferry_model_close(m);
    return st;
}

void ferry_model_close(ferry_model *m)
{
    if (!m)
        return;
    ferry_pool_destroy(m->bind_pool);
    ferry_prefetch_destroy(m->prefetch);
    ferry_cache_destroy(m->cache);
    if (m->d_slots)
        m->be->ops->free(m->be, m->d_slots);
    if (m->h_pinned)
        m->be->ops->host_unregister(m->be, m->h_pinned);
    ferry_store_destroy(m->store);
    if (m->pack_map)
        munmap(m->pack_map, m->pack_map_bytes);
    ferry_pack_close(m->pack);
    ferry_routing_stats_free(m->route_stats);
    free(m->gates);
    free(m->ffn_norms);
    free(m->pack_path);
    if (m->moe)
        for (int32_t l = 0; l < m->cfg.n_moe_layers; l++)
            free(m->moe[l].experts);
    free(m->moe);
    free(m->layers);
    for (int32_t i = 0; i < m->n_owned; i++) {
        if (m->owned[i].on_device)
            m->be->ops->free(m->be, m->owned[i].ptr);
        else
            free(m->owned[i].ptr);
    }
    free(m->owned);
    ferry_backend_destroy(m->be);
    ferry_backend_destroy(m->cpu_be);
    ferry_st_close(m->st);
    ferry_tokenizer_free(m->tok);
    if (m->lock_ready)
        pthread_mutex_destroy(&m->lock);
    free(m);
}

ferry_status ferry_model_get_info(const ferry_model *m, ferry_model_info *out)
{
    if (!m || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_model_get_info: NULL argument");
    const ferry_config *c = &m->cfg;
    ferry_model_info i = {
        .n_vocab = c->vocab_size,
        .d_model = c->hidden_size,
        .d_ff = c->intermediate_size,
        .n_layers = c->n_layers,
        .n_heads = c->n_heads,
        .n_kv_heads = c->n_kv_heads,
        .head_dim = c->head_dim,
        .n_experts = c->n_experts,
        .n_experts_used = c->n_experts_per_tok,
        .max_positions = c->max_positions,
        .bos_id = c->bos_id >= 0 ? c->bos_id : ferry_tokenizer_bos_id(m->tok),
        .eos_id = c->n_eos > 0 ? c->eos_ids[0] : ferry_tokenizer_eos_id(m->tok),
        .rope_theta = c->rope_theta,
        .rms_eps = c->rms_eps,
        .n_params = m->n_params,
        .backend = strcmp(m->be->ops->name, "cuda") == 0 ? FERRY_BACKEND_CUDA : FERRY_BACKEND_CPU,
    };
    snprintf(i.device, sizeof i.device, "%s", m->be->device);
    *out = i;
    return FERRY_OK;
}

ferry_status ferry_tokenize(const ferry_model *m, const char *text, size_t len, int add_special,
                            int32_t *ids, int32_t cap, int32_t *n_out)
{
    if (!m || (!text && len) || !n_out || (cap > 0 && !ids) || cap < 0)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_tokenize: invalid arguments");
    return ferry_tokenizer_encode(m->tok, text ? text : "", len, add_special, ids, cap, n_out);
}

ferry_status ferry_detokenize(const ferry_model *m, const int32_t *ids, int32_t n,
                              int skip_special, char *text, size_t cap, size_t *len_out)
{
    if (!m || (n > 0 && !ids) || n < 0 || !len_out || (cap > 0 && !text))
        return ferry_fail(FERRY_ERR_INVALID, "ferry_detokenize: invalid arguments");
    return ferry_tokenizer_decode(m->tok, ids, n, skip_special, text, cap, len_out);
}

