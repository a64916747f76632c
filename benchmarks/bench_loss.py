"""How fast and how lean is the fused RFT loss against the other ways of computing it?

Per shape (N tokens, H hidden, V vocab), in one process, fwd+bwd of the loss on the LM head (gradients of hidden and
weight) for every provider that can run here:
  naive           logits materialised by matmul, fp32 log-softmax, the RFT loss by autograd
  naive_compile   the same under torch.compile
  trl_selective   logits materialised, TRL's selective_log_softmax (its memory-saving log-prob path)
  liger_grpo      Liger-Kernel's LigerFusedLinearGRPOLoss (policy-gradient part)
  liger_flce      Liger-Kernel's fused linear cross-entropy (the cross-entropy part only)
  cce             Apple's cut-cross-entropy linear_cross_entropy (the cross-entropy part only)
  fastrft         fastrft.fused_rft_loss (Triton on CUDA, within its default 48 MB of backward scratch; the chunked
                  PyTorch path on the CPU)
  fastrft_1sweep  the same with the scratch budget raised to hold the fp32 hidden gradient of every row: one backward
                  sweep over the logits instead of two at large N, for about 8.5*N*H more bytes (CUDA only)
  fastrft_torch   fastrft.fused_rft_loss(impl="torch") on CUDA, to show what the kernels buy
Each shape also runs with half the rows at zero coefficient (zero advantage, no refined target), which fastrft
skips in the backward pass.

Reported: median time over --repeat runs after --warmup (CUDA events on the GPU, perf_counter on the CPU); the floor
6*N*H*V / (measured matmul rate in the same dtype) and each time as a multiple of it; peak memory beyond inputs and
gradients (CUDA: max_memory_allocated; CPU: the peak RSS of a fresh process per provider, reset through
/proc/self/clear_refs after one warm-up call, with glibc's mmap threshold fixed there so that freed buffers leave
the RSS; the times are taken in the parent, with the allocator's own settings, as users run). Prints a table, then
one JSON line; writes benchmarks/results/bench_loss_<device>.{json,md}.

    python benchmarks/bench_loss.py                      # the issue's shapes on CUDA, small ones on the CPU
    python benchmarks/bench_loss.py --shapes 4096x2048x32000 --providers naive,fastrft
    python benchmarks/bench_loss.py --shapes 8192x4096x131072 --providers cce,fastrft,fastrft@128x128x64x8x3
fastrft@BMxBVxBKxWARPSxSTAGES (and fastrft_1sweep@...) times the Triton kernels with other tiles than they ship
with (the logit kernels'; +BMxBNxBKxGROUP_MxWARPSxSTAGES after them: the slab matmul's), after checking that they
give the shipped tiles' loss and gradients: tiles are chosen by timing them on the GPU (CUDA only). The fastrft
rows on CUDA also give the forward pass's time alone.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from memory import allocator_env, peak_extra_bytes
from report import OUT_HELP, check_minimums, say_written

import torch

import fastrft
from fastrft.machine import describe_machine

GPU_SHAPES = ["8192x4096x131072", "16384x4096x151936", "8192x2304x256000", "32768x4096x128256"]
CPU_SHAPES = ["1024x256x8192", "512x512x32000"]
PROVIDERS = ["naive", "naive_compile", "trl_selective", "liger_grpo", "liger_flce", "cce", "fastrft", "fastrft_1sweep",
             "fastrft_torch"]
RESULTS = Path(__file__).resolve().parent / "results"


def rft_loss_from_logp(logp, adv, sft_w, valid):
    """The contract's loss, on-policy, for the providers that only produce log-probs."""
    ratio = torch.exp(logp - logp.detach())
    rows = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv) - sft_w * logp
    return (rows * valid).sum() / valid.sum().clamp(min=1)


