/* cuda.cu — the CUDA backend (contract in cuda.h): weights in GGUF blocks on the device
 * (rearranged into aligned planes, see planes_of), a device fp16 K/V cache per sequence slot,
 * and the forward pass as a chain of kernels on one stream.
 *
 *   embed      dequantize tok_embd rows                            one block per token
 *   rmsnorm    one block per row
 *   matmul     lone tokens (a sequence's only token in the pass: decode), up to 32 a launch: a
 *              warp per two weight rows (long rows split over up to 8 warps), each lane
 *              dequantizing 8 elements of a 32-element unit with vector loads and dotting them
 *              with every token's row (weights read once per launch); the output and down
 *              projections add into the residual as they store, gate and up share a launch that
 *              stores their SwiGLU; the other tokens (prompt chunks): 64 rows x 64 tokens per
 *              block, 32-element units dequantized into shared memory, 4 x 4 outputs per thread
 *   qkv_post   one block per (token, head): biases, RoPE at the token's position (angles in
 *              double from the CPU's inv_freq table, as forward.c does), K/V appended as fp16
 *              (round to nearest even, like F16C)
 *   attention  one block per (token, KV head, key split): the group's query heads share each
 *              pass over the keys; 128-key tiles of keys and values staged in shared memory by
 *              coalesced loads, an online softmax, value sums split over the block's warps;
 *              splits merged by log-sum-exp (flash-decoding), the split count chosen so a lone
 *              decode token still fills the GPU
 *   swiglu (prompt chunks, or gate and up of different types), the final norm of the requested
 *   rows, logits copied back.
 *
 * KV policies (SnapKV): a slot's entries are in order of arrival, each layer's count in a table
 * the pass reads (a token's entry: that count plus its rank in the pass); window scores from the
 * saved queries (win_ml, win_score), planned on the host, then kv_gather into smaller buffers.
 *
 * Arithmetic differs from the CPU path in the order of sums and in the activations (fp32 here,
 * 8-bit quantized there): tests/test_cuda.c bounds it per kernel and over the whole model.
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cublas_v2.h> /* (types only: the library is opened at run time, when asked for) */
#include <climits>
#include <dlfcn.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda.h"

extern "C" enum kvs_status kvs_fail(enum kvs_status st, const char *fmt, ...);

/* GGUF type ids (quant.h's enum qtype) */
enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
       T_Q4_K = 12, T_Q6_K = 14, T_BF16 = 30 };

#define CK(call, what)                                                                          \
    do {                                                                                        \
        cudaError_t e_ = (call);                                                                \
        if (e_ != cudaSuccess) return cuda_error(e_, what);                                     \
    } while (0)

static enum kvs_status cuda_error(cudaError_t e, const char *what) {
    if (e == cudaErrorMemoryAllocation)
        return kvs_fail(KVS_ERR_NOMEM, "cuda: out of GPU memory (%s)", what);
    return kvs_fail(KVS_ERR_INTERNAL, "cuda: %s: %s", what, cudaGetErrorString(e));
}

extern "C" bool cuda_built(void) { return true; }

extern "C" bool cuda_type_supported(int t) {
    switch (t) {
    case T_F32: case T_F16: case T_BF16: case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1:
    case T_Q8_0: case T_Q4_K: case T_Q6_K: return true;
    default: return false;
    }
}

/* ---- dequantization of 32-element units ------------------------------------------------------
 * Every supported type is read in units of 32 consecutive elements of a row (a block of the
 * 32-element formats, a group of Q4_K, two groups of Q6_K), 8 elements at a time (deq8 below,
 * with the same formulas as quant.c's references). */

#define HD __host__ __device__ __forceinline__ /* also run on the host: cuda_host_deq8 */
#ifdef __CUDA_ARCH__
#define UNROLL _Pragma("unroll")
#else
#define UNROLL
#endif

/* The device layout of a row of a block format ("planes"): the quant bytes of all its blocks first
 * (QB bytes a block), then the rest of each block (scales, minimums, high bits: MB = B - QB bytes a
 * block, in the block's own order), so that every 8 bytes of quants a lane reads are 8-byte
 * aligned and a Q4_K block's scales are one 16-byte load. Rows start on 16-byte boundaries
 * (device row stride: the GGUF row size rounded up to 16). F32/F16/BF16 rows are copied as they are. */
struct planes { int B, QO, QB, EPB; }; /* block bytes, the quants' offset in it, their bytes, elements */
HD constexpr planes planes_of(int type) {
    return type == T_Q4_0 ? planes{18, 2, 16, 32} : type == T_Q4_1 ? planes{20, 4, 16, 32}
         : type == T_Q5_0 ? planes{22, 6, 16, 32} : type == T_Q5_1 ? planes{24, 8, 16, 32}
         : type == T_Q8_0 ? planes{34, 2, 32, 32} : type == T_Q4_K ? planes{144, 16, 128, 256}
         : type == T_Q6_K ? planes{210, 0, 192, 256} : planes{0, 0, 0, 0};
}

/* a GGUF row (row_bytes) in the planes layout (dst: round_up(row_bytes, 16) bytes) */
static void planes_row(int type, const uint8_t *src, size_t row_bytes, int64_t cols, uint8_t *dst) {
    planes f = planes_of(type);
    size_t rbd = (row_bytes + 15) / 16 * 16;
    memset(dst + row_bytes, 0, rbd - row_bytes);
    if (!f.B) {
        memcpy(dst, src, row_bytes);
        return;
    }
    int64_t nb = cols / f.EPB;
    int mb = f.B - f.QB;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *s = src + b * f.B;
        uint8_t *m = dst + nb * f.QB + b * mb;
        memcpy(dst + b * f.QB, s + f.QO, (size_t)f.QB);
        memcpy(m, s, (size_t)f.QO);
        memcpy(m + f.QO, s + f.QO + f.QB, (size_t)(f.B - f.QO - f.QB));
    }
}

/* aligned loads; on the host (cuda_host_deq8, from a 16-byte aligned row) a misaligned one is
 * counted, so the host check catches what would fault on the GPU */
static thread_local int host_misaligned;
#ifndef __CUDA_ARCH__
#define ALIGNED(p, n) (host_misaligned += ((uintptr_t)(p) % (n)) != 0)
#else
#define ALIGNED(p, n) ((void)0)
#endif
HD unsigned ld_u16(const uint8_t *p) {
    ALIGNED(p, 2);
    return *(const unsigned short *)p;
}
HD unsigned ld_u32(const uint8_t *p) {
    ALIGNED(p, 4);
    return *(const unsigned *)p;
}
HD uint2 ld_u64(const uint8_t *p) {
    ALIGNED(p, 8);
    return *(const uint2 *)p;
}
HD uint4 ld_u128(const uint8_t *p) {
    ALIGNED(p, 16);
    return *(const uint4 *)p;
}
HD float f16_bits(unsigned h) {
    return __half2float(__ushort_as_half((unsigned short)(h & 0xffffu)));
}
HD int byte_of(uint2 v, int i) {
    return (int)(((i < 4 ? v.x : v.y) >> (8 * (i & 3))) & 255u);
}
HD int byte_at(unsigned v, int i) {
    return (int)((v >> (8 * i)) & 255u);
}

