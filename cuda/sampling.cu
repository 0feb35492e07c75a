// Sampling on the GPU: greedy (argmax_rows) and temperature / top-k / top-p / min-p (sample_stats, sample_bins,
// sample_topk, sample_draw), both with an optional repetition penalty.
// Both cut each row into pieces of ~4096 logits, a block each (gridDim.x blocks a row, gridDim.y rows), and join the
// blocks' results through a small workspace a row, the last block to finish writing the token.
#include "common.cuh"

typedef unsigned long long u64;

__device__ __forceinline__ u64 argmax_key(float f, u32 index) {
    if (f == 0.0f) f = 0.0f;  // -0 ties with +0
    const u32 bits = __float_as_uint(f);
    const u32 ordered = f != f ? 0xffffffffu : bits ^ ((bits >> 31) ? 0xffffffffu : 0x80000000u);
    return ((u64)ordered << 32) | (u64)(0xffffffffu - index);
}

__device__ __forceinline__ u64 max_u64(u64 a, u64 b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------------------------------------
// Sampling with temperature, top-k, top-p and min-p in two to four launches (torch's path takes ~37-45 kernels and
// 110-190 µs a token: a sort, a cumulative sum, masks, a softmax, torch.topk). The draw is Sampler.draw's exponential
// race: argmax over the kept tokens of p_i / E_i with E_i ~ Exp(1), taken from a race tensor (tests: then the kernels
// pick the torch path's token) or made here from a counter-based hash of (seed, step, row, token) for the kept tokens
// alone. A repetition penalty is applied as each pass reads the logits (each_logit).
//
// Each row is cut into `chunk`-token pieces, a block each (gridDim.x blocks a row, gridDim.y rows):
//   sample_stats: a piece's maximum, Σ exp((l - max) / T) and smallest logit, and the row's workspace cleared;
//   sample_bins (top-p or top-k): with the row's m and Z joined from the pieces', the masses e_i = exp((l_i - m) / T)
//       (with top-k: and the counts) of the tokens above the floor (below it none is kept: min-p's rule, and top-p's
//       without top-k, since the tokens below (1 - top_p) Z / vocab hold less than 1 - top_p of the mass together;
//       with top-k every token is binned) summed by bin of z_i = (l_i - m) / T between the floor and 0, in fixed
//       point (integer sums: the same cut in any order). The last block to finish finds top-p's boundary bin: the
//       first whose inclusive mass reaches (top_p - 1e-6) Z (before it every token is kept, after it none); with
//       top-k instead the k-th token's bin, by the counts;
//   sample_topk (top-k): the k-th token's bin listed; the last block sorts it for the k-th token's key and Z over the
//       top k (which top-p's cut is relative to, as top_k_filter then softmax make it), then top-p's boundary bin;
//   sample_draw: the race over the kept tokens, and the boundary bin's tokens listed; the last block to finish sorts
//       them by logit (equal logits: lower index first) and keeps them while the mass before them is below the cut,
//       as top_p_mask keeps a sorted prefix, then writes the winner.
// A boundary or k-th bin of more than SAMPLE_CANDIDATES tokens (logits equal to within a 2048th of their range) is
// kept whole.
#define SAMPLE_THREADS 256
#define SAMPLE_UNROLL 2
#define SAMPLE_BINS 2048
#define SAMPLE_CANDIDATES 2048
#define MASS_ONE 1099511627776.0f  // 2^40: fixed-point masses (a token's ≤ 2^40, a row's < 2^58)
#define TOP_P_TOLERANCE 1e-6       // sampler.py's _TOP_P_TOLERANCE
#define NEG_INF __int_as_float(0xff800000)
#define SEEN_TOKENS 8192  // most tokens a block (sampling_ops.SEEN_TOKENS): the penalty's bitmap

struct fp32_t {};  // float32 logits (after a repetition penalty, the torch path's float copy)

// 16-byte vectors of logits, by dtype.
template <typename T> struct LogitVector {
    static constexpr int size = 8;
    static __device__ __forceinline__ float at(const uint4& v, int i) {
        const u32 words[4] = {v.x, v.y, v.z, v.w};
        return Act<T>::load((u16)((words[i / 2] >> (16 * (i % 2))) & 0xffffu));
    }
};
template <> struct LogitVector<fp32_t> {
    static constexpr int size = 4;
    static __device__ __forceinline__ float at(const uint4& v, int i) {
        const u32 words[4] = {v.x, v.y, v.z, v.w};
        return __uint_as_float(words[i]);
    }
};

// The kernels' arguments (sampling_ops.SampleArgs, the same layout).
struct SampleArgs {
    const void* logits;  // [rows, row_stride]: the first `vocab` of each row read
    const float* race;   // float32 [rows, vocab] Exp(1) values, or null: hashed from (seed, step, row, token)
    const long long* history;  // [rows, history_stride] token ids, or null: no repetition penalty
    unsigned long long* work;  // the rows' workspace: RowWork's words a row (argmax_rows: two)
    long long* out;            // int64 [rows]
    unsigned long long seed, step;
    int row_stride, vocab, chunk;  // chunk: tokens a block, a multiple of 8, at most SEEN_TOKENS
    int history_stride, history_start, history_end;  // the penalized window of each history row
    float inv_temperature, top_p, min_p, penalty;
    int top_k;  // 0: off (else below vocab)
};
static_assert(sizeof(SampleArgs) == 104, "see sampling_ops.SampleArgs");

// One row's workspace, inside args.work (rows × ROW_WORDS(pieces) u64 words); sample_stats clears it.
struct RowWork {
    u64* bins;        // SAMPLE_BINS fixed-point masses
    u32* counts;      // SAMPLE_BINS token counts (top-k)
    u64* candidates;  // SAMPLE_CANDIDATES argmax_key(logit, index): a bin's tokens, for sorting
    u64* best;        // the race's best argmax_key(p / E, index) so far
    u64* mass_before; // fixed-point mass before the boundary bin
    u64* cut;         // top-p's cut: (top_p - 1e-6) Z in fixed point (Z over the top k with top-k)
    u64* kth_key;     // argmax_key(logit, index) of the k-th token (0: no top-k, or its bin kept whole)
    u64* count_before; // tokens before the k-th token's bin
    u32* done;        // blocks done with: the bins, the top-k list, the draw
    u32* seen;        // the bin's tokens listed so far
    u32* boundary;    // top-p's boundary bin (SAMPLE_BINS: none)
    u32* kth_bin;     // the bin of the k-th token (SAMPLE_BINS: none, every token is before it)
    float4* pieces;   // (maximum, Σ exp, smallest logit, -) a block
};
#define ROW_FIXED_WORDS (SAMPLE_BINS + SAMPLE_BINS / 2 + SAMPLE_CANDIDATES + 8)
#define ROW_WORDS(pieces) (ROW_FIXED_WORDS + 2 * (pieces))  // sampling_ops.row_words

__device__ __forceinline__ RowWork row_work(const SampleArgs& a, int row) {
    u64* w = a.work + (size_t)row * ROW_WORDS(gridDim.x);
    u64* words = w + SAMPLE_BINS + SAMPLE_BINS / 2 + SAMPLE_CANDIDATES;  // the row's 8 single words
    u32* ints = reinterpret_cast<u32*>(words + 5);
    return RowWork{w, reinterpret_cast<u32*>(w + SAMPLE_BINS), w + SAMPLE_BINS + SAMPLE_BINS / 2, words, words + 1,
                   words + 2, words + 3, words + 4, ints, ints + 3, ints + 4, ints + 5,
                   reinterpret_cast<float4*>(w + ROW_FIXED_WORDS)};
}

// Calls visit(logit, index) for this thread's share of this block's piece, SAMPLE_UNROLL 16-byte loads in flight,
// with the repetition penalty applied to the logits of tokens in the history window (HF's rule, as
// apply_repetition_penalty: a positive logit divided by the penalty, another multiplied, once however often the token
// occurs). The block first marks its piece's tokens that occur in the window in a bitmap in shared memory.
// Every thread of the block calls it.
template <typename T, typename Visit>
__device__ __forceinline__ void each_logit(const SampleArgs& a, int row, Visit&& visit) {
    __shared__ u32 seen[SEEN_TOKENS / 32];
    constexpr int per = LogitVector<T>::size;
    const int first_token = blockIdx.x * a.chunk;
    if (a.history != nullptr) {
        for (int i = threadIdx.x; i < SEEN_TOKENS / 32; i += SAMPLE_THREADS) seen[i] = 0;
        __syncthreads();
        const long long* ids = a.history + (size_t)row * a.history_stride;
        for (int p = a.history_start + (int)threadIdx.x; p < a.history_end; p += SAMPLE_THREADS) {
            const long long id = ids[p], t = id - first_token;  // ids outside [0, vocab) take no part
            if (t >= 0 && t < a.chunk && id < a.vocab) atomicOr(&seen[t >> 5], 1u << (t & 31));
        }
        __syncthreads();
    }
    const uint4* x = reinterpret_cast<const uint4*>(
        reinterpret_cast<const char*>(a.logits) + (size_t)row * a.row_stride * (16 / per));
    const int first = first_token / per, end = min(a.vocab, first_token + a.chunk) / per;
    for (int v0 = first + threadIdx.x; v0 < end; v0 += SAMPLE_THREADS * SAMPLE_UNROLL) {
        uint4 raw[SAMPLE_UNROLL];
#pragma unroll
        for (int u = 0; u < SAMPLE_UNROLL; u++) {
            const int v = v0 + u * SAMPLE_THREADS;
            raw[u] = v < end ? __ldcg(x + v) : uint4{0u, 0u, 0u, 0u};
        }
#pragma unroll
        for (int u = 0; u < SAMPLE_UNROLL; u++) {
            const int v = v0 + u * SAMPLE_THREADS;
            if (v >= end) break;
#pragma unroll
            for (int i = 0; i < per; i++) {
                float f = LogitVector<T>::at(raw[u], i);
                const int t = v * per + i - first_token;
                if (a.history != nullptr && (seen[t >> 5] >> (t & 31)) & 1u)
                    f = f > 0.0f ? __fdiv_rn(f, a.penalty) : f * a.penalty;
                visit(f, v * per + i);
            }
        }
    }
}

// (maximum, Σ exp2((x - maximum) k), smallest) of two parts; an empty part has maximum -inf.
__device__ __forceinline__ void join_stats(float& m, float& s, float& low, float m2, float s2, float low2, float k) {
    low = fminf(low, low2);
    const float joined = fmaxf(m, m2);
    if (joined == NEG_INF) return;
    s = (m == NEG_INF ? 0.0f : s * exp2f((m - joined) * k)) + (m2 == NEG_INF ? 0.0f : s2 * exp2f((m2 - joined) * k));
    m = joined;
}

__device__ __forceinline__ void warp_join_stats(float& m, float& s, float& low, float k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        join_stats(m, s, low, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, s, offset),
                   __shfl_xor_sync(0xffffffffu, low, offset), k);
}

