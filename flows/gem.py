"""GEM: reflective SFT -> k chain-of-thought candidates with entropies -> Eq. 1
filtering -> SEGA, then preference accuracy of every model on the evaluation sets.

The comparison runs in the same flow on the same pairs: the base model, SFT
only, GEM (SFT + SEGA) and, with ``compare_dpo``, DPO from the base model.
Rewards are beta * sum log pi (the paper's evaluation) and, for trained
models, beta * (log pi - log pi_base) as RewardBench scores DPO models.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from alignflow.config import GemConfig
from alignflow.flows.report import gem_summary, publish_gem
from alignflow.tasks.base_model import base_model_task
from alignflow.tasks.entropy import entropy_pairs_task, entropy_task
from alignflow.tasks.logprobs import logprobs_task
from alignflow.tasks.pref_accuracy import pref_accuracy_task
from alignflow.tasks.preferences import preference_set, preferences_task
from alignflow.tasks.sample import sample_task
from alignflow.tasks.stage import RELEASE_HOOKS, run_context
from alignflow.tasks.train_dpo import train_dpo_task
from alignflow.tasks.train_sega import train_sega_task
from alignflow.tasks.train_sft import train_sft_task
from alignflow.workers.hardware import resolve_dtypes


def genies_dir(config: GemConfig) -> Path:
    return Path(config.genies_data_dir or Path(config.paths.resolved().home) / "genies").expanduser()


@flow(name="gem", **RELEASE_HOOKS)
def gem(config: GemConfig = GemConfig()) -> dict:
    config = resolve_dtypes(config)  # stage keys and manifests carry the dtype actually used
    ctx = run_context(config)
    train = preferences_task(
        ctx, preference_set(config.train, genies_dir(config), config.columns, config.max_train_pairs, config.seed)
    )
    evals = preferences_task(
        ctx, preference_set(config.eval, genies_dir(config), config.columns, config.max_eval_pairs, config.seed)
    )
    base = base_model_task(config.model, ctx.model_cache)
    sft = train_sft_task(ctx, config.sft, policy=base, pairs=train)
    candidates = sample_task(ctx, config.sample, policy=sft, preferences=train)
    scores = entropy_task(ctx, config.entropy, policy=sft, candidates=candidates)
    stages = {"preferences": train, "train_sft": sft, "sample": candidates, "entropy": scores}
    if config.entropy.emit_pairs:
        stages["entropy_pairs"] = entropy_pairs_task(ctx, config.entropy, candidates=candidates, scores=scores)
    stages["train_sega"] = train_sega_task(ctx, config.sega, policy=sft, candidates=candidates, scores=scores)
    models = {"base": base, "sft": sft, "gem": stages["train_sega"]}
    if config.compare_dpo:
        with_reference = logprobs_task(ctx, config.logprobs, reference=base, pairs=train)
        stages["train_dpo"] = models["dpo"] = train_dpo_task(ctx, config.dpo, policy=base, pairs=with_reference)
    accuracy = {
        (name, "log pi"): pref_accuracy_task(ctx, config.pref_accuracy, policy=model, pairs=evals)
        for name, model in models.items()
    }
    for name in [n for n in models if n != "base"]:
        accuracy[(name, "log pi - log pi_base")] = pref_accuracy_task(
            ctx,
            config.pref_accuracy,
            policy_scores=accuracy[(name, "log pi")],
            pairs=evals,
            reference_scores=accuracy[("base", "log pi")],
        )
    summary = gem_summary(ctx.store(), stages, accuracy, list(config.eval))
    publish_gem(summary)
    return summary
