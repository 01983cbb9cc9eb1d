"""logprobs: reference-model summed log-probs of each pair's chosen and rejected
responses (prompt masked, end-of-turn token kept, float32, no length
normalisation), stored with the token ids so training never re-tokenises.
Optional limits fit long pairs: the prompt loses tokens from the left, a
response keeps its first tokens and its end-of-turn token."""

from __future__ import annotations

import time

import pyarrow as pa

from alignflow.config import LogprobsConfig
from alignflow.tasks.stage import RunContext, Shards, Stage, stage_task
from alignflow.workers.backend import shared_backend
from alignflow.workers.chat import encode_pair

# What training reads: the pair (whichever stage made it: pairs, preferences) and its tokens and reference log-probs.
PAIR_TEXT = ("prompt_id", "prompt", "chosen", "rejected")
REFERENCE_PAIR_ROWS = pa.schema(
    [
        *((name, pa.string()) for name in PAIR_TEXT),
        ("prompt_ids", pa.list_(pa.int64())),
        ("chosen_ids", pa.list_(pa.int64())),
        ("rejected_ids", pa.list_(pa.int64())),
        ("chosen_logp", pa.float64()),
        ("rejected_logp", pa.float64()),
        ("chosen_tokens", pa.int64()),
        ("rejected_tokens", pa.int64()),
    ]
)


def reference_logprobs(backend, pairs: list[dict], config: LogprobsConfig, progress=None) -> tuple[list[dict], dict]:
    rows = [
        {
            **{name: p[name] for name in PAIR_TEXT},
            **encode_pair(
                backend.tokenizer,
                p,
                backend.stop_ids,
                config.max_prompt_tokens,
                config.max_response_tokens,
                config.format,
            ),
        }
        for p in pairs
    ]
    prompts = [r["prompt_ids"] for r in rows] * 2
    responses = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    started = time.perf_counter()
    sums = backend.sequence_logprobs(prompts, responses, progress=progress)
    seconds = time.perf_counter() - started
    for i, r in enumerate(rows):
        r["chosen_logp"], r["rejected_logp"] = sums[i], sums[len(rows) + i]
        r["chosen_tokens"], r["rejected_tokens"] = len(r["chosen_ids"]), len(r["rejected_ids"])
    return rows, logprobs_metrics(rows, seconds)


def logprobs_metrics(rows: list[dict], seconds: float) -> dict:
    tokens = sum(2 * len(r["prompt_ids"]) + r["chosen_tokens"] + r["rejected_tokens"] for r in rows)
    return {"rows_out": len(rows), "tokens": tokens, "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}


def pair_units(ctx: RunContext, config: LogprobsConfig, parents: dict) -> list[dict]:
    return ctx.store().read_rows(parents["pairs"])


def reference_backend(ctx: RunContext, config: LogprobsConfig, parents: dict):
    return shared_backend(
        config.backend,
        ctx.model_dir(parents["reference"]),
        "float32",
        config.tensor_parallel_size,
        token_budget=config.token_budget,
    )


LOGPROBS = Stage(
    "logprobs",
    None,
    __name__,
    schema=REFERENCE_PAIR_ROWS,
    shards=Shards(
        units=pair_units,
        open=reference_backend,
        compute=reference_logprobs,
        metrics=logprobs_metrics,
        work=lambda pairs, config: 2 * len(pairs),
        unit="seqs",
    ),
)
logprobs_task = stage_task(LOGPROBS)
