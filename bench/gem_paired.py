"""Paired comparisons of a gem run's models on the same evaluation pairs: for each pair of
models, per dataset, the pairs only one of them gets right (discordant) and the exact
two-sided sign test (McNemar's exact test) on them. Reads the summary ``alignflow run gem
--json`` prints (a cached re-run prints it again in seconds).

    alignflow run gem --config configs/gem_cpu.yaml --json > gem.json
    python bench/gem_paired.py gem.json [--reward "log pi"] [--against sft gem_shuffled]
"""

from __future__ import annotations

import argparse
import json
from math import comb
from pathlib import Path

from alignflow.storage.artifacts import ArtifactStore


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided p of ``wins`` against ``losses`` under p = 1/2 (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def correct_by_pair(store: ArtifactStore, uri: str) -> dict[str, tuple[str, bool]]:
    ref = store.find(uri.rsplit("/", 1)[-1])
    return {r["id"]: (r["dataset"], bool(r["correct"])) for r in store.read_rows(ref)}


def compare(a: dict, b: dict, datasets: list[str]) -> dict[str, dict]:
    out = {}
    for dataset in [*datasets, "all"]:
        ids = [i for i in a if dataset == "all" or a[i][0] == dataset]
        only_a = sum(a[i][1] and not b[i][1] for i in ids)
        only_b = sum(b[i][1] and not a[i][1] for i in ids)
        out[dataset] = {"only_first": only_a, "only_second": only_b, "p": round(sign_test(only_a, only_b), 4)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("summary", help="the JSON `alignflow run gem --json` printed")
    p.add_argument("--reward", default="log pi")
    p.add_argument("--against", nargs="+", default=["sft", "gem_shuffled"], help="models every other is compared with")
    args = p.parse_args()
    text = Path(args.summary).read_text()
    summary = json.loads(text[text.index("{") :])
    rows = {r["model"]: r for r in summary["accuracy"] if r["reward"] == args.reward}
    store = ArtifactStore(next(iter(rows.values()))["uri"].rsplit("/", 2)[0])  # the root: .../pref_accuracy/KEY
    correct = {model: correct_by_pair(store, row["uri"]) for model, row in rows.items()}
    result = {
        f"{model} vs {other}": compare(correct[model], correct[other], summary["datasets"])
        for other in args.against
        for model in correct
        if model != other and other in correct
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
