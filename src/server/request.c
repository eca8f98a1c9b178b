/* request.c — parse and validate a chat/completions body (see request.h). Every wrong type or
 * value is a 400 whose message and `param` name the field. */
#include "server/request.h"

#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Replace every byte that does not start a complete, well-formed UTF-8 sequence by '?', in place:
 * error texts quote client input (jansson's "near '...'" may cut a character in two, snprintf may
 * truncate one) and json_string refuses invalid UTF-8, which would leave the error without text. */
void srv_utf8_scrub(char *s) {
    unsigned char *p = (unsigned char *)s;
    while (*p) {
        int n = *p < 0x80 ? 1 : (*p & 0xE0) == 0xC0 ? 2 : (*p & 0xF0) == 0xE0 ? 3
                : (*p & 0xF8) == 0xF0 ? 4 : 0;
        bool ok = n > 0;
        for (int i = 1; ok && i < n; i++) ok = (p[i] & 0xC0) == 0x80;
        if (ok && n == 2) ok = *p >= 0xC2;                                   /* overlong */
        if (ok && n == 3) {
            unsigned cp = (p[0] & 0x0Fu) << 12 | (p[1] & 0x3Fu) << 6 | (p[2] & 0x3Fu);
            ok = cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF);                /* surrogates */
        }
        if (ok && n == 4) {
            unsigned cp = (p[0] & 0x07u) << 18 | (p[1] & 0x3Fu) << 12 | (p[2] & 0x3Fu) << 6 |
                          (p[3] & 0x3Fu);
            ok = cp >= 0x10000 && cp <= 0x10FFFF;
        }
        if (!ok) *p++ = '?';
        else p += n;
    }
}

