/* kv_cache.c — see kv_cache.h. */
#include "kv_cache.h"
#include "quant.h"
#include "kv_quant.h"
#include "kv_spec.h"

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
    s->with_acc = c->with_acc;
    s->rng = 0x853c49e6748fea9bull;
    s->h = calloc((size_t)c->n_layer * c->n_head_kv, sizeof *s->h);
    s->pstate = calloc((size_t)c->n_layer * KV_PSTATE, sizeof(float));
    if (c->qwin) {
        s->q = malloc((size_t)c->n_layer * c->qwin * c->n_head * c->head_dim * sizeof(float));
        s->q_pos = malloc((size_t)c->n_layer * c->qwin * sizeof(int32_t));
        s->q_n = calloc((size_t)c->n_layer, sizeof(int32_t));
        s->q_head = calloc((size_t)c->n_layer, sizeof(int32_t));
    }
    if (!s->h || !s->pstate || (c->qwin && (!s->q || !s->q_pos || !s->q_n || !s->q_head))) {
        kv_seq_free(s);
        return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    }
    if (c->qwin) account(c, (int64_t)qwin_bytes(c));
    *out = s;
    return KVS_OK;
}

static uint64_t head_bytes(const struct kv_seq *s, const struct kv_head_store *h, bool stats);

static void head_free(struct kv_seq *s, struct kv_head_store *h) {
    account(s->owner, -(int64_t)head_bytes(s, h, true));
    void *bufs[] = {h->k, h->v, h->pos, h->w, h->acc, h->blk_n, h->ck, h->cv, h->cks, h->ckm,
                    h->cvs, h->cvm, h->ch, h->bal};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
    memset(h, 0, sizeof *h);
}

static uint64_t gate_row_bytes(const struct kv_seq *s) { return 4 * (uint64_t)s->gate_w; }

uint64_t kv_seq_gate_bytes(const struct kv_seq *s) {
    uint64_t b = 0;
    if (s->gate_cap)
        for (int il = 0; il < s->owner->n_layer; il++) b += (uint64_t)s->gate_cap[il] * gate_row_bytes(s);
    return b;
}

static void gate_free(struct kv_seq *s) {
    if (!s->gate_kv) return;
    account(s->owner, -(int64_t)kv_seq_gate_bytes(s));
    for (size_t i = 0; i < (size_t)s->owner->n_layer * 2 * (size_t)s->gate_gh; i++) free(s->gate_kv[i]), s->gate_kv[i] = NULL;
    memset(s->gate_n, 0, sizeof(int32_t) * (size_t)s->owner->n_layer);
    memset(s->gate_cap, 0, sizeof(int32_t) * (size_t)s->owner->n_layer);
}

bool kv_seq_set_gate(struct kv_seq *s, int gh, int gd, float tau, int32_t win) {
    int L = s->owner->n_layer;
    if (gh == s->gate_gh && gd == s->gate_gd) {
        s->gate_tau = tau, s->gate_win = win;
        return true;
    }
    for (int i = 0; i < L * s->owner->n_head_kv; i++)
        if (s->h[i].cap) return false;
    if (s->gate_kv)
        for (int il = 0; il < L; il++)
            if (s->gate_cap[il]) return false;
    free(s->gate_kv), free(s->gate_n), free(s->gate_cap);
    s->gate_kv = NULL, s->gate_n = s->gate_cap = NULL;
    s->gate_w = s->gate_gh = s->gate_gd = 0;
    if (gh > 0) {
        s->gate_kv = calloc((size_t)L * 2 * (size_t)gh, sizeof *s->gate_kv);
        s->gate_n = calloc((size_t)L, sizeof(int32_t));
        s->gate_cap = calloc((size_t)L, sizeof(int32_t));
        if (!s->gate_kv || !s->gate_n || !s->gate_cap) {
            free(s->gate_kv), free(s->gate_n), free(s->gate_cap);
            s->gate_kv = NULL, s->gate_n = s->gate_cap = NULL;
            return false;
        }
        s->gate_w = gh * gd, s->gate_gh = gh, s->gate_gd = gd;
    }
    s->gate_tau = tau, s->gate_win = win;
    return true;
}

enum kvs_status kv_seq_gate_append(struct kv_seq *s, int il, const float *kv) {
    KVS_ASSERT(s->gate_w > 0);
    int np = 2 * s->gate_gh;
    size_t gd = (size_t)s->gate_gd;
    uint16_t **pl = s->gate_kv + (size_t)il * np;
    if (s->gate_n[il] == s->gate_cap[il]) {
        int32_t nc = s->gate_cap[il] + KV_CAP_STEP;
        for (int p = 0; p < np; p++) {
            uint16_t *q = realloc(pl[p], (size_t)nc * gd * 2);
            if (!q) { /* the planes grown so far keep their rows: capacity is the smallest */
                return kvs_fail(KVS_ERR_NOMEM, "out of memory for the gate's cache");
            }
            pl[p] = q;
        }
        account(s->owner, (int64_t)((uint64_t)KV_CAP_STEP * gate_row_bytes(s)));
        s->gate_cap[il] = nc;
    }
    for (int p = 0; p < np; p++) quant_f32_to_f16_row(kv + (size_t)p * gd, pl[p] + (size_t)s->gate_n[il] * gd, (int64_t)gd);
    s->gate_n[il]++;
    return KVS_OK;
}

void kv_seq_clear(struct kv_seq *s) {
    struct kv_cache *c = s->owner;
    for (int i = 0; i < c->n_layer * c->n_head_kv; i++) head_free(s, &s->h[i]);
    gate_free(s);
    if (c->qwin && s->q_n) {
        memset(s->q_n, 0, sizeof(int32_t) * c->n_layer);
        memset(s->q_head, 0, sizeof(int32_t) * c->n_layer);
    }
    s->rng = 0x853c49e6748fea9bull;
    s->pin = 0;
    memset(s->pstate, 0, sizeof(float) * c->n_layer * KV_PSTATE);
}

bool kv_seq_set_acc(struct kv_seq *s, bool on) {
    for (int i = 0; i < s->owner->n_layer * s->owner->n_head_kv; i++)
        if (s->h[i].cap) return on == s->with_acc;
    s->with_acc = on;
    return true;
}

void kv_seq_drop_acc(struct kv_seq *s) {
    for (int i = 0; i < s->owner->n_layer * s->owner->n_head_kv; i++) {
        struct kv_head_store *h = &s->h[i];
        if (!h->acc) continue;
        uint64_t before = head_bytes(s, h, true);
        free(h->acc);
        h->acc = NULL;
        account(s->owner, (int64_t)head_bytes(s, h, true) - (int64_t)before);
    }
    s->with_acc = false;
    s->acc_learned = false;
}

void kv_seq_free(struct kv_seq *s) {
    if (!s) return;
    if (s->h) kv_seq_clear(s);
    if (s->q && s->q_pos && s->q_n && s->q_head) account(s->owner, -(int64_t)qwin_bytes(s->owner));
    free(s->h);
    free(s->pstate);
    free(s->q);
    free(s->q_pos);
    free(s->q_n);
    free(s->q_head);
    free(s->gate_kv);
    free(s->gate_n);
    free(s->gate_cap);
    free(s);
}

/* ---- sizes ------------------------------------------------------------------------------ */

/* (scale, min) groups of a packed value row */
static size_t vgroups(const struct kv_pack_cfg *pc, int hd) {
    return pc->f.vfmt == KV_V_TOK ? (size_t)(hd / pc->f.vgs) : 0;
}
static size_t vrow_bytes(const struct kv_pack_cfg *pc, int hd) {
    return pc->f.vfmt == KV_V_TOK ? pc->f.vstride + vgroups(pc, hd) * 2 * sizeof(uint16_t) : (size_t)hd * 2;
}
static size_t krow_bytes(const struct kv_pack_cfg *pc) { /* per packed row, 0 for BLK */
    if (pc->f.kfmt == KV_K_TOK) return pc->f.kstride + 2 * sizeof(uint16_t);
    if (pc->f.kfmt == KV_K_F16) return (size_t)pc->f.kd * 2;
    return 0;
}
static size_t blk_bytes(const struct kv_pack_cfg *pc) {
    return (size_t)pc->f.kd * (pc->f.kstride + 2 * sizeof(uint16_t)) + sizeof(int32_t);
}

