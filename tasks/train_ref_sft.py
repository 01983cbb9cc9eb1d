"""train_ref_sft: SFT on (instruction, reference) before RefEval's first round, as
its authors distil the references into the model first (their mle.py) and report
gains over that SFT model. The loss is GEM's SFT objective (tasks/train_sft.py):
the token-mean NLL of the reply, prompt and padding masked; the loop is the shared
one (tasks/training.py)."""

from __future__ import annotations

import dataclasses
import logging

from alignflow.config import ReferenceSFTConfig
from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.stage import RunContext, Stage, stage_task
from alignflow.tasks.train_sft import sft_objective
from alignflow.tasks.training import curves, fit, history_schema
from alignflow.workers.chat import end_of_turn_ids, fit_prompt, response_ids

log = logging.getLogger("alignflow")


def reference_examples(tokenizer, stop_ids: list[int], prompts: list[dict], config: ReferenceSFTConfig) -> list[dict]:
    """Prompt and reference token ids per prompt row; a reference over ``max_reference_tokens``
    is left out (learning a cut one would teach the model to stop mid-answer)."""
    rows = []
    for prompt in prompts:
        content, prompt_ids, _ = fit_prompt(tokenizer, prompt["prompt"], config.max_prompt_tokens)
        target = response_ids(tokenizer, content, prompt["reference"], stop_ids)
        if len(target) <= config.max_reference_tokens:
            rows.append({"prompt_id": prompt["id"], "prompt_ids": prompt_ids, "target_ids": target})
    if len(rows) < len(prompts):
        log.warning(
            "train_ref_sft: %d of %d references are over max_reference_tokens=%d and left out",
            len(prompts) - len(rows),
            len(prompts),
            config.max_reference_tokens,
        )
    return rows


def compute_train_ref_sft(
    ctx: RunContext,
    config: ReferenceSFTConfig,
    key: str,
    policy: ArtifactRef,
    prompts: ArtifactRef,
    validation: ArtifactRef | None = None,
):
    """``validation``: held-out prompts whose references pick the best checkpoint; without them
    ``config.val_fraction`` of the prompts are held out."""
    store = ctx.store()

    def tokenized(model, tokenizer, rows):
        return reference_examples(tokenizer, end_of_turn_ids(tokenizer, model), rows, config)

    return fit(
        ctx,
        "train_ref_sft",
        key,
        policy,
        store.read_rows(prompts),
        config,
        lambda tokenizer: dataclasses.replace(sft_objective(tokenizer.pad_token_id), stage="train_ref_sft"),
        prepare=tokenized,
        val_rows=store.read_rows(validation) if validation else None,
    )


TRAIN_REF_SFT = Stage(
    "train_ref_sft", compute_train_ref_sft, __name__, schema=history_schema("loss"), examples=curves("loss")
)
train_ref_sft_task = stage_task(TRAIN_REF_SFT)
