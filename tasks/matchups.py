"""matchups: the trained policy's and the initial model's answers to each held-out instruction,
as one candidates artifact the judge stage compares in both orders.

The policy's answer is candidate 0 and the initial model's candidate 1, so the judge's
comparison (a=0, b=1) shows the policy first and (a=1, b=0) shows it second. Both carry the
instruction as the prompts file gives it: each model's own sample may have cut it to fit.
"""

from __future__ import annotations

import pyarrow as pa

from alignflow.config import Strict
from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.sample import CANDIDATE_ROWS
from alignflow.tasks.stage import RunContext, Stage, StageOutput, stage_task

POLICY, INITIAL = 0, 1


def pair_answers(prompts: list[dict], policy: list[dict], initial: list[dict]) -> list[dict]:
    """Per instruction, in the prompts' order: the policy's answer, then the initial model's."""
    answers = {side: {r["prompt_id"]: r for r in rows} for side, rows in ((POLICY, policy), (INITIAL, initial))}
    out = []
    for p in prompts:
        for side in (POLICY, INITIAL):
            row = answers[side].get(p["id"])
            if row is None:
                raise ValueError(f"matchups: no answer to instruction '{p['id']}' from candidate {side}'s sample")
            out.append({**row, "prompt": p["prompt"], "reference": p["reference"], "candidate": side})
    return out


def matchup_metrics(rows: list[dict]) -> dict:
    by_side = {side: [r for r in rows if r["candidate"] == side] for side in (POLICY, INITIAL)}
    return {
        "rows_out": len(rows),
        "identical_answers": sum(a["response"] == b["response"] for a, b in zip(by_side[POLICY], by_side[INITIAL])),
        "policy_unfinished": sum(r["finish_reason"] != "stop" for r in by_side[POLICY]),
        "initial_unfinished": sum(r["finish_reason"] != "stop" for r in by_side[INITIAL]),
    }


def compute_matchups(
    ctx: RunContext,
    config: Strict,
    key: str,
    prompts: ArtifactRef,
    policy_answers: ArtifactRef,
    initial_answers: ArtifactRef,
) -> StageOutput:
    store = ctx.store()
    rows = pair_answers(store.read_rows(prompts), store.read_rows(policy_answers), store.read_rows(initial_answers))
    return StageOutput(tables=[pa.Table.from_pylist(rows)], metrics=matchup_metrics(rows))


MATCHUPS = Stage("matchups", compute_matchups, __name__, schema=CANDIDATE_ROWS)
matchups_task = stage_task(MATCHUPS)