def make_provider(name, device):
    """(fn(hidden, weight, targets, adv, sft_w) -> loss, note) or raises RuntimeError saying why it cannot run."""
    on_cuda = device.type == "cuda"
    if name == "naive":
        def naive(h, w, t, adv, sft_w):
            logp = torch.log_softmax((h @ w.T).float(), -1).gather(-1, t[:, None]).squeeze(-1)
            return rft_loss_from_logp(logp, adv, sft_w, torch.ones_like(adv))
        return naive, ""
    if name == "naive_compile":
        naive, _ = make_provider("naive", device)
        return torch.compile(naive), ""
    if name == "trl_selective":
        try:
            from trl.trainer.utils import selective_log_softmax
        except ImportError as exc:
            raise RuntimeError(f"trl not installed ({exc})") from None

        def trl(h, w, t, adv, sft_w):
            return rft_loss_from_logp(selective_log_softmax(h @ w.T, t), adv, sft_w, torch.ones_like(adv))
        return trl, ""
    if name in ("liger_grpo", "liger_flce", "cce") and not on_cuda:
        raise RuntimeError("needs CUDA")
    if name == "liger_grpo":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError as exc:
            raise RuntimeError(f"liger-kernel not installed ({exc})") from None
        grpo = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28,
                                        loss_type="dapo")   # no KL term: no reference inputs (Liger >= 0.8)

        def liger_grpo(h, w, t, adv, sft_w):
            # One sequence per row block of 1024 tokens, advantages per sequence.
            seq = 1024 if h.shape[0] % 1024 == 0 else h.shape[0]
            b = h.shape[0] // seq
            out = grpo(h.view(b, seq, -1), w, t.view(b, seq), torch.ones(b, seq, device=h.device), adv.view(b, seq)[:, 0])
            return out[0] if isinstance(out, tuple) else out
        return liger_grpo, "policy-gradient part, per-sequence advantages"
    if name == "liger_flce":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as exc:
            raise RuntimeError(f"liger-kernel not installed ({exc})") from None
        flce = LigerFusedLinearCrossEntropyLoss()
        return (lambda h, w, t, adv, sft_w: flce(w, h, t)), "cross-entropy part only"
    if name == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as exc:
            raise RuntimeError(f"cut-cross-entropy not installed ({exc})") from None
        return (lambda h, w, t, adv, sft_w: linear_cross_entropy(h, w, t)), "cross-entropy part only"
    if name in ("fastrft", "fastrft_1sweep", "fastrft_torch"):
        if name != "fastrft" and not on_cuda:
            raise RuntimeError("on the CPU 'fastrft' runs the chunked PyTorch path; this variant is CUDA only")
        impl = "torch" if name == "fastrft_torch" else None

        def fused(h, w, t, adv, sft_w):
            return fastrft.fused_rft_loss(h, w, t, advantages=adv, sft_weights=sft_w, impl=impl).loss
        if not on_cuda or impl == "torch":
            return fused, "chunked PyTorch"
        from fastrft.kernels.fused_rft import WORKSPACE_BYTES
        return fused, ("Triton, scratch for one backward sweep" if name == "fastrft_1sweep"
                       else f"Triton, {WORKSPACE_BYTES >> 20} MB scratch")
    raise ValueError(f"unknown provider {name!r}; known: {PROVIDERS}")


class Meter:
    """Timing of one callable on one device."""

    def __init__(self, device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn, warmup, repeat):
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeat):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def matmul_tflops(meter, n, h, v, dtype, device):
    # The product the loss computes, hidden @ weight.T with weight [V, H] as a model stores it. An H200 once gave a
    # [H, V] product over 2 warm-ups and 5 runs a rate (537 TFLOP/s, against 764 at another shape) that put naive
    # and torch.compile under 1x of the floor; the cause was not found.
    a = torch.randn(n, h, device=device, dtype=dtype)
    b = torch.randn(v, h, device=device, dtype=dtype)
    ms = meter.time_ms(lambda: a @ b.T, warmup=10, repeat=20)
    return 2 * n * h * v / (ms * 1e-3) / 1e12


