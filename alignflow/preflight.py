"""Each flow's inputs checked before Prefect starts its flow run (``alignflow run`` calls
``preflight``): prompt files, preference files, GENIES folders and shift specs go through
the readers and validators their stages use, so bad input fails with the same one-line
error naming the file, line or field, and no flow run is created for it."""

from __future__ import annotations

from collections.abc import Callable

from alignflow.config import GemConfig, GeniesConfig, PipelineConfig, RefEvalEvalConfig, RunConfig, SelfImproveConfig


def check_self_improve(config: SelfImproveConfig) -> None:
    from alignflow.tasks.prompts import prompt_source, read_prompts

    training = read_prompts(prompt_source(config.prompts, config.limit_prompts))
    if config.validation_prompts is not None:
        validation = read_prompts(prompt_source(config.validation_prompts, config.limit_validation_prompts))
        shared = {r["prompt"] for r in training} & {r["prompt"] for r in validation}
        if shared:
            raise ValueError(
                f"validation_prompts: {len(shared)} of its prompts are also training prompts "
                f"(e.g. {next(iter(sorted(shared)))[:60]!r}); validation must be held out"
            )


def check_refeval_eval(config: RefEvalEvalConfig) -> None:
    """The held-out prompts, and that the policy is named (a model named by artifact key must match one artifact)."""
    from alignflow.flows.refeval_eval import policy_spec, trained_model_key
    from alignflow.tasks.prompts import prompt_source, read_prompts
    from alignflow.tasks.stage import run_context

    read_prompts(prompt_source(config.prompts, config.limit_prompts))
    store = run_context(config).store()
    for spec in (policy_spec(config), config.model):
        key = trained_model_key(spec, store.root)
        if key:
            store.find(key)


def check_gem(config: GemConfig) -> None:
    """The preference files, and that each SEGA iteration finds its prompts among the training pairs'."""
    from alignflow.flows.gem import genies_dir
    from alignflow.genies.data import capped
    from alignflow.tasks.preferences import preference_set, read_preferences
    from alignflow.tasks.sega_prompts import SegaPrompts, iteration_prompt_ids

    def read(sources: dict[str, str]) -> list[list[dict]]:
        preferences = preference_set(sources, genies_dir(config), config.columns)
        return [read_preferences(spec, preferences.columns) for spec in preferences.sources.values()]

    read(config.eval)  # a bad row fails here, naming its file and line
    prompts = [
        p["prompt"]
        for pairs in read(config.train)
        for p in capped(pairs, config.max_train_pairs, config.seed, id_field="id")
    ]
    iteration_prompt_ids(prompts, SegaPrompts(iteration=0, count=config.sega.prompts_per_iteration))


def check_genies(config: GeniesConfig) -> None:
    """The shift spec, the interventions, and every split file the shifts read."""
    from alignflow.flows.genies_eval import data_dir
    from alignflow.genies.data import distribution_dir, distribution_names, read_split
    from alignflow.genies.shifts import check_distributions, distributions_needed, load_shifts
    from alignflow.genies.stages import intervention_specs

    root = data_dir(config)
    shifts = load_shifts(config.shifts)[: config.limit_shifts]
    check_distributions(shifts, distribution_names(root))
    intervention_specs(config)
    needed = distributions_needed(shifts)
    for split, role in (("train", "train"), ("test", "evaluate")):
        for name in sorted(needed[role]):
            read_split(distribution_dir(root, name), split)


def check_pipeline(config: PipelineConfig) -> None:
    check_self_improve(config.training)
    check_genies(config.genies)


CHECKS: dict[str, Callable] = {
    "self-improve": check_self_improve,
    "gem": check_gem,
    "genies-eval": check_genies,
    "pipeline": check_pipeline,
    "refeval-eval": check_refeval_eval,
}


def preflight(flow: str, config: RunConfig | PipelineConfig) -> None:
    """Raise the one-line error of the first bad input of ``flow`` run with ``config``."""
    CHECKS[flow](config)
