"""The fused RFT loss: clipped policy gradient, KL to the reference, entropy bonus and refined-target cross-entropy,
computed from the LM head's inputs without ever materialising the [N, V] logits.

Layers, bottom up:
  * fastrft.kernels.fused_rft   Triton kernels: per-row log-sum-exp, target logit and mean logit, and the gradients
                                of hidden / weight / bias given dL/dlogp and dL/dentropy per row.
  * _ChunkedTorchHead           the same contract in plain PyTorch, row chunk by row chunk (CPU and reference path).
  * fastrft::lm_head_stats      a torch custom op with autograd (whole under torch.compile): (hidden, weight, bias)
                                -> per-row logp and entropy. Its backward visits only rows whose incoming gradient is
                                non-zero, so ignored, clipped and zero-advantage rows cost no gradient work.
  * lm_head_logprobs            the public primitive: validated inputs -> (logprobs, entropy), differentiable, under
                                the model's logit transform (scale, soft-cap) and the temperature.
  * fused_rft_loss              on top of lm_head_logprobs: validates input and writes the row loss of the contract
                                on [N]-sized vectors; autograd turns it into the two per-row scalars the kernel needs.
  * FusedRFTLoss                nn.Module over an LM head (nn.Linear, tied embeddings included).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from fastrft.kernels.utils import check_impl_name, resolve_impl

KL_ESTIMATORS = ("k1", "k2", "k3")
IGNORE_INDEX = -100        # the targets no loss reads (PyTorch's and transformers' convention)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows per chunk of the torch path: about 4M fp32 logits (16 MB) per buffer, two buffers reused across chunks.
_TORCH_CHUNK_ELEMS = 1 << 22
# The log-ratios that exp() takes are held at most here (ratio 4.9e8; verl holds them at 20 too). Past exp's range
# (88.7 in fp32) the ratio would be inf and its gradient inf * 0 = NaN on a finite loss. The clipped branch's
# gradient is zero there for A > 0; for A < 0 the unclipped A * r would be of that size only by accident.
MAX_LOG_RATIO = 20.0


@dataclass
class FusedRFTOutput:
    loss: torch.Tensor        # scalar, differentiable w.r.t. hidden, weight and bias
    logprobs: torch.Tensor    # float32, targets' shape, detached; 0 on ignored rows
    entropy: torch.Tensor     # float32, targets' shape, detached; 0 on ignored rows
    metrics: dict[str, float] = field(default_factory=dict)


class _ChunkedTorchHead:
    """Pure-PyTorch twin of fastrft.kernels.fused_rft: same inputs, outputs and precision (fp32 logits), a chunk of
    rows at a time in two [chunk, V] fp32 buffers allocated once per call and reused by every chunk (fresh
    temporaries per chunk would grow the process's resident memory: the allocator keeps what it frees)."""

    @staticmethod
    def _chunk_rows(vocab_size: int) -> int:
        return max(1, _TORCH_CHUNK_ELEMS // vocab_size)

    @staticmethod
    def _logits_into(out, hidden_rows, weight32, bias, scale, cap):
        torch.matmul(hidden_rows.float(), weight32.T, out=out)
        if bias is not None:
            out += bias.float()
        out.mul_(scale)
        return out.tanh_().mul_(cap) if cap > 0 else out

    @staticmethod
    def fused_rft_forward(hidden, weight, bias, targets, rows, scale, cap):
        if rows.numel() == 0:
            return tuple(hidden.new_empty(0, dtype=torch.float32) for _ in range(4))
        weight32 = weight.float()
        chunk = min(_ChunkedTorchHead._chunk_rows(weight.shape[0]), rows.numel())
        logits_buf = hidden.new_empty((chunk, weight.shape[0]), dtype=torch.float32)
        exp_buf = torch.empty_like(logits_buf)
        at_max_buf = torch.empty_like(logits_buf, dtype=torch.bool)
        stats = []   # per chunk: (row_max, rest, dsum, target_logit), as the kernels define them
        for rows_c in rows.split(chunk):
            m = rows_c.numel()
            gap = _ChunkedTorchHead._logits_into(logits_buf[:m], hidden[rows_c], weight32, bias, scale, cap)
            row_max = gap.amax(1)
            target_logit = gap.gather(1, targets[rows_c, None]).squeeze(1)
            gap.neg_().add_(row_max[:, None])                       # M - z >= 0, over the logits
            at_max = torch.eq(gap, 0, out=at_max_buf[:m])
            e = torch.neg(gap, out=exp_buf[:m]).exp_()
            dsum = gap.mul_(e).sum(1)
            rest = e.masked_fill_(at_max, 0.0).sum(1) + (at_max.sum(1) - 1)   # no 1 + tiny - 1
            stats.append((row_max, rest, dsum, target_logit))
        return tuple(torch.cat(column) for column in zip(*stats))

    @staticmethod
    def fused_rft_backward(hidden, weight, bias, targets, rows, lse, row_max, spread, one_minus_pt, dlogp, dentropy,
                           scale, cap, weight_grad, bias_grad):
        weight32 = weight.float()
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight32) if weight_grad else None
        grad_bias = torch.zeros(weight.shape[0], device=hidden.device, dtype=torch.float32) if bias_grad else None
        chunk = min(_ChunkedTorchHead._chunk_rows(weight.shape[0]), rows.numel())
        if chunk:
            logits_buf = hidden.new_empty((chunk, weight.shape[0]), dtype=torch.float32)
            dlogits_buf = torch.empty_like(logits_buf)
            # dz/da of the soft-capped logits, formed before the entropy term overwrites z (capped models only).
            capped_buf = torch.empty_like(logits_buf) if cap > 0 else None
        for start in range(0, rows.numel(), chunk or 1):
            sl = slice(start, start + chunk)
            rows_c = rows[sl]
            m = rows_c.numel()
            hidden_c = hidden[rows_c].float()
            logits = _ChunkedTorchHead._logits_into(logits_buf[:m], hidden_c, weight32, bias, scale, cap)
            if cap > 0:
                dz_da = torch.div(logits, cap, out=capped_buf[:m]).square_().neg_().add_(1.0).mul_(scale * cap)
            probs = torch.sub(logits, lse[sl, None], out=dlogits_buf[:m]).exp_()
            if dentropy is not None:
                # dH/dz = p ((M - z) - spread), written over the logits, which are not needed after this.
                entropy_term = logits.neg_().add_(row_max[sl, None]).sub_(spread[sl, None]).mul_(probs) \
                    .mul_(dentropy[sl, None])
            dlogits = probs.mul_(-dlogp[sl, None])
            # The target's 1 - p_t from the accurate logp: 1 - p would cancel when p_t is near 1.
            dlogits.scatter_(1, targets[rows_c, None], (dlogp[sl] * one_minus_pt[sl])[:, None])
            if dentropy is not None:
                dlogits += entropy_term
            dlogits = dlogits.mul_(dz_da) if cap > 0 else dlogits.mul_(scale)
            grad_hidden.index_add_(0, rows_c, dlogits @ weight32)
            if weight_grad:
                grad_weight.addmm_(dlogits.T, hidden_c)
            if bias_grad:
                grad_bias += dlogits.sum(0)
        return (
            grad_hidden.to(hidden.dtype),
            grad_weight.to(weight.dtype) if weight_grad else None,
            grad_bias.to(bias.dtype) if bias_grad else None,
        )


def _backend(impl: str):
    if impl == "torch":
        return _ChunkedTorchHead
    from fastrft.kernels import fused_rft

    return fused_rft


@torch.library.custom_op("fastrft::lm_head_stats", mutates_args=())
def _lm_head_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   ignore_index: int, scale: float, cap: float, impl: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [N, H], weight [V, H], bias [V] | None, targets [N]) -> (logp, entropy, lse, row_max, spread), fp32
    [N], 0 on ignored rows (the statistics of fastrft.kernels.fused_rft's docstring, formed so that nothing cancels
    on a peaked row). A custom op, so that torch.compile keeps it whole in its graph; the ignored rows are dropped
    here, inside the op, where a data-dependent shape costs the compiler nothing."""
    _check_targets(targets, weight.shape[0], ignore_index)
    rows = (targets != ignore_index).nonzero().squeeze(1)
    row_max, rest, dsum, target_logit = _backend(impl).fused_rft_forward(hidden, weight, bias, targets, rows, scale,
                                                                         cap)
    log_total = torch.log1p(rest)
    spread = dsum / (1.0 + rest)
    values = ((target_logit - row_max) - log_total, log_total + spread, row_max + log_total, row_max, spread)
    outputs = tuple(torch.zeros(targets.shape, device=hidden.device, dtype=torch.float32) for _ in range(5))
    for output, value in zip(outputs, values):
        output[rows] = value
    return outputs


@_lm_head_stats.register_fake
def _(hidden, weight, bias, targets, ignore_index, scale, cap, impl):
    return tuple(hidden.new_empty(targets.shape, dtype=torch.float32) for _ in range(5))


@torch.library.custom_op("fastrft::lm_head_stats_backward", mutates_args=())
def _lm_head_stats_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            targets: torch.Tensor, logp: torch.Tensor, lse: torch.Tensor, row_max: torch.Tensor,
                            spread: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor,
                            ignore_index: int, scale: float, cap: float, impl: str, weight_grad: bool,
                            bias_grad: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of hidden, weight and bias (empty tensors where not wanted). Only rows whose incoming gradient is
    non-zero are visited: ignored, clipped and zero-coefficient rows cost no gradient work."""
    valid = targets != ignore_index
    has_entropy = bool((grad_entropy != 0).any())
    active = valid & ((grad_logp != 0) | (grad_entropy != 0)) if has_entropy else valid & (grad_logp != 0)
    rows = active.nonzero().squeeze(1)
    grad_hidden, grad_weight, grad_bias = _backend(impl).fused_rft_backward(
        hidden, weight, bias, targets, rows, lse[rows], row_max[rows], spread[rows], -torch.expm1(logp[rows]),
        grad_logp[rows].float(), grad_entropy[rows].float() if has_entropy else None, scale, cap, weight_grad,
        bias_grad)
    # A custom op's outputs may not alias: each absent gradient is its own empty tensor.
    return (grad_hidden, grad_weight if weight_grad else hidden.new_empty(0),
            grad_bias if bias_grad else hidden.new_empty(0))


