"""Where a decode step's time goes in its chain of launches: each launch's blocks' start and programmatic-wait stamps
from the STEP_TIMELINE kernel variant (cuda/common.cuh), one graph-replayed step of a synthetic model.

A launch's wait returns when the kernel before it has finished and its writes are visible, so the gap between two
consecutive launches' waits is what the first costs the step in its chain (its work after the wait, its blocks'
exit, the release of the next): the skip probe's number for every launch at once, without leaving any out. Its
blocks' first start against the previous launch's wait says whether they were resident early (programmatic launch)
or started only as the SMs freed up. A start is stamped where the block triggers the next launch, except in the
register and tensor-core GEMVs, which read their own tables, scales and first words before that: at their entry
(since session 48; before, their starts came after those reads, several µs later under load). A probe: each block
takes a record slot with one atomic as it starts, which shifts the timing a little.

    python3 bench/step_timeline.py [--shape llama3-8b] [--bpw 4.0] [--position 256] [--layers 2] [--json-out F]
                                   [--records-out F.npz]   # every block's record: bench/timeline_blocks.py reads it

Prints one line a launch in wait order: instance (as captured), grid, blocks recorded, its blocks' first, median and
last start and its wait release relative to the step's first wait, the gap to the next launch's wait (µs), and how
many of its blocks started only after its first wait had returned (late: not resident while the kernel before ran,
so none of their reads before the wait overlapped it), how long its blocks took from their start to releasing the next
launch (pre-wait: the register and tensor-core GEMVs' reads of their own tables, scales and first words; ~0
elsewhere), and when its blocks passed their timeline_mark points after the wait, the median block's and then the
last one's (the attention's: sums in and queries staged, its chunks done, the merge's barrier passed; the one-row
streamed GEMV's: its first gather done, its units done, its last sums' atomics issued; the register GEMV's, as its
thread 0 passes them: activations gathered, products done, sums' atomics issued); then the gaps summed by instance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

VARIANT = "STEP_TIMELINE"
os.environ["EXLQ_NVRTC_DEFINES"] = " ".join({*os.environ.get("EXLQ_NVRTC_DEFINES", "").replace(",", " ").split(),
                                             VARIANT})  # before any kernel module loads

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from skip_probe import skipped  # noqa: E402

from exlq.cli.bench import _synthetic_model  # noqa: E402
from exlq.runtime.kernels import launch, sampling_ops  # noqa: E402

MARKS = 3  # TIMELINE_MARKS
RECORD = np.dtype([("start", "<u8"), ("wait", "<u8"), ("grid", "<u8"), ("grid_x", "<u4"), ("grid_y", "<u4"),
                   ("block", "<u4"), ("sm", "<u4"), ("ready", "<u8"),
                   ("marks", "<u8", (MARKS,))])  # common.cuh's TimelineRecord
RECORDS = 1 << 18  # STEP_TIMELINE_RECORDS


def device_array(module, name: str, shape: tuple, dtype):
    """A module's __device__ variable `name` as a CuPy array (get_global_var gives its address)."""
    import cupy

    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    memory = cupy.cuda.UnownedMemory(module.get_global_var(name), size, module)
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))


def module_records(reset: bool = False) -> list[np.ndarray]:
    """Each loaded kernel module's records (or, with `reset`, its count set to zero first and nothing returned)."""
    import cupy

    found = []
    for module in launch._loaded_modules:
        count = device_array(module, "step_timeline_count", (1,), cupy.uint32)
        raw = device_array(module, "step_timeline", (RECORDS * RECORD.itemsize,), cupy.uint8)
        if reset:  # the records too: a slot taken by a block whose thread 0 never waited stays empty (wait 0)
            count.fill(0)
            raw.fill(0)
            continue
        records = raw[: min(int(count.get()[0]), RECORDS) * RECORD.itemsize].get().view(RECORD)
        found.append(records[records["wait"] != 0])
    cupy.cuda.Device().synchronize()
    return found


def captured_launches(model, token: torch.Tensor, cache) -> list[tuple[str, tuple, tuple]]:
    """The instance names and grids the step's graph holds, in launch order: the host's launches while one step is
    captured (its eager warm-up's first, then the capture's: the capture's are the last of them)."""
    seen: list = []
    with skipped((), {}, seen):
        model.decode_graphs.clear()
        sampling_ops.argmax(model(token, cache)[:, -1])
    return seen


