/*
 * kernels/quant.c: see quant.h.
 */
#include "kernels/quant.h"

#include <math.h>
#include <string.h>

#include "core/error.h"
#include "kernels/dtype.h"

const char *ferry_quant_name(ferry_dtype t)
{
    switch (t) {
    case FERRY_DTYPE_Q8: return "q8";
    case FERRY_DTYPE_Q4: return "q4";
    default: return "?";
    }
}

ferry_status ferry_quant_parse(const char *s, ferry_dtype *out)
{
    if (s && strcmp(s, "q8") == 0)
        *out = FERRY_DTYPE_Q8;
    else if (s && strcmp(s, "q4") == 0)
        *out = FERRY_DTYPE_Q4;
    else
        return ferry_fail(FERRY_ERR_INVALID, "unknown quantization '%s' (choose q8 or q4)",
                          s ? s : "(null)");
    return FERRY_OK;
}

ferry_status ferry_quant_row_bytes(ferry_dtype t, int64_t cols, size_t *out)
{
    size_t g = ferry_quant_group_bytes(t);
    if (g == 0)
        return ferry_fail(FERRY_ERR_INVALID, "quantization type %d is neither q8 nor q4", (int)t);
    if (cols <= 0 || cols % FERRY_QUANT_GROUP || cols > ((int64_t)1 << 40))
        return ferry_fail(FERRY_ERR_INVALID, "%s rows need a positive multiple of %d columns, "
                          "got %lld", ferry_quant_name(t), FERRY_QUANT_GROUP, (long long)cols);
    *out = (size_t)(cols / FERRY_QUANT_GROUP) * g;
    return FERRY_OK;
}

static void put_f16(uint8_t *p, uint16_t h)
{
    p[0] = (uint8_t)(h & 0xff);
    p[1] = (uint8_t)(h >> 8);
}

/* An f16 that is finite: the scale of the group at column c. */
static ferry_status to_f16(float v, const char *what, int64_t c, uint16_t *out)
{
    uint16_t h = ferry_f32_to_f16(v);
    if ((h & 0x7c00u) == 0x7c00u)
        return ferry_fail(FERRY_ERR_INVALID, "the group at column %lld needs %s %g, beyond f16",
                          (long long)c, what, (double)v);
    *out = h;
    return FERRY_OK;
}

static ferry_status quantize_q8(const float *w, int64_t c, uint8_t *g)
{
    float amax = 0;
    for (int i = 0; i < FERRY_QUANT_GROUP; i++)
        amax = fabsf(w[i]) > amax ? fabsf(w[i]) : amax;
    uint16_t dh = 0;
    TRY(to_f16(amax / 127.0f, "a scale of", c, &dh));
    float d = ferry_f16_to_f32(dh);
    put_f16(g, dh);
    for (int i = 0; i < FERRY_QUANT_GROUP; i++) {
        float q = d > 0 ? roundf(w[i] / d) : 0.0f;
        q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
        g[2 + i] = (uint8_t)(int8_t)q;
    }
    return FERRY_OK;
}

static ferry_status quantize_q4(const float *w, int64_t c, uint8_t *g)
{
    float lo = w[0], hi = w[0];
    for (int i = 1; i < FERRY_QUANT_GROUP; i++) {
        lo = w[i] < lo ? w[i] : lo;
        hi = w[i] > hi ? w[i] : hi;
    }
    uint16_t mh = 0, dh = 0;
    TRY(to_f16(lo, "a minimum of", c, &mh));
    float m = ferry_f16_to_f32(mh);
    TRY(to_f16((hi - m) / 15.0f, "a scale of", c, &dh));
    float d = ferry_f16_to_f32(dh);
    put_f16(g, dh);
    put_f16(g + 2, mh);
    memset(g + 4, 0, FERRY_QUANT_GROUP / 2);
    for (int i = 0; i < FERRY_QUANT_GROUP; i++) {
        float q = d > 0 ? roundf((w[i] - m) / d) : 0.0f;
        q = q > 15.0f ? 15.0f : (q < 0.0f ? 0.0f : q);
        g[4 + i / 2] |= (uint8_t)((unsigned)q << (4 * (i & 1)));
    }
    return FERRY_OK;
}

ferry_status ferry_quantize_row(ferry_dtype t, const float *src, int64_t cols, void *dst)
{
    size_t n_bytes;
    TRY(ferry_quant_row_bytes(t, cols, &n_bytes));
    for (int64_t c = 0; c < cols; c++)
        if (!isfinite(src[c]))
            return ferry_fail(FERRY_ERR_INVALID, "cannot quantize column %lld: %g is not finite",
                              (long long)c, (double)src[c]);
    size_t gb = ferry_quant_group_bytes(t);
    uint8_t *out = dst;
    for (int64_t c = 0; c < cols; c += FERRY_QUANT_GROUP, out += gb)
        TRY(t == FERRY_DTYPE_Q8 ? quantize_q8(src + c, c, out) : quantize_q4(src + c, c, out));
    return FERRY_OK;
}

ferry_status ferry_dequantize_row(ferry_dtype t, const void *src, int64_t cols, float *dst)
{
    size_t n_bytes;
    TRY(ferry_quant_row_bytes(t, cols, &n_bytes));
    for (int64_t c = 0; c < cols; c++)
        dst[c] = ferry_quant_weight(t, src, c);
    return FERRY_OK;
}
