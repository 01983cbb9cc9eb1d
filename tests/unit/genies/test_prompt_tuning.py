"""prompt_tuning: upstream's defaults, and the soft prompt: each row's hidden states are
those of its unpadded tokens after the virtual ones, and only the prompt and head train."""

from __future__ import annotations

import torch

from alignflow.genies.interventions.lora_fine_tune import two_logit_head
from alignflow.genies.interventions.lora_rm import LastTokenHead
from alignflow.genies.interventions.prompt_tuning import PromptTuningConfig, SoftPrompt
from alignflow.workers.models import load_backbone
from alignflow.workers.scoring import pack


def test_defaults_are_upstreams_training_arguments():
    config = PromptTuningConfig()
    assert (config.virtual_tokens, config.lr, config.steps, config.batch_size) == (10, 0.0052, 150, 16)
    assert config.max_grad_norm == 0.3 and config.warmup_ratio == 0.0 and config.quantize_4bit is True


@torch.inference_mode()
def test_soft_prompt_states_are_each_rows_own_after_the_virtual_tokens(tiny_model_dir):
    backbone, tokenizer = load_backbone(tiny_model_dir)
    torch.manual_seed(0)
    prompted = SoftPrompt(backbone, tokens=3)
    rows = [[1, 5, 9, 14, 20], [1, 7, 3]]
    batch = pack([r[:2] for r in rows], [r[2:] for r in rows], tokenizer.pad_token_id)  # the second row is padded
    states = prompted(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    assert states.shape == (2, 5, backbone.config.hidden_size)
    for i, ids in enumerate(rows):
        # one unpadded row at a time, the virtual tokens spliced in by hand
        embeds = torch.cat([prompted.embeddings, backbone.get_input_embeddings()(torch.tensor(ids))])
        alone = backbone(inputs_embeds=embeds[None]).last_hidden_state[0, 3:]
        torch.testing.assert_close(states[i, : len(ids)], alone, atol=1e-5, rtol=1e-4)


def test_only_the_virtual_tokens_and_the_head_train(tiny_model_dir):
    backbone, _ = load_backbone(tiny_model_dir)
    model = LastTokenHead(SoftPrompt(backbone, tokens=10), two_logit_head(backbone))
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    hidden = backbone.config.hidden_size
    assert trainable == {"backbone.embeddings": 10 * hidden, "head.weight": 2 * hidden}
