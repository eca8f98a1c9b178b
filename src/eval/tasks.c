/* tasks.c — see tasks.h. */
#include "eval/tasks.h"
#include "eval/jsonl.h"
#include "base.h"

#include <ctype.h>
#include <dirent.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---- small helpers ----------------------------------------------------------------------- */

struct sbuf { char *p; size_t n, cap; bool oom; };

static void sb_putn(struct sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (b->n + n + 1 > cap) cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) { b->oom = true; return; }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void sb_puts(struct sbuf *b, const char *s) { sb_putn(b, s, strlen(s)); }
static void sb_printf(struct sbuf *b, const char *fmt, ...) {
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) sb_putn(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}
static char *sb_take(struct sbuf *b) {
    if (b->oom) { free(b->p); return NULL; }
    if (!b->p) return strdup("");
    char *p = b->p;
    b->p = NULL;
    b->n = b->cap = 0;
    return p;
}

/* splitmix64: the generator's only source of randomness */
static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static uint32_t rng_below(uint64_t *s, uint32_t n) { return (uint32_t)(rng_next(s) % n); }
static double rng_unit(uint64_t *s) { return (double)(rng_next(s) >> 11) / 9007199254740992.0; }
/* Fisher-Yates shuffle of n ints, from the generator state r */
static void shuffle(int *a, int n, uint64_t r) {
    for (int i = n - 1; i > 0; i--) {
        int j = (int)rng_below(&r, (uint32_t)i + 1), x = a[i];
        a[i] = a[j];
        a[j] = x;
    }
}

static uint64_t hash_str(uint64_t h, const char *s) {
    while (*s) h = (h ^ (unsigned char)*s++) * 0x100000001b3ull;
    return h;
}

/* ---- word lists (ours) --------------------------------------------------------------------- */

static const char *const ADJ[] = {
    "amber", "ancient", "bitter", "bold", "brave", "breezy", "bright", "brisk", "calm", "careful",
    "cheerful", "chilly", "clever", "cloudy", "cosy", "crimson", "curious", "dusty", "eager",
    "early", "elegant", "faint", "fancy", "fierce", "fluffy", "fragile", "frosty", "gentle",
    "giant", "gleaming", "golden", "graceful", "grumpy", "hidden", "hollow", "humble", "icy",
    "idle", "jolly", "keen", "lively", "lonely", "lucky", "mellow", "misty", "modest", "muddy",
    "narrow", "nimble", "noisy", "odd", "pale", "patient", "polite", "proud", "quiet", "rapid",
    "rare", "restless", "rosy", "rough", "rusty", "salty", "scarlet", "shaggy", "shiny", "silent",
    "silver", "slender", "sleepy", "smooth", "snowy", "soft", "sour", "spicy", "steady", "sticky",
    "stormy", "sturdy", "sunny", "swift", "tame", "tender", "tidy", "tiny", "velvet", "vivid",
    "warm", "wary", "wild", "windy", "wise", "witty", "wooden", "young", "zealous",
};
static const char *const NOUN[] = {
    "acorn", "anchor", "apple", "arrow", "badger", "bakery", "balloon", "banjo", "barrel",
    "basket", "beacon", "bicycle", "blanket", "bottle", "bridge", "bucket", "butter", "cabin",
    "cactus", "camera", "candle", "canoe", "carpet", "castle", "cellar", "chimney", "circus",
    "clock", "cobbler", "comet", "compass", "cottage", "crayon", "cricket", "cushion", "dagger",
    "desert", "diamond", "dolphin", "donkey", "dragon", "drum", "eagle", "engine", "falcon",
    "feather", "fiddle", "forest", "fountain", "garden", "garlic", "glacier", "goblet", "harbor",
    "harp", "helmet", "hermit", "hammock", "island", "jacket", "kettle", "kitten", "ladder",
    "lantern", "lemon", "library", "lizard", "magnet", "mango", "meadow", "mirror", "mitten",
    "monkey", "needle", "noodle", "oyster", "paddle", "parrot", "pebble", "pepper", "piano",
    "pillow", "pirate", "planet", "pocket", "potato", "puddle", "pumpkin", "quilt", "rabbit",
    "radish", "raven", "ribbon", "river", "rocket", "saddle", "sailor", "sandal", "scarf",
    "shovel", "spider", "sponge", "squirrel", "statue", "stove", "teapot", "thimble", "ticket",
    "tiger", "tomato", "tower", "trumpet", "tulip", "turtle", "umbrella", "valley", "violin",
    "wagon", "walnut", "whistle", "window", "wizard", "yacht", "zebra",
};
enum { N_ADJ = sizeof ADJ / sizeof ADJ[0], N_NOUN = sizeof NOUN / sizeof NOUN[0] };

/* RULER's noise haystack is a repeated block of plain sentences; this is ours */
static const char NOISE[] = "The grass is green. The sky is blue. The sun is yellow. Here we go. "
                            "There and back again. ";

/* ---- hand-written questions about passages of the novels ------------------------------- */

