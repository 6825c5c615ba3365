"""Builders for tests: small models, tasks and prompt batches with known content."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from mechicl.analysis.engine.hooks import run_to_final
from mechicl.analysis.engine.readout import unembed_labels
from mechicl.data.pairs import PatchPair
from mechicl.data.prompts import PromptBatch, build_prompt_batch, sample_contexts
from mechicl.data.task import Task, Template
from mechicl.data.tasks import toy_task as _toy_task
from mechicl.data.words import TOY_WORDS, VOCAB, tiny_tokenizer
from mechicl.models.base import LoadedModel
from mechicl.models.tiny import load_tiny


@lru_cache(maxsize=4)
def tiny_model(seed: int = 0) -> LoadedModel:
    return load_tiny(seed=seed)


def toy_task(n_classes: int = 2, n: int = 128, template: Template | None = None) -> Task:
    """Toy words with ``n_classes`` classes named by tiny-vocabulary words."""
    if n_classes == 2 and template is None:
        return _toy_task(n)
    names = ("red", "green", "blue", "left", "right", "up", "down")[:n_classes]
    texts = tuple(" ".join(TOY_WORDS[(i + 7 * j) % 64] for j in range(1 + i % 3)) for i in range(n))  # 1-3 words
    labels = tuple(i % n_classes for i in range(n))
    return Task(f"toy{n_classes}", texts, labels, names, template or Template("Input: {input}\nLabel: {label}"))


def batch(
    loaded: LoadedModel,
    task: Task,
    condition: str = "default",
    n_contexts: int = 4,
    n_examples: int = 6,
    seed: int = 0,
    template: Template | None = None,
) -> PromptBatch:
    ids = sample_contexts(task, n_contexts, n_examples, seed=seed)
    return build_prompt_batch(
        task,
        loaded.tokenizer,
        ids,
        condition,
        n_ctx=loaded.n_ctx,
        prepend_bos=loaded.prepend_bos,
        template=template,
        seed=seed,
    )


def full_label_logits(loaded: LoadedModel, b: PromptBatch) -> torch.Tensor:
    """Reference readout: the model's full logits, one unpadded context at a time."""
    out = []
    with torch.no_grad():
        for i in range(b.n_contexts):
            n = int(b.lengths[i])
            logits = loaded.model(b.tokens[i : i + 1, :n])[0]
            out.append(logits[b.readout_pos[i]][:, b.label_token_ids])
    return torch.stack(out)


def tl_metric(loaded: LoadedModel, pair: PatchPair) -> Callable[[Tensor], Tensor]:
    """The patching metric (normalised answer - foil logit difference at the query slot) as a function of
    full logits ``[batch, pos, vocab]``, for ``transformer_lens.patching``. Its clean and corrupted
    baselines come from the model's own full forwards, not from the code under test."""
    rows = torch.arange(pair.n_contexts)
    q, a, f = pair.query_pos, pair.answer_ids, pair.foil_ids

    def ld(logits: Tensor) -> Tensor:
        at = logits[rows, q]
        return (at[rows, a] - at[rows, f]).mean()

    with torch.no_grad():
        clean_ld, corrupted_ld = (float(ld(loaded.model(b.tokens))) for b in (pair.clean, pair.corrupted))

    def metric(logits: Tensor) -> Tensor:
        return (ld(logits) - corrupted_ld) / (clean_ld - corrupted_ld)

    return metric


# The tiny Hugging Face models' shared config (2 layers, GQA 4 query / 2 key-value heads, the tiny vocabulary).
TINY_HF_CONFIG = dict(
    vocab_size=len(VOCAB),
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=0,
    pad_token_id=0,
)