// What every pass needs of the row: its maximum and Σ exp, and the floor, bins and cut they give.
struct RowCut {
    float m, inv_temperature, total, floor_mass, bin_floor, bins_a_nat;
    u64 cut;  // top-p's, without top-k
    __device__ __forceinline__ float z(float f) const { return (f - m) * inv_temperature; }
    // Whether a token of mass e = exp(z) can be kept at all (not below the floor; -inf and NaN logits never).
    __device__ __forceinline__ bool above_floor(float e) const { return e >= floor_mass && e > 0.0f; }
    // Whether it takes part in the bins: the same, but with top-k every token does (Z over the top k needs them all).
    __device__ __forceinline__ bool binned(float e) const { return e >= bin_floor && e > 0.0f; }
    __device__ __forceinline__ int bin(float z) const { return min(SAMPLE_BINS - 1, (int)(-z * bins_a_nat)); }
};

__device__ __forceinline__ u64 fixed_mass(float e) { return (u64)__float2ull_rn(e * MASS_ONE); }

// The row's statistics, joined from its pieces' (warp 0 joins them, in the same order every time).
__device__ __forceinline__ RowCut row_cut(const SampleArgs& a, const RowWork& w) {
    __shared__ float4 joined;
    const float k = a.inv_temperature * 1.4426950408889634f;  // log2(e) / T
    if (threadIdx.x < 32) {
        float m = NEG_INF, s = 0.0f, low = -NEG_INF;
        for (int p = threadIdx.x; p < gridDim.x; p += 32) {
            const float4 piece = __ldcg(w.pieces + p);
            join_stats(m, s, low, piece.x, piece.y, piece.z, k);
        }
        warp_join_stats(m, s, low, k);
        if (threadIdx.x == 0) joined = make_float4(m, s, low, 0.0f);
    }
    __syncthreads();
    RowCut c;
    c.m = joined.x, c.inv_temperature = a.inv_temperature, c.total = joined.y;
    // Tokens below the floor are never kept: min-p's rule, and top-p's (without top-k), which keeps a prefix holding
    // (top_p - 1e-6) Z, while all tokens below (1 - top_p) Z / vocab together hold less than (1 - top_p) Z.
    const bool top_p_on = a.top_p < 1.0f, top_k_on = a.top_k > 0;
    c.floor_mass = fmaxf(a.min_p, top_p_on && !top_k_on ? (1.0f - a.top_p) * c.total / (float)a.vocab : 0.0f);
    c.bin_floor = top_k_on ? 0.0f : c.floor_mass;
    const float floor_z = fmaxf(logf(fmaxf(c.bin_floor, 1e-38f)), (joined.z - c.m) * a.inv_temperature);
    c.bins_a_nat = floor_z < 0.0f ? (float)SAMPLE_BINS / -floor_z : 0.0f;
    // At least 1: the top token (nothing before it) is always kept, as top_p_mask keeps it.
    c.cut = (u64)fmax(1.0, (a.top_p - TOP_P_TOLERANCE) * (double)c.total * (double)MASS_ONE);
    return c;
}

