/* engine.h — internal definitions of kvs_context and kvs_sequence shared by engine.c (API,
 * sequences, chunking) and forward.c (the transformer). Not part of the public API. */
#ifndef KVS_ENGINE_H
#define KVS_ENGINE_H

#include "base.h"
#include "model.h"
#include "threadpool.h"
#include "kv/kv_cache.h"
#include "kv/kv_policy.h"
#include "kv/kv_attn.h"
#include "cuda/cuda.h"

/* A KV policy as sequences run it: the context's own (kvs_context.base) or one a sequence was
 * given by kvs_seq_set_kv. Sequences with the same spec share one profile (its policy's planning
 * scratch is used by one plan at a time: compression runs on the inference thread). */
struct kv_profile {
    struct kv_spec spec;
    struct kv_pack_cfg pack; /* storage of older entries, from the spec */
    struct kv_policy *policy;  /* NULL for `full` */
    int max_past;              /* most tokens a sequence may consume: n_ctx, or unbounded
                                * (KVS_PAST_MAX) when the policy bounds the cache */
    int32_t held;              /* bounded policies: most entries a head holds (else 0) */
    int refs;                  /* sequences running it (not counted for the context's own) */
};
enum { KVS_MAX_PROFILES = 64 };

/* One unit of attention work (forward.c builds the list per batch). */
enum { AU_ACC /* (view a, KV head h): all its tokens, probabilities into acc */,
       AU_BLOCK /* (tokens a .. a+b-1 of one sequence, head h) */,
       AU_SPLIT /* (token a, head h, key split b) */ };
struct att_unit_desc { int8_t kind; int16_t h; int32_t a, b; };

/* Attention recording (kvs_seq_record_attention): per KV head, per query position from `from`,
 * the attention share of each range of key positions split at bounds. */
struct att_rec {
    int32_t from, cap;       /* first recorded position; positions allocated */
    int n_bounds;
    int32_t bounds[16];
    float *mass;             /* (n_head_kv, cap, n_bounds + 1) */
};

struct kvs_sequence {
    int slot;        /* index in ctx->seqs (and the GPU context's cache slot) */
    struct cuda_ctx *gpu; /* the context's GPU side, NULL on the CPU */
    struct kv_profile *prof; /* the policy it runs */
    struct kvs_prefix *prefix; /* the shared chain it started from (NULL = none) */
    int32_t n_prefix;          /* tokens of that chain */
    int32_t nsh_max;           /* most entries of one head the chain holds */
    struct kvs_prefix **chain; /* (n_chain) its nodes, root first */
    int n_chain;
    const struct kv_view_head **segs; /* (n_head_kv, n_chain) view segments, rebuilt per layer */
    struct att_rec *rec;       /* attention recording, NULL when off */
    int32_t n_past;  /* next absolute position */
    struct kv_seq *kv;
    int32_t pos_shift; /* entries evicted under in-cache positions (streaming pos=cache): RoPE
                        * rotates token p at p - pos_shift, so survivors sit at 0..n-1 */
};

enum { N_ACT_SLOTS = 4 }; /* activation encodings: F32, Q8_0, Q8_1, Q8_K */

struct kvs_context {
    kvs_model *m;
    struct cuda_ctx *gpu;      /* --device cuda: weights, K/V caches and the forward pass on the
                                * GPU (the CPU store's sequences then stay empty); NULL on the CPU */
    struct kvs_context_params p;
    int n_ctx, n_batch, t_max; /* t_max: most tokens one forward() takes; n_ctx: most entries
                                * a head holds at once (the attention rows' stride) */
    struct threadpool *tp;
    struct kv_cache kv;
    struct kv_profile base;    /* the context's policy (kv_spec) */
    struct kv_profile *prof[KVS_MAX_PROFILES]; /* policies given to sequences, NULL where free */
    struct kv_plan plan;       /* filled by the policy, applied by the store */
    double plan_s;             /* time spent planning and applying plans (kvs_context_plan_stats) */
    uint64_t plan_layers;      /* (sequence, layer) plans made */
    kvs_sequence **seqs;       /* (n_seq_max), NULL where free */

    /* scratch, allocated once at context creation; shapes for t_max tokens */
    float *x;        /* (t_max, n_embd) residual stream */
    float *xn;       /* (t_max, max(n_embd, n_head*hd)) normed input / attention output */
    float *q;        /* (t_max, n_head*hd) */
    float *k, *v;    /* (t_max, n_head_kv*hd) */
    float *gate, *up;/* (t_max, n_ff) */
    float *rope_cs;  /* (t_max, hd) cos/sin pairs per token */
    float *inv_freq; /* (hd/2) */
    uint8_t *act[N_ACT_SLOTS]; /* (t_max, row bytes) quantized activations per encoding */
    float *att_s;    /* (n_threads, ATT_TB * group, n_ctx) scores per thread */
    float *att_x;    /* (n_threads, kv_attn_scratch_floats(ATT_TB * group, hd)) */
    float *att_qo;   /* (n_threads, 2, ATT_TB * group, hd) gathered queries and outputs */
    float *att_part; /* (t_max * n_head_kv * MAX_SPLIT, group, hd + 2) partial results */
    /* kvs_seq_chunk_deviation: forward() of recompute tokens adds each token's value deviation
     * at layer probe_layer to probe_dev[t] and stops after that layer (NULL = off) */
    float *probe_dev;
    int probe_layer;
    struct att_unit_desc *att_units; /* (t_max * n_head_kv * MAX_SPLIT) attention work units */
    float *wrow;     /* act_f32 only: (n_threads, wrow_n) one dequantized weight row per thread */
    size_t wrow_n;   /* floats per thread in wrow: the widest matmul input */
    size_t scratch_bytes;
    struct kv_learned *learned; /* locret weights (one file per context), NULL until a spec asks */
    float *lrn_x, *lrn_h, *lrn_s; /* (t_max, d_in), (t_max, hidden), (t_max, n_head_kv) */
    struct kv_learned *agate;   /* Attention-Gate weights (one file per context), NULL until asked */
    float *ag_qkv, *ag_s;       /* (t_max, 3 gw) the gate's q', k', v'; (t_max, n_head_kv) scores */
    float *ag_sc;               /* (n_threads, ag_sc_n) the gate's attention rows of 8 tokens */
    size_t ag_sc_n;
    int32_t ag_cap;             /* most tokens a gated sequence can have seen (n_ctx + t_max + step) */
    float *step_logits;  /* kvs_step: logits rows before they are copied to the items */
    size_t step_logits_n;
};

