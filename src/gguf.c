/* gguf.c — GGUF v2/v3 reader: mmap, parse, validate.
 *
 * Every read goes through a bounds-checked cursor, so a truncated or lying file fails with
 * "<file>: <what> at offset N" instead of reading past the mapping. Counts are checked against
 * the bytes left before anything is allocated for them (a 2^60 element array in a 1 KB file is
 * refused, not malloc'd). Tensor data ranges are checked against the data section, their byte
 * size is derived from the type's block layout (quant.h), and row lengths must be whole blocks.
 */
#include "gguf.h"
#include "quant.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct cursor {
    const uint8_t *p;
    size_t size, pos;
    const char *name;
    enum kvs_status st; /* first failure, KVS_OK while fine */
};

static bool cur_fail(struct cursor *c, enum kvs_status st, const char *what) {
    if (c->st == KVS_OK) {
        c->st = kvs_fail(st, "%s: %s at offset %zu", c->name, what, c->pos);
    }
    return false;
}

static bool cur_read(struct cursor *c, void *dst, size_t n, const char *what) {
    if (c->st != KVS_OK) return false;
    if (n > c->size - c->pos) {
        char msg[128];
        snprintf(msg, sizeof msg, "truncated file: %s needs %zu bytes, %zu left", what, n,
                 c->size - c->pos);
        return cur_fail(c, KVS_ERR_FORMAT, msg);
    }
    memcpy(dst, c->p + c->pos, n);
    c->pos += n;
    return true;
}

static bool cur_skip(struct cursor *c, uint64_t n, const char *what) {
    if (c->st != KVS_OK) return false;
    if (n > c->size - c->pos) {
        char msg[128];
        snprintf(msg, sizeof msg, "truncated file: %s needs %llu bytes, %zu left", what,
                 (unsigned long long)n, c->size - c->pos);
        return cur_fail(c, KVS_ERR_FORMAT, msg);
    }
    c->pos += (size_t)n;
    return true;
}

static bool cur_u32(struct cursor *c, uint32_t *v, const char *what) { return cur_read(c, v, 4, what); }
static bool cur_u64(struct cursor *c, uint64_t *v, const char *what) { return cur_read(c, v, 8, what); }

static bool cur_str(struct cursor *c, struct gguf_str *s, const char *what) {
    uint64_t len;
    if (!cur_u64(c, &len, what)) return false;
    const char *start = (const char *)c->p + c->pos;
    if (!cur_skip(c, len, what)) return false;
    s->s = start;
    s->len = len;
    return true;
}

static const size_t vtype_size[GGUF_VTYPE_COUNT] = {
    [GGUF_U8] = 1, [GGUF_I8] = 1, [GGUF_U16] = 2, [GGUF_I16] = 2, [GGUF_U32] = 4,
    [GGUF_I32] = 4, [GGUF_F32] = 4, [GGUF_BOOL] = 1, [GGUF_STRING] = 0, [GGUF_ARRAY] = 0,
    [GGUF_U64] = 8, [GGUF_I64] = 8, [GGUF_F64] = 8,
};

const char *gguf_vtype_name(enum gguf_vtype t) {
    static const char *names[GGUF_VTYPE_COUNT] = {
        "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64",
        "i64", "f64"};
    return (unsigned)t < GGUF_VTYPE_COUNT ? names[t] : "?";
}

static char *dup_str(struct gguf_str s) {
    char *d = malloc(s.len + 1);
    if (!d) return NULL;
    memcpy(d, s.s, s.len);
    d[s.len] = 0;
    return d;
}

void gguf_close(struct gguf_file *g) {
    if (!g) return;
    if (g->kv) {
        for (uint64_t i = 0; i < g->n_kv; i++) {
            free(g->kv[i].key);
            free(g->kv[i].strs);
        }
    }
    if (g->tensors) {
        for (uint64_t i = 0; i < g->n_tensors; i++) free(g->tensors[i].name);
    }
    free(g->kv);
    free(g->tensors);
    if (g->map && g->owns_map) munmap((void *)g->map, g->map_size);
    free(g->path);
    free(g);
}

