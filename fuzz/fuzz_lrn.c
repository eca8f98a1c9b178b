/* fuzz_lrn.c — libFuzzer target for learned-eviction weight files (kv_learned_parse, KVSLRN01),
 * which users download or copy next to their models.
 *
 * A random byte string fails the file's xxh64 at once, so the input is a patch script applied to a
 * VALID small file made at start-up (2 layers, 4/2 heads, head dim 8, hidden 16):
 *   byte 0: bit 0 keeps the checksum as patched (else it is recomputed, so the checks behind it
 *           are reached), bit 1 changes the length (byte 1: new length = base length +- byte 1),
 *           bit 2 confines offsets to the 128-byte header;
 *   then 5-byte patches: u32 offset (modulo the length), a byte XORed in.
 * Oracle: the parser never crashes, leaks or reads out of bounds (ASan/UBSan); a file it accepts
 * has the model's shapes and only finite weights, and a rejection returns no object. */
#include "kv/learned.h"
#include "quant.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

enum { L = 2, H = 4, KV = 2, HD = 8, HID = 16, DIN = (H + 2 * KV) * HD };
static const uint64_t FP = 0x0123456789abcdefull;
static uint8_t base[128 + L * (HID * DIN + HID + KV * HID) * 2 + 8];

static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)v), put32(p + 4, (uint32_t)(v >> 32)); }

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    memcpy(base, "KVSLRN01", 8);
    put32(base + 8, 1), put32(base + 12, 1), put64(base + 16, FP);
    put32(base + 24, L), put32(base + 28, H), put32(base + 32, KV), put32(base + 36, HD);
    put32(base + 40, HID), put32(base + 44, 1), put32(base + 48, 1), put32(base + 52, 7);
    memcpy(base + 56, "fuzz", 4);
    for (size_t i = 0; i < (sizeof base - 136) / 2; i++) {
        uint16_t h = quant_f32_to_f16((float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f);
        base[128 + 2 * i] = (uint8_t)h, base[128 + 2 * i + 1] = (uint8_t)(h >> 8);
    }
    put64(base + sizeof base - 8, XXH64(base, sizeof base - 8, 0));
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    uint8_t flags = data[0];
    size_t n = sizeof base, i = 1;
    if ((flags & 2) && size >= 2) {
        int d = (int)data[1] - 128;
        n = (size_t)((long)sizeof base + d);
        i = 2;
    }
    uint8_t *b = calloc(1, n + 1);
    if (!b) return 0;
    memcpy(b, base, n < sizeof base ? n : sizeof base);
    size_t span = (flags & 4) ? 128 : n;
    for (; i + 5 <= size; i += 5) {
        uint32_t off = (uint32_t)data[i] | (uint32_t)data[i + 1] << 8 | (uint32_t)data[i + 2] << 16 | (uint32_t)data[i + 3] << 24;
        b[off % span] ^= data[i + 4];
    }
    /* flag 8: read it as an Attention-Gate file (method 2, sigmoid), header fields as mutated */
    uint32_t method = (flags & 8) ? 2 : 1;
    if (method == 2 && n > 48) b[12] = 2, b[13] = b[14] = b[15] = 0, b[44] = 2, b[45] = b[46] = b[47] = 0;
    if (!(flags & 1) && n >= 8) put64(b + n - 8, XXH64(b, n - 8, 0));
    struct kv_learned *l = NULL;
    enum kvs_status st = kv_learned_parse("fuzz.lrn", b, n, method, FP, L, H, KV, HD, &l);
    if (st == KVS_OK && method == 2) {
        if (!l || l->gw < 1 || l->gw > 4096 || l->d_in != H * HD) abort();
        for (size_t k = 0; k < (size_t)L * 3 * l->gw * l->d_in; k++)
            if (!isfinite(l->gqkv[k])) abort();
    } else if (st == KVS_OK) {
        if (!l || l->n_layer != L || l->n_head != H || l->n_head_kv != KV || l->head_dim != HD || l->d_in != DIN) abort();
        for (size_t k = 0; k < (size_t)L * l->hidden * DIN; k++)
            if (!isfinite(l->w1[k])) abort();
    } else if (l) {
        abort();
    }
    kv_learned_free(l);
    free(b);
    return 0;
}