HD float bits_f32(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* deq8<TYPE>(row, cols, u, p, w): elements 8p .. 8p+7 of unit u (p in 0..3) of a row in the planes
 * layout as w[i] * (the returned factor), with the formulas of quant.c's references. Formats
 * without a minimum return their block scale as the factor, so the dot product multiplies by it
 * once per 8 elements. */
template <int TYPE>
HD float deq8(const uint8_t *row, int cols, int u, int p, float *w) {
    constexpr planes f = planes_of(TYPE);
    const uint8_t *meta = row + (size_t)(cols / (f.EPB ? f.EPB : 1)) * f.QB; /* the second plane */
    if (TYPE == T_F32) {
        uint4 a = ld_u128(row + (size_t)u * 128 + p * 32), b = ld_u128(row + (size_t)u * 128 + p * 32 + 16);
        w[0] = bits_f32(a.x), w[1] = bits_f32(a.y), w[2] = bits_f32(a.z), w[3] = bits_f32(a.w);
        w[4] = bits_f32(b.x), w[5] = bits_f32(b.y), w[6] = bits_f32(b.z), w[7] = bits_f32(b.w);
        return 1.0f;
    } else if (TYPE == T_F16 || TYPE == T_BF16) {
        uint4 v = ld_u128(row + (size_t)u * 64 + p * 16);
        unsigned h[4] = {v.x, v.y, v.z, v.w};
UNROLL
        for (int i = 0; i < 4; i++) {
            if (TYPE == T_F16) {
                w[2 * i] = f16_bits(h[i]);
                w[2 * i + 1] = f16_bits(h[i] >> 16);
            } else {
                w[2 * i] = bits_f32(h[i] << 16);
                w[2 * i + 1] = bits_f32(h[i] & 0xffff0000u);
            }
        }
        return 1.0f;
    } else if (TYPE == T_Q4_0 || TYPE == T_Q4_1) {
        uint2 q = ld_u64(row + (size_t)u * 16 + 8 * (p & 1));
        int sh = (p >> 1) * 4;
        if (TYPE == T_Q4_0) {
            float d = f16_bits(ld_u16(meta + (size_t)u * 2));
UNROLL
            for (int i = 0; i < 8; i++) w[i] = (float)(((byte_of(q, i) >> sh) & 15) - 8);
            return d;
        } else {
            unsigned dm = ld_u32(meta + (size_t)u * 4);
            float d = f16_bits(dm), m = f16_bits(dm >> 16);
UNROLL
            for (int i = 0; i < 8; i++) w[i] = (float)((byte_of(q, i) >> sh) & 15) * d + m;
            return 1.0f;
        }
    } else if (TYPE == T_Q5_0 || TYPE == T_Q5_1) {
        uint2 q = ld_u64(row + (size_t)u * 16 + 8 * (p & 1));
        int sh = (p >> 1) * 4;
        uint32_t qh;
        float d, m = 0.0f;
        if (TYPE == T_Q5_0) { /* d, qh: 6 bytes */
            const uint8_t *mb = meta + (size_t)u * 6;
            d = f16_bits(ld_u16(mb));
            qh = ld_u16(mb + 2) | (ld_u16(mb + 4) << 16);
        } else { /* d, m, qh: 8 bytes */
            const uint8_t *mb = meta + (size_t)u * 8;
            unsigned dm = ld_u32(mb);
            d = f16_bits(dm), m = f16_bits(dm >> 16);
            qh = ld_u32(mb + 4);
        }
        qh >>= 8 * p;
        if (TYPE == T_Q5_0) {
UNROLL
            for (int i = 0; i < 8; i++)
                w[i] = (float)((((byte_of(q, i) >> sh) & 15) | (int)(((qh >> i) & 1u) << 4)) - 16);
        } else {
UNROLL
            for (int i = 0; i < 8; i++)
                w[i] = (float)(((byte_of(q, i) >> sh) & 15) | (int)(((qh >> i) & 1u) << 4)) * d + m;
        }
        return TYPE == T_Q5_0 ? d : 1.0f;
    } else if (TYPE == T_Q8_0) {
        uint2 q = ld_u64(row + (size_t)u * 32 + 8 * p);
UNROLL
        for (int i = 0; i < 8; i++) w[i] = (float)(int)(signed char)byte_of(q, i);
        return f16_bits(ld_u16(meta + (size_t)u * 2));
    } else if (TYPE == T_Q4_K) {
        int g = u & 7, c = g >> 1, j = g & 3;
        uint2 q = ld_u64(row + (size_t)(u >> 3) * 128 + 32 * c + 8 * p);
        uint4 h = ld_u128(meta + (size_t)(u >> 3) * 16); /* d, dmin, then the 12 scale bytes in y, z, w */
        int sc, mn;
        if (g < 4) sc = byte_at(h.y, j) & 63, mn = byte_at(h.z, j) & 63;
        else
            sc = (byte_at(h.w, j) & 15) | ((byte_at(h.y, j) >> 6) << 4),
            mn = (byte_at(h.w, j) >> 4) | ((byte_at(h.z, j) >> 6) << 4);
        float dl = f16_bits(h.x) * (float)sc, ml = f16_bits(h.x >> 16) * (float)mn;
        int sh = (g & 1) * 4;
UNROLL
        for (int i = 0; i < 8; i++) w[i] = dl * (float)((byte_of(q, i) >> sh) & 15) - ml;
        return 1.0f;
    } else { /* T_Q6_K: ql (128), qh (64) in the quant plane; scales (16), d in the second */
        const uint8_t *b = row + (size_t)(u >> 3) * 192, *mb = meta + (size_t)(u >> 3) * 18;
        int e0 = (u & 7) * 32, n = e0 >> 7, k = (e0 & 127) >> 5;
        uint2 lo = ld_u64(b + 64 * n + ((k & 1) ? 32 : 0) + 8 * p);
        uint2 hi = ld_u64(b + 128 + 32 * n + 8 * p);
        int shl = (k & 2) ? 4 : 0, shh = 2 * k;
UNROLL
        for (int i = 0; i < 8; i++)
            w[i] = (float)((((byte_of(lo, i) >> shl) & 15) | (((byte_of(hi, i) >> shh) & 3) << 4)) - 32);
        const int8_t *sc = (const int8_t *)mb + (u & 7) * 2;
        return f16_bits(ld_u16(mb + 16)) * (float)sc[p >> 1];
    }
}

/* the same 8 elements with the factor applied (the tiles and the embedding; for the formats with
 * a minimum the factor is 1, for the others one rounding, as in the reference) */
template <int TYPE>
HD void deq8_scaled(const uint8_t *row, int cols, int u, int p, float *w) {
    float f = deq8<TYPE>(row, cols, u, p, w);
    UNROLL
    for (int i = 0; i < 8; i++) w[i] *= f;
}

/* ---- small kernels ----------------------------------------------------------------------- */

/* one row of cols elements (GGUF blocks, the planes layout) as fp32 into out, by the block's threads */
template <int TYPE>
__device__ __forceinline__ void deq_row(const uint8_t *row, int cols, float *out) {
    for (int u = threadIdx.x; u < cols / 32; u += blockDim.x)
#pragma unroll
        for (int p = 0; p < 4; p++) {
            float w[8];
            deq8_scaled<TYPE>(row, cols, u, p, w);
#pragma unroll
            for (int i = 0; i < 8; i++) out[u * 32 + p * 8 + i] = w[i];
        }
}

template <int TYPE>
__global__ void k_embed(const uint8_t *E, size_t rb, int d, const int32_t *tok, float *x) {
    deq_row<TYPE>(E + (size_t)tok[blockIdx.x] * rb, d, x + (size_t)blockIdx.x * d);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* out[r] = x[rows ? rows[r] : r] * rsqrt(mean square + eps) * w; blockDim 256 */
__global__ void k_rmsnorm(const float *x, const int *rows, const float *w, float *out, int n, float eps) {
    __shared__ float red[8];
    int r = blockIdx.x;
    const float *xr = x + (size_t)(rows ? rows[r] : r) * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.0f;
        v = warp_sum(v);
        if (threadIdx.x == 0) red[0] = v;
    }
    __syncthreads();
    float s = 1.0f / sqrtf(red[0] / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[(size_t)r * n + i] = xr[i] * s * w[i];
}

/* SwiGLU of one element: the one formula of k_swiglu and the fused gate/up GEMV, so that both
 * paths give the same bits */
__device__ __forceinline__ float silu_mul(float g, float u) {
    return g / (1.0f + expf(-g)) * u;
}

/* g = silu(g) * u on rows tix[0 ..) of ld columns (n elements in all) */
__global__ void k_swiglu(float *g, const float *u, int ld, const int *tix, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    size_t o = (size_t)tix[i / ld] * ld + i % ld;
    g[o] = silu_mul(g[o], u[o]);
}

/* ---- matmul ---------------------------------------------------------------------------------- */

/* y[t][r] = sum_c W[r][c] x[t][c] (+ y[t][r] when add: the residual stream) for NT tokens.
 * KS warps of a block share GR rows, and the block's GV_WARPS / KS groups of warps take
 * consecutive row pairs. Lane l of a warp reads
 * elements 8(l & 3) .. 8(l & 3) + 7 of the 8 units (l / 4) + 8 k, so each load of x by the warp is
 * one contiguous kilobyte and every x value loaded serves GR rows; warp k of a group takes the
 * sweeps of 8 units k, k + KS, k + 2 KS, ... (split K: a long row is read by KS warps at once),
 * and its loop is unrolled so that several sweeps' loads are in flight. The KS partial sums meet in
 * shared memory in a fixed order, so the result depends on the matrix's shape alone.
 * With W2 (the FFN's up matrix beside W, its gate, of the same type and shape), a warp's two rows
 * are row r of W and row r of W2, and y[t][r] = silu(gate) * up: the same sums as two separate
 * products, and the SwiGLU of k_swiglu, in one launch. */
enum { GV_WARPS = 8, GR = 2 };

/* one unit's 8 weights of each row times a token's 8 activations, into the token's sums: the one
 * order of operations of every GEMV variant, so that their results are the same bits */
__device__ __forceinline__ void gemv_fma(const float (&w)[GR][8], const float (&f)[GR], float4 xa, float4 xb,
                                         float (&acc)[GR]) {
#pragma unroll
    for (int g = 0; g < GR; g++) {
        float a = w[g][0] * xa.x;
        a = fmaf(w[g][1], xa.y, a), a = fmaf(w[g][2], xa.z, a), a = fmaf(w[g][3], xa.w, a);
        a = fmaf(w[g][4], xb.x, a), a = fmaf(w[g][5], xb.y, a), a = fmaf(w[g][6], xb.z, a);
        a = fmaf(w[g][7], xb.w, a);
        acc[g] = fmaf(f[g], a, acc[g]);
    }
}

/* NW warps a block. STAGE (batched decode, NT >= 8): the activations of each sweep (8 ks units,
 * 256 ks columns) are staged in shared memory, GX_TC tokens at a time, and read from there by
 * every row group of the block: the block reads each activation from L2 once instead of once per
 * warp, and holds more row groups (NW / ks) than GV_WARPS would. Each lane still takes the units
 * (lane >> 2) + 8 kw + 8 ks i, and sums in the same order: the same bits as NT = 1. */
enum { GX_TC = 4 /* tokens staged at a time: 4 * 256 ks floats, at most 32 KiB */,
       GX_WARPS = 16 /* warps a staged block (their sums take up to 128 registers a thread) */ };
template <int TYPE, int NT, int NW, bool STAGE>
__device__ __forceinline__ void gemv_body(const uint8_t *__restrict__ W, const uint8_t *__restrict__ W2, size_t rb,
                                          int rows, int cols, int ks, const float *__restrict__ x, int ldx,
                                          const int *__restrict__ tix, float *__restrict__ y, int ldy, int add) {
    __shared__ float red[NW][NT][GR];
    extern __shared__ float4 xs[]; /* STAGE: (GX_TC, 64 ks) float4 */
    constexpr int UN = NT <= 2 ? 4 : NT <= 4 ? 2 : 1; /* sweeps unrolled: fewer as the tokens' sums take registers */
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, p = lane & 3, groups = NW / ks;
    int pair = W2 != NULL, rg = blockIdx.x * groups + warp / ks, kw = warp % ks, r0 = pair ? rg : rg * GR;
    int ng = pair ? (r0 < rows ? GR : 0) : rows - r0 < GR ? rows - r0 : GR, nu = cols / 32;
    float acc[NT][GR];
#pragma unroll
    for (int t = 0; t < NT; t++)
#pragma unroll
        for (int g = 0; g < GR; g++) acc[t][g] = 0.0f;
    /* the rows' 8 weights of unit u first (an odd last row pair reads its one row twice: no
     * branch between the loads), then each token's 8 activations: a launch reads the weights
     * once for all its tokens, and a token's sums are the same whatever NT is */
    auto deq_rows = [&](int u, float (&w)[GR][8], float (&f)[GR]) {
#pragma unroll
        for (int g = 0; g < GR; g++) {
            const uint8_t *row = pair ? (g ? W2 : W) + (size_t)r0 * rb
                                      : W + (size_t)(r0 + (g < ng ? g : ng - 1)) * rb;
            f[g] = deq8<TYPE>(row, cols, u, p, w[g]);
        }
    };
    if (!STAGE && ng > 0) {
#pragma unroll UN
        for (int u = (lane >> 2) + 8 * kw; u < nu; u += 8 * ks) {
            float w[GR][8], f[GR];
            deq_rows(u, w, f);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                const float4 *xp = (const float4 *)(x + (size_t)tix[t] * ldx + (size_t)u * 32 + p * 8);
                gemv_fma(w, f, xp[0], xp[1], acc[t]);
            }
        }
    }
    if (STAGE) {
        const int span = 8 * ks; /* units of a sweep */
        for (int u0 = 0; u0 < nu; u0 += span) {
            int u = u0 + (lane >> 2) + 8 * kw, nc4 = ((nu - u0 < span ? nu - u0 : span) * 32) / 4;
            bool mine = ng > 0 && u < nu;
            float w[GR][8], f[GR];
            if (mine) deq_rows(u, w, f);
#pragma unroll
            for (int t0 = 0; t0 < NT; t0 += GX_TC) {
                __syncthreads(); /* the previous tokens' activations are read */
                for (int i = threadIdx.x; i < GX_TC * nc4; i += NW * 32) {
                    int tt = i / nc4, c = i % nc4;
                    xs[tt * (span * 8) + c] = ((const float4 *)(x + (size_t)tix[t0 + tt] * ldx + (size_t)u0 * 32))[c];
                }
                __syncthreads();
                if (mine)
#pragma unroll
                    for (int tt = 0; tt < GX_TC; tt++) {
                        const float4 *xp = xs + tt * (span * 8) + (u - u0) * 8 + p * 2;
                        gemv_fma(w, f, xp[0], xp[1], acc[t0 + tt]);
                    }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < NT; t++)
#pragma unroll
        for (int g = 0; g < GR; g++) {
            float s = warp_sum(acc[t][g]);
            if (lane == 0) red[warp][t][g] = s;
        }
    __syncthreads();
    auto ksum = [&](int grp, int t, int g) { /* the group's KS warps' sums, in warp order */
        float s = red[grp * ks][t][g];
        for (int k = 1; k < ks; k++) s += red[grp * ks + k][t][g];
        return s;
    };
    if (pair) {
        for (int i = threadIdx.x; i < groups * NT; i += blockDim.x) {
            int grp = i / NT, t = i % NT, r = blockIdx.x * groups + grp;
            if (r < rows) y[(size_t)tix[t] * ldy + r] = silu_mul(ksum(grp, t, 0), ksum(grp, t, 1));
        }
    } else for (int i = threadIdx.x; i < groups * NT * GR; i += blockDim.x) {
        int grp = i / (NT * GR), t = i / GR % NT, g = i % GR, r = (blockIdx.x * groups + grp) * GR + g;
        if (r < rows) {
            float s = ksum(grp, t, g), *yo = y + (size_t)tix[t] * ldy + r;
            *yo = add ? *yo + s : s;
        }
    }
}

template <int TYPE, int NT>
__global__ void __launch_bounds__(GV_WARPS * 32) k_gemv(const uint8_t *__restrict__ W, const uint8_t *__restrict__ W2,
                                                       size_t rb, int rows, int cols, int ks, const float *__restrict__ x,
                                                       int ldx, const int *__restrict__ tix, float *__restrict__ y,
                                                       int ldy, int add) {
    gemv_body<TYPE, NT, GV_WARPS, false>(W, W2, rb, rows, cols, ks, x, ldx, tix, y, ldy, add);
}

/* (min 1 block an SM: room for the sums' registers) */
template <int TYPE, int NT>
__global__ void __launch_bounds__(GX_WARPS * 32, 1) k_gemv_x(const uint8_t *__restrict__ W,
                                                            const uint8_t *__restrict__ W2, size_t rb, int rows,
                                                            int cols, int ks, const float *__restrict__ x, int ldx,
                                                            const int *__restrict__ tix, float *__restrict__ y,
                                                            int ldy, int add) {
    gemv_body<TYPE, NT, GX_WARPS, true>(W, W2, rb, rows, cols, ks, x, ldx, tix, y, ldy, add);
}

/* warps of k_gemv that share a row pair: enough sweeps of 8 units each to pipeline (two or more),
 * as many warps as that allows, at most a block's */
static int gemv_split(int cols) {
    int sweeps = (cols / 32 + 7) / 8, ks = 1;
    while (ks < GV_WARPS && sweeps / (2 * ks) >= 2) ks *= 2;
    return ks;
}

enum { GT = 64 /* rows and tokens per GEMM tile */ };

/* the same product for many tokens: 64 x 64 outputs per block of 256 threads */
template <int TYPE>
__global__ void __launch_bounds__(256) k_gemm(const uint8_t *W, size_t rb, int rows, int cols,
                                              const float *x, int ldx, const int *tix, int T, float *y,
                                              int ldy, int add) {
    __shared__ float Ws[GT][33], Xs[GT][33];
    int r0 = blockIdx.x * GT, t0 = blockIdx.y * GT, tid = threadIdx.x;
    int tx = tid & 15, ty = tid >> 4, lr = tid >> 2, part = tid & 3;
    float acc[4][4] = {};
    for (int u = 0; u < cols / 32; u++) {
        float w8[8];
        if (r0 + lr < rows) deq8_scaled<TYPE>(W + (size_t)(r0 + lr) * rb, cols, u, part, w8);
        else
            for (int i = 0; i < 8; i++) w8[i] = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) Ws[lr][part * 8 + i] = w8[i];
        if (t0 + lr < T) {
            const float4 *xp = (const float4 *)(x + (size_t)tix[t0 + lr] * ldx + (size_t)u * 32 + part * 8);
            float4 a = xp[0], b = xp[1];
            Xs[lr][part * 8 + 0] = a.x, Xs[lr][part * 8 + 1] = a.y, Xs[lr][part * 8 + 2] = a.z, Xs[lr][part * 8 + 3] = a.w;
            Xs[lr][part * 8 + 4] = b.x, Xs[lr][part * 8 + 5] = b.y, Xs[lr][part * 8 + 6] = b.z, Xs[lr][part * 8 + 7] = b.w;
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) Xs[lr][part * 8 + i] = 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < 32; k++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = Ws[ty * 4 + i][k], b[i] = Xs[tx * 4 + i][k];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int r = r0 + ty * 4 + i, t = t0 + tx * 4 + j;
            if (r < rows && t < T) {
                float *yo = y + (size_t)tix[t] * ldy + r;
                *yo = add ? *yo + acc[i][j] : acc[i][j];
            }
        }
}

struct dweight { const uint8_t *d; int type; int rows, cols; size_t rb; };

/* y rows tix[0..n_lone) through the GEMV (up to 32 tokens a launch), tix[n_lone..n) through the tiles.
 * Which one a token takes depends on its own sequence alone (a sequence's lone token in the
 * pass: a decode step), so a sequence's results never depend on what else is in the batch.
 * With w2 (gate w and up w2 of one type and shape): y = silu(x w^T) * (x w2^T), the tiled
 * tokens' up products going through y2 (rows as y's) first. */
/* cuBLAS for prompt chunks (KVS_CUDA_PREFILL=sgemm: fp32 products; tf32: tensor cores on
 * TF32-rounded inputs; tiles, the default: k_gemm), opened at run time so that the binary needs
 * no cuBLAS unless asked. A weight matrix is dequantised to fp32 rows, the chunk's activation rows
 * gathered, one GEMM (two for gate and up), the result scattered back (added for the residual
 * products, SwiGLU for gate and up). The GEMM's order of sums depends on the chunk's size, so
 * unlike the tiles a prompt token's bits then depend on the other prompt tokens of its pass. */
struct blas {
    void *lib;
    cublasHandle_t h;
    cublasComputeType_t compute;
    cublasStatus_t (*gemm)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void *,
                           const void *, cudaDataType, int, const void *, cudaDataType, int, const void *, void *,
                           cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
    cublasStatus_t (*destroy)(cublasHandle_t);
};

/* how launch_mm runs a product: stage, the fewest blocks a staged GEMV launch must have to be
 * used (the device's SM count, so that its larger blocks still fill the device; INT_MAX: never,
 * KVS_CUDA_STAGE=0 in the environment, the same bits either way, for comparing their speed);
 * b (NULL: the tiles) and its scratch: wf (wf_cap floats) a dequantised matrix, xg, yg, yg2
 * (t_max rows of mm_cols / mm_rows floats) */
struct mm_cfg {
    int stage;
    const blas *b;
    float *wf, *xg, *yg, *yg2;
    size_t wf_cap;
};

/* rows of W (GGUF blocks, the planes layout) as fp32, a block a row */
template <int TYPE>
__global__ void k_deq_rows(const uint8_t *W, size_t rb, int cols, float *out) {
    deq_row<TYPE>(W + (size_t)blockIdx.x * rb, cols, out + (size_t)blockIdx.x * cols);
}

/* xg (T, cols) = rows tix[0..T) of x */
__global__ void k_gather_rows(const float *x, int ldx, const int *tix, int cols, float *xg) {
    const float *src = x + (size_t)tix[blockIdx.x] * ldx;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) xg[(size_t)blockIdx.x * cols + c] = src[c];
}

/* rows tix[0..T) of y (ldy) from yg (T, rows): set, added (add), or silu(yg) * yg2 (yg2) */
__global__ void k_scatter_rows(float *y, int ldy, const int *tix, int rows, const float *yg, const float *yg2,
                               int add) {
    float *dst = y + (size_t)tix[blockIdx.x] * ldy;
    const float *a = yg + (size_t)blockIdx.x * rows, *b = yg2 ? yg2 + (size_t)blockIdx.x * rows : NULL;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        float v = b ? silu_mul(a[r], b[r]) : a[r];
        dst[r] = add ? dst[r] + v : v;
    }
}

/* the tiled tokens' product through cuBLAS: false (nothing done) when it does not apply */
template <int TYPE>
static bool blas_mm(const dweight *w, const dweight *w2, const float *x, int ldx, const int *tix, int nt, float *y,
                    int ldy, int add, cudaStream_t st, const mm_cfg *mc) {
    const blas *b = mc->b;
    if (!b || nt < 16 || (size_t)w->rows * w->cols > mc->wf_cap) return false;
    const float one = 1.0f, zero = 0.0f;
    k_gather_rows<<<nt, 256, 0, st>>>(x, ldx, tix, w->cols, mc->xg);
    k_deq_rows<TYPE><<<w->rows, 64, 0, st>>>(w->d, w->rb, w->cols, mc->wf);
    /* column-major: yg^T (rows, nt) = W^T' (W's rows as columns, transposed) . xg^T (cols, nt) */
    bool ok = b->gemm(b->h, CUBLAS_OP_T, CUBLAS_OP_N, w->rows, nt, w->cols, &one, mc->wf, CUDA_R_32F, w->cols, mc->xg,
                      CUDA_R_32F, w->cols, &zero, mc->yg, CUDA_R_32F, w->rows, b->compute, CUBLAS_GEMM_DEFAULT) ==
              CUBLAS_STATUS_SUCCESS;
    if (ok && w2) {
        k_deq_rows<TYPE><<<w2->rows, 64, 0, st>>>(w2->d, w2->rb, w2->cols, mc->wf);
        ok = b->gemm(b->h, CUBLAS_OP_T, CUBLAS_OP_N, w2->rows, nt, w2->cols, &one, mc->wf, CUDA_R_32F, w2->cols, mc->xg,
                     CUDA_R_32F, w2->cols, &zero, mc->yg2, CUDA_R_32F, w2->rows, b->compute, CUBLAS_GEMM_DEFAULT) ==
             CUBLAS_STATUS_SUCCESS;
    }
    if (!ok) return false; /* (the tiles then compute it: the same product) */
    k_scatter_rows<<<nt, 256, 0, st>>>(y, ldy, tix, w->rows, mc->yg, w2 ? mc->yg2 : NULL, add);
    return true;
}

template <int TYPE>
static void launch_mm(const dweight *w, const dweight *w2, const float *x, int ldx, const int *tix, int n_lone,
                      int n, float *y, int ldy, int add, float *y2, cudaStream_t st, const mm_cfg *mc) {
    int stage = mc->stage;
    int ks = gemv_split(w->cols), per = GV_WARPS / ks * (w2 ? 1 : GR), blocks = (w->rows + per - 1) / per;
    const uint8_t *d2 = w2 ? w2->d : NULL;
    for (int t0 = 0, nt; t0 < n_lone; t0 += nt) {
        const int *ti = tix + t0;
        int rem = n_lone - t0;
        nt = rem >= 32 ? 32 : rem >= 16 ? 16 : rem >= 8 ? 8 : rem; /* tokens of this launch */
        int pb = GX_WARPS / ks * (w2 ? 1 : GR), bl = (w->rows + pb - 1) / pb;
        /* staged only where its larger blocks still fill the device (not the small K/V matrices) */
        if (nt >= 8 && bl >= stage) {
            size_t sm = (size_t)GX_TC * 256 * ks * sizeof(float);
            switch (nt) {
#define GS(k) case k: k_gemv_x<TYPE, k><<<bl, GX_WARPS * 32, sm, st>>>(w->d, d2, w->rb, w->rows, w->cols, ks, x, ldx, ti, y, ldy, add); break;
            GS(8) GS(16) GS(32)
#undef GS
            }
            continue;
        }
        switch (nt) {
#define GV(k) case k: k_gemv<TYPE, k><<<blocks, GV_WARPS * 32, 0, st>>>(w->d, d2, w->rb, w->rows, w->cols, ks, x, ldx, ti, y, ldy, add); break;
        GV(1) GV(2) GV(3) GV(4) GV(5) GV(6) GV(7) GV(8) GV(16) GV(32)
#undef GV
        }
    }
    if (n > n_lone && !blas_mm<TYPE>(w, w2, x, ldx, tix + n_lone, n - n_lone, y, ldy, add, st, mc)) {
        int nt = n - n_lone;
        dim3 grid((w->rows + GT - 1) / GT, (nt + GT - 1) / GT);
        k_gemm<TYPE><<<grid, 256, 0, st>>>(w->d, w->rb, w->rows, w->cols, x, ldx, tix + n_lone, nt, y, ldy, add);
        if (w2) {
            k_gemm<TYPE><<<grid, 256, 0, st>>>(w2->d, w2->rb, w2->rows, w2->cols, x, ldx, tix + n_lone, nt, y2,
                                               ldy, 0);
            size_t ne = (size_t)nt * w->rows;
            k_swiglu<<<(unsigned)((ne + 255) / 256), 256, 0, st>>>(y, y2, w->rows, tix + n_lone, ne);
        }
    }
}

