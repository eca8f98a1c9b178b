/* kv_policy.h — what a KV policy is, and the planner that turns scores into plans.
 *
 * A policy is three orthogonal parts (DESIGN.md §2): a scorer (how important each entry is), an
 * allocator (how the budget splits across layers and heads) and an action (what happens to
 * entries that lose; eviction here). The scorers are a small vtable (struct kv_scorer_i) so a
 * new method is one file; the allocator and the top-k selection are shared.
 *
 * A policy never writes storage: kv_policy_plan_layer() reads a sequence's layer (entries,
 * statistics, saved queries) and fills a struct kv_plan; the store applies it
 * (kv_seq_apply_plan). The engine decides when to call it (after a prefill chunk, at the end of
 * prefill, every `every` decode steps) from the spec's `when`.
 *
 * Who calls whom (one direction): kv_policy.c (planner) -> the scorers (one file each) and
 * merge.c (actions) -> kv_score.c (recomputed attention) -> kv_cache/kv_attn/ops. Nothing below
 * the planner calls back into kv_policy.c.
 */
#ifndef KVS_KV_POLICY_H
#define KVS_KV_POLICY_H

#include "kv_cache.h"
#include "kv_spec.h"

#define KV_POLICY_API_VERSION 1

/* statistics a scorer needs (the attention kernel and forward() produce them) */
enum { KV_NEED_ACC = 1,     /* accumulated attention probabilities per entry (H2O) */
       KV_NEED_QUERIES = 2, /* the post-RoPE queries of the last `qwin` tokens (TOVA, SnapKV) */
       KV_NEED_LAYERWISE = 4, /* one score shared by all KV heads of a layer (TOVA) */
       KV_NEED_LEARNED = 8, /* a learned score per entry, written by forward() into the
                             * statistic slot when the entry is made (Locret) */
       KV_PAR_HEADS = 16 /* not a statistic: score() may run for different KV heads at once
                          * (it reads the sequence and writes only out and the args' scratch) */ };

/* the statistic slot per entry: accumulated attention or a learned score */
#define KV_NEED_SLOT (KV_NEED_ACC | KV_NEED_LEARNED)

struct kv_policy;

/* Scoring context handed to a scorer for one (sequence, layer). */
struct kv_score_args {
    const struct kv_policy *p;
    const struct kv_seq *s;
    int il;
    int64_t n_seen;          /* tokens the sequence has seen */
    float *scratch;          /* (n_head/n_head_kv + 1, max entries) floats for recomputed rows */
    float *ascratch;         /* kv_attn scratch for the query rows of one KV head */
};

struct kv_scorer_i {
    int api_version;
    enum kv_method method;
    unsigned needs;          /* KV_NEED_* */
    /* Score every entry of KV head ih (higher = more important), writing n floats to out.
     * +INFINITY marks an entry that must be kept. */
    void (*score)(const struct kv_score_args *a, int ih, float *out);
    /* Entries at the end of a head that are always kept (recent window), given its budget. */
    int32_t (*protect)(const struct kv_policy *p, int32_t budget);
    /* Optional: the same scores as score() from the entries' positions alone (n of them, of KV
     * head ih of layer il), for a store that is not a kv_seq (the GPU's); NULL when the scorer
     * reads more than positions. */
    void (*score_pos)(const struct kv_policy *p, int il, int ih, const int32_t *pos, int32_t n, float *out);
};

struct kv_learned;

struct kv_policy {
    struct kv_spec spec;
    const struct kv_learned *learned; /* locret: the context's weights (forward() runs them) */
    const struct kv_scorer_i *scorer;
    int n_layer, n_head, n_head_kv, head_dim;
    uint64_t entry_bytes;
    int32_t cap_max;         /* most entries a head can hold (n_ctx + one chunk) */
    float *score;            /* (n_head_kv, cap_max) planning scratch */
    float *scratch;          /* (g + 1, cap_max) */
    int32_t *order;          /* (n_head_kv * cap_max) */
    int32_t *keep;           /* (n_head_kv, cap_max) */
    struct ent *pool;        /* (n_head_kv * cap_max) AdaKV candidates */
    int32_t planned;         /* the budget of the last plan_layer call */
    int32_t qwin;            /* saved queries a scorer reads (kv_policy_qwin of the spec) */
    uint64_t n_plans;        /* plans kv_policy_plan_layer returned (layers planned) */
    bool plan_always;        /* tests: plan even when no head is over budget (the plan then keeps
                              * everything, and applying it must change nothing) */
    struct kv_pack_cfg pack; /* the spec's storage (prices KIVI entries in mem= budgets) */
    float *ascratch;         /* kv_attn scratch for g query rows */
    /* optional (kv_policy_set_threads): scorers flagged KV_PAR_HEADS score the KV heads of a
     * layer on these workers, each with its own copy of scratch and ascratch (n_par copies) */
    struct threadpool *tp;
    int n_par;
    /* merge plans: (n_head_kv, cap_max) targets, coefficients; demotions (MiKV) */
    int32_t *mt;
    float *mc;
    uint8_t *dem;
};

/* The spec must have been parsed; method full gives NULL policy (and KVS_OK). */
enum kvs_status kv_policy_new(const struct kv_spec *spec, int n_layer, int n_head, int n_head_kv,
                              int head_dim, int32_t cap_max, uint64_t entry_bytes,
                              struct kv_policy **out);