static bool parse_value(struct cursor *c, struct gguf_kv *kv) {
    uint32_t t;
    if (!cur_u32(c, &t, "value type")) return false;
    if (t >= GGUF_VTYPE_COUNT) return cur_fail(c, KVS_ERR_FORMAT, "unknown metadata value type");
    kv->type = (enum gguf_vtype)t;
    kv->data = c->p + c->pos;
    if (t == GGUF_STRING) {
        struct gguf_str s;
        return cur_str(c, &s, "string value");
    }
    if (t != GGUF_ARRAY) return cur_skip(c, vtype_size[t], "scalar value");
    uint32_t at;
    uint64_t n;
    if (!cur_u32(c, &at, "array element type") || !cur_u64(c, &n, "array length")) return false;
    if (at >= GGUF_VTYPE_COUNT) return cur_fail(c, KVS_ERR_FORMAT, "unknown array element type");
    if (at == GGUF_ARRAY) return cur_fail(c, KVS_ERR_UNSUPPORTED, "nested array");
    kv->arr_type = (enum gguf_vtype)at;
    kv->arr_n = n;
    kv->data = c->p + c->pos;
    if (at != GGUF_STRING) {
        size_t es = vtype_size[at];
        if (n > (c->size - c->pos) / es) return cur_fail(c, KVS_ERR_FORMAT, "truncated file: array longer than the file");
        return cur_skip(c, n * es, "array");
    }
    /* each string takes at least its 8-byte length: bound n before allocating */
    if (n > (c->size - c->pos) / 8) return cur_fail(c, KVS_ERR_FORMAT, "truncated file: string array longer than the file");
    kv->strs = malloc((n ? n : 1) * sizeof *kv->strs);
    if (!kv->strs) return cur_fail(c, KVS_ERR_NOMEM, "out of memory for string array");
    for (uint64_t i = 0; i < n; i++) {
        if (!cur_str(c, &kv->strs[i], "string array element")) return false;
    }
    return true;
}

