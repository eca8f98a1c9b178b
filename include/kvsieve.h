/* kvsieve.h — the public API of kvsieve, an LLM inference engine whose KV cache is a budgeted,
 * compressible store.
 *
 * Ownership: a kvs_model owns its mmapped weights and tokenizer; a kvs_context (run state: thread
 * pool, scratch buffers, KV store) borrows a model that must outlive it; a kvs_sequence belongs to
 * its context and is freed with it if not earlier. Every function that can fail returns an
 * enum kvs_status; kvs_last_error() then gives a one-line message for the calling thread.
 * Nothing here prints to stdout or exits the process.
 */
#ifndef KVSIEVE_H
#define KVSIEVE_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVS_API_VERSION 1

enum kvs_status {
    KVS_OK = 0,
    KVS_ERR_IO = 1,           /* cannot open/read/map a file */
    KVS_ERR_FORMAT = 2,       /* malformed or truncated file */
    KVS_ERR_UNSUPPORTED = 3,  /* valid file, but a type/architecture we do not run */
    KVS_ERR_NOMEM = 4,
    KVS_ERR_INVALID_ARG = 5,  /* bad parameter, bad --kv spec, bad request */
    KVS_ERR_CONTEXT_FULL = 6, /* tokens would exceed the context size */
    KVS_ERR_INTERNAL = 7,
};

const char *kvs_status_str(enum kvs_status st);
const char *kvs_last_error(void); /* message of the calling thread's last failure */

/* Log sink for warnings and progress (level 0 error .. 3 debug); NULL restores stderr. */
typedef void (*kvs_log_fn)(int level, const char *msg, void *user);
void kvs_set_log_callback(kvs_log_fn fn, void *user);
void kvs_set_log_level(int max_level);

typedef struct kvs_model kvs_model;
typedef struct kvs_context kvs_context;
typedef struct kvs_sequence kvs_sequence;

/* ---- model ------------------------------------------------------------------------------ */

struct kvs_model_params {
    bool prefault; /* touch all weight pages at load (MAP_POPULATE) */
    /* Default on. Copy the Q4_0/Q4_1/Q8_0/Q4_K/Q6_K weight matrices at load into the fast
     * kernels' tile layout (8 rows interleaved, about the size of the originals: packed_bytes in
     * kvs_model_info) and read them from there: one contiguous stream per 8 rows in decode, no
     * tile rebuilt per product in batches. The originals' pages are given back to the file
     * mapping (MADV_DONTNEED), so RSS does not double. Costs load time (Qwen2.5-1.5B: about
     * 1.6 s on 2 cores). Results are bit-identical with it off. Other types are not packed. */
    bool pack;
};
struct kvs_model_params kvs_model_params_default(void);

enum kvs_status kvs_model_load(const char *path, const struct kvs_model_params *p,
                               kvs_model **out);
void kvs_model_free(kvs_model *m);

struct kvs_model_info {
    const char *arch;   /* "llama", "qwen2" */
    const char *name;   /* general.name or "" */
    int n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab, n_ctx_train;
    float rope_theta, norm_eps;
    bool tied_output, qkv_bias;
    int32_t bos_id, eos_id, eot_id; /* -1 if absent */
    uint64_t n_params;
    uint64_t weight_bytes;       /* bytes of tensor data */
    uint64_t packed_bytes;       /* bytes of the packed copies (kvs_model_params.pack), else 0 */
    uint64_t kv_bytes_per_token; /* fp16 K+V over all layers and KV heads */
    int gguf_version;
    const char *file_type;       /* dominant weight type, e.g. "Q4_1" */
};
void kvs_model_get_info(const kvs_model *m, struct kvs_model_info *info);

/* Tensor directory, for `kvsieve info`. Returns false when i is out of range. */
struct kvs_tensor_info { const char *name; const char *type; int n_dims; int64_t dims[4];
                         uint64_t bytes; };
int kvs_model_n_tensors(const kvs_model *m);
bool kvs_model_tensor(const kvs_model *m, int i, struct kvs_tensor_info *ti);

/* ---- tokenizer -------------------------------------------------------------------------- */

/* Returns the token count, or -(needed) if more than max_out tokens would be produced. */
int kvs_tokenize(const kvs_model *m, const char *text, size_t len, bool add_bos,
                 bool parse_special, int32_t *out, int max_out);
