"""train_sft (GEM stage A) on (prompt, chosen) pairs, in the run's format.

The target is the chosen answer, as both upstream repositories train (GEM's
step-by-step system turn is part of its chat format's prompt). ``target: contrast``
is this project's extension, in neither repository: reasoning from the rejected
answer as a first draft, the marker, then the chosen answer. Only target tokens
are learned: the prompt and the padding carry the ignore label.
"""

from __future__ import annotations

import torch

from alignflow.config import SFTConfig
from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.stage import RunContext, Stage, stage_task
from alignflow.tasks.training import Objective, curves, fit, history_schema
from alignflow.workers.chat import end_of_turn_ids, fit_prompt, response_ids
from alignflow.workers.scoring import pack

IGNORE = -100  # the label torch's cross-entropy skips


def clip_text(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def sft_target(tokenizer, pair: dict, config: SFTConfig) -> str:
    chosen = clip_text(tokenizer, pair["chosen"], config.max_answer_tokens)
    if config.target == "chosen":
        return chosen
    rejected = clip_text(tokenizer, pair["rejected"], config.max_answer_tokens)
    return f"{config.contrast_reasoning.replace('{rejected}', rejected)}\n{config.marker} {chosen}"


def sft_examples(tokenizer, stop_ids: list[int], pairs: list[dict], config: SFTConfig) -> list[dict]:
    """Token ids of prompt and target per distinct (prompt, target): the pairs of one
    prompt share a chosen answer, which is learned once."""
    seen, rows = set(), []
    for pair in pairs:
        target = sft_target(tokenizer, pair, config)
        if (pair["prompt"], target) in seen:
            continue
        seen.add((pair["prompt"], target))
        content, prompt, _ = fit_prompt(tokenizer, pair["prompt"], config.max_prompt_tokens, config.format)
        rows.append(
            {
                "prompt_id": pair["prompt_id"],
                "prompt_ids": prompt,
                "target_ids": response_ids(tokenizer, content, target, stop_ids, config.format),
            }
        )
    return rows


def sft_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The input ids where the target is, IGNORE on prompt and padding."""
    return batch["input_ids"].masked_fill(~batch["response_mask"], IGNORE)


def sft_objective(pad_id: int) -> Objective:
    def batch_loss(model, rows: list[dict]):
        batch = pack([r["prompt_ids"] for r in rows], [r["target_ids"] for r in rows], pad_id)
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=sft_labels(batch)
        ).loss
        return loss, {"loss": float(loss.detach())}

    return Objective("train_sft", batch_loss)


def compute_train_sft(ctx: RunContext, config: SFTConfig, key: str, policy: ArtifactRef, pairs: ArtifactRef):
    def tokenized(model, tokenizer, rows):
        return sft_examples(tokenizer, end_of_turn_ids(tokenizer, model), rows, config)

    return fit(
        ctx,
        "train_sft",
        key,
        policy,
        ctx.store().read_rows(pairs),
        config,
        lambda tokenizer: sft_objective(tokenizer.pad_token_id),
        prepare=tokenized,
    )


TRAIN_SFT = Stage("train_sft", compute_train_sft, __name__, schema=history_schema("loss"), examples=curves("loss"))
train_sft_task = stage_task(TRAIN_SFT)