static void matmul2(const dweight *w, const dweight *w2, const float *x, int ldx, const int *tix, int n_lone,
                    int n, float *y, int ldy, int add, float *y2, cudaStream_t st, const mm_cfg *mc) {
    switch (w->type) {
#define MM(t) case t: launch_mm<t>(w, w2, x, ldx, tix, n_lone, n, y, ldy, add, y2, st, mc); break;
    MM(T_F32) MM(T_F16) MM(T_BF16) MM(T_Q4_0) MM(T_Q4_1) MM(T_Q5_0) MM(T_Q5_1) MM(T_Q8_0) MM(T_Q4_K) MM(T_Q6_K)
#undef MM
    }
}

static void matmul(const dweight *w, const float *x, int ldx, const int *tix, int n_lone, int n, float *y,
                   int ldy, cudaStream_t st, const mm_cfg *mc, int add = 0) {
    matmul2(w, NULL, x, ldx, tix, n_lone, n, y, ldy, add, NULL, st, mc);
}

static void embed(const dweight *w, const int32_t *tok, int T, float *x, cudaStream_t st) {
    switch (w->type) {
#define EM(t) case t: k_embed<t><<<T, 64, 0, st>>>(w->d, w->rb, w->cols, tok, x); break;
    EM(T_F32) EM(T_F16) EM(T_BF16) EM(T_Q4_0) EM(T_Q4_1) EM(T_Q5_0) EM(T_Q5_1) EM(T_Q8_0) EM(T_Q4_K) EM(T_Q6_K)
#undef EM
    }
}

/* ---- K/V cache and attention ------------------------------------------------------------------ */

/* a slot's cache: K and V each (n_layer, n_head_kv, cap, hd) fp16, entries in order of arrival
 * (every KV head of a layer holds as many: lens[layer] of d_lens); qr: the post-RoPE queries of
 * the newest tokens, (n_layer, qwin, n_head, hd) fp32, kept for policies that score with them
 * (NULL: none kept); acc (slots with acc_on, H2O): (n_layer, nkv, cap) fp32, the attention each
 * entry has received, averaged over its group's query heads, summed over the queries that saw it;
 * n: the most entries of any layer */
struct dseq { __half *k, *v; float *qr, *acc; int cap, n, qwin, acc_on; };

/* biases, RoPE, and K/V appended as entry lens[slot][layer] + rank[t] of the token's layer;
 * one block per (token, head): query heads 0 .. nh - 1 (copied into the slot's query ring at
 * qix[t] when >= 0), then the KV heads, whose blocks also append K and V to the cache */
__global__ void k_qkv_post(float *q, float *k, const float *v, const float *bq, const float *bk,
                           const float *bv, const int32_t *pos, const int *slot, const int *rank,
                           const int *qix, const int *lens, const dseq *seqs, int layer, int n_layer,
                           int nh, int nkv, int hd, const float *inv_freq, int neox) {
    int t = blockIdx.x, h = blockIdx.y, kh = h - nh, half = hd / 2;
    float *x = kh < 0 ? q + ((size_t)t * nh + h) * hd : k + ((size_t)t * nkv + kh) * hd;
    const float *b = !bq ? NULL : kh < 0 ? bq + (size_t)h * hd : bk + (size_t)kh * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        double a = (double)pos[t] * (double)inv_freq[i];
        float c = (float)cos(a), s = (float)sin(a);
        int ia = neox ? i : 2 * i, ib = neox ? i + half : 2 * i + 1;
        float x0 = x[ia], x1 = x[ib];
        if (b) x0 += b[ia], x1 += b[ib];
        x[ia] = x0 * c - x1 * s;
        x[ib] = x0 * s + x1 * c;
    }
    __syncthreads();
    dseq sq = seqs[slot[t]];
    if (kh < 0) {
        if (qix[t] < 0 || !sq.qr) return;
        float *dst = sq.qr + (((size_t)layer * sq.qwin + qix[t]) * nh + h) * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) dst[d] = x[d];
        return;
    }
    const float *vt = v + ((size_t)t * nkv + kh) * hd, *bvh = bv ? bv + (size_t)kh * hd : NULL;
    int at = lens[slot[t] * n_layer + layer] + rank[t];
    size_t o = (((size_t)layer * nkv + kh) * sq.cap + at) * hd;
    if (sq.acc && threadIdx.x == 0) sq.acc[((size_t)layer * nkv + kh) * sq.cap + at] = 0.0f;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        sq.k[o + d] = __float2half_rn(x[d]);
        sq.v[o + d] = __float2half_rn(bvh ? vt[d] + bvh[d] : vt[d]);
    }
}

enum { AT = 128 /* keys per tile = threads per block */, MAXG = 16 /* query heads per KV head */,
       SPLIT_KEYS = 64, MAX_SPLIT = 128 /* a lone decode token's keys: splits of 64 or more, 128 at most */ };

/* sc[qi] += q_qi . k over dimensions 8c .. 8c + 7 for the g (< G) query heads of a group (queries
 * (g, hd) in shared memory, k4 those 8 dimensions of a key in fp16), in k_attn's order of sums */
template <int G>
__device__ __forceinline__ void qk8(uint4 k4, const float *qs, int hd, int c, int g, float *sc) {
    float2 f0 = __half22float2(*(const __half2 *)&k4.x), f1 = __half22float2(*(const __half2 *)&k4.y),
           f2 = __half22float2(*(const __half2 *)&k4.z), f3 = __half22float2(*(const __half2 *)&k4.w);
#pragma unroll
    for (int qi = 0; qi < G; qi++)
        if (qi < g) {
            const float4 *qp = (const float4 *)(qs + qi * hd + 8 * c);
            float4 qa = qp[0], qb = qp[1];
            sc[qi] += qa.x * f0.x + qa.y * f0.y;
            sc[qi] += qa.z * f1.x + qa.w * f1.y;
            sc[qi] += qb.x * f2.x + qb.y * f2.y;
            sc[qi] += qb.z * f3.x + qb.w * f3.y;
        }
}

/* partial attention of token t's query heads of KV head h over key split s of its visible keys
 * (entries 0 .. lens[slot][layer] + rank[t]: those before the pass and the pass's own up to t): unnormalised o, running max m and sum l, for k_att_combine */
template <int DPL /* head dimensions per lane: hd / 32 */, int G /* query heads per KV head; MAXG: any up to it */>
__global__ void __launch_bounds__(AT) k_attn(const float *q, const int *rank, const int *lens, const int *slot,
                                             const int *nsp, const int *poff, const dseq *seqs, int layer,
                                             int n_layer, int nh, int nkv, int hd, float scale, float *part) {
    extern __shared__ float sm[];
    int t = blockIdx.x, h = blockIdx.y, s = blockIdx.z, tid = threadIdx.x, nsplit = nsp[t];
    if (s >= nsplit) return;
    int g = G < MAXG ? G : nh / nkv, lane = tid & 31, warp = tid >> 5;
    float *qs = sm, *S = qs + g * hd, *mst = S + g * AT, *lst = mst + g, *alpha = lst + g;
    /* the tile's keys, staged by coalesced 16-byte loads: a row of hd/2 + 4 words each (16-byte
     * aligned), so the threads reading their own rows 16 bytes at a time hit distinct banks */
    uint32_t *Ks = (uint32_t *)(sm + ((g * hd + g * AT + 3 * g + 3) & ~3)), *Vs = Ks + AT * (hd / 2 + 4);
    const int kw = hd / 2 + 4, wpr = hd / 8; /* (V's tile: rows of hd halves) */
    dseq sq = seqs[slot[t]];
    int nvis = lens[slot[t] * n_layer + layer] + rank[t] + 1; /* its own entry and those before */
    int k0 = (int)((long long)nvis * s / nsplit), k1 = (int)((long long)nvis * (s + 1) / nsplit);
    const __half *K = sq.k + ((size_t)layer * nkv + h) * sq.cap * hd;
    const __half *V = sq.v + ((size_t)layer * nkv + h) * sq.cap * hd;
    const float *qt = q + (size_t)t * nh * hd + (size_t)h * g * hd;
    for (int i = tid; i < g * hd; i += AT) qs[i] = qt[i];
    if (tid < g) mst[tid] = -INFINITY, lst[tid] = 0.0f;
    /* the output: warp w sums the values of keys w, w + 4, ... of each tile, lane l dimensions
     * DPL l .. DPL l + DPL - 1 of every query head of the group; the 4 warps' sums meet at the end */
    float o[G][DPL];
#pragma unroll
    for (int qi = 0; qi < G; qi++)
#pragma unroll
        for (int e = 0; e < DPL; e++) o[qi][e] = 0.0f;
    __syncthreads();
    for (int kb = k0; kb < k1; kb += AT) {
        int kk = kb + tid, n = k1 - kb < AT ? k1 - kb : AT;
        const uint4 *Kg = (const uint4 *)(K + (size_t)kb * hd), *Vg = (const uint4 *)(V + (size_t)kb * hd);
        auto put = [&](int i, uint4 a, uint4 b) {
            *(uint4 *)(Ks + (i / wpr) * kw + (i % wpr) * 4) = a;
            *(uint4 *)(Vs + (size_t)i * 4) = b;
        };
        if (n == AT) { /* a whole tile: 4 DPL loads of K and of V a thread, 4 of each in flight */
#pragma unroll
            for (int j0 = 0; j0 < 4 * DPL; j0 += 4) {
                uint4 a[4], b[4];
#pragma unroll
                for (int u = 0; u < 4; u++) a[u] = Kg[tid + (j0 + u) * AT], b[u] = Vg[tid + (j0 + u) * AT];
#pragma unroll
                for (int u = 0; u < 4; u++) put(tid + (j0 + u) * AT, a[u], b[u]);
            }
        } else
            for (int i = tid; i < n * wpr; i += AT) put(i, Kg[i], Vg[i]);
        __syncthreads();
        float sc[G];
#pragma unroll
        for (int qi = 0; qi < G; qi++) sc[qi] = 0.0f;
        if (kk < k1) { /* 8 dimensions at a time: one 16-byte read of the key, two of each query */
            const uint4 *kr = (const uint4 *)(Ks + tid * kw);
            for (int c = 0; c < hd / 8; c++) qk8<G>(kr[c], qs, hd, c, g, sc);
        }
#pragma unroll
        for (int qi = 0; qi < G; qi++)
            if (qi < g) S[qi * AT + tid] = kk < k1 ? sc[qi] * scale : -INFINITY;
        __syncthreads();
        for (int qi = warp; qi < g; qi += AT / 32) {
            float mx = -INFINITY;
            for (int j = lane; j < AT; j += 32) mx = fmaxf(mx, S[qi * AT + j]);
            mx = warp_max(mx);
            float mold = mst[qi], mnew = fmaxf(mold, mx), sum = 0.0f;
            for (int j = lane; j < AT; j += 32) {
                float p = __expf(S[qi * AT + j] - mnew);
                S[qi * AT + j] = p;
                sum += p;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                float a = __expf(mold - mnew);
                mst[qi] = mnew, lst[qi] = lst[qi] * a + sum, alpha[qi] = a;
            }
        }
        __syncthreads();
#pragma unroll
        for (int qi = 0; qi < G; qi++)
            if (qi < g) {
                float a = alpha[qi];
#pragma unroll
                for (int e = 0; e < DPL; e++) o[qi][e] *= a;
            }
        for (int j = warp; j < n; j += AT / 32) {
            const __half *vr = (const __half *)Vs + (size_t)j * hd + lane * DPL;
            float v[DPL];
            if (DPL % 2 == 0) {
#pragma unroll
                for (int e = 0; e < DPL; e += 2) {
                    float2 f2 = __half22float2(*(const __half2 *)(vr + e));
                    v[e] = f2.x, v[e + 1 < DPL ? e + 1 : e] = f2.y;
                }
            } else {
#pragma unroll
                for (int e = 0; e < DPL; e++) v[e] = __half2float(vr[e]);
            }
#pragma unroll
            for (int qi = 0; qi < G; qi++)
                if (qi < g) {
                    float pj = S[qi * AT + j];
#pragma unroll
                    for (int e = 0; e < DPL; e++) o[qi][e] = fmaf(pj, v[e], o[qi][e]);
                }
        }
        __syncthreads();
    }
    /* the warps' sums, added in warp order through shared memory (the key tile's space) */
    float *red = (float *)Ks;
#pragma unroll
    for (int qi = 0; qi < G; qi++)
        if (qi < g)
#pragma unroll
            for (int e = 0; e < DPL; e++) red[(warp * g + qi) * hd + lane * DPL + e] = o[qi][e];
    __syncthreads();
    float *pt = part + (((size_t)(poff[t] + s) * nkv + h) * g) * (hd + 2);
    for (int i = tid; i < g * hd; i += AT) {
        float a = red[i];
        for (int w = 1; w < AT / 32; w++) a += red[w * g * hd + i];
        pt[i] = a;
    }
    if (tid < g) pt[g * hd + 2 * tid] = mst[tid], pt[g * hd + 2 * tid + 1] = lst[tid];
}

typedef void (*attn_fn)(const float *, const int *, const int *, const int *, const int *, const int *,
                        const dseq *, int, int, int, int, int, float, float *);
/* k_attn for a head size (a multiple of 32, at most 256) and group size: the two models' head
 * sizes (64, 128) with groups of up to 8 query heads get kernels made for their group (no
 * predicated loops over unused heads; the same sums, so the same bits), the rest the generic one */
static attn_fn attn_kernel(int hd, int grp) {
    const char *ge = getenv("KVS_CUDA_GENERIC_ATTN"); /* =1: the generic kernel, to compare */
    if ((hd == 64 || hd == 128) && !(ge && !strcmp(ge, "1"))) {
        switch (grp * 1000 + hd) {
#define AK(gr) case gr * 1000 + 64: return k_attn<2, gr>; case gr * 1000 + 128: return k_attn<4, gr>;
        AK(1) AK(2) AK(3) AK(4) AK(5) AK(6) AK(7) AK(8)
#undef AK
        }
    }
    switch (hd / 32) {
    case 1: return k_attn<1, MAXG>;
    case 2: return k_attn<2, MAXG>;
    case 3: return k_attn<3, MAXG>;
    case 4: return k_attn<4, MAXG>;
    case 5: return k_attn<5, MAXG>;
    case 6: return k_attn<6, MAXG>;
    case 7: return k_attn<7, MAXG>;
    default: return k_attn<8, MAXG>;
    }
}

/* k_attn's shared memory: the group's queries, scores, m/l/alpha, and the staged key and value tiles */
static size_t attn_smem(int grp, int hd) {
    return (((size_t)grp * hd + (size_t)grp * AT + 3 * (size_t)grp + 3) & ~(size_t)3) * sizeof(float) +
           (size_t)AT * (hd / 2 + 4) * sizeof(uint32_t) + (size_t)AT * hd * sizeof(__half);
}

/* out (T, nh*hd) = sum_s e^{m_s - M} o_s / sum_s e^{m_s - M} l_s; one block per (token, query
 * head); (M, L) to ml (T, nh, 2) when asked (for k_acc: a probability is e^{s - M} / L) */
__global__ void k_att_combine(const float *part, const int *nsp, const int *poff, int nh, int nkv, int hd,
                              float *out, float *ml_out) {
    int t = blockIdx.x, qh = blockIdx.y, g = nh / nkv, h = qh / g, qi = qh % g, nsplit = nsp[t];
    const float *p0 = part + ((size_t)poff[t] * nkv + h) * g * (hd + 2);
    size_t sstride = (size_t)nkv * g * (hd + 2); /* one split further */
    float M = -INFINITY;
    for (int s = 0; s < nsplit; s++) {
        const float *ml = p0 + s * sstride + g * hd;
        if (ml[2 * qi + 1] > 0.0f) M = fmaxf(M, ml[2 * qi]);
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float L = 0.0f, o = 0.0f;
        for (int s = 0; s < nsplit; s++) {
            const float *ps = p0 + s * sstride, *ml = ps + g * hd;
            if (ml[2 * qi + 1] == 0.0f) continue;
            float f = __expf(ml[2 * qi] - M);
            L += f * ml[2 * qi + 1];
            o += f * ps[qi * hd + d];
        }
        out[(size_t)t * nh * hd + (size_t)qh * hd + d] = L > 0.0f ? o / L : 0.0f;
        if (ml_out && d == 0) ml_out[((size_t)t * nh + qh) * 2] = M, ml_out[((size_t)t * nh + qh) * 2 + 1] = L;
    }
}

enum { ACC_T = 128 /* entries a block of k_acc holds at a time = its threads */ };

/* k_acc's shared memory: the token's queries and (M, L), then the block's keys (rows of hd/2 + 4
 * words, as k_attn stages them) */
static size_t acc_smem(int grp, int hd) {
    return (((size_t)grp * hd + 2 * (size_t)grp + 3) & ~(size_t)3) * sizeof(float) + (size_t)ACC_T * (hd / 2 + 4) * 4;
}

/* H2O's accumulated attention: for run r of the pass (a slot's tokens, in rank order: run_tok
 * from run_first[r], run_len[r] of them; 0: no run) whose slot keeps acc, KV head h, and entry
 * j, adds each token's probability of j (e^{s - M} / L with the combine's M and L, s its scaled
 * score as k_attn computes it), divided by the group size, for every query head of the group in
 * order and every token of the run that sees j (j < lens + rank + 1), in rank order: a thread an
 * entry (the block's keys staged in shared memory once for all the run's tokens), its sum in a
 * register from acc[j] on, so the result depends on the slot's own tokens alone (not on its
 * batch) and each token adds as the CPU's unit does */
