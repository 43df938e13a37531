/*
 * engine/bench.c: ferry_measure_bandwidths and ferry_bench_run (include/ferry.h): the
 * numbers an offloading engine is judged by, next to the bound the measured bandwidths put
 * on them, so a run says how far from the limit it is.
 *
 * The bound of a decode step: it must read every byte it touches from device memory (dense
 * weights, the chosen experts, the KV cache) and copy every expert it misses over the bus;
 * with perfect overlap it takes max(read / device bandwidth, moved / pinned bandwidth). With
 * hybrid execution the CPU computes some missing experts from host memory instead: the
 * bytes not in a slot are then shared by the bus and the CPU's memory bandwidth.
 *
 * On the CPU backend the device is the CPU reading host memory, and a copy is not what a
 * decode step does: there the device bandwidth is the best read rate of every compute
 * thread over a buffer as large as the decode's working set (dense weights, the experts it
 * cycles through, the KV cache), so a model that fits in the caches is bounded by the
 * caches' bandwidth, not by DRAM's.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/clock.h"
#include "core/error.h"
#include "core/pool.h"
#include "engine/context.h"
#include "engine/model.h"
#include "offload/reader.h"
#include "offload/topology.h"

#define FERRY_BENCH_BW_BYTES (256ull << 20)
#define FERRY_BENCH_BW_REPS 5

ferry_bench_params ferry_bench_params_default(void)
{
    ferry_bench_params p = {.mode = FERRY_BENCH_DECODE,
                            .prompt_len = 32,
                            .gen_len = 64,
                            .repeat = 3,
                            .bandwidth_bytes = 0,
                            .batch = 8};
    return p;
}

/* ---- bandwidths ---------------------------------------------------------------------- */

static ferry_status measure(ferry_backend *be, size_t n, void *h, ferry_bandwidths *bw)
{
    const ferry_backend_ops *o = be->ops;
    void *d_a = NULL, *d_b = NULL;
    ferry_status st;
    if ((st = o->alloc(be, n, &d_a)) || (st = o->alloc(be, n, &d_b)))
        goto done;
    memset(h, 1, n); /* touch every page before timing */
    /* pageable upload (also fills d_a) */
    if ((st = o->upload(be, d_a, h, n)))
        goto done;
    double t0 = ferry_now_seconds();
    for (int r = 0; r < FERRY_BENCH_BW_REPS && st == FERRY_OK; r++)
        st = o->upload(be, d_a, h, n);
    if (st)
        goto done;
    bw->pageable_h2d_gbps = (double)n * FERRY_BENCH_BW_REPS / (ferry_now_seconds() - t0) / 1e9;
    /* device to device: n read + n written per copy */
    if ((st = o->copy_device(be, d_b, d_a, n)) || (st = o->synchronize(be)))
        goto done;
    t0 = ferry_now_seconds();
    for (int r = 0; r < FERRY_BENCH_BW_REPS && st == FERRY_OK; r++)
        st = o->copy_device(be, d_b, d_a, n);
    if (st || (st = o->synchronize(be)))
        goto done;
    bw->device_gbps = 2.0 * (double)n * FERRY_BENCH_BW_REPS / (ferry_now_seconds() - t0) / 1e9;
    /* pinned, through the copy engine, as expert fetches go */
    int pinned = o->host_register(be, h, n) == FERRY_OK;
    uint64_t ticket;
    if ((st = o->copy_async(be, d_b, h, n, &ticket)) || (st = o->copy_wait(be, ticket)))
        goto unpin;
    t0 = ferry_now_seconds();
    for (int r = 0; r < FERRY_BENCH_BW_REPS && st == FERRY_OK; r++)
        st = o->copy_async(be, d_b, h, n, &ticket);
    if (st == FERRY_OK)
        st = o->copy_wait(be, ticket);
    if (st == FERRY_OK)
        bw->pinned_h2d_gbps = (double)n * FERRY_BENCH_BW_REPS / (ferry_now_seconds() - t0) / 1e9;
unpin:
    if (pinned)
        o->host_unregister(be, h);
done:
    o->free(be, d_a);
    o->free(be, d_b);
    return st;
}

