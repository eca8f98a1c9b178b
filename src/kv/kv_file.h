/* kv_file.h — the on-disk format of a saved sequence (kvs_seq_save / kvs_seq_load in
 * include/kvsieve.h): field offsets of the fixed header and the two hashes it uses, exposed for
 * tests and tools. The format itself is described in kv_file.c.
 * Does not: know about the policy beyond copying the statistic slots it finds. */
#ifndef KVS_KV_FILE_H
#define KVS_KV_FILE_H

#include <stddef.h>
#include <stdint.h>

struct kvs_model;

#define KV_FILE_MAGIC "KVSCACHE"
enum {
    KV_FILE_VERSION = 1,
    /* byte offsets of the fixed header (all integers little-endian) */
    KV_FILE_OFF_MAGIC = 0,       /* char[8] "KVSCACHE" */
    KV_FILE_OFF_VERSION = 8,     /* u32 */
    KV_FILE_OFF_HEADER = 12,     /* u32 header bytes (= KV_FILE_HEADER_BYTES) */
    KV_FILE_OFF_SIZE = 16,       /* u64 whole file, checksum included */
    KV_FILE_OFF_ARCH = 24,       /* char[32] NUL-padded architecture name */
    KV_FILE_OFF_N_LAYER = 56,    /* u32 ×6: n_layer n_head n_head_kv head_dim n_vocab n_embd */
    KV_FILE_OFF_MODEL_HASH = 80, /* u64 FNV-1a of the tensor directory + 4 KiB of token_embd */
    KV_FILE_OFF_N_PAST = 88,     /* i32 */
    KV_FILE_OFF_POS_SHIFT = 92,  /* i32 */
    KV_FILE_OFF_RNG = 96,        /* u64 per-sequence scorer state */
    KV_FILE_OFF_FLAGS = 104,     /* u32: bit 0 = statistic slot present; bit 1 = it holds learned
                                  * scores (locret), not accumulated attention */
    KV_FILE_OFF_QWIN = 108,      /* u32 saved-queries ring capacity (0 = none saved) */
    KV_FILE_OFF_SPEC = 112,      /* char[256] NUL-terminated KV spec text (informational) */
    KV_FILE_HEADER_BYTES = 368,  /* the body starts here */
    KV_FILE_FLAG_ACC = 1,
    KV_FILE_FLAG_LEARNED = 2,
};

/* CRC-64/XZ (ECMA-182 polynomial, reflected, init and xorout all ones); incremental:
 * kv_file_crc64(kv_file_crc64(0, a, n), b, m) == CRC of a followed by b. Check value:
 * kv_file_crc64(0, "123456789", 9) == 0x995DC9BBDF1939FA. */
uint64_t kv_file_crc64(uint64_t crc, const void *data, size_t n);

/* 64-bit FNV-1a over the model's tensor directory (name, type, dims of every tensor, in file
 * order) and the first 4 KiB of token_embd data. */
uint64_t kv_file_model_hash(const struct kvs_model *m);

#endif
