/* test_ops.c — the AVX2 attention kernels against their scalar references on random data and
 * awkward sizes (budget: relative max error 1e-5 of the largest magnitude); RMSNorm and RoPE
 * (both layouts, many positions) against float64 references written here. */
#include "ops.h"
#include "quant.h"
#include "testutil.h"

static void fill(float *x, int n, float scale) {
    for (int i = 0; i < n; i++) x[i] = tu_randf() * scale;
}

/* RMSNorm against a float64 reference, on rows of awkward and model sizes: out[i] =
 * x[i] / sqrt(mean(x^2) + eps) * w[i]. Budget: max error 1e-6 of the largest output. */
static void test_rmsnorm_ref(void) {
    int ns[] = {1, 3, 31, 64, 576, 1536, 8960};
    float eps[] = {1e-5f, 1e-6f, 0.0f};
    static float x[8960], w[8960], out[8960];
    for (size_t a = 0; a < sizeof ns / sizeof ns[0]; a++)
        for (size_t b = 0; b < sizeof eps / sizeof eps[0]; b++) {
            int n = ns[a];
            float scale = (float)(a + 1) * 0.7f; /* rows of different magnitude */
            fill(x, n, scale);
            fill(w, n, 2.0f);
            double ss = 0;
            for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
            double r = 1.0 / sqrt(ss / n + eps[b]);
            ops_rmsnorm(out, x, w, n, eps[b]);
            double md = 0, mx = 0;
            for (int i = 0; i < n; i++) {
                double want = x[i] * r * w[i];
                double d = fabs(out[i] - want);
                md = d > md || d != d ? d : md;
                mx = fabs(want) > mx ? fabs(want) : mx;
            }
            CHECKF(md <= 1e-6 * mx, "rmsnorm n %d eps %g: max diff %g of %g", n, eps[b], md, mx);
        }
    /* eps matters where mean(x^2) is small: x = 1e-3, eps 1e-5 -> 1 / sqrt(1e-6 + 1e-5) */
    for (int i = 0; i < 64; i++) x[i] = 1e-3f, w[i] = 1.0f;
    ops_rmsnorm(out, x, w, 64, 1e-5f);
    CHECKF(fabs(out[0] - 1e-3 / sqrt(1e-6 + 1e-5)) < 1e-6, "rmsnorm eps: %g", out[0]);
}

/* RoPE against a float64 rotation, both layouts (adjacent pairs and NEOX halves), several heads,
 * head sizes and bases, at many positions up to 32767: the angle of pair i at position p is
 * p * theta^(-2i/hd); pairs are (2i, 2i+1), or (i, i + hd/2) for NEOX. The (cos, sin) table is
 * made here as the engine makes it (double, rounded to float). Budget: max error 2e-6 of the
 * largest input. */
static void test_rope_ref(void) {
    int hds[] = {64, 128, 8};
    double thetas[] = {10000.0, 100000.0, 1000000.0};
    int pos[] = {0, 1, 2, 3, 7, 31, 100, 511, 1000, 4095, 8191, 32767};
    enum { NH = 3 };
    static float x[NH * 128], out[NH * 128], cs[128];
    int n_cases = 0;
    for (int neox = 0; neox <= 1; neox++)
        for (size_t a = 0; a < sizeof hds / sizeof hds[0]; a++)
            for (size_t b = 0; b < sizeof thetas / sizeof thetas[0]; b++)
                for (size_t c = 0; c < sizeof pos / sizeof pos[0]; c++) {
                    int hd = hds[a], half = hd / 2;
                    fill(x, NH * hd, 3.0f);
                    for (int i = 0; i < half; i++) {
                        double ang = pos[c] * pow(thetas[b], -2.0 * i / hd);
                        cs[2 * i] = (float)cos(ang), cs[2 * i + 1] = (float)sin(ang);
                    }
                    memcpy(out, x, sizeof(float) * NH * hd);
                    ops_rope(out, NH, hd, cs, neox);
                    double md = 0;
                    for (int h = 0; h < NH; h++)
                        for (int i = 0; i < half; i++) {
                            int ia = h * hd + (neox ? i : 2 * i), ib = h * hd + (neox ? i + half : 2 * i + 1);
                            double ang = pos[c] * pow(thetas[b], -2.0 * i / hd);
                            double ya = x[ia] * cos(ang) - x[ib] * sin(ang);
                            double yb = x[ia] * sin(ang) + x[ib] * cos(ang);
                            double d = fmax(fabs(out[ia] - ya), fabs(out[ib] - yb));
                            md = d > md || d != d ? d : md;
                        }
                    CHECKF(md <= 2e-6 * 3.0, "rope %s hd %d theta %g pos %d: max diff %g",
                           neox ? "neox" : "normal", hd, thetas[b], pos[c], md);
                    n_cases++;
                }
    fprintf(stderr, "rope: %d cases (2 layouts x 3 head sizes x 3 bases x 12 positions)\n",
            n_cases);
}

