"""The update's batches: rows (a prompt and the tokens the loss reads) in token-budgeted micro-batches, through the
model to its final hidden states, then fastrft's fused loss or log-probs. Every forward of a step goes this way: the
update, the reference log-probs and the old log-probs.

Two layouts; `choose_attention` picks one per run (config `packing`: auto | true | false) and says once which:
  packed   a micro-batch's sequences side by side in one row, position_ids restarting at 0, no padding, through a
           variable-length attention kernel that keeps the sequences apart without a [T, T] mask: flash-attn's varlen
           kernel, or torch's flex_attention with a block mask built from the sequence boundaries (both CUDA;
           transformers finds the boundaries in the position_ids).
  padded   rows sorted by length and cut into micro-batches by the token budget, right-padded, position_ids
           counting on through the padding and no attention mask at all: a right-padded row's real tokens only ever
           attend to real tokens under the causal mask, so plain causal attention is exact for every token the loss
           reads. Attention costs the square of each micro-batch's longest row, never of the whole batch.
Never a dense [T, T] mask over the batch: that is what SDPA makes of a packed row, so packed rows only go to the two
varlen kernels (bench_step.py measures the dense variant as the baseline it replaced).

A micro-batch holds at most `max_tokens` tokens (packed: their sum; padded: rows x longest row, the padding
included), so activation memory is bounded by the budget, not by the step's rollout count; a row longer than the
budget goes alone.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fastrft.loss import IGNORE_INDEX, fused_rft_loss, kl_estimate, token_logprobs

PACKING = ("auto", "true", "false")
FLASH, FLEX, SDPA = "flash_attention_2", "flex_attention", "sdpa"
_NOTED: set[str] = set()


def note_once(message: str) -> None:
    """Options that cannot run on this machine, and choices made for the user, are said once per process."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"fastrft: {message}", file=sys.stderr)


@dataclass
class Row:
    """One sequence of the update: a prompt and the target tokens the loss reads (a sample or a refinement)."""
    prompt_ids: list[int]
    target_ids: list[int]
    advantage: float = 0.0
    pg: bool = False                                   # policy-gradient row (sample) or not (refined row)
    sft_weights: torch.Tensor | None = None            # [len(target_ids)] for refined rows
    old_logprobs: torch.Tensor | None = None           # [len(target_ids)], stored for minibatch updates
    ref_logprobs: torch.Tensor | None = None           # [len(target_ids)], for the KL term

    @property
    def length(self) -> int:
        """Tokens the model reads: the prompt and every target but the last."""
        return len(self.prompt_ids) + len(self.target_ids) - 1

    @property
    def loss_tokens(self) -> int:
        """Targets that count in the loss's default normaliser: all of a policy-gradient row's, the weighted ones of
        a refined row (DAPO's token mean)."""
        if self.pg:
            return len(self.target_ids)
        return 0 if self.sft_weights is None else int(torch.count_nonzero(self.sft_weights))


@dataclass
class Batch:
    input_ids: torch.Tensor       # [1, T] packed, or [B, L] right-padded
    position_ids: torch.Tensor    # same shape: restarting at 0 per sequence (packed), 0..L-1 per row (padded)
    targets: torch.Tensor         # same shape, IGNORE_INDEX off the target positions
    advantages: torch.Tensor
    pg_mask: torch.Tensor
    sft_weights: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    target_slices: list[tuple[int, int, int]]   # per row of the batch: (row of the tensors, start, end)


def build_batch(rows: list[Row], device: torch.device, *, packed: bool, pad_id: int = 0) -> Batch:
    """Sequence i reads prompt + target[:-1]; the hidden state at position len(prompt) - 1 + j predicts target[j].
    packed: all sequences in one row, position_ids restarting at 0; else one right-padded row per sequence, position
    ids 0..L-1 through the padding (no mask needed: see the module docstring)."""
    lengths = [row.length for row in rows]
    width = sum(lengths) if packed else max(lengths)
    shape = (1, width) if packed else (len(rows), width)
    # Flat positions of every token and every target, built as lists and written with one indexed copy per tensor.
    token_at, tokens, target_at, target_ids, slices = [], [], [], [], []
    per_target = {"advantages": [], "pg_mask": []}
    start = 0
    for i, (row, length) in enumerate(zip(rows, lengths)):
        if not packed:
            start = i * width
        token_at.extend(range(start, start + length))
        tokens += row.prompt_ids + row.target_ids[:-1]
        t0 = start + len(row.prompt_ids) - 1
        target_at.extend(range(t0, t0 + len(row.target_ids)))
        target_ids += row.target_ids
        per_target["advantages"] += [row.advantage] * len(row.target_ids)
        per_target["pg_mask"] += [row.pg] * len(row.target_ids)
        b, offset = (0, 0) if packed else (i, start)   # slices index the [rows, width] tensors
        slices.append((b, t0 - offset, t0 - offset + len(row.target_ids)))
        start += length
    token_at, target_at = torch.tensor(token_at), torch.tensor(target_at)

    def scatter(at, values, dtype, fill=0):
        out = torch.full(shape, fill, dtype=dtype)
        out.view(-1)[at] = torch.as_tensor(values, dtype=dtype)
        return out.to(device)

    if packed:
        position_ids = torch.tensor([j for length in lengths for j in range(length)])[None]
    else:
        position_ids = torch.arange(width).repeat(len(rows), 1)
    per_row = {name: torch.cat([torch.zeros(len(row.target_ids)) if getattr(row, name) is None
                                else getattr(row, name).float() for row in rows])
               for name in ("sft_weights", "old_logprobs", "ref_logprobs")}
    return Batch(scatter(token_at, tokens, torch.long, pad_id), position_ids.to(device),
                 scatter(target_at, target_ids, torch.long, IGNORE_INDEX),
                 scatter(target_at, per_target["advantages"], torch.float32),
                 scatter(target_at, per_target["pg_mask"], torch.bool),
                 *(scatter(target_at, per_row[name], torch.float32)
                   for name in ("sft_weights", "old_logprobs", "ref_logprobs")),
                 slices)


