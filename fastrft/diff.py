"""Diff-aware masking: which tokens of a refinement the refiner changed, and the SFT weights that follow.

    diff_mask(sample_ids, refined_ids)      BoolTensor[len(refined_ids)], True = inserted or substituted by the refiner
    diff_masks(samples, refineds)           the same for a batch, pairs spread over threads
    diff_weights(changed_mask, lengths)     per-token sft_weights [B, L] and the last weighted token of each row

"Changed" comes from a minimal alignment: the unchanged tokens of the refinement are one longest common subsequence
(LCS) of the two sequences, so exactly len(refined) - LCS(sample, refined) tokens are changed. With ties any one LCS
may be chosen; both backends choose the same one.

Backends: the C++ extension fastrft._diff (csrc/diff.cpp), built by the package's install, and a pure-Python twin of
the same algorithm, Myers' O((N + M) D) greedy search with the linear-space middle-snake divide and conquer,
D = N + M - 2 LCS. The twin is the reference the tests hold the extension to, and runs only when asked
(backend="python", or FASTRFT_PURE_PYTHON_DIFF=1 for a machine that cannot build the extension): an install whose
build failed stops at import, with the fix, rather than running a diff some hundred times slower.

Budget (max_d): the result is minimal exactly when D <= max_d. Past it the pair counts as rewritten: its common prefix
and common suffix stay unchanged and every token between them is marked changed, which caps the cost of a pair at
O((N + M) max_d) (O(N + M) for unrelated pairs, caught by a multiset bound). The default, 2048, keeps a refinement
exact as long as the refiner substitutes up to about 1000 tokens (a substitution is one deletion plus one
insertion); pass max_d >= len(sample) + len(refined) for an exact result on any pair.
"""
from __future__ import annotations

import functools
import os
from collections import Counter
from typing import NamedTuple, Sequence

import torch

from fastrft.kernels.utils import resolve_impl

DEFAULT_MAX_D = 2048
BACKENDS = ("auto", "cpp", "python")
NORMALIZERS = ("none", "sequence", "batch")


PURE_PYTHON_ENV = "FASTRFT_PURE_PYTHON_DIFF"


@functools.lru_cache(maxsize=None)
def _cpp_module():
    try:
        from fastrft import _diff
    except ImportError:
        return None
    return _diff


def cpp_available() -> bool:
    """Whether the C++ extension is built."""
    return _cpp_module() is not None


def _require_cpp() -> None:
    if not cpp_available() and os.environ.get(PURE_PYTHON_ENV) != "1":
        raise ImportError(f"fastrft's C++ diff extension (fastrft._diff, from csrc/diff.cpp) is not built: reinstall "
                          f"fastrft where a C++17 compiler is available (pip install -e . ; on Debian/Ubuntu: apt-get "
                          f"install g++ python3-dev), or set {PURE_PYTHON_ENV}=1 to use the much slower pure-Python "
                          f"diff")


_require_cpp()


