"""The update's batches: rows (a prompt and the tokens the loss reads) in token-budgeted micro-batches, through the
model to its final hidden states, then fastrft's fused loss or log-probs. Every forward of a step goes this way: the
update, the reference log-probs and the old log-probs.

Two layouts; `choose_attention` picks one per run (config `packing`: auto | true | false) and says once which:
  packed   a micro-batch's sequences side by side in one row, position_ids restarting at 0, no padding, through a
           variable-length attention kernel that keeps the sequences apart without a [T, T] mask: flash-attn's varlen
           kernel, or torch's flex_attention with a block mask built from the sequence boundaries (both CUDA;
           transformers finds the boundaries in the position_ids).
  padded   rows sorted by length and cut into micro-batches by the token budget, right-padded, position_ids
           counting on through the padding and no attention mask (but for branches, below): a right-padded row's
           real tokens only ever attend to real tokens under the causal mask, so plain causal attention is exact
           for every token the loss reads. Attention costs the square of each micro-batch's longest row, never of
           the whole batch.
Never a dense [T, T] mask over the batch: that is what SDPA makes of a packed row, so packed rows only go to the two
varlen kernels (bench_step.py measures the dense variant as the baseline it replaced).

Tree rows, on the padded path where the model's attention takes a custom mask and is plain causal (SDPA or eager:
`tree_mask_blocker`), under a per-row [L, L] tree mask, so that shared tokens go through the model once and padding
is filled:
  - a refinement shares its sample's prompt and the targets before its first change: it rides in its sample's row
    as a branch (`Branch`) after the sample's tokens, seeing only the shared prefix and itself (`with_refinements`);
    elsewhere it is a row of its own;
  - a GRPO group's samples share their prompt: adjacent rows of one prompt share one row, the prompt once, each
    sample after it seeing the prompt and itself, where that costs less than rows apart (`prompt_stacks`: the tokens
    saved against the longer row's attention, by the model's FLOPs);
  - such stacks of rows (or rows alone) fill the padding of a micro-batch's rows: several side by side in one
    tensor row, positions restarting at each, each seeing only itself, where that costs less (`plan_lanes`).
The loss, gradients and log-probs are those of every sequence in a row of its own.

A micro-batch holds at most `max_tokens` tokens (packed: their sum; padded: rows x longest row, the padding
included), so activation memory is bounded by the budget, not by the step's rollout count; a row longer than the
budget goes alone.
"""
from __future__ import annotations

import bisect
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from fastrft.distributed import SINGLE, World, gradient_sync, launched_rank
from fastrft.loss import (IGNORE_INDEX, FusedRFTOutput, beyond_causal, check_module_options, check_plain_head,
                          fused_rft_loss, kl_estimate, model_logit_transform, token_logprobs)
from fastrft.rollout import eval_mode, first_occurrences

PACKING = ("auto", "true", "false")
FLASH, FLEX, SDPA, EAGER = "flash_attention_2", "flex_attention", "sdpa", "eager"
TREE_MASK_ATTENTION = (SDPA, EAGER)   # the implementations that take a custom [B, 1, L, L] mask
_NOTED: set[str] = set()


def note_once(message: str) -> None:
    """Options that cannot run on this machine, and choices made for the user, are said once per job: once per
    process, by rank 0 alone under torchrun (the ranks make the same choices)."""
    if message not in _NOTED:
        _NOTED.add(message)
        if launched_rank() == 0:
            print(f"fastrft: {message}", file=sys.stderr)


@dataclass
class Branch:
    """A refinement read in its sample's row: it shares the row's prompt and first `at` targets; its targets from
    there on (target_ids, weighted by sft_weights) follow the row's tokens, and attend only to the shared prefix and
    to each other."""
    at: int
    target_ids: list[int]
    sft_weights: torch.Tensor


@dataclass
class Row:
    """One sequence of the update: a prompt and the target tokens the loss reads (a sample or a refinement), and
    perhaps its refinement as a branch (see with_refinements)."""
    prompt_ids: list[int]
    target_ids: list[int]
    advantage: float = 0.0
    pg: bool = False                                   # policy-gradient row (sample) or not (refined row)
    sft_weights: torch.Tensor | None = None            # [len(target_ids)]: a refined row's, or a branch's shared part
    old_logprobs: torch.Tensor | None = None           # [len(target_ids)], stored for minibatch updates
    ref_logprobs: torch.Tensor | None = None           # [len(target_ids)], for the KL term
    branch: Branch | None = None

    @property
    def length(self) -> int:
        """Tokens the model reads: the prompt, every target but the last, and the branch's tokens."""
        return len(self.prompt_ids) + len(self.target_ids) - 1 + (len(self.branch.target_ids) if self.branch else 0)

    @property
    def loss_tokens(self) -> int:
        """Targets that count in the loss's default normaliser (DAPO's token mean): all of a policy-gradient row's,
        and every weighted one (a refined row's; a branch's, in its shared part and its own)."""
        weighted = [w for w in (self.sft_weights, self.branch and self.branch.sft_weights) if w is not None]
        return (len(self.target_ids) if self.pg else 0) + sum(int(torch.count_nonzero(w)) for w in weighted)


