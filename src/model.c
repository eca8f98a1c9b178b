/* model.c — load a GGUF model: architecture table lookup, hparams, weight slots, tokenizer.
 * Every tensor the architecture needs is checked for presence, shape and a supported type, so
 * the forward pass can trust the slots without further checks. */
#include "model.h"
#include "quant.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static const struct arch_desc ARCHS[] = {
    {.name = "llama", .rope = ROPE_NORM, .qkv_bias = false, .chat_flavor = "smollm"},
    {.name = "qwen2", .rope = ROPE_NEOX, .qkv_bias = true, .chat_flavor = "qwen2"},
};

struct loader {
    kvs_model *m;
    const char *path;
};

static enum kvs_status get_weight(struct loader *L, const char *name, int64_t rows, int64_t cols,
                                  bool required, struct weight *w) {
    const struct gguf_tensor *t = gguf_find_tensor(L->m->gguf, name);
    memset(w, 0, sizeof *w);
    if (!t) {
        if (!required) return KVS_OK;
        return kvs_fail(KVS_ERR_FORMAT, "%s: missing tensor '%s'", L->path, name);
    }
    if (t->n_dims != 2 || t->ne[0] != cols || t->ne[1] != rows)
        return kvs_fail(KVS_ERR_FORMAT, "%s: tensor '%s' has shape [%lld, %lld], expected "
                        "[%lld, %lld]", L->path, name, (long long)t->ne[0],
                        (long long)t->ne[1], (long long)cols, (long long)rows);
    w->data = t->data;
    w->type = t->type;
    w->n_rows = rows;
    w->n_cols = cols;
    w->row_bytes = quant_row_bytes(t->type, cols);
    L->m->n_params += t->n_elems;
    return KVS_OK;
}

static enum kvs_status get_vec(struct loader *L, const char *name, int64_t n, bool required,
                               const float **out) {
    const struct gguf_tensor *t = gguf_find_tensor(L->m->gguf, name);
    *out = NULL;
    if (!t) {
        if (!required) return KVS_OK;
        return kvs_fail(KVS_ERR_FORMAT, "%s: missing tensor '%s'", L->path, name);
    }
    if (t->type != QT_F32 || (int64_t)t->n_elems != n)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "%s: tensor '%s' must be F32 with %lld elements",
                        L->path, name, (long long)n);
    *out = t->data;
    L->m->n_params += t->n_elems;
    return KVS_OK;
}

static enum kvs_status read_hparams(struct loader *L) {
    kvs_model *m = L->m;
    struct hparams *hp = &m->hp;
    const char *a = m->arch->name;
    char key[128];
    struct { const char *suffix; int *dst; bool required; } ints[] = {
        {"block_count", &hp->n_layer, true},
        {"embedding_length", &hp->n_embd, true},
        {"attention.head_count", &hp->n_head, true},
        {"attention.head_count_kv", &hp->n_head_kv, false},
        {"feed_forward_length", &hp->n_ff, true},
        {"context_length", &hp->n_ctx_train, true},
        {"rope.dimension_count", &hp->n_rot, false},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        snprintf(key, sizeof key, "%s.%s", a, ints[i].suffix);
        uint32_t v;
        if (gguf_get_u32(m->gguf, key, &v)) {
            if (v == 0 || v > (1u << 24))
                return kvs_fail(KVS_ERR_FORMAT, "%s: %s = %u is out of range", L->path, key, v);
            *ints[i].dst = (int)v;
        } else if (ints[i].required) {
            return kvs_fail(KVS_ERR_FORMAT, "%s: missing or non-integer metadata '%s'", L->path,
                            key);
        }
    }
    if (!hp->n_head_kv) hp->n_head_kv = hp->n_head;
    if (hp->n_embd % hp->n_head != 0 || hp->n_head % hp->n_head_kv != 0)
        return kvs_fail(KVS_ERR_FORMAT, "%s: inconsistent head counts (embd %d, heads %d, kv "
                        "heads %d)", L->path, hp->n_embd, hp->n_head, hp->n_head_kv);
    hp->head_dim = hp->n_embd / hp->n_head;
    if (!hp->n_rot) hp->n_rot = hp->head_dim;
    if (hp->n_rot != hp->head_dim || hp->head_dim % 2 != 0 || hp->head_dim > 256)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "%s: rope dimension %d with head size %d is not "
                        "supported", L->path, hp->n_rot, hp->head_dim);
    snprintf(key, sizeof key, "%s.rope.freq_base", a);
    hp->rope_theta = 10000.0f;
    gguf_get_f32(m->gguf, key, &hp->rope_theta);
    snprintf(key, sizeof key, "%s.attention.layer_norm_rms_epsilon", a);
    if (!gguf_get_f32(m->gguf, key, &hp->norm_eps))
        return kvs_fail(KVS_ERR_FORMAT, "%s: missing metadata '%s'", L->path, key);
    snprintf(key, sizeof key, "%s.rope.scaling.type", a);
    struct gguf_str scal;
    if (gguf_get_str(m->gguf, key, &scal) && !(scal.len == 4 && memcmp(scal.s, "none", 4) == 0))
        return kvs_fail(KVS_ERR_UNSUPPORTED, "%s: rope scaling '%.*s' is not supported",
                        L->path, (int)scal.len, scal.s);
    return KVS_OK;
}

