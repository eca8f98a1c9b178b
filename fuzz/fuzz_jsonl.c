/* fuzz_jsonl.c — libFuzzer target for the results-line reader (src/eval/jsonl.c), which reads
 * result files written by other systems: any byte string must parse into fields whose strings
 * are valid NUL-free UTF-8, or fail with a message; never crash. Parsed strings are written
 * back and parsed again (the writer's output must always be readable). */
#include "eval/jsonl.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct jsonl_obj o;
    char err[160];
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
