"""SIGKILL in the middle of train_dpo, then the same command again: finished
stages are reused, training resumes from its last checkpoint, and the result
equals an uninterrupted run. SIGKILL in the middle of judge, then `alignflow
resume` of the flow run the killed process printed: the run left Running is
marked Crashed and resumed, its finished stages come back Cached, and every
artifact equals an uninterrupted run's."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_config_data

from alignflow.storage.artifacts import ArtifactStore

# slow training to kill it in; one prompt per judge shard to kill judge between shards
SLOW_TRAINING = {"dpo__epochs": 15, "dpo__checkpoint_every": 2, "dpo__eval_every": 4, "judge__shard_size": 1}
STAGES = ("sample", "judge", "pairs", "logprobs", "train_dpo")
FLOW_RUN_LINE = re.compile(r"^flow run (\S+) \((\S+)\): resume with alignflow resume \1 --home (\S+)$", re.MULTILINE)


def _command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "alignflow.cli", "run", "self-improve", "--config", str(config_path), "--json"]


def _env(home: Path) -> dict:
    env = dict(os.environ)
    env.update(
        ALIGNFLOW_HOME=str(home),
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_LOCAL_STORAGE_PATH=str(home / "prefect" / "results"),
    )
    return env


def _write_config(model_dir: Path, home: Path) -> Path:
    path = home / "config.yaml"
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tiny_config_data(model_dir, home, **SLOW_TRAINING)))
    return path


def _run(model_dir: Path, home: Path) -> dict:
    return _json_output(_command(_write_config(model_dir, home)), home, timeout=600)


def _json_output(command: list[str], home: Path, timeout: int) -> dict:
    """Run a command against the home and parse the JSON it prints (after any other output)."""
    done = subprocess.run(command, env=_env(home), capture_output=True, text=True, check=False, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{") :])


def _kill_once(model_dir: Path, home: Path, pattern: str, count: int) -> str:
    """Start a run, SIGKILL it once ``count`` files match ``pattern`` under ``home``; its stderr."""
    # Its own process group, so the kill takes the whole job down, ephemeral Prefect server included.
    command = _command(_write_config(model_dir, home))
    stderr = home / "killed-run.err"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(command, env=_env(home), start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 300
        while len(list(home.glob(pattern))) < count:
            assert proc.poll() is None, f"the run finished before {pattern} could be interrupted"
            assert time.monotonic() < deadline, f"no {pattern} appeared"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return stderr.read_text()


def _kill_after_checkpoint(model_dir: Path, home: Path, min_checkpoints: int = 2) -> None:
    _kill_once(model_dir, home, "artifacts/train_dpo/*/_checkpoints/step-*.pt", min_checkpoints)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory) -> tuple[dict, Path]:
    home = tmp_path_factory.mktemp("uninterrupted")
    return _run(tiny_model_dir, home), home


def test_sigkill_during_training_resumes_to_the_same_result(tiny_model_dir, tmp_path, uninterrupted):
    reference, reference_home = uninterrupted

    home = tmp_path / "killed"
    _kill_after_checkpoint(tiny_model_dir, home)
    store = ArtifactStore(str(home / "artifacts"))
    committed = {m["stage"]: m["created_at"] for m in store.committed()}
    assert "train_dpo" not in committed  # a killed stage never looks complete
    assert {"prompts", "sample", "judge", "pairs", "logprobs"} <= set(committed)
    checkpoint_steps = sorted(int(p.stem.split("-")[1]) for p in home.glob("artifacts/train_dpo/*/_checkpoints/*.pt"))

    resumed = _run(tiny_model_dir, home)
    after = {m["stage"]: m["created_at"] for m in store.committed()}
    assert all(after[stage] == created for stage, created in committed.items())  # reused, not rebuilt
    log_text = "".join(p.read_text() for p in (home / "logs").glob("*.log"))
    assert f"resumed from the checkpoint at step {checkpoint_steps[-1]}" in log_text

    ours, theirs = resumed["rounds"][0]["train_dpo"], reference["rounds"][0]["train_dpo"]
    for metric in ("steps", "after_loss", "after_reward_accuracy", "after_margin"):
        assert ours[metric] == theirs[metric], metric
    for stage in ("sample", "judge", "pairs", "logprobs", "train_dpo"):
        a = store.find(Path(resumed["rounds"][0][stage]["uri"]).name)
        b = ArtifactStore(str(reference_home / "artifacts")).find(Path(reference["rounds"][0][stage]["uri"]).name)
        assert a.key == b.key


TASK_STATES = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import TaskRunSort
with get_client(sync_client=True) as client:
    run = client.read_flow_run(sys.argv[1])
    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                                  sort=TaskRunSort.EXPECTED_START_TIME_ASC)
states = {}
for t in tasks:
    states.setdefault(t.name.rsplit("-", 1)[0], []).append(t.state.name)
print(json.dumps({"run": run.state.name, "run_count": run.run_count, "process": run.infrastructure_pid,
                  "tasks": states}))
"""


def _states(home: Path, run_id: str) -> dict:
    """The flow run's state, recorded process and its task runs' states by stage, read from the home's Prefect database
    (a fresh ephemeral server on it, as `alignflow resume` starts)."""
    return _json_output([sys.executable, "-c", TASK_STATES, run_id], home, timeout=300)


def _resume(home: Path, run_id: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alignflow.cli", "resume", run_id, "--home", str(home)],
        env=_env(home),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def test_sigkill_during_judge_then_resume_by_id_crashes_the_run_and_finishes_it(
    tiny_model_dir, tmp_path, uninterrupted
):
    reference, reference_home = uninterrupted
    home = tmp_path / "killed"
    stderr = _kill_once(tiny_model_dir, home, "artifacts/judge/*/_shards/shard-*.json", 1)
    [(run_id, _, printed_home)] = FLOW_RUN_LINE.findall(stderr)
    assert Path(printed_home) == home
    store = ArtifactStore(str(home / "artifacts"))
    assert {m["stage"] for m in store.committed()} == {"prompts", "sample"}  # killed mid-judge
    killed = _states(home, run_id)
    assert killed["run"] == "Running"  # nothing was left to say otherwise

    # recorded on another host, the process cannot be checked: a one-line refusal naming --force
    recorded = killed["process"]
    _set_process(home, run_id, "another-host:1:1.00")
    refused = _resume(home, run_id)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: flow run {run_id} is Running and this host cannot tell whether its process (another-host:1:1.00) "
        "still runs: if it is gone, resume with --force"
    )
    _set_process(home, run_id, recorded)

    resumed = _resume(home, run_id)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "was Running: marked Crashed by alignflow resume: its process is gone" in resumed.stderr
    states = _states(home, run_id)
    assert states["run"] == "Completed" and states["run_count"] == 2, states
    tasks = states["tasks"]
    assert tasks["prompts"] == tasks["sample"] == ["Completed", "Cached"], tasks
    assert tasks["judge"] == ["Crashed", "Completed"], tasks  # the killed attempt, then the resumed one
    assert all(tasks[stage] == ["Completed"] for stage in ("pairs", "logprobs", "train_dpo")), tasks

    reference_store = ArtifactStore(str(reference_home / "artifacts"))
    for stage in STAGES:
        expected = reference_store.find(Path(reference["rounds"][0][stage]["uri"]).name)
        assert store.find(expected.key).content_hash == expected.content_hash, stage


SET_PROCESS = """
import sys
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    client.update_flow_run(sys.argv[1], infrastructure_pid=sys.argv[2])
"""


def _set_process(home: Path, run_id: str, label: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SET_PROCESS, run_id, label],
        env=_env(home),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
