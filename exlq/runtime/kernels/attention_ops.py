"""One-token attention over a KV cache (`cuda/decode_attention.cu`): the decode step's SDPA call, reading only the
keys from the window's start to the token's position (a captured graph's SDPA reads its whole span, masked) and
sharing each KV head's loads among its query heads. Its grid depends on the batch, the heads and the cluster size the
span picks (`ranks`), not on the position, so a captured graph serves every position of its span (`graph_span`). The
torch path (`attention.attend`, SDPA) is the reference."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import torch

from exlq.errors import ExlqError
from exlq.runtime.kernels import ACTIVATION_TAGS
from exlq.runtime.kernels.launch import hopper_or_newer, kernel, launch

SOURCE = "decode_attention.cu"
CHUNKS = (32, 64)  # keys a block takes at a time: the template's CHUNK
THREADS = 128  # ATT_THREADS
HEAD_DIMS = (64, 128)
MAX_GROUP = 8  # query heads a KV head serves, at most
MAX_RANKS = 16  # ATT_MAX_RANKS: blocks a (batch row, KV head) at most, one thread-block cluster (sm_90+)
#: Spans up to LONG_SPAN take clusters of 8 blocks a head, longer ones 16. Session 28 (H200, the pull merge) put the
#: line at 2048 (Llama-3-8B's heads, µs a layer, 8 against 16: the token at 1023 4.9 against 6.0, at 2047 12.1
#: against 9.9). On the H100 with today's kernel (session 47) 16 ranks win from 1023 on at every head shape alone
#: (the 8B at 1023: 8.0 µs pulling from 8, 7.1 from 16, 6.1 pushing from 16), and 8 at 511; in the decode step at
#: positions 1100-1356 the 8B gains 3.6 % with 16, Qwen2.5-0.5B is even: 1024. A generation that crosses it captures
#: a second graph (40-60 ms of host time).
LONG_SPAN = 1024

INSTANCES = tuple(
    f"{name}<{tag}, {dim}, {group}, {chunk}>" for name in ("decode_attention", "rope_decode_attention")
    for tag in ACTIVATION_TAGS.values() for dim in HEAD_DIMS for group in range(1, MAX_GROUP + 1) for chunk in CHUNKS
)
#: One token of one sequence whose q/k/v GEMV left its products as sums: the attention launch ends them, rotates them
#: and writes the cache row itself (rope_attention), so no finish_rope_store runs before it: one launch a layer
#: fewer (session 45, H100: the 8B +2.2 %, Qwen2.5-0.5B +2.3 %, Llama-3.2-1B +3.0 %). EXLQ_ROPE_ATTENTION=0: two launches.
ROPE_ATTENTION = os.environ.get("EXLQ_ROPE_ATTENTION", "1") != "0"
#: A cluster's ranks merge by pushing their pieces into each owner's shared memory before one cluster barrier, rather
#: than reading the others' records after one and holding every rank for a second (the kernel's push_merge), at the
#: head sizes of PUSH_HEAD_DIMS, and at every head size in clusters of PUSH_RANKS. EXLQ_ATTENTION_PUSH=0 pulls
#: everywhere (an A/B switch, read at every launch; graphs keep what they captured).
PUSH_MERGE = os.environ.get("EXLQ_ATTENTION_PUSH", "1") != "0"
#: Head sizes that push (session 46, H100, in-process A/B): alone the push is 0.6-1.4 µs a call faster at both sizes,
#: and in the decode step Qwen2.5-0.5B gains 1.1-2.3 % and Llama-3.2-1B 1.4 % (head size 64), but the 8B (128) lost
#: 0.0-0.9 % in three A/Bs (docs/benchmarks.md, session 46), so 128 pulls.
PUSH_HEAD_DIMS = (64,)
#: Clusters this large push at every head size: 16 ranks have twice the records to pull, and the 8B (head size 128)
#: gains 1.4 % by pushing at positions 2100-2356 (session 47, H100, in-process A/B; alone 1.0 µs a call faster).
PUSH_RANKS = 16


def pushes(dim: int, ranks: int) -> bool:
    """Whether a cluster of `ranks` blocks over heads of size `dim` merges by pushing (PUSH_MERGE, PUSH_HEAD_DIMS,
    PUSH_RANKS)."""
    return PUSH_MERGE and ranks > 1 and (dim in PUSH_HEAD_DIMS or ranks >= PUSH_RANKS)


def enabled() -> bool:
    """EXLQ_DECODE_ATTENTION=0 keeps one-token steps on SDPA (an A/B switch; read at every call, so a benchmark can
    flip it; graphs keep what they captured)."""
    return os.environ.get("EXLQ_DECODE_ATTENTION", "1") != "0"


def takes_heads(head_dim: int, heads: int, kv_heads: int) -> bool:
    """Whether the kernel was built for this attention shape: a head size of HEAD_DIMS, ≤ MAX_GROUP query heads a
    KV head."""
    return head_dim in HEAD_DIMS and heads % kv_heads == 0 and heads // kv_heads <= MAX_GROUP


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a step's attention (q [B, Hq, T, D] on a kernel-enabled GPU, `kernels.applies`; k and v
    [B, Hkv, span, D]) can take the kernel: one token, a head size and group it was built for, keys and values as
    16-byte aligned rows of D contiguous elements (a left-padded batch too: the kernel skips each row's padding)."""
    return q.shape[2] == 1 and takes_caches(q.shape[1], q.dtype, k, v)


