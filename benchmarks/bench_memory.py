"""How much memory does one training step take: full fine-tuning with a separate reference, or LoRA with the
reference as the adapter-free base?

One full step of `fastrft train` (rollout, reward, reference log-probs, refiner, update; constraint=kl+refiner so
every phase runs) on the demo task, for a randomly initialised model of Qwen2.5-0.5B's width (hidden 896, 14 heads,
2 KV heads, vocabulary 151936) with --layers layers (the real model has 24: cut so that a 2-core CPU run takes
minutes), in --dtype, each variant in a fresh process:
    full   every weight trains (AdamW), the reference a second copy of the model
    lora   LoRA r=16 on every attention and MLP projection; the reference is the same base weights, adapters off
Peak memory: the CUDA allocator's peak on a GPU; on the CPU the process's peak RSS (VmHWM), and that peak less the
RSS of the same process just before the models load (torch and transformers imported). The floor is the bytes of
the state the step must hold: weights (x2 for full: the reference), and for what trains its gradients and AdamW's
two moments. Target: LoRA's peak at most 0.4x full's.
Then, for each variant, the largest layer count whose step fits in --budget-gb: the peak's slope per layer from the
two sizes in --fit-layers, extrapolated, and then measured at that size (and one more layer) to confirm.

    python benchmarks/bench_memory.py                       # about 10 minutes on the 2-core CPU
    python benchmarks/bench_memory.py --layers 2 --budget-gb 0     # just the comparison
Prints a table, then one JSON line; writes benchmarks/results/bench_memory_<cpu|cuda>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import fix_malloc_mmap_threshold, rss_bytes  # noqa: E402
from models import qwen_width_description, qwen_width_model  # noqa: E402
from report import OUT_HELP, check_device, check_minimums, int_list, publish  # noqa: E402

VARIANTS = {"full": ["lora_r=0"], "lora": ["lora_r=16"]}
STEP = ["task=demo", "steps=1", "prompts_per_step=4", "group_size=4", "constraint=kl+refiner", "refine_coef=1.0",
        "dynamic_sampling=false", "progress=false", "plots=false", "max_new_tokens=16", "refine_max_new_tokens=16"]
GB = 2**30


def save_model(layers: int, dtype: str, directory: Path) -> Path:
    """The model with the demo's tokenizer (its ids are a subset of the model's vocabulary), saved for the trainer."""
    import torch

    from fastrft.tasks.demo import make_tokenizer

    path = directory / f"qwen-width-{layers}"
    if not (path / "config.json").is_file():
        qwen_width_model(layers, getattr(torch, dtype)).save_pretrained(path)
        make_tokenizer().save_pretrained(path)
    return path


def one_step(model_dir: str, variant: str, dtype: str, device: str) -> dict:
    """In this (fresh) process: one step of the variant, its peak memory."""
    import torch

    from fastrft.config import load_config
    from fastrft.trainer import make_run, run_step

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [*STEP, *VARIANTS[variant], f"dtype={dtype}", f"device={device}"], model=model_dir,
                          output_dir=out)
        before = rss_bytes()["VmRSS"]
        if cfg.device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        run = make_run(cfg)
        run.eval_rows = []
        t1 = time.perf_counter()
        record = run_step(run, 1)
        seconds = time.perf_counter() - t1
        params = {"total": sum(p.numel() for p in run.policy.parameters()),
                  "trained": sum(p.numel() for p in run.policy.parameters() if p.requires_grad),
                  "reference_copy": 0 if run.ref is run.policy else sum(p.numel() for p in run.ref.parameters())}
        element = torch.finfo(getattr(torch, dtype)).bits // 8
        # weights (and the reference's copy), gradients of what trains, AdamW's two fp32-or-dtype moments
        floor = element * (params["total"] + params["reference_copy"] + 3 * params["trained"])
        result = {"variant": variant, "params": params, "floor_bytes": floor, "step_s": seconds, "load_s": t1 - t0,
                  "trained_tokens": record.trained_tokens, "micro_batches": record.update.micro_batches}
        if torch.cuda.is_available() and run.device.type == "cuda":
            result["peak_bytes"] = torch.cuda.max_memory_allocated()
        else:
            rss = rss_bytes()
            result.update(peak_bytes=rss["VmHWM"], peak_over_start_bytes=rss["VmHWM"] - before,
                          start_bytes=before)
    return result


def measure(layers: int, variant: str, args, directory: Path) -> dict:
    model_dir = save_model(layers, args.dtype, directory)
    command = [sys.executable, __file__, "--child", variant, "--model-dir", str(model_dir), "--dtype", args.dtype,
               "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} at {layers} layers failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["layers"] = layers
    print(f"  {variant:<5} {layers:>4} layers: peak {result['peak_bytes'] / GB:6.2f} GB, floor "
          f"{result['floor_bytes'] / GB:6.2f} GB, step {result['step_s']:6.1f} s", flush=True)
    return result


def largest_fitting(variant: str, args, directory: Path, measured: dict) -> dict:
    """Extrapolate the largest layer count within the budget from two sizes, then confirm by measuring there."""
    low, high = (measured.get((variant, n)) or measure(n, variant, args, directory) for n in args.fit_layers)
    slope = (high["peak_bytes"] - low["peak_bytes"]) / (high["layers"] - low["layers"])
    predicted = low["layers"] + math.floor((args.budget_gb * GB - low["peak_bytes"]) / slope)
    entry = {"variant": variant, "per_layer_bytes": slope, "predicted_layers": predicted, "checks": []}
    if predicted > args.max_check_layers:
        entry["note"] = f"not measured: past --max-check-layers={args.max_check_layers}"
        return entry
    # Walk from the prediction to the boundary: up while it fits, down while it does not (a few sizes at most).
    layers, direction = predicted, None
    for _ in range(4):
        check = measure(layers, variant, args, directory)
        fits = check["peak_bytes"] <= args.budget_gb * GB
        entry["checks"].append({"layers": layers, "peak_bytes": check["peak_bytes"], "fits": fits})
        direction = direction or (1 if fits else -1)
        if fits != (direction == 1) or layers + direction < 1:
            break
        layers += direction
    fitting = [c["layers"] for c in entry["checks"] if c["fits"]]
    over = [c["layers"] for c in entry["checks"] if not c["fits"]]
    entry["largest_fitting_layers"] = max(fitting) if fitting and over and max(fitting) + 1 in over else None
    return entry


def markdown(payload: dict) -> str:
    """GB here is 2^30 bytes."""
    env, args = payload["machine"], payload["args"]
    lines = [f"# bench_memory on {env['device']}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, peft {env.get('peft', '-')}, commit "
             f"{env['commit']}{' (dirty)' if env.get('dirty') else ''}; command `{env['command']}`", "",
             f"One step of `fastrft train` ({' '.join(STEP)}), {args['dtype']}, model: "
             f"{qwen_width_description(args['layers'])}. Peak: "
             f"{'the CUDA allocator' if args['device'] == 'cuda' else 'process peak RSS (VmHWM); over start: less the RSS before the models load'}. "
             "Floor: weights (x2 with a separate reference) + gradients and two AdamW moments of what trains. "
             "GB = 2^30 bytes.", "",
             "Load s: making the run (models, tokenizer, optimizer); step s: the step alone.", "",
             "| variant | layers | params | trained | peak GB | over start GB | floor GB | peak / floor | load s | "
             "step s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in payload["comparison"]:
        over, load = r.get("peak_over_start_bytes"), r.get("load_s")   # (load_s: not in results before it was)
        lines.append(f"| {r['variant']} | {r['layers']} | {r['params']['total'] / 1e6:.0f}M | "
                     f"{r['params']['trained'] / 1e6:.2f}M | {r['peak_bytes'] / GB:.2f} | "
                     f"{'-' if over is None else f'{over / GB:.2f}'} | {r['floor_bytes'] / GB:.2f} | "
                     f"{r['peak_bytes'] / r['floor_bytes']:.2f}x | "
                     f"{'-' if load is None else f'{load:.1f}'} | {r['step_s']:.1f}"
                     f"{' (loading included)' if load is None else ''} |")
    lines += ["", f"LoRA / full peak: **{payload['lora_over_full']:.2f}x** (target <= 0.4x)"
              + (f"; over start: {payload['lora_over_full_over_start']:.2f}x"
                 if payload.get("lora_over_full_over_start") else "")]
    if payload.get("budget"):
        lines += ["", f"Largest layer count whose step fits in {args['budget_gb']} GB (slope from layers "
                      f"{args['fit_layers']}, then measured):", "",
                  "| variant | per layer MB | predicted layers | measured | largest fitting |", "|---|---:|---:|---|---:|"]
        for b in payload["budget"]:
            checks = ", ".join(f"{c['layers']}: {c['peak_bytes'] / GB:.2f} GB {'fits' if c['fits'] else 'over'}"
                               for c in b["checks"]) or b.get("note", "")
            lines.append(f"| {b['variant']} | {b['per_layer_bytes'] / 2**20:.0f} | {b['predicted_layers']} | {checks} | "
                         f"{b.get('largest_fitting_layers', '-')} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget-gb", type=float, default=8.0, help="0: skip the largest-fitting search")
    parser.add_argument("--fit-layers", default="2,4", help="the two layer counts the per-layer slope comes from")
    parser.add_argument("--max-check-layers", type=int, default=96, help="confirm predictions up to this size")
    parser.add_argument("--out", default=None, help=OUT_HELP % "bench_memory_<cpu|cuda>")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(args.model_dir, args.child, args.dtype, args.device)))
        return
    check_minimums(parser, args, {"layers": 1, "budget_gb": 0, "max_check_layers": 1})
    check_device(parser, args.device)
    args.fit_layers = int_list(parser, "--fit-layers", args.fit_layers)
    if len(set(args.fit_layers)) != 2:
        parser.error(f"--fit-layers takes two different layer counts (the slope's two points), got {args.fit_layers}")
    from fastrft.machine import describe_machine

    payload = {"machine": describe_machine(), "args": vars(args)}
    payload["machine"]["command"] = "python benchmarks/bench_memory.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="bench_memory-") as work:
        directory = Path(work)
        measured = {}
        for variant in VARIANTS:
            measured[variant, args.layers] = measure(args.layers, variant, args, directory)
        payload["comparison"] = [measured[v, args.layers] for v in VARIANTS]
        full, lora = measured["full", args.layers], measured["lora", args.layers]
        payload["lora_over_full"] = lora["peak_bytes"] / full["peak_bytes"]
        if "peak_over_start_bytes" in full:
            payload["lora_over_full_over_start"] = lora["peak_over_start_bytes"] / full["peak_over_start_bytes"]
        if args.budget_gb > 0:
            payload["budget"] = [largest_fitting(v, args, directory, measured) for v in VARIANTS]
    publish(payload, markdown(payload), f"bench_memory_{'cuda' if args.device.startswith('cuda') else 'cpu'}",
            args.out)


if __name__ == "__main__":
    fix_malloc_mmap_threshold()
    main()
