"""The README's report screenshot and headline table, both from one `make demo` run (issue 29, item 7).

    .venv/bin/python scripts/readme_report.py --from runs/<time>-report-...   # commit that run's numbers + screenshot
    .venv/bin/python scripts/readme_report.py --check                         # exit 1 unless README.md holds them

``--from RUN`` copies the run's ``headline.csv``, ``facts.csv``, ``stages.csv`` and ``config.json`` (numbers and head
names only, no task text) to ``docs/results/report/``, screenshots the top of its ``report.html`` in headless Chromium
(1280 x 1600 px, from ``file://``) into ``docs/img/report_top.png``, and rewrites the README block between
``<!-- report-headline ... -->`` markers from the committed files. ``--check`` re-renders the block from
``docs/results/report/`` and compares (``tests/test_readme_report.py``), so the README's table, the screenshot's run
and the command that made them cannot drift apart without a test failing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from mechicl.runs.markdown import md_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "report"
SCREENSHOT = ROOT / "docs" / "img" / "report_top.png"
FILES = ("headline.csv", "facts.csv", "stages.csv", "config.json")
START, END = "<!-- report-headline: scripts/readme_report.py -->", "<!-- /report-headline -->"


def block(results: Path = RESULTS) -> str:
    """The README block: what ran, on what, at what cost, and the headline table, all read from ``results``."""
    facts = pd.read_csv(results / "facts.csv").set_index("fact").value
    cfg = json.loads((results / "config.json").read_text(encoding="utf-8"))
    stages = pd.read_csv(results / "stages.csv")
    head = pd.read_csv(results / "headline.csv", dtype=str)
    lead = (
        f'The screenshot above and this table come from one run: `make demo DEMO_ARGS="--threads 1"` '
        f"(`{facts['re-run']} --threads 1`; {cfg['model']} on {cfg['task']}, seed {cfg['seed']}) on "
        f"{facts['machine']}: {stages.seconds.sum():.0f} s over its stages, model load excluded "
        f"(per-stage times in [docs/results/report/stages.csv](docs/results/report/stages.csv)). The heads the "
        "report's own held-out finder validated, their roles and whether the grid replicates them:"
    )
    return "\n".join([START, lead, "", md_table(head), END])


def write_block(readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{readme.name} lacks the block {START} ... {END}: add the two lines first")
    a, b = text.index(START), text.index(END) + len(END)
    readme.write_text(text[:a] + block() + text[b:], encoding="utf-8")


def check(readme: Path = ROOT / "README.md", results: Path = RESULTS) -> str | None:
    """None when the README holds the block exactly, else what is wrong."""
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        return f"{readme.name} lacks the block {START} ... {END}"
    got, want = text[text.index(START) : text.index(END) + len(END)], block(results)
    return None if got == want else f"{readme.name}'s report block differs from {results}; paste:\n{want}"


def screenshot(html: Path, out: Path) -> None:
    """The top 1280 x 1600 px of ``html`` as Chromium renders it from file:// (no network)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH: install Debian's chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}"]
        shot = Path(profile) / "shot.png"
        subprocess.run(
            [chromium, *flags, "--window-size=1280,1600", f"--screenshot={shot}", html.resolve().as_uri()],
            check=True,
            capture_output=True,
            timeout=120,
        )
        shutil.copyfile(shot, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="run", type=Path, help="a `mechicl report` run folder to take both from")
    ap.add_argument("--check", action="store_true", help="compare README.md with docs/results/report/")
    args = ap.parse_args()
    if args.run is not None:
        missing = [f for f in (*FILES, "report.html") if not (args.run / f).is_file()]
        if missing:
            raise SystemExit(f"{args.run} lacks {', '.join(missing)}: give the folder a `mechicl report` run wrote")
        RESULTS.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            shutil.copyfile(args.run / f, RESULTS / f)
        screenshot(args.run / "report.html", SCREENSHOT)
        write_block()
        return 0
    if args.check:
        err = check()
        print(err or "README.md matches docs/results/report/", file=sys.stderr if err else sys.stdout)
        return 1 if err else 0
    print(block())
    return 0


if __name__ == "__main__":
    sys.exit(main())
