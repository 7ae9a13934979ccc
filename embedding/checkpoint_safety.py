"""A DCP checkpoint's ``.metadata`` read safely: DCP unpickles it with plain ``pickle.load``, so
``verify_metadata`` first replays the pickle through an allow-list (DCP's metadata classes,
tensor sizes, dtypes, devices) and refuses anything else. Used before every load — training's
warm starts and resumes (``jobs.checkpoint``) and the unsharded export (``deploy.export``) —
and kept here, below both, so serving does not import the trainer.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from embedding import storage


class UnsafeCheckpointError(ValueError):
    """A checkpoint's DCP metadata names a Python object outside the allow-list."""


_SAFE_MODULES = ("torch.distributed.checkpoint.",)  # Metadata, TensorStorageMetadata, _StorageInfo, …
_SAFE_GLOBALS = {("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"),
                 ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "Path")}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith(_SAFE_MODULES) or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"'{module}.{name}'")

    def persistent_load(self, pid):  # DCP metadata has none; refuse rather than guess
        raise UnsafeCheckpointError(f"persistent id {pid!r}")


def verify_metadata(ckpt: str | Path) -> None:
    """Refuse a checkpoint whose DCP ``.metadata`` pickle would construct anything but DCP
    metadata (DCP itself reads it with plain ``pickle.load``)."""
    path = storage.join(ckpt, ".metadata")  # a local path or an object-store URI
    if not storage.exists(path):
        raise FileNotFoundError(f"{ckpt} has no DCP .metadata: not a complete checkpoint")
    try:
        _AllowListUnpickler(io.BytesIO(storage.read_bytes(path))).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path} would unpickle {e}, which is not DCP checkpoint metadata; "
                                    f"refusing to load it (was the file written by tokenrec?)") from None
