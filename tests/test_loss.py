"""fused_rft_loss and token_logprobs against a float64 PyTorch reference written from the contract's formula.

Both implementations are checked: "torch" (chunked PyTorch) and "triton" (the kernels; on a machine without a GPU
they run in the Triton interpreter, which conftest.py switches on)."""
import math
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import triton
import triton.language as tl

import fastrft
from fastrft import loss as loss_module
from fastrft.kernels.fused_rft import _rounded

IMPLS = ["torch", "triton"]
# On a GPU machine every test runs on CUDA tensors (the compiled kernels); elsewhere on the CPU (the interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _default_device():
    with torch.device(DEVICE):
        yield


def reference(hidden, weight, targets, *, bias=None, advantages=None, pg_mask=None, old_logprobs=None,
              ref_logprobs=None, sft_weights=None, clip_low=0.2, clip_high=0.28, kl_coef=0.0, kl_estimator="k3",
              entropy_coef=0.0, temperature=1.0, logit_scale=1.0, softcap=None, normalizer=None, ignore_index=-100):
    """The contract's formula in float64 with materialised logits. Returns (loss, logprobs, entropy, grads)."""
    h = hidden.detach().double().requires_grad_(hidden.requires_grad)
    w = weight.detach().double().requires_grad_(weight.requires_grad)
    b = bias.detach().double().requires_grad_(bias.requires_grad) if bias is not None else None
    logits = h @ w.T
    if b is not None:
        logits = logits + b
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != ignore_index
    logp = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    entropy = -(log_probs.exp() * log_probs).sum(-1) * valid

    def f64(x):
        return x.detach().double().reshape(targets.shape) if x is not None else None

    adv = f64(advantages) if advantages is not None else torch.zeros_like(logp)
    if pg_mask is not None:
        pg = pg_mask & valid
    else:
        pg = valid if advantages is not None else torch.zeros_like(valid)
    pg = pg.double()
    old = f64(old_logprobs) if old_logprobs is not None else logp.detach()
    ratio = torch.exp(logp - old)
    pg_term = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    if ref_logprobs is not None:
        ref = f64(ref_logprobs)
        kl = {"k1": logp - ref, "k2": (logp - ref) ** 2 / 2, "k3": torch.exp(ref - logp) - (ref - logp) - 1}[kl_estimator]
    else:
        kl = torch.zeros_like(logp)
    sft = f64(sft_weights) * valid if sft_weights is not None else torch.zeros_like(logp)
    row_loss = pg * (pg_term + kl_coef * kl - entropy_coef * entropy) + sft * (-logp)
    if normalizer is None:
        normalizer = max(1, int(((pg > 0) | (sft != 0)).sum()))
    loss = row_loss.sum() / normalizer
    params = [x for x in (h, w, b) if x is not None and x.requires_grad]
    grads = torch.autograd.grad(loss, params) if params and loss.requires_grad else ()
    grads = iter(grads)
    grad_of = [next(grads, None) if x is not None and x.requires_grad else None for x in (h, w, b)]
    return loss.detach(), logp.detach(), entropy.detach(), grad_of


def make_inputs(n, h, v, *, dtype=torch.float32, bias=True, ignored=0.2, device=DEVICE, batch_shape=None):
    shape = batch_shape or (n,)
    hidden = torch.randn(*shape, h, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) / math.sqrt(h) * 3).to(dtype).requires_grad_()
    b = (torch.randn(v, device=device) * 0.5).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, shape, device=device)
    targets[torch.rand(shape, device=device) < ignored] = -100
    return hidden, weight, b, targets


def run(impl, hidden, weight, targets, **kwargs):
    for x in (hidden, weight, kwargs.get("bias")):
        if x is not None:
            x.grad = None
    out = fastrft.fused_rft_loss(hidden, weight, targets, impl=impl, **kwargs)
    out.loss.backward()
    bias = kwargs.get("bias")
    return out, [x.grad if x is not None else None for x in (hidden, weight, bias)]


def assert_close(actual, expected, atol, rtol, what):
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"{what}: max abs error {err:.3g}"


def check_against_reference(impl, hidden, weight, targets, atol=2e-5, rtol=2e-4, **kwargs):
    out, grads = run(impl, hidden, weight, targets, **kwargs)
    ref_loss, ref_logp, ref_entropy, ref_grads = reference(hidden, weight, targets, **kwargs)
    assert_close(out.loss, ref_loss, atol, rtol, "loss")
    assert_close(out.logprobs, ref_logp, atol, rtol, "logprobs")
    assert_close(out.entropy, ref_entropy, atol, rtol, "entropy")
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == targets.shape
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        if rg is None:
            assert g is None, f"{name} has a gradient but needs none"
        else:
            assert g is not None and g.dtype == {"hidden": hidden, "weight": weight, "bias": kwargs.get("bias")}[name].dtype
            scale = rg.abs().max().item() + 1e-12
            assert_close(g, rg, atol * scale + atol, rtol, f"grad {name}")
    return out


