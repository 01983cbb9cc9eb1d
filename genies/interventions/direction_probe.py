"""What upstream GENIES' mms, lat_stim_1 and lat_stim_2 share: a mass-mean direction per
activation "unit", units ranked by logistic probes, a cosine score, a logistic calibrator.

A unit's activation is read at the last token of [BOS] prompt + response, without EOS, as
upstream (its default tokenizer call adds BOS where the tokenizer has one). mms has one unit
per attention head (its slice of the o_proj input), lat_stim_1/2 one per layer (the residual
stream entering the block). Units are numbered site-major, as upstream: unit = layer * parts
+ part. Training on pairs (preferred, dispreferred):

1. Split the pairs at random: int(n (1 - val_fraction)) fit the probes, the rest validate.
2. Per unit, d_u = mean a_u(preferred) - mean a_u(dispreferred) over all pairs (fit + val).
3. Per unit, a logistic probe (L2 penalty 1/2 |w|^2, unpenalised intercept: scikit-learn's
   default LogisticRegression) on the fit pairs' responses, labelled 1 preferred, 0 not.
   Its accuracy on the validation responses ranks the units; the top k are kept.
4. s(x -> y) = 1/2 (1 + mean over kept units of cos(a_u(y) - a_u(x), d_u)).
5. Calibrator P = sigmoid(w s + c), fitted on the validation pairs taken in order and
   alternately: s(dispreferred -> preferred) labelled 1, then s(preferred -> dispreferred)
   labelled 0, so both classes are present whatever the positions.

Evaluation: P(B preferred) = sigmoid(w s(A -> B) + c); B plays upstream's second response.

Departures from upstream, and why:
- Logistic fits are Newton's method in torch (tasks/logistic.py): scikit-learn is not a
  dependency. The probes solve scikit-learn's objective to convergence (lbfgs stops at tol 1e-4).
- The calibrator has an L2 penalty of 1e-6 on w and c; upstream's has none, and on a
  separable validation set (likely with few pairs) its optimum is at infinity.
- The split is drawn with torch's generator, so a seed gives other pairs than numpy's.
- Upstream shuffles the two responses of each test pair; here the pairs stage has already
  drawn each pair's A/B positions, so the order is used as given.
- Prompt, (stimulus,) response are tokenized each on its own, as genies/scoring.py does for
  every intervention (upstream tokenizes the joined string); activations are read in
  ``scoring.dtype`` (upstream bfloat16).
- Ties in validation accuracy go to the later unit: what upstream's reversed argsort does
  when the sort is stable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field

from alignflow.config import GeniesScoringConfig, Strict
from alignflow.genies.interventions.base import BuiltinIntervention, Scores
from alignflow.genies.interventions.mass_mean import pair_differences, pair_score
from alignflow.genies.scoring import encode_pairs, per_pair_progress, text_ids
from alignflow.tasks.logistic import fit_logistic
from alignflow.workers.models import load_backbone
from alignflow.workers.scoring import map_batches

PROBE_L2 = 1.0  # scikit-learn's default C = 1
CALIBRATION_L2 = 1e-6  # only keeps a separable validation set's fit finite


class DirectionProbeConfig(Strict):
    val_fraction: float = Field(0.3, gt=0.0, lt=1.0, description="training pairs that rank units and calibrate")
    seed: int = Field(42, description="the random split of the training pairs")


# -- activations ---------------------------------------------------------------
def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder blocks of a Llama-like backbone (what load_backbone returns)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no .layers: a Llama-like decoder backbone is needed")
    return list(layers)


def last_token_inputs(model, modules: list[torch.nn.Module], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The input of each module at each row's last real token (rows are right-padded):
    rows x modules x width, float32. Read with forward pre-hooks during one forward pass."""
    device = next(model.parameters()).device
    mask = batch["attention_mask"].to(device)
    last = mask.sum(dim=1) - 1
    rows = torch.arange(len(last), device=device)
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        value = args[0] if args else kwargs["hidden_states"]  # decoder blocks may get it by keyword
        seen.append(value[rows, last].float().cpu())

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
    try:
        model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    if len(seen) != len(modules):
        raise RuntimeError(f"expected one input per module ({len(modules)}), read {len(seen)}")
    return torch.stack(seen, dim=1)


