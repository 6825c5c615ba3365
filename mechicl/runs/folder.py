"""The one writer of run folders: CSV tables, markdown, JSON configs, and paths for plots and pages.

Every command writes through a ``RunFolder`` and formats tables with ``md_table``; ``Clock`` times
its stages. Nothing else in mechicl writes files (``models.organism`` writes checkpoints).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def default_out(kind: str, model: str, task: str) -> Path:
    """``runs/<time>-<kind>-<model>-<task>`` with unsafe characters replaced."""
    safe = lambda s: "".join(c if c.isalnum() or c in "-_." else "_" for c in s)  # noqa: E731
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{safe(model)}-{safe(task)}"


class RunFolder:
    """A command's output folder; ``files`` lists what it wrote, in order."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []

    def __truediv__(self, name: str) -> Path:
        """The path of file ``name`` for a writer that takes a path (plots, HTML); recorded as written."""
        p = self.path / name
        self.files.append(p)
        return p

    def csv(self, name: str, df: pd.DataFrame) -> Path:
        p = self / name
        df.to_csv(p, index=False)
        return p

    def text(self, name: str, text: str) -> Path:
        p = self / name
        p.write_text(text, encoding="utf-8")
        return p

    def json(self, name: str, obj: Any) -> Path:
        """A dataclass (or a dict) as indented JSON, e.g. the exact configuration of the run."""
        return self.text(name, json.dumps(asdict(obj) if is_dataclass(obj) else obj, indent=2))

    def names(self) -> str:
        return ", ".join(dict.fromkeys(p.name for p in self.files))


def md_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A markdown table (floats rounded to ``digits``; other cells as they are)."""
    cols = list(df.columns)
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


class Clock:
    """Wall and process-CPU seconds per stage (CPU time is what a busy shared machine does not inflate)."""

    def __init__(self) -> None:
        self.t0 = self.t = time.perf_counter()
        self.c0 = time.process_time()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps.append((name, now - self.t))
        self.t = now

    def line(self) -> str:
        stages = ", ".join(f"{n} {s:.0f} s" for n, s in self.laps)
        return (f"Wall time {time.perf_counter() - self.t0:.0f} s, process CPU time {time.process_time() - self.c0:.0f} s "
                f"(model load excluded; stages: {stages}).")
