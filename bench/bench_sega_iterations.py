"""On-policy SEGA, the cost of freshness: the same number of SEGA steps on the same prompts,
sampled from the current policy before every step (steps_per_iteration 1, as upstream),
every few steps, and once before all of them (the offline training GEM had here before),
in one run. Each setting calls the gem flow's stages directly (sega_prompts, sample,
entropy, train_sega; no Prefect), from the base model, into its own fresh artifact root.

    python bench/bench_sega_iterations.py --steps 8 --per-iteration 1 4 8 --batch 2 --n 4 --max-new-tokens 64

Reports each setting's wall time, its seconds per SEGA step, the stage seconds the manifests
record (sample, entropy, train_sega), and the wall time relative to sampling once.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from benchlib import timed

from alignflow.config import DEFAULT_INSTRUCTIONS, EntropyConfig, SampleConfig, SEGAConfig, TextFormat, alignflow_home
from alignflow.tasks.base_model import base_model_ref
from alignflow.tasks.entropy import ENTROPY
from alignflow.tasks.preferences import PREFERENCES, preference_set
from alignflow.tasks.sample import SAMPLE
from alignflow.tasks.sega_prompts import SEGA_PROMPTS, SegaPrompts
from alignflow.tasks.stage import RunContext
from alignflow.tasks.train_sega import TRAIN_SEGA

PLAIN = TextFormat(style="plain", instruction=DEFAULT_INSTRUCTIONS["plain"])


def on_policy_run(ctx: RunContext, args, per_iteration: int) -> dict:
    """``args.steps`` SEGA steps, sampling every ``per_iteration`` of them; stage seconds from the manifests."""
    store = ctx.store()
    sega = SEGAConfig(
        iterations=args.steps // per_iteration,
        steps_per_iteration=per_iteration,
        batch_size=args.batch,
        lr=2e-4,
        zscore=True,
        checkpoint_every=10_000,
    )
    sample = SampleConfig(
        cot=True,
        n=args.n,
        temperature=1.0,
        top_p=0.95,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        format=PLAIN,
    )
    pairs = PREFERENCES.run(ctx, preference_set({"train": args.pairs}, Path(args.genies_dir), limit=64, seed=0))
    policy = base_model_ref(args.model, ctx.model_cache)
    refs = []

    def iterate():
        nonlocal policy
        for i in range(sega.iterations):
            prompts = SEGA_PROMPTS.run(
                ctx, SegaPrompts(iteration=i, count=sega.prompts_per_iteration), preferences=pairs
            )
            candidates = SAMPLE.run(ctx, sample, policy=policy, prompts=prompts)
            scores = ENTROPY.run(ctx, EntropyConfig(), policy=policy, candidates=candidates)
            policy = TRAIN_SEGA.run(ctx, sega, policy=policy, candidates=candidates, scores=scores)
            refs.extend([candidates, scores, policy])

    _, wall = timed(iterate)

    def total(metric: str, stage: str) -> float:
        return sum(store.manifest(r.stage, r.key)["metrics"][metric] for r in refs if r.stage == stage)

    steps = total("steps", "train_sega")
    return {
        "steps_per_iteration": per_iteration,
        "iterations": sega.iterations,
        "sega_steps": steps,
        "generated_tokens": total("generated_tokens", "sample"),
        "wall_s": round(wall, 1),
        "s_per_step": round(wall / max(steps, 1), 2),
        **{f"{stage}_s": round(total("seconds", stage), 1) for stage in ("sample", "entropy", "train_sega")},
    }


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--pairs", default="genies:alpaca_mmlu:train")
    p.add_argument("--genies-dir", default=str(alignflow_home() / "genies"))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--per-iteration", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--batch", type=int, default=2, help="prompts per SEGA step")
    p.add_argument("--n", type=int, default=4, help="candidates per prompt (k)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    cache = str(alignflow_home() / "models")
    runs = []
    for per_iteration in args.per_iteration:
        with tempfile.TemporaryDirectory(prefix="bench-sega-") as root:
            ctx = RunContext(artifact_root=root, model_cache=cache)
            runs.append(on_policy_run(ctx, args, per_iteration))
    once = next((r for r in runs if r["iterations"] == 1), runs[-1])
    for r in runs:
        r["wall_vs_sampling_once"] = round(r["wall_s"] / once["wall_s"], 2)
    print(json.dumps({"threads": torch.get_num_threads(), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
