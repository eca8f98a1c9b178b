/* tokenizer.c — GPT-2 style byte-level BPE (see tokenizer.h).
 *
 * Encoding pipeline, matching the HF `tokenizers` definitions of the supported models:
 *   1. added tokens: the text is cut at occurrences of CONTROL (only when parse_special) and
 *      USER_DEFINED tokens, leftmost first, longest at equal start; they become their ids;
 *   2. normalizer (qwen2 only): Unicode NFC on the text between added tokens;
 *   3. pre-tokenizer: a hand-written matcher for the model's split regex (below);
 *   4. each pre-token's bytes go through BPE: start from one symbol per byte (the token of
 *      the byte's GPT-2 alphabet character), repeatedly merge the adjacent pair of lowest merge
 *      rank (leftmost on ties) until no pair has a rank.
 * Pre-tokenizers (the regexes are those of HF tokenizer.json / llama.cpp; "|" = first
 * alternative that matches at the current position, as in a backtracking regex engine):
 *   gpt2   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *   smollm Digits(individual_digits) then gpt2 on the text between digits (SmolLM2's
 *          tokenizer.json: Sequence[Digits(individual_digits=true), ByteLevel(use_regex)])
 *   qwen2  (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*
 *          |\s*[\r\n]+|\s+(?!\S)|\s+        plus an NFC normalizer
 *   llama3 as qwen2 with \p{N}{1,3}, no normalizer, and BPE ignore_merges (a pre-token that is
 *          itself a vocabulary entry is emitted whole).
 * Invalid UTF-8 in the input is tolerated: each bad byte is a character of its own that is
 * neither letter, number nor space; since BPE works on bytes, decode(encode(x)) == x always
 * (qwen2: == NFC(x)).
 * Everything built by tokenizer_init is read-only afterwards, so one tokenizer may be used from
 * several threads at once.
 */
#include "tokenizer.h"

#include <stdlib.h>
#include <string.h>

#include "unicode_tables.h"

enum pre_kind { PRE_GPT2, PRE_SMOLLM, PRE_QWEN2, PRE_LLAMA3 };

/* character class bits */
#define CL_L 1u   /* \p{L} */
#define CL_N 2u   /* \p{N} */
#define CL_WS 4u  /* \s */
#define CL_NL 8u  /* \r or \n */
#define CL_SP 16u /* U+0020 */

struct merge_slot { uint64_t key; int32_t rank; int32_t id; }; /* id < 0: empty */

struct special { const char *s; uint32_t len; int32_t id; bool control; };

struct tokenizer {
    int n_vocab;
    struct tok_str *tokens; /* own copy of the array; the bytes point into the caller's data */
    uint8_t *types;
    uint32_t *vocab_slots;  /* open addressing, id + 1, 0 = empty */
    uint32_t vocab_mask;
    struct merge_slot *merge_slots;
    uint32_t merge_mask;
    int32_t byte_tok[256];  /* token of each byte's alphabet character, -1 if none */
    char *pieces;           /* per token: raw bytes (byte-level alphabet undone) */
    uint32_t *piece_off;    /* n_vocab + 1 */
    struct special *specials; /* sorted by first byte, then longest first */
    int n_special;
    uint16_t sp_start[257];   /* specials with first byte b: [sp_start[b], sp_start[b+1]) */
    enum pre_kind pre;
    bool nfc, ignore_merges;
    int32_t bos_id, eos_id, eot_id, unk_id, pad_id;
    bool add_bos;
};

/* ---- GPT-2 bytes_to_unicode ------------------------------------------------------------ */

static bool byte_is_printable(int b) {
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

/* The byte's character: printable bytes stand for themselves; the other 68 bytes get
 * U+0100.. in increasing byte order. */
static uint32_t byte_to_cp(int b) {
    if (byte_is_printable(b)) return (uint32_t)b;
    uint32_t n = 0;
    for (int x = 0; x < b; x++) n += !byte_is_printable(x);
    return 256 + n;
}

/* ---- UTF-8 and character classes ------------------------------------------------------- */

#define CP_INVALID 0xFFFFFFFFu

/* Decodes one code point at s[i] (i < n). Strict: overlong forms, surrogates and values
 * above U+10FFFF are invalid; an invalid byte decodes as CP_INVALID with length 1. */
static inline uint32_t utf8_decode(const uint8_t *s, size_t n, size_t i, size_t *len) {
    uint32_t c = s[i];
    if (c < 0x80) { *len = 1; return c; }
    size_t need;
    uint32_t cp, min;
    if (c >= 0xC2 && c <= 0xDF) { need = 1; cp = c & 0x1F; min = 0x80; }
    else if (c >= 0xE0 && c <= 0xEF) { need = 2; cp = c & 0x0F; min = 0x800; }
    else if (c >= 0xF0 && c <= 0xF4) { need = 3; cp = c & 0x07; min = 0x10000; }
    else { *len = 1; return CP_INVALID; }
    if (i + need >= n) { *len = 1; return CP_INVALID; }
    for (size_t k = 1; k <= need; k++) {
        uint32_t cc = s[i + k];
        if ((cc & 0xC0) != 0x80) { *len = 1; return CP_INVALID; }
        cp = (cp << 6) | (cc & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
        *len = 1;
        return CP_INVALID;
    }
    *len = need + 1;
    return cp;
}

static size_t utf8_encode(uint32_t cp, char *o) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static uint8_t range_lookup(const struct uc_range *r, size_t n, uint32_t cp) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < r[mid].lo) hi = mid;
        else if (cp > r[mid].hi) lo = mid + 1;
        else return r[mid].v;
    }
    return 0;
}

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

