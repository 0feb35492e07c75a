// Greedy sampling: the index of each row's largest logit, as torch.argmax gives it (the first index among equal
// maxima, NaN above everything, -0 equal to +0). torch's reduction takes ~26 µs for one row of 128256 logits on the
// H200 (8.5 µs for 151936: it splits rows differently), a whole percent of an 8B decode step. Here one block of 1024
// threads takes a row (just written: in L2) with several loads in flight a thread. A thread keeps its best value and
// index with one compare a value (its indices grow, so a strictly larger value alone replaces the best: the first of
// equal maxima stays); the threads' bests are then joined as 64-bit keys, (order-preserving bits of the float) << 32
// | (0xffffffff - index), whose maximum is the largest value at the smallest index.
#include "common.cuh"

#define ARGMAX_THREADS 1024
#define ARGMAX_UNROLL 4  // 16-byte loads a thread keeps in flight

typedef unsigned long long u64;

__device__ __forceinline__ u64 argmax_key(float f, u32 index) {
    if (f == 0.0f) f = 0.0f;  // -0 ties with +0
    const u32 bits = __float_as_uint(f);
    const u32 ordered = f != f ? 0xffffffffu : bits ^ ((bits >> 31) ? 0xffffffffu : 0x80000000u);
    return ((u64)ordered << 32) | (u64)(0xffffffffu - index);
}

__device__ __forceinline__ u64 max_u64(u64 a, u64 b) { return a > b ? a : b; }

// logits: [rows, row_stride] with the first `vocab` of each row read; vocab a multiple of 8 and rows 16-byte aligned
// (sampling_ops.applies). out: int64 [rows].
template <typename T>
__global__ void __launch_bounds__(ARGMAX_THREADS) argmax_rows(
    const u16* __restrict__ logits, int row_stride, int vocab, long long* __restrict__ out) {
    __shared__ u64 warp_best[ARGMAX_THREADS / 32];
    pdl_launch_dependents();
    pdl_wait();
    const int row = blockIdx.x, tid = threadIdx.x;
    const uint4* x = reinterpret_cast<const uint4*>(logits + (size_t)row * row_stride);
    const int vectors = vocab / 8;
    float best = __int_as_float(0xff800000);  // -inf: replaced by anything larger, and by NaN below
    int best_index = -1;                      // none yet (a row of -inf leaves it to the join: index 0)
    for (int v0 = tid; v0 < vectors; v0 += ARGMAX_THREADS * ARGMAX_UNROLL) {
        uint4 raw[ARGMAX_UNROLL];
#pragma unroll
        for (int u = 0; u < ARGMAX_UNROLL; u++) {
            const int v = v0 + u * ARGMAX_THREADS;
            raw[u] = v < vectors ? __ldcg(x + v) : uint4{0u, 0u, 0u, 0u};
        }
#pragma unroll
        for (int u = 0; u < ARGMAX_UNROLL; u++) {
            const int v = v0 + u * ARGMAX_THREADS;
            if (v >= vectors) break;
            const u32 words[4] = {raw[u].x, raw[u].y, raw[u].z, raw[u].w};
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const float f = Act<T>::load((u16)((words[i / 2] >> (16 * (i % 2))) & 0xffffu));
                if (f > best || (f != f && best == best)) {  // larger, or the first NaN
                    best = f;
                    best_index = v * 8 + i;
                }
            }
        }
    }
    u64 key = best_index < 0 ? 0 : argmax_key(best, (u32)best_index);  // 0: below every key (-inf's is 0x007fffff...)
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) key = max_u64(key, __shfl_xor_sync(0xffffffffu, key, offset));
    if ((tid & 31) == 0) warp_best[tid >> 5] = key;
    __syncthreads();
    if (tid < 32) {
        key = warp_best[tid];
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) key = max_u64(key, __shfl_xor_sync(0xffffffffu, key, offset));
        if (tid == 0) out[row] = key == 0 ? 0 : (long long)(0xffffffffu - (u32)(key & 0xffffffffu));
    }
}
