"""The key/value cache: preallocated for `max_seq_len`, allocated lazily on first use.

`max_seq_len` is fixed when the cache is made and never changed behind the user's back: input
that does not fit is an error. All rows of a batch share one length; unequal prompts are left
padded and the pad lengths are remembered here so every later step masks and positions them.

Keys and values are each kept by a store: dense in the model dtype (the fp16 cache type), or
quantized (`exlq.runtime.kv_quant`: packed codes and one fp16 scale per group, after a short
dense prefix; each row's offset and key channel scales come from its first real positions and the
queries seen there). A quantized store quantizes only the new positions on write and dequantizes
the whole history on read (on a GPU one kernel into a scratch buffer), so attention always sees
dequantized keys/values, the new positions included. A position's cached value depends only on
its own key/value vector and its row's statistics window, never on how the input was chunked,
and a rewind followed by the same input writes bit-identical codes. `write_at`/`read_span` are the
position-independent forms the CUDA-graph step uses (`exlq.runtime.graphs`).
"""

from __future__ import annotations

import torch

from exlq.errors import ExlqError
from exlq.runtime import kernels
from exlq.runtime.kernels import kv_ops
from exlq.runtime.kv_quant import (
    SCALE_DTYPE,
    CacheType,
    as_cache_type,
    dequantize_kv,
    key_channel_scales,
    packed_size,
    quantize_kv,
)

Shape = tuple[int, int, int, int]  # [batch, kv_heads, max_seq_len, head_dim]


