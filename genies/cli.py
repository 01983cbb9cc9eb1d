"""`alignflow genies download | metrics`."""

from __future__ import annotations

import argparse
from pathlib import Path

from alignflow.config import alignflow_home
from alignflow.genies.data import RELEASE_URL, download, validate_release
from alignflow.genies.metrics import (
    INTERVAL_COLUMNS,
    LEADERBOARD_COLUMNS,
    PUBLISHED_COLUMNS,
    leaderboard,
    means,
    results_rows,
    write_csv,
)
from alignflow.genies.shifts import load_shifts


def add_commands(sub) -> None:
    genies = sub.add_parser("genies", help="GENIES data and leaderboard tools")
    actions = genies.add_subparsers(dest="action", required=True)

    get = actions.add_parser("download", help="fetch, safely extract and validate the GENIES release")
    get.add_argument("--source", default=RELEASE_URL, help="URL (any fsspec URL), .tar/.tar.gz file or release folder")
    get.add_argument("--dest", help="folder to hold distributions/ (default: $ALIGNFLOW_HOME/genies)")
    get.set_defaults(handler=_download)

    metrics = actions.add_parser("metrics", help="one intervention's metrics table from a results tree")
    metrics.add_argument("--results", required=True, help="results/ folder (evaluations/, target_tuned_capability/)")
    metrics.add_argument(
        "--shifts", default="builtin:genies", help="shift spec JSON, e.g. GENIES.json or all.json (default: builtin)"
    )
    metrics.add_argument("--intervention", required=True, help="its folder name under evaluations/")
    metrics.add_argument("--model", required=True, help="base model name as it appears in the folder names")
    metrics.add_argument("--out", required=True, help="CSV to write (GENIES's columns, in its order)")
    metrics.set_defaults(handler=_metrics)

    board = actions.add_parser("leaderboard", help="mean metrics of every model and intervention of results trees")
    board.add_argument(
        "--results",
        required=True,
        action="append",
        metavar="NAME=DIR",
        help="a results tree and the name its rows carry in the 'source' column (repeat: published=..., ours=...)",
    )
    board.add_argument("--shifts", default="builtin:genies", help="shift spec JSON (default: the 15 GENIES shifts)")
    board.add_argument(
        "--bootstrap",
        type=replicate_count,
        default=1000,
        metavar="N",
        help="replicates for 95%% intervals of the mean DE and accuracy, resampling test pairs (0: none)",
    )
    board.add_argument("--out", required=True, help="CSV to write")
    board.set_defaults(handler=_leaderboard)


def replicate_count(text: str) -> int:
    """--bootstrap: a whole number of replicates, 0 for none."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of replicates (0: no intervals), got {text!r}")
    return int(text)


def _download(args) -> int:
    dest = Path(args.dest) if args.dest else alignflow_home() / "genies"
    download(args.source, dest)
    checked, bad = validate_release(dest)
    print(f"{dest / 'distributions'}: {checked} records checked, {len(bad)} bad")
    for record in bad:
        print(f"  bad: {record}")
    return 1 if bad else 0


def _metrics(args) -> int:
    rows = results_rows(Path(args.results), load_shifts(args.shifts, keep_repeats=True), args.intervention, args.model)
    write_csv(Path(args.out), rows, PUBLISHED_COLUMNS)
    overall = next(m for m in means(rows) if m["category"] == "all")
    print(
        f"{args.out}: {len(rows)} shifts; mean differential elicitation {overall['differential_elicitation']:.4f}, "
        f"mean generalization accuracy {overall['generalization_accuracy']:.4f}"
    )
    return 0


def _leaderboard(args) -> int:
    trees = {}
    for entry in args.results:
        name, sep, folder = entry.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--results {entry}: expected NAME=DIR, e.g. published=GENIES/results")
        trees[name] = Path(folder)
    rows, skipped = leaderboard(trees, load_shifts(args.shifts), args.bootstrap)
    write_csv(Path(args.out), rows, LEADERBOARD_COLUMNS + (INTERVAL_COLUMNS if args.bootstrap else []))
    print(f"{args.out}: {len(rows)} rows (model x intervention) from {', '.join(trees)}")
    for reason in skipped:
        print(f"  left out (incomplete) {reason}")
    return 0
