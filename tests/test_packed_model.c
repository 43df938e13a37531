/*
 * tests/test_packed_model.c: the bundled model run from packs (ferry pack, --pack FILE).
 * An as-stored pack computes exactly what the checkpoint does; q8 and q4 packs keep the
 * held-out perplexity close to bf16 (q8 within 0.1%); a quantized pack gives bit-identical
 * logits on the CPU whether experts are resident, offloaded to RAM or NVMe, or computed by
 * the hybrid CPU share; a corrupt or foreign pack is refused at open, naming what is wrong.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check_util.h"
#include "engine/model.h"
#include "ferry.h"
#include "offload/pack.h"

#define MODEL_DIR FERRY_SOURCE_DIR "/models/tiny-moe-code"
#define HELDOUT FERRY_SOURCE_DIR "/tests/fixtures/heldout-python.txt"
#define PROMPT "import os\n\ndef list_files(path):\n    \"\"\"Return the files under path.\"\"\"\n"

static char g_dir[512], g_as_stored[600], g_q8[600], g_q4[600];

static void pack(const char *path, ferry_pack_format format)
{
    ferry_pack_params pp = ferry_pack_params_default();
    pp.format = format;
    ck_assert_msg(ferry_pack_model(MODEL_DIR, path, &pp) == FERRY_OK, "%s", ferry_last_error());
}

static void setup(void)
{
    tu_scratch_dir(g_dir, "packed_model");
    snprintf(g_as_stored, sizeof g_as_stored, "%s/as-stored.pack", g_dir);
    snprintf(g_q8, sizeof g_q8, "%s/q8.pack", g_dir);
    snprintf(g_q4, sizeof g_q4, "%s/q4.pack", g_dir);
    pack(g_as_stored, FERRY_PACK_AS_STORED);
    pack(g_q8, FERRY_PACK_Q8);
    pack(g_q4, FERRY_PACK_Q4);
}

static ferry_model_params cpu_params(const char *pack_path)
{
    ferry_model_params mp = ferry_model_params_default();
    mp.backend = FERRY_BACKEND_CPU;
    mp.n_threads = 2;
    mp.hybrid = FERRY_HYBRID_OFF;
    mp.pack_path = pack_path;
    return mp;
}

/* Logits after the prompt and after each of 6 greedy steps: 7 x n_vocab floats (caller
 * frees); offload statistics into *os when not NULL. */
static float *run_logits(const ferry_model_params *mp, ferry_offload_stats *os)
{
    ferry_model *m;
    ck_assert_msg(ferry_model_open(MODEL_DIR, mp, &m) == FERRY_OK, "%s", ferry_last_error());
    ferry_model_info info;
    ferry_model_get_info(m, &info);
    ferry_context_params cp = ferry_context_params_default();
    cp.n_ctx = 256;
    ferry_context *c;
    ck_assert_msg(ferry_context_create(m, &cp, &c) == FERRY_OK, "%s", ferry_last_error());
    int32_t ids[256], n;
    ck_assert_int_eq(ferry_tokenize(m, PROMPT, strlen(PROMPT), 1, ids, 256, &n), FERRY_OK);
    size_t V = (size_t)info.n_vocab;
    float *out = malloc(7 * V * sizeof(float));
    ck_assert_msg(ferry_eval(c, ids, n, out) == FERRY_OK, "%s", ferry_last_error());
    for (int step = 1; step < 7; step++) {
        const float *prev = out + (size_t)(step - 1) * V;
        int32_t best = 0;
        for (size_t v = 1; v < V; v++)
            if (prev[v] > prev[best])
                best = (int32_t)v;
        ck_assert_int_eq(ferry_eval(c, &best, 1, out + (size_t)step * V), FERRY_OK);
    }
    if (os)
        ck_assert_int_eq(ferry_context_get_offload_stats(c, os, NULL, 0), FERRY_OK);
    ferry_context_free(c);
    ferry_model_close(m);
    return out;
}

