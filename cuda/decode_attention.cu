// One-token attention over a KV cache (the decode step): out = softmax(q·kᵀ/√D) v for every query head. The G query
// heads of a KV head share its keys' and values' loads, and only keys from the window's start to the token's position
// are read (in a left-padded batch, none of a row's padding either): SDPA, the torch path, reads the whole span a
// captured graph was made for, with a mask, and its fused kernel costs ~6.5-8.5 µs a layer at spans of 256 keys on
// the H200, latency rather than bandwidth.
//
// Grid (B·Hkv, R): the R blocks ("ranks") of a (b, h) take its chunks of CHUNK keys in turn (rank r: chunks first + r,
// first + r + R, ...), the first one requested before the programmatic wait (written by earlier steps, except the
// token's own row, which rope_store, the kernel before, writes and which is read again after the wait). A rank keeps
// its chunks' softmax as it goes (running maximum and sum, Σ p·v rescaled as the maximum grows), so the grid depends
// on the batch, the heads and R alone (attention_ops picks R by the span: 8, or 16 past 1024 keys), not on the
// position: a captured graph serves every position of its span. On sm_90 the R ranks are one thread-block cluster
// and merge through distributed shared memory (each rank writes its share of the outputs), with no global workspace,
// fence or counter: the earlier design's merge through L2 cost ~5 µs a layer, 6 % of the 8B's decode step
// (docs/benchmarks.md, session 28). The merge pulls (each owner reads the others' records after a cluster barrier,
// and a second keeps them until all have read) or, with `push` (attention_ops.pushes: at head size 64, and in
// clusters of 16), pushes: each rank stores its pieces into their owners before the one barrier (its wait for the
// cluster's blocks to run is a barrier it arrived at as it started). Before sm_90, R = 1: one block a head walks
// every chunk.
// Scores: ATT_KEY_THREADS threads a key, each with D / ATT_KEY_THREADS of its elements, in the log2 domain (q is scaled
// by log2(e)/√D as it is staged). Then the chunk's maximum and exponential sum per query head, and Σ p·v with a thread
// for 8 adjacent dimensions of a row.
// Keys and values: [B, Hkv, S, D] with rows of D contiguous elements (a cache buffer, or a prefix view of one); q and
// out: [B, Hkv·G, D].
//
// rope_decode_attention (one token of one sequence): q, k and v are still their q/k/v GEMV's unfinished fp32 sums
// (exl2_ops.PendingSums), and the kernel does what finish_rope_store (fused.cu) did in the launch before it: every
// block ends its KV head's sums (their biases read before the wait, the sums and RoPE rows after it in one round
// trip) and rotates them (rotate_values), stages the queries from them, keeps the
// token's key and value in shared memory for whichever rank's chunk holds the token (rank 0 writes them to the
// cache, which no other block of this launch may read back), and rank 0 re-zeroes the sums once every rank has read
// them (after the cluster's first barrier). One launch a layer fewer.
#include "common.cuh"

#define ATT_THREADS 128
#define ATT_KEY_THREADS 4  // threads sharing one key's dot products
#define ATT_MAX_RANKS 16   // blocks a (b, h) at most: the H100/H200's largest cluster (attention_ops.MAX_RANKS)

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// The 8 activations of a 16-byte load, as floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4 raw, float* f) {
    const u32 words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = Act<T>::load((u16)(words[i] & 0xffffu));
        f[2 * i + 1] = Act<T>::load((u16)(words[i] >> 16));
    }
}

// A 16-byte load past L1 (ld.global.cg), kept in place by `volatile`: keys and values are read once, and after the
// programmatic wait a row the kernel before wrote must not come from a stale L1 line. Evict-first in L2: the cache
// outgrows it (common.cuh, load_stream).
__device__ __forceinline__ uint4 load_cg(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.cg.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "l"(evict_first_policy()));
    return v;
}

