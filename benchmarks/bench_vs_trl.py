"""How fast and how lean is fastrft's update step against TRL's GRPOTrainer loss path, on the same model and batch?

One update micro-batch, forward + backward (no optimizer step, no generation), for each provider:
  trl           trl.GRPOTrainer.compute_loss as TRL runs it: since TRL 1.16 the per-token log-probs come from its own
                fused LM head (trl.trainer.utils.add_fused_lm_head: the head applied to vocabulary chunks of the
                completion positions, its Triton kernel on CUDA, a PyTorch loop elsewhere), then its per-token clipped
                loss, loss_type="dapo"
  trl-torch     (CUDA only) the same with TRL's Triton kernel switched off: its PyTorch chunk loop
  fastrft-trl   fastrft.integrations.FastRFTGRPOTrainer.compute_loss on the same batch: TRL's loss on log-probs from
                fastrft.lm_head_logprobs (what a TRL user gets by swapping the class)
  fastrft       fastrft.batch.build_batch (the layout fastrft train picks: packed through a varlen kernel on CUDA, padded
                on the CPU) + fastrft.batch.rft_loss (the policy to its final hidden states, then
                fastrft.fused_rft_loss) + backward: what each step of `fastrft train` runs in its update
The loss is the same on both sides: on-policy clipped policy gradient (clip 0.2 / 0.28), no KL term (beta = 0, so TRL
loads no reference model), temperature 1, DAPO's token-level mean. B sequences, every completion of the full length
L (so both sides see the same tokens; TRL pads the prompts, fastrft lays them out as its trainer does), random token
ids, random advantages, a randomly initialised model (nothing downloaded):
  --model tiny           Llama, hidden 256, 4 layers, vocab 32000 (the CPU default)
  --model qwen2.5-1.5b   the Qwen2.5-1.5B shape: hidden 1536, 28 layers, 12/2 heads, vocab 151936, tied embeddings
                         (the CUDA default, bf16)

Reported per (provider, L): update tokens/s (B * L / median fwd+bwd time over --repeat runs after --warmup), its
time against the floor (the update's FLOPs as bench_step counts them, 3 x (2 x body parameters x tokens + attention
+ 2 x head x completion tokens), over the matmul rate measured in the same run: "x floor") and against TRL's time at
the same L ("vs trl", < 1 is faster), and peak memory beyond what was allocated before the step and the gradients it
leaves (CUDA: max_memory_allocated; CPU: peak RSS, VmHWM after resetting it through /proc/self/clear_refs, with
glibc's mmap threshold fixed so that freed buffers leave the RSS).
Each (provider, L) runs in a fresh process, so no provider reuses another's freed memory; on the CPU its time in
another, with the allocator's own settings as users run (the fixed threshold makes every large allocation a page
fault: it slowed both sides, fastrft's step the more, 0.47-0.52x TRL's time against 0.37-0.40x without). Then, per
provider, the longest L whose peak stays within --budget-gb (lengths double until both providers exceed it or
--max-length is reached). Prints a table and one JSON line; writes benchmarks/results/bench_vs_trl_<device>.{json,md}.

    python benchmarks/bench_vs_trl.py                               # CPU: tiny model; CUDA: Qwen2.5-1.5B shape
    python benchmarks/bench_vs_trl.py --device cpu --batch 8 --prompt-len 32 --budget-gb 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memory import allocator_env, peak_extra_bytes as measure_peak
from report import OUT_HELP, RESULTS, check_device, check_minimums, int_list, say_written

import torch  # noqa: E402

from bench_step import matmul_rate, update_flops as step_update_flops  # noqa: E402
from fastrft.machine import describe_machine  # noqa: E402

PROVIDERS = ("trl", "fastrft-trl", "fastrft")
CUDA_PROVIDERS = ("trl", "trl-torch", "fastrft-trl", "fastrft")


def model_config(name: str, max_len: int):
    from transformers import LlamaConfig, Qwen2Config

    if name == "tiny":
        return LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_len,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if name == "qwen2.5-1.5b":
        return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                           num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=max(max_len, 32768),
                           rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
    raise ValueError(f"unknown model {name!r}: tiny or qwen2.5-1.5b")


def update_flops(args, length: int) -> float:
    """bench_step's FLOPs of one forward + backward of the update, for B rows of prompt_len + length tokens."""
    from transformers import AutoModelForCausalLM

    from fastrft.batch import Row

    with torch.device("meta"):   # the parameter counts, without the weights
        model = AutoModelForCausalLM.from_config(model_config(args.model, args.prompt_len + length + 8))
    return step_update_flops(model, [Row([0] * args.prompt_len, [0] * length)] * args.batch)


