// Shared helpers for exlq kernels. Self-contained on purpose: no CUDA toolkit headers, so NVRTC
// compiles every kernel with nothing but libnvrtc (CI has no toolkit). Activations are 16-bit
// values held as `unsigned short`; the conversions are single PTX instructions.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;

struct fp16_t {};  // tag types for the activation dtype (template arguments)
struct bf16_t {};

template <typename T> struct Act;

template <> struct Act<fp16_t> {
    static __device__ __forceinline__ float load(u16 v) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
        return f;
    }
    static __device__ __forceinline__ u16 store(float f) {
        u16 v;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
        return v;
    }
};

template <> struct Act<bf16_t> {
    static __device__ __forceinline__ float load(u16 v) { return __int_as_float(((u32)v) << 16); }
    static __device__ __forceinline__ u16 store(float f) {
        u16 v;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
        return v;
    }
};

// T(silu(gate)) * up rounded to T, as the torch path's F.silu(gate) * up in the activation dtype (silu_mul, and the
// GEMV that takes down_proj's input from gate and up).
template <typename T>
__device__ __forceinline__ float silu_mul_value(u16 gate, u16 up) {
    const float g = Act<T>::load(gate);
    const float s = Act<T>::load(Act<T>::store(g / (1.0f + __expf(-g))));
    return Act<T>::load(Act<T>::store(s * Act<T>::load(up)));
}

