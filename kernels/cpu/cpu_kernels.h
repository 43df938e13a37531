/*
 * kernels/cpu/cpu_kernels.h: the CPU matmul kernels and the choice among them at run time.
 *
 * The reference kernel (plain C) defines the result of a matmul on the CPU: output (t, j)
 * is the canonical dot product of x row t and weight row j (ferry_cpu_dot_lanes, then
 * ferry_cpu_reduce_lanes). The AVX2 and AVX-512 kernels compute the same operations in the
 * same order, so their results are bit-identical to the reference for every dtype, shape
 * and token count. The AVX512-BF16 kernel is not exact (see ferry_cpu_isa_exact).
 * Every kernel computes each output from its own x row and weight row alone, so results
 * do not depend on n, on the thread count or on how rows are split into calls.
 * ("Bit-identical" covers every finite and infinite value; NaNs stay NaNs, though an f16
 * signalling NaN comes out of the F16C conversion quieted.)
 */
#ifndef FERRY_KERNELS_CPU_CPU_KERNELS_H
#define FERRY_KERNELS_CPU_CPU_KERNELS_H

#include <stdint.h>

#include "ferry.h"
#include "kernels/backend.h"

typedef enum {
    FERRY_CPU_ISA_AUTO = 0,   /* the best exact kernel this CPU runs */
    FERRY_CPU_ISA_REFERENCE,  /* plain C, the spec */
    FERRY_CPU_ISA_AVX2,       /* AVX2 + F16C, exact */
    FERRY_CPU_ISA_AVX512,     /* AVX-512 F/BW/VL + F16C, exact */
    FERRY_CPU_ISA_AVX512BF16, /* AVX512-BF16 dot products, lossy (activations in bf16) */
    FERRY_CPU_ISA_COUNT
} ferry_cpu_isa;

/* Computes rows j0..j1-1 of out (n, w->rows) = x (n, w->cols) . w^T: out[t * w->rows + j]
 * for t < n, j0 <= j < j1. out must not alias x or the weight. Reads only rows j0..j1-1
 * of the weight and the n rows of x. Thread-safe for disjoint row ranges. */
typedef void (*ferry_cpu_matmul_fn)(float *out, const float *x, const ferry_weight *w, int32_t n,
                                    int64_t j0, int64_t j1);

/* Nonzero when this CPU (and its OS) can run the kernel of isa; AUTO and REFERENCE are
 * always available. Thread-safe. */
int ferry_cpu_isa_available(ferry_cpu_isa isa);

/* The fastest exact ISA available: AVX512, else AVX2, else REFERENCE. Thread-safe. */
ferry_cpu_isa ferry_cpu_isa_best_exact(void);

/* 1 when the ISA's kernel is bit-identical to the reference (REFERENCE, AVX2, AVX512),
 * 0 otherwise (AVX512BF16: activations rounded to bf16, within 1e-2 relative L2 error of
 * the reference, like the CUDA backend's cuBLAS path; AUTO: resolves to an exact one). */
int ferry_cpu_isa_exact(ferry_cpu_isa isa);

/* "auto", "reference", "avx2", "avx512", "avx512bf16"; "?" for anything else. */
const char *ferry_cpu_isa_name(ferry_cpu_isa isa);

/* Parses one of the names above into *out. FERRY_ERR_INVALID (the message lists the
 * choices) for anything else, *out untouched. */
ferry_status ferry_cpu_isa_parse(const char *s, ferry_cpu_isa *out);

/* The matmul kernel for isa (AUTO: the best exact one), or NULL when this CPU cannot run
 * it or isa is out of range. */
ferry_cpu_matmul_fn ferry_cpu_matmul_kernel(ferry_cpu_isa isa);

/* One (token, head) of attention: o = softmax(q . K^T * scale) V over the positions
 * [first, last], with the softmax computed blockwise (FERRY_CPU_ATT_BLOCK positions at a
 * time, running maximum and sum), so no buffer grows with the context. Position j's key
 * is k + j * kv_stride (head_dim floats), its value v + j * kv_stride. */
#define FERRY_CPU_ATT_BLOCK 128
typedef struct {
    const float *q;
    const float *k, *v;
    size_t kv_stride;
    int32_t first, last;
    int32_t head_dim;
    float scale;
} ferry_cpu_attn_head;

typedef void (*ferry_cpu_attn_fn)(float *o, const ferry_cpu_attn_head *a);

/* The attention for isa: the reference loops for REFERENCE, the AVX2 kernel (the same bits:
 * each score a canonical dot product, each output element updated in position order, expf
 * from libm) for the x86 sets; NULL when this CPU cannot run isa. */
ferry_cpu_attn_fn ferry_cpu_attn_kernel(ferry_cpu_isa isa);

/* Widens n elements of weight row `row`, from element `off` on, into f32 (exact). */
void ferry_cpu_widen(float *dst, const ferry_weight *w, int64_t row, int64_t off, int64_t n);

/* The canonical dot product, lane part: element i goes to lane i % 8, in increasing i,
 * acc[l] = acc[l] + x[i] * w[i] with the product rounded to float and then the sum (no
 * fused multiply-add). Calls may continue a row in pieces (acc carries over) as long as
 * every piece but the last is a multiple of 8 long. The lanes live in locals during the loop:
 * through the pointer, the compiler would have to assume acc aliases x or w. */
static inline void ferry_cpu_dot_lanes(float *restrict acc, const float *restrict x,
                                       const float *restrict w, int64_t m)
{
    float a[8];
    for (int l = 0; l < 8; l++)
        a[l] = acc[l];
    int64_t i = 0;
    for (; i + 8 <= m; i += 8)
        for (int l = 0; l < 8; l++)
            a[l] += x[i + l] * w[i + l];
    for (; i < m; i++)
        a[i & 7] += x[i] * w[i];
    for (int l = 0; l < 8; l++)
        acc[l] = a[l];
}

/* The canonical dot product, final part: the lanes summed pairwise. */
static inline float ferry_cpu_reduce_lanes(const float acc[8])
{
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* The x86 kernels are built only for x86-64 (with GCC or Clang; -DFERRY_CPU_X86=0 leaves
 * them out there too); without them only the reference exists and the other sets are
 * reported unavailable. */
#ifndef FERRY_CPU_X86
#if defined(__x86_64__) && defined(__GNUC__)
#define FERRY_CPU_X86 1
#else
#define FERRY_CPU_X86 0
#endif
#endif

/* The kernels, for ferry_cpu_matmul_kernel's table: call them through it, which checks
 * that the CPU has the instructions. */
void ferry_cpu_matmul_reference(float *out, const float *x, const ferry_weight *w, int32_t n,
                                int64_t j0, int64_t j1);
void ferry_cpu_matmul_avx2(float *out, const float *x, const ferry_weight *w, int32_t n, int64_t j0,
                           int64_t j1);
void ferry_cpu_matmul_avx512(float *out, const float *x, const ferry_weight *w, int32_t n,
                             int64_t j0, int64_t j1);
void ferry_cpu_attn_reference(float *o, const ferry_cpu_attn_head *a);
void ferry_cpu_attn_avx2(float *o, const ferry_cpu_attn_head *a);
void ferry_cpu_matmul_avx512bf16(float *out, const float *x, const ferry_weight *w, int32_t n,
                                 int64_t j0, int64_t j1);

#endif
