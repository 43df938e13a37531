/*
 * kernels/cuda/ops_cuda.cu: the CUDA ops other than matmul, each the twin of its CPU
 * reference in kernels/cpu/backend_cpu.c: the same formulas in float32, summed in the same
 * order where the order decides the result (the router's choice and its weights, the
 * combine over j). Not bit-identical to the CPU: nvcc fuses multiply-adds, and rmsnorm sums
 * in float where the CPU sums in double; the tests hold the ops to 1e-5 relative.
 *
 * The weights of embedding and rmsnorm are f32, f16 or bf16; a quantized one (Q8, Q4) is
 * refused with FERRY_ERR_UNSUPPORTED, as the CPU backend refuses it.
 *
 * Every launcher checks its arguments as the CPU backend does, returns at once when there
 * is no work (an empty grid is a launch error), launches on the compute stream and returns
 * the launch status. Host index arrays are passed by value as kernel arguments in chunks of
 * FERRY_CUDA_IDX_CHUNK, so nothing is staged or allocated per call.
 */
#include <math.h>
#include <string.h>

#include <cuda_fp16.h>

#include "kernels/cuda/cuda_common.h"

#define FERRY_CUDA_THREADS 256
/* attention: threads per (token, head) block, positions per tile, largest head */
#define FERRY_ATT_THREADS 128
#define FERRY_ATT_TILE 128
#define FERRY_ATT_MAX_HEAD 256
/* router: largest top-k a thread keeps */
#define FERRY_ROUTER_MAX_K 64

typedef struct {
    int32_t v[FERRY_CUDA_IDX_CHUNK];
} idx_chunk;

static inline unsigned grid_for(size_t n_items, unsigned threads)
{
    return (unsigned)((n_items + threads - 1) / threads);
}

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32); every thread gets the total. */
__device__ float block_sum(float v)
{
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0)
        part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < n_warps ? part[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0)
            part[0] = s;
    }
    __syncthreads();
    float total = part[0];
    __syncthreads();
    return total;
}

/* A weight these ops can read: an element type. Quantized weights serve matmuls only
 * (matmul_cuda.cu), as on the CPU backend, whose message this is. */
static ferry_status check_weight(const ferry_weight *w, const char *op)
{
    if (!w || !w->d_data || w->rows <= 0 || w->cols <= 0 || (int)w->dtype < 0 ||
        w->dtype >= FERRY_DTYPE_COUNT)
        return ferry_fail(FERRY_ERR_INVALID, "%s: invalid weight", op);
    if (ferry_dtype_is_quant(w->dtype))
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "%s: %s weight of %lld columns (quantized "
                          "weights serve matmuls of a multiple of %d columns)", op,
                          ferry_dtype_name(w->dtype), (long long)w->cols, FERRY_QUANT_GROUP);
    return FERRY_OK;
}

/* ---- embedding, norms, elementwise --------------------------------------------- */

__global__ void embedding_kernel(float *out, const void *table, int dtype, int64_t cols,
                                 idx_chunk ids)
{
    int64_t row = ids.v[blockIdx.x];
    float *o = out + (size_t)blockIdx.x * (size_t)cols;
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x)
        o[i] = cuda_weight_at(table, dtype, (size_t)(row * cols + i));
}

ferry_status ferry_cuda_embedding(ferry_backend *b, float *d_out, const ferry_weight *table,
                                  const int32_t *ids, int32_t n)
{
    TRY(check_weight(table, "embedding"));
    if (n < 0 || (n > 0 && (!d_out || !ids)))
        return ferry_fail(FERRY_ERR_INVALID, "embedding: %d ids with NULL buffers", (int)n);
    for (int32_t t = 0; t < n; t++)
        if (ids[t] < 0 || ids[t] >= table->rows)
            return ferry_fail(FERRY_ERR_INVALID, "embedding: token id %d is outside [0, %lld)",
                              (int)ids[t], (long long)table->rows);
    for (int32_t t0 = 0; t0 < n; t0 += FERRY_CUDA_IDX_CHUNK) {
        int32_t m = n - t0 < FERRY_CUDA_IDX_CHUNK ? n - t0 : FERRY_CUDA_IDX_CHUNK;
        idx_chunk chunk;
        memcpy(chunk.v, ids + t0, (size_t)m * sizeof(int32_t));
        embedding_kernel<<<m, FERRY_CUDA_THREADS, 0, compute_stream(b)>>>(
            d_out + (size_t)t0 * (size_t)table->cols, table->d_data, (int)table->dtype,
            table->cols, chunk);
        CUDA_LAUNCHED();
    }
    return FERRY_OK;
}

