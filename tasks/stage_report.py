"""What a stage shows in the Prefect UI when it commits: a table of its metrics and,
where a user would rather look than read numbers, a markdown artifact of a few
example rows or of its training curves. A leaf module: stages and flows import it."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable

import pyarrow as pa

from alignflow.storage.artifacts import ArtifactRef

EXAMPLES = 3  # example rows per stage
TEXT_CHARS = 300  # an example's text is cut to this many characters
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]|#~])")  # what could format or end a table cell


def in_prefect_run() -> bool:
    from prefect.context import TaskRunContext

    return TaskRunContext.get() is not None


def publish_stage_report(
    stage: str, ref: ArtifactRef, metrics: dict, rows_in: int, examples: Callable[[], str] | None = None
) -> None:
    """A table artifact in the Prefect UI (rows in/out, tokens, speed and the stage's own
    metrics) and, when the stage has them, its examples as a markdown artifact."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = stage.replace("_", "-")
    table = [{"metric": "artifact", "value": ref.uri}, {"metric": "rows_in", "value": rows_in}]
    table += [{"metric": k, "value": v} for k, v in metrics.items()]
    create_table_artifact(key=f"{key}-report", table=table, description=f"{stage}: {ref.uri}")
    if examples:
        create_markdown_artifact(key=f"{key}-examples", markdown=examples(), description=f"{stage}: examples")


def escape(value: object, chars: int = TEXT_CHARS) -> str:
    """A value as one line of literal markdown text, cut to ``chars`` characters."""
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    text = " ".join(text.split())  # newlines would end a table row
    if len(text) > chars:
        text = text[:chars].rstrip() + " …"
    return _MARKDOWN_SPECIALS.sub(r"\\\1", text).replace("<", "&lt;")


def examples_markdown(title: str, rows: list[dict]) -> str:
    """Each example as a two-column table (field, value): long texts stay readable."""
    lines = [f"# {escape(title)}", ""]
    if not rows:
        return "\n".join([*lines, "no rows"]) + "\n"
    for number, row in enumerate(rows[:EXAMPLES], start=1):
        lines += [f"## example {number}", "", "| field | value |", "|---|---|"]
        lines += [f"| {escape(field)} | {escape(value)} |" for field, value in row.items()]
        lines.append("")
    return "\n".join(lines)


def inline_png(png: bytes, alt: str) -> str:
    """A markdown image carrying the PNG itself: the UI cannot read the artifact store."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def training_curves_png(log: pa.Table, metrics: list[str]) -> bytes:
    """One panel per metric over optimizer steps: every train step as a line, validations as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = log.to_pylist()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for split, style in (("train", "-"), ("val", "o")):
            points = [(r["step"], r[metric]) for r in rows if r["split"] == split and r[metric] is not None]
            if points:
                ax.plot(*zip(*points), style, label=split)
        ax.set_xlabel("step")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def training_curves_markdown(stage: str, log: pa.Table, metrics: list[str]) -> str:
    """The curves of a training stage's per-step history (its committed table)."""
    steps = sum(split == "train" for split in log.column("split").to_pylist())
    return (
        f"# {stage}: {' and '.join(metrics)} per step\n\n{steps} optimizer steps\n\n"
        + inline_png(training_curves_png(log, metrics), f"{stage} training curves")
        + "\n"
    )
