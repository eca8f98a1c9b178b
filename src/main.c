/* main.c — the kvsieve command line: argument parsing, exit codes, human and JSON output,
 * progress display. Everything it does goes through include/kvsieve.h.
 *
 * Exit codes: 0 success; 1 runtime failure (out of memory, i/o during a run); 2 bad input
 * (usage, unreadable/malformed/unsupported model file, prompt longer than the context).
 */
#include "kvsieve.h"
#include "cli/batch_cli.h"
#include "cli/eval_cli.h"
#include "server/server.h"
#include "cli/pagesim_cli.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef KVS_DEFAULT_MODEL
#define KVS_DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#endif

/* ---- options ---------------------------------------------------------------------------- */

struct opts {
    const char *cmd;
    const char *model, *prompt, *file, *kv, *system;
    const char *save_cache, *load_cache; /* run: KV cache files */
    int n_predict, n_ctx, n_threads, n_batch, device;
    bool json, chat, quiet, ignore_eos, no_bos_given, progress_forced;
    bool escape, no_display_prompt, seed_given, no_pack;
    const char *stops[8]; /* -r/--reverse-prompt, --stop: generation ends after any of them */
    int n_stops;
    char *owned[10];      /* strings made by -e (prompt, system, stops) */
    int n_owned;
    struct kvs_sampler_params sp;
    /* ppl */
    int ppl_tokens;
    /* bench */
    int bench_prompt, bench_decode, bench_reps, bench_parallel;
    int bench_ctx[8], n_bench_ctx;
};

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

#ifndef KVS_VERSION
#define KVS_VERSION "0.1.0"
#endif
#ifndef KVS_GIT_COMMIT
#define KVS_GIT_COMMIT "unknown"
#endif

static const char *USAGE_HEAD =
    "usage: kvsieve <command> [options]     (kvsieve <command> --help: that command's options)\n"
    "\n"
    "commands:\n"
    "  run     generate text from a prompt (-p TEXT or -f FILE); --chat wraps it in the\n"
    "          model's chat template as one user turn\n"
    "  chat    interactive chat on stdin/stdout, streaming the answers\n"
    "  ppl     perplexity of a text file: ppl -f FILE [--tokens N] [--chunk C]\n"
    "  bench   prefill and decode speed, KV memory, and the memory-bandwidth bound\n"
    "  info    model header, architecture, tensor types, KV bytes per token\n"
    "  eval    evaluation harness: sweep | ppl | tasks | report (`kvsieve eval --help`)\n"
    "  serve   OpenAI-compatible HTTP server with continuous batching and per-request KV\n"
    "          policies (`kvsieve serve --help`; docs/SERVER.md)\n"
    "  batch   an offline OpenAI Batch API file with BatchLLM prefix sharing and scheduling\n"
    "          (`kvsieve batch --help`)\n"
    "  pagesim paging policies on a page-request trace against Belady's optimum\n"
    "          (`kvsieve pagesim --help`)\n"
    "  help    this text; `kvsieve --help kv` explains the --kv spec; --version\n";

static const char *USAGE_COMMON =
    "common options:\n"
    "  -m, --model FILE      GGUF model (default " KVS_DEFAULT_MODEL ",\n"
    "                        fetched by `make models`)\n"
    "  -t, --threads N       worker threads (default: all cores)\n"
    "  -c, --ctx-size N      context size in tokens (default: the model's training context).\n"
    "                        When --kv bounds the cache (a fixed budget=N, mem=B or streaming\n"
    "                        window=W, uniform or pyramid alloc, compressing while decoding),\n"
    "                        -c is the cache's size, not a limit on the tokens generated:\n"
    "                        generation runs past it, as in StreamingLLM\n"
    "  -b, --batch N         prefill chunk size in tokens (default 512); alias --chunk\n"
    "      --kv SPEC         KV-cache policy (default full); see `kvsieve --help kv`\n"
    "      --device DEV      cpu (default) or cuda: weights, KV cache and the whole forward\n"
    "                        pass on the first GPU (a `make cuda` build, build/cuda/kvsieve;\n"
    "                        the full cache, snapkv, h2o, tova, streaming, knorm and random\n"
    "                        so far; `kvsieve eval` takes it too). -ngl N (N > 0) is the same as cuda:\n"
    "                        every layer is offloaded, partial offload is not supported\n"
    "      --json            print one JSON object on stdout (run, ppl, bench, info)\n"
    "  -q, --quiet           no progress, seed or timing lines on stderr\n"
    "      --no-pack         read the weights from the GGUF file's layout instead of packing\n"
    "                        Q4_0/Q4_1/Q8_0/Q4_K/Q6_K matrices at load (the default: decode\n"
    "                        reads one stream per 8 rows; Qwen2.5-1.5B about 1.3x faster, 1.6 s\n"
    "                        more to load; same results, bit for bit)\n";

static const char *USAGE_GEN =
    "generation (run, chat):\n"
    "  -p, --prompt TEXT     prompt text            -f, --file FILE   read the prompt from FILE\n"
    "                        (given both, -f is used and a warning printed)\n"
    "  -e, --escape          process escapes (\\n \\t \\r \\\\ \\\" \\' \\xHH) in -p, --system, -r\n"
    "  -n, --n-predict N     tokens to generate (default 128; chat: 512 per turn)\n"
    "      --chat            (run) apply the chat template to the prompt\n"
    "      --system TEXT     system message for --chat / chat (default: the model's own)\n"
    "      --no-display-prompt  (run) print only the generated text, not the prompt\n"
    "  -r, --reverse-prompt TEXT, --stop TEXT  stop generating once the text ends with TEXT\n"
    "                        (up to 8; the stop text is printed; --json: \"stop\":\"stop_string\")\n"
    "      --temp T          temperature, 0 = greedy (default 0.8)\n"
    "      --top-k K         keep the K most likely tokens (default 40, 0 = off)\n"
    "      --top-p P         nucleus sampling mass (default 0.95, 1 = off)\n"
    "      --min-p P         drop tokens below P x the top probability (default 0.05)\n"
    "      --repeat-penalty R  penalise the last --repeat-last-n tokens (default 1.0 = off)\n"
    "      --repeat-last-n N   window of all three penalties (default 64)\n"
    "      --presence-penalty P   subtract P from the logit of every token in that window\n"
    "      --frequency-penalty F  subtract F x its count there (both -2..2, default 0 = off)\n"
    "      --seed S          RNG seed, 0..4294967295; -1 or absent: a random seed, printed on\n"
    "                        stderr and in --json so that a run can be repeated\n"
    "      --ignore-eos      keep generating past end-of-generation tokens\n"
    "      --save-cache FILE (run) after the prompt is evaluated, save the sequence's KV cache\n"
    "                        (compressed as --kv left it) to FILE; -n 0 prefills and saves only\n"
    "      --load-cache FILE (run) start from a cache saved by --save-cache with the same model;\n"
    "                        the prompt then continues the cached text: it is tokenized without\n"
    "                        BOS and must not be empty (e.g. a question about a saved document)\n"
    "chat: Ctrl-C stops the current answer and returns to the prompt; Ctrl-C at the prompt,\n"
    "      Ctrl-D or an empty line quits\n";

static const char *USAGE_PPL =
    "ppl:   --tokens N       score the first N tokens of the file (default: all, up to -c)\n"
    "       --chunk C        evaluate in chunks of C tokens (default 512); every token is\n"
    "                        predicted from its whole prefix (one sequence, no windows)\n";

static const char *USAGE_BENCH =
    "bench: --prompt N       prefill benchmark prompt length (default 512)\n"
    "       --contexts A,B,C decode speed measured at these context lengths\n"
    "                        (default 128,2048,8000, capped at the context size)\n"
    "       --decode N       decode steps timed at each context (default 32)\n"
    "       --parallel N     also decode N copies of each filled context together, one batched\n"
    "                        step for all (kvs_eval_batch; alias -np): tok/s summed over the N\n"
    "                        sequences beside the bound N x bandwidth / (weights + N x KV bytes);\n"
    "                        --json: decode_parallel[]\n"
    "       --reps N         repetitions of each timing (default 3): the median is reported,\n"
    "                        with the slowest and fastest beside it (*_min, *_max in --json);\n"
    "                        every decode repetition starts from a copy of the same filled cache\n"
    "       --json fields: kv_bytes_per_token: fp16 K+V of one token, all layers (the model's\n"
    "       full cache, whatever --kv says); kv_bytes_per_token_theory: one entry of this --kv\n"
    "       storage once packed (payload, scales, positions, weights; fp16 for full); per\n"
    "       context in decode[]: tok_s beside bound_tok_s (read bandwidth / (weight bytes + KV\n"
    "       bytes held)); kv_payload_bytes the sequence holds, over the tokens seen\n"
    "       (kv_bytes_per_token_seen: falls with eviction) and over the entries held per\n"
    "       layer and KV head (kv_bytes_per_cached_token: compare with the theory);\n"
    "       plan_s_per_step (decode[], decode_parallel[]): seconds a timed step spent planning\n"
    "       and applying the policy's plans (kvs_context_plan_stats; 0 for full);\n"
    "       gpu_split_s_per_step (--device cuda with KVS_CUDA_PROFILE=1 in the environment):\n"
    "       device seconds a timed step spent in each group of kernels (matmuls, attention,\n"
    "       norms...), timed by events between the groups with CUDA graphs off;\n"
    "       logits_hash: FNV-1a of the logits of every timed decode step (greedy), so runs\n"
    "       whose outputs differ have different hashes\n";

