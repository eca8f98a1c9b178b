/* test_batch_group.c — BatchLLM's prefix grouping (src/batch/group.c) on hand-made prompt sets
 * whose groups and token counts are worked out by hand, and on random sets against invariants
 * (every prompt in one group, the prefix really shared, physical <= logical, and never worse
 * than grouping by first-level node alone). No model needed. */
#include "batch/group.h"
#include "testutil.h"

static int32_t *seq(int n, int32_t first) { /* first, first+1, ... */
    int32_t *t = malloc(sizeof(int32_t) * (size_t)(n ? n : 1));
    for (int i = 0; i < n; i++) t[i] = first + i;
    return t;
}

static int32_t *cat(const int32_t *a, int na, const int32_t *b, int nb) {
    int32_t *t = malloc(sizeof(int32_t) * (size_t)(na + nb));
    memcpy(t, a, sizeof(int32_t) * (size_t)na);
    memcpy(t + na, b, sizeof(int32_t) * (size_t)nb);
    return t;
}

/* the invariants every grouping must hold */
static void check_valid(const int32_t *const *toks, const int *lens, int n, const struct bgrouping *g) {
    int *seen = calloc((size_t)(n ? n : 1), sizeof(int));
    int64_t phys = 0, logical = 0;
    for (int gi = 0; gi < g->n_groups; gi++) {
        const struct bgroup *gr = &g->groups[gi];
        CHECK(gr->n_members >= 1);
        phys += gr->n_prefix;
        for (int j = 0; j < gr->n_members; j++) {
            int p = gr->members[j];
            CHECK(p >= 0 && p < n);
            if (p < 0 || p >= n) continue;
            seen[p]++;
            CHECK(lens[p] >= gr->n_prefix);
            CHECK(j == 0 || gr->members[j - 1] < p);
            /* the prefix is the same in every member */
            CHECK(!memcmp(toks[p], toks[gr->members[0]], sizeof(int32_t) * (size_t)gr->n_prefix));
            phys += lens[p] - gr->n_prefix;
        }
    }
    for (int i = 0; i < n; i++) {
        CHECKF(seen[i] == 1, "prompt %d is in %d groups", i, seen[i]);
        logical += lens[i];
    }
    CHECK(g->logical_tokens == logical && g->physical_tokens == phys);
    CHECK(g->physical_tokens <= g->logical_tokens);
    free(seen);
}

static void test_hand_made(void) {
    struct bgrouping g;
    /* nested shared prefixes: A, B share 10 tokens; C, D share the same 10 and 20 more.
     * Promoting the deeper node gains (2 - 1) * 20 - 10 = 10 > 0: two groups, 10 and 30 long. */
    int32_t *p10 = seq(10, 100), *p20 = seq(20, 200);
    int32_t *p30 = cat(p10, 10, p20, 20);
    int32_t x = 1, y = 2, z = 3, w = 4;
    const int32_t *toks[4] = {cat(p10, 10, &x, 1), cat(p10, 10, &y, 1), cat(p30, 30, &z, 1), cat(p30, 30, &w, 1)};
    int lens[4] = {11, 11, 31, 31};
    CHECK(bgroup_build(toks, lens, 4, &g) == KVS_OK);
    check_valid(toks, lens, 4, &g);
    CHECKF(g.n_groups == 2, "%d groups", g.n_groups);
    if (g.n_groups == 2) {
        CHECK(g.groups[0].n_prefix == 10 && g.groups[0].n_members == 2 && g.groups[0].members[0] == 0);
        CHECK(g.groups[1].n_prefix == 30 && g.groups[1].n_members == 2 && g.groups[1].members[0] == 2);
    }
    CHECKF(g.logical_tokens == 84 && g.physical_tokens == 44, "logical %lld physical %lld",
           (long long)g.logical_tokens, (long long)g.physical_tokens);
    bgroup_free(&g);

    /* the same with a short deeper run: (2 - 1) * 5 - 10 < 0, no promotion: one group of 10 */
    int32_t *p15 = cat(p10, 10, p20, 5);
    const int32_t *t2[4] = {toks[0], toks[1], cat(p15, 15, &z, 1), cat(p15, 15, &w, 1)};
    int l2[4] = {11, 11, 16, 16};
    CHECK(bgroup_build(t2, l2, 4, &g) == KVS_OK);
    check_valid(t2, l2, 4, &g);
    CHECK(g.n_groups == 1 && g.groups[0].n_prefix == 10 && g.groups[0].n_members == 4);
    CHECK(g.logical_tokens == 54 && g.physical_tokens == 10 + 1 + 1 + 6 + 6);
    bgroup_free(&g);

    /* no sharing: three prompts with different first tokens, three groups, no saving */
    const int32_t *t3[3] = {seq(5, 10), seq(7, 20), seq(3, 30)};
    int l3[3] = {5, 7, 3};
    CHECK(bgroup_build(t3, l3, 3, &g) == KVS_OK);
    check_valid(t3, l3, 3, &g);
    CHECK(g.n_groups == 3 && g.logical_tokens == 15 && g.physical_tokens == 15);
    bgroup_free(&g);

    /* one request; identical prompts (kept apart, sharing the whole prompt); an empty prompt */
    CHECK(bgroup_build(t3, l3, 1, &g) == KVS_OK);
    CHECK(g.n_groups == 1 && g.groups[0].n_prefix == 5 && g.physical_tokens == 5);
    bgroup_free(&g);
    const int32_t *t4[3] = {t3[1], t3[1], t3[0]};
    int l4[3] = {7, 7, 0};
    CHECK(bgroup_build(t4, l4, 3, &g) == KVS_OK);
    check_valid(t4, l4, 3, &g);
    CHECK(g.n_groups == 2);
    if (g.n_groups == 2) {
        CHECK(g.groups[0].n_members == 2 && g.groups[0].n_prefix == 7);
        CHECK(g.groups[1].n_members == 1 && g.groups[1].members[0] == 2 && g.groups[1].n_prefix == 0);
    }
    CHECK(g.logical_tokens == 14 && g.physical_tokens == 7);
    bgroup_free(&g);
    /* a prompt that is a prefix of another: it ends inside the group, suffix 0 */
    const int32_t *t5[2] = {p30, p10};
    int l5[2] = {30, 10};
    CHECK(bgroup_build(t5, l5, 2, &g) == KVS_OK);
    check_valid(t5, l5, 2, &g);
    CHECK(g.n_groups == 1 && g.groups[0].n_prefix == 10 && g.physical_tokens == 30);
    bgroup_free(&g);
    CHECK(bgroup_build(NULL, NULL, 0, &g) == KVS_OK && g.n_groups == 0);
    bgroup_free(&g);
    for (int i = 0; i < 4; i++) free((void *)toks[i]);
    free((void *)t2[2]), free((void *)t2[3]);
    for (int i = 0; i < 3; i++) free((void *)t3[i]);
    free(p10), free(p20), free(p30), free(p15);
}

