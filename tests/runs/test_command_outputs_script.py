"""scripts/command_outputs.sh runs to its end: its `mechicl run` line names a task the organism can read (it ran the
config's vader-words task on organism-strong and stopped with exit 2 after the findings cell)."""

from __future__ import annotations

import shlex
from pathlib import Path

from mechicl.cli import main

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "command_outputs.sh"


def test_the_scripts_run_line_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(SCRIPT.parents[1])
    (line,) = [x for x in SCRIPT.read_text().splitlines() if x.startswith("$M run ")]
    argv = shlex.split(line.split(">")[0].replace("$M ", "").replace('"$OUT', f'"{tmp_path}'))
    assert main(argv) == 0
    assert (tmp_path / "run_nh3" / "config.toml").is_file()
