"""GENIES data: fetch and safely extract the public release, validate every
record, and expand records into position-shuffled (preferred, dispreferred) pairs.

A release holds ``distributions/<name>/{train,test}.json``; each record is
``{"prompt": str, "responses": {text: 1.0 | 0.0}, ...}`` with exactly one
preferred response. Only ``prompt`` and ``responses`` are used.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fsspec

RELEASE_URL = "https://genies-data.s3.us-east-2.amazonaws.com/genies-datasets.tar.gz"
SPLITS = ("train", "test")


class GeniesDataError(ValueError):
    """Bad GENIES input: the message names the file and the record."""


@dataclass(frozen=True)
class BadRecord:
    distribution: str
    split: str
    index: int
    problem: str

    def __str__(self) -> str:
        return f"{self.distribution}/{self.split}.json record {self.index}: {self.problem}"


# -- records -------------------------------------------------------------------
def record_problem(record) -> str | None:
    """Why a record is unusable, or None: a non-empty prompt, exactly one
    preferred (1.0) response and at least one dispreferred (0.0)."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return "empty or missing 'prompt'"
    responses = record.get("responses")
    if not isinstance(responses, dict) or not responses:
        return "missing 'responses' (expected an object mapping response text to 1.0 or 0.0)"
    labels = list(responses.values())
    if any(v not in (0, 1) or isinstance(v, bool) for v in labels):
        return f"response labels must be 1.0 or 0.0, got {sorted({repr(v) for v in labels})}"
    preferred = labels.count(1)
    if preferred != 1:
        return f"{preferred} preferred responses (expected exactly one labelled 1.0)"
    if labels.count(0) < 1:
        return "no dispreferred response (expected at least one labelled 0.0)"
    return None


def read_split(distribution_dir: Path, split: str) -> list[dict]:
    """All records of one split, or an error naming the file and the first bad record."""
    path = Path(distribution_dir) / f"{split}.json"
    records = _read_json_list(path)
    if not records:
        raise GeniesDataError(f"{path}: no records")
    for index, record in enumerate(records):
        problem = record_problem(record)
        if problem:
            raise GeniesDataError(f"{path}: record {index}: {problem}")
    return records


