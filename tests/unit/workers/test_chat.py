"""Chat-template rendering and left truncation (workers/chat.py) with an offline ChatML BPE tokenizer."""

import pytest
from helpers import CHATML, SPECIALS
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from alignflow.workers.chat import fit_prompt, prompt_ids, response_ids

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Alignment pipelines sample candidates, "
    "judge every ordered pair and train the policy with DPO on the best and worst answers.\n"
    "user assistant system: What is the capital of France? Paris is the capital of France.\n"
) * 30  # ~8 KB


@pytest.fixture(scope="module")
def tokenizer():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([CORPUS], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def _encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_ids_render_the_user_turn_and_assistant_header(tokenizer):
    ids = prompt_ids(tokenizer, "What is the capital of France?")
    assert (
        tokenizer.decode(ids) == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 2 and ids.count(end) == 1


def test_fit_prompt_short_content_is_untouched(tokenizer):
    content = "Paris is the capital of France."
    kept, ids, truncated = fit_prompt(tokenizer, content, max_tokens=200)
    assert (kept, truncated) == (content, False)
    assert ids == prompt_ids(tokenizer, content)


def test_fit_prompt_drops_content_from_the_left(tokenizer):
    content = "START " + "The quick brown fox jumps over the lazy dog. " * 20 + "FINAL QUESTION: zebra?"
    header = _encode(tokenizer, "<|im_start|>user\n")
    footer = _encode(tokenizer, "<|im_end|>\n<|im_start|>assistant\n")
    full = prompt_ids(tokenizer, content)
    budget = 40
    assert len(full) > budget

    kept, ids, truncated = fit_prompt(tokenizer, content, max_tokens=budget)
    assert truncated is True
    assert len(ids) <= budget
    assert ids[: len(header)] == header  # the chat header is never dropped
    assert ids[-len(footer) :] == footer  # nor the assistant header
    assert content.endswith(kept) and len(kept) < len(content)  # content lost from the left only
    assert kept.endswith("FINAL QUESTION: zebra?")  # the tail survives
    assert "START" not in kept
    assert ids == prompt_ids(tokenizer, kept)  # the ids are the rendering of the content returned
    # as much as fits: nearly the full budget is used (retokenising the cut may cost a token or two)
    assert len(ids) >= budget - 3


def test_fit_prompt_exact_budget_is_not_truncated(tokenizer):
    content = "The lazy dog."
    n = len(prompt_ids(tokenizer, content))
    assert fit_prompt(tokenizer, content, n)[2] is False
    kept, ids, truncated = fit_prompt(tokenizer, content, n - 1)
    assert truncated is True and len(ids) <= n - 1 and content.endswith(kept)


def test_fit_prompt_budget_below_the_template_raises(tokenizer):
    template_only = len(prompt_ids(tokenizer, ""))
    with pytest.raises(ValueError, match="max_prompt_tokens=3"):
        fit_prompt(tokenizer, "The quick brown fox jumps over the lazy dog.", 3)
    assert template_only > 3


def test_response_ids_end_with_end_of_turn_and_exclude_the_newline(tokenizer):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline = _encode(tokenizer, "\n")
    content, response = "What is the capital of France?", "Paris is the capital of France."
    ids = response_ids(tokenizer, content, response, [end])
    assert ids[-1] == end and ids.count(end) == 1
    assert ids[:-1] == _encode(tokenizer, response)
    assert tokenizer.decode(ids) == response + "<|im_end|>"
    # the conversation continues with the trailing "\n" the template adds after <|im_end|>: not scored
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}, {"role": "assistant", "content": response}]
    )["input_ids"]
    prompt = prompt_ids(tokenizer, content)
    assert full == prompt + ids + newline
    assert newline[0] not in ids


def test_response_ids_empty_response_is_just_end_of_turn(tokenizer):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert response_ids(tokenizer, "Hi", "", [end]) == [end]


def test_response_ids_without_end_of_turn_token_raises(tokenizer):
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(ValueError, match="did not close the assistant turn"):
        response_ids(tokenizer, "Hi", "Paris.", [pad])
