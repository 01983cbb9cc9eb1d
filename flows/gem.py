"""GEM: SFT -> on-policy SEGA iterations -> preference accuracy of every model.

Each SEGA iteration samples k chain-of-thought candidates per prompt from the
current policy (its prompts: ``sega_prompts``), scores them by Eq. 1 (``entropy``)
and trains ``steps_per_iteration`` steps (``train_sega``); every stage is cached,
so an interrupted run resumes at its last committed iteration. The baselines of
GEM's Table 1 (DPO, IPO, PRO) train from the base model on the same pairs, and
with ``shuffled_control`` SEGA runs again on shuffled scores. Every stage renders
(prompt, answer) in the run's one ``format``. Rewards are beta * sum log pi (the
paper's evaluation) and, for trained models, beta * (log pi - log pi_base).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from alignflow.config import GemConfig
from alignflow.flows.report import gem_summary, publish_gem
from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.base_model import base_model_task
from alignflow.tasks.entropy import entropy_task
from alignflow.tasks.logprobs import logprobs_task
from alignflow.tasks.pref_accuracy import pref_accuracy_task
from alignflow.tasks.preferences import preference_set, preferences_task
from alignflow.tasks.sample import sample_task
from alignflow.tasks.sega_prompts import SegaPrompts, sega_prompts_task
from alignflow.tasks.stage import RELEASE_HOOKS, RunContext, run_context
from alignflow.tasks.train_dpo import train_dpo_task
from alignflow.tasks.train_pro import train_pro_task
from alignflow.tasks.train_sega import train_sega_task
from alignflow.tasks.train_sft import train_sft_task
from alignflow.workers.hardware import resolve_dtypes


def genies_dir(config: GemConfig) -> Path:
    return Path(config.genies_data_dir or Path(config.paths.resolved().home) / "genies").expanduser()


def with_format(config: GemConfig) -> GemConfig:
    """Every stage that renders text gets the run's one format (and keys on it)."""
    fmt = config.text_format()
    return config.model_copy(
        update={
            name: getattr(config, name).model_copy(update={"format": fmt})
            for name in ("sft", "sample", "logprobs", "pro", "pref_accuracy")
        }
    )


def sega_iterations(
    ctx: RunContext, config: GemConfig, policy: ArtifactRef, train: ArtifactRef, shuffled: bool, stages: dict
) -> ArtifactRef:
    """sega_prompts -> sample (from the current policy) -> entropy -> train_sega, ``iterations`` times."""
    sega = config.sega.model_copy(update={"shuffle_advantages": shuffled})
    label = " shuffled" if shuffled else ""
    for i in range(1, sega.iterations + 1):
        schedule = SegaPrompts(iteration=i - 1, count=sega.prompts_per_iteration, seed=config.seed)
        prompts = sega_prompts_task(ctx, schedule, preferences=train)
        candidates = sample_task(ctx, config.sample, policy=policy, prompts=prompts)
        scores = entropy_task(ctx, config.entropy, policy=policy, candidates=candidates)
        policy = train_sega_task(ctx, sega, policy=policy, candidates=candidates, scores=scores)
        if not shuffled:
            stages |= {f"sega_prompts {i}": prompts, f"sample {i}": candidates, f"entropy {i}": scores}
        stages[f"train_sega{label} {i}"] = policy
    return policy


def baselines(ctx: RunContext, config: GemConfig, base: ArtifactRef, train: ArtifactRef, stages: dict) -> dict:
    """DPO, IPO (DPO's trainer, IPO loss) and PRO from the base model on the training pairs."""
    models = {}
    if {"dpo", "ipo"} & set(config.baselines):
        with_reference = stages["logprobs"] = logprobs_task(ctx, config.logprobs, reference=base, pairs=train)
    for name in config.baselines:
        if name == "pro":
            models[name] = train_pro_task(ctx, config.pro, policy=base, pairs=train)
        else:
            loss = {"dpo": "sigmoid", "ipo": "ipo"}[name]
            dpo = config.dpo.model_copy(update={"loss": loss})
            models[name] = train_dpo_task(ctx, dpo, policy=base, pairs=with_reference)
        stages[f"train_{name}"] = models[name]
    return models


def preference_accuracies(ctx: RunContext, config: GemConfig, models: dict, evals: ArtifactRef) -> dict:
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
    return accuracy


@flow(name="gem", **RELEASE_HOOKS)
def gem(config: GemConfig = GemConfig()) -> dict:
    config = with_format(resolve_dtypes(config))  # stage keys and manifests carry the dtype and format used
    ctx = run_context(config)
    train = preferences_task(
        ctx, preference_set(config.train, genies_dir(config), config.columns, config.max_train_pairs, config.seed)
    )
    evals = preferences_task(
        ctx, preference_set(config.eval, genies_dir(config), config.columns, config.max_eval_pairs, config.seed)
    )
    base = base_model_task(config.model, ctx.model_cache)
    sft = train_sft_task(ctx, config.sft, policy=base, pairs=train)
    stages = {"preferences": train, "train_sft": sft}
    models = {"base": base, "sft": sft, "gem": sega_iterations(ctx, config, sft, train, False, stages)}
    if config.shuffled_control:
        models["gem_shuffled"] = sega_iterations(ctx, config, sft, train, True, stages)
    models |= baselines(ctx, config, base, train, stages)
    accuracy = preference_accuracies(ctx, config, models, evals)
    summary = gem_summary(ctx.store(), stages, accuracy, list(config.eval))
    publish_gem(summary)
    return summary