__global__ void __launch_bounds__(ACC_T) k_acc(const float *q, const float *ml, const int *run_first, const int *run_len,
                                               const int *run_tok, const int *lens, const int *slot, const dseq *seqs,
                                               int layer, int n_layer, int nh, int nkv, int hd, float scale) {
    extern __shared__ float qa[]; /* (g, hd) the token's queries, then (g, 2) its M and L; then the keys */
    int r = blockIdx.x, h = blockIdx.y, nr = run_len[r], tid = threadIdx.x;
    if (nr == 0) return;
    const int *toks = run_tok + run_first[r];
    int sl = slot[toks[0]];
    dseq sq = seqs[sl];
    if (!sq.acc) return;
    int g = nh / nkv, base = lens[sl * n_layer + layer], nmax = base + nr;
    const int kw = hd / 2 + 4, wpr = hd / 8;
    uint32_t *Ks = (uint32_t *)(qa + ((g * hd + 2 * g + 3) & ~3));
    const __half *K = sq.k + ((size_t)layer * nkv + h) * sq.cap * hd;
    float *A = sq.acc + ((size_t)layer * nkv + h) * sq.cap;
    float inv_g = 1.0f / (float)g;
    for (int c0 = blockIdx.z * ACC_T; c0 < nmax; c0 += gridDim.z * ACC_T) {
        int j = c0 + tid, n = nmax - c0 < ACC_T ? nmax - c0 : ACC_T;
        float a = j < nmax ? A[j] : 0.0f;
        __syncthreads(); /* (the previous chunk's keys are read) */
        const uint4 *Kg = (const uint4 *)(K + (size_t)c0 * hd);
        for (int i = tid; i < n * wpr; i += ACC_T) *(uint4 *)(Ks + (i / wpr) * kw + (i % wpr) * 4) = Kg[i];
        for (int k = 0; k < nr; k++) {
            int t = toks[k];
            __syncthreads();
            for (int i = tid; i < g * hd; i += ACC_T) qa[i] = q[(size_t)t * nh * hd + (size_t)h * g * hd + i];
            for (int i = tid; i < 2 * g; i += ACC_T) qa[g * hd + i] = ml[((size_t)t * nh + (size_t)h * g) * 2 + i];
            __syncthreads();
            if (j >= base + k + 1) continue; /* not seen by this token */
            float sc[MAXG];
#pragma unroll
            for (int qi = 0; qi < MAXG; qi++) sc[qi] = 0.0f;
            const uint4 *kr = (const uint4 *)(Ks + tid * kw);
            for (int c = 0; c < hd / 8; c++) qk8<MAXG>(kr[c], qa, hd, c, g, sc); /* k_attn's sums */
#pragma unroll
            for (int qi = 0; qi < MAXG; qi++)
                if (qi < g) {
                    float M = qa[g * hd + 2 * qi], L = qa[g * hd + 2 * qi + 1];
                    if (L > 0.0f) a = __fadd_rn(a, __fdiv_rn(__expf(__fsub_rn(__fmul_rn(sc[qi], scale), M)), L) * inv_g);
                }
        }
        if (j < nmax) A[j] = a;
    }
}

/* ---- the context ------------------------------------------------------------------------------ */

struct dlayer {
    float *attn_norm, *ffn_norm, *bq, *bk, *bv;
    dweight wq, wk, wv, wo, wg, wu, wd;
};

enum { LOGIT_ROWS = 64 /* logits rows computed per pass */, GRAPH_T = 32 /* most tokens of a graph */,
       META = 13 /* int32 arrays of t_max in d_meta, before the slots' layer lengths */ };

/* a slot's host-side bookkeeping: entries per layer, and for slots under a policy the positions
 * of every head's entries and of the queries in the ring */
struct hseq {
    int32_t *pos;              /* (n_layer, nkv, pcap) entries' positions; NULL: not tracked */
    int pcap;
    int q_n, q_next;           /* queries in the ring (at most qwin), the ring index written next */
    int32_t shift;             /* RoPE position = position - shift (streaming pos=cache) */
    bool compacted;            /* entries were dropped (here or in the slot it was copied from): entry i
                                * is then not position i */
    int32_t *q_pos;            /* (qwin) position of the query at each ring index */
};

struct cuda_ctx {
    int dev;
    char name[320];
    cudaStream_t st;
    int n_layer, d, nh, nkv, hd, ff, nv, n_ctx, t_max, n_seq;
    float eps;
    bool neox;
    dweight tok_embd, output;
    float *out_norm, *inv_freq;
    dlayer *L;                 /* host array of device pointers */
    attn_fn attn;              /* k_attn for the head size */
    void **allocs;             /* every weight allocation, for free */
    int n_allocs;
    uint64_t weight_bytes, scratch_bytes, kv_bytes, kv_peak;
    /* scratch */
    float *x, *xn, *q, *k, *v, *gate, *up, *part, *logits;
    int part_rows;             /* (token, split) rows att_part holds */
    float *ml;                 /* (t_max, nh, 2) the combine's M and L, for k_acc */
    mm_cfg mm;                 /* how launch_mm runs products (staged GEMV, cuBLAS for prompts) */
    blas bl;                   /* cuBLAS when KVS_CUDA_PREFILL asks for it (bl.lib NULL: not) */
    int *h_run;                /* (n_seq) a slot's run index in this pass (-1: none) */
    int32_t *d_meta;           /* tok, pos, slot, rows, splits, first partial row, token order
                                * (lone tokens first), logits-row order per chunk, rank among its
                                * slot's tokens, query-ring index: META * t_max int32; then the
                                * slots' entries per layer (n_seq, n_layer) */
    int n_lone;                /* tokens of this pass that are their sequence's only one */
    int *h_olone;              /* per LOGIT_ROWS chunk of logits rows: how many are lone tokens' */
    unsigned char *h_lone;     /* (t_max) this pass's token is its sequence's only one */
    int *h_count;              /* (n_seq) tokens per slot in this pass */
    int32_t *h_meta;           /* pinned staging of the same */
    int32_t *h_lens;           /* = h_meta + META * t_max: (n_seq, n_layer) entries per layer */
    dseq *h_seqs, *d_seqs;     /* slot table, host copy and device copy */
    hseq *hs;                  /* (n_seq) host bookkeeping */
    int32_t *d_keep;           /* compaction's kept indices, (n_layer, nkv, keep_cap) */
    size_t keep_cap;
    float *d_wscore, *d_wml;   /* window scores (n_layer, nkv, n_ctx + t_max) and softmax (m, l) per query
                                * (n_layer, nkv, wq_cap, group), allocated at the first scoring */
    int32_t *d_wvis;           /* (n_layer, nkv, wq_cap) entries each saved query sees */
    int wq_cap;                /* queries the window scratch holds */
    uint64_t wscratch_bytes;   /* its bytes (in scratch_bytes) */
    bool graphs;               /* replay decode steps as CUDA graphs (KVS_CUDA_GRAPHS=0: off) */
    cudaGraphExec_t gexec[2][GRAPH_T + 1][GRAPH_T + 1]; /* by (H2O's k_acc, T, n_out), captured on first use */
    float *h_logits;           /* pinned (GRAPH_T, n_vocab): the graphs' logits */
    /* KVS_CUDA_PROFILE=1: an event after each group of launches of a pass (graphs off), and the
     * seconds between consecutive events summed per group (cuda_prof_read) */
    cudaEvent_t *pev;
    unsigned char *pcat;       /* the group of the launches that end at each event */
    int npev, pev_cap;
    double prof_s[16];
};

static enum kvs_status up_weight(cuda_ctx *g, const cuda_w *w, dweight *dw, const char *name) {
    if (!cuda_type_supported(w->type))
        return kvs_fail(KVS_ERR_UNSUPPORTED, "cuda: %s has GGUF type %d, which the GPU kernels do not "
                        "read yet (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K)", name, w->type);
    if (w->n_cols % (w->type == T_Q4_K || w->type == T_Q6_K ? 256 : 32))
        return kvs_fail(KVS_ERR_UNSUPPORTED, "cuda: %s has %lld columns, not a multiple of the kernels' unit",
                        name, (long long)w->n_cols);
    /* rows in the planes layout (see planes_of), 16-byte aligned, put together on the host a
     * slice of rows at a time */
    size_t rbd = (w->row_bytes + 15) / 16 * 16, bytes = (size_t)w->n_rows * rbd;
    void *p;
    CK(cudaMalloc(&p, bytes), name);
    g->allocs[g->n_allocs++] = p;
    int64_t slice = (int64_t)((16u << 20) / rbd) + 1;
    if (slice > w->n_rows) slice = w->n_rows;
    uint8_t *h = (uint8_t *)malloc((size_t)slice * rbd);
    if (!h) return kvs_fail(KVS_ERR_NOMEM, "out of memory staging %s", name);
    cudaError_t e = cudaSuccess;
    for (int64_t r0 = 0; r0 < w->n_rows && e == cudaSuccess; r0 += slice) {
        int64_t n = w->n_rows - r0 < slice ? w->n_rows - r0 : slice;
        for (int64_t r = 0; r < n; r++)
            planes_row(w->type, (const uint8_t *)w->data + (size_t)(r0 + r) * w->row_bytes, w->row_bytes, w->n_cols,
                       h + (size_t)r * rbd);
        e = cudaMemcpy((uint8_t *)p + (size_t)r0 * rbd, h, (size_t)n * rbd, cudaMemcpyHostToDevice);
    }
    free(h);
    if (e != cudaSuccess) return cuda_error(e, name);
    g->weight_bytes += bytes;
    *dw = (dweight){(const uint8_t *)p, w->type, (int)w->n_rows, (int)w->n_cols, rbd};
    return KVS_OK;
}

static enum kvs_status up_floats(cuda_ctx *g, const float *h, size_t n, float **out, const char *name) {
    *out = NULL;
    if (!h) return KVS_OK;
    void *p;
    CK(cudaMalloc(&p, n * 4), name);
    g->allocs[g->n_allocs++] = p;
    CK(cudaMemcpy(p, h, n * 4, cudaMemcpyHostToDevice), name);
    g->weight_bytes += n * 4;
    *out = (float *)p;
    return KVS_OK;
}

static enum kvs_status dev_alloc(cuda_ctx *g, void *pp, size_t bytes, const char *what) {
    CK(cudaMalloc((void **)pp, bytes ? bytes : 4), what);
    g->scratch_bytes += bytes;
    return KVS_OK;
}

/* d_meta / h_meta: META arrays of t_max, then (n_seq, n_layer) lengths */
static size_t meta_bytes(const cuda_ctx *g) { return ((size_t)g->t_max * META + (size_t)g->n_seq * g->n_layer) * 4; }

/* cuBLAS opened from KVS_CUBLAS (a path), else libcublas.so.13 as the loader finds it, else in
 * the CUDA toolkit's lib64; a handle on stream st */
static enum kvs_status blas_load(blas *b, bool tf32, cudaStream_t st) {
    const char *env = getenv("KVS_CUBLAS"), *tries[] = {env, "libcublas.so.13", "/usr/local/cuda/lib64/libcublas.so.13",
                                                        "libcublas.so"};
    char why[256] = "";
    for (size_t i = 0; i < sizeof tries / sizeof *tries && !b->lib; i++)
        if (tries[i] && *tries[i] && !(b->lib = dlopen(tries[i], RTLD_NOW | RTLD_LOCAL)))
            snprintf(why, sizeof why, "%s", dlerror());
    if (!b->lib)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "KVS_CUDA_PREFILL: cannot open cuBLAS (%s; KVS_CUBLAS=PATH names the "
                        "library)", why);
    typedef cublasStatus_t (*create_fn)(cublasHandle_t *);
    typedef cublasStatus_t (*stream_fn)(cublasHandle_t, cudaStream_t);
    create_fn create = (create_fn)dlsym(b->lib, "cublasCreate_v2");
    stream_fn set_stream = (stream_fn)dlsym(b->lib, "cublasSetStream_v2");
    b->gemm = (decltype(b->gemm))dlsym(b->lib, "cublasGemmEx");
    b->destroy = (decltype(b->destroy))dlsym(b->lib, "cublasDestroy_v2");
    if (!create || !set_stream || !b->gemm || !b->destroy)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "KVS_CUDA_PREFILL: the cuBLAS library lacks cublasGemmEx");
    if (create(&b->h) != CUBLAS_STATUS_SUCCESS) {
        b->h = NULL;
        return kvs_fail(KVS_ERR_UNSUPPORTED, "KVS_CUDA_PREFILL: cublasCreate failed");
    }
    if (set_stream(b->h, st) != CUBLAS_STATUS_SUCCESS)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "KVS_CUDA_PREFILL: cublasSetStream failed");
    b->compute = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    return KVS_OK;
}

static void blas_close(blas *b) {
    if (b->h && b->destroy) b->destroy(b->h);
    if (b->lib) dlclose(b->lib);
    *b = (blas){};
}

