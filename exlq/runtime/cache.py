"""The key/value cache: preallocated for `max_seq_len`, allocated lazily on first use.

`max_seq_len` is fixed when the cache is made and never changed behind the user's back: input
that does not fit is an error. All rows of a batch share one length; unequal prompts are left
padded and the pad lengths are remembered here so every later step masks and positions them.
"""

from __future__ import annotations

import torch

from exlq.errors import ExlqError


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
    ):
        if max_seq_len < 1 or batch_size < 1:
            raise ExlqError(f"max_seq_len and batch_size must be positive (got {max_seq_len}, {batch_size})")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.seq_len = 0
        self.pad_lengths: torch.Tensor | None = None
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    @classmethod
    def for_model(cls, model, max_seq_len: int, batch_size: int = 1) -> KVCache:
        """A cache shaped for `model` (its layer count, KV heads, head size, dtype and device)."""
        return cls(
            num_layers=model.num_cache_layers,
            num_kv_heads=model.config.num_key_value_heads,
            head_dim=model.config.head_dim,
            max_seq_len=max_seq_len,
            batch_size=batch_size,
            dtype=model.dtype,
            device=model.device,
        )

    @property
    def allocated(self) -> bool:
        return bool(self._keys)

    @property
    def bytes_per_token(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element * self.batch_size

    def _allocate(self) -> None:
        shape = (self.batch_size, self.num_kv_heads, self.max_seq_len, self.head_dim)
        self._keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self._values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

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
        """Write new keys/values [B, Hkv, T, D] at `past_len` and return views of everything so far."""
        if not self._keys:
            self._allocate()
        batch, _, new_len, _ = keys.shape
        end = past_len + new_len
        self._keys[layer][:batch, :, past_len:end] = keys
        self._values[layer][:batch, :, past_len:end] = values
        return self._keys[layer][:batch, :, :end], self._values[layer][:batch, :, :end]

    def truncate(self, length: int) -> None:
        """Rewind to the first `length` positions (what is beyond is overwritten by later input)."""
        if not 0 <= length <= self.seq_len:
            raise ExlqError(f"cannot truncate a cache of {self.seq_len} positions to {length}")
        self.seq_len = length
        if length == 0:
            self.pad_lengths = None

    def reset(self) -> None:
        self.truncate(0)
