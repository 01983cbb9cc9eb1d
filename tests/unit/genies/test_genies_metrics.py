"""GENIES metrics (genies/metrics.py) against numbers worked out by hand, and the
published results layout: evaluations/<intervention>/<MODEL>-<source>/<target>.json,
evaluations/zero_shot/<MODEL>/<target>.json, target_tuned_capability/<MODEL>/<reference>.json."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest

from alignflow.genies.data import GeniesDataError
from alignflow.genies.metrics import (
    PUBLISHED_COLUMNS,
    accuracy,
    bootstrap_intervals,
    brier,
    capability_path,
    evaluation_json,
    expected_calibration_error,
    leaderboard,
    means,
    pair_correct,
    pair_metrics,
    results_rows,
    rms_calibration_error,
    shift_row,
)
from alignflow.genies.shifts import Shift

# -- per pair ------------------------------------------------------------------
P = [0.9, 0.8, 0.3, 0.5]


def test_pair_correct_counts_a_tie_as_half():
    assert [pair_correct(p) for p in (0.9, 0.51, 0.5, 0.49, 0.0, 1.0)] == [1.0, 1.0, 0.5, 0.0, 0.0, 1.0]


def test_accuracy_and_brier_by_hand():
    # correct: 1, 1, 0, 0.5 -> 2.5 / 4
    assert accuracy(P) == pytest.approx(0.625)
    # (1 - p)^2: 0.01 + 0.04 + 0.49 + 0.25 = 0.79 -> / 4
    assert brier(P) == pytest.approx(0.1975)
    assert brier([1.0, 1.0]) == 0.0 and brier([0.0]) == 1.0


def test_ece_one_pair_per_bin():
    # confidence max(p, 1 - p): 0.9 (bin 9), 0.8 (bin 8), 0.7 (bin 7), 0.5 (bin 5); each bin holds one pair:
    # |1 - 0.9| + |1 - 0.8| + |0 - 0.7| + |0.5 - 0.5| = 1.0, each weighted 1/4
    assert expected_calibration_error(P) == pytest.approx(0.25)


def test_ece_pairs_sharing_a_bin():
    p = [0.9, 0.95, 0.3, 0.5, 0.12]
    # bin 9: 0.9 and 0.95, both correct: weight 2/5 * |1 - 0.925| = 0.03
    # bin 8: confidence 0.88 (p = 0.12, wrong): 1/5 * 0.88 = 0.176
    # bin 7: confidence 0.7 (p = 0.3, wrong):   1/5 * 0.7  = 0.14
    # bin 5: the tie, accuracy 0.5 = confidence 0.5: 0
    assert expected_calibration_error(p) == pytest.approx(0.03 + 0.176 + 0.14)
    # two bins: every confidence is >= 0.5, so all five share bin 1:
    # accuracy (1 + 1 + 0 + 0.5 + 0) / 5 = 0.5, mean confidence 3.93 / 5 = 0.786
    assert expected_calibration_error(p, bins=2) == pytest.approx(0.286)


def test_ece_certain_answers_land_in_the_top_bin():
    # p = 1 (right, confidence 1) and p = 0 (wrong, confidence 1): one bin, accuracy 0.5
    assert expected_calibration_error([1.0, 0.0]) == pytest.approx(0.5)
    assert expected_calibration_error([1.0, 1.0]) == 0.0


def test_pair_metrics_bundles_genies_numbers_and_ours():
    metrics = pair_metrics(P)
    assert math.isnan(metrics.pop("rms_calibration_error"))  # 4 pairs: no bin of 20
    assert metrics == {
        "accuracy": pytest.approx(0.625),
        "brier": pytest.approx(0.1975),
        "average_probability": pytest.approx((0.9 + 0.8 + 0.3 + 0.5) / 4),
        "ece": pytest.approx(0.25),
        "pairs": 4,
    }


# -- per shift -----------------------------------------------------------------
SHIFT = Shift(source="s", target="t", target_reference="r", category="cat", label="extreme")


def test_shift_row_differential_elicitation_and_elicitation():
    row = shift_row(SHIFT, generalization=0.7, source_id=0.9, baseline=0.5, ceiling=0.8, intervention="x")
    assert row["target_reference"] == "r"
    assert row["differential_elicitation"] == pytest.approx((0.7 - 0.5) / 0.8)  # 0.25
    assert row["elicitation"] == pytest.approx(0.7 / 0.8)  # 0.875
    assert (
        row["generalization_accuracy"],
        row["baseline_accuracy"],
        row["target_tuned_capability"],
        row["source_ID_accuracy"],
    ) == (0.7, 0.5, 0.8, 0.9)
    assert (row["category"], row["label"], row["intervention"]) == ("cat", "extreme", "x")


def test_shift_row_reference_defaults_to_target_and_zero_ceiling_is_nan():
    row = shift_row(Shift(source="s", target="t"), generalization=0.7, source_id=0.9, baseline=0.5, ceiling=0.0)
    assert row["target_reference"] == "t"
    assert math.isnan(row["differential_elicitation"]) and math.isnan(row["elicitation"])


def _row(category, a, a0, c, intervention="i1"):
    shift = Shift(source=f"s{a}", target=f"t{a}", category=category)
    return shift_row(shift, generalization=a, source_id=0.9, baseline=a0, ceiling=c, intervention=intervention)


def test_means_per_category_and_all_skip_nan():
    rows = [
        _row("a", 0.6, 0.5, 0.5),  # DE 0.2
        _row("a", 0.7, 0.5, 0.5),  # DE 0.4
        _row("b", 0.8, 0.4, 0.0),  # DE nan (no ceiling): skipped
        _row("b", 0.9, 0.8, 1.0),  # DE 0.1
        _row("a", 0.5, 0.5, 1.0, intervention="i2"),  # DE 0: a different intervention, its own groups
    ]
    by = {(m["intervention"], m["category"]): m for m in means(rows)}
    assert set(by) == {("i1", "a"), ("i1", "b"), ("i1", "all"), ("i2", "a"), ("i2", "all")}
    assert by[("i1", "a")]["differential_elicitation"] == pytest.approx(0.3)
    assert by[("i1", "b")]["differential_elicitation"] == pytest.approx(0.1)
    assert by[("i1", "all")]["differential_elicitation"] == pytest.approx((0.2 + 0.4 + 0.1) / 3)
    assert by[("i1", "all")]["generalization_accuracy"] == pytest.approx((0.6 + 0.7 + 0.8 + 0.9) / 4)
    assert by[("i1", "b")]["elicitation"] == pytest.approx(0.9)  # 0.8 / 0 is nan; 0.9 / 1.0
    assert [by[k]["shifts"] for k in [("i1", "a"), ("i1", "b"), ("i1", "all"), ("i2", "all")]] == [2, 2, 4, 1]
    assert by[("i2", "all")]["differential_elicitation"] == 0.0
    assert math.isnan(by[("i1", "all")]["brier"])  # no row has it: nan, not an error


# -- the published results tree -------------------------------------------------
MODEL = "llama-7b"
SHIFTS = (
    Shift(source="alpaca_short", target="alpaca_long", target_reference="alpaca_mmlu", category="spurious_cues"),
    Shift(source="arc_easy", target="arc_hard", category="difficulty"),
)
# the metrics table of classify_lora on SHIFTS, worked out by hand from the tree below
EXPECTED = [
    {
        "source": "alpaca_short",
        "target": "alpaca_long",
        "target_reference": "alpaca_mmlu",
        "generalization_accuracy": 0.7,
        "baseline_accuracy": 0.5,
        "baseline_intervention": "zero_shot",
        "target_tuned_capability": 0.8,
        "target_tuned_capability_intervention": "classify_lora",
        "source_ID_accuracy": 0.9,
        "RMS_calibration_error": 0.21,
        "differential_elicitation": (0.7 - 0.5) / 0.8,
    },
    {
        "source": "arc_easy",
        "target": "arc_hard",
        "target_reference": "arc_hard",
        "generalization_accuracy": 0.6,
        "baseline_accuracy": 0.4,
        "baseline_intervention": "zero_shot",
        "target_tuned_capability": 0.75,
        "target_tuned_capability_intervention": "mms",
        "source_ID_accuracy": 0.8,
        "RMS_calibration_error": math.nan,  # an older file, without the calibration error
        "differential_elicitation": (0.6 - 0.4) / 0.75,
    },
]


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def published(tmp_path) -> Path:
    """A small results tree as GENIES commits it: one intervention, two shifts."""
    ev, cap = tmp_path / "evaluations", tmp_path / "target_tuned_capability"
    _write(
        ev / "classify_lora" / f"{MODEL}-alpaca_short" / "alpaca_long.json",
        {"eval_accuracy": 0.7, "eval_rms_calibration_error": 0.21, "eval_brier_score": 0.2, "distribution_id": "x"},
    )
    _write(ev / "classify_lora" / f"{MODEL}-alpaca_short" / "alpaca_short.json", {"eval_accuracy": 0.9})
    _write(ev / "classify_lora" / f"{MODEL}-arc_easy" / "arc_hard.json", {"accuracy": 0.6})  # before the eval_ prefix
    _write(ev / "classify_lora" / f"{MODEL}-arc_easy" / "arc_easy.json", {"eval_accuracy": 0.8})
    # the baseline is filed under each shift's source; a decoy under the bare model name
    _write(ev / "zero_shot" / f"{MODEL}-alpaca_short" / "alpaca_long.json", {"eval_accuracy": 0.5})
    _write(ev / "zero_shot" / f"{MODEL}-arc_easy" / "arc_hard.json", {"eval_accuracy": 0.4})
    _write(ev / "zero_shot" / MODEL / "arc_hard.json", {"eval_accuracy": 0.0})
    # the ceiling is named by the target, measured on the reference
    _write(
        cap / MODEL / "alpaca_long.json",
        {"best_intervention": "classify_lora", "best_intervention_accuracy": 0.8, "target_reference": "alpaca_mmlu"},
    )
    _write(cap / MODEL / "arc_hard.json", {"best_intervention": "mms", "best_intervention_accuracy": 0.75})
    _write(cap / MODEL / "alpaca_mmlu.json", {"best_intervention_accuracy": 0.1})  # decoy: named by the reference
    return tmp_path


def _same(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for row, want in zip(got, expected):
        for column, value in want.items():
            if isinstance(value, float):
                assert row[column] == pytest.approx(value, abs=1e-6, nan_ok=True), column
            else:
                assert row[column] == value, column


def test_results_rows_are_the_published_table(published):
    rows = results_rows(published, SHIFTS, "classify_lora", MODEL)
    _same(rows, EXPECTED)
    assert rows[0]["brier"] == 0.2 and math.isnan(rows[1]["brier"])
    assert {r["intervention"] for r in rows} == {"classify_lora"} and {r["model"] for r in rows} == {MODEL}


def test_metrics_cli_writes_the_published_columns_in_order(published, tmp_path, capsys):
    spec = tmp_path / "all.json"
    spec.write_text(json.dumps([s.model_dump() for s in (*SHIFTS, SHIFTS[0])]))  # repeats stay, as in all.json
    out = tmp_path / "all.csv"
    assert metrics_cli(published, spec, out) == 0
    assert "3 shifts" in capsys.readouterr().out
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == PUBLISHED_COLUMNS
        back = list(reader)
    parsed = [{k: v if k in TEXT_COLUMNS else float(v) for k, v in row.items()} for row in back]
    _same(parsed, [*EXPECTED, EXPECTED[0]])


TEXT_COLUMNS = {"source", "target", "target_reference", "baseline_intervention", "target_tuned_capability_intervention"}


@pytest.mark.parametrize(
    "path,expected",
    [
        ("evaluations/zero_shot/llama-7b-arc_easy/arc_hard.json", "the zero-shot baseline on arc_hard"),
        ("target_tuned_capability/llama-7b/arc_hard.json", "the target-tuned capability"),
        ("evaluations/classify_lora/llama-7b-arc_easy/arc_easy.json", "evaluation on its source arc_easy"),
    ],
)
def test_a_missing_file_is_one_line_naming_the_path(published, path, expected):
    (published / path).unlink()
    with pytest.raises(GeniesDataError) as e:
        results_rows(published, SHIFTS, "classify_lora", MODEL)
    assert str(e.value).startswith(f"{published / path}: missing; expected") and expected in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "content,expected",
    [
        ("{not json", "not valid JSON"),
        ("[0.5]", "no numeric 'eval_accuracy' (nor 'accuracy')"),
        ('{"eval_accuracy": "0.5"}', "no numeric 'eval_accuracy' (nor 'accuracy'); found keys: ['eval_accuracy']"),
        ('{"eval_accuracy": true}', "no numeric 'eval_accuracy'"),
    ],
)
def test_a_bad_evaluation_names_the_file(published, content, expected):
    path = published / "evaluations" / "classify_lora" / f"{MODEL}-arc_easy" / "arc_hard.json"
    path.write_text(content)
    with pytest.raises(GeniesDataError) as e:
        results_rows(published, SHIFTS, "classify_lora", MODEL)
    assert str(e.value).startswith(f"{path}: ") and expected in str(e.value)


def test_leaderboard_puts_published_rows_and_ours_together(published, tmp_path):
    ours = tmp_path / "ours"
    for row in EXPECTED:  # our tree: the same layout, another model, generalization 0.1 higher
        shift = next(s for s in SHIFTS if s.target == row["target"])
        folder = ours / "evaluations"
        _write(
            folder / "dpo" / f"tiny-{shift.source}" / f"{shift.target}.json",
            {"eval_accuracy": row["generalization_accuracy"] + 0.1},
        )
        _write(folder / "dpo" / f"tiny-{shift.source}" / f"{shift.source}.json", {"eval_accuracy": 1.0})
        _write(
            folder / "zero_shot" / f"tiny-{shift.source}" / f"{shift.target}.json",
            {"eval_accuracy": row["baseline_accuracy"]},
        )
        _write(
            capability_path(ours, "tiny", shift.target), {"best_intervention_accuracy": row["target_tuned_capability"]}
        )
    rows, skipped = leaderboard({"published": published, "alignflow": ours}, SHIFTS)
    assert [(r["source"], r["model"], r["intervention"]) for r in rows] == [
        ("alignflow", "tiny", "dpo"),
        ("published", MODEL, "classify_lora"),
    ]
    de = [(0.7 - 0.5) / 0.8, (0.6 - 0.4) / 0.75]
    assert rows[1]["differential_elicitation"] == pytest.approx(sum(de) / 2)
    assert rows[0]["differential_elicitation"] == pytest.approx((0.1 / 0.8 + 0.1 / 0.75 + sum(de)) / 2)
    assert rows[0]["shifts"] == 2 and rows[0]["source_ID_accuracy"] == 1.0
    # zero_shot's own table needs a ceiling and its source evaluations: where they are missing it is left out, named
    assert any(reason.startswith("published llama-7b zero_shot:") for reason in skipped)


# -- the per-pair numbers GENIES publishes ---------------------------------------
def _coin_labels(n: int) -> list[int]:
    coin = random.Random(42)
    return [coin.choice([0, 1]) for _ in range(n)]


def test_rms_calibration_error_compares_each_bin_with_the_overall_label_mean():
    # every p = 0.5: relabelled 0.5 either way, all 40 in the middle bin [0.4, 0.6)
    labels = _coin_labels(40)
    assert rms_calibration_error([0.5] * 40) == pytest.approx(abs(sum(labels) / 40 - 0.5))
    # p = 1: label 1 keeps 1.0 (outside the last bin, as numpy.digitize puts it), label 0 gives 0.0 (first bin)
    labels = _coin_labels(60)
    zeros = labels.count(0)
    assert zeros >= 20  # so the first bin counts
    assert rms_calibration_error([1.0] * 60) == pytest.approx(sum(labels) / 60)


def test_rms_calibration_error_skips_bins_under_20_pairs():
    assert math.isnan(rms_calibration_error([0.5] * 19))
    assert not math.isnan(rms_calibration_error([0.5] * 20))


def test_evaluation_json_is_what_genies_writes():
    p = [0.9, 0.8, 0.3, 0.5]
    result = evaluation_json(pair_metrics(p), p, "arc_hard", "models/tiny", "2026-11-25 10:00:00")
    assert result["eval_accuracy"] == pytest.approx(0.625) and result["eval_probabilities"] == p
    assert result["eval_brier_score"] == pytest.approx(0.1975) and result["eval_score"] == pytest.approx(-0.1975)
    assert result["eval_average_probability"] == pytest.approx(0.625)
    assert math.isnan(result["eval_rms_calibration_error"])  # 4 pairs: no bin reaches 20
    assert (result["distribution_id"], result["model_dir"], result["timestamp"]) == (
        "arc_hard",
        "models/tiny",
        "2026-11-25 10:00:00",
    )
    accuracy_only = evaluation_json({"accuracy": 0.5, "pairs": 4}, None, "arc_hard", "models/tiny", None)
    assert set(accuracy_only) == {"model_dir", "distribution_id", "timestamp", "eval_accuracy", "eval_pairs"}


def metrics_cli(published: Path, spec: Path, out: Path) -> int:
    """`alignflow genies metrics` over a results tree, as a user types it."""
    from alignflow.cli import main

    args = ["--results", str(published), "--shifts", str(spec), "--intervention", "classify_lora", "--model", MODEL]
    return main(["genies", "metrics", *args, "--out", str(out)])


# -- bootstrap intervals -----------------------------------------------------------
def _tree_with_pairs(root: Path, a: list[float], a0: list[float], on_reference: list[float] | None) -> Path:
    """One shift s -> t (reference r): per-pair probabilities of an intervention, of the
    zero-shot baseline and, when given, of the ceiling's intervention on r."""
    ev = root / "evaluations"
    _write(ev / "i" / "m-s" / "t.json", {"eval_accuracy": accuracy(a), "eval_probabilities": a})
    _write(ev / "i" / "m-s" / "s.json", {"eval_accuracy": 1.0})
    _write(ev / "zero_shot" / "m-s" / "t.json", {"eval_accuracy": accuracy(a0), "eval_probabilities": a0})
    ceiling = accuracy(on_reference) if on_reference else 1.0
    _write(capability_path(root, "m", "t"), {"best_intervention": "i", "best_intervention_accuracy": ceiling})
    if on_reference:
        _write(ev / "i" / "m-r" / "r.json", {"eval_accuracy": ceiling, "eval_probabilities": on_reference})
    return root


