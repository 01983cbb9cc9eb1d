"""SIGKILL in the middle of train_dpo, then the same command again: finished
stages are reused, training resumes from its last checkpoint, and the result
equals an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import tiny_config_data

from alignflow.storage.artifacts import ArtifactStore

SLOW_TRAINING = {"dpo__epochs": 15, "dpo__checkpoint_every": 2, "dpo__eval_every": 4}


def _command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "alignflow.cli", "run", "self-improve", "--config", str(config_path), "--json"]


def _env(home: Path) -> dict:
    env = dict(os.environ)
    env.update(ALIGNFLOW_HOME=str(home), PREFECT_HOME=str(home / "prefect"),
               PREFECT_LOCAL_STORAGE_PATH=str(home / "prefect" / "results"))
    return env


def _write_config(model_dir: Path, home: Path) -> Path:
    path = home / "config.yaml"
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tiny_config_data(model_dir, home, **SLOW_TRAINING)))
    return path


def _run(model_dir: Path, home: Path) -> dict:
    done = subprocess.run(_command(_write_config(model_dir, home)), env=_env(home), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def _kill_after_checkpoint(model_dir: Path, home: Path, min_checkpoints: int = 2) -> None:
    # Its own process group, so the kill takes the whole job down, ephemeral Prefect server included.
    proc = subprocess.Popen(_command(_write_config(model_dir, home)), env=_env(home), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pattern = "artifacts/train_dpo/*/_checkpoints/step-*.pt"
    deadline = time.monotonic() + 300
    while len(list(home.glob(pattern))) < min_checkpoints:
        assert proc.poll() is None, "the run finished before a checkpoint could be interrupted"
        assert time.monotonic() < deadline, "no train_dpo checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_during_training_resumes_to_the_same_result(tiny_model_dir, tmp_path):
    reference = _run(tiny_model_dir, tmp_path / "uninterrupted")

    home = tmp_path / "killed"
    _kill_after_checkpoint(tiny_model_dir, home)
    store = ArtifactStore(str(home / "artifacts"))
    committed = {m["stage"]: m["created_at"] for m in store.list()}
    assert "train_dpo" not in committed  # a killed stage never looks complete
    assert {"prompts", "sample", "judge", "pairs", "logprobs"} <= set(committed)
    checkpoint_steps = sorted(int(p.stem.split("-")[1]) for p in home.glob("artifacts/train_dpo/*/_checkpoints/*.pt"))

    resumed = _run(tiny_model_dir, home)
    after = {m["stage"]: m["created_at"] for m in store.list()}
    assert all(after[stage] == created for stage, created in committed.items())  # reused, not rebuilt
    log_text = "".join(p.read_text() for p in (home / "logs").glob("*.log"))
    assert f"resumed from the checkpoint at step {checkpoint_steps[-1]}" in log_text

    ours, theirs = resumed["rounds"][0]["train_dpo"], reference["rounds"][0]["train_dpo"]
    for metric in ("steps", "after_loss", "after_reward_accuracy", "after_margin"):
        assert ours[metric] == theirs[metric], metric
    for stage in ("sample", "judge", "pairs", "logprobs", "train_dpo"):
        a = store.find(Path(resumed["rounds"][0][stage]["uri"]).name)
        b = ArtifactStore(str(tmp_path / "uninterrupted" / "artifacts")).find(Path(reference["rounds"][0][stage]["uri"]).name)
        assert a.key == b.key