/* KVS_CUDA_PREFILL=sgemm|tf32: cuBLAS and its scratch for prompt chunks of up to t_max tokens */
static enum kvs_status blas_open(cuda_ctx *g, const cuda_model_desc *m, int t_max) {
    const char *pe = getenv("KVS_CUDA_PREFILL");
    if (!pe || !*pe || !strcmp(pe, "tiles")) return KVS_OK;
    bool tf32 = !strcmp(pe, "tf32");
    if (!tf32 && strcmp(pe, "sgemm"))
        return kvs_fail(KVS_ERR_INVALID_ARG, "KVS_CUDA_PREFILL is tiles, sgemm or tf32, not '%s'", pe);
    enum kvs_status st = blas_load(&g->bl, tf32, g->st);
    if (st != KVS_OK) return st;
    size_t wmax = 0, cmax = 0, rmax = 0; /* the layers' matrices (the output matrix keeps the tiles) */
    for (int il = 0; il < m->n_layer; il++) {
        const cuda_layer_desc *L = &m->layers[il];
        const cuda_w *ws[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (size_t i = 0; i < sizeof ws / sizeof *ws; i++) {
            size_t r = (size_t)ws[i]->n_rows, c = (size_t)ws[i]->n_cols;
            wmax = r * c > wmax ? r * c : wmax, rmax = r > rmax ? r : rmax, cmax = c > cmax ? c : cmax;
        }
    }
    if ((st = dev_alloc(g, &g->mm.wf, wmax * 4, "cuBLAS scratch")) != KVS_OK ||
        (st = dev_alloc(g, &g->mm.xg, (size_t)t_max * cmax * 4, "cuBLAS scratch")) != KVS_OK ||
        (st = dev_alloc(g, &g->mm.yg, (size_t)t_max * rmax * 4, "cuBLAS scratch")) != KVS_OK ||
        (st = dev_alloc(g, &g->mm.yg2, (size_t)t_max * rmax * 4, "cuBLAS scratch")) != KVS_OK)
        return st;
    g->mm.b = &g->bl, g->mm.wf_cap = wmax;
    size_t L = strlen(g->name);
    snprintf(g->name + L, sizeof g->name - L, ", prompts by cuBLAS %s", tf32 ? "TF32" : "FP32");
    return KVS_OK;
}

extern "C" enum kvs_status cuda_ctx_new(const struct cuda_model_desc *m, int n_ctx, int t_max, int n_seq,
                                        struct cuda_ctx **out) {
    *out = NULL;
    int n_dev = 0;
    cudaError_t e = cudaGetDeviceCount(&n_dev);
    if (e != cudaSuccess || n_dev == 0)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "--device cuda: no usable GPU (%s)",
                        e != cudaSuccess ? cudaGetErrorString(e) : "the driver reports no device");
    if (m->head_dim % 32 || m->head_dim > 256 || m->n_head / m->n_head_kv > MAXG ||
        (m->n_head / m->n_head_kv) * (m->head_dim / 32) > 64 || m->n_embd % 32 || m->n_head % m->n_head_kv ||
        m->n_layer > 1024)
        return kvs_fail(KVS_ERR_UNSUPPORTED, "cuda: attention shape (%d heads of %d, %d KV heads) is "
                        "outside the kernels' limits", m->n_head, m->head_dim, m->n_head_kv);
    cuda_ctx *g = (cuda_ctx *)calloc(1, sizeof *g);
    if (!g) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    g->n_layer = m->n_layer, g->d = m->n_embd, g->nh = m->n_head, g->nkv = m->n_head_kv;
    g->hd = m->head_dim, g->ff = m->n_ff, g->nv = m->n_vocab, g->eps = m->norm_eps, g->neox = m->neox;
    g->n_ctx = n_ctx, g->t_max = t_max, g->n_seq = n_seq;
    g->L = (dlayer *)calloc((size_t)m->n_layer, sizeof *g->L);
    g->allocs = (void **)calloc((size_t)m->n_layer * 16 + 16, sizeof(void *));
    g->h_seqs = (dseq *)calloc((size_t)n_seq, sizeof *g->h_seqs);
    *out = g;
    if (!g->L || !g->allocs || !g->h_seqs) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    cudaDeviceProp pr;
    CK(cudaGetDevice(&g->dev), "cudaGetDevice");
    CK(cudaGetDeviceProperties(&pr, g->dev), "cudaGetDeviceProperties");
    snprintf(g->name, sizeof g->name, "%s (sm_%d%d, %.1f GiB)", pr.name, pr.major, pr.minor,
             (double)pr.totalGlobalMem / (1u << 30));
    CK(cudaStreamCreateWithFlags(&g->st, cudaStreamNonBlocking), "cudaStreamCreate");
    g->attn = attn_kernel(m->head_dim, m->n_head / m->n_head_kv);
    CK(cudaFuncSetAttribute(g->attn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            (int)attn_smem(m->n_head / m->n_head_kv, m->head_dim)), "k_attn shared memory");
    /* (a setting of the kernel, not of the context: the most any model here may ask) */
    CK(cudaFuncSetAttribute(k_acc, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)acc_smem(MAXG, 256)),
       "k_acc shared memory");
    enum kvs_status st;
    char nm[64];
    if ((st = up_weight(g, &m->tok_embd, &g->tok_embd, "token_embd")) != KVS_OK) return st;
    g->output = g->tok_embd;
    if (m->output.data != m->tok_embd.data && (st = up_weight(g, &m->output, &g->output, "output")) != KVS_OK) return st;
    if ((st = up_floats(g, m->output_norm, (size_t)g->d, &g->out_norm, "output_norm")) != KVS_OK) return st;
    if ((st = up_floats(g, m->inv_freq, (size_t)g->hd / 2, &g->inv_freq, "rope table")) != KVS_OK) return st;
    for (int il = 0; il < g->n_layer; il++) {
        const cuda_layer_desc *s = &m->layers[il];
        dlayer *l = &g->L[il];
        size_t nq = (size_t)g->nh * g->hd, nk = (size_t)g->nkv * g->hd;
        struct { const cuda_w *src; dweight *dst; const char *n; } ws[] = {
            {&s->wq, &l->wq, "attn_q"}, {&s->wk, &l->wk, "attn_k"}, {&s->wv, &l->wv, "attn_v"},
            {&s->wo, &l->wo, "attn_output"}, {&s->w_gate, &l->wg, "ffn_gate"}, {&s->w_up, &l->wu, "ffn_up"},
            {&s->w_down, &l->wd, "ffn_down"}};
        for (size_t i = 0; i < sizeof ws / sizeof *ws; i++) {
            snprintf(nm, sizeof nm, "blk.%d.%s", il, ws[i].n);
            if ((st = up_weight(g, ws[i].src, ws[i].dst, nm)) != KVS_OK) return st;
        }
        if ((st = up_floats(g, s->attn_norm, (size_t)g->d, &l->attn_norm, "attn_norm")) != KVS_OK ||
            (st = up_floats(g, s->ffn_norm, (size_t)g->d, &l->ffn_norm, "ffn_norm")) != KVS_OK ||
            (st = up_floats(g, s->bq, nq, &l->bq, "attn_q.bias")) != KVS_OK ||
            (st = up_floats(g, s->bk, nk, &l->bk, "attn_k.bias")) != KVS_OK ||
            (st = up_floats(g, s->bv, nk, &l->bv, "attn_v.bias")) != KVS_OK)
            return st;
    }
    size_t T = (size_t)t_max, nq = (size_t)g->nh * g->hd, nk = (size_t)g->nkv * g->hd;
    size_t wide = nq > (size_t)g->d ? nq : (size_t)g->d;
    g->part_rows = t_max + n_seq * MAX_SPLIT;
    size_t grp = (size_t)(g->nh / g->nkv);
    if ((st = dev_alloc(g, &g->x, T * g->d * 4, "scratch")) != KVS_OK ||
        (st = dev_alloc(g, &g->xn, T * wide * 4, "scratch")) != KVS_OK ||
        (st = dev_alloc(g, &g->q, T * wide * 4, "scratch")) != KVS_OK ||
        (st = dev_alloc(g, &g->k, T * nk * 4, "scratch")) != KVS_OK ||
        (st = dev_alloc(g, &g->v, T * nk * 4, "scratch")) != KVS_OK ||
        (st = dev_alloc(g, &g->gate, T * g->ff * 4, "scratch")) != KVS_OK ||
        (st = dev_alloc(g, &g->up, T * g->ff * 4, "scratch")) != KVS_OK ||
        (st = dev_alloc(g, &g->part, (size_t)g->part_rows * g->nkv * grp * (g->hd + 2) * 4, "scratch")) != KVS_OK ||
        (st = dev_alloc(g, &g->logits, (size_t)LOGIT_ROWS * g->nv * 4, "scratch")) != KVS_OK ||
        (st = dev_alloc(g, &g->ml, T * g->nh * 2 * 4, "scratch")) != KVS_OK ||
        (st = dev_alloc(g, &g->d_meta, meta_bytes(g), "scratch")) != KVS_OK ||
        (st = dev_alloc(g, &g->d_seqs, (size_t)n_seq * sizeof(dseq), "scratch")) != KVS_OK)
        return st;
    CK(cudaMallocHost((void **)&g->h_meta, meta_bytes(g)), "cudaMallocHost");
    memset(g->h_meta, 0, meta_bytes(g));
    g->h_lens = g->h_meta + META * T;
    if (!(g->hs = (hseq *)calloc((size_t)n_seq, sizeof *g->hs))) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    if (!(g->h_olone = (int *)calloc((size_t)(T / LOGIT_ROWS + 1), sizeof(int))) ||
        !(g->h_lone = (unsigned char *)calloc((size_t)T, 1)) || !(g->h_count = (int *)calloc((size_t)g->n_seq, sizeof(int))) ||
        !(g->h_run = (int *)calloc((size_t)g->n_seq, sizeof(int))))
        return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    CK(cudaMallocHost((void **)&g->h_logits, (size_t)GRAPH_T * g->nv * 4), "cudaMallocHost");
    const char *ge = getenv("KVS_CUDA_GRAPHS"), *pe = getenv("KVS_CUDA_PROFILE");
    g->graphs = !(ge && !strcmp(ge, "0"));
    const char *se = getenv("KVS_CUDA_STAGE");
    g->mm.stage = se && !strcmp(se, "0") ? INT_MAX : pr.multiProcessorCount > 0 ? pr.multiProcessorCount : 132;
    if ((st = blas_open(g, m, T)) != KVS_OK) return st;
    if (pe && strcmp(pe, "0") && *pe) { /* events between the launch groups; graphs off */
        g->graphs = false;
        g->pev_cap = 8 + g->n_layer * 11 + t_max / LOGIT_ROWS + 2;
        if (!(g->pev = (cudaEvent_t *)calloc((size_t)g->pev_cap, sizeof *g->pev)) ||
            !(g->pcat = (unsigned char *)calloc((size_t)g->pev_cap, 1)))
            return kvs_fail(KVS_ERR_NOMEM, "out of memory");
        for (int i = 0; i < g->pev_cap; i++) CK(cudaEventCreate(&g->pev[i]), "cudaEventCreate");
    }
    CK(cudaMemset(g->d_seqs, 0, (size_t)n_seq * sizeof(dseq)), "cudaMemset");
    CK(cudaStreamSynchronize(g->st), "upload");
    return KVS_OK;
}

extern "C" void cuda_ctx_free(struct cuda_ctx *g) {
    if (!g) return;
    for (int i = 0; i < g->n_seq && g->h_seqs; i++) cuda_seq_clear(g, i);
    for (int i = 0; i < g->n_allocs; i++) cudaFree(g->allocs[i]);
    float *bufs[] = {g->x, g->xn, g->q, g->k, g->v, g->gate, g->up, g->part, g->logits, g->ml,
                     g->mm.wf, g->mm.xg, g->mm.yg, g->mm.yg2};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) cudaFree(bufs[i]);
    cudaFree(g->d_meta);
    cudaFree(g->d_seqs);
    cudaFree(g->d_keep);
    cudaFree(g->d_wscore);
    cudaFree(g->d_wml);
    cudaFree(g->d_wvis);
    for (int i = 0; i < g->n_seq && g->hs; i++) free(g->hs[i].pos), free(g->hs[i].q_pos);
    free(g->hs);
    if (g->h_meta) cudaFreeHost(g->h_meta);
    free(g->h_olone);
    free(g->h_lone);
    free(g->h_count);
    free(g->h_run);
    if (g->h_logits) cudaFreeHost(g->h_logits);
    for (int i = 0; g->pev && i < g->pev_cap; i++)
        if (g->pev[i]) cudaEventDestroy(g->pev[i]);
    free(g->pev);
    free(g->pcat);
    for (int i = 0; i <= GRAPH_T; i++)
        for (int j = 0; j <= GRAPH_T; j++)
            for (int a = 0; a < 2; a++)
                if (g->gexec[a][i][j]) cudaGraphExecDestroy(g->gexec[a][i][j]);
    blas_close(&g->bl);
    if (g->st) cudaStreamDestroy(g->st);
    free(g->L);
    free(g->allocs);
    free(g->h_seqs);
    free(g);
}

extern "C" const char *cuda_device_name(const struct cuda_ctx *g) { return g->name; }

enum { QWIN_MAX = 4096 /* most saved queries a slot keeps */ };

static uint64_t ring_bytes(const cuda_ctx *g, const dseq *s) {
    return s->qr ? (uint64_t)g->n_layer * s->qwin * g->nh * g->hd * sizeof(float) : 0;
}
static uint64_t acc_bytes(const cuda_ctx *g, const dseq *s) {
    return s->acc ? (uint64_t)g->n_layer * g->nkv * s->cap * sizeof(float) : 0;
}
/* K and V as allocated (capacity included), the query ring and the accumulated attention */
static uint64_t seq_bytes(const cuda_ctx *g, const dseq *s) {
    return 2ull * g->n_layer * g->nkv * (uint64_t)s->cap * g->hd * sizeof(__half) + ring_bytes(g, s) + acc_bytes(g, s);
}

static int32_t *lens_of(cuda_ctx *g, int slot) { return g->h_lens + (size_t)slot * g->n_layer; }

/* the device's copy of slot's table entry, brought up to date */
static cudaError_t put_slot(cuda_ctx *g, int slot) {
    cudaError_t e = cudaMemcpyAsync(g->d_seqs + slot, &g->h_seqs[slot], sizeof(dseq), cudaMemcpyHostToDevice, g->st);
    return e == cudaSuccess ? cudaStreamSynchronize(g->st) : e;
}

/* per-layer entry counts n for a kernel, through slot's row of the metadata's length table
 * (not in use between passes; every pass uploads it whole) */
static cudaError_t put_lens(cuda_ctx *g, int slot, const int32_t *n, int **d_n) {
    *d_n = (int *)g->d_meta + (size_t)g->t_max * META + (size_t)slot * g->n_layer;
    return cudaMemcpyAsync(*d_n, n, sizeof(int) * g->n_layer, cudaMemcpyHostToDevice, g->st);
}

extern "C" void cuda_seq_clear(struct cuda_ctx *g, int slot) {
    if (!g->hs || !g->h_lens) return; /* (a context whose creation failed early) */
    dseq *s = &g->h_seqs[slot];
    g->kv_bytes -= seq_bytes(g, s);
    cudaFree(s->k);
    cudaFree(s->v);
    cudaFree(s->qr);
    cudaFree(s->acc);
    int qwin = s->qwin, acc_on = s->acc_on;
    *s = (dseq){};
    s->qwin = qwin, s->acc_on = acc_on;
    hseq *h = &g->hs[slot];
    h->q_n = h->q_next = 0, h->shift = 0, h->compacted = false;
    memset(lens_of(g, slot), 0, sizeof(int32_t) * g->n_layer);
    put_slot(g, slot);
}

extern "C" enum kvs_status cuda_seq_set_policy(struct cuda_ctx *g, int slot, int qwin, bool positions, bool acc) {
    if (qwin < 0 || qwin > QWIN_MAX)
        return kvs_fail(KVS_ERR_INVALID_ARG, "cuda: a query window of %d tokens (the GPU keeps at most %d)", qwin,
                        QWIN_MAX);
    cuda_seq_clear(g, slot);
    dseq *s = &g->h_seqs[slot];
    hseq *h = &g->hs[slot];
    free(h->pos), free(h->q_pos);
    *h = (hseq){};
    s->qwin = qwin, s->acc_on = acc;
    if (qwin > 0 || positions) {
        h->pcap = g->n_ctx + g->t_max;
        h->pos = (int32_t *)malloc(sizeof(int32_t) * g->n_layer * g->nkv * (size_t)h->pcap);
        h->q_pos = (int32_t *)calloc((size_t)(qwin > 0 ? qwin : 1), sizeof(int32_t));
        if (!h->pos || !h->q_pos) {
            free(h->pos), free(h->q_pos);
            *h = (hseq){}, s->qwin = 0, s->acc_on = 0;
            return kvs_fail(KVS_ERR_NOMEM, "out of memory for a slot's entry positions");
        }
    }
    return KVS_OK;
}

extern "C" uint64_t cuda_seq_kv_bytes(const struct cuda_ctx *g, int slot) { return seq_bytes(g, &g->h_seqs[slot]); }

extern "C" void cuda_mem(const struct cuda_ctx *g, uint64_t *weights, uint64_t *kv, uint64_t *kv_peak,
                         uint64_t *scratch) {
    if (weights) *weights = g->weight_bytes;
    if (kv) *kv = g->kv_bytes;
    if (kv_peak) *kv_peak = g->kv_peak;
    if (scratch) *scratch = g->scratch_bytes;
}

extern "C" int cuda_seq_layer_entries(const struct cuda_ctx *g, int slot, int layer) {
    return g->h_lens[(size_t)slot * g->n_layer + layer];
}

extern "C" const int32_t *cuda_seq_positions(const struct cuda_ctx *g, int slot, int layer, int head) {
    const hseq *h = &g->hs[slot];
    return h->pos ? h->pos + ((size_t)layer * g->nkv + head) * h->pcap : NULL;
}

extern "C" void cuda_seq_set_rope_shift(struct cuda_ctx *g, int slot, int32_t shift) { g->hs[slot].shift = shift; }

/* new K/V buffers of cap entries for slot; entries of layer l, head h: row (l, h) of the old
 * ones at keep[(l * nkv + h) * kstride + i] (keep NULL: i) for i < n_new[l]; the accumulated
 * attention with them (oa NULL: none) */
__global__ void k_kv_gather(const __half *ok, const __half *ov, const float *oa, int ocap, __half *nk, __half *nv,
                            float *na, int ncap, const int32_t *keep, int kstride, const int *n_new, int nkv, int hd) {
    int row = blockIdx.x, l = row / nkv, n = n_new[l], w = hd / 8; /* 16-byte words per entry */
    const uint4 *K = (const uint4 *)(ok + (size_t)row * ocap * hd), *V = (const uint4 *)(ov + (size_t)row * ocap * hd);
    uint4 *NK = (uint4 *)(nk + (size_t)row * ncap * hd), *NV = (uint4 *)(nv + (size_t)row * ncap * hd);
    const int32_t *kp = keep ? keep + (size_t)row * kstride : NULL;
    for (int i = blockIdx.y * blockDim.y + threadIdx.y; i < n; i += gridDim.y * blockDim.y) {
        int j = kp ? kp[i] : i;
        for (int x = threadIdx.x; x < w; x += blockDim.x) NK[(size_t)i * w + x] = K[(size_t)j * w + x], NV[(size_t)i * w + x] = V[(size_t)j * w + x];
        if (oa && threadIdx.x == 0) na[(size_t)row * ncap + i] = oa[(size_t)row * ocap + j];
    }
}

/* in place: row (l, h)'s entries at keep[(l * nkv + h) * kstride + i] (ascending) move to i for
 * i < n_new[l], blockDim.y entries at a time, every read of a chunk before its writes: a chunk
 * writes below its end, and later chunks read at or above it, so nothing is overwritten before
 * it is read (head sizes up to 256: one 16-byte word per lane) */
__global__ void k_kv_compact(__half *k, __half *v, float *acc, int cap, const int32_t *keep, int kstride,
                             const int *n_new, int nkv, int hd) {
    __shared__ int first;
    int row = blockIdx.x, n = n_new[row / nkv], w = hd / 8, x = threadIdx.x;
    uint4 *K = (uint4 *)(k + (size_t)row * cap * hd), *V = (uint4 *)(v + (size_t)row * cap * hd);
    const int32_t *kp = keep + (size_t)row * kstride;
    if (threadIdx.x == 0 && threadIdx.y == 0) { /* entries before the first dropped one stay where they are */
        int lo = 0, hi = n; /* kp[i] - i never decreases: the first i with kp[i] > i */
        while (lo < hi) {
            int mid = (lo + hi) / 2;
            if (kp[mid] > mid) hi = mid;
            else lo = mid + 1;
        }
        first = lo;
    }
    __syncthreads();
    for (int c = first; c < n; c += blockDim.y) {
        int i = c + threadIdx.y;
        bool on = i < n && x < w, on_acc = acc && i < n && x == 0;
        uint4 a = {}, b = {};
        float ac = 0.0f;
        if (on) {
            size_t j = (size_t)kp[i] * w + x;
            a = K[j], b = V[j];
        }
        if (on_acc) ac = acc[(size_t)row * cap + kp[i]];
        __syncthreads();
        if (on) K[(size_t)i * w + x] = a, V[(size_t)i * w + x] = b;
        if (on_acc) acc[(size_t)row * cap + i] = ac;
        __syncthreads();
    }
}

/* move slot's entries into new buffers of cap entries, keeping per (layer, head) the entries
 * keep lists (NULL: the first n_new[l] as they are) */
