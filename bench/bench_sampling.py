"""Sampling throughput: alignflow's hf backend (the sample stage's generator)
versus one plain batched ``model.generate`` call, in one run on one loaded model,
with the same prompts, batch size, sampling settings and precision.

alignflow's loop also records each sampled token's raw log-prob (what the sample
stage stores); ``generate`` is called without scores, as a plain script would.
Tokens/s counts generated tokens up to and including each row's end-of-turn token.

    python bench/bench_sampling.py --prompts 16 --n 4 --max-new-tokens 64 --dtype bfloat16
"""

from __future__ import annotations

import json

import torch
from benchlib import demo_prompt_ids, sampling_parser, timed

from alignflow.config import alignflow_home
from alignflow.workers.backend import GenerationParams
from alignflow.workers.hf import HFBackend
from alignflow.workers.models import resolve_model_dir


def plain_generate(backend: HFBackend, prompts: list[list[int]], params: GenerationParams) -> int:
    """The baseline: left-padded batches of whole prompts x n through model.generate; returns generated tokens."""
    tokenizer, model = backend.tokenizer, backend.model
    rows = [p for p in prompts for _ in range(params.n)]
    generated = 0
    for start in range(0, len(rows), backend.batch_size):
        batch = tokenizer.pad(
            {"input_ids": rows[start : start + backend.batch_size]}, padding=True, return_tensors="pt"
        )
        with torch.inference_mode():
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=0,
                max_new_tokens=params.max_new_tokens,
                eos_token_id=backend.stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        generated += sum(_length_to_stop(row.tolist(), backend.stop_ids) for row in new)
    return generated


def _length_to_stop(tokens: list[int], stops: list[int]) -> int:
    return next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))


def hf_against_generate(backend: HFBackend, prompts: list[list[int]], params: GenerationParams, repeats: int) -> dict:
    """Tokens/s of the hf backend and of plain ``generate``, interleaved so drift on the machine hits both."""
    seeds = list(range(len(prompts)))
    torch.manual_seed(0)
    plain_generate(backend, prompts[:1], params)  # warm-up both paths
    backend.generate(prompts[:1], params, seeds[:1])
    ours, theirs = [], []
    for _ in range(repeats):
        completions, seconds = timed(lambda: backend.generate(prompts, params, seeds))
        ours.append(sum(len(c.token_ids) for samples in completions for c in samples) / seconds)
        tokens, seconds = timed(lambda: plain_generate(backend, prompts, params))
        theirs.append(tokens / seconds)
    return {
        "alignflow_tok_s": [round(x, 1) for x in ours],
        "generate_tok_s": [round(x, 1) for x in theirs],
        "ratio_per_repeat": [round(a / b, 3) for a, b in zip(ours, theirs)],
    }


def main() -> None:
    p = sampling_parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    backend = HFBackend(
        resolve_model_dir(args.model, alignflow_home() / "models"), dtype=args.dtype, batch_size=args.batch_size
    )
    prompts = demo_prompt_ids(backend.tokenizer, args.prompts)
    params = GenerationParams(n=args.n, temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens)
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "dtype": args.dtype,
                "rows": len(prompts) * args.n,
                **hf_against_generate(backend, prompts, params, args.repeats),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
