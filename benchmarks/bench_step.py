"""Where does an RFT step's time go, and how close is the update to a plain forward+backward?

Part 1, the loop: a few real steps of fastrft.trainer.train on the demo task, per-phase times from the run's
metrics (rollout, reward, refine, reference, update) and the rest of the step (the loop's own overhead), update
tokens/s and peak memory.
Part 2, the update: fastrft's update on packed rows (final hidden states + fused_rft_loss, fwd+bwd + AdamW step)
against the same model's plain forward+backward with a trivial loss (logits.mean(), logits materialised) and
the same optimizer step, on the same tokens; median of --repeat after --warmup.

    python benchmarks/bench_step.py                         # CPU: the demo's tiny model, short sequences
    python benchmarks/bench_step.py --shape qwen2.5-1.5b    # GPU: randomly initialised Qwen2.5-1.5B shape, 2-4K tokens
Prints tables, then one JSON line; writes benchmarks/results/bench_step_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("rollout", "reward", "refine", "reference", "update")


def loop_phases(steps: int, device: str, work_dir: Path) -> dict:
    from fastrft.config import load_config
    from fastrft.plots import read_metrics
    from fastrft.tasks.demo import make_model, make_tokenizer
    from fastrft.trainer import train

    model_dir = work_dir / "model"
    tokenizer = make_tokenizer()
    make_model(tokenizer, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = load_config(None, [f"steps={steps}", f"device={device}", "progress=false", "plots=false",
                             "constraint=kl+refiner", "eval_every=1000", "save_every=1000", "dynamic_sampling=false"],
                      model=str(model_dir), output_dir=str(work_dir / "run"))
    train(cfg)
    records = [r for r in read_metrics(work_dir / "run" / "metrics.jsonl") if "step_time_s" in r][1:]  # warm-up
    # Means, not medians: the phases of a mean step add up to the mean step.
    out = {f"{p}_s": statistics.mean(r.get(f"time_{p}_s", 0.0) for r in records) for p in PHASES}
    out["step_s"] = statistics.mean(r["step_time_s"] for r in records)
    out["other_s"] = out["step_s"] - sum(out[f"{p}_s"] for p in PHASES)
    out["other_frac"] = out["other_s"] / out["step_s"]
    out["update_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in records)
    out["peak_mem_gb"] = max(r["peak_mem_gb"] for r in records)
    out["steps_measured"] = len(records)
    return out


def make_model(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config

    if shape == "qwen2.5-1.5b":
        config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                             num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                             tie_word_embeddings=True)
    elif shape == "tiny":
        config = Qwen2Config(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                             tie_word_embeddings=True)
    else:
        raise SystemExit(f"unknown --shape {shape!r}: qwen2.5-1.5b or tiny")
    attn = "sdpa"
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2"
        except ImportError:
            pass
    config._attn_implementation = attn
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device), attn


def update_vs_plain(shape: str, device: torch.device, dtype: torch.dtype, lengths: list[tuple[int, int]],
                    warmup: int, repeat: int) -> dict:
    from fastrft.config import TrainConfig
    from fastrft.trainer import Row, build_batch, enable_activation_checkpointing, rft_loss

    model, attn = make_model(shape, device, dtype)
    enable_activation_checkpointing(model)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = [Row(torch.randint(0, vocab, (p,), generator=gen).tolist(),
                torch.randint(0, vocab, (c,), generator=gen).tolist(),
                advantage=float(torch.randn(1, generator=gen)), pg=True) for p, c in lengths]
    batch = build_batch(rows, device, packed=True)
    cfg = TrainConfig(model="unused", constraint="none", temperature=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def fastrft_update():
        optimizer.zero_grad(set_to_none=True)
        rft_loss(model, batch, cfg, use_old=False).loss.backward()
        optimizer.step()

    def plain_update():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits.float().mean() \
            .backward()
        optimizer.step()

    out = {"shape": shape, "attn": attn, "tokens": int(batch.input_ids.numel()), "sequences": len(rows)}
    for name, fn in (("plain", plain_update), ("fastrft", fastrft_update)):
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            for _ in range(warmup):
                fn()
            sync()
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            out[f"{name}_s"] = statistics.median(times)
            out[f"{name}_tokens_per_s"] = out["tokens"] / out[f"{name}_s"]
            if device.type == "cuda":
                out[f"{name}_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        except torch.OutOfMemoryError as exc:
            out[f"{name}_error"] = f"out of memory: {str(exc).splitlines()[0][:100]}"
    if "plain_s" in out and "fastrft_s" in out:
        out["fastrft_over_plain"] = out["fastrft_s"] / out["plain_s"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default=None, help="qwen2.5-1.5b (CUDA default) or tiny (CPU default)")
    parser.add_argument("--steps", type=int, default=6, help="loop steps of part 1 (the first is not counted)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = args.shape or ("qwen2.5-1.5b" if device.type == "cuda" else "tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Part 2's rows: 2-4K-token sequences on the GPU (prompt 512 + completion), short ones on the CPU.
    lengths = ([(512, 1536), (512, 3584), (512, 2560), (512, 3072)] if device.type == "cuda"
               else [(32, 96), (32, 224), (32, 160), (32, 192)])

    with tempfile.TemporaryDirectory() as tmp:
        loop = loop_phases(args.steps, device.type, Path(tmp))
    update = update_vs_plain(shape, device, dtype, lengths, args.warmup, args.repeat)

    import triton

    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.machine(),
               torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
               cpu_threads=torch.get_num_threads(), command="python " + " ".join(sys.argv),
               commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=Path(__file__).parent).stdout.strip())
    lines = [f"# bench_step on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; command `{env['command']}`", "",
             "## The loop (demo task, tiny model, constraint kl+refiner; mean over the steps after the first)", "",
             "| phase | s | share |", "|---|---:|---:|"]
    lines += [f"| {p} | {loop[f'{p}_s']:.4f} | {loop[f'{p}_s'] / loop['step_s']:.1%} |" for p in PHASES]
    lines += [f"| other (the loop itself) | {loop['other_s']:.4f} | {loop['other_frac']:.1%} |",
              f"| **step** | {loop['step_s']:.4f} | |", "",
              f"Update tokens/s {loop['update_tokens_per_s']:.0f}; peak memory {loop['peak_mem_gb']:.2f} GB.", "",
              f"## The update ({update['shape']}, {update['tokens']} packed tokens in {update['sequences']} "
              f"sequences, {update['attn']}, {str(dtype).replace('torch.', '')})", "",
              "| update | s | tokens/s | peak GB |", "|---|---:|---:|---:|"]
    for name in ("plain", "fastrft"):
        if f"{name}_s" in update:
            peak = update.get(f"{name}_peak_mem_gb")
            lines.append(f"| {name} | {update[f'{name}_s']:.4f} | {update[f'{name}_tokens_per_s']:.0f} | "
                         f"{'n/a' if peak is None else f'{peak:.2f}'} |")
        else:
            lines.append(f"| {name} | {update[f'{name}_error']} | | |")
    if "fastrft_over_plain" in update:
        lines += ["", f"fastrft update / plain forward+backward: {update['fastrft_over_plain']:.2f}x "
                      f"(target on the GPU: at most 1.2x)"]
    print("\n".join(lines))
    payload = dict(env=env, loop=loop, update=update)
    print(json.dumps(payload))
    if not args.no_write:
        tag = "cuda" if device.type == "cuda" else "cpu"
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"bench_step_{tag}.json").write_text(json.dumps(payload, indent=1) + "\n")
        (RESULTS / f"bench_step_{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
