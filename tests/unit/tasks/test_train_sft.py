"""GEM's SFT stage: the chosen-answer target (both repositories) and the contrast
extension, examples in either format, label masking and the loss on the tiny model;
and the HF backend's per-step entropies of the raw next-token distribution, which
entropy filtering scores."""

from __future__ import annotations

import pytest
import torch

from alignflow.config import SFTConfig, TextFormat
from alignflow.tasks.train_sft import IGNORE, clip_text, sft_examples, sft_labels, sft_objective, sft_target
from alignflow.workers.backend import GenerationParams
from alignflow.workers.chat import prompt_ids
from alignflow.workers.hf import HFBackend
from alignflow.workers.scoring import pack, token_entropy

MARKER = "Final Answer:"
LONG_CHOSEN = "Paris is the capital of France and also its largest city by far"
PAIR = {"prompt_id": "p1", "prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"}


# -- targets ---------------------------------------------------------------------
def test_the_default_target_is_the_chosen_answer_as_upstream_trains(tokenizer):
    assert sft_target(tokenizer, PAIR, SFTConfig()) == "Paris"
    assert sft_target(tokenizer, {**PAIR, "chosen": LONG_CHOSEN}, SFTConfig(max_answer_tokens=4)) == clip_text(
        tokenizer, LONG_CHOSEN, 4
    )


def test_target_with_contrast_reasons_from_the_rejected_answer(tokenizer):
    target = sft_target(tokenizer, PAIR, SFTConfig(target="contrast"))
    reasoning, answer = target.split(MARKER)
    assert "Rome" in reasoning and "Paris" not in reasoning
    assert answer.strip() == "Paris"
    assert "{rejected}" not in target


def test_answers_are_clipped_to_max_answer_tokens(tokenizer):
    pair = {**PAIR, "chosen": LONG_CHOSEN, "rejected": "Rome is the capital of France, said the first draft"}
    config = SFTConfig(target="contrast", max_answer_tokens=4)
    clipped_chosen = clip_text(tokenizer, pair["chosen"], 4)
    clipped_rejected = clip_text(tokenizer, pair["rejected"], 4)
    assert len(tokenizer(clipped_chosen, add_special_tokens=False)["input_ids"]) == 4
    assert clipped_chosen != pair["chosen"] and pair["chosen"].startswith(clipped_chosen)
    target = sft_target(tokenizer, pair, config)
    reasoning, answer = target.split(MARKER)
    assert answer == f" {clipped_chosen}"
    assert clipped_rejected in reasoning and pair["rejected"] not in reasoning


def test_rejected_text_with_braces_survives_unchanged(tokenizer):
    rejected = "use {braces}, {0} and even {rejected} literally"
    target = sft_target(tokenizer, {**PAIR, "rejected": rejected}, SFTConfig(target="contrast"))
    assert rejected in target.split(MARKER)[0]


