// Element-wise pieces of the decode step that torch would run as several kernels each:
// residual add + RMSNorm (one read of the row, one write of each output) and SiLU(gate) * up.
// Rounding follows the torch reference path (exlq/runtime/layers.py) step by step.
#include "common.cuh"

// new_residual = residual + delta (float32; skipped when delta is null), out = weight * T(x / rms(x)); with `order`
// (int32 [hidden], else null), output i is that output's channel order[i]: the norm's output in the stored row order
// of the GEMVs that read it (layers.RMSNorm.put_output_in_order), launched with hidden * 4 bytes of dynamic shared
// memory.
// One block per row, blockDim.x a multiple of 32 (at most 1024) with hidden <= NORM_PER_THREAD * blockDim.x:
// each thread keeps its values (and weights) in registers, so the row is read once and every load is in
// flight before the reduction (a decode step runs this once per row: latency is all it costs).
#define NORM_PER_THREAD 16
// Rows longer than 7936 take 1024 threads, whose registers must fit an SM's 65536: unbounded, sm_80 and sm_89 give
// this kernel 80 a thread and such a launch fails ("too many resources requested"). Bounded there (64, a few bytes
// of spill); sm_90 takes 54 unbounded, and its code stays as measured.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define NORM_BOUNDS __launch_bounds__(1024)
#else
#define NORM_BOUNDS
#endif
// SUMS (one row; delta null): the delta is a one-row GEMV's unfinished fp32 sums (its workspace, the split-K products
// added by atomics), ended here as exl2_finish ends them, T(sums + bias), and re-zeroed up to n_pad, with the `extra`
// sums its input was gathered from (exl2_finish's `extra`).
template <typename T, bool SUMS>
__device__ __forceinline__ void norm_row(const float* __restrict__ residual, const u16* __restrict__ delta,
                                         const u16* __restrict__ weight, float* __restrict__ new_residual,
                                         u16* __restrict__ out, int hidden, float eps, float* __restrict__ sums,
                                         const float* __restrict__ bias, int n_pad, float* __restrict__ extra,
                                         int extra_count, const int* __restrict__ order) {
    __shared__ float partial[32];
    pdl_launch_dependents();
    // output i: channel i, or (order) channel order[i]: the row staged in shared memory and gathered from it there,
    // through the order, which (a constant) is staged beside it while the kernel before still runs
    extern __shared__ u16 staged_row[];  // with an order: [hidden] T, then [hidden] the order (hidden < 65536)
    u16* staged_order = staged_row + hidden;
    if (order != nullptr) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) staged_order[i] = (u16)__ldg(order + i);
    }
    pdl_wait();
    if (SUMS) zero_floats(extra, extra_count);
    const size_t base = (size_t)blockIdx.x * hidden;
    float v[NORM_PER_THREAD];
    u16 w[NORM_PER_THREAD];
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        v[j] = 0.0f;
        w[j] = 0;
        if (i < hidden) {
            v[j] = residual[base + i];
            if (SUMS) v[j] += Act<T>::load(ended_sum<T>(__ldcg(sums + i), bias, i));
            else if (delta != nullptr) v[j] += Act<T>::load(delta[base + i]);
            w[j] = weight[i];
        }
    }
    float sum_sq = 0.0f;
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if ((SUMS || delta != nullptr) && i < hidden) new_residual[base + i] = v[j];
        sum_sq += v[j] * v[j];
    }
    if (SUMS) {  // each thread re-zeroes the slots it read (and the padding past hidden)
        for (int i = threadIdx.x; i < n_pad; i += blockDim.x) sums[i] = 0.0f;
    }
    sum_sq = warp_sum(sum_sq);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sum_sq;
    __syncthreads();
    if (threadIdx.x < 32) {
        float p = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.0f;
        p = warp_sum(p);
        if (threadIdx.x == 0) partial[0] = p;
    }
    __syncthreads();
    const float inv_rms = rsqrtf(partial[0] / (float)hidden + eps);
    u16* to = order != nullptr ? staged_row : out + base;
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < hidden) {
            const float normed = Act<T>::load(Act<T>::store(v[j] * inv_rms));
            to[i] = Act<T>::store(Act<T>::load(w[j]) * normed);
        }
    }
    if (order != nullptr) {
        __syncthreads();
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[base + i] = staged_row[staged_order[i]];
    }
}

template <typename T>
__global__ void NORM_BOUNDS add_rms_norm(const float* __restrict__ residual, const u16* __restrict__ delta,
                                         const u16* __restrict__ weight, float* __restrict__ new_residual,
                                         u16* __restrict__ out, int hidden, float eps,
                                         const int* __restrict__ order) {
    norm_row<T, false>(residual, delta, weight, new_residual, out, hidden, eps, nullptr, nullptr, 0, nullptr, 0, order);
}

// add_rms_norm of one row whose delta is the unfinished sums of the product before it (o_proj's, down_proj's, at
// decode): that product's end (exl2_finish's work) and the norm in one launch. Bounded on every architecture: sm_90
// took 69 registers unbounded, too many for a block of 1024 threads (rows longer than 7936).
template <typename T>
__global__ void __launch_bounds__(1024) finish_add_rms_norm(const float* __restrict__ residual, float* __restrict__ sums,
                                                const float* __restrict__ bias, int n_pad,
                                                const u16* __restrict__ weight, float* __restrict__ new_residual,
                                                u16* __restrict__ out, int hidden, float eps,
                                                float* __restrict__ extra, int extra_count,
                                                const int* __restrict__ order) {
    norm_row<T, true>(residual, nullptr, weight, new_residual, out, hidden, eps, sums, bias, n_pad, extra, extra_count,
                      order);
}

