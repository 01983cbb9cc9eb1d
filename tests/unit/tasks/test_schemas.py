"""Stage output schemas: commit checks every table (and every shard's part) against the
stage's declared schema and writes it in that schema; a real self-improve run's
artifacts read back in exactly the declared types. Also the stage examples and the
training curves a user sees in the Prefect UI, drawn from those artifacts."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import pyarrow as pa
import pytest
from helpers import tiny_config_data

from alignflow.config import SelfImproveConfig
from alignflow.flows.self_improve import Steps, run_rounds
from alignflow.storage.artifacts import ArtifactError, ArtifactStore
from alignflow.tasks.base_model import base_model_ref
from alignflow.tasks.judge import JUDGE
from alignflow.tasks.logprobs import LOGPROBS
from alignflow.tasks.pairs import PAIR_ROWS, PAIRS
from alignflow.tasks.prompts import PROMPTS
from alignflow.tasks.sample import SAMPLE
from alignflow.tasks.stage import RunContext, StageOutput, run_context
from alignflow.tasks.stage_report import escape
from alignflow.tasks.train_dpo import TRAIN_DPO

PAIR = {
    "prompt_id": "p1",
    "prompt": "Say hi",
    "reference": "hi",
    "chosen": "hi",
    "rejected": "no",
    "chosen_candidate": 0,
    "rejected_candidate": 1,
    "chosen_score": 0.75,
    "rejected_score": 0.25,
}


def commit_pairs(store: ArtifactStore, rows: list[dict]):
    return store.commit("pairs", "k1", tables=[pa.Table.from_pylist(rows)], schema=PAIR_ROWS)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"chosen_score": "high"}, "pairs: output column 'chosen_score' should be double, found string"),
        ({"chosen_candidate": 0.5}, "pairs: output column 'chosen_candidate' should be int64, found double"),
        ({"extra": 1}, "pairs: output column 'extra' (int64) is not in the stage's declared schema"),
        ({"reference": None, "prompt": 3}, "pairs: output column 'prompt' should be string, found int64"),
    ],
)
def test_commit_rejects_a_mistyped_or_extra_column_and_commits_nothing(tmp_path, change, message):
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(ArtifactError) as error:
        commit_pairs(store, [{**PAIR, **change}])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not store.is_committed("pairs", "k1") and not list(tmp_path.rglob("*.parquet"))


def test_commit_rejects_a_missing_column(tmp_path):
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(ArtifactError, match=r"^pairs: output column 'reference' is missing \(expected string\)$"):
        commit_pairs(store, [{k: v for k, v in PAIR.items() if k != "reference"}])
    assert not store.is_committed("pairs", "k1")


def test_a_column_of_nulls_and_ints_for_floats_get_the_declared_types(tmp_path):
    store = ArtifactStore(str(tmp_path))
    ref = commit_pairs(store, [{**PAIR, "reference": None, "chosen_score": 1, "rejected_score": 0}])
    table = store.read_table(ref)
    assert table.schema == PAIR_ROWS  # inferred: reference null, scores int64
    assert table.column("chosen_score").to_pylist() == [1.0]
    assert store.manifest("pairs", "k1")["schema"] == PAIR_ROWS.to_string()


def test_no_rows_commit_an_empty_table_of_the_declared_schema(tmp_path):
    store = ArtifactStore(str(tmp_path))
    ref = commit_pairs(store, [])
    assert store.read_table(ref).schema == PAIR_ROWS and store.manifest("pairs", "k1")["rows"] == 0


def test_a_shard_part_is_checked_and_written_in_the_schema(tmp_path):
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(ArtifactError, match="pairs: output column 'chosen_score' should be double, found string"):
        store.write_shard("pairs", "k1", 0, pa.Table.from_pylist([{**PAIR, "chosen_score": "x"}]), schema=PAIR_ROWS)
    assert not store.shard_receipts("pairs", "k1")
    receipt = store.write_shard(
        "pairs", "k1", 0, pa.Table.from_pylist([{**PAIR, "reference": None}]), schema=PAIR_ROWS, work=1
    )
    assert store.read_shards("pairs", "k1", [receipt]).schema == PAIR_ROWS


def test_a_stage_whose_rows_break_its_schema_fails_with_its_name_and_leaves_no_manifest(tmp_path):
    def compute(ctx, config, key, **parents):
        return StageOutput(tables=[pa.Table.from_pylist([{**PAIR, "chosen_score": "0.9"}])])

    stage = dataclasses.replace(PAIRS, compute=compute)
    ctx = RunContext(artifact_root=str(tmp_path / "artifacts"), model_cache=str(tmp_path / "models"))
    config = SelfImproveConfig().pairs
    with pytest.raises(ArtifactError, match="^pairs: output column 'chosen_score' should be double, found string$"):
        stage.run(ctx, config)
    assert not ctx.store().committed()


# -- a real run ------------------------------------------------------------------
DIRECT = Steps(PROMPTS.run, base_model_ref, SAMPLE.run, JUDGE.run, PAIRS.run, LOGPROBS.run, TRAIN_DPO.run)
STAGES = {
    "sample": (SAMPLE, "sample"),
    "judge": (JUDGE, "judge"),
    "pairs": (PAIRS, "pairs"),
    "logprobs": (LOGPROBS, "logprobs"),
    "train_dpo": (TRAIN_DPO, "dpo"),
}


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """One round of self-improve on the tiny model, its stages called without Prefect."""
    config = SelfImproveConfig.model_validate(tiny_config_data(tiny_model_dir, tmp_path_factory.mktemp("home")))
    prompts, rounds = run_rounds(config, DIRECT)
    return config, run_context(config), prompts, rounds[0]


def test_every_stage_reads_back_in_exactly_its_declared_schema(tiny_run):
    config, ctx, prompts, refs = tiny_run
    store = ctx.store()
    assert store.read_table(prompts).schema == PROMPTS.output_schema(config)
    for name, ref in refs.items():
        stage, section = STAGES[name]
        assert store.read_table(ref).schema == stage.output_schema(getattr(config, section)), name


def test_cot_sampling_declares_and_writes_entropies(tiny_run):
    config, ctx, prompts, _ = tiny_run
    cot = config.sample.model_copy(update={"cot": True, "max_prompts": 2})
    ref = SAMPLE.run(ctx, cot, policy=base_model_ref(config.model, ctx.model_cache), prompts=prompts)
    schema = ctx.store().read_table(ref).schema
    assert schema == SAMPLE.output_schema(cot) and schema.field("entropies").type == pa.list_(pa.float64())
    assert "entropies" not in SAMPLE.output_schema(config.sample).names


def test_judge_examples_show_the_instruction_both_outputs_and_both_verdicts(tiny_run):
    _, ctx, _, refs = tiny_run
    store = ctx.store()
    markdown = JUDGE.examples(store, refs["judge"], {"candidates": refs["sample"]})
    assert markdown.count("## example") == 3
    for field in (
        "| instruction |",
        "| reference |",
        "better), shown first |",
        "better), shown second |",
        "| judge said (both orders) |",
    ):
        assert markdown.count(field) == 3, field
    prompts = {r["prompt"] for r in store.read_rows(refs["sample"])}
    assert any(escape(prompt)[:40] in markdown for prompt in prompts)


def test_pairs_and_sample_examples_are_cut_and_escaped(tiny_run):
    _, ctx, _, refs = tiny_run
    store = ctx.store()
    pairs = PAIRS.examples(store, refs["pairs"], {})
    assert "| chosen\\_score |" in pairs and "| rejected |" in pairs and "| reference |" in pairs
    sample = SAMPLE.examples(store, refs["sample"], {})
    assert sample.count("## example") == 3 and "| candidate |" in sample
    assert all(len(line) < 1000 for line in sample.splitlines())  # texts are cut
    assert "<" not in sample.replace("&lt;", "")  # no raw HTML from model text


def test_training_curve_is_a_png_of_every_step(tiny_run):
    _, ctx, _, refs = tiny_run
    store = ctx.store()
    markdown = TRAIN_DPO.examples(store, refs["train_dpo"], {})
    steps = store.manifest("train_dpo", refs["train_dpo"].key)["metrics"]["steps"]
    assert f"{steps} optimizer steps" in markdown and "loss and reward_accuracy" in markdown
    png = base64.b64decode(markdown.split("data:image/png;base64,")[1].split(")")[0])
    assert png.startswith(b"\x89PNG")
    history = store.read_table(refs["train_dpo"]).to_pylist()
    assert [r["step"] for r in history if r["split"] == "train"] == list(range(1, steps + 1))
    assert all(0.0 <= r["reward_accuracy"] <= 1.0 for r in history)


def test_summary_markdown_renders_every_flow(tiny_run):
    from alignflow.flows import SUMMARIES
    from alignflow.flows.report import self_improve_summary

    config, ctx, prompts, refs = tiny_run
    summary = self_improve_summary(ctx.store(), prompts, [refs])
    text = SUMMARIES["self-improve"](summary)
    assert "## round 1" in text and all(f"| {stage} | [`" in text for stage in refs)
    assert f"after_reward_accuracy={summary['rounds'][0]['train_dpo']['after_reward_accuracy']}" in text
    pipeline = SUMMARIES["pipeline"](
        {
            "training": summary,
            "model": str(Path(config.model)),
            "genies": {"report": "r", "report_dir": "d", "means": {"mean_de_zero_shot": 0.0}},
        }
    )
    assert "# pipeline summary" in pipeline and "| zero_shot | 0.0 |" in pipeline and "## round 1" in pipeline