static enum kvs_status load_tokenizer(struct loader *L) {
    kvs_model *m = L->m;
    struct gguf_file *g = m->gguf;
    struct gguf_str model_s, pre_s = {0};
    if (!gguf_get_str(g, "tokenizer.ggml.model", &model_s))
        return kvs_fail(KVS_ERR_FORMAT, "%s: missing tokenizer.ggml.model", L->path);
    uint64_t n_tok = 0, n_merges = 0, n_types = 0;
    const struct gguf_str *toks = gguf_get_str_arr(g, "tokenizer.ggml.tokens", &n_tok);
    const struct gguf_str *merges = gguf_get_str_arr(g, "tokenizer.ggml.merges", &n_merges);
    const void *types = gguf_get_i32_arr(g, "tokenizer.ggml.token_type", &n_types);
    if (!toks || n_tok == 0 || n_tok > (1u << 24))
        return kvs_fail(KVS_ERR_FORMAT, "%s: missing or invalid tokenizer.ggml.tokens", L->path);
    if (types && n_types != n_tok)
        return kvs_fail(KVS_ERR_FORMAT, "%s: tokenizer.ggml.token_type has %llu entries for %llu "
                        "tokens", L->path, (unsigned long long)n_types, (unsigned long long)n_tok);
    char model_name[32] = {0}, pre_name[32] = {0};
    snprintf(model_name, sizeof model_name, "%.*s", (int)(model_s.len < 31 ? model_s.len : 31),
             model_s.s);
    if (gguf_get_str(g, "tokenizer.ggml.pre", &pre_s))
        snprintf(pre_name, sizeof pre_name, "%.*s", (int)(pre_s.len < 31 ? pre_s.len : 31),
                 pre_s.s);
    if (strcmp(model_name, "gpt2") != 0)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "%s: tokenizer model '%s' is not supported (gpt2 "
                        "byte-level BPE only)", L->path, model_name);

    struct tok_str *tv = malloc(n_tok * sizeof *tv);
    struct tok_str *mv = malloc((n_merges ? n_merges : 1) * sizeof *mv);
    int32_t *tt = malloc(n_tok * sizeof *tt);
    enum kvs_status st = KVS_OK;
    if (!tv || !mv || !tt) {
        st = kvs_fail(KVS_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (uint64_t i = 0; i < n_tok; i++) {
        if (toks[i].len > 4096) {
            st = kvs_fail(KVS_ERR_FORMAT, "%s: token %llu is too long", L->path,
                          (unsigned long long)i);
            goto out;
        }
        tv[i] = (struct tok_str){toks[i].s, (uint32_t)toks[i].len};
        tt[i] = TOK_NORMAL;
        if (types) memcpy(&tt[i], (const uint8_t *)types + 4 * i, 4);
    }
    for (uint64_t i = 0; i < n_merges; i++) {
        if (merges[i].len > 8192) {
            st = kvs_fail(KVS_ERR_FORMAT, "%s: merge %llu is too long", L->path,
                          (unsigned long long)i);
            goto out;
        }
        mv[i] = (struct tok_str){merges[i].s, (uint32_t)merges[i].len};
    }
    struct { const char *key; int32_t *dst; } ids[] = {
        {"tokenizer.ggml.bos_token_id", &m->bos_id},
        {"tokenizer.ggml.eos_token_id", &m->eos_id},
        {"tokenizer.ggml.eot_token_id", &m->eot_id},
    };
    int32_t unk = -1, pad = -1;
    for (size_t i = 0; i < 3; i++) {
        uint32_t v;
        *ids[i].dst = -1;
        if (gguf_get_u32(g, ids[i].key, &v) && v < n_tok) *ids[i].dst = (int32_t)v;
    }
    uint32_t v;
    if (gguf_get_u32(g, "tokenizer.ggml.unknown_token_id", &v) && v < n_tok) unk = (int32_t)v;
    if (gguf_get_u32(g, "tokenizer.ggml.padding_token_id", &v) && v < n_tok) pad = (int32_t)v;
    m->add_bos = false;
    gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &m->add_bos);
    struct tokenizer_desc d = {
        .model = model_name, .pre = pre_name[0] ? pre_name : NULL, .n_vocab = (int)n_tok,
        .tokens = tv, .token_types = tt, .n_merges = (int)n_merges, .merges = mv,
        .bos_id = m->bos_id, .eos_id = m->eos_id, .eot_id = m->eot_id, .unk_id = unk,
        .pad_id = pad, .add_bos = m->add_bos,
    };
    st = tokenizer_init(&m->tok, &d);
    if (st == KVS_OK) m->im_end_id = tokenizer_find(m->tok, "<|im_end|>");
out:
    free(tv);
    free(mv);
    free(tt);
    return st;
}