/* Raw bytes of one token; returns the length (may exceed size; then truncated). */
size_t kvs_token_piece(const kvs_model *m, int32_t tok, bool special, char *buf, size_t size);
bool kvs_token_is_eog(const kvs_model *m, int32_t tok); /* end of generation (eos/eot/im_end) */

/* Streaming detokenizer that yields only whole UTF-8 sequences. */
struct kvs_detok { unsigned char pend[8]; int n_pend; };
size_t kvs_detok_push(const kvs_model *m, struct kvs_detok *d, int32_t tok, char *out,
                      size_t size);
size_t kvs_detok_flush(struct kvs_detok *d, char *out, size_t size);

struct kvs_chat_msg { const char *role, *content; };
/* Applies the model's chat template. Returns bytes needed (excl. NUL), writes ≤ size-1 + NUL. */
size_t kvs_chat_apply(const kvs_model *m, const struct kvs_chat_msg *msgs, int n,
                      bool add_assistant, char *buf, size_t size);

/* ---- context and sequences ---------------------------------------------------------------- */

struct kvs_context_params {
    int n_ctx;          /* max tokens per sequence (0 = model's training context) */
    int n_threads;      /* 0 = all cores */
    int n_batch;        /* prefill chunk size in tokens (default 512) */
    int n_seq_max;      /* sequences that may exist at once (default 1) */
    const char *kv_spec;/* KV policy spec ("full" by default; see `kvsieve --help kv`) */
    bool keep_stats;    /* also keep every statistic any policy may need (accumulated attention,
                         * the last KVS_STATS_QWIN queries per layer), so that kvs_seq_compress
                         * can apply any spec later; costs memory and some attention speed */
    bool act_f32;       /* weight matmuls on fp32 activations (each weight row dequantized and
                         * dotted in fp32) instead of activations quantized to 8 bits; several
                         * times slower; for comparing the engine with a float reference */
    int device;         /* KVS_DEVICE_CPU (default) or KVS_DEVICE_CUDA: the whole forward pass
                         * and the KV cache on the first GPU (a `make cuda` build; the full cache
                         * and the policies kvs_kv_runs_on accepts; act_f32 is refused) */
};
enum kvs_device { KVS_DEVICE_CPU = 0, KVS_DEVICE_CUDA = 1 };
#define KVS_STATS_QWIN 64
struct kvs_context_params kvs_context_params_default(void);
/* The --kv grammar, methods and options, as printed by `kvsieve --help kv`. */
const char *kvs_kv_spec_help(void);
/* Validate a KV policy spec without a model (a server checks a request's `kv` field this way).
 * KVS_OK, or KVS_ERR_INVALID_ARG with kvs_last_error() naming the offending part. When norm is
 * non-NULL, the normalised spec (every default spelled out) is written there (≤ size-1 + NUL). */
enum kvs_status kvs_kv_spec_check(const char *kv_spec, char *norm, size_t size);

enum kvs_status kvs_context_new(kvs_model *m, const struct kvs_context_params *p,
                                kvs_context **out);
void kvs_context_free(kvs_context *c);
int kvs_context_n_threads(const kvs_context *c);
/* "cpu", or the GPU a --device cuda context runs on ("NVIDIA H200 (sm_90, 139.8 GiB)"). */
const char *kvs_context_device_name(const kvs_context *c);
/* Whether a context on device (KVS_DEVICE_*) runs kv_spec: every valid spec on the CPU; on the
 * GPU the full cache and the policies scored there (`kvsieve --help kv` lists them); false for
 * a spec that does not parse. */
bool kvs_kv_runs_on(const char *kv_spec, int device);
/* A GPU context's memory bandwidth in GB/s (device-to-device copies, bytes read plus written);
 * -1 on the CPU (kvs_measure_read_bandwidth measures that). */
double kvs_context_device_bandwidth(kvs_context *c);
/* Most tokens one sequence may consume: n_ctx, or KVS_PAST_MAX when the KV policy bounds the
 * cache (a fixed budget=N, mem=B or streaming window, compressed after every prefill chunk and
 * while decoding): n_ctx is then the cache's size and generation runs past it (StreamingLLM). */
#define KVS_PAST_MAX (1 << 30)
int kvs_context_max_tokens(const kvs_context *c);

