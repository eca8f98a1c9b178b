/* server.c — `kvsieve serve`: command line, HTTP (libmicrohttpd, one thread per connection) and
 * JSON (jansson). HTTP threads parse, validate and tokenize a request, submit it to the
 * inference thread (sched.c) through a bounded queue and turn its output into OpenAI-shaped
 * responses or SSE streams. */
#include "server/server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef KVS_DEFAULT_MODEL
#define KVS_DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#endif

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* ---- jobs ------------------------------------------------------------------------------- */

void job_release(struct job *j) {
    if (--j->refs > 0) return;
    srv_params_free(&j->p);
    free(j->toks);
    free(j->chunk_at);
    free(j->out);
    free(j->lps);
    free(j);
}

void job_append_out(struct job *j, const char *s, size_t n) {
    if (j->out_len + n + 1 > j->out_cap) {
        j->out_cap = (j->out_len + n + 1) * 2;
        j->out = realloc(j->out, j->out_cap);
    }
    memcpy(j->out + j->out_len, s, n);
    j->out_len += n;
    j->out[j->out_len] = 0;
}

/* ---- responses ------------------------------------------------------------------------- */

struct conn { /* per HTTP request */
    char *body;
    size_t len, cap;
    bool too_large, answered, counted;
};
static int g_active; /* requests between submission and the end of their response (under mu) */

static enum MHD_Result send_text(struct MHD_Connection *c, unsigned status, const char *type,
                                 const char *s, size_t n) {
    struct MHD_Response *r = MHD_create_response_from_buffer(n, (void *)s, MHD_RESPMEM_MUST_COPY);
    MHD_add_response_header(r, "Content-Type", type);
    MHD_add_response_header(r, "Access-Control-Allow-Origin", "*");
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result send_json(struct MHD_Connection *c, unsigned status, json_t *o) {
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    enum MHD_Result r = send_text(c, status, "application/json", s, strlen(s));
    free(s);
    return r;
}

static enum MHD_Result send_error(struct MHD_Connection *c, const struct srv_error *e) {
    char *s = srv_error_json(e);
    enum MHD_Result r = send_text(c, (unsigned)e->status, "application/json", s, strlen(s));
    free(s);
    return r;
}

static enum MHD_Result send_err(struct MHD_Connection *c, int status, const char *type,
                                const char *param, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static enum MHD_Result send_err(struct MHD_Connection *c, int status, const char *type,
                                const char *param, const char *code, const char *fmt, ...) {
    struct srv_error e;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    srv_error_set(&e, status, type, param, code, "%s", msg);
    return send_error(c, &e);
}

/* has the client closed its side of the connection? */
static bool client_gone(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return false;
    struct pollfd pf = {.fd = ci->connect_fd, .events = POLLIN | POLLRDHUP};
    if (poll(&pf, 1, 0) <= 0) return false;
    if (pf.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) return true;
    if (pf.revents & POLLIN) {
        char b;
        ssize_t k = recv(ci->connect_fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        return k == 0;
    }
    return false;
}

/* a JSON string of n bytes; invalid UTF-8 (a token's piece may hold part of a character) is
 * replaced by U+FFFD so that every answer is valid JSON */
static size_t utf8_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t k = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (!k || k > n || (k == 2 && c < 0xc2) || (k == 4 && c > 0xf4)) return 0;
    for (size_t i = 1; i < k; i++)
        if ((s[i] & 0xc0) != 0x80) return 0;
    if (k == 3 && ((c == 0xe0 && s[1] < 0xa0) || (c == 0xed && s[1] > 0x9f))) return 0;
    if (k == 4 && ((c == 0xf0 && s[1] < 0x90) || (c == 0xf4 && s[1] > 0x8f))) return 0;
    return k;
}

static json_t *jtext(const char *s, size_t n) {
    json_t *j = json_stringn(s, n);
    if (j) return j;
    char *o = malloc(n * 3 + 1);
    size_t m = 0;
    for (size_t i = 0; i < n;) {
        size_t k = utf8_len((const unsigned char *)s + i, n - i);
        if (k && !(k == 1 && s[i] == 0)) {
            memcpy(o + m, s + i, k);
            m += k;
            i += k;
        } else {
            memcpy(o + m, "\xef\xbf\xbd", 3);
            m += 3;
            i++;
        }
    }
    j = json_stringn(o, m);
    free(o);
    return j ? j : json_string("");
}

static json_t *lp_json(const struct srv *srv, const struct lp_entry *e, bool chat) {
    char piece[256];
    size_t n = kvs_token_piece(srv->model, e->tok, false, piece, sizeof piece);
    if (n >= sizeof piece) n = sizeof piece - 1;
    json_t *o = json_object();
    json_object_set_new(o, "token", jtext(piece, n));
    json_object_set_new(o, "logprob", json_real(e->lp));
    json_object_set_new(o, "id", json_integer(e->tok));
    json_t *bytes = json_array();
    for (size_t i = 0; i < n; i++) json_array_append_new(bytes, json_integer((unsigned char)piece[i]));
    json_object_set_new(o, "bytes", bytes);
    json_t *top = json_array();
    for (int k = 0; k < e->n_top; k++) {
        char p2[256];
        size_t m = kvs_token_piece(srv->model, e->top[k].tok, false, p2, sizeof p2);
        if (m >= sizeof p2) m = sizeof p2 - 1;
        json_t *t = json_object();
        json_object_set_new(t, "token", jtext(p2, m));
        json_object_set_new(t, "logprob", json_real(e->top[k].lp));
        json_object_set_new(t, "id", json_integer(e->top[k].tok));
        json_array_append_new(top, t);
    }
    json_object_set_new(o, "top_logprobs", top);
    (void)chat;
    return o;
}

/* logprobs of tokens [from, to) in the shape of the endpoint */
static json_t *lps_json(const struct srv *srv, const struct job *j, int from, int to) {
    bool chat = j->p.kind == SRV_CHAT;
    json_t *arr = json_array();
    for (int i = from; i < to; i++) json_array_append_new(arr, lp_json(srv, &j->lps[i], chat));
    if (chat) {
        json_t *o = json_object();
        json_object_set_new(o, "content", arr);
        return o;
    }
    /* completions (legacy shape): tokens, token_logprobs, top_logprobs */
    json_t *o = json_object(), *toks = json_array(), *lp = json_array(), *top = json_array();
    size_t i;
    json_t *e;
    json_array_foreach(arr, i, e) {
        json_array_append(toks, json_object_get(e, "token"));
        json_array_append(lp, json_object_get(e, "logprob"));
        json_t *m = json_object(), *t;
        size_t k;
        json_array_foreach(json_object_get(e, "top_logprobs"), k, t)
            json_object_set(m, json_string_value(json_object_get(t, "token")),
                            json_object_get(t, "logprob"));
        json_array_append_new(top, m);
    }
    json_object_set_new(o, "tokens", toks);
    json_object_set_new(o, "token_logprobs", lp);
    json_object_set_new(o, "top_logprobs", top);
    json_decref(arr);
    return o;
}

static json_t *usage_json(const struct job *j) {
    json_t *u = json_object(), *d = json_object();
    json_object_set_new(u, "prompt_tokens", json_integer(j->n_prompt));
    json_object_set_new(u, "completion_tokens", json_integer(j->n_gen));
    json_object_set_new(u, "total_tokens", json_integer(j->n_prompt + j->n_gen));
    json_object_set_new(d, "cached_tokens", json_integer(j->n_cached));
    json_object_set_new(u, "prompt_tokens_details", d);
    return u;
}

static json_t *timings_json(const struct job *j) {
    json_t *t = json_object();
    int pn = j->n_prompt - j->n_cached;
    json_object_set_new(t, "prompt_n", json_integer(pn));
    json_object_set_new(t, "prompt_ms", json_real(j->prompt_ms));
    json_object_set_new(t, "prompt_per_second",
                        json_real(j->prompt_ms > 0 ? pn / (j->prompt_ms / 1e3) : 0));
    json_object_set_new(t, "predicted_n", json_integer(j->n_gen));
    json_object_set_new(t, "predicted_ms", json_real(j->predicted_ms));
    json_object_set_new(t, "predicted_per_second",
                        json_real(j->predicted_ms > 0 ? j->n_gen / (j->predicted_ms / 1e3) : 0));
    json_object_set_new(t, "cache_n", json_integer(j->n_cached));
    json_object_set_new(t, "pinned_n", json_integer(j->n_pin));
    json_object_set_new(t, "prompt_computed", json_integer(j->prompt_computed));
    json_object_set_new(t, "chunks_reused", json_integer(j->chunks_reused));
    json_object_set_new(t, "chunks_cached", json_integer(j->chunks_cached));
    json_object_set_new(t, "chunk_tokens_reused", json_integer(j->chunk_tokens_reused));
    json_object_set_new(t, "chunk_tokens_recomputed", json_integer(j->chunk_tokens_recomputed));
    json_object_set_new(t, "chunk_tokens_checked", json_integer(j->chunk_tokens_checked));
    json_object_set_new(t, "recompute_fraction",
                        json_real(j->chunk_tokens_reused ? (double)j->chunk_tokens_recomputed /
                                                           j->chunk_tokens_reused : 0.0));
    return t;
}

static const char *fin_str(enum finish_reason f) {
    return f == FIN_STOP ? "stop" : f == FIN_LENGTH ? "length" : NULL;
}

static json_t *base_obj(const struct srv *srv, const struct job *j, const char *object) {
    json_t *o = json_object();
    json_object_set_new(o, "id", json_string(j->id));
    json_object_set_new(o, "object", json_string(object));
    json_object_set_new(o, "created", json_integer(j->created));
    json_object_set_new(o, "model", json_string(srv->model_id));
    json_object_set_new(o, "system_fingerprint", json_string("kvsieve"));
    return o;
}

static json_t *full_response(const struct srv *srv, const struct job *j) {
    bool chat = j->p.kind == SRV_CHAT;
    json_t *o = base_obj(srv, j, chat ? "chat.completion" : "text_completion");
    json_t *ch = json_object();
    json_object_set_new(ch, "index", json_integer(0));
    if (chat) {
        json_t *m = json_object();
        json_object_set_new(m, "role", json_string("assistant"));
        json_object_set_new(m, "content", jtext(j->out ? j->out : "", j->out_len));
        json_object_set_new(ch, "message", m);
    } else json_object_set_new(ch, "text", jtext(j->out ? j->out : "", j->out_len));
    json_object_set_new(ch, "logprobs", j->p.logprobs ? lps_json(srv, j, 0, j->n_lps) : json_null());
    json_object_set_new(ch, "finish_reason", json_string(fin_str(j->finish) ? fin_str(j->finish) : "stop"));
    json_t *choices = json_array();
    json_array_append_new(choices, ch);
    json_object_set_new(o, "choices", choices);
    json_object_set_new(o, "usage", usage_json(j));
    json_object_set_new(o, "timings", timings_json(j));
    return o;
}

/* ---- streaming ------------------------------------------------------------------------- */

struct stream {
    struct srv *srv;
    struct job *j;
    struct MHD_Connection *conn;
    size_t sent_text;
    int sent_lps;
    bool role_sent, finished;
    char *buf;
    size_t len, off, cap;
};

static void st_put(struct stream *s, const char *data, size_t n) {
    if (s->len + n > s->cap) {
        s->cap = (s->len + n) * 2 + 256;
        s->buf = realloc(s->buf, s->cap);
    }
    memcpy(s->buf + s->len, data, n);
    s->len += n;
}

static void st_event(struct stream *s, json_t *o) {
    char *t = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    st_put(s, "data: ", 6);
    st_put(s, t, strlen(t));
    st_put(s, "\n\n", 2);
    free(t);
}

static json_t *chunk(struct stream *s, const char *text, size_t n, bool with_text,
                     const char *finish) {
    const struct job *j = s->j;
    bool chat = j->p.kind == SRV_CHAT;
    json_t *o = base_obj(s->srv, j, chat ? "chat.completion.chunk" : "text_completion");
    json_t *ch = json_object();
    json_object_set_new(ch, "index", json_integer(0));
    if (chat) {
        json_t *d = json_object();
        if (!s->role_sent) {
            json_object_set_new(d, "role", json_string("assistant"));
            s->role_sent = true;
        }
        if (with_text) json_object_set_new(d, "content", jtext(text, n));
        json_object_set_new(ch, "delta", d);
    } else json_object_set_new(ch, "text", jtext(with_text ? text : "", with_text ? n : 0));
    if (j->p.logprobs && j->n_lps > s->sent_lps) {
        json_object_set_new(ch, "logprobs", lps_json(s->srv, j, s->sent_lps, j->n_lps));
        s->sent_lps = j->n_lps;
    } else json_object_set_new(ch, "logprobs", json_null());
    json_object_set_new(ch, "finish_reason", finish ? json_string(finish) : json_null());
    json_t *choices = json_array();
    json_array_append_new(choices, ch);
    json_object_set_new(o, "choices", choices);
    return o;
}

/* under mu: turn new output into events */
static void st_fill(struct stream *s) {
    struct job *j = s->j;
    if (j->out_len > s->sent_text || (j->p.logprobs && j->n_lps > s->sent_lps)) {
        st_event(s, chunk(s, j->out + s->sent_text, j->out_len - s->sent_text, true, NULL));
        s->sent_text = j->out_len;
    }
    if (j->state != J_DONE) return;
    s->finished = true;
    if (j->failed) {
        char *e = srv_error_json(&j->err);
        st_put(s, "data: ", 6);
        st_put(s, e, strlen(e));
        st_put(s, "\n\n", 2);
        free(e);
        return;
    }
    json_t *last = chunk(s, "", 0, false, fin_str(j->finish) ? fin_str(j->finish) : "stop");
    json_object_set_new(last, "timings", timings_json(j));
    st_event(s, last);
    if (j->p.include_usage) {
        json_t *u = base_obj(s->srv, j, j->p.kind == SRV_CHAT ? "chat.completion.chunk"
                                                            : "text_completion");
        json_object_set_new(u, "choices", json_array());
        json_object_set_new(u, "usage", usage_json(j));
        st_event(s, u);
    }
    st_put(s, "data: [DONE]\n\n", 14);
}

static ssize_t st_reader(void *cls, uint64_t pos, char *out, size_t max) {
    (void)pos;
    struct stream *s = cls;
    struct srv *srv = s->srv;
    while (s->off == s->len) {
        if (s->finished) return MHD_CONTENT_READER_END_OF_STREAM;
        s->off = s->len = 0;
        pthread_mutex_lock(&srv->mu);
        while (s->j->state != J_DONE && s->j->out_len == s->sent_text &&
               !(s->j->p.logprobs && s->j->n_lps > s->sent_lps)) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 100 * 1000000L;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&srv->cv_out, &srv->mu, &ts);
            if (s->j->state != J_DONE && client_gone(s->conn)) {
                s->j->cancel = true;
                pthread_cond_signal(&srv->cv_sched);
                pthread_mutex_unlock(&srv->mu);
                return MHD_CONTENT_READER_END_WITH_ERROR;
            }
        }
        st_fill(s);
        pthread_mutex_unlock(&srv->mu);
    }
    size_t n = s->len - s->off < max ? s->len - s->off : max;
    memcpy(out, s->buf + s->off, n);
    s->off += n;
    return (ssize_t)n;
}

