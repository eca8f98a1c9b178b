/* test_tokenizer.c — the BPE tokenizer against reference ids from HF tokenizers, plus
 * detokenization, the streaming UTF-8 decoder and the chat formatter.
 *
 * Golden data: tests/golden/tokenizer_<model>.txt, written by tools/tokenizer_golden.py (see
 * its header for the format and for how the reference ids were produced). For every golden
 * file whose model exists, each case's text is encoded and must give exactly the reference
 * ids, and the pieces of those ids must concatenate to the reference decoding byte for byte
 * (the input itself, except where the model drops bytes it has no token for, or NFC changes
 * the text for qwen2). Skips (77) when no model file is present.
 * KVS_TOK_VERBOSE=1 prints every mismatch in full; KVS_TOK_GOLDEN=path runs that golden file
 * instead of the default ones.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base.h"
#include "gguf.h"
#include "testutil.h"
#include "tokenizer.h"

static const char *GOLDEN[] = {"tests/golden/tokenizer_smollm2.txt",
                               "tests/golden/tokenizer_qwen2.txt",
                               "tests/golden/tokenizer_qwen2_llama3.txt"};

struct loaded {
    struct gguf_file *g;
    struct tokenizer *tk;
    char model[32], pre[32];
};

static void copy_str(char *dst, size_t cap, struct gguf_str s) {
    size_t n = s.len < cap - 1 ? (size_t)s.len : cap - 1;
    memcpy(dst, s.s, n);
    dst[n] = 0;
}

static int32_t get_id(const struct gguf_file *g, const char *key) {
    uint32_t v;
    return gguf_get_u32(g, key, &v) ? (int32_t)v : -1;
}

/* builds a tokenizer from the GGUF metadata, the way a model loader would; pre_override
 * replaces tokenizer.ggml.pre when not NULL */
static bool load(const char *path, const char *pre_override, struct loaded *L) {
    memset(L, 0, sizeof *L);
    if (gguf_open(path, false, &L->g) != KVS_OK) {
        fprintf(stderr, "gguf_open(%s): %s\n", path, kvs_last_error());
        return false;
    }
    uint64_t n_tok = 0, n_merges = 0, n_types = 0;
    const struct gguf_str *toks = gguf_get_str_arr(L->g, "tokenizer.ggml.tokens", &n_tok);
    const struct gguf_str *merges = gguf_get_str_arr(L->g, "tokenizer.ggml.merges", &n_merges);
    const void *types = gguf_get_i32_arr(L->g, "tokenizer.ggml.token_type", &n_types);
    struct gguf_str s;
    if (!toks || !gguf_get_str(L->g, "tokenizer.ggml.model", &s)) return false;
    copy_str(L->model, sizeof L->model, s);
    if (gguf_get_str(L->g, "tokenizer.ggml.pre", &s)) copy_str(L->pre, sizeof L->pre, s);
    if (pre_override) snprintf(L->pre, sizeof L->pre, "%s", pre_override);
    struct tok_str *tv = malloc(n_tok * sizeof *tv);
    struct tok_str *mv = malloc((n_merges + 1) * sizeof *mv);
    int32_t *tt = malloc(n_tok * sizeof *tt);
    for (uint64_t i = 0; i < n_tok; i++) {
        tv[i] = (struct tok_str){toks[i].s, (uint32_t)toks[i].len};
        tt[i] = TOK_NORMAL;
        if (types && n_types == n_tok) memcpy(&tt[i], (const char *)types + 4 * i, 4);
    }
    for (uint64_t i = 0; i < n_merges; i++)
        mv[i] = (struct tok_str){merges[i].s, (uint32_t)merges[i].len};
    bool add_bos = false;
    gguf_get_bool(L->g, "tokenizer.ggml.add_bos_token", &add_bos);
    struct tokenizer_desc d = {
        .model = L->model, .pre = L->pre[0] ? L->pre : NULL, .n_vocab = (int)n_tok,
        .tokens = tv, .token_types = tt, .n_merges = (int)n_merges, .merges = mv,
        .bos_id = get_id(L->g, "tokenizer.ggml.bos_token_id"),
        .eos_id = get_id(L->g, "tokenizer.ggml.eos_token_id"),
        .eot_id = get_id(L->g, "tokenizer.ggml.eot_token_id"),
        .unk_id = get_id(L->g, "tokenizer.ggml.unknown_token_id"),
        .pad_id = get_id(L->g, "tokenizer.ggml.padding_token_id"), .add_bos = add_bos,
    };
    double t0 = kvs_time_ms();
    enum kvs_status st = tokenizer_init(&L->tk, &d);
    double t1 = kvs_time_ms();
    /* the tokenizer must not keep pointers to the arrays (only to the strings) */
    memset(tv, 0xAB, n_tok * sizeof *tv);
    memset(mv, 0xAB, n_merges * sizeof *mv);
    memset(tt, 0xAB, n_tok * sizeof *tt);
    free(tv);
    free(mv);
    free(tt);
    if (st != KVS_OK) {
        fprintf(stderr, "tokenizer_init(%s): %s\n", path, kvs_last_error());
        return false;
    }
    fprintf(stderr, "  %s: %llu tokens, %llu merges, pre '%s', init %.1f ms\n", path,
            (unsigned long long)n_tok, (unsigned long long)n_merges, L->pre, t1 - t0);
    return true;
}

