/* kv_quant.c — see kv_quant.h. */
#include "kv_quant.h"
#include "quant.h"

#include <math.h>
#include <string.h>

void kvq_quant_group(const float *x, int n, int stride, int bits, uint8_t *codes, uint16_t *scale,
                     uint16_t *min) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) {
        float v = x[(size_t)i * stride];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    int qmax = (1 << bits) - 1;
    memset(codes, 0, kvq_code_bytes(bits, n));
    *min = quant_f32_to_f16(lo);
    lo = quant_f16_to_f32(*min); /* the codes are computed against what is stored */
    float s = quant_f16_to_f32(quant_f32_to_f16((hi - lo) / (float)qmax));
    /* a constant group (or one too narrow to represent) reconstructs as its minimum */
    if (!(s > 0) || !isfinite(s)) {
        *scale = 0;
        return;
    }
    *scale = quant_f32_to_f16(s);
    float inv = 1.0f / s;
    for (int i = 0; i < n; i++) {
        float t = (x[(size_t)i * stride] - lo) * inv;
        int c = (int)lrintf(t);
        c = c < 0 ? 0 : c > qmax ? qmax : c;
        kvq_put(codes, bits, i, c);
    }
}

void kvq_dequant_group(const uint8_t *codes, int n, int bits, float scale, float min, float *out) {
    for (int i = 0; i < n; i++) out[i] = (float)kvq_code(codes, bits, i) * scale + min;
}

void kvq_quant_keys(const float *k, int nt, int kd, int bits, size_t cstride, uint8_t *codes,
                    uint16_t *scale, uint16_t *min) {
    for (int c = 0; c < kd; c++) {
        memset(codes + (size_t)c * cstride, 0, cstride);
        kvq_quant_group(k + c, nt, kd, bits, codes + (size_t)c * cstride, &scale[c], &min[c]);
    }
}
