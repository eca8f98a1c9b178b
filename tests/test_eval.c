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
 *    and a rerun resumes (adds no line);
 *  - the tasks file (--tasks-file): the reader's defaults and its refusals (line number and
 *    problem for bad JSON, missing or mistyped fields, unknown metric or key, duplicate ids);
 *    every generated task exported, read back and templated gives the same tokens; exported
 *    prompts run through the sweep from the file give the same records as the built-in run
 *    (same prompts -> same answers, scores and KV bytes); a hand-written file runs and is
 *    scored; a malformed file runs nothing; a rerun resumes and an edited prompt runs again.
 * Needs models/ (make models) and data/austen (make data); skips (77, a SKIP line) without the model. */
#include "testutil.h"
#include "kvsieve.h"
#include "engine.h"
#include "eval/tasks.h"
#include "eval/sweep.h"
#include "eval/jsonl.h"

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

/* ---- the tasks file ---------------------------------------------------------------------- */

static bool parse_ok(const char *line, struct eval_prompt *p) {
    char err[400];
    bool ok = eval_prompt_parse(line, strlen(line), 5, p, err, sizeof err);
    if (!ok) fprintf(stderr, "refused: %s\n", err);
    return ok;
}

/* refused, with a message that holds `want` */
static void check_refused(const char *line, const char *want) {
    struct eval_prompt p;
    char err[400] = "";
    bool ok = eval_prompt_parse(line, strlen(line), 5, &p, err, sizeof err);
    CHECKF(!ok && strstr(err, want), "%s -> %s (wanted '%s')", line, ok ? "accepted" : err, want);
    if (ok) eval_prompt_free(&p);
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

static void test_prompt_parse(void) {
    struct eval_prompt p;
    /* the defaults */
    CHECK(parse_ok("{\"context\":\"c\",\"question\":\"q?\",\"outputs\":[\"x\"]}", &p));
    CHECK(!strcmp(p.id, "line5") && !strcmp(p.task, "custom") && !strcmp(p.family, "custom"));
    CHECK(!strcmp(p.context, "c") && !strcmp(p.question, "q?") && !strcmp(p.answer_prefix, ""));
    CHECK(p.n_outputs == 1 && !strcmp(p.outputs[0], "x") && p.metric == EVAL_METRIC_ALL);
    CHECK(p.max_new_tokens == 32 && !p.stop_at_newline && p.length == 0 && p.seed == 0 && p.sample == 0);
    CHECK(!p.prompt_context && !p.tok_context);
    uint64_t h = eval_prompt_hash(&p);
    eval_prompt_free(&p);
    /* every field given; null = absent; informational fields and meta accepted */
    CHECK(parse_ok("{\"id\":\"a/1\",\"task\":\"t\",\"family\":\"f\",\"length\":900,\"seed\":3,"
                   "\"sample\":2,\"context\":\"c\",\"question\":\"\",\"answer_prefix\":\" A:\","
                   "\"outputs\":[\"x\",\"y\"],\"metric\":\"part\",\"max_new_tokens\":7.0,"
                   "\"stop_at_newline\":true,\"model\":null,\"model_sha256\":\"s\",\"prompt_context\":\"pc\","
                   "\"prompt_question\":\"pq\",\"n_tokens_context\":4,\"n_tokens_question\":null,"
                   "\"meta\":{\"any\":[1,{}]}}", &p));
    CHECK(!strcmp(p.id, "a/1") && !strcmp(p.task, "t") && !strcmp(p.family, "f") && p.length == 900);
    CHECK(p.seed == 3 && p.sample == 2 && !strcmp(p.question, "") && !strcmp(p.answer_prefix, " A:"));
    CHECK(p.n_outputs == 2 && p.metric == EVAL_METRIC_PART && p.max_new_tokens == 7 && p.stop_at_newline);
    CHECK(!p.prompt_context); /* the file's split is not ours to trust: rebuilt by prepare */
    CHECK(eval_prompt_hash(&p) != h);
    eval_prompt_free(&p);
    CHECK(parse_ok("{\"task\":\"qa\",\"context\":\"c\",\"question\":\"q?\",\"outputs\":[\"x\"],"
                   "\"metric\":null}", &p));
    CHECK(!strcmp(p.family, "qa") && p.metric == EVAL_METRIC_ALL); /* family defaults to the task */
    eval_prompt_free(&p);
    /* refusals: each says what is wrong */
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"]", "bad JSON: column");
    check_refused("not json", "bad JSON");
    check_refused("[\"context\"]", "bad JSON");
    check_refused("{\"question\":\"q\",\"outputs\":[\"x\"]}", "missing field \"context\"");
    check_refused("{\"context\":\"\",\"question\":\"q\",\"outputs\":[\"x\"]}", "\"context\" is empty");
    check_refused("{\"context\":\"c\",\"outputs\":[\"x\"]}", "missing field \"question\"");
    check_refused("{\"context\":\"c\",\"question\":\"q\"}", "missing field \"outputs\"");
    check_refused("{\"context\":7,\"question\":\"q\",\"outputs\":[\"x\"]}", "\"context\" must be a string, got a number");
    check_refused("{\"context\":\"c\",\"question\":null,\"outputs\":[\"x\"]}", "\"question\" must be a string, got null");
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":\"x\"}", "\"outputs\" must be an array of strings, got a string");
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":[1]}", "\"outputs\" must be an array of strings");
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":[]}", "holds 0 answers");
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\",\"\"]}", "answer 2 is empty");
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"],\"metric\":\"exact\"}", "unknown metric \"exact\"");
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"],\"metric\":1}", "\"metric\" must be a string");
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"],\"max_new_tokens\":\"32\"}", "\"max_new_tokens\" must be an integer from 1 to 4096, got a string");
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"],\"max_new_tokens\":0}", "got 0");
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"],\"max_new_tokens\":2.5}", "got 2.5");
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"],\"length\":-1}", "\"length\" must be an integer");
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"],\"seed\":true}", "\"seed\" must be an integer");
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"],\"stop_at_newline\":1}", "\"stop_at_newline\" must be true or false");
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"],\"answers\":[\"x\"]}", "unknown field \"answers\"");
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"],\"id\":\"\"}", "\"id\" is empty");
    check_refused("{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"],\"prompt_context\":[]}", "\"prompt_context\" must be a string");
    char longtask[200];
    snprintf(longtask, sizeof longtask, "{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"],\"task\":\"%070d\"}", 0);
    check_refused(longtask, "\"task\" is longer than 63 bytes");
    /* whole files: line numbers (blank lines counted), BOM, duplicates, empty */
    char dir[] = "/tmp/kvs_test_tfXXXXXX", path[256], err[600];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof path, "%s/t.jsonl", dir);
    struct eval_prompt *ps;
    int n;
    write_file(path, "\xEF\xBB\xBF{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"]}\n\n  \r\n"
                     "{\"id\":\"b\",\"context\":\"d\",\"question\":\"q\",\"outputs\":[\"y\"]}");
    CHECKF(eval_prompts_load(path, &ps, &n, err, sizeof err) == 0, "%s", err);
    CHECK(n == 2 && !strcmp(ps[0].id, "line1") && !strcmp(ps[1].id, "b") && !strcmp(ps[1].context, "d"));
    eval_prompts_free(ps, n);
    write_file(path, "{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"]}\n\n"
                     "{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"],\"metric\":\"most\"}\n");
    CHECK(eval_prompts_load(path, &ps, &n, err, sizeof err) == 2 && !ps && n == 0);
    CHECKF(strstr(err, "t.jsonl:3: unknown metric \"most\"") != NULL, "%s", err);
    write_file(path, "{\"id\":\"line2\",\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"]}\n"
                     "{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"]}\n");
    CHECK(eval_prompts_load(path, &ps, &n, err, sizeof err) == 2);
    CHECKF(strstr(err, "t.jsonl:2: id \"line2\" already used on line 1") != NULL, "%s", err);
    write_file(path, "\n \n");
    CHECK(eval_prompts_load(path, &ps, &n, err, sizeof err) == 2 && strstr(err, "no prompts"));
    unlink(path);
    CHECK(eval_prompts_load(path, &ps, &n, err, sizeof err) == 2 && strstr(err, "cannot read"));
    rmdir(dir);
}

