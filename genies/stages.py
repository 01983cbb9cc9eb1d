"""The GENIES stages: load a distribution split into pairs, train an
intervention on a source, evaluate a trained state on a distribution.

Each is a cached, retryable Prefect task like every other stage; the artifact
key covers the data file's hash, the intervention's config and code, and (for
external scripts) the scripts' own source.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field

from alignflow.config import GeniesConfig, GeniesScoringConfig, Strict
from alignflow.genies.data import GeniesDataError, capped, expand_pairs, one_pair_per_prompt, read_split
from alignflow.genies.interventions import BUILTIN, make_intervention
from alignflow.genies.metrics import pair_metrics
from alignflow.genies.scoring import too_long
from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.stage import Progress, RunContext, Stage, StageOutput, stage_task


# -- pairs ---------------------------------------------------------------------
class PairsSpec(Strict):
    distribution: str
    split: str
    # where this machine keeps the file: out of the key and the manifest, which the content names
    path: str = Field(exclude=True)
    sha256: str  # the split file's content: an edited release is a new input
    max_tokens: int  # records with a longer prompt + response are dropped, as GENIES drops them
    max_pairs: int | None
    seed: int


def pairs_spec(
    data_dir: Path, distribution: str, split: str, max_tokens: int, max_pairs: int | None, seed: int
) -> PairsSpec:
    path = Path(data_dir) / "distributions" / distribution / f"{split}.json"
    return PairsSpec(
        distribution=distribution,
        split=split,
        path=str(path),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        max_tokens=max_tokens,
        max_pairs=max_pairs,
        seed=seed,
    )


def compute_pairs(ctx: RunContext, spec: PairsSpec, key: str, model: ArtifactRef) -> StageOutput:
    from transformers import AutoTokenizer

    records = read_split(Path(spec.path).parent, spec.split)
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir(model))
    dropped = {i for i, record in enumerate(records) if too_long(tokenizer, record, spec.max_tokens)}
    if len(dropped) == len(records):
        raise GeniesDataError(
            f"{spec.path}: every record is longer than scoring.max_tokens={spec.max_tokens} tokens; raise it"
        )
    pairs = [p for p in expand_pairs(records, spec.seed, spec.distribution, spec.split) if p["record"] not in dropped]
    pairs = capped(pairs, spec.max_pairs, spec.seed)
    share_a = sum(p["preferred"] == 0 for p in pairs) / len(pairs)
    return StageOutput(
        tables=[pa.Table.from_pylist(pairs)],
        metrics={
            "records": len(records),
            "records_too_long": len(dropped),
            "rows_out": len(pairs),
            "preferred_in_a": round(share_a, 3),
        },
    )


# -- interventions -------------------------------------------------------------
class InterventionSpec(Strict):
    """Everything that decides an intervention's numbers (for a script folder: every file in it)."""

    name: str
    params: dict = {}
    scoring: GeniesScoringConfig = GeniesScoringConfig()
    script_dir: str | None = Field(None, exclude=True)  # a local folder; its files are in script_sha256
    script_sha256: str | None = None
    contract: Literal["api", "readme"] = "api"  # a script's command-line flags
    seed: int = 0  # which dispreferred response trains with each prompt


def intervention_specs(config: GeniesConfig) -> list[InterventionSpec]:
    """zero_shot always runs (it is the baseline), then the configured ones in order."""
    bad_names = [n for n in [*config.interventions, *config.external] if "__" in n or "/" in n]
    if bad_names:
        raise ValueError(f"interventions: names may not contain '__' or '/': {bad_names}")
    unknown = [n for n in config.interventions if n not in BUILTIN and n not in config.external]
    if unknown:
        raise ValueError(
            f"interventions: unknown {unknown}; built in: {', '.join(BUILTIN)}; "
            f"external (from 'external'): {', '.join(config.external) or 'none'}"
        )
    specs = []
    for name in dict.fromkeys(["zero_shot", *config.interventions]):
        if name in config.external:
            folder = Path(config.external[name]).expanduser().resolve()
            specs.append(
                InterventionSpec(
                    name=name,
                    scoring=config.scoring,
                    script_dir=str(folder),
                    script_sha256=_scripts_hash(folder),
                    contract=config.script_contract,
                    seed=config.seed,
                )
            )
        else:
            params = config.section_params(name)
            specs.append(InterventionSpec(name=name, params=params, scoring=config.scoring, seed=config.seed))
    return specs


