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
from transformers import AutoTokenizer

from alignflow.config import DPOConfig, GeniesScoringConfig
from alignflow.genies.data import GeniesDataError
from alignflow.genies.interventions import make_intervention
from alignflow.genies.interventions.ccs import CCSConfig
from alignflow.genies.interventions.cra import CRAConfig
from alignflow.genies.interventions.direction_probe import mass_mean_directions, preferred_rows
from alignflow.genies.interventions.lat_stim_1 import LatStimConfig
from alignflow.genies.interventions.lat_stim_2 import LatStimulusConfig
from alignflow.genies.interventions.lora_fine_tune import LoraFineTuneConfig, use_4bit
from alignflow.genies.interventions.lora_rm import LoraRewardConfig
from alignflow.genies.interventions.mass_mean import MassMeanShiftConfig
from alignflow.genies.interventions.mms import MmsConfig
from alignflow.genies.interventions.prompt_tuning import PromptTuningConfig
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
from alignflow.workers.models import load_backbone, load_causal_lm

SCORING = GeniesScoringConfig(max_tokens=512)  # the tiny BPE spends many tokens per word
SMALL_LORA = {"r": 4, "alpha": 8}
PARAMS = {
    "zero_shot": {},
    "few_shot": FewShotConfig(k=2).model_dump(mode="json"),
    "lora_reward_model": LoraRewardConfig(
        steps=3, batch_size=4, lora=SMALL_LORA | {"target_modules": ["q_proj", "v_proj"]}
    ).model_dump(mode="json"),
    "lora_fine_tune": LoraFineTuneConfig(
        steps=3, batch_size=4, lora=SMALL_LORA | {"target_modules": ["q_proj", "v_proj"]}
    ).model_dump(mode="json"),
    "prompt_tuning": PromptTuningConfig(steps=3, batch_size=4).model_dump(mode="json"),
    "mass_mean_shift": MassMeanShiftConfig().model_dump(mode="json"),
    "mms": MmsConfig().model_dump(mode="json"),  # top 16 heads of the tiny model's 8: all kept
    "lat_stim_1": LatStimConfig().model_dump(mode="json"),
    "lat_stim_2": LatStimulusConfig().model_dump(mode="json"),
    "dpo": DPOConfig(epochs=1, batch_size=4, lr=1e-3, lora=SMALL_LORA).model_dump(mode="json"),
    "cra": CRAConfig(top_heads=3).model_dump(mode="json"),
    "ccs": CCSConfig(epochs=20, tries=2).model_dump(mode="json"),
}


class Setup:
    def __init__(self, ctx: RunContext, model, data_dir: Path):
        self.ctx, self.model, self.data_dir = ctx, model, data_dir
        self.store = ctx.store()
        self.train_pairs = self.pairs("alpaca_short", "train", 8)
        self.test_pairs = self.pairs("alpaca_long", "test", 8)

    def pairs(self, distribution: str, split: str, cap: int | None):
        spec = pairs_spec(self.data_dir, distribution, split, SCORING.max_tokens, cap, 0)
        return GENIES_PAIRS.run(self.ctx, spec, model=self.model)

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
    # over-long records are dropped whole, as GENIES drops them, and counted
    tokenizer = AutoTokenizer.from_pretrained(setup.model.uri)
    records = json.loads((setup.data_dir / "distributions" / "alpaca_short" / "train.json").read_text())
    lengths = [
        [len(tokenizer(r["prompt"] + answer, add_special_tokens=False)["input_ids"]) for answer in r["responses"]]
        for r in records
    ]
    assert metrics["records_too_long"] == sum(max(ls) + 1 > SCORING.max_tokens for ls in lengths) > 0
    assert metrics["preferred_in_a"] == round(sum(r["preferred"] == 0 for r in rows) / 8, 3)
    # the same inputs are served from the committed artifact
    again = setup.pairs("alpaca_short", "train", 8)
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
def _genies_p_a(model, tokenizer, prompt: str, pair: dict) -> float:
    """P(A) by hand as GENIES's trainer computes it: each side unpadded, no special tokens
    but the response's EOS; summed response log-probs over the pair's longer length - 1."""
    sums, lengths = [], []
    for response in (pair["response_a"], pair["response_b"]):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = p + tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        sums.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(p), len(ids))))
        lengths.append(len(ids))
    divisor = max(lengths) - 1
    return 1.0 / (1.0 + math.exp((sums[1] - sums[0]) / divisor))


