// EXL2 GEMV at one activation row, streamed (sm_90+): the packed weights reach shared memory by bulk copies
// (cp.async.bulk, the Hopper copy engine) that one producer warp issues ahead of the arithmetic, so the memory reads
// never wait for the multiply-adds, nor for the activation gather, nor for the previous kernel (the copies start
// before the programmatic-launch wait: the weights are the layer's own).
//
// Why (docs/benchmarks.md, sessions 15-21): the register kernel of exl2_matmul.cu is one wave of blocks that all pass
// through the same serial phases (tables, gather, loads, math, atomics) at once, so the memory idles between them; it
// reads 4096x14336 at 55 % of copy where a pure read reaches 80 %. Measured (session 24): this kernel's copies alone
// reach 61-63 % there, but its consumers' arithmetic bounds it (13-14.5 µs with no copies at all, against the register
// kernel's 12.3 µs whole), so the host gives it launches of at most 19 MiB, where it is faster (4096x4096: 6.5 / 8.5
// µs; session 31: 4096x6144 8.9 / 9.5 µs).
//
// Work: a matrix is cut into units of one stream chunk (host table: at most STREAM_WORD_ROWS word rows of one width)
// by one strip of STREAM_COLUMNS columns; units are numbered strip by strip (chunks inside), matrix after matrix in a
// group launch, and the persistent grid's block b takes the contiguous run [units·b/grid, units·(b+1)/grid), so every
// block streams the same number of bytes (within one unit). A block's consumers sum each strip's units in registers and
// add them to the fp32 workspace at the strip's end (atomics); exl2_finish (exl2_matmul.cu) then writes y (+bias).
//
// Launches of 4 to 16 fp16 rows take exl2_stream_rows (the end of this file): the same producer and units, with
// tensor-core consumers.
//
// Shared memory: `stages` buffers of one unit each (its word rows, its groups' scale words, its header), the activations of
// the rows the block needs in the fp16 pair path's order (xh, one per stored row), and the stages' barriers.
#include "exl2_dot.cuh"
#include "exl2_mma.cuh"

#define STREAM_COLUMNS 256                        // columns of a strip: a word row of a unit is one 1 KB copy
#define STREAM_WORD_ROWS 16                       // most word rows of a unit (exl2_stream_ops.STREAM_WORD_ROWS)
#define STREAM_SCALE_ROWS 4                       // most groups of a unit: 128 rows in groups of 32
#define STREAM_MAX_STAGES 8

// A stage: the unit's word rows ROW words apart, its groups' scale words, its header (Header). The one-row kernel's
// rows are STREAM_COLUMNS apart; the multi-row kernel's 8 words more, so that the four lanes of one column (four word
// rows: exl2_mma.cuh) read four different banks.
template <int ROW>
struct Stage {
    static constexpr int ROW_WORDS = ROW;
    static constexpr int SCALES = STREAM_WORD_ROWS * ROW;
    static constexpr int HEADER = SCALES + STREAM_SCALE_ROWS * STREAM_COLUMNS / 8;
    static constexpr int WORDS = HEADER + 16;
};
using RowStage = Stage<STREAM_COLUMNS>;
using RowsStage = Stage<STREAM_COLUMNS + 8>;
#define STREAM_SCALES RowStage::SCALES
#define STREAM_HEADER RowStage::HEADER
#define STREAM_STAGE_WORDS RowStage::WORDS
static_assert(4 * RowStage::WORDS == 16960, "exl2_stream_ops.STAGE_BYTES");
static_assert(4 * RowsStage::WORDS == 17472, "exl2_stream_ops.ROWS_STAGE_BYTES");

