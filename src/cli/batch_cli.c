/* batch_cli.c — `kvsieve batch -i requests.jsonl -o results.jsonl`: an offline batch in the
 * OpenAI Batch API line format, run with BatchLLM's grouping and scheduling (src/batch/runner.c).
 * Part of the program: it prints progress and errors and returns the exit code (0 ok, 1 runtime
 * failure, 2 bad usage). Bodies are parsed and validated by the server's request parser
 * (src/server/request.c), so a line is accepted exactly when the server would accept its body.
 *
 * Output: one line per request as it finishes, flushed:
 *   {"id":"batch_req_N","custom_id":C,"response":{"status_code":200,"request_id":ID,"body":{...}},"error":null}
 * or, for a line that cannot run, "response":null and "error":{"code","message"} (the message names
 * the input line). A rerun with the same output file skips every custom_id already there (a torn
 * last line from a crash is cut off first), so an interrupted batch resumes without losing or
 * repeating anything finished. */
#include "cli/batch_cli.h"
#include "batch/runner.h"
#include "server/request.h"

#include <errno.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

static const char *USAGE =
    "usage: kvsieve batch -i REQUESTS.jsonl -o RESULTS.jsonl [options]\n"
    "\n"
    "Runs an offline batch in the OpenAI Batch API format: each input line is\n"
    "  {\"custom_id\": \"...\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\" or\n"
    "   \"/v1/completions\", \"body\": {...the body `kvsieve serve` takes, `kv` included...}}\n"
    "and each output line {\"id\", \"custom_id\", \"response\": {\"status_code\", \"request_id\",\n"
    "\"body\"}, \"error\"} is written as its request finishes. A bad line gets an error line naming\n"
    "its line number; the rest of the batch runs. Rerunning with the same -o resumes: custom_ids\n"
    "already in the output are skipped (Ctrl-C stops after the current step, losing nothing\n"
    "finished).\n"
    "\n"
    "Scheduling (BatchLLM, arXiv 2412.03594): the prompts are grouped by shared prefix over the\n"
    "whole file, each group's prefix is prefilled once and shared by its requests until the last\n"
    "one finishes, groups run decode-heavy first (max_tokens / prompt length), and every step\n"
    "carries decode tokens first, then prompt chunks, within --kv-mem.\n"
    "\n"
    "options:\n"
    "  -i, --input FILE      requests, JSONL (required)\n"
    "  -o, --output FILE     results, JSONL, appended to (required)\n"
    "  -m, --model FILE      GGUF model (default models/SmolLM2-135M-Instruct.Q4_1.gguf)\n"
    "  -t, --threads N       worker threads (default: all cores)\n"
    "  -c, --ctx-size N      context per request (default: the model's, at most 4096)\n"
    "  -np, --parallel N     most sequences at once, shared-prefix prefills included (default 8;\n"
    "                        1 runs requests one by one, without grouping)\n"
    "  -b, --batch N         tokens per step (default 512)\n"
    "      --kv SPEC         default KV policy (a request's `kv` overrides it)\n"
    "      --kv-mem BYTES    KV bytes the running work may hold (suffix K, M, G; default 1G)\n"
    "      --no-group        no prefix sharing (each request computes its whole prompt)\n"
    "      --no-reorder      run groups and requests in input order\n"
    "      --no-pack         do not keep the packed copy of the weights (Q4_0/Q4_1/Q8_0/Q4_K/\n"
    "                        Q6_K) that batched decode reads: 1.4x faster at 16 sequences, for\n"
    "                        about the weights' size again in RAM\n"
    "      --json            print a JSON summary on stdout at the end\n"
    "  -q, --quiet           no progress line\n";

struct bopts {
    const char *in, *out, *model, *kv;
    int threads, n_ctx, parallel, batch;
    int64_t kv_mem;
    bool group, reorder, json, quiet, no_pack;
};

static int usage_error(const char *fmt, const char *a) {
    fprintf(stderr, "kvsieve batch: ");
    fprintf(stderr, fmt, a);
    fprintf(stderr, "\n(see `kvsieve batch --help`)\n");
    return 2;
}

