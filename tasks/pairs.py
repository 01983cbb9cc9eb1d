"""pairs: candidate scores from the judgments, then best vs worst per prompt.

s_i = mean soft win probability of candidate i over all its comparisons, in both
positions. Ties break by candidate index: among equal scores the lower index is
picked, as best and as worst alike, so pairs are deterministic. A candidate cut
off at ``max_new_tokens`` is no answer: it is left out unless ``keep_unfinished``.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow as pa

from alignflow.config import PairsConfig
from alignflow.storage.artifacts import ArtifactRef, ArtifactStore
from alignflow.tasks.stage import RunContext, Stage, StageOutput, stage_task
from alignflow.tasks.stage_report import EXAMPLES, examples_markdown


def group_by_prompt(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["prompt_id"]].append(r)
    return dict(groups)


def unique_candidates(candidates: list[dict]) -> list[dict]:
    """First occurrence of each exact response text, in candidate order."""
    seen, out = set(), []
    for c in sorted(candidates, key=lambda c: c["candidate"]):
        if c["response"] not in seen:
            seen.add(c["response"])
            out.append(c)
    return out


def candidate_scores(judgments: list[dict]) -> dict[tuple[str, int], float]:
    """Mean win probability per (prompt_id, candidate): p_a as (a), 1 - p_a as (b). A comparison
    dropped for not fitting the judge's budget says nothing, so it is not a tie either."""
    wins: dict[tuple[str, int], list[float]] = defaultdict(list)
    for j in (j for j in judgments if not j.get("dropped")):
        wins[(j["prompt_id"], j["a"])].append(j["p_a"])
        wins[(j["prompt_id"], j["b"])].append(1.0 - j["p_a"])
    return {k: sum(v) / len(v) for k, v in wins.items()}


def choose_pair(scored: list[tuple[int, float]], min_margin: float) -> tuple[int, int] | str:
    """(chosen, rejected) candidate indices, or the reason the prompt is skipped."""
    if len(scored) < 2:
        return "fewer_than_2_candidates"
    best = min(scored, key=lambda s: (-s[1], s[0]))
    worst = min((s for s in scored if s[0] != best[0]), key=lambda s: (s[1], s[0]))
    if best[1] == worst[1]:
        return "all_scores_equal"
    if best[1] - worst[1] < min_margin - 1e-12:  # a margin equal to min_margin passes
        return "below_min_margin"
    return best[0], worst[0]


def finished(candidate: dict) -> bool:
    """Ended on an end-of-turn token, not cut off at ``max_new_tokens``."""
    return candidate["finish_reason"] == "stop"


def answers(group: list[dict], scores: dict, config: PairsConfig) -> list[dict]:
    """A prompt's candidates that may be paired: finished (unless kept anyway), scored, not too
    long, one per distinct text (deduped after the filter, so a finished twin of a dropped one stays)."""
    eligible = [
        c
        for c in group
        if (config.keep_unfinished or finished(c))
        and len(c["token_ids"]) <= config.max_response_tokens
        and (c["prompt_id"], c["candidate"]) in scores
    ]
    return unique_candidates(eligible)


def build_pairs(candidates: list[dict], judgments: list[dict], config: PairsConfig) -> tuple[list[dict], dict]:
    scores = candidate_scores(judgments)
    pairs, skipped = [], Counter()
    for prompt_id, group in group_by_prompt(candidates).items():
        kept = answers(group, scores, config)
        choice = choose_pair([(c["candidate"], scores[(prompt_id, c["candidate"])]) for c in kept], config.min_margin)
        if isinstance(choice, str):
            skipped[choice] += 1
            continue
        by_index = {c["candidate"]: c for c in kept}
        chosen, rejected = by_index[choice[0]], by_index[choice[1]]
        pairs.append(
            {
                "prompt_id": prompt_id,
                "prompt": chosen["prompt"],
                "reference": chosen["reference"],
                "chosen": chosen["response"],
                "rejected": rejected["response"],
                "chosen_candidate": chosen["candidate"],
                "rejected_candidate": rejected["candidate"],
                "chosen_score": scores[(prompt_id, chosen["candidate"])],
                "rejected_score": scores[(prompt_id, rejected["candidate"])],
            }
        )
    metrics = {
        "rows_out": len(pairs),
        "unfinished_candidates": sum(not finished(c) for c in candidates),
        **{f"skipped_{k}": v for k, v in sorted(skipped.items())},
    }
    if pairs:
        metrics["mean_margin"] = round(sum(p["chosen_score"] - p["rejected_score"] for p in pairs) / len(pairs), 4)
    return pairs, metrics


def compute_pairs(ctx: RunContext, config: PairsConfig, key: str, candidates: ArtifactRef, judgments: ArtifactRef):
    store = ctx.store()
    pairs, metrics = build_pairs(store.read_rows(candidates), store.read_rows(judgments), config)
    if not pairs:
        raise ValueError(f"pairs: no prompt produced a chosen/rejected pair ({metrics}); nothing to train on")
    return StageOutput(tables=[pa.Table.from_pylist(pairs)], metrics=metrics)


def pairs_examples(store: ArtifactStore, ref: ArtifactRef, parents: dict) -> str:
    return examples_markdown(
        "pairs: chosen vs rejected",
        [
            {
                "prompt": p["prompt"],
                "reference": p["reference"],
                "chosen": p["chosen"],
                "chosen_score": p["chosen_score"],
                "rejected": p["rejected"],
                "rejected_score": p["rejected_score"],
            }
            for p in store.read_rows(ref)[:EXAMPLES]
        ],
    )


PAIR_ROWS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("reference", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("chosen_candidate", pa.int64()),
        ("rejected_candidate", pa.int64()),
        ("chosen_score", pa.float64()),
        ("rejected_score", pa.float64()),
    ]
)
PAIRS = Stage("pairs", compute_pairs, __name__, schema=PAIR_ROWS, examples=pairs_examples)
pairs_task = stage_task(PAIRS)
