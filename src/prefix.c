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

#include <stdio.h>
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
    char spec[256];     /* the spec a chunk was compressed under ("" = exact) */
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
    enum kvs_status gst_ = kvs_gpu_refuse(c, "sharing a prefix");
    if (gst_ != KVS_OK) return gst_;
    *out = NULL;
    if (!c || !s || c->seqs[s->slot] != s)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_prefix_publish: the sequence does not belong to "
                        "this context");
    if (parent && parent->c != c)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_prefix_publish: the parent belongs to another "
                        "context");
    if (s->kv->gate_w)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "kvs_prefix_publish: shared prefixes do not carry "
                        "Attention-Gate's own cache yet (the sequence runs agate)");
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
    enum kvs_status gst_ = kvs_gpu_refuse(c, "compressing a shared prefix");
    if (gst_ != KVS_OK) return gst_;
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
    snprintf(p->spec, sizeof p->spec, "%s", spec.text);
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
    enum kvs_status gst_ = kvs_gpu_refuse(c, "attaching a shared prefix");
    if (gst_ != KVS_OK) return gst_;
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
    if (s->kv->gate_w)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "kvs_seq_attach_prefix: shared prefixes do not carry "
                        "Attention-Gate's own cache yet (the sequence runs agate)");
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
    enum kvs_status gst_ = kvs_gpu_refuse(c, "placing a reused chunk");
    if (gst_ != KVS_OK) return gst_;
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
    if (s->kv->acc_learned)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_place_chunk: the sequence runs locret, which "
                        "scores tokens as they are computed; a placed chunk has no scores");
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
                                  const char *kv_spec, kvs_prefix **out) {
    enum kvs_status gst_ = kvs_gpu_refuse(c, "publishing a chunk");
    if (gst_ != KVS_OK) return gst_;
    *out = NULL;
    if (!c || !s || c->seqs[s->slot] != s)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_chunk_publish: the sequence does not belong to "
                        "this context");
    if (s->kv->gate_w)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "kvs_chunk_publish: chunk records do not carry "
                        "Attention-Gate's own cache yet (the sequence runs agate)");
    if (from < s->n_prefix || from >= s->n_past)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_chunk_publish: tokens [%d, %d) are not the "
                        "sequence's own (it holds [%d, %d))", from, s->n_past, s->n_prefix, s->n_past);
    if (!seq_exact_from(s, from))
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_chunk_publish: the sequence's entries from "
                        "token %d are not exact (feed the chunk with .hold)", from);
    struct kv_spec spec;
    enum kvs_status st = kvs_chunk_spec_check(c, kv_spec);
    if (st != KVS_OK) return st;
    kv_spec_parse(kv_spec ? kv_spec : "", &spec);
    struct kvs_prefix *p;
    st = node_new(c, &p);
    if (st != KVS_OK) return st;
    for (int il = 0; il < c->m->hp.n_layer && st == KVS_OK; il++)
        st = kv_seq_append_range(p->kv, s->kv, il, from, 0);
    p->n0 = from;
    p->n1 = s->n_past;
    p->chunk = true;
    if (st == KVS_OK && kv_spec && *kv_spec) {
        /* compressed under spec (question-agnostic: the chunk's own last queries score it) */
        /* n_past: the chunk's tokens, so that a ratio budget is a share of the chunk */
        kvs_sequence tmp = {.slot = -1, .prof = &c->base, .n_past = s->n_past - from};
        st = kv_seq_new(&c->kv, &tmp.kv);
        if (st == KVS_OK) {
            kv_seq_set_acc(tmp.kv, false);
            for (int il = 0; il < c->m->hp.n_layer && st == KVS_OK; il++)
                st = kv_seq_append_range(tmp.kv, p->kv, il, from, 0);
            kv_seq_copy_queries(tmp.kv, s->kv);
            if (st == KVS_OK) st = kvs_seq_compress(c, &tmp, spec.text);
            kv_seq_drop_queries(tmp.kv);
            if (st == KVS_OK) {
                kv_seq_free(p->kv);
                p->kv = tmp.kv;
                snprintf(p->spec, sizeof p->spec, "%s", spec.text);
            } else kv_seq_free(tmp.kv);
        }
    }
    if (st == KVS_OK) st = node_finish(c, p);
    if (st != KVS_OK) {
        node_free(p);
        return st;
    }
    *out = p;
    return KVS_OK;
}

enum kvs_status kvs_chunk_spec_check(const kvs_context *c, const char *kv_spec) {
    struct kv_spec spec;
    enum kvs_status st = kv_spec_parse(kv_spec ? kv_spec : "", &spec);
    if (st != KVS_OK) return st;
    if (spec.reindex)
        return kvs_fail(KVS_ERR_INVALID_ARG, "'%s' moves positions (pos=cache); a chunk record "
                        "keeps its own (use pos=abs)", spec.text);
    if (kv_policy_needs(&spec) & KV_NEED_SLOT)
        return kvs_fail(KVS_ERR_INVALID_ARG, "'%s' scores by accumulated attention or learned scores, which a chunk "
                        "record does not carry: use a storage part (kivi, mikv, think) or a "
                        "scorer of keys or recent queries (snapkv, tova, knorm, streaming)", spec.text);
    if ((kv_policy_needs(&spec) & KV_NEED_QUERIES) && c->kv.qwin < kv_policy_qwin(&spec))
        return kvs_fail(KVS_ERR_INVALID_ARG, "'%s' needs the last %d queries; this context keeps "
                        "%d (create it with keep_stats)", spec.text, kv_policy_qwin(&spec), c->kv.qwin);
    return KVS_OK;
}