static const uint8_t ascii_class[128] = {
    ['\t'] = CL_WS, ['\n'] = CL_WS | CL_NL, [0x0B] = CL_WS, [0x0C] = CL_WS,
    ['\r'] = CL_WS | CL_NL, [' '] = CL_WS | CL_SP,
    ['0'] = CL_N, ['1'] = CL_N, ['2'] = CL_N, ['3'] = CL_N, ['4'] = CL_N,
    ['5'] = CL_N, ['6'] = CL_N, ['7'] = CL_N, ['8'] = CL_N, ['9'] = CL_N,
    ['A'] = CL_L, ['B'] = CL_L, ['C'] = CL_L, ['D'] = CL_L, ['E'] = CL_L, ['F'] = CL_L,
    ['G'] = CL_L, ['H'] = CL_L, ['I'] = CL_L, ['J'] = CL_L, ['K'] = CL_L, ['L'] = CL_L,
    ['M'] = CL_L, ['N'] = CL_L, ['O'] = CL_L, ['P'] = CL_L, ['Q'] = CL_L, ['R'] = CL_L,
    ['S'] = CL_L, ['T'] = CL_L, ['U'] = CL_L, ['V'] = CL_L, ['W'] = CL_L, ['X'] = CL_L,
    ['Y'] = CL_L, ['Z'] = CL_L,
    ['a'] = CL_L, ['b'] = CL_L, ['c'] = CL_L, ['d'] = CL_L, ['e'] = CL_L, ['f'] = CL_L,
    ['g'] = CL_L, ['h'] = CL_L, ['i'] = CL_L, ['j'] = CL_L, ['k'] = CL_L, ['l'] = CL_L,
    ['m'] = CL_L, ['n'] = CL_L, ['o'] = CL_L, ['p'] = CL_L, ['q'] = CL_L, ['r'] = CL_L,
    ['s'] = CL_L, ['t'] = CL_L, ['u'] = CL_L, ['v'] = CL_L, ['w'] = CL_L, ['x'] = CL_L,
    ['y'] = CL_L, ['z'] = CL_L,
};

static inline unsigned cp_class(uint32_t cp) {
    if (cp < 0x80) return ascii_class[cp];
    if (cp == CP_INVALID) return 0;
    return range_lookup(uc_class_ranges, NELEM(uc_class_ranges), cp);
}

/* class of the character at s[i] (i < n); *next = index after it */
static inline unsigned class_at(const uint8_t *s, size_t n, size_t i, size_t *next) {
    if (s[i] < 0x80) { *next = i + 1; return ascii_class[s[i]]; }
    size_t len;
    uint32_t cp = utf8_decode(s, n, i, &len);
    *next = i + len;
    return cp_class(cp);
}

/* end of the run of characters from i whose class has any bit of `want` */
static inline size_t run_of(const uint8_t *s, size_t n, size_t i, unsigned want) {
    while (i < n) {
        size_t nx;
        if (!(class_at(s, n, i, &nx) & want)) break;
        i = nx;
    }
    return i;
}

/* end of the run of characters from i that are not \s, \p{L} or \p{N} */
static inline size_t run_other(const uint8_t *s, size_t n, size_t i) {
    while (i < n) {
        size_t nx;
        if (class_at(s, n, i, &nx) & (CL_L | CL_N | CL_WS)) break;
        i = nx;
    }
    return i;
}

/* ---- pre-tokenizers: each returns the end of the pre-token that starts at i (i < n) ------ */

static inline int lower_ascii(int c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

/* 's 't 're 've 'm 'll 'd after an apostrophe at i; returns the end or 0. With `icase`, ASCII
 * case is ignored and U+017F (long s, which case-folds to s) counts as s, as in a Unicode
 * case-insensitive regex. */
static size_t contraction(const uint8_t *s, size_t n, size_t i, bool icase) {
    size_t j = i + 1;
    if (j >= n) return 0;
    int a = icase ? lower_ascii(s[j]) : s[j];
    int b = j + 1 < n ? (icase ? lower_ascii(s[j + 1]) : s[j + 1]) : -1;
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return j + 1;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return j + 2;
    if (icase && s[j] == 0xC5 && b == 0xBF) return j + 2; /* U+017F */
    return 0;
}

/* whitespace at i: \s+(?!\S) | \s+  (and, if `nl`, \s*[\r\n]+ first) */
static size_t match_space(const uint8_t *s, size_t n, size_t i, bool nl) {
    size_t e = i, last = i, nl_end = 0;
    while (e < n) {
        size_t nx;
        unsigned c = class_at(s, n, e, &nx);
        if (!(c & CL_WS)) break;
        if (c & CL_NL) nl_end = nx;
        last = e;
        e = nx;
    }
    if (nl && nl_end) return nl_end;  /* \s*[\r\n]+ ends after the run's last \r or \n */
    if (e == n) return e;             /* \s+(?!\S) at the end of the text */
    if (last > i) return last;        /* \s+(?!\S): leave the last space for the next word */
    return e;                         /* \s+ */
}

static size_t match_gpt2(const uint8_t *s, size_t n, size_t i) {
    if (s[i] == '\'') {
        size_t e = contraction(s, n, i, false);
        if (e) return e;
    }
    size_t j;
    unsigned c = class_at(s, n, i, &j);
    if ((c & CL_SP) && j < n) {
        size_t k;
        unsigned c2 = class_at(s, n, j, &k);
        if (c2 & CL_L) return run_of(s, n, k, CL_L);
        if (c2 & CL_N) return run_of(s, n, k, CL_N);
        if (!(c2 & (CL_L | CL_N | CL_WS))) return run_other(s, n, k);
    }
    if (c & CL_L) return run_of(s, n, j, CL_L);
    if (c & CL_N) return run_of(s, n, j, CL_N);
    if (!(c & CL_WS)) return run_other(s, n, j);
    return match_space(s, n, i, false);
}

/* qwen2 (max_digits 1) and llama3 (max_digits 3) */
static size_t match_llama(const uint8_t *s, size_t n, size_t i, int max_digits) {
    if (s[i] == '\'') {
        size_t e = contraction(s, n, i, true);
        if (e) return e;
    }
    size_t j;
    unsigned c = class_at(s, n, i, &j);
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (c & CL_L) return run_of(s, n, j, CL_L);
    if (!(c & (CL_N | CL_NL)) && j < n) {
        size_t k;
        if (class_at(s, n, j, &k) & CL_L) return run_of(s, n, k, CL_L);
    }
    /* \p{N}{1,max_digits} */
    if (c & CL_N) {
        size_t e = j;
        for (int d = 1; d < max_digits && e < n; d++) {
            size_t nx;
            if (!(class_at(s, n, e, &nx) & CL_N)) break;
            e = nx;
        }
        return e;
    }
    /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
    size_t st = 0;
    if (!(c & CL_WS)) st = j;
    else if ((c & CL_SP) && j < n) {
        size_t k;
        if (!(class_at(s, n, j, &k) & (CL_L | CL_N | CL_WS))) st = k;
    }
    if (st) {
        size_t e = run_other(s, n, st);
        while (e < n && (s[e] == '\r' || s[e] == '\n')) e++;
        return e;
    }
    return match_space(s, n, i, true);
}

/* ---- hashing ------------------------------------------------------------------------------ */

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return x;
}

