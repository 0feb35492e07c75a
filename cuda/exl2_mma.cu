// EXL2 GEMV on tensor cores, for fp16 activations (up to 16 rows) and layers whose groups are whole 32-row blocks.
// The host sends it launches of 4 to 16 rows (exl2_ops.MMA_ROWS), where it beats exl2_matmul.cu by 7-33 % on the
// H200 (its mma takes 8 rows whatever the launch holds; 9-16 rows take two, on the same decoded weights); at 1-2 rows
// it is 14-26 % slower (its fixed per-warp costs: docs/benchmarks.md, session 10).
//
// Why: the one-column-a-thread kernel (exl2_matmul.cu) spends ~5 instructions a weight (a code pair costs a mask,
// a centring fma and a dot fma; plus the activation gather), and the cost of its dot grows with the rows.
// Here `mma.m16n8k16` does the dot products (A = 16 output columns x 16 stored rows of weights, B = 16 rows x
// 8 activation rows) and a code pair costs one LOP3: the "1024 trick" (0x6400 | c is the fp16 number 1024 + c)
// makes the pair (1024 + 2^s q_a, 1024 + 2^s q_b) exact, the activations come pre-scaled by 2^-s, and the
// fp32 accumulators absorb the offset, removed per group with sums the gather computes:
//     sum_k b_k (1024 + 2^s_k q_k) - sum_k b_k (1024 + 2^s_k z) = sum_k b_k 2^s_k (q_k - z).
//
// Lanes and rows. Lane (g, t) = (lane / 4, lane % 4) of a warp holds the A fragment of output columns g and g + 8
// of its 16-column tile: within every 32-row block, rows 8t .. 8t + 7 of both columns, as 4 code pairs each
// (pair p = two k positions of one of the block's two 16-row mma steps). Which rows form pair p depends on the
// width (`pair_row`); the activations sit in shared memory in the same "slot" order, 8t + 2p + half, so one
// 16-byte load gives a lane its B fragments for the block's two mma steps. The host writes, per stored row,
// where its activation goes (the gather table, exl2_ops.mma_gather_table).
//
// Words: 2-bit rows 8t.. of a block are half of word t / 2; 4-bit, word t; 8-bit, words 2t and 2t + 1; 3, 5 and
// 6 bits, the (at most two) words that hold bits 8tb .. 8tb + 8b of the block's bit string.
#include "exl2_mma.cuh"

// The gather's offset sums by scattered_warp_sums (exl2_mma.cuh), as the multi-row streamed kernel takes them: a
// prepared variant here (MMA_SCATTERED_SUMS), since it costs this kernel registers (exl2_mma<4> 80 -> 96 on sm_90,
// exl2_mma_group<7> 96 -> 116 on sm_80) and was not timed on the Ampere/Ada path it serves.
#ifdef MMA_SCATTERED_SUMS
constexpr bool MMA_SCATTERED_SUMS_ON = true;
#else
constexpr bool MMA_SCATTERED_SUMS_ON = false;
#endif

// Scales of group `group` for columns col0 + g + 8i, i < 4 (col0: a multiple of 32): their four q_scale words are
// one 16-byte load, the same for the whole warp.
__device__ __forceinline__ void warp_scales(const u32* __restrict__ q_scale, const float* __restrict__ scale_max, int group,
                                            int col0, int g, int n_pad, float* scale) {
    group_scales(load_stream(reinterpret_cast<const uint4*>(q_scale + (size_t)group * (n_pad >> 3) + (col0 >> 3))),
                 __ldg(scale_max + group), g, scale);
}

