"""refeval-eval: does the trained policy beat the model it started from?

held-out prompts -> sample (policy) + sample (initial model), one answer each -> matchups ->
judge, both orders, with references -> win_rate (win rate with a bootstrap CI, ties,
position consistency, mean lengths, length-controlled win rate; AlpacaEval exports).
"""

from __future__ import annotations

from prefect import flow

from alignflow.config import RefEvalEvalConfig, Strict
from alignflow.flows.report import artifact_link, headline_table, headlines, publish_markdown
from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.base_model import base_model_task
from alignflow.tasks.judge import judge_task
from alignflow.tasks.matchups import matchups_task
from alignflow.tasks.prompts import prompt_source, prompts_task
from alignflow.tasks.sample import sample_task
from alignflow.tasks.stage import RELEASE_HOOKS, RunContext, run_context
from alignflow.tasks.win_rate import ALPACA_EVAL, win_rate_task
from alignflow.workers.hardware import resolve_dtypes

ARTIFACT = "artifact:"


def trained_model_key(spec: str, root: str) -> str | None:
    """The artifact key (or unique prefix) a model spec names: ``artifact:KEY``, ``artifact:STAGE/KEY``
    or an artifact's URI under ``root``; None for a model directory or a built-in name."""
    if spec.startswith(ARTIFACT) or spec.startswith(root + "/"):
        return spec.removeprefix(ARTIFACT).rstrip("/").rsplit("/", 1)[-1]
    return None


def model_ref(ctx: RunContext, spec: str) -> ArtifactRef:
    """A trained model artifact of this run's store, or a base model (directory or built-in name)."""
    store = ctx.store()
    key = trained_model_key(spec, store.root)
    return store.find(key) if key else base_model_task(spec, ctx.model_cache)


def policy_spec(config: RefEvalEvalConfig) -> str:
    if not config.policy:
        raise ValueError("policy: name the trained policy (artifact:KEY of a train_dpo artifact, or a model directory)")
    return config.policy


def judge_ref(ctx: RunContext, spec: str | None, policy: ArtifactRef, initial: ArtifactRef) -> ArtifactRef:
    """judge.model: ``initial`` (the default), ``policy``, or any model ``model_ref`` takes."""
    if spec in (None, "initial"):
        return initial
    return policy if spec == "policy" else model_ref(ctx, spec)


def generator_name(spec: str) -> str:
    """How the AlpacaEval export names a model by default: the end of its spec."""
    return spec.rstrip("/").rsplit("/", 1)[-1]


def run_eval(config: RefEvalEvalConfig) -> dict[str, ArtifactRef]:
    """Every stage's artifact, by stage."""
    ctx = run_context(config)
    spec = policy_spec(config)
    prompts = prompts_task(ctx, prompt_source(config.prompts, config.limit_prompts))
    initial = model_ref(ctx, config.model)  # a trained artifact too: RefEval's policy against a judge.mode=base one
    policy = model_ref(ctx, spec)
    judge_model = judge_ref(ctx, config.judge.model, policy, initial)
    policy_answers = sample_task(ctx, config.sample, policy=policy, prompts=prompts)
    initial_answers = sample_task(ctx, config.sample, policy=initial, prompts=prompts)
    matchups = matchups_task(
        ctx, Strict(), prompts=prompts, policy_answers=policy_answers, initial_answers=initial_answers
    )
    judgments = judge_task(ctx, config.judge, judge_model=judge_model, candidates=matchups)
    scoring = config.win_rate.model_copy(
        update={
            "policy_generator": config.win_rate.policy_generator or generator_name(spec),
            "initial_generator": config.win_rate.initial_generator or generator_name(config.model),
        }
    )
    result = win_rate_task(ctx, scoring, matchups=matchups, judgments=judgments)
    return {
        "prompts": prompts,
        "policy_answers": policy_answers,
        "initial_answers": initial_answers,
        "matchups": matchups,
        "judge": judgments,
        "win_rate": result,
    }


def refeval_eval_summary(ctx: RunContext, config: RefEvalEvalConfig, refs: dict[str, ArtifactRef]) -> dict:
    store = ctx.store()
    result = refs["win_rate"]
    manifest = store.manifest(result.stage, result.key)
    scoring = manifest["config"]
    folder = store.uri(result.stage, result.key, manifest["dirs"][ALPACA_EVAL])
    return {
        "policy": scoring["policy_generator"],
        "initial": scoring["initial_generator"],
        "judge": config.judge.model or "initial",
        "mode": config.judge.mode,
        "win_rate": {"uri": result.uri, **manifest["metrics"]},
        "alpaca_eval": {side: f"{folder}/{side}.json" for side in ("policy", "initial")},
        "answers": store.manifest(refs["matchups"].stage, refs["matchups"].key)["metrics"],
        "stages": headlines(
            store, {name: refs[name] for name in ("prompts", "policy_answers", "initial_answers", "judge")}
        ),
    }


def preference_line(m: dict) -> str:
    if m.get("mean_preference") is None:
        return "Mean preference: n/a (no instruction judged in both orders)."
    return (
        f"Mean preference for the policy, both orders averaged (a pull toward one position cancels; 0.5: none): "
        f"{m['mean_preference']:.4f} [{m['mean_preference_ci_low']:.4f}, {m['mean_preference_ci_high']:.4f}]."
    )


def refeval_eval_markdown(summary: dict) -> str:
    m, answers = summary["win_rate"], summary["answers"]
    consistency = "n/a" if m["position_consistency"] is None else f"{m['position_consistency']:.3f}"
    lines = [
        "# refeval-eval summary",
        "",
        f"policy `{summary['policy']}` vs initial `{summary['initial']}` on {m['instructions']} held-out "
        f"instructions, judged by `{summary['judge']}` (mode {summary['mode']}) in both orders.",
        "",
        f"| win rate | {m['confidence']:.0%} CI | length-controlled | wins / ties / losses | position consistency "
        "| mean chars (policy / initial) |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {m['win_rate']:.3f} | [{m['win_rate_ci_low']:.3f}, {m['win_rate_ci_high']:.3f}] "
        f"| {m['length_controlled_win_rate']:.3f} | {m['wins']} / {m['ties']} / {m['losses']} | {consistency} "
        f"| {m['policy_mean_chars']:.0f} / {m['initial_mean_chars']:.0f} |",
        "",
        preference_line(m),
        "",
        "A tie is an instruction whose two orders do not both pick the same side; "
        f"{m['not_judged']} had identical answers or were not judged. Answers cut off at sample.max_new_tokens: "
        f"policy {answers['policy_unfinished']}, initial {answers['initial_unfinished']}.",
        "",
        f"verdicts: {artifact_link(m['uri'])}; AlpacaEval outputs: "
        + ", ".join(artifact_link(uri, side) for side, uri in summary["alpaca_eval"].items()),
        "",
        "## stages",
        "",
        *headline_table(summary["stages"]),
    ]
    return "\n".join(lines) + "\n"


@flow(name="refeval-eval", **RELEASE_HOOKS)
def refeval_eval(config: RefEvalEvalConfig = RefEvalEvalConfig()) -> dict:
    config = resolve_dtypes(config)  # stage keys and manifests carry the dtype actually used
    summary = refeval_eval_summary(run_context(config), config, run_eval(config))
    publish_markdown("refeval-eval-summary", refeval_eval_markdown(summary), "refeval-eval: win rate of the policy")
    return summary
