// EXL2 matrix multiply: a split-K GEMV for decode (1..32 activation rows; one matrix, or up to
// MAX_GROUP matrices of the same activations in one launch) and a dequantizer for prefill (dense
// fp16/bf16 tiles for cuBLAS). Both read the on-disk packing of q_weight directly
// (spec §3: each column's codes in consecutive 32-bit words, LSB first), described per "chunk":
// at most 128 stored rows of one bit width: one group, or several equal groups of 32 or 64 rows (so
// small groups do not cost one serial load each). Block sb (32 rows) of a chunk uses the scale row of
// group first + (sb >> shift). The host builds the chunk table once per layer (exl2_ops.py).
//
// Chunk: int4 {bits | rows << 8 | shift << 16, first q_weight row (word), first stored row, first group}.
#include "exl2_dot.cuh"

// Longer K splits, up to GROUP_SPLIT_ROWS stored rows, for the one-row group launch of the wide kernel
// (exl2_gemv_group<T, 1, 2>) whose SPLIT_ROWS splits would need two waves of blocks (the 8B's gate/up: 112 column
// tiles x 16 splits = 1792 blocks, 924 a wave on the H100): 8 splits of 512 make one wave, so every block's early
// words load while the previous kernel ends and its fixed phases (gather, scales, epilogue) are paid once
// (exl2_ops.wave_split_rows picks them; the 8B decodes ~3 % faster: docs/benchmarks.md, session 42). Only that
// instance keeps 512 rows' activations in shared memory (19 KiB a block instead of 9.5, fp16).
#define GROUP_SPLIT_ROWS 512
__host__ __device__ constexpr int split_capacity(bool group, int m, int c) {
    return group && m == 1 && c == 2 ? GROUP_SPLIT_ROWS : SPLIT_ROWS;
}


// C adjacent columns' words of one word row (the C columns of a thread are contiguous in q_weight: 2 columns are
// one 8-byte load).
template <int C>
__device__ __forceinline__ void load_columns(const u32* p, u32* out) {
    static_assert(C == 1 || C == 2, "1 or 2 columns a thread (4 were slower on the H200: docs/benchmarks.md)");
    if (C == 2) {
        const uint2 v = load_stream(reinterpret_cast<const uint2*>(p));
        out[0] = v.x; out[1] = v.y;
    } else {
        out[0] = load_stream(p);
    }
}

