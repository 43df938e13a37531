/*
 * kernels/cpu/cpu_kernels.c: the reference matmul kernel (the spec every other CPU kernel
 * is tested against) and the run-time choice of kernel by what the CPU supports.
 *
 * Detection asks the CPU (cpuid, through __builtin_cpu_supports) and the OS (xgetbv: the
 * AVX and AVX-512 register state must be enabled, else the instructions fault).
 */
#include <stdio.h>
#include <math.h>
#include <string.h>

#include "core/error.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/quant.h"

#if FERRY_CPU_X86
#include <cpuid.h>
#endif

void ferry_cpu_widen(float *dst, const ferry_weight *w, int64_t row, int64_t off, int64_t n)
{
    const char *base = (const char *)w->d_data;
    size_t at = (size_t)(row * w->cols + off);
    if (ferry_dtype_is_quant(w->dtype)) {
        const uint8_t *r = (const uint8_t *)base + (size_t)row * ferry_dtype_row_bytes(w->dtype, w->cols);
        for (int64_t i = 0; i < n; i++)
            dst[i] = ferry_quant_weight(w->dtype, r, off + i);
        return;
    }
    switch (w->dtype) {
    case FERRY_DTYPE_F32: memcpy(dst, (const float *)base + at, (size_t)n * sizeof(float)); break;
    case FERRY_DTYPE_BF16: {
        const uint16_t *s = (const uint16_t *)base + at;
        for (int64_t i = 0; i < n; i++)
            dst[i] = ferry_bf16_to_f32(s[i]);
        break;
    }
    case FERRY_DTYPE_F16: {
        const uint16_t *s = (const uint16_t *)base + at;
        for (int64_t i = 0; i < n; i++)
            dst[i] = ferry_f16_to_f32(s[i]);
        break;
    }
    default: break;
    }
}

/* ---- the reference kernel ---------------------------------------------------------- */

/* Weight rows are widened to f32 in chunks of FERRY_MM_CHUNK columns (a multiple of 8, so
 * lanes line up across chunks) and each chunk serves up to FERRY_MM_TOKENS tokens. The
 * chunking changes nothing in the order of operations of any output. */
#define FERRY_MM_CHUNK 512
#define FERRY_MM_TOKENS 32

void ferry_cpu_matmul_reference(float *out, const float *x, const ferry_weight *w, int32_t n,
                                int64_t j0, int64_t j1)
{
    int64_t cols = w->cols, rows = w->rows;
    float wf[FERRY_MM_CHUNK];
    float acc[FERRY_MM_TOKENS][8];
    for (int64_t j = j0; j < j1; j++) {
        for (int32_t t0 = 0; t0 < n; t0 += FERRY_MM_TOKENS) {
            int32_t tn = n - t0 < FERRY_MM_TOKENS ? n - t0 : FERRY_MM_TOKENS;
            memset(acc, 0, sizeof acc);
            for (int64_t c0 = 0; c0 < cols; c0 += FERRY_MM_CHUNK) {
                int64_t m = cols - c0 < FERRY_MM_CHUNK ? cols - c0 : FERRY_MM_CHUNK;
                const float *wr;
                if (w->dtype == FERRY_DTYPE_F32) {
                    wr = (const float *)w->d_data + j * cols + c0;
                } else {
                    ferry_cpu_widen(wf, w, j, c0, m);
                    wr = wf;
                }
                for (int32_t t = 0; t < tn; t++)
                    ferry_cpu_dot_lanes(acc[t], x + (size_t)(t0 + t) * (size_t)cols + c0, wr, m);
            }
            for (int32_t t = 0; t < tn; t++)
                out[(size_t)(t0 + t) * (size_t)rows + (size_t)j] = ferry_cpu_reduce_lanes(acc[t]);
        }
    }
}

/* ---- detection --------------------------------------------------------------------- */

#if FERRY_CPU_X86
/* XCR0: which register states the OS saves and restores (0 when xgetbv is unavailable). */
static uint64_t os_xcr0(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE))
        return 0;
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (uint64_t)hi << 32 | lo;
}
#endif

int ferry_cpu_isa_available(ferry_cpu_isa isa)
{
    int avx2 = 0, avx512 = 0, avx512bf16 = 0;
#if FERRY_CPU_X86
    /* CPUID itself rather than __builtin_cpu_supports, whose feature names differ between
     * compilers (clang 14 knows neither "f16c" nor "avx512bf16") */
    uint64_t xcr0 = os_xcr0();
    int ymm = (xcr0 & 0x6) == 0x6;   /* SSE and AVX state */
    int zmm = (xcr0 & 0xe6) == 0xe6; /* plus opmask, ZMM_Hi256, Hi16_ZMM */
    unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0, a7 = 0, b7 = 0, c7 = 0, d7 = 0;
    unsigned a71 = 0, b71 = 0, c71 = 0, d71 = 0;
    __get_cpuid(1, &a1, &b1, &c1, &d1);
    if (__get_cpuid_max(0, NULL) >= 7) {
        __cpuid_count(7, 0, a7, b7, c7, d7);
        if (a7 >= 1) /* the highest subleaf of leaf 7 */
            __cpuid_count(7, 1, a71, b71, c71, d71);
    }
    int f16c = (c1 >> 29) & 1;
    avx2 = ymm && ((b7 >> 5) & 1) && f16c;
    avx512 = avx2 && zmm && ((b7 >> 16) & 1) /* F */ && ((b7 >> 30) & 1) /* BW */ &&
             ((b7 >> 31) & 1) /* VL */;
    avx512bf16 = avx512 && ((a71 >> 5) & 1);
#endif
    switch (isa) {
    case FERRY_CPU_ISA_AUTO:
    case FERRY_CPU_ISA_REFERENCE: return 1;
    case FERRY_CPU_ISA_AVX2: return avx2;
    case FERRY_CPU_ISA_AVX512: return avx512;
    case FERRY_CPU_ISA_AVX512BF16: return avx512bf16;
    default: return 0;
    }
}

