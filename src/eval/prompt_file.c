/* prompt_file.c — the tasks file: users' own prompts as JSON Lines (see tasks.h and
 * EVAL_TASKS_FILE_HELP below, the one description of the format), read with jsonl.c, and the
 * writer `kvsieve eval tasks` exports them with.
 * Does: validate every field (type, range, unknown keys, duplicate ids), fill the documented
 * defaults, report the first problem with its line number. tools/kvpress_peer.py applies the
 * same rules (load_tasks there); a change here is a change there.
 * Does not: apply a chat template or tokenize (eval_prompt_prepare in tasks.c), touch a model,
 * print anything. Linked into fuzz/fuzz_jsonl.c with jsonl.c alone.
 */
#include "eval/tasks.h"
#include "eval/jsonl.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

const char EVAL_TASKS_FILE_HELP[] =
    "tasks file (kvsieve eval sweep --tasks-file F.jsonl): one JSON object per line (JSON Lines,\n"
    "UTF-8; blank lines skipped). `kvsieve eval tasks` exports this format and\n"
    "tools/kvpress_peer.py reads it, so any prompt set runs on both. The text is raw: kvsieve\n"
    "applies the chat template of the model it runs (one file serves every model).\n"
    "\n"
    "  field            type               default     meaning\n"
    "  context          string             required    the document: prefilled, then compressed;\n"
    "                                                  not empty\n"
    "  question         string             required    what is asked after the context (\"\" allowed);\n"
    "                                                  question-agnostic runs compress before it\n"
    "  outputs          array of strings   required    expected answers: 1 to 16, none empty\n"
    "  answer_prefix    string             \"\"          start of the answer, after the end of turn\n"
    "  metric           \"all\" | \"part\"     \"all\"       all: fraction of outputs found in the answer;\n"
    "                                                  part: 1 if any is found (ASCII case ignored)\n"
    "  max_new_tokens   integer 1..4096    32          greedy decoding stops there (or at end of turn)\n"
    "  stop_at_newline  true | false       false       the answer ends at the first newline after its\n"
    "                                                  first letter or digit\n"
    "  id               string             \"line<N>\"   unique in the file, 1 to 127 bytes\n"
    "  task             string             \"custom\"    per-task table column, 1 to 63 bytes\n"
    "  family           string             the task    summary table column, 1 to 63 bytes\n"
    "  length           integer >= 1       none        column task@length in the report (generated\n"
    "                                                  prompts: their length in tokens)\n"
    "  seed, sample     integer >= 0       0           recorded in the results\n"
    "  Also accepted and not used by kvsieve: model, model_sha256, prompt_context and\n"
    "  prompt_question (strings), n_tokens_context and n_tokens_question (integers): what `eval\n"
    "  tasks` adds for other systems (kvpress_peer.py feeds prompt_context/prompt_question when\n"
    "  present, else applies the template itself), and meta (any value: yours). null is the same\n"
    "  as leaving an optional field out. Any other key, a wrong type or a value out of range is an\n"
    "  error: the whole file is refused before anything runs, with `F.jsonl:LINE: problem`, and\n"
    "  the command exits with 2.\n"
    "\n"
    "  Each prompt runs as template(context) then question + end of turn + answer_prefix, greedy.\n"
    "  Resume: a run's key holds the id and a hash of the fields that decide the answer, so an\n"
    "  edited prompt runs again and an unchanged one is skipped.\n"
    "\n"
    "example (2 lines):\n"
    "{\"id\":\"vault\",\"context\":\"Notes of the day. The vault code is 4712. Lunch at noon.\","
    "\"question\":\"What is the vault code?\",\"outputs\":[\"4712\"],\"stop_at_newline\":true}\n"
    "{\"task\":\"capital\",\"context\":\"Paris is the capital of France.\",\"question\":\"Which city "
    "is the capital of France?\",\"answer_prefix\":\" Answer:\",\"outputs\":[\"Paris\"],"
    "\"metric\":\"part\",\"max_new_tokens\":8}\n";

