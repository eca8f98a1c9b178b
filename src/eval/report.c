/* report.c — evaluation results (JSON Lines) to results.csv and report.md; the figures are
 * drawn by report_plot.c from the same records and aggregation.
 *
 * Record fields, all optional (unknown fields are ignored, null counts as missing):
 *   system ("kvsieve" when absent), run (key), kind ("task" | "ppl"; guessed from task, family
 *   and ppl when absent), model, model_sha256, method ("full" is the uncompressed reference;
 *   "unknown" when absent), kv, ratio (task: kept fraction), budget (ppl: tokens per KV head,
 *   0 or absent = no budget), mode, task, family (guessed from the task name when absent:
 *   niah_multi*, niah*, vt, cwe/fwe -> aggregation, qa*), length, seed, sample, score (0..1),
 *   answer, expected (array of strings), ppl, kl, n_tokens, kv_bytes_peak, kv_bytes_full,
 *   prefill_tok_s, decode_tok_s, git, time.
 *
 * Aggregation (the same for tables and figures):
 *   score    plain mean over the task records of a cell (tasks x lengths x samples), in %;
 *   KV %     sum kv_bytes (else kv_bytes_peak) / sum kv_bytes_full over the records that have both;
 *   ppl      pooled over tokens: exp(sum n_tokens * ln ppl / sum n_tokens) (weight 1 when
 *            n_tokens is absent); KL the n_tokens-weighted mean;
 *   tok/s    plain mean.
 * NaN, infinities and missing values are left out of every mean; an empty cell prints "–".
 * Order: families niah, niah_multi, vt, aggregation, qa, then others by name; modes aware,
 * agnostic, then others; methods full first, then by name; ratios descending; kvsieve first.
 *
 * Memory: the records own their parsed lines; tables and figures use small temporary arrays
 * from xalloc, which asserts on failure (a few kilobytes: failing there means the process is
 * out of memory anyway); only the records, whose size the input decides, fail softly.
 * Does not: check that records of one cell are comparable (same model revision, same seeds):
 * the header lists the commits and model hashes so that a mixed directory is visible.
 */
#include "eval/report.h"
#include "eval/report_data.h"
#include "eval/report_plot.h"

#include <dirent.h>
#include <errno.h>
#include <sys/stat.h>
#include <time.h>

/* ---------------------------------------------------------------------------------------------
 * dictionaries: the distinct values of one string field, in display order; records refer to
 * them by rank */

static const char *const FAMILY_ORDER[] = {"niah", "niah_multi", "vt", "aggregation", "qa", "ppl", NULL};
static const char *const MODE_ORDER[] = {"aware", "agnostic", NULL};
static const char *const SYSTEM_ORDER[] = {"kvsieve", NULL};
static const char *const METHOD_ORDER[] = {"full", NULL};

static int rank_in(const char *s, const char *const *order) {
    int i = 0;
    if (order)
        for (; order[i]; i++)
            if (!strcmp(s, order[i])) return i;
    return i;
}

static const char *family_guess(const char *task) {
    if (!strncmp(task, "niah_multi", 10)) return "niah_multi";
    if (!strncmp(task, "niah", 4)) return "niah";
    if (!strcmp(task, "vt")) return "vt";
    if (!strcmp(task, "cwe") || !strcmp(task, "fwe")) return "aggregation";
    if (!strncmp(task, "qa", 2)) return "qa";
    if (!strcmp(task, "ppl")) return "ppl";
    return "other";
}

static void dict_add(struct dict *d, const char *s) {
    for (int i = 0; i < d->n; i++)
        if (!strcmp(d->v[i], s)) return;
    if (d->n == d->cap) {
        d->cap = d->cap ? 2 * d->cap : 16;
        d->v = xalloc(d->v, (size_t)d->cap, sizeof *d->v);
    }
    d->v[d->n++] = s;
}

static int dict_cmp(const void *pa, const void *pb, void *pd) {
    const struct dict *d = pd;
    const char *a = *(const char *const *)pa, *b = *(const char *const *)pb;
    int ra = rank_in(d->by_family ? family_guess(a) : a, d->order);
    int rb = rank_in(d->by_family ? family_guess(b) : b, d->order);
    return ra != rb ? ra - rb : strcmp(a, b);
}

static void dict_sort(struct dict *d) {
    if (d->n) qsort_r(d->v, (size_t)d->n, sizeof *d->v, dict_cmp, d);
}

