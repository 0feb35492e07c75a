// The tensor-core GEMVs' code-pair decode and mma (exl2_mma.cu: words from global memory; exl2_stream.cu's
// multi-row kernel: from its stages). Lane (g, t) = (lane / 4, lane % 4) holds, within every 32-row block, rows
// 8t .. 8t + 7 of its columns as 4 code pairs (exl2_mma.cu's header says why and how).
#pragma once
#include "exl2_common.cuh"

// Activation rows are the mma's n8: a launch of M rows takes row_tiles(M) n8 tiles (2 above 8 rows), each A
// fragment (the decoded weights) multiplied with every tile's B fragment, so 9-16 rows decode the weights once.
__host__ __device__ constexpr int row_tiles(int rows) { return (rows + 7) / 8; }

// A lane's accumulators of one 16-column tile: 4 a row tile, float acc[4 · row_tiles(M)]. Accumulator i holds
// activation row acc_row(i, t) of column acc_column(i, g) (within the 16); offsets (the gather's sums for the lane's
// rows) are indexed by acc_offset(i): rows 8n + 2t + j at 2n + j.
__device__ __forceinline__ int acc_row(int i, int t) { return 8 * (i >> 2) + 2 * t + (i & 1); }
__device__ __forceinline__ int acc_column(int i, int g) { return g + (i & 2) * 4; }
__device__ __forceinline__ int acc_offset(int i) { return 2 * (i >> 2) + (i & 1); }

// d = a b + d for one 16 x 8 x 16 tile: fp16 inputs, fp32 accumulators (c0, c1: column g, activation rows 2t,
// 2t + 1; c2, c3: column g + 8).
__device__ __forceinline__ void mma_16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Words a lane loads per 32-row block and column, by width.
__host__ __device__ constexpr int lane_words(int bits) { return bits == 2 || bits == 4 ? 1 : 2; }

// The first of those words, as a word row within the block.
template <int B>
__device__ __forceinline__ int first_word(int t) {
    return B == 2 ? t >> 1 : B == 4 ? t : B == 8 ? 2 * t : (8 * t * B) >> 5;
}

// Code pairs 2·step and 2·step + 1 (as fp16 pairs 1024 + 2^s q) of a lane's 8 rows of one column, from its words
// w0, w1: the A fragment halves of one mma step. Pair p holds rows (p, p + 4), for 8 bits (0, 2), (1, 3), (4, 6),
// (5, 7); the factor 2^s is 16 on odd 4-bit pairs and 4^p on 2-bit ones (exl2_ops.pair_row, pair_shift).
template <int B>
__device__ __forceinline__ void decode_step(u32 w0, u32 w1, int t, int step, u32 h1024, u32* pair) {
    if (B == 4) {
        const u32 w = step ? w0 >> 8 : w0;
        pair[0] = (w & 0x000F000Fu) | h1024;
        pair[1] = (w & 0x00F000F0u) | h1024;
    } else if (B == 8) {  // bytes of w0: rows 0-3; of w1: rows 4-7
        const u32 w = step ? w1 : w0;
        pair[0] = (w & 0x00FF00FFu) | h1024;
        pair[1] = ((w >> 8) & 0x00FF00FFu) | h1024;
    } else if (B == 2) {  // the lane's 16 bits spread as bytes b0, 0, b1, 0: rows 0-3 low, 4-7 high
        const u32 spread = __byte_perm(w0, 0u, (t & 1) ? 0x4342u : 0x4140u);
        pair[0] = (spread & (step ? 0x00300030u : 0x00030003u)) | h1024;
        pair[1] = (spread & (step ? 0x00C000C0u : 0x000C000Cu)) | h1024;
    } else {  // 3, 5, 6 bits: codes from the 64-bit window that starts at the lane's first row, unscaled
        const unsigned long long v = ((((unsigned long long)w1 << 32) | w0) >> ((8 * t * B) & 31)) >> (2 * step * B);
        constexpr u32 mask = (1u << B) - 1u;
#pragma unroll
        for (int i = 0; i < 2; i++)
            pair[i] = ((u32)(v >> (i * B)) & mask) | (((u32)(v >> ((i + 4) * B)) & mask) << 16) | h1024;
    }
}

