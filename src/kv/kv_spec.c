/* kv_spec.c — parser of the --kv grammar (see kv_spec.h). Hand-written, bounded, no allocation:
 * the spec is copied into a fixed buffer and split in place, every value is range-checked. */
#include "kv_spec.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *METHOD_NAMES[KV_METHOD_COUNT] = {"full", "streaming", "h2o", "tova",
                                                    "snapkv", "knorm", "random"};

/* keys each method accepts beyond the shared ones */
static const char *METHOD_KEYS[KV_METHOD_COUNT] = {
    "", "sinks, window, pos", "recent", "", "window, kernel, pool", "", "seed"};
static const char *SHARED_KEYS = "budget, ratio, mem, alloc, beta, floor, agg, when, every";

const char *kv_method_name(enum kv_method m) {
    return (unsigned)m < KV_METHOD_COUNT ? METHOD_NAMES[m] : "?";
}

const char *kv_spec_help(void) {
    return "--kv SPEC selects the KV-cache policy of every sequence.\n"
           "\n"
           "grammar:  SPEC := PART ('+' PART)*\n"
           "          PART := METHOD (':' KEY '=' VALUE (',' KEY '=' VALUE)*)?   (first part)\n"
           "                | KEY '=' VALUE                                     (shared option)\n"
           "examples: full\n"
           "          streaming:sinks=4,window=1020\n"
           "          h2o:budget=512,recent=0.5\n"
           "          snapkv:ratio=0.25,window=32,kernel=7,pool=max\n"
           "          tova:ratio=0.1+alloc=adakv\n"
           "\n"
           "methods (scorers; entries that lose are evicted and their memory freed):\n"
           "  full       keep everything (default; bit-identical to no policy)\n"
           "  streaming  StreamingLLM: the first `sinks` entries + the last `window` (defaults\n"
           "             sinks=4, window=budget-sinks); pos=cache (default) gives the kept\n"
           "             entries RoPE positions 0..n-1 (keys re-rotated on eviction) so that\n"
           "             generation can run past the trained context; pos=abs keeps original ones\n"
           "  h2o        H2O: accumulated attention each entry received (heavy hitters) + the\n"
           "             most recent `recent` fraction of the budget (default 0.5)\n"
           "  tova       TOVA: attention of the last query; layer-wise top entries\n"
           "  snapkv     SnapKV: attention of the last `window` queries (32), pooled over\n"
           "             `kernel` (7) neighbouring entries with `pool`=max|avg; the window is kept\n"
           "  knorm      keys with the smallest L2 norm are kept (kvpress Knorm)\n"
           "  random     uniform random scores (baseline); seed=N\n"
           "\n"
           "budget (one of, required except for full and streaming with window=):\n"
           "  budget=N   entries per KV head and layer\n"
           "  ratio=R    fraction of the tokens seen so far, 0 < R <= 1\n"
           "  mem=B      bytes of KV for the whole sequence (suffix K, M, G allowed)\n"
           "shared options:\n"
           "  alloc=uniform|pyramid|adakv  how the budget splits across layers/heads (uniform);\n"
           "             pyramid (PyramidKV): linear from (2-1/beta)x the mean at layer 0 down to\n"
           "             1/beta x at the top, beta=20; adakv: top entries across the heads of a\n"
           "             layer, each head keeping at least floor (0.2) of its uniform share\n"
           "  agg=mean|max  how the query heads of a KV head (GQA) are combined (mean)\n"
           "  when=chunk|prefill  compress after every prefill chunk, layer by layer, so peak\n"
           "             memory stays within budget + one chunk of one layer (chunk, default); or\n"
           "             once when the prompt is complete (prefill, kvpress style)\n"
           "  every=N    during decoding, compress when a head holds N entries over budget\n"
           "             (16; 0 = never compress while decoding)\n";
}

static enum kvs_status bad(const char *spec, const char *fmt, const char *a, const char *b) {
    char msg[300];
    snprintf(msg, sizeof msg, fmt, a, b);
    return kvs_fail(KVS_ERR_INVALID_ARG, "invalid --kv '%s': %s", spec, msg);
}

static bool parse_num(const char *v, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end || !(x >= lo && x <= hi)) return false;
    *out = x;
    return true;
}

static bool parse_int(const char *v, long lo, long hi, int32_t *out) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi) return false;
    *out = (int32_t)x;
    return true;
}

