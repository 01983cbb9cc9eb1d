"""Every flow's run summary, in one place: where each artifact is and the numbers a
user checks first, as the dict a flow returns, the markdown the CLI prints and the
artifacts the Prefect UI shows. Stage reports (examples, curves) are tasks/stage_report.py."""

from __future__ import annotations

from pathlib import Path

from alignflow.storage.artifacts import ArtifactRef, ArtifactStore
from alignflow.tasks.stage_report import inline_png

# the metrics of each stage's manifest a summary shows (a metric a stage did not record is left out)
HEADLINE = {
    "prompts": ["rows_out"],
    "preferences": ["rows_out", "distinct_prompts"],
    "sample": ["rows_out", "generated_tokens", "tokens_per_s", "truncated_prompts", "finished_share"],
    "judge": ["rows_out", "unparsed", "outputs_cut", "dropped_too_long", "position_consistency", "reference_agreement"],
    "pairs": ["rows_out", "mean_margin", "unfinished_candidates"],
    "logprobs": ["rows_out", "tokens_per_s"],
    "entropy": ["marker_share", "mean_final_entropy", "mean_fork_entropy", "trimmed"],
    "sega_prompts": ["rows_out"],
    "train_sft": ["train_rows", "steps", "before_loss", "after_loss"],
    "train_ref_sft": ["train_rows", "val_rows", "steps", "before_loss", "after_loss"],
    "train_sega": ["groups", "steps", "before_loss", "after_loss"],
    "train_pro": ["train_rows", "steps", "before_loss", "after_loss"],
    "train_dpo": [
        "train_rows",
        "val_rows",
        "steps",
        "before_loss",
        "after_loss",
        "before_reward_accuracy",
        "after_reward_accuracy",
        "after_margin",
    ],
}


def headlines(store: ArtifactStore, refs: dict[str, ArtifactRef]) -> dict[str, dict]:
    """Each stage's artifact URI, its headline metrics and its seconds."""
    out = {}
    for stage, ref in refs.items():
        metrics = store.manifest(ref.stage, ref.key)["metrics"]
        out[stage] = {
            "uri": ref.uri,
            **{n: metrics.get(n) for n in HEADLINE[ref.stage]},
            "seconds": metrics.get("seconds"),
        }
    return out


def headline_table(stages: dict[str, dict]) -> list[str]:
    """The markdown table every summary shows its stages in."""
    lines = ["| stage | artifact | metrics |", "|---|---|---|"]
    for stage, info in stages.items():
        metrics = ", ".join(f"{m}={v}" for m, v in info.items() if m != "uri" and v is not None)
        lines.append(f"| {stage} | {artifact_link(info['uri'])} | {metrics} |")
    return lines


def artifact_link(uri: str, text: str | None = None) -> str:
    """A markdown link to an artifact or file: URLs as they are, local paths as file:// URLs."""
    target = uri if "://" in uri else Path(uri).resolve().as_uri()
    return f"[`{text or uri}`]({target})"


def publish_markdown(key: str, markdown: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=key, markdown=markdown, description=description)


# -- self-improve ---------------------------------------------------------------
def self_improve_summary(store: ArtifactStore, prompts: ArtifactRef, rounds: list[dict[str, ArtifactRef]]) -> dict:
    return {
        "prompts": headlines(store, {"prompts": prompts})["prompts"],
        "rounds": [headlines(store, refs) for refs in rounds],
    }


def self_improve_markdown(summary: dict) -> str:
    lines = ["# self-improve summary", "", f"prompts: {artifact_link(summary['prompts']['uri'])}", ""]
    for k, stages in enumerate(summary["rounds"], start=1):
        lines += [f"## round {k}", "", *headline_table(stages), ""]
    return "\n".join(lines)


def publish_self_improve(summary: dict) -> None:
    publish_markdown(
        "self-improve-summary", self_improve_markdown(summary), "self-improve: artifacts and headline metrics"
    )


# -- gem -------------------------------------------------------------------------
def gem_summary(store: ArtifactStore, stages: dict[str, ArtifactRef], accuracy: dict, datasets: list[str]) -> dict:
    """Headlines of the training stages and, per (model, reward), the preference accuracy overall and per dataset."""
    table = []
    for (model, reward), ref in accuracy.items():
        m = store.manifest(ref.stage, ref.key)["metrics"]
        row = {"model": model, "reward": reward, "uri": ref.uri}
        for d in [*datasets, None]:
            suffix, name = (f"/{d}", f"{d} ") if d else ("", "")
            row |= {
                name + "accuracy": m["accuracy" + suffix],
                name + "ci": [m["ci_low" + suffix], m["ci_high" + suffix]],
                name + "ties": m["ties" + suffix],
                name + "ties correct": m["accuracy_ties_correct" + suffix],
                name + "pairs": m["pairs" + suffix],
            }
        table.append(row)
    return {"stages": headlines(store, stages), "datasets": datasets, "accuracy": table}