def takes_caches(heads: int, dtype: torch.dtype, k: torch.Tensor, v: torch.Tensor) -> bool:
    """applies' conditions on all but the query's length: `heads` query heads in `dtype` over k and v."""
    bsz, kv_heads, _, dim = k.shape
    return (
        enabled() and takes_heads(dim, heads, kv_heads)
        and k.dtype == dtype == v.dtype and k.stride() == v.stride()
        and k.stride(3) == 1 and k.stride(2) == dim and k.stride(1) % 8 == 0 and k.stride(0) % 8 == 0
        and k.data_ptr() % 16 == 0 and v.data_ptr() % 16 == 0 and bsz * k.stride(0) < 2**31
    )


def chunk_size() -> int:
    """Keys a block takes at a time: 64 (EXLQ_ATTENTION_CHUNK=32 forces 32: an A/B switch, read at every call)."""
    forced = os.environ.get("EXLQ_ATTENTION_CHUNK")
    if forced:
        if forced not in {str(c) for c in CHUNKS}:
            raise ExlqError(f"EXLQ_ATTENTION_CHUNK must be one of {CHUNKS}, not {forced!r}")
        return int(forced)
    return 64


_clusters_refused: set[torch.device] = set()  # devices whose driver refused a cluster launch: one block a head there


def ranks(device: torch.device, span: int) -> int:
    """Blocks a (batch row, KV head) on `device` over `span` keys: one cluster on sm_90+ of 8, or 16 past LONG_SPAN;
    else 1 (clusters need sm_90; or the driver refused one). EXLQ_ATTENTION_RANKS=1|2|4|8|16 forces a count on
    sm_90+ (an A/B switch)."""
    if not hopper_or_newer(device) or device in _clusters_refused:
        return 1
    forced = os.environ.get("EXLQ_ATTENTION_RANKS")
    if forced:
        if forced not in {"1", "2", "4", "8", "16"}:
            raise ExlqError(f"EXLQ_ATTENTION_RANKS must be 1, 2, 4, 8 or 16, not {forced!r}")
        return int(forced)
    return 8 if span <= LONG_SPAN else MAX_RANKS


