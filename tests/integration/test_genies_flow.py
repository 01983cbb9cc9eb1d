"""The genies-eval flow end to end on the tiny model and real distributions, under
ephemeral Prefect: report files, GENIES's results tree they are written in and its
export, metrics tables recomputed from that tree, the metrics and leaderboard CLIs,
caching, and bad input."""

from __future__ import annotations

import csv
import json
import math
import re
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
INTERVENTIONS = ["zero_shot", "few_shot", "longest"]
GENIES_STAGES = {"genies_pairs", "genies_train", "genies_evaluate", "genies_report"}

# An external intervention in GENIES's script contract (fire, literal lists): "prefer the longest response".
EVAL_PY = """
import json, os, fire

def main(model_dir, distribution_dirs, output_paths):
    assert os.path.isfile(os.path.join(model_dir, "trained.json"))
    for folder, out in zip(distribution_dirs, output_paths):
        records = json.load(open(os.path.join(folder, "test.json")))
        def right(r):
            best = max(r["responses"], key=r["responses"].get)
            return all(len(best) > len(x) for x in r["responses"] if x != best)
        json.dump({"eval_accuracy": sum(map(right, records)) / len(records)}, open(out, "w"))

fire.Fire(main)
"""
TRAIN_PY = """
import json, os, fire

def main(model_dir, output_dir, training_distribution_dir, test_distribution_dirs):
    os.makedirs(output_dir, exist_ok=True)
    trained = {"from": os.path.basename(training_distribution_dir)}
    json.dump(trained, open(os.path.join(output_dir, "trained.json"), "w"))

fire.Fire(main)
"""


def config_data(model_dir: Path, data_dir: Path, home: Path, spec: Path, scripts: Path, **overrides) -> dict:
    return {
        "model": str(model_dir),
        "data_dir": str(data_dir),
        "shifts": str(spec),
        "interventions": ["few_shot", "longest"],
        "external": {"longest": str(scripts)},
        "max_train_pairs": 6,
        "max_eval_pairs": 6,
        "paths": {"home": str(home)},
        "results_dir": str(home / "results"),
        "scoring": {"max_tokens": 512},  # the tiny BPE spends many tokens per word
        "few_shot": {"k": 2},
        **overrides,
    }


TASK_RUNS = 24  # base_model + 7 pairs + 4 train + 11 evaluate + 1 report


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


def evaluation(results: Path, intervention: str, source: str, target: str) -> dict:
    return json.loads((results / "evaluations" / intervention / f"{MODEL}-{source}" / f"{target}.json").read_text())


def test_first_run_completes_every_stage(first):
    assert all(state == "Completed" for (_, state) in first.states), first.states
    counts = Counter(stage for stage, _ in first.states.elements())
    # pairs: capped train {alpaca_short, alpaca_mmlu}, whole train splits for few-shot's examples,
    # test {alpaca_long, alpaca_short, alpaca_mmlu}; train: 2 trained interventions x 2 train distributions;
    # evaluate: zero_shot 3 + 2 x 4 (S->T, S->S, R->R)
    assert {s: counts[s] for s in GENIES_STAGES} == {
        "genies_pairs": 7,
        "genies_train": 4,
        "genies_evaluate": 11,
        "genies_report": 1,
    }
    assert {k for k in first.summary["means"] if k.startswith("mean_de_")} == {f"mean_de_{n}" for n in INTERVENTIONS}
    assert first.summary["means"]["mean_de_zero_shot"] == 0.0  # zero-shot is its own baseline


