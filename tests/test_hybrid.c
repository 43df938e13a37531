/*
 * tests/test_hybrid.c: hybrid execution (--hybrid). The cost model's plan on hand-made
 * cases (moe/hybrid.h), then the engine on the bundled model on the CPU backend, where the
 * CPU's share of the experts and the device's share compute with the same exact kernels:
 * outputs must be bit-identical whichever side computes an expert, the statistics must
 * account for every expert run, and a failure on the CPU's side must come back with its
 * message. The GPU's side is covered by test_cuda.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check_util.h"
#include "core/error.h"
#include "engine/context.h"
#include "engine/model.h"
#include "ferry.h"
#include "moe/hybrid.h"

#define MODEL_DIR FERRY_SOURCE_DIR "/models/tiny-moe-code"
#define N_GEN 16
#define BUDGET (20ull << 20)

/* ---- the plan ------------------------------------------------------------------------ */

static double makespan(const ferry_hybrid_cost *c, const ferry_hybrid_item *it, int32_t n,
                       const uint8_t *on_cpu)
{
    double cpu = 0, fetch = 0;
    for (int32_t i = 0; i < n; i++) {
        if (on_cpu[i])
            cpu += ferry_hybrid_cpu_seconds(c, &it[i]);
        else
            fetch += ferry_hybrid_fetch_seconds(c, &it[i]);
    }
    return cpu > fetch ? cpu : fetch;
}

START_TEST(test_hybrid_plan_balances_the_two_queues)
{
    /* a fetch and a one-token CPU run both take 1 s: four misses split two and two */
    ferry_hybrid_cost c = {.fetch_bytes_per_s = 100, .cpu_seconds_1 = 1,
                           .cpu_seconds_per_token = 0.5, .ref_bytes = 100};
    ferry_hybrid_item it[4] = {{100, 1}, {100, 1}, {100, 1}, {100, 1}};
    uint8_t on_cpu[4];
    double cpu_s, fetch_s;
    ck_assert_int_eq(ferry_hybrid_plan(&c, it, 4, on_cpu, &cpu_s, &fetch_s), 2);
    ck_assert_int_eq(on_cpu[0] + on_cpu[1] + on_cpu[2] + on_cpu[3], 2);
    ck_assert(fabs(cpu_s - 2) < 1e-12 && fabs(fetch_s - 2) < 1e-12);
    /* the CPU's cost grows with tokens: the one-token expert goes to the CPU, the 9-token
     * one (1 + 8 * 0.5 = 5 s there) is fetched */
    ferry_hybrid_item two[2] = {{100, 9}, {100, 1}};
    ck_assert_int_eq(ferry_hybrid_plan(&c, two, 2, on_cpu, &cpu_s, &fetch_s), 1);
    ck_assert_int_eq(on_cpu[0], 0);
    ck_assert_int_eq(on_cpu[1], 1);
    /* a tie fetches (a fetched expert stays cached) */
    ferry_hybrid_item one[1] = {{100, 1}};
    ck_assert_int_eq(ferry_hybrid_plan(&c, one, 1, on_cpu, NULL, NULL), 0);
    ck_assert_int_eq(on_cpu[0], 0);
    /* a CPU four times faster than the bus: 8 of 10 on the CPU (2 s each side) */
    c.cpu_seconds_1 = 0.25;
    ferry_hybrid_item many[10];
    for (int i = 0; i < 10; i++)
        many[i] = (ferry_hybrid_item){100, 1};
    uint8_t flags[10];
    ck_assert_int_eq(ferry_hybrid_plan(&c, many, 10, flags, &cpu_s, &fetch_s), 8);
    ck_assert(cpu_s == 2.0 && fetch_s == 2.0);
}
END_TEST

