/* kv_attn.c — see kv_attn.h. */
#include "kv_attn.h"
#include "base.h"
#include "ops.h"

#include <string.h>

size_t kv_attn_scratch_floats(int g, int hd) {
    /* gathered queries (g, hd), one block's scores (g, KVQ_MAX_GROUP=256), packed outputs (g, hd);
     * a packed shared segment's partial output (g, hd) */
    return (size_t)g * ((size_t)hd * 3 + 256);
}

/* the query rows on the stored key channels, divided by the balancer */
static void gather_q(const struct kv_view_head *vh, int hd, const float *Q, int g, float *Qk) {
    int kd = vh->fmt->kd;
    for (int qi = 0; qi < g; qi++)
        for (int c = 0; c < kd; c++) {
            int ch = vh->ch ? vh->ch[c] : c;
            float q = Q[(size_t)qi * hd + ch];
            Qk[(size_t)qi * kd + c] = vh->bal ? q / vh->bal[ch] : q;
        }
}

static void own_scores(const struct kv_view_head *vh, int hd, const float *Q, int g, int32_t from,
                       int32_t to, float sc, float *S, int lds, float *scratch) {
    int32_t nc = vh->nc;
    if (from < nc) {
        const struct kv_packed_fmt *f = vh->fmt;
        int32_t end = to < nc ? to : nc, kd = f->kd;
        float *Qk = scratch, *T = scratch + (size_t)g * hd;
        gather_q(vh, hd, Q, g, Qk);
        if (f->kfmt == KV_K_F16) {
            ops_attn_scores(Qk, g, (const uint16_t *)vh->ck + (size_t)from * kd, end - from, kd, sc, S, lds);
        } else if (f->kfmt == KV_K_TOK) {
            ops_qattn_tok_scores(Qk, g, kd, vh->ck + (size_t)from * f->kstride, f->kstride,
                                 vh->cks + from, vh->ckm + from, end - from, f->kbits, sc, S, lds);
            if (vh->mu) /* the centres taken out of the stored keys: q . mu, once per query */
                for (int qi = 0; qi < g; qi++) {
                    float d = 0.0f;
                    for (int c = 0; c < kd; c++) {
                        int ch = vh->ch ? vh->ch[c] : c;
                        d += Q[(size_t)qi * hd + ch] * vh->mu[ch];
                    }
                    d *= sc;
                    float *row = S + (size_t)qi * lds;
                    for (int32_t t = 0; t < end - from; t++) row[t] += d;
                }
        } else {
            int32_t b0 = 0;
            size_t bb = (size_t)kd * f->kstride;
            for (int32_t b = 0; b < vh->nblk && b0 < end; b0 += vh->blk_n[b], b++) {
                int32_t nt = vh->blk_n[b];
                if (b0 + nt <= from) continue;
                const uint8_t *codes = vh->ck + (size_t)b * bb;
                const uint16_t *bs = vh->cks + (size_t)b * kd, *bm = vh->ckm + (size_t)b * kd;
                if (b0 >= from && b0 + nt <= end) {
                    ops_qattn_blk_scores(Qk, g, kd, codes, f->kstride, bs, bm, nt, f->kbits, sc,
                                         S + (b0 - from), lds);
                } else { /* a block cut by the range: score it whole aside, copy the part */
                    ops_qattn_blk_scores(Qk, g, kd, codes, f->kstride, bs, bm, nt, f->kbits, sc, T, 256);
                    int32_t lo = from > b0 ? from : b0, hi = end < b0 + nt ? end : b0 + nt;
                    for (int qi = 0; qi < g; qi++)
                        memcpy(S + (size_t)qi * lds + (lo - from), T + (size_t)qi * 256 + (lo - b0),
                               sizeof(float) * (size_t)(hi - lo));
                }
            }
        }
    }
    if (to > nc) {
        int32_t lo = from > nc ? from : nc;
        ops_attn_scores(Q, g, vh->k + (size_t)(lo - nc) * hd, to - lo, hd, sc, S + (lo - from), lds);
    }
}

