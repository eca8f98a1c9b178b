/* test_eval.c — the evaluation harness on the real SmolLM2 model and the novels:
 *  - task generator: fixed seeds give identical prompts; prompts fit their length; every
 *    expected answer is derived again from the prompt text by an independent solver written
 *    here (needles present exactly once, variable chains resolved, word counts, QA answer
 *    present); the chat-template split concatenates to the whole prompt;
 *  - scorers (RULER's "all" and "part" metrics, newline cut);
 *  - the fork path of the sweep: copy + kvs_seq_compress gives bit for bit the cache and the
 *    logits of a context that runs the same spec with when=prefill; a copy continues exactly
 *    like its original; keep_stats does not change the logits;
 *  - the sweep itself: budget >= length gives the full cache's perplexity and KL 0 exactly,
 *    and a rerun resumes (adds no line).
 * Needs models/ (make models) and data/austen (make data); skips (77, a SKIP line) without the model. */
#include "testutil.h"
#include "kvsieve.h"
#include "engine.h"
#include "eval/tasks.h"
#include "eval/sweep.h"

#include <ctype.h>
#include <unistd.h>

static kvs_model *model;
static struct eval_corpus corpus;
static int n_vocab;

/* ---- independent solvers ------------------------------------------------------------------ */

static int count_sub(const char *h, const char *n) {
    int c = 0;
    for (const char *p = h; (p = strstr(p, n)); p++) c++;
    return c;
}

static bool in_outputs(const struct eval_prompt *p, const char *s) {
    for (int i = 0; i < p->n_outputs; i++)
        if (!strcmp(p->outputs[i], s)) return true;
    return false;
}

/* niah: the keys asked are between "for " and " mentioned" of the question */
static void check_niah(const struct eval_prompt *p) {
    const char *type = strstr(p->question, "UUIDs") ? "UUIDs" : "numbers";
    const char *a = strstr(p->question, " for "), *b = strstr(p->question, " mentioned");
    CHECK(a && b && a < b);
    if (!a || !b) return;
    char keys[512];
    snprintf(keys, sizeof keys, "%.*s", (int)(b - a - 5), a + 5);
    /* split "k1, k2, k3, and k4" / "k1 and k2" / "k1" */
    char *list[8];
    int nk = 0;
    for (char *t = strtok(keys, ","); t && nk < 8; t = strtok(NULL, ",")) {
        while (*t == ' ') t++;
        if (!strncmp(t, "and ", 4)) t += 4;
        list[nk++] = t;
    }
    int found = 0;
    for (int i = 0; i < nk; i++) {
        char needle[256];
        snprintf(needle, sizeof needle, "One of the special magic %s for %s is: ", type, list[i]);
        int c = count_sub(p->context, needle);
        CHECKF(c >= 1, "%s: needle for %s missing", p->id, list[i]);
        for (const char *q = p->context; (q = strstr(q, needle)); q++) {
            const char *v = q + strlen(needle), *e = strstr(v, ". ");
            char val[128];
            snprintf(val, sizeof val, "%.*s", e ? (int)(e - v) : 0, v);
            CHECKF(in_outputs(p, val), "%s: value %s not expected", p->id, val);
            /* each value sits in exactly one needle */
            char full[400];
            snprintf(full, sizeof full, "%s%s.", needle, val);
            CHECKF(count_sub(p->context, full) == 1, "%s: needle '%s' not exactly once", p->id, full);
            found++;
        }
    }
    CHECKF(found == p->n_outputs, "%s: %d needles for %d outputs", p->id, found, p->n_outputs);
}

/* vt: every VAR statement; the names whose chain ends at the asked value */
static void check_vt(const struct eval_prompt *p) {
    char names[64][8], rhs[64][24];
    int n = 0;
    for (const char *q = p->context; (q = strstr(q, "VAR ")) && n < 64; q++) {
        char a[8], r1[16] = "", r2[16] = "";
        if (sscanf(q, "VAR %7s = %15s %15s", a, r1, r2) < 2) continue;
        if (!strcmp(r1, "VAR")) {
            size_t L = strlen(r2);
            if (L && r2[L - 1] == '.') r2[L - 1] = 0;
            snprintf(rhs[n], sizeof rhs[n], "%s", r2);
        } else {
            size_t L = strlen(r1);
            if (L && r1[L - 1] == '.') r1[L - 1] = 0;
            snprintf(rhs[n], sizeof rhs[n], "=%s", r1);
        }
        snprintf(names[n++], 8, "%s", a);
        q += 3;
    }
    const char *v = strstr(p->question, "value ");
    CHECK(v != NULL);
    if (!v) return;
    char value[16];
    sscanf(v + 6, "%15[0-9]", value);
    int hits = 0;
    for (int i = 0; i < n; i++) {
        const char *cur = rhs[i];
        for (int hop = 0; hop < 10 && cur[0] != '='; hop++)
            for (int j = 0; j < n; j++)
                if (!strcmp(names[j], cur)) { cur = rhs[j]; break; }
        bool yes = cur[0] == '=' && !strcmp(cur + 1, value);
        CHECKF(yes == in_outputs(p, names[i]), "%s: %s", p->id, names[i]);
        hits += yes;
    }
    CHECKF(hits == p->n_outputs && n == 5, "%s: %d statements, %d resolve", p->id, n, hits);
}

