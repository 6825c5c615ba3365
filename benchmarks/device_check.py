"""Device and dtype check: the embedded models on a GPU in float32 and bfloat16, against the CPU.

    .venv/bin/python benchmarks/device_check.py                    # a GPU machine: the CUDA checks below
    .venv/bin/python benchmarks/device_check.py --cpu-dtypes       # any machine: bfloat16/float16 vs float32 on the CPU
    .venv/bin/python benchmarks/device_check.py --device cpu --models tiny   # dry run of the GPU code path on the CPU

GPU mode (default ``--device cuda``), per model (``gemma3-270m``, ``smollm2-135m``), on the same prompts:

* the label readout (``readout.label_logits``) and one exact patching sweep (``Patcher.sweep``, default
  ``head_out``: every head at every position, the P1 sweep) on the CPU in float32 (the reference) and on
  the device in float32 and bfloat16: max |difference| of the label logits, argmax agreement, max |difference|
  of the sweep's normalised values;
* P1 on the device: mechicl's all-heads exact patching against TransformerLens 4.3's
  ``get_act_patch_attn_head_out_all_pos`` (as ``benchmarks/bench_patching.py`` measures it on the CPU:
  a fresh ``Patcher`` per repeat, TL's clean ``run_with_cache`` inside its timing, its corrupted
  baseline outside), median of ``--repeats`` interleaved repeats, with ``torch.cuda.synchronize``.

Without a GPU it prints why and exits with status 2 (nothing was checked). ``--cpu-dtypes`` measures
the CPU dtype tolerances quoted in docs/devices.md instead. Never part of CI (it loads real models).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from functools import partialmethod

import torch

warnings.filterwarnings("ignore")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def _task_for(model: str) -> str:
    return "toy" if model == "tiny" else "organism" if model.startswith("organism") else "vader-words"


def _inputs(loaded, task, contexts: int, examples: int, seed: int):
    from mechicl.data.pairs import pair_for
    from mechicl.data.prompts import build_prompt_batch, sample_contexts

    ids = sample_contexts(task, contexts, examples, seed=seed)
    batch = build_prompt_batch(
        task, loaded.tokenizer, ids, "default", n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos
    )
    return batch, pair_for(loaded, task, contexts, examples, seed=seed)


def _measure(loaded, batch, pair, sweep: str, device: str) -> dict:
    """Label logits and one sweep (float32, CPU tensors) plus their wall times on ``loaded``'s device."""
    from mechicl.analysis.engine.readout import label_logits
    from mechicl.analysis.patching.exact import Patcher

    t_ro, logits = _timed(lambda: label_logits(loaded.model, batch, progress=False), device)
    patcher = Patcher(loaded.model, pair)
    t_sw, res = _timed(lambda: patcher.sweep(sweep, "denoise"), device)
    mode = f" ({patcher.stepper('corrupted').mode} stepper)" if sweep == "head_out_readout" else ""
    gap = float(res.clean_ld.mean() - res.corrupted_ld.mean())  # the normaliser: small gaps amplify noise
    return {
        "logits": logits,
        "values": res.values,
        "ld": res.logit_diff,
        "gap": gap,
        "t_readout": t_ro,
        "t_sweep": f"{t_sw:.2f}{mode}",
    }


def _compare(ref: dict, other: dict) -> dict:
    lg, lo = ref["logits"], other["logits"]
    return {
        "logit_max_abs": float((lg - lo).abs().max()),
        "logit_rel": float((lg - lo).abs().max() / lg.abs().max()),
        "argmax_agree": float((lg.argmax(-1) == lo.argmax(-1)).float().mean()),
        "sweep_max_abs": float((ref["values"] - other["values"]).abs().max()),
        "ld_max_abs": float((ref["ld"] - other["ld"]).abs().max()),
    }


def _tl_metric(model, pair, device: str):
    """The normalised answer - foil logit difference at the query slot, of full logits (TL's metric contract);
    baselines from the model's own full forwards on ``device``."""
    rows, q, a, f = torch.arange(pair.n_contexts), pair.query_pos, pair.answer_ids, pair.foil_ids

    def ld(logits):
        at = logits[rows, q].float()
        return (at[rows, a] - at[rows, f]).mean()

    with torch.no_grad():
        clean, corr = (float(ld(model(b.tokens.to(device)))) for b in (pair.clean, pair.corrupted))
    return lambda logits: (ld(logits) - corr) / (clean - corr)


def p1_ratio(loaded, pair, device: str, repeats: int) -> dict:
    """mechicl all-heads exact patching vs TL's ``get_act_patch_attn_head_out_all_pos`` on ``device``."""
    import transformer_lens.patching as tlp

    from mechicl.analysis.patching.exact import Patcher

    model = loaded.model
    metric = _tl_metric(model, pair, device)
    clean_tok, corr_tok = pair.clean.tokens.to(device), pair.corrupted.tokens.to(device)

    def ours():
        return Patcher(model, pair).sweep("head_out", "denoise").values

    def tl():
        with torch.no_grad():
            _, cache = model.run_with_cache(clean_tok)
            return tlp.get_act_patch_attn_head_out_all_pos(model, corr_tok, cache, metric).float().cpu()

    ours(), tl()  # warm-up (kernels, caches)
    t_ours, t_tl = [], []
    for _ in range(repeats):
        dt, v_ours = _timed(ours, device)
        t_ours.append(dt)
        dt, v_tl = _timed(tl, device)
        t_tl.append(dt)
    m_ours, m_tl = statistics.median(t_ours), statistics.median(t_tl)
    return {"ours": m_ours, "tl": m_tl, "ratio": m_tl / m_ours, "max_abs": float((v_ours - v_tl).abs().max())}