int main(void) {
    quant_init();
    ops_init();
    int ns[] = {1, 3, 7, 8, 9, 16, 33, 127, 300};
    int hds[] = {64, 128, 8};
    int gs[] = {1, 2, 3, 4, 6}; /* every head-group remainder of the register-blocked kernels */
    enum { LDS = 320 };
    static float Q[6 * 128], S1[6 * LDS], S2[6 * LDS], O1[6 * 128], O2[6 * 128];
    static uint16_t K[300 * 128], V[300 * 128];
    for (size_t a = 0; a < sizeof hds / sizeof hds[0]; a++)
        for (size_t b = 0; b < sizeof gs / sizeof gs[0]; b++)
            for (size_t c = 0; c < sizeof ns / sizeof ns[0]; c++) {
                int hd = hds[a], g = gs[b], n = ns[c];
                fill(Q, g * hd, 2.0f);
                for (int i = 0; i < n * hd; i++) {
                    K[i] = quant_f32_to_f16(tu_randf() * 3.0f);
                    V[i] = quant_f32_to_f16(tu_randf());
                }
                for (int i = 0; i < 6 * LDS; i++) S1[i] = S2[i] = NAN;
                ops_attn_scores_ref(Q, g, K, n, hd, 0.125f, S1, LDS);
                ops_attn_scores_avx2(Q, g, K, n, hd, 0.125f, S2, LDS);
                double md = 0, mx = 0;
                for (int qi = 0; qi < g; qi++)
                    for (int j = 0; j < n; j++) {
                        double d = fabs(S1[qi * LDS + j] - S2[qi * LDS + j]);
                        md = d > md || d != d ? d : md;
                        mx = fabs(S1[qi * LDS + j]) > mx ? fabs(S1[qi * LDS + j]) : mx;
                    }
                CHECKF(md <= 1e-5 * (mx + 1), "scores hd %d g %d n %d: max diff %g", hd, g, n, md);
                if (n > 1) { /* a key's score does not depend on how many keys follow it */
                    static float S3[6 * LDS];
                    ops_attn_scores_avx2(Q, g, K, n - 1, hd, 0.125f, S3, LDS);
                    int same = 1;
                    for (int qi = 0; qi < g; qi++)
                        same &= memcmp(S2 + qi * LDS, S3 + qi * LDS, sizeof(float) * (size_t)(n - 1)) == 0;
                    CHECKF(same, "scores hd %d g %d: keys [0,%d) differ when key %d follows", hd, g, n - 1, n - 1);
                }
                float m1[8], l1[8], m2[8], l2[8];
                memcpy(S2, S1, sizeof S1);
                ops_softmax_partial_ref(S1, g, n, LDS, m1, l1);
                ops_softmax_partial_avx2(S2, g, n, LDS, m2, l2);
                for (int qi = 0; qi < g; qi++) {
                    CHECK(m1[qi] == m2[qi]);
                    CHECKF(fabsf(l1[qi] - l2[qi]) <= 1e-5f * l1[qi], "softmax sum %g vs %g", l1[qi], l2[qi]);
                    for (int j = 0; j < n; j++)
                        CHECK(fabsf(S1[qi * LDS + j] - S2[qi * LDS + j]) <= 1e-6f);
                }
                for (int i = 0; i < 6 * 128; i++) O1[i] = O2[i] = NAN;
                ops_attn_accum_ref(S1, g, n, LDS, V, hd, O1);
                ops_attn_accum_avx2(S1, g, n, LDS, V, hd, O2);
                double e = tu_max_abs_diff(O1, O2, (long)g * hd);
                CHECKF(e <= 1e-5 * (n + 1), "accum hd %d g %d n %d: max diff %g", hd, g, n, e);
                { /* rows [0,k) then the rest added on: the same chain of FMAs, bit for bit */
                    static float O3[6 * 128];
                    int k = n / 3;
                    ops_attn_accum_avx2(S1, g, k, LDS, V, hd, O3);
                    ops_attn_accum_add_avx2(S1 + k, g, n - k, LDS, V + (size_t)k * hd, hd, O3);
                    CHECKF(memcmp(O2, O3, sizeof(float) * (size_t)g * hd) == 0,
                           "accum hd %d g %d n %d: split at %d differs", hd, g, n, k);
                }
            }
    /* rmsnorm of a constant row is the weight; rope at position 0 is the identity */
    float x[64], w[64], out[64], cs[64];
    for (int i = 0; i < 64; i++) x[i] = 3.0f, w[i] = (float)i;
    ops_rmsnorm(out, x, w, 64, 0.0f);
    CHECK(tu_max_abs_diff(out, w, 64) < 1e-5);
    fill(x, 64, 1.0f);
    memcpy(out, x, sizeof x);
    for (int i = 0; i < 32; i++) cs[2 * i] = 1.0f, cs[2 * i + 1] = 0.0f;
    ops_rope(out, 1, 64, cs, true);
    CHECK(memcmp(out, x, sizeof x) == 0);
    /* rope preserves the norm of each rotated pair */
    for (int i = 0; i < 32; i++) cs[2 * i] = cosf(0.3f * i), cs[2 * i + 1] = sinf(0.3f * i);
    ops_rope(out, 1, 64, cs, false);
    for (int i = 0; i < 32; i++) {
        float a = x[2 * i] * x[2 * i] + x[2 * i + 1] * x[2 * i + 1];
        float b = out[2 * i] * out[2 * i] + out[2 * i + 1] * out[2 * i + 1];
        CHECK(fabsf(a - b) < 1e-5f);
    }
    test_rmsnorm_ref();
    test_rope_ref();
    return tu_finish("test_ops");
}