# (N, H, V): N=1, V and H not multiples of any block (V prime), H below one block, a vocab of a single tile, and
# several row blocks over several vocabulary tiles (the kernels' tiles are 64 rows by 128 vocabulary entries).
SHAPES = [(1, 16, 17), (37, 45, 301), (50, 19, 1009), (8, 64, 32), (130, 72, 1031)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_all_terms_match_reference(impl, shape):
    n, h, v = shape
    hidden, weight, bias, targets = make_inputs(n, h, v)
    with torch.no_grad():
        logp = reference(hidden, weight, targets, bias=bias)[1]
    # Old log-probs near the current ones, so that some rows are clipped and others not.
    old = (logp + 0.4 * torch.randn(n)).float()
    ref = (logp + 0.3 * torch.randn(n)).float()
    out = check_against_reference(
        impl, hidden, weight, targets, bias=bias, advantages=torch.randn(n), old_logprobs=old, ref_logprobs=ref,
        sft_weights=torch.rand(n) * (torch.rand(n) < 0.5), kl_coef=0.05, entropy_coef=0.01, temperature=0.7,
    )
    assert set(out.metrics) >= {"pg_loss", "sft_loss", "kl", "clip_frac"}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "terms",
    [
        dict(advantages=True),
        dict(advantages=True, old=True),
        dict(sft=True),
        dict(advantages=True, kl="k1"),
        dict(advantages=True, kl="k2"),
        dict(advantages=True, kl="k3", old=True),
        dict(advantages=True, entropy=True),
        dict(pg_mask=True, kl="k3", sft=True),
        dict(advantages=True, sft=True, temperature=1.6, no_bias=True),
        dict(advantages=True, pg_mask=True, normalizer=12.5),
    ],
    ids=lambda d: "-".join(f"{k}={v}" if v is not True else k for k, v in d.items()),
)
def test_each_term_on_and_off(impl, terms):
    n, h, v = 29, 24, 211
    hidden, weight, bias, targets = make_inputs(n, h, v, bias=not terms.get("no_bias"))
    with torch.no_grad():
        logp = reference(hidden, weight, targets, bias=bias)[1].float()
    kwargs = dict(bias=bias, temperature=terms.get("temperature", 1.0))
    if terms.get("advantages"):
        kwargs["advantages"] = torch.randn(n)
    if terms.get("pg_mask"):
        kwargs["pg_mask"] = torch.rand(n) < 0.6
    if terms.get("old"):
        kwargs["old_logprobs"] = logp + 0.4 * torch.randn(n)
    if terms.get("kl"):
        kwargs.update(ref_logprobs=logp + 0.5 * torch.randn(n), kl_coef=0.2, kl_estimator=terms["kl"])
    if terms.get("sft"):
        kwargs["sft_weights"] = torch.rand(n) + 0.1
    if terms.get("entropy"):
        kwargs["entropy_coef"] = 0.05
    if terms.get("normalizer"):
        kwargs["normalizer"] = terms["normalizer"]
    check_against_reference(impl, hidden, weight, targets, **kwargs)


# Logit transforms of real models: Cohere's scale (1/16), Granite's division (by 8), Gemma 2's soft-cap at 30 on
# logits that reach it (the raw logits here span about +-75), and all of them with a temperature.
TRANSFORMS = [dict(logit_scale=0.0625), dict(logit_scale=1 / 8), dict(softcap=30.0),
              dict(softcap=30.0, temperature=0.7), dict(logit_scale=2.0, softcap=10.0, temperature=1.3)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda d: "-".join(f"{k}={v:g}" for k, v in d.items()))
def test_logit_transforms_match_reference(impl, transform):
    n, h, v = 70, 24, 301
    hidden, weight, bias, targets = make_inputs(n, h, v)
    with torch.no_grad():
        weight *= 8.0   # raw logits of tens: the soft-cap bends them, the scales move them
        logp = reference(hidden, weight, targets, bias=bias, **transform)[1].float()
    if "softcap" in transform:
        raw = (hidden @ weight.T + bias).detach() * transform.get("logit_scale", 1.0)
        assert raw.abs().max() > 2 * transform["softcap"]   # the cap is reached
    check_against_reference(
        impl, hidden, weight, targets, bias=bias, advantages=torch.randn(n), old_logprobs=logp + 0.3 * torch.randn(n),
        ref_logprobs=logp + 0.3 * torch.randn(n), sft_weights=torch.rand(n) * (torch.rand(n) < 0.5), kl_coef=0.05,
        entropy_coef=0.02, **transform)


@pytest.mark.parametrize("impl", IMPLS)
def test_lm_head_logprobs_is_the_differentiable_primitive(impl):
    """lm_head_logprobs: log-probs and entropies of the reference, with the reference's gradients for any loss
    built on them; fused_rft_loss on top of it gives the same log-probs and entropies."""
    hidden, weight, bias, targets = make_inputs(0, 20, 211, batch_shape=(3, 11))
    kwargs = dict(bias=bias, temperature=0.8, softcap=5.0)
    logp, entropy = fastrft.lm_head_logprobs(hidden, weight, targets, impl=impl, **kwargs)
    assert logp.shape == entropy.shape == targets.shape and logp.dtype == entropy.dtype == torch.float32
    _, ref_logp, ref_entropy, _ = reference(hidden, weight, targets, **kwargs)
    assert_close(logp, ref_logp, 2e-5, 2e-4, "logprobs")
    assert_close(entropy, ref_entropy, 2e-5, 2e-4, "entropy")
    # A loss of both outputs (a sequence-level one, which fused_rft_loss cannot express): the same gradients as the
    # float64 formula's.
    coef = torch.randn(3, 1)
    (torch.sigmoid((coef * logp).mean(-1)).sum() + (entropy ** 2).sum()).backward()
    h, w, b = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    valid = targets != -100
    lp = torch.log_softmax(5.0 * torch.tanh((h @ w.T + b) / 5.0) / 0.8, -1)
    ref_logp = lp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * valid
    ref_entropy = -(lp.exp() * lp).sum(-1) * valid
    (torch.sigmoid((coef.double() * ref_logp).mean(-1)).sum() + (ref_entropy ** 2).sum()).backward()
    for name, x, rx in (("hidden", hidden, h), ("weight", weight, w), ("bias", bias, b)):
        assert_close(x.grad, rx.grad, 2e-5 * rx.grad.abs().max().item() + 2e-5, 2e-4, f"grad {name}")
    out = fastrft.fused_rft_loss(hidden, weight, targets, advantages=torch.randn(3, 11), impl=impl, **kwargs)
    assert torch.equal(out.logprobs, logp.detach()) and torch.equal(out.entropy, entropy.detach())


