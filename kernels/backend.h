/*
 * kernels/backend.h: the backend table. The forward pass is written once against it; the
 * CPU backend (kernels/cpu) is the reference implementation of every entry, and other
 * backends are tested against it.
 *
 * Conventions for every op:
 * - Pointers named d_* are device memory of this backend (for the CPU backend, host
 *   memory). Activations are float32, row-major, one row per token.
 * - A matrix weight is row-major (rows, cols) as stored in the checkpoint (PyTorch's
 *   Linear layout, out_features x in_features), in f32, f16 or bf16, or, for matmul only,
 *   q8/q4 (groups of 32 along each row, kernels/quant.h; cols a multiple of 32, other ops
 *   refuse them with FERRY_ERR_UNSUPPORTED); products accumulate in float32. Quantized
 *   weights are read as their exact dequantized values, on the CUDA backend too (its
 *   quantized matmuls never round the activations: within 1e-5 of the CPU).
 * - Each output row depends only on its own input row (and, for attention, the KV cache),
 *   never on the other rows of the batch or on the thread count: this is what makes
 *   prefill, decode and any reordering of tokens produce bit-identical results. On the
 *   CPU backend this holds exactly. The CUDA backend computes matmuls of up to 8 rows in
 *   float32 (its GEMV) and larger ones through cuBLAS with the activations rounded to the
 *   weight's 16-bit type, so there a row's bits depend on the row count: the same call
 *   repeats bit for bit, and prefill agrees with decode within 1e-2, not exactly.
 * - Attention reads only the cache rows 0..pos0+n-1; rows past them may hold anything.
 * - Ops check their arguments and return FERRY_ERR_INVALID on nonsense, or
 *   FERRY_ERR_UNSUPPORTED for valid shapes a backend does not implement (the CUDA
 *   attention takes head_dim up to 256, its router top-k up to 64); they never abort.
 */
#ifndef FERRY_KERNELS_BACKEND_H
#define FERRY_KERNELS_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "ferry.h"
#include "kernels/dtype.h"

typedef struct {
    const void *d_data; /* (rows, cols) of dtype */
    ferry_dtype dtype;
    int64_t rows;
    int64_t cols;
} ferry_weight;

/* Shape of one attention call. */
typedef struct {
    int32_t n_heads;
    int32_t n_kv_heads;     /* divides n_heads (grouped-query attention) */
    int32_t head_dim;
    int32_t sliding_window; /* 0 = attend to every earlier position */
    float scale;            /* usually 1/sqrt(head_dim) */
} ferry_attn_shape;

typedef struct ferry_backend ferry_backend;

