/*
 * tests/fuzz/fuzz_config.c: config.json (format/config.c, ferry_config_parse, from memory).
 * Dictionaries: json.dict
 *
 * An accepted config must hold what config.h promises to the code that trusts it: every
 * count and width in its range, the head and expert counts consistent (n_kv_heads divides
 * n_heads, head_dim even, top-k within the experts), token ids inside the vocabulary, eps and
 * theta positive and finite, and the two layer maps (decoder layer <-> MoE layer) inverse to
 * each other with a dense width exactly when some layer is dense. A rejected one must get a
 * message naming the origin.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "format/config.h"
#include "tests/fuzz/fuzz_util.h"

#define ORIGIN "fuzz/config.json"

static void check_range(const char *what, int64_t v, int64_t lo, int64_t hi)
{
    FUZZ_CHECK(v >= lo && v <= hi, "%s = %lld outside [%lld, %lld]", what, (long long)v,
               (long long)lo, (long long)hi);
}

static void check_config(const ferry_config *c)
{
    const int64_t dim = FERRY_CONFIG_MAX_DIM, count = FERRY_CONFIG_MAX_COUNT;
    FUZZ_CHECK(c->arch != NULL, "no family");
    check_range("vocab_size", c->vocab_size, 1, FERRY_CONFIG_MAX_VOCAB);
    check_range("hidden_size", c->hidden_size, 1, dim);
    check_range("intermediate_size", c->intermediate_size, 1, dim);
    check_range("n_layers", c->n_layers, 1, count);
    check_range("n_heads", c->n_heads, 1, count);
    check_range("n_kv_heads", c->n_kv_heads, 1, c->n_heads);
    FUZZ_CHECK(c->n_heads % c->n_kv_heads == 0, "n_heads %d, n_kv_heads %d", c->n_heads,
               c->n_kv_heads);
    check_range("head_dim", c->head_dim, 2, dim);
    FUZZ_CHECK(c->head_dim % 2 == 0, "head_dim %d is odd", c->head_dim);
    check_range("n_heads x head_dim", (int64_t)c->n_heads * c->head_dim, 2, dim);
    check_range("n_experts", c->n_experts, 1, FERRY_CONFIG_MAX_EXPERTS);
    check_range("n_experts_per_tok", c->n_experts_per_tok, 1, c->n_experts);
    check_range("max_positions", c->max_positions, 1, FERRY_CONFIG_MAX_VOCAB);
    check_range("sliding_window", c->sliding_window, 0, INT32_MAX);
    check_range("bos_id", c->bos_id, -1, c->vocab_size - 1);
    check_range("n_eos", c->n_eos, 0, FERRY_CONFIG_MAX_EOS);
    for (int32_t i = 0; i < c->n_eos; i++)
        check_range("eos_ids[i]", c->eos_ids[i], 0, c->vocab_size - 1);
    FUZZ_CHECK(isfinite(c->rope_theta) && c->rope_theta > 0, "rope_theta %g",
               (double)c->rope_theta);
    FUZZ_CHECK(isfinite(c->rms_eps) && c->rms_eps > 0, "rms_eps %g", (double)c->rms_eps);
    FUZZ_CHECK(isfinite(c->clip_qkv) && c->clip_qkv >= 0, "clip_qkv %g", (double)c->clip_qkv);
    check_range("tie_word_embeddings", c->tie_word_embeddings, 0, 1);

    check_range("n_moe_layers", c->n_moe_layers, 1, c->n_layers);
    int32_t n_sparse = 0;
    for (int32_t l = 0; l < c->n_layers; l++) {
        int32_t m = c->moe_index[l];
        check_range("moe_index[l]", m, -1, c->n_moe_layers - 1);
        if (m < 0)
            continue;
        FUZZ_CHECK(c->moe_layer[m] == l, "moe_index[%d] = %d, moe_layer[%d] = %d", l, m, m,
                   c->moe_layer[m]);
        FUZZ_CHECK(m == n_sparse, "sparse layer %d is MoE layer %d, expected %d", l, m,
                   n_sparse);
        n_sparse++;
    }
    FUZZ_CHECK(n_sparse == c->n_moe_layers, "%d sparse layers, n_moe_layers %d", n_sparse,
               c->n_moe_layers);
    FUZZ_CHECK((c->dense_ff > 0) == (c->n_moe_layers < c->n_layers), "dense_ff %d with %d of "
               "%d layers sparse", c->dense_ff, c->n_moe_layers, c->n_layers);
    check_range("dense_ff", c->dense_ff, 0, dim);
    check_range("shared_ff", c->shared_ff, 0, dim);
    FUZZ_CHECK((c->shared_ff > 0) == (c->arch->key_shared_ff != NULL), "shared_ff %d for %s",
               c->shared_ff, c->arch->model_type);
    check_range("sliding_from", c->sliding_from, 0, c->n_layers);
    check_range("norm_topk", c->norm_topk, 0, 1);
    check_range("qkv_bias", c->qkv_bias, 0, 1);
    check_range("o_bias", c->o_bias, 0, 1);
}

FUZZ_INITIALIZE_QUIET()

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ferry_config c;
    memset(&c, 0x5a, sizeof c);
    ferry_status st = ferry_config_parse((const char *)data, size, ORIGIN, &c);
    if (st != FERRY_OK) {
        fuzz_check_rejection(st, ORIGIN);
        ferry_config untouched;
        memset(&untouched, 0x5a, sizeof untouched);
        FUZZ_CHECK(memcmp(&c, &untouched, sizeof c) == 0, "a failed parse wrote its output");
        return 0;
    }
    check_config(&c);
    return 0;
}