def graph_span(end: int, capacity: int) -> int:
    """The span of a captured one-token step whose token ends at `end` in a cache of `capacity` positions: the
    longest one with the same launch as `end` keys (LONG_SPAN until the token passes it, then the whole cache), so a
    generation captures one graph, or two."""
    return min(capacity, LONG_SPAN) if end <= LONG_SPAN else capacity


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor | int, window: int | None,
    pad_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ/√D) v for one token: q [B, Hq, 1, D]; k, v [B, Hkv, span, D]; `position` (an int, or a [1]
    int64 device tensor in CUDA graphs, below span) the token's cache position: keys after it are not read, nor keys
    `window` or more before it, nor the first pad_lengths[b] keys of row b (a left-padded batch: [B] contiguous int64
    on q's device, as model.forward makes the cache's and the graphs keep theirs; a row sees its own token whatever
    its padding, as attention.build_mask lets it). Returns [B, Hq, 1, D]."""
    heads, dim, kv_heads = q.shape[1], q.shape[3], k.shape[1]
    check_position(position, k)
    q = q.contiguous()
    out = torch.empty_like(q)
    device_position = position if isinstance(position, torch.Tensor) else None
    arguments = (q, k, v, k.stride(0), k.stride(1), kv_heads, device_position,
                 0 if device_position is not None else position, window or 0, pad_lengths,
                 math.log2(math.e) / math.sqrt(dim), out)
    launch_heads("decode_attention", heads, k, arguments)
    return out


def rope_attention(
    sums: Sequence, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    position: torch.Tensor | int, window: int | None, heads: int,
) -> torch.Tensor:
    """decode_attention for one token of one sequence whose q, k and v are their GEMV's unfinished sums (`sums`: their
    fused_ops.UnfinishedSums, handed over: this launch re-zeroes them): RoPE (`cos`, `sin`: the token's [1, D] rows, or
    any shape of D·1 elements) and the append of its key and value to the caches k, v [1, Hkv, span, D] at `position`
    (its row must lie in the span) in the same launch, as fused_ops.rope_store and decode_attention would do them in
    two. Returns [1, heads, 1, D]."""
    kv_heads, dim = k.shape[1], k.shape[3]
    check_position(position, k)
    if k.shape[0] != 1 or cos.numel() != dim or sin.numel() != dim:
        raise ExlqError("rope_attention takes one token of one sequence")
    out = torch.empty(1, heads, 1, dim, dtype=k.dtype, device=k.device)
    device_position = position if isinstance(position, torch.Tensor) else None
    arguments = (*(x for s in sums for x in (s.sums, s.bias)), cos.contiguous(), sin.contiguous(), k, v, k.stride(1),
                 kv_heads, device_position, 0 if device_position is not None else position, window or 0,
                 math.log2(math.e) / math.sqrt(dim), out)
    launch_heads("rope_decode_attention", heads, k, arguments)
    return out


def check_position(position: torch.Tensor | int, k: torch.Tensor) -> None:
    """A host-side position must lie in k's span (a device tensor's cannot be checked without a sync)."""
    if isinstance(position, int) and not 0 <= position < k.shape[2]:
        raise ExlqError(f"decode attention at position {position} over {k.shape[2]} keys")


def launch_heads(name: str, heads: int, k: torch.Tensor, arguments: tuple) -> None:
    """Launch instance `name` of the kernel (for `heads` query heads over k [B, Hkv, span, D]) with `arguments` and the
    merge's choice (`pushes`): grid (B·Hkv, ranks), one cluster of ranks a (row, KV head) where the device takes it
    (else one block a head, from then on)."""
    bsz, kv_heads, span, dim = k.shape
    instance = f"{name}<{ACTIVATION_TAGS[k.dtype]}, {dim}, {heads // kv_heads}, {chunk_size()}>"
    function = kernel(SOURCE, INSTANCES, instance, k.device)
    count = ranks(k.device, span)
    try:
        launch(function, (bsz * kv_heads, count, 1), (THREADS, 1, 1), (*arguments, pushes(dim, count)), k.device,
               overlap=True, cluster=(1, count, 1) if count > 1 else None)
    except ExlqError as error:
        if count == 1:
            raise
        # A GPU slice with too few SMs a cluster's reach (MIG), or a driver without clusters: the kernel is correct
        # with one block a head, which walks every chunk (slower on long contexts). Seen first in an eager step
        # (a graph's warm-up), so no capture holds the failed launch.
        _clusters_refused.add(k.device)
        warnings.warn(f"{error}: one-token attention takes one block a head on {k.device} from now on",
                      RuntimeWarning, stacklevel=2)
        launch(function, (bsz * kv_heads, 1, 1), (THREADS, 1, 1), (*arguments, False), k.device, overlap=True)
