/* kv_spec.c — parser of the --kv grammar (see kv_spec.h). Hand-written, bounded, no allocation:
 * the spec is copied into a fixed buffer and split in place, every value is range-checked. */
#include "kv_spec.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *METHOD_NAMES[KV_METHOD_COUNT] = {
    "full", "streaming", "h2o", "tova", "snapkv", "knorm", "random", "d2o", "ems", "kvmerger",
    "elastic", "locret", "agate"};
#define METHOD_LIST "full, streaming, h2o, tova, snapkv, knorm, random, d2o, ems, kvmerger, elastic, locret, agate"

/* keys each method accepts beyond the shared ones */
static const char *METHOD_KEYS[KV_METHOD_COUNT] = {
    "", "sinks, window, pos", "recent", "", "window, kernel, pool", "", "seed",
    "recent, sinks, alpha, beta_ema", "window, sinks", "recent, sinks", "sinks, distance", "window, file", "tau, window, file"};
static const char *SHARED_KEYS =
    "budget, ratio, mem, alloc, beta, floor, agg, when, every, merge, thr, wattn, skip";

/* storage parts: `+kivi:bits=4`, `+think:prune=0.4`, `+mikv:low=2` */
enum { MOD_NONE = -1, MOD_THINK, MOD_KIVI, MOD_MIKV, MOD_COUNT };
static const char *MOD_NAMES[MOD_COUNT] = {"think", "kivi", "mikv"};
static const char *MOD_KEYS[MOD_COUNT] = {"prune, ratio, recent", "bits, group, resid", "low, balance"};

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
           "          d2o:ratio=0.2      kvmerger:budget=512      snapkv:ratio=0.25+merge=kvmerger\n"
           "          snapkv:ratio=0.25+think:prune=0.4+kivi:bits=4\n"
           "          h2o:ratio=0.2+mikv:low=2      full+kivi:bits=2\n"
           "          locret:ratio=0.1      locret:budget=1024,window=128+kivi:bits=4\n"
           "          agate      agate:ratio=0.1      agate:tau=0.7\n"
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
           "learned scorers (trained weights, one small file per model; tools/train/README.md):\n"
           "  locret     Locret retaining heads: a small MLP per layer reads each token's q, k, v\n"
           "             (before RoPE) as the layer computes them and predicts, per KV head, how\n"
           "             much later tokens will attend to it; the score is fixed at that moment,\n"
           "             so it needs no question and no attention statistics. The newest\n"
           "             `window` entries are kept (stabilisers; default a quarter of the\n"
           "             budget). file=PATH picks the weights; by default the first *.lrn made\n"
           "             for this model (by fingerprint) in the model's folder, $KVSIEVE_WEIGHTS,\n"
           "             ./weights or the weights/ folder of the kvsieve checkout; a file made\n"
           "             for another model is refused\n"
           "  agate      Attention-Gate: a small causal attention per layer (its own few-channel\n"
           "             cache of every token, never evicted) reads the layer's input and gives\n"
           "             each token a keep score per KV head when it is computed; a token scoring\n"
           "             below tau (0.5) is seen only by the next `window` tokens (trained into\n"
           "             the file: 32; window=N widens it) and then evicted, in the prompt and\n"
           "             while decoding, so the cache shrinks by the rate the gate was trained\n"
           "             for (no budget needed).\n"
           "             budget=, ratio= or mem= also cap it, pooled over a layer's KV heads\n"
           "             (the gate keeps very different numbers per head): beyond each head's\n"
           "             newest `window`, the best scores of any head stay. tau=0 keeps every\n"
           "             token. `gate` is another name for it. Weights are found as for locret\n"
           "             (file=; agate-*.lrn files)\n"
           "merging methods (entries that lose are folded into kept ones; an entry's weight counts\n"
           "the tokens it stands for):\n"
           "  d2o        D2O: H2O scores + sinks, layer budgets from attention variance (alloc=d2o;\n"
           "             layers 0, 1 and L-1 uncompressed unless skip=0), evicted entries merged\n"
           "             into their most similar kept key when the cosine clears an EMA threshold\n"
           "             (alpha=0.5, beta_ema=0.5; thr=X fixes it); recent=0.5 of the budget kept\n"
           "  ems        EMS: global (per observer) + local (last `window` queries) importance,\n"
           "             head-adaptive budgets (alloc=adakv), losers merged into the most similar\n"
           "             kept centre when cosine >= thr (0.5), else evicted (the zero class)\n"
           "  kvmerger   KVMerger: runs of adjacent keys with cosine >= thr (0.75) merged into\n"
           "             their highest-attention pivot with Gaussian-kernel weights, then H2O\n"
           "             eviction to the budget; recent=0.1, sinks=4\n"
           "  elastic    Elastic Cache: layer-shared importance anchors; every other entry is\n"
           "             merged (mean) into the anchor nearest in position; while decoding, the\n"
           "             entry at slot (compressed prompt + distance) (-25) is evicted; sinks=1\n"
           "  merge=none|d2o|ems|kvmerger|elastic  the merge action with any scorer\n"
           "  thr=X      similarity threshold of the merge (cosine; 2 merges nothing)\n"
           "  wattn=1    attention adds log(weight) to a merged entry's logit (off: as the papers)\n"
           "\n"
           "storage parts (older entries held in fewer bytes; combine with every method):\n"
           "  think:prune=0.4,recent=32   ThinK: per KV head, the key channels with the lowest\n"
           "             query-weighted energy are dropped and the rest stored packed (kept\n"
           "             channels rounded up to a multiple of 8); the newest `recent` prompt\n"
           "             entries and generated tokens stay full width; think:ratio=0.4 is the\n"
           "             same as think:prune=0.4 (the paper's pruning ratio)\n"
           "  kivi:bits=4,group=32,resid=128   KIVI: keys quantized per channel over groups of\n"
           "             `group` tokens, values per token, 2/4/8 bits (fp16 scales and minima);\n"
           "             the newest resid..resid+group entries stay fp16; attention reads the\n"
           "             codes directly\n"
           "  mikv:low=2,balance=0   MiKV: entries the method would evict are kept at `low` bits\n"
           "             (2, 3, 4 or 8) instead; the budget counts the entries kept in fp16.\n"
           "             Demoted keys are stored per token after subtracting each channel's\n"
           "             mean (taken at the first demotion; attention adds q.mean back), so\n"
           "             the large constant channels of models with a K bias (Qwen2.5) do not\n"
           "             eat the codes' range; balance=1 adds the paper's outlier balancer\n"
           "             (sqrt(max|q|/max|k|) per channel; halves Qwen2.5's 2-bit KL, triples\n"
           "             SmolLM2's). Scales and minima are fp16. mikv:ratio=0.2 alone means\n"
           "             h2o:ratio=0.2+mikv\n"
           "\n"
           "budget (one of, required except for full and streaming with window=):\n"
           "  budget=N   entries per KV head and layer\n"
           "  ratio=R    fraction of the tokens seen so far, 0 < R <= 1\n"
           "  mem=B      bytes of KV for the whole sequence (suffix K, M, G allowed)\n"
           "shared options:\n"
           "  alloc=uniform|pyramid|adakv|d2o  how the budget splits across layers/heads (uniform);\n"
           "             pyramid (PyramidKV): linear from (2-1/beta)x the mean at layer 0 down to\n"
           "             1/beta x at the top, beta=20; adakv: top entries across the heads of a\n"
           "             layer, each head keeping at least floor (0.2) of its uniform share\n"
           "  skip=0|1   alloc=d2o: leave layers 0, 1 and L-1 uncompressed (1 for d2o)\n"
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

