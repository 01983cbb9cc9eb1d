"""judge: the judge model (by default the initial one) compares every ordered pair of a prompt's
candidates, prompted as tasks/judge_prompt.py renders it.

The verdict is soft: at the generated position that carries the label, the
log-probs of "a" and "b" among the top-k give p(a) = e^la / (e^la + e^lb). Only
the judge's own generated tokens are parsed, so text inside a candidate (say
"Output (b)") can never decide a verdict.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter

import pyarrow as pa

from alignflow.config import JudgeConfig
from alignflow.storage.artifacts import ArtifactRef, ArtifactStore
from alignflow.tasks.judge_prompt import JudgePrompts, judge_template, template_name
from alignflow.tasks.pairs import group_by_prompt, unique_candidates
from alignflow.tasks.stage import RunContext, Shards, Stage, stage_task
from alignflow.tasks.stage_report import EXAMPLES, examples_markdown
from alignflow.workers.backend import GenerationParams, shared_backend

_LABEL_CONTEXT = re.compile(r"output\s*\(\s*$", re.IGNORECASE)


def label_position(generated_ids: list[int], decode, prefix_given: bool) -> int | None:
    """Index of the generated token that carries the label: 0 when the answer
    prefix was written into the prompt, else the token right after "Output (" in
    the judge's own text."""
    if prefix_given:
        return 0 if generated_ids else None
    for t in range(1, len(generated_ids)):
        if _LABEL_CONTEXT.search(decode(generated_ids[:t])):
            return t
    return None


def soft_verdict(top: list[tuple[int, float]], decode) -> tuple[float, bool]:
    """(p(a), parsed) from the top-k (token id, log-prob) at the label position."""
    by_label: dict[str, list[float]] = {"a": [], "b": []}
    for token_id, logprob in top:
        label = decode([token_id]).strip().lower()
        if label in by_label:
            by_label[label].append(logprob)
    la, lb = (_logsumexp(by_label[k]) for k in ("a", "b"))
    if la is None and lb is None:
        return 0.5, False
    if lb is None:
        return 1.0, True
    if la is None:
        return 0.0, True
    return 1.0 / (1.0 + math.exp(lb - la)), True


def _logsumexp(values: list[float]) -> float | None:
    if not values:
        return None
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def ordered_pairs(candidates: list[dict]) -> list[tuple[dict, dict]]:
    return [(a, b) for a in candidates for b in candidates if a["candidate"] != b["candidate"]]


def judge_candidates(
    backend, rows: list[dict], config: JudgeConfig, progress=None, reuse_prefix: bool = True
) -> tuple[list[dict], dict]:
    """Every ordered comparison of each prompt's candidates. ``reuse_prefix=False`` runs each
    comparison's whole prompt (bench/bench_judge.py measures the two ways side by side). A
    comparison whose prompt cannot fit is not run: its row says ``dropped``."""
    tok = backend.tokenizer
    build = JudgePrompts(tok, judge_template(config), config.max_prompt_tokens, config.answer_prefix)
    groups = [
        [(a, b, *build(a["prompt"], a["reference"], a["response"], b["response"])) for a, b in pairs]
        for pairs in map(ordered_pairs, _grouped_unique(rows))
        if pairs
    ]
    runnable = [[c[2] for c in group if c[2] is not None] for group in groups]
    dropped = sum(len(g) for g in groups) - sum(map(len, runnable))
    if progress and dropped:
        progress(dropped)
    started = time.perf_counter()
    outputs = iter(_next_label_tokens(backend, [g for g in runnable if g], config, progress, reuse_prefix))
    seconds = time.perf_counter() - started
    out = [
        _dropped(a, b, config) if ids is None else _judgment(a, b, ids, cut, next(outputs), tok.decode, config)
        for group in groups
        for a, b, ids, cut in group
    ]
    return out, judge_metrics(out, seconds)


def _next_label_tokens(backend, groups: list[list[list[int]]], config: JudgeConfig, progress, reuse_prefix: bool):
    """The judge's completion of every prompt, in order. With the answer prefix in the prompt the label
    is the first generated token: one forward pass per prompt, after its group's shared prefix."""
    if config.answer_prefix and reuse_prefix:
        return [c for group in backend.next_token(groups, config.top_logprobs, progress) for c in group]
    prompts = [p for group in groups for p in group]
    params = GenerationParams(
        temperature=0.0,
        max_new_tokens=1 if config.answer_prefix else config.max_new_tokens,
        top_logprobs=config.top_logprobs,
    )
    return [c[0] for c in backend.generate(prompts, params, seeds=[0] * len(prompts), progress=progress)]


def judge_metrics(out: list[dict], seconds: float) -> dict:
    prompt_tokens = sum(r["prompt_tokens"] for r in out)
    return {
        "rows_out": len(out),
        "unparsed": sum(not r["parsed"] and not r["dropped"] for r in out),
        "outputs_cut": sum(r["outputs_cut"] for r in out),
        "dropped_too_long": sum(r["dropped"] for r in out),
        "prompt_tokens": prompt_tokens,
        "tokens_per_s": round(prompt_tokens / max(seconds, 1e-9), 1),
        **agreement_metrics(out),
    }


def _dropped(a: dict, b: dict, config: JudgeConfig) -> dict:
    """A comparison whose prompt could not fit: never run, recorded unparsed at p(a) = 0.5."""
    return _verdict(a, b, 0.5, False, "", config) | {"prompt_tokens": 0, "outputs_cut": False, "dropped": True}


