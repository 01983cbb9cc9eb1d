"""Deployments against a real Prefect server: `alignflow deploy`, an `alignflow worker`
running flow runs created through the API, a stage failed once by an injected fault
and `alignflow resume`, and the trigger that evaluates a completed training run's
model on GENIES."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

pytest.register_assert_rewrite("prefect_server")  # imported here before pytest_plugins loads it
from helpers import tiny_config_data, wait_for  # noqa: E402
from prefect_server import ALIGNFLOW, stop  # noqa: E402

from alignflow.storage.artifacts import ArtifactStore  # noqa: E402

pytest_plugins = ["prefect_server"]

POOL = "alignflow-test"
FAILING_STAGE = "judge"
BEFORE_FAILURE = ["prompts", "sample"]
FROM_FAILURE = ["judge", "pairs", "logprobs", "train_dpo"]
SHIFTS = [{"source": "alpaca_mmlu", "target": "alpaca_short", "label": "extreme", "category": "length"}]


def alignflow(server, *args: str) -> str:
    done = subprocess.run(
        [*ALIGNFLOW, *args], env=server.env(), capture_output=True, text=True, check=False, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def finished_run(server, run_id, timeout: float = 150):
    def check():
        with server.client() as client:
            run = client.read_flow_run(run_id)
        return run if run.state and run.state.is_final() else None

    return wait_for(check, timeout, f"flow run {run_id} to finish")


def task_states(server, run_id, expected: set[str]) -> dict[str, list[str]]:
    """Stage name -> the states of its task runs, oldest first, once every expected stage
    has a task run and all are final (task states reach the API asynchronously)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    def check():
        with server.client() as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            )
        states = {}
        for r in runs:
            states.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name)
        return states if expected <= set(states) and all(r.state.is_final() for r in runs) else None

    return wait_for(check, 30, f"task runs {sorted(expected)} of flow run {run_id}")


def assert_resumed_from_the_failed_stage(states: dict[str, list[str]]) -> None:
    """Both attempts' task runs: the stages before the failure ran once and came back
    Cached, the failed one ran again, the ones after it ran for the first time."""
    assert all(states[stage] == ["Completed", "Cached"] for stage in BEFORE_FAILURE), states
    assert states[FAILING_STAGE] == ["Failed", "Completed"], states
    assert all(states[stage] == ["Completed"] for stage in FROM_FAILURE[1:]), states