static void unload(struct loaded *L) {
    tokenizer_free(L->tk);
    gguf_close(L->g);
}

/* ---- small helpers ----------------------------------------------------------------------- */

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* decodes hex in [s, s+n) into a malloc'd buffer (NUL-terminated); *len = bytes */
static char *unhex(const char *s, size_t n, size_t *len) {
    char *o = malloc(n / 2 + 1);
    size_t k = 0;
    for (size_t i = 0; i + 1 < n; i += 2) {
        int a = hexval(s[i]), b = hexval(s[i + 1]);
        if (a < 0 || b < 0) break;
        o[k++] = (char)(a * 16 + b);
    }
    o[k] = 0;
    *len = k;
    return o;
}

static int split_tabs(char *line, char **f, int max) {
    int n = 0;
    f[n++] = line;
    for (char *p = line; *p && n < max; p++)
        if (*p == '\t') {
            *p = 0;
            f[n++] = p + 1;
        }
    return n;
}

static int parse_ids(const char *s, int32_t **out) {
    int cap = 16, n = 0;
    int32_t *v = malloc(cap * sizeof *v);
    while (*s) {
        while (*s == ' ') s++;
        if (!*s) break;
        if (n == cap) v = realloc(v, (cap *= 2) * sizeof *v);
        v[n++] = (int32_t)strtol(s, (char **)&s, 10);
    }
    *out = v;
    return n;
}

static uint64_t fnv1a64(const void *p, size_t n) {
    const unsigned char *b = p;
    uint64_t h = 0xCBF29CE484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001B3ull;
    return h;
}

/* encodes into a malloc'd array sized by a first counting call */
static int encode_all(const struct tokenizer *tk, const char *s, size_t n, bool bos, bool sp,
                      int32_t **ids) {
    int need = tokenizer_encode(tk, s, n, bos, sp, NULL, 0);
    if (need < 0) need = -need;
    *ids = malloc(((size_t)need + 1) * sizeof **ids);
    int got = tokenizer_encode(tk, s, n, bos, sp, *ids, need);
    CHECKF(got == need, "count %d then %d", need, got);
    return got;
}

/* concatenated pieces of ids (special = true) */
static char *decode_all(const struct tokenizer *tk, const int32_t *ids, int n, size_t *len) {
    size_t cap = 64, k = 0;
    char *o = malloc(cap);
    for (int i = 0; i < n; i++) {
        size_t m = tokenizer_piece(tk, ids[i], true, NULL, 0);
        while (k + m + 1 > cap) o = realloc(o, cap *= 2);
        size_t m2 = tokenizer_piece(tk, ids[i], true, o + k, cap - k);
        CHECK(m2 == m);
        k += m;
    }
    o[k] = 0;
    *len = k;
    return o;
}

static void print_ids(const char *what, const int32_t *v, int n) {
    fprintf(stderr, "    %s (%d):", what, n);
    for (int i = 0; i < n && i < 64; i++) fprintf(stderr, " %d", v[i]);
    fprintf(stderr, n > 64 ? " ...\n" : "\n");
}

/* ---- golden file ------------------------------------------------------------------------- */

struct stats { int cases, id_fail, rt_fail, chats, chat_fail; };

