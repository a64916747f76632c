"""Fused LM-head pass for RL fine-tuning: log-probs, entropy and their gradients without materialising logits.

Math, per selected row i (z are the tempered logits, never stored):
    z_ij      = (h_i . W_j + b_j) / T                      h: hidden [N, H], W: weight [V, H], b: bias [V]
    lse_i     = log sum_j exp(z_ij)
    logp_i    = z_i,t_i - lse_i                            t: targets [N]
    mean_z_i  = sum_j p_ij z_ij      (p = softmax(z))      entropy_i = lse_i - mean_z_i
The loss of the caller is a function of (logp_i, entropy_i) only, so the backward pass needs just two scalars per
row, dlogp_i = dL/dlogp_i and dent_i = dL/dentropy_i, to form the logit gradient
    dL/dz_ij  = dlogp_i (1[j = t_i] - p_ij) + dent_i p_ij (mean_z_i - z_ij)
and from it grad_h = (dL/dz / T) W, grad_W = (dL/dz / T)^T h, grad_b = colsum(dL/dz / T).

Kernels:
    _fused_rft_fwd_kernel   grid (row blocks,): one sweep over the vocabulary per row block with an online
                            log-sum-exp; reads h once per vocab tile and W once per row block; writes 3 floats a row.
    _fused_rft_bwd_kernel   grid (row blocks, vocab blocks): recomputes one [BLOCK_M, BLOCK_V] logit tile, turns it
                            into dL/dz in registers and accumulates grad_h and/or grad_W tiles with fp32 atomics into
                            the gradient itself (fp32 inputs) or into fp32 scratch covering one slab of rows (grad_h)
                            or of vocabulary entries (grad_W), which the launcher casts into the gradient.
Only the rows listed in `rows` are visited, so ignored rows and rows whose coefficients are exactly zero cost nothing.

Work, in units of one 2*N*H*V matmul: forward 1. Backward: recomputing the logits 1, grad_h 1, grad_W 1 (none for a
frozen head). The floor with materialised logits is 3 units (6*N*H*V); recomputation costs one more in exchange for
never holding an [N, V] tensor. The backward's extra memory is bounded by WORKSPACE_BYTES of fp32 scratch:
  * fp32 inputs accumulate in place: no scratch, 3 units (2 for a frozen head).
  * 16-bit inputs whose fp32 grad_h [N, H] fits in half the workspace: one sweep (3 units) with grad_h in scratch and
    grad_W one vocabulary slab at a time in the other half.
  * otherwise grad_h row slab by row slab, then grad_W vocabulary slab by vocabulary slab: 4 units (2 when frozen),
    every gradient element still summed in fp32 and rounded once.
(Backward units; add 1 for the forward.)
"""
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b (+ acc) in fp32. UPCAST: the Triton interpreter multiplies bf16 operands as raw integers, so there they
    are widened first; bf16 x bf16 products are exact in fp32, so the result is the tensor-core one."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logit_tile(
    hidden_ptr, weight_ptr, bias_ptr, row_ids, row_ok, cols, col_ok, H, stride_h, stride_w, inv_temperature,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """[BLOCK_M, BLOCK_V] tempered logits in fp32; -inf beyond the vocabulary."""
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
    return tl.where(col_ok[None, :], acc * inv_temperature, float("-inf"))