static void assert_same_logits(const char *what, const float *got, const float *want)
{
    size_t V = 4096; /* the bundled model's vocabulary */
    for (size_t i = 0; i < 7 * V; i++)
        ck_assert_msg(memcmp(&got[i], &want[i], sizeof(float)) == 0,
                      "%s: step %zu logit %zu is %.9g, expected %.9g", what, i / V, i % V,
                      (double)got[i], (double)want[i]);
}

START_TEST(test_packed_as_stored_computes_as_the_checkpoint)
{
    ferry_model_params mp = cpu_params(NULL);
    float *ckpt = run_logits(&mp, NULL);
    mp = cpu_params(g_as_stored);
    float *packed = run_logits(&mp, NULL);
    assert_same_logits("as-stored pack", packed, ckpt);
    /* a quantized pack really changes the weights */
    mp = cpu_params(g_q4);
    float *q4 = run_logits(&mp, NULL);
    ck_assert(memcmp(q4, ckpt, 4096 * sizeof(float)) != 0);
    free(ckpt);
    free(packed);
    free(q4);
}
END_TEST

static double perplexity(const char *pack_path)
{
    ferry_model_params mp = cpu_params(pack_path);
    ferry_model *m;
    ck_assert_msg(ferry_model_open(MODEL_DIR, &mp, &m) == FERRY_OK, "%s", ferry_last_error());
    size_t len;
    char *text = tu_read_file(HELDOUT, &len);
    ferry_perplexity_result r;
    ck_assert_msg(ferry_perplexity(m, text, len, 256, &r) == FERRY_OK, "%s", ferry_last_error());
    free(text);
    ferry_model_close(m);
    return r.perplexity;
}

/* The quality the formats keep on held-out code (the figures the README quotes come from
 * `ferry perplexity --pack`): q8 within 0.1% of bf16; q4 loses more than q8 and stays
 * within 2% (1.04% measured). */
START_TEST(test_packed_quality_on_heldout_text)
{
    double bf16 = perplexity(NULL), q8 = perplexity(g_q8), q4 = perplexity(g_q4);
    double d8 = q8 / bf16 - 1, d4 = q4 / bf16 - 1;
    printf("held-out perplexity, window 256: bf16 %.4f, q8 %.4f (%+.3f%%), q4 %.4f (%+.3f%%)\n",
           bf16, q8, 100 * d8, q4, 100 * d4);
    ck_assert_msg(fabs(d8) < 1e-3, "q8 moves perplexity by %.4f%%", 100 * d8);
    ck_assert_msg(d4 < 0.02, "q4 raises perplexity by %.4f%%", 100 * d4);
    ck_assert_msg(fabs(d4) > fabs(d8), "q4 (%.4f%%) should lose more than q8 (%.4f%%)",
                  100 * d4, 100 * d8);
}
END_TEST

/* The lossless invariants hold for quantized experts as for bf16 ones: wherever the
 * experts live and whoever computes them, the CPU gives the same bits. */
START_TEST(test_packed_q4_identical_in_every_mode)
{
    ferry_model_params mp = cpu_params(g_q4);
    float *resident = run_logits(&mp, NULL);

    /* the minimum budget: dense + context + top-k slots; a few slots more so experts miss */
    ferry_offload_stats os;
    mp.gpu_mem_bytes = 256ull << 20;
    free(run_logits(&mp, &os));
    ck_assert_uint_eq(os.slot_bytes % 256, 0);
    ck_assert_msg(os.slot_bytes < 3 * 384 * 192 * 2 / 3, "a q4 slot of %llu bytes is not about "
                  "5/16 of a bf16 expert", (unsigned long long)os.slot_bytes);
    uint64_t budget = os.dense_bytes + os.context_bytes + 5 * os.slot_bytes;

    const struct {
        const char *what;
        int32_t offload, hybrid;
        uint64_t gpu_mem;
    } modes[] = {
        {"ram tier", FERRY_OFFLOAD_RAM, FERRY_HYBRID_OFF, budget},
        {"nvme tier", FERRY_OFFLOAD_NVME, FERRY_HYBRID_OFF, budget},
        {"hybrid auto", FERRY_OFFLOAD_RAM, FERRY_HYBRID_AUTO, budget},
        {"cpu-experts", FERRY_OFFLOAD_RAM, FERRY_HYBRID_CPU_EXPERTS, 0},
        {"cpu-experts with a budget", FERRY_OFFLOAD_RAM, FERRY_HYBRID_CPU_EXPERTS, 256ull << 20},
    };
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        mp = cpu_params(g_q4);
        mp.offload = modes[i].offload;
        mp.hybrid = modes[i].hybrid;
        mp.gpu_mem_bytes = modes[i].gpu_mem;
        float *got = run_logits(&mp, &os);
        assert_same_logits(modes[i].what, got, resident);
        if (i < 2)
            ck_assert_msg(os.misses > 0, "%s: no expert missed", modes[i].what);
        free(got);
    }
    free(resident);
}
END_TEST

