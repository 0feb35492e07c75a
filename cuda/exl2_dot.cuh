// The EXL2 GEMVs' arithmetic on codes already in registers (exl2_matmul.cu: words loaded from global memory;
// exl2_stream.cu: from shared memory): one 32-row block's dot product with the activations, on the fp32 path (any
// width, bf16 activations) or the fp16 pair path (fp16 activations), and the activation a GEMV gathers.
// S (deduced from the activations' pointer): the rows of a block's activation slice in shared memory, its row stride.
#pragma once
#include "exl2_common.cuh"


// Code i of a b-bit field string held in registers: funnel shift joins the two words a field may straddle.
template <int B>
__device__ __forceinline__ u32 field(const u32* words, int i) {
    const int bit = i * B;
    return __funnelshift_r(words[bit >> 5], words[(bit >> 5) + 1], bit & 31) & ((1u << B) - 1u);
}

// (q - z) as float, exactly, without an int->float conversion: 2^23 + q has q in its low mantissa bits.
template <int B>
__device__ __forceinline__ float centered(u32 code, u32 two23) {
    return __int_as_float(two23 | code) - (8388608.0f + (float)(1 << (B - 1)));
}


// fp32 path, any width (bf16 activations; fp16 ones take sub_half): dot[c][m] += sum_i x[m][lr + i] (q_ci - z) over
// 32 rows whose B words per column are in registers.
template <int B, int M, int C, int S>
__device__ __forceinline__ void sub_float(const u32 (*words)[B + 1], const float (*xs)[S], int lr, const Magic& k,
                                          float (*dot)[M]) {
#pragma unroll
    for (int i = 0; i < 32; i += 4) {
        float q[C][4];
#pragma unroll
        for (int c = 0; c < C; c++) {
#pragma unroll
            for (int j = 0; j < 4; j++) q[c][j] = centered<B>(field<B>(words[c], i + j), k.two23);
        }
#pragma unroll
        for (int m = 0; m < M; m++) {
            const float4 xv = *reinterpret_cast<const float4*>(&xs[m][lr + i]);
#pragma unroll
            for (int c = 0; c < C; c++)
                dot[c][m] = fmaf(xv.x, q[c][0], fmaf(xv.y, q[c][1], fmaf(xv.z, q[c][2], fmaf(xv.w, q[c][3], dot[c][m]))));
        }
    }
}

// ----- fp16 path for 2, 3, 4, 5, 6 and 8 bits -----
// Codes are turned into exact fp16 values two at a time (the "1024 trick": 0x6400 | c is the fp16 number
// 1024 + c, so one mask-and-or gives a pair 1024 + q·2^s, and one fma gives q - z exactly), multiplied by
// the activations as half2 and summed in fp16 over a 32-row block (16 terms a half; 8 bits: 4) before joining
// the fp32 sum. The activations sit in shared memory in "pair order" (the two rows whose codes share a mask are
// adjacent) and pre-scaled by 2^-half_shift(b), so no fp16 partial sum can exceed max|x| (no overflow to inf).

// Every EXL2 width takes this path with fp16 activations (bf16 ones take sub_float). The prescale: 16 terms of
// |q - z| ≤ 2^(b-1) each: 2^(b+3); 8 bits flush every 4 terms: 2^9.
__host__ __device__ constexpr int half_shift(int bits) { return bits == 8 ? 9 : bits + 3; }

// Position of row p (0..31 of a 32-row block) in pair order, for b in 2-6 and 8.
__device__ __forceinline__ int pair_slot(int bits, int p) {
    if (bits == 4) return (p & ~7) + (p & 3) * 2 + ((p >> 2) & 1);
    if (bits == 3 || bits == 5 || bits == 6) return ((p & 15) << 1) | (p >> 4);  // pairs (r, r + 16): row_pair_pieces
    if (bits == 2) return (p & ~15) + (p & 7) * 2 + ((p >> 3) & 1);
    return (p & ~3) + (p & 1) * 2 + ((p >> 1) & 1);  // 8 bits
}

// Slot in xh of split row `row`, row p of its chunk (pair order within each whole 32-row block of the chunk).
__device__ __forceinline__ int pair_position(int bits, int row, int p) { return row - (p & 31) + pair_slot(bits, p & 31); }

// 2^-shift exactly: the prescale of the fp16 pair path's activations (half_shift).
__device__ __forceinline__ float pair_prescale(int shift) { return __int_as_float((127 - shift) << 23); }

// (w & mask) | 0x6400 in both halves = 1024 + q·2^s; times 2^-s minus (1024·2^-s + z) = q - z, exactly.
template <u32 MASK>
__device__ __forceinline__ u32 centered_pair(u32 w, u32 h1024, u32 scale_pair, u32 offset_pair) {
    return hfma2((w & MASK) | h1024, scale_pair, offset_pair);
}

