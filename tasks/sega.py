"""SEGA (GEM Eq. 2): a listwise objective over the k candidates of one prompt.

    r_i = S_i (identity) or softmax_i(S) ;  A_i = r_i - mean(r)  (optionally / std(r))
    L   = -(1/k) * sum_i stopgrad(A_i) * log pi(a_i | q)

log pi(a_i | q) is the summed log-prob of the candidate's tokens (optionally
divided by its length). An optional KL penalty to the reference uses the
per-token estimator exp(d) - d - 1 with d = log pi_ref - log pi, which is
non-negative and unbiased for KL(pi || pi_ref) on the policy's own samples.
"""
from __future__ import annotations

import torch


def group_advantages(scores: torch.Tensor, mapping: str = "softmax", zscore: bool = False) -> torch.Tensor:
    """Advantages of one group: zero-mean by construction."""
    if mapping == "softmax":
        rewards = torch.softmax(scores, dim=-1)
    elif mapping == "identity":
        rewards = scores
    else:
        raise ValueError(f"unknown SEGA reward mapping '{mapping}' (expected softmax or identity)")
    advantages = rewards - rewards.mean()
    if zscore and len(scores) > 1:
        advantages = advantages / (rewards.std(unbiased=False) + 1e-8)
    return advantages


def sega_loss(logp_sums: torch.Tensor, advantages: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """-(1/k) sum_i stopgrad(A_i) log pi(a_i); ``lengths`` set: per-token mean log-probs."""
    logp = logp_sums / lengths if lengths is not None else logp_sums
    return -(advantages.detach() * logp).mean()


def kl_penalty(policy_logps: torch.Tensor, reference_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of exp(d) - d - 1, d = log pi_ref - log pi (per token)."""
    d = (reference_logps - policy_logps) * mask
    per_token = torch.exp(d) - d - 1
    return (per_token * mask).sum() / mask.sum().clamp(min=1)