static enum kvs_status parse(struct gguf_file *g) {
    struct cursor c = {.p = g->map, .size = g->map_size, .name = g->path};
    uint8_t magic[4];
    if (!cur_read(&c, magic, 4, "magic")) return c.st;
    if (memcmp(magic, "GGUF", 4) != 0)
        return kvs_fail(KVS_ERR_FORMAT, "%s: not a GGUF file (bad magic)", g->path);
    uint32_t version;
    if (!cur_u32(&c, &version, "version")) return c.st;
    if (version != 2 && version != 3)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "%s: unsupported GGUF version %u (need 2 or 3)",
                        g->path, version);
    g->version = (int)version;
    if (!cur_u64(&c, &g->n_tensors, "tensor count") || !cur_u64(&c, &g->n_kv, "metadata count"))
        return c.st;
    /* a kv needs >= 8 (key len) + 4 (type) + 1 bytes, a tensor info >= 8 + 4 + 8 + 4 + 8 */
    size_t left = c.size - c.pos;
    if (g->n_kv > left / 13 || g->n_tensors > left / 32)
        return kvs_fail(KVS_ERR_FORMAT, "%s: truncated file: %llu metadata entries / %llu "
                        "tensors cannot fit in %zu bytes", g->path,
                        (unsigned long long)g->n_kv, (unsigned long long)g->n_tensors, left);
    g->kv = calloc(g->n_kv ? g->n_kv : 1, sizeof *g->kv);
    g->tensors = calloc(g->n_tensors ? g->n_tensors : 1, sizeof *g->tensors);
    if (!g->kv || !g->tensors) return kvs_fail(KVS_ERR_NOMEM, "%s: out of memory", g->path);

    for (uint64_t i = 0; i < g->n_kv; i++) {
        struct gguf_str key;
        if (!cur_str(&c, &key, "metadata key")) return c.st;
        if (!(g->kv[i].key = dup_str(key))) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
        if (strlen(g->kv[i].key) != key.len)
            return kvs_fail(KVS_ERR_FORMAT, "%s: metadata key %llu contains a NUL byte", g->path,
                            (unsigned long long)i);
        for (uint64_t j = 0; j < i; j++)
            if (strcmp(g->kv[j].key, g->kv[i].key) == 0)
                return kvs_fail(KVS_ERR_FORMAT, "%s: duplicate metadata key '%s'", g->path,
                                g->kv[i].key);
        if (!parse_value(&c, &g->kv[i])) return c.st;
    }

    g->alignment = 32;
    const struct gguf_kv *al = gguf_find_kv(g, "general.alignment");
    if (al) {
        uint32_t a;
        if (!gguf_get_u32(g, "general.alignment", &a) || a == 0 || (a & (a - 1)) != 0)
            return kvs_fail(KVS_ERR_FORMAT, "%s: general.alignment must be a power of two",
                            g->path);
        g->alignment = a;
    }

    for (uint64_t i = 0; i < g->n_tensors; i++) {
        struct gguf_tensor *t = &g->tensors[i];
        struct gguf_str name;
        uint32_t n_dims, type;
        if (!cur_str(&c, &name, "tensor name")) return c.st;
        if (!(t->name = dup_str(name))) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
        if (!cur_u32(&c, &n_dims, "tensor dims")) return c.st;
        if (n_dims < 1 || n_dims > 4)
            return kvs_fail(KVS_ERR_FORMAT, "%s: tensor '%s' has %u dimensions (1..4 allowed)",
                            g->path, t->name, n_dims);
        t->n_dims = (int)n_dims;
        uint64_t n_elems = 1;
        for (int d = 0; d < 4; d++) t->ne[d] = 1;
        for (uint32_t d = 0; d < n_dims; d++) {
            uint64_t ne;
            if (!cur_u64(&c, &ne, "tensor shape")) return c.st;
            if (ne == 0 || ne > ((uint64_t)1 << 40) || n_elems > ((uint64_t)1 << 62) / ne)
                return kvs_fail(KVS_ERR_FORMAT, "%s: tensor '%s' has an invalid shape", g->path,
                                t->name);
            t->ne[d] = (int64_t)ne;
            n_elems *= ne;
        }
        t->n_elems = n_elems;
        if (!cur_u32(&c, &type, "tensor type") || !cur_u64(&c, &t->offset, "tensor offset"))
            return c.st;
        t->type = (int)type;
        const struct quant_traits *tr = quant_get_traits((int)type);
        if (!tr || !tr->is_weight_type)
            return kvs_fail(KVS_ERR_UNSUPPORTED, "%s: tensor '%s' has unsupported type %u%s%s",
                            g->path, t->name, type, tr ? " " : "", tr ? tr->name : "");
        if (t->ne[0] % tr->block_size != 0)
            return kvs_fail(KVS_ERR_FORMAT, "%s: tensor '%s' row of %lld is not a whole number "
                            "of %s blocks", g->path, t->name, (long long)t->ne[0], tr->name);
        t->n_bytes = n_elems / (uint64_t)tr->block_size * tr->type_size;
        if (t->offset % g->alignment != 0)
            return kvs_fail(KVS_ERR_FORMAT, "%s: tensor '%s' offset is not aligned", g->path,
                            t->name);
        for (uint64_t j = 0; j < i; j++)
            if (strcmp(g->tensors[j].name, t->name) == 0)
                return kvs_fail(KVS_ERR_FORMAT, "%s: duplicate tensor '%s'", g->path, t->name);
    }
    if (c.st != KVS_OK) return c.st;

    uint64_t data_off = kvs_pad(c.pos, g->alignment);
    if (data_off > g->map_size && g->n_tensors > 0)
        return kvs_fail(KVS_ERR_FORMAT, "%s: truncated file: no tensor data section", g->path);
    g->data_offset = data_off;
    uint64_t data_size = g->map_size > data_off ? g->map_size - data_off : 0;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        struct gguf_tensor *t = &g->tensors[i];
        if (t->offset > data_size || t->n_bytes > data_size - t->offset)
            return kvs_fail(KVS_ERR_FORMAT, "%s: truncated file: tensor '%s' data (%llu bytes "
                            "at %llu) lies past the end of the file", g->path, t->name,
                            (unsigned long long)t->n_bytes,
                            (unsigned long long)(data_off + t->offset));
        t->data = g->map + data_off + t->offset;
    }
    return KVS_OK;
}

static enum kvs_status open_common(struct gguf_file *g, struct gguf_file **out) {
    enum kvs_status st = parse(g);
    if (st != KVS_OK) {
        gguf_close(g);
        return st;
    }
    *out = g;
    return KVS_OK;
}

enum kvs_status gguf_open(const char *path, bool prefault, struct gguf_file **out) {
    *out = NULL;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return kvs_fail(KVS_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return kvs_fail(KVS_ERR_IO, "%s: not a regular file", path);
    }
    if (sb.st_size < 24) {
        close(fd);
        return kvs_fail(KVS_ERR_FORMAT, "%s: truncated file (%lld bytes; a GGUF header alone "
                        "is 24)", path, (long long)sb.st_size);
    }
    void *map = mmap(NULL, (size_t)sb.st_size, PROT_READ,
                     MAP_PRIVATE | (prefault ? MAP_POPULATE : 0), fd, 0);
    close(fd);
    if (map == MAP_FAILED) return kvs_fail(KVS_ERR_IO, "%s: mmap failed: %s", path, strerror(errno));
    struct gguf_file *g = calloc(1, sizeof *g);
    char *p = strdup(path);
    if (!g || !p) {
        free(g);
        free(p);
        munmap(map, (size_t)sb.st_size);
        return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    }
    g->path = p;
    g->map = map;
    g->map_size = (size_t)sb.st_size;
    g->owns_map = true;
    return open_common(g, out);
}