/* Random sets: documents shared by several questions, some documents sharing a preamble. */
static void test_random(void) {
    for (int round = 0; round < 40; round++) {
        int n = 1 + (int)(tu_rand_u64() % 60);
        int32_t **toks = malloc(sizeof *toks * (size_t)n);
        int *lens = malloc(sizeof(int) * (size_t)n);
        for (int i = 0; i < n; i++) {
            int pre = (int)(tu_rand_u64() % 3), doc = (int)(tu_rand_u64() % 5);
            int lp = pre ? 8 + pre * 4 : 0, ld = 10 + doc * 7, lq = (int)(tu_rand_u64() % 6);
            lens[i] = lp + ld + lq;
            toks[i] = malloc(sizeof(int32_t) * (size_t)(lens[i] ? lens[i] : 1));
            for (int k = 0; k < lp; k++) toks[i][k] = 1000 * pre + k;
            for (int k = 0; k < ld; k++) toks[i][lp + k] = 50000 + 1000 * doc + k;
            for (int k = 0; k < lq; k++) toks[i][lp + ld + k] = (int32_t)(tu_rand_u64() % 4);
        }
        struct bgrouping g;
        CHECK(bgroup_build((const int32_t *const *)toks, lens, n, &g) == KVS_OK);
        check_valid((const int32_t *const *)toks, lens, n, &g);
        /* never worse than one group per distinct first token with its longest common prefix */
        int64_t base = 0;
        bool done[64] = {0};
        for (int i = 0; i < n; i++) {
            if (done[i] || !lens[i]) {
                if (!lens[i]) done[i] = true;
                continue;
            }
            int lcp = lens[i];
            for (int j = i + 1; j < n; j++)
                if (lens[j] && toks[j][0] == toks[i][0]) {
                    int m = 0;
                    while (m < lcp && m < lens[j] && toks[j][m] == toks[i][m]) m++;
                    lcp = m;
                }
            base += lcp;
            for (int j = i; j < n; j++)
                if (lens[j] && toks[j][0] == toks[i][0]) base += lens[j] - lcp, done[j] = true;
        }
        CHECKF(g.physical_tokens <= base, "round %d: physical %lld above first-level grouping %lld",
               round, (long long)g.physical_tokens, (long long)base);
        bgroup_free(&g);
        for (int i = 0; i < n; i++) free(toks[i]);
        free(toks), free(lens);
    }
}

int main(void) {
    test_hand_made();
    test_random();
    return tu_finish("test_batch_group");
}