@_lm_head_stats_backward.register_fake
def _(hidden, weight, bias, targets, logp, lse, row_max, spread, grad_logp, grad_entropy, ignore_index,
      scale, cap, impl, weight_grad, bias_grad):
    return (torch.empty_like(hidden), torch.empty_like(weight) if weight_grad else hidden.new_empty(0),
            torch.empty_like(bias) if bias_grad else hidden.new_empty(0))


def _lm_head_stats_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, scale, cap, impl = inputs
    logp, _, lse, row_max, spread = output
    ctx.save_for_backward(hidden, weight, bias, targets, logp, lse, row_max, spread)
    ctx.ignore_index, ctx.scale, ctx.cap, ctx.impl = ignore_index, scale, cap, impl


def _lm_head_stats_autograd(ctx, grad_logp, grad_entropy, _grad_lse, _grad_row_max, _grad_spread):
    hidden, weight, bias, targets, logp, lse, row_max, spread = ctx.saved_tensors
    grad_logp = grad_logp if grad_logp is not None else torch.zeros_like(lse)
    grad_entropy = grad_entropy if grad_entropy is not None else torch.zeros_like(lse)
    weight_grad = ctx.needs_input_grad[1]
    bias_grad = bias is not None and ctx.needs_input_grad[2]
    grad_hidden, grad_weight, grad_bias = _lm_head_stats_backward(
        hidden, weight, bias, targets, logp, lse, row_max, spread, grad_logp, grad_entropy, ctx.ignore_index,
        ctx.scale, ctx.cap, ctx.impl, weight_grad, bias_grad)
    return (grad_hidden if ctx.needs_input_grad[0] else None, grad_weight if weight_grad else None,
            grad_bias if bias_grad else None, None, None, None, None, None)


