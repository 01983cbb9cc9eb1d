"""Top-p sampling in the hf backend: the nucleus found by a growing partial top-k
equals the one a full sort gives, and inverse-CDF draws follow its renormalised
probabilities, whatever k held it."""

from __future__ import annotations

import torch

from alignflow.workers.hf import nucleus, sample_from


def full_sort_nucleus(probs: torch.Tensor, top_p: float) -> list[dict[int, float]]:
    """The definition: sort every token, keep those before the mass reaches top_p."""
    out = []
    for row in probs:
        values, ids = row.sort(descending=True)
        before = values.cumsum(0) - values
        out.append({int(i): float(v) for v, i, b in zip(values, ids, before) if b < top_p})
    return out


def as_sets(probs: torch.Tensor, ids: torch.Tensor) -> list[dict[int, float]]:
    return [{int(i): float(p) for p, i in zip(pr, ir) if p > 0} for pr, ir in zip(probs, ids)]


def test_partial_top_k_nucleus_equals_the_full_sort_even_when_k_must_grow():
    torch.manual_seed(0)
    peaked = torch.softmax(torch.randn(3, 50) * 4, dim=-1)  # short nuclei
    flat = torch.softmax(torch.randn(2, 50) * 0.1, dim=-1)  # nuclei far longer than first_k
    probs = torch.cat([peaked, flat])
    kept = as_sets(*nucleus(probs, 0.9, first_k=4))
    expected = full_sort_nucleus(probs, 0.9)
    assert [set(k) for k in kept] == [set(e) for e in expected]
    assert all(abs(k[t] - e[t]) < 1e-7 for k, e in zip(kept, expected) for t in e)
    assert min(len(e) for e in expected[3:]) > 4  # the flat rows really needed a larger k


def test_the_same_uniform_picks_the_same_token_for_any_k():
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(4, 64), dim=-1)
    uniforms = torch.rand(4)
    small = sample_from(*nucleus(probs, 0.8, first_k=2), uniforms)
    whole = sample_from(*nucleus(probs, 0.8, first_k=64), uniforms)
    assert torch.equal(small, whole)


def test_draws_follow_the_renormalised_nucleus_and_never_leave_it():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    draws = 40_000
    kept, ids = nucleus(probs.expand(draws, -1), 0.7)  # nucleus {0, 1}: 0.5 + 0.3 reaches 0.7
    tokens = sample_from(kept, ids, torch.rand(draws, generator=torch.Generator().manual_seed(0)))
    counts = torch.bincount(tokens, minlength=4).float() / draws
    assert counts[2] == 0 and counts[3] == 0
    assert abs(float(counts[0]) - 0.5 / 0.8) < 0.01 and abs(float(counts[1]) - 0.3 / 0.8) < 0.01


def test_top_p_one_samples_the_whole_vocabulary_without_sorting():
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    kept, ids = nucleus(probs, 1.0)
    assert torch.equal(kept, probs) and ids.tolist() == [[0, 1, 2]]
    draws = 30_000
    tokens = sample_from(
        kept.expand(draws, -1), ids.expand(draws, -1), torch.rand(draws, generator=torch.Generator().manual_seed(1))
    )
    freq = torch.bincount(tokens, minlength=3).float() / draws
    assert torch.allclose(freq, probs[0], atol=0.01)
