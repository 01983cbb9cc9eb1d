"""GENIES metrics (genies/metrics.py) against numbers worked out by hand, and the
published results layout: evaluations/<intervention>/<MODEL>-<source>/<target>.json,
evaluations/zero_shot/<MODEL>/<target>.json, target_tuned_capability/<MODEL>/<reference>.json."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from alignflow.genies.data import GeniesDataError
from alignflow.genies.metrics import (
    PUBLISHED_COLUMNS,
    accuracy,
    brier,
    expected_calibration_error,
    means,
    pair_correct,
    pair_metrics,
    published_rows,
    read_number,
    shift_row,
    write_csv,
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


def test_pair_metrics_bundles_the_three():
    assert pair_metrics(P) == {
        "accuracy": pytest.approx(0.625),
        "brier": pytest.approx(0.1975),
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


# -- the published layout ------------------------------------------------------
MODEL = "llama-7b"
SHIFTS = (
    Shift(source="alpaca_short", target="alpaca_long", target_reference="alpaca_mmlu", category="spurious_cues"),
    Shift(source="arc_easy", target="arc_hard", category="difficulty"),
)


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def published(tmp_path) -> Path:
    """A small results tree in the published layout (one intervention, two shifts)."""
    ev, cap = tmp_path / "evaluations", tmp_path / "target_tuned_capability"
    for source, target, acc in [
        ("alpaca_short", "alpaca_long", 0.7),
        ("alpaca_short", "alpaca_short", 0.9),
        ("arc_easy", "arc_hard", 0.6),
        ("arc_easy", "arc_easy", 0.8),
    ]:
        _write(ev / "classify_lora" / f"{MODEL}-{source}" / f"{target}.json", {"eval_accuracy": acc, "loss": 1.0})
    _write(ev / "zero_shot" / MODEL / "alpaca_long.json", {"eval_accuracy": 0.5})
    _write(ev / "zero_shot" / MODEL / "arc_hard.json", {"eval_accuracy": 0.4})
    _write(cap / MODEL / "alpaca_mmlu.json", {"best_intervention_accuracy": 0.8, "best_intervention": "classify_lora"})
    _write(cap / MODEL / "arc_hard.json", {"best_intervention_accuracy": 0.75})
    _write(
        cap / MODEL / "alpaca_long.json", {"best_intervention_accuracy": 0.1}
    )  # a decoy: S1's reference is alpaca_mmlu
    return tmp_path


def test_published_rows_read_the_layout(published):
    rows = published_rows(
        published / "evaluations", published / "target_tuned_capability", SHIFTS, "classify_lora", MODEL
    )
    first, second = rows
    assert (
        first["generalization_accuracy"],
        first["source_ID_accuracy"],
        first["baseline_accuracy"],
        first["target_tuned_capability"],
    ) == (0.7, 0.9, 0.5, 0.8)
    assert first["target_reference"] == "alpaca_mmlu"
    assert first["differential_elicitation"] == pytest.approx((0.7 - 0.5) / 0.8)
    assert second["target_reference"] == "arc_hard"
    assert second["differential_elicitation"] == pytest.approx((0.6 - 0.4) / 0.75)
    assert second["elicitation"] == pytest.approx(0.6 / 0.75)
    assert {r["intervention"] for r in rows} == {"classify_lora"} and {r["model"] for r in rows} == {MODEL}


def test_write_csv_puts_the_published_columns_first(published, tmp_path):
    rows = published_rows(
        published / "evaluations", published / "target_tuned_capability", SHIFTS, "classify_lora", MODEL
    )
    out = tmp_path / "out" / "metrics.csv"
    write_csv(out, rows)
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        back = list(reader)
    assert (
        header[:8]
        == PUBLISHED_COLUMNS
        == [
            "source",
            "target",
            "target_reference",
            "generalization_accuracy",
            "baseline_accuracy",
            "target_tuned_capability",
            "differential_elicitation",
            "source_ID_accuracy",
        ]
    )
    # ours follow; brier/ece are absent from published results, so they are not columns here
    assert header[8:] == ["intervention", "model", "category", "label", "elicitation"]
    assert [r["target_reference"] for r in back] == ["alpaca_mmlu", "arc_hard"]
    assert float(back[0]["differential_elicitation"]) == pytest.approx(0.25)
    assert float(back[1]["differential_elicitation"]) == pytest.approx(0.2 / 0.75)


def test_metrics_cli_writes_the_same_table(published, tmp_path, capsys):

    spec = tmp_path / "shifts.json"
    spec.write_text(json.dumps([s.model_dump() for s in SHIFTS]))
    out = tmp_path / "cli.csv"
    assert metrics_cli(published, spec, out) == 0
    printed = capsys.readouterr().out
    assert "2 shifts" in printed and f"{((0.25 + 0.2 / 0.75) / 2):.4f}" in printed
    direct = tmp_path / "direct.csv"
    write_csv(
        direct,
        published_rows(
            published / "evaluations", published / "target_tuned_capability", SHIFTS, "classify_lora", MODEL
        ),
    )
    assert out.read_text() == direct.read_text()


def test_evaluation_without_eval_accuracy_names_the_file(published):
    bad = published / "evaluations" / "classify_lora" / f"{MODEL}-arc_easy" / "arc_hard.json"
    bad.write_text(json.dumps({"accuracy": 0.6}))
    with pytest.raises(GeniesDataError) as e:
        published_rows(published / "evaluations", published / "target_tuned_capability", SHIFTS, "classify_lora", MODEL)
    assert str(bad) in str(e.value) and "eval_accuracy" in str(e.value) and "accuracy" in str(e.value)


def test_missing_result_file_names_the_path(published):
    missing = published / "evaluations" / "zero_shot" / MODEL / "arc_hard.json"
    missing.unlink()
    with pytest.raises(GeniesDataError, match="result file not found") as e:
        published_rows(published / "evaluations", published / "target_tuned_capability", SHIFTS, "classify_lora", MODEL)
    assert str(missing) in str(e.value)


@pytest.mark.parametrize(
    "content,expected",
    [
        ("{not json", "not valid JSON"),
        ("[0.5]", "no numeric 'eval_accuracy'"),
        ('{"eval_accuracy": "0.5"}', "no numeric 'eval_accuracy'"),
        ('{"eval_accuracy": true}', "no numeric 'eval_accuracy'"),
    ],
)
def test_read_number_rejects_bad_content(tmp_path, content, expected):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(GeniesDataError, match=expected) as e:
        read_number(path, "eval_accuracy")
    assert str(path) in str(e.value)


def test_metrics_cli_bad_file_is_a_one_line_error(published, tmp_path, capsys):

    spec = tmp_path / "shifts.json"
    spec.write_text(json.dumps([s.model_dump() for s in SHIFTS]))
    bad = published / "target_tuned_capability" / MODEL / "arc_hard.json"
    bad.write_text(json.dumps({"accuracy": 0.7}))
    assert metrics_cli(published, spec, tmp_path / "o.csv") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "best_intervention_accuracy" in err[0]
    assert not (tmp_path / "o.csv").exists()


def metrics_cli(published: Path, spec: Path, out: Path) -> int:
    """`alignflow genies metrics` over a published results tree, as a user types it."""
    from alignflow.cli import main

    args = [
        "--evaluations",
        str(published / "evaluations"),
        "--capabilities",
        str(published / "target_tuned_capability"),
    ]
    return main(
        [
            "genies",
            "metrics",
            *args,
            "--shifts",
            str(spec),
            "--intervention",
            "classify_lora",
            "--model",
            MODEL,
            "--out",
            str(out),
        ]
    )