@lru_cache(maxsize=4)
def tiny_hf(arch: str = "llama", sliding_window: int = 512) -> LoadedModel:
    """A random 2-layer Hugging Face model (Llama or Gemma-3 layout, GQA) bridged with the tiny tokenizer."""
    common = dict(TINY_HF_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if arch == "llama":
            hf = LlamaForCausalLM(LlamaConfig(**common))
        else:
            hf = Gemma3ForCausalLM(
                Gemma3TextConfig(
                    **common,
                    head_dim=16,
                    sliding_window=sliding_window,
                    query_pre_attn_scalar=16,
                    layer_types=["sliding_attention", "full_attention"],
                )
            )
    hf.config._attn_implementation = "eager"
    hf.config.architectures = [type(hf).__name__]
    hf.eval()
    tok = tiny_tokenizer()
    bridge = TransformerBridge.boot_transformers(f"tiny-{arch}", hf_model=hf, tokenizer=tok).eval()
    return LoadedModel(f"tiny-{arch}", bridge, tok, True, "random HF model for tests")


@lru_cache(maxsize=1)
def linear_model() -> LoadedModel:
    """1 layer, attention only, no norms: the logits are linear in every head output and in attn_out."""
    cfg = TransformerBridgeConfig(
        n_layers=1,
        d_model=64,
        n_heads=4,
        d_head=16,
        n_ctx=256,
        d_vocab=len(VOCAB),
        act_fn="gelu",
        normalization_type=None,
        attn_only=True,
        seed=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TransformerBridge.boot_native(cfg, tokenizer=tiny_tokenizer()).eval()
    return LoadedModel("linear", model, tiny_tokenizer(), True, "1-layer attention-only model without norms")


def slot_resample_reference(
    loaded: LoadedModel, b: PromptBatch, k_min: int, head: tuple[int, int], donor: Tensor
) -> Tensor:
    """P(true) at every slot ``k >= k_min`` when ``head``'s output at that slot (only) is replaced by its
    output at the same slot of context ``donor[c]``: one plain hooked forward per slot, no KV cache."""
    l, h = head
    name = f"blocks.{l}.attn.hook_z"
    rows = torch.arange(b.n_contexts)
    out = []
    for j in range(k_min, b.n_examples):
        q = b.readout_pos[:, j]
        store = {}
        with torch.no_grad():
            run_to_final(loaded.model, b.tokens, [(name, lambda z, hook: store.__setitem__("z", z.clone()))])
            donor_z = store["z"][donor, q[donor], h]  # [b, d]: the donor's output at its own slot j

            def patch(z, hook):
                z = z.clone()
                z[rows, q, h] = donor_z
                return z

            resid = run_to_final(loaded.model, b.tokens, [(name, patch)])
            logits = unembed_labels(loaded.model, resid[rows, q], b.label_token_ids)
        out.append(torch.softmax(logits.double(), -1).gather(-1, b.true_labels[:, j, None])[:, 0])
    return torch.stack(out, 1)  # [b, S]


def hooked_head_patch(model, pair: PatchPair, heads, readout_only: bool) -> tuple[Tensor, float, float]:
    """Mean LD of the corrupted run with each head's ``hook_z`` patched from the clean run (at the query slot
    only if ``readout_only``, else at every position): one plain ``run_with_hooks`` forward per head, full
    logits. Returns ``([len(heads)] LDs, clean LD, corrupted LD)``, the clean baseline from the caching forward.
    An independent reference: plain TL hooks, nothing from mechicl's patching code (benchmarks use it too)."""
    rows, q = torch.arange(pair.n_contexts), pair.query_pos

    def ld(logits: Tensor) -> float:
        at = logits[rows, q]
        return float((at[rows, pair.answer_ids] - at[rows, pair.foil_ids]).mean())

    names = {f"blocks.{l}.attn.hook_z" for l, _ in heads}
    out = torch.zeros(len(heads))
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(pair.clean.tokens, names_filter=lambda n: n in names)
        clean_ld, corr_ld = ld(clean_logits), ld(model(pair.corrupted.tokens))
        for i, (l, h) in enumerate(heads):

            def hook(z: Tensor, hook, h: int = h, clean_z: Tensor = cache[f"blocks.{l}.attn.hook_z"]) -> Tensor:
                z = z.clone()
                if readout_only:
                    z[rows, q, h] = clean_z[rows, q, h]
                else:
                    z[:, :, h] = clean_z[:, :, h]
                return z

            out[i] = ld(model.run_with_hooks(pair.corrupted.tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook)]))
    return out, clean_ld, corr_ld


