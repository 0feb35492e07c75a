// EXL2 matrix multiply: a split-K GEMV for decode (1..32 activation rows; one matrix, or up to
// MAX_GROUP matrices of the same activations in one launch) and a dequantizer for prefill (dense
// fp16/bf16 tiles for cuBLAS). Both read the on-disk packing of q_weight directly
// (spec §3: each column's codes in consecutive 32-bit words, LSB first), described per "chunk":
// at most 128 stored rows of one bit width: one group, or several equal groups of 32 or 64 rows (so
// small groups do not cost one serial load each). Block sb (32 rows) of a chunk uses the scale row of
// group first + (sb >> shift). The host builds the chunk table once per layer (exl2_ops.py).
//
// Chunk: int4 {bits | rows << 8 | shift << 16, first q_weight row (word), first stored row, first group}.
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


// C adjacent columns' words of one word row (the C columns of a thread are contiguous in q_weight: 2 columns are
// one 8-byte load).
template <int C>
__device__ __forceinline__ void load_columns(const u32* p, u32* out) {
    static_assert(C == 1 || C == 2, "1 or 2 columns a thread (4 were slower on the H200: docs/benchmarks.md)");
    if (C == 2) {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
        out[0] = v.x; out[1] = v.y;
    } else {
        out[0] = __ldg(p);
    }
}

