/* kv_cache.h — the KV store: owns every byte of KV memory, hands out read-only views.
 *
 * Layout: for each sequence, layer and KV head, an ordered run of entries with contiguous
 * payloads: keys (n, head_dim) fp16 stored after RoPE at the entry's original absolute position,
 * values (n, head_dim) fp16, positions (n) int32 ascending, weights (n) float (1 unless merged).
 * Capacity grows in steps of KV_CAP_STEP tokens, so allocated bytes track what is held (a store
 * never grows per token). Bytes are accounted exactly: payload + metadata actually allocated.
 * Attention reads only through kv_cache_view (kv_view.h); only the store writes.
 * Does not: decide what to keep (policies, issue 3), compute attention.
 */
#ifndef KVS_KV_CACHE_H
#define KVS_KV_CACHE_H

#include "base.h"
#include "kv_view.h"

enum { KV_CAP_STEP = 256 };

struct kv_head_store {
    int32_t n, cap;   /* entries held, entries allocated */
    uint16_t *k, *v;  /* (cap, head_dim) fp16 each */
    int32_t *pos;     /* (cap) absolute positions */
    float *w;         /* (cap) weights */
};

struct kv_seq {
    int n_layer, n_head_kv, head_dim;
    struct kv_head_store *h; /* (n_layer, n_head_kv) */
    struct kv_cache *owner;
};

struct kv_cache {
    int n_layer, n_head_kv, head_dim;
    uint64_t bytes, bytes_peak; /* all sequences of this cache */
};

void kv_cache_init(struct kv_cache *c, int n_layer, int n_head_kv, int head_dim);
uint64_t kv_cache_entry_bytes(const struct kv_cache *c); /* bytes per entry per head */

enum kvs_status kv_seq_new(struct kv_cache *c, struct kv_seq **out);
void kv_seq_free(struct kv_seq *s);
void kv_seq_clear(struct kv_seq *s); /* drop every entry and free its memory */

/* Make room for n_new more entries in every head of layer il (grows capacity by whole steps;
 * this is the only allocation of the store and happens at most once per KV_CAP_STEP tokens). */
enum kvs_status kv_seq_reserve(struct kv_seq *s, int il, int n_new);

/* Append one token's keys and values for all KV heads of layer il: k, v are (n_head_kv,
 * head_dim) float; converted to fp16. Capacity must have been reserved. */
void kv_seq_append(struct kv_seq *s, int il, int32_t pos, const float *k, const float *v);

/* The view of layer il that attention reads. */
void kv_seq_view(const struct kv_seq *s, int il, struct kv_view *out);

uint64_t kv_seq_bytes(const struct kv_seq *s);

/* Debug invariant check: positions strictly ascending, counts within capacity. Returns false and
 * sets the last error on the first violation. */
bool kv_seq_check(const struct kv_seq *s);

#endif