__device__ __forceinline__ u32 h2(float value) {
    const u32 h = Act<fp16_t>::store(value);
    return h | (h << 16);
}

// acc[c][m] += column c's four code pairs q[c] times four activation pairs at xh[m][at..at+7] (half2 arithmetic;
// each activation load serves all C columns).
template <int M, int C, int S>
__device__ __forceinline__ void dot4_pairs(const u32 (*q)[4], const u16 (*xh)[S], int at, u32 (*acc)[M]) {
#pragma unroll
    for (int m = 0; m < M; m++) {
        const uint4 xv = *reinterpret_cast<const uint4*>(&xh[m][at]);
#pragma unroll
        for (int c = 0; c < C; c++) {
            acc[c][m] = hfma2(q[c][0], xv.x, acc[c][m]);
            acc[c][m] = hfma2(q[c][1], xv.y, acc[c][m]);
            acc[c][m] = hfma2(q[c][2], xv.z, acc[c][m]);
            acc[c][m] = hfma2(q[c][3], xv.w, acc[c][m]);
        }
    }
}

template <int M, int C>
__device__ __forceinline__ void flush(u32 (*acc)[M], float (*dot)[M]) {
#pragma unroll
    for (int c = 0; c < C; c++) {
#pragma unroll
        for (int m = 0; m < M; m++) {
            dot[c][m] += half2_sum(acc[c][m]);
            acc[c][m] = 0u;
        }
    }
}

// The pair path of 3, 5 and 6 bits pairs rows r and r + 16 (r < 16) of a block: they are 16·B bits apart, a
// multiple of 16, so piece i (of B) holds in its halves the i-th 16-bit pieces of the block's lower and upper 16·B
// bits (half-words i and B + i of its word string), and both halves of a piece have the same rows at the same bits.
template <int B>
__device__ __forceinline__ void row_pair_pieces(const u32* words, u32* piece) {
#pragma unroll
    for (int i = 0; i < B; i++) {  // bytes 0-1 or 2-3 of the word holding half-word i, 4-5 or 6-7 of B + i's
        const u32 select = ((B + i) & 1 ? 0x7600u : 0x5400u) | (i & 1 ? 0x32u : 0x10u);
        piece[i] = __byte_perm(words[i >> 1], words[(B + i) >> 1], select);
    }
}

// Rows (r, r + 16) of a 3-bit block as a code pair at bits s and s + 16, s in 0, 3, 6 (the 1024 trick needs
// s + 3 ≤ 10): one shift serves the pairs of a piece that share it; rows 5 and 10 straddle two pieces and are put
// together from both. r is a constant after unrolling: all this folds.
__device__ __forceinline__ u32 three_bit_pair(int r, const u32 (&piece)[3], int& s) {
    s = 0;
    if (r == 5) return ((piece[0] >> 15) & 0x00010001u) | ((piece[1] << 1) & 0x00060006u);
    if (r == 10) return ((piece[1] >> 14) & 0x00030003u) | ((piece[2] << 2) & 0x00040004u);
    const int i = (3 * r) >> 4, bit = 3 * r - 16 * i, first = i == 0 ? 0 : i == 1 ? 2 : 1;  // first row bit of piece i
    const int shift = first + (bit - first >= 9 ? 6 : 0);
    s = bit - shift;
    return (piece[i] >> shift) & (0x00070007u << s);
}

// Rows (r, r + 16) of a B-bit block (5 or 6) as a code pair at bits 0 and 16; a pair that straddles two pieces takes
// its high bits from the next.
template <int B>
__device__ __forceinline__ u32 row_pair(int r, const u32 (&piece)[B]) {
    constexpr u32 PAIR = ((1u << B) - 1u) * 0x00010001u;
    const int i = (B * r) >> 4, bit = (B * r) & 15;
    if (bit + B <= 16) return (piece[i] >> bit) & PAIR;
    const u32 low = ((1u << (16 - bit)) - 1u) * 0x00010001u;
    return ((piece[i] >> bit) & low) | ((piece[i + 1] << (16 - bit)) & PAIR & ~low);
}