def gem_markdown(summary: dict) -> str:
    datasets = summary["datasets"]
    lines = [
        "# gem summary",
        "",
        "## preference accuracy [95% Wilson interval] (ties: share of pairs, not counted as correct)",
        "",
        "| model | reward | " + " | ".join(datasets) + " | all | all, ties as correct |",
        "|---|---|" + "---:|" * (len(datasets) + 2),
    ]
    for row in summary["accuracy"]:
        cells = [accuracy_cell(row, f"{d} ") for d in datasets] + [accuracy_cell(row, ""), f"{row['ties correct']:.3f}"]
        lines.append(f"| {row['model']} | {row['reward']} | " + " | ".join(cells) + " |")
    pairs = ", ".join(f"{d}: {summary['accuracy'][0][f'{d} pairs']}" for d in datasets)
    lines += ["", f"pairs per dataset: {pairs}", "", "## stages", "", *headline_table(summary["stages"])]
    return "\n".join(lines) + "\n"


def accuracy_cell(row: dict, prefix: str) -> str:
    low, high = row[prefix + "ci"]
    ties = row[prefix + "ties"]
    return f"{row[prefix + 'accuracy']:.3f} [{low:.2f}, {high:.2f}]" + (f" ({ties:.2f} ties)" if ties else "")


def publish_gem(summary: dict) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        key="gem-preference-accuracy",
        table=[
            {k: f"[{v[0]:.3f}, {v[1]:.3f}]" if k.endswith("ci") else v for k, v in row.items() if k != "uri"}
            for row in summary["accuracy"]
        ],
        description="gem: preference accuracy per model, reward and dataset",
    )
    publish_markdown("gem-summary", gem_markdown(summary), "gem: artifacts and headline metrics")


# -- genies-eval -----------------------------------------------------------------
def genies_summary(store: ArtifactStore, report: ArtifactRef, report_dir: Path) -> dict:
    return {
        "report": report.uri,
        "report_dir": str(report_dir),
        "means": store.manifest(report.stage, report.key)["metrics"],
    }


def genies_markdown(summary: dict) -> str:
    lines = [
        "# genies-eval summary",
        "",
        f"report: `{summary['report_dir']}` (artifact `{summary['report']}`)",
        "",
        "| intervention | mean differential elicitation |",
        "|---|---|",
    ]
    lines += [
        f"| {name.removeprefix('mean_de_')} | {value} |"
        for name, value in summary["means"].items()
        if name.startswith("mean_de_")
    ]
    dropped = summary.get("records_too_long") or {}
    lines += ["", f"results tree: `{summary['results_dir']}`" if "results_dir" in summary else ""]
    if dropped:
        lines.append(
            "records dropped for exceeding scoring.max_tokens (as GENIES drops them): "
            + ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()))
        )
    return "\n".join(lines) + "\n"


def publish_genies(summary: dict) -> None:
    """The means, links to the report files and the heatmap."""
    folder = Path(summary["report_dir"])
    files = ", ".join(artifact_link(str(folder / name), name) for name in ("report.md", "metrics.csv", "means.csv"))
    markdown = (
        genies_markdown(summary) + f"\nartifact: {artifact_link(summary['report'])}; files: {files}\n\n"
        "## differential elicitation per shift\n\n"
        + inline_png((folder / "heatmap.png").read_bytes(), "heatmap: shift x intervention")
        + "\n"
    )
    publish_markdown("genies-eval-summary", markdown, "genies-eval: means, report files and heatmap")


# -- pipeline --------------------------------------------------------------------
def pipeline_markdown(summary: dict) -> str:
    head = f"# pipeline summary\n\ntrained policy: {artifact_link(summary['model'])}\n"
    return "\n".join([head, self_improve_markdown(summary["training"]), genies_markdown(summary["genies"])])


def publish_pipeline(summary: dict) -> None:
    publish_markdown(
        "pipeline-summary",
        pipeline_markdown(summary),
        "pipeline: the trained policy, its training artifacts and its GENIES means",
    )
