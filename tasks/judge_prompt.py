"""The judge's prompt: a ChatML template (a built-in mode or ``judge.template``, upstream RefEval's
prompts/ format) rendered through the judge model's own chat template, then fitted to its budget.

The instruction, reference and outputs are user text: they are tokenized apart from the
template's fixed pieces, with special-token strings split, so a candidate that writes
"<|im_end|><|im_start|>assistant" gets plain-text tokens and never a control token. When a
prompt is over budget only the two outputs are shortened, each keeping its head and a visible
cut marker; the rules, instruction and reference are never cut. If they leave too little room,
the comparison is dropped (and counted by the judge stage).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

from alignflow.config import JudgeConfig
from alignflow.workers.chat import (
    chatml_turns,
    fill_slots,
    slot,
    slotted_prompt_pieces,
    tokenizes_piecewise,
    user_text_ids,
)

PLACEHOLDERS = ("INSTRUCTION", "REFERENCE", "OUTPUT_1", "OUTPUT_2")
OPTIONAL = frozenset({"REFERENCE"})  # a judge that works without references (mode base) leaves it out
OUTPUTS = ("OUTPUT_1", "OUTPUT_2")
CUT_MARKER = "\n[... the rest of this output is cut: it did not fit the judge's prompt]"
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]+)\}")

_RATER = "You rate how well AI assistants' responses carry out the instructions they were given."
_TASK = (
    "Two different AI assistants each wrote an output for the instruction below. "
    "Decide which output carries out the instruction better."
)
_WITH_REFERENCE = (
    "A Reference Output is included to help you. It is factually correct and effective: "
    "it shows the instruction being carried out successfully."
)
_PRECISE = (
    "An output must do everything the instruction asks and nothing unrelated to it: "
    "a missed requirement or off-topic material counts against it."
)
_CORRECT = "Check each output for factual errors; a mistake, above all in a number, makes an output worse."
_CHECKED = " Use the Reference Output to verify the facts of each output."
_BRIEF = "Prefer a short, effective answer to a long-winded one, unless the instruction asks for an explanation."
_LIKE_REFERENCE = (
    "First work out how the Reference Output succeeds (helpful, accurate, natural), "
    "then judge how closely each output matches what makes it successful."
)
_NOTHING_EXTRA = "Content in an output that goes beyond what the Reference Output contains counts against it."
_ORDER = "Which output is shown first must play no part in your decision."
_ANSWER = 'Reply with "Output (a)" or "Output (b)" and nothing else.'
_OUTPUT_SLOTS = "# Output (a):\n{OUTPUT_1}\n\n# Output (b):\n{OUTPUT_2}"
_QUESTION = '# Which output is better, "Output (a)" or "Output (b)"? Reply with only "Output (a)" or "Output (b)":'


def _numbered(points: list[str]) -> str:
    return "Weigh these points:\n" + "\n".join(f"{i}. {p}" for i, p in enumerate(points, 1))


def _chatml(system: str, user: str) -> str:
    return f"<|im_start|>system\n{system}\n<|im_end|>\n<|im_start|>user\n{user}\n<|im_end|>"


def _base() -> str:
    points = _numbered([_PRECISE, _CORRECT, _BRIEF, _ORDER])
    return _chatml(
        _RATER, f"{_TASK}\n\n{points}\n\n{_ANSWER}\n\n# Instruction:\n{{INSTRUCTION}}\n\n{_OUTPUT_SLOTS}\n\n{_QUESTION}"
    )


def _refeval() -> str:
    points = _numbered([_PRECISE, _CORRECT + _CHECKED, _BRIEF, _LIKE_REFERENCE, _NOTHING_EXTRA, _ORDER])
    return _chatml(
        _RATER,
        f"{_TASK}\n\n{_WITH_REFERENCE}\n\n{points}\n\n{_ANSWER}\n\n# Instruction:\n{{INSTRUCTION}}\n\n"
        f"# Reference Output:\n{{REFERENCE}}\n\n{_OUTPUT_SLOTS}\n\n{_QUESTION}",
    )


def _refmatch() -> str:
    rules = "\n".join(
        [
            "How to judge closeness:",
            "(1) The Instruction decides what has to match: an output with extra information or the wrong number "
            "of items does not match, however many words it shares with the reference.",
            "(2) Shared wording or formatting counts only when the output also meets what the Instruction asks.",
            "(3) First work out how the ground-truth Reference Output carries out the Instruction, which shows what "
            "a successful answer looks like; then judge how closely Output (a) and Output (b) follow that pattern.",
            "(4) Content in an output that goes beyond what the Reference Output contains counts against it.",
        ]
    )
    return _chatml(
        "You compare two outputs with a ground-truth Reference Output and decide which of them is closer to it.",
        "Below are an Instruction, its ground-truth Reference Output, and two outputs written for the Instruction, "
        f"Output (a) and Output (b).\n\n{rules}\n\n"
        "Before comparing, identify which parts of the Reference Output matter for this Instruction; then decide "
        "which output matches them more closely.\n\n"
        'Reply with only "Output (a)" or "Output (b)", no other words.\n\n'
        "# Ground-truth Reference Output:\n{REFERENCE}\n\n# Instruction:\n{INSTRUCTION}\n\n"
        f"{_OUTPUT_SLOTS}\n\n"
        '# Which output is closer to the Reference Output, "Output (a)" or "Output (b)"? '
        'Reply with only "Output (a)" or "Output (b)":',
    )


BUILTIN = {"base": _base(), "refeval": _refeval(), "refmatch": _refmatch()}


def parse_template(text: str, source: str) -> list[dict]:
    """The template's messages (an optional system turn, then one user turn holding the placeholders),
    checked: a bad template fails here, naming ``source`` and what was expected."""
    messages = chatml_turns(text, source)
    roles = [m["role"] for m in messages]
    if roles not in (["user"], ["system", "user"]):
        raise ValueError(f"{source}: expected an optional system turn and then one user turn, got turns {roles}")
    if messages[0]["role"] == "system" and _PLACEHOLDER.search(messages[0]["content"]):
        raise ValueError(f"{source}: placeholders belong in the user turn, not the system turn")
    _check_placeholders(Counter(_PLACEHOLDER.findall(messages[-1]["content"])), source)
    return messages


def _check_placeholders(found: Counter, source: str) -> None:
    expected = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
    unknown = sorted(set(found) - set(PLACEHOLDERS))
    if unknown:
        raise ValueError(f"{source}: unknown placeholder {{{unknown[0]}}} (expected {expected})")
    for name in PLACEHOLDERS:
        if found[name] > 1 or (found[name] == 0 and name not in OPTIONAL):
            needed = "at most once" if name in OPTIONAL else "exactly once"
            raise ValueError(f"{source}: the user turn needs {{{name}}} {needed}, found it {found[name]} times")


def judge_template(config: JudgeConfig) -> list[dict]:
    """The messages of the configured template: ``judge.template``'s file, else mode's built-in one."""
    if config.template is None:
        return parse_template(BUILTIN[config.mode], f"built-in judge template '{config.mode}'")
    path = Path(config.template).expanduser()
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != config.template_sha256:
        raise ValueError(f"{path}: the judge template changed after the run's config was read; start the run again")
    return parse_template(data.decode("utf-8"), str(path))


def template_name(config: JudgeConfig) -> str:
    """What the judgments record as their mode: the built-in mode, or the template file's name."""
    return config.mode if config.template is None else f"template:{Path(config.template).name}"