START_TEST(test_hybrid_plan_never_worse_than_one_side)
{
    uint64_t rng = 42;
    for (int round = 0; round < 2000; round++) {
        ferry_hybrid_cost c = {.fetch_bytes_per_s = tu_rand_uniform(&rng, 1, 100),
                               .cpu_seconds_1 = tu_rand_uniform(&rng, 0.01f, 10),
                               .cpu_seconds_per_token = tu_rand_uniform(&rng, 0, 2),
                               .ref_bytes = 100};
        int32_t n = (int32_t)(tu_rand_u64(&rng) % 40);
        ferry_hybrid_item it[40];
        for (int32_t i = 0; i < n; i++)
            it[i] = (ferry_hybrid_item){(size_t)(50 + tu_rand_u64(&rng) % 100),
                                        (int32_t)(1 + tu_rand_u64(&rng) % 20)};
        uint8_t plan[40], all[40];
        double cpu_s, fetch_s;
        int32_t k = ferry_hybrid_plan(&c, it, n, plan, &cpu_s, &fetch_s);
        int32_t count = 0;
        for (int32_t i = 0; i < n; i++)
            count += plan[i];
        ck_assert_int_eq(k, count);
        double got = makespan(&c, it, n, plan);
        ck_assert(fabs(got - (cpu_s > fetch_s ? cpu_s : fetch_s)) < 1e-9 * (1 + got));
        memset(all, 0, sizeof all);
        ck_assert(got <= makespan(&c, it, n, all) + 1e-12);
        memset(all, 1, sizeof all);
        ck_assert(got <= makespan(&c, it, n, all) + 1e-12);
    }
}
END_TEST

START_TEST(test_hybrid_plan_rejects_nonsense_costs)
{
    ferry_hybrid_item it[2] = {{100, 1}, {100, 1}};
    uint8_t on_cpu[2] = {7, 7};
    ferry_hybrid_cost bad[] = {
        {0, 1, 0, 100}, {100, 0, 0, 100}, {100, 1, -1, 100}, {100, 1, 0, 0},
        {NAN, 1, 0, 100}, {100, INFINITY, 0, 100}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_int_eq(ferry_hybrid_plan(&bad[i], it, 2, on_cpu, NULL, NULL), 0);
        ck_assert(on_cpu[0] == 0 && on_cpu[1] == 0);
    }
    ferry_hybrid_cost c = {100, 1, 0, 100};
    ck_assert_int_eq(ferry_hybrid_plan(&c, it, 0, on_cpu, NULL, NULL), 0);
    ck_assert_int_eq(ferry_hybrid_plan(&c, it, -1, on_cpu, NULL, NULL), 0);
    ck_assert_int_eq(ferry_hybrid_plan(&c, it, FERRY_HYBRID_MAX_ITEMS + 1, on_cpu, NULL, NULL),
                     0);
}
END_TEST

/* ---- the engine ---------------------------------------------------------------------- */

#define PROMPT "def fibonacci(n):\n    if n <= 1:\n        return n\n"
static int32_t g_prompt[256];
static int32_t N_PROMPT;

typedef struct {
    float *logits; /* (N_PROMPT, V) */
    int32_t gen[N_GEN];
    ferry_offload_stats os;
    ferry_layer_stats layers[64];
    int64_t runs; /* (layer-batch, expert) pairs the forward passes computed */
} run_result;

static int32_t g_vocab;

/* Counts the experts each MoE block runs: the distinct experts of its routing. */
static void count_runs(void *user, int32_t layer, int32_t pos0, int32_t n, const float *logits,
                       const int32_t *experts, const float *weights)
{
    (void)layer;
    (void)pos0;
    (void)logits;
    (void)weights;
    int64_t *runs = user;
    uint8_t seen[256] = {0};
    for (int32_t i = 0; i < n * 2; i++)
        if (!seen[experts[i]]) {
            seen[experts[i]] = 1;
            (*runs)++;
        }
}

/* Opens the model with mp; when force_cost, replaces the measured cost model with it
 * before anything runs. Prefill (every logit) then a greedy continuation. */
