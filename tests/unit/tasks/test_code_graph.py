"""Stage keys from the import graph: a stage's code version covers every project
module it imports (indirectly too), the model libraries where it runs a model,
and, for GENIES, only the intervention its spec names."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from alignflow.genies.stages import GENIES_EVALUATE, GENIES_TRAIN, InterventionSpec
from alignflow.tasks.code_graph import CodeGraph, installed_version
from alignflow.tasks.stage import Stage

STAGE_MODULES = [
    "alignflow.tasks.prompts",
    "alignflow.tasks.sample",
    "alignflow.tasks.judge",
    "alignflow.tasks.pairs",
    "alignflow.tasks.logprobs",
    "alignflow.tasks.train_dpo",
    "alignflow.tasks.train_sega",
    "alignflow.tasks.train_sft",
    "alignflow.tasks.entropy",
    "alignflow.tasks.preferences",
    "alignflow.tasks.pref_accuracy",
    "alignflow.genies.stages",
    "alignflow.genies.report",
]
SPEC_STAGES = {"genies_train", "genies_evaluate"}  # their key depends on the spec: tested on their own below


def project_stages() -> dict[str, Stage]:
    stages = {}
    for name in STAGE_MODULES:
        for value in vars(importlib.import_module(name)).values():
            if isinstance(value, Stage) and value.name not in SPEC_STAGES:
                stages[value.name] = value
    return stages


def edited(module: str) -> CodeGraph:
    """The project's graph as it would be with one more line at the end of ``module``."""
    target = Path(CodeGraph().spec(module).origin)
    return CodeGraph(read_source=lambda path: path.read_text() + ("\nEDITED = True\n" if path == target else ""))


def changed_stages(graph: CodeGraph) -> set[str]:
    before = CodeGraph()
    return {
        name
        for name, stage in project_stages().items()
        if stage.code_version(None, before) != stage.code_version(None, graph)
    }


def test_model_stages_reach_the_model_loader_and_model_free_ones_do_not():
    graph, stages = CodeGraph(), project_stages()
    for name in ("sample", "judge", "logprobs", "train_dpo"):
        assert "alignflow.workers.models" in graph.modules(stages[name].module), name
    for name in ("prompts", "pairs", "preferences", "genies_pairs"):
        assert not graph.runs_model(stages[name].module), name


def test_editing_the_model_loader_changes_exactly_the_stages_that_import_it():
    stages = project_stages()
    changed = changed_stages(edited("alignflow.workers.models"))
    assert {"sample", "judge", "logprobs", "train_dpo", "train_sft", "train_sega", "pref_accuracy"} <= changed
    assert changed == {name for name, s in stages.items() if CodeGraph().runs_model(s.module)}
    assert not changed & {"prompts", "pairs", "preferences", "genies_pairs", "genies_report"}


def test_editing_pairs_changes_pairs_and_the_judge_that_imports_it_only():
    # judge reuses pairs' ordering code; nothing downstream imports it
    assert changed_stages(edited("alignflow.tasks.pairs")) == {"pairs", "judge"}


def test_a_library_upgrade_changes_model_stages_only():
    stages = project_stages()
    upgraded = CodeGraph(library_version=lambda lib: "99.0" if lib == "transformers" else installed_version(lib))
    assert changed_stages(upgraded) == {name for name, s in stages.items() if CodeGraph().runs_model(s.module)}
    assert {"sample", "judge", "logprobs", "train_dpo"} <= changed_stages(upgraded)
    assert "prompts" not in changed_stages(upgraded) and "pairs" not in changed_stages(upgraded)


@pytest.mark.parametrize("stage", [GENIES_TRAIN, GENIES_EVALUATE], ids=lambda s: s.name)
def test_editing_one_intervention_changes_only_its_own_genies_keys(stage):
    specs = {name: InterventionSpec(name=name) for name in ("zero_shot", "mass_mean_shift", "dpo", "lora_reward_model")}
    before, after = CodeGraph(), edited("alignflow.genies.interventions.mass_mean")
    changed = {
        name for name, spec in specs.items() if stage.code_version(spec, before) != stage.code_version(spec, after)
    }
    assert changed == {"mass_mean_shift"}
    # the stage module itself imports the registry, which is not followed into every intervention
    assert not any(".interventions.dpo" in m for m in before.modules("alignflow.genies.stages"))
    assert "alignflow.workers.models" in before.modules(*stage.config_modules(specs["dpo"]))


def write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    importlib.invalidate_caches()


def test_graph_follows_relative_function_level_and_submodule_imports(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_package(
        tmp_path,
        {
            "cgpkg/__init__.py": "",
            "cgpkg/sub/__init__.py": "from . import base\ndef load():\n    from . import registered\n",
            "cgpkg/sub/base.py": "",
            "cgpkg/sub/registered.py": "",
            "cgpkg/sub/leafy.py": "from ..util import helper\n",
            "cgpkg/stage.py": (
                "from typing import TYPE_CHECKING\n"
                "from .sub import leafy\n"  # a submodule named in from-import
                "from cgpkg.tools import helper\n"  # an attribute: the module is cgpkg.tools
                "import json\n"  # outside the project
                "if TYPE_CHECKING:\n    from cgpkg import typing_only\n"
                "def run():\n    from .deferred import go\n    return go()\n"
            ),
            "cgpkg/tools.py": "def helper():\n    return 1\n",
            "cgpkg/util.py": "def helper():\n    return 1\n",  # reached only by leafy's two-level relative import
            "cgpkg/deferred.py": "def go():\n    return 2\n",
            "cgpkg/typing_only.py": "",
        },
    )
    graph = CodeGraph(project="cgpkg", leaves=frozenset())
    assert graph.modules("cgpkg.stage") == {
        "cgpkg",
        "cgpkg.stage",
        "cgpkg.sub",
        "cgpkg.sub.base",
        "cgpkg.sub.leafy",
        "cgpkg.sub.registered",
        "cgpkg.tools",
        "cgpkg.util",
        "cgpkg.deferred",
    }
    # a leaf (a registry, the stage plumbing) is followed through its module-level imports only
    registry_leaf = CodeGraph(project="cgpkg", leaves=frozenset({"cgpkg.sub"})).modules("cgpkg.stage")
    assert "cgpkg.sub.base" in registry_leaf and "cgpkg.sub.registered" not in registry_leaf
    stage_leaf = CodeGraph(project="cgpkg", leaves=frozenset({"cgpkg.stage"})).modules("cgpkg.stage")
    assert "cgpkg.tools" in stage_leaf and "cgpkg.deferred" not in stage_leaf

    version = graph.code_version("cgpkg.stage")
    (tmp_path / "cgpkg" / "deferred.py").write_text("def go():\n    return 3\n")
    assert CodeGraph(project="cgpkg", leaves=frozenset()).code_version("cgpkg.stage") != version


def test_a_stage_covers_the_store_that_writes_its_artifact_but_not_where_shards_run():
    """The stage plumbing is followed through its module-level imports: the artifact store
    (schema casts, Parquet bytes) is in every stage's key, the Ray pool it defers to is not."""
    modules = CodeGraph().modules("alignflow.tasks.prompts")
    assert "alignflow.storage.artifacts" in modules
    assert "alignflow.workers.ray_pool" not in modules and "alignflow.workers.models" not in modules
