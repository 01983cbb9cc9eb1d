"""Prompt and answer rendering shared by every stage, so sampling, judging, reference
log-probs, training and scoring all see the same tokens: the chat template by default
(``fmt`` None); a ``TextFormat`` may add a system turn, or render plain text (GEM)."""

from __future__ import annotations

import re
from typing import Protocol


class TextFormat(Protocol):
    """alignflow.config.TextFormat, as rendering reads it."""

    style: str
    instruction: str | None


# Stands in for user text while a chat template renders: a private-use character no template writes
_SLOT = "\ue000{}\ue000"
_SLOT_SPLIT = re.compile("\ue000([A-Za-z0-9_]+)\ue000")
_TURN_START, _TURN_END = "<|im_start|>", "<|im_end|>"


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def chat_messages(content: str, fmt: TextFormat | None, reply: str | None = None) -> list[dict]:
    """The chat turns: a system turn with the format's instruction when it has one, the user's, the reply."""
    system = [{"role": "system", "content": fmt.instruction}] if fmt and fmt.instruction else []
    assistant = [{"role": "assistant", "content": reply}] if reply is not None else []
    return [*system, {"role": "user", "content": content}, *assistant]


def plain_context(content: str, fmt: TextFormat, reasoning: bool) -> str:
    """The prompt, a blank line, and with ``reasoning`` the instruction on a line of its own."""
    instruction = f"{fmt.instruction}\n" if reasoning and fmt.instruction else ""
    return f"{content}\n\n{instruction}"


def prompt_ids(tokenizer, content: str, fmt: TextFormat | None = None, reasoning: bool = False) -> list[int]:
    """What precedes an answer: the user turn plus the assistant header (chat), or the plain
    context. ``reasoning``: the context chains of thought are sampled in."""
    if fmt and fmt.style == "plain":
        return _ids(tokenizer(plain_context(content, fmt, reasoning), split_special_tokens=True))
    return _ids(tokenizer.apply_chat_template(chat_messages(content, fmt), add_generation_prompt=True))


def slot(name: str) -> str:
    """Where user text named ``name`` goes in a message given to ``slotted_prompt_pieces``."""
    return _SLOT.format(name)