static const char *USAGE_EXIT =
    "exit codes: 0 success; 1 runtime failure (out of memory, i/o during a run); 2 bad input\n"
    "(usage, unreadable/malformed/unsupported model, prompt longer than the context)\n";

static void print_usage(FILE *f, const char *cmd) {
    if (cmd && (!strcmp(cmd, "run") || !strcmp(cmd, "chat"))) {
        fprintf(f, "usage: kvsieve %s [options]\n\n%s\n%s\n%s", cmd, USAGE_COMMON, USAGE_GEN, USAGE_EXIT);
    } else if (cmd && !strcmp(cmd, "ppl")) {
        fprintf(f, "usage: kvsieve ppl -f FILE [options]\n\n%s\n%s\n%s", USAGE_COMMON, USAGE_PPL, USAGE_EXIT);
    } else if (cmd && !strcmp(cmd, "bench")) {
        fprintf(f, "usage: kvsieve bench [options]\n\n%s\n%s\n%s", USAGE_COMMON, USAGE_BENCH, USAGE_EXIT);
    } else if (cmd && !strcmp(cmd, "info")) {
        fprintf(f, "usage: kvsieve info [-m FILE] [--json]\n\n%s\n%s", USAGE_COMMON, USAGE_EXIT);
    } else {
        fprintf(f, "%s\n%s\n%s\n%s%s\n%s", USAGE_HEAD, USAGE_COMMON, USAGE_GEN, USAGE_PPL,
                USAGE_BENCH, USAGE_EXIT);
    }
}

static void die_usage(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "kvsieve: ");
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n(see `kvsieve --help`)\n");
    exit(2);
}

static int parse_int(const char *flag, const char *v, int lo, int hi) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi)
        die_usage("%s expects an integer in [%d, %d], got '%s'", flag, lo, hi, v);
    return (int)x;
}

static float parse_float(const char *flag, const char *v, float lo, float hi) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || *end || end == v || !(x >= lo && x <= hi))
        die_usage("%s expects a number in [%g, %g], got '%s'", flag, lo, hi, v);
    return (float)x;
}

/* --seed: 0..2^32-1 as llama.cpp, or -1 for a random seed */
static uint64_t parse_seed(const char *v, bool *random) {
    *random = !strcmp(v, "-1");
    if (*random) return 0;
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    if (errno || *end || end == v || v[0] == '-' || v[0] == '+' || x > 4294967295ull)
        die_usage("--seed expects an integer in [0, 4294967295], or -1 for a random seed, got '%s'", v);
    return x;
}

/* a seed nobody chose: from the kernel's entropy, else the clock and the process id */
static uint64_t random_seed(void) {
    uint32_t x = 0;
    int fd = open("/dev/urandom", O_RDONLY);
    bool ok = fd >= 0 && read(fd, &x, sizeof x) == (ssize_t)sizeof x;
    if (fd >= 0) close(fd);
    if (!ok) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        x = (uint32_t)(ts.tv_nsec ^ ts.tv_sec ^ ((uint64_t)getpid() << 16));
    }
    return x;
}

/* -e: C-style escapes, in place (the result is never longer) */
static char *unescape(const char *in) {
    char *out = strdup(in), *w = out;
    if (!out) exit(1);
    for (const char *r = in; *r; r++) {
        if (*r != '\\' || !r[1]) {
            *w++ = *r;
            continue;
        }
        char c = *++r;
        switch (c) {
        case 'n': *w++ = '\n'; break;
        case 't': *w++ = '\t'; break;
        case 'r': *w++ = '\r'; break;
        case '\\': case '"': case '\'': *w++ = c; break;
        case 'x': {
            int v = 0, k = 0;
            while (k < 2 && ((r[1] >= '0' && r[1] <= '9') || ((r[1] | 32) >= 'a' && (r[1] | 32) <= 'f'))) {
                char h = *++r;
                v = v * 16 + (h <= '9' ? h - '0' : (h | 32) - 'a' + 10);
                k++;
            }
            if (k) *w++ = (char)v;
            else *w++ = '\\', *w++ = 'x';
            break;
        }
        default: *w++ = '\\', *w++ = c; break; /* unknown escapes stay as written */
        }
    }
    *w = 0;
    return out;
}

