"""Recompute every metrics CSV GENIES committed from the JSON files it committed beside them.

    git -C GENIES_REPO archive HEAD results distribution_shifts | tar -x -C /tmp/genies-upstream
    python bench/genies_published_metrics.py /tmp/genies-upstream

GENIES_REPO is a clone of Joshuaclymer/GENIES. Prints, per CSV, whether every column of every
row matches `alignflow genies metrics` (numbers to 1e-6), and exits 1 if any does not.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from alignflow.genies.metrics import PUBLISHED_COLUMNS, results_rows
from alignflow.genies.shifts import load_shifts


def differences(published: list[dict], ours: list[dict]) -> list[str]:
    if len(published) != len(ours):
        return [f"{len(published)} rows published, {len(ours)} recomputed"]
    out = []
    for index, (theirs, mine) in enumerate(zip(published, ours)):
        for column in PUBLISHED_COLUMNS:
            if not same(theirs[column], mine[column]):
                out.append(f"row {index} {column}: published {theirs[column]!r}, recomputed {mine[column]!r}")
    return out


def same(published: str, ours) -> bool:
    if isinstance(ours, str):
        return published == ours
    expected = float(published) if published not in ("", "nan") else math.nan
    return (math.isnan(expected) and math.isnan(ours)) or abs(expected - ours) <= 1e-6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", type=Path, help="folder holding GENIES's results/ and distribution_shifts/")
    args = parser.parse_args()
    results = args.upstream / "results"
    failed = 0
    tables = sorted(results.glob("generalization_metrics/*/*/*.csv"))
    for path in tables:
        model, intervention, shift_set = path.parts[-3], path.parts[-2], path.stem
        shifts = load_shifts(str(args.upstream / "distribution_shifts" / f"{shift_set}.json"), keep_repeats=True)
        with open(path, newline="") as f:
            published = list(csv.DictReader(f))
        problems = differences(published, results_rows(results, shifts, intervention, model))
        failed += bool(problems)
        print(f"{path.relative_to(results)}: {'reproduced' if not problems else '; '.join(problems[:3])}")
    print(f"{len(tables) - failed} of {len(tables)} published metrics tables reproduced to 1e-6")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
