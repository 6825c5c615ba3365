"""The sweep kinds of exact patching, listed once (``KINDS``), and its two directions.

Imports nothing heavy (no torch), so the CLI can check ``--kinds`` before loading a model. What a kind patches
and how one cell is written: ``patching.cells``; the sweeps: ``patching.exact.Patcher``.
"""

from __future__ import annotations

from dataclasses import dataclass

DIRECTIONS = ("denoise", "noise")


@dataclass(frozen=True)
class SweepKind:
    """One patching granularity: the hook it patches and how one cell is written."""

    name: str
    act: str  # TL activation kind for ``act_name`` (get_act_name)
    axes: tuple[str, str]  # ("layer", "pos") / ("layer", "head") / ("layer", "kv_head")
    description: str
    readout_only: bool = False


KINDS: dict[str, SweepKind] = {
    k.name: k
    for k in (
        SweepKind("resid", "resid_pre", ("layer", "pos"), "residual stream entering each block, by position"),
        SweepKind("attn_out", "attn_out", ("layer", "pos"), "attention-layer output, by position"),
        SweepKind("mlp_out", "mlp_out", ("layer", "pos"), "MLP output, by position"),
        SweepKind("head_out", "z", ("layer", "head"), "head output (hook_z) at every position"),
        SweepKind("head_out_label", "z", ("layer", "head"), "head output at the in-context label positions"),
        SweepKind("head_out_readout", "z", ("layer", "head"), "head output at the query readout slot only", True),
        SweepKind("head_v_label", "v", ("layer", "kv_head"), "head values at the in-context label positions"),
        SweepKind(
            "head_pattern_label",
            "pattern",
            ("layer", "head"),
            "attention paid to the label positions (every destination)",
        ),
    )
}


def runs_for(direction: str) -> tuple[str, str]:
    """(receiver, donor) run names of a patching direction: ``denoise`` patches clean into corrupted."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