static void st_free(void *cls) {
    struct stream *s = cls;
    pthread_mutex_lock(&s->srv->mu);
    if (s->j->state != J_DONE) { /* the client went away: cancel, the KV is freed next tick */
        s->j->cancel = true;
        pthread_cond_signal(&s->srv->cv_sched);
    }
    job_release(s->j);
    pthread_mutex_unlock(&s->srv->mu);
    free(s->buf);
    free(s);
}

/* ---- completions ----------------------------------------------------------------------- */

static bool check_kv_cb(const char *spec, char *msg, size_t size) {
    if (kvs_kv_spec_check(spec, NULL, 0) == KVS_OK) return true;
    snprintf(msg, size, "%s", kvs_last_error());
    return false;
}

static int32_t *tokenize(const struct srv *srv, const char *text, bool bos, bool special, int *n) {
    size_t len = strlen(text);
    int cap = (int)(len / 2) + 16;
    int32_t *t = malloc(sizeof *t * (size_t)cap);
    int k = kvs_tokenize(srv->model, text, len, bos, special, t, cap);
    if (k < 0) {
        cap = -k;
        t = realloc(t, sizeof *t * (size_t)cap);
        k = kvs_tokenize(srv->model, text, len, bos, special, t, cap);
    }
    *n = k < 0 ? 0 : k;
    return t;
}

/* The text tokenized piecewise at the first occurrence of each chunk text of the request
 * ("chunks" entries that are not ids), so that a chunk's tokens are those of the chunk alone
 * wherever it appears; the chunks' token ranges go into j->chunk_at. Without chunk texts, the
 * whole text at once. */
static int32_t *tokenize_pieces(const struct srv *srv, struct job *j, const char *text, bool bos,
                                bool special, int *n) {
    struct occ { size_t at, len; } oc[SRV_MAX_CHUNKS];
    int no = 0;
    for (int i = 0; i < j->p.n_chunks; i++) {
        uint64_t id;
        if (chunk_id_parse(j->p.chunks[i], &id)) continue;
        const char *f = strstr(text, j->p.chunks[i]);
        if (!f) continue;
        size_t at = (size_t)(f - text), len = strlen(j->p.chunks[i]);
        bool clash = false;
        for (int k = 0; k < no; k++) clash |= at < oc[k].at + oc[k].len && oc[k].at < at + len;
        if (!clash) oc[no++] = (struct occ){at, len};
    }
    if (!no) return tokenize(srv, text, bos, special, n);
    for (int a = 1; a < no; a++) /* by position */
        for (int b = a; b > 0 && oc[b].at < oc[b - 1].at; b--) {
            struct occ t = oc[b];
            oc[b] = oc[b - 1], oc[b - 1] = t;
        }
    int32_t *all = NULL;
    int cap = 0, len = 0;
    j->chunk_at = calloc((size_t)no, sizeof *j->chunk_at);
    size_t pos = 0;
    for (int k = 0; k <= no; k++) {
        for (int part = 0; part < 2; part++) { /* the text before the chunk, then the chunk */
            if (k == no && part == 1) break;
            size_t from = part ? oc[k].at : pos, to = part ? oc[k].at + oc[k].len : k < no ? oc[k].at : strlen(text);
            if (to <= from && !(bos && len == 0)) continue;
            char *piece = strndup(text + from, to - from);
            int m = 0;
            int32_t *t = tokenize(srv, piece, bos && len == 0, special, &m);
            free(piece);
            if (len + m > cap) {
                cap = (len + m) * 2 + 16;
                all = realloc(all, sizeof *all * (size_t)cap);
            }
            if (m) memcpy(all + len, t, sizeof *t * (size_t)m);
            free(t);
            if (part) {
                j->chunk_at[j->n_chunk_at][0] = len;
                j->chunk_at[j->n_chunk_at][1] = len + m;
                j->n_chunk_at++;
            }
            len += m;
        }
        if (k < no) pos = oc[k].at + oc[k].len;
    }
    *n = len;
    return all;
}

