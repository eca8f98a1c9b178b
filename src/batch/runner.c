/* runner.c — see runner.h.
 *
 * Work items: a group's common sequence (prefill only, then publishes its node and is freed) and
 * the members (attach the node if any, prefill their own suffix, decode). Each step: one decode
 * token for every decoding member, then prompt chunks (commons first, then members, in admission
 * order) up to the step's token budget. Admission, in group order: a group starts with its
 * common prefill when its prefix is shared, and its members are admitted once the node exists;
 * each admitted item reserves kvs_kv_bytes_bound while it prefills and
 * kvs_kv_bytes_bound_decode once its prompt is in; a node counts its real bytes. */
#include "batch/runner.h"
#include "batch/group.h"
#include "engine.h"

#include <stdlib.h>
#include <string.h>

enum { W_FREE, W_COMMON, W_MEMBER };

struct work {
    int kind, req, grp;        /* request (member) or group (common) */
    kvs_sequence *s;
    kvs_sampler *smp;
    int fed, n_tok;            /* prompt tokens fed / to feed (the member's suffix or the prefix) */
    const int32_t *tok;        /* what it feeds */
    int n_gen, max_gen;
    int32_t next;
    bool decoding;
    int64_t reserve;
    int admit_order;
};

struct grp {
    int n_shared;              /* tokens of the shared prefix node (0: none) */
    int *members, n_members, next_member, n_running, n_finished;
    kvs_prefix *node;
    bool common_started, common_done;
    double key;
};

struct run {
    kvs_context *c;
    const kvs_model *m;
    const struct brun_req *r;
    const struct brun_opts *o;
    const struct brun_cb *cb;
    struct brun_stats *st;
    struct grp *g;
    int n_groups, *order;      /* groups in scheduling order */
    struct work *w;
    int n_slots, n_work, admit_counter, done_count, total;
    int64_t reserved;
    float *logits;             /* (n_slots, n_vocab) */
};

static double ratio(const struct brun_req *q) { return (double)q->max_tokens / (double)q->n_prompt; }

static const struct brun_req *g_sort_reqs;
static int cmp_member(const void *a, const void *b) {
    const struct brun_req *x = &g_sort_reqs[*(const int *)a], *y = &g_sort_reqs[*(const int *)b];
    double rx = ratio(x), ry = ratio(y);
    if (rx != ry) return rx > ry ? -1 : 1;
    return *(const int *)a - *(const int *)b;
}
static struct grp *g_sort_groups;
static int cmp_group(const void *a, const void *b) {
    const struct grp *x = &g_sort_groups[*(const int *)a], *y = &g_sort_groups[*(const int *)b];
    if (x->key != y->key) return x->key > y->key ? -1 : 1;
    return *(const int *)a - *(const int *)b;
}

static void finish(struct run *R, struct work *w, enum brun_finish why, const char *err) {
    if (w->kind == W_MEMBER) {
        struct grp *g = &R->g[w->grp];
        g->n_running--, g->n_finished++;
        R->done_count++;
        if (why == BRUN_ERROR) R->st->n_errors++;
        else R->st->n_done++;
        int computed = w->n_tok;
        if (R->cb->done) R->cb->done(R->cb->user, w->req, why, err, w->n_gen, computed);
        if (g->node && g->n_finished == g->n_members) { /* the last member: the node goes */
            R->reserved -= (int64_t)kvs_prefix_bytes(g->node);
            kvs_prefix_unref(g->node);
            g->node = NULL;
        }
    }
    if (w->s) kvs_seq_free(R->c, w->s);
    kvs_sampler_free(w->smp);
    R->reserved -= w->reserve;
    memset(w, 0, sizeof *w);
    w->kind = W_FREE;
    R->n_work--;
}

static struct work *free_slot(struct run *R) {
    for (int i = 0; i < R->n_slots; i++)
        if (R->w[i].kind == W_FREE) return &R->w[i];
    return NULL;
}

