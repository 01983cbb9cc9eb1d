"""Judge prefix reuse on the hf backend: each prompt's comparisons share rules, instruction and
reference, whose KV cache is computed once; the verdicts are those of the one-token generate path."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from alignflow.config import JudgeConfig
from alignflow.tasks.judge import judge_candidates
from alignflow.workers.hf import HFBackend, shared_prefix_length

RESPONSES = [
    "Yes.",
    "It depends on the context, but usually the answer is yes.",
    "No",
    "Paris is the capital of France.",
]


def _candidate_rows(prompts: int, candidates: int) -> list[dict]:
    lines = (resources.files("alignflow") / "data" / "demo_prompts.jsonl").read_text().splitlines()
    rows = []
    for i, line in enumerate(lines[:prompts]):
        demo = json.loads(line)
        rows += [
            {
                "prompt_id": f"p{i}",
                "prompt": demo["prompt"],
                "reference": demo.get("reference", ""),
                "candidate": c,
                "response": RESPONSES[(i + c) % len(RESPONSES)] * (1 + c),
            }
            for c in range(candidates)
        ]
    return rows


def test_shared_prefix_length_leaves_every_prompt_a_token():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7], [7, 8]]) == 0
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0


@pytest.mark.parametrize("mode", ["refeval", "base"])
def test_prefix_reuse_gives_the_generate_path_verdicts(tiny_model_dir, mode):
    backend = HFBackend(tiny_model_dir, dtype="float32", batch_size=5)  # 12 comparisons a prompt: 3 batches
    # a random model rarely puts "a"/"b" in its top 5: score them over the whole vocabulary
    config = JudgeConfig(mode=mode, top_logprobs=512, max_prompt_tokens=1024)
    rows = _candidate_rows(prompts=3, candidates=4)
    reused, reused_metrics = judge_candidates(backend, rows, config)
    whole, _ = judge_candidates(backend, rows, config, reuse_prefix=False)
    assert len(reused) == len(whole) == 3 * 12 and reused_metrics["unparsed"] == 0
    for new, old in zip(reused, whole):
        assert (new["prompt_id"], new["a"], new["b"]) == (old["prompt_id"], old["a"], old["b"])
        assert abs(new["p_a"] - old["p_a"]) < 1e-4 and new["parsed"] == old["parsed"]
        assert new["judge_text"] == old["judge_text"] and new["prompt_tokens"] == old["prompt_tokens"]
    assert len({round(r["p_a"], 3) for r in reused}) > 1  # real, differing verdicts, not a constant


class _RecordingHF(HFBackend):
    def next_token(self, groups, top_logprobs, progress=None):
        self.groups = groups
        return super().next_token(groups, top_logprobs, progress)


def test_a_prompts_comparisons_share_its_rules_instruction_and_reference(tiny_model_dir):
    backend = _RecordingHF(tiny_model_dir, dtype="float32")
    judge_candidates(backend, _candidate_rows(prompts=1, candidates=3), JudgeConfig(top_logprobs=512))
    (group,) = backend.groups  # one prompt: one group of its 6 ordered comparisons
    shared = backend.tokenizer.decode(group[0][: shared_prefix_length(group)])
    assert len(group) == 6 and "# Reference Output:\nThe capital of France is Paris." in shared
    assert "# Output (a):" in shared and not any(response in shared for response in RESPONSES)
