/* fuzz_gguf.c — libFuzzer target for the GGUF reader: any byte string must either parse into a
 * structure whose every pointer lies inside the input, or fail with a status; never crash. */
#include "gguf.h"
#include "quant.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int inited;
    if (!inited) {
        quant_init();
        inited = 1;
    }
    struct gguf_file *g = NULL;
    if (gguf_open_buffer(data, size, "fuzz", &g) != KVS_OK) return 0;
    /* touch everything the reader promised is in bounds */
    volatile uint8_t sink = 0;
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const struct gguf_kv *kv = &g->kv[i];
        if (kv->strs)
            for (uint64_t j = 0; j < kv->arr_n; j++)
                if (kv->strs[j].len) sink ^= (uint8_t)kv->strs[j].s[kv->strs[j].len - 1];
        uint32_t u;
        gguf_get_u32(g, kv->key, &u);
        struct gguf_str s;
        if (gguf_get_str(g, kv->key, &s) && s.len) sink ^= (uint8_t)s.s[s.len - 1];
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const struct gguf_tensor *t = &g->tensors[i];
        if (t->n_bytes) sink ^= ((const uint8_t *)t->data)[t->n_bytes - 1];
    }
    (void)sink;
    gguf_close(g);
    return 0;
}