enum kvs_status kvs_seq_new(kvs_context *c, kvs_sequence **out);
void kvs_seq_free(kvs_context *c, kvs_sequence *s);
int kvs_seq_n_past(const kvs_sequence *s); /* tokens consumed so far (next absolute position) */
void kvs_seq_reset(kvs_context *c, kvs_sequence *s); /* forget all tokens */

/* Save a sequence's KV cache (possibly compressed: exactly the entries the policy kept, with
 * their statistics and saved queries) and its position to `path`, so a long document is
 * prefilled once and questioned many times. The file is versioned and checksummed, records the
 * model's fingerprint and the KV spec it was made under, and is written to a temporary file that
 * is then renamed over `path` (a reader never sees half a file). The sequence is not changed.
 * KVS_ERR_IO when the file cannot be written. */
enum kvs_status kvs_seq_save(kvs_context *c, const kvs_sequence *s, const char *path);
/* Replace the sequence's whole content, n_past included, with a cache saved by kvs_seq_save;
 * evaluation then continues after the saved tokens (feed the continuation without BOS), and
 * gives the same logits as continuing the saved sequence when the context runs the same
 * policy. A cache may be loaded under another policy: accumulated-attention slots it lacks
 * start at 0 and saved queries are kept up to the context's window. The whole file is
 * validated first; on any error the sequence is left unchanged. Errors: KVS_ERR_IO (cannot
 * open), KVS_ERR_FORMAT (not a cache file, "unsupported cache version N", "truncated cache
 * file", "corrupted cache file", invalid content), KVS_ERR_INVALID_ARG ("cache was made with
 * another model (...)", more tokens than the context size), KVS_ERR_NOMEM. */
enum kvs_status kvs_seq_load(kvs_context *c, kvs_sequence *s, const char *path);

/* Make dst (of context cd) a copy of src (of context cs): entries, statistics, saved queries and
 * position; dst's old content is dropped. Both contexts must run the same model; they may run
 * different policies (statistics dst keeps but src lacks start at 0). A fork: one prefill, then
 * many continuations. GPU contexts copy between themselves on the device (not to or from a CPU
 * context). Errors: KVS_ERR_INVALID_ARG (other model, src longer than cd's context),
 * KVS_ERR_NOMEM (dst is then empty), KVS_ERR_UNSUPPORTED (a CPU and a GPU context). */
enum kvs_status kvs_seq_copy(kvs_context *cd, kvs_sequence *dst, const kvs_context *cs,
                             const kvs_sequence *src);

/* Compress s now under kv_spec, exactly as that spec compresses at the end of a prefill (budget
 * from the tokens seen, kv_spec's scorer and allocator, the statistics s holds), whatever the
 * context's own policy. Lets one full prefill serve many methods (kvpress style): copy, then
 * compress each copy. "full" changes nothing. On a GPU context, the specs kvs_kv_runs_on accepts
 * (scored and gathered on the device). Errors: KVS_ERR_INVALID_ARG for a bad spec or when the
 * spec needs statistics the context does not keep (create it with keep_stats);
 * KVS_ERR_UNSUPPORTED for a spec the GPU does not run. */
enum kvs_status kvs_seq_compress(kvs_context *c, kvs_sequence *s, const char *kv_spec);

/* Progress callback for long prefill: called after every chunk with tokens done / total. Return
 * false to abort (the call then fails with KVS_ERR_INVALID_ARG "aborted"). */
typedef bool (*kvs_progress_fn)(int done, int total, void *user);

/* Feed n tokens to one sequence (split into chunks of n_batch).
 * logits: if non-NULL, receives the logits of the last token (n_vocab floats), or, if
 * all_logits, of every token (n × n_vocab floats, row per token). */
enum kvs_status kvs_eval(kvs_context *c, kvs_sequence *s, const int32_t *tokens, int n,
                         bool all_logits, float *logits, kvs_progress_fn progress,
                         void *user);

/* One decode step for several sequences at once: token[i] is appended to seqs[i]; logits row i
 * (n_vocab floats) is written for each. Weights are read once for all of them. */
enum kvs_status kvs_eval_batch(kvs_context *c, kvs_sequence *const *seqs, const int32_t *tokens,
                               int n_seq, float *logits);