// fp32 path, any width (bf16 activations; fp16 ones take sub_half): dot[c][m] += sum_i x[m][lr + i] (q_ci - z) over
// 32 rows whose B words per column are in registers.
template <int B, int M, int C>
__device__ __forceinline__ void sub_float(const u32 (*words)[B + 1], const float (*xs)[SPLIT_ROWS], int lr, const Magic& k,
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

// The short last group of a matrix (fewer than 32 rows: rows * B / 32 words), loading as it goes.
template <int B, int M, int C>
__device__ __forceinline__ void tail_float(const u32* __restrict__ w, int stride, const float (*xs)[SPLIT_ROWS],
                                           int lr, int rows, const Magic& k, float (*dot)[M]) {
    const int nw = rows * B / 32;
    for (int i = 0; i < rows; i++) {
        const int bit = i * B, wi = bit >> 5;
        u32 lo[C], hi[C];
        load_columns<C>(w + (size_t)wi * stride, lo);
        if (wi + 1 < nw) load_columns<C>(w + (size_t)(wi + 1) * stride, hi);
        else {
#pragma unroll
            for (int c = 0; c < C; c++) hi[c] = 0u;
        }
#pragma unroll
        for (int c = 0; c < C; c++) {
            const float q = centered<B>(__funnelshift_r(lo[c], hi[c], bit & 31) & ((1u << B) - 1u), k.two23);
#pragma unroll
            for (int m = 0; m < M; m++) dot[c][m] = fmaf(xs[m][lr + i], q, dot[c][m]);
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
template <int M, int C>
__device__ __forceinline__ void dot4_pairs(const u32 (*q)[4], const u16 (*xh)[SPLIT_ROWS], int at, u32 (*acc)[M]) {
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

template <int B, int M, int C>
__device__ __forceinline__ void sub_half(const u32 (*words)[B + 1], const u16 (*xh)[SPLIT_ROWS], int lr, const Magic& k,
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

// Blocks of 32 rows whose words a thread holds at once: 4 (a whole chunk) for one column a thread; for C columns,
// the most of 4, 2 or 1 that keeps at most 8 words a column in flight (2 columns: 64 registers at one row, as one
// column), or 12 when `deep` (one activation row on the fp16 pair path): then 3, 5 and 6 bits hold 10-12 words instead
// of 5-6, with which they read slower than 4 bits (72 registers, no spill; at two rows or in bf16 the deeper loads
// cost registers, spills or 15-20 % more time: docs/benchmarks.md, session 20).
__host__ __device__ constexpr int blocks_in_flight(int bits, int columns, bool deep) {
    return columns == 1 || 4 * bits <= (deep ? 12 : 8) ? 4 : 2 * bits <= (deep ? 12 : 8) ? 2 : 1;
}

// Word rows of a block's first chunk that gemv_block loads before its activation gather, so that their DRAM round
// trip overlaps the gather's chain of dependent loads: chunk_dot's first round of the wide kernel at 2, 4 and 8 bits
// (blocks_in_flight · B = 8), most of it at 3, 5 and 6 (10-12 words).
constexpr int EARLY_ROWS = 8;

// One chunk (≤ 128 rows) for the thread's C columns: the words of blocks_in_flight blocks of 32 rows are loaded
// first, then multiplied; a last partial block of rows goes through tail_float. acc[c][m] += Σ over blocks of
// scale[block][c] · (block's dot): each 32-row block has its group's column scale. With use_early, `early` holds the
// chunk's first EARLY_ROWS word rows, already loaded.
template <int B, int M, bool HALF, int C>
__device__ __forceinline__ void chunk_dot(const u32* __restrict__ w, int stride, const float (*xs)[SPLIT_ROWS],
                                          const u16 (*xh)[SPLIT_ROWS], int lr, int rows, const float (*scale)[C],
                                          const Magic& k, float (*acc)[M], const u32 (&early)[C][EARLY_ROWS],
                                          bool use_early) {
    constexpr int BL = blocks_in_flight(B, C, HALF && M == 1);
    const int blocks = rows >> 5;
    // The thread's pointer, opaque to the compiler (else it folds it back into q_weight + a 64-bit index and
    // spends 3-4 instructions an address), and 32-bit word offsets from it (a layer has < 2^32 words).
    const u32* base;
    asm("mov.b64 %0, %1;" : "=l"(base) : "l"(w));
    unsigned at = 0;
#pragma unroll
    for (int b0 = 0; b0 < 4; b0 += BL) {
        if (b0 > 0 && b0 >= blocks) break;
        u32 words[BL][C][B + 1];
#pragma unroll
        for (int sb = 0; sb < BL; sb++) {
#pragma unroll
            for (int j = 0; j < B; j++) {
                u32 v[C];
                if (b0 == 0 && sb * B + j < EARLY_ROWS && use_early) {
#pragma unroll
                    for (int c = 0; c < C; c++) v[c] = early[c][sb * B + j];  // zero beyond the chunk's blocks
                } else if (b0 + sb < blocks) load_columns<C>(base + at, v);
                else {
#pragma unroll
                    for (int c = 0; c < C; c++) v[c] = 0u;
                }
#pragma unroll
                for (int c = 0; c < C; c++) words[sb][c][j] = v[c];
                at += (unsigned)stride;
            }
#pragma unroll
            for (int c = 0; c < C; c++) words[sb][c][B] = 0u;
        }
#pragma unroll
        for (int sb = 0; sb < BL; sb++) {
            if (b0 + sb < blocks) {
                float part[C][M];
#pragma unroll
                for (int c = 0; c < C; c++) {
#pragma unroll
                    for (int m = 0; m < M; m++) part[c][m] = 0.0f;
                }
                const float unit = HALF ? (float)(1 << half_shift(B)) : 1.0f;
                if (HALF) sub_half<B, M, C>(words[sb], xh, lr + 32 * (b0 + sb), k, part);
                else sub_float<B, M, C>(words[sb], xs, lr + 32 * (b0 + sb), k, part);
#pragma unroll
                for (int c = 0; c < C; c++) {
#pragma unroll
                    for (int m = 0; m < M; m++) acc[c][m] = fmaf(part[c][m], scale[b0 + sb][c] * unit, acc[c][m]);
                }
            }
        }
    }
    if (rows & 31) {  // only in a chunk of one group: its scale is scale[0]
        float part[C][M];
#pragma unroll
        for (int c = 0; c < C; c++) {
#pragma unroll
            for (int m = 0; m < M; m++) part[c][m] = 0.0f;
        }
        tail_float<B, M, C>(w + (size_t)blocks * B * stride, stride, xs, lr + 32 * blocks, rows & 31, k, part);
#pragma unroll
        for (int c = 0; c < C; c++) {
#pragma unroll
            for (int m = 0; m < M; m++) acc[c][m] = fmaf(part[c][m], scale[0][c], acc[c][m]);
        }
    }
}

// Stored rows of a K split that one thread gathers at one activation row (row threadIdx.x + j·THREADS of the split).
constexpr int GATHER_ROWS = SPLIT_ROWS / THREADS;

// Where the thread's rows of split [c0, c1) come from and go to, read from the layer's own tables (so before the PDL
// wait), one word a row, kept in the row's own slot of xs until gather_row (registers held across the wait spill):
// the input channel in bits 0-16 (the format has K ≤ 65536, MAX_IN_FEATURES in exl2.py), the row's fp16 pair-order
// slot in xh in bits 17-24 and its prescale exponent (half_shift; 0: a float-path row, no fp16 copy) in bits 25-28;
// -1 past the split's end.
template <bool HALF>
__device__ __forceinline__ void gather_table(const int4* __restrict__ chunks, const int* __restrict__ perm, int c0,
                                             int c1, int r0, int* entry) {
    int c = c0;
    int4 ch = chunks[c0];
#pragma unroll
    for (int j = 0; j < GATHER_ROWS; j++) {
        const int i = threadIdx.x + j * THREADS;
        while (c + 1 < c1 && i >= ch.z - r0 + ((ch.x >> 8) & 0xff)) ch = chunks[++c];
        const int bits = ch.x & 0xff, rows = (ch.x >> 8) & 0xff, p = i - (ch.z - r0);
        const bool paired = HALF && p < (rows & ~31);
        const int pair = paired ? pair_position(bits, i, p) << 17 | half_shift(bits) << 25 : 0;
        entry[i] = p < rows ? __ldg(perm + r0 + i) | pair : -1;
    }
}

// Activation i: x[i], or with `up` (down_proj's GEMV) T(silu(x[i])) * up[i], x then holding gate_proj's output, so
// the MLP needs no silu_mul launch and its input is never written.
template <typename T>
__device__ __forceinline__ float activation(const u16* __restrict__ x, const u16* __restrict__ up, size_t i) {
    return up != nullptr ? silu_mul_value<T>(x[i], up[i]) : Act<T>::load(x[i]);
}

// Row `row` of the split (gather_table's entry in xs[row]): the activation at one activation row, into xs and (fp16
// path) xh.
template <typename T>
__device__ __forceinline__ void gather_row(const u16* __restrict__ x, const u16* __restrict__ up, int row, float* xs,
                                           u16* xh) {
    const int entry = __float_as_int(xs[row]);
    if (entry < 0) return;
    const float v = activation<T>(x, up, entry & 0x1ffff);
    xs[row] = v;
    const int shift = entry >> 25;
    if (shift != 0) xh[(entry >> 17) & 0xff] = Act<fp16_t>::store(v * pair_prescale(shift));
}

template <typename T> struct HalfPath { static constexpr bool value = false; };
template <> struct HalfPath<fp16_t> { static constexpr bool value = true; };

// Scales of group g for columns n .. n + C - 1 (n a multiple of C: the C codes are nibbles of one q_scale word).
template <int C>
__device__ __forceinline__ void column_scales(const u32* __restrict__ q_scale, const float* __restrict__ scale_max, int g,
                                              int n, int n_pad, float* scale) {
    if (C == 1) {
        scale[0] = column_scale(q_scale, scale_max, g, n, n_pad);
        return;
    }
    const u32 word = __ldg(q_scale + (size_t)g * (n_pad >> 3) + (n >> 3)) >> ((n & 7) * 4);
    const float multiplier = __ldg(scale_max + g);
#pragma unroll
    for (int c = 0; c < C; c++) {
        const float code = (float)(((word >> (4 * c)) & 15u) + 1u);
        scale[c] = code * code * multiplier;
    }
}


// y[M, N] = x[M, K] @ W for one matrix, as block `local` of its Σ tiles·splits blocks: column tile
// local % tiles (THREADS·C columns, C adjacent ones a thread), K split local / tiles. Each block sums its K split
// into the fp32 workspace. Launched with counters, the last block of a column tile to finish writes y (+bias) and
// re-zeroes the workspace and its counter, so one launch does the whole product and leaves the workspace clean;
// without, the blocks end at their atomics and exl2_finish (the next launch) does that. With `up` (not null) the
// product's input is T(silu(x)) * up (activation()).
template <typename T, int M, int C>
__device__ __forceinline__ void gemv_block(const u16* __restrict__ x, const u16* __restrict__ up, int K,
                                           const GemvMatrix& mat, int local) {
    constexpr bool HALF = HalfPath<T>::value;
    __shared__ __align__(16) float xs[M][SPLIT_ROWS];
    __shared__ __align__(16) u16 xh[HALF ? M : 1][SPLIT_ROWS];
    const u32* __restrict__ q_weight = mat.q_weight;
    const int4* __restrict__ chunks = mat.chunks;
    const int n_pad = mat.n_pad, tile = local % mat.tiles, split = local / mat.tiles;
    const int n = tile * THREADS * C + threadIdx.x * C;  // the thread's first column
    const bool valid = n < n_pad;  // n_pad is a multiple of 32: all C columns or none
    const int c0 = mat.split_chunks[split], c1 = mat.split_chunks[split + 1];
    const int r0 = chunks[c0].z;

    // The wide kernel at one row asks for its first chunk's first words and scale before the gather (EARLY_ROWS).
    constexpr bool EARLY = C > 1 && M == 1;
    u32 early[C][EARLY_ROWS];
    if (EARLY && valid) {
        const int4 first = chunks[c0];
        const int words = min(EARLY_ROWS, (((first.x >> 8) & 0xff) >> 5) * (first.x & 0xff));
        const u32* w0 = q_weight + (size_t)first.y * n_pad + n;
#pragma unroll
        for (int r = 0; r < EARLY_ROWS; r++) {
            u32 v[C];
            if (r < words) load_columns<C>(w0 + (size_t)r * n_pad, v);
            else {
#pragma unroll
                for (int c = 0; c < C; c++) v[c] = 0u;
            }
#pragma unroll
            for (int c = 0; c < C; c++) early[c][r] = v[c];
        }
    }

    // Every column scale of the split (per 32-row block of it), read before the wait into shared memory (the thread's
    // own slots; registers held across the wait spill): after it, the chunk loop takes them from there, so no scale
    // load waits on its chunk entry inside the split's critical path.
    __shared__ float split_scales[SPLIT_ROWS / 32][C][THREADS];
    if (valid) {
        for (int c = c0; c < c1; c++) {
            const int4 ch = chunks[c];
            const int rows = (ch.x >> 8) & 0xff, shift = ch.x >> 16, block0 = (ch.z - r0) >> 5;
            float scale[4][C];  // one load per group (2^shift blocks) and all of them before the first store
#pragma unroll
            for (int sb = 0; sb < 4; sb++) {
                if (32 * sb < rows && (sb & ((1 << shift) - 1)) == 0)
                    column_scales<C>(mat.q_scale, mat.scale_max, ch.w + (sb >> shift), n, n_pad, scale[sb]);
                else {
#pragma unroll
                    for (int i = 0; i < C; i++) scale[sb][i] = scale[sb > 0 ? sb - 1 : 0][i];
                }
            }
#pragma unroll
            for (int sb = 0; sb < 4; sb++) {
                if (32 * sb < rows) {
#pragma unroll
                    for (int i = 0; i < C; i++) split_scales[block0 + sb][i][threadIdx.x] = scale[sb][i];
                }
            }
        }
    }

    // At one row the gather's tables are read before the wait too (GATHER_ROWS rows a thread): after it, one load of
    // x a row instead of the chain chunk entry -> permutation -> x.
    if (M == 1) gather_table<HALF>(chunks, mat.perm, c0, c1, r0, reinterpret_cast<int*>(xs[0]));

    pdl_launch_dependents();  // the weights and tables are the layer's own: the early words load while the previous kernel ends; x and the outputs wait
    pdl_wait();

    if (M == 1) {
#pragma unroll
        for (int j = 0; j < GATHER_ROWS; j++) gather_row<T>(x, up, threadIdx.x + j * THREADS, xs[0], xh[0]);
    } else {
        for (int c = c0; c < c1; c++) {  // activations of this split, permuted to stored order
            const int4 ch = chunks[c];
            const int bits = ch.x & 0xff, rows = (ch.x >> 8) & 0xff, lr = ch.z - r0, full = rows & ~31;
            const float prescale = HALF ? pair_prescale(half_shift(bits)) : 1.0f;
            for (int i = threadIdx.x; i < rows * M; i += THREADS) {
                const int m = i / rows, p = i - m * rows;
                const float v = activation<T>(x, up, (size_t)m * K + mat.perm[ch.z + p]);
                xs[m][lr + p] = v;
                if (HALF && p < full) xh[HALF ? m : 0][pair_position(bits, lr + p, p)] = Act<fp16_t>::store(v * prescale);
            }
        }
    }
    __syncthreads();

    float acc[C][M];
#pragma unroll
    for (int c = 0; c < C; c++) {
#pragma unroll
        for (int m = 0; m < M; m++) acc[c][m] = 0.0f;
    }
    const Magic k(mat.N);
    if (valid) {
        for (int c = c0; c < c1; c++) {
            const int4 ch = chunks[c];
            const int bits = ch.x & 0xff, rows = (ch.x >> 8) & 0xff, lr = ch.z - r0;
            const u32* w = q_weight + (size_t)ch.y * n_pad + n;
            float scale[4][C];  // per 32-row block and column: its group's scale (split_scales; 0 past the chunk)
#pragma unroll
            for (int sb = 0; sb < 4; sb++) {
#pragma unroll
                for (int i = 0; i < C; i++) scale[sb][i] = 32 * sb < rows ? split_scales[(lr >> 5) + sb][i][threadIdx.x] : 0.0f;
            }
            const u16(*xhv)[SPLIT_ROWS] = reinterpret_cast<const u16(*)[SPLIT_ROWS]>(xh);
#define CHUNK_DOT(B) chunk_dot<B, M, HALF, C>(w, n_pad, xs, xhv, lr, rows, scale, k, acc, early, EARLY && c == c0)
            WITH_WIDTH(bits, CHUNK_DOT)
#undef CHUNK_DOT
        }
    }

    const int N = mat.N;
    u16* __restrict__ y = mat.y;
    if (mat.splits == 1) {
#pragma unroll
        for (int c = 0; c < C; c++) {
            const float b = (mat.bias != nullptr && valid) ? mat.bias[n + c] : 0.0f;
            if (n + c < N) {
#pragma unroll
                for (int m = 0; m < M; m++) y[(size_t)m * N + n + c] = Act<T>::store(acc[c][m] + b);
            }
        }
        return;
    }
    if (valid) {
#pragma unroll
        for (int c = 0; c < C; c++) {
#pragma unroll
            for (int m = 0; m < M; m++) atomicAdd(mat.workspace + (size_t)m * n_pad + n + c, acc[c][m]);
        }
    }
    // Launched without counters, the block ends at its atomics: exl2_finish, the next launch, writes y.
    if (mat.counters != nullptr) finish_split<T, M, C>(mat, tile);
}

// The end of a split-K GEMV launched without counters, as a kernel of its own: for each matrix of that launch whose K
// was split, y = T(sums + bias) and the workspace re-zeroed, for `rows` activation rows. Its GEMV's blocks thus skip
// the fence, the tile counter and the last block's read-back, three round trips to L2 at the end of every block of a
// one-wave kernel (~3 µs a launch, docs/benchmarks.md, session 20); the launch boundary gives ~2 µs of that back
// (4096x14336 at one row: 13.2 -> 12.5 µs, session 21), the rest is for a consumer that ends the sums as it reads
// them. Grid (ceil(rows · max n_pad / FINISH_THREADS), matrices); the same rounding as finish_split, so the outputs
// are the same.
#define FINISH_THREADS 256
template <typename T>
__global__ void __launch_bounds__(FINISH_THREADS) exl2_finish(const GemvGroup group, int rows) {
    pdl_launch_dependents();
    pdl_wait();
    // The matrix of blockIdx.y, picked by an unrolled compare as exl2_gemv_group picks its own: a run-time index
    // into the parameter's array would copy the group to local memory.
    int which = 0;
#pragma unroll
    for (int i = 1; i < MAX_GROUP; i++)
        if (i == (int)blockIdx.y) which = i;
    const GemvMatrix& mat = group.m[which];
    const int i = blockIdx.x * FINISH_THREADS + threadIdx.x;
    if (mat.splits == 1 || i >= rows * mat.n_pad) return;  // one split: its GEMV blocks wrote y themselves
    const int m = i / mat.n_pad, n = i - m * mat.n_pad;
    float* slot = mat.workspace + i;
    const float v = __ldcg(slot);
    *slot = 0.0f;
    if (n < mat.N) mat.y[(size_t)m * mat.N + n] = Act<T>::store(v + (mat.bias != nullptr ? mat.bias[n] : 0.0f));
}

// Blocks an SM the GEMV kernels' launch bounds ask for, by activation rows m and columns a thread c: at m = 2 (one
// column) 7 (72 registers; left alone, ptxas took 95); at m = 1, 8 for one column (64 registers, no spill; with the
// early gather table ptxas took 72), 7 for two; other m as ptxas likes (0).
__host__ __device__ constexpr int gemv_min_blocks(int m, int c) {
    return m == 2 && c == 1 ? 7 : m == 1 ? (c == 1 ? 8 : 7) : 0;
}

// One matrix (o_proj, down_proj, lm_head, ...): its fields are kernel parameters at fixed offsets, which
// the compiler reads as operands (fewer registers than the group kernel's indexed fields).
// C: adjacent columns a thread (1; or 2, "wide": one 8-byte load a word row, THREADS·2 columns a block, so the
// activation gather, the chunk walk and the split-K epilogue of a block serve twice the weights).
template <typename T, int M, int C = 1>
__global__ void __launch_bounds__(THREADS, gemv_min_blocks(M, C)) exl2_gemv(const u16* __restrict__ x,
                                                                         const u16* __restrict__ up, int K,
                                                                         const GemvMatrix mat) {
    gemv_block<T, M, C>(x, up, K, mat, blockIdx.x);
}

// Up to MAX_GROUP matrices of the same activations in one launch (q/k/v, gate/up): a 1-D grid of each
// matrix's blocks in turn.
template <typename T, int M, int C = 1>
__global__ void __launch_bounds__(THREADS, gemv_min_blocks(M, C)) exl2_gemv_group(const u16* __restrict__ x, int K,
                                                                               const GemvGroup group) {
    int which = 0;
#pragma unroll
    for (int i = 1; i < MAX_GROUP; i++)
        if (i < group.count && (int)blockIdx.x >= group.m[i].block0) which = i;
    gemv_block<T, M, C>(x, nullptr, K, group.m[which], blockIdx.x - group.m[which].block0);
}


// Rows [0, rows) of one chunk for column n: each 32-row block's words are loaded once into registers and its codes
// taken from them (no per-row reload); a last partial block has rows·B/32 words.
template <typename T, int B>
__device__ __forceinline__ void dequant_chunk(const u32* __restrict__ w, int n_pad, int rows, int shift, int g0, int row0,
                                              int n, const int* __restrict__ out_rows, const u32* __restrict__ q_scale,
                                              const float* __restrict__ scale_max, u16* __restrict__ out) {
    constexpr float Z = (float)(1 << (B - 1));
    for (int b = 0; b < rows; b += 32) {
        const int in_block = min(32, rows - b), nw = in_block * B / 32;
        u32 words[B + 1];
#pragma unroll
        for (int j = 0; j < B; j++) words[j] = j < nw ? __ldg(w + (size_t)((b >> 5) * B + j) * n_pad) : 0u;
        words[B] = 0u;
        const float s = round_f16(column_scale(q_scale, scale_max, g0 + ((b >> 5) >> shift), n, n_pad));
#pragma unroll
        for (int i = 0; i < 32; i++) {
            if (i < in_block) {
                const int row = row0 + b + i, dst = out_rows != nullptr ? __ldg(out_rows + row) : row;
                out[(size_t)dst * n_pad + n] = Act<T>::store(((float)field<B>(words, i) - Z) * s);
            }
        }
    }
}

// Dense Wt [K, N_pad]: grid (ceil(N_pad / THREADS), chunks); stored row r goes to row out_rows[r] (the act-order
// permutation: input-channel order, so x needs no gather before cuBLAS), or to row r when out_rows is null. In fp16
// the values are bit-exact with the format's reference dequantization (spec §6): S = f16(c^2 * M),
// w = f16((q - z) * S), where scale_max holds M = f16(q_scale_max * prescale / 256) exactly.
template <typename T>
__global__ void __launch_bounds__(THREADS) exl2_dequant(
    const u32* __restrict__ q_weight, const u32* __restrict__ q_scale, const float* __restrict__ scale_max,
    const int4* __restrict__ chunks, const int* __restrict__ out_rows, u16* __restrict__ out, int n_pad) {
    const int n = blockIdx.x * THREADS + threadIdx.x;
    if (n >= n_pad) return;
    const int4 ch = chunks[blockIdx.y];
    const int bits = ch.x & 0xff, rows = (ch.x >> 8) & 0xff, shift = ch.x >> 16;
    const u32* w = q_weight + (size_t)ch.y * n_pad + n;
#define DEQUANT(B) dequant_chunk<T, B>(w, n_pad, rows, shift, ch.w, ch.z, n, out_rows, q_scale, scale_max, out)
    WITH_WIDTH(bits, DEQUANT)
#undef DEQUANT
}
