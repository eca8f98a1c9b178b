/* kv_quant.c — see kv_quant.h. Scalar code; the AVX2 variants will have to match it. */
#include "kv_quant.h"

#include <math.h>
#include <string.h>

void kvq_quant_group(const float *x, int n, int stride, int bits, uint8_t *codes, float *scale,
                     float *min) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) {
        float v = x[(size_t)i * stride];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    int qmax = (1 << bits) - 1;
    float s = (hi - lo) / (float)qmax;
    memset(codes, 0, kvq_code_bytes(bits, n));
    *min = lo;
    /* a constant group (or one too narrow to represent) reconstructs as its minimum */
    if (!(s > 0) || !isfinite(s)) {
        *scale = 0.0f;
        return;
    }
    *scale = s;
    float inv = 1.0f / s;
    int per = 8 / bits;
    for (int i = 0; i < n; i++) {
        float t = (x[(size_t)i * stride] - lo) * inv;
        int c = (int)lrintf(t);
        c = c < 0 ? 0 : c > qmax ? qmax : c;
        codes[i / per] |= (uint8_t)(c << ((i % per) * bits));
    }
}

void kvq_dequant_group(const uint8_t *codes, int n, int bits, float scale, float min, float *out) {
    for (int i = 0; i < n; i++) out[i] = (float)kvq_code(codes, bits, i) * scale + min;
}

void kvq_quant_keys(const float *k, int G, int hd, int bits, uint8_t *codes, float *scale,
                    float *min) {
    size_t cb = kvq_code_bytes(bits, G);
    for (int c = 0; c < hd; c++)
        kvq_quant_group(k + c, G, hd, bits, codes + (size_t)c * cb, &scale[c], &min[c]);
}

void kvq_key_scores(const float *q, const uint8_t *codes, const float *scale, const float *min,
                    int G, int hd, int bits, float *scores) {
    size_t cb = kvq_code_bytes(bits, G);
    float base = 0.0f;
    for (int c = 0; c < hd; c++) base += q[c] * min[c];
    for (int t = 0; t < G; t++) scores[t] = base;
    for (int c = 0; c < hd; c++) {
        float qs = q[c] * scale[c];
        if (qs == 0.0f) continue;
        const uint8_t *row = codes + (size_t)c * cb;
        for (int t = 0; t < G; t++) scores[t] += qs * (float)kvq_code(row, bits, t);
    }
}

void kvq_quant_value(const float *v, int hd, int bits, uint8_t *codes, float *scale, float *min) {
    kvq_quant_group(v, hd, 1, bits, codes, scale, min);
}

void kvq_value_accum(float p, const uint8_t *codes, float scale, float min, int hd, int bits,
                     float *out) {
    float ps = p * scale, pm = p * min;
    for (int c = 0; c < hd; c++) out[c] += ps * (float)kvq_code(codes, bits, c) + pm;
}
