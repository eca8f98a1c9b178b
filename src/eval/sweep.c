/* sweep.c — see sweep.h. */
#include "eval/sweep.h"
#include "eval/tasks.h"
#include "eval/report.h"
#include "base.h"
#include "threadpool.h"
#include "kv/kv_spec.h"
#include "kv/kv_policy.h"
#include "kv/kv_file.h"
#include "engine.h"

#include <ctype.h>
#include <errno.h>
#include <assert.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void fmt_dur(double s, char *out, size_t n) {
    if (s < 0 || !isfinite(s)) snprintf(out, n, "?");
    else if (s < 60) snprintf(out, n, "%.0fs", s);
    else if (s < 3600) snprintf(out, n, "%dm%02ds", (int)s / 60, (int)s % 60);
    else snprintf(out, n, "%dh%02dm", (int)s / 3600, ((int)s % 3600) / 60);
}

/* Appends a profile's list (methods or tasks) to the config's; the lists are far below
 * EVAL_MAX_LIST, which the assert keeps true as profiles grow. */
#define ADD_LIST(dst, n, src)                                                              \
    do {                                                                                   \
        _Static_assert(sizeof(src) / sizeof(src)[0] <= EVAL_MAX_LIST, "profile list too long"); \
        for (size_t i_ = 0; i_ < sizeof(src) / sizeof(src)[0] && (n) < EVAL_MAX_LIST; i_++)  \
            (dst)[(n)++] = (src)[i_];                                                      \
    } while (0)

void eval_config_default(struct eval_config *c) {
    memset(c, 0, sizeof *c);
    c->model_path = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    c->out_dir = "results/sweep";
    c->data_dir = "data/austen";
    static const char *const M[] = {"full", "streaming", "h2o", "tova", "snapkv", "knorm",
                                    "random"};
    ADD_LIST(c->methods, c->n_methods, M);
    c->ratios[0] = 0.5, c->ratios[1] = 0.25, c->ratios[2] = 0.1, c->n_ratios = 3;
    c->budgets[0] = 256, c->budgets[1] = 512, c->budgets[2] = 1024, c->n_budgets = 3;
    for (int i = 0; eval_task_names[i]; i++) c->tasks[c->n_tasks++] = eval_task_names[i];
    c->lengths[0] = 2048, c->lengths[1] = 4096, c->n_lengths = 2;
    c->samples = 2;
    c->seed = 1;
    c->aware = c->agnostic = true;
    c->ppl_tokens = 4096;
    c->ppl_doc = "prideprejudice";
    c->n_batch = 512;
    c->speed_tokens = 16;
    c->progress = true;
    c->report = true;
}

void eval_config_large(struct eval_config *c) {
    eval_config_default(c);
    c->model_path = "models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";
    c->out_dir = "results/sweep-large";
    /* the learned scorers and the attention scorers' bounded-memory (chunked) form beside the
     * default methods: the comparison of issue 14 at every length */
    static const char *const M[] = {"locret", "agate", "snapkv+when=chunk", "tova+when=chunk",
                                    "h2o+when=chunk", "streaming+when=chunk"};
    ADD_LIST(c->methods, c->n_methods, M);
    c->lengths[0] = 4096, c->lengths[1] = 8192, c->lengths[2] = 16384, c->n_lengths = 3;
    c->samples = 2;
    c->ppl_tokens = 8192;
    c->budgets[0] = 512, c->budgets[1] = 1024, c->budgets[2] = 2048;
}

/* Qwen2.5-1.5B in about an hour on 2 cores: one length (4096), 8 of the 12 tasks (one of each
 * kind), 2 samples, the eviction methods and the storage parts (KIVI, MiKV, ThinK) at three
 * ratios, perplexity on 2048 tokens at one budget. */
void eval_config_medium(struct eval_config *c) {
    eval_config_default(c);
    c->model_path = "models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";
    c->out_dir = "results/sweep-medium";
    static const char *const M[] = {"full", "streaming", "h2o", "tova", "snapkv",
                                    "full+kivi:bits=4", "full+kivi:bits=2", "h2o+mikv:low=4",
                                    "h2o+mikv:low=2", "snapkv+think:prune=0.4"};
    c->n_methods = 0;
    ADD_LIST(c->methods, c->n_methods, M);
    static const char *const T[] = {"niah_single_2", "niah_multikey_1", "niah_multivalue",
                                    "niah_multiquery", "vt", "cwe", "fwe", "qa"};
    c->n_tasks = 0;
    ADD_LIST(c->tasks, c->n_tasks, T);
    c->lengths[0] = 4096, c->n_lengths = 1;
    c->samples = 2;
    c->ppl_tokens = 2048;
    c->budgets[0] = 512, c->n_budgets = 1;
}

/* ---- the run list ------------------------------------------------------------------------- */

struct spec_run {
    const char *method;  /* the user's method string */
    char spec[256];      /* full spec text */
    double ratio;        /* task runs (1 for full) */
    int budget;          /* ppl runs (0 for full) */
    bool direct;         /* compresses during prefill/decode: needs its own prefill */
    kvs_context *ctx;    /* direct runs and ppl runs: a context of its own */
    kvs_sequence *seq;
    double speed;        /* decode tok/s measured at the current length (0 = none) */
    int speed_len;
    /* ppl accumulators */
    double nll, kl, t_eval;
    int64_t n_scored;
};

/* full, alone or with storage parts only (full+kivi:bits=4): no budget, run once */
static bool is_full(const char *m) { return !strcmp(m, "full") || !strncmp(m, "full+", 5); }

/* fork: the spec compresses a copy of the shared prefill, whose context keeps KVS_STATS_QWIN
 * queries */
static int check_spec(const char *spec, bool fork) {
    struct kv_spec ks;
    if (kv_spec_parse(spec, &ks) != KVS_OK) {
        fprintf(stderr, "kvsieve eval: %s\n", kvs_last_error());
        return 2;
    }
    if (fork && kv_policy_qwin(&ks) > KVS_STATS_QWIN) {
        fprintf(stderr, "kvsieve eval: '%s' scores with %d queries; a shared prefill keeps %d "
                "(give it when=prefill to prefill on its own)\n", spec, kv_policy_qwin(&ks),
                KVS_STATS_QWIN);
        return 2;
    }
    return 0;
}

/* ---- resume: the run keys already in results.jsonl -------------------------------------- */

struct keyset { char **k; int n, cap; };

