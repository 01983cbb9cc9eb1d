"""The vLLM backend: the same interface as ``hf`` (workers/backend.py) on a vLLM engine.

One engine per backend object, created in the constructor and shut down by
``close()``: ``shared_backend`` keeps one per process, serving every shard and
stage that asks for the same model, and closes it before loading another, so a
process never holds two engines at once. ``vllm`` is imported here lazily: it is an optional
extra, and stage keys hash this module's source in venvs without it.

vLLM starts its engine in a spawned process that re-imports the caller's main
module: a script that creates a ``VLLMBackend`` must do so under
``if __name__ == "__main__":``. On CPU set ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV
cache, e.g. 2); without it vLLM refuses to start unless 92% of memory is free.

Log-probs are of the raw distribution, as in ``hf``: the engine runs with
``logprobs_mode="raw_logprobs"`` (vLLM 0.32's default, set explicitly), the
log_softmax of the logits before temperature, top-p and penalties.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from alignflow.workers.backend import Completion, GenerationParams, regroup
from alignflow.workers.chat import end_of_turn_ids
from alignflow.workers.hardware import local_device, resolve_dtype


class VLLMBackend:
    def __init__(self, model_dir: Path, dtype: str = "float32", tensor_parallel_size: int = 1):
        from transformers import AutoTokenizer
        from vllm import LLM

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = SimpleNamespace(generation_config=_generation_config(model_dir))
        self.stop_ids = end_of_turn_ids(self.tokenizer, model)
        self.llm = LLM(
            model=str(model_dir),
            dtype=resolve_dtype(dtype, local_device()),
            tensor_parallel_size=tensor_parallel_size,
            # the judge's comparisons of one prompt share rules, instruction and reference: computed once
            enable_prefix_caching=True,
            # CUDA graphs pay off on GPUs; on CPU, torch.compile adds over a minute to each engine start
            enforce_eager=not torch.cuda.is_available(),
            logprobs_mode="raw_logprobs",
            max_logprobs=-1,  # -1: up to the whole vocabulary, like hf's top-k
            # tensor-parallel workers as local processes on the devices this process sees (inside a Ray
            # actor vLLM would otherwise ask Ray for GPUs its own replica already holds)
            distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
        )
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def close(self) -> None:
        """Stop the engine process and free its memory (the object is unusable after)."""
        self.llm.llm_engine.engine_core.shutdown()

    # -- generation -----------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: GenerationParams, seeds: list[int], progress=None):
        if params.entropies:
            raise NotImplementedError(
                "per-step entropies (GenerationParams.entropies, sample.cot) need the whole next-token "
                "distribution; vLLM returns it only as full-vocabulary log-probs (logprobs=-1), a Python list "
                "of vocabulary size per generated token (megabytes per token for SmolLM2); use backend: hf"
            )
        # vLLM refuses n > 1 when greedy; the n greedy continuations are one continuation n times
        copies = params.n if params.temperature == 0 else 1
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            [self._sampling_params(params, params.n // copies, seed) for seed in seeds],
            use_tqdm=False,
        )
        if progress:
            progress(len(prompts) * params.n)
        return [
            [self._completion(c, params) for c in sorted(o.outputs, key=lambda c: c.index) for _ in range(copies)]
            for o in outputs
        ]

    def next_token(self, groups: list[list[list[int]]], top_logprobs: int, progress=None) -> list[list[Completion]]:
        """One greedy token per prompt of each group; the engine's prefix caching reuses a group's shared prefix."""
        params = GenerationParams(temperature=0.0, max_new_tokens=1, top_logprobs=top_logprobs)
        flat = self.generate(
            [p for prompts in groups for p in prompts], params, seeds=[0] * sum(map(len, groups)), progress=progress
        )
        return regroup([c[0] for c in flat], map(len, groups))

    def _sampling_params(self, params: GenerationParams, n: int, seed: int):
        from vllm import SamplingParams

        # vLLM gives the j-th of a request's n samples the seed ``seed + j``: each prompt
        # samples the same candidates in any batch, as with hf's per-row generators
        return SamplingParams(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=seed,
            stop_token_ids=self.stop_ids,
            logprobs=min(params.top_logprobs, self.vocab_size),
            detokenize=False,
            flat_logprobs=True,  # texts are decoded below exactly as hf decodes them
        )

    def _completion(self, output, params: GenerationParams) -> Completion:
        tokens = list(output.token_ids)
        steps = list(output.logprobs)  # {token id: Logprob} per generated token
        stopped = bool(tokens) and tokens[-1] in self.stop_ids
        return Completion(
            token_ids=tokens,
            text=self.tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=True),
            logprobs=[step[token].logprob for step, token in zip(steps, tokens)],
            finish_reason="stop" if stopped else "length",
            top_logprobs=[_top(step, params.top_logprobs) for step in steps] if params.top_logprobs else None,
            stop_token=tokens[-1] if stopped else None,
        )

    # -- scoring --------------------------------------------------------------
    def sequence_logprobs(self, prompts: list[list[int]], responses: list[list[int]], progress=None) -> list[float]:
        sums = [float(sum(logprobs)) for logprobs in self.response_token_logprobs(prompts, responses)]
        if progress:
            progress(len(prompts))
        return sums

    def response_token_logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """log pi(token | prefix) of each response token, from vLLM's prompt log-probs of
        prompt + response (one throwaway token is generated per sequence)."""
        from vllm import SamplingParams

        scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, flat_logprobs=True)
        outputs = self.llm.generate(
            [{"prompt_token_ids": p + r} for p, r in zip(prompts, responses)], scoring, use_tqdm=False
        )
        # position i of the prompt log-probs scores token i of prompt + response
        return [
            [o.prompt_logprobs[len(p) + i][token].logprob for i, token in enumerate(r)]
            for o, p, r in zip(outputs, prompts, responses)
        ]


def _generation_config(model_dir: Path):
    """The generation config transformers would give the model (its file, else one derived from config.json):
    ``end_of_turn_ids`` reads its EOS ids from ``model.generation_config``."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))


def _top(step: dict, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of a step, best first (vLLM adds the sampled token when it ranks below k)."""
    ranked = sorted(step.items(), key=lambda item: item[1].rank)[:k]
    return [(token, logprob.logprob) for token, logprob in ranked]
