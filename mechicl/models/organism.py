"""Model organisms: small ``boot_native`` TransformerBridges with a known pre-training prior.

This module holds the architecture and recipe (``OrganismConfig``), the shipped checkpoints
(``organism-strong``, ``organism-weak``) and checkpoint I/O. Training, which runs analyses
(the pruning stage ablates heads), lives in ``mechicl.runs.organism``; the language they are
trained on is ``mechicl.data.organism``.

Checkpoints are float32 safetensors with the config JSON in their metadata; the same
``OrganismConfig`` trained on one thread gives bit-identical weights (``weights_sha256``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch as st
import torch
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

from mechicl.data.organism import TOKENS_PER_EXAMPLE, VOCAB, LanguageConfig, organism_tokenizer
from mechicl.errors import ModelUnavailable
from mechicl.models.base import LoadedModel
from mechicl.models.registry import ORGANISMS

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


def checkpoint_path(name: str) -> Path:
    return CHECKPOINT_DIR / f"{ORGANISMS[name]}.safetensors"


def load_organism(name: str) -> LoadedModel:
    """Load a shipped organism by name, or any organism checkpoint by path. Takes ~0.1 s."""
    if name in ORGANISMS:
        return load_checkpoint(checkpoint_path(name), name)
    return load_checkpoint(Path(name).expanduser())


def organism_config(name: str) -> OrganismConfig | None:
    """The recipe of a shipped organism (by name) or of an organism checkpoint (by path), read from the
    checkpoint's metadata without loading weights; None for any other model name."""
    path = checkpoint_path(name) if name in ORGANISMS else Path(name).expanduser()
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return OrganismConfig.from_json(meta["mechicl_organism"]) if "mechicl_organism" in meta else None


@dataclass(frozen=True)
class OrganismConfig:
    """Model shape and training recipe.

    Cost: ``steps + prune_steps`` forward+backward passes of ``batch`` x ``5 * n_examples``
    tokens and one head-ablation sweep between the stages; the defaults take ~5 minutes on
    one CPU thread. Memory: < 200 MB.
    """

    language: LanguageConfig = field(default_factory=LanguageConfig)
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    n_ctx: int = 128
    positional: str = "rotary"  # "rotary" (relative offsets come for free) or "standard"
    steps: int = 3500
    batch: int = 32
    lr: float = 1e-2
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    keep_heads: int = 1  # stage 2: last-layer heads kept (0 = no pruning stage)
    prune_steps: int = 1000
    prune_lr: float = 3e-3

    def __post_init__(self) -> None:
        need = TOKENS_PER_EXAMPLE * self.language.n_examples
        if need > self.n_ctx:
            raise ValueError(f"{self.language.n_examples} examples need {need} positions but n_ctx = {self.n_ctx}")
        if not 0 <= self.keep_heads <= self.n_heads:
            raise ValueError(f"keep_heads must be in 0..n_heads={self.n_heads}, got {self.keep_heads}")
        if self.steps < 1 or self.prune_steps < 0:
            raise ValueError(f"need steps >= 1 and prune_steps >= 0, got {self.steps}, {self.prune_steps}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> OrganismConfig:
        d = json.loads(text)
        return cls(**{**d, "language": LanguageConfig(**d["language"])})

    def bridge_config(self) -> TransformerBridgeConfig:
        return TransformerBridgeConfig(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_model // self.n_heads,
            d_mlp=self.d_mlp,
            n_ctx=self.n_ctx,
            d_vocab=len(VOCAB),
            act_fn="gelu",
            normalization_type="LN",
            positional_embedding_type=self.positional,
            seed=self.seed,
        )


def build_model(cfg: OrganismConfig) -> Any:
    """A freshly initialised ``boot_native`` bridge (seeded by ``cfg.seed``) with the organism tokenizer."""
    return TransformerBridge.boot_native(cfg.bridge_config(), tokenizer=organism_tokenizer())


def out_weight(model: Any, layer: int) -> torch.Tensor:
    """The attention output matrix ``[d_model, n_heads * d_head]`` of ``layer`` (head h = columns h*d_head..)."""
    name = f"layers.{layer}._original_component.attn._original_component.o._original_component.weight"
    params = dict(model.named_parameters())
    if name not in params:
        raise RuntimeError(f"no parameter {name!r}: the organism expects a boot_native TransformerBridge")
    return params[name]


def live_heads(model: Any, layer: int) -> list[int]:
    """Heads of ``layer`` whose output weights are not all zero (the pruning stage zeroes the others)."""
    w = out_weight(model, layer)
    d_head = w.shape[1] // int(model.cfg.n_heads)
    return [h for h in range(int(model.cfg.n_heads)) if bool(w[:, h * d_head : (h + 1) * d_head].ne(0).any())]


def weights_sha256(model: Any) -> str:
    """sha256 over the state dict's names and float32 bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(model: Any, cfg: OrganismConfig, path: Path, extra: dict[str, str] | None = None) -> Path:
    """Weights as float32 safetensors; the config JSON rides in the file's metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    st.save_file(sd, str(path), metadata={"mechicl_organism": cfg.to_json(), **(extra or {})})
    return path


def load_checkpoint(path: Path, name: str | None = None) -> Any:
    """A ``LoadedModel`` from an organism safetensors file written by ``save_checkpoint``."""
    path = Path(path)
    if not path.is_file():
        raise ModelUnavailable(f"organism checkpoint {path} does not exist; train one with `mechicl organism train`")
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "mechicl_organism" not in meta:
        raise ModelUnavailable(f"{path} is not an organism checkpoint (no 'mechicl_organism' metadata)")
    cfg = OrganismConfig.from_json(meta["mechicl_organism"])
    model = build_model(replace(cfg))
    model.load_state_dict(st.load_file(str(path)), strict=True)
    model.eval()
    return LoadedModel(name or path.stem, model, organism_tokenizer(), True, f"mechicl organism {path.name}")
