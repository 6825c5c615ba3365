"""Write a user-style CSV task for the findings grid: US city -> state (Alaska / Texas / California).

The rows come from ``airports.csv`` in the ``vega_datasets==0.9.0`` wheel (the wheel mechicl already
fetches, hash-checked, for ``vega-cars``); nothing third-party is committed. One row per distinct
city of an airport in the three states with the most airports; a city name found in more than one
of them is dropped. The file has the ``text,label`` columns any user CSV needs::

    .venv/bin/python experiments/make_airports_csv.py            # -> runs/data/airports_states.csv
    .venv/bin/mechicl findings --config experiments/findings.toml --tasks runs/data/airports_states.csv

(The grid balances the classes, seeded per cell, as it does for every file task.)
"""

from __future__ import annotations

import argparse
import csv
import io
import zipfile
from pathlib import Path

from mechicl.data.fetch import pip_download, verify_sha256
from mechicl.data.tasks import VEGA_WHEEL

STATES = {"AK": "Alaska", "TX": "Texas", "CA": "California"}
MEMBER = "vega_datasets/_data/airports.csv"


def rows() -> list[tuple[str, str]]:
    """(city, state name) pairs, first-seen order, cities listed under two of the states dropped."""
    wheel = verify_sha256(pip_download(VEGA_WHEEL[0]), VEGA_WHEEL[1])
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as f:
        table = list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8")))
    states: dict[str, set[str]] = {}
    for r in table:
        city = " ".join((r.get("city") or "").split())
        if city and r.get("state") in STATES:
            states.setdefault(city, set()).add(STATES[r["state"]])
    return [(city, s.pop()) for city, s in states.items() if len(s) == 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/data/airports_states.csv"))
    args = ap.parse_args()
    kept = rows()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(kept)
    tmp.replace(args.out)
    counts = {s: sum(1 for _, x in kept if x == s) for s in STATES.values()}
    print(f"wrote {args.out}: {len(kept)} cities {counts}")


if __name__ == "__main__":
    main()