static uint64_t hash_bytes(const char *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ n;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = mix64(h ^ w);
        p += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, n);
    return mix64(h ^ w ^ 0xA5);
}

static int32_t vocab_lookup(const struct tokenizer *tk, const char *s, size_t n) {
    uint32_t h = (uint32_t)hash_bytes(s, n) & tk->vocab_mask;
    for (;;) {
        uint32_t v = tk->vocab_slots[h];
        if (!v) return -1;
        const struct tok_str *t = &tk->tokens[v - 1];
        if (t->len == n && memcmp(t->s, s, n) == 0) return (int32_t)(v - 1);
        h = (h + 1) & tk->vocab_mask;
    }
}

static inline uint64_t pair_key(int32_t a, int32_t b) {
    return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
}

static inline const struct merge_slot *merge_lookup(const struct tokenizer *tk, int32_t a,
                                                    int32_t b) {
    if (!tk->merge_slots) return NULL;
    uint64_t key = pair_key(a, b);
    uint32_t h = (uint32_t)mix64(key) & tk->merge_mask;
    for (;;) {
        const struct merge_slot *m = &tk->merge_slots[h];
        if (m->id < 0) return NULL;
        if (m->key == key) return m;
        h = (h + 1) & tk->merge_mask;
    }
}

/* ---- output sink ------------------------------------------------------------------------- */

struct sink { int32_t *out; int max; int n; bool oom; };

static inline void emit(struct sink *k, int32_t id) {
    if (k->n < k->max) k->out[k->n] = id;
    if (k->n < INT32_MAX) k->n++;
}

/* ---- BPE --------------------------------------------------------------------------------- */

struct cand { uint64_t key; int32_t left, right, id; }; /* key = rank << 32 | position */

static void heap_push(struct cand *h, size_t *n, struct cand c) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p].key <= c.key) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = c;
}

static struct cand heap_pop(struct cand *h, size_t *n) {
    struct cand top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1;
        if (l >= *n) break;
        size_t m = (l + 1 < *n && h[l + 1].key < h[l].key) ? l + 1 : l;
        if (h[m].key >= last.key) break;
        h[i] = h[m];
        i = m;
    }
    if (*n) h[i] = last;
    return top;
}

#define BPE_STACK 64

static void try_pair(const struct tokenizer *tk, const int32_t *sym, struct cand *heap,
                     size_t *nh, int32_t a, int32_t b) {
    if (sym[a] < 0 || sym[b] < 0) return;
    const struct merge_slot *m = merge_lookup(tk, sym[a], sym[b]);
    if (m) heap_push(heap, nh, (struct cand){((uint64_t)(uint32_t)m->rank << 32) | (uint32_t)a,
                                             sym[a], sym[b], m->id});
}

/* A byte without a token is dropped, as HF's BPE (no unk token) does: SmolLM2's vocabulary
 * lacks 21 of the 256 byte characters (e.g. 0x1D, 0xC0, 0xF5..0xFF). */
static void emit_sym(struct sink *k, int32_t id) {
    if (id >= 0) emit(k, id);
}

