/* test_sampler.c — sampler semantics on hand-made logits: greedy picks the argmax, top-k 1 is
 * greedy at any temperature, top-p/min-p never pick a token outside their set, the penalty
 * demotes recent tokens, a seed makes draws repeatable, and frequencies follow softmax. */
#include "kvsieve.h"
#include "testutil.h"

static int32_t draw(struct kvs_sampler_params p, const float *l, int n) {
    kvs_sampler *s;
    if (kvs_sampler_new(&p, n, &s) != KVS_OK) return -1;
    int32_t t = kvs_sampler_sample(s, l);
    kvs_sampler_free(s);
    return t;
}

int main(void) {
    float l[8] = {0.1f, 2.0f, -1.0f, 1.9f, 0.0f, -3.0f, 1.0f, 0.5f};
    struct kvs_sampler_params p = kvs_sampler_params_default();
    p.temp = 0;
    CHECK(draw(p, l, 8) == 1);
    p = kvs_sampler_params_default();
    p.top_k = 1;
    p.temp = 5.0f;
    for (uint64_t seed = 0; seed < 50; seed++) {
        p.seed = seed;
        CHECK(draw(p, l, 8) == 1);
    }
    /* top-p 0.5 at temp 1 over {1: e^2, 3: e^1.9, ...}: token 1 alone has mass ~0.36, so the
     * nucleus is {1, 3}; no other token may ever be drawn */
    p = kvs_sampler_params_default();
    p.temp = 1;
    p.top_k = 0;
    p.min_p = 0;
    p.top_p = 0.5f;
    for (uint64_t seed = 0; seed < 200; seed++) {
        p.seed = seed;
        int32_t t = draw(p, l, 8);
        CHECKF(t == 1 || t == 3, "seed %llu drew %d", (unsigned long long)seed, t);
    }
    /* min-p 0.5: keeps tokens with p >= 0.5 p_max: logits >= 2 - ln 2 = 1.31 -> {1, 3} */
    p.top_p = 1;
    p.min_p = 0.5f;
    for (uint64_t seed = 0; seed < 200; seed++) {
        p.seed = seed;
        int32_t t = draw(p, l, 8);
        CHECK(t == 1 || t == 3);
    }
    /* repeatable with a seed; frequencies near softmax for an unfiltered sampler */
    p = kvs_sampler_params_default();
    p.temp = 1;
    p.top_k = 0;
    p.top_p = 1;
    p.min_p = 0;
    kvs_sampler *a, *b;
    CHECK(kvs_sampler_new(&p, 8, &a) == KVS_OK && kvs_sampler_new(&p, 8, &b) == KVS_OK);
    int same = 1, counts[8] = {0};
    const int N = 20000;
    for (int i = 0; i < N; i++) {
        int32_t x = kvs_sampler_sample(a, l), y = kvs_sampler_sample(b, l);
        same &= x == y;
        counts[x]++;
    }
    CHECK(same);
    double z = 0;
    for (int i = 0; i < 8; i++) z += exp(l[i]);
    for (int i = 0; i < 8; i++) {
        double want = exp(l[i]) / z, got = (double)counts[i] / N;
        CHECKF(fabs(got - want) < 0.015, "token %d: frequency %.4f, softmax %.4f", i, got, want);
    }
    kvs_sampler_free(a);
    kvs_sampler_free(b);
    /* repetition penalty 10 on token 1 makes token 3 the greedy choice */
    p = kvs_sampler_params_default();
    p.temp = 0;
    p.repeat_penalty = 10;
    kvs_sampler *r;
    CHECK(kvs_sampler_new(&p, 8, &r) == KVS_OK);
    kvs_sampler_accept(r, 1);
    CHECK(kvs_sampler_sample(r, l) == 3);
    kvs_sampler_free(r);
    /* presence and frequency penalties: logits 1 and 3 seen, 1 three times (1.0 - 0.1 - 3 * 0.3
     * = 0.0 < 3's), then 3 twice as well; presence alone subtracts once per distinct token */
    {
        const float e[4] = {0.0f, 1.0f, 0.5f, 0.95f};
        p = kvs_sampler_params_default();
        p.temp = 0;
        CHECK(kvs_sampler_new(&p, 4, &r) == KVS_OK);
        kvs_sampler_accept(r, 1);
        CHECK(kvs_sampler_sample(r, e) == 1); /* off by default */
        kvs_sampler_free(r);
        p.frequency_penalty = 0.3f;
        p.presence_penalty = 0.1f;
        CHECK(kvs_sampler_new(&p, 4, &r) == KVS_OK);
        for (int k = 0; k < 3; k++) kvs_sampler_accept(r, 1);
        CHECK(kvs_sampler_sample(r, e) == 3); /* 1: 1.0 - 1.0 = 0.0; 3: 0.95 */
        kvs_sampler_accept(r, 3);             /* 3 seen twice (sampled + accepted): 0.95 - 0.7 */
        CHECK(kvs_sampler_sample(r, e) == 2); /* 2's 0.5 beats 3's 0.25 and 1's 0.0 */
        kvs_sampler_free(r);
        p.frequency_penalty = 0;
        p.presence_penalty = 0.2f;            /* once per distinct token, however often seen */
        CHECK(kvs_sampler_new(&p, 4, &r) == KVS_OK);
        for (int k = 0; k < 5; k++) kvs_sampler_accept(r, 1);
        CHECK(kvs_sampler_sample(r, e) == 3); /* 1: 0.8 < 3: 0.95 */
        kvs_sampler_free(r);
        p.presence_penalty = 2.5f;
        CHECK(kvs_sampler_new(&p, 4, &r) == KVS_ERR_INVALID_ARG);
    }
    /* invalid parameters are refused */
    p = kvs_sampler_params_default();
    p.top_p = 0;
    CHECK(kvs_sampler_new(&p, 8, &r) == KVS_ERR_INVALID_ARG);
    p = kvs_sampler_params_default();
    p.temp = -1;
    CHECK(kvs_sampler_new(&p, 8, &r) == KVS_ERR_INVALID_ARG);
    return tu_finish("test_sampler");
}
