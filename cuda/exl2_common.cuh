// What the EXL2 GEMV kernels share (exl2_matmul.cu: one column a thread; exl2_mma.cu: tensor cores): the
// launch geometry, the matrix descriptors the host fills, the scale decode and the split-K epilogue.
#pragma once
#include "common.cuh"

#define THREADS 128        // threads a block; also the columns of a block's tile
#define SPLIT_ROWS 256     // at most this many stored rows per K split (x slice in shared memory; see GROUP_SPLIT_ROWS)

// The constants OR-ed onto codes (0x4B000000: 2^23 in fp32; 0x64006400: 1024 in both fp16 halves), held
// in registers the compiler cannot prove constant. LOP3 takes one immediate: with both the mask and the
// constant known, ptxas keeps the constant as the immediate and re-creates the mask with a MOV for every
// code or pair (the 4-bit pair decode took 4 instructions instead of 2; see docs/benchmarks.md, session 8).
struct Magic {
    u32 two23, h1024;
    __device__ __forceinline__ explicit Magic(int nonnegative)
        : two23(0x4B000000u | ((u32)nonnegative >> 31)), h1024(0x64006400u | ((u32)nonnegative >> 31)) {}
};

// CALL(B) for a chunk's width B, one of 2, 3, 4, 5, 6, 8 (the kernels' code per width is a template on it; a macro,
// as NVRTC compiles no device lambdas without --extended-lambda).
#define WITH_WIDTH(bits, CALL)      \
    switch (bits) {                 \
        case 8: CALL(8); break;     \
        case 6: CALL(6); break;     \
        case 5: CALL(5); break;     \
        case 4: CALL(4); break;     \
        case 3: CALL(3); break;     \
        default: CALL(2); break;    \
    }

// Sums added into the fp32 workspace, 2 or 4 adjacent floats (8- or 16-byte aligned) at once: on sm_90 and newer one
// vector reduction (red.global.v2/v4.f32.add), one L2 atomic operation instead of 2 or 4; scalar atomics before.
// Why: a split-K GEMV adds K/split partial sums a column and row; at 8 rows 4096x14336 makes 1.8 million atomics,
// and their rate (~150 a ns on the H200) bounded the tensor-core kernel (docs/benchmarks.md, session 33).
__device__ __forceinline__ void add_pair(float* at, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.v2.f32.add [%0], {%1, %2};" ::"l"(at), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(at, a);
    atomicAdd(at + 1, b);
#endif
}
__device__ __forceinline__ void add_quad(float* at, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.v4.f32.add [%0], {%1, %2, %3, %4};" ::"l"(at), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
                 : "memory");
#else
    atomicAdd(at, v.x);
    atomicAdd(at + 1, v.y);
    atomicAdd(at + 2, v.z);
    atomicAdd(at + 3, v.w);
#endif
}

// Effective scale of (group g, column n) before the format's fp16 rounding: c^2 * M_g, c = nibble + 1.
__device__ __forceinline__ float column_scale(const u32* __restrict__ q_scale, const float* __restrict__ scale_max,
                                              int g, int n, int n_pad) {
    const u32 word = load_stream(q_scale + (size_t)g * (n_pad >> 3) + (n >> 3));
    const float c = (float)(((word >> ((n & 7) * 4)) & 15u) + 1u);
    return c * c * __ldg(scale_max + g);
}

// One matrix of a GEMV launch. A launch computes up to MAX_GROUP products of the same activations
// (e.g. q/k/v or gate/up: one launch instead of three or two); each matrix keeps its own tables,
// permutation, workspace slice, tile counters and output. Mirrored by exl2_ops.GemvMatrix.
#define MAX_GROUP 4
struct GemvMatrix {
    const u32* q_weight;
    const u32* q_scale;
    const float* scale_max;
    const int4* chunks;
    const int* split_chunks;
    const int* perm;        // exl2_matmul.cu: stored row -> input channel; exl2_mma.cu: its gather table
    const float* bias;      // null: no bias
    float* workspace;       // [M, n_pad] fp32 partial sums, zero between launches
    int* counters;          // [tiles], zero between launches; null (exl2_matmul.cu): exl2_finish ends the product
    u16* y;                 // [M, N]
    int N, n_pad, tiles, splits, block0;  // block0: this matrix's first block in a group launch
};
struct GemvGroup {
    GemvMatrix m[MAX_GROUP];
    int count;
};
// The host fills these byte for byte (ctypes); tests/test_kernel_compile.py checks that its sizes are these and
// its fields are these, in this order. (No offsetof: the NVRTC of CUDA 13.0 rejects __builtin_offsetof.)
static_assert(sizeof(GemvMatrix) == 104, "see exl2_ops.GemvMatrix");
static_assert(sizeof(GemvGroup) == 424, "see exl2_ops.GemvGroup");

// The end of a K split, when several blocks share a column tile: the block's partial sums are already added
// into the fp32 workspace; the last block of the tile to finish writes y (+bias) for the tile's THREADS·C columns
// and re-zeroes the workspace and its counter, so one launch does the whole product and leaves the workspace clean.
template <typename T, int M, int C = 1>
__device__ __forceinline__ void finish_split(const GemvMatrix& mat, int tile) {
    __shared__ int is_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(mat.counters + tile, 1) == mat.splits - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    const int N = mat.N;
#pragma unroll
    for (int i = 0; i < C; i++) {
        const int n = (tile * C + i) * THREADS + threadIdx.x;
        if (n < mat.n_pad) {
            const float b = mat.bias != nullptr ? mat.bias[n] : 0.0f;
#pragma unroll
            for (int m = 0; m < M; m++) {
                float* slot = mat.workspace + (size_t)m * mat.n_pad + n;
                const float v = __ldcg(slot);
                *slot = 0.0f;
                if (n < N) mat.y[(size_t)m * N + n] = Act<T>::store(v + b);
            }
        }
    }
    if (threadIdx.x == 0) mat.counters[tile] = 0;
}