def gpu_check(args) -> None:
    from mechicl.data.tasks import load_task
    from mechicl.models.loading import load_model

    print(
        f"device {args.device}: {torch.cuda.get_device_name(0) if args.device.startswith('cuda') else 'cpu'}; "
        f"{args.contexts} contexts x {args.examples} examples; sweep {args.sweep}; P1 median of {args.repeats}"
    )
    rows, p1_rows = [], []
    for name in args.models:
        task = load_task(_task_for(name))
        ref_model = load_model(name)  # CPU float32: the reference
        batch, pair = _inputs(ref_model, task, args.contexts, args.examples, args.seed)
        ref = _measure(ref_model, batch, pair, args.sweep, "cpu")
        del ref_model
        for dtype in ("float32", "bfloat16"):
            loaded = load_model(name, device=args.device, dtype=dtype)
            got = _measure(loaded, batch, pair, args.sweep, args.device)
            rows.append((name, dtype, _compare(ref, got), ref, got))
            if not args.skip_p1:
                p1_rows.append((name, dtype, p1_ratio(loaded, pair, args.device, args.repeats)))
            del loaded
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    print(
        "\n| model | dtype | label logits max abs diff (rel.) | argmax agreement | sweep max abs diff (normalised) | "
        "sweep LD max abs diff (clean - corrupted LD) | readout s (cpu / dev) | sweep s (cpu / dev) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, dtype, c, ref, got in rows:
        print(
            f"| {name} | {dtype} | {c['logit_max_abs']:.2e} ({c['logit_rel']:.1e}) | {c['argmax_agree']:.3f} | "
            f"{c['sweep_max_abs']:.2e} | {c['ld_max_abs']:.2e} ({ref['gap']:.3f}) | {ref['t_readout']:.2f} / {got['t_readout']:.2f} | "
            f"{ref['t_sweep']} / {got['t_sweep']} |"
        )
    if p1_rows:
        print(f"\n| model | dtype | P1 on {args.device}: TL s | mechicl s | ratio | max abs diff |")
        print("|---|---|---|---|---|---|")
        for name, dtype, p in p1_rows:
            print(
                f"| {name} | {dtype} | {p['tl']:.3f} | {p['ours']:.3f} | **{p['ratio']:.2f}x** | {p['max_abs']:.2e} |"
            )


def cpu_dtypes(args) -> None:
    """bfloat16 / float16 against float32, all on the CPU (1 thread): the tolerances of docs/devices.md."""
    from mechicl.data.tasks import load_task
    from mechicl.models.loading import load_model

    print(f"CPU, 1 thread; {args.contexts} contexts x {args.examples} examples; sweep {args.sweep}")
    print(
        "\n| model | dtype | label logits max abs diff (rel.) | argmax agreement | sweep max abs diff (normalised) | "
        "sweep LD max abs diff (clean - corrupted LD) | readout s | sweep s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        task = load_task(_task_for(name))
        ref_model = load_model(name)
        batch, pair = _inputs(ref_model, task, args.contexts, args.examples, args.seed)
        ref = _measure(ref_model, batch, pair, args.sweep, "cpu")
        del ref_model
        print(
            f"| {name} | float32 | 0 (reference) | 1 | 0 | 0 ({ref['gap']:.3f}) | {ref['t_readout']:.2f} | {ref['t_sweep']} |",
            flush=True,
        )
        for dtype in ("bfloat16", "float16"):
            try:
                got = _measure(load_model(name, dtype=dtype), batch, pair, args.sweep, "cpu")
            except Exception as e:  # noqa: BLE001 - report an unsupported op as a result, not a crash
                print(f"| {name} | {dtype} | fails: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | | |")
                continue
            c = _compare(ref, got)
            print(
                f"| {name} | {dtype} | {c['logit_max_abs']:.2e} ({c['logit_rel']:.1e}) | {c['argmax_agree']:.3f} | "
                f"{c['sweep_max_abs']:.2e} | {c['ld_max_abs']:.2e} ({got['gap']:.3f}) | {got['t_readout']:.2f} | "
                f"{got['t_sweep']} |",
                flush=True,
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run of this script")
    ap.add_argument(
        "--cpu-dtypes", action="store_true", help="compare bfloat16/float16 with float32 on the CPU instead"
    )
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument(
        "--sweep", default=None, help="the compared sweep (default head_out; head_out_readout with --cpu-dtypes)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-p1", action="store_true", help="skip the P1 timing against TransformerLens")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from tqdm.auto import tqdm

    tqdm.__init__ = partialmethod(tqdm.__init__, disable=True)  # TL's per-cell progress bars
    if args.cpu_dtypes:
        args.sweep = args.sweep or "head_out_readout"
        cpu_dtypes(args)
        return 0
    args.sweep = args.sweep or "head_out"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"device_check: no GPU here (torch {torch.__version__}: torch.cuda.is_available() is False), so nothing "
            f"was checked. Run it on a machine with a CUDA GPU, or use --cpu-dtypes for the CPU dtype tolerances, "
            f"or --device cpu for a dry run of the GPU code path.",
            file=sys.stderr,
        )
        return 2
    gpu_check(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
