/* test_gguf.c — the GGUF reader on a hand-built valid file (every metadata type, arrays,
 * tensors), on every truncation of it, on corrupted headers, and on the real SmolLM2 file. */
#include "gguf.h"
#include "quant.h"
#include "testutil.h"
#include "gguf_writer.h"

#include <stdio.h>
#include <unistd.h>

static void test_valid(void) {
    size_t n;
    uint8_t *buf = gw_build_sample(&n);
    struct gguf_file *g;
    CHECKF(gguf_open_buffer(buf, n, "sample", &g) == KVS_OK, "%s", kvs_last_error());
    if (!g) return;
    CHECK(g->version == 3 && g->n_kv == 16 && g->n_tensors == 2);
    uint32_t u32;
    int64_t i64;
    float f;
    bool b;
    struct gguf_str s;
    CHECK(gguf_get_u32(g, "t.u8", &u32) && u32 == 7);
    CHECK(gguf_get_i64(g, "t.i8", &i64) && i64 == -7);
    CHECK(gguf_get_i64(g, "t.i16", &i64) && i64 == -700);
    CHECK(gguf_get_u32(g, "t.u32", &u32) && u32 == 70000);
    CHECK(!gguf_get_u32(g, "t.i32", &u32)); /* negative does not fit */
    CHECK(gguf_get_i64(g, "t.u64", &i64) && i64 == (1ll << 40));
    CHECK(gguf_get_i64(g, "t.i64", &i64) && i64 == -(1ll << 40));
    CHECK(gguf_get_f32(g, "t.f32", &f) && f == 1.5f);
    CHECK(gguf_get_f32(g, "t.f64", &f) && f == 2.25f);
    CHECK(gguf_get_bool(g, "t.bool", &b) && b);
    CHECK(gguf_get_str(g, "t.str", &s) && s.len == 6 && !memcmp(s.s, "héllo", 6));
    CHECK(!gguf_get_str(g, "t.u8", &s));
    CHECK(!gguf_get_u32(g, "missing", &u32));
    uint64_t na;
    const struct gguf_str *sa = gguf_get_str_arr(g, "t.arr_str", &na);
    CHECK(sa && na == 2 && sa[0].len == 2 && !memcmp(sa[0].s, "ab", 2) && sa[1].len == 0);
    const void *ia = gguf_get_i32_arr(g, "t.arr_u32", &na);
    CHECK(ia && na == 3);
    const struct gguf_tensor *ta = gguf_find_tensor(g, "a"), *tb = gguf_find_tensor(g, "b");
    CHECK(ta && ta->type == QT_F32 && ta->ne[0] == 8 && ta->ne[1] == 2 && ta->n_bytes == 64);
    CHECK(tb && tb->type == QT_Q8_0 && tb->n_bytes == 68);
    if (ta) CHECK(((const float *)ta->data)[15] == 15.0f);
    CHECK(gguf_find_tensor(g, "c") == NULL);
    gguf_close(g);

    /* version 2 has the same layout (v3 only added big-endian files) */
    buf[4] = 2;
    CHECKF(gguf_open_buffer(buf, n, "v2", &g) == KVS_OK && g && g->version == 2, "%s", kvs_last_error());
    gguf_close(g);
    buf[4] = 3;

    /* every truncation must fail cleanly with a message naming the buffer */
    int failures = 0;
    for (size_t cut = 0; cut < n; cut++) {
        struct gguf_file *t = NULL;
        enum kvs_status st = gguf_open_buffer(buf, cut, "cut", &t);
        if (st == KVS_OK || t || strncmp(kvs_last_error(), "cut: ", 5) != 0) failures++;
        gguf_close(t);
    }
    CHECKF(failures == 0, "%d truncations were not refused", failures);

    /* single-byte corruptions must never crash (they may or may not be accepted) */
    for (size_t i = 0; i < n; i++) {
        uint8_t *c = malloc(n);
        memcpy(c, buf, n);
        c[i] ^= 0xA5;
        struct gguf_file *t = NULL;
        gguf_open_buffer(c, n, "flip", &t);
        gguf_close(t);
        free(c);
    }
    free(buf);
}