/* every generated task, exported and read back, templated again: the same text and tokens */
static void test_prompt_roundtrip(void) {
    for (int ti = 0; eval_task_names[ti]; ti++) {
        struct eval_prompt g, r;
        CHECK(eval_task_make(model, &corpus, eval_task_names[ti], 1024, 5, 1, &g) == KVS_OK);
        char *buf = NULL, err[400];
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);
        eval_prompt_write_jsonl(f, &g, "m", "s");
        fclose(f);
        CHECKF(eval_prompt_parse(buf, len, 1, &r, err, sizeof err), "%s: %s", g.id, err);
        CHECK(eval_prompt_prepare(model, &r) == KVS_OK);
        CHECKF(!strcmp(g.id, r.id) && !strcmp(g.task, r.task) && !strcmp(g.family, r.family) &&
               g.length == r.length && g.seed == r.seed && g.sample == r.sample &&
               !strcmp(g.prompt_context, r.prompt_context) &&
               !strcmp(g.prompt_question, r.prompt_question) &&
               g.n_tok_context == r.n_tok_context && g.n_tok_question == r.n_tok_question &&
               !memcmp(g.tok_context, r.tok_context, (size_t)g.n_tok_context * 4) &&
               !memcmp(g.tok_question, r.tok_question, (size_t)g.n_tok_question * 4) &&
               g.metric == r.metric && g.max_new_tokens == r.max_new_tokens &&
               g.stop_at_newline == r.stop_at_newline && g.n_outputs == r.n_outputs,
               "%s: the exported prompt reads back differently", g.id);
        for (int i = 0; i < g.n_outputs && i < r.n_outputs; i++) CHECK(!strcmp(g.outputs[i], r.outputs[i]));
        free(buf);
        eval_prompt_free(&g);
        eval_prompt_free(&r);
    }
}