struct kvs_mem_stats {
    uint64_t kv_bytes;      /* KV payload + entry metadata allocated now, all sequences */
    uint64_t kv_bytes_peak; /* high-water mark since context creation */
    uint64_t scratch_bytes; /* activations and other per-context buffers */
};
void kvs_context_mem(const kvs_context *c, struct kvs_mem_stats *ms);
/* Time the context's KV policies have spent planning and applying plans since it was created
 * (seconds; on the CPU, scoring included; with --device cuda, the device's scoring, the host's
 * planning and the device's compaction), and how many (sequence, layer) plans that was. */
void kvs_context_plan_stats(const kvs_context *c, double *seconds, uint64_t *layers);
/* With --device cuda and KVS_CUDA_PROFILE=1 in the environment when the context was created: the
 * device time the forward passes have spent so far in each group of kernels (matmuls, attention,
 * norms, ...; measured by events between the groups, with CUDA graphs off), up to max groups:
 * their names and seconds. Returns how many groups (0 on the CPU or without the variable). */
int kvs_context_gpu_time_split(const kvs_context *c, const char **names, double *seconds, int max);
/* Bytes of K/V payload and per-entry metadata (positions, weights) that one sequence holds now,
 * capacity rounding included, plus Attention-Gate's own cache under agate; statistic slots and
 * saved queries are not counted (they depend on the context's policy, not on what the sequence
 * keeps). */
uint64_t kvs_seq_kv_bytes(const kvs_sequence *s);
/* Entries a sequence holds now, averaged over its (layer, KV head) pairs: the tokens seen under
 * `full` or pure storage parts, fewer under eviction or merging (MiKV keeps every token). */
double kvs_seq_entries_per_head(const kvs_sequence *s);
/* Bytes per token a cache under `kv_spec` holds once its storage parts have packed an entry
 * (all layers and KV heads; payload, scales, positions and weights; KIVI block metadata spread
 * over its tokens): the theoretical figure beside kvs_seq_kv_bytes / tokens. -1 on a bad spec. */
double kvs_kv_bytes_per_token(const kvs_model *m, const char *kv_spec);

/* ---- serving: per-sequence policies, mixed batches, shared prefixes ----------------------- */

/* Give sequence s its own KV policy (NULL or "" = the context's again). Only while s is empty
 * (n_past 0, no prefix attached). The statistics the spec needs must be kept by the context: a
 * context created with keep_stats accepts every spec. s then keeps accumulated attention only if
 * the spec needs it, even in a keep_stats context (keeping it changes the attention kernel's
 * order of summation, so a `full` sequence with it differs in the last bits from one without).
 * Errors: KVS_ERR_INVALID_ARG (bad spec, with the --kv parser's message; sequence not empty;
 * statistics the context does not keep). */
enum kvs_status kvs_seq_set_kv(kvs_context *c, kvs_sequence *s, const char *kv_spec);
/* Keep (on) or stop keeping accumulated attention for the empty sequence s, so that
 * kvs_seq_compress or kvs_prefix_compress can later apply a spec that needs it. A new sequence of
 * a keep_stats context keeps it; kvs_seq_set_kv sets it to what the spec needs. Errors:
 * KVS_ERR_INVALID_ARG (s not empty; off while its policy needs it; on in a context created
 * without keep_stats). */
enum kvs_status kvs_seq_keep_stats(kvs_context *c, kvs_sequence *s, bool on);
const char *kvs_seq_kv(const kvs_context *c, const kvs_sequence *s); /* normalised spec s runs */
/* Most tokens s may consume under its policy: n_ctx, or KVS_PAST_MAX when its policy bounds the
 * cache (see kvs_context_max_tokens). */
int kvs_seq_max_tokens(const kvs_context *c, const kvs_sequence *s);
/* Pin the first n_tokens positions of s: its policy ranks their entries above every other, so a
 * budgeted cache that keeps generating past the context never drops them (a system prompt, the
 * start of a conversation) as long as its budget holds them (scorers that merge may still fold
 * other entries into them). 0 unpins. */
void kvs_seq_pin(kvs_context *c, kvs_sequence *s, int n_tokens);
/* Upper bound of kvs_seq_kv_bytes for a sequence under kv_spec (NULL = the context's) that will
 * consume at most n_tokens tokens (n_ctx bounds it too), at any moment of its life: for admission
 * control. Shared prefix entries are not counted (they belong to their prefix). -1 on a bad spec. */