static enum kvs_status seq_move(cuda_ctx *g, int slot, int cap, const int32_t *d_keep, int kstride,
                                const int32_t *n_new) {
    dseq *s = &g->h_seqs[slot];
    size_t rows = (size_t)g->n_layer * g->nkv, hb = (size_t)g->hd * sizeof(__half);
    __half *nk = NULL, *nv = NULL;
    float *na = NULL;
    if (cudaMalloc(&nk, rows * cap * hb) != cudaSuccess)
        return kvs_fail(KVS_ERR_NOMEM, "cuda: out of GPU memory for a K/V cache of %d tokens", cap);
    if (cudaMalloc(&nv, rows * cap * hb) != cudaSuccess ||
        (s->acc_on && cudaMalloc(&na, rows * cap * sizeof(float)) != cudaSuccess)) {
        cudaFree(nk), cudaFree(nv);
        cudaGetLastError();
        return kvs_fail(KVS_ERR_NOMEM, "cuda: out of GPU memory for a K/V cache of %d tokens", cap);
    }
    /* (the old and the new buffers are both held until the move is done) */
    uint64_t during = g->kv_bytes + 2ull * rows * cap * hb + (na ? rows * cap * sizeof(float) : 0);
    if (during > g->kv_peak) g->kv_peak = during;
    int nmax = 0;
    for (int l = 0; l < g->n_layer; l++) nmax = n_new[l] > nmax ? n_new[l] : nmax;
    cudaError_t e = cudaSuccess;
    if (nmax > 0) {
        int *d_n;
        e = put_lens(g, slot, n_new, &d_n);
        int gy = (nmax + 31) / 32;
        if (e == cudaSuccess)
            k_kv_gather<<<dim3((unsigned)rows, gy > 64 ? 64 : gy), dim3(g->hd / 8 < 32 ? g->hd / 8 : 32, 8), 0,
                          g->st>>>(s->k, s->v, s->acc, s->cap, nk, nv, na, cap, d_keep, kstride, d_n, g->nkv, g->hd);
        if (e == cudaSuccess) e = cudaGetLastError();
        if (e == cudaSuccess) e = cudaStreamSynchronize(g->st);
    }
    if (e == cudaSuccess && na && !s->acc) /* (entries without a statistic yet: nothing received) */
        e = cudaMemsetAsync(na, 0, rows * cap * sizeof(float), g->st);
    if (e != cudaSuccess) {
        cudaFree(nk), cudaFree(nv), cudaFree(na);
        return cuda_error(e, "moving a K/V cache");
    }
    cudaFree(s->k);
    cudaFree(s->v);
    cudaFree(s->acc);
    g->kv_bytes -= seq_bytes(g, s);
    s->k = nk, s->v = nv, s->acc = na, s->cap = cap, s->n = nmax;
    g->kv_bytes += seq_bytes(g, s);
    if (g->kv_bytes > g->kv_peak) g->kv_peak = g->kv_bytes;
    CK(put_slot(g, slot), "slot table");
    return KVS_OK;
}

/* make slot's cache hold at least `need` entries in every layer: capacity grows in steps of 256
 * (doubling past 4096), entries moved by one gather */
static enum kvs_status seq_reserve(cuda_ctx *g, int slot, int need) {
    dseq *s = &g->h_seqs[slot];
    if (need <= s->cap) return KVS_OK;
    int cap = s->cap > 4096 ? 2 * s->cap : 0;
    if (cap < need) cap = (need + 255) / 256 * 256;
    if (cap > g->n_ctx + g->t_max) cap = g->n_ctx + g->t_max;
    if (cap < need) return kvs_fail(KVS_ERR_CONTEXT_FULL, "cuda: %d entries exceed the context", need);
    return seq_move(g, slot, cap, NULL, 0, lens_of(g, slot));
}

/* the query ring of a slot whose policy scores with queries, allocated at its first pass */
static enum kvs_status seq_ring(cuda_ctx *g, int slot) {
    dseq *s = &g->h_seqs[slot];
    if (!s->qwin || s->qr) return KVS_OK;
    size_t b = (size_t)g->n_layer * s->qwin * g->nh * g->hd * sizeof(float);
    if (cudaMalloc(&s->qr, b) != cudaSuccess) {
        s->qr = NULL;
        return kvs_fail(KVS_ERR_NOMEM, "cuda: out of GPU memory for a query window");
    }
    g->kv_bytes += b;
    if (g->kv_bytes > g->kv_peak) g->kv_peak = g->kv_bytes;
    CK(put_slot(g, slot), "slot table");
    return KVS_OK;
}

extern "C" int cuda_seq_queries(const struct cuda_ctx *g, int slot, int32_t *qpos, int max) {
    const hseq *h = &g->hs[slot];
    int qwin = g->h_seqs[slot].qwin, n = h->q_n < max ? h->q_n : max;
    for (int i = 0; i < n; i++) qpos[i] = h->q_pos[((h->q_next - n + i) % qwin + qwin) % qwin];
    return n;
}

/* every launch of one forward pass on g->st, from the metadata in g->h_meta (copied first);
 * logits rows go to logits_dst on the host. Launch parameters depend on T, n_out and ns_grid only. */
enum { PR_EMBED, PR_NORM, PR_MM_QKV, PR_ROPE, PR_ATTN, PR_COMBINE, PR_ACC, PR_MM_O, PR_MM_UP, PR_MM_DOWN, PR_LOGITS,
       PR_N };
static const char *const prof_names[PR_N] = {"embed", "rmsnorm", "matmul_qkv", "rope_kv_store", "attention",
                                             "attention_combine", "h2o_acc", "matmul_o", "matmul_gate_up", "matmul_down",
                                             "logits"};

/* the launches enqueued since the last mark belong to group cat (profiling only) */
static void mark(cuda_ctx *g, int cat) {
    if (!g->pev || g->npev >= g->pev_cap) return;
    cudaEventRecord(g->pev[g->npev], g->st);
    g->pcat[g->npev++] = (unsigned char)cat;
}

/* after the pass's synchronisation: the time between consecutive marks, added to their groups */
static void prof_collect(cuda_ctx *g) {
    for (int i = 1; i < g->npev; i++) {
        float ms = 0.0f;
        if (cudaEventElapsedTime(&ms, g->pev[i - 1], g->pev[i]) == cudaSuccess) g->prof_s[g->pcat[i]] += ms / 1e3;
    }
    g->npev = 0;
}

static void enqueue(cuda_ctx *g, int T, int n_out, int ns_grid, int acc_x, int acc_z, float *logits_dst) {
    cudaStream_t st = g->st;
    g->npev = 0; /* (a pass that failed left its events uncollected) */
    mark(g, PR_EMBED); /* the start: the metadata upload counts as the embedding's */
    cudaMemcpyAsync(g->d_meta, g->h_meta, meta_bytes(g), cudaMemcpyHostToDevice, st);
    const int32_t *d_tok = g->d_meta, *d_pos = g->d_meta + g->t_max, *d_slot = g->d_meta + 2 * g->t_max,
                  *d_rows = g->d_meta + 3 * g->t_max, *d_nsp = g->d_meta + 4 * g->t_max,
                  *d_poff = g->d_meta + 5 * g->t_max, *d_tix = g->d_meta + 6 * g->t_max,
                  *d_oix = g->d_meta + 7 * g->t_max, *d_rank = g->d_meta + 8 * g->t_max,
                  *d_qix = g->d_meta + 9 * g->t_max, *d_run_first = g->d_meta + 10 * g->t_max,
                  *d_run_len = g->d_meta + 11 * g->t_max, *d_run_tok = g->d_meta + 12 * g->t_max,
                  *d_lens = g->d_meta + META * g->t_max;
    const int nl = g->n_lone;
    int d = g->d, nq = g->nh * g->hd, nk = g->nkv * g->hd, ff = g->ff, grp = g->nh / g->nkv;
    size_t smem = attn_smem(grp, g->hd);
    float scale = 1.0f / sqrtf((float)g->hd);
    embed(&g->tok_embd, d_tok, T, g->x, st);
    mark(g, PR_EMBED);
    for (int il = 0; il < g->n_layer; il++) {
        const dlayer *l = &g->L[il];
        k_rmsnorm<<<T, 256, 0, st>>>(g->x, NULL, l->attn_norm, g->xn, d, g->eps);
        mark(g, PR_NORM);
        matmul(&l->wq, g->xn, d, d_tix, nl, T, g->q, nq, st, &g->mm);
        matmul(&l->wk, g->xn, d, d_tix, nl, T, g->k, nk, st, &g->mm);
        matmul(&l->wv, g->xn, d, d_tix, nl, T, g->v, nk, st, &g->mm);
        mark(g, PR_MM_QKV);
        k_qkv_post<<<dim3(T, g->nh + g->nkv), 64, 0, st>>>(g->q, g->k, g->v, l->bq, l->bk, l->bv, d_pos, d_slot,
                                                           d_rank, d_qix, d_lens, g->d_seqs, il, g->n_layer,
                                                           g->nh, g->nkv, g->hd, g->inv_freq, g->neox);
        mark(g, PR_ROPE);
        g->attn<<<dim3(T, g->nkv, ns_grid), AT, smem, st>>>(g->q, d_rank, d_lens, d_slot, d_nsp, d_poff, g->d_seqs,
                                                            il, g->n_layer, g->nh, g->nkv, g->hd, scale, g->part);
        mark(g, PR_ATTN);
        k_att_combine<<<dim3(T, g->nh), g->hd < 128 ? g->hd : 128, 0, st>>>(g->part, d_nsp, d_poff, g->nh,
                                                                             g->nkv, g->hd, g->xn, acc_x ? g->ml : NULL);
        mark(g, PR_COMBINE);
        if (acc_x) { /* H2O's statistic, for the runs of slots that keep it (entries strided over the grid) */
            k_acc<<<dim3(acc_x, g->nkv, acc_z), ACC_T, acc_smem(grp, g->hd), st>>>(
                g->q, g->ml, d_run_first, d_run_len, d_run_tok, d_lens, d_slot, g->d_seqs, il, g->n_layer, g->nh,
                g->nkv, g->hd, scale);
            mark(g, PR_ACC);
        }
        matmul(&l->wo, g->xn, nq, d_tix, nl, T, g->x, d, st, &g->mm, 1); /* the residual added by the product */
        mark(g, PR_MM_O);
        k_rmsnorm<<<T, 256, 0, st>>>(g->x, NULL, l->ffn_norm, g->xn, d, g->eps);
        mark(g, PR_NORM);
        if (l->wg.type == l->wu.type && l->wg.rows == l->wu.rows && l->wg.rb == l->wu.rb) {
            matmul2(&l->wg, &l->wu, g->xn, d, d_tix, nl, T, g->gate, ff, 0, g->up, st, &g->mm); /* + SwiGLU */
        } else {
            matmul(&l->wg, g->xn, d, d_tix, nl, T, g->gate, ff, st, &g->mm);
            matmul(&l->wu, g->xn, d, d_tix, nl, T, g->up, ff, st, &g->mm);
            size_t nf = (size_t)T * ff;
            k_swiglu<<<(unsigned)((nf + 255) / 256), 256, 0, st>>>(g->gate, g->up, ff, d_tix, nf);
        }
        mark(g, PR_MM_UP);
        matmul(&l->wd, g->gate, ff, d_tix, nl, T, g->x, d, st, &g->mm, 1);
        mark(g, PR_MM_DOWN);
    }
    for (int r0 = 0; r0 < n_out; r0 += LOGIT_ROWS) {
        int nr = n_out - r0 < LOGIT_ROWS ? n_out - r0 : LOGIT_ROWS;
        k_rmsnorm<<<nr, 256, 0, st>>>(g->x, d_rows + r0, g->out_norm, g->xn, d, g->eps);
        matmul(&g->output, g->xn, d, d_oix + r0, g->h_olone[r0 / LOGIT_ROWS], nr, g->logits, g->nv, st, &g->mm);
        cudaMemcpyAsync(logits_dst + (size_t)r0 * g->nv, g->logits, (size_t)nr * g->nv * 4,
                        cudaMemcpyDeviceToHost, st);
    }
    mark(g, PR_LOGITS);
}

extern "C" enum kvs_status cuda_forward(struct cuda_ctx *g, const int32_t *tokens, const int32_t *pos,
                                        const int *slot, int T, const int *out_rows, int n_out, float *logits) {
    if (T < 1 || T > g->t_max) return kvs_fail(KVS_ERR_INVALID_ARG, "cuda: %d tokens in one pass", T);
    for (int t = 0; t < T; t++) {
        if (tokens[t] < 0 || tokens[t] >= g->nv)
            return kvs_fail(KVS_ERR_INVALID_ARG, "token id %d out of range [0, %d)", tokens[t], g->nv);
        if (slot[t] < 0 || slot[t] >= g->n_seq) return kvs_fail(KVS_ERR_INVALID_ARG, "cuda: bad slot %d", slot[t]);
    }
    int32_t *hm = g->h_meta;
    /* each token's rank among its slot's tokens in this pass: its entry goes to lens[layer] + rank */
    int *rank = hm + 8 * g->t_max, *qix = hm + 9 * g->t_max;
    for (int t = 0; t < T; t++) g->h_count[slot[t]] = 0;
    for (int t = 0; t < T; t++) rank[t] = g->h_count[slot[t]]++;
    for (int t = 0; t < T; t++) { /* (a slot's n: the most entries of any layer) */
        enum kvs_status st = seq_reserve(g, slot[t], g->h_seqs[slot[t]].n + g->h_count[slot[t]]);
        if (st == KVS_OK) st = seq_ring(g, slot[t]);
        if (st != KVS_OK) return st;
    }
    /* the newest qwin tokens of a slot with a query ring are saved there */
    for (int t = 0; t < T; t++) {
        const dseq *sq = &g->h_seqs[slot[t]];
        hseq *h = &g->hs[slot[t]];
        int c = g->h_count[slot[t]];
        qix[t] = -1;
        if (!sq->qwin || rank[t] < c - sq->qwin) continue;
        qix[t] = (h->q_next + rank[t] - (c > sq->qwin ? c - sq->qwin : 0)) % sq->qwin;
    }
    /* runs (k_acc): each slot's tokens of the pass in rank order, slots in order of first token;
     * acc: some slot of the pass keeps accumulated attention */
    int *run_first = hm + 10 * g->t_max, *run_len = hm + 11 * g->t_max, *run_tok = hm + 12 * g->t_max, n_runs = 0;
    bool acc = false;
    for (int t = 0; t < T; t++) g->h_run[slot[t]] = -1;
    for (int t = 0; t < T; t++) {
        if (g->h_run[slot[t]] < 0) {
            g->h_run[slot[t]] = n_runs;
            run_len[n_runs++] = g->h_count[slot[t]];
        }
        acc = acc || g->h_seqs[slot[t]].acc_on;
    }
    for (int r = 0, o = 0; r < T; r++) {
        if (r >= n_runs) run_len[r] = 0;
        run_first[r] = o, o += run_len[r];
    }
    for (int t = 0; t < T; t++) run_tok[run_first[g->h_run[slot[t]]] + rank[t]] = t;
    int acc_z = 1; /* k_acc's blocks a (run, head) outside graphs: enough for the longest run's entries */
    for (int t = 0; t < T; t++) {
        int z = (g->h_seqs[slot[t]].n + g->h_count[slot[t]] + ACC_T - 1) / ACC_T;
        if (g->h_seqs[slot[t]].acc_on && z > acc_z) acc_z = z > MAX_SPLIT ? MAX_SPLIT : z;
    }
    memcpy(hm, tokens, (size_t)T * 4);
    for (int t = 0; t < T; t++) hm[g->t_max + t] = pos[t] - g->hs[slot[t]].shift; /* (RoPE's positions) */
    memcpy(hm + 2 * g->t_max, slot, (size_t)T * 4);
    for (int r = 0; r < n_out; r++) hm[3 * g->t_max + r] = out_rows[r];
    /* key splits, chosen per token from its own sequence alone (so a sequence's results do not
     * depend on its batch): a sequence's lone token splits its keys (flash-decoding, to fill the
     * GPU at batch 1), prompt tokens take one pass each */
    int ns_max = 1, *nsp = hm + 4 * g->t_max, *poff = hm + 5 * g->t_max, *tix = hm + 6 * g->t_max,
        *oix = hm + 7 * g->t_max, n_lone = 0;
    unsigned char *lone = g->h_lone;
    for (int t = 0, o = 0; t < T; t++) {
        lone[t] = g->h_count[slot[t]] == 1;
        /* (the full cache: entry index = position; under a policy, the most of any layer) */
        int at = g->h_seqs[slot[t]].n + rank[t];
        int ns = lone[t] ? (at + SPLIT_KEYS) / SPLIT_KEYS : 1;
        nsp[t] = ns > MAX_SPLIT ? MAX_SPLIT : ns;
        poff[t] = o, o += nsp[t];
        if (nsp[t] > ns_max) ns_max = nsp[t];
    }
    /* the matmuls follow the same rule: lone tokens by GEMV, the others by tiles (token order
     * tix: the lone ones first) */
    for (int t = 0; t < T; t++)
        if (lone[t]) tix[n_lone++] = t;
    for (int t = 0, k = n_lone; t < T; t++)
        if (!lone[t]) tix[k++] = t;
    g->n_lone = n_lone;
    /* logits rows, per chunk of LOGIT_ROWS: lone tokens' rows first (indices within the chunk) */
    for (int r0 = 0; r0 < n_out; r0 += LOGIT_ROWS) {
        int nr = n_out - r0 < LOGIT_ROWS ? n_out - r0 : LOGIT_ROWS, k = 0;
        for (int pass = 0; pass < 2; pass++)
            for (int r = 0; r < nr; r++) {
                if (lone[out_rows[r0 + r]] == (pass == 0)) oix[r0 + k++] = r;
                if (pass == 0 && r == nr - 1) g->h_olone[r0 / LOGIT_ROWS] = k;
            }
    }
    /* decode steps of up to GRAPH_T tokens replay a CUDA graph captured once per (T, n_out):
     * launch parameters depend on those alone (the attention grid spans MAX_SPLIT splits, the
     * ones a token does not use return at once), the rest is read from device memory */
    cudaStream_t st = g->st;
    if (g->graphs && T <= GRAPH_T && n_out <= T && n_lone == T) {
        cudaGraphExec_t *ex = &g->gexec[acc][T][n_out];
        if (!*ex) {
            cudaGraph_t gr = NULL;
            cudaError_t e = cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal);
            if (e == cudaSuccess) {
                enqueue(g, T, n_out, MAX_SPLIT, acc ? T : 0, MAX_SPLIT, g->h_logits); /* (any T runs, any length) */
                e = cudaStreamEndCapture(st, &gr);
            }
            if (e == cudaSuccess) e = cudaGraphInstantiate(ex, gr, 0);
            if (gr) cudaGraphDestroy(gr);
            if (e != cudaSuccess) {
                *ex = NULL;
                return cuda_error(e, "capturing the decode graph");
            }
        }
        CK(cudaGraphLaunch(*ex, st), "graph launch");
        CK(cudaStreamSynchronize(st), "forward");
        memcpy(logits, g->h_logits, (size_t)n_out * g->nv * 4);
    } else {
        enqueue(g, T, n_out, ns_max, acc ? n_runs : 0, acc_z, logits);
        CK(cudaGetLastError(), "kernel launch");
        CK(cudaStreamSynchronize(st), "forward");
        prof_collect(g);
    }
    /* the bookkeeping: entries' positions (slots under a policy), queries kept, lengths */
    for (int t = 0; t < T; t++) {
        hseq *h = &g->hs[slot[t]];
        int32_t *ln = lens_of(g, slot[t]);
        if (h->pos)
            for (int l = 0; l < g->n_layer; l++)
                for (int kh = 0; kh < g->nkv; kh++) h->pos[((size_t)l * g->nkv + kh) * h->pcap + ln[l] + rank[t]] = pos[t];
        if (qix[t] >= 0) h->q_pos[qix[t]] = pos[t];
    }
    for (int t = 0; t < T; t++) {
        int c = g->h_count[slot[t]];
        if (rank[t] != c - 1) continue; /* once per slot, at its last token */
        hseq *h = &g->hs[slot[t]];
        dseq *sq = &g->h_seqs[slot[t]];
        int32_t *ln = lens_of(g, slot[t]);
        for (int l = 0; l < g->n_layer; l++) ln[l] += c;
        for (int l = 0; l < g->n_layer; l++) sq->n = ln[l] > sq->n ? ln[l] : sq->n;
        if (sq->qwin) {
            int saved = c < sq->qwin ? c : sq->qwin;
            h->q_next = (h->q_next + saved) % sq->qwin;
            h->q_n = h->q_n + saved > sq->qwin ? sq->qwin : h->q_n + saved;
        }
    }
    return KVS_OK;
}

