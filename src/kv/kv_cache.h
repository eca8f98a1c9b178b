/* kv_cache.h — the KV store: owns every byte of KV memory, applies plans, hands out views.
 *
 * Layout: for each sequence, layer and KV head, an ordered run of entries with contiguous
 * payloads: keys (n, head_dim) fp16 stored after RoPE at the entry's original absolute position,
 * values (n, head_dim) fp16, positions (n) int32 strictly ascending, weights (n) float (1 unless
 * merged), and the statistic slots the policy declared (accumulated attention for H2O).
 * Per (sequence, layer) the store also keeps the post-RoPE queries of the last `qwin` tokens
 * when a policy scores by recent queries (TOVA, SnapKV): attention rows are then recomputed for
 * those queries alone at plan time instead of being materialised during attention.
 *
 * Memory: capacity grows and shrinks in steps of KV_CAP_STEP entries; after a plan is applied
 * the store gives back what it no longer needs, so allocated bytes track held entries. Bytes are
 * accounted exactly (payload + metadata + statistics + saved queries actually allocated).
 * Only the store writes KV memory; attention reads through kv_seq_view (kv_view.h).
 * Does not: decide what to keep (kv_policy.c), compute attention.
 */
#ifndef KVS_KV_CACHE_H
#define KVS_KV_CACHE_H

#include "base.h"
#include "kv_view.h"

enum { KV_CAP_STEP = 64 };

struct kv_head_store {
    int32_t n, cap;   /* entries held (packed + hot), entries allocated for pos/w/acc */
    int32_t nc;       /* the leading nc entries are packed (see kv_view.h) */
    int32_t hcap;     /* hot rows allocated */
    uint16_t *k, *v;  /* (hcap, head_dim) fp16 each: the hot entries nc..n-1 */
    int32_t *pos;     /* (cap) absolute positions */
    float *w;         /* (cap) weights */
    float *acc;       /* (cap) accumulated attention (H2O), NULL unless the policy needs it */
    /* packed entries, in the sequence's kv_packed_fmt */
    int32_t rcap;     /* packed rows allocated (values; keys too unless BLK) */
    int32_t bcap, nblk; /* BLK key blocks allocated and used */
    int32_t *blk_n;   /* (bcap) tokens per block */
    uint8_t *ck, *cv; /* key and value payloads */
    uint16_t *cks, *ckm, *cvs, *cvm; /* scales and minima, fp16 */
    uint8_t *ch;      /* (kd) kept key channels (ThinK), NULL until the first pack */
    float *bal;       /* (2, head_dim) MiKV key transform (multiplier b, centre mu): stored keys
                         are (k - mu) * b; NULL until the first demotion */
};

/* What a sequence packs (from the spec's storage parts): kept for the sequence's life once
 * something is packed. */
struct kv_pack_cfg {
    bool on;
    bool think, kivi, mikv, balance;
    float prune;      /* think: fraction of key channels dropped */
    int think_recent; /* think without kivi: newest prompt entries left full width */
    int resid;        /* kivi: newest entries left fp16 (resid .. resid + G - 1) */
    struct kv_packed_fmt f;
};

struct kv_cache {
    int n_layer, n_head_kv, n_head, head_dim;
    bool with_acc;    /* allocate the accumulated-attention slot */
    int qwin;         /* queries kept per layer for plan-time scoring (0 = none) */
    const float *rope_inv_freq; /* (head_dim/2) for re-rotating keys (reindexing plans) */
    bool rope_neox;
    bool weighted;    /* views hand attention the entries' weights (spec wattn=1) */
    uint64_t bytes, bytes_peak; /* all sequences of this cache */
};

struct kv_seq {
    struct kv_cache *owner;
    bool with_acc;           /* its entries carry the accumulated-attention slot (set while empty) */
    bool acc_learned;        /* the slot holds a learned score forward() writes once per entry
                              * (Locret), not attention: views hand attention no slot */
    int32_t pin;             /* entries at positions below it outrank every other in plans */
    struct kv_head_store *h; /* (n_layer, n_head_kv) */
    float *q;                /* (n_layer, qwin, n_head, head_dim) ring of recent queries */
    int32_t *q_pos;          /* (n_layer, qwin) their positions */
    int32_t *q_n;            /* (n_layer) queries held (<= qwin) */
    int32_t *q_head;         /* (n_layer) next slot of the ring */
    uint64_t rng;            /* per-sequence state for the random scorer */
    struct kv_pack_cfg pack; /* storage of older entries */
    float *pstate;           /* (n_layer, KV_PSTATE) policy state: D2O's EMA threshold, Elastic's
                                compressed-prompt length */
    /* Attention-Gate (gate_w > 0): the gate's own k', v' of every token the sequence has seen,
     * per layer (gate_n rows, never evicted) in 2 gate_gh planes of (gate_cap, gate_gd) fp16:
     * the keys of gate head h in plane h, its values in plane gate_gh + h; and the visibility
     * rule the views hand attention: an entry whose learned slot (its keep score) is below
     * gate_tau is seen only by queries fewer than gate_win positions after it */
    int gate_w, gate_gh, gate_gd;
    float gate_tau;
    int32_t gate_win;
    int32_t *gate_n, *gate_cap; /* (n_layer) */
    uint16_t **gate_kv;         /* (n_layer, 2 gate_gh) planes */
};
enum { KV_PSTATE = 4 };

