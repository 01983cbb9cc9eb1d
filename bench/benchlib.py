"""What the bench scripts share: a timer, the demo prompts as chat token ids, and
the sampling arguments (``python bench/X.py`` puts this folder on sys.path)."""
from __future__ import annotations

import argparse
import time
from importlib import resources

from tasks.prompts import read_prompt_rows
from workers.chat import prompt_ids


def timed(fn):
    """(fn's result, seconds it took)."""
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def demo_prompt_ids(tokenizer, count: int) -> list[list[int]]:
    rows = read_prompt_rows(resources.files("alignflow") / "data" / "demo_prompts.jsonl")
    return [prompt_ids(tokenizer, r["prompt"]) for r in rows[:count]]


def sampling_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    return p