@triton.jit
def _fused_rft_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, rows_ptr, lse_ptr, target_logit_ptr, mean_logit_ptr,
    n_rows, H, V, stride_h, stride_w, inv_temperature,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = slots < n_rows
    row_ids = tl.load(rows_ptr + slots, mask=row_ok, other=0).to(tl.int64)
    targets = tl.load(targets_ptr + row_ids, mask=row_ok, other=-1)

    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)       # sum_j exp(z_j - running_max)
    running_zsum = tl.zeros((BLOCK_M,), dtype=tl.float32)      # sum_j exp(z_j - running_max) * z_j
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, row_ids, row_ok, cols, col_ok, H, stride_h, stride_w,
                        inv_temperature, HAS_BIAS, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_V, BLOCK_K)
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        rescale = tl.exp(running_max - new_max)
        p = tl.exp(z - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(p, axis=1)
        running_zsum = running_zsum * rescale + tl.sum(p * tl.where(col_ok[None, :], z, 0.0), axis=1)
        running_max = new_max
    tl.store(lse_ptr + slots, running_max + tl.log(running_sum), mask=row_ok)
    tl.store(target_logit_ptr + slots, target_logit, mask=row_ok)
    tl.store(mean_logit_ptr + slots, running_zsum / running_sum, mask=row_ok)


@triton.jit
def _fused_rft_bwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, rows_ptr, lse_ptr, mean_logit_ptr, dlogp_ptr, dentropy_ptr,
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr,
    n_rows, H, V, row_base, vocab_start, vocab_end, stride_h, stride_w, stride_gh, stride_gw, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_ENTROPY: tl.constexpr, HIDDEN_GRAD: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
    BIAS_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = slots < n_rows
    row_ids = tl.load(rows_ptr + slots, mask=row_ok, other=0).to(tl.int64)
    # This launch covers the vocabulary slab [vocab_start, vocab_end). grad_hidden_ptr points at row row_base of
    # grad_h and grad_weight_ptr at row vocab_start of grad_W: both may be scratch holding one slab.
    cols = vocab_start + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab_end

    z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, row_ids, row_ok, cols, col_ok, H, stride_h, stride_w,
                    inv_temperature, HAS_BIAS, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_V, BLOCK_K)
    targets = tl.load(targets_ptr + row_ids, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + slots, mask=row_ok, other=0.0)
    dlogp = tl.load(dlogp_ptr + slots, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    # (1[j = t] - p) is formed in fp32: in bf16 the target term cancels catastrophically when p_t is near 1.
    dz = dlogp[:, None] * (tl.where(cols[None, :] == targets[:, None], 1.0, 0.0) - p)
    if HAS_ENTROPY:
        mean_logit = tl.load(mean_logit_ptr + slots, mask=row_ok, other=0.0)
        dentropy = tl.load(dentropy_ptr + slots, mask=row_ok, other=0.0)
        dz += dentropy[:, None] * p * (mean_logit[:, None] - tl.where(col_ok[None, :], z, 0.0))
    dz = tl.where(row_ok[:, None] & col_ok[None, :], dz * inv_temperature, 0.0)

    # The sums are read only after the kernel ends: relaxed atomics (fire-and-forget reductions), no fences.
    if BIAS_GRAD:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(dz, axis=0), mask=col_ok, sem="relaxed")
    dz_in = dz.to(weight_ptr.dtype.element_ty)
    cols64 = cols.to(tl.int64)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        row_k_ok = row_ok[:, None] & (ks < H)[None, :]
        col_k_ok = col_ok[:, None] & (ks < H)[None, :]
        if HIDDEN_GRAD:
            w = tl.load(weight_ptr + cols64[:, None] * stride_w + ks[None, :], mask=col_k_ok, other=0.0)
            grad_h = _mma(dz_in, w, None, DOT_PRECISION, UPCAST)
            tl.atomic_add(grad_hidden_ptr + (row_ids - row_base)[:, None] * stride_gh + ks[None, :], grad_h,
                          mask=row_k_ok, sem="relaxed")
        if WEIGHT_GRAD:
            h = tl.load(hidden_ptr + row_ids[:, None] * stride_h + ks[None, :], mask=row_k_ok, other=0.0)
            grad_w = _mma(tl.trans(dz_in), h, None, DOT_PRECISION, UPCAST)
            tl.atomic_add(grad_weight_ptr + (cols64 - vocab_start)[:, None] * stride_gw + ks[None, :], grad_w,
                          mask=col_k_ok, sem="relaxed")


