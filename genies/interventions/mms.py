"""mms: upstream GENIES' mass-mean shift, one direction per attention head.

A head's activation is its output at the last token of prompt + response (no EOS): its
slice of the input of the layer's attention output projection ``o_proj``, read with a forward
pre-hook, so any Llama-like decoder works unmodified (upstream edits llama.py to expose
it). Per head: d = mean over preferred - mean over dispreferred responses; a logistic probe
ranks the heads by validation accuracy and the top ``top_heads`` (16) of all layers x heads
are kept. A pair scores s = 1/2 (1 + mean over kept heads of cos(a(B) - a(A), d)), and
P(B preferred) = sigmoid(w s + c), calibrated on the validation pairs.

The steps and every departure from upstream are in direction_probe.py; this module only
says where the activations are read.
"""

from __future__ import annotations

import torch
from pydantic import Field

from alignflow.genies.interventions.base import register
from alignflow.genies.interventions.direction_probe import DirectionProbe, DirectionProbeConfig, decoder_layers


class MmsConfig(DirectionProbeConfig):
    top_heads: int = Field(16, ge=1, description="heads kept, over all layers, ranked by validation probe accuracy")


@register("mms", MmsConfig)
class MassMeanShiftPerHead(DirectionProbe):
    config: MmsConfig

    def sites(self, model) -> tuple[list[torch.nn.Module], int]:
        """Each layer's o_proj, whose input is the concatenated head outputs."""
        return [layer.self_attn.o_proj for layer in decoder_layers(model)], model.config.num_attention_heads

    def keep(self) -> int:
        return self.config.top_heads