static void parse_args(int argc, char **argv, struct opts *o) {
    memset(o, 0, sizeof *o);
    o->model = getenv("KVSIEVE_MODEL") ? getenv("KVSIEVE_MODEL") : KVS_DEFAULT_MODEL;
    o->n_predict = -1;
    o->sp = kvs_sampler_params_default();
    o->bench_prompt = 512;
    o->bench_decode = 32;
    o->bench_reps = 3;
    o->kv = "full";
    if (argc < 2) {
        print_usage(stderr, NULL);
        exit(2);
    }
    int i = 1;
    o->cmd = argv[i++];
    if (!strcmp(o->cmd, "--version") || !strcmp(o->cmd, "-V")) {
        printf("kvsieve %s (git %s, API %d)\n", KVS_VERSION, KVS_GIT_COMMIT, KVS_API_VERSION);
        exit(0);
    }
    if (!strcmp(o->cmd, "--help") || !strcmp(o->cmd, "-h") || !strcmp(o->cmd, "help")) {
        if (i < argc && !strcmp(argv[i], "kv")) fputs(kvs_kv_spec_help(), stdout);
        else print_usage(stdout, i < argc ? argv[i] : NULL);
        exit(0);
    }
    static const char *cmds[] = {"run", "chat", "ppl", "bench", "info"};
    bool known = false;
    for (size_t k = 0; k < sizeof cmds / sizeof cmds[0]; k++) known |= !strcmp(o->cmd, cmds[k]);
    if (!known) die_usage("unknown command '%s' (commands: run, chat, ppl, bench, info, eval, serve, batch, pagesim, help)", o->cmd);
    for (; i < argc; i++) {
        const char *a = argv[i];
#define NEXT() (i + 1 < argc ? argv[++i] : (die_usage("%s needs a value", a), ""))
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) o->model = NEXT();
        else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) o->prompt = NEXT();
        else if (!strcmp(a, "-f") || !strcmp(a, "--file")) o->file = NEXT();
        else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) o->n_predict = parse_int(a, NEXT(), 0, 1 << 24);
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) o->n_ctx = parse_int(a, NEXT(), 1, 1 << 24);
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) o->n_threads = parse_int(a, NEXT(), 1, 256);
        else if (!strcmp(a, "--device") || !strcmp(a, "-ngl") || !strcmp(a, "--n-gpu-layers")) {
            const char *v = NEXT();
            if (!strcmp(a, "--device") && !strcmp(v, "cpu")) o->device = KVS_DEVICE_CPU;
            else if (!strcmp(a, "--device") ? !strcmp(v, "cuda") : parse_int(a, v, 0, 1 << 20) > 0)
                o->device = KVS_DEVICE_CUDA;
            else if (strcmp(a, "--device")) o->device = KVS_DEVICE_CPU; /* -ngl 0 */
            else die_usage("--device is cpu or cuda (got '%s')", v);
        }
        else if (!strcmp(a, "-b") || !strcmp(a, "--batch") || !strcmp(a, "--chunk")) o->n_batch = parse_int(a, NEXT(), 1, 4096);
        else if (!strcmp(a, "--kv")) {
            o->kv = NEXT();
            if (!*o->kv) die_usage("--kv needs a spec (e.g. full, h2o:ratio=0.2; see `kvsieve --help kv`)");
            /* checked before the model loads: a typo costs no load time */
            if (kvs_kv_spec_check(o->kv, NULL, 0) != KVS_OK) die_usage("%s", kvs_last_error());
        } else if (!strcmp(a, "-r") || !strcmp(a, "--reverse-prompt") || !strcmp(a, "--stop")) {
            const char *v = NEXT();
            if (!*v) die_usage("%s needs a non-empty text", a);
            if (o->n_stops == 8) die_usage("at most 8 stop texts (-r/--reverse-prompt/--stop)");
            o->stops[o->n_stops++] = v;
        }
        else if (!strcmp(a, "-e") || !strcmp(a, "--escape")) o->escape = true;
        else if (!strcmp(a, "--no-display-prompt")) o->no_display_prompt = true;
        else if (!strcmp(a, "--no-pack")) o->no_pack = true;
        else if (!strcmp(a, "--presence-penalty")) o->sp.presence_penalty = parse_float(a, NEXT(), -2, 2);
        else if (!strcmp(a, "--frequency-penalty")) o->sp.frequency_penalty = parse_float(a, NEXT(), -2, 2);
        else if (!strcmp(a, "--system")) o->system = NEXT();
        else if (!strcmp(a, "--save-cache")) o->save_cache = NEXT();
        else if (!strcmp(a, "--load-cache")) o->load_cache = NEXT();
        else if (!strcmp(a, "--json")) o->json = true;
        else if (!strcmp(a, "--chat")) o->chat = true;
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) o->quiet = true;
        else if (!strcmp(a, "--ignore-eos")) o->ignore_eos = true;
        else if (!strcmp(a, "--temp")) o->sp.temp = parse_float(a, NEXT(), 0, 100);
        else if (!strcmp(a, "--top-k")) o->sp.top_k = parse_int(a, NEXT(), 0, 1 << 24);
        else if (!strcmp(a, "--top-p")) o->sp.top_p = parse_float(a, NEXT(), 1e-6f, 1);
        else if (!strcmp(a, "--min-p")) o->sp.min_p = parse_float(a, NEXT(), 0, 1);
        else if (!strcmp(a, "--repeat-penalty")) o->sp.repeat_penalty = parse_float(a, NEXT(), 1e-3f, 100);
        else if (!strcmp(a, "--repeat-last-n")) o->sp.repeat_last_n = parse_int(a, NEXT(), 0, 1 << 16);
        else if (!strcmp(a, "--seed")) {
            bool rnd;
            o->sp.seed = parse_seed(NEXT(), &rnd);
            o->seed_given = !rnd;
        }
        else if (!strcmp(a, "--tokens")) o->ppl_tokens = parse_int(a, NEXT(), 2, 1 << 24);
        else if (!strcmp(a, "--prompt-tokens")) o->bench_prompt = parse_int(a, NEXT(), 1, 1 << 20);
        else if (!strcmp(a, "--decode")) o->bench_decode = parse_int(a, NEXT(), 1, 1 << 16);
        else if (!strcmp(a, "--reps")) o->bench_reps = parse_int(a, NEXT(), 1, 100);
        else if (!strcmp(a, "--parallel") || !strcmp(a, "-np")) o->bench_parallel = parse_int(a, NEXT(), 1, 256);
        else if (!strcmp(a, "--contexts")) {
            char *list = NEXT(), *save = NULL, *tmp = strdup(list);
            o->n_bench_ctx = 0;
            for (char *tok = strtok_r(tmp, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
                if (o->n_bench_ctx == 8) die_usage("--contexts takes at most 8 values");
                o->bench_ctx[o->n_bench_ctx++] = parse_int("--contexts", tok, 1, 1 << 24);
            }
            free(tmp);
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            print_usage(stdout, o->cmd);
            exit(0);
        } else die_usage("unknown option '%s'", a);
#undef NEXT
    }
    if ((o->save_cache || o->load_cache) && strcmp(o->cmd, "run") != 0)
        die_usage("--save-cache and --load-cache work with the run command only");
    if (!o->seed_given) o->sp.seed = random_seed();
    if (o->escape) { /* the copies are freed by free_opts */
        if (o->prompt) o->prompt = o->owned[o->n_owned++] = unescape(o->prompt);
        if (o->system) o->system = o->owned[o->n_owned++] = unescape(o->system);
        for (int k = 0; k < o->n_stops; k++) o->stops[k] = o->owned[o->n_owned++] = unescape(o->stops[k]);
    }
    if (o->prompt && o->file && !strcmp(o->cmd, "run"))
        fprintf(stderr, "kvsieve: warning: both -p and -f given; the prompt is read from %s and "
                "-p is ignored\n", o->file);
}

static void free_opts(struct opts *o) {
    for (int k = 0; k < o->n_owned; k++) free(o->owned[k]);
    o->n_owned = 0;
}

/* the seed of a sampled run, on stderr so that it can be repeated with --seed */
static void report_seed(const struct opts *o) {
    if (!o->quiet && o->sp.temp > 0)
        fprintf(stderr, "kvsieve: seed %llu%s\n", (unsigned long long)o->sp.seed,
                o->seed_given ? "" : " (random; --seed repeats this run)");
}

/* bench --prompt N shares run's -p/--prompt: for bench it is the prompt length in tokens */
static void fix_bench_prompt(struct opts *o) {
    if (strcmp(o->cmd, "bench") != 0 || !o->prompt) return;
    o->bench_prompt = parse_int("--prompt", o->prompt, 1, 1 << 20);
    o->prompt = NULL;
}

/* ---- helpers ---------------------------------------------------------------------------- */

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "kvsieve: %s: cannot open: %s\n", path, strerror(errno));
        exit(2);
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    for (;;) {
        if (!buf) {
            fprintf(stderr, "kvsieve: out of memory reading %s\n", path);
            exit(1);
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) break;
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap + 1);
        }
    }
    fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

static void json_str(FILE *f, const char *s, size_t n) {
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
        else if (ch == '\n') fputs("\\n", f);
        else if (ch == '\t') fputs("\\t", f);
        else if (ch == '\r') fputs("\\r", f);
        else if (ch < 0x20) fprintf(f, "\\u%04x", ch);
        else fputc(ch, f);
    }
    fputc('"', f);
}

static void jstr(const char *s) { json_str(stdout, s, strlen(s)); }

static long peak_rss_bytes(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss * 1024L;
}