struct wc { char w[32]; int c; };
static int cmp_wc(const void *a, const void *b) {
    return ((const struct wc *)b)->c - ((const struct wc *)a)->c;
}
static int add_word(struct wc *t, int n, const char *w) {
    for (int i = 0; i < n; i++)
        if (!strcmp(t[i].w, w)) { t[i].c++; return n; }
    snprintf(t[n].w, sizeof t[n].w, "%s", w);
    t[n].c = 1;
    return n + 1;
}

/* cwe / fwe: count the words of the list / coded text; the top k must be the outputs, with a
 * strict gap to the next */
static void check_counts(const struct eval_prompt *p, bool numbered, int k) {
    static struct wc t[8192];
    int n = 0;
    const char *s = strchr(p->context, '\n'); /* skip the instruction line */
    CHECK(s != NULL);
    if (!s) return;
    char w[64];
    for (const char *q = s + 1; *q && n < 8191;) {
        if (numbered) {
            int num;
            if (sscanf(q, "%d. %63s", &num, w) == 2) n = add_word(t, n, w);
            q = strchr(q, '\n');
            if (!q) break;
            q++;
        } else {
            while (*q && !isalpha((unsigned char)*q)) q++;
            int L = 0;
            while (isalpha((unsigned char)q[L]) && L < 63) L++;
            if (!L) break;
            snprintf(w, sizeof w, "%.*s", L, q);
            n = add_word(t, n, w);
            q += L;
        }
    }
    qsort(t, (size_t)n, sizeof t[0], cmp_wc);
    CHECKF(n > k && t[k - 1].c > t[k].c, "%s: no strict top %d", p->id, k);
    for (int i = 0; i < k && i < n; i++) CHECKF(in_outputs(p, t[i].w), "%s: %s", p->id, t[i].w);
}

static void check_prompt(const struct eval_prompt *p) {
    int total = p->n_tok_context + p->n_tok_question + p->max_new_tokens;
    CHECKF(total <= p->length && total >= p->length * 85 / 100, "%s: %d tokens", p->id, total);
    /* the split: context part contains the raw context, question part starts with the question
     * and ends with the answer prefix */
    CHECK(strstr(p->prompt_context, p->context) != NULL);
    CHECK(!strncmp(p->prompt_question, p->question, strlen(p->question)));
    size_t lq = strlen(p->prompt_question), la = strlen(p->answer_prefix);
    CHECK(lq >= la && !strcmp(p->prompt_question + lq - la, p->answer_prefix));
    if (!strncmp(p->task, "niah", 4)) check_niah(p);
    else if (!strcmp(p->task, "vt")) check_vt(p);
    else if (!strcmp(p->task, "cwe")) check_counts(p, true, 10);
    else if (!strcmp(p->task, "fwe")) check_counts(p, false, 3);
    else if (!strcmp(p->task, "qa")) {
        bool any = false;
        for (int i = 0; i < p->n_outputs; i++) any |= strcasestr(p->context, p->outputs[i]) != NULL;
        CHECKF(any, "%s: answer not in the documents", p->id);
        CHECK(strstr(p->question, "Question: ") != NULL);
    }
}