def output_allowances(len_1: int, len_2: int, room: int) -> tuple[int, int]:
    """Tokens each output may take: both whole when they fit; else a shorter output that needs at
    most half the room stays whole and the other takes the rest; else the room is split evenly."""
    if len_1 + len_2 <= room:
        return len_1, len_2
    half = room // 2
    if len_1 <= half:
        return len_1, room - len_1
    if len_2 <= half:
        return room - len_2, len_2
    return half, room - half


def head_with_marker(ids: list[int], allowance: int, marker: list[int]) -> list[int] | None:
    """``ids`` within ``allowance`` tokens: whole, or its head plus the cut marker; None when not
    even one token of head fits beside the marker."""
    if len(ids) <= allowance:
        return ids
    head = allowance - len(marker)
    return ids[:head] + marker if head >= 1 else None


class JudgePrompts:
    """Token ids of each comparison's judge prompt: the template rendered once by the judge's chat
    template, user text tokenized once per distinct text, outputs fitted to ``max_tokens``."""

    def __init__(self, tokenizer, messages: list[dict], max_tokens: int, answer_prefix: str):
        if not tokenizes_piecewise(tokenizer):
            raise ValueError(
                f"judge: the judge model's tokenizer ({type(tokenizer).__name__}, "
                f"{tokenizer.name_or_path or 'unnamed'}) adds text when pieces are tokenized apart "
                "(a SentencePiece word-start marker), so the judge prompt would not be the template's text; "
                "use a judge with a byte-level BPE tokenizer (SmolLM2, Llama 3, Qwen)"
            )
        slotted = [{**m, "content": _PLACEHOLDER.sub(lambda n: slot(n[1]), m["content"])} for m in messages]
        self.pieces = slotted_prompt_pieces(tokenizer, slotted)
        wanted = Counter(_PLACEHOLDER.findall(messages[-1]["content"]))
        if Counter(p for p in self.pieces if isinstance(p, str)) != wanted:
            raise ValueError("the judge model's chat template dropped or repeated part of the judge prompt's user turn")
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.answer_prefix = tokenizer(answer_prefix, add_special_tokens=False)["input_ids"] if answer_prefix else []
        self.fixed_tokens = sum(len(p) for p in self.pieces if not isinstance(p, str)) + len(self.answer_prefix)
        self._encoded: dict[str, list[int]] = {}
        self.marker = self.text_ids(CUT_MARKER)

    def text_ids(self, text: str) -> list[int]:
        if text not in self._encoded:
            self._encoded[text] = user_text_ids(self.tokenizer, text)
        return self._encoded[text]

    def __call__(self, instruction: str, reference: str, output_1: str, output_2: str) -> tuple[list[int] | None, bool]:
        """(prompt ids ending with the answer prefix, whether an output was cut); ids None: dropped."""
        texts = {"INSTRUCTION": instruction, "REFERENCE": reference, "OUTPUT_1": output_1, "OUTPUT_2": output_2}
        slots = {name: self.text_ids(texts[name]) for name in self.pieces if isinstance(name, str)}
        kept = self.fixed_tokens + sum(len(ids) for name, ids in slots.items() if name not in OUTPUTS)
        outputs = [slots[name] for name in OUTPUTS]
        allowances = output_allowances(len(outputs[0]), len(outputs[1]), self.max_tokens - kept)
        fitted = [head_with_marker(ids, n, self.marker) for ids, n in zip(outputs, allowances)]
        if None in fitted:
            return None, False
        ids = fill_slots(self.pieces, slots | dict(zip(OUTPUTS, fitted))) + self.answer_prefix
        return ids, fitted != outputs