static void run(const ferry_model_params *mp, const ferry_hybrid_cost *force_cost,
                run_result *r)
{
    ferry_model *m;
    ck_assert_msg(ferry_model_open(MODEL_DIR, mp, &m) == FERRY_OK, "%s", ferry_last_error());
    ferry_model_info info;
    ferry_model_get_info(m, &info);
    g_vocab = info.n_vocab;
    ck_assert_int_eq(info.n_experts_used, 2);
    ck_assert_int_eq(ferry_tokenize(m, PROMPT, strlen(PROMPT), 1, g_prompt, 256, &N_PROMPT),
                     FERRY_OK);
    ck_assert(N_PROMPT > 16); /* more than two layer-batches of 8 */
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = 64;
    cp.n_batch = 8; /* several layer-batches per prefill */
    ferry_context *c;
    ck_assert_msg(ferry_context_create(m, &cp, &c) == FERRY_OK, "%s", ferry_last_error());
    if (force_cost)
        m->hybrid_cost = *force_cost;
    r->runs = 0;
    ferry_observer obs = {.on_route = count_runs, .user = &r->runs};
    ferry_context_set_observer(c, &obs);
    r->logits = malloc((size_t)N_PROMPT * (size_t)g_vocab * sizeof(float));
    ck_assert(r->logits != NULL);
    ck_assert_msg(ferry_context_forward(c, g_prompt, N_PROMPT, r->logits, NULL) == FERRY_OK, "%s",
                  ferry_last_error());
    ferry_context_reset(c);
    r->runs = 0;
    ferry_generate_params gp = ferry_generate_params_default();
    gp.n_predict = N_GEN;
    gp.stop_at_eos = 0;
    int32_t n_out;
    ck_assert_msg(ferry_generate(c, g_prompt, N_PROMPT, &gp, NULL, NULL, r->gen, N_GEN, &n_out) ==
                      FERRY_OK,
                  "%s", ferry_last_error());
    ck_assert_int_eq(n_out, N_GEN);
    ck_assert_int_eq(ferry_context_get_offload_stats(c, &r->os, r->layers, info.n_layers),
                     FERRY_OK);
    ferry_context_free(c);
    ferry_model_close(m);
}

static ferry_model_params params(int32_t hybrid, uint64_t gpu_mem)
{
    ferry_model_params mp = ferry_model_params_default();
    mp.backend = FERRY_BACKEND_CPU;
    mp.n_threads = 2;
    mp.hybrid = hybrid;
    mp.gpu_mem_bytes = gpu_mem;
    return mp;
}

static void assert_same(const run_result *a, const run_result *b, const char *what)
{
    ck_assert_msg(memcmp(a->logits, b->logits, (size_t)N_PROMPT * (size_t)g_vocab * sizeof(float)) ==
                      0,
                  "%s: logits differ from the reference run", what);
    ck_assert_msg(memcmp(a->gen, b->gen, sizeof a->gen) == 0, "%s: tokens differ", what);
}

static run_result g_ref;

static void setup_ref(void)
{
    ferry_model_params mp = params(FERRY_HYBRID_OFF, 0);
    run(&mp, NULL, &g_ref);
}

static void teardown(void) { free(g_ref.logits); }

START_TEST(test_hybrid_cpu_experts_is_lossless_and_counted)
{
    /* resident and with a device budget: every expert on the CPU, nothing fetched */
    for (int b = 0; b < 2; b++) {
        ferry_model_params mp = params(FERRY_HYBRID_CPU_EXPERTS, b ? BUDGET : 0);
        run_result r;
        run(&mp, NULL, &r);
        assert_same(&r, &g_ref, b ? "cpu-experts with --gpu-mem" : "cpu-experts");
        ck_assert_int_eq(r.os.hybrid, FERRY_HYBRID_CPU_EXPERTS);
        ck_assert_int_eq(r.os.enabled, 1);
        ck_assert(r.runs > 0);
        ck_assert_int_eq(r.os.cpu_experts, r.runs);
        ck_assert_int_eq(r.os.hits + r.os.misses, 0);
        ck_assert_int_eq(r.os.bytes_to_device, 0);
        ck_assert_int_eq(r.os.n_slots, 0);
        ck_assert(r.os.cpu_bytes > 0 && r.os.cpu_tokens >= r.os.cpu_experts);
        int64_t sum = 0;
        for (int l = 0; l < 6; l++)
            sum += r.layers[l].cpu_experts;
        ck_assert_int_eq(sum, r.os.cpu_experts);
        free(r.logits);
    }
}
END_TEST