def _resolve_backend(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    module = _cpp_module() if backend != "python" else None
    if backend == "cpp" and module is None:
        raise ImportError("backend='cpp' needs the fastrft._diff extension, which is not built: reinstall fastrft "
                          "with a C++17 compiler available (pip install -e .)")
    return module


def _resolve_max_d(max_d) -> int:
    if max_d is None:
        return DEFAULT_MAX_D
    if isinstance(max_d, bool) or not isinstance(max_d, int) or max_d < 0:
        raise ValueError(f"max_d must be an int >= 0 or None, got {max_d!r}")
    return max_d


def _check_tokens(seq, what: str):
    """What the backends accept: 1-D integer tensors go as int64 numpy views, strided arrays as contiguous copies,
    other input is checked by them."""
    if isinstance(seq, torch.Tensor):
        if seq.dim() != 1:
            raise ValueError(f"{what} must be 1-D, got shape {tuple(seq.shape)}")
        if seq.dtype.is_floating_point or seq.dtype.is_complex or seq.dtype == torch.bool:
            raise ValueError(f"{what} must hold integer token ids, got dtype {seq.dtype}")
        return seq.detach().to("cpu", torch.int64).contiguous().numpy()
    ndim = getattr(seq, "ndim", 1)
    if ndim != 1:
        raise ValueError(f"{what} must be 1-D, got {ndim} dimensions")
    flags = getattr(seq, "flags", None)
    if flags is not None and not flags["C_CONTIGUOUS"]:
        return seq.copy(order="C")   # a strided array (a[::2]): the C++ parser reads contiguous buffers
    return seq


def _as_int_list(seq, what: str) -> list[int]:
    """Python-backend twin of the C++ parser: a list of ints, with the same ValueErrors."""
    dtype = getattr(seq, "dtype", None)
    if dtype is not None and getattr(dtype, "kind", "i") not in "iu":
        raise ValueError(f"{what} must hold integers (int8..int64), got dtype {dtype}")
    try:
        items = list(seq)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of ints or a 1-D integer array, got "
                         f"{type(seq).__name__}") from None
    tokens = []
    for i, item in enumerate(items):
        if isinstance(item, float) or not hasattr(item, "__index__"):
            raise ValueError(f"{what}: token {i} is a {type(item).__name__}, not an integer")
        tokens.append(item.__index__())
    return tokens


def _mask_tensor(mask_bytes: bytearray) -> torch.Tensor:
    if len(mask_bytes) == 0:
        return torch.zeros(0, dtype=torch.bool)
    return torch.frombuffer(mask_bytes, dtype=torch.bool)


def diff_mask(sample_ids, refined_ids, *, max_d: int | None = None, backend: str = "auto") -> torch.Tensor:
    """BoolTensor[len(refined_ids)]: True where the refiner changed (inserted or substituted) the token.

    sample_ids, refined_ids: 1-D integer tensors (any device), lists/tuples of ints or 1-D integer arrays.
    max_d: edit budget (see the module docstring); None = DEFAULT_MAX_D. backend: "auto" (C++ when built),
    "cpp" or "python"."""
    max_d = _resolve_max_d(max_d)
    module = _resolve_backend(backend)
    sample = _check_tokens(sample_ids, "sample_ids")
    refined = _check_tokens(refined_ids, "refined_ids")
    if module is not None:
        mask_bytes, _ = module.diff_mask(sample, refined, max_d)
    else:
        mask_bytes, _ = _py_diff_mask(_as_int_list(sample, "sample_ids"), _as_int_list(refined, "refined_ids"), max_d)
    return _mask_tensor(mask_bytes)


def diff_masks(samples: Sequence, refineds: Sequence, *, max_d: int | None = None, num_threads: int | None = None,
               backend: str = "auto") -> list[torch.Tensor]:
    """diff_mask for every (samples[i], refineds[i]) pair; the C++ backend releases the GIL and spreads the pairs
    over num_threads threads (None: every hardware thread)."""
    max_d = _resolve_max_d(max_d)
    module = _resolve_backend(backend)
    if len(samples) != len(refineds):
        raise ValueError(f"got {len(samples)} samples but {len(refineds)} refinements")
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                    or num_threads < 1):
        raise ValueError(f"num_threads must be an int >= 1 or None, got {num_threads!r}")
    samples = [_check_tokens(s, f"samples[{i}]") for i, s in enumerate(samples)]
    refineds = [_check_tokens(r, f"refineds[{i}]") for i, r in enumerate(refineds)]
    if module is None:
        masks = []
        for i, (sample, refined) in enumerate(zip(samples, refineds)):
            mask_bytes, _ = _py_diff_mask(_as_int_list(sample, f"samples[{i}]"),
                                          _as_int_list(refined, f"refineds[{i}]"), max_d)
            masks.append(_mask_tensor(mask_bytes))
        return masks
    mask_bytes, _ = module.diff_masks(samples, refineds, max_d, num_threads or 0)
    lengths = [len(r) for r in refineds]
    return list(_mask_tensor(mask_bytes).split(lengths))