def plan_micro_batches(lengths: list[int], max_tokens: int, *, packed: bool) -> list[list[int]]:
    """Indices of the rows of each micro-batch, longest rows first. packed: the lengths of a micro-batch sum to at
    most max_tokens; padded: its rows x its longest row do. A row longer than max_tokens goes alone."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    batches: list[list[int]] = []
    cost = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches:
            current = batches[-1]
            # Sorted longest first, a padded micro-batch's first row sets its width.
            grown = cost + lengths[i] if packed else (len(current) + 1) * lengths[current[0]]
            if grown <= max_tokens:
                current.append(i)
                cost = grown
                continue
        batches.append([i])
        cost = lengths[i]
    return batches


# ----------------------------------------------------------------------------------------------- attention paths

@dataclass(frozen=True)
class AttentionPath:
    """How the step's micro-batches reach attention: the layout, transformers' attention implementation for those
    forwards, and the token budget of one micro-batch."""
    packed: bool
    attn_implementation: str      # for the micro-batches' forwards: FLASH or FLEX when packed, else any
    max_tokens: int

    @property
    def description(self) -> str:
        if not self.packed:
            return f"padded length-bucketed micro-batches through {self.attn_implementation}"
        kernel = {FLASH: "flash-attn's varlen kernel", FLEX: "torch's flex_attention with a block mask"}
        return f"packed micro-batches through {kernel.get(self.attn_implementation, self.attn_implementation)}"


def varlen_attention(model, device: torch.device) -> tuple[str | None, str]:
    """(the variable-length attention implementation packed rows can use with this model here, or None; why).
    flash-attn first, then flex_attention; both need CUDA (flex_attention has no backward on the CPU). Each is
    tried on the model itself, which checks the installation, the GPU and the architecture, then set back."""
    if device.type != "cuda":
        return None, (f"no variable-length attention on {device.type}: flash-attn needs CUDA and torch's "
                      f"flex_attention has no backward there")
    reasons = []
    loaded = model.config._attn_implementation
    for implementation in (FLASH, FLEX):
        try:
            model.set_attn_implementation(implementation)
        except (ValueError, ImportError) as exc:
            reasons.append(f"{implementation}: {str(exc).splitlines()[0]}")
            continue
        usable = model.config._attn_implementation == implementation
        model.set_attn_implementation(loaded)
        if usable:
            return implementation, "; ".join(reasons)
        reasons.append(f"{implementation}: {type(model).__name__} cannot switch its attention implementation")
    return None, "; ".join(reasons)


def choose_attention(packing: str, model, device: torch.device, max_tokens: int) -> AttentionPath:
    """The path of the run's forwards (see the module docstring), said once. packing: "auto" takes a varlen kernel
    where one runs and padded micro-batches elsewhere; "true" asks for packing and says so when it cannot be had;
    "false" is padded."""
    if packing not in PACKING:
        raise ValueError(f"packing must be one of {PACKING}, got {packing!r}")
    varlen, why = varlen_attention(model, device) if packing != "false" else (None, "")
    loaded = model.config._attn_implementation
    if varlen is None:
        # The padded path runs on whatever the model was loaded with, except a packed-only kernel.
        path = AttentionPath(False, loaded if loaded in (FLASH, SDPA) else SDPA, max_tokens)
        if packing == "true":
            note_once(f"packing=true, but {why}: {path.description} instead")
        elif packing == "auto":
            note_once(f"packing=auto: {path.description} ({why})")
        return path
    path = AttentionPath(True, varlen, max_tokens)
    note_once(f"packing={packing}: {path.description}{f' ({why})' if why else ''}")
    return path


@contextmanager
def attention(model, path: AttentionPath):
    """The model's attention set to path's for the block (flex_attention is switched on only for these forwards:
    generation keeps the implementation the model was loaded with)."""
    loaded = model.config._attn_implementation
    if loaded == path.attn_implementation:
        yield
        return
    model.set_attn_implementation(path.attn_implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(loaded)


def micro_batches(rows: list[Row], path: AttentionPath, device: torch.device):
    """(indices into rows, Batch) for each micro-batch of rows."""
    for indices in plan_micro_batches([row.length for row in rows], path.max_tokens, packed=path.packed):
        yield indices, build_batch([rows[i] for i in indices], device, packed=path.packed)


# ----------------------------------------------------------------------------------------------- forwards

def final_hidden(model, batch: Batch) -> torch.Tensor:
    """The model's final hidden states (after the final norm), never its logits."""
    out = model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    return out.last_hidden_state