extern "C" void cuda_kv_peak_reset(struct cuda_ctx *g) { g->kv_peak = g->kv_bytes; }

extern "C" uint64_t cuda_device_free_bytes(void) {
    size_t fr = 0, tot = 0;
    return cudaMemGetInfo(&fr, &tot) == cudaSuccess ? fr : 0;
}

extern "C" void cuda_use_graphs(struct cuda_ctx *g, bool on) { g->graphs = on && !g->pev; }

extern "C" int cuda_prof_read(const struct cuda_ctx *g, const char **names, double *secs, int max) {
    if (!g->pev) return 0;
    for (int i = 0; i < PR_N && i < max; i++) names[i] = prof_names[i], secs[i] = g->prof_s[i];
    return PR_N < max ? PR_N : max;
}

extern "C" enum kvs_status cuda_seq_copy(struct cuda_ctx *g, int dst, const struct cuda_ctx *gs, int src) {
    if (g == gs && dst == src) return KVS_OK;
    if (g->dev != gs->dev || g->n_layer != gs->n_layer || g->nkv != gs->nkv || g->hd != gs->hd || g->nh != gs->nh)
        return kvs_fail(KVS_ERR_INVALID_ARG, "cuda: a copy between contexts of different models or devices");
    const dseq *s = &gs->h_seqs[src];
    const hseq *hs = &gs->hs[src];
    cuda_seq_clear(g, dst); /* (on any error below, dst is left empty) */
    if (g->hs[dst].pos && !hs->pos && hs->compacted)
        return kvs_fail(KVS_ERR_INVALID_ARG, "cuda: the source's entries have dropped some positions and it does not "
                        "keep them; the target needs them (copy from a sequence under a policy or with statistics)");
    if (s->cap == 0) return KVS_OK;
    enum kvs_status st = seq_reserve(g, dst, s->n); /* (dst is empty: nothing moved) */
    if (st == KVS_OK) st = seq_ring(g, dst);
    if (st != KVS_OK) return st;
    dseq *d = &g->h_seqs[dst];
    hseq *hd_ = &g->hs[dst];
    size_t rows = (size_t)g->n_layer * g->nkv, hb = (size_t)g->hd * sizeof(__half);
    CK(cudaMemcpy2DAsync(d->k, d->cap * hb, s->k, s->cap * hb, s->n * hb, rows, cudaMemcpyDeviceToDevice, g->st), "K/V copy");
    CK(cudaMemcpy2DAsync(d->v, d->cap * hb, s->v, s->cap * hb, s->n * hb, rows, cudaMemcpyDeviceToDevice, g->st), "K/V copy");
    if (d->acc && s->acc)
        CK(cudaMemcpy2DAsync(d->acc, d->cap * sizeof(float), s->acc, s->cap * sizeof(float), s->n * sizeof(float), rows,
                             cudaMemcpyDeviceToDevice, g->st), "accumulated attention copy");
    else if (d->acc) /* a source that kept none: every entry starts at nothing received */
        CK(cudaMemsetAsync(d->acc, 0, acc_bytes(g, d), g->st), "accumulated attention copy");
    if (d->qr && s->qr) { /* the newest queries dst's window holds, oldest first from ring index 0 */
        int m = hs->q_n < d->qwin ? hs->q_n : d->qwin;
        size_t qb = (size_t)g->nh * g->hd * sizeof(float);
        for (int k = 0; k < m; k++) {
            int i = ((hs->q_next - m + k) % s->qwin + s->qwin) % s->qwin;
            CK(cudaMemcpy2DAsync(d->qr + (size_t)k * g->nh * g->hd, d->qwin * qb, s->qr + (size_t)i * g->nh * g->hd,
                                 s->qwin * qb, qb, (size_t)g->n_layer, cudaMemcpyDeviceToDevice, g->st), "query copy");
            hd_->q_pos[k] = hs->q_pos[i];
        }
        hd_->q_n = m, hd_->q_next = m % d->qwin;
    }
    hd_->shift = hs->shift, hd_->compacted = hs->compacted;
    CK(cudaStreamSynchronize(g->st), "K/V copy");
    const int32_t *ln = gs->h_lens + (size_t)src * gs->n_layer;
    memcpy(lens_of(g, dst), ln, sizeof(int32_t) * g->n_layer);
    if (hd_->pos) /* a source without positions that never dropped any: entry i is position i */
        for (size_t r = 0; r < rows; r++) {
            int32_t *o = hd_->pos + r * hd_->pcap, n = ln[r / g->nkv];
            if (hs->pos) memcpy(o, hs->pos + r * hs->pcap, sizeof(int32_t) * n);
            else for (int32_t i = 0; i < n; i++) o[i] = i;
        }
    d->n = s->n;
    return KVS_OK;
}

enum { SCORE_T = 128 /* entries per block of k_win_score */ };

/* sc[qi] = q_qi . k for the g query heads of a group (queries (g, hd) in shared memory, k one
 * fp16 key row), as k_attn computes its scores */
__device__ __forceinline__ void group_dots(const __half2 *kr, const float *qs, int g, int hd, float sc[MAXG]) {
#pragma unroll
    for (int qi = 0; qi < MAXG; qi++) sc[qi] = 0.0f;
    for (int d2 = 0; d2 < hd / 2; d2++) {
        float2 kf = __half22float2(kr[d2]);
#pragma unroll
        for (int qi = 0; qi < MAXG; qi++)
            if (qi < g) sc[qi] += qs[qi * hd + 2 * d2] * kf.x + qs[qi * hd + 2 * d2 + 1] * kf.y;
    }
}

/* SnapKV's window statistics: one block per (KV head, saved query w); for each query head of
 * the group, the largest scaled score m over the vis[h][w] entries the query sees and the sum
 * l of exp(score - m) */
__global__ void __launch_bounds__(256) k_win_ml(const dseq *seqs, int slot, int layer, int nh, int nkv, int hd,
                                                int q0, int nq, const int32_t *vis, float scale, float *ml) {
    extern __shared__ float qs[]; /* (g, hd) then the warps' (m, l) */
    int h = blockIdx.x, w = blockIdx.y, g = nh / nkv, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    dseq sq = seqs[slot];
    int ri = (q0 + w) % sq.qwin, n = vis[h * nq + w];
    const float *Q = sq.qr + (((size_t)layer * sq.qwin + ri) * nh + (size_t)h * g) * hd;
    for (int i = tid; i < g * hd; i += blockDim.x) qs[i] = Q[i];
    __syncthreads();
    const __half *K = sq.k + ((size_t)layer * nkv + h) * sq.cap * hd;
    float m[MAXG], l[MAXG];
#pragma unroll
    for (int qi = 0; qi < MAXG; qi++) m[qi] = -INFINITY, l[qi] = 0.0f;
    for (int j = tid; j < n; j += blockDim.x) {
        float sc[MAXG];
        group_dots((const __half2 *)(K + (size_t)j * hd), qs, g, hd, sc);
#pragma unroll
        for (int qi = 0; qi < MAXG; qi++)
            if (qi < g) {
                float x = sc[qi] * scale, mn = fmaxf(m[qi], x);
                l[qi] = l[qi] * __expf(m[qi] - mn) + __expf(x - mn), m[qi] = mn;
            }
    }
    float *red = qs + g * hd; /* (8 warps, g, 2) */
#pragma unroll
    for (int qi = 0; qi < MAXG; qi++)
        if (qi < g) {
            float M = warp_max(m[qi]);
            float L = M == -INFINITY ? 0.0f : warp_sum(m[qi] == -INFINITY ? 0.0f : l[qi] * __expf(m[qi] - M));
            if (lane == 0) red[(warp * g + qi) * 2] = M, red[(warp * g + qi) * 2 + 1] = L;
        }
    __syncthreads();
    if (tid < g) {
        float M = -INFINITY, L = 0.0f;
        for (int wi = 0; wi < (int)blockDim.x / 32; wi++) M = fmaxf(M, red[(wi * g + tid) * 2]);
        for (int wi = 0; wi < (int)blockDim.x / 32; wi++) {
            float mw = red[(wi * g + tid) * 2];
            if (mw != -INFINITY) L += red[(wi * g + tid) * 2 + 1] * __expf(mw - M);
        }
        ml[((size_t)(h * nq + w) * g + tid) * 2] = M, ml[((size_t)(h * nq + w) * g + tid) * 2 + 1] = L;
    }
}

/* SnapKV's window scores: one block per (KV head, SCORE_T entries), a thread per entry; out[h][j]
 * = sum over the saved queries w that see entry j of the group's probabilities for it,
 * aggregated over the query heads (mean, or max with agg_max) */
__global__ void __launch_bounds__(SCORE_T) k_win_score(const dseq *seqs, int slot, int layer, int nh, int nkv,
                                                       int hd, int q0, int nq, const int32_t *vis, const float *ml,
                                                       float scale, int agg_max, int n, float *out, int stride) {
    extern __shared__ float qs[]; /* (g, hd) queries, then the tile's keys as in k_attn */
    int h = blockIdx.x, tid = threadIdx.x, g = nh / nkv, j = blockIdx.y * SCORE_T + tid;
    const int kw = hd / 2 + 1, wpr = hd / 8;
    uint32_t *Ks = (uint32_t *)(qs + g * hd);
    dseq sq = seqs[slot];
    const __half *K = sq.k + ((size_t)layer * nkv + h) * sq.cap * hd;
    int kb = blockIdx.y * SCORE_T, nt = n - kb < SCORE_T ? n - kb : SCORE_T;
    const uint4 *Kg = (const uint4 *)(K + (size_t)kb * hd);
    for (int i = tid; i < nt * wpr; i += SCORE_T) {
        uint4 a = Kg[i];
        uint32_t *dk = Ks + (i / wpr) * kw + (i % wpr) * 4;
        dk[0] = a.x, dk[1] = a.y, dk[2] = a.z, dk[3] = a.w;
    }
    float acc = 0.0f;
    for (int w = 0; w < nq; w++) {
        __syncthreads();
        int ri = (q0 + w) % sq.qwin;
        const float *Q = sq.qr + (((size_t)layer * sq.qwin + ri) * nh + (size_t)h * g) * hd;
        for (int i = tid; i < g * hd; i += SCORE_T) qs[i] = Q[i];
        __syncthreads();
        if (j >= vis[h * nq + w]) continue;
        float sc[MAXG];
        group_dots((const __half2 *)(Ks + tid * kw), qs, g, hd, sc);
        float agg = 0.0f;
        const float *mlw = ml + (size_t)(h * nq + w) * g * 2;
#pragma unroll
        for (int qi = 0; qi < MAXG; qi++)
            if (qi < g) {
                float p = __expf(sc[qi] * scale - mlw[2 * qi]) / mlw[2 * qi + 1];
                agg = agg_max ? fmaxf(agg, p) : agg + p / (float)g;
            }
        acc += agg;
    }
    if (j < n) out[(size_t)h * stride + j] = acc;
}

/* the layer list of a planning call: n_layers layers of the model, each holding at most stride
 * entries in slot; the most of them to *nmax */
static enum kvs_status check_layers(cuda_ctx *g, int slot, int n_layers, const int *layers, size_t stride, int *nmax) {
    *nmax = 0;
    if (n_layers < 0 || n_layers > g->n_layer) return kvs_fail(KVS_ERR_INTERNAL, "cuda: %d layers", n_layers);
    for (int i = 0; i < n_layers; i++) {
        if (layers[i] < 0 || layers[i] >= g->n_layer) return kvs_fail(KVS_ERR_INTERNAL, "cuda: layer %d", layers[i]);
        int n = lens_of(g, slot)[layers[i]];
        if ((size_t)n > stride) return kvs_fail(KVS_ERR_INTERNAL, "cuda: %d entries, rows of %zu", n, stride);
        *nmax = n > *nmax ? n : *nmax;
    }
    return KVS_OK;
}

/* scratch of the planning kernels, for every layer at once: scores (layer, head, entry), softmax
 * (m, l) per window query, the queries' visible counts */
static enum kvs_status score_scratch(cuda_ctx *g, int nq) {
    size_t cap = (size_t)(g->n_ctx + g->t_max);
    if (!g->d_wscore || nq > g->wq_cap) { /* sized for the most queries asked so far */
        int grp = g->nh / g->nkv;
        size_t rows = (size_t)g->n_layer * g->nkv, qc = nq > 32 ? (size_t)nq : 32;
        cudaFree(g->d_wscore), cudaFree(g->d_wml), cudaFree(g->d_wvis);
        g->scratch_bytes -= g->wscratch_bytes;
        g->d_wscore = g->d_wml = NULL, g->d_wvis = NULL, g->wq_cap = 0, g->wscratch_bytes = 0;
        if (cudaMalloc(&g->d_wscore, rows * cap * sizeof(float)) != cudaSuccess ||
            cudaMalloc(&g->d_wml, rows * qc * grp * 2 * sizeof(float)) != cudaSuccess ||
            cudaMalloc(&g->d_wvis, rows * qc * sizeof(int32_t)) != cudaSuccess) {
            cudaFree(g->d_wscore), cudaFree(g->d_wml), cudaFree(g->d_wvis);
            g->d_wscore = g->d_wml = NULL, g->d_wvis = NULL;
            cudaGetLastError();
            return kvs_fail(KVS_ERR_NOMEM, "cuda: out of GPU memory for the window scores");
        }
        g->wq_cap = (int)qc;
        g->wscratch_bytes = rows * (cap + qc * (grp * 2 + 1)) * sizeof(float);
        g->scratch_bytes += g->wscratch_bytes;
        size_t most = (size_t)MAXG * 256 * sizeof(float) + (size_t)SCORE_T * (256 / 2 + 1) * sizeof(uint32_t);
        CK(cudaFuncSetAttribute(k_win_score, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)most), "window scores");
    }
    return KVS_OK;
}