/* KV bytes the member may hold while prefilling / after its prompt */
static int64_t member_bound(struct run *R, int req, int n_own, bool decoding) {
    const struct brun_req *q = &R->r[req];
    return decoding ? kvs_kv_bytes_bound_decode(R->c, q->kv, n_own, q->max_tokens)
                    : kvs_kv_bytes_bound(R->c, q->kv, n_own + q->max_tokens);
}

static int n_vocab_of(const kvs_model *m) {
    struct kvs_model_info mi;
    kvs_model_get_info(m, &mi);
    return mi.n_vocab;
}

static bool fits(struct run *R, int64_t b) {
    return R->o->kv_mem <= 0 || R->reserved + b <= R->o->kv_mem;
}

/* start a member of group gi; false when it must wait (no slot or memory) */
static bool admit_member(struct run *R, int gi, enum kvs_status *fatal) {
    struct grp *g = &R->g[gi];
    int req = g->members[g->next_member];
    const struct brun_req *q = &R->r[req];
    int n_own = q->n_prompt - g->n_shared;
    int64_t b = member_bound(R, req, n_own, false);
    if (b < 0) { /* a spec the engine refuses: this request fails, the batch goes on */
        g->next_member++;
        g->n_finished++;
        R->done_count++, R->st->n_errors++;
        if (R->cb->done) R->cb->done(R->cb->user, req, BRUN_ERROR, "invalid kv spec", 0, 0);
        return true;
    }
    if (R->o->kv_mem > 0 && b + (g->node ? (int64_t)kvs_prefix_bytes(g->node) : 0) > R->o->kv_mem) {
        g->next_member++;
        g->n_finished++;
        R->done_count++, R->st->n_errors++;
        if (R->cb->done)
            R->cb->done(R->cb->user, req, BRUN_ERROR, "its KV cache can never fit the memory limit", 0, 0);
        if (g->node && g->n_finished == g->n_members) {
            R->reserved -= (int64_t)kvs_prefix_bytes(g->node);
            kvs_prefix_unref(g->node), g->node = NULL;
        }
        return true;
    }
    struct work *w = free_slot(R);
    if (!w || !fits(R, b)) return false;
    *w = (struct work){.kind = W_MEMBER, .req = req, .grp = gi, .tok = q->prompt + g->n_shared,
                       .n_tok = n_own, .max_gen = q->max_tokens, .reserve = b,
                       .admit_order = R->admit_counter++};
    enum kvs_status st = kvs_seq_new(R->c, &w->s);
    if (st == KVS_OK) st = kvs_seq_set_kv(R->c, w->s, q->kv);
    if (st == KVS_OK && g->node) st = kvs_seq_attach_prefix(R->c, w->s, g->node);
    if (st == KVS_OK) st = kvs_sampler_new(&q->sp, n_vocab_of(R->m), &w->smp);
    g->next_member++;
    g->n_running++;
    R->n_work++;
    R->reserved += b;
    if (st != KVS_OK) {
        if (st == KVS_ERR_NOMEM) *fatal = st;
        finish(R, w, BRUN_ERROR, kvs_last_error());
        return true;
    }
    int cap = kvs_seq_max_tokens(R->c, w->s) - q->n_prompt;
    if (cap < w->max_gen) w->max_gen = cap > 0 ? cap : 0;
    if (w->max_gen <= 0) {
        finish(R, w, BRUN_ERROR, "the prompt fills the context");
        return true;
    }
    for (int i = 0; i < q->n_prompt; i++) kvs_sampler_accept(w->smp, q->prompt[i]);
    return true;
}