def _block_config(device: torch.device, vocab_size: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages). In the interpreter, where each tile op is emulated with
    numpy at a fixed cost, small tiles exercise the multi-tile paths at test shapes and wide vocabulary tiles keep
    large vocabularies affordable; on the GPU, bf16 tensor-core tiles. fp32 operands take half the K depth: three
    pipeline stages of 64-deep fp32 tiles need 144 KB of shared memory, past the 99 KB of sm_89 (L40, RTX 4090)."""
    if device.type != "cuda":
        return 16, (32 if vocab_size <= 4096 else 1024), 16, 1, 1
    return 64, 128, 32 if dtype == torch.float32 else 64, 8, 3


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


def fused_rft_forward(hidden, weight, bias, targets, rows, inv_temperature: float):
    """Per selected row (rows: int64 [R] indices into hidden): (lse, target_logit, mean_logit), each fp32 [R].
    targets[rows] must lie in [0, V): the caller validates them."""
    _check(hidden, weight, bias, targets, rows)
    n_rows, (V, H) = rows.numel(), weight.shape
    lse, target_logit, mean_logit = (torch.empty(n_rows, device=hidden.device, dtype=torch.float32) for _ in range(3))
    if n_rows == 0:
        return lse, target_logit, mean_logit
    block_m, block_v, block_k, num_warps, num_stages = _block_config(hidden.device, V, hidden.dtype)
    _fused_rft_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        hidden, weight, bias if bias is not None else weight, targets, rows, lse, target_logit, mean_logit,
        n_rows, H, V, hidden.stride(0), weight.stride(0), inv_temperature,
        HAS_BIAS=bias is not None, **_dot_flags(hidden),
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return lse, target_logit, mean_logit


# Bytes of fp32 scratch the backward may hold beyond its inputs and gradients (16-bit inputs only). Smaller values
# trade a second logit recomputation (see the module docstring) for memory; tests shrink it to reach every path.
WORKSPACE_BYTES = 48 << 20


def fused_rft_backward(hidden, weight, bias, targets, rows, lse, mean_logit, dlogp, dentropy, inv_temperature: float,
                       weight_grad: bool, bias_grad: bool):
    """Gradients (hidden, weight or None, bias or None) in the inputs' dtypes for the loss whose derivatives with
    respect to the selected rows' log-probs and entropies are dlogp and dentropy (fp32 [R], or dentropy None).
    rows must be strictly increasing (as torch.nonzero gives them): grad_h scratch covers a contiguous id range."""
    _check(hidden, weight, bias, targets, rows)
    (V, H), N, device = weight.shape, hidden.shape[0], hidden.device
    n_rows = rows.numel()
    if n_rows > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise ValueError("rows must be strictly increasing")
    grad_hidden = torch.zeros(hidden.shape, device=device, dtype=hidden.dtype)
    grad_weight = torch.zeros(weight.shape, device=device, dtype=weight.dtype) if weight_grad else None
    grad_bias = torch.zeros(V, device=device, dtype=torch.float32) if bias_grad else None
    block_m, block_v, block_k, num_warps, num_stages = _block_config(device, V, hidden.dtype)

    def launch(row_range, grad_h, row_base, grad_w, vocab_start, vocab_end, with_bias):
        """One kernel over rows[row_range] x [vocab_start, vocab_end): grad_h (rows from row_base on) and/or
        grad_w (entries from vocab_start on), either None for "not this launch"."""
        rows_l = rows[row_range]
        if rows_l.numel() == 0:
            return
        vectors = [t[row_range] for t in (lse, mean_logit, dlogp, dentropy if dentropy is not None else dlogp)]
        placeholder = grad_hidden     # never written: the flags below switch its uses off
        grid = (triton.cdiv(rows_l.numel(), block_m), triton.cdiv(vocab_end - vocab_start, block_v))
        _fused_rft_bwd_kernel[grid](
            hidden, weight, bias if bias is not None else weight, targets, rows_l, *vectors,
            grad_h if grad_h is not None else placeholder, grad_w if grad_w is not None else placeholder,
            grad_bias if with_bias else placeholder,
            rows_l.numel(), H, V, row_base, vocab_start, vocab_end, hidden.stride(0), weight.stride(0), H, H,
            inv_temperature, HAS_BIAS=bias is not None, HAS_ENTROPY=dentropy is not None,
            HIDDEN_GRAD=grad_h is not None, WEIGHT_GRAD=grad_w is not None, BIAS_GRAD=with_bias, **_dot_flags(hidden),
            BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
        )

    all_rows = slice(0, n_rows)
    if n_rows == 0:
        return grad_hidden, grad_weight, grad_bias.to(bias.dtype) if bias_grad else None
    if hidden.dtype == torch.float32:
        # fp32 gradients are their own accumulators: one sweep, no scratch.
        launch(all_rows, grad_hidden, 0, grad_weight, 0, V, bias_grad)
    else:
        scratch_rows = max(1, WORKSPACE_BYTES // (4 * H))
        if weight_grad and 2 * N <= scratch_rows:
            # One sweep: grad_h for every row in fp32 scratch, grad_W one vocabulary slab at a time beside it.
            scratch = torch.zeros(N + min(scratch_rows - N, V), H, device=device, dtype=torch.float32)
            hidden_acc, weight_acc = scratch[:N], scratch[N:]
            for vocab_start in range(0, V, weight_acc.shape[0]):
                vocab_end = min(V, vocab_start + weight_acc.shape[0])
                slab = weight_acc[:vocab_end - vocab_start].zero_()
                launch(all_rows, hidden_acc, 0, slab, vocab_start, vocab_end, bias_grad)
                grad_weight[vocab_start:vocab_end].copy_(slab)
            grad_hidden.copy_(hidden_acc)
        else:
            # grad_h row slab by row slab, then grad_W vocabulary slab by vocabulary slab, in the same scratch:
            # one more logit recomputation than a single sweep, but each sum is still whole in fp32.
            scratch = torch.empty(min(scratch_rows, max(N, V if weight_grad else 0)), H, device=device, dtype=torch.float32)
            row_starts = list(range(0, N, scratch_rows))
            bounds = torch.searchsorted(rows, torch.tensor(row_starts + [N], device=device)).tolist()
            for i, row_start in enumerate(row_starts):
                row_end = min(N, row_start + scratch_rows)
                if bounds[i] == bounds[i + 1]:
                    continue
                slab = scratch[:row_end - row_start].zero_()
                launch(slice(bounds[i], bounds[i + 1]), slab, row_start, None, 0, V, bias_grad and not weight_grad)
                grad_hidden[row_start:row_end].copy_(slab)
            for vocab_start in range(0, V if weight_grad else 0, scratch_rows):
                vocab_end = min(V, vocab_start + scratch_rows)
                slab = scratch[:vocab_end - vocab_start].zero_()
                launch(all_rows, None, 0, slab, vocab_start, vocab_end, bias_grad)
                grad_weight[vocab_start:vocab_end].copy_(slab)
    return grad_hidden, grad_weight, grad_bias.to(bias.dtype) if bias_grad else None


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
