"""GEM throughput, each side by side with its baseline in one run on one loaded model:

1. Entropy during generation: HFBackend sampling with per-step raw entropies
   versus the same sampling without them (same prompts, seeds and tokens), and
   versus the alternative the issue rules out for hf, plain sampling followed by
   a second forward pass that recomputes the entropies.
2. SEGA training steps (tokens/s): alignflow's step, where a micro-batch of groups
   is one padded forward/backward, versus a per-candidate loop (one forward/backward
   per candidate, the same loss and gradients), on the same sampled groups.

    python bench/bench_gem.py --prompts 16 --n 4 --max-new-tokens 64 --groups 8
"""

from __future__ import annotations

import json

import torch
from benchlib import demo_prompt_ids, sampling_parser, timed

from alignflow.config import SEGAConfig, alignflow_home
from alignflow.tasks.train_sega import group_advantages, sega_loss, sega_objective
from alignflow.tasks.training import prepare_model
from alignflow.workers.backend import GenerationParams
from alignflow.workers.hf import HFBackend
from alignflow.workers.models import resolve_model_dir
from alignflow.workers.scoring import pack, response_logprob_sums, token_entropy


@torch.inference_mode()
def recompute_entropies(backend: HFBackend, prompts, completions) -> list[list[float]]:
    """The second-pass alternative: one forward over prompt + generated tokens per candidate batch."""
    flat = [(p, c.token_ids) for p, samples in zip(prompts, completions) for c in samples]
    out = []
    for start in range(0, len(flat), backend.batch_size):
        chunk = flat[start : start + backend.batch_size]
        batch = pack([p for p, _ in chunk], [r for _, r in chunk], backend.tokenizer.pad_token_id)
        first = int(batch["response_mask"].float().argmax(dim=1).min())  # logits only from the earliest response token
        logits = (
            backend.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                logits_to_keep=batch["input_ids"].shape[1] - first + 1,
            )
            .logits[:, :-1]
            .float()
        )
        entropies = token_entropy(torch.log_softmax(logits, dim=-1))
        mask = batch["response_mask"][:, first:]
        out += [row[m].tolist() for row, m in zip(entropies, mask)]
    return out


def bench_entropy(backend: HFBackend, prompts, args) -> tuple[dict, list]:
    seeds = list(range(len(prompts)))
    params = GenerationParams(n=args.n, temperature=1.0, top_p=0.95, max_new_tokens=args.max_new_tokens)
    with_entropy = GenerationParams(**{**params.__dict__, "entropies": True})
    backend.generate(prompts[:2], params, seeds[:2])  # warm-up
    plain, t_plain = timed(lambda: backend.generate(prompts, params, seeds))
    during, t_during = timed(lambda: backend.generate(prompts, with_entropy, seeds))
    second, t_second = timed(lambda: recompute_entropies(backend, prompts, plain))
    same_tokens = all(a.token_ids == b.token_ids for x, y in zip(plain, during) for a, b in zip(x, y))
    recorded = [h for samples in during for c in samples for h in c.entropies]
    recomputed = [h for row in second for h in row]
    tokens = sum(len(c.token_ids) for samples in plain for c in samples)
    result = {
        "generated_tokens": tokens,
        "same_tokens": same_tokens,
        "max_abs_entropy_diff_vs_second_pass": max(abs(a - b) for a, b in zip(recorded, recomputed)),
        "plain_s": round(t_plain, 2),
        "with_entropies_s": round(t_during, 2),
        "second_pass_s": round(t_second, 2),
        "plain_tok_s": round(tokens / t_plain, 1),
        "with_entropies_tok_s": round(tokens / t_during, 1),
        "overhead_ratio_during": round(t_during / t_plain, 3),
        "overhead_ratio_second_pass": round((t_plain + t_second) / t_plain, 3),
    }
    return result, during


def sega_groups_from(prompts, completions, k: int) -> list[dict]:
    """Groups of real sampled candidates with advantages from their mean entropies."""
    groups = []
    for prompt, samples in zip(prompts, completions):
        scores = torch.tensor([-sum(c.entropies) / len(c.entropies) for c in samples[:k]])
        groups.append(
            {
                "prompt_id": str(len(groups)),
                "prompt_ids": prompt,
                "responses": [c.token_ids for c in samples[:k]],
                "advantages": group_advantages(scores, "softmax", zscore=True).tolist(),
            }
        )
    return groups


def per_candidate_step(model, groups, pad_id: int) -> None:
    """Baseline: each candidate its own forward/backward; same loss (mean over groups)."""
    for g in groups:
        k = len(g["responses"])
        for response, advantage in zip(g["responses"], g["advantages"]):
            logp = response_logprob_sums(model, pack([g["prompt_ids"]], [response], pad_id))
            (sega_loss(logp, torch.tensor([advantage])) / (k * len(groups))).backward()


def bench_sega(model_dir, groups, args) -> dict:
    config = SEGAConfig(batch_size=args.groups)
    model, tokenizer = prepare_model(model_dir, config)
    objective = sega_objective(config, tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = sum(len(g["prompt_ids"]) + len(r) for g in groups for r in g["responses"])

    def batched():
        objective.batch_loss(model, groups)[0].backward()

    def grads():
        out = torch.cat([p.grad.flatten() for p in params])
        model.zero_grad(set_to_none=True)
        return out

    batched()  # warm-up
    grads()

    def per_candidate():
        per_candidate_step(model, groups, tokenizer.pad_token_id)

    results = {}
    for name, step in (("batched", batched), ("per_candidate", per_candidate)):
        seconds = []
        for _ in range(args.repeats):
            seconds.append(timed(step)[1])
            results[f"{name}_grad"] = grads()
        results[name] = min(seconds)
    grad_diff = float((results.pop("batched_grad") - results.pop("per_candidate_grad")).abs().max())
    return {
        "tokens_per_step": tokens,
        "groups": len(groups),
        "k": len(groups[0]["responses"]),
        "batched_step_s": round(results["batched"], 2),
        "per_candidate_step_s": round(results["per_candidate"], 2),
        "batched_tok_s": round(tokens / results["batched"], 1),
        "per_candidate_tok_s": round(tokens / results["per_candidate"], 1),
        "speedup": round(results["per_candidate"] / results["batched"], 3),
        "max_abs_grad_diff": grad_diff,
    }


def main() -> None:
    p = sampling_parser(__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=8, help="groups in the SEGA micro-batch")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    model_dir = resolve_model_dir(args.model, alignflow_home() / "models")
    backend = HFBackend(model_dir, dtype="float32", batch_size=args.prompts * args.n)
    prompts = demo_prompt_ids(backend.tokenizer, args.prompts)
    entropy, completions = bench_entropy(backend, prompts, args)
    sega = bench_sega(model_dir, sega_groups_from(prompts, completions, args.n)[: args.groups], args)
    print(json.dumps({"threads": torch.get_num_threads(), "entropy": entropy, "sega": sega}, indent=1))


if __name__ == "__main__":
    main()