// Scales of one group for columns col0 + g + 8i, i < 4, from its four scale words for columns col0 .. col0 + 31
// (nibble g of word i) and the group's multiplier M_g.
__device__ __forceinline__ void group_scales(uint4 words, float multiplier, int g, float* scale) {
    const u32 w[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float c = (float)(((w[i] >> (4 * g)) & 15u) + 1u);
        scale[i] = c * c * multiplier;
    }
}

// One 32-row block's products for a lane's two 16-column tiles: words[c][w] holds word w of column g + 8c (tile c / 2),
// xv[n] the lane's B fragments of row tile n (activation row 8n + g's 8 values at its rows, slot order) for the
// block's two mma steps.
template <int B, int NT>
__device__ __forceinline__ void block_mma(const u32 (*words)[lane_words(B)], const uint4* xv, int t, u32 h1024,
                                          float (*acc)[4 * NT]) {
    constexpr int W = lane_words(B);
#pragma unroll
    for (int tile = 0; tile < 2; tile++) {
#pragma unroll
        for (int step = 0; step < 2; step++) {  // rows of the block's first, then second mma step
            u32 lo[2], hi[2];  // columns g and g + 8
            decode_step<B>(words[2 * tile][0], words[2 * tile][W - 1], t, step, h1024, lo);
            decode_step<B>(words[2 * tile + 1][0], words[2 * tile + 1][W - 1], t, step, h1024, hi);
#pragma unroll
            for (int n = 0; n < NT; n++)
                mma_16816(acc[tile] + 4 * n, lo[0], hi[0], lo[1], hi[1], step ? xv[n].z : xv[n].x,
                          step ? xv[n].w : xv[n].y);
        }
    }
}

// A group's end: total += scale · (acc − the gather's offset sums), acc and offset start over. acc[tile][i]: column
// 16·tile + acc_column(i, g), activation row acc_row(i, t); offset[acc_offset(i)]: that row's.
template <int M>
__device__ __forceinline__ void fold_group(const float* scale, float (*acc)[4 * row_tiles(M)], float* offset,
                                           float (*total)[4 * row_tiles(M)]) {
#pragma unroll
    for (int tile = 0; tile < 2; tile++) {
#pragma unroll
        for (int i = 0; i < 4 * row_tiles(M); i++) {
            if (M > 1 || (i & 1) == 0)  // at M = 1 only activation row 2t (t = 0) is used
                total[tile][i] = fmaf(scale[2 * tile + (i >> 1 & 1)], acc[tile][i] - offset[acc_offset(i)], total[tile][i]);
            acc[tile][i] = 0.0f;
        }
    }
#pragma unroll
    for (int j = 0; j < 2 * row_tiles(M); j++) offset[j] = 0.0f;
}

// The offset sums of 32-row block `block` (off: [block][8 · row_tiles(M)], row m at m) for the lane's rows, added in.
template <int M>
__device__ __forceinline__ void add_offsets(const float* off, int t, float* offset) {
#pragma unroll
    for (int n = 0; n < row_tiles(M); n++) {
        const float2 o = *reinterpret_cast<const float2*>(off + 8 * n + 2 * t);
        offset[2 * n] += o.x;
        offset[2 * n + 1] += o.y;
    }
}

// The lane's B fragments of 32-row block `block` for each row tile, from the activations xh [M][stride / 8] (slot
// order); rows past M are zero.
template <int M>
__device__ __forceinline__ void row_fragments(const uint4* xh, int stride, int block, int g, int t, uint4* xv) {
#pragma unroll
    for (int n = 0; n < row_tiles(M); n++)
        xv[n] = g + 8 * n < M ? xh[(g + 8 * n) * (stride >> 3) + block * 4 + t] : make_uint4(0u, 0u, 0u, 0u);
}

// The warp's sums of its 32 columns (from column `first` of a [M][n_pad] fp32 workspace) added in: through `sums`
// (the warp's own [M][36] floats of shared memory; 36: rows 2t on distinct banks) so that one vector reduction adds
// 4 adjacent columns (add_quad).
template <int M>
__device__ __forceinline__ void add_warp_sums(float* workspace, int n_pad, int first, float (*sums)[36],
                                              const float (*total)[4 * row_tiles(M)], int g, int t) {
#pragma unroll
    for (int tile = 0; tile < 2; tile++) {
#pragma unroll
        for (int i = 0; i < 4 * row_tiles(M); i++) {
            const int m = acc_row(i, t);
            if (m < M) sums[m][16 * tile + acc_column(i, g)] = total[tile][i];
        }
    }
    __syncwarp();
    for (int v = (int)threadIdx.x & 31; v < M * 8; v += 32)
        add_quad(workspace + (size_t)(v >> 3) * n_pad + first + 4 * (v & 7),
                 *reinterpret_cast<const float4*>(&sums[v >> 3][4 * (v & 7)]));
    __syncwarp();  // the next call's stores wait for these loads
}

