/* engine.c — contexts, sequences and evaluation: splits a prompt into chunks of n_batch
 * tokens, feeds them through forward(), keeps each sequence's position, and reports memory.
 * (When compression runs — after chunks, at end of prefill, every k decode steps — is decided
 * here once policies exist; with the `full` policy nothing is ever dropped.) */
#include "engine.h"
#include "ops.h"
#include "quant.h"
#include "kv/learned.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct kvs_context_params kvs_context_params_default(void) {
    return (struct kvs_context_params){.n_ctx = 0, .n_threads = 0, .n_batch = 512,
                                       .n_seq_max = 1, .kv_spec = "full", .keep_stats = false};
}

const char *kvs_kv_spec_help(void) { return kv_spec_help(); }

enum kvs_status kvs_kv_spec_check(const char *kv_spec, char *norm, size_t size) {
    struct kv_spec spec;
    enum kvs_status st = kv_spec_parse(kv_spec ? kv_spec : "", &spec);
    if (st == KVS_OK && norm && size) snprintf(norm, size, "%s", spec.text);
    return st;
}


double kvs_context_device_bandwidth(kvs_context *c) { return c->gpu ? cuda_bandwidth_gb_s(c->gpu) : -1; }

const char *kvs_context_device_name(const kvs_context *c) { return c->gpu ? cuda_device_name(c->gpu) : "cpu"; }

/* what --device cuda runs: the full cache, and the policies scored there (kv_policy_score_src;
 * GPU_POLICIES in engine.h says it in words) */
static bool gpu_runs(const struct kv_spec *sp) {
    return (sp->method == KV_FULL && !sp->think && !sp->kivi_bits && !sp->mikv_low) || kv_policy_scored_elsewhere(sp);
}

bool kvs_kv_runs_on(const char *kv_spec, int device) {
    struct kv_spec sp;
    if (kv_spec_parse(kv_spec ? kv_spec : "", &sp) != KVS_OK) return false;
    return device == KVS_DEVICE_CPU || (device == KVS_DEVICE_CUDA && gpu_runs(&sp));
}

/* the queries a GPU slot under sp keeps: the spec's own, and in a keep_stats context at least
 * KVS_STATS_QWIN, as the CPU store keeps */
int kvs_gpu_slot_qwin(const kvs_context *c, const struct kv_spec *sp) {
    int qwin = kvs_gpu_spec_qwin(sp);
    if (c->p.keep_stats && qwin < KVS_STATS_QWIN) qwin = KVS_STATS_QWIN;
    return qwin;
}

/* the slot on the GPU as its policy needs: its query window, its entries' positions (under a
 * policy or with statistics), accumulated attention (acc: H2O, or kept for a later
 * kvs_seq_compress) */
static enum kvs_status gpu_slot_policy(kvs_context *c, kvs_sequence *s, const struct kv_spec *sp, bool acc) {
    if (!c->gpu) return KVS_OK;
    return cuda_seq_set_policy(c->gpu, s->slot, kvs_gpu_slot_qwin(c, sp), sp->method != KV_FULL || c->p.keep_stats,
                               acc || kv_policy_score_src(sp) == KV_SRC_ACC);
}

/* The model as the GPU backend reads it (cuda.h), then the GPU context. */
static enum kvs_status gpu_init(kvs_context *c) {
    const kvs_model *m = c->m;
    const struct hparams *hp = &m->hp;
    const struct kv_spec *sp = &c->base.spec;
    if (!gpu_runs(sp) || c->p.act_f32)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "--device cuda runs the KV policies " GPU_POLICIES " so far ('%s'%s "
                        "asked); use the CPU for the others", sp->text, c->p.act_f32 ? " with fp32 activations" : "");
    struct cuda_layer_desc *L = calloc((size_t)hp->n_layer, sizeof *L);
    if (!L) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
#define CW(w) ((struct cuda_w){(w).data, (w).type, (w).n_rows, (w).n_cols, (w).row_bytes})
    for (int il = 0; il < hp->n_layer; il++) {
        const struct layer_weights *lw = &m->layers[il];
        L[il] = (struct cuda_layer_desc){lw->attn_norm, lw->ffn_norm, lw->bq, lw->bk, lw->bv,
                                         CW(lw->wq), CW(lw->wk), CW(lw->wv), CW(lw->wo),
                                         CW(lw->w_gate), CW(lw->w_up), CW(lw->w_down)};
    }
    struct cuda_model_desc d = {
        .n_layer = hp->n_layer, .n_embd = hp->n_embd, .n_head = hp->n_head, .n_head_kv = hp->n_head_kv,
        .head_dim = hp->head_dim, .n_ff = hp->n_ff, .n_vocab = hp->n_vocab, .norm_eps = hp->norm_eps,
        .neox = m->arch->rope == ROPE_NEOX, .inv_freq = c->inv_freq, .tok_embd = CW(m->tok_embd),
        .output = CW(m->output), .output_norm = m->output_norm, .layers = L};
#undef CW
    enum kvs_status st = cuda_ctx_new(&d, c->n_ctx, c->t_max, c->p.n_seq_max, &c->gpu);
    free(L);
    if (st == KVS_OK) kvs_log(2, "cuda: %s", cuda_device_name(c->gpu));
    return st;
}

static void *scratch(struct kvs_context *c, size_t bytes) {
    c->scratch_bytes += bytes;
    return kvs_aligned_alloc(bytes);
}

void kvs_context_free(kvs_context *c) {
    if (!c) return;
    if (c->seqs)
        for (int i = 0; i < c->p.n_seq_max; i++)
            if (c->seqs[i]) kvs_seq_free(c, c->seqs[i]);
    cuda_ctx_free(c->gpu);
    free(c->seqs);
    if (c->tp) threadpool_free(c->tp);
    kv_policy_free(c->base.policy);
    for (int i = 0; i < KVS_MAX_PROFILES; i++)
        if (c->prof[i]) {
            kv_policy_free(c->prof[i]->policy);
            free(c->prof[i]);
        }
    float *bufs[] = {c->x, c->xn, c->q, c->k, c->v, c->gate, c->up, c->rope_cs, c->inv_freq,
                     c->att_s, c->att_qo, c->att_x, c->att_part, c->wrow, c->lrn_x, c->lrn_h, c->lrn_s,
                     c->ag_qkv, c->ag_s, c->ag_sc};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) kvs_aligned_free(bufs[i]);
    for (int i = 0; i < N_ACT_SLOTS; i++) kvs_aligned_free(c->act[i]);
    kvs_aligned_free(c->att_units);
    kv_learned_free(c->learned);
    kv_learned_free(c->agate);
    free(c->step_logits);
    free(c);
}

