/* runner.h — an offline batch of tokenized requests run to completion with BatchLLM's
 * scheduling (arXiv 2412.03594): prompts grouped by their shared prefixes (group.h), each group's
 * prefix prefilled once by a prefill-only "common" sequence and published as a shared prefix node
 * that the group's members start from (kept by reference counts while they run, freed with the
 * last one: never LRU-evicted), groups and members ordered decode-heavy first (max_tokens over
 * prompt length), and every step filled with decode tokens first, then prompt chunks, admitting
 * work while the KV it may hold fits a byte limit (compressed caches count at their bound).
 *
 * The engine side only: texts, templates, stop strings and output formats belong to the caller,
 * which sees every generated token through a callback. One thread; no printing.
 */
#ifndef KVS_BATCH_RUNNER_H
#define KVS_BATCH_RUNNER_H

#include "kvsieve.h"

struct brun_req {
    const int32_t *prompt;
    int n_prompt;            /* >= 1 */
    int max_tokens;          /* >= 1; capped by the context */
    const char *kv;          /* the request's KV policy, NULL = the context's */
    struct kvs_sampler_params sp;
    bool ignore_eos;
    bool skip;               /* already done (a resumed batch): not run */
};

enum brun_finish { BRUN_STOP, BRUN_LENGTH, BRUN_ERROR };

struct brun_cb {
    /* request i produced token tok (not yet fed back); return false to finish it here (a stop
     * string found by the caller): it then ends with BRUN_STOP */
    bool (*token)(void *user, int i, int32_t tok);
    /* request i is finished; err is the message when BRUN_ERROR. prompt_computed: its prompt
     * tokens this run computed itself (the rest came from its group's shared prefix) */
    void (*done)(void *user, int i, enum brun_finish why, const char *err, int n_gen,
                 int prompt_computed);
    /* after every step: requests done (and skipped) out of all, tokens generated so far */
    void (*progress)(void *user, int done, int total, int64_t gen_tokens);
    void *user;
    /* when non-NULL and set (a signal handler): stop after the current step; requests not
     * finished get no done call (a rerun can resume them) */
    volatile int *stop;
};

struct brun_opts {
    bool group;              /* share prefixes (BatchLLM grouping); false: every request alone */
    bool reorder;            /* decode-heavy groups and members first; false: input order */
    int64_t kv_mem;          /* bytes of KV the running work may hold (0: no limit but slots) */
    int min_share;           /* shorter shared prefixes are not worth a node (default 32) */
};

struct brun_stats {
    int n_requests, n_done, n_errors, n_groups, n_shared_groups;
    int64_t prompt_logical;  /* prompt tokens of the requests run */
    int64_t prompt_computed; /* prompt tokens actually computed (shared prefixes once) */
    int64_t gen_tokens;
    int max_running;         /* most sequences running at once */
    int64_t kv_peak;         /* highest KV payload held after a step (kvs_seq_kv_bytes of the
                              * sequences plus the shared nodes' bytes) */
};

/* Run requests [0, n) in context c (which must allow at least 2 sequences when grouping: a
 * group's common prefill runs beside its members). Requests that fail
 * (their KV can never fit, a bad spec) end with BRUN_ERROR and the batch goes on. Returns
 * KVS_OK unless the engine itself failed (out of memory: the message says so). */
enum kvs_status brun_run(kvs_context *c, const kvs_model *m, const struct brun_req *r, int n,
                         const struct brun_opts *o, const struct brun_cb *cb,
                         struct brun_stats *st);

#endif
