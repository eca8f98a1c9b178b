/* server.h — `kvsieve serve`: shared state of the HTTP threads (server.c) and the inference
 * thread (sched.c, with the prefix cache in prefix_cache.c). Part of the program, not of the
 * library: it prints to stderr and links libmicrohttpd, jansson and libxxhash. */
#ifndef KVS_SERVER_H
#define KVS_SERVER_H

#include "kvsieve.h"
#include "server/request.h"
#include "server/chunks.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

struct srv_config {
    const char *host;
    int port;
    const char *model_path;
    int n_parallel, n_ctx, n_threads, n_batch;
    const char *kv, *prefix_kv, *chunk_kv, *api_key, *slot_save_path;
    int64_t kv_mem, prefix_mem, max_body;
    int timeout_s, queue, batch_tokens;
    int chunk_check_layer; /* CacheBlend's check layer (--chunk-check-layer, default 1) */
    bool no_pack; /* --no-pack: no packed weight copy (kvs_model_params.pack) */
    int device;   /* --device / -ngl: enum kvs_device (KVS_DEVICE_CPU by default) */
    bool prefix_mem_given, chunk_mem_given; /* set on the command line (checked against --device) */
    struct chunk_cfg chunk; /* the chunk store (--chunk-*, --redis); chunk.mem 0 = off */
};

enum job_state { J_SUBMITTED, J_WAITING, J_RUNNING, J_DONE };
enum finish_reason { FIN_NONE, FIN_STOP, FIN_LENGTH };

struct lp_top {
    int32_t tok;
    float lp;
};
struct lp_entry { /* one generated token's log-probability (and the top alternatives) */
    int32_t tok;
    float lp;
    int n_top;
    struct lp_top top[SRV_MAX_LOGPROBS];
};

struct run; /* the scheduler's private state of a job (sched.c) */

struct job {
    /* set by the HTTP thread before submission, then read-only */
    struct srv_params p;
    int32_t *toks; /* the prompt's tokens */
    int n_prompt;
    int n_pin;     /* chat with a system message: its tokens, pinned in the sequence's cache */
    int (*chunk_at)[2]; /* token ranges of the texts given in "chunks" (piecewise tokenized) */
    int n_chunk_at;
    bool chunk_register; /* POST /v1/chunks: compute the chunk [chunk_at[0]) and finish */
    char id[48];
    long long created;
    double t_arrive; /* ms */
    /* shared, under srv->mu */
    int refs;
    enum job_state state;
    bool checked;  /* the scheduler has validated it against the context */
    bool cancel;   /* the client went away */
    bool failed;
    struct srv_error err;
    char *out;     /* text the client may see (stop strings and their possible starts held back) */
    size_t out_len, out_cap;
    struct lp_entry *lps; /* per generated token, when p.logprobs */
    int n_lps, cap_lps;
    enum finish_reason finish;
    int n_gen, n_cached, slot;
    /* chunk store, per request (timings) */
    int chunks_reused, chunk_tokens_reused, chunk_tokens_recomputed, chunks_cached, chunks_found;
    int chunk_tokens_checked; /* CacheBlend: tokens run through the check layers */
    int prompt_computed;
    double prompt_ms, predicted_ms;
    struct job *next;
    struct run *run; /* scheduler only */
};

struct slot_info { /* a snapshot for GET /slots, refreshed each tick */
    bool used;
    char request_id[48];
    int n_past, n_prompt, n_gen;
    double entries;
    uint64_t kv_bytes;
    char kv[128];
    bool decoding;
};

struct slot_cmd { /* POST /slots/{id}: run on the inference thread */
    int action; /* 0 save, 1 restore, 2 erase, 3 list the prefix cache's nodes, 4 list chunks */
    int slot;
    char path[4096];
    bool done;
    int status;
    char msg[512];
    char *out; /* action 3 (list prefixes): a malloc'ed JSON array */
    struct slot_cmd *next;
};

struct srv_stats {
    uint64_t requests, failed, prompt_tokens, predicted_tokens;
    double prompt_ms, predicted_ms;
    uint64_t prefix_hits, prefix_tokens_reused, prefix_evictions, prefix_bytes, prefix_nodes;
    uint64_t kv_bytes, kv_fp16_bytes;
    int waiting, running;
    char by_policy[8][128];
    uint64_t by_policy_bytes[8];
    int n_policy;
    struct chunk_stats chunks;
    bool chunks_on;
};

struct srv {
    struct srv_config cfg;
    kvs_model *model;
    kvs_context *ctx;
    struct kvs_model_info mi;
    char model_id[256];
    long long started;
    pthread_mutex_t mu;
    pthread_cond_t cv_sched; /* new work for the inference thread */
    pthread_cond_t cv_out;   /* new output for the HTTP threads (broadcast) */
    struct job *submitted, *submitted_tail;
    int n_queued;            /* submitted + waiting (for --queue) */
    struct slot_cmd *cmds;
    bool stopping;
    struct slot_info *slots; /* n_parallel */
    struct chunk_store *chunks; /* NULL when off; used by the inference thread only */
    struct srv_stats st;
    struct srv_limits lim;
};

/* sched.c */
void *sched_main(void *srv);
/* server.c: drop one reference (frees at 0); call with srv->mu held */
void job_release(struct job *j);
void job_append_out(struct job *j, const char *s, size_t n);

/* serve_main: `kvsieve serve` (argv after "serve") */
int serve_main(int argc, char **argv);

#endif