def _scripts_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def compute_train(
    ctx: RunContext,
    spec: InterventionSpec,
    key: str,
    model: ArtifactRef,
    pairs: ArtifactRef,
    test_pairs: ArtifactRef | None = None,
):
    """``test_pairs``: the source's test pairs, for a script's test.json (its own evaluation while training)."""
    intervention = make_intervention(spec, checkpoints=(ctx, key))
    rows = ctx.store().read_rows(pairs)
    if spec.script_dir:  # a script gets every response of its records and picks as it likes
        extra = {"test_pairs": ctx.store().read_rows(test_pairs)} if test_pairs else {}
    else:
        rows, extra = one_pair_per_prompt(rows, spec.seed), {}
    out = Path(tempfile.mkdtemp(prefix="alignflow-genies-train-"))
    (out / "state").mkdir()
    metrics = intervention.train(ctx.model_dir(model), rows, out / "state", None, **extra)
    metrics = {"train_pairs": len(rows), **metrics}
    # one row per metric: each intervention reports its own ones
    table = pa.Table.from_pylist([{"metric": name, "value": float(value)} for name, value in metrics.items()])
    return StageOutput(tables=[table], dirs={"state": out / "state"}, metrics=metrics, scratch=out)


def compute_evaluate(
    ctx: RunContext,
    spec: InterventionSpec,
    key: str,
    model: ArtifactRef,
    pairs: ArtifactRef,
    state: ArtifactRef | None = None,
):
    rows = ctx.store().read_rows(pairs)
    intervention = make_intervention(spec, checkpoints=(ctx, key))
    state_dir = ctx.store().local_dir(state, "state", Path(ctx.model_cache) / "artifacts") if state else None
    progress = Progress(f"evaluate {spec.name}", len(rows), unit="pairs")
    scores = intervention.evaluate(ctx.model_dir(model), state_dir, rows, progress)
    progress.close()
    table, metrics = score_table(rows, scores)
    return StageOutput(tables=[table], metrics={**metrics, **scores.extra})


def score_table(rows: list[dict], scores) -> tuple[pa.Table, dict]:
    """Per-pair P(preferred); an accuracy-only result has none (nulls)."""
    if scores.p_a is None:
        table = pa.Table.from_pylist(
            [{"pair_id": r["pair_id"], "preferred": r["preferred"], "p_a": None, "p_preferred": None} for r in rows]
        )
        return table, {"accuracy": scores.accuracy, "pairs": len(rows)}
    p_preferred = [p if r["preferred"] == 0 else 1.0 - p for r, p in zip(rows, scores.p_a)]
    table = pa.Table.from_pylist(
        [
            {"pair_id": r["pair_id"], "preferred": r["preferred"], "p_a": p, "p_preferred": q}
            for r, p, q in zip(rows, scores.p_a, p_preferred)
        ]
    )
    return table, pair_metrics(p_preferred)


def intervention_modules(spec: InterventionSpec) -> tuple[str, ...]:
    """The module of the intervention a spec names: the train and evaluate keys cover its
    import graph, not every intervention's (the registry is not followed, see code_graph.py)."""
    return (type(make_intervention(spec)).__module__,)


GENIES_PAIR_ROWS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("record", pa.int64()),
        ("prompt", pa.string()),
        ("response_a", pa.string()),
        ("response_b", pa.string()),
        ("preferred", pa.int64()),
    ]
)
TRAIN_METRIC_ROWS = pa.schema([("metric", pa.string()), ("value", pa.float64())])
EVALUATION_ROWS = pa.schema(
    [("pair_id", pa.string()), ("preferred", pa.int64()), ("p_a", pa.float64()), ("p_preferred", pa.float64())]
)
GENIES_PAIRS = Stage("genies_pairs", compute_pairs, __name__, schema=GENIES_PAIR_ROWS)
GENIES_TRAIN = Stage(
    "genies_train", compute_train, __name__, config_modules=intervention_modules, schema=TRAIN_METRIC_ROWS
)
GENIES_EVALUATE = Stage(
    "genies_evaluate", compute_evaluate, __name__, config_modules=intervention_modules, schema=EVALUATION_ROWS
)
genies_pairs_task = stage_task(GENIES_PAIRS)
genies_train_task = stage_task(GENIES_TRAIN)
genies_evaluate_task = stage_task(GENIES_EVALUATE)