// One matrix of a streamed launch. Mirrored by exl2_stream_ops.StreamMatrix.
struct StreamMatrix {
    const u32* q_weight;
    const u32* q_scale;
    const int4* chunks;     // stream chunks, two int4 each: {bits | rows << 8 | shift << 16, first word row, first stored
                            // row, first group}, the float bits of its ≤ 4 groups' multipliers M_g
    const u32* gather;      // per stored row: input channel | pair slot (within its 32-row block) << 17 | prescale shift << 22
    float* workspace;       // [n_pad] fp32 sums, zero between launches
    int n_pad, chunk_count, unit0;  // unit0: this matrix's first unit in the launch
};
struct StreamGroup {
    StreamMatrix m[MAX_GROUP];
    int count, units;
};
// The residual add + RMSNorm a launch folds into its activation gather (decode's q/k/v and gate/up, where they take
// this kernel; in the register kernel, whose thousands of blocks would each wait on the partials, a fold cost the 8B
// 4-6 %: docs/benchmarks.md, sessions 29-30): its input is then weight * T(v · inv) with v = residual + delta, which
// exl2_finish_norm (the kernel before it) wrote to `residual`, and inv = rsqrt(Σ v² / K + eps) from that kernel's
// per-block partial sums of squares (a few dozen floats a block reads, not the row), rounded as add_rms_norm
// (fused.cu) rounds it: the step needs no norm kernel.
// residual null: no fold, the input is x. Mirrored by exl2_stream_ops.NormFold.
struct NormFold {
    const float* residual;  // [K] fp32: residual + delta
    const u16* weight;      // [K] T: the norm's weight
    const float* partials;  // [count] fp32: Σ v² of consecutive FINISH_THREADS-value pieces of the row
    int count;
    float eps;
};

// The fold's inv, by one warp (lanes sum the partials in a fixed order: the same bits in every block), into *out.
__device__ __forceinline__ void fold_inv_rms(const NormFold& fold, int K, float* out) {
    float sum = 0.0f;
    for (int j = threadIdx.x & 31; j < fold.count; j += 32) sum += __ldcg(fold.partials + j);
    sum = warp_sum(sum);
    if ((threadIdx.x & 31) == 0) *out = rsqrtf(sum / (float)K + fold.eps);
}

// Input channel i of a folded norm: T(weight · T(v · inv)), add_rms_norm's rounding.
template <typename T>
__device__ __forceinline__ float folded_activation(const NormFold& fold, int i, float inv) {
    const float normed = Act<T>::load(Act<T>::store(__ldcg(fold.residual + i) * inv));
    return Act<T>::load(Act<T>::store(Act<T>::load(fold.weight[i]) * normed));
}

static_assert(sizeof(StreamMatrix) == 56, "see exl2_stream_ops.StreamMatrix");
static_assert(sizeof(StreamGroup) == 232, "see exl2_stream_ops.StreamGroup");
static_assert(sizeof(NormFold) == 32, "see exl2_stream_ops.NormFold");

// ----- mbarriers and bulk copies (PTX ISA 8.0, sm_90) -----
__device__ __forceinline__ void barrier_init(u32 bar, u32 arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(arrivals) : "memory");
}
__device__ __forceinline__ void barrier_arrive(u32 bar) {
    asm volatile("{ .reg .b64 state; mbarrier.arrive.shared::cta.b64 state, [%0]; }" ::"r"(bar) : "memory");
}
// One arrival that also announces `bytes` of bulk copies the phase must wait for.
__device__ __forceinline__ void barrier_expect(u32 bar, u32 bytes) {
    asm volatile("{ .reg .b64 state; mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1; }" ::"r"(bar), "r"(bytes)
                 : "memory");
}
// Until the phase of parity `parity` has completed (a fresh barrier counts its phase "before 0", parity 1, as done).
__device__ __forceinline__ void barrier_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
    } while (!done);
}
// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to shared memory; completes on `bar`.
// Evict-first in L2: weights and scale codes (common.cuh, load_stream).
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
                 " [%0], [%1], %2, [%3], %4;"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar), "l"(evict_first_policy()) : "memory");
#endif
}

// The matrix of unit u, found by an unrolled compare (a run-time index into the parameter's array costs a copy of it).
__device__ __forceinline__ int matrix_of(const StreamGroup& group, int u) {
    int which = 0;
#pragma unroll
    for (int i = 1; i < MAX_GROUP; i++)
        if (i < group.count && u >= group.m[i].unit0) which = i;
    return which;
}