static bool parse_bytes(const char *v, uint64_t *out) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || !(x > 0)) return false;
    double mul = 1;
    if (*end == 'K' || *end == 'k') mul = 1024, end++;
    else if (*end == 'M' || *end == 'm') mul = 1024.0 * 1024, end++;
    else if (*end == 'G' || *end == 'g') mul = 1024.0 * 1024 * 1024, end++;
    if (*end == 'B' || *end == 'b') end++;
    if (*end || x * mul > 1e15 || x * mul < 1) return false;
    *out = (uint64_t)(x * mul);
    return true;
}

static bool key_allowed(enum kv_method m, const char *key) {
    char list[128];
    snprintf(list, sizeof list, "%s, %s", SHARED_KEYS, METHOD_KEYS[m]);
    size_t kl = strlen(key);
    for (char *p = list; *p;) {
        while (*p == ' ' || *p == ',') p++;
        char *e = p;
        while (*e && *e != ',') e++;
        if ((size_t)(e - p) == kl && strncmp(p, key, kl) == 0) return true;
        p = e;
    }
    return false;
}

/* apply one key=value to the spec; returns false with the error set */
static enum kvs_status set_key(const char *spec, struct kv_spec *s, const char *key,
                               const char *val) {
    double x;
    if (s->method == KV_FULL)
        return bad(spec, "'full' takes no options (got '%s=%s')", key, val);
    if (!key_allowed(s->method, key)) {
        char acc[160];
        snprintf(acc, sizeof acc, "%s%s%s", SHARED_KEYS, METHOD_KEYS[s->method][0] ? ", " : "",
                 METHOD_KEYS[s->method]);
        char msg[240];
        snprintf(msg, sizeof msg, "unknown key '%s' for %s (accepted: %s)", key,
                 kv_method_name(s->method), acc);
        return kvs_fail(KVS_ERR_INVALID_ARG, "invalid --kv '%s': %s", spec, msg);
    }
    bool ok = true;
    if (!strcmp(key, "budget")) ok = parse_int(val, 1, 1 << 24, &s->budget);
    else if (!strcmp(key, "ratio")) {
        ok = parse_num(val, 1e-6, 1.0, &x) && x > 0;
        s->ratio = (float)x;
    } else if (!strcmp(key, "mem")) ok = parse_bytes(val, &s->mem_bytes);
    else if (!strcmp(key, "alloc")) {
        if (!strcmp(val, "uniform")) s->alloc = KV_ALLOC_UNIFORM;
        else if (!strcmp(val, "pyramid")) s->alloc = KV_ALLOC_PYRAMID;
        else if (!strcmp(val, "adakv")) s->alloc = KV_ALLOC_ADAKV;
        else return bad(spec, "alloc must be uniform, pyramid or adakv (got '%s')%s", val, "");
    } else if (!strcmp(key, "beta")) {
        ok = parse_num(val, 1.0, 1000.0, &x);
        s->pyramid_beta = (float)x;
    } else if (!strcmp(key, "floor")) {
        ok = parse_num(val, 0.0, 1.0, &x);
        s->adakv_floor = (float)x;
    } else if (!strcmp(key, "agg")) {
        if (!strcmp(val, "mean")) s->agg = KV_AGG_MEAN;
        else if (!strcmp(val, "max")) s->agg = KV_AGG_MAX;
        else return bad(spec, "agg must be mean or max (got '%s')%s", val, "");
    } else if (!strcmp(key, "when")) {
        if (!strcmp(val, "chunk")) s->when = KV_WHEN_CHUNK;
        else if (!strcmp(val, "prefill")) s->when = KV_WHEN_PREFILL;
        else return bad(spec, "when must be chunk or prefill (got '%s')%s", val, "");
    } else if (!strcmp(key, "every")) ok = parse_int(val, 0, 1 << 20, &s->every);
    else if (!strcmp(key, "sinks")) ok = parse_int(val, 0, 1 << 20, &s->sinks);
    else if (!strcmp(key, "window")) {
        ok = parse_int(val, s->method == KV_STREAMING ? 1 : 0, 1 << 20, s->method == KV_STREAMING ? &s->window : &s->obs_window);
    } else if (!strcmp(key, "recent")) {
        ok = parse_num(val, 0.0, 1.0, &x);
        s->recent = (float)x;
    } else if (!strcmp(key, "kernel")) {
        ok = parse_int(val, 1, 1023, &s->kernel) && (s->kernel % 2 == 1);
        if (!ok) return bad(spec, "kernel must be an odd integer in [1, 1023] (got '%s')%s", val, "");
    } else if (!strcmp(key, "pool")) {
        if (!strcmp(val, "max")) s->pool = KV_POOL_MAX;
        else if (!strcmp(val, "avg")) s->pool = KV_POOL_AVG;
        else if (!strcmp(val, "none")) s->pool = KV_POOL_NONE;
        else return bad(spec, "pool must be max, avg or none (got '%s')%s", val, "");
    } else if (!strcmp(key, "pos")) {
        if (!strcmp(val, "cache")) s->reindex = true;
        else if (!strcmp(val, "abs")) s->reindex = false;
        else return bad(spec, "pos must be cache or abs (got '%s')%s", val, "");
    } else if (!strcmp(key, "seed")) {
        char *end;
        errno = 0;
        s->seed = strtoull(val, &end, 10);
        ok = !errno && end != val && !*end;
    }
    if (!ok) return bad(spec, "bad value '%s' for '%s'", val, key);
    return KVS_OK;
}