// out = T(silu(gate)) * up, element-wise over n values.
template <typename T>
__global__ void silu_mul(const u16* __restrict__ gate, const u16* __restrict__ up, u16* __restrict__ out, int n) {
    pdl_launch_dependents();
    pdl_wait();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = Act<T>::store(silu_mul_value<T>(gate[i], up[i]));
}

// Where rope_store reads q, k and v: the GEMV's finished outputs (T values), or (Sums) the fp32 sums a one-row q/k/v
// GEMV left unfinished, ended here as exl2_finish ends them (ended_sum) and re-zeroed: each value is read by one
// thread, so the product's end costs no launch of its own.
struct Outputs {
    const u16* __restrict__ x;
    __device__ __forceinline__ u16 take(size_t i, int) const { return x[i]; }
};
template <typename T>
struct Sums {
    float* __restrict__ sums;
    const float* __restrict__ bias;
    __device__ __forceinline__ u16 take(size_t i, int column) const {
        const float s = __ldcg(sums + i);
        sums[i] = 0.0f;
        return ended_sum<T>(s, bias, column);
    }
};

// RoPE on the new queries and keys (rotate_pair), queries written as [B, Hq, T, D], keys and values
// appended to the cache [B, Hkv, S, D] at position (*position or position_value) + t.
// Grid (B·T, Hq + Hkv), block D/2 threads: thread i rotates the pair (i, i + D/2).
template <typename T, typename In>
__device__ __forceinline__ void rope_rows(const In& q_in, const In& k_in, const In& v_in, const u16* __restrict__ cos,
                                          const u16* __restrict__ sin, u16* __restrict__ q_out,
                                          u16* __restrict__ k_cache, u16* __restrict__ v_cache,
                                          const long long* __restrict__ position, int position_value, int tokens,
                                          int q_heads, int kv_heads, int dim, int cache_len) {
    pdl_launch_dependents();
    pdl_wait();
    const int bt = blockIdx.x, b = bt / tokens, t = bt - b * tokens;
    const int head = blockIdx.y, i = threadIdx.x, half = dim >> 1;
    const bool is_query = head < q_heads;
    const int h = is_query ? head : head - q_heads;
    const In& src = is_query ? q_in : k_in;
    const size_t at = (size_t)bt * (is_query ? q_heads : kv_heads) * dim + (size_t)h * dim;
    const int column = h * dim + i;  // of the row's q (or k, v) outputs: the bias's index
    const u16* c = cos + (size_t)bt * dim;
    const u16* s = sin + (size_t)bt * dim;
    const float x1 = Act<T>::load(src.take(at + i, column)), x2 = Act<T>::load(src.take(at + i + half, column + half));
    u16 r1, r2;
    rotate_pair<T>(x1, x2, c, s, i, half, r1, r2);
    if (is_query) {
        u16* dst = q_out + (((size_t)b * q_heads + h) * tokens + t) * dim;
        dst[i] = r1;
        dst[i + half] = r2;
        return;
    }
    const int pos = (position != nullptr ? (int)*position : position_value) + t;
    const size_t row = (((size_t)b * kv_heads + h) * cache_len + pos) * dim;
    k_cache[row + i] = r1;
    k_cache[row + i + half] = r2;
    v_cache[row + i] = v_in.take(at + i, column);
    v_cache[row + i + half] = v_in.take(at + i + half, column + half);
}

template <typename T>
__global__ void rope_store(const u16* __restrict__ q_in, const u16* __restrict__ k_in, const u16* __restrict__ v_in,
                           const u16* __restrict__ cos, const u16* __restrict__ sin, u16* __restrict__ q_out,
                           u16* __restrict__ k_cache, u16* __restrict__ v_cache, const long long* __restrict__ position,
                           int position_value, int tokens, int q_heads, int kv_heads, int dim, int cache_len) {
    rope_rows<T>(Outputs{q_in}, Outputs{k_in}, Outputs{v_in}, cos, sin, q_out, k_cache, v_cache, position,
                 position_value, tokens, q_heads, kv_heads, dim, cache_len);
}

// rope_store of one token of one sequence (grid (1, Hq + Hkv)) whose q/k/v GEMV left its products as sums (one
// launch instead of exl2_finish and rope_store).
template <typename T>
__global__ void finish_rope_store(float* __restrict__ q_sums, const float* __restrict__ q_bias,
                                  float* __restrict__ k_sums, const float* __restrict__ k_bias,
                                  float* __restrict__ v_sums, const float* __restrict__ v_bias,
                                  const u16* __restrict__ cos, const u16* __restrict__ sin, u16* __restrict__ q_out,
                                  u16* __restrict__ k_cache, u16* __restrict__ v_cache,
                                  const long long* __restrict__ position, int position_value, int q_heads,
                                  int kv_heads, int dim, int cache_len) {
    rope_rows<T>(Sums<T>{q_sums, q_bias}, Sums<T>{k_sums, k_bias}, Sums<T>{v_sums, v_bias}, cos, sin, q_out, k_cache,
                 v_cache, position, position_value, 1, q_heads, kv_heads, dim, cache_len);
}