struct kvs_model_params kvs_model_params_default(void) {
    return (struct kvs_model_params){.prefault = false, .pack = true};
}

static struct weight *layer_weight(struct layer_weights *lw, int i) {
    struct weight *w[] = {&lw->wq, &lw->wk, &lw->wv, &lw->wo, &lw->w_gate, &lw->w_up, &lw->w_down};
    return w[i];
}
enum { N_LAYER_WEIGHTS = 7 };

/* quant_pack copies of the layers' weights and the output matrix (not the embedding rows) */
static enum kvs_status pack_weights(kvs_model *m) {
    for (int il = -1; il < m->hp.n_layer; il++)
        for (int i = 0; i < (il < 0 ? 1 : N_LAYER_WEIGHTS); i++) {
            struct weight *w = il < 0 ? &m->output : layer_weight(&m->layers[il], i);
            size_t n = quant_pack_bytes(w->type, w->n_rows, w->n_cols);
            if (!n) continue;
            w->packed = aligned_alloc(64, (n + 63) / 64 * 64);
            if (!w->packed) return kvs_fail(KVS_ERR_NOMEM, "out of memory packing the weights");
            quant_pack(w->type, w->data, w->row_bytes, w->n_rows, w->n_cols, w->packed);
            m->packed_bytes += n;
            /* the packed copy serves every product from now on: give the original's pages back
             * (read-only file mapping: whatever still reads them, such as embedding rows of a
             * tied output, faults them in again), so that packing does not double the RSS */
            if (m->gguf->owns_map) {
                const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
                uintptr_t a = ((uintptr_t)w->data + pg - 1) & ~(pg - 1);
                uintptr_t e = ((uintptr_t)w->data + (size_t)w->n_rows * w->row_bytes) & ~(pg - 1);
                if (e > a) madvise((void *)a, e - a, MADV_DONTNEED);
            }
        }
    return KVS_OK;
}

void kvs_model_free(kvs_model *m) {
    if (!m) return;
    if (m->tok) tokenizer_free(m->tok);
    free(m->output.packed);
    for (int il = 0; m->layers && il < m->hp.n_layer; il++)
        for (int i = 0; i < N_LAYER_WEIGHTS; i++) free(layer_weight(&m->layers[il], i)->packed);
    free(m->layers);
    gguf_close(m->gguf);
    free(m);
}