# ---------------------------------------------------------------------------------------------------------------
# Pure-Python twin of csrc/diff.cpp: the same search with the same tie-breaking, so both give the same masks.
# ---------------------------------------------------------------------------------------------------------------

def _py_diff_mask(a: list[int], b: list[int], max_d: int) -> tuple[bytearray, bool]:
    """(mask, exact): mask[j] = 1 when b[j] is changed; exact is False when D > max_d."""
    changed = bytearray(b"\x01") * len(b)
    lo_a, hi_a, lo_b, hi_b = _trim(a, 0, len(a), b, 0, len(b), changed)
    n, m = hi_a - lo_a, hi_b - lo_b
    if n == 0 or m == 0:
        return changed, True
    if n + m > max_d:
        common = sum((Counter(a[lo_a:hi_a]) & Counter(b[lo_b:hi_b])).values())  # |a ∩ b| >= LCS
        if n + m - 2 * common > max_d:
            return changed, False
    snake = _middle_snake(a, lo_a, n, b, lo_b, m, max_d)
    if snake is None:
        return changed, False
    _align_around(a, lo_a, n, b, lo_b, m, snake, changed)
    return changed, True


def _trim(a, lo_a, hi_a, b, lo_b, hi_b, changed):
    while lo_a < hi_a and lo_b < hi_b and a[lo_a] == b[lo_b]:
        changed[lo_b] = 0
        lo_a, lo_b = lo_a + 1, lo_b + 1
    while lo_a < hi_a and lo_b < hi_b and a[hi_a - 1] == b[hi_b - 1]:
        changed[hi_b - 1] = 0
        hi_a, hi_b = hi_a - 1, hi_b - 1
    return lo_a, hi_a, lo_b, hi_b


def _align_around(a, lo_a, n, b, lo_b, m, snake, changed):
    """Marks the snake unchanged and aligns the two halves around it (explicit stack instead of recursion)."""
    stack = [(lo_a, n, lo_b, m, snake)]
    while stack:
        lo_a, n, lo_b, m, snake = stack.pop()
        if snake is None:
            lo_a, hi_a, lo_b, hi_b = _trim(a, lo_a, lo_a + n, b, lo_b, lo_b + m, changed)
            n, m = hi_a - lo_a, hi_b - lo_b
            if n == 0 or m == 0:
                continue
            snake = _middle_snake(a, lo_a, n, b, lo_b, m, -1)
        x0, y0, x1, y1 = snake
        changed[lo_b + y0:lo_b + y1] = bytes(y1 - y0)
        stack.append((lo_a + x1, n - x1, lo_b + y1, m - y1, None))
        stack.append((lo_a, x0, lo_b, y0, None))


def _diagonal_range(d, n, m):
    lo, hi = max(-d, -m), min(d, n)
    return lo + ((lo + d) & 1), hi - ((hi + d) & 1)


def _middle_snake(a, lo_a, n, b, lo_b, m, max_d):
    """(x0, y0, x1, y1) of a snake on an optimal path of a[lo_a:lo_a+n] vs b[lo_b:lo_b+m], splitting it into
    ceil(D/2) and floor(D/2) edits; None when D > max_d (max_d < 0: no budget). Same steps as the C++ version."""
    delta = n - m
    odd = delta & 1
    unreached = -(n + m + 2)
    vf = {}  # diagonal k -> furthest x, forward
    vb = {}  # reversed diagonal -> furthest x in reversed coordinates
    d = 0
    while True:
        if max_d >= 0 and 2 * d - 1 > max_d:
            return None
        back_lo, back_hi = _diagonal_range(d - 1, n, m) if d > 0 else (1, 0)
        for k, x, x_end in _step(a, lo_a, n, b, lo_b, m, d, vf, False, unreached):
            kr = delta - k
            if odd and back_lo <= kr <= back_hi and x_end + vb[kr] >= n:
                return x, x - k, x_end, x_end - k
        if max_d >= 0 and 2 * d > max_d:
            return None
        fwd_lo, fwd_hi = _diagonal_range(d, n, m)
        for kr, xr, xr_end in _step(a, lo_a, n, b, lo_b, m, d, vb, True, unreached):
            k = delta - kr
            if not odd and fwd_lo <= k <= fwd_hi and vf[k] + xr_end >= n:
                return n - xr_end, n - xr_end - k, n - xr, n - xr - k
        d += 1