/* hand j to the inference thread (under mu): the HTTP side's and the scheduler's references */
static void job_submit(struct srv *srv, struct job *j) {
    j->refs = 2;
    j->state = J_SUBMITTED;
    if (srv->submitted_tail) srv->submitted_tail->next = j;
    else srv->submitted = j;
    srv->submitted_tail = j;
    srv->n_queued++;
}

static enum MHD_Result handle_completion(struct srv *srv, struct MHD_Connection *c,
                                         struct conn *cs, enum srv_kind kind) {
    struct srv_error e;
    struct job *j = calloc(1, sizeof *j);
    if (!srv_parse_request(cs->body ? cs->body : "", cs->len, kind, &srv->lim, &j->p, &e)) {
        free(j);
        pthread_mutex_lock(&srv->mu);
        srv->st.failed++;
        pthread_mutex_unlock(&srv->mu);
        return send_error(c, &e);
    }
    j->t_arrive = now_ms();
    j->created = (long long)time(NULL);
    j->slot = -1;
    static unsigned long long counter;
    unsigned long long id = __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED);
    snprintf(j->id, sizeof j->id, "%s-%llx%06llx", kind == SRV_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)j->created, id);
    if (kind == SRV_CHAT) {
        struct kvs_chat_msg *m = calloc((size_t)j->p.n_msgs, sizeof *m);
        for (int i = 0; i < j->p.n_msgs; i++) m[i] = (struct kvs_chat_msg){j->p.msgs[i].role, j->p.msgs[i].content};
        size_t need = kvs_chat_apply(srv->model, m, j->p.n_msgs, true, NULL, 0);
        char *text = malloc(need + 1);
        kvs_chat_apply(srv->model, m, j->p.n_msgs, true, text, need + 1);
        j->toks = tokenize_pieces(srv, j, text, false, true, &j->n_prompt);
        free(text);
        if (j->toks && j->n_prompt > 1 && !strcmp(m[0].role, "system")) {
            /* pin the system message (template included): a budgeted cache that runs past the
             * context never cuts inside it. Its tokens are those the prompt shares with the
             * template applied to it alone. */
            size_t ns = kvs_chat_apply(srv->model, m, 1, false, NULL, 0);
            char *st = malloc(ns + 1);
            kvs_chat_apply(srv->model, m, 1, false, st, ns + 1);
            int n_sys = 0;
            int32_t *sys = tokenize(srv, st, false, true, &n_sys);
            int k = 0;
            while (sys && k < n_sys && k < j->n_prompt - 1 && sys[k] == j->toks[k]) k++;
            j->n_pin = k;
            free(sys);
            free(st);
        }
        free(m);
    } else if (j->p.prompt) {
        j->toks = tokenize_pieces(srv, j, j->p.prompt, true, false, &j->n_prompt);
    } else {
        j->toks = malloc(sizeof *j->toks * (size_t)j->p.n_prompt_toks);
        memcpy(j->toks, j->p.prompt_toks, sizeof *j->toks * (size_t)j->p.n_prompt_toks);
        j->n_prompt = j->p.n_prompt_toks;
    }
    if (j->n_prompt == 0) {
        j->refs = 1;
        pthread_mutex_lock(&srv->mu);
        job_release(j);
        srv->st.failed++;
        pthread_mutex_unlock(&srv->mu);
        return send_err(c, 400, "invalid_request_error", kind == SRV_CHAT ? "messages" : "prompt",
                        NULL, "the prompt is empty");
    }
    /* submit */
    pthread_mutex_lock(&srv->mu);
    g_active++;
    cs->counted = true;
    if (srv->stopping || srv->n_queued >= srv->cfg.queue) {
        bool stop = srv->stopping;
        j->refs = 1;
        job_release(j);
        srv->st.failed++;
        pthread_mutex_unlock(&srv->mu);
        return send_err(c, 503, "unavailable_error", NULL, stop ? "shutting_down" : "queue_full",
                        stop ? "the server is shutting down"
                             : "the server is busy: %d requests are waiting (--queue); retry later",
                        srv->cfg.queue);
    }
    job_submit(srv, j);
    srv->st.requests++;
    pthread_cond_signal(&srv->cv_sched);
    /* wait until the inference thread has checked it against the context (or, not
     * streaming, until it is done), watching for the client going away */
    bool stream = j->p.stream;
    while (stream ? !j->checked : j->state != J_DONE) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 100 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&srv->cv_out, &srv->mu, &ts);
        if (!j->cancel && j->state != J_DONE && client_gone(c)) {
            j->cancel = true;
            pthread_cond_signal(&srv->cv_sched);
        }
    }
    if (j->failed && (!stream || j->state == J_DONE)) {
        struct srv_error err = j->err;
        job_release(j);
        pthread_mutex_unlock(&srv->mu);
        return send_error(c, &err);
    }
    if (!stream) {
        json_t *o = full_response(srv, j);
        job_release(j);
        pthread_mutex_unlock(&srv->mu);
        return send_json(c, 200, o);
    }
    pthread_mutex_unlock(&srv->mu);
    struct stream *s = calloc(1, sizeof *s);
    s->srv = srv;
    s->j = j; /* the stream owns the HTTP thread's reference now */
    s->conn = c;
    struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, st_reader,
                                                               s, st_free);
    MHD_add_response_header(r, "Content-Type", "text/event-stream");
    MHD_add_response_header(r, "Cache-Control", "no-cache");
    MHD_add_response_header(r, "Access-Control-Allow-Origin", "*");
    enum MHD_Result ret = MHD_queue_response(c, 200, r);
    MHD_destroy_response(r);
    return ret;
}

/* ---- other endpoints ------------------------------------------------------------------- */

static enum MHD_Result handle_models(struct srv *srv, struct MHD_Connection *c) {
    json_t *o = json_object(), *d = json_array(), *m = json_object();
    json_object_set_new(m, "id", json_string(srv->model_id));
    json_object_set_new(m, "object", json_string("model"));
    json_object_set_new(m, "created", json_integer(srv->started));
    json_object_set_new(m, "owned_by", json_string("kvsieve"));
    json_t *meta = json_object();
    json_object_set_new(meta, "n_ctx", json_integer(srv->cfg.n_ctx));
    json_object_set_new(meta, "n_vocab", json_integer(srv->mi.n_vocab));
    json_object_set_new(meta, "n_params", json_integer((json_int_t)srv->mi.n_params));
    json_object_set_new(meta, "kv", json_string(srv->cfg.kv));
    json_object_set_new(m, "meta", meta);
    json_array_append_new(d, m);
    json_object_set_new(o, "object", json_string("list"));
    json_object_set_new(o, "data", d);
    return send_json(c, 200, o);
}

static json_t *parse_body_object(struct conn *cs, struct srv_error *e) {
    json_error_t je;
    json_t *o = json_loadb(cs->body ? cs->body : "", cs->len, 0, &je);
    if (!o) {
        srv_bad(e, NULL, "malformed JSON in the request body: %s", je.text);
        return NULL;
    }
    if (!json_is_object(o)) {
        json_decref(o);
        srv_bad(e, NULL, "the request body must be a JSON object");
        return NULL;
    }
    return o;
}

static enum MHD_Result handle_tokenize(struct srv *srv, struct MHD_Connection *c, struct conn *cs) {
    struct srv_error e;
    json_t *o = parse_body_object(cs, &e);
    if (!o) return send_error(c, &e);
    json_t *content = json_object_get(o, "content"), *as = json_object_get(o, "add_special"),
           *wp = json_object_get(o, "with_pieces");
    if (!json_is_string(content)) {
        json_decref(o);
        return send_err(c, 400, "invalid_request_error", "content", NULL, "'content' must be a string");
    }
    if ((as && !json_is_boolean(as)) || (wp && !json_is_boolean(wp))) {
        json_decref(o);
        return send_err(c, 400, "invalid_request_error", as && !json_is_boolean(as) ? "add_special" : "with_pieces",
                        NULL, "'%s' must be a boolean", as && !json_is_boolean(as) ? "add_special" : "with_pieces");
    }
    int n;
    int32_t *t = tokenize(srv, json_string_value(content), as && json_is_true(as), true, &n);
    json_t *arr = json_array();
    for (int i = 0; i < n; i++) {
        if (wp && json_is_true(wp)) {
            char piece[256];
            size_t k = kvs_token_piece(srv->model, t[i], true, piece, sizeof piece);
            if (k >= sizeof piece) k = sizeof piece - 1;
            json_t *p = json_object();
            json_object_set_new(p, "id", json_integer(t[i]));
            json_object_set_new(p, "piece", jtext(piece, k));
            json_array_append_new(arr, p);
        } else json_array_append_new(arr, json_integer(t[i]));
    }
    free(t);
    json_decref(o);
    json_t *r = json_object();
    json_object_set_new(r, "tokens", arr);
    return send_json(c, 200, r);
}