@dataclass
class Batch:
    input_ids: torch.Tensor       # [1, T] packed, or [B, L] right-padded
    position_ids: torch.Tensor    # same shape: restarting at 0 per sequence (packed), 0..L-1 per row (padded;
                                  # a branch's restart at its fork)
    targets: torch.Tensor         # same shape, IGNORE_INDEX off the target positions
    advantages: torch.Tensor
    pg_mask: torch.Tensor
    sft_weights: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    target_slices: list[tuple[int, int, int]]   # per row of the batch: (row of the tensors, start, end), no branch
    attention_mask: torch.Tensor | None = None  # [B, 1, L, L] bool (True: attends) where rows branch, else None

    @property
    def loss_tokens(self) -> int:
        """Its rows' Row.loss_tokens: policy-gradient targets and weighted ones, a token that is both counted twice
        (as in rows apart)."""
        return int(self.pg_mask.sum() + (self.sft_weights != 0).sum())


def stack_length(rows: list[Row], stack: list[int]) -> int:
    """Tokens of the tensor row that holds rows[stack] (one prompt): the prompt once, each row's own tokens after it."""
    shared = len(rows[stack[0]].prompt_ids) - 1
    return shared + sum(rows[i].length - shared for i in stack)


def build_batch(rows: list[Row], device: torch.device, *, packed: bool, pad_id: int = 0,
                stacks: list[list[int]] | None = None, lanes: list[list[int]] | None = None) -> Batch:
    """Sequence i reads prompt + target[:-1]; the hidden state at position len(prompt) - 1 + j predicts target[j].
    packed: all sequences in one row, position_ids restarting at 0; else one right-padded row per sequence, position
    ids 0..L-1 through the padding (no mask needed for a row alone: see the module docstring).

    Tree rows (padded only), under a per-row tree mask: stacks (indices into rows; default each row alone) puts rows
    of one prompt in one tensor row, the prompt but its last token once, then each row's segment, its prompt's last
    token and its targets but the last, at the positions they would have alone, seeing the prompt and itself only.
    A row's branch follows its segment: the segment's token at the position that predicts target `at` again, then
    the branch's targets but the last, seeing the prompt and the segment before that position. lanes (indices into
    stacks; default each stack alone) puts several stacks side by side in one tensor row, each seeing only itself."""
    stacks = [[i] for i in range(len(rows))] if stacks is None else stacks
    lanes = [[k] for k in range(len(stacks))] if lanes is None else lanes
    if packed and (any(row.branch for row in rows) or any(len(group) > 1 for group in stacks + lanes)):
        raise ValueError("rows sharing a prompt or a tensor row, or with a branch, need the padded layout (their tree "
                         "mask is per row)")
    lengths = [stack_length(rows, stack) for stack in stacks]
    lane_lengths = [sum(lengths[k] for k in lane) for lane in lanes]
    width = sum(lane_lengths) if packed else max(lane_lengths)
    shape = (1, width) if packed else (len(lanes), width)
    # Flat positions of every token and every target, built as lists and written with one indexed copy per tensor.
    token_at, tokens, positions, target_at, target_ids, masked_keys = [], [], [], [], [], []
    slices: list = [None] * len(rows)
    per_target = {"advantages": [], "pg_mask": [], "sft_weights": [], "old_logprobs": [], "ref_logprobs": []}

    def add_tokens(at: int, ids: list[int], first_position: int) -> None:
        token_at.extend(range(at, at + len(ids)))
        tokens.extend(ids)
        positions.extend(range(first_position, first_position + len(ids)))

    def add_targets(at: int, ids: list[int], advantage: float, pg: bool, **values) -> None:
        target_at.extend(range(at, at + len(ids)))
        target_ids.extend(ids)
        per_target["advantages"] += [advantage] * len(ids)
        per_target["pg_mask"] += [pg] * len(ids)
        for name, value in values.items():
            per_target[name].append(torch.zeros(len(ids)) if value is None else value.float())

    def mask_keys(b: int, queries: tuple[int, int], keys: tuple[int, int]) -> None:
        if keys[1] > keys[0]:
            masked_keys.append((b, *queries, *keys))

    start = 0
    for b, k in ((b, k) for b, lane in enumerate(lanes) for k in lane):
        stack = stacks[k]
        row_b, offset = (0, 0) if packed else (b, b * width)   # slices and masks index the [rows, width] tensors
        if not packed:
            start = offset if k == lanes[b][0] else start
            mask_keys(row_b, (start - offset, start - offset + lengths[k]), (0, start - offset))   # its lane's others
        prompt = rows[stack[0]].prompt_ids
        shared = len(prompt) - 1
        add_tokens(start, prompt[:-1], 0)
        column = start + shared
        others = start - offset + shared   # where the segments start in the tensor row
        for i in stack:
            row = rows[i]
            if row.prompt_ids != prompt:
                raise ValueError("the rows of a stack share one prompt")
            segment, n = column, len(row.target_ids)
            add_tokens(segment, prompt[-1:] + row.target_ids[:-1], shared)
            add_targets(segment, row.target_ids, row.advantage, row.pg, sft_weights=row.sft_weights,
                        old_logprobs=row.old_logprobs, ref_logprobs=row.ref_logprobs)
            slices[i] = (row_b, segment - offset, segment - offset + n)
            mask_keys(row_b, (segment - offset, segment - offset + n), (others, segment - offset))   # the others'
            column += n
            if row.branch is not None:
                at, m = row.branch.at, len(row.branch.target_ids)
                add_tokens(column, [(prompt[-1:] + row.target_ids)[at]] + row.branch.target_ids[:-1], shared + at)
                add_targets(column, row.branch.target_ids, 0.0, False, sft_weights=row.branch.sft_weights,
                            old_logprobs=None, ref_logprobs=None)
                queries = (column - offset, column - offset + m)
                mask_keys(row_b, queries, (others, segment - offset))
                mask_keys(row_b, queries, (segment - offset + at, column - offset))   # its sample from the fork on
                column += m
        start += lengths[k]
    token_at, target_at = torch.tensor(token_at), torch.tensor(target_at)

    def scatter(at, values, dtype, fill=0, base=None):
        out = torch.full(shape, fill, dtype=dtype) if base is None else base
        out.view(-1)[at] = torch.as_tensor(values, dtype=dtype)
        return out.to(device)

    attention_mask = None
    if masked_keys:   # causal, minus what each segment must not see; padding attends causally (no all-masked row)
        attention_mask = torch.ones(width, width, dtype=torch.bool).tril().repeat(len(lanes), 1, 1)
        for b, q0, q1, k0, k1 in masked_keys:
            attention_mask[b, q0:q1, k0:k1] = False
        attention_mask = attention_mask[:, None].to(device)
    return Batch(scatter(token_at, tokens, torch.long, pad_id),
                 scatter(token_at, positions, torch.long, base=torch.arange(width).repeat(shape[0], 1)),
                 scatter(target_at, target_ids, torch.long, IGNORE_INDEX),
                 scatter(target_at, per_target["advantages"], torch.float32),
                 scatter(target_at, per_target["pg_mask"], torch.bool),
                 *(scatter(target_at, torch.cat(per_target[name]), torch.float32)
                   for name in ("sft_weights", "old_logprobs", "ref_logprobs")),
                 slices, attention_mask)


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
    branches: bool = False        # refinements ride in their samples' rows (padded, SDPA or eager, full attention)
    pair_cost: float | None = None   # rows of one prompt share a row where it costs less (see prompt_stacks)

    def __post_init__(self):
        if self.branches and (self.packed or self.attn_implementation not in TREE_MASK_ATTENTION):
            raise ValueError(f"branches need padded rows through {' or '.join(TREE_MASK_ATTENTION)}, not "
                             f"{'packed' if self.packed else 'padded'} rows through {self.attn_implementation}")
        if self.pair_cost is not None and not (self.branches and self.pair_cost >= 0):
            raise ValueError(f"pair_cost (rows sharing their prompt) needs branches and a cost >= 0, got "
                             f"branches={self.branches}, pair_cost={self.pair_cost}")

    @property
    def description(self) -> str:
        if not self.packed:
            shared = (", a prompt's samples and their refinements sharing rows" if self.pair_cost is not None else
                      ", refinements sharing their samples' rows" if self.branches else "")
            return f"padded length-bucketed micro-batches through {self.attn_implementation}{shared}"
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