def test_zero_shot_is_the_softmax_of_length_normalised_logprobs(setup, tiny_model_dir):
    spec = InterventionSpec(name="zero_shot", scoring=SCORING)
    assert make_intervention(spec).trains is False
    rows = _check_evaluation(setup, setup.evaluate(spec))
    model, tokenizer = load_causal_lm(tiny_model_dir)
    for row, pair in list(zip(rows, setup.store.read_rows(setup.test_pairs)))[:4]:
        assert row["p_a"] == pytest.approx(_genies_p_a(model, tokenizer, pair["prompt"], pair), rel=1e-3, abs=1e-6)


def test_few_shot_puts_each_records_source_examples_first(setup, tiny_model_dir):
    spec = InterventionSpec(name="few_shot", params=PARAMS["few_shot"], scoring=SCORING)
    few_shot = make_intervention(spec)
    assert few_shot.full_train_split  # the flow trains it on the whole train split
    state = setup.train(spec)
    pool = json.loads((setup.state_dir(state) / "examples.json").read_text())
    source = setup.store.read_rows(setup.train_pairs)
    preferred = {p["prompt"]: (p["response_a"], p["response_b"])[p["preferred"]] for p in source}
    assert [e["prompt"] for e in pool] == list(preferred)  # one example per source record, its preferred answer
    assert all(preferred[e["prompt"]] == e["response"] for e in pool)
    rows = _check_evaluation(setup, setup.evaluate(spec, state))
    model, tokenizer = load_causal_lm(tiny_model_dir)
    for row, pair in list(zip(rows, setup.store.read_rows(setup.test_pairs)))[:3]:
        shots = few_shot.shots(pool, pair["prompt"])
        assert len(shots) == 2
        prompt = "".join(f"\n\n{e['prompt']}{e['response']}" for e in shots) + "\n\n" + pair["prompt"]
        # tokenized in pieces (examples, separator, prompt): equal to the whole only where BPE merges agree
        assert row["p_a"] == pytest.approx(_genies_p_a(model, tokenizer, prompt, pair), rel=2e-2, abs=1e-3)


def test_lora_reward_model(setup):
    spec = InterventionSpec(name="lora_reward_model", params=PARAMS["lora_reward_model"], scoring=SCORING)
    state = setup.train(spec)
    folder = setup.state_dir(state)
    assert (folder / "adapter" / "adapter_config.json").is_file() and (folder / "head.pt").is_file()
    assert len(json.loads((folder / "train_log.json").read_text())["loss"]) == 3
    metrics = setup.store.manifest(state.stage, state.key)["metrics"]
    assert metrics["steps"] == 3 and metrics["train_pairs"] == 8
    _check_evaluation(setup, setup.evaluate(spec, state))


def _check_classifier(setup, name: str) -> Path:
    """Train and evaluate a two-logit classifier (lora_fine_tune, prompt_tuning); its state folder."""
    spec = InterventionSpec(name=name, params=PARAMS[name], scoring=SCORING)
    state = setup.train(spec)
    metrics = setup.store.manifest(state.stage, state.key)["metrics"]
    assert metrics["steps"] == 3 and metrics["train_pairs"] == 8
    assert metrics["quantized_4bit"] == int(use_4bit(True))  # 4-bit only with bitsandbytes and CUDA
    ref = setup.evaluate(spec, state)
    rows = _check_evaluation(setup, ref)
    assert setup.store.manifest(ref.stage, ref.key)["metrics"]["quantized_4bit"] == metrics["quantized_4bit"]
    folder = setup.state_dir(state)
    pairs = setup.store.read_rows(setup.test_pairs)
    for seed in (1, 2):  # every trained part is restored: freshly drawn ones would change the scores
        torch.manual_seed(seed)
        again = make_intervention(spec).evaluate(setup.ctx.model_dir(setup.model), folder, pairs)
        assert again.p_a == pytest.approx([r["p_a"] for r in rows], abs=1e-6)
    return folder


