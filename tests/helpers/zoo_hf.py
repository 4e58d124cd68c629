"""Hugging Face transformers models for the coverage survey: tiny random configs, tensor outputs."""

from __future__ import annotations

import torch
import transformers as hf
from torch import nn

from tests.helpers.zoo import calibrate_norms
from tests.helpers.zoo_timm import randomize_zeros

VOCAB, TOKENS, IMAGE = 128, 16, 32
TEXT = {"vocab_size": VOCAB, "max_position_embeddings": 64}
LM = {**TEXT, "tie_word_embeddings": True, "use_cache": False}
# Decoder LMs with grouped-query attention: 4 query heads share 2 key/value heads.
GQA = {
    **LM,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
ENCODER = {
    **TEXT,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
VISION = {
    "image_size": IMAGE,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}

# name -> (model class, config class, config kwargs, output fields returned)
MODELS = {
    "bert": ("BertForSequenceClassification", "BertConfig", {**ENCODER, "num_labels": 10}, ("logits",)),
    "distilbert": (
        "DistilBertForMaskedLM",
        "DistilBertConfig",
        {**LM, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64},
        ("logits",),
    ),
    "roberta": (
        "RobertaForSequenceClassification",
        "RobertaConfig",
        {**ENCODER, "max_position_embeddings": 66, "num_labels": 10},
        ("logits",),
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        {**LM, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4},
        ("logits",),
    ),
    "llama": ("LlamaForCausalLM", "LlamaConfig", GQA, ("logits",)),
    "mistral": ("MistralForCausalLM", "MistralConfig", GQA, ("logits",)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", GQA, ("logits",)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {**GQA, "pad_token_id": 0}, ("logits",)),
    "t5-encoder": (
        "T5EncoderModel",
        "T5Config",
        {"vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
        ("last_hidden_state",),
    ),
    "vit": ("ViTForImageClassification", "ViTConfig", {**VISION, "num_labels": 10}, ("logits",)),
    "clip-vision": ("CLIPVisionModel", "CLIPVisionConfig", VISION, ("last_hidden_state", "pooler_output")),
    "swin": (
        "SwinForImageClassification",
        "SwinConfig",
        {
            "image_size": IMAGE,
            "patch_size": 4,
            "embed_dim": 16,
            "depths": [1, 1],
            "num_heads": [2, 2],
            "window_size": 4,
            "num_labels": 10,
        },
        ("logits",),
    ),
    "convnext": (
        "ConvNextForImageClassification",
        "ConvNextConfig",
        {"num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 1], "num_labels": 10},
        ("logits",),
    ),
    "resnet": (
        "ResNetForImageClassification",
        "ResNetConfig",
        {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "num_labels": 10},
        ("logits",),
    ),
}


class Outputs(nn.Module):
    """Calls a transformers model with one positional input; returns the named output tensors."""

    def __init__(self, model: nn.Module, fields: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.fields = fields

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.model(x)
        values = tuple(out[f] for f in self.fields)
        return values[0] if len(values) == 1 else values


def hf_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The tiny random model called ``name`` in :data:`MODELS`, wrapped, in eval mode, and its input.

    Text models get token ids (2 × 16, ids ≥ 3 so no pad/special token), vision models 2 × 3 × 32 × 32
    images; BatchNorm statistics are calibrated on a separate batch (see :func:`calibrate_norms`).
    """
    model_cls, config_cls, kwargs, fields = MODELS[name]
    torch.manual_seed(0)
    config = getattr(hf, config_cls)(**kwargs)
    model = Outputs(getattr(hf, model_cls)(config), fields).eval()
    randomize_zeros(model)
    calibrate_norms(model, _inputs(config, batch=8, seed=1))
    return model, _inputs(config, batch=2, seed=0)


def _inputs(config, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if hasattr(config, "num_channels"):
        return torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)
    return torch.randint(3, VOCAB, (batch, TOKENS), generator=generator)
