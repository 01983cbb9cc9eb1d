"""Preference pairs from files, shared by every flow: JSONL, Parquet, a local
Hugging Face ``datasets`` directory (``save_to_disk`` layout, read as Arrow
without the ``datasets`` package), or a GENIES distribution split.

Every row needs ``prompt``, ``chosen`` and ``rejected`` text; ``columns`` maps
other names onto them (``{"prompt": "question"}``). A bad row is reported by
file and line (1-based; for Parquet/Arrow, the row number).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from alignflow.config import Strict
from alignflow.genies.data import capped, distribution_dir, expand_pairs, preferred_texts, read_split
from alignflow.tasks.prompts import read_jsonl
from alignflow.tasks.stage import Stage, StageOutput, stage_task

FIELDS = ("prompt", "chosen", "rejected")


class PreferenceFileError(ValueError):
    pass


def read_preferences(spec: str, columns: dict[str, str] | None = None) -> list[dict]:
    """Rows ``{id, prompt, chosen, rejected}`` from a file, a datasets folder, or
    ``genies:DATA_DIR:DISTRIBUTION:SPLIT`` (see ``resolve_spec`` for the short form)."""
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
        raise PreferenceFileError(
            f"{path}: unsupported format '{path.suffix}' (expected .jsonl, .parquet or a datasets folder)"
        )
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


def _genies_parts(spec: str) -> tuple[Path, str, str]:
    try:
        _, data_dir, name, split = spec.split(":")
    except ValueError:
        raise PreferenceFileError(f"{spec}: expected genies:DATA_DIR:DISTRIBUTION:SPLIT") from None
    return Path(data_dir), name, split


def _genies_pairs(spec: str) -> list[dict]:
    data_dir, name, split = _genies_parts(spec)
    records = read_split(distribution_dir(data_dir, name), split)
    rows = []
    for pair in expand_pairs(records, 0, name, split):
        chosen, rejected = preferred_texts(pair)
        rows.append({"id": pair["pair_id"], "prompt": pair["prompt"], "chosen": chosen, "rejected": rejected})
    return rows


# -- the preferences stage -------------------------------------------------------
class PreferenceSet(Strict):
    """Named preference sources read into one artifact; fingerprints make an edited file a new input."""

    sources: dict[str, str]
    fingerprints: dict[str, str]
    columns: dict[str, str] = {}
    limit: int | None = None  # per source, a seeded subset
    seed: int = 0


def resolve_spec(spec: str, genies_dir: Path) -> str:
    """``genies:DISTRIBUTION:SPLIT`` reads from ``genies_dir``; other specs are kept."""
    parts = spec.split(":")
    if parts[0] == "genies" and len(parts) == 3:
        return f"genies:{genies_dir}:{parts[1]}:{parts[2]}"
    return spec


def source_files(spec: str) -> list[Path]:
    """The files a spec reads."""
    if spec.startswith("genies:"):
        data_dir, name, split = _genies_parts(spec)
        return [distribution_dir(data_dir, name) / f"{split}.json"]
    path = Path(spec)
    if path.is_dir():
        return sorted(path.glob("*.arrow"))
    if not path.is_file():
        raise PreferenceFileError(f"{spec}: not found (expected .jsonl, .parquet, a datasets folder or genies:...)")
    return [path]


def fingerprint(spec: str) -> str:
    digest = hashlib.sha256()
    for path in source_files(spec):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def preference_set(
    sources: dict[str, str],
    genies_dir: Path,
    columns: dict[str, str] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> PreferenceSet:
    if not sources:
        raise PreferenceFileError("no preference sources given (expected name: path or genies:DISTRIBUTION:SPLIT)")
    resolved = {name: resolve_spec(spec, genies_dir) for name, spec in sources.items()}
    return PreferenceSet(
        sources=resolved,
        fingerprints={n: fingerprint(s) for n, s in resolved.items()},
        columns=columns or {},
        limit=limit,
        seed=seed,
    )


def prompt_key(prompt: str) -> str:
    """Pairs that share a prompt share this id (train/val splits and sampling group by it)."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def compute_preferences(ctx, config: PreferenceSet, key: str) -> StageOutput:
    rows, counts = [], {}
    for name, spec in config.sources.items():
        pairs = capped(read_preferences(spec, config.columns), config.limit, config.seed, id_field="id")
        counts[f"pairs_{name}"] = len(pairs)
        rows += [{**p, "id": f"{name}/{p['id']}", "dataset": name, "prompt_id": prompt_key(p["prompt"])} for p in pairs]
    metrics = {"rows_out": len(rows), "distinct_prompts": len({r["prompt_id"] for r in rows}), **counts}
    return StageOutput(tables=[pa.Table.from_pylist(rows)], metrics=metrics)


PREFERENCE_ROWS = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("dataset", pa.string()),
        ("prompt_id", pa.string()),
    ]
)
PREFERENCES = Stage("preferences", compute_preferences, __name__, schema=PREFERENCE_ROWS)
preferences_task = stage_task(PREFERENCES)
