"""Read bandwidth by access pattern: does the GEMV's layout, not its arithmetic, cap it below copy speed?

    python3 bench/dram_pattern.py [--shapes 4096x14336 ...] [--bits 4] [--json-out FILE]
    python3 bench/dram_pattern.py --step llama3-8b      # every matrix of the one-token step: the pure-read floor

Every attempt to put more of the GEMV's loads in flight (sessions 5, 6, 9, 10, 13, 14: prefetching, staging, deeper
pipelines, one warp an item) made it slower. One explanation: the EXL2 layout stores each column's words in
consecutive rows of the whole matrix width, so a block of the GEMV reads, per word row, one segment of 256 columns ×
4 bytes (1 KB) and then jumps a whole row (57 KB for N = 14336); a warp alone reads 256 bytes a row. More requests in
flight then means more DRAM pages open at once, not more bytes a page. This probe measures pure reads (no arithmetic)
of one matrix's packed bytes with the GEMV's geometry: blocks of 128 threads, each block one tile of SEGMENT bytes a
row × enough rows for 32 KB, in
  - "exl2" order: the tile's rows a whole matrix row apart (as stored), for segments of 256 B to 4 KB;
  - "tiled" order: the same tiles, each stored contiguously (a load-time re-layout could do this);
  - "stream": the whole matrix read front to back (the ceiling), one block a 32 KB piece;
  - "grid-stride": the same bytes read by a grid of SMs x resident blocks, each thread striding over the matrix,
with 2, 4 or 8 16-byte loads in flight a thread; and
  - "chained": grid-stride reads launched as the runtime launches its kernels (programmatic dependent launch on
    sm_90+), each read's blocks free to start while the previous read drains: "wait first" waits for the previous
    read before its own loads (the runtime's GEMVs wait before their activations), "wait last" only before its end
    (the best a kernel could do by reading its weights ahead of the wait).
`--step SHAPE` reads each matrix of a synthetic shape's one-token step (q/k/v as one, o, gate/up as one, down, the
6-bit head; weights only, at --bits) with the quick patterns and adds the best times up: the step's floor for one
kernel a matrix, against the issue's 75 %-of-roofline target. If "tiled" reaches ~90 % of copy where "exl2" at 1 KB stays near the
GEMV's ~46 %, the next GEMV step is the re-layout, not the pipeline.

The kernel is bench-only (compiled here with CuPy's NVRTC, not part of cuda/). Timing as bench/gemv.py: each read
cycles over enough copies of the matrix to exceed twice the L2 cache, 50 launches a CUDA graph.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gemv import copies_beyond_l2, cycling, graph_seconds, shape, step_launches  # noqa: E402
from exlq.eval.speed import copy_bandwidth  # noqa: E402
from exlq.quant.synthetic import SHAPES  # noqa: E402

SOURCE = r"""
// Thread t of block b reads tile (b % tiles, b / tiles): rows * 2^log_seg 16-byte vectors, vector c of row r at
// tile * tile_stride + split * split_stride + r * row_stride + c; LOADS loads in flight before they are folded.
template <int LOADS>
__device__ void read_tile(const uint4* __restrict__ data, int tiles, int rows, int log_seg, long long tile_stride,
                          long long split_stride, long long row_stride, unsigned* __restrict__ sink) {
    const int tile = blockIdx.x % tiles, split = blockIdx.x / tiles;
    const uint4* base = data + tile * tile_stride + split * split_stride;
    const int total = rows << log_seg, mask = (1 << log_seg) - 1;
    unsigned acc = 0;
    for (int first = threadIdx.x; first < total; first += 128 * LOADS) {
        uint4 v[LOADS];
#pragma unroll
        for (int j = 0; j < LOADS; j++) {
            const int i = first + 128 * j;
            v[j] = i < total ? __ldg(base + (long long)(i >> log_seg) * row_stride + (i & mask)) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < LOADS; j++) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
    if (acc == 0x9e3779b9u) sink[0] = acc;  // keeps the loads (practically never true)
}
// Grid-stride read of the whole buffer (total vectors), LOADS a thread in flight: a grid sized to the machine
// (SMs x resident blocks) instead of one block a 32 KB tile.
template <int LOADS>
__device__ void read_stride(const uint4* __restrict__ data, long long total, unsigned* __restrict__ sink) {
    unsigned acc = 0;
    const long long step = (long long)gridDim.x * 128;
    for (long long first = blockIdx.x * 128 + threadIdx.x; first < total; first += step * LOADS) {
        uint4 v[LOADS];
#pragma unroll
        for (int j = 0; j < LOADS; j++) {
            const long long i = first + step * j;
            v[j] = i < total ? __ldg(data + i) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < LOADS; j++) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
    if (acc == 0x9e3779b9u) sink[0] = acc;
}
// The same grid-stride read, launched with programmatic dependent launch: it lets the next read start at once, and
// waits for the previous one before its loads (WAIT_FIRST) or only before it ends.
template <int LOADS, bool WAIT_FIRST>
__device__ void read_chained(const uint4* __restrict__ data, int total, unsigned* __restrict__ sink) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    if (WAIT_FIRST) asm volatile("griddepcontrol.wait;" ::: "memory");
    unsigned acc = 0;
    const int step = gridDim.x * 128;
    for (int first = blockIdx.x * 128 + threadIdx.x; first < total; first += step * LOADS) {
        uint4 v[LOADS];
#pragma unroll
        for (int j = 0; j < LOADS; j++) {
            const int i = first + step * j;
            v[j] = i < total ? __ldg(data + i) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < LOADS; j++) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
    if (!WAIT_FIRST) asm volatile("griddepcontrol.wait;" ::: "memory");
    if (acc == 0x9e3779b9u) sink[0] = acc;
}
extern "C" {
__global__ void __launch_bounds__(128) chain_first4(const uint4* d, int n, unsigned* o) { read_chained<4, true>(d, n, o); }
__global__ void __launch_bounds__(128) chain_first8(const uint4* d, int n, unsigned* o) { read_chained<8, true>(d, n, o); }
__global__ void __launch_bounds__(128) chain_last4(const uint4* d, int n, unsigned* o) { read_chained<4, false>(d, n, o); }
__global__ void __launch_bounds__(128) chain_last8(const uint4* d, int n, unsigned* o) { read_chained<8, false>(d, n, o); }
__global__ void __launch_bounds__(128) stride2(const uint4* d, long long n, unsigned* o) { read_stride<2>(d, n, o); }
__global__ void __launch_bounds__(128) stride4(const uint4* d, long long n, unsigned* o) { read_stride<4>(d, n, o); }
__global__ void __launch_bounds__(128) stride8(const uint4* d, long long n, unsigned* o) { read_stride<8>(d, n, o); }
__global__ void __launch_bounds__(128) read2(const uint4* d, int t, int r, int s, long long a, long long b, long long c,
                                             unsigned* o) { read_tile<2>(d, t, r, s, a, b, c, o); }
__global__ void __launch_bounds__(128) read4(const uint4* d, int t, int r, int s, long long a, long long b, long long c,
                                             unsigned* o) { read_tile<4>(d, t, r, s, a, b, c, o); }
__global__ void __launch_bounds__(128) read8(const uint4* d, int t, int r, int s, long long a, long long b, long long c,
                                             unsigned* o) { read_tile<8>(d, t, r, s, a, b, c, o); }
}
"""
TILE_BYTES = 32 * 1024  # what one block of the wide GEMV reads at 4 bpw (256 rows × 256 columns)


def patterns(row_bytes: int, rows_total: int) -> list[tuple[str, int, int, int, int, int, int]]:
    """(name, blocks, tiles, rows a tile, log2 vectors a segment, tile/split/row strides in vectors) per pattern."""
    out = []
    row_vec = row_bytes // 16
    for seg in (256, 512, 1024, 2048, 4096):
        seg_vec, rows = seg // 16, TILE_BYTES // seg
        tiles, splits = row_vec // seg_vec, rows_total // rows
        log_seg = seg_vec.bit_length() - 1
        out.append((f"exl2 {seg} B", tiles * splits, tiles, rows, log_seg, seg_vec, rows * row_vec, row_vec))
        tile_vec = rows * seg_vec  # each tile's rows back to back, tiles in (split, tile) order
        out.append((f"tiled {seg} B", tiles * splits, tiles, rows, log_seg, tile_vec, tiles * tile_vec, seg_vec))
    total_vec = row_vec * rows_total
    blocks = total_vec * 16 // TILE_BYTES
    out.append(("stream", blocks, blocks, TILE_BYTES // 16 // 128, 7, TILE_BYTES // 16, 0, 128))
    return out


def report(name: str, loads: int, blocks: int, seconds: float, nbytes: int, bandwidth: float) -> dict:
    """One pattern's line, printed, and its record."""
    gbps = nbytes / seconds / 1e9
    print(f"{name:14s} {loads} loads: {blocks:5d} blocks {seconds * 1e6:7.1f} us {gbps:6.0f} GB/s "
          f"= {100 * gbps / bandwidth:5.1f} % of copy")
    return {"pattern": name, "loads": loads, "blocks": blocks, "microseconds": seconds * 1e6, "gbps": gbps,
            "fraction_of_copy": gbps / bandwidth}


def step_matrices(name: str, bits: int) -> list[tuple[str, int, int, int, int]]:
    """(label, K, N, bits, launches a step) of each GEMV launch of a one-token step of synthetic shape `name`
    (bench/gemv.py's step_launches: q/k/v together, o, gate/up together, down, the head at 6 bits), N summed over the
    launch's matrices, at `bits` unless the launch has its own."""
    return [(label, k, sum(outs), int(bpw) if bpw else bits, count) for label, k, outs, bpw, count in step_launches(name)]


def read_matrix(module, k: int, n: int, bits: int, quick: bool, blocks_per_sm: int, bandwidth: float) -> list[dict]:
    """Every pattern's read of one K x N matrix packed at `bits` (quick: the whole-matrix patterns at 4 and 8 loads,
    plain and chained), each launch reading the next of enough copies to miss the L2 cache."""
    import cupy

    from exlq.runtime.kernels.launch import launch

    device = torch.device("cuda")
    rows_total, row_bytes = k * bits // 32, n * 4  # word rows of the packed matrix, bytes a word row
    nbytes = rows_total * row_bytes
    copies = [torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device=device)
              for _ in range(copies_beyond_l2(nbytes, device))]
    sink = torch.zeros(1, dtype=torch.int32, device=device)
    per_sm = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_multiprocessor", 233472)
    smem = min(48 * 1024, per_sm // blocks_per_sm - 1024)  # 1 KB an SM's block reserves
    print(f"{k}x{n} at {bits} bits = {nbytes / 1e6:.1f} MB, {len(copies)} copies; {smem} B of shared memory a block "
          f"(≤ {blocks_per_sm} an SM)")

    def seconds_per_read(function, blocks: int, arguments, chained: bool = False) -> float:
        """Seconds a launch of `function` on `blocks` blocks, each launch reading the next copy (arguments(tensor))."""
        def read(i: int) -> None:
            args = arguments(copies[i % len(copies)])
            if chained:  # as the runtime launches: programmatic dependent launch where the GPU has it
                launch(function.kernel.ptr, (blocks,), (128,), args, device, overlap=True, shared_bytes=smem)
                return
            with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
                function((blocks,), (128,), tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args),
                         shared_mem=smem)

        return graph_seconds(cycling(read), warm_calls=max(50, len(copies)))

    results = []
    machine_blocks = torch.cuda.get_device_properties(device).multi_processor_count * blocks_per_sm
    for loads in (4, 8) if quick else (2, 4, 8):
        function = module.get_function(f"read{loads}")
        for name, blocks, tiles, rows, log_seg, tile_stride, split_stride, row_stride in patterns(row_bytes, rows_total):
            if quick and name != "stream":
                continue
            seconds = seconds_per_read(function, blocks, lambda data: (
                data, tiles, rows, log_seg, tile_stride, split_stride, row_stride, sink))
            results.append(report(name, loads, blocks, seconds, nbytes, bandwidth))
        seconds = seconds_per_read(module.get_function(f"stride{loads}"), machine_blocks,
                                   lambda data: (data, nbytes // 16, sink))
        results.append(report("grid-stride", loads, machine_blocks, seconds, nbytes, bandwidth))
        if loads in (4, 8):
            for wait in ("first", "last"):
                seconds = seconds_per_read(module.get_function(f"chain_{wait}{loads}"), machine_blocks,
                                           lambda data: (data, nbytes // 16, sink), chained=True)
                results.append(report(f"chained, wait {wait}", loads, machine_blocks, seconds, nbytes, bandwidth))
    for result in results:
        result.update(shape=[k, n], bits=bits, nbytes=nbytes)
    del copies
    return results


def step_floor(name: str, bits: int, module, blocks_per_sm: int, bandwidth: float) -> tuple[list[dict], dict]:
    """Each step matrix's reads, and the step's floor: the best plain and the best chained read of each matrix,
    times its launches, added up (weights only: no scales, attention, norms or kernel boundaries)."""
    results, floor = [], {"shape": name, "bits": bits, "matrices": []}
    totals = {"plain": 0.0, "chained": 0.0}
    weight_bytes = 0
    for label, k, n, matrix_bits, count in step_matrices(name, bits):
        reads = read_matrix(module, k, n, matrix_bits, True, blocks_per_sm, bandwidth)
        results += reads
        best = {kind: min(r["microseconds"] for r in reads if r["pattern"].startswith("chained") == (kind == "chained"))
                for kind in totals}
        for kind in totals:
            totals[kind] += best[kind] * count
        weight_bytes += reads[0]["nbytes"] * count
        floor["matrices"].append({"matrix": label, "K": k, "N": n, "bits": matrix_bits, "launches": count,
                                  "best_plain_us": best["plain"], "best_chained_us": best["chained"]})
    roofline = bandwidth * 1e9 / weight_bytes  # tokens/s if the weights streamed at copy speed
    print(f"\n{name} at {bits} bits: {weight_bytes / 1e9:.2f} GB of weights a token; roofline {roofline:.0f} tok/s, "
          f"75 % of it {0.75 * roofline:.0f}")
    for kind, microseconds in totals.items():
        print(f"  best {kind} reads, one a matrix: {microseconds / 1e3:.3f} ms a step = {1e6 / microseconds:.0f} tok/s "
              f"({100 * 1e6 / microseconds / roofline:.1f} % of the roofline)")
        floor[f"{kind}_step_ms"] = microseconds / 1e3
    floor.update(weight_bytes=weight_bytes, roofline_tokens_per_second=roofline)
    return results, floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=shape, nargs="+", default=[(4096, 14336)],
                        help="K x N of each matrix (default 4096x14336)")
    parser.add_argument("--bits", type=int, default=4, help="bits a weight (the matrix's packed size)")
    parser.add_argument("--step", choices=sorted(SHAPES), help="read every matrix of this shape's one-token step")
    parser.add_argument("--quick", action="store_true", help="only the whole-matrix patterns, 4 and 8 loads")
    parser.add_argument("--blocks-per-sm", type=int, default=8,
                        help="resident blocks an SM, held there by shared memory (the wide GEMV: 8)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    import cupy

    device = torch.device("cuda")
    module = cupy.RawModule(code=SOURCE, options=("-std=c++17",))
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name(device)}: copy {bandwidth:.0f} GB/s")
    record = {"device": torch.cuda.get_device_name(device), "copy_gbps": bandwidth, "blocks_per_sm": args.blocks_per_sm}
    if args.step:
        record["results"], record["step_floor"] = step_floor(args.step, args.bits, module, args.blocks_per_sm, bandwidth)
    else:
        record["results"] = [r for k, n in args.shapes
                             for r in read_matrix(module, k, n, args.bits, args.quick, args.blocks_per_sm, bandwidth)]
    if args.json_out:
        args.json_out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