static bool in_list(const char *list, const char *key) {
    size_t kl = strlen(key);
    for (const char *p = list; *p;) {
        while (*p == ' ' || *p == ',') p++;
        const char *e = p;
        while (*e && *e != ',') e++;
        if ((size_t)(e - p) == kl && strncmp(p, key, kl) == 0) return true;
        p = e;
    }
    return false;
}

/* The accepted values of a key, for error messages ("bad value '2' for 'ratio' (accepted:
 * 0 < ratio <= 1)"); the ranges are the ones set_key and set_mod_key check. */
static const char *key_range(int mod, enum kv_method m, const char *key) {
    static const struct { int mod; const char *key, *range; } tab[] = {
        {MOD_THINK, "prune", "0 <= prune <= 0.95"},
        {MOD_THINK, "ratio", "0 <= ratio <= 0.95"},
        {MOD_THINK, "recent", "an integer, 0 <= recent <= 1048576"},
        {MOD_KIVI, "resid", "an integer, 0 <= resid <= 1048576, a multiple of group"},
        {MOD_MIKV, "balance", "0 or 1"},
        {MOD_NONE, "budget", "an integer, 1 <= budget <= 16777216"},
        {MOD_NONE, "ratio", "0 < ratio <= 1"},
        {MOD_NONE, "mem", "a byte count >= 1, with an optional K, M or G suffix"},
        {MOD_NONE, "beta", "1 <= beta <= 1000"},
        {MOD_NONE, "floor", "0 <= floor <= 1"},
        {MOD_NONE, "every", "an integer, 0 <= every <= 1048576"},
        {MOD_NONE, "thr", "-1 <= thr <= 2"},
        {MOD_NONE, "wattn", "0 or 1"},
        {MOD_NONE, "skip", "0 or 1"},
        {MOD_NONE, "alpha", "0 <= alpha <= 1"},
        {MOD_NONE, "beta_ema", "0 <= beta_ema <= 1"},
        {MOD_NONE, "distance", "an integer, -1048576 <= distance <= 1048576"},
        {MOD_NONE, "sinks", "an integer, 0 <= sinks <= 1048576"},
        {MOD_NONE, "recent", "0 <= recent <= 1, a fraction of the budget"},
        {MOD_NONE, "seed", "an integer, 0 <= seed <= 18446744073709551615"},
        {MOD_NONE, "file", "a path of at most 191 characters with no ',' or '+'"},
    };
    if (mod == MOD_NONE && !strcmp(key, "window"))
        return m == KV_STREAMING ? "an integer, 1 <= window <= 1048576"
                                 : "an integer, 0 <= window <= 1048576";
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++)
        if (tab[i].mod == mod && !strcmp(tab[i].key, key)) return tab[i].range;
    return NULL;
}

