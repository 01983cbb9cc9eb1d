"""The genies-eval flow end to end on the tiny model and real distributions, under
ephemeral Prefect: report files, the published layout they are written in, metrics
recomputed from that layout, the leaderboard CLI, caching, and bad input."""

from __future__ import annotations

import csv
import json
import textwrap
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from alignflow.config import GeniesConfig
from alignflow.genies.data import GeniesDataError
from alignflow.storage.artifacts import ArtifactStore

MODEL = "tiny-llama"  # the tiny model folder's name: the model's name in the published layout
SHIFTS = [
    {
        "source": "alpaca_short",
        "target": "alpaca_long",
        "target_reference": "alpaca_mmlu",
        "label": "extreme",
        "category": "spurious_cues",
    },
    {"source": "alpaca_mmlu", "target": "alpaca_short", "label": "extreme", "category": "length"},
]
INTERVENTIONS = ["zero_shot", "few_shot", "mass_mean_shift", "longest"]
GENIES_STAGES = {"genies_pairs", "genies_train", "genies_evaluate", "genies_report"}

# An external intervention in the public script contract: "prefer the longest response".
EVAL_PY = """
import argparse, json, os
p = argparse.ArgumentParser()
p.add_argument("--model_dir")
p.add_argument("--distribution_dirs", nargs="+")
p.add_argument("--output_paths", nargs="+")
a = p.parse_args()
assert os.path.isfile(os.path.join(a.model_dir, "trained.json"))
for folder, out in zip(a.distribution_dirs, a.output_paths):
    records = json.load(open(os.path.join(folder, "test.json")))
    def right(r):
        best = max(r["responses"], key=r["responses"].get)
        return all(len(best) > len(x) for x in r["responses"] if x != best)
    json.dump({"eval_accuracy": sum(map(right, records)) / len(records)}, open(out, "w"))
"""
TRAIN_PY = """
import argparse, json, os
p = argparse.ArgumentParser()
p.add_argument("--model_dir"); p.add_argument("--train_distribution"); p.add_argument("--output_dir")
a = p.parse_args()
os.makedirs(a.output_dir, exist_ok=True)
json.dump({"from": os.path.basename(a.train_distribution)}, open(os.path.join(a.output_dir, "trained.json"), "w"))
"""


def config_data(model_dir: Path, data_dir: Path, home: Path, spec: Path, scripts: Path, **overrides) -> dict:
    return {
        "model": str(model_dir),
        "data_dir": str(data_dir),
        "shifts": str(spec),
        "interventions": ["few_shot", "mass_mean_shift", "longest"],
        "external": {"longest": str(scripts)},
        "max_train_pairs": 6,
        "max_eval_pairs": 6,
        "paths": {"home": str(home)},
        "scoring": {"max_tokens": 128},
        "few_shot": {"k": 2},
        **overrides,
    }


TASK_RUNS = 28  # base_model + 5 pairs + 6 train + 15 evaluate + 1 report