// Where the passes after sample_stats start, once the programmatic wait is over: the block's row, its workspace and
// the row's cut.
struct RowPass {
    int row;
    RowWork w;
    RowCut c;
};
__device__ __forceinline__ RowPass row_pass(const SampleArgs& a) {
    pdl_launch_dependents();
    pdl_wait();
    const RowWork w = row_work(a, blockIdx.y);
    return RowPass{(int)blockIdx.y, w, row_cut(a, w)};  // row_cut synchronizes
}

// Exclusive prefix sum of one u64 a thread in thread order (SAMPLE_THREADS threads); `total` gets the block's sum.
__device__ __forceinline__ u64 block_exclusive_sum(u64 value, u64& total) {
    __shared__ u64 warp_totals[SAMPLE_THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64 inclusive = value;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const u64 other = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += other;
    }
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    u64 before = inclusive - value;
    total = 0;
    for (int w = 0; w < SAMPLE_THREADS / 32; w++) {
        if (w < warp) before += warp_totals[w];
        total += warp_totals[w];
    }
    __syncthreads();
    return before;
}

__device__ __forceinline__ u64 block_max_u64(u64 key) {
    __shared__ u64 warp_keys[SAMPLE_THREADS / 32];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) key = max_u64(key, __shfl_xor_sync(0xffffffffu, key, offset));
    if ((threadIdx.x & 31) == 0) warp_keys[threadIdx.x >> 5] = key;
    __syncthreads();
    key = 0;
    for (int w = 0; w < SAMPLE_THREADS / 32; w++) key = max_u64(key, warp_keys[w]);
    __syncthreads();
    return key;
}

