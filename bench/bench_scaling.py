"""How each self-improve stage's time grows with prompts x candidates, on CPU.

Every size runs the demo config's stages as a plain script (benchlib.run_plain:
the flow's stage functions, no Prefect) into its own fresh artifact root, so
nothing is served from cache and the times are the stages' own (manifest
``seconds``: model load and work, not the commit). Sizes run smallest first,
back to back in one command. The growth exponent of a stage between two sizes is
log(time ratio) / log(size ratio): 1 is linear in prompts x candidates; the
judge compares every ordered pair of a prompt's candidates, so its work grows
as prompts x n(n-1).

    python bench/bench_scaling.py --sizes 4x3 8x4 16x6 [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

from benchlib import run_plain, timed

from alignflow.config import SelfImproveConfig, load_config
from alignflow.storage.artifacts import ArtifactStore

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("sample", "judge", "pairs", "logprobs", "train_dpo")


def parse_size(text: str) -> tuple[int, int]:
    prompts, _, n = text.partition("x")
    if not (prompts.isdigit() and n.isdigit()) or int(n) < 2:
        raise argparse.ArgumentTypeError(
            f"size {text!r}: expected PROMPTSxCANDIDATES with 2 or more candidates, e.g. 8x4"
        )
    return int(prompts), int(n)


def size_config(base: SelfImproveConfig, prompts: int, n: int, root: Path) -> SelfImproveConfig:
    return base.model_copy(
        update={
            "limit_prompts": prompts,
            "sample": base.sample.model_copy(update={"n": n}),
            "paths": base.paths.model_copy(update={"artifact_root": str(root)}),
        }
    )


def stage_times(config: SelfImproveConfig, summary: dict) -> dict:
    """Each stage's own seconds and its main work count, from the artifact manifests."""
    store = ArtifactStore(config.paths.resolved().artifact_root)
    out = {}
    for stage, info in summary["rounds"][0].items():
        stage_dir, key = info["uri"].rstrip("/").split("/")[-2:]
        manifest = store.manifest(stage_dir, key)
        out[stage] = {"seconds": manifest["metrics"]["seconds"], "rows": manifest["rows"]}
    return out


def run_size(base: SelfImproveConfig, prompts: int, n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="alignflow-scaling-") as root:
        config = size_config(base, prompts, n, Path(root))
        summary, wall = timed(lambda: run_plain(config))
        return {
            "prompts": prompts,
            "n": n,
            "candidates": prompts * n,
            "judge_comparisons": prompts * n * (n - 1),
            "wall_s": round(wall, 2),
            "stages": stage_times(config, summary),
        }


def growth(small: dict, large: dict, stage: str) -> float | None:
    """Exponent e with time ~ (prompts x candidates)^e between two sizes."""
    t0, t1 = small["stages"][stage]["seconds"], large["stages"][stage]["seconds"]
    if min(t0, t1) <= 0.05 or small["candidates"] == large["candidates"]:  # too short to time, or one size
        return None
    return round(math.log(t1 / t0) / math.log(large["candidates"] / small["candidates"]), 2)


def print_table(results: list[dict]) -> None:
    sizes = [f"{r['prompts']}x{r['n']}" for r in results]
    print("\n| stage | " + " | ".join(f"{s} (s)" for s in sizes) + f" | growth exponent {sizes[0]} -> {sizes[-1]} |")
    print("|---|" + "---:|" * (len(sizes) + 1))
    for stage in STAGES:
        times = " | ".join(f"{r['stages'][stage]['seconds']:.2f}" for r in results)
        exponent = growth(results[0], results[-1], stage)
        print(f"| {stage} | {times} | {'-' if exponent is None else exponent} |")
    print("| wall (all stages) | " + " | ".join(f"{r['wall_s']:.2f}" for r in results) + " | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[(4, 3), (8, 4), (16, 6)])
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "scaling.json"))
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. sample.max_new_tokens=32")
    args = p.parse_args()
    base = load_config(SelfImproveConfig, args.config, args.overrides)
    results = []
    for prompts, n in sorted(args.sizes, key=lambda s: s[0] * s[1]):
        print(f"size {prompts} prompts x {n} candidates ...", flush=True)
        results.append(run_size(base, prompts, n))
    print_table(results)
    report = {"config": args.config, "overrides": args.overrides, "threads": os.cpu_count(), "sizes": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"\njson: {args.out}")


if __name__ == "__main__":
    main()
