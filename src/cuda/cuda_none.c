/* cuda_none.c — the CUDA backend's entry points in a build without CUDA (the default `make`):
 * every one that would need a GPU fails with a message that says how to get one. `make cuda`
 * links src/cuda/cuda.cu instead. */
#include "cuda.h"
#include "../base.h"

static enum kvs_status no_cuda(void) {
    return kvs_fail(KVS_ERR_UNSUPPORTED, "--device cuda: this kvsieve was built without CUDA; "
                    "build it with `make cuda` (needs nvcc) and run build/cuda/kvsieve");
}

bool cuda_built(void) { return false; }
bool cuda_type_supported(int type) { (void)type; return false; }

enum kvs_status cuda_ctx_new(const struct cuda_model_desc *m, int n_ctx, int t_max, int n_seq,
                             struct cuda_ctx **out) {
    (void)m, (void)n_ctx, (void)t_max, (void)n_seq;
    *out = NULL;
    return no_cuda();
}
void cuda_ctx_free(struct cuda_ctx *g) { (void)g; }
const char *cuda_device_name(const struct cuda_ctx *g) { (void)g; return "none"; }
void cuda_seq_clear(struct cuda_ctx *g, int slot) { (void)g, (void)slot; }
uint64_t cuda_seq_kv_bytes(const struct cuda_ctx *g, int slot) { (void)g, (void)slot; return 0; }
void cuda_mem(const struct cuda_ctx *g, uint64_t *weights, uint64_t *kv, uint64_t *kv_peak,
              uint64_t *scratch) {
    (void)g;
    if (weights) *weights = 0;
    if (kv) *kv = 0;
    if (kv_peak) *kv_peak = 0;
    if (scratch) *scratch = 0;
}
enum kvs_status cuda_forward(struct cuda_ctx *g, const int32_t *tokens, const int32_t *pos,
                             const int *slot, int T, const int *out_rows, int n_out, float *logits) {
    (void)g, (void)tokens, (void)pos, (void)slot, (void)T, (void)out_rows, (void)n_out, (void)logits;
    return no_cuda();
}
enum kvs_status cuda_seq_copy(struct cuda_ctx *g, int dst, const struct cuda_ctx *gs, int src) {
    (void)g, (void)dst, (void)gs, (void)src;
    return no_cuda();
}
uint64_t cuda_device_free_bytes(void) { return 0; }
void cuda_kv_peak_reset(struct cuda_ctx *g) { (void)g; }
void cuda_use_graphs(struct cuda_ctx *g, bool on) { (void)g, (void)on; }
int cuda_prof_read(const struct cuda_ctx *g, const char **names, double *secs, int max) {
    (void)g, (void)names, (void)secs, (void)max;
    return 0;
}
double cuda_bandwidth_gb_s(struct cuda_ctx *g) { (void)g; return -1; }
enum kvs_status cuda_host_deq8(int type, const void *row, size_t row_bytes, int64_t cols, int u, int p,
                               float *out) {
    (void)type, (void)row, (void)row_bytes, (void)cols, (void)u, (void)p, (void)out;
    return no_cuda();
}
enum kvs_status cuda_test_matmul(int type, const void *W, size_t row_bytes, int64_t n_rows,
                                 int64_t n_cols, const float *x, int T, int n_lone, float *y) {
    (void)type, (void)W, (void)row_bytes, (void)n_rows, (void)n_cols, (void)x, (void)T, (void)n_lone, (void)y;
    return no_cuda();
}
enum kvs_status cuda_seq_set_policy(struct cuda_ctx *g, int slot, int qwin, bool positions, bool acc) {
    (void)g, (void)slot, (void)qwin, (void)positions, (void)acc;
    return no_cuda();
}
enum kvs_status cuda_seq_acc(struct cuda_ctx *g, int slot, int n_layers, const int *layers, float *out, size_t stride) {
    (void)g, (void)slot, (void)n_layers, (void)layers, (void)out, (void)stride;
    return no_cuda();
}
void cuda_seq_set_rope_shift(struct cuda_ctx *g, int slot, int32_t shift) { (void)g, (void)slot, (void)shift; }
enum kvs_status cuda_seq_key_sq(struct cuda_ctx *g, int slot, int n_layers, const int *layers, float *out,
                                size_t stride) {
    (void)g, (void)slot, (void)n_layers, (void)layers, (void)out, (void)stride;
    return no_cuda();
}
int cuda_seq_layer_entries(const struct cuda_ctx *g, int slot, int layer) { (void)g, (void)slot, (void)layer; return 0; }
const int32_t *cuda_seq_positions(const struct cuda_ctx *g, int slot, int layer, int head) {
    (void)g, (void)slot, (void)layer, (void)head;
    return NULL;
}
int cuda_seq_queries(const struct cuda_ctx *g, int slot, int32_t *qpos, int max) {
    (void)g, (void)slot, (void)qpos, (void)max;
    return 0;
}
enum kvs_status cuda_seq_score_window(struct cuda_ctx *g, int slot, int n_layers, const int *layers,
                                      const int32_t *vis, int nq, bool agg_max, float *out, size_t stride) {
    (void)g, (void)slot, (void)n_layers, (void)layers, (void)vis, (void)nq, (void)agg_max, (void)out, (void)stride;
    return no_cuda();
}
enum kvs_status cuda_seq_compact(struct cuda_ctx *g, int slot, const int32_t *const *keep, const int32_t *n_keep,
                                 int kstride, bool reindex) {
    (void)g, (void)slot, (void)keep, (void)n_keep, (void)kstride, (void)reindex;
    return no_cuda();
}