/* Host memory read by every compute thread at once: each thread sums its share of the
 * buffer as 64-bit words (integer adds, so the compiler vectorises the loop). */
typedef struct {
    const uint64_t *words;
    size_t n_words;
    int32_t n_tasks;
    uint64_t sums[64];
} host_read_job;

static void host_read_task(void *vp, int32_t task)
{
    host_read_job *j = vp;
    size_t per = j->n_words / (size_t)j->n_tasks;
    const uint64_t *w = j->words + per * (size_t)task;
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (size_t i = 0; i + 4 <= per; i += 4) {
        a += w[i];
        b += w[i + 1];
        c += w[i + 2];
        d += w[i + 3];
    }
    j->sums[task] = a + b + c + d;
}

/* Every compute thread reading h[0, n) at once. best == 0: the mean rate over
 * FERRY_BENCH_BW_REPS passes (host memory, as --hybrid's CPU share reads it); best != 0: the
 * best of twice as many passes, each reading at least 64 MiB (a buffer small enough for the
 * caches is read several times a pass). */
static ferry_status measure_host_read(const ferry_model_params *mp, const void *h, size_t n,
                                      int best, double *gbps)
{
    int32_t n_threads = mp->n_threads ? mp->n_threads : ferry_topology_default_threads();
    ferry_pool *pool;
    TRY(ferry_pool_create(n_threads, &pool));
    host_read_job j = {.words = h, .n_words = n / 8, .n_tasks = 64};
    size_t read = j.n_words / (size_t)j.n_tasks * (size_t)j.n_tasks * 8;
    int32_t passes = best ? 2 * FERRY_BENCH_BW_REPS : FERRY_BENCH_BW_REPS, laps = 1;
    if (best && read < (64u << 20))
        laps = (int32_t)((64u << 20) / (read ? read : 1)) + 1;
    ferry_pool_run(pool, j.n_tasks, host_read_task, &j); /* warm */
    double fastest = 0, total = 0;
    for (int32_t r = 0; r < passes; r++) {
        double t0 = ferry_now_seconds();
        for (int32_t k = 0; k < laps; k++)
            ferry_pool_run(pool, j.n_tasks, host_read_task, &j);
        double dt = ferry_now_seconds() - t0, g = dt > 0 ? (double)read * laps / dt / 1e9 : 0;
        fastest = g > fastest ? g : fastest;
        total += dt;
    }
    ferry_pool_destroy(pool);
    *gbps = best ? fastest : total > 0 ? (double)read * passes / total / 1e9 : 0;
    return FERRY_OK;
}

/* The CPU backend's device bandwidth: the best read rate of every compute thread over an
 * n-byte buffer (measure_host_read with best). */
static ferry_status measure_working_set_read(const ferry_model_params *mp, size_t n,
                                             double *gbps)
{
    n = n < 4096 ? 4096 : (n + 4095) / 4096 * 4096;
    uint64_t *h = aligned_alloc(4096, n);
    if (!h)
        return ferry_fail(FERRY_ERR_NOMEM, "bench: cannot allocate %zu bytes", n);
    memset(h, 1, n);
    ferry_status st = measure_host_read(mp, h, n, 1, gbps);
    free(h);
    return st;
}