static uint64_t head_bytes(const struct kv_seq *s, const struct kv_head_store *h, bool stats) {
    const struct kv_cache *c = s->owner;
    const struct kv_pack_cfg *pc = &s->pack;
    uint64_t b = (uint64_t)h->cap * (sizeof(int32_t) + sizeof(float)) +
                 (uint64_t)h->hcap * c->head_dim * 4;
    if (stats && h->acc) b += (uint64_t)h->cap * sizeof(float);
    if (pc->on) {
        b += (uint64_t)h->rcap * (vrow_bytes(pc, c->head_dim) + krow_bytes(pc));
        if (pc->f.kfmt == KV_K_BLK) b += (uint64_t)h->bcap * blk_bytes(pc);
        if (h->ch) b += (uint64_t)pc->f.kd;
        if (h->bal) b += 2 * (uint64_t)c->head_dim * sizeof(float);
    }
    return b;
}

static bool grow(void **p, size_t bytes) {
    if (bytes == 0) {
        free(*p);
        *p = NULL;
        return true;
    }
    void *q = realloc(*p, bytes);
    if (!q) return false;
    *p = q;
    return true;
}

/* set the capacities of one head: metadata `cap`, hot rows `hcap`, packed rows `rcap`, blocks
 * `bcap` (shrinking never loses held data: callers pass at least what is held) */
static bool head_resize4(struct kv_seq *s, struct kv_head_store *h, int32_t cap, int32_t hcap,
                         int32_t rcap, int32_t bcap) {
    const struct kv_cache *c = s->owner;
    const struct kv_pack_cfg *pc = &s->pack;
    size_t hd = (size_t)c->head_dim;
    uint64_t before = head_bytes(s, h, true);
    bool ok = true;
    if (cap != h->cap) {
        ok = ok && grow((void **)&h->pos, (size_t)cap * sizeof(int32_t)) &&
             grow((void **)&h->w, (size_t)cap * sizeof(float)) &&
             (!s->with_acc || grow((void **)&h->acc, (size_t)cap * sizeof(float)));
        if (ok) h->cap = cap;
    }
    if (ok && hcap != h->hcap) {
        ok = grow((void **)&h->k, (size_t)hcap * hd * 2) && grow((void **)&h->v, (size_t)hcap * hd * 2);
        if (ok) h->hcap = hcap;
    }
    if (ok && rcap != h->rcap && pc->on) {
        ok = grow((void **)&h->cv, (size_t)rcap * (pc->f.vfmt == KV_V_TOK ? pc->f.vstride : hd * 2));
        if (ok && pc->f.vfmt == KV_V_TOK)
            ok = grow((void **)&h->cvs, (size_t)rcap * vgroups(pc, (int)hd) * 2) &&
                 grow((void **)&h->cvm, (size_t)rcap * vgroups(pc, (int)hd) * 2);
        if (ok && pc->f.kfmt == KV_K_F16) ok = grow((void **)&h->ck, (size_t)rcap * pc->f.kd * 2);
        if (ok && pc->f.kfmt == KV_K_TOK)
            ok = grow((void **)&h->ck, (size_t)rcap * pc->f.kstride) &&
                 grow((void **)&h->cks, (size_t)rcap * 2) && grow((void **)&h->ckm, (size_t)rcap * 2);
        if (ok) h->rcap = rcap;
    }
    if (ok && bcap != h->bcap && pc->on && pc->f.kfmt == KV_K_BLK) {
        size_t kd = (size_t)pc->f.kd;
        ok = grow((void **)&h->ck, (size_t)bcap * kd * pc->f.kstride) &&
             grow((void **)&h->cks, (size_t)bcap * kd * 2) && grow((void **)&h->ckm, (size_t)bcap * kd * 2) &&
             grow((void **)&h->blk_n, (size_t)bcap * 4);
        if (ok) h->bcap = bcap;
    }
    /* capacities only change where their buffers did: the accounting stays exact on failure */
    account(s->owner, (int64_t)head_bytes(s, h, true) - (int64_t)before);
    return ok;
}

static int32_t pad(int32_t n) { return (int32_t)kvs_pad((size_t)n, KV_CAP_STEP); }
static int32_t pad_blk(int32_t n) { return (int32_t)kvs_pad((size_t)n, 4); }

enum kvs_status kv_seq_reserve(struct kv_seq *s, int il, int n_new) {
    for (int ih = 0; ih < s->owner->n_head_kv; ih++) {
        struct kv_head_store *h = kv_seq_head(s, il, ih);
        int32_t nh = h->n - h->nc;
        if (h->n + n_new <= h->cap && nh + n_new <= h->hcap) continue;
        int32_t cap = h->n + n_new > h->cap ? pad(h->n + n_new) : h->cap;
        int32_t hcap = nh + n_new > h->hcap ? pad(nh + n_new) : h->hcap;
        if (!head_resize4(s, h, cap, hcap, h->rcap, h->bcap))
            return kvs_fail(KVS_ERR_NOMEM, "out of memory for the KV cache");
    }
    return KVS_OK;
}

void kv_seq_fit(struct kv_seq *s, int il) {
    for (int ih = 0; ih < s->owner->n_head_kv; ih++) {
        struct kv_head_store *h = kv_seq_head(s, il, ih);
        int32_t cap = pad(h->n), hcap = pad(h->n - h->nc), rcap = pad(h->nc), bcap = pad_blk(h->nblk);
        if (cap < h->cap || hcap < h->hcap || rcap < h->rcap || bcap < h->bcap)
            head_resize4(s, h, cap < h->cap ? cap : h->cap, hcap < h->hcap ? hcap : h->hcap,
                         rcap < h->rcap ? rcap : h->rcap, bcap < h->bcap ? bcap : h->bcap);
    }
}

