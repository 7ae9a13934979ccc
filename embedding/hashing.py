"""Raw 64-bit ids → table rows, by salted hashing, inside the model.

Raw ids in the logs are arbitrary 64-bit values (never dense indices). ``IdHasher`` maps every
value of a KeyedJaggedTensor to ``mix64(raw ^ salt[key]) mod hash_size[key]`` where the salt is a
stable hash of the *field name*: two fields sharing one table therefore do not collide
systematically — except on an id-space table (``FeatureSchema.id_space_tables``: a target field
and the history on one table), whose features are all salted by the table's name so the same raw
id reads the same row. All keys are hashed in one vectorized pass (no per-key Python loop): the
per-key salt and size are expanded to per-value tensors with ``repeat_interleave`` over
``length_per_key``. Managed collision (MCH/ZCH) replaces this module in a later stage.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 multipliers, as signed int64
_M2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's ``>>`` is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 tensors (wrapping multiply)."""
    x = x ^ _shr(x, 30)
    x = x * _M1
    x = x ^ _shr(x, 27)
    x = x * _M2
    return x ^ _shr(x, 31)


def name_salt(name: str) -> int:
    """A stable 63-bit salt for a feature name."""
    h = zlib.crc32(name.encode()) | (zlib.crc32(name.encode()[::-1]) << 32)
    return h & ((1 << 63) - 1)


class IdHasher(nn.Module):
    """Hash each key's raw ids into its table's ``hash_size`` rows.

    Example, keys ``["a", "b"]`` with sizes ``[10, 1000]``::

        raw KJT      a: [[7], [7, 9]]   b: [[7], []]
        hashed KJT   a: [[h_a(7) % 10], [h_a(7) % 10, h_a(9) % 10]]   b: [[h_b(7) % 1000], []]
    """

    def __init__(self, keys: list[str], hash_sizes: list[int], salt_names: list[str] | None = None) -> None:
        """``salt_names``: the name each key is salted by (default: the key itself)."""
        super().__init__()
        self.keys = list(keys)
        salt_names = list(keys) if salt_names is None else list(salt_names)
        if len(salt_names) != len(self.keys) or len(hash_sizes) != len(self.keys):
            raise ValueError(f"IdHasher: {len(self.keys)} keys, {len(hash_sizes)} sizes, {len(salt_names)} salts")
        self.register_buffer("salts", torch.tensor([name_salt(k) for k in salt_names], dtype=torch.int64),
                             persistent=False)
        self.register_buffer("sizes", torch.tensor(hash_sizes, dtype=torch.int64), persistent=False)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if kjt.keys() != self.keys:
            raise ValueError(f"IdHasher expects keys {self.keys[:5]}…, got {kjt.keys()[:5]}…")
        # ids per key from the lengths (a tensor op): no Python list of per-key counts, which
        # torch.export would trace as one data-dependent size per key and sums of them — minutes
        # of symbolic reasoning for a schema of hundreds of fields
        values = kjt.values()
        if kjt.variable_stride_per_key():
            raise ValueError("IdHasher: variable batch size per feature is not supported")
        per_key = kjt.lengths().view(len(self.keys), -1).sum(1).long().to(self.salts.device)
        salt = torch.repeat_interleave(self.salts, per_key, output_size=values.numel())
        size = torch.repeat_interleave(self.sizes, per_key, output_size=values.numel())
        rows = torch.remainder(mix64(values.long() ^ salt), size)
        return KeyedJaggedTensor(
            keys=kjt.keys(), values=rows, lengths=kjt.lengths(), offsets=kjt.offsets_or_none(),
            stride=kjt.stride(), length_per_key=kjt.length_per_key_or_none(),
            offset_per_key=kjt.offset_per_key_or_none(),
        )
