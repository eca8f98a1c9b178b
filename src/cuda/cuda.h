/* cuda.h — the CUDA backend as the engine sees it: a model's weights in GPU memory, a device KV
 * cache per sequence, and one forward pass over a batch of tokens, all on one GPU.
 *
 * Does: upload the GGUF weight blocks as they are (no requantization) and run the transformer
 * with fused dequantising kernels (decode GEMV, prefill tiles), RMSNorm, RoPE, SwiGLU and
 * flash-decoding attention over fp16 K/V on the device; copy only the requested logits back.
 * Runs KV policies as the engine plans them: scores from saved queries (SnapKV, TOVA), the
 * attention each entry accumulated (H2O), key norms, positions on the host (StreamingLLM, random), compaction by a gather into smaller
 * buffers (below). Does not: sample on the device, pack entries, or print. Built by `make cuda` (src/cuda/cuda.cu, nvcc);
 * the default CPU build links src/cuda/cuda_none.c, whose entry points fail with a clear error.
 *
 * This header is C and C++ (the .cu includes it), so it needs neither base.h nor model.h: the
 * engine describes the model in the plain structs below.
 */
#ifndef KVS_CUDA_H
#define KVS_CUDA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "../../include/kvsieve.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A weight matrix as GGUF stores it on the host: n_rows rows of n_cols elements, row_bytes each. */
struct cuda_w { const void *data; int type; int64_t n_rows, n_cols; size_t row_bytes; };

struct cuda_layer_desc {
    const float *attn_norm, *ffn_norm, *bq, *bk, *bv; /* biases NULL when absent */
    struct cuda_w wq, wk, wv, wo, w_gate, w_up, w_down;
};

struct cuda_model_desc {
    int n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab;
    float norm_eps;
    bool neox;                /* RoPE pairs (i, i + hd/2) instead of (2i, 2i + 1) */
    const float *inv_freq;    /* (head_dim / 2): the CPU path's table, so angles agree */
    struct cuda_w tok_embd, output;
    const float *output_norm;
    const struct cuda_layer_desc *layers;
};

struct cuda_ctx;

/* True when this binary has the CUDA backend compiled in. */
bool cuda_built(void);
/* Weight types the device kernels read (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K). */
bool cuda_type_supported(int type);

/* Upload the model and allocate the scratch for forward passes of up to t_max tokens, caches of
 * up to n_ctx tokens for n_seq sequence slots. KVS_ERR_UNSUPPORTED without a usable GPU (the
 * message says why: no driver, no device, a build without CUDA), or for a weight type the
 * kernels do not read; KVS_ERR_NOMEM when the GPU's memory is too small. */
enum kvs_status cuda_ctx_new(const struct cuda_model_desc *m, int n_ctx, int t_max, int n_seq,
                             struct cuda_ctx **out);
void cuda_ctx_free(struct cuda_ctx *g);
/* "NVIDIA H200 (sm_90, 139.8 GiB)" */
const char *cuda_device_name(const struct cuda_ctx *g);

/* Forget slot's cached tokens and give its device memory back. */
void cuda_seq_clear(struct cuda_ctx *g, int slot);
/* Device bytes of slot's K/V cache as allocated now (capacity included), its query window included. */
uint64_t cuda_seq_kv_bytes(const struct cuda_ctx *g, int slot);
/* Device bytes: weights, all K/V caches now and at their peak, scratch (NULL: not wanted). */
void cuda_mem(const struct cuda_ctx *g, uint64_t *weights, uint64_t *kv, uint64_t *kv_peak,
              uint64_t *scratch);

/* ---- KV policies on the device (the engine plans with the CPU policy's code, src/forward.c) ----
 * A slot holds, per layer, entries in order of arrival (every KV head of a layer as many);
 * compaction keeps a subset per (layer, head). Positions of entries are tracked on the host for
 * slots with a query window. */

/* Empty slot, then keep the post-RoPE queries of its newest qwin tokens (0: none), when qwin > 0
 * or positions track its entries' positions, and with acc keep each entry's accumulated
 * attention (H2O: the probability each query gave it, averaged over the query heads of its KV
 * head, summed over the queries since it entered; the attention pass adds it). */
enum kvs_status cuda_seq_set_policy(struct cuda_ctx *g, int slot, int qwin, bool positions, bool acc);
/* The accumulated attention of layers[0 .. n_layers) of a slot with acc: entry j of KV head h of
 * layer layers[i] to out[(i * nkv + h) * stride + j] on the host. */
enum kvs_status cuda_seq_acc(struct cuda_ctx *g, int slot, int n_layers, const int *layers, float *out, size_t stride);
/* Streaming pos=cache: keys of slot's tokens from the next pass on are rotated to their position
 * minus shift (the entries evicted so far); the tracked positions stay the tokens' own. */