static void test_generator(void) {
    int lengths[] = {1024, 3000};
    /* under the sanitizers (make check): one length, one sample per task */
    bool quick = getenv("KVS_SANITIZE") != NULL;
    for (int ti = 0; eval_task_names[ti]; ti++)
        for (int li = 0; li < (quick ? 1 : 2); li++)
            for (int s = 0; s < (quick ? 1 : 3); s++) {
                struct eval_prompt a, b;
                const char *task = eval_task_names[ti];
                CHECK(eval_task_make(model, &corpus, task, lengths[li], 7, s, &a) == KVS_OK);
                CHECK(eval_task_make(model, &corpus, task, lengths[li], 7, s, &b) == KVS_OK);
                CHECKF(!strcmp(a.prompt_context, b.prompt_context) &&
                       !strcmp(a.prompt_question, b.prompt_question) &&
                       a.n_tok_context == b.n_tok_context &&
                       !memcmp(a.tok_context, b.tok_context, (size_t)a.n_tok_context * 4),
                       "%s: same seed, different prompt", a.id);
                check_prompt(&a);
                struct eval_prompt c;
                CHECK(eval_task_make(model, &corpus, task, lengths[li], 8, s, &c) == KVS_OK);
                CHECKF(strcmp(a.context, c.context) || strcmp(a.question, c.question),
                       "%s: another seed gave the same prompt", a.id);
                eval_prompt_free(&a);
                eval_prompt_free(&b);
                eval_prompt_free(&c);
            }
    struct eval_prompt p;
    CHECK(eval_task_make(model, &corpus, "no_such_task", 1024, 1, 0, &p) == KVS_ERR_INVALID_ARG);
    CHECK(eval_task_make(model, &corpus, "niah_multiquery", 300, 1, 0, &p) == KVS_ERR_INVALID_ARG);
    CHECK(strstr(kvs_last_error(), "too short") != NULL);
    CHECK(eval_task_make(model, NULL, "qa", 1024, 1, 0, &p) == KVS_ERR_INVALID_ARG);
    CHECK(eval_task_make(model, NULL, "niah_single_1", 1024, 1, 0, &p) == KVS_OK);
    eval_prompt_free(&p);
}

static void test_scorer(void) {
    struct eval_prompt p = {0};
    char o1[] = "1234567", o2[] = "ABCDE", o3[] = "x-y", o4[] = "Q";
    p.outputs[0] = o1, p.outputs[1] = o2, p.outputs[2] = o3, p.outputs[3] = o4;
    p.n_outputs = 4;
    p.metric = EVAL_METRIC_ALL;
    CHECK(eval_score(&p, "") == 0.0);
    CHECK(eval_score(&p, "1234567 and abcde") == 0.5);
    CHECK(eval_score(&p, "q X-Y ABCDE 1234567") == 1.0);
    CHECK(eval_score(&p, "123456") == 0.0);
    p.metric = EVAL_METRIC_PART;
    CHECK(eval_score(&p, "abcde") == 1.0);
    CHECK(eval_score(&p, "nothing") == 0.0);
    p.metric = EVAL_METRIC_ALL;
    p.n_outputs = 1;
    p.stop_at_newline = true;
    CHECK(eval_score(&p, ":\n\n1234567\n") == 1.0);  /* leading punctuation/newlines kept */
    CHECK(eval_score(&p, " 7\n1234567") == 0.0);      /* cut after the first line with text */
    p.stop_at_newline = false;
    CHECK(eval_score(&p, " 7\n1234567") == 1.0);
    p.n_outputs = 0;
    CHECK(eval_score(&p, "anything") == 0.0);
}

/* ---- the fork path ≡ a context running the spec ---------------------------------------- */

static bool same_cache(const kvs_sequence *a, const kvs_sequence *b) {
    const struct kv_cache *c = a->kv->owner;
    if (a->n_past != b->n_past || a->pos_shift != b->pos_shift) return false;
    size_t hd = (size_t)c->head_dim;
    for (int i = 0; i < c->n_layer * c->n_head_kv; i++) {
        const struct kv_head_store *x = &a->kv->h[i], *y = &b->kv->h[i];
        if (x->n != y->n) return false;
        if (memcmp(x->pos, y->pos, (size_t)x->n * 4) || memcmp(x->k, y->k, (size_t)x->n * hd * 2) ||
            memcmp(x->v, y->v, (size_t)x->n * hd * 2))
            return false;
    }
    return true;
}

