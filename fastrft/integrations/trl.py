"""FastRFTGRPOTrainer: TRL's GRPOTrainer with its loss computed by fastrft.fused_rft_loss.

Everything but the loss is TRL's own: generation, rewards, advantages, old and reference log-probs, logging and
checkpoints. `compute_loss` runs the policy to its final hidden states (the backbone's last hidden state, after the
final norm, with the LM head applied to one position only) and hands them with the LM head's weight to
fused_rft_loss, which never materialises the [tokens x vocab] logits.

How TRL's GRPO loss (token-level importance sampling) maps onto the contract:
  per-token loss   -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) + beta * k3(ref, logp), r = exp(logp - old)
                   -> clip_low=epsilon, clip_high=epsilon_high, kl_coef=beta, kl_estimator="k3"
  vLLM IS ratio w  TRL multiplies the policy term by w >= 0; -min(r wA, clip(r) wA) = w * -min(rA, clip(r) A), so
                   w is folded into the advantages.
  loss_type        what the masked sum of per-token losses is divided by (G: gradient-accumulation steps in training,
                   1 in evaluation; B: sequences in the micro-batch):
    "grpo"         each sequence's mean, then the mean over sequences: the sequences of completion length L share the
                   normaliser B * L * G, so the loss is one fused call per distinct length in the micro-batch.
    "bnpo"         the micro-batch's token count * G
    "dr_grpo"      B * max_completion_length * G
    "dapo"         num_items_in_batch (tokens of the generation batch over all processes) / processes,
                   times G / steps_per_generation in training
    "luspo"        B * G (each sequence's summed loss, averaged over sequences)
  entropy_coef     TRL subtracts coef * (mean entropy over the micro-batch's tokens) / G; that is fused_rft_loss's
                   entropy term exactly when the normaliser is the token count * G, i.e. for "bnpo" only.
The other options of GRPOConfig that change the loss are not expressible in the contract; the constructor raises a
ValueError naming the option.

The refiner constraint (refine_coef > 0, off by default): once per generation batch, where TRL scores the completions
and computes the old and reference log-probs, fastrft.refiner.refine has the frozen refiner continue
refine_template.format(prompt=..., response=...) greedily, parses the corrected response, diffs it against the sample's
tokens and weights the tokens it changed (refine_coef) and kept (refine_kept_weight). Each refinement travels in the
batch dict beside its sample (refined_ids, refined_mask, refined_weights: [B, R]), so TRL's shuffle and split into
micro-batches keep them together. In compute_loss a refined row is the sample's prompt followed by the refined ids,
run through the same forward as the sample rows (one batch: sample rows and refined rows right-padded to one width);
it carries no policy-gradient term, only the sft weight, in the same fused_rft_loss calls. With R_i the refined
tokens of sample i with a non-zero weight, the refined rows add to TRL's normaliser:
    "grpo"         sequence i's mean is over its L_i sample tokens and its R_i refined tokens (B * (L_i + R_i) * G)
    "bnpo"         the micro-batch's refined tokens (sum_i L_i + R_i) * G; the entropy bonus keeps TRL's own mean over
                   the sample tokens (its coefficient is rescaled to the enlarged normaliser)
    "dr_grpo"      nothing: B * max_completion_length * G, each refined row's weighted sum joins its sequence's sum
    "dapo"         the refined tokens of the generation batch over all processes (refined_items_in_batch)
    "luspo"        nothing: B * G, each refined row's weighted sum joins its sequence's sum
With refine_coef == 0 no refined row exists and every normaliser is TRL's own.
"""
from __future__ import annotations

import inspect
import math
import string
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from fastrft.loss import IGNORE_INDEX, fused_rft_loss, kl_estimate
from fastrft.refiner import refine

try:
    from accelerate.utils import is_peft_model  # accelerate comes with TRL
    from trl import GRPOTrainer
    from trl.trainer.utils import (create_model_from_path, disable_dropout_in_model, get_config_model_id, nanmax,
                                   nanmin, use_adapter)
except ImportError as err:  # the one place TRL is imported: one message whatever is missing
    raise ImportError('FastRFTGRPOTrainer needs TRL: pip install "fastrft[integrations]"') from err

