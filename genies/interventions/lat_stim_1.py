"""lat_stim_1: upstream GENIES' per-layer mass-mean shift on the residual stream.

A layer's activation is the hidden state entering that decoder block, at the last token of
prompt + response (no EOS): upstream's hidden_states[0 .. L-1], so the embeddings are a
candidate and the final (normed) block output is not. Per layer: d = mean over preferred -
mean over dispreferred responses; a logistic probe ranks the layers by validation accuracy
and the top ``top_layers`` (16) are kept. A pair scores s = 1/2 (1 + mean over kept layers of
cos(a(B) - a(A), d)), and P(B preferred) = sigmoid(w s + c), calibrated on the validation pairs.

The steps and every departure from upstream are in direction_probe.py; this module only
says where the activations are read. mass_mean_shift (mass_mean.py) is this project's own,
earlier per-layer variant of the same idea.
"""

from __future__ import annotations

import torch
from pydantic import Field

from alignflow.genies.interventions.base import register
from alignflow.genies.interventions.direction_probe import DirectionProbe, DirectionProbeConfig, decoder_layers


class LatStimConfig(DirectionProbeConfig):
    top_layers: int = Field(16, ge=1, description="layers kept, ranked by validation probe accuracy")


@register("lat_stim_1", LatStimConfig)
class LatStim(DirectionProbe):
    config: LatStimConfig

    def sites(self, model) -> tuple[list[torch.nn.Module], int]:
        """Every decoder block, whole: its input is the residual stream."""
        return decoder_layers(model), 1

    def keep(self) -> int:
        return self.config.top_layers