typedef struct {
    const char *name;
    void (*destroy)(ferry_backend *b);

    /* memory */
    ferry_status (*alloc)(ferry_backend *b, size_t n_bytes, void **d_out);
    void (*free)(ferry_backend *b, void *d);
    ferry_status (*upload)(ferry_backend *b, void *d_dst, const void *h_src, size_t n_bytes);
    ferry_status (*download)(ferry_backend *b, void *h_dst, const void *d_src, size_t n_bytes);
    ferry_status (*synchronize)(ferry_backend *b);
    /* Device memory: the budget (0 = no limit) and what is allocated now. */
    size_t (*mem_capacity)(ferry_backend *b);
    size_t (*mem_used)(ferry_backend *b);

    /* Asynchronous host-to-device copy on the backend's copy queue (the copy engine),
     * overlapping the ops. Copies land in submission order; *ticket identifies this one.
     * h_src and d_dst must stay valid until it lands. Thread-safe. */
    ferry_status (*copy_async)(ferry_backend *b, void *d_dst, const void *h_src, size_t n_bytes,
                               uint64_t *ticket);
    /* Blocks until the copy with this ticket, and every earlier one, has landed. */
    ferry_status (*copy_wait)(ferry_backend *b, uint64_t ticket);
    /* Nonzero once the copy with this ticket has landed. */
    int (*copy_done)(ferry_backend *b, uint64_t ticket);
    /* Pins the host range [h, h + n_bytes) so copies from it run at the full speed of the
     * bus (CUDA: cudaHostRegister); a no-op on the CPU backend. FERRY_ERR_DEVICE when the
     * system refuses (the range stays usable, only slower). */
    ferry_status (*host_register)(ferry_backend *b, void *h, size_t n_bytes);
    /* Undoes host_register. NULL and unregistered pointers are ignored. */
    void (*host_unregister)(ferry_backend *b, void *h);
    /* Device-to-device copy, ordered with the ops. The ranges must not overlap (unless
     * equal); the CUDA backend refuses overlap with FERRY_ERR_INVALID. */
    ferry_status (*copy_device)(ferry_backend *b, void *d_dst, const void *d_src, size_t n_bytes);

    /* d_out (n, table->cols) = rows ids of table; ids is a host array. */
    ferry_status (*embedding)(ferry_backend *b, float *d_out, const ferry_weight *table,
                              const int32_t *ids, int32_t n);
    /* d_out (n, d) = x / sqrt(mean(x^2) + eps) * w; w has d elements. d_out may be d_x. */
    ferry_status (*rmsnorm)(ferry_backend *b, float *d_out, const float *d_x,
                            const ferry_weight *w, int32_t n, int32_t d, float eps);
    /* d_out (n, w->rows) = d_x (n, w->cols) . w^T. d_out must not alias d_x. */
    ferry_status (*matmul)(ferry_backend *b, float *d_out, const float *d_x, const ferry_weight *w,
                           int32_t n);
    /* Rotates d_x (n, n_heads * head_dim) in place, Hugging Face rotate-half convention:
     * pairs (i, i + head_dim/2) of each head; token t is at position pos0 + t. d_cos and
     * d_sin are (max positions, head_dim/2) tables. */
    ferry_status (*rope)(ferry_backend *b, float *d_x, int32_t n, int32_t n_heads,
                         int32_t head_dim, int32_t pos0, const float *d_cos, const float *d_sin);
    /* Causal attention for n query tokens at positions pos0..pos0+n-1 over the cache
     * rows 0..pos0+n-1 (which already hold these tokens' keys and values).
     * d_q, d_out: (n, n_heads * head_dim); d_k, d_v: (capacity, n_kv_heads * head_dim). */
    ferry_status (*attention)(ferry_backend *b, float *d_out, const float *d_q, const float *d_k,
                              const float *d_v, int32_t n, int32_t pos0,
                              const ferry_attn_shape *shape);
    /* d_out[i] = silu(d_gate[i]) * d_up[i]; d_out may be d_gate. */
    ferry_status (*silu_mul)(ferry_backend *b, float *d_out, const float *d_gate,
                             const float *d_up, size_t n);
    /* d_x[i] += d_y[i] */
    ferry_status (*add)(ferry_backend *b, float *d_x, const float *d_y, size_t n);
    /* Router: softmax over each row of d_logits (n, n_experts), the k largest
     * probabilities (ties to the lower index), renormalised to sum to 1 when normalize is
     * nonzero, else the plain probabilities. Writes the chosen experts in ascending id
     * order to d_experts (n, k) and their weights to d_weights. */
    ferry_status (*router_topk)(ferry_backend *b, int32_t *d_experts, float *d_weights,
                                const float *d_logits, int32_t n, int32_t n_experts, int32_t k,
                                int normalize);
    /* d_x[t, i] += bias[i] for t < n, i < d; bias is a (1, d) f32, f16 or bf16 weight. */
    ferry_status (*add_bias)(ferry_backend *b, float *d_x, const ferry_weight *bias, int32_t n,
                             int32_t d);
    /* d_x[i] = min(max(d_x[i], -limit), limit) for i < n; limit > 0. */
    ferry_status (*clamp)(ferry_backend *b, float *d_x, size_t n, float limit);
    /* d_y[t, :] *= sigmoid(d_s[t]) for t < n (rows of d): a shared expert's gate. */
    ferry_status (*gate_rows)(ferry_backend *b, float *d_y, const float *d_s, int32_t n,
                              int32_t d);
    /* d_out (m, d) = rows idx[0..m) of d_x; idx is a host array. */
    ferry_status (*gather_rows)(ferry_backend *b, float *d_out, const float *d_x,
                                const int32_t *idx, int32_t m, int32_t d);
    /* Rows idx[0..m) of d_out = rows of d_y (m, d); idx is a host array, no duplicates. */
    ferry_status (*scatter_rows)(ferry_backend *b, float *d_out, const float *d_y,
                                 const int32_t *idx, int32_t m, int32_t d);
    /* MoE combine: d_out (n, d) = sum over j < k, in order, of d_weights[t, j] *
     * d_y[t * k + j] (d_y is (n * k, d)). */
    ferry_status (*combine)(ferry_backend *b, float *d_out, const float *d_y,
                            const float *d_weights, int32_t n, int32_t k, int32_t d);
} ferry_backend_ops;