def test_the_report_holds_genies_results_tree(first):
    report, results = first.report, first.report / "results"
    for name in ("metrics.csv", "metrics.parquet", "means.csv", "heatmap.png", "means.png", "report.md"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    assert (report / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = sorted(str(p.relative_to(results)) for p in results.rglob("*") if p.is_file())
    expected = [  # zero-shot trains nothing but files its results under every trained-on distribution
        f"evaluations/zero_shot/{MODEL}-{source}/{target}.json"
        for source in ("alpaca_short", "alpaca_mmlu")
        for target in ("alpaca_long", "alpaca_mmlu", "alpaca_short")
    ]
    for name in ("few_shot", "longest"):
        expected += [
            f"evaluations/{name}/{MODEL}-alpaca_short/alpaca_long.json",
            f"evaluations/{name}/{MODEL}-alpaca_short/alpaca_short.json",
            f"evaluations/{name}/{MODEL}-alpaca_mmlu/alpaca_mmlu.json",
            f"evaluations/{name}/{MODEL}-alpaca_mmlu/alpaca_short.json",
        ]
    # the ceilings are named by the shifts' targets; the metrics tables by the shift spec file
    expected += [f"target_tuned_capability/{MODEL}/{t}.json" for t in ("alpaca_long", "alpaca_short")]
    expected += [f"generalization_metrics/{MODEL}/{name}/shifts.csv" for name in INTERVENTIONS]
    assert files == sorted(expected)
    few_shot = evaluation(results, "few_shot", "alpaca_short", "alpaca_long")
    assert set(few_shot) == {
        "model_dir",
        "distribution_id",
        "timestamp",
        "eval_accuracy",
        "eval_probabilities",
        "eval_brier_score",
        "eval_score",
        "eval_average_probability",
        "eval_rms_calibration_error",
        "eval_ece",
        "eval_pairs",
    }
    assert few_shot["timestamp"] is None  # the artifact stays the same for the same run; the export stamps it
    p = few_shot["eval_probabilities"]
    assert len(p) == few_shot["eval_pairs"] and few_shot["eval_score"] == pytest.approx(-few_shot["eval_brier_score"])
    assert few_shot["eval_brier_score"] == pytest.approx(sum((1 - x) ** 2 for x in p) / len(p))
    assert few_shot["eval_average_probability"] == pytest.approx(sum(p) / len(p))
    assert few_shot["model_dir"] == f"models/few_shot/{MODEL}-alpaca_short"
    assert few_shot["distribution_id"] == "alpaca_long"
    markdown = (report / "report.md").read_text()
    assert all(f"| {name} |" in markdown for name in INTERVENTIONS)


def test_the_export_is_the_tree_stamped_with_when_each_evaluation_ran(first):
    exported, results = Path(first.summary["results_dir"]), first.report / "results"
    assert sorted(p.relative_to(exported) for p in exported.rglob("*") if p.is_file()) == sorted(
        p.relative_to(results) for p in results.rglob("*") if p.is_file()
    )
    for path in (exported / "evaluations").rglob("*.json"):
        data = json.loads(path.read_text())
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", data.pop("timestamp")), path
        assert data == {
            k: v for k, v in json.loads((results / path.relative_to(exported)).read_text()).items() if k != "timestamp"
        }


def test_metrics_tables_are_a_function_of_the_json_files(first):
    from alignflow.genies.metrics import PUBLISHED_COLUMNS

    results = Path(first.summary["results_dir"])
    for name in INTERVENTIONS:
        header, rows = read_csv(results / "generalization_metrics" / MODEL / name / "shifts.csv")
        assert header == PUBLISHED_COLUMNS
        assert len(rows) == len(SHIFTS)
        for row, shift in zip(rows, SHIFTS):
            source, target = shift["source"], shift["target"]
            reference = shift.get("target_reference", target)
            a = evaluation(results, name, source, target)["eval_accuracy"]
            a_iid = evaluation(results, name, source, source)["eval_accuracy"]
            a0 = evaluation(results, "zero_shot", source, target)["eval_accuracy"]
            ceiling = json.loads((results / "target_tuned_capability" / MODEL / f"{target}.json").read_text())
            assert ceiling["target"] == target and ceiling["target_reference"] == reference
            # the ceiling: the best A(R -> R) over every intervention run, zero-shot included
            on_reference = {n: evaluation(results, n, reference, reference)["eval_accuracy"] for n in INTERVENTIONS}
            c = ceiling["best_intervention_accuracy"]
            assert c == max(on_reference.values()) > 0 and on_reference[ceiling["best_intervention"]] == c
            assert (row["source"], row["target"], row["target_reference"]) == (source, target, reference)
            assert (row["baseline_intervention"], row["target_tuned_capability_intervention"]) == (
                "zero_shot",
                ceiling["best_intervention"],
            )
            assert float(row["generalization_accuracy"]) == pytest.approx(a)
            assert float(row["source_ID_accuracy"]) == pytest.approx(a_iid)
            assert float(row["baseline_accuracy"]) == pytest.approx(a0)
            assert float(row["target_tuned_capability"]) == pytest.approx(c)
            assert float(row["differential_elicitation"]) == pytest.approx((a - a0) / c)
            rms = evaluation(results, name, source, target).get("eval_rms_calibration_error")
            assert row["RMS_calibration_error"] == ("nan" if rms is None or math.isnan(rms) else pytest.approx(rms))
    _, flow_rows = read_csv(first.report / "metrics.csv")
    assert len(flow_rows) == len(INTERVENTIONS) * len(SHIFTS)
    assert all(r["brier"] == "nan" and r["ece"] == "nan" for r in flow_rows if r["intervention"] == "longest")
    table = pq.read_table(first.report / "metrics.parquet").to_pylist()
    assert [(r["intervention"], r["source"]) for r in table] == [(r["intervention"], r["source"]) for r in flow_rows]


def test_metrics_and_leaderboard_clis_read_the_exported_tree(first, tmp_path, capsys):
    from alignflow.cli import main

    results = Path(first.summary["results_dir"])
    out = tmp_path / "few_shot.csv"
    args = ["--results", str(results), "--shifts", first.config.shifts, "--model", MODEL, "--out", str(out)]
    assert main(["genies", "metrics", *args, "--intervention", "few_shot"]) == 0
    assert "2 shifts" in capsys.readouterr().out
    assert out.read_text() == (results / "generalization_metrics" / MODEL / "few_shot" / "shifts.csv").read_text()
    board = tmp_path / "leaderboard.csv"
    assert (
        main(
            [
                "genies",
                "leaderboard",
                "--results",
                f"alignflow={results}",
                "--shifts",
                first.config.shifts,
                "--out",
                str(board),
            ]
        )
        == 0
    )
    _, rows = read_csv(board)
    assert sorted((r["source"], r["model"], r["intervention"]) for r in rows) == [
        ("alignflow", MODEL, n)
        for n in sorted([*INTERVENTIONS, "chance"])  # chance: 1/2 on every pair
    ]


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
    for shift in SHIFTS:
        reference = shift.get("target_reference", shift["target"])
        capability = json.loads(
            (report / "results" / "target_tuned_capability" / MODEL / f"{shift['target']}.json").read_text()
        )
        assert capability["best_intervention"] == "few_shot"
        assert (
            capability["best_intervention_accuracy"]
            == evaluation(report / "results", "few_shot", reference, reference)["eval_accuracy"]
        )
    assert "Ceiling: few_shot" in (report / "report.md").read_text()


def test_model_name_names_the_results_tree_and_reruns_only_the_report(first, tmp_path):
    # the pipeline names a trained policy by its artifact key: its folder is always "merged"
    config = GeniesConfig.model_validate(
        {**first.data, "model_name": "train_dpo-0123abcd", "results_dir": str(tmp_path / "results")}
    )
    summary, states = run_flow(config)
    assert {state for (stage, state) in states if stage in GENIES_STAGES - {"genies_report"}} == {"Cached"}
    exported = Path(summary["results_dir"])
    assert {p.name for p in (exported / "evaluations" / "few_shot").iterdir()} == {
        "train_dpo-0123abcd-alpaca_short",
        "train_dpo-0123abcd-alpaca_mmlu",
    }
    assert (exported / "generalization_metrics" / "train_dpo-0123abcd" / "few_shot" / "shifts.csv").is_file()


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
        r"\(zero_shot, few_shot, longest\)",
    ):
        genies_eval(config=config)


def test_unknown_intervention_is_an_error_before_any_work(first):
    from alignflow.flows.genies_eval import genies_eval

    config = GeniesConfig.model_validate({**first.data, "interventions": ["few_shot", "nope"]})
    with pytest.raises(ValueError, match=r"interventions: unknown \['nope'\]"):
        genies_eval(config=config)