/* A pack whose expert bytes were changed fails at open, naming the expert. */
START_TEST(test_packed_corrupt_pack_refused_at_open)
{
    size_t len;
    char *bytes = tu_read_file(g_q4, &len);
    ferry_pack *p;
    ck_assert_int_eq(ferry_pack_open(g_q4, NULL, &p), FERRY_OK);
    const ferry_pack_entry *pe = ferry_pack_get(p, 2, 3);
    bytes[pe->offset + pe->part_bytes[0] + 17] ^= 0x10; /* inside w3 */
    ferry_pack_close(p);
    char path[512];
    tu_write_file(path, "corrupt-q4.pack", bytes, len);
    free(bytes);
    /* checked over the mapping (resident, cpu-experts) or over the RAM tier's copies */
    for (int mode = 0; mode < 3; mode++) {
        ferry_model_params mp = cpu_params(path);
        if (mode == 1)
            mp.hybrid = FERRY_HYBRID_CPU_EXPERTS;
        if (mode == 2)
            mp.gpu_mem_bytes = 20 << 20;
        ferry_model *m = NULL;
        ck_assert_int_eq(ferry_model_open(MODEL_DIR, &mp, &m), FERRY_ERR_FORMAT);
        ck_assert_msg(strstr(ferry_last_error(), "layer 2 expert 3") &&
                          strstr(ferry_last_error(), "checksum"),
                      "mode %d: %s", mode, ferry_last_error());
        ck_assert_ptr_null(m);
    }
}
END_TEST

static ferry_status tiny_source(void *user, int32_t l, int32_t e, int32_t which,
                                const void **data, ferry_dtype *dtype)
{
    (void)l, (void)e, (void)which;
    *data = user;
    *dtype = FERRY_DTYPE_BF16;
    return FERRY_OK;
}

/* A pack of another model, a missing pack and a bad format are refused with a reason. */
START_TEST(test_packed_foreign_missing_and_bad_arguments)
{
    static uint16_t zeros[64 * 64];
    char path[600];
    snprintf(path, sizeof path, "%s/other.pack", g_dir);
    ferry_pack_shape other = {6, 8, 64, 64, 0};
    ck_assert_int_eq(ferry_pack_write(path, &other, tiny_source, NULL, zeros), FERRY_OK);
    ferry_model_params mp = cpu_params(path);
    ferry_model *m = NULL;
    ck_assert_int_eq(ferry_model_open(MODEL_DIR, &mp, &m), FERRY_ERR_FORMAT);
    ck_assert_msg(strstr(ferry_last_error(), "d_model 64, the model has 192"), "%s",
                  ferry_last_error());
    snprintf(path, sizeof path, "%s/missing.pack", g_dir);
    mp = cpu_params(path);
    ck_assert_int_eq(ferry_model_open(MODEL_DIR, &mp, &m), FERRY_ERR_IO);
    ck_assert(strstr(ferry_last_error(), "missing.pack") != NULL);

    ferry_pack_params pp = ferry_pack_params_default();
    pp.format = 7;
    snprintf(path, sizeof path, "%s/bad.pack", g_dir);
    ck_assert_int_eq(ferry_pack_model(MODEL_DIR, path, &pp), FERRY_ERR_INVALID);
    ck_assert(strstr(ferry_last_error(), "pack format 7") != NULL);
    ck_assert_int_eq(ferry_pack_model(NULL, path, NULL), FERRY_ERR_INVALID);
    ck_assert_int_eq(ferry_pack_model(FERRY_SOURCE_DIR "/no-such-model", path, NULL),
                     FERRY_ERR_IO);
}
END_TEST