int64_t kvs_kv_bytes_bound(const kvs_context *c, const char *kv_spec, int n_tokens);
/* The same bound once the sequence's n_prompt-token prompt has been fed (its last chunk with
 * .prompt_end) and while it generates up to n_gen tokens: a ratio budget or a when=prefill policy
 * holds its whole prompt only until the prompt's end, so a scheduler can reserve
 * kvs_kv_bytes_bound while a request prefills and this figure afterwards. -1 on a bad spec. */
int64_t kvs_kv_bytes_bound_decode(const kvs_context *c, const char *kv_spec, int n_prompt,
                                  int n_gen);

/* One forward over a mixed batch: decode tokens of running sequences and prompt chunks of others.
 * Each item feeds n tokens to its own sequence (a sequence appears at most once). Weights are
 * read once for the whole batch, and an item's logits and KV are bit for bit those of the same
 * item evaluated alone (the batch does not change any sequence's result). */
struct kvs_batch_item {
    kvs_sequence *seq;
    const int32_t *tokens;
    int n;            /* tokens (>= 1); a decode step feeds the one sampled token */
    bool decode;      /* a generated token (the policy's decode-time compression applies) */
    bool prompt_end;  /* prompt chunk: the prompt's last (prefill-end compression applies) */
    bool hold;        /* prompt chunk: do not compress after it (its entries stay exact, e.g. to be
                       * published as a prefix block); a later chunk compresses them all */
    float *logits;    /* non-NULL: receives the logits of the item's last token (n_vocab floats) */
    /* Recompute (chunk reuse, Cache-Craft): the tokens are at the given earlier positions pos[]
     * (ascending, below n_past), where the sequence already holds exact entries (a placed chunk);
     * their keys and values are computed again in every layer, attending to everything before
     * them, and replace those entries. n_past does not move. */
    bool recompute;
    const int32_t *pos;
};
/* Most tokens one kvs_step takes in total (n_batch, or n_seq_max if larger). */
int kvs_context_step_tokens(const kvs_context *c);
/* Validates every item first (sizes, distinct sequences, each within its kvs_seq_max_tokens); on
 * an invalid batch nothing is evaluated: KVS_ERR_INVALID_ARG or KVS_ERR_CONTEXT_FULL. */
enum kvs_status kvs_step(kvs_context *c, const struct kvs_batch_item *items, int n_items);

/* Shared prefixes: read-only runs of KV entries that many sequences start from (a prefix cache,
 * a system prompt, a document). A node holds the entries of a run of tokens and references its
 * parent node, so a chain of nodes is a prefix; the prefix cache's radix tree maps token blocks
 * to nodes. A node never changes after it is made; sequences that start from it read it in place
 * and compress only their own entries. Nodes are reference counted (each holder one reference). */
typedef struct kvs_prefix kvs_prefix;
/* Nodes belong to the context they were made in: release them before freeing it. Every prefix
 * call must come from the thread that runs the context. */
/* A new node (one reference, the caller's) holding a copy of s's entries for the tokens after
 * `parent`'s chain (0 when NULL) up to s's n_past; parent (NULL, or the chain s was started from
 * or one of its descendants that covers a prefix of s) gains a reference. Those entries of s must
 * be exact (nothing evicted, merged or packed among them): always so under `full`, and under any
 * policy for prompt chunks fed with .hold. Errors: KVS_ERR_INVALID_ARG (entries not exact, parent
 * not a prefix of s, nothing after parent), KVS_ERR_NOMEM. s is not changed. */
enum kvs_status kvs_prefix_publish(kvs_context *c, const kvs_sequence *s, kvs_prefix *parent,
                                   kvs_prefix **out);
/* A standalone node (no parent, one reference for the caller) holding s's whole content — the
 * chain it started from and its own entries, which must be exact — compressed
 * question-agnostically under kv_spec, as kvs_seq_compress does at the end of a prompt (scorers
 * that read recent queries use s's last ones: the prefix's own last tokens). This is the
 * compressed prefix a `--prefix-kv` spec asks for: made once, reused by every later request.
 * s is not changed. Errors: KVS_ERR_INVALID_ARG (bad spec, entries not exact, a spec that moves
 * positions), KVS_ERR_NOMEM. */
enum kvs_status kvs_prefix_compress(kvs_context *c, const kvs_sequence *s, const char *kv_spec,
                                    kvs_prefix **out);