struct qa_item { const char *novel, *anchor, *question, *answers[3]; };
static const struct qa_item QA[] = {
    {"prideprejudice", "Netherfield Park is let at last",
     "According to Mrs. Bennet, which place has been let at last?", {"Netherfield"}},
    {"prideprejudice", "large fortune from the north of England",
     "On which day did the young man come down to see Netherfield?", {"Monday"}},
    {"prideprejudice", "large fortune from the north of England",
     "Before which feast is the young man to take possession of Netherfield?", {"Michaelmas"}},
    {"prideprejudice", "large fortune from the north of England",
     "With whom did the young man agree immediately?", {"Morris"}},
    {"prideprejudice", "four or five thousand a year",
     "How much a year does the single man of large fortune have?", {"four or five thousand"}},
    {"emma", "nearly twenty-one years",
     "For how many years had Emma Woodhouse lived in the world?", {"twenty-one", "21"}},
    {"sensesensibility", "long been settled in Sussex",
     "In which county had the family of Dashwood long been settled?", {"Sussex"}},
    {"sensesensibility", "long been settled in Sussex",
     "What was the name of the Dashwood family's residence?", {"Norland"}},
    {"persuasion", "never took up any book but the Baronetage",
     "Which book did Sir Walter Elliot take up for his own amusement?", {"Baronetage"}},
    {"persuasion", "never took up any book but the Baronetage",
     "Of which hall was Sir Walter Elliot?", {"Kellynch"}},
    {"northangerabbey", "in her infancy would have supposed",
     "What was the profession of Catherine Morland's father?", {"clergyman"}},
    {"northangerabbey", "in her infancy would have supposed",
     "What was the first name of Catherine Morland's father?", {"Richard"}},
    {"mansfieldpark", "with only seven thousand pounds",
     "How many pounds did Miss Maria Ward have?", {"seven thousand", "7,000", "7000"}},
    {"mansfieldpark", "with only seven thousand pounds",
     "Whom did Miss Maria Ward captivate?", {"Thomas Bertram"}},
    {"mansfieldpark", "with only seven thousand pounds",
     "In which county is Mansfield Park?", {"Northampton"}},
};
enum { N_QA = sizeof QA / sizeof QA[0] };

/* ---- corpus ---------------------------------------------------------------------------------- */

static const char *const NOVELS[] = {"emma", "mansfieldpark", "northangerabbey", "persuasion",
                                     "prideprejudice", "sensesensibility"};
enum { N_NOVELS = 6 };

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

void eval_corpus_free(struct eval_corpus *c) {
    for (int d = 0; d < c->n_docs; d++) {
        for (int i = 0; i < c->n_paras[d]; i++) free(c->paras[d][i]);
        free(c->paras[d]);
        free(c->names[d]);
    }
    for (int i = 0; i < c->n_vocab; i++) free(c->vocab[i]);
    free(c->vocab);
    memset(c, 0, sizeof *c);
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    struct sbuf b = {0};
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) sb_putn(&b, buf, n);
    fclose(f);
    *len = b.n;
    return sb_take(&b);
}

enum kvs_status eval_corpus_load(const char *dir, struct eval_corpus *c) {
    memset(c, 0, sizeof *c);
    for (int d = 0; d < N_NOVELS; d++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s.txt", dir, NOVELS[d]);
        size_t len;
        char *t = read_file(path, &len);
        if (!t) {
            eval_corpus_free(c);
            return kvs_fail(KVS_ERR_IO, "cannot read %s (the novels come from `make data`)",
                            path);
        }
        /* paragraphs: runs of non-blank lines, whitespace collapsed to single spaces */
        int cap = 256, n = 0;
        char **ps = malloc((size_t)cap * sizeof *ps);
        struct sbuf p = {0};
        size_t i = 0;
        while (ps && i <= len) {
            size_t e = i;
            while (e < len && t[e] != '\n') e++;
            bool blank = true;
            for (size_t k = i; k < e; k++)
                if (!isspace((unsigned char)t[k])) blank = false;
            if (!blank) {
                for (size_t k = i; k < e; k++) {
                    char ch = isspace((unsigned char)t[k]) ? ' ' : t[k];
                    if (ch == ' ' && (p.n == 0 || p.p[p.n - 1] == ' ')) continue;
                    sb_putn(&p, &ch, 1);
                }
                if (p.n && p.p[p.n - 1] != ' ') sb_putn(&p, " ", 1);
            }
            if ((blank || e >= len) && p.n > 0) {
                while (p.n && p.p[p.n - 1] == ' ') p.p[--p.n] = 0;
                if (n == cap) {
                    char **q = realloc(ps, (size_t)(cap *= 2) * sizeof *ps);
                    if (!q) break;
                    ps = q;
                }
                ps[n++] = sb_take(&p);
            }
            i = e + 1;
        }
        free(p.p);
        free(t);
        c->names[d] = strdup(NOVELS[d]);
        c->paras[d] = ps;
        c->n_paras[d] = n;
        c->n_docs = d + 1;
        if (!ps || !c->names[d]) {
            eval_corpus_free(c);
            return kvs_fail(KVS_ERR_NOMEM, "out of memory");
        }
    }
    /* vocabulary for cwe: distinct lower-case words of 4..10 letters */
    int cap = 4096, n = 0;
    char **v = malloc((size_t)cap * sizeof *v);
    for (int d = 0; d < c->n_docs && v; d++)
        for (int i = 0; i < c->n_paras[d] && v; i++) {
            const char *s = c->paras[d][i];
            while (*s) {
                while (*s && !isalpha((unsigned char)*s)) s++;
                const char *w = s;
                bool lower = true;
                while (isalpha((unsigned char)*s)) {
                    if (!islower((unsigned char)*s)) lower = false;
                    s++;
                }
                size_t L = (size_t)(s - w);
                if (!lower || L < 4 || L > 10 || (*s && (unsigned char)*s >= 0x80)) continue;
                if (n == cap) {
                    char **q = realloc(v, (size_t)(cap *= 2) * sizeof *v);
                    if (!q) { free(v); v = NULL; break; }
                    v = q;
                }
                v[n++] = strndup(w, L);
            }
        }
    if (!v) {
        eval_corpus_free(c);
        return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    }
    qsort(v, (size_t)n, sizeof *v, cmp_str);
    int u = 0;
    for (int i = 0; i < n; i++) {
        if (u > 0 && !strcmp(v[u - 1], v[i])) { free(v[i]); continue; }
        v[u++] = v[i];
    }
    c->vocab = v;
    c->n_vocab = u;
    return KVS_OK;
}