/* A pack of another checkpoint of the same shape (a synthetic one with the bundled model's
 * shape) is refused by its fingerprint, with the experts resident and on the NVMe tier. Its
 * own model opens it. */
START_TEST(test_packed_other_checkpoint_same_shape_refused)
{
    char synth_dir[600], path[700];
    snprintf(synth_dir, sizeof synth_dir, "%s/synth-tiny", g_dir);
    snprintf(path, sizeof path, "%s/synth-tiny.pack", g_dir);
    ferry_synth_params sp = ferry_synth_params_default();
    ck_assert_int_eq(ferry_synth_preset("tiny", &sp), FERRY_OK);
    sp.tokenizer_dir = MODEL_DIR;
    sp.n_threads = 2;
    ck_assert_msg(ferry_synth(&sp, synth_dir) == FERRY_OK, "%s", ferry_last_error());
    ck_assert_msg(ferry_pack_model(synth_dir, path, NULL) == FERRY_OK, "%s", ferry_last_error());

    ferry_model_params mp = cpu_params(path);
    ferry_model *m = NULL;
    ck_assert_int_eq(ferry_model_open(MODEL_DIR, &mp, &m), FERRY_ERR_FORMAT);
    ck_assert_msg(strstr(ferry_last_error(), "another checkpoint of the same shape"), "%s",
                  ferry_last_error());
    ck_assert_ptr_null(m);
    mp.gpu_mem_bytes = 20 << 20;
    mp.offload = FERRY_OFFLOAD_NVME;
    ck_assert_int_eq(ferry_model_open(MODEL_DIR, &mp, &m), FERRY_ERR_FORMAT);
    ck_assert_msg(strstr(ferry_last_error(), "another checkpoint of the same shape"), "%s",
                  ferry_last_error());
    mp = cpu_params(path);
    ck_assert_msg(ferry_model_open(synth_dir, &mp, &m) == FERRY_OK, "%s", ferry_last_error());
    ferry_model_close(m);
    /* the bundled model's own packs carry its fingerprint, the same for q4 and as stored */
    ferry_pack *a, *b;
    ck_assert_int_eq(ferry_pack_open(g_as_stored, NULL, &a), FERRY_OK);
    ck_assert_int_eq(ferry_pack_open(g_q4, NULL, &b), FERRY_OK);
    ck_assert_uint_ne(ferry_pack_get_shape(a).fingerprint, 0);
    ck_assert_uint_eq(ferry_pack_get_shape(a).fingerprint, ferry_pack_get_shape(b).fingerprint);
    ferry_pack_close(a);
    ck_assert_int_eq(ferry_pack_open(path, NULL, &a), FERRY_OK);
    ck_assert_uint_ne(ferry_pack_get_shape(a).fingerprint, ferry_pack_get_shape(b).fingerprint);
    ferry_pack_close(a);
    ferry_pack_close(b);
}
END_TEST

/* --quant-dense: the attention projections and the LM head become q8/q4 (embeddings,
 * norms and routers do not); the logits move a little; with q4 dense weights and a q4
 * pack, every placement of the experts still gives the same bits; a bad format is refused. */