// ----- thread-block clusters (sm_90): the ranks' records in each other's shared memory -----
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}
// The push merge's first barrier in two halves: every rank arrives as it starts and waits only before its first store
// into another rank's shared memory, by when all have long arrived (a block may be written to only once it runs).
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#endif
}
// The float at `local` in rank `rank`'s copy.
__device__ __forceinline__ float load_rank(const float* local, int rank) {
    float v = 0.0f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("{ .reg .u32 r; mapa.shared::cluster.u32 r, %1, %2; ld.shared::cluster.f32 %0, [r]; }"
                 : "=f"(v) : "r"(shared_address(local)), "r"(rank) : "memory");
#endif
    return v;
}
// v written to `local` in rank `rank`'s copy (no wait for it: the next cluster barrier's release orders it).
__device__ __forceinline__ void store_rank(float* local, int rank, float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("{ .reg .u32 r; mapa.shared::cluster.u32 r, %0, %1; st.shared::cluster.f32 [r], %2; }"
                 :: "r"(shared_address(local)), "r"(rank), "f"(v) : "memory");
#endif
}

// The token's q/k/v sums, their biases (null: none), its RoPE rows and the caches, for rope_decode_attention.
struct NewToken {
    float* q_sums;
    const float* q_bias;
    float* k_sums;
    const float* k_bias;
    float* v_sums;
    const float* v_bias;
    const u16* cos;  // [D]: the token's rows
    const u16* sin;
    u16* keys;  // the kernel's keys and values, written at the token's row
    u16* values;
};

// KV head h's sums of the token re-zeroed, once every block that reads them has (G·D query sums, D key and value).
template <int D, int G>
__device__ __forceinline__ void zero_token_sums(const NewToken& token, int h) {
    for (int i = threadIdx.x; i < G * D; i += ATT_THREADS) token.q_sums[h * G * D + i] = 0.0f;
    for (int i = threadIdx.x; i < D; i += ATT_THREADS) {
        token.k_sums[h * D + i] = 0.0f;
        token.v_sums[h * D + i] = 0.0f;
    }
}

// One output of the cluster's merge: the ranks' Σ p·v weighted by 2^(their maximum - the largest), over their
// exponential sums so weighted. max_of(r), sum_of(r): rank r's maximum and sum for the output's query head;
// value_of(r): its Σ p·v for the output (a rank without chunks: -inf, so weight 0).
template <typename Max, typename Sum, typename Value>
__device__ __forceinline__ float merged(int ranks, Max max_of, Sum sum_of, Value value_of) {
    const float NEG_INF = __int_as_float(0xff800000);
    float maxima[ATT_MAX_RANKS], top = NEG_INF;
#pragma unroll
    for (int r = 0; r < ATT_MAX_RANKS; r++) {
        maxima[r] = r < ranks ? max_of(r) : NEG_INF;
        top = fmaxf(top, maxima[r]);
    }
    float num = 0.0f, den = 0.0f;
#pragma unroll
    for (int r = 0; r < ATT_MAX_RANKS; r++) {
        if (r < ranks) {
            const float w = exp2f(maxima[r] - top);
            num = fmaf(w, value_of(r), num);
            den = fmaf(w, sum_of(r), den);
        }
    }
    return num / den;
}

