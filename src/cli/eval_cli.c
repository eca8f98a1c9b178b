/* eval_cli.c — `kvsieve eval ...`: argument parsing for the evaluation harness (src/eval/sweep.c,
 * report.c). Part of the program, not the library: called by main.c, it prints usage, errors
 * and report paths, and returns the process exit code (0 ok, 1 runtime failure, 2 bad input). */
#include "cli/eval_cli.h"
#include "eval/report.h"
#include "eval/sweep.h"
#include "eval/tasks.h"
#include "kv/kv_spec.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *EVAL_USAGE =
    "usage: kvsieve eval <sweep|ppl|tasks|report> [options]\n"
    "\n"
    "  sweep    run the grid: perplexity + KL against the full cache at each --budgets, and\n"
    "           the RULER-style tasks at each --ratios, question-aware and question-agnostic,\n"
    "           for every method; writes DIR/results.jsonl (one line per run; a rerun resumes\n"
    "           and skips runs already there), then DIR/results.csv, DIR/report.md and\n"
    "           DIR/plots/*.png|svg. With no options: the default SmolLM2 grid (7 methods x 3\n"
    "           ratios, 12 tasks at 2048 and 4096 tokens, 2 samples, ppl on 4096 tokens) in\n"
    "           about 25 minutes on 2 cores.\n"
    "           --tasks-file F.jsonl: your own prompts instead of the generated tasks, through\n"
    "           the same grid, both modes, resume and report (format: `eval --help tasks-file`)\n"
    "  ppl      only the perplexity / KL part of the sweep (no --tasks-file)\n"
    "  tasks    export the prompts of the grid as JSONL (--out FILE, '-' = stdout) so other\n"
    "           systems run exactly the same prompts (tools/kvpress_peer.py does); with\n"
    "           --tasks-file: check that file and export it again with this model's template\n"
    "           split and token counts\n"
    "  report   rebuild DIR's CSV, report and plots: report DIR [--peer FILE]...\n"
    "\n"
    "options:\n"
    "  --profile small|medium|large  default grids: small = SmolLM2-135M (default);\n"
    "                   medium = Qwen2.5-Coder-1.5B (make models-large) at 4096 tokens, 8\n"
    "                   tasks x 2 samples, full/streaming/h2o/tova/snapkv and the storage\n"
    "                   parts (full+kivi:bits=4|2, h2o+mikv:low=4|2, snapkv+think:prune=0.4),\n"
    "                   ppl on 2048 tokens at budget 512 (about an hour on 2 cores);\n"
    "                   large = Qwen2.5-Coder-1.5B at 4096/8192/16384 tokens, ppl on 8192,\n"
    "                   the default methods plus locret, agate and snapkv/tova/h2o/\n"
    "                   streaming+when=chunk (bounded-memory prefill; each of these\n"
    "                   prefills on its own): a day on 2 cores, estimated; meant for\n"
    "                   bigger machines\n"
    "  -m, --model FILE GGUF model\n"
    "  --out DIR        results directory (results/sweep, results/sweep-medium,\n"
    "                   results/sweep-large)\n"
    "  --data DIR       Jane Austen's novels (data/austen, from `make data`)\n"
    "  --methods LIST   comma-separated method specs without budget, e.g.\n"
    "                   full,h2o,snapkv:window=16,tova+alloc=adakv (see `kvsieve --help kv`)\n"
    "                   A method that names when= or every= prefills on its own, and so\n"
    "                   do locret and agate (their scores come from the forward); the\n"
    "                   others compress a copy of one shared full prefill (when=prefill,\n"
    "                   every=0)\n"
    "  --ratios LIST    kept fractions for the tasks (0.5,0.25,0.1)\n"
    "  --budgets LIST   tokens per KV head for perplexity (256,512,1024; chunked prefill)\n"
    "  --tasks LIST     task names, 'all' or 'none' (all):\n"
    "                   niah_single_1..3, niah_multikey_1..3, niah_multivalue,\n"
    "                   niah_multiquery, vt, cwe, fwe, qa\n"
    "  --tasks-file F   JSONL of prompts (one object per line: context, question, outputs,\n"
    "                   optional answer_prefix, metric, max_new_tokens, ...; see\n"
    "                   `kvsieve eval --help tasks-file`); replaces --tasks, --lengths,\n"
    "                   --samples and --seed. A malformed line: `F:LINE: problem`, exit 2,\n"
    "                   nothing run\n"
    "  --lengths LIST   prompt lengths in tokens, answer included (2048,4096)\n"
    "  --samples N      prompts per task and length (2)\n"
    "  --seed N         generator seed (1); the same seed gives the same prompts everywhere\n"
    "  --modes LIST     aware,agnostic (both)\n"
    "  --ppl-tokens N   tokens of --ppl-doc for perplexity, 0 = skip (4096)\n"
    "  --ppl-doc NAME   novel for perplexity (prideprejudice)\n"
    "  --speed-tokens N decode steps timed per method and length (16; 0 = skip)\n"
    "  -t, --threads N  worker threads (all cores)\n"
    "  --device cpu|cuda where the model and the caches run (cpu). cuda (a `make cuda`\n"
    "                   build, build/cuda/kvsieve): every context of the sweep on the GPU, the\n"
    "                   methods it does not run skipped with a note; results go to DIR-cuda\n"
    "                   unless --out is given, their runs keyed apart from the CPU's\n"
    "  --peer FILE      report: also read this results file (repeatable)\n"
    "  --no-report      sweep: skip the report at the end\n"
    "  -q, --quiet      no progress lines\n";