def add_ratios(row: dict, rows: list[dict], args, rate: float) -> None:
    """x floor and the ratios to TRL's row at the same length (timed before the others), in place."""
    if "ms" not in row:
        return
    row["x_floor"] = row["ms"] / 1e3 / (update_flops(args, row["length"]) / rate)
    trl = next((r for r in rows if r["provider"] == "trl" and r["length"] == row["length"] and "ms" in r), None)
    if trl is not None:
        row["time_vs_trl"] = row["ms"] / trl["ms"]
        if row["peak_extra_gb"] is not None and trl["peak_extra_gb"]:
            row["peak_vs_trl"] = row["peak_extra_gb"] / trl["peak_extra_gb"]


def make_step(provider: str, args, length: int, device: torch.device):
    """step(): one forward + backward of the update loss, the previous gradients freed first."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_config(args.model, args.prompt_len + length + 8)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device)
    vocab = config.vocab_size
    generator = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(4, vocab, (args.batch, args.prompt_len), generator=generator)
    completion_ids = torch.randint(4, vocab, (args.batch, length), generator=generator)
    advantages = torch.randn(args.batch, generator=generator)

    if provider == "fastrft":
        from fastrft.batch import Row, attention, build_batch, choose_attention, rft_loss
        from fastrft.config import TrainConfig

        cfg = TrainConfig(constraint="none", clip_low=0.2, clip_high=0.28, temperature=1.0)
        rows = [Row(p.tolist(), c.tolist(), advantage=float(a), pg=True)
                for p, c, a in zip(prompt_ids, completion_ids, advantages)]
        # The layout fastrft train takes here (packed through a varlen kernel on CUDA, padded on the CPU), one
        # micro-batch of every row, as TRL's.
        path = choose_attention("auto", model, device, max_tokens=10**9)
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            with attention(model, path):
                batch = build_batch(rows, device, packed=path.packed)
                rft_loss(model, batch, cfg, use_old=False).loss.backward()
        return step

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from fastrft.integrations import FastRFTGRPOTrainer
    from fastrft.tasks.demo import make_tokenizer   # any tokenizer TRL can hold: the step feeds token ids directly

    if provider == "trl-torch":
        import trl.kernels.chunked_logprob

        trl.kernels.chunked_logprob._TRITON_AVAILABLE = False   # TRL's own switch between its kernel and its loop

    out_dir = tempfile.mkdtemp(prefix="bench_vs_trl_")
    trl_args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=args.batch, num_generations=args.batch,
                          max_completion_length=length, loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28,
                          temperature=1.0, report_to="none", save_strategy="no", use_cpu=device.type != "cuda",
                          bf16=device.type == "cuda", disable_tqdm=True, gradient_accumulation_steps=1)
    trainer_class = FastRFTGRPOTrainer if provider == "fastrft-trl" else GRPOTrainer
    trainer = trainer_class(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=trl_args, train_dataset=Dataset.from_dict({"prompt": ["abc"] * args.batch}),
                          processing_class=make_tokenizer())
    trainer.current_gradient_accumulation_steps = 1   # set by Trainer.train(); the dapo normaliser reads it
    trainer.model.train()
    inputs = dict(prompt_ids=prompt_ids.to(device), prompt_mask=torch.ones_like(prompt_ids, device=device),
                  completion_ids=completion_ids.to(device),
                  completion_mask=torch.ones_like(completion_ids, device=device),
                  advantages=advantages.to(device), num_items_in_batch=torch.tensor(args.batch * length))

    def step():
        trainer.model.zero_grad(set_to_none=True)
        trainer.compute_loss(trainer.model, inputs).backward()
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_extra_bytes(step, device) -> int | None:
    """Peak memory of one step beyond what was allocated before it and the gradients it leaves. The step frees the
    previous step's gradients first and leaves new ones of the same size, so that is its peak minus the memory
    before it."""
    step()          # warm-up: caches, lazy initialisation, the first gradients
    sync(device)
    return measure_peak(step, device)


def child(provider: str, length: int, measure: str, args) -> dict:
    """One (provider, length) in this process: its peak memory (measure "memory"), its time ("time"), or both."""
    device = torch.device(args.device)
    row = {"provider": provider, "length": length, "oom": False}
    try:
        step = make_step(provider, args, length, device)
        if measure in ("memory", "both"):
            peak = peak_extra_bytes(step, device)
            row["peak_extra_gb"] = None if peak is None else peak / 2**30
        if measure in ("time", "both"):
            for _ in range(args.warmup + (measure == "time")):   # "both": the peak's call warmed up
                step()
            times = []
            for _ in range(args.repeat):
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                times.append(time.perf_counter() - t0)
            row["ms"] = statistics.median(times) * 1e3
            row["tokens_per_s"] = args.batch * length / (row["ms"] / 1e3)
    except torch.OutOfMemoryError:
        return {"provider": provider, "length": length, "oom": True}
    return row


def run_child(provider: str, length: int, argv: list[str], measure: str) -> dict:
    """child() in a fresh process, so that no provider reuses another's freed memory. On the CPU the peak RSS needs
    glibc's mmap threshold fixed (memory.py), which makes every large allocation a page fault: there memory and time
    are measured in processes of their own, the time with the allocator's own settings, as users run."""
    cmd = [sys.executable, __file__, *argv, "--child", provider, str(length), measure]
    result = subprocess.run(cmd, capture_output=True, text=True, env=allocator_env(for_memory=measure == "memory"))
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-3:]
        return {"provider": provider, "length": length, "error": " | ".join(tail)}
    return json.loads(result.stdout.strip().splitlines()[-1])


