/* ops.c — scalar reference kernels and dispatch (see ops.h). */
#include "ops.h"
#include "quant.h"
#include "base.h"

#include <math.h>
#include <string.h>

void (*ops_attn_scores)(const float *, int, const uint16_t *, int, int, float, float *,
                        int) = ops_attn_scores_ref;
void (*ops_softmax_partial)(float *, int, int, int, float *, float *) = ops_softmax_partial_ref;
void (*ops_attn_accum)(const float *, int, int, int, const uint16_t *, int,
                       float *) = ops_attn_accum_ref;
void (*ops_attn_accum_add)(const float *, int, int, int, const uint16_t *, int,
                           float *) = ops_attn_accum_add_ref;
void (*ops_qattn_blk_scores)(const float *, int, int, const uint8_t *, size_t, const uint16_t *,
                             const uint16_t *, int, int, float, float *,
                             int) = ops_qattn_blk_scores_ref;
void (*ops_qattn_tok_scores)(const float *, int, int, const uint8_t *, size_t, const uint16_t *,
                             const uint16_t *, int, int, float, float *,
                             int) = ops_qattn_tok_scores_ref;
void (*ops_qattn_tok_accum)(const float *, int, int, int, const uint8_t *, size_t, const uint16_t *,
                            const uint16_t *, int, int, int, float *) = ops_qattn_tok_accum_ref;

void (*ops_linear_f32)(float *, int, const float *, int, int, const float *, const float *, int,
                       int) = ops_linear_f32_ref;

static bool forced_ref;

void ops_init(void) {
    bool fast = !forced_ref && kvs_cpu_has_avx2();
    ops_attn_scores = fast ? ops_attn_scores_avx2 : ops_attn_scores_ref;
    ops_softmax_partial = fast ? ops_softmax_partial_avx2 : ops_softmax_partial_ref;
    ops_attn_accum = fast ? ops_attn_accum_avx2 : ops_attn_accum_ref;
    ops_attn_accum_add = fast ? ops_attn_accum_add_avx2 : ops_attn_accum_add_ref;
    ops_qattn_blk_scores = fast ? ops_qattn_blk_scores_q8_avx2 : ops_qattn_blk_scores_ref;
    ops_qattn_tok_scores = fast ? ops_qattn_tok_scores_avx2 : ops_qattn_tok_scores_ref;
    ops_qattn_tok_accum = fast ? ops_qattn_tok_accum_q8_avx2 : ops_qattn_tok_accum_ref;
    ops_linear_f32 = fast ? ops_linear_f32_avx2 : ops_linear_f32_ref;
}

void ops_force_ref(bool on) {
    forced_ref = on;
    ops_init();
}

void ops_rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float s = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * s * w[i];
}

void ops_rope(float *x, int n_heads, int hd, const float *cs, bool neox) {
    int half = hd / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * hd;
        for (int i = 0; i < half; i++) {
            int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
            float c = cs[2 * i], s = cs[2 * i + 1];
            float x0 = v[a], x1 = v[b];
            v[a] = x0 * c - x1 * s;
            v[b] = x0 * s + x1 * c;
        }
    }
}

void ops_linear_f32_ref(float *Y, int ldy, const float *X, int ldx, int T, const float *W,
                        const float *b, int rows, int cols) {
    for (int t = 0; t < T; t++)
        for (int r = 0; r < rows; r++) {
            const float *x = X + (size_t)t * ldx, *w = W + (size_t)r * cols;
            double s = b ? b[r] : 0.0;
            for (int c = 0; c < cols; c++) s += (double)x[c] * w[c];
            Y[(size_t)t * ldy + r] = (float)s;
        }
}