/* ---- task table ------------------------------------------------------------------------ */

enum haystack { HAY_NOISE, HAY_NOVEL, HAY_NEEDLES };
enum value_kind { VAL_NUMBER, VAL_UUID };

struct task_def {
    const char *name, *family;
    int kind; /* 0 niah, 1 vt, 2 cwe, 3 fwe, 4 qa */
    enum haystack hay;
    enum value_kind key_kind, val_kind; /* keys: VAL_NUMBER means adjective-noun words */
    int n_keys, n_values, n_queries;
    int max_new_tokens;
};
static const struct task_def TASKS[] = {
    {"niah_single_1", "niah", 0, HAY_NOISE, VAL_NUMBER, VAL_NUMBER, 1, 1, 1, 32},
    {"niah_single_2", "niah", 0, HAY_NOVEL, VAL_NUMBER, VAL_NUMBER, 1, 1, 1, 32},
    {"niah_single_3", "niah", 0, HAY_NOVEL, VAL_NUMBER, VAL_UUID, 1, 1, 1, 64},
    {"niah_multikey_1", "niah_multi", 0, HAY_NOVEL, VAL_NUMBER, VAL_NUMBER, 4, 1, 1, 32},
    {"niah_multikey_2", "niah_multi", 0, HAY_NEEDLES, VAL_NUMBER, VAL_NUMBER, 1, 1, 1, 32},
    {"niah_multikey_3", "niah_multi", 0, HAY_NEEDLES, VAL_UUID, VAL_UUID, 1, 1, 1, 64},
    {"niah_multivalue", "niah_multi", 0, HAY_NOVEL, VAL_NUMBER, VAL_NUMBER, 1, 4, 1, 64},
    {"niah_multiquery", "niah_multi", 0, HAY_NOVEL, VAL_NUMBER, VAL_NUMBER, 4, 1, 4, 64},
    {"vt", "vt", 1, HAY_NOISE, 0, 0, 0, 0, 0, 32},
    {"cwe", "aggregation", 2, HAY_NOISE, 0, 0, 0, 0, 0, 64},
    {"fwe", "aggregation", 3, HAY_NOISE, 0, 0, 0, 0, 0, 32},
    {"qa", "qa", 4, HAY_NOVEL, 0, 0, 0, 0, 0, 32},
};
enum { N_TASKS = sizeof TASKS / sizeof TASKS[0] };

const char *const eval_task_names[] = {
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
    "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa", NULL};

static const struct task_def *find_task(const char *name) {
    for (int i = 0; i < N_TASKS; i++)
        if (!strcmp(TASKS[i].name, name)) return &TASKS[i];
    return NULL;
}
const char *eval_task_family(const char *task) {
    const struct task_def *t = find_task(task);
    return t ? t->family : NULL;
}
bool eval_task_needs_corpus(const char *task) {
    const struct task_def *t = find_task(task);
    return t && (t->hay == HAY_NOVEL || t->kind == 2);
}

/* ---- random pieces ---------------------------------------------------------------------- */

static void make_word_key(uint64_t *r, char *out, size_t n) {
    snprintf(out, n, "%s-%s", ADJ[rng_below(r, N_ADJ)], NOUN[rng_below(r, N_NOUN)]);
}
static void make_number(uint64_t *r, char *out, size_t n, int digits) {
    uint32_t lo = 1, hi;
    for (int i = 1; i < digits; i++) lo *= 10;
    hi = lo * 10;
    snprintf(out, n, "%u", lo + rng_below(r, hi - lo));
}
static void make_uuid(uint64_t *r, char *out, size_t n) {
    uint64_t a = rng_next(r), b = rng_next(r);
    snprintf(out, n, "%08x-%04x-%04x-%04x-%012llx", (unsigned)(a >> 32), (unsigned)(a >> 16) & 0xffff,
             (unsigned)a & 0xffff, (unsigned)(b >> 48), (unsigned long long)(b & 0xffffffffffffull));
}
static void make_value(uint64_t *r, enum value_kind k, char *out, size_t n) {
    if (k == VAL_UUID) make_uuid(r, out, n);
    else make_number(r, out, n, 7);
}
static void make_key(uint64_t *r, enum value_kind k, char *out, size_t n) {
    if (k == VAL_UUID) make_uuid(r, out, n);
    else make_word_key(r, out, n);
}

