"""Preference loaders: every format, column mapping, GENIES pairs, and bad rows by file and line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignflow.tasks.preferences import PreferenceFileError, read_preferences

ROWS = [
    {"question": "2+2?", "good": "4", "bad": "5"},
    {"question": "Capital of France?", "good": "Paris", "bad": "Rome"},
]
MAPPING = {"prompt": "question", "chosen": "good", "rejected": "bad"}
EXPECTED = [("2+2?", "4", "5"), ("Capital of France?", "Paris", "Rome")]


def _triples(rows):
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def test_jsonl_parquet_and_datasets_folder_read_the_same(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    folder = tmp_path / "hf"
    folder.mkdir()
    table = pa.Table.from_pylist(ROWS)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)  # the Arrow stream format datasets' save_to_disk writes
    for spec in (tmp_path / "p.jsonl", tmp_path / "p.parquet", folder):
        assert _triples(read_preferences(str(spec), MAPPING)) == EXPECTED


def test_bad_rows_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
        + "\n\n"
        + json.dumps({"prompt": "a", "chosen": "b"})
        + "\n"
    )
    with pytest.raises(PreferenceFileError, match=r"bad.jsonl:3: field 'rejected' \(rejected\) is missing"):
        read_preferences(str(path))
    path.write_text("{not json\n")
    with pytest.raises(PreferenceFileError, match=r"bad.jsonl:1: bad JSON"):
        read_preferences(str(path))
    path.write_text(json.dumps({"prompt": "a", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(PreferenceFileError, match=r"bad.jsonl:1: chosen and rejected are the same"):
        read_preferences(str(path))
    with pytest.raises(PreferenceFileError, match="missing.csv: not found"):
        read_preferences(str(tmp_path / "missing.csv"))


def test_genies_split_as_preference_pairs(genies_data_dir):
    rows = read_preferences(f"genies:{genies_data_dir}:alpaca_mmlu:test")
    assert len(rows) == 250 * 3  # 4 responses per record: 3 pairs each
    first = json.loads((genies_data_dir / "distributions/alpaca_mmlu/test.json").read_text())[0]
    preferred = next(t for t, label in first["responses"].items() if label == 1)
    assert rows[0]["chosen"] == preferred and rows[0]["rejected"] != preferred
    assert rows[0]["prompt"] == first["prompt"]