ferry_cpu_isa ferry_cpu_isa_best_exact(void)
{
    if (ferry_cpu_isa_available(FERRY_CPU_ISA_AVX512))
        return FERRY_CPU_ISA_AVX512;
    if (ferry_cpu_isa_available(FERRY_CPU_ISA_AVX2))
        return FERRY_CPU_ISA_AVX2;
    return FERRY_CPU_ISA_REFERENCE;
}

int ferry_cpu_isa_exact(ferry_cpu_isa isa)
{
    return isa == FERRY_CPU_ISA_REFERENCE || isa == FERRY_CPU_ISA_AVX2 ||
           isa == FERRY_CPU_ISA_AVX512;
}

static const char *const isa_names[FERRY_CPU_ISA_COUNT] = {"auto", "reference", "avx2", "avx512",
                                                           "avx512bf16"};

const char *ferry_cpu_isa_name(ferry_cpu_isa isa)
{
    return (int)isa >= 0 && isa < FERRY_CPU_ISA_COUNT ? isa_names[isa] : "?";
}

ferry_status ferry_cpu_isa_parse(const char *s, ferry_cpu_isa *out)
{
    for (int i = 0; s && i < FERRY_CPU_ISA_COUNT; i++)
        if (strcmp(s, isa_names[i]) == 0) {
            *out = (ferry_cpu_isa)i;
            return FERRY_OK;
        }
    return ferry_fail(FERRY_ERR_INVALID,
                      "unknown CPU kernel set '%s' (choose auto, reference, avx2, avx512 or "
                      "avx512bf16)",
                      s ? s : "(null)");
}

ferry_cpu_matmul_fn ferry_cpu_matmul_kernel(ferry_cpu_isa isa)
{
    if (isa == FERRY_CPU_ISA_AUTO)
        isa = ferry_cpu_isa_best_exact();
    if (!ferry_cpu_isa_available(isa))
        return NULL;
    switch (isa) {
    case FERRY_CPU_ISA_REFERENCE: return ferry_cpu_matmul_reference;
#if FERRY_CPU_X86
    case FERRY_CPU_ISA_AVX2: return ferry_cpu_matmul_avx2;
    case FERRY_CPU_ISA_AVX512: return ferry_cpu_matmul_avx512;
    case FERRY_CPU_ISA_AVX512BF16: return ferry_cpu_matmul_avx512bf16;
#endif
    default: return NULL;
    }
}

/* ---- attention ---------------------------------------------------------------------- */

void ferry_cpu_attn_reference(float *o, const ferry_cpu_attn_head *a)
{
    int32_t hd = a->head_dim;
    float scores[FERRY_CPU_ATT_BLOCK];
    float m = -INFINITY, l = 0;
    for (int32_t d = 0; d < hd; d++)
        o[d] = 0;
    for (int32_t j0 = a->first; j0 <= a->last; j0 += FERRY_CPU_ATT_BLOCK) {
        int32_t jn = a->last + 1 - j0 < FERRY_CPU_ATT_BLOCK ? a->last + 1 - j0
                                                            : FERRY_CPU_ATT_BLOCK;
        float bm = -INFINITY;
        for (int32_t j = 0; j < jn; j++) {
            float acc[8] = {0};
            ferry_cpu_dot_lanes(acc, a->q, a->k + (size_t)(j0 + j) * a->kv_stride, hd);
            scores[j] = ferry_cpu_reduce_lanes(acc) * a->scale;
            if (scores[j] > bm)
                bm = scores[j];
        }
        float m_new = bm > m ? bm : m;
        float corr = expf(m - m_new); /* 0 on the first block (m = -inf) */
        l *= corr;
        for (int32_t d = 0; d < hd; d++)
            o[d] *= corr;
        for (int32_t j = 0; j < jn; j++) {
            const float *vr = a->v + (size_t)(j0 + j) * a->kv_stride;
            float p = expf(scores[j] - m_new);
            l += p;
            for (int32_t d = 0; d < hd; d++)
                o[d] += p * vr[d];
        }
        m = m_new;
    }
    float inv = 1.0f / l;
    for (int32_t d = 0; d < hd; d++)
        o[d] *= inv;
}

ferry_cpu_attn_fn ferry_cpu_attn_kernel(ferry_cpu_isa isa)
{
    if (isa == FERRY_CPU_ISA_AUTO)
        isa = ferry_cpu_isa_best_exact();
    if (!ferry_cpu_isa_available(isa))
        return NULL;
#if FERRY_CPU_X86
    if (isa != FERRY_CPU_ISA_REFERENCE)
        return ferry_cpu_attn_avx2; /* every x86 set includes AVX2 */
#endif
    return ferry_cpu_attn_reference;
}
