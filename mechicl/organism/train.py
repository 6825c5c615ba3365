"""Train, save and load organisms: small ``boot_native`` TransformerBridges trained on ``language``.

Training is deterministic: one CPU thread, a seeded torch generator for the
initial weights and a seeded numpy generator for the data, so the same
``OrganismConfig`` gives bit-identical weights (``weights_sha256``).

Two stages. (1) ``steps`` steps with every head. Context reading then ends up
spread over the last layer's heads, so no single head's ablation removes it.
(2) If ``keep_heads > 0``: the last layer keeps only the ``keep_heads`` heads
whose readout-slot mean ablation closes most of the flipped-label gap
(``mechicl.ablation``, on contexts the evaluation does not use). The other heads'
output weights (``W_O`` columns) are set to zero and held there while training
continues for ``prune_steps`` steps, so the kept head takes over all label
reading. This gives the organism a known ground truth: one label-reading head.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mechicl.organism.language import MAP_KINDS, TOKENS_PER_EXAMPLE, VOCAB, LanguageConfig, organism_tokenizer, sample_sequences


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

    def bridge_config(self) -> Any:
        from transformer_lens.config import TransformerBridgeConfig

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


@dataclass(frozen=True)
class TrainResult:
    """A trained bridge, its loss curve (mean label loss per logged step), the wall time, and the
    pruning stage's choice: the last-layer heads' gap reductions before it and the heads kept."""

    model: Any  # TransformerBridge
    config: OrganismConfig
    loss_curve: tuple[tuple[int, float], ...]
    seconds: float
    gap_before_pruning: tuple[float, ...] = ()  # last layer, per head
    kept_heads: tuple[int, ...] = ()


def build_model(cfg: OrganismConfig) -> Any:
    """A freshly initialised ``boot_native`` bridge (seeded by ``cfg.seed``) with the organism tokenizer."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_native(cfg.bridge_config(), tokenizer=organism_tokenizer())