void kvs_prefix_ref(kvs_prefix *p);
void kvs_prefix_unref(kvs_prefix *p); /* frees the node (and drops its parent) at 0 */
int kvs_prefix_n_tokens(const kvs_prefix *p);  /* tokens of the whole chain ending at p */
uint64_t kvs_prefix_bytes(const kvs_prefix *p); /* bytes of this node's own entries */
int kvs_prefix_refcount(const kvs_prefix *p);
/* Checksum (xxh64) of this node's entries, computed now: equals the one at creation for as long
 * as the node lives (tests check that no sequence ever writes a shared node). */
uint64_t kvs_prefix_checksum(const kvs_prefix *p);
/* Start empty sequence s from the chain ending at p: n_past becomes kvs_prefix_n_tokens(p),
 * attention reads the chain's entries (read-only, all visible) before s's own, and s's policy
 * compresses only s's own entries. s holds a reference to p until reset or freed. Errors:
 * KVS_ERR_INVALID_ARG (s not empty, a streaming pos=cache policy, p from another model). */
enum kvs_status kvs_seq_attach_prefix(kvs_context *c, kvs_sequence *s, kvs_prefix *p);

/* Chunk caches (Cache-Craft, arXiv 2502.15734): a node published from a sequence that fed a
 * chunk of text after some context can be reused elsewhere. kvs_seq_place_chunk copies the node's
 * own entries (not its parent chain's) into s after its n_past tokens, moved to the new positions
 * (keys re-rotated); the caller then recomputes a selection of the chunk's tokens with a
 * .recompute item (all of them gives the bits of prefilling the chunk there). Errors:
 * A compressed node's packed entries arrive dequantised (fp16 rows), its evicted ones absent.
 * KVS_ERR_INVALID_ARG (another context), KVS_ERR_CONTEXT_FULL, KVS_ERR_NOMEM. */
enum kvs_status kvs_seq_place_chunk(kvs_context *c, kvs_sequence *s, const kvs_prefix *chunk);
/* CacheBlend's check (arXiv 2405.16444): recompute the tokens of a placed chunk (tokens[i] at
 * positions pos[i], ascending, the sequence's own fp16 entries) through layers 0..check_layer
 * only, replacing their entries there, and write into dev[i] how far each token's recomputed
 * values at check_layer are from the placed ones (sum of squares over KV heads and channels).
 * The caller then recomputes the tokens that deviate most with a .recompute item (all layers).
 * Errors: those of a recompute item of kvs_step, KVS_ERR_INVALID_ARG for a bad layer. */
enum kvs_status kvs_seq_chunk_deviation(kvs_context *c, kvs_sequence *s, const int32_t *tokens,
                                        const int32_t *pos, int n, int check_layer, float *dev);
/* A standalone chunk node (one reference, the caller's) holding a copy of s's own entries for
 * the tokens [from, n_past): a chunk of text s was just fed (with .hold, so its entries are
 * exact), at its original positions. With a kv_spec (NULL or "" = exact fp16) the copy is
 * compressed under it, question-agnostically (scorers read s's last saved queries, the chunk's
 * own): a storage part packs it (kivi, mikv, think), an eviction part keeps fewer entries.
 * It can be placed into other sequences (kvs_seq_place_chunk: packed entries are dequantised,
 * re-rotated and rounded to fp16 there) and serialised, never attached as a prefix. Errors:
 * KVS_ERR_INVALID_ARG (from outside s's own entries, entries not exact, a bad spec or one that
 * moves positions or needs statistics the context lacks), KVS_ERR_NOMEM. */
enum kvs_status kvs_chunk_publish(kvs_context *c, const kvs_sequence *s, int32_t from,
                                  const char *kv_spec, kvs_prefix **out);
/* Whether kvs_chunk_publish can compress under kv_spec in context c: KVS_OK, or
 * KVS_ERR_INVALID_ARG with the reason (bad spec, pos=cache, a scorer of accumulated attention,
 * more saved queries than c keeps). */
enum kvs_status kvs_chunk_spec_check(const kvs_context *c, const char *kv_spec);
/* The spec a node was compressed under ("" = exact). */
const char *kvs_prefix_spec(const kvs_prefix *p);
/* A node's own entries as bytes (malloc'ed into *out, *n bytes): "KVSNODE1", version 2, the
 * model's fingerprint and shape, the token range, the spec it was compressed under, per layer
 * and KV head its entries (fp16 rows, and packed codes with their scales when compressed),
 * positions and weights, and an xxh64 checksum of everything before it. KVS_ERR_UNSUPPORTED for
 * a node with a parent (a chain's later node); KVS_ERR_NOMEM. */
