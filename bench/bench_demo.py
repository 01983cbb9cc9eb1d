"""Benchmark the demo self-improve flow: per-stage wall time and tokens/s, and the
orchestration overhead, against the same stage functions run as a plain script
without Prefect (issues 2 and 7).

    python bench/bench_demo.py [--config configs/demo.yaml] [--home DIR] [--model-cache DIR]
                               [--out bench/out/demo.json] [--keep] [key=value ...]

What it does
  1. Resolves the config (YAML + ``key=value`` overrides, exactly as ``alignflow run``).
  2. Points ALIGNFLOW_HOME at a fresh temporary directory (artifacts, Prefect home,
     results, logs), unless ``--home`` names one to reuse, and calls
     ``alignflow.runtime.configure_environment`` BEFORE anything that imports Prefect
     is imported (the same order as ``alignflow/cli.py``).
  3. Setup, timed on its own: resolves the policy (and judge) model the way the flow's
     ``base_model`` task does. With a fresh model cache this converts the built-in
     SmolLM2 GGUF to safetensors (a minute or more); it has no artifact manifest, so it
     is reported as 'setup' and kept OUT of the flow wall time and the overhead ratio.
     Inside the flow the base_model task then finds the converted model.
  4. Runs the flow once cold (``time.perf_counter`` around the flow call), then once
     more: every stage is already committed, so the re-run is all cache hits. Then
     the same stages as a plain script (``benchlib.run_plain``: each stage's function
     called directly, no Prefect task runs) into a fresh artifact root. It runs last,
     so warm-up costs (first forward passes, page cache) favour the plain script.
  5. Reads each stage artifact's manifest metrics (``seconds`` is recorded by
     ``Stage.run`` around the stage's own compute, excluding the commit) and prints
     per-stage seconds and tokens/s, sum of stage seconds, flow wall time,
     overhead = wall / sum(stage seconds), and the cached re-run time and its ratio to
     the cold run, and the flow's wall time over the plain script's (the overhead
     the issue asks for; the artifact keys of both must match). The same numbers go
     to ``bench/out/demo.json`` (gitignored).

The model cache
  The converted SmolLM2 model lives under ``HOME/models``. A fresh temporary home has
  none, so the first run would convert it again. ``--model-cache DIR`` points at an
  existing converted cache instead (default: ``$ALIGNFLOW_HOME/models`` when
  ALIGNFLOW_HOME is set, otherwise the temporary home's own ``models`` folder, i.e. a
  conversion). The model cache is only read from when the model is already there.

Caveats (both are checked and reported in the output and the JSON)
  * Stage keys hash the project's source files as they are on disk, so editing the
    source while the benchmark runs makes the "cached" re-run recompute stages.
    Benchmark a tree nobody is editing (or a copy of it).
  * Timings on a shared machine include other processes' load; the script records the
    CPU seconds other processes used during the run.

Examples
  python bench/bench_demo.py --model-cache /tmp/afhome/models
  python bench/bench_demo.py --model-cache /tmp/afhome/models limit_prompts=8   # quick check
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alignflow.config import ConfigError, SelfImproveConfig, load_config  # noqa: E402  (no Prefect import)

TOKEN_METRICS = ("generated_tokens", "prompt_tokens", "tokens")
SOURCE_DIRS = ("alignflow", "flows", "tasks", "storage", "workers")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config", default=str(ROOT / "configs" / "demo.yaml"), help="YAML config (default: configs/demo.yaml)"
    )
    p.add_argument(
        "--home",
        help="reuse this ALIGNFLOW_HOME instead of a fresh temporary one "
        "(its committed artifacts make the 'cold' run partly cached)",
    )
    p.add_argument(
        "--model-cache",
        default=None,
        help="existing converted model cache to read the model from "
        "(default: $ALIGNFLOW_HOME/models if ALIGNFLOW_HOME is set, else HOME/models)",
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "demo.json"), help="JSON output path")
    p.add_argument("--keep", action="store_true", help="keep the temporary home (default: removed at the end)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. limit_prompts=8")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config: SelfImproveConfig = load_config(SelfImproveConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    model_cache = args.model_cache
    if model_cache is None and os.environ.get("ALIGNFLOW_HOME"):
        model_cache = str(Path(os.environ["ALIGNFLOW_HOME"]).expanduser() / "models")
    temp_home = None
    if args.home:
        home = Path(args.home).expanduser().resolve()
    else:
        temp_home = home = Path(tempfile.mkdtemp(prefix="alignflow-bench-"))
    os.environ["ALIGNFLOW_HOME"] = str(home)
    path_update = {"home": str(home)}
    if model_cache:
        path_update["model_cache"] = str(Path(model_cache).expanduser().resolve())
    config = config.model_copy(update={"paths": config.paths.model_copy(update=path_update)})
    paths = config.paths.resolved()

    # Prefect reads its settings at import: configure the environment first (as alignflow/cli.py).
    from alignflow.runtime import configure_environment

    log_file = configure_environment(paths)
    t0 = time.perf_counter()
    from alignflow.flows.self_improve import self_improve
    from alignflow.storage.artifacts import ArtifactStore
    from alignflow.tasks.base_model import base_model_ref
    from alignflow.workers.models import BUILTIN_MODELS, FINGERPRINT

    import_s = time.perf_counter() - t0
    source_before = source_fingerprint()
    load_before = load_average()
    cpu_before = cpu_counters()

    print(f"home:        {home}{'  (temporary)' if temp_home else ''}")
    print(f"model cache: {paths.model_cache}")
    print(f"config:      {args.config} {' '.join(args.overrides)}".rstrip())
    print(f"log:         {log_file}")
    print(f"imports (prefect, torch, transformers, flows): {import_s:.1f}s (not timed as flow)")

    # -- setup: model conversion / content hash, outside the timed flow ------------------
    setup = []
    judge_model = config.judge.model if config.judge.model not in ("initial", "policy") else None  # roles, not models
    for name in dict.fromkeys(m for m in (config.model, judge_model) if m):
        converts = name in BUILTIN_MODELS and not (Path(paths.model_cache) / name / FINGERPRINT).exists()
        t = time.perf_counter()
        base_model_ref(name, paths.model_cache)
        setup.append({"model": name, "converted": converts, "seconds": round(time.perf_counter() - t, 3)})
    for s in setup:
        what = "converted GGUF -> safetensors" if s["converted"] else "already in the model cache"
        print(f"setup:       {s['model']}: {what}, {s['seconds']:.1f}s (excluded from flow wall and overhead)")

    # -- cold run -------------------------------------------------------------------------
    store = ArtifactStore(paths.artifact_root, config.storage.options())
    started_at = dt.datetime.now(dt.UTC)
    print("\ncold run ...", flush=True)
    cold_wall, summary, cold_prefect = timed_flow_run(self_improve, config)

    # -- cached re-run ------------------------------------------------------------------
    print("cached re-run ...", flush=True)
    cached_wall, summary2, cached_prefect = timed_flow_run(self_improve, config)
    recomputed = [a for a, b in zip(uris(summary), uris(summary2)) if a != b]
    if recomputed:
        print(
            f"warning: the re-run recomputed {len(recomputed)} artifact(s) (different keys): "
            f"{', '.join(u.rsplit('/', 2)[-2] for u in recomputed)}",
            file=sys.stderr,
        )
    print("plain script (the same stage functions, no Prefect) ...", flush=True)
    from benchlib import run_plain, timed

    plain_root = home / "plain-artifacts"
    plain_summary, plain_wall = timed(lambda: run_plain(with_artifact_root(config, plain_root)))
    plain_keys_match = [artifact_id(u) for u in uris(plain_summary)] == [artifact_id(u) for u in uris(summary)]
    if not plain_keys_match:
        print("warning: the plain script's artifact keys differ from the flow's", file=sys.stderr)
    source_changed = source_fingerprint() != source_before
    if source_changed:
        print(
            "warning: the project's source changed on disk during the benchmark; stage keys hash the "
            "source, so a changed file makes the re-run recompute",
            file=sys.stderr,
        )

    stages = stage_rows(store, summary, started_at)
    computed = [s for s in stages if s["computed_in_cold_run"]]
    stage_sum = sum(s["seconds"] or 0.0 for s in computed)
    flow_run_s = cold_prefect.get("flow_run_seconds")
    task_sum = sum(t["seconds"] or 0.0 for t in cold_prefect.get("task_runs", []))
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "config": {"file": args.config, "overrides": args.overrides, "resolved": config.model_dump(mode="json")},
        "home": str(home),
        "temporary_home": temp_home is not None,
        "model_cache": paths.model_cache,
        "import_seconds": round(import_s, 3),
        "setup": setup,
        "stages": stages,
        "sum_stage_seconds": round(stage_sum, 3),
        "cold_flow_wall_seconds": round(cold_wall, 3),
        "overhead_seconds": round(cold_wall - stage_sum, 3),
        "overhead_ratio": round(cold_wall / stage_sum, 3) if stage_sum else None,
        "cached_rerun_wall_seconds": round(cached_wall, 3),
        "cached_over_cold": round(cached_wall / cold_wall, 4),
        "plain_script_wall_seconds": round(plain_wall, 3),
        "flow_over_plain_script": round(cold_wall / plain_wall, 3),
        "plain_script_keys_match_flow": plain_keys_match,
        "overhead_breakdown": {
            "before_flow_run_seconds": round(cold_wall - flow_run_s, 3) if flow_run_s else None,
            "flow_run_minus_task_runs_seconds": round(flow_run_s - task_sum, 3) if flow_run_s else None,
            "task_runs_minus_stage_seconds": round(task_sum - stage_sum, 3) if flow_run_s else None,
        },
        "rerun_recomputed": [u.rsplit("/", 2)[-2] for u in recomputed],
        "prefect": {"cold": cold_prefect, "cached": cached_prefect},
        "source": {**git_state(), "fingerprint_start": source_before, "changed_during_run": source_changed},
        "load_average": {"start": load_before, "end": load_average()},
        "cpu_contention": cpu_contention(cpu_before, cpu_counters(), cold_wall + cached_wall),
        "notes": [
            "stage seconds = Stage.run's perf_counter around the stage's compute (manifest metrics.seconds); "
            "it excludes the artifact commit, Prefect task/result handling and cache-key hashing",
            "overhead_ratio = cold flow wall time / sum of stage seconds of stages computed in the cold run",
            "setup (model conversion + content hash) runs before the timed flow call and is excluded",
            "the cold flow wall time includes Prefect's ephemeral API server start (first flow call in the process)",
            "overhead_breakdown: wall - Prefect flow-run duration (engine/server start before the run), "
            "flow run - sum of task runs (flow body, summary, gaps), task runs - stage seconds "
            "(commit, result persistence, cache keys, report artifacts)",
        ],
    }
    print_report(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\njson: {out}")
    if temp_home and not args.keep:
        shutil.rmtree(temp_home, ignore_errors=True)
    elif temp_home:
        print(f"kept: {temp_home}")
    return 0


def timed_flow_run(flow_fn, config) -> tuple[float, dict, dict]:
    """(wall seconds, flow summary, Prefect's own flow/task timings) of one flow call."""
    t = time.perf_counter()
    state = flow_fn(config=config, return_state=True)
    wall = time.perf_counter() - t
    return wall, state.result(), prefect_times(state)


def with_artifact_root(config, root: Path):
    return config.model_copy(update={"paths": config.paths.model_copy(update={"artifact_root": str(root)})})


def artifact_id(uri: str) -> str:
    """stage/key of an artifact URI, whatever its root."""
    return "/".join(uri.rstrip("/").split("/")[-2:])


def uris(summary: dict) -> list[str]:
    return [summary["prompts"]["uri"]] + [info["uri"] for rnd in summary["rounds"] for info in rnd.values()]


def stage_rows(store, summary: dict, started_at: dt.datetime) -> list[dict]:
    """One row per stage artifact of the run, from its manifest (the summary has only headline metrics)."""
    refs = [("prompts", 0, summary["prompts"]["uri"])]
    for k, rnd in enumerate(summary["rounds"], start=1):
        refs += [(stage, k, info["uri"]) for stage, info in rnd.items()]
    rows = []
    for stage, rnd, uri in refs:
        stage_dir, key = uri.rstrip("/").split("/")[-2:]
        manifest = store.manifest(stage_dir, key)
        m = manifest["metrics"]
        seconds = m.get("seconds")
        tokens = next((m[n] for n in TOKEN_METRICS if m.get(n) is not None), None)
        token_kind = next((n for n in TOKEN_METRICS if m.get(n) is not None), None)
        created = dt.datetime.fromisoformat(manifest["created_at"])
        rows.append(
            {
                "stage": stage,
                "round": rnd,
                "key": key,
                "rows": manifest["rows"],
                "seconds": seconds,
                "tokens_per_s": m.get("tokens_per_s"),  # the stage's own figure (its generation/forward loop only)
                "token_kind": token_kind,
                "tokens": tokens,
                "tokens_per_stage_s": round(tokens / seconds, 1) if tokens and seconds else None,  # incl. model load
                "computed_in_cold_run": created >= started_at,
                "metrics": m,
            }
        )
    return rows


def source_fingerprint() -> str:
    """Hash of the project's Python source: stage keys include it, so edits during a run change keys."""
    digest = hashlib.sha256()
    for d in SOURCE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            digest.update(path.relative_to(ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def git_state() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "modified": [line[3:] for line in git("status", "--porcelain").splitlines() if line],
        "fingerprint": source_fingerprint(),
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_counters() -> dict:
    """Machine-wide busy CPU seconds (/proc/stat) and this process's own CPU seconds."""
    import resource

    own = sum(
        getattr(resource.getrusage(w), f)
        for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        busy = None
    return {"machine_busy_s": busy, "own_cpu_s": own, "t": time.perf_counter()}


def cpu_contention(before: dict, after: dict, _timed_s: float) -> dict | None:
    """CPU seconds other processes used while the benchmark ran (a contention check, approximate:
    Prefect's server subprocess counts as 'other')."""
    if before["machine_busy_s"] is None or after["machine_busy_s"] is None:
        return None
    elapsed = after["t"] - before["t"]
    busy = after["machine_busy_s"] - before["machine_busy_s"]
    own = after["own_cpu_s"] - before["own_cpu_s"]
    return {
        "elapsed_s": round(elapsed, 1),
        "machine_busy_cpu_s": round(busy, 1),
        "own_cpu_s": round(own, 1),
        "other_cpu_s": round(busy - own, 1),
        "other_cpu_share_of_capacity": round((busy - own) / (elapsed * (os.cpu_count() or 1)), 3),
    }


def prefect_times(state) -> dict:
    """The flow run's and its task runs' durations as Prefect recorded them (best effort)."""
    try:
        from prefect import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(run_id)
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        return {
            "flow_run_seconds": _span(flow_run.start_time, flow_run.end_time),
            "task_runs": sorted(
                (
                    {"name": tr.name, "state": tr.state_name, "seconds": _span(tr.start_time, tr.end_time)}
                    for tr in task_runs
                ),
                key=lambda r: r["name"],
            ),
        }
    except Exception as e:  # the benchmark numbers do not depend on this
        return {"error": f"{type(e).__name__}: {e}"}


def _span(start, end) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return info


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_report(r: dict) -> None:
    print("\n| stage | rows | seconds | tokens/s (stage metric) | tokens / stage-second |")
    print("|---|---:|---:|---:|---:|")
    for s in r["stages"]:
        name = s["stage"] if s["round"] <= 1 else f"{s['stage']} (round {s['round']})"
        if not s["computed_in_cold_run"]:
            name += " [pre-existing, cached]"
        print(
            f"| {name} | {s['rows']} | {_fmt(s['seconds'], '.2f')} | {_fmt(s['tokens_per_s'], '.1f')} "
            f"| {_fmt(s['tokens_per_stage_s'], '.1f')} |"
        )
    print(f"\nsum of stage seconds:      {r['sum_stage_seconds']:.2f}s")
    print(f"cold flow wall time:       {r['cold_flow_wall_seconds']:.2f}s")
    print(
        f"orchestration overhead:    {r['overhead_seconds']:.2f}s; "
        f"ratio wall / sum(stages) = {_fmt(r['overhead_ratio'], '.3f')}"
    )
    print(
        f"cached re-run wall time:   {r['cached_rerun_wall_seconds']:.2f}s "
        f"({100 * r['cached_over_cold']:.2f}% of the cold run)"
    )
    print(
        f"plain script wall time:    {r['plain_script_wall_seconds']:.2f}s (same stages, no Prefect; "
        f"keys match the flow's: {r['plain_script_keys_match_flow']})"
    )
    print(f"flow / plain script:       {r['flow_over_plain_script']:.3f}")
    b = r["overhead_breakdown"]
    if b["before_flow_run_seconds"] is not None:
        print(
            f"  of which: before the Prefect flow run starts {b['before_flow_run_seconds']:.2f}s, "
            f"flow body outside tasks {b['flow_run_minus_task_runs_seconds']:.2f}s, "
            f"task runs beyond stage compute {b['task_runs_minus_stage_seconds']:.2f}s"
        )
    for s in r["setup"]:
        print(
            f"setup (excluded):          {s['model']}: {s['seconds']:.2f}s "
            f"({'converted' if s['converted'] else 'cached, no conversion'})"
        )
    for label in ("cold", "cached"):
        p = r["prefect"][label]
        if "flow_run_seconds" in p:
            tasks = ", ".join(f"{t['name']}={_fmt(t['seconds'], '.2f')}s/{t['state']}" for t in p["task_runs"])
            print(f"prefect {label}: flow run {_fmt(p['flow_run_seconds'], '.2f')}s; tasks: {tasks}")
    print(f"load average start/end: {r['load_average']['start']} / {r['load_average']['end']}")
    c = r["cpu_contention"]
    if c:
        print(
            f"cpu: this process {c['own_cpu_s']:.0f} cpu-s, other processes {c['other_cpu_s']:.0f} cpu-s "
            f"({100 * c['other_cpu_share_of_capacity']:.1f}% of the machine's capacity over {c['elapsed_s']:.0f}s)"
        )
    if r["rerun_recomputed"]:
        print(
            f"warning: the re-run was not all-cached; recomputed: {', '.join(r['rerun_recomputed'])}"
            + (" (the source changed during the run)" if r["source"]["changed_during_run"] else "")
        )
    if any(not s["computed_in_cold_run"] for s in r["stages"]):
        print(
            "note: some artifacts pre-existed in --home; they are excluded from the stage sum, "
            "so the overhead ratio is not a clean cold measurement"
        )
    print(
        "note: stage seconds exclude the artifact commit; setup (model conversion) is excluded from wall and overhead; "
        "the cold wall includes Prefect's ephemeral server start"
    )


if __name__ == "__main__":
    sys.exit(main())