@pytest.mark.parametrize("impl", IMPLS)
def test_clipping_is_active_on_some_rows(impl):
    n, h, v = 40, 16, 97
    hidden, weight, bias, targets = make_inputs(n, h, v, ignored=0.0)
    with torch.no_grad():
        logp = reference(hidden, weight, targets, bias=bias)[1].float()
    old = logp + torch.randn(n)  # ratios e^(+-1): many rows outside [0.8, 1.28]
    adv = torch.randn(n)
    out = check_against_reference(impl, hidden, weight, targets, bias=bias, advantages=adv, old_logprobs=old)
    ratio = torch.exp(logp - old)
    clipped = ((adv > 0) & (ratio > 1.28)) | ((adv < 0) & (ratio < 0.8))
    assert 0 < clipped.sum() < n
    assert out.metrics["clip_frac"] == pytest.approx(clipped.float().mean().item(), abs=1e-6)
    # A clipped row has no gradient: its hidden state receives exactly zero.
    assert (hidden.grad[clipped] == 0).all()
    assert (hidden.grad[~clipped].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_leading_shape(impl):
    hidden, weight, bias, targets = make_inputs(0, 20, 53, batch_shape=(3, 7))
    check_against_reference(impl, hidden, weight, targets, bias=bias, advantages=torch.randn(3, 7),
                            sft_weights=torch.rand(21))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_pytorch(impl, dtype):
    """bf16/fp16 inputs: our error against float64 is at most a small multiple of plain PyTorch's own error (the
    usual materialised-logits computation on the same low-precision inputs)."""
    n, h, v = 48, 64, 509
    hidden, weight, bias, targets = make_inputs(n, h, v, dtype=dtype)
    kwargs = dict(bias=bias, advantages=torch.randn(n), sft_weights=torch.rand(n), temperature=0.9)
    out, grads = run(impl, hidden, weight, targets, **kwargs)
    ref_loss, ref_logp, _, ref_grads = reference(hidden, weight, targets, **kwargs)

    # PyTorch's own error: the same formula with logits computed in the input dtype, then upcast to fp32.
    h_lp = hidden.detach().clone().requires_grad_()
    w_lp = weight.detach().clone().requires_grad_()
    b_lp = bias.detach().clone().requires_grad_()
    logits = (h_lp @ w_lp.T + b_lp).float() / 0.9
    valid = targets != -100
    logp_lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1) * valid
    adv = kwargs["advantages"]
    ratio = torch.exp(logp_lp - logp_lp.detach())
    rows = valid * -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv) + kwargs["sft_weights"] * valid * -logp_lp
    torch_loss = rows.sum() / valid.sum()
    torch_loss.backward()

    def err(x, y):
        return (x.double() - y.double()).abs().max().item()

    k, floor = 2.0, 1e-6
    assert err(out.loss, ref_loss) <= k * err(torch_loss, ref_loss) + floor
    assert err(out.logprobs, ref_logp) <= k * err(logp_lp, ref_logp) + floor
    for g, g_lp, rg in zip(grads, (h_lp.grad, w_lp.grad, b_lp.grad), ref_grads):
        assert g.dtype == dtype
        assert err(g, rg) <= k * err(g_lp, rg) + floor


