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

static bool forced_ref;

void ops_init(void) {
    bool fast = !forced_ref && kvs_cpu_has_avx2();
    ops_attn_scores = fast ? ops_attn_scores_avx2 : ops_attn_scores_ref;
    ops_softmax_partial = fast ? ops_softmax_partial_avx2 : ops_softmax_partial_ref;
    ops_attn_accum = fast ? ops_attn_accum_avx2 : ops_attn_accum_ref;
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
    for (int j = 0; j < n; j++)
        for (int qi = 0; qi < g; qi++) {
            float p = P[qi * lds + j];
            for (int d = 0; d < hd; d++) O[qi * hd + d] += p * quant_f16_to_f32(V[(size_t)j * hd + d]);
        }
}
