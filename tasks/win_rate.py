"""Win rate of a trained policy against the initial model from pairwise verdicts judged in both orders.

Each instruction has two verdicts, both as p(policy better): with the policy shown as
Output (a), and shown as Output (b). An order *decides* when its verdict is more than
``tie_margin`` away from 0.5. The instruction's verdict is 1 (win) when both orders pick
the policy, 0 (loss) when both pick the initial model, and 0.5 (tie) otherwise: when the
orders disagree, when either is undecided, or when an order was not judged (the two
outputs are the same text, or the judge dropped the comparison). A judge that always
prefers one position therefore scores ties, not wins. Lengths are counted in characters,
as AlpacaEval does (tokenizer-independent).

``mean_preference`` keeps what such a judge still says: the mean over instructions judged
in both orders of (p(policy better) as (a) + p(policy better) as (b)) / 2, in which a
constant pull toward one position cancels; 0.5 is no preference.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from alignflow.config import WinRateConfig
from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.alpaca_eval import alpaca_eval_records, write_alpaca_eval
from alignflow.tasks.logistic import fit_logistic
from alignflow.tasks.matchups import INITIAL, POLICY
from alignflow.tasks.stage import RunContext, Stage, StageOutput, stage_task


@dataclass(frozen=True)
class Matchup:
    """One instruction: its two verdicts (None: that order was not judged) and the output lengths."""

    prompt_id: str
    policy_first: float | None  # p(policy better), policy shown as Output (a)
    policy_second: float | None  # p(policy better), policy shown as Output (b)
    policy_chars: int
    initial_chars: int


def order_pick(p_policy: float | None, tie_margin: float) -> int | None:
    """1: this order picks the policy, 0: the initial model, None: undecided."""
    if p_policy is None or abs(p_policy - 0.5) <= tie_margin:
        return None
    return 1 if p_policy > 0.5 else 0


def orders_agree(m: Matchup, tie_margin: float) -> bool:
    """Both orders decide, for the same side."""
    first = order_pick(m.policy_first, tie_margin)
    return first is not None and first == order_pick(m.policy_second, tie_margin)


def instruction_verdict(m: Matchup, tie_margin: float) -> float:
    """1 win, 0 loss, 0.5 tie (the orders disagree or do not both decide)."""
    return float(m.policy_first > 0.5) if orders_agree(m, tie_margin) else 0.5


def bootstrap_ci(verdicts: np.ndarray, resamples: int, seed: int, confidence: float) -> tuple[float, float]:
    """Percentile interval of the mean verdict over instructions resampled with replacement."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(verdicts), size=(resamples, len(verdicts)))
    means = verdicts[picks].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def fit_intercept_and_slope(x: np.ndarray, y: np.ndarray, slope_l2: float) -> tuple[float, float]:
    """(intercept, slope) of p(y=1) = sigmoid(b0 + b1 x); ``y`` may be soft (a tie is 0.5). The
    slope carries a small L2 penalty so that verdicts the length separates perfectly still give
    a finite fit; the intercept is free."""
    design = torch.tensor(np.stack([np.ones_like(x), x], axis=1))
    b0, b1 = fit_logistic(design, torch.tensor(y), torch.tensor([0.0, slope_l2])).tolist()
    return b0, b1


def length_controlled_win_rate(verdicts: np.ndarray, length_diff: np.ndarray, slope_l2: float = 1e-3) -> float:
    """AlpacaEval 2 style: regress the verdict on tanh(length difference / its std), with an
    intercept, and report the predicted win probability at zero length difference."""
    mean = float(verdicts.mean())
    if mean in (0.0, 1.0):  # all wins or all losses: the intercept has no finite optimum
        return mean
    scale = float(length_diff.std())
    x = np.tanh(length_diff / scale) if scale > 0 else np.zeros_like(length_diff, dtype=float)
    intercept, _ = fit_intercept_and_slope(x.astype(float), verdicts, slope_l2)
    return 1 / (1 + math.exp(-intercept))


