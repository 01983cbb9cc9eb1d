"""ccs: Contrast-Consistent Search (Burns et al., 2022), an unsupervised linear probe.

Every prompt+response is followed by cra's "### " question asking whether the responder
followed the instruction successfully (``question``), answered Yes (x+) and answered No
(x-), then EOS; x is the last layer's hidden state at that EOS. Each side is centred on its
own mean over the set of responses (at evaluation, over the evaluated pairs, as upstream). A probe
p(x) = sigmoid(w . x + b) is trained without labels on
    L = mean(min(p(x+), p(x-))^2) + mean((p(x+) - (1 - p(x-)))^2)
(confidence + consistency), full batch, AdamW, from several random starts; the start
with the lowest final loss is kept. A response's credence is c = 1/2 (p(x+) + 1 - p(x-)).
The loss cannot tell true from false, so the probe is oriented once: negated if fewer
than half of the training responses are classified right by c > 1/2 (1 = preferred).
P(A preferred) = sigmoid(logit c(A) - logit c(B)), i.e. P(A good, B bad | exactly one is).

Departures from upstream (GENIES ``src/interventions/ccs``):
- the default question is our own wording, with the same intent as upstream's; setting
  ``question`` to upstream's Yes question (``eval.py``, without the answer) reproduces that
  text exactly (for No, see below);
- the orientation uses the training labels; upstream picks max(accuracy, 1 - accuracy) on
  the evaluation labels, which an evaluation here never sees;
- upstream scores each response alone (accuracy of c against its label); here the two
  responses of a pair are compared, which gives P(A preferred);
- every distinct training response is used once (upstream draws as many at random, with
  replacement) and the probe is trained in ``train`` (upstream trains it inside eval.py,
  again for every evaluated distribution);
- the No question is the Yes question with the other answer (upstream's No template lacks
  the space after "###"; the centring removes such a shared offset anyway);
- prompt, response and question + answer + EOS are tokenized each on its own, as for mms
  (direction_probe.stimulus_sequences; upstream tokenizes the joined text), and states are
  read in ``scoring.dtype`` (upstream: a 4-bit quantized model);
- ``max_pairs`` (100) caps pairs where upstream's ``max_examples`` (100) capped records, the
  same where the train stage keeps one pair per record.
Upstream's ``data/hf_dataset`` folder (200 Alpaca-format texts with labels) is read by no
current upstream code, only by stale bytecode of an earlier version; the method needs no
external data.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field

from alignflow.config import GeniesScoringConfig, Strict
from alignflow.genies.interventions.base import BuiltinIntervention, Scores, register
from alignflow.genies.interventions.cra import QUESTION, QUESTION_DESCRIPTION
from alignflow.genies.interventions.direction_probe import preferred_rows, stimulus_sequences
from alignflow.genies.scoring import last_token_states, per_pair_progress, probs_from_scores
from alignflow.workers.models import load_backbone
from alignflow.workers.scoring import map_batches


class CCSConfig(Strict):
    epochs: int = Field(1000, ge=1, description="full-batch AdamW steps per start")
    tries: int = Field(10, ge=1, description="random starts; the probe with the lowest final loss is kept")
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    max_pairs: int | None = Field(100, ge=1, description="train on the first this many pairs (None: all)")
    seed: int = 0
    question: str = Field(QUESTION, description=QUESTION_DESCRIPTION)


def centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=0, keepdim=True)


@torch.no_grad()  # not inference_mode: the probe's autograd takes these states as inputs
def contrast_pair(model, tokenizer, pairs: list[dict], scoring: GeniesScoringConfig, question: str, progress=None):
    """(centred x+ rows, centred x- rows, per-pair (A, B) row indices): the last layer's
    state at the EOS that ends each distinct prompt + response + question + answer."""
    both_passes = per_pair_progress(progress, 2 * len(pairs), len(pairs))
    sides = []
    for answer in ("Yes", "No"):
        # the EOS goes in as text, as upstream appends tokenizer.eos_token; it encodes to the EOS id
        prompts, responses, index = stimulus_sequences(
            tokenizer, pairs, scoring.max_tokens, suffix=question + answer + tokenizer.eos_token
        )
        states = map_batches(
            lambda batch: last_token_states(model, batch)[:, -1],
            prompts,
            responses,
            tokenizer.pad_token_id,
            scoring.token_budget,
            per_pair_progress(both_passes, len(prompts), len(pairs)),
        )
        sides.append(centred(torch.stack(states)))
    return sides[0], sides[1], torch.tensor(index)


def labelled_responses(index: torch.Tensor, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both responses of every pair: (sequence rows, labels 1 = preferred, 0 = not)."""
    preferred, dispreferred = preferred_rows(index, pairs)
    return torch.cat([preferred, dispreferred]), torch.cat([torch.ones(len(pairs)), torch.zeros(len(pairs))]).double()