class LiveAllocations(TorchDispatchMode):
    """Peak bytes held by the storages that ops run under it allocate (outputs of ops that neither view nor mutate),
    each held while any tensor on it, views included, is alive. The Triton interpreter's host copies of kernel
    arguments are set_/copy_ into empty tensors and do not count."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = {}   # data_ptr -> [bytes, tensors alive on it]
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        allocates = not (func.is_view or func._schema.is_mutable)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                self._track(t, allocates)
        return out

    def _track(self, tensor, allocates):
        ptr = tensor.untyped_storage().data_ptr()
        if allocates and ptr not in self.storages:
            self.storages[ptr] = [tensor.untyped_storage().nbytes(), 0]
            self.live += self.storages[ptr][0]
            self.peak = max(self.peak, self.live)
        if ptr in self.storages:
            self.storages[ptr][1] += 1
            self.refs.append(weakref.ref(tensor, lambda _, ptr=ptr: self._release(ptr)))

    def _release(self, ptr):
        entry = self.storages[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[ptr]


# Budgets in bytes for n = 40 rows (about 32 selected), H = 24, V = 211, where a row's fp32 grad_h accumulator
# (and an eighth of its 16-bit cast) take 102 bytes (96 in fp32): 11520 give one row slab (one sweep, grad_W from
# the same dL/dz slabs of about 90 vocabulary entries); 3456 give row slabs of 16 (18 in fp32), then a 16-bit grad_W
# in slabs of about 54 entries (none a multiple of a tile).
BUDGETS = {"one sweep": 11520, "row slabs then vocabulary slabs": 3456}


def budget_test_inputs(dtype, frozen_head):
    """The n = 40, H = 24, V = 211 head the budgets above are sized for, trained or frozen."""
    hidden, weight, bias, targets = make_inputs(40, 24, 211, dtype=dtype)
    weight.requires_grad_(not frozen_head)
    bias.requires_grad_(not frozen_head)
    return hidden, weight, bias, targets


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("regime", BUDGETS)
@pytest.mark.parametrize("frozen_head", [False, True], ids=["trained head", "frozen head"])
def test_backward_stays_within_its_scratch_budget(dtype, regime, frozen_head, monkeypatch):
    """Whatever the budget, the backward holds at most WORKSPACE_BYTES beyond its gradients (and O(N + V) vectors)
    at any time, and every gradient element is still summed whole in fp32 and rounded once: equal to the run with
    the default budget up to fp32 summation order, within one unit in the last place of a 16-bit result. (fp32
    inputs take smaller accumulator rows, so the tight budget gives them 2 row slabs, over which grad_W accumulates
    in place: equal up to fp32 summation order.)"""
    from fastrft.kernels import fused_rft as kernels

    hidden, weight, bias, targets = budget_test_inputs(dtype, frozen_head)
    n, v = targets.numel(), weight.shape[0]
    kwargs = dict(bias=bias, advantages=torch.randn(n), sft_weights=torch.rand(n), entropy_coef=0.02)
    unbounded = [g.clone() if g is not None else None for g in run("triton", hidden, weight, targets, **kwargs)[1]]

    budget = BUDGETS[regime]
    monkeypatch.setattr(kernels, "WORKSPACE_BYTES", budget)
    original = kernels.fused_rft_backward
    extra = {}

    def logged(*args):
        with LiveAllocations() as log:
            grads = original(*args)
        extra["bytes"] = log.peak - sum(g.untyped_storage().nbytes() for g in grads if g is not None)
        return grads

    monkeypatch.setattr(kernels, "fused_rft_backward", logged)
    bounded = run("triton", hidden, weight, targets, **kwargs)[1]
    assert 0 < extra["bytes"] <= budget + 8 * v + 16 * n, extra   # + grad_b in fp32 and its slab sums, row flags
    ulp = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
    assert bounded[0] is not None and all((g is None) == frozen_head for g in bounded[1:])
    for g, g_ref in zip(bounded, unbounded):
        if g is not None:
            scale = g_ref.abs().max().item()
            assert torch.allclose(g.float(), g_ref.float(), rtol=ulp, atol=ulp * scale * 1e-2)


@pytest.mark.parametrize("dtype,budget,frozen_head,sweeps", [
    (torch.bfloat16, 11520, False, 1),   # one row slab: both gradients from one sweep of dL/dz
    (torch.bfloat16, 3456, False, 2),    # row slabs: a 16-bit grad_W takes a second sweep
    (torch.bfloat16, 3456, True, 1),     # frozen head: grad_h only
    (torch.float32, 3456, False, 1),     # fp32 grad_W accumulates in place over the row slabs
])
def test_backward_recomputes_the_logits_as_often_as_documented(dtype, budget, frozen_head, sweeps, monkeypatch):
    """The cost model of kernels/fused_rft.py: dL/dz of every selected (row, vocabulary entry) pair is computed once
    per backward sweep, and the number of sweeps is 1, or 2 for a 16-bit weight gradient past one row slab."""
    from fastrft.kernels import fused_rft as kernels

    hidden, weight, bias, targets = budget_test_inputs(dtype, frozen_head)
    n, v = targets.numel(), weight.shape[0]
    monkeypatch.setattr(kernels, "WORKSPACE_BYTES", budget)
    computed = []
    kernel = kernels._fused_rft_bwd_kernel

    class CountingKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                n_rows, vocab_start, vocab_end = args[12], args[14], args[15]
                computed.append(n_rows * (vocab_end - vocab_start))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kernels, "_fused_rft_bwd_kernel", CountingKernel())
    run("triton", hidden, weight, targets, bias=bias, advantages=torch.randn(n))
    selected = int((targets != -100).sum())
    assert sum(computed) == sweeps * selected * v


def test_backward_is_reproducible_bit_for_bit():
    """No atomics on the gradients: the same inputs give the same bits (on a GPU, where programs race, too)."""
    hidden, weight, bias, targets = make_inputs(70, 40, 333, dtype=torch.bfloat16)
    kwargs = dict(bias=bias, advantages=torch.randn(70), sft_weights=torch.rand(70), entropy_coef=0.01)
    first = [g.clone() for g in run("triton", hidden, weight, targets, **kwargs)[1]]
    second = run("triton", hidden, weight, targets, **kwargs)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_with_nothing_to_learn_cost_no_gradient_work(impl, monkeypatch):
    n, h, v = 30, 16, 67
    hidden, weight, bias, targets = make_inputs(n, h, v, ignored=0.0)
    targets[:5] = -100                          # ignored rows
    adv = torch.randn(n)
    adv[5:15] = 0.0                             # zero advantage, no KL
    sft = torch.zeros(n)
    sft[15:18] = 1.0                            # refined rows (their advantage is zeroed too)
    adv[15:18] = 0.0
    seen = {}
    backend = loss_module._backend(impl)
    original = backend.fused_rft_backward

    def spy(hidden, weight, bias, targets, rows, *args):
        seen["rows"] = rows.clone()
        return original(hidden, weight, bias, targets, rows, *args)

    monkeypatch.setattr(backend, "fused_rft_backward", spy)
    check_against_reference(impl, hidden, weight, targets, bias=bias, advantages=adv, sft_weights=sft)
    assert sorted(seen["rows"].tolist()) == list(range(15, n))
    assert (hidden.grad[:15] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head_computes_no_weight_gradient(impl, monkeypatch):
    n, h, v = 12, 16, 41
    hidden, weight, bias, targets = make_inputs(n, h, v)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    flags = {}
    backend = loss_module._backend(impl)
    original = backend.fused_rft_backward

    def spy(*args):
        flags["weight_grad"], flags["bias_grad"] = args[-2], args[-1]
        return original(*args)

    monkeypatch.setattr(backend, "fused_rft_backward", spy)
    check_against_reference(impl, hidden, weight, targets, bias=bias, advantages=torch.randn(n))
    assert flags == {"weight_grad": False, "bias_grad": False}


@pytest.mark.parametrize("impl", IMPLS)
def test_every_row_ignored_gives_zero_loss(impl):
    hidden, weight, bias, targets = make_inputs(6, 8, 19)
    targets[:] = -100
    out, grads = run(impl, hidden, weight, targets, bias=bias, advantages=torch.randn(6), sft_weights=torch.rand(6))
    assert out.loss.item() == 0.0
    assert (out.logprobs == 0).all() and (grads[0] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_token_logprobs(impl):
    hidden, weight, bias, targets = make_inputs(0, 24, 131, batch_shape=(2, 9))
    lp = fastrft.token_logprobs(hidden, weight, targets, bias=bias, temperature=1.3, impl=impl)
    expected = reference(hidden.detach(), weight.detach(), targets, bias=bias.detach(), temperature=1.3)[1]
    assert lp.shape == targets.shape and lp.dtype == torch.float32 and not lp.requires_grad
    assert_close(lp, expected, 2e-5, 2e-4, "token_logprobs")


@pytest.mark.parametrize("impl", IMPLS)
def test_largest_vocab(impl):
    """A 262,144-token vocabulary, the largest in the contract. The gradient of hidden is an fp32 sum over 262,144
    vocabulary rows, hence the wider tolerance."""
    hidden, weight, bias, targets = make_inputs(3, 8, 262_144, ignored=0.0)
    targets[0] = 262_143                        # the last id of the vocabulary
    check_against_reference(impl, hidden, weight, targets, atol=2e-4, bias=bias, advantages=torch.randn(3),
                            sft_weights=torch.rand(3))


@pytest.mark.parametrize("impl", IMPLS)
def test_module_with_tied_embeddings(impl):
    vocab, width = 57, 20
    embed = nn.Embedding(vocab, width)
    head = nn.Linear(width, vocab, bias=False)
    head.weight = embed.weight                  # tied
    loss_fn = fastrft.FusedRFTLoss(head, clip_high=0.3, impl=impl)
    ids = torch.randint(0, vocab, (4, 6))
    hidden = torch.tanh(embed(ids[:, :-1]))
    targets = ids[:, 1:]
    adv = torch.randn(4, 5)
    out = loss_fn(hidden, targets, advantages=adv)
    out.loss.backward()
    ref_loss = reference(hidden, embed.weight, targets, advantages=adv, clip_high=0.3)[0]
    assert out.loss.item() == pytest.approx(ref_loss.item(), rel=1e-4, abs=1e-6)
    # The tied weight receives both paths' gradients: compare against the same graph through the reference.
    grad_fused = embed.weight.grad.clone()
    embed.weight.grad = None
    hidden = torch.tanh(embed(ids[:, :-1]))
    logits = hidden @ embed.weight.T
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    (-(adv * torch.exp(logp - logp.detach()))).mean().backward()
    assert torch.allclose(grad_fused, embed.weight.grad, atol=1e-5, rtol=1e-4)


def test_default_impl_follows_device():
    assert loss_module.resolve_impl(None, torch.device("cpu")) == "torch"
    assert loss_module.resolve_impl(None, torch.device("cuda")) == "triton"


BAD_INPUTS = [
    (dict(targets_value=11), "outside \\[0, 11\\)"),
    (dict(targets_value=-3), "outside \\[0, 11\\)"),
    (dict(weight_shape=(11, 9)), "hidden size"),
    (dict(targets_shape=(5,)), "targets shape"),
    (dict(weight_dtype=torch.float64), "dtype"),
    (dict(bias_shape=(10,)), "bias"),
    (dict(kw=dict(kl_coef=0.1, advantages=torch.randn(4))), "ref_logprobs"),
    (dict(kw=dict(kl_estimator="k4", advantages=torch.randn(4))), "kl_estimator"),
    (dict(kw=dict(advantages=torch.randn(5))), "advantages has shape"),
    (dict(kw=dict(pg_mask=torch.ones(4))), "pg_mask must be a bool"),
    (dict(kw=dict(sft_weights=torch.ones(4, dtype=torch.long))), "sft_weights must be a float"),
    (dict(kw=dict(temperature=0.0)), "temperature"),
    (dict(kw=dict(logit_scale=0.0)), "logit_scale must be a finite number > 0"),
    (dict(kw=dict(logit_scale=float("inf"))), "logit_scale must be a finite number > 0"),
    (dict(kw=dict(softcap=-30.0)), "softcap must be a finite number > 0"),
    (dict(kw=dict(softcap=float("nan"))), "softcap must be a finite number > 0"),
    (dict(kw=dict(clip_low=1.0)), "clip_low"),
    (dict(kw=dict(normalizer=0.0)), "normalizer"),
    (dict(kw=dict(normalizer=torch.tensor(0.0))), "normalizer must be a finite number > 0"),
    (dict(kw=dict(normalizer=torch.tensor(float("nan")))), "normalizer must be a finite number > 0"),
    (dict(kw=dict(normalizer=torch.tensor(-3.0))), "normalizer must be a finite number > 0"),
    (dict(kw=dict(normalizer=torch.tensor([1.0, 2.0]))), "one-element real tensor"),
    (dict(kw=dict(normalizer=torch.tensor(True))), "one-element real tensor"),
    (dict(kw=dict(normalizer="4")), "normalizer must be a number"),
    (dict(kw=dict(entropy_coef=0.1, advantages=None)), "neither advantages nor pg_mask"),
    (dict(kw=dict(clip_low="0.2")), "clip_low must be a Python number .*got str"),
    (dict(kw=dict(kl_coef=True)), "kl_coef must be a Python number .*got bool"),
    (dict(kw=dict(temperature=torch.tensor(0.7))), "temperature must be a Python number .*got Tensor"),
    (dict(kw=dict(ignore_index=None)), "ignore_index must be a Python int"),
    (dict(kw=dict(ignore_index=-100.0)), "ignore_index must be a Python int"),
    (dict(kw=dict(impl="cuda")), "impl"),
    (dict(targets_dtype=torch.float32), "integer token ids"),
]


@pytest.mark.parametrize("case,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_a_value_error_that_names_it(case, message):
    hidden = torch.randn(4, 8)
    weight = torch.randn(*case.get("weight_shape", (11, 8)), dtype=case.get("weight_dtype", torch.float32))
    targets = torch.randint(0, 11, case.get("targets_shape", (4,))).to(case.get("targets_dtype", torch.int64))
    if "targets_value" in case:
        targets[2] = case["targets_value"]
    bias = torch.randn(*case["bias_shape"]) if "bias_shape" in case else None
    # The cases' tensors were made at import, on the CPU: on a GPU they join the inputs there, so that each case meets
    # the check it is about, not the device check.
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in case.get("kw", {}).items()}
    with pytest.raises(ValueError, match=message):
        fastrft.fused_rft_loss(hidden, weight, targets, bias=bias, **kw)


@pytest.mark.parametrize("kw,message", [
    (dict(ignore_index=None), "ignore_index must be a Python int"),
    (dict(temperature=torch.tensor(0.7)), "temperature must be a Python number"),
], ids=["ignore_index", "temperature"])
def test_lm_head_logprobs_bad_option_is_a_value_error_that_names_it(kw, message):
    hidden, weight, bias, targets = make_inputs(4, 8, 11)
    with pytest.raises(ValueError, match=message):
        fastrft.lm_head_logprobs(hidden, weight, targets, **kw)


def test_module_refuses_bias_as_an_option():
    """FusedRFTLoss reads the bias of its head: bias given as an option would collide with it at every call."""
    head = nn.Linear(8, 11)
    with pytest.raises(ValueError, match="bias is not an option of FusedRFTLoss: it reads the bias of its LM head"):
        fastrft.FusedRFTLoss(head, bias=None)
    hidden, _, _, targets = make_inputs(4, 8, 11)
    with pytest.raises(ValueError, match="bias is not an option of FusedRFTLoss"):
        fastrft.FusedRFTLoss(head)(hidden, targets, advantages=torch.randn(4), bias=head.bias)


@pytest.mark.parametrize("defaults,message", [
    (dict(clip_low=5), "clip_low must be < 1"),
    (dict(clip_high="0.3"), "clip_high must be a Python number"),
    (dict(kl_estimator="k5"), "unknown kl_estimator"),
    (dict(temperature=0), "temperature must be a finite number > 0"),
    (dict(softcap=float("nan")), "softcap must be a finite number > 0"),
    (dict(normalizer=0.0), "normalizer must be a finite number > 0"),
    (dict(ignore_index=None), "ignore_index must be a Python int"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(clip=0.2), r"unknown fused_rft_loss options: \['clip'\]"),
], ids=lambda x: next(iter(x)) if isinstance(x, dict) else None)
def test_module_checks_its_defaults_at_construction(defaults, message):
    """Options given to FusedRFTLoss are checked where they are given, by fused_rft_loss's own checks, not at the
    first call."""
    with pytest.raises(ValueError, match=message):
        fastrft.FusedRFTLoss(nn.Linear(8, 11), **defaults)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("v,h", [(0, 8), (11, 0)], ids=["V=0", "H=0"])
def test_an_empty_head_is_a_value_error(impl, v, h):
    with pytest.raises(ValueError, match="LM-head weight is empty"):
        fastrft.fused_rft_loss(torch.randn(4, h), torch.randn(v, h), torch.zeros(4, dtype=torch.long), impl=impl)
    with pytest.raises(ValueError, match="LM-head weight is empty"):
        fastrft.token_logprobs(torch.randn(4, h), torch.randn(v, h), torch.zeros(4, dtype=torch.long), impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_tensor_normalizer_acts_as_the_same_number(impl):
    hidden, weight, bias, targets = make_inputs(6, 8, 13, ignored=0.0)
    adv = torch.randn(6)
    expected = fastrft.fused_rft_loss(hidden, weight, targets, advantages=adv, normalizer=5.0, impl=impl).loss
    for normalizer in (torch.tensor(5.0), torch.tensor([5.0]), torch.tensor(5, dtype=torch.int64)):
        out = fastrft.fused_rft_loss(hidden, weight, targets, advantages=adv, normalizer=normalizer, impl=impl)
        assert out.loss.shape == () and torch.equal(out.loss, expected)
        assert out.metrics["normalizer"] == 5.0


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_flow_through_the_log_probs_and_entropies_only(impl):
    """The per-token inputs and a tensor normalizer are constants of the loss, whatever graph they carry: an
    old_logprobs still on the policy's graph would otherwise cancel the ratio's gradient."""
    hidden, weight, _, targets = make_inputs(6, 8, 13, ignored=0.0)
    torch.manual_seed(1)
    adv, sft = torch.randn(6), torch.rand(6)

    def hidden_grad(old_logprobs, ref_logprobs, advantages, sft_weights, normalizer):
        h = hidden.detach().clone().requires_grad_()
        fastrft.fused_rft_loss(h, weight, targets, advantages=advantages, old_logprobs=old_logprobs,
                               ref_logprobs=ref_logprobs, sft_weights=sft_weights, kl_coef=0.1,
                               normalizer=normalizer, impl=impl).loss.backward()
        return h.grad

    h = hidden.detach().clone().requires_grad_()
    on_graph, _ = fastrft.lm_head_logprobs(h, weight, targets, impl=impl)   # the policy's, with its graph
    given = [t.clone().requires_grad_() for t in (on_graph.detach() - 0.1, adv, sft, torch.tensor(4.0))]
    expected = hidden_grad(on_graph.detach(), on_graph.detach() - 0.1, adv, sft, 4.0)
    torch.testing.assert_close(hidden_grad(on_graph, *given), expected, rtol=0, atol=0)
    assert h.grad is None and all(t.grad is None for t in given)


@pytest.mark.parametrize("impl", IMPLS)
def test_log_ratios_past_exps_range_give_finite_gradients(impl):
    """Rows whose log-ratio to the behaviour policy (or whose k3 exponent ref - logp) lies past exp's fp32 range:
    the loss and every gradient stay finite; rows in range keep the reference's gradient."""
    hidden, weight, bias, targets = make_inputs(8, 16, 29, ignored=0.0)
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 1.0, -1.0])
    with torch.no_grad():
        logp = fastrft.token_logprobs(hidden, weight, targets, bias=bias, impl=impl)
    far = torch.tensor([True, True, False, False, True, False, False, False])
    old = torch.where(far, logp - 100.0, logp + 0.1)                 # logp - old = 100 on the far rows
    ref = torch.where(torch.tensor([False, False, True, True, False, False, False, False]), logp + 95.0, logp - 0.2)
    out, grads = run(impl, hidden, weight, targets, bias=bias, advantages=adv, old_logprobs=old, ref_logprobs=ref,
                     kl_coef=0.1)
    assert math.isfinite(out.loss.item())
    for g in grads:
        assert torch.isfinite(g).all()
    # The in-range rows alone: the same gradient as the float64 reference on them.
    near = ~(far | (ref - logp > 50))
    masked = torch.where(near, targets, -100)
    _, near_grads = run(impl, hidden, weight, masked, bias=bias, advantages=adv, old_logprobs=old, ref_logprobs=ref,
                        kl_coef=0.1, normalizer=8.0)
    _, _, _, ref_grads = reference(hidden, weight, masked, bias=bias, advantages=adv, old_logprobs=old,
                                   ref_logprobs=ref, kl_coef=0.1, normalizer=8.0)
    for g, rg in zip(near_grads, ref_grads):
        assert_close(g, rg, 1e-5 * (rg.abs().max().item() + 1), 2e-4, "in-range gradient")


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_of_peaked_rows_at_large_logits(impl):
    """Low-entropy rows whose logits are large (hundreds): no cancellation between the log-sum-exp and a mean
    logit, so the entropy is >= 0 and close to the float64 one relative to its own size."""
    generator = torch.Generator(device=DEVICE).manual_seed(3)
    n, v = 16, 257
    weight = torch.eye(v, device=DEVICE)        # logits = hidden
    targets = torch.randint(0, v, (n,), generator=generator, device=DEVICE)
    # Every logit near 500, the target's 18-28 above the rest: entropies from ~1e-9 to ~1e-4.
    hidden = 500 + torch.rand(n, v, generator=generator, device=DEVICE)
    hidden[torch.arange(n), targets] += 18 + 10 * torch.rand(n, generator=generator, device=DEVICE)
    bias = None
    entropy = fastrft.fused_rft_loss(hidden, weight, targets, bias=bias, advantages=torch.ones(n), impl=impl).entropy
    expected = reference(hidden, weight, targets, bias=bias)[2]
    assert (expected < 1e-3).all() and (expected > 0).all()
    assert (entropy >= 0).all()
    relative = ((entropy.double() - expected).abs() / expected).max().item()
    assert relative < 1e-3, f"entropy's relative error {relative:.2g}"