static enum MHD_Result handle_detokenize(struct srv *srv, struct MHD_Connection *c, struct conn *cs) {
    struct srv_error e;
    json_t *o = parse_body_object(cs, &e);
    if (!o) return send_error(c, &e);
    json_t *toks = json_object_get(o, "tokens");
    if (!json_is_array(toks)) {
        json_decref(o);
        return send_err(c, 400, "invalid_request_error", "tokens", NULL, "'tokens' must be an array of token ids");
    }
    size_t i;
    json_t *t;
    char *out = NULL;
    size_t len = 0;
    json_array_foreach(toks, i, t) {
        if (!json_is_integer(t) || json_integer_value(t) < 0 || json_integer_value(t) >= srv->mi.n_vocab) {
            free(out);
            json_decref(o);
            return send_err(c, 400, "invalid_request_error", "tokens", NULL,
                            "'tokens'[%zu] is not a token id in [0, %d)", i, srv->mi.n_vocab);
        }
        char piece[256];
        size_t k = kvs_token_piece(srv->model, (int32_t)json_integer_value(t), true, piece, sizeof piece);
        if (k >= sizeof piece) k = sizeof piece - 1;
        out = realloc(out, len + k + 1);
        memcpy(out + len, piece, k);
        len += k;
    }
    json_decref(o);
    json_t *r = json_object();
    /* invalid UTF-8 (a token cut inside a character) is replaced, not refused */
    json_t *s = jtext(out ? out : "", len);
    json_object_set_new(r, "content", s);
    free(out);
    return send_json(c, 200, r);
}

static void prom(char **b, size_t *len, size_t *cap, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void prom(char **b, size_t *len, size_t *cap, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(*b + *len, *cap - *len, fmt, ap);
        va_end(ap);
        if ((size_t)n < *cap - *len) {
            *len += (size_t)n;
            return;
        }
        *cap = *cap * 2 + (size_t)n;
        *b = realloc(*b, *cap);
    }
}

/* GET /v1/chunks: the known records (listed by the inference thread) */
static enum MHD_Result handle_chunks_list(struct srv *srv, struct MHD_Connection *c) {
    if (srv->cfg.chunk.mem <= 0)
        return send_err(c, 501, "not_implemented_error", NULL, NULL,
                        "the chunk store is off (--chunk-mem 0)");
    struct slot_cmd *cmd = calloc(1, sizeof *cmd);
    cmd->action = 4;
    cmd->slot = -1;
    pthread_mutex_lock(&srv->mu);
    cmd->next = srv->cmds;
    srv->cmds = cmd;
    pthread_cond_signal(&srv->cv_sched);
    while (!cmd->done && !srv->stopping) pthread_cond_wait(&srv->cv_out, &srv->mu);
    pthread_mutex_unlock(&srv->mu);
    json_error_t je;
    json_t *arr = cmd->out ? json_loads(cmd->out, 0, &je) : NULL;
    free(cmd->out);
    free(cmd);
    if (!arr) return send_err(c, 503, "unavailable_error", NULL, NULL, "the server is shutting down");
    json_t *o = json_object();
    json_object_set_new(o, "object", json_string("list"));
    json_object_set_new(o, "data", arr);
    return send_json(c, 200, o);
}

/* POST /v1/chunks {"text" | "tokens", "prefix"}: compute and store a chunk's record */
static enum MHD_Result handle_chunks_post(struct srv *srv, struct MHD_Connection *c, struct conn *cs) {
    if (srv->cfg.chunk.mem <= 0)
        return send_err(c, 501, "not_implemented_error", NULL, NULL,
                        "the chunk store is off (--chunk-mem 0)");
    struct srv_error e;
    json_t *o = parse_body_object(cs, &e);
    if (!o) return send_error(c, &e);
    json_t *text = json_object_get(o, "text"), *toks = json_object_get(o, "tokens"),
           *prefix = json_object_get(o, "prefix");
    if ((!text || json_is_null(text)) == (!toks || json_is_null(toks))) {
        json_decref(o);
        return send_err(c, 400, "invalid_request_error", "text", NULL,
                        "give the chunk as \"text\" (a string) or \"tokens\" (token ids), one of them");
    }
    if ((text && !json_is_null(text) && (!json_is_string(text) || !json_string_length(text))) ||
        (prefix && !json_is_null(prefix) && !json_is_string(prefix))) {
        json_decref(o);
        return send_err(c, 400, "invalid_request_error", text && !json_is_string(text) ? "text" : "prefix",
                        NULL, "\"text\" must be a non-empty string and \"prefix\" a string");
    }
    struct job *j = calloc(1, sizeof *j);
    j->p.kind = SRV_COMPLETION;
    j->p.max_tokens = 0;
    j->p.temperature = 0;
    j->p.top_p = 1;
    j->p.repeat_penalty = 1;
    j->p.kv = strdup("full");
    j->p.id_slot = -1;
    j->p.recompute_ratio = -1;
    j->chunk_register = true;
    j->slot = -1;
    j->t_arrive = now_ms();
    j->created = (long long)time(NULL);
    snprintf(j->id, sizeof j->id, "chunkreq-%llx", (unsigned long long)j->created);
    int np = 0, nc = 0;
    int32_t *pt = NULL, *ct = NULL;
    const char *pre = prefix && json_is_string(prefix) ? json_string_value(prefix) : "";
    if (*pre) pt = tokenize(srv, pre, true, false, &np);
    const char *bad = NULL;
    if (text && json_is_string(text)) {
        if (!*pre) { /* the chunk first: the model's BOS (if any) goes before it, not in it */
            int nb = 0;
            pt = tokenize(srv, "", true, false, &nb);
            np = nb;
        }
        ct = tokenize(srv, json_string_value(text), false, false, &nc);
    } else if (!json_is_array(toks)) bad = "\"tokens\" must be an array of token ids";
    else {
        nc = (int)json_array_size(toks);
        ct = malloc(sizeof *ct * (size_t)(nc ? nc : 1));
        for (int i = 0; i < nc && !bad; i++) {
            json_t *x = json_array_get(toks, (size_t)i);
            if (!json_is_integer(x) || json_integer_value(x) < 0 || json_integer_value(x) >= srv->mi.n_vocab)
                bad = "\"tokens\" must hold token ids of this model";
            else ct[i] = (int32_t)json_integer_value(x);
        }
    }
    json_decref(o);
    const struct chunk_cfg *cc = &srv->cfg.chunk;
    char msg[300];
    if (!bad && (nc < cc->min_tokens || nc > cc->max_tokens)) {
        snprintf(msg, sizeof msg, "the chunk has %d tokens; chunks have %d to %d (--chunk-min, "
                 "--chunk-max)", nc, cc->min_tokens, cc->max_tokens);
        bad = msg;
    }
    if (!bad && np + nc >= srv->cfg.n_ctx) bad = "the prefix and the chunk do not fit the context (-c)";
    if (bad) {
        free(pt), free(ct);
        j->refs = 1;
        pthread_mutex_lock(&srv->mu);
        job_release(j);
        pthread_mutex_unlock(&srv->mu);
        return send_err(c, 400, "invalid_request_error", "text", NULL, "%s", bad);
    }
    j->n_prompt = np + nc;
    j->toks = malloc(sizeof *j->toks * (size_t)j->n_prompt);
    if (np) memcpy(j->toks, pt, sizeof *pt * (size_t)np);
    memcpy(j->toks + np, ct, sizeof *ct * (size_t)nc);
    free(pt), free(ct);
    j->chunk_at = calloc(1, sizeof *j->chunk_at);
    j->chunk_at[0][0] = np, j->chunk_at[0][1] = np + nc;
    j->n_chunk_at = 1;
    uint64_t cid = chunk_id(j->toks + np, nc);
    pthread_mutex_lock(&srv->mu);
    job_submit(srv, j);
    pthread_cond_signal(&srv->cv_sched);
    for (int waits = 0; j->state != J_DONE; ) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 1;
        pthread_cond_timedwait(&srv->cv_out, &srv->mu, &ts);
        if (srv->stopping && j->state == J_SUBMITTED && ++waits > 3) { /* never taken */
            job_release(j);
            pthread_mutex_unlock(&srv->mu);
            return send_err(c, 503, "unavailable_error", NULL, "shutting_down", "the server is shutting down");
        }
    }
    if (j->failed) {
        struct srv_error err = j->err;
        job_release(j);
        pthread_mutex_unlock(&srv->mu);
        return send_error(c, &err);
    }
    bool created = j->chunks_cached > 0;
    job_release(j);
    pthread_mutex_unlock(&srv->mu);
    char id[32];
    chunk_id_str(cid, id);
    json_t *r = json_object();
    json_object_set_new(r, "id", json_string(id));
    json_object_set_new(r, "object", json_string("chunk"));
    json_object_set_new(r, "n_tokens", json_integer(nc));
    json_object_set_new(r, "prefix_tokens", json_integer(np));
    json_object_set_new(r, "created", json_boolean(created));
    return send_json(c, 200, r);
}