enum kvs_status kvs_model_load(const char *path, const struct kvs_model_params *p,
                               kvs_model **out) {
    *out = NULL;
    quant_init();
    struct kvs_model_params def = kvs_model_params_default();
    if (!p) p = &def;
    kvs_model *m = calloc(1, sizeof *m);
    if (!m) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    struct loader L = {.m = m, .path = path};
    enum kvs_status st = gguf_open(path, p->prefault, &m->gguf);
    if (st != KVS_OK) goto fail;

    struct gguf_str arch;
    if (!gguf_get_str(m->gguf, "general.architecture", &arch)) {
        st = kvs_fail(KVS_ERR_FORMAT, "%s: missing general.architecture", path);
        goto fail;
    }
    for (size_t i = 0; i < sizeof ARCHS / sizeof ARCHS[0]; i++)
        if (strlen(ARCHS[i].name) == arch.len && memcmp(ARCHS[i].name, arch.s, arch.len) == 0)
            m->arch = &ARCHS[i];
    if (!m->arch) {
        st = kvs_fail(KVS_ERR_UNSUPPORTED, "%s: unsupported architecture '%.*s' (supported: "
                      "llama, qwen2)", path, (int)(arch.len > 64 ? 64 : arch.len), arch.s);
        goto fail;
    }
    struct gguf_str name;
    if (gguf_get_str(m->gguf, "general.name", &name))
        snprintf(m->name, sizeof m->name, "%.*s", (int)(name.len > 127 ? 127 : name.len), name.s);
    if ((st = read_hparams(&L)) != KVS_OK) goto fail;
    if ((st = load_tokenizer(&L)) != KVS_OK) goto fail;

    struct hparams *hp = &m->hp;
    hp->n_vocab = tokenizer_n_vocab(m->tok);
    int64_t d = hp->n_embd, hd = hp->head_dim, nq = (int64_t)hp->n_head * hd,
            nkv = (int64_t)hp->n_head_kv * hd, ff = hp->n_ff;
    if ((st = get_weight(&L, "token_embd.weight", hp->n_vocab, d, true, &m->tok_embd))) goto fail;
    if ((st = get_vec(&L, "output_norm.weight", d, true, &m->output_norm))) goto fail;
    if ((st = get_weight(&L, "output.weight", hp->n_vocab, d, false, &m->output))) goto fail;
    m->tied_output = m->output.data == NULL;
    if (m->tied_output) m->output = m->tok_embd;

    m->layers = calloc((size_t)hp->n_layer, sizeof *m->layers);
    if (!m->layers) {
        st = kvs_fail(KVS_ERR_NOMEM, "out of memory");
        goto fail;
    }
    for (int il = 0; il < hp->n_layer; il++) {
        struct layer_weights *lw = &m->layers[il];
        char n[96];
#define W(slot, suffix, rows, cols)                                                             \
    snprintf(n, sizeof n, "blk.%d." suffix, il);                                                \
    if ((st = get_weight(&L, n, rows, cols, true, &lw->slot)) != KVS_OK) goto fail;
#define V(slot, suffix, len, req)                                                               \
    snprintf(n, sizeof n, "blk.%d." suffix, il);                                                \
    if ((st = get_vec(&L, n, len, req, &lw->slot)) != KVS_OK) goto fail;
        V(attn_norm, "attn_norm.weight", d, true);
        W(wq, "attn_q.weight", nq, d);
        W(wk, "attn_k.weight", nkv, d);
        W(wv, "attn_v.weight", nkv, d);
        W(wo, "attn_output.weight", d, nq);
        V(bq, "attn_q.bias", nq, m->arch->qkv_bias);
        V(bk, "attn_k.bias", nkv, m->arch->qkv_bias);
        V(bv, "attn_v.bias", nkv, m->arch->qkv_bias);
        V(ffn_norm, "ffn_norm.weight", d, true);
        W(w_gate, "ffn_gate.weight", ff, d);
        W(w_up, "ffn_up.weight", ff, d);
        W(w_down, "ffn_down.weight", d, ff);
#undef W
#undef V
    }
    /* weight bytes and dominant type, for info and the bandwidth bound */
    uint64_t by_type[QT_COUNT] = {0};
    for (uint64_t i = 0; i < m->gguf->n_tensors; i++) {
        const struct gguf_tensor *t = &m->gguf->tensors[i];
        m->weight_bytes += t->n_bytes;
        if (t->type < QT_COUNT && t->n_dims == 2) by_type[t->type] += t->n_bytes;
    }
    int best = 0;
    for (int t = 0; t < QT_COUNT; t++)
        if (by_type[t] > by_type[best]) best = t;
    snprintf(m->file_type, sizeof m->file_type, "%s", quant_get_traits(best)->name);
    if (p->pack && (st = pack_weights(m)) != KVS_OK) goto fail;
    *out = m;
    return KVS_OK;
fail:
    kvs_model_free(m);
    return st;
}