static bool parse_int_arg(const char *s, int lo, int hi, int *out) {
    char *e;
    errno = 0;
    long v = strtol(s, &e, 10);
    if (errno || e == s || *e || v < lo || v > hi) return false;
    *out = (int)v;
    return true;
}

static bool parse_bytes(const char *s, int64_t *out) {
    char *e;
    errno = 0;
    double v = strtod(s, &e);
    if (errno || e == s || v < 0) return false;
    double m = 1;
    if (*e == 'K' || *e == 'k') m = 1024.0, e++;
    else if (*e == 'M' || *e == 'm') m = 1048576.0, e++;
    else if (*e == 'G' || *e == 'g') m = 1073741824.0, e++;
    if (*e == 'B' || *e == 'b') e++;
    if (*e || v * m > 9e18) return false;
    *out = (int64_t)(v * m);
    return true;
}

/* ---- requests ---------------------------------------------------------------------------- */

struct breq {
    char *custom_id;
    int line;
    enum srv_kind kind;
    struct srv_params p;
    int32_t *toks;
    int n_toks;
    /* output as it is generated */
    struct kvs_detok dt;
    char *text;
    size_t len, cap;
    bool stopped_by_string;
};

struct batch {
    const struct bopts *o;
    kvs_model *m;
    const char *model_id;
    struct breq *r;
    int n, n_lines;
    FILE *out;
    int64_t written;
    double t0, last_progress;
    long long created;
    int64_t prompt_logical, prompt_computed;
    int errors_input;
};

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void text_append(struct breq *q, const char *s, size_t n) {
    if (q->len + n + 1 > q->cap) {
        size_t cap = q->cap ? q->cap * 2 : 256;
        while (cap < q->len + n + 1) cap *= 2;
        char *t = realloc(q->text, cap);
        if (!t) return; /* keeps what fits; the line is still written */
        q->text = t, q->cap = cap;
    }
    memcpy(q->text + q->len, s, n);
    q->len += n;
    q->text[q->len] = 0;
}

static void write_line(struct batch *b, json_t *line) {
    char *s = json_dumps(line, JSON_COMPACT);
    json_decref(line);
    if (!s) return;
    fputs(s, b->out);
    fputc('\n', b->out);
    fflush(b->out);
    free(s);
    b->written++;
}

static void write_error(struct batch *b, const char *custom_id, int line, const char *code,
                        const char *fmt, const char *detail) {
    char msg[768];
    snprintf(msg, sizeof msg, "line %d: ", line);
    size_t k = strlen(msg);
    snprintf(msg + k, sizeof msg - k, fmt, detail);
    srv_utf8_scrub(msg); /* jansson's "near '...'" may cut a character of the line in two */
    char id[48];
    snprintf(id, sizeof id, "batch_req_line_%d", line);
    json_t *j = json_pack("{s:s, s:o, s:n, s:{s:s, s:s}}", "id", id, "custom_id",
                          custom_id ? json_string(custom_id) : json_null(), "response", "error",
                          "code", code, "message", msg);
    if (j) write_line(b, j);
}

/* ---- resume: custom_ids already in the output ---------------------------------------------- */

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Reads the output file (cutting a torn last line off) and returns its custom_ids sorted. */
static char **done_ids(const char *path, int *n_out, int *torn) {
    *n_out = 0, *torn = 0;
    FILE *f = fopen(path, "r+");
    if (!f) return NULL;
    char **ids = NULL;
    int n = 0, cap = 0;
    char *line = NULL;
    size_t lcap = 0;
    ssize_t len;
    long good = 0;
    while ((len = getline(&line, &lcap, f)) > 0) {
        if (line[len - 1] != '\n') { /* torn: the process died while writing it */
            *torn = 1;
            break;
        }
        good = ftell(f);
        json_t *j = json_loadb(line, (size_t)len, 0, NULL);
        const char *cid = j ? json_string_value(json_object_get(j, "custom_id")) : NULL;
        /* an error line for an input line without custom_id is known by its id (line number) */
        if (!cid && j) cid = json_string_value(json_object_get(j, "id"));
        if (cid) {
            if (n == cap) {
                cap = cap ? cap * 2 : 64;
                char **t = realloc(ids, sizeof *ids * (size_t)cap);
                if (!t) break;
                ids = t;
            }
            ids[n++] = strdup(cid);
        }
        json_decref(j);
    }
    free(line);
    if (*torn && ftruncate(fileno(f), good) != 0) *torn = -1;
    fclose(f);
    if (n) qsort(ids, (size_t)n, sizeof *ids, cmp_str);
    *n_out = n;
    return ids;
}

