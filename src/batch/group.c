/* group.c — see group.h. The radix tree's nodes are runs of one prompt's tokens ([start, end)
 * of prompt pid: every prompt through a node has the same tokens there); prompts that end at a
 * node are listed on it. */
#include "batch/group.h"

#include <stdlib.h>
#include <string.h>

struct rn {
    int pid, start, end;      /* the run: toks[pid][start, end) */
    int parent, child, sib;   /* tree links (-1 = none) */
    int end_head;             /* first prompt ending here (-1 = none), chained by end_next */
    int leaves;               /* prompts in the subtree */
};

struct tree {
    const int32_t *const *toks;
    struct rn *n;
    int nn, cap;
    int *end_next;            /* (n prompts) */
};

static int node_new(struct tree *t, int pid, int start, int end, int parent) {
    if (t->nn == t->cap) {
        int cap = t->cap ? 2 * t->cap : 64;
        struct rn *nn = realloc(t->n, sizeof *nn * (size_t)cap);
        if (!nn) return -1;
        t->n = nn, t->cap = cap;
    }
    t->n[t->nn] = (struct rn){pid, start, end, parent, -1, -1, -1, 0};
    return t->nn++;
}

static void link_child(struct tree *t, int parent, int c) {
    t->n[c].parent = parent;
    t->n[c].sib = t->n[parent].child;
    t->n[parent].child = c;
}

static void unlink_child(struct tree *t, int parent, int c) {
    int *p = &t->n[parent].child;
    while (*p != c) p = &t->n[*p].sib;
    *p = t->n[c].sib;
    t->n[c].sib = -1;
}

static int32_t tok_at(const struct tree *t, int node, int depth) {
    return t->toks[t->n[node].pid][depth];
}

static bool insert(struct tree *t, int pid, int len) {
    int u = 0, d = 0;
    t->n[0].leaves++;
    while (d < len) {
        int c = t->n[u].child;
        while (c >= 0 && tok_at(t, c, d) != t->toks[pid][d]) c = t->n[c].sib;
        if (c < 0) { /* a new leaf run for the rest of the prompt */
            int x = node_new(t, pid, d, len, u);
            if (x < 0) return false;
            link_child(t, u, x);
            u = x, d = len;
            t->n[u].leaves++;
            break;
        }
        int m = 0, run = t->n[c].end - t->n[c].start;
        while (m < run && d + m < len && tok_at(t, c, d + m) == t->toks[pid][d + m]) m++;
        if (m < run) { /* split c at m: a new upper node y keeps c's place */
            int y = node_new(t, t->n[c].pid, t->n[c].start, t->n[c].start + m, u);
            if (y < 0) return false;
            unlink_child(t, u, c);
            link_child(t, u, y);
            t->n[c].start += m;
            link_child(t, y, c);
            t->n[y].leaves = t->n[c].leaves;
            c = y;
        }
        u = c, d += m;
        t->n[u].leaves++;
    }
    t->end_next[pid] = t->n[u].end_head;
    t->n[u].end_head = pid;
    return true;
}

static int n_children(const struct tree *t, int u) {
    int k = 0;
    for (int c = t->n[u].child; c >= 0; c = t->n[c].sib) k++;
    return k;
}

/* MaximizeReuse at node u, children first. */
static bool flatten(struct tree *t, int u) {
    for (int c = t->n[u].child; c >= 0; c = t->n[c].sib)
        if (!flatten(t, c)) return false;
    int nc = n_children(t, u);
    int *cs = malloc(sizeof *cs * (size_t)(nc ? nc : 1));
    if (!cs) return false;
    int k = 0;
    for (int c = t->n[u].child; c >= 0; c = t->n[c].sib) cs[k++] = c;
    for (int i = 0; i < k; i++) {
        int c = cs[i];
        int len_c = t->n[c].end - t->n[c].start;
        for (int g = t->n[c].child, nx; g >= 0; g = nx) {
            nx = t->n[g].sib;
            int len_g = t->n[g].end - t->n[g].start;
            int64_t gain = (int64_t)(t->n[g].leaves - 1) * len_g - len_c;
            if (t->n[g].leaves < 2 || gain <= 0) continue;
            /* g's group shares c's tokens and its own: prepend c's run, move g up to u */
            unlink_child(t, c, g);
            t->n[g].start = t->n[c].start;
            link_child(t, u, g);
            t->n[c].leaves -= t->n[g].leaves;
        }
        /* a node all of whose prompts went to promoted groups is gone */
        if (t->n[c].child < 0 && t->n[c].end_head < 0) {
            unlink_child(t, u, c);
            continue;
        }
        /* a pass-through node left with one child absorbs it */
        int only = t->n[c].child;
        if (only >= 0 && t->n[only].sib < 0 && t->n[c].end_head < 0) {
            t->n[c].pid = t->n[only].pid;
            t->n[c].end = t->n[only].end;
            t->n[c].child = t->n[only].child;
            for (int g = t->n[c].child; g >= 0; g = t->n[g].sib) t->n[g].parent = c;
            t->n[c].end_head = t->n[only].end_head;
            t->n[only].child = -1, t->n[only].end_head = -1;
        }
    }
    free(cs);
    return true;
}

