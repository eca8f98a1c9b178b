/* test_report.c — the JSONL reader (good, bad, deep, huge and fuzzed lines; writer round trip)
 * and eval_report on a synthetic results directory: CSV rows and quoting, the means in report.md
 * recomputed here from the records as written, the peer table, a malformed line and a duplicate
 * run key, and the figures (PNG signature, <svg) when gnuplot is on PATH, or the "not rendered"
 * note when it is not. Needs no model; runs in well under a second without gnuplot. */
#include "eval/jsonl.h"
#include "eval/report.h"
#include "testutil.h"

#include <stdbool.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---------------------------------------------------------------------------------------------
 * parser */

static bool parses(const char *s, size_t n, char *err, size_t err_size) {
    struct jsonl_obj o;
    bool ok = jsonl_parse(s, n, &o, err, err_size);
    jsonl_obj_free(&o);
    return ok;
}

static const char *GOOD =
    "{\"s\":\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\\u00e9\\ud83d\\ude00\", \"n\": -1.5e-3, \"z\":0,"
    " \"e\":1E+2, \"t\":true, \"f\":false, \"x\":null, \"arr\":[\"p\", \"q\\u0041\"], \"empty\":[],"
    " \"nested\":{\"a\":[1,{\"b\":[2,{}]}]}, \"nums\":[1,2.5], \"mixed\":[\"a\",1], \"deep\":[[\"a\"]],"
    " \"after\" : \"ok\" , \"nan\":NaN, \"inf\":-Infinity, \"dup\":1, \"dup\":2}\r\n";