_lm_head_stats.register_autograd(_lm_head_stats_autograd, setup_context=_lm_head_stats_setup_context)


def _flatten_inputs(hidden, weight, targets, bias):
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [N, H] or [..., H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be the LM-head weight [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"the LM-head weight is empty: shape {tuple(weight.shape)} (V = {weight.shape[0]} "
                         f"vocabulary rows, H = {weight.shape[1]}); both must be >= 1")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"the LM-head weight is {weight.shape[1]} wide but the hidden size is {hidden.shape[-1]} "
                         f"(weight {tuple(weight.shape)}, hidden {tuple(hidden.shape)}); weight must be [V, H]")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match the leading shape of hidden "
                         f"{tuple(hidden.shape[:-1])} (hidden is {tuple(hidden.shape)})")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"targets must hold integer token ids, got {targets.dtype}")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias ({bias.dtype}, {bias.device}) must match hidden ({hidden.dtype}, {hidden.device})")
        bias = bias.contiguous()
    return hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(), targets.reshape(-1).long(), bias


def _per_row(name, value, targets_shape, n, device, dtype=torch.float32):
    """A per-token input as a flat [N] tensor, or None; detached: gradients flow through the log-probs and the
    entropies only (an old_logprobs still on the policy's graph would cancel the ratio's gradient)."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.shape != targets_shape and value.shape != (n,):
        raise ValueError(f"{name} has shape {tuple(value.shape)} but targets has shape {tuple(targets_shape)}: "
                         f"one value per token is expected")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but hidden is on {device}")
    if dtype == torch.bool:
        if value.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor, got {value.dtype}")
        return value.reshape(-1)
    if not value.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float tensor, got {value.dtype}")
    return value.detach().reshape(-1).to(dtype)


def _check_targets(targets, vocab_size, ignore_index):
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target id {int(targets[i])} at row {i} is outside [0, {vocab_size}) and is not "
                         f"ignore_index ({ignore_index}); {int(bad.sum())} such rows")


def _check_number(name: str, value, *, positive: bool) -> None:
    """A ValueError naming the option unless value is a finite Python int or float, > 0 (positive) or >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a Python number (int or float), got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