// The short last group of a matrix (fewer than 32 rows: rows * B / 32 words), loading as it goes.
template <int B, int M, int C, int S>
__device__ __forceinline__ void tail_float(const u32* __restrict__ w, int stride, const float (*xs)[S],
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
template <int B, int M, bool HALF, int C, int S>
__device__ __forceinline__ void chunk_dot(const u32* __restrict__ w, int stride, const float (*xs)[S],
                                          const u16 (*xh)[S], int lr, int rows, const float (*scale)[C],
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

// Where the thread's rows of split [c0, c1) (at most S rows: S / THREADS a thread, row threadIdx.x + j·THREADS) come
// from and go to, read from the layer's own tables (so before the PDL wait), one word a row, kept in the row's own
// slot of xs until gather_row (registers held across the wait spill): the input channel in bits 0-16 (the format has
// K ≤ 65536, MAX_IN_FEATURES in exl2.py), the row's fp16 pair-order slot in xh in the GatherEntry<S>::SLOT_BITS
// above (17-24 for 256-row splits) and its prescale exponent (half_shift; 0: a float-path row, no fp16 copy) in the 4
// bits above those; -1 past the split's end.
template <int S>
struct GatherEntry {
    static constexpr int SLOT_BITS = S > 256 ? 9 : 8, SHIFT_AT = 17 + SLOT_BITS;
    static_assert(S <= (1 << SLOT_BITS) && SHIFT_AT + 4 <= 31, "a gather entry holds a slot and a shift");
};
template <bool HALF, int S>
__device__ __forceinline__ void gather_table(const int4* __restrict__ chunks, const int* __restrict__ perm, int c0,
                                             int c1, int r0, int* entry) {
    constexpr int SHIFT_AT = GatherEntry<S>::SHIFT_AT;
    int c = c0;
    int4 ch = chunks[c0];
#pragma unroll
    for (int j = 0; j < S / THREADS; j++) {
        const int i = threadIdx.x + j * THREADS;
        while (c + 1 < c1 && i >= ch.z - r0 + ((ch.x >> 8) & 0xff)) ch = chunks[++c];
        const int bits = ch.x & 0xff, rows = (ch.x >> 8) & 0xff, p = i - (ch.z - r0);
        const bool paired = HALF && p < (rows & ~31);
        const int pair = paired ? pair_position(bits, i, p) << 17 | half_shift(bits) << SHIFT_AT : 0;
        entry[i] = p < rows ? __ldg(perm + r0 + i) | pair : -1;
    }
}


// Row `row` of the split (gather_table's entry in xs[row]): the activation at one activation row, into xs and (fp16
// path) xh. SUMS: x and up are a gate/up GEMV's unfinished fp32 sums (gated_sums_value).
template <typename T, int S, bool SUMS>
__device__ __forceinline__ void gather_row(const u16* __restrict__ x, const u16* __restrict__ up, int row, float* xs,
                                           u16* xh) {
    constexpr int SLOT_BITS = GatherEntry<S>::SLOT_BITS, SHIFT_AT = GatherEntry<S>::SHIFT_AT;
    const int entry = __float_as_int(xs[row]);
    if (entry < 0) return;
    const float v = SUMS ? gated_sums_value<T>(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(up),
                                               entry & 0x1ffff)
                         : activation<T>(x, up, entry & 0x1ffff);
    xs[row] = v;
    const int shift = entry >> SHIFT_AT;
    if (shift != 0) xh[(entry >> 17) & ((1 << SLOT_BITS) - 1)] = Act<fp16_t>::store(v * pair_prescale(shift));
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
    const u32 word = load_stream(q_scale + (size_t)g * (n_pad >> 3) + (n >> 3)) >> ((n & 7) * 4);
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
// product's input is T(silu(x)) * up (activation()); SUMS (one row): x and up are the gate/up GEMV's unfinished fp32
// sums, ended as they are gathered (gated_sums_value). S: the most stored rows of the launch's K splits
// (split_capacity).
template <typename T, int M, int C, int S, bool SUMS = false>
__device__ __forceinline__ void gemv_block(const u16* __restrict__ x, const u16* __restrict__ up, int K,
                                           const GemvMatrix& mat, int local) {
    constexpr bool HALF = HalfPath<T>::value;
    timeline_start();  // the probe's start: here, before the reads of the block's own tables and weights below
    __shared__ __align__(16) float xs[M][S];
    __shared__ __align__(16) u16 xh[HALF ? M : 1][S];
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
    __shared__ float split_scales[S / 32][C][THREADS];
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

    // At one row the gather's tables are read before the wait too (S / THREADS rows a thread): after it, one load of
    // x a row instead of the chain chunk entry -> permutation -> x.
    if (M == 1) gather_table<HALF, S>(chunks, mat.perm, c0, c1, r0, reinterpret_cast<int*>(xs[0]));

    pdl_launch_dependents<false>();  // the weights and tables are the layer's own: the early words load while the previous kernel ends; x and the outputs wait
    pdl_wait();

    if (M == 1) {
#pragma unroll
        for (int j = 0; j < S / THREADS; j++) gather_row<T, S, SUMS>(x, up, threadIdx.x + j * THREADS, xs[0], xh[0]);
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
    timeline_mark(0);  // the split's activations gathered (marks: STEP_TIMELINE only; thread 0's times)

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
            const u16(*xhv)[S] = reinterpret_cast<const u16(*)[S]>(xh);
#define CHUNK_DOT(B) chunk_dot<B, M, HALF, C>(w, n_pad, xs, xhv, lr, rows, scale, k, acc, early, EARLY && c == c0)
            WITH_WIDTH(bits, CHUNK_DOT)
#undef CHUNK_DOT
        }
    }
    timeline_mark(1);  // thread 0's products done

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
        for (int m = 0; m < M; m++) {  // C == 2: the thread's columns n (even), n + 1 as one reduction
            float* at = mat.workspace + (size_t)m * n_pad + n;
            if (C == 2) add_pair(at, acc[0][m], acc[C - 1][m]);
            else atomicAdd(at, acc[0][m]);
        }
    }
    timeline_mark(2);  // thread 0's sums' atomics issued
    // Launched without counters, the block ends at its atomics: exl2_finish, the next launch, writes y.
    if (mat.counters != nullptr) finish_split<T, M, C>(mat, tile);
}

// The end of a split-K GEMV launched without counters, as a kernel of its own: for each matrix of that launch whose K
// was split, y = T(sums + bias) and the workspace re-zeroed, for `rows` activation rows. Its GEMV's blocks thus skip
// the fence, the tile counter and the last block's read-back, three round trips to L2 at the end of every block of a
// one-wave kernel (~3 µs a launch, docs/benchmarks.md, session 20); the launch boundary gives ~2 µs of that back
// (4096x14336 at one row: 13.2 -> 12.5 µs, session 21), the rest is for a consumer that ends the sums as it reads
// them. Grid (ceil(rows · max n_pad / FINISH_THREADS), matrices); the same rounding as finish_split, so the outputs
// are the same. `extra` (null, or extra_count floats): the sums this product's input was gathered from (gate/up's, for
// down_proj: exl2_gemv's SUMS), re-zeroed here too, by the first matrix's blocks.
#define FINISH_THREADS 256
template <typename T>
__global__ void __launch_bounds__(FINISH_THREADS) exl2_finish(const GemvGroup group, int rows, float* __restrict__ extra,
                                                              int extra_count) {
    pdl_launch_dependents();
    pdl_wait();
    if (blockIdx.y == 0) zero_floats(extra, extra_count);
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
    if (n < mat.N) mat.y[(size_t)m * mat.N + n] = ended_sum<T>(v, mat.bias, n);
}

// The end of a one-row product that a residual stream adds and a folded norm reads next (o_proj's, down_proj's):
// v = residual + T(sums + bias) (or + delta, a finished output, when `delta` is set) into new_residual, and the
// block's Σ v² into partials[blockIdx.x] (NormFold), the sums re-zeroed (their padding columns too); T(sums + bias)
// itself is never written (the residual add is its only use). Grid ceil(max(K, n_pad) / FINISH_THREADS), partials
// from the first ceil(K / FINISH_THREADS) blocks: exl2_finish and add_rms_norm's work, one launch. `extra`: as
// exl2_finish's. `stored` (with `slot`, int32 [K]; else null): v also into stored[slot[i]], the row in the stored
// order of the GEMV that folds the norm (its NormFold reads that copy, from consecutive addresses).
template <typename T>
__global__ void __launch_bounds__(FINISH_THREADS) exl2_finish_norm(const GemvMatrix mat, const u16* __restrict__ delta,
                                                                    const float* __restrict__ residual,
                                                                    float* __restrict__ new_residual,
                                                                    float* __restrict__ partials, int K,
                                                                    float* __restrict__ extra, int extra_count,
                                                                    float* __restrict__ stored,
                                                                    const int* __restrict__ slot) {
    __shared__ float part[FINISH_THREADS / 32];
    pdl_launch_dependents();
    const int i = blockIdx.x * FINISH_THREADS + threadIdx.x;
    const int to = stored != nullptr && i < K ? __ldg(slot + i) : 0;  // a constant, read before the wait
    pdl_wait();
    zero_floats(extra, extra_count);
    float v = 0.0f;
    if (i < K) {
        float d;
        if (delta != nullptr) d = Act<T>::load(delta[i]);
        else {
            float* slot = mat.workspace + i;
            d = Act<T>::load(ended_sum<T>(__ldcg(slot), mat.bias, i));
            *slot = 0.0f;
        }
        v = residual[i] + d;
        new_residual[i] = v;
        if (stored != nullptr) stored[to] = v;
    } else if (delta == nullptr && i < mat.n_pad) {
        mat.workspace[i] = 0.0f;
    }
    const float sum_sq = warp_sum(v * v);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = sum_sq;
    __syncthreads();
    if (threadIdx.x == 0 && blockIdx.x * FINISH_THREADS < K) {
        float total = 0.0f;
#pragma unroll
        for (int w = 0; w < FINISH_THREADS / 32; w++) total += part[w];
        partials[blockIdx.x] = total;
    }
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
// SUMS (M = 1): down_proj's input formed from the gate/up launch's unfinished sums, x and up their addresses (fp32),
// so that launch needs no exl2_finish; whatever ends this product re-zeroes them (exl2_ops.matmul_gated).
template <typename T, int M, int C = 1, bool SUMS = false>
__global__ void __launch_bounds__(THREADS, gemv_min_blocks(M, C)) exl2_gemv(const u16* __restrict__ x,
                                                                         const u16* __restrict__ up, int K,
                                                                         const GemvMatrix mat) {
    static_assert(!SUMS || M == 1, "the sums gather is one row's");
    gemv_block<T, M, C, split_capacity(false, M, C), SUMS>(x, up, K, mat, blockIdx.x);
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
    gemv_block<T, M, C, split_capacity(true, M, C)>(x, nullptr, K, group.m[which], blockIdx.x - group.m[which].block0);
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
