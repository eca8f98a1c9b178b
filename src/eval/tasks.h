/* tasks.h — RULER-style long-context tasks: a deterministic generator (fixed seeds → identical
 * prompts, on any machine) and RULER's scorers.
 *
 * Tasks (after RULER, Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
 * Long-Context Language Models?"; templates and sizes are ours, written after the paper's
 * descriptions):
 *   niah_single_1   noise haystack, word key, 7-digit number value
 *   niah_single_2   novel haystack, word key, number
 *   niah_single_3   novel haystack, word key, UUID
 *   niah_multikey_1 novel haystack, 4 keys (3 distractor needles), number
 *   niah_multikey_2 haystack made of distractor needles only, number
 *   niah_multikey_3 haystack of needles, UUID keys and values
 *   niah_multivalue novel haystack, one key with 4 values (all 4 expected)
 *   niah_multiquery novel haystack, 4 keys asked at once (all 4 values expected)
 *   vt              variable tracking: a 4-hop chain VAR X = 12345, VAR Y = VAR X, ... in noise;
 *                   all 5 names expected
 *   cwe             common words extraction: numbered word list, 10 words repeated often, the
 *                   rest rarely; the 10 expected
 *   fwe             frequent words extraction: coded words with Zipf(2) counts; the top 3
 *   qa              question answering over the novels: a hand-written question about one
 *                   passage placed among distractor passages of the other novels ("part" metric)
 * The novel haystacks come from Jane Austen's novels (data/austen/, `make data`); noise and
 * needle haystacks need no data.
 *
 * A prompt is made to fit `length` tokens of the model's tokenizer: context + question +
 * max_new_tokens <= length, as close to it as whole haystack units allow (binary search over the
 * number of units). It is split the way kvpress splits it: the chat template applied to the
 * context gives prompt_context; the question, the template's end of turn and the answer prefix
 * give prompt_question. A question-agnostic run compresses the cache of prompt_context before
 * prompt_question arrives.
 *
 * Scoring (RULER): metric "all" = fraction of expected strings found in the answer
 * (case-insensitive), "part" = 1 if any is found. The answer is cut at the first newline after
 * some text for the tasks whose answer is one line (stop_at_newline).
 * Does not: run the model (sweep.c does). Prompts can also come from a tasks file (below).
 */
#ifndef KVS_EVAL_TASKS_H
#define KVS_EVAL_TASKS_H

#include "kvsieve.h"

#include <stdio.h>

enum { EVAL_MAX_OUTPUTS = 16 };
enum eval_metric { EVAL_METRIC_ALL, EVAL_METRIC_PART };

/* the novels, as paragraphs (lines of a paragraph joined with spaces) */
struct eval_corpus {
    int n_docs;
    char *names[8];
    char **paras[8];  /* paragraphs of each novel */
    int n_paras[8];
    char **vocab;     /* distinct lower-case words of >= 4 letters, sorted, for cwe */
    int n_vocab;
};
/* Load data_dir/{emma,...}.txt. Returns KVS_ERR_IO with a hint to run `make data` when absent. */
enum kvs_status eval_corpus_load(const char *data_dir, struct eval_corpus *c);
void eval_corpus_free(struct eval_corpus *c);

enum { EVAL_ID_MAX = 128, EVAL_NAME_MAX = 64 }; /* sizes of id and of task/family, NUL included */

struct eval_prompt {
    char id[EVAL_ID_MAX];        /* task/length/seed/sample, or a tasks file's id */
    char task[EVAL_NAME_MAX];
    char family[EVAL_NAME_MAX];  /* niah, niah_multi, vt, aggregation, qa; a file's own */
    int length, sample;          /* length 0: none given (a tasks file may leave it out) */
    uint64_t seed;
    char *context, *question, *answer_prefix;    /* raw parts */
    char *prompt_context, *prompt_question;      /* chat-templated split */
    char *outputs[EVAL_MAX_OUTPUTS];
    int n_outputs;
    enum eval_metric metric;
    int max_new_tokens;
    bool stop_at_newline;
    int32_t *tok_context, *tok_question;         /* tokenized, context with BOS */
    int n_tok_context, n_tok_question;
};

/* The task names, NULL-terminated, in the order above. */
extern const char *const eval_task_names[];
const char *eval_task_family(const char *task); /* NULL for an unknown task */
bool eval_task_needs_corpus(const char *task);

/* Make one prompt. corpus may be NULL for tasks that need none. Errors: KVS_ERR_INVALID_ARG for
 * an unknown task or a length too small for the task (message says the minimum). */
enum kvs_status eval_task_make(const kvs_model *m, const struct eval_corpus *corpus,
                               const char *task, int length, uint64_t seed, int sample,
                               struct eval_prompt *out);
void eval_prompt_free(struct eval_prompt *p);

/* Score an answer (0..1). */
double eval_score(const struct eval_prompt *p, const char *answer);

/* ---- the tasks file (prompt_file.c): users' own prompts, one JSON object per line ---------
 *
 * The format `kvsieve eval tasks` exports and `kvsieve eval sweep --tasks-file` and
 * tools/kvpress_peer.py read (the field table is EVAL_TASKS_FILE_HELP, printed by
 * `kvsieve eval --help tasks-file`). Raw text only: the running model's chat template is applied
 * by eval_prompt_prepare; the prompt_context / prompt_question an export carries are ignored.
 * The parser reuses jsonl.c (fuzzed by fuzz/fuzz_jsonl.c, which also fuzzes eval_prompt_parse).
 * Does not: touch a model (eval_prompt_prepare in tasks.c does), print anything. */

extern const char EVAL_TASKS_FILE_HELP[];

/* Parse one line of a tasks file into *out (raw parts, defaults filled; no template, no tokens).
 * line_no (1-based) names the default id "line<N>". False: *out empty, a one-line reason such as
 * "missing field "context" (...)" or "bad JSON: column 7: ..." in err. */
bool eval_prompt_parse(const char *line, size_t len, int line_no, struct eval_prompt *out,
                       char *err, size_t err_size);

/* Read a whole tasks file (blank lines skipped, a UTF-8 BOM allowed): *out gets n parsed prompts
 * (free with eval_prompts_free). Returns 0; 2 for a malformed file, err "PATH:LINE: problem"
 * (also: no prompts at all, duplicate ids); 1 when the file cannot be read. Nothing is returned
 * on failure. */
int eval_prompts_load(const char *path, struct eval_prompt **out, int *n, char *err,
                      size_t err_size);
void eval_prompts_free(struct eval_prompt *p, int n);

/* Apply m's chat template to p's raw parts (the same split as generated prompts) and tokenize:
 * fills prompt_context, prompt_question, tok_* (replacing any). In tasks.c. */
enum kvs_status eval_prompt_prepare(const kvs_model *m, struct eval_prompt *p);

/* 64-bit FNV-1a of everything that decides a run's answer and score (raw parts, outputs, metric,
 * max_new_tokens, stop_at_newline): part of a tasks-file run's resume key. */
uint64_t eval_prompt_hash(const struct eval_prompt *p);

/* One JSON line describing the prompt: the tasks-file format, plus model, model_sha256 and the
 * templated, tokenized split (prompt_context, prompt_question, n_tokens_*) for other systems.
 * length 0 is written as null. */
void eval_prompt_write_jsonl(FILE *f, const struct eval_prompt *p, const char *model_name,
                             const char *model_sha256);

/* A JSON string (jsonl_write_string; NULL writes ""), for the eval writers. */
void eval_json_str(FILE *f, const char *s);

#endif