static void bpe_word(const struct tokenizer *tk, const uint8_t *w, size_t n, struct sink *k) {
    if (n == 1) {
        emit_sym(k, tk->byte_tok[w[0]]);
        return;
    }
    if (tk->ignore_merges && n <= 512) {
        char buf[1024];
        size_t m = 0;
        for (size_t i = 0; i < n; i++) m += utf8_encode(byte_to_cp(w[i]), buf + m);
        int32_t id = vocab_lookup(tk, buf, m);
        if (id >= 0) {
            emit(k, id);
            return;
        }
    }
    int32_t sym_s[BPE_STACK], next_s[BPE_STACK], prev_s[BPE_STACK];
    struct cand heap_s[3 * BPE_STACK];
    int32_t *sym = sym_s, *next = next_s, *prev = prev_s;
    struct cand *heap = heap_s;
    void *mem = NULL;
    if (n > BPE_STACK) {
        mem = malloc(n * (3 * sizeof(int32_t) + 3 * sizeof(struct cand)));
        if (!mem) { /* out of memory: degrade to one token per byte */
            for (size_t i = 0; i < n; i++) emit_sym(k, tk->byte_tok[w[i]]);
            k->oom = true;
            return;
        }
        heap = mem;
        sym = (int32_t *)(heap + 3 * n);
        next = sym + n;
        prev = next + n;
    }
    for (size_t i = 0; i < n; i++) {
        sym[i] = tk->byte_tok[w[i]];
        next[i] = i + 1 < n ? (int32_t)(i + 1) : -1;
        prev[i] = (int32_t)i - 1;
    }
    size_t nh = 0;
    for (size_t i = 0; i + 1 < n; i++) try_pair(tk, sym, heap, &nh, (int32_t)i, (int32_t)i + 1);
    while (nh) {
        struct cand c = heap_pop(heap, &nh);
        int32_t a = (int32_t)(uint32_t)c.key;
        int32_t b = next[a];
        /* stale: the left symbol changed, or its right neighbour is not the one paired */
        if (b < 0 || sym[a] != c.left || sym[b] != c.right) continue;
        sym[a] = c.id;
        sym[b] = -2; /* removed */
        next[a] = next[b];
        if (next[b] >= 0) prev[next[b]] = a;
        if (prev[a] >= 0) try_pair(tk, sym, heap, &nh, prev[a], a);
        if (next[a] >= 0) try_pair(tk, sym, heap, &nh, a, next[a]);
    }
    for (int32_t i = 0; i >= 0; i = next[i]) emit_sym(k, sym[i]);
    free(mem);
}

/* ---- NFC --------------------------------------------------------------------------------- */

#define HANGUL_S 0xAC00u
#define HANGUL_L 0x1100u
#define HANGUL_V 0x1161u
#define HANGUL_T 0x11A7u
#define HANGUL_VN 21u
#define HANGUL_TN 28u
#define HANGUL_NS (19u * 21u * 28u)

static inline bool nfc_inert(uint32_t cp) {
    return cp < 0x300 || cp == CP_INVALID ||
           !range_lookup(uc_nfc_unsafe, NELEM(uc_nfc_unsafe), cp);
}

static inline uint8_t ccc_of(uint32_t cp) {
    if (cp < 0x300 || cp == CP_INVALID) return 0;
    return range_lookup(uc_ccc_ranges, NELEM(uc_ccc_ranges), cp);
}

static const struct uc_decomp *decomp_of(uint32_t cp) {
    size_t lo = 0, hi = NELEM(uc_decomp_index);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (uc_decomp_index[mid].cp == cp) return &uc_decomp_index[mid];
        if (uc_decomp_index[mid].cp < cp) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

static uint32_t compose(uint32_t a, uint32_t b) {
    if (a >= HANGUL_L && a < HANGUL_L + 19 && b >= HANGUL_V && b < HANGUL_V + HANGUL_VN)
        return HANGUL_S + ((a - HANGUL_L) * HANGUL_VN + (b - HANGUL_V)) * HANGUL_TN;
    if (a >= HANGUL_S && a < HANGUL_S + HANGUL_NS && (a - HANGUL_S) % HANGUL_TN == 0 &&
        b > HANGUL_T && b < HANGUL_T + HANGUL_TN)
        return a + (b - HANGUL_T);
    size_t lo = 0, hi = NELEM(uc_comp_pairs);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        const struct uc_comp *p = &uc_comp_pairs[mid];
        if (p->a == a && p->b == b) return p->c;
        if (p->a < a || (p->a == a && p->b < b)) lo = mid + 1;
        else hi = mid;
    }
    return 0;
}

struct cpbuf { uint32_t *cp; uint8_t *cc; size_t n, cap; };

static bool cpbuf_push(struct cpbuf *b, uint32_t cp) {
    if (b->n == b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 64;
        uint32_t *p = realloc(b->cp, nc * sizeof *p);
        if (!p) return false;
        b->cp = p;
        uint8_t *q = realloc(b->cc, nc);
        if (!q) return false;
        b->cc = q;
        b->cap = nc;
    }
    b->cc[b->n] = ccc_of(cp);
    b->cp[b->n++] = cp;
    return true;
}

static bool decompose_into(struct cpbuf *b, uint32_t cp) {
    if (cp >= HANGUL_S && cp < HANGUL_S + HANGUL_NS) {
        uint32_t si = cp - HANGUL_S;
        if (!cpbuf_push(b, HANGUL_L + si / (HANGUL_VN * HANGUL_TN))) return false;
        if (!cpbuf_push(b, HANGUL_V + (si % (HANGUL_VN * HANGUL_TN)) / HANGUL_TN)) return false;
        if (si % HANGUL_TN && !cpbuf_push(b, HANGUL_T + si % HANGUL_TN)) return false;
        return true;
    }
    const struct uc_decomp *d = cp >= 0xC0 && cp != CP_INVALID ? decomp_of(cp) : NULL;
    if (!d) return cpbuf_push(b, cp);
    for (int i = 0; i < d->len; i++)
        if (!cpbuf_push(b, uc_decomp_data[d->off + i])) return false;
    return true;
}