static enum kvs_status bad_value(const char *spec, int mod, enum kv_method m, const char *key,
                                 const char *val) {
    const char *range = key_range(mod, m, key);
    return kvs_fail(KVS_ERR_INVALID_ARG, "invalid --kv '%s': bad value '%s' for '%s'%s%s%s", spec,
                    val, key, range ? " (accepted: " : "", range ? range : "", range ? ")" : "");
}

/* the keys accepted in one part: a storage part takes its own keys only; the method part and
 * trailing KEY=VALUE parts take the shared keys and the method's */
static void accepted(enum kv_method m, int mod, char *out, size_t n) {
    if (mod != MOD_NONE) snprintf(out, n, "%s", MOD_KEYS[mod]);
    else snprintf(out, n, "%s%s%s", SHARED_KEYS, METHOD_KEYS[m][0] ? ", " : "", METHOD_KEYS[m]);
}

static enum kvs_status set_mod_key(const char *spec, struct kv_spec *s, int mod, const char *key,
                                   const char *val) {
    double x;
    bool ok = true;
    if (mod == MOD_THINK && (!strcmp(key, "prune") || !strcmp(key, "ratio"))) {
        ok = parse_num(val, 0.0, 0.95, &x);
        s->think_prune = (float)x;
    } else if (mod == MOD_THINK && !strcmp(key, "recent")) {
        ok = parse_int(val, 0, 1 << 20, &s->think_recent);
    } else if (mod == MOD_KIVI && !strcmp(key, "bits")) {
        ok = parse_int(val, 2, 8, &s->kivi_bits) && (s->kivi_bits == 2 || s->kivi_bits == 4 || s->kivi_bits == 8);
        if (!ok) return bad(spec, "kivi bits must be 2, 4 or 8 (got '%s')%s", val, "");
    } else if (mod == MOD_KIVI && !strcmp(key, "group")) {
        ok = parse_int(val, 8, 256, &s->kivi_group) && s->kivi_group % 8 == 0;
        if (!ok) return bad(spec, "kivi group must be a multiple of 8 in [8, 256] (got '%s')%s", val, "");
    } else if (mod == MOD_KIVI && !strcmp(key, "resid")) {
        ok = parse_int(val, 0, 1 << 20, &s->kivi_resid);
        s->resid_given = true;
    } else if (mod == MOD_MIKV && !strcmp(key, "low")) {
        ok = parse_int(val, 2, 8, &s->mikv_low) && (s->mikv_low <= 4 || s->mikv_low == 8);
        if (!ok) return bad(spec, "mikv low must be 2, 3, 4 or 8 bits (got '%s')%s", val, "");
    } else if (mod == MOD_MIKV && !strcmp(key, "balance")) {
        int32_t b;
        ok = parse_int(val, 0, 1, &b);
        s->mikv_balance = b != 0;
    }
    if (!ok) return bad_value(spec, mod, s->method, key, val);
    return KVS_OK;
}