def normalised_tolerance(clean_ld: Tensor | float, corrupted_ld: Tensor | float, atol: float = 1e-4) -> float:
    """The tolerance for values on the patching scale ``(ld - k) / (c - k)`` (0 = corrupted, 1 = clean) that
    allows an error of ``atol`` logits in the raw logit difference: ``atol / |c - k|``, never below ``atol``.
    A pair whose clean and corrupted runs are close has a tiny denominator (0.00093 for tiny-llama's toy pair,
    values up to 23), where float32 reassociation on another CPU moves the normalised value by 4e-4."""
    den = abs(float(torch.as_tensor(clean_ld).mean() - torch.as_tensor(corrupted_ld).mean()))
    return atol * max(1.0, 1.0 / den)


REAL_LAYERS = (0, 9, 17)  # first, middle, last of gemma3-270m: where the real-model TL comparisons look


def tl_head_out_at(loaded, pair, direction: str, layers=REAL_LAYERS) -> Tensor:
    """TransformerLens's own all-position head-output patching (``generic_activation_patch`` with
    ``layer_head_vector_patch_setter`` on ``z``, as ``get_act_patch_attn_head_out_all_pos`` runs it) for every head
    of ``layers`` only, with the same normalised metric: ``[len(layers), n_heads]``. TL runs a full forward with
    full-vocabulary logits per head, so the whole sweep on Gemma (262k vocabulary) took 82 s of the suite."""
    import pandas as pd
    import transformer_lens.patching as tlp

    n_heads = int(loaded.model.cfg.n_heads)
    idx = pd.DataFrame([(l, h) for l in layers for h in range(n_heads)], columns=["layer", "head"])
    recv, donor = (pair.corrupted, pair.clean) if direction == "denoise" else (pair.clean, pair.corrupted)
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(donor.tokens)
        out = tlp.generic_activation_patch(
            loaded.model,
            recv.tokens,
            cache,
            tl_metric(loaded, pair),
            tlp.layer_head_vector_patch_setter,
            "z",
            index_df=idx,
        )
    return out.reshape(len(layers), n_heads)


def assert_patch_close(ours, ref: Tensor, atol: float = 1e-4, layers=None) -> None:
    """``ours.values`` (a ``PatchResult``) equals the normalised reference ``ref`` to within ``atol`` logits of raw
    logit difference: the comparison is conditioned by ``ours``'s own denominator (``normalised_tolerance``)."""
    tol = normalised_tolerance(ours.clean_ld, ours.corrupted_ld, atol)
    values = ours.values if layers is None else ours.values[list(layers)]  # ``ref`` holds only these layers
    diff = float((values - ref).abs().max())
    assert diff <= tol, f"max |ours - ref| = {diff:.3g} on the normalised scale > {tol:.3g} ({atol:g} logits)"


# The smallest findings grid that has a finding: one organism-strong cell (seconds); tests append --out and more.
SMALL_GRID = (
    "findings --models organism-strong --tasks organism --seeds 0 --k 8 --k-min 4 --n-screen 4 --n-confirm 4 "
    "--n-validate 8 --n-candidates 3 --n-top 2 --n-control 2 --n-resample 1"
).split()


def script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts are not a package), and its path."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path


def script_check(name: str) -> None:
    """``python scripts/<name>.py --check`` exits 0 (what it prints on stderr is the failure message)."""
    import subprocess
    import sys

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    run = subprocess.run([sys.executable, str(path), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