/* Most entries a head of a sequence under policy p holds at any time, or 0 when that grows
 * with the tokens seen. A fixed budget (budget=N, mem=B, or streaming's sinks+window; uniform or
 * pyramid allocation) with compression after every prefill chunk and while decoding bounds it:
 * the budget, plus the entries that arrive between two compressions (a chunk while
 * prefilling, `every` steps while decoding), plus the token being attended. Ratios grow with
 * the text; AdaKV, D2O and Attention-Gate move budget between heads and layers (and the gate
 * keeps its own cache of every token); MiKV keeps every token. */
static int32_t bounded_entries(const struct kv_policy *p, int t_max) {
    const struct kv_spec *sp = &p->spec;
    if (sp->ratio > 0 || sp->mikv_low || sp->every <= 0 || !(sp->when & KV_WHEN_CHUNK) || sp->method == KV_AGATE ||
        (sp->alloc != KV_ALLOC_UNIFORM && sp->alloc != KV_ALLOC_PYRAMID))
        return 0;
    int32_t b = 0;
    for (int il = 0; il < p->n_layer; il++) {
        int32_t bl = kv_policy_budget(p, il, KVS_PAST_MAX);
        b = bl > b ? bl : b;
    }
    return b + (sp->every > t_max ? sp->every : t_max) + 1;
}

/* The learned weights a spec asks for (locret, agate): its file=, else the first file of the
 * method made for this model in the model's folder, $KVSIEVE_WEIGHTS, or ./weights. One file per
 * method and context: the first one loaded serves every profile of the context (a different
 * file= is refused). */
static enum kvs_status ensure_learned(kvs_context *c, const struct kv_spec *spec) {
    if (spec->method != KV_LOCRET && spec->method != KV_AGATE) return KVS_OK;
    bool gate = spec->method == KV_AGATE;
    const char *name = gate ? "agate" : "locret";
    struct kv_learned **slot = gate ? &c->agate : &c->learned;
    const struct hparams *hp = &c->m->hp;
    uint64_t fp = kvs_model_fingerprint(c->m);
    if (*slot) {
        if (spec->file[0] && strcmp(spec->file, (*slot)->path))
            return kvs_fail(KVS_ERR_INVALID_ARG, "this context already runs %s with '%s'; one "
                            "weight file per context (asked '%s')", name, (*slot)->path, spec->file);
        return KVS_OK;
    }
    char path[1024] = "";
    if (spec->file[0]) snprintf(path, sizeof path, "%s", spec->file);
    else {
        char dirs[3][1024] = {"", "", "weights"};
        const char *mp = c->m->gguf->path, *sl = strrchr(mp, '/');
        if (sl) snprintf(dirs[0], sizeof dirs[0], "%.*s", (int)(sl - mp), mp);
        else snprintf(dirs[0], sizeof dirs[0], ".");
        const char *env = getenv("KVSIEVE_WEIGHTS");
        if (env && *env) snprintf(dirs[1], sizeof dirs[1], "%s", env);
        for (int i = 0; i < 3 && !path[0]; i++)
            if (dirs[i][0] && kv_learned_find(dirs[i], gate ? 2 : 1, fp, hp->n_layer, hp->n_head, hp->n_head_kv,
                                              hp->head_dim, path, sizeof path) != KVS_OK)
                path[0] = 0;
        if (!path[0])
            return kvs_fail(KVS_ERR_INVALID_ARG, "%s needs trained weights for this model "
                            "(fingerprint 0x%016llx): none found in '%s', $KVSIEVE_WEIGHTS (%s) or "
                            "./weights; give %s:file=PATH.lrn (tools/train/README.md makes one)", name,
                            (unsigned long long)fp, dirs[0], dirs[1][0] ? dirs[1] : "unset", name);
    }
    struct kv_learned *l;
    enum kvs_status st = kv_learned_load(path, gate ? 2 : 1, fp, hp->n_layer, hp->n_head, hp->n_head_kv,
                                         hp->head_dim, &l);
    if (st != KVS_OK) return st;
    if (gate && l->d_in != hp->n_embd) {
        kv_learned_free(l);
        return kvs_fail(KVS_ERR_UNSUPPORTED, "'%s': the gate reads %d channels, the model's width is %d",
                        path, l->d_in, hp->n_embd);
    }
    size_t T = (size_t)c->t_max, before = c->scratch_bytes;
    size_t N = (size_t)c->n_ctx + T + KV_CAP_STEP;
    bool ok;
    if (gate) {
        /* (the pool may not exist yet: kvs_context_new makes it with p.n_threads, at least 1) */
        int nth = c->tp ? threadpool_n_threads(c->tp) : c->p.n_threads > 1 ? c->p.n_threads : 1;
        c->ag_qkv = scratch(c, sizeof(float) * T * 3 * (size_t)l->gw);
        c->ag_s = scratch(c, sizeof(float) * T * (size_t)l->n_head_kv);
        c->ag_cap = (int32_t)N;
        c->ag_sc_n = 8 * N + 8 * (size_t)l->gw + 16 * (size_t)l->gd + 64;
        c->ag_sc = scratch(c, sizeof(float) * c->ag_sc_n * (size_t)nth);
        ok = c->ag_qkv && c->ag_s && c->ag_sc;
        if (!ok) {
            kvs_aligned_free(c->ag_qkv), kvs_aligned_free(c->ag_s), kvs_aligned_free(c->ag_sc);
            c->ag_qkv = c->ag_s = c->ag_sc = NULL;
        }
    } else {
        c->lrn_x = scratch(c, sizeof(float) * T * (size_t)l->d_in);
        c->lrn_h = scratch(c, sizeof(float) * T * (size_t)l->hidden);
        c->lrn_s = scratch(c, sizeof(float) * T * (size_t)l->n_head_kv);
        ok = c->lrn_x && c->lrn_h && c->lrn_s;
        if (!ok) {
            kvs_aligned_free(c->lrn_x), kvs_aligned_free(c->lrn_h), kvs_aligned_free(c->lrn_s);
            c->lrn_x = c->lrn_h = c->lrn_s = NULL;
        }
    }
    if (!ok) {
        kv_learned_free(l);
        c->scratch_bytes = before;
        return kvs_fail(KVS_ERR_NOMEM, "out of memory for the %s scratch", name);
    }
    *slot = l;
    if (gate)
        kvs_log(2, "agate: %s (%s, %d heads x %d, window %d)", path, l->name, l->hidden, l->gd, l->window);
    else
        kvs_log(2, "locret: %s (%s, %s labels, hidden %d)", path, l->name,
                l->labels == 1 ? "question+answer" : "context-repeat", l->hidden);
    return KVS_OK;
}

