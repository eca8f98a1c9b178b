/* prefix.c — shared prefix nodes (kvsieve.h, "serving"): read-only runs of KV entries that many
 * sequences start from.
 *
 * A node holds, in a store of its own (no statistic slots, no saved queries), the entries of
 * the tokens [n0, n1) and references its parent, which covers [0, n0): a chain of nodes, root
 * first, is a prefix. A node never changes after it is made; its per-layer views are built once.
 * A sequence started from a chain keeps the chain's nodes (root first) and, per layer, points
 * its view's shared segments at their view heads (prefix_view): attention reads the chain in
 * place, then the sequence's own runs. The sequence's policy plans only its own store, so
 * compressing a sequence never touches a shared node (DESIGN.md §3: "compress the private part
 * only"). Reference counts are plain integers: every call is made from the thread that runs the
 * context (the server's inference thread).
 */
#include "engine.h"

#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

struct kvs_prefix {
    const kvs_context *c;
    struct kvs_prefix *parent;
    int depth;          /* nodes in the chain ending here */
    int32_t n0, n1;     /* tokens covered: [n0, n1); the chain covers [0, n1) */
    int32_t nsh_max;    /* most entries one head of one layer holds over the whole chain */
    struct kv_seq *kv;
    struct kv_view *views; /* (n_layer) */
    int refs;
    uint64_t checksum;
    bool chunk;         /* a standalone chunk ([n0, n1) without the chain before it): placed,
                         * never attached */
};

static uint64_t node_checksum(const struct kv_seq *s) {
    const struct kv_cache *c = s->owner;
    XXH64_state_t *st = XXH64_createState();
    if (!st) return 0;
    XXH64_reset(st, 0);
    size_t hd = (size_t)c->head_dim;
    for (int i = 0; i < c->n_layer * c->n_head_kv; i++) {
        const struct kv_head_store *h = &s->h[i];
        int32_t nh = h->n - h->nc;
        XXH64_update(st, &h->n, sizeof h->n);
        XXH64_update(st, h->pos, (size_t)h->n * 4);
        XXH64_update(st, h->w, (size_t)h->n * 4);
        XXH64_update(st, h->k, (size_t)nh * hd * 2);
        XXH64_update(st, h->v, (size_t)nh * hd * 2);
        /* packed entries (a compressed node): their bytes, whatever the format */
        if (h->nc) {
            const struct kv_packed_fmt *f = &s->pack.f;
            size_t kb = f->kfmt == KV_K_BLK ? (size_t)h->nblk * f->kd * f->kstride
                        : f->kfmt == KV_K_TOK ? (size_t)h->nc * f->kstride
                                              : (size_t)h->nc * f->kd * 2;
            size_t vb = f->vfmt == KV_V_TOK ? (size_t)h->nc * f->vstride : (size_t)h->nc * hd * 2;
            XXH64_update(st, h->ck, kb);
            XXH64_update(st, h->cv, vb);
        }
    }
    uint64_t x = XXH64_digest(st);
    XXH64_freeState(st);
    return x;
}

/* The node's store is final: fit it, build its views and checksum. */
static enum kvs_status node_finish(kvs_context *c, struct kvs_prefix *p) {
    const struct hparams *hp = &c->m->hp;
    p->views = calloc((size_t)hp->n_layer, sizeof *p->views);
    if (!p->views) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    int32_t own_max = 0;
    for (int il = 0; il < hp->n_layer; il++) {
        kv_seq_fit(p->kv, il);
        kv_seq_view(p->kv, il, &p->views[il]);
        for (int ih = 0; ih < hp->n_head_kv; ih++) {
            p->views[il].h[ih].acc = NULL; /* read-only */
            if (p->views[il].h[ih].n > own_max) own_max = p->views[il].h[ih].n;
        }
    }
    p->nsh_max = own_max + (p->parent ? p->parent->nsh_max : 0);
    p->depth = 1 + (p->parent ? p->parent->depth : 0);
    p->checksum = node_checksum(p->kv);
    p->refs = 1;
    return KVS_OK;
}

static void node_free(struct kvs_prefix *p) {
    if (!p) return;
    kv_seq_free(p->kv);
    free(p->views);
    free(p);
}

