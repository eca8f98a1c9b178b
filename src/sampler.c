/* sampler.c — token sampling: repetition penalty (multiplicative, llama.cpp's), presence and
 * frequency penalties (additive, OpenAI's) over the last repeat_last_n tokens, then greedy (temp 0) or temperature with
 * top-k, top-p and min-p filters, drawn with a seeded xoshiro256** RNG so runs are repeatable.
 * All buffers are allocated once in kvs_sampler_new; sampling allocates nothing. */
#include "base.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct cand { float logit; int32_t id; };

struct kvs_sampler {
    struct kvs_sampler_params p;
    int n_vocab;
    struct cand *cand; /* (n_vocab) */
    int32_t *recent;   /* ring of the last repeat_last_n tokens */
    int n_recent, head;
    uint64_t s[4];
};

struct kvs_sampler_params kvs_sampler_params_default(void) {
    return (struct kvs_sampler_params){.temp = 0.8f, .top_k = 40, .top_p = 0.95f,
                                       .min_p = 0.05f, .repeat_penalty = 1.0f,
                                       .repeat_last_n = 64, .seed = 42};
}

static uint64_t splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t next_u64(kvs_sampler *s) {
    uint64_t r = rotl(s->s[1] * 5, 7) * 9, t = s->s[1] << 17;
    s->s[2] ^= s->s[0];
    s->s[3] ^= s->s[1];
    s->s[1] ^= s->s[2];
    s->s[0] ^= s->s[3];
    s->s[2] ^= t;
    s->s[3] = rotl(s->s[3], 45);
    return r;
}

enum kvs_status kvs_sampler_new(const struct kvs_sampler_params *p, int n_vocab,
                                kvs_sampler **out) {
    *out = NULL;
    struct kvs_sampler_params def = kvs_sampler_params_default();
    if (!p) p = &def;
    if (n_vocab <= 0 || !(p->temp >= 0) || p->top_k < 0 || !(p->top_p > 0 && p->top_p <= 1) ||
        !(p->min_p >= 0 && p->min_p <= 1) || !(p->repeat_penalty > 0) || p->repeat_last_n < 0 ||
        !(fabsf(p->presence_penalty) <= 2) || !(fabsf(p->frequency_penalty) <= 2))
        return kvs_fail(KVS_ERR_INVALID_ARG, "invalid sampler parameters (temp >= 0, top_k >= "
                        "0, 0 < top_p <= 1, 0 <= min_p <= 1, repeat_penalty > 0, -2 <= "
                        "presence_penalty, frequency_penalty <= 2)");
    kvs_sampler *s = calloc(1, sizeof *s);
    if (!s) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    s->p = *p;
    s->n_vocab = n_vocab;
    s->cand = malloc((size_t)n_vocab * sizeof *s->cand);
    s->recent = malloc((size_t)(p->repeat_last_n ? p->repeat_last_n : 1) * sizeof *s->recent);
    if (!s->cand || !s->recent) {
        kvs_sampler_free(s);
        return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    }
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++) s->s[i] = splitmix(&x);
    *out = s;
    return KVS_OK;
}

void kvs_sampler_free(kvs_sampler *s) {
    if (!s) return;
    free(s->cand);
    free(s->recent);
    free(s);
}

void kvs_sampler_accept(kvs_sampler *s, int32_t tok) {
    if (s->p.repeat_last_n == 0) return;
    s->recent[s->head] = tok;
    s->head = (s->head + 1) % s->p.repeat_last_n;
    if (s->n_recent < s->p.repeat_last_n) s->n_recent++;
}

static int cmp_cand(const void *a, const void *b) {
    const struct cand *x = a, *y = b;
    if (x->logit != y->logit) return x->logit < y->logit ? 1 : -1;
    return x->id < y->id ? -1 : 1; /* ties: lower id first, deterministic */
}

/* Partial selection: move the k largest to the front, sorted (k small, n large). */
static void top_k_sort(struct cand *c, int n, int k) {
    if (k >= n) {
        qsort(c, (size_t)n, sizeof *c, cmp_cand);
        return;
    }
    /* keep a sorted prefix of k, insert each remaining element if it beats the last */
    qsort(c, (size_t)k, sizeof *c, cmp_cand);
    for (int i = k; i < n; i++) {
        if (cmp_cand(&c[i], &c[k - 1]) >= 0) continue;
        struct cand x = c[i];
        int j = k - 1;
        while (j > 0 && cmp_cand(&x, &c[j - 1]) < 0) {
            c[j] = c[j - 1];
            j--;
        }
        c[j] = x;
    }
}

int32_t kvs_sampler_sample(kvs_sampler *s, const float *logits) {
    int n = s->n_vocab;
    for (int i = 0; i < n; i++) s->cand[i] = (struct cand){logits[i], i};
    if (s->p.repeat_penalty != 1.0f || s->p.presence_penalty != 0.0f || s->p.frequency_penalty != 0.0f) {
        for (int r = 0; r < s->n_recent; r++) {
            int32_t t = s->recent[r];
            if (t < 0 || t >= n) continue;
            /* penalise each distinct token once, counting its occurrences in the window */
            bool seen = false;
            for (int q = 0; q < r && !seen; q++) seen = s->recent[q] == t;
            if (seen) continue;
            int count = 1;
            for (int q = r + 1; q < s->n_recent; q++) count += s->recent[q] == t;
            float *l = &s->cand[t].logit;
            if (s->p.repeat_penalty != 1.0f)
                *l = *l > 0 ? *l / s->p.repeat_penalty : *l * s->p.repeat_penalty;
            *l -= s->p.presence_penalty + (float)count * s->p.frequency_penalty;
        }
    }
    int32_t tok;
    if (s->p.temp <= 0.0f) {
        int best = 0;
        for (int i = 1; i < n; i++)
            if (s->cand[i].logit > s->cand[best].logit) best = i;
        tok = s->cand[best].id;
    } else {
        int k = s->p.top_k > 0 && s->p.top_k < n ? s->p.top_k : n;
        top_k_sort(s->cand, n, k);
        float mx = s->cand[0].logit;
        for (int i = 0; i < k; i++) s->cand[i].logit = expf((s->cand[i].logit - mx) / s->p.temp);
        /* min-p: drop candidates below min_p times the top probability */
        int m = k;
        if (s->p.min_p > 0) {
            float thr = s->p.min_p * s->cand[0].logit;
            m = 1;
            while (m < k && s->cand[m].logit >= thr) m++;
        }
        /* top-p: smallest prefix whose mass reaches top_p */
        float acc = 0.0f, mass = 0.0f;
        for (int i = 0; i < m; i++) mass += s->cand[i].logit;
        int cut = m;
        if (s->p.top_p < 1.0f) {
            for (int i = 0; i < m; i++) {
                acc += s->cand[i].logit;
                if (acc >= s->p.top_p * mass) {
                    cut = i + 1;
                    break;
                }
            }
            mass = acc;
        }
        double u = (double)(next_u64(s) >> 11) / 9007199254740992.0 * mass;
        tok = s->cand[cut - 1].id;
        double run = 0;
        for (int i = 0; i < cut; i++) {
            run += s->cand[i].logit;
            if (u < run) {
                tok = s->cand[i].id;
                break;
            }
        }
    }
    kvs_sampler_accept(s, tok);
    return tok;
}
