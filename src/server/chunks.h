/* chunks.h — the chunk store of `kvsieve serve` (issue 15, Cache-Craft arXiv 2502.15734): chunk
 * caches (the KV of a run of tokens, computed inside some context, with the attention metadata
 * Cache-Craft decides reuse from) in three tiers: RAM (replacement by src/page/'s policies, one
 * record per page), a local directory (one file per record), and Redis (one key per record).
 * Owned by the inference thread (sched.c); every call comes from it.
 *
 * A record is self-describing and checksummed (format below in chunks.c): a corrupt or foreign
 * one is refused, counted, deleted from the tier that held it, and the chunk is recomputed. */
#ifndef KVS_SERVER_CHUNKS_H
#define KVS_SERVER_CHUNKS_H

#include "kvsieve.h"

#include <stdbool.h>
#include <stdint.h>

enum { CHUNK_MAX_CTX = 15 };

/* a part of the context a chunk was cached after: the text before the first chunk ("prefix"),
 * or an earlier chunk; its length and how much attention the chunk's tokens paid it */
struct chunk_part {
    uint64_t id;
    int32_t len;
    float inter; /* sum over the chunk's tokens of the share of attention paid to this part */
};

struct chunk_rec {
    uint64_t id;        /* chunk_id(tokens) */
    int32_t n, n0;      /* tokens; first position when it was cached */
    int32_t *toks;      /* (n) */
    float *outside;     /* (n) per token: share of attention paid outside the chunk */
    float intra;        /* sum over tokens of the share paid inside the chunk */
    int n_ctx;
    struct chunk_part ctx[CHUNK_MAX_CTX];
    kvs_prefix *node;   /* the KV, when in RAM (NULL otherwise) */
    uint64_t bytes;     /* serialised size */
    bool on_disk;
    uint64_t hits, last_used;
    uint64_t wkey;      /* hash of the first tokens (recognition) */
    struct chunk_rec *hnext, *wnext; /* id map; recognition map (first tokens) */
};

struct chunk_cfg {
    int64_t mem;          /* RAM tier bytes (0: the store is off) */
    int64_t slots;        /* RAM tier records (0: from mem) */
    const char *policy;   /* page policy name */
    const char *dir;      /* disk tier (NULL: none) */
    int64_t disk;         /* disk tier bytes */
    const char *redis;    /* host:port (NULL: none) */
    int min_tokens, max_tokens;
    double alpha, miss;   /* Cache-Craft's alpha; CFO above miss = treated as a miss */
    const char *trace;    /* access log for pagesim (NULL: none) */
    const char *kv;       /* records compressed under this spec (NULL: exact) */
};

struct chunk_stats {
    uint64_t hits_ram, hits_disk, hits_redis, misses, created, corrupt;
    uint64_t tokens_reused, tokens_recomputed, tokens_checked, evictions_ram, evictions_disk;
    uint64_t redis_errors, redis_reconnects;
    int64_t ram_records, ram_bytes, disk_records, disk_bytes;
    bool redis_up;
};

struct chunk_store;

uint64_t chunk_id(const int32_t *toks, int n);
/* "chunk-<16 hex>" into buf (24 bytes at least) */
void chunk_id_str(uint64_t id, char *buf);
/* parses "chunk-<16 hex>"; false when it is not one */
bool chunk_id_parse(const char *s, uint64_t *id);

/* Opens the tiers (the disk index is rebuilt from the directory; Redis is connected lazily).
 * Returns NULL with a message in err on a bad configuration (unknown policy, unusable dir). */
struct chunk_store *chunk_store_new(const struct chunk_cfg *cfg, kvs_context *ctx,
                                    const kvs_model *m, char *err, size_t errlen);
void chunk_store_free(struct chunk_store *cs);
const struct chunk_cfg *chunk_store_cfg(const struct chunk_store *cs);

/* The record for id with its KV in RAM, looking in RAM, then on disk, then in Redis (promoting
 * what it finds); toks (may be NULL) must then match the record's. NULL on a miss (counted). */
struct chunk_rec *chunk_get(struct chunk_store *cs, uint64_t id, const int32_t *toks, int n);
/* Takes rec (and its node) into the store: RAM, written through to disk and Redis. */
void chunk_put(struct chunk_store *cs, struct chunk_rec *rec);
/* Known records (RAM or disk) whose tokens occur in toks[from, to), found by their first
 * tokens: calls f(arg, rec, at) for the first match at each position, left to right, without
 * overlaps. */
void chunk_scan(struct chunk_store *cs, const int32_t *toks, int from, int to,
                void (*f)(void *arg, struct chunk_rec *rec, int at), void *arg);
/* Cache-Craft's decision for rec placed after the parts new_ids (in order) at position at: the
 * chunk's tokens to recompute (local indices, ascending) into sel; returns their number, or -1
 * for "treat as a miss". ratio >= 0 forces that fraction. *cfo gets the Cache-Fix Overhead. */
int chunk_plan(const struct chunk_store *cs, const struct chunk_rec *rec, const uint64_t *new_ids,
               int n_new, int at, double ratio, int32_t *sel, double *cfo);
void chunk_note_reuse(struct chunk_store *cs, int reused, int recomputed);
void chunk_note_checked(struct chunk_store *cs, int tokens); /* CacheBlend's check layers */
void chunk_stats(const struct chunk_store *cs, struct chunk_stats *out);
/* A JSON array of the known records (malloc'ed) */
char *chunk_list_json(const struct chunk_store *cs);
/* keep RAM within its limits and give Redis a chance to reconnect (called every tick) */
void chunk_tick(struct chunk_store *cs);

void chunk_rec_free(struct chunk_rec *r);

#endif
