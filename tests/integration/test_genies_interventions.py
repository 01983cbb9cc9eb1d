"""Every built-in GENIES intervention, and the public script contract, end to end
through the GENIES stages (genies/stages.py) on real distributions and the tiny model:
train on alpaca_short, evaluate on alpaca_long. No Prefect here: Stage.run commits
the same artifacts the flow's tasks do."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

from alignflow.config import DPOConfig, GeniesScoringConfig
from alignflow.genies.data import GeniesDataError
from alignflow.genies.interventions import make_intervention
from alignflow.genies.interventions.lora_rm import LoraRewardConfig
from alignflow.genies.interventions.mass_mean import MassMeanShiftConfig
from alignflow.genies.interventions.script import ScriptIntervention
from alignflow.genies.interventions.zero_shot import FewShotConfig
from alignflow.genies.stages import (
    GENIES_EVALUATE,
    GENIES_PAIRS,
    GENIES_TRAIN,
    InterventionSpec,
    _scripts_hash,
    pairs_spec,
)
from alignflow.tasks.base_model import base_model_ref
from alignflow.tasks.stage import RunContext
from alignflow.workers.models import load_causal_lm

SCORING = GeniesScoringConfig(max_tokens=128)
SMALL_LORA = {"r": 4, "alpha": 8}
PARAMS = {
    "zero_shot": {},
    "few_shot": FewShotConfig(k=2).model_dump(mode="json"),
    "lora_reward_model": LoraRewardConfig(
        steps=3, batch_size=4, lora=SMALL_LORA | {"target_modules": ["q_proj", "v_proj"]}
    ).model_dump(mode="json"),
    "mass_mean_shift": MassMeanShiftConfig().model_dump(mode="json"),
    "dpo": DPOConfig(epochs=1, batch_size=4, lr=1e-3, lora=SMALL_LORA).model_dump(mode="json"),
}


class Setup:
    def __init__(self, ctx: RunContext, model, data_dir: Path):
        self.ctx, self.model, self.data_dir = ctx, model, data_dir
        self.store = ctx.store()
        self.train_pairs = GENIES_PAIRS.run(ctx, pairs_spec(data_dir, "alpaca_short", "train", 8, 0))
        self.test_pairs = GENIES_PAIRS.run(ctx, pairs_spec(data_dir, "alpaca_long", "test", 8, 0))

    def train(self, spec: InterventionSpec):
        return GENIES_TRAIN.run(self.ctx, spec, model=self.model, pairs=self.train_pairs)

    def evaluate(self, spec: InterventionSpec, state=None, pairs=None):
        parents = {"model": self.model, "pairs": pairs or self.test_pairs} | ({"state": state} if state else {})
        return GENIES_EVALUATE.run(self.ctx, spec, **parents)

    def state_dir(self, ref) -> Path:
        return self.store.local_dir(ref, "state", Path(self.ctx.model_cache) / "artifacts")


@pytest.fixture(scope="module")
def setup(tiny_model_dir, genies_data_dir, tmp_path_factory) -> Setup:
    home = tmp_path_factory.mktemp("genies-interventions")
    ctx = RunContext(artifact_root=str(home / "artifacts"), model_cache=str(home / "models"))
    return Setup(ctx, base_model_ref(str(tiny_model_dir), ctx.model_cache), genies_data_dir)


def test_pairs_stage_caps_and_shuffles(setup):
    rows = setup.store.read_rows(setup.train_pairs)
    assert len(rows) == 8 and all(r["pair_id"].startswith("alpaca_short/train/") for r in rows)
    metrics = setup.store.manifest(setup.train_pairs.stage, setup.train_pairs.key)["metrics"]
    assert metrics["records"] == 600 and metrics["rows_out"] == 8
    assert metrics["preferred_in_a"] == round(sum(r["preferred"] == 0 for r in rows) / 8, 3)
    # the same inputs are served from the committed artifact
    again = GENIES_PAIRS.run(setup.ctx, pairs_spec(setup.data_dir, "alpaca_short", "train", 8, 0))
    assert again == setup.train_pairs


def _check_evaluation(setup, ref) -> list[dict]:
    rows = setup.store.read_rows(ref)
    pairs = setup.store.read_rows(setup.test_pairs)
    assert [r["pair_id"] for r in rows] == [p["pair_id"] for p in pairs]  # one probability per pair, in order
    assert all(0.0 <= r["p_a"] <= 1.0 and math.isfinite(r["p_a"]) for r in rows)
    for r, p in zip(rows, pairs):
        assert r["p_preferred"] == pytest.approx(r["p_a"] if p["preferred"] == 0 else 1.0 - r["p_a"])
    metrics = setup.store.manifest(ref.stage, ref.key)["metrics"]
    correct = [1.0 if r["p_preferred"] > 0.5 else 0.5 if r["p_preferred"] == 0.5 else 0.0 for r in rows]
    assert metrics["pairs"] == 8 and metrics["accuracy"] == pytest.approx(sum(correct) / 8)
    assert 0.0 <= metrics["brier"] <= 1.0 and 0.0 <= metrics["ece"] <= 1.0
    return rows


@torch.inference_mode()
def _summed_logprob(model, tokenizer, prompt: str, response: str, max_tokens: int) -> float:
    """log p(response + EOS | prompt) of one unpadded sequence, by hand, truncated as documented:
    the response keeps its first max_tokens/2 - 1 tokens, the prompt its last tokens that still fit."""
    r = tokenizer(response, add_special_tokens=False)["input_ids"][: max_tokens // 2 - 1] + [tokenizer.eos_token_id]
    p = tokenizer(prompt)["input_ids"][-(max_tokens - len(r)) :]
    ids = p + r
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(p), len(ids)))


def test_zero_shot_is_the_softmax_of_summed_logprobs(setup, tiny_model_dir):
    spec = InterventionSpec(name="zero_shot", scoring=SCORING)
    assert make_intervention(spec).trains is False
    rows = _check_evaluation(setup, setup.evaluate(spec))
    model, tokenizer = load_causal_lm(tiny_model_dir)
    for row, pair in list(zip(rows, setup.store.read_rows(setup.test_pairs)))[:4]:
        a = _summed_logprob(model, tokenizer, pair["prompt"], pair["response_a"], SCORING.max_tokens)
        b = _summed_logprob(model, tokenizer, pair["prompt"], pair["response_b"], SCORING.max_tokens)
        assert row["p_a"] == pytest.approx(1.0 / (1.0 + math.exp(b - a)), rel=1e-3, abs=1e-6)


def test_few_shot_prepends_source_examples(setup):
    spec = InterventionSpec(name="few_shot", params=PARAMS["few_shot"], scoring=SCORING)
    state = setup.train(spec)
    examples = json.loads((setup.state_dir(state) / "examples.json").read_text())
    source = setup.store.read_rows(setup.train_pairs)
    preferred = {p["prompt"]: (p["response_a"], p["response_b"])[p["preferred"]] for p in source}
    assert len(examples) == 2
    assert all(preferred[e["prompt"]] == e["response"] for e in examples)  # source prompts, preferred answers
    rows = _check_evaluation(setup, setup.evaluate(spec, state))
    zero = setup.store.read_rows(setup.evaluate(InterventionSpec(name="zero_shot", scoring=SCORING)))
    # the prefix changes the scores (length dominates the summed log-probs, so compare relatively)
    assert [r["p_a"] for r in rows] != pytest.approx([r["p_a"] for r in zero], rel=1e-3, abs=0)


def test_lora_reward_model(setup):
    spec = InterventionSpec(name="lora_reward_model", params=PARAMS["lora_reward_model"], scoring=SCORING)
    state = setup.train(spec)
    folder = setup.state_dir(state)
    assert (folder / "adapter" / "adapter_config.json").is_file() and (folder / "head.pt").is_file()
    assert len(json.loads((folder / "train_log.json").read_text())["loss"]) == 3
    metrics = setup.store.manifest(state.stage, state.key)["metrics"]
    assert metrics["steps"] == 3 and metrics["train_pairs"] == 8
    _check_evaluation(setup, setup.evaluate(spec, state))


def test_mass_mean_shift_probe_lists_its_layers(setup, tiny_model_dir):
    spec = InterventionSpec(name="mass_mean_shift", params=PARAMS["mass_mean_shift"], scoring=SCORING)
    state = setup.train(spec)
    folder = setup.state_dir(state)
    probe = json.loads((folder / "probe.json").read_text())
    layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert sorted(probe["layers"]) == list(range(layers))  # top_layers 16 > 2: every layer is kept, once
    assert len(probe["layer_accuracy"]) == layers
    assert probe["fit_pairs"] + probe["held_out_pairs"] in (8, 16)  # split by record, or in-sample on both
    assert math.isfinite(probe["weight"]) and "bias" not in probe  # symmetric in A and B
    saved = torch.load(folder / "directions.pt")
    assert saved["layers"].tolist() == probe["layers"] and saved["directions"].shape[0] == layers
    ref = setup.evaluate(spec, state)
    _check_evaluation(setup, ref)
    assert "mean_pair_score" in setup.store.manifest(ref.stage, ref.key)["metrics"]


def test_dpo(setup):
    spec = InterventionSpec(name="dpo", params=PARAMS["dpo"], scoring=SCORING)
    state = setup.train(spec)
    folder = setup.state_dir(state)
    assert (folder / "merged" / "config.json").is_file() and (folder / "adapter").is_dir()
    assert setup.store.manifest(state.stage, state.key)["metrics"]["steps"] >= 1
    rows = _check_evaluation(setup, setup.evaluate(spec, state))
    assert any(r["p_a"] != 0.5 for r in rows)  # the trained policy moved away from the reference


def test_unknown_intervention_is_an_error():
    built_in = "dpo, few_shot, lora_reward_model, mass_mean_shift, zero_shot"
    with pytest.raises(ValueError, match=f"unknown intervention 'nope'; built in: {built_in}$"):
        make_intervention(InterventionSpec(name="nope"))


# -- the public script contract ------------------------------------------------
TRAIN_PY = """
import argparse, json, os
parser = argparse.ArgumentParser()
parser.add_argument("--model_dir", required=True)
parser.add_argument("--train_distribution", required=True)
parser.add_argument("--output_dir", required=True)
args = parser.parse_args()
records = json.load(open(os.path.join(args.train_distribution, "train.json")))
os.makedirs(args.output_dir, exist_ok=True)
json.dump({"rule": "longest", "trained_on": len(records), "base": args.model_dir},
          open(os.path.join(args.output_dir, "rule.json"), "w"))
