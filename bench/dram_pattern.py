"""Read bandwidth by access pattern: does the GEMV's layout, not its arithmetic, cap it below copy speed?

    python3 bench/dram_pattern.py [--shape 4096x14336] [--bits 4] [--json-out FILE]

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
with 2, 4 or 8 16-byte loads in flight a thread. If "tiled" reaches ~90 % of copy where "exl2" at 1 KB stays near the
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
from bench.gemv import copies_beyond_l2, cycling, graph_seconds, shape  # noqa: E402
from exlq.eval.speed import copy_bandwidth  # noqa: E402

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
extern "C" {
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=shape, default=(4096, 14336), help="K x N of the matrix (default 4096x14336)")
    parser.add_argument("--bits", type=int, default=4, help="bits a weight (the matrix's packed size)")
    parser.add_argument("--blocks-per-sm", type=int, default=8,
                        help="resident blocks an SM, held there by shared memory (the wide GEMV: 8)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    import cupy

    device = torch.device("cuda")
    k, n = args.shape
    rows_total, row_bytes = k * args.bits // 32, n * 4  # word rows of the packed matrix, bytes a word row
    nbytes = rows_total * row_bytes
    copies = [torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device=device)
              for _ in range(copies_beyond_l2(nbytes, device))]
    sink = torch.zeros(1, dtype=torch.int32, device=device)
    module = cupy.RawModule(code=SOURCE, options=("-std=c++17",))
    bandwidth = copy_bandwidth(device)
    per_sm = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_multiprocessor", 233472)
    smem = min(48 * 1024, per_sm // args.blocks_per_sm - 1024)  # 1 KB an SM's block reserves
    print(f"{torch.cuda.get_device_name(device)}: copy {bandwidth:.0f} GB/s; {k}x{n} at {args.bits} bits = "
          f"{nbytes / 1e6:.1f} MB, {len(copies)} copies; {smem} B of shared memory a block (≤ {args.blocks_per_sm} an SM)")
    def seconds_per_read(function, blocks: int, arguments) -> float:
        """Seconds a launch of `function` on `blocks` blocks, each launch reading the next copy (arguments(pointer))."""
        def read(i: int) -> None:
            with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
                function((blocks,), (128,), arguments(copies[i % len(copies)].data_ptr()), shared_mem=smem)

        return graph_seconds(cycling(read), warm_calls=max(50, len(copies)))

    results = []
    machine_blocks = torch.cuda.get_device_properties(device).multi_processor_count * args.blocks_per_sm
    for loads in (2, 4, 8):
        function = module.get_function(f"read{loads}")
        for name, blocks, tiles, rows, log_seg, tile_stride, split_stride, row_stride in patterns(row_bytes, rows_total):
            seconds = seconds_per_read(function, blocks, lambda pointer: (
                pointer, tiles, rows, log_seg, tile_stride, split_stride, row_stride, sink.data_ptr()))
            results.append(report(name, loads, blocks, seconds, nbytes, bandwidth))
        seconds = seconds_per_read(module.get_function(f"stride{loads}"), machine_blocks,
                                   lambda pointer: (pointer, nbytes // 16, sink.data_ptr()))
        results.append(report("grid-stride", loads, machine_blocks, seconds, nbytes, bandwidth))
    if args.json_out:
        args.json_out.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "copy_gbps": bandwidth,
                                             "shape": [k, n], "bits": args.bits, "blocks_per_sm": args.blocks_per_sm,
                                             "results": results}, indent=1))


if __name__ == "__main__":
    main()