/* ---- one line ---------------------------------------------------------------------------- */

static bool bad(char *err, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static bool bad(char *err, size_t n, const char *fmt, ...) {
    if (err && n) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, n, fmt, ap);
        va_end(ap);
    }
    return false;
}

static const char *type_name(const struct jsonl_value *v) {
    switch (v->type) {
    case JSONL_NULL: return "null";
    case JSONL_BOOL: return v->b ? "true" : "false";
    case JSONL_NUMBER: return "a number";
    case JSONL_STRING: return "a string";
    case JSONL_STRINGS: return "an array of strings";
    case JSONL_OTHER: break;
    }
    return "an object or an array of non-strings";
}

static const char *const KNOWN[] = {
    "context", "question", "outputs", "answer_prefix", "metric", "max_new_tokens",
    "stop_at_newline", "id", "task", "family", "length", "seed", "sample",
    /* written by `eval tasks` for other systems, or the user's own: not used */
    "model", "model_sha256", "prompt_context", "prompt_question", "n_tokens_context",
    "n_tokens_question", "meta", NULL};

/* the value of an optional key: NULL when absent or null */
static const struct jsonl_value *opt(const struct jsonl_obj *o, const char *key) {
    const struct jsonl_value *v = jsonl_get(o, key);
    return v && v->type != JSONL_NULL ? v : NULL;
}

/* a string field into a malloc'd copy (*out), or dflt when optional and absent */
static bool get_str(const struct jsonl_obj *o, const char *key, const char *dflt, bool nonempty,
                    size_t max_len, char **out, char *err, size_t n) {
    const struct jsonl_value *v = opt(o, key);
    if (!v) {
        if (!dflt) {
            if (jsonl_get(o, key)) return bad(err, n, "field \"%s\" must be a string, got null", key);
            return bad(err, n, "missing field \"%s\" (a string; see `kvsieve eval --help tasks-file`)",
                       key);
        }
        *out = strdup(dflt);
    } else {
        if (v->type != JSONL_STRING)
            return bad(err, n, "field \"%s\" must be a string, got %s", key, type_name(v));
        if (nonempty && !v->str[0]) return bad(err, n, "field \"%s\" is empty", key);
        if (max_len && strlen(v->str) > max_len)
            return bad(err, n, "field \"%s\" is longer than %zu bytes", key, max_len);
        *out = strdup(v->str);
    }
    return *out ? true : bad(err, n, "out of memory");
}

/* an integer field in [lo, hi] (a JSON number with no fraction), or dflt when absent/null */
static bool get_int(const struct jsonl_obj *o, const char *key, double lo, double hi, double dflt,
                    double *out, char *err, size_t n) {
    const struct jsonl_value *v = opt(o, key);
    if (!v) { *out = dflt; return true; }
    if (v->type != JSONL_NUMBER || !isfinite(v->num) || v->num != floor(v->num) || v->num < lo ||
        v->num > hi) {
        if (v->type == JSONL_NUMBER)
            return bad(err, n, "field \"%s\" must be an integer from %.0f to %.0f, got %.40s", key, lo,
                       hi, v->str ? v->str : "?");
        return bad(err, n, "field \"%s\" must be an integer from %.0f to %.0f, got %s", key, lo, hi,
                   type_name(v));
    }
    *out = v->num;
    return true;
}

static bool copy_name(char *dst, size_t cap, const char *src, const char *key, char *err, size_t n) {
    if (strlen(src) >= cap) return bad(err, n, "field \"%s\" is longer than %zu bytes", key, cap - 1);
    memcpy(dst, src, strlen(src) + 1);
    return true;
}