static void test_fork(void) {
    struct eval_prompt p;
    CHECK(eval_task_make(model, &corpus, "niah_single_2", 900, 3, 0, &p) == KVS_OK);
    struct kvs_context_params cp = kvs_context_params_default();
    cp.n_ctx = 1024;
    cp.n_batch = 256;
    cp.n_seq_max = 4;
    cp.keep_stats = true;
    kvs_context *st;
    kvs_sequence *A, *F, *C;
    CHECK(kvs_context_new(model, &cp, &st) == KVS_OK);
    kvs_seq_new(st, &A);
    kvs_seq_new(st, &F);
    kvs_seq_new(st, &C);
    float *l1 = malloc((size_t)n_vocab * 4), *l2 = malloc((size_t)n_vocab * 4);
    CHECK(kvs_eval(st, A, p.tok_context, p.n_tok_context, false, l1, NULL, NULL) == KVS_OK);
    /* keep_stats changes nothing in the logits */
    struct kvs_context_params pp = cp;
    pp.keep_stats = false;
    pp.n_seq_max = 1;
    kvs_context *plain;
    kvs_sequence *P;
    CHECK(kvs_context_new(model, &pp, &plain) == KVS_OK);
    kvs_seq_new(plain, &P);
    CHECK(kvs_eval(plain, P, p.tok_context, p.n_tok_context, false, l2, NULL, NULL) == KVS_OK);
    CHECK(!memcmp(l1, l2, (size_t)n_vocab * 4));
    CHECK(kvs_seq_copy(st, C, st, A) == KVS_OK); /* C: the context alone, for agnostic runs */
    /* a copy continues like its original */
    CHECK(kvs_seq_copy(st, F, st, A) == KVS_OK);
    CHECK(same_cache(F, A));
    CHECK(kvs_eval(st, A, p.tok_question, p.n_tok_question, false, l1, NULL, NULL) == KVS_OK);
    CHECK(kvs_eval(st, F, p.tok_question, p.n_tok_question, false, l2, NULL, NULL) == KVS_OK);
    CHECK(!memcmp(l1, l2, (size_t)n_vocab * 4));
    CHECK(same_cache(F, A));
    /* compress(copy) ≡ a context running the spec with when=prefill, for every scorer */
    const char *specs[] = {"snapkv:ratio=0.25,when=prefill,every=0",
                           "h2o:ratio=0.3,when=prefill,every=0",
                           "tova:ratio=0.2,when=prefill,every=0",
                           "knorm:ratio=0.25,when=prefill,every=0",
                           "streaming:ratio=0.25,when=prefill,every=0",
                           "streaming:ratio=0.25,pos=abs,when=prefill,every=0",
                           "random:ratio=0.5,when=prefill,every=0",
                           "snapkv:ratio=0.1,when=prefill,every=0+alloc=adakv",
                           "h2o:ratio=0.25,when=prefill,every=0+alloc=pyramid",
                           "snapkv:mem=3M,when=prefill,every=0",
                           "h2o:mem=2M,when=prefill,every=0"};
    int n_all = p.n_tok_context + p.n_tok_question;
    int32_t *all = malloc((size_t)n_all * 4);
    memcpy(all, p.tok_context, (size_t)p.n_tok_context * 4);
    memcpy(all + p.n_tok_context, p.tok_question, (size_t)p.n_tok_question * 4);
    /* under the sanitizers (make check, where this loop took 2/3 of test_eval's 12 minutes):
     * the last four specs only (AdaKV, pyramid and both mem= budgets); all eleven otherwise */
    size_t first = getenv("KVS_SANITIZE") ? 7 : 0;
    if (first) fprintf(stderr, "test_fork: sanitizer run, specs %zu..10 of 0..10\n", first);
    for (size_t i = first; i < sizeof specs / sizeof specs[0]; i++) {
        struct kvs_context_params dp = pp;
        dp.kv_spec = specs[i];
        kvs_context *d;
        kvs_sequence *D;
        CHECK(kvs_context_new(model, &dp, &d) == KVS_OK);
        kvs_seq_new(d, &D);
        CHECK(kvs_eval(d, D, all, n_all, false, l1, NULL, NULL) == KVS_OK);
        CHECK(kvs_seq_copy(st, F, st, A) == KVS_OK);
        CHECK(kvs_seq_compress(st, F, specs[i]) == KVS_OK);
        CHECKF(same_cache(F, D), "%s: compressed copy differs from the direct run", specs[i]);
        CHECK(kvs_seq_kv_bytes(F) == kvs_seq_kv_bytes(D));
        CHECK(kvs_seq_kv_bytes(F) < kvs_seq_kv_bytes(A));
        /* and decoding on from either gives the same logits (copied into a plain context) */
        int32_t tok = 42;
        CHECK(kvs_seq_copy(plain, P, st, F) == KVS_OK);
        CHECK(kvs_eval(plain, P, &tok, 1, false, l2, NULL, NULL) == KVS_OK);
        CHECK(kvs_eval(d, D, &tok, 1, false, l1, NULL, NULL) == KVS_OK);
        CHECKF(!memcmp(l1, l2, (size_t)n_vocab * 4), "%s: decode differs", specs[i]);
        /* question-agnostic: the context alone, compressed, equals the direct run's context */
        kvs_seq_reset(d, D);
        CHECK(kvs_eval(d, D, p.tok_context, p.n_tok_context, false, NULL, NULL, NULL) == KVS_OK);
        CHECK(kvs_seq_copy(st, F, st, C) == KVS_OK);
        CHECK(kvs_seq_compress(st, F, specs[i]) == KVS_OK);
        CHECKF(same_cache(F, D), "%s: agnostic copy differs from the direct run", specs[i]);
        kvs_context_free(d);
    }
    /* a copy from a context that kept no queries, compressed by a query scorer: no saved query
     * to read, a deterministic plan all the same */
    kvs_sequence *G;
    CHECK(kvs_seq_copy(plain, P, st, C) == KVS_OK);
    CHECK(kvs_seq_copy(st, F, plain, P) == KVS_OK);
    CHECK(kvs_seq_new(st, &G) == KVS_OK);                 /* the 4th slot */
    kvs_sequence *none;
    CHECK(kvs_seq_new(st, &none) == KVS_ERR_INVALID_ARG); /* none left */
    CHECK(kvs_seq_copy(st, G, plain, P) == KVS_OK);
    CHECK(kvs_seq_compress(st, F, "tova:ratio=0.3") == KVS_OK);
    CHECK(kvs_seq_compress(st, G, "tova:ratio=0.3") == KVS_OK);
    CHECK(same_cache(F, G) && kv_seq_check(F->kv));
    CHECK(kv_seq_max_entries(F->kv) <= (int)(0.3 * p.n_tok_context) + 1);
    /* errors: a spec needing statistics the context lacks, a bad spec, another model's context */
    CHECK(kvs_seq_copy(plain, P, st, A) == KVS_OK);
    CHECK(kvs_seq_compress(plain, P, "h2o:ratio=0.5") == KVS_ERR_INVALID_ARG);
    CHECK(strstr(kvs_last_error(), "keep_stats") != NULL);
    CHECK(kvs_seq_compress(plain, P, "snapkv:ratio=0.5") == KVS_ERR_INVALID_ARG);
    CHECK(kvs_seq_compress(plain, P, "snapkv:ratio=7") == KVS_ERR_INVALID_ARG);
    CHECK(kvs_seq_compress(plain, P, "full") == KVS_OK);
    CHECK(kvs_seq_compress(plain, P, "knorm:budget=100") == KVS_OK);
    CHECK(kv_seq_max_entries(P->kv) <= 100);
    struct kvs_context_params sp = pp;
    sp.n_ctx = 100;
    kvs_context *small;
    kvs_sequence *S;
    CHECK(kvs_context_new(model, &sp, &small) == KVS_OK);
    kvs_seq_new(small, &S);
    CHECK(kvs_seq_copy(small, S, st, A) == KVS_ERR_INVALID_ARG); /* longer than its context */
    kvs_context_free(small);
    free(all);
    free(l1);
    free(l2);
    kvs_context_free(plain);
    kvs_context_free(st);
    eval_prompt_free(&p);
}