__global__ void rmsnorm_kernel(float *out, const float *x, const void *w, int dtype, int d,
                               float eps)
{
    const float *xr = x + (size_t)blockIdx.x * (size_t)d;
    float *yr = out + (size_t)blockIdx.x * (size_t)d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        ss += xr[i] * xr[i];
    ss = block_sum(ss);
    float inv = 1.0f / sqrtf(ss / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        yr[i] = cuda_weight_at(w, dtype, (size_t)i) * (xr[i] * inv);
}

ferry_status ferry_cuda_rmsnorm(ferry_backend *b, float *d_out, const float *d_x,
                                const ferry_weight *w, int32_t n, int32_t d, float eps)
{
    TRY(check_weight(w, "rmsnorm"));
    if (w->rows * w->cols != d || d > 1 << 20)
        return ferry_fail(FERRY_ERR_INVALID, "rmsnorm: weight has %lld elements, rows have %d",
                          (long long)(w->rows * w->cols), (int)d);
    if (n < 0 || (n > 0 && (!d_out || !d_x)))
        return ferry_fail(FERRY_ERR_INVALID, "rmsnorm: %d rows with NULL buffers", (int)n);
    if (n == 0)
        return FERRY_OK;
    rmsnorm_kernel<<<n, FERRY_CUDA_THREADS, 0, compute_stream(b)>>>(d_out, d_x, w->d_data,
                                                                       (int)w->dtype, d, eps);
    CUDA_LAUNCHED();
    return FERRY_OK;
}

__global__ void silu_mul_kernel(float *out, const float *gate, const float *up, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = (g / (1.0f + expf(-g))) * up[i];
    }
}

/* Grid for an elementwise kernel over n items: a grid-stride loop covers the rest. */
static inline unsigned elementwise_grid(size_t n)
{
    size_t g = (n + FERRY_CUDA_THREADS - 1) / FERRY_CUDA_THREADS;
    return (unsigned)(g < 65535 ? g : 65535);
}

ferry_status ferry_cuda_silu_mul(ferry_backend *b, float *d_out, const float *d_gate,
                                 const float *d_up, size_t n)
{
    if (n == 0)
        return FERRY_OK;
    if (!d_out || !d_gate || !d_up)
        return ferry_fail(FERRY_ERR_INVALID, "silu_mul: NULL buffers");
    silu_mul_kernel<<<elementwise_grid(n), FERRY_CUDA_THREADS, 0, compute_stream(b)>>>(
        d_out, d_gate, d_up, n);
    CUDA_LAUNCHED();
    return FERRY_OK;
}

__global__ void add_kernel(float *x, const float *y, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}

ferry_status ferry_cuda_add(ferry_backend *b, float *d_x, const float *d_y, size_t n)
{
    if (n == 0)
        return FERRY_OK;
    if (!d_x || !d_y)
        return ferry_fail(FERRY_ERR_INVALID, "add: NULL buffers");
    add_kernel<<<elementwise_grid(n), FERRY_CUDA_THREADS, 0, compute_stream(b)>>>(d_x, d_y, n);
    CUDA_LAUNCHED();
    return FERRY_OK;
}

__global__ void add_bias_kernel(float *x, const void *bias, int dtype, int n, int d)
{
    size_t total = (size_t)n * (size_t)d;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += cuda_weight_at(bias, dtype, i % (size_t)d);
}

