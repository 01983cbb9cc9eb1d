"""Judge throughput: prefix reuse (each prompt's rules, instruction and reference run once, then
only each comparison's candidates) against every comparison's whole prompt, in one process.

The demo's data: its prompts, sample and judge settings (configs/demo.yaml), float32 on both
sides. Candidates are sampled once with the demo's model; then the two ways judge them,
interleaved (whole, reused, reused, whole, ...), on the same loaded model.

    python bench/bench_judge.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial
from importlib import resources
from pathlib import Path

import torch
from benchlib import timed

from alignflow.config import SelfImproveConfig, alignflow_home, load_config
from alignflow.tasks.judge import judge_candidates
from alignflow.tasks.prompts import read_prompt_rows
from alignflow.tasks.sample import sample_candidates
from alignflow.workers.hf import HFBackend, shared_prefix_length
from alignflow.workers.models import resolve_model_dir

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


class PrefixRecordingBackend(HFBackend):
    """The hf backend, remembering each group's shared-prefix and prompt lengths (where the time goes)."""

    def next_token(self, groups, top_logprobs, progress=None):
        self.lengths = [(shared_prefix_length(g), [len(p) for p in g]) for g in groups]
        return super().next_token(groups, top_logprobs, progress)


def prefix_share(lengths: list[tuple[int, list[int]]]) -> dict:
    """Tokens the whole-prompt way runs against those prefix reuse runs."""
    whole = sum(sum(prompts) for _, prompts in lengths)
    reused = sum(shared + sum(p - shared for p in prompts) for shared, prompts in lengths)
    return {
        "mean_prompt_tokens": round(whole / sum(len(p) for _, p in lengths), 1),
        "mean_shared_prefix_tokens": round(statistics.mean(s for s, _ in lengths), 1),
        "tokens_run_whole": whole,
        "tokens_run_reused": reused,
        "token_ratio": round(whole / reused, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEMO))
    p.add_argument(
        "--repeats", type=int, default=2, help="interleaved pairs of the two ways, alternating which goes first"
    )
    p.add_argument("--model-cache", default=str(alignflow_home() / "models"))
    args = p.parse_args()
    config = load_config(SelfImproveConfig, args.config)
    sample = config.sample.model_copy(update={"dtype": "float32"})
    judge = config.judge.model_copy(update={"dtype": "float32"})
    rows = read_prompt_rows(resources.files("alignflow") / "data" / "demo_prompts.jsonl")[: config.limit_prompts]

    backend = PrefixRecordingBackend(
        resolve_model_dir(config.model, args.model_cache), dtype="float32", batch_size=sample.batch_size
    )
    (candidates, _), sample_s = timed(lambda: sample_candidates(backend, rows, sample))
    backend.batch_size = judge.batch_size
    rates: dict[str, list[float]] = {"whole": [], "reused": []}
    outputs = {}
    ways = [("whole", False), ("reused", True)]
    for repeat in range(args.repeats):
        for way, reuse in ways if repeat % 2 == 0 else ways[::-1]:  # alternate who goes first: load drifts
            (out, _), seconds = timed(partial(judge_candidates, backend, candidates, judge, reuse_prefix=reuse))
            rates[way].append(len(out) / seconds)
            outputs[way] = out
    whole, reused = outputs["whole"], outputs["reused"]
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "prompts": len(rows),
                "candidates": len(candidates),
                "comparisons": len(whole),
                "sample_s": round(sample_s, 1),
                "judge_batch_size": judge.batch_size,
                "whole_comparisons_per_s": [round(r, 2) for r in rates["whole"]],
                "reused_comparisons_per_s": [round(r, 2) for r in rates["reused"]],
                "ratio_per_repeat": [round(r / w, 3) for w, r in zip(rates["whole"], rates["reused"])],
                "max_abs_p_a_diff": max(abs(a["p_a"] - b["p_a"]) for a, b in zip(whole, reused)),
                "verdict_agreement": sum(
                    (a["p_a"] > 0.5) == (b["p_a"] > 0.5) and a["parsed"] == b["parsed"] for a, b in zip(whole, reused)
                )
                / len(whole),
                **prefix_share(backend.lengths),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