static int dict_find(const struct dict *d, const char *s) {
    for (int i = 0; i < d->n; i++)
        if (!strcmp(d->v[i], s)) return i;
    KVS_ASSERT(0 && "value missing from its dictionary");
}

/* ---------------------------------------------------------------------------------------------
 * loading: records with their defaults, peer and extra files, duplicate run keys */

static const char *str_or(const struct jsonl_obj *o, const char *key, const char *dflt) {
    const char *s = jsonl_get_str(o, key);
    return s && *s ? s : dflt;
}

/* fills the convenience fields of a freshly parsed record */
static void rec_fill(struct rec *r) {
    const struct jsonl_obj *o = &r->obj;
    r->system = str_or(o, "system", "kvsieve");
    r->model = str_or(o, "model", "(unknown model)");
    r->method = str_or(o, "method", "unknown");
    r->mode = str_or(o, "mode", "(none)");
    r->run = str_or(o, "run", NULL);
    r->git = str_or(o, "git", NULL);
    r->sha = str_or(o, "model_sha256", NULL);
    r->ratio = jsonl_get_num(o, "ratio");
    r->budget = jsonl_get_num(o, "budget");
    r->length = jsonl_get_num(o, "length");
    r->score = jsonl_get_num(o, "score");
    r->ppl = jsonl_get_num(o, "ppl");
    r->kl = jsonl_get_num(o, "kl");
    r->n_tokens = jsonl_get_num(o, "n_tokens");
    r->kv_peak = jsonl_get_num(o, "kv_bytes_peak");
    r->kv_full = jsonl_get_num(o, "kv_bytes_full");
    r->kv_held = jsonl_get_num(o, "kv_bytes");
    if (!isfinite(r->kv_held)) r->kv_held = r->kv_peak;
    r->decode = jsonl_get_num(o, "decode_tok_s");
    const char *kind = str_or(o, "kind", NULL), *task = str_or(o, "task", NULL);
    const char *fam = str_or(o, "family", NULL);
    if (kind) r->is_ppl = !strcmp(kind, "ppl");
    else r->is_ppl = (task && !strcmp(task, "ppl")) || (fam && !strcmp(fam, "ppl")) ||
                     (!isfinite(r->score) && isfinite(r->ppl));
    r->kind = kind ? kind : r->is_ppl ? "ppl" : "task";
    r->task = task ? task : r->is_ppl ? "ppl" : "(unknown task)";
    r->family = fam ? fam : family_guess(r->task);
    r->is_full = !strcmp(r->method, "full");
    if (r->is_full && !isfinite(r->ratio) && !r->is_ppl) r->ratio = 1;
}

#define MAX_LINE_WARNINGS 5

/* Reads one JSONL file. optional: a missing file is not an error. */
static int load_file(struct report *R, const char *path, const char *shown, bool optional,
                     char *err, size_t err_size) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (optional && errno == ENOENT) return 0;
        return set_err(err, err_size, "%s: %s", path, strerror(errno));
    }
    int fi = R->n_files++;
    R->files = xalloc(R->files, (size_t)R->n_files, sizeof *R->files);
    R->file_n = xalloc(R->file_n, (size_t)R->n_files, sizeof *R->file_n);
    R->files[fi] = strdup(shown);
    KVS_ASSERT(R->files[fi] != NULL);
    R->file_n[fi] = 0;
    char *line = NULL, msg[200];
    size_t cap = 0;
    ssize_t len;
    long ln = 0;
    int bad = 0, rc = 0;
    while ((len = getline(&line, &cap, f)) >= 0) {
        const char *p = line;
        size_t n = (size_t)len;
        if (++ln == 1 && n >= 3 && !memcmp(p, "\xEF\xBB\xBF", 3)) { p += 3; n -= 3; } /* BOM */
        size_t k = 0;
        while (k < n && (p[k] == ' ' || p[k] == '\t' || p[k] == '\r' || p[k] == '\n')) k++;
        if (k == n) continue; /* blank line */
        struct jsonl_obj o;
        if (!jsonl_parse(p, n, &o, msg, sizeof msg)) {
            if (++bad <= MAX_LINE_WARNINGS) kvs_log(1, "%s:%ld: malformed line skipped: %s", path, ln, msg);
            continue;
        }
        if (R->n == R->cap) {
            int c = R->cap ? 2 * R->cap : 256;
            struct rec *nr = realloc(R->r, (size_t)c * sizeof *nr);
            if (!nr) { jsonl_obj_free(&o); rc = set_err(err, err_size, "out of memory reading %s", path); break; }
            R->r = nr;
            R->cap = c;
        }
        struct rec *r = &R->r[R->n++];
        memset(r, 0, sizeof *r);
        r->obj = o;
        r->file = fi;
        rec_fill(r);
        R->file_n[fi]++;
    }
    if (!rc && ferror(f)) rc = set_err(err, err_size, "%s: read error: %s", path, strerror(errno));
    free(line);
    fclose(f);
    if (bad > 1) kvs_log(1, "%s: %d malformed lines skipped", path, bad);
    R->n_bad += bad;
    return rc;
}