def make_inputs(shape, dtype, device, zero_half):
    """The same inputs for every provider (and in the memory-measuring child process)."""
    n, h, v = map(int, shape.split("x"))
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(n, h, device=device, generator=gen) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=gen) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    adv = torch.randn(n, device=device, generator=gen)
    sft_w = (torch.rand(n, device=device, generator=gen) < 0.25).float()
    if zero_half:
        adv[: n // 2] = 0
        sft_w[: n // 2] = 0
    return hidden, weight, targets, adv, sft_w


def split_provider(spec: str) -> tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]:
    """'fastrft@BMxBVxBKxWxS' (or fastrft_1sweep@...), optionally '+BMxBNxBKxGMxWxS' after it: the provider and the
    tiles its Triton kernels take instead of the shipped ones (the logit kernels' _block_config, the slab matmul's
    _matmul_config); a plain name gets (name, None, None)."""
    name, _, tiles = spec.partition("@")
    if not tiles:
        return name, None, None
    if name not in ("fastrft", "fastrft_1sweep"):
        raise ValueError(f"{spec!r}: only fastrft and fastrft_1sweep take tiles")
    logit, _, matmul = tiles.partition("+")
    try:
        parsed = [tuple(int(x) for x in part.split("x")) if part else None for part in (logit, matmul)]
    except ValueError:
        raise ValueError(f"{spec!r}: tiles are integers joined by x") from None
    if len(parsed[0] or ()) != 5 or (parsed[1] is not None and len(parsed[1]) != 6):
        raise ValueError(f"{spec!r}: logit tiles BLOCK_MxBLOCK_VxBLOCK_KxWARPSxSTAGES, then optionally "
                         "+BLOCK_MxBLOCK_NxBLOCK_KxGROUP_MxWARPSxSTAGES for the slab matmul")
    return name, parsed[0], parsed[1]


@contextlib.contextmanager
def provider_settings(name, logit_tiles, matmul_tiles, hidden):
    """fastrft_1sweep: the Triton backward's scratch budget raised so that it sweeps the logits once at any N (the
    fp32 hidden gradient of every row in scratch); tiles (split_provider's): the kernels launched with them. Every
    other provider runs as it is."""
    if name != "fastrft_1sweep" and logit_tiles is None:
        yield
        return
    from fastrft.kernels import fused_rft as kernels

    saved = kernels.WORKSPACE_BYTES, kernels._block_config, kernels._matmul_config
    if name == "fastrft_1sweep":
        n, h = hidden.shape
        kernels.WORKSPACE_BYTES = int(2 * n * kernels.accumulator_row_bytes(h, hidden.dtype)) + saved[0]
    if logit_tiles is not None:
        kernels._block_config = lambda dtype: logit_tiles
    if matmul_tiles is not None:
        kernels._matmul_config = lambda dtype: matmul_tiles
    try:
        yield
    finally:
        kernels.WORKSPACE_BYTES, kernels._block_config, kernels._matmul_config = saved


def make_step(spec, shape, dtype, device, zero_half):
    """(fwd+bwd callable, forward-only callable, note, bytes of the gradients it creates)."""
    hidden, weight, targets, adv, sft_w = make_inputs(shape, dtype, device, zero_half)
    name, logit_tiles, matmul_tiles = split_provider(spec)
    fn, note = make_provider(name, device)
    if logit_tiles is not None:
        if device.type != "cuda":
            raise RuntimeError("tiles are the Triton kernels': CUDA only")
        note += f", tiles {'x'.join(map(str, logit_tiles))}" + \
            (f" + {'x'.join(map(str, matmul_tiles))}" if matmul_tiles else "")

    def step():
        with provider_settings(name, logit_tiles, matmul_tiles, hidden):
            fn(hidden, weight, targets, adv, sft_w).backward()
        # Freed here, not at the next call's start: a measured call then starts without gradients, and its peak
        # minus the gradients it creates is what the loss itself needs.
        hidden.grad = weight.grad = None

    def forward():
        with provider_settings(name, logit_tiles, matmul_tiles, hidden), torch.no_grad():
            fn(hidden, weight, targets, adv, sft_w)

    return step, forward, note, (hidden.numel() + weight.numel()) * hidden.element_size()


def tiles_error(spec, shape, dtype, device, zero_half) -> float:
    """The largest relative error (by norm) of the loss and both gradients with the spec's tiles against the shipped
    tiles, on the same inputs: a tile choice must change rounding only."""
    name, logit_tiles, matmul_tiles = split_provider(spec)
    fn, _ = make_provider(name, device)
    results = []
    for tiles in ((None, None), (logit_tiles, matmul_tiles)):
        hidden, weight, targets, adv, sft_w = make_inputs(shape, dtype, device, zero_half)
        with provider_settings(name, *tiles, hidden):
            loss = fn(hidden, weight, targets, adv, sft_w)
            loss.backward()
        results.append([loss.detach().float(), hidden.grad.float(), weight.grad.float()])
    return max(float((b - a).norm() / a.norm().clamp(min=1e-30)) for a, b in zip(*results))


def bench_shape(shape, providers, dtype, device, args, meter):
    n, h, v = map(int, shape.split("x"))
    rate = matmul_tflops(meter, n, h, v, dtype, device)
    floor_ms = 6 * n * h * v / (rate * 1e12) * 1e3
    rows = []
    for zero_half in (False, True):
        for name in providers:
            row = dict(shape=shape, N=n, H=h, V=v, provider=name, zero_half=zero_half, floor_ms=floor_ms)
            try:
                step, forward, note, grad_bytes = make_step(name, shape, dtype, device, zero_half)
                if split_provider(name)[1] is not None:
                    error = tiles_error(name, shape, dtype, device, zero_half)
                    if not error < 2e-2:   # bf16 gradients round at 4e-3; a wrong tile is off by far more
                        raise RuntimeError(f"tiles give other results: relative error {error:.2e}")
                    note += f" (relative error {error:.1e})"
                row["ms"] = meter.time_ms(step, args.warmup, args.repeat)
                if device.type == "cuda" and name.startswith("fastrft"):
                    row["fwd_ms"] = meter.time_ms(forward, args.warmup, args.repeat)
                    note += f"; forward {row['fwd_ms']:.2f} ms"
                if device.type == "cuda":
                    peak = peak_extra_bytes(step, device, minus_bytes=grad_bytes)
                else:
                    del step
                    peak = measure_in_child(name, shape, dtype, zero_half)
                row.update(x_floor=row["ms"] / floor_ms, peak_extra_mb=None if peak is None else peak / 2**20,
                           note=note)
            except Exception as exc:  # a provider that cannot run here (missing package, CUDA only, OOM, API)
                row["skipped"] = str(exc).splitlines()[0][:120]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(format_row(row), flush=True)
    return rate, rows


def measure_in_child(name, shape, dtype, zero_half):
    """Peak memory on the CPU, measured in a fresh process (one warm-up call, then the measured one), so that no
    other provider's freed memory is reused and hidden from the RSS."""
    cmd = [sys.executable, __file__, "--measure-memory", name, shape, str(dtype).replace("torch.", ""),
           str(int(zero_half))]
    # Only there the mmap threshold is fixed (memory.py): times are taken with the allocator users run.
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=allocator_env(for_memory=True))
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def child_measure_memory(name, shape, dtype_name, zero_half):
    device = torch.device("cpu")
    step, _, _, grad_bytes = make_step(name, shape, getattr(torch, dtype_name), device, zero_half == "1")
    step()
    print(json.dumps(dict(peak_extra_bytes=peak_extra_bytes(step, device, minus_bytes=grad_bytes))))