/* apply one key=value to the spec */
static enum kvs_status set_key(const char *spec, struct kv_spec *s, int mod, const char *key,
                               const char *val) {
    double x;
    char acc[256];
    accepted(s->method, mod, acc, sizeof acc);
    if (!in_list(acc, key)) {
        char msg[320];
        snprintf(msg, sizeof msg, "unknown key '%s' for %s (accepted: %s)", key,
                 mod != MOD_NONE ? MOD_NAMES[mod] : kv_method_name(s->method),
                 acc[0] ? acc : "none");
        return kvs_fail(KVS_ERR_INVALID_ARG, "invalid --kv '%s': %s", spec, msg);
    }
    if (mod != MOD_NONE) return set_mod_key(spec, s, mod, key, val);
    s->has_opts = true;
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
        else if (!strcmp(val, "d2o")) s->alloc = KV_ALLOC_D2O;
        else return bad(spec, "alloc must be uniform, pyramid, adakv or d2o (got '%s')%s", val, "");
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
    else if (!strcmp(key, "merge")) {
        if (!strcmp(val, "none")) s->merge = KV_MERGE_NONE;
        else if (!strcmp(val, "d2o")) s->merge = KV_MERGE_D2O;
        else if (!strcmp(val, "ems")) s->merge = KV_MERGE_EMS;
        else if (!strcmp(val, "kvmerger")) s->merge = KV_MERGE_KVMERGER;
        else if (!strcmp(val, "elastic")) s->merge = KV_MERGE_ELASTIC;
        else return bad(spec, "merge must be none, d2o, ems, kvmerger or elastic (got '%s')%s", val, "");
    } else if (!strcmp(key, "thr")) {
        ok = parse_num(val, -1.0, 2.0, &x);
        s->thr = (float)x;
    } else if (!strcmp(key, "wattn") || !strcmp(key, "skip")) {
        int32_t b;
        ok = parse_int(val, 0, 1, &b);
        if (key[0] == 'w') s->wattn = b != 0;
        else s->skip_layers = b != 0;
    } else if (!strcmp(key, "alpha")) {
        ok = parse_num(val, 0.0, 1.0, &x);
        s->d2o_alpha = (float)x;
    } else if (!strcmp(key, "beta_ema")) {
        ok = parse_num(val, 0.0, 1.0, &x);
        s->d2o_beta = (float)x;
    } else if (!strcmp(key, "distance")) ok = parse_int(val, -(1 << 20), 1 << 20, &s->distance);
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
    } else if (!strcmp(key, "tau")) {
        ok = parse_num(val, 0.0, 1.0, &x);
        s->gate_tau = (float)x;
    } else if (!strcmp(key, "file") && (s->method == KV_LOCRET || s->method == KV_AGATE)) {
        ok = strlen(val) < sizeof s->file;
        if (ok) snprintf(s->file, sizeof s->file, "%s", val);
    } else if (!strcmp(key, "seed")) {
        char *end;
        errno = 0;
        s->seed = strtoull(val, &end, 10);
        ok = !errno && end != val && !*end;
    }
    if (!ok) return bad_value(spec, MOD_NONE, s->method, key, val);
    return KVS_OK;
}

/* the defaults a method brings (set when the method is read, so that its keys override them) */
static void method_defaults(struct kv_spec *s) {
    switch (s->method) {
    case KV_D2O: /* d2o_0.2 = heavy 0.1 + recent 0.1: half of the budget recent */
        s->merge = KV_MERGE_D2O, s->alloc = KV_ALLOC_D2O, s->skip_layers = true;
        break;
    case KV_EMS: s->merge = KV_MERGE_EMS, s->alloc = KV_ALLOC_ADAKV, s->obs_window = 32; break;
    case KV_KVMERGER: s->merge = KV_MERGE_KVMERGER, s->recent = 0.1f; break;
    case KV_ELASTIC: s->merge = KV_MERGE_ELASTIC, s->sinks = 1; break;
    default: break;
    }
}

