"""Zero-shot GENIES scoring throughput: alignflow's hf path versus a plain
per-pair transformers loop, on the same loaded model and the same pairs, in one run.

alignflow: each distinct (prompt, response) scored once, length-bucketed batches
under a token budget, logits kept only from the first response position.
Baseline: for every pair, each response as its own forward pass over the full
vocabulary logits (how a straightforward evaluation script does it).

    python bench/bench_genies_scoring.py --data-dir $ALIGNFLOW_HOME/genies \\
        --distributions alpaca_mmlu us_history_fiction --pairs 48
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from benchlib import one_sequence_logprob, timed

from alignflow.config import GeniesScoringConfig, alignflow_home
from alignflow.genies.data import capped, distribution_dir, expand_pairs, read_split
from alignflow.genies.metrics import accuracy
from alignflow.genies.scoring import encode_pairs, probs_from_scores, too_long
from alignflow.workers.models import load_causal_lm, resolve_model_dir
from alignflow.workers.scoring import sequence_logprob_sums


def load_pairs(data_dir: Path, names: list[str], per_distribution: int, seed: int, tokenizer, max_tokens: int):
    """Seeded test pairs of each distribution, over-long records dropped as the genies_pairs stage drops them."""
    pairs = []
    for name in names:
        records = read_split(distribution_dir(data_dir, name), "test")
        dropped = {i for i, record in enumerate(records) if too_long(tokenizer, record, max_tokens)}
        kept = [p for p in expand_pairs(records, seed, name, "test") if p["record"] not in dropped]
        pairs += capped(kept, per_distribution, seed)
    return pairs


def batched(model, tokenizer, pairs: list[dict], scoring: GeniesScoringConfig) -> tuple[list[float], list[float]]:
    """alignflow's path: distinct sequences, length-bucketed batches under the token budget."""
    seqs = encode_pairs(tokenizer, pairs, scoring.max_tokens)
    sums = sequence_logprob_sums(model, tokenizer.pad_token_id, seqs.prompts, seqs.responses, scoring.token_budget)
    return seqs.pair_scores(sums)


def per_pair_loop(model, tokenizer, pairs: list[dict], max_tokens: int) -> tuple[list[float], list[float]]:
    """The baseline: one forward per response, batch size 1, full logits."""
    seqs = encode_pairs(tokenizer, pairs, max_tokens)  # same token ids as ours, so the numbers must agree
    sums = {
        (a, b, i): one_sequence_logprob(model, seqs.prompts[i], seqs.responses[i])
        for a, b in seqs.pair_index
        for i in (a, b)
    }
    return [sums[(a, b, a)] for a, b in seqs.pair_index], [sums[(a, b, b)] for a, b in seqs.pair_index]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--model-cache", default=str(alignflow_home() / "models"))
    p.add_argument("--data-dir", default=str(alignflow_home() / "genies"))
    p.add_argument("--distributions", nargs="+", default=["alpaca_mmlu", "us_history_fiction"])
    p.add_argument("--pairs", type=int, default=48, help="pairs per distribution")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/genies_scoring.json")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model, tokenizer = load_causal_lm(resolve_model_dir(args.model, args.model_cache), args.dtype)
    pairs = load_pairs(Path(args.data_dir), args.distributions, args.pairs, args.seed, tokenizer, args.max_tokens)
    scoring = GeniesScoringConfig(max_tokens=args.max_tokens, dtype=args.dtype)
    seqs = encode_pairs(tokenizer, pairs, args.max_tokens)
    pair_tokens = sum(len(seqs.prompts[i]) + len(seqs.responses[i]) for pair in seqs.pair_index for i in pair)

    batched(model, tokenizer, pairs[:4], scoring)  # warm-up: first-call allocations
    (ours_a, ours_b), ours_s = timed(lambda: batched(model, tokenizer, pairs, scoring))
    (base_a, base_b), base_s = timed(lambda: per_pair_loop(model, tokenizer, pairs, args.max_tokens))

    p_ours, p_base = probs_from_scores(ours_a, ours_b), probs_from_scores(base_a, base_b)
    preferred = [p if pair["preferred"] == 0 else 1 - p for pair, p in zip(pairs, p_ours)]
    preferred_base = [p if pair["preferred"] == 0 else 1 - p for pair, p in zip(pairs, p_base)]
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "distributions": args.distributions,
        "pairs": len(pairs),
        "distinct_sequences": len(seqs.prompts),
        "pair_tokens": pair_tokens,
        "threads": torch.get_num_threads(),
        "alignflow_s": round(ours_s, 2),
        "baseline_s": round(base_s, 2),
        "alignflow_pairs_per_s": round(len(pairs) / ours_s, 2),
        "baseline_pairs_per_s": round(len(pairs) / base_s, 2),
        "alignflow_tokens_per_s": round(pair_tokens / ours_s, 1),
        "baseline_tokens_per_s": round(pair_tokens / base_s, 1),
        "speedup": round(base_s / ours_s, 2),
        "max_abs_logprob_diff": max(abs(x - y) for x, y in zip(ours_a + ours_b, base_a + base_b)),
        "accuracy_alignflow": accuracy(preferred),
        "accuracy_baseline": accuracy(preferred_base),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