// A unit: its matrix, strip and chunk (the chunk's two table entries as read).
struct Unit {
    int matrix, strip;
    int4 chunk, multipliers;
    __device__ __forceinline__ int bits() const { return chunk.x & 0xff; }
    __device__ __forceinline__ int rows() const { return (chunk.x >> 8) & 0xff; }
    __device__ __forceinline__ int shift() const { return chunk.x >> 16; }
    __device__ __forceinline__ int groups() const { return (((rows() >> 5) - 1) >> shift()) + 1; }
};
__device__ __forceinline__ Unit unit_at(const StreamGroup& group, int u) {
    Unit t;
    t.matrix = matrix_of(group, u);
    const StreamMatrix& mat = group.m[t.matrix];
    const int local = u - mat.unit0;
    t.strip = local / mat.chunk_count;
    const int4* entry = mat.chunks + 2 * (local - t.strip * mat.chunk_count);
    t.chunk = __ldg(entry);
    t.multipliers = __ldg(entry + 1);
    return t;
}
__device__ __forceinline__ int strip_columns(const StreamMatrix& mat, int strip) {
    return min(STREAM_COLUMNS, mat.n_pad - strip * STREAM_COLUMNS);
}

// What the consumers need of a unit, written by the producer into its stage (no global load on their path):
// {bits | rows << 8 | shift << 16, first stored row, strip, matrix, columns, pad x3, M_g x4}.
struct Header {
    int code, row0, strip, matrix, columns, pad[3];
    float multiplier[4];
};

// The producer warp: for each unit of the block, wait for its stage to be free, announce its bytes, and copy each word
// row (lanes 0-15) and each group's scale words (lanes 16-19) of the strip.
template <typename S>
__device__ __forceinline__ void produce(const StreamGroup& group, int u0, int u1, u32* stages, u32 full, u32 empty,
                                        int stage_count) {
    const int lane = threadIdx.x & 31;
    int stage = 0;
    u32 phase = 0;
    Unit next = unit_at(group, u0 < u1 ? u0 : 0);
    for (int u = u0; u < u1; u++) {
        const Unit t = next;
        if (u + 1 < u1) next = unit_at(group, u + 1);  // its table entries load while this unit waits for its stage
        const StreamMatrix& mat = group.m[t.matrix];
        const int words = t.rows() * t.bits() / 32, groups = t.groups(), columns = strip_columns(mat, t.strip);
        const u32 row_bytes = 4 * columns, scale_bytes = columns / 2;
        u32* at = stages + (size_t)stage * S::WORDS;
        barrier_wait(empty + 8 * stage, phase ^ 1);
        if (lane == 0) {
            Header* header = reinterpret_cast<Header*>(at + S::HEADER);
            *reinterpret_cast<int4*>(header) = make_int4(t.chunk.x, t.chunk.z, t.strip, t.matrix);
            header->columns = columns;
            *reinterpret_cast<int4*>(header->multiplier) = t.multipliers;
            barrier_expect(full + 8 * stage, words * row_bytes + groups * scale_bytes);  // releases the header too
        }
        __syncwarp();
        const u32 base = shared_address(at);
        if (lane < words)
            bulk_copy(base + 4 * lane * S::ROW_WORDS,
                      mat.q_weight + (size_t)(t.chunk.y + lane) * mat.n_pad + t.strip * STREAM_COLUMNS, row_bytes,
                      full + 8 * stage);
        else if (lane >= 16 && lane - 16 < groups)
            bulk_copy(base + 4 * (S::SCALES + (lane - 16) * (STREAM_COLUMNS / 8)),
                      mat.q_scale + (size_t)(t.chunk.w + lane - 16) * (mat.n_pad >> 3) + t.strip * (STREAM_COLUMNS / 8),
                      scale_bytes, full + 8 * stage);
        if (++stage == stage_count) {
            stage = 0;
            phase ^= 1;
        }
    }
}