void kvs_model_get_info(const kvs_model *m, struct kvs_model_info *info) {
    const struct hparams *hp = &m->hp;
    *info = (struct kvs_model_info){
        .arch = m->arch->name, .name = m->name, .n_layer = hp->n_layer, .n_embd = hp->n_embd,
        .n_head = hp->n_head, .n_head_kv = hp->n_head_kv, .head_dim = hp->head_dim,
        .n_ff = hp->n_ff, .n_vocab = hp->n_vocab, .n_ctx_train = hp->n_ctx_train,
        .rope_theta = hp->rope_theta, .norm_eps = hp->norm_eps, .tied_output = m->tied_output,
        .qkv_bias = m->arch->qkv_bias, .bos_id = m->bos_id, .eos_id = m->eos_id,
        .eot_id = m->eot_id, .n_params = m->n_params, .weight_bytes = m->weight_bytes, .packed_bytes = m->packed_bytes,
        .kv_bytes_per_token = (uint64_t)hp->n_layer * hp->n_head_kv * hp->head_dim * 2 * 2,
        .gguf_version = m->gguf->version, .file_type = m->file_type,
    };
}

int kvs_model_n_tensors(const kvs_model *m) { return (int)m->gguf->n_tensors; }

bool kvs_model_tensor(const kvs_model *m, int i, struct kvs_tensor_info *ti) {
    if (i < 0 || (uint64_t)i >= m->gguf->n_tensors) return false;
    const struct gguf_tensor *t = &m->gguf->tensors[i];
    ti->name = t->name;
    ti->type = quant_get_traits(t->type)->name;
    ti->n_dims = t->n_dims;
    for (int d = 0; d < 4; d++) ti->dims[d] = t->ne[d];
    ti->bytes = t->n_bytes;
    return true;
}

/* ---- tokenizer wrappers of the public API ---- */

int kvs_tokenize(const kvs_model *m, const char *text, size_t len, bool add_bos,
                 bool parse_special, int32_t *out, int max_out) {
    return tokenizer_encode(m->tok, text, len, add_bos && m->add_bos, parse_special, out,
                            max_out);
}

size_t kvs_token_piece(const kvs_model *m, int32_t tok, bool special, char *buf, size_t size) {
    return tokenizer_piece(m->tok, tok, special, buf, size);
}

bool kvs_token_is_eog(const kvs_model *m, int32_t tok) {
    return tok >= 0 && (tok == m->eos_id || tok == m->eot_id || tok == m->im_end_id);
}

size_t kvs_detok_push(const kvs_model *m, struct kvs_detok *d, int32_t tok, char *out,
                      size_t size) {
    char piece[256];
    size_t n = tokenizer_piece(m->tok, tok, false, piece, sizeof piece);
    if (n > sizeof piece) n = sizeof piece;
    return tok_stream_push((struct tok_stream *)d, piece, n, out, size);
}

size_t kvs_detok_flush(struct kvs_detok *d, char *out, size_t size) {
    return tok_stream_flush((struct tok_stream *)d, out, size);
}

size_t kvs_chat_apply(const kvs_model *m, const struct kvs_chat_msg *msgs, int n,
                      bool add_assistant, char *buf, size_t size) {
    _Static_assert(sizeof(struct kvs_chat_msg) == sizeof(struct chat_msg), "chat msg layout");
    return chat_format(m->arch->chat_flavor, (const struct chat_msg *)msgs, n, add_assistant,
                       buf, size);
}

static uint64_t fnv1a(uint64_t h, const void *data, size_t n) {
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* FNV-1a over the tensor directory (name, type, dims) and the first 4 KiB of token_embd: cache
 * files and chunk records made by one model are refused by another */
uint64_t kvs_model_fingerprint(const kvs_model *m) {
    if (!m) return 0;
    uint64_t h = 0xcbf29ce484222325ull;
    const struct gguf_file *g = m->gguf;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const struct gguf_tensor *t = &g->tensors[i];
        uint32_t type = (uint32_t)t->type, nd = (uint32_t)t->n_dims;
        h = fnv1a(h, t->name, strlen(t->name) + 1);
        h = fnv1a(h, &type, 4);
        h = fnv1a(h, &nd, 4);
        for (int d = 0; d < t->n_dims; d++) {
            int64_t e = t->ne[d];
            h = fnv1a(h, &e, 8);
        }
    }
    size_t nb = m->tok_embd.row_bytes * (size_t)m->tok_embd.n_rows;
    return fnv1a(h, m->tok_embd.data, nb < 4096 ? nb : 4096);
}