static void test_parser(void) {
    char err[256];
    struct jsonl_obj o;
    CHECKF(jsonl_parse(GOOD, strlen(GOOD), &o, err, sizeof err), "%s", err);
    CHECK(!strcmp(jsonl_get_str(&o, "s"), "a\"b\\c/d\b\f\n\r\t\xC3\xA9\xF0\x9F\x98\x80"));
    CHECK(jsonl_get_num(&o, "n") == -1.5e-3);
    CHECK(!strcmp(jsonl_get(&o, "n")->str, "-1.5e-3"));
    CHECK(jsonl_get_num(&o, "z") == 0 && jsonl_get_num(&o, "e") == 100);
    CHECK(jsonl_get(&o, "t")->type == JSONL_BOOL && jsonl_get(&o, "t")->b);
    CHECK(jsonl_get(&o, "f")->type == JSONL_BOOL && !jsonl_get(&o, "f")->b);
    CHECK(jsonl_get(&o, "x")->type == JSONL_NULL && isnan(jsonl_get_num(&o, "x")));
    CHECK(jsonl_get_str(&o, "x") == NULL && jsonl_get_str(&o, "n") == NULL);
    const struct jsonl_value *a = jsonl_get(&o, "arr");
    CHECK(a && a->type == JSONL_STRINGS && a->n_items == 2 && !strcmp(a->items[1], "qA"));
    a = jsonl_get(&o, "empty");
    CHECK(a && a->type == JSONL_STRINGS && a->n_items == 0);
    /* objects and arrays of non-strings: the key, typed JSONL_OTHER, with no content */
    const char *other[] = {"nested", "nums", "mixed", "deep"};
    for (int i = 0; i < 4; i++) {
        a = jsonl_get(&o, other[i]);
        CHECKF(a && a->type == JSONL_OTHER && !a->str && !a->items, "%s", other[i]);
        CHECK(!jsonl_get_str(&o, other[i]) && isnan(jsonl_get_num(&o, other[i])));
    }
    CHECK(!strcmp(jsonl_get_str(&o, "after"), "ok"));
    CHECK(isnan(jsonl_get_num(&o, "nan")) && jsonl_get(&o, "nan")->type == JSONL_NUMBER);
    CHECK(isinf(jsonl_get_num(&o, "inf")) && jsonl_get_num(&o, "inf") < 0);
    CHECK(jsonl_get_num(&o, "dup") == 2); /* last wins */
    CHECK(isnan(jsonl_get_num(&o, "absent")) && !jsonl_get_str(&o, "absent"));
    jsonl_obj_free(&o);

    /* U+FFFD for a lone surrogate, \u0000 and invalid UTF-8; a valid pair after a lone one */
    const char *rep = "{\"a\":\"\\ud800x\\u0000\xFF\xC0\xAF\\udc00\\ud83d\\ude00\"}";
    CHECK(jsonl_parse(rep, strlen(rep), &o, err, sizeof err));
    CHECK(o.n_fields == 1 && !strcmp(jsonl_get_str(&o, "a"),
          "\xEF\xBF\xBDx\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xF0\x9F\x98\x80"));
    jsonl_obj_free(&o);
    CHECK(parses("{}", 2, err, sizeof err) && parses(" {\"a\":{}} ", 10, err, sizeof err));

    static const char *bad[] = {
        "", "   ", "{", "}", "[1,2]", "\"a\"", "{\"a\":\"b", "{\"a\":1", "{\"a\":\"\\x\"}",
        "{\"a\":\"\\u12G4\"}", "{\"a\":\"\\u12\"}", "{\"a\":\"\\", "{\"a\":01}", "{\"a\":1.}",
        "{\"a\":.5}", "{\"a\":-}", "{\"a\":1e}", "{\"a\":+1}", "{\"a\":1,}", "{\"a\" 1}",
        "{\"a\":1} x", "{\"a\":1}{}", "{\"a\":\"tab\there\"}", "{\"a\":[1,2,]}", "{\"a\":[,]}",
        "{\"a\":tru}", "{\"a\":nan}", "{\"a\":NaNa}", "{1:2}", "{\"a\":1 \"b\":2}", "{,}",
        "{\"a\":[\"x\",}", "{\"a\":{\"b\"}}", "{\"a\":-Inf}", "{'a':1}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        err[0] = 0;
        bool ok = parses(bad[i], strlen(bad[i]), err, sizeof err);
        CHECKF(!ok && strstr(err, "column "), "accepted or no message: %s -> %s", bad[i], err);
    }
    CHECK(!parses("{\"a\":\"b\0c\"}", 11, err, sizeof err)); /* NUL byte inside the line */
    CHECK(!parses(NULL, 0, err, sizeof err));
    /* every proper prefix of a good line is incomplete */
    size_t good_len = strlen(GOOD) - 2; /* without the CRLF */
    int prefix_ok = 0;
    for (size_t n = 0; n < good_len; n++) prefix_ok += parses(GOOD, n, NULL, 0);
    CHECK(prefix_ok == 0);

    /* nesting: bounded depth, no stack overflow */
    size_t nd = 100000;
    char *deep = malloc(2 * nd + 16);
    strcpy(deep, "{\"a\":");
    size_t k = strlen(deep);
    memset(deep + k, '[', nd);
    memset(deep + k + nd, ']', nd);
    strcpy(deep + k + 2 * nd, "}");
    CHECK(!parses(deep, strlen(deep), err, sizeof err) && strstr(err, "nested"));
    k = strlen("{\"a\":");
    memset(deep + k, '[', 60);
    memset(deep + k + 60, ']', 60);
    strcpy(deep + k + 120, "}");
    CHECKF(parses(deep, strlen(deep), err, sizeof err), "%s", err);
    free(deep);

    /* a 4 MB string with escapes every 1000 bytes */
    size_t nh = 4u << 20;
    char *huge = malloc(nh + 64);
    strcpy(huge, "{\"big\":\"");
    k = strlen(huge);
    size_t want = 0;
    for (size_t i = 0; i < nh; i++, want++) {
        if (i % 1000 == 999) { memcpy(huge + k, "\\n", 2); k += 2; i++; }
        else huge[k++] = 'x';
    }
    strcpy(huge + k, "\"}");
    CHECK(jsonl_parse(huge, strlen(huge), &o, err, sizeof err));
    CHECK(jsonl_get_str(&o, "big") && strlen(jsonl_get_str(&o, "big")) == want);
    jsonl_obj_free(&o);
    free(huge);

    /* fuzz: random byte edits and truncations of a good line never crash (ASan in make check) */
    size_t gl = strlen(GOOD);
    char *m = malloc(gl + 1);
    int n_ok = 0;
    for (int it = 0; it < 30000; it++) {
        memcpy(m, GOOD, gl + 1);
        int edits = 1 + (int)(tu_rand_u64() % 4);
        for (int e = 0; e < edits; e++) {
            size_t at = tu_rand_u64() % gl;
            static const char alphabet[] = "{}[]\",:\\u0123456789eE+-.tfnNI \x80\xC3\xFF\x01";
            m[at] = tu_rand_u64() % 2 ? alphabet[tu_rand_u64() % (sizeof alphabet - 1)] : (char)tu_rand_u64();
        }
        n_ok += parses(m, tu_rand_u64() % 8 ? gl : tu_rand_u64() % gl, err, sizeof err);
    }
    CHECK(n_ok > 0 && n_ok < 30000);
    free(m);
}

