"""The self-improve flow end to end on the tiny model, under ephemeral Prefect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tiny_config_data

from alignflow.config import SelfImproveConfig
from alignflow.storage.artifacts import ArtifactStore

STAGES = ["prompts", "sample", "judge", "pairs", "logprobs", "train_dpo"]


def run_flow(config: SelfImproveConfig):
    """Run the flow; return (summary, {task name: final state name})."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from alignflow.flows.self_improve import self_improve

    state = self_improve(config=config, return_state=True)
    summary = state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    return summary, {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("flow-home")
    config = SelfImproveConfig.model_validate(tiny_config_data(tiny_model_dir, home))
    summary, states = run_flow(config)
    return config, summary, states


def test_flow_commits_every_stage_and_a_trained_model(first_run):
    config, summary, states = first_run
    assert all(states[s] == "Completed" for s in STAGES if s in states), states
    store = ArtifactStore(config.paths.resolved().artifact_root)
    stages = {m["stage"] for m in store.committed()}
    assert set(STAGES) <= stages
    rnd = summary["rounds"][0]
    assert rnd["sample"]["rows_out"] == 6 * 3
    assert rnd["pairs"]["rows_out"] >= 1
    assert rnd["train_dpo"]["before_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    dpo = store.find(Path(rnd["train_dpo"]["uri"]).name)
    manifest = store.manifest(dpo.stage, dpo.key)
    assert set(manifest["dirs"]) == {"adapter", "merged"}
    assert any(f.endswith("merged/model.safetensors") or "model.safetensors" in f for f in manifest["files"])
    log_rows = store.read_rows(dpo)
    assert [r["step"] for r in log_rows if r["split"] == "train"] == list(range(1, manifest["metrics"]["steps"] + 1))


def test_second_run_is_served_entirely_from_cache(first_run):
    config, summary, _ = first_run
    again, states = run_flow(config)
    assert again == summary
    stage_states = {name: states[name] for name in STAGES}
    assert set(stage_states.values()) == {"Cached"}, stage_states


def test_changing_judge_mode_reruns_judge_and_downstream_only(first_run):
    config, summary, _ = first_run
    changed = config.model_copy(update={"judge": config.judge.model_copy(update={"mode": "base"})})
    new_summary, states = run_flow(changed)
    assert {s: states[s] for s in ("prompts", "sample")} == {"prompts": "Cached", "sample": "Cached"}
    assert {states[s] for s in ("judge", "pairs", "logprobs")} == {"Completed"}, states
    old, new = summary["rounds"][0], new_summary["rounds"][0]
    assert new["sample"]["uri"] == old["sample"]["uri"]
    assert new["judge"]["uri"] != old["judge"]["uri"]
    # keys follow content: training reruns only if the new verdicts picked other pairs to train on
    store = ArtifactStore(config.paths.resolved().artifact_root)
    same_input = content_hash(store, new["logprobs"]["uri"]) == content_hash(store, old["logprobs"]["uri"])
    assert states["train_dpo"] == ("Cached" if same_input else "Completed"), states
    assert (new["train_dpo"]["uri"] == old["train_dpo"]["uri"]) == same_input


def content_hash(store: ArtifactStore, uri: str) -> str:
    stage, key = uri.rstrip("/").split("/")[-2:]
    return store.manifest(stage, key)["content_hash"]


def test_bad_prompt_file_names_the_line_and_touches_nothing(first_run, tmp_path, capsys):
    from alignflow.cli import main

    config, _, _ = first_run
    store = ArtifactStore(config.paths.resolved().artifact_root)
    before = {m["uri"]: m["created_at"] for m in store.committed()}
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "c", "reference": "d"}\n{"prompt": oops}\n')
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(tiny_config_data(Path(config.model), Path(config.paths.home), prompts=str(bad))))
    assert main(["run", "self-improve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:3: bad JSON" in err[0]
    assert {m["uri"]: m["created_at"] for m in store.committed()} == before


@pytest.mark.parametrize(
    "content,expected",
    [
        ('{"prompt": "a"}\n', ":1: missing field 'reference'"),
        (
            '{"prompt": "a", "reference": "b"}\n{"prompt": "  ", "reference": "b"}\n',
            ":2: field 'prompt' must be non-empty",
        ),
    ],
)
def test_prompt_rows_are_validated(tmp_path, content, expected):
    from alignflow.tasks.prompts import PromptFileError, read_prompt_rows

    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(PromptFileError, match=expected):
        read_prompt_rows(path)


def test_missing_model_and_unknown_key_are_one_line_errors(tmp_path, capsys):
    from alignflow.cli import main

    assert main(["run", "self-improve", "model=/no/such/model", f"paths.home={tmp_path}"]) == 2
    assert "model '/no/such/model': no such directory" in capsys.readouterr().err
    assert main(["run", "self-improve", "judge.moed=base"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'judge.moed'" in err and "mode" in err
    assert main(["run", "self-improve", "sample.n=many"]) == 2
    assert "sample.n" in capsys.readouterr().err


def test_artifacts_cli_lists_and_shows_committed_artifacts(first_run, capsys):
    from alignflow.cli import main

    config, summary, _ = first_run
    root = config.paths.resolved().artifact_root
    assert main(["artifacts", "ls", "--root", root]) == 0
    listing = capsys.readouterr().out
    pairs_key = Path(summary["rounds"][0]["pairs"]["uri"]).name
    assert pairs_key in listing
    assert main(["artifacts", "show", pairs_key[:8], "--root", root, "--rows", "1"]) == 0
    shown = capsys.readouterr().out
    assert '"stage": "pairs"' in shown and '"chosen":' in shown


def test_second_round_samples_from_the_first_rounds_model(tiny_model_dir, tmp_path):
    config = SelfImproveConfig.model_validate(tiny_config_data(tiny_model_dir, tmp_path, rounds=2, dpo__epochs=1))
    summary, _ = run_flow(config)
    store = ArtifactStore(config.paths.resolved().artifact_root)
    first_model = Path(summary["rounds"][0]["train_dpo"]["uri"]).name
    second_sample = store.manifest("sample", Path(summary["rounds"][1]["sample"]["uri"]).name)
    second_reference = store.manifest("logprobs", Path(summary["rounds"][1]["logprobs"]["uri"]).name)
    assert first_model in [p["key"] for p in second_sample["parents"]]
    assert first_model in [p["key"] for p in second_reference["parents"]]


def test_sft_on_references_then_validation_pairs_pick_checkpoint_and_beta(tiny_model_dir, tmp_path):
    from alignflow.tasks.prompts import prompt_file, read_prompt_rows

    held_out = tmp_path / "validation.jsonl"  # demo instructions the first 6 (the training prompts) do not hold
    rows = read_prompt_rows(prompt_file("builtin:demo"))[6:10]
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = {"enabled": True, "lr": 1e-3, "batch_size": 4, "lora": {"r": 4, "alpha": 8}}
    data = tiny_config_data(
        tiny_model_dir, tmp_path, sft=sft, validation_prompts=str(held_out), dpo__beta=[0.05, 0.5], dpo__epochs=1
    )
    summary, states = run_flow(SelfImproveConfig.model_validate(data))
    [rnd] = summary["rounds"]
    store = ArtifactStore(str(tmp_path / "artifacts"))
    manifests = {name: store.manifest(*info["uri"].rstrip("/").split("/")[-2:]) for name, info in rnd.items()}

    assert states["train_ref_sft"] == "Completed" and manifests["train_ref_sft"]["metrics"]["val_rows"] == 4
    # the SFT model is round 1's policy, its DPO reference and (judge.model: initial) its judge
    for stage in ("sample", "judge", "logprobs", "validation_sample"):
        assert manifests["train_ref_sft"]["key"] in [p["key"] for p in manifests[stage]["parents"]], stage
    runs = {name: manifests[name]["metrics"] for name in rnd if name.startswith("train_dpo beta=")}
    assert set(runs) == {"train_dpo beta=0.05", "train_dpo beta=0.5"}
    for metrics in runs.values():  # every training pair trains; the validation prompts' pairs validate
        assert metrics["train_rows"] == rnd["pairs"]["rows_out"]
        assert metrics["val_rows"] == rnd["validation_pairs"]["rows_out"] and metrics["eval_split"] == "val"
    best = min(runs, key=lambda name: runs[name]["after_loss"])
    assert rnd["train_dpo"]["uri"] == rnd[best]["uri"]