def format_row(r):
    label = f"{r['shape']:>20} {'half-zero' if r['zero_half'] else 'all-rows':>9} {r['provider']:>14}"
    if "skipped" in r:
        return f"{label}  skipped: {r['skipped']}"
    peak = f"{r['peak_extra_mb']:9.1f} MB" if r.get("peak_extra_mb") is not None else "        n/a"
    return f"{label} {r['ms']:10.2f} ms {r['x_floor']:7.2f}x floor {peak}  {r.get('note', '')}"


def write_results(env, rates, rows, out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(env=env, matmul_tflops=rates, rows=rows)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"# bench_loss on {env['device']}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, python {env['python']}, commit {env['commit']}"
             f"{' (dirty)' if env['dirty'] else ''}, {env['cpu_threads']} CPU threads", "",
             f"Command: `{env['command']}` (shapes done: {env['shapes_done']})", "",
             "Floor = 6*N*H*V / (measured matmul rate in the same dtype); peak = memory beyond inputs and gradients; "
             "x naive = time (peak) over the naive loss's of the same shape and rows in this run.",
             "", "| shape NxHxV | rows | provider | fwd+bwd ms | x floor | x naive | peak extra MB | peak x naive "
                 "| note |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    naive = {(r["shape"], r["zero_half"]): r for r in rows if r["provider"] == "naive" and "skipped" not in r}

    def over_naive(r, key):
        base = naive.get((r["shape"], r["zero_half"]), {}).get(key)
        if r.get(key) is None or not base:
            return "-"
        ratio = r[key] / base
        return f"{ratio:.2f}" if ratio >= 0.01 else f"{ratio:.1e}"   # a tiny peak reads as one, not as 0.00

    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {'half zero' if r['zero_half'] else 'all'} | {r['provider']} | - | - | - "
                         f"| - | - | skipped: {r['skipped']} |")
        else:
            peak = f"{r['peak_extra_mb']:.1f}" if r.get("peak_extra_mb") is not None else "n/a"
            lines.append(f"| {r['shape']} | {'half zero' if r['zero_half'] else 'all'} | {r['provider']} | "
                         f"{r['ms']:.2f} | {r['x_floor']:.2f} | {over_naive(r, 'ms')} | {peak} | "
                         f"{over_naive(r, 'peak_extra_mb')} | {r['note']} |")
    lines += ["", "Matmul rate used for the floor (TFLOP/s): "
              + ", ".join(f"{k}: {v:.2f}" for k, v in rates.items())]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    say_written(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", help="comma-separated NxHxV (default: the issue's shapes on CUDA, small on CPU)")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help="comma-separated; fastrft@BMxBVxBKxWARPSxSTAGES[+BMxBNxBKxGROUP_MxWARPSxSTAGES] times "
                             "the Triton kernels with other tiles (CUDA only)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--no-write", action="store_true", help="print only; write nothing")
    parser.add_argument("--out", default=None, help=OUT_HELP % "bench_loss_<cpu|cuda>")
    parser.add_argument("--measure-memory", nargs=4, metavar=("PROVIDER", "SHAPE", "DTYPE", "ZERO_HALF"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory:
        return child_measure_memory(*args.measure_memory)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype not in (None, "bfloat16", "float32", "float16"):
        parser.error(f"--dtype must be bfloat16, float32 or float16, got {args.dtype!r}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes = args.shapes.split(",") if args.shapes else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    for shape in shapes:
        sizes = shape.split("x")
        if len(sizes) != 3 or not all(n.isdigit() and int(n) >= 1 for n in sizes):
            parser.error(f"--shapes takes NxHxV, each >= 1 (8192x4096x131072), got {shape!r}")
    check_minimums(parser, args, {"repeat": 1, "warmup": 0})
    providers = args.providers.split(",")
    for name in providers:
        try:
            base = split_provider(name)[0]
        except ValueError as exc:
            parser.error(str(exc))
        if base not in PROVIDERS:
            parser.error(f"unknown provider {name!r}; known: {','.join(PROVIDERS)} (fastrft@tiles: see --help)")
    meter = Meter(device)
    env = describe_machine(device)
    env["dtype"] = str(dtype).replace("torch.", "")
    print(f"{env['device']} | torch {env.get('torch')} | triton {env.get('triton')} | {env['dtype']} | commit {env['commit']}")
    rates, rows = {}, []
    for done, shape in enumerate(shapes, 1):
        rates[shape], shape_rows = bench_shape(shape, providers, dtype, device, args, meter)
        rows += shape_rows   # (each row printed as it is measured; all of them again at the end)
        if not args.no_write:   # after every shape, so that a run stopped by a time limit still leaves its results
            env["shapes_done"] = f"{done} of {len(shapes)}"
            write_results(env, rates, rows, Path(args.out) if args.out else
                          RESULTS / f"bench_loss_{'cuda' if device.type == 'cuda' else 'cpu'}")
    print("\nmatmul rate for the floor: " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in rates.items()))
    print("\n".join(format_row(r) for r in rows))
    print(json.dumps(dict(env=env, matmul_tflops=rates, rows=rows)))


if __name__ == "__main__":
    main()