static void test_writer(void) {
    char in[80], *buf = NULL;
    size_t n = 0, k = 0;
    for (int c = 1; c < 32; c++) in[k++] = (char)c;
    memcpy(in + k, "\"\\/\xC3\xA9\xFF|", 8);
    in[k + 8] = 0;
    FILE *f = open_memstream(&buf, &n);
    fputs("{\"k\":", f);
    jsonl_write_string(f, in);
    fputs(",\"z\":", f);
    jsonl_write_string(f, NULL);
    fputs("}", f);
    fclose(f);
    bool raw_ctl = false;
    for (size_t i = 0; i < n; i++) raw_ctl |= (unsigned char)buf[i] < 0x20;
    CHECK(!raw_ctl && strstr(buf, "\\u0001") && strstr(buf, "\\u001f") && strstr(buf, "\\ufffd"));
    CHECK(strstr(buf, "\xC3\xA9") != NULL); /* UTF-8 passed through */
    struct jsonl_obj o;
    char err[200];
    CHECKF(jsonl_parse(buf, n, &o, err, sizeof err), "%s: %s", buf, err);
    char want[96];
    memcpy(want, in, k + 5);
    strcpy(want + k + 5, "\xEF\xBF\xBD|");
    CHECK(jsonl_get_str(&o, "k") && !strcmp(jsonl_get_str(&o, "k"), want));
    CHECK(jsonl_get(&o, "z") && jsonl_get(&o, "z")->type == JSONL_NULL);
    jsonl_obj_free(&o);
    free(buf);
}

/* ---------------------------------------------------------------------------------------------
 * report on synthetic results: the test keeps what it wrote and recomputes every mean */

struct trec { const char *sys, *method, *mode, *task, *fam; double ratio, length, score, kvp, kvf, dec; };
struct prec { const char *sys, *method; double budget, ppl, kl, n_tokens; };

static struct trec T[512];
static int nT;
static struct prec P[64];
static int nP;

static const char *TASKS[][2] = {{"niah_single_1", "niah"}, {"niah_multikey_2", "niah_multi"}, {"vt", "vt"}};

static void write_task(FILE *f, const char *sys, const char *run, const struct trec *t, bool keep) {
    fprintf(f, "{\"system\":\"%s\",\"run\":\"%s\",\"kind\":\"task\",\"model\":\"TestLM-1M\","
               "\"model_sha256\":\"0123456789abcdef0123\",\"method\":\"%s\",\"kv\":\"%s:ratio=%g\","
               "\"ratio\":%.17g,\"mode\":\"%s\",\"task\":\"%s\",\"family\":\"%s\",\"length\":%.0f,"
               "\"seed\":1,\"sample\":0,\"score\":%.17g,\"answer\":\"x\",\"expected\":[\"x\",\"y\"],"
               "\"kv_bytes_peak\":%.0f,\"kv_bytes_full\":%.0f,\"decode_tok_s\":%.17g,\"git\":\"abc1234\"}\n",
            sys, run, t->method, t->method, t->ratio, t->ratio, t->mode, t->task, t->fam, t->length,
            t->score, t->kvp, t->kvf, t->dec);
    if (keep) T[nT++] = *t, T[nT - 1].sys = sys;
}

