"""Reading a safetensors weight file into a built model without holding the weights twice.

``load_in_place`` is what ``models.loading`` uses for cached model directories: the model is built without random
init (``transformers.initialization.no_init_weights``), its tied weights tied, and every tensor's bytes are then read
from the file straight into the tensor, except the input embedding's, which stay in the file behind a copy-on-write
memory map (``map_input_embedding``: rows a command never touches are never resident).
``safetensors.torch.load_model`` would hold the whole file beside the model (a full copy, or a memory map whose
touched pages count as resident): on gemma3-270m a fresh process's load peaked at 2.92 GB before and 1.85 GB after,
in 12.2 s and 6.9 s with imports (one thread, this project's 2-core machine; docs/results/report/cost.txt)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
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


NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


def map_tensor(path: Path, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """A tensor whose bytes stay in ``path`` (a copy-on-write memory map of ``shape`` at ``offset``): its pages are
    read in when first touched and count as resident only then; a write goes to a private copy, never the file.
    None where the map cannot serve the tensor (a dtype numpy lacks, an offset not a multiple of its size, or a file
    that ends first: the reader then says so)."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if dtype not in NP_DTYPES or offset % dtype.itemsize or offset + nbytes > path.stat().st_size:
        return None
    return torch.from_numpy(np.memmap(path, dtype=NP_DTYPES[dtype], mode="c", offset=offset, shape=tuple(shape)))


@torch.no_grad()
def map_input_embedding(hf: Any, weights: Path, header: dict, start: int) -> str | None:
    """Point ``hf``'s input embedding (tied to the unembedding on Gemma-3 and SmolLM2) at a memory map of its bytes
    in ``weights`` instead of reading them; returns the name it was found under, or None when it was not mapped.

    Why: the embedding is the largest tensor (gemma3-270m: 262144 x 640 floats, 0.67 GB of its 1.07 GB) and most
    commands touch a few of its rows, the tokens they embed and the label tokens they read out
    (``analysis.engine.readout.unembed_labels``). Mapped, only those pages are resident; a command that takes logits
    over the whole vocabulary reads it all in and is where it was. Memory: ``docs/findings.md``, "Cost"."""
    param = hf.get_input_embeddings().weight
    name = next((k for k, v in hf.state_dict().items() if v.data_ptr() == param.data_ptr() and k in header), None)
    if name is None or not param.is_contiguous():
        return None
    meta = header[name]
    if tuple(meta["shape"]) != tuple(param.shape) or ST_DTYPES.get(meta["dtype"]) != param.dtype:
        return None
    mapped = map_tensor(weights, start + meta["data_offsets"][0], tuple(param.shape), param.dtype)
    if mapped is None:
        return None
    param.data = mapped  # the Parameter object stays: a tied unembedding is the same object
    return name


@torch.no_grad()
def load_in_place(hf: Any, weights: Path) -> tuple[list[str], list[str]]:
    """Read ``weights`` (a safetensors file) straight into ``hf``'s tensors; returns (missing, unexpected) names as
    ``safetensors.torch.load_model(strict=False)`` does.

    Why not ``load_model``: it holds the whole file in memory beside the model's own tensors (a full copy, or a
    memory map whose touched pages count as resident), so the peak holds the weights twice (gemma3-270m: about 1 GB
    more, the run's peak). Here each tensor's bytes are read with ``readinto`` into the destination tensor itself
    (a staging buffer only where the dtypes differ): no second copy. Reads the safetensors layout directly (an
    8-byte header length, a JSON header of dtype, shape and byte offsets, then the data); shapes must match.
    The input embedding is memory-mapped instead (``map_input_embedding``): only its touched rows are resident."""
    with open(weights, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        mapped = map_input_embedding(hf, weights, header, 8 + n)
        own = hf.state_dict()  # tensors sharing the parameters' storage (a tied weight appears under each name)
        for name in sorted(set(header) & set(own)):
            if name == mapped:
                continue
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
