// One-token attention over a KV cache (the decode step): out = softmax(q·kᵀ/√D) v for every query head. The G query
// heads of a KV head share its keys' and values' loads, and only keys from the window's start to the token's position
// are read: SDPA, the torch path, reads the whole span a captured graph was made for, with a mask, and its fused
// kernel costs ~6.5-8.5 µs a layer at spans of 256 keys on the H200, latency rather than bandwidth.
//
// Block (b·Hkv + h, c) takes keys [c·CHUNK, (c + 1)·CHUNK): 64, or 32 where 64 would make few blocks (attention_ops:
// Qwen2.5-0.5B's two KV heads at a 256-key span make 8). It requests its keys and values before the
// programmatic wait: they were written by earlier steps, except the token's own row, which the kernel before this one
// (rope_store) writes and which is read again after the wait, past L1. Scores: ATT_KEY_THREADS threads a key, each
// with D / ATT_KEY_THREADS of its elements, in the log2 domain (q is scaled by log2(e)/√D as it is staged). Then the
// chunk's maximum and exponential sum per query head, and Σ p·v with a thread for 8 adjacent dimensions of a row.
// A lone chunk with keys writes out; several leave (Σ p·v, maximum, sum) per query head in an fp32 workspace, and the
// last block of a (b, h) to finish (a counter, as in the GEMV's split K) merges them, with the loads of a few chunks
// in flight at once, and re-zeroes the counter. The blocks of chunks past the position (a graph's span is a bucket,
// up to twice the keys) or before the window return at once: the counter and the merge count the chunks with keys.
// Keys and values: [B, Hkv, S, D] with rows of D contiguous elements (a cache buffer, or a prefix view of one); q and
// out: [B, Hkv·G, D].
#include "common.cuh"

#define ATT_THREADS 128
#define ATT_KEY_THREADS 4  // threads sharing one key's dot products
#define ATT_MAX_SPAN 8192  // keys a launch may cover (attention_ops.MAX_SPAN)

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