static int name_cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int load_all(struct report *R, const char *const *extra, int n_extra, char *err, size_t err_size) {
    char path[PATH_MAX];
    if (!path_join(path, sizeof path, R->dir, "results.jsonl"))
        return set_err(err, err_size, "%s: path too long", R->dir);
    if (load_file(R, path, "results.jsonl", true, err, err_size)) return -1;
    DIR *d = opendir(R->dir);
    if (!d) return set_err(err, err_size, "%s: %s", R->dir, strerror(errno));
    char **names = NULL;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) {
        size_t l = strlen(e->d_name);
        if (l > 11 && !strncmp(e->d_name, "peer_", 5) && !strcmp(e->d_name + l - 6, ".jsonl")) {
            names = xalloc(names, (size_t)n + 1, sizeof *names);
            names[n] = strdup(e->d_name);
            KVS_ASSERT(names[n] != NULL);
            n++;
        }
    }
    closedir(d);
    if (n) qsort(names, (size_t)n, sizeof *names, name_cmp);
    int rc = 0;
    for (int i = 0; i < n; i++) {
        if (!rc && !path_join(path, sizeof path, R->dir, names[i])) rc = set_err(err, err_size, "path too long");
        if (!rc) rc = load_file(R, path, names[i], false, err, err_size);
        free(names[i]);
    }
    free(names);
    for (int i = 0; !rc && i < n_extra; i++) rc = load_file(R, extra[i], extra[i], false, err, err_size);
    return rc;
}

/* a later record with the same (system, run) replaces an earlier one */
static int dup_cmp(const void *pa, const void *pb, void *pr) {
    const struct rec *r = pr;
    int a = *(const int *)pa, b = *(const int *)pb;
    int c = strcmp(r[a].system, r[b].system);
    if (!c) c = strcmp(r[a].run, r[b].run);
    return c ? c : a - b;
}

static void drop_duplicates(struct report *R) {
    int *ix = xcalloc((size_t)R->n, sizeof *ix), m = 0;
    bool *drop = xcalloc((size_t)R->n, sizeof *drop);
    for (int i = 0; i < R->n; i++)
        if (R->r[i].run) ix[m++] = i;
    if (m) qsort_r(ix, (size_t)m, sizeof *ix, dup_cmp, R->r);
    for (int i = 0; i + 1 < m; i++) {
        const struct rec *a = &R->r[ix[i]], *b = &R->r[ix[i + 1]];
        if (!strcmp(a->system, b->system) && !strcmp(a->run, b->run)) drop[ix[i]] = true;
    }
    int k = 0;
    for (int i = 0; i < R->n; i++) {
        if (drop[i]) {
            R->file_n[R->r[i].file]--;
            jsonl_obj_free(&R->r[i].obj);
            R->n_dup++;
        } else R->r[k++] = R->r[i];
    }
    R->n = k;
    if (R->n_dup) kvs_log(1, "%d record%s replaced by later ones with the same run key", R->n_dup, R->n_dup == 1 ? "" : "s");
    free(ix);
    free(drop);
}