void cuda_seq_set_rope_shift(struct cuda_ctx *g, int slot, int32_t shift);
/* Entries of a layer of slot (every KV head holds as many). */
int cuda_seq_layer_entries(const struct cuda_ctx *g, int slot, int layer);
/* Positions of the entries of (layer, head) of a slot with a query window (NULL without). */
const int32_t *cuda_seq_positions(const struct cuda_ctx *g, int slot, int layer, int head);
/* The positions of the newest saved queries (at most max), oldest first, into qpos; returns how many. */
int cuda_seq_queries(const struct cuda_ctx *g, int slot, int32_t *qpos, int max);
/* SnapKV's window scores of the entries of layers[0 .. n_layers) (one launch pair per layer, one
 * copy back): for layer i, KV head h and entry j, the sum over the newest nq saved queries w that
 * see entry j (j < vis[(i * nkv + h) * nq + w]) of the query-head probabilities of j, averaged
 * over the group's query heads (their max when agg_max), written to out[(i * nkv + h) * stride
 * + j] on the host (entries past a layer's count: undefined). */
enum kvs_status cuda_seq_score_window(struct cuda_ctx *g, int slot, int n_layers, const int *layers,
                                      const int32_t *vis, int nq, bool agg_max, float *out, size_t stride);
/* Key norm: for layer layers[i], KV head h and entry j, the sum over d of k_d^2 (the stored fp16
 * key, squares rounded then added in order of d, as the CPU scorer sums), written to
 * out[(i * nkv + h) * stride + j] on the host. */
enum kvs_status cuda_seq_key_sq(struct cuda_ctx *g, int slot, int n_layers, const int *layers, float *out,
                                size_t stride);
/* Keep, in each layer l, n_keep[l] entries of every head: those at ascending indices
 * keep[l][h * kstride + i] (keep[l] NULL: the layer as it is). When what is kept plus room for
 * 256 needs less capacity than the slot has, the entries move to new buffers of that size (device
 * memory shrinks with the cache); else they are compacted in place. reindex (streaming
 * pos=cache): a key moving from entry j to i is re-rotated by i - j, as the CPU store does. */
enum kvs_status cuda_seq_compact(struct cuda_ctx *g, int slot, const int32_t *const *keep, const int32_t *n_keep,
                                 int kstride, bool reindex);

/* The KV caches' high-water mark back to what they hold now. */
void cuda_kv_peak_reset(struct cuda_ctx *g);
/* Free device memory now (cudaMemGetInfo), for tests of the byte accounting; 0 on error. */
uint64_t cuda_device_free_bytes(void);
/* Decode steps of up to 32 tokens replay a CUDA graph (on by default; KVS_CUDA_GRAPHS=0 in the
 * environment turns it off): the same kernels and bit-identical results, fewer launch costs. */
void cuda_use_graphs(struct cuda_ctx *g, bool on);
/* KVS_CUDA_PROFILE=1 in the environment at context creation: the forward pass's kernels timed by
 * events between groups of launches (graphs off); the seconds each group has taken so far, up to
 * max groups, their names beside; returns how many (0: profiling off). */
int cuda_prof_read(const struct cuda_ctx *g, const char **names, double *secs, int max);
/* Make slot dst of g a copy of slot src of gs (g itself, or a context of the same model on the
 * same device): its entries, positions, RoPE shift, the newest queries dst's window holds, and
 * accumulated attention where dst keeps it (acc that src lacks starts at 0); dst's old content is
 * dropped, and on an error dst is empty. A dst that tracks positions refuses a src that does not
 * and has dropped entries (its positions are lost). */
enum kvs_status cuda_seq_copy(struct cuda_ctx *g, int dst, const struct cuda_ctx *gs, int src);
/* The device's memory bandwidth in GB/s: the best of 5 device-to-device copies of 1 GiB,
 * counting each byte read and written (-1 when the buffers do not fit). */
double cuda_bandwidth_gb_s(struct cuda_ctx *g);

/* The transformer on T tokens: tokens[i] at position pos[i] of the sequence in slot[i]; positions
 * of one slot consecutive and starting at its cached length. K/V are appended to the slots'
 * caches. Logits of the n_out rows out_rows[] (indices into 0..T-1) go to logits (host). */
enum kvs_status cuda_forward(struct cuda_ctx *g, const int32_t *tokens, const int32_t *pos,
                             const int *slot, int T, const int *out_rows, int n_out, float *logits);

/* For tests, on the host (no GPU needed): the kernels' dequantisation of elements 8p .. 8p+7 of
 * 32-element unit u of a row in GGUF blocks (row_bytes, cols elements), after the rearrangement
 * the upload makes (the planes layout), its factor applied; a load that the GPU would make
 * misaligned is an error (KVS_ERR_INTERNAL). */
enum kvs_status cuda_host_deq8(int type, const void *row, size_t row_bytes, int64_t cols, int u, int p,
                               float *out);

/* For tests: y (T, n_rows) = x (T, n_cols) W^T with forward()'s kernels: the first n_lone
 * token rows through the GEMV (as a pass's decode tokens; launches of 8 tokens or more through
 * the staged GEMV, whatever the matrix's size), the rest through the tiles (prompt tokens); W in
 * GGUF blocks on the host. */
enum kvs_status cuda_test_matmul(int type, const void *W, size_t row_bytes, int64_t n_rows,
                                 int64_t n_cols, const float *x, int T, int n_lone, float *y);

#ifdef __cplusplus
}
#endif
#endif
