/* report_plot.c — the figures of the evaluation report, as gnuplot data and scripts in
 * DIR/plots/, rendered to PNG (pngcairo 1400x900) and SVG by running gnuplot when it is on PATH.
 *
 * Figures per model: score_vs_ratio_MODE (one panel per task family and a legend panel; x the
 * kept ratio on a reversed log axis so that compression grows to the right), kvbytes_vs_ratio,
 * decode_vs_ratio, ppl_vs_budget (log y), kl_vs_budget. One line per (system, method): colour by
 * method, solid with filled points for kvsieve, dashed with open points for peers; the full
 * runs are horizontal lines (black dashed for kvsieve, grey dotted for peers). Means as in
 * report.c. NAME.dat holds one gnuplot data block per series (x, mean y, n) and the reference
 * lines as comments; NAME.gp draws the same body once per terminal, so users can re-plot.
 * Does not: draw a figure without series, or fail when gnuplot is missing or fails (the figure
 * is then marked unrendered and report.md says so; gnuplot's output is in plots/gnuplot.log).
 */
#include "eval/report_plot.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>


enum fig_kind { FIG_SCORE, FIG_KVBYTES, FIG_DECODE, FIG_PPL, FIG_KL };

/* Whether record r feeds figure kind k of model im (and mode imode for FIG_SCORE; -1: any mode);
 * sets its panel, x, y and weight; *ref marks the full reference, drawn as a horizontal line. */
static bool fig_point(const struct rec *r, enum fig_kind k, int im, int imode, int *panel,
                      double *x, double *y, double *w, bool *ref) {
    if (r->im != im) return false;
    *ref = r->is_full;
    *panel = 0;
    *w = 1;
    *x = r->ratio;
    *y = NAN;
    switch (k) {
    case FIG_SCORE:
        if (r->is_ppl || (imode >= 0 && r->imode != imode)) return false;
        *panel = r->ifam;
        *y = 100 * r->score;
        break;
    case FIG_KVBYTES:
        if (r->is_ppl) return false;
        *y = r->kv_held / (1024.0 * 1024.0);
        break;
    case FIG_DECODE:
        if (r->is_ppl) return false;
        *y = r->decode;
        break;
    case FIG_PPL: case FIG_KL:
        if (!r->is_ppl || (k == FIG_KL && r->is_full)) return false;
        *x = r->budget;
        *y = k == FIG_PPL ? log(r->ppl) : r->kl; /* ppl pooled in log space */
        *w = tok_weight(r);
        break;
    }
    return isfinite(*y) && (*ref || (isfinite(*x) && *x > 0));
}

/* Series points keyed (panel, system, method, -x) or, refs, (panel, system). acc NULL: collect
 * the keys; else accumulate into acc[key index]. */
static void fig_gather(const struct report *R, enum fig_kind k, int im, int imode, bool refs,
                       struct keyset *ks, struct acc *acc) {
    for (int i = 0; i < R->n; i++) {
        const struct rec *r = &R->r[i];
        int panel;
        double x, y, w;
        bool ref;
        if (!fig_point(r, k, im, imode, &panel, &x, &y, &w, &ref) || ref != refs) continue;
        struct key key = refs ? KEY(panel, r->isys) : KEY(panel, r->isys, r->imeth, -x);
        if (!acc) ks_add(ks, key);
        else acc_add(&acc[ks_find(ks, key)], y, w);
    }
}

static const char *const PALETTE[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                      "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"};
static const int PEER_POINTS[] = {6, 4, 8, 12, 10}; /* open shapes; kvsieve uses 7 (filled circle) */

static void gp_quote(FILE *f, const char *s) { /* gnuplot single-quoted string */
    fputc('\'', f);
    for (; *s; s++) {
        if (*s == '\'') fputs("''", f);
        else fputc((unsigned char)*s < 0x20 ? ' ' : *s, f);
    }
    fputc('\'', f);
}

static void gp_label(FILE *f, const struct report *R, int isys, const char *method) {
    char buf[256];
    if (R->peers) snprintf(buf, sizeof buf, "%s: %s", R->systems.v[isys], method);
    else snprintf(buf, sizeof buf, "%s", method);
    gp_quote(f, buf);
}

/* colour by method rank; "full" (rank 0 when present) is drawn as a reference line instead */
static void gp_series_style(FILE *f, const struct report *R, int isys, int imeth) {
    int ic = imeth - (R->methods.n && !strcmp(R->methods.v[0], "full"));
    fprintf(f, "lw 2 lc rgb '%s' dt %d pt %d ps 1.3", PALETTE[(ic < 0 ? 0 : ic) % 10], isys ? 2 : 1,
            isys ? PEER_POINTS[(isys - 1) % 5] : 7);
}