static enum MHD_Result handle_metrics(struct srv *srv, struct MHD_Connection *c) {
    size_t cap = 4096, len = 0;
    char *b = malloc(cap);
    b[0] = 0;
    pthread_mutex_lock(&srv->mu);
    struct srv_stats s = srv->st;
    int queued = srv->n_queued;
    pthread_mutex_unlock(&srv->mu);
#define M(type, name, help, fmt, v) \
    prom(&b, &len, &cap, "# HELP kvsieve:" name " " help "\n# TYPE kvsieve:" name " " type "\nkvsieve:" name " " fmt "\n", v)
    M("counter", "requests_total", "Completion requests received.", "%llu", (unsigned long long)s.requests);
    M("counter", "requests_failed_total", "Requests answered with an error.", "%llu", (unsigned long long)s.failed);
    M("counter", "prompt_tokens_total", "Prompt tokens evaluated (cached ones excluded).", "%llu", (unsigned long long)s.prompt_tokens);
    M("counter", "tokens_predicted_total", "Tokens generated.", "%llu", (unsigned long long)s.predicted_tokens);
    M("gauge", "prompt_tokens_seconds", "Average prompt throughput in tokens/s.", "%.3f", s.prompt_ms > 0 ? s.prompt_tokens / (s.prompt_ms / 1e3) : 0.0);
    M("gauge", "predicted_tokens_seconds", "Average generation throughput in tokens/s (per request).", "%.3f", s.predicted_ms > 0 ? s.predicted_tokens / (s.predicted_ms / 1e3) : 0.0);
    M("gauge", "requests_waiting", "Requests queued, not yet admitted.", "%d", queued);
    M("gauge", "requests_running", "Sequences running.", "%d", s.running);
    M("gauge", "kv_bytes", "KV bytes held by running sequences (shared prefixes excluded).", "%llu", (unsigned long long)s.kv_bytes);
    M("gauge", "kv_compression_ratio", "fp16 bytes of the tokens the running sequences hold / KV bytes held.", "%.4f", s.kv_bytes ? (double)s.kv_fp16_bytes / s.kv_bytes : 1.0);
    M("gauge", "kv_mem_limit_bytes", "--kv-mem.", "%lld", (long long)srv->cfg.kv_mem);
    M("counter", "prefix_cache_hits_total", "Requests that started from a cached prefix.", "%llu", (unsigned long long)s.prefix_hits);
    M("counter", "prefix_cache_tokens_reused_total", "Prompt tokens taken from the prefix cache.", "%llu", (unsigned long long)s.prefix_tokens_reused);
    M("gauge", "prefix_cache_bytes", "Bytes held by the prefix cache.", "%llu", (unsigned long long)s.prefix_bytes);
    M("gauge", "prefix_cache_nodes", "Nodes in the prefix cache.", "%llu", (unsigned long long)s.prefix_nodes);
    M("counter", "prefix_cache_evictions_total", "Prefix cache nodes evicted.", "%llu", (unsigned long long)s.prefix_evictions);
    if (s.chunks_on) {
        const struct chunk_stats *k = &s.chunks;
        prom(&b, &len, &cap, "# HELP kvsieve:chunk_hits_total Chunk lookups answered, by the tier that held the record.\n"
                             "# TYPE kvsieve:chunk_hits_total counter\n"
                             "kvsieve:chunk_hits_total{tier=\"ram\"} %llu\nkvsieve:chunk_hits_total{tier=\"disk\"} %llu\n"
                             "kvsieve:chunk_hits_total{tier=\"redis\"} %llu\n",
             (unsigned long long)k->hits_ram, (unsigned long long)k->hits_disk, (unsigned long long)k->hits_redis);
        M("counter", "chunk_misses_total", "Chunk lookups no tier could answer (the chunk is computed and cached).", "%llu", (unsigned long long)k->misses);
        M("counter", "chunk_records_created_total", "Chunk records made.", "%llu", (unsigned long long)k->created);
        M("counter", "chunk_tokens_reused_total", "Prompt tokens taken from chunk records.", "%llu", (unsigned long long)k->tokens_reused);
        M("counter", "chunk_tokens_recomputed_total", "Tokens of reused chunks computed again (Cache-Craft's fix).", "%llu", (unsigned long long)k->tokens_recomputed);
        M("counter", "chunk_tokens_checked_total", "Tokens of reused chunks run through CacheBlend's check layers.", "%llu", (unsigned long long)k->tokens_checked);
        M("gauge", "chunk_recompute_fraction", "Recomputed / reused chunk tokens since start.", "%.4f", k->tokens_reused ? (double)k->tokens_recomputed / k->tokens_reused : 0.0);
        prom(&b, &len, &cap, "# HELP kvsieve:chunk_records Chunk records held, by tier.\n# TYPE kvsieve:chunk_records gauge\n"
                             "kvsieve:chunk_records{tier=\"ram\"} %lld\nkvsieve:chunk_records{tier=\"disk\"} %lld\n",
             (long long)k->ram_records, (long long)k->disk_records);
        M("gauge", "chunk_ram_bytes", "Bytes of the chunk records held in RAM.", "%lld", (long long)k->ram_bytes);
        M("gauge", "chunk_disk_bytes", "Bytes of the chunk records on disk.", "%lld", (long long)k->disk_bytes);
        M("counter", "chunk_evictions_total", "Chunk records dropped from RAM (kept below).", "%llu", (unsigned long long)k->evictions_ram);
        M("counter", "chunk_corrupt_total", "Chunk records refused (corrupt, foreign) and deleted.", "%llu", (unsigned long long)k->corrupt);
        M("gauge", "chunk_redis_up", "1 while the Redis tier is connected.", "%d", k->redis_up ? 1 : 0);
        M("counter", "chunk_redis_errors_total", "Redis failures (each closes the connection; retried with backoff).", "%llu", (unsigned long long)k->redis_errors);
        M("counter", "chunk_redis_reconnects_total", "Reconnections to Redis after a failure.", "%llu", (unsigned long long)k->redis_reconnects);
    }
#undef M
    prom(&b, &len, &cap, "# HELP kvsieve:kv_bytes_by_policy KV bytes held by running sequences, by KV policy.\n"
                         "# TYPE kvsieve:kv_bytes_by_policy gauge\n");
    for (int i = 0; i < s.n_policy; i++)
        prom(&b, &len, &cap, "kvsieve:kv_bytes_by_policy{policy=\"%s\"} %llu\n", s.by_policy[i],
             (unsigned long long)s.by_policy_bytes[i]);
    enum MHD_Result r = send_text(c, 200, "text/plain; version=0.0.4", b, len);
    free(b);
    return r;
}

static enum MHD_Result handle_slots(struct srv *srv, struct MHD_Connection *c) {
    json_t *arr = json_array();
    pthread_mutex_lock(&srv->mu);
    for (int i = 0; i < srv->cfg.n_parallel; i++) {
        struct slot_info *si = &srv->slots[i];
        if (!si->used) continue;
        json_t *o = json_object();
        json_object_set_new(o, "id", json_integer(i));
        json_object_set_new(o, "request_id", json_string(si->request_id));
        json_object_set_new(o, "n_past", json_integer(si->n_past));
        json_object_set_new(o, "n_prompt", json_integer(si->n_prompt));
        json_object_set_new(o, "n_generated", json_integer(si->n_gen));
        json_object_set_new(o, "entries_per_head", json_real(si->entries));
        json_object_set_new(o, "kv_bytes", json_integer((json_int_t)si->kv_bytes));
        json_object_set_new(o, "kv", json_string(si->kv));
        json_object_set_new(o, "state", json_string(si->decoding ? "decode" : "prefill"));
        json_array_append_new(arr, o);
    }
    pthread_mutex_unlock(&srv->mu);
    return send_json(c, 200, arr);
}

/* GET /prefixes: the prefix cache's nodes with their checksums, computed on the inference thread */
static enum MHD_Result handle_prefixes(struct srv *srv, struct MHD_Connection *c) {
    struct slot_cmd *cmd = calloc(1, sizeof *cmd);
    cmd->action = 3;
    cmd->slot = -1;
    pthread_mutex_lock(&srv->mu);
    if (srv->stopping) {
        pthread_mutex_unlock(&srv->mu);
        free(cmd);
        return send_err(c, 503, "unavailable_error", NULL, NULL, "the server is shutting down");
    }
    cmd->next = srv->cmds;
    srv->cmds = cmd;
    pthread_cond_signal(&srv->cv_sched);
    while (!cmd->done && !srv->stopping) pthread_cond_wait(&srv->cv_out, &srv->mu);
    bool done = cmd->done;
    pthread_mutex_unlock(&srv->mu);
    if (!done) return send_err(c, 503, "unavailable_error", NULL, NULL, "the server is shutting down");
    enum MHD_Result r = send_text(c, 200, "application/json", cmd->out ? cmd->out : "[]",
                                  cmd->out ? strlen(cmd->out) : 2);
    free(cmd->out);
    free(cmd);
    return r;
}

static enum MHD_Result handle_slot_action(struct srv *srv, struct MHD_Connection *c,
                                          struct conn *cs, const char *idstr) {
    char *end;
    long id = strtol(idstr, &end, 10);
    if (!*idstr || *end || id < 0 || id >= srv->cfg.n_parallel)
        return send_err(c, 400, "invalid_request_error", "id_slot", NULL,
                        "slot id must be an integer in [0, %d)", srv->cfg.n_parallel);
    const char *action = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "action");
    int a = !action ? -1 : !strcmp(action, "save") ? 0 : !strcmp(action, "restore") ? 1
          : !strcmp(action, "erase") ? 2 : -1;
    if (a < 0)
        return send_err(c, 400, "invalid_request_error", "action", NULL,
                        "?action= must be save, restore or erase");
    struct slot_cmd *cmd = calloc(1, sizeof *cmd);
    cmd->action = a;
    cmd->slot = (int)id;
    char fname[256] = "";
    if (a != 2) {
        if (!srv->cfg.slot_save_path) {
            free(cmd);
            return send_err(c, 501, "not_supported_error", NULL, NULL,
                            "slot save/restore is disabled (start the server with --slot-save-path DIR)");
        }
        struct srv_error e;
        json_t *o = parse_body_object(cs, &e);
        if (!o) {
            free(cmd);
            return send_error(c, &e);
        }
        json_t *fn = json_object_get(o, "filename");
        const char *f = json_is_string(fn) ? json_string_value(fn) : NULL;
        if (!f || !*f || strchr(f, '/') || strchr(f, '\\') || strstr(f, "..") || strlen(f) > 200) {
            json_decref(o);
            free(cmd);
            return send_err(c, 400, "invalid_request_error", "filename", NULL,
                            "'filename' must be a plain file name (no '/' or '..', 1 to 200 bytes)");
        }
        snprintf(fname, sizeof fname, "%s", f);
        snprintf(cmd->path, sizeof cmd->path, "%s/%s", srv->cfg.slot_save_path, f);
        json_decref(o);
    }
    pthread_mutex_lock(&srv->mu);
    if (srv->stopping) {
        pthread_mutex_unlock(&srv->mu);
        free(cmd);
        return send_err(c, 503, "unavailable_error", NULL, NULL, "the server is shutting down");
    }
    cmd->next = srv->cmds;
    srv->cmds = cmd;
    pthread_cond_signal(&srv->cv_sched);
    while (!cmd->done && !srv->stopping) pthread_cond_wait(&srv->cv_out, &srv->mu);
    bool done = cmd->done;
    pthread_mutex_unlock(&srv->mu);
    if (!done) { /* the inference thread stopped before running it; it is leaked on purpose */
        return send_err(c, 503, "unavailable_error", NULL, NULL, "the server is shutting down");
    }
    enum MHD_Result r;
    if (cmd->status != 200) {
        r = send_err(c, cmd->status, cmd->status == 400 ? "invalid_request_error" : "server_error",
                     NULL, NULL, "%s", cmd->msg);
    } else {
        json_t *o = json_object();
        json_object_set_new(o, "id_slot", json_integer(id));
        if (a == 0) {
            json_object_set_new(o, "filename", json_string(fname));
            json_object_set_new(o, "n_saved", json_integer(atoi(cmd->msg)));
        } else if (a == 1) {
            json_object_set_new(o, "filename", json_string(fname));
            json_object_set_new(o, "n_restored", json_integer(atoi(cmd->msg)));
        } else json_object_set_new(o, "n_erased", json_integer(atoi(cmd->msg)));
        r = send_json(c, 200, o);
    }
    free(cmd);
    return r;
}