// The stages' barriers, before any thread of the block uses them: "full" completes on the producer's arrival and its
// copies' bytes, "empty" on one arrival of each consumer warp.
__device__ __forceinline__ void init_stages(u32 full, u32 empty, int stage_count, int consumer_warps) {
    if (threadIdx.x == 0) {
        for (int s = 0; s < stage_count; s++) {
            barrier_init(full + 8 * s, 1);
            barrier_init(empty + 8 * s, consumer_warps);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
}

// The block's start: its stages' barriers, the programmatic launch of the next kernel, and the producer warp (the
// threads from `consumers` on) sent to copy the units [u0, u1): true for it, which is then done. It reads only the
// layer's own tensors, so it never waits for the previous kernel.
template <typename S>
__device__ __forceinline__ bool produced(const StreamGroup& group, int u0, int u1, u32* stages, u32 full, u32 empty,
                                         int stage_count, int consumers) {
    init_stages(full, empty, stage_count, consumers / 32);
    pdl_launch_dependents();
    if ((int)threadIdx.x < consumers) return false;
    produce<S>(group, u0, u1, stages, full, empty, stage_count);
    return true;
}

// A consumer warp is done with its stage: one arrival on its "empty" barrier, and on to the next stage.
__device__ __forceinline__ void release_stage(u32 empty, int& stage, u32& phase, int stage_count) {
    __syncwarp();
    if ((threadIdx.x & 31) == 0) barrier_arrive(empty + 8 * stage);
    if (++stage == stage_count) {
        stage = 0;
        phase ^= 1;
    }
}

// Consumer threads only (the producer warp never joins): barrier 1 of the block.
template <int CONSUMERS>
__device__ __forceinline__ void consumers_sync() {
    asm volatile("bar.sync 1, %0;" ::"n"(CONSUMERS) : "memory");
}

// The end of matrix `which`'s units in the launch.
__device__ __forceinline__ int matrix_end(const StreamGroup& group, int which) {
    return which + 1 < group.count ? group.m[which + 1].unit0 : group.units;
}

// The stored rows a block's units [u0, u1) (all of one matrix) cover: [lo0, hi0) then [lo1, hi1) (one range: the
// second empty; the end of one strip and the start of the next: two; more than that: all of K).
struct Rows {
    int lo0, hi0, lo1, hi1;
    Rows() = default;
    __device__ __forceinline__ Rows(const StreamGroup& group, int K, int u0, int u1) {
        const Unit first = unit_at(group, u0), last = unit_at(group, u1 - 1);
        const int lo = first.chunk.z, hi = last.chunk.z + last.rows();
        lo1 = hi1 = 0;
        if (first.strip == last.strip) lo0 = lo, hi0 = hi;
        else if (first.strip + 1 == last.strip && hi < lo) lo0 = 0, hi0 = hi, lo1 = lo, hi1 = K;
        else lo0 = 0, hi0 = K;
    }
    __device__ __forceinline__ int count() const { return hi0 - lo0 + hi1 - lo1; }
    __device__ __forceinline__ int at(int i) const { return i < hi0 - lo0 ? lo0 + i : lo1 + i - (hi0 - lo0); }
    // The inverse: where stored row r (one of them) is among the covered rows.
    __device__ __forceinline__ int window(int r) const { return r >= lo0 && r < hi0 ? r - lo0 : hi0 - lo0 + r - lo1; }
};

// Gather entries a consumer thread reads before the programmatic wait (the layer's own table), for its first EARLY
// rows of the block's first matrix: after the wait, those rows cost one load (x) instead of two in a chain.
#define STREAM_EARLY_ROWS 4
template <int CONSUMERS>
__device__ __forceinline__ void early_entries(const StreamGroup& group, int K, int u0, int u1,
                                              u32 (&early)[STREAM_EARLY_ROWS]) {
    const Rows rows(group, K, u0, u1);
    const u32* gather = group.m[matrix_of(group, u0)].gather;
#pragma unroll
    for (int e = 0; e < STREAM_EARLY_ROWS; e++) {
        const int i = (int)threadIdx.x + e * CONSUMERS;
        early[e] = i < rows.count() ? __ldg(gather + rows.at(i)) : 0u;
    }
}

// Row r's activation into xh, at (r & ~31) + its pair slot, prescaled (`entry`: its gather table entry); with a fold
// (fold.residual not null), the folded norm's (inv: fold_inv_rms); SUMS: x and up are gate/up's unfinished fp32 sums
// (gated_sums_value).
template <typename T, bool SUMS>
__device__ __forceinline__ void gather_row(const u16* __restrict__ x, const u16* __restrict__ up, int r, u32 entry,
                                           u16* xh, const NormFold& fold, float inv) {
    const int channel = entry & 0x1ffffu;
    const float v = SUMS ? gated_sums_value<T>(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(up),
                                               channel)
                  : fold.residual != nullptr ? folded_activation<T>(fold, channel, inv)
                                             : activation<T>(x, up, channel);
    xh[(r & ~31) + ((entry >> 17) & 31)] = Act<fp16_t>::store(v * pair_prescale((int)(entry >> 22)));
}

// xh for the stored rows the block's units [u0, u1) (all of one matrix) cover; with `use_early`, the thread's first
// rows take the entries early_entries read. With a fold, its inv is reduced at the block's first gather (inv < 0
// until then: every consumer takes this call together, so its barrier is safe).
template <typename T, int CONSUMERS, bool SUMS>
__device__ __forceinline__ void gather_block(const StreamGroup& group, int K, const u16* __restrict__ x,
                                             const u16* __restrict__ up, int u0, int u1, u16* xh,
                                             const u32 (&early)[STREAM_EARLY_ROWS], bool use_early,
                                             const NormFold& fold, float& inv) {
    if (fold.residual != nullptr && inv < 0.0f) {
        __shared__ float shared_inv;
        if (threadIdx.x < 32) fold_inv_rms(fold, K, &shared_inv);
        consumers_sync<CONSUMERS>();
        inv = shared_inv;
    }
    const Rows rows(group, K, u0, u1);
    const u32* gather = group.m[matrix_of(group, u0)].gather;
    const int count = rows.count();
    int i = (int)threadIdx.x;
#pragma unroll
    for (int e = 0; e < STREAM_EARLY_ROWS; e++, i += CONSUMERS) {
        if (i < count) {
            const int r = rows.at(i);
            gather_row<T, SUMS>(x, up, r, use_early ? early[e] : __ldg(gather + r), xh, fold, inv);
        }
    }
    for (; i < count; i += CONSUMERS) {
        const int r = rows.at(i);
        gather_row<T, SUMS>(x, up, r, __ldg(gather + r), xh, fold, inv);
    }
}

// One unit's product for the thread's C adjacent columns (column n of the strip, valid): per 32-row block, its B word
// rows from the stage, the pair path's block dot, times the block's group scale.
template <int B, int C>
__device__ __forceinline__ void unit_dot(const u32* stage, const u16* xh, const Header& t, int n, const Magic& k,
                                         float* acc) {
    const u16(*xhv)[SPLIT_ROWS] = reinterpret_cast<const u16(*)[SPLIT_ROWS]>(xh);  // one row: index [0][stored row]
    const u32* scale_words = stage + STREAM_SCALES;
    constexpr float UNIT = (float)(1 << half_shift(B));
    const int blocks = (t.code >> 13) & 7, shift = t.code >> 16;  // rows >> 5
#pragma unroll
    for (int sb = 0; sb < STREAM_SCALE_ROWS; sb++) {
        if (sb >= blocks) break;
        u32 words[C][B + 1];
#pragma unroll
        for (int j = 0; j < B; j++) {
            const u32* row = stage + (sb * B + j) * STREAM_COLUMNS + n;
            if (C == 2) {
                const uint2 v = *reinterpret_cast<const uint2*>(row);
                words[0][j] = v.x;
                words[C - 1][j] = v.y;
            } else words[0][j] = row[0];
        }
#pragma unroll
        for (int c = 0; c < C; c++) words[c][B] = 0u;
        float part[C][1];
#pragma unroll
        for (int c = 0; c < C; c++) part[c][0] = 0.0f;
        sub_half<B, 1, C>(words, xhv, t.row0 + 32 * sb, k, part);
        const int g = sb >> shift;
        const u32 codes = scale_words[g * (STREAM_COLUMNS / 8) + (n >> 3)];
        const float multiplier = t.multiplier[g] * UNIT;
#pragma unroll
        for (int c = 0; c < C; c++) {
            const float code = (float)(((codes >> (((n + c) & 7) * 4)) & 15u) + 1u);
            acc[c] = fmaf(part[c][0], code * code * multiplier, acc[c]);
        }
    }
}

// The block's sums of one strip (all its units there) into the matrix's workspace; acc starts over.
template <int C>
__device__ __forceinline__ void add_sums(const StreamMatrix& mat, int strip, int n, float* acc) {
    const int column = strip * STREAM_COLUMNS + n;  // C == 2: n even, and n_pad a multiple of 32
    if (column < mat.n_pad) {
        if (C == 2) add_pair(mat.workspace + column, acc[0], acc[C - 1]);
        else atomicAdd(mat.workspace + column, acc[0]);
    }
#pragma unroll
    for (int c = 0; c < C; c++) acc[c] = 0.0f;
}

// y = x @ W (one activation row, fp16) for the group's matrices, through the fp32 workspaces (exl2_finish writes y);
// with a fold (NormFold, residual not null; x then unused), the input is that norm's output; SUMS (one matrix, no
// fold): x and up are the addresses of gate/up's unfinished fp32 sums, down_proj's input gathered from them as the
// register kernel's SUMS instances do (exl2_ops.matmul_gated).
// Block: C == 2: 128 consumer threads of 2 adjacent columns, C == 1: 256 of one; then the producer warp.
template <typename T, int C, bool SUMS = false>
__global__ void __launch_bounds__(STREAM_COLUMNS / C + 32) exl2_stream(const u16* __restrict__ x,
                                                                     const u16* __restrict__ up, int K,
                                                                     const StreamGroup group, int stage_count,
                                                                     const NormFold fold) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr int CONSUMERS = STREAM_COLUMNS / C;
    extern __shared__ __align__(128) u32 stages[];
    u16* xh = reinterpret_cast<u16*>(stages + (size_t)stage_count * STREAM_STAGE_WORDS);
    __shared__ __align__(8) unsigned long long barriers[2 * STREAM_MAX_STAGES];
    const u32 full = shared_address(barriers), empty = full + 8 * STREAM_MAX_STAGES;
    const int u0 = (int)((long long)group.units * blockIdx.x / gridDim.x);
    const int u1 = (int)((long long)group.units * (blockIdx.x + 1) / gridDim.x);
    if (produced<RowStage>(group, u0, u1, stages, full, empty, stage_count, CONSUMERS)) return;
    u32 early[STREAM_EARLY_ROWS];
    if (u0 < u1) early_entries<CONSUMERS>(group, K, u0, min(u1, matrix_end(group, matrix_of(group, u0))), early);
    pdl_wait();  // x, up and the workspaces belong to earlier kernels

    const int n = (int)threadIdx.x * C;  // the thread's first column within a strip
    const Magic k(group.m[0].n_pad);
    float acc[C];
#pragma unroll
    for (int c = 0; c < C; c++) acc[c] = 0.0f;
    int matrix = -1, strip = -1;  // of the sums in acc
    float inv = -1.0f;  // the fold's, once reduced
    int stage = 0;
    u32 phase = 0;
    for (int u = u0; u < u1; u++) {
        barrier_wait(full + 8 * stage, phase);
        const u32* words = stages + (size_t)stage * STREAM_STAGE_WORDS;
        const Header& t = *reinterpret_cast<const Header*>(words + STREAM_HEADER);  // read in place (a copy would go to local memory)
        if (t.matrix != matrix || t.strip != strip) {  // the sums so far are one strip's part: add them up
            if (matrix >= 0) add_sums<C>(group.m[matrix], strip, n, acc);
            if (t.matrix != matrix) {  // this matrix's activations, for the rows of its units in this block
                consumers_sync<CONSUMERS>();  // nobody still reads the previous matrix's
                gather_block<T, CONSUMERS, SUMS>(group, K, x, up, u, min(u1, matrix_end(group, t.matrix)), xh,
                                                 early, matrix < 0, fold, inv);
                consumers_sync<CONSUMERS>();
                if (matrix < 0) timeline_mark(0);  // the first matrix's activations gathered (the fold's inv in)
            }
            matrix = t.matrix;
            strip = t.strip;
        }
        if (n < t.columns) {
#define UNIT_DOT(B) unit_dot<B, C>(words, xh, t, n, k, acc)
            WITH_WIDTH(t.code & 0xff, UNIT_DOT)
#undef UNIT_DOT
        }
        release_stage(empty, stage, phase, stage_count);
    }
    timeline_mark(1);  // every unit's products done
    if (matrix >= 0) add_sums<C>(group.m[matrix], strip, n, acc);
    timeline_mark(2);  // the last sums' atomics issued
#else
    __trap();  // the host launches it on sm_90 and newer only
#endif
}

// ----- The multi-row kernel: M = 1 to 16 fp16 activation rows on tensor cores -----
// The one-row kernel's producer and units, with exl2_mma.cu's arithmetic as the consumers: 8 consumer warps of 32
// columns each (a strip's 256), lane (g, t) decoding its column's code pairs from the stage (word rows 8 words apart,
// so its warp's loads of one word row fall on 32 banks) into mma A fragments, the activations as B fragments in
// slot order. Why: the tensor-core kernel reads the weights in one wave of blocks that gather, then load, then add,
// and took as long at 8 rows as torch's FP16 GEMV at 4096x14336 (docs/benchmarks.md, session 33); here the copies
// stream ahead, and the mma makes the row count free up to 8 (9-16 rows: a second mma on the same decoded weights).
// Shared memory (dynamic): the stages, then the activations xh [M][window] (fp16, slot order, prescaled: the mma
// gather table) of the rows the block's units cover (at most `window`: the host sizes it by the units a block takes),
// the offset sums off [window / 32][8 · row_tiles(M)] (fp32) and each consumer warp's epilogue sums [M][36].

// One unit's products for the lane's two 16-column tiles into total (exl2_mma.cuh's block_mma and fold_group); its
// first 32-row block is block blk0 of the window.
template <int B, int M>
__device__ __forceinline__ void unit_mma(const u32* stage, const uint4* xh, int window, const float* off,
                                         const Header& t, int blk0, int col0, int g, int tq, u32 h1024,
                                         float (*total)[4 * row_tiles(M)]) {
    constexpr int W = lane_words(B), NT = row_tiles(M);
    const int blocks = (t.code >> 13) & 7, shift = t.code >> 16, group_blocks = 1 << shift;
    const u32* lane_words_at = stage + first_word<B>(tq) * RowsStage::ROW_WORDS + col0 + g;
    float acc[2][4 * NT] = {}, offset[2 * NT] = {};
#pragma unroll
    for (int sb = 0; sb < STREAM_SCALE_ROWS; sb++) {
        if (sb >= blocks) break;
        u32 words[4][W];  // [column g + 8c][word]
#pragma unroll
        for (int w = 0; w < W; w++) {
            const bool inside = W == 1 || first_word<B>(tq) + w < B;
            const u32* row = lane_words_at + (sb * B + w) * RowsStage::ROW_WORDS;
#pragma unroll
            for (int c = 0; c < 4; c++) words[c][w] = inside ? row[8 * c] : 0u;
        }
        const int blk = blk0 + sb;
        uint4 xv[NT];
        row_fragments<M>(xh, window, blk, g, tq, xv);
        block_mma<B, NT>(words, xv, tq, h1024, acc);
        add_offsets<M>(off + blk * 8 * NT, tq, offset);
        if (((sb + 1) & (group_blocks - 1)) == 0 || sb + 1 == blocks) {  // the group ends: fold
            const int group = sb >> shift;
            float scale[4];
            group_scales(*reinterpret_cast<const uint4*>(stage + RowsStage::SCALES + group * (STREAM_COLUMNS / 8) + (col0 >> 3)),
                         t.multiplier[group], g, scale);
            fold_group<M>(scale, acc, offset, total);
        }
    }
}

// xh and off for the stored rows the block's units [u0, u1) (all of one matrix) cover, in the order of those rows
// (Rows: the window of `window` rows the block's shared memory holds), by whole 32-row blocks, one warp a block
// (exl2_mma.cuh's gather_mma_block); the rows are whole blocks as every unit's are. Returns them.
template <int M, int CONSUMERS>
__device__ __forceinline__ Rows gather_rows(const StreamGroup& group, int K, const u16* __restrict__ x, int u0, int u1,
                                            u16* xs, int window, float* off) {
    const Rows rows(group, K, u0, u1);
    const u32* gather = group.m[matrix_of(group, u0)].gather;
    for (int i = (int)threadIdx.x >> 5; i < (rows.count() >> 5); i += CONSUMERS / 32) {
        const int entry = (int)__ldg(gather + rows.at(32 * i) + (threadIdx.x & 31));
        gather_mma_block<M, true>(x, K, entry, xs, window, 32 * i, off + i * 8 * row_tiles(M));
    }
    return rows;
}

// y = x @ W for M fp16 rows x [M, K] and the group's matrices, into their fp32 workspaces [M][n_pad] (exl2_finish
// writes y). Block: 8 consumer warps, then the producer warp.
template <int M>
__global__ void __launch_bounds__(STREAM_COLUMNS + 32) exl2_stream_rows(const u16* __restrict__ x, int K,
                                                                        const StreamGroup group, int stage_count,
                                                                        int window) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr int CONSUMERS = STREAM_COLUMNS;
    extern __shared__ __align__(128) u32 stages[];
    uint4* xh = reinterpret_cast<uint4*>(stages + (size_t)stage_count * RowsStage::WORDS);
    float* off = reinterpret_cast<float*>(xh + (size_t)M * (window >> 3));
    float(*warp_sums)[M][36] = reinterpret_cast<float(*)[M][36]>(off + (window >> 5) * 8 * row_tiles(M));
    __shared__ __align__(8) unsigned long long barriers[2 * STREAM_MAX_STAGES];
    const u32 full = shared_address(barriers), empty = full + 8 * STREAM_MAX_STAGES;
    const int u0 = (int)((long long)group.units * blockIdx.x / gridDim.x);
    const int u1 = (int)((long long)group.units * (blockIdx.x + 1) / gridDim.x);
    if (produced<RowsStage>(group, u0, u1, stages, full, empty, stage_count, CONSUMERS)) return;
    pdl_wait();  // x and the workspaces belong to earlier kernels

    const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31, g = lane >> 2, tq = lane & 3, col0 = 32 * warp;
    const Magic k(group.m[0].n_pad);
    float total[2][4 * row_tiles(M)] = {};
    int matrix = -1, strip = -1;  // of the sums in total
    Rows rows;  // the rows xh holds (set at the first unit)
    int stage = 0;
    u32 phase = 0;
    for (int u = u0; u < u1; u++) {
        barrier_wait(full + 8 * stage, phase);
        const u32* words = stages + (size_t)stage * RowsStage::WORDS;
        const Header& t = *reinterpret_cast<const Header*>(words + RowsStage::HEADER);
        if (t.matrix != matrix || t.strip != strip) {  // the sums so far are one strip's part: add them up
            if (matrix >= 0 && strip * STREAM_COLUMNS + col0 < group.m[matrix].n_pad)
                add_warp_sums<M>(group.m[matrix].workspace, group.m[matrix].n_pad, strip * STREAM_COLUMNS + col0,
                                 warp_sums[warp], total, g, tq);
#pragma unroll
            for (int i = 0; i < 4 * row_tiles(M); i++) total[0][i] = total[1][i] = 0.0f;
            if (t.matrix != matrix) {  // this matrix's activations, for the rows of its units in this block
                consumers_sync<CONSUMERS>();  // nobody still reads the previous matrix's
                rows = gather_rows<M, CONSUMERS>(group, K, x, u, min(u1, matrix_end(group, t.matrix)),
                                                 reinterpret_cast<u16*>(xh), window, off);
                consumers_sync<CONSUMERS>();
            }
            matrix = t.matrix;
            strip = t.strip;
        }
        if (col0 < t.columns) {  // n_pad is a multiple of 32: a warp's columns are all in the strip or none
#define UNIT_MMA(B) unit_mma<B, M>(words, xh, window, off, t, rows.window(t.row0) >> 5, col0, g, tq, k.h1024, total)
            WITH_WIDTH(t.code & 0xff, UNIT_MMA)
#undef UNIT_MMA
        }
        release_stage(empty, stage, phase, stage_count);
    }
    if (matrix >= 0 && strip * STREAM_COLUMNS + col0 < group.m[matrix].n_pad)
        add_warp_sums<M>(group.m[matrix].workspace, group.m[matrix].n_pad, strip * STREAM_COLUMNS + col0, warp_sums[warp],
                         total, g, tq);
#else
    __trap();  // the host launches it on sm_90 and newer only
#endif
}
