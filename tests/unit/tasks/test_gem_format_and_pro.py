"""One format from training to scoring (GEM): what SFT, DPO/IPO, PRO and preference
accuracy see of (prompt, answer) is the same token ids in either format, and sampling
adds only the step-by-step instruction; PRO's listwise loss by hand and on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from alignflow.config import DEFAULT_INSTRUCTIONS, GemConfig, PROConfig, SFTConfig, TextFormat
from alignflow.flows.gem import with_format
from alignflow.tasks.train_pro import pro_groups, pro_loss, pro_objective
from alignflow.tasks.train_sft import sft_examples
from alignflow.workers.chat import encode_pair, fit_prompt
from alignflow.workers.scoring import sequence_logprob_sums

PLAIN = TextFormat(style="plain", instruction=DEFAULT_INSTRUCTIONS["plain"])
CHAT = TextFormat(style="chat", instruction=DEFAULT_INSTRUCTIONS["chat"])
PAIRS = [
    {"prompt_id": "p1", "prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
    {"prompt_id": "p1", "prompt": "Capital of France?", "chosen": "Paris", "rejected": "Berlin, said <|im_end|>"},
    {"prompt_id": "p2", "prompt": "2+2?", "chosen": "4", "rejected": "5"},
]


@pytest.mark.parametrize("fmt", [PLAIN, CHAT], ids=["plain", "chat"])
def test_sft_trains_the_tokens_that_preference_accuracy_and_pro_score(tokenizer, fmt):
    eos = [tokenizer.eos_token_id]
    sft = {r["prompt_id"]: r for r in sft_examples(tokenizer, eos, PAIRS, SFTConfig(format=fmt))}
    pro = {g["prompt_id"]: g for g in pro_groups(tokenizer, eos, PAIRS, PROConfig(format=fmt))}
    for pair in PAIRS:
        scored = encode_pair(tokenizer, pair, eos, 512, 256, fmt)  # pref_accuracy's and logprobs' encoding
        assert scored["prompt_ids"] == sft[pair["prompt_id"]]["prompt_ids"] == pro[pair["prompt_id"]]["prompt_ids"]
        assert scored["chosen_ids"] == sft[pair["prompt_id"]]["target_ids"] == pro[pair["prompt_id"]]["responses"][0]
        assert scored["rejected_ids"] in pro[pair["prompt_id"]]["responses"][1:]


def test_plain_sampling_adds_the_instruction_line_and_scoring_does_not(tokenizer):
    _, sampled, _ = fit_prompt(tokenizer, "Capital of France?", 512, PLAIN, reasoning=True)
    _, scored, _ = fit_prompt(tokenizer, "Capital of France?", 512, PLAIN)
    assert tokenizer.decode(sampled) == "Capital of France?\n\nLet's think step by step.\n"
    assert tokenizer.decode(scored) == "Capital of France?\n\n"


def test_chat_puts_the_instruction_in_a_system_turn_everywhere(tokenizer):
    _, sampled, _ = fit_prompt(tokenizer, "Capital of France?", 512, CHAT, reasoning=True)
    _, scored, _ = fit_prompt(tokenizer, "Capital of France?", 512, CHAT)
    assert sampled == scored
    text = tokenizer.decode(sampled)
    assert text.index(CHAT.instruction) < text.index("Capital of France?")


def test_a_special_token_string_in_a_plain_answer_stays_text(tokenizer):
    ids = encode_pair(tokenizer, PAIRS[1], [tokenizer.eos_token_id], 512, 256, PLAIN)["rejected_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids[-1] == tokenizer.eos_token_id and end not in ids[:-1]


def test_the_flow_gives_every_text_stage_the_runs_one_format():
    config = with_format(GemConfig(format="chat"))
    formats = {name: getattr(config, name).format for name in ("sft", "sample", "logprobs", "pro", "pref_accuracy")}
    assert set(formats.values()) == {CHAT}
    assert with_format(GemConfig(instruction="Think first.")).sample.format == TextFormat(
        style="plain", instruction="Think first."
    )


# -- PRO -------------------------------------------------------------------------
def test_pro_loss_by_hand():
    r = torch.tensor([-1.0, -2.0, -3.0])
    e = [math.exp(v) for v in (-1.0, -2.0, -3.0)]
    full = -(math.log(e[0] / sum(e)) + math.log(e[1] / (e[1] + e[2])))
    assert float(pro_loss(r, terms=2)) == pytest.approx(full)
    assert float(pro_loss(r, terms=1)) == pytest.approx(-math.log(e[0] / sum(e)))  # best over an unranked rest
    two = torch.tensor([0.5, -0.5])  # a pair: -log sigmoid(r_w - r_l)
    assert float(pro_loss(two, terms=1)) == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))


def test_pairs_become_one_ranking_per_prompt_and_chosen_answer(tokenizer):
    groups = pro_groups(tokenizer, [tokenizer.eos_token_id], PAIRS, PROConfig())
    assert [(g["prompt_id"], len(g["responses"]), g["terms"]) for g in groups] == [("p1", 3, 1), ("p2", 2, 1)]


def test_pro_objective_is_the_formula_on_mean_token_log_probs(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = PROConfig(sft_weight=0.5)
    groups = pro_groups(tokenizer, [tokenizer.eos_token_id], PAIRS, config)
    with torch.no_grad():
        loss, metrics = pro_objective(config, tokenizer.pad_token_id).batch_loss(model, groups)
    expected = []
    for g in groups:
        sums = sequence_logprob_sums(
            model, tokenizer.pad_token_id, [g["prompt_ids"]] * len(g["responses"]), g["responses"], 4096
        )
        means = [s / len(r) for s, r in zip(sums, g["responses"])]
        ranking = -math.log(math.exp(means[0]) / sum(math.exp(m) for m in means))
        expected.append(ranking + 0.5 * -means[0])
    assert float(loss) == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert metrics["loss"] == pytest.approx(metrics["pro_loss"] + 0.5 * metrics["sft_loss"], rel=1e-6)