// Weights, their scale codes and the KV cache pass through L2 once a token (the 8B: 3.9 GB through 50 MB). Read with
// the default policy they evicted what the next token's launches read first, on their critical path: the GEMVs' chunk
// tables, permutations and splits, the norms' weights, each then a dependent DRAM round trip under full load. Read
// evict-first, they leave those lines cached (the 8B's step -3 %, decode +2 %: docs/benchmarks.md, session 49).
// load_stream: ld.global.cs.nc (evict-first in L1 and L2) for a layer's own read-only data; evict_first_policy: the L2
// policy for the loads and bulk copies that take one.
__device__ __forceinline__ u32 load_stream(const u32* p) {
    u32 v;
    asm("ld.global.cs.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ uint2 load_stream(const uint2* p) {
    uint2 v;
    asm("ld.global.cs.nc.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 v;
    asm("ld.global.cs.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ unsigned long long evict_first_policy() {
    unsigned long long policy;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    return policy;
}

// fp16 round trip (round to nearest even), for reproducing the format's exact fp16 arithmetic.
__device__ __forceinline__ float round_f16(float f) { return Act<fp16_t>::load(Act<fp16_t>::store(f)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Packed fp16 pairs (half2 in a u32: low half first), via PTX.
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
__device__ __forceinline__ float half2_sum(u32 a) {
    return Act<fp16_t>::load((u16)(a & 0xffffu)) + Act<fp16_t>::load((u16)(a >> 16));
}

// A split product's output from its fp32 sum (the split-K blocks' atomics) and its bias (null: none), rounded to T
// as exl2_finish writes it; every launch that ends such sums, or reads them unfinished, rounds them so.
template <typename T>
__device__ __forceinline__ u16 ended_sum(float sum, const float* __restrict__ bias, int column) {
    return Act<T>::store(sum + (bias != nullptr ? bias[column] : 0.0f));
}

// RoPE of the pair (i, i + half) of a head's row (HF's half-split convention), rounded like the torch path
// (apply_rotary): x·cos and rotate_half(x)·sin each rounded to T, then their sum. c and s: the token's cos and sin
// rows. rope_store and the attention that ends q/k/v's sums itself (rope_decode_attention) both rotate so.
// rotate_values takes the four cos/sin elements already loaded: c1 = c[i], s1 = s[i], c2 = c[i + half],
// s2 = s[i + half].
template <typename T>
__device__ __forceinline__ void rotate_values(float x1, float x2, u16 c1, u16 s1, u16 c2, u16 s2, u16& r1, u16& r2) {
    const float a1 = Act<T>::load(Act<T>::store(x1 * Act<T>::load(c1)));
    const float b1 = Act<T>::load(Act<T>::store(-x2 * Act<T>::load(s1)));
    const float a2 = Act<T>::load(Act<T>::store(x2 * Act<T>::load(c2)));
    const float b2 = Act<T>::load(Act<T>::store(x1 * Act<T>::load(s2)));
    r1 = Act<T>::store(a1 + b1);
    r2 = Act<T>::store(a2 + b2);
}
template <typename T>
__device__ __forceinline__ void rotate_pair(float x1, float x2, const u16* __restrict__ c, const u16* __restrict__ s,
                                            int i, int half, u16& r1, u16& r2) {
    rotate_values<T>(x1, x2, c[i], s[i], c[i + half], s[i + half], r1, r2);
}

// `p` (this block's shared memory) as a 32-bit shared-window address, as mbarrier, bulk copies and mapa take it.
__device__ __forceinline__ u32 shared_address(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// floats [0, count) set to zero by every thread of the grid's x dimension in turn (nothing when `floats` is null):
// the sums a finished product's input came from, re-zeroed by the launch that ends that product.
__device__ __forceinline__ void zero_floats(float* __restrict__ floats, int count) {
    if (floats == nullptr) return;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) floats[i] = 0.0f;
}

// Programmatic dependent launch (sm_90+; no-ops elsewhere and when the kernel was launched without it):
// pdl_launch_dependents lets the stream's next kernel start now; pdl_wait blocks until the previous kernel has
// finished and its writes are visible. Every kernel launched with overlap=True (launch.py) calls pdl_wait before
// touching memory another kernel writes, so the order stays transitive along the stream.
#ifdef STEP_TIMELINE
// A probe (the catalog variant STEP_TIMELINE, bench/step_timeline.py), not a mode: each block's thread 0 stamps the
// GPU's clock (%globaltimer, ns) as the block starts (pdl_launch_dependents; in a kernel that reads its own tables
// and weights before that, timeline_start at its entry and pdl_launch_dependents<false> later) and as its
// programmatic wait returns (pdl_wait), and writes both, with the block's grid, into this module's records: when each
// launch's blocks became resident, and when the kernel before it had finished, so consecutive launches' wait times
// price each launch in the step's chain. The record's slot is taken at the start, off the path after the wait;
// %gridid tells the launches apart (graph replays included).
#define STEP_TIMELINE_RECORDS (1 << 18)
#define TIMELINE_MARKS 3
struct TimelineRecord {
    unsigned long long start, wait, grid;  // ns, ns, the launch's %gridid
    u32 grid_x, grid_y, block, sm;  // sm: %smid, the SM the block ran on
    // ns: where thread 0 released the next launch (the kernels that read their own tables before that: their work
    // before the wait done; else the start), and up to TIMELINE_MARKS points after the wait (timeline_mark; 0: none)
    unsigned long long ready, marks[TIMELINE_MARKS];
};
__device__ TimelineRecord step_timeline[STEP_TIMELINE_RECORDS];
__device__ u32 step_timeline_count;  // records taken (slots past STEP_TIMELINE_RECORDS are dropped)
__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ u32 sm_id() {
    u32 id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    return id;
}
__device__ __forceinline__ unsigned long long grid_id() {
    unsigned long long id;
    asm("mov.u64 %0, %%gridid;" : "=l"(id));
    return id;
}
// The block's start stamp and record slot, between its two stamps.
__device__ __forceinline__ unsigned long long* timeline_block() {
    __shared__ unsigned long long block_stamp[3];  // start, record slot, ready
    return block_stamp;
}
__device__ __forceinline__ void timeline_start() {
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        timeline_block()[0] = global_ns();
        timeline_block()[1] = atomicAdd(&step_timeline_count, 1u);
        timeline_block()[2] = timeline_block()[0];
    }
}
__device__ __forceinline__ void timeline_ready() {
    if (threadIdx.x == 0 && threadIdx.y == 0) timeline_block()[2] = global_ns();
}
// Point `i` of the block's work after its wait (thread 0's clock), into its record (written at the wait).
__device__ __forceinline__ void timeline_mark(int i) {
    if (threadIdx.x == 0 && threadIdx.y == 0 && timeline_block()[1] < STEP_TIMELINE_RECORDS)
        step_timeline[timeline_block()[1]].marks[i] = global_ns();
}
__device__ __forceinline__ void timeline_wait() {
    if (threadIdx.x == 0 && threadIdx.y == 0 && timeline_block()[1] < STEP_TIMELINE_RECORDS) {
        const unsigned long long now = global_ns();
        step_timeline[timeline_block()[1]] = TimelineRecord{timeline_block()[0], now, grid_id(), gridDim.x, gridDim.y,
                                                           blockIdx.x + blockIdx.y * gridDim.x,
                                                           sm_id(), timeline_block()[2], {}};
    }
}
#else
__device__ __forceinline__ void timeline_start() {}
__device__ __forceinline__ void timeline_wait() {}
__device__ __forceinline__ void timeline_ready() {}
__device__ __forceinline__ void timeline_mark(int) {}
#endif
// STAMP false: the block stamped its start itself (timeline_start at its entry).
template <bool STAMP = true>
__device__ __forceinline__ void pdl_launch_dependents() {
    if (STAMP) timeline_start();
    else timeline_ready();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    timeline_wait();
}