ferry_status ferry_measure_bandwidths(const ferry_model_params *mp, uint64_t n_bytes,
                                      ferry_bandwidths *out)
{
    if (!mp || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_measure_bandwidths: NULL argument");
    size_t n = n_bytes ? (size_t)n_bytes : (size_t)FERRY_BENCH_BW_BYTES;
    if (n < 4096 || n > (16ull << 30))
        return ferry_fail(FERRY_ERR_INVALID, "bandwidth buffer of %zu bytes (4 KiB to 16 GiB)",
                          n);
    ferry_backend *be = NULL;
    /* a budget room for the two buffers: the CPU backend's copy engine then runs as it does
     * when offloading */
    TRY(ferry_backend_for_params(mp, 2 * n + (1u << 20), &be));
    void *h = aligned_alloc(4096, (n + 4095) / 4096 * 4096);
    ferry_bandwidths bw = {.n_bytes = n};
    ferry_status st = h ? measure(be, n, h, &bw)
                        : ferry_fail(FERRY_ERR_NOMEM, "cannot allocate %zu bytes", n);
    if (st == FERRY_OK)
        st = measure_host_read(mp, h, n, 0, &bw.host_read_gbps);
    free(h);
    ferry_backend_destroy(be);
    if (st == FERRY_OK)
        *out = bw;
    return st;
}

#define FERRY_BENCH_DISK_REQ (4u << 20)
#define FERRY_BENCH_DISK_DEPTH 16

/* The file the expert bytes come from: the pack file on the NVMe tier, else the largest
 * .safetensors file of the checkpoint. */
static ferry_status disk_file(const ferry_model *m, const char *model_dir, char *path,
                              size_t cap)
{
    if (m->store && ferry_store_tier(m->store) == FERRY_TIER_NVME && m->pack_path) {
        snprintf(path, cap, "%s", m->pack_path);
        return FERRY_OK;
    }
    DIR *d = opendir(model_dir);
    if (!d)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot list the folder", model_dir);
    off_t best = -1;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (len < 12 || strcmp(e->d_name + len - 12, ".safetensors"))
            continue;
        char p[4096];
        struct stat st;
        snprintf(p, sizeof p, "%s/%s", model_dir, e->d_name);
        if (stat(p, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > best) {
            best = st.st_size;
            snprintf(path, cap, "%s", p);
        }
    }
    closedir(d);
    if (best < 0)
        return ferry_fail(FERRY_ERR_IO, "%s: no .safetensors file to read", model_dir);
    return FERRY_OK;
}

/* Reads up to n bytes of path from its start through ferry's reader, as the NVMe tier
 * does; 0 GB/s when the file is shorter than one request. */
static ferry_status measure_disk(const char *path, uint64_t n, ferry_bandwidths *bw)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return ferry_fail(FERRY_ERR_IO, "%s: cannot stat", path);
    uint64_t n_req = (uint64_t)st.st_size / FERRY_BENCH_DISK_REQ;
    if (n_req > n / FERRY_BENCH_DISK_REQ)
        n_req = n / FERRY_BENCH_DISK_REQ;
    snprintf(bw->disk_path, sizeof bw->disk_path, "%.*s", (int)sizeof bw->disk_path - 1, path);
    if (n_req == 0)
        return FERRY_OK;
    size_t region_bytes = (size_t)FERRY_BENCH_DISK_DEPTH * FERRY_BENCH_DISK_REQ;
    char *region = aligned_alloc(FERRY_READER_ALIGN, region_bytes);
    if (!region)
        return ferry_fail(FERRY_ERR_NOMEM, "bench: %zu bytes for disk reads", region_bytes);
    ferry_reader *r = NULL;
    ferry_status st_ = ferry_reader_create(path, FERRY_READER_AUTO, FERRY_BENCH_DISK_DEPTH * 4,
                                           region, region_bytes, &r);
    if (st_) {
        free(region);
        return st_;
    }
    double t0 = ferry_now_seconds();
    uint64_t next = 0, done = 0;
    while (st_ == FERRY_OK && done < n_req) {
        while (next < n_req && next - done < FERRY_BENCH_DISK_DEPTH) {
            char *dst = region + (next % FERRY_BENCH_DISK_DEPTH) * FERRY_BENCH_DISK_REQ;
            if ((st_ = ferry_reader_submit(r, next * FERRY_BENCH_DISK_REQ, FERRY_BENCH_DISK_REQ,
                                           dst, next)))
                break;
            next++;
        }
        if (st_)
            break;
        uint64_t tag;
        ferry_status res;
        int completed = 0;
        if ((st_ = ferry_reader_wait(r, -1, &tag, &res, &completed)))
            break;
        if (completed && res != FERRY_OK)
            st_ = res;
        done += completed != 0;
    }
    double dt = ferry_now_seconds() - t0;
    if (st_ == FERRY_OK) {
        bw->disk_gbps = (double)n_req * FERRY_BENCH_DISK_REQ / dt / 1e9;
        bw->disk_direct = ferry_reader_uses_direct(r);
    }
    ferry_reader_destroy(r);
    free(region);
    return st_;
}

