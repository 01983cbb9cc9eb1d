"""The GENIES report stage: evaluation accuracies -> per-shift metrics for every
intervention, the published results layout, CSV + Parquet tables, a heatmap of
differential elicitation, a bar chart of means and a markdown report."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from alignflow.config import Strict
from alignflow.genies.metrics import (
    PUBLISHED_COLUMNS,
    capability_json,
    capability_path,
    evaluation_json,
    evaluation_path,
    means,
    metrics_csv_path,
    results_rows,
    write_csv,
    write_json,
)
from alignflow.genies.shifts import Shift
from alignflow.storage.artifacts import ArtifactRef, ArtifactStore
from alignflow.tasks.stage import RunContext, Stage, StageOutput, stage_task


class ReportSpec(Strict):
    model: str  # the base model's name in the published layout
    shifts: list[Shift]
    shift_set: str  # the metrics table's name: GENIES for the builtin shifts, else the spec file's stem
    interventions: dict[str, bool]  # name -> trains (False: evaluated on the base model as is)
    ceiling: str  # "best" or an intervention name


def evaluation_name(intervention: str, source: str | None, target: str) -> str:
    """The parent name of one evaluation (``-`` when nothing was trained)."""
    return f"{intervention}__{source or '-'}__{target}"


def parse_evaluation_name(name: str) -> tuple[str, str | None, str]:
    intervention, source, target = name.split("__")
    return intervention, None if source == "-" else source, target


class Evaluation(NamedTuple):
    metrics: dict
    p_preferred: list[float] | None  # None: an accuracy-only external script


def read_results(store: ArtifactStore, evaluations: dict[str, ArtifactRef]) -> dict[tuple, Evaluation]:
    """(intervention, source or None, target) -> the evaluation's metrics and probabilities."""
    results = {}
    for name, ref in evaluations.items():
        rows = store.read_rows(ref)
        probabilities = [r["p_preferred"] for r in rows] if rows and rows[0]["p_preferred"] is not None else None
        results[parse_evaluation_name(name)] = Evaluation(store.manifest(ref.stage, ref.key)["metrics"], probabilities)
    return results


class Table:
    """Accuracy lookups over the evaluations of one report."""

    def __init__(self, spec: ReportSpec, results: dict[tuple, Evaluation]):
        self.spec = spec
        self.results = results

    def accuracy(self, intervention: str, source: str, target: str) -> float:
        trained_on = source if self.spec.interventions[intervention] else None
        return self.results[(intervention, trained_on, target)].metrics["accuracy"]

    def ceiling(self, reference: str) -> tuple[float, str]:
        """C(R): the named intervention's A(R->R), or the best over every one run on R, zero-shot included."""
        names = list(self.spec.interventions) if self.spec.ceiling == "best" else [self.spec.ceiling]
        return max((self.accuracy(n, reference, reference), n) for n in names)

    def trained_on(self) -> list[str]:
        """Every distribution something is trained on: where untrained results are filed too."""
        return sorted({s.source for s in self.spec.shifts} | {s.reference for s in self.spec.shifts})


def write_results_tree(folder: Path, table: Table) -> None:
    """Every evaluation and ceiling in GENIES's published results tree. ``timestamp`` is
    left null so identical runs give identical artifacts; ``export_results`` stamps it."""
    model = table.spec.model
    for (intervention, source, target), evaluation in table.results.items():
        model_dir = f"models/{intervention}/{model}-{source}" if source else f"models/{model}"
        result = evaluation_json(evaluation.metrics, evaluation.p_preferred, target, model_dir, None)
        # an untrained intervention files its results under every source, as published
        for trained_on in [source] if source else table.trained_on():
            write_json(evaluation_path(folder, intervention, model, trained_on, target), result)
    for shift in table.spec.shifts:
        accuracy, best = table.ceiling(shift.reference)
        write_json(capability_path(folder, model, shift.target), capability_json(shift, accuracy, best))


