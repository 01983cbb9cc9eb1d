"""The intervention registry (genies/interventions/): each built-in names its module and
config class, and GeniesConfig validates every section with the class beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from alignflow.config import ConfigError, GeniesConfig, Strict, load_config
from alignflow.genies.interventions import BUILTIN, config_sections, intervention_module, make_intervention
from alignflow.genies.interventions.base import REGISTRY, BuiltinIntervention, register
from alignflow.genies.interventions.dpo import GeniesDPOConfig
from alignflow.genies.interventions.zero_shot import FewShotConfig
from alignflow.genies.stages import InterventionSpec, intervention_specs


def test_each_builtin_names_the_module_that_implements_it():
    assert BUILTIN == (
        "ccs",
        "cra",
        "dpo",
        "few_shot",
        "lat_stim_1",
        "lat_stim_2",
        "lora_fine_tune",
        "lora_reward_model",
        "mass_mean_shift",
        "mms",
        "prompt_tuning",
        "zero_shot",
    )
    assert intervention_module("dpo") == "alignflow.genies.interventions.dpo"
    assert (
        intervention_module("few_shot")
        == intervention_module("zero_shot")
        == "alignflow.genies.interventions.zero_shot"
    )
    with pytest.raises(ValueError, match="unknown intervention 'nope'; built in: ccs, cra, dpo, few_shot"):
        intervention_module("nope")


def test_sections_take_the_defaults_of_the_class_beside_the_intervention():
    config = GeniesConfig()
    assert config.few_shot == FewShotConfig() and config.dpo == GeniesDPOConfig()
    assert config.dpo.lr == 1e-4 and config.dpo.epochs == 2 and config.dpo.val_fraction == 0.0
    assert "zero_shot" not in config_sections() and config.section_params("zero_shot") == {}


def test_the_yaml_shape_loads_and_round_trips():
    config = load_config(GeniesConfig, Path(__file__).resolve().parents[3] / "configs" / "genies_cpu.yaml")
    assert config.few_shot.max_prefix_tokens == 1024 and config.lora_fine_tune.steps == 6
    assert GeniesConfig.model_validate(config.model_dump(mode="json")) == config
    specs = {s.name: s for s in intervention_specs(config)}
    assert specs["dpo"].params == config.dpo.model_dump(mode="json")


@pytest.mark.parametrize(
    "override, message",
    [
        ("few_shot.k=0", "few_shot.k: Input should be greater than or equal to 1 (got 0)"),
        ("dpo.loss=x", "dpo.loss: Input should be 'sigmoid', 'ipo' or 'hinge'"),
        ("few_shot.z=1", "unknown key 'few_shot.z'; valid keys here: k, max_prefix_tokens, seed"),
        (
            "fewshot.k=1",
            "unknown key 'fewshot'; valid keys here: ccs, ceiling, cra, data_dir, dpo, executor, external, few_shot,",
        ),
    ],
)
def test_bad_sections_name_the_field(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(GeniesConfig, None, [override])
    assert message in str(error.value)


def test_an_unknown_intervention_lists_the_valid_ones():
    config = load_config(GeniesConfig, None, ["interventions=[few_shot, nope]"])
    with pytest.raises(ValueError, match=r"interventions: unknown \['nope'\]; built in: ccs, cra, dpo, few_shot, "):
        intervention_specs(config)


class ToyConfig(Strict):
    weight: float = Field(1.0, gt=0.0)


def test_a_registered_intervention_gets_a_validated_section():
    """What adding an intervention takes: a class and its config in one module of the folder."""

    @register("toy", ToyConfig)
    class Toy(BuiltinIntervention):
        trains = False

    try:
        assert load_config(GeniesConfig, None, ["toy.weight=2.5"]).toy == ToyConfig(weight=2.5)
        with pytest.raises(ConfigError, match=r"toy.weight: Input should be greater than 0"):
            load_config(GeniesConfig, None, ["toy.weight=0"])
        built = make_intervention(InterventionSpec(name="toy", params={"weight": 3.0}))
        assert isinstance(built, Toy) and built.config == ToyConfig(weight=3.0) and built.name == "toy"
        assert intervention_module("toy") == __name__
    finally:
        del REGISTRY["toy"]


def test_the_deployment_form_schema_lists_every_section():
    """Prefect validates a deployment's parameters (and draws its run form) from the flow's
    JSON schema: the sections must be in it, with their own fields and bounds."""
    from prefect.utilities.callables import parameter_schema

    from alignflow.flows import FLOWS

    genies = parameter_schema(FLOWS["genies-eval"].fn).model_dump()["definitions"]["GeniesConfig"]
    for name, section in config_sections().items():
        assert set(genies["properties"][name]["properties"]) == set(section.model_fields)
    assert genies["properties"]["few_shot"]["properties"]["k"]["minimum"] == 1
