/* learned.h — weights of the learned eviction scorers (Locret retaining heads, Attention-Gate),
 * read from a KVSLRN01 file, and the kernels that run them on one layer's new tokens.
 *
 * File layout (little-endian, no padding; tools/train/lrnfile.py writes it):
 *    0  char magic[8] "KVSLRN01"     8  u32 version (1)      12 u32 method (1 = locret, 2 = agate)
 *   16  u64 model fingerprint (kvs_model_fingerprint: a file is refused by another model)
 *   24  u32 n_layer, n_head, n_head_kv, head_dim       40 u32 hidden     44 u32 act (1 = SiLU)
 *   48  u32 labels (1 = question+answer attention, 2 = context-repeat attention)
 *   52  u32 prompts trained on       56 char name[64]   120 u32 reserved[2] (0)
 *  128  per layer: fc1 weight fp16 (hidden, in), fc1 bias fp16 (hidden), fc2 weight fp16
 *       (n_head_kv, hidden), in = (n_head + 2 n_head_kv) head_dim: the layer's q, k and v
 *       projections of one token (bias added, before RoPE) in the GGUF's channel order
 *  end  u64 xxh64 (seed 0) of every byte before it
 * Method 2 (Attention-Gate, tools/train/agate.py) reads the same header with hidden = the gate's
 * heads, act = 2 (sigmoid gate), labels = 3 (distillation), reserved = (gate head dim, window),
 * and per layer Wq' bq' Wk' bk' Wv' bv' (rows of width d_model = n_head * head_dim: the layer's
 * normed input) then Wg (n_head_kv, heads * gate head dim) and bg (n_head_kv), all fp16.
 * Every field is checked against the model and the file size before anything is used.
 */
#ifndef KVS_KV_LEARNED_H
#define KVS_KV_LEARNED_H

#include <stdint.h>
#include "base.h"

struct kv_learned {
    uint32_t method;      /* 1 locret, 2 agate */
    int n_layer, n_head, n_head_kv, head_dim, hidden, d_in;
    uint32_t labels, n_train;
    uint64_t fingerprint;
    char name[64];
    char path[1024];
    float *w1, *b1, *w2; /* locret, per layer: (hidden, d_in), (hidden), (n_head_kv, hidden), float32 */
    /* agate: hidden = gate heads gh of gd channels, gw = gh * gd; d_in = the model's width */
    int gd, gw, window;
    float *gqkv, *gb;    /* per layer: (3 gw, d_in) projections and (3 gw) biases */
    float *gg, *gbg;     /* per layer: (n_head_kv, gw) and (n_head_kv) */
};

/* Load and validate a file of `method` (1 locret, 2 agate). fingerprint and shapes are the
 * model's; a mismatch names both sides. */
enum kvs_status kv_learned_load(const char *path, uint32_t method, uint64_t fingerprint, int n_layer,
                                int n_head, int n_head_kv, int head_dim, struct kv_learned **out);
/* The same from bytes in memory (path names the source in messages); fuzzed by fuzz/fuzz_lrn.c. */
enum kvs_status kv_learned_parse(const char *path, const uint8_t *b, size_t n, uint32_t method,
                                 uint64_t fingerprint, int n_layer, int n_head, int n_head_kv,
                                 int head_dim, struct kv_learned **out);
void kv_learned_free(struct kv_learned *l);

/* The first *.lrn file of `method` made for this model (same fingerprint and shapes, read from
 * its header) in dir, by name order (at most the first 1024 names); writes its path to out.
 * KVS_ERR_IO when none is there. */
enum kvs_status kv_learned_find(const char *dir, uint32_t method, uint64_t fingerprint, int n_layer,
                                int n_head, int n_head_kv, int head_dim, char *out, size_t n);

/* Scores of T tokens of layer il: X is (T, d_in) with row stride ldx (q, k, v before RoPE),
 * out (T, n_head_kv); scratch holds T * hidden floats. */
void kv_learned_score(const struct kv_learned *l, int il, const float *X, int ldx, int T,
                      float *out, float *scratch);

/* Attention-Gate, layer il: the gate's q', k', v' of T rows of the layer's normed input X (T,
 * d_in; row stride ldx) into out (T, 3 gw): q' then k' then v'. */
void kv_agate_project(const struct kv_learned *l, int il, const float *X, int ldx, int T, float *out);
/* Keep scores (out: nt rows of n_head_kv floats in (0, 1)) of nt <= 8 consecutive tokens: token
 * i's q' (row i of Q, stride ldq floats) attends, per gate head h, to the first n - nt + 1 + i rows
 * of the gate's cache, K[h] and V[h] ((rows, gd) fp16 planes: the store's layout). S is scratch of
 * nt * n floats, O of 2 * nt * gw. A token's score does not depend on its block's other tokens. */
void kv_agate_score(const struct kv_learned *l, int il, const float *Q, int ldq, int nt,
                    const uint16_t *const *K, const uint16_t *const *V, int n, float *out, float *S,
                    float *O);

#endif