enum kvs_status kvs_context_new(kvs_model *m, const struct kvs_context_params *pp,
                                kvs_context **out) {
    *out = NULL;
    struct kvs_context_params p = pp ? *pp : kvs_context_params_default();
    const struct hparams *hp = &m->hp;
    if (p.n_ctx < 0 || p.n_threads < 0 || p.n_batch < 0 || p.n_seq_max < 0)
        return kvs_fail(KVS_ERR_INVALID_ARG, "context parameters must not be negative");
    if (p.n_ctx == 0) p.n_ctx = hp->n_ctx_train;
    if (p.n_threads == 0) p.n_threads = threadpool_default_threads();
    if (p.n_batch == 0) p.n_batch = 512;
    if (p.n_seq_max == 0) p.n_seq_max = 1;
    if (p.n_batch > KVS_T_MAX) p.n_batch = KVS_T_MAX;
    if (p.n_seq_max > 64)
        return kvs_fail(KVS_ERR_INVALID_ARG, "at most 64 sequences per context (asked %d)",
                        p.n_seq_max);
    if (p.n_threads > 256) p.n_threads = 256;
    if (p.n_ctx > (1 << 24))
        return kvs_fail(KVS_ERR_INVALID_ARG, "context size %d is too large", p.n_ctx);
    struct kv_spec spec;
    enum kvs_status st = kv_spec_parse(p.kv_spec ? p.kv_spec : "full", &spec);
    if (st != KVS_OK) return st;
    if (p.n_ctx > hp->n_ctx_train)
        kvs_log(1, "context %d is longer than the model's training context %d", p.n_ctx,
                hp->n_ctx_train);
    ops_init();
    quant_init();

    kvs_context *c = calloc(1, sizeof *c);
    if (!c) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    c->m = m;
    c->p = p;
    c->base.spec = spec;
    c->p.kv_spec = c->base.spec.text;
    if (hp->head_dim > 256 && (spec.think || spec.kivi_bits || spec.mikv_low)) {
        free(c);
        return kvs_fail(KVS_ERR_UNSUPPORTED, "packed KV storage supports head_dim <= 256 (model has %d)",
                        hp->head_dim);
    }
    kv_pack_cfg_from_spec(&spec, hp->head_dim, &c->base.pack);
    c->n_ctx = p.n_ctx;
    c->n_batch = p.n_batch;
    c->t_max = p.n_batch > p.n_seq_max ? p.n_batch : p.n_seq_max;
    unsigned needs = kv_policy_needs(&spec);
    int qwin = kv_policy_qwin(&spec);
    if (p.keep_stats && qwin < KVS_STATS_QWIN) qwin = KVS_STATS_QWIN;
    kv_cache_init(&c->kv, hp->n_layer, hp->n_head_kv, hp->n_head, hp->head_dim,
                  (needs & KV_NEED_SLOT) || p.keep_stats, qwin);
    st = kv_policy_new(&spec, hp->n_layer, hp->n_head, hp->n_head_kv, hp->head_dim,
                       c->n_ctx + c->t_max + KV_CAP_STEP, kv_spec_entry_bytes(hp, &spec), &c->base.policy);
    if (st == KVS_OK) st = ensure_learned(c, &spec);
    if (st != KVS_OK) {
        kvs_context_free(c);
        return st;
    }
    if (c->base.policy) c->base.policy->learned = c->learned;
    /* a bounded cache: -c is its size, and sequences run past it (StreamingLLM's point) */
    c->base.max_past = c->n_ctx;
    int32_t held = c->base.policy ? bounded_entries(c->base.policy, c->t_max) : 0;
    if (held > 0 && held <= c->base.policy->cap_max) {
        c->base.max_past = KVS_PAST_MAX;
        c->base.held = held;
        if (held > c->n_ctx) c->n_ctx = held;
    }
    c->seqs = calloc((size_t)p.n_seq_max, sizeof *c->seqs);
    c->tp = threadpool_new(p.n_threads);

    size_t T = (size_t)c->t_max, d = (size_t)hp->n_embd, hd = (size_t)hp->head_dim;
    size_t nq = (size_t)hp->n_head * hd, nkv = (size_t)hp->n_head_kv * hd, ff = (size_t)hp->n_ff;
    size_t wide = nq > d ? nq : d;
    size_t g = (size_t)(hp->n_head / hp->n_head_kv);
    c->x = scratch(c, T * d * 4);
    c->xn = scratch(c, T * wide * 4);
    c->q = scratch(c, T * wide * 4);
    c->k = scratch(c, T * nkv * 4);
    c->v = scratch(c, T * nkv * 4);
    c->gate = scratch(c, T * ff * 4);
    c->up = scratch(c, T * ff * 4);
    c->rope_cs = scratch(c, T * hd * 4);
    c->inv_freq = scratch(c, hd / 2 * 4);
    c->att_s = scratch(c, (size_t)p.n_threads * ATT_TB * g * (size_t)c->n_ctx * 4);
    c->att_qo = scratch(c, (size_t)p.n_threads * 2 * ATT_TB * g * hd * 4);
    c->att_x = scratch(c, (size_t)p.n_threads * kv_attn_scratch_floats(ATT_TB * g, hd) * 4);
    c->att_part = scratch(c, T * (size_t)hp->n_head_kv * ATT_MAX_SPLIT * g * (hd + 2) * 4);
    c->att_units = scratch(c, T * (size_t)hp->n_head_kv * ATT_MAX_SPLIT * sizeof(struct att_unit_desc));
    /* activation rows, big enough for every encoding of the widest input */
    size_t widest = ff > wide ? ff : wide, rb = 0;
    int vdts[] = {QT_Q8_0, QT_Q8_1, QT_Q8_K};
    for (int i = 0; i < 3; i++) {
        size_t b = quant_row_bytes(vdts[i], (int64_t)kvs_pad(widest, 256));
        if (b > rb) rb = b;
    }
    for (int i = 1; i < N_ACT_SLOTS; i++) c->act[i] = scratch(c, T * rb);
    if (p.act_f32) {
        c->wrow_n = kvs_pad(widest, 16);
        c->wrow = scratch(c, (size_t)p.n_threads * c->wrow_n * 4);
    }
    bool ok = c->seqs && c->tp && c->x && c->xn && c->q && c->k && c->v && c->gate && c->up &&
              c->rope_cs && c->inv_freq && c->att_s && c->att_qo && c->att_x && c->att_part && c->att_units &&
              (!p.act_f32 || c->wrow);
    for (int i = 1; i < N_ACT_SLOTS; i++) ok = ok && c->act[i];
    if (!ok) {
        kvs_context_free(c);
        return kvs_fail(KVS_ERR_NOMEM, "out of memory for the context scratch buffers");
    }
    if ((st = kv_policy_set_threads(c->base.policy, c->tp)) != KVS_OK) {
        kvs_context_free(c);
        return st;
    }
    for (size_t i = 0; i < hd / 2; i++)
        c->inv_freq[i] = (float)pow((double)hp->rope_theta, -2.0 * (double)i / (double)hd);
    c->kv.rope_inv_freq = c->inv_freq;
    c->kv.weighted = spec.wattn;
    c->kv.rope_neox = m->arch->rope == ROPE_NEOX;
    if (p.device == KVS_DEVICE_CUDA && (st = gpu_init(c)) != KVS_OK) {
        kvs_context_free(c);
        return st;
    }
    if (p.device != KVS_DEVICE_CPU && p.device != KVS_DEVICE_CUDA) {
        kvs_context_free(c);
        return kvs_fail(KVS_ERR_INVALID_ARG, "unknown device %d", p.device);
    }
    *out = c;
    return KVS_OK;
}