/* ---- the run ----------------------------------------------------------------------- */

static uint64_t weight_bytes(const ferry_weight *w)
{
    return (uint64_t)w->rows * ferry_dtype_row_bytes(w->dtype, w->cols);
}

/* Bytes of a weight the family may lack (NULL data: 0). */
static uint64_t opt_bytes(const ferry_weight *w) { return w->d_data ? weight_bytes(w) : 0; }

static uint64_t ffn_bytes(const ferry_expert_weights *X)
{
    return opt_bytes(&X->w1) + opt_bytes(&X->w3) + opt_bytes(&X->w2);
}

/* Dense weight bytes one decode token reads: every layer's attention (with biases and q/k
 * norms), norms, router, dense MLP or shared expert, the final norm, the LM head and one
 * embedding row. */
static uint64_t dense_bytes_per_token(const ferry_model *m)
{
    uint64_t b = weight_bytes(&m->final_norm) + weight_bytes(&m->lm_head) +
                 (uint64_t)m->embed.cols * ferry_dtype_size(m->embed.dtype);
    for (int32_t l = 0; l < m->cfg.n_layers; l++) {
        const ferry_layer_weights *L = &m->layers[l];
        b += weight_bytes(&L->wq) + weight_bytes(&L->wk) + weight_bytes(&L->wv) +
             weight_bytes(&L->wo) + weight_bytes(&L->attn_norm) + weight_bytes(&L->ffn_norm) +
             opt_bytes(&L->bq) + opt_bytes(&L->bk) + opt_bytes(&L->bv) + opt_bytes(&L->bo) +
             opt_bytes(&L->q_norm) + opt_bytes(&L->k_norm) + ffn_bytes(&L->mlp) +
             ffn_bytes(&L->shared) + opt_bytes(&L->shared_gate);
        if (L->moe >= 0)
            b += weight_bytes(&m->moe[L->moe].gate);
    }
    return b;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int32_t argmax(const float *v, int32_t n)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (v[i] > v[best])
            best = i;
    return best;
}

typedef struct {
    ferry_model *m;
    ferry_context *c;
    int32_t *prompt;
    float *logits;
    double *lat;       /* (repeat * gen_len) seconds per decoded token */
    double *prefill;   /* (repeat) tokens/s */
    double *decode;    /* (repeat) tokens/s */
} bench_state;

static void bench_free(bench_state *s)
{
    ferry_context_free(s->c);
    ferry_model_close(s->m);
    free(s->prompt);
    free(s->logits);
    free(s->lat);
    free(s->prefill);
    free(s->decode);
}

/* Offload counters of the decode steps (accumulated over runs). */
typedef struct {
    int64_t hits, misses, cpu_experts;
    uint64_t moved, from_disk, cpu_bytes;
    double stall, copy, cpu;
} decode_counters;