// decode_attention's body; ROPE: rope_decode_attention's (q null, the token from `token`; batch 1, pad null).
template <typename T, int D, int G, int CHUNK, bool ROPE>
__device__ __forceinline__ void attend_token(
    const u16* __restrict__ q, const u16* __restrict__ keys, const u16* __restrict__ values, int batch_stride,
    int head_stride, int kv_heads, const long long* __restrict__ position, int position_value, int window,
    const long long* __restrict__ pad, float scale_log2, u16* __restrict__ out, bool push, const NewToken& token) {
    static_assert(D == 64 || D == 128, "head sizes 64 and 128");
    static_assert(CHUNK == 32 || CHUNK == 64, "chunks of 32 or 64 keys");
    constexpr int EPT = D / ATT_KEY_THREADS;                  // elements of a key a thread scores: 32 or 16
    constexpr int KLOADS = EPT / 8;                           // its 16-byte loads a key
    constexpr int KEYS_PER_PASS = ATT_THREADS / ATT_KEY_THREADS;  // keys scored at once: 32
    constexpr int PASSES = CHUNK / KEYS_PER_PASS;             // keys a thread scores: 2 or 1
    constexpr int ROW_THREADS = D / 8;                        // threads over one value row: 16 or 8
    constexpr int ROW_GROUPS = ATT_THREADS / ROW_THREADS;     // value rows taken at once: 8 or 16
    constexpr int VROWS = CHUNK / ROW_GROUPS;                 // value rows a thread reads: 2 to 8
    constexpr int QPAD = EPT + 4;                             // the 4 parts of a query row in different banks
    constexpr int WARPS = ATT_THREADS / 32;
    const float NEG_INF = __int_as_float(0xff800000);
    __shared__ __align__(16) float qs[G][ATT_KEY_THREADS][QPAD];
    __shared__ float p[G][CHUNK];
    __shared__ __align__(16) float joined[WARPS][G][D];
    __shared__ float rescale[G];              // this chunk's factor on the sums so far: 2^(old max - new max)
    // The cluster's merge (see the top of this file). Pull: `record` holds the rank's Σ p·v, read with its maximum
    // and sum per query head by the other ranks. Push: `record` holds, as [rank][share], every rank's Σ p·v of this
    // rank's share of the outputs, and the inboxes every rank's maximum and sum.
    __shared__ __align__(16) float record[G][D];
    __shared__ float record_max[G], record_sum[G];  // the rank's running maximum and exponential sum per query head
    __shared__ float inbox_max[ATT_MAX_RANKS][G], inbox_sum[ATT_MAX_RANKS][G];
    __shared__ __align__(16) u16 token_rows[2][ROPE ? D : 8];  // ROPE: the token's rotated key, and its value

    pdl_launch_dependents();
    const int bh = blockIdx.x, rank = blockIdx.y, ranks = gridDim.y;
    const bool pushing = push && ranks > 1;  // the cluster's merge (below)
    if (pushing) cluster_arrive_relaxed();  // this rank runs (its wait: before the merge's stores)
    const int b = bh / kv_heads, h = bh - b * kv_heads, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // The position is a graph input copied in before the step's first (torch) kernel, or a launch argument.
    const int pos = position != nullptr ? (int)*position : position_value;
    // The first key read: the window's, or past the row's left padding (pad: [B] lengths, a graph input too); never
    // past the token itself, which a row sees even where its padding reaches it (as attention.build_mask lets it),
    // so a row of padding alone reads its own key rather than none (a 0 / 0 softmax, NaN in its cache).
    const int start = min(pos, max(pad != nullptr ? (int)pad[b] : 0, window > 0 ? pos - window + 1 : 0));
    const int last = pos / CHUNK;
    int chunk = start / CHUNK + rank;  // the rank's first chunk (none if past the last)

    const size_t base = (size_t)b * batch_stride + (size_t)h * head_stride;
    const uint4* kb = reinterpret_cast<const uint4*>(keys + base);
    const uint4* vb = reinterpret_cast<const uint4*>(values + base);
    const int kt = tid / ATT_KEY_THREADS, part = tid % ATT_KEY_THREADS;
    const int rt = tid % ROW_THREADS, rg = tid / ROW_THREADS;
    uint4 kraw[PASSES][KLOADS], vraw[VROWS];
    const uint4 zero = {0u, 0u, 0u, 0u};
    // The thread's parts of the token's own key and value row: ROPE, from shared memory (written after the wait);
    // else from the cache, where the kernel before wrote them (so read after the wait).
    auto own_key = [&](int key, int w) {  // key == pos
        return ROPE ? reinterpret_cast<const uint4*>(token_rows[0])[part * KLOADS + w]
                    : load_cg(kb + (size_t)key * (D / 8) + part * KLOADS + w);
    };
    auto own_value = [&](int key) {
        return ROPE ? reinterpret_cast<const uint4*>(token_rows[1])[rt] : load_cg(vb + (size_t)key * (D / 8) + rt);
    };
    // Chunk c's keys and values for this thread (zeros outside [start, pos]); ROPE: the token's own row is never
    // read from the cache (rank 0 writes it there in this launch), but from shared memory, once the wait is passed.
    auto load_chunk = [&](int c) {
        const int k0 = c * CHUNK, lo = max(k0, start), hi = min(k0 + CHUNK, pos + 1);
#pragma unroll
        for (int t = 0; t < PASSES; t++) {
            const int key = k0 + t * KEYS_PER_PASS + kt;
#pragma unroll
            for (int w = 0; w < KLOADS; w++) {
                const uint4* from = kb + (size_t)key * (D / 8) + part * KLOADS + w;
                kraw[t][w] = key < lo || key >= hi ? zero : ROPE && key == pos ? own_key(key, w) : load_cg(from);
            }
        }
#pragma unroll
        for (int t = 0; t < VROWS; t++) {
            const int key = k0 + rg + t * ROW_GROUPS;
            const uint4* from = vb + (size_t)key * (D / 8) + rt;
            vraw[t] = key < lo || key >= hi ? zero : ROPE && key == pos ? own_value(key) : load_cg(from);
        }
    };
    if (chunk <= last) load_chunk(chunk);
    if (tid < G) {
        record_max[tid] = NEG_INF;  // a rank without chunks weighs nothing in the merge
        record_sum[tid] = 0.0f;
    }
    // ROPE: thread i ends query pair (j, j + D/2) of head g for i = g·D/2 + j (n = 0, 1, ... a thread: i = tid + n·
    // ATT_THREADS, all with j = tid mod D/2), or past G·D/2 the key's; their biases, weights, are read before the wait.
    constexpr int HALF = D / 2, QPAIRS = G * HALF, PAIRS = QPAIRS + HALF;
    constexpr int ROPE_PASSES = ROPE ? (PAIRS + ATT_THREADS - 1) / ATT_THREADS : 1;
    static_assert(ATT_THREADS % HALF == 0, "a thread's pairs share one column of the cos/sin rows");
    const int j = tid % HALF;
    auto pair_column = [&](int n) {  // of q's outputs (or k's: g == G)
        const int g = (tid + n * ATT_THREADS) / HALF;
        return g == G ? h * D + j : (h * G + g) * D + j;
    };
    float bias1[ROPE_PASSES], bias2[ROPE_PASSES], value_bias = 0.0f;
    if constexpr (ROPE) {
#pragma unroll
        for (int n = 0; n < ROPE_PASSES; n++) {
            const bool is_key = tid + n * ATT_THREADS >= QPAIRS;
            const float* bias = is_key ? token.k_bias : token.q_bias;
            const bool read = tid + n * ATT_THREADS < PAIRS && bias != nullptr;
            bias1[n] = read ? bias[pair_column(n)] : 0.0f;
            bias2[n] = read ? bias[pair_column(n) + HALF] : 0.0f;
        }
        if (tid < D && token.v_bias != nullptr) value_bias = token.v_bias[h * D + tid];
    }
    pdl_wait();
    if constexpr (ROPE) {
        // The token's queries and key from their sums, rotated, and its value; the queries staged as below, the key
        // and value kept for own_key / own_value. Every load first (one round trip), then the arithmetic.
        const size_t row = base + (size_t)pos * D;
        float x1[ROPE_PASSES], x2[ROPE_PASSES];
#pragma unroll
        for (int n = 0; n < ROPE_PASSES; n++) {
            if (tid + n * ATT_THREADS < PAIRS) {
                const float* sums = tid + n * ATT_THREADS >= QPAIRS ? token.k_sums : token.q_sums;
                x1[n] = __ldcg(sums + pair_column(n));
                x2[n] = __ldcg(sums + pair_column(n) + HALF);
            }
        }
        const float value_sum = tid < D ? __ldcg(token.v_sums + h * D + tid) : 0.0f;
        const u16 c1 = token.cos[j], s1 = token.sin[j], c2 = token.cos[j + HALF], s2 = token.sin[j + HALF];
        if (tid < D) {
            const u16 value = Act<T>::store(value_sum + value_bias);  // as ended_sum
            token_rows[1][tid] = value;
            if (rank == 0) token.values[row + tid] = value;
        }
#pragma unroll
        for (int n = 0; n < ROPE_PASSES; n++) {
            const int i = tid + n * ATT_THREADS;
            if (i < PAIRS) {
                const bool is_key = i >= QPAIRS;
                const int g = i / HALF;
                u16 r1, r2;
                rotate_values<T>(Act<T>::load(Act<T>::store(x1[n] + bias1[n])),
                                 Act<T>::load(Act<T>::store(x2[n] + bias2[n])), c1, s1, c2, s2, r1, r2);
                if (is_key) {
                    token_rows[0][j] = r1;
                    token_rows[0][j + HALF] = r2;
                    if (rank == 0) {
                        token.keys[row + j] = r1;
                        token.keys[row + j + HALF] = r2;
                    }
                } else {
                    qs[g][j / EPT][j % EPT] = Act<T>::load(r1) * scale_log2;
                    qs[g][(j + HALF) / EPT][(j + HALF) % EPT] = Act<T>::load(r2) * scale_log2;
                }
            }
        }
        __syncthreads();  // token_rows and qs written
        timeline_mark(0);
    }
    if (chunk == last) {  // the token's own key and value (the kernel before wrote them, or ROPE: just above)
        const int k0 = chunk * CHUNK;
#pragma unroll
        for (int t = 0; t < PASSES; t++) {
            const int key = k0 + t * KEYS_PER_PASS + kt;
            if (key == pos) {
#pragma unroll
                for (int w = 0; w < KLOADS; w++) kraw[t][w] = own_key(key, w);
            }
        }
#pragma unroll
        for (int t = 0; t < VROWS; t++) {
            const int key = k0 + rg + t * ROW_GROUPS;
            if (key == pos) vraw[t] = own_value(key);
        }
    }
    if constexpr (!ROPE) {  // (ROPE: staged above)
        for (int i = tid; i < G * D; i += ATT_THREADS) {
            const int g = i / D, e = i - g * D;
            qs[g][e / EPT][e % EPT] = Act<T>::load(__ldcg(q + (size_t)bh * G * D + i)) * scale_log2;
        }
    }
    float acc[G][8];  // Σ p·v of the thread's 8 dimensions over its value rows, in the rank's running maximum's scale
#pragma unroll
    for (int g = 0; g < G; g++) {
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = 0.0f;
    }
    if constexpr (!ROPE) __syncthreads();  // qs written (ROPE: staged before the barrier above)

    for (; chunk <= last; chunk += ranks) {
        const int k0 = chunk * CHUNK, lo = max(k0, start), hi = min(k0 + CHUNK, pos + 1);
        // Scores: this thread's part of PASSES keys against every query head, then the parts' sums joined.
        float dot[PASSES][G];
#pragma unroll
        for (int t = 0; t < PASSES; t++) {
#pragma unroll
            for (int g = 0; g < G; g++) dot[t][g] = 0.0f;
        }
#pragma unroll
        for (int w = 0; w < KLOADS; w++) {
            float k[PASSES][8];
#pragma unroll
            for (int t = 0; t < PASSES; t++) unpack8<T>(kraw[t][w], k[t]);
#pragma unroll
            for (int g = 0; g < G; g++) {
#pragma unroll
                for (int e4 = 0; e4 < 2; e4++) {
                    const float4 qv = *reinterpret_cast<const float4*>(&qs[g][part][w * 8 + e4 * 4]);
#pragma unroll
                    for (int t = 0; t < PASSES; t++) {
                        float d = dot[t][g];
                        d = fmaf(k[t][e4 * 4], qv.x, d);
                        d = fmaf(k[t][e4 * 4 + 1], qv.y, d);
                        d = fmaf(k[t][e4 * 4 + 2], qv.z, d);
                        dot[t][g] = fmaf(k[t][e4 * 4 + 3], qv.w, d);
                    }
                }
            }
        }
#pragma unroll
        for (int t = 0; t < PASSES; t++) {
            const int j = t * KEYS_PER_PASS + kt, key = k0 + j;
#pragma unroll
            for (int g = 0; g < G; g++) {
                float d = dot[t][g];
#pragma unroll
                for (int offset = 1; offset < ATT_KEY_THREADS; offset <<= 1) d += __shfl_xor_sync(0xffffffffu, d, offset);
                if (part == 0) p[g][j] = key >= lo && key < hi ? d : NEG_INF;
            }
        }
        __syncthreads();

        // The softmax pieces per query head (the chunk has at least one key): warp w takes heads w, w + WARPS, ...
        for (int g = warp; g < G; g += WARPS) {
            const float before = record_max[g];
            float m, s;
            if (CHUNK == 64) {  // two keys a lane
                const float a = p[g][lane], c = p[g][lane + 32];
                m = fmaxf(before, warp_max(fmaxf(a, c)));
                const float ea = exp2f(a - m), ec = exp2f(c - m);
                p[g][lane] = ea;
                p[g][lane + 32] = ec;
                s = warp_sum(ea + ec);
            } else {  // one
                const float a = p[g][lane];
                m = fmaxf(before, warp_max(a));
                const float ea = exp2f(a - m);
                p[g][lane] = ea;
                s = warp_sum(ea);
            }
            if (lane == 0) {
                const float factor = exp2f(before - m);  // 0 at the rank's first chunk (before = -inf)
                rescale[g] = factor;
                record_max[g] = m;
                record_sum[g] = fmaf(record_sum[g], factor, s);
            }
        }
        // The next chunk's loads go out before this one's Σ p·v (its values are in registers already: vraw).
        uint4 vnow[VROWS];
#pragma unroll
        for (int t = 0; t < VROWS; t++) vnow[t] = vraw[t];
        if (chunk + ranks <= last) load_chunk(chunk + ranks);
        __syncthreads();

        // Σ p·v: 8 dimensions of VROWS rows a thread, on top of the earlier chunks' sums rescaled.
#pragma unroll
        for (int g = 0; g < G; g++) {
            const float factor = rescale[g];
#pragma unroll
            for (int e = 0; e < 8; e++) acc[g][e] *= factor;
        }
#pragma unroll
        for (int t = 0; t < VROWS; t++) {
            float v[8];
            unpack8<T>(vnow[t], v);
            const int j = rg + t * ROW_GROUPS;
#pragma unroll
            for (int g = 0; g < G; g++) {
                const float pw = p[g][j];
#pragma unroll
                for (int e = 0; e < 8; e++) acc[g][e] = fmaf(pw, v[e], acc[g][e]);
            }
        }
        if (chunk + ranks <= last) __syncthreads();  // p and rescale are the next chunk's (the join uses neither)
    }

    timeline_mark(1);  // the scores, softmax and Σ p·v of the rank's chunks done
    // The row groups joined (in the warp, then across warps): the rank's record.
#pragma unroll
    for (int g = 0; g < G; g++) {
#pragma unroll
        for (int e = 0; e < 8; e++) {
#pragma unroll
            for (int offset = ROW_THREADS; offset < 32; offset <<= 1)
                acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], offset);
        }
    }
    if (lane < ROW_THREADS) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            float4* to = reinterpret_cast<float4*>(&joined[warp][g][rt * 8]);
            to[0] = float4{acc[g][0], acc[g][1], acc[g][2], acc[g][3]};
            to[1] = float4{acc[g][4], acc[g][5], acc[g][6], acc[g][7]};
        }
    }
    __syncthreads();
    u16* to = out + (size_t)bh * G * D;
    // Rank r owns outputs [r·share, (r + 1)·share): D is 64 or 128 and ranks a power of two up to 16, so it divides.
    const int share = G * D / ranks;
    float* inbox = &record[0][0];  // push: [rank][share]
    if (pushing) cluster_wait();  // every rank runs: each arrived as it started, so this returns at once
    for (int i = tid; i < G * D; i += ATT_THREADS) {
        const int g = i / D, d = i - g * D;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) sum += joined[w][g][d];
        if (ranks == 1) to[i] = Act<T>::store(sum / record_sum[g]);
        else if (pushing) store_rank(&inbox[rank * share + i % share], i / share, sum);
        else record[g][d] = sum;
    }
    if (ranks == 1) {
        if (ROPE) zero_token_sums<D, G>(token, h);  // read before the barrier above
        return;
    }
    if (pushing) {
        for (int t = tid; t < ranks * G; t += ATT_THREADS) {
            const int owner = t / G, g = t - owner * G;
            store_rank(&inbox_max[rank][g], owner, record_max[g]);
            store_rank(&inbox_sum[rank][g], owner, record_sum[g]);
        }
    }

    // The merge of this rank's share.
    cluster_sync();  // every rank's record (push: every piece) is in place, and ROPE: every rank has read the sums
    timeline_mark(2);
    if (ROPE && rank == 0) zero_token_sums<D, G>(token, h);
    for (int x = tid; x < share; x += ATT_THREADS) {
        const int i = rank * share + x, g = i / D, d = i - g * D;
        to[i] = Act<T>::store(
            pushing ? merged(ranks, [&](int r) { return inbox_max[r][g]; }, [&](int r) { return inbox_sum[r][g]; },
                             [&](int r) { return inbox[r * share + x]; })
                    : merged(ranks, [&](int r) { return load_rank(&record_max[g], r); },
                             [&](int r) { return load_rank(&record_sum[g], r); },
                             [&](int r) { return load_rank(&record[g][d], r); }));
    }
    if (!pushing) cluster_sync();  // (pull) no rank leaves while another still reads its shared memory
}

