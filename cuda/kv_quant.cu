// KV-cache quantization (the torch reference is exlq/runtime/kv_quant.py): groups of 32 values, rotated by
// the normalized 32-point Hadamard matrix, rounded mid-rise against their max-abs scale (rounded to fp16),
// codes packed densely (8 codes of b bits = b bytes, little-endian). One warp per group, one lane per value:
// the Hadamard is a 5-stage butterfly over shuffles, the pack an OR over 8 lanes.
#include "common.cuh"

#define GROUP 32
#define FULL 0xffffffffu

__device__ __forceinline__ float hadamard32(float v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int s = 1; s < 32; s <<= 1) {
        const float other = __shfl_xor_sync(FULL, v, s);
        v = (lane & s) ? other - v : v + other;
    }
    return v * 0.17677669529663687f;  // 1/sqrt(32)
}

// Round one rotated group (v: this lane's value) mid-rise against its max-abs scale (rounded to fp16) and store its
// packed codes at group_codes (the group's first byte) and its scale at *scale.
template <int B>
__device__ __forceinline__ void store_group(float v, unsigned char* __restrict__ group_codes, u16* __restrict__ scale) {
    const int lane = threadIdx.x & 31;
    float amax = fabsf(v);
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, s));
    constexpr float HALF_RANGE = ((1 << B) - 1) * 0.5f;
    const u16 scale16 = Act<fp16_t>::store(fminf(fmaxf(__fdiv_rn(amax, HALF_RANGE), 6.103515625e-5f), 65504.0f));
    const float step = Act<fp16_t>::load(scale16);
    const float q = fminf(fmaxf(rintf(__fdiv_rn(v, step) + HALF_RANGE), 0.0f), 2.0f * HALF_RANGE);  // IEEE division, as torch
    unsigned long long word = (unsigned long long)(unsigned)q << (B * (lane & 7));
#pragma unroll
    for (int s = 1; s < 8; s <<= 1) {
        const unsigned lo = __shfl_xor_sync(FULL, (unsigned)word, s), hi = __shfl_xor_sync(FULL, (unsigned)(word >> 32), s);
        word |= ((unsigned long long)hi << 32) | lo;
    }
    if ((lane & 7) == 0) {
        unsigned char* out = group_codes + lane * B / 8;
#pragma unroll
        for (int byte = 0; byte < B; byte++) out[byte] = (unsigned char)(word >> (8 * byte));
    }
    if (lane == 0) *scale = scale16;
}

// x float32 [groups·32] (rows of D values, D a multiple of 32) -> codes uint8 [groups·32·B/8], scales fp16 [groups].
template <int B>
__global__ void kv_quantize(const float* __restrict__ x, unsigned char* __restrict__ codes, u16* __restrict__ scales,
                            int groups) {
    const int group = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (group >= groups) return;  // whole warps leave together
    const int lane = threadIdx.x & 31;
    store_group<B>(hadamard32(x[(size_t)group * GROUP + lane]), codes + (size_t)group * GROUP * B / 8, scales + group);
}

// Quantize-on-write for CUDA-graph decode steps, fused: x [rows, H, T, D] in the activation dtype (strides sb, sh,
// st; D contiguous) goes into the layer's packed cache at positions[t]: centered = (x - offset)·multiplier (float32
// [rows, H, 1, D]; multiplier may be null), then as kv_quantize. codes [B, H, S, D·B/8] and scales [B, H, S, D/32] are
// the layer's whole buffers (S = s_max). The same float32 operations as the torch steps it replaces (cast, subtract,
// multiply, kv_quantize, two index_copy_), so the codes are bit-identical to theirs: ~6 launches a store become one.
template <typename T, int B>
__global__ void kv_quantize_at(const u16* __restrict__ x, const float* __restrict__ offset,
                               const float* __restrict__ multiplier, const long long* __restrict__ positions,
                               unsigned char* __restrict__ codes, u16* __restrict__ scales, int groups,
                               int groups_per_position, int tokens, int heads, long long sb, long long sh,
                               long long st, int s_max) {
    const int group = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (group >= groups) return;  // whole warps leave together
    const int lane = threadIdx.x & 31;
    const int dg = group % groups_per_position, t = (group / groups_per_position) % tokens;
    const int slot = group / (groups_per_position * tokens), b = slot / heads, h = slot % heads;
    const int dim = groups_per_position * GROUP, channel = slot * dim + dg * GROUP + lane;
    float centered = Act<T>::load(x[b * sb + h * sh + t * st + dg * GROUP + lane]) - offset[channel];
    if (multiplier != nullptr) centered = __fmul_rn(centered, multiplier[channel]);
    const size_t position = (size_t)slot * s_max + positions[t];
    store_group<B>(hadamard32(centered), codes + (position * dim + dg * GROUP) * B / 8,
                   scales + position * groups_per_position + dg);
}

