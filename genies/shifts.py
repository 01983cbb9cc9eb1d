"""The shift registry: the 15 GENIES benchmark shifts, or any shift spec JSON
(a list of ``{source, target, target_reference?, label?, category?}``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from alignflow.genies.data import GeniesDataError, read_json


class Shift(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    source: str
    target: str
    target_reference: str | None = None
    label: str = ""
    category: str = ""

    @property
    def reference(self) -> str:
        """Where the ceiling is measured (default: the target)."""
        return self.target_reference or self.target

    @property
    def name(self) -> str:
        return f"{self.source}->{self.target}"


def _shift(source, target, category, label="extreme", reference=None) -> Shift:
    return Shift(source=source, target=target, target_reference=reference, label=label, category=category)


GENIES = (
    _shift("us_history_textbook", "us_history_fiction", "context"),
    _shift("alpaca_mmlu", "spanish_output", "encoding"),
    _shift("math", "change_my_view", "skill"),
    _shift("raven_matrices", "us_history", "skill"),
    _shift("code_easy", "code_hard", "difficulty"),
    _shift("alpaca_easy", "alpaca_hard", "difficulty"),
    _shift("alpaca_mmlu", "raven_matrices", "pretraining_similarity"),
    _shift("alpaca_mmlu", "ranking_logic", "pretraining_similarity"),
    _shift("alpaca_low_quality", "alpaca_high_quality", "quality"),
    _shift("alpaca_short", "alpaca_long", "spurious_cues", reference="alpaca_mmlu"),
    _shift("alpaca_mmlu", "wrong_arc", "spurious_cues", label="probing"),
    _shift("alpaca_mmlu", "truthful_qa", "unwanted_personas", label="probing"),
    _shift("alpaca_mmlu", "sycophancy_mimicry", "unwanted_personas", label="probing", reference="quote_attribution"),
    _shift("alpaca_mmlu", "survival_influence", "unwanted_personas", label="probing"),
    _shift("alpaca_mmlu", "reward_seeking", "unwanted_personas", label="probing"),
)
BUILTIN = {"builtin:genies": GENIES}


def load_shifts(spec: str, keep_repeats: bool = False) -> tuple[Shift, ...]:
    """``builtin:genies`` or a path to a shift spec JSON list; ``keep_repeats`` keeps a
    shift listed twice twice (as the published metrics tables do)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec)
    entries = read_json(path, f"shift spec not found (expected a JSON file or one of {list(BUILTIN)})")
    if not isinstance(entries, list) or not entries:
        raise GeniesDataError(f"{path}: expected a non-empty JSON list of shifts")
    shifts = []
    for index, entry in enumerate(entries):
        try:
            shifts.append(Shift.model_validate(entry))
        except ValidationError as e:
            fields = ", ".join(".".join(map(str, err["loc"])) or "entry" for err in e.errors())
            raise GeniesDataError(
                f"{path}: shift {index}: missing or invalid {fields} (each shift needs 'source' and 'target')"
            ) from None
    # the published all.json lists 13 shifts twice: its CSVs keep the repeats, runs need each once
    return tuple(shifts) if keep_repeats else tuple(dict.fromkeys(shifts))


def check_distributions(shifts: tuple[Shift, ...], available: list[str]) -> None:
    """Every distribution a shift names must exist in the release."""
    for shift in shifts:
        for role, name in (("source", shift.source), ("target", shift.target), ("target_reference", shift.reference)):
            if name not in available:
                raise GeniesDataError(
                    f"shift {shift.name}: {role} '{name}' is not a distribution; available: {', '.join(available)}"
                )


def distributions_needed(shifts: tuple[Shift, ...]) -> dict[str, set[str]]:
    """Per role, the distributions a benchmark run touches: trained on (sources
    and ceiling references) and evaluated on (targets, sources, references)."""
    train = {s.source for s in shifts} | {s.reference for s in shifts}
    evaluate = {s.target for s in shifts} | train
    return {"train": train, "evaluate": evaluate}