template <typename T, int D, int G, int CHUNK>
__global__ void __launch_bounds__(ATT_THREADS) decode_attention(
    const u16* __restrict__ q, const u16* __restrict__ keys, const u16* __restrict__ values, int batch_stride,
    int head_stride, int kv_heads, const long long* __restrict__ position, int position_value, int window,
    const long long* __restrict__ pad, float scale_log2, u16* __restrict__ out, int push) {
    attend_token<T, D, G, CHUNK, false>(q, keys, values, batch_stride, head_stride, kv_heads, position, position_value,
                                        window, pad, scale_log2, out, push != 0, NewToken{});
}

// decode_attention of one token of one sequence (grid (Hkv, R)) whose q, k and v are still their GEMV's sums: the
// RoPE and the cache write of finish_rope_store in the same launch (see the top of this file).
template <typename T, int D, int G, int CHUNK>
__global__ void __launch_bounds__(ATT_THREADS) rope_decode_attention(
    float* __restrict__ q_sums, const float* __restrict__ q_bias, float* __restrict__ k_sums,
    const float* __restrict__ k_bias, float* __restrict__ v_sums, const float* __restrict__ v_bias,
    const u16* __restrict__ cos, const u16* __restrict__ sin, u16* keys, u16* values, int head_stride, int kv_heads,
    const long long* __restrict__ position, int position_value, int window, float scale_log2, u16* __restrict__ out,
    int push) {
    const NewToken token{q_sums, q_bias, k_sums, k_bias, v_sums, v_bias, cos, sin, keys, values};
    attend_token<T, D, G, CHUNK, true>(nullptr, keys, values, 0, head_stride, kv_heads, position, position_value,
                                       window, nullptr, scale_log2, out, push != 0, token);
}