static void write_results(const char *dir, bool with_peers) {
    char path[512];
    nT = nP = 0;
    snprintf(path, sizeof path, "%s/results.jsonl", dir);
    FILE *f = fopen(path, "w");
    static const char *methods[] = {"full", "snapkv", "streaming"}, *modes[] = {"aware", "agnostic"};
    static const double ratios[] = {0.5, 0.25}, lengths[] = {1024, 2048};
    int run = 0;
    char key[32];
    /* a record that a later line with the same run key replaces */
    struct trec stale = {0, "snapkv", "aware", "vt", "vt", 0.5, 1024, 0.0, 1, 1, 1};
    write_task(f, "kvsieve", "r-dup", &stale, false);
    fputs("{\"run\": \"broken\", \"score\": }\n\n", f); /* malformed, then a blank line */
    for (int me = 0; me < 3; me++)
        for (int ra = 0; ra < (me ? 2 : 1); ra++)
            for (int mo = 0; mo < 2; mo++)
                for (int ta = 0; ta < 3; ta++)
                    for (int le = 0; le < 2; le++)
                        for (int sa = 0; sa < 2; sa++) {
                            double r = me ? ratios[ra] : 1;
                            struct trec t = {0, methods[me], modes[mo], TASKS[ta][0], TASKS[ta][1], r,
                                             lengths[le], (double)((run * 7 + me * 3 + ta) % 5) / 4,
                                             r * 1000 * lengths[le] + 64 * sa, 1000 * lengths[le],
                                             50 + 10 * me + ra + 0.25 * sa};
                            bool dup = me == 1 && ra == 0 && mo == 0 && ta == 2 && le == 0 && sa == 0;
                            snprintf(key, sizeof key, "r%d", run++);
                            write_task(f, "kvsieve", dup ? "r-dup" : key, &t, true);
                        }
    /* an answer with quotes, a comma, a newline and non-ASCII text, for the CSV quoting */
    fputs("{\"run\":\"esc\",\"kind\":\"task\",\"model\":\"TestLM-1M\",\"method\":\"knorm\",\"ratio\":0.5,"
          "\"mode\":\"aware\",\"task\":\"qa_1\",\"length\":1024,\"score\":1,"
          "\"answer\":\"he said \\\"hi\\\", then\\nleft \\u00e9 \\ud83d\\ude00\",\"expected\":[\"a|b\",\"c\"]}\n", f);
    T[nT++] = (struct trec){"kvsieve", "knorm", "aware", "qa_1", "qa", 0.5, 1024, 1, NAN, NAN, NAN};
    /* ppl: full, and two budgets for two methods, two records per cell with different n_tokens */
    P[nP++] = (struct prec){"kvsieve", "full", 0, 10, 0, 1000};
    for (int me = 1; me < 3; me++)
        for (int b = 64; b <= 128; b *= 2)
            for (int i = 0; i < 2; i++)
                P[nP++] = (struct prec){"kvsieve", methods[me], b, 10 + me * 4096.0 / b + i, 0.01 * me + 0.002 * i + 1.0 / b,
                                        500.0 * (i + 1)};
    for (int i = 0; i < nP; i++)
        fprintf(f, "{\"run\":\"p%d\",\"kind\":\"ppl\",\"model\":\"TestLM-1M\",\"method\":\"%s\",\"budget\":%.0f,"
                   "\"mode\":\"chunk\",\"task\":\"ppl\",\"family\":\"ppl\",\"length\":4096,\"ppl\":%.17g,"
                   "\"kl\":%.17g,\"n_tokens\":%.0f,\"git\":\"abc1234\"}\n",
                i, P[i].method, P[i].budget, P[i].ppl, P[i].kl, P[i].n_tokens);
    fclose(f);
    if (!with_peers) return;
    /* peers: kvpress snapkv 0.5 and full on niah_single_1 @1024, aware */
    snprintf(path, sizeof path, "%s/peer_kvpress.jsonl", dir);
    f = fopen(path, "w");
    for (int me = 0; me < 2; me++)
        for (int sa = 0; sa < 2; sa++) {
            struct trec t = {0, methods[me], "aware", "niah_single_1", "niah", me ? 0.5 : 1, 1024,
                             sa ? 0.5 : 1, me ? 512e3 : 1024e3, 1024e3, 20 + sa};
            snprintf(key, sizeof key, "k%d", run++);
            write_task(f, "kvpress", key, &t, true);
        }
    fclose(f);
}

