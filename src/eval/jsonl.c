/* jsonl.c — recursive-descent parser for one JSON object per line, and a JSON string writer.
 *
 * Does: validate the whole line against the JSON grammar (numbers by the exact RFC 8259 syntax,
 * no trailing commas, no control characters inside strings, nothing after the object) and keep
 * the top-level fields (scalars and arrays of strings with their values; objects and other arrays
 * as JSONL_OTHER, content dropped). See jsonl.h for the decoding
 * rules (U+FFFD replacements) and the NaN/Infinity extension.
 * Does not: build a tree (nested values are validated and dropped), or allocate anything that the
 * returned object does not own: on failure every partial allocation is released here.
 */
#include "eval/jsonl.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------------
 * growable byte buffer */

struct sbuf { char *b; size_t n, cap; };

static bool sb_put(struct sbuf *s, const void *d, size_t n) {
    if (s->n + n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 32;
        while (cap < s->n + n + 1) {
            if (cap > SIZE_MAX / 2) return false;
            cap *= 2;
        }
        char *b = realloc(s->b, cap);
        if (!b) return false;
        s->b = b;
        s->cap = cap;
    }
    memcpy(s->b + s->n, d, n);
    s->n += n;
    s->b[s->n] = 0;
    return true;
}

static bool sb_put_cp(struct sbuf *s, uint32_t cp) { /* code point as UTF-8 */
    unsigned char u[4];
    size_t n;
    if (cp < 0x80) { u[0] = (unsigned char)cp; n = 1; }
    else if (cp < 0x800) { u[0] = 0xC0 | (cp >> 6); u[1] = 0x80 | (cp & 63); n = 2; }
    else if (cp < 0x10000) {
        u[0] = 0xE0 | (cp >> 12); u[1] = 0x80 | ((cp >> 6) & 63); u[2] = 0x80 | (cp & 63); n = 3;
    } else {
        u[0] = 0xF0 | (cp >> 18); u[1] = 0x80 | ((cp >> 12) & 63);
        u[2] = 0x80 | ((cp >> 6) & 63); u[3] = 0x80 | (cp & 63); n = 4;
    }
    return sb_put(s, u, n);
}

#define REPLACEMENT 0xFFFD

int jsonl_utf8_len(const unsigned char *p, const unsigned char *end) {
    if (p >= end) return 0;
    unsigned c = p[0];
    if (c < 0x80) return 1;
    int n;
    unsigned lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0) lo = 0xA0;      /* overlong */
        else if (c == 0xED) hi = 0x9F; /* surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0) lo = 0x90;      /* overlong */
        else if (c == 0xF4) hi = 0x8F; /* above U+10FFFF */
    } else return 0;
    if (end - p < n) return 0;
    if (p[1] < lo || p[1] > hi) return 0;
    for (int i = 2; i < n; i++)
        if ((p[i] & 0xC0) != 0x80) return 0;
    return n;
}

/* ---------------------------------------------------------------------------------------------
 * parser */

struct jp {
    const unsigned char *p, *end, *start;
    char *err;
    size_t err_size;
};

static bool fail(struct jp *j, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool fail(struct jp *j, const char *fmt, ...) {
    if (!j->err || !j->err_size) return false;
    int k = snprintf(j->err, j->err_size, "column %zu: ", (size_t)(j->p - j->start) + 1);
    if (k >= 0 && (size_t)k < j->err_size) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(j->err + k, j->err_size - (size_t)k, fmt, ap);
        va_end(ap);
    }
    return false;
}