def signed(values: list) -> str:
    """Mark times as printed: +µs each, '-' where not marked."""
    return " ".join("-" if m is None else f"{m:+.2f}" for m in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--bpw", type=float, default=4.0)
    parser.add_argument("--position", type=int, default=256, help="the stamped step's cache position")
    parser.add_argument("--layers", type=int, default=2, help="layers printed launch by launch (all are summed)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--records-out", type=Path,
                        help="every block's record (.npz: launch i's as records_i, its instance in `instances`)")
    args = parser.parse_args()
    device = torch.device("cuda")
    model = _synthetic_model(args.shape, args.bpw, device, 128)
    cache = model.new_cache(args.position + 64)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.position), device=device)
    token = sampling_ops.argmax(model(prompt, cache)[:, -1])[:, None]
    # Capture the step's graph (its launches named on the host), then replay a few steps to warm it.
    host = captured_launches(model, token, cache)
    for _ in range(8):
        cache.reset()
        model(prompt, cache)
        token = sampling_ops.argmax(model(token, cache)[:, -1])[:, None]
    cache.reset()
    model(prompt, cache)
    torch.cuda.synchronize()
    module_records(reset=True)
    sampling_ops.argmax(model(token, cache)[:, -1])  # the stamped step: one graph replay
    torch.cuda.synchronize()
    records = np.concatenate(module_records())
    # one array of records a launch (%gridid), in the order of their first waits
    order = sorted((records[records["grid"] == grid] for grid in np.unique(records["grid"])),
                   key=lambda rs: int(rs["wait"].min()))
    first_waits = [int(rs["wait"].min()) for rs in order]
    names = [name for name, _, _ in host[-len(order):]] if len(host) >= len(order) else ["?"] * len(order)
    origin = first_waits[0]
    rows, by_name = [], defaultdict(float)
    for i, (rs, name) in enumerate(zip(order, names)):
        wait = first_waits[i]
        following = first_waits[i + 1] if i + 1 < len(order) else wait
        starts = rs["start"].astype(np.float64)
        prewait = (rs["ready"].astype(np.float64) - starts) / 1e3  # thread 0's start to its release of the next launch
        marks = (rs["marks"].astype(np.float64) - wait) / 1e3  # timeline_mark points, from the launch's first wait
        marked = {m for m in range(MARKS) if rs["marks"][:, m].all()}
        row = {"instance": name, "grid": [int(rs[0]["grid_x"]), int(rs[0]["grid_y"])], "blocks": len(rs),
               "first_start_us": (starts.min() - origin) / 1e3, "median_start_us": (np.median(starts) - origin) / 1e3,
               "last_start_us": (starts.max() - origin) / 1e3, "wait_us": (wait - origin) / 1e3,
               "last_wait_us": (int(rs["wait"].max()) - origin) / 1e3, "gap_us": (following - wait) / 1e3,
               "late_blocks": int((starts > wait).sum()),
               "prewait_us": float(np.median(prewait)), "last_prewait_us": float(prewait.max()),
               # a mark's median and latest over the blocks, where every block passed it (None: not marked)
               "marks_us": [float(np.median(marks[:, m])) if m in marked else None for m in range(MARKS)],
               "last_marks_us": [float(marks[:, m].max()) if m in marked else None for m in range(MARKS)]}
        rows.append(row)
        by_name[name.partition("<")[0]] += row["gap_us"]
    per_layer = len(rows) // max(1, model.config.num_hidden_layers)
    for row in rows[: args.layers * per_layer + 1] + rows[-4:]:
        print(f"{row['instance'][:48]:48s} grid {str(row['grid']):12s} blocks {row['blocks']:5d} start "
              f"{row['first_start_us']:9.2f} (median {row['median_start_us']:9.2f}, last {row['last_start_us']:9.2f}) "
              f"wait {row['wait_us']:9.2f} (last {row['last_wait_us']:9.2f}) gap {row['gap_us']:7.2f} us "
              f"late {row['late_blocks']} pre-wait {row['prewait_us']:.2f} (most {row['last_prewait_us']:.2f})"
              + (f" marks {signed(row['marks_us'])} (last {signed(row['last_marks_us'])})"
                 if any(m is not None for m in row["marks_us"]) else ""))
    print(f"{len(rows)} launches stamped ({len(host)} host launches seen while capturing), "
          f"{(max(r['wait_us'] for r in rows)):.1f} us from the first wait to the last")
    for name, total in sorted(by_name.items(), key=lambda item: -item[1]):
        print(f"  {name:28s} {total:9.1f} us in the chain")
    if args.records_out:  # per block: which SM, when it started, waited, passed each mark (spread, stragglers)
        np.savez_compressed(args.records_out, instances=np.array(names),
                            **{f"records_{i}": rs for i, rs in enumerate(order)})
    if args.json_out:
        args.json_out.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "shape": args.shape,
                                             "position": args.position, "launches": rows}, indent=1))


if __name__ == "__main__":
    main()