def export_results(results: Path, dest: str, model: str, measured_at: dict[tuple, str]) -> None:
    """Copy a report's results tree to ``dest`` (any fsspec URL), stamping each evaluation
    with when it was measured: ``measured_at`` maps (intervention, source or None, target)
    to a time; an untrained intervention's result is looked up without its source."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(dest)
    for path in sorted(p for p in results.rglob("*") if p.is_file()):
        relative = path.relative_to(results)
        data = path.read_bytes()
        if relative.parts[0] == "evaluations":
            intervention, folder, target = relative.parts[1], relative.parts[2], relative.stem
            source = folder.removeprefix(f"{model}-")
            stamp = measured_at.get((intervention, source, target)) or measured_at[(intervention, None, target)]
            data = json.dumps(json.loads(data) | {"timestamp": stamp}, indent=4).encode()
        fs.makedirs(f"{root}/{relative.parent.as_posix()}", exist_ok=True)
        fs.pipe_file(f"{root}/{relative.as_posix()}", data)


def metrics_tables(folder: Path, spec: ReportSpec) -> list[dict]:
    """Each intervention's metrics table, computed from the results tree by the function
    that reads published trees, and written beside it as GENIES does."""
    rows = []
    for intervention in spec.interventions:
        table = results_rows(folder, tuple(spec.shifts), intervention, spec.model)
        write_csv(metrics_csv_path(folder, spec.model, intervention, spec.shift_set), table, PUBLISHED_COLUMNS)
        rows += table
    return rows


def heatmap(path: Path, rows: list[dict], interventions: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = list(dict.fromkeys(f"{r['source']} -> {r['target']}" for r in rows))
    grid = [[math.nan] * len(interventions) for _ in shifts]
    for r in rows:
        grid[shifts.index(f"{r['source']} -> {r['target']}")][interventions.index(r["intervention"])] = r[
            "differential_elicitation"
        ]
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * len(interventions), 1.0 + 0.38 * len(shifts)))
    image = ax.imshow(grid, cmap="RdBu", vmin=-0.5, vmax=0.5, aspect="auto")
    ax.set_xticks(range(len(interventions)), interventions, rotation=30, ha="right")
    ax.set_yticks(range(len(shifts)), shifts, fontsize=8)
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            ax.text(j, i, "" if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="differential elicitation (A - A0) / C")
    ax.set_title("GENIES: differential elicitation per shift")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def mean_bars(path: Path, summary: list[dict], interventions: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = sorted({m["category"] for m in summary} - {"all"}) + ["all"]
    width = 0.8 / len(interventions)
    fig, ax = plt.subplots(figsize=(2.0 + 1.1 * len(categories), 4.0))
    for j, name in enumerate(interventions):
        values = {m["category"]: m["differential_elicitation"] for m in summary if m["intervention"] == name}
        ax.bar(
            [i + j * width for i in range(len(categories))],
            [values.get(c, math.nan) for c in categories],
            width,
            label=name,
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))], categories, rotation=30, ha="right")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("mean differential elicitation")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: inside, it hides bars
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def markdown(spec: ReportSpec, rows: list[dict], summary: list[dict]) -> str:
    overall = [m for m in summary if m["category"] == "all"]
    lines = [
        f"# GENIES report: {spec.model}",
        "",
        f"Ceiling: {spec.ceiling}. Shifts: {len(spec.shifts)}.",
        "",
        "| intervention | mean DE | mean elicitation | mean A(S->T) | mean IID | mean Brier | mean ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in overall:
        lines.append(
            f"| {m['intervention']} | {_f(m['differential_elicitation'])} | {_f(m['elicitation'])} | "
            f"{_f(m['generalization_accuracy'])} | {_f(m['source_ID_accuracy'])} | {_f(m['brier'])} | {_f(m['ece'])} |"
        )
    lines += [
        "",
        "| intervention | shift | category | A(S->T) | A0(T) | C(R) | DE | IID |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['intervention']} | {r['source']} -> {r['target']} | {r['category']} | "
            f"{_f(r['generalization_accuracy'])} | {_f(r['baseline_accuracy'])} | {_f(r['target_tuned_capability'])} | "
            f"{_f(r['differential_elicitation'])} | {_f(r['source_ID_accuracy'])} |"
        )
    return "\n".join(lines) + "\n"


def _f(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def compute_report(ctx: RunContext, spec: ReportSpec, key: str, **evaluations: ArtifactRef) -> StageOutput:
    table = Table(spec, read_results(ctx.store(), evaluations))
    scratch = Path(tempfile.mkdtemp(prefix="alignflow-genies-report-"))
    folder = scratch / "report"
    write_results_tree(folder / "results", table)
    rows = metrics_tables(folder / "results", spec)
    summary = means(rows)
    write_csv(folder / "metrics.csv", rows)
    pq.write_table(pa.Table.from_pylist(rows), folder / "metrics.parquet")
    write_csv(folder / "means.csv", summary, list(summary[0]))
    names = list(spec.interventions)
    heatmap(folder / "heatmap.png", rows, names)
    mean_bars(folder / "means.png", summary, names)
    (folder / "report.md").write_text(markdown(spec, rows, summary))
    publish(spec, rows, summary, folder)
    overall = {
        f"mean_de_{m['intervention']}": round(m["differential_elicitation"], 4)
        for m in summary
        if m["category"] == "all"
    }
    return StageOutput(tables=[pa.Table.from_pylist(rows)], dirs={"report": folder}, metrics=overall, scratch=scratch)


def publish(spec: ReportSpec, rows: list[dict], summary: list[dict], folder: Path) -> None:
    """Prefect table and markdown artifacts (inside a flow run only)."""
    from alignflow.tasks.stage import in_prefect_run

    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()} for m in summary]
    create_table_artifact(key="genies-means", table=clean, description="GENIES means per intervention and category")
    create_markdown_artifact(
        key="genies-report", markdown=(folder / "report.md").read_text(), description=f"GENIES report for {spec.model}"
    )


SHIFT_ROWS = pa.schema(
    [
        ("source", pa.string()),
        ("target", pa.string()),
        ("target_reference", pa.string()),
        ("generalization_accuracy", pa.float64()),
        ("baseline_accuracy", pa.float64()),
        ("baseline_intervention", pa.string()),
        ("target_tuned_capability", pa.float64()),
        ("target_tuned_capability_intervention", pa.string()),
        ("source_ID_accuracy", pa.float64()),
        ("RMS_calibration_error", pa.float64()),
        ("differential_elicitation", pa.float64()),
        ("category", pa.string()),
        ("label", pa.string()),
        ("elicitation", pa.float64()),
        ("intervention", pa.string()),
        ("model", pa.string()),
        ("brier", pa.float64()),
        ("ece", pa.float64()),
    ]
)
GENIES_REPORT = Stage("genies_report", compute_report, __name__, schema=SHIFT_ROWS)
genies_report_task = stage_task(GENIES_REPORT)
