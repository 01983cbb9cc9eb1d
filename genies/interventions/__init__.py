"""Built-in interventions by name, and the factory the stages use."""
from __future__ import annotations

from alignflow.config import DPOConfig, FewShotConfig, LoraRewardConfig, MassMeanShiftConfig
from alignflow.genies.interventions.base import Intervention
from alignflow.genies.interventions.dpo import DPO
from alignflow.genies.interventions.lora_rm import LoraRewardModel
from alignflow.genies.interventions.mass_mean import MassMeanShift
from alignflow.genies.interventions.script import ScriptIntervention
from alignflow.genies.interventions.zero_shot import FewShot, ZeroShot

BUILDERS = {
    "zero_shot": lambda spec, _: ZeroShot(spec.scoring),
    "few_shot": lambda spec, _: FewShot(spec.scoring, FewShotConfig(**spec.params)),
    "lora_reward_model": lambda spec, _: LoraRewardModel(spec.scoring, LoraRewardConfig(**spec.params)),
    "mass_mean_shift": lambda spec, _: MassMeanShift(spec.scoring, MassMeanShiftConfig(**spec.params)),
    "dpo": lambda spec, checkpoints: DPO(spec.scoring, DPOConfig(**spec.params), checkpoints),
}
BUILTIN = tuple(BUILDERS)


def make_intervention(spec, checkpoints=None) -> Intervention:
    """The intervention a spec names; ``spec.script_dir`` set means an external script folder.
    ``checkpoints`` = (store, key) where resumable training keeps its checkpoints."""
    if spec.script_dir:
        return ScriptIntervention(spec.name, spec.script_dir)
    if spec.name not in BUILDERS:
        raise ValueError(f"unknown intervention '{spec.name}'; built in: {', '.join(BUILTIN)}")
    return BUILDERS[spec.name](spec, checkpoints)