int kvs_context_n_threads(const kvs_context *c) { return threadpool_n_threads(c->tp); }

/* Attention-Gate's visibility window: the spec's window=, else the one trained into the file */
static int32_t gate_window(const kvs_context *c, const struct kv_spec *spec) {
    return spec->obs_window > 0 ? spec->obs_window : c->agate->window;
}

enum kvs_status kvs_seq_new(kvs_context *c, kvs_sequence **out) {
    *out = NULL;
    int slot = -1;
    for (int i = 0; i < c->p.n_seq_max && slot < 0; i++)
        if (!c->seqs[i]) slot = i;
    if (slot < 0)
        return kvs_fail(KVS_ERR_INVALID_ARG, "all %d sequence slots are in use (raise n_seq_max)",
                        c->p.n_seq_max);
    kvs_sequence *s = calloc(1, sizeof *s);
    if (!s) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    enum kvs_status st = kv_seq_new(&c->kv, &s->kv);
    if (st != KVS_OK) {
        free(s);
        return st;
    }
    kv_seq_set_pack(s->kv, &c->base.pack); /* a fresh sequence holds nothing: cannot fail */
    s->kv->acc_learned = kv_policy_needs(&c->base.spec) & KV_NEED_LEARNED;
    if (c->base.spec.method == KV_AGATE &&
        !kv_seq_set_gate(s->kv, c->agate->hidden, c->agate->gd, c->base.spec.gate_tau, gate_window(c, &c->base.spec))) {
        kv_seq_free(s->kv);
        free(s);
        return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    }
    s->prof = &c->base;
    s->slot = slot;
    s->gpu = c->gpu;
    if ((st = gpu_slot_policy(c, s, &c->base.spec, s->kv->with_acc)) != KVS_OK) {
        kv_seq_free(s->kv);
        free(s);
        return st;
    }
    c->seqs[slot] = s;
    *out = s;
    return KVS_OK;
}

/* The statistic slot a spec's scorer needs: none, accumulated attention, or learned scores (the
 * sequence must hold no capacity, as after kv_seq_clear). */
static void seq_set_slot(kvs_context *c, kvs_sequence *s, const struct kv_spec *spec) {
    unsigned needs = kv_policy_needs(spec);
    kv_seq_set_acc(s->kv, needs & KV_NEED_SLOT);
    s->kv->acc_learned = needs & KV_NEED_LEARNED;
    bool gate = spec->method == KV_AGATE;
    /* (empty: only the gate's small table can fail to allocate; the sequence then has no gate
     * and forward() refuses it) */
    (void)kv_seq_set_gate(s->kv, gate ? c->agate->hidden : 0, gate ? c->agate->gd : 0, spec->gate_tau,
                          gate ? gate_window(c, spec) : 0);
}

static void profile_release(kvs_context *c, struct kv_profile *pr) {
    if (!pr || pr == &c->base || --pr->refs > 0) return;
    for (int i = 0; i < KVS_MAX_PROFILES; i++)
        if (c->prof[i] == pr) c->prof[i] = NULL;
    kv_policy_free(pr->policy);
    free(pr);
}

void kvs_seq_free(kvs_context *c, kvs_sequence *s) {
    if (!s) return;
    kvs_seq_drop_prefix(s);
    free(s->chain);
    free(s->segs);
    if (s->rec) free(s->rec->mass);
    free(s->rec);
    profile_release(c, s->prof);
    if (c->gpu) cuda_seq_clear(c->gpu, s->slot);
    c->seqs[s->slot] = NULL;
    kv_seq_free(s->kv);
    free(s);
}

int kvs_seq_n_past(const kvs_sequence *s) { return s->n_past; }

int kvs_context_max_tokens(const kvs_context *c) { return c->base.max_past; }

void kvs_seq_reset(kvs_context *c, kvs_sequence *s) {
    if (c->gpu) cuda_seq_clear(c->gpu, s->slot);
    kvs_seq_drop_prefix(s);
    if (s->rec) free(s->rec->mass);
    free(s->rec);
    s->rec = NULL;
    kv_seq_clear(s->kv);
    s->n_past = 0;
    s->pos_shift = 0;
}

enum kvs_status kvs_eval(kvs_context *c, kvs_sequence *s, const int32_t *tokens, int n,
                         bool all_logits, float *logits, kvs_progress_fn progress, void *user) {
    if (n <= 0) return kvs_fail(KVS_ERR_INVALID_ARG, "no tokens to evaluate");
    int max_past = s->prof->max_past;
    if (n > max_past - s->n_past)
        return kvs_fail(KVS_ERR_CONTEXT_FULL, "%d tokens would exceed the context of %d (%d "
                        "already used)", n, max_past, s->n_past);
    int n_vocab = c->m->hp.n_vocab;
    int32_t pos[KVS_T_MAX];
    int rows[KVS_T_MAX];
    uint8_t ph[KVS_T_MAX];
    kvs_sequence *seq[KVS_T_MAX];
    for (int done = 0; done < n;) {
        int T = n - done < c->n_batch ? n - done : c->n_batch;
        enum fwd_phase p = n == 1 ? FWD_DECODE : done + T == n ? FWD_PREFILL_LAST : FWD_PREFILL;
        for (int t = 0; t < T; t++) {
            pos[t] = s->n_past + t;
            seq[t] = s;
            rows[t] = t;
            ph[t] = (uint8_t)p;
        }
        int n_out = 0;
        float *dst = NULL;
        if (logits && all_logits) {
            n_out = T;
            dst = logits + (size_t)done * n_vocab;
        } else if (logits && done + T == n) {
            n_out = 1;
            rows[0] = T - 1;
            dst = logits;
        }
        enum kvs_status st = forward(c, tokens + done, pos, seq, T, rows, n_out, dst, ph);
        if (st != KVS_OK) return st;
        s->n_past += T;
        done += T;
        if (progress && !progress(done, n, user))
            return kvs_fail(KVS_ERR_INVALID_ARG, "aborted");
    }
    return KVS_OK;
}