static bool parse_obj(const struct jsonl_obj *o, int line_no, struct eval_prompt *p, char *err,
                      size_t n) {
    for (int i = 0; i < o->n_fields; i++) {
        const char *k = o->fields[i].key;
        int j = 0;
        while (KNOWN[j] && strcmp(KNOWN[j], k)) j++;
        if (!KNOWN[j])
            return bad(err, n, "unknown field \"%.60s\" (known: context, question, outputs, "
                       "answer_prefix, metric, max_new_tokens, stop_at_newline, id, task, family, "
                       "length, seed, sample; see `kvsieve eval --help tasks-file`)", k);
    }
    if (!get_str(o, "context", NULL, true, 0, &p->context, err, n) ||
        !get_str(o, "question", NULL, false, 0, &p->question, err, n) ||
        !get_str(o, "answer_prefix", "", false, 0, &p->answer_prefix, err, n))
        return false;
    /* outputs */
    const struct jsonl_value *v = jsonl_get(o, "outputs");
    if (!v) return bad(err, n, "missing field \"outputs\" (the expected answers: an array of strings)");
    if (v->type != JSONL_STRINGS)
        return bad(err, n, "field \"outputs\" must be an array of strings, got %s", type_name(v));
    if (v->n_items < 1 || v->n_items > EVAL_MAX_OUTPUTS)
        return bad(err, n, "field \"outputs\" holds %d answers (1 to %d)", v->n_items, EVAL_MAX_OUTPUTS);
    for (int i = 0; i < v->n_items; i++) {
        if (!v->items[i][0]) return bad(err, n, "field \"outputs\": answer %d is empty", i + 1);
        if (!(p->outputs[p->n_outputs++] = strdup(v->items[i]))) return bad(err, n, "out of memory");
    }
    /* metric */
    v = opt(o, "metric");
    p->metric = EVAL_METRIC_ALL;
    if (v && v->type != JSONL_STRING)
        return bad(err, n, "field \"metric\" must be a string, got %s", type_name(v));
    if (v && !strcmp(v->str, "part")) p->metric = EVAL_METRIC_PART;
    else if (v && strcmp(v->str, "all"))
        return bad(err, n, "unknown metric \"%.40s\" (all: fraction of the outputs found; part: 1 "
                   "if any is found)", v->str);
    /* numbers */
    double x;
    if (!get_int(o, "max_new_tokens", 1, 4096, 32, &x, err, n)) return false;
    p->max_new_tokens = (int)x;
    if (!get_int(o, "length", 1, 1 << 24, 0, &x, err, n)) return false;
    p->length = (int)x;
    if (!get_int(o, "seed", 0, 9007199254740991.0, 0, &x, err, n)) return false;
    p->seed = (uint64_t)x;
    if (!get_int(o, "sample", 0, 1 << 30, 0, &x, err, n)) return false;
    p->sample = (int)x;
    if (!get_int(o, "n_tokens_context", 0, 1 << 30, 0, &x, err, n) ||
        !get_int(o, "n_tokens_question", 0, 1 << 30, 0, &x, err, n))
        return false;
    v = opt(o, "stop_at_newline");
    if (v && v->type != JSONL_BOOL)
        return bad(err, n, "field \"stop_at_newline\" must be true or false, got %s", type_name(v));
    p->stop_at_newline = v && v->b;
    /* names */
    char dflt_id[32], *s = NULL;
    snprintf(dflt_id, sizeof dflt_id, "line%d", line_no);
    bool ok = get_str(o, "id", dflt_id, true, 0, &s, err, n) &&
              copy_name(p->id, sizeof p->id, s, "id", err, n);
    free(s);
    s = NULL;
    ok = ok && get_str(o, "task", "custom", true, 0, &s, err, n) &&
         copy_name(p->task, sizeof p->task, s, "task", err, n);
    free(s);
    s = NULL;
    ok = ok && get_str(o, "family", p->task, true, 0, &s, err, n) &&
         copy_name(p->family, sizeof p->family, s, "family", err, n);
    free(s);
    if (!ok) return false;
    /* the informational strings: type only */
    const char *info[] = {"model", "model_sha256", "prompt_context", "prompt_question"};
    for (int i = 0; i < 4; i++)
        if ((v = opt(o, info[i])) && v->type != JSONL_STRING)
            return bad(err, n, "field \"%s\" must be a string, got %s", info[i], type_name(v));
    return true;
}