void kv_cache_init(struct kv_cache *c, int n_layer, int n_head_kv, int n_head, int head_dim,
                   bool with_acc, int qwin);
uint64_t kv_cache_entry_bytes(const struct kv_cache *c); /* bytes per entry per head */
/* bytes of one entry of one head without statistic slots: fp16 key and value, position, weight */
uint64_t kv_entry_payload_bytes(int head_dim);

enum kvs_status kv_seq_new(struct kv_cache *c, struct kv_seq **out);
/* Whether s's entries carry the accumulated-attention slot; only while s holds no capacity
 * (false otherwise). kv_seq_new starts from the cache's with_acc. */
bool kv_seq_set_acc(struct kv_seq *s, bool on);
void kv_seq_free(struct kv_seq *s);
/* Free the accumulated-attention slot of every entry (s keeps its entries); s no longer keeps it. */
void kv_seq_drop_acc(struct kv_seq *s);
void kv_seq_clear(struct kv_seq *s); /* drop every entry and free its memory */

static inline struct kv_head_store *kv_seq_head(const struct kv_seq *s, int il, int ih) {
    return &s->h[il * s->owner->n_head_kv + ih];
}

/* Make room for n_new more entries in every head of layer il (the only growth path; whole
 * KV_CAP_STEP steps, so at most once per step of tokens). */
enum kvs_status kv_seq_reserve(struct kv_seq *s, int il, int n_new);
/* Give back capacity beyond the entries held (rounded up to a step). */
void kv_seq_fit(struct kv_seq *s, int il);

/* Append one token's keys and values for all KV heads of layer il: k, v are (n_head_kv,
 * head_dim) float; converted to fp16. Capacity must have been reserved. */
void kv_seq_append(struct kv_seq *s, int il, int32_t pos, const float *k, const float *v);

/* Write the learned score of the entry just appended to every KV head of layer il (score has
 * n_head_kv floats); only for a sequence whose slot holds learned scores (acc_learned). */
void kv_seq_set_learned_last(struct kv_seq *s, int il, const float *score);

/* Attention-Gate: give s a gate cache of gh heads of gd channels (gh 0: none) and its visibility
 * rule; only while s holds nothing (false otherwise, unless the shape is unchanged). */
bool kv_seq_set_gate(struct kv_seq *s, int gh, int gd, float tau, int32_t win);
/* The planes of layer il (2 gate_gh pointers: keys of each head, then values). */
static inline uint16_t *const *kv_seq_gate_planes(const struct kv_seq *s, int il) {
    return s->gate_kv + (size_t)il * 2 * (size_t)s->gate_gh;
}
/* Append one token's gate k' then v' (2 gate_w floats, head after head; stored fp16) to layer il. */
enum kvs_status kv_seq_gate_append(struct kv_seq *s, int il, const float *kv);
/* Bytes of the gate caches (included in kv_seq_bytes). */
uint64_t kv_seq_gate_bytes(const struct kv_seq *s);

/* Remember the query of a token for plan-time scoring: q is (n_head, head_dim). */
void kv_seq_save_query(struct kv_seq *s, int il, int32_t pos, const float *q);

/* Make dst (emptied first) a copy of src: entries, statistics and saved queries. The two may
 * belong to stores with different statistic slots: accumulated attention dst has but src lacks
 * starts at 0, and dst keeps the newest min(src, dst) saved queries of each layer. */
enum kvs_status kv_seq_copy(struct kv_seq *dst, const struct kv_seq *src);

/* The saved queries of src (newest min(src, dst window) per layer) replace dst's. */
void kv_seq_copy_queries(struct kv_seq *dst, const struct kv_seq *src);
/* Free s's ring of saved queries (a shared prefix node never attends again). */
void kv_seq_drop_queries(struct kv_seq *s);
/* Append to dst, after its entries, src's entries of layer il (every KV head) with positions >=
 * from: fp16 rows, positions and weights (accumulated attention starts at 0), moved by delta
 * positions (keys re-rotated by delta: a chunk reused elsewhere). Packed entries of src are
 * dequantised, turned in float and rounded to fp16 hot rows (dst's own storage part packs them
 * again later: dequantise, rotate, requantise). Fails when they would not ascend after dst's
 * (KVS_ERR_INVALID_ARG); KVS_ERR_NOMEM. */
enum kvs_status kv_seq_append_range(struct kv_seq *dst, const struct kv_seq *src, int il, int32_t from,
                                    int32_t delta);
/* One head's entries as bytes (chunk records): u32 n, nc, nblk, flags (1 kept channels, 2 key
 * transform); i32 pos[n]; f32 w[n]; fp16 hot keys and values ((n - nc) x head_dim each); then
 * the packed arrays in the sequence's kv_packed_fmt (BLK block sizes, key codes, key scales and
 * minima, value codes, value scales and minima), the kept channels and the key transform.
 * kv_head_wire_read fills an empty head of s (whose storage part, kv_seq_set_pack, must be the
 * writer's) after checking every count against avail, positions ascending in [lo, hi), weights
 * positive, halves finite, blocks, channels and transform: KVS_ERR_FORMAT; KVS_ERR_NOMEM. */