/* mean of the task records matching (NULL = any), in %; n counts them */
static double tmean(const char *sys, const char *method, double ratio, const char *mode, const char *task,
                    const char *fam, double length, int *n) {
    double s = 0;
    int k = 0;
    for (int i = 0; i < nT; i++) {
        const struct trec *t = &T[i];
        if ((sys && strcmp(t->sys, sys)) || (method && strcmp(t->method, method)) || t->ratio != ratio ||
            (mode && strcmp(t->mode, mode)) || (task && strcmp(t->task, task)) || (fam && strcmp(t->fam, fam)) ||
            (length > 0 && t->length != length))
            continue;
        s += 100 * t->score;
        k++;
    }
    if (n) *n = k;
    return k ? s / k : NAN;
}

static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)len + 1);
    size_t got = fread(b, 1, (size_t)len, f);
    b[got] = 0;
    fclose(f);
    if (n) *n = got;
    return b;
}

/* the text from the line starting with heading to the next "### " (or the end) */
static char *section(const char *md, const char *heading) {
    const char *s = strstr(md, heading);
    if (!s) return NULL;
    const char *e = strstr(s + 1, "\n### ");
    size_t n = e ? (size_t)(e - s) : strlen(s);
    return strndup(s, n);
}

static bool contains(const char *hay, const char *needle) {
    bool ok = hay && strstr(hay, needle);
    if (!ok) fprintf(stderr, "  missing: %s\n", needle);
    return ok;
}

/* RFC 4180 records in a CSV text */
static int csv_records(const char *s) {
    int n = 0;
    bool q = false, any = false;
    for (; *s; s++) {
        if (*s == '"') q = !q;
        else if (*s == '\n' && !q) { n++; any = false; continue; }
        any = true;
    }
    return n + any;
}

static bool file_starts(const char *path, const char *magic, size_t n) {
    size_t len;
    char *b = slurp(path, &len);
    bool ok = b && len >= n && !memcmp(b, magic, n);
    free(b);
    return ok;
}

/* a and b both occur in s, a first (strstr's NULL for a missing one never compares) */
static bool before(const char *s, const char *a, const char *b) {
    const char *pa = s ? strstr(s, a) : NULL, *pb = s ? strstr(s, b) : NULL;
    return pa && pb && pa < pb;
}

