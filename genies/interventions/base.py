"""The intervention contract.

An intervention trains on one source distribution's pairs and writes its state
(adapter, probe, examples ...) into a folder; evaluating that state on a
distribution's pairs gives, per pair, the probability that response A is the
preferred one. Pairs are dicts with ``pair_id, prompt, response_a, response_b,
preferred`` (0 = A, 1 = B); interventions never look at ``preferred`` when scoring.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol


@dataclass
class Scores:
    """An evaluation: per-pair P(A preferred) when the intervention exposes it,
    else only the accuracy (external scripts report just ``eval_accuracy``)."""

    p_a: list[float] | None = None
    accuracy: float | None = None
    extra: dict = field(default_factory=dict)


class Intervention(Protocol):
    name: str
    trains: bool  # False: the state is empty and evaluation uses the base model as is

    def train(self, base: Path, pairs: list[dict], out: Path, progress: Callable[[int], None] | None) -> dict:
        """Fit on ``pairs`` and write the state into ``out``; returns training metrics."""

    def evaluate(self, base: Path, state: Path | None, pairs: list[dict],
                 progress: Callable[[int], None] | None) -> Scores:
        """Score ``pairs`` with the trained state (None when ``trains`` is False)."""
