"""External interventions in the public script contract, run unchanged:

    python train.py --model_dir BASE --train_distribution DIST --output_dir OUT
    python eval.py --model_dir OUT --distribution_dirs D1 [D2 ...] --output_paths P1 [P2 ...]

Each eval output is a JSON object with at least ``eval_accuracy``. A folder
without train.py is evaluated on the base model. The scripts see the (capped)
pairs written back into the release layout: ``<name>/{train,test}.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from alignflow.genies.data import GeniesDataError, preferred_texts, read_json
from alignflow.genies.interventions.base import Scores


def records_from_pairs(pairs: list[dict]) -> list[dict]:
    """Pairs regrouped into GENIES records (one per prompt, in first-seen order)."""
    records: dict[str, dict] = {}
    for pair in pairs:
        preferred, other = preferred_texts(pair)
        record = records.setdefault(pair["prompt"], {"prompt": pair["prompt"], "responses": {preferred: 1.0}})
        record["responses"][other] = 0.0
    return list(records.values())


def write_distribution(root: Path, pairs: list[dict], split: str) -> Path:
    """``root/<distribution>/<split>.json`` holding ``pairs`` as records."""
    name = pairs[0]["pair_id"].split("/")[0] if pairs else "empty"
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.json").write_text(json.dumps(records_from_pairs(pairs)))
    (folder / "metadata.json").write_text(json.dumps({"id": name}))
    return folder


def read_accuracy(path: Path) -> tuple[float, dict]:
    result = read_json(path, "eval.py wrote no result file")
    if not isinstance(result, dict) or not isinstance(result.get("eval_accuracy"), (int, float)):
        raise GeniesDataError(f"{path}: no numeric 'eval_accuracy' (keys: {_keys_or_type(result)})")
    extra = {k: v for k, v in result.items() if isinstance(v, (int, float)) and k != "eval_accuracy"}
    return float(result["eval_accuracy"]), extra


def _keys_or_type(result) -> str:
    return str(sorted(result)) if isinstance(result, dict) else type(result).__name__


class ScriptIntervention:
    def __init__(self, name: str, folder: str | Path):
        self.name = name
        self.folder = Path(folder).expanduser().resolve()
        if not (self.folder / "eval.py").is_file():
            raise GeniesDataError(
                f"intervention '{name}': {self.folder} has no eval.py "
                "(the script contract needs eval.py, optionally train.py)"
            )
        self.trains = (self.folder / "train.py").is_file()

    def train(self, base: Path, pairs: list[dict], out: Path, progress=None) -> dict:
        with tempfile.TemporaryDirectory(prefix="genies-train-") as tmp:
            dist = write_distribution(Path(tmp), pairs, "train")
            self._run(
                "train.py",
                "--model_dir",
                str(base),
                "--train_distribution",
                str(dist),
                "--output_dir",
                str(out / "model"),
            )
        return {}

    def evaluate(self, base: Path, state: Path | None, pairs: list[dict], progress=None) -> Scores:
        model_dir = state / "model" if self.trains else base
        with tempfile.TemporaryDirectory(prefix="genies-eval-") as tmp:
            dist = write_distribution(Path(tmp) / "distributions", pairs, "test")
            result = Path(tmp) / "result.json"
            self._run(
                "eval.py",
                "--model_dir",
                str(model_dir),
                "--distribution_dirs",
                str(dist),
                "--output_paths",
                str(result),
            )
            accuracy, extra = read_accuracy(result)
        return Scores(accuracy=accuracy, extra=extra)

    def _run(self, script: str, *args: str) -> None:
        done = subprocess.run(
            [sys.executable, str(self.folder / script), *args], cwd=self.folder, capture_output=True, text=True
        )
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"intervention '{self.name}': {script} exited with {done.returncode}: {tail}")
