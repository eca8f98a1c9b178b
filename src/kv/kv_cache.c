/* kv_cache.c — see kv_cache.h. */
#include "kv_cache.h"
#include "quant.h"

#include <stdlib.h>
#include <string.h>

void kv_cache_init(struct kv_cache *c, int n_layer, int n_head_kv, int head_dim) {
    memset(c, 0, sizeof *c);
    c->n_layer = n_layer;
    c->n_head_kv = n_head_kv;
    c->head_dim = head_dim;
}

uint64_t kv_cache_entry_bytes(const struct kv_cache *c) {
    return (uint64_t)c->head_dim * 2 * sizeof(uint16_t) + sizeof(int32_t) + sizeof(float);
}

static void account(struct kv_cache *c, int64_t delta) {
    c->bytes = (uint64_t)((int64_t)c->bytes + delta);
    if (c->bytes > c->bytes_peak) c->bytes_peak = c->bytes;
}

enum kvs_status kv_seq_new(struct kv_cache *c, struct kv_seq **out) {
    struct kv_seq *s = calloc(1, sizeof *s);
    if (!s) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    s->n_layer = c->n_layer;
    s->n_head_kv = c->n_head_kv;
    s->head_dim = c->head_dim;
    s->owner = c;
    s->h = calloc((size_t)c->n_layer * c->n_head_kv, sizeof *s->h);
    if (!s->h) {
        free(s);
        return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    }
    *out = s;
    return KVS_OK;
}

static void head_free(struct kv_seq *s, struct kv_head_store *h) {
    account(s->owner, -(int64_t)(h->cap * kv_cache_entry_bytes(s->owner)));
    free(h->k);
    free(h->v);
    free(h->pos);
    free(h->w);
    memset(h, 0, sizeof *h);
}

void kv_seq_clear(struct kv_seq *s) {
    for (int i = 0; i < s->n_layer * s->n_head_kv; i++) head_free(s, &s->h[i]);
}

void kv_seq_free(struct kv_seq *s) {
    if (!s) return;
    kv_seq_clear(s);
    free(s->h);
    free(s);
}

enum kvs_status kv_seq_reserve(struct kv_seq *s, int il, int n_new) {
    size_t hd = (size_t)s->head_dim;
    for (int ih = 0; ih < s->n_head_kv; ih++) {
        struct kv_head_store *h = &s->h[il * s->n_head_kv + ih];
        if (h->n + n_new <= h->cap) continue;
        int32_t cap = (int32_t)kvs_pad((size_t)(h->n + n_new), KV_CAP_STEP);
        uint16_t *k = realloc(h->k, cap * hd * 2);
        if (k) h->k = k;
        uint16_t *v = realloc(h->v, cap * hd * 2);
        if (v) h->v = v;
        int32_t *pos = realloc(h->pos, cap * sizeof *pos);
        if (pos) h->pos = pos;
        float *w = realloc(h->w, cap * sizeof *w);
        if (w) h->w = w;
        if (!k || !v || !pos || !w) return kvs_fail(KVS_ERR_NOMEM, "out of memory for the KV cache");
        account(s->owner, (int64_t)(cap - h->cap) * (int64_t)kv_cache_entry_bytes(s->owner));
        h->cap = cap;
    }
    return KVS_OK;
}

void kv_seq_append(struct kv_seq *s, int il, int32_t pos, const float *k, const float *v) {
    int hd = s->head_dim;
    for (int ih = 0; ih < s->n_head_kv; ih++) {
        struct kv_head_store *h = &s->h[il * s->n_head_kv + ih];
        KVS_ASSERT(h->n < h->cap);
        KVS_ASSERT(h->n == 0 || h->pos[h->n - 1] < pos);
        quant_f32_to_f16_row(k + (size_t)ih * hd, h->k + (size_t)h->n * hd, hd);
        quant_f32_to_f16_row(v + (size_t)ih * hd, h->v + (size_t)h->n * hd, hd);
        h->pos[h->n] = pos;
        h->w[h->n] = 1.0f;
        h->n++;
    }
}

void kv_seq_view(const struct kv_seq *s, int il, struct kv_view *out) {
    KVS_ASSERT(s->n_head_kv <= KV_VIEW_MAX_HEADS);
    out->n_head_kv = s->n_head_kv;
    out->head_dim = s->head_dim;
    for (int ih = 0; ih < s->n_head_kv; ih++) {
        const struct kv_head_store *h = &s->h[il * s->n_head_kv + ih];
        out->h[ih] = (struct kv_view_head){.n = h->n, .k = h->k, .v = h->v, .pos = h->pos,
                                           .w = NULL};
    }
}

uint64_t kv_seq_bytes(const struct kv_seq *s) {
    uint64_t b = 0;
    for (int i = 0; i < s->n_layer * s->n_head_kv; i++)
        b += (uint64_t)s->h[i].cap * kv_cache_entry_bytes(s->owner);
    return b;
}

bool kv_seq_check(const struct kv_seq *s) {
    for (int i = 0; i < s->n_layer * s->n_head_kv; i++) {
        const struct kv_head_store *h = &s->h[i];
        if (h->n < 0 || h->n > h->cap)
            return kvs_fail(KVS_ERR_INTERNAL, "kv: head %d holds %d of %d", i, h->n, h->cap), false;
        for (int j = 1; j < h->n; j++)
            if (h->pos[j] <= h->pos[j - 1])
                return kvs_fail(KVS_ERR_INTERNAL, "kv: head %d positions not ascending at %d", i,
                                j), false;
    }
    return true;
}