ferry_status ferry_cuda_add_bias(ferry_backend *b, float *d_x, const ferry_weight *bias,
                                 int32_t n, int32_t d)
{
    TRY(check_weight(bias, "add_bias"));
    if (n < 0 || bias->rows * bias->cols != d)
        return ferry_fail(FERRY_ERR_INVALID, "add_bias: bias has %lld elements, rows have %d",
                          (long long)(bias->rows * bias->cols), (int)d);
    if (n == 0)
        return FERRY_OK;
    if (!d_x)
        return ferry_fail(FERRY_ERR_INVALID, "add_bias: NULL buffer");
    size_t total = (size_t)n * (size_t)d;
    add_bias_kernel<<<elementwise_grid(total), FERRY_CUDA_THREADS, 0, compute_stream(b)>>>(
        d_x, bias->d_data, (int)bias->dtype, n, d);
    CUDA_LAUNCHED();
    return FERRY_OK;
}

__global__ void clamp_kernel(float *x, size_t n, float limit)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = x[i] < -limit ? -limit : x[i] > limit ? limit : x[i];
}

ferry_status ferry_cuda_clamp(ferry_backend *b, float *d_x, size_t n, float limit)
{
    if (!(limit > 0))
        return ferry_fail(FERRY_ERR_INVALID, "clamp: limit %g is not positive", (double)limit);
    if (n == 0)
        return FERRY_OK;
    if (!d_x)
        return ferry_fail(FERRY_ERR_INVALID, "clamp: NULL buffer");
    clamp_kernel<<<elementwise_grid(n), FERRY_CUDA_THREADS, 0, compute_stream(b)>>>(d_x, n, limit);
    CUDA_LAUNCHED();
    return FERRY_OK;
}

/* One block per row: the row's sigmoid gate, as the CPU computes it, scales its d values. */
__global__ void gate_rows_kernel(float *y, const float *s, int d)
{
    float g = 1.0f / (1.0f + expf(-s[blockIdx.x]));
    float *yr = y + (size_t)blockIdx.x * (size_t)d;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        yr[i] *= g;
}

ferry_status ferry_cuda_gate_rows(ferry_backend *b, float *d_y, const float *d_s, int32_t n,
                                  int32_t d)
{
    if (n < 0 || d <= 0)
        return ferry_fail(FERRY_ERR_INVALID, "gate_rows: %d rows of %d", (int)n, (int)d);
    if (n == 0)
        return FERRY_OK;
    if (!d_y || !d_s)
        return ferry_fail(FERRY_ERR_INVALID, "gate_rows: NULL buffers");
    gate_rows_kernel<<<n, FERRY_CUDA_THREADS, 0, compute_stream(b)>>>(d_y, d_s, d);
    CUDA_LAUNCHED();
    return FERRY_OK;
}

/* ---- rope --------------------------------------------------------------------------- */

__global__ void rope_kernel(float *x, int n, int n_heads, int head_dim, int pos0,
                            const float *cos_t, const float *sin_t)
{
    int half = head_dim / 2;
    size_t total = (size_t)n * (size_t)n_heads * (size_t)half;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        int i = (int)(idx % (size_t)half);
        size_t th = idx / (size_t)half; /* token * n_heads + head */
        int t = (int)(th / (size_t)n_heads);
        const float *c = cos_t + (size_t)(pos0 + t) * (size_t)half;
        const float *s = sin_t + (size_t)(pos0 + t) * (size_t)half;
        float *v = x + th * (size_t)head_dim;
        float a = v[i], bb = v[i + half];
        v[i] = a * c[i] - bb * s[i];
        v[i + half] = bb * c[i] + a * s[i];
    }
}

ferry_status ferry_cuda_rope(ferry_backend *b, float *d_x, int32_t n, int32_t n_heads,
                             int32_t head_dim, int32_t pos0, const float *d_cos,
                             const float *d_sin)
{
    if (head_dim <= 0 || head_dim % 2 || pos0 < 0 || n < 0 || n_heads < 0)
        return ferry_fail(FERRY_ERR_INVALID, "rope: head_dim %d, pos0 %d", (int)head_dim,
                          (int)pos0);
    size_t total = (size_t)n * (size_t)n_heads * (size_t)(head_dim / 2);
    if (total == 0)
        return FERRY_OK;
    if (!d_x || !d_cos || !d_sin)
        return ferry_fail(FERRY_ERR_INVALID, "rope: NULL buffers");
    rope_kernel<<<elementwise_grid(total), FERRY_CUDA_THREADS, 0, compute_stream(b)>>>(
        d_x, n, n_heads, head_dim, pos0, d_cos, d_sin);
    CUDA_LAUNCHED();
    return FERRY_OK;
}

