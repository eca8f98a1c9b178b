/* gguf_writer.h — builds small GGUF files in memory for tests and the fuzz corpus: a header,
 * metadata of every value type (arrays included) and F32/Q8_0 tensors. Header-only. */
#ifndef KVS_GGUF_WRITER_H
#define KVS_GGUF_WRITER_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct gw { uint8_t *p; size_t n, cap; };

static inline void gw_bytes(struct gw *w, const void *b, size_t n) {
    if (w->n + n > w->cap) {
        w->cap = (w->n + n) * 2 + 256;
        w->p = realloc(w->p, w->cap);
    }
    memcpy(w->p + w->n, b, n);
    w->n += n;
}
static inline void gw_u32(struct gw *w, uint32_t v) { gw_bytes(w, &v, 4); }
static inline void gw_u64(struct gw *w, uint64_t v) { gw_bytes(w, &v, 8); }
static inline void gw_str(struct gw *w, const char *s) { gw_u64(w, strlen(s)); gw_bytes(w, s, strlen(s)); }
static inline void gw_pad(struct gw *w, size_t a) { while (w->n % a) { uint8_t z = 0; gw_bytes(w, &z, 1); } }

/* A valid GGUF v3: metadata of every scalar type, a string, an array of u32 and an array of
 * strings; two tensors: "a" F32 [8, 2] and "b" Q8_0 [64, 1]. Returns the buffer (malloc'd). */
static inline uint8_t *gw_build_sample(size_t *size) {
    struct gw w = {0};
    gw_bytes(&w, "GGUF", 4);
    gw_u32(&w, 3);
    gw_u64(&w, 2);  /* tensors */
    gw_u64(&w, 16); /* kvs */
    uint8_t u8 = 7; int8_t i8 = -7; uint16_t u16 = 700; int16_t i16 = -700; uint32_t u32 = 70000;
    int32_t i32 = -70000; float f32 = 1.5f; uint8_t b = 1; uint64_t u64 = 1ull << 40;
    int64_t i64 = -(1ll << 40); double f64 = 2.25;
    struct { const char *k; uint32_t t; const void *v; size_t n; } sc[] = {
        {"t.u8", 0, &u8, 1}, {"t.i8", 1, &i8, 1}, {"t.u16", 2, &u16, 2}, {"t.i16", 3, &i16, 2},
        {"t.u32", 4, &u32, 4}, {"t.i32", 5, &i32, 4}, {"t.f32", 6, &f32, 4}, {"t.bool", 7, &b, 1},
        {"t.u64", 10, &u64, 8}, {"t.i64", 11, &i64, 8}, {"t.f64", 12, &f64, 8},
    };
    for (size_t i = 0; i < sizeof sc / sizeof sc[0]; i++) {
        gw_str(&w, sc[i].k);
        gw_u32(&w, sc[i].t);
        gw_bytes(&w, sc[i].v, sc[i].n);
    }
    gw_str(&w, "general.architecture"); gw_u32(&w, 8); gw_str(&w, "toy");
    gw_str(&w, "t.str"); gw_u32(&w, 8); gw_str(&w, "héllo");
    gw_str(&w, "t.arr_u32"); gw_u32(&w, 9); gw_u32(&w, 4); gw_u64(&w, 3);
    gw_u32(&w, 1); gw_u32(&w, 2); gw_u32(&w, 3);
    gw_str(&w, "t.arr_str"); gw_u32(&w, 9); gw_u32(&w, 8); gw_u64(&w, 2);
    gw_str(&w, "ab"); gw_str(&w, "");
    gw_str(&w, "general.alignment"); gw_u32(&w, 4); gw_u32(&w, 32);
    /* tensor infos */
    gw_str(&w, "a"); gw_u32(&w, 2); gw_u64(&w, 8); gw_u64(&w, 2); gw_u32(&w, 0); gw_u64(&w, 0);
    gw_str(&w, "b"); gw_u32(&w, 2); gw_u64(&w, 64); gw_u64(&w, 1); gw_u32(&w, 8); gw_u64(&w, 64);
    gw_pad(&w, 32);
    float a[16];
    for (int i = 0; i < 16; i++) a[i] = (float)i;
    gw_bytes(&w, a, sizeof a);
    gw_pad(&w, 32);
    uint8_t q[68];
    for (int i = 0; i < 68; i++) q[i] = (uint8_t)i;
    q[0] = 0x00; q[1] = 0x3c; q[34] = 0x00; q[35] = 0x3c; /* fp16 scales 1.0 */
    gw_bytes(&w, q, sizeof q);
    *size = w.n;
    return w.p;
}
#endif