/* ---- dispatch ------------------------------------------------------------------------- */

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls) {
    (void)version;
    struct srv *srv = cls;
    struct conn *cs = *con_cls;
    if (!cs) { /* first call: headers only */
        cs = calloc(1, sizeof *cs);
        *con_cls = cs;
        if (srv->cfg.api_key && strcmp(url, "/health") && strcmp(method, "OPTIONS")) {
            const char *auth = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
            if (!auth || strncmp(auth, "Bearer ", 7) || strcmp(auth + 7, srv->cfg.api_key)) {
                cs->answered = true;
                return send_err(c, 401, "authentication_error", NULL, "invalid_api_key",
                                "missing or invalid API key (send 'Authorization: Bearer KEY')");
            }
        }
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoll(cl, NULL, 10) > srv->cfg.max_body) {
            cs->answered = true;
            return send_err(c, 413, "invalid_request_error", NULL, "request_too_large",
                            "the request body has %s bytes, more than the server's --max-body of %lld",
                            cl, (long long)srv->cfg.max_body);
        }
        return MHD_YES;
    }
    if (cs->answered) { /* discard the rest of a refused body */
        *upload_size = 0;
        return MHD_YES;
    }
    if (*upload_size) {
        if (cs->len + *upload_size > (size_t)srv->cfg.max_body) cs->too_large = true;
        else {
            if (cs->len + *upload_size + 1 > cs->cap) {
                cs->cap = (cs->len + *upload_size + 1) * 2;
                cs->body = realloc(cs->body, cs->cap);
            }
            memcpy(cs->body + cs->len, upload, *upload_size);
            cs->len += *upload_size;
            cs->body[cs->len] = 0;
        }
        *upload_size = 0;
        return MHD_YES;
    }
    cs->answered = true;
    if (cs->too_large)
        return send_err(c, 413, "invalid_request_error", NULL, "request_too_large",
                        "the request body is larger than the server's --max-body of %lld bytes",
                        (long long)srv->cfg.max_body);
    bool get = !strcmp(method, "GET"), post = !strcmp(method, "POST");
    if (!strcmp(method, "OPTIONS")) {
        struct MHD_Response *r = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
        MHD_add_response_header(r, "Access-Control-Allow-Origin", "*");
        MHD_add_response_header(r, "Access-Control-Allow-Headers", "Authorization, Content-Type");
        MHD_add_response_header(r, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
        enum MHD_Result ret = MHD_queue_response(c, 204, r);
        MHD_destroy_response(r);
        return ret;
    }
    struct { const char *path; bool post; } routes[] = {
        {"/health", false}, {"/v1/health", false}, {"/v1/models", false}, {"/models", false},
        {"/metrics", false}, {"/slots", false}, {"/prefixes", false}, {"/v1/chat/completions", true},
        {"/chat/completions", true}, {"/v1/completions", true}, {"/completions", true},
        {"/tokenize", true}, {"/detokenize", true}, {"/v1/chunks", false}};
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++) {
        if (strcmp(url, routes[i].path)) continue;
        if (!strcmp(url, "/v1/chunks") ? !(get || post) : routes[i].post ? !post : !get)
            return send_err(c, 405, "invalid_request_error", NULL, "method_not_allowed",
                            "%s needs %s", url, routes[i].post ? "POST" : "GET");
        if (strstr(url, "health")) {
            json_t *o = json_object();
            json_object_set_new(o, "status", json_string("ok"));
            return send_json(c, 200, o);
        }
        if (strstr(url, "models")) return handle_models(srv, c);
        if (!strcmp(url, "/metrics")) return handle_metrics(srv, c);
        if (!strcmp(url, "/slots")) return handle_slots(srv, c);
        if (!strcmp(url, "/prefixes")) return handle_prefixes(srv, c);
        if (!strcmp(url, "/v1/chunks")) return post ? handle_chunks_post(srv, c, cs) : handle_chunks_list(srv, c);
        if (strstr(url, "chat/completions")) return handle_completion(srv, c, cs, SRV_CHAT);
        if (strstr(url, "completions")) return handle_completion(srv, c, cs, SRV_COMPLETION);
        if (!strcmp(url, "/tokenize")) return handle_tokenize(srv, c, cs);
        return handle_detokenize(srv, c, cs);
    }
    if (!strncmp(url, "/slots/", 7)) {
        if (!post)
            return send_err(c, 405, "invalid_request_error", NULL, "method_not_allowed",
                            "%s needs POST", url);
        return handle_slot_action(srv, c, cs, url + 7);
    }
    return send_err(c, 404, "not_found_error", NULL, "not_found", "no endpoint %s %s", method, url);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    struct srv *srv = cls;
    (void)c;
    (void)toe;
    struct conn *cs = *con_cls;
    if (cs && cs->counted) {
        pthread_mutex_lock(&srv->mu);
        g_active--;
        pthread_mutex_unlock(&srv->mu);
    }
    if (cs) {
        free(cs->body);
        free(cs);
    }
    *con_cls = NULL;
}

/* ---- command line ----------------------------------------------------------------------- */

static const char *SERVE_USAGE =
    "usage: kvsieve serve [options]\n"
    "\n"
    "An OpenAI-compatible HTTP server (POST /v1/chat/completions, /v1/completions, streaming\n"
    "or not; GET /health, /v1/models, /metrics, /slots, /prefixes; POST /tokenize,\n"
    "/detokenize, /slots/{id}?action=save|restore|erase, GET and POST /v1/chunks) with\n"
    "continuous batching: one\n"
    "inference thread runs one mixed batch per tick (the decode token of every running\n"
    "request, then prompt chunks), each request under its own KV policy (request field\n"
    "\"kv\"). Endpoints: docs/SERVER.md.\n"
    "\n"
    "  --host ADDR           IPv4 address to listen on (default 127.0.0.1; 0.0.0.0 = all)\n"
    "  --port N              TCP port (default 8080)\n"
    "  -m, --model FILE      GGUF model (default " KVS_DEFAULT_MODEL ")\n"
    "  -np, --parallel N     most requests running at once (default 4, at most 64)\n"
    "  -c, --ctx-size N      context size per sequence (default: the model's, at most 4096);\n"
    "                        a request whose policy bounds the cache generates past it\n"
    "  -t, --threads N       worker threads of the inference thread (default: all cores)\n"
    "  -b, --batch N         engine prefill chunk (default 512)\n"
    "      --device DEV      cpu (default) or cuda (a `make cuda` build; -ngl N > 0 is the same):\n"
    "                        weights, KV caches and every batch on the GPU. Full cache only so\n"
    "                        far: requests with another \"kv\" get a 400, and the prefix cache,\n"
    "                        chunk store and --prefix-kv are off (asking for them is an error)\n"
    "      --kv SPEC         default KV policy of a request (default full; `kvsieve --help kv`)\n"
    "      --kv-mem BYTES    KV bytes the running requests may hold together (default 1G;\n"
    "                        suffixes K, M, G). A request is admitted when its worst case\n"
    "                        (kvs_kv_bytes_bound of its policy, prompt + max_tokens) fits in what\n"
    "                        is left; one that can never fit is refused with a 400\n"
    "      --prefix-mem BYTES  prefix cache size (default 256M; 0 = off): prompts are cached in\n"
    "                        blocks of 64 tokens, shared read-only, evicted LRU when unused\n"
    "      --prefix-kv SPEC  compress a cached prefix once under SPEC (e.g. snapkv:ratio=0.25)\n"
    "                        and reuse that copy (request field \"prefix_kv\" overrides)\n"
    "      --api-key KEY     require 'Authorization: Bearer KEY' (GET /health stays open)\n"
    "      --metrics         accepted for llama-server compatibility: /metrics is always on\n"
    "      --no-pack         do not keep the packed copy of the weights (Q4_0/Q4_1/Q8_0/Q4_K/\n"
    "                        Q6_K) that batched decode reads: 1.4x faster at 16 streams on\n"
    "                        SmolLM2 and Qwen2.5-1.5B, for about the weights' size again in RAM\n"
    "      --slot-save-path DIR  folder for POST /slots/{id}?action=save|restore (plain file\n"
    "                        names): a saved cache is continued by a request with \"id_slot\"\n"
    "      --timeout S       per-request limit in seconds (default 600, 0 = none): generation\n"
    "                        stops there with finish_reason \"length\"\n"
    "      --max-body BYTES  largest request body (default 1M; 413 above)\n"
    "      --queue N         most requests waiting for admission (default 64; 503 when full)\n"
    "      --batch-tokens N  tokens per tick: decode tokens + prompt chunks (default: the\n"
    "                        engine's step size, max(-b, -np))\n"
    "  -q, --quiet           no request log lines\n"
    "\n"
    "chunk store (Cache-Craft chunk reuse for RAG; docs/SERVER.md, \"Chunk caches\"):\n"
    "      --chunk-mem BYTES RAM tier (default 512M; 0 = the store is off). Records are counted\n"
    "                        in slots of --chunk-max tokens (or --chunk-slots N)\n"
    "      --chunk-policy P  RAM tier replacement: lru, lfu, arc, marking, pred, pred+lru\n"
    "                        (default pred+lru: one-bit discard predictions from reuse\n"
    "                        distances, LRU as the robust fallback)\n"
    "      --chunk-dir DIR   disk tier: one checksummed file per record (index rebuilt at start)\n"
    "      --chunk-disk BYTES  disk tier size (default 4G; least recently used files deleted)\n"
    "      --redis HOST:PORT Redis tier shared by several servers (written through; a dead\n"
    "                        Redis is retried with backoff while the local tiers serve)\n"
    "      --chunk-min N, --chunk-max N  chunk sizes in tokens (default 16 and 512)\n"
    "      --chunk-alpha A   Cache-Craft's alpha: recompute ceil(A*CCI*(1-beta')*n) tokens (1)\n"
    "      --chunk-miss X    a chunk whose fix overhead is above X is prefilled instead (0.95)\n"
    "      --chunk-trace FILE  log chunk accesses for `kvsieve pagesim FILE`\n"
    "      --chunk-check-layer N  CacheBlend's check layer (default 1): requests with\n"
    "                        \"chunk_reuse\": \"cacheblend\" run a placed chunk's tokens through\n"
    "                        layers 0..N and recompute the recompute_ratio (0.15) of them whose\n"
    "                        values deviate most there\n"
    "      --chunk-kv SPEC   store chunk records compressed under SPEC (default: exact fp16),\n"
    "                        e.g. kivi:bits=4 (4-bit keys per channel, values per token) or\n"
    "                        snapkv:ratio=0.5 (half the entries, scored by the chunk's own last\n"
    "                        queries); a placed record is dequantised and re-rotated\n"
    "\n"
    "SIGINT or SIGTERM: running requests are cancelled (503 / an error event), everything is\n"
    "freed, exit 0. Exit 2 on bad flags or an unloadable model.\n";

