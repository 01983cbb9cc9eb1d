"""The GENIES report stage: evaluation accuracies -> per-shift metrics for every
intervention, the published results layout, CSV + Parquet tables, a heatmap of
differential elicitation, a bar chart of means and a markdown report."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from alignflow.config import Strict
from alignflow.genies.metrics import capability_path, evaluation_path, means, shift_row, write_csv, write_json
from alignflow.genies.shifts import Shift
from alignflow.storage.artifacts import ArtifactRef, ArtifactStore
from alignflow.tasks.stage import RunContext, Stage, StageOutput, stage_task


class ReportSpec(Strict):
    model: str  # the base model's name in the published layout
    shifts: list[Shift]
    interventions: dict[str, bool]  # name -> trains (False: evaluated on the base model as is)
    ceiling: str  # "best" or an intervention name


def evaluation_name(intervention: str, source: str | None, target: str) -> str:
    """The parent name of one evaluation (``-`` when nothing was trained)."""
    return f"{intervention}__{source or '-'}__{target}"


def read_results(store: ArtifactStore, evaluations: dict[str, ArtifactRef]) -> dict[tuple, dict]:
    """(intervention, source or None, target) -> the evaluation's metrics."""
    results = {}
    for name, ref in evaluations.items():
        intervention, source, target = name.split("__")
        results[(intervention, None if source == "-" else source, target)] = store.manifest(ref.stage, ref.key)[
            "metrics"
        ]
    return results


class Table:
    """Accuracy lookups over the evaluations of one report."""

    def __init__(self, spec: ReportSpec, results: dict[tuple, dict]):
        self.spec = spec
        self.results = results

    def result(self, intervention: str, source: str, target: str) -> dict:
        trained_on = source if self.spec.interventions[intervention] else None
        return self.results[(intervention, trained_on, target)]

    def accuracy(self, intervention: str, source: str, target: str) -> float:
        return self.result(intervention, source, target)["accuracy"]

    def baseline(self, target: str) -> float:
        return self.results[("zero_shot", None, target)]["accuracy"]

    def ceiling(self, reference: str) -> tuple[float, str]:
        """C(R): the named intervention's A(R->R), or the best over those run on R."""
        names = list(self.spec.interventions) if self.spec.ceiling == "best" else [self.spec.ceiling]
        return max((self.accuracy(n, reference, reference), n) for n in names)

    def rows(self) -> list[dict]:
        out = []
        for intervention in self.spec.interventions:
            for shift in self.spec.shifts:
                evaluation = self.result(intervention, shift.source, shift.target)
                out.append(
                    shift_row(
                        shift,
                        generalization=evaluation["accuracy"],
                        source_id=self.accuracy(intervention, shift.source, shift.source),
                        baseline=self.baseline(shift.target),
                        ceiling=self.ceiling(shift.reference)[0],
                        intervention=intervention,
                        model=self.spec.model,
                        brier=evaluation.get("brier", math.nan),
                        ece=evaluation.get("ece", math.nan),
                    )
                )
        return out


def write_published_layout(folder: Path, table: Table) -> None:
    """Our results in the published layout, so they sit beside published ones."""
    model = table.spec.model
    sources = {s.source for s in table.spec.shifts}
    for (intervention, source, target), metrics in table.results.items():
        result = {
            "eval_accuracy": metrics["accuracy"],
            **{k: metrics[k] for k in ("brier", "ece", "pairs") if k in metrics},
        }
        # untrained results also under each source, as published: any intervention reads as <model>-<source>/
        for trained_on in [source] if source else [None, *sorted(sources)]:
            write_json(evaluation_path(folder / "evaluations", intervention, model, trained_on, target), result)
    for reference in {s.reference for s in table.spec.shifts}:
        accuracy, best = table.ceiling(reference)
        write_json(
            capability_path(folder / "target_tuned_capability", model, reference),
            {"best_intervention_accuracy": accuracy, "intervention": best},
        )


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
    ax.legend(fontsize=8)
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
    rows = table.rows()
    summary = means(rows)
    scratch = Path(tempfile.mkdtemp(prefix="alignflow-genies-report-"))
    folder = scratch / "report"
    write_published_layout(folder, table)
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
        ("target_tuned_capability", pa.float64()),
        ("differential_elicitation", pa.float64()),
        ("source_ID_accuracy", pa.float64()),
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