static enum kvs_status node_new(kvs_context *c, struct kvs_prefix **out) {
    struct kvs_prefix *p = calloc(1, sizeof *p);
    if (!p) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    enum kvs_status st = kv_seq_new(&c->kv, &p->kv);
    if (st != KVS_OK) {
        free(p);
        return st;
    }
    kv_seq_set_acc(p->kv, false);
    kv_seq_drop_queries(p->kv);
    p->c = c;
    *out = p;
    return KVS_OK;
}

/* s's own entries for positions [from, n_past) are every token, fp16, unmerged, at their
 * absolute positions, in every layer and head. */
static bool seq_exact_from(const kvs_sequence *s, int32_t from) {
    const struct kv_cache *kc = s->kv->owner;
    if (s->pos_shift) return false;
    for (int i = 0; i < kc->n_layer * kc->n_head_kv; i++) {
        const struct kv_head_store *h = &s->kv->h[i];
        int32_t want = s->n_past - from;
        if (h->n - h->nc < want) return false;
        int32_t j0 = h->n - want;
        if (want > 0 && (h->pos[j0] != from || h->pos[h->n - 1] != s->n_past - 1)) return false;
        for (int32_t j = j0; j < h->n; j++)
            if (h->w[j] != 1.0f) return false;
    }
    return true;
}

enum kvs_status kvs_prefix_publish(kvs_context *c, const kvs_sequence *s, kvs_prefix *parent,
                                   kvs_prefix **out) {
    *out = NULL;
    if (!c || !s || c->seqs[s->slot] != s)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_prefix_publish: the sequence does not belong to "
                        "this context");
    if (parent && parent->c != c)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_prefix_publish: the parent belongs to another "
                        "context");
    if (parent && parent->chunk)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_prefix_publish: a chunk node cannot be a parent");
    /* parent must be s's chain end or a descendant of it (covering a prefix of s) */
    const struct kvs_prefix *q = parent;
    while (q && q != s->prefix && q->n1 > s->n_prefix) q = q->parent;
    if (q != s->prefix || (parent && parent->n1 < s->n_prefix))
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_prefix_publish: the parent is not a prefix of "
                        "the sequence's content");
    int32_t n0 = parent ? parent->n1 : 0;
    if (n0 >= s->n_past)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_prefix_publish: no tokens after the parent (%d "
                        "of %d)", n0, s->n_past);
    if (!seq_exact_from(s, n0))
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_prefix_publish: the sequence's entries from "
                        "token %d are not exact (its policy evicted, merged or packed some; feed "
                        "prefix chunks with .hold)", n0);
    struct kvs_prefix *p;
    enum kvs_status st = node_new(c, &p);
    if (st != KVS_OK) return st;
    for (int il = 0; il < c->m->hp.n_layer && st == KVS_OK; il++)
        st = kv_seq_append_range(p->kv, s->kv, il, n0, 0);
    p->parent = parent;
    p->n0 = n0;
    p->n1 = s->n_past;
    if (st == KVS_OK) st = node_finish(c, p);
    if (st != KVS_OK) {
        p->parent = NULL;
        node_free(p);
        return st;
    }
    if (parent) parent->refs++;
    *out = p;
    return KVS_OK;
}

