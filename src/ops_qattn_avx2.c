/* TEMPORARY forwarding stubs until the AVX2 kernels land */
#include "ops.h"
void ops_qattn_blk_scores_avx2(const float *Q, int g, int kd, const uint8_t *codes, size_t cs,
                               const float *scale, const float *min, int nt, int bits, float sc,
                               float *S, int lds) {
    ops_qattn_blk_scores_ref(Q, g, kd, codes, cs, scale, min, nt, bits, sc, S, lds);
}
void ops_qattn_tok_scores_avx2(const float *Q, int g, int kd, const uint8_t *codes, size_t rs,
                               const float *scale, const float *min, int n, int bits, float sc,
                               float *S, int lds) {
    ops_qattn_tok_scores_ref(Q, g, kd, codes, rs, scale, min, n, bits, sc, S, lds);
}
void ops_qattn_tok_accum_avx2(const float *P, int g, int n, int lds, const uint8_t *codes,
                              size_t rs, const float *scale, const float *min, int hd, int bits,
                              float *O) {
    ops_qattn_tok_accum_ref(P, g, n, lds, codes, rs, scale, min, hd, bits, O);
}