def ccs_loss(p_yes: torch.Tensor, p_no: torch.Tensor) -> torch.Tensor:
    """Confidence (the smaller of the two near 0) + consistency (p(x+) = 1 - p(x-))."""
    return (torch.minimum(p_yes, p_no) ** 2).mean() + ((p_yes - (1 - p_no)) ** 2).mean()


def train_probe(yes: torch.Tensor, no: torch.Tensor, config: CCSConfig) -> tuple[torch.nn.Linear, float]:
    """One start: (probe, loss of its last step)."""
    probe = torch.nn.Linear(yes.shape[1], 1)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(config.epochs):
        loss = ccs_loss(torch.sigmoid(probe(yes)), torch.sigmoid(probe(no)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return probe, loss.item()


def best_probe(yes: torch.Tensor, no: torch.Tensor, config: CCSConfig) -> tuple[torch.nn.Linear, float]:
    torch.manual_seed(config.seed)
    return min((train_probe(yes, no, config) for _ in range(config.tries)), key=lambda fitted: fitted[1])


@torch.no_grad()
def credence(probe: torch.nn.Linear, yes: torch.Tensor, no: torch.Tensor) -> torch.Tensor:
    """c = 1/2 (p(x+) + 1 - p(x-)) per row, in float64 (its logit is taken)."""
    w, b = probe.weight.double().squeeze(0), probe.bias.double()
    return 0.5 * (torch.sigmoid(yes.double() @ w + b) + 1 - torch.sigmoid(no.double() @ w + b))


def response_accuracy(c: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the labelled rows that c > 1/2 classifies right (1 = preferred)."""
    return float(((c[rows] > 0.5).double() == labels).double().mean())


@torch.no_grad()
def orient(probe: torch.nn.Linear, yes: torch.Tensor, no: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor):
    """Negate the probe (so c becomes 1 - c) when c gets fewer than half of the labelled rows right;
    returns whether it did."""
    if response_accuracy(credence(probe, yes, no), rows, labels) >= 0.5:
        return False
    probe.weight.neg_()
    probe.bias.neg_()
    return True


def pair_probs(c: torch.Tensor, index: torch.Tensor) -> list[float]:
    """P(A preferred) = sigmoid(logit c(A) - logit c(B))."""
    odds = torch.logit(c, eps=1e-12)
    return probs_from_scores(odds[index[:, 0]].tolist(), odds[index[:, 1]].tolist())


@register("ccs", CCSConfig)
class ContrastConsistentSearch(BuiltinIntervention):
    trains = True
    config: CCSConfig

    def train(self, base: Path, pairs: list[dict], out: Path, progress=None) -> dict:
        pairs = pairs[: self.config.max_pairs]
        model, tokenizer = load_backbone(base, self.scoring.dtype)
        yes, no, index = contrast_pair(model, tokenizer, pairs, self.scoring, self.config.question, progress)
        probe, loss = best_probe(yes, no, self.config)
        rows, labels = labelled_responses(index, pairs)
        negated = orient(probe, yes, no, rows, labels)
        accuracy = response_accuracy(credence(probe, yes, no), rows, labels)
        torch.save(probe.state_dict(), out / "probe.pt")
        metrics = {"loss": loss, "train_accuracy": accuracy, "negated": float(negated), "responses": len(yes)}
        (out / "probe.json").write_text(json.dumps(metrics, indent=1))
        return metrics

    def evaluate(self, base: Path, state: Path | None, pairs: list[dict], progress=None) -> Scores:
        weights = torch.load(state / "probe.pt")
        probe = torch.nn.Linear(weights["weight"].shape[1], 1)
        probe.load_state_dict(weights)
        model, tokenizer = load_backbone(base, self.scoring.dtype)
        yes, no, index = contrast_pair(model, tokenizer, pairs, self.scoring, self.config.question, progress)
        c = credence(probe, yes, no)
        return Scores(p_a=pair_probs(c, index), extra={"mean_credence": float(c.mean())})