enum kvs_status kvs_prefix_compress(kvs_context *c, const kvs_sequence *s, const char *kv_spec,
                                    kvs_prefix **out) {
    *out = NULL;
    if (!c || !s || c->seqs[s->slot] != s)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_prefix_compress: the sequence does not belong "
                        "to this context");
    if (s->n_past == 0)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_prefix_compress: the sequence is empty");
    if (!seq_exact_from(s, s->n_prefix))
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_prefix_compress: the sequence's entries are not "
                        "exact (feed the prefix with .hold)");
    struct kv_spec spec;
    enum kvs_status st = kv_spec_parse(kv_spec ? kv_spec : "", &spec);
    if (st != KVS_OK) return st;
    if (spec.reindex && spec.method == KV_STREAMING)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_prefix_compress: '%s' moves positions "
                        "(pos=cache); use pos=abs for a shared prefix", spec.text);
    /* the whole chain and s's own entries, flattened into a temporary sequence with s's saved
     * queries (the scorers that read recent queries see the prefix's own last ones) */
    kvs_sequence tmp = {.slot = -1, .prof = &c->base, .n_past = s->n_past};
    st = kv_seq_new(&c->kv, &tmp.kv);
    if (st != KVS_OK) return st;
    kv_seq_set_acc(tmp.kv, false);
    const struct kvs_prefix *chain[4096];
    int depth = 0;
    for (const struct kvs_prefix *q = s->prefix; q && depth < 4096; q = q->parent) chain[depth++] = q;
    for (int il = 0; il < c->m->hp.n_layer && st == KVS_OK; il++) {
        for (int k = depth - 1; k >= 0 && st == KVS_OK; k--)
            st = kv_seq_append_range(tmp.kv, chain[k]->kv, il, chain[k]->n0, 0);
        if (st == KVS_OK) st = kv_seq_append_range(tmp.kv, s->kv, il, s->n_prefix, 0);
    }
    if (st == KVS_OK) {
        kv_seq_copy_queries(tmp.kv, s->kv);
        st = kvs_seq_compress(c, &tmp, spec.text);
    }
    struct kvs_prefix *p = NULL;
    if (st == KVS_OK) st = node_new(c, &p);
    if (st != KVS_OK) {
        kv_seq_free(tmp.kv);
        return st;
    }
    kv_seq_free(p->kv);
    kv_seq_drop_queries(tmp.kv);
    p->kv = tmp.kv;
    p->n0 = 0;
    p->n1 = s->n_past;
    st = node_finish(c, p);
    if (st != KVS_OK) {
        node_free(p);
        return st;
    }
    *out = p;
    return KVS_OK;
}

void kvs_prefix_ref(kvs_prefix *p) {
    if (p) p->refs++;
}

void kvs_prefix_unref(kvs_prefix *p) {
    while (p && --p->refs == 0) {
        struct kvs_prefix *parent = p->parent;
        node_free(p);
        p = parent;
    }
}

int kvs_prefix_n_tokens(const kvs_prefix *p) { return p ? p->n1 : 0; }
uint64_t kvs_prefix_bytes(const kvs_prefix *p) { return p ? kv_seq_payload_bytes(p->kv) : 0; }
int kvs_prefix_refcount(const kvs_prefix *p) { return p ? p->refs : 0; }
uint64_t kvs_prefix_checksum(const kvs_prefix *p) { return p ? node_checksum(p->kv) : 0; }

enum kvs_status kvs_seq_attach_prefix(kvs_context *c, kvs_sequence *s, kvs_prefix *p) {
    if (!c || !s || !p || c->seqs[s->slot] != s)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_attach_prefix: missing prefix, or the "
                        "sequence does not belong to this context");
    if (p->c != c)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_attach_prefix: the prefix belongs to another "
                        "context");
    if (s->n_past || s->prefix)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_attach_prefix: the sequence is not empty");
    if (p->chunk)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_attach_prefix: a chunk node is placed "
                        "(kvs_seq_place_chunk), not attached");
    const struct kv_spec *sp = &s->prof->spec;
    if (sp->method == KV_STREAMING && sp->reindex)
        return kvs_fail(KVS_ERR_INVALID_ARG, "'%s' moves positions (pos=cache), which a shared "
                        "prefix cannot follow; use pos=abs", sp->text);
    /* attention rows hold the chain and the sequence's own entries */
    int64_t own_max = s->prof->max_past == KVS_PAST_MAX ? s->prof->held : c->n_ctx - p->n1;
    if (p->n1 >= s->prof->max_past || (int64_t)p->nsh_max + own_max > c->n_ctx)
        return kvs_fail(KVS_ERR_CONTEXT_FULL, "a prefix of %d tokens leaves no room in the context "
                        "of %d", p->n1, c->n_ctx);
    const int H = c->m->hp.n_head_kv;
    const struct kv_view_head **segs = malloc(sizeof *segs * (size_t)H * (size_t)p->depth);
    struct kvs_prefix **chain = malloc(sizeof *chain * (size_t)p->depth);
    if (!segs || !chain) {
        free(segs), free(chain);
        return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    }
    int k = p->depth;
    for (struct kvs_prefix *q = p; q; q = q->parent) chain[--k] = q;
    free(s->segs), free(s->chain);
    s->segs = segs;
    s->chain = chain;
    s->n_chain = p->depth;
    p->refs++;
    s->prefix = p;
    s->n_prefix = p->n1;
    s->nsh_max = p->nsh_max;
    s->n_past = p->n1;
    return KVS_OK;
}