bool eval_prompt_parse(const char *line, size_t len, int line_no, struct eval_prompt *out,
                       char *err, size_t err_size) {
    memset(out, 0, sizeof *out);
    struct jsonl_obj o;
    char jerr[160];
    if (!jsonl_parse(line, len, &o, jerr, sizeof jerr))
        return bad(err, err_size, "bad JSON: %s", jerr);
    bool ok = parse_obj(&o, line_no, out, err, err_size);
    jsonl_obj_free(&o);
    if (!ok) eval_prompt_free(out);
    return ok;
}

/* ---- a whole file --------------------------------------------------------------------------- */

void eval_prompts_free(struct eval_prompt *p, int n) {
    for (int i = 0; p && i < n; i++) eval_prompt_free(&p[i]);
    free(p);
}

static int cmp_id(const void *a, const void *b) {
    return strcmp(((const struct eval_prompt *const *)a)[0]->id,
                  ((const struct eval_prompt *const *)b)[0]->id);
}

int eval_prompts_load(const char *path, struct eval_prompt **out, int *n_out, char *err,
                      size_t err_size) {
    *out = NULL;
    *n_out = 0;
    FILE *f = fopen(path, "rb");
    if (!f) {
        bad(err, err_size, "cannot read tasks file %s: %s", path, strerror(errno));
        return errno == ENOENT ? 2 : 1;
    }
    struct eval_prompt *ps = NULL;
    int n = 0, cap = 0, rc = 0, ln = 0;
    int *lines = NULL; /* line of each prompt, for the duplicate-id message */
    char *line = NULL, msg[400];
    size_t lcap = 0;
    ssize_t len;
    while (rc == 0 && (len = getline(&line, &lcap, f)) >= 0) {
        const char *p = line;
        size_t L = (size_t)len;
        if (++ln == 1 && L >= 3 && !memcmp(p, "\xEF\xBB\xBF", 3)) { p += 3; L -= 3; }
        size_t k = 0;
        while (k < L && (p[k] == ' ' || p[k] == '\t' || p[k] == '\r' || p[k] == '\n')) k++;
        if (k == L) continue; /* blank */
        if (n == cap) {
            int c2 = cap ? 2 * cap : 64;
            struct eval_prompt *q = realloc(ps, (size_t)c2 * sizeof *q);
            int *l2 = q ? realloc(lines, (size_t)c2 * sizeof *l2) : NULL;
            if (q) ps = q;
            if (!q || !l2) { bad(err, err_size, "out of memory"); rc = 1; break; }
            lines = l2;
            cap = c2;
        }
        if (!eval_prompt_parse(p, L, ln, &ps[n], msg, sizeof msg)) {
            bad(err, err_size, "%s:%d: %s", path, ln, msg);
            rc = 2;
            break;
        }
        lines[n++] = ln;
    }
    if (rc == 0 && ferror(f)) {
        bad(err, err_size, "cannot read tasks file %s: %s", path, strerror(errno));
        rc = 1;
    }
    free(line);
    fclose(f);
    if (rc == 0 && n == 0) {
        bad(err, err_size, "%s: no prompts (one JSON object per line; see `kvsieve eval --help "
            "tasks-file`)", path);
        rc = 2;
    }
    if (rc == 0) { /* ids are unique: sort pointers, compare neighbours */
        struct eval_prompt **by = malloc((size_t)n * sizeof *by);
        if (!by) { bad(err, err_size, "out of memory"); rc = 1; }
        for (int i = 0; by && i < n; i++) by[i] = &ps[i];
        if (by) qsort(by, (size_t)n, sizeof *by, cmp_id);
        for (int i = 1; by && i < n && rc == 0; i++)
            if (!strcmp(by[i - 1]->id, by[i]->id)) {
                int a = lines[by[i - 1] - ps], b = lines[by[i] - ps];
                bad(err, err_size, "%s:%d: id \"%s\" already used on line %d", path,
                    a > b ? a : b, by[i]->id, a < b ? a : b);
                rc = 2;
            }
        free(by);
    }
    free(lines);
    if (rc) {
        eval_prompts_free(ps, n);
        return rc;
    }
    *out = ps;
    *n_out = n;
    return 0;
}