def label_loss(model: Any, tokens: torch.Tensor, label_pos: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every label token, predicted from the position before it."""
    logits = model(tokens)  # [b, pos, vocab]
    rows = torch.arange(tokens.shape[0])[:, None]
    pred = logits[rows, label_pos - 1]  # [b, example, vocab]
    return F.cross_entropy(pred.flatten(0, 1), tokens[rows, label_pos].flatten())


@torch.no_grad()
def probe(model: Any, cfg: OrganismConfig, n: int = 256, ks: tuple[int, ...] = (0, 1, 4, 16)) -> dict[str, list[float]]:
    """Accuracy (argmax over the whole vocabulary) against the sequence's true map, per map kind, at example ``ks``.

    Uses a fixed held-out draw (seed ``cfg.seed + 1``). Cost: one forward of ``n`` sequences.
    """
    seq = sample_sequences(cfg.language, n, np.random.default_rng(cfg.seed + 1))
    logits = model(seq.tokens)
    rows = torch.arange(n)[:, None]
    pred = logits[rows, seq.label_pos - 1].argmax(-1)  # [n, example]
    target = seq.label_words.gather(1, seq.true_class)  # [n, example]: noise-free labels
    ok = (pred == target).double()
    return {
        kind: [float(ok[seq.map_kind == i, k].mean()) for k in ks if k < ok.shape[1]]
        for i, kind in enumerate(MAP_KINDS)
        if bool((seq.map_kind == i).any())
    }


def _fit(model: Any, cfg: OrganismConfig, rng: np.random.Generator, steps: int, lr: float, warmup: int,
         curve: list[tuple[int, float]], after_step: Any = None, progress: bool = True, log_every: int = 50,
         desc: str = "train organism") -> None:
    """``steps`` AdamW steps (linear warm-up, cosine decay, clipping 1.0) on fresh sequences from ``rng``."""
    if steps <= 0:
        return
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}], lr=lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    offset, running = (curve[-1][0] if curve else 0), []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        seq = sample_sequences(cfg.language, cfg.batch, rng)
        loss = label_loss(model, seq.tokens, seq.label_pos)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append((offset + step + 1, float(np.mean(running))))
            bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
            running = []


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


@torch.no_grad()
def last_layer_gap_reductions(model: Any, cfg: OrganismConfig, n_contexts: int = 64) -> np.ndarray:
    """Gap reduction of mean-ablating each last-layer head at the readout slot (k = 16), per head.

    Contexts are drawn with seed ``10_000 + cfg.seed``, apart from those the tests and cards use.
    Cost: three forwards of ``n_contexts`` contexts and ``n_heads`` ablated re-runs.
    """
    from mechicl.ablation import HeadAblator
    from mechicl.organism.language import organism_task
    from mechicl.prompts import sample_contexts

    task = organism_task()
    ids = sample_contexts(task, n_contexts, 17, seed=10_000 + cfg.seed)
    was_training = model.training
    model.eval()
    abl = HeadAblator(model, task, organism_tokenizer(), ids, n_ctx=cfg.n_ctx, prepend_bos=True, seed=cfg.seed)
    last = cfg.n_layers - 1
    table = abl.gap_table([[(last, h)] for h in range(cfg.n_heads)], "mean", n_boot=0, with_correct=False)
    model.train(was_training)
    return table.gap_reduction.to_numpy()


def train(cfg: OrganismConfig, progress: bool = True, log_every: int = 50) -> TrainResult:
    """Train one organism (both stages, see the module docstring). Deterministic (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        model = build_model(cfg).train()
        rng = np.random.default_rng(cfg.seed)
        curve: list[tuple[int, float]] = []
        _fit(model, cfg, rng, cfg.steps, cfg.lr, cfg.warmup, curve, progress=progress, log_every=log_every)
        gaps, kept = (), ()
        if cfg.keep_heads:
            gr = last_layer_gap_reductions(model, cfg)
            order = np.argsort(-np.nan_to_num(gr, nan=-np.inf), kind="stable")
            kept = tuple(sorted(int(h) for h in order[: cfg.keep_heads]))
            d_head = cfg.d_model // cfg.n_heads
            w = out_weight(model, cfg.n_layers - 1)
            mask = torch.zeros(cfg.n_heads).index_fill_(0, torch.tensor(kept), 1.0).repeat_interleave(d_head)[None, :]

            def hold() -> None:  # pruned heads write nothing, ever
                with torch.no_grad():
                    w.mul_(mask)

            hold()
            _fit(model, cfg, rng, cfg.prune_steps, cfg.prune_lr, min(cfg.warmup, max(1, cfg.prune_steps // 20)), curve,
                 after_step=hold, progress=progress, log_every=log_every, desc=f"prune to head(s) {kept}")
            gaps = tuple(float(x) for x in gr)
        model.eval()
        return TrainResult(model, cfg, tuple(curve), time.perf_counter() - t0, gaps, kept)
    finally:
        torch.set_num_threads(threads)


def weights_sha256(model: Any) -> str:
    """sha256 over the state dict's names and float32 bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(model: Any, cfg: OrganismConfig, path: Path, extra: dict[str, str] | None = None) -> Path:
    """Weights as float32 safetensors; the config JSON rides in the file's metadata."""
    import safetensors.torch as st

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    st.save_file(sd, str(path), metadata={"mechicl_organism": cfg.to_json(), **(extra or {})})
    return path


def load_checkpoint(path: Path, name: str | None = None) -> Any:
    """A ``LoadedModel`` from an organism safetensors file written by ``save_checkpoint``."""
    import safetensors
    import safetensors.torch as st

    from mechicl.models import LoadedModel, ModelUnavailable

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


def train_and_save(cfg: OrganismConfig, path: Path, name: str | None = None, progress: bool = True) -> Path:
    """Train, save the checkpoint, measure its curves and write the model card. Returns the card's path."""
    from mechicl.models import LoadedModel
    from mechicl.organism.card import measure_curves, write_card

    result = train(cfg, progress=progress)
    sha = weights_sha256(result.model)
    path = save_checkpoint(result.model, cfg, path, {"weights_sha256": sha, "train_seconds": f"{result.seconds:.1f}"})
    name = name or Path(path).stem
    loaded = LoadedModel(name, result.model, organism_tokenizer(), True, f"mechicl organism {Path(path).name}")
    return write_card(path, name, result, sha, measure_curves(loaded), probe(result.model, cfg))
