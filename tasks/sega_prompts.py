"""sega_prompts: the prompts one on-policy SEGA iteration samples from.

The distinct prompts of every training source in a seeded shuffle, reshuffled for
each pass over them; iteration i takes the next ``count``, so consecutive iterations
see new prompts and each source is drawn in proportion to its prompts (taking the
first prompts of the preference artifact would take them all from its first source).
"""

from __future__ import annotations

import random

import pyarrow as pa

from alignflow.config import Strict
from alignflow.tasks.stage import RunContext, Stage, StageOutput, stage_task


class SegaPrompts(Strict):
    iteration: int
    count: int
    seed: int = 0


def pass_order(prompt_ids: list[str], seed: int, pass_index: int) -> list[str]:
    order = sorted(prompt_ids)
    random.Random(f"{seed}:{pass_index}").shuffle(order)
    return order


def iteration_prompt_ids(prompt_ids: list[str], config: SegaPrompts) -> list[str]:
    """Positions ``iteration * count`` onwards of the endless sequence of shuffled passes."""
    distinct = sorted(set(prompt_ids))
    if config.count > len(distinct):
        raise ValueError(
            f"sega: an iteration samples {config.count} prompts (steps_per_iteration x batch_size x grad_accum) "
            f"but the training pairs have only {len(distinct)} distinct prompts"
        )
    positions = range(config.iteration * config.count, (config.iteration + 1) * config.count)
    passes = {p: pass_order(distinct, config.seed, p) for p in {i // len(distinct) for i in positions}}
    return [passes[i // len(distinct)][i % len(distinct)] for i in positions]


def compute_sega_prompts(ctx: RunContext, config: SegaPrompts, key: str, preferences):
    first = {}
    for row in ctx.store().read_rows(preferences):
        first.setdefault(row["prompt_id"], row)
    chosen = [first[p] for p in iteration_prompt_ids(list(first), config)]
    rows = [
        {"id": r["prompt_id"], "prompt_id": r["prompt_id"], "prompt": r["prompt"], "dataset": r["dataset"]}
        for r in chosen
    ]
    datasets = sorted({r["dataset"] for r in rows})
    return StageOutput(
        tables=[pa.Table.from_pylist(rows, schema=SEGA_PROMPT_ROWS)],
        metrics={"rows_out": len(rows), **{f"prompts_{d}": sum(r["dataset"] == d for r in rows) for d in datasets}},
    )


SEGA_PROMPT_ROWS = pa.schema(
    [("id", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()), ("dataset", pa.string())]
)
SEGA_PROMPTS = Stage("sega_prompts", compute_sega_prompts, __name__, schema=SEGA_PROMPT_ROWS)
sega_prompts_task = stage_task(SEGA_PROMPTS)