/* ---- generation ------------------------------------------------------------------------- */

/* Everything random about one prompt, drawn before fitting its length, so that the text for n
 * haystack units is a pure function of (this, n). */
struct plan {
    const struct task_def *t;
    uint64_t seed;        /* for draws that depend on n (shuffles) */
    /* niah */
    char keys[8][64], vals[8][4][64];
    int n_needles;        /* needles placed (key index, value index) */
    int nk[32], nv[32];
    double depth[32];
    const char *type_v;   /* "numbers" or "UUIDs" */
    /* novel haystack: start paragraph */
    int doc, para;
    int extra_words;      /* words of one more paragraph after the n units (fine length fit) */
    /* vt */
    char vars[5][8];
    char vt_value[8];
    /* cwe */
    int cw_idx[10], freq_cw, freq_ucw, vocab_off;
    /* fwe */
    char coded[200][8];
    /* qa */
    int qa, gold_doc, gold_para, n_gold;
};

static int n_units_guess(const struct plan *pl, int budget) {
    switch (pl->t->kind) {
    case 2: return budget / 4;
    case 3: return budget; /* C: count of the top word; the total is ~1.64 C words */
    case 4: return budget / 60;
    default: break;
    }
    if (pl->t->hay == HAY_NEEDLES) return budget / 24;
    if (pl->t->hay == HAY_NOISE) return budget / 25;
    return budget / 28; /* sentences of a novel, as paragraph pieces */
}

/* append paragraph text of the novel haystack, unit = one paragraph */
static const char *novel_para(const struct eval_corpus *c, int doc, int para, int i) {
    int d = doc, p = para + i;
    while (p >= c->n_paras[d]) {
        p -= c->n_paras[d];
        d = (d + 1) % c->n_docs;
    }
    return c->paras[d][p];
}

static void put_needle(struct sbuf *b, const struct plan *pl, int i) {
    sb_printf(b, "One of the special magic %s for %s is: %s. ", pl->type_v, pl->keys[pl->nk[i]],
              pl->vals[pl->nk[i]][pl->nv[i]]);
}

