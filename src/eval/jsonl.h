/* jsonl.h — a small, strict reader for JSON Lines (one JSON object per line) and a string writer.
 *
 * Does: parse one line holding one JSON object (RFC 8259) into a flat list of (key, value) fields
 * whose values are null, bool, number, string or array of strings. Nested objects and arrays that
 * hold anything but strings are parsed (so the line is still validated) and kept as JSONL_OTHER
 * with no content (so a reader can tell a wrong type from a missing key). Any syntax
 * error gives false and a message with the column; the parser never reads outside
 * (line, len), bounds nesting at JSONL_MAX_DEPTH and is meant to survive fuzzing.
 * Strings are decoded to UTF-8: escapes resolved, surrogate pairs joined; lone surrogates, \u0000
 * and invalid UTF-8 bytes become U+FFFD, so every decoded string is valid UTF-8 with no NUL.
 * Extensions: the bare words NaN, Infinity and -Infinity are read as numbers (Python's json module
 * writes them for non-finite floats).
 * Does not: keep nesting or key order beyond the list, stream a value across lines, or check
 * for duplicate keys (lookups return the last one, as Python does).
 *
 * Ownership: a struct jsonl_obj owns every string it points to; jsonl_obj_free releases them.
 */
#ifndef KVS_EVAL_JSONL_H
#define KVS_EVAL_JSONL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#define JSONL_MAX_DEPTH 64

enum jsonl_type {
    JSONL_NULL, JSONL_BOOL, JSONL_NUMBER, JSONL_STRING, JSONL_STRINGS,
    JSONL_OTHER /* an object, or an array holding anything but strings: validated, content dropped */
};

struct jsonl_value {
    enum jsonl_type type;
    bool b;       /* JSONL_BOOL */
    double num;   /* JSONL_NUMBER: the value (±inf on overflow or Infinity, NaN for NaN) */
    char *str;    /* JSONL_STRING: decoded text; JSONL_NUMBER: the number exactly as written */
    char **items; /* JSONL_STRINGS: (n_items) decoded strings */
    int n_items;
};

struct jsonl_field {
    char *key; /* decoded */
    struct jsonl_value v;
};

struct jsonl_obj {
    struct jsonl_field *fields; /* (n_fields), in line order */
    int n_fields, cap;
};

/* Parses `line` (len bytes, need not be NUL-terminated; surrounding whitespace and a trailing
 * newline are allowed) into *out, which is overwritten. On failure returns false, leaves *out
 * empty (nothing to free) and writes a message such as "column 17: bad escape '\x'" into err. */
bool jsonl_parse(const char *line, size_t len, struct jsonl_obj *out, char *err, size_t err_size);
void jsonl_obj_free(struct jsonl_obj *o);

/* Lookups by key (last occurrence wins). jsonl_get: NULL when absent. jsonl_get_str: the string,
 * or NULL when absent or not a string. jsonl_get_num: the number, or NaN when absent, null or not
 * a number. */
const struct jsonl_value *jsonl_get(const struct jsonl_obj *o, const char *key);
const char *jsonl_get_str(const struct jsonl_obj *o, const char *key);
double jsonl_get_num(const struct jsonl_obj *o, const char *key);

/* Writes s as a quoted JSON string: '"' and '\' escaped, every control character below 0x20 as
 * \u00XX, valid UTF-8 passed through, each invalid UTF-8 byte as \ufffd. NULL writes null. */
void jsonl_write_string(FILE *f, const char *s);

/* Length of the valid UTF-8 sequence at p (1..4), or 0 when the bytes at p (before end) do not
 * start one: overlong forms, surrogates and code points above U+10FFFF are invalid. */
int jsonl_utf8_len(const unsigned char *p, const unsigned char *end);

#endif