// One chunk (at most 128 rows, whole 32-row blocks) for a lane's two 16-column tiles: the words of BLOCKS
// blocks at a time are loaded together, then decoded and multiplied; every group (2^shift blocks) ends with a
// fold of the accumulators into the scaled totals. off[blk][m]: the gather's offset sums.
template <int B, int M>
__device__ __forceinline__ void mma_chunk(const u32* __restrict__ base, int n_pad, int rows, int shift, int blk0, int g0,
                                          const GemvMatrix& mat, int col0, int g, int t, const uint4 (*xh)[SPLIT_ROWS / 8],
                                          const float (*off)[8 * row_tiles(M)], u32 h1024,
                                          float (*total)[4 * row_tiles(M)]) {
    constexpr int NT = row_tiles(M);
    constexpr int BLOCKS = B <= 4 ? 4 : 2;  // at most 16 words in flight a lane
    constexpr int W = lane_words(B);
    const int blocks = rows >> 5;
    const int group_blocks = 1 << shift;
    float acc[2][4 * NT] = {}, offset[2 * NT] = {};  // offset: the group's offset sums for the lane's rows (acc_offset)
    for (int b0 = 0; b0 < blocks; b0 += BLOCKS) {
        u32 words[BLOCKS][4][W];  // [block][column: tile 0 g, tile 0 g + 8, tile 1 g, tile 1 g + 8][word]
        const u32* at = base + (size_t)(b0 * B + first_word<B>(t)) * n_pad;  // this lane's first word of the step
#pragma unroll
        for (int sb = 0; sb < BLOCKS; sb++) {
#pragma unroll
            for (int w = 0; w < W; w++) {  // the 4 columns are immediate offsets from one address a word row
                const bool inside = b0 + sb < blocks && (W == 1 || first_word<B>(t) + w < B);
                const u32* row = at + (size_t)(sb * B + w) * n_pad;
#pragma unroll
                for (int c = 0; c < 4; c++) words[sb][c][w] = inside ? load_stream(row + 8 * c) : 0u;
            }
        }
#pragma unroll
        for (int sb = 0; sb < BLOCKS; sb++) {
            const int blk = b0 + sb;
            if (blk < blocks) {
                uint4 xv[NT];
                row_fragments<M>(xh[0], SPLIT_ROWS, blk0 + blk, g, t, xv);
                block_mma<B, NT>(words[sb], xv, t, h1024, acc);
                add_offsets<M>(off[blk0 + blk], t, offset);
                if (((blk + 1) & (group_blocks - 1)) == 0 || blk + 1 == blocks) {  // the group ends: fold
                    float scale[4];  // columns g, g + 8, g + 16, g + 24 of the warp's 32
                    warp_scales(mat.q_scale, mat.scale_max, g0 + (blk >> shift), col0, g, n_pad, scale);
                    fold_group<M>(scale, acc, offset, total);
                }
            }
        }
    }
}