static bool has_id(char **ids, int n, const char *id) {
    return n && bsearch(&id, ids, (size_t)n, sizeof *ids, cmp_str) != NULL;
}

/* ---- callbacks ------------------------------------------------------------------------------ */

static bool on_token(void *user, int i, int32_t tok) {
    struct batch *b = user;
    struct breq *q = &b->r[i];
    char buf[256];
    size_t k = kvs_detok_push(b->m, &q->dt, tok, buf, sizeof buf);
    if (k > sizeof buf) k = sizeof buf;
    size_t from = q->len;
    text_append(q, buf, k);
    for (int s = 0; s < q->p.n_stops; s++) {
        size_t sl = strlen(q->p.stops[s]);
        size_t start = from >= sl ? from - sl + 1 : 0;
        for (size_t at = start; at + sl <= q->len; at++)
            if (!memcmp(q->text + at, q->p.stops[s], sl)) {
                q->len = at; /* the stop text is not returned */
                q->text[at] = 0;
                q->stopped_by_string = true;
                return false;
            }
    }
    return true;
}

static void on_done(void *user, int i, enum brun_finish why, const char *err, int n_gen,
                    int prompt_computed) {
    struct batch *b = user;
    struct breq *q = &b->r[i];
    if (why == BRUN_ERROR) {
        write_error(b, q->custom_id, q->line, "request_failed", "%s", err ? err : "failed");
        return;
    }
    if (!q->stopped_by_string) {
        char buf[16];
        size_t k = kvs_detok_flush(&q->dt, buf, sizeof buf);
        text_append(q, buf, k);
    }
    b->prompt_computed += prompt_computed;
    char rid[64], id[48];
    snprintf(rid, sizeof rid, "%s-%08llx", q->kind == SRV_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)XXH64(q->custom_id, strlen(q->custom_id), 0));
    snprintf(id, sizeof id, "batch_req_line_%d", q->line);
    const char *fin = why == BRUN_LENGTH ? "length" : "stop";
    json_t *choice = q->kind == SRV_CHAT
        ? json_pack("{s:i, s:{s:s, s:s%}, s:s, s:n}", "index", 0, "message", "role", "assistant",
                    "content", q->text ? q->text : "", q->len, "finish_reason", fin, "logprobs")
        : json_pack("{s:i, s:s%, s:s, s:n}", "index", 0, "text", q->text ? q->text : "", q->len,
                    "finish_reason", fin, "logprobs");
    json_t *body = json_pack("{s:s, s:s, s:I, s:s, s:[o], s:{s:i, s:i, s:i, s:{s:i}}}", "id", rid,
                             "object", q->kind == SRV_CHAT ? "chat.completion" : "text_completion",
                             "created", (json_int_t)b->created, "model", b->model_id, "choices",
                             choice, "usage", "prompt_tokens", q->n_toks, "completion_tokens", n_gen,
                             "total_tokens", q->n_toks + n_gen, "prompt_tokens_details",
                             "cached_tokens", q->n_toks - prompt_computed);
    json_t *line = body ? json_pack("{s:s, s:s, s:{s:i, s:s, s:o}, s:n}", "id", id, "custom_id",
                                    q->custom_id, "response", "status_code", 200, "request_id", rid,
                                    "body", body, "error")
                        : NULL;
    if (line) write_line(b, line);
    free(q->text);
    q->text = NULL, q->len = q->cap = 0;
}