/* the task records of a results file */
static int load_records(const char *path, struct jsonl_obj *recs, int max) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char *line = NULL, err[200];
    size_t cap = 0;
    ssize_t len;
    int n = 0;
    while ((len = getline(&line, &cap, f)) > 0 && n < max) {
        struct jsonl_obj o;
        if (!jsonl_parse(line, (size_t)len, &o, err, sizeof err)) { n = -1; break; }
        const char *kind = jsonl_get_str(&o, "kind");
        if (kind && !strcmp(kind, "task")) recs[n++] = o;
        else jsonl_obj_free(&o);
    }
    free(line);
    fclose(f);
    return n;
}

static const char *sget(const struct jsonl_obj *o, const char *k) {
    const char *s = jsonl_get_str(o, k);
    return s ? s : "(none)";
}

/* the records of a run equal but for the run key and the clock: every string and number */
static bool same_record(const struct jsonl_obj *a, const struct jsonl_obj *b) {
    const char *strs[] = {"system", "kind", "model", "model_sha256", "method", "kv", "mode", "task",
                          "family", "id", "answer"};
    const char *nums[] = {"ratio", "length", "seed", "sample", "score", "kv_bytes", "kv_bytes_peak",
                          "kv_bytes_full"};
    for (size_t i = 0; i < sizeof strs / sizeof *strs; i++)
        if (strcmp(sget(a, strs[i]), sget(b, strs[i]))) {
            fprintf(stderr, "%s: '%s' vs '%s'\n", strs[i], sget(a, strs[i]), sget(b, strs[i]));
            return false;
        }
    for (size_t i = 0; i < sizeof nums / sizeof *nums; i++)
        if (jsonl_get_num(a, nums[i]) != jsonl_get_num(b, nums[i])) {
            fprintf(stderr, "%s: %g vs %g\n", nums[i], jsonl_get_num(a, nums[i]), jsonl_get_num(b, nums[i]));
            return false;
        }
    const struct jsonl_value *ea = jsonl_get(a, "expected"), *eb = jsonl_get(b, "expected");
    if (!ea || !eb || ea->type != JSONL_STRINGS || eb->type != JSONL_STRINGS || ea->n_items != eb->n_items)
        return false;
    for (int i = 0; i < ea->n_items; i++)
        if (strcmp(ea->items[i], eb->items[i])) return false;
    return true;
}

