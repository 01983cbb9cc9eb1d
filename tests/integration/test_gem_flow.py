"""The gem flow end to end on the tiny model and real GENIES distributions, under
ephemeral Prefect: every stage committed, two on-policy SEGA iterations (the second
samples from the first one's model), the comparison table with the baselines and the
shuffled control, the cached re-run, a resume after a kill between iterations, what a
config change re-runs, and bad input through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import gem_config_data, run_with_task_runs

from alignflow.config import ConfigError, GemConfig, load_config
from alignflow.storage.artifacts import ArtifactStore

STAGES = [
    "preferences",
    "train_sft",
    "sega_prompts",
    "sample",
    "entropy",
    "train_sega",
    "logprobs",
    "train_dpo",
    "train_pro",
    "pref_accuracy",
]
MODELS = ("base", "sft", "gem", "gem_shuffled", "dpo", "ipo", "pro")


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
    for name, runs in states.items():  # the control's first iteration is the main chain's (same policy, prompts)
        assert "Completed" in runs and set(runs) <= {"Completed", "Cached"}, (name, runs)
    store = ArtifactStore(config.paths.resolved().artifact_root)
    assert set(STAGES) <= {m["stage"] for m in store.committed()}
    rows = {(r["model"], r["reward"]): r for r in summary["accuracy"]}
    assert set(rows) == {(m, "log pi") for m in MODELS} | {(m, "log pi - log pi_base") for m in MODELS[1:]}
    for row in rows.values():
        assert row["mmlu pairs"] == 4 and row["arc_easy pairs"] == 4
        assert 0.0 <= row["mmlu accuracy"] + row["mmlu ties"] <= 1.0
        assert row["mmlu ties correct"] == pytest.approx(row["mmlu accuracy"] + row["mmlu ties"])
        low, high = row["mmlu ci"]
        assert low <= row["mmlu accuracy"] <= high
    stages = summary["stages"]
    for i in (1, 2):
        assert stages[f"sega_prompts {i}"]["rows_out"] == 2  # steps_per_iteration x batch_size
        assert stages[f"sample {i}"]["rows_out"] == 2 * 3  # prompts x n
        assert stages[f"train_sega {i}"]["steps"] <= 1
    for name in ("train_sft", "train_sega 2", "train_sega shuffled 2", "train_dpo", "train_ipo", "train_pro"):
        ref = store.find(Path(stages[name]["uri"]).name)
        assert {"adapter", "merged"} == set(store.manifest(ref.stage, ref.key)["dirs"])
    dpo, ipo = (store.find(Path(stages[n]["uri"]).name) for n in ("train_dpo", "train_ipo"))
    assert store.manifest(dpo.stage, dpo.key)["config"]["loss"] == "sigmoid"
    assert store.manifest(ipo.stage, ipo.key)["config"]["loss"] == "ipo"


def _parents(store, uri: str) -> dict[str, str]:
    ref = store.find(Path(uri).name)
    return {p["stage"]: p["key"] for p in store.manifest(ref.stage, ref.key)["parents"]}


def test_each_iteration_samples_from_the_model_the_one_before_trained(first_run):
    config, summary, _ = first_run
    store = ArtifactStore(config.paths.resolved().artifact_root)
    stages = summary["stages"]
    key = {name: Path(info["uri"]).name for name, info in stages.items()}
    assert _parents(store, stages["sample 1"]["uri"])["train_sft"] == key["train_sft"]
    assert _parents(store, stages["sample 2"]["uri"])["train_sega"] == key["train_sega 1"]
    assert _parents(store, stages["train_sega 2"]["uri"])["train_sega"] == key["train_sega 1"]
    assert _parents(store, stages["train_sega 2"]["uri"])["sample"] == key["sample 2"]
    prompts = [{r["id"] for r in store.read_rows(store.find(key[f"sega_prompts {i}"]))} for i in (1, 2)]
    assert not prompts[0] & prompts[1]  # the second iteration takes the next prompts of the shuffle


def test_candidates_carry_entropies_and_the_sampling_context(first_run):
    from transformers import AutoTokenizer

    config, summary, _ = first_run
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    store = ArtifactStore(config.paths.resolved().artifact_root)
    candidates = store.read_rows(store.find(Path(summary["stages"]["sample 2"]["uri"]).name))
    for c in candidates:
        assert len(c["entropies"]) == len(c["token_ids"]) == len(c["logprobs"])
        assert all(0.0 <= h <= 6.0 for h in c["entropies"])  # at most log(400 tokens) = 5.99
        assert c["prompt_tokens"] == len(c["prompt_ids"])
        # the plain format's sampling context: the prompt, a blank line, the step-by-step line
        assert tokenizer.decode(c["prompt_ids"]).endswith("\n\nLet's think step by step.\n")
    scores = store.read_rows(store.find(Path(summary["stages"]["entropy 2"]["uri"]).name))
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
    for name in ("preferences", "train_sft", "sega_prompts", "logprobs", "train_dpo", "train_pro"):
        assert set(states[name]) == {"Cached"}, (name, states[name])
    for name in ("sample", "entropy"):  # iteration 1 samples from the SFT model; iteration 2 from a new model
        assert sorted(states[name]) == ["Cached", "Cached", "Completed", "Completed"], (name, states[name])
    assert states["train_sega"] == ["Completed"] * 4  # 2 iterations, GEM and the control
    assert sorted(states["pref_accuracy"]).count("Completed") == 4  # gem, gem_shuffled: log pi, and against the base
    assert new["stages"]["train_sega 2"]["uri"] != summary["stages"]["train_sega 2"]["uri"]


def test_a_run_killed_between_iterations_resumes_at_the_next_one(first_run, tmp_path):
    """SIGKILL once iteration 1's model is committed; the same command again reuses iteration 1
    and ends with the artifacts of the uninterrupted run."""
    config, summary, _ = first_run
    home = tmp_path / "home"
    data = config.model_dump(mode="json") | {"paths": {"home": str(home)}}
    path = tmp_path / "gem.yaml"
    path.write_text(json.dumps(data))
    command = [sys.executable, "-m", "alignflow.cli", "run", "gem", "--config", str(path), "--json"]
    env = {**os.environ, "ALIGNFLOW_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(home.glob("artifacts/train_sega/*/_manifest.json")):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "iteration 1 never committed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store = ArtifactStore(str(home / "artifacts"))
    assert not store.is_committed("train_sega", Path(summary["stages"]["train_sega 2"]["uri"]).name)
    [first_iteration] = home.glob("artifacts/train_sega/*/_manifest.json")
    committed_at = first_iteration.stat().st_mtime_ns
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads(done.stdout[done.stdout.index("{") :])
    for name, info in summary["stages"].items():
        assert Path(resumed["stages"][name]["uri"]).name == Path(info["uri"]).name, name
    assert first_iteration.stat().st_mtime_ns == committed_at  # iteration 1 was not trained again


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
    contrast = ["sft.target=contrast", "entropy.preset=marker"]
    with pytest.raises(ConfigError, match="sft.marker 'Result' and entropy.marker 'Final Answer:'"):
        load_config(GemConfig, None, [*contrast, "sft.marker=Result"])
    assert load_config(GemConfig, None, ["sft.marker=Result"]).sft.marker == "Result"  # the chosen target has none
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
