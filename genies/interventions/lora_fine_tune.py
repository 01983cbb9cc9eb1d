"""lora_fine_tune: GENIES' LoRA reward classifier (upstream ``lora_fine_tune``, published
as classify_lora / lora_fine_tuning).

A two-label sequence-classification head (hidden -> 2 logits, no bias) reads the decoder's
state at the last token of prompt + response + EOS; LoRA adapters (r 64, alpha 16, dropout
0.1 on q_proj and v_proj) and the head are trained on the Bradley-Terry loss applied to each
logit alike: mean over pairs and both logits of -log sigmoid(l_k(preferred) - l_k(dispreferred)).
A response's score is the mean of its two logits, and P(A preferred) the softmax of the two
responses' scores = sigmoid(s_A - s_B). Upstream's training arguments: AdamW (its paged 32-bit
variant), lr 2e-4, no weight decay, gradients clipped to 0.3, 16 pairs a step, 100 steps over
epoch-wise shuffles of the pairs. The lr is constant from the first step: upstream sets
warmup_ratio 0.03, but HF's ``constant`` scheduler, which it names, ignores warmup
(``warmup_ratio`` here adds one). The base weights are NF4 4-bit (double quantisation,
float16 compute) where bitsandbytes and CUDA are available, as upstream always.

Departures from upstream:
- Without bitsandbytes or CUDA the base model stays in full precision; the train and evaluate
  metrics ``quantized_4bit`` (0/1) say which ran, and evaluation quantises only if training did.
- The head reads the last real token (the EOS) of each right-padded row. Upstream's classifier
  reads the token before the first pad id of its left-padded rows: the same EOS, except where
  the pad id is the EOS id and a row has no padding (then the token before the EOS).
"""

from __future__ import annotations

import importlib.util
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import Field

from alignflow.config import GeniesScoringConfig, LoraConfig, Strict
from alignflow.genies.interventions.base import BuiltinIntervention, Scores, register
from alignflow.genies.interventions.lora_rm import (
    LastTokenHead,
    fit_preferences,
    pair_probabilities,
    preferred_index,
    record_losses,
    with_lora,
)
from alignflow.genies.scoring import encode_pairs
from alignflow.tasks.base_model import model_name
from alignflow.tasks.training import lr_factor, save_adapter
from alignflow.workers.models import load_backbone


class ClassifierConfig(Strict):
    """Upstream's training arguments, shared by lora_fine_tune and prompt_tuning."""

    lr: float = Field(2e-4, gt=0.0)
    steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1, description="pairs per step")
    warmup_ratio: float = Field(
        0.0, ge=0.0, le=1.0, description="steps of linear warmup before the constant lr (upstream: none in effect)"
    )
    max_grad_norm: float = Field(0.3, gt=0.0)
    token_budget: int = Field(
        4096, ge=64, description="padded tokens per forward pass: a step's pairs train in micro-batches that fit"
    )
    quantize_4bit: bool = Field(True, description="NF4 4-bit base weights where bitsandbytes and CUDA are available")
    seed: int = 0


class LoraFineTuneConfig(ClassifierConfig):
    lora: LoraConfig = LoraConfig(r=64, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"])


def use_4bit(requested: bool) -> bool:
    """NF4 weights need bitsandbytes and a CUDA device; elsewhere the base model stays in full precision."""
    return requested and torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def load_classifier_backbone(base: Path, dtype: str, quantized: bool):
    """(backbone, tokenizer): NF4 4-bit weights computing in float16 (upstream's), or ``dtype``."""
    if not quantized:
        return load_backbone(base, dtype)
    from transformers import BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16,
    )
    return load_backbone(base, "float32", quantization_config=nf4)


def training_backbone(base: Path, quantized: bool):
    """The backbone to train on; a 4-bit one made ready as peft prescribes (frozen, norms in
    float32, gradient checkpointing), as upstream."""
    backbone, tokenizer = load_classifier_backbone(base, "float32", quantized)
    if quantized:
        from peft import prepare_model_for_kbit_training

        backbone = prepare_model_for_kbit_training(backbone)
    return backbone, tokenizer


def two_logit_head(backbone) -> torch.nn.Linear:
    """A two-label classification head as transformers builds it: no bias, weights ~ N(0, initializer_range)."""
    head = torch.nn.Linear(backbone.config.hidden_size, 2, bias=False)
    torch.nn.init.normal_(head.weight, std=backbone.config.initializer_range)
    return head.to(backbone.device)