def _check_head_options(temperature, logit_scale, softcap, ignore_index) -> None:
    """lm_head_logprobs' options: a ValueError naming the first that cannot work."""
    for name, value in (("temperature", temperature), ("logit_scale", logit_scale)) + (
            (("softcap", softcap),) if softcap is not None else ()):
        _check_number(name, value, positive=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be a Python int (the target id that no loss reads), got "
                         f"{type(ignore_index).__name__} {ignore_index!r}")


def _check_loss_options(*, clip_low, clip_high, kl_coef, kl_estimator, entropy_coef, normalizer, temperature,
                        logit_scale, softcap, ignore_index, impl) -> None:
    """fused_rft_loss's options other than the tensors (FusedRFTLoss's defaults too, at construction): a ValueError
    naming the first that cannot work."""
    _check_head_options(temperature, logit_scale, softcap, ignore_index)
    check_impl_name(impl)   # whether it runs on the tensors' device: resolve_impl, at the call
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; expected one of {KL_ESTIMATORS}")
    for name, v in (("clip_low", clip_low), ("clip_high", clip_high), ("kl_coef", kl_coef),
                    ("entropy_coef", entropy_coef)):
        _check_number(name, v, positive=False)
    if clip_low >= 1:
        raise ValueError(f"clip_low must be < 1 (the ratio is clipped at 1 - clip_low), got {clip_low}")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or normalizer.dtype == torch.bool or normalizer.is_complex():
            raise ValueError(f"normalizer must be a number or a one-element real tensor, got a {normalizer.dtype} "
                             f"tensor of shape {tuple(normalizer.shape)}")
        if not torch.compiler.is_compiling():   # a value check would break a compiled graph
            _check_normalizer_value(float(normalizer.detach()))
    elif normalizer is not None:
        if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
            raise ValueError(f"normalizer must be a number or a one-element tensor, got {type(normalizer).__name__}")
        _check_normalizer_value(normalizer)


def _check_normalizer_value(value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"normalizer must be a finite number > 0, got {value}")


def kl_estimate(logp, ref, estimator="k3"):
    """Per-token KL of the policy (logp) to the reference (ref) by estimator k1, k2 or k3 (k3's exponent held at
    MAX_LOG_RATIO)."""
    if estimator == "k1":
        return logp - ref
    if estimator == "k2":
        return 0.5 * (logp - ref) ** 2
    log_ratio = ref - logp
    return torch.exp(log_ratio.clamp(max=MAX_LOG_RATIO)) - log_ratio - 1