ONE_SHIFT = (Shift(source="s", target="t", target_reference="r", category="c"),)


def test_bootstrap_interval_of_a_proportion_matches_the_normal_approximation(tmp_path):
    # A0 all wrong, ceiling fixed at 1: DE = A, whose 95% interval on 400 pairs at 1/2 is about 1/2 +- 0.049
    root = _tree_with_pairs(tmp_path, [0.9, 0.1] * 200, [0.2] * 400, None)
    got = bootstrap_intervals(root, ONE_SHIFT, "i", "m", replicates=4000)
    half_width = 1.96 * math.sqrt(0.25 / 400)
    for column in ("differential_elicitation", "generalization_accuracy"):
        assert got[f"{column}_low"] == pytest.approx(0.5 - half_width, abs=0.006)
        assert got[f"{column}_high"] == pytest.approx(0.5 + half_width, abs=0.006)


def test_bootstrap_keeps_a_and_the_baseline_paired(tmp_path):
    # the intervention agrees with zero-shot on every pair: DE is 0 in every replicate; drawn
    # independently, the two accuracies would give DE an interval about 0.14 wide
    p = [0.9, 0.1] * 100
    root = _tree_with_pairs(tmp_path, p, p, None)
    got = bootstrap_intervals(root, ONE_SHIFT, "i", "m", replicates=500)
    assert got["differential_elicitation_low"] == got["differential_elicitation_high"] == 0.0
    assert got["generalization_accuracy_low"] < 0.5 < got["generalization_accuracy_high"]