def response_scores(logits: torch.Tensor) -> torch.Tensor:
    """A response's score: the mean of its two logits (rows x 2 -> rows)."""
    return logits.mean(dim=-1)


def shuffled_batches(pairs: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of pair indices, epoch after epoch: each epoch a fresh shuffle cut
    into batches of ``batch_size``, its last one smaller where they do not divide."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = torch.randperm(pairs, generator=generator).tolist()
        batches += [order[start : start + batch_size] for start in range(0, pairs, batch_size)]
    return batches[:steps]


def constant_lr(config: ClassifierConfig) -> Callable[[int], float]:
    """The learning rate per step: ``config.lr`` after a linear warmup over ``warmup_ratio`` of the steps."""
    warmup = round(config.warmup_ratio * config.steps)
    return lambda step: config.lr * lr_factor(step, config.steps, warmup, decay=False)


def train_classifier(
    model: LastTokenHead, tokenizer, pairs: list[dict], config: ClassifierConfig, scoring: GeniesScoringConfig, progress
) -> list[float]:
    """Fit the trainable parts of a two-logit classifier on the pairs; the losses per step."""
    model.train()
    seqs = encode_pairs(tokenizer, pairs, scoring.max_tokens)
    return fit_preferences(
        model,
        seqs,
        preferred_index(seqs, pairs),
        tokenizer.pad_token_id,
        shuffled_batches(len(pairs), config.batch_size, config.steps, config.seed),
        constant_lr(config),
        config.max_grad_norm,
        config.token_budget,
        progress,
    )


def finish_training(out: Path, losses: list[float], quantized: bool) -> dict:
    """Record the losses and the precision trained in; the train metrics."""
    (out / "precision.json").write_text(json.dumps({"quantized_4bit": quantized}))
    return {**record_losses(losses, out), "quantized_4bit": int(quantized)}


def evaluation_precision(state: Path) -> bool:
    """Evaluate in 4 bits where training did and this machine can."""
    return use_4bit(json.loads((state / "precision.json").read_text())["quantized_4bit"])


class TwoLogitClassifier(BuiltinIntervention, ABC):
    """A two-logit classifier's training and scoring; a subclass says what trains besides the head
    (``adapt``) and how the trained parts are kept (``save``, ``restore``)."""

    trains = True
    config: ClassifierConfig

    @abstractmethod
    def adapt(self, backbone) -> torch.nn.Module:
        """The backbone with its trainable parts, which the head reads."""

    @abstractmethod
    def save(self, model: LastTokenHead, out: Path, base: Path) -> None:
        """Keep the trained parts (the head among them) in the state folder ``out``."""

    @abstractmethod
    def restore(self, backbone, state: Path) -> LastTokenHead:
        """The trained classifier on ``backbone``, from the state folder."""

    def train(self, base: Path, pairs: list[dict], out: Path, progress=None) -> dict:
        torch.manual_seed(self.config.seed)
        quantized = use_4bit(self.config.quantize_4bit)
        backbone, tokenizer = training_backbone(base, quantized)
        model = LastTokenHead(self.adapt(backbone), two_logit_head(backbone))
        losses = train_classifier(model, tokenizer, pairs, self.config, self.scoring, progress)
        self.save(model, out, base)
        return finish_training(out, losses, quantized)

    @torch.inference_mode()
    def evaluate(self, base: Path, state: Path | None, pairs: list[dict], progress=None) -> Scores:
        quantized = evaluation_precision(state)
        backbone, tokenizer = load_classifier_backbone(base, self.scoring.dtype, quantized)
        model = self.restore(backbone, state)
        model.eval()
        p_a = pair_probabilities(lambda batch: response_scores(model(batch)), tokenizer, pairs, self.scoring, progress)
        return Scores(p_a=p_a, extra={"quantized_4bit": int(quantized)})


@register("lora_fine_tune", LoraFineTuneConfig)
class LoraFineTune(TwoLogitClassifier):
    config: LoraFineTuneConfig

    def adapt(self, backbone) -> torch.nn.Module:
        return with_lora(backbone, self.config.lora)

    def save(self, model: LastTokenHead, out: Path, base: Path) -> None:
        save_adapter(model.backbone, out / "adapter", model_name(base))
        torch.save(model.head.state_dict(), out / "head.pt")

    def restore(self, backbone, state: Path) -> LastTokenHead:
        from peft import PeftModel

        model = LastTokenHead(PeftModel.from_pretrained(backbone, state / "adapter"), two_logit_head(backbone))
        model.head.load_state_dict(torch.load(state / "head.pt", map_location="cpu"))
        return model