/* ---- hash, free and the writer ----------------------------------------------------------- */

static uint64_t fnv(uint64_t h, const char *s) {
    for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++)
        h = (h ^ *p) * 0x100000001b3ull;
    return (h ^ 0xff) * 0x100000001b3ull; /* a separator no UTF-8 string holds */
}

uint64_t eval_prompt_hash(const struct eval_prompt *p) {
    uint64_t h = 0xcbf29ce484222325ull;
    h = fnv(h, p->context);
    h = fnv(h, p->question);
    h = fnv(h, p->answer_prefix);
    for (int i = 0; i < p->n_outputs; i++) h = fnv(h, p->outputs[i]);
    char tail[64];
    snprintf(tail, sizeof tail, "%d|%d|%d|%d", p->n_outputs, (int)p->metric, p->max_new_tokens,
             (int)p->stop_at_newline);
    return fnv(h, tail);
}

void eval_prompt_free(struct eval_prompt *p) {
    free(p->context);
    free(p->question);
    free(p->answer_prefix);
    free(p->prompt_context);
    free(p->prompt_question);
    for (int i = 0; i < p->n_outputs; i++) free(p->outputs[i]);
    free(p->tok_context);
    free(p->tok_question);
    memset(p, 0, sizeof *p);
}

void eval_json_str(FILE *f, const char *s) { jsonl_write_string(f, s ? s : ""); }

/* `prefix` (a key with its punctuation) then s as a JSON string */
static void put_str(FILE *f, const char *prefix, const char *s) {
    fputs(prefix, f);
    eval_json_str(f, s);
}

void eval_prompt_write_jsonl(FILE *f, const struct eval_prompt *p, const char *model_name,
                             const char *model_sha256) {
    put_str(f, "{\"id\":", p->id);
    put_str(f, ",\"task\":", p->task);
    put_str(f, ",\"family\":", p->family);
    if (p->length > 0) fprintf(f, ",\"length\":%d", p->length);
    else fputs(",\"length\":null", f);
    fprintf(f, ",\"seed\":%llu,\"sample\":%d", (unsigned long long)p->seed, p->sample);
    put_str(f, ",\"model\":", model_name);
    put_str(f, ",\"model_sha256\":", model_sha256);
    put_str(f, ",\"context\":", p->context);
    put_str(f, ",\"question\":", p->question);
    put_str(f, ",\"answer_prefix\":", p->answer_prefix);
    put_str(f, ",\"prompt_context\":", p->prompt_context);
    put_str(f, ",\"prompt_question\":", p->prompt_question);
    fputs(",\"outputs\":[", f);
    for (int i = 0; i < p->n_outputs; i++) {
        if (i) fputc(',', f);
        eval_json_str(f, p->outputs[i]);
    }
    fprintf(f, "],\"metric\":\"%s\",\"max_new_tokens\":%d,\"stop_at_newline\":%s,"
            "\"n_tokens_context\":%d,\"n_tokens_question\":%d}\n",
            p->metric == EVAL_METRIC_PART ? "part" : "all", p->max_new_tokens,
            p->stop_at_newline ? "true" : "false", p->n_tok_context, p->n_tok_question);
}
