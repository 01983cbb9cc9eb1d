"""Built-in interventions by name, and the factory the stages use.

Every module of this folder is imported here, so an intervention registers itself
(``@register`` in base.py): adding one is adding a module, nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from pydantic import BaseModel

from alignflow.genies.interventions.base import REGISTRY, Intervention, Registration
from alignflow.genies.interventions.script import ScriptIntervention

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

BUILTIN = tuple(sorted(REGISTRY))


def registration(name: str) -> Registration:
    if name not in REGISTRY:
        raise ValueError(f"unknown intervention '{name}'; built in: {', '.join(BUILTIN)}")
    return REGISTRY[name]


def intervention_module(name: str) -> str:
    """The module implementing built-in intervention ``name``."""
    return registration(name).module


def config_sections() -> dict[str, type[BaseModel]]:
    """Intervention name -> the config class of its section in the GENIES config."""
    return {name: r.config for name, r in sorted(REGISTRY.items()) if r.config is not None}


def make_intervention(spec, checkpoints=None) -> Intervention:
    """The intervention a spec names; ``spec.script_dir`` set means an external script folder.
    ``checkpoints`` = (run context, stage key): where resumable training keeps its checkpoints."""
    if spec.script_dir:
        return ScriptIntervention(spec.name, spec.script_dir, spec.contract)
    entry = registration(spec.name)
    config = entry.config.model_validate(spec.params) if entry.config else None
    return entry.cls(spec.scoring, config, checkpoints)
