/* kv_cache.c — see kv_cache.h. */
#include "kv_cache.h"
#include "quant.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void kv_cache_init(struct kv_cache *c, int n_layer, int n_head_kv, int n_head, int head_dim,
                   bool with_acc, int qwin) {
    memset(c, 0, sizeof *c);
    c->n_layer = n_layer;
    c->n_head_kv = n_head_kv;
    c->n_head = n_head;
    c->head_dim = head_dim;
    c->with_acc = with_acc;
    c->qwin = qwin;
}

uint64_t kv_entry_payload_bytes(int head_dim) {
    return (uint64_t)head_dim * 2 * sizeof(uint16_t) + sizeof(int32_t) + sizeof(float);
}

uint64_t kv_cache_entry_bytes(const struct kv_cache *c) {
    return kv_entry_payload_bytes(c->head_dim) + (c->with_acc ? sizeof(float) : 0);
}

uint64_t kv_seq_payload_bytes(const struct kv_seq *s) {
    const struct kv_cache *c = s->owner;
    uint64_t b = 0;
    for (int i = 0; i < c->n_layer * c->n_head_kv; i++) b += (uint64_t)s->h[i].cap;
    return b * kv_entry_payload_bytes(c->head_dim);
}

static uint64_t qwin_bytes(const struct kv_cache *c) {
    return (uint64_t)c->n_layer * c->qwin * ((uint64_t)c->n_head * c->head_dim * 4 + 4) +
           (c->qwin ? (uint64_t)c->n_layer * 8 : 0);
}

static void account(struct kv_cache *c, int64_t delta) {
    c->bytes = (uint64_t)((int64_t)c->bytes + delta);
    if (c->bytes > c->bytes_peak) c->bytes_peak = c->bytes;
}

enum kvs_status kv_seq_new(struct kv_cache *c, struct kv_seq **out) {
    *out = NULL;
    struct kv_seq *s = calloc(1, sizeof *s);
    if (!s) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    s->owner = c;
    s->rng = 0x853c49e6748fea9bull;
    s->h = calloc((size_t)c->n_layer * c->n_head_kv, sizeof *s->h);
    if (c->qwin) {
        s->q = malloc((size_t)c->n_layer * c->qwin * c->n_head * c->head_dim * sizeof(float));
        s->q_pos = malloc((size_t)c->n_layer * c->qwin * sizeof(int32_t));
        s->q_n = calloc((size_t)c->n_layer, sizeof(int32_t));
        s->q_head = calloc((size_t)c->n_layer, sizeof(int32_t));
    }
    if (!s->h || (c->qwin && (!s->q || !s->q_pos || !s->q_n || !s->q_head))) {
        kv_seq_free(s);
        return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    }
    if (c->qwin) account(c, (int64_t)qwin_bytes(c));
    *out = s;
    return KVS_OK;
}

static void head_free(struct kv_seq *s, struct kv_head_store *h) {
    account(s->owner, -(int64_t)(h->cap * kv_cache_entry_bytes(s->owner)));
    free(h->k);
    free(h->v);
    free(h->pos);
    free(h->w);
    free(h->acc);
    memset(h, 0, sizeof *h);
}

void kv_seq_clear(struct kv_seq *s) {
    struct kv_cache *c = s->owner;
    for (int i = 0; i < c->n_layer * c->n_head_kv; i++) head_free(s, &s->h[i]);
    if (c->qwin) {
        memset(s->q_n, 0, sizeof(int32_t) * c->n_layer);
        memset(s->q_head, 0, sizeof(int32_t) * c->n_layer);
    }
    s->rng = 0x853c49e6748fea9bull;
}

void kv_seq_free(struct kv_seq *s) {
    if (!s) return;
    if (s->h) kv_seq_clear(s);
    if (s->q && s->q_pos && s->q_n && s->q_head) account(s->owner, -(int64_t)qwin_bytes(s->owner));
    free(s->h);
    free(s->q);
    free(s->q_pos);
    free(s->q_n);
    free(s->q_head);
    free(s);
}

/* set the capacity of one head to exactly `cap` entries */
static bool head_resize(struct kv_seq *s, struct kv_head_store *h, int32_t cap) {
    size_t hd = (size_t)s->owner->head_dim;
    if (cap == h->cap) return true;
    if (cap == 0) {
        head_free(s, h);
        return true;
    }
    uint16_t *k = realloc(h->k, cap * hd * 2);
    if (k) h->k = k;
    uint16_t *v = realloc(h->v, cap * hd * 2);
    if (v) h->v = v;
    int32_t *pos = realloc(h->pos, cap * sizeof *pos);
    if (pos) h->pos = pos;
    float *w = realloc(h->w, cap * sizeof *w);
    if (w) h->w = w;
    float *acc = NULL;
    if (s->owner->with_acc) {
        acc = realloc(h->acc, cap * sizeof *acc);
        if (acc) h->acc = acc;
    }
    if (!k || !v || !pos || !w || (s->owner->with_acc && !acc)) return false;
    account(s->owner, (int64_t)(cap - h->cap) * (int64_t)kv_cache_entry_bytes(s->owner));
    h->cap = cap;
    return true;
}

