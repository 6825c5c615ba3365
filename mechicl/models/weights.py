"""Reading a safetensors weight file into a built model without holding the weights twice.

``load_in_place`` is what ``models.loading`` uses for cached model directories: the model is built without random
init (``transformers.initialization.no_init_weights``), its tied weights tied, and every tensor's bytes are then read
from the file straight into the tensor. ``safetensors.torch.load_model`` would hold the whole file beside the model
(a full copy, or a memory map whose touched pages count as resident): on gemma3-270m a fresh process's
load peaked at 2.92 GB before and 1.85 GB after, in 12.2 s and 6.9 s with imports (one thread, this project's 2-core
machine; docs/results/report/cost.txt)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mechicl.errors import ModelUnavailable

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_into(f: BinaryIO, offset: int, dst: torch.Tensor) -> bool:
    """Read ``dst``'s bytes from ``f`` at ``offset`` straight into ``dst`` (contiguous; no staging copy); False when
    the file ends first. The one way mechicl reads tensors from raw files (weights, spilled KV caches)."""
    view = memoryview(dst.view(torch.uint8).numpy()).cast("B")
    f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            return False
        got += n
    return True


@torch.no_grad()
def load_in_place(hf: Any, weights: Path) -> tuple[list[str], list[str]]:
    """Read ``weights`` (a safetensors file) straight into ``hf``'s tensors; returns (missing, unexpected) names as
    ``safetensors.torch.load_model(strict=False)`` does.

    Why not ``load_model``: it holds the whole file in memory beside the model's own tensors (a full copy, or a
    memory map whose touched pages count as resident), so the peak holds the weights twice (gemma3-270m: about 1 GB
    more, the run's peak). Here each tensor's bytes are read with ``readinto`` into the destination tensor itself
    (a staging buffer only where the dtypes differ): no second copy. Reads the safetensors layout directly (an
    8-byte header length, a JSON header of dtype, shape and byte offsets, then the data); shapes must match."""
    own = hf.state_dict()  # tensors sharing the parameters' storage (a tied weight appears under each name)
    with open(weights, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name in sorted(set(header) & set(own)):
            meta, dst = header[name], own[name]
            if tuple(meta["shape"]) != tuple(dst.shape) or meta["dtype"] not in ST_DTYPES:
                raise ModelUnavailable(
                    f"{weights}: {name} is {meta['dtype']} {meta['shape']}, the model's "
                    f"{dst.dtype} {tuple(dst.shape)}: rebuild the cached model"
                )
            src_dtype = ST_DTYPES[meta["dtype"]]
            buf = dst if src_dtype == dst.dtype and dst.is_contiguous() else torch.empty(dst.shape, dtype=src_dtype)
            if not read_into(f, 8 + n + meta["data_offsets"][0], buf):
                raise ModelUnavailable(f"{weights} ends inside {name}: copy or download the model again")
            if buf is not dst:
                dst.copy_(buf)
    loaded = {own[k].data_ptr() for k in set(header) & set(own)}  # a tied weight is stored once, under either name
    return sorted(k for k in set(own) - set(header) if own[k].data_ptr() not in loaded), sorted(set(header) - set(own))
