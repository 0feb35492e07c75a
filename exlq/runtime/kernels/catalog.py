"""Every kernel source in `cuda/` with the instance sets the runtime compiles it with (for CI's compile check).

A source may be compiled as several modules (e.g. one per activation dtype); each set is one module.
"""

from __future__ import annotations

from exlq.runtime.kernels import attention_ops, exl2_ops, exl2_stream_ops, fused_ops, gptq_ops, kv_ops, sampling_ops

SOURCES: dict[str, list[tuple[str, ...]]] = {
    exl2_ops.SOURCE: list(exl2_ops.INSTANCE_SETS.values()),
    exl2_ops.MMA_SOURCE: [exl2_ops.MMA_INSTANCES],
    exl2_stream_ops.SOURCE: [exl2_stream_ops.INSTANCES],
    fused_ops.SOURCE: [fused_ops.INSTANCES],
    kv_ops.SOURCE: [kv_ops.INSTANCES],
    gptq_ops.SOURCE: [gptq_ops.INSTANCES],
    attention_ops.SOURCE: [attention_ops.INSTANCES],
    sampling_ops.SOURCE: [sampling_ops.INSTANCES],
}

#: Prepared kernel variants (EXLQ_NVRTC_DEFINES, compiler.variant_options): macro name -> the sources that test it.
#: Each is timed against the default on a GPU, then kept as the code or dropped; CI compiles every one.
VARIANTS: dict[str, tuple[str, ...]] = {
    # exl2_mma.cu's gather sums reduced across the warp by halving the rows each step (exl2_mma.cuh's
    # scattered_warp_sums), as the multi-row streamed kernel does since session 41: untimed on Ampere/Ada
    "MMA_SCATTERED_SUMS": (exl2_ops.MMA_SOURCE,),
    # a probe, not a variant to merge: every block's start and programmatic-wait stamps (common.cuh, in every source
    # through it), read by bench/step_timeline.py
    "STEP_TIMELINE": tuple(SOURCES),
}
