/* fuzz_node.c — libFuzzer target for chunk records' KV (kvs_prefix_deserialize, KVSNODE1
 * version 2 with kv_head_wire_read), the bytes a server reads back from its disk tier or from a
 * Redis that other processes write to.
 *
 * A random byte string fails the record's xxh64 at once, so the input is a patch script applied
 * to a VALID record made at start-up from the real model (KVS_TEST_MODEL, default SmolLM2):
 *   byte 0: bits 0-1 pick the base record (0 exact fp16, 1 KIVI-4 packed, 2 SnapKV-evicted),
 *           bit 2 keeps the checksum as patched (else it is recomputed, so the structural
 *           checks behind it are reached), bit 3 confines offsets to the first 4 KiB (the
 *           header, the spec text and the first heads), bit 4 changes the length (bytes 1-2:
 *           new length = base length +- that many bytes);
 *   then 5-byte patches: u32 offset (modulo the length), a byte XORed in.
 * Oracle: the parser never crashes, leaks or reads out of bounds (ASan/UBSan); a record it accepts
 * is placed into an empty sequence and serialised again to exactly the bytes it was given (every
 * field it accepts is canonical), and a rejection is KVS_ERR_FORMAT (or KVS_ERR_NOMEM for a
 * size no allocation can meet) with no node. Without the
 * model the target says so and accepts every input (nothing to fuzz). */
#include "kvsieve.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static kvs_model *model;
static kvs_context *ctx;
static uint8_t *base[3];
static size_t base_n[3];

static void make_records(void) {
    /* 2 tokens of context, then 16 held: one KIVI block of 16 for the packed record; the exact
     * record takes only the last 4 (fp16 heads are the largest, and every run checksums them) */
    int32_t toks[18];
    for (int i = 0; i < 18; i++) toks[i] = 100 + 37 * i;
    kvs_sequence *s;
    if (kvs_seq_new(ctx, &s) != KVS_OK) abort();
    struct kvs_batch_item a = {.seq = s, .tokens = toks, .n = 2};
    struct kvs_batch_item b = {.seq = s, .tokens = toks + 2, .n = 16, .hold = true};
    if (kvs_step(ctx, &a, 1) != KVS_OK || kvs_step(ctx, &b, 1) != KVS_OK) abort();
    const char *specs[3] = {NULL, "kivi:bits=4,group=16,resid=0", "snapkv:ratio=0.5,window=8"};
    for (int k = 0; k < 3; k++) {
        kvs_prefix *p;
        if (kvs_chunk_publish(ctx, s, k == 0 ? 14 : 2, specs[k], &p) != KVS_OK ||
            kvs_prefix_serialize(p, &base[k], &base_n[k]) != KVS_OK) {
            fprintf(stderr, "fuzz_node: %s\n", kvs_last_error());
            abort();
        }
        kvs_prefix_unref(p);
    }
    kvs_seq_free(ctx, s);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    const char *path = getenv("KVS_TEST_MODEL") ? getenv("KVS_TEST_MODEL")
                                                : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    kvs_set_log_level(0);
    if (kvs_model_load(path, NULL, &model) != KVS_OK) {
        fprintf(stderr, "fuzz_node: no model (%s): nothing to fuzz; run `make models`\n", path);
        model = NULL;
        return 0;
    }
    struct kvs_context_params cp = kvs_context_params_default();
    cp.n_ctx = 64;
    cp.n_threads = 1;
    cp.n_seq_max = 2;
    cp.keep_stats = true;
    if (kvs_context_new(model, &cp, &ctx) != KVS_OK) abort();
    make_records();
    fprintf(stderr, "fuzz_node: base records of %zu, %zu and %zu bytes\n", base_n[0], base_n[1],
            base_n[2]);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!model || size < 1) return 0;
    int k = data[0] & 3;
    if (k == 3) k = 0;
    bool keep_sum = data[0] & 4, head = data[0] & 8, resize = data[0] & 16;
    size_t n = base_n[k], p = 1;
    if (resize && size >= 3) {
        int d = (int)(int8_t)data[1] * 256 + data[2];
        p = 3;
        if (d < 0 && (size_t)-d >= n) d = -(int)n + 1;
        n = (size_t)((long)n + d);
    }
    uint8_t *b = calloc(n, 1);
    if (!b) return 0;
    memcpy(b, base[k], n < base_n[k] ? n : base_n[k]);
    size_t lim = head && n > 4096 ? 4096 : n;
    for (; p + 5 <= size; p += 5) {
        uint32_t off;
        memcpy(&off, data + p, 4);
        b[off % lim] ^= data[p + 4];
    }
    if (!keep_sum && n >= 8) {
        uint64_t x = XXH64(b, n - 8, 0);
        memcpy(b + n - 8, &x, 8);
    }
    kvs_prefix *node = NULL;
    enum kvs_status st = kvs_prefix_deserialize(ctx, b, n, &node);
    if (st != KVS_OK) {
        if (st != KVS_ERR_FORMAT && st != KVS_ERR_NOMEM) abort();
        if (node) abort();
        free(b);
        return 0;
    }
    uint8_t *again = NULL;
    size_t n2 = 0;
    if (kvs_prefix_serialize(node, &again, &n2) != KVS_OK || n2 != n || memcmp(again, b, n))
        abort(); /* accepted bytes must be canonical */
    kvs_sequence *s;
    if (kvs_seq_new(ctx, &s) != KVS_OK) abort();
    enum kvs_status ps = kvs_seq_place_chunk(ctx, s, node);
    if (ps != KVS_OK && ps != KVS_ERR_CONTEXT_FULL) abort();
    kvs_seq_free(ctx, s);
    kvs_prefix_unref(node);
    free(again);
    free(b);
    return 0;
}