static void skip_ws(struct jp *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

/* what is at p, for messages: a printable character or its byte value */
static const char *show(struct jp *j, char buf[16]) {
    if (j->p >= j->end) return "end of line";
    unsigned c = *j->p;
    if (c >= 0x20 && c < 0x7F) snprintf(buf, 16, "'%c'", (char)c);
    else snprintf(buf, 16, "byte 0x%02X", c);
    return buf;
}

static int hex4(const unsigned char *p) {
    int v = 0;
    for (int i = 0; i < 4; i++) {
        int c = p[i], d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return -1;
        v = v * 16 + d;
    }
    return v;
}

/* p at '"'; on success *out is a malloc'd NUL-terminated UTF-8 string */
static bool parse_string(struct jp *j, char **out) {
    struct sbuf s = {0};
    char c16[16];
    j->p++;
    if (!sb_put(&s, "", 0)) return fail(j, "out of memory");
    for (;;) {
        /* copy the longest run of plain ASCII at once: huge strings stay linear */
        const unsigned char *q = j->p;
        while (q < j->end && *q >= 0x20 && *q < 0x80 && *q != '"' && *q != '\\') q++;
        if (q > j->p && !sb_put(&s, j->p, (size_t)(q - j->p))) goto oom;
        j->p = q;
        if (j->p >= j->end) { fail(j, "unterminated string"); goto bad; }
        unsigned c = *j->p;
        if (c == '"') { j->p++; break; }
        if (c < 0x20) { fail(j, "control character 0x%02X inside a string", c); goto bad; }
        if (c >= 0x80) {
            int n = jsonl_utf8_len(j->p, j->end);
            if (n ? !sb_put(&s, j->p, (size_t)n) : !sb_put_cp(&s, REPLACEMENT)) goto oom;
            j->p += n ? n : 1;
            continue;
        }
        /* backslash */
        if (j->end - j->p < 2) { j->p++; fail(j, "unterminated escape"); goto bad; }
        char e = (char)j->p[1], lit = 0;
        switch (e) {
        case '"': lit = '"'; break;
        case '\\': lit = '\\'; break;
        case '/': lit = '/'; break;
        case 'b': lit = '\b'; break;
        case 'f': lit = '\f'; break;
        case 'n': lit = '\n'; break;
        case 'r': lit = '\r'; break;
        case 't': lit = '\t'; break;
        case 'u': break;
        default: j->p++; fail(j, "bad escape '\\' followed by %s", show(j, c16)); goto bad;
        }
        if (lit) {
            if (!sb_put(&s, &lit, 1)) goto oom;
            j->p += 2;
            continue;
        }
        int cp = j->end - j->p >= 6 ? hex4(j->p + 2) : -1;
        if (cp < 0) { fail(j, "bad \\u escape (need 4 hex digits)"); goto bad; }
        j->p += 6;
        uint32_t u = (uint32_t)cp;
        if (u >= 0xD800 && u <= 0xDBFF) {
            int lo = (j->end - j->p >= 6 && j->p[0] == '\\' && j->p[1] == 'u') ? hex4(j->p + 2) : -1;
            if (lo >= 0xDC00 && lo <= 0xDFFF) {
                u = 0x10000 + ((u - 0xD800) << 10) + ((uint32_t)lo - 0xDC00);
                j->p += 6;
            } else u = REPLACEMENT; /* lone high surrogate; what follows is parsed normally */
        } else if ((u >= 0xDC00 && u <= 0xDFFF) || u == 0) u = REPLACEMENT;
        if (!sb_put_cp(&s, u)) goto oom;
    }
    *out = s.b;
    return true;
oom:
    fail(j, "out of memory");
bad:
    free(s.b);
    return false;
}

/* p at '-' or a digit: the RFC 8259 number grammar, then strtod on a copy of the lexeme */
static bool parse_number(struct jp *j, double *num, char **lexeme) {
    const unsigned char *b = j->p, *q = j->p;
    if (q < j->end && *q == '-') q++;
    if (q >= j->end || *q < '0' || *q > '9') { j->p = q; return fail(j, "bad number: digit expected"); }
    if (*q == '0') {
        q++;
        if (q < j->end && *q >= '0' && *q <= '9') { j->p = q; return fail(j, "bad number: leading zero"); }
    } else
        while (q < j->end && *q >= '0' && *q <= '9') q++;
    if (q < j->end && *q == '.') {
        q++;
        if (q >= j->end || *q < '0' || *q > '9') { j->p = q; return fail(j, "bad number: digit expected after '.'"); }
        while (q < j->end && *q >= '0' && *q <= '9') q++;
    }
    if (q < j->end && (*q == 'e' || *q == 'E')) {
        q++;
        if (q < j->end && (*q == '+' || *q == '-')) q++;
        if (q >= j->end || *q < '0' || *q > '9') { j->p = q; return fail(j, "bad number: digit expected in exponent"); }
        while (q < j->end && *q >= '0' && *q <= '9') q++;
    }
    char *t = strndup((const char *)b, (size_t)(q - b));
    if (!t) return fail(j, "out of memory");
    *num = strtod(t, NULL); /* the grammar is checked, so strtod consumes it all */
    j->p = q;
    if (lexeme) *lexeme = t;
    else free(t);
    return true;
}

static bool match_word(struct jp *j, const char *w) {
    size_t n = strlen(w);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, w, n) != 0) return false;
    j->p += n;
    return true;
}