static void test_report(const char *dir, bool have_gnuplot) {
    char err[512], path[512];
    write_results(dir, true);
    int rc = eval_report(dir, NULL, 0, err, sizeof err);
    CHECKF(rc == 0, "%s", err);

    /* CSV: a header and one row per kept record, RFC 4180 quoting */
    snprintf(path, sizeof path, "%s/results.csv", dir);
    char *csv = slurp(path, NULL);
    const char *head = "system,run,kind,model,model_sha256,method,kv,ratio,budget,mode,task,family,"
                       "length,seed,sample,score,answer,expected,ppl,kl,n_tokens,kv_bytes,kv_bytes_peak,"
                       "kv_bytes_full,prefill_tok_s,decode_tok_s,git,time\r\n";
    CHECK(csv && !strncmp(csv, head, strlen(head)));
    CHECKF(csv_records(csv) == 1 + nT + nP, "%d CSV records, want %d", csv_records(csv), 1 + nT + nP);
    CHECK(contains(csv, ",\"he said \"\"hi\"\", then\nleft \xC3\xA9 \xF0\x9F\x98\x80\",a|b|c,"));
    CHECK(contains(csv, "kvpress,k"));
    free(csv);

    snprintf(path, sizeof path, "%s/report.md", dir);
    char *md = slurp(path, NULL), line[1024];
    CHECK(md != NULL);
    if (!md) return;
    CHECK(contains(md, "TestLM-1M (sha256 `0123456789ab…`)"));
    CHECK(contains(md, "1 malformed line; 1 record replaced"));
    CHECK(!strstr(md, "nan") && !strstr(md, "inf |") && !strstr(md, "| inf"));

    /* summary, aware: header, full first, a snapkv row recomputed */
    char *s = section(md, "### Summary, question-aware");
    CHECK(contains(s, "| system | method | ratio | niah | niah_multi | vt | qa | overall | n | KV % of full | decode tok/s |"));
    CHECK(before(s, "| kvsieve | full | 1 |", "| kvsieve | snapkv | 0.5 |"));
    CHECK(before(s, "| kvsieve | snapkv | 0.5 |", "| kvsieve | snapkv | 0.25 |"));
    CHECK(before(s, "| kvsieve | snapkv | 0.5 |", "| kvpress | snapkv | 0.5 |"));
    int n;
    double kvp = 0, kvf = 0, dec = 0;
    for (int i = 0; i < nT; i++)
        if (!strcmp(T[i].sys, "kvsieve") && !strcmp(T[i].method, "snapkv") && T[i].ratio == 0.5 && !strcmp(T[i].mode, "aware"))
            kvp += T[i].kvp, kvf += T[i].kvf, dec += T[i].dec;
    double all = tmean("kvsieve", "snapkv", 0.5, "aware", NULL, NULL, 0, &n);
    snprintf(line, sizeof line, "| kvsieve | snapkv | 0.5 | %.1f | %.1f | %.1f | %s | %.1f | %d | %.1f | %.1f |",
             tmean("kvsieve", "snapkv", 0.5, "aware", NULL, "niah", 0, NULL),
             tmean("kvsieve", "snapkv", 0.5, "aware", NULL, "niah_multi", 0, NULL),
             tmean("kvsieve", "snapkv", 0.5, "aware", NULL, "vt", 0, NULL), "\xE2\x80\x93", all, n,
             100 * kvp / kvf, dec / n);
    CHECK(contains(s, line));
    free(s);
    /* knorm has only the qa record: other families and the KV/decode columns are "–" */
    s = section(md, "### Summary, question-aware");
    CHECK(contains(s, "| kvsieve | knorm | 0.5 | – | – | – | 100.0 | 100.0 | 1 | – | – |"));
    free(s);

    /* per task, agnostic */
    s = section(md, "### Per task, question-agnostic");
    snprintf(line, sizeof line, "| kvsieve | streaming | 0.25 | %.1f | %.1f |",
             tmean("kvsieve", "streaming", 0.25, "agnostic", "niah_single_1", NULL, 1024, NULL),
             tmean("kvsieve", "streaming", 0.25, "agnostic", "niah_single_1", NULL, 2048, NULL));
    CHECK(contains(s, "| niah_single_1@1024 | niah_single_1@2048 | niah_multikey_2@1024 |"));
    CHECK(contains(s, line));
    free(s);

    /* ppl / KL pooled over tokens */
    s = section(md, "### Perplexity / KL");
    CHECK(contains(s, "| system | method | full (no budget) | 64 | 128 |"));
    CHECK(contains(s, "| kvsieve | full | 10.000 / 0.0000 | – | – |"));
    for (int me = 0; me < 2; me++) {
        const char *meth = me ? "streaming" : "snapkv";
        int k = snprintf(line, sizeof line, "| kvsieve | %s | – |", meth);
        for (int b = 64; b <= 128; b *= 2) {
            double lw = 0, kw = 0, w = 0;
            for (int i = 0; i < nP; i++)
                if (!strcmp(P[i].method, meth) && P[i].budget == b)
                    lw += P[i].n_tokens * log(P[i].ppl), kw += P[i].n_tokens * P[i].kl, w += P[i].n_tokens;
            k += snprintf(line + k, sizeof line - (size_t)k, " %.3f / %.4f |", exp(lw / w), kw / w);
        }
        CHECK(contains(s, line));
    }
    free(s);

    /* peers side by side */
    s = section(md, "### kvsieve vs peers");
    int n1, n2;
    double m1 = tmean("kvsieve", "snapkv", 0.5, "aware", "niah_single_1", NULL, 1024, &n1);
    double m2 = tmean("kvpress", "snapkv", 0.5, "aware", "niah_single_1", NULL, 1024, &n2);
    snprintf(line, sizeof line, "| niah_single_1 | 1024 | aware | snapkv | 0.5 | %.1f (n=%d) | %.1f (n=%d) |", m1, n1, m2, n2);
    CHECK(contains(s, "| task | length | mode | method | ratio | kvsieve | kvpress |"));
    CHECK(contains(s, line));
    CHECK(s && !strstr(s, "| vt |")); /* rows without a peer are left out */
    free(s);

    /* figures: data and scripts always; images when gnuplot ran */
    static const char *figs[] = {"score_vs_ratio_aware", "score_vs_ratio_agnostic", "kvbytes_vs_ratio",
                                 "decode_vs_ratio", "ppl_vs_budget", "kl_vs_budget"};
    for (size_t i = 0; i < sizeof figs / sizeof *figs; i++) {
        snprintf(path, sizeof path, "%s/plots/%s.gp", dir, figs[i]);
        CHECKF(access(path, R_OK) == 0, "%s", path);
        snprintf(path, sizeof path, "%s/plots/%s.dat", dir, figs[i]);
        CHECKF(access(path, R_OK) == 0, "%s", path);
        if (!have_gnuplot) continue;
        snprintf(path, sizeof path, "%s/plots/%s.png", dir, figs[i]);
        CHECKF(file_starts(path, "\x89PNG\r\n\x1a\n", 8), "%s", path);
        snprintf(path, sizeof path, "%s/plots/%s.svg", dir, figs[i]);
        char *svg = slurp(path, NULL);
        CHECKF(svg && strstr(svg, "<svg"), "%s", path);
        free(svg);
        snprintf(line, sizeof line, "](plots/%s.png)", figs[i]);
        CHECK(contains(md, line));
    }
    snprintf(path, sizeof path, "%s/plots/score_vs_ratio_chunk.gp", dir); /* ppl mode: no score figure */
    CHECK(access(path, F_OK) != 0);
    free(md);
}

