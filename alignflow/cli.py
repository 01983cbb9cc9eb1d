"""The `alignflow` command: run flows, inspect artifacts."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from alignflow.config import FLOW_CONFIGS, ConfigError, Paths, load_config, with_home


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return args.handler(args)
    except (ConfigError, ValueError, LookupError, FileNotFoundError, RuntimeError) as e:
        if args.traceback:
            traceback.print_exc()
        else:
            print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Overrides may come before or after options: `run FLOW --config X key=value` works."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if (
        extra
        and getattr(args, "overrides", None) is not None
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _one_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignflow", description="Alignment pipelines as cached Prefect flows")
    p.add_argument(
        "--traceback", action="store_true", help="on an error, print the full traceback instead of the one-line message"
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a flow")
    run.add_argument("flow", choices=sorted(FLOW_CONFIGS))
    run.add_argument("--config", help="YAML config file")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. judge.mode=base")
    run.add_argument("--home", help="override $ALIGNFLOW_HOME for this run")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.set_defaults(handler=_run)

    art = sub.add_parser("artifacts", help="list or show committed artifacts")
    art_sub = art.add_subparsers(dest="action", required=True)
    ls = art_sub.add_parser("ls")
    ls.add_argument("--root", help="artifact root (default: $ALIGNFLOW_HOME/artifacts)")
    ls.set_defaults(handler=_artifacts_ls)
    show = art_sub.add_parser("show")
    show.add_argument("key", help="an artifact key or a unique prefix of one")
    show.add_argument("--root")
    show.add_argument("--rows", type=int, default=5)
    show.set_defaults(handler=_artifacts_show)
    progress = art_sub.add_parser("progress", help="sharded stages still running (or stopped): shards written so far")
    progress.add_argument("--root")
    progress.set_defaults(handler=_artifacts_progress)

    from alignflow.deployments.deploy import WORK_POOL

    deploy = sub.add_parser("deploy", help="create or update the Prefect deployments (needs PREFECT_API_URL)")
    deploy.add_argument("--pool", default=WORK_POOL, help="work pool; a process pool is created if absent")
    deploy.add_argument("--image", help="image for docker or kubernetes work pools")
    deploy.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FLOW=FILE",
        help="a flow's default parameters from a config file (repeatable)",
    )
    deploy.add_argument("--cron", help="run the pipeline on this cron schedule, UTC (default: a paused weekly example)")
    deploy.set_defaults(handler=_deploy)

    worker = sub.add_parser("worker", help="start a Prefect worker that runs the deployments' flow runs")
    worker.add_argument("--pool", default=WORK_POOL)
    worker.add_argument("--limit", type=int, default=1, help="flow runs at once (each stage already uses the machine)")
    worker.set_defaults(handler=_worker)

    resume = sub.add_parser(
        "resume", help="run a finished, failed or crashed flow run again; finished stages come from cache"
    )
    resume.add_argument("run_id", help="the flow run's id")
    resume.add_argument("--home", help="override $ALIGNFLOW_HOME (where a run without a deployment ran)")
    resume.add_argument(
        "--force",
        action="store_true",
        help="resume a run left Running or Pending even where this host cannot tell that its "
        "process is gone (it is marked Crashed first)",
    )
    resume.set_defaults(handler=_resume)

    from alignflow.genies.cli import add_commands

    add_commands(sub)
    return p


def _run(args) -> int:
    config = load_config(FLOW_CONFIGS[args.flow], args.config, args.overrides)
    if args.home:
        config = with_home(config, args.home)
    paths = config.paths.resolved()
    from alignflow.runtime import configure_environment

    log_file = configure_environment(paths)
    from alignflow.preflight import preflight

    preflight(args.flow, config)  # bad input fails here, in one line, before a flow run exists
    from prefect.flow_engine import run_flow

    from alignflow.flows import FLOWS, SUMMARIES

    flow, parameters = FLOWS[args.flow], {"config": config}
    run = _start_flow_run(flow, parameters, paths.home)
    summary = run_flow(flow=flow, flow_run=run, parameters=parameters)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(SUMMARIES[args.flow](summary))
        print(f"log: {log_file}")
    return 0


def _start_flow_run(flow, parameters: dict, home: str):
    """Create the flow run before it starts, so its id can be shown (on stderr: --json
    keeps stdout for the summary) and the process running it recorded in Prefect."""
    from prefect.client.orchestration import get_client
    from prefect.states import Pending

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(flow, parameters=flow.serialize_parameters(parameters), state=Pending())
        _record_this_process(client, run.id)
    print(
        f"flow run {run.id} ({run.name}): resume with alignflow resume {run.id} --home {os.path.abspath(home)}",
        file=sys.stderr,
        flush=True,
    )
    return run


def _record_this_process(client, run_id) -> None:
    """The flow run's infrastructure_pid is this process (HOST:PID:START): `alignflow resume`
    on this host can then tell whether a run left Running has lost its process."""
    from alignflow.liveness import this_process

    client.update_flow_run(run_id, infrastructure_pid=this_process())


def _deploy(args) -> int:
    from alignflow.deployments.deploy import deploy, require_server

    require_server()
    configs = {}
    for item in args.config:
        name, _, path = item.partition("=")
        if name not in FLOW_CONFIGS or not path:
            raise ConfigError(f"--config {item}: expected FLOW=FILE with FLOW one of {', '.join(sorted(FLOW_CONFIGS))}")
        configs[name] = load_config(FLOW_CONFIGS[name], path)
    for name, deployment_id in deploy(args.pool, configs, args.image, args.cron).items():
        print(f"{name}: {deployment_id}")
    print(f"start a worker: alignflow worker --pool {args.pool}")
    return 0


def _worker(args) -> int:
    """`prefect worker start` in this process: its flow runs import the installed alignflow,
    inherit heartbeats and the alignflow logger's shipping to Prefect from its environment."""
    from alignflow.deployments.deploy import require_server
    from alignflow.runtime import flow_run_environment

    require_server()
    flow_run_environment()
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", args.pool, "--limit", str(args.limit)]
    os.execv(sys.executable, command)


