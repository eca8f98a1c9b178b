/* fuzz_kvspec.c — libFuzzer target for the --kv spec parser (src/kv/kv_spec.c): any string
 * must parse into a valid spec (a known method, exactly one budget, values in range, a
 * NUL-terminated normalised text that parses again to the same spec) or fail with
 * KVS_ERR_INVALID_ARG; never crash. */
#include "kv/kv_spec.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char s[512];
    if (size >= sizeof s) size = sizeof s - 1;
    memcpy(s, data, size);
    s[size] = 0;
    struct kv_spec a;
    enum kvs_status st = kv_spec_parse(s, &a);
    if (st != KVS_OK) {
        if (st != KVS_ERR_INVALID_ARG) abort();
        return 0;
    }
    if (a.method < 0 || a.method >= KV_METHOD_COUNT) abort();
    if (a.method != KV_FULL && (a.budget > 0) + (a.ratio > 0) + (a.mem_bytes > 0) != 1) abort();
    if (a.ratio < 0 || a.ratio > 1 || a.budget < 0) abort();
    if (!memchr(a.text, 0, sizeof a.text)) abort();
    /* the normalised text parses again, to the same method and budget */
    struct kv_spec b;
    if (kv_spec_parse(a.text, &b) != KVS_OK) abort();
    if (b.method != a.method || b.budget != a.budget || b.ratio != a.ratio ||
        b.mem_bytes != a.mem_bytes || b.when != a.when || b.alloc != a.alloc ||
        b.merge != a.merge || b.think != a.think || b.kivi_bits != a.kivi_bits ||
        b.mikv_low != a.mikv_low || b.kivi_resid != a.kivi_resid)
        abort();
    /* storage parts are consistent: one precision scheme, the residual in whole groups */
    if ((a.kivi_bits && a.mikv_low) || (a.kivi_bits && a.kivi_resid % a.kivi_group)) abort();
    return 0;
}