enum kvs_status kv_seq_reserve(struct kv_seq *s, int il, int n_new) {
    for (int ih = 0; ih < s->owner->n_head_kv; ih++) {
        struct kv_head_store *h = kv_seq_head(s, il, ih);
        if (h->n + n_new <= h->cap) continue;
        if (!head_resize(s, h, (int32_t)kvs_pad((size_t)(h->n + n_new), KV_CAP_STEP)))
            return kvs_fail(KVS_ERR_NOMEM, "out of memory for the KV cache");
    }
    return KVS_OK;
}

void kv_seq_fit(struct kv_seq *s, int il) {
    for (int ih = 0; ih < s->owner->n_head_kv; ih++) {
        struct kv_head_store *h = kv_seq_head(s, il, ih);
        int32_t cap = (int32_t)kvs_pad((size_t)h->n, KV_CAP_STEP);
        if (cap < h->cap) head_resize(s, h, cap); /* shrinking realloc cannot lose data */
    }
}

void kv_seq_append(struct kv_seq *s, int il, int32_t pos, const float *k, const float *v) {
    int hd = s->owner->head_dim;
    for (int ih = 0; ih < s->owner->n_head_kv; ih++) {
        struct kv_head_store *h = kv_seq_head(s, il, ih);
        KVS_ASSERT(h->n < h->cap);
        KVS_ASSERT(h->n == 0 || h->pos[h->n - 1] < pos);
        quant_f32_to_f16_row(k + (size_t)ih * hd, h->k + (size_t)h->n * hd, hd);
        quant_f32_to_f16_row(v + (size_t)ih * hd, h->v + (size_t)h->n * hd, hd);
        h->pos[h->n] = pos;
        h->w[h->n] = 1.0f;
        if (h->acc) h->acc[h->n] = 0.0f;
        h->n++;
    }
}

void kv_seq_save_query(struct kv_seq *s, int il, int32_t pos, const float *q) {
    const struct kv_cache *c = s->owner;
    if (!c->qwin) return;
    size_t qsz = (size_t)c->n_head * c->head_dim;
    int slot = s->q_head[il];
    memcpy(s->q + ((size_t)il * c->qwin + slot) * qsz, q, qsz * sizeof(float));
    s->q_pos[il * c->qwin + slot] = pos;
    s->q_head[il] = (slot + 1) % c->qwin;
    if (s->q_n[il] < c->qwin) s->q_n[il]++;
}

enum kvs_status kv_seq_copy(struct kv_seq *dst, const struct kv_seq *src) {
    struct kv_cache *dc = dst->owner;
    const struct kv_cache *sc = src->owner;
    if (dc->n_layer != sc->n_layer || dc->n_head_kv != sc->n_head_kv || dc->n_head != sc->n_head ||
        dc->head_dim != sc->head_dim)
        return kvs_fail(KVS_ERR_INVALID_ARG, "cannot copy a KV cache between different models");
    if (dst == src) return KVS_OK;
    kv_seq_clear(dst);
    size_t hd = (size_t)dc->head_dim;
    for (int i = 0; i < dc->n_layer * dc->n_head_kv; i++) {
        const struct kv_head_store *a = &src->h[i];
        struct kv_head_store *b = &dst->h[i];
        if (!head_resize(dst, b, (int32_t)kvs_pad((size_t)a->n, KV_CAP_STEP))) {
            kv_seq_clear(dst);
            return kvs_fail(KVS_ERR_NOMEM, "out of memory for the KV cache");
        }
        if (a->n == 0) continue;
        memcpy(b->k, a->k, (size_t)a->n * hd * 2);
        memcpy(b->v, a->v, (size_t)a->n * hd * 2);
        memcpy(b->pos, a->pos, (size_t)a->n * sizeof *b->pos);
        memcpy(b->w, a->w, (size_t)a->n * sizeof *b->w);
        if (b->acc) {
            if (a->acc) memcpy(b->acc, a->acc, (size_t)a->n * sizeof *b->acc);
            else memset(b->acc, 0, (size_t)a->n * sizeof *b->acc);
        }
        b->n = a->n;
    }
    /* the newest min(src, dst window) saved queries of each layer, oldest first */
    if (dc->qwin) {
        size_t qsz = (size_t)dc->n_head * hd;
        for (int il = 0; il < dc->n_layer; il++) {
            int nq = sc->qwin ? src->q_n[il] : 0;
            if (nq > dc->qwin) nq = dc->qwin;
            for (int qi = 0; qi < nq; qi++) {
                int slot = (src->q_head[il] - nq + qi + sc->qwin) % sc->qwin;
                kv_seq_save_query(dst, il, src->q_pos[il * sc->qwin + slot],
                                  src->q + ((size_t)il * sc->qwin + slot) * qsz);
            }
        }
    }
    dst->rng = src->rng;
    return KVS_OK;
}