/* ---- attention ----------------------------------------------------------------------- */

/* One block per (token, head): softmax(q.K^T * scale) V over the visible positions, in
 * tiles of FERRY_ATT_TILE positions with a running max and sum (as the CPU reference), so
 * nothing grows with the context. Scores: each warp takes positions, its lanes split the
 * head. Output: each thread owns head dimensions threadIdx.x and threadIdx.x + 128. */
__global__ void attention_kernel(float *out, const float *q, const float *k, const float *v,
                                 int n_heads, int n_kv_heads, int hd, int pos0, int window,
                                 float scale)
{
    extern __shared__ float att_shared[];
    float *sq = att_shared;      /* (hd) the query */
    float *ss = att_shared + hd; /* (FERRY_ATT_TILE) scores, then probabilities */
    int t = blockIdx.x, h = blockIdx.y;
    int kvh = h / (n_heads / n_kv_heads);
    size_t kv_stride = (size_t)n_kv_heads * (size_t)hd;
    const float *kb = k + (size_t)kvh * (size_t)hd, *vb = v + (size_t)kvh * (size_t)hd;
    const float *qr = q + ((size_t)t * (size_t)n_heads + (size_t)h) * (size_t)hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x)
        sq[d] = qr[d];
    int pos = pos0 + t, first = 0;
    if (window > 0 && pos - window + 1 > 0)
        first = pos - window + 1;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    int d0 = threadIdx.x, d1 = threadIdx.x + FERRY_ATT_THREADS;
    float acc0 = 0.0f, acc1 = 0.0f, m = -INFINITY, l = 0.0f;
    __syncthreads();
    for (int j0 = first; j0 <= pos; j0 += FERRY_ATT_TILE) {
        int jn = pos + 1 - j0 < FERRY_ATT_TILE ? pos + 1 - j0 : FERRY_ATT_TILE;
        for (int jj = warp; jj < jn; jj += n_warps) {
            const float *kr = kb + (size_t)(j0 + jj) * kv_stride;
            float s = 0.0f;
            for (int d = lane; d < hd; d += 32)
                s += sq[d] * kr[d];
            s = warp_sum(s);
            if (lane == 0)
                ss[jj] = s * scale;
        }
        __syncthreads();
        float bm = -INFINITY;
        for (int jj = 0; jj < jn; jj++)
            bm = fmaxf(bm, ss[jj]);
        float m_new = fmaxf(m, bm);
        float corr = expf(m - m_new); /* 0 on the first tile (m = -inf) */
        l *= corr;
        acc0 *= corr;
        acc1 *= corr;
        __syncthreads(); /* every thread has its max before the scores become probabilities */
        for (int jj = threadIdx.x; jj < jn; jj += blockDim.x)
            ss[jj] = expf(ss[jj] - m_new);
        __syncthreads();
        for (int jj = 0; jj < jn; jj++) {
            float p = ss[jj];
            const float *vr = vb + (size_t)(j0 + jj) * kv_stride;
            l += p;
            if (d0 < hd)
                acc0 += p * vr[d0];
            if (d1 < hd)
                acc1 += p * vr[d1];
        }
        m = m_new;
        __syncthreads(); /* the next tile overwrites ss */
    }
    float inv = 1.0f / l;
    float *o = out + ((size_t)t * (size_t)n_heads + (size_t)h) * (size_t)hd;
    if (d0 < hd)
        o[d0] = acc0 * inv;
    if (d1 < hd)
        o[d1] = acc1 * inv;
}