def run_flow(config: GeniesConfig):
    """Run the flow; return (summary, Counter of (stage, final state name)). Task run states
    reach the API asynchronously, so read until every run of this flow has a final state."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from alignflow.flows.genies_eval import genies_eval

    state = genies_eval(config=config, return_state=True)
    summary = state.result()
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
            settled = len(runs) == TASK_RUNS and all(r.state is not None and r.state.is_final() for r in runs)
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert settled, [(r.name, r.state and r.state.name) for r in runs]
    return summary, Counter((r.name.rsplit("-", 1)[0], r.state.name) for r in runs)


class First:
    def __init__(self, data: dict, config: GeniesConfig, summary: dict, states: Counter):
        self.data, self.config, self.summary, self.states = data, config, summary, states
        self.report = Path(summary["report_dir"])
        self.store = ArtifactStore(config.paths.resolved().artifact_root)


@pytest.fixture(scope="module")
def first(tiny_model_dir, genies_data_dir, tmp_path_factory) -> First:
    home = tmp_path_factory.mktemp("genies-flow")
    spec = home / "shifts.json"
    spec.write_text(json.dumps(SHIFTS))
    scripts = home / "longest"
    scripts.mkdir()
    (scripts / "train.py").write_text(textwrap.dedent(TRAIN_PY))
    (scripts / "eval.py").write_text(textwrap.dedent(EVAL_PY))
    data = config_data(tiny_model_dir, genies_data_dir, home / "home", spec, scripts)
    config = GeniesConfig.model_validate(data)
    summary, states = run_flow(config)
    return First(data, config, summary, states)


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def accuracy_at(report: Path, intervention: str, source: str | None, target: str) -> float:
    folder = MODEL if source is None else f"{MODEL}-{source}"
    return json.loads((report / "evaluations" / intervention / folder / f"{target}.json").read_text())["eval_accuracy"]


def test_first_run_completes_every_stage(first):
    assert all(state == "Completed" for (_, state) in first.states), first.states
    counts = Counter(stage for stage, _ in first.states.elements())
    # pairs: train {alpaca_short, alpaca_mmlu} + test {alpaca_long, alpaca_short, alpaca_mmlu}
    # train: 3 trained interventions x 2 train distributions; evaluate: zero_shot 3 + 3 x 4 (S->T, S->S, R->R)
    assert {s: counts[s] for s in GENIES_STAGES} == {
        "genies_pairs": 5,
        "genies_train": 6,
        "genies_evaluate": 15,
        "genies_report": 1,
    }
    assert {k for k in first.summary["means"] if k.startswith("mean_de_")} == {f"mean_de_{n}" for n in INTERVENTIONS}
    assert first.summary["means"]["mean_de_zero_shot"] == 0.0  # zero-shot is its own baseline


def test_report_folder_holds_tables_figures_and_the_published_layout(first):
    report = first.report
    for name in ("metrics.csv", "metrics.parquet", "means.csv", "heatmap.png", "means.png", "report.md"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    assert (report / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evaluations = sorted(str(p.relative_to(report / "evaluations")) for p in (report / "evaluations").rglob("*.json"))
    expected = [
        f"zero_shot/{folder}/{d}.json"
        for d in ("alpaca_long", "alpaca_mmlu", "alpaca_short")
        for folder in (MODEL, f"{MODEL}-alpaca_short", f"{MODEL}-alpaca_mmlu")
    ]  # untrained: also per source
    for name in ("few_shot", "mass_mean_shift", "longest"):
        expected += [
            f"{name}/{MODEL}-alpaca_short/alpaca_long.json",
            f"{name}/{MODEL}-alpaca_short/alpaca_short.json",
            f"{name}/{MODEL}-alpaca_mmlu/alpaca_mmlu.json",
            f"{name}/{MODEL}-alpaca_mmlu/alpaca_short.json",
        ]
    assert evaluations == sorted(expected)
    capabilities = sorted(p.name for p in (report / "target_tuned_capability" / MODEL).iterdir())
    assert capabilities == ["alpaca_mmlu.json", "alpaca_short.json"]  # S1's reference, S2's target
    markdown = (report / "report.md").read_text()
    assert all(f"| {name} |" in markdown for name in INTERVENTIONS)
    assert "alpaca_short -> alpaca_long" in markdown


def test_metrics_recomputed_from_the_evaluation_files(first):
    report = first.report
    header, rows = read_csv(report / "metrics.csv")
    assert header[:8] == [
        "source",
        "target",
        "target_reference",
        "generalization_accuracy",
        "baseline_accuracy",
        "target_tuned_capability",
        "differential_elicitation",
        "source_ID_accuracy",
    ]
    assert {"intervention", "model", "category", "label", "elicitation", "brier", "ece"} <= set(header)
    assert len(rows) == len(INTERVENTIONS) * len(SHIFTS)
    for row in rows:
        name, shift = row["intervention"], next(s for s in SHIFTS if s["source"] == row["source"])
        reference = shift.get("target_reference", shift["target"])
        assert row["target_reference"] == reference and row["model"] == MODEL
        trained = name != "zero_shot"
        a = accuracy_at(report, name, shift["source"] if trained else None, shift["target"])
        a_iid = accuracy_at(report, name, shift["source"] if trained else None, shift["source"])
        a0 = accuracy_at(report, "zero_shot", None, shift["target"])
        capability = json.loads((report / "target_tuned_capability" / MODEL / f"{reference}.json").read_text())
        c = capability["best_intervention_accuracy"]
        # the ceiling: the best A(R -> R) over the interventions run
        on_reference = {
            n: accuracy_at(report, n, reference if n != "zero_shot" else None, reference) for n in INTERVENTIONS
        }
        assert c == max(on_reference.values()) and on_reference[capability["intervention"]] == c
        assert float(row["generalization_accuracy"]) == pytest.approx(a)
        assert float(row["source_ID_accuracy"]) == pytest.approx(a_iid)
        assert float(row["baseline_accuracy"]) == pytest.approx(a0)
        assert float(row["target_tuned_capability"]) == pytest.approx(c)
        assert c > 0
        assert float(row["differential_elicitation"]) == pytest.approx((a - a0) / c)
        assert float(row["elicitation"]) == pytest.approx(a / c)
        if name == "longest":  # accuracy-only results have no per-pair calibration
            assert row["brier"] == "nan" and row["ece"] == "nan"
        else:
            assert 0.0 <= float(row["brier"]) <= 1.0
    table = pq.read_table(report / "metrics.parquet").to_pylist()
    assert [(r["intervention"], r["source"]) for r in table] == [(r["intervention"], r["source"]) for r in rows]
    assert [r["differential_elicitation"] for r in table] == pytest.approx(
        [float(r["differential_elicitation"]) for r in rows]
    )


def test_metrics_cli_on_the_written_layout_matches_the_flow(first, tmp_path, capsys):
    from alignflow.cli import main

    report = first.report
    out = tmp_path / "few_shot.csv"
    assert (
        main(
            [
                "genies",
                "metrics",
                "--evaluations",
                str(report / "evaluations"),
                "--capabilities",
                str(report / "target_tuned_capability"),
                "--shifts",
                first.config.shifts,
                "--intervention",
                "few_shot",
                "--model",
                MODEL,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "2 shifts" in capsys.readouterr().out
    header, cli_rows = read_csv(out)
    _, flow_rows = read_csv(report / "metrics.csv")
    ours = [{k: r[k] for k in header} for r in flow_rows if r["intervention"] == "few_shot"]
    assert cli_rows == ours


def test_metrics_cli_reads_the_flows_zero_shot_rows(first, tmp_path):
    from alignflow.genies.metrics import published_rows
    from alignflow.genies.shifts import load_shifts

    report = first.report
    rows = published_rows(
        report / "evaluations", report / "target_tuned_capability", load_shifts(first.config.shifts), "zero_shot", MODEL
    )
    _, flow_rows = read_csv(report / "metrics.csv")
    zero = [r for r in flow_rows if r["intervention"] == "zero_shot"]
    assert [r["generalization_accuracy"] for r in rows] == pytest.approx(
        [float(r["generalization_accuracy"]) for r in zero]
    )


def test_second_run_is_served_from_cache(first):
    before = {m["uri"]: m["created_at"] for m in first.store.committed()}
    again, states = run_flow(first.config)
    assert again == first.summary
    genies_states = {state for (stage, state) in states if stage in GENIES_STAGES}
    assert genies_states == {"Cached"}, states
    assert {m["uri"]: m["created_at"] for m in first.store.committed()} == before  # no new artifacts


def test_a_named_ceiling_reruns_only_the_report(first):
    config = GeniesConfig.model_validate({**first.data, "ceiling": "few_shot"})
    summary, states = run_flow(config)
    assert {state for (stage, state) in states if stage in GENIES_STAGES - {"genies_report"}} == {"Cached"}
    assert states[("genies_report", "Completed")] == 1
    report = Path(summary["report_dir"])
    for reference in ("alpaca_mmlu", "alpaca_short"):
        capability = json.loads((report / "target_tuned_capability" / MODEL / f"{reference}.json").read_text())
        assert capability == {
            "best_intervention_accuracy": accuracy_at(report, "few_shot", reference, reference),
            "intervention": "few_shot",
        }
    assert "Ceiling: few_shot" in (report / "report.md").read_text()


def test_shift_naming_a_missing_distribution_is_a_clear_error(first, tmp_path):
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps([SHIFTS[0], {"source": "alpaca_short", "target": "alpaca_huge"}]))
    config = GeniesConfig.model_validate({**first.data, "shifts": str(spec)})
    from alignflow.flows.genies_eval import genies_eval

    with pytest.raises(GeniesDataError) as e:
        genies_eval(config=config)
    assert "shift alpaca_short->alpaca_huge: target 'alpaca_huge' is not a distribution" in str(e.value)
    assert "available: alpaca_long, alpaca_mmlu, alpaca_short, arc_easy" in str(e.value)


def test_ceiling_naming_an_intervention_not_run_is_an_error(first):
    from alignflow.flows.genies_eval import genies_eval

    config = GeniesConfig.model_validate({**first.data, "ceiling": "dpo"})
    with pytest.raises(
        ValueError,
        match="ceiling: 'dpo' is neither 'best' nor one of the interventions run "
        r"\(zero_shot, few_shot, mass_mean_shift, longest\)",
    ):
        genies_eval(config=config)


def test_unknown_intervention_is_an_error_before_any_work(first):
    from alignflow.flows.genies_eval import genies_eval

    config = GeniesConfig.model_validate({**first.data, "interventions": ["few_shot", "nope"]})
    with pytest.raises(ValueError, match=r"interventions: unknown \['nope'\]"):
        genies_eval(config=config)