extern "C" enum kvs_status cuda_seq_score_window(struct cuda_ctx *g, int slot, int n_layers, const int *layers,
                                                 const int32_t *vis, int nq, bool agg_max, float *out, size_t stride) {
    const dseq *sq = &g->h_seqs[slot];
    const hseq *h = &g->hs[slot];
    int grp = g->nh / g->nkv, nmax = 0;
    if (!sq->qr || nq > h->q_n || nq < 0 || nq > QWIN_MAX)
        return kvs_fail(KVS_ERR_INTERNAL, "cuda: slot %d keeps %d queries, %d asked", slot, h->q_n, nq);
    enum kvs_status st = check_layers(g, slot, n_layers, layers, stride, &nmax);
    if (st != KVS_OK) return st;
    for (int i = 0; i < n_layers; i++) {
        int n = lens_of(g, slot)[layers[i]];
        for (int j = 0; j < g->nkv * nq; j++) {
            int v = vis[((size_t)i * g->nkv) * nq + j];
            if (v < 0 || v > n) return kvs_fail(KVS_ERR_INTERNAL, "cuda: a query sees %d of %d entries", v, n);
        }
    }
    if (nmax == 0 || n_layers == 0) return KVS_OK;
    if (nq == 0) {
        for (size_t r = 0; r < (size_t)n_layers * g->nkv; r++) memset(out + r * stride, 0, sizeof(float) * nmax);
        return KVS_OK;
    }
    if ((st = score_scratch(g, nq)) != KVS_OK) return st;
    size_t cap = (size_t)(g->n_ctx + g->t_max);
    int q0 = ((h->q_next - nq) % sq->qwin + sq->qwin) % sq->qwin; /* the oldest of the newest nq */
    float scale = 1.0f / sqrtf((float)g->hd);
    CK(cudaMemcpyAsync(g->d_wvis, vis, sizeof(int32_t) * n_layers * g->nkv * nq, cudaMemcpyHostToDevice, g->st),
       "window scores");
    size_t sm1 = ((size_t)grp * g->hd + 8 * grp * 2) * sizeof(float);
    size_t sm2 = (size_t)grp * g->hd * sizeof(float) + (size_t)SCORE_T * (g->hd / 2 + 1) * sizeof(uint32_t);
    for (int i = 0; i < n_layers; i++) { /* the layers' launches back to back, one copy and one wait */
        int n = lens_of(g, slot)[layers[i]];
        if (n == 0) continue;
        const int32_t *vi = g->d_wvis + (size_t)i * g->nkv * nq;
        float *ml = g->d_wml + (size_t)i * g->nkv * nq * grp * 2, *sc = g->d_wscore + (size_t)i * g->nkv * cap;
        k_win_ml<<<dim3(g->nkv, nq), 256, sm1, g->st>>>(g->d_seqs, slot, layers[i], g->nh, g->nkv, g->hd, q0, nq, vi,
                                                        scale, ml);
        k_win_score<<<dim3(g->nkv, (n + SCORE_T - 1) / SCORE_T), SCORE_T, sm2, g->st>>>(
            g->d_seqs, slot, layers[i], g->nh, g->nkv, g->hd, q0, nq, vi, ml, scale, agg_max, n, sc, (int)cap);
    }
    CK(cudaGetLastError(), "window scores");
    CK(cudaMemcpy2DAsync(out, stride * sizeof(float), g->d_wscore, cap * sizeof(float), nmax * sizeof(float),
                         (size_t)n_layers * g->nkv, cudaMemcpyDeviceToHost, g->st), "window scores");
    CK(cudaStreamSynchronize(g->st), "window scores");
    return KVS_OK;
}

/* key norm: the sum of squares of each stored key of row (layer, h) of the slot's K, one thread an
 * entry summing d = 0 .. hd - 1 in order, each square rounded then added (as knorm.c does on the
 * CPU: the same sum of the same fp16 key), into out[(i * nkv + h) * stride + j] */
__global__ void k_key_sq(const dseq *seqs, int slot, const int *layers, const int *lens, int nkv, int hd,
                         float *out, int stride) {
    int i = blockIdx.y, h = blockIdx.z, l = layers[i], n = lens[l];
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    dseq sq = seqs[slot];
    const uint4 *K = (const uint4 *)(sq.k + (((size_t)l * nkv + h) * sq.cap + j) * hd);
    float ss = 0.0f;
    for (int w = 0; w < hd / 8; w++) {
        uint4 u = K[w];
        const __half *x = (const __half *)&u;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            float y = __half2float(x[e]);
            ss = __fadd_rn(ss, __fmul_rn(y, y));
        }
    }
    out[((size_t)i * nkv + h) * stride + j] = ss;
}

extern "C" enum kvs_status cuda_seq_key_sq(struct cuda_ctx *g, int slot, int n_layers, const int *layers, float *out,
                                           size_t stride) {
    int nmax;
    enum kvs_status st = check_layers(g, slot, n_layers, layers, stride, &nmax);
    if (st != KVS_OK || nmax == 0) return st;
    if ((st = score_scratch(g, 0)) != KVS_OK) return st;
    size_t cap = (size_t)(g->n_ctx + g->t_max);
    /* the layer list and the slot's lengths through the metadata (not in use between passes) */
    int *d_lens, *d_layers = (int *)g->d_wvis;
    CK(put_lens(g, slot, lens_of(g, slot), &d_lens), "key norms");
    CK(cudaMemcpyAsync(d_layers, layers, sizeof(int) * n_layers, cudaMemcpyHostToDevice, g->st), "key norms");
    k_key_sq<<<dim3((unsigned)((nmax + 127) / 128), (unsigned)n_layers, (unsigned)g->nkv), 128, 0, g->st>>>(
        g->d_seqs, slot, d_layers, d_lens, g->nkv, g->hd, g->d_wscore, (int)cap);
    CK(cudaGetLastError(), "key norms");
    CK(cudaMemcpy2DAsync(out, stride * sizeof(float), g->d_wscore, cap * sizeof(float), nmax * sizeof(float),
                         (size_t)n_layers * g->nkv, cudaMemcpyDeviceToHost, g->st), "key norms");
    CK(cudaStreamSynchronize(g->st), "key norms");
    return KVS_OK;
}

extern "C" enum kvs_status cuda_seq_acc(struct cuda_ctx *g, int slot, int n_layers, const int *layers, float *out,
                                        size_t stride) {
    const dseq *sq = &g->h_seqs[slot];
    if (!sq->acc_on) return kvs_fail(KVS_ERR_INTERNAL, "cuda: slot %d keeps no accumulated attention", slot);
    int nmax;
    enum kvs_status st = check_layers(g, slot, n_layers, layers, stride, &nmax);
    if (st != KVS_OK) return st;
    for (int i = 0; i < n_layers; i++) {
        int n = lens_of(g, slot)[layers[i]];
        if (n == 0) continue;
        if (!sq->acc) return kvs_fail(KVS_ERR_INTERNAL, "cuda: slot %d has entries and no accumulated attention", slot);
        CK(cudaMemcpy2DAsync(out + (size_t)i * g->nkv * stride, stride * sizeof(float),
                             sq->acc + (size_t)layers[i] * g->nkv * sq->cap, (size_t)sq->cap * sizeof(float),
                             (size_t)n * sizeof(float), (size_t)g->nkv, cudaMemcpyDeviceToHost, g->st),
           "accumulated attention");
    }
    CK(cudaStreamSynchronize(g->st), "accumulated attention");
    return KVS_OK;
}

/* streaming pos=cache: after a compaction, the key now at entry i of row (l, h), which was entry
 * j = keep[row * kstride + i], is turned by i - j positions, as the CPU store's rerotate() does
 * (angle in double, products and sums rounded as there, no FMA: the same fp16 key) */
__global__ void k_kv_rerotate(__half *k, int cap, const int32_t *keep, int kstride, const int *n_new, int nkv, int hd,
                              const float *inv_freq, int neox) {
    int row = blockIdx.x, n = n_new[row / nkv], half = hd / 2;
    __half *K = k + (size_t)row * cap * hd;
    const int32_t *kp = keep + (size_t)row * kstride;
    for (int i = blockIdx.y * blockDim.y + threadIdx.y; i < n; i += gridDim.y * blockDim.y) {
        int delta = i - kp[i];
        if (delta == 0) continue;
        __half *x = K + (size_t)i * hd;
        for (int p = threadIdx.x; p < half; p += blockDim.x) {
            double a = (double)delta * (double)inv_freq[p];
            float cs = (float)cos(a), sn = (float)sin(a);
            int ia = neox ? p : 2 * p, ib = neox ? p + half : 2 * p + 1;
            float x0 = __half2float(x[ia]), x1 = __half2float(x[ib]);
            x[ia] = __float2half_rn(__fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn)));
            x[ib] = __float2half_rn(__fadd_rn(__fmul_rn(x0, sn), __fmul_rn(x1, cs)));
        }
    }
}

extern "C" enum kvs_status cuda_seq_compact(struct cuda_ctx *g, int slot, const int32_t *const *keep,
                                            const int32_t *n_keep, int kstride, bool reindex) {
    hseq *h = &g->hs[slot];
    int32_t *ln = lens_of(g, slot), nmax = 0;
    for (int l = 0; l < g->n_layer; l++) {
        if (n_keep[l] < 0 || n_keep[l] > ln[l] || n_keep[l] > kstride || (!keep[l] && n_keep[l] != ln[l]))
            return kvs_fail(KVS_ERR_INTERNAL, "cuda: layer %d keeps %d of %d entries", l, n_keep[l], ln[l]);
        for (int kh = 0; keep[l] && kh < g->nkv; kh++)
            for (int i = 0; i < n_keep[l]; i++) {
                int32_t j = keep[l][(size_t)kh * kstride + i];
                if (j < 0 || j >= ln[l] || (i && j <= keep[l][(size_t)kh * kstride + i - 1]))
                    return kvs_fail(KVS_ERR_INTERNAL, "cuda: layer %d head %d: kept indices not ascending", l, kh);
            }
        nmax = n_keep[l] > nmax ? n_keep[l] : nmax;
    }
    size_t rows = (size_t)g->n_layer * g->nkv, need = rows * (size_t)(nmax ? nmax : 1);
    if (need > g->keep_cap) {
        cudaFree(g->d_keep);
        g->d_keep = NULL, g->keep_cap = 0;
        CK(cudaMalloc(&g->d_keep, need * sizeof(int32_t)), "compaction");
        g->keep_cap = need;
    }
    int32_t *hk = (int32_t *)malloc(need * sizeof(int32_t));
    if (!hk) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    for (size_t r = 0; r < rows; r++) {
        int l = (int)(r / g->nkv), kh = (int)(r % g->nkv);
        for (int i = 0; i < n_keep[l]; i++) hk[r * nmax + i] = keep[l] ? keep[l][(size_t)kh * kstride + i] : i;
    }
    cudaError_t e = cudaMemcpyAsync(g->d_keep, hk, need * sizeof(int32_t), cudaMemcpyHostToDevice, g->st);
    if (e == cudaSuccess) e = cudaStreamSynchronize(g->st);
    if (e != cudaSuccess) {
        free(hk);
        return cuda_error(e, "compaction");
    }
    /* the new capacity: what is kept plus room for 256 more; a cache that would shrink moves to
     * new buffers (device memory shrinks with it), else it is compacted where it is */
    int cap = (nmax + 256 + 255) / 256 * 256;
    if (cap > g->n_ctx + g->t_max) cap = g->n_ctx + g->t_max;
    enum kvs_status st = KVS_OK;
    dseq *s = &g->h_seqs[slot];
    if (cap < s->cap) {
        st = seq_move(g, slot, cap, g->d_keep, nmax, n_keep);
    } else if (nmax > 0) {
        int *d_n;
        e = put_lens(g, slot, n_keep, &d_n);
        if (e == cudaSuccess)
            k_kv_compact<<<(unsigned)rows, dim3(32, 16), 0, g->st>>>(s->k, s->v, s->acc, s->cap, g->d_keep, nmax, d_n,
                                                                  g->nkv, g->hd);
        if (e == cudaSuccess) e = cudaGetLastError();
        if (e == cudaSuccess) e = cudaStreamSynchronize(g->st);
        if (e != cudaSuccess) st = cuda_error(e, "compacting a K/V cache");
    }
    if (st == KVS_OK && reindex && nmax > 0) {
        int *d_n;
        e = put_lens(g, slot, n_keep, &d_n);
        int gy = (nmax + 7) / 8;
        if (e == cudaSuccess)
            k_kv_rerotate<<<dim3((unsigned)rows, gy > 64 ? 64 : gy), dim3(32, 8), 0, g->st>>>(
                s->k, s->cap, g->d_keep, nmax, d_n, g->nkv, g->hd, g->inv_freq, g->neox);
        if (e == cudaSuccess) e = cudaGetLastError();
        if (e == cudaSuccess) e = cudaStreamSynchronize(g->st);
        if (e != cudaSuccess) st = cuda_error(e, "re-rotating a K/V cache's keys");
    }
    if (st == KVS_OK) {
        s->n = nmax;
        for (int l = 0; l < g->n_layer; l++) h->compacted = h->compacted || n_keep[l] < ln[l];
        if (h->pos)
            for (size_t r = 0; r < rows; r++) {
                int32_t *p = h->pos + r * h->pcap;
                for (int i = 0; i < n_keep[r / g->nkv]; i++) p[i] = p[hk[r * nmax + i]];
            }
        memcpy(ln, n_keep, sizeof(int32_t) * g->n_layer);
    }
    free(hk);
    return st;
}

extern "C" double cuda_bandwidth_gb_s(struct cuda_ctx *g) {
    size_t bytes = (size_t)1 << 30;
    void *a = NULL, *b = NULL;
    if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) {
        cudaFree(a);
        return -1;
    }
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    float best = 1e30f;
    cudaMemsetAsync(a, 1, bytes, g->st);
    for (int i = 0; i < 6; i++) {
        cudaEventRecord(e0, g->st);
        cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, g->st);
        cudaEventRecord(e1, g->st);
        cudaEventSynchronize(e1);
        float ms;
        cudaEventElapsedTime(&ms, e0, e1);
        if (i > 0 && ms < best) best = ms;
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    return 2.0 * (double)bytes / (best * 1e-3) / 1e9; /* each byte read once and written once */
}

/* deq8 run on the host (no GPU needed): a GGUF row of `cols` elements put in the planes layout
 * as the upload does, then elements 8p .. 8p+7 of its unit u, factor applied; a load that would
 * be misaligned on the GPU is an error */
extern "C" enum kvs_status cuda_host_deq8(int type, const void *row, size_t row_bytes, int64_t cols, int u, int p,
                                          float *out) {
    if (!cuda_type_supported(type)) return kvs_fail(KVS_ERR_UNSUPPORTED, "cuda: type %d", type);
    uint8_t *r = (uint8_t *)aligned_alloc(16, (row_bytes + 15) / 16 * 16);
    if (!r) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    planes_row(type, (const uint8_t *)row, row_bytes, cols, r);
    host_misaligned = 0;
    switch (type) {
#define D8(t) case t: deq8_scaled<t>(r, (int)cols, u, p, out); break;
    D8(T_F32) D8(T_F16) D8(T_BF16) D8(T_Q4_0) D8(T_Q4_1) D8(T_Q5_0) D8(T_Q5_1) D8(T_Q8_0) D8(T_Q4_K) D8(T_Q6_K)
#undef D8
    }
    free(r);
    if (host_misaligned)
        return kvs_fail(KVS_ERR_INTERNAL, "cuda: deq8 of type %d made %d misaligned loads", type, host_misaligned);
    return KVS_OK;
}

extern "C" enum kvs_status cuda_test_matmul(int type, const void *W, size_t row_bytes, int64_t n_rows,
                                            int64_t n_cols, const float *x, int T, int n_lone, float *y) {
    cuda_w w = {W, type, n_rows, n_cols, row_bytes};
    cuda_ctx g = {};
    void *allocs[1] = {NULL};
    g.allocs = allocs;
    dweight dw;
    enum kvs_status s = up_weight(&g, &w, &dw, "test weight");
    if (s != KVS_OK) return s;
    float *dx = NULL, *dy = NULL;
    int *dt = NULL, *ht = (int *)malloc(sizeof(int) * (size_t)T);
    if (!ht) return kvs_fail(KVS_ERR_NOMEM, "out of memory");
    for (int t = 0; t < T; t++) ht[t] = t;
    cudaError_t e = cudaMalloc(&dx, (size_t)T * n_cols * 4);
    if (e == cudaSuccess) e = cudaMalloc(&dy, (size_t)T * n_rows * 4);
    if (e == cudaSuccess) e = cudaMalloc(&dt, (size_t)T * sizeof(int));
    if (e == cudaSuccess) e = cudaMemcpy(dt, ht, (size_t)T * sizeof(int), cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cudaMemcpy(dx, x, (size_t)T * n_cols * 4, cudaMemcpyHostToDevice);
    /* 8 lone tokens or more: the staged GEMV; KVS_CUDA_PREFILL=sgemm|tf32: the prompt rows by cuBLAS */
    mm_cfg mc = {1, NULL, NULL, NULL, NULL, NULL, 0};
    blas bl = {};
    const char *pe = getenv("KVS_CUDA_PREFILL");
    if (e == cudaSuccess && pe && (!strcmp(pe, "sgemm") || !strcmp(pe, "tf32"))) {
        s = blas_load(&bl, !strcmp(pe, "tf32"), 0);
        if (s == KVS_OK) {
            mc.b = &bl, mc.wf_cap = (size_t)n_rows * n_cols;
            e = cudaMalloc(&mc.wf, mc.wf_cap * 4);
            if (e == cudaSuccess) e = cudaMalloc(&mc.xg, (size_t)T * n_cols * 4);
            if (e == cudaSuccess) e = cudaMalloc(&mc.yg, (size_t)T * n_rows * 4);
            if (e == cudaSuccess) e = cudaMalloc(&mc.yg2, (size_t)T * n_rows * 4);
        }
    }
    if (e == cudaSuccess && s == KVS_OK) {
        matmul(&dw, dx, (int)n_cols, dt, n_lone, T, dy, (int)n_rows, 0, &mc);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess && s == KVS_OK) e = cudaMemcpy(y, dy, (size_t)T * n_rows * 4, cudaMemcpyDeviceToHost);
    cudaFree(mc.wf), cudaFree(mc.xg), cudaFree(mc.yg), cudaFree(mc.yg2);
    blas_close(&bl);
    if (s != KVS_OK) {
        cudaFree(dx), cudaFree(dy), cudaFree(dt), free(ht), cudaFree(allocs[0]);
        return s;
    }
    cudaFree(dx);
    cudaFree(dy);
    cudaFree(dt);
    free(ht);
    cudaFree(allocs[0]);
    return e == cudaSuccess ? KVS_OK : cuda_error(e, "test matmul");
}