static void value_free(struct jsonl_value *v) {
    free(v->str);
    for (int i = 0; i < v->n_items; i++) free(v->items[i]);
    free(v->items);
    memset(v, 0, sizeof *v);
}

static bool parse_value(struct jp *j, int depth, struct jsonl_value *v, bool *keep);

/* p at '{'. obj NULL: validate and drop (a nested object). */
static bool parse_object(struct jp *j, int depth, struct jsonl_obj *obj) {
    if (depth > JSONL_MAX_DEPTH) return fail(j, "nested deeper than %d", JSONL_MAX_DEPTH);
    char c16[16];
    j->p++;
    skip_ws(j);
    if (j->p < j->end && *j->p == '}') { j->p++; return true; }
    for (;;) {
        skip_ws(j);
        if (j->p >= j->end || *j->p != '"') return fail(j, "expected a key string, got %s", show(j, c16));
        char *key;
        if (!parse_string(j, &key)) return false;
        skip_ws(j);
        if (j->p >= j->end || *j->p != ':') { free(key); return fail(j, "expected ':', got %s", show(j, c16)); }
        j->p++;
        skip_ws(j);
        struct jsonl_value v = {0};
        bool keep = false;
        if (!parse_value(j, depth, obj ? &v : NULL, &keep)) { free(key); return false; }
        if (obj) {
            if (!keep) { /* an object or an array of non-strings: its key, no content */
                value_free(&v);
                v.type = JSONL_OTHER;
            }
            if (obj->n_fields == obj->cap) {
                int cap = obj->cap ? obj->cap * 2 : 16;
                struct jsonl_field *f = cap < (1 << 24) ? realloc(obj->fields, (size_t)cap * sizeof *f) : NULL;
                if (!f) { free(key); value_free(&v); return fail(j, "out of memory (or too many keys)"); }
                obj->fields = f;
                obj->cap = cap;
            }
            obj->fields[obj->n_fields++] = (struct jsonl_field){key, v};
        } else {
            free(key);
            value_free(&v);
        }
        skip_ws(j);
        if (j->p < j->end && *j->p == ',') { j->p++; continue; }
        if (j->p < j->end && *j->p == '}') { j->p++; return true; }
        return fail(j, "expected ',' or '}', got %s", show(j, c16));
    }
}

/* p at '['. Keeps an array of strings (empty included) in *v; anything else is validated and
 * dropped (*keep = false). */
static bool parse_array(struct jp *j, int depth, struct jsonl_value *v, bool *keep) {
    if (depth > JSONL_MAX_DEPTH) return fail(j, "nested deeper than %d", JSONL_MAX_DEPTH);
    char c16[16];
    struct jsonl_value a = {.type = JSONL_STRINGS};
    int cap = 0;
    bool strings = v != NULL; /* still collecting strings */
    j->p++;
    skip_ws(j);
    if (j->p < j->end && *j->p == ']') { j->p++; goto done; }
    for (;;) {
        skip_ws(j);
        if (strings && j->p < j->end && *j->p == '"') {
            char *s;
            if (!parse_string(j, &s)) goto bad;
            if (a.n_items == cap) {
                cap = cap ? cap * 2 : 8;
                char **it = cap < (1 << 24) ? realloc(a.items, (size_t)cap * sizeof *it) : NULL;
                if (!it) { free(s); fail(j, "out of memory (or too many items)"); goto bad; }
                a.items = it;
            }
            a.items[a.n_items++] = s;
        } else {
            if (strings) { value_free(&a); strings = false; }
            bool k;
            if (!parse_value(j, depth, NULL, &k)) goto bad;
        }
        skip_ws(j);
        if (j->p < j->end && *j->p == ',') { j->p++; continue; }
        if (j->p < j->end && *j->p == ']') { j->p++; break; }
        fail(j, "expected ',' or ']', got %s", show(j, c16));
        goto bad;
    }
done:
    if (v && strings) {
        *v = a;
        *keep = true;
    } else {
        value_free(&a);
        *keep = false;
    }
    return true;
bad:
    value_free(&a);
    return false;
}