static void run_text_case(const struct loaded *L, char **f, int nf, struct stats *S,
                          bool verbose) {
    if (nf < 5) { CHECKF(0, "malformed T line"); return; }
    bool sp = f[1][0] == 's';
    size_t n_in, n_dec;
    char *in = unhex(f[2], strlen(f[2]), &n_in);
    char *want_dec = unhex(f[4], strlen(f[4]), &n_dec);
    int32_t *want, *got;
    int nw = parse_ids(f[3], &want);
    int ng = encode_all(L->tk, in, n_in, false, sp, &got);
    S->cases++;
    bool same = ng == nw && (nw == 0 || memcmp(got, want, (size_t)nw * sizeof *got) == 0);
    if (!same) {
        S->id_fail++;
        if (verbose || S->id_fail <= 5) {
            fprintf(stderr, "  ids differ (%s, special %d) for input hex %s\n", L->pre, sp, f[2]);
            print_ids("want", want, nw);
            print_ids("got ", got, ng);
        }
    }
    CHECK(same);
    size_t n_out;
    char *out = decode_all(L->tk, got, ng, &n_out);
    bool rt = n_out == n_dec && memcmp(out, want_dec, n_dec) == 0;
    if (!rt) {
        S->rt_fail++;
        if (verbose || S->rt_fail <= 5)
            fprintf(stderr, "  decode(encode(x)) differs for input hex %s\n", f[2]);
    }
    CHECK(rt);
    free(in);
    free(want_dec);
    free(want);
    free(got);
    free(out);
}

static void run_chat_case(char **f, int nf, struct stats *S) {
    if (nf < 5) { CHECKF(0, "malformed C line"); return; }
    struct chat_msg msgs[32];
    char *bufs[64];
    int n = 0, nb = 0;
    for (char *p = f[3]; *p && n < 32;) {
        char *colon = strchr(p, ':');
        if (!colon) break;
        char *end = strchr(colon, ',');
        if (!end) end = colon + strlen(colon);
        size_t l;
        msgs[n].role = bufs[nb++] = unhex(p, (size_t)(colon - p), &l);
        msgs[n].content = bufs[nb++] = unhex(colon + 1, (size_t)(end - colon - 1), &l);
        n++;
        p = *end ? end + 1 : end;
    }
    size_t n_want;
    char *want = unhex(f[4], strlen(f[4]), &n_want);
    bool add = f[2][0] == '1';
    size_t need = chat_format(f[1], msgs, n, add, NULL, 0);
    char *got = malloc(need + 1);
    size_t got_n = chat_format(f[1], msgs, n, add, got, need + 1);
    S->chats++;
    bool ok = got_n == need && need == n_want && memcmp(got, want, n_want) == 0 && !got[need];
    if (!ok) {
        S->chat_fail++;
        fprintf(stderr, "  chat (%s, assistant %d) differs:\n--- want\n%s\n--- got\n%s\n---\n",
                f[1], add, want, got);
    }
    CHECK(ok);
    /* truncation: writes size-1 bytes and a NUL, still returns the full length */
    if (need > 10) {
        char small[11];
        CHECK(chat_format(f[1], msgs, n, add, small, sizeof small) == need);
        CHECK(memcmp(small, want, 10) == 0 && small[10] == 0);
    }
    for (int i = 0; i < nb; i++) free(bufs[i]);
    free(want);
    free(got);
}