void ops_swiglu(float *g, const float *u, int n) {
    for (int i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

void ops_attn_scores_ref(const float *Q, int g, const uint16_t *K, int n, int hd, float scale,
                         float *S, int lds) {
    for (int j = 0; j < n; j++) {
        for (int qi = 0; qi < g; qi++) {
            float acc = 0.0f;
            for (int d = 0; d < hd; d++)
                acc += Q[qi * hd + d] * quant_f16_to_f32(K[(size_t)j * hd + d]);
            S[qi * lds + j] = acc * scale;
        }
    }
}

void ops_softmax_partial_ref(float *S, int g, int n, int lds, float *m, float *l) {
    for (int qi = 0; qi < g; qi++) {
        float *s = S + qi * lds;
        float mx = -INFINITY;
        for (int j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
        float sum = 0.0f;
        for (int j = 0; j < n; j++) {
            s[j] = expf(s[j] - mx);
            sum += s[j];
        }
        m[qi] = mx;
        l[qi] = sum;
    }
}

void ops_attn_accum_ref(const float *P, int g, int n, int lds, const uint16_t *V, int hd,
                        float *O) {
    memset(O, 0, sizeof(float) * (size_t)g * hd);
    ops_attn_accum_add_ref(P, g, n, lds, V, hd, O);
}

void ops_attn_accum_add_ref(const float *P, int g, int n, int lds, const uint16_t *V, int hd,
                            float *O) {
    for (int j = 0; j < n; j++)
        for (int qi = 0; qi < g; qi++) {
            float p = P[qi * lds + j];
            for (int d = 0; d < hd; d++) O[qi * hd + d] += p * quant_f16_to_f32(V[(size_t)j * hd + d]);
        }
}

/* The references use the factored form the fast kernels use (codes times the query folded with
 * the scale, plus one bias term), summed in the natural order; tests/test_qattn.c checks them
 * against plain dequantize-then-dot. */
void ops_qattn_blk_scores_ref(const float *Q, int g, int kd, const uint8_t *codes, size_t cstride,
                              const uint16_t *scale, const uint16_t *min, int nt, int bits, float sc,
                              float *S, int lds) {
    for (int qi = 0; qi < g; qi++) {
        const float *q = Q + (size_t)qi * kd;
        float bias = 0.0f;
        for (int c = 0; c < kd; c++) bias += q[c] * quant_f16_to_f32(min[c]);
        for (int t = 0; t < nt; t++) {
            float acc = bias;
            for (int c = 0; c < kd; c++)
                acc += (q[c] * quant_f16_to_f32(scale[c])) * (float)ops_qcode(codes + (size_t)c * cstride, bits, t);
            S[(size_t)qi * lds + t] = sc * acc;
        }
    }
}

void ops_qattn_tok_scores_ref(const float *Q, int g, int kd, const uint8_t *codes, size_t rstride,
                              const uint16_t *scale, const uint16_t *min, int n, int bits, float sc,
                              float *S, int lds) {
    for (int qi = 0; qi < g; qi++) {
        const float *q = Q + (size_t)qi * kd;
        float qsum = 0.0f;
        for (int c = 0; c < kd; c++) qsum += q[c];
        for (int t = 0; t < n; t++) {
            const uint8_t *row = codes + (size_t)t * rstride;
            float dot = 0.0f;
            for (int c = 0; c < kd; c++) dot += q[c] * (float)ops_qcode(row, bits, c);
            S[(size_t)qi * lds + t] =
                sc * (quant_f16_to_f32(scale[t]) * dot + quant_f16_to_f32(min[t]) * qsum);
        }
    }
}

void ops_qattn_tok_accum_ref(const float *P, int g, int n, int lds, const uint8_t *codes,
                             size_t rstride, const uint16_t *scale, const uint16_t *min, int hd,
                             int gs, int bits, float *O) {
    if (n <= 0) return;
    const int ng = hd / gs;
    for (int qi = 0; qi < g; qi++) {
        for (int k = 0; k < ng; k++) {
            float *o = O + (size_t)qi * hd + (size_t)k * gs;
            float bias = 0.0f;
            for (int t = 0; t < n; t++) {
                const uint8_t *row = codes + (size_t)t * rstride;
                float p = P[(size_t)qi * lds + t], ps = p * quant_f16_to_f32(scale[(size_t)t * ng + k]);
                bias += p * quant_f16_to_f32(min[(size_t)t * ng + k]);
                for (int c = 0; c < gs; c++) o[c] += ps * (float)ops_qcode(row, bits, k * gs + c);
            }
            for (int c = 0; c < gs; c++) o[c] += bias;
        }
    }
}

/* q8 of n floats (see ops.h): the int8 copy in r, the factor returned */
static float q8_quantize(const float *v, int n, int8_t *r) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(v[i]));
    if (!(amax > 0.0f)) {
        memset(r, 0, (size_t)n);
        return 0.0f;
    }
    float id = 127.0f / amax;
    for (int i = 0; i < n; i++) {
        long x = lrintf(v[i] * id);
        r[i] = (int8_t)(x > 127 ? 127 : x < -127 ? -127 : x);
    }
    return amax / 127.0f;
}

void ops_qattn_blk_scores_q8_ref(const float *Q, int g, int kd, const uint8_t *codes,
                                 size_t cstride, const uint16_t *scale, const uint16_t *min, int nt,
                                 int bits, float sc, float *S, int lds) {
    if (!ops_qattn_q8_bits(bits) || kd > 256) {
        ops_qattn_blk_scores_ref(Q, g, kd, codes, cstride, scale, min, nt, bits, sc, S, lds);
        return;
    }
    float qs[256];
    int8_t r[256];
    for (int qi = 0; qi < g; qi++) {
        const float *q = Q + (size_t)qi * kd;
        float bias = 0.0f;
        for (int c = 0; c < kd; c++) {
            qs[c] = q[c] * quant_f16_to_f32(scale[c]);
            bias += q[c] * quant_f16_to_f32(min[c]);
        }
        float d = q8_quantize(qs, kd, r);
        for (int t = 0; t < nt; t++) {
            int32_t s = 0;
            for (int c = 0; c < kd; c++) s += r[c] * ops_qcode(codes + (size_t)c * cstride, bits, t);
            S[(size_t)qi * lds + t] = sc * fmaf(d, (float)s, bias);
        }
    }
}

void ops_qattn_tok_accum_q8_ref(const float *P, int g, int n, int lds, const uint8_t *codes,
                                size_t rstride, const uint16_t *scale, const uint16_t *min, int hd,
                                int gs, int bits, float *O) {
    if (!ops_qattn_q8_bits(bits) || gs <= 0 || gs % 32 != 0 || hd % gs != 0 || hd > 256) {
        ops_qattn_tok_accum_ref(P, g, n, lds, codes, rstride, scale, min, hd, gs, bits, O);
        return;
    }
    if (n <= 0) return;
    const int ng = hd / gs;
    float acc[256], w[OPS_Q8_ROWS];
    int8_t r[OPS_Q8_ROWS];
    for (int qi = 0; qi < g; qi++) {
        const float *p = P + (size_t)qi * lds;
        for (int k = 0; k < ng; k++) {
            float bias = 0.0f;
            memset(acc, 0, sizeof(float) * (size_t)gs);
            for (int j0 = 0; j0 < n; j0 += OPS_Q8_ROWS) {
                int nr = n - j0 < OPS_Q8_ROWS ? n - j0 : OPS_Q8_ROWS;
                for (int t = 0; t < nr; t++) {
                    size_t e = (size_t)(j0 + t) * ng + k;
                    w[t] = p[j0 + t] * quant_f16_to_f32(scale[e]);
                    bias += p[j0 + t] * quant_f16_to_f32(min[e]);
                }
                float d = q8_quantize(w, nr, r);
                for (int c = 0; c < gs; c++) {
                    int32_t s = 0;
                    for (int t = 0; t < nr; t++)
                        s += r[t] * ops_qcode(codes + (size_t)(j0 + t) * rstride, bits, k * gs + c);
                    acc[c] = fmaf(d, (float)s, acc[c]);
                }
            }
            float *o = O + (size_t)qi * hd + (size_t)k * gs;
            for (int c = 0; c < gs; c++) o[c] += acc[c] + bias;
        }
    }
}
