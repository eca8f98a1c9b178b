/* fuzz_trace.c — libFuzzer target for the trace-file parser of `kvsieve pagesim`
 * (page_trace_parse, src/page/page_trace.c): any byte string must parse into requests (ids >= 0,
 * bits 0/1, unit sizes) that, written back in the format, parse again to the same requests, or
 * fail with KVS_ERR_FORMAT and a "line N: ..." message; never crash. An accepted trace (its first
 * 256 requests) then runs through every policy at k = 1..3: none beats Belady's optimum, and
 * discard predictions with the optimum's bits match it. */
#include "page/page.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct page_req *t;
    size_t n;
    bool hb;
    enum kvs_status st = page_trace_parse((const char *)data, size, &t, &n, &hb);
    if (st != KVS_OK) {
        if (st != KVS_ERR_FORMAT || strncmp(kvs_last_error(), "line ", 5)) abort();
        return 0;
    }
    for (size_t i = 0; i < n; i++)
        if (t[i].page < 0 || t[i].bit > 1 || t[i].size != 1 || (!hb && t[i].bit)) abort();
    /* written back and parsed again: the same requests */
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) abort();
    for (size_t i = 0; i < n; i++) {
        if (hb) fprintf(f, "%lld %u\n", (long long)t[i].page, t[i].bit);
        else fprintf(f, "%lld\n", (long long)t[i].page);
    }
    fclose(f);
    struct page_req *u;
    size_t m;
    bool hb2;
    if (page_trace_parse(buf, len, &u, &m, &hb2) != KVS_OK || m != n || (n && hb2 != hb)) abort();
    for (size_t i = 0; i < n; i++)
        if (u[i].page != t[i].page || u[i].bit != t[i].bit) abort();
    free(buf), free(u);
    size_t nn = n < 256 ? n : 256;
    for (int64_t k = 1; k <= 3 && nn; k++) {
        int64_t opt, f1, fp;
        if (page_label_discard(t, nn, k, &opt) != KVS_OK) abort();
        struct page_cfg c = {.kind = PAGE_OPT, .capacity = k};
        if (page_simulate(&c, t, nn, &f1) != KVS_OK || f1 != opt) abort();
        for (int kind = 0; kind < PAGE_KIND_COUNT; kind++) {
            c.kind = (enum page_kind)kind;
            if (page_simulate(&c, t, nn, &fp) != KVS_OK || fp < opt || fp > (int64_t)nn) abort();
            if ((kind == PAGE_PRED || kind == PAGE_PRED_ROBUST) && fp != opt) abort();
        }
    }
    free(t);
    return 0;
}