/* ---- the sweep: budget >= length ≡ full; resume --------------------------------------------- */

static int count_lines(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    int n = 0, ch;
    while ((ch = fgetc(f)) != EOF) n += ch == '\n';
    fclose(f);
    return n;
}

static void test_sweep(const char *model_path) {
    char dir[] = "/tmp/kvs_test_evalXXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    struct eval_config cfg;
    eval_config_default(&cfg);
    cfg.model_path = model_path;
    cfg.out_dir = dir;
    cfg.methods[0] = "full", cfg.methods[1] = "snapkv", cfg.methods[2] = "h2o";
    cfg.n_methods = 3;
    cfg.budgets[0] = 400, cfg.budgets[1] = 64, cfg.n_budgets = 2;
    cfg.ppl_tokens = 300;
    cfg.n_batch = 128;
    cfg.tasks[0] = "niah_single_1", cfg.n_tasks = 1;
    cfg.lengths[0] = 1024, cfg.n_lengths = 1;
    cfg.ratios[0] = 0.5, cfg.n_ratios = 1;
    cfg.samples = 1;
    cfg.speed_tokens = 2;
    cfg.progress = false;
    cfg.report = false;
    CHECK(eval_sweep(&cfg) == 0);
    char path[256];
    snprintf(path, sizeof path, "%s/results.jsonl", dir);
    int n1 = count_lines(path);
    CHECKF(n1 == 5 + 3 * 2, "%d lines", n1); /* ppl: full + 2×2; tasks: 3 × 2 modes */
    /* parse the ppl lines: budget 400 > 300 tokens must equal full exactly */
    FILE *f = fopen(path, "r");
    char line[8192];
    double ppl_full = -1, ppl_big[2] = {-1, -1}, kl_big[2] = {-1, -1}, ppl_small = -1;
    while (f && fgets(line, sizeof line, f)) {
        if (!strstr(line, "\"kind\":\"ppl\"")) continue;
        double ppl = strtod(strstr(line, "\"ppl\":") + 6, NULL);
        double kl = strtod(strstr(line, "\"kl\":") + 5, NULL);
        if (strstr(line, "\"kv\":\"full\"")) ppl_full = ppl;
        else if (strstr(line, "budget=400")) {
            int i = strstr(line, "snapkv") ? 0 : 1;
            ppl_big[i] = ppl, kl_big[i] = kl;
        } else if (strstr(line, "snapkv+budget=64")) ppl_small = ppl;
    }
    if (f) fclose(f);
    CHECK(ppl_full > 1 && ppl_full < 100);
    for (int i = 0; i < 2; i++) CHECKF(ppl_big[i] == ppl_full && kl_big[i] == 0, "%d: %g vs %g kl %g", i, ppl_big[i], ppl_full, kl_big[i]);
    CHECK(ppl_small > 0 && ppl_small != ppl_full);
    /* resume: nothing left to do, nothing added */
    CHECK(eval_sweep(&cfg) == 0);
    CHECK(count_lines(path) == n1);
    /* a new ratio adds exactly its runs */
    cfg.ratios[1] = 0.25, cfg.n_ratios = 2;
    CHECK(eval_sweep(&cfg) == 0);
    CHECK(count_lines(path) == n1 + 2 * 2);
    /* a method that compresses while prefilling runs its own prefill (no fork): 2 more runs,
     * holding less than the full cache */
    cfg.methods[0] = "h2o:when=chunk";
    cfg.n_methods = 1;
    cfg.n_ratios = 1;
    cfg.ppl_tokens = 0;
    CHECK(eval_sweep(&cfg) == 0);
    CHECK(count_lines(path) == n1 + 2 * 2 + 2);
    f = fopen(path, "r");
    int n_direct = 0;
    while (f && fgets(line, sizeof line, f)) {
        if (!strstr(line, "h2o:when=chunk+ratio=0.5")) continue;
        n_direct++;
        double held = strtod(strstr(line, "\"kv_bytes\":") + 11, NULL);
        double peak = strtod(strstr(line, "\"kv_bytes_peak\":") + 16, NULL);
        double full = strtod(strstr(line, "\"kv_bytes_full\":") + 16, NULL);
        double score = strtod(strstr(line, "\"score\":") + 8, NULL);
        CHECKF(held > 0 && held < 0.75 * full && peak >= held && peak < full && score >= 0 && score <= 1,
               "held %g peak %g full %g score %g", held, peak, full, score);
    }
    if (f) fclose(f);
    CHECK(n_direct == 2);
    unlink(path);
    rmdir(dir);
}

int main(void) {
    const char *path = tu_model_path();
    if (!path) {
        tu_skip("test_eval", "model %s not found: make models", tu_model_name());
        return 77;
    }
    if (kvs_model_load(path, NULL, &model) != KVS_OK) {
        fprintf(stderr, "%s\n", kvs_last_error());
        return 1;
    }
    struct kvs_model_info mi;
    kvs_model_get_info(model, &mi);
    n_vocab = mi.n_vocab;
    const char *data = getenv("KVS_DATA_DIR") ? getenv("KVS_DATA_DIR") : "data/austen";
    if (eval_corpus_load(data, &corpus) != KVS_OK) {
        fprintf(stderr, "test_eval: %s\n", kvs_last_error());
        return 1;
    }
    CHECK(corpus.n_docs == 6 && corpus.n_vocab > 5000);
    test_scorer();
    test_generator();
    test_fork();
    test_sweep(path);
    eval_corpus_free(&corpus);
    kvs_model_free(model);
    return tu_finish("test_eval");
}