void kv_seq_append(struct kv_seq *s, int il, int32_t pos, const float *k, const float *v) {
    int hd = s->owner->head_dim;
    for (int ih = 0; ih < s->owner->n_head_kv; ih++) {
        struct kv_head_store *h = kv_seq_head(s, il, ih);
        int32_t r = h->n - h->nc;
        KVS_ASSERT(h->n < h->cap && r < h->hcap);
        KVS_ASSERT(r == 0 || h->pos[h->n - 1] < pos);
        quant_f32_to_f16_row(k + (size_t)ih * hd, h->k + (size_t)r * hd, hd);
        quant_f32_to_f16_row(v + (size_t)ih * hd, h->v + (size_t)r * hd, hd);
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

static bool same_pack(const struct kv_pack_cfg *a, const struct kv_pack_cfg *b) {
    return a->on == b->on && (!a->on || (a->think == b->think && a->kivi == b->kivi &&
           a->mikv == b->mikv && a->balance == b->balance && a->prune == b->prune &&
           a->think_recent == b->think_recent && a->resid == b->resid &&
           !memcmp(&a->f, &b->f, sizeof a->f)));
}

static bool seq_has_packed(const struct kv_seq *s) {
    for (int i = 0; i < s->owner->n_layer * s->owner->n_head_kv; i++)
        if (s->h[i].nc || s->h[i].ch || s->h[i].bal) return true;
    return false;
}

enum kvs_status kv_seq_set_pack(struct kv_seq *s, const struct kv_pack_cfg *cfg) {
    if (same_pack(&s->pack, cfg)) return KVS_OK;
    if (seq_has_packed(s))
        return kvs_fail(KVS_ERR_INVALID_ARG, "this sequence already holds entries packed in "
                        "another storage format");
    /* no packed payload is allocated yet: only the (empty) packed capacities change meaning */
    for (int i = 0; i < s->owner->n_layer * s->owner->n_head_kv; i++) {
        struct kv_head_store *h = &s->h[i];
        head_resize4(s, h, h->cap, h->hcap, 0, 0);
    }
    s->pack = *cfg;
    return KVS_OK;
}

enum kvs_status kv_seq_copy(struct kv_seq *dst, const struct kv_seq *src) {
    struct kv_cache *dc = dst->owner;
    const struct kv_cache *sc = src->owner;
    if (dc->n_layer != sc->n_layer || dc->n_head_kv != sc->n_head_kv || dc->n_head != sc->n_head ||
        dc->head_dim != sc->head_dim)
        return kvs_fail(KVS_ERR_INVALID_ARG, "cannot copy a KV cache between different models");
    if (dst == src) return KVS_OK;
    kv_seq_clear(dst);
    dst->pack = src->pack;
    const struct kv_pack_cfg *pc = &src->pack;
    size_t hd = (size_t)dc->head_dim;
    for (int i = 0; i < dc->n_layer * dc->n_head_kv; i++) {
        const struct kv_head_store *a = &src->h[i];
        struct kv_head_store *b = &dst->h[i];
        int32_t nh = a->n - a->nc;
        bool ok = head_resize4(dst, b, pad(a->n), pad(nh), pad(a->nc), pad_blk(a->nblk));
        if (ok && a->ch) { /* accounted as soon as allocated: a later failure frees it exactly */
            if ((ok = (b->ch = malloc((size_t)pc->f.kd)) != NULL))
                memcpy(b->ch, a->ch, (size_t)pc->f.kd), account(dc, pc->f.kd);
        }
        if (ok && a->bal) {
            if ((ok = (b->bal = malloc(2 * hd * sizeof(float))) != NULL))
                memcpy(b->bal, a->bal, 2 * hd * sizeof(float)),
                    account(dc, (int64_t)(2 * hd * sizeof(float)));
        }
        if (!ok) {
            kv_seq_clear(dst);
            return kvs_fail(KVS_ERR_NOMEM, "out of memory for the KV cache");
        }
        memcpy(b->k, a->k, (size_t)nh * hd * 2);
        memcpy(b->v, a->v, (size_t)nh * hd * 2);
        memcpy(b->pos, a->pos, (size_t)a->n * sizeof *b->pos);
        memcpy(b->w, a->w, (size_t)a->n * sizeof *b->w);
        if (b->acc) { /* a slot of the other kind (attention vs learned score) is not carried */
            if (a->acc && src->acc_learned == dst->acc_learned) memcpy(b->acc, a->acc, (size_t)a->n * sizeof *b->acc);
            else memset(b->acc, 0, (size_t)a->n * sizeof *b->acc);
        }
        if (pc->on && a->nc) {
            size_t nc = (size_t)a->nc;
            memcpy(b->cv, a->cv, nc * (pc->f.vfmt == KV_V_TOK ? pc->f.vstride : hd * 2));
            size_t ng = vgroups(pc, (int)hd);
            if (pc->f.vfmt == KV_V_TOK) memcpy(b->cvs, a->cvs, nc * ng * 2), memcpy(b->cvm, a->cvm, nc * ng * 2);
            if (pc->f.kfmt == KV_K_F16) memcpy(b->ck, a->ck, nc * pc->f.kd * 2);
            if (pc->f.kfmt == KV_K_TOK)
                memcpy(b->ck, a->ck, nc * pc->f.kstride), memcpy(b->cks, a->cks, nc * 2),
                    memcpy(b->ckm, a->ckm, nc * 2);
            if (pc->f.kfmt == KV_K_BLK) {
                size_t nb = (size_t)a->nblk, kd = (size_t)pc->f.kd;
                memcpy(b->ck, a->ck, nb * kd * pc->f.kstride);
                memcpy(b->cks, a->cks, nb * kd * 2), memcpy(b->ckm, a->ckm, nb * kd * 2);
                memcpy(b->blk_n, a->blk_n, nb * 4);
            }
        }
        b->n = a->n, b->nc = a->nc, b->nblk = a->nblk;
    }
    if (dst->gate_w && dst->gate_gh == src->gate_gh && dst->gate_gd == src->gate_gd) /* the gate's cache goes along */
        for (int il = 0; il < dc->n_layer; il++) {
            int np = 2 * src->gate_gh;
            size_t n = (size_t)src->gate_cap[il], gd = (size_t)src->gate_gd;
            if (!n) continue;
            for (int p = 0; p < np; p++) {
                uint16_t *q = malloc(n * gd * 2);
                if (!q) {
                    kv_seq_clear(dst);
                    return kvs_fail(KVS_ERR_NOMEM, "out of memory for the gate's cache");
                }
                memcpy(q, kv_seq_gate_planes(src, il)[p], (size_t)src->gate_n[il] * gd * 2);
                dst->gate_kv[(size_t)il * np + p] = q;
            }
            dst->gate_cap[il] = (int32_t)n, dst->gate_n[il] = src->gate_n[il];
            account(dc, (int64_t)(n * gd * 2 * np));
        }
    kv_seq_copy_queries(dst, src);
    memcpy(dst->pstate, src->pstate, sizeof(float) * dc->n_layer * KV_PSTATE);
    dst->rng = src->rng;
    dst->pin = src->pin;
    return KVS_OK;
}

/* rotate one fp16 key (head_dim) by `delta` positions */
/* turn a post-RoPE key (float, head_dim) by delta positions */
static void rotate_f32(const struct kv_cache *c, float *x, int32_t delta) {
    int hd = c->head_dim, half = hd / 2;
    for (int i = 0; i < half; i++) {
        double a = (double)delta * c->rope_inv_freq[i];
        float cs = (float)cos(a), sn = (float)sin(a);
        int ia = c->rope_neox ? i : 2 * i, ib = c->rope_neox ? i + half : 2 * i + 1;
        float x0 = x[ia], x1 = x[ib];
        x[ia] = x0 * cs - x1 * sn;
        x[ib] = x0 * sn + x1 * cs;
    }
}

static void rerotate(const struct kv_cache *c, uint16_t *k, int32_t delta) {
    float x[512];
    quant_f16_to_f32_row(k, x, c->head_dim);
    rotate_f32(c, x, delta);
    quant_f32_to_f16_row(x, k, c->head_dim);
}

/* ---- packed entries ------------------------------------------------------------------------ */

/* index of packed entry j's block and its slot in it (BLK) */
static void blk_find(const struct kv_head_store *h, int32_t j, int32_t *b, int32_t *t) {
    int32_t i = 0;
    while (j >= h->blk_n[i]) j -= h->blk_n[i++];
    *b = i, *t = j;
}

void kv_seq_key(const struct kv_seq *s, int il, int ih, int32_t j, float *out) {
    const struct kv_head_store *h = kv_seq_head(s, il, ih);
    const struct kv_packed_fmt *f = &s->pack.f;
    int hd = s->owner->head_dim;
    KVS_ASSERT(j >= 0 && j < h->n);
    if (j >= h->nc) {
        quant_f16_to_f32_row(h->k + (size_t)(j - h->nc) * hd, out, hd);
        return;
    }
    float x[512];
    int kd = f->kd;
    if (f->kfmt == KV_K_F16) {
        quant_f16_to_f32_row((const uint16_t *)h->ck + (size_t)j * kd, x, kd);
    } else if (f->kfmt == KV_K_TOK) {
        kvq_dequant_group(h->ck + (size_t)j * f->kstride, kd, f->kbits, quant_f16_to_f32(h->cks[j]),
                          quant_f16_to_f32(h->ckm[j]), x);
    } else {
        int32_t b, t;
        blk_find(h, j, &b, &t);
        const uint8_t *base = h->ck + (size_t)b * kd * f->kstride;
        for (int c = 0; c < kd; c++)
            x[c] = (float)kvq_code(base + (size_t)c * f->kstride, f->kbits, t) *
                       quant_f16_to_f32(h->cks[(size_t)b * kd + c]) +
                   quant_f16_to_f32(h->ckm[(size_t)b * kd + c]);
    }
    for (int c = 0; c < hd; c++) out[c] = 0.0f;
    for (int c = 0; c < kd; c++) {
        int ch = h->ch ? h->ch[c] : c;
        out[ch] = h->bal ? x[c] / h->bal[ch] + h->bal[hd + ch] : x[c];
    }
}

void kv_seq_value(const struct kv_seq *s, int il, int ih, int32_t j, float *out) {
    const struct kv_head_store *h = kv_seq_head(s, il, ih);
    const struct kv_packed_fmt *f = &s->pack.f;
    int hd = s->owner->head_dim;
    KVS_ASSERT(j >= 0 && j < h->n);
    if (j >= h->nc) quant_f16_to_f32_row(h->v + (size_t)(j - h->nc) * hd, out, hd);
    else if (f->vfmt == KV_V_F16) quant_f16_to_f32_row((const uint16_t *)h->cv + (size_t)j * hd, out, hd);
    else {
        size_t ng = vgroups(&s->pack, hd);
        for (size_t k = 0; k < ng; k++)
            kvq_dequant_group(h->cv + (size_t)j * f->vstride + k * (size_t)f->vgs * f->vbits / 8,
                              f->vgs, f->vbits, quant_f16_to_f32(h->cvs[j * ng + k]),
                              quant_f16_to_f32(h->cvm[j * ng + k]),
                              out + k * (size_t)f->vgs);
    }
}

/* write packed row r (TOK/F16 keys, values) from full-width floats */
static void put_row(const struct kv_seq *s, struct kv_head_store *h, int32_t r, const float *k,
                    const float *v) {
    const struct kv_packed_fmt *f = &s->pack.f;
    int hd = s->owner->head_dim;
    float x[512];
    for (int c = 0; c < f->kd; c++) {
        int ch = h->ch ? h->ch[c] : c;
        x[c] = h->bal ? (k[ch] - h->bal[hd + ch]) * h->bal[ch] : k[ch];
    }
    if (f->kfmt == KV_K_F16) quant_f32_to_f16_row(x, (uint16_t *)h->ck + (size_t)r * f->kd, f->kd);
    else if (f->kfmt == KV_K_TOK)
        kvq_quant_group(x, f->kd, 1, f->kbits, h->ck + (size_t)r * f->kstride, &h->cks[r], &h->ckm[r]);
    if (f->vfmt == KV_V_F16) quant_f32_to_f16_row(v, (uint16_t *)h->cv + (size_t)r * hd, hd);
    else {
        size_t ng = vgroups(&s->pack, hd);
        for (size_t k = 0; k < ng; k++) /* groups of vgs channels, each its own (scale, min) */
            kvq_quant_group(v + k * (size_t)f->vgs, f->vgs, 1, f->vbits,
                            h->cv + (size_t)r * f->vstride + k * (size_t)f->vgs * f->vbits / 8,
                            &h->cvs[r * ng + k], &h->cvm[r * ng + k]);
    }
}

static void move_row(const struct kv_seq *s, struct kv_head_store *h, int32_t to, int32_t from) {
    const struct kv_packed_fmt *f = &s->pack.f;
    size_t hd = (size_t)s->owner->head_dim;
    if (to == from) return;
    if (f->vfmt == KV_V_F16) memmove(h->cv + to * hd * 2, h->cv + from * hd * 2, hd * 2);
    else memmove(h->cv + to * f->vstride, h->cv + from * f->vstride, f->vstride),
         memmove(h->cvs + to * vgroups(&s->pack, (int)hd), h->cvs + from * vgroups(&s->pack, (int)hd),
                 vgroups(&s->pack, (int)hd) * 2),
         memmove(h->cvm + to * vgroups(&s->pack, (int)hd), h->cvm + from * vgroups(&s->pack, (int)hd),
                 vgroups(&s->pack, (int)hd) * 2);
    if (f->kfmt == KV_K_F16) memmove(h->ck + to * f->kd * 2, h->ck + from * f->kd * 2, (size_t)f->kd * 2);
    else if (f->kfmt == KV_K_TOK)
        memmove(h->ck + to * f->kstride, h->ck + from * f->kstride, f->kstride),
            h->cks[to] = h->cks[from], h->ckm[to] = h->ckm[from];
}

/* BLK: keep the packed entries flagged in keep[0..nc) (in order), repacking each block's codes */
static void blk_compact(const struct kv_seq *s, struct kv_head_store *h, const uint8_t *keep) {
    const struct kv_packed_fmt *f = &s->pack.f;
    size_t kd = (size_t)f->kd, bb = kd * f->kstride;
    int32_t j = 0, nb = 0;
    for (int32_t b = 0; b < h->nblk; b++) {
        uint8_t *src = h->ck + (size_t)b * bb, *dst = h->ck + (size_t)nb * bb;
        int32_t n = h->blk_n[b], m = 0;
        int32_t slot[KVQ_MAX_GROUP];
        for (int32_t t = 0; t < n; t++)
            if (keep[j + t]) slot[m++] = t;
        j += n;
        if (m == 0) continue;
        if (m != n || nb != b) {
            for (size_t c = 0; c < kd; c++) {
                uint8_t row[KVQ_MAX_GROUP];
                const uint8_t *r = src + c * f->kstride;
                for (int32_t i = 0; i < m; i++) row[i] = (uint8_t)kvq_code(r, f->kbits, slot[i]);
                uint8_t *o = dst + c * f->kstride;
                memset(o, 0, f->kstride);
                for (int32_t i = 0; i < m; i++) kvq_put(o, f->kbits, i, row[i]);
            }
            memmove(h->cks + (size_t)nb * kd, h->cks + (size_t)b * kd, kd * 2);
            memmove(h->ckm + (size_t)nb * kd, h->ckm + (size_t)b * kd, kd * 2);
        }
        h->blk_n[nb++] = m;
    }
    h->nblk = nb;
}

void kv_seq_set_channels(struct kv_seq *s, int il, int ih, const uint8_t *ch) {
    struct kv_head_store *h = kv_seq_head(s, il, ih);
    KVS_ASSERT(!h->nc);
    if (!h->ch) {
        h->ch = malloc((size_t)s->pack.f.kd);
        KVS_ASSERT(h->ch);
        account(s->owner, s->pack.f.kd);
    }
    memcpy(h->ch, ch, (size_t)s->pack.f.kd);
}

void kv_seq_set_balance(struct kv_seq *s, int il, int ih, const float *bal, const float *mu) {
    struct kv_head_store *h = kv_seq_head(s, il, ih);
    KVS_ASSERT(!h->nc);
    size_t hd = (size_t)s->owner->head_dim;
    if (!h->bal) {
        h->bal = malloc(2 * hd * sizeof(float));
        KVS_ASSERT(h->bal);
        account(s->owner, (int64_t)(2 * hd * sizeof(float)));
    }
    memcpy(h->bal, bal, hd * sizeof(float));
    memcpy(h->bal + hd, mu, hd * sizeof(float));
}

/* Move the oldest m hot entries of a head to the packed run. */
static bool pack_oldest(struct kv_seq *s, struct kv_head_store *h, int32_t m) {
    const struct kv_packed_fmt *f = &s->pack.f;
    size_t hd = (size_t)s->owner->head_dim;
    int32_t nh = h->n - h->nc;
    KVS_ASSERT(m <= nh);
    if (m <= 0) return true;
    int32_t nblk = h->nblk + (f->kfmt == KV_K_BLK ? (m + f->G - 1) / f->G : 0);
    int32_t rcap = h->nc + m > h->rcap ? pad(h->nc + m) : h->rcap;
    int32_t bcap = nblk > h->bcap ? pad_blk(nblk) : h->bcap;
    if (!head_resize4(s, h, h->cap, h->hcap, rcap, bcap)) return false;
    float k[512], v[512];
    for (int32_t i = 0; i < m; i++) {
        quant_f16_to_f32_row(h->k + (size_t)i * hd, k, (int)hd);
        quant_f16_to_f32_row(h->v + (size_t)i * hd, v, (int)hd);
        put_row(s, h, h->nc + i, k, v);
    }
    if (f->kfmt == KV_K_BLK) {
        float *x = malloc(sizeof(float) * (size_t)f->G * f->kd);
        KVS_ASSERT(x);
        for (int32_t i0 = 0; i0 < m; i0 += f->G) {
            int32_t nt = m - i0 < f->G ? m - i0 : f->G, b = h->nblk++;
            for (int32_t t = 0; t < nt; t++)
                for (int c = 0; c < f->kd; c++) {
                    int ch = h->ch ? h->ch[c] : c;
                    x[(size_t)t * f->kd + c] = quant_f16_to_f32(h->k[(size_t)(i0 + t) * hd + ch]);
                }
            size_t kd = (size_t)f->kd;
            kvq_quant_keys(x, nt, f->kd, f->kbits, f->kstride, h->ck + (size_t)b * kd * f->kstride,
                           h->cks + (size_t)b * kd, h->ckm + (size_t)b * kd);
            h->blk_n[b] = nt;
        }
        free(x);
    }
    memmove(h->k, h->k + (size_t)m * hd, (size_t)(nh - m) * hd * 2);
    memmove(h->v, h->v + (size_t)m * hd, (size_t)(nh - m) * hd * 2);
    h->nc += m;
    return true;
}

enum kvs_status kv_seq_pack_layer(struct kv_seq *s, int il, bool prompt) {
    const struct kv_pack_cfg *pc = &s->pack;
    if (!pc->on || pc->mikv) return KVS_OK; /* MiKV packs by plan (demotions) */
    for (int ih = 0; ih < s->owner->n_head_kv; ih++) {
        struct kv_head_store *h = kv_seq_head(s, il, ih);
        int32_t nh = h->n - h->nc, m = 0;
        if (pc->kivi) {
            if (nh >= pc->resid + pc->f.G) m = (nh - pc->resid) / pc->f.G * pc->f.G;
        } else if (prompt) {
            m = nh - pc->think_recent;
        }
        if (m <= 0) continue;
        KVS_ASSERT(!pc->think || h->ch);
        if (!pack_oldest(s, h, m)) return kvs_fail(KVS_ERR_NOMEM, "out of memory for the KV cache");
    }
    kv_seq_fit(s, il);
    return KVS_OK;
}

/* ---- plans --------------------------------------------------------------------------------- */

struct apply_tmp { int32_t *pos; float *w, *acc; uint16_t *k, *v; float *mk, *mv; int32_t *slot; uint8_t *keepc; int32_t *order; };

static _Thread_local const int32_t *g_sort_pos;
static int cmp_by_pos(const void *a, const void *b) {
    int32_t x = g_sort_pos[*(const int32_t *)a], y = g_sort_pos[*(const int32_t *)b];
    return (x > y) - (x < y);
}

static void apply_head(struct kv_seq *s, struct kv_head_store *h, const struct kv_plan *plan,
                       int ih, bool reindex) {
    const struct kv_cache *c = s->owner;
    size_t hd = (size_t)c->head_dim;
    const int32_t *keep = plan->keep[ih];
    int32_t nk = plan->n_keep[ih], n = h->n, nc = h->nc;
    const int32_t *mt = plan->mt[ih];
    const float *mc = plan->mc[ih];
    const uint8_t *dem = plan->dem[ih];
    KVS_ASSERT(nk >= 0 && nk <= n);
    for (int32_t i = 0; i < nk; i++)
        KVS_ASSERT(keep[i] >= i && keep[i] < n && (i == 0 || keep[i] > keep[i - 1]));
    bool merges = false;
    if (mt) { /* every merge goes into an entry the plan keeps */
        uint8_t *kept = calloc((size_t)(n ? n : 1), 1);
        KVS_ASSERT(kept);
        for (int32_t i = 0; i < nk; i++) kept[keep[i]] = 1;
        for (int32_t j = 0; j < n; j++) {
            KVS_ASSERT(mt[j] >= -1 && mt[j] < n && (mt[j] < 0 || (kept[mt[j]] && !kept[j])));
            merges = merges || mt[j] >= 0;
        }
        free(kept);
    }
    bool demotes = false;
    if (dem)
        for (int32_t i = 0; i < nk && !demotes; i++) demotes = dem[keep[i]] != 0;
    if (!merges && !demotes && nc == 0) { /* the common case: compact in place */
        for (int32_t i = 0; i < nk; i++) {
            int32_t j = keep[i];
            if (j == i) continue;
            memcpy(h->k + i * hd, h->k + j * hd, hd * 2);
            memcpy(h->v + i * hd, h->v + j * hd, hd * 2);
            h->pos[i] = h->pos[j];
            h->w[i] = h->w[j];
            if (h->acc) h->acc[i] = h->acc[j];
            if (reindex) rerotate(c, h->k + i * hd, i - j);
        }
        h->n = nk;
        return;
    }
    KVS_ASSERT(!reindex);
    /* merged blends, one row per kept target that receives anything */
    int32_t *slot = malloc(sizeof(int32_t) * (size_t)(n ? n : 1));
    KVS_ASSERT(slot);
    int32_t n_t = 0;
    for (int32_t j = 0; j < n; j++) slot[j] = -1;
    if (merges)
        for (int32_t j = 0; j < n; j++)
            if (mt[j] >= 0 && slot[mt[j]] < 0) slot[mt[j]] = n_t++;
    float *mk = malloc(sizeof(float) * (size_t)(n_t ? n_t : 1) * hd * 2), *mv = mk + (size_t)n_t * hd;
    float *mw = malloc(sizeof(float) * (size_t)(n_t ? n_t : 1) * 3), *ma = mw + n_t, *nrm = ma + n_t;
    KVS_ASSERT(mk && mw);
    float x[512], y[512];
    for (int32_t j = 0; j < n && n_t; j++) {
        if (slot[j] < 0) continue;
        float *K = mk + (size_t)slot[j] * hd, *V = mv + (size_t)slot[j] * hd;
        kv_seq_key(s, (int)((h - s->h) / c->n_head_kv), ih, j, x);
        kv_seq_value(s, (int)((h - s->h) / c->n_head_kv), ih, j, y);
        double ss = 0;
        for (size_t d = 0; d < hd; d++) K[d] = mc[j] * x[d], V[d] = mc[j] * y[d], ss += (double)x[d] * x[d];
        nrm[slot[j]] = (float)sqrt(ss);
        mw[slot[j]] = h->w[j];
        ma[slot[j]] = h->acc ? h->acc[j] : 0.0f;
    }
    for (int32_t e = 0; e < n && n_t; e++) {
        if (mt[e] < 0) continue;
        int32_t t = slot[mt[e]];
        float *K = mk + (size_t)t * hd, *V = mv + (size_t)t * hd;
        kv_seq_key(s, (int)((h - s->h) / c->n_head_kv), ih, e, x);
        kv_seq_value(s, (int)((h - s->h) / c->n_head_kv), ih, e, y);
        for (size_t d = 0; d < hd; d++) K[d] += mc[e] * x[d], V[d] += mc[e] * y[d];
        mw[t] += h->w[e];
        if (h->acc) ma[t] += h->acc[e];
    }
    if (plan->renorm)
        for (int32_t t = 0; t < n_t; t++) {
            float *K = mk + (size_t)t * hd;
            double ss = 0;
            for (size_t d = 0; d < hd; d++) ss += (double)K[d] * K[d];
            float f = ss > 0 ? (float)(nrm[t] / sqrt(ss)) : 1.0f;
            for (size_t d = 0; d < hd; d++) K[d] *= f;
        }
    /* the new order: kept packed entries that stay packed, then demoted ones, then hot ones */
    uint8_t *keepc = calloc((size_t)(nc ? nc : 1), 1);
    int32_t *order = malloc(sizeof(int32_t) * (size_t)(nk ? nk : 1) * 3);
    KVS_ASSERT(keepc && order);
    int32_t *o_pk = order, *o_dm = order + nk, *o_hot = order + 2 * nk, n_pk = 0, n_dm = 0, n_hot = 0;
    for (int32_t i = 0; i < nk; i++) {
        int32_t j = keep[i];
        if (j < nc && slot[j] < 0) keepc[j] = 1, o_pk[n_pk++] = j;
        else if (j >= nc && dem && dem[j] && slot[j] < 0) o_dm[n_dm++] = j;
        else o_hot[n_hot++] = j;
    }
    g_sort_pos = h->pos;
    qsort(o_hot, (size_t)n_hot, sizeof *o_hot, cmp_by_pos); /* promoted merge targets among them */
    /* new metadata and hot rows, built aside */
    int32_t *npos = malloc(sizeof(int32_t) * (size_t)(nk ? nk : 1));
    float *nw = malloc(sizeof(float) * (size_t)(nk ? nk : 1) * 2), *nacc = nw + (nk ? nk : 1);
    uint16_t *nkr = malloc((size_t)(n_hot ? n_hot : 1) * hd * 2 * 2), *nvr = nkr + (size_t)(n_hot ? n_hot : 1) * hd;
    KVS_ASSERT(npos && nw && nkr);
    int32_t r = 0;
    #define META(j_) do { int32_t jj = (j_); npos[r] = h->pos[jj]; \
        nw[r] = slot[jj] >= 0 ? mw[slot[jj]] : h->w[jj]; \
        nacc[r] = slot[jj] >= 0 ? ma[slot[jj]] : h->acc ? h->acc[jj] : 0.0f; r++; } while (0)
    for (int32_t i = 0; i < n_pk; i++) META(o_pk[i]);
    for (int32_t i = 0; i < n_dm; i++) META(o_dm[i]);
    for (int32_t i = 0; i < n_hot; i++) {
        int32_t j = o_hot[i];
        META(j);
        if (slot[j] >= 0) {
            quant_f32_to_f16_row(mk + (size_t)slot[j] * hd, nkr + (size_t)i * hd, (int)hd);
            quant_f32_to_f16_row(mv + (size_t)slot[j] * hd, nvr + (size_t)i * hd, (int)hd);
        } else {
            memcpy(nkr + (size_t)i * hd, h->k + (size_t)(j - nc) * hd, hd * 2);
            memcpy(nvr + (size_t)i * hd, h->v + (size_t)(j - nc) * hd, hd * 2);
        }
    }
    #undef META
    /* packed run: compact the kept packed entries, then append the demoted ones */
    if (nc) {
        if (s->pack.f.kfmt == KV_K_BLK) blk_compact(s, h, keepc);
        int32_t w_ = 0;
        for (int32_t j = 0; j < nc; j++)
            if (keepc[j]) move_row(s, h, w_++, j);
    }
    if (n_dm) {
        KVS_ASSERT(s->pack.on && s->pack.f.kfmt != KV_K_BLK);
        int32_t rcap = n_pk + n_dm > h->rcap ? pad(n_pk + n_dm) : h->rcap;
        KVS_ASSERT(head_resize4(s, h, h->cap, h->hcap, rcap, h->bcap));
        for (int32_t i = 0; i < n_dm; i++) {
            int32_t j = o_dm[i];
            quant_f16_to_f32_row(h->k + (size_t)(j - nc) * hd, x, (int)hd);
            quant_f16_to_f32_row(h->v + (size_t)(j - nc) * hd, y, (int)hd);
            put_row(s, h, n_pk + i, x, y);
        }
    }
    /* merge targets promoted from the packed run can make the hot run longer than before */
    if (n_hot > h->hcap) KVS_ASSERT(head_resize4(s, h, h->cap, pad(n_hot), h->rcap, h->bcap));
    KVS_ASSERT(n_hot <= h->hcap && nk <= h->cap);
    memcpy(h->pos, npos, sizeof(int32_t) * (size_t)nk);
    memcpy(h->w, nw, sizeof(float) * (size_t)nk);
    if (h->acc) memcpy(h->acc, nacc, sizeof(float) * (size_t)nk);
    memcpy(h->k, nkr, (size_t)n_hot * hd * 2);
    memcpy(h->v, nvr, (size_t)n_hot * hd * 2);
    h->n = nk;
    h->nc = n_pk + n_dm;
    free(slot), free(mk), free(mw), free(keepc), free(order), free(npos), free(nw), free(nkr);
}

void kv_seq_apply_plan(struct kv_seq *s, int il, const struct kv_plan *plan, bool reindex) {
    KVS_ASSERT(!reindex || (s->owner->rope_inv_freq && s->owner->head_dim <= 512));
    for (int ih = 0; ih < s->owner->n_head_kv; ih++) apply_head(s, kv_seq_head(s, il, ih), plan, ih, reindex);
    kv_seq_fit(s, il);
}

void kv_seq_view(const struct kv_seq *s, int il, struct kv_view *out) {
    KVS_ASSERT(s->owner->n_head_kv <= KV_VIEW_MAX_HEADS);
    out->n_head_kv = s->owner->n_head_kv;
    out->head_dim = s->owner->head_dim;
    out->gate_tau = s->gate_tau;
    out->gate_win = s->gate_win;
    for (int ih = 0; ih < s->owner->n_head_kv; ih++) {
        const struct kv_head_store *h = kv_seq_head(s, il, ih);
        out->h[ih] = (struct kv_view_head){
            .n = h->n, .nc = h->nc, .k = h->k, .v = h->v, .pos = h->pos,
            .w = s->owner->weighted ? h->w : NULL, .acc = s->acc_learned ? NULL : h->acc, .fmt = &s->pack.f,
            .ck = h->ck, .cks = h->cks, .ckm = h->ckm, .blk_n = h->blk_n, .nblk = h->nblk,
            .cv = h->cv, .cvs = h->cvs, .cvm = h->cvm, .ch = h->ch, .bal = h->bal,
            .mu = h->bal ? h->bal + s->owner->head_dim : NULL,
            .gate = s->gate_w && s->acc_learned ? h->acc : NULL};
    }
}

uint64_t kv_seq_bytes(const struct kv_seq *s) {
    const struct kv_cache *c = s->owner;
    uint64_t b = qwin_bytes(c) + kv_seq_gate_bytes(s);
    for (int i = 0; i < c->n_layer * c->n_head_kv; i++) b += head_bytes(s, &s->h[i], true);
    return b;
}

uint64_t kv_seq_payload_bytes(const struct kv_seq *s) {
    const struct kv_cache *c = s->owner;
    uint64_t b = 0;
    for (int i = 0; i < c->n_layer * c->n_head_kv; i++) b += head_bytes(s, &s->h[i], false);
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
        if (h->n < 0 || h->n > h->cap || h->cap % KV_CAP_STEP != 0 || h->nc < 0 || h->nc > h->n ||
            h->n - h->nc > h->hcap || h->nc > (s->pack.on ? h->rcap : 0))
            return kvs_fail(KVS_ERR_INTERNAL, "kv: head %d holds %d (%d packed) of %d", i, h->n,
                            h->nc, h->cap), false;
        for (int j = h->nc + 1; j < h->n; j++)
            if (h->pos[j] <= h->pos[j - 1])
                return kvs_fail(KVS_ERR_INTERNAL, "kv: head %d positions not ascending at %d", i,
                                j), false;
        if (s->pack.on && s->pack.f.kfmt == KV_K_BLK) {
            int32_t t = 0;
            for (int b = 0; b < h->nblk; b++) t += h->blk_n[b];
            if (t != h->nc) return kvs_fail(KVS_ERR_INTERNAL, "kv: head %d blocks hold %d of %d",
                                            i, t, h->nc), false;
        }
    }
    return true;
}