def test_torch_path_resident_memory_stays_bounded(tmp_path):
    """fwd+bwd of the chunked PyTorch path at N=2048, H=64, V=32768 (fp32) grows the process's peak resident memory
    by less than 100 MB beyond its inputs and gradients: two reused [chunk, V] buffers, not fresh 16 MB temporaries
    per chunk, which the allocator would keep. In a fresh process, so that the peak is this computation's alone."""
    import subprocess
    import sys

    script = """
import resource, sys, torch, fastrft
torch.manual_seed(0)
n, h, v = 2048, 64, 32768
hidden = torch.randn(n, h, requires_grad=True)
weight = (torch.randn(v, h) / 8).requires_grad_()
targets = torch.randint(0, v, (n,))
advantages = torch.randn(n)
hidden.grad = torch.zeros_like(hidden); weight.grad = torch.zeros_like(weight)   # gradients: part of the baseline
small = fastrft.fused_rft_loss(hidden[:4], weight, targets[:4], advantages=advantages[:4], impl="torch")
small.loss.backward()                                                            # code paths warmed, at small N
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = fastrft.fused_rft_loss(hidden, weight, targets, advantages=advantages, entropy_coef=0.01, impl="torch")
out.loss.backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    env = {k: val for k, val in __import__("os").environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                            check=True)
    growth_mb = float(result.stdout.strip().splitlines()[-1])
    assert growth_mb < 100, f"peak resident memory grew by {growth_mb:.0f} MB"


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
        loss_module.resolve_impl("triton", torch.device("cpu"))


def test_convergence_matches_reference_path():
    """A tiny policy trained a few steps with the fused loss (Triton kernels) and with the float64 reference formula
    follows the same loss curve."""
    vocab, width, steps = 37, 16, 6

    def train(use_kernel):
        torch.manual_seed(1)
        embed, head = nn.Embedding(vocab, width), nn.Linear(width, vocab)
        opt = torch.optim.SGD([*embed.parameters(), *head.parameters()], lr=0.5)
        gen = torch.Generator(DEVICE).manual_seed(2)
        curve = []
        for _ in range(steps):
            ids = torch.randint(0, vocab, (4, 9), generator=gen)
            adv = torch.randn(4, 8, generator=gen)
            hidden = torch.tanh(embed(ids[:, :-1]))
            kwargs = dict(bias=head.bias, advantages=adv, sft_weights=(adv > 1).float(), entropy_coef=0.01)
            if use_kernel:
                loss = fastrft.fused_rft_loss(hidden, head.weight, ids[:, 1:], impl="triton", **kwargs).loss
            else:
                loss_ref = reference(hidden.reshape(-1, width), head.weight, ids[:, 1:].reshape(-1),
                                     **{k: v.reshape(-1) if k != "bias" and torch.is_tensor(v) else v
                                        for k, v in kwargs.items()})[0]
                # reference() works on detached copies; rebuild the same loss on the live graph for the update.
                logits = hidden @ head.weight.T + head.bias
                log_probs = torch.log_softmax(logits, -1)
                logp = log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)
                ent = -(log_probs.exp() * log_probs).sum(-1)
                rows = -adv * torch.exp(logp - logp.detach()) - 0.01 * ent - (adv > 1).float() * logp
                loss = rows.sum() / rows.numel()
                assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        return curve

    fused, ref = train(True), train(False)
    assert fused == pytest.approx(ref, rel=1e-4, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled kernels at a real shape")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("workspace_mb", [48, 8], ids=["one sweep", "row slabs then vocabulary slabs"])
def test_cuda_kernels_at_a_real_shape(dtype, workspace_mb, monkeypatch):
    """The compiled kernels (not the interpreter) on a vocabulary and width of a real model, against float64, in
    both backward regimes (8 MB: three row slabs, then a 16-bit grad_W in its own sweep)."""
    from fastrft.kernels import fused_rft as kernels

    monkeypatch.setattr(kernels, "WORKSPACE_BYTES", workspace_mb << 20)
    n, h, v = 1024, 1536, 151_936
    hidden, weight, bias, targets = make_inputs(n, h, v, dtype=dtype, bias=False, device="cuda")
    kwargs = dict(advantages=torch.randn(n, device="cuda"), sft_weights=torch.rand(n, device="cuda"),
                  entropy_coef=0.01, temperature=0.9)
    out, grads = run("triton", hidden, weight, targets, **kwargs)
    ref_loss, ref_logp, ref_entropy, ref_grads = reference(hidden, weight, targets, **kwargs)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert_close(out.loss, ref_loss, tol, tol, "loss")
    assert_close(out.logprobs, ref_logp, tol, tol, "logprobs")
    assert_close(out.entropy, ref_entropy, tol, tol, "entropy")
    for name, g, rg in zip(("hidden", "weight"), grads, ref_grads):
        scale = rg.abs().max().item()
        assert_close(g, rg, tol * scale, tol, f"grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_whole_under_torch_compile(impl):
    """The loss is a registered custom op: torch.compile traces a training step through it with no graph break,
    the Triton kernels (in the interpreter on the CPU) as well as the PyTorch path."""
    torch._dynamo.reset()
    hidden, weight, bias, targets = make_inputs(16, 8, 23)
    adv, old = torch.randn(16), torch.randn(16) - 3

    def step(hidden, weight, bias, targets, adv, old):
        out = fastrft.fused_rft_loss(hidden, weight, targets, bias=bias, advantages=adv, old_logprobs=old,
                                     entropy_coef=0.01, impl=impl)
        return out.loss, out.metrics["clip_frac"]

    loss, clip_frac = torch.compile(step, fullgraph=True)(hidden, weight, bias, targets, adv, old)
    loss.backward()
    compiled_grads = [x.grad.clone() for x in (hidden, weight, bias)]
    ref_loss, _, _, ref_grads = reference(hidden, weight, targets, bias=bias, advantages=adv, old_logprobs=old,
                                          entropy_coef=0.01)
    assert_close(loss.detach(), ref_loss, 2e-5, 2e-4, "compiled loss")
    assert torch.is_tensor(clip_frac)
    for g, rg in zip(compiled_grads, ref_grads):
        assert_close(g, rg, 2e-5, 2e-4, "compiled grad")


@pytest.mark.parametrize("splits", [1, 2, 3, 9])
def test_vocabulary_split_merges_to_the_whole_sweep(splits):
    """The forward launcher's vocab_splits (on a GPU: as many as fill it): the partial states of the splits merge
    to the whole sweep's statistics (the maximum, the rest of the exponential sum, its spread sum, the target)."""
    from fastrft.kernels import fused_rft as kernels

    hidden, weight, bias, targets = make_inputs(70, 24, 1031, ignored=0.0)
    row_max, rest, dsum, target_logit = kernels.fused_rft_forward(
        hidden.detach(), weight.detach(), bias.detach(), targets, torch.arange(70), 1.0 / 0.8, 0.0, vocab_splits=splits)
    logits = (hidden.double() @ weight.double().T + bias.double()) / 0.8
    exact_max = logits.max(-1).values
    e = torch.exp(logits - exact_max[:, None])
    assert_close(row_max, exact_max, 1e-5, 1e-5, "max")
    assert_close(rest, e.sum(-1) - 1, 1e-5, 1e-5, "rest")
    assert_close(dsum, (e * (exact_max[:, None] - logits)).sum(-1), 1e-5, 1e-5, "spread sum")
    assert_close(target_logit, logits.gather(1, targets[:, None]).squeeze(1), 1e-5, 1e-5, "target logit")