/* canonical ordering, then canonical composition, in place */
static void nfc_compose(struct cpbuf *b) {
    uint32_t *cp = b->cp;
    uint8_t *cc = b->cc;
    size_t n = b->n;
    for (size_t i = 1; i < n; i++) {
        uint8_t c = cc[i];
        if (!c) continue;
        uint32_t v = cp[i];
        size_t j = i;
        while (j > 0 && cc[j - 1] > c) {
            cp[j] = cp[j - 1];
            cc[j] = cc[j - 1];
            j--;
        }
        cp[j] = v;
        cc[j] = c;
    }
    if (!n) return;
    size_t starter = 0, out = 1;
    int last = cc[0] ? 256 : 0; /* no starter yet: nothing may compose */
    for (size_t i = 1; i < n; i++) {
        uint32_t ch = cp[i];
        int c = cc[i];
        if (last < 256 && (last < c || last == 0)) {
            uint32_t comp = compose(cp[starter], ch);
            if (comp) {
                cp[starter] = comp;
                cc[starter] = ccc_of(comp);
                continue;
            }
        }
        if (c == 0) starter = out;
        last = c;
        cp[out] = ch;
        cc[out] = (uint8_t)c;
        out++;
    }
    b->n = out;
}

struct bytebuf { char *p; size_t n, cap; };

static bool bytebuf_reserve(struct bytebuf *o, size_t more) {
    if (o->n + more <= o->cap) return true;
    size_t nc = o->cap ? o->cap : 256;
    while (nc < o->n + more) nc *= 2;
    char *p = realloc(o->p, nc);
    if (!p) return false;
    o->p = p;
    o->cap = nc;
    return true;
}

/* NFC of s[0..n) into *o (which the caller frees). Text outside the regions that can change
 * is copied; each region (an inert starter followed by non-inert characters) is decomposed,
 * reordered and recomposed. Invalid bytes pass through unchanged. */
static bool nfc_normalize(const uint8_t *s, size_t n, struct bytebuf *o) {
    struct cpbuf b = {0};
    bool ok = bytebuf_reserve(o, n + 16);
    size_t i = 0;
    while (ok && i < n) {
        /* copy inert characters, but keep the last one: it may be the starter of a region */
        size_t j = i, last_start = i;
        while (j < n) {
            size_t len = 1;
            uint32_t cp = s[j] < 0x80 ? s[j] : utf8_decode(s, n, j, &len);
            if (!nfc_inert(cp)) break;
            last_start = j;
            j += len;
        }
        if (j == n) last_start = n;
        memcpy(o->p + o->n, s + i, last_start - i);
        o->n += last_start - i;
        if (j == n) break;
        /* region: [last_start, end of the following non-inert run) */
        b.n = 0;
        size_t k = last_start;
        while (k < n) {
            size_t len;
            uint32_t cp = utf8_decode(s, n, k, &len);
            if (k >= j && nfc_inert(cp)) break;
            if (cp == CP_INVALID) cp = 0x80000000u | s[k]; /* opaque, ccc 0, never composes */
            if (!decompose_into(&b, cp)) { ok = false; break; }
            k += len;
        }
        if (!ok) break;
        nfc_compose(&b);
        ok = bytebuf_reserve(o, 4 * b.n + (n - k) + 16);
        for (size_t t = 0; ok && t < b.n; t++) {
            if (b.cp[t] & 0x80000000u) o->p[o->n++] = (char)(b.cp[t] & 0xFF);
            else o->n += utf8_encode(b.cp[t], o->p + o->n);
        }
        i = k;
    }
    free(b.cp);
    free(b.cc);
    return ok;
}

static bool needs_nfc(const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n;) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        size_t len;
        uint32_t cp = utf8_decode(s, n, i, &len);
        if (!nfc_inert(cp)) return true;
        i += len;
    }
    return false;
}

/* ---- encoding ----------------------------------------------------------------------------- */

static void encode_text(const struct tokenizer *tk, const uint8_t *s, size_t n, struct sink *k) {
    struct bytebuf norm = {0};
    if (tk->nfc && needs_nfc(s, n)) {
        if (nfc_normalize(s, n, &norm)) {
            s = (const uint8_t *)norm.p;
            n = norm.n;
        } else {
            k->oom = true; /* tokenize the text as given */
        }
    }
    size_t i = 0, digit_free_end = 0;
    while (i < n) {
        size_t e;
        switch (tk->pre) {
        case PRE_SMOLLM: {
            size_t nx;
            if (class_at(s, n, i, &nx) & CL_N) {
                e = nx;
                break;
            }
            if (digit_free_end <= i) { /* the text up to the next digit is one piece */
                size_t j = i;
                while (j < n) {
                    if (class_at(s, n, j, &nx) & CL_N) break;
                    j = nx;
                }
                digit_free_end = j;
            }
            e = match_gpt2(s, digit_free_end, i);
            break;
        }
        case PRE_QWEN2: e = match_llama(s, n, i, 1); break;
        case PRE_LLAMA3: e = match_llama(s, n, i, 3); break;
        case PRE_GPT2:
        default: e = match_gpt2(s, n, i); break;
        }
        KVS_ASSERT(e > i && e <= n);
        bpe_word(tk, s + i, e - i, k);
        i = e;
    }
    free(norm.p);
}

/* leftmost added token at or after `from`, longest at equal start; returns its index or -1 */
static int find_special(const struct tokenizer *tk, const uint8_t *s, size_t n, size_t from,
                        bool parse_special, size_t *at) {
    for (size_t p = from; p < n; p++) {
        int b = s[p];
        for (int q = tk->sp_start[b]; q < tk->sp_start[b + 1]; q++) {
            const struct special *sp = &tk->specials[q];
            if (sp->control && !parse_special) continue;
            if (sp->len <= n - p && memcmp(s + p, sp->s, sp->len) == 0) {
                *at = p;
                return q;
            }
        }
    }
    return -1;
}

