/* group.h — BatchLLM's global prefix identification (arXiv 2412.03594, §"global prefix
 * identification"): the tokenized prompts of a whole batch go into a compact radix tree, which
 * is flattened to a single level of groups by the paper's bottom-up "MaximizeReuse" rule: a
 * deeper shared node g under a first-level node c becomes a group of its own when
 * (leaves(g) - 1) * |g| > |c| (sharing g's tokens saves more than duplicating c's once more).
 * Each group is (shared prefix, members with distinct suffixes); its prefix is prefilled once.
 *
 * Pure data structure: no model, no printing. Prompts are borrowed (not copied) and must outlive
 * the result.
 */
#ifndef KVS_BATCH_GROUP_H
#define KVS_BATCH_GROUP_H

#include "base.h"

struct bgroup {
    int n_prefix;      /* tokens of the shared prefix: the first n_prefix tokens of every member */
    int n_members;
    int *members;      /* (n_members) prompt indices, ascending */
};

struct bgrouping {
    int n_groups;
    struct bgroup *groups;   /* in order of their first member */
    int64_t logical_tokens;  /* sum over prompts of their lengths */
    int64_t physical_tokens; /* sum over groups of |P| + the members' suffixes */
};

/* Group n prompts (prompt i: lens[i] tokens at toks[i]; empty prompts allowed, each alone).
 * Every prompt is in exactly one group. KVS_ERR_NOMEM on allocation failure. */
enum kvs_status bgroup_build(const int32_t *const *toks, const int *lens, int n,
                             struct bgrouping *out);
void bgroup_free(struct bgrouping *g);

#endif