static void own_accum(const struct kv_view_head *vh, int hd, const float *P, int g, int32_t from,
                      int32_t to, int lds, float *O, float *scratch) {
    (void)scratch;
    int32_t nc = vh->nc, end = to < nc ? to : nc;
    const struct kv_packed_fmt *f = vh->fmt;
    /* packed entries first, then the hot ones added in order: with fp16 packed values the sum
     * is the same, bit for bit, as over one contiguous run */
    if (from < nc && f->vfmt == KV_V_F16)
        ops_attn_accum(P, g, end - from, lds, (const uint16_t *)vh->cv + (size_t)from * hd, hd, O);
    else
        memset(O, 0, sizeof(float) * (size_t)g * hd);
    if (from < nc && f->vfmt == KV_V_TOK) {
        /* the int8 kernels quantize the weights per OPS_Q8_ROWS rows from the first row they
         * are given: start those blocks at multiples of OPS_Q8_ROWS of the run, so that the
         * result does not depend on where the keys were split between threads */
        int32_t a = from;
        while (a < end) {
            int32_t b = (a / OPS_Q8_ROWS + 1) * OPS_Q8_ROWS;
            if (a % OPS_Q8_ROWS == 0 || b > end) b = end;
            ops_qattn_tok_accum(P + (a - from), g, b - a, lds, vh->cv + (size_t)a * f->vstride,
                                f->vstride, vh->cvs + (size_t)a * (hd / f->vgs),
                                vh->cvm + (size_t)a * (hd / f->vgs), hd, f->vgs, f->vbits, O);
            a = b;
        }
    }
    if (to > nc) {
        int32_t lo = from > nc ? from : nc;
        ops_attn_accum_add(P + (lo - from), g, to - lo, lds, vh->v + (size_t)(lo - nc) * hd, hd, O);
    }
}

/* Shared segments first (each a view head of its own, addressed from 0), then the own runs. */
void kv_attn_scores(const struct kv_view_head *vh, int hd, const float *Q, int g, int32_t from,
                    int32_t to, float sc, float *S, int lds, float *scratch) {
    int32_t o = 0;
    for (int k = 0; k < vh->n_seg && from < vh->nsh; k++) {
        const struct kv_view_head *sg = vh->seg[k];
        int32_t lo = from > o ? from : o, hi = to < o + sg->n ? to : o + sg->n;
        if (lo < hi) own_scores(sg, hd, Q, g, lo - o, hi - o, sc, S + (lo - from), lds, scratch);
        o += sg->n;
    }
    if (to > vh->nsh) {
        int32_t lo = from > vh->nsh ? from : vh->nsh;
        own_scores(vh, hd, Q, g, lo - vh->nsh, to - vh->nsh, sc, S + (lo - from), lds, scratch);
    }
}

/* Pieces after the first are added to O: an fp16 hot run straight through ops_attn_accum_add,
 * which continues the same ordered sum (a prefix read in place gives the bits of the same
 * entries held by the sequence itself); a packed run through a temporary. */
static void accum_piece(const struct kv_view_head *vh, int hd, const float *P, int g, int32_t from,
                        int32_t to, int lds, float *O, float *scratch, bool first) {
    if (first) {
        own_accum(vh, hd, P, g, from, to, lds, O, scratch);
    } else if (from >= vh->nc) {
        ops_attn_accum_add(P, g, to - from, lds, vh->v + (size_t)(from - vh->nc) * hd, hd, O);
    } else {
        float *tmp = scratch;
        own_accum(vh, hd, P, g, from, to, lds, tmp, scratch + (size_t)g * hd);
        for (size_t i = 0; i < (size_t)g * hd; i++) O[i] += tmp[i];
    }
}

void kv_attn_accum(const struct kv_view_head *vh, int hd, const float *P, int g, int32_t from,
                   int32_t to, int lds, float *O, float *scratch) {
    bool first = true;
    int32_t o = 0;
    for (int k = 0; k < vh->n_seg && from < vh->nsh; k++) {
        const struct kv_view_head *sg = vh->seg[k];
        int32_t lo = from > o ? from : o, hi = to < o + sg->n ? to : o + sg->n;
        if (lo < hi) {
            accum_piece(sg, hd, P + (lo - from), g, lo - o, hi - o, lds, O, scratch, first);
            first = false;
        }
        o += sg->n;
    }
    if (to > vh->nsh) {
        int32_t lo = from > vh->nsh ? from : vh->nsh;
        accum_piece(vh, hd, P + (lo - from), g, lo - vh->nsh, to - vh->nsh, lds, O, scratch, first);
        first = false;
    }
    if (first) memset(O, 0, sizeof(float) * (size_t)g * hd);
}
