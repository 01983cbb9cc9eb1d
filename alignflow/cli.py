"""The `alignflow` command: run flows, inspect artifacts."""
from __future__ import annotations

import argparse
import json
import sys

from alignflow.config import FLOW_CONFIGS, ConfigError, Paths, load_config


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return args.handler(args)
    except (ConfigError, ValueError, LookupError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Overrides may come before or after options: `run FLOW --config X key=value` works."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "overrides", None) is not None and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _one_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignflow", description="Alignment pipelines as cached Prefect flows")
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

    from genies.cli import add_commands

    add_commands(sub)
    return p


def _run(args) -> int:
    config = load_config(FLOW_CONFIGS[args.flow], args.config, args.overrides)
    if args.home:
        config = config.model_copy(update={"paths": config.paths.model_copy(update={"home": args.home})})
    paths = config.paths.resolved()
    from alignflow.runtime import configure_environment

    log_file = configure_environment(paths)
    from flows import FLOWS, SUMMARIES

    summary = FLOWS[args.flow](config=config)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(SUMMARIES[args.flow](summary))
        print(f"log: {log_file}")
    return 0


def _store(root: str | None):
    from storage.artifacts import ArtifactStore

    return ArtifactStore(root or Paths().resolved().artifact_root)


def _artifacts_ls(args) -> int:
    manifests = _store(args.root).list()
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


def _short(value, limit: int = 80):
    if isinstance(value, list) and len(value) > 8:
        return value[:8] + [f"... {len(value)} items"]
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value


if __name__ == "__main__":
    sys.exit(main())