/* rotate one fp16 key (head_dim) by `delta` positions */
static void rerotate(const struct kv_cache *c, uint16_t *k, int32_t delta) {
    int hd = c->head_dim, half = hd / 2;
    float x[512];
    quant_f16_to_f32_row(k, x, hd);
    for (int i = 0; i < half; i++) {
        double a = (double)delta * c->rope_inv_freq[i];
        float cs = (float)cos(a), sn = (float)sin(a);
        int ia = c->rope_neox ? i : 2 * i, ib = c->rope_neox ? i + half : 2 * i + 1;
        float x0 = x[ia], x1 = x[ib];
        x[ia] = x0 * cs - x1 * sn;
        x[ib] = x0 * sn + x1 * cs;
    }
    quant_f32_to_f16_row(x, k, hd);
}

void kv_seq_apply_plan(struct kv_seq *s, int il, const struct kv_plan *plan, bool reindex) {
    size_t hd = (size_t)s->owner->head_dim;
    KVS_ASSERT(!reindex || (s->owner->rope_inv_freq && hd <= 512));
    for (int ih = 0; ih < s->owner->n_head_kv; ih++) {
        struct kv_head_store *h = kv_seq_head(s, il, ih);
        const int32_t *keep = plan->keep[ih];
        int32_t nk = plan->n_keep[ih];
        KVS_ASSERT(nk >= 0 && nk <= h->n);
        for (int32_t i = 0; i < nk; i++) {
            int32_t j = keep[i];
            KVS_ASSERT(j >= i && j < h->n && (i == 0 || j > keep[i - 1]));
            if (j == i) continue;
            memcpy(h->k + i * hd, h->k + j * hd, hd * 2);
            memcpy(h->v + i * hd, h->v + j * hd, hd * 2);
            h->pos[i] = h->pos[j];
            h->w[i] = h->w[j];
            if (h->acc) h->acc[i] = h->acc[j];
            if (reindex) rerotate(s->owner, h->k + i * hd, i - j);
        }
        h->n = nk;
    }
    kv_seq_fit(s, il);
}

void kv_seq_view(const struct kv_seq *s, int il, struct kv_view *out) {
    KVS_ASSERT(s->owner->n_head_kv <= KV_VIEW_MAX_HEADS);
    out->n_head_kv = s->owner->n_head_kv;
    out->head_dim = s->owner->head_dim;
    for (int ih = 0; ih < s->owner->n_head_kv; ih++) {
        const struct kv_head_store *h = kv_seq_head(s, il, ih);
        out->h[ih] = (struct kv_view_head){.n = h->n, .k = h->k, .v = h->v, .pos = h->pos,
                                           .w = NULL, .acc = h->acc};
    }
}

uint64_t kv_seq_bytes(const struct kv_seq *s) {
    const struct kv_cache *c = s->owner;
    uint64_t b = qwin_bytes(c);
    for (int i = 0; i < c->n_layer * c->n_head_kv; i++)
        b += (uint64_t)s->h[i].cap * kv_cache_entry_bytes(c);
    return b;
}

int32_t kv_seq_max_entries(const struct kv_seq *s) {
    int32_t m = 0;
    for (int i = 0; i < s->owner->n_layer * s->owner->n_head_kv; i++)
        if (s->h[i].n > m) m = s->h[i].n;
    return m;
}

bool kv_seq_check(const struct kv_seq *s) {
    const struct kv_cache *c = s->owner;
    for (int i = 0; i < c->n_layer * c->n_head_kv; i++) {
        const struct kv_head_store *h = &s->h[i];
        if (h->n < 0 || h->n > h->cap || h->cap % KV_CAP_STEP != 0)
            return kvs_fail(KVS_ERR_INTERNAL, "kv: head %d holds %d of %d", i, h->n, h->cap), false;
        for (int j = 1; j < h->n; j++)
            if (h->pos[j] <= h->pos[j - 1])
                return kvs_fail(KVS_ERR_INTERNAL, "kv: head %d positions not ascending at %d", i,
                                j), false;
    }
    return true;
}