// Whether this block is the row's last to pass here (after its writes are made visible to the others).
__device__ __forceinline__ bool last_block(u32* done) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (last) __threadfence();
    return last;
}

__device__ __forceinline__ u64 mix64(u64 z) {  // splitmix64's finalizer
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// The race's E ~ Exp(1) values of one row: from args.race, or -log u with u uniform in (0, 1) (24 bits) hashed from
// (seed, step, row, index), the row's part of the hash taken once.
struct Race {
    const float* given;  // the row's values in args.race, or null
    u64 stream;
    __device__ __forceinline__ Race(const SampleArgs& a, int row)
        : given(a.race != nullptr ? a.race + (size_t)row * a.vocab : nullptr),
          stream(mix64(mix64(a.seed) ^ ((a.step << 16) | (u64)row))) {}
    __device__ __forceinline__ float value(int index) const {
        if (given != nullptr) return fmaxf(given[index], 1e-30f);
        const u64 h = mix64(stream + (u64)index);
        return -__logf(((float)(h >> 40) + 0.5f) * 5.9604644775390625e-8f);  // 2^-24
    }
};

// The first bin where the running sum of `values` (SAMPLE_BINS of them, in bin order, read from global memory) reaches
// `target` (SAMPLE_BINS: never), and the sum before it. The last block of a pass; every thread calls it.
template <typename V>
__device__ __forceinline__ void first_bin_reaching(const V* values, u64 target, u32* bin, u64* before_bin) {
    // Thread t sums bins [per t, per t + per): thread order is bin order.
    constexpr int per = SAMPLE_BINS / SAMPLE_THREADS;
    const V* mine = values + threadIdx.x * per;
    u64 sum = 0;
#pragma unroll
    for (int i = 0; i < per; i++) sum += (u64)__ldcg(mine + i);
    u64 all;
    u64 before = block_exclusive_sum(sum, all);
    if (before < target && before + sum >= target) {  // the one thread whose bins reach it
        int b = 0;
        while (before + (u64)__ldcg(mine + b) < target) before += (u64)__ldcg(mine + b++);
        *bin = threadIdx.x * per + b;
        *before_bin = before;
    }
}

// Top-p's boundary bin for `cut` (kept for sample_draw's walk) from the row's mass bins; the last block of a pass.
__device__ __forceinline__ void find_boundary(const RowWork& w, u64 cut) {
    if (threadIdx.x == 0) *w.cut = cut;
    first_bin_reaching(w.bins, cut, w.boundary, w.mass_before);
}

// The row's listed tokens (w.candidates, `count` ≤ SAMPLE_CANDIDATES) into `sorted`, larger logit first (equal
// logits: lower index first), by a bitonic sort in shared memory; returns the padded size. Every thread calls it.
__device__ __forceinline__ int sort_candidates(const RowWork& w, int count, u64* sorted) {
    int size = 1;
    while (size < count) size <<= 1;
    for (int i = threadIdx.x; i < size; i += SAMPLE_THREADS) sorted[i] = i < count ? __ldcg(w.candidates + i) : 0;
    __syncthreads();
    for (int span = 2; span <= size; span <<= 1) {
        for (int j = span >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < size; i += SAMPLE_THREADS) {
                const int partner = i ^ j;
                if (partner > i) {
                    const u64 x = sorted[i], y = sorted[partner];
                    if ((x < y) == ((i & span) == 0)) sorted[i] = y, sorted[partner] = x;
                }
            }
            __syncthreads();
        }
    }
    return size;
}