/* ---- configuration ------------------------------------------------------------------------- */

void kv_pack_cfg_from_spec(const struct kv_spec *sp, int hd, struct kv_pack_cfg *o) {
    memset(o, 0, sizeof *o);
    o->think = sp->think;
    o->kivi = sp->kivi_bits > 0;
    o->mikv = sp->mikv_low > 0;
    o->on = o->think || o->kivi || o->mikv;
    if (!o->on) return;
    o->prune = sp->think_prune;
    o->think_recent = sp->think_recent;
    o->resid = sp->kivi_resid;
    o->balance = o->mikv && sp->mikv_balance;
    struct kv_packed_fmt *f = &o->f;
    f->kd = hd;
    if (o->think) { /* prune floor(prune * hd) channels, kept count rounded up to 8 */
        int kd = hd - (int)(sp->think_prune * hd);
        kd = (kd + 7) / 8 * 8;
        f->kd = kd > hd ? hd : kd;
    }
    if (o->kivi) {
        f->kfmt = KV_K_BLK, f->vfmt = KV_V_TOK;
        f->kbits = f->vbits = sp->kivi_bits;
        f->G = sp->kivi_group;
        f->kstride = kvq_code_bytes(f->kbits, f->G);
        f->vstride = kvq_code_bytes(f->vbits, hd);
    } else if (o->mikv) {
        f->kfmt = KV_K_TOK, f->vfmt = KV_V_TOK;
        f->kbits = f->vbits = sp->mikv_low;
        f->kstride = kvq_code_bytes(f->kbits, f->kd);
        f->vstride = kvq_code_bytes(f->vbits, hd);
    } else {
        f->kfmt = KV_K_F16, f->vfmt = KV_V_F16;
    }
    /* KIVI: values per token in groups of G channels (when G divides head_dim); MiKV: per token */
    f->vgs = o->kivi && hd % f->G == 0 && f->G < hd ? f->G : hd;
}