static int usage_err(const char *fmt, const char *a) {
    fprintf(stderr, "kvsieve eval: ");
    fprintf(stderr, fmt, a);
    fprintf(stderr, "\n(see `kvsieve eval --help`)\n");
    return 2;
}

/* split a comma list; for --methods, a piece "key=value" continues the previous method */
static int split_list(char *s, const char **out, int max, bool methods) {
    int n = 0;
    for (char *tok = strtok(s, ","); tok; tok = strtok(NULL, ",")) {
        if (methods && n > 0) {
            char *eq = strchr(tok, '='), *colon = strchr(tok, ':'), *plus = strchr(tok, '+');
            if (eq && (!colon || colon > eq) && (!plus || plus > eq)) {
                /* glue back: the previous piece ends right before this one in s */
                char *prev = (char *)out[n - 1];
                prev[strlen(prev)] = ',';
                continue;
            }
        }
        if (n == max) return -1;
        out[n++] = tok;
    }
    return n;
}

static bool parse_ints(char *s, int *out, int *n, int max, int lo, int hi) {
    *n = 0;
    for (char *tok = strtok(s, ","); tok; tok = strtok(NULL, ",")) {
        char *end;
        long v = strtol(tok, &end, 10);
        if (*end || v < lo || v > hi || *n == max) return false;
        out[(*n)++] = (int)v;
    }
    return *n > 0;
}

static void git_rev(char *out, size_t n) {
    snprintf(out, n, "%s", KVS_GIT_FALLBACK);
    FILE *p = popen("git describe --always --dirty 2>/dev/null", "r");
    if (!p) return;
    char buf[128];
    if (fgets(buf, sizeof buf, p)) {
        buf[strcspn(buf, "\r\n")] = 0;
        if (*buf) snprintf(out, n, "%s", buf);
    }
    pclose(p);
}