def _step(a, lo_a, n, b, lo_b, m, d, v, reverse, unreached):
    """One greedy step d in one direction; yields (k, x before the slide, x after) per diagonal."""
    lo, hi = _diagonal_range(d, n, m)
    if d > 0:
        prev_lo, prev_hi = _diagonal_range(d - 1, n, m)
        if lo - 1 < prev_lo:
            v[lo - 1] = unreached
        if hi + 1 > prev_hi:
            v[hi + 1] = unreached
    for k in range(lo, hi + 1, 2):
        if d == 0:
            x = 0
        else:
            right = min(v[k - 1] + 1, n)
            down = min(v[k + 1], m + k)
            x = right if right > down else down
        x_end, y = x, x - k
        if reverse:
            while x_end < n and y < m and a[lo_a + n - 1 - x_end] == b[lo_b + m - 1 - y]:
                x_end, y = x_end + 1, y + 1
        else:
            while x_end < n and y < m and a[lo_a + x_end] == b[lo_b + y]:
                x_end, y = x_end + 1, y + 1
        v[k] = x_end
        yield k, x, x_end


# ---------------------------------------------------------------------------------------------------------------
# Weighting: changed masks -> sft_weights
# ---------------------------------------------------------------------------------------------------------------

class DiffWeights(NamedTuple):
    weights: torch.Tensor     # [B, L] float32, 0 past each row's length
    last_index: torch.Tensor  # [B] int64: last token with a non-zero weight, -1 when none


def _batch_masks(changed_mask, lengths):
    """(changed [B, L] bool, lengths [B] int64) on the mask's device, from a padded tensor or a list of 1-D masks."""
    if isinstance(changed_mask, torch.Tensor):
        if changed_mask.dim() != 2:
            raise ValueError(f"changed_mask must be [B, L], got shape {tuple(changed_mask.shape)}")
        if changed_mask.dtype != torch.bool:
            raise ValueError(f"changed_mask must be a bool tensor, got dtype {changed_mask.dtype}")
        batch, width = changed_mask.shape
        if lengths is None:
            return changed_mask, torch.full((batch,), width, dtype=torch.int64, device=changed_mask.device)
        lengths = torch.as_tensor(lengths, device=changed_mask.device)
        if lengths.shape != (batch,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be {batch} integers, got shape {tuple(lengths.shape)} and dtype "
                             f"{lengths.dtype}")
        if batch and (int(lengths.min()) < 0 or int(lengths.max()) > width):
            raise ValueError(f"lengths must lie in [0, {width}]")
        return changed_mask, lengths.to(torch.int64)
    if lengths is not None:
        raise ValueError("lengths is only for a padded [B, L] changed_mask; a list of masks carries its own")
    masks = list(changed_mask)
    for i, mask in enumerate(masks):
        if not isinstance(mask, torch.Tensor) or mask.dim() != 1 or mask.dtype != torch.bool:
            raise ValueError(f"changed_mask[{i}] must be a 1-D bool tensor")
    device = masks[0].device if masks else torch.device("cpu")
    lengths = torch.tensor([m.numel() for m in masks], dtype=torch.int64, device=device)
    width = int(lengths.max()) if masks else 0
    padded = torch.zeros(len(masks), width, dtype=torch.bool, device=device)
    for i, mask in enumerate(masks):
        padded[i, :mask.numel()] = mask
    return padded, lengths


