"""The run summary: where every artifact is and the numbers a user checks first."""
from __future__ import annotations

import base64
from pathlib import Path

from alignflow.storage.artifacts import ArtifactRef, ArtifactStore

HEADLINE = {
    "sample": ["rows_out", "generated_tokens", "tokens_per_s", "truncated_prompts"],
    "judge": ["rows_out", "unparsed", "position_consistency", "reference_agreement"],
    "pairs": ["rows_out", "mean_margin"],
    "logprobs": ["rows_out", "tokens_per_s"],
    "train_dpo": ["train_rows", "val_rows", "steps", "before_loss", "after_loss",
                  "before_reward_accuracy", "after_reward_accuracy", "after_margin"],
}


def run_summary(store: ArtifactStore, prompts: ArtifactRef, rounds: list[dict[str, ArtifactRef]]) -> dict:
    out = {"prompts": {"uri": prompts.uri, **_metrics(store, prompts, ["rows_out"])}, "rounds": []}
    for refs in rounds:
        out["rounds"].append({stage: {"uri": ref.uri, **_metrics(store, ref, HEADLINE[stage])} for stage, ref in refs.items()})
    return out


def _metrics(store: ArtifactStore, ref: ArtifactRef, names: list[str]) -> dict:
    metrics = store.manifest(ref.stage, ref.key)["metrics"]
    return {n: metrics.get(n) for n in names} | {"seconds": metrics.get("seconds")}


def summary_markdown(flow_name: str, summary: dict) -> str:
    lines = [f"# {flow_name} summary", "", f"prompts: {artifact_link(summary['prompts']['uri'])}", ""]
    for k, rnd in enumerate(summary["rounds"], start=1):
        lines += [f"## round {k}", "", "| stage | artifact | metrics |", "|---|---|---|"]
        for stage, info in rnd.items():
            metrics = ", ".join(f"{m}={v}" for m, v in info.items() if m != "uri" and v is not None)
            lines.append(f"| {stage} | {artifact_link(info['uri'])} | {metrics} |")
        lines.append("")
    return "\n".join(lines)


def publish_summary(flow_name: str, summary: dict) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=summary_markdown(flow_name, summary), key=f"{flow_name}-summary",
                             description=f"{flow_name}: artifacts and headline metrics")


def artifact_link(uri: str, text: str | None = None) -> str:
    """A markdown link to an artifact or file: URLs as they are, local paths as file:// URLs."""
    target = uri if "://" in uri else Path(uri).resolve().as_uri()
    return f"[`{text or uri}`]({target})"


def inline_png(path: Path, alt: str) -> str:
    """A markdown image carrying the PNG itself: the UI cannot read the artifact store."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


def publish_genies_summary(summary: dict) -> None:
    """The genies-eval run's summary in the UI: means, links to the report files, the heatmap."""
    from prefect.artifacts import create_markdown_artifact

    from alignflow.flows.genies_eval import genies_summary_markdown

    folder = Path(summary["report_dir"])
    files = ", ".join(artifact_link(str(folder / name), name) for name in ("report.md", "metrics.csv", "means.csv"))
    markdown = (genies_summary_markdown(summary) + f"\nartifact: {artifact_link(summary['report'])}; files: {files}\n\n"
                "## differential elicitation per shift\n\n"
                + inline_png(folder / "heatmap.png", "heatmap: shift x intervention") + "\n")
    create_markdown_artifact(markdown=markdown, key="genies-eval-summary",
                             description="genies-eval: means, report files and heatmap")
