"""mass_mean_shift: this project's own per-layer mean-difference direction.

It is neither upstream's mms (one direction per attention head: mms.py) nor a copy
of upstream's per-layer lat_stim_1 (lat_stim_1.py), though it is the same idea as the latter.
Per layer, the direction is mean(activation of preferred) - mean(activation of
dispreferred), with activations taken at the last token of prompt+response+EOS
(block outputs 1..L, the last one normed). Layers are ranked by how often the sign of
cos(a(preferred) - a(dispreferred), d) is right on held-out training records and the top
k kept. A pair's score is s = 1/2 (1 + mean over kept layers of cos(a(B) - a(A), d));
P(B preferred) = sigmoid(w (s - 1/2)) with w fitted on the held-out pairs.

Where lat_stim_1 differs: no EOS, block inputs 0..L-1, directions from all training
pairs, layers ranked by logistic probes, a calibrator with an intercept, a random 30% split.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from alignflow.config import GeniesScoringConfig, Strict
from alignflow.genies.interventions.base import BuiltinIntervention, Scores, register
from alignflow.genies.scoring import encode_pairs, last_token_states, per_pair_progress
from alignflow.tasks.logistic import fit_logistic
from alignflow.workers.models import load_backbone
from alignflow.workers.scoring import map_batches


class MassMeanShiftConfig(Strict):
    top_layers: int = Field(16, ge=1, description="layers kept, ranked by held-out probe accuracy")
    held_out_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="training pairs that rank layers and calibrate")
    seed: int = 0


@torch.inference_mode()
def sequence_states(model, tokenizer, pairs: list[dict], scoring: GeniesScoringConfig, progress=None):
    """(rows x layers x hidden activations of every distinct sequence, per-pair indices)."""
    seqs = encode_pairs(tokenizer, pairs, scoring.max_tokens)
    progress = per_pair_progress(progress, len(seqs.prompts), len(pairs))
    states = map_batches(
        lambda batch: last_token_states(model, batch),
        seqs.prompts,
        seqs.responses,
        tokenizer.pad_token_id,
        scoring.token_budget,
        progress,
    )
    return torch.stack(states), torch.tensor(seqs.pair_index)


def pair_differences(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """a(B) - a(A) per pair: pairs x layers x hidden."""
    return states[index[:, 1]] - states[index[:, 0]]


def layer_cosines(diffs: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """cos(diff, direction) per pair and layer: pairs x layers."""
    return F.cosine_similarity(diffs, directions.unsqueeze(0), dim=-1)


def signed_to_preferred(pairs: list[dict]) -> torch.Tensor:
    """+1 where B is preferred, -1 where A is: turns a(B) - a(A) into a(pref) - a(dispref)."""
    return torch.tensor([1.0 if p["preferred"] == 1 else -1.0 for p in pairs])


def fit_slope(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2) -> float:
    """w of P(y=1) = sigmoid(w x): fit_logistic on the one column x, with a small L2 penalty
    (separable held-out sets would otherwise diverge). No intercept: with x the
    pair score centred at 1/2, swapping A and B flips x and the probability,
    so an intercept could only learn a position bias from a few held-out pairs."""
    return float(fit_logistic(x[:, None], y, torch.tensor([l2]))[0])


def held_out_mask(pairs: list[dict], fraction: float, seed: int) -> torch.Tensor:
    """Held out by record, so a record's pairs never straddle the split."""
    held = [zlib.crc32(f"{seed}:{p['prompt']}".encode()) % 10_000 < fraction * 10_000 for p in pairs]
    mask = torch.tensor(held)
    if mask.all() or not mask.any():  # too few records to split: rank and calibrate in-sample
        return torch.ones(len(pairs), dtype=torch.bool)
    return mask


@register("mass_mean_shift", MassMeanShiftConfig)
class MassMeanShift(BuiltinIntervention):
    trains = True
    config: MassMeanShiftConfig

    def train(self, base: Path, pairs: list[dict], out: Path, progress=None) -> dict:
        model, tokenizer = load_backbone(base, self.scoring.dtype)
        states, index = sequence_states(model, tokenizer, pairs, self.scoring, progress)
        to_preferred = pair_differences(states, index) * signed_to_preferred(pairs)[:, None, None]
        held = held_out_mask(pairs, self.config.held_out_fraction, self.config.seed)
        fit = ~held if (~held).any() else held
        directions = to_preferred[fit].mean(dim=0)  # layers x hidden
        accuracy = (layer_cosines(to_preferred[held], directions) > 0).float().mean(dim=0)
        layers = accuracy.argsort(descending=True, stable=True)[: self.config.top_layers]
        x = pair_score(pair_differences(states, index)[held][:, layers], directions[layers]) - 0.5
        y = torch.tensor([float(p["preferred"] == 1) for p, h in zip(pairs, held.tolist()) if h])
        weight = fit_slope(x, y)
        torch.save({"layers": layers, "directions": directions[layers]}, out / "directions.pt")
        state = {
            "layers": layers.tolist(),
            "layer_accuracy": [round(float(a), 4) for a in accuracy],
            "weight": weight,
            "fit_pairs": int(fit.sum()),
            "held_out_pairs": int(held.sum()),
        }
        (out / "probe.json").write_text(json.dumps(state, indent=1))
        return {"held_out_accuracy_best_layer": float(accuracy.max()), "layers": len(layers)}

    def evaluate(self, base: Path, state: Path | None, pairs: list[dict], progress=None) -> Scores:
        probe = json.loads((state / "probe.json").read_text())
        saved = torch.load(state / "directions.pt")
        model, tokenizer = load_backbone(base, self.scoring.dtype)
        states, index = sequence_states(model, tokenizer, pairs, self.scoring, progress)
        x = pair_score(pair_differences(states, index)[:, saved["layers"]], saved["directions"])
        p_b = torch.sigmoid(probe["weight"] * (x - 0.5))
        return Scores(p_a=(1 - p_b).tolist(), extra={"mean_pair_score": float(x.mean())})


def pair_score(diffs: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """1/2 (1 + mean over layers of cos(a(B) - a(A), direction)): above 1/2 favours B."""
    return 0.5 * (1 + layer_cosines(diffs, directions).mean(dim=1))