__device__ __forceinline__ float logit_of(u64 key) {  // argmax_key's logit back
    const u32 ordered = (u32)(key >> 32);
    return __uint_as_float(ordered ^ ((ordered >> 31) ? 0x80000000u : 0xffffffffu));
}
__device__ __forceinline__ int index_of(u64 key) { return (int)(0xffffffffu - (u32)(key & 0xffffffffu)); }

template <typename T>
__global__ void __launch_bounds__(SAMPLE_THREADS) sample_stats(SampleArgs a) {
    pdl_launch_dependents();
    pdl_wait();
    const int row = blockIdx.y, tid = threadIdx.x;
    const RowWork w = row_work(a, row);
    for (int b = blockIdx.x * SAMPLE_THREADS + tid; b < SAMPLE_BINS + SAMPLE_BINS / 2; b += gridDim.x * SAMPLE_THREADS)
        w.bins[b] = 0;  // the masses, then the counts
    if (blockIdx.x == 0 && tid == 0) {
        *w.best = *w.mass_before = *w.cut = *w.kth_key = *w.count_before = 0;
        w.done[0] = w.done[1] = w.done[2] = *w.seen = 0;
        *w.boundary = *w.kth_bin = SAMPLE_BINS;
    }
    const float k = a.inv_temperature * 1.4426950408889634f;
    float m = NEG_INF, s = 0.0f, low = -NEG_INF;
    each_logit<T>(a, row, [&](float f, int) {
        if (!(f > NEG_INF)) return;  // -inf (masked) and NaN take no part
        low = fminf(low, f);
        if (f > m) {
            s = (m == NEG_INF ? 0.0f : s * exp2f((m - f) * k)) + 1.0f;
            m = f;
        } else {
            s += exp2f((f - m) * k);
        }
    });
    warp_join_stats(m, s, low, k);
    __shared__ float4 warps[SAMPLE_THREADS / 32];
    if ((tid & 31) == 0) warps[tid >> 5] = make_float4(m, s, low, 0.0f);
    __syncthreads();
    if (tid == 0) {
        for (int i = 1; i < SAMPLE_THREADS / 32; i++) join_stats(m, s, low, warps[i].x, warps[i].y, warps[i].z, k);
        w.pieces[blockIdx.x] = make_float4(m, s, low, 0.0f);
    }
}