START_TEST(test_hybrid_auto_is_lossless_whichever_side_computes)
{
    /* the measured cost model, then one that sends every miss to the CPU (a bus a million
     * times slower) and one that sends none (a CPU a million times slower) */
    const ferry_hybrid_cost slow_bus = {1e-3, 1e-6, 0, 430080};
    const ferry_hybrid_cost slow_cpu = {1e12, 1e3, 1e3, 430080};
    const ferry_hybrid_cost *costs[] = {NULL, &slow_bus, &slow_cpu};
    const char *names[] = {"measured", "slow bus", "slow CPU"};
    for (int i = 0; i < 3; i++) {
        for (int prefetch = 0; prefetch < 2; prefetch++) {
            ferry_model_params mp = params(FERRY_HYBRID_AUTO, BUDGET);
            mp.prefetch = prefetch;
            mp.max_slots = 4;
            run_result r;
            run(&mp, costs[i], &r);
            assert_same(&r, &g_ref, names[i]);
            ck_assert_int_eq(r.os.hybrid, FERRY_HYBRID_AUTO);
            ck_assert(r.os.cost_fetch_bytes_per_s > 0 && r.os.cost_cpu_bytes_per_s > 0);
            /* every run is a hit, a fetch or the CPU's */
            ck_assert_int_eq(r.os.hits + r.os.misses + r.os.cpu_experts, r.runs);
            if (costs[i] == &slow_bus) {
                ck_assert_int_eq(r.os.misses, 0);
                ck_assert(r.os.cpu_experts > 0);
            } else if (costs[i] == &slow_cpu) {
                ck_assert_int_eq(r.os.cpu_experts, 0);
                ck_assert(r.os.misses > 0);
            }
            if (!prefetch && costs[i] == &slow_bus)
                ck_assert_int_eq(r.os.bytes_to_device, 0);
            free(r.logits);
        }
    }
}
END_TEST

START_TEST(test_hybrid_off_fetches_every_miss)
{
    ferry_model_params mp = params(FERRY_HYBRID_OFF, BUDGET);
    mp.max_slots = 4;
    run_result r;
    run(&mp, NULL, &r);
    assert_same(&r, &g_ref, "off");
    ck_assert_int_eq(r.os.hybrid, FERRY_HYBRID_OFF);
    ck_assert_int_eq(r.os.cpu_experts, 0);
    ck_assert_int_eq(r.os.hits + r.os.misses, r.runs);
    free(r.logits);
}
END_TEST