ferry_status ferry_cuda_attention(ferry_backend *b, float *d_out, const float *d_q,
                                  const float *d_k, const float *d_v, int32_t n, int32_t pos0,
                                  const ferry_attn_shape *shape)
{
    if (!shape || shape->n_heads <= 0 || shape->n_kv_heads <= 0 || shape->head_dim <= 0 ||
        shape->n_heads % shape->n_kv_heads || pos0 < 0 || n < 0)
        return ferry_fail(FERRY_ERR_INVALID, "attention: invalid shape");
    if (shape->head_dim > FERRY_ATT_MAX_HEAD)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "attention: head_dim %d (the CUDA kernel "
                          "takes up to %d)", (int)shape->head_dim, FERRY_ATT_MAX_HEAD);
    if (n == 0)
        return FERRY_OK;
    if (!d_out || !d_q || !d_k || !d_v)
        return ferry_fail(FERRY_ERR_INVALID, "attention: NULL buffers");
    if (shape->n_heads > 65535)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "attention: %d heads (the CUDA kernel takes up "
                          "to 65535)", (int)shape->n_heads);
    dim3 grid((unsigned)n, (unsigned)shape->n_heads); /* tokens on x: up to 2^31 - 1 */
    size_t shared = ((size_t)shape->head_dim + FERRY_ATT_TILE) * sizeof(float);
    attention_kernel<<<grid, FERRY_ATT_THREADS, shared, compute_stream(b)>>>(
        d_out, d_q, d_k, d_v, shape->n_heads, shape->n_kv_heads, shape->head_dim, pos0,
        shape->sliding_window, shape->scale);
    CUDA_LAUNCHED();
    return FERRY_OK;
}

/* ---- MoE pieces ----------------------------------------------------------------------- */

/* One thread per token: softmax, the k largest (ties to the lower index), renormalised
 * when normalize, written in ascending expert order: the CPU reference's steps in its order. */
__global__ void router_kernel(int32_t *experts, float *weights, const float *logits, int n,
                              int n_experts, int k, int normalize)
{
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n)
        return;
    const float *lg = logits + (size_t)t * (size_t)n_experts;
    float mx = lg[0];
    for (int e = 1; e < n_experts; e++)
        mx = lg[e] > mx ? lg[e] : mx;
    float sum = 0.0f;
    for (int e = 0; e < n_experts; e++)
        sum += expf(lg[e] - mx);
    int32_t pick[FERRY_ROUTER_MAX_K];
    float prob[FERRY_ROUTER_MAX_K];
    for (int j = 0; j < k; j++) {
        int best = -1;
        float best_p = 0.0f;
        for (int e = 0; e < n_experts; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++)
                taken |= pick[i] == e;
            if (taken)
                continue;
            float p = expf(lg[e] - mx) / sum;
            if (best < 0 || p > best_p) {
                best = e;
                best_p = p;
            }
        }
        pick[j] = best;
        prob[j] = best_p;
    }
    float wsum = 0.0f;
    for (int j = 0; j < k; j++)
        wsum += prob[j];
    if (!normalize)
        wsum = 1.0f;
    for (int j = 1; j < k; j++)
        for (int i = j; i > 0 && pick[i - 1] > pick[i]; i--) {
            int32_t te = pick[i];
            pick[i] = pick[i - 1];
            pick[i - 1] = te;
            float tp = prob[i];
            prob[i] = prob[i - 1];
            prob[i - 1] = tp;
        }
    for (int j = 0; j < k; j++) {
        experts[(size_t)t * (size_t)k + (size_t)j] = pick[j];
        weights[(size_t)t * (size_t)k + (size_t)j] = prob[j] / wsum;
    }
}

ferry_status ferry_cuda_router_topk(ferry_backend *b, int32_t *d_experts, float *d_weights,
                                    const float *d_logits, int32_t n, int32_t n_experts,
                                    int32_t k, int normalize)
{
    if (n_experts <= 0 || n_experts > 1024 || k <= 0 || k > n_experts)
        return ferry_fail(FERRY_ERR_INVALID, "router: top-%d of %d experts", (int)k,
                          (int)n_experts);
    if (k > FERRY_ROUTER_MAX_K)
        return ferry_fail(FERRY_ERR_UNSUPPORTED, "router: top-%d (the CUDA router keeps up to "
                          "%d)", (int)k, FERRY_ROUTER_MAX_K);
    if (n < 0 || (n > 0 && (!d_experts || !d_weights || !d_logits)))
        return ferry_fail(FERRY_ERR_INVALID, "router: %d rows with NULL buffers", (int)n);
    if (n == 0)
        return FERRY_OK;
    router_kernel<<<grid_for((size_t)n, 64), 64, 0, compute_stream(b)>>>(
        d_experts, d_weights, d_logits, n, n_experts, k, normalize);
    CUDA_LAUNCHED();
    return FERRY_OK;
}

