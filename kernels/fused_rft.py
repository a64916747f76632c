"""Fused LM-head pass for RL fine-tuning: log-probs, entropy and their gradients without materialising logits.

Math, per selected row i (z are the transformed logits, never stored):
    a_ij      = h_i . W_j + b_j                            h: hidden [N, H], W: weight [V, H], b: bias [V]
    z_ij      = scale a_ij, or with soft-capping cap tanh(scale a_ij)
                (scale and cap fold the model's logit scale s, its soft-cap c and the temperature T: scale = s / T,
                or scale = s / c and cap = c / T, so that z = (c tanh(s a / c)) / T, Gemma 2's transform)
    M_i       = max_j z_ij,  e_ij = exp(z_ij - M_i)        t: targets [N]
    rest_i    = sum_j e_ij - 1  (every term but one maximum's 1, summed apart so that a peaked row keeps it)
    spread_i  = sum_j e_ij (M_i - z_ij) / (1 + rest_i)     = M_i - mean_z_i, a sum of non-negative terms
    lse_i     = M_i + log1p(rest_i),  logp_i = (z_i,t_i - M_i) - log1p(rest_i),  entropy_i = log1p(rest_i) + spread_i
None of these cancels: at realistic logit scales (~20) the textbook lse - z_t and lse - mean_z lose about 2e-6 to
fp32 rounding, which is all of logp, entropy and 1 - p_t on a row whose target has p near 1 (most of a confident
policy's tokens). The loss of the caller is a function of (logp_i, entropy_i) only, so the backward pass needs just
two scalars per row, dlogp_i = dL/dlogp_i and dent_i = dL/dentropy_i, to form the logit gradient
    dL/dz_ij  = dlogp_i (1[j = t_i] - p_ij) + dent_i p_ij ((M_i - z_ij) - spread_i)
with 1 - p_t = -expm1(logp_t) from the accurate logp, and from it dL/da = dL/dz dz/da (dz/da = scale, or with
soft-capping scale cap (1 - (z / cap)^2)), grad_h = dL/da W, grad_W = dL/da^T h, grad_b = colsum(dL/da).

Kernels:
    _fused_rft_fwd_kernel   grid (row blocks, vocabulary splits): one sweep over its split of the vocabulary per
                            row block with an online (max, rest, spread sum); reads h once per vocab tile and W once
                            per row block; writes 4 floats a row and split, merged on the host side (splits fill the
                            GPU when there are few row blocks).
    _fused_rft_bwd_kernel   grid (row blocks, vocab blocks) of one slab: recomputes a [BLOCK_M, BLOCK_V] logit tile,
                            forms dL/dz in fp32 registers and stores it, in the weight's dtype, into a bounded slab
                            of dL/dz (rows x vocabulary entries); the [N, V] logits never exist.
    _slab_matmul_kernel     C (+)= A @ B[rows] with fp32 accumulation and one owner per C tile: grad_h += dL/dz @ W
                            into an fp32 accumulator, grad_W = (dL/dz)^T @ h[rows] straight into the gradient.
No atomics on the gradients: every element is one program's fp32 sum, rounded once, and the results are the same
from run to run. Only the rows listed in `rows` are visited, so ignored rows and rows whose coefficients are
exactly zero cost nothing.

Work, in units of one 2*N*H*V matmul: forward 1; backward, recomputing dL/dz 1 per pass plus 1 per gradient. The
floor with materialised logits is 3 units (6*N*H*V). Extra memory is bounded by WORKSPACE_BYTES (48 MB): the fp32
grad_h accumulator of one row slab and a dL/dz slab. Pass A goes row slab by row slab, summing grad_h over
vocabulary slabs; when one row slab holds every selected row (or the weights are fp32, whose gradient accumulates
in place), the same dL/dz slabs give grad_W: 3 backward units (2 for a frozen head). Otherwise a 16-bit grad_W
would need one rounding per row slab, so pass B recomputes dL/dz vocabulary slab by vocabulary slab for every row
and writes each grad_W slab once: 4 backward units. The single sweep holds up to about WORKSPACE_BYTES / (8.5 H)
rows in 16 bits (about 1450 at H = 4096, 3850 at H = 1536).
"""
import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _rounded(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 x in dtype, rounded to nearest even as the GPU does. UPCAST (bf16 inputs in the Triton interpreter,
    which truncates fp32 to bf16, doubling the error): there a bf16 result is rounded on the bits."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b (+ acc) in fp32. UPCAST: the Triton interpreter multiplies bf16 operands as raw integers, so there they
    are widened first; bf16 x bf16 products are exact in fp32, so the result is the tensor-core one."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logit_tile(
    hidden_ptr, weight_ptr, bias_ptr, row_ids, row_ok, cols, col_ok, H, stride_h, stride_w, scale, cap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """[BLOCK_M, BLOCK_V] transformed logits z in fp32; -inf beyond the vocabulary."""
    h_rows = hidden_ptr + row_ids[:, None] * stride_h
    w_rows = weight_ptr + cols.to(tl.int64)[:, None] * stride_w    # int64: V * H may pass 2**31
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(h, tl.trans(w), acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = acc * scale
    if SOFTCAP:
        # tanh(x) = 1 - 2 / (1 + exp(2x)): exact limits (+-1) where exp overflows or vanishes; its absolute error
        # (~1e-7) is below the fp32 spacing of the capped logit (cap * 2^-23 near the cap).
        z = cap * (1.0 - 2.0 / (1.0 + tl.exp(2.0 * z)))
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def _fused_rft_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, rows_ptr, max_ptr, rest_ptr, dsum_ptr, target_logit_ptr,
    n_rows, H, V, split_width, stride_h, stride_w, scale, cap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Online softmax statistics of rows[block] over the vocabulary split program_id(1) (split_width entries),
    written to row (split * n_rows + slot) of the [splits, n_rows] partials: the maximum m, rest = sum_j
    exp(z_j - m) - 1 (without the one maximum's term, so nothing cancels), dsum = sum_j exp(z_j - m) (m - z_j), and
    the target's logit where it falls in the split."""
    slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = slots < n_rows
    row_ids = tl.load(rows_ptr + slots, mask=row_ok, other=0).to(tl.int64)
    targets = tl.load(targets_ptr + row_ids, mask=row_ok, other=-1)
    split_start = tl.program_id(1) * split_width
    split_end = tl.minimum(split_start + split_width, V)

    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_rest = tl.zeros((BLOCK_M,), dtype=tl.float32)
    running_dsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(split_start, split_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < split_end
        z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, row_ids, row_ok, cols, col_ok, H, stride_h, stride_w,
                        scale, cap, HAS_BIAS, SOFTCAP, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_V, BLOCK_K)
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        tile_max = tl.max(z, axis=1)
        new_max = tl.maximum(running_max, tile_max)
        moved = tile_max > running_max            # the maximum is now in this tile (always so on the first)
        started = running_max > float("-inf")
        rescale = tl.exp(running_max - new_max)   # 0 before the first tile
        e = tl.exp(z - new_max[:, None])          # 0 beyond the vocabulary
        at_max = z == new_max[:, None]
        # The sums so far, rescaled to the new maximum: the old maximum's 1 joins the rest when the maximum moves.
        old_total = tl.where(started, 1.0 + running_rest, 0.0)
        max_step = tl.where(started, new_max - running_max, 0.0)
        running_dsum = rescale * (running_dsum + max_step * old_total)
        running_dsum += tl.sum(tl.where(col_ok[None, :] & ~at_max, e * (new_max[:, None] - z), 0.0), axis=1)
        # The tile's other maxima count 1 each, less the one that stays out of the rest: that whole number is
        # formed apart, so that 1 + tiny - 1 never loses the tiny.
        extra_maxima = tl.sum(at_max.to(tl.float32), axis=1) - tl.where(moved, 1.0, 0.0)
        running_rest = running_rest * rescale + tl.where(moved, rescale, 0.0) \
            + tl.sum(tl.where(at_max, 0.0, e), axis=1) + extra_maxima
        running_max = new_max
    out = tl.program_id(1) * n_rows + slots
    tl.store(max_ptr + out, running_max, mask=row_ok)
    tl.store(rest_ptr + out, running_rest, mask=row_ok)
    tl.store(dsum_ptr + out, running_dsum, mask=row_ok)
    tl.store(target_logit_ptr + out, target_logit, mask=row_ok)


@triton.jit
def _fused_rft_bwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, rows_ptr, lse_ptr, max_ptr, spread_ptr, one_minus_pt_ptr,
    dlogp_ptr, dentropy_ptr, dlogits_ptr, n_rows, H, vocab_start, vocab_end, stride_h, stride_w, stride_dl,
    scale, cap,
    HAS_BIAS: tl.constexpr, HAS_ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dL/da (the gradient of the untransformed logits) for rows[0:n_rows] x [vocab_start, vocab_end), in the
    weight's dtype, into the slab at dlogits_ptr."""
    slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = slots < n_rows
    row_ids = tl.load(rows_ptr + slots, mask=row_ok, other=0).to(tl.int64)
    slab_cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = vocab_start + slab_cols
    col_ok = cols < vocab_end

    z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, row_ids, row_ok, cols, col_ok, H, stride_h, stride_w,
                    scale, cap, HAS_BIAS, SOFTCAP, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_V, BLOCK_K)
    targets = tl.load(targets_ptr + row_ids, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + slots, mask=row_ok, other=0.0)
    dlogp = tl.load(dlogp_ptr + slots, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    # The target's 1 - p_t comes from the accurate logp (-expm1(logp_t)): formed here as 1 - p it would cancel when
    # p_t is near 1, in fp32 as well as in bf16.
    one_minus_pt = tl.load(one_minus_pt_ptr + slots, mask=row_ok, other=0.0)
    dz = dlogp[:, None] * tl.where(cols[None, :] == targets[:, None], one_minus_pt[:, None], -p)
    if HAS_ENTROPY:
        row_max = tl.load(max_ptr + slots, mask=row_ok, other=0.0)
        spread = tl.load(spread_ptr + slots, mask=row_ok, other=0.0)
        dentropy = tl.load(dentropy_ptr + slots, mask=row_ok, other=0.0)
        # mean_z - z_j as (M - z_j) - spread: exactly -spread at the maximum, no large terms cancelling.
        dz += dentropy[:, None] * p * (tl.where(col_ok[None, :], row_max[:, None] - z, 0.0) - spread[:, None])
    da = dz * scale
    if SOFTCAP:
        capped = tl.where(col_ok[None, :], z, 0.0) / cap   # tanh(scale a)
        da *= cap * (1.0 - capped * capped)
    slab_offsets = slots.to(tl.int64)[:, None] * stride_dl + slab_cols[None, :]   # a large slab may pass 2**31
    tl.store(dlogits_ptr + slab_offsets, _rounded(da, dlogits_ptr.dtype.element_ty, UPCAST),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _slab_matmul_kernel(
    a_ptr, b_ptr, b_rows_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_b, stride_c,
    A_TRANSPOSED: tl.constexpr, GATHER_B: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[i, j] (+)= sum_k A[i, k] B[r(k), j] with fp32 accumulation, r(k) = b_rows[k] if GATHER_B else k.
    A_TRANSPOSED: A is stored k-major (A[i, k] at i + k * stride_ak), as dL/dz^T is. Each C tile belongs to one
    program, so the result is deterministic; ACCUMULATE adds to C (fp32) instead of overwriting it."""
    # Grouped launch order: GROUP_M row blocks share each B column block while it is in L2.
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    group_size = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * blocks_n)) % group_size
    pid_n = (pid % (GROUP_M * blocks_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    # Pointers advance by a scalar each K step (int32 tile offsets, 64-bit pointers): far fewer registers than
    # recomputing [BLOCK, BLOCK_K] int64 offsets every step.
    if A_TRANSPOSED:
        a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_m[None, :]
    else:
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_k[:, None] * stride_b + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + offs_k < K
        if A_TRANSPOSED:
            a = tl.trans(tl.load(a_ptrs, mask=k_ok[:, None] & m_ok[None, :], other=0.0))
            a_ptrs += BLOCK_K * stride_ak
        else:
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            a_ptrs += BLOCK_K
        if GATHER_B:
            b_rows = tl.load(b_rows_ptr + k0 + offs_k, mask=k_ok, other=0)
            b = tl.load(b_ptr + b_rows[:, None] * stride_b + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            b_ptrs += BLOCK_K * stride_b
        acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_c + offs_n[None, :]
    c_ok = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_ok, other=0.0)
    tl.store(c_ptrs, _rounded(acc, c_ptr.dtype.element_ty, UPCAST), mask=c_ok)


def _block_config(dtype: torch.dtype):
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages) of the logit kernels: bf16 tensor-core tiles, the same on
    the GPU and in the interpreter (the tests run what ships). fp32 operands take half the K depth: three pipeline
    stages of 64-deep fp32 tiles need 144 KB of shared memory, past the 99 KB of sm_89 (L40, RTX 4090)."""
    return 64, 128, 32 if dtype == torch.float32 else 64, 8, 3


def _matmul_config(dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) of _slab_matmul_kernel: Triton's H100 bf16 GEMM
    tiles (fp32 at half the K depth, as above), on the GPU and in the interpreter alike."""
    return 128, 128, 32 if dtype == torch.float32 else 64, 8, 8, 3


def _dot_flags(tensor: torch.Tensor) -> dict:
    # fp32 inputs get a true fp32 product: TF32's 10-bit mantissa would dominate the error of an fp32 loss.
    return dict(DOT_PRECISION="ieee" if tensor.dtype == torch.float32 else "tf32",
                UPCAST=tensor.device.type != "cuda" and tensor.dtype == torch.bfloat16)


def _check(hidden, weight, bias, targets, rows):
    if not (hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]):
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("hidden and weight must be contiguous along H")
    if bias is not None and not bias.is_contiguous():
        raise ValueError("bias must be contiguous")
    if rows.dtype != torch.int64 or targets.dtype != torch.int64:
        raise ValueError("rows and targets must be int64")


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _vocab_splits(device: torch.device, row_blocks: int, vocab_tiles: int) -> int:
    """How many programs share each row block's sweep over the vocabulary. One per row block leaves most of the GPU
    idle below ~64 * SMs rows (8192 on an H100), so the sweep is split until about two programs run per SM; the
    partial statistics are merged in fused_rft_forward. The interpreter has no SMs to fill: one sweep."""
    if device.type != "cuda":
        return 1
    return max(1, min(vocab_tiles, triton.cdiv(2 * _multiprocessors(device), row_blocks)))


def fused_rft_forward(hidden, weight, bias, targets, rows, scale: float, cap: float,
                      vocab_splits: int | None = None):
    """Per selected row (rows: int64 [R] indices into hidden): (row_max, rest, dsum, target_logit), each fp32 [R]
    (the module docstring's statistics; dsum is spread * (1 + rest)). The logits are scale * a, or cap *
    tanh(scale * a) when cap > 0. targets[rows] must lie in [0, V): the caller
    validates them. vocab_splits: programs per row block's sweep (default: enough to fill the GPU; tests set it to
    reach the merge of the partial states)."""
    _check(hidden, weight, bias, targets, rows)
    n_rows, (V, H) = rows.numel(), weight.shape
    if n_rows == 0:
        return tuple(torch.empty(0, device=hidden.device, dtype=torch.float32) for _ in range(4))
    block_m, block_v, block_k, num_warps, num_stages = _block_config(hidden.dtype)
    row_blocks, vocab_tiles = triton.cdiv(n_rows, block_m), triton.cdiv(V, block_v)
    splits = min(vocab_tiles, vocab_splits or _vocab_splits(hidden.device, row_blocks, vocab_tiles))
    split_width = triton.cdiv(vocab_tiles, splits) * block_v
    splits = triton.cdiv(V, split_width)   # no split left empty
    partial_max, partial_rest, partial_dsum, partial_target = torch.empty(
        4, splits, n_rows, device=hidden.device, dtype=torch.float32)
    _fused_rft_fwd_kernel[(row_blocks, splits)](
        hidden, weight, bias if bias is not None else weight, targets, rows, partial_max, partial_rest, partial_dsum,
        partial_target, n_rows, H, V, split_width, hidden.stride(0), weight.stride(0), scale, cap,
        HAS_BIAS=bias is not None, SOFTCAP=cap > 0, **_dot_flags(hidden),
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    # Merge the splits' states at the overall maximum; the first split holding it keeps its 1 out of the rest.
    row_max = partial_max.max(0).values
    scale = torch.exp(partial_max - row_max)
    holds_max = torch.zeros_like(scale).scatter_(0, partial_max.argmax(0, keepdim=True), 1.0)
    rest = (scale * partial_rest).sum(0) + (scale * (1.0 - holds_max)).sum(0)
    dsum = (scale * (partial_dsum + (row_max - partial_max) * (1.0 + partial_rest))).sum(0)
    return row_max, rest, dsum, partial_target.sum(0)


def _workspace_bytes_from_env() -> int:
    value = os.environ.get("FASTRFT_WORKSPACE_MB", "48")
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = -1.0
    if not 0 < megabytes < float("inf"):
        raise ValueError(f"FASTRFT_WORKSPACE_MB must be a positive number of megabytes, got {value!r}")
    return int(megabytes * (1 << 20))


# Bytes of scratch the backward may hold beyond its inputs and gradients: slabs of dL/dz and fp32 accumulators of
# grad_h. Users trade memory for speed with it (see the module docstring), through FASTRFT_WORKSPACE_MB or by
# setting it; tests shrink it to reach every path.
WORKSPACE_BYTES = _workspace_bytes_from_env()


def _matmul(a, b, c, *, a_transposed: bool, b_rows=None, accumulate: bool):
    """c (+)= a @ b[b_rows] (a: [M, K], or its transpose stored [K, M] when a_transposed; b: [*, N]; c: [M, N])."""
    M, N = c.shape
    K = a.shape[0] if a_transposed else a.shape[1]
    block_m, block_n, block_k, group_m, num_warps, num_stages = _matmul_config(a.dtype)
    _slab_matmul_kernel[(triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)](
        a, b, b_rows if b_rows is not None else a, c, M, N, K, a.stride(0), a.stride(0), b.stride(0), c.stride(0),
        A_TRANSPOSED=a_transposed, GATHER_B=b_rows is not None, ACCUMULATE=accumulate, **_dot_flags(a),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=num_warps,
        num_stages=num_stages,
    )


# grad_h is cast from its fp32 accumulator into a 16-bit gradient this many pieces at a time.
_CAST_PIECES = 8


def accumulator_row_bytes(hidden_size: int, dtype: torch.dtype) -> float:
    """Scratch bytes one row of the backward's pass A holds: its fp32 grad_h accumulator and, in 16 bits, its share
    of the cast. A single backward sweep needs WORKSPACE_BYTES >= 2 * rows * this."""
    cast = 0 if dtype == torch.float32 else torch.finfo(dtype).bits // 8 * hidden_size / _CAST_PIECES
    return 4 * hidden_size + cast


def fused_rft_backward(hidden, weight, bias, targets, rows, lse, row_max, spread, one_minus_pt, dlogp, dentropy,
                       scale: float, cap: float, weight_grad: bool, bias_grad: bool):
    """Gradients (hidden, weight or None, bias or None) in the inputs' dtypes for the loss whose derivatives with
    respect to the selected rows' log-probs and entropies are dlogp and dentropy (fp32 [R], or dentropy None), given
    the rows' forward statistics (lse, row_max, spread and the target's 1 - p_t, fp32 [R]). rows must not repeat
    (torch.nonzero's are unique)."""
    _check(hidden, weight, bias, targets, rows)
    (V, H), device, dtype = weight.shape, hidden.device, hidden.dtype
    n_rows, elem = rows.numel(), hidden.element_size()
    grad_hidden = torch.zeros(hidden.shape, device=device, dtype=dtype)
    grad_weight = None
    if weight_grad:   # fp32: accumulated in place over row slabs; 16-bit: written whole, slab by slab
        fill = torch.zeros if dtype == torch.float32 or n_rows == 0 else torch.empty
        grad_weight = fill(weight.shape, device=device, dtype=dtype)
    grad_bias = torch.zeros(V, device=device, dtype=torch.float32) if bias_grad else None
    if n_rows == 0:
        return grad_hidden, grad_weight, grad_bias.to(bias.dtype) if bias_grad else None
    block_m, block_v, block_k, num_warps, num_stages = _block_config(dtype)
    dentropy_or_any = dentropy if dentropy is not None else dlogp

    def dlogits_slab(out, row_start, vocab_start):
        """dL/dz of rows[row_start : row_start + out.shape[0]] x [vocab_start, vocab_start + out.shape[1]) into out."""
        rows_s = slice(row_start, row_start + out.shape[0])
        grid = (triton.cdiv(out.shape[0], block_m), triton.cdiv(out.shape[1], block_v))
        _fused_rft_bwd_kernel[grid](
            hidden, weight, bias if bias is not None else weight, targets, rows[rows_s], lse[rows_s],
            row_max[rows_s], spread[rows_s], one_minus_pt[rows_s], dlogp[rows_s], dentropy_or_any[rows_s], out,
            out.shape[0], H, vocab_start, vocab_start + out.shape[1], hidden.stride(0), weight.stride(0),
            out.stride(0), scale, cap,
            HAS_BIAS=bias is not None, HAS_ENTROPY=dentropy is not None, SOFTCAP=cap > 0, **_dot_flags(hidden),
            BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
        )
        return out

    # Pass A, row slab by row slab: grad_h summed over vocabulary slabs in an fp32 accumulator (half the budget,
    # with the 16-bit copies it is cast into, an eighth of it at a time), dL/dz slabs in the other half. When one
    # slab holds every row, or the weight gradient is fp32 and accumulates in place, the same dL/dz slabs also give
    # grad_W.
    cast_pieces = 1 if dtype == torch.float32 else _CAST_PIECES
    slab_rows = max(1, min(n_rows, int(WORKSPACE_BYTES // 2 // accumulator_row_bytes(H, dtype))))
    weight_in_pass_a = weight_grad and (slab_rows == n_rows or dtype == torch.float32)

    def pass_a():
        slab_vocab = max(1, min(V, WORKSPACE_BYTES // 2 // (slab_rows * elem)))
        hidden_acc = torch.empty(slab_rows, H, device=device, dtype=torch.float32)
        dlogits = torch.empty(slab_rows, slab_vocab, device=device, dtype=dtype)
        for row_start in range(0, n_rows, slab_rows):
            rows_a = rows[row_start:row_start + slab_rows]
            acc = hidden_acc[:rows_a.numel()].zero_()
            for vocab_start in range(0, V, slab_vocab):
                vocab_end = min(V, vocab_start + slab_vocab)
                dz = dlogits_slab(dlogits[:rows_a.numel(), :vocab_end - vocab_start], row_start, vocab_start)
                _matmul(dz, weight[vocab_start:vocab_end], acc, a_transposed=False, accumulate=True)
                if weight_in_pass_a:
                    _matmul(dz, hidden, grad_weight[vocab_start:vocab_end], a_transposed=True, b_rows=rows_a,
                            accumulate=dtype == torch.float32)
                if bias_grad:
                    grad_bias[vocab_start:vocab_end] += dz.sum(0, dtype=torch.float32)
            for piece, rows_p in zip(acc.tensor_split(cast_pieces), rows_a.tensor_split(cast_pieces)):
                grad_hidden.index_copy_(0, rows_p, piece.to(dtype))

    # Pass B, for a 16-bit weight gradient when pass A took several row slabs: vocabulary slab by vocabulary slab,
    # dL/dz of every row recomputed (one more logit matmul) so that each grad_W element is one whole fp32 sum.
    def pass_b():
        slab_vocab = max(1, min(V, WORKSPACE_BYTES // (n_rows * elem)))
        dlogits = torch.empty(n_rows, slab_vocab, device=device, dtype=dtype)
        for vocab_start in range(0, V, slab_vocab):
            vocab_end = min(V, vocab_start + slab_vocab)
            dz = dlogits_slab(dlogits[:, :vocab_end - vocab_start], 0, vocab_start)
            _matmul(dz, hidden, grad_weight[vocab_start:vocab_end], a_transposed=True, b_rows=rows, accumulate=False)

    pass_a()    # each pass's scratch is freed when it returns
    if weight_grad and not weight_in_pass_a:
        pass_b()
    return grad_hidden, grad_weight, grad_bias.to(bias.dtype) if bias_grad else None