static void on_progress(void *user, int done, int total, int64_t gen) {
    struct batch *b = user;
    double t = now_ms();
    /* a terminal gets a line redrawn twice a second; a log one line every 10 s */
    bool tty = isatty(2);
    if (b->o->quiet || (t - b->last_progress < (tty ? 500 : 10000) && done < total)) return;
    b->last_progress = t;
    double s = (t - b->t0) / 1e3;
    double eta = done > 0 ? s * (total - done) / done : 0;
    fprintf(stderr, "%sbatch: %d/%d requests, %lld tokens generated, %.1f tok/s, %.0f s, ETA %.0f s%s",
            tty ? "\r" : "", done, total, (long long)gen, s > 0 ? gen / s : 0.0, s, eta,
            tty && done < total ? "   " : "\n");
}

static volatile int g_stop;
static void on_sigint(int sig) {
    (void)sig;
    g_stop = 1;
}

static bool check_kv_cb(const char *spec, char *msg, size_t size) {
    if (kvs_kv_spec_check(spec, NULL, 0) == KVS_OK) return true;
    snprintf(msg, size, "%s", kvs_last_error());
    return false;
}

static int32_t *tokenize(kvs_model *m, const char *text, bool bos, bool special, int *n) {
    size_t len = strlen(text);
    int cap = (int)(len / 2) + 16;
    int32_t *t = malloc(sizeof *t * (size_t)cap);
    int k = t ? kvs_tokenize(m, text, len, bos, special, t, cap) : 0;
    if (k < 0) {
        cap = -k;
        int32_t *nt = realloc(t, sizeof *t * (size_t)cap);
        if (nt) t = nt, k = kvs_tokenize(m, text, len, bos, special, t, cap);
        else k = 0;
    }
    *n = k < 0 ? 0 : k;
    return t;
}

/* ---- main ------------------------------------------------------------------------------------ */

int batch_main(int argc, char **argv) {
    struct bopts o = {.model = "models/SmolLM2-135M-Instruct.Q4_1.gguf", .kv = "full", .parallel = 8,
                      .batch = 512, .kv_mem = (int64_t)1 << 30, .group = true, .reorder = true};
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEED() do { if (!v) return usage_error("%s needs a value", a); i++; } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(USAGE, stdout);
            return 0;
        } else if (!strcmp(a, "-i") || !strcmp(a, "--input")) { NEED(); o.in = v; }
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) { NEED(); o.out = v; }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { NEED(); o.model = v; }
        else if (!strcmp(a, "--kv")) {
            NEED();
            if (kvs_kv_spec_check(v, NULL, 0) != KVS_OK) return usage_error("%s", kvs_last_error());
            o.kv = v;
        } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            NEED();
            if (!parse_int_arg(v, 1, 256, &o.threads)) return usage_error("bad -t '%s' (1..256)", v);
        } else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) {
            NEED();
            if (!parse_int_arg(v, 16, 1 << 20, &o.n_ctx)) return usage_error("bad -c '%s'", v);
        } else if (!strcmp(a, "-np") || !strcmp(a, "--parallel")) {
            NEED();
            if (!parse_int_arg(v, 1, 64, &o.parallel)) return usage_error("bad --parallel '%s' (1..64)", v);
        } else if (!strcmp(a, "-b") || !strcmp(a, "--batch")) {
            NEED();
            if (!parse_int_arg(v, 1, 4096, &o.batch)) return usage_error("bad -b '%s' (1..4096)", v);
        } else if (!strcmp(a, "--kv-mem")) {
            NEED();
            if (!parse_bytes(v, &o.kv_mem)) return usage_error("bad --kv-mem '%s' (bytes, e.g. 512M)", v);
        } else if (!strcmp(a, "--no-group")) o.group = false;
        else if (!strcmp(a, "--no-reorder")) o.reorder = false;
        else if (!strcmp(a, "--no-pack")) o.no_pack = true;
        else if (!strcmp(a, "--json")) o.json = true;
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) o.quiet = true;
        else return usage_error("unknown option '%s'", a);