__global__ void gather_kernel(float *out, const float *x, idx_chunk idx, int d)
{
    const float *src = x + (size_t)idx.v[blockIdx.x] * (size_t)d;
    float *dst = out + (size_t)blockIdx.x * (size_t)d;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        dst[i] = src[i];
}

__global__ void scatter_kernel(float *out, const float *y, idx_chunk idx, int d)
{
    const float *src = y + (size_t)blockIdx.x * (size_t)d;
    float *dst = out + (size_t)idx.v[blockIdx.x] * (size_t)d;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        dst[i] = src[i];
}

/* gather (scatter = 0) or scatter (1) of m rows of d floats by host indices */
static ferry_status move_rows(ferry_backend *b, float *d_out, const float *d_in,
                              const int32_t *idx, int32_t m, int32_t d, int scatter)
{
    const char *op = scatter ? "scatter_rows" : "gather_rows";
    if (m < 0 || d < 0 || (m > 0 && (!d_out || !d_in || !idx)))
        return ferry_fail(FERRY_ERR_INVALID, "%s: %d rows with NULL buffers", op, (int)m);
    if (m == 0 || d == 0)
        return FERRY_OK;
    for (int32_t i = 0; i < m; i++)
        if (idx[i] < 0)
            return ferry_fail(FERRY_ERR_INVALID, "%s: row index %d at %d", op, (int)idx[i],
                              (int)i);
    cudaStream_t s = compute_stream(b);
    for (int32_t i0 = 0; i0 < m; i0 += FERRY_CUDA_IDX_CHUNK) {
        int32_t mc = m - i0 < FERRY_CUDA_IDX_CHUNK ? m - i0 : FERRY_CUDA_IDX_CHUNK;
        idx_chunk chunk;
        memcpy(chunk.v, idx + i0, (size_t)mc * sizeof(int32_t));
        size_t off = (size_t)i0 * (size_t)d;
        if (scatter)
            scatter_kernel<<<mc, FERRY_CUDA_THREADS, 0, s>>>(d_out, d_in + off, chunk, d);
        else
            gather_kernel<<<mc, FERRY_CUDA_THREADS, 0, s>>>(d_out + off, d_in, chunk, d);
        CUDA_LAUNCHED();
    }
    return FERRY_OK;
}

ferry_status ferry_cuda_gather_rows(ferry_backend *b, float *d_out, const float *d_x,
                                    const int32_t *idx, int32_t m, int32_t d)
{
    return move_rows(b, d_out, d_x, idx, m, d, 0);
}

ferry_status ferry_cuda_scatter_rows(ferry_backend *b, float *d_out, const float *d_y,
                                     const int32_t *idx, int32_t m, int32_t d)
{
    return move_rows(b, d_out, d_y, idx, m, d, 1);
}

__global__ void combine_kernel(float *out, const float *y, const float *w, int n, int k, int d)
{
    size_t total = (size_t)n * (size_t)d;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t t = idx / (size_t)d, i = idx % (size_t)d;
        float o = 0.0f;
        for (int j = 0; j < k; j++) {
            float p = y[(t * (size_t)k + (size_t)j) * (size_t)d + i] * w[t * (size_t)k + (size_t)j];
            o += p;
        }
        out[idx] = o;
    }
}

ferry_status ferry_cuda_combine(ferry_backend *b, float *d_out, const float *d_y,
                                const float *d_weights, int32_t n, int32_t k, int32_t d)
{
    if (n < 0 || k < 0 || d < 0)
        return ferry_fail(FERRY_ERR_INVALID, "combine: %d x %d x %d", (int)n, (int)k, (int)d);
    size_t total = (size_t)n * (size_t)d;
    if (total == 0)
        return FERRY_OK;
    if (!d_out || (k > 0 && (!d_y || !d_weights)))
        return ferry_fail(FERRY_ERR_INVALID, "combine: NULL buffers");
    combine_kernel<<<elementwise_grid(total), FERRY_CUDA_THREADS, 0, compute_stream(b)>>>(
        d_out, d_y, d_weights, n, k, d);
    CUDA_LAUNCHED();
    return FERRY_OK;
}