static void run_file_case(const struct loaded *L, char **f, int nf) {
    if (nf < 6) { CHECKF(0, "malformed F line"); return; }
    FILE *fp = fopen(f[1], "rb");
    if (!fp) {
        tu_skip("test_tokenizer file case", "%s not present: make data", f[1]);
        return;
    }
    fseek(fp, 0, SEEK_END);
    long sz = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *data = malloc((size_t)sz + 1);
    size_t rd = fread(data, 1, (size_t)sz, fp);
    fclose(fp);
    char hx[17];
    snprintf(hx, sizeof hx, "%016llx", (unsigned long long)fnv1a64(data, rd));
    if (rd != strtoull(f[2], NULL, 10) || strcmp(hx, f[3]) != 0) {
        tu_skip("test_tokenizer file case", "%s differs from the file the golden ids were made "
                "from", f[1]);
        free(data);
        return;
    }
    int32_t *ids = malloc((rd + 1) * sizeof *ids);
    double best = 1e30;
    int n = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = kvs_time_ms();
        n = tokenizer_encode(L->tk, data, rd, false, false, ids, (int)rd + 1);
        double t = kvs_time_ms() - t0;
        if (t < best) best = t;
    }
    snprintf(hx, sizeof hx, "%016llx",
             (unsigned long long)fnv1a64(ids, (size_t)(n > 0 ? n : 0) * sizeof *ids));
    CHECKF(n == atoi(f[4]) && strcmp(hx, f[5]) == 0, "%s: %d ids (want %s), hash %s (want %s)",
           f[1], n, f[4], hx, f[5]);
    fprintf(stderr, "  %s: %zu bytes -> %d tokens in %.1f ms = %.2f MB/s (%s)\n", f[1], rd, n,
            best, rd / 1e6 / (best / 1e3), L->pre);
    size_t n_out;
    char *out = decode_all(L->tk, ids, n, &n_out);
    CHECKF(n_out == rd && memcmp(out, data, rd) == 0, "%s: decode(encode(x)) != x", f[1]);
    free(out);
    free(ids);
    free(data);
}

/* ---- checks that need no reference -------------------------------------------------------- */

struct thr { const struct tokenizer *tk; const char *text; size_t n; uint64_t hash; };

static void *thr_main(void *arg) {
    struct thr *t = arg;
    for (int r = 0; r < 20; r++) {
        int32_t ids[4096];
        int n = tokenizer_encode(t->tk, t->text, t->n, true, true, ids, 4096);
        uint64_t h = n > 0 ? fnv1a64(ids, (size_t)n * 4) : 0;
        if (r == 0) t->hash = h;
        else if (h != t->hash) t->hash = 0;
    }
    return NULL;
}