/* A usage error: the message on stderr; returns 2, the exit status serve_main passes back. */
static int serve_usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int serve_usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "kvsieve serve: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n(kvsieve serve --help lists the options)\n");
    va_end(ap);
    return 2;
}

static bool parse_ll(const char *flag, const char *v, long long lo, long long hi, long long *out) {
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (!*v || *end || errno || x < lo || x > hi) {
        serve_usage_error("%s expects an integer in [%lld, %lld], got '%s'", flag, lo, hi, v);
        return false;
    }
    *out = x;
    return true;
}

static bool parse_bytes(const char *flag, const char *v, int64_t *out) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    double mul = 1;
    if (*end == 'K' || *end == 'k') mul = 1024.0, end++;
    else if (*end == 'M' || *end == 'm') mul = 1024.0 * 1024, end++;
    else if (*end == 'G' || *end == 'g') mul = 1024.0 * 1024 * 1024, end++;
    if (*end == 'B' || *end == 'b' || (*end == 'i' && end[1] == 'B')) end += *end == 'i' ? 2 : 1;
    if (end == v || *end || errno || !(x >= 0) || x * mul > 9e18) {
        serve_usage_error("%s expects a size in bytes (suffixes K, M, G), got '%s'", flag, v);
        return false;
    }
    *out = (int64_t)(x * mul);
    return true;
}

static volatile sig_atomic_t g_log_quiet;

/* Fills cfg from the command line. Returns -1 to go on serving, else the exit status (0 after
 * --help, 2 after a usage error, already printed); the decision to exit stays with the caller. */
static int serve_parse(int argc, char **argv, struct srv_config *cfg) {
    cfg->host = "127.0.0.1";
    cfg->port = 8080;
    cfg->model_path = getenv("KVSIEVE_MODEL") ? getenv("KVSIEVE_MODEL") : KVS_DEFAULT_MODEL;
    cfg->n_parallel = 4;
    cfg->kv = "full";
    cfg->kv_mem = 1LL << 30;
    cfg->prefix_mem = 256LL << 20;
    cfg->max_body = 1 << 20;
    cfg->timeout_s = 600;
    cfg->queue = 64;
    cfg->chunk_check_layer = 1;
    cfg->n_batch = 512;
    cfg->chunk = (struct chunk_cfg){.mem = 512LL << 20, .policy = "pred+lru", .disk = 4LL << 30,
                                    .min_tokens = 16, .max_tokens = 512, .alpha = 1.0, .miss = 0.95};
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
        long long x;
#define NEXT() do { if (i + 1 >= argc) return serve_usage_error("%s needs a value", a); v = argv[++i]; } while (0)
#define INT(field, lo, hi) do { NEXT(); if (!parse_ll(a, v, lo, hi, &x)) return 2; field = (int)x; } while (0)
#define BYTES(field) do { NEXT(); if (!parse_bytes(a, v, &field)) return 2; } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(SERVE_USAGE, stdout);
            return 0;
        } else if (!strcmp(a, "--host")) { NEXT(); cfg->host = v; }
        else if (!strcmp(a, "--port")) INT(cfg->port, 0, 65535);
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { NEXT(); cfg->model_path = v; }
        else if (!strcmp(a, "-np") || !strcmp(a, "--parallel")) INT(cfg->n_parallel, 1, 64);
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) INT(cfg->n_ctx, 16, 1 << 20);
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) INT(cfg->n_threads, 0, 1024);
        else if (!strcmp(a, "-b") || !strcmp(a, "--batch")) INT(cfg->n_batch, 1, 4096);
        else if (!strcmp(a, "--kv")) { NEXT(); cfg->kv = v; }
        else if (!strcmp(a, "--kv-mem")) BYTES(cfg->kv_mem);
        else if (!strcmp(a, "--prefix-mem")) { BYTES(cfg->prefix_mem); cfg->prefix_mem_given = true; }
        else if (!strcmp(a, "--device")) {
            NEXT();
            if (!strcmp(v, "cpu")) cfg->device = KVS_DEVICE_CPU;
            else if (!strcmp(v, "cuda")) cfg->device = KVS_DEVICE_CUDA;
            else return serve_usage_error("--device is cpu or cuda (got '%s')", v);
        } else if (!strcmp(a, "-ngl") || !strcmp(a, "--n-gpu-layers")) {
            int ngl = 0;
            INT(ngl, 0, 1 << 20);
            cfg->device = ngl > 0 ? KVS_DEVICE_CUDA : KVS_DEVICE_CPU;
        }
        else if (!strcmp(a, "--prefix-kv")) { NEXT(); cfg->prefix_kv = v; }
        else if (!strcmp(a, "--api-key")) { NEXT(); cfg->api_key = v; }
        else if (!strcmp(a, "--metrics")) { /* always on */ }
        else if (!strcmp(a, "--no-pack")) cfg->no_pack = true;
        else if (!strcmp(a, "--slot-save-path")) { NEXT(); cfg->slot_save_path = v; }
        else if (!strcmp(a, "--timeout")) INT(cfg->timeout_s, 0, 1 << 30);
        else if (!strcmp(a, "--max-body")) BYTES(cfg->max_body);
        else if (!strcmp(a, "--queue")) INT(cfg->queue, 1, 1 << 20);
        else if (!strcmp(a, "--batch-tokens")) INT(cfg->batch_tokens, 1, 1 << 20);
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) g_log_quiet = 1;
        else if (!strcmp(a, "--chunk-mem")) { BYTES(cfg->chunk.mem); cfg->chunk_mem_given = true; }
        else if (!strcmp(a, "--chunk-slots")) INT(cfg->chunk.slots, 1, 1 << 24);
        else if (!strcmp(a, "--chunk-policy")) { NEXT(); cfg->chunk.policy = v; }
        else if (!strcmp(a, "--chunk-dir")) { NEXT(); cfg->chunk.dir = v; }
        else if (!strcmp(a, "--chunk-disk")) BYTES(cfg->chunk.disk);
        else if (!strcmp(a, "--redis")) { NEXT(); cfg->chunk.redis = v; }
        else if (!strcmp(a, "--chunk-min")) INT(cfg->chunk.min_tokens, 4, 1 << 20);
        else if (!strcmp(a, "--chunk-max")) INT(cfg->chunk.max_tokens, 4, 1 << 20);
        else if (!strcmp(a, "--chunk-trace")) { NEXT(); cfg->chunk.trace = v; }
        else if (!strcmp(a, "--chunk-check-layer")) INT(cfg->chunk_check_layer, 0, 1 << 10);
        else if (!strcmp(a, "--chunk-kv")) { NEXT(); cfg->chunk_kv = cfg->chunk.kv = *v ? v : NULL; }
        else if (!strcmp(a, "--chunk-alpha") || !strcmp(a, "--chunk-miss")) {
            NEXT();
            char *end;
            double d = strtod(v, &end);
            if (*end || !(d >= 0 && d <= 100)) return serve_usage_error("%s expects a number >= 0, got '%s'", a, v);
            if (a[8] == 'a') cfg->chunk.alpha = d;
            else cfg->chunk.miss = d;
        }
        else return serve_usage_error("unknown option '%s'", a);
