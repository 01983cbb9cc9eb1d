"""train_pro: PRO (Preference Ranking Optimization, Song et al. 2023), a listwise
objective on the shared training loop, one of GEM's Table 1 baselines.

For a prompt's responses ranked best first, y_1 > ... > y_n, with r(y) the mean
token log-prob of y:

    L_PRO = -sum_{k=1}^{t} log( exp r(y_k) / sum_{i>=k} exp r(y_i) )
    L     = L_PRO + sft_weight * NLL(y_1)   (NLL: mean over y_1's tokens)

t = n - 1 for a full ranking. Preference pairs rank a chosen answer above its
rejected ones, which are not ranked among themselves: one group per (prompt,
chosen answer) with t = 1. PRO's optional temperature weighting by reward gaps is
not used (the pairs carry no reward scores).
"""

from __future__ import annotations

import torch

from alignflow.config import PROConfig
from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.stage import RunContext, Stage, stage_task
from alignflow.tasks.training import Objective, curves, fit, history_schema
from alignflow.workers.chat import encode_pair, end_of_turn_ids
from alignflow.workers.scoring import pack, response_token_logprobs


def pro_loss(mean_logps: torch.Tensor, terms: int) -> torch.Tensor:
    """-sum_{k<terms} log softmax(r[k:])[0] for one ranking, best first."""
    return -sum(torch.log_softmax(mean_logps[k:], dim=0)[0] for k in range(terms))


def pro_groups(tokenizer, stop_ids: list[int], pairs: list[dict], config: PROConfig) -> list[dict]:
    """One ranking per (prompt, chosen answer): the chosen first, then its distinct rejected answers."""
    groups: dict[tuple[str, str], dict] = {}
    for pair in pairs:
        encoded = encode_pair(
            tokenizer, pair, stop_ids, config.max_prompt_tokens, config.max_response_tokens, config.format
        )
        group = groups.setdefault(
            (pair["prompt_id"], pair["chosen"]),
            {
                "prompt_id": pair["prompt_id"],
                "prompt_ids": encoded["prompt_ids"],
                "responses": [encoded["chosen_ids"]],
                "terms": 1,
            },
        )
        if encoded["rejected_ids"] not in group["responses"]:
            group["responses"].append(encoded["rejected_ids"])
    return [g for g in groups.values() if len(g["responses"]) > 1]


def pro_objective(config: PROConfig, pad_id: int) -> Objective:
    def batch_loss(model, groups: list[dict]):
        prompts = [g["prompt_ids"] for g in groups for _ in g["responses"]]
        logp, mask = response_token_logprobs(model, pack(prompts, [r for g in groups for r in g["responses"]], pad_id))
        means = (logp * mask).sum(dim=1) / mask.sum(dim=1)
        ranking_losses, sft_losses, top_right, start = [], [], [], 0
        for g in groups:
            r = means[start : start + len(g["responses"])]
            ranking_losses.append(pro_loss(r, g["terms"]))
            sft_losses.append(-r[0])
            top_right.append(float(r[0] > r[1:].max()))
            start += len(g["responses"])
        ranking, sft = torch.stack(ranking_losses).mean(), torch.stack(sft_losses).mean()
        loss = ranking + config.sft_weight * sft
        metrics = {
            "loss": float(loss.detach()),
            "pro_loss": float(ranking.detach()),
            "sft_loss": float(sft.detach()),
            "top_accuracy": sum(top_right) / len(top_right),
        }
        return loss, metrics

    return Objective("train_pro", batch_loss)


def compute_train_pro(ctx: RunContext, config: PROConfig, key: str, policy: ArtifactRef, pairs: ArtifactRef):
    def ranked(model, tokenizer, rows):
        return pro_groups(tokenizer, end_of_turn_ids(tokenizer, model), rows, config)

    return fit(
        ctx,
        "train_pro",
        key,
        policy,
        ctx.store().read_rows(pairs),
        config,
        lambda tokenizer: pro_objective(config, tokenizer.pad_token_id),
        prepare=ranked,
    )


TRAIN_PRO = Stage(
    "train_pro",
    compute_train_pro,
    __name__,
    schema=history_schema("loss", "pro_loss", "sft_loss", "top_accuracy"),
    examples=curves("loss", "top_accuracy"),
)
train_pro_task = stage_task(TRAIN_PRO)
