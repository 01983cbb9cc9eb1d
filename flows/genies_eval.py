"""GENIES: every intervention trained on each source and reference distribution,
evaluated on targets, sources and references; then metrics, leaderboard, report.

Per shift S -> T (reference R) an intervention needs A(S->T), A(S->S) and
A(R->R); zero_shot on T gives the baseline A0(T). Each (intervention, train
distribution) and each evaluation is its own cached task.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from prefect import flow
from prefect.futures import PrefectFuture

from alignflow.config import GeniesConfig
from alignflow.flows.report import genies_summary, publish_genies
from alignflow.genies.data import distribution_names
from alignflow.genies.interventions import make_intervention
from alignflow.genies.report import (
    ReportSpec,
    evaluation_name,
    export_results,
    genies_report_task,
    parse_evaluation_name,
)
from alignflow.genies.shifts import check_distributions, distributions_needed, load_shifts
from alignflow.genies.stages import (
    genies_evaluate_task,
    genies_pairs_task,
    genies_train_task,
    intervention_specs,
    pairs_spec,
)
from alignflow.tasks.base_model import base_model_task
from alignflow.tasks.stage import RELEASE_HOOKS, run_context
from alignflow.workers.hardware import resolve_dtypes


def data_dir(config: GeniesConfig) -> Path:
    return Path(config.data_dir or Path(config.paths.resolved().home) / "genies").expanduser()


def evaluations_needed(shifts, trains: bool) -> set[tuple[str | None, str]]:
    """(train distribution or None, evaluated distribution) pairs one intervention needs."""
    if not trains:
        return {(None, d) for d in distributions_needed(shifts)["evaluate"]}
    return (
        {(s.source, s.target) for s in shifts}
        | {(s.source, s.source) for s in shifts}
        | {(s.reference, s.reference) for s in shifts}
    )


def launch(ctx, task, *args, **kwargs):
    """On Ray, submit (tasks run concurrently on the actor pool, futures feed later
    tasks); locally, call in order so one process owns the CPU."""
    return task.submit(*args, **kwargs) if ctx.executor == "ray" else task(*args, **kwargs)


def model_name(config: GeniesConfig) -> str:
    """The model's name in the published layout."""
    return config.model_name or Path(config.model).name


def records_dropped(store, pairs: list) -> dict[str, int]:
    """'distribution/split' -> records dropped for exceeding scoring.max_tokens, where any were."""
    dropped = {}
    for ref in pairs:
        manifest = store.manifest(ref.stage, ref.key)
        if manifest["metrics"]["records_too_long"]:
            spec = manifest["config"]
            dropped[f"{spec['distribution']}/{spec['split']}"] = manifest["metrics"]["records_too_long"]
    return dropped


def shift_set_name(shifts: str) -> str:
    """What GENIES calls the metrics table of a shift set: GENIES, or the spec file's stem (all, ...)."""
    return "GENIES" if shifts == "builtin:genies" else Path(shifts).stem


def measured_at(store, evaluations: dict) -> dict[tuple, str]:
    """(intervention, source or None, target) -> when that evaluation was committed, as GENIES writes times."""
    stamps = {}
    for name, ref in evaluations.items():
        ref = ref.result() if isinstance(ref, PrefectFuture) else ref  # on Ray, launch() gave futures
        created = dt.datetime.fromisoformat(store.manifest(ref.stage, ref.key)["created_at"])
        stamps[parse_evaluation_name(name)] = created.strftime("%Y-%m-%d %H:%M:%S")
    return stamps


@flow(name="genies-eval", **RELEASE_HOOKS)
def genies_eval(config: GeniesConfig = GeniesConfig()) -> dict:
    config = resolve_dtypes(config)  # stage keys and manifests carry the dtype actually used
    ctx = run_context(config)
    root = data_dir(config)
    shifts = load_shifts(config.shifts)[: config.limit_shifts]
    check_distributions(shifts, distribution_names(root))
    specs = intervention_specs(config)
    if config.ceiling not in ("best", *(s.name for s in specs)):
        raise ValueError(
            f"ceiling: '{config.ceiling}' is neither 'best' nor one of the interventions run "
            f"({', '.join(s.name for s in specs)})"
        )
    model = base_model_task(config.model, ctx.model_cache)
    needed = distributions_needed(shifts)

    def pairs(distribution: str, split: str, cap: int | None):
        spec = pairs_spec(root, distribution, split, config.scoring.max_tokens, cap, config.seed)
        return genies_pairs_task(ctx, spec, model=model)

    train_pairs = {d: pairs(d, "train", config.max_train_pairs) for d in sorted(needed["train"])}
    test_pairs = {d: pairs(d, "test", config.max_eval_pairs) for d in sorted(needed["evaluate"])}
    evaluations, trains = {}, {}
    for spec in specs:
        intervention = make_intervention(spec)
        trains[spec.name] = intervention.trains
        states = {}
        for d in sorted(needed["train"]) if intervention.trains else []:
            data = {"pairs": pairs(d, "train", None) if intervention.full_train_split else train_pairs[d]}
            if spec.script_dir:
                data["test_pairs"] = test_pairs[d]
            states[d] = launch(ctx, genies_train_task, ctx, spec, model=model, **data)
        for source, target in sorted(evaluations_needed(shifts, intervention.trains), key=str):
            parents = {"model": model, "pairs": test_pairs[target]} | ({"state": states[source]} if source else {})
            evaluations[evaluation_name(spec.name, source, target)] = launch(
                ctx, genies_evaluate_task, ctx, spec, **parents
            )
    report_spec = ReportSpec(
        model=model_name(config),
        shifts=list(shifts),
        shift_set=shift_set_name(config.shifts),
        interventions=trains,
        ceiling=config.ceiling,
    )
    report = genies_report_task(ctx, report_spec, **evaluations)
    store = ctx.store()
    report_dir = store.local_dir(report, "report", Path(ctx.model_cache) / "artifacts")
    results_dir = config.results_dir or str(root / "results")
    export_results(report_dir / "results", results_dir, report_spec.model, measured_at(store, evaluations))
    summary = genies_summary(store, report, report_dir) | {
        "results_dir": results_dir,
        "records_too_long": records_dropped(store, [*train_pairs.values(), *test_pairs.values()]),
    }
    publish_genies(summary)
    return summary
