"""A flow run's Logs tab: the `alignflow` logger's records (stage commits, training
steps) reach the run's Prefect logs, from the driver and from Ray actors, while
the console shows no INFO lines."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

pytest.register_assert_rewrite("prefect_server")  # imported here before pytest_plugins loads it
from helpers import tiny_config_data, wait_for  # noqa: E402
from prefect_server import ALIGNFLOW  # noqa: E402

pytest_plugins = ["prefect_server"]

FLOW_RUN_LINE = re.compile(r"^flow run (\S+) \(\S+\): resume with", re.MULTILINE)


def run_and_read_logs(server, model_dir: Path, home: Path, **overrides) -> tuple[list[str], str]:
    """`alignflow run self-improve` against the server: the run's log messages, and the console's stderr."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    home.mkdir(parents=True)
    config = home / "config.json"
    config.write_text(json.dumps(tiny_config_data(model_dir, home, **overrides)))
    done = subprocess.run(
        [*ALIGNFLOW, "run", "self-improve", "--config", str(config), "--json"],
        env=server.env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [run_id] = FLOW_RUN_LINE.findall(done.stderr)

    def committed_lines():
        with server.client() as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        messages = [entry.message for entry in logs if entry.name == "alignflow"]
        return messages if any("train_dpo: committed" in m for m in messages) else None

    return wait_for(committed_lines, 30, "the run's alignflow logs"), done.stderr


def test_stage_logs_reach_the_runs_prefect_logs_from_the_driver_and_a_ray_actor(
    prefect_server, tiny_model_dir, tmp_path
):
    """One run on Ray (a real server, the CLI as a user runs it): sharded stages log their shards
    and commits in the driver; whole stages (prompts, pairs, train_dpo) run on the actor, whose
    lines arrive named after it."""
    pytest.importorskip("ray")
    messages, console = run_and_read_logs(
        prefect_server, tiny_model_dir, tmp_path / "ray", executor="ray", ray__replicas=1, ray__cpus_per_replica=0.5
    )
    actor = r"(\[(?P<actor>\S+:\d+)\] )?"
    for stage in ("prompts", "sample", "judge", "pairs", "logprobs", "train_dpo"):
        assert any(re.match(rf"{actor}{stage}: committed ", m) for m in messages), (stage, messages)
    assert any(m.startswith("sample: shard 1/1 done on ") for m in messages), messages
    steps = [re.match(rf"{actor}train_dpo: step \d+/\d+ loss \S+ lr \S+$", m) for m in messages]
    steps = [m for m in steps if m]
    assert steps and {m.group("actor") for m in steps} != {None}, messages  # from the actor, named
    assert len({m.group("actor") for m in steps}) == 1  # one actor, by host and pid
    assert "committed" not in console  # INFO goes to Prefect and the file, not the terminal
