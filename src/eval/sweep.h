/* sweep.h — the evaluation grid behind `kvsieve eval`: perplexity and KL in lockstep with the
 * full cache, RULER-style tasks question-aware and question-agnostic, for every method × ratio
 * (or budget), written as one JSON line per run into a results directory, resumable.
 *
 * Efficiency (one prefill serves many runs): for every prompt the context is prefilled once
 * with the full cache in a context that keeps all statistics (kvs_context_params.keep_stats);
 * each method that compresses once at the end of prefill (when=prefill, every=0: kvpress
 * style) then works on a copy: aware = copy of context+question, compressed; agnostic = copy of
 * the context, compressed, then the question. All copies decode together, greedy, in batches
 * (weights read once per step). Methods whose spec asks for compression during prefill
 * (when=chunk) or decoding (every=N) prefill again in a context of their own. Perplexity runs
 * every method in its own context (chunked prefill compresses as it goes) next to a full-cache
 * context, chunk by chunk, so the KL divergence is computed on the same tokens without storing
 * the full run's logits.
 * Does not: draw plots or tables (report.c), parse JSON (jsonl.c).
 */
#ifndef KVS_EVAL_SWEEP_H
#define KVS_EVAL_SWEEP_H

#include "kvsieve.h"

enum { EVAL_MAX_LIST = 32 };

struct eval_config {
    const char *model_path;
    const char *out_dir;      /* results directory (created) */
    const char *data_dir;     /* the novels (data/austen) */
    const char *git;          /* commit of this build, recorded in every line */
    const char *methods[EVAL_MAX_LIST]; /* method specs without budget, e.g. "snapkv", "full" */
    int n_methods;
    double ratios[EVAL_MAX_LIST];       /* kept fractions for the tasks */
    int n_ratios;
    int budgets[EVAL_MAX_LIST];         /* tokens per KV head for perplexity */
    int n_budgets;
    const char *tasks[EVAL_MAX_LIST];
    int n_tasks;
    const char *tasks_file;   /* JSONL of prompts (tasks.h): replaces tasks, lengths, samples, seed */
    int lengths[EVAL_MAX_LIST];
    int n_lengths;
    int samples;              /* prompts per (task, length) */
    uint64_t seed;
    bool aware, agnostic;
    int ppl_tokens;           /* 0 = no perplexity runs */
    const char *ppl_doc;      /* novel name, e.g. prideprejudice */
    int n_threads, n_batch;
    int device;               /* KVS_DEVICE_CPU or KVS_DEVICE_CUDA (methods the GPU does not run are
                               * skipped, with a note) */
    int speed_tokens;         /* decode steps timed per method at each length (0 = none) */
    bool progress;            /* progress lines with ETA on stderr */
    bool report;              /* write report.md, CSV and plots at the end */
};
void eval_config_default(struct eval_config *c); /* the default SmolLM2 grid */
void eval_config_large(struct eval_config *c);   /* --profile large (Qwen2.5-1.5B) */
void eval_config_medium(struct eval_config *c);  /* --profile medium (Qwen2.5-1.5B, ~1 h) */

/* Run the grid; returns 0 on success, 2 for bad input (message on stderr), 1 otherwise. A
 * tasks_file is read and checked whole before the model is loaded: a malformed line gives 2 and
 * "FILE:LINE: problem", and nothing runs. */
int eval_sweep(const struct eval_config *cfg);

/* Write the prompts of the grid (tasks × lengths × samples) as JSONL to path ("-" = stdout); with
 * a tasks_file, that file's prompts again (checked, defaults filled, this model's template split
 * and token counts added). */
int eval_export(const struct eval_config *cfg, const char *path);

#endif
