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
"""
from __future__ import annotations

import inspect
from collections import defaultdict

import torch
from torch import nn

from fastrft.loss import fused_rft_loss

try:
    from accelerate.utils import is_peft_model  # accelerate comes with TRL
    from trl import GRPOTrainer
    from trl.trainer.utils import nanmax, nanmin
except ImportError as err:  # the one place TRL is imported: one message whatever is missing
    raise ImportError('FastRFTGRPOTrainer needs TRL: pip install "fastrft[integrations]"') from err

__all__ = ["FastRFTGRPOTrainer", "SUPPORTED_LOSS_TYPES"]

IGNORE_INDEX = -100
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


def _lm_head(causal_lm: nn.Module) -> nn.Linear:
    head = causal_lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"FastRFTGRPOTrainer needs the LM head to be a plain nn.Linear, got {type(head).__name__}; "
                         "a PEFT adapter on lm_head (target_modules or modules_to_save) is not supported, keep the "
                         "head frozen")
    return head


class FastRFTGRPOTrainer(GRPOTrainer):
    """trl.GRPOTrainer (same constructor) whose loss is fastrft.fused_rft_loss on the policy's final hidden states.

    Supported: loss_type in SUPPORTED_LOSS_TYPES with token-level importance sampling, beta >= 0 (k3 KL),
    epsilon/epsilon_high, temperature, num_iterations > 1 (TRL's old log-probs), vLLM importance-sampling correction,
    tool masks, PEFT adapters outside the LM head, entropy_coef with loss_type='bnpo'. Not supported (ValueError at
    construction): the other loss types, sequence-level importance sampling, delta, top_entropy_quantile,
    off_policy_mask_threshold, use_bias_correction_kl with beta > 0 (TRL's default is True: set it False), adaptive
    entropy, MoE router aux loss, vision-language models and models whose logits are scaled or soft-capped.
    """

    def __init__(self, *args, **kwargs):
        # Check the config before TRL loads models: an unsupported option should fail in seconds.
        config = inspect.signature(GRPOTrainer.__init__).bind(None, *args, **kwargs).arguments.get("args")
        if config is not None:
            _check_config(config)
        super().__init__(*args, **kwargs)
        _check_config(self.args)
        self._check_model()

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

        hidden = self._final_hidden_states(model, inputs, completion_ids.size(1))  # [B, T, H]
        head = _lm_head(self._causal_lm(model))
        weight, bias = head.weight, head.bias
        if weight.dtype != hidden.dtype:  # an fp32 head (cast_lm_head_to_fp32, or autocast): score in fp32
            hidden, weight = hidden.float(), weight.float()
            bias = None if bias is None else bias.float()
        # One contiguous copy, shared by the calls below (fused_rft_loss would copy a strided view on every call).
        hidden = hidden.to(weight.device).contiguous()

        loss = 0.0
        logprobs = torch.zeros(targets.shape, device=hidden.device)
        entropy = torch.zeros(targets.shape, device=hidden.device)
        summed = defaultdict(float)
        # The loss accumulates in fp32 on its own; autocast would push its matmuls back to low precision.
        with torch.autocast(hidden.device.type, enabled=False):
            for group_targets, normalizer in self._normalized_groups(targets, mask, inputs, mode, accumulation):
                out = fused_rft_loss(
                    hidden, weight, group_targets, bias=bias, advantages=pg_advantages, old_logprobs=old_logprobs,
                    ref_logprobs=ref_logprobs, clip_low=self.epsilon_low, clip_high=self.epsilon_high,
                    kl_coef=self.beta, kl_estimator="k3", entropy_coef=entropy_coef, temperature=self.temperature,
                    normalizer=normalizer, ignore_index=IGNORE_INDEX)
                loss = loss + out.loss
                logprobs += out.logprobs  # the groups' rows are disjoint; each output is 0 off its rows
                entropy += out.entropy
                for name in ("pg_loss", "kl_loss"):
                    summed[name] += out.metrics[name]
        self._log_loss_metrics(mode, accumulation, logprobs, entropy, advantages, old_logprobs, ref_logprobs, mask,
                               summed)
        return loss

    @staticmethod
    def _token_advantages(advantages, shape):
        """TRL's advantages, [B] (one per sequence) or [B, T] (from subclasses), as [B, T]."""
        if advantages.dim() == 1:
            advantages = advantages[:, None]
        if advantages.dim() != 2 or advantages.size(0) != shape[0] or advantages.size(1) not in (1, shape[1]):
            raise ValueError(f"advantages must have shape ({shape[0]},) or {tuple(shape)} (one per sequence or one "
                             f"per completion token), got {tuple(advantages.shape)}")
        return advantages.expand(shape)

    def _final_hidden_states(self, model, inputs, n_tokens):
        """[B, T, H] hidden states after the final norm at the positions that predict the T completion tokens."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with self.accelerator.autocast():
            # The call goes through every wrapper (DDP, PEFT, TRL's forward patch); logits_to_keep=1 limits the LM
            # head to one position. In transformers' language models hidden_states[-1] is the backbone's
            # last_hidden_state, after the final norm.
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                            logits_to_keep=1, use_cache=False)
        return outputs.hidden_states[-1][:, -n_tokens - 1:-1]  # position t predicts token t + 1

    def _normalized_groups(self, targets, mask, inputs, mode, accumulation):
        """(targets, normalizer) pairs whose fused losses sum to TRL's loss for self.loss_type."""
        n_seq = targets.size(0)
        if self.loss_type == "grpo":
            lengths = mask.sum(-1).clamp(min=1)  # [B]; TRL clamps empty sequences to 1 as well
            return [(targets.masked_fill((lengths != length)[:, None], IGNORE_INDEX),
                     float(n_seq * length * accumulation)) for length in lengths.unique().tolist()]
        if self.loss_type == "bnpo":
            normalizer = mask.sum().clamp(min=1).item() * accumulation
        elif self.loss_type == "dr_grpo":
            normalizer = n_seq * self.max_completion_length * accumulation
        elif self.loss_type == "dapo":
            # num_items_in_batch counts the whole generation batch; rescale it to one accumulation window.
            normalizer = torch.as_tensor(inputs["num_items_in_batch"]).clamp(min=1).item()
            normalizer /= self.accelerator.num_processes
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
        """TRL's loss metrics under TRL's names (dashboards keep working), from fastrft's per-token outputs, and
        fastrft/pg_loss, fastrft/kl_loss: those terms of the loss handed to backward (after accumulation scaling)."""
        metrics = self._metrics[mode]

        def global_mean(x):  # mean over the tokens of every process
            local = torch.stack([torch.where(mask, x, 0.0).sum(), mask.sum().float()])
            total, count = self.accelerator.reduce(local, reduction="sum")
            return (total / count.clamp(min=1)).item()

        def per_sequence_mean(x):  # NaN for empty sequences, which nanmin/nanmax skip
            return torch.where(mask, x, 0.0).sum(-1) / mask.sum(-1)

        if ref_logprobs is not None:
            log_ratio = ref_logprobs - logprobs
            metrics["kl"].append(global_mean(torch.exp(log_ratio) - log_ratio - 1))
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
        for name in ("pg_loss", "kl_loss"):
            value = torch.tensor(summed[name], device=device)
            metrics[f"fastrft/{name}"].append(self.accelerator.gather(value).mean().item())
        if self._entropy_bonus_enabled:
            # TRL's policy_loss is the micro-batch's loss before the accumulation scaling.
            policy_loss = torch.tensor((summed["pg_loss"] + summed["kl_loss"]) * accumulation, device=device)
            metrics["policy_loss"].append(self.accelerator.gather(policy_loss).mean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
