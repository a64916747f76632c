"""Batched sampling from a causal LM with a KV cache: the rollout phase, the refiner's greedy pass and evaluation.

Prompts are strings (used as they are) or chat messages (formatted with the tokenizer's chat template). Batches are
left-padded for generate(); on CUDA the static cache lets transformers compile the decoding step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Samples:
    prompt_ids: list[list[int]]      # one per sample (a prompt's ids repeated for each of its samples)
    completion_ids: list[list[int]]  # the generated tokens up to and including EOS, no padding
    texts: list[str]                 # the completions decoded without special tokens
    truncated: list[bool]            # stopped by max_new_tokens before an EOS


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    encoded = []
    for prompt in prompts:
        if isinstance(prompt, str):
            encoded.append(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        elif isinstance(prompt, list):
            encoded.append(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
        else:
            raise ValueError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    return encoded


def cache_implementation(device: torch.device):
    """transformers' KV cache for generate(): on CUDA the static cache, whose fixed shapes let transformers compile
    the decoding step; elsewhere the dynamic one, which grows only as far as the batch does."""
    return "static" if device.type == "cuda" else None


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, batch_size: int = 256) -> Samples:
    """num_samples completions of each prompt (samples of one prompt are adjacent)."""
    from transformers import GenerationConfig

    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token: generation could not stop")
    pad_id = eos_id if pad_id is None else pad_id
    device = next(model.parameters()).device
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=None if greedy else temperature,
        top_p=None if greedy else top_p, top_k=None, eos_token_id=eos_id, pad_token_id=pad_id,
        cache_implementation=cache_implementation(device),
    )
    expanded = [ids for ids in prompt_ids for _ in range(num_samples)]
    samples = Samples([], [], [], [])
    was_training = model.training
    model.eval()
    for start in range(0, len(expanded), batch_size):
        batch = expanded[start:start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                generation_config=gen_config)
        for ids, new in zip(batch, output[:, width:].tolist()):
            end = new.index(eos_id) + 1 if eos_id in new else len(new)
            completion = new[:end]
            samples.prompt_ids.append(ids)
            samples.completion_ids.append(completion)
            samples.truncated.append(eos_id not in completion)
            samples.texts.append(tokenizer.decode(completion, skip_special_tokens=True))
    model.train(was_training)
    return samples
