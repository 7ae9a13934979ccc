"""``Batch``: the one output type of the pipeline, consumed by every tower.

    dense      Tensor[B, Dd] float32        dense fields, schema order
    fields     KeyedJaggedTensor            one key per sparse field (schema order), raw int64 ids
    sequences  KeyedJaggedTensor | None     one key per sequence column, newest last, <= max_len
    labels     Tensor[B, T] float32         one column per task, schema order
    user_ids   Tensor[B] int64              raw user ids (strings hashed), for GAUC
    weights    Tensor[B] float32            1 for real rows, 0 for padding rows
    request_ids Tensor[B] int64 | None      rows that share one are candidates of one request
                                            (``request_id`` column kept by the reader; strings
                                            hashed; -1 for a row of its own); None without one

Ids stay raw 64-bit values here; mapping into table rows is the embedding layer's job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    dense: torch.Tensor
    fields: KeyedJaggedTensor
    sequences: KeyedJaggedTensor | None
    labels: torch.Tensor
    user_ids: torch.Tensor
    weights: torch.Tensor
    request_ids: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            dense=self.dense.to(device, non_blocking=non_blocking),
            fields=self.fields.to(device, non_blocking=non_blocking),
            sequences=None if self.sequences is None
            else self.sequences.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            user_ids=self.user_ids.to(device, non_blocking=non_blocking),
            weights=self.weights.to(device, non_blocking=non_blocking),
            request_ids=None if self.request_ids is None
            else self.request_ids.to(device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense.record_stream(stream)
        self.fields.record_stream(stream)
        if self.sequences is not None:
            self.sequences.record_stream(stream)
        self.labels.record_stream(stream)
        self.user_ids.record_stream(stream)
        self.weights.record_stream(stream)
        if self.request_ids is not None:
            self.request_ids.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(
            dense=self.dense.pin_memory(), fields=self.fields.pin_memory(),
            sequences=None if self.sequences is None else self.sequences.pin_memory(),
            labels=self.labels.pin_memory(), user_ids=self.user_ids.pin_memory(),
            weights=self.weights.pin_memory(),
            request_ids=None if self.request_ids is None else self.request_ids.pin_memory(),
        )
