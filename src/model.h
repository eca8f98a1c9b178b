/* model.h — a loaded model: hyperparameters, weight slots borrowed from the GGUF mapping, the
 * tokenizer, and the per-architecture table that filled them.
 *
 * Does: map GGUF metadata keys and tensor names to hparams and weight slots through one small
 * table per architecture (llama, qwen2), check every tensor's shape and type, build the
 * tokenizer. Does not: hold run state (that is the context's) or compute anything.
 */
#ifndef KVS_MODEL_H
#define KVS_MODEL_H

#include "base.h"
#include "gguf.h"
#include "tokenizer.h"

enum rope_style {
    ROPE_NORM, /* rotate adjacent pairs (2i, 2i+1): llama GGUFs (converter permutes Q/K) */
    ROPE_NEOX, /* rotate pairs (i, i + d/2): qwen2 */
};

struct arch_desc {
    const char *name;        /* general.architecture */
    enum rope_style rope;
    bool qkv_bias;           /* attn_{q,k,v}.bias tensors required */
    const char *chat_flavor; /* default system prompt flavour for chat_format */
};

/* A weight matrix: rows of `n_cols` elements in GGUF block format. y = W x has n_rows outputs. */
struct weight {
    const void *data;
    int type;          /* ggml type id */
    int64_t n_rows, n_cols;
    size_t row_bytes;
    void *packed;      /* quant_pack copy for batched products (kvs_model_params.pack), or NULL */
};

struct layer_weights {
    const float *attn_norm;               /* (n_embd) */
    struct weight wq, wk, wv, wo;         /* (n_head*hd, n_embd), (n_kv*hd, n_embd) x2, (n_embd, n_head*hd) */
    const float *bq, *bk, *bv;            /* biases (qwen2) or NULL */
    const float *ffn_norm;                /* (n_embd) */
    struct weight w_gate, w_up, w_down;   /* (n_ff, n_embd) x2, (n_embd, n_ff) */
};

struct hparams {
    int n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab, n_ctx_train, n_rot;
    float rope_theta, norm_eps;
};

struct kvs_model {
    struct gguf_file *gguf;
    const struct arch_desc *arch;
    struct hparams hp;
    struct weight tok_embd;    /* (n_vocab, n_embd) */
    const float *output_norm;  /* (n_embd) */
    struct weight output;      /* (n_vocab, n_embd); == tok_embd when tied */
    bool tied_output;
    struct layer_weights *layers;
    struct tokenizer *tok;
    int32_t bos_id, eos_id, eot_id, im_end_id;
    bool add_bos;
    char name[128];
    char file_type[16];
    uint64_t n_params, weight_bytes;
    uint64_t packed_bytes; /* the weights' quant_pack copies (kvs_model_params.pack) */
};

#endif
