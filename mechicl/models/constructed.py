"""Constructed organisms: ``boot_native`` bridges whose weights are written down, not trained.

Same family as ``models.organism.build_model`` (2 layers, 4 heads, d_model 64, d_head 16, LayerNorm,
MLPs present but all zero), with ``positional="standard"`` so that positions are a hand-set table.
They read the organisms' language (``data.organism``): inputs ``w1 w2 w3`` of one polarity, examples
``w1 w2 w3 LABEL`` joined by ``" ; "``, readout slot = the input's last word. Because every weight is
set by hand, each head's role is known by construction (``planted(name)``), never by a head finder.

Residual stream (one-hot subspaces; every written vector sums to 0 through ``SINK``, and the constant
pair +-C makes LayerNorm ``x -> x * s0 / std(x)`` with std(x) = s0 to 1e-4, so with LN weight s0 every
norm is the identity up to that factor; no matrix reads CONST or SINK):

  dim   name       written by                       value
  0, 1  CONST_P/N  embedding (every token)          +C, -C (C = 1000)
  2     SINK       every write                      minus the sum of the write's other entries
  3     POL        embedding                        +1 positive feature word, -1 negative, 0 otherwise
  4     IS_BOS     embedding                        1 at <bos> (the reader's attention sink)
  5     IS_LABEL   embedding                        1 at the label words negative/positive/a/b
  6-9   LAB        embedding                        one-hot label word: negative, positive, a, b
  10-23 POS        W_pos [n_ctx, d_model]           (cos, sin)(2 pi i / 2^m), m = 1..7 at position i
  24    PREV_POL   L0H0 (previous-token head)       POL of the previous token: at a label, its input's class
  25    Q_POL      L0H1 (query/class head)          POL of the token itself: at the readout slot, the query's class
  26-29 ANS        L0H2 (prior), the reader(s)      answer logits of negative, positive, a, b (W_U reads them)
  30-33 MOVED      L0H3 (label mover)               LAB again, written by a head (route "head" only)
  34-63 unused (0)

Heads (W_Q/W_K/W_V: [d_model, d_head] per head, W_O: [d_head, d_model]; scores are q.k / sqrt(d_head)):

  L0H0  class head (key side): attends to position i - 1 (score 10 * sum_m cos(2 pi (i-1-j) / 2^m), a
        margin >= 20 over every other position < 128); OV copies POL -> PREV_POL.
  L0H1  query/class head: attends to itself (same code, no shift); OV POL -> Q_POL. No label information.
  L0H2  prior carrier: attends to itself; OV POL -> ANS: +prior/2 on positive, -prior/2 on negative, so the
        default label's log-odds at k = 0 is ``prior`` (the knob).
  L0H3  label mover (route "head", the default): attends to itself; OV copies LAB -> MOVED, so the label identity
        reaches the reader through a layer-0 head (as in the trained organisms, and as path patching from earlier
        heads can see). Route "direct" (``constructed-direct``): all weights zero (inert) and the reader reads LAB.
  L1    reader(s) (L1H2; L1H1 + L1H2 with two readers): score = 20 IS_LABEL + 26 IS_BOS + 6 Q_POL(i) PREV_POL(j):
        a label whose input has the query's class scores 26, like <bos>; another class's label 14, inputs <= 6.
        With n matching labels the reader puts n/(n+1) on them (BOS takes the rest) and its OV copies MOVED (LAB if direct) -> ANS
        with gain 8 / readers: evidence that saturates with n. With no matching label it writes ~0.
  L1H0  decoy: the reader's QK (it attends to the same labels) with zero OV: inert. Other layer-1 heads: zero.

So at the readout slot the shown-label log-odds is ``8 n/(n+1) - prior`` in flipped contexts (n = matching
examples): the model follows flipped labels once that is > 0. Unembedding: logit(word) = ANS[word], -10 for
every token that is not a label word. One forward of 64 contexts takes milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechicl.data.names import head_name
from mechicl.data.organism import (
    ARBITRARY_WORDS,
    BOS_ID,
    FEATURE_IDS,
    POLARITY,
    VOCAB,
    organism_tokenizer,
)
from mechicl.data.task import SENTIMENT
from mechicl.errors import ConfigError
from mechicl.models.base import LoadedModel
from mechicl.models.organism import OrganismConfig, build_model
from mechicl.models.registry import CONSTRUCTED, ConstructedSpec

D_MODEL, N_HEADS, D_HEAD, N_CTX = 64, 4, 16, 128
CONST_P, CONST_N, SINK, POL, IS_BOS, IS_LABEL = range(6)
LAB = (6, 7, 8, 9)  # residual dims of the label words, in LABEL_WORDS order
POS = tuple(range(10, 24))  # (cos, sin) pairs of the binary position code
PREV_POL, Q_POL = 24, 25
ANS = (26, 27, 28, 29)  # answer logits, in LABEL_WORDS order
MOVED = (30, 31, 32, 33)  # the label mover's copy of LAB
ROUTES = ("head", "direct")
LABEL_WORDS = (*SENTIMENT, *ARBITRARY_WORDS)  # negative, positive, a, b
N_FREQ = len(POS) // 2  # periods 2, 4, ..., 128 = N_CTX

C = 1000.0  # the constant pair: LayerNorm's std is C * sqrt(2 / d_model) up to 1e-4
POS_GAIN = 10.0  # position-matching heads: the target beats every other position by >= 2 * POS_GAIN
LABEL_KEY = 20.0  # reader: score of a label token
CLASS_MATCH = 6.0  # reader: +- this for a label whose input's class matches (or not) the query's
READ_GAIN = 8.0  # reader: total logit gain of the copied label word (split over the readers)
NOT_A_LABEL = -10.0  # unembedding bias of every token that is not a label word

READER_HEADS = {1: (2,), 2: (1, 2)}  # layer-1 heads that read labels, by number of readers
DECOY = (1, 0)  # attends like the reader, writes nothing


@dataclass(frozen=True)
class Planted:
    """Ground truth of a constructed organism, read from its recipe (never from a head-finding method).

    Heads are spelled ``L<layer>H<head>`` (``data.names``). ``class_heads`` carry an input's class but no label
    information (L0H0 at the label positions, L0H1 at the readout slot); ``prior_carriers`` write the default
    map's answer from the query's own words; ``label_movers`` carry label identity at the label positions only
    (upstream of the readers, nothing at the readout slot); ``inert_heads`` write exactly nothing (zero OV).
    """

    label_heads: tuple[str, ...]
    label_movers: tuple[str, ...]
    class_heads: tuple[str, ...]
    prior_carriers: tuple[str, ...]
    inert_heads: tuple[str, ...]
    prior: float  # the default label's log-odds at k = 0
    read_gain: float  # the readers' total logit gain on the copied label word


def spec_of(name: str) -> ConstructedSpec:
    if name not in CONSTRUCTED:
        raise ConfigError(f"{name!r} is not a constructed organism; use one of {', '.join(CONSTRUCTED)}")
    return CONSTRUCTED[name]


def planted(name: str) -> Planted:
    """The planted roles of the constructed organism ``name`` (``models.registry.CONSTRUCTED``)."""
    return planted_for(spec_of(name))


def planted_for(spec: ConstructedSpec) -> Planted:
    readers, routed = _readers(spec.readers), _route(spec.route) == "head"
    inert = ([] if routed else [(0, 3)]) + [(1, h) for h in range(N_HEADS) if h not in readers]
    return Planted(
        label_heads=tuple(head_name(1, h) for h in readers),
        label_movers=(head_name(0, 3),) if routed else (),
        class_heads=(head_name(0, 0), head_name(0, 1)),
        prior_carriers=(head_name(0, 2),),
        inert_heads=tuple(head_name(l, h) for l, h in inert),
        prior=float(spec.prior),
        read_gain=READ_GAIN,
    )


def _readers(n: int) -> tuple[int, ...]:
    if n not in READER_HEADS:
        raise ConfigError(f"a constructed organism has 1 or 2 reader heads, got readers={n}")
    return READER_HEADS[n]


def _route(route: str) -> str:
    if route not in ROUTES:
        raise ConfigError(f"route must be one of {ROUTES} (how label identity reaches the reader), got {route!r}")
    return route


def _zero_sum(v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """Write minus the sum of the other entries into SINK, so that every written vector is zero-mean."""
    v = v.clone()
    v[..., SINK] = 0.0
    v[..., SINK] = -v.sum(-1)
    return v


def embedding() -> Float[Tensor, "vocab d_model"]:
    """W_E: the constant pair everywhere, POL on feature words, IS_BOS, IS_LABEL + LAB on label words."""
    w = torch.zeros(len(VOCAB), D_MODEL)
    w[:, CONST_P], w[:, CONST_N] = C, -C
    w[BOS_ID, IS_BOS] = 1.0
    w[torch.as_tensor(FEATURE_IDS), POL] = torch.as_tensor(2.0 * POLARITY - 1.0, dtype=torch.float32)
    for i, word in enumerate(LABEL_WORDS):
        w[VOCAB.index(word), IS_LABEL] = 1.0
        w[VOCAB.index(word), LAB[i]] = 1.0
    return _zero_sum(w)


def positions() -> Float[Tensor, "n_ctx d_model"]:
    """W_pos: the binary position code (cos, sin)(2 pi i / 2^m), m = 1..7, in the POS dims."""
    w = torch.zeros(N_CTX, D_MODEL)
    i = torch.arange(N_CTX, dtype=torch.float64)
    for m in range(N_FREQ):
        angle = 2 * math.pi * i / 2 ** (m + 1)
        w[:, POS[2 * m]], w[:, POS[2 * m + 1]] = torch.cos(angle).float(), torch.sin(angle).float()
    return _zero_sum(w)


def _position_qk(shift: int) -> tuple[Float[Tensor, "d_model d_head"], Float[Tensor, "d_model d_head"]]:
    """W_Q, W_K of a head that attends to position i - ``shift``: q = R(-shift theta_m) p_m(i), k = p_m(j)."""
    wq, wk = torch.zeros(D_MODEL, D_HEAD), torch.zeros(D_MODEL, D_HEAD)
    gain = POS_GAIN * math.sqrt(D_HEAD)  # the bridge divides scores by sqrt(d_head)
    for m in range(N_FREQ):
        c, s, a = POS[2 * m], POS[2 * m + 1], 2 * m
        t = shift * 2 * math.pi / 2 ** (m + 1)
        wq[c, a], wq[s, a] = gain * math.cos(t), gain * math.sin(t)
        wq[c, a + 1], wq[s, a + 1] = -gain * math.sin(t), gain * math.cos(t)
        wk[c, a], wk[s, a + 1] = 1.0, 1.0
    return wq, wk


@dataclass
class _Weights:
    """Per-layer head weights in TL layout: W_Q/W_K/W_V [n_heads, d_model, d_head], W_O [n_heads, d_head, d_model]."""

    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor
    b_Q: Tensor  # [n_heads, d_head]

    @classmethod
    def zeros(cls) -> _Weights:
        z = lambda *s: torch.zeros(N_HEADS, *s)  # noqa: E731
        return cls(z(D_MODEL, D_HEAD), z(D_MODEL, D_HEAD), z(D_MODEL, D_HEAD), z(D_HEAD, D_MODEL), z(D_HEAD))


def layer0(prior: float, route: str = "head") -> _Weights:
    """L0H0 previous-token class head, L0H1 query/class head, L0H2 prior carrier, L0H3 label mover (or inert)."""
    w = _Weights.zeros()
    w.W_Q[0], w.W_K[0] = _position_qk(shift=1)
    for h in (1, 2, 3) if _route(route) == "head" else (1, 2):
        w.W_Q[h], w.W_K[h] = _position_qk(shift=0)
    if route == "head":
        for i in range(len(LABEL_WORDS)):
            w.W_V[3, LAB[i], i], w.W_O[3, i, MOVED[i]] = 1.0, 1.0
    for h in (0, 1, 2):
        w.W_V[h, POL, 0] = 1.0  # value: the attended token's polarity
    w.W_O[0, 0, PREV_POL] = 1.0
    w.W_O[1, 0, Q_POL] = 1.0
    w.W_O[2, 0, ANS[1]], w.W_O[2, 0, ANS[0]] = prior / 2, -prior / 2  # positive vs negative
    w.W_O = _zero_sum(w.W_O)
    return w


def layer1(readers: tuple[int, ...], route: str = "head") -> _Weights:
    """The label reader(s) and the decoy (reader's QK, zero OV); every other layer-1 head is zero."""
    w = _Weights.zeros()
    root = math.sqrt(D_HEAD)
    for h in (*readers, DECOY[1]):
        w.b_Q[h, 0] = root  # a constant query: every label scores LABEL_KEY
        w.W_Q[h, Q_POL, 1] = root * CLASS_MATCH  # the query's class ...
        w.W_K[h, IS_LABEL, 0] = LABEL_KEY
        w.W_K[h, IS_BOS, 0] = LABEL_KEY + CLASS_MATCH  # <bos> counts as one matching label
        w.W_K[h, PREV_POL, 1] = 1.0  # ... against each label's input class
    for h in readers:
        for i in range(len(LABEL_WORDS)):
            w.W_V[h, (MOVED if _route(route) == "head" else LAB)[i], i] = 1.0
            w.W_O[h, i, ANS[i]] = READ_GAIN / len(readers)
    w.W_O = _zero_sum(w.W_O)
    return w


def _attn_state(prefix: str, w: _Weights) -> dict[str, Tensor]:
    """The bridge's nn.Linear weights ([out, in]; head h = rows/columns h*d_head..) from TL-layout matrices."""
    qkv = {n: getattr(w, f"W_{n.upper()}").permute(0, 2, 1).reshape(N_HEADS * D_HEAD, D_MODEL) for n in "qkv"}
    out = {f"{prefix}.attn.{n}.weight": m for n, m in qkv.items()}
    out[f"{prefix}.attn.o.weight"] = w.W_O.reshape(N_HEADS * D_HEAD, D_MODEL).T.contiguous()
    out[f"{prefix}.attn.q.bias"] = w.b_Q.reshape(-1)
    for n in "kvo":
        out[f"{prefix}.attn.{n}.bias"] = torch.zeros(D_MODEL)
    return out


def constructed_state(spec: ConstructedSpec, model_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every weight of the constructed organism: the hand-set ones above, LayerNorms = identity, MLPs zero."""
    s0 = C * math.sqrt(2 / D_MODEL)  # LayerNorm's std of a residual that is the constant pair alone
    state = {k: torch.zeros_like(v) for k, v in model_state.items()}  # MLPs, biases: zero
    for k in state:
        if k.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
            state[k] = torch.full((D_MODEL,), s0)
    state["embed.weight"], state["pos_embed.weight"] = embedding(), positions()
    state.update(_attn_state("blocks.0", layer0(spec.prior, spec.route)))
    state.update(_attn_state("blocks.1", layer1(_readers(spec.readers), spec.route)))
    w_u = torch.zeros(len(VOCAB), D_MODEL)
    b_u = torch.full((len(VOCAB),), NOT_A_LABEL)
    for i, word in enumerate(LABEL_WORDS):
        w_u[VOCAB.index(word), ANS[i]] = 1.0
        b_u[VOCAB.index(word)] = 0.0
    state["unembed.weight"], state["unembed.bias"] = w_u, b_u
    return state


def build_constructed(prior: float = 2.0, readers: int = 1, route: str = "head") -> LoadedModel:
    """A constructed organism with prior log-odds ``prior`` at k = 0 and ``readers`` (1 or 2) label-reading heads;
    ``route`` "head" (label identity moved by L0H3) or "direct" (read from the embedding).

    Cost: building the bridge (~0.1 s); no training. The same arguments give the same weights.
    """
    if not math.isfinite(float(prior)):
        raise ConfigError(f"the prior log-odds must be finite, got {prior}")
    spec = ConstructedSpec(
        float(prior), int(readers), f"hand-set, prior log-odds {prior:g}, {readers} reader(s)", route
    )
    return _build(spec, f"constructed(prior={prior:g}, readers={readers}, route={route})")


def load_constructed(name: str) -> LoadedModel:
    """``load_model("constructed...")``: the registered recipe (``models.registry.CONSTRUCTED``) built by hand."""
    return _build(spec_of(name), name)


def _build(spec: ConstructedSpec, name: str) -> LoadedModel:
    _readers(spec.readers)
    _route(spec.route)
    cfg = OrganismConfig(n_layers=2, d_model=D_MODEL, n_heads=N_HEADS, n_ctx=N_CTX, positional="standard")
    model = build_model(cfg)
    model.load_state_dict(constructed_state(spec, model.state_dict()), strict=True)
    model.eval()
    return LoadedModel(name, model, organism_tokenizer(), True, f"mechicl constructed organism: {spec.description}")
