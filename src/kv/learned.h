/* learned.h — weights of the learned eviction scorers (Locret retaining heads), read from a
 * KVSLRN01 file, and the kernel that runs them on one layer's new tokens.
 *
 * File layout (little-endian, no padding; tools/train/lrnfile.py writes it):
 *    0  char magic[8] "KVSLRN01"     8  u32 version (1)      12 u32 method (1 = locret)
 *   16  u64 model fingerprint (kvs_model_fingerprint: a file is refused by another model)
 *   24  u32 n_layer, n_head, n_head_kv, head_dim       40 u32 hidden     44 u32 act (1 = SiLU)
 *   48  u32 labels (1 = question+answer attention, 2 = context-repeat attention)
 *   52  u32 prompts trained on       56 char name[64]   120 u32 reserved[2] (0)
 *  128  per layer: fc1 weight fp16 (hidden, in), fc1 bias fp16 (hidden), fc2 weight fp16
 *       (n_head_kv, hidden), in = (n_head + 2 n_head_kv) head_dim: the layer's q, k and v
 *       projections of one token (bias added, before RoPE) in the GGUF's channel order
 *  end  u64 xxh64 (seed 0) of every byte before it
 * Every field is checked against the model and the file size before anything is used.
 */
#ifndef KVS_KV_LEARNED_H
#define KVS_KV_LEARNED_H

#include <stdint.h>
#include "base.h"

struct kv_learned {
    int n_layer, n_head, n_head_kv, head_dim, hidden, d_in;
    uint32_t labels, n_train;
    uint64_t fingerprint;
    char name[64];
    char path[1024];
    float *w1, *b1, *w2; /* per layer: (hidden, d_in), (hidden), (n_head_kv, hidden), float32 */
};

/* Load and validate. fingerprint and shapes are the model's; a mismatch names both sides. */
enum kvs_status kv_learned_load(const char *path, uint64_t fingerprint, int n_layer, int n_head,
                                int n_head_kv, int head_dim, struct kv_learned **out);
/* The same from bytes in memory (path names the source in messages); fuzzed by fuzz/fuzz_lrn.c. */
enum kvs_status kv_learned_parse(const char *path, const uint8_t *b, size_t n, uint64_t fingerprint,
                                 int n_layer, int n_head, int n_head_kv, int head_dim,
                                 struct kv_learned **out);
void kv_learned_free(struct kv_learned *l);

/* The first *.lrn file made for this model (same fingerprint and shapes, read from its header) in
 * dir, by name order (at most the first 1024 names); writes its path to out. KVS_ERR_IO when none
 * is there. */
enum kvs_status kv_learned_find(const char *dir, uint64_t fingerprint, int n_layer, int n_head,
                                int n_head_kv, int head_dim, char *out, size_t n);

/* Scores of T tokens of layer il: X is (T, d_in) with row stride ldx (q, k, v before RoPE),
 * out (T, n_head_kv); scratch holds T * hidden floats. */
void kv_learned_score(const struct kv_learned *l, int il, const float *X, int ldx, int T,
                      float *out, float *scratch);

#endif