void srv_error_set(struct srv_error *e, int status, const char *type, const char *param,
                   const char *code, const char *fmt, ...) {
    e->status = status;
    e->type = type;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    snprintf(e->code, sizeof e->code, "%s", code ? code : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    srv_utf8_scrub(e->message);
    srv_utf8_scrub(e->param);
}

char *srv_error_json(const struct srv_error *e) {
    json_t *o = json_object();
    json_t *in = json_object();
    json_object_set_new(in, "message", json_string(e->message));
    json_object_set_new(in, "type", json_string(e->type ? e->type : "server_error"));
    json_object_set_new(in, "param", e->param[0] ? json_string(e->param) : json_null());
    json_object_set_new(in, "code", e->code[0] ? json_string(e->code) : json_null());
    json_object_set_new(o, "error", in);
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

void srv_params_free(struct srv_params *p) {
    for (int i = 0; i < p->n_msgs; i++) {
        free(p->msgs[i].role);
        free(p->msgs[i].content);
    }
    free(p->msgs);
    free(p->prompt);
    free(p->prompt_toks);
    for (int i = 0; i < p->n_stops; i++) free(p->stops[i]);
    free(p->kv);
    free(p->prefix_kv);
    for (int i = 0; i < p->n_chunks; i++) free(p->chunks[i]);
    free(p->chunks);
    memset(p, 0, sizeof *p);
}

/* a number field in [lo, hi]; absent or null leaves *v */
static bool get_num(json_t *o, const char *key, double lo, double hi, float *v,
                    struct srv_error *e) {
    json_t *x = json_object_get(o, key);
    if (!x || json_is_null(x)) return true;
    if (!json_is_number(x)) {
        srv_bad(e, key, "'%s' must be a number", key);
        return false;
    }
    double d = json_number_value(x);
    if (!(d >= lo && d <= hi)) {
        srv_bad(e, key, "'%s' must be between %g and %g, got %g", key, lo, hi, d);
        return false;
    }
    *v = (float)d;
    return true;
}

static bool get_int(json_t *o, const char *key, long long lo, long long hi, long long *v,
                    bool *present, struct srv_error *e) {
    json_t *x = json_object_get(o, key);
    if (present) *present = false;
    if (!x || json_is_null(x)) return true;
    long long d;
    if (json_is_integer(x)) d = json_integer_value(x);
    else if (json_is_real(x) && json_real_value(x) == floor(json_real_value(x)) &&
             fabs(json_real_value(x)) < 9e15)
        d = (long long)json_real_value(x);
    else {
        srv_bad(e, key, "'%s' must be an integer", key);
        return false;
    }
    if (d < lo || d > hi) {
        srv_bad(e, key, "'%s' must be between %lld and %lld, got %lld", key, lo, hi, d);
        return false;
    }
    *v = d;
    if (present) *present = true;
    return true;
}

static bool get_bool(json_t *o, const char *key, bool *v, struct srv_error *e) {
    json_t *x = json_object_get(o, key);
    if (!x || json_is_null(x)) return true;
    if (!json_is_boolean(x)) {
        srv_bad(e, key, "'%s' must be a boolean", key);
        return false;
    }
    *v = json_is_true(x);
    return true;
}

/* string field; absent/null leaves *v NULL */
static bool get_str(json_t *o, const char *key, char **v, struct srv_error *e) {
    json_t *x = json_object_get(o, key);
    if (!x || json_is_null(x)) return true;
    if (!json_is_string(x)) {
        srv_bad(e, key, "'%s' must be a string", key);
        return false;
    }
    *v = strdup(json_string_value(x));
    return true;
}

/* message content: a string or an array of {"type":"text","text":...} parts (joined) */
static bool get_content(json_t *c, int i, char **out, struct srv_error *e) {
    char param[64];
    snprintf(param, sizeof param, "messages[%d].content", i);
    if (!c || json_is_null(c)) {
        *out = strdup("");
        return true;
    }
    if (json_is_string(c)) {
        *out = strdup(json_string_value(c));
        return true;
    }
    if (!json_is_array(c)) {
        srv_bad(e, param, "'%s' must be a string or an array of text parts", param);
        return false;
    }
    size_t total = 0, n = json_array_size(c);
    for (size_t k = 0; k < n; k++) {
        json_t *part = json_array_get(c, k), *t = json_object_get(part, "text"),
               *ty = json_object_get(part, "type");
        if (!json_is_object(part) || !json_is_string(t) ||
            (ty && !(json_is_string(ty) && !strcmp(json_string_value(ty), "text")))) {
            srv_bad(e, param, "'%s' parts must be {\"type\":\"text\",\"text\":string} (only text "
                    "is supported)", param);
            return false;
        }
        total += json_string_length(t);
    }
    char *s = malloc(total + 1);
    size_t at = 0;
    for (size_t k = 0; k < n; k++) {
        json_t *t = json_object_get(json_array_get(c, k), "text");
        memcpy(s + at, json_string_value(t), json_string_length(t));
        at += json_string_length(t);
    }
    s[at] = 0;
    *out = s;
    return true;
}

static bool parse_messages(json_t *root, struct srv_params *p, struct srv_error *e) {
    json_t *m = json_object_get(root, "messages");
    if (!m || json_is_null(m)) {
        srv_bad(e, "messages", "'messages' is required");
        return false;
    }
    if (!json_is_array(m)) {
        srv_bad(e, "messages", "'messages' must be an array");
        return false;
    }
    size_t n = json_array_size(m);
    if (n == 0 || n > SRV_MAX_MSGS) {
        srv_bad(e, "messages", "'messages' must hold 1 to %d messages, got %zu", SRV_MAX_MSGS, n);
        return false;
    }
    p->msgs = calloc(n, sizeof *p->msgs);
    for (size_t i = 0; i < n; i++) {
        json_t *msg = json_array_get(m, i);
        char param[64];
        snprintf(param, sizeof param, "messages[%zu]", i);
        if (!json_is_object(msg)) {
            srv_bad(e, param, "'%s' must be an object", param);
            return false;
        }
        json_t *role = json_object_get(msg, "role");
        snprintf(param, sizeof param, "messages[%zu].role", i);
        if (!json_is_string(role)) {
            srv_bad(e, param, "'%s' must be a string", param);
            return false;
        }
        const char *r = json_string_value(role);
        if (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant") &&
            strcmp(r, "tool") && strcmp(r, "developer")) {
            srv_bad(e, param, "'%s' must be system, developer, user, assistant or tool", param);
            return false;
        }
        p->msgs[i].role = strdup(!strcmp(r, "developer") ? "system" : r);
        p->n_msgs = (int)i + 1;
        if (!get_content(json_object_get(msg, "content"), (int)i, &p->msgs[i].content, e))
            return false;
    }
    return true;
}

static bool parse_prompt(json_t *root, const struct srv_limits *lim, struct srv_params *p,
                         struct srv_error *e) {
    json_t *x = json_object_get(root, "prompt");
    if (!x || json_is_null(x)) {
        srv_bad(e, "prompt", "'prompt' is required");
        return false;
    }
    if (json_is_string(x)) {
        p->prompt = strdup(json_string_value(x));
        return true;
    }
    /* ["text"] is accepted as one prompt */
    if (json_is_array(x) && json_array_size(x) == 1 && json_is_string(json_array_get(x, 0))) {
        p->prompt = strdup(json_string_value(json_array_get(x, 0)));
        return true;
    }
    if (!json_is_array(x) || json_array_size(x) == 0) {
        srv_bad(e, "prompt", "'prompt' must be a string or a non-empty array of token ids");
        return false;
    }
    size_t n = json_array_size(x);
    if (n > (1u << 20)) {
        srv_bad(e, "prompt", "'prompt' has too many tokens");
        return false;
    }
    p->prompt_toks = malloc(n * sizeof *p->prompt_toks);
    for (size_t i = 0; i < n; i++) {
        json_t *t = json_array_get(x, i);
        if (!json_is_integer(t) || json_integer_value(t) < 0 ||
            (lim->n_vocab > 0 && json_integer_value(t) >= lim->n_vocab)) {
            srv_bad(e, "prompt", "'prompt' token %zu is not a token id in [0, %d)", i,
                    lim->n_vocab);
            return false;
        }
        p->prompt_toks[i] = (int32_t)json_integer_value(t);
    }
    p->n_prompt_toks = (int)n;
    return true;
}

static bool parse_stop(json_t *root, struct srv_params *p, struct srv_error *e) {
    json_t *x = json_object_get(root, "stop");
    if (!x || json_is_null(x)) return true;
    if (json_is_string(x)) {
        if (json_string_length(x)) p->stops[p->n_stops++] = strdup(json_string_value(x));
        return true;
    }
    if (!json_is_array(x)) {
        srv_bad(e, "stop", "'stop' must be a string or an array of strings");
        return false;
    }
    if (json_array_size(x) > SRV_MAX_STOPS) {
        srv_bad(e, "stop", "'stop' holds at most %d strings", SRV_MAX_STOPS);
        return false;
    }
    for (size_t i = 0; i < json_array_size(x); i++) {
        json_t *s = json_array_get(x, i);
        if (!json_is_string(s)) {
            srv_bad(e, "stop", "'stop' must be a string or an array of strings");
            return false;
        }
        if (json_string_length(s)) p->stops[p->n_stops++] = strdup(json_string_value(s));
    }
    return true;
}

static bool parse_kv(json_t *root, const char *key, const struct srv_limits *lim, char **out,
                     struct srv_error *e) {
    if (!get_str(root, key, out, e)) return false;
    if (!*out) return true;
    char msg[400];
    if (!**out || strlen(*out) > 200) {
        srv_bad(e, key, "'%s' must be a KV spec of 1 to 200 characters", key);
        return false;
    }
    if (lim->check_kv && !lim->check_kv(*out, msg, sizeof msg)) {
        srv_bad(e, key, "'%s': %s", key, msg);
        return false;
    }
    return true;
}

static bool parse_fields(json_t *root, enum srv_kind kind, const struct srv_limits *lim,
                         struct srv_params *p, struct srv_error *e) {
    json_t *model = json_object_get(root, "model");
    if (model && !json_is_null(model)) {
        if (!json_is_string(model)) {
            srv_bad(e, "model", "'model' must be a string");
            return false;
        }
        if (lim->model_id && strcmp(json_string_value(model), lim->model_id)) {
            srv_error_set(e, 404, "invalid_request_error", "model", "model_not_found",
                          "The model '%.200s' does not exist (this server serves '%.200s')",
                          json_string_value(model), lim->model_id);
            return false;
        }
    }
    if (kind == SRV_CHAT ? !parse_messages(root, p, e) : !parse_prompt(root, lim, p, e))
        return false;
    long long v;
    bool present;
    p->max_tokens = lim->max_tokens_default;
    if (!get_int(root, "max_tokens", 0, 1 << 30, &v, &present, e)) return false;
    if (present) p->max_tokens = (int)v;
    if (!get_int(root, "max_completion_tokens", 0, 1 << 30, &v, &present, e)) return false;
    if (present) p->max_tokens = (int)v;
    if (!get_int(root, "n", 1, 1 << 30, &v, &present, e)) return false;
    if (present && v != 1) {
        srv_bad(e, "n", "'n' must be 1 (one choice per request; send several requests)");
        return false;
    }
    if (!get_num(root, "temperature", 0, 2, &p->temperature, e) ||
        !get_num(root, "top_p", 0, 1, &p->top_p, e) ||
        !get_num(root, "min_p", 0, 1, &p->min_p, e) ||
        !get_num(root, "presence_penalty", -2, 2, &p->presence_penalty, e) ||
        !get_num(root, "frequency_penalty", -2, 2, &p->frequency_penalty, e) ||
        !get_num(root, "repeat_penalty", 0, 10, &p->repeat_penalty, e))
        return false;
    if (p->top_p <= 0) {
        srv_bad(e, "top_p", "'top_p' must be greater than 0");
        return false;
    }
    if (p->repeat_penalty <= 0) {
        srv_bad(e, "repeat_penalty", "'repeat_penalty' must be greater than 0");
        return false;
    }
    if (!get_int(root, "top_k", 0, 1 << 20, &v, &present, e)) return false;
    if (present) p->top_k = (int)v;
    if (!get_int(root, "seed", -(1LL << 62), 1LL << 62, &v, &p->has_seed, e)) return false;
    if (p->has_seed) p->seed = (uint64_t)v;
    if (!parse_stop(root, p, e)) return false;
    if (!get_bool(root, "stream", &p->stream, e)) return false;
    json_t *so = json_object_get(root, "stream_options");
    if (so && !json_is_null(so)) {
        if (!json_is_object(so)) {
            srv_bad(e, "stream_options", "'stream_options' must be an object");
            return false;
        }
        json_t *iu = json_object_get(so, "include_usage");
        if (iu && !json_is_null(iu) && !json_is_boolean(iu)) {
            srv_bad(e, "stream_options.include_usage",
                    "'stream_options.include_usage' must be a boolean");
            return false;
        }
        p->include_usage = iu && json_is_true(iu);
    }
    /* logprobs: chat takes a boolean and top_logprobs; completions an integer (the top count) */
    json_t *lp = json_object_get(root, "logprobs");
    if (lp && !json_is_null(lp)) {
        if (json_is_boolean(lp)) p->logprobs = json_is_true(lp);
        else if (kind == SRV_COMPLETION && json_is_integer(lp) && json_integer_value(lp) >= 0 &&
                 json_integer_value(lp) <= SRV_MAX_LOGPROBS) {
            p->logprobs = true;
            p->top_logprobs = (int)json_integer_value(lp);
        } else {
            srv_bad(e, "logprobs", kind == SRV_CHAT ? "'logprobs' must be a boolean"
                                                   : "'logprobs' must be an integer 0..20");
            return false;
        }
    }
    if (!get_int(root, "top_logprobs", 0, SRV_MAX_LOGPROBS, &v, &present, e)) return false;
    if (present) {
        p->top_logprobs = (int)v;
        if (kind == SRV_CHAT && !p->logprobs && v > 0) {
            srv_bad(e, "top_logprobs", "'top_logprobs' needs 'logprobs': true");
            return false;
        }
    }
    if (!parse_kv(root, "kv", lim, &p->kv, e)) return false;
    if (!parse_kv(root, "prefix_kv", lim, &p->prefix_kv, e)) return false;
    if (!get_bool(root, "cache_prompt", &p->cache_prompt, e)) return false;
    if (!get_int(root, "id_slot", -1, 63, &v, &present, e)) return false;
    if (present) p->id_slot = (int)v;
    /* chunk store: "chunks" (ids or texts), "chunk_reuse", "recompute_ratio" */
    json_t *ch = json_object_get(root, "chunks");
    if (ch && !json_is_null(ch)) {
        if (!json_is_array(ch) || json_array_size(ch) > SRV_MAX_CHUNKS) {
            srv_bad(e, "chunks", "'chunks' must be an array of at most %d strings (chunk ids or "
                    "texts that occur in the prompt)", SRV_MAX_CHUNKS);
            return false;
        }
        size_t n = json_array_size(ch);
        p->chunks = calloc(n ? n : 1, sizeof *p->chunks);
        for (size_t i = 0; i < n; i++) {
            json_t *x = json_array_get(ch, i);
            if (!json_is_string(x) || !json_string_length(x)) {
                srv_bad(e, "chunks", "'chunks[%zu]' must be a non-empty string", i);
                return false;
            }
            p->chunks[p->n_chunks++] = strdup(json_string_value(x));
        }
    }
    json_t *cr = json_object_get(root, "chunk_reuse");
    if (cr && !json_is_null(cr)) {
        const char *names[] = {"cachecraft", "none", "all", "off", "cacheblend"};
        int k = -1;
        for (int i = 0; i < 5 && json_is_string(cr); i++)
            if (!strcmp(json_string_value(cr), names[i])) k = i;
        if (k < 0) {
            srv_bad(e, "chunk_reuse", "'chunk_reuse' must be \"cachecraft\", \"cacheblend\", "
                    "\"none\", \"all\" or \"off\"");
            return false;
        }
        p->chunk_reuse = k;
    }
    if (!get_num(root, "recompute_ratio", 0, 1, &p->recompute_ratio, e)) return false;
    return true;
}

bool srv_parse_request(const char *body, size_t len, enum srv_kind kind,
                       const struct srv_limits *lim, struct srv_params *out,
                       struct srv_error *err) {
    memset(out, 0, sizeof *out);
    out->kind = kind;
    out->temperature = 1.0f;
    out->top_p = 1.0f;
    out->repeat_penalty = 1.0f;
    out->cache_prompt = true;
    out->id_slot = -1;
    out->recompute_ratio = -1;
    json_error_t je;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        srv_bad(err, NULL, "malformed JSON in the request body: %s (line %d, column %d)", je.text,
                je.line, je.column);
        return false;
    }
    bool ok;
    if (!json_is_object(root)) {
        srv_bad(err, NULL, "the request body must be a JSON object");
        ok = false;
    } else ok = parse_fields(root, kind, lim, out, err);
    json_decref(root);
    if (!ok) srv_params_free(out);
    return ok;
}