def _resume(args) -> int:
    """The same flow run, scheduled again (what `prefect flow-run retry` does). Each stage's
    cache key is its artifact key, so finished stages come back Cached and only the
    failed one and those after it run. A run left Running or Pending by a process that
    died is marked Crashed first. A deployment's run goes to its pool's worker; any
    other run runs here."""
    from uuid import UUID

    try:
        run_id = UUID(args.run_id)
    except ValueError:
        raise ValueError(f"flow run id '{args.run_id}': not a UUID") from None
    from alignflow.runtime import configure_environment

    configure_environment(Paths(home=args.home).resolved())
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    with get_client(sync_client=True) as client:
        run = _read_flow_run(client, run_id)
        if not run.state or not run.state.is_final():
            _crash_abandoned_run(client, run, args.force)
        flow = None if run.deployment_id else _registered_flow(client.read_flow(run.flow_id).name)
        client.set_flow_run_state(run.id, Scheduled(message="resumed by alignflow resume"), force=True)
        if flow is None:
            print(f"flow run {run.name} ({run.id}) scheduled again: a worker on its deployment's pool runs it")
            return 0
        _record_this_process(client, run.id)
        run = client.read_flow_run(run.id)
    return _run_here(flow, run)


def _read_flow_run(client, run_id):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_flow_run(run_id)
    except ObjectNotFound:
        raise LookupError(f"flow run {run_id}: not found at the Prefect API {client.api_url}") from None


def _crash_abandoned_run(client, run, force: bool) -> None:
    """Mark a run that is not final Crashed, with its unfinished task runs, where its
    recorded process is gone (or with ``force``); refuse where it may still run."""
    from prefect.states import Crashed

    from alignflow.liveness import process_gone

    state = run.state.name if run.state else "not started"
    recorded = run.infrastructure_pid or "none recorded"
    gone = process_gone(run.infrastructure_pid)
    if gone is False and not force:
        raise RuntimeError(
            f"flow run {run.id} is {state} and its process ({recorded}) still runs: let it finish or stop it first"
        )
    if gone is None and not force:
        raise RuntimeError(
            f"flow run {run.id} is {state} and this host cannot tell whether its process "
            f"({recorded}) still runs: if it is gone, resume with --force"
        )
    why = "its process is gone" if gone else "alignflow resume --force"
    message = f"marked Crashed by alignflow resume: {why} (process {recorded})"
    for task_run in _unfinished_task_runs(client, run.id):
        client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
    client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    print(f"flow run {run.name} ({run.id}) was {state}: {message}", file=sys.stderr)


def _unfinished_task_runs(client, run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return [r for r in runs if not (r.state and r.state.is_final())]


def _registered_flow(name: str):
    from alignflow.flows import FLOWS

    if name not in FLOWS:
        raise LookupError(f"flow '{name}' is not one of alignflow's: {', '.join(FLOWS)}")
    return FLOWS[name]


def _run_here(flow, run) -> int:
    from prefect.flow_engine import run_flow

    from alignflow.flows import SUMMARIES

    state = run_flow(flow=flow, flow_run=run, parameters=flow.validate_parameters(run.parameters), return_type="state")
    if not state.is_completed():
        raise RuntimeError(f"flow run {run.id} ended {state.name}: {state.message}")
    print(SUMMARIES[flow.name](state.result()))
    return 0


def _store(root: str | None):
    from alignflow.storage.artifacts import ArtifactStore

    return ArtifactStore(root or Paths().resolved().artifact_root)


def _artifacts_ls(args) -> int:
    manifests = _store(args.root).committed()
    print(f"{'stage':<12} {'key':<22} {'rows':>6}  created")
    for m in manifests:
        print(f"{m['stage']:<12} {m['key']:<22} {m['rows']:>6}  {m['created_at'][:19]}")
    return 0


def _artifacts_show(args) -> int:
    store = _store(args.root)
    ref = store.find(args.key)
    manifest = store.manifest(ref.stage, ref.key)
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"} | {"files": len(manifest["files"])}, indent=1))
    if manifest["parts"]:
        for row in store.read_table(ref).slice(0, args.rows).to_pylist():
            print(json.dumps({k: _short(v) for k, v in row.items()}, ensure_ascii=False))
    return 0


def _artifacts_progress(args) -> int:
    running = _store(args.root).in_progress()
    if not running:
        print("no sharded stage is in progress (every started one is committed)")
    for p in running:
        print(
            f"{p['stage']:<12} {p['key']:<22} {p['shards_done']}/{p['shards']} shards  "
            f"{p['work_done']}/{p['work']} {p['unit']}"
        )
    return 0


def _short(value, limit: int = 80):
    if isinstance(value, list) and len(value) > 8:
        return value[:8] + [f"... {len(value)} items"]
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value


if __name__ == "__main__":
    sys.exit(main())