/* the raw context text for n haystack units */
static char *build_context(const struct plan *pl, const struct eval_corpus *c, int n) {
    struct sbuf b = {0};
    const struct task_def *t = pl->t;
    if (t->kind == 0) {
        sb_printf(&b, "Some special magic %s are hidden within the following text. Make sure to "
                  "memorize it. I will quiz you about the %s afterwards.\n", pl->type_v, pl->type_v);
        uint64_t r = pl->seed ^ 0x51ed;
        for (int u = 0; u <= n; u++) {
            for (int i = 0; i < pl->n_needles; i++)
                if ((int)(pl->depth[i] * n) == u) put_needle(&b, pl, i);
            if (u == n) {
                if (t->hay == HAY_NOVEL && pl->extra_words > 0) {
                    const char *s = novel_para(c, pl->doc, pl->para, n), *e = s;
                    for (int w = 0; *e && w < pl->extra_words; w++) {
                        while (*e == ' ') e++;
                        while (*e && *e != ' ') e++;
                    }
                    sb_putn(&b, s, (size_t)(e - s));
                    sb_puts(&b, "\n");
                }
                break;
            }
            if (t->hay == HAY_NOISE) sb_puts(&b, NOISE);
            else if (t->hay == HAY_NOVEL) {
                sb_puts(&b, novel_para(c, pl->doc, pl->para, u));
                sb_puts(&b, "\n");
            } else { /* distractor needles with fresh keys */
                char k[64], v[64];
                make_key(&r, t->key_kind, k, sizeof k);
                make_value(&r, t->val_kind, v, sizeof v);
                bool clash = false;
                for (int j = 0; j < t->n_keys; j++) clash |= !strcmp(k, pl->keys[j]);
                if (clash) continue;
                sb_printf(&b, "One of the special magic %s for %s is: %s. ", pl->type_v, k, v);
            }
        }
        sb_puts(&b, "\n");
    } else if (t->kind == 1) {
        sb_puts(&b, "Memorize and track the chain(s) of variable assignment hidden in the "
                    "following text.\n\n");
        for (int u = 0; u <= n; u++) {
            for (int i = 0; i < 5; i++)
                if ((int)(pl->depth[i] * n) == u) {
                    if (i == 0) sb_printf(&b, "VAR %s = %s. ", pl->vars[0], pl->vt_value);
                    else sb_printf(&b, "VAR %s = VAR %s. ", pl->vars[i], pl->vars[i - 1]);
                }
            if (u < n) sb_puts(&b, NOISE);
        }
        sb_puts(&b, "\n");
    } else if (t->kind == 2) {
        /* n list items: each common word freq_cw times, the rest uncommon words freq_ucw times */
        int n_cw_items = 10 * pl->freq_cw;
        int n_ucw = n > n_cw_items ? (n - n_cw_items) / pl->freq_ucw : 0;
        int total = n_cw_items + n_ucw * pl->freq_ucw;
        int *items = malloc((size_t)(total > 0 ? total : 1) * sizeof *items);
        if (!items) return NULL;
        int k = 0;
        for (int i = 0; i < 10; i++)
            for (int j = 0; j < pl->freq_cw; j++) items[k++] = pl->cw_idx[i];
        for (int i = 0, got = 0; got < n_ucw; i++) {
            int w = (pl->vocab_off + i * 7919) % c->n_vocab;
            bool common = false;
            for (int j = 0; j < 10; j++) common |= w == pl->cw_idx[j];
            if (common) continue;
            for (int j = 0; j < pl->freq_ucw; j++) items[k++] = w;
            got++;
        }
        shuffle(items, total, pl->seed ^ 0xc0e);
        sb_puts(&b, "Below is a numbered list of words. In these words, some appear more often "
                    "than others. Memorize the ones that appear most often.\n");
        for (int i = 0; i < total; i++) sb_printf(&b, "%d. %s\n", i + 1, c->vocab[items[i]]);
        free(items);
    } else if (t->kind == 3) {
        /* word i (rank i+1) appears floor(n / (i+1)^2) times */
        int total = 0;
        for (int i = 0; i < 200; i++) total += n / ((i + 1) * (i + 1));
        int *items = malloc((size_t)(total > 0 ? total : 1) * sizeof *items), k = 0;
        if (!items) return NULL;
        for (int i = 0; i < 200; i++)
            for (int j = 0; j < n / ((i + 1) * (i + 1)); j++) items[k++] = i;
        shuffle(items, total, pl->seed ^ 0xf3e);
        sb_puts(&b, "Read the following coded text and track the frequency of each coded word. "
                    "Find the three most frequently appeared coded words.\n");
        for (int i = 0; i < total; i++) {
            sb_puts(&b, pl->coded[items[i]]);
            sb_puts(&b, (i + 1) % 20 == 0 ? "\n" : " ");
        }
        sb_puts(&b, "\n");
        free(items);
    } else {
        /* qa: n distractor documents from the other novels, the gold passage at its depth */
        sb_puts(&b, "Answer the question based on the given documents. Only give me the answer "
                    "and do not output any other words.\n\nThe following are given documents.\n\n");
        int gold_at = (int)(pl->depth[0] * n), docno = 1;
        uint64_t r = pl->seed ^ 0x9a;
        for (int u = 0; u <= n; u++) {
            if (u == gold_at) {
                sb_printf(&b, "Document %d:\n", docno++);
                /* at most 250 words in all (every anchor is in its paragraph's first 60) */
                for (int i = 0, words = 0; i < pl->n_gold && words < 250; i++) {
                    const char *s = c->paras[pl->gold_doc][pl->gold_para + i], *e = s;
                    for (; *e && words < 250; words++) {
                        while (*e == ' ') e++;
                        while (*e && *e != ' ') e++;
                    }
                    sb_putn(&b, s, (size_t)(e - s));
                    sb_puts(&b, "\n");
                }
                sb_puts(&b, "\n");
            }
            if (u == n) break;
            /* a distractor: consecutive paragraphs (>= 60 words) of another novel */
            int d = (int)rng_below(&r, (uint32_t)c->n_docs - 1);
            if (d >= pl->gold_doc) d++;
            int p = (int)rng_below(&r, (uint32_t)c->n_paras[d]), words = 0;
            sb_printf(&b, "Document %d:\n", docno++);
            for (; p < c->n_paras[d] && words < 60; p++) {
                /* at most 200 words of one paragraph */
                const char *s = c->paras[d][p], *e = s;
                for (int w = 0; *e && w < 200; w++, words++) {
                    while (*e == ' ') e++;
                    while (*e && *e != ' ') e++;
                }
                sb_putn(&b, s, (size_t)(e - s));
                sb_puts(&b, "\n");
            }
            sb_puts(&b, "\n");
        }
    }
    return sb_take(&b);
}

static int tokenize_len(const kvs_model *m, const char *s, bool bos) {
    int n = kvs_tokenize(m, s, strlen(s), bos, true, NULL, 0);
    return n < 0 ? -n : n;
}

static int32_t *tokenize_dup(const kvs_model *m, const char *s, bool bos, int *n_out) {
    int n = tokenize_len(m, s, bos);
    int32_t *t = malloc((size_t)(n + 1) * sizeof *t);
    if (!t) return NULL;
    *n_out = kvs_tokenize(m, s, strlen(s), bos, true, t, n + 1);
    return t;
}