def _kernel_scales(temperature, logit_scale, softcap) -> tuple[float, float]:
    """The kernels' (scale, cap) for logits z = softcap * tanh(logit_scale * a / softcap) / temperature, or
    logit_scale * a / temperature without soft-capping (cap 0), a = hidden @ weight.T + bias."""
    if softcap is None:
        return logit_scale / temperature, 0.0
    return logit_scale / softcap, softcap / temperature


def lm_head_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, logit_scale=1.0, softcap=None,
                     ignore_index=IGNORE_INDEX, impl=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, entropy) of the LM head's next-token distribution, per token, without materialising the logits:
    with z = logit_scale * (hidden @ weight.T + bias), soft-capped to softcap * tanh(z / softcap) when softcap is
    given (Gemma 2), p = softmax(z / temperature), logprobs = log p[targets] and entropy = -sum p log p. Both float32
    of targets' shape, 0 on ignored rows (targets == ignore_index), and differentiable with respect to hidden,
    weight and bias: a backward visits only the rows whose incoming gradient is non-zero. model_logit_transform(model)
    gives a transformers model's logit_scale and softcap. impl: "triton" (default on CUDA) or "torch" (chunked
    PyTorch, default on CPU)."""
    hidden2d, weight, targets_flat, bias = _flatten_inputs(hidden, weight, targets, bias)
    _check_head_options(temperature, logit_scale, softcap, ignore_index)
    scale, cap = _kernel_scales(temperature, logit_scale, softcap)
    impl = resolve_impl(impl, hidden2d.device)
    logp, entropy = _lm_head_stats(hidden2d, weight, bias, targets_flat, ignore_index, scale, cap, impl)[:2]
    return logp.view(targets.shape), entropy.view(targets.shape)


def token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, logit_scale=1.0, softcap=None,
                   ignore_index=IGNORE_INDEX, impl=None):
    """lm_head_logprobs' log-probs alone, without gradient."""
    with torch.no_grad():
        return lm_head_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, logit_scale=logit_scale,
                                softcap=softcap, ignore_index=ignore_index, impl=impl)[0]