const char *kvs_prefix_spec(const kvs_prefix *p) { return p ? p->spec : ""; }

#define NODE_MAGIC "KVSNODE1"
enum { NODE_VERSION = 2, NODE_HEADER = 8 + 4 * 4 + 8 + 4 * 3, NODE_SPEC_MAX = 255 };

static void put32(uint8_t **w, uint32_t x) { memcpy(*w, &x, 4), *w += 4; }
static void put64(uint8_t **w, uint64_t x) { memcpy(*w, &x, 8), *w += 8; }

enum kvs_status kvs_prefix_serialize(const kvs_prefix *p, uint8_t **out, size_t *n) {
    *out = NULL, *n = 0;
    const struct kv_cache *kc = p->kv->owner;
    size_t ns = strlen(p->spec), size = NODE_HEADER + ns + 8;
    if (p->parent)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "a node of a prefix chain cannot be serialised alone");
    for (int il = 0; il < kc->n_layer; il++)
        for (int ih = 0; ih < kc->n_head_kv; ih++) size += kv_head_wire_bytes(p->kv, il, ih);
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
    put32(&w, (uint32_t)ns);
    memcpy(w, p->spec, ns), w += ns;
    for (int il = 0; il < kc->n_layer; il++)
        for (int ih = 0; ih < kc->n_head_kv; ih++) {
            kv_head_wire_write(p->kv, il, ih, w);
            w += kv_head_wire_bytes(p->kv, il, ih);
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
    enum kvs_status gst_ = kvs_gpu_refuse(c, "loading a chunk record");
    if (gst_ != KVS_OK) return gst_;
    *out = NULL;
    const struct hparams *hp = &c->m->hp;
    if (!buf || n < NODE_HEADER + 8 || memcmp(buf, NODE_MAGIC, 8))
        return kvs_fail(KVS_ERR_FORMAT, "not a KV node record (bad magic or too short)");
    if (get32(buf + 8) != NODE_VERSION)
        return kvs_fail(KVS_ERR_FORMAT, "unsupported KV node version %u (this build reads %d)",
                        get32(buf + 8), NODE_VERSION);
    if (XXH64(buf, n - 8, 0) != get64(buf + n - 8))
        return kvs_fail(KVS_ERR_FORMAT, "corrupted KV node record (checksum mismatch)");
    if (get32(buf + 12) != (uint32_t)hp->n_layer || get32(buf + 16) != (uint32_t)hp->n_head_kv ||
        get32(buf + 20) != (uint32_t)hp->head_dim || get64(buf + 24) != kvs_model_fingerprint(c->m))
        return kvs_fail(KVS_ERR_FORMAT, "the KV node record was made by another model");
    int32_t n0 = (int32_t)get32(buf + 32), n1 = (int32_t)get32(buf + 36);
    if (n0 < 0 || n1 <= n0 || n1 - n0 > (1 << 24))
        return kvs_fail(KVS_ERR_FORMAT, "KV node record: bad token range [%d, %d)", n0, n1);
    uint32_t ns = get32(buf + 40);
    if (ns > NODE_SPEC_MAX || ns > n - NODE_HEADER - 8)
        return kvs_fail(KVS_ERR_FORMAT, "KV node record: bad spec length %u", ns);
    char text[NODE_SPEC_MAX + 1];
    memcpy(text, buf + NODE_HEADER, ns);
    text[ns] = 0;
    if (memchr(text, 0, ns)) return kvs_fail(KVS_ERR_FORMAT, "KV node record: bad spec text");
    struct kv_spec spec;
    struct kv_pack_cfg pc;
    if (kv_spec_parse(text, &spec) != KVS_OK)
        return kvs_fail(KVS_ERR_FORMAT, "KV node record: bad spec '%s'", text);
    kv_pack_cfg_from_spec(&spec, hp->head_dim, &pc);
    if (pc.on && hp->head_dim > 256)
        return kvs_fail(KVS_ERR_FORMAT, "KV node record: packed storage needs head_dim <= 256");
    struct kvs_prefix *p;
    enum kvs_status st = node_new(c, &p);
    if (st != KVS_OK) return st;
    p->n0 = n0, p->n1 = n1, p->chunk = true;
    snprintf(p->spec, sizeof p->spec, "%s", text);
    if (pc.on) st = kv_seq_set_pack(p->kv, &pc);
    const uint8_t *r = buf + NODE_HEADER + ns, *end = buf + n - 8;
    for (int il = 0; il < hp->n_layer && st == KVS_OK; il++)
        for (int ih = 0; ih < hp->n_head_kv && st == KVS_OK; ih++) {
            size_t used = 0;
            st = kv_head_wire_read(p->kv, il, ih, r, (size_t)(end - r), n0, n1, &used);
            if (st == KVS_ERR_FORMAT) {
                char e[256];
                snprintf(e, sizeof e, "%s", kvs_last_error());
                kvs_fail(st, "KV node record: %s", e);
            }
            r += used;
        }
    if (st == KVS_OK && r != end) st = kvs_fail(KVS_ERR_FORMAT, "KV node record: %zu bytes too many", (size_t)(end - r));
    if (st == KVS_OK) st = node_finish(c, p);
    if (st != KVS_OK) {
        node_free(p);
        return st;
    }
    *out = p;
    return KVS_OK;
}
