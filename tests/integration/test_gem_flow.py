"""The gem flow end to end on the tiny model and real GENIES distributions, under
ephemeral Prefect: every stage committed, the comparison table, the cached re-run,
what a config change re-runs, and bad input through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import gem_config_data, run_with_task_runs

from alignflow.config import ConfigError, GemConfig, load_config
from alignflow.storage.artifacts import ArtifactStore

STAGES = [
    "preferences",
    "train_sft",
    "sample",
    "entropy",
    "entropy_pairs",
    "train_sega",
    "logprobs",
    "train_dpo",
    "pref_accuracy",
]


def run_gem(config: GemConfig):
    """Run the flow; return (summary, {task name: [final state names]})."""
    from alignflow.flows.gem import gem

    summary, runs = run_with_task_runs(gem, config)
    states: dict[str, list[str]] = {}
    for run in runs:
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return summary, states


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, genies_data_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("gem-home")
    config = GemConfig.model_validate(gem_config_data(tiny_model_dir, genies_data_dir, home))
    summary, states = run_gem(config)
    return config, summary, states


def test_every_stage_commits_and_the_models_are_compared(first_run):
    config, summary, states = first_run
    assert set(STAGES) <= set(states)
    assert all(s == "Completed" for runs in states.values() for s in runs), states
    store = ArtifactStore(config.paths.resolved().artifact_root)
    assert set(STAGES) <= {m["stage"] for m in store.committed()}
    rows = {(r["model"], r["reward"]): r for r in summary["accuracy"]}
    assert set(rows) == {
        ("base", "log pi"),
        ("sft", "log pi"),
        ("gem", "log pi"),
        ("dpo", "log pi"),
        ("sft", "log pi - log pi_base"),
        ("gem", "log pi - log pi_base"),
        ("dpo", "log pi - log pi_base"),
    }
    for row in rows.values():
        assert row["mmlu pairs"] == 4 and row["arc_easy pairs"] == 4
        assert 0.0 <= row["mmlu"] + row["mmlu ties"] <= 1.0
    stages = summary["stages"]
    assert stages["sample"]["rows_out"] == 6 * 3  # max_prompts x n
    assert stages["train_sega"]["groups"] >= 1
    for name in ("train_sft", "train_sega", "train_dpo"):
        ref = store.find(Path(stages[name]["uri"]).name)
        assert {"adapter", "merged"} == set(store.manifest(ref.stage, ref.key)["dirs"])


def test_candidates_carry_entropies_and_the_sampling_context(first_run):
    config, summary, _ = first_run
    store = ArtifactStore(config.paths.resolved().artifact_root)
    candidates = store.read_rows(store.find(Path(summary["stages"]["sample"]["uri"]).name))
    for c in candidates:
        assert len(c["entropies"]) == len(c["token_ids"]) == len(c["logprobs"])
        assert all(0.0 <= h <= 6.0 for h in c["entropies"])  # at most log(400 tokens) = 5.99
        assert c["prompt_tokens"] == len(c["prompt_ids"])
    scores = store.read_rows(store.find(Path(summary["stages"]["entropy"]["uri"]).name))
    assert {(s["prompt_id"], s["candidate"]) for s in scores} == {(c["prompt_id"], c["candidate"]) for c in candidates}


def test_reference_rewards_reuse_each_models_own_scores(first_run):
    config, summary, _ = first_run
    store = ArtifactStore(config.paths.resolved().artifact_root)
    by = {(r["model"], r["reward"]): store.read_rows(store.find(Path(r["uri"]).name)) for r in summary["accuracy"]}
    base, gem_plain, gem_ratio = by[("base", "log pi")], by[("gem", "log pi")], by[("gem", "log pi - log pi_base")]
    beta = config.pref_accuracy.beta
    for b, g, ratio in zip(base, gem_plain, gem_ratio):
        assert ratio["chosen_logp"] == g["chosen_logp"]
        assert ratio["chosen_reward"] == pytest.approx(beta * (g["chosen_logp"] - b["chosen_logp"]))


def test_second_run_is_served_entirely_from_cache(first_run):
    config, summary, _ = first_run
    again, states = run_gem(config)
    assert again == summary
    assert {s for name in STAGES for s in states[name]} == {"Cached"}, states


def test_changing_sega_reruns_sega_and_its_evaluations_only(first_run):
    config, summary, _ = first_run
    changed = config.model_copy(update={"sega": config.sega.model_copy(update={"mapping": "identity"})})
    new, states = run_gem(changed)
    for name in ("preferences", "train_sft", "sample", "entropy", "train_dpo"):
        assert set(states[name]) == {"Cached"}, (name, states[name])
    assert states["train_sega"] == ["Completed"]
    assert sorted(states["pref_accuracy"]).count("Completed") == 2  # gem: log pi, and against the base
    assert new["stages"]["train_sega"]["uri"] != summary["stages"]["train_sega"]["uri"]


def test_cli_runs_gem_and_reports_missing_genies_data(first_run, tmp_path, capsys):
    from alignflow.cli import main

    config, _, _ = first_run
    data = config.model_dump(mode="json")
    data["genies_data_dir"] = str(tmp_path / "nowhere")
    path = tmp_path / "gem.yaml"
    path.write_text(json.dumps(data))
    assert main(["run", "gem", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no distributions/ folder" in err and "genies download" in err


def test_config_rejects_a_marker_sft_did_not_teach(tmp_path):
    with pytest.raises(ConfigError, match="sft.marker 'Result' and entropy.marker 'Final Answer:'"):
        load_config(GemConfig, None, ["sft.marker=Result"])
    with pytest.raises(ConfigError, match="sample.cot must be true"):
        load_config(GemConfig, None, ["sample.cot=false"])


def test_bad_preference_row_names_file_and_line(first_run, tmp_path, capsys):
    from alignflow.cli import main

    config, _, _ = first_run
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "q"}) + "\n"
    )
    data = config.model_dump(mode="json") | {"train": {"mine": str(bad)}}
    path = tmp_path / "gem.yaml"
    path.write_text(json.dumps(data))
    assert main(["run", "gem", "--config", str(path)]) == 2
    assert f"{bad}:2: field 'chosen' (chosen) is missing" in capsys.readouterr().err
