"""Artifacts name no path of the machine that wrote them: the same self-improve run,
and the same GENIES run, in two homes, with the model (and the GENIES data) in two
folders, give the same keys, content hashes and file bytes for every stage."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from helpers import tiny_config_data

from alignflow.config import GeniesConfig, SelfImproveConfig
from alignflow.storage.artifacts import ArtifactStore


def run_in_home(tiny_model_dir: Path, root: Path) -> tuple[ArtifactStore, Path]:
    from alignflow.flows.self_improve import self_improve

    model = root / "models" / "tiny"
    shutil.copytree(tiny_model_dir, model)
    config = SelfImproveConfig.model_validate(tiny_config_data(model, root / "home", rounds=2))
    self_improve(config=config)
    return ArtifactStore(config.paths.resolved().artifact_root), model


def files(manifest: dict) -> dict[str, str]:
    """An artifact's files by name without the writer's id, with their hashes."""
    return {
        re.sub(r"-[0-9a-f]{10}(?=\.parquet$|/)", "", name, count=1): digest
        for name, digest in manifest["files"].items()
    }


def artifacts(store: ArtifactStore) -> dict[tuple[str, str], dict]:
    return {(m["stage"], m["key"]): store.manifest(m["stage"], m["key"]) for m in store.committed()}


def test_two_homes_give_identical_keys_content_hashes_and_files(tiny_model_dir, tmp_path):
    store_a, model_a = run_in_home(tiny_model_dir, tmp_path / "first")
    store_b, _ = run_in_home(tiny_model_dir, tmp_path / "second")
    assert_same_artifacts(store_a, store_b, {"prompts", "sample", "judge", "pairs", "logprobs", "train_dpo"})
    assert_no_machine_path(store_a, [tmp_path / "first", model_a])


GENIES_SHIFT = [{"source": "alpaca_short", "target": "alpaca_long", "label": "extreme", "category": "length"}]


def run_genies_in_home(tiny_model_dir: Path, genies_data_dir: Path, root: Path) -> ArtifactStore:
    from alignflow.flows.genies_eval import genies_eval

    shutil.copytree(tiny_model_dir, root / "models" / "tiny-llama")
    shutil.copytree(genies_data_dir, root / "genies")
    (root / "shifts.json").write_text(json.dumps(GENIES_SHIFT))
    config = GeniesConfig.model_validate(
        {
            "model": str(root / "models" / "tiny-llama"),
            "data_dir": str(root / "genies"),
            "shifts": str(root / "shifts.json"),
            "interventions": ["mms", "lora_fine_tune"],
            "max_train_pairs": 6,
            "max_eval_pairs": 6,
            "paths": {"home": str(root / "home")},
            "scoring": {"max_tokens": 128},
            "lora_fine_tune": {"steps": 4, "batch_size": 2, "lora": {"r": 4}},
        }
    )
    genies_eval(config=config)
    return ArtifactStore(config.paths.resolved().artifact_root)


def test_genies_in_two_homes_gives_identical_artifacts(tiny_model_dir, genies_data_dir, tmp_path):
    store_a = run_genies_in_home(tiny_model_dir, genies_data_dir, tmp_path / "first")
    store_b = run_genies_in_home(tiny_model_dir, genies_data_dir, tmp_path / "second")
    assert_same_artifacts(store_a, store_b, {"genies_pairs", "genies_train", "genies_evaluate", "genies_report"})
    assert_no_machine_path(store_a, [tmp_path / "first"])


def assert_same_artifacts(store_a: ArtifactStore, store_b: ArtifactStore, stages: set[str]) -> None:
    a, b = artifacts(store_a), artifacts(store_b)
    assert {stage for stage, _ in a} >= stages
    for name in sorted(a, key=lambda n: a[n]["created_at"]):  # the first artifact that differs says why
        assert name in b, f"{name} has another key in the second home"
        assert files(a[name]) == files(b[name]), name
        assert a[name]["content_hash"] == b[name]["content_hash"], name
    assert a.keys() == b.keys()


def assert_no_machine_path(store: ArtifactStore, paths: list[Path]) -> None:
    """Nothing written names the home, the store or the model folder of the machine that wrote it."""
    machine_paths = [str(p).encode() for p in paths]
    root = Path(store.root)
    for path in root.rglob("*"):
        if path.is_file():
            leaked = [p.decode() for p in machine_paths if p in path.read_bytes()]
            assert not leaked, f"{path.relative_to(root)} names {leaked}"