enum kvs_status kv_spec_parse(const char *spec, struct kv_spec *s) {
    memset(s, 0, sizeof *s);
    s->method = KV_FULL;
    s->pyramid_beta = 20.0f;
    s->adakv_floor = 0.2f;
    s->when = KV_WHEN_CHUNK;
    s->every = 16;
    s->sinks = 4;
    s->recent = 0.5f;
    s->obs_window = -1; /* per-method default below */
    s->kernel = 7;
    s->pool = KV_POOL_MAX;
    s->seed = 1;
    s->reindex = true; /* only streaming reads it */
    if (!spec || !*spec) spec = "full";
    char buf[512];
    if (strlen(spec) >= sizeof buf) return kvs_fail(KVS_ERR_INVALID_ARG, "--kv spec is too long");
    strcpy(buf, spec);
    size_t len = strlen(spec);
    if (strstr(spec, ",,") || strstr(spec, "++") || strstr(spec, ":,") || strstr(spec, "+:") ||
        spec[0] == '+' || strchr(",+:", spec[len - 1]))
        return bad(spec, "empty part or option%s%s", "", "");
    char *save_part = NULL;
    bool first = true;
    for (char *part = strtok_r(buf, "+", &save_part); part; part = strtok_r(NULL, "+", &save_part)) {
        char *colon = strchr(part, ':');
        char *eq = strchr(part, '=');
        char *opts = NULL;
        if (first) {
            if (colon) *colon = 0, opts = colon + 1;
            else if (eq) return bad(spec, "it must start with a method name (%s%s)",
                                    "full, streaming, h2o, tova, snapkv, knorm, random", "");
            int m = -1;
            for (int i = 0; i < KV_METHOD_COUNT; i++)
                if (!strcmp(part, METHOD_NAMES[i])) m = i;
            if (m < 0) return bad(spec, "unknown method '%s' (accepted: %s)", part,
                                  "full, streaming, h2o, tova, snapkv, knorm, random");
            s->method = (enum kv_method)m;
            first = false;
        } else {
            if (colon || !eq) return bad(spec, "'%s' is not a KEY=VALUE option%s", part, "");
            opts = part;
        }
        if (!opts) continue;
        char *save_kv = NULL;
        for (char *kv = strtok_r(opts, ",", &save_kv); kv; kv = strtok_r(NULL, ",", &save_kv)) {
            char *e = strchr(kv, '=');
            if (!e || e == kv || !e[1]) return bad(spec, "'%s' is not KEY=VALUE%s", kv, "");
            *e = 0;
            enum kvs_status st = set_key(spec, s, kv, e + 1);
            if (st != KVS_OK) return st;
        }
    }
    if (first) return bad(spec, "empty spec%s%s", "", "");
    if (s->method != KV_STREAMING) s->reindex = false;
    if (s->method == KV_FULL) {
        snprintf(s->text, sizeof s->text, "full");
        return KVS_OK;
    }
    int n_budget = (s->budget > 0) + (s->ratio > 0) + (s->mem_bytes > 0);
    if (s->method == KV_STREAMING && n_budget == 0 && s->window > 0) {
        s->budget = s->sinks + s->window;
        n_budget = 1;
    }
    if (n_budget != 1)
        return bad(spec, "give exactly one of budget=N, ratio=R or mem=BYTES%s%s", "", "");
    if (s->method == KV_STREAMING && s->window > 0 && s->budget > 0 && s->window + s->sinks != s->budget)
        return bad(spec, "streaming: sinks + window must equal budget%s%s", "", "");
    if (s->obs_window < 0) s->obs_window = s->method == KV_SNAPKV ? 32 : 0;
    if (s->method == KV_TOVA && s->obs_window == 0) s->obs_window = 1;
    snprintf(s->text, sizeof s->text, "%s", spec);
    return KVS_OK;
}