def lm_head(model):
    return model.get_output_embeddings()


@torch.no_grad()
def sequence_logprobs(model, rows: list[Row], device: torch.device, *, path: AttentionPath,
                      temperature: float) -> list[torch.Tensor]:
    """Per-row log-probs of the target tokens under model (no gradient), in the order of rows: the reference and
    the old log-probs."""
    head = lm_head(model)
    out: list[torch.Tensor | None] = [None] * len(rows)
    with attention(model, path):
        for indices, batch in micro_batches(rows, path, device):
            hidden = final_hidden(model, batch)
            lp = token_logprobs(hidden, head.weight.to(hidden.dtype), batch.targets, temperature=temperature,
                                bias=None if head.bias is None else head.bias.to(hidden.dtype))
            for i, (b, t0, t1) in zip(indices, batch.target_slices):
                out[i] = lp[b, t0:t1].float().cpu()
    return out


def rft_loss(model, batch: Batch, cfg, *, use_old: bool, normalizer: float | None = None):
    """fused_rft_loss on the batch under cfg's coefficients; normalizer: the step's token count when the batch is
    one micro-batch of several (default: the batch's own)."""
    head = lm_head(model)
    hidden = final_hidden(model, batch)
    return fused_rft_loss(
        hidden, head.weight, batch.targets, bias=head.bias, advantages=batch.advantages, pg_mask=batch.pg_mask,
        old_logprobs=batch.old_logprobs if use_old else None,
        ref_logprobs=batch.ref_logprobs if cfg.uses_kl else None, sft_weights=batch.sft_weights,
        clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl_coef=cfg.kl_coef if cfg.uses_kl else 0.0,
        kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef, temperature=cfg.temperature,
        normalizer=normalizer,
    )


def accumulate_gradients(model, rows: list[Row], cfg, path: AttentionPath, device: torch.device, *, use_old: bool,
                         kl_values: list | None = None) -> tuple[dict[str, float], int]:
    """Adds the gradients of one optimizer step's loss over rows to model's .grad, micro-batch by micro-batch: each
    micro-batch's loss is divided by the loss-token count of all the rows (DAPO's token mean over the optimizer
    step), so the sum is the loss of one batch of every row, and activation memory is one micro-batch's. Appends the
    k3 KL to the reference of each policy-gradient token to kl_values when given. Returns the loss terms (loss,
    pg_loss, sft_loss, kl_loss: sums; clip_frac, entropy: means over the policy-gradient tokens) and the number of
    micro-batches."""
    normalizer = float(max(1, sum(row.loss_tokens for row in rows)))
    totals = dict.fromkeys(("loss", "pg_loss", "sft_loss", "kl_loss"), 0.0)
    clipped = pg_token_count = 0.0
    entropies, n_batches = [], 0
    with attention(model, path):
        for _, batch in micro_batches(rows, path, device):
            out = rft_loss(model, batch, cfg, use_old=use_old, normalizer=normalizer)
            out.loss.backward()
            n_batches += 1
            totals["loss"] += float(out.loss.detach())
            for name in ("pg_loss", "sft_loss", "kl_loss"):
                totals[name] += out.metrics[name]
            clipped += out.metrics["clip_frac"] * out.metrics["pg_tokens"]
            pg_token_count += out.metrics["pg_tokens"]
            pg_tokens = batch.pg_mask & (batch.targets != IGNORE_INDEX)
            entropies.append(out.entropy[pg_tokens])
            if kl_values is not None:
                kl_values.append(kl_estimate(out.logprobs[pg_tokens], batch.ref_logprobs[pg_tokens]))
    entropy = torch.cat(entropies)
    return {**totals, "clip_frac": clipped / max(1.0, pg_token_count),
            "entropy": float(entropy.mean()) if entropy.numel() else 0.0}, n_batches