static void expect_fail(uint8_t *buf, size_t n, enum kvs_status want, const char *needle) {
    struct gguf_file *g = NULL;
    enum kvs_status st = gguf_open_buffer(buf, n, "bad", &g);
    CHECKF(st == want, "status %d, wanted %d (%s)", st, want, kvs_last_error());
    CHECKF(strstr(kvs_last_error(), needle) != NULL, "message '%s' lacks '%s'", kvs_last_error(), needle);
    gguf_close(g);
}

static void test_bad_headers(void) {
    size_t n;
    uint8_t *buf = gw_build_sample(&n);
    uint8_t *c = malloc(n);
    memcpy(c, buf, n); memcpy(c, "GGML", 4);
    expect_fail(c, n, KVS_ERR_FORMAT, "bad magic");
    memcpy(c, buf, n); c[4] = 1;
    expect_fail(c, n, KVS_ERR_UNSUPPORTED, "version 1");
    memcpy(c, buf, n); c[4] = 9;
    expect_fail(c, n, KVS_ERR_UNSUPPORTED, "version 9");
    memcpy(c, buf, n); memset(c + 8, 0xff, 8); /* 2^64-1 tensors */
    expect_fail(c, n, KVS_ERR_FORMAT, "truncated");
    memcpy(c, buf, n); memset(c + 16, 0x7f, 8); /* absurd kv count */
    expect_fail(c, n, KVS_ERR_FORMAT, "truncated");
    /* unknown tensor type: find tensor "b"'s type field (u32 8 right after its dims) */
    memcpy(c, buf, n);
    for (size_t i = 0; i + 12 < n; i++) {
        uint64_t d0, d1; uint32_t t;
        memcpy(&d0, c + i, 8); memcpy(&d1, c + i + 8, 8); memcpy(&t, c + i + 16, 4);
        if (d0 == 64 && d1 == 1 && t == 8) {
            uint32_t bad = 99;
            memcpy(c + i + 16, &bad, 4);
            break;
        }
    }
    expect_fail(c, n, KVS_ERR_UNSUPPORTED, "unsupported type 99");
    free(c);
    free(buf);
    /* a file path that does not exist, and a file too short to hold a header */
    struct gguf_file *g = NULL;
    CHECK(gguf_open("/nonexistent/x.gguf", false, &g) == KVS_ERR_IO && !g);
    char tmp[] = "/tmp/kvs_test_gguf_XXXXXX";
    int fd = mkstemp(tmp);
    if (fd >= 0) {
        CHECK(write(fd, "GGUF", 4) == 4);
        close(fd);
        CHECK(gguf_open(tmp, false, &g) == KVS_ERR_FORMAT);
        CHECK(strstr(kvs_last_error(), tmp) != NULL);
        unlink(tmp);
    }
}

static void test_real_model(void) {
    const char *path = tu_model_path();
    if (!path) {
        tu_skip("test_gguf real-file checks", "model %s not found: make models", tu_model_name());
        return;
    }
    struct gguf_file *g;
    CHECKF(gguf_open(path, false, &g) == KVS_OK, "%s", kvs_last_error());
    if (!g) return;
    CHECK(g->version == 3 && g->n_tensors == 272);
    struct gguf_str arch;
    CHECK(gguf_get_str(g, "general.architecture", &arch) && arch.len == 5 && !memcmp(arch.s, "llama", 5));
    uint64_t n;
    CHECK(gguf_get_str_arr(g, "tokenizer.ggml.tokens", &n) && n == 49152);
    const struct gguf_tensor *t = gguf_find_tensor(g, "token_embd.weight");
    CHECK(t && t->type == QT_Q8_0 && t->ne[0] == 576 && t->ne[1] == 49152);
    gguf_close(g);
}

int main(void) {
    quant_init();
    test_valid();
    test_bad_headers();
    test_real_model();
    return tu_finish("test_gguf");
}
