"""The full pipeline: self-improve trains a policy, then GENIES evaluates it.

GENIES takes the trained policy (the last round's merged model) as its base
model, so every intervention, zero_shot included, measures that policy. Both
halves are subflows with their own cached stages: a pipeline started after a
self-improve run with the same training config gets its training back from
cache and only evaluates (what the deployment's event trigger relies on).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from alignflow.config import PipelineConfig, SelfImproveConfig
from alignflow.flows.genies_eval import genies_eval
from alignflow.flows.report import publish_pipeline
from alignflow.flows.self_improve import self_improve
from alignflow.tasks.stage import run_context
from alignflow.workers.hardware import resolve_dtypes


def trained_model(training: SelfImproveConfig, summary: dict) -> tuple[Path, str]:
    """The last round's trained policy: its local directory (downloaded once if the store is
    remote) and its name in the GENIES results tree, by artifact key: every trained policy's
    folder is called ``merged``, so two pipeline runs exporting to one results tree would collide."""
    ctx = run_context(training)
    key = Path(summary["rounds"][-1]["train_dpo"]["uri"]).name
    return ctx.model_dir(ctx.store().ref("train_dpo", key)), f"train_dpo-{key}"


@flow(name="pipeline")
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict:
    config = resolve_dtypes(config)  # each half for its own executor; the subflows' parameters show the result
    training = self_improve(config=config.training)
    model, name = trained_model(config.training, training)
    evaluation = genies_eval(config=config.genies.model_copy(update={"model": str(model), "model_name": name}))
    summary = {"training": training, "model": str(model), "genies": evaluation}
    publish_pipeline(summary)
    return summary