// A 16-byte load past L1 (ld.global.cg), kept in place by `volatile`: after the programmatic wait, it re-reads a row
// the kernel before wrote, whose stale copy an earlier load may have left in L1.
__device__ __forceinline__ uint4 load_cg(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

template <typename T, int D, int G, int CHUNK>
__global__ void __launch_bounds__(ATT_THREADS) decode_attention(
    const u16* __restrict__ q, const u16* __restrict__ keys, const u16* __restrict__ values, int batch_stride,
    int head_stride, int kv_heads, const long long* __restrict__ position, int position_value, int window,
    float scale_log2, float* __restrict__ partial, int* __restrict__ counters, u16* __restrict__ out) {
    static_assert(D == 64 || D == 128, "head sizes 64 and 128");
    static_assert(CHUNK == 32 || CHUNK == 64, "chunks of 32 or 64 keys");
    constexpr int EPT = D / ATT_KEY_THREADS;                  // elements of a key a thread scores: 32 or 16
    constexpr int KLOADS = EPT / 8;                           // its 16-byte loads a key
    constexpr int KEYS_PER_PASS = ATT_THREADS / ATT_KEY_THREADS;  // keys scored at once: 32
    constexpr int PASSES = CHUNK / KEYS_PER_PASS;             // keys a thread scores: 2 or 1
    constexpr int ROW_THREADS = D / 8;                        // threads over one value row: 16 or 8
    constexpr int ROW_GROUPS = ATT_THREADS / ROW_THREADS;     // value rows taken at once: 8 or 16
    constexpr int VROWS = CHUNK / ROW_GROUPS;                 // value rows a thread reads: 2 to 8
    constexpr int MAX_CHUNKS = ATT_MAX_SPAN / CHUNK;
    constexpr int QPAD = EPT + 4;                             // the 4 parts of a query row in different banks
    constexpr int RECORD = D + 2;                             // a chunk's record per query head: Σ p·v, max, sum
    constexpr int WARPS = ATT_THREADS / 32;
    const float NEG_INF = __int_as_float(0xff800000);
    __shared__ __align__(16) float qs[G][ATT_KEY_THREADS][QPAD];
    __shared__ float p[G][CHUNK];
    __shared__ __align__(16) float joined[WARPS][G][D];
    __shared__ float stats[G][2];
    __shared__ float weight[MAX_CHUNKS][G];  // the merge's chunk weights
    __shared__ int is_last;

    pdl_launch_dependents();
    const int bh = blockIdx.x, chunk = blockIdx.y, chunks = gridDim.y;
    const int b = bh / kv_heads, h = bh - b * kv_heads, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // The position is a graph input copied in before the step's first (torch) kernel, or a launch argument.
    const int pos = position != nullptr ? (int)*position : position_value;
    const int start = window > 0 ? max(0, pos - window + 1) : 0;  // the first key read
    const int first = start / CHUNK, last = min(chunks - 1, pos / CHUNK), parts = last - first + 1;  // chunks with keys
    if (chunk < first || chunk > last) return;  // past the position (a graph's span is a bucket) or before the window
    const int k0 = chunk * CHUNK;
    const int lo = max(k0, start), hi = min(k0 + CHUNK, pos + 1);  // keys [lo, hi): at least one
    float* record = partial + ((size_t)bh * chunks + chunk) * G * RECORD;

    const size_t base = (size_t)b * batch_stride + (size_t)h * head_stride + (size_t)k0 * D;
    const uint4* kb = reinterpret_cast<const uint4*>(keys + base);
    const uint4* vb = reinterpret_cast<const uint4*>(values + base);
    const int kt = tid / ATT_KEY_THREADS, part = tid % ATT_KEY_THREADS;
    const int rt = tid % ROW_THREADS, rg = tid / ROW_THREADS;
    uint4 kraw[PASSES][KLOADS], vraw[VROWS];
    const uint4 zero = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int t = 0; t < PASSES; t++) {
        const int key = k0 + t * KEYS_PER_PASS + kt;
#pragma unroll
        for (int w = 0; w < KLOADS; w++)
            kraw[t][w] = key >= lo && key < hi ? kb[(size_t)(key - k0) * (D / 8) + part * KLOADS + w] : zero;
    }
#pragma unroll
    for (int t = 0; t < VROWS; t++) {
        const int key = k0 + rg + t * ROW_GROUPS;
        vraw[t] = key >= lo && key < hi ? vb[(size_t)(key - k0) * (D / 8) + rt] : zero;
    }
    pdl_wait();
    // The token's own key and value, just written by the kernel before: read again, from L2.
#pragma unroll
    for (int t = 0; t < PASSES; t++) {
        const int key = k0 + t * KEYS_PER_PASS + kt;
        if (key == pos) {
#pragma unroll
            for (int w = 0; w < KLOADS; w++) kraw[t][w] = load_cg(kb + (size_t)(key - k0) * (D / 8) + part * KLOADS + w);
        }
    }
#pragma unroll
    for (int t = 0; t < VROWS; t++) {
        const int key = k0 + rg + t * ROW_GROUPS;
        if (key == pos) vraw[t] = load_cg(vb + (size_t)(key - k0) * (D / 8) + rt);
    }
    for (int i = tid; i < G * D; i += ATT_THREADS) {
        const int g = i / D, e = i - g * D;
        qs[g][e / EPT][e % EPT] = Act<T>::load(__ldcg(q + (size_t)bh * G * D + i)) * scale_log2;
    }
    __syncthreads();

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

    // The chunk's softmax pieces per query head (at least one key is in it): warp w takes heads w, w + WARPS, ...
    for (int g = warp; g < G; g += WARPS) {
        float m, s;  // each size written out: a loop over CHUNK / 32 keys a lane compiled the 64-key kernel
                     // differently from the GPU-measured one
        if (CHUNK == 64) {  // two keys a lane
            const float a = p[g][lane], c = p[g][lane + 32];
            m = warp_max(fmaxf(a, c));
            const float ea = exp2f(a - m), ec = exp2f(c - m);
            p[g][lane] = ea;
            p[g][lane + 32] = ec;
            s = warp_sum(ea + ec);
        } else {  // one
            const float a = p[g][lane];
            m = warp_max(a);
            const float ea = exp2f(a - m);
            p[g][lane] = ea;
            s = warp_sum(ea);
        }
        if (lane == 0) {
            stats[g][0] = m;
            stats[g][1] = s;
        }
    }
    __syncthreads();

    // Σ p·v: 8 dimensions of VROWS rows a thread, then the row groups joined (in the warp, then across warps).
    float acc[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = 0.0f;
    }
#pragma unroll
    for (int t = 0; t < VROWS; t++) {
        float v[8];
        unpack8<T>(vraw[t], v);
        const int j = rg + t * ROW_GROUPS;
#pragma unroll
        for (int g = 0; g < G; g++) {
            const float pw = p[g][j];
#pragma unroll
            for (int e = 0; e < 8; e++) acc[g][e] = fmaf(pw, v[e], acc[g][e]);
        }
    }
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
    for (int i = tid; i < G * D; i += ATT_THREADS) {
        const int g = i / D, d = i - g * D;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) sum += joined[w][g][d];
        if (parts == 1) out[(size_t)bh * G * D + i] = Act<T>::store(sum / stats[g][1]);
        else record[g * RECORD + d] = sum;
    }
    if (parts == 1) return;
    if (tid < G) {
        record[tid * RECORD + D] = stats[tid][0];
        record[tid * RECORD + D + 1] = stats[tid][1];
    }

    // The last block of this (b, h) to finish merges the chunks: weights 2^(m_c - max m) on their sums and outputs.
    __threadfence();
    __syncthreads();
    if (tid == 0) is_last = atomicAdd(counters + bh, 1) == parts - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    const float* records = partial + (size_t)bh * chunks * G * RECORD;
    for (int g = warp; g < G; g += WARPS) {  // warp w: heads w, w + WARPS, ...; a lane a chunk
        float top = NEG_INF;
        for (int c = first + lane; c <= last; c += 32)
            top = fmaxf(top, __ldcg(records + ((size_t)c * G + g) * RECORD + D));
        top = warp_max(top);
        float sum = 0.0f;
        for (int c = first + lane; c <= last; c += 32) {
            const float* r = records + ((size_t)c * G + g) * RECORD;
            const float w = exp2f(__ldcg(r + D) - top);
            weight[c][g] = w;
            sum = fmaf(__ldcg(r + D + 1), w, sum);
        }
        sum = warp_sum(sum);
        if (lane == 0) stats[g][1] = sum;
    }
    __syncthreads();
    // A thread's OUTS outputs over MERGE_BATCH chunks at a time: all those loads in flight together.
    constexpr int OUTS = (G * D + ATT_THREADS - 1) / ATT_THREADS, MERGE_BATCH = 4;
    float merged[OUTS];
#pragma unroll
    for (int o = 0; o < OUTS; o++) merged[o] = 0.0f;
    for (int c0 = first; c0 <= last; c0 += MERGE_BATCH) {
        float part[MERGE_BATCH][OUTS];
#pragma unroll
        for (int u = 0; u < MERGE_BATCH; u++) {
#pragma unroll
            for (int o = 0; o < OUTS; o++) {
                const int i = tid + o * ATT_THREADS, c = c0 + u;
                part[u][o] = c <= last && i < G * D ? __ldcg(records + ((size_t)c * G + i / D) * RECORD + i % D) : 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < MERGE_BATCH; u++) {
#pragma unroll
            for (int o = 0; o < OUTS; o++) {
                const int i = tid + o * ATT_THREADS, c = c0 + u;
                if (c <= last && i < G * D) merged[o] = fmaf(weight[c][i / D], part[u][o], merged[o]);
            }
        }
    }
#pragma unroll
    for (int o = 0; o < OUTS; o++) {
        const int i = tid + o * ATT_THREADS;
        if (i < G * D) out[(size_t)bh * G * D + i] = Act<T>::store(merged[o] / stats[i / D][1]);
    }
    if (tid == 0) counters[bh] = 0;
}