@triton.jit
def _store_rounded(x_ptr, y_ptr, N: tl.constexpr, UPCAST: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, _rounded(tl.load(x_ptr + i), y_ptr.dtype.element_ty, UPCAST))


def test_bf16_results_round_to_nearest_even():
    """The kernels' fp32 -> bf16 stores round to nearest even, as on the GPU (the interpreter alone would truncate):
    halfway cases, both signs, tiny and huge values, against PyTorch's own rounding."""
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-130, 3e38, 0.0, -0.0, 65504.5])
    x = torch.cat([ties, torch.randn(1024 - ties.numel()) * 1e-3])
    y = torch.empty(1024, dtype=torch.bfloat16)
    _store_rounded[(1,)](x, y, N=1024, UPCAST=DEVICE == "cpu")
    assert torch.equal(y, x.to(torch.bfloat16))


# Shapes near real ones: Qwen2.5-0.5B's head (H 896, V 151936) and a Llama-2-7B-like one (H 2048, V 32000). The
# Triton interpreter runs the shipped tiles at about 4 ms a tile step, so on the CPU the kernels see the real H with
# 64 rows and a vocabulary of 4096 (the full shapes run on a GPU); the PyTorch path runs the full shapes everywhere.
REAL_SHAPES = {"qwen2.5-0.5b-head": (64, 896, 151936), "llama-like-head": (128, 2048, 32000)}
# fp16 on a GPU only: the CPU's fp16 matmuls (PyTorch's own error) are an order of magnitude slower than bf16's.
PRECISION_CASES = [("qwen2.5-0.5b-head", torch.bfloat16, False), ("qwen2.5-0.5b-head", torch.bfloat16, True),
                   ("llama-like-head", torch.float16 if DEVICE == "cuda" else torch.bfloat16, False),
                   ("llama-like-head", torch.bfloat16, True)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,dtype,peaked", PRECISION_CASES,
                         ids=[f"{s}-{str(d)[6:]}-{'peaked' if p else 'spread'}" for s, d, p in PRECISION_CASES])