static void build_dicts(struct report *R) {
    R->systems.order = SYSTEM_ORDER;
    R->methods.order = METHOD_ORDER;
    R->modes.order = MODE_ORDER;
    R->families.order = FAMILY_ORDER;
    R->tasks.order = FAMILY_ORDER;
    R->tasks.by_family = true;
    dict_add(&R->systems, "kvsieve"); /* always the first comparison column */
    for (int i = 0; i < R->n; i++) {
        struct rec *r = &R->r[i];
        dict_add(&R->models, r->model);
        dict_add(&R->systems, r->system);
        dict_add(&R->methods, r->method);
        dict_add(&R->modes, r->mode);
        dict_add(&R->tasks, r->task);
        dict_add(&R->families, r->family);
        if (r->git) dict_add(&R->commits, r->git);
        R->peers |= strcmp(r->system, "kvsieve") != 0;
    }
    struct dict *all[] = {&R->models, &R->systems, &R->methods, &R->modes, &R->tasks, &R->families, &R->commits};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) dict_sort(all[i]);
    for (int i = 0; i < R->n; i++) {
        struct rec *r = &R->r[i];
        r->im = dict_find(&R->models, r->model);
        r->isys = dict_find(&R->systems, r->system);
        r->imeth = dict_find(&R->methods, r->method);
        r->imode = dict_find(&R->modes, r->mode);
        r->itask = dict_find(&R->tasks, r->task);
        r->ifam = dict_find(&R->families, r->family);
    }
}

static void report_free(struct report *R) {
    for (int i = 0; i < R->n; i++) jsonl_obj_free(&R->r[i].obj);
    free(R->r);
    for (int i = 0; i < R->n_files; i++) free(R->files[i]);
    free(R->files);
    free(R->file_n);
    struct dict *all[] = {&R->models, &R->systems, &R->methods, &R->modes, &R->tasks, &R->families, &R->commits};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) free(all[i]->v);
    free(R->figs);
}

/* ---------------------------------------------------------------------------------------------
 * results.csv */

static const char *const CSV_COLS[] = {
    "system", "run", "kind", "model", "model_sha256", "method", "kv", "ratio", "budget", "mode",
    "task", "family", "length", "seed", "sample", "score", "answer", "expected", "ppl", "kl",
    "n_tokens", "kv_bytes", "kv_bytes_peak", "kv_bytes_full", "prefill_tok_s", "decode_tok_s", "git", "time"};

static void csv_cell(FILE *f, const char *s) { /* RFC 4180: quote when needed, double quotes */
    if (!strpbrk(s, ",\"\r\n")) { fputs(s, f); return; }
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"') fputc('"', f);
        fputc(*s, f);
    }
    fputc('"', f);
}

static void csv_value(FILE *f, const struct rec *r, const char *col) {
    /* fields with defaults print their effective value */
    if (!strcmp(col, "system")) { csv_cell(f, r->system); return; }
    if (!strcmp(col, "kind")) { csv_cell(f, r->kind); return; }
    if (!strcmp(col, "method")) { csv_cell(f, r->method); return; }
    if (!strcmp(col, "family")) { csv_cell(f, r->family); return; }
    const struct jsonl_value *v = jsonl_get(&r->obj, col);
    if (!v) return;
    switch (v->type) {
    case JSONL_NULL: case JSONL_OTHER: break;
    case JSONL_BOOL: fputs(v->b ? "true" : "false", f); break;
    case JSONL_NUMBER: if (isfinite(v->num)) fputs(v->str, f); break; /* as written: exact */
    case JSONL_STRING: csv_cell(f, v->str); break;
    case JSONL_STRINGS: {
        size_t n = 1;
        for (int i = 0; i < v->n_items; i++) n += strlen(v->items[i]) + 1;
        char *s = xcalloc(n, 1);
        for (int i = 0; i < v->n_items; i++) {
            if (i) strcat(s, "|");
            strcat(s, v->items[i]);
        }
        csv_cell(f, s);
        free(s);
        break;
    }
    }
}

