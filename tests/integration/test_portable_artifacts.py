"""Artifacts name no path of the machine that wrote them: the same self-improve run
in two homes, with the model in two folders, gives the same keys, content hashes and
file bytes for every stage."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from helpers import tiny_config_data

from alignflow.config import SelfImproveConfig
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
    a, b = artifacts(store_a), artifacts(store_b)
    assert {stage for stage, _ in a} >= {"prompts", "sample", "judge", "pairs", "logprobs", "train_dpo"}
    for name in sorted(a, key=lambda n: a[n]["created_at"]):  # the first artifact that differs says why
        assert name in b, f"{name} has another key in the second home"
        assert files(a[name]) == files(b[name]), name
        assert a[name]["content_hash"] == b[name]["content_hash"], name
    assert a.keys() == b.keys()

    # nothing written names the home, the store or the model folder of the machine that wrote it
    machine_paths = [str(tmp_path / "first").encode(), str(model_a).encode()]
    root = Path(store_a.root)
    for path in root.rglob("*"):
        if path.is_file():
            leaked = [p.decode() for p in machine_paths if p in path.read_bytes()]
            assert not leaked, f"{path.relative_to(root)} names {leaked}"