/* no gnuplot on PATH, peers given as an extra file; bad inputs */
static void test_report_no_gnuplot(const char *dir) {
    char err[512], path[512], extra[512];
    write_results(dir, true);
    snprintf(path, sizeof path, "%s/peer_kvpress.jsonl", dir);
    snprintf(extra, sizeof extra, "%s/other.jsonl", dir);
    CHECK(rename(path, extra) == 0);
    char *old_path = getenv("PATH") ? strdup(getenv("PATH")) : NULL;
    setenv("PATH", "/nonexistent", 1);
    const char *extras[] = {extra};
    int rc = eval_report(dir, extras, 1, err, sizeof err);
    if (old_path) setenv("PATH", old_path, 1);
    free(old_path);
    CHECKF(rc == 0, "%s", err);
    snprintf(path, sizeof path, "%s/report.md", dir);
    char *md = slurp(path, NULL);
    CHECK(contains(md, "Plots were not rendered"));
    CHECK(contains(md, "| kvsieve | kvpress |"));
    CHECK(contains(md, "[gnuplot script](plots/score_vs_ratio_aware.gp)"));
    CHECK(md && !strstr(md, ".png)"));
    free(md);
    snprintf(path, sizeof path, "%s/plots/score_vs_ratio_aware.png", dir);
    CHECK(access(path, F_OK) != 0);

    const char *missing[] = {"/nonexistent/x.jsonl"};
    err[0] = 0;
    CHECK(eval_report(dir, missing, 1, err, sizeof err) != 0 && strstr(err, "/nonexistent/x.jsonl"));
    err[0] = 0;
    CHECK(eval_report("/nonexistent-dir", NULL, 0, err, sizeof err) != 0 && err[0]);
    snprintf(path, sizeof path, "%s/results.jsonl", dir);
    FILE *f = fopen(path, "w");
    fputs("not json\n", f);
    fclose(f);
    remove(extra);
    err[0] = 0;
    CHECK(eval_report(dir, NULL, 0, err, sizeof err) != 0 && strstr(err, "no result records"));
}

int main(void) {
    test_parser();
    test_writer();
    char d1[] = "/tmp/kvs_report_XXXXXX", d2[] = "/tmp/kvs_report_XXXXXX";
    if (!mkdtemp(d1) || !mkdtemp(d2)) {
        perror("mkdtemp");
        return 1;
    }
    bool have_gnuplot = system("command -v gnuplot >/dev/null 2>&1") == 0;
    if (!have_gnuplot) tu_skip("test_report image checks", "gnuplot not on PATH");
    test_report(d1, have_gnuplot);
    test_report_no_gnuplot(d2);
    if (!tu_failures && !getenv("KVS_TEST_KEEP")) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", d1, d2);
        if (system(cmd) != 0) fprintf(stderr, "could not remove %s, %s\n", d1, d2);
    } else fprintf(stderr, "outputs kept in %s and %s (KVS_TEST_KEEP)\n", d1, d2);
    return tu_finish("test_report");
}