"""

EVAL_PY = """
import argparse, json, os
parser = argparse.ArgumentParser()
parser.add_argument("--model_dir", required=True)
parser.add_argument("--distribution_dirs", nargs="+", required=True)
parser.add_argument("--output_paths", nargs="+", required=True)
args = parser.parse_args()
rule = json.load(open(os.path.join(args.model_dir, "rule.json")))
for folder, out in zip(args.distribution_dirs, args.output_paths):
    records = json.load(open(os.path.join(folder, "test.json")))
    def right(record):
        preferred = max(record["responses"], key=record["responses"].get)
        return all(len(preferred) > len(r) for r in record["responses"] if r != preferred)
    json.dump({"eval_accuracy": sum(map(right, records)) / len(records), "records": len(records),
               "trained_on": rule["trained_on"], "note": "not a number, dropped"}, open(out, "w"))
"""


def _scripts(folder: Path, **files: str) -> Path:
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(text))
    return folder


def _longest_accuracy(pairs: list[dict]) -> float:
    """Share of records (pairs grouped by prompt) whose preferred response is strictly the longest."""
    records: dict[str, tuple[str, set[str]]] = {}
    for p in pairs:
        preferred = (p["response_a"], p["response_b"])[p["preferred"]]
        records.setdefault(p["prompt"], (preferred, set()))[1].update({p["response_a"], p["response_b"]})
    right = [all(len(pref) > len(r) for r in texts - {pref}) for pref, texts in records.values()]
    return sum(right) / len(right)


def test_script_contract_adapter(setup, tmp_path):
    folder = _scripts(tmp_path / "longest", train=TRAIN_PY, eval=EVAL_PY)
    spec = InterventionSpec(
        name="longest", scoring=SCORING, script_dir=str(folder), script_sha256=_scripts_hash(folder)
    )
    assert make_intervention(spec).trains is True
    state = setup.train(spec)
    rule = json.loads((setup.state_dir(state) / "model" / "rule.json").read_text())
    assert rule["trained_on"] == len({p["prompt"] for p in setup.store.read_rows(setup.train_pairs)})
    assert rule["base"] == setup.model.uri
    mmlu = GENIES_PAIRS.run(setup.ctx, pairs_spec(setup.data_dir, "alpaca_mmlu", "test", 12, 0))
    for pairs in (setup.test_pairs, mmlu):
        ref = setup.evaluate(spec, state, pairs=pairs)
        metrics = setup.store.manifest(ref.stage, ref.key)["metrics"]
        rows = setup.store.read_rows(pairs)
        assert metrics["accuracy"] == pytest.approx(_longest_accuracy(rows))
        assert metrics["records"] == len({p["prompt"] for p in rows}) and metrics["trained_on"] == rule["trained_on"]
        assert "note" not in metrics and metrics["pairs"] == len(rows)
        assert setup.store.read_rows(ref) == [  # no per-pair probabilities from an accuracy-only script
            {"pair_id": p["pair_id"], "preferred": p["preferred"], "p_a": None, "p_preferred": None} for p in rows
        ]
    assert 0.0 < _longest_accuracy(setup.store.read_rows(mmlu)) < 1.0  # a non-trivial number to match


def test_script_eval_without_eval_accuracy_is_an_error(setup, tmp_path):
    folder = _scripts(
        tmp_path / "noacc",
        eval="""
        import argparse, json
        p = argparse.ArgumentParser()
        p.add_argument("--model_dir")
        p.add_argument("--distribution_dirs", nargs="+")
        p.add_argument("--output_paths", nargs="+")
        a = p.parse_args()
        json.dump({"accuracy": 1.0}, open(a.output_paths[0], "w"))
    """,
    )
    spec = InterventionSpec(name="noacc", scoring=SCORING, script_dir=str(folder), script_sha256=_scripts_hash(folder))
    assert make_intervention(spec).trains is False  # no train.py: evaluated on the base model
    before = setup.store.committed()
    with pytest.raises(GeniesDataError, match=r"result\.json: no numeric 'eval_accuracy' \(keys: \['accuracy'\]\)"):
        setup.evaluate(spec)
    assert setup.store.committed() == before  # nothing committed


def test_script_failures_are_reported(setup, tmp_path):
    with pytest.raises(GeniesDataError, match="has no eval.py"):
        make_intervention(InterventionSpec(name="empty", script_dir=str(_scripts(tmp_path / "empty", train=TRAIN_PY))))
    crash = _scripts(tmp_path / "crash", eval="import sys\nprint('bad model dir', file=sys.stderr)\nsys.exit(3)\n")
    pairs = setup.store.read_rows(setup.test_pairs)
    with pytest.raises(RuntimeError, match="intervention 'crash': eval.py exited with 3: bad model dir"):
        ScriptIntervention("crash", crash).evaluate(Path(setup.model.uri), None, pairs)
    silent = _scripts(tmp_path / "silent", eval="pass\n")
    with pytest.raises(GeniesDataError, match="eval.py wrote no result file"):
        ScriptIntervention("silent", silent).evaluate(Path(setup.model.uri), None, pairs)
