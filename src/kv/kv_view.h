/* kv_view.h — what attention reads for one layer of one sequence: per KV head, the entries'
 * keys and values, positions and weights, and the one statistic slot attention writes
 * (accumulated attention probability, when a policy asked for it). Borrowed from the store; valid
 * until the store is next modified. Attention never sees the policy or the store's internals.
 *
 * A head's own n entries are in two runs, in this order: nc "packed" entries (older entries the
 * storage parts of the spec hold in fewer bytes: ThinK-pruned key channels, KIVI or MiKV codes)
 * and n - nc "hot" entries held as full-width fp16 rows, positions ascending. Packed entries are
 * packed after the layer has attended, so every later query may see all of them; hot entries
 * are causally masked by position. pos, w and acc cover all n entries in this order.
 */
#ifndef KVS_KV_VIEW_H
#define KVS_KV_VIEW_H

#include <stddef.h>
#include <stdint.h>

enum { KV_VIEW_MAX_HEADS = 64 };

/* how packed keys and values are held */
enum kv_kfmt { KV_K_F16,  /* fp16 rows of the kd kept channels (ThinK alone) */
               KV_K_BLK,  /* KIVI: blocks of up to G tokens quantized per channel, channel-major */
               KV_K_TOK   /* MiKV: per-token rows of kd codes, one (scale, min) per row */ };
enum kv_vfmt { KV_V_F16, KV_V_TOK };

struct kv_packed_fmt {
    int kfmt, vfmt;
    int kbits, vbits;  /* code bits of keys (BLK, TOK) and values (TOK) */
    int kd;            /* key channels stored (head_dim unless ThinK pruned some) */
    int G;             /* BLK: tokens per block */
    size_t kstride;    /* BLK: bytes of one channel's codes in a block; TOK: bytes of a row */
    size_t vstride;    /* TOK: bytes of a value row's codes */
    int vgs;           /* values: channels per (scale, min) group */
};

struct kv_view_head {
    /* shared prefix runs (kvs_prefix nodes), read before the sequence's own entries: nsh entries
     * in n_seg segments, root first, all visible to every query of the sequence. Attention
     * addresses entries [0, nsh) there and [nsh, nsh + n) in the own runs below; pos, w and acc
     * cover the own entries only. */
    int32_t nsh;
    int n_seg;
    const struct kv_view_head *const *seg;
    int32_t n, nc;        /* own entries; the leading nc are packed */
    const uint16_t *k;    /* (n - nc, head_dim) fp16 hot keys, post-RoPE */
    const uint16_t *v;    /* (n - nc, head_dim) fp16 hot values */
    const int32_t *pos;   /* (n) absolute positions; the hot ones ascending */
    const float *w;       /* (n) weights; NULL when attention ignores them */
    float *acc;           /* (n) accumulated attention the kernel adds to (H2O); NULL if unused */
    const float *gate;    /* (n) Attention-Gate keep scores (kv_view.gate_tau); NULL: all visible */
    /* packed entries (nc > 0) */
    const struct kv_packed_fmt *fmt;
    const uint8_t *ck;    /* keys: F16 (nc, kd) fp16; TOK (nc, kstride) codes; BLK (nblk, kd, kstride) */
    const uint16_t *cks, *ckm; /* fp16 key scale and min: TOK (nc); BLK (nblk, kd) */
    const int32_t *blk_n; /* BLK: tokens in each block */
    int32_t nblk;
    const uint8_t *cv;    /* values: F16 (nc, head_dim) fp16; TOK (nc, vstride) codes */
    const uint16_t *cvs, *cvm; /* fp16 value scale and min (TOK): (nc, head_dim / fmt->vgs) */
    const uint8_t *ch;    /* (kd) stored key channels, ascending; NULL = all */
    const float *bal;     /* (head_dim) MiKV balancer: stored keys are (k - mu) * bal; NULL = none */
    const float *mu;      /* (head_dim) MiKV channel centres (with bal) */
};

struct kv_view {
    int n_head_kv, head_dim;
    /* Attention-Gate: own hot entry j with gate[j] < gate_tau is hidden from a query at position
     * p when p - pos[j] >= gate_win (a token always sees itself) */
    float gate_tau;
    int32_t gate_win;
    struct kv_view_head h[KV_VIEW_MAX_HEADS];
};

#endif