static void gp_ref_style(FILE *f, int isys) {
    fprintf(f, "lw 2 lc rgb '%s' dt %s", isys ? "#777777" : "#000000", isys ? "(3,4)" : "(10,6)");
}

struct figdata { /* what the script needs */
    enum fig_kind kind;
    const char *stem, *title, *xlabel, *ylabel;
    struct keyset pts, refs, panels, xs;
    struct acc *ap, *ar;
    struct keyset legend; /* (isys, imeth) of the series */
};

/* the plotting commands, once per terminal */
static void gp_body(FILE *f, const struct report *R, const struct figdata *F) {
    bool ratio_x = F->kind != FIG_PPL && F->kind != FIG_KL, multi = F->kind == FIG_SCORE;
    double lo = INFINITY, hi = -INFINITY;
    for (int i = 0; i < F->xs.n; i++) {
        lo = fmin(lo, F->xs.v[i].k[0]);
        hi = fmax(hi, F->xs.v[i].k[0]);
    }
    if (!F->xs.n) lo = hi = 1;
    fputs("set termoption noenhanced\nset grid lc rgb '#cccccc'\nset logscale x\nunset mxtics\n", f);
    if (F->kind == FIG_PPL) fputs("set logscale y\n", f);
    if (ratio_x) fprintf(f, "set xrange [%.9g:%.9g]  # reversed: more compression to the right\n", hi * 1.25, lo / 1.25);
    else fprintf(f, "set xrange [%.9g:%.9g]\n", lo / 1.25, hi * 1.25);
    fputs("set xtics (", f);
    for (int i = 0; i < F->xs.n; i++) fprintf(f, "%s'%g' %.9g", i ? ", " : "", F->xs.v[i].k[0], F->xs.v[i].k[0]);
    if (!F->xs.n) fputs("'1' 1", f);
    fputs(")\n", f);
    fputs("set xlabel ", f);
    gp_quote(f, F->xlabel);
    fputs("\nset ylabel ", f);
    gp_quote(f, F->ylabel);
    fputc('\n', f);
    /* explicit y ranges keep a reference line off the border */
    double ylo = INFINITY, yhi = -INFINITY;
    for (int i = 0; i < F->pts.n + F->refs.n; i++) {
        double y = acc_mean(i < F->pts.n ? &F->ap[i] : &F->ar[i - F->pts.n]);
        if (F->kind == FIG_PPL) y = exp(y);
        if (isfinite(y)) ylo = fmin(ylo, y), yhi = fmax(yhi, y);
    }
    if (F->kind == FIG_SCORE) fputs("set yrange [0:105]\n", f);
    else if (F->kind == FIG_PPL && ylo > 0) {
        double a = ylo / 1.25, b = yhi * 1.25;
        fprintf(f, "set yrange [%.9g:%.9g]\n", a, b);
        /* labelled ticks at 1-2-5 steps (denser in a narrow range): decades alone may show one */
        static const double dense[] = {1, 1.5, 2, 3, 5, 7}, sparse[] = {1, 2, 5};
        bool narrow = b / a < 30;
        const double *m = narrow ? dense : sparse;
        int nm = narrow ? 6 : 3, n_tic = 0;
        fputs("set ytics (", f);
        for (int d = (int)floor(log10(a)); d <= (int)ceil(log10(b)); d++)
            for (int i = 0; i < nm; i++) {
                double v = m[i] * pow(10, d);
                if (v >= a && v <= b) fprintf(f, "%s'%g' %.9g", n_tic++ ? ", " : "", v, v);
            }
        fputs(")\n", f);
    }
    else fprintf(f, "set yrange [%.9g:%.9g]\n", fmin(0, ylo * 1.1), yhi > 0 ? yhi * 1.1 : 1);
    int n_leg = F->legend.n + F->refs.n;
    if (multi) {
        int np = F->panels.n + 1, cols = np <= 2 ? np : np <= 4 ? 2 : np <= 9 ? 3 : 4;
        fprintf(f, "set multiplot layout %d,%d title ", (np + cols - 1) / cols, cols);
        gp_quote(f, F->title);
        fputs(" font ',15'\nunset key\n", f);
    } else {
        fputs("set title ", f);
        gp_quote(f, F->title);
        fputs(" font ',15'\n", f);
        fputs(n_leg > 14 ? "set key outside below center horizontal maxrows 4\n" : "set key outside right top vertical Left reverse\n", f);
    }
    /* one panel per family (score) or the single panel; series blocks are in pts order */
    for (int p = 0; p < F->panels.n; p++) {
        int panel = (int)F->panels.v[p].k[0];
        if (multi) {
            fputs("set title ", f);
            gp_quote(f, R->families.v[panel]);
            fputc('\n', f);
        }
        const char *sep = "plot ";
        int block = 0;
        for (int i = 0; i < F->pts.n; i++) {
            const struct key *k = &F->pts.v[i];
            bool first = i == 0 || key_cmp(&KEY(k->k[0], k->k[1], k->k[2]), &KEY(F->pts.v[i - 1].k[0], F->pts.v[i - 1].k[1], F->pts.v[i - 1].k[2]));
            if (!first) continue;
            if ((int)k->k[0] == panel) {
                fprintf(f, "%s'%s.dat' index %d using 1:2 with linespoints ", sep, F->stem, block);
                gp_series_style(f, R, (int)k->k[1], (int)k->k[2]);
                fputs(multi ? " notitle" : " title ", f);
                if (!multi) gp_label(f, R, (int)k->k[1], R->methods.v[(int)k->k[2]]);
                sep = ", \\\n     ";
            }
            block++;
        }
        for (int i = 0; i < F->refs.n; i++) {
            if ((int)F->refs.v[i].k[0] != panel) continue;
            double y = acc_mean(&F->ar[i]);
            fprintf(f, "%s%.9g with lines ", sep, F->kind == FIG_PPL ? exp(y) : y);
            gp_ref_style(f, (int)F->refs.v[i].k[1]);
            fputs(multi ? " notitle" : " title ", f);
            if (!multi) gp_label(f, R, (int)F->refs.v[i].k[1], "full");
            sep = ", \\\n     ";
        }
        fputc('\n', f);
    }
    if (multi) { /* the legend panel: every entry drawn out of range so that only the key shows */
        fputs("unset title\nunset xlabel\nunset ylabel\nunset logscale\nunset grid\nunset border\nunset tics\n"
              "set xrange [0:1]\nset yrange [0:1]\n", f);
        fprintf(f, "set key center center vertical Left reverse samplen 5 spacing 1.4%s\n", n_leg > 16 ? " maxrows 16" : "");
        const char *sep = "plot ";
        for (int i = 0; i < F->legend.n; i++) {
            int isys = (int)F->legend.v[i].k[0], imeth = (int)F->legend.v[i].k[1];
            fprintf(f, "%s2 with linespoints ", sep);
            gp_series_style(f, R, isys, imeth);
            fputs(" title ", f);
            gp_label(f, R, isys, R->methods.v[imeth]);
            sep = ", \\\n     ";
        }
        struct keyset rs = {0}; /* systems with a reference line */
        for (int i = 0; i < F->refs.n; i++) ks_add(&rs, KEY(F->refs.v[i].k[1]));
        ks_done(&rs);
        for (int i = 0; i < rs.n; i++) {
            fprintf(f, "%s2 with lines ", sep);
            gp_ref_style(f, (int)rs.v[i].k[0]);
            fputs(" title ", f);
            gp_label(f, R, (int)rs.v[i].k[0], "full");
            sep = ", \\\n     ";
        }
        ks_free(&rs);
        fputs("\nunset multiplot\n", f);
    }
}