double kv_pack_entry_bytes(const struct kv_pack_cfg *pc, int hd) {
    if (!pc->on) return (double)kv_entry_payload_bytes(hd);
    double b = (double)vrow_bytes(pc, hd) + (double)krow_bytes(pc) + sizeof(int32_t) + sizeof(float);
    if (pc->f.kfmt == KV_K_BLK) b += (double)blk_bytes(pc) / pc->f.G;
    return b;
}

void kv_seq_copy_queries(struct kv_seq *dst, const struct kv_seq *src) {
    const struct kv_cache *dc = dst->owner, *sc = src->owner;
    if (!dc->qwin || !dst->q) return;
    size_t qsz = (size_t)dc->n_head * dc->head_dim;
    for (int il = 0; il < dc->n_layer; il++) {
        dst->q_n[il] = dst->q_head[il] = 0;
        int nq = sc->qwin && src->q ? src->q_n[il] : 0;
        if (nq > dc->qwin) nq = dc->qwin;
        for (int qi = 0; qi < nq; qi++) {
            int slot = (src->q_head[il] - nq + qi + sc->qwin) % sc->qwin;
            kv_seq_save_query(dst, il, src->q_pos[il * sc->qwin + slot],
                              src->q + ((size_t)il * sc->qwin + slot) * qsz);
        }
    }
}

