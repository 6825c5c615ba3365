"""Where a model runs and in what precision: device and dtype names, checks, placement.

``load_model(name, device=, dtype=, device_map=)`` (``models.loading``) calls these:

* ``resolve_device("auto" | "cpu" | "cuda" | "cuda:N" | "mps")``: ``auto`` = cuda if available, else mps,
  else cpu; an unknown or unavailable device is a ``ConfigError`` naming the fix.
* ``resolve_dtype("float32" | "bfloat16" | "float16")`` (``fp32``/``bf16``/``fp16`` too).
* ``place_bridge(bridge, device, dtype)``: moves a single-device bridge (and casts a ``boot_native`` one).
* ``input_device(model)``: where token ids and masks must go: the device of the input embedding
  (``cfg.device``; for a ``device_map`` split this is the first shard).

Analyses never ask for a device themselves: ``analysis.engine.hooks.run_to_final`` moves its inputs with
``input_device``, and results come back on the CPU in float32 (``analysis.engine.hooks.to_host``).
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from mechicl.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; ``cuda``/``cuda:N``/``mps``/``cpu`` checked for availability."""
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind not in DEVICES or (index and not (kind == "cuda" and index.isdigit())):
        raise ConfigError(f"unknown device {device!r}: use one of {', '.join(DEVICES)} (or cuda:N for the N-th GPU)")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "cuda requested but torch.cuda.is_available() is False (no GPU, or a CPU-only torch build): "
                "use --device cpu"
            )
        n = torch.cuda.device_count()
        if index and int(index) >= n:
            raise ConfigError(
                f"device {name} requested but only {n} GPU(s) are visible (cuda:0..cuda:{n - 1}); "
                f"pick one of them or check CUDA_VISIBLE_DEVICES"
            )
    if kind == "mps" and not _mps_available():
        raise ConfigError(
            "mps requested but torch.backends.mps.is_available() is False (not an Apple-silicon Mac, "
            "or torch built without MPS): use --device cpu"
        )
    return torch.device(name)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype name (``float32``, ``bfloat16``, ``float16`` or ``fp32``/``bf16``/``fp16``) or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ConfigError(f"unsupported dtype {dtype}: use one of {', '.join(DTYPES)}")
    name = _DTYPE_ALIASES.get(str(dtype).strip().lower(), str(dtype).strip().lower())
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def place_bridge(bridge: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move a single-device TransformerBridge to ``device`` (``cfg.device`` updated) and, if ``dtype`` is given,
    cast it (parameters and floating buffers: ``bridge.to``). Hugging Face models get their dtype when they
    are built instead (``models.loading``), so HF's float32 buffers such as rotary ``inv_freq`` stay float32."""
    bridge.to(device, print_details=False)
    bridge.cfg.device = str(device)
    if dtype is not None and dtype != torch.float32:
        bridge.to(dtype, print_details=False)
    return bridge


def model_dtype(model: Any) -> torch.dtype:
    """The dtype of the model's floating parameters (the first one)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def input_device(model: Any) -> torch.device:
    """The device token ids, masks and a restart residual must be on: the input embedding's (``cfg.device``)."""
    dev = getattr(model.cfg, "device", None)
    if dev is None:
        return next(model.parameters()).device
    return torch.device(dev)


def devices_of(model: Any) -> list[str]:
    """Every device holding a parameter, in first-use order (more than one = a ``device_map`` split)."""
    return list(dict.fromkeys(str(p.device) for p in model.parameters()))


def release_host_memory() -> bool:
    """Hand freed CPU heap pages back to the operating system (glibc ``malloc_trim(0)``); False elsewhere.

    Why: torch's CPU tensors come from ``malloc``. After a large tensor is freed, glibc raises its
    mmap threshold (up to 32 MB), so later tensors below it come from the heap, and pages freed in the
    middle of the heap stay in the process's RSS. Measured on gemma3-270m findings cells
    (vader-words, one thread): it gave back 0.09-0.11 GB between stages; 0.46-0.51 GB still stayed
    resident after each cell with no tensor alive (fragmented pages it cannot return;
    ``benchmarks/findings_memory.py``, ``docs/findings.md`` "Cost"). Cost: milliseconds; it frees
    nothing in use.
    (``MALLOC_MMAP_THRESHOLD_=1048576`` lowered that cell's peak by 0.26 GB but made it 37% slower:
    every large tensor then pays fresh page faults.)
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to do
        return False