static void test_tasks_file_sweep(const char *model_path) {
    char dir[] = "/tmp/kvs_test_tfsXXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char exported[300], out_a[300], out_b[300], res_a[320], res_b[320];
    snprintf(exported, sizeof exported, "%s/tasks.jsonl", dir);
    snprintf(out_a, sizeof out_a, "%s/builtin", dir);
    snprintf(out_b, sizeof out_b, "%s/file", dir);
    snprintf(res_a, sizeof res_a, "%s/results.jsonl", out_a);
    snprintf(res_b, sizeof res_b, "%s/results.jsonl", out_b);
    struct eval_config cfg;
    eval_config_default(&cfg);
    cfg.model_path = model_path;
    cfg.methods[0] = "full", cfg.methods[1] = "snapkv", cfg.methods[2] = "streaming";
    cfg.n_methods = 3;
    cfg.ratios[0] = 0.25, cfg.n_ratios = 1;
    cfg.ppl_tokens = 0;
    cfg.tasks[0] = "niah_single_2", cfg.tasks[1] = "vt", cfg.tasks[2] = "qa", cfg.n_tasks = 3;
    cfg.lengths[0] = 800, cfg.n_lengths = 1;
    cfg.samples = 1;
    cfg.seed = 4;
    cfg.speed_tokens = 0;
    cfg.progress = false;
    cfg.report = false;
    /* (a) built-in run, then the same prompts exported and run from the file */
    CHECK(eval_export(&cfg, exported) == 0);
    cfg.out_dir = out_a;
    CHECK(eval_sweep(&cfg) == 0);
    struct eval_config fc = cfg;
    fc.n_tasks = 0;
    fc.tasks_file = exported;
    fc.out_dir = out_b;
    CHECK(eval_sweep(&fc) == 0);
    enum { MAXR = 64 };
    static struct jsonl_obj ra[MAXR], rb[MAXR];
    int na = load_records(res_a, ra, MAXR), nb = load_records(res_b, rb, MAXR);
    CHECKF(na == 3 * 3 * 2 && nb == na, "%d built-in records, %d from the file", na, nb);
    int matched = 0, scored = 0;
    for (int i = 0; i < na; i++)
        for (int j = 0; j < nb; j++)
            if (!strcmp(sget(&ra[i], "id"), sget(&rb[j], "id")) && !strcmp(sget(&ra[i], "kv"), sget(&rb[j], "kv")) &&
                !strcmp(sget(&ra[i], "mode"), sget(&rb[j], "mode"))) {
                CHECKF(same_record(&ra[i], &rb[j]), "%s %s %s", sget(&ra[i], "id"), sget(&ra[i], "kv"),
                       sget(&ra[i], "mode"));
                CHECK(strcmp(sget(&ra[i], "run"), sget(&rb[j], "run")) != 0); /* keys never collide */
                matched++;
                scored += jsonl_get_num(&ra[i], "score") > 0;
            }
    CHECKF(matched == na, "%d of %d records matched", matched, na);
    fprintf(stderr, "tasks file vs built-in: %d of %d records equal (%d with a nonzero score)\n", matched,
            na, scored);
    for (int i = 0; i < na; i++) jsonl_obj_free(&ra[i]);
    for (int i = 0; i < nb; i++) jsonl_obj_free(&rb[i]);
    /* (d) resume: nothing new (a new ratio adding exactly its runs is test_sweep's check; the
     * run list is the same code for both sources) */
    CHECK(eval_sweep(&fc) == 0);
    CHECK(count_lines(res_b) == 18);
    /* (b) a hand-written file: two prompts, a custom question, defaults; then one edited prompt
     * runs again and the other is skipped */
    char hand[300], out_h[300], res_h[320];
    snprintf(hand, sizeof hand, "%s/hand.jsonl", dir);
    snprintf(out_h, sizeof out_h, "%s/hand", dir);
    snprintf(res_h, sizeof res_h, "%s/results.jsonl", out_h);
    write_file(hand, "{\"id\":\"vault\",\"context\":\"Notes of the day. The vault code is 4712. Lunch at "
                     "noon.\",\"question\":\"What is the vault code?\",\"outputs\":[\"4712\"],"
                     "\"stop_at_newline\":true}\n"
                     "{\"task\":\"capital\",\"context\":\"Paris is the capital of France.\",\"question\":"
                     "\"Which city is the capital of France?\",\"answer_prefix\":\" Answer:\",\"outputs\":"
                     "[\"Paris\"],\"metric\":\"part\",\"max_new_tokens\":8}\n");
    struct eval_config hc = fc;
    hc.tasks_file = hand;
    hc.out_dir = out_h;
    hc.methods[0] = "full", hc.methods[1] = "snapkv", hc.n_methods = 2;
    hc.ratios[0] = 0.5, hc.n_ratios = 1;
    CHECK(eval_sweep(&hc) == 0);
    static struct jsonl_obj rh[MAXR];
    int nh = load_records(res_h, rh, MAXR);
    CHECKF(nh == 2 * 2 * 2, "%d records", nh);
    int full_hits = 0;
    for (int i = 0; i < nh; i++) {
        double sc = jsonl_get_num(&rh[i], "score");
        CHECK(sc >= 0 && sc <= 1);
        CHECK(isnan(jsonl_get_num(&rh[i], "length"))); /* none given: null */
        bool vault = !strcmp(sget(&rh[i], "id"), "vault");
        CHECK(!strcmp(sget(&rh[i], "task"), vault ? "custom" : "capital"));
        CHECK(!strcmp(sget(&rh[i], "family"), vault ? "custom" : "capital"));
        CHECK(vault || !strcmp(sget(&rh[i], "id"), "line2"));
        if (!strcmp(sget(&rh[i], "kv"), "full")) {
            full_hits += sc == 1;
            fprintf(stderr, "hand-written %s (%s): score %g, answer '%s'\n", sget(&rh[i], "id"),
                    sget(&rh[i], "mode"), sc, sget(&rh[i], "answer"));
        }
        jsonl_obj_free(&rh[i]);
    }
    CHECKF(full_hits == 4, "the full cache answers both easy questions in both modes (%d of 4)", full_hits);
    CHECK(eval_sweep(&hc) == 0);
    CHECK(count_lines(res_h) == 8);
    write_file(hand, "{\"id\":\"vault\",\"context\":\"Notes of the day. The vault code is 9135. Lunch at "
                     "noon.\",\"question\":\"What is the vault code?\",\"outputs\":[\"9135\"],"
                     "\"stop_at_newline\":true}\n"
                     "{\"task\":\"capital\",\"context\":\"Paris is the capital of France.\",\"question\":"
                     "\"Which city is the capital of France?\",\"answer_prefix\":\" Answer:\",\"outputs\":"
                     "[\"Paris\"],\"metric\":\"part\",\"max_new_tokens\":8}\n");
    CHECK(eval_sweep(&hc) == 0);
    CHECK(count_lines(res_h) == 8 + 4); /* the edited prompt's 4 runs, not the other's */
    /* (c) a malformed file: exit code 2, nothing run, no results directory */
    char bad[300], out_x[300];
    snprintf(bad, sizeof bad, "%s/bad.jsonl", dir);
    snprintf(out_x, sizeof out_x, "%s/never", dir);
    write_file(bad, "{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"]}\n"
                    "{\"context\":\"c\",\"question\":\"q\",\"outputs\":[\"x\"],\"max_new_tokens\":\"9\"}\n");
    hc.tasks_file = bad;
    hc.out_dir = out_x;
    CHECK(eval_sweep(&hc) == 2);
    CHECK(access(out_x, F_OK) != 0);
    CHECK(eval_export(&hc, "-") == 2);
    /* clean up */
    const char *files[] = {res_a, res_b, res_h, exported, hand, bad};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) unlink(files[i]);
    rmdir(out_a);
    rmdir(out_b);
    rmdir(out_h);
    rmdir(dir);
}

int main(void) {
    test_prompt_parse(); /* no model needed */
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
    test_prompt_roundtrip();
    test_tasks_file_sweep(path);
    eval_corpus_free(&corpus);
    kvs_model_free(model);
    return tu_finish("test_eval");
}
