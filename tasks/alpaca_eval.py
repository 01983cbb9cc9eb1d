"""AlpacaEval's model-outputs format: a JSON list of {"instruction", "output", "generator"}.

Written so that a model's answers can be scored with the alpaca_eval tool; read back as
instructions with references (a model's ``output`` becomes the reference), so a strong
model's outputs can serve as the ``prompts:`` of a RefEval run or its evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

FIELDS = ("instruction", "output")


def alpaca_eval_records(rows: list[dict], generator: str) -> list[dict]:
    """One record per answer; ``rows`` carry ``prompt`` (the instruction) and ``response``."""
    return [{"instruction": r["prompt"], "output": r["response"], "generator": generator} for r in rows]


def write_alpaca_eval(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_alpaca_eval(path: Path, error: type[ValueError] = ValueError) -> list[tuple[int, dict]]:
    """(item number, prompt row) per record: ``id`` as given (else ``item-N``), ``prompt`` from
    ``instruction``, ``reference`` from ``output``. Bad input raises ``error`` naming the item."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(records, list) or not records:
        raise error(f"{path}: expected a non-empty JSON list of AlpacaEval records with {', '.join(FIELDS)}")
    return [(number, _prompt_row(path, number, record, error)) for number, record in enumerate(records, start=1)]


def _prompt_row(path: Path, number: int, record, error: type[ValueError]) -> dict:
    if not isinstance(record, dict):
        raise error(f"{path}: item {number}: expected an object with {', '.join(FIELDS)}, got {type(record).__name__}")
    for name in FIELDS:
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():
            raise error(f"{path}: item {number}: field '{name}' must be non-empty text")
    row_id = str(record.get("id", f"item-{number}"))
    return {"id": row_id, "prompt": record["instruction"], "reference": record["output"]}
