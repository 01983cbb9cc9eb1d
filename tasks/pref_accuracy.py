"""pref_accuracy: how often a policy's implicit reward prefers the chosen response.

r(q, a) = beta * sum_t log pi(a_t | q, a_<t), or with a reference model
beta * (log pi - log pi_ref) (as RewardBench scores DPO models). A pair is
correct when r(chosen) > r(rejected); ties are reported on their own and are
not counted as correct.
"""
from __future__ import annotations


def implicit_rewards(policy: list[float], beta: float, reference: list[float] | None = None) -> list[float]:
    if reference is None:
        return [beta * p for p in policy]
    return [beta * (p - r) for p, r in zip(policy, reference)]


def preference_accuracy(chosen: list[float], rejected: list[float]) -> dict:
    """Share of pairs where chosen wins, where it ties, and the mean margin."""
    if not chosen or len(chosen) != len(rejected):
        raise ValueError(f"need the same non-zero number of chosen and rejected rewards, got {len(chosen)} and {len(rejected)}")
    wins = sum(c > r for c, r in zip(chosen, rejected))
    ties = sum(c == r for c, r in zip(chosen, rejected))
    n = len(chosen)
    return {"pairs": n, "accuracy": wins / n, "ties": ties / n,
            "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / n}
