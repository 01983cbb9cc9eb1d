"""Preference pairs from files, shared by every flow: JSONL, Parquet, a local
Hugging Face ``datasets`` directory (``save_to_disk`` layout, read as Arrow
without the ``datasets`` package), or a GENIES distribution split.

Every row needs ``prompt``, ``chosen`` and ``rejected`` text; ``columns`` maps
other names onto them (``{"prompt": "question"}``). A bad row is reported by
file and line (1-based; for Parquet/Arrow, the row number).
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from genies.data import distribution_dir, expand_pairs, read_split
from genies.interventions.base import preferred_texts
from tasks.prompts import read_jsonl

FIELDS = ("prompt", "chosen", "rejected")


class PreferenceFileError(ValueError):
    pass


def read_preferences(spec: str, columns: dict[str, str] | None = None) -> list[dict]:
    """Rows ``{id, prompt, chosen, rejected}`` from a file, a datasets folder, or
    ``genies:DATA_DIR:DISTRIBUTION:SPLIT``."""
    if spec.startswith("genies:"):
        return _genies_pairs(spec)
    path = Path(spec)
    if path.is_dir():
        rows = _arrow_dir_rows(path)
    elif path.suffix == ".jsonl":
        rows = read_jsonl(path, PreferenceFileError, FIELDS)
    elif path.suffix == ".parquet":
        rows = list(enumerate(pq.read_table(path).to_pylist(), start=1))
    elif not path.exists():
        raise PreferenceFileError(f"{spec}: not found (expected .jsonl, .parquet, a datasets folder or genies:...)")
    else:
        raise PreferenceFileError(f"{path}: unsupported format '{path.suffix}' (expected .jsonl, .parquet or a datasets folder)")
    mapping = {field: (columns or {}).get(field, field) for field in FIELDS}
    return [_validated(path, line, row, mapping) for line, row in rows]


def _arrow_dir_rows(folder: Path) -> list[tuple[int, dict]]:
    """Rows of a ``Dataset.save_to_disk`` folder: its ``data-*.arrow`` files in order."""
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise PreferenceFileError(f"{folder}: no .arrow files (expected a datasets save_to_disk folder)")
    tables = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return list(enumerate(pa.concat_tables(tables).to_pylist(), start=1))


def _validated(path: Path, line: int, row, mapping: dict[str, str]) -> dict:
    if not isinstance(row, dict):
        raise PreferenceFileError(f"{path}:{line}: expected an object with {list(mapping.values())}")
    out = {"id": str(row.get("id", f"{path.name}:{line}"))}
    for field, column in mapping.items():
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            what = "missing" if value is None else "not non-empty text"
            raise PreferenceFileError(f"{path}:{line}: field '{column}' ({field}) is {what}")
        out[field] = value
    if out["chosen"] == out["rejected"]:
        raise PreferenceFileError(f"{path}:{line}: chosen and rejected are the same text")
    return out


def _genies_pairs(spec: str) -> list[dict]:
    try:
        _, data_dir, name, split = spec.split(":")
    except ValueError:
        raise PreferenceFileError(f"{spec}: expected genies:DATA_DIR:DISTRIBUTION:SPLIT") from None
    records = read_split(distribution_dir(Path(data_dir), name), split)
    rows = []
    for pair in expand_pairs(records, 0, name, split):
        chosen, rejected = preferred_texts(pair)
        rows.append({"id": pair["pair_id"], "prompt": pair["prompt"], "chosen": chosen, "rejected": rejected})
    return rows