/* Runs `gnuplot SCRIPT` inside DIR/plots with output appended to gnuplot.log. Returns its exit
 * status; 127 when gnuplot could not be started. */
static int run_gnuplot(const struct report *R, const char *script) {
    char log_path[PATH_MAX];
    if (!path_join(log_path, sizeof log_path, R->plots, "gnuplot.log")) return 1;
    int log_fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (log_fd < 0 || null_fd < 0) {
        if (log_fd >= 0) close(log_fd);
        if (null_fd >= 0) close(null_fd);
        return 1;
    }
    pid_t pid = fork();
    if (pid == 0) {
        if (chdir(R->plots) != 0) _exit(126);
        dup2(null_fd, 0);
        dup2(log_fd, 1);
        dup2(log_fd, 2);
        execlp("gnuplot", "gnuplot", script, (char *)NULL);
        _exit(127);
    }
    close(log_fd);
    close(null_fd);
    if (pid < 0) return 1;
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR) return 1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}

static void slug(char *out, size_t n, const char *s) { /* file-name-safe copy */
    size_t k = 0;
    for (; *s && k + 1 < n; s++)
        out[k++] = (isalnum((unsigned char)*s) && (unsigned char)*s < 0x80) || *s == '.' || *s == '-' ? *s : '_';
    out[k] = 0;
}