def test_lora_fine_tune(setup, tiny_model_dir):
    folder = _check_classifier(setup, "lora_fine_tune")
    hidden = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    assert (folder / "adapter" / "adapter_config.json").is_file()
    head = torch.load(folder / "head.pt")
    assert list(head) == ["weight"] and head["weight"].shape == (2, hidden)  # two logits, no bias


def test_prompt_tuning(setup, tiny_model_dir):
    folder = _check_classifier(setup, "prompt_tuning")
    hidden = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    saved = {name: tuple(value.shape) for name, value in torch.load(folder / "prompt.pt").items()}
    assert saved == {"backbone.embeddings": (10, hidden), "head.weight": (2, hidden)}


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


def _check_direction_probe(setup, name: str, kept: list, width: int) -> torch.Tensor:
    """Train and evaluate mms / lat_stim_*: with top 16, every unit is kept once, the most
    accurate on the held-out pairs first; 8 pairs split 5 / 3. Returns the saved directions."""
    spec = InterventionSpec(name=name, params=PARAMS[name], scoring=SCORING)
    state = setup.train(spec)
    folder = setup.state_dir(state)
    probe = json.loads((folder / "probe.json").read_text())
    assert sorted(probe["kept"]) == kept and sorted(probe["units"]) == list(range(len(kept)))
    assert [probe["unit_accuracy"][u] for u in probe["units"]] == sorted(probe["unit_accuracy"], reverse=True)
    assert probe["fit_pairs"] == 5 and probe["val_pairs"] == 3  # int(8 * 0.7) fit the probes
    assert math.isfinite(probe["weight"]) and math.isfinite(probe["bias"])
    saved = torch.load(folder / "directions.pt")
    assert saved["units"] == probe["units"] and saved["directions"].shape == (len(kept), width)
    ref = setup.evaluate(spec, state)
    _check_evaluation(setup, ref)
    assert "mean_pair_score" in setup.store.manifest(ref.stage, ref.key)["metrics"]
    return saved["directions"]


