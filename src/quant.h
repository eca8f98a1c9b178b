/* quant.h — GGUF/ggml block formats: dequantization, activation quantization, dot products and
 * the quantized GEMM used by every linear layer.
 *
 * Does: for each supported weight type, a scalar `_ref` path (kept forever, the oracle) and an
 * AVX2/FMA/F16C path chosen once at start-up (quant_init). Weights stay in their GGUF block
 * format; activations are quantized to the weight type's `vec_dot_type` (Q8_0, Q8_1 or Q8_K)
 * once per row and reused by every weight row (llama.cpp's scheme).
 * Does not: allocate memory, spawn threads (callers split row ranges across threads), know
 * about models.
 *
 * Type ids are ggml's numbering, as stored in GGUF tensor infos.
 */
#ifndef KVS_QUANT_H
#define KVS_QUANT_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

enum qtype {
    QT_F32 = 0, QT_F16 = 1, QT_Q4_0 = 2, QT_Q4_1 = 3, QT_Q5_0 = 6, QT_Q5_1 = 7,
    QT_Q8_0 = 8, QT_Q8_1 = 9, QT_Q2_K = 10, QT_Q3_K = 11, QT_Q4_K = 12, QT_Q5_K = 13,
    QT_Q6_K = 14, QT_Q8_K = 15, QT_BF16 = 30,
    QT_COUNT = 40 /* upper bound of ids; not a type */
};

struct quant_traits {
    const char *name;        /* "Q4_1" */
    int block_size;          /* elements per block (1 for float types) */
    size_t type_size;        /* bytes per block */
    enum qtype vec_dot_type; /* what activations are quantized to for quant_vec_dot/gemm */
    bool is_weight_type;     /* supported as a weight (dequantize + dot) */
};

/* NULL when `t` is unknown or unsupported. */
const struct quant_traits *quant_get_traits(int t);
/* Bytes of a row of n elements; 0 if n is not a multiple of the block size or type unknown. */
size_t quant_row_bytes(int t, int64_t n);

/* Pick SIMD paths (AVX2+FMA+F16C when the CPU has them). Idempotent, thread-safe to call once
 * before use; quant_force_ref(true) makes every public entry point use the _ref code (tests). */
void quant_init(void);
void quant_force_ref(bool on);
bool quant_has_avx2(void);

/* dst[0..n) = dequantized src row. n multiple of block size. */
void quant_dequantize_row(int t, const void *src, float *dst, int64_t n);
void quant_dequantize_row_ref(int t, const void *src, float *dst, int64_t n);

/* Quantize a float row to any type that has a reference quantizer (all weight types and the
 * activation types Q8_0/Q8_1/Q8_K). Used for activations and to build test data. */
void quant_quantize_row(int t, const float *src, void *dst, int64_t n);
void quant_quantize_row_ref(int t, const float *src, void *dst, int64_t n);

/* Dot product of one weight row of type t with one activation row already quantized to
 * quant_get_traits(t)->vec_dot_type (for F32/F16/BF16 weights vec_dot_type is QT_F32). */
float quant_vec_dot(int t, int64_t n, const void *w_row, const void *x_row);
float quant_vec_dot_ref(int t, int64_t n, const void *w_row, const void *x_row);

/* Y[it*ldy + ir] = dot(W row ir, X row it) for ir in [r0, r1), it in [0, n_tok).
 * W: rows of w_row_bytes (= quant_row_bytes(t, n_cols)); X: n_tok rows of x_row_bytes, each a
 * row quantized to vec_dot_type. Tiled over several rows x tokens so that prefill reuses loads;
 * the result for every (ir, it) equals quant_vec_dot up to float summation order. */
void quant_gemm(int t, const void *W, size_t w_row_bytes, int64_t n_cols, int r0, int r1,
                const void *X, size_t x_row_bytes, int n_tok, float *Y, int64_t ldy);

/* Pre-packed weights: the fast kernels' tiles (8 rows interleaved, scales beside them) made once
 * instead of on every batched product. quant_pack_bytes is 0 where the active kernels have no
 * packed layout for t (today: AVX2, Q4_0/Q4_1/Q8_0/Q4_K/Q6_K). quant_pack fills dst (32-byte aligned,
 * quant_pack_bytes long) from W. quant_gemm_packed is quant_gemm reading P where it can (W is the
 * same tensor, used otherwise), with bit-identical results. */
size_t quant_pack_bytes(int t, int64_t n_rows, int64_t n_cols);
void quant_pack(int t, const void *W, size_t w_row_bytes, int64_t n_rows, int64_t n_cols, void *dst);
void quant_gemm_packed(int t, const void *W, const void *P, size_t w_row_bytes, int64_t n_cols,
                       int r0, int r1, const void *X, size_t x_row_bytes, int n_tok, float *Y,
                       int64_t ldy);

/* The same product on float activations: X is n_tok rows of n_cols floats (row stride ldx
 * floats), never quantized. Each weight row ir in [r0, r1) is dequantized into `row`
 * (n_cols floats, the caller's scratch) and dotted in fp32 with every X row. Slower than
 * quant_gemm (a dequantization per row and call); used by contexts made with act_f32 so that the
 * engine can be compared with a float reference far below the noise of 8-bit activations. */
void quant_gemm_f32(int t, const void *W, size_t w_row_bytes, int64_t n_cols, int r0, int r1,
                    const float *X, int64_t ldx, int n_tok, float *Y, int64_t ldy, float *row);

/* fp16 / bf16 helpers (the KV cache stores fp16). */
float quant_f16_to_f32(uint16_t h);
uint16_t quant_f32_to_f16(float f);
void quant_f16_to_f32_row(const uint16_t *src, float *dst, int64_t n);
void quant_f32_to_f16_row(const float *src, uint16_t *dst, int64_t n);

#endif
