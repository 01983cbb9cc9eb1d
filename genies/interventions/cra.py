"""cra: contrast representation arithmetic, upstream's mms (mms.py) on Yes-minus-No contrasts.

Each prompt + response is followed by a "### " question asking whether the responder
followed the instruction successfully (``question``), answered once "Yes" and once "No"
(no EOS: the answer is the last token). A head's activation there is its slice of the input
of the layer's o_proj, and the arithmetic c = a(... Yes) - a(... No) keeps what the answer
changes and cancels what the two share. On c, everything is mms: per head
d = mean c(preferred) - mean c(dispreferred) over all training pairs (upstream subtracts the
No directions from the Yes directions, the same by linearity); heads ranked by logistic
probes on a random 30% validation split, the top 16 kept; s = 1/2 (1 + mean over kept heads
of cos(c(B) - c(A), d)); P(B preferred) = sigmoid(w s + b), calibrated on the validation pairs.

Departures from upstream are mms's (direction_probe.py), and two more:
- the default question is our own wording, with the same intent as upstream's; setting
  ``question`` to upstream's sentence (GENIES ``src/interventions/cra/train.py``, its
  postfixes without the answer) reproduces it exactly;
- upstream's ``alpha`` (Yes - alpha No in training, but c(B) - alpha c(A) at evaluation)
  stays at its only used value, 1, where both readings agree.
"""

from __future__ import annotations

import torch
from pydantic import Field

from alignflow.genies.interventions.base import register
from alignflow.genies.interventions.direction_probe import unit_activations
from alignflow.genies.interventions.mms import MassMeanShiftPerHead, MmsConfig
from alignflow.genies.scoring import per_pair_progress

QUESTION = "\n\n### Did the responder succeed in following the instruction?\n"  # our wording
QUESTION_DESCRIPTION = (
    "put after each response, then Yes or No; our wording, with upstream's intent: set upstream's exact"
    " question (GENIES src/interventions/cra/train.py or ccs/eval.py, without the answer) to reproduce it"
)


class CRAConfig(MmsConfig):
    """Upstream cra's defaults are mms's: 16 heads, a 30% validation split, seed 42."""

    question: str = Field(QUESTION, description=QUESTION_DESCRIPTION)


@register("cra", CRAConfig)
class ContrastRepresentationArithmetic(MassMeanShiftPerHead):
    config: CRAConfig

    def activations(self, model, tokenizer, pairs, progress=None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per sequence and head, c = a(... Yes) - a(... No): (sequences x heads x head_dim, pair index, heads)."""
        sites, heads = self.sites(model)
        both_passes = per_pair_progress(progress, 2 * len(pairs), len(pairs))
        question = self.config.question
        yes, index = unit_activations(
            model, tokenizer, pairs, self.scoring, sites, heads, suffix=question + "Yes", progress=both_passes
        )
        no, _ = unit_activations(
            model, tokenizer, pairs, self.scoring, sites, heads, suffix=question + "No", progress=both_passes
        )
        return yes - no, index, heads