static void add_offload_delta(decode_counters *acc, const ferry_offload_stats *a,
                              const ferry_offload_stats *b)
{
    acc->hits += b->hits - a->hits;
    acc->misses += b->misses - a->misses;
    acc->moved += b->bytes_to_device - a->bytes_to_device;
    acc->from_disk += b->bytes_from_disk - a->bytes_from_disk;
    acc->stall += b->stall_seconds - a->stall_seconds;
    acc->copy += b->copy_seconds - a->copy_seconds;
    acc->cpu_experts += b->cpu_experts - a->cpu_experts;
    acc->cpu_bytes += b->cpu_bytes - a->cpu_bytes;
    acc->cpu += b->cpu_seconds - a->cpu_seconds;
}

static ferry_status run_all(bench_state *s, const ferry_bench_params *bp, decode_counters *dc)
{
    const ferry_config *cfg = &s->m->cfg;
    int32_t V = cfg->vocab_size, P = bp->prompt_len;
    int32_t G = bp->mode == FERRY_BENCH_DECODE ? bp->gen_len : 0;
    for (int32_t r = 0; r < bp->repeat; r++) {
        ferry_context_reset(s->c);
        double t0 = ferry_now_seconds();
        TRY(ferry_eval(s->c, s->prompt, P, s->logits));
        s->prefill[r] = (double)P / (ferry_now_seconds() - t0);
        ferry_offload_stats before, after;
        TRY(ferry_context_get_offload_stats(s->c, &before, NULL, 0));
        double total = 0;
        for (int32_t g = 0; g < G; g++) {
            int32_t next = argmax(s->logits, V);
            double t = ferry_now_seconds();
            TRY(ferry_eval(s->c, &next, 1, s->logits));
            double dt = ferry_now_seconds() - t;
            s->lat[(size_t)r * (size_t)G + (size_t)g] = dt;
            total += dt;
        }
        TRY(ferry_context_get_offload_stats(s->c, &after, NULL, 0));
        add_offload_delta(dc, &before, &after);
        s->decode[r] = G > 0 ? (double)G / total : 0;
    }
    return FERRY_OK;
}

/* A deterministic pseudo-random prompt: BOS (when the model has one), then ids spread over
 * the vocabulary, different for each seed. */
static void fill_prompt(int32_t *ids, int32_t n, const ferry_model_info *info, uint32_t seed)
{
    uint32_t span = (uint32_t)(info->n_vocab > 3 ? info->n_vocab - 3 : 1);
    for (int32_t i = 0; i < n; i++)
        ids[i] = i == 0 && info->bos_id >= 0
                     ? info->bos_id
                     : (int32_t)(3 + ((uint32_t)i + 7919u * seed) * 2654435761u % span);
}