def diff_weights(changed_mask, lengths=None, *, changed_weight: float = 1.0, kept_weight: float = 0.0,
                 context: int = 0, normalize: str = "none", impl: str | None = None,
                 device: torch.device | str | None = None) -> DiffWeights:
    """Turns changed masks into the sft_weights of the fused loss.

    changed_mask: a padded [B, L] bool tensor (with lengths [B], default L each) or a list of 1-D bool masks as
    diff_masks returns them (padded here). Token t < lengths[b] of row b gets
        w[b, t] = changed_weight  if a changed token lies in positions t .. t + context of the row
                  kept_weight     otherwise,
    so context > 0 also weights the `context` tokens leading up to each change; tokens past the length get 0.
    kept_weight=1, changed_weight=1 is plain SFT on the whole refinement.
    normalize: "none"; "sequence" divides each row by its sum (rows summing to 0 stay 0); "batch" divides every
    weight by the sum over the batch.
    Returns DiffWeights(weights [B, L] float32, last_index [B] int64): the last token with a non-zero weight, -1 when
    none, so refinements that changed nothing can be dropped and the rest cut after their last change.
    impl: "triton" (default on CUDA; also under TRITON_INTERPRET=1) or "torch". device: where to compute (default:
    the masks' device); the padded masks are moved there in one copy, and the results stay there."""
    changed, lengths = _batch_masks(changed_mask, lengths)
    if device is not None:
        changed, lengths = changed.to(device), lengths.to(device)
    for name, value in (("changed_weight", changed_weight), ("kept_weight", kept_weight)):
        value = float(value)
        if not value >= 0.0 or value == float("inf"):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ValueError(f"context must be an int >= 0, got {context!r}")
    if normalize not in NORMALIZERS:
        raise ValueError(f"normalize must be one of {NORMALIZERS}, got {normalize!r}")
    impl = resolve_impl(impl, changed.device)
    if impl == "triton":
        from fastrft.kernels.diff_weights import diff_weights_triton

        weights, last_index = diff_weights_triton(changed, lengths, float(changed_weight), float(kept_weight),
                                                  context, normalize)
    else:
        weights, last_index = _diff_weights_torch(changed, lengths, float(changed_weight), float(kept_weight),
                                                  context, normalize)
    return DiffWeights(weights, last_index)


def _diff_weights_torch(changed, lengths, changed_weight, kept_weight, context, normalize):
    """Pure-PyTorch twin of fastrft.kernels.diff_weights (the CPU path)."""
    batch, width = changed.shape
    positions = torch.arange(width, device=changed.device)
    in_row = positions < lengths[:, None]
    changed = changed & in_row
    if context > 0:
        # Nearest changed position at or after t: a reversed running minimum.
        change_at = torch.where(changed, positions, width + context + 1)
        next_change = change_at.flip(1).cummin(1).values.flip(1)
        weighted = next_change - positions <= context
    else:
        weighted = changed
    weights = torch.where(weighted, changed_weight, kept_weight).float() * in_row
    if normalize != "none":
        n_weighted = (weighted & in_row).sum(1).double()
        # Sums from exact counts, not a float accumulation.
        row_sums = changed_weight * n_weighted + kept_weight * (lengths.double() - n_weighted)
        total = row_sums if normalize == "sequence" else row_sums.sum().expand(batch)
        scale = torch.where(total > 0, 1.0 / total, 0.0)
        weights = (weights.double() * scale[:, None]).float()
    last_index = torch.where(weights != 0, positions, -1).amax(1) if width else \
        torch.full((batch,), -1, dtype=torch.int64, device=changed.device)
    return weights, last_index.to(torch.int64)