// Top-p or top-k only. The last block finds top-p's boundary bin (without top-k) or the k-th token's bin (with it).
template <typename T>
__global__ void __launch_bounds__(SAMPLE_THREADS) sample_bins(SampleArgs a) {
    __shared__ u64 bins[SAMPLE_BINS];
    __shared__ u32 counts[SAMPLE_BINS];
    for (int b = threadIdx.x; b < SAMPLE_BINS; b += SAMPLE_THREADS) bins[b] = 0, counts[b] = 0;
    const RowPass pass = row_pass(a);  // synchronizes, so the bins are clear too
    const RowWork& w = pass.w;
    const RowCut& c = pass.c;
    const int row = pass.row, tid = threadIdx.x;
    const bool top_k_on = a.top_k > 0;
    each_logit<T>(a, row, [&](float f, int) {
        const float z = c.z(f), e = __expf(z);
        if (!c.binned(e)) return;
        const int b = c.bin(z);
        atomicAdd(&bins[b], fixed_mass(e));
        if (top_k_on) atomicAdd(&counts[b], 1u);
    });
    __syncthreads();
    for (int b = tid; b < SAMPLE_BINS; b += SAMPLE_THREADS) {
        if (bins[b] != 0) atomicAdd(w.bins + b, bins[b]);
        if (counts[b] != 0) atomicAdd(w.counts + b, counts[b]);
    }
    if (!last_block(w.done)) return;
    if (!top_k_on) {
        find_boundary(w, c.cut);
    } else {
        first_bin_reaching(w.counts, (u64)a.top_k, w.kth_bin, w.count_before);
    }
}

