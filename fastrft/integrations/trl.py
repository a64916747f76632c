"""FastRFTGRPOTrainer: TRL's GRPOTrainer with every log-prob computed by fastrft.lm_head_logprobs, and fastrft's
refiner constraint on top.

Everything but the LM head is TRL's own: generation, rewards, advantages, every loss type and importance-sampling
level, masks, entropy bonus, KL (with or without bias correction), MoE router loss, logging and checkpoints. TRL
computes each per-token log-prob and entropy (the policy's, the old and the reference model's) by calling a model
with `fused_lm_head=True` (its own tiled LM head, added by `trl.trainer.utils.add_fused_lm_head`); this trainer
replaces that head, on the policy and on TRL's reference model, with a forward that runs the model's own forward
with the LM head applied to one position only (`logits_to_keep=1`; MoE models return their router loss there), and
hands the final hidden states to fastrft.lm_head_logprobs under the model's logit transform
(fastrft.model_logit_transform: Cohere's scale, Granite's division, Gemma 2's soft-cap) and TRL's temperature. The
[tokens x vocab] logits are never formed; TRL's compute_loss runs unchanged on the result.

The refiner constraint (refine_coef > 0, off by default): once per generation batch, where TRL scores the completions
and computes the old and reference log-probs, fastrft.refiner.refine has the frozen refiner continue
refine_template.format(prompt=..., response=...) greedily, parses the corrected response, diffs it against the sample's
tokens and weights the tokens it changed (refine_coef) and kept (refine_kept_weight). Each refinement travels in the
batch dict beside its sample (refined_ids, refined_mask, refined_weights: [B, R]), so TRL's shuffle and split into
micro-batches keep them together. compute_loss adds, to TRL's loss, the weighted cross-entropy of the refined rows
(the sample's prompt followed by the refined ids, through the same fused head):
    sum over refined tokens of w * -logp  /  N,
N the generation batch's completion tokens plus its weighted refined tokens over all processes, divided by the
processes and, in training, scaled to one accumulation window (DAPO's token mean, whatever loss_type: the
constraint's weight per changed token does not depend on how the policy term is normalised). With refine_coef == 0
the loss is TRL's own.
"""
from __future__ import annotations

import functools
import importlib.metadata
import inspect
import math
import os
import re
import types
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from fastrft.batch import check_head_matches_model, check_vocabularies, own_forward_hidden
from fastrft.distributed import ROOT_WARMUP_TOKENS, fix_root, gathered, is_sharded
from fastrft.loss import IGNORE_INDEX, lm_head_logprobs, model_logit_transform
from fastrft.refiner import check_refinable, check_refine_template, refine

try:
    from accelerate.utils import is_peft_model  # accelerate comes with TRL
    from trl import GRPOTrainer
    from trl.models.utils import add_hooks, prepare_deepspeed, remove_hooks
    from trl.trainer.utils import (FusedCausalLMOutput, create_model_from_path, disable_dropout_in_model,
                                   get_config_model_id, maybe_gather_lm_head_ctx, use_adapter)
except ImportError as err:  # the one place TRL is imported: one message whatever is missing
    raise ImportError('FastRFTGRPOTrainer needs TRL (1.16 or later): pip install "fastrft[integrations]"') from err

__all__ = ["FastRFTGRPOTrainer"]


# A Hugging Face Hub repo id: a name, or namespace/name.
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _is_local_path(name: str) -> bool:
    """Whether a model name can only be a local path, not a Hub repo id."""
    return name.startswith(("/", "./", "../", "~")) or (os.sep in name and not _HUB_ID.fullmatch(name))