void kv_policy_free(struct kv_policy *p);
/* Let the planner score KV heads on tp's workers (the caller's pool; plan_layer must then be
 * called from outside its workers, as forward() does). Same scores, bit for bit. */
struct threadpool;
enum kvs_status kv_policy_set_threads(struct kv_policy *p, struct threadpool *tp);
unsigned kv_policy_needs(const struct kv_spec *spec);
int kv_policy_qwin(const struct kv_spec *spec);

/* Budget (entries) of KV head ih of layer il for a sequence that has seen n_seen tokens, before
 * head-adaptive reallocation. */
int32_t kv_policy_budget(const struct kv_policy *p, int il, int64_t n_seen);

/* Policies whose scores can come from elsewhere (the GPU backend, whose store is not a kv_seq),
 * and where from: a uniform or pyramid budget, without merging or packed storage, and a scorer
 * whose input the GPU has:
 *   KV_SRC_WINDOW  SnapKV: the window queries' attention summed per entry (averaged, or the max,
 *                  over the group's query heads), then pooled (kv_snapkv_pool);
 *   KV_SRC_LAST    TOVA: the newest query's attention, the same sum over one query; layer-wise
 *                  (kv_policy_plan_scored sums the KV heads' rows);
 *   KV_SRC_ACC     H2O: the attention each entry has accumulated (the store's acc);
 *   KV_SRC_POS     StreamingLLM, random: from positions alone (kv_policy_score_pos);
 *   KV_SRC_KNORM   key norm: minus the L2 norm of each stored key.
 * For them the engine may plan a layer from scores it wrote into p->score (row ih at
 * ih * cap_max): kv_policy_over() says whether a layer whose heads hold n entries needs a plan
 * (n over budget + slack), kv_policy_plan_scored() makes it as kv_policy_plan_layer() would
 * from those scores (n[ih] entries per head at positions pos[ih]; entries below pin always
 * stay). */
enum kv_score_src { KV_SRC_NONE, KV_SRC_WINDOW, KV_SRC_LAST, KV_SRC_ACC, KV_SRC_POS, KV_SRC_KNORM };
enum kv_score_src kv_policy_score_src(const struct kv_spec *sp);
bool kv_policy_scored_elsewhere(const struct kv_spec *sp); /* kv_policy_score_src() != KV_SRC_NONE */
bool kv_policy_over(const struct kv_policy *p, int il, int64_t n_seen, int32_t slack, int32_t n);
bool kv_policy_plan_scored(struct kv_policy *p, int il, int64_t n_seen, int32_t slack, const int32_t *n,
                           const int32_t *const *pos, int32_t pin, struct kv_plan *plan);
/* KV_SRC_POS: head ih of layer il's scores from its entries' positions, into out (n floats). */
void kv_policy_score_pos(const struct kv_policy *p, int il, int ih, const int32_t *pos, int32_t n, float *out);
/* SnapKV's pooling of a row of n window scores in place (tmp: n floats). */
void kv_snapkv_pool(const struct kv_policy *p, float *row, int32_t n, float *tmp);

/* Plan layer il of sequence s down to its budget. slack: entries a head may exceed its budget by
 * before anything is planned (0 after a prefill chunk, spec.every during decode). Returns false
 * when nothing needs to change (plan untouched), unless plan_always; counts plans in n_plans. */
bool kv_policy_plan_layer(struct kv_policy *p, struct kv_seq *s, int il, int64_t n_seen,
                          int32_t slack, bool decode, struct kv_plan *plan);
/* After an apply: every head within its budget (AdaKV: the layer within the sum; MiKV: its fp16
 * entries; D2O's skipped layers are unbounded). */
bool kv_policy_check_budget(const struct kv_policy *p, const struct kv_seq *s, int il, int64_t n_seen);

/* Before the first pack of a layer: ThinK's kept channels and MiKV's balancer (pack.c). */
void kv_pack_prepare(struct kv_seq *s, int il);

/* merge.c: the merge actions. Given the plan's keep lists, fold losers into kept entries
 * (d2o, ems, elastic), or plan a KVMerger head (merging sets, then eviction). */
void kv_merge_plan(struct kv_policy *p, struct kv_seq *s, int il, struct kv_plan *plan);
int32_t kv_kvmerger_head(struct kv_policy *p, const struct kv_seq *s, int il, int ih,
                         const float *score, int32_t budget, int32_t prot, int32_t *keep,
                         int32_t *mt, float *mc);
/* D2O's layer weights from attention variance: budget multiplier of layer il (mean 1). */
double kv_d2o_layer_factor(const struct kv_policy *p, const struct kv_seq *s, int il);

/* scorers, one per file under src/kv/ */
extern const struct kv_scorer_i kv_scorer_streaming, kv_scorer_h2o, kv_scorer_tova,
    kv_scorer_snapkv, kv_scorer_knorm, kv_scorer_random, kv_scorer_d2o, kv_scorer_ems,
    kv_scorer_kvmerger, kv_scorer_elastic, kv_scorer_locret, kv_scorer_agate;

/* kv_score.c, helper for scorers: attention probabilities of the saved queries of layer il against KV head
 * ih, summed over the queries and aggregated over the head's query group (mean or max per
 * spec.agg). out has n entries. `last_only` uses just the newest saved query. */
void kv_score_query_attention(const struct kv_score_args *a, int ih, bool last_only, float *out);

#endif
