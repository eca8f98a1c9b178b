/* blend.c — CacheBlend's check for chunk reuse (Yao et al., arXiv 2405.16444; the server's
 * "chunk_reuse": "cacheblend"): a chunk's placed tokens are run through layers 0..check_layer as a
 * recompute item in their new context; forward.c stops after that layer and writes each token's
 * value deviation from the placed (cached) value into c->probe_dev. The caller recomputes the
 * tokens that deviate most. On its own file: it drives kvs_step (engine.c), which uses prefix.c,
 * so it can live in neither without a cycle or kvs_step inlined into it. */
#include "engine.h"

#include <string.h>

enum kvs_status kvs_seq_chunk_deviation(kvs_context *c, kvs_sequence *s, const int32_t *tokens,
                                        const int32_t *pos, int n, int check_layer, float *dev) {
    enum kvs_status gst_ = kvs_gpu_refuse(c, "measuring chunk deviations (Cache-Craft)");
    if (gst_ != KVS_OK) return gst_;
    if (!c || !s || !tokens || !pos || !dev || n < 1)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_chunk_deviation: missing arguments");
    if (check_layer < 0 || check_layer >= c->m->hp.n_layer)
        return kvs_fail(KVS_ERR_INVALID_ARG, "kvs_seq_chunk_deviation: check layer %d outside "
                        "[0, %d)", check_layer, c->m->hp.n_layer);
    memset(dev, 0, sizeof(float) * (size_t)n);
    enum kvs_status st = KVS_OK;
    for (int i = 0; i < n && st == KVS_OK; i += c->t_max) {
        int k = n - i < c->t_max ? n - i : c->t_max;
        struct kvs_batch_item it = {.seq = s, .tokens = tokens + i, .n = k, .recompute = true,
                                    .pos = pos + i};
        c->probe_dev = dev + i, c->probe_layer = check_layer;
        st = kvs_step(c, &it, 1);
        c->probe_dev = NULL;
    }
    return st;
}
