// The quantizer's sequential loops (exlq/quant/gptq.py), one 32-row block per launch instead of ~20 torch kernels a
// row: GPTQ's column loop within a block, and coordinate descent's row loop within a block. Every output column
// (and option) is independent along the loop, so each thread owns one and walks the block's rows in order, the
// block's 32x32 corner of the (inverse) Hessian in shared memory. The arithmetic is the torch path's, rounding for
// rounding (no fused multiply-adds: torch multiplies and subtracts in separate kernels), so both paths give the
// same codes bit for bit (float32 denormals aside: the sources compile with --use_fast_math, which flushes them;
// the quantizer's weights, scales and errors are far above them).
#include "common.cuh"

#define BLOCK_ROWS 32

// The nearest code on a grid of scale s (0 where s is 0) and its value as the runtime dequantizes it (gptq._to_grid).
__device__ __forceinline__ float to_grid(float x, float s, float zero, float maxq, float* value) {
    const float ratio = s > 0.0f ? __fdiv_rn(x, s) : 0.0f;
    const float q = fminf(fmaxf(__fadd_rn(rintf(ratio), zero), 0.0f), maxq);
    *value = round_f16(__fmul_rn(__fsub_rn(q, zero), s));
    return q;
}

__device__ __forceinline__ void load_corner(float (*corner)[BLOCK_ROWS + 1], const float* h, int k_in, int b0,
                                            int width) {
    for (int i = threadIdx.x; i < BLOCK_ROWS * BLOCK_ROWS; i += blockDim.x) {
        const int r = i / BLOCK_ROWS, c = i % BLOCK_ROWS;
        corner[r][c] = r < width && c < width ? h[(size_t)(b0 + r) * k_in + b0 + c] : 0.0f;
    }
    __syncthreads();
}

// GPTQ over stored rows b0..b0+width of every option p and output column n (thread p*n_out + n):
// block [P, N, width] (the weights, with earlier blocks' updates; read only), hinv [K, K] (upper Cholesky factor of H^-1),
// scales [P, N], zero/maxq [P] (this block's width per option) -> codes [P, K, N] (rows b0..), errors [P, N, width].
__global__ void gptq_block(const float* __restrict__ block, const float* __restrict__ hinv,
                                      const float* __restrict__ scales, const float* __restrict__ zero,
                                      const float* __restrict__ maxq, int* __restrict__ codes,
                                      float* __restrict__ errors, int options, int n_out, int k_in, int b0,
                                      int width) {
    __shared__ float corner[BLOCK_ROWS][BLOCK_ROWS + 1];
    load_corner(corner, hinv, k_in, b0, width);
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= options * n_out) return;
    const int p = t / n_out, n = t % n_out;
    const float* w = block + (size_t)t * width;
    float row[BLOCK_ROWS];
#pragma unroll
    for (int i = 0; i < BLOCK_ROWS; i++) row[i] = i < width ? w[i] : 0.0f;
    const float s = scales[t], z = zero[p], mq = maxq[p];
#pragma unroll
    for (int i = 0; i < BLOCK_ROWS; i++) {
        if (i < width) {
            float value;
            const float q = to_grid(row[i], s, z, mq, &value);
            codes[((size_t)p * k_in + b0 + i) * n_out + n] = (int)q;
            const float err = __fdiv_rn(__fsub_rn(row[i], value), corner[i][i]);
#pragma unroll
            for (int j = i + 1; j < BLOCK_ROWS; j++) row[j] = __fsub_rn(row[j], __fmul_rn(err, corner[i][j]));
            errors[(size_t)t * width + i] = err;
        }
    }
}

// Coordinate descent over stored rows b0..b0+width for output column n (thread n): values/codes/row_scales [K, N]
// (codes as floats), gradient [N, K] ((W - W^) H), hessian [K, K], diagonal/zero/maxq [K] -> values, codes and
// gradient's columns b0.. updated, changes [N, width] (for the torch path's updates outside the block).
__global__ void refine_block(float* __restrict__ values, float* __restrict__ codes,
                                        float* __restrict__ gradient, const float* __restrict__ hessian,
                                        const float* __restrict__ diagonal, const float* __restrict__ row_scales,
                                        const float* __restrict__ zero, const float* __restrict__ maxq,
                                        float* __restrict__ changes, int n_out, int k_in, int b0, int width) {
    __shared__ float corner[BLOCK_ROWS][BLOCK_ROWS + 1];
    load_corner(corner, hessian, k_in, b0, width);
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= n_out) return;
    float g[BLOCK_ROWS];
#pragma unroll
    for (int j = 0; j < BLOCK_ROWS; j++) g[j] = j < width ? gradient[(size_t)n * k_in + b0 + j] : 0.0f;
#pragma unroll
    for (int k = 0; k < BLOCK_ROWS; k++) {
        if (k < width) {
            const size_t at = (size_t)(b0 + k) * n_out + n;
            const float old = values[at];
            const float x = __fadd_rn(old, __fdiv_rn(g[k], diagonal[b0 + k]));
            float value;
            const float q = to_grid(x, row_scales[at], zero[b0 + k], maxq[b0 + k], &value);
            const float change = __fsub_rn(value, old);
            codes[at] = q;
            values[at] = value;
#pragma unroll
            for (int j = 0; j < BLOCK_ROWS; j++) g[j] = __fsub_rn(g[j], __fmul_rn(change, corner[k][j]));
            changes[(size_t)n * width + k] = change;
        }
    }
#pragma unroll
    for (int j = 0; j < BLOCK_ROWS; j++) {
        if (j < width) gradient[(size_t)n * k_in + b0 + j] = g[j];
    }
}
