"""LoRA adapters on the policy, through peft, injected in place: the model stays the transformers model it was
(the update's backbone-then-fused-head forward, generation and its KV cache work unchanged), and with its adapters
switched off it is the reference, so a LoRA run holds one copy of the base weights.

    add_lora(model, r=16, alpha=32, dropout=0.0, target_modules=[])   # [] = every attention and MLP projection
    with adapters_disabled(model): ...                                 # the base model, bit for bit
    merge_lora(model)                                                  # in place: an ordinary model again (export)

The LM head and the embeddings are frozen unless `target_modules` names them: then they are trained whole (a LoRA
on the head would bypass the fused loss, which reads the head's weight).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

PEFT_HINT = "LoRA needs peft: pip install 'fastrft[integrations]' (or pip install peft)"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError(PEFT_HINT) from e
    return peft


def _projection_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D   # GPT-2's projections

    return torch.nn.Linear, Conv1D


def default_target_modules(model) -> list[str]:
    """The leaf names of every linear projection inside the model's decoder (attention and MLP), e.g. q_proj ...
    down_proj for Llama and Qwen, c_attn, c_proj, c_fc for GPT-2."""
    decoder = model.get_decoder()
    names = {name.rsplit(".", 1)[-1] for name, module in decoder.named_modules()
             if isinstance(module, _projection_types())}
    return sorted(names)


def add_lora(model, *, r: int, alpha: float, dropout: float, target_modules: list[str]) -> None:
    """LoRA adapters of rank r on target_modules (default: every projection of the decoder), everything else frozen
    except the embeddings or head when target_modules names them. ValueError naming a bad argument."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_r must be an integer >= 1 to add adapters, got {r!r}")
    embedding_names = _embedding_names(model)
    named = list(target_modules) or default_target_modules(model)
    module_names = [name for name, _ in model.named_modules() if name]
    for target in named:
        if not any(_matches(name, target) for name in module_names):
            raise ValueError(f"lora_target_modules: {type(model).__name__} has no module named {target!r}; its "
                             f"projections are {', '.join(default_target_modules(model))}"
                             f"{' and its embeddings ' + ', '.join(sorted(embedding_names)) if embedding_names else ''}")
    whole = [t for t in named if any(_matches(name, t) for name in embedding_names)]
    adapted = [t for t in named if t not in whole]
    model.requires_grad_(False)
    if adapted:
        peft = _peft()
        config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=adapted, bias="none")
        try:
            peft.inject_adapter_in_model(config, model)
        except ValueError as e:   # a named module peft cannot adapt (not a projection)
            raise ValueError(f"lora_target_modules: {e}") from e
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)
            if "lora_" in name and parameter.dtype == torch.float16:
                # Trained in fp32 over an fp16 base (as peft's autocast_adapter_dtype does): AdamW's state underflows
                # in fp16. peft casts the adapters' input to their dtype and their output back.
                parameter.data = parameter.data.float()
    for name, module in model.named_modules():
        if any(_matches(name, t) for t in whole):
            module.requires_grad_(True)
    fused = [name for name, p in model.get_decoder().named_parameters() if p.dim() >= 3 and "expert" in name]
    if fused and not target_modules:
        from fastrft.batch import note_once

        note_once(f"LoRA adapts the model's linear projections; its {len(fused)} fused expert weight tensors "
                  f"({fused[0]}, ...) are no projections and stay frozen: the experts do not train")


def _embedding_names(model) -> set[str]:
    """Full module names of the input embeddings and the LM head."""
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return {name for name, module in model.named_modules() if id(module) in wanted}


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a target name: the module's full name, or its last dotted components."""
    return module_name == target or module_name.endswith("." + target)


def _adapter_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


@contextmanager
def adapters_disabled(model):
    """The model without its adapters for the block: the reference's forward passes and generation."""
    layers = _adapter_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merge_lora(model) -> None:
    """Fold every adapter into its base weight and put the base layer back: an ordinary transformers model, whose
    state_dict and save_pretrained hold the merged weights under their usual names."""
    layers = set(_adapter_layers(model))
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child in layers:
                child.merge()
                setattr(parent, child_name, child.get_base_layer())