enum { ATT_TB = 4 /* query tokens sharing one pass over the keys */, ATT_MAX_SPLIT = 16, KVS_T_MAX = 4096 /* most tokens in one forward() */ };

/* Why forward() runs a sequence's tokens, which decides whether its policy compresses after
 * each layer (FWD_HOLD: a prompt chunk left exact, never compressed after). */
enum fwd_phase { FWD_PREFILL, FWD_PREFILL_LAST, FWD_DECODE, FWD_HOLD,
                 FWD_RECOMPUTE /* tokens whose entries exist (a reused chunk): replaced in place */ };

/* Run the transformer on T tokens. tokens[i] at absolute position pos[i] of sequence seq[i];
 * their K/V are appended to the sequence caches. For each of the n_out rows listed in out_rows
 * (indices into 0..T-1), logits (n_vocab floats) are written to logits + r * n_vocab.
 * Positions of one sequence must be consecutive and start at its n_past. */
/* Bytes of one entry of one head as a store made for this spec holds it (what a mem= budget
 * counts), whatever statistics the context keeps beyond the spec's (keep_stats). */
static inline uint64_t kv_spec_entry_bytes(const struct hparams *hp, const struct kv_spec *spec) {
    /* an fp16 entry; kv_policy_budget prices KIVI's packed entries itself */
    return kv_entry_payload_bytes(hp->head_dim) +
           ((kv_policy_needs(spec) & KV_NEED_SLOT) ? sizeof(float) : 0);
}

/* KVS_OK on the CPU; on a GPU context, KVS_ERR_UNSUPPORTED naming `what` (an operation that
 * reads or writes the CPU store, which a GPU context does not fill). */
static inline enum kvs_status kvs_gpu_refuse(const struct kvs_context *c, const char *what) {
    if (!c->gpu) return KVS_OK;
    return kvs_fail(KVS_ERR_UNSUPPORTED, "%s is not available with --device cuda yet (the GPU "
                    "backend runs the forward pass and the KV policies scored there; the CPU runs every "
                    "operation)", what);
}

/* --device cuda (forward.c): plan the layers of GPU sequence s over budget + slack under policy
 * p (spec sp; kv_policy_scored_elsewhere) as a sequence that has seen n_seen tokens, scoring on
 * the device, and gather what is kept there (kvs_seq_compress: slack 0, s->n_past). */
enum kvs_status kvs_gpu_plan(struct kvs_context *c, kvs_sequence *s, struct kv_policy *p, const struct kv_spec *sp,
                             int32_t slack, int64_t n_seen);
/* The bytes of s's entries (on the CPU kvs_seq_kv_bytes, which counts the store's capacity; on
 * the GPU its entries at the CPU store's price per entry, not the capacity or statistics the
 * device allocates), for comparing methods across devices; and a context's high-water mark of KV
 * bytes, reset to what it holds now. */
uint64_t kvs_seq_payload_bytes(const kvs_sequence *s);
void kvs_context_kv_peak_reset(struct kvs_context *c);
/* The saved queries a GPU plan under sp reads (the newest of them): its scorer's window, TOVA's
 * newest alone (forward.c); and those a GPU slot under sp keeps (engine.c). */
int kvs_gpu_spec_qwin(const struct kv_spec *sp);
int kvs_gpu_slot_qwin(const struct kvs_context *c, const struct kv_spec *sp);
/* What --device cuda runs (kvs_kv_runs_on), in words for messages. */
#define GPU_POLICIES                                                                                       \
    "full, snapkv, h2o, tova, streaming, knorm and random (uniform or pyramid budgets, without merging or " \
    "packed storage)"

/* Release the shared prefix s started from (if any): s then holds only its own entries. */
void kvs_seq_drop_prefix(kvs_sequence *s);
/* Point view v (layer il of s, from kv_seq_view) at the shared segments of s's chain (prefix.c). */
void prefix_view(const kvs_sequence *s, int il, struct kv_view *v);

enum kvs_status forward(struct kvs_context *c, const int32_t *tokens, const int32_t *pos,
                        kvs_sequence *const *seq, int T, const int *out_rows, int n_out,
                        float *logits, const uint8_t *phase /* enum fwd_phase per token */);

#endif