START_TEST(test_hybrid_cpu_failure_comes_back_with_its_message)
{
    /* a pack whose every expert of layer 1 is corrupt, on the NVMe tier, with every miss
     * sent to the CPU: the worker's checksum failure must surface from the forward pass */
    char dir[512], pack[600];
    tu_scratch_dir(dir, "hybrid");
    snprintf(pack, sizeof pack, "%s/tiny.pack", dir);
    ck_assert_msg(ferry_pack_model(MODEL_DIR, pack, NULL) == FERRY_OK, "%s", ferry_last_error());
    size_t len;
    char *bytes = tu_read_file(pack, &len);
    long stride = (430080 + 4095) / 4096 * 4096;
    long header = (long)(len - 48 * (size_t)stride);
    ck_assert(header > 0);
    for (int e = 0; e < 8; e++)
        bytes[header + (8 + e) * stride + 77] ^= 0x10;
    char bad[512];
    tu_write_file(bad, "corrupt.pack", bytes, len);
    free(bytes);

    ferry_model_params mp = params(FERRY_HYBRID_AUTO, BUDGET);
    mp.offload = FERRY_OFFLOAD_NVME;
    mp.pack_path = bad;
    mp.prefetch = 0;
    mp.reader = FERRY_READ_PREAD;
    ferry_model *m;
    ck_assert_msg(ferry_model_open(MODEL_DIR, &mp, &m) == FERRY_OK, "%s", ferry_last_error());
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = 64;
    ferry_context *c;
    ck_assert_msg(ferry_context_create(m, &cp, &c) == FERRY_OK, "%s", ferry_last_error());
    m->hybrid_cost = (ferry_hybrid_cost){1e-3, 1e-6, 0, 430080};
    float *logits = malloc((size_t)g_vocab * sizeof(float));
    ferry_status st = ferry_eval(c, g_prompt, N_PROMPT, logits);
    ck_assert_int_eq(st, FERRY_ERR_FORMAT);
    ck_assert_msg(strstr(ferry_last_error(), "layer 1 expert") != NULL, "message: %s",
                  ferry_last_error());
    ferry_offload_stats os;
    ck_assert_int_eq(ferry_context_get_offload_stats(c, &os, NULL, 0), FERRY_OK);
    ck_assert(os.cpu_experts > 0);
    /* the context stays usable: a failed step leaves n_past where it was */
    ck_assert_int_eq(ferry_context_n_past(c), 0);
    free(logits);
    ferry_context_free(c);
    ferry_model_close(m);
}
END_TEST

START_TEST(test_hybrid_bad_options)
{
    ferry_model *m = NULL;
    ferry_model_params mp = params(3, 0);
    ck_assert_int_eq(ferry_model_open(MODEL_DIR, &mp, &m), FERRY_ERR_INVALID);
    ck_assert(strstr(ferry_last_error(), "hybrid mode 3") != NULL);
    mp = params(FERRY_HYBRID_CPU_EXPERTS, BUDGET);
    mp.offload = FERRY_OFFLOAD_NVME;
    ck_assert_int_eq(ferry_model_open(MODEL_DIR, &mp, &m), FERRY_ERR_INVALID);
    ck_assert(strstr(ferry_last_error(), "--offload nvme") != NULL);
    mp = params(FERRY_HYBRID_AUTO, 0);
    mp.cpu_kernels = 9;
    ck_assert_int_eq(ferry_model_open(MODEL_DIR, &mp, &m), FERRY_ERR_INVALID);
    ck_assert(m == NULL);
}
END_TEST

static Suite *hybrid_suite(void)
{
    Suite *s = suite_create("hybrid");
    TCase *plan = tcase_create("plan");
    tcase_add_test(plan, test_hybrid_plan_balances_the_two_queues);
    tcase_add_test(plan, test_hybrid_plan_never_worse_than_one_side);
    tcase_add_test(plan, test_hybrid_plan_rejects_nonsense_costs);
    suite_add_tcase(s, plan);
    TCase *engine = tcase_create("engine");
    tcase_set_timeout(engine, 600);
    tcase_add_unchecked_fixture(engine, setup_ref, teardown);
    tcase_add_test(engine, test_hybrid_cpu_experts_is_lossless_and_counted);
    tcase_add_test(engine, test_hybrid_auto_is_lossless_whichever_side_computes);
    tcase_add_test(engine, test_hybrid_off_fetches_every_miss);
    tcase_add_test(engine, test_hybrid_cpu_failure_comes_back_with_its_message);
    tcase_add_test(engine, test_hybrid_bad_options);
    suite_add_tcase(s, engine);
    return s;
}

int main(void) { return tu_run_suite(hybrid_suite()); }