int eval_main(int argc, char **argv) {
    if (argc < 1 || !strcmp(argv[0], "-h") || !strcmp(argv[0], "--help") ||
        !strcmp(argv[0], "help")) {
        if (argc >= 2 && !strcmp(argv[1], "tasks-file")) {
            fputs(EVAL_TASKS_FILE_HELP, stdout);
            return 0;
        }
        if (argc >= 2) return usage_err("no help topic '%s' (tasks-file)", argv[1]);
        fputs(EVAL_USAGE, argc < 1 ? stderr : stdout);
        return argc < 1 ? 2 : 0;
    }
    const char *sub = argv[0];
    bool is_sweep = !strcmp(sub, "sweep"), is_ppl = !strcmp(sub, "ppl");
    bool is_tasks = !strcmp(sub, "tasks"), is_report = !strcmp(sub, "report");
    if (!is_sweep && !is_ppl && !is_tasks && !is_report)
        return usage_err("unknown subcommand '%s' (sweep, ppl, tasks, report)", sub);
    struct eval_config cfg;
    eval_config_default(&cfg);
    /* a first pass for --profile, so that later options override the profile's */
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--profile")) {
            if (!strcmp(argv[i + 1], "large")) eval_config_large(&cfg);
            else if (!strcmp(argv[i + 1], "medium")) eval_config_medium(&cfg);
            else if (strcmp(argv[i + 1], "small"))
                return usage_err("--profile is small, medium or large, not '%s'", argv[i + 1]);
        }
    const char *out_file = NULL, *report_dir = NULL, *peers[16], *grid_opt = NULL;
    int n_peers = 0;
    static char bufs[16][4096];
    int nb = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
#define VAL() (i + 1 < argc ? argv[++i] : NULL)
#define COPY(v) (nb < 16 ? (snprintf(bufs[nb], sizeof bufs[nb], "%s", v), bufs[nb++]) : NULL)
        const char *v = NULL;
        if (a[0] != '-') {
            if (is_report && !report_dir) { report_dir = a; continue; }
            return usage_err("unexpected argument '%s'", a);
        }
        if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) { cfg.progress = false; continue; }
        if (!strcmp(a, "--no-report")) { cfg.report = false; continue; }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(i + 1 < argc && !strcmp(argv[i + 1], "tasks-file") ? EVAL_TASKS_FILE_HELP : EVAL_USAGE,
                  stdout);
            return 0;
        }
        if (!(v = VAL())) return usage_err("%s needs a value", a);
        char *c;
        if (!strcmp(a, "--tasks") || !strcmp(a, "--lengths") || !strcmp(a, "--samples") ||
            !strcmp(a, "--seed"))
            grid_opt = a; /* the generated prompts' options: not with a tasks file */
        if (!strcmp(a, "--profile")) continue;
        else if (!strcmp(a, "--tasks-file")) cfg.tasks_file = v;
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) cfg.model_path = v;
        else if (!strcmp(a, "--out")) { cfg.out_dir = v; out_file = v; }
        else if (!strcmp(a, "--data")) cfg.data_dir = v;
        else if (!strcmp(a, "--device")) {
            if (!strcmp(v, "cpu")) cfg.device = KVS_DEVICE_CPU;
            else if (!strcmp(v, "cuda")) cfg.device = KVS_DEVICE_CUDA;
            else return usage_err("--device is cpu or cuda, not '%s'", v);
        }
        else if (!strcmp(a, "--ppl-doc")) cfg.ppl_doc = v;
        else if (!strcmp(a, "--peer")) {
            if (n_peers == 16) return usage_err("at most 16 %s files", "--peer");
            peers[n_peers++] = v;
        } else if (!strcmp(a, "--methods")) {
            if (!(c = (char *)COPY(v))) return usage_err("too many list options%s", "");
            cfg.n_methods = split_list(c, cfg.methods, EVAL_MAX_LIST, true);
            if (cfg.n_methods <= 0) return usage_err("--methods: 1 to 32 methods, got '%s'", v);
        } else if (!strcmp(a, "--tasks")) {
            if (!strcmp(v, "all")) {
                cfg.n_tasks = 0;
                for (int k = 0; eval_task_names[k]; k++) cfg.tasks[cfg.n_tasks++] = eval_task_names[k];
            } else if (!strcmp(v, "none")) cfg.n_tasks = 0;
            else {
                if (!(c = (char *)COPY(v))) return usage_err("too many list options%s", "");
                cfg.n_tasks = split_list(c, cfg.tasks, EVAL_MAX_LIST, false);
                for (int k = 0; k < cfg.n_tasks; k++)
                    if (!eval_task_family(cfg.tasks[k]))
                        return usage_err("unknown task '%s' (see --help)", cfg.tasks[k]);
            }
        } else if (!strcmp(a, "--modes")) {
            cfg.aware = strstr(v, "aware") == v || strstr(v, ",aware");
            cfg.agnostic = strstr(v, "agnostic") != NULL;
            if (!cfg.aware && !cfg.agnostic) return usage_err("--modes: aware and/or agnostic, not '%s'", v);
        } else if (!strcmp(a, "--ratios")) {
            if (!(c = (char *)COPY(v))) return usage_err("too many list options%s", "");
            cfg.n_ratios = 0;
            for (char *tok = strtok(c, ","); tok; tok = strtok(NULL, ",")) {
                char *end;
                double r = strtod(tok, &end);
                if (*end || !(r > 0 && r <= 1) || cfg.n_ratios == EVAL_MAX_LIST)
                    return usage_err("--ratios: numbers in (0, 1], got '%s'", v);
                cfg.ratios[cfg.n_ratios++] = r;
            }
        } else if (!strcmp(a, "--budgets")) {
            if (!(c = (char *)COPY(v)) || !parse_ints(c, cfg.budgets, &cfg.n_budgets, EVAL_MAX_LIST, 1, 1 << 20))
                return usage_err("--budgets: positive integers, got '%s'", v);
        } else if (!strcmp(a, "--lengths")) {
            if (!(c = (char *)COPY(v)) || !parse_ints(c, cfg.lengths, &cfg.n_lengths, EVAL_MAX_LIST, 256, 1 << 20))
                return usage_err("--lengths: integers >= 256, got '%s'", v);
        } else {
            int x, nx;
            char tmp[64];
            snprintf(tmp, sizeof tmp, "%s", v);
            if (!parse_ints(tmp, &x, &nx, 1, 0, 1 << 24))
                return usage_err("expected a non-negative integer, got '%s'", v);
            if (!strcmp(a, "--samples")) cfg.samples = x;
            else if (!strcmp(a, "--seed")) cfg.seed = (uint64_t)x;
            else if (!strcmp(a, "--ppl-tokens")) cfg.ppl_tokens = x;
            else if (!strcmp(a, "--speed-tokens")) cfg.speed_tokens = x;
            else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) cfg.n_threads = x;
            else return usage_err("unknown option '%s'", a);
        }