def test_mms_directions_per_head(setup, tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    every_head = [[layer, head] for layer in range(layers) for head in range(heads)]  # unit = layer * heads + head
    _check_direction_probe(setup, "mms", every_head, config["hidden_size"] // heads)


def test_lat_stim_directions_per_layer_with_and_without_stimulus(setup, tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    layers = list(range(config["num_hidden_layers"]))  # the embeddings .. the last block's input
    plain = _check_direction_probe(setup, "lat_stim_1", layers, config["hidden_size"])
    stimulus = _check_direction_probe(setup, "lat_stim_2", layers, config["hidden_size"])
    assert not torch.allclose(plain, stimulus)  # the last token read is the stimulus's, not the response's


def test_dpo(setup):
    spec = InterventionSpec(name="dpo", params=PARAMS["dpo"], scoring=SCORING)
    state = setup.train(spec)
    folder = setup.state_dir(state)
    assert (folder / "merged" / "config.json").is_file() and (folder / "adapter").is_dir()
    assert setup.store.manifest(state.stage, state.key)["metrics"]["steps"] >= 1
    rows = _check_evaluation(setup, setup.evaluate(spec, state))
    assert any(r["p_a"] != 0.5 for r in rows)  # the trained policy moved away from the reference


def test_cra_probes_yes_minus_no_head_contrasts(setup, tiny_model_dir):
    spec = InterventionSpec(name="cra", params=PARAMS["cra"], scoring=SCORING)
    state = setup.train(spec)
    # each kept direction is the mass-mean direction of one head's Yes - No contrasts (3 distinct heads)
    model, tokenizer = load_backbone(tiny_model_dir, SCORING.dtype)
    train = setup.store.read_rows(setup.train_pairs)
    contrast, index, _ = make_intervention(spec).activations(model, tokenizer, train)
    preferred, dispreferred = preferred_rows(index, train)
    every_head = mass_mean_directions(contrast[preferred], contrast[dispreferred])
    kept = torch.load(setup.state_dir(state) / "directions.pt")["directions"]
    heads = torch.cdist(kept, every_head).argmin(dim=1)
    assert kept.shape == (3, every_head.shape[1]) and len(set(heads.tolist())) == 3
    torch.testing.assert_close(kept, every_head[heads], atol=1e-5, rtol=1e-4)
    ref = setup.evaluate(spec, state)
    _check_evaluation(setup, ref)
    assert "mean_pair_score" in setup.store.manifest(ref.stage, ref.key)["metrics"]


def test_ccs_orients_its_unsupervised_probe(setup):
    spec = InterventionSpec(name="ccs", params=PARAMS["ccs"], scoring=SCORING)
    state = setup.train(spec)
    folder = setup.state_dir(state)
    metrics = setup.store.manifest(state.stage, state.key)["metrics"]
    train = setup.store.read_rows(setup.train_pairs)
    assert metrics["responses"] == len({(p["prompt"], r) for p in train for r in (p["response_a"], p["response_b"])})
    assert metrics["train_accuracy"] >= 0.5 and metrics["negated"] in (0.0, 1.0) and math.isfinite(metrics["loss"])
    assert torch.load(folder / "probe.pt")["weight"].shape[0] == 1
    ref = setup.evaluate(spec, state)
    rows = _check_evaluation(setup, ref)
    assert any(r["p_a"] != 0.5 for r in rows)
    assert 0.0 < setup.store.manifest(ref.stage, ref.key)["metrics"]["mean_credence"] < 1.0


def test_unknown_intervention_is_an_error():
    built_in = (
        "ccs, cra, dpo, few_shot, lat_stim_1, lat_stim_2, lora_fine_tune, lora_reward_model, mass_mean_shift, mms, "
        "prompt_tuning, zero_shot"
    )
    with pytest.raises(ValueError, match=f"unknown intervention 'nope'; built in: {built_in}$"):
        make_intervention(InterventionSpec(name="nope"))


# -- the public script contract ------------------------------------------------
# Scripts as GENIES's own are written: fire parses the flags, lists arrive as Python-literal strings.
TRAIN_PY = """
import json, os, fire

def main(model_dir, output_dir, training_distribution_dir, test_distribution_dirs):
    assert isinstance(test_distribution_dirs, list), type(test_distribution_dirs)
    train = json.load(open(os.path.join(training_distribution_dir, "train.json")))
    tests = [json.load(open(os.path.join(d, "test.json"))) for d in test_distribution_dirs]
    os.makedirs(output_dir, exist_ok=True)
    rule = {"rule": "longest", "trained_on": len(train), "test_records": [len(t) for t in tests], "base": model_dir}
    json.dump(rule, open(os.path.join(output_dir, "rule.json"), "w"))

fire.Fire(main)
"""

EVAL_PY = """
import json, os, fire

def p_preferred(record, other):
    preferred = max(record["responses"], key=record["responses"].get)
    return 0.9 if len(preferred) > len(other) else 0.1

def main(distribution_dirs, model_dir=None, output_paths=None):
    assert isinstance(distribution_dirs, list) and isinstance(output_paths, list)
    rule = json.load(open(os.path.join(model_dir, "rule.json")))
    for folder, out in zip(distribution_dirs, output_paths):
        assert json.load(open(os.path.join(folder, "train.json"))) == []  # both files are always there
        records = json.load(open(os.path.join(folder, "test.json")))
        # GENIES's order: each record's pairs in turn, one per dispreferred response
        p = [p_preferred(r, o) for r in records for o, label in r["responses"].items() if label == 0]
        json.dump({"eval_accuracy": sum(x > 0.5 for x in p) / len(p), "eval_probabilities": p,
                   "records": len(records), "trained_on": rule["trained_on"], "note": "not a number"},
                  open(out, "w"))

fire.Fire(main)
"""

# GENIES's README flags, kept as an option (contract: readme)
README_EVAL_PY = """
import argparse, json, os
parser = argparse.ArgumentParser()
parser.add_argument("--model_dir", required=True)
parser.add_argument("--distribution_dirs", nargs="+", required=True)
parser.add_argument("--output_paths", nargs="+", required=True)
args = parser.parse_args()
for folder, out in zip(args.distribution_dirs, args.output_paths):
    records = json.load(open(os.path.join(folder, "test.json")))
    json.dump({"eval_accuracy": 0.25, "records": len(records)}, open(out, "w"))
"""


def _scripts(folder: Path, **files: str) -> Path:
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(text))
    return folder


def _longest_p(pair: dict) -> float:
    preferred, other = (pair["response_a"], pair["response_b"])[:: 1 if pair["preferred"] == 0 else -1]
    return 0.9 if len(preferred) > len(other) else 0.1


def _script_spec(name: str, folder: Path, contract: str = "api") -> InterventionSpec:
    return InterventionSpec(
        name=name, scoring=SCORING, script_dir=str(folder), script_sha256=_scripts_hash(folder), contract=contract
    )


def test_a_fire_style_script_runs_unchanged(setup, tmp_path):
    spec = _script_spec("longest", _scripts(tmp_path / "longest", train=TRAIN_PY, eval=EVAL_PY))
    assert make_intervention(spec).trains is True
    source_test = setup.pairs("alpaca_short", "test", 6)
    state = GENIES_TRAIN.run(setup.ctx, spec, model=setup.model, pairs=setup.train_pairs, test_pairs=source_test)
    rule = json.loads((setup.state_dir(state) / "model" / "rule.json").read_text())
    train_rows = setup.store.read_rows(setup.train_pairs)
    assert rule["trained_on"] == len({p["prompt"] for p in train_rows})  # every record, every response
    assert rule["test_records"] == [len({p["prompt"] for p in setup.store.read_rows(source_test)})]
    assert rule["base"] == setup.model.uri
    for pairs in (setup.test_pairs, setup.pairs("alpaca_mmlu", "test", 12)):
        ref = setup.evaluate(spec, state, pairs=pairs)
        metrics = setup.store.manifest(ref.stage, ref.key)["metrics"]
        rows = setup.store.read_rows(pairs)
        expected = [_longest_p(p) for p in rows]  # the script's probabilities, matched to our pairs
        assert [r["p_preferred"] for r in setup.store.read_rows(ref)] == pytest.approx(expected)
        assert metrics["accuracy"] == pytest.approx(sum(x > 0.5 for x in expected) / len(rows))
        assert metrics["script_eval_accuracy"] == pytest.approx(metrics["accuracy"])
        assert metrics["records"] == len({p["prompt"] for p in rows}) and metrics["trained_on"] == rule["trained_on"]
        assert "note" not in metrics and metrics["pairs"] == len(rows)


def test_a_readme_style_script_reports_accuracy_only(setup, tmp_path):
    spec = _script_spec("readme", _scripts(tmp_path / "readme", eval=README_EVAL_PY), contract="readme")
    assert make_intervention(spec).trains is False  # no train.py: evaluated on the base model
    ref = setup.evaluate(spec)
    rows = setup.store.read_rows(setup.test_pairs)
    assert setup.store.manifest(ref.stage, ref.key)["metrics"]["accuracy"] == 0.25
    assert setup.store.read_rows(ref) == [  # no per-pair probabilities from an accuracy-only script
        {"pair_id": p["pair_id"], "preferred": p["preferred"], "p_a": None, "p_preferred": None} for p in rows
    ]


def test_script_eval_without_eval_accuracy_is_an_error(setup, tmp_path):
    folder = _scripts(
        tmp_path / "noacc",
        eval="""
        import json, fire
        def main(model_dir, distribution_dirs, output_paths):
            json.dump({"accuracy": 1.0}, open(output_paths[0], "w"))
        fire.Fire(main)
    """,
    )
    spec = _script_spec("noacc", folder)
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