def win_rate_metrics(
    matchups: list[Matchup], tie_margin: float = 0.0, resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict:
    """The headline numbers of a policy-vs-initial evaluation (see the module docstring)."""
    if not matchups:
        raise ValueError("win rate: no instructions to score")
    verdicts = np.array([instruction_verdict(m, tie_margin) for m in matchups])
    judged = [m for m in matchups if m.policy_first is not None and m.policy_second is not None]
    low, high = bootstrap_ci(verdicts, resamples, seed, confidence)
    preferences = np.array([(m.policy_first + m.policy_second) / 2 for m in judged])
    preference_ci = bootstrap_ci(preferences, resamples, seed, confidence) if judged else (None, None)
    policy_chars = np.array([m.policy_chars for m in matchups], dtype=float)
    initial_chars = np.array([m.initial_chars for m in matchups], dtype=float)
    return {
        "instructions": len(matchups),
        "win_rate": float(verdicts.mean()),
        "win_rate_ci_low": low,
        "win_rate_ci_high": high,
        "confidence": confidence,
        "wins": int((verdicts == 1).sum()),
        "losses": int((verdicts == 0).sum()),
        "ties": int((verdicts == 0.5).sum()),
        "not_judged": len(matchups) - len(judged),
        # over instructions judged in both orders: identical answers say nothing about position bias
        "position_consistency": sum(orders_agree(m, tie_margin) for m in judged) / len(judged) if judged else None,
        "mean_preference": float(preferences.mean()) if judged else None,
        "mean_preference_ci_low": preference_ci[0],
        "mean_preference_ci_high": preference_ci[1],
        "length_controlled_win_rate": length_controlled_win_rate(verdicts, policy_chars - initial_chars),
        "policy_mean_chars": float(policy_chars.mean()),
        "initial_mean_chars": float(initial_chars.mean()),
    }


# -- the win_rate stage: the matchups artifact and its judgments -> per-instruction verdicts ----------
def matchups_from(answers: list[dict], judgments: list[dict]) -> list[Matchup]:
    """One Matchup per instruction; an order the judge has no row for (identical answers are
    not compared; a comparison over budget may be dropped) is None."""
    verdict = {(j["prompt_id"], j["a"]): j["p_a"] for j in judgments}
    response = {(r["prompt_id"], r["candidate"]): r["response"] for r in answers}
    out = []
    for pid in dict.fromkeys(r["prompt_id"] for r in answers):
        second = verdict.get((pid, INITIAL))
        out.append(
            Matchup(
                prompt_id=pid,
                policy_first=verdict.get((pid, POLICY)),
                policy_second=None if second is None else 1.0 - second,
                policy_chars=len(response[(pid, POLICY)]),
                initial_chars=len(response[(pid, INITIAL)]),
            )
        )
    return out


def verdict_row(m: Matchup, tie_margin: float) -> dict:
    return {
        "prompt_id": m.prompt_id,
        "policy_first": m.policy_first,
        "policy_second": m.policy_second,
        "verdict": instruction_verdict(m, tie_margin),
        "orders_agree": orders_agree(m, tie_margin),
        "policy_chars": m.policy_chars,
        "initial_chars": m.initial_chars,
    }


def export_alpaca_eval(answers: list[dict], config: WinRateConfig, folder: Path) -> None:
    """policy.json and initial.json: each model's answers for the alpaca_eval tool."""
    for side, name, generator in (
        (POLICY, "policy.json", config.policy_generator),
        (INITIAL, "initial.json", config.initial_generator),
    ):
        rows = [r for r in answers if r["candidate"] == side]
        write_alpaca_eval(folder / name, alpaca_eval_records(rows, generator or name.removesuffix(".json")))


def compute_win_rate(
    ctx: RunContext, config: WinRateConfig, key: str, matchups: ArtifactRef, judgments: ArtifactRef
) -> StageOutput:
    store = ctx.store()
    answers = store.read_rows(matchups)
    scored = matchups_from(answers, store.read_rows(judgments))
    metrics = win_rate_metrics(scored, config.tie_margin, config.bootstrap_resamples, config.seed, config.confidence)
    folder = Path(tempfile.mkdtemp(prefix="alpaca-eval-"))
    export_alpaca_eval(answers, config, folder)
    rows = [verdict_row(m, config.tie_margin) for m in scored]
    return StageOutput(tables=[pa.Table.from_pylist(rows)], dirs={ALPACA_EVAL: folder}, metrics=metrics, scratch=folder)


ALPACA_EVAL = "alpaca_eval"  # the artifact's folder of AlpacaEval-format exports
VERDICT_ROWS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("policy_first", pa.float64()),  # p(policy better) shown as Output (a); null: not judged
        ("policy_second", pa.float64()),  # p(policy better) shown as Output (b); null: not judged
        ("verdict", pa.float64()),  # 1 win, 0 loss, 0.5 tie
        ("orders_agree", pa.bool_()),
        ("policy_chars", pa.int64()),
        ("initial_chars", pa.int64()),
    ]
)
WIN_RATE = Stage("win_rate", compute_win_rate, __name__, schema=VERDICT_ROWS)
win_rate_task = stage_task(WIN_RATE)