void kvs_seq_drop_prefix(kvs_sequence *s) {
    if (!s->prefix) return;
    kvs_prefix_unref(s->prefix);
    s->prefix = NULL;
    s->n_prefix = 0;
    s->nsh_max = 0;
    s->n_chain = 0;
}

void prefix_view(const kvs_sequence *s, int il, struct kv_view *v) {
    if (!s->prefix) return;
    for (int ih = 0; ih < v->n_head_kv; ih++) {
        const struct kv_view_head **sg = s->segs + (size_t)ih * s->n_chain;
        int32_t nsh = 0;
        for (int k = 0; k < s->n_chain; k++) {
            sg[k] = &s->chain[k]->views[il].h[ih];
            nsh += sg[k]->n;
        }
        v->h[ih].nsh = nsh;
        v->h[ih].n_seg = s->n_chain;
        v->h[ih].seg = sg;
    }
}

enum kvs_status kvs_seq_place_chunk(kvs_context *c, kvs_sequence *s, const kvs_prefix *chunk) {
    if (!c || !s || !chunk || c->seqs[s->slot] != s)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_place_chunk: missing chunk, or the sequence "
                        "does not belong to this context");
    if (chunk->c != c)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_place_chunk: the chunk belongs to another context");
    int32_t m = chunk->n1 - chunk->n0, delta = s->n_past - chunk->n0;
    if (m > s->prof->max_past - s->n_past)
        return kvs_fail(KVS_ERR_CONTEXT_FULL, "a chunk of %d tokens would exceed the context of %d "
                        "(%d already used)", m, s->prof->max_past, s->n_past);
    if (s->pos_shift)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_place_chunk: the sequence's positions were "
                        "moved (pos=cache)");
    enum kvs_status st = KVS_OK;
    for (int il = 0; il < c->m->hp.n_layer && st == KVS_OK; il++) {
        st = kv_seq_reserve(s->kv, il, m);
        if (st == KVS_OK) st = kv_seq_append_range(s->kv, chunk->kv, il, chunk->n0, delta);
    }
    if (st != KVS_OK) {
        /* drop what was appended: the sequence keeps its first n_past tokens */
        for (int il = 0; il < c->m->hp.n_layer; il++) {
            struct kv_plan plan = {0};
            int32_t *keep[KV_VIEW_MAX_HEADS] = {0};
            bool ok = true;
            for (int ih = 0; ih < c->m->hp.n_head_kv && ok; ih++) {
                const struct kv_head_store *h = kv_seq_head(s->kv, il, ih);
                int32_t n = 0;
                while (n < h->n && h->pos[n] < s->n_past) n++;
                keep[ih] = malloc(sizeof(int32_t) * (size_t)(n ? n : 1));
                ok = keep[ih] != NULL;
                for (int32_t j = 0; ok && j < n; j++) keep[ih][j] = j;
                plan.keep[ih] = keep[ih], plan.n_keep[ih] = n;
            }
            if (ok) kv_seq_apply_plan(s->kv, il, &plan, false);
            for (int ih = 0; ih < c->m->hp.n_head_kv; ih++) free(keep[ih]);
        }
        return st;
    }
    s->n_past += m;
    return KVS_OK;
}

/* ---- chunk records ------------------------------------------------------------------------ */

int kvs_prefix_first(const kvs_prefix *p) { return p ? p->n0 : 0; }