/* chat-template split as kvpress makes it: template(context + SEP) = prompt_context SEP suffix */
static enum kvs_status template_split(const kvs_model *m, const char *context, char **pc,
                                      char **suffix) {
    static const char SEP[] = "\x01kvsieve-split\x01";
    struct sbuf b = {0};
    sb_puts(&b, context);
    sb_puts(&b, SEP);
    char *content = sb_take(&b);
    if (!content) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    struct kvs_chat_msg msg = {"user", content};
    size_t need = kvs_chat_apply(m, &msg, 1, true, NULL, 0);
    char *full = malloc(need + 1);
    if (!full) { free(content); return kvs_fail(KVS_ERR_NOMEM, "out of memory"); }
    kvs_chat_apply(m, &msg, 1, true, full, need + 1);
    free(content);
    char *at = strstr(full, SEP);
    if (!at) { free(full); return kvs_fail(KVS_ERR_INTERNAL, "chat template lost the split"); }
    *at = 0;
    *pc = full;
    *suffix = strdup(at + sizeof SEP - 1);
    return *suffix ? KVS_OK : kvs_fail(KVS_ERR_NOMEM, "out of memory");
}

/* tokens of the templated context part for n haystack units */
static enum kvs_status context_tokens(const kvs_model *m, const struct plan *pl,
                                      const struct eval_corpus *c, int n, int *n_tokens) {
    char *ctx = build_context(pl, c, n), *p = NULL, *sfx = NULL;
    if (!ctx) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    enum kvs_status st = template_split(m, ctx, &p, &sfx);
    free(ctx);
    free(sfx);
    if (st == KVS_OK) *n_tokens = tokenize_len(m, p, true);
    free(p);
    return st;
}

enum kvs_status eval_prompt_prepare(const kvs_model *m, struct eval_prompt *p) {
    free(p->prompt_context);
    free(p->prompt_question);
    free(p->tok_context);
    free(p->tok_question);
    p->prompt_context = p->prompt_question = NULL;
    p->tok_context = p->tok_question = NULL;
    p->n_tok_context = p->n_tok_question = 0;
    /* as eval_task_make: the question part is the question, the template's suffix for an empty
     * context and the answer prefix; the context part is the template applied to the context */
    char *pc = NULL, *suffix = NULL;
    enum kvs_status st = template_split(m, "", &pc, &suffix);
    free(pc);
    pc = NULL;
    if (st == KVS_OK) {
        struct sbuf b = {0};
        sb_puts(&b, p->question);
        sb_puts(&b, suffix);
        sb_puts(&b, p->answer_prefix);
        p->prompt_question = sb_take(&b);
        if (!p->prompt_question) st = kvs_fail(KVS_ERR_NOMEM, "out of memory");
    }
    if (st == KVS_OK) st = template_split(m, p->context, &p->prompt_context, &pc);
    free(pc);
    free(suffix);
    if (st == KVS_OK) {
        p->tok_context = tokenize_dup(m, p->prompt_context, true, &p->n_tok_context);
        p->tok_question = tokenize_dup(m, p->prompt_question, false, &p->n_tok_question);
        if (!p->tok_context || !p->tok_question) st = kvs_fail(KVS_ERR_NOMEM, "out of memory");
        else if (p->n_tok_context < 0 || p->n_tok_question < 0)
            st = kvs_fail(KVS_ERR_INTERNAL, "%s: tokenizer failed", p->id);
    }
    return st;
}

static int find_para(const struct eval_corpus *c, const char *novel, const char *anchor, int *doc) {
    for (int d = 0; d < c->n_docs; d++) {
        if (strcmp(c->names[d], novel)) continue;
        *doc = d;
        for (int i = 0; i < c->n_paras[d]; i++)
            if (strstr(c->paras[d][i], anchor)) return i;
    }
    return -1;
}

