"""logprobs: reference-model summed log-probs of each pair's chosen and rejected
responses (prompt masked, end-of-turn token kept, float32, no length
normalisation), stored with the token ids so training never re-tokenises.
Optional limits fit long pairs: the prompt loses tokens from the left, a
response keeps its first tokens and its end-of-turn token."""
from __future__ import annotations

import time

import pyarrow as pa

from alignflow.config import LogprobsConfig
from storage.artifacts import ArtifactRef
from tasks.stage import Progress, RunContext, Stage, StageOutput, stage_task
from workers.backend import open_backend
from workers.chat import encode_pair


def reference_logprobs(backend, pairs: list[dict], config: LogprobsConfig, progress=None) -> tuple[list[dict], dict]:
    rows = [{**p, **encode_pair(backend.tokenizer, p, backend.stop_ids, config.max_prompt_tokens,
                                config.max_response_tokens)} for p in pairs]
    prompts = [r["prompt_ids"] for r in rows] * 2
    responses = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    started = time.perf_counter()
    sums = backend.sequence_logprobs(prompts, responses, progress=progress)
    seconds = time.perf_counter() - started
    for i, r in enumerate(rows):
        r["chosen_logp"], r["rejected_logp"] = sums[i], sums[len(rows) + i]
        r["chosen_tokens"], r["rejected_tokens"] = len(r["chosen_ids"]), len(r["rejected_ids"])
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    return rows, {"rows_out": len(rows), "tokens": tokens, "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}


def compute_logprobs(ctx: RunContext, config: LogprobsConfig, key: str, reference: ArtifactRef, pairs: ArtifactRef):
    rows = ctx.store().read_rows(pairs)
    progress = Progress("logprobs", 2 * len(rows), unit="seqs")
    with open_backend(config.backend, ctx.model_dir(reference), "float32", config.tensor_parallel_size,
                      token_budget=config.token_budget) as backend:
        out, metrics = reference_logprobs(backend, rows, config, progress)
    progress.close()
    return StageOutput(tables=[pa.Table.from_pylist(out)], metrics=metrics)


LOGPROBS = Stage("logprobs", compute_logprobs,
                 ("tasks.logprobs", "workers.backend", "workers.hf", "workers.vllm", "workers.chat", "workers.scoring"))
logprobs_task = stage_task(LOGPROBS)
