"""Load instructions with reference answers: JSONL or Parquet with `prompt` and
`reference` (optional `id`), AlpacaEval JSON (`instruction`, `output` as the reference),
or a built-in set: the demo's, or held-out instructions for evaluating a trained policy."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from alignflow.config import Strict
from alignflow.tasks.alpaca_eval import read_alpaca_eval
from alignflow.tasks.stage import Stage, StageOutput, stage_task

BUILTIN = {"builtin:demo": "demo_prompts.jsonl", "builtin:heldout": "heldout_prompts.jsonl"}
REQUIRED = ("prompt", "reference")


class PromptFileError(ValueError):
    pass


class PromptSource(Strict):
    path: str
    sha256: str
    limit: int | None = None


def prompt_source(spec: str, limit: int | None) -> PromptSource:
    """Resolve a prompts spec to a file and fingerprint it, so an edited file is a new input.
    A built-in set keeps its name: its path is this installation's, not the artifact's."""
    path = prompt_file(spec)
    if not path.is_file():
        raise PromptFileError(
            f"{spec}: prompts file not found (expected .jsonl, .parquet, AlpacaEval .json, or one of {list(BUILTIN)})"
        )
    return PromptSource(
        path=spec if spec in BUILTIN else str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(), limit=limit
    )


def prompt_file(spec: str) -> Path:
    return Path(str(resources.files("alignflow") / "data" / BUILTIN[spec])) if spec in BUILTIN else Path(spec)


def read_prompt_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
    elif path.suffix == ".parquet":
        rows = [(i + 1, row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    elif path.suffix == ".json":
        rows = read_alpaca_eval(path, PromptFileError)
    else:
        raise PromptFileError(
            f"{path}: unsupported prompts format '{path.suffix}' (expected .jsonl, .parquet or AlpacaEval .json)"
        )
    return [_validated(path, line, row) for line, row in rows]


def read_jsonl(path: Path, error: type[ValueError] = PromptFileError, fields=REQUIRED) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; bad JSON or a non-object
    raises ``error`` naming the file and line."""
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{line_no}: bad JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise error(f"{path}:{line_no}: expected a JSON object with {fields}, got {type(row).__name__}")
        rows.append((line_no, row))
    if not rows:
        raise error(f"{path}: no rows")
    return rows


def _validated(path: Path, line: int, row: dict) -> dict:
    for name in REQUIRED:
        value = row.get(name)
        if value is None:
            raise PromptFileError(f"{path}:{line}: missing field '{name}' (each row needs {', '.join(REQUIRED)})")
        if not isinstance(value, str) or not value.strip():
            raise PromptFileError(f"{path}:{line}: field '{name}' must be non-empty text")
    return {"id": str(row.get("id", f"line-{line}")), "prompt": row["prompt"], "reference": row["reference"]}


def read_prompts(config: PromptSource) -> list[dict]:
    """The rows the prompts stage commits (the CLI's preflight reads them too); bad input is
    a PromptFileError naming the file and line."""
    rows = read_prompt_rows(prompt_file(config.path))[: config.limit]
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PromptFileError(f"{config.path}: duplicate id '{dup}'")
    return rows


def compute_prompts(ctx, config: PromptSource, key: str) -> StageOutput:
    rows = read_prompts(config)
    return StageOutput(tables=[pa.Table.from_pylist(rows)], metrics={"rows_out": len(rows)})


PROMPT_ROWS = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("reference", pa.string())])
PROMPTS = Stage("prompts", compute_prompts, __name__, schema=PROMPT_ROWS)
prompts_task = stage_task(PROMPTS)