def _check_refine_options(refine_coef, refine_template, parse_refinement, refine_kept_weight, refine_context,
                          refine_max_new_tokens, refine_draft, refiner_model) -> None:
    """Raise a ValueError naming each refiner option that cannot work."""
    if not isinstance(refine_draft, bool):
        raise ValueError(f"refine_draft must be True or False, got {refine_draft!r}")
    if not (isinstance(refine_coef, (int, float)) and math.isfinite(refine_coef) and refine_coef >= 0):
        raise ValueError(f"refine_coef must be a finite number >= 0 (0 turns the refiner off), got {refine_coef!r}")
    if not (isinstance(refine_kept_weight, (int, float)) and math.isfinite(refine_kept_weight)
            and refine_kept_weight >= 0):
        raise ValueError(f"refine_kept_weight must be a finite number >= 0, got {refine_kept_weight!r}")
    if isinstance(refine_context, bool) or not isinstance(refine_context, int) or refine_context < 0:
        raise ValueError(f"refine_context must be an int >= 0, got {refine_context!r}")
    if refine_max_new_tokens is not None and (isinstance(refine_max_new_tokens, bool)
                                              or not isinstance(refine_max_new_tokens, int)
                                              or refine_max_new_tokens < 1):
        raise ValueError(f"refine_max_new_tokens must be an int >= 1 or None, got {refine_max_new_tokens!r}")
    if parse_refinement is not None and not callable(parse_refinement):
        raise ValueError(f"parse_refinement must be a callable str -> str | None, got {parse_refinement!r}")
    if isinstance(refiner_model, str) and _is_local_path(refiner_model) \
            and not os.path.isdir(os.path.expanduser(refiner_model)):
        # transformers would take it for a Hub repo id and fail on the id's form.
        raise ValueError(f"refiner_model {refiner_model!r} is a local path, but no such directory exists")
    if refine_coef == 0:
        return
    if refine_template is None:
        raise ValueError("refine_coef > 0 needs refine_template: the text the refiner continues, a str.format "
                         "template with the fields {prompt} and {response}")
    check_refine_template(refine_template)


def _strip_or_none(text: str) -> str | None:
    """The default parse_refinement: the refiner's whole output, stripped; None (a failed refinement) when empty."""
    return text.strip() or None


def _lm_head(causal_lm: nn.Module) -> nn.Linear:
    head = causal_lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"FastRFTGRPOTrainer needs the LM head to be a plain nn.Linear, got {type(head).__name__}; "
                         "a PEFT adapter on lm_head (target_modules or modules_to_save) is not supported, keep the "
                         "head frozen")
    return head


def _route_fused_head(causal_lm: nn.Module, temperature: float) -> None:
    """Make causal_lm(..., labels=..., fused_lm_head=True), TRL's call for per-token log-probs and entropies, run
    the model's own forward with the LM head on one position, then fastrft.lm_head_logprobs on its final hidden
    states. Every other call (generation, plain forwards) keeps the forward the model had."""
    causal_lm.forward = _fused_head_forward(causal_lm, causal_lm.forward, temperature)


def _fused_head_forward(causal_lm: nn.Module, forward_before, temperature: float):
    """causal_lm's forward as _route_fused_head makes it, over forward_before: TRL's fused-head forward (which passes
    other calls to the model's own), possibly under accelerate's mixed-precision wrapper."""
    if getattr(forward_before, "__func__", None) is type(causal_lm).forward:
        raise ValueError(f"this TRL ({importlib.metadata.version('trl')}) did not give {type(causal_lm).__name__} a "
                         "fused LM head (trl.trainer.utils.add_fused_lm_head), the call FastRFTGRPOTrainer takes "
                         "over to compute log-probs; it needs TRL 1.16 or a later release that keeps it")
    text_config = causal_lm.config.get_text_config()
    transform = model_logit_transform(causal_lm)

    @functools.wraps(type(causal_lm).forward)   # generate validates its keyword arguments against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            given = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
            return forward_before(*args, **{k: v for k, v in given.items() if v is not None}, **kwargs)
        if getattr(text_config, "output_router_logits", False):   # as the model's own forward would
            kwargs.setdefault("output_router_logits", True)
        hidden, aux_loss = own_forward_hidden(forward_before, *args, **kwargs)
        if shift_labels is None:
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:   # pre-shifted, as TRL passes them under context or sequence parallelism
            targets = shift_labels
        head = _lm_head(self)
        weight, bias = head.weight, head.bias
        if _is_zero3_param(weight):
            _register_head(self, weight, bias)
        hidden, targets = hidden.to(weight.device), targets.to(weight.device)
        # The head accumulates in fp32 on its own; autocast would push its matmuls back to low precision. Under
        # ZeRO-3, TRL's context gathers the head where this model's hooks have not (its first call).
        with torch.autocast(hidden.device.type, enabled=False), maybe_gather_lm_head_ctx(weight, bias):
            if weight.dtype != hidden.dtype:   # an fp32 head (cast_lm_head_to_fp32) or autocast: score in fp32
                hidden, weight = hidden.float(), weight.float()
                bias = None if bias is None else bias.float()
            logp, entropy = lm_head_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                             ignore_index=IGNORE_INDEX, **transform)
        label_mask = targets != IGNORE_INDEX
        loss = -logp.sum() / (label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        if aux_loss is not None:
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=logp, entropy=entropy, label_mask=label_mask,
                                   aux_loss=aux_loss)

    return types.MethodType(forward, causal_lm)