__host__ __device__ constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }
__host__ __device__ constexpr int log2_of(int p) { return p <= 1 ? 0 : 1 + log2_of(p / 2); }

// out[m] = Σ over the warp's 32 lanes of v[m], for m < M (v holds pow2_at_least(M) values, zero past M), by halving
// the values each step: at the step of lane bit 4 - i, a lane keeps the upper half of its values if it has that bit,
// else the lower, and adds its partner's; after log2 P steps (P = pow2_at_least(M)) lane l holds a partial sum of
// value l >> (5 - log2 P), which the remaining 5 - log2 P steps finish. Why: M warp_sums take 5M shuffles (80 at 16
// rows), this P - 1 + 5 - log2 P (16), plus P - 1 selects pairs.
template <int M>
__device__ __forceinline__ void scattered_warp_sums(float (&v)[pow2_at_least(M)], float* out) {
    constexpr int P = pow2_at_least(M), STEPS = log2_of(P);
    const int lane = (int)threadIdx.x & 31;
#pragma unroll
    for (int step = 0; step < STEPS; step++) {
        const int half = P >> (step + 1), offset = 16 >> step;
        const bool upper = (lane & offset) != 0;
#pragma unroll
        for (int i = 0; i < P / 2; i++) {  // a constant trip count, so that it unrolls before the outer loop does
            if (i < half) {
                const float send = upper ? v[i] : v[i + half], keep = upper ? v[i + half] : v[i];
                v[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
            }
        }
    }
#pragma unroll
    for (int offset = 16 >> STEPS; offset > 0; offset >>= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
    const int m = lane >> (5 - STEPS);
    if ((lane & ((32 >> STEPS) - 1)) == 0 && m < M) out[m] = v[0];
}

// The gather of one 32-row block of stored rows for M activation rows, by one warp (lane i: row i; `entry`: its
// table entry, channel | slot << 20 | s << 25 | (bits - 1) << 28): each row's x · 2^-s into xs[m · stride + slot]
// (slot order: `slot_base` + the entry's slot), and the block's offset sums Σ b (1024 + 2^s z) into off[m]: with
// SCATTERED, by scattered_warp_sums (from the lanes it names; the multi-row streamed kernel: 16 rows 1-5 % faster on
// the H100, session 41), else one warp_sum a row (lane 0; exl2_mma.cu, where the scattered sums cost registers on
// sm_80 that were never timed: a prepared variant there).
template <int M, bool SCATTERED>
__device__ __forceinline__ void gather_mma_block(const u16* __restrict__ x, int K, int entry, u16* xs, int stride,
                                                 int slot_base, float* off) {
    const int s = (entry >> 25) & 7, bits = ((entry >> 28) & 7) + 1, slot = slot_base + ((entry >> 20) & 31);
    const float down = __int_as_float((127 - s) << 23), up = 1024.0f + (float)((1 << s) << (bits - 1));
    float x_m[M];
#pragma unroll
    for (int m = 0; m < M; m++) x_m[m] = Act<fp16_t>::load(x[(size_t)m * K + (entry & 0xfffff)]);
    float terms[pow2_at_least(M)];  // zero past M
#pragma unroll
    for (int m = 0; m < pow2_at_least(M); m++) {
        if (m < M) {
            const u16 b = Act<fp16_t>::store(x_m[m] * down);
            xs[m * stride + slot] = b;
            terms[m] = Act<fp16_t>::load(b) * up;
        } else {
            terms[m] = 0.0f;
        }
    }
    if (SCATTERED) {
        scattered_warp_sums<M>(terms, off);
    } else {
#pragma unroll
        for (int m = 0; m < M; m++) {
            const float term = warp_sum(terms[m]);
            if ((threadIdx.x & 31) == 0) off[m] = term;
        }
    }
}