size_t kv_head_wire_bytes(const struct kv_seq *s, int il, int ih);
void kv_head_wire_write(const struct kv_seq *s, int il, int ih, uint8_t *w);
enum kvs_status kv_head_wire_read(struct kv_seq *s, int il, int ih, const uint8_t *r, size_t avail,
                                  int32_t lo, int32_t hi, size_t *used);
/* Replace the key and value of the hot entry at position pos in each KV head of layer il that
 * holds one (a recomputed token; a head that evicted it is left alone); returns how many. */
int kv_seq_overwrite(struct kv_seq *s, int il, int32_t pos, const float *k, const float *v);
/* Sum over the KV heads of layer il holding a hot entry at pos of |v - stored value|^2, v being
 * (n_head_kv, head_dim) floats rounded to fp16: CacheBlend's deviation of a recomputed token. */
double kv_seq_value_dev(const struct kv_seq *s, int il, int32_t pos, const float *v);
/* Some head of some layer holds position pos packed (a recompute could not replace it). */
bool kv_seq_packed_at(const struct kv_seq *s, int32_t pos);

/* A plan for one layer, per KV head: the ascending indices of the entries to keep; optionally
 * merges (mt[j] = the kept index entry j folds into, -1 = evicted; mc[j] its coefficient, and
 * mc[c] the kept target's own: key_c <- mc[c] key_c + sum mc[e] key_e, values alike, weights add,
 * accumulated attention adds; renorm keeps the target key's norm, EMS) and demotions (dem[j] for
 * kept hot entries that move to the packed run, MiKV). NULL arrays = none. */
struct kv_plan {
    int32_t *keep[KV_VIEW_MAX_HEADS];
    int32_t n_keep[KV_VIEW_MAX_HEADS];
    int32_t *mt[KV_VIEW_MAX_HEADS];
    float *mc[KV_VIEW_MAX_HEADS];
    uint8_t *dem[KV_VIEW_MAX_HEADS];
    bool renorm;
};
/* Apply: fold merges, compact every head to its kept entries (payloads, positions, weights,
 * statistics move together), move demoted entries to the packed run, then give back freed
 * capacity. Checks the plan (indices ascending and in range). A merge into a packed entry makes
 * it hot again (its blend is held in fp16). reindex: the entries' RoPE positions are their slots
 * (streaming pos=cache): a key moving from slot j to slot i is re-rotated by i - j. */
void kv_seq_apply_plan(struct kv_seq *s, int il, const struct kv_plan *plan, bool reindex);

/* Set what the sequence packs. Fails when it already holds packed entries of another format. */
enum kvs_status kv_seq_set_pack(struct kv_seq *s, const struct kv_pack_cfg *cfg);
/* Pack layer il as its configuration says: KIVI moves the oldest hot entries into blocks of G
 * while more than resid + G - 1 are hot; ThinK alone (prompt only: `prompt`) packs all but the
 * newest think_recent. ThinK channels (kv_seq_set_channels) must be set first. */
enum kvs_status kv_seq_pack_layer(struct kv_seq *s, int il, bool prompt);
/* Which key channels head ih of layer il keeps when packed (kd ascending), and MiKV's balancer. */
void kv_seq_set_channels(struct kv_seq *s, int il, int ih, const uint8_t *ch);
void kv_seq_set_balance(struct kv_seq *s, int il, int ih, const float *bal, const float *mu);
/* Entry j of head ih as full-width floats (packed ones dequantized; pruned channels 0). */
void kv_seq_key(const struct kv_seq *s, int il, int ih, int32_t j, float *out);
void kv_seq_value(const struct kv_seq *s, int il, int ih, int32_t j, float *out);
/* Fill a pack configuration from a spec's storage parts (think, kivi, mikv). */
struct kv_spec;
void kv_pack_cfg_from_spec(const struct kv_spec *sp, int head_dim, struct kv_pack_cfg *out);
/* Bytes one packed entry of one head costs in this configuration (BLK metadata spread over G). */
double kv_pack_entry_bytes(const struct kv_pack_cfg *cfg, int head_dim);

/* The view of layer il that attention reads. */
void kv_seq_view(const struct kv_seq *s, int il, struct kv_view *out);

uint64_t kv_seq_bytes(const struct kv_seq *s);
/* allocated payload: hot rows, packed payloads and metadata, positions and weights; no
 * statistic slots, no saved queries */
uint64_t kv_seq_payload_bytes(const struct kv_seq *s);
int32_t kv_seq_max_entries(const struct kv_seq *s); /* largest head */

/* Invariant check: positions strictly ascending, counts within capacity, capacity in whole steps.
 * Returns false and sets the last error on the first violation. (kv_seq_apply_plan asserts the
 * plan itself on every apply; tests compare byte accounting with kv_seq_bytes.) */
bool kv_seq_check(const struct kv_seq *s);

#endif