def test_errors_per_element_no_worse_than_pytorch(impl, shape, dtype, peaked):
    """CCE's habit, per element: every element of grad_hidden and grad_weight is within k = 2 times PyTorch's own
    largest error in its row (the materialised-logits computation on the same low-precision inputs; a row's
    elements are sums over the same terms), every element of logp and entropy within k times PyTorch's largest
    error on them, plus one unit in the last place of the output dtype. (Against PyTorch's error on the very same
    element, errors of one kind fail by their tails alone: out of millions, some element where PyTorch happens to
    be exact.) peaked: targets with p near 1, where 1 - p_t cancels."""
    n, h, v = REAL_SHAPES[shape]
    if impl == "triton" and DEVICE == "cpu":
        n, v = 64, 4096
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    weight = torch.randn(v, h, device=DEVICE, generator=generator) / math.sqrt(h)
    targets = torch.randint(0, v, (n,), device=DEVICE, generator=generator)
    hidden = torch.randn(n, h, device=DEVICE, generator=generator)
    if peaked:   # hidden along its target's row: that logit stands ~20 above the rest, p_t > 0.99
        hidden = hidden * 0.3 + 20 * weight[targets] / weight[targets].norm(dim=1, keepdim=True) ** 2
    hidden = hidden.to(dtype).requires_grad_()
    weight = weight.to(dtype).requires_grad_()
    advantages = torch.randn(n, device=DEVICE, generator=generator)
    sft_weights = torch.rand(n, device=DEVICE, generator=generator)
    out, grads = run(impl, hidden, weight, targets, advantages=advantages, sft_weights=sft_weights,
                     entropy_coef=0.01)
    _, ref_logp, ref_entropy, ref_grads = reference(hidden, weight, targets, advantages=advantages,
                                                    sft_weights=sft_weights, entropy_coef=0.01)
    if peaked:
        assert (ref_logp > math.log(0.99)).float().mean() > 0.9

    # PyTorch's own: logits in the input dtype, the rest in fp32, gradients back in the input dtype.
    h_lp, w_lp = (x.detach().clone().requires_grad_() for x in (hidden, weight))
    log_probs = torch.log_softmax((h_lp @ w_lp.T).float(), -1)
    logp_lp = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    entropy_lp = -(log_probs.exp() * log_probs).sum(-1)
    ratio = torch.exp(logp_lp - logp_lp.detach())
    rows = -torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.28) * advantages) - 0.01 * entropy_lp \
        - sft_weights * logp_lp
    (rows.sum() / n).backward()

    def check(ours, theirs, exact, what, ulp):
        ours_err, theirs_err = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
        # The elements of a gradient row are sums over the same terms (a row of dL/dz against W, or a column of it
        # against h), which set their error scale; logp and entropy all come from log-sum-exps of one scale.
        worst_theirs = theirs_err.amax(-1, keepdim=True)
        bound = 2.0 * worst_theirs + ulp * exact.abs() + 1e-30
        worst = (ours_err / bound).max().item()
        rms = (ours_err.square().mean() / theirs_err.square().mean()).sqrt().item()
        assert worst <= 1.0, f"{what}: an element's error is {worst:.2f}x its bound (RMS error {rms:.2f}x PyTorch's)"

    eps32, eps = torch.finfo(torch.float32).eps, torch.finfo(dtype).eps
    check(out.logprobs, logp_lp, ref_logp, "logp", eps32)
    check(out.entropy, entropy_lp, ref_entropy, "entropy", eps32)
    check(grads[0], h_lp.grad, ref_grads[0], "grad hidden", eps)
    check(grads[1], w_lp.grad, ref_grads[1], "grad weight", eps)


@pytest.mark.parametrize("value,expected",
                         [("48", 48 << 20), ("0.5", 1 << 19), ("0", None), ("inf", None), ("lots", None)])
def test_workspace_budget_from_the_environment(monkeypatch, value, expected):
    from fastrft.kernels import fused_rft as kernels

    monkeypatch.setenv("FASTRFT_WORKSPACE_MB", value)
    if expected is None:
        with pytest.raises(ValueError, match="FASTRFT_WORKSPACE_MB"):
            kernels._workspace_bytes_from_env()
    else:
        assert kernels._workspace_bytes_from_env() == expected
