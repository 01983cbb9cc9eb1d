"""sample: n candidates per prompt from the policy, with per-token log-probs of
the raw next-token distribution. In CoT mode (GEM) each step's raw entropy is
kept too, computed from the same distribution during generation, and the prompt
is rendered as ``config.format`` renders chains of thought."""

from __future__ import annotations

import time
import zlib

import pyarrow as pa

from alignflow.config import SampleConfig
from alignflow.storage.artifacts import ArtifactRef, ArtifactStore
from alignflow.tasks.stage import RunContext, Shards, Stage, stage_task
from alignflow.tasks.stage_report import EXAMPLES, examples_markdown
from alignflow.workers.backend import GenerationParams, shared_backend
from alignflow.workers.chat import fit_prompt


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt seed: the same prompt samples the same candidates in any batch or shard."""
    return zlib.crc32(f"{seed}:{prompt_id}".encode())


def distinct_prompts(rows: list[dict], limit: int | None) -> list[dict]:
    """One row per prompt (preference pairs share prompts: ``prompt_id``), the first ``limit``."""
    seen, out = set(), []
    for row in rows:
        pid = row.get("prompt_id", row["id"])
        if pid not in seen:
            seen.add(pid)
            out.append({**row, "id": pid})
    return out[:limit]


def sample_candidates(backend, rows: list[dict], config: SampleConfig, progress=None) -> tuple[list[dict], dict]:
    fitted = [
        fit_prompt(backend.tokenizer, r["prompt"], config.max_prompt_tokens, config.format, reasoning=config.cot)
        for r in rows
    ]
    params = GenerationParams(
        n=config.n,
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        entropies=config.cot,
    )
    started = time.perf_counter()
    completions = backend.generate(
        [ids for _, ids, _ in fitted], params, [prompt_seed(config.seed, r["id"]) for r in rows], progress=progress
    )
    seconds = time.perf_counter() - started
    out = []
    for row, (content, ids, truncated), samples in zip(rows, fitted, completions):
        for index, c in enumerate(samples):
            out.append(
                {
                    "prompt_id": row["id"],
                    "prompt": content,
                    "reference": row.get("reference"),
                    "prompt_truncated": truncated,
                    "prompt_ids": ids,
                    "prompt_tokens": len(ids),
                    "candidate": index,
                    "response": c.text,
                    "token_ids": c.token_ids,
                    "logprobs": c.logprobs,
                    "finish_reason": c.finish_reason,
                    **({"entropies": c.entropies} if config.cot else {}),
                }
            )
    return out, sample_metrics(out, seconds)


def sample_metrics(out: list[dict], seconds: float) -> dict:
    tokens = sum(len(r["token_ids"]) for r in out)
    return {
        "rows_out": len(out),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "truncated_prompts": sum(r["prompt_truncated"] for r in out if r["candidate"] == 0),
        "finished_share": round(sum(r["finish_reason"] == "stop" for r in out) / max(len(out), 1), 3),
    }


def prompt_units(ctx: RunContext, config: SampleConfig, parents: dict) -> list[dict]:
    """The prompts to sample: a ``prompts`` artifact's, or a ``preferences`` artifact's (GEM)."""
    source = parents["prompts"] if "prompts" in parents else parents["preferences"]
    return distinct_prompts(ctx.store().read_rows(source), config.max_prompts)


def policy_backend(ctx: RunContext, config: SampleConfig, parents: dict):
    return shared_backend(
        config.backend,
        ctx.model_dir(parents["policy"]),
        config.dtype,
        config.tensor_parallel_size,
        batch_size=config.batch_size,
    )


def sample_examples(store: ArtifactStore, ref: ArtifactRef, parents: dict) -> str:
    """The first candidate of the first prompts."""
    firsts = [r for r in store.read_rows(ref) if r["candidate"] == 0][:EXAMPLES]
    return examples_markdown(
        "sample: a candidate per prompt",
        [
            {
                "prompt": r["prompt"],
                "reference": r["reference"],
                "candidate": r["response"],
                "tokens": len(r["token_ids"]),
                "finish_reason": r["finish_reason"],
            }
            for r in firsts
        ],
    )


CANDIDATE_ROWS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("reference", pa.string()),  # no reference: preferences
        ("prompt_truncated", pa.bool_()),
        ("prompt_ids", pa.list_(pa.int64())),
        ("prompt_tokens", pa.int64()),
        ("candidate", pa.int64()),
        ("response", pa.string()),
        ("token_ids", pa.list_(pa.int64())),
        ("logprobs", pa.list_(pa.float64())),
        ("finish_reason", pa.string()),
    ]
)


def candidate_rows(config: SampleConfig) -> pa.Schema:
    """CoT sampling (GEM) also keeps each step's entropy."""
    return CANDIDATE_ROWS.append(pa.field("entropies", pa.list_(pa.float64()))) if config.cot else CANDIDATE_ROWS


SAMPLE = Stage(
    "sample",
    None,
    __name__,
    schema=candidate_rows,
    examples=sample_examples,
    shards=Shards(
        units=prompt_units,
        open=policy_backend,
        compute=sample_candidates,
        metrics=sample_metrics,
        work=lambda prompts, config: len(prompts) * config.n,
        unit="samples",
    ),
)
sample_task = stage_task(SAMPLE)