/* room in s's recording for positions up to end (exclusive) */
static enum kvs_status rec_reserve(kvs_context *c, kvs_sequence *s, int32_t end) {
    struct att_rec *r = s->rec;
    if (end - r->from <= r->cap) return KVS_OK;
    int32_t cap = r->cap ? r->cap : 256;
    while (cap < end - r->from) cap *= 2;
    int H = c->m->hp.n_head_kv, nb = r->n_bounds + 1;
    float *m = calloc((size_t)H * cap * nb, sizeof(float));
    if (!m) return kvs_fail(KVS_ERR_NOMEM, "out of memory for the attention recording");
    for (int h = 0; h < H; h++)
        if (r->cap) memcpy(m + (size_t)h * cap * nb, r->mass + (size_t)h * r->cap * nb,
                           sizeof(float) * (size_t)r->cap * nb);
    free(r->mass);
    r->mass = m, r->cap = cap;
    return KVS_OK;
}

enum kvs_status kvs_seq_record_attention(kvs_context *c, kvs_sequence *s, const int32_t *bounds,
                                         int n_bounds) {
    enum kvs_status gst_ = kvs_gpu_refuse(c, "recording attention");
    if (gst_ != KVS_OK) return gst_;
    if (!c || !s || c->seqs[s->slot] != s)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_record_attention: the sequence does not "
                        "belong to this context");
    if (n_bounds < 0 || n_bounds > 15 || (n_bounds && !bounds))
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_record_attention: 0 to 15 bounds");
    for (int i = 1; i < n_bounds; i++)
        if (bounds[i] <= bounds[i - 1])
            return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_record_attention: bounds must ascend");
    if (s->kv->acc_learned)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_record_attention: the sequence's statistic "
                        "slot holds learned scores (locret)");
    if (!kv_seq_set_acc(s->kv, true))
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_record_attention: the sequence already holds "
                        "entries of its own");
    struct att_rec *r = calloc(1, sizeof *r);
    if (!r) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    r->from = s->n_past;
    r->n_bounds = n_bounds;
    if (n_bounds) memcpy(r->bounds, bounds, sizeof(int32_t) * (size_t)n_bounds);
    if (s->rec) free(s->rec->mass);
    free(s->rec);
    s->rec = r;
    return KVS_OK;
}

void kvs_seq_record_stop(kvs_context *c, kvs_sequence *s, bool keep_stats) {
    if (!c || !s || !s->rec) return;
    free(s->rec->mass);
    free(s->rec);
    s->rec = NULL;
    if (!keep_stats && !(kv_policy_needs(&s->prof->spec) & KV_NEED_SLOT)) kv_seq_drop_acc(s->kv);
}

int kvs_seq_recorded_attention(const kvs_sequence *s, int32_t first, int n_tok, float *out) {
    const struct att_rec *r = s->rec;
    if (!r || first < r->from || n_tok < 0 || first + n_tok > s->n_past || first + n_tok - r->from > r->cap)
        return -1;
    int H = s->kv->owner->n_head_kv, nb = r->n_bounds + 1;
    for (int t = 0; t < n_tok; t++)
        for (int h = 0; h < H; h++)
            memcpy(out + ((size_t)t * H + h) * nb,
                   r->mass + ((size_t)h * r->cap + (size_t)(first - r->from + t)) * nb,
                   sizeof(float) * (size_t)nb);
    return nb;
}

int kvs_context_step_tokens(const kvs_context *c) { return c->t_max; }

enum kvs_status kvs_step(kvs_context *c, const struct kvs_batch_item *items, int n_items) {
    if (!c || !items || n_items <= 0)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_step: no items");
    int T = 0, n_out = 0;
    for (int i = 0; i < n_items; i++) {
        const struct kvs_batch_item *it = &items[i];
        if (!it->seq || !it->tokens || it->n <= 0)
            return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_step: item %d has no sequence or tokens", i);
        if (it->decode && it->n != 1)
            return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_step: decode item %d feeds %d tokens (1 "
                            "allowed)", i, it->n);
        if (it->n > c->t_max - T)
            return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_step: more than %d tokens in one step",
                            c->t_max);
        T += it->n;
        if (c->seqs[it->seq->slot] != it->seq)
            return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_step: item %d's sequence does not belong to "
                            "this context", i);
        for (int j = 0; j < i; j++)
            if (items[j].seq == it->seq)
                return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_step: a sequence appears twice in one "
                                "step (items %d and %d)", j, i);
        if (it->recompute) {
            if (it->decode || !it->pos)
                return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_step: recompute item %d needs positions "
                                "and is no decode step", i);
            for (int k = 0; k < it->n; k++)
                if (it->pos[k] < 0 || it->pos[k] >= it->seq->n_past || (k && it->pos[k] <= it->pos[k - 1]) ||
                    it->pos[k] < it->seq->n_prefix || kv_seq_packed_at(it->seq->kv, it->pos[k]))
                    return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_step: recompute item %d: position %d "
                                    "is not one of the sequence's own fp16 entries (ascending, "
                                    "from %d, below %d)", i, it->pos[k], it->seq->n_prefix,
                                    it->seq->n_past);
        } else if (it->n > it->seq->prof->max_past - it->seq->n_past)
            return kvs_fail(KVS_ERR_CONTEXT_FULL, "kvs_step: item %d: %d tokens would exceed the "
                            "context of %d (%d already used)", i, it->n, it->seq->prof->max_past,
                            it->seq->n_past);
        if (it->logits) n_out++;
    }
    if (n_out > 64) return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_step: at most 64 items with logits");
    int32_t tok[KVS_T_MAX], pos[KVS_T_MAX];
    int rows[64];
    uint8_t ph[KVS_T_MAX];
    kvs_sequence *seq[KVS_T_MAX];
    int t = 0, r = 0;
    enum kvs_status st0;
    for (int i = 0; i < n_items; i++) {
        const struct kvs_batch_item *it = &items[i];
        enum fwd_phase p = it->recompute ? FWD_RECOMPUTE : it->decode ? FWD_DECODE
                           : it->hold ? FWD_HOLD : it->prompt_end ? FWD_PREFILL_LAST : FWD_PREFILL;
        if (it->seq->rec && (st0 = rec_reserve(c, it->seq, it->seq->n_past + it->n)) != KVS_OK)
            return st0;
        for (int k = 0; k < it->n; k++, t++) {
            tok[t] = it->tokens[k];
            pos[t] = it->recompute ? it->pos[k] : it->seq->n_past + k;
            seq[t] = it->seq;
            ph[t] = (uint8_t)p;
        }
        if (it->logits) rows[r++] = t - 1;
    }
    /* logits rows land in the context's scratch order; copy each to its item */
    float *lg = NULL;
    size_t nv = (size_t)c->m->hp.n_vocab;
    if (n_out) {
        if (c->step_logits_n < (size_t)n_out * nv) {
            float *nl = realloc(c->step_logits, (size_t)n_out * nv * sizeof(float));
            if (!nl) return kvs_fail(KVS_ERR_NOMEM, "out of memory for the step's logits");
            c->step_logits = nl;
            c->step_logits_n = (size_t)n_out * nv;
        }
        lg = c->step_logits;
    }
    enum kvs_status st = forward(c, tok, pos, seq, T, rows, n_out, lg, ph);
    if (st != KVS_OK) return st;
    r = 0;
    for (int i = 0; i < n_items; i++) {
        if (!items[i].recompute) items[i].seq->n_past += items[i].n;
        if (items[i].logits) memcpy(items[i].logits, lg + (size_t)r++ * nv, nv * sizeof(float));
    }
    return KVS_OK;
}

