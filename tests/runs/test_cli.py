from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mechicl.cli import build_parser, main
from mechicl.cli.dispatch import COMMANDS


def test_behavior_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "behavior",
            "--model",
            "tiny",
            "--task",
            "toy",
            "--k",
            "3",
            "--n-contexts",
            "4",
            "--conditions",
            "default,random,flipped",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    for name in [
        "raw.csv",
        "summary.csv",
        "summary.md",
        "config.json",
        "accuracy.png",
        "log_likelihood.png",
        "entropy.png",
    ]:
        assert (out / name).stat().st_size > 0, name
    s = pd.read_csv(out / "summary.csv")
    assert set(s.condition) == {"default", "random", "flipped"} and s.k.max() == 3
    assert "# Behaviour: tiny on toy" in (out / "summary.md").read_text()


def test_user_errors_exit_2(capsys, tmp_path):
    assert main(["behavior", "--model", "nope", "--task", "toy", "--out", str(tmp_path)]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["behavior", "--model", "tiny", "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["behavior", "--model", "tiny", "--task", "toy", "--conditions", "default,upside-down"]) == 2
    assert "unknown label condition 'upside-down'" in capsys.readouterr().err


def test_list_commands(capsys):
    assert main(["models"]) == 0 and "smollm2-135m" in capsys.readouterr().out
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "vader-words" in out and "*.csv / *.jsonl" in out and "`" not in out and "--template" in out


def test_template_and_label_names_reach_the_prompts_and_config(tmp_path, capsys):
    """--template (with \\n escapes) replaces a built-in task's template, --label-names renames its classes; config.json
    records what ran."""
    out = tmp_path / "run"
    assert (
        main(
            [
                "patch",
                "--model",
                "tiny",
                "--task",
                "toy",
                "--kinds",
                "head_out",
                "--n-contexts",
                "2",
                "--k",
                "3",
                "--template",
                "Review: {input}\\nSentiment: {label}",
                "--label-names",
                "bad,good",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ran = json.loads((out / "config.json").read_text())["ran"]
    assert ran["template"]["example"] == "Review: {input}\nSentiment: {label}" and ran["label_names"] == ["bad", "good"]
    assert ran["model"] == "tiny" and ran["task"] == "toy"
    with pytest.raises(SystemExit) as e:  # a bad flag value stops in argparse, exit 2, before anything loads
        main(["patch", "--model", "tiny", "--task", "toy", "--template", "{label} {input}"])
    assert e.value.code == 2 and "must contain '{input}' and end with '{label}'" in capsys.readouterr().err
    assert (
        main(["patch", "--model", "tiny", "--task", "toy", "--label-names", "a,b,c", "--out", str(tmp_path / "x")]) == 2
    )
    assert "task toy has 2 classes" in capsys.readouterr().err


def test_heads_is_one_findings_cell_and_records_what_ran(tmp_path, capsys):
    """`mechicl heads` runs one held-out findings cell: it prints the cell's verdict, writes the cell's tables and
    records the preset it ran (k_min defaults to k // 2, interchange ablation). Tiny has no in-context label effect, so the
    verdict is the finder's first check, and the tables are written (empty) all the same."""
    out = tmp_path / "heads"
    argv = ["heads", "--model", "tiny", "--task", "toy", "--k", "4", "--n-screen", "4", "--n-confirm", "4"]
    assert main([*argv, "--n-eval", "6", "--candidates", "12", "--n-control", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    verdict = [line for line in printed.splitlines() if line.startswith("**Verdict:**")]
    assert verdict == ["**Verdict:** no in-context effect to attribute."]
    assert {"screen.csv", "confirm.csv", "validate.csv", "sets.csv", "controls.csv", "summary.md"} <= {
        p.name for p in out.iterdir()
    }
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["k"], cfg["k_min"], cfg["n_validate"], cfg["ablation"], cfg["n_control"]) == (4, 2, 6, "interchange", 3)
    assert cfg["ran"]["model"] == "tiny" and cfg["ran"]["task"] == "toy"


def test_file_task_with_integer_labels(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"w{i} w{i + 1},{i % 2}\n" for i in range(20)))
    out = tmp_path / "run"
    assert (
        main(
            [
                "behavior",
                "--model",
                "tiny",
                "--task",
                str(data),
                "--label-names",
                "negative,positive",
                "--k",
                "2",
                "--n-contexts",
                "3",
                "--conditions",
                "default,flipped",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "summary.csv").exists()


def test_file_tasks_are_balanced_unless_no_balance(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"w{i} w{i + 1},{int(i % 4 == 0)}\n" for i in range(24)))  # 18 vs 6 rows
    for extra, rows in (([], 12), (["--no-balance"], 24)):
        out = tmp_path / f"run{len(extra)}"
        assert (
            main(
                [
                    "patch",
                    "--model",
                    "tiny",
                    "--task",
                    str(data),
                    "--label-names",
                    "negative,positive",
                    "--kinds",
                    "head_out",
                    "--n-contexts",
                    "2",
                    "--k",
                    "3",
                    "--out",
                    str(out),
                    *extra,
                ]
            )
            == 0
        )
        assert json.loads((out / "config.json").read_text())["ran"]["task_rows"] == rows


def test_device_and_dtype_flags_load_the_model_that_way_and_are_recorded(tmp_path, capsys):
    out = tmp_path / "bf16"
    assert (
        main(
            [
                "behavior",
                "--model",
                "organism-strong",
                "--task",
                "organism",
                "--conditions",
                "default",
                "--k",
                "2",
                "--n-contexts",
                "2",
                "--device",
                "cpu",
                "--dtype",
                "bfloat16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ran = json.loads((out / "config.json").read_text())["ran"]
    assert (ran["device"], ran["dtype"]) == ("cpu", "bfloat16")
    assert "cpu, bfloat16" in capsys.readouterr().out
    assert main(["behavior", "--model", "tiny", "--task", "toy", "--device", "tpu", "--out", str(tmp_path / "x")]) == 2
    assert "tpu" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["models"], ["tasks"], ["patch", "--help"]])
def test_listing_and_help_load_no_torch(argv):
    """`mechicl --help`, `models` and `tasks` answer in a fresh interpreter without importing torch or TL."""
    code = (
        "import sys\nfrom mechicl.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformer_lens', 'transformers'})\n"
        "print('HEAVY', heavy, file=sys.stderr)"
    )
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    assert "HEAVY []" in r.stderr and r.stdout.strip(), r.stderr[-2000:]


def test_every_command_has_one_entry_that_exists():
    """The dispatch table names every command of the parser once, and each entry's module defines its function
    (read from the source, so that the check imports nothing heavy)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    names = {n for n in sub.choices if n != "organism"} | {f"organism {n}" for n in _subcommands(sub, "organism")}
    assert names == set(COMMANDS)
    for name, target in COMMANDS.items():
        module, function = target.split(":")
        tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8"))
        assert function in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}, (name, target)
        if module.startswith("mechicl.runs."):
            assert module.split(".")[-1] in name or name == "demo", (name, target)  # runs/<command>.py


def _subcommands(sub: argparse._SubParsersAction, name: str) -> list[str]:
    inner = next(a for a in sub.choices[name]._actions if isinstance(a, argparse._SubParsersAction))
    return list(inner.choices)


def test_a_command_runs_the_function_its_entry_names(monkeypatch, tmp_path):
    """`main` resolves the command by name and hands it the parsed flags (an interrupt in it exits 130)."""
    seen = []

    def fake(args):
        seen.append((args.command, args.k, args.min_gap))
        raise KeyboardInterrupt

    monkeypatch.setattr("mechicl.runs.lens.command", fake)
    assert main(["lens", "--model", "tiny", "--task", "toy", "--k", "5", "--out", str(tmp_path / "x")]) == 130
    assert seen == [("lens", 5, 0.05)] and not (tmp_path / "x").exists()