#undef VAL
#undef COPY
    }
    if (is_report) {
        if (!report_dir) return usage_err("report needs a results directory%s", "");
        char err[512] = "";
        if (eval_report(report_dir, peers, n_peers, err, sizeof err)) {
            fprintf(stderr, "kvsieve eval report: %s\n", err);
            return 1;
        }
        printf("%s/report.md, %s/results.csv, %s/plots/\n", report_dir, report_dir, report_dir);
        return 0;
    }
    for (int k = 0; k < cfg.n_methods; k++) {
        struct kv_spec ks;
        if (kv_spec_parse(!strcmp(cfg.methods[k], "full") ? "full" : cfg.methods[k], &ks) != KVS_OK &&
            !strstr(kvs_last_error(), "budget")) {
            fprintf(stderr, "kvsieve eval: --methods: %s\n", kvs_last_error());
            return 2;
        }
    }
    if (cfg.tasks_file) {
        if (is_ppl)
            return usage_err("eval ppl runs no tasks; --tasks-file is for sweep (and tasks, to "
                             "check and re-export a file)%s", "");
        if (grid_opt)
            return usage_err("%s is for the generated tasks; --tasks-file replaces --tasks, "
                             "--lengths, --samples and --seed", grid_opt);
    }
    if (is_tasks) {
        if (!out_file) return usage_err("tasks needs --out FILE ('-' for stdout)%s", "");
        return eval_export(&cfg, out_file);
    }
    if (is_ppl) cfg.n_tasks = 0;
    static char out_cuda[1100];
    if (cfg.device == KVS_DEVICE_CUDA && !out_file) { /* (the CPU's results stay apart) */
        snprintf(out_cuda, sizeof out_cuda, "%s-cuda", cfg.out_dir);
        cfg.out_dir = out_cuda;
    }
    char git[128];
    git_rev(git, sizeof git);
    cfg.git = git;
    return eval_sweep(&cfg);
}