static int cmp_key(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void keyset_load(struct keyset *ks, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return;
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) > 0) {
        if (!strchr(line, '\n')) continue; /* a line cut short by a crash: redo that run */
        const char *p = strstr(line, "\"run\":\"");
        if (!p) continue;
        p += 7;
        const char *e = strchr(p, '"');
        if (!e) continue;
        if (ks->n == ks->cap) {
            int cap = ks->cap ? ks->cap * 2 : 256;
            char **k = realloc(ks->k, (size_t)cap * sizeof *k);
            if (!k) break; /* out of memory: those runs are simply redone */
            ks->k = k;
            ks->cap = cap;
        }
        char *key = strndup(p, (size_t)(e - p));
        if (key) ks->k[ks->n++] = key;
    }
    free(line);
    fclose(f);
    if (ks->n) qsort(ks->k, (size_t)ks->n, sizeof *ks->k, cmp_key);
}

static bool keyset_has(const struct keyset *ks, const char *k) {
    return ks->n && bsearch(&k, ks->k, (size_t)ks->n, sizeof *ks->k, cmp_key);
}

static void keyset_free(struct keyset *ks) {
    for (int i = 0; i < ks->n; i++) free(ks->k[i]);
    free(ks->k);
}

/* run keys hold no quote or backslash: JSON-safe as they are */
static void make_key(char *out, size_t n, const char *sha, const char *kind, const char *task,
                     int length, uint64_t seed, int sample, const char *spec, const char *mode) {
    snprintf(out, n, "%s|%s|%s|%d|%llu|%d|%s|%s", sha, kind, task, length,
             (unsigned long long)seed, sample, spec, mode);
    for (char *p = out; *p; p++)
        if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20) *p = '_';
}

/* a tasks-file prompt's key: the generated prompts' fields, then its id and the hash of what
 * decides its answer (an edited prompt runs again; keys never collide with generated ones) */
static void make_file_key(char *out, size_t n, const char *sha, const struct eval_prompt *p,
                          const char *spec, const char *mode) {
    make_key(out, n, sha, "task", p->task, p->length, p->seed, p->sample, spec, mode);
    size_t L = strlen(out);
    snprintf(out + L, n - L, "|file:%s#%016llx", p->id, (unsigned long long)eval_prompt_hash(p));
    for (char *q = out + L; *q; q++)
        if (*q == '"' || *q == '\\' || (unsigned char)*q < 0x20) *q = '_';
}

/* ---- one results line ---------------------------------------------------------------------- */

struct rec {
    const char *key, *kind, *method, *spec, *mode, *task, *family, *id;
    double ratio;
    int budget, length, sample;
    uint64_t seed;
    double score;            /* NaN = absent */
    const char *answer;
    const struct eval_prompt *prompt;
    double ppl, kl;
    int64_t n_tokens;
    uint64_t kv_bytes, kv_bytes_peak, kv_bytes_full;
    double prefill_tok_s, decode_tok_s;
};

struct sweep {
    const struct eval_config *cfg;
    kvs_model *m;
    struct kvs_model_info info;
    char sha[80];
    char key_sha[32];     /* runs' keys: sha's first 12 characters, "@cuda" after on the GPU */
    char model_name[256]; /* the file's base name without .gguf */
    char device[128];     /* "cpu", or the GPU's name */
    FILE *out;
    struct keyset done;
    struct eval_prompt *fp; /* --tasks-file: its prompts (n_fp), in file order */
    int n_fp;
    double t0;
    int n_written, n_threads;
};

static void put_num(FILE *f, const char *name, double x) {
    if (isfinite(x)) fprintf(f, ",\"%s\":%.6g", name, x);
    else fprintf(f, ",\"%s\":null", name);
}

static void write_rec(struct sweep *sw, const struct rec *r) {
    FILE *f = sw->out;
    char tbuf[32];
    time_t t = time(NULL);
    strftime(tbuf, sizeof tbuf, "%Y-%m-%dT%H:%M:%SZ", gmtime(&t));
    /* (on the GPU its own system, so a report that reads CPU and GPU results keeps them apart) */
    fprintf(f, "{\"system\":\"%s\",\"run\":", sw->cfg->device == KVS_DEVICE_CUDA ? "kvsieve-cuda" : "kvsieve");
    eval_json_str(f, r->key);
    fprintf(f, ",\"kind\":\"%s\",\"model\":", r->kind);
    eval_json_str(f, sw->model_name);
    fprintf(f, ",\"model_sha256\":\"%s\",\"method\":", sw->sha);
    eval_json_str(f, r->method);
    fputs(",\"kv\":", f);
    eval_json_str(f, r->spec);
    put_num(f, "ratio", r->ratio);
    if (r->budget > 0) fprintf(f, ",\"budget\":%d", r->budget);
    fprintf(f, ",\"mode\":\"%s\",\"task\":", r->mode);
    eval_json_str(f, r->task);
    fputs(",\"family\":", f);
    eval_json_str(f, r->family);
    put_num(f, "length", r->length > 0 ? r->length : NAN); /* a tasks file may give none */
    if (r->prompt) {
        fputs(",\"id\":", f);
        eval_json_str(f, r->id);
        fprintf(f, ",\"seed\":%llu,\"sample\":%d", (unsigned long long)r->seed, r->sample);
        put_num(f, "score", r->score);
        fputs(",\"answer\":", f);
        eval_json_str(f, r->answer);
        fputs(",\"expected\":[", f);
        for (int i = 0; i < r->prompt->n_outputs; i++) {
            if (i) fputc(',', f);
            eval_json_str(f, r->prompt->outputs[i]);
        }
        fputc(']', f);
    } else {
        put_num(f, "ppl", r->ppl);
        put_num(f, "kl", r->kl);
        fprintf(f, ",\"n_tokens\":%lld", (long long)r->n_tokens);
    }
    fprintf(f, ",\"kv_bytes\":%llu,\"kv_bytes_peak\":%llu,\"kv_bytes_full\":%llu",
            (unsigned long long)r->kv_bytes, (unsigned long long)r->kv_bytes_peak,
            (unsigned long long)r->kv_bytes_full);
    put_num(f, "prefill_tok_s", r->prefill_tok_s);
    put_num(f, "decode_tok_s", r->decode_tok_s);
    fputs(",\"device\":", f);
    eval_json_str(f, sw->device);
    fputs(",\"git\":", f);
    eval_json_str(f, sw->cfg->git ? sw->cfg->git : "unknown");
    fprintf(f, ",\"threads\":%d,\"time\":\"%s\"}\n", sw->n_threads, tbuf);
    fflush(f);
    sw->n_written++;
}

/* ---- helpers --------------------------------------------------------------------------------- */

static int mkdir_p(const char *path) {
    char tmp[1024];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            if (mkdir(tmp, 0755) && errno != EEXIST) return -1;
            *p = '/';
        }
    return mkdir(tmp, 0755) && errno != EEXIST ? -1 : 0;
}

static void file_sha256(const char *path, char *out, size_t n);

/* the model's sha256, or (no sha256sum) a hash of its tensor directory, so that the run keys
 * of two models never collide */