def test_bootstrap_resamples_the_ceiling_on_its_reference(tmp_path):
    a, a0 = [0.9] * 100, [0.1] * 100  # DE = 1 / C exactly, so all its spread comes from the ceiling
    fixed = bootstrap_intervals(_tree_with_pairs(tmp_path / "fixed", a, a0, None), ONE_SHIFT, "i", "m", 500)
    assert fixed["differential_elicitation_low"] == fixed["differential_elicitation_high"] == 1.0
    resampled = bootstrap_intervals(
        _tree_with_pairs(tmp_path / "resampled", a, a0, [0.9] * 80 + [0.1] * 20), ONE_SHIFT, "i", "m", 500
    )
    assert resampled["differential_elicitation_low"] < 1 / 0.8 < resampled["differential_elicitation_high"]


def test_bootstrap_is_nan_without_per_pair_probabilities(published):
    got = bootstrap_intervals(published, SHIFTS, "classify_lora", MODEL, replicates=10)
    assert all(math.isnan(v) for v in got.values())


def test_leaderboard_cli_writes_intervals(tmp_path, capsys):
    root = _tree_with_pairs(tmp_path / "tree", [0.9, 0.1] * 50, [0.2] * 100, None)
    spec, out = tmp_path / "shifts.json", tmp_path / "board.csv"
    spec.write_text(json.dumps([s.model_dump() for s in ONE_SHIFT]))
    from alignflow.cli import main

    assert main(["genies", "leaderboard", "--results", f"ours={root}", "--shifts", str(spec), "--out", str(out)]) == 0
    with open(out, newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if r["intervention"] == "i"]
    assert float(row["differential_elicitation_low"]) < 0.5 < float(row["differential_elicitation_high"])