static int write_csv(const struct report *R, char *err, size_t err_size) {
    char path[PATH_MAX];
    if (!path_join(path, sizeof path, R->dir, "results.csv")) return set_err(err, err_size, "path too long");
    FILE *f = fopen(path, "wb");
    if (!f) return set_err(err, err_size, "%s: %s", path, strerror(errno));
    const int nc = (int)(sizeof CSV_COLS / sizeof *CSV_COLS);
    for (int c = 0; c < nc; c++) fprintf(f, "%s%s", c ? "," : "", CSV_COLS[c]);
    fputs("\r\n", f);
    for (int i = 0; i < R->n; i++) {
        for (int c = 0; c < nc; c++) {
            if (c) fputc(',', f);
            csv_value(f, &R->r[i], CSV_COLS[c]);
        }
        fputs("\r\n", f);
    }
    if (ferror(f) | fclose(f)) return set_err(err, err_size, "%s: write error", path);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * report.md; every table cell is " x |" after a leading "|" */

static void md_text(FILE *f, const char *s) { /* inside a cell: '|' escaped, line breaks as spaces */
    for (; *s; s++) {
        if (*s == '|') fputs("\\|", f);
        else if (*s == '\n' || *s == '\r' || *s == '\t') fputc(' ', f);
        else fputc(*s, f);
    }
}

static void md_cell(FILE *f, const char *s) {
    fputc(' ', f);
    md_text(f, s);
    fputs(" |", f);
}

static void md_num(FILE *f, const char *fmt, double v) {
    fputc(' ', f);
    if (isfinite(v)) fprintf(f, fmt, v);
    else fputs(DASH, f);
    fputs(" |", f);
}

/* header rule: n_left left-aligned label columns, n_right right-aligned number columns */
static void md_rule(FILE *f, int n_left, int n_right) {
    fputc('|', f);
    for (int i = 0; i < n_left; i++) fputs("---|", f);
    for (int i = 0; i < n_right; i++) fputs("---:|", f);
    fputc('\n', f);
}

static bool is_task(const struct rec *r, int im, int imode) {
    return !r->is_ppl && r->im == im && r->imode == imode;
}

/* row key of the summary and per-task tables: (method, -ratio, system) */
static struct key row_key(const struct rec *r) { return KEY(r->imeth, -r->ratio, r->isys); }

static void md_row_head(FILE *f, const struct report *R, const struct key *k, bool ratio) {
    fputc('|', f);
    if (R->peers) md_cell(f, R->systems.v[(int)k->k[ratio ? 2 : 1]]);
    md_cell(f, R->methods.v[(int)k->k[0]]);
    if (ratio) md_num(f, "%g", -k->k[1]);
}

static void md_head_labels(FILE *f, const struct report *R, bool ratio) {
    fputc('|', f);
    if (R->peers) md_cell(f, "system");
    md_cell(f, "method");
    if (ratio) md_cell(f, "ratio");
}

/* summary of model im, mode imode: mean score per family, overall, n, KV %, decode tok/s */
static void md_summary(FILE *f, const struct report *R, int im, int imode) {
    struct keyset rows = {0}, cols = {0};
    for (int i = 0; i < R->n; i++)
        if (is_task(&R->r[i], im, imode)) {
            ks_add(&rows, row_key(&R->r[i]));
            ks_add(&cols, KEY(R->r[i].ifam));
        }
    ks_done(&rows);
    ks_done(&cols);
    if (!rows.n) goto out;
    const int nc = cols.n, w = nc + 4; /* families, overall, kv peak, kv full, decode */
    struct acc *a = xcalloc((size_t)rows.n * (size_t)w, sizeof *a);
    for (int i = 0; i < R->n; i++) {
        const struct rec *r = &R->r[i];
        if (!is_task(r, im, imode)) continue;
        int ir = ks_find(&rows, row_key(r));
        struct acc *row = a + (size_t)ir * (size_t)w;
        acc_add(&row[ks_find(&cols, KEY(r->ifam))], 100 * r->score, 1);
        acc_add(&row[nc], 100 * r->score, 1);
        if (isfinite(r->kv_held) && isfinite(r->kv_full) && r->kv_full > 0) {
            acc_add(&row[nc + 1], r->kv_held, 1);
            acc_add(&row[nc + 2], r->kv_full, 1);
        }
        acc_add(&row[nc + 3], r->decode, 1);
    }
    fprintf(f, "\n### Summary, %s (mode `%s`)\n\n", mode_label(R->modes.v[imode]), R->modes.v[imode]);
    md_head_labels(f, R, true);
    for (int c = 0; c < nc; c++) md_cell(f, R->families.v[(int)cols.v[c].k[0]]);
    fputs(" overall | n | KV % of full | decode tok/s |\n", f);
    md_rule(f, R->peers ? 2 : 1, 1 + nc + 4);
    for (int ir = 0; ir < rows.n; ir++) {
        const struct acc *row = a + (size_t)ir * (size_t)w;
        md_row_head(f, R, &rows.v[ir], true);
        for (int c = 0; c <= nc; c++) md_num(f, "%.1f", acc_mean(&row[c]));
        md_num(f, "%.0f", (double)row[nc].n); /* scored records: a failed run has no score */
        md_num(f, "%.1f", row[nc + 2].sum > 0 ? 100 * row[nc + 1].sum / row[nc + 2].sum : NAN);
        md_num(f, "%.1f", acc_mean(&row[nc + 3]));
        fputc('\n', f);
    }
    free(a);
out:
    ks_free(&rows);
    ks_free(&cols);
}

/* per-task table of model im, mode imode: columns task@length */
static void md_per_task(FILE *f, const struct report *R, int im, int imode) {
    struct keyset rows = {0}, cols = {0};
    for (int i = 0; i < R->n; i++)
        if (is_task(&R->r[i], im, imode)) {
            ks_add(&rows, row_key(&R->r[i]));
            ks_add(&cols, KEY(R->r[i].itask, R->r[i].length));
        }
    ks_done(&rows);
    ks_done(&cols);
    if (!rows.n) goto out;
    struct acc *a = xcalloc((size_t)rows.n * (size_t)cols.n, sizeof *a);
    for (int i = 0; i < R->n; i++) {
        const struct rec *r = &R->r[i];
        if (!is_task(r, im, imode)) continue;
        int ir = ks_find(&rows, row_key(r)), ic = ks_find(&cols, KEY(r->itask, r->length));
        acc_add(&a[(size_t)ir * (size_t)cols.n + (size_t)ic], 100 * r->score, 1);
    }
    fprintf(f, "\n### Per task, %s (score %%, columns task@length)\n\n", mode_label(R->modes.v[imode]));
    md_head_labels(f, R, true);
    for (int c = 0; c < cols.n; c++) {
        fputc(' ', f);
        md_text(f, R->tasks.v[(int)cols.v[c].k[0]]);
        if (isfinite(cols.v[c].k[1])) fprintf(f, "@%.0f", cols.v[c].k[1]);
        fputs(" |", f);
    }
    fputc('\n', f);
    md_rule(f, R->peers ? 2 : 1, 1 + cols.n);
    for (int ir = 0; ir < rows.n; ir++) {
        md_row_head(f, R, &rows.v[ir], true);
        for (int c = 0; c < cols.n; c++) md_num(f, "%.1f", acc_mean(&a[(size_t)ir * (size_t)cols.n + (size_t)c]));
        fputc('\n', f);
    }
    free(a);
out:
    ks_free(&rows);
    ks_free(&cols);
}

/* ppl / KL of model im: rows (method, system), columns budget (0: no budget) */
static void md_ppl(FILE *f, const struct report *R, int im) {
    struct keyset rows = {0}, cols = {0};
#define PPL_COL(r) ((r)->is_full || !((r)->budget > 0) ? 0.0 : (r)->budget)
    for (int i = 0; i < R->n; i++) {
        const struct rec *r = &R->r[i];
        if (!r->is_ppl || r->im != im) continue;
        ks_add(&rows, KEY(r->imeth, r->isys));
        ks_add(&cols, KEY(PPL_COL(r)));
    }
    ks_done(&rows);
    ks_done(&cols);
    if (!rows.n) goto out;
    size_t nc = (size_t)cols.n;
    struct acc *a = xcalloc((size_t)rows.n * nc * 2, sizeof *a); /* (row, col, {ln ppl, kl}) */
    for (int i = 0; i < R->n; i++) {
        const struct rec *r = &R->r[i];
        if (!r->is_ppl || r->im != im) continue;
        size_t ix = ((size_t)ks_find(&rows, KEY(r->imeth, r->isys)) * nc + (size_t)ks_find(&cols, KEY(PPL_COL(r)))) * 2;
        acc_add(&a[ix], log(r->ppl), tok_weight(r));
        acc_add(&a[ix + 1], r->kl, tok_weight(r));
    }
#undef PPL_COL
    fputs("\n### Perplexity / KL vs KV budget (cells: ppl / KL(full || method) in nats per token; "
          "columns: tokens per KV head)\n\n", f);
    md_head_labels(f, R, false);
    for (size_t c = 0; c < nc; c++) {
        if (cols.v[c].k[0] > 0) fprintf(f, " %.0f |", cols.v[c].k[0]);
        else fputs(" full (no budget) |", f);
    }
    fputc('\n', f);
    md_rule(f, R->peers ? 2 : 1, (int)nc);
    for (int ir = 0; ir < rows.n; ir++) {
        fputc('|', f);
        if (R->peers) md_cell(f, R->systems.v[(int)rows.v[ir].k[1]]);
        md_cell(f, R->methods.v[(int)rows.v[ir].k[0]]);
        for (size_t c = 0; c < nc; c++) {
            const struct acc *p = &a[((size_t)ir * nc + c) * 2];
            if (!p[0].n && !p[1].n) { md_cell(f, DASH); continue; }
            fputc(' ', f);
            if (p[0].n) fprintf(f, "%.3f", exp(acc_mean(&p[0])));
            else fputs(DASH, f);
            fputs(" / ", f);
            if (p[1].n) fprintf(f, "%.4f", acc_mean(&p[1]));
            else fputs(DASH, f);
            fputs(" |", f);
        }
        fputc('\n', f);
    }
    free(a);
out:
    ks_free(&rows);
    ks_free(&cols);
}

/* kvsieve next to every peer system: rows (task, length, mode, method, ratio) that a peer ran */
static void md_peers(FILE *f, const struct report *R, int im) {
    struct keyset rows = {0};
#define PEER_ROW(r) KEY((r)->itask, (r)->length, (r)->imode, (r)->imeth, -(r)->ratio)
    for (int i = 0; i < R->n; i++)
        if (!R->r[i].is_ppl && R->r[i].im == im) ks_add(&rows, PEER_ROW(&R->r[i]));
    ks_done(&rows);
    size_t ns = (size_t)R->systems.n;
    struct acc *a = xcalloc((size_t)rows.n * ns, sizeof *a);
    for (int i = 0; i < R->n; i++) {
        const struct rec *r = &R->r[i];
        if (!r->is_ppl && r->im == im) acc_add(&a[(size_t)ks_find(&rows, PEER_ROW(r)) * ns + (size_t)r->isys], 100 * r->score, 1);
    }
#undef PEER_ROW
    bool head = false;
    for (int ir = 0; ir < rows.n; ir++) {
        const struct acc *row = a + (size_t)ir * ns;
        bool peer = false;
        for (size_t s = 1; s < ns; s++) peer |= row[s].n > 0;
        if (!peer) continue;
        if (!head) {
            fputs("\n### kvsieve vs peers (mean score %, n records)\n\n| task | length | mode | method | ratio |", f);
            for (size_t s = 0; s < ns; s++) md_cell(f, R->systems.v[s]);
            fputc('\n', f);
            md_rule(f, 4, 1 + (int)ns);
            head = true;
        }
        const struct key *k = &rows.v[ir];
        fputc('|', f);
        md_cell(f, R->tasks.v[(int)k->k[0]]);
        md_num(f, "%.0f", k->k[1]);
        md_cell(f, R->modes.v[(int)k->k[2]]);
        md_cell(f, R->methods.v[(int)k->k[3]]);
        md_num(f, "%g", -k->k[4]);
        for (size_t s = 0; s < ns; s++) {
            if (row[s].n) fprintf(f, " %.1f (n=%d) |", acc_mean(&row[s]), row[s].n);
            else md_cell(f, DASH);
        }
        fputc('\n', f);
    }
    free(a);
    ks_free(&rows);
}

static void md_header(FILE *f, const struct report *R) {
    fputs("# kvsieve evaluation report\n\n- **Models:** ", f);
    for (int m = 0; m < R->models.n; m++) {
        const char *sha = NULL;
        for (int i = 0; i < R->n && !sha; i++)
            if (R->r[i].im == m) sha = R->r[i].sha;
        fprintf(f, "%s", m ? "; " : "");
        md_text(f, R->models.v[m]);
        if (sha) fprintf(f, " (sha256 `%.12s…`)", sha);
    }
    fputs("\n- **Commits:** ", f);
    for (int i = 0; i < R->commits.n; i++) {
        fprintf(f, "%s`", i ? ", " : "");
        md_text(f, R->commits.v[i]);
        fputc('`', f);
    }
    if (!R->commits.n) fputs(DASH, f);
    int n_ppl = 0;
    for (int i = 0; i < R->n; i++) n_ppl += R->r[i].is_ppl;
    fprintf(f, "\n- **Records:** %d (%d task, %d ppl) from ", R->n, R->n - n_ppl, n_ppl);
    for (int i = 0; i < R->n_files; i++) {
        fprintf(f, "%s", i ? ", " : "");
        md_text(f, R->files[i]);
        fprintf(f, " (%d)", R->file_n[i]);
    }
    fputs("\n- **Systems:** ", f);
    for (int i = 0, k = 0; i < R->systems.n; i++) {
        bool used = false;
        for (int j = 0; j < R->n && !used; j++) used = R->r[j].isys == i;
        if (!used) continue;
        fprintf(f, "%s", k++ ? ", " : "");
        md_text(f, R->systems.v[i]);
    }
    if (R->n_bad || R->n_dup)
        fprintf(f, "\n- **Skipped:** %d malformed line%s; %d record%s replaced by a later one with the same run key",
                R->n_bad, R->n_bad == 1 ? "" : "s", R->n_dup, R->n_dup == 1 ? "" : "s");
    time_t t = time(NULL);
    const char *sde = getenv("SOURCE_DATE_EPOCH"); /* reproducible reports */
    if (sde && *sde) t = (time_t)strtoll(sde, NULL, 10);
    struct tm tm;
    char date[64] = "?";
    if (gmtime_r(&t, &tm)) strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", &tm);
    fprintf(f, "\n- **Generated:** %s\n\n", date);
    fputs("Scores are means over all task records of a cell (tasks × lengths × samples), in %; "
          "*n* counts the records with a score. *KV % of full*: KV cache bytes held when decoding starts "
          "(K/V payload and per-entry metadata) as a share of what the uncompressed cache holds for the "
          "same tokens; the task runs compress once at the end of prefill (kvpress style), so their peak "
          "during prefill is the full cache (`kv_bytes_peak` in results.csv); chunked-prefill runs (ppl) "
          "stay bounded. Decode tok/s: one sequence alone, measured after compression. Perplexity is pooled over tokens; KL(full || method) is in nats per "
          "token. " DASH " marks a cell without data. Every record is in `results.csv`.\n", f);
}

static void md_plots(FILE *f, const struct report *R) {
    if (!R->n_figs) return;
    fputs("\n## Plots\n\n", f);
    if (R->gnuplot < 0)
        fputs("> **Plots were not rendered:** gnuplot was not found on PATH (Debian: `apt install "
              "gnuplot-nox`). Their data and scripts are in `plots/`; render them with "
              "`cd plots && for f in *.gp; do gnuplot \"$f\"; done`.\n\n", f);
    for (int i = 0; i < R->n_figs; i++) {
        const struct figure *g = &R->figs[i];
        fprintf(f, "### %s\n\n", g->title);
        if (g->rendered > 0) fprintf(f, "![%s](plots/%s.png)\n\n[SVG](plots/%s.svg) · ", g->title, g->stem, g->stem);
        else if (g->rendered < 0) fputs("*gnuplot failed on this figure; see `plots/gnuplot.log`.* ", f);
        fprintf(f, "[data](plots/%s.dat) · [gnuplot script](plots/%s.gp)\n\n", g->stem, g->stem);
    }
}

static int write_md(const struct report *R, char *err, size_t err_size) {
    char path[PATH_MAX];
    if (!path_join(path, sizeof path, R->dir, "report.md")) return set_err(err, err_size, "path too long");
    FILE *f = fopen(path, "wb");
    if (!f) return set_err(err, err_size, "%s: %s", path, strerror(errno));
    md_header(f, R);
    for (int im = 0; im < R->models.n; im++) {
        fputs("\n## ", f);
        md_text(f, R->models.v[im]);
        fputc('\n', f);
        for (int imode = 0; imode < R->modes.n; imode++) {
            md_summary(f, R, im, imode);
            md_per_task(f, R, im, imode);
        }
        md_ppl(f, R, im);
        if (R->peers) md_peers(f, R, im);
    }
    md_plots(f, R);
    if (ferror(f) | fclose(f)) return set_err(err, err_size, "%s: write error", path);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * entry point */

int eval_report(const char *dir, const char *const *extra_files, int n_extra, char *err, size_t err_size) {
    if (err && err_size) err[0] = 0;
    if (!dir || n_extra < 0 || (n_extra > 0 && !extra_files))
        return set_err(err, err_size, "eval_report: bad arguments");
    struct report R = {.dir = dir};
    int rc = load_all(&R, extra_files, n_extra, err, err_size);
    if (!rc && R.n == 0)
        rc = set_err(err, err_size, "no result records in %s/results.jsonl, %s/peer_*.jsonl%s (%d malformed lines)",
                     dir, dir, n_extra ? " or the extra files" : "", R.n_bad);
    if (!rc) {
        drop_duplicates(&R);
        build_dicts(&R);
        rc = write_csv(&R, err, err_size);
    }
    if (!rc) rc = report_plot_write(&R, err, err_size);
    if (!rc) rc = write_md(&R, err, err_size);
    report_free(&R);
    return rc;
}