@contextmanager
def _without_autocast(causal_lm: nn.Module, temperature: float):
    """causal_lm, for the block, without the autocast wrapper that accelerate's prepare_model puts around its forward
    under bf16 or fp16 (TRL's reference model has been through it; accelerate keeps the forward it wrapped as
    _original_forward), for the construction probe to compare like with like, both sides in the weights' dtype.
    Under the wrapper the model's own logits come from a 16-bit matmul, handed back as fp32, while fastrft's head
    computes in fp32 (in training too, where the body runs under autocast as TRL's does)."""
    unwrapped = getattr(causal_lm, "_original_forward", None)
    if unwrapped is None:
        yield causal_lm
        return
    routed = causal_lm.forward
    causal_lm.forward = _fused_head_forward(causal_lm, unwrapped, temperature)
    try:
        yield causal_lm
    finally:
        causal_lm.forward = routed


def _fused_probe_logprobs(causal_lm: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The log-probs of ids[0, 1:] as TRL asks for them (check_head_matches_model's probe of this path)."""
    return causal_lm(input_ids=ids, labels=ids, fused_lm_head=True).log_probs[0]


def _is_zero3_param(param: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the weight (deepspeed.zero.Init or a ZeRO-3 engine)."""
    return hasattr(param, "ds_id")


def _is_zero3(model: nn.Module) -> bool:
    return any(_is_zero3_param(p) for p in model.parameters())


def _is_deepspeed_engine(model: nn.Module) -> bool:
    # By name: no DeepSpeed import (slow, and absent where it is not installed) for models that are not its.
    return any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__)


def _register_head(causal_lm: nn.Module, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
    """The LM head's ZeRO-3 weights registered with the causal LM whose forward reads them outside the head's own
    (deepspeed.zero.register_external_parameter): its hooks then gather them for its forward and again for its
    backward, where fastrft's head recomputes the logits. The cost: one whole head per process from the model's
    forward through its backward."""
    import deepspeed

    for param in (weight, bias):
        if param is not None:
            deepspeed.zero.register_external_parameter(causal_lm, param)


@contextmanager
def _whole_weights(model: nn.Module, accelerator):
    """The model under its wrappers (accelerator.unwrap_model), with its whole weights for the block, gathered once
    for every forward inside: the refiner's decoding, whose number of forward passes differs from process to process,
    and the construction probe. Under DeepSpeed ZeRO-3: deepspeed.zero.GatheredParameters, with the engine's
    per-module hooks off for the block (TRL's remove_hooks and add_hooks, as TRL's own generation does: a hook would
    partition each module's weights again after its forward); under FSDP2: fastrft.distributed.gathered."""
    inner = accelerator.unwrap_model(model)
    if not _is_zero3(model):
        with gathered(inner):
            yield inner
        return
    import deepspeed

    engine = model if _is_deepspeed_engine(model) else None   # None: partitioned by zero.Init, no engine (hooks) yet
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        if engine is not None:
            remove_hooks(engine)
        try:
            yield inner
        finally:
            if engine is not None:
                add_hooks(engine)


class FastRFTGRPOTrainer(GRPOTrainer):
    """trl.GRPOTrainer (same constructor, every GRPOConfig option) whose per-token log-probs and entropies, the
    policy's, the old and the reference model's, come from fastrft.lm_head_logprobs without materialising the
    logits (see the module docstring), with fastrft's refiner constraint on top when refine_coef > 0. TRL's own
    compute_loss runs on them: every loss type, importance-sampling level, clipping, masking, KL, entropy bonus, MoE
    router loss and metric is TRL's. Under FSDP2 (accelerate's fsdp_version: 2) the log-probs are computed inside
    the sharded model's own forward, where FSDP2 has gathered the LM head, and FSDP2 reduce-scatters its gradient;
    under DeepSpeed ZeRO-3 the head's weights are registered with the model (deepspeed.zero's external parameters),
    which gathers them for its forward and its backward, and ZeRO-3 reduce-scatters their gradient. Refused at
    construction, with the reason: a PEFT adapter on the LM head (the primitive takes the head's weight),
    vision-language models, FSDP1 (flat parameters), and models whose logits fastrft cannot reproduce (checked on a
    short probe against the model's own forward, without mixed-precision autocast).

    Refiner keyword arguments (beyond TRL's):
        refine_coef            sft weight of each token the refiner changed; 0 (default) turns the refiner off and
                               leaves the trainer exactly TRL's loss
        refine_template        str.format template with {prompt} and {response}: the text the refiner continues
                               greedily (required when refine_coef > 0). Chat prompts contribute their last user
                               message's text; add any chat formatting the refiner needs to the template itself (a
                               prompt ending with an assistant message is refused: the refiner rewrites whole answers).
        parse_refinement       refiner output -> corrected response, or None when it cannot be parsed (a failed
                               refinement, no constraint); default: the output stripped, None when empty
        refine_kept_weight     sft weight of the refinement's unchanged tokens (default 0: only the changes)
        refine_context         also weight this many tokens before each change (default 0)
        refine_max_new_tokens  the refiner's generation budget; a refinement that does not end within it fails
                               (default: max_completion_length)
        refine_draft           verify each sample as the draft of its greedy refinement (default True: the same
                               tokens, one batched forward pass where the refiner changes nothing; see
                               fastrft.refiner); False decodes every refinement with transformers' generate
        refiner_model          the frozen refiner: a model or a model path, sharing the policy's tokenizer. Default:
                               under PEFT the policy with its adapters disabled (the initial model, no extra memory);
                               else TRL's reference model when beta > 0 (no extra memory; it follows the policy
                               when sync_ref_model is set); else, with beta == 0, a frozen copy of the initial
                               policy loaded from the policy's model id or path, which costs a second copy of the
                               weights in the policy's dtype (2 bytes per parameter in bf16: about 16 GB for an 8B
                               model), without gradients or optimiser state. Every refiner also holds its KV cache
                               while it generates (the generation batch's samples at once).
    The refiner runs once per generation batch on each process's own samples, with transformers models (not vLLM),
    under FSDP2 and ZeRO-3 on its whole weights, gathered for that call (whatever ds3_gather_for_generation says:
    processes decode different numbers of tokens, which per-module gathers could not survive); it is refused with
    tools (it would rewrite tool results).
    Logged: refine/rate (samples with a refinement that changed something), refine/failed (samples whose refinement
    was too long, unparseable or empty), refine/changed_token_frac (changed tokens / refined tokens),
    refine/passes (the refiner's forward passes), refine/copied (samples identical to another of the process's
    batch, whose refinement is written once and copied) and, with refine_draft, refine/draft_accepted (the share of
    draft tokens accepted) over the generation batch, and fastrft/sft_loss, the refined rows' term of the loss
    handed to backward.
    """

    def __init__(self, *args, refine_coef: float = 0.0, refine_template: str | None = None,
                 parse_refinement: Callable[[str], str | None] | None = None, refine_kept_weight: float = 0.0,
                 refine_context: int = 0, refine_max_new_tokens: int | None = None, refine_draft: bool = True,
                 refiner_model=None, **kwargs):
        # Check the options before TRL loads models: an unsupported option should fail in seconds.
        _check_refine_options(refine_coef, refine_template, parse_refinement, refine_kept_weight, refine_context,
                              refine_max_new_tokens, refine_draft, refiner_model)
        bound = inspect.signature(GRPOTrainer.__init__).bind(None, *args, **kwargs).arguments
        super().__init__(*args, **kwargs)
        for model in (self.model, self.ref_model):   # TRL's reference model may already be a DeepSpeed engine
            if model is not None:
                _route_fused_head(self._causal_lm(model), self.temperature)
        self._check_model()
        self.refine_coef = float(refine_coef)
        self.refine_template = refine_template
        self.parse_refinement = parse_refinement or _strip_or_none
        self.refine_kept_weight = float(refine_kept_weight)
        self.refine_context = refine_context
        self.refine_max_new_tokens = refine_max_new_tokens or self.max_completion_length
        self.refine_draft = refine_draft
        self._rollout = None  # (prompts, completion ids) of the last generation, for the refiner
        self.refiner_model = None
        if self.refine_coef > 0:
            self._check_refiner_setup()
            self.refiner_model = self._load_refiner(refiner_model, bound.get("quantization_config"))

    def _check_refiner_setup(self) -> None:
        if self.tools:
            raise ValueError("refine_coef > 0 is not supported with tools: the refiner would rewrite the tool "
                             "results along with the model's tokens")

    def _load_refiner(self, refiner_model, quantization_config):
        """The frozen refiner model, or None for the PEFT policy with its adapters disabled (see the docstring)."""
        if refiner_model is None:
            if is_peft_model(self.accelerator.unwrap_model(self.model)):
                return None
            if self.ref_model is not None:
                return self.ref_model
            refiner_model = get_config_model_id(self._causal_lm(self.model).config)
            if not refiner_model:
                raise ValueError("refine_coef > 0 with beta == 0 loads a frozen copy of the policy from its model id "
                                 "or path, but the policy's config names none: pass refiner_model=")
        if isinstance(refiner_model, str):
            # Loaded like TRL's reference model.
            init_kwargs = dict(self.args.model_init_kwargs or {})
            if quantization_config is not None:
                init_kwargs["quantization_config"] = quantization_config
            if self.args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
                init_kwargs["device_map"] = None
            init_kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
            policy = self._causal_lm(self.model)
            init_kwargs.setdefault("dtype", policy.dtype)
            init_kwargs.setdefault("attn_implementation", policy.config._attn_implementation)
            refiner_model = create_model_from_path(os.path.expanduser(refiner_model), **init_kwargs)
        if not isinstance(refiner_model, nn.Module) or not hasattr(refiner_model, "generate"):
            raise ValueError(f"refiner_model must be a causal LM (with generate) or a model path, got "
                             f"{type(refiner_model).__name__}")
        check_vocabularies(self._tokenizer, self._causal_lm(self.model), refiner_model, ref_scores=False,
                           policy_name=f"the policy {type(self._causal_lm(self.model)).__name__}",
                           ref_name=f"refiner_model {type(refiner_model).__name__}")
        refiner_model.requires_grad_(False)
        refiner_model.eval()
        if self.args.disable_dropout:
            disable_dropout_in_model(refiner_model)
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            return prepare_deepspeed(refiner_model, self.accelerator)   # partitioned, as TRL's reference model
        refiner_model = self.accelerator.prepare_model(refiner_model, evaluation_mode=True)
        if is_sharded(refiner_model):   # FSDP2 takes the first module to run forward as its root: make it this one
            fix_root(refiner_model, input_ids=torch.zeros(1, ROOT_WARMUP_TOKENS, dtype=torch.long,
                                                          device=self.accelerator.device))
        return refiner_model

    def _causal_lm(self, model: nn.Module) -> nn.Module:
        """The transformers model under the DDP/accelerate and PEFT wrappers (PEFT's adapters live inside it)."""
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if is_peft_model(model) else model

    def _check_model(self) -> None:
        causal_lm = self._causal_lm(self.model)
        config = causal_lm.config
        if config.get_text_config() is not config:
            raise ValueError(f"FastRFTGRPOTrainer supports text-only causal LMs; {type(causal_lm).__name__} is a "
                             "multimodal model (its image inputs are untested with fastrft's head)")
        if self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise ValueError("FastRFTGRPOTrainer supports FSDP2 (fsdp_version: 2 in accelerate's config, or "
                             "fsdp_config={'version': 2}), not FSDP1, whose flat parameters hide the LM head's weight")
        _lm_head(causal_lm)
        for key, model in (("model", self.model), ("ref_model", self.ref_model)):
            # Under FSDP2 with cpu_ram_efficient_loading the weights are real on rank 0 only: it probes for all.
            if model is not None and not any(p.is_meta for p in model.parameters()):
                with (_whole_weights(model, self.accelerator) as whole,   # ZeRO-3 partitions at loading
                      _without_autocast(self._causal_lm(whole), self.temperature) as causal_lm):
                    check_head_matches_model(causal_lm, key, fused_logprobs=_fused_probe_logprobs,
                                             temperature=self.temperature)

    # ------------------------------------------------------------------------------------ refiner (per generation)

    def _generate(self, prompts: list):
        outputs = super()._generate(prompts)
        if self.refine_coef > 0:
            self._rollout = (prompts, outputs[1])  # the prompts as generated from, and the exact completion ids
        return outputs

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.refine_coef > 0:
            prompts, completion_ids = self._rollout
            self._rollout = None
            output.update(self._refine(prompts, completion_ids))
        return output

    @contextmanager
    def _refiner(self):
        """The refiner model to generate with: the frozen refiner, or the PEFT policy with its adapters disabled;
        under FSDP2 and ZeRO-3 its whole weights gathered for the block (_whole_weights: every process calls the
        refiner once per generation batch, and decodes as far as its own samples need)."""
        if self.refiner_model is not None:
            with _whole_weights(self.refiner_model, self.accelerator) as refiner:
                yield refiner
            return
        with (_whole_weights(self.model_wrapped, self.accelerator) as policy,   # under DeepSpeed: its engine
              use_adapter(policy, adapter_name="ref" if "ref" in policy.peft_config else None)):
            yield policy

    def _refine(self, prompts: list, completion_ids: list[list[int]]) -> dict:
        """Refinements of this process's samples, one per sample in the batch dict, and the refine/* metrics."""
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        tokenizer = self._tokenizer
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        check_refinable(prompts, "FastRFTGRPOTrainer with refine_coef > 0", without_refiner="refine_coef=0")
        with self._refiner() as refiner_model:
            result = refine(refiner_model, tokenizer, template=self.refine_template, parse=self.parse_refinement,
                            prompts=prompts, completions=completions, completion_ids=completion_ids,
                            max_new_tokens=self.refine_max_new_tokens, batch_size=len(prompts),
                            changed_weight=self.refine_coef, kept_weight=self.refine_kept_weight,
                            context=self.refine_context, draft=self.refine_draft,
                            # Where TRL stopped the samples; the tokenizer's EOS first: a cut-short sample's
                            # refinement ends with it (TRL lists the generation config's first where it has it).
                            stop_ids=list(dict.fromkeys([tokenizer.eos_token_id,
                                                         *(getattr(self, "eos_token_ids", None) or [])])))
        n_samples = len(completion_ids)
        width = max((len(r.refined_ids) for r in result.refinements if r is not None), default=0)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        refined_ids = torch.full((n_samples, width), pad_id, dtype=torch.long)    # [B, R], right-padded
        refined_mask = torch.zeros((n_samples, width), dtype=torch.long)          # 1 on the refinement's tokens
        refined_weights = torch.zeros((n_samples, width), dtype=torch.float32)    # the sft_weights of its tokens
        for i, refinement in enumerate(result.refinements):
            if refinement is not None:
                length = len(refinement.refined_ids)
                refined_ids[i, :length] = torch.tensor(refinement.refined_ids)
                refined_mask[i, :length] = 1
                refined_weights[i, :length] = refinement.sft_weights
        draft = result.draft
        local = torch.tensor([n_samples, result.changed_samples, result.failed, result.changed_tokens, result.refined_tokens,
                              int((refined_weights != 0).sum()), result.passes, draft.offered if draft else 0,
                              draft.accepted if draft else 0, result.copies], device=device)
        total = self.accelerator.reduce(local, reduction="sum").tolist()
        samples = max(1, total[0])
        self._metrics[mode]["refine/rate"].append(total[1] / samples)
        self._metrics[mode]["refine/failed"].append(total[2] / samples)
        if total[4]:   # a batch whose refinements all failed measured no token: no value, not 0
            self._metrics[mode]["refine/changed_token_frac"].append(total[3] / total[4])
        self._metrics[mode]["refine/passes"].append(total[6] / self.accelerator.num_processes)
        self._metrics[mode]["refine/copied"].append(total[9] / samples)
        if self.refine_draft and total[7]:
            self._metrics[mode]["refine/draft_accepted"].append(total[8] / total[7])
        return {"refined_ids": refined_ids.to(device), "refined_mask": refined_mask.to(device),
                "refined_weights": refined_weights.to(device),
                # the weighted refined tokens of the generation batch over all processes (dapo's normaliser)
                "refined_items_in_batch": torch.tensor(total[5], device=device)}

    # ----------------------------------------------------------------------------------------------------- the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)   # TRL's, on fastrft's head
        if self.refine_coef > 0:
            loss = loss + self._refined_loss(model, inputs)
        return loss

    def _refined_loss(self, model, inputs) -> torch.Tensor:
        """The refiner constraint of the micro-batch: the weighted cross-entropy of its refined rows over DAPO's
        token count (see the module docstring), logged as fastrft/sft_loss."""
        mode = "train" if self.model.training else "eval"
        refined = self._refined_rows(inputs)
        if refined is None:
            loss = torch.zeros((), device=self.accelerator.device)
        else:
            rows, refined_ids, refined_mask, refined_weights = refined
            # A second forward of the step, outside DDP's wrapper: each weight's gradient still reaches DDP's
            # reduction once, summed over both forwards, when backward runs through the first.
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.accelerator.unwrap_model(model), torch.cat([inputs["prompt_ids"][rows], refined_ids], 1),
                torch.cat([inputs["prompt_mask"][rows], refined_mask], 1), refined_ids.size(1))
            items = (inputs["num_items_in_batch"] + inputs["refined_items_in_batch"]).clamp(min=1)
            normalizer = items / self.accelerator.num_processes
            if mode == "train":   # the generation batch, rescaled to one accumulation window, as TRL's dapo does
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss = (refined_weights * -logps).sum() / normalizer
        self._metrics[mode]["fastrft/sft_loss"].append(self.accelerator.gather(loss.detach()).mean().item())
        return loss

    @staticmethod
    def _refined_rows(inputs):
        """(rows [B'], refined_ids, refined_mask, refined_weights [B', R]) of the micro-batch's samples that have a
        refinement, or None when none has (or the refiner is off)."""
        if inputs.get("refined_mask") is None:
            return None
        refined_mask = inputs["refined_mask"]
        rows = refined_mask.any(-1).nonzero().squeeze(-1)
        if rows.numel() == 0:
            return None
        width = int(refined_mask[rows].sum(-1).max())
        return (rows, inputs["refined_ids"][rows, :width], refined_mask[rows, :width],
                inputs["refined_weights"][rows, :width])