def test_leaderboard_adds_what_a_coin_scores_against_the_trees_own_baselines(tmp_path):
    # zero-shot 0.1 on t (below chance), ceiling 0.8 on r: a scorer saying 1/2 everywhere has DE (0.5 - 0.1) / 0.8
    a0 = [0.9] * 10 + [0.1] * 90
    root = _tree_with_pairs(tmp_path, [0.9] * 60 + [0.1] * 40, a0, [0.9] * 80 + [0.1] * 20)
    _write(root / "evaluations" / "zero_shot" / "m-s" / "s.json", {"eval_accuracy": 0.7})
    rows, skipped = leaderboard({"ours": root}, ONE_SHIFT, replicates=500)
    assert not skipped
    chance = next(r for r in rows if r["intervention"] == "chance")
    assert chance["differential_elicitation"] == pytest.approx((0.5 - 0.1) / 0.8)
    assert chance["generalization_accuracy"] == chance["source_ID_accuracy"] == 0.5 and chance["brier"] == 0.25
    assert chance["generalization_accuracy_low"] == chance["generalization_accuracy_high"] == 0.5
    assert chance["differential_elicitation_low"] < 0.5 < chance["differential_elicitation_high"]
    assert [r["intervention"] for r in rows] == ["i", "chance", "zero_shot"]  # i: DE (0.6 - 0.1) / 0.8 = 0.625


@pytest.mark.parametrize("value", ["-5", "ten", "1.5"])
def test_leaderboard_cli_refuses_a_bad_replicate_count(tmp_path, capsys, value):
    from alignflow.cli import main

    with pytest.raises(SystemExit) as e:
        main(["genies", "leaderboard", "--results", f"ours={tmp_path}", "--bootstrap", value, "--out", "x.csv"])
    assert e.value.code == 2
    assert f"--bootstrap: expected a whole number of replicates (0: no intervals), got '{value}'" in (
        capsys.readouterr().err
    )