/* the prompts of u's subtree, appended to out */
static void collect(const struct tree *t, int u, int *out, int *k) {
    for (int p = t->n[u].end_head; p >= 0; p = t->end_next[p]) out[(*k)++] = p;
    for (int c = t->n[u].child; c >= 0; c = t->n[c].sib) collect(t, c, out, k);
}

static int cmp_int(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

static int cmp_group(const void *a, const void *b) {
    const struct bgroup *x = a, *y = b;
    return cmp_int(&x->members[0], &y->members[0]);
}

enum kvs_status bgroup_build(const int32_t *const *toks, const int *lens, int n,
                             struct bgrouping *out) {
    memset(out, 0, sizeof *out);
    struct tree t = {.toks = toks};
    t.end_next = malloc(sizeof(int) * (size_t)(n ? n : 1));
    int *buf = malloc(sizeof(int) * (size_t)(n ? n : 1));
    enum kvs_status st = KVS_OK;
    if (!t.end_next || !buf || node_new(&t, 0, 0, 0, -1) < 0) st = KVS_ERR_NOMEM;
    for (int i = 0; i < n && st == KVS_OK; i++)
        if (lens[i] > 0 && !insert(&t, i, lens[i])) st = KVS_ERR_NOMEM;
    if (st == KVS_OK && !flatten(&t, 0)) st = KVS_ERR_NOMEM;
    int n_groups = 0;
    if (st == KVS_OK) {
        n_groups = n_children(&t, 0);
        for (int i = 0; i < n; i++) n_groups += lens[i] <= 0;
        out->groups = calloc((size_t)(n_groups ? n_groups : 1), sizeof *out->groups);
        if (!out->groups) st = KVS_ERR_NOMEM;
    }
    for (int c = st == KVS_OK ? t.n[0].child : -1; c >= 0; c = t.n[c].sib) {
        int k = 0;
        collect(&t, c, buf, &k);
        struct bgroup *g = &out->groups[out->n_groups];
        g->members = malloc(sizeof(int) * (size_t)k);
        if (!g->members) {
            st = KVS_ERR_NOMEM;
            break;
        }
        memcpy(g->members, buf, sizeof(int) * (size_t)k);
        qsort(g->members, (size_t)k, sizeof(int), cmp_int);
        g->n_members = k;
        g->n_prefix = t.n[c].end;
        out->n_groups++;
    }
    for (int i = 0; i < n && st == KVS_OK; i++) {
        if (lens[i] > 0) continue;
        struct bgroup *g = &out->groups[out->n_groups];
        if (!(g->members = malloc(sizeof(int)))) {
            st = KVS_ERR_NOMEM;
            break;
        }
        g->members[0] = i, g->n_members = 1, g->n_prefix = 0;
        out->n_groups++;
    }
    free(t.n), free(t.end_next), free(buf);
    if (st != KVS_OK) {
        bgroup_free(out);
        return kvs_fail(st, "out of memory grouping %d prompts", n);
    }
    qsort(out->groups, (size_t)out->n_groups, sizeof *out->groups, cmp_group);
    for (int i = 0; i < n; i++) out->logical_tokens += lens[i] > 0 ? lens[i] : 0;
    for (int gi = 0; gi < out->n_groups; gi++) {
        const struct bgroup *g = &out->groups[gi];
        out->physical_tokens += g->n_prefix;
        for (int j = 0; j < g->n_members; j++) out->physical_tokens += lens[g->members[j]] - g->n_prefix;
    }
    return KVS_OK;
}

void bgroup_free(struct bgrouping *g) {
    if (!g) return;
    for (int i = 0; i < g->n_groups; i++) free(g->groups[i].members);
    free(g->groups);
    memset(g, 0, sizeof *g);
}