def read_json(path: Path, missing: str = "file not found"):
    """A JSON file's content; a missing or malformed file is a GeniesDataError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GeniesDataError(f"{path}: {missing}") from None
    except json.JSONDecodeError as e:
        raise GeniesDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _read_json_list(path: Path) -> list:
    records = read_json(path)
    if not isinstance(records, list):
        raise GeniesDataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def expand_pairs(records: list[dict], seed: int, distribution: str, split: str) -> list[dict]:
    """One pair per (preferred, dispreferred) of each record. Which response sits
    in position A is drawn per pair from the seed, because many distributions
    always list the preferred answer at the same index."""
    pairs = []
    for index, record in enumerate(records):
        preferred = next(text for text, label in record["responses"].items() if label == 1)
        others = [text for text, label in record["responses"].items() if label == 0]
        for j, other in enumerate(others):
            pair_id = f"{distribution}/{split}/{index}/{j}"
            a_preferred = seeded_coin(seed, pair_id)
            pairs.append(
                {
                    "pair_id": pair_id,
                    "record": index,
                    "prompt": record["prompt"],
                    "response_a": preferred if a_preferred else other,
                    "response_b": other if a_preferred else preferred,
                    "preferred": 0 if a_preferred else 1,
                }
            )
    return pairs


def one_pair_per_prompt(pairs: list[dict], seed: int) -> list[dict]:
    """One pair per prompt, its dispreferred response drawn from the seed: GENIES trains
    every intervention on one random dispreferred response per prompt."""
    by_prompt: dict[str, list[dict]] = {}
    for pair in pairs:
        by_prompt.setdefault(pair["prompt"], []).append(pair)
    chosen = {id(random.Random(f"{seed}:{prompt}").choice(group)) for prompt, group in by_prompt.items()}
    return [p for p in pairs if id(p) in chosen]


def preferred_texts(pair: dict) -> tuple[str, str]:
    """(preferred, dispreferred) of a pair."""
    if pair["preferred"] == 0:
        return pair["response_a"], pair["response_b"]
    return pair["response_b"], pair["response_a"]


def seeded_coin(seed: int, name: str) -> bool:
    """A fair coin per (seed, name). sha256, not crc32: crc32 is linear, so its low
    bit flips with the seed the same way for every name of one length."""
    return hashlib.sha256(f"{seed}:{name}".encode()).digest()[0] % 2 == 0


def capped(pairs: list[dict], max_pairs: int | None, seed: int, id_field: str = "pair_id") -> list[dict]:
    """A seeded random subset of at most ``max_pairs`` pairs, kept in file order."""
    if max_pairs is None or len(pairs) <= max_pairs:
        return pairs
    keep = sorted(pairs, key=lambda p: hashlib.sha256(f"{seed}:cap:{p[id_field]}".encode()).digest())[:max_pairs]
    chosen = {p[id_field] for p in keep}
    return [p for p in pairs if p[id_field] in chosen]


def distribution_names(data_dir: Path) -> list[str]:
    root = Path(data_dir) / "distributions"
    if not root.is_dir():
        raise GeniesDataError(
            f"{data_dir}: no distributions/ folder (run `alignflow genies download --dest {data_dir}`)"
        )
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def distribution_dir(data_dir: Path, name: str) -> Path:
    available = distribution_names(data_dir)
    if name not in available:
        raise GeniesDataError(f"unknown distribution '{name}' in {data_dir}; available: {', '.join(available)}")
    return Path(data_dir) / "distributions" / name


def validate_release(data_dir: Path) -> tuple[int, list[BadRecord]]:
    """(records checked, bad records) over every distribution and split."""
    checked, bad = 0, []
    for name in distribution_names(data_dir):
        for split in SPLITS:
            path = Path(data_dir) / "distributions" / name / f"{split}.json"
            try:
                records = _read_json_list(path)
            except GeniesDataError as e:
                bad.append(BadRecord(name, split, -1, str(e)))
                continue
            if not records:
                bad.append(BadRecord(name, split, -1, "no records"))
            checked += len(records)
            bad += [BadRecord(name, split, i, p) for i, r in enumerate(records) if (p := record_problem(r))]
    return checked, bad


# -- download ------------------------------------------------------------------
def download(source: str, dest: Path, storage_options: dict | None = None) -> Path:
    """Put the release's ``distributions/`` under ``dest`` from a URL, a local
    ``.tar``/``.tar.gz`` or a directory. Extraction goes to a temporary folder
    first, so an interrupted or rejected download leaves ``dest`` as it was."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".genies-", dir=dest))
    try:
        if Path(source).is_dir():
            shutil.copytree(_release_root(Path(source)) / "distributions", staging / "distributions")
        else:
            _extract_tar(_local_copy(source, staging, storage_options or {}), staging / "extracted")
            shutil.move(str(_release_root(staging / "extracted") / "distributions"), staging / "distributions")
        target = dest / "distributions"
        if target.exists():
            shutil.rmtree(target)
        (staging / "distributions").rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _local_copy(source: str, staging: Path, storage_options: dict) -> Path:
    if Path(source).is_file():
        return Path(source)
    local = staging / "release.tar"
    try:
        with fsspec.open(source, "rb", **storage_options) as remote, open(local, "wb") as out:
            shutil.copyfileobj(remote, out, length=1 << 22)
    except FileNotFoundError:
        raise GeniesDataError(
            f"{source}: not found (expected a URL, a .tar/.tar.gz file or a release directory)"
        ) from None
    return local


def _extract_tar(path: Path, out: Path) -> None:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(path, member)
            tar.extractall(out, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise GeniesDataError(f"{path}: not a readable tar archive ({e})") from None


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    if name.startswith("/") or Path(name).is_absolute():
        raise GeniesDataError(f"{archive}: member '{name}' has an absolute path; refusing to extract")
    if ".." in Path(name).parts:
        raise GeniesDataError(f"{archive}: member '{name}' escapes the target folder ('..'); refusing to extract")
    if not (member.isfile() or member.isdir()):
        raise GeniesDataError(f"{archive}: member '{name}' is a link or device, not a file; refusing to extract")


def _release_root(folder: Path) -> Path:
    """The folder that holds ``distributions/`` (the tar may wrap it in one more folder)."""
    if (folder / "distributions").is_dir():
        return folder
    inner = [p for p in folder.iterdir() if p.is_dir() and (p / "distributions").is_dir()]
    if len(inner) == 1:
        return inner[0]
    raise GeniesDataError(f"{folder}: no distributions/ folder in the release")