/* Writes (and renders) one figure of model im; nothing when it has no data. */
static int figure_make(struct report *R, enum fig_kind kind, int im, int imode, char *err, size_t err_size) {
    struct figdata F = {.kind = kind};
    fig_gather(R, kind, im, imode, false, &F.pts, NULL);
    ks_done(&F.pts);
    /* score: without full runs in this mode, the full runs of any mode give the reference */
    int ref_mode = imode;
    fig_gather(R, kind, im, ref_mode, true, &F.refs, NULL);
    if (kind == FIG_SCORE && !F.refs.n && F.pts.n) {
        ref_mode = -1;
        fig_gather(R, kind, im, ref_mode, true, &F.refs, NULL);
    }
    ks_done(&F.refs);
    int rc = 0;
    if (!F.pts.n) goto out; /* a reference line alone is no figure */
    F.ap = xcalloc((size_t)F.pts.n, sizeof *F.ap);
    F.ar = xcalloc((size_t)F.refs.n, sizeof *F.ar);
    fig_gather(R, kind, im, imode, false, &F.pts, F.ap);
    fig_gather(R, kind, im, ref_mode, true, &F.refs, F.ar);
    for (int i = 0; i < F.pts.n; i++) {
        ks_add(&F.panels, KEY(F.pts.v[i].k[0]));
        ks_add(&F.xs, KEY(-F.pts.v[i].k[3]));
        ks_add(&F.legend, KEY(F.pts.v[i].k[1], F.pts.v[i].k[2]));
    }
    for (int i = 0; i < F.refs.n; i++) ks_add(&F.panels, KEY(F.refs.v[i].k[0]));
    ks_done(&F.panels);
    ks_done(&F.xs);
    ks_done(&F.legend);

    /* names and labels */
    struct figure *fg = NULL;
    R->figs = xalloc(R->figs, (size_t)R->n_figs + 1, sizeof *R->figs);
    fg = &R->figs[R->n_figs++];
    memset(fg, 0, sizeof *fg);
    char ms[64] = "", md[64] = "";
    if (R->models.n > 1) { ms[0] = '_'; slug(ms + 1, sizeof ms - 1, R->models.v[im]); }
    const char *model = R->models.v[im];
    switch (kind) {
    case FIG_SCORE:
        slug(md, sizeof md, R->modes.v[imode]);
        snprintf(fg->stem, sizeof fg->stem, "score_vs_ratio_%s%s", md, ms);
        snprintf(fg->title, sizeof fg->title, "%s: mean score vs kept KV ratio, %s", model, mode_label(R->modes.v[imode]));
        F.xlabel = "kept KV ratio (log scale)";
        F.ylabel = "mean score (%)";
        break;
    case FIG_KVBYTES:
        snprintf(fg->stem, sizeof fg->stem, "kvbytes_vs_ratio%s", ms);
        snprintf(fg->title, sizeof fg->title, "%s: KV cache held while decoding vs kept ratio (task runs)", model);
        F.xlabel = "kept KV ratio (log scale)";
        F.ylabel = "KV cache held (MiB)";
        break;
    case FIG_DECODE:
        snprintf(fg->stem, sizeof fg->stem, "decode_vs_ratio%s", ms);
        snprintf(fg->title, sizeof fg->title, "%s: decode speed vs kept KV ratio (task runs)", model);
        F.xlabel = "kept KV ratio (log scale)";
        F.ylabel = "decode (tokens/s)";
        break;
    case FIG_PPL: case FIG_KL:
        snprintf(fg->stem, sizeof fg->stem, "%s_vs_budget%s", kind == FIG_PPL ? "ppl" : "kl", ms);
        snprintf(fg->title, sizeof fg->title, "%s: %s vs KV budget", model, kind == FIG_PPL ? "perplexity" : "KL(full || method)");
        F.xlabel = "KV budget (tokens per KV head, log scale)";
        F.ylabel = kind == FIG_PPL ? "perplexity (log scale)" : "KL (nats/token)";
        break;
    }
    F.stem = fg->stem;
    F.title = fg->title;

    /* data */
    char path[PATH_MAX], name[256];
    snprintf(name, sizeof name, "%s.dat", fg->stem);
    if (!path_join(path, sizeof path, R->plots, name)) { rc = set_err(err, err_size, "path too long"); goto out; }
    FILE *f = fopen(path, "wb");
    if (!f) { rc = set_err(err, err_size, "%s: %s", path, strerror(errno)); goto out; }
    fprintf(f, "# %s\n# data of %s.gp: one block per series (gnuplot 'index' counts from 0); columns: x y n\n", fg->title, fg->stem);
    for (int i = 0; i < F.pts.n; i++) {
        const struct key *k = &F.pts.v[i];
        if (i == 0 || key_cmp(&KEY(k->k[0], k->k[1], k->k[2]), &KEY(F.pts.v[i - 1].k[0], F.pts.v[i - 1].k[1], F.pts.v[i - 1].k[2])))
            fprintf(f, "%s# panel=%s system=%s method=%s\n", i ? "\n\n" : "",
                    kind == FIG_SCORE ? R->families.v[(int)k->k[0]] : "-", R->systems.v[(int)k->k[1]], R->methods.v[(int)k->k[2]]);
        double y = acc_mean(&F.ap[i]);
        fprintf(f, "%.9g %.9g %d\n", -k->k[3], kind == FIG_PPL ? exp(y) : y, F.ap[i].n);
    }
    for (int i = 0; i < F.refs.n; i++) {
        double y = acc_mean(&F.ar[i]);
        fprintf(f, "# reference (full, horizontal line): panel=%s system=%s y=%.9g n=%d\n",
                kind == FIG_SCORE ? R->families.v[(int)F.refs.v[i].k[0]] : "-",
                R->systems.v[(int)F.refs.v[i].k[1]], kind == FIG_PPL ? exp(y) : y, F.ar[i].n);
    }
    if (ferror(f) | fclose(f)) { rc = set_err(err, err_size, "%s: write error", path); goto out; }

    /* script: the same body for both terminals */
    snprintf(name, sizeof name, "%s.gp", fg->stem);
    if (!path_join(path, sizeof path, R->plots, name)) { rc = set_err(err, err_size, "path too long"); goto out; }
    f = fopen(path, "wb");
    if (!f) { rc = set_err(err, err_size, "%s: %s", path, strerror(errno)); goto out; }
    fprintf(f, "# %s.gp: written by kvsieve's eval report. Re-plot: cd plots && gnuplot %s.gp\n"
               "set encoding utf8\n", fg->stem, fg->stem);
    for (int t = 0; t < 2; t++) {
        fprintf(f, "\nreset\n%s\nset output '%s.%s'\n",
                t ? "set terminal svg size 1400,900 dynamic font 'sans,13' background '#ffffff'"
                  : "set terminal pngcairo size 1400,900 font 'sans,13' background '#ffffff'",
                fg->stem, t ? "svg" : "png");
        gp_body(f, R, &F);
        fputs("unset output\n", f);
    }
    if (ferror(f) | fclose(f)) { rc = set_err(err, err_size, "%s: write error", path); goto out; }

    /* render */
    if (R->gnuplot >= 0) {
        int st = run_gnuplot(R, name);
        if (st == 127) {
            R->gnuplot = -1;
            kvs_log(1, "gnuplot not found on PATH: plots not rendered (Debian: apt-get install "
                    "gnuplot-nox, then `kvsieve eval report DIR`); data and scripts are in %s", R->plots);
        } else {
            R->gnuplot = 1;
            fg->rendered = st == 0 ? 1 : -1;
            if (st) kvs_log(1, "gnuplot failed on %s (exit %d); see %s/gnuplot.log", name, st, R->plots);
        }
    }
out:
    ks_free(&F.pts);
    ks_free(&F.refs);
    ks_free(&F.panels);
    ks_free(&F.xs);
    ks_free(&F.legend);
    free(F.ap);
    free(F.ar);
    return rc;
}

int report_plot_write(struct report *R, char *err, size_t err_size) {
    if (!path_join(R->plots, sizeof R->plots, R->dir, "plots")) return set_err(err, err_size, "path too long");
    if (mkdir(R->plots, 0777) != 0 && errno != EEXIST) return set_err(err, err_size, "%s: %s", R->plots, strerror(errno));
    char log_path[PATH_MAX];
    if (path_join(log_path, sizeof log_path, R->plots, "gnuplot.log")) {
        FILE *f = fopen(log_path, "w"); /* start a fresh log */
        if (f) fclose(f);
    }
    for (int im = 0; im < R->models.n; im++) {
        for (int imode = 0; imode < R->modes.n; imode++)
            if (figure_make(R, FIG_SCORE, im, imode, err, err_size)) return -1;
        static const enum fig_kind rest[] = {FIG_KVBYTES, FIG_DECODE, FIG_PPL, FIG_KL};
        for (int i = 0; i < 4; i++)
            if (figure_make(R, rest[i], im, -1, err, err_size)) return -1;
    }
    return 0;
}