enum kvs_status kvs_eval_batch(kvs_context *c, kvs_sequence *const *seqs, const int32_t *tokens,
                               int n_seq, float *logits) {
    if (n_seq <= 0 || n_seq > c->t_max)
        return kvs_fail(KVS_ERR_INVALID_ARG, "batch of %d sequences (1..%d allowed)", n_seq,
                        c->t_max);
    int32_t pos[KVS_T_MAX];
    int rows[KVS_T_MAX];
    uint8_t ph[KVS_T_MAX];
    for (int i = 0; i < n_seq; i++) {
        for (int j = 0; j < i; j++)
            if (seqs[j] == seqs[i])
                return kvs_fail(KVS_ERR_INVALID_ARG, "sequence appears twice in one batch");
        if (seqs[i]->n_past >= seqs[i]->prof->max_past)
            return kvs_fail(KVS_ERR_CONTEXT_FULL, "sequence %d is at the context limit %d", i,
                            seqs[i]->prof->max_past);
        pos[i] = seqs[i]->n_past;
        rows[i] = i;
        ph[i] = FWD_DECODE;
    }
    enum kvs_status st = forward(c, tokens, pos, seqs, n_seq, rows, logits ? n_seq : 0, logits, ph);
    if (st != KVS_OK) return st;
    for (int i = 0; i < n_seq; i++) seqs[i]->n_past++;
    return KVS_OK;
}

void kvs_context_plan_stats(const kvs_context *c, double *seconds, uint64_t *layers) {
    if (seconds) *seconds = c->plan_s;
    if (layers) *layers = c->plan_layers;
}

int kvs_context_gpu_time_split(const kvs_context *c, const char **names, double *seconds, int max) {
    return c->gpu ? cuda_prof_read(c->gpu, names, seconds, max) : 0;
}

void kvs_context_mem(const kvs_context *c, struct kvs_mem_stats *ms) {
    if (c->gpu) { /* device memory: the caches and the GPU's scratch beside the host's */
        uint64_t sc;
        cuda_mem(c->gpu, NULL, &ms->kv_bytes, &ms->kv_bytes_peak, &sc);
        ms->scratch_bytes = c->scratch_bytes + sc;
        return;
    }
    ms->kv_bytes = c->kv.bytes;
    ms->kv_bytes_peak = c->kv.bytes_peak;
    ms->scratch_bytes = c->scratch_bytes;
}

enum kvs_status kvs_seq_copy(kvs_context *cd, kvs_sequence *dst, const kvs_context *cs,
                             const kvs_sequence *src) {
    if (cd->gpu || cs->gpu) { /* GPU contexts of one model: a device copy of the cache */
        if (!cd->gpu || !cs->gpu) return kvs_gpu_refuse(cd->gpu ? cd : cs, "copying a sequence between the CPU and the GPU");
        if (cd->m != cs->m)
            return kvs_fail(KVS_ERR_INVALID_ARG, "cannot copy a sequence between contexts of different models");
        if (src->n_past > dst->prof->max_past)
            return kvs_fail(KVS_ERR_INVALID_ARG, "the sequence holds %d tokens, more than the target context of %d",
                            src->n_past, dst->prof->max_past);
        if (src->prefix) return kvs_gpu_refuse(cd, "copying a sequence with a shared prefix");
        enum kvs_status st = cuda_seq_copy(cd->gpu, dst->slot, cs->gpu, src->slot);
        if (st != KVS_OK) { /* (dst was cleared first: it is empty) */
            dst->n_past = 0;
            dst->pos_shift = 0;
            return st == KVS_ERR_CONTEXT_FULL ? kvs_fail(KVS_ERR_INVALID_ARG, "%s", kvs_last_error()) : st;
        }
        dst->n_past = src->n_past;
        dst->pos_shift = src->pos_shift; /* (streaming pos=cache: the RoPE shift the entries have) */
        dst->kv->pin = src->kv->pin; /* (the pinned positions, as kv_seq_copy keeps them) */
        return KVS_OK;
    }
    if (cd->m != cs->m)
        return kvs_fail(KVS_ERR_INVALID_ARG, "cannot copy a sequence between contexts of "
                        "different models");
    if (src->n_past > dst->prof->max_past)
        return kvs_fail(KVS_ERR_INVALID_ARG, "the sequence holds %d tokens, more than the "
                        "target context of %d", src->n_past, dst->prof->max_past);
    if (dst == src) return KVS_OK;
    if (dst->kv->acc_learned && !src->kv->acc_learned && src->n_past > 0)
        return kvs_fail(KVS_ERR_INVALID_ARG, "the target sequence runs locret, whose scores are made "
                        "when tokens are computed, and the source has none (run the source under "
                        "locret; locret:ratio=1 keeps every entry)");
    if (dst->kv->gate_w != src->kv->gate_w && src->n_past > 0)
        return kvs_fail(KVS_ERR_INVALID_ARG, "the %s sequence runs agate and the %s does not: the "
                        "gate's own cache cannot be made afterwards", dst->kv->gate_w ? "target" : "source",
                        dst->kv->gate_w ? "source" : "target");
    if (src->prefix && cd != cs)
        return kvs_fail(KVS_ERR_INVALID_ARG, "cannot copy a sequence that starts from a shared "
                        "prefix to another context");
    kvs_seq_drop_prefix(dst);
    enum kvs_status st = kv_seq_copy(dst->kv, src->kv);
    if (st == KVS_OK && src->prefix) {
        kvs_prefix_ref(src->prefix);
        dst->prefix = src->prefix;
        dst->n_prefix = src->n_prefix;
    }
    if (st != KVS_OK) {
        dst->n_past = 0;
        dst->pos_shift = 0;
        return st;
    }
    dst->n_past = src->n_past;
    dst->pos_shift = src->pos_shift;
    return KVS_OK;
}


