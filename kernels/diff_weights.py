"""Diff weights: changed masks -> per-token sft_weights, and the last weighted token of each row.

Math, per row b of length n_b (positions t >= n_b are padding):
    weighted[b, t] = any(changed[b, s] for s in t .. min(t + CONTEXT, n_b - 1))      (CONTEXT = 0: changed[b, t])
    w[b, t]        = scale[b] * (changed_weight if weighted[b, t] else kept_weight)    for t < n_b, 0 otherwise
    last[b]        = max{t : w[b, t] != 0}, or -1
scale is 1 (normalize="none") or 1 / (row sum) ("sequence", 0 for rows summing to 0) or 1 / (batch sum) ("batch");
the sums are changed_weight * count + kept_weight * (n_b - count) from the exact integer count of weighted tokens.

Shapes: changed [B, L] bool (read as uint8, rows contiguous), lengths [B] int64, weights [B, L] float32, last [B]
int64, scale and counts [B].

Kernels, one program per row, walking the row right to left in BLOCK-token tiles so that the nearest change to
the right is a running minimum carried between tiles (a reversed min-scan inside the tile):
    _count_weighted_kernel   only when normalising: reads changed once (L bytes a row), writes one int32.
    _diff_weights_kernel     reads changed (L bytes a row), writes weights (4 L bytes) and last (8 bytes).
So 5 bytes a token without normalisation and 6 with it; no FLOPs to speak of: the floor is the memory traffic.
"""

import torch
import triton
import triton.language as tl

# One row per program, 1024-token tiles: the kernels are memory-bound and rows are a few thousand tokens.
_BLOCK = 1024
_NUM_WARPS = 4


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _weighted_tile(changed_ptr, offs, length, next_change, CONTEXT: tl.constexpr, HAS_CONTEXT: tl.constexpr):
    """(weighted [BLOCK] bool, nearest change at or right of this tile) for the tile at offs, given the nearest
    change right of it (next_change; a large value when none)."""
    in_row = offs < length
    changed = tl.load(changed_ptr + offs, mask=in_row, other=0) != 0
    if HAS_CONTEXT:
        change_at = tl.where(changed, offs, next_change)
        nearest = tl.minimum(tl.associative_scan(change_at, 0, _min_combine, reverse=True), next_change)
        weighted = (nearest - offs <= CONTEXT) & in_row
        next_change = tl.minimum(next_change, tl.min(change_at, axis=0))
    else:
        weighted = changed
    return weighted, next_change


@triton.jit
def _count_weighted_kernel(changed_ptr, lengths_ptr, counts_ptr, stride_row, width,
                           CONTEXT: tl.constexpr, HAS_CONTEXT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    length = tl.load(lengths_ptr + row).to(tl.int32)   # as width: positions stay int32 in every loop-carried value
    changed_row = changed_ptr + row.to(tl.int64) * stride_row
    next_change = width + CONTEXT + 1
    count = tl.zeros([BLOCK], dtype=tl.int32)
    num_tiles = tl.cdiv(length, BLOCK)
    for i in range(0, num_tiles):
        offs = (num_tiles - 1 - i) * BLOCK + tl.arange(0, BLOCK)
        weighted, next_change = _weighted_tile(changed_row, offs, length, next_change, CONTEXT, HAS_CONTEXT)
        count += weighted.to(tl.int32)
    tl.store(counts_ptr + row, tl.sum(count, axis=0))


@triton.jit
def _diff_weights_kernel(changed_ptr, lengths_ptr, scale_ptr, weights_ptr, last_ptr, stride_row, width,
                         changed_weight, kept_weight,
                         CONTEXT: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_SCALE: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    length = tl.load(lengths_ptr + row).to(tl.int32)   # as width: positions stay int32 in every loop-carried value
    changed_row = changed_ptr + row.to(tl.int64) * stride_row
    weights_row = weights_ptr + row.to(tl.int64) * width
    if HAS_SCALE:
        changed_weight = changed_weight * tl.load(scale_ptr + row)
        kept_weight = kept_weight * tl.load(scale_ptr + row)
    next_change = width + CONTEXT + 1
    last = tl.full([BLOCK], -1, dtype=tl.int64)
    num_tiles = tl.cdiv(width, BLOCK)  # every tile, so that padding gets its zeros
    for i in range(0, num_tiles):
        offs = (num_tiles - 1 - i) * BLOCK + tl.arange(0, BLOCK)
        weighted, next_change = _weighted_tile(changed_row, offs, length, next_change, CONTEXT, HAS_CONTEXT)
        w = tl.where(weighted, changed_weight, kept_weight)
        w = tl.where(offs < length, w, 0.0)
        tl.store(weights_row + offs, w, mask=offs < width)
        last = tl.maximum(last, tl.where(w != 0.0, offs.to(tl.int64), -1))
    tl.store(last_ptr + row, tl.max(last, axis=0))


def diff_weights_triton(changed: torch.Tensor, lengths: torch.Tensor, changed_weight: float, kept_weight: float,
                        context: int, normalize: str):
    """changed [B, L] bool, lengths [B] int on one device -> (weights [B, L] float32, last [B] int64). Inputs are
    validated by fastrft.diff.diff_weights."""
    batch, width = changed.shape
    device = changed.device
    weights = torch.empty(batch, width, dtype=torch.float32, device=device)
    last = torch.empty(batch, dtype=torch.int64, device=device)
    if batch == 0:
        return weights, last
    if width == 0:
        return weights, last.fill_(-1)
    changed_u8 = changed.view(torch.uint8)
    if changed_u8.stride(1) != 1:
        changed_u8 = changed_u8.contiguous()
    lengths = lengths.to(device=device, dtype=torch.int64).contiguous()
    has_context = context > 0
    block = min(_BLOCK, max(16, triton.next_power_of_2(width)))
    scale = None
    if normalize != "none":
        counts = torch.empty(batch, dtype=torch.int32, device=device)
        _count_weighted_kernel[(batch,)](
            changed_u8, lengths, counts, changed_u8.stride(0), width,
            CONTEXT=context, HAS_CONTEXT=has_context, BLOCK=block, num_warps=_NUM_WARPS)
        # float64 on [B]: exact up to 2^53 tokens, where a float32 sum would lose counts past 2^24.
        counts = counts.double()
        row_sums = changed_weight * counts + kept_weight * (lengths.double() - counts)
        total = row_sums if normalize == "sequence" else row_sums.sum().expand(batch)
        scale = torch.where(total > 0, 1.0 / total, 0.0).float()
    _diff_weights_kernel[(batch,)](
        changed_u8, lengths, scale if scale is not None else weights, weights, last, changed_u8.stride(0), width,
        changed_weight, kept_weight,
        CONTEXT=context, HAS_CONTEXT=has_context, HAS_SCALE=scale is not None, BLOCK=block, num_warps=_NUM_WARPS)
    return weights, last