enum kvs_status gguf_open_buffer(const void *buf, size_t size, const char *name,
                                 struct gguf_file **out) {
    *out = NULL;
    struct gguf_file *g = calloc(1, sizeof *g);
    char *p = strdup(name ? name : "<buffer>");
    if (!g || !p) {
        free(g);
        free(p);
        return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    }
    g->path = p;
    g->map = buf;
    g->map_size = size;
    g->owns_map = false;
    return open_common(g, out);
}

const struct gguf_kv *gguf_find_kv(const struct gguf_file *g, const char *key) {
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (strcmp(g->kv[i].key, key) == 0) return &g->kv[i];
    return NULL;
}

const struct gguf_tensor *gguf_find_tensor(const struct gguf_file *g, const char *name) {
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (strcmp(g->tensors[i].name, name) == 0) return &g->tensors[i];
    return NULL;
}

/* read a scalar integer of any integer type as int64 (u64 above INT64_MAX fails) */
static bool kv_int(const struct gguf_kv *kv, int64_t *v) {
    const uint8_t *d = kv->data;
    union { uint8_t u8; int8_t i8; uint16_t u16; int16_t i16; uint32_t u32; int32_t i32;
            uint64_t u64; int64_t i64; } u;
    switch (kv->type) {
    case GGUF_U8: memcpy(&u.u8, d, 1); *v = u.u8; return true;
    case GGUF_I8: memcpy(&u.i8, d, 1); *v = u.i8; return true;
    case GGUF_U16: memcpy(&u.u16, d, 2); *v = u.u16; return true;
    case GGUF_I16: memcpy(&u.i16, d, 2); *v = u.i16; return true;
    case GGUF_U32: memcpy(&u.u32, d, 4); *v = u.u32; return true;
    case GGUF_I32: memcpy(&u.i32, d, 4); *v = u.i32; return true;
    case GGUF_U64: memcpy(&u.u64, d, 8); if (u.u64 > INT64_MAX) return false; *v = (int64_t)u.u64; return true;
    case GGUF_I64: memcpy(&u.i64, d, 8); *v = u.i64; return true;
    default: return false;
    }
}

bool gguf_get_i64(const struct gguf_file *g, const char *key, int64_t *v) {
    const struct gguf_kv *kv = gguf_find_kv(g, key);
    return kv && kv_int(kv, v);
}

bool gguf_get_u32(const struct gguf_file *g, const char *key, uint32_t *v) {
    int64_t x;
    if (!gguf_get_i64(g, key, &x) || x < 0 || x > UINT32_MAX) return false;
    *v = (uint32_t)x;
    return true;
}

bool gguf_get_f32(const struct gguf_file *g, const char *key, float *v) {
    const struct gguf_kv *kv = gguf_find_kv(g, key);
    if (!kv) return false;
    if (kv->type == GGUF_F32) { memcpy(v, kv->data, 4); return true; }
    if (kv->type == GGUF_F64) { double d; memcpy(&d, kv->data, 8); *v = (float)d; return true; }
    return false;
}

bool gguf_get_bool(const struct gguf_file *g, const char *key, bool *v) {
    const struct gguf_kv *kv = gguf_find_kv(g, key);
    if (!kv || kv->type != GGUF_BOOL) return false;
    *v = kv->data[0] != 0;
    return true;
}

bool gguf_get_str(const struct gguf_file *g, const char *key, struct gguf_str *v) {
    const struct gguf_kv *kv = gguf_find_kv(g, key);
    if (!kv || kv->type != GGUF_STRING) return false;
    uint64_t len;
    memcpy(&len, kv->data, 8);
    v->s = (const char *)kv->data + 8;
    v->len = len;
    return true;
}

const struct gguf_str *gguf_get_str_arr(const struct gguf_file *g, const char *key, uint64_t *n) {
    const struct gguf_kv *kv = gguf_find_kv(g, key);
    if (!kv || kv->type != GGUF_ARRAY || kv->arr_type != GGUF_STRING) return NULL;
    *n = kv->arr_n;
    return kv->strs;
}

const void *gguf_get_i32_arr(const struct gguf_file *g, const char *key, uint64_t *n) {
    const struct gguf_kv *kv = gguf_find_kv(g, key);
    if (!kv || kv->type != GGUF_ARRAY || (kv->arr_type != GGUF_I32 && kv->arr_type != GGUF_U32))
        return NULL;
    *n = kv->arr_n;
    return kv->data;
}
