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
from alignflow.storage.artifacts import ArtifactRef, ArtifactStore
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
    train = preferences_task(ctx, preference_set(config.train, genies_dir(config), config.columns,
                                                 config.max_train_pairs, config.seed))
    evals = preferences_task(ctx, preference_set(config.eval, genies_dir(config), config.columns,
                                                 config.max_eval_pairs, config.seed))
    base = base_model_task(config.model, ctx.model_cache)
    sft = train_sft_task(ctx, config.sft, policy=base, pairs=train)
    candidates = sample_task(ctx, config.sample, policy=sft, prompts=train)
    scores = entropy_task(ctx, config.entropy, policy=sft, candidates=candidates)
    stages = {"preferences": train, "train_sft": sft, "sample": candidates, "entropy": scores}
    if config.entropy.emit_pairs:
        stages["entropy_pairs"] = entropy_pairs_task(ctx, config.entropy, candidates=candidates, scores=scores)
    stages["train_sega"] = train_sega_task(ctx, config.sega, policy=sft, candidates=candidates, scores=scores)
    models = {"base": base, "sft": sft, "gem": stages["train_sega"]}
    if config.compare_dpo:
        with_reference = logprobs_task(ctx, config.logprobs, reference=base, pairs=train)
        stages["train_dpo"] = models["dpo"] = train_dpo_task(ctx, config.dpo, policy=base, pairs=with_reference)
    accuracy = {(name, "log pi"): pref_accuracy_task(ctx, config.pref_accuracy, policy=model, pairs=evals)
                for name, model in models.items()}
    for name in [n for n in models if n != "base"]:
        accuracy[(name, "log pi - log pi_base")] = pref_accuracy_task(
            ctx, config.pref_accuracy, policy=accuracy[(name, "log pi")], pairs=evals, reference=accuracy[("base", "log pi")])
    summary = gem_summary(ctx.store(), stages, accuracy, list(config.eval))
    publish_gem_summary(summary)
    return summary


STAGE_HEADLINE = {
    "preferences": ["rows_out", "distinct_prompts"],
    "train_sft": ["train_rows", "steps", "before_loss", "after_loss"],
    "sample": ["rows_out", "generated_tokens", "tokens_per_s", "finished_share"],
    "entropy": ["marker_share", "mean_final_entropy", "mean_fork_entropy", "trimmed"],
    "entropy_pairs": ["rows_out"],
    "train_sega": ["groups", "steps", "before_loss", "after_loss"],
    "train_dpo": ["train_rows", "steps", "before_loss", "after_loss", "after_reward_accuracy"],
}


def gem_summary(store: ArtifactStore, stages: dict[str, ArtifactRef], accuracy: dict, datasets: list[str]) -> dict:
    def metrics(ref):
        return store.manifest(ref.stage, ref.key)["metrics"]
    table = []
    for (model, reward), ref in accuracy.items():
        m = metrics(ref)
        row = {"model": model, "reward": reward, "uri": ref.uri, "accuracy": m["accuracy"], "ties": m["ties"]}
        for d in datasets:
            row[d] = m[f"accuracy/{d}"]
            row[f"{d} ties"] = m[f"ties/{d}"]
            row[f"{d} pairs"] = m[f"pairs/{d}"]
        table.append(row)
    return {"stages": {name: {"uri": ref.uri, **{k: metrics(ref).get(k) for k in STAGE_HEADLINE[name]}}
                       for name, ref in stages.items()},
            "datasets": datasets, "accuracy": table}


def gem_summary_markdown(summary: dict) -> str:
    datasets = summary["datasets"]
    lines = ["# gem summary", "", "## preference accuracy (ties: share of pairs, not counted as correct)", "",
             "| model | reward | " + " | ".join(datasets) + " | all |", "|---|---|" + "---:|" * (len(datasets) + 1)]
    for row in summary["accuracy"]:
        cells = [f"{row[d]:.3f} ({row[f'{d} ties']:.2f} ties)" if row[f"{d} ties"] else f"{row[d]:.3f}" for d in datasets]
        lines.append(f"| {row['model']} | {row['reward']} | " + " | ".join(cells) + f" | {row['accuracy']:.3f} |")
    pairs = ", ".join(f"{d}: {summary['accuracy'][0][f'{d} pairs']}" for d in datasets)
    lines += ["", f"pairs per dataset: {pairs}", "", "## stages", "", "| stage | artifact | metrics |", "|---|---|---|"]
    for name, info in summary["stages"].items():
        metrics = ", ".join(f"{k}={v}" for k, v in info.items() if k != "uri" and v is not None)
        lines.append(f"| {name} | `{info['uri']}` | {metrics} |")
    return "\n".join(lines) + "\n"


def publish_gem_summary(summary: dict) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(key="gem-preference-accuracy", table=[{k: v for k, v in row.items() if k != "uri"}
                                                                for row in summary["accuracy"]],
                          description="gem: preference accuracy per model, reward and dataset")
    create_markdown_artifact(markdown=gem_summary_markdown(summary), key="gem-summary",
                             description="gem: artifacts and headline metrics")
