/* compress.c — kvs_seq_compress: compress a sequence now under any spec, as that spec does at
 * the end of a prompt (kvpress style: one full prefill, many methods). Used by the API and by
 * prefix.c for compressed prefix nodes; depends on the store and the policies only. */
#include "engine.h"

/* On the GPU: a policy scored there, planned as at the end of a prompt on the device; the slot
 * must keep what the spec reads (a keep_stats context's do: accumulated attention, the last
 * KVS_STATS_QWIN queries). */
static enum kvs_status gpu_compress_now(kvs_context *c, kvs_sequence *s, const struct kv_spec *spec) {
    const struct hparams *hp = &c->m->hp;
    if (spec->method == KV_FULL && !spec->think && !spec->kivi_bits && !spec->mikv_low) return KVS_OK;
    if (!kv_policy_scored_elsewhere(spec))
        return kvs_fail(KVS_ERR_UNSUPPORTED, "compressing a sequence with '%s' is not available with --device cuda "
                        "(see kvs_kv_runs_on)", spec->text);
    unsigned needs = kv_policy_needs(spec);
    if (s->n_past > 0 && !cuda_seq_positions(c->gpu, s->slot, 0, 0))
        return kvs_fail(KVS_ERR_INVALID_ARG, "compressing with '%s' reads the entries' positions, which this "
                        "sequence does not keep (create its context with keep_stats)", spec->text);
    if ((needs & KV_NEED_ACC) && !s->kv->with_acc)
        return kvs_fail(KVS_ERR_INVALID_ARG, "'%s' needs accumulated attention, which this sequence does not keep "
                        "(create its context with keep_stats)", spec->text);
    int qwin = kvs_gpu_spec_qwin(spec);
    if (qwin > 0 && kvs_gpu_slot_qwin(c, &s->prof->spec) < qwin)
        return kvs_fail(KVS_ERR_INVALID_ARG, "'%s' needs the last %d queries; this sequence keeps %d (create its "
                        "context with keep_stats)", spec->text, qwin, kvs_gpu_slot_qwin(c, &s->prof->spec));
    struct kv_policy *pol = NULL;
    enum kvs_status st = kv_policy_new(spec, hp->n_layer, hp->n_head, hp->n_head_kv, hp->head_dim,
                                       c->n_ctx + c->t_max + KV_CAP_STEP, kv_spec_entry_bytes(hp, spec), &pol);
    if (st == KVS_OK) st = kvs_gpu_plan(c, s, pol, spec, 0, s->n_past);
    kv_policy_free(pol);
    return st;
}

enum kvs_status kvs_seq_compress(kvs_context *c, kvs_sequence *s, const char *kv_spec) {
    struct kv_spec spec;
    enum kvs_status st = kv_spec_parse(kv_spec ? kv_spec : "", &spec);
    if (st != KVS_OK) return st;
    if (c->gpu) return gpu_compress_now(c, s, &spec);
    const struct hparams *hp = &c->m->hp;
    struct kv_pack_cfg pc;
    kv_pack_cfg_from_spec(&spec, hp->head_dim, &pc);
    if (spec.method == KV_FULL && !pc.on) return KVS_OK;
    unsigned needs = kv_policy_needs(&spec);
    if ((needs & KV_NEED_ACC) && (!s->kv->with_acc || s->kv->acc_learned))
        return kvs_fail(KVS_ERR_INVALID_ARG, "'%s' needs accumulated attention, which this "
                        "context does not keep (create it with keep_stats)", spec.text);
    if ((needs & KV_NEED_LEARNED) && !s->kv->acc_learned)
        return kvs_fail(KVS_ERR_INVALID_ARG, "'%s' scores each token when it is computed; this "
                        "sequence was not run under locret (give its context or sequence a locret "
                        "spec, e.g. locret:ratio=1 to score without evicting)", spec.text);
    if (spec.method == KV_AGATE && !s->kv->gate_w)
        return kvs_fail(KVS_ERR_INVALID_ARG, "'%s' needs the gate's scores of each token, made when "
                        "it is computed; run the sequence under agate (agate:tau=0 keeps every entry)",
                        spec.text);
    if (spec.method != KV_AGATE && s->kv->gate_w && s->n_past > 0)
        return kvs_fail(KVS_ERR_INVALID_ARG, "the sequence runs agate: compress it with an agate spec%s", "");
    if ((needs & KV_NEED_QUERIES) && c->kv.qwin < kv_policy_qwin(&spec))
        return kvs_fail(KVS_ERR_INVALID_ARG, "'%s' needs the last %d queries; this context keeps "
                        "%d (create it with keep_stats)", spec.text, kv_policy_qwin(&spec),
                        c->kv.qwin);
    if (pc.on && hp->head_dim > 256)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "packed KV storage supports head_dim <= 256");
    if (pc.on) {
        st = kv_seq_set_pack(s->kv, &pc);
        if (st != KVS_OK) return st;
    }
    struct kv_policy *pol = NULL;
    st = kv_policy_new(&spec, hp->n_layer, hp->n_head, hp->n_head_kv, hp->head_dim,
                       c->n_ctx + c->t_max + KV_CAP_STEP, kv_spec_entry_bytes(hp, &spec), &pol);
    if (st != KVS_OK) return st;
    struct kv_plan plan = {0};
    int64_t n_seen = s->n_past;
    for (int il = 0; il < hp->n_layer; il++) {
        if (pc.on) kv_pack_prepare(s->kv, il);
        int32_t before = kv_seq_head(s->kv, il, 0)->n;
        if (pol && kv_policy_plan_layer(pol, s->kv, il, n_seen, 0, false, &plan)) {
            kv_seq_apply_plan(s->kv, il, &plan, spec.reindex);
            if (spec.reindex && il == hp->n_layer - 1)
                s->pos_shift += before - kv_seq_head(s->kv, il, 0)->n;
        }
        if (pc.on && (st = kv_seq_pack_layer(s->kv, il, true)) != KVS_OK) break;
    }
    kv_policy_free(pol);
    return st;
}
