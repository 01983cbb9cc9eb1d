"""The project's Prefect deployments: one per flow, all on one work pool.

Each deployment's parameter is its flow's typed ``config``, so the API and the
UI's run form validate runs against the flow signature. Entrypoints are module
paths (``alignflow.flows.gem.gem``): a worker runs whatever alignflow is installed where
it runs (a virtualenv, or the image of a docker or kubernetes pool), with no
code pulled from storage.

The pipeline deployment carries
- a weekly cron schedule, paused unless ``cron`` is given (a GPU-hours job is
  switched on on purpose), and
- the event trigger: when a run of the self-improve deployment completes, the
  pipeline runs on that run's training config. Its training stages come back
  from cache, so what runs is the GENIES evaluation of the trained policy.

Beside the deployments, an automation marks flow runs Crashed when their
heartbeats stop (Prefect's "detect zombie flows" recipe): a worker whose machine
died or was preempted leaves no process to report the crash.
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from alignflow.config import FLOW_CONFIGS, GeniesConfig, Strict
from alignflow.runtime import HEARTBEAT_SECONDS

WORK_POOL = "alignflow"
EXAMPLE_CRON = "0 3 * * 0"  # Sundays 03:00 UTC
TRAINING = "self-improve"  # the flow, and its deployment, whose completed runs are evaluated
ZOMBIE_AUTOMATION = "alignflow-crash-zombie-flow-runs"
# Silence this long after a heartbeat means the run's process is gone. Five of our beats, and
# longer than Prefect's default 180 s, so runs started without alignflow's settings are not crashed.
ZOMBIE_AFTER = timedelta(seconds=5 * HEARTBEAT_SECONDS)
FINAL_EVENTS = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}


def require_server() -> str:
    """The Prefect API URL; an error in one line when none is set or none answers."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise RuntimeError(
            "no Prefect server: set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api "
            "(start one with `prefect server start`)"
        )
    with get_client(sync_client=True) as client:
        if client.api_healthcheck() is not None:
            raise RuntimeError(f"no Prefect server answers at PREFECT_API_URL={url}")
    return url


def ensure_work_pool(name: str) -> bool:
    """Create a process work pool unless the pool exists (of any type); True if created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
                )
            )
            return True


def genies_after_training(genies: GeniesConfig):
    """Runs the pipeline when a run of the self-improve deployment completes, with that
    run's config as ``training``. Only runs of the deployment count: the pipeline's own
    self-improve subflow has no deployment, so it cannot trigger itself."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="genies-after-self-improve",
        expect={"prefect.flow-run.Completed"},
        match_related=[
            {"prefect.resource.role": "flow", "prefect.resource.name": TRAINING},
            {"prefect.resource.role": "deployment", "prefect.resource.name": TRAINING},
        ],
        # a single {{ }} expression keeps its type: the training config arrives as a mapping
        parameters={
            "config": {"training": "{{ flow_run.parameters.config }}", "genies": genies.model_dump(mode="json")}
        },
    )


def zombie_detection():
    """The automation that marks a flow run Crashed when no heartbeat (and no final
    state) follows its last heartbeat within ZOMBIE_AFTER, one flow run at a time."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="Flow runs whose heartbeats stopped: their process died without reporting it.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=ZOMBIE_AFTER,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {ZOMBIE_AFTER.total_seconds():.0f} s: its process "
                "is gone; `alignflow resume` runs it again from its finished stages",
            )
        ],
    )


def ensure_zombie_detection() -> UUID:
    """Create the zombie-detection automation, or bring an existing one up to date."""
    from prefect.client.orchestration import get_client

    automation = zombie_detection()
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        if not existing:
            return client.create_automation(automation)
        client.update_automation(existing[0].id, automation)
        return existing[0].id


def build_deployments(configs: dict[str, Strict], cron: str | None = None) -> list:
    """One deployment per flow, named after it, with ``configs[name]`` (or the flow's
    default config) as its default parameters."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from alignflow.flows import FLOWS

    configs = {name: configs.get(name) or FLOW_CONFIGS[name]() for name in FLOWS}
    deployments = []
    for name, flow in FLOWS.items():
        extra = {}
        if name == "pipeline":
            extra = {
                "schedules": [Cron(cron or EXAMPLE_CRON, timezone="UTC", active=cron is not None)],
                "triggers": [genies_after_training(configs[name].genies)],
            }
        deployments.append(
            flow.to_deployment(
                name=name,
                parameters={"config": configs[name].model_dump(mode="json")},
                tags=["alignflow"],
                entrypoint_type=EntrypointType.MODULE_PATH,
                **extra,
            )
        )
    return deployments


def deploy(
    pool: str = WORK_POOL, configs: dict[str, Strict] | None = None, image: str | None = None, cron: str | None = None
) -> dict[str, UUID]:
    """Create or update every deployment on ``pool`` (a process pool, created if absent;
    docker and kubernetes pools must exist and need ``image``), and the zombie-detection
    automation. Returns name -> id."""
    ensure_work_pool(pool)
    ensure_zombie_detection()
    return {
        f"{d.flow_name}/{d.name}": d.apply(work_pool_name=pool, image=image)
        for d in build_deployments(configs or {}, cron)
    }