/* ---- per-sequence policies ---------------------------------------------------------------- */

/* Fill a profile for spec (policy, storage, max_past) in context c, whose n_ctx is fixed: a
 * bounded policy runs past n_ctx only when its cache fits in it. */
static enum kvs_status profile_init(kvs_context *c, const struct kv_spec *spec, struct kv_profile *pr) {
    const struct hparams *hp = &c->m->hp;
    memset(pr, 0, sizeof *pr);
    pr->spec = *spec;
    if (hp->head_dim > 256 && (spec->think || spec->kivi_bits || spec->mikv_low))
        return kvs_fail(KVS_ERR_UNSUPPORTED, "packed KV storage supports head_dim <= 256 (model "
                        "has %d)", hp->head_dim);
    kv_pack_cfg_from_spec(spec, hp->head_dim, &pr->pack);
    enum kvs_status st = kv_policy_new(spec, hp->n_layer, hp->n_head, hp->n_head_kv, hp->head_dim,
                                       c->n_ctx + c->t_max + KV_CAP_STEP,
                                       kv_spec_entry_bytes(hp, spec), &pr->policy);
    if (st == KVS_OK) st = ensure_learned(c, spec);
    if (st == KVS_OK) st = kv_policy_set_threads(pr->policy, c->tp);
    if (st != KVS_OK) return st;
    if (pr->policy) pr->policy->learned = c->learned;
    pr->max_past = c->n_ctx;
    int32_t held = pr->policy ? bounded_entries(pr->policy, c->t_max) : 0;
    if (held > 0 && held <= c->n_ctx) pr->max_past = KVS_PAST_MAX, pr->held = held;
    return KVS_OK;
}

enum kvs_status kvs_seq_set_kv(kvs_context *c, kvs_sequence *s, const char *kv_spec) {
    if (!c || !s || c->seqs[s->slot] != s)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_set_kv: the sequence does not belong to "
                        "this context");
    if (s->n_past || s->prefix)
        return kvs_fail(KVS_ERR_INVALID_ARG, "a sequence's KV policy can only be set while it is "
                        "empty (it holds %d tokens)", s->n_past);
    struct kv_spec spec;
    if (!kv_spec || !*kv_spec) spec = c->base.spec;
    else {
        enum kvs_status st = kv_spec_parse(kv_spec, &spec);
        if (st != KVS_OK) return st;
    }
    if (c->gpu && !gpu_runs(&spec))
        return kvs_gpu_refuse(c, "a KV policy other than " GPU_POLICIES);
    int qwin = kv_policy_qwin(&spec);
    if (!c->gpu && (kv_policy_needs(&spec) & KV_NEED_QUERIES) && c->kv.qwin < qwin)
        return kvs_fail(KVS_ERR_INVALID_ARG, "'%s' needs the last %d queries; this context keeps "
                        "%d (create it with keep_stats)", spec.text, qwin, c->kv.qwin);
    struct kv_profile *pr = NULL;
    if (!strcmp(spec.text, c->base.spec.text)) pr = &c->base;
    for (int i = 0; i < KVS_MAX_PROFILES && !pr; i++)
        if (c->prof[i] && !strcmp(c->prof[i]->spec.text, spec.text)) pr = c->prof[i];
    if (pr == s->prof) { /* same profile: only the statistics follow the spec (see below) */
        unsigned needs = kv_policy_needs(&spec);
        if (s->kv->with_acc != !!(needs & KV_NEED_SLOT) || s->kv->acc_learned != !!(needs & KV_NEED_LEARNED)) {
            kv_seq_clear(s->kv);
            seq_set_slot(c, s, &spec);
        }
        return KVS_OK;
    }
    if (!pr) {
        int slot = -1;
        for (int i = 0; i < KVS_MAX_PROFILES && slot < 0; i++)
            if (!c->prof[i]) slot = i;
        /* all slots taken: s's own profile is freed below if s alone runs it */
        bool reuse = slot < 0 && s->prof != &c->base && s->prof->refs == 1;
        if (slot < 0 && !reuse)
            return kvs_fail(KVS_ERR_INVALID_ARG, "more than %d distinct KV policies at once",
                            KVS_MAX_PROFILES);
        pr = malloc(sizeof *pr);
        if (!pr) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
        enum kvs_status st = profile_init(c, &spec, pr);
        if (st != KVS_OK) {
            kv_policy_free(pr->policy);
            free(pr);
            return st;
        }
        if (reuse) {
            for (int i = 0; i < KVS_MAX_PROFILES; i++)
                if (c->prof[i] == s->prof) slot = i;
            profile_release(c, s->prof);
            s->prof = &c->base;
        }
        c->prof[slot] = pr;
    }
    enum kvs_status gst = gpu_slot_policy(c, s, &spec, false); /* (the slot is empty: only memory can fail) */
    if (gst != KVS_OK) return gst;
    /* empty (no capacity once cleared): these cannot fail */
    kv_seq_clear(s->kv);
    kv_seq_set_pack(s->kv, &pr->pack);
    seq_set_slot(c, s, &spec);
    if (pr != s->prof) {
        profile_release(c, s->prof);
        if (pr != &c->base) pr->refs++;
        s->prof = pr;
    }
    return KVS_OK;
}

enum kvs_status kvs_seq_keep_stats(kvs_context *c, kvs_sequence *s, bool on) {
    if (!c || !s || c->seqs[s->slot] != s)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_keep_stats: the sequence does not belong "
                        "to this context");
    if (s->n_past || s->prefix)
        return kvs_fail(KVS_ERR_INVALID_ARG, "a sequence's statistics can only be chosen while it "
                        "is empty (it holds %d tokens)", s->n_past);
    if (!on && (kv_policy_needs(&s->prof->spec) & KV_NEED_SLOT))
        return kvs_fail(KVS_ERR_INVALID_ARG, "'%s' needs its per-entry statistic (accumulated "
                        "attention or learned scores)",
                        s->prof->spec.text);
    if (on && !c->p.keep_stats)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_keep_stats: the context was not created "
                        "with keep_stats");
    if (s->kv->with_acc != on) {
        kv_seq_clear(s->kv);
        kv_seq_set_acc(s->kv, on);
        enum kvs_status st = gpu_slot_policy(c, s, &s->prof->spec, on);
        if (st != KVS_OK) return st;
    }
    return KVS_OK;
}

void kvs_seq_pin(kvs_context *c, kvs_sequence *s, int n_tokens) {
    (void)c;
    s->kv->pin = n_tokens > 0 ? n_tokens : 0;
}

const char *kvs_seq_kv(const kvs_context *c, const kvs_sequence *s) {
    (void)c;
    return s->prof->spec.text;
}

int kvs_seq_max_tokens(const kvs_context *c, const kvs_sequence *s) {
    (void)c;
    return s->prof->max_past;
}