void kv_seq_drop_queries(struct kv_seq *s) {
    if (s->q && s->q_pos && s->q_n && s->q_head) account(s->owner, -(int64_t)qwin_bytes(s->owner));
    free(s->q), free(s->q_pos), free(s->q_n), free(s->q_head);
    s->q = NULL, s->q_pos = NULL, s->q_n = NULL, s->q_head = NULL;
}

/* first index in [lo, hi) of head h whose position is >= pos (hi if none) */
static int32_t lower_pos(const struct kv_head_store *h, int32_t lo, int32_t hi, int32_t pos) {
    while (lo < hi) {
        int32_t mid = (lo + hi) / 2;
        if (h->pos[mid] < pos) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

enum kvs_status kv_seq_append_range(struct kv_seq *dst, const struct kv_seq *src, int il, int32_t from,
                                    int32_t delta) {
    const struct kv_cache *c = src->owner;
    size_t hd = (size_t)c->head_dim;
    for (int ih = 0; ih < c->n_head_kv; ih++) {
        const struct kv_head_store *a = kv_seq_head(src, il, ih);
        int32_t lo = lower_pos(a, 0, a->n, from);
        int32_t n = a->n - lo;
        struct kv_head_store *b = kv_seq_head(dst, il, ih);
        if (b->n && n && b->pos[b->n - 1] >= a->pos[lo] + delta)
            return kvs_fail(KVS_ERR_INVALID_ARG, "positions would not ascend");
        if (n && a->pos[lo] + delta < 0)
            return kvs_fail(KVS_ERR_INVALID_ARG, "a position would be negative");
        if (b->n + n > b->cap || b->n - b->nc + n > b->hcap) {
            int32_t cap = b->n + n > b->cap ? pad(b->n + n) : b->cap;
            int32_t hcap = b->n - b->nc + n > b->hcap ? pad(b->n - b->nc + n) : b->hcap;
            if (!head_resize4(dst, b, cap, hcap, b->rcap, b->bcap))
                return kvs_fail(KVS_ERR_NOMEM, "out of memory for the KV cache");
        }
        if (!n) continue; /* nothing from this head (memcpy of NULL, 0 is undefined) */
        int32_t r = b->n - b->nc;
        /* packed entries: dequantised, turned by delta in float, rounded to fp16 once */
        int32_t np = a->nc > lo ? a->nc - lo : 0;
        for (int32_t j = 0; j < np; j++) {
            float x[512];
            kv_seq_key(src, il, ih, lo + j, x);
            if (delta) rotate_f32(c, x, delta);
            quant_f32_to_f16_row(x, b->k + (size_t)(r + j) * hd, (int)hd);
            kv_seq_value(src, il, ih, lo + j, x);
            quant_f32_to_f16_row(x, b->v + (size_t)(r + j) * hd, (int)hd);
        }
        int32_t ra = lo + np - a->nc, nh = n - np;
        if (nh) {
            memcpy(b->k + (size_t)(r + np) * hd, a->k + (size_t)ra * hd, (size_t)nh * hd * 2);
            memcpy(b->v + (size_t)(r + np) * hd, a->v + (size_t)ra * hd, (size_t)nh * hd * 2);
        }
        memcpy(b->pos + b->n, a->pos + lo, (size_t)n * 4);
        memcpy(b->w + b->n, a->w + lo, (size_t)n * 4);
        if (delta) { /* moved to other positions: RoPE keys turned by the shift */
            for (int32_t j = 0; j < n; j++) b->pos[b->n + j] += delta;
            for (int32_t j = np; j < n; j++) rerotate(c, b->k + (size_t)(r + j) * hd, delta);
        }
        if (b->acc) memset(b->acc + b->n, 0, (size_t)n * 4);
        b->n += n;
    }
    return KVS_OK;
}

/* ---- wire form of one head (chunk records, prefix.c) --------------------------------------- */

enum { WIRE_CH = 1, WIRE_BAL = 2 };

/* bytes of each packed array of a head holding nc packed entries in nblk blocks */
struct wire_sizes { size_t ck, cks, blk, cv, cvs; };
static struct wire_sizes wire_sizes(const struct kv_pack_cfg *pc, int hd, int32_t nc, int32_t nblk) {
    const struct kv_packed_fmt *f = &pc->f;
    struct wire_sizes z = {0};
    if (!nc) return z;
    if (f->kfmt == KV_K_F16) z.ck = (size_t)nc * f->kd * 2;
    else if (f->kfmt == KV_K_TOK) z.ck = (size_t)nc * f->kstride, z.cks = (size_t)nc * 2;
    else z.ck = (size_t)nblk * f->kd * f->kstride, z.cks = (size_t)nblk * f->kd * 2, z.blk = (size_t)nblk * 4;
    if (f->vfmt == KV_V_F16) z.cv = (size_t)nc * hd * 2;
    else z.cv = (size_t)nc * f->vstride, z.cvs = (size_t)nc * vgroups(pc, hd) * 2;
    return z;
}

size_t kv_head_wire_bytes(const struct kv_seq *s, int il, int ih) {
    const struct kv_head_store *h = kv_seq_head(s, il, ih);
    size_t hd = (size_t)s->owner->head_dim;
    struct wire_sizes z = wire_sizes(&s->pack, (int)hd, h->nc, h->nblk);
    return 16 + (size_t)h->n * 8 + (size_t)(h->n - h->nc) * hd * 4 + z.ck + 2 * z.cks + z.blk + z.cv +
           2 * z.cvs + (h->ch ? (size_t)s->pack.f.kd : 0) + (h->bal ? 2 * hd * 4 : 0);
}

static void wput(uint8_t **w, const void *p, size_t n) {
    if (n) memcpy(*w, p, n);
    *w += n;
}

void kv_head_wire_write(const struct kv_seq *s, int il, int ih, uint8_t *w) {
    const struct kv_head_store *h = kv_seq_head(s, il, ih);
    size_t hd = (size_t)s->owner->head_dim;
    struct wire_sizes z = wire_sizes(&s->pack, (int)hd, h->nc, h->nblk);
    uint32_t hdr[4] = {(uint32_t)h->n, (uint32_t)h->nc, (uint32_t)h->nblk,
                       (h->ch ? WIRE_CH : 0) | (h->bal ? WIRE_BAL : 0)};
    wput(&w, hdr, 16);
    wput(&w, h->pos, (size_t)h->n * 4);
    wput(&w, h->w, (size_t)h->n * 4);
    wput(&w, h->k, (size_t)(h->n - h->nc) * hd * 2);
    wput(&w, h->v, (size_t)(h->n - h->nc) * hd * 2);
    wput(&w, h->blk_n, z.blk);
    wput(&w, h->ck, z.ck);
    wput(&w, h->cks, z.cks);
    wput(&w, h->ckm, z.cks);
    wput(&w, h->cv, z.cv);
    wput(&w, h->cvs, z.cvs);
    wput(&w, h->cvm, z.cvs);
    if (h->ch) wput(&w, h->ch, (size_t)s->pack.f.kd);
    if (h->bal) wput(&w, h->bal, 2 * hd * 4);
}

static bool halves_finite(const uint8_t *p, size_t bytes) {
    for (size_t i = 0; i + 1 < bytes; i += 2) {
        uint16_t x;
        memcpy(&x, p + i, 2);
        if ((x & 0x7c00) == 0x7c00) return false;
    }
    return true;
}

enum kvs_status kv_head_wire_read(struct kv_seq *s, int il, int ih, const uint8_t *r, size_t avail,
                                  int32_t lo, int32_t hi, size_t *used) {
    struct kv_head_store *h = kv_seq_head(s, il, ih);
    const struct kv_pack_cfg *pc = &s->pack;
    const struct kv_packed_fmt *f = &pc->f;
    size_t hd = (size_t)s->owner->head_dim;
    KVS_ASSERT(h->n == 0 && !h->ch && !h->bal);
    uint32_t hdr[4];
    if (avail < 16) return kvs_fail(KVS_ERR_FORMAT, "layer %d head %d: truncated", il, ih);
    memcpy(hdr, r, 16);
    int32_t n = (int32_t)hdr[0], nc = (int32_t)hdr[1], nblk = (int32_t)hdr[2];
    uint32_t flags = hdr[3];
    if (hdr[0] > (uint32_t)(hi - lo) || hdr[1] > hdr[0] || hdr[2] > hdr[1] ||
        (flags & ~(uint32_t)(WIRE_CH | WIRE_BAL)) || (nc && !pc->on) ||
        ((flags & WIRE_CH) && !pc->think) || ((flags & WIRE_BAL) && !pc->mikv) ||
        (nc && pc->think && !(flags & WIRE_CH)) || (nc && pc->mikv && !(flags & WIRE_BAL)) ||
        (f->kfmt == KV_K_BLK ? (nc > 0) != (nblk > 0) : nblk != 0))
        return kvs_fail(KVS_ERR_FORMAT, "layer %d head %d: bad entry counts or storage flags", il, ih);
    struct wire_sizes z = wire_sizes(pc, (int)hd, nc, nblk);
    size_t nch = (flags & WIRE_CH) ? (size_t)f->kd : 0, nbal = (flags & WIRE_BAL) ? 2 * hd * 4 : 0;
    size_t need = 16 + (size_t)n * 8 + (size_t)(n - nc) * hd * 4 + z.ck + 2 * z.cks + z.blk + z.cv +
                  2 * z.cvs + nch + nbal;
    if (avail < need) return kvs_fail(KVS_ERR_FORMAT, "layer %d head %d: truncated", il, ih);
    const uint8_t *p = r + 16;
    const uint8_t *pos = p, *w = pos + (size_t)n * 4, *k = w + (size_t)n * 4,
                  *v = k + (size_t)(n - nc) * hd * 2, *blk = v + (size_t)(n - nc) * hd * 2,
                  *ck = blk + z.blk, *cks = ck + z.ck, *ckm = cks + z.cks, *cv = ckm + z.cks,
                  *cvs = cv + z.cv, *cvm = cvs + z.cvs, *ch = cvm + z.cvs, *bal = ch + nch;
    for (int32_t j = 0; j < n; j++) {
        int32_t pj, pp;
        float wj;
        memcpy(&pj, pos + (size_t)j * 4, 4);
        memcpy(&wj, w + (size_t)j * 4, 4);
        if (j) memcpy(&pp, pos + (size_t)(j - 1) * 4, 4);
        if (pj < lo || pj >= hi || (j && pj <= pp) || !(wj > 0) || wj > 1e6f)
            return kvs_fail(KVS_ERR_FORMAT, "layer %d head %d: bad position or weight", il, ih);
    }
    if (!halves_finite(k, (size_t)(n - nc) * hd * 4) || !halves_finite(cks, 2 * z.cks) ||
        !halves_finite(cvs, 2 * z.cvs) || (f->kfmt == KV_K_F16 && !halves_finite(ck, z.ck)) ||
        (f->vfmt == KV_V_F16 && !halves_finite(cv, z.cv)))
        return kvs_fail(KVS_ERR_FORMAT, "layer %d head %d: a key, value or scale is not finite", il, ih);
    int64_t tot = 0;
    for (int32_t b = 0; b < nblk; b++) {
        int32_t x;
        memcpy(&x, blk + (size_t)b * 4, 4);
        if (x < 1 || x > f->G) return kvs_fail(KVS_ERR_FORMAT, "layer %d head %d: bad block", il, ih);
        tot += x;
    }
    if (f->kfmt == KV_K_BLK && tot != nc)
        return kvs_fail(KVS_ERR_FORMAT, "layer %d head %d: blocks hold %lld entries, not %d", il,
                        ih, (long long)tot, nc);
    for (size_t c = 1; c < nch; c++)
        if (ch[c] <= ch[c - 1]) return kvs_fail(KVS_ERR_FORMAT, "layer %d head %d: bad channels", il, ih);
    if (nch && ch[nch - 1] >= hd) return kvs_fail(KVS_ERR_FORMAT, "layer %d head %d: bad channels", il, ih);
    for (size_t c = 0; c < nbal / 4; c++) {
        float x;
        memcpy(&x, bal + c * 4, 4);
        if (!isfinite(x) || (c < hd && !(x >= 1e-3f && x <= 1e3f)))
            return kvs_fail(KVS_ERR_FORMAT, "layer %d head %d: bad key transform", il, ih);
    }
    /* valid: fill the head (capacity through head_resize4, so the accounting stays exact) */
    if (!head_resize4(s, h, n ? pad(n) : 0, n - nc ? pad(n - nc) : 0, pc->on && nc ? pad(nc) : 0,
                      f->kfmt == KV_K_BLK && nblk ? pad_blk(nblk) : 0))
        return kvs_fail(KVS_ERR_NOMEM, "out of memory for the KV cache");
    if (nch) kv_seq_set_channels(s, il, ih, ch);
    if (nbal) {
        float b2[1024];
        memcpy(b2, bal, nbal);
        kv_seq_set_balance(s, il, ih, b2, b2 + hd);
    }
    if (n) {
        memcpy(h->pos, pos, (size_t)n * 4);
        memcpy(h->w, w, (size_t)n * 4);
    }
    if (n - nc) {
        memcpy(h->k, k, (size_t)(n - nc) * hd * 2);
        memcpy(h->v, v, (size_t)(n - nc) * hd * 2);
    }
    if (h->acc && n) memset(h->acc, 0, (size_t)n * 4);
    if (nc) {
        memcpy(h->ck, ck, z.ck);
        memcpy(h->cv, cv, z.cv);
        if (z.cks) memcpy(h->cks, cks, z.cks), memcpy(h->ckm, ckm, z.cks);
        if (z.cvs) memcpy(h->cvs, cvs, z.cvs), memcpy(h->cvm, cvm, z.cvs);
        if (z.blk) memcpy(h->blk_n, blk, z.blk);
    }
    h->n = n, h->nc = nc, h->nblk = nblk;
    *used = need;
    return KVS_OK;
}

int kv_seq_overwrite(struct kv_seq *s, int il, int32_t pos, const float *k, const float *v) {
    int hd = s->owner->head_dim, done = 0;
    for (int ih = 0; ih < s->owner->n_head_kv; ih++) {
        struct kv_head_store *h = kv_seq_head(s, il, ih);
        int32_t lo = lower_pos(h, h->nc, h->n, pos);
        if (lo == h->n || h->pos[lo] != pos) continue; /* evicted from this head */
        int32_t r = lo - h->nc;
        quant_f32_to_f16_row(k + (size_t)ih * hd, h->k + (size_t)r * hd, hd);
        quant_f32_to_f16_row(v + (size_t)ih * hd, h->v + (size_t)r * hd, hd);
        done++;
    }
    return done;
}

double kv_seq_value_dev(const struct kv_seq *s, int il, int32_t pos, const float *v) {
    int hd = s->owner->head_dim;
    double d = 0;
    for (int ih = 0; ih < s->owner->n_head_kv; ih++) {
        const struct kv_head_store *h = kv_seq_head(s, il, ih);
        int32_t lo = lower_pos(h, h->nc, h->n, pos);
        if (lo == h->n || h->pos[lo] != pos) continue;
        const uint16_t *old = h->v + (size_t)(lo - h->nc) * hd;
        for (int i = 0; i < hd; i++) {
            /* against the value as it would be stored (fp16) */
            double e = (double)quant_f16_to_f32(quant_f32_to_f16(v[(size_t)ih * hd + i])) -
                       quant_f16_to_f32(old[i]);
            d += e * e;
        }
    }
    return d;
}

bool kv_seq_packed_at(const struct kv_seq *s, int32_t pos) {
    const struct kv_cache *c = s->owner;
    for (int i = 0; i < c->n_layer * c->n_head_kv; i++) {
        const struct kv_head_store *h = &s->h[i];
        int32_t lo = lower_pos(h, 0, h->nc, pos);
        if (lo < h->nc && h->pos[lo] == pos) return true;
    }
    return false;
}

void kv_seq_set_learned_last(struct kv_seq *s, int il, const float *score) {
    KVS_ASSERT(s->acc_learned);
    for (int ih = 0; ih < s->owner->n_head_kv; ih++) {
        struct kv_head_store *h = kv_seq_head(s, il, ih);
        KVS_ASSERT(h->acc && h->n > 0);
        h->acc[h->n - 1] = score[ih];
    }
}