START_TEST(test_packed_quant_dense)
{
    ferry_model_params mp = cpu_params(NULL);
    float *plain = run_logits(&mp, NULL);
    mp.quant_dense = FERRY_PACK_Q8;
    ferry_model *m;
    ck_assert_msg(ferry_model_open(MODEL_DIR, &mp, &m) == FERRY_OK, "%s", ferry_last_error());
    for (int32_t l = 0; l < 6; l++) {
        ck_assert_int_eq(m->layers[l].wq.dtype, FERRY_DTYPE_Q8);
        ck_assert_int_eq(m->layers[l].wk.dtype, FERRY_DTYPE_Q8);
        ck_assert_int_eq(m->layers[l].wv.dtype, FERRY_DTYPE_Q8);
        ck_assert_int_eq(m->layers[l].wo.dtype, FERRY_DTYPE_Q8);
        ck_assert_int_eq(m->moe[l].gate.dtype, FERRY_DTYPE_BF16);
        ck_assert_int_eq(m->layers[l].attn_norm.dtype, FERRY_DTYPE_BF16);
        ck_assert_int_eq(m->moe[l].experts[0].w1.dtype, FERRY_DTYPE_BF16);
    }
    ck_assert_int_eq(m->lm_head.dtype, FERRY_DTYPE_Q8);
    ck_assert_int_eq(m->embed.dtype, FERRY_DTYPE_BF16);
    ferry_model_close(m);
    float *q8 = run_logits(&mp, NULL);
    double num = 0, den = 0;
    for (size_t i = 0; i < 4096; i++) {
        num += ((double)q8[i] - plain[i]) * ((double)q8[i] - plain[i]);
        den += (double)plain[i] * plain[i];
    }
    ck_assert_msg(num > 0 && sqrt(num / den) < 2e-2, "q8 dense: relative L2 %g", sqrt(num / den));

    mp = cpu_params(g_q4);
    mp.quant_dense = FERRY_PACK_Q4;
    float *want = run_logits(&mp, NULL);
    mp.gpu_mem_bytes = 8 << 20;
    mp.max_slots = 4;
    float *ram = run_logits(&mp, NULL);
    assert_same_logits("q4 dense, RAM tier", ram, want);
    mp = cpu_params(g_q4);
    mp.quant_dense = FERRY_PACK_Q4;
    mp.hybrid = FERRY_HYBRID_CPU_EXPERTS;
    float *cpu = run_logits(&mp, NULL);
    assert_same_logits("q4 dense, cpu-experts", cpu, want);

    mp = cpu_params(NULL);
    mp.quant_dense = 3;
    ck_assert_int_eq(ferry_model_open(MODEL_DIR, &mp, &m), FERRY_ERR_INVALID);
    ck_assert_msg(strstr(ferry_last_error(), "dense weight format 3"), "%s", ferry_last_error());
    free(plain);
    free(q8);
    free(want);
    free(ram);
    free(cpu);
}
END_TEST

/* The pack's table says what each expert is: q4 parts, 20 bytes per 32 weights. */
START_TEST(test_packed_q4_table)
{
    ferry_pack *p;
    ferry_pack_shape want = {6, 8, 192, 384, 0};
    ck_assert_int_eq(ferry_pack_open(g_q4, &want, &p), FERRY_OK);
    for (int32_t l = 0; l < 6; l++)
        for (int32_t e = 0; e < 8; e++) {
            const ferry_pack_entry *pe = ferry_pack_get(p, l, e);
            for (int k = 0; k < 3; k++) {
                ck_assert_int_eq(pe->dtype[k], FERRY_DTYPE_Q4);
                ck_assert_uint_eq(pe->part_bytes[k], 384 * 192 / 32 * 20);
            }
        }
    ferry_pack_close(p);
    ck_assert_int_eq(ferry_pack_open(g_q8, &want, &p), FERRY_OK);
    ck_assert_int_eq(ferry_pack_get(p, 5, 7)->dtype[2], FERRY_DTYPE_Q8);
    ck_assert_uint_eq(ferry_pack_get(p, 5, 7)->n_bytes, 3 * 384 * 192 / 32 * 34);
    ferry_pack_close(p);
}
END_TEST

static Suite *packed_model_suite(void)
{
    Suite *s = suite_create("packed_model");
    TCase *tc = tcase_create("packed_model");
    tcase_set_timeout(tc, 900);
    tcase_add_unchecked_fixture(tc, setup, NULL);
    tcase_add_test(tc, test_packed_as_stored_computes_as_the_checkpoint);
    tcase_add_test(tc, test_packed_quality_on_heldout_text);
    tcase_add_test(tc, test_packed_q4_identical_in_every_mode);
    tcase_add_test(tc, test_packed_corrupt_pack_refused_at_open);
    tcase_add_test(tc, test_packed_foreign_missing_and_bad_arguments);
    tcase_add_test(tc, test_packed_q4_table);
    tcase_add_test(tc, test_packed_other_checkpoint_same_shape_refused);
    tcase_add_test(tc, test_packed_quant_dense);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(packed_model_suite()); }