struct ferry_backend {
    const ferry_backend_ops *ops;
    void *impl;
    int map_host_weights; /* nonzero: weights may stay where they are in host memory */
    char device[128];     /* what it runs on, for messages: "cpu, 2 threads, avx512", a GPU name */
};

/* Creates the CPU reference backend with n_threads threads (0 = every core), its matmuls
 * run by the fastest exact kernels this CPU has (same bits as the reference loops).
 * device_bytes = 0: "device" memory is plain host memory without limit, and weights are
 * used in place. device_bytes > 0: the backend keeps a separate device arena of exactly
 * that size, every alloc comes from it (FERRY_ERR_NOMEM beyond it), and data gets there
 * only by copies, done by a copy worker thread for copy_async: the same cache, store and
 * prefetch code then runs on the CPU as on a GPU and really moves bytes.
 * On success *out owns it; destroy with ferry_backend_destroy. FERRY_ERR_NOMEM,
 * FERRY_ERR_INVALID. */
ferry_status ferry_backend_cpu_create(int32_t n_threads, size_t device_bytes, ferry_backend **out);

/* As ferry_backend_cpu_create (which is this with FERRY_CPU_ISA_AUTO), with the matmul
 * kernels of isa, a ferry_cpu_isa value (kernels/cpu/cpu_kernels.h): AUTO = the best exact
 * set this CPU runs (AVX-512, else AVX2, else the reference loops); REFERENCE, AVX2 and
 * AVX512 give bit-identical results, AVX512BF16 rounds activations to bf16 (within 1e-2).
 * b->device names the set ("cpu, 2 threads, avx512"). FERRY_ERR_UNSUPPORTED when this CPU
 * lacks the ISA (the message names it and what the CPU has), FERRY_ERR_INVALID for a value
 * out of range, FERRY_ERR_NOMEM. */
ferry_status ferry_backend_cpu_create_isa(int32_t n_threads, size_t device_bytes, int32_t isa,
                                          ferry_backend **out);

/* Pins the CPU backend's worker threads, worker i to cpus[(i + 1) % n_cpus] (core/pool.h);
 * the engine passes one CPU per physical core (offload/topology.h). Returns how many were
 * pinned; 0 for other backends. Call before the backend runs anything. */
int32_t ferry_backend_cpu_pin(ferry_backend *b, const int32_t *cpus, int32_t n_cpus);

/* Creates the CUDA backend on device 0 (of those CUDA_VISIBLE_DEVICES leaves visible): a
 * compute stream for the ops, a copy stream for copy_async (each copy waits for the ops
 * queued before it, so a slot being refilled is never still being read), cuBLAS for the
 * matmuls of more than a few rows. device_bytes = 0: each alloc is a cudaMalloc, without
 * limit; device_bytes > 0: one cudaMalloc of that size carved by an arena, exactly as the
 * CPU backend's budget. Ops run asynchronously on the compute stream; download and
 * synchronize wait for them. FERRY_ERR_UNSUPPORTED (built without CUDA), FERRY_ERR_DEVICE
 * (no usable device; the message says why), FERRY_ERR_NOMEM. */
ferry_status ferry_backend_cuda_create(size_t device_bytes, ferry_backend **out);

/* Whether ferry_backend_cuda_create can succeed: FERRY_OK with a description of the device
 * ("NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB") in desc, else the code and message of why not.
 * desc may be NULL. Thread-safe. */
ferry_status ferry_backend_cuda_probe(char *desc, size_t desc_len);

/* Destroys any backend. NULL-safe. */
void ferry_backend_destroy(ferry_backend *b);

#endif