def tree_mask_blocker(model) -> str | None:
    """Why the model cannot take refinements as branches (a [B, 1, L, L] mask given to its forward), or None: its
    attention goes beyond a causal mask; its attention is not transformers' pluggable kind, which reads such a mask
    as it is (ALiBi models build biases from a [B, L] mask, recurrent ones ignore it); its router loss reads a
    [B, L] mask."""
    reason = beyond_causal(model)
    if reason is not None:
        return reason
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__}'s attention does not take a custom mask"
    config = model.config.get_text_config()
    if hasattr(config, "output_router_logits"):
        return "its router loss reads a [batch, length] mask"
    return None


def attention_pair_cost(model) -> float:
    """The FLOPs of attending one query to one key (every layer, every head) over the matmul FLOPs of one token
    through the model's layers (its parameters but the embeddings and the LM head): how much a longer row's
    attention costs against the tokens a shared prompt saves."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    embeddings = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), lm_head(model))}
    matmul_params = sum(p.numel() for p in model.parameters()) - sum(embeddings.values())
    return 2 * config.num_hidden_layers * heads * head_dim / max(1, matmul_params)


def choose_attention(packing: str, model, device: torch.device, max_tokens: int, *,
                     reference=None) -> AttentionPath:
    """The path of the run's forwards (see the module docstring), said once. packing: "auto" takes a varlen kernel
    where one runs and padded micro-batches elsewhere; "true" asks for packing and says so when it cannot be had;
    "false" is padded. Tree rows only where model and reference (a separate model whose forwards take the path too)
    both take their mask."""
    if packing not in PACKING:
        raise ValueError(f"packing must be one of {PACKING}, got {packing!r}")
    varlen, why = varlen_attention(model, device) if packing != "false" else (None, "")
    loaded = model.config._attn_implementation
    if varlen is None:
        # The padded path runs on whatever the model was loaded with, except a packed-only kernel; eager attention
        # becomes SDPA where the architecture has it (Gemma 2 and GPT-OSS, for example, have only eager).
        padded = loaded if loaded in (FLASH, SDPA) else SDPA if model._supports_sdpa else EAGER
        branches = padded in TREE_MASK_ATTENTION and all(tree_mask_blocker(m) is None for m in (model, reference)
                                                         if m is not None)
        path = AttentionPath(False, padded, max_tokens, branches=branches,
                             pair_cost=attention_pair_cost(model) if branches else None)
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


def with_refinements(rows: list[Row], refined: list[Row | None], path: AttentionPath) -> list[Row]:
    """The sample rows and their refined rows (refined[i]: rows[i]'s, or None): each refinement a branch of its
    sample's row where path allows (AttentionPath.branches), its weights on the shared targets joining the sample's
    own; else the refined rows after the samples. Either way the same loss and gradients."""
    if len(rows) != len(refined):
        raise ValueError(f"{len(rows)} rows but {len(refined)} refinements")
    if not path.branches:
        return rows + [r for r in refined if r is not None]
    out = []
    for row, refinement in zip(rows, refined):
        if refinement is None:
            out.append(row)
            continue
        if refinement.prompt_ids != row.prompt_ids or row.branch is not None or row.sft_weights is not None:
            raise ValueError("a refinement branches off its own sample's row: the same prompt, no weights or "
                             "branch there yet")
        at = next((j for j, (a, b) in enumerate(zip(row.target_ids, refinement.target_ids)) if a != b),
                  min(len(row.target_ids), len(refinement.target_ids)))
        weights = refinement.sft_weights.float()
        shared = torch.zeros(len(row.target_ids))
        shared[:at] = weights[:at]
        # A refinement weighted only where it agrees with its sample needs no branch.
        branch = Branch(at, refinement.target_ids[at:], weights[at:]) if weights[at:].any() else None
        out.append(replace(row, sft_weights=shared if shared.any() else None, branch=branch))
    return out


def row_cost(width: int, masked: bool, pair_cost: float) -> float:
    """What reading a tensor row costs, in tokens through the model: its width, plus pair_cost per query-key pair
    attention computes (a causal kernel skips the upper triangle, a masked one not)."""
    return width + pair_cost * width ** 2 * (1.0 if masked else 0.5)


def prompt_stacks(rows: list[Row], path: AttentionPath) -> list[list[int]]:
    """The rows each stack holds (indices into rows, in order): each row alone, or where path shares prompts
    (pair_cost), runs of adjacent rows with one prompt (a group's samples) as one tree of sequences (see build_batch)
    within the token budget. A row joins the run when that costs less than reading it alone, by the tokens read plus
    pair_cost per query-key pair (a tree row's masked attention computes its whole width squared, a row alone's
    causal attention half of it): a long prompt shared by short answers gains, long answers to a short prompt would
    pay in attention what the prompt saves."""
    def cost(width: int, masked: bool) -> float:
        return row_cost(width, masked, path.pair_cost)

    stacks: list[list[int]] = []
    for i, row in enumerate(rows):
        if path.pair_cost is not None and stacks and rows[stacks[-1][0]].prompt_ids == row.prompt_ids:
            width = stack_length(rows, stacks[-1])
            grown = width + row.length - (len(row.prompt_ids) - 1)
            apart = cost(width, len(stacks[-1]) > 1 or rows[stacks[-1][0]].branch is not None) + \
                cost(row.length, row.branch is not None)
            if grown <= path.max_tokens and cost(grown, True) < apart:
                stacks[-1].append(i)
                continue
        stacks.append([i])
    return stacks


def plan_lanes(lengths: list[int], max_tokens: int) -> list[list[list[int]]]:
    """Padded micro-batches whose tensor rows (lanes) hold several sequences side by side: indices of lengths, per
    micro-batch per lane. Longest first, best fit: a micro-batch is as wide as its first (longest) sequence, each
    next one goes into the lane it leaves least room in, or a new lane while lanes x width stay within max_tokens,
    else it starts the next micro-batch. A sequence longer than max_tokens goes alone."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    batches: list[list[list[int]]] = []
    room: list[tuple[int, int]] = []   # the current micro-batch's (room left, lane), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = bisect.bisect_left(room, (lengths[i], -1))
        if fit < len(room):
            left, lane = room.pop(fit)
            batches[-1][lane].append(i)
            bisect.insort(room, (left - lengths[i], lane))
        elif batches and (len(batches[-1]) + 1) * lengths[batches[-1][0][0]] <= max_tokens:
            batches[-1].append([i])
            bisect.insort(room, (lengths[batches[-1][0][0]] - lengths[i], len(batches[-1]) - 1))
        else:
            batches.append([[i]])
            room = [(0, 0)]
    return batches


def micro_batch_plan(rows: list[Row], path: AttentionPath) -> list[list[list[list[int]]]]:
    """Each micro-batch's tensor rows, each a list of stacks of rows (prompt_stacks): one stack a row, cut by the
    token budget (plan_micro_batches), or where the path takes tree masks (pair_cost) and it costs less, stacks side
    by side in rows as wide as the micro-batch's longest (plan_lanes), padding filled with sequences."""
    stacks = prompt_stacks(rows, path)
    lengths = [stack_length(rows, stack) for stack in stacks]
    apart = [[[k] for k in batch] for batch in plan_micro_batches(lengths, path.max_tokens, packed=path.packed)]
    plan = apart
    if path.pair_cost is not None:
        def masked(batch) -> bool:
            return any(len(lane) > 1 or len(stacks[lane[0]]) > 1 or rows[stacks[lane[0]][0]].branch is not None
                       for lane in batch)

        def cost(plan) -> float:
            return sum(len(batch) * row_cost(lengths[batch[0][0]], masked(batch), path.pair_cost) for batch in plan)

        side_by_side = plan_lanes(lengths, path.max_tokens)
        if cost(side_by_side) < cost(apart):
            plan = side_by_side
    return [[[stacks[k] for k in lane] for lane in batch] for batch in plan]


def planned_batch(rows: list[Row], lanes: list[list[list[int]]], device: torch.device,
                  path: AttentionPath) -> tuple[list[int], Batch]:
    """(indices into rows, Batch) of one micro-batch of micro_batch_plan."""
    stacks = [stack for lane in lanes for stack in lane]
    indices = [i for stack in stacks for i in stack]
    at = {i: k for k, i in enumerate(indices)}
    starts = [0]
    for lane in lanes:
        starts.append(starts[-1] + len(lane))
    return indices, build_batch([rows[i] for i in indices], device, packed=path.packed,
                                stacks=[[at[i] for i in stack] for stack in stacks],
                                lanes=[list(range(a, b)) for a, b in zip(starts, starts[1:])])


def micro_batches(rows: list[Row], path: AttentionPath, device: torch.device):
    """(indices into rows, Batch) for each micro-batch of rows."""
    for stacks in micro_batch_plan(rows, path):
        yield planned_batch(rows, stacks, device, path)


# ----------------------------------------------------------------------------------------------- forwards

def model_attention_mask(model, mask: torch.Tensor | None) -> torch.Tensor | None:
    """A [B, 1, L, L] boolean mask (a batch's tree mask) as the model's attention takes it: SDPA as it is, eager as
    an additive mask in the model's dtype (0 where it attends, the dtype's minimum where not); any other mask as it
    is."""
    if mask is None or mask.dim() != 4 or mask.dtype != torch.bool or model.config._attn_implementation != EAGER:
        return mask
    dtype = model.dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def final_hidden(model, batch: Batch) -> torch.Tensor:
    """The model's final hidden states (after the final norm), never its logits."""
    out = model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                           attention_mask=model_attention_mask(model, batch.attention_mask))
    return out.last_hidden_state


def own_forward_hidden(forward, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A causal LM's own forward (forward: the model, or its forward function) with the LM head on one position
    only: the final hidden states (hidden_states[-1], after the final norm) and the MoE router's load-balancing loss
    when asked with output_router_logits=True (each architecture's own), else None."""
    kwargs.update(use_cache=False, output_hidden_states=True, logits_to_keep=1)
    out = forward(*args, **kwargs)
    return out.hidden_states[-1], getattr(out, "aux_loss", None)


def router_loss_coef(model, cfg) -> float:
    """The weight of an MoE model's router loss in the update: cfg.router_aux_loss_coef, else the model config's
    router_aux_loss_coef (0 for a model without a router). A ValueError names the key when it is set for a model
    without a router."""
    text = model.config.get_text_config()
    has_router = hasattr(text, "output_router_logits")
    if cfg.router_aux_loss_coef is not None:
        if cfg.router_aux_loss_coef > 0 and not has_router:
            raise ValueError(f"router_aux_loss_coef={cfg.router_aux_loss_coef} but {type(model).__name__} is not a "
                             f"mixture-of-experts model: it has no router loss")
        return cfg.router_aux_loss_coef
    return float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0) if has_router else 0.0


def lm_head(model):
    head = model.get_output_embeddings()
    check_plain_head(head, type(model).__name__)
    return head


# The probe's length, and its tolerance: in fp32 up to this many nats, in 16 bits also a few roundings of the largest
# logit (the model's own logits are rounded to its dtype; ours are not).
PROBE_TOKENS, PROBE_TOLERANCE = 16, 1e-3


@torch.no_grad()
def check_head_matches_model(model, key: str, fused_logprobs=None, temperature: float = 1.0) -> None:
    """fastrft's log-probs equal the model's own (log_softmax of its forward's logits over temperature) on a short
    probe: a ValueError naming the key and the architecture otherwise, before any training, rather than a run on the
    wrong distribution (a head with layers of its own, a logit transform fastrft does not know). fused_logprobs(model,
    input_ids [1, T]) -> the log-probs [T - 1] of input_ids[0, 1:] by the caller's path; default: fastrft train's
    (final hidden states through token_logprobs under the config's logit transform)."""
    head = lm_head(model)
    ids = ((torch.arange(PROBE_TOKENS + 1) * 7919 + 11) % head.weight.shape[0]).to(head.weight.device)[None]
    with eval_mode(model):
        logits = model(input_ids=ids, use_cache=False).logits
        ours = (fused_logprobs or _train_path_logprobs)(model, ids).float()
    theirs = (logits[0, :-1].float() / temperature).log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    gap = float((ours.to(theirs.device) - theirs).abs().max())
    rounding = 0.0 if logits.dtype == torch.float32 else 4 * torch.finfo(logits.dtype).eps * float(logits.abs().max())
    if not gap <= PROBE_TOLERANCE + rounding:
        transform = model_logit_transform(model)
        raise ValueError(f"{key}: fastrft's log-probs of {type(model).__name__} differ from the model's own by "
                         f"{gap:.3g} nats on a probe of {PROBE_TOKENS} tokens: its forward turns the final hidden "
                         f"states into logits in a way fastrft does not reproduce (fastrft applies its LM head "
                         f"{type(head).__name__} with logit_scale={transform['logit_scale']:g} and "
                         f"softcap={transform['softcap']}); this architecture is not supported")


def check_vocabularies(tokenizer, policy, ref, *, policy_name: str, ref_name: str, ref_scores: bool = True) -> None:
    """Every id the tokenizer can produce has an LM-head row in both models; where the reference's log-probs are
    compared with the policy's (ref_scores: the KL term), the same rows. A refiner alone (decoded, read back through
    the tokenizer) may have more: a padded vocabulary (Qwen2.5-7B's head for 0.5B's tokenizer). Names say which
    model is which in the error."""
    rows = {policy_name: _head_rows(policy), ref_name: _head_rows(ref)}
    if ref_scores and rows[policy_name] != rows[ref_name]:
        raise ValueError(f"the policy ({policy_name}) has {rows[policy_name]} vocabulary rows but the reference "
                         f"({ref_name}) has {rows[ref_name]}: the KL term and the refiner compare the two models' "
                         f"log-probs of the same token ids, so their vocabularies must match")
    largest_id = max([len(tokenizer) - 1, tokenizer.eos_token_id or 0, tokenizer.pad_token_id or 0])
    for name, count in rows.items():
        if largest_id >= count:
            raise ValueError(f"the tokenizer has ids up to {largest_id} but the LM head of {name} has only {count} "
                             f"rows")


def _head_rows(model) -> int:
    """The LM head's rows (its whole shape where DeepSpeed ZeRO-3 partitions it)."""
    weight = model.get_output_embeddings().weight
    return (getattr(weight, "ds_shape", None) or weight.shape)[0]


def _train_path_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    row = Row(prompt_ids=ids[0, :1].tolist(), target_ids=ids[0, 1:].tolist())
    path = AttentionPath(False, model.config._attn_implementation, ids.numel())
    return sequence_logprobs(model, [row], ids.device, path=path, temperature=1.0)[0]


@torch.no_grad()
def sequence_logprobs(model, rows: list[Row], device: torch.device, *, path: AttentionPath,
                      temperature: float) -> list[torch.Tensor]:
    """Per-row log-probs of the target tokens under model (no gradient), in the order of rows: the reference and
    the old log-probs. Identical rows (a group's repeated answers) are read once; each copy gets its own tensor."""
    head = lm_head(model)
    source = first_occurrences((tuple(row.prompt_ids), tuple(row.target_ids)) for row in rows)
    firsts = [i for i, first in enumerate(source) if first == i]
    # Log-probs of each distinct row's own targets (not of its branch), by the row's index.
    distinct = [replace(rows[i], branch=None) if rows[i].branch else rows[i] for i in firsts]
    out: dict[int, torch.Tensor] = {}
    with attention(model, path):
        for indices, batch in micro_batches(distinct, path, device):
            hidden = final_hidden(model, batch)
            lp = token_logprobs(hidden, head.weight.to(hidden.dtype), batch.targets, temperature=temperature,
                                bias=None if head.bias is None else head.bias.to(hidden.dtype),
                                **model_logit_transform(model))
            for k, (b, t0, t1) in zip(indices, batch.target_slices):
                out[firsts[k]] = lp[b, t0:t1].float().cpu()
    return [out[first] if first == i else out[first].clone() for i, first in enumerate(source)]


class _FusedHeadLoss(torch.nn.Module):
    """fused_rft_loss over the LM head, as a module of its own that holds no weights. DeepSpeed ZeRO-3 gathers a
    module's weights around its forward and again for its backward, which it finds through the tensors the forward
    returns: the head's weight, read here, becomes this module's (ZeRO-3 registers it as an external parameter), and
    the loss comes out as a tuple of tensors, which ZeRO-3 can hook (it cannot look into a FusedRFTOutput). The head
    comes as its getter (model.get_output_embeddings): ZeRO-3 warns of module arguments, which it cannot hook."""

    def forward(self, hidden, get_head, targets, transform: dict, loss_options: dict):
        head = get_head()
        out = fused_rft_loss(hidden, head.weight, targets, bias=head.bias, **transform, **loss_options)
        return out.loss, out.logprobs, out.entropy, out.metrics


class CausalLMWithFusedLoss(torch.nn.Module):
    """A causal LM whose forward is fastrft's fused loss: the model body to its final hidden states, then
    fused_rft_loss over its LM head under its logit transform; logits are never materialised.

        loss_module = CausalLMWithFusedLoss(model)
        out = loss_module(input_ids, targets, advantages=A, clip_high=0.28)   # a FusedRFTOutput
        out.loss.backward()

    targets[b, t] is the token position t predicts (IGNORE_INDEX where no loss is read); loss options are
    fused_rft_loss's. The head is read inside this module's forward, which is what wrappers that gather a module's
    weights for its forward need: under FSDP2, shard each decoder layer, then this module as the root
    (fully_shard(loss_module)), and FSDP2 gathers the head (tied to the embeddings or not) for the loss and
    reduce-scatters its gradient; DDP(loss_module) works alike, and so does a DeepSpeed ZeRO-3 engine over it
    (deepspeed.initialize(model=loss_module, ...)), which gathers the head for the loss and for its backward.
    router_weight > 0 adds that multiple of an MoE model's router load-balancing loss (metrics["router_loss"]: the
    unweighted loss). model may be a PEFT model (its adapters active)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.head_loss = _FusedHeadLoss()

    def forward(self, input_ids, targets, *, position_ids=None, attention_mask=None, router_weight: float = 0.0,
                **loss_options):
        # A PEFT model's adapters live inside the causal LM it wraps: its body and head are that model's.
        model = self.model.get_base_model() if callable(getattr(self.model, "get_base_model", None)) else self.model
        check_module_options(loss_options, "CausalLMWithFusedLoss", own=tuple(model_logit_transform(model)))
        check_plain_head(model.get_output_embeddings(), "CausalLMWithFusedLoss")
        if input_ids.dim() != 2 or targets.shape != input_ids.shape:
            raise ValueError(f"input_ids and targets must both be [batch, tokens], got {tuple(input_ids.shape)} and "
                             f"{tuple(targets.shape)}")
        inputs = dict(input_ids=input_ids, position_ids=position_ids,
                      attention_mask=model_attention_mask(model, attention_mask))
        if router_weight > 0:
            hidden, router_loss = own_forward_hidden(model, **inputs, output_router_logits=True)
            if router_loss is None:
                raise ValueError(f"router_weight={router_weight} but {type(model).__name__} gives no router loss: it "
                                 f"is not a mixture-of-experts model")
        else:
            hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
        loss, logprobs, entropy, metrics = self.head_loss(hidden, model.get_output_embeddings, targets,
                                                          model_logit_transform(model), loss_options)
        out = FusedRFTOutput(loss=loss, logprobs=logprobs, entropy=entropy, metrics=metrics)
        if router_weight > 0:
            out.loss = out.loss + router_weight * router_loss
            out.metrics["router_loss"] = float(router_loss.detach())
        return out


def loss_module_of(model) -> torch.nn.Module:
    """model when it computes the fused loss (a CausalLMWithFusedLoss, sharded by FSDP2 or wrapped in DDP), else a
    CausalLMWithFusedLoss over the causal LM model."""
    inner = getattr(model, "module", model)   # DDP keeps the module it wraps as .module
    return model if isinstance(inner, CausalLMWithFusedLoss) else CausalLMWithFusedLoss(model)


def causal_lm_of(loss_module) -> torch.nn.Module:
    return getattr(loss_module, "module", loss_module).model


def rft_loss(model, batch: Batch, cfg, *, use_old: bool, normalizer: float | None = None,
             router_weight: float = 0.0):
    """fused_rft_loss on the batch under cfg's coefficients, through model (a causal LM, or the module that computes
    its loss: see loss_module_of); normalizer: the step's token count when the batch is one micro-batch of several
    (default: the batch's own, Batch.loss_tokens). router_weight > 0 adds that multiple of the MoE router's
    load-balancing loss."""
    return loss_module_of(model)(
        batch.input_ids, batch.targets, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
        router_weight=router_weight,
        advantages=batch.advantages, pg_mask=batch.pg_mask, old_logprobs=batch.old_logprobs if use_old else None,
        ref_logprobs=batch.ref_logprobs if cfg.uses_kl else None, sft_weights=batch.sft_weights,
        clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl_coef=cfg.kl_coef if cfg.uses_kl else 0.0,
        kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef, temperature=cfg.temperature,
        normalizer=float(max(1, batch.loss_tokens)) if normalizer is None else normalizer)


def accumulate_gradients(model, rows: list[Row], cfg, path: AttentionPath, device: torch.device, *, use_old: bool,
                         kl_values: list | None = None, world: World = SINGLE) -> tuple[dict[str, float], int]:
    """Adds the gradients of one optimizer step's loss over rows to the model's .grad, micro-batch by micro-batch:
    each micro-batch's loss is divided by the loss-token count of all the rows (DAPO's token mean over the optimizer
    step), so the sum is the loss of one batch of every row, and activation memory is one micro-batch's. model: a
    causal LM or the module that computes its loss (loss_module_of). Appends the k3 KL to the reference of each
    policy-gradient token to kl_values when given. An MoE model's router loss joins with router_loss_coef's weight,
    each micro-batch's weighted by its share of the loss tokens. Returns the loss terms (loss, pg_loss, sft_loss,
    kl_loss: sums; router_loss: the token-weighted mean; clip_frac, entropy: means over the policy-gradient tokens)
    and the number of micro-batches.

    Data-parallel (world.size > 1, rows: this rank's): the normaliser counts every rank's loss tokens; every rank
    runs the same number of micro-batches, a rank short of rows padding with idle ones of zero weight (FSDP2 and DDP
    run collectives in each forward and backward); each loss is scaled by world.size against the engines' mean of
    the gradients; the returned terms are over every rank."""
    loss_module = loss_module_of(model)
    normalizer = float(max(1, world.sum([sum(row.loss_tokens for row in rows)])[0]))
    router_coef = router_loss_coef(causal_lm_of(loss_module), cfg)
    planned = micro_batch_plan(rows, path)
    n_batches = int(world.max([len(planned)])[0])
    sums = dict.fromkeys(("loss", "pg_loss", "sft_loss", "kl_loss", "router_loss", "clipped", "pg_tokens",
                          "entropy"), 0.0)
    with attention(causal_lm_of(loss_module), path):
        for k in range(n_batches):
            # An idle micro-batch: one token of non-zero advantage (the loss skips rows of zero weight, and this
            # one's backward must reach every layer).
            indices, batch = planned_batch(rows, planned[k], device, path) if k < len(planned) else \
                (None, build_batch([Row(prompt_ids=[0], target_ids=[0], pg=True, advantage=1.0)], device,
                                   packed=path.packed))
            share = 0.0 if indices is None else sum(rows[i].loss_tokens for i in indices) / normalizer
            with gradient_sync(loss_module, last=k == n_batches - 1):   # DDP decides in the forward
                out = rft_loss(loss_module, batch, cfg, use_old=use_old, normalizer=normalizer,
                               router_weight=router_coef * share)
                # An idle micro-batch's loss times 0 still runs the backward, and with it the engine's collectives.
                (out.loss * (world.size if indices is not None else 0.0)).backward()
            if indices is None:
                continue
            sums["loss"] += float(out.loss.detach())
            for name in ("pg_loss", "sft_loss", "kl_loss"):
                sums[name] += out.metrics[name]
            sums["router_loss"] += out.metrics.get("router_loss", 0.0) * share
            sums["clipped"] += out.metrics["clip_frac"] * out.metrics["pg_tokens"]
            sums["pg_tokens"] += out.metrics["pg_tokens"]
            pg_tokens = batch.pg_mask & (batch.targets != IGNORE_INDEX)
            sums["entropy"] += float(out.entropy[pg_tokens].sum())
            if kl_values is not None:
                kl_values.append(kl_estimate(out.logprobs[pg_tokens], batch.ref_logprobs[pg_tokens]))
    totals = dict(zip(sums, world.sum(list(sums.values()))))
    pg_token_count = totals.pop("pg_tokens")   # none (refined rows alone): no clip fraction, no entropy (NaN)
    totals["clip_frac"] = totals.pop("clipped") / pg_token_count if pg_token_count else float("nan")
    totals["entropy"] = totals["entropy"] / pg_token_count if pg_token_count else float("nan")
    return totals, n_batches
