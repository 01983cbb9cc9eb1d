"""prompt_tuning: GENIES' soft-prompt reward classifier (upstream ``prompt_tuning``).

Upstream's prompt tuning is its LoRA classifier (lora_fine_tune.py) with another peft method:
the same two-logit sequence-classification head and Bradley-Terry loss on each logit; a
response's score is the mean of its two logits and P(A preferred) = sigmoid(s_A - s_B). There
is no log-prob or length-normalised score. In place of LoRA adapters, 10 trainable virtual
token embeddings (drawn from N(0, 1), peft's random init) precede every input and the base
model stays frozen; the head trains with them, as peft trains a sequence classifier's head.
Upstream's arguments: lr 0.0052 held constant from the first step, 16 pairs a step, 150
steps, gradients clipped to 0.3, no weight decay, 4-bit NF4 base weights.

Upstream's prompt_tuning/train.py calls ``interventions.classify_lora.train``, which its
snapshot lacks; this follows lora_fine_tune/train.py, the module the published results call
classify_lora. The soft prompt is this module's own (embeddings put before the input's), not
peft's PromptTuning: it hands back only the real tokens' states, so the head reads each row's
last token as it does without a prompt. Departures from upstream are lora_fine_tune's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from transformers.modeling_outputs import BaseModelOutput

from alignflow.genies.interventions.base import register
from alignflow.genies.interventions.lora_fine_tune import ClassifierConfig, TwoLogitClassifier, two_logit_head
from alignflow.genies.interventions.lora_rm import LastTokenHead
from alignflow.tasks.training import load_trainable, trainable_state


class PromptTuningConfig(ClassifierConfig):
    virtual_tokens: int = Field(10, ge=1, description="trainable embeddings before every input")
    lr: float = Field(0.0052, gt=0.0)
    steps: int = Field(150, ge=1)


class SoftPrompt(torch.nn.Module):
    """A frozen backbone whose every input is preceded by trainable embeddings. It returns the
    hidden states of the real tokens only, so the caller's attention mask still indexes them."""

    def __init__(self, backbone, tokens: int):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.embeddings = torch.nn.Parameter(torch.randn(tokens, backbone.config.hidden_size).to(backbone.device))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> BaseModelOutput:
        words = self.backbone.get_input_embeddings()(input_ids)
        rows, tokens = len(input_ids), len(self.embeddings)
        prompt = self.embeddings.to(words.dtype).expand(rows, -1, -1)
        mask = torch.cat([attention_mask.new_ones(rows, tokens), attention_mask], dim=1)
        out = self.backbone(inputs_embeds=torch.cat([prompt, words], dim=1), attention_mask=mask)
        return BaseModelOutput(last_hidden_state=out.last_hidden_state[:, tokens:])


@register("prompt_tuning", PromptTuningConfig)
class PromptTuning(TwoLogitClassifier):
    config: PromptTuningConfig

    def adapt(self, backbone) -> torch.nn.Module:
        return SoftPrompt(backbone, self.config.virtual_tokens)

    def save(self, model: LastTokenHead, out: Path, base: Path) -> None:
        torch.save(trainable_state(model), out / "prompt.pt")  # the virtual tokens and the head

    def restore(self, backbone, state: Path) -> LastTokenHead:
        model = LastTokenHead(self.adapt(backbone), two_logit_head(backbone))
        load_trainable(model, torch.load(state / "prompt.pt", map_location="cpu"))
        return model