def measured(provider: str, length: int, argv: list[str], on_cuda: bool) -> dict:
    """Time and peak memory of (provider, length): one child on CUDA (its allocator counts the peak), two on the CPU."""
    if on_cuda:
        return run_child(provider, length, argv, "both")
    memory = run_child(provider, length, argv, "memory")
    if "error" in memory or memory.get("oom"):
        return memory
    return {**run_child(provider, length, argv, "time"), "peak_extra_gb": memory["peak_extra_gb"]}


def fits(row, budget_gb) -> bool:
    return not row.get("oom") and "error" not in row and row.get("peak_extra_gb") is not None \
        and row["peak_extra_gb"] <= budget_gb


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, choices=("tiny", "qwen2.5-1.5b"),
                        help="tiny | qwen2.5-1.5b (default: tiny on the CPU)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per micro-batch (CPU 8, CUDA 8)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (CPU 32, CUDA 256)")
    parser.add_argument("--lengths", default=None, help="completion lengths to time (CPU 64,256; CUDA 1024,4096)")
    parser.add_argument("--budget-gb", type=float, default=None, help="memory budget (CPU 1, CUDA 40)")
    parser.add_argument("--max-length", type=int, default=None, help="longest length tried (CPU 2048, CUDA 65536)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=None, help=OUT_HELP % "bench_vs_trl_<cpu|cuda>")
    parser.add_argument("--child", nargs=3, metavar=("PROVIDER", "LENGTH", "MEASURE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    on_cuda = args.device.startswith("cuda")
    defaults = dict(model="qwen2.5-1.5b" if on_cuda else "tiny", batch=8, prompt_len=256 if on_cuda else 32,
                    lengths="1024,4096" if on_cuda else "64,256", budget_gb=40.0 if on_cuda else 1.0,
                    max_length=65536 if on_cuda else 2048)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2], args)))
        return
    check_device(parser, args.device)
    check_minimums(parser, args, {"batch": 1, "prompt_len": 1, "max_length": 1, "budget_gb": 0, "warmup": 0,
                                  "repeat": 1})
    lengths = int_list(parser, "--lengths", args.lengths)
    argv = ["--device", args.device, "--model", args.model, "--batch", str(args.batch), "--prompt-len",
            str(args.prompt_len)]
    timing_argv = argv + ["--warmup", str(args.warmup), "--repeat", str(args.repeat)]
    device = torch.device(args.device)

    env = describe_machine(device)
    out = Path(args.out) if args.out else RESULTS / f"bench_vs_trl_{'cuda' if on_cuda else 'cpu'}"
    timed, longest = [], {}

    rate = matmul_rate(device, torch.bfloat16 if on_cuda else torch.float32)

    def payload():
        return dict(env=env, matmul_flops_per_s=rate, model=args.model, batch=args.batch, prompt_len=args.prompt_len,
                    budget_gb=args.budget_gb, max_length=args.max_length, rows=timed,
                    longest={p: v["longest_length"] for p, v in longest.items()},
                    budget_rows={p: v["tried"] for p, v in longest.items()})

    # Results are written after each stage, so that a run stopped by a time limit keeps what it measured.
    providers = CUDA_PROVIDERS if on_cuda else PROVIDERS
    for length in lengths:
        for provider in providers:
            row = measured(provider, length, timing_argv, on_cuda)
            timed.append(row)
            add_ratios(row, timed, args, rate)
            print(format_row(row), flush=True)
    failed = [row for row in timed if "error" in row]
    if failed:   # a table of errors is no result: the committed one stays
        sys.exit(f"bench_vs_trl: {len(failed)} measurement(s) failed, nothing written; the first: "
                 f"{failed[0]['provider']} at L={failed[0]['length']}: {failed[0]['error']}")
    write_results(payload(), out)

    for provider in providers:
        # Doubling from the longest timed length that fitted (each try is a fresh process), else from 64.
        fitted = [r["length"] for r in timed if r["provider"] == provider and fits(r, args.budget_gb)]
        length, best, tried = max(fitted, default=64), None, []
        while length <= args.max_length:
            row = next((r for r in timed if r["provider"] == provider and r["length"] == length), None) \
                or run_child(provider, length, argv, "both" if on_cuda else "memory")
            tried.append(row)
            print("budget " + format_row(row), flush=True)
            if not fits(row, args.budget_gb):
                break
            best, length = length, length * 2
        longest[provider] = {"longest_length": best, "tried": tried}
        write_results(payload(), out)
    print(json.dumps(payload()))


