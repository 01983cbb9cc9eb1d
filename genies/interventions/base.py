"""The intervention contract.

An intervention trains on one source distribution's pairs and writes its state
(adapter, probe, examples ...) into a folder; evaluating that state on a
distribution's pairs gives, per pair, the probability that response A is the
preferred one. Pairs are dicts with ``pair_id, prompt, response_a, response_b,
preferred`` (0 = A, 1 = B); interventions never look at ``preferred`` when scoring.

A built-in intervention is one module of this folder: a ``BuiltinIntervention``
subclass decorated with ``@register(name, ConfigClass)``. Its config class lives
beside it and validates the ``name:`` section of the GENIES config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:
    from alignflow.config import GeniesScoringConfig
    from alignflow.tasks.stage import RunContext


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
    full_train_split: bool  # True: trained on the whole (length-filtered) train split, not the capped pairs

    def train(self, base: Path, pairs: list[dict], out: Path, progress: Callable[[int], None] | None) -> dict:
        """Fit on ``pairs`` and write the state into ``out``; returns training metrics."""

    def evaluate(
        self, base: Path, state: Path | None, pairs: list[dict], progress: Callable[[int], None] | None
    ) -> Scores:
        """Score ``pairs`` with the trained state (None when ``trains`` is False)."""


TrainingRun = tuple["RunContext", str]  # a stage's run context and key: where resumable training keeps checkpoints


class BuiltinIntervention:
    """What the built-in interventions share: the registry builds each as
    ``cls(scoring, config, run)``; ``config`` is its section of the GENIES config
    (None without one), ``run`` is set where the stage trains it."""

    name: str  # set by @register
    trains: bool
    full_train_split = False  # True: trains on the whole train split, not the capped pairs (few-shot's pool)

    def __init__(self, scoring: GeniesScoringConfig, config: BaseModel | None = None, run: TrainingRun | None = None):
        self.scoring = scoring
        self.config = config
        self.run = run


@dataclass(frozen=True)
class Registration:
    name: str
    cls: type[BuiltinIntervention]
    config: type[BaseModel] | None  # validates the ``name:`` section of the GENIES config; None: no parameters

    @property
    def module(self) -> str:
        """The module that implements it (what its stages' keys cover)."""
        return self.cls.__module__


REGISTRY: dict[str, Registration] = {}


def register(name: str, config: type[BaseModel] | None = None):
    """Class decorator: a built-in intervention called ``name``, parameterised by ``config``."""

    def add(cls: type[BuiltinIntervention]) -> type[BuiltinIntervention]:
        if name in REGISTRY:
            raise ValueError(f"intervention '{name}' is registered twice: {REGISTRY[name].module} and {cls.__module__}")
        cls.name = name
        REGISTRY[name] = Registration(name, cls, config)
        return cls

    return add
