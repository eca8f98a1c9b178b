/* kv_quant.h — KIVI-style low-bit KV payloads: the quantizer behind the store's packed entries.
 *
 * Quantizer (KIVI, Liu et al. 2024, arXiv 2402.02750; shared/methods/kivi-mikv.md): asymmetric
 * min-max per group, scale = (max - min) / (2^b - 1), code = round((x - min) / scale) clamped to
 * [0, 2^b - 1], x̂ = code * scale + min. A constant group has scale 0 and reconstructs exactly
 * (no division by zero). Scale and min are stored as fp16 (as the paper's code keeps them), and
 * the codes are computed from the rounded values, so x̂ uses exactly what is stored. Bits b ∈ {2, 3, 4, 8} (3 for MiKV's per-token rows only); codes are a
 * little-endian bit stream, lowest bits first (ops_qcode in ops.h reads them).
 *
 * Grouping:
 *  - keys per channel: a block of G tokens of one KV head is quantized channel by channel (each
 *    channel's G values form a group), stored channel-major: codes (head_dim, G) and one
 *    (scale, min) per channel. This is what makes RoPE's outlier channels quantizable.
 *  - values per token: each token's head_dim values form one group: codes (head_dim) and one
 *    (scale, min) per token.
 * Fused reads (no dequantize-to-scratch of the cache, ops_qattn_* in ops.h): q·k̂ for the keys
 * of a block is Σ_c q_c (code_ct s_c + m_c) = Σ_c (q_c s_c) code_ct + Σ_c q_c m_c,
 * and Σ_t p_t v̂_t = Σ_t (p_t s_t) code_t + (Σ_t p_t m_t) 1.
 * Does not: decide which tokens are quantized (the residual window and MiKV's precision choice
 * belong to the store and the policy).
 */
#ifndef KVS_KV_QUANT_H
#define KVS_KV_QUANT_H

#include "ops.h"

#include <stddef.h>
#include <stdint.h>

enum { KVQ_MAX_GROUP = 256 };

/* bytes of n packed b-bit codes */
static inline size_t kvq_code_bytes(int bits, int n) { return ((size_t)n * (size_t)bits + 7) / 8; }
static inline int kvq_bits_ok(int bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

/* One group of n floats (stride `stride` between them) -> packed codes, scale and min. */
void kvq_quant_group(const float *x, int n, int stride, int bits, uint8_t *codes, uint16_t *scale,
                     uint16_t *min);
/* Codes are a little-endian bit stream: code i occupies bits [i b, i b + b), lowest bits first.
 * For b = 2, 4, 8 no code crosses a byte; 3-bit codes do (8 codes fill 3 bytes). */
static inline int kvq_code(const uint8_t *codes, int bits, int i) { return ops_qcode(codes, bits, i); }
/* ORs code c (< 2^b) in at position i; the bytes start zeroed */
static inline void kvq_put(uint8_t *codes, int bits, int i, int c) {
    size_t bit = (size_t)i * (size_t)bits;
    unsigned sh = (unsigned)(bit & 7);
    codes[bit >> 3] |= (uint8_t)((unsigned)c << sh);
    if (sh + (unsigned)bits > 8) codes[(bit >> 3) + 1] |= (uint8_t)((unsigned)c >> (8 - sh));
}
void kvq_dequant_group(const uint8_t *codes, int n, int bits, float scale, float min, float *out);

/* Keys, per channel: k is (nt, kd) rows of nt <= KVQ_MAX_GROUP tokens; channel c's nt codes go
 * to codes + c * cstride (cstride >= kvq_code_bytes(bits, nt)), with scale[c] and min[c]. The
 * fused reads of this layout are ops_qattn_blk_scores (keys) and ops_qattn_tok_accum (values,
 * one kvq_quant_group per token) in ops.h. */
void kvq_quant_keys(const float *k, int nt, int kd, int bits, size_t cstride, uint8_t *codes,
                    uint16_t *scale, uint16_t *min);

#endif