static void misc_checks(const struct loaded *L) {
    const struct tokenizer *tk = L->tk;
    int32_t ids[64];
    /* BOS, exact fit, overflow */
    int32_t bos = tokenizer_find(tk, "<|endoftext|>");
    CHECK(bos >= 0 && tokenizer_is_control(tk, bos));
    CHECK(tokenizer_find(tk, "<|im_start|>") >= 0);
    CHECK(tokenizer_find(tk, "definitely not a token") == -1);
    int n = tokenizer_encode(tk, "Hello world", 11, false, false, ids, 64);
    CHECK(n == 2);
    CHECK(tokenizer_encode(tk, "Hello world", 11, false, false, ids, 2) == 2);
    CHECK(tokenizer_encode(tk, "Hello world", 11, false, false, ids, 1) == -2);
    CHECK(tokenizer_encode(tk, "Hello world", 11, false, false, NULL, 0) == -2);
    CHECK(tokenizer_encode(tk, "", 0, false, false, ids, 64) == 0);
    int nb = tokenizer_encode(tk, "Hello world", 11, true, false, ids, 64);
    int32_t want_bos = -1;
    uint32_t bv;
    if (gguf_get_u32(L->g, "tokenizer.ggml.bos_token_id", &bv)) want_bos = (int32_t)bv;
    CHECK(want_bos < 0 ? nb == 2 : (nb == 3 && ids[0] == want_bos));
    /* control pieces only with special */
    int32_t im = tokenizer_find(tk, "<|im_end|>");
    char buf[64];
    CHECK(tokenizer_piece(tk, im, false, buf, sizeof buf) == 0);
    CHECK(tokenizer_piece(tk, im, true, buf, sizeof buf) == 10 && !memcmp(buf, "<|im_end|>", 10));
    CHECK(tokenizer_piece(tk, im, true, buf, 3) == 10 && !memcmp(buf, "<|i", 3));
    CHECK(tokenizer_piece(tk, -1, true, buf, sizeof buf) == 0);
    CHECK(tokenizer_piece(tk, tokenizer_n_vocab(tk), true, buf, sizeof buf) == 0);
    /* parse_special off: the text is split into ordinary tokens */
    n = tokenizer_encode(tk, "<|im_end|>", 10, false, false, ids, 64);
    CHECK(n > 1);
    for (int i = 0; i < n; i++) CHECK(!tokenizer_is_control(tk, ids[i]));
    CHECK(tokenizer_encode(tk, "<|im_end|>", 10, false, true, ids, 64) == 1 && ids[0] == im);

    /* arbitrary bytes (invalid UTF-8 included) round-trip, except bytes without a token */
    bool have[256];
    for (int b = 0; b < 256; b++) {
        unsigned char one = (unsigned char)b;
        int k = tokenizer_encode(tk, (const char *)&one, 1, false, false, ids, 64);
        have[b] = k == 1;
        CHECK(k == (have[b] ? 1 : 0));
    }
    tu_rng_state = 0x1234567ull;
    int rt_bad = 0;
    for (int rep = 0; rep < 300; rep++) {
        unsigned char s[200], want[200];
        size_t len = tu_rand_u64() % 200, nw = 0;
        for (size_t i = 0; i < len; i++) {
            uint64_t r = tu_rand_u64();
            /* mostly text-like bytes, some UTF-8 lead/continuation bytes and controls */
            static const char pool[] = "aZ09 \n\t'.<|>";
            s[i] = (r & 3) ? (unsigned char)pool[(r >> 8) % (sizeof pool - 1)]
                           : (unsigned char)(r >> 16);
            /* no lead bytes of code points >= U+0300, so NFC (qwen2) cannot change the text */
            if (s[i] >= 0xCC && s[i] <= 0xF4) s[i] = 0xFF;
            if (have[s[i]]) want[nw++] = s[i];
        }
        int32_t *v;
        int k = encode_all(tk, (const char *)s, len, false, false, &v);
        size_t n_out;
        char *out = decode_all(tk, v, k, &n_out);
        if (!(n_out == nw && memcmp(out, want, nw) == 0)) rt_bad++;
        free(v);
        free(out);
    }
    CHECKF(rt_bad == 0, "%d random byte strings did not round-trip", rt_bad);

    /* several threads encoding at once give identical results */
    static const char text[] = "<|im_start|>user\nThe café's 3 naïve 🦙 ran 12 km — fast!<|im_end|>";
    struct thr t[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        t[i] = (struct thr){tk, text, sizeof text - 1, 0};
        pthread_create(&th[i], NULL, thr_main, &t[i]);
    }
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 4; i++) CHECK(t[i].hash != 0 && t[i].hash == t[0].hash);

    /* a long run without pre-token boundaries (stresses the BPE heap) */
    size_t big = 200000;
    char *s = malloc(big);
    for (size_t i = 0; i < big; i++) s[i] = "abcdefgh"[(i * 7 + i / 3) % 8];
    int32_t *v;
    double t0 = kvs_time_ms();
    int k = encode_all(tk, s, big, false, false, &v);
    double dt = kvs_time_ms() - t0;
    size_t n_out;
    char *out = decode_all(tk, v, k, &n_out);
    CHECK(n_out == big && memcmp(out, s, big) == 0);
    CHECKF(dt < 2000, "200 KB single word took %.0f ms", dt);
    free(out);
    free(v);
    free(s);
}

static void stream_checks(void) {
    struct tok_stream st = {0};
    char out[64];
    /* "é" (C3 A9) split across pushes */
    CHECK(tok_stream_push(&st, "a\xC3", 2, out, sizeof out) == 1 && out[0] == 'a');
    CHECK(st.n_pend == 1);
    CHECK(tok_stream_push(&st, "\xA9", 1, out, sizeof out) == 2 && !memcmp(out, "\xC3\xA9", 2));
    CHECK(st.n_pend == 0);
    /* 4-byte emoji one byte at a time */
    const char *llama = "\xF0\x9F\xA6\x99";
    size_t tot = 0;
    for (int i = 0; i < 4; i++) tot += tok_stream_push(&st, llama + i, 1, out + tot, sizeof out - tot);
    CHECK(tot == 4 && !memcmp(out, llama, 4));
    /* invalid bytes become U+FFFD; a valid char after them survives */
    size_t n = tok_stream_push(&st, "\xFFx\x80", 3, out, sizeof out);
    CHECK(n == 7 && !memcmp(out, "\xEF\xBF\xBDx\xEF\xBF\xBD", 7));
    /* a broken sequence: lead byte followed by ASCII */
    n = tok_stream_push(&st, "\xE2\x82", 2, out, sizeof out);
    CHECK(n == 0 && st.n_pend == 2);
    n = tok_stream_push(&st, "A", 1, out, sizeof out);
    CHECK(n == 4 && !memcmp(out, "\xEF\xBF\xBD" "A", 4));
    /* surrogates and overlongs are invalid */
    n = tok_stream_push(&st, "\xED\xA0\x80", 3, out, sizeof out);
    CHECK(n == 9);
    n = tok_stream_push(&st, "\xC0\xAF", 2, out, sizeof out);
    CHECK(n == 6);
    /* flush of an incomplete tail gives one U+FFFD */
    CHECK(tok_stream_push(&st, "\xF0\x9F", 2, out, sizeof out) == 0);
    CHECK(tok_stream_flush(&st, out, sizeof out) == 3 && !memcmp(out, "\xEF\xBF\xBD", 3));
    CHECK(st.n_pend == 0 && tok_stream_flush(&st, out, sizeof out) == 0);
    /* small output buffer: the count is still complete */
    n = tok_stream_push(&st, "hello", 5, out, 2);
    CHECK(n == 5 && !memcmp(out, "he", 2));
}