/* Batch mode: bp->batch prompts generating gen_len tokens each, bp->repeat times. */
static ferry_status run_batch(ferry_model *m, const ferry_bench_params *bp, ferry_bench_result *res)
{
    ferry_model_info info;
    ferry_model_get_info(m, &info);
    int32_t B = bp->batch, P = bp->prompt_len, G = bp->gen_len;
    int32_t *ids = malloc((size_t)B * (size_t)(P + G) * sizeof *ids);
    int32_t **prompts = malloc((size_t)B * sizeof *prompts), **outs = malloc((size_t)B * sizeof *outs);
    int32_t *n_prompt = malloc((size_t)B * sizeof *n_prompt), *n_predict = malloc((size_t)B * sizeof *n_predict);
    int32_t *n_out = malloc((size_t)B * sizeof *n_out);
    double *rate = malloc((size_t)bp->repeat * sizeof *rate);
    double *loads = malloc((size_t)bp->repeat * sizeof *loads);
    double *moved = malloc((size_t)bp->repeat * sizeof *moved);
    ferry_status st = FERRY_OK;
    if (!ids || !prompts || !outs || !n_prompt || !n_predict || !n_out || !rate || !loads ||
        !moved) {
        st = ferry_fail(FERRY_ERR_NOMEM, "bench: out of memory for %d sequences", (int)B);
        goto done;
    }
    for (int32_t i = 0; i < B; i++) {
        prompts[i] = ids + (size_t)i * (size_t)(P + G);
        outs[i] = prompts[i] + P;
        n_prompt[i] = P;
        n_predict[i] = G;
        fill_prompt(prompts[i], P, &info, (uint32_t)i);
    }
    ferry_batch_params p = ferry_batch_params_default();
    p.stop_at_eos = 0;
    for (int32_t r = 0; r < bp->repeat && st == FERRY_OK; r++) {
        ferry_batch_stats bs;
        double t0 = ferry_now_seconds();
        st = ferry_batch_generate(m, (const int32_t *const *)prompts, n_prompt, n_predict, B, &p,
                                  outs, n_out, &bs, NULL);
        double dt = ferry_now_seconds() - t0;
        int64_t made = 0;
        for (int32_t i = 0; i < B; i++)
            made += n_out[i];
        rate[r] = made > 0 ? (double)made / dt : 0;
        loads[r] = made > 0 ? (double)bs.expert_loads / (double)made : 0;
        moved[r] = made > 0 ? (double)bs.bytes_to_device / (double)made : 0;
    }
    if (st == FERRY_OK) {
        /* the median run by speed, with its own counters: the run with as many runs
         * slower than it as the middle of the sorted order has */
        int32_t med = 0;
        for (int32_t r = 0; r < bp->repeat; r++) {
            int32_t slower = 0, tied_before = 0;
            for (int32_t q = 0; q < bp->repeat; q++) {
                slower += rate[q] < rate[r];
                tied_before += q < r && rate[q] == rate[r];
            }
            if (slower + tied_before == bp->repeat / 2)
                med = r;
        }
        res->batch_tokens_per_s = rate[med];
        res->batch_expert_loads_per_token = loads[med];
        res->batch_moved_bytes_per_token = moved[med];
    }
done:
    free(ids);
    free(prompts);
    free(outs);
    free(n_prompt);
    free(n_predict);
    free(n_out);
    free(rate);
    free(loads);
    free(moved);
    return st;
}