#undef BYTES
#undef INT
#undef NEXT
    }
    if (kvs_kv_spec_check(cfg->kv, NULL, 0) != KVS_OK) return serve_usage_error("--kv: %s", kvs_last_error());
    if (cfg->prefix_kv && kvs_kv_spec_check(cfg->prefix_kv, NULL, 0) != KVS_OK)
        return serve_usage_error("--prefix-kv: %s", kvs_last_error());
    if (cfg->api_key && !*cfg->api_key) return serve_usage_error("--api-key needs a non-empty key");
    if (cfg->max_body < 16) return serve_usage_error("--max-body must be at least 16 bytes");
    if (cfg->chunk.min_tokens > cfg->chunk.max_tokens)
        return serve_usage_error("--chunk-min %d is above --chunk-max %d", cfg->chunk.min_tokens,
                                 cfg->chunk.max_tokens);
    /* on the GPU: the CPU store stays empty, so no prefix cache, chunk store or prefix compression
     * (each needs the CPU store); off by default there, refused when asked for */
    if (cfg->device == KVS_DEVICE_CUDA) {
        if (cfg->prefix_mem_given && cfg->prefix_mem > 0)
            return serve_usage_error("--prefix-mem: the prefix cache does not run on the GPU yet "
                                     "(--device cuda); leave it out or give --prefix-mem 0");
        if (cfg->chunk_mem_given && cfg->chunk.mem > 0)
            return serve_usage_error("--chunk-mem: the chunk store does not run on the GPU yet "
                                     "(--device cuda); leave it out or give --chunk-mem 0");
        if (cfg->prefix_kv)
            return serve_usage_error("--prefix-kv: compressing prefixes does not run on the GPU yet "
                                     "(--device cuda)");
        cfg->prefix_mem = 0;
        cfg->chunk.mem = 0;
    }
    if (!strcmp(cfg->host, "localhost")) cfg->host = "127.0.0.1";
    struct in_addr ia;
    if (inet_pton(AF_INET, cfg->host, &ia) != 1)
        return serve_usage_error("--host expects an IPv4 address such as 127.0.0.1, got '%s'", cfg->host);
    return -1;
}

/* what serve_main built before it failed to start, freed (nothing else is running yet) */
static int startup_fail(struct srv *srv, int rc) {
    if (srv->ctx) kvs_context_free(srv->ctx);
    if (srv->model) kvs_model_free(srv->model);
    free(srv);
    return rc;
}

int serve_main(int argc, char **argv) {
    struct srv *srv = calloc(1, sizeof *srv);
    if (!srv) {
        fprintf(stderr, "kvsieve serve: out of memory\n");
        return 1;
    }
    struct srv_config *cfg = &srv->cfg;
    int prc = serve_parse(argc, argv, cfg);
    if (prc >= 0) return startup_fail(srv, prc);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)cfg->port)};
    inet_pton(AF_INET, cfg->host, &sin.sin_addr); /* checked by serve_parse */
    if (g_log_quiet) kvs_set_log_level(0);

    struct kvs_model_params mp = kvs_model_params_default();
    mp.pack = !cfg->no_pack;
    if (kvs_model_load(cfg->model_path, &mp, &srv->model) != KVS_OK) {
        fprintf(stderr, "kvsieve serve: %s\n", kvs_last_error());
        return startup_fail(srv, 2);
    }
    kvs_model_get_info(srv->model, &srv->mi);
    if (!cfg->n_ctx) cfg->n_ctx = srv->mi.n_ctx_train < 4096 ? srv->mi.n_ctx_train : 4096;
    struct kvs_context_params cp = kvs_context_params_default();
    cp.n_ctx = cfg->n_ctx;
    cp.n_threads = cfg->n_threads;
    cp.n_batch = cfg->n_batch;
    cp.n_seq_max = cfg->n_parallel < 64 ? cfg->n_parallel + 1 : 64; /* +1: the probe */
    cp.kv_spec = cfg->kv;
    cp.keep_stats = cfg->device != KVS_DEVICE_CUDA; /* for --prefix-kv, which the GPU refuses */
    cp.device = (enum kvs_device)cfg->device;
    if (kvs_context_new(srv->model, &cp, &srv->ctx) != KVS_OK) {
        fprintf(stderr, "kvsieve serve: %s\n", kvs_last_error());
        return startup_fail(srv, 2);
    }
    if (cfg->chunk_check_layer >= srv->mi.n_layer) {
        fprintf(stderr, "kvsieve serve: --chunk-check-layer %d: the model has %d layers (0..%d)\n",
                cfg->chunk_check_layer, srv->mi.n_layer, srv->mi.n_layer - 1);
        return startup_fail(srv, 2);
    }
    if (cfg->chunk.mem > 0 && cfg->chunk_kv && kvs_chunk_spec_check(srv->ctx, cfg->chunk_kv) != KVS_OK) {
        fprintf(stderr, "kvsieve serve: --chunk-kv: %s\n", kvs_last_error());
        return startup_fail(srv, 2);
    }
    if (cfg->chunk.mem > 0) {
        char err[600];
        srv->chunks = chunk_store_new(&cfg->chunk, srv->ctx, srv->model, err, sizeof err);
        if (!srv->chunks) {
            fprintf(stderr, "kvsieve serve: %s\n", err);
            return startup_fail(srv, 2);
        }
    }
    /* model id: the file name without .gguf */
    const char *base = strrchr(cfg->model_path, '/');
    base = base ? base + 1 : cfg->model_path;
    snprintf(srv->model_id, sizeof srv->model_id, "%s", base);
    size_t bl = strlen(srv->model_id);
    if (bl > 5 && !strcmp(srv->model_id + bl - 5, ".gguf")) srv->model_id[bl - 5] = 0;
    srv->started = (long long)time(NULL);
    srv->slots = calloc((size_t)cfg->n_parallel, sizeof *srv->slots);
    srv->lim = (struct srv_limits){.model_id = srv->model_id, .max_tokens_default = 512,
                                   .n_vocab = srv->mi.n_vocab, .check_kv = check_kv_cb};
    pthread_mutex_init(&srv->mu, NULL);
    pthread_cond_init(&srv->cv_sched, NULL);
    pthread_cond_init(&srv->cv_out, NULL);

    /* signals go to sigwait below, not to the worker threads */
    sigset_t ss;
    sigemptyset(&ss);
    sigaddset(&ss, SIGINT);
    sigaddset(&ss, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &ss, NULL);
    signal(SIGPIPE, SIG_IGN);

    pthread_t sched;
    if (pthread_create(&sched, NULL, sched_main, srv)) {
        fprintf(stderr, "kvsieve serve: cannot start the inference thread\n");
        return 1;
    }
    struct MHD_Daemon *d = MHD_start_daemon(
        MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL | MHD_USE_ITC,
        (uint16_t)cfg->port, NULL, NULL, on_request, srv, MHD_OPTION_SOCK_ADDR, &sin,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)600, MHD_OPTION_CONNECTION_LIMIT, (unsigned)1024, MHD_OPTION_END);
    int rc = 0;
    if (!d) {
        fprintf(stderr, "kvsieve serve: cannot listen on %s:%d (%s)\n", cfg->host, cfg->port,
                strerror(errno));
        rc = 1;
    } else {
        char dev[300]; /* where the batches run */
        if (cfg->device == KVS_DEVICE_CUDA) snprintf(dev, sizeof dev, "on %s", kvs_context_device_name(srv->ctx));
        else snprintf(dev, sizeof dev, "%d threads", kvs_context_n_threads(srv->ctx));
        fprintf(stderr, "kvsieve: serving %s on http://%s:%d (-np %d, -c %d, --kv %s, --kv-mem "
                "%lld, %s; Ctrl-C stops)\n", srv->model_id, cfg->host, cfg->port,
                cfg->n_parallel, cfg->n_ctx, cfg->kv, (long long)cfg->kv_mem, dev);
        int sig;
        sigwait(&ss, &sig);
        fprintf(stderr, "kvsieve serve: %s, shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    }
    pthread_mutex_lock(&srv->mu);
    srv->stopping = true;
    pthread_cond_signal(&srv->cv_sched);
    pthread_cond_broadcast(&srv->cv_out);
    pthread_mutex_unlock(&srv->mu);
    pthread_join(sched, NULL);
    pthread_mutex_lock(&srv->mu);
    pthread_cond_broadcast(&srv->cv_out);
    pthread_mutex_unlock(&srv->mu);
    if (d) { /* stop accepting, let the answers in flight go out (at most 2 s), then close */
        MHD_quiesce_daemon(d);
        for (int k = 0; k < 200; k++) {
            pthread_mutex_lock(&srv->mu);
            int a = g_active;
            pthread_mutex_unlock(&srv->mu);
            if (!a) break;
            usleep(10000);
        }
        MHD_stop_daemon(d);
    }
    /* anything submitted after the inference thread stopped */
    while (srv->submitted) {
        struct job *j = srv->submitted;
        srv->submitted = j->next;
        job_release(j);
    }
    chunk_store_free(srv->chunks); /* its nodes belong to the context */
    kvs_context_free(srv->ctx);
    kvs_model_free(srv->model);
    free(srv->slots);
    pthread_mutex_destroy(&srv->mu);
    pthread_cond_destroy(&srv->cv_sched);
    pthread_cond_destroy(&srv->cv_out);
    free(srv);
    return rc;
}