__all__ = ["FastRFTGRPOTrainer", "SUPPORTED_LOSS_TYPES"]

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# Batch fields of vision-language inputs: those models need a forward this trainer does not run.
_MULTIMODAL_FIELDS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                      "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
# Text-config attributes that turn h W^T + b into something else before the softmax (scales, soft-capping).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def _check_config(args) -> None:
    """Raise a ValueError naming each GRPOConfig option whose loss fused_rft_loss cannot express."""
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"loss_type={args.loss_type!r} is not supported by FastRFTGRPOTrainer: its per-token loss is "
                         f"not fastrft's clipped surrogate; use one of {SUPPORTED_LOSS_TYPES}")
    if args.importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level={args.importance_sampling_level!r} is not supported by "
                         "FastRFTGRPOTrainer: fastrft.fused_rft_loss clips per-token ratios; use "
                         "importance_sampling_level='token'")
    # option: (is it set to something the contract cannot express, what it does, the setting that works)
    not_expressible = {
        "delta": (args.delta is not None, "the two-sided clip of the ratio", "None"),
        "top_entropy_quantile": (args.top_entropy_quantile < 1.0, "the high-entropy token mask", "1.0"),
        "off_policy_mask_threshold": (args.off_policy_mask_threshold is not None, "the off-policy sequence mask",
                                      "None"),
        # TRL's default is True: with beta > 0 the KL term is multiplied by the (differentiable) ratio.
        "use_bias_correction_kl": (args.use_bias_correction_kl and args.beta != 0.0,
                                   "the KL term multiplied by the importance ratio, with beta > 0", "False"),
        "use_adaptive_entropy": (args.use_adaptive_entropy, "the adaptive entropy coefficient", "False"),
        "entropy_coef": (args.entropy_coef != 0.0 and args.loss_type != "bnpo",
                         f"an entropy bonus normalised apart from the loss_type={args.loss_type!r} policy term; it is "
                         "expressible with loss_type='bnpo' only", "0.0"),
    }
    for name, (is_set, what, works) in not_expressible.items():
        if is_set:
            raise ValueError(f"GRPOConfig.{name}={getattr(args, name)!r} ({what}) is not supported by "
                             f"FastRFTGRPOTrainer; set {name}={works}")
    if args.beta < 0:
        raise ValueError(f"GRPOConfig.beta must be >= 0 for FastRFTGRPOTrainer (it is fastrft's kl_coef), "
                         f"got {args.beta}")
    if not 0 <= args.epsilon < 1:
        raise ValueError(f"GRPOConfig.epsilon must be in [0, 1) (the ratio is clipped at 1 - epsilon), "
                         f"got {args.epsilon}")
    if args.epsilon_high is not None and args.epsilon_high < 0:
        raise ValueError(f"GRPOConfig.epsilon_high must be >= 0, got {args.epsilon_high}")


def _check_refine_options(refine_coef, refine_template, parse_refinement, refine_kept_weight, refine_context,
                          refine_max_new_tokens, refine_draft) -> None:
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
    if refine_coef == 0:
        return
    if refine_template is None:
        raise ValueError("refine_coef > 0 needs refine_template: the text the refiner continues, a str.format "
                         "template with the fields {prompt} and {response}")
    fields = {name for _, name, _, _ in string.Formatter().parse(refine_template) if name is not None}
    if "response" not in fields or not fields <= {"prompt", "response"}:
        raise ValueError(f"refine_template must be a str.format template whose fields are {{prompt}} (optional) and "
                         f"{{response}}, got the fields {sorted(fields)}")


def _strip_or_none(text: str) -> str | None:
    """The default parse_refinement: the refiner's whole output, stripped; None (a failed refinement) when empty."""
    return text.strip() or None


def _pad_right(x: torch.Tensor, width: int, value) -> torch.Tensor:
    """[n, w] -> [n, width], padded on the right with value."""
    return nn.functional.pad(x, (0, width - x.size(1)), value=value)


def _lm_head(causal_lm: nn.Module) -> nn.Linear:
    head = causal_lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"FastRFTGRPOTrainer needs the LM head to be a plain nn.Linear, got {type(head).__name__}; "
                         "a PEFT adapter on lm_head (target_modules or modules_to_save) is not supported, keep the "
                         "head frozen")
    return head