static int find_name(const char *name, const char **names, int n) {
    for (int i = 0; i < n; i++)
        if (!strcmp(name, names[i])) return i;
    return -1;
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
    s->thr = NAN;
    s->d2o_alpha = 0.5f;
    s->d2o_beta = 0.5f;
    s->distance = -25;
    s->think_recent = 32;
    s->kivi_group = 32;
    s->kivi_resid = 128;
    s->mikv_balance = false;
    s->gate_tau = 0.5f;
    if (!spec || !*spec) spec = "full";
    char buf[512];
    if (strlen(spec) >= sizeof s->text)
        return kvs_fail(KVS_ERR_INVALID_ARG, "--kv spec is too long (at most %zu characters)",
                        sizeof s->text - 1);
    strcpy(buf, spec);
    size_t len = strlen(spec);
    if (strstr(spec, ",,") || strstr(spec, "++") || strstr(spec, ":,") || strstr(spec, "+:") ||
        spec[0] == '+' || strchr(",+:", spec[len - 1]))
        return bad(spec, "empty part or option%s%s", "", "");
    char *save_part = NULL;
    bool first = true, seen_mod[MOD_COUNT] = {false};
    /* keys given so far, as (scope, name) pairs: a storage part's keys are its own, the method
     * part and trailing KEY=VALUE parts share one scope; the names point into buf */
    struct { int mod; const char *key; } given[64];
    int n_given = 0;
    for (char *part = strtok_r(buf, "+", &save_part); part; part = strtok_r(NULL, "+", &save_part)) {
        char *colon = strchr(part, ':');
        char *eq = strchr(part, '=');
        char *opts = NULL;
        int mod = MOD_NONE;
        if (colon || !eq) { /* NAME or NAME:opts */
            if (colon) *colon = 0, opts = colon + 1;
            mod = find_name(part, MOD_NAMES, MOD_COUNT);
            if (first && mod < 0) {
                int m = find_name(part, METHOD_NAMES, KV_METHOD_COUNT);
                if (m < 0 && !strcmp(part, "gate")) m = KV_AGATE; /* the name for it */
                if (m < 0) return bad(spec, "unknown method '%s' (accepted: %s, or a storage part "
                                      "think, kivi, mikv)", part, METHOD_LIST);
                s->method = (enum kv_method)m;
                method_defaults(s);
            } else if (mod < 0) {
                return bad(spec, "'%s' is neither a storage part (think, kivi, mikv) nor a "
                           "KEY=VALUE option%s", part, "");
            } else {
                if (seen_mod[mod]) return bad(spec, "'%s' is given twice%s", MOD_NAMES[mod], "");
                seen_mod[mod] = true;
                if (mod == MOD_THINK) s->think = true, s->think_prune = 0.4f;
                if (mod == MOD_KIVI) s->kivi_bits = 4;
                if (mod == MOD_MIKV) s->mikv_low = 2;
                /* `mikv:ratio=0.2` alone: H2O decides which entries stay in high precision */
                if (first && mod == MOD_MIKV) s->method = KV_H2O;
            }
        } else if (first) {
            return bad(spec, "it must start with a method name (%s%s)", METHOD_LIST, "");
        } else {
            opts = part;
        }
        first = false;
        if (!opts) continue;
        char *save_kv = NULL;
        for (char *kv = strtok_r(opts, ",", &save_kv); kv; kv = strtok_r(NULL, ",", &save_kv)) {
            char *e = strchr(kv, '=');
            if (!e || e == kv || !e[1]) return bad(spec, "'%s' is not KEY=VALUE%s", kv, "");
            *e = 0;
            int use = mod;
            /* mikv as the first part takes h2o's keys too */
            if (mod == MOD_MIKV && s->method == KV_H2O && !in_list(MOD_KEYS[MOD_MIKV], kv)) use = MOD_NONE;
            /* think:ratio is another name of think:prune */
            const char *name = use == MOD_THINK && !strcmp(kv, "ratio") ? "prune" : kv;
            for (int g = 0; g < n_given; g++)
                if (given[g].mod == use && !strcmp(given[g].key, name))
                    return bad(spec, "'%s' is given twice%s", kv, name != kv ? " (as prune or ratio)" : "");
            if (n_given < (int)(sizeof given / sizeof given[0])) given[n_given].mod = use, given[n_given++].key = name;
            if (use == MOD_NONE && s->method == KV_FULL && !seen_mod[MOD_MIKV])
                return bad(spec, "'full' takes no options (got '%s=%s')", kv, e + 1);
            enum kvs_status st = set_key(spec, s, use, kv, e + 1);
            if (st != KVS_OK) return st;
        }
    }
    if (first) return bad(spec, "empty spec%s%s", "", "");
    if (s->method != KV_STREAMING) s->reindex = false;
    bool storage = s->think || s->kivi_bits || s->mikv_low;
    if (s->kivi_bits && s->mikv_low)
        return bad(spec, "kivi and mikv both set the precision of older entries; give one%s%s", "", "");
    if (s->kivi_bits && !s->resid_given) /* the default window, in whole groups */
        s->kivi_resid = (s->kivi_resid + s->kivi_group - 1) / s->kivi_group * s->kivi_group;
    if (s->mikv_low && s->mem_bytes)
        return bad(spec, "mikv keeps every token (the losers at low precision), so mem= cannot "
                   "bound it; give budget= or ratio=%s%s", "", "");
    if (s->kivi_bits && s->kivi_resid % s->kivi_group)
        return bad(spec, "kivi resid must be a multiple of group%s%s", "", "");
    if (s->reindex && (storage || s->merge))
        return bad(spec, "streaming with pos=cache re-rotates keys, which %s entries cannot be; "
                   "give pos=abs%s", storage ? "packed or quantized" : "merged", "");
    if (s->method == KV_FULL) {
        if (s->mikv_low) return bad(spec, "mikv needs a method that ranks entries, e.g. "
                                    "h2o:ratio=0.2+mikv:low=2%s%s", "", "");
        snprintf(s->text, sizeof s->text, "%s", storage ? spec : "full");
        return KVS_OK;
    }
    int n_budget = (s->budget > 0) + (s->ratio > 0) + (s->mem_bytes > 0);
    if (s->method == KV_AGATE) {
        if (storage || s->merge != KV_MERGE_NONE || (s->alloc != KV_ALLOC_UNIFORM && s->alloc != KV_ALLOC_PYRAMID))
            return bad(spec, "agate evicts by its gate's flags: it takes no storage parts, merge= or "
                       "alloc=adakv|d2o yet%s%s", "", "");
        if (n_budget == 0) s->ratio = 1.0f, n_budget = 1; /* the flags alone */
    }
    if (s->method == KV_STREAMING && n_budget == 0 && s->window > 0) {
        s->budget = s->sinks + s->window;
        n_budget = 1;
    }
    if (n_budget != 1)
        return bad(spec, "give exactly one of budget=N, ratio=R or mem=BYTES%s%s",
                   s->method == KV_STREAMING && n_budget == 0
                       ? " (streaming also takes window=W alone: the budget is then sinks + W, "
                         "e.g. streaming:sinks=4,window=1020)" : "", "");
    if (s->method == KV_STREAMING && s->window > 0 && s->budget > 0 && s->window + s->sinks != s->budget)
        return bad(spec, "streaming: sinks + window must equal budget%s%s", "", "");
    if (s->method == KV_LOCRET && (s->merge != KV_MERGE_NONE || s->alloc == KV_ALLOC_D2O))
        return bad(spec, "locret's scores are learned logits, not attention: they cannot be merged "
                   "or drive alloc=d2o (give merge=none and another alloc)%s%s", "", "");
    if (s->obs_window < 0 && s->method != KV_LOCRET && s->method != KV_AGATE) s->obs_window = s->method == KV_SNAPKV ? 32 : 0;
    if (s->method == KV_TOVA && s->obs_window == 0) s->obs_window = 1;
    if (isnan(s->thr))
        s->thr = s->merge == KV_MERGE_KVMERGER ? 0.75f : s->merge == KV_MERGE_EMS ? 0.5f : NAN;
    snprintf(s->text, sizeof s->text, "%s", spec);
    return KVS_OK;
}