/* A conservative bound of the bytes a head's entries take when e are held, h of them at most
 * hot (fp16) and the rest packed as pc says; plus one capacity step of rounding. */
static double head_bytes_bound(const struct kv_pack_cfg *pc, int hd, int64_t e, int64_t hot) {
    double f16 = (double)kv_entry_payload_bytes(hd);
    double pk = pc->on ? kv_pack_entry_bytes(pc, hd) : f16;
    if (hot > e) hot = e;
    double b = (double)hot * f16 + (double)(e - hot) * pk;
    return b + KV_CAP_STEP * f16 + (pc->on ? 2.0 * hd * sizeof(float) + hd + 64 : 0);
}

/* Attention-Gate's own cache for n tokens (every token, every layer), rounded up a step */
static int64_t gate_bytes_bound(const kvs_context *c, const struct kv_spec *spec, int64_t n) {
    if (spec->method != KV_AGATE || !c->agate) return 0;
    return (n + KV_CAP_STEP) * c->m->hp.n_layer * 4 * (int64_t)c->agate->gw;
}

int64_t kvs_kv_bytes_bound(const kvs_context *c, const char *kv_spec, int n_tokens) {
    struct kv_spec spec;
    if (!kv_spec || !*kv_spec) spec = c->base.spec;
    else if (kv_spec_parse(kv_spec, &spec) != KVS_OK) return -1;
    const struct hparams *hp = &c->m->hp;
    struct kv_profile pr;
    if (profile_init((kvs_context *)c, &spec, &pr) != KVS_OK) {
        kv_policy_free(pr.policy);
        return -1;
    }
    int64_t n = n_tokens < 0 ? 0 : n_tokens;
    if (pr.max_past != KVS_PAST_MAX && n > c->n_ctx) n = c->n_ctx;
    /* most entries a head holds: every token, unless the policy bounds the cache */
    int64_t e = n;
    int32_t held = pr.policy ? bounded_entries(pr.policy, c->t_max) : 0;
    if (held > 0 && held < e) e = held;
    /* hot (fp16) entries at most: KIVI's residual plus a chunk or a block being filled; ThinK
     * packs prompts only and MiKV demotes down to its budget, so both are priced as fp16 */
    int64_t hot = e;
    if (pr.pack.kivi && !spec.mikv_low) hot = pr.pack.resid + pr.pack.f.G + c->t_max;
    double per_head = head_bytes_bound(&pr.pack, hp->head_dim, e, hot);
    kv_policy_free(pr.policy);
    return (int64_t)(per_head * hp->n_layer * hp->n_head_kv) + gate_bytes_bound(c, &spec, n);
}

uint64_t kvs_seq_kv_bytes(const kvs_sequence *s) {
    if (s->gpu) return cuda_seq_kv_bytes(s->gpu, s->slot);
    return kv_seq_payload_bytes(s->kv) + kv_seq_gate_bytes(s->kv);
}

uint64_t kvs_seq_payload_bytes(const kvs_sequence *s) {
    if (!s->gpu) return kvs_seq_kv_bytes(s);
    const struct kv_cache *kc = s->kv->owner;
    uint64_t n = 0;
    for (int il = 0; il < kc->n_layer; il++) n += (uint64_t)cuda_seq_layer_entries(s->gpu, s->slot, il);
    return n * (uint64_t)kc->n_head_kv * kv_entry_payload_bytes(kc->head_dim);
}

void kvs_context_kv_peak_reset(kvs_context *c) {
    if (c->gpu) cuda_kv_peak_reset(c->gpu);
    else c->kv.bytes_peak = c->kv.bytes;
}

double kvs_seq_entries_per_head(const kvs_sequence *s) {
    if (s->gpu) {
        double n = 0;
        int nl = s->kv->owner->n_layer;
        for (int il = 0; il < nl; il++) n += cuda_seq_layer_entries(s->gpu, s->slot, il);
        return n / nl;
    }
    const struct kv_cache *c = s->kv->owner;
    int64_t n = 0;
    for (int il = 0; il < c->n_layer; il++)
        for (int ih = 0; ih < c->n_head_kv; ih++) n += kv_seq_head(s->kv, il, ih)->n;
    return (double)n / ((double)c->n_layer * c->n_head_kv);
}

double kvs_kv_bytes_per_token(const kvs_model *m, const char *kv_spec) {
    struct kv_spec spec;
    if (kv_spec_parse(kv_spec ? kv_spec : "", &spec) != KVS_OK) return -1;
    const struct hparams *hp = &m->hp;
    struct kv_pack_cfg pc;
    kv_pack_cfg_from_spec(&spec, hp->head_dim, &pc);
    return (double)hp->n_layer * hp->n_head_kv * kv_pack_entry_bytes(&pc, hp->head_dim);
}

int64_t kvs_kv_bytes_bound_decode(const kvs_context *c, const char *kv_spec, int n_prompt, int n_gen) {
    struct kv_spec spec;
    if (!kv_spec || !*kv_spec) spec = c->base.spec;
    else if (kv_spec_parse(kv_spec, &spec) != KVS_OK) return -1;
    if (n_prompt < 0 || n_gen < 0) return -1;
    const struct hparams *hp = &c->m->hp;
    struct kv_profile pr;
    if (profile_init((kvs_context *)c, &spec, &pr) != KVS_OK) {
        kv_policy_free(pr.policy);
        return -1;
    }
    int64_t n = (int64_t)n_prompt + n_gen;
    if (pr.max_past != KVS_PAST_MAX && n > c->n_ctx) n = c->n_ctx;
    int64_t e = n, hot = n;
    if (pr.policy && spec.alloc != KV_ALLOC_D2O && spec.merge != KV_MERGE_D2O) {
        /* after the prompt's compression a head holds its budget for the tokens seen, plus the
         * entries decoding adds before the next compression, plus the token attending; AdaKV
         * moves budget between the heads of a layer, not their sum (priced as the average) */
        int64_t b = 0;
        for (int il = 0; il < hp->n_layer; il++) {
            int64_t bl = kv_policy_budget(pr.policy, il, n);
            b = bl > b ? bl : b;
        }
        b += (spec.every > 0 ? spec.every : 1) + 1;
        if (spec.mikv_low) hot = b; /* MiKV keeps every token, demoting the rest */
        else e = b < e ? b : e;
    }
    if (pr.pack.kivi && !spec.mikv_low) hot = pr.pack.resid + pr.pack.f.G + 1;
    double per_head = head_bytes_bound(&pr.pack, hp->head_dim, e, hot);
    kv_policy_free(pr.policy);
    return (int64_t)(per_head * hp->n_layer * hp->n_head_kv) + gate_bytes_bound(c, &spec, n);
}