def _judgment(a: dict, b: dict, ids: list[int], cut: bool, completion, decode, config: JudgeConfig) -> dict:
    prefix_given = bool(config.answer_prefix)
    position = label_position(completion.token_ids, decode, prefix_given)
    p_a, parsed = (0.5, False) if position is None else soft_verdict(completion.top_logprobs[position], decode)
    judge_text = (config.answer_prefix if prefix_given else "") + completion.text
    return _verdict(a, b, p_a, parsed, judge_text, config) | {
        "prompt_tokens": len(ids),
        "outputs_cut": cut,
        "dropped": False,
    }


def _verdict(a: dict, b: dict, p_a: float, parsed: bool, judge_text: str, config: JudgeConfig) -> dict:
    return {
        "prompt_id": a["prompt_id"],
        "a": a["candidate"],
        "b": b["candidate"],
        "p_a": p_a,
        "parsed": parsed,
        "mode": template_name(config),
        "judge_text": judge_text,
        "reference_f1_a": token_f1(a["response"], a["reference"]),
        "reference_f1_b": token_f1(b["response"], b["reference"]),
    }


def token_f1(text: str, reference: str) -> float:
    """Bag-of-words F1 against the reference: a cheap, judge-independent reference verdict."""
    got, want = Counter(text.lower().split()), Counter(reference.lower().split())
    common = sum((got & want).values())
    if not common:
        return 0.0
    precision, recall = common / sum(got.values()), common / sum(want.values())
    return 2 * precision * recall / (precision + recall)


def agreement_metrics(judgments: list[dict]) -> dict:
    """Position consistency (both orders pick the same winner) and agreement with
    the reference-overlap verdict, over parsed, decisive comparisons."""
    verdict = {(j["prompt_id"], j["a"], j["b"]): j["p_a"] for j in judgments if j["parsed"]}
    consistent = [
        (p_ab > 0.5) == (verdict[(pid, b, a)] < 0.5)
        for (pid, a, b), p_ab in verdict.items()
        if a < b and (pid, b, a) in verdict and p_ab != 0.5 and verdict[(pid, b, a)] != 0.5
    ]
    with_reference = [
        (j["p_a"] > 0.5) == (j["reference_f1_a"] > j["reference_f1_b"])
        for j in judgments
        if j["parsed"] and j["p_a"] != 0.5 and j["reference_f1_a"] != j["reference_f1_b"]
    ]
    return {
        "position_consistency": round(sum(consistent) / len(consistent), 3) if consistent else None,
        "reference_agreement": round(sum(with_reference) / len(with_reference), 3) if with_reference else None,
    }


def candidate_groups(ctx: RunContext, config: JudgeConfig, parents: dict) -> list[list[dict]]:
    """A prompt's distinct candidates, one group per prompt: a shard never splits a prompt's comparisons."""
    return _grouped_unique(ctx.store().read_rows(parents["candidates"]))


def judge_backend(ctx: RunContext, config: JudgeConfig, parents: dict):
    return shared_backend(
        config.backend,
        ctx.model_dir(parents["judge_model"]),
        config.dtype,
        config.tensor_parallel_size,
        batch_size=config.batch_size,
    )


def judge_groups(backend, groups: list[list[dict]], config: JudgeConfig, progress=None) -> tuple[list[dict], dict]:
    return judge_candidates(backend, [row for group in groups for row in group], config, progress)


def _grouped_unique(rows: list[dict]) -> list[list[dict]]:
    return [unique_candidates(g) for g in group_by_prompt(rows).values()]


def judge_examples(store: ArtifactStore, ref: ArtifactRef, parents: dict) -> str:
    """A comparison judged in both orders per prompt: the instruction, both outputs and both verdicts."""
    verdicts = {(j["prompt_id"], j["a"], j["b"]): j for j in store.read_rows(ref)}
    candidates = {(c["prompt_id"], c["candidate"]): c for c in store.read_rows(parents["candidates"])}
    per_prompt = {}
    for (pid, a, b), first in verdicts.items():
        if a < b and (pid, b, a) in verdicts:
            per_prompt.setdefault(pid, (first, verdicts[(pid, b, a)]))
    both_ways = list(per_prompt.values())[:EXAMPLES]
    return examples_markdown(
        "judge: comparisons, both orders",
        [_both_ways_example(first, second, candidates) for first, second in both_ways],
    )


def _both_ways_example(first: dict, second: dict, candidates: dict) -> dict:
    """``first`` judged (a, b) and ``second`` (b, a): both verdicts as p(a better)."""
    a, b = (candidates[(first["prompt_id"], first[side])] for side in ("a", "b"))
    return {
        "instruction": a["prompt"],
        "reference": a["reference"],
        f"output {a['candidate']}": a["response"],
        f"output {b['candidate']}": b["response"],
        f"p({a['candidate']} better), shown first": first["p_a"],
        f"p({a['candidate']} better), shown second": 1.0 - second["p_a"],
        "judge said (both orders)": f"{first['judge_text']!r} / {second['judge_text']!r}",
    }


JUDGMENT_ROWS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("a", pa.int64()),
        ("b", pa.int64()),
        ("p_a", pa.float64()),
        ("parsed", pa.bool_()),
        ("mode", pa.string()),
        ("judge_text", pa.string()),
        ("reference_f1_a", pa.float64()),
        ("reference_f1_b", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("outputs_cut", pa.bool_()),
        ("dropped", pa.bool_()),
    ]
)
JUDGE = Stage(
    "judge",
    None,
    __name__,
    schema=JUDGMENT_ROWS,
    examples=judge_examples,
    shards=Shards(
        units=candidate_groups,
        open=judge_backend,
        compute=judge_groups,
        metrics=judge_metrics,
        work=lambda groups, config: sum(len(ordered_pairs(g)) for g in groups),
        unit="comparisons",
    ),
)
judge_task = stage_task(JUDGE)
