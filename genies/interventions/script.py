"""External interventions in GENIES's script contract, run unchanged. By default
the contract GENIES's own API uses (scripts parse with ``fire``; lists are
Python-literal strings):

    python train.py --model_dir BASE --output_dir OUT --training_distribution_dir D \
        --test_distribution_dirs "['D']"
    python eval.py --model_dir OUT --distribution_dirs "['D1', 'D2']" --output_paths "['P1.json', 'P2.json']"

``contract: readme`` gives the flags of GENIES's README instead (``--train_distribution
D``; space-separated lists). Each eval output is a JSON object with at least
``eval_accuracy``. A folder without train.py is evaluated on the base model.

A distribution folder always holds ``train.json`` and ``test.json`` (records as
released, every response of each kept record): for training, the source's train
pairs and, when the stage has them, its test pairs; for evaluation, the evaluated
pairs in ``test.json`` and an empty ``train.json`` (GENIES's few-shot reads its
examples from the training folder, whose path its train.py records). The output
folder is the script's to keep: evaluation reads from it.
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


def write_distribution(root: Path, name: str, train: list[dict], test: list[dict]) -> Path:
    """``root/<name>/{train,test}.json`` holding the pairs as records."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, pairs in (("train", train), ("test", test)):
        (folder / f"{split}.json").write_text(json.dumps(records_from_pairs(pairs)))
    (folder / "metadata.json").write_text(json.dumps({"id": name}))
    return folder


def distribution_of(pairs: list[dict]) -> str:
    return pairs[0]["pair_id"].split("/")[0] if pairs else "empty"


def list_flag(values: list[str], contract: str) -> list[str]:
    """A list argument: one Python-literal string for fire (GENIES's API), else separate words."""
    return [repr(values)] if contract == "api" else values


def read_result(path: Path) -> dict:
    """eval.py's output: a JSON object with a numeric ``eval_accuracy``."""
    result = read_json(path, "eval.py wrote no result file")
    if not isinstance(result, dict) or not isinstance(result.get("eval_accuracy"), (int, float)):
        raise GeniesDataError(f"{path}: no numeric 'eval_accuracy' (keys: {_keys_or_type(result)})")
    return result


def numeric_extras(result: dict) -> dict:
    """The result's other numbers (a script's own metrics), kept with the evaluation."""
    return {k: v for k, v in result.items() if type(v) in (int, float) and k != "eval_accuracy"}


def result_probabilities(result: dict, pairs: int) -> list[float] | None:
    """``eval_probabilities`` (P(preferred) per pair, GENIES's order: records as written,
    each record's pairs in turn) when it has one number per pair; None otherwise (absent,
    or the script dropped pairs, so they cannot be matched)."""
    values = result.get("eval_probabilities")
    if isinstance(values, list) and len(values) == pairs and all(isinstance(v, (int, float)) for v in values):
        return [float(v) for v in values]
    return None


def _keys_or_type(result) -> str:
    return str(sorted(result)) if isinstance(result, dict) else type(result).__name__


class ScriptIntervention:
    full_train_split = False

    def __init__(self, name: str, folder: str | Path, contract: str = "api"):
        self.name = name
        self.folder = Path(folder).expanduser().resolve()
        self.contract = contract
        if not (self.folder / "eval.py").is_file():
            raise GeniesDataError(
                f"intervention '{name}': {self.folder} has no eval.py "
                "(the script contract needs eval.py, optionally train.py)"
            )
        self.trains = (self.folder / "train.py").is_file()

    def train(self, base: Path, pairs: list[dict], out: Path, progress=None, test_pairs: list[dict] = ()) -> dict:
        with tempfile.TemporaryDirectory(prefix="genies-train-") as tmp:
            dist = str(write_distribution(Path(tmp), distribution_of(pairs), pairs, list(test_pairs)))
            output = ["--output_dir", str(out / "model")]
            if self.contract == "api":
                data = ["--training_distribution_dir", dist, "--test_distribution_dirs", *list_flag([dist], "api")]
            else:
                data = ["--train_distribution", dist]
            self._run("train.py", "--model_dir", str(base), *output, *data)
        return {}

    def evaluate(self, base: Path, state: Path | None, pairs: list[dict], progress=None) -> Scores:
        model_dir = state / "model" if self.trains else base
        with tempfile.TemporaryDirectory(prefix="genies-eval-") as tmp:
            dist = write_distribution(Path(tmp) / "distributions", distribution_of(pairs), [], pairs)
            result = Path(tmp) / "result.json"
            self._run(
                "eval.py",
                "--model_dir",
                str(model_dir),
                "--distribution_dirs",
                *list_flag([str(dist)], self.contract),
                "--output_paths",
                *list_flag([str(result)], self.contract),
            )
            output = read_result(result)
        accuracy, extra = float(output["eval_accuracy"]), numeric_extras(output)
        p_preferred = result_probabilities(output, len(pairs))
        if p_preferred is None:
            return Scores(accuracy=accuracy, extra=extra)
        p_a = [p if pair["preferred"] == 0 else 1.0 - p for pair, p in zip(pairs, p_preferred)]
        return Scores(p_a=p_a, extra=extra | {"script_eval_accuracy": accuracy})

    def _run(self, script: str, *args: str) -> None:
        done = subprocess.run(
            [sys.executable, str(self.folder / script), *args], cwd=self.folder, capture_output=True, text=True
        )
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"intervention '{self.name}': {script} exited with {done.returncode}: {tail}")