// Top-k only: the k-th token's bin listed and sorted by the last block, which sets the k-th key and Z over the top k,
// then (with top-p) top-p's boundary bin from the masses of the top k alone.
template <typename T>
__global__ void __launch_bounds__(SAMPLE_THREADS) sample_topk(SampleArgs a) {
    __shared__ u64 sorted[SAMPLE_CANDIDATES];
    const RowPass pass = row_pass(a);
    const RowWork& w = pass.w;
    const RowCut& c = pass.c;
    const int row = pass.row, tid = threadIdx.x;
    const int kth_bin = (int)__ldcg(w.kth_bin);
    if (kth_bin < SAMPLE_BINS) {
        each_logit<T>(a, row, [&](float f, int i) {
            const float z = c.z(f);
            if (!c.binned(__expf(z)) || c.bin(z) != kth_bin) return;
            const u32 slot = atomicAdd(w.seen, 1u);
            if (slot < SAMPLE_CANDIDATES) w.candidates[slot] = argmax_key(f, (u32)i);
        });
    }
    if (!last_block(w.done + 1)) return;
    if (kth_bin == SAMPLE_BINS) {  // fewer than k tokens with a mass: top-k keeps them all
        if (a.top_p < 1.0f) find_boundary(w, c.cut);
        return;
    }
    const u32 seen = __ldcg(w.seen);
    const int count = (int)min(seen, (u32)SAMPLE_CANDIDATES);
    const int wanted = a.top_k - (int)__ldcg(w.count_before);  // of the bin's tokens, in sorted order (≥ 1)
    sort_candidates(w, count, sorted);
    // Past SAMPLE_CANDIDATES tokens in the bin: all of it is kept (0 passes every key).
    const bool exact = seen <= SAMPLE_CANDIDATES && wanted <= count;
    u64 part = 0;  // the fixed-point mass of the bin's top-k tokens
    for (int j = tid; j < (exact ? wanted : count); j += SAMPLE_THREADS)
        part += fixed_mass(__expf(c.z(logit_of(sorted[j]))));
    u64 bin_part;
    block_exclusive_sum(part, bin_part);
    if (!exact) bin_part = __ldcg(w.bins + kth_bin);
    __syncthreads();
    if (tid == 0) {
        *w.kth_key = exact ? sorted[wanted - 1] : 0;
        *w.seen = 0;  // the list is sample_draw's next
        w.bins[kth_bin] = bin_part;  // the masses of the top k alone, for top-p's boundary
    }
    for (int b = kth_bin + 1 + tid; b < SAMPLE_BINS; b += SAMPLE_THREADS) w.bins[b] = 0;
    if (a.top_p >= 1.0f) return;
    __threadfence();
    __syncthreads();
    u64 top_k_mass = 0;  // Z over the top k: the bins' masses up to the k-th token's bin
    for (int b = tid; b <= kth_bin; b += SAMPLE_THREADS) top_k_mass += __ldcg(w.bins + b);
    u64 z_k;
    block_exclusive_sum(top_k_mass, z_k);
    find_boundary(w, (u64)fmax(1.0, (a.top_p - TOP_P_TOLERANCE) * (double)z_k));
}