def format_row(r) -> str:
    label = f"{r['provider']:>8} L={r['length']:>6}"
    if "error" in r:
        return f"{label}  error: {r['error']}"
    if r.get("oom"):
        return f"{label}  out of memory"
    peak = "n/a" if r["peak_extra_gb"] is None else f"{r['peak_extra_gb'] * 1024:9.1f} MB"
    ratios = "".join(f"  {name} {r[key]:.2f}x" for key, name in (("x_floor", "floor"), ("time_vs_trl", "time/trl"),
                                                                 ("peak_vs_trl", "peak/trl")) if key in r)
    timed = f" {r['ms']:10.1f} ms {r['tokens_per_s']:10.0f} tok/s " if "ms" in r else ""   # a budget row: memory only
    return f"{label}{timed} peak extra {peak}{ratios}"


def write_results(payload, out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    env = payload["env"]
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"# bench_vs_trl on {env['device']}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}, python {env['python']}, "
             f"commit {env['commit']}{' (dirty)' if env['dirty'] else ''}, {env['cpu_threads']} CPU threads, load "
             f"average {env['load_average']}", "", f"Command: `{env['command']}`", "",
             f"Model {payload['model']} (random weights), {payload['batch']} sequences of {payload['prompt_len']} "
             f"prompt + L completion tokens; one forward + backward of the update loss. Peak = memory beyond what "
             f"was allocated before the step and the gradients it leaves. x floor: the time over the update's FLOPs "
             f"at the measured matmul rate ({payload['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s); vs trl: the ratio to "
             f"TRL's GRPOTrainer (its own fused LM head) at the same L.", "",
             "| provider | L | fwd+bwd ms | update tokens/s | x floor | time vs trl | peak extra MB | peak vs trl |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in payload["rows"]:
        if "error" in r or r.get("oom"):
            lines.append(f"| {r['provider']} | {r['length']} | - | - | - | - | {r.get('error', 'out of memory')} | - |")
            continue
        peak = "n/a" if r["peak_extra_gb"] is None else f"{r['peak_extra_gb'] * 1024:.1f}"
        ratio = {key: f"{r[key]:.2f}x" if key in r else "-" for key in ("x_floor", "time_vs_trl", "peak_vs_trl")}
        lines.append(f"| {r['provider']} | {r['length']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{ratio['x_floor']} | {ratio['time_vs_trl']} | {peak} | {ratio['peak_vs_trl']} |")
    lines += ["", f"Longest completion length (doubling from the longest timed length that fitted, else from 64, up "
              f"to {payload['max_length']}) whose peak "
              f"stays within {payload['budget_gb']} GB: "
              + ", ".join(f"{p}: {v if v is not None else 'none'}" for p, v in payload["longest"].items()) + "."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    say_written(out)


if __name__ == "__main__":
    main()