static void model_id(const struct sweep *sw, const char *path, char *out, size_t n) {
    file_sha256(path, out, n);
    if (!strcmp(out, "unknown"))
        snprintf(out, n, "fnv-%016llx", (unsigned long long)kv_file_model_hash(sw->m));
}

static void file_sha256(const char *path, char *out, size_t n) {
    snprintf(out, n, "unknown");
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "sha256sum '%s' 2>/dev/null", path);
    if (strchr(path, '\'')) return;
    FILE *p = popen(cmd, "r");
    if (!p) return;
    char buf[128] = "";
    if (fgets(buf, sizeof buf, p) && strlen(buf) >= 64) {
        buf[64] = 0;
        snprintf(out, n, "%s", buf);
    }
    pclose(p);
}

static int32_t argmax(const float *x, int n) {
    int32_t b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

static int fail(const char *what) {
    fprintf(stderr, "kvsieve eval: %s: %s\n", what, kvs_last_error());
    return 1;
}

/* ---- perplexity and KL in lockstep ---------------------------------------------------------- */

/* log-sum-exp of a row */
static double row_lse(const float *x, int n) {
    float mx = x[0];
    for (int i = 1; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    double s = 0;
    for (int i = 0; i < n; i++) s += exp((double)(x[i] - mx));
    return mx + log(s);
}

static int run_ppl(struct sweep *sw, int n_threads) {
    const struct eval_config *cfg = sw->cfg;
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.txt", cfg->data_dir, cfg->ppl_doc);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "kvsieve eval: cannot read %s for perplexity (run `make data`)\n", path);
        return 2;
    }
    /* the first ppl_tokens tokens of the novel: read enough bytes (~4.5 per token) */
    size_t want = (size_t)cfg->ppl_tokens * 8 + 4096;
    char *text = malloc(want + 1);
    size_t len = text ? fread(text, 1, want, f) : 0;
    fclose(f);
    if (!text) return fail("out of memory");
    text[len] = 0;
    int cap = (int)len + 16;
    int32_t *toks = malloc((size_t)cap * sizeof *toks);
    int n_tok = toks ? kvs_tokenize(sw->m, text, len, true, false, toks, cap) : -1;
    free(text);
    if (n_tok < 0) { free(toks); return fail("tokenize"); }
    if (n_tok > cfg->ppl_tokens) n_tok = cfg->ppl_tokens;
    if (n_tok < 2) { free(toks); fprintf(stderr, "kvsieve eval: document too short\n"); return 2; }

    /* the runs: full reference + every method × budget not done yet; the chunk size is part of
     * a chunked run's key (compression happens per chunk) */
    char chunk_mode[32];
    snprintf(chunk_mode, sizeof chunk_mode, "chunk/%d", cfg->n_batch);
    struct spec_run runs[EVAL_MAX_LIST * EVAL_MAX_LIST + 1];
    int n_runs = 0;
    char key[700];
    for (int i = 0; i < cfg->n_methods; i++)
        for (int b = 0; b < (is_full(cfg->methods[i]) ? 1 : cfg->n_budgets); b++) {
            struct spec_run *r = &runs[n_runs];
            memset(r, 0, sizeof *r);
            r->method = cfg->methods[i];
            r->budget = is_full(r->method) ? 0 : cfg->budgets[b];
            if (r->budget) snprintf(r->spec, sizeof r->spec, "%s+budget=%d", r->method, r->budget);
            else snprintf(r->spec, sizeof r->spec, "%s", r->method);
            int e = check_spec(r->spec, false);
            if (e) { free(toks); return e; }
            make_key(key, sizeof key, sw->key_sha, "ppl", cfg->ppl_doc, n_tok, 0, 0, r->spec, chunk_mode);
            if (!keyset_has(&sw->done, key)) n_runs++;
        }
    if (n_runs == 0) { free(toks); return 0; }
    int n_vocab = sw->info.n_vocab, nb = cfg->n_batch;
    struct kvs_context_params cp = kvs_context_params_default();
    cp.device = sw->cfg->device;
    cp.n_ctx = n_tok + 8;
    cp.n_threads = n_threads;
    cp.n_batch = nb;
    kvs_context *cfull = NULL;
    kvs_sequence *sfull = NULL;
    float *lf = malloc((size_t)nb * n_vocab * sizeof(float));
    float *lm = malloc((size_t)nb * n_vocab * sizeof(float));
    double *lse_f = malloc((size_t)nb * sizeof(double));
    int rc = 0;
    if (!lf || !lm || !lse_f) { rc = fail("out of memory"); goto out; }
    if (kvs_context_new(sw->m, &cp, &cfull) != KVS_OK || kvs_seq_new(cfull, &sfull) != KVS_OK) {
        rc = fail("context");
        goto out;
    }
    snprintf(sw->device, sizeof sw->device, "%s", kvs_context_device_name(cfull));
    for (int i = 0; i < n_runs; i++) {
        struct spec_run *r = &runs[i];
        cp.kv_spec = r->spec;
        if (kvs_context_new(sw->m, &cp, &r->ctx) != KVS_OK || kvs_seq_new(r->ctx, &r->seq) != KVS_OK) {
            rc = fail(r->spec);
            goto out;
        }
    }
    double t_start = now_s();
    if (cfg->progress)
        fprintf(stderr, "ppl: %s, %d tokens, %d runs in lockstep with the full cache\n",
                cfg->ppl_doc, n_tok, n_runs);
    for (int done = 0; done < n_tok; done += nb) {
        int T = n_tok - done < nb ? n_tok - done : nb;
        if (kvs_eval(cfull, sfull, toks + done, T, true, lf, NULL, NULL) != KVS_OK) {
            rc = fail("full");
            goto out;
        }
        int n_sc = done + T < n_tok ? T : T - 1; /* rows with a next token */
        for (int j = 0; j < n_sc; j++) lse_f[j] = row_lse(lf + (size_t)j * n_vocab, n_vocab);
        for (int i = 0; i < n_runs; i++) {
            struct spec_run *r = &runs[i];
            double t = now_s();
            if (kvs_eval(r->ctx, r->seq, toks + done, T, true, lm, NULL, NULL) != KVS_OK) {
                rc = fail(r->spec);
                goto out;
            }
            r->t_eval += now_s() - t;
            for (int j = 0; j < n_sc; j++) {
                const float *a = lf + (size_t)j * n_vocab, *b = lm + (size_t)j * n_vocab;
                double lse_m = row_lse(b, n_vocab), kl = 0;
                for (int v = 0; v < n_vocab; v++) {
                    double lpf = a[v] - lse_f[j], lpm = b[v] - lse_m;
                    kl += exp(lpf) * (lpf - lpm);
                }
                r->kl += kl > 0 ? kl : 0;
                r->nll += lse_m - b[toks[done + j + 1]];
                r->n_scored++;
            }
        }
        if (cfg->progress) {
            double el = now_s() - t_start;
            char e1[16], e2[16];
            fmt_dur(el, e1, sizeof e1);
            fmt_dur(el / (done + T) * (n_tok - done - T), e2, sizeof e2);
            fprintf(stderr, "\rppl: %d/%d tokens, elapsed %s, ETA %s   ", done + T, n_tok, e1, e2);
        }
    }
    if (cfg->progress) fprintf(stderr, "\n");
    struct kvs_mem_stats msf;
    kvs_context_mem(cfull, &msf);
    for (int i = 0; i < n_runs; i++) {
        struct spec_run *r = &runs[i];
        struct kvs_mem_stats ms;
        kvs_context_mem(r->ctx, &ms);
        make_key(key, sizeof key, sw->key_sha, "ppl", cfg->ppl_doc, n_tok, 0, 0, r->spec, chunk_mode);
        struct rec rr = {.key = key, .kind = "ppl", .method = r->method, .spec = r->spec,
                         .mode = "chunk", .task = "ppl", .family = "ppl",
                         .ratio = NAN, .budget = r->budget, .length = n_tok, .score = NAN,
                         .ppl = exp(r->nll / (double)r->n_scored),
                         .kl = r->kl / (double)r->n_scored, .n_tokens = r->n_scored,
                         .kv_bytes = kvs_seq_payload_bytes(r->seq), .kv_bytes_peak = ms.kv_bytes_peak,
                         .kv_bytes_full = msf.kv_bytes_peak,
                         .prefill_tok_s = n_tok / r->t_eval, .decode_tok_s = NAN};
        write_rec(sw, &rr);
        if (cfg->progress)
            fprintf(stderr, "ppl  %-28s ppl %8.4f  KL %.5f  peak KV %6.1f MiB (full %.1f)\n",
                    r->spec, rr.ppl, rr.kl, ms.kv_bytes_peak / 1048576.0,
                    msf.kv_bytes_peak / 1048576.0);
    }
out:
    for (int i = 0; i < n_runs; i++) kvs_context_free(runs[i].ctx);
    kvs_context_free(cfull);
    free(lf);
    free(lm);
    free(lse_f);
    free(toks);
    return rc;
}

/* ---- tasks ------------------------------------------------------------------------------------ */

enum { MODE_AWARE, MODE_AGNOSTIC };
static const char *const MODE_NAME[] = {"aware", "agnostic"};

struct fork {
    int run, mode;
    kvs_context *ctx;  /* the context the sequence lives in */
    kvs_sequence *s;
    int32_t next;      /* token to feed next */
    int n_gen;
    bool done;
    struct kvs_detok dt;
    char *answer;
    size_t ans_len, ans_cap;
    uint64_t kv_bytes, kv_peak; /* kv_peak: direct runs only */
    double decode_tok_s;        /* direct runs: their own decode (NaN: none) */
    double t_prefill;  /* seconds of prefill + compression charged to this run */
    char key[700];
};

static void ans_push(struct fork *f, const char *s, size_t n) {
    if (f->ans_len + n + 1 > f->ans_cap) {
        size_t cap = f->ans_cap ? f->ans_cap * 2 : 256;
        while (cap < f->ans_len + n + 1) cap *= 2;
        char *p = realloc(f->answer, cap);
        if (!p) return;
        f->answer = p;
        f->ans_cap = cap;
    }
    memcpy(f->answer + f->ans_len, s, n);
    f->ans_len += n;
    f->answer[f->ans_len] = 0;
}

/* take token `tok` as generated; decide whether the fork stops */
static void fork_accept(const kvs_model *m, const struct eval_prompt *p, struct fork *f,
                        int32_t tok) {
    f->n_gen++;
    if (kvs_token_is_eog(m, tok)) { f->done = true; return; }
    char buf[256];
    size_t n = kvs_detok_push(m, &f->dt, tok, buf, sizeof buf);
    ans_push(f, buf, n < sizeof buf ? n : sizeof buf);
    if (p->stop_at_newline && f->answer) {
        const char *s = f->answer; /* a newline after the first letter or digit ends it */
        while (*s && !isalnum((unsigned char)*s)) s++;
        if (*s && strchr(s, '\n')) f->done = true;
    }
    if (f->n_gen >= p->max_new_tokens) f->done = true;
    f->next = tok;
}

/* greedy decoding of every fork of one context, in batches */
static int decode_batch(struct sweep *sw, kvs_context *ctx, const struct eval_prompt *p,
                        struct fork *forks, int n, float *logits) {
    int n_vocab = sw->info.n_vocab;
    kvs_sequence *seqs[64];
    int32_t toks[64];
    int idx[64];
    for (;;) {
        int k = 0;
        for (int i = 0; i < n && k < 64; i++)
            if (!forks[i].done && forks[i].ctx == ctx) {
                seqs[k] = forks[i].s;
                toks[k] = forks[i].next;
                idx[k++] = i;
            }
        if (k == 0) return 0;
        if (kvs_eval_batch(ctx, seqs, toks, k, logits) != KVS_OK) return fail("decode");
        for (int j = 0; j < k; j++)
            fork_accept(sw->m, p, &forks[idx[j]], argmax(logits + (size_t)j * n_vocab, n_vocab));
    }
}

/* decode speed of one compressed sequence alone, in a plain full-cache context */
static double speed_probe(struct sweep *sw, kvs_context *plain, kvs_sequence *ps, kvs_context *src,
                          kvs_sequence *s, int32_t tok, float *logits) {
    if (kvs_seq_copy(plain, ps, src, s) != KVS_OK) return NAN;
    int n = sw->cfg->speed_tokens;
    if (kvs_eval(plain, ps, &tok, 1, false, logits, NULL, NULL) != KVS_OK) return NAN; /* warm-up */
    double t = now_s();
    for (int i = 0; i < n; i++) {
        tok = argmax(logits, sw->info.n_vocab);
        if (kvs_eval(plain, ps, &tok, 1, false, logits, NULL, NULL) != KVS_OK) return NAN;
    }
    return n / (now_s() - t);
}

/* Check the task names and load the novels if a task needs them; 0, or 2 (bad input) with the
 * message on stderr. */
static int tasks_corpus(const struct eval_config *cfg, struct eval_corpus *corpus) {
    memset(corpus, 0, sizeof *corpus);
    bool need = false;
    for (int i = 0; i < cfg->n_tasks; i++) {
        if (!eval_task_family(cfg->tasks[i])) {
            fprintf(stderr, "kvsieve eval: unknown task '%s' (known:", cfg->tasks[i]);
            for (int j = 0; eval_task_names[j]; j++) fprintf(stderr, " %s", eval_task_names[j]);
            fprintf(stderr, ")\n");
            return 2;
        }
        need |= eval_task_needs_corpus(cfg->tasks[i]);
    }
    if (need && eval_corpus_load(cfg->data_dir, corpus) != KVS_OK) {
        fprintf(stderr, "kvsieve eval: %s\n", kvs_last_error());
        return 2;
    }
    return 0;
}

/* the run key of one prompt (generated or from the tasks file) */
static void prompt_key(const struct sweep *sw, const struct eval_prompt *p, const char *spec,
                       const char *mode, char *out, size_t n) {
    if (sw->fp) make_file_key(out, n, sw->key_sha, p, spec, mode);
    else make_key(out, n, sw->key_sha, "task", p->task, p->length, p->seed, p->sample, spec, mode);
}

/* tokens a tasks-file prompt may take, answer included; its length when larger */
static int file_prompt_len(const struct eval_prompt *p) {
    int n = p->n_tok_context + p->n_tok_question + p->max_new_tokens;
    return p->length > n ? p->length : n;
}

static int run_tasks(struct sweep *sw, int n_threads) {
    const struct eval_config *cfg = sw->cfg;
    struct eval_corpus corpus;
    memset(&corpus, 0, sizeof corpus);
    int rc = sw->fp ? 0 : tasks_corpus(cfg, &corpus);
    if (rc) return rc;
    /* runs: full once, every other method at every ratio */
    static struct spec_run runs[EVAL_MAX_LIST * EVAL_MAX_LIST + 1];
    int n_runs = 0, n_fork_runs = 0, max_len = 0;
    for (int i = 0; i < cfg->n_lengths && !sw->fp; i++)
        max_len = cfg->lengths[i] > max_len ? cfg->lengths[i] : max_len;
    for (int i = 0; i < cfg->n_methods; i++)
        for (int b = 0; b < (is_full(cfg->methods[i]) ? 1 : cfg->n_ratios); b++) {
            struct spec_run *r = &runs[n_runs++];
            memset(r, 0, sizeof *r);
            r->method = cfg->methods[i];
            if (is_full(r->method)) {
                r->ratio = 1.0;
                snprintf(r->spec, sizeof r->spec, "%s", r->method);
            } else {
                r->ratio = cfg->ratios[b];
                /* locret and agate score tokens as they are computed: they always prefill on
                 * their own */
                r->direct = strstr(r->method, "when=") || strstr(r->method, "every=") ||
                            !strncmp(r->method, "locret", 6) || !strncmp(r->method, "agate", 5);
                snprintf(r->spec, sizeof r->spec, r->direct ? "%s+ratio=%g" :
                         "%s+ratio=%g+when=prefill+every=0", r->method, r->ratio);
            }
            int e = check_spec(r->spec, !r->direct);
            if (e) { eval_corpus_free(&corpus); return e; }
            n_fork_runs += !r->direct;
        }
    int n_modes = cfg->aware + cfg->agnostic;
    int modes[2], nm = 0;
    if (cfg->aware) modes[nm++] = MODE_AWARE;
    if (cfg->agnostic) modes[nm++] = MODE_AGNOSTIC;
    if (n_fork_runs * n_modes > 62) {
        fprintf(stderr, "kvsieve eval: at most 62 method×ratio×mode runs per prompt (asked %d)\n",
                n_fork_runs * n_modes);
        eval_corpus_free(&corpus);
        return 2;
    }
    /* tasks file: every prompt templated and tokenized before any work */
    for (int i = 0; i < sw->n_fp; i++) {
        if (eval_prompt_prepare(sw->m, &sw->fp[i]) != KVS_OK) {
            fprintf(stderr, "kvsieve eval: %s: %s\n", sw->fp[i].id, kvs_last_error());
            return 1;
        }
        int L = file_prompt_len(&sw->fp[i]);
        max_len = L > max_len ? L : max_len;
    }
    if (sw->fp && max_len > sw->info.n_ctx_train)
        kvs_log(1, "the longest prompt of %s (%d tokens with its answer) is beyond the model's "
                "training context %d", cfg->tasks_file, max_len, sw->info.n_ctx_train);
    /* every prompt can be made (lengths fit the tasks): checked before any work */
    for (int li = 0; li < cfg->n_lengths && !sw->fp; li++)
        if (cfg->lengths[li] > sw->info.n_ctx_train)
            kvs_log(1, "length %d is beyond the model's training context %d", cfg->lengths[li],
                    sw->info.n_ctx_train);
    for (int ti = 0; ti < cfg->n_tasks && !sw->fp; ti++)
        for (int li = 0; li < cfg->n_lengths; li++)
            for (int si = 0; si < cfg->samples; si++) {
                struct eval_prompt p;
                if (eval_task_make(sw->m, &corpus, cfg->tasks[ti], cfg->lengths[li], cfg->seed, si,
                                   &p) != KVS_OK) {
                    fprintf(stderr, "kvsieve eval: %s\n", kvs_last_error());
                    eval_corpus_free(&corpus);
                    return 2;
                }
                eval_prompt_free(&p);
            }
    /* the prompts still to run */
    int n_prompts = sw->fp ? sw->n_fp : cfg->n_tasks * cfg->n_lengths * cfg->samples, n_todo = 0;
    int64_t w_total = 0;
    char key[700];
    bool *todo = calloc((size_t)n_prompts, 1);
    if (!todo) { eval_corpus_free(&corpus); return fail("out of memory"); }
    for (int pi = 0; pi < n_prompts && sw->fp; pi++) {
        for (int r = 0; r < n_runs && !todo[pi]; r++)
            for (int md = 0; md < nm && !todo[pi]; md++) {
                prompt_key(sw, &sw->fp[pi], runs[r].spec, MODE_NAME[modes[md]], key, sizeof key);
                if (!keyset_has(&sw->done, key)) todo[pi] = true;
            }
        if (todo[pi]) { n_todo++; w_total += file_prompt_len(&sw->fp[pi]); }
    }
    for (int pi = 0; pi < n_prompts && !sw->fp; pi++) {
        int ti = pi / (cfg->n_lengths * cfg->samples), li = pi / cfg->samples % cfg->n_lengths;
        int si = pi % cfg->samples;
        for (int r = 0; r < n_runs && !todo[pi]; r++)
            for (int md = 0; md < nm && !todo[pi]; md++) {
                make_key(key, sizeof key, sw->key_sha, "task", cfg->tasks[ti], cfg->lengths[li], cfg->seed,
                         si, runs[r].spec, MODE_NAME[modes[md]]);
                if (!keyset_has(&sw->done, key)) todo[pi] = true;
            }
        if (todo[pi]) { n_todo++; w_total += cfg->lengths[li]; }
    }
    if (n_todo == 0) { free(todo); eval_corpus_free(&corpus); return 0; }
    if (cfg->progress)
        fprintf(stderr, "tasks: %d prompts to run (%d done before), %d runs each (%d methods×ratios × %d modes)\n",
                n_todo, n_prompts - n_todo, n_runs * n_modes, n_runs, n_modes);

    int n_vocab = sw->info.n_vocab;
    struct kvs_context_params cp = kvs_context_params_default();
    cp.device = sw->cfg->device;
    cp.n_ctx = max_len + 256;
    cp.n_threads = n_threads;
    cp.n_batch = cfg->n_batch;
    cp.n_seq_max = 2 + n_fork_runs * n_modes;
    cp.keep_stats = true;
    kvs_context *ctx = NULL, *plain = NULL;
    kvs_sequence *A = NULL, *B = NULL, *P = NULL;
    int max_forks = n_runs * nm;
    struct fork *forks = calloc((size_t)max_forks, sizeof *forks);
    float *logits = malloc((size_t)64 * n_vocab * sizeof(float));
    float *logits_b = malloc((size_t)n_vocab * sizeof(float));
    if (!logits || !logits_b || !forks) { rc = fail("out of memory"); goto out; }
    if (kvs_context_new(sw->m, &cp, &ctx) == KVS_OK)
        snprintf(sw->device, sizeof sw->device, "%s", kvs_context_device_name(ctx));
    if (!ctx || kvs_seq_new(ctx, &A) != KVS_OK ||
        kvs_seq_new(ctx, &B) != KVS_OK) { rc = fail("context"); goto out; }
    struct kvs_context_params pp = cp;
    pp.n_seq_max = 1;
    pp.keep_stats = false;
    if (kvs_context_new(sw->m, &pp, &plain) != KVS_OK || kvs_seq_new(plain, &P) != KVS_OK) {
        rc = fail("context");
        goto out;
    }
    for (int r = 0; r < n_runs; r++)
        if (runs[r].direct) {
            struct kvs_context_params dp = pp;
            dp.kv_spec = runs[r].spec;
            if (kvs_context_new(sw->m, &dp, &runs[r].ctx) != KVS_OK ||
                kvs_seq_new(runs[r].ctx, &runs[r].seq) != KVS_OK) { rc = fail(runs[r].spec); goto out; }
        }
    double t_start = now_s();
    int64_t w_done = 0;
    int k_done = 0;
    for (int pi = 0; pi < n_prompts && rc == 0; pi++) {
        if (!todo[pi]) continue;
        struct eval_prompt p;
        enum kvs_status st = KVS_OK;
        bool owned = !sw->fp; /* a generated prompt, freed here; a file's is the sweep's */
        if (sw->fp) p = sw->fp[pi];
        else {
            int ti = pi / (cfg->n_lengths * cfg->samples), li = pi / cfg->samples % cfg->n_lengths;
            st = eval_task_make(sw->m, &corpus, cfg->tasks[ti], cfg->lengths[li], cfg->seed,
                                pi % cfg->samples, &p);
        }
        if (st != KVS_OK) {
            fprintf(stderr, "kvsieve eval: %s\n", kvs_last_error());
            rc = st == KVS_ERR_INVALID_ARG ? 2 : 1;
            break;
        }
        /* len: the prompt's length, the key of the decode-speed probe and the ETA's weight */
        int si = p.sample, len = sw->fp ? file_prompt_len(&p) : p.length;
        /* 1. the context, once, full cache, all statistics */
        double t = now_s();
        kvs_seq_reset(ctx, A);
        if (kvs_eval(ctx, A, p.tok_context, p.n_tok_context, false, NULL, NULL, NULL) != KVS_OK) {
            rc = fail(p.id);
            if (owned) eval_prompt_free(&p);
            break;
        }
        double t_ctx = now_s() - t;
        t = now_s();
        /* B = context + question, full cache: aware runs start from it, and its size is what the
         * full cache holds for every run of this prompt */
        {
            if (kvs_seq_copy(ctx, B, ctx, A) != KVS_OK ||
                kvs_eval(ctx, B, p.tok_question, p.n_tok_question, false, logits_b, NULL, NULL) != KVS_OK) {
                rc = fail(p.id);
                if (owned) eval_prompt_free(&p);
                break;
            }
        }
        double t_q = now_s() - t;
        uint64_t full_bytes = kvs_seq_payload_bytes(B);
        /* 2. forks */
        int nf = 0;
        for (int r = 0; r < n_runs && rc == 0; r++)
            for (int md = 0; md < nm && rc == 0; md++) {
                struct fork *f = &forks[nf];
                free(f->answer);
                memset(f, 0, sizeof *f);
                f->run = r;
                f->mode = modes[md];
                prompt_key(sw, &p, runs[r].spec, MODE_NAME[f->mode], f->key, sizeof f->key);
                if (keyset_has(&sw->done, f->key)) continue;
                nf++;
                t = now_s();
                if (runs[r].direct) {
                    /* its own prefill: context+question at once (aware) or in two calls */
                    f->ctx = runs[r].ctx;
                    f->s = runs[r].seq;
                    kvs_seq_reset(f->ctx, f->s);
                    kvs_context_kv_peak_reset(f->ctx); /* this run's own high-water mark */
                    int n_all = p.n_tok_context + p.n_tok_question;
                    int32_t *all = malloc((size_t)n_all * sizeof *all);
                    if (!all) { rc = fail("out of memory"); break; }
                    memcpy(all, p.tok_context, (size_t)p.n_tok_context * sizeof *all);
                    memcpy(all + p.n_tok_context, p.tok_question, (size_t)p.n_tok_question * sizeof *all);
                    if (f->mode == MODE_AWARE) st = kvs_eval(f->ctx, f->s, all, n_all, false, logits, NULL, NULL);
                    else {
                        st = kvs_eval(f->ctx, f->s, all, p.n_tok_context, false, NULL, NULL, NULL);
                        if (st == KVS_OK)
                            st = kvs_eval(f->ctx, f->s, p.tok_question, p.n_tok_question, false, logits, NULL, NULL);
                    }
                    free(all);
                    if (st != KVS_OK) { rc = fail(runs[r].spec); break; }
                    f->kv_bytes = kvs_seq_payload_bytes(f->s);
                    f->t_prefill = now_s() - t;
                    fork_accept(sw->m, &p, f, argmax(logits, n_vocab));
                    /* decode now, alone (its sequence is reused by the next mode); its speed is
                     * this decode's, compression while decoding included */
                    double t_dec = now_s();
                    int g0 = f->n_gen;
                    if (!f->done && decode_batch(sw, f->ctx, &p, f, 1, logits)) { rc = 1; break; }
                    t_dec = now_s() - t_dec;
                    f->decode_tok_s = f->n_gen > g0 ? (f->n_gen - g0) / t_dec : NAN;
                    struct kvs_mem_stats fm;
                    kvs_context_mem(f->ctx, &fm);
                    f->kv_peak = fm.kv_bytes_peak; /* everything it allocated, statistics too */
                    continue;
                }
                f->ctx = ctx;
                if (kvs_seq_new(ctx, &f->s) != KVS_OK) { rc = fail("fork"); break; }
                const kvs_sequence *src = f->mode == MODE_AWARE ? B : A;
                if (kvs_seq_copy(ctx, f->s, ctx, src) != KVS_OK ||
                    kvs_seq_compress(ctx, f->s, runs[r].spec) != KVS_OK) { rc = fail(runs[r].spec); break; }
                if (f->mode == MODE_AWARE) {
                    f->kv_bytes = kvs_seq_payload_bytes(f->s);
                    f->t_prefill = t_ctx + t_q + (now_s() - t);
                    if (cfg->speed_tokens > 0 && runs[r].speed_len != len && md == nm - 1) {
                        /* aware only: probe here (with both modes the agnostic fork does) */
                        runs[r].speed = speed_probe(sw, plain, P, ctx, f->s, argmax(logits_b, n_vocab),
                                                    logits);
                        runs[r].speed_len = len;
                    }
                    fork_accept(sw->m, &p, f, argmax(logits_b, n_vocab));
                } else {
                    if (kvs_eval(ctx, f->s, p.tok_question, p.n_tok_question, false, logits, NULL, NULL) != KVS_OK) {
                        rc = fail(runs[r].spec);
                        break;
                    }
                    f->kv_bytes = kvs_seq_payload_bytes(f->s);
                    f->t_prefill = t_ctx + (now_s() - t);
                    /* decode speed of this method at this length, alone in a plain context */
                    if (cfg->speed_tokens > 0 && runs[r].speed_len != len) {
                        int32_t tok = argmax(logits, n_vocab);
                        runs[r].speed = speed_probe(sw, plain, P, ctx, f->s, tok, logits + n_vocab);
                        runs[r].speed_len = len;
                    }
                    fork_accept(sw->m, &p, f, argmax(logits, n_vocab));
                }
            }
        /* 3. decode the forks together */
        double td = now_s();
        if (rc == 0) rc = decode_batch(sw, ctx, &p, forks, nf, logits);
        td = now_s() - td;
        /* 4. score and write */
        for (int i = 0; i < nf && rc == 0; i++) {
            struct fork *f = &forks[i];
            const struct spec_run *r = &runs[f->run];
            double sc = eval_score(&p, f->answer ? f->answer : "");
            bool prefill_mode = !r->direct;
            uint64_t fb = full_bytes; /* what the full cache holds for context + question */
            struct rec rr = {.key = f->key, .kind = "task", .method = r->method, .spec = r->spec,
                             .mode = MODE_NAME[f->mode], .task = p.task, .family = p.family,
                             .ratio = r->ratio, .length = p.length, .sample = si, .seed = p.seed, .id = p.id,
                             .score = sc, .answer = f->answer ? f->answer : "", .prompt = &p,
                             .kv_bytes = f->kv_bytes,
                             .kv_bytes_peak = prefill_mode ? fb : f->kv_peak, .kv_bytes_full = fb,
                             .prefill_tok_s = p.n_tok_context / f->t_prefill,
                             .decode_tok_s = r->direct ? f->decode_tok_s
                                             : r->speed_len == len ? r->speed : NAN};
            write_rec(sw, &rr);
        }
        for (int i = 0; i < nf; i++)
            if (forks[i].ctx == ctx && forks[i].s) {
                kvs_seq_free(ctx, forks[i].s);
                forks[i].s = NULL;
            }
        w_done += len;
        k_done++;
        if (cfg->progress) {
            double el = now_s() - t_start, avg = 0;
            for (int i = 0; i < nf; i++) avg += eval_score(&p, forks[i].answer ? forks[i].answer : "");
            char e1[16], e2[16];
            fmt_dur(el, e1, sizeof e1);
            fmt_dur(el / (double)w_done * (double)(w_total - w_done), e2, sizeof e2);
            fprintf(stderr, "[%d/%d] %-16s len %5d #%d: %5d+%d tokens, prefill %5.0f tok/s, %2d runs "
                    "decoded in %4.1fs, mean score %.2f | elapsed %s, ETA %s\n", k_done, n_todo,
                    p.task, len, si, p.n_tok_context, p.n_tok_question, p.n_tok_context / t_ctx, nf,
                    td, nf ? avg / nf : 0.0, e1, e2);
        }
        if (owned) eval_prompt_free(&p);
    }
out:
    for (int i = 0; forks && i < max_forks; i++) free(forks[i].answer);
    free(forks);
    for (int r = 0; r < n_runs; r++) {
        kvs_context_free(runs[r].ctx);
        runs[r].ctx = NULL;
    }
    kvs_context_free(ctx);
    kvs_context_free(plain);
    free(logits);
    free(logits_b);
    free(todo);
    eval_corpus_free(&corpus);
    return rc;
}

/* ---- entry points ---------------------------------------------------------------------------- */

static int open_model(struct sweep *sw, const struct eval_config *cfg) {
    memset(sw, 0, sizeof *sw);
    sw->cfg = cfg;
    struct kvs_model_params mp = kvs_model_params_default();
    enum kvs_status st = kvs_model_load(cfg->model_path, &mp, &sw->m);
    if (st != KVS_OK) {
        fprintf(stderr, "kvsieve eval: %s\n", kvs_last_error());
        return st == KVS_ERR_IO || st == KVS_ERR_FORMAT || st == KVS_ERR_UNSUPPORTED ? 2 : 1;
    }
    kvs_model_get_info(sw->m, &sw->info);
    const char *b = strrchr(cfg->model_path, '/');
    snprintf(sw->model_name, sizeof sw->model_name, "%s", b ? b + 1 : cfg->model_path);
    size_t L = strlen(sw->model_name);
    if (L > 5 && !strcmp(sw->model_name + L - 5, ".gguf")) sw->model_name[L - 5] = 0;
    return 0;
}

/* --tasks-file: read and check the whole file (nothing runs when a line is malformed) */
static int load_tasks_file(const struct eval_config *cfg, struct eval_prompt **fp, int *n_fp) {
    *fp = NULL;
    *n_fp = 0;
    if (!cfg->tasks_file) return 0;
    char err[600];
    int rc = eval_prompts_load(cfg->tasks_file, fp, n_fp, err, sizeof err);
    if (rc) fprintf(stderr, "kvsieve eval: %s\n", err);
    return rc;
}

int eval_export(const struct eval_config *cfg, const char *path) {
    struct sweep sw;
    struct eval_prompt *fp;
    int n_fp;
    int rc = load_tasks_file(cfg, &fp, &n_fp);
    if (rc) return rc;
    if ((rc = open_model(&sw, cfg)) != 0) {
        eval_prompts_free(fp, n_fp);
        return rc;
    }
    model_id(&sw, cfg->model_path, sw.sha, sizeof sw.sha);
    struct eval_corpus corpus;
    memset(&corpus, 0, sizeof corpus);
    if (!fp && (rc = tasks_corpus(cfg, &corpus)) != 0) {
        kvs_model_free(sw.m);
        return rc;
    }
    FILE *f = strcmp(path, "-") ? fopen(path, "w") : stdout;
    if (!f) {
        fprintf(stderr, "kvsieve eval: cannot write %s: %s\n", path, strerror(errno));
        rc = 1;
    }
    /* a tasks file: re-exported with this model's template split and token counts */
    for (int i = 0; i < n_fp && f && rc == 0; i++) {
        if (eval_prompt_prepare(sw.m, &fp[i]) != KVS_OK) {
            fprintf(stderr, "kvsieve eval: %s: %s\n", fp[i].id, kvs_last_error());
            rc = 1;
            break;
        }
        eval_prompt_write_jsonl(f, &fp[i], sw.model_name, sw.sha);
    }
    for (int ti = 0; ti < cfg->n_tasks && !fp && f && rc == 0; ti++)
        for (int li = 0; li < cfg->n_lengths && rc == 0; li++)
            for (int si = 0; si < cfg->samples && rc == 0; si++) {
                struct eval_prompt p;
                if (eval_task_make(sw.m, &corpus, cfg->tasks[ti], cfg->lengths[li], cfg->seed, si,
                                   &p) != KVS_OK) {
                    fprintf(stderr, "kvsieve eval: %s\n", kvs_last_error());
                    rc = 2;
                    break;
                }
                eval_prompt_write_jsonl(f, &p, sw.model_name, sw.sha);
                eval_prompt_free(&p);
            }
    if (f && f != stdout && fclose(f)) rc = 1;
    else if (f == stdout && fflush(f)) rc = 1;
    eval_corpus_free(&corpus);
    eval_prompts_free(fp, n_fp);
    kvs_model_free(sw.m);
    return rc;
}

/* On the GPU, the methods it runs (kvs_kv_runs_on); each other one skipped with a note. */
static void device_methods(const struct eval_config *cfg, struct eval_config *out) {
    *out = *cfg;
    if (cfg->device == KVS_DEVICE_CPU) return;
    out->n_methods = 0;
    for (int i = 0; i < cfg->n_methods; i++) {
        char spec[300];
        snprintf(spec, sizeof spec, is_full(cfg->methods[i]) ? "%s" : "%s+ratio=0.5", cfg->methods[i]);
        if (kvs_kv_runs_on(spec, cfg->device)) out->methods[out->n_methods++] = cfg->methods[i];
        else
            fprintf(stderr, "eval: skipping '%s' on --device cuda (the GPU runs " GPU_POLICIES ")\n", cfg->methods[i]);
    }
}

int eval_sweep(const struct eval_config *cfg_in) {
    struct eval_config dcfg;
    device_methods(cfg_in, &dcfg);
    const struct eval_config *cfg = &dcfg;
    if (cfg->n_methods == 0 && cfg_in->n_methods > 0) {
        fprintf(stderr, "kvsieve eval: none of the methods runs on --device cuda\n");
        return 2;
    }
    struct sweep sw;
    struct eval_prompt *fp;
    int n_fp;
    int rc = load_tasks_file(cfg, &fp, &n_fp);
    if (rc) return rc;
    if ((rc = open_model(&sw, cfg)) != 0) {
        eval_prompts_free(fp, n_fp);
        return rc;
    }
    sw.fp = fp;
    sw.n_fp = n_fp;
    if (mkdir_p(cfg->out_dir)) {
        fprintf(stderr, "kvsieve eval: cannot create %s: %s\n", cfg->out_dir, strerror(errno));
        eval_prompts_free(fp, n_fp);
        kvs_model_free(sw.m);
        return 1;
    }
    if (cfg->progress) fprintf(stderr, "eval: sha256 of %s ...\n", cfg->model_path);
    model_id(&sw, cfg->model_path, sw.sha, sizeof sw.sha);
    snprintf(sw.key_sha, sizeof sw.key_sha, "%.12s%s", sw.sha, cfg->device == KVS_DEVICE_CUDA ? "@cuda" : "");
    snprintf(sw.device, sizeof sw.device, "%s", cfg->device == KVS_DEVICE_CUDA ? "cuda" : "cpu");
    char path[1200];
    snprintf(path, sizeof path, "%s/results.jsonl", cfg->out_dir);
    keyset_load(&sw.done, path);
    sw.out = fopen(path, "a");
    if (!sw.out) {
        fprintf(stderr, "kvsieve eval: cannot write %s: %s\n", path, strerror(errno));
        eval_prompts_free(fp, n_fp);
        kvs_model_free(sw.m);
        keyset_free(&sw.done);
        return 1;
    }
    int n_threads = cfg->n_threads > 0 ? cfg->n_threads : threadpool_default_threads();
    sw.n_threads = n_threads;
    sw.t0 = now_s();
    if (cfg->progress)
        fprintf(stderr, "eval: %s (%s), results in %s (%d runs already there)\n",
                sw.info.name, sw.sha, path, sw.done.n);
    if (cfg->ppl_tokens > 0 && cfg->n_budgets > 0) rc = run_ppl(&sw, n_threads);
    if (rc == 0 && (sw.fp || (cfg->n_tasks > 0 && cfg->n_lengths > 0 && cfg->samples > 0)))
        rc = run_tasks(&sw, n_threads);
    fclose(sw.out);
    if (cfg->progress) {
        char e[16];
        fmt_dur(now_s() - sw.t0, e, sizeof e);
        fprintf(stderr, "eval: %d runs written in %s\n", sw.n_written, e);
    }
    if (rc == 0 && cfg->report) {
        char err[512] = "";
        if (eval_report(cfg->out_dir, NULL, 0, err, sizeof err) != 0) {
            fprintf(stderr, "kvsieve eval: report: %s\n", err);
            rc = 1;
        } else if (cfg->progress) {
            fprintf(stderr, "eval: report in %s/report.md, plots in %s/plots/\n", cfg->out_dir,
                    cfg->out_dir);
        }
    }
    keyset_free(&sw.done);
    eval_prompts_free(sw.fp, sw.n_fp);
    kvs_model_free(sw.m);
    return rc;
}