def leading_special_ids(tokenizer) -> list[int]:
    """The ids a tokenizer puts before a text by default (BOS for Llama's; none for SmolLM2's)."""
    marked = tokenizer("x")["input_ids"]
    plain = text_ids(tokenizer, "x")
    return list(marked[: len(marked) - len(plain)]) if marked[len(marked) - len(plain) :] == plain else []


def stimulus_sequences(tokenizer, pairs: list[dict], max_tokens: int, prefix: str = "", suffix: str = ""):
    """(prompts, responses, pair index) of [BOS] prompt + prefix + response + suffix, without EOS.
    Each text is tokenized on its own; ``max_tokens`` bounds prompt + response + EOS, as the
    pairs stage filtered them, and the stimulus comes on top. The last token is split off as
    the "response": pack() wants both parts non-empty."""
    bos = leading_special_ids(tokenizer)
    seqs = encode_pairs(tokenizer, pairs, max_tokens, lambda pair: bos)
    before, after = text_ids(tokenizer, prefix), text_ids(tokenizer, suffix)
    full = [p + before + r[:-1] + after for p, r in zip(seqs.prompts, seqs.responses)]  # r ends with EOS
    return [f[:-1] for f in full], [f[-1:] for f in full], seqs.pair_index


@torch.inference_mode()
def unit_activations(
    model, tokenizer, pairs, scoring: GeniesScoringConfig, sites, parts: int, prefix="", suffix="", progress=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences x units x width activations, pairs x 2 sequence indices of A and B).
    Each site's input splits into ``parts`` equal units (heads); unit = site * parts + part."""
    prompts, responses, index = stimulus_sequences(tokenizer, pairs, scoring.max_tokens, prefix, suffix)
    progress = per_pair_progress(progress, len(prompts), len(pairs))
    rows = map_batches(
        lambda batch: last_token_inputs(model, sites, batch),
        prompts,
        responses,
        tokenizer.pad_token_id,
        scoring.token_budget,
        progress,
    )
    return torch.stack(rows).unflatten(-1, (parts, -1)).flatten(1, 2), torch.tensor(index)