ferry_status ferry_bench_run(const char *model_dir, const ferry_model_params *mp,
                             const ferry_bench_params *bp, ferry_bench_result *out)
{
    if (!model_dir || !mp || !bp || !out)
        return ferry_fail(FERRY_ERR_INVALID, "ferry_bench_run: NULL argument");
    if (bp->mode != FERRY_BENCH_DECODE && bp->mode != FERRY_BENCH_PREFILL &&
        bp->mode != FERRY_BENCH_BATCH)
        return ferry_fail(FERRY_ERR_INVALID, "bench mode %d is not decode, prefill or batch",
                          (int)bp->mode);
    if (bp->mode == FERRY_BENCH_BATCH && (bp->batch < 1 || bp->batch > 4096))
        return ferry_fail(FERRY_ERR_INVALID, "bench: a batch of %d sequences (1 to 4096)",
                          (int)bp->batch);
    if (bp->prompt_len < 1 || bp->repeat < 1 || bp->repeat > 1000 ||
        (bp->mode != FERRY_BENCH_PREFILL && bp->gen_len < 1))
        return ferry_fail(FERRY_ERR_INVALID, "bench: prompt length %d, %d generated tokens, %d "
                          "repeats (need at least 1 each, at most 1000 repeats)",
                          (int)bp->prompt_len, (int)bp->gen_len, (int)bp->repeat);
    ferry_bench_result res;
    memset(&res, 0, sizeof res);
    bench_state s;
    memset(&s, 0, sizeof s);
    decode_counters dc;
    memset(&dc, 0, sizeof dc);
    ferry_status st;
    int32_t G = bp->mode != FERRY_BENCH_PREFILL ? bp->gen_len : 0;
    if ((st = ferry_model_open(model_dir, mp, &s.m)))
        goto done;
    {
        /* on the backend the model resolved to (AUTO has said its say once already) */
        ferry_model_info mi;
        ferry_model_get_info(s.m, &mi);
        ferry_model_params bw_params = *mp;
        bw_params.backend = mi.backend;
        char path[4096];
        if ((st = ferry_measure_bandwidths(&bw_params, bp->bandwidth_bytes, &res.bw)))
            goto done;
        uint64_t n = bp->bandwidth_bytes ? bp->bandwidth_bytes : FERRY_BENCH_BW_BYTES;
        if ((st = disk_file(s.m, model_dir, path, sizeof path)) ||
            (st = measure_disk(path, n, &res.bw)))
            goto done;
    }
    if (bp->mode == FERRY_BENCH_BATCH) {
        /* before any context: the sequences' KV caches come out of the budget first */
        ferry_model_info bi;
        ferry_model_get_info(s.m, &bi);
        res.backend = bi.backend;
        snprintf(res.device, sizeof res.device, "%s", bi.device);
        res.offload = s.m->store != NULL;
        if ((int64_t)bp->prompt_len + G > s.m->cfg.max_positions)
            st = ferry_fail(FERRY_ERR_INVALID, "bench: %d prompt + %d generated tokens exceed the "
                            "model's %d positions", (int)bp->prompt_len, (int)G,
                            (int)s.m->cfg.max_positions);
        else
            st = run_batch(s.m, bp, &res);
        if (st == FERRY_OK)
            *out = res;
        goto done;
    }
    const ferry_config *cfg = &s.m->cfg;
    if ((int64_t)bp->prompt_len + G > cfg->max_positions) {
        st = ferry_fail(FERRY_ERR_INVALID, "bench: %d prompt + %d generated tokens exceed the "
                        "model's %d positions", (int)bp->prompt_len, (int)G,
                        (int)cfg->max_positions);
        goto done;
    }
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = bp->prompt_len + G;
    if ((st = ferry_context_create(s.m, &cp, &s.c)))
        goto done;
    s.prompt = malloc((size_t)bp->prompt_len * sizeof *s.prompt);
    s.logits = malloc((size_t)cfg->vocab_size * sizeof *s.logits);
    s.lat = malloc(((size_t)bp->repeat * (size_t)G + 1) * sizeof *s.lat);
    s.prefill = malloc((size_t)bp->repeat * sizeof *s.prefill);
    s.decode = malloc((size_t)bp->repeat * sizeof *s.decode);
    if (!s.prompt || !s.logits || !s.lat || !s.prefill || !s.decode) {
        st = ferry_fail(FERRY_ERR_NOMEM, "bench: out of memory");
        goto done;
    }
    ferry_model_info info;
    ferry_model_get_info(s.m, &info);
    fill_prompt(s.prompt, bp->prompt_len, &info, 0);
    if (info.backend == FERRY_BACKEND_CPU) {
        ferry_offload_stats o;
        if ((st = ferry_context_get_offload_stats(s.c, &o, NULL, 0)))
            goto done;
        uint64_t experts = o.enabled ? o.slots_bytes
                                     : (uint64_t)cfg->n_moe_layers * (uint64_t)cfg->n_experts *
                                           ferry_model_expert_bytes(s.m);
        uint64_t kv = (uint64_t)(bp->prompt_len + G) * 2u * (uint64_t)cfg->n_layers *
                      (uint64_t)cfg->n_kv_heads * (uint64_t)cfg->head_dim * sizeof(float);
        uint64_t ws = dense_bytes_per_token(s.m) + experts + kv;
        double ws_gbps = 0;
        if ((st = measure_working_set_read(
                 mp, ws < FERRY_BENCH_BW_BYTES ? (size_t)ws : FERRY_BENCH_BW_BYTES, &ws_gbps)))
            goto done;
        res.bw.device_gbps = ws_gbps > res.bw.device_gbps ? ws_gbps : res.bw.device_gbps;
        res.working_set_bytes = ws;
    }
    if ((st = run_all(&s, bp, &dc)))
        goto done;

    qsort(s.prefill, (size_t)bp->repeat, sizeof *s.prefill, cmp_double);
    qsort(s.decode, (size_t)bp->repeat, sizeof *s.decode, cmp_double);
    res.prefill_tokens_per_s = s.prefill[bp->repeat / 2];
    res.backend = info.backend;
    snprintf(res.device, sizeof res.device, "%s", info.device);
    if (G > 0) {
        size_t n_lat = (size_t)bp->repeat * (size_t)G;
        qsort(s.lat, n_lat, sizeof *s.lat, cmp_double);
        res.decode_tokens_per_s = s.decode[bp->repeat / 2];
        res.latency_median_ms = 1e3 * s.lat[n_lat / 2];
        res.latency_p90_ms = 1e3 * s.lat[n_lat * 9 / 10];
        res.dense_bytes_per_token = dense_bytes_per_token(s.m);
        res.expert_bytes_per_token = (uint64_t)cfg->n_moe_layers * (uint64_t)cfg->n_experts_per_tok *
                                     ferry_model_expert_bytes(s.m);
        /* keys and values of every layer, float32, at the mean decode position */
        double mean_pos = bp->prompt_len + (G - 1) / 2.0 + 1;
        res.kv_bytes_per_token = (uint64_t)(mean_pos * 2.0 * cfg->n_layers * cfg->n_kv_heads *
                                            cfg->head_dim * sizeof(float));
        double n_dec = (double)bp->repeat * G;
        res.offload = s.m->store != NULL;
        if (res.offload) {
            res.hit_rate = ferry_expert_hit_rate(dc.hits, dc.misses, dc.cpu_experts);
            res.moved_bytes_per_token = (double)dc.moved / n_dec;
            res.disk_bytes_per_token = (double)dc.from_disk / n_dec;
            res.stall_ms_per_token = 1e3 * dc.stall / n_dec;
            res.fetch_gbps = dc.copy > 0 ? (double)dc.moved / dc.copy / 1e9 : 0;
        }
        res.hybrid = s.m->hybrid;
        if (res.hybrid != FERRY_HYBRID_OFF) {
            res.cpu_experts_per_token = (double)dc.cpu_experts / n_dec;
            res.cpu_bytes_per_token = (double)dc.cpu_bytes / n_dec;
            res.cpu_gbps = dc.cpu > 0 ? (double)dc.cpu_bytes / dc.cpu / 1e9 : 0;
        }
        double read = (double)(res.dense_bytes_per_token + res.expert_bytes_per_token +
                               res.kv_bytes_per_token) - res.cpu_bytes_per_token;
        double t_read = read / (res.bw.device_gbps * 1e9);
        double off = res.moved_bytes_per_token + res.cpu_bytes_per_token;
        double lanes = res.bw.pinned_h2d_gbps +
                       (res.hybrid != FERRY_HYBRID_OFF ? res.bw.host_read_gbps : 0);
        if (res.hybrid == FERRY_HYBRID_CPU_EXPERTS)
            lanes = res.bw.host_read_gbps; /* nothing crosses the bus */
        double t_move = lanes > 0 ? off / (lanes * 1e9) : 0;
        double t_disk = res.bw.disk_gbps > 0
                            ? res.disk_bytes_per_token / (res.bw.disk_gbps * 1e9)
                            : 0;
        double t = t_read > t_move ? t_read : t_move;
        t = t > t_disk ? t : t_disk;
        res.bound_tokens_per_s = t > 0 ? 1.0 / t : 0;
        res.fraction_of_bound =
            res.bound_tokens_per_s > 0 ? res.decode_tokens_per_s / res.bound_tokens_per_s : 0;
    }
    *out = res;
done:
    bench_free(&s);
    return st;
}
