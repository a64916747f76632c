"""The benchmarks' model shapes, one definition each."""
from __future__ import annotations

import torch

QWEN_WIDTH = "qwen2.5-0.5b-width"


def qwen_width_description(layers: int = 4) -> str:
    return (f"randomly initialised, Qwen2.5-0.5B's width with {layers} layers (hidden 896, 14 heads, 2 KV heads, "
            f"vocabulary 151936; the real model has 24)")


def qwen_width_model(layers: int = 4, dtype: torch.dtype = torch.float32):
    """A randomly initialised (seed 0) causal LM of Qwen2.5-0.5B's width with `layers` layers, SDPA attention."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)
