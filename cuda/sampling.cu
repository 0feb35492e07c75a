// Greedy sampling: the index of each row's largest logit, as torch.argmax gives it (the first index among equal
// maxima, NaN above everything, -0 equal to +0). One block of 1024 threads a row, all its loads in flight. On the
// H200 (GPU time in a CUDA graph): 14.4 µs for the 8B's 128256 logits against torch's 26.4, but 16.9 µs for
// Qwen2.5's 151936 against torch's 8.5: the 64-bit key compare of every value makes one SM compute-bound
// (bench/patches/argmax-one-compare.patch, not GPU-run: one float compare a value, keys only to join the threads).
//
// Each value becomes a 64-bit key, (order-preserving bits of the float) << 32 | (0xffffffff - index), so one maximum
// over the keys gives the largest value and, among equal ones, the smallest index.
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
    u64 best = 0;  // below every key: argmax_key's ordered part is at least 0x007fffff (-inf)
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
                const u16 bits = (u16)((words[i / 2] >> (16 * (i % 2))) & 0xffffu);
                best = max_u64(best, argmax_key(Act<T>::load(bits), (u32)(v * 8 + i)));
            }
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) best = max_u64(best, __shfl_xor_sync(0xffffffffu, best, offset));
    if ((tid & 31) == 0) warp_best[tid >> 5] = best;
    __syncthreads();
    if (tid < 32) {
        best = warp_best[tid];
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) best = max_u64(best, __shfl_xor_sync(0xffffffffu, best, offset));
        if (tid == 0) out[row] = (long long)(0xffffffffu - (u32)(best & 0xffffffffu));
    }
}
