"""What the bench scripts share: a timer, the demo prompts as chat token ids, the
sampling arguments, the naive one-sequence log-prob baseline and the padding
measure, and the self-improve stages run as plain functions without Prefect
(``python bench/X.py`` puts this folder on sys.path)."""

from __future__ import annotations

import argparse
import time
from importlib import resources

import torch

from alignflow.flows.report import self_improve_summary
from alignflow.flows.self_improve import Steps, run_rounds
from alignflow.tasks.base_model import base_model_ref
from alignflow.tasks.judge import JUDGE
from alignflow.tasks.logprobs import LOGPROBS
from alignflow.tasks.pairs import PAIRS
from alignflow.tasks.prompts import PROMPTS, read_prompt_rows
from alignflow.tasks.sample import SAMPLE
from alignflow.tasks.stage import run_context
from alignflow.tasks.train_dpo import TRAIN_DPO
from alignflow.workers.chat import prompt_ids

# The flow's own stage functions, called directly: no task runs, no Prefect cache or API.
DIRECT_STEPS = Steps(PROMPTS.run, base_model_ref, SAMPLE.run, JUDGE.run, PAIRS.run, LOGPROBS.run, TRAIN_DPO.run)


def timed(fn):
    """(fn's result, seconds it took)."""
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def run_plain(config) -> dict:
    """The self-improve flow's work as a plain script: same stages, same order,
    same artifacts, and the same summary the flow returns."""
    prompts, rounds = run_rounds(config, DIRECT_STEPS)
    return self_improve_summary(run_context(config).store(), prompts, rounds)


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


@torch.inference_mode()
def one_sequence_logprob(model, prompt: list[int], response: list[int]) -> float:
    """The naive baseline: one sequence per forward pass, full-vocabulary logits,
    the response tokens' summed log-probs."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    return float(logp[len(prompt) - 1 :].gather(-1, ids[0, len(prompt) :].unsqueeze(-1)).sum())


def padding_waste(batches: list[list[int]]) -> float:
    """Share of the token positions fed to the model that are padding, for batches
    given as their sequences' lengths (each batch padded to its longest)."""
    real = sum(sum(lengths) for lengths in batches)
    return 1 - real / sum(len(lengths) * max(lengths) for lengths in batches)