static void chat_checks(void) {
    struct chat_msg m[2] = {{"user", "hi"}, {"assistant", "yo"}};
    char buf[512];
    size_t n = chat_format(NULL, m, 2, true, buf, sizeof buf);
    const char *want = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
                       "<|im_start|>assistant\n";
    CHECK(n == strlen(want) && !strcmp(buf, want));
    CHECK(chat_format("smollm", NULL, 0, false, buf, sizeof buf) == 0 && buf[0] == 0);
    n = chat_format("qwen2", NULL, 0, true, buf, sizeof buf);
    CHECK(n > 0 && strstr(buf, "You are Qwen, created by Alibaba Cloud.") != NULL);
    CHECK(chat_format("smollm", m, 1, false, NULL, 0) > 0);
}

int main(void) {
    bool verbose = getenv("KVS_TOK_VERBOSE") != NULL;
    stream_checks();
    chat_checks();
    int models_run = 0;
    const char *only = getenv("KVS_TOK_GOLDEN");
    if (only) GOLDEN[0] = only;
    for (size_t gi = 0; gi < (only ? 1 : sizeof GOLDEN / sizeof *GOLDEN); gi++) {
        FILE *fp = fopen(GOLDEN[gi], "r");
        if (!fp) {
            CHECKF(0, "cannot open %s", GOLDEN[gi]);
            continue;
        }
        struct loaded L;
        bool have_model = false;
        struct stats S = {0};
        size_t cap = 1 << 16;
        char *line = malloc(cap);
        ssize_t len;
        while ((len = getline(&line, &cap, fp)) >= 0) {
            if (len && line[len - 1] == '\n') line[--len] = 0;
            if (!len || line[0] == '#') continue;
            char *f[8];
            int nf = split_tabs(line, f, 8);
            if (f[0][0] == 'M') {
                FILE *mf = fopen(f[1], "rb");
                if (!mf) {
                    tu_skip(GOLDEN[gi], "%s not present: make %s", f[1],
                            strstr(f[1], "qwen") ? "models-large" : "models");
                    break;
                }
                fclose(mf);
                if (!load(f[1], nf > 3 ? f[3] : NULL, &L)) {
                    CHECKF(0, "could not load %s", f[1]);
                    break;
                }
                have_model = true;
                CHECK(tokenizer_n_vocab(L.tk) == atoi(f[2]));
                misc_checks(&L);
                continue;
            }
            if (f[0][0] == 'C') { run_chat_case(f, nf, &S); continue; }
            if (!have_model) continue;
            if (f[0][0] == 'T') run_text_case(&L, f, nf, &S, verbose);
            else if (f[0][0] == 'F') run_file_case(&L, f, nf);
        }
        free(line);
        fclose(fp);
        if (have_model) {
            models_run++;
            fprintf(stderr, "  %s: %d cases, %d id mismatches, %d round-trip mismatches; "
                    "%d chat cases, %d mismatches\n", GOLDEN[gi], S.cases, S.id_fail,
                    S.rt_fail, S.chats, S.chat_fail);
            unload(&L);
        }
    }
    if (!models_run) return tu_failures ? tu_finish("test_tokenizer") : 77;
    return tu_finish("test_tokenizer");
}
