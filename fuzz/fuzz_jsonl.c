/* fuzz_jsonl.c — libFuzzer target for the results-line reader (src/eval/jsonl.c), which reads
 * result files written by other systems, and for the tasks-file reader on top of it
 * (eval_prompt_parse, src/eval/prompt_file.c), which reads users' prompts: any byte string must
 * parse into fields whose strings are valid NUL-free UTF-8, or fail with a message; never crash.
 * Parsed strings are written back and parsed again (the writer's output must always be
 * readable); an accepted prompt is exported (eval_prompt_write_jsonl) and read again into the
 * same prompt. */
#include "eval/jsonl.h"
#include "eval/tasks.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool str_eq(const char *a, const char *b) { return !strcmp(a ? a : "", b ? b : ""); }

/* a tasks-file line: rejected with a message, or exported and read back unchanged */
static void fuzz_prompt(const uint8_t *data, size_t size) {
    struct eval_prompt p, q;
    char err[400];
    err[0] = 0;
    if (!eval_prompt_parse((const char *)data, size, 7, &p, err, sizeof err)) {
        if (!err[0]) abort(); /* a refusal always says why */
        return;
    }
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) { eval_prompt_free(&p); return; }
    eval_prompt_write_jsonl(f, &p, "model", "sha");
    fclose(f);
    if (!eval_prompt_parse(buf, len, 9, &q, err, sizeof err)) abort();
    bool same = !strcmp(p.id, q.id) && !strcmp(p.task, q.task) && !strcmp(p.family, q.family) &&
                p.length == q.length && p.seed == q.seed && p.sample == q.sample &&
                str_eq(p.context, q.context) && str_eq(p.question, q.question) &&
                str_eq(p.answer_prefix, q.answer_prefix) && p.n_outputs == q.n_outputs &&
                p.metric == q.metric && p.max_new_tokens == q.max_new_tokens &&
                p.stop_at_newline == q.stop_at_newline &&
                eval_prompt_hash(&p) == eval_prompt_hash(&q);
    for (int i = 0; same && i < p.n_outputs; i++) same = !strcmp(p.outputs[i], q.outputs[i]);
    if (!same) abort();
    eval_prompt_free(&p);
    eval_prompt_free(&q);
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct jsonl_obj o;
    char err[160];
    fuzz_prompt(data, size);
    if (!jsonl_parse((const char *)data, size, &o, err, sizeof err)) {
        jsonl_obj_free(&o);
        return 0;
    }
    for (int i = 0; i < o.n_fields; i++) {
        const struct jsonl_value *v = &o.fields[i].v;
        (void)jsonl_get_num(&o, o.fields[i].key);
        if (v->type != JSONL_STRING) continue;
        /* round trip: write the string as JSON, read it back, same bytes */
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);
        if (!f) continue;
        fputs("{\"k\":", f);
        jsonl_write_string(f, v->str);
        fputs("}", f);
        fclose(f);
        struct jsonl_obj o2;
        if (!jsonl_parse(buf, len, &o2, err, sizeof err)) abort();
        const char *s = jsonl_get_str(&o2, "k");
        if (!s || strcmp(s, v->str)) abort();
        jsonl_obj_free(&o2);
        free(buf);
    }
    jsonl_obj_free(&o);
    return 0;
}