static bool admit_common(struct run *R, int gi, enum kvs_status *fatal) {
    struct grp *g = &R->g[gi];
    int64_t b = kvs_kv_bytes_bound(R->c, "full", g->n_shared);
    struct work *w = free_slot(R);
    if (!w || !fits(R, b)) return false;
    const struct brun_req *q = &R->r[g->members[0]];
    *w = (struct work){.kind = W_COMMON, .grp = gi, .tok = q->prompt, .n_tok = g->n_shared,
                       .reserve = b, .admit_order = R->admit_counter++};
    g->common_started = true;
    R->n_work++;
    R->reserved += b;
    enum kvs_status st = kvs_seq_new(R->c, &w->s);
    if (st == KVS_OK) st = kvs_seq_set_kv(R->c, w->s, "full");
    if (st != KVS_OK) {
        /* the group runs without sharing */
        *fatal = st == KVS_ERR_NOMEM ? st : KVS_OK;
        finish(R, w, BRUN_ERROR, NULL);
        g->n_shared = 0, g->common_done = true;
    }
    return true;
}

/* admit what fits, in group order */
static enum kvs_status admit(struct run *R) {
    enum kvs_status fatal = KVS_OK;
    for (int k = 0; k < R->n_groups && fatal == KVS_OK; k++) {
        int gi = R->order[k];
        struct grp *g = &R->g[gi];
        if (g->next_member == g->n_members) continue;
        if (g->n_shared && !g->common_done) {
            if (!g->common_started && !admit_common(R, gi, &fatal)) return fatal;
            if (!g->common_done) continue; /* members wait for the node */
        }
        while (g->next_member < g->n_members)
            if (!admit_member(R, gi, &fatal)) return fatal;
    }
    return fatal;
}