class FastRFTGRPOTrainer(GRPOTrainer):
    """trl.GRPOTrainer (same constructor) whose loss is fastrft.fused_rft_loss on the policy's final hidden states,
    with fastrft's refiner constraint on top when refine_coef > 0.

    Supported: loss_type in SUPPORTED_LOSS_TYPES with token-level importance sampling, beta >= 0 (k3 KL),
    epsilon/epsilon_high, temperature, num_iterations > 1 (TRL's old log-probs), vLLM importance-sampling correction,
    tool masks, PEFT adapters outside the LM head, entropy_coef with loss_type='bnpo'. Not supported (ValueError at
    construction): the other loss types, sequence-level importance sampling, delta, top_entropy_quantile,
    off_policy_mask_threshold, use_bias_correction_kl with beta > 0 (TRL's default is True: set it False), adaptive
    entropy, MoE router aux loss, vision-language models and models whose logits are scaled or soft-capped.

    Refiner keyword arguments (beyond TRL's):
        refine_coef            sft weight of each token the refiner changed; 0 (default) turns the refiner off and
                               leaves the trainer exactly TRL's loss
        refine_template        str.format template with {prompt} and {response}: the text the refiner continues
                               greedily (required when refine_coef > 0). Chat prompts contribute their last message's
                               content; add any chat formatting the refiner needs to the template itself.
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
    and is refused with tools (it would rewrite tool results) and with sharded weights (DeepSpeed ZeRO-3, FSDP).
    Logged: refine/rate (samples with a refinement that changed something), refine/failed (samples whose refinement
    was too long, unparseable or empty), refine/changed_token_frac (changed tokens / refined tokens),
    refine/passes (the refiner's forward passes) and, with refine_draft, refine/draft_accepted (the share of draft
    tokens accepted) over the generation batch, and fastrft/sft_loss, the refined rows' term of the loss handed to
    backward.
    """

    def __init__(self, *args, refine_coef: float = 0.0, refine_template: str | None = None,
                 parse_refinement: Callable[[str], str | None] | None = None, refine_kept_weight: float = 0.0,
                 refine_context: int = 0, refine_max_new_tokens: int | None = None, refine_draft: bool = True,
                 refiner_model=None, **kwargs):
        # Check the options before TRL loads models: an unsupported option should fail in seconds.
        _check_refine_options(refine_coef, refine_template, parse_refinement, refine_kept_weight, refine_context,
                              refine_max_new_tokens, refine_draft)
        bound = inspect.signature(GRPOTrainer.__init__).bind(None, *args, **kwargs).arguments
        if bound.get("args") is not None:
            _check_config(bound["args"])
        super().__init__(*args, **kwargs)
        _check_config(self.args)
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
        sharded = self.is_fsdp_enabled or (
            self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3)
        if sharded:
            raise ValueError("refine_coef > 0 is not supported with sharded weights (FSDP, DeepSpeed ZeRO-3): the "
                             "refiner generates with the whole model on each process")

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
            refiner_model = create_model_from_path(refiner_model, **init_kwargs)
        if not isinstance(refiner_model, nn.Module) or not hasattr(refiner_model, "generate"):
            raise ValueError(f"refiner_model must be a causal LM (with generate) or a model path, got "
                             f"{type(refiner_model).__name__}")
        refiner_model.requires_grad_(False)
        refiner_model.eval()
        if self.args.disable_dropout:
            disable_dropout_in_model(refiner_model)
        return self.accelerator.prepare_model(refiner_model, evaluation_mode=True)

    def _causal_lm(self, model: nn.Module) -> nn.Module:
        """The transformers model under the DDP/accelerate and PEFT wrappers (PEFT's adapters live inside it)."""
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if is_peft_model(model) else model

    def _check_model(self) -> None:
        causal_lm = self._causal_lm(self.model)
        config = causal_lm.config
        text_config = config.get_text_config()
        if text_config is not config:
            raise ValueError(f"FastRFTGRPOTrainer supports text-only causal LMs; {type(causal_lm).__name__} is a "
                             "multimodal model")
        for name in _LOGIT_TRANSFORMS:
            value = getattr(text_config, name, None)
            if value is not None and value != 1.0:
                raise ValueError(f"the model's config sets {name}={value!r}, which changes the logits beyond "
                                 "hidden @ lm_head.weight.T + bias; fastrft.fused_rft_loss cannot express it")
        if self.aux_loss_enabled:
            raise ValueError("the MoE router load-balancing loss is not supported by FastRFTGRPOTrainer; set "
                             "GRPOConfig.router_aux_loss_coef=0.0")
        _lm_head(causal_lm)

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
        """The refiner model to generate with: the frozen refiner, or the PEFT policy with its adapters disabled."""
        if self.refiner_model is not None:
            yield self.accelerator.unwrap_model(self.refiner_model)
            return
        policy = self.accelerator.unwrap_model(self.model)
        with use_adapter(policy, adapter_name="ref" if "ref" in policy.peft_config else None):
            yield policy

    def _refine(self, prompts: list, completion_ids: list[list[int]]) -> dict:
        """Refinements of this process's samples, one per sample in the batch dict, and the refine/* metrics."""
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        tokenizer = self._tokenizer
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        with self._refiner() as refiner_model:
            result = refine(refiner_model, tokenizer, template=self.refine_template, parse=self.parse_refinement,
                            prompts=prompts, completions=completions, completion_ids=completion_ids,
                            max_new_tokens=self.refine_max_new_tokens, batch_size=len(prompts),
                            changed_weight=self.refine_coef, kept_weight=self.refine_kept_weight,
                            context=self.refine_context, draft=self.refine_draft)
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
        n_refined = sum(r is not None for r in result.refinements)
        draft = result.draft
        local = torch.tensor([n_samples, n_refined, result.failed, result.changed_tokens, result.refined_tokens,
                              int((refined_weights != 0).sum()), result.passes, draft.offered if draft else 0,
                              draft.accepted if draft else 0], device=device)
        total = self.accelerator.reduce(local, reduction="sum").tolist()
        samples = max(1, total[0])
        self._metrics[mode]["refine/rate"].append(total[1] / samples)
        self._metrics[mode]["refine/failed"].append(total[2] / samples)
        self._metrics[mode]["refine/changed_token_frac"].append(total[3] / max(1, total[4]))
        self._metrics[mode]["refine/passes"].append(total[6] / self.accelerator.num_processes)
        if self.refine_draft:
            self._metrics[mode]["refine/draft_accepted"].append(total[8] / max(1, total[7]))
        return {"refined_ids": refined_ids.to(device), "refined_mask": refined_mask.to(device),
                "refined_weights": refined_weights.to(device),
                # the weighted refined tokens of the generation batch over all processes (dapo's normaliser)
                "refined_items_in_batch": torch.tensor(total[5], device=device)}

    # ----------------------------------------------------------------------------------------------------- the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("FastRFTGRPOTrainer does not support returning outputs")
        multimodal = [name for name in _MULTIMODAL_FIELDS if inputs.get(name) is not None]
        if multimodal:
            raise ValueError(f"FastRFTGRPOTrainer runs text-only models, but the batch holds {multimodal}")
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]  # [B, T]
        mask = completion_mask if inputs.get("tool_mask") is None else completion_mask * inputs["tool_mask"]
        mask = mask.bool()
        targets = completion_ids.masked_fill(~mask, IGNORE_INDEX)
        advantages = self._token_advantages(inputs["advantages"], targets.shape)
        pg_advantages = advantages
        if self.use_vllm and self.vllm_importance_sampling_correction:
            pg_advantages = advantages * inputs["importance_sampling_ratio"]
        old_logprobs = inputs.get("old_per_token_logps")
        ref_logprobs = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        entropy_coef = self.entropy_coef if self._entropy_bonus_enabled else 0.0

        n_seq, n_tokens = targets.shape
        tokens_per_seq = mask.sum(-1)  # [B]: what TRL's normalisers count
        refined = self._refined_rows(inputs)
        pg_mask = sft_weights = None
        if refined is not None:
            # Refined rows below the sample rows, both right-padded to one width; row_seq: each row's sample.
            rows, refined_ids, refined_mask, refined_weights = refined
            width = max(n_tokens, refined_ids.size(1))
            refined_targets = refined_ids.masked_fill(refined_weights == 0, IGNORE_INDEX)
            targets = torch.cat([_pad_right(targets, width, IGNORE_INDEX), _pad_right(refined_targets, width,
                                                                                     IGNORE_INDEX)])
            pg_mask = torch.cat([_pad_right(mask, width, False),
                                 torch.zeros(len(rows), width, dtype=torch.bool, device=mask.device)])
            sft_weights = torch.cat([refined_weights.new_zeros(n_seq, width), _pad_right(refined_weights, width, 0)])

            def stack(x):  # [B, T] per-token values of the sample rows -> [B + B', W], 0 on the refined rows
                return None if x is None else _pad_right(torch.cat([x, x.new_zeros(len(rows), n_tokens)]), width, 0)

            pg_advantages, old_logprobs, ref_logprobs = map(stack, (pg_advantages, old_logprobs, ref_logprobs))
            row_seq = torch.cat([torch.arange(n_seq, device=rows.device), rows])
            tokens_per_seq = tokens_per_seq + (inputs["refined_weights"] != 0).sum(-1)
            input_ids = torch.cat([inputs["prompt_ids"], inputs["prompt_ids"][rows]]), torch.cat(
                [_pad_right(completion_ids, width, 0), _pad_right(refined_ids, width, 0)])
            attention_mask = torch.cat([inputs["prompt_mask"], inputs["prompt_mask"][rows]]), torch.cat(
                [_pad_right(completion_mask, width, 0), _pad_right(refined_mask, width, 0)])
        else:
            row_seq = torch.arange(n_seq, device=targets.device)
            input_ids = inputs["prompt_ids"], completion_ids
            attention_mask = inputs["prompt_mask"], completion_mask

        hidden = self._final_hidden_states(model, input_ids, attention_mask)  # [B (+ B'), W, H]
        head = _lm_head(self._causal_lm(model))
        weight, bias = head.weight, head.bias
        if weight.dtype != hidden.dtype:  # an fp32 head (cast_lm_head_to_fp32, or autocast): score in fp32
            hidden, weight = hidden.float(), weight.float()
            bias = None if bias is None else bias.float()
        # One contiguous copy, shared by the calls below (fused_rft_loss would copy a strided view on every call).
        hidden = hidden.to(weight.device).contiguous()

        groups = self._normalized_groups(targets, row_seq, tokens_per_seq, inputs, mode, accumulation)
        if entropy_coef and refined is not None:
            # TRL's bonus is a mean over the sample tokens; the bnpo normaliser now counts refined tokens too.
            entropy_coef *= groups[0][1] / (mask.sum().clamp(min=1).item() * accumulation)
        loss = 0.0
        logprobs = torch.zeros(targets.shape, device=hidden.device)
        entropy = torch.zeros(targets.shape, device=hidden.device)
        summed = defaultdict(float)
        # The loss accumulates in fp32 on its own; autocast would push its matmuls back to low precision.
        with torch.autocast(hidden.device.type, enabled=False):
            for group_targets, normalizer in groups:
                out = fused_rft_loss(
                    hidden, weight, group_targets, bias=bias, advantages=pg_advantages, pg_mask=pg_mask,
                    old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, sft_weights=sft_weights,
                    clip_low=self.epsilon_low, clip_high=self.epsilon_high, kl_coef=self.beta, kl_estimator="k3",
                    entropy_coef=entropy_coef, temperature=self.temperature, normalizer=normalizer,
                    ignore_index=IGNORE_INDEX)
                loss = loss + out.loss
                logprobs += out.logprobs  # the groups' rows are disjoint; each output is 0 off its rows
                entropy += out.entropy
                for name in ("pg_loss", "kl_loss", "sft_loss"):
                    summed[name] += out.metrics[name]
        # The metrics are TRL's, over the sample rows.
        logprobs, entropy = logprobs[:n_seq, :n_tokens], entropy[:n_seq, :n_tokens]
        old_logprobs = None if old_logprobs is None else old_logprobs[:n_seq, :n_tokens]
        ref_logprobs = None if ref_logprobs is None else ref_logprobs[:n_seq, :n_tokens]
        self._log_loss_metrics(mode, accumulation, logprobs, entropy, advantages, old_logprobs, ref_logprobs, mask,
                               summed)
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

    @staticmethod
    def _token_advantages(advantages, shape):
        """TRL's advantages, [B] (one per sequence) or [B, T] (from subclasses), as [B, T]."""
        if advantages.dim() == 1:
            advantages = advantages[:, None]
        if advantages.dim() != 2 or advantages.size(0) != shape[0] or advantages.size(1) not in (1, shape[1]):
            raise ValueError(f"advantages must have shape ({shape[0]},) or {tuple(shape)} (one per sequence or one "
                             f"per completion token), got {tuple(advantages.shape)}")
        return advantages.expand(shape)

    def _final_hidden_states(self, model, input_ids, attention_mask):
        """[B, W, H] hidden states after the final norm at the positions that predict the W completion tokens.
        input_ids, attention_mask: (prompt part [B, P], left-padded; completion part [B, W], right-padded)."""
        n_tokens = input_ids[1].size(1)
        with self.accelerator.autocast():
            # The call goes through every wrapper (DDP, PEFT, TRL's forward patch); logits_to_keep=1 limits the LM
            # head to one position. In transformers' language models hidden_states[-1] is the backbone's
            # last_hidden_state, after the final norm.
            outputs = model(input_ids=torch.cat(input_ids, dim=1), attention_mask=torch.cat(attention_mask, dim=1),
                            output_hidden_states=True, logits_to_keep=1, use_cache=False)
        return outputs.hidden_states[-1][:, -n_tokens - 1:-1]  # position t predicts token t + 1

    def _normalized_groups(self, targets, row_seq, tokens_per_seq, inputs, mode, accumulation):
        """(targets, normalizer) pairs whose fused losses sum to TRL's loss for self.loss_type. row_seq [rows]: the
        sequence of each row of targets; tokens_per_seq [B]: its sample tokens plus its weighted refined tokens."""
        n_seq = tokens_per_seq.size(0)
        if self.loss_type == "grpo":
            lengths = tokens_per_seq.clamp(min=1)  # [B]; TRL clamps empty sequences to 1 as well
            row_lengths = lengths[row_seq]
            return [(targets.masked_fill((row_lengths != length)[:, None], IGNORE_INDEX),
                     float(n_seq * length * accumulation)) for length in lengths.unique().tolist()]
        if self.loss_type == "bnpo":
            normalizer = tokens_per_seq.sum().clamp(min=1).item() * accumulation
        elif self.loss_type == "dr_grpo":
            normalizer = n_seq * self.max_completion_length * accumulation
        elif self.loss_type == "dapo":
            # num_items_in_batch counts the whole generation batch; rescale it to one accumulation window.
            items = torch.as_tensor(inputs["num_items_in_batch"])
            if inputs.get("refined_items_in_batch") is not None:
                items = items + inputs["refined_items_in_batch"]
            normalizer = items.clamp(min=1).item() / self.accelerator.num_processes
            if mode == "train":
                normalizer *= accumulation / self.args.steps_per_generation
        elif self.loss_type == "luspo":
            normalizer = n_seq * accumulation
        else:
            raise ValueError(f"unsupported loss_type {self.loss_type!r}")
        return [(targets, float(normalizer))]

    @torch.no_grad()
    def _log_loss_metrics(self, mode, accumulation, logprobs, entropy, advantages, old_logprobs, ref_logprobs, mask,
                          summed):
        """TRL's loss metrics under TRL's names (dashboards keep working), from fastrft's per-token outputs of the
        sample rows, and fastrft/pg_loss, fastrft/kl_loss (and fastrft/sft_loss with the refiner on): those terms of
        the loss handed to backward (after accumulation scaling)."""
        metrics = self._metrics[mode]

        def global_mean(x):  # mean over the tokens of every process
            local = torch.stack([torch.where(mask, x, 0.0).sum(), mask.sum().float()])
            total, count = self.accelerator.reduce(local, reduction="sum")
            return (total / count.clamp(min=1)).item()

        def per_sequence_mean(x):  # NaN for empty sequences, which nanmin/nanmax skip
            return torch.where(mask, x, 0.0).sum(-1) / mask.sum(-1)

        if ref_logprobs is not None:
            metrics["kl"].append(global_mean(kl_estimate(logprobs, ref_logprobs)))
        metrics["entropy"].append(global_mean(entropy))
        ratio = torch.exp(logprobs - old_logprobs) if old_logprobs is not None else torch.ones_like(logprobs)
        low_clipped = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high_clipped = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"].append(global_mean(low_clipped))
        metrics["clip_ratio/high_mean"].append(global_mean(high_clipped))
        metrics["clip_ratio/region_mean"].append(global_mean(torch.maximum(low_clipped, high_clipped)))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(per_sequence_mean(low_clipped))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(per_sequence_mean(high_clipped))).item())
        device = logprobs.device
        for name in ("pg_loss", "kl_loss") + (("sft_loss",) if self.refine_coef > 0 else ()):
            value = torch.tensor(summed[name], device=device)
            metrics[f"fastrft/{name}"].append(self.accelerator.gather(value).mean().item())
        if self._entropy_bonus_enabled:
            # TRL's policy_loss is the micro-batch's loss before the accumulation scaling.
            policy_loss = torch.tensor((summed["pg_loss"] + summed["kl_loss"]) * accumulation, device=device)
            metrics["policy_loss"].append(self.accelerator.gather(policy_loss).mean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