class DenseStore:
    """One side (keys or values) of every layer, unquantized in the model dtype."""

    def __init__(self, num_layers: int, shape: Shape, dtype: torch.dtype, device: torch.device):
        self.num_layers, self.shape, self.dtype, self.device = num_layers, shape, dtype, device
        self.data: list[torch.Tensor] = []

    @property
    def bytes_per_position(self) -> int:
        """Bytes one position of one batch row takes over all layers and heads."""
        _, heads, _, dim = self.shape
        return self.num_layers * heads * dim * torch.tensor([], dtype=self.dtype).element_size()

    def bytes_for(self, length: int) -> int:
        return length * self.bytes_per_position

    def allocate(self) -> None:
        self.data = [torch.zeros(self.shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

    def write(self, layer: int, x: torch.Tensor, start: int, pad: torch.Tensor | None = None) -> None:
        self.data[layer][: x.shape[0], :, start : start + x.shape[2]] = x

    def write_at(self, layer: int, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Write x [B, H, T, D] at cache positions `positions` [T] (a device tensor: CUDA graphs)."""
        self.data[layer][: x.shape[0]].index_copy_(2, positions, x)

    def read(self, layer: int, batch: int, end: int) -> torch.Tensor:
        return self.data[layer][:batch, :, :end]


class QuantizedStore:
    """One side of every layer: a dense prefix, then packed b-bit codes and fp16 scales per group.

    The first `prefix` positions stay unquantized (in the model dtype); once they are written,
    their mean per (row, head, channel) becomes the offset every later position is quantized
    relative to. Qwen2 keys carry a near-constant channel offset (from the k_proj bias, in the
    RoPE channels that barely rotate) of up to ~150 against a spread of ~1: quantizing around it
    spends every level on the constant, which 4-bit keys cannot afford (perplexity 40 -> 136 on
    qwen2.5-coder-0.5b without it; docs/benchmarks.md). The prefix also keeps attention-sink
    tokens exact. Positions after it are stored as codes [B, H, S, D·b/8] and scales [B, H, S, D/group]
    (the first `prefix` slots of those stay unused, so positions index them directly).

    In a left-padded batch a row's statistics (offset, channel scales) come from its own first `prefix`
    real positions (`statistics_window`), not from its padding: with the padding's keys as the offset,
    a padded row's q4 KL on Qwen2.5-0.5B was 9× worse (0.35 vs 0.038; bench/kv_padding.py). The
    physical dense prefix stays positions 0..prefix-1 (padding, for such a row).

    With `channel_scales` (the keys' store), the completed prefix also fixes a multiplier per
    (row, head, channel), `kv_quant.key_channel_scales`: positions are quantized as (x - offset)·s
    and read back as x̂/s + offset. It weighs each channel by how much the queries look at it
    (their energy over the prefix positions, handed over by `observe_queries` before the keys
    are written; without it, s² = 1/spread): Qwen2.5-0.5B's q4 perplexity cost falls from +19 % to
    +2 % (+4.6 % from the key spread alone; docs/benchmarks.md). The quantize/dequantize functions
    (and CUDA kernels) see only the offset and scaled float32 tensor.
    """

    def __init__(
        self, num_layers: int, shape: Shape, dtype: torch.dtype, device: torch.device, bits: int, group: int, prefix: int,
        channel_scales: bool = False,
    ):  # fmt: skip
        self.num_layers, self.shape, self.dtype, self.device = num_layers, shape, dtype, device
        self.bits, self.group, self.prefix = bits, group, min(prefix, shape[2])
        self.channel_scales = channel_scales and self.prefix > 0
        self.codes: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] = []
        self.dense = DenseStore(num_layers, (*shape[:2], self.prefix, shape[3]), dtype, device)
        self.offsets: list[torch.Tensor] = []  # [B, H, 1, D] float32 per layer
        self.multipliers: list[torch.Tensor] = []  # [B, H, 1, D] float32 per layer (channel_scales only)
        self.query_energy: list[torch.Tensor] = []  # [B, H, prefix, D] float32 per layer (channel_scales only)
        self.scratch: torch.Tensor | None = None  # [B, H, S, D] in dtype: what reads return on a GPU

    @property
    def bytes_per_position(self) -> int:
        _, heads, _, dim = self.shape
        scale_bytes = torch.tensor([], dtype=SCALE_DTYPE).element_size()
        return self.num_layers * heads * (packed_size(dim, self.bits) + dim // self.group * scale_bytes)

    def bytes_for(self, length: int) -> int:
        """Bytes of `length` positions of one row: the dense prefix, then codes and scales."""
        dense = min(length, self.prefix)
        return dense * self.dense.bytes_per_position + (length - dense) * self.bytes_per_position

    def allocate(self) -> None:
        batch, heads, length, dim = self.shape
        code_shape = (batch, heads, length, packed_size(dim, self.bits))
        scale_shape = (batch, heads, length, dim // self.group)
        self.codes = [torch.zeros(code_shape, dtype=torch.uint8, device=self.device) for _ in range(self.num_layers)]
        self.scales = [torch.zeros(scale_shape, dtype=SCALE_DTYPE, device=self.device) for _ in range(self.num_layers)]
        self.offsets = [torch.zeros(batch, heads, 1, dim, device=self.device) for _ in range(self.num_layers)]
        if self.channel_scales:
            self.multipliers = [torch.ones(batch, heads, 1, dim, device=self.device) for _ in range(self.num_layers)]
            energy_shape = (batch, heads, self.prefix + 1, dim)  # + a spare slot for positions outside windows
            self.query_energy = [torch.zeros(energy_shape, device=self.device) for _ in range(self.num_layers)]
        self.dense.allocate()

    @property
    def uses_kernels(self) -> bool:
        """The CUDA kernels quantize and dequantize on a kernel-enabled GPU (groups of 32 only), else torch."""
        return self.group == kv_ops.GROUP and kernels.enabled(self.device)

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.uses_kernels:
            return kv_ops.quantize(x, self.bits)
        return quantize_kv(x, self.bits, self.group)

    def _dequantize(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        if self.uses_kernels:  # an fp32 model on a GPU (fp16/bf16 ones read into the scratch buffer)
            return kv_ops.dequantize(codes, scales, self.bits, torch.float32)
        return dequantize_kv(codes, scales, self.bits, self.group, torch.float32)

    @property
    def reads_into_scratch(self) -> bool:
        """On a kernel-enabled GPU a read is one kernel into a dense scratch buffer shared by all layers."""
        return self.uses_kernels and self.dtype in kernels.ACTIVATION_TAGS

    def statistics_window(self, start: int, length: int, pad: torch.Tensor | None, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For positions start..start+length-1: each row's slot in its statistics window and whether it has one.

        A row's window is its first `prefix` real positions, pad..pad+prefix-1 (left padding is not
        text: its keys would make a meaningless offset), so slot = position - pad, valid in 0..prefix-1."""
        positions = torch.arange(start, start + length, device=self.device)
        first = pad[:rows, None] if pad is not None else torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        slots = positions[None, :] - first
        return slots, (slots >= 0) & (slots < self.prefix)

    def observe_queries(self, layer: int, queries: torch.Tensor, start: int, pad: torch.Tensor | None = None) -> None:
        """Record the energy of queries [B, Hq, T, D] at positions start.. that fall in their row's statistics
        window (see statistics_window), summed over the query heads that share each KV head. Call it before
        writing the same positions' keys (the write that completes the dense prefix fixes the channel scales)."""
        if not self.channel_scales:
            return
        rows, query_heads, length, dim = queries.shape
        heads = self.shape[1]
        energy = queries.float().pow(2).reshape(rows, heads, query_heads // heads, length, dim).sum(2)
        slots, valid = self.statistics_window(start, length, pad, rows)
        slots = torch.where(valid, slots, self.prefix)  # outside the window: the spare last slot, never read
        self.query_energy[layer][:rows].scatter_(2, slots[:, None, :, None].expand_as(energy), energy)

    def _fix_statistics(self, layer: int, x: torch.Tensor, start: int, pad: torch.Tensor | None) -> None:
        """Offset (and channel scales) of each row from its statistics window, by the write that completes the prefix.

        The window's keys come from the dense prefix and this write (x holds positions start..); a row whose
        window has not started by the end of this write (more left padding than that) falls back to the
        first `prefix` positions."""
        rows, heads, _, dim = x.shape
        known = torch.cat([self.dense.read(layer, rows, start), x], dim=2).float()  # positions 0..end-1
        end = known.shape[2]
        slots = torch.arange(self.prefix, device=self.device)[None]  # [1, P]
        positions = slots + pad[:rows, None] if pad is not None else slots.expand(rows, -1)  # [rows, P]
        positions = torch.where(positions[:, :1] < end, positions, slots)
        valid = (positions < end)[:, None, :, None].float()  # [rows, 1, P, 1]
        window = known.gather(2, positions.clamp(max=end - 1)[:, None, :, None].expand(rows, heads, self.prefix, dim))
        self.offsets[layer][:rows] = offset = (window * valid).sum(2, keepdim=True) / valid.sum(2, keepdim=True)
        if self.channel_scales:
            energy = self.query_energy[layer][:rows, :, : self.prefix]
            self.multipliers[layer][:rows] = key_channel_scales((window - offset) * valid, energy * valid, valid)

    def write(self, layer: int, x: torch.Tensor, start: int, pad: torch.Tensor | None = None) -> None:
        """Write x [B, H, T, D] at positions start..; `pad` [B]: the rows' left-padding lengths (or None)."""
        rows, end = x.shape[0], start + x.shape[2]
        split = min(max(self.prefix - start, 0), x.shape[2])  # how many of the new positions are prefix
        if split:
            self.dense.write(layer, x[:, :, :split], start)
            if start + split == self.prefix:  # the prefix is complete: (re)fix the offset and channel scales
                self._fix_statistics(layer, x, start, pad)
        if split == x.shape[2]:
            return
        codes, scales = self._encode(layer, x[:, :, split:])
        self.codes[layer][:rows, :, start + split : end] = codes
        self.scales[layer][:rows, :, start + split : end] = scales

    def _encode(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and scales of positions past the prefix: offset subtracted, key channels scaled, quantized."""
        rows = x.shape[0]
        centered = x.float() - self.offsets[layer][:rows]
        if self.channel_scales:
            centered = centered * self.multipliers[layer][:rows]
        return self._quantize(centered)

    def write_at(self, layer: int, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Write x [B, H, T, D] at cache positions `positions` [T] (a device tensor: CUDA graphs), all past the
        dense prefix, so offsets and channel scales are fixed: the same codes as `write` gives them."""
        rows = x.shape[0]
        if self.uses_kernels and x.dtype in kernels.ACTIVATION_TAGS:  # one fused kernel (a graph step's hot path)
            multiplier = self.multipliers[layer] if self.channel_scales else None
            kv_ops.quantize_at(x, self.offsets[layer], multiplier, positions, self.codes[layer], self.scales[layer], self.bits)
            return
        codes, scales = self._encode(layer, x)
        self.codes[layer][:rows].index_copy_(2, positions, codes)
        self.scales[layer][:rows].index_copy_(2, positions, scales)

    def read(self, layer: int, batch: int, end: int) -> torch.Tensor:
        """Positions 0..end-1 of the first `batch` rows, dequantized, in the model dtype [batch, H, end, D].

        On a GPU the result is a view of the store's scratch buffer, valid until the next read of this
        store (attention uses it at once); on the CPU a new tensor."""
        if end <= self.prefix:
            return self.dense.read(layer, batch, end)
        if self.reads_into_scratch:
            return self._read_into_scratch(layer, batch, end)
        dense = self.dense.read(layer, batch, self.prefix)
        codes, scales = self.codes[layer][:batch, :, self.prefix : end], self.scales[layer][:batch, :, self.prefix : end]
        rest = self._dequantize(codes, scales)
        if self.channel_scales:
            rest = rest / self.multipliers[layer][:batch]
        rest = (rest + self.offsets[layer][:batch]).to(self.dtype)
        return torch.cat([dense, rest], dim=2) if self.prefix else rest

    def _read_into_scratch(self, layer: int, batch: int, end: int) -> torch.Tensor:
        if self.scratch is None:
            self.scratch = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        out = self.scratch
        divisors = self.multipliers[layer] if self.channel_scales else None
        kv_ops.dequantize_into(out, self.codes[layer], self.scales[layer], self.offsets[layer], divisors,
                               self.bits, batch, 0, end, dense=self.dense.data[layer])  # fmt: skip
        return out[:batch, :, :end]


def make_store(
    bits: int | None, cache_type: CacheType, num_layers: int, shape: Shape, dtype: torch.dtype, device: torch.device,
    channel_scales: bool = False,
) -> DenseStore | QuantizedStore:  # fmt: skip
    if bits is None:
        return DenseStore(num_layers, shape, dtype, device)
    return QuantizedStore(
        num_layers, shape, dtype, device, bits, cache_type.group, cache_type.dense_prefix, channel_scales
    )


class KVCache:
    """Keys and values for every decoder layer, laid out [batch, kv_heads, max_seq_len, head_dim]."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        cache_type: CacheType | str | None = None,
    ):
        if max_seq_len < 1 or batch_size < 1:
            raise ExlqError(f"max_seq_len and batch_size must be positive (got {max_seq_len}, {batch_size})")
        self.cache_type = as_cache_type(cache_type)
        self.cache_type.check_head_dim(head_dim)
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.seq_len = 0
        self._pad_lengths: torch.Tensor | None = None
        self.max_pad = 0  # the longest left padding, on the host
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        key_scales = self.cache_type.key_scales
        self.keys = make_store(self.cache_type.key_bits, self.cache_type, num_layers, shape, dtype, self.device, key_scales)
        self.values = make_store(self.cache_type.value_bits, self.cache_type, num_layers, shape, dtype, self.device)
        self._allocated = False

    @classmethod
    def for_model(
        cls, model, max_seq_len: int, batch_size: int = 1, *, cache_type: CacheType | str | None = None
    ) -> KVCache:
        """A cache shaped for `model` (its layer count, KV heads, head size, dtype and device).

        `cache_type`: a CacheType, a name ("fp16", "q4", "q6", "q8") or None (fp16).
        """
        return cls(
            num_layers=model.num_cache_layers,
            num_kv_heads=model.config.num_key_value_heads,
            head_dim=model.config.head_dim,
            max_seq_len=max_seq_len,
            batch_size=batch_size,
            dtype=model.dtype,
            device=model.device,
            cache_type=cache_type,
        )

    @property
    def allocated(self) -> bool:
        return self._allocated

    @property
    def pad_lengths(self) -> torch.Tensor | None:
        """Left-padding length of each row [B] (unequal prompts of a batch), or None."""
        return self._pad_lengths

    @pad_lengths.setter
    def pad_lengths(self, pad: torch.Tensor | None) -> None:
        self._pad_lengths = pad
        self.max_pad = 0 if pad is None else int(pad.max())

    @property
    def bytes_per_token(self) -> int:
        """Bytes one more position takes in the whole cache (all layers, keys and values, all batch rows).

        For a quantized cache: a position after its dense prefix (see bytes_for)."""
        return (self.keys.bytes_per_position + self.values.bytes_per_position) * self.batch_size

    def bytes_for(self, length: int) -> int:
        """Bytes that `length` positions of one sequence take (all layers, keys and values; a
        quantized cache's dense prefix included): what bytes_per_token alone would miss."""
        return self.keys.bytes_for(length) + self.values.bytes_for(length)

    def check_fits(self, batch: int, new_len: int) -> None:
        if batch > self.batch_size:
            raise ExlqError(f"batch of {batch} rows does not fit a cache made for {self.batch_size}")
        if self.seq_len + new_len > self.max_seq_len:
            raise ExlqError(
                f"{new_len} new tokens after {self.seq_len} cached ones exceed max_seq_len={self.max_seq_len}; "
                "raise --max-seq-len or shorten the input"
            )

    def store(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, past_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values [B, Hkv, T, D] at `past_len`; return all keys/values so far [B, Hkv, past_len+T, D].

        Dense stores return views of the cache; quantized ones dequantized tensors in the model dtype (on a
        GPU views of a scratch buffer that the next store() into the same layer side overwrites).
        """
        self._allocate()
        batch, _, new_len, _ = keys.shape
        end = past_len + new_len
        self.keys.write(layer, keys, past_len, self.pad_lengths)
        self.values.write(layer, values, past_len, self.pad_lengths)
        return self.keys.read(layer, batch, end), self.values.read(layer, batch, end)

    def write_at(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Write keys/values [B, Hkv, T, D] at cache positions `positions` [T], a device tensor (CUDA graphs);
        only where `static_steps_ok` holds. Read them back with `read_span`."""
        self.keys.write_at(layer, keys, positions)
        self.values.write_at(layer, values, positions)

    def read_span(self, layer: int, batch: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of positions 0..span-1 whatever seq_len is (positions past it are stale: mask them)."""
        return self.keys.read(layer, batch, span), self.values.read(layer, batch, span)

    @property
    def static_steps_ok(self) -> bool:
        """Whether position-independent steps (CUDA graphs) can write here: dense stores, or quantized ones
        whose reads and writes are kernels, once every row's statistics window is written (offsets fixed)."""
        return all(
            isinstance(store, DenseStore)
            or (self.seq_len >= store.prefix + self.max_pad and store.reads_into_scratch)
            for store in (self.keys, self.values)
        )

    def observe_queries(self, layer: int, queries: torch.Tensor, past_len: int) -> None:
        """Show the cache this forward's queries [B, Hq, T, D], before `store` writes its keys.

        Only a quantized key store with channel scales uses them, and only for positions in its dense
        prefix (their energy sets the per-channel key scales); otherwise this does nothing. The model
        passes them before RoPE (layers.Attention): the channels that matter, with large near-constant
        keys, are the slowly rotating ones, and that measured as well as after RoPE."""
        keys = self.keys
        if isinstance(keys, QuantizedStore) and keys.channel_scales and past_len < keys.prefix + self.max_pad:
            self._allocate()
            keys.observe_queries(layer, queries, past_len, self.pad_lengths)

    def dense_layer(self, layer: int, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Whole key/value buffers [batch, Hkv, max_seq_len, D] of one layer, for kernels that write
        in place and read up to their own end; None when either side is quantized."""
        if not (isinstance(self.keys, DenseStore) and isinstance(self.values, DenseStore)):
            return None
        self._allocate()
        return self.keys.data[layer][:batch], self.values.data[layer][:batch]

    def _allocate(self) -> None:
        if not self._allocated:
            self.keys.allocate()
            self.values.allocate()
            self._allocated = True

    def truncate(self, length: int) -> None:
        """Rewind to the first `length` positions (what is beyond is overwritten by later input)."""
        if not 0 <= length <= self.seq_len:
            raise ExlqError(f"cannot truncate a cache of {self.seq_len} positions to {length}")
        self.seq_len = length
        if length == 0:
            self.pad_lengths = None

    def reset(self) -> None:
        self.truncate(0)