int tokenizer_encode(const struct tokenizer *tk, const char *text, size_t len, bool add_bos,
                     bool parse_special, int32_t *out, int max_out) {
    struct sink k = {out, out ? (max_out > 0 ? max_out : 0) : 0, 0, false};
    if (add_bos && tk->bos_id >= 0) emit(&k, tk->bos_id);
    const uint8_t *s = (const uint8_t *)(text ? text : "");
    if (!text) len = 0;
    size_t pos = 0;
    while (pos < len) {
        size_t at = len;
        int q = tk->n_special ? find_special(tk, s, len, pos, parse_special, &at) : -1;
        if (at > pos) encode_text(tk, s + pos, at - pos, &k);
        if (q < 0) break;
        emit(&k, tk->specials[q].id);
        pos = at + tk->specials[q].len;
    }
    if (k.oom) kvs_log(1, "tokenizer: out of memory while encoding; result may differ");
    return k.n <= k.max ? k.n : -k.n;
}

/* ---- decoding ----------------------------------------------------------------------------- */

size_t tokenizer_piece(const struct tokenizer *tk, int32_t id, bool special, char *buf,
                       size_t size) {
    if (id < 0 || id >= tk->n_vocab) return 0;
    uint8_t t = tk->types[id];
    if ((t == TOK_CONTROL || t == TOK_UNUSED) && !special) return 0;
    size_t n = tk->piece_off[id + 1] - tk->piece_off[id];
    if (buf && size) memcpy(buf, tk->pieces + tk->piece_off[id], n < size ? n : size);
    return n;
}

bool tokenizer_is_control(const struct tokenizer *tk, int32_t id) {
    return id >= 0 && id < tk->n_vocab && tk->types[id] == TOK_CONTROL;
}

int tokenizer_n_vocab(const struct tokenizer *tk) { return tk->n_vocab; }

int32_t tokenizer_find(const struct tokenizer *tk, const char *text) {
    if (!text) return -1;
    return vocab_lookup(tk, text, strlen(text));
}

/* ---- streaming UTF-8 ---------------------------------------------------------------------- */

struct outw { char *o; size_t size, n; };

static inline void outw_put(struct outw *w, const char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (w->n < w->size) w->o[w->n] = p[i];
        w->n++;
    }
}

static const char REPLACEMENT[3] = {(char)0xEF, (char)0xBF, (char)0xBD};

/* Length of the well-formed sequence at v[0..n): > 0 complete, 0 = valid but incomplete
 * prefix, < 0 = invalid, -k meaning the maximal valid prefix has k bytes (>= 1). */
static int utf8_check(const unsigned char *v, size_t n) {
    unsigned c = v[0];
    if (c < 0x80) return 1;
    int need;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else return -1;
    for (int k = 1; k <= need; k++) {
        if ((size_t)k >= n) return 0;
        unsigned x = v[k];
        if (x < lo || x > hi) return -k;
        lo = 0x80;
        hi = 0xBF;
    }
    return need + 1;
}

size_t tok_stream_push(struct tok_stream *st, const char *bytes, size_t n, char *out,
                       size_t out_size) {
    struct outw w = {out, out ? out_size : 0, 0};
    if (st->n_pend < 0 || st->n_pend > 4) st->n_pend = 0;
    /* work on pending bytes + new bytes through a small window, byte by byte from `bytes` */
    unsigned char win[8];
    size_t nw = (size_t)st->n_pend, in = 0;
    memcpy(win, st->pend, nw);
    for (;;) {
        while (nw < 4 && in < n) win[nw++] = (unsigned char)bytes[in++];
        if (nw == 0) break;
        int r = utf8_check(win, nw);
        size_t used;
        if (r > 0) {
            outw_put(&w, (const char *)win, (size_t)r);
            used = (size_t)r;
        } else if (r == 0) {
            break; /* incomplete and the input is used up (the window holds 4 otherwise) */
        } else {
            outw_put(&w, REPLACEMENT, 3);
            used = (size_t)-r;
        }
        memmove(win, win + used, nw - used);
        nw -= used;
    }
    memcpy(st->pend, win, nw);
    st->n_pend = (int)nw;
    return w.n;
}

size_t tok_stream_flush(struct tok_stream *st, char *out, size_t out_size) {
    struct outw w = {out, out ? out_size : 0, 0};
    if (st->n_pend > 0 && st->n_pend <= 8) outw_put(&w, REPLACEMENT, 3);
    st->n_pend = 0;
    return w.n;
}

/* ---- construction ------------------------------------------------------------------------- */

void tokenizer_free(struct tokenizer *tk) {
    if (!tk) return;
    free(tk->tokens);
    free(tk->types);
    free(tk->vocab_slots);
    free(tk->merge_slots);
    free(tk->pieces);
    free(tk->piece_off);
    free(tk->specials);
    free(tk);
}

static uint32_t pow2_at_least(uint64_t x) {
    uint32_t c = 16;
    while (c < x) c *= 2;
    return c;
}