// y[M, N] = x[M, K] @ W as block `local` of its tiles·splits blocks (as gemv_block in exl2_matmul.cu: column tile
// local % tiles of THREADS columns, 32 a warp; K split local / tiles).
template <int M>
__device__ __forceinline__ void mma_block(const u16* __restrict__ x, int K, const GemvMatrix& mat, int local) {
    timeline_start();  // the probe's start: here, before the table reads below
    __shared__ __align__(16) uint4 xh[M][SPLIT_ROWS / 8];  // activations in slot order, 8 fp16 a lane-block
    __shared__ __align__(16) float off[SPLIT_ROWS / 32][8 * row_tiles(M)];  // [block][m]: sum of b_k (1024 + 2^s_k z)
    __shared__ __align__(16) float warp_sums[THREADS / 32][M][36];  // the epilogue's, a warp's own (36: rows 2t on distinct banks)
    const int4* __restrict__ chunks = mat.chunks;
    const int n_pad = mat.n_pad, tile = local % mat.tiles, split = local / mat.tiles;
    const int c0 = mat.split_chunks[split], c1 = mat.split_chunks[split + 1];
    const int r0 = chunks[c0].z, rows = chunks[c1 - 1].z + ((chunks[c1 - 1].x >> 8) & 0xff) - r0;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    // Gather: warp w takes 32-row blocks w, w + 4, ...; lane i puts row i of the block in its slot for every
    // activation row, and the warp sums the block's offset terms. Table entry: channel | slot << 20 | s << 25 |
    // (bits - 1) << 28.
    // The entries are the layer's own: read before the programmatic wait, so after it each row costs one load of x.
    const int* __restrict__ table = mat.perm;
    constexpr int WARP_BLOCKS = SPLIT_ROWS / THREADS;  // most 32-row blocks a warp gathers
    int entries[WARP_BLOCKS];
#pragma unroll
    for (int j = 0; j < WARP_BLOCKS; j++) {
        const int blk = warp + j * (THREADS / 32);
        entries[j] = blk < (rows >> 5) ? __ldg(table + r0 + 32 * blk + lane) : 0;
    }
    pdl_launch_dependents<false>();
    pdl_wait();  // x and the workspace belong to earlier kernels
    u16* xs = reinterpret_cast<u16*>(xh);
#pragma unroll
    for (int j = 0; j < WARP_BLOCKS; j++) {
        const int blk = warp + j * (THREADS / 32);
        if (blk >= (rows >> 5)) break;
        gather_mma_block<M, MMA_SCATTERED_SUMS_ON>(x, K, entries[j], xs, SPLIT_ROWS, 32 * blk, off[blk]);
    }
    __syncthreads();

    const int col0 = tile * THREADS + 32 * warp;  // this warp's 32 columns (n_pad is a multiple of 32)
    if (col0 < n_pad) {
        const int g = lane >> 2, t = lane & 3;
        const Magic k(mat.N);
        float total[2][4 * row_tiles(M)] = {};
        const u32* lane_base;  // opaque to the compiler (see chunk_dot in exl2_matmul.cu)
        asm("mov.b64 %0, %1;" : "=l"(lane_base) : "l"(mat.q_weight + col0 + g));
        for (int c = c0; c < c1; c++) {
            const int4 ch = chunks[c];
            const int bits = ch.x & 0xff, rows_c = (ch.x >> 8) & 0xff, shift = ch.x >> 16, blk0 = (ch.z - r0) >> 5;
            const u32* base = lane_base + (size_t)ch.y * n_pad;
#define MMA_CHUNK(B) mma_chunk<B, M>(base, n_pad, rows_c, shift, blk0, ch.w, mat, col0, g, t, xh, off, k.h1024, total)
            WITH_WIDTH(bits, MMA_CHUNK)
#undef MMA_CHUNK
        }
        // total[tile][i]: column col0 + 16 tile + acc_column(i, g), activation row acc_row(i, t)
        if (mat.splits == 1) {
#pragma unroll
            for (int tl = 0; tl < 2; tl++) {
#pragma unroll
                for (int i = 0; i < 4 * row_tiles(M); i++) {
                    const int m = acc_row(i, t), col = col0 + 16 * tl + acc_column(i, g);
                    if (m < M && col < mat.N) {
                        const float bias = mat.bias != nullptr ? mat.bias[col] : 0.0f;
                        mat.y[(size_t)m * mat.N + col] = Act<fp16_t>::store(total[tl][i] + bias);
                    }
                }
            }
        } else {
            add_warp_sums<M>(mat.workspace, n_pad, col0, warp_sums[warp], total, g, t);
        }
    }
    // Launched without counters, the block ends at its atomics: exl2_finish, the next launch, writes y.
    if (mat.splits > 1 && mat.counters != nullptr) finish_split<fp16_t, M>(mat, tile);
}

template <int M>
__global__ void __launch_bounds__(THREADS) exl2_mma(const u16* __restrict__ x, int K, const GemvMatrix mat) {
    mma_block<M>(x, K, mat, blockIdx.x);
}

template <int M>
__global__ void __launch_bounds__(THREADS) exl2_mma_group(const u16* __restrict__ x, int K, const GemvGroup group) {
    int which = 0;
#pragma unroll
    for (int i = 1; i < MAX_GROUP; i++)
        if (i < group.count && (int)blockIdx.x >= group.m[i].block0) which = i;
    mma_block<M>(x, K, group.m[which], blockIdx.x - group.m[which].block0);
}