/* p at the first byte of a value (whitespace skipped). v NULL: validate only. */
static bool parse_value(struct jp *j, int depth, struct jsonl_value *v, bool *keep) {
    char c16[16];
    struct jsonl_value tmp = {0};
    if (!v) v = &tmp;
    *keep = true;
    if (j->p >= j->end) return fail(j, "value expected, got end of line");
    switch (*j->p) {
    case '"':
        v->type = JSONL_STRING;
        if (!parse_string(j, &v->str)) return false;
        break;
    case '{':
        *keep = false;
        return parse_object(j, depth + 1, NULL);
    case '[':
        return parse_array(j, depth + 1, v == &tmp ? NULL : v, keep);
    case 't': case 'f': case 'n':
        if (match_word(j, "true")) *v = (struct jsonl_value){.type = JSONL_BOOL, .b = true};
        else if (match_word(j, "false")) *v = (struct jsonl_value){.type = JSONL_BOOL, .b = false};
        else if (match_word(j, "null")) *v = (struct jsonl_value){.type = JSONL_NULL};
        else return fail(j, "unknown word");
        break;
    case 'N': case 'I': case '-': {
        double x = 0;
        const char *w = match_word(j, "NaN") ? "NaN" : match_word(j, "Infinity") ? "Infinity"
                      : match_word(j, "-Infinity") ? "-Infinity" : NULL;
        if (w) {
            x = w[0] == 'N' ? NAN : w[0] == '-' ? -INFINITY : INFINITY;
            *v = (struct jsonl_value){.type = JSONL_NUMBER, .num = x, .str = strdup(w)};
            if (!v->str) return fail(j, "out of memory");
            break;
        }
        if (*j->p != '-') return fail(j, "unknown word");
        v->type = JSONL_NUMBER; /* a negative number */
        if (!parse_number(j, &v->num, &v->str)) return false;
        break;
    }
    case '0': case '1': case '2': case '3': case '4': case '5': case '6': case '7': case '8': case '9':
        v->type = JSONL_NUMBER;
        if (!parse_number(j, &v->num, &v->str)) return false;
        break;
    default:
        return fail(j, "value expected, got %s", show(j, c16));
    }
    if (v == &tmp) value_free(&tmp);
    return true;
}

bool jsonl_parse(const char *line, size_t len, struct jsonl_obj *out, char *err, size_t err_size) {
    struct jp j = {(const unsigned char *)line, (const unsigned char *)line + len,
                   (const unsigned char *)line, err, err_size};
    char c16[16];
    memset(out, 0, sizeof *out);
    if (err && err_size) err[0] = 0;
    if (!line) return fail(&j, "no line");
    skip_ws(&j);
    if (j.p >= j.end || *j.p != '{') return fail(&j, "expected '{' to open an object, got %s", show(&j, c16));
    if (!parse_object(&j, 1, out)) goto bad;
    skip_ws(&j);
    if (j.p < j.end) { fail(&j, "unexpected %s after the object", show(&j, c16)); goto bad; }
    return true;
bad:
    jsonl_obj_free(out);
    return false;
}

void jsonl_obj_free(struct jsonl_obj *o) {
    if (!o) return;
    for (int i = 0; i < o->n_fields; i++) {
        free(o->fields[i].key);
        value_free(&o->fields[i].v);
    }
    free(o->fields);
    memset(o, 0, sizeof *o);
}

/* ---------------------------------------------------------------------------------------------
 * lookups and the writer */

const struct jsonl_value *jsonl_get(const struct jsonl_obj *o, const char *key) {
    for (int i = o->n_fields - 1; i >= 0; i--)
        if (strcmp(o->fields[i].key, key) == 0) return &o->fields[i].v;
    return NULL;
}

const char *jsonl_get_str(const struct jsonl_obj *o, const char *key) {
    const struct jsonl_value *v = jsonl_get(o, key);
    return v && v->type == JSONL_STRING ? v->str : NULL;
}

double jsonl_get_num(const struct jsonl_obj *o, const char *key) {
    const struct jsonl_value *v = jsonl_get(o, key);
    return v && v->type == JSONL_NUMBER ? v->num : NAN;
}

void jsonl_write_string(FILE *f, const char *s) {
    if (!s) { fputs("null", f); return; }
    const unsigned char *p = (const unsigned char *)s, *end = p + strlen(s);
    fputc('"', f);
    while (p < end) {
        unsigned c = *p;
        if (c == '"' || c == '\\') { fputc('\\', f); fputc((int)c, f); p++; }
        else if (c < 0x20) { fprintf(f, "\\u%04x", c); p++; }
        else if (c < 0x80) { fputc((int)c, f); p++; }
        else {
            int n = jsonl_utf8_len(p, end);
            if (n) { fwrite(p, 1, (size_t)n, f); p += n; }
            else { fputs("\\ufffd", f); p++; }
        }
    }
    fputc('"', f);
}