enum kvs_status eval_task_make(const kvs_model *m, const struct eval_corpus *c, const char *task,
                               int length, uint64_t seed, int sample, struct eval_prompt *out) {
    memset(out, 0, sizeof *out);
    const struct task_def *t = find_task(task);
    if (!t) return kvs_fail(KVS_ERR_INVALID_ARG, "unknown task '%s'", task);
    if (eval_task_needs_corpus(task) && (!c || c->n_docs == 0))
        return kvs_fail(KVS_ERR_INVALID_ARG, "task %s needs the novels (`make data`)", task);
    struct plan *pl = calloc(1, sizeof *pl);
    if (!pl) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    pl->t = t;
    uint64_t r = hash_str(hash_str(0xcbf29ce484222325ull, task), "/") ^
                 (seed * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)length << 20) ^ (uint64_t)sample;
    rng_next(&r);
    pl->seed = rng_next(&r);
    struct sbuf q = {0}, ap = {0};
    char **outs = out->outputs;
    int n_out = 0;
    if (t->kind == 0) {
        pl->type_v = t->val_kind == VAL_UUID ? "UUIDs" : "numbers";
        for (int k = 0; k < t->n_keys; k++) {
            bool dup;
            do {
                make_key(&r, t->key_kind, pl->keys[k], sizeof pl->keys[k]);
                dup = false;
                for (int j = 0; j < k; j++) dup |= !strcmp(pl->keys[j], pl->keys[k]);
            } while (dup);
            for (int v = 0; v < t->n_values; v++) make_value(&r, t->val_kind, pl->vals[k][v], 64);
        }
        for (int k = 0; k < t->n_keys; k++)
            for (int v = 0; v < t->n_values; v++) {
                pl->nk[pl->n_needles] = k;
                pl->nv[pl->n_needles] = v;
                pl->depth[pl->n_needles++] = rng_unit(&r);
            }
        int nq = t->n_queries;
        char qkeys[512] = "";
        for (int i = 0; i < nq; i++) {
            size_t L = strlen(qkeys);
            snprintf(qkeys + L, sizeof qkeys - L, "%s%s%s",
                     i == 0 ? "" : i == nq - 1 ? (nq > 2 ? ", and " : " and ") : ", ",
                     pl->keys[i], "");
            for (int v = 0; v < t->n_values; v++) outs[n_out++] = strdup(pl->vals[i][v]);
        }
        sb_printf(&q, "What are all the special magic %s for %s mentioned in the provided text?",
                  pl->type_v, qkeys);
        sb_printf(&ap, " The special magic %s for %s mentioned in the provided text are", pl->type_v,
                  qkeys);
    } else if (t->kind == 1) {
        for (int i = 0; i < 5; i++) {
            bool dup;
            do {
                for (int j = 0; j < 5; j++) pl->vars[i][j] = (char)('A' + rng_below(&r, 26));
                pl->vars[i][5] = 0;
                dup = false;
                for (int j = 0; j < i; j++) dup |= !strcmp(pl->vars[i], pl->vars[j]);
            } while (dup);
            outs[n_out++] = strdup(pl->vars[i]);
        }
        make_number(&r, pl->vt_value, sizeof pl->vt_value, 5);
        /* the chain in text order: sorted depths */
        for (int i = 0; i < 5; i++) pl->depth[i] = rng_unit(&r);
        for (int i = 1; i < 5; i++)
            for (int j = i; j > 0 && pl->depth[j] < pl->depth[j - 1]; j--) {
                double x = pl->depth[j];
                pl->depth[j] = pl->depth[j - 1];
                pl->depth[j - 1] = x;
            }
        sb_printf(&q, "Question: Find all variables that are assigned the value %s in the text "
                  "above.", pl->vt_value);
        sb_printf(&ap, " Answer: According to the chain(s) of variable assignment in the text "
                  "above, 5 variables are assigned the value %s, they are:", pl->vt_value);
    } else if (t->kind == 2) {
        int cap = n_units_guess(pl, length);
        pl->freq_cw = cap / 40 < 3 ? 3 : cap / 40 > 30 ? 30 : cap / 40;
        pl->freq_ucw = pl->freq_cw >= 9 ? 3 : 1;
        pl->vocab_off = (int)rng_below(&r, (uint32_t)c->n_vocab);
        for (int i = 0; i < 10; i++) {
            bool dup;
            do {
                pl->cw_idx[i] = (int)rng_below(&r, (uint32_t)c->n_vocab);
                dup = false;
                for (int j = 0; j < i; j++) dup |= pl->cw_idx[i] == pl->cw_idx[j];
            } while (dup);
            outs[n_out++] = strdup(c->vocab[pl->cw_idx[i]]);
        }
        sb_puts(&q, "Question: What are the 10 most common words in the above list?");
        sb_puts(&ap, " Answer: The top 10 words that appear most often in the list are:");
    } else if (t->kind == 3) {
        for (int i = 0; i < 200; i++) {
            bool dup;
            do {
                int L = 3 + (int)rng_below(&r, 4);
                for (int j = 0; j < L; j++) pl->coded[i][j] = (char)('a' + rng_below(&r, 26));
                pl->coded[i][L] = 0;
                dup = false;
                for (int j = 0; j < i; j++) dup |= !strcmp(pl->coded[i], pl->coded[j]);
            } while (dup);
        }
        for (int i = 0; i < 3; i++) outs[n_out++] = strdup(pl->coded[i]);
        sb_puts(&q, "Question: Do not provide any explanation. What are the three most "
                    "frequently appeared words in the above coded text?");
        sb_puts(&ap, " Answer: According to the coded text above, the three most frequently "
                     "appeared words are:");
    } else {
        pl->qa = (int)rng_below(&r, N_QA);
        const struct qa_item *it = &QA[pl->qa];
        pl->gold_para = find_para(c, it->novel, it->anchor, &pl->gold_doc);
        if (pl->gold_para < 0) {
            free(pl);
            return kvs_fail(KVS_ERR_INTERNAL, "qa passage '%s' not found in %s", it->anchor,
                            it->novel);
        }
        /* the gold passage: the anchor's paragraph and the next ones up to >= 60 words */
        int words = 0;
        pl->n_gold = 0;
        while (words < 60 && pl->gold_para + pl->n_gold < c->n_paras[pl->gold_doc]) {
            for (const char *s = c->paras[pl->gold_doc][pl->gold_para + pl->n_gold]; *s; s++)
                words += *s == ' ';
            words++;
            pl->n_gold++;
        }
        pl->depth[0] = rng_unit(&r);
        for (int i = 0; i < 3 && it->answers[i]; i++) outs[n_out++] = strdup(it->answers[i]);
        sb_printf(&q, "Answer the question based on the given documents. Only give me the answer "
                  "and do not output any other words.\n\nQuestion: %s", it->question);
        sb_puts(&ap, " Answer:");
    }
    if (t->hay == HAY_NOVEL && t->kind == 0) {
        pl->doc = (int)rng_below(&r, (uint32_t)c->n_docs);
        pl->para = (int)rng_below(&r, (uint32_t)c->n_paras[pl->doc]);
    }
    out->n_outputs = n_out;
    out->question = sb_take(&q);
    out->answer_prefix = sb_take(&ap);
    snprintf(out->task, sizeof out->task, "%s", t->name);
    snprintf(out->family, sizeof out->family, "%s", t->family);
    out->length = length;
    out->seed = seed;
    out->sample = sample;
    snprintf(out->id, sizeof out->id, "%s/%d/%llu/%d", t->name, length, (unsigned long long)seed,
             sample);
    out->metric = t->kind == 4 ? EVAL_METRIC_PART : EVAL_METRIC_ALL;
    out->max_new_tokens = t->max_new_tokens;
    /* one-line answers stop at a newline; list answers (several values) may span lines */
    out->stop_at_newline = (t->kind == 0 && t->n_values * t->n_queries == 1) || t->kind == 4;
    enum kvs_status st = KVS_OK;
    for (int i = 0; i < n_out; i++)
        if (!outs[i]) st = kvs_fail(KVS_ERR_NOMEM, "out of memory");
    if (!out->question || !out->answer_prefix) st = kvs_fail(KVS_ERR_NOMEM, "out of memory");

    /* fit: the largest n whose prompt leaves room for the answer */
    char *suffix = NULL, *pc = NULL;
    int q_tokens = 0;
    if (st == KVS_OK) {
        st = template_split(m, "", &pc, &suffix);
        free(pc);
        pc = NULL;
    }
    if (st == KVS_OK) {
        struct sbuf b = {0};
        sb_puts(&b, out->question);
        sb_puts(&b, suffix);
        sb_puts(&b, out->answer_prefix);
        out->prompt_question = sb_take(&b);
        if (!out->prompt_question) st = kvs_fail(KVS_ERR_NOMEM, "out of memory");
        else q_tokens = tokenize_len(m, out->prompt_question, false);
    }
    int budget = length - out->max_new_tokens - q_tokens;
    int lo = 0, hi = 2 * n_units_guess(pl, budget > 0 ? budget : 1) + 8, best = -1;
    while (st == KVS_OK && lo <= hi) {
        int mid = lo + (hi - lo) / 2, n;
        if ((st = context_tokens(m, pl, c, mid, &n)) != KVS_OK) break;
        if (n <= budget) { best = mid; lo = mid + 1; }
        else hi = mid - 1;
    }
    /* novel haystacks: then as many words of the next paragraph as still fit */
    if (st == KVS_OK && best >= 0 && t->kind == 0 && t->hay == HAY_NOVEL) {
        int wlo = 1, whi = 400, wbest = 0;
        while (st == KVS_OK && wlo <= whi) {
            pl->extra_words = wlo + (whi - wlo) / 2;
            int n;
            if ((st = context_tokens(m, pl, c, best, &n)) != KVS_OK) break;
            if (n <= budget) { wbest = pl->extra_words; wlo = pl->extra_words + 1; }
            else whi = pl->extra_words - 1;
        }
        pl->extra_words = wbest;
    }
    int min_units = t->kind == 3 ? 16 : t->kind == 2 ? 10 * pl->freq_cw : 1;
    if (st == KVS_OK && best < min_units)
        st = kvs_fail(KVS_ERR_INVALID_ARG, "length %d is too short for task %s", length, task);
    if (st == KVS_OK) {
        out->context = build_context(pl, c, best);
        if (!out->context) st = kvs_fail(KVS_ERR_NOMEM, "out of memory");
        else st = template_split(m, out->context, &out->prompt_context, &pc);
        free(pc);
    }
    if (st == KVS_OK) {
        out->tok_context = tokenize_dup(m, out->prompt_context, true, &out->n_tok_context);
        out->tok_question = tokenize_dup(m, out->prompt_question, false, &out->n_tok_question);
        if (!out->tok_context || !out->tok_question) st = kvs_fail(KVS_ERR_NOMEM, "out of memory");
    }
    free(suffix);
    free(pl);
    if (st != KVS_OK) eval_prompt_free(out);
    return st;
}

/* ---- scoring ------------------------------------------------------------------------------ */

static bool contains_ci(const char *hay, const char *needle) {
    size_t n = strlen(needle);
    if (n == 0) return true;
    for (; *hay; hay++)
        if (!strncasecmp(hay, needle, n)) return true;
    return false;
}

double eval_score(const struct eval_prompt *p, const char *answer) {
    if (p->n_outputs == 0) return 0.0;
    char *a = strdup(answer ? answer : "");
    if (!a) return 0.0;
    if (p->stop_at_newline) {
        char *s = a; /* the answer ends at a newline after its first letter or digit */
        while (*s && !isalnum((unsigned char)*s)) s++;
        char *nl = strchr(s, '\n');
        if (nl) *nl = 0;
    }
    int hit = 0;
    for (int i = 0; i < p->n_outputs; i++) hit += contains_ci(a, p->outputs[i]);
    free(a);
    if (p->metric == EVAL_METRIC_PART) return hit > 0 ? 1.0 : 0.0;
    return (double)hit / p->n_outputs;
}