def artifacts_of(server, run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with server.client() as client:
        return client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deployments")


@pytest.fixture(scope="module")
def deployed(prefect_server, tiny_model_dir, genies_data_dir, home) -> dict[str, str]:
    """`alignflow deploy` with the tiny model's configs as the deployments' defaults; name -> id."""
    training = tiny_config_data(tiny_model_dir, home)
    (home / "shifts.json").write_text(json.dumps(SHIFTS))
    genies = {
        "data_dir": str(genies_data_dir),
        "shifts": str(home / "shifts.json"),
        "interventions": [],
        "max_train_pairs": 4,
        "max_eval_pairs": 4,
        "scoring": {"max_tokens": 128},
        "paths": {"home": str(home)},
    }
    (home / "self-improve.json").write_text(json.dumps(training))
    (home / "pipeline.json").write_text(json.dumps({"training": training, "genies": genies}))
    out = alignflow(
        prefect_server,
        "deploy",
        "--pool",
        POOL,
        "--config",
        f"self-improve={home / 'self-improve.json'}",
        "--config",
        f"pipeline={home / 'pipeline.json'}",
    )
    return dict(re.findall(r"^(\S+/\S+): (\S+)$", out, re.MULTILINE))


@pytest.fixture(scope="module")
def worker(prefect_server, deployed, home):
    """`alignflow worker` polling every second, for the module's flow runs."""
    log = open(home / "worker.log", "w")
    env = prefect_server.env(PREFECT_WORKER_QUERY_SECONDS="1")
    proc = subprocess.Popen(
        [*ALIGNFLOW, "worker", "--pool", POOL], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    yield proc
    stop(proc)
    log.close()


@pytest.fixture(scope="module")
def failed_run(prefect_server, deployed, worker, home):
    """A self-improve run created through the API whose judge stage fails once."""
    marker = home / "judge-failed-once"
    with prefect_server.client() as client:
        run = client.create_flow_run_from_deployment(
            deployed["self-improve/self-improve"],
            job_variables={"env": {"ALIGNFLOW_FAIL_ONCE": f"{FAILING_STAGE}:{marker}"}},
        )
    run = finished_run(prefect_server, run.id)
    states = task_states(prefect_server, run.id, {*BEFORE_FAILURE, FAILING_STAGE})
    committed = {m["stage"]: m["created_at"] for m in ArtifactStore(str(home / "artifacts")).committed()}
    return run, states, committed


@pytest.fixture(scope="module")
def resumed_run(prefect_server, failed_run):
    run, _, _ = failed_run
    out = alignflow(prefect_server, "resume", str(run.id))
    assert "scheduled again" in out
    run = finished_run(prefect_server, run.id)
    return run, task_states(prefect_server, run.id, {*BEFORE_FAILURE, *FROM_FAILURE})


def test_deploy_registers_every_flow_with_typed_parameters_a_schedule_and_the_trigger(prefect_server, deployed):
    assert set(deployed) == {
        "self-improve/self-improve",
        "gem/gem",
        "genies-eval/genies-eval",
        "pipeline/pipeline",
        "refeval-eval/refeval-eval",
    }
    with prefect_server.client() as client:
        assert client.read_work_pool(POOL).type == "process"
        by_name = {name: client.read_deployment(deployment_id) for name, deployment_id in deployed.items()}
        automations = client.read_automations_by_name("genies-after-self-improve")
    for deployment in by_name.values():
        assert deployment.entrypoint.startswith("alignflow.flows.") and deployment.work_pool_name == POOL
        assert deployment.enforce_parameter_schema
        assert list(deployment.parameter_openapi_schema["properties"]) == ["config"]
    pipeline = by_name["pipeline/pipeline"]
    assert [(s.schedule.cron, s.active) for s in pipeline.schedules] == [("0 3 * * 0", False)]
    pipeline_config = pipeline.parameter_openapi_schema["definitions"]["PipelineConfig"]
    assert {"training", "genies"} <= set(pipeline_config["properties"])
    [automation] = automations
    assert str(automation.actions[0].deployment_id) == deployed["pipeline/pipeline"]


def test_deploy_creates_the_zombie_detection_automation_once(prefect_server, deployed):
    """Runs whose heartbeats stop are marked Crashed; deploying again updates the automation, never doubles it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from alignflow.deployments.deploy import (
        ZOMBIE_AFTER,
        ZOMBIE_AUTOMATION,
        ensure_zombie_detection,
    )

    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
        again = ensure_zombie_detection()
    with prefect_server.client() as client:
        [automation] = client.read_automations_by_name(ZOMBIE_AUTOMATION)
    trigger = automation.trigger
    assert automation.id == again and automation.enabled
    assert (trigger.posture, trigger.threshold, trigger.within) == ("Proactive", 1, ZOMBIE_AFTER)
    assert trigger.after == {"prefect.flow-run.heartbeat"} and trigger.for_each == {"prefect.resource.id"}
    assert trigger.expect == {
        "prefect.flow-run.heartbeat",
        "prefect.flow-run.Completed",
        "prefect.flow-run.Failed",
        "prefect.flow-run.Cancelled",
        "prefect.flow-run.Crashed",
    }
    [action] = automation.actions
    assert (action.type, action.state.value) == ("change-flow-run-state", "CRASHED")


def test_deploy_without_a_server_is_a_one_line_error(prefect_server):
    done = subprocess.run(
        [*ALIGNFLOW, "deploy"],
        env={**prefect_server.env(), "PREFECT_API_URL": ""},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: no Prefect server: set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api "
        "(start one with `prefect server start`)"
    )


def test_injected_fault_fails_the_run_at_that_stage(failed_run, tiny_model_dir):
    run, states, committed = failed_run
    assert run.state.is_failed(), run.state
    assert run.parameters["config"]["model"] == str(tiny_model_dir)
    assert all(states[stage] == ["Completed"] for stage in BEFORE_FAILURE), states
    assert states[FAILING_STAGE] == ["Failed"], states  # not retried: it fails like bad input
    assert not set(FROM_FAILURE) & set(committed)


def test_resume_reruns_only_the_failed_stage_and_its_successors(resumed_run, failed_run, home):
    run, states = resumed_run
    _, _, committed_before = failed_run
    assert run.state.is_completed(), run.state
    assert run.id == failed_run[0].id and run.run_count == 2
    assert_resumed_from_the_failed_stage(states)
    committed = {m["stage"]: m["created_at"] for m in ArtifactStore(str(home / "artifacts")).committed()}
    assert all(committed[stage] == created for stage, created in committed_before.items())  # reused, not rebuilt
    assert set(FROM_FAILURE) <= set(committed)


def test_resume_runs_a_run_without_deployment_in_the_resuming_process(
    prefect_server, tiny_model_dir, tmp_path, monkeypatch
):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from alignflow.cli import main
    from alignflow.config import SelfImproveConfig
    from alignflow.flows.self_improve import self_improve

    monkeypatch.setenv("ALIGNFLOW_FAIL_ONCE", f"{FAILING_STAGE}:{tmp_path / 'failed-once'}")
    config = SelfImproveConfig.model_validate(tiny_config_data(tiny_model_dir, tmp_path))
    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
        state = self_improve(config=config, return_state=True)
        assert state.is_failed()
        run_id = state.state_details.flow_run_id
        assert main(["resume", str(run_id)]) == 0
    assert finished_run(prefect_server, run_id).state.is_completed()
    states = task_states(prefect_server, run_id, {*BEFORE_FAILURE, *FROM_FAILURE})
    assert_resumed_from_the_failed_stage(states)


def test_the_run_publishes_stage_tables_progress_and_a_summary_linking_every_artifact(
    prefect_server, resumed_run, home
):
    run, _ = resumed_run
    artifacts = artifacts_of(prefect_server, run.id)
    by_type = {}
    for a in artifacts:
        by_type.setdefault(a.type, set()).add(a.key)
    assert {f"{s.replace('_', '-')}-report" for s in BEFORE_FAILURE + FROM_FAILURE} <= by_type["table"]
    assert "progress" in by_type
    [summary] = [a for a in artifacts if a.key == "self-improve-summary"]
    store = ArtifactStore(str(home / "artifacts"))
    for manifest in store.committed():
        if manifest["stage"] in (*BEFORE_FAILURE, *FROM_FAILURE):
            assert f"({Path(manifest['uri']).as_uri()})" in summary.data, manifest["stage"]


def test_a_completed_training_run_triggers_genies_on_its_model(prefect_server, deployed, resumed_run, home):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    training_run, _ = resumed_run

    def triggered():
        with prefect_server.client() as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployed["pipeline/pipeline"]]))
            )

    [pipeline_run] = wait_for(triggered, 60, "the trigger to create a pipeline run")
    assert pipeline_run.parameters["config"]["training"] == training_run.parameters["config"]

    pipeline_run = finished_run(prefect_server, pipeline_run.id)
    assert pipeline_run.state.is_completed(), pipeline_run.state
    with prefect_server.client() as client:
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[pipeline_run.id]))
        )
        by_flow = {client.read_flow(r.flow_id).name: r for r in subflows}
    training = task_states(prefect_server, by_flow["self-improve"].id, {*BEFORE_FAILURE, *FROM_FAILURE})
    assert all(training[stage] == ["Cached"] for stage in BEFORE_FAILURE + FROM_FAILURE), training
    genies_run = by_flow["genies-eval"]
    store = ArtifactStore(str(home / "artifacts"))
    [trained] = [m for m in store.committed() if m["stage"] == "train_dpo"]
    assert genies_run.parameters["config"]["model"] == str(Path(trained["uri"]) / trained["dirs"]["merged"])
    genies_summary = [a for a in artifacts_of(prefect_server, genies_run.id) if a.key == "genies-eval-summary"]
    assert genies_summary and "![heatmap: shift x intervention](data:image/png;base64," in genies_summary[0].data
    assert "pipeline-summary" in {a.key for a in artifacts_of(prefect_server, pipeline_run.id)}