enum kvs_status kvs_prefix_serialize(const kvs_prefix *p, uint8_t **out, size_t *n);
/* A standalone chunk node (one reference) from kvs_prefix_serialize's bytes, after checking
 * every field: size, magic, version, checksum, the model's fingerprint and shape, positions
 * ascending within the node's range, weights positive. KVS_ERR_FORMAT with the reason (a
 * corrupt or foreign record is refused, never used), KVS_ERR_NOMEM. */
enum kvs_status kvs_prefix_deserialize(kvs_context *c, const uint8_t *buf, size_t n,
                                       kvs_prefix **out);
/* First token of a node's own range (the chain before it covers [0, first)). */
int kvs_prefix_first(const kvs_prefix *p);
/* 64-bit fingerprint of the model's weights layout (tensor directory and the first 4 KiB of the
 * token embeddings): records made by one model are refused by another. */
uint64_t kvs_model_fingerprint(const kvs_model *m);
/* Record where the attention of every token fed to s from now on goes: for each query and each
 * range of key positions [0, b_0), [b_0, b_1), ..., [b_{n-1}, inf) (n <= 15 ascending bounds),
 * the attention probability it pays there, averaged over query heads and layers (per KV head).
 * Cache-Craft's metadata: how much a chunk's tokens attend to each earlier chunk. s must hold no
 * own entries yet (recording needs exact probabilities: its attention runs unsplit, with the
 * accumulated-attention slot). Shared prefix entries count in the first range. */
enum kvs_status kvs_seq_record_attention(kvs_context *c, kvs_sequence *s, const int32_t *bounds,
                                         int n_bounds);
/* Stop recording s's attention (what was recorded is dropped). Unless keep_stats, or s's policy
 * needs it, s also stops keeping accumulated attention: later tokens take the faster attention
 * paths (key splits for a lone decode token). */
void kvs_seq_record_stop(kvs_context *c, kvs_sequence *s, bool keep_stats);
/* Recorded shares for the n_tok tokens from position first: out[(t * n_head_kv + h) * (n_bounds
 * + 1) + j] for token first + t, KV head h, range j. Returns the number of ranges (n_bounds + 1),
 * or -1 when nothing was recorded for those positions. */
int kvs_seq_recorded_attention(const kvs_sequence *s, int32_t first, int n_tok, float *out);


/* ---- sampling ----------------------------------------------------------------------------- */

struct kvs_sampler_params {
    float temp;           /* 0 = greedy (default 0.8) */
    int top_k;            /* 0 = off (default 40) */
    float top_p;          /* 1 = off (default 0.95) */
    float min_p;          /* 0 = off (default 0.05) */
    float repeat_penalty; /* 1 = off (default 1.0) */
    int repeat_last_n;    /* window for the penalty (default 64) */
    uint64_t seed;        /* RNG seed (default 42; the CLI draws a random one unless --seed) */
    /* OpenAI-style penalties over the same last repeat_last_n tokens: a token seen c > 0 times
     * loses presence_penalty + c * frequency_penalty from its logit (0 = off, the default;
     * negative values encourage repetition) */
    float presence_penalty;
    float frequency_penalty;
};
struct kvs_sampler_params kvs_sampler_params_default(void);
typedef struct kvs_sampler kvs_sampler;
enum kvs_status kvs_sampler_new(const struct kvs_sampler_params *p, int n_vocab,
                                kvs_sampler **out);
void kvs_sampler_free(kvs_sampler *s);
/* Picks a token from logits (n_vocab floats; not modified) and records it for the penalty. */
int32_t kvs_sampler_sample(kvs_sampler *s, const float *logits);
void kvs_sampler_accept(kvs_sampler *s, int32_t tok); /* record a prompt token for the penalty */

/* ---- measurement ------------------------------------------------------------------------- */

/* Streaming read bandwidth of main memory in GB/s (1e9 bytes/s), best of 5 passes over a
 * buffer of `bytes` with n_threads readers. Used for the bandwidth bound of decode. */
double kvs_measure_read_bandwidth(int n_threads, size_t bytes);

#ifdef __cplusplus
}
#endif
#endif
