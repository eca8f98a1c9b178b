/* gguf.h — memory-mapped, validated reader for GGUF v2/v3 files.
 *
 * Does: mmap the file read-only, parse the header, every metadata key/value (all value types,
 * arrays included, nested arrays rejected), and the tensor directory; validate every count,
 * length, offset and size against the file size, and every tensor's type and byte size. After a
 * successful gguf_open nothing in the struct points outside the mapping.
 * Does not: know about model architectures or interpret tensor data.
 *
 * Strings inside the file are not NUL-terminated; they are returned as (pointer, length) views
 * into the mapping (struct gguf_str). Keys and tensor names are copied NUL-terminated for
 * convenience.
 */
#ifndef KVS_GGUF_H
#define KVS_GGUF_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include "base.h"

enum gguf_vtype {
    GGUF_U8 = 0, GGUF_I8 = 1, GGUF_U16 = 2, GGUF_I16 = 3, GGUF_U32 = 4, GGUF_I32 = 5,
    GGUF_F32 = 6, GGUF_BOOL = 7, GGUF_STRING = 8, GGUF_ARRAY = 9, GGUF_U64 = 10, GGUF_I64 = 11,
    GGUF_F64 = 12, GGUF_VTYPE_COUNT
};

struct gguf_str { const char *s; uint64_t len; };

struct gguf_kv {
    char *key;                 /* NUL-terminated copy */
    enum gguf_vtype type;
    enum gguf_vtype arr_type;  /* element type when type == GGUF_ARRAY */
    uint64_t arr_n;            /* element count when type == GGUF_ARRAY */
    const uint8_t *data;       /* scalar value, or first array element, inside the mapping */
    struct gguf_str *strs;     /* for string arrays: arr_n views (allocated); else NULL */
};

struct gguf_tensor {
    char *name;                /* NUL-terminated copy */
    int type;                  /* ggml type id (see quant.h) */
    int n_dims;                /* 1..4 */
    int64_t ne[4];             /* elements per dim, ne[0] fastest-varying (row length) */
    uint64_t n_elems;
    uint64_t offset;           /* relative to the data section */
    uint64_t n_bytes;
    const void *data;          /* inside the mapping */
};

struct gguf_file {
    char *path;
    int version;
    const uint8_t *map;
    size_t map_size;
    bool owns_map;             /* munmap on close (false for gguf_open_buffer) */
    uint64_t n_kv, n_tensors;
    struct gguf_kv *kv;
    struct gguf_tensor *tensors;
    uint64_t alignment;
    uint64_t data_offset;      /* start of the tensor data section in the file */
};

/* Open and validate. On failure returns a status, sets the last error to
 * "<path>: <problem>", and *out stays NULL. prefault: MAP_POPULATE. */
enum kvs_status gguf_open(const char *path, bool prefault, struct gguf_file **out);
/* Same, over a caller-owned buffer (the fuzz target; tests). The buffer must outlive the
 * result; nothing is mapped or unmapped. */
enum kvs_status gguf_open_buffer(const void *buf, size_t size, const char *name,
                                 struct gguf_file **out);
void gguf_close(struct gguf_file *g);

const struct gguf_kv *gguf_find_kv(const struct gguf_file *g, const char *key);
const struct gguf_tensor *gguf_find_tensor(const struct gguf_file *g, const char *name);

/* Typed getters: return false (and leave *v untouched) when missing or of an incompatible type.
 * Integer getters accept any integer type whose value fits. */
bool gguf_get_u32(const struct gguf_file *g, const char *key, uint32_t *v);
bool gguf_get_i64(const struct gguf_file *g, const char *key, int64_t *v);
bool gguf_get_f32(const struct gguf_file *g, const char *key, float *v);
bool gguf_get_bool(const struct gguf_file *g, const char *key, bool *v);
bool gguf_get_str(const struct gguf_file *g, const char *key, struct gguf_str *v);
/* Array of strings: returns views (owned by g) and the count, or NULL. */
const struct gguf_str *gguf_get_str_arr(const struct gguf_file *g, const char *key, uint64_t *n);
/* Array of 32-bit integers (i32 or u32): pointer into the mapping (may be unaligned: copy out
 * with memcpy) and count, or NULL. */
const void *gguf_get_i32_arr(const struct gguf_file *g, const char *key, uint64_t *n);

const char *gguf_vtype_name(enum gguf_vtype t);

#endif
