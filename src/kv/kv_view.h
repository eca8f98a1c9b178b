/* kv_view.h — what attention reads for one layer of one sequence: per KV head, pointers to the
 * entries' fp16 key and value rows, positions and weights, and the one statistic slot attention
 * writes (accumulated attention probability, when a policy asked for it). Borrowed from the store; valid until
 * the store is next modified. Attention never sees the policy or the store's internals. */
#ifndef KVS_KV_VIEW_H
#define KVS_KV_VIEW_H

#include <stdint.h>

enum { KV_VIEW_MAX_HEADS = 64 };

struct kv_view_head {
    int32_t n;            /* entries */
    const uint16_t *k;    /* (n, head_dim) fp16, post-RoPE */
    const uint16_t *v;    /* (n, head_dim) fp16 */
    const int32_t *pos;   /* (n) absolute positions, ascending */
    const float *w;       /* (n) weights; NULL when all are 1 */
    float *acc;           /* (n) accumulated attention the kernel adds to (H2O); NULL if unused */
};

struct kv_view {
    int n_head_kv, head_dim;
    struct kv_view_head h[KV_VIEW_MAX_HEADS];
};

#endif