def slotted_prompt_pieces(tokenizer, messages: list[dict]) -> list[list[int] | str]:
    """The chat template's rendering of ``messages`` plus the assistant header, cut at each
    ``slot(name)``: the fixed pieces as token ids (special tokens recognised: the template put them
    there) alternating with the slot names, in order. ``fill_slots`` puts user text in."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = _SLOT_SPLIT.split(rendered)
    return [part if i % 2 else _ids(tokenizer(part, add_special_tokens=False)) for i, part in enumerate(parts)]


def user_text_ids(tokenizer, text: str) -> list[int]:
    """Tokens of user text: a special-token string in it (a forged <|im_end|>) stays plain text."""
    return _ids(tokenizer(text, add_special_tokens=False, split_special_tokens=True))


def tokenizes_piecewise(tokenizer) -> bool:
    """Whether texts tokenized apart and joined decode to the texts joined, as slotted
    rendering assumes: true of byte-level BPE (SmolLM2, Llama 3, Qwen); a SentencePiece
    tokenizer that marks the start of every call's text (Llama 2, Mistral) adds a space
    at each join."""
    head, tail = "Output (a):", "\nthe answer"
    joined = user_text_ids(tokenizer, head) + user_text_ids(tokenizer, tail)
    return tokenizer.decode(joined, clean_up_tokenization_spaces=False) == head + tail


def fill_slots(pieces: list[list[int] | str], slot_ids: dict[str, list[int]]) -> list[int]:
    return [t for piece in pieces for t in (slot_ids[piece] if isinstance(piece, str) else piece)]


def chatml_turns(text: str, source: str) -> list[dict]:
    """The turns of a ChatML text (``<|im_start|>ROLE`` on its own line, the content, ``<|im_end|>``)
    as chat messages, contents stripped. A turn may also end where the next one starts."""
    head, *turns = text.strip().split(_TURN_START)
    if head.strip() or not turns:
        raise ValueError(f"{source}: expected ChatML: turns that each begin with {_TURN_START}ROLE on its own line")
    messages = []
    for number, turn in enumerate(turns, 1):
        role, newline, rest = turn.partition("\n")
        content, _, after = rest.partition(_TURN_END)
        if not newline or not role.strip():
            raise ValueError(f"{source}: turn {number}: expected a role (system, user) after {_TURN_START}")
        if after.strip():
            raise ValueError(f"{source}: turn {number}: text after {_TURN_END} belongs to no turn")
        messages.append({"role": role.strip(), "content": content.strip()})
    return messages


def fit_prompt(
    tokenizer, content: str, max_tokens: int, fmt: TextFormat | None = None, reasoning: bool = False
) -> tuple[str, list[int], bool]:
    """Render ``content``; if too long, drop tokens from the left of the content
    (never the chat header or the instruction) until it fits. Returns (content used, ids, truncated)."""
    ids = prompt_ids(tokenizer, content, fmt, reasoning)
    if len(ids) <= max_tokens:
        return content, ids, False
    content_ids = tokenizer(content, add_special_tokens=False)["input_ids"]
    excess = len(ids) - max_tokens
    while excess < len(content_ids):
        kept = tokenizer.decode(content_ids[excess:])
        ids = prompt_ids(tokenizer, kept, fmt, reasoning)
        if len(ids) <= max_tokens:
            return kept, ids, True
        excess += len(ids) - max_tokens
    raise ValueError(f"the prompt's template alone needs more than max_prompt_tokens={max_tokens} tokens")


def response_ids(
    tokenizer, content: str, response: str, end_of_turn: list[int], fmt: TextFormat | None = None
) -> list[int]:
    """Tokens of ``response`` as the answer after ``content``, ending with the end-of-turn
    token (chat: what follows it in the template is not scored; plain: the tokenizer's EOS)."""
    if fmt and fmt.style == "plain":
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else end_of_turn[0]
        return user_text_ids(tokenizer, response) + [eos]
    prompt = prompt_ids(tokenizer, content, fmt)
    full = _ids(tokenizer.apply_chat_template(chat_messages(content, fmt, response)))
    if full[: len(prompt)] != prompt:
        raise ValueError("chat template renders the prompt differently with and without a reply")
    tail = full[len(prompt) :]
    ends = [i for i, t in enumerate(tail) if t in end_of_turn]
    if not ends:
        raise ValueError("chat template did not close the assistant turn with an end-of-turn token")
    return tail[: ends[0] + 1]


def fit_response(ids: list[int], max_tokens: int | None) -> list[int]:
    """At most ``max_tokens`` response tokens: the first ones, then the end-of-turn token."""
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    return ids[: max_tokens - 1] + ids[-1:]


def encode_pair(
    tokenizer,
    pair: dict,
    end_of_turn: list[int],
    max_prompt_tokens: int | None,
    max_response_tokens: int | None,
    fmt: TextFormat | None = None,
) -> dict:
    """Token ids of a preference pair's prompt, chosen and rejected answers, fitted to the limits."""
    content, prompt, _ = (
        fit_prompt(tokenizer, pair["prompt"], max_prompt_tokens, fmt)
        if max_prompt_tokens
        else (pair["prompt"], prompt_ids(tokenizer, pair["prompt"], fmt), False)
    )
    return {
        "prompt_ids": prompt,
        **{
            f"{side}_ids": fit_response(
                response_ids(tokenizer, content, pair[side], end_of_turn, fmt), max_response_tokens
            )
            for side in ("chosen", "rejected")
        },
    }


def end_of_turn_ids(tokenizer, model) -> list[int]:
    """Token ids that end an assistant turn: the generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)
