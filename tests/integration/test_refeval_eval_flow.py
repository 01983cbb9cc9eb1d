"""`alignflow run refeval-eval` on the tiny model: a "trained" policy (a perturbed copy of the
tiny model, committed as a train_dpo artifact) against the tiny model on held-out instructions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_config_data

from alignflow.storage.artifacts import ArtifactStore
from alignflow.tasks.prompts import prompt_source, read_prompt_rows, read_prompts
from alignflow.tasks.win_rate import Matchup, win_rate_metrics

POLICY_KEY = "0123456789abcdef0123"


def perturbed_copy(model_dir: Path, out: Path) -> Path:
    """The tiny model with seeded noise on every weight: greedy answers that differ from its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * p.std() * torch.randn_like(p))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("eval-home")
    base = tiny_config_data(tiny_model_dir, home)
    store = ArtifactStore(str(home / "artifacts"))
    policy_dir = perturbed_copy(tiny_model_dir, tmp_path_factory.mktemp("policy"))
    store.commit("train_dpo", POLICY_KEY, local_dirs={"merged": policy_dir})
    config = {
        "model": base["model"],
        "policy": f"artifact:{POLICY_KEY[:8]}",
        "prompts": "builtin:heldout",
        "limit_prompts": 4,
        "paths": base["paths"],
        "sample": {**base["sample"], "n": 1},  # sampled: greedy, a random model only repeats one token
        "judge": base["judge"],
    }
    path = home / "eval.json"
    path.write_text(json.dumps(config))
    return store, path


def test_cli_run_reports_the_arithmetic_of_its_own_judgments(evaluated, capsys):
    from alignflow.cli import main
    from alignflow.flows.refeval_eval import refeval_eval_markdown

    store, config_path = evaluated
    assert main(["run", "refeval-eval", "--config", str(config_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    result = store.find(Path(summary["win_rate"]["uri"]).name)
    manifest = store.manifest(result.stage, result.key)
    parents = {p["stage"]: store.ref(p["stage"], p["key"]) for p in manifest["parents"]}
    answers = {(r["prompt_id"], r["candidate"]): r["response"] for r in store.read_rows(parents["matchups"])}
    verdicts = {(j["prompt_id"], j["a"]): j["p_a"] for j in store.read_rows(parents["judge"])}
    held_out = read_prompts(prompt_source("builtin:heldout", 4))

    # each instruction whose two answers differ was judged in both orders (0 = the policy, 1 = the initial model)
    differ = [p["id"] for p in held_out if answers[(p["id"], 0)] != answers[(p["id"], 1)]]
    assert differ and set(verdicts) == {(pid, side) for pid in differ for side in (0, 1)}
    assert summary["answers"]["identical_answers"] == len(held_out) - len(differ)
    expected = win_rate_metrics(
        [
            Matchup(
                pid,
                verdicts.get((pid, 0)),
                1 - verdicts[(pid, 1)] if (pid, 1) in verdicts else None,
                len(answers[(pid, 0)]),
                len(answers[(pid, 1)]),
            )
            for pid in (p["id"] for p in held_out)
        ]
    )
    assert {k: manifest["metrics"][k] for k in expected} == expected
    assert {k: summary["win_rate"][k] for k in expected} == expected
    assert summary["judge"] == "initial" and summary["policy"] == f"artifact:{POLICY_KEY[:8]}"
    assert f"{expected['win_rate']:.3f}" in refeval_eval_markdown(summary)

    # the AlpacaEval exports read back as prompts whose references are that model's answers
    for side, candidate in (("policy", 0), ("initial", 1)):
        path = Path(summary["alpaca_eval"][side])
        records = json.loads(path.read_text())
        assert {r["generator"] for r in records} == {summary[side]}
        assert [(r["prompt"], r["reference"]) for r in read_prompt_rows(path)] == [
            (p["prompt"], answers[(p["id"], candidate)]) for p in held_out
        ]