static kvs_model *load_model(const struct opts *o) {
    kvs_model *m = NULL;
    struct kvs_model_params mp = kvs_model_params_default();
    mp.pack = !o->no_pack && strcmp(o->cmd, "info") != 0; /* info computes nothing */
    enum kvs_status st = kvs_model_load(o->model, &mp, &m);
    if (st != KVS_OK) {
        fprintf(stderr, "kvsieve: %s\n", kvs_last_error());
        /* the models the set-up knows, and the target that fetches each */
        static const struct { const char *file, *target; } known[] = {
            {"SmolLM2-135M-Instruct.Q4_1.gguf", "make models"},
            {"qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "make models-large"},
        };
        const char *base = strrchr(o->model, '/') ? strrchr(o->model, '/') + 1 : o->model;
        for (size_t k = 0; st == KVS_ERR_IO && k < sizeof known / sizeof known[0]; k++)
            if (!strcmp(base, known[k].file))
                fprintf(stderr, "kvsieve: %s is fetched by `%s` (into models/)\n", known[k].file,
                        known[k].target);
        exit(st == KVS_ERR_NOMEM || st == KVS_ERR_INTERNAL ? 1 : 2);
    }
    return m;
}

static kvs_context *new_context(kvs_model *m, const struct opts *o, int n_seq) {
    struct kvs_context_params cp = kvs_context_params_default();
    cp.n_ctx = o->n_ctx;
    cp.n_threads = o->n_threads;
    if (o->n_batch) cp.n_batch = o->n_batch;
    cp.kv_spec = o->kv;
    cp.n_seq_max = n_seq;
    cp.device = o->device;
    kvs_context *c = NULL;
    enum kvs_status st = kvs_context_new(m, &cp, &c);
    if (st != KVS_OK) {
        fprintf(stderr, "kvsieve: %s\n", kvs_last_error());
        exit(st == KVS_ERR_INVALID_ARG ? 2 : 1);
    }
    return c;
}

static void fail_status(enum kvs_status st) {
    fprintf(stderr, "kvsieve: %s\n", kvs_last_error());
    exit(st == KVS_ERR_CONTEXT_FULL || st == KVS_ERR_INVALID_ARG ? 2 : 1);
}

static int32_t *tokenize_all(const kvs_model *m, const char *text, size_t len, bool bos,
                             bool special, int *n_out) {
    int cap = (int)(len + 16 < (1u << 30) ? len + 16 : (1u << 30));
    int32_t *toks = malloc((size_t)cap * sizeof *toks);
    int n = toks ? kvs_tokenize(m, text, len, bos, special, toks, cap) : -1;
    if (n < 0) {
        fprintf(stderr, "kvsieve: tokenization failed\n");
        exit(1);
    }
    *n_out = n;
    return toks;
}

struct progress { const char *what; double t0; bool on; };

static bool progress_cb(int done, int total, void *user) {
    struct progress *p = user;
    if (!p->on) return true;
    double el = (now_ms() - p->t0) / 1e3;
    double rate = el > 0 ? done / el : 0;
    double eta = rate > 0 ? (total - done) / rate : 0;
    fprintf(stderr, "\r%s: %d/%d tokens  %.1f tok/s  ETA %.0fs   ", p->what, done, total, rate, eta);
    if (done == total) fputc('\n', stderr);
    return true;
}

static bool want_progress(const struct opts *o) { return !o->quiet && isatty(2); }

/* ---- run / chat --------------------------------------------------------------------------- */

struct gen_result {
    int n_gen;
    double gen_ms;
    char *text;
    size_t text_len, text_cap;
    bool stopped_eog, stopped_string, interrupted;
};

/* chat: Ctrl-C stops the answer being generated (the loop polls g_interrupted); at the prompt
 * it quits at once from the handler (write and _exit are async-signal-safe), so that a Ctrl-C
 * arriving just before the read cannot be lost while the read then waits */
static volatile sig_atomic_t g_interrupted, g_at_prompt, g_tty_out;
static void on_sigint(int sig) {
    (void)sig;
    if (g_at_prompt) {
        if (g_tty_out) {
            ssize_t w = write(1, "\n", 1);
            (void)w;
        }
        _exit(0);
    }
    g_interrupted = 1;
}

static void text_append(struct gen_result *r, const char *s, size_t n) {
    if (r->text_len + n + 1 > r->text_cap) {
        r->text_cap = (r->text_len + n + 1) * 2;
        r->text = realloc(r->text, r->text_cap);
        if (!r->text) exit(1);
    }
    memcpy(r->text + r->text_len, s, n);
    r->text_len += n;
    r->text[r->text_len] = 0;
}

/* does a stop text occur in the generated text at or after byte `from` - its length + 1 (the
 * newest token may carry it with more text after it)? */
static bool found_stop(const struct opts *o, const struct gen_result *r, size_t from) {
    for (int k = 0; k < o->n_stops; k++) {
        size_t n = strlen(o->stops[k]), at = from + 1 > n ? from + 1 - n : 0;
        if (r->text && at < r->text_len && strstr(r->text + at, o->stops[k])) return true;
    }
    return false;
}

/* Generate up to n tokens after the logits already computed; streams to stdout if `stream`.
 * Stops early at end-of-generation (unless ignore_eos), when a stop text appears in the text,
 * when the sequence reaches max_past tokens, or on Ctrl-C (chat installs the handler). */
static void generate(const struct opts *o, kvs_model *m, kvs_context *c, kvs_sequence *s,
                     kvs_sampler *smp, float *logits, int n, int max_past, bool ignore_eos,
                     bool stream, struct gen_result *r) {
    struct kvs_detok dt = {0};
    char buf[512];
    double t0 = now_ms();
    for (int i = 0; i < n; i++) {
        if (g_interrupted) {
            r->interrupted = true;
            break;
        }
        int32_t tok = kvs_sampler_sample(smp, logits);
        if (kvs_token_is_eog(m, tok) && !ignore_eos) {
            r->stopped_eog = true;
            break;
        }
        size_t k = kvs_detok_push(m, &dt, tok, buf, sizeof buf), from = r->text_len;
        if (k > sizeof buf) k = sizeof buf;
        text_append(r, buf, k);
        if (stream) {
            fwrite(buf, 1, k, stdout);
            fflush(stdout);
        }
        r->n_gen++;
        if (o->n_stops && found_stop(o, r, from)) {
            r->stopped_string = true;
            break;
        }
        if (i + 1 == n || kvs_seq_n_past(s) >= max_past) break;
        enum kvs_status st = kvs_eval(c, s, &tok, 1, false, logits, NULL, NULL);
        if (st != KVS_OK) fail_status(st);
    }
    size_t k = kvs_detok_flush(&dt, buf, sizeof buf);
    text_append(r, buf, k);
    if (stream) {
        fwrite(buf, 1, k, stdout);
        fflush(stdout);
    }
    r->gen_ms = now_ms() - t0;
}

static int cmd_run(const struct opts *o) {
    if (!o->prompt && !o->file) die_usage("run needs a prompt: -p TEXT or -f FILE");
    size_t plen;
    char *prompt = o->file ? read_file(o->file, &plen) : strdup(o->prompt);
    if (!o->file) plen = strlen(prompt);
    kvs_model *m = load_model(o);
    kvs_context *c = new_context(m, o, 1);
    struct kvs_model_info mi;
    kvs_model_get_info(m, &mi);

    char *text = prompt;
    size_t tlen = plen;
    if (o->chat) {
        struct kvs_chat_msg msgs[2];
        int nm = 0;
        if (o->system) msgs[nm++] = (struct kvs_chat_msg){"system", o->system};
        msgs[nm++] = (struct kvs_chat_msg){"user", prompt};
        size_t need = kvs_chat_apply(m, msgs, nm, true, NULL, 0);
        text = malloc(need + 1);
        kvs_chat_apply(m, msgs, nm, true, text, need + 1);
        tlen = need;
    }
    /* a loaded cache already holds the start of the text: the prompt continues it (no BOS) */
    kvs_sequence *s;
    enum kvs_status st = kvs_seq_new(c, &s);
    if (st != KVS_OK) fail_status(st);
    int n_cached = 0;
    if (o->load_cache) {
        if ((st = kvs_seq_load(c, s, o->load_cache)) != KVS_OK) {
            fprintf(stderr, "kvsieve: %s\n", kvs_last_error());
            exit(st == KVS_ERR_NOMEM || st == KVS_ERR_INTERNAL ? 1 : 2);
        }
        n_cached = kvs_seq_n_past(s);
    }
    int n_tok;
    int32_t *toks = tokenize_all(m, text, tlen, !o->chat && !o->load_cache, o->chat, &n_tok);
    if (n_tok == 0)
        die_usage(o->load_cache ? "the prompt is empty (with --load-cache it must continue the "
                                  "cached text with at least one token)" : "the prompt is empty");
    int n_ctx = o->n_ctx ? o->n_ctx : mi.n_ctx_train;
    int max_past = kvs_context_max_tokens(c); /* n_ctx, or unbounded when --kv bounds the cache */
    if (n_cached + n_tok >= max_past) {
        if (n_cached)
            fprintf(stderr, "kvsieve: the prompt has %d tokens after %d cached ones, but the "
                    "context holds %d (raise -c up to the model's %d, or shorten the prompt)\n",
                    n_tok, n_cached, n_ctx, mi.n_ctx_train);
        else
            fprintf(stderr, "kvsieve: the prompt has %d tokens, but the context holds %d (raise "
                    "-c up to the model's %d, or shorten the prompt)\n", n_tok, n_ctx,
                    mi.n_ctx_train);
        exit(2);
    }
    int n_predict = o->n_predict >= 0 ? o->n_predict : 128;
    if (n_predict > max_past - n_cached - n_tok) n_predict = max_past - n_cached - n_tok;
    report_seed(o);

    kvs_sampler *smp;
    if ((st = kvs_sampler_new(&o->sp, mi.n_vocab, &smp)) != KVS_OK) fail_status(st);
    for (int i = 0; i < n_tok; i++) kvs_sampler_accept(smp, toks[i]);
    float *logits = malloc(sizeof(float) * mi.n_vocab);

    struct progress pr = {"prefill", now_ms(), want_progress(o) && n_tok > 512};
    double t0 = now_ms();
    st = kvs_eval(c, s, toks, n_tok, false, logits, progress_cb, &pr);
    if (st != KVS_OK) fail_status(st);
    double prefill_ms = now_ms() - t0;
    if (o->save_cache) {
        if ((st = kvs_seq_save(c, s, o->save_cache)) != KVS_OK) fail_status(st);
        if (!o->quiet)
            fprintf(stderr, "kvsieve: saved the KV cache of %d tokens to %s\n",
                    kvs_seq_n_past(s), o->save_cache);
    }

    struct gen_result r = {0};
    if (!o->json && !o->chat && !o->no_display_prompt) {
        fwrite(prompt, 1, plen, stdout);
        fflush(stdout);
    }
    generate(o, m, c, s, smp, logits, n_predict, max_past, o->ignore_eos, !o->json, &r);
    if (r.n_gen == 0 && r.stopped_eog && !o->quiet)
        fprintf(stderr, "%skvsieve: the model emitted end-of-sequence at once, so nothing was "
                "generated%s\n", o->json ? "" : "\n", o->chat ? "" : " (an instruct model "
                "answers with --chat and a question, or continues a prompt that ends mid-text)");
    struct kvs_mem_stats ms;
    kvs_context_mem(c, &ms);
    if (o->json) {
        printf("{\"model\":");
        jstr(o->model);
        printf(",\"kv\":");
        jstr(o->kv);
        printf(",\"prompt_tokens\":%d,\"generated_tokens\":%d,\"text\":", n_tok, r.n_gen);
        json_str(stdout, r.text ? r.text : "", r.text_len);
        printf(",\"stop\":\"%s\",\"seed\":%llu,\"prefill_ms\":%.2f,\"prefill_tok_s\":%.2f,"
               "\"decode_ms\":%.2f,\"decode_tok_s\":%.2f,\"kv_bytes\":%llu,\"kv_bytes_peak\":%llu,"
               "\"threads\":%d}\n",
               r.stopped_eog ? "eog" : r.stopped_string ? "stop_string" : "length",
               (unsigned long long)o->sp.seed, prefill_ms, n_tok / (prefill_ms / 1e3), r.gen_ms,
               r.n_gen > 1 ? (r.n_gen - 1) / (r.gen_ms / 1e3) : 0.0,
               (unsigned long long)ms.kv_bytes, (unsigned long long)ms.kv_bytes_peak,
               kvs_context_n_threads(c));
    } else {
        printf("\n");
        if (!o->quiet)
            fprintf(stderr, "\nkvsieve: prompt %d tokens in %.0f ms (%.1f tok/s); generated %d "
                    "tokens (%.1f tok/s); KV %.2f MiB (peak %.2f MiB)\n", n_tok, prefill_ms,
                    n_tok / (prefill_ms / 1e3), r.n_gen,
                    r.n_gen > 1 ? (r.n_gen - 1) / (r.gen_ms / 1e3) : 0.0,
                    ms.kv_bytes / 1048576.0, ms.kv_bytes_peak / 1048576.0);
    }
    free(r.text);
    free(logits);
    free(toks);
    if (text != prompt) free(text);
    free(prompt);
    kvs_sampler_free(smp);
    kvs_context_free(c);
    kvs_model_free(m);
    return 0;
}

static int cmd_chat(const struct opts *o) {
    kvs_model *m = load_model(o);
    kvs_context *c = new_context(m, o, 1);
    struct kvs_model_info mi;
    kvs_model_get_info(m, &mi);
    int max_past = kvs_context_max_tokens(c);
    kvs_sequence *s;
    kvs_sampler *smp;
    enum kvs_status st = kvs_seq_new(c, &s);
    if (st != KVS_OK || (st = kvs_sampler_new(&o->sp, mi.n_vocab, &smp)) != KVS_OK) fail_status(st);
    float *logits = malloc(sizeof(float) * mi.n_vocab);
    bool tty = isatty(0);
    char *line = NULL;
    size_t cap = 0;
    bool first = true, ended_eog = false;
    /* Ctrl-C: no SA_RESTART, so that a read at the prompt returns and the program can quit */
    struct sigaction sa = {0};
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    g_tty_out = tty;
    sigaction(SIGINT, &sa, NULL);
    if (tty && !o->quiet)
        fprintf(stderr, "kvsieve chat — %s. Ctrl-C stops an answer; Ctrl-C at the prompt, an "
                "empty line or Ctrl-D quits.\n", mi.name);
    report_seed(o);
    for (;;) {
        g_at_prompt = 1;
        if (g_interrupted) { /* Ctrl-C after the answer ended, before the prompt */
            if (tty) fputc('\n', stdout);
            break;
        }
        if (tty) {
            fputs("> ", stdout);
            fflush(stdout);
        }
        ssize_t n = getline(&line, &cap, stdin);
        g_at_prompt = 0;
        if (n <= 0) {
            if (tty) fputc('\n', stdout); /* Ctrl-D at the prompt: end the line */
            break;
        }
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
        if (n == 0 && tty) break;
        /* the turn's text: close the previous assistant turn, then this user turn */
        struct kvs_chat_msg msgs[2];
        int nm = 0;
        if (first && o->system) msgs[nm++] = (struct kvs_chat_msg){"system", o->system};
        msgs[nm++] = (struct kvs_chat_msg){"user", line};
        size_t need = kvs_chat_apply(m, msgs, nm, true, NULL, 0);
        char *turn = malloc(need + 32);
        size_t off = 0;
        if (!first) off = (size_t)sprintf(turn, "%s", ended_eog ? "<|im_end|>\n" : "<|im_end|>\n");
        kvs_chat_apply(m, msgs, nm, true, turn + off, need + 1);
        if (!first) {
            /* a later turn must not repeat the default system message: drop everything up to
             * the user turn the template wrote */
            char *u = strstr(turn + off, "<|im_start|>user");
            if (u && u != turn + off) memmove(turn + off, u, strlen(u) + 1);
        }
        int nt;
        int32_t *toks = tokenize_all(m, turn, strlen(turn), false, true, &nt);
        free(turn);
        if (kvs_seq_n_past(s) + nt + 1 >= max_past) {
            fprintf(stderr, "kvsieve: the conversation has filled the context (%d tokens)\n", max_past);
            free(toks);
            break;
        }
        for (int i = 0; i < nt; i++) kvs_sampler_accept(smp, toks[i]);
        if ((st = kvs_eval(c, s, toks, nt, false, logits, NULL, NULL)) != KVS_OK) fail_status(st);
        free(toks);
        struct gen_result r = {0};
        int budget = o->n_predict >= 0 ? o->n_predict : 512;
        if (budget > max_past - kvs_seq_n_past(s) - 2) budget = max_past - kvs_seq_n_past(s) - 2;
        generate(o, m, c, s, smp, logits, budget, max_past, o->ignore_eos, true, &r);
        fputc('\n', stdout);
        fflush(stdout);
        if (r.interrupted && !o->quiet)
            fprintf(stderr, "kvsieve: answer stopped (Ctrl-C); Ctrl-C again at the prompt quits\n");
        if (r.interrupted) g_interrupted = 0; /* that Ctrl-C was the answer's */
        clearerr(stdin);
        ended_eog = r.stopped_eog;
        free(r.text);
        first = false;
    }
    free(line);
    free(logits);
    kvs_sampler_free(smp);
    kvs_context_free(c);
    kvs_model_free(m);
    return 0;
}

/* ---- ppl ---------------------------------------------------------------------------------- */

static int cmd_ppl(const struct opts *o) {
    if (!o->file) die_usage("ppl needs a text file: -f FILE");
    size_t len;
    char *text = read_file(o->file, &len);
    kvs_model *m = load_model(o);
    struct kvs_model_info mi;
    kvs_model_get_info(m, &mi);
    int n_tok;
    int32_t *toks = tokenize_all(m, text, len, true, false, &n_tok);
    int n_ctx = o->n_ctx ? o->n_ctx : mi.n_ctx_train;
    int n = o->ppl_tokens ? o->ppl_tokens : n_tok;
    if (n > n_tok) {
        fprintf(stderr, "kvsieve: %s has only %d tokens (asked for %d)\n", o->file, n_tok, n);
        exit(2);
    }
    if (n > n_ctx) {
        fprintf(stderr, "kvsieve: %d tokens do not fit the context of %d (use --tokens or -c)\n",
                n, n_ctx);
        exit(2);
    }
    if (n < 2) die_usage("ppl needs at least 2 tokens");
    struct opts oc = *o;
    oc.n_ctx = n;
    kvs_context *c = new_context(m, &oc, 1);
    kvs_sequence *s;
    enum kvs_status st = kvs_seq_new(c, &s);
    if (st != KVS_OK) fail_status(st);
    int chunk = o->n_batch ? o->n_batch : 512;
    float *logits = malloc(sizeof(float) * (size_t)chunk * mi.n_vocab);
    if (!logits) {
        fprintf(stderr, "kvsieve: out of memory\n");
        return 1;
    }
    double nll = 0, t0 = now_ms();
    int scored = 0;
    struct progress pr = {"ppl", t0, want_progress(o)};
    for (int done = 0; done < n; done += chunk) {
        int T = n - done < chunk ? n - done : chunk;
        if ((st = kvs_eval(c, s, toks + done, T, true, logits, NULL, NULL)) != KVS_OK) fail_status(st);
        for (int t = 0; t < T && done + t + 1 < n; t++) {
            const float *l = logits + (size_t)t * mi.n_vocab;
            float mx = l[0];
            for (int v = 1; v < mi.n_vocab; v++) mx = l[v] > mx ? l[v] : mx;
            double sum = 0;
            for (int v = 0; v < mi.n_vocab; v++) sum += exp((double)l[v] - mx);
            nll += log(sum) + mx - l[toks[done + t + 1]];
            scored++;
        }
        progress_cb(done + T, n, &pr);
    }
    double ms = now_ms() - t0;
    double ppl = exp(nll / scored);
    struct kvs_mem_stats mem;
    kvs_context_mem(c, &mem);
    if (o->json) {
        printf("{\"model\":");
        jstr(o->model);
        printf(",\"file\":");
        jstr(o->file);
        printf(",\"kv\":");
        jstr(o->kv);
        printf(",\"tokens\":%d,\"scored\":%d,\"chunk\":%d,\"nll\":%.6f,\"ppl\":%.4f,\"ms\":%.1f,"
               "\"tok_s\":%.2f,\"kv_bytes\":%llu,\"kv_bytes_peak\":%llu,\"threads\":%d}\n",
               n, scored, chunk, nll / scored, ppl, ms, n / (ms / 1e3),
               (unsigned long long)mem.kv_bytes, (unsigned long long)mem.kv_bytes_peak,
               kvs_context_n_threads(c));
    } else {
        printf("perplexity %.4f over %d predicted tokens (%d tokens, chunk %d, kv %s) in %.1f s "
               "(%.1f tok/s); KV peak %.2f MiB\n", ppl, scored, n, chunk, o->kv, ms / 1e3,
               n / (ms / 1e3), mem.kv_bytes_peak / 1048576.0);
    }
    free(logits);
    free(toks);
    free(text);
    kvs_context_free(c);
    kvs_model_free(m);
    return 0;
}

/* ---- bench -------------------------------------------------------------------------------- */

/* FNV-1a, continued from h (start with FNV_OFFSET) */
#define FNV_OFFSET 1469598103934665603ull
static uint64_t fnv1a(uint64_t h, const float *x, size_t n) {
    const unsigned char *p = (const unsigned char *)x;
    for (size_t i = 0; i < n * sizeof(float); i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

struct med { double med, min, max; };
static int cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static struct med median_of(double *v, int n) { /* sorts v */
    qsort(v, (size_t)n, sizeof *v, cmp_dbl);
    double m = n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
    return (struct med){m, v[0], v[n - 1]};
}

/* greedy: the index of the largest logit (the first of equal ones) */
static int argmax(const float *x, int n) {
    int best = 0;
    for (int v = 1; v < n; v++) best = x[v] > x[best] ? v : best;
    return best;
}

/* ,"gpu_split_s_per_step":{...}} closing a decode entry (just the brace without a split) */
static void json_split(const char *const *names, const double *v, int n) {
    for (int k = 0; k < n; k++) {
        printf("%s", k ? "," : ",\"gpu_split_s_per_step\":{");
        jstr(names[k]);
        printf(":%.7f", v[k]);
    }
    printf("%s}", n ? "}" : "");
}

/* one line of the device time per kernel group of a step, largest share first */
static void text_split(const char *what, int ctx, const char *const *names, const double *v, int n) {
    double tot = 0;
    int ord[16];
    for (int k = 0; k < n; k++) tot += v[k], ord[k] = k;
    for (int a = 1; a < n; a++)
        for (int b = a; b > 0 && v[ord[b]] > v[ord[b - 1]]; b--) {
            int t = ord[b];
            ord[b] = ord[b - 1], ord[b - 1] = t;
        }
    printf("device time a step at %d, %s: %.3f ms =", ctx, what, tot * 1e3);
    for (int k = 0; k < n; k++) printf(" %s %.3f (%.0f%%)", names[ord[k]], v[ord[k]] * 1e3, tot > 0 ? 100 * v[ord[k]] / tot : 0);
    printf("\n");
}

static int cmd_bench(const struct opts *o) {
    kvs_model *m = load_model(o);
    struct kvs_model_info mi;
    kvs_model_get_info(m, &mi);
    int ctxs[8], n_ctxs = o->n_bench_ctx;
    if (n_ctxs) memcpy(ctxs, o->bench_ctx, sizeof ctxs);
    else {
        ctxs[0] = 128, ctxs[1] = 2048, ctxs[2] = 8000;
        n_ctxs = 3;
    }
    int max_ctx = o->bench_prompt;
    for (int i = 0; i < n_ctxs; i++) max_ctx = ctxs[i] > max_ctx ? ctxs[i] : max_ctx;
    /* the batched copies (--parallel) decode on from where the single sequence stopped */
    int n_ctx = o->n_ctx ? o->n_ctx : max_ctx + o->bench_decode * (o->bench_parallel > 1 ? 2 : 1) + 1;
    struct opts oc = *o;
    oc.n_ctx = n_ctx;
    const int NP = o->bench_parallel > 1 ? o->bench_parallel : 0; /* batched decode: NP copies */
    kvs_context *c = new_context(m, &oc, 2 + NP);
    int nth = kvs_context_n_threads(c);

    /* deterministic pseudo-text: token ids from a fixed LCG over the lower vocabulary */
    int n_all = max_ctx + o->bench_decode + 8;
    int32_t *toks = malloc(sizeof(int32_t) * (size_t)n_all);
    uint64_t x = 12345;
    for (int i = 0; i < n_all; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        toks[i] = (int32_t)(256 + (x >> 33) % (uint64_t)(mi.n_vocab / 2 - 256));
    }
    float *logits = malloc(sizeof(float) * mi.n_vocab);
    kvs_sequence *s;
    enum kvs_status st = kvs_seq_new(c, &s);
    if (st != KVS_OK) fail_status(st);

    /* prefill: the median of --reps runs of the benchmark prompt (fresh sequence each time) */
    const int R = o->bench_reps;
    double pf_tps[100];
    for (int rep = 0; rep < R; rep++) {
        kvs_seq_reset(c, s);
        if (!o->quiet) fprintf(stderr, "bench: prefill %d tokens (run %d/%d)\n", o->bench_prompt, rep + 1, R);
        double t0 = now_ms();
        if ((st = kvs_eval(c, s, toks, o->bench_prompt, false, logits, NULL, NULL)) != KVS_OK) fail_status(st);
        pf_tps[rep] = o->bench_prompt / ((now_ms() - t0) / 1e3);
    }
    struct med pf = median_of(pf_tps, R);
    double pf_ms = o->bench_prompt / pf.med * 1e3;
    kvs_sequence *s2;
    if ((st = kvs_seq_new(c, &s2)) != KVS_OK) fail_status(st);

    /* decode at increasing contexts in one sequence; the logits of every timed step are
     * hashed, so that methods whose outputs differ have different hashes */
    kvs_seq_reset(c, s);
    uint64_t logit_hash = FNV_OFFSET;
    double dec_tps[8], dec_bound[8];
    struct med dec_med[8];
    uint64_t dec_kv[8], dec_payload[8];
    int dec_seen[8];
    double dec_held[8];
    /* --parallel N: N copies of the filled cache decode together, one kvs_eval_batch a step */
    kvs_sequence *par[256];
    float *plogits = NULL;
    int32_t ptok[256];
    struct med par_med[8];
    double par_bound[8], par_plan[8], dec_plan[8];
    /* KVS_CUDA_PROFILE=1: the device time per kernel group, per timed step */
    enum { NSPLIT = 16 };
    const char *split_name[NSPLIT];
    double dec_split[8][NSPLIT], par_split[8][NSPLIT], sp0[NSPLIT], sp1[NSPLIT];
    int n_split = 0;
    for (int j = 0; j < NP; j++)
        if ((st = kvs_seq_new(c, &par[j])) != KVS_OK) fail_status(st);
    if (NP && !(plogits = malloc(sizeof(float) * (size_t)mi.n_vocab * (size_t)NP))) {
        fprintf(stderr, "kvsieve: out of memory\n");
        return 1;
    }
    for (int i = 0; i < n_ctxs; i++) {
        int at = kvs_seq_n_past(s);
        if (ctxs[i] > at) {
            if (!o->quiet) fprintf(stderr, "bench: filling context to %d tokens\n", ctxs[i]);
            struct progress pr = {"fill", now_ms(), want_progress(o)};
            if ((st = kvs_eval(c, s, toks + at, ctxs[i] - at, false, logits, progress_cb, &pr)) != KVS_OK)
                fail_status(st);
        }
        /* each repetition decodes from a copy of the filled cache; the last one continues in s */
        double tps[100], pl0, pl1;
        kvs_context_plan_stats(c, &pl0, NULL);
        n_split = kvs_context_gpu_time_split(c, split_name, sp0, NSPLIT);
        for (int rep = 0; rep < R; rep++) {
            kvs_sequence *d = rep + 1 < R ? s2 : s;
            if (d == s2 && (st = kvs_seq_copy(c, s2, c, s)) != KVS_OK) fail_status(st);
            int32_t tok = toks[kvs_seq_n_past(s)];
            double t0 = now_ms();
            for (int k = 0; k < o->bench_decode; k++) {
                if ((st = kvs_eval(c, d, &tok, 1, false, logits, NULL, NULL)) != KVS_OK) fail_status(st);
                if (rep == 0) logit_hash = fnv1a(logit_hash, logits, (size_t)mi.n_vocab);
                tok = argmax(logits, mi.n_vocab);
            }
            tps[rep] = o->bench_decode / ((now_ms() - t0) / 1e3);
        }
        kvs_context_plan_stats(c, &pl1, NULL);
        dec_plan[i] = (pl1 - pl0) / ((double)R * o->bench_decode);
        kvs_context_gpu_time_split(c, split_name, sp1, NSPLIT);
        for (int k = 0; k < n_split; k++) dec_split[i][k] = (sp1[k] - sp0[k]) / ((double)R * o->bench_decode);
        kvs_seq_reset(c, s2);
        double ptps[100];
        kvs_context_plan_stats(c, &pl0, NULL);
        kvs_context_gpu_time_split(c, split_name, sp0, NSPLIT);
        for (int rep = 0; NP && rep < R; rep++) {
            for (int j = 0; j < NP; j++) {
                if ((st = kvs_seq_copy(c, par[j], c, s)) != KVS_OK) fail_status(st);
                ptok[j] = toks[(kvs_seq_n_past(s) + j) % n_all];
            }
            double t0 = now_ms();
            for (int k = 0; k < o->bench_decode; k++) {
                if ((st = kvs_eval_batch(c, par, ptok, NP, plogits)) != KVS_OK) fail_status(st);
                for (int j = 0; j < NP; j++) ptok[j] = argmax(plogits + (size_t)j * mi.n_vocab, mi.n_vocab);
            }
            ptps[rep] = (double)NP * o->bench_decode / ((now_ms() - t0) / 1e3);
            for (int j = 0; j < NP; j++) kvs_seq_reset(c, par[j]);
        }
        kvs_context_plan_stats(c, &pl1, NULL);
        par_plan[i] = NP ? (pl1 - pl0) / ((double)R * o->bench_decode) : 0;
        kvs_context_gpu_time_split(c, split_name, sp1, NSPLIT);
        for (int k = 0; k < n_split; k++) par_split[i][k] = NP ? (sp1[k] - sp0[k]) / ((double)R * o->bench_decode) : 0;
        if (NP) {
            par_med[i] = median_of(ptps, R);
            if (!o->quiet)
                fprintf(stderr, "bench: decode at %d, %d sequences: %.1f tok/s\n", ctxs[i], NP, par_med[i].med);
        }
        dec_med[i] = median_of(tps, R);
        dec_tps[i] = dec_med[i].med;
        /* bytes one decode step must read: every weight once (the embedding table too when it
         * is the tied output matrix) plus the KV entries the cache holds at this context
         * (allocated bytes, an upper bound of what attention streams) */
        struct kvs_mem_stats held;
        kvs_context_mem(c, &held);
        dec_kv[i] = held.kv_bytes;
        dec_payload[i] = kvs_seq_kv_bytes(s);
        dec_seen[i] = kvs_seq_n_past(s);
        dec_held[i] = kvs_seq_entries_per_head(s);
        if (!o->quiet) fprintf(stderr, "bench: decode at %d: %.1f tok/s\n", ctxs[i], dec_tps[i]);
    }
    /* peak RSS of the engine itself, read before the bandwidth probe allocates its buffer */
    long rss = peak_rss_bytes();
    if (!o->quiet) fprintf(stderr, "bench: measuring memory bandwidth...\n");
    /* the probe's best of 5 passes, --reps times: the median of those */
    double bws[100];
    /* on a GPU: the device's copy bandwidth (kvs_context_device_bandwidth), the same way */
    for (int rep = 0; rep < R; rep++)
        bws[rep] = o->device == KVS_DEVICE_CUDA ? kvs_context_device_bandwidth(c)
                                                : kvs_measure_read_bandwidth(nth, (size_t)256 << 20);
    struct med bwm = median_of(bws, R);
    double bw = bwm.med;
    for (int i = 0; i < n_ctxs; i++) {
        dec_bound[i] = bw * 1e9 / (double)(mi.weight_bytes + dec_kv[i]);
        par_bound[i] = NP * bw * 1e9 / (double)(mi.weight_bytes + (uint64_t)NP * dec_kv[i]);
    }
    struct kvs_mem_stats mem;
    kvs_context_mem(c, &mem);
    if (o->json) {
        printf("{\"model\":");
        jstr(o->model);
        printf(",\"arch\":");
        jstr(mi.arch);
        printf(",\"file_type\":");
        jstr(mi.file_type);
        printf(",\"kv\":");
        jstr(o->kv);
        printf(",\"device\":");
        jstr(kvs_context_device_name(c));
        printf(",\"threads\":%d,\"reps\":%d,\"weight_bytes\":%llu,\"kv_bytes_per_token\":%llu,"
               "\"bandwidth_gb_s\":%.2f,\"bandwidth_gb_s_min\":%.2f,\"bandwidth_gb_s_max\":%.2f,"
               "\"prefill\":{\"tokens\":%d,\"ms\":%.1f,\"tok_s\":%.1f,\"tok_s_min\":%.1f,"
               "\"tok_s_max\":%.1f},\"decode\":[", nth, R, (unsigned long long)mi.weight_bytes,
               (unsigned long long)mi.kv_bytes_per_token, bw, bwm.min, bwm.max, o->bench_prompt, pf_ms,
               pf.med, pf.min, pf.max);
        for (int i = 0; i < n_ctxs; i++) {
            printf("%s{\"context\":%d,\"steps\":%d,\"tok_s\":%.2f,\"tok_s_min\":%.2f,\"tok_s_max\":%.2f,"
                   "\"kv_bytes\":%llu,\"bytes_per_token\":%llu,"
                   "\"bound_tok_s\":%.2f,\"fraction_of_bound\":%.3f,\"kv_payload_bytes\":%llu,"
                   "\"kv_entries_per_head\":%.1f,\"kv_bytes_per_token_seen\":%.1f,"
                   "\"kv_bytes_per_cached_token\":%.1f,\"plan_s_per_step\":%.6f", i ? "," : "", ctxs[i],
                   o->bench_decode, dec_tps[i], dec_med[i].min, dec_med[i].max, (unsigned long long)dec_kv[i],
                   (unsigned long long)(mi.weight_bytes + dec_kv[i]),
                   dec_bound[i], dec_tps[i] / dec_bound[i], (unsigned long long)dec_payload[i],
                   dec_held[i], (double)dec_payload[i] / dec_seen[i], (double)dec_payload[i] / dec_held[i],
                   dec_plan[i]);
            json_split(split_name, dec_split[i], n_split);
        }
        for (int i = 0; NP && i < n_ctxs; i++) {
            printf("%s{\"context\":%d,\"sequences\":%d,\"steps\":%d,\"tok_s\":%.2f,\"tok_s_min\":%.2f,"
                   "\"tok_s_max\":%.2f,\"bound_tok_s\":%.2f,\"fraction_of_bound\":%.3f,\"plan_s_per_step\":%.6f",
                   i ? "," : "],\"decode_parallel\":[", ctxs[i], NP, o->bench_decode, par_med[i].med,
                   par_med[i].min, par_med[i].max, par_bound[i], par_med[i].med / par_bound[i], par_plan[i]);
            json_split(split_name, par_split[i], n_split);
        }
        printf("],\"kv_bytes_per_token_theory\":%.1f,\"kv_bytes\":%llu,\"kv_bytes_peak\":%llu,\"scratch_bytes\":%llu,"
               "\"peak_rss_bytes\":%ld,\"logits_hash\":\"%016llx\"}\n",
               kvs_kv_bytes_per_token(m, o->kv), (unsigned long long)mem.kv_bytes, (unsigned long long)mem.kv_bytes_peak,
               (unsigned long long)mem.scratch_bytes, rss,
               (unsigned long long)logit_hash);
    } else {
        if (o->device == KVS_DEVICE_CUDA)
            printf("model %s (%s %s), on %s, copy bandwidth %.0f GB/s (%.0f-%.0f), medians of %d runs\n",
                   mi.name, mi.arch, mi.file_type, kvs_context_device_name(c), bw, bwm.min, bwm.max, R);
        else
            printf("model %s (%s %s), %d threads, read bandwidth %.1f GB/s (%.1f-%.1f), medians of %d runs\n",
                   mi.name, mi.arch, mi.file_type, nth, bw, bwm.min, bwm.max, R);
        printf("prefill %d tokens: %.1f tok/s (%.1f-%.1f; %.0f ms)\n", o->bench_prompt, pf.med, pf.min,
               pf.max, pf_ms);
        for (int i = 0; i < n_ctxs; i++)
            printf("decode at %5d: %7.1f tok/s (%.1f-%.1f)   bound %7.1f tok/s (%.0f%%)   KV %.0f B/token "
                   "seen, %.0f B/entry held (%.0f entries per head), planning %.2f ms/step\n",
                   ctxs[i], dec_tps[i], dec_med[i].min, dec_med[i].max, dec_bound[i], 100 * dec_tps[i] / dec_bound[i],
                   (double)dec_payload[i] / dec_seen[i], (double)dec_payload[i] / dec_held[i], dec_held[i],
                   dec_plan[i] * 1e3);
        for (int i = 0; NP && i < n_ctxs; i++)
            printf("decode at %5d, %d sequences: %8.1f tok/s in all (%.1f-%.1f)   bound %8.1f tok/s (%.0f%%), "
                   "planning %.2f ms/step\n", ctxs[i], NP, par_med[i].med, par_med[i].min, par_med[i].max,
                   par_bound[i], 100 * par_med[i].med / par_bound[i], par_plan[i] * 1e3);
        for (int i = 0; n_split && i < n_ctxs; i++) {
            text_split("one sequence", ctxs[i], split_name, dec_split[i], n_split);
            if (NP) text_split("all sequences", ctxs[i], split_name, par_split[i], n_split);
        }
        printf("KV bytes per packed entry in this storage (theory): %.0f\n", kvs_kv_bytes_per_token(m, o->kv));
        printf("KV peak %.1f MiB, scratch %.1f MiB, peak RSS %.1f MiB, decode logits hash %016llx\n",
               mem.kv_bytes_peak / 1048576.0, mem.scratch_bytes / 1048576.0,
               rss / 1048576.0, (unsigned long long)logit_hash);
    }
    free(logits);
    free(plogits);
    free(toks);
    kvs_context_free(c);
    kvs_model_free(m);
    return 0;
}

/* ---- info --------------------------------------------------------------------------------- */

static int cmd_info(const struct opts *o) {
    kvs_model *m = load_model(o);
    struct kvs_model_info mi;
    kvs_model_get_info(m, &mi);
    int nt = kvs_model_n_tensors(m);
    /* counts and bytes per tensor type */
    const char *tnames[32];
    int tcount[32] = {0};
    unsigned long long tbytes[32] = {0};
    int ntypes = 0;
    for (int i = 0; i < nt; i++) {
        struct kvs_tensor_info ti;
        kvs_model_tensor(m, i, &ti);
        int k = 0;
        while (k < ntypes && strcmp(tnames[k], ti.type)) k++;
        if (k == ntypes && ntypes < 32) tnames[ntypes++] = ti.type;
        if (k < 32) tcount[k]++, tbytes[k] += ti.bytes;
    }
    if (o->json) {
        printf("{\"file\":");
        jstr(o->model);
        printf(",\"gguf_version\":%d,\"arch\":", mi.gguf_version);
        jstr(mi.arch);
        printf(",\"name\":");
        jstr(mi.name);
        printf(",\"file_type\":");
        jstr(mi.file_type);
        printf(",\"n_params\":%llu,\"weight_bytes\":%llu,\"n_layer\":%d,\"n_embd\":%d,"
               "\"n_head\":%d,\"n_head_kv\":%d,\"head_dim\":%d,\"n_ff\":%d,\"n_vocab\":%d,"
               "\"n_ctx_train\":%d,\"rope_theta\":%g,\"norm_eps\":%g,\"tied_output\":%s,"
               "\"qkv_bias\":%s,\"bos\":%d,\"eos\":%d,\"kv_bytes_per_token\":%llu,\"tensor_types\":{",
               (unsigned long long)mi.n_params, (unsigned long long)mi.weight_bytes, mi.n_layer,
               mi.n_embd, mi.n_head, mi.n_head_kv, mi.head_dim, mi.n_ff, mi.n_vocab,
               mi.n_ctx_train, mi.rope_theta, mi.norm_eps, mi.tied_output ? "true" : "false",
               mi.qkv_bias ? "true" : "false", mi.bos_id, mi.eos_id,
               (unsigned long long)mi.kv_bytes_per_token);
        for (int k = 0; k < ntypes; k++)
            printf("%s\"%s\":{\"tensors\":%d,\"bytes\":%llu}", k ? "," : "", tnames[k], tcount[k], tbytes[k]);
        printf("},\"n_tensors\":%d}\n", nt);
    } else {
        printf("file            %s (GGUF v%d)\n", o->model, mi.gguf_version);
        printf("name            %s\n", mi.name);
        printf("architecture    %s\n", mi.arch);
        printf("parameters      %.1f M, %.1f MiB of weights, mostly %s\n", mi.n_params / 1e6,
               mi.weight_bytes / 1048576.0, mi.file_type);
        printf("layers          %d, embedding %d, ffn %d, vocab %d\n", mi.n_layer, mi.n_embd, mi.n_ff, mi.n_vocab);
        printf("attention       %d query heads, %d KV heads (GQA %d:1), head dim %d%s\n", mi.n_head,
               mi.n_head_kv, mi.n_head / mi.n_head_kv, mi.head_dim, mi.qkv_bias ? ", QKV bias" : "");
        printf("rope            theta %g; norm eps %g; output %s\n", mi.rope_theta, mi.norm_eps,
               mi.tied_output ? "tied to the embedding" : "separate");
        printf("context         %d tokens (training)\n", mi.n_ctx_train);
        printf("KV per token    %llu bytes (fp16 K+V, all layers) = %.1f KiB; %.1f MiB at %d tokens\n",
               (unsigned long long)mi.kv_bytes_per_token, mi.kv_bytes_per_token / 1024.0,
               mi.kv_bytes_per_token * (double)mi.n_ctx_train / 1048576.0, mi.n_ctx_train);
        printf("fingerprint     0x%016llx (cache files, chunk records and learned-eviction weights are tied to it)\n",
               (unsigned long long)kvs_model_fingerprint(m));
        printf("tensors         %d:", nt);
        for (int k = 0; k < ntypes; k++) printf(" %s x%d (%.1f MiB)", tnames[k], tcount[k], tbytes[k] / 1048576.0);
        printf("\n");
    }
    kvs_model_free(m);
    return 0;
}

/* The learned scorers' shipped weights: the weights/ folder of the checkout this binary was built
 * in (build/kvsieve -> ../weights; up to three folders up), unless $KVSIEVE_WEIGHTS names another
 * (the library also looks next to the model and in ./weights). */
static void default_weights_dir(void) {
    if (getenv("KVSIEVE_WEIGHTS")) return;
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 64);
    if (n <= 0) return;
    exe[n] = 0;
    for (int up = 0; up < 3; up++) {
        char *sl = strrchr(exe, '/');
        if (!sl) return;
        *sl = 0;
        char cand[4096 + 16];
        snprintf(cand, sizeof cand, "%s/weights", exe);
        struct stat st;
        if (stat(cand, &st) == 0 && S_ISDIR(st.st_mode)) {
            setenv("KVSIEVE_WEIGHTS", cand, 0);
            return;
        }
    }
}

int main(int argc, char **argv) {
    default_weights_dir();
    if (argc >= 2 && !strcmp(argv[1], "eval")) return eval_main(argc - 2, argv + 2);
    if (argc >= 2 && !strcmp(argv[1], "serve")) return serve_main(argc - 2, argv + 2);
    if (argc >= 2 && !strcmp(argv[1], "batch")) return batch_main(argc - 2, argv + 2);
    if (argc >= 2 && !strcmp(argv[1], "pagesim")) return pagesim_main(argc - 2, argv + 2);
    struct opts o;
    parse_args(argc, argv, &o);
    fix_bench_prompt(&o);
    if (o.quiet) kvs_set_log_level(0);
    int rc = 2;
    if (!strcmp(o.cmd, "run")) rc = cmd_run(&o);
    else if (!strcmp(o.cmd, "chat")) rc = cmd_chat(&o);
    else if (!strcmp(o.cmd, "ppl")) rc = cmd_ppl(&o);
    else if (!strcmp(o.cmd, "bench")) rc = cmd_bench(&o);
    else if (!strcmp(o.cmd, "info")) rc = cmd_info(&o);
    free_opts(&o);
    return rc;
}
