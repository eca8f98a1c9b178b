/* request.h — the JSON-to-request path of `kvsieve serve`: parse and validate the body of a
 * chat or completions request into struct srv_params, without a model (the tokenizer runs later,
 * in the HTTP thread). Also the OpenAI-shaped error object. Used by the server and by
 * fuzz/fuzz_request.c. */
#ifndef KVS_SERVER_REQUEST_H
#define KVS_SERVER_REQUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SRV_MAX_STOPS 8
#define SRV_MAX_MSGS 256
#define SRV_MAX_LOGPROBS 20

enum srv_kind { SRV_CHAT, SRV_COMPLETION };

struct srv_msg {
    char *role, *content;
};

struct srv_params {
    enum srv_kind kind;
    struct srv_msg *msgs; /* chat */
    int n_msgs;
    char *prompt;         /* completions: text, or NULL when given as token ids */
    int32_t *prompt_toks; /* completions: token ids */
    int n_prompt_toks;
    int max_tokens;
    float temperature, top_p, min_p, presence_penalty, frequency_penalty, repeat_penalty;
    int top_k;
    char *stops[SRV_MAX_STOPS];
    int n_stops;
    bool stream, include_usage;
    bool has_seed;
    uint64_t seed;
    bool logprobs;
    int top_logprobs;
    char *kv;        /* NULL: the server's --kv */
    char *prefix_kv; /* NULL: the server's --prefix-kv */
    bool cache_prompt;
    int id_slot;     /* -1: none */
    /* chunk store (issue 15): chunk ids ("chunk-<hex>") or texts that occur in the prompt */
    char **chunks;
    int n_chunks;
    int chunk_reuse;       /* enum srv_chunk_reuse */
    float recompute_ratio; /* -1: Cache-Craft's decision, CacheBlend's 0.15 */
};
enum srv_chunk_reuse { SRV_CR_CACHECRAFT, SRV_CR_NONE, SRV_CR_ALL, SRV_CR_OFF, SRV_CR_CACHEBLEND };
#define SRV_MAX_CHUNKS 64

struct srv_error {
    int status;        /* HTTP status */
    const char *type;  /* invalid_request_error, ... */
    char param[64];    /* "" = null */
    char code[64];     /* "" = null */
    char message[512];
};

/* What validation needs to know; no model. */
struct srv_limits {
    const char *model_id;  /* served id: `model` must be absent or equal */
    int max_tokens_default;
    int n_vocab;           /* token ids in a prompt must be below it */
    /* validates a KV spec; false with the parser's message in msg */
    bool (*check_kv)(const char *spec, char *msg, size_t size);
};

/* Replaces, in place, every byte that does not begin a well-formed UTF-8 sequence by '?', so that
 * text quoting client input can go into a JSON string (jansson refuses invalid UTF-8). */
void srv_utf8_scrub(char *s);
void srv_error_set(struct srv_error *e, int status, const char *type, const char *param,
                   const char *code, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
/* Bad request (400, invalid_request_error) naming param. */
#define srv_bad(e, param, ...) srv_error_set(e, 400, "invalid_request_error", param, NULL, __VA_ARGS__)

/* Parse body (len bytes, not necessarily NUL-terminated). true on success; on failure, err is
 * filled and out is left empty (nothing to free). */
bool srv_parse_request(const char *body, size_t len, enum srv_kind kind,
                       const struct srv_limits *lim, struct srv_params *out,
                       struct srv_error *err);
void srv_params_free(struct srv_params *p);

/* {"error":{"message","type","param","code"}} as a malloc'ed string */
char *srv_error_json(const struct srv_error *e);

#endif