static int cmp_special(const void *a, const void *b) {
    const struct special *x = a, *y = b;
    unsigned char fx = (unsigned char)x->s[0], fy = (unsigned char)y->s[0];
    if (fx != fy) return fx < fy ? -1 : 1;
    if (x->len != y->len) return x->len > y->len ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

static enum kvs_status build_vocab(struct tokenizer *tk) {
    uint32_t cap = pow2_at_least(2ull * (uint64_t)tk->n_vocab);
    tk->vocab_slots = calloc(cap, sizeof *tk->vocab_slots);
    if (!tk->vocab_slots) return kvs_fail(KVS_ERR_NOMEM, "tokenizer: out of memory");
    tk->vocab_mask = cap - 1;
    for (int i = 0; i < tk->n_vocab; i++) {
        const struct tok_str *t = &tk->tokens[i];
        uint32_t h = (uint32_t)hash_bytes(t->s, t->len) & tk->vocab_mask;
        for (;;) {
            uint32_t v = tk->vocab_slots[h];
            if (!v) break;
            const struct tok_str *o = &tk->tokens[v - 1];
            if (o->len == t->len && memcmp(o->s, t->s, t->len) == 0) break; /* later wins */
            h = (h + 1) & tk->vocab_mask;
        }
        tk->vocab_slots[h] = (uint32_t)i + 1;
    }
    return KVS_OK;
}

static enum kvs_status build_merges(struct tokenizer *tk, const struct tokenizer_desc *d) {
    if (d->n_merges <= 0) return KVS_OK;
    uint32_t cap = pow2_at_least(2ull * (uint64_t)d->n_merges);
    tk->merge_slots = malloc((size_t)cap * sizeof *tk->merge_slots);
    char *cat = malloc(2 * 4096 + 2);
    if (!tk->merge_slots || !cat) {
        free(cat);
        return kvs_fail(KVS_ERR_NOMEM, "tokenizer: out of memory");
    }
    for (uint32_t i = 0; i < cap; i++) tk->merge_slots[i].id = -1;
    tk->merge_mask = cap - 1;
    int skipped = 0;
    for (int r = 0; r < d->n_merges; r++) {
        const struct tok_str *m = &d->merges[r];
        const char *sp = m->s && m->len ? memchr(m->s, ' ', m->len) : NULL;
        size_t la = sp ? (size_t)(sp - m->s) : 0, lb = sp ? m->len - la - 1 : 0;
        if (!sp || la == 0 || lb == 0 || la > 4096 || lb > 4096) { skipped++; continue; }
        int32_t a = vocab_lookup(tk, m->s, la), b = vocab_lookup(tk, sp + 1, lb);
        memcpy(cat, m->s, la);
        memcpy(cat + la, sp + 1, lb);
        int32_t c = vocab_lookup(tk, cat, la + lb);
        if (a < 0 || b < 0 || c < 0) { skipped++; continue; }
        uint64_t key = pair_key(a, b);
        uint32_t h = (uint32_t)mix64(key) & tk->merge_mask;
        while (tk->merge_slots[h].id >= 0 && tk->merge_slots[h].key != key)
            h = (h + 1) & tk->merge_mask;
        if (tk->merge_slots[h].id >= 0) continue; /* duplicate pair: the first rank counts */
        tk->merge_slots[h] = (struct merge_slot){key, r, c};
    }
    free(cat);
    if (skipped)
        kvs_log(1, "tokenizer: %d of %d merges refer to unknown tokens and are ignored", skipped,
                d->n_merges);
    return KVS_OK;
}

/* byte-level pieces of every token; control/user-defined/unused tokens keep their text */
static enum kvs_status build_pieces(struct tokenizer *tk) {
    int16_t inv[0x144]; /* alphabet character -> byte */
    for (int i = 0; i < 0x144; i++) inv[i] = -1;
    for (int b = 0; b < 256; b++) inv[byte_to_cp(b)] = (int16_t)b;
    uint64_t total = 0;
    for (int i = 0; i < tk->n_vocab; i++) total += tk->tokens[i].len;
    if (total >= UINT32_MAX) return kvs_fail(KVS_ERR_INVALID_ARG, "tokenizer: vocabulary too large");
    tk->pieces = malloc(total ? total : 1);
    tk->piece_off = malloc(((size_t)tk->n_vocab + 1) * sizeof *tk->piece_off);
    if (!tk->pieces || !tk->piece_off) return kvs_fail(KVS_ERR_NOMEM, "tokenizer: out of memory");
    uint32_t o = 0;
    for (int i = 0; i < tk->n_vocab; i++) {
        tk->piece_off[i] = o;
        const struct tok_str *t = &tk->tokens[i];
        const uint8_t *s = (const uint8_t *)t->s;
        uint8_t ty = tk->types[i];
        if (ty == TOK_CONTROL || ty == TOK_USER_DEFINED || ty == TOK_UNUSED) {
            memcpy(tk->pieces + o, s, t->len);
            o += t->len;
            continue;
        }
        for (size_t j = 0; j < t->len;) {
            size_t len;
            uint32_t cp = utf8_decode(s, t->len, j, &len);
            int b = cp < 0x144 ? inv[cp] : -1;
            if (b >= 0) tk->pieces[o++] = (char)b;
            else {
                memcpy(tk->pieces + o, s + j, len); /* not in the alphabet: keep as is */
                o += (uint32_t)len;
            }
            j += len;
        }
    }
    tk->piece_off[tk->n_vocab] = o;
    return KVS_OK;
}

static enum kvs_status build_specials(struct tokenizer *tk) {
    int n = 0;
    for (int i = 0; i < tk->n_vocab; i++)
        if ((tk->types[i] == TOK_CONTROL || tk->types[i] == TOK_USER_DEFINED) &&
            tk->tokens[i].len > 0)
            n++;
    if (n > 65535) return kvs_fail(KVS_ERR_UNSUPPORTED, "tokenizer: too many special tokens");
    tk->specials = malloc((n ? (size_t)n : 1) * sizeof *tk->specials);
    if (!tk->specials) return kvs_fail(KVS_ERR_NOMEM, "tokenizer: out of memory");
    n = 0;
    for (int i = 0; i < tk->n_vocab; i++)
        if ((tk->types[i] == TOK_CONTROL || tk->types[i] == TOK_USER_DEFINED) &&
            tk->tokens[i].len > 0)
            tk->specials[n++] = (struct special){tk->tokens[i].s, tk->tokens[i].len, i,
                                                 tk->types[i] == TOK_CONTROL};
    qsort(tk->specials, (size_t)n, sizeof *tk->specials, cmp_special);
    tk->n_special = n;
    int q = 0;
    for (int b = 0; b < 256; b++) {
        tk->sp_start[b] = (uint16_t)q;
        while (q < n && (unsigned char)tk->specials[q].s[0] == b) q++;
    }
    tk->sp_start[256] = (uint16_t)q;
    return KVS_OK;
}

static enum pre_kind pick_pre(const char *pre, struct tokenizer *tk) {
    if (!pre || !*pre || !strcmp(pre, "gpt2") || !strcmp(pre, "gpt-2") || !strcmp(pre, "default"))
        return PRE_GPT2;
    if (!strcmp(pre, "smollm") || !strcmp(pre, "starcoder") || !strcmp(pre, "refact"))
        return PRE_SMOLLM;
    if (!strcmp(pre, "qwen2") || !strcmp(pre, "deepseek-r1-qwen")) {
        tk->nfc = true;
        return PRE_QWEN2;
    }
    if (!strcmp(pre, "llama3") || !strcmp(pre, "llama-v3") || !strcmp(pre, "llama-bpe")) {
        tk->ignore_merges = true;
        return PRE_LLAMA3;
    }
    kvs_log(1, "tokenizer: unknown pre-tokenizer '%s', using the gpt2 one", pre);
    return PRE_GPT2;
}

enum kvs_status tokenizer_init(struct tokenizer **out, const struct tokenizer_desc *d) {
    if (!out) return kvs_fail(KVS_ERR_INVALID_ARG, "tokenizer_init: NULL output");
    *out = NULL;
    if (!d || d->n_vocab <= 0 || !d->tokens)
        return kvs_fail(KVS_ERR_INVALID_ARG, "tokenizer: empty vocabulary");
    if (d->model && strcmp(d->model, "gpt2") != 0)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "tokenizer: model '%s' is not supported (gpt2 "
                        "byte-level BPE only)", d->model);
    if (d->n_merges < 0 || (d->n_merges > 0 && !d->merges))
        return kvs_fail(KVS_ERR_INVALID_ARG, "tokenizer: bad merges");
    if (d->n_vocab >= INT32_MAX / 2)
        return kvs_fail(KVS_ERR_INVALID_ARG, "tokenizer: vocabulary too large");
    for (int i = 0; i < d->n_vocab; i++)
        if (!d->tokens[i].s && d->tokens[i].len)
            return kvs_fail(KVS_ERR_INVALID_ARG, "tokenizer: token %d has no text", i);

    struct tokenizer *tk = calloc(1, sizeof *tk);
    if (!tk) return kvs_fail(KVS_ERR_NOMEM, "tokenizer: out of memory");
    enum kvs_status st = KVS_ERR_NOMEM;
    tk->n_vocab = d->n_vocab;
    tk->tokens = malloc((size_t)d->n_vocab * sizeof *tk->tokens);
    tk->types = malloc((size_t)d->n_vocab);
    if (!tk->tokens || !tk->types) {
        st = kvs_fail(KVS_ERR_NOMEM, "tokenizer: out of memory");
        goto fail;
    }
    for (int i = 0; i < d->n_vocab; i++) {
        tk->tokens[i] = d->tokens[i];
        if (!tk->tokens[i].s) tk->tokens[i].s = "";
        int32_t t = TOK_NORMAL;
        if (d->token_types) memcpy(&t, &d->token_types[i], sizeof t);
        tk->types[i] = (t >= TOK_NORMAL && t <= TOK_BYTE) ? (uint8_t)t : TOK_NORMAL;
    }
    int32_t *ids[] = {&tk->bos_id, &tk->eos_id, &tk->eot_id, &tk->unk_id, &tk->pad_id};
    int32_t given[] = {d->bos_id, d->eos_id, d->eot_id, d->unk_id, d->pad_id};
    for (int i = 0; i < 5; i++) *ids[i] = (given[i] >= 0 && given[i] < d->n_vocab) ? given[i] : -1;
    tk->add_bos = d->add_bos;
    tk->pre = pick_pre(d->pre, tk);

    if ((st = build_vocab(tk)) != KVS_OK) goto fail;
    int missing = 0;
    for (int b = 0; b < 256; b++) {
        char u[4];
        size_t n = utf8_encode(byte_to_cp(b), u);
        tk->byte_tok[b] = vocab_lookup(tk, u, n);
        missing += tk->byte_tok[b] < 0;
    }
    if (missing)
        kvs_log(3, "tokenizer: %d byte values have no token; such bytes are dropped", missing);
    if ((st = build_merges(tk, d)) != KVS_OK) goto fail;
    if ((st = build_pieces(tk)) != KVS_OK) goto fail;
    if ((st = build_specials(tk)) != KVS_OK) goto fail;
    *out = tk;
    return KVS_OK;
fail:
    tokenizer_free(tk);
    return st;
}