def model_logit_transform(model) -> dict:
    """{"logit_scale": s, "softcap": c or None}: how a transformers model's forward turns its LM head's output
    into logits, read from its (text) config, for lm_head_logprobs, fused_rft_loss and FusedRFTLoss. Cohere and
    Cohere 2 multiply by logit_scale, Falcon-H1 by lm_head_multiplier, others by output_multiplier; Granite and
    MiniCPM3 divide by logits_scaling (HyperCLOVA X multiplies by it); Gemma 2 and 3 soft-cap at
    final_logit_softcapping."""
    config = getattr(model, "config", model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = next((getattr(text, name) for name in ("logit_scale", "output_multiplier", "lm_head_multiplier")
                  if getattr(text, name, None) is not None), None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scaling = text.logits_scaling
        scale = scaling if getattr(text, "model_type", None) == "hyperclovax" else 1.0 / scaling
    return {"logit_scale": 1.0 if scale is None else float(scale),
            "softcap": getattr(text, "final_logit_softcapping", None)}


def beyond_causal(model) -> str | None:
    """What in the model's attention goes beyond a causal mask (a sliding window, attention chunks, layers of other
    kinds), which a mask or cache made for causal attention alone would miss; None for plain causal attention."""
    config = getattr(model, "config", model)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(config, "layer_types", None)
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False \
            and (layer_types is None or "sliding_attention" in layer_types):
        return f"a sliding attention window of {config.sliding_window}"
    if getattr(config, "attention_chunk_size", None):
        return f"attention chunks of {config.attention_chunk_size}"
    other = sorted(set(layer_types or ()) - {"full_attention", "sliding_attention"})
    return f"layers of type {', '.join(other)}" if other else None


def fused_rft_loss(
    hidden, weight, targets, *, bias=None, advantages=None, pg_mask=None, old_logprobs=None, ref_logprobs=None,
    sft_weights=None, clip_low=0.2, clip_high=0.28, kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0,
    temperature=1.0, logit_scale=1.0, softcap=None, normalizer=None, ignore_index=IGNORE_INDEX, impl=None,
) -> FusedRFTOutput:
    """Clipped policy gradient + KL + entropy bonus on policy-gradient rows, plus weighted cross-entropy on
    refined rows, straight from the LM head's inputs.

    Row i's loss is
        pg_i * (-min(r_i A_i, clip(r_i, 1 - clip_low, 1 + clip_high) A_i) + kl_coef KL_i - entropy_coef H_i)
        + w_i * (-logp_i)
    with r_i = exp(logp_i - old_i) (1 when old_logprobs is None: on-policy, gradient -A_i), KL_i the k1/k2/k3
    estimator of logp_i against ref_i, H_i the entropy of row i (logp_i and H_i from lm_head_logprobs, under the
    same temperature, logit_scale and softcap), and loss = sum_i loss_i / normalizer. The default
    normalizer counts the non-ignored rows with a policy-gradient term or a non-zero sft weight (DAPO's token mean).

    hidden [..., H] and weight [V, H] share a dtype (fp32/bf16/fp16); targets [...] are int64 ids; per-token inputs
    (advantages, pg_mask, old_logprobs, ref_logprobs, sft_weights) have targets' shape or [N]. pg_mask defaults to
    every non-ignored row when advantages are given. impl: "triton" (default on CUDA) or "torch" (chunked PyTorch,
    default on CPU). Returns FusedRFTOutput(loss, logprobs, entropy, metrics); under torch.compile the metrics are
    0-dim tensors instead of floats, so that reading them does not break the graph.
    """
    hidden2d, weight, targets_flat, bias = _flatten_inputs(hidden, weight, targets, bias)
    _check_loss_options(clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef, kl_estimator=kl_estimator,
                        entropy_coef=entropy_coef, normalizer=normalizer, temperature=temperature,
                        logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index, impl=impl)
    n, device = targets_flat.numel(), hidden2d.device
    per_row = {name: _per_row(name, value, targets.shape, n, device, dtype)
               for name, value, dtype in (("advantages", advantages, torch.float32),
                                          ("pg_mask", pg_mask, torch.bool),
                                          ("old_logprobs", old_logprobs, torch.float32),
                                          ("ref_logprobs", ref_logprobs, torch.float32),
                                          ("sft_weights", sft_weights, torch.float32))}
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (the reference model's log-probs of the targets)")
    if (kl_coef > 0 or entropy_coef > 0) and advantages is None and pg_mask is None:
        raise ValueError("kl_coef and entropy_coef act on policy-gradient rows, but neither advantages nor pg_mask "
                         "was given")

    logp, entropy = lm_head_logprobs(hidden2d, weight, targets_flat, bias=bias, temperature=temperature,
                                     logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index, impl=impl)

    valid = targets_flat != ignore_index
    zeros = torch.zeros_like(logp)
    pg_rows = valid & (per_row["pg_mask"] if pg_mask is not None else torch.full_like(valid, advantages is not None))
    pg = pg_rows.float()
    sft_w = torch.where(valid, per_row["sft_weights"], 0.0) if sft_weights is not None else zeros
    # Rows off the policy gradient see advantage 0 and old = ref = logp: their padding values, however extreme,
    # can then put neither inf nor NaN into the loss or its gradient.
    adv = torch.where(pg_rows, per_row["advantages"], 0.0) if advantages is not None else zeros
    detached = logp.detach()   # on-policy, old = logp detached: the ratio is 1 and its gradient flows through logp
    old = torch.where(pg_rows, per_row["old_logprobs"], detached) if old_logprobs is not None else detached
    ratio = torch.exp((logp - old).clamp(max=MAX_LOG_RATIO))
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    pg_terms = -torch.minimum(unclipped, clipped)
    if ref_logprobs is not None:
        kl_terms = kl_estimate(logp, torch.where(pg_rows, per_row["ref_logprobs"], detached), kl_estimator)
    else:
        kl_terms = zeros
    row_loss = pg * (pg_terms + kl_coef * kl_terms) - sft_w * logp
    if entropy_coef > 0:
        row_loss = row_loss - pg * entropy_coef * entropy

    if normalizer is None:
        normalizer = (pg_rows | (sft_w != 0)).sum().clamp(min=1).float()
    elif isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.detach().reshape(()).to(device=device, dtype=torch.float32)
    loss = row_loss.sum() / normalizer

    with torch.no_grad():
        n_pg = pg.sum().clamp(min=1)
        stats = torch.stack([
            (pg * pg_terms).sum() / normalizer,
            (sft_w * -logp).sum() / normalizer,
            (pg * kl_terms).sum() / n_pg,
            kl_coef * (pg * kl_terms).sum() / normalizer,
            (pg * (clipped < unclipped).float()).sum() / n_pg,
            entropy.sum() / valid.sum().clamp(min=1),
            torch.as_tensor(normalizer, dtype=torch.float32, device=device),
            pg.sum(),
            (sft_w != 0).sum().float(),
        ])
    names = ("pg_loss", "sft_loss", "kl", "kl_loss", "clip_frac", "entropy", "normalizer", "pg_tokens", "sft_tokens")
    metrics = dict(zip(names, stats.unbind() if torch.compiler.is_compiling() else stats.tolist()))
    return FusedRFTOutput(loss, detached.view(targets.shape), entropy.detach().view(targets.shape), metrics)


def check_module_options(options: dict, module: str, *, own: tuple[str, ...] = ()) -> None:
    """The loss options given a module that computes fused_rft_loss over an LM head of its own (FusedRFTLoss,
    CausalLMWithFusedLoss), at construction or in a call: fused_rft_loss's keyword arguments but bias and the
    module's `own` (options it reads from the model)."""
    unknown = set(options) - set(fused_rft_loss.__kwdefaults__)
    if unknown:
        raise ValueError(f"unknown fused_rft_loss options: {sorted(unknown)}")
    if "bias" in options:
        raise ValueError(f"bias is not an option of {module}: it reads the bias of its LM head (lm_head.bias)")
    given = [name for name in own if name in options]
    if given:
        raise ValueError(f"{given[0]} is not an option of {module}: it reads the model's logit transform itself "
                         f"(fastrft.model_logit_transform)")


def check_plain_head(head: nn.Module, where: str) -> None:
    """A ValueError where the LM head computes more than hidden @ weight.T (+ bias), which is all the fused loss
    reads of it: a PEFT adapter on the head (lm_head among LoRA's target_modules), whose weight is the base layer's,
    would neither count nor train."""
    if hasattr(head, "base_layer"):
        raise ValueError(f"{where}: the LM head is a {type(head).__name__}, a PEFT adapter on it: the fused loss reads "
                         f"only its base weight, so the adapter would neither count nor train; leave the head out of "
                         f"the adapters' target modules (modules_to_save=['lm_head'] trains it whole, and works)")


class FusedRFTLoss(nn.Module):
    """fused_rft_loss over an LM head: ``FusedRFTLoss(model.lm_head, clip_high=0.28)(hidden, targets, advantages=A)``.

    The head is any module with a [V, H] ``weight`` (and optional ``bias``): an nn.Linear, tied to the input
    embedding or not. Keyword arguments given at construction are defaults for every call; a frozen head
    (requires_grad=False, as under LoRA) costs no weight-gradient work. With sharded weights (FSDP2) the head must be
    read inside the forward of the module the engine gathers it for: use fastrft.CausalLMWithFusedLoss as the root."""

    def __init__(self, lm_head: nn.Module, **defaults):
        super().__init__()
        if not isinstance(getattr(lm_head, "weight", None), torch.Tensor) or lm_head.weight.dim() != 2:
            raise ValueError("lm_head must be a module with a [V, H] weight, such as nn.Linear")
        check_module_options(defaults, "FusedRFTLoss")
        check_plain_head(lm_head, "FusedRFTLoss")
        options = {**fused_rft_loss.__kwdefaults__, **defaults}
        _check_loss_options(**{name: options[name] for name in inspect.signature(_check_loss_options).parameters})
        self.lm_head = lm_head
        self.defaults = defaults

    def forward(self, hidden, targets, **kwargs) -> FusedRFTOutput:
        check_module_options(kwargs, "FusedRFTLoss")
        options = {**self.defaults, **kwargs}
        return fused_rft_loss(hidden, self.lm_head.weight, targets, bias=getattr(self.lm_head, "bias", None),
                              **options)