enum kvs_status brun_run(kvs_context *c, const kvs_model *m, const struct brun_req *r, int n,
                         const struct brun_opts *o, const struct brun_cb *cb,
                         struct brun_stats *st) {
    memset(st, 0, sizeof *st);
    struct run R = {.c = c, .m = m, .r = r, .o = o, .cb = cb, .st = st};
    R.n_slots = c->p.n_seq_max;
    if (R.n_slots < (o->group ? 2 : 1))
        return kvs_fail(KVS_ERR_INVALID_ARG, "a grouped batch needs a context of 2 or more sequences");
    int *idx = malloc(sizeof(int) * (size_t)(n ? n : 1));
    const int32_t **pt = malloc(sizeof *pt * (size_t)(n ? n : 1));
    int *pl = malloc(sizeof(int) * (size_t)(n ? n : 1));
    R.w = calloc((size_t)R.n_slots, sizeof *R.w);
    if (!idx || !pt || !pl || !R.w) {
        free(idx), free(pt), free(pl), free(R.w);
        return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    }
    int k = 0;
    for (int i = 0; i < n; i++)
        if (!r[i].skip) idx[k] = i, pt[k] = r[i].prompt, pl[k] = r[i].n_prompt, k++;
    st->n_requests = k;
    struct bgrouping bg = {0};
    enum kvs_status rc = KVS_OK;
    if (o->group) {
        rc = bgroup_build(pt, pl, k, &bg);
    } else {
        bg.groups = calloc((size_t)(k ? k : 1), sizeof *bg.groups);
        if (!bg.groups) rc = kvs_fail(KVS_ERR_NOMEM, "out of memory");
        for (int i = 0; i < k && rc == KVS_OK; i++) {
            bg.groups[i].members = malloc(sizeof(int));
            if (!bg.groups[i].members) {
                rc = kvs_fail(KVS_ERR_NOMEM, "out of memory");
                break;
            }
            bg.groups[i].members[0] = i, bg.groups[i].n_members = 1;
            bg.n_groups++;
        }
    }
    R.n_groups = bg.n_groups;
    R.g = calloc((size_t)(bg.n_groups ? bg.n_groups : 1), sizeof *R.g);
    R.order = malloc(sizeof(int) * (size_t)(bg.n_groups ? bg.n_groups : 1));
    size_t nv = (size_t)n_vocab_of(m);
    R.logits = malloc(sizeof(float) * nv * (size_t)R.n_slots);
    if (rc == KVS_OK && (!R.g || !R.order || !R.logits)) rc = kvs_fail(KVS_ERR_NOMEM, "out of memory");
    for (int gi = 0; gi < bg.n_groups && rc == KVS_OK; gi++) {
        struct grp *g = &R.g[gi];
        struct bgroup *b = &bg.groups[gi];
        g->members = b->members, b->members = NULL;
        g->n_members = b->n_members;
        int min_len = 1 << 30;
        double key = 0;
        for (int j = 0; j < g->n_members; j++) {
            g->members[j] = idx[g->members[j]];
            const struct brun_req *q = &r[g->members[j]];
            if (q->n_prompt < min_len) min_len = q->n_prompt;
            key += ratio(q) / g->n_members;
            st->prompt_logical += q->n_prompt;
        }
        /* a member must compute at least its last prompt token itself */
        g->n_shared = b->n_prefix < min_len - 1 ? b->n_prefix : min_len - 1;
        if (g->n_members < 2 || g->n_shared < (o->min_share > 0 ? o->min_share : 32)) g->n_shared = 0;
        if (!g->n_shared) g->common_done = true;
        st->n_shared_groups += g->n_shared > 0;
        g->key = o->reorder ? key : -(double)gi;
        if (o->reorder) {
            g_sort_reqs = r;
            qsort(g->members, (size_t)g->n_members, sizeof(int), cmp_member);
        }
        R.order[gi] = gi;
    }
    st->n_groups = bg.n_groups;
    bgroup_free(&bg);
    if (rc == KVS_OK && o->reorder) {
        g_sort_groups = R.g;
        qsort(R.order, (size_t)R.n_groups, sizeof(int), cmp_group);
    }
    R.total = k;
    const int budget = kvs_context_step_tokens(c);
    struct kvs_batch_item *items = malloc(sizeof *items * (size_t)R.n_slots);
    int *iw = malloc(sizeof(int) * (size_t)R.n_slots);
    if (rc == KVS_OK && (!items || !iw)) rc = kvs_fail(KVS_ERR_NOMEM, "out of memory");
    while (rc == KVS_OK && R.done_count < R.total && !(cb->stop && *cb->stop)) {
        rc = admit(&R);
        if (rc != KVS_OK) break;
        if (R.n_work > st->max_running) st->max_running = R.n_work;
        int ni = 0, room = budget;
        /* decode tokens first */
        for (int i = 0; i < R.n_slots && room > 0; i++) {
            struct work *w = &R.w[i];
            if (w->kind != W_MEMBER || !w->decoding) continue;
            items[ni] = (struct kvs_batch_item){.seq = w->s, .tokens = &w->next, .n = 1, .decode = true,
                                                .logits = R.logits + (size_t)i * nv};
            iw[ni++] = i, room--;
        }
        /* then prompt chunks, commons first, in admission order */
        for (int pass = 0; pass < 2 && room > 0; pass++)
            for (;;) {
                int best = -1;
                for (int i = 0; i < R.n_slots; i++) {
                    struct work *w = &R.w[i];
                    bool want = w->kind == (pass ? W_MEMBER : W_COMMON) && !w->decoding && w->fed < w->n_tok;
                    for (int j = 0; j < ni && want; j++) want = iw[j] != i;
                    if (want && (best < 0 || w->admit_order < R.w[best].admit_order)) best = i;
                }
                if (best < 0 || room <= 0) break;
                struct work *w = &R.w[best];
                int take = w->n_tok - w->fed < room ? w->n_tok - w->fed : room;
                bool last = w->fed + take == w->n_tok;
                items[ni] = (struct kvs_batch_item){.seq = w->s, .tokens = w->tok + w->fed, .n = take,
                                                    .hold = w->kind == W_COMMON,
                                                    .prompt_end = w->kind == W_MEMBER && last,
                                                    .logits = w->kind == W_MEMBER && last ? R.logits + (size_t)best * nv : NULL};
                iw[ni++] = best, room -= take;
            }
        if (!ni) {
            if (R.n_work == 0) { /* nothing runs and nothing fits: cannot happen unless the
                                  * limit is below one request, which admit reports */
                rc = kvs_fail(KVS_ERR_INTERNAL, "batch: no work can be admitted");
            }
            continue;
        }
        rc = kvs_step(c, items, ni);
        if (rc != KVS_OK) break;
        /* KV payload held now: the sequences' own entries and the shared nodes */
        int64_t held = 0;
        for (int i = 0; i < R.n_slots; i++)
            if (R.w[i].kind != W_FREE) held += (int64_t)kvs_seq_kv_bytes(R.w[i].s);
        for (int gi = 0; gi < R.n_groups; gi++)
            if (R.g[gi].node) held += (int64_t)kvs_prefix_bytes(R.g[gi].node);
        if (held > st->kv_peak) st->kv_peak = held;
        for (int j = 0; j < ni; j++) {
            struct work *w = &R.w[iw[j]];
            if (!items[j].decode) {
                w->fed += items[j].n;
                st->prompt_computed += items[j].n;
                if (w->fed < w->n_tok) continue;
                if (w->kind == W_COMMON) { /* publish the prefix; the common sequence goes */
                    struct grp *g = &R.g[w->grp];
                    kvs_prefix *node = NULL;
                    enum kvs_status ps = kvs_prefix_publish(c, w->s, NULL, &node);
                    if (ps == KVS_ERR_NOMEM) rc = ps;
                    g->node = ps == KVS_OK ? node : NULL;
                    if (ps != KVS_OK) g->n_shared = 0;
                    else R.reserved += (int64_t)kvs_prefix_bytes(node); /* held while members run */
                    g->common_done = true;
                    finish(&R, w, BRUN_STOP, NULL);
                    continue;
                }
                /* the member's prompt is in: its reserve drops to the decode bound */
                int64_t nb = member_bound(&R, w->req, w->n_tok, true);
                if (nb >= 0 && nb < w->reserve) R.reserved -= w->reserve - nb, w->reserve = nb;
                w->decoding = true;
            }
            /* a token from the logits of the item's last position */
            const float *lg = R.logits + (size_t)iw[j] * nv;
            int32_t tok = kvs_sampler_sample(w->smp, lg);
            const struct brun_req *q = &r[w->req];
            if (!q->ignore_eos && kvs_token_is_eog(m, tok)) {
                finish(&R, w, BRUN_STOP, NULL);
                continue;
            }
            w->n_gen++;
            st->gen_tokens++;
            bool go = cb->token ? cb->token(cb->user, w->req, tok) : true;
            if (!go) finish(&R, w, BRUN_STOP, NULL);
            else if (w->n_gen >= w->max_gen) finish(&R, w, BRUN_LENGTH, NULL);
            else w->next = tok;
        }
        if (cb->progress) cb->progress(cb->user, R.done_count, R.total, st->gen_tokens);
    }
    /* on an engine failure or a stop: release everything still running */
    for (int i = 0; i < R.n_slots; i++)
        if (R.w[i].kind != W_FREE) {
            if (R.w[i].kind == W_MEMBER && rc != KVS_OK) R.st->n_errors++;
            if (R.w[i].s) kvs_seq_free(c, R.w[i].s);
            kvs_sampler_free(R.w[i].smp);
        }
    for (int gi = 0; gi < R.n_groups; gi++) {
        if (R.g[gi].node) kvs_prefix_unref(R.g[gi].node);
        free(R.g[gi].members);
    }
    free(R.g), free(R.order), free(R.w), free(R.logits), free(items), free(iw);
    free(idx), free(pt), free(pl);
    return rc;
}