#undef NEED
    }
    if (!o.in || !o.out) return usage_error("%s", "-i REQUESTS.jsonl and -o RESULTS.jsonl are required");
    if (o.parallel < 2) o.group = false; /* a group's common prefill needs a second sequence */
    FILE *in = fopen(o.in, "r");
    if (!in) {
        fprintf(stderr, "kvsieve batch: %s: cannot open: %s\n", o.in, strerror(errno));
        return 2;
    }
    int n_done_ids = 0, torn = 0;
    char **ids = done_ids(o.out, &n_done_ids, &torn);
    if (torn < 0) {
        fprintf(stderr, "kvsieve batch: %s: cannot cut its torn last line\n", o.out);
        fclose(in);
        return 1;
    }
    if (torn) fprintf(stderr, "kvsieve batch: %s: cut a torn last line (an interrupted run)\n", o.out);
    struct batch b = {.o = &o, .created = (long long)time(NULL)};
    b.out = fopen(o.out, "a");
    if (!b.out) {
        fprintf(stderr, "kvsieve batch: %s: cannot open for writing: %s\n", o.out, strerror(errno));
        fclose(in);
        return 1;
    }
    struct kvs_model_params mp = kvs_model_params_default();
    mp.pack = !o.no_pack;
    if (kvs_model_load(o.model, &mp, &b.m) != KVS_OK) {
        fprintf(stderr, "kvsieve batch: %s\n", kvs_last_error());
        fclose(in), fclose(b.out);
        return 2;
    }
    const char *base = strrchr(o.model, '/') ? strrchr(o.model, '/') + 1 : o.model;
    char model_id[256];
    snprintf(model_id, sizeof model_id, "%s", base);
    char *dot = strstr(model_id, ".gguf");
    if (dot) *dot = 0;
    b.model_id = model_id;
    struct kvs_model_info mi;
    kvs_model_get_info(b.m, &mi);
    struct srv_limits lim = {.model_id = model_id, .max_tokens_default = 512, .n_vocab = mi.n_vocab,
                             .check_kv = check_kv_cb};

    /* read and validate every line; bad ones get their error line now */
    char *line = NULL;
    size_t lcap = 0;
    ssize_t len;
    int cap = 0, skipped = 0;
    char **seen = NULL;
    int n_seen = 0, seen_cap = 0;
    while ((len = getline(&line, &lcap, in)) >= 0) {
        b.n_lines++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = 0;
        if (len == 0) continue;
        json_error_t je;
        json_t *j = json_loadb(line, (size_t)len, 0, &je);
        const char *cid = j ? json_string_value(json_object_get(j, "custom_id")) : NULL;
        if (cid && has_id(ids, n_done_ids, cid)) {
            skipped++;
            json_decref(j);
            continue;
        }
        char line_id[48];
        snprintf(line_id, sizeof line_id, "batch_req_line_%d", b.n_lines);
        if (!cid && has_id(ids, n_done_ids, line_id)) { /* its error line is already out */
            skipped++;
            json_decref(j);
            continue;
        }
        if (!j || !json_is_object(j)) {
            write_error(&b, NULL, b.n_lines, "invalid_json", "%s", j ? "not a JSON object" : je.text);
            b.errors_input++;
            json_decref(j);
            continue;
        }
        const char *method = json_string_value(json_object_get(j, "method"));
        const char *url = json_string_value(json_object_get(j, "url"));
        json_t *body = json_object_get(j, "body");
        const char *bad = !cid ? "missing or non-string custom_id"
                        : method && strcmp(method, "POST") ? "method must be POST"
                        : !url ? "missing or non-string url"
                        : strcmp(url, "/v1/chat/completions") && strcmp(url, "/v1/completions")
                            ? "url must be /v1/chat/completions or /v1/completions"
                        : !json_is_object(body) ? "missing or non-object body" : NULL;
        bool dup = false;
        for (int k = 0; cid && k < n_seen && !dup; k++) dup = !strcmp(seen[k], cid);
        if (!bad && dup) bad = "duplicate custom_id";
        if (bad) {
            write_error(&b, cid, b.n_lines, "invalid_request", "%s", bad);
            b.errors_input++;
            json_decref(j);
            continue;
        }
        if (n_seen == seen_cap) {
            seen_cap = seen_cap ? 2 * seen_cap : 64;
            char **t = realloc(seen, sizeof *seen * (size_t)seen_cap);
            if (!t) break;
            seen = t;
        }
        seen[n_seen++] = strdup(cid);
        struct breq q = {.line = b.n_lines, .kind = strcmp(url, "/v1/completions") ? SRV_CHAT : SRV_COMPLETION};
        char *bs = json_dumps(body, JSON_COMPACT);
        struct srv_error e;
        bool ok = bs && srv_parse_request(bs, strlen(bs), q.kind, &lim, &q.p, &e);
        free(bs);
        if (ok && q.p.stream) ok = false, snprintf(e.message, sizeof e.message, "stream is not supported in a batch");
        else if (ok && q.p.logprobs) {
            ok = false;
            snprintf(e.message, sizeof e.message, "logprobs are not supported in a batch yet");
        }
        if (!ok) {
            write_error(&b, cid, b.n_lines, "invalid_request", "%s", e.message);
            b.errors_input++;
            if (q.p.msgs || q.p.prompt) srv_params_free(&q.p);
            json_decref(j);
            continue;
        }
        if (q.kind == SRV_CHAT) {
            struct kvs_chat_msg *msgs = calloc((size_t)q.p.n_msgs, sizeof *msgs);
            for (int k = 0; msgs && k < q.p.n_msgs; k++) msgs[k] = (struct kvs_chat_msg){q.p.msgs[k].role, q.p.msgs[k].content};
            size_t need = msgs ? kvs_chat_apply(b.m, msgs, q.p.n_msgs, true, NULL, 0) : 0;
            char *text = malloc(need + 1);
            if (text) {
                kvs_chat_apply(b.m, msgs, q.p.n_msgs, true, text, need + 1);
                q.toks = tokenize(b.m, text, false, true, &q.n_toks);
            }
            free(text), free(msgs);
        } else if (q.p.prompt) {
            q.toks = tokenize(b.m, q.p.prompt, true, false, &q.n_toks);
        } else {
            q.toks = malloc(sizeof(int32_t) * (size_t)(q.p.n_prompt_toks ? q.p.n_prompt_toks : 1));
            if (q.toks) memcpy(q.toks, q.p.prompt_toks, sizeof(int32_t) * (size_t)q.p.n_prompt_toks);
            q.n_toks = q.p.n_prompt_toks;
        }
        if (q.n_toks <= 0) {
            write_error(&b, cid, b.n_lines, "invalid_request", "%s", "the prompt is empty");
            b.errors_input++;
            srv_params_free(&q.p), free(q.toks);
            json_decref(j);
            continue;
        }
        q.custom_id = strdup(cid);
        if (b.n == cap) {
            cap = cap ? cap * 2 : 64;
            struct breq *t = realloc(b.r, sizeof *t * (size_t)cap);
            if (!t) {
                json_decref(j);
                break;
            }
            b.r = t;
        }
        b.r[b.n++] = q;
        json_decref(j);
    }
    free(line);
    fclose(in);
    for (int k = 0; k < n_seen; k++) free(seen[k]);
    free(seen);
    for (int k = 0; k < n_done_ids; k++) free(ids[k]);
    free(ids);
    if (!o.quiet)
        fprintf(stderr, "kvsieve batch: %d requests to run, %d already in %s, %d bad lines\n", b.n,
                skipped, o.out, b.errors_input);

    struct kvs_context_params cp = kvs_context_params_default();
    cp.n_ctx = o.n_ctx ? o.n_ctx : (mi.n_ctx_train < 4096 ? mi.n_ctx_train : 4096);
    cp.n_threads = o.threads;
    cp.n_batch = o.batch;
    cp.n_seq_max = o.parallel;
    cp.kv_spec = o.kv;
    cp.keep_stats = true;
    kvs_context *c = NULL;
    int rc = 0;
    if (kvs_context_new(b.m, &cp, &c) != KVS_OK) {
        fprintf(stderr, "kvsieve batch: %s\n", kvs_last_error());
        rc = 2;
    }
    struct brun_req *rq = calloc((size_t)(b.n ? b.n : 1), sizeof *rq);
    struct brun_stats st = {0};
    if (!rc && rq) {
        for (int i = 0; i < b.n; i++) {
            const struct srv_params *p = &b.r[i].p;
            struct kvs_sampler_params sp = kvs_sampler_params_default();
            sp.temp = p->temperature, sp.top_p = p->top_p, sp.top_k = p->top_k, sp.min_p = p->min_p;
            sp.presence_penalty = p->presence_penalty, sp.frequency_penalty = p->frequency_penalty;
            sp.repeat_penalty = p->repeat_penalty;
            /* without a seed: one derived from custom_id, so a resumed batch samples the same */
            sp.seed = p->has_seed ? p->seed : XXH64(b.r[i].custom_id, strlen(b.r[i].custom_id), 42);
            rq[i] = (struct brun_req){.prompt = b.r[i].toks, .n_prompt = b.r[i].n_toks,
                                      .max_tokens = p->max_tokens > 0 ? p->max_tokens : 1,
                                      .kv = p->kv, .sp = sp};
            b.prompt_logical += b.r[i].n_toks;
        }
        struct brun_opts bo = {.group = o.group, .reorder = o.reorder, .kv_mem = o.kv_mem, .min_share = 32};
        struct brun_cb cb = {.token = on_token, .done = on_done, .progress = on_progress, .user = &b,
                             .stop = &g_stop};
        struct sigaction sa = {.sa_handler = on_sigint}, old_int, old_term;
        sigaction(SIGINT, &sa, &old_int);
        sigaction(SIGTERM, &sa, &old_term);
        b.t0 = now_ms();
        enum kvs_status st_run = brun_run(c, b.m, rq, b.n, &bo, &cb, &st);
        sigaction(SIGINT, &old_int, NULL);
        sigaction(SIGTERM, &old_term, NULL);
        double wall = (now_ms() - b.t0) / 1e3;
        if (st_run != KVS_OK) {
            fprintf(stderr, "\nkvsieve batch: %s\n", kvs_last_error());
            rc = 1;
        }
        if (g_stop) {
            fprintf(stderr, "\nkvsieve batch: stopped; %d requests finished are in %s (rerun to resume)\n",
                    st.n_done + st.n_errors, o.out);
            rc = 130;
        }
        if (o.json) {
            double saving = st.prompt_logical ? 1.0 - (double)st.prompt_computed / st.prompt_logical : 0;
            printf("{\"requests\":%d,\"skipped\":%d,\"done\":%d,\"errors\":%d,\"bad_lines\":%d,\"groups\":%d,"
                   "\"shared_groups\":%d,\"prompt_tokens_logical\":%lld,\"prompt_tokens_computed\":%lld,"
                   "\"saving\":%.4f,\"decode_tokens\":%lld,\"wall_s\":%.2f,\"decode_tok_s\":%.2f,"
                   "\"total_tok_s\":%.2f,\"max_running\":%d,\"kv_peak_bytes\":%lld,\"group\":%s,\"reorder\":%s}\n",
                   b.n, skipped, st.n_done, st.n_errors, b.errors_input, st.n_groups, st.n_shared_groups,
                   (long long)st.prompt_logical, (long long)st.prompt_computed, saving,
                   (long long)st.gen_tokens, wall, wall > 0 ? st.gen_tokens / wall : 0.0,
                   wall > 0 ? (st.prompt_logical + st.gen_tokens) / wall : 0.0, st.max_running,
                   (long long)st.kv_peak, o.group ? "true" : "false", o.reorder ? "true" : "false");
        } else if (!o.quiet) {
            fprintf(stderr, "kvsieve batch: %d done, %d failed, %d bad lines in %.1f s; prompt tokens "
                    "computed %lld of %lld (%.1f%% saved); %lld tokens generated\n", st.n_done, st.n_errors,
                    b.errors_input, wall, (long long)st.prompt_computed, (long long)st.prompt_logical,
                    st.prompt_logical ? 100.0 * (1.0 - (double)st.prompt_computed / st.prompt_logical) : 0.0,
                    (long long)st.gen_tokens);
        }
    } else if (!rq) {
        rc = 1;
    }
    for (int i = 0; i < b.n; i++) {
        srv_params_free(&b.r[i].p);
        free(b.r[i].toks), free(b.r[i].custom_id), free(b.r[i].text);
    }
    free(b.r), free(rq);
    kvs_context_free(c);
    kvs_model_free(b.m);
    if (fclose(b.out) != 0 && !rc) {
        fprintf(stderr, "kvsieve batch: %s: write failed\n", o.out);
        rc = 1;
    }
    return rc;
}
