/* kv_spec.h — the `--kv SPEC` string, parsed and validated into a struct kv_spec.
 *
 * Grammar (append-only once released; `kvsieve --help kv` prints kv_spec_help()):
 *   SPEC := PART ('+' PART)*
 *   PART := METHOD (':' KEY '=' VALUE (',' KEY '=' VALUE)*)?     the first part: the scorer
 *         | KEY '=' VALUE                                         a shared option, e.g. alloc=adakv
 * Every key is checked against the method's accepted keys; an error names the bad key and lists
 * the accepted ones. Does not: allocate, or know about the store.
 */
#ifndef KVS_KV_SPEC_H
#define KVS_KV_SPEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "base.h"

enum kv_method { KV_FULL, KV_STREAMING, KV_H2O, KV_TOVA, KV_SNAPKV, KV_KNORM, KV_RANDOM,
                 KV_D2O, KV_EMS, KV_KVMERGER, KV_ELASTIC, KV_LOCRET, KV_AGATE, KV_METHOD_COUNT };
/* what happens to entries that lose (the action): evicted, or folded into a kept entry */
enum kv_merge { KV_MERGE_NONE, KV_MERGE_D2O, KV_MERGE_EMS, KV_MERGE_KVMERGER, KV_MERGE_ELASTIC };
enum kv_alloc { KV_ALLOC_UNIFORM, KV_ALLOC_PYRAMID, KV_ALLOC_ADAKV, KV_ALLOC_D2O };
enum kv_pool { KV_POOL_MAX, KV_POOL_AVG, KV_POOL_NONE };
enum kv_agg { KV_AGG_MEAN, KV_AGG_MAX };

/* when compression runs (bit set) */
enum { KV_WHEN_CHUNK = 1,   /* after every prefill chunk, layer by layer (bounded memory) */
       KV_WHEN_PREFILL = 2, /* once the whole prompt has been seen (kvpress style) */
       KV_WHEN_DECODE = 4   /* every `every` decode steps */ };

struct kv_spec {
    enum kv_method method;
    /* budget: exactly one of these is set for every method but full */
    int32_t budget;      /* tokens per KV head (0 = unset) */
    float ratio;         /* fraction of the tokens seen (0 = unset) */
    uint64_t mem_bytes;  /* whole-cache byte budget of one sequence (0 = unset) */
    enum kv_alloc alloc;
    float pyramid_beta;  /* pyramid: top layer gets budget/beta of the bottom's share ratio (default 20) */
    float adakv_floor;   /* adakv: fraction of a head's uniform share it always keeps (default 0.2) */
    enum kv_agg agg;     /* GQA aggregation over the query heads of a KV head */
    unsigned when;       /* KV_WHEN_* */
    int32_t every;       /* decode: compress when this many entries over budget (default 16) */
    /* method parameters */
    int32_t sinks, window;   /* streaming: first `sinks` + last `window` entries */
    bool reindex;            /* streaming pos=cache: RoPE positions are cache slots (default) */
    float recent;            /* h2o: fraction of the budget kept as the recent window (0.5) */
    int32_t obs_window;      /* snapkv: observation window (32); h2o/tova protect it too */
    int32_t kernel;          /* snapkv: pooling kernel (7) */
    enum kv_pool pool;       /* snapkv: pooling (max) */
    uint64_t seed;           /* random */
    /* merging (d2o, ems, kvmerger, elastic, or merge= with any scorer) */
    enum kv_merge merge;
    float thr;               /* similarity threshold; NAN = the method's default (d2o: EMA) */
    float d2o_alpha, d2o_beta; /* d2o: EMA of the threshold, tau <- alpha tau + beta mean(u) */
    bool skip_layers;        /* d2o: layers 0, 1 and L-1 are never compressed (paper) */
    int32_t distance;        /* elastic: decode eviction slot relative to the compressed prompt */
    char file[192];          /* locret, agate: weight file (empty = found next to the model, see learned.h) */
    float gate_tau;          /* agate: keep threshold of the gate's score (0.5) */
    bool has_opts;           /* a shared or method option was given (parser use) */
    bool wattn;              /* attention adds log(weight) to a merged entry's logit */
    /* storage of older entries (DESIGN.md §2: precisions and channel masks) */
    bool think;              /* think part given (prune=0 packs all channels: the identity case) */
    float think_prune;       /* think: fraction of key channels pruned per head */
    int32_t think_recent;    /* think: newest prompt entries kept full width (32) */
    int32_t kivi_bits;       /* kivi: 2, 4 or 8 (0 = off) */
    int32_t kivi_group;      /* kivi: tokens per key group (32) */
    int32_t kivi_resid;      /* kivi: newest entries kept fp16 (128, a multiple of group) */
    bool resid_given;        /* (parser use) resid= was given */
    int32_t mikv_low;        /* mikv: bits of demoted entries, 2, 3, 4 or 8 (0 = off) */
    bool mikv_balance;       /* mikv: outlier channel balancer (1) */
    char text[256];          /* the normalised spec, for reports */
};

/* Parse. On error returns KVS_ERR_INVALID_ARG with a message naming the offending part. */
enum kvs_status kv_spec_parse(const char *s, struct kv_spec *out);
const char *kv_method_name(enum kv_method m);
const char *kv_spec_help(void);

#endif