// The inverse: codes and scales -> x float32 [groups·32] (before any offset), up to rounding.
template <int B>
__global__ void kv_dequantize(const unsigned char* __restrict__ codes, const u16* __restrict__ scales,
                              float* __restrict__ x, int groups) {
    const int group = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (group >= groups) return;
    const int lane = threadIdx.x & 31;
    const unsigned char* block = codes + ((size_t)group * GROUP + (lane & ~7)) * B / 8;
    unsigned long long word = 0;
#pragma unroll
    for (int byte = 0; byte < B; byte++) word |= (unsigned long long)block[byte] << (8 * byte);
    const unsigned code = (unsigned)(word >> (B * (lane & 7))) & ((1u << B) - 1u);
    constexpr float HALF_RANGE = ((1 << B) - 1) * 0.5f;
    const float v = ((float)code - HALF_RANGE) * Act<fp16_t>::load(scales[group]);
    x[(size_t)group * GROUP + lane] = hadamard32(v);
}

// Dequantize positions [s0, s0 + length) of the first rows·heads (row, head) slots of one layer's cache straight into
// a dense buffer in the activation dtype: out = H·((code - z)·scale) / divisor + offset. codes [.., S, D·B/8],
// scales [.., S, D/32], out [.., S, D] share the slot/position layout (S = s_max positions per slot); offset and
// divisor (the keys' channel scales) are float32 [slots, D]; divisor may be null (1). Positions below `prefix` are
// copied from the dense prefix [slots, prefix, D] instead (the scratch buffer is shared by all layers, so every read
// refills it: one launch for both parts). One warp per group of 32.
template <typename T, int B>
__global__ void kv_dequantize_into(const unsigned char* __restrict__ codes, const u16* __restrict__ scales,
                                   const float* __restrict__ offset, const float* __restrict__ divisor,
                                   const u16* __restrict__ dense, u16* __restrict__ out, int groups,
                                   int groups_per_position, int length, int s0, int s_max, int prefix) {
    const int group = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (group >= groups) return;
    const int lane = threadIdx.x & 31;
    const int dg = group % groups_per_position, s = (group / groups_per_position) % length;
    const int slot = group / (groups_per_position * length);
    const int dim = groups_per_position * GROUP;
    const size_t position = (size_t)slot * s_max + s0 + s;
    if (s0 + s < prefix) {  // the dense prefix: a copy (warp-uniform: one group, one position)
        out[position * dim + dg * GROUP + lane] = dense[((size_t)slot * prefix + s0 + s) * dim + dg * GROUP + lane];
        return;
    }
    const unsigned char* block = codes + (position * dim + dg * GROUP + (lane & ~7)) * B / 8;
    unsigned long long word = 0;
#pragma unroll
    for (int byte = 0; byte < B; byte++) word |= (unsigned long long)block[byte] << (8 * byte);
    const unsigned code = (unsigned)(word >> (B * (lane & 7))) & ((1u << B) - 1u);
    constexpr float HALF_RANGE = ((1 << B) - 1) * 0.5f;
    float v = hadamard32(((float)code - HALF_RANGE) * Act<fp16_t>::load(scales[position * groups_per_position + dg]));
    const int channel = slot * dim + dg * GROUP + lane;
    if (divisor != nullptr) v = __fdiv_rn(v, divisor[channel]);  // IEEE division, as the torch path
    out[position * dim + dg * GROUP + lane] = Act<T>::store(v + offset[channel]);
}