# -- examples --------------------------------------------------------------------
PAIRS = [
    {"prompt_id": "p1", "prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
    {"prompt_id": "p1", "prompt": "Capital of France?", "chosen": "Paris", "rejected": "Berlin"},
    {"prompt_id": "p2", "prompt": "2+2?", "chosen": "4", "rejected": "5"},
]


def test_pairs_sharing_prompt_and_chosen_answer_give_one_example(tokenizer):
    eot = tokenizer.eos_token_id
    rows = sft_examples(tokenizer, [eot], PAIRS, SFTConfig())
    assert [r["prompt_id"] for r in rows] == ["p1", "p2"]
    assert rows[0]["prompt_ids"] == prompt_ids(tokenizer, "Capital of France?")
    assert tokenizer.decode(rows[0]["target_ids"][:-1]) == "Paris"


def test_plain_examples_are_the_prompt_a_blank_line_and_the_answer_then_eos(tokenizer):
    plain = TextFormat(style="plain", instruction="Let's think step by step.")
    [row, _] = sft_examples(tokenizer, [tokenizer.eos_token_id], PAIRS, SFTConfig(format=plain))
    assert tokenizer.decode(row["prompt_ids"]) == "Capital of France?\n\n"  # the instruction is for sampling only
    assert row["target_ids"] == tokenizer("Paris", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_with_contrast_every_pair_gives_an_example(tokenizer):
    eot = tokenizer.eos_token_id
    rows = sft_examples(tokenizer, [eot], PAIRS, SFTConfig(target="contrast"))
    assert [r["prompt_id"] for r in rows] == ["p1", "p1", "p2"]
    assert rows[0]["target_ids"] != rows[1]["target_ids"]


def test_target_ids_end_with_the_end_of_turn_token(tokenizer):
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for target in ("chosen", "contrast"):
        for row in sft_examples(tokenizer, [eot], PAIRS, SFTConfig(target=target)):
            assert row["target_ids"][-1] == eot
            assert eot not in row["target_ids"][:-1]
            assert (MARKER in tokenizer.decode(row["target_ids"])) == (target == "contrast")


# -- masking and loss ------------------------------------------------------------
def test_labels_ignore_prompt_and_padding_and_copy_target_ids():
    batch = pack([[5, 6, 7], [8]], [[9, 10], [11, 12]], pad_id=0)
    assert sft_labels(batch).tolist() == [
        [IGNORE, IGNORE, IGNORE, 9, 10],
        [IGNORE, 11, 12, IGNORE, IGNORE],
    ]


def _sft_rows(tokenizer):
    eot = tokenizer.eos_token_id
    return [
        {"prompt_id": "a", "prompt_ids": prompt_ids(tokenizer, "Capital of France?"), "target_ids": [40, 41, 42, eot]},
        {
            "prompt_id": "b",
            "prompt_ids": prompt_ids(tokenizer, "A much longer question about many things?"),
            "target_ids": [50, eot],
        },
        {"prompt_id": "c", "prompt_ids": prompt_ids(tokenizer, "Hi"), "target_ids": [60, 61, 62, 63, 64, 65, eot]},
    ]


def _manual_target_nll(model, rows) -> float:
    """Mean -log p(target token | prefix) over all target tokens, each row run on its own (no padding)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = r["prompt_ids"] + r["target_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
            for pos in range(len(r["prompt_ids"]), len(ids)):
                total -= float(logp[pos - 1, ids[pos]])
                count += 1
    return total / count


def test_sft_loss_is_the_mean_nll_of_target_tokens_only(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = _sft_rows(tokenizer)
    with torch.no_grad():
        loss, metrics = sft_objective(tokenizer.pad_token_id).batch_loss(model, rows)
    assert float(loss) == pytest.approx(_manual_target_nll(model, rows), rel=1e-5)
    assert metrics["loss"] == pytest.approx(float(loss))


def test_sft_loss_ignores_the_token_id_at_pad_positions(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = _sft_rows(tokenizer)
    with torch.no_grad():
        with_pad = float(sft_objective(tokenizer.pad_token_id).batch_loss(model, rows)[0])
        with_other = float(sft_objective(57).batch_loss(model, rows)[0])  # every pad position holds token 57
    assert with_other == pytest.approx(with_pad, abs=1e-6)


# -- entropies recorded while generating -----------------------------------------
@pytest.fixture(scope="module")
def early_stopping_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model made less uniform (final norm x5: entropies from ~2.6 to ~5.2 nats)
    and with many end-of-turn ids in its generation config, so that some rows finish
    after a step or two while others run to max_new_tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-many-eos")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)
    model.generation_config.eos_token_id = [2] + list(range(100, 200))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def _top_p_entropy(logp: torch.Tensor, top_p: float) -> float:
    """Entropy of the distribution actually sampled from at temperature 1 with top-p."""
    probs, _ = logp.exp().sort(descending=True)
    probs = probs[(probs.cumsum(0) - probs) < top_p]
    probs = probs / probs.sum()
    return float(-(probs * probs.log()).sum())


def test_generation_records_one_raw_entropy_per_generated_token(early_stopping_model_dir):
    backend = HFBackend(early_stopping_model_dir, batch_size=8)
    params = GenerationParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=4, entropies=True)
    prompts = [
        prompt_ids(backend.tokenizer, "some text"),
        prompt_ids(backend.tokenizer, "some much longer text, so that the batch is left-padded"),
    ]
    completions = [c for row in backend.generate(prompts, params, seeds=[0, 1]) for c in row]
    lengths = [len(c.token_ids) for c in completions]
    # the check below is only meaningful if some row finished while another still generated
    assert min(lengths) < max(lengths) and {c.finish_reason for c in completions} == {"stop", "length"}, (
        f"precondition: these seeds no longer give rows of mixed lengths ({lengths}); pick other seeds"
    )
    processed_differs = False
    for prompt, c in zip([prompts[0]] * 2 + [prompts[1]] * 2, completions):
        assert len(c.entropies) == len(c.token_ids) == len(c.logprobs)
        ids = prompt + c.token_ids
        with torch.no_grad():
            logits = backend.model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits[len(prompt) - 1 : len(ids) - 1], dim=-1)
        assert c.entropies == pytest.approx(token_entropy(logp).tolist(), abs=1e-4)
        processed_differs |= any(abs(e - _top_p_entropy(row, 0.9)) > 1e-2 for e, row in zip(c.entropies, logp))
    assert processed_differs  # the raw and the top-p distributions are told apart