template <int B, int M, int C, int S>
__device__ __forceinline__ void sub_half(const u32 (*words)[B + 1], const u16 (*xh)[S], int lr, const Magic& k,
                                         float (*dot)[M]) {
    constexpr float Z = (float)(1 << (B - 1));
    u32 acc[C][M], q[C][4];
#pragma unroll
    for (int c = 0; c < C; c++) {
#pragma unroll
        for (int m = 0; m < M; m++) acc[c][m] = 0u;
    }
    if (B == 4) {
        const u32 one = h2(1.0f), sixteenth = h2(1.0f / 16.0f), off0 = h2(-(1024.0f + Z)), off1 = h2(-(64.0f + Z));
#pragma unroll
        for (int j = 0; j < 4; j++) {
#pragma unroll
            for (int c = 0; c < C; c++) {
                const u32 lo = words[c][j], hi = words[c][j] >> 8;
                q[c][0] = centered_pair<0x000F000Fu>(lo, k.h1024, one, off0);
                q[c][1] = centered_pair<0x00F000F0u>(lo, k.h1024, sixteenth, off1);
                q[c][2] = centered_pair<0x000F000Fu>(hi, k.h1024, one, off0);
                q[c][3] = centered_pair<0x00F000F0u>(hi, k.h1024, sixteenth, off1);
            }
            dot4_pairs<M, C>(q, xh, lr + j * 8, acc);
        }
    } else if (B == 3 || B == 5 || B == 6) {  // pairs (r, r + 16), four at a time (row_pair_pieces)
        const u32 scale[3] = {h2(1.0f), h2(1.0f / 8.0f), h2(1.0f / 64.0f)};  // by s / 3 (3 bits; else s = 0)
        const u32 offset[3] = {h2(-(1024.0f + Z)), h2(-(128.0f + Z)), h2(-(16.0f + Z))};
        u32 piece[C][B];
#pragma unroll
        for (int c = 0; c < C; c++) row_pair_pieces<B>(words[c], piece[c]);
#pragma unroll
        for (int j = 0; j < 4; j++) {
#pragma unroll
            for (int c = 0; c < C; c++) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    int s = 0;
                    u32 pair;
                    if constexpr (B == 3) pair = three_bit_pair(4 * j + i, piece[c], s);
                    else pair = row_pair<B>(4 * j + i, piece[c]);
                    q[c][i] = hfma2(pair | k.h1024, scale[s / 3], offset[s / 3]);
                }
            }
            dot4_pairs<M, C>(q, xh, lr + j * 8, acc);
        }
    } else if (B == 2) {
        const u32 s0 = h2(1.0f), s1 = h2(0.25f), s2 = h2(1.0f / 16.0f), s3 = h2(1.0f / 64.0f);
        const u32 o0 = h2(-(1024.0f + Z)), o1 = h2(-(256.0f + Z)), o2 = h2(-(64.0f + Z)), o3 = h2(-(16.0f + Z));
#pragma unroll
        for (int j = 0; j < 2; j++) {
#pragma unroll
            for (int half = 0; half < 2; half++) {  // rows (i, i + 8) of the word, i = 4·half .. 4·half + 3
#pragma unroll
                for (int c = 0; c < C; c++) {
                    const u32 v = words[c][j] >> (8 * half);
                    q[c][0] = centered_pair<0x00030003u>(v, k.h1024, s0, o0);
                    q[c][1] = centered_pair<0x000C000Cu>(v, k.h1024, s1, o1);
                    q[c][2] = centered_pair<0x00300030u>(v, k.h1024, s2, o2);
                    q[c][3] = centered_pair<0x00C000C0u>(v, k.h1024, s3, o3);
                }
                dot4_pairs<M, C>(q, xh, lr + j * 16 + half * 8, acc);
            }
        }
    } else {  // 8 bits: rows (0, 2) and (1, 3) of each word
        const u32 one = h2(1.0f), off = h2(-(1024.0f + Z));
#pragma unroll
        for (int j = 0; j < 8; j += 2) {
#pragma unroll
            for (int c = 0; c < C; c++) {
                q[c][0] = centered_pair<0x00FF00FFu>(words[c][j], k.h1024, one, off);
                q[c][1] = centered_pair<0x00FF00FFu>(words[c][j] >> 8, k.h1024, one, off);
                q[c][2] = centered_pair<0x00FF00FFu>(words[c][j + 1], k.h1024, one, off);
                q[c][3] = centered_pair<0x00FF00FFu>(words[c][j + 1] >> 8, k.h1024, one, off);
            }
            dot4_pairs<M, C>(q, xh, lr + j * 4, acc);
            flush<M, C>(acc, dot);
        }
    }
    flush<M, C>(acc, dot);
}

// Activation i: x[i], or with `up` (down_proj's GEMV) T(silu(x[i])) * up[i], x then holding gate_proj's output, so
// the MLP needs no silu_mul launch and its input is never written.
template <typename T>
__device__ __forceinline__ float activation(const u16* __restrict__ x, const u16* __restrict__ up, size_t i) {
    return up != nullptr ? silu_mul_value<T>(x[i], up[i]) : Act<T>::load(x[i]);
}

// activation(gate, up, i) of a gate/up product's unfinished sums (no bias: the launch that takes them has none), each
// rounded as exl2_finish would write it (ended_sum).
template <typename T>
__device__ __forceinline__ float gated_sums_value(const float* __restrict__ gate, const float* __restrict__ up, size_t i) {
    return silu_mul_value<T>(ended_sum<T>(__ldcg(gate + i), nullptr, 0), ended_sum<T>(__ldcg(up + i), nullptr, 0));
}