enum kvs_status kvs_chunk_publish(kvs_context *c, const kvs_sequence *s, int32_t from,
                                  kvs_prefix **out) {
    *out = NULL;
    if (!c || !s || c->seqs[s->slot] != s)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_chunk_publish: the sequence does not belong to "
                        "this context");
    if (from < s->n_prefix || from >= s->n_past)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_chunk_publish: tokens [%d, %d) are not the "
                        "sequence's own (it holds [%d, %d))", from, s->n_past, s->n_prefix, s->n_past);
    if (!seq_exact_from(s, from))
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_chunk_publish: the sequence's entries from "
                        "token %d are not exact (feed the chunk with .hold)", from);
    struct kvs_prefix *p;
    enum kvs_status st = node_new(c, &p);
    if (st != KVS_OK) return st;
    for (int il = 0; il < c->m->hp.n_layer && st == KVS_OK; il++)
        st = kv_seq_append_range(p->kv, s->kv, il, from, 0);
    p->n0 = from;
    p->n1 = s->n_past;
    p->chunk = true;
    if (st == KVS_OK) st = node_finish(c, p);
    if (st != KVS_OK) {
        node_free(p);
        return st;
    }
    *out = p;
    return KVS_OK;
}

#define NODE_MAGIC "KVSNODE1"
enum { NODE_VERSION = 1, NODE_HEADER = 8 + 4 * 4 + 8 + 4 * 2 };

static void put32(uint8_t **w, uint32_t x) { memcpy(*w, &x, 4), *w += 4; }
static void put64(uint8_t **w, uint64_t x) { memcpy(*w, &x, 8), *w += 8; }

enum kvs_status kvs_prefix_serialize(const kvs_prefix *p, uint8_t **out, size_t *n) {
    *out = NULL, *n = 0;
    const struct kv_cache *kc = p->kv->owner;
    size_t hd = (size_t)kc->head_dim, size = NODE_HEADER + 8;
    for (int i = 0; i < kc->n_layer * kc->n_head_kv; i++) {
        const struct kv_head_store *h = &p->kv->h[i];
        if (h->nc)
            return kvs_fail(KVS_ERR_UNSUPPORTED, "a compressed (packed) node cannot be serialised");
        size += 4 + (size_t)h->n * (8 + 4 * hd);
    }
    uint8_t *b = malloc(size), *w = b;
    if (!b) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    memcpy(w, NODE_MAGIC, 8), w += 8;
    put32(&w, NODE_VERSION);
    put32(&w, (uint32_t)kc->n_layer);
    put32(&w, (uint32_t)kc->n_head_kv);
    put32(&w, (uint32_t)kc->head_dim);
    put64(&w, kvs_model_fingerprint(p->c->m));
    put32(&w, (uint32_t)p->n0);
    put32(&w, (uint32_t)p->n1);
    for (int i = 0; i < kc->n_layer * kc->n_head_kv; i++) {
        const struct kv_head_store *h = &p->kv->h[i];
        put32(&w, (uint32_t)h->n);
        memcpy(w, h->pos, (size_t)h->n * 4), w += (size_t)h->n * 4;
        memcpy(w, h->w, (size_t)h->n * 4), w += (size_t)h->n * 4;
        memcpy(w, h->k, (size_t)h->n * hd * 2), w += (size_t)h->n * hd * 2;
        memcpy(w, h->v, (size_t)h->n * hd * 2), w += (size_t)h->n * hd * 2;
    }
    put64(&w, XXH64(b, size - 8, 0));
    *out = b, *n = size;
    return KVS_OK;
}

static uint32_t get32(const uint8_t *r) {
    uint32_t x;
    memcpy(&x, r, 4);
    return x;
}
static uint64_t get64(const uint8_t *r) {
    uint64_t x;
    memcpy(&x, r, 8);
    return x;
}

