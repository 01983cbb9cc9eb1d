"""`alignflow genies download | metrics`."""

from __future__ import annotations

from pathlib import Path

from alignflow.config import alignflow_home
from alignflow.genies.data import RELEASE_URL, download, validate_release
from alignflow.genies.metrics import means, published_rows, write_csv
from alignflow.genies.shifts import load_shifts


def add_commands(sub) -> None:
    genies = sub.add_parser("genies", help="GENIES data and leaderboard tools")
    actions = genies.add_subparsers(dest="action", required=True)

    get = actions.add_parser("download", help="fetch, safely extract and validate the GENIES release")
    get.add_argument("--source", default=RELEASE_URL, help="URL (any fsspec URL), .tar/.tar.gz file or release folder")
    get.add_argument("--dest", help="folder to hold distributions/ (default: $ALIGNFLOW_HOME/genies)")
    get.set_defaults(handler=_download)

    metrics = actions.add_parser("metrics", help="the metrics table from results in the published layout")
    metrics.add_argument("--evaluations", required=True, help="evaluations/ folder")
    metrics.add_argument("--capabilities", required=True, help="target_tuned_capability/ folder")
    metrics.add_argument("--shifts", default="builtin:genies", help="shift spec JSON (default: the 15 GENIES shifts)")
    metrics.add_argument("--intervention", required=True)
    metrics.add_argument("--model", required=True, help="base model name as it appears in the folder names")
    metrics.add_argument("--out", required=True, help="CSV to write")
    metrics.set_defaults(handler=_metrics)


def _download(args) -> int:
    dest = Path(args.dest) if args.dest else alignflow_home() / "genies"
    download(args.source, dest)
    checked, bad = validate_release(dest)
    print(f"{dest / 'distributions'}: {checked} records checked, {len(bad)} bad")
    for record in bad:
        print(f"  bad: {record}")
    return 1 if bad else 0


def _metrics(args) -> int:
    rows = published_rows(
        Path(args.evaluations), Path(args.capabilities), load_shifts(args.shifts), args.intervention, args.model
    )
    write_csv(Path(args.out), rows)
    overall = next(m for m in means(rows) if m["category"] == "all")
    print(
        f"{args.out}: {len(rows)} shifts; mean differential elicitation {overall['differential_elicitation']:.4f}, "
        f"mean generalization accuracy {overall['generalization_accuracy']:.4f}"
    )
    return 0