# -- fitting -------------------------------------------------------------------
def preferred_rows(index: torch.Tensor, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, the sequence index of the preferred and of the dispreferred response."""
    chosen = torch.tensor([p["preferred"] for p in pairs])
    rows = torch.arange(len(pairs))
    return index[rows, chosen], index[rows, 1 - chosen]


def split_pairs(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, validation) pair indices, each ascending: int(n (1 - val_fraction)) fit, as upstream,
    but at least one pair on each side."""
    if n < 2:
        raise ValueError(f"{n} training pair(s): the probes need at least one pair to fit and one to validate")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_fit = min(max(int(n * (1 - val_fraction)), 1), n - 1)
    return order[:n_fit].sort().values, order[n_fit:].sort().values


def mass_mean_directions(preferred: torch.Tensor, dispreferred: torch.Tensor) -> torch.Tensor:
    """Per unit, mean activation of the preferred responses minus that of the dispreferred: units x width."""
    return preferred.mean(dim=0) - dispreferred.mean(dim=0)


def fit_probes(preferred: torch.Tensor, dispreferred: torch.Tensor) -> torch.Tensor:
    """Per unit, a logistic probe telling preferred (1) from dispreferred (0) responses, with an
    L2 penalty PROBE_L2 / 2 |w|^2 and an unpenalised intercept: units x (width + 1), the
    intercept last. Inputs: responses x units x width."""
    x, y = _labelled(preferred, dispreferred)
    penalty = torch.full((x.shape[-1] + 1,), PROBE_L2)
    penalty[-1] = 0.0
    return torch.stack([fit_logistic(unit, y, penalty) for unit in _with_intercept(x)])


def probe_accuracies(probes: torch.Tensor, preferred: torch.Tensor, dispreferred: torch.Tensor) -> torch.Tensor:
    """Per unit, the share of responses its probe labels right; it says 1 where x . w + c > 0."""
    x, y = _labelled(preferred, dispreferred)
    predicted = (_with_intercept(x).double() @ probes.unsqueeze(-1)).squeeze(-1) > 0
    return (predicted == y.bool()).double().mean(dim=1)


def _with_intercept(x: torch.Tensor) -> torch.Tensor:
    """responses x units x width -> units x responses x (width + 1), the last column ones."""
    x = x.transpose(0, 1)
    return torch.cat([x, torch.ones(*x.shape[:-1], 1)], dim=-1)


def _labelled(preferred: torch.Tensor, dispreferred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([preferred, dispreferred]), torch.cat([torch.ones(len(preferred)), torch.zeros(len(dispreferred))])


def top_units(accuracy: torch.Tensor, k: int) -> list[int]:
    """The k most accurate units; among equals the later unit first (upstream's reversed argsort)."""
    return accuracy.argsort(stable=True).flip(0)[:k].tolist()


def calibration_set(to_preferred: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, labels) of the validation pairs in order: even ones scored towards the
    preferred response (label 1), odd ones towards the dispreferred (label 0).
    ``to_preferred``: a(preferred) - a(dispreferred), pairs x kept units x width."""
    signs = torch.where(torch.arange(len(to_preferred)) % 2 == 0, 1.0, -1.0)
    return pair_score(to_preferred * signs[:, None, None], directions), (signs > 0).float()


def fit_calibrator(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(w, c) of P(label 1) = sigmoid(w s + c), both with the small penalty CALIBRATION_L2."""
    x = torch.stack([scores, torch.ones_like(scores)], dim=1)
    return fit_logistic(x, labels, torch.full((2,), CALIBRATION_L2))


def unit_name(unit: int, parts: int) -> int | list[int]:
    """A layer, or [layer, head] where a layer's input splits into heads."""
    return list(divmod(unit, parts)) if parts > 1 else unit


def prob_b(scores: torch.Tensor, weight: float, bias: float) -> torch.Tensor:
    """P(B preferred) from s(A -> B) through the calibrator."""
    return torch.sigmoid(weight * scores.double() + bias)


# -- the intervention ----------------------------------------------------------
class DirectionProbe(BuiltinIntervention):
    """The shared train/evaluate; a subclass says where units are read and how many are kept."""

    trains = True
    config: DirectionProbeConfig
    prefix = ""  # text around each response (lat_stim_2's stimulus)
    suffix = ""

    def sites(self, model) -> tuple[list[torch.nn.Module], int]:
        """The modules whose input is read, and into how many units each input splits."""
        raise NotImplementedError

    def keep(self) -> int:
        """How many units are kept."""
        raise NotImplementedError

    def activations(self, model, tokenizer, pairs, progress=None) -> tuple[torch.Tensor, torch.Tensor, int]:
        sites, parts = self.sites(model)
        acts, index = unit_activations(
            model, tokenizer, pairs, self.scoring, sites, parts, self.prefix, self.suffix, progress
        )
        return acts, index, parts

    def train(self, base: Path, pairs: list[dict], out: Path, progress=None) -> dict:
        model, tokenizer = load_backbone(base, self.scoring.dtype)
        acts, index, parts = self.activations(model, tokenizer, pairs, progress)
        preferred, dispreferred = preferred_rows(index, pairs)
        fit, val = split_pairs(len(pairs), self.config.val_fraction, self.config.seed)
        directions = mass_mean_directions(acts[preferred], acts[dispreferred])
        probes = fit_probes(acts[preferred[fit]], acts[dispreferred[fit]])
        accuracy = probe_accuracies(probes, acts[preferred[val]], acts[dispreferred[val]])
        units = top_units(accuracy, self.keep())
        to_preferred = acts[preferred[val]][:, units] - acts[dispreferred[val]][:, units]
        scores, labels = calibration_set(to_preferred, directions[units])
        weight, bias = fit_calibrator(scores, labels).tolist()
        torch.save({"units": units, "directions": directions[units]}, out / "directions.pt")
        probe = {
            "kept": [unit_name(u, parts) for u in units],
            "units": units,
            "unit_accuracy": accuracy.tolist(),
            "weight": weight,
            "bias": bias,
            "fit_pairs": len(fit),
            "val_pairs": len(val),
        }
        (out / "probe.json").write_text(json.dumps(probe, indent=1))
        return {"val_accuracy_best_unit": float(accuracy.max()), "units": len(units), "val_pairs": len(val)}

    def evaluate(self, base: Path, state: Path | None, pairs: list[dict], progress=None) -> Scores:
        probe = json.loads((state / "probe.json").read_text())
        saved = torch.load(state / "directions.pt")
        model, tokenizer = load_backbone(base, self.scoring.dtype)
        acts, index, _ = self.activations(model, tokenizer, pairs, progress)
        scores = pair_score(pair_differences(acts[:, saved["units"]], index), saved["directions"])
        p_b = prob_b(scores, probe["weight"], probe["bias"])
        return Scores(p_a=(1 - p_b).tolist(), extra={"mean_pair_score": float(scores.mean())})