enum kvs_status kvs_prefix_deserialize(kvs_context *c, const uint8_t *buf, size_t n,
                                       kvs_prefix **out) {
    *out = NULL;
    const struct hparams *hp = &c->m->hp;
    size_t hd = (size_t)hp->head_dim;
    if (!buf || n < NODE_HEADER + 8 || memcmp(buf, NODE_MAGIC, 8))
        return kvs_fail(KVS_ERR_FORMAT, "not a KV node record (bad magic or too short)");
    if (get32(buf + 8) != NODE_VERSION)
        return kvs_fail(KVS_ERR_FORMAT, "unsupported KV node version %u", get32(buf + 8));
    if (XXH64(buf, n - 8, 0) != get64(buf + n - 8))
        return kvs_fail(KVS_ERR_FORMAT, "corrupted KV node record (checksum mismatch)");
    if (get32(buf + 12) != (uint32_t)hp->n_layer || get32(buf + 16) != (uint32_t)hp->n_head_kv ||
        get32(buf + 20) != (uint32_t)hp->head_dim || get64(buf + 24) != kvs_model_fingerprint(c->m))
        return kvs_fail(KVS_ERR_FORMAT, "the KV node record was made by another model");
    int32_t n0 = (int32_t)get32(buf + 32), n1 = (int32_t)get32(buf + 36);
    if (n0 < 0 || n1 <= n0 || n1 - n0 > (1 << 24))
        return kvs_fail(KVS_ERR_FORMAT, "KV node record: bad token range [%d, %d)", n0, n1);
    struct kvs_prefix *p;
    enum kvs_status st = node_new(c, &p);
    if (st != KVS_OK) return st;
    p->n0 = n0, p->n1 = n1, p->chunk = true;
    const uint8_t *r = buf + NODE_HEADER, *end = buf + n - 8;
    int32_t *pos = NULL;
    float *w = NULL;
    for (int il = 0; il < hp->n_layer && st == KVS_OK; il++)
        for (int ih = 0; ih < hp->n_head_kv && st == KVS_OK; ih++) {
            if (end - r < 4) {
                st = kvs_fail(KVS_ERR_FORMAT, "truncated KV node record");
                break;
            }
            uint32_t m = get32(r);
            r += 4;
            if (m > (uint32_t)(n1 - n0) || (size_t)(end - r) < (size_t)m * (8 + 4 * hd)) {
                st = kvs_fail(KVS_ERR_FORMAT, "KV node record: layer %d head %d: bad entry count", il, ih);
                break;
            }
            free(pos), free(w);
            pos = malloc(4 * (size_t)(m ? m : 1)), w = malloc(4 * (size_t)(m ? m : 1));
            uint16_t *k = malloc(2 * hd * (size_t)(m ? m : 1)), *v = malloc(2 * hd * (size_t)(m ? m : 1));
            if (!pos || !w || !k || !v) st = kvs_fail(KVS_ERR_NOMEM, "out of memory");
            if (st == KVS_OK) {
                memcpy(pos, r, 4 * (size_t)m), r += 4 * (size_t)m;
                memcpy(w, r, 4 * (size_t)m), r += 4 * (size_t)m;
                memcpy(k, r, 2 * hd * m), r += 2 * hd * m;
                memcpy(v, r, 2 * hd * m), r += 2 * hd * m;
                for (uint32_t j = 0; j < m && st == KVS_OK; j++)
                    if (pos[j] < n0 || pos[j] >= n1 || (j && pos[j] <= pos[j - 1]) || !(w[j] > 0) ||
                        w[j] > 1e6f)
                        st = kvs_fail(KVS_ERR_FORMAT, "KV node record: layer %d head %d: bad "
                                      "position or weight", il, ih);
                for (size_t q = 0; q < 2 * hd * m && st == KVS_OK; q++) {
                    uint16_t x = q < hd * m ? k[q] : v[q - hd * m];
                    if ((x & 0x7c00) == 0x7c00) /* inf or NaN halves */
                        st = kvs_fail(KVS_ERR_FORMAT, "KV node record: layer %d head %d: a key or "
                                      "value is not finite", il, ih);
                }
            }
            if (st == KVS_OK) st = kv_seq_append_rows(p->kv, il, ih, (int32_t)m, pos, w, k, v);
            free(k), free(v);
        }
    free(pos), free(w);
    if (st == KVS_OK && r != end) st = kvs_fail(KVS_ERR_FORMAT, "KV node record: %zu bytes too many", (size_t)(end - r));
    if (st == KVS_OK) st = node_finish(c, p);
    if (st != KVS_OK) {
        node_free(p);
        return st;
    }
    *out = p;
    return KVS_OK;
}