template <typename T>
__global__ void __launch_bounds__(SAMPLE_THREADS) sample_draw(SampleArgs a) {
    __shared__ u64 sorted[SAMPLE_CANDIDATES];
    const RowPass pass = row_pass(a);
    const RowWork& w = pass.w;
    const RowCut& c = pass.c;
    const int row = pass.row, tid = threadIdx.x;
    const bool binned = a.top_p < 1.0f || a.top_k > 0;
    const int boundary = (int)__ldcg(w.boundary), kth_bin = (int)__ldcg(w.kth_bin);
    const u64 kth_key = __ldcg(w.kth_key);
    u64 best = 0;  // argmax_key(p / E, index); 0 below every key
    const Race draws(a, row);
    auto race = [&](float e, int i) { best = max_u64(best, argmax_key(e / draws.value(i), (u32)i)); };
    each_logit<T>(a, row, [&](float f, int i) {
        const float z = c.z(f), e = __expf(z);
        if (!c.binned(e)) return;  // (every token above the floor is binned)
        const int b = binned ? c.bin(z) : 0;
        if (b > kth_bin || b > boundary || argmax_key(f, (u32)i) < kth_key) return;  // past top-k's or top-p's cut
        if (b < boundary) {
            if (c.above_floor(e)) race(e, i);
        } else {  // top-p's boundary bin: listed for the last block
            const u32 slot = atomicAdd(w.seen, 1u);
            if (slot < SAMPLE_CANDIDATES) w.candidates[slot] = argmax_key(f, (u32)i);
            else if (c.above_floor(e)) race(e, i);  // too many to sort: the whole bin is kept
        }
    });
    best = block_max_u64(best);
    if (tid == 0 && best != 0) atomicMax(w.best, best);
    if (!last_block(w.done + 2)) return;
    // The last block: the boundary bin's tokens, sorted, kept while the mass before them is below the cut.
    const u32 seen = __ldcg(w.seen);
    const int count = (int)min(seen, (u32)SAMPLE_CANDIDATES);
    best = 0;
    if (count > 0) {
        sort_candidates(w, count, sorted);
        if (tid < 32) {  // one warp walks the sorted list 32 tokens at a time
            u64 carried = __ldcg(w.mass_before);
            const u64 cut = __ldcg(w.cut);
            for (int j0 = 0; j0 < count; j0 += 32) {
                const int j = j0 + tid;
                const float e = j < count ? __expf(c.z(logit_of(sorted[j]))) : 0.0f;
                const u64 mine = j < count ? fixed_mass(e) : 0;
                u64 inclusive = mine;
#pragma unroll
                for (int offset = 1; offset < 32; offset <<= 1) {
                    const u64 other = __shfl_up_sync(0xffffffffu, inclusive, offset);
                    if (tid >= offset) inclusive += other;
                }
                const bool kept = seen > SAMPLE_CANDIDATES || carried + inclusive - mine < cut;
                if (j < count && kept && c.above_floor(e)) race(e, index_of(sorted[j]));
                carried += __shfl_sync(0xffffffffu, inclusive, 31);
                if (seen <= SAMPLE_CANDIDATES && carried >= cut) break;
            }
        }
    }
    best = max_u64(block_max_u64(best), __ldcg(w.best));
    if (tid == 0) a.out[row] = best == 0 ? 0 : (long long)index_of(best);
}

// Greedy sampling: the index of each row's largest logit, as torch.argmax gives it (the first index among equal
// maxima, NaN above everything, -0 equal to +0). torch's reduction takes ~26 µs for one row of 128256 logits on the
// H200 (8.5 µs for 151936: it splits rows differently), a whole percent of an 8B decode step. A thread keeps its best
// value and index with one compare a value (its indices grow, so a strictly larger value alone replaces the best: the
// first of equal maxima stays); the threads' bests are joined as 64-bit keys, (order-preserving bits of the float)
// << 32 | (0xffffffff - index), whose maximum is the largest value at the smallest index: in the block, then across
// the row's blocks by atomicMax on the row's workspace word (a.work: [rows] × {key, blocks done}, zero between
// launches: the last block clears it).
template <typename T>
__global__ void __launch_bounds__(SAMPLE_THREADS) argmax_rows(SampleArgs a) {
    pdl_launch_dependents();
    pdl_wait();
    const int row = blockIdx.y;
    u64* work = a.work + 2 * (size_t)row;
    float best = NEG_INF;  // replaced by anything larger, and by NaN below
    int best_index = -1;   // none yet (a row of -inf leaves it to the join: index 0)
    each_logit<T>(a, row, [&](float f, int i) {
        if (f > best || (f != f && best == best)) {  // larger, or the first NaN
            best = f;
            best_index = i;
        }
    });
    // 0: below every key (-inf's is 0x007fffff...)
    const u64 key = block_max_u64(best_index < 0 ? 0 : argmax_key(best, (u32)best_index));
    if (threadIdx.x == 0 && key != 0) atomicMax(work, key);
    if (!last_block(reinterpret_cast<u32*>(work + 1)) || threadIdx.x != 0) return;
    const u64 joined = __ldcg(work);
    a.out[row] = joined == 0 ? 0 : (long long)(0xffffffffu - (u32)(joined & 0xffffffffu));
    work[0] = 0, work[1] = 0;
}
