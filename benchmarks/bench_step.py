"""Where does an RFT step's time go, and what does the update cost per token as the batch grows?

Part `demo`: the demo's default run (`fastrft demo` settings, its trained reference model, one torch thread), KL
and refiner modes, each on the path this machine chooses (packing=auto) and on the dense packed path (every sample
in one packed row through SDPA with a [T, T] mask: the default before packing=auto); mean per-phase times and token
slots read (the reference and update forwards', padding included) over --steps steps after a warm-up step; the
refiner's greedy decoding against its floor (the same call with the refinements it wrote as drafts: one prefill).
Targets: default KL step at most 0.45x the dense one; refiner step at most 1.2x the KL step.
Part `sweep`: the update alone (forward, backward and AdamW step over token-budgeted micro-batches, exactly as the
trainer runs it) on the demo's tiny model and on a randomly initialised 4-layer model of Qwen2.5-0.5B's width
(hidden 896, 14 heads, vocabulary 151936), with 1x, 2x, 4x and 8x a demo step's tokens (rows of the demo's length
distribution), on each path: varlen (CUDA only), padded buckets, dense packed (skipped where its [H, T, T] scores
would pass --dense-limit-gb). Per token: time, x floor (the update's FLOPs over the measured matmul rate) and peak
memory. Target: the default path's time per token flat within 1.3x from 1x to 8x.
Part `plain`: the update against the same model's plain forward+backward (logits materialised, a trivial loss) on
the same packed tokens.

    python benchmarks/bench_step.py                           # every part on the CPU (about 20 minutes)
    python benchmarks/bench_step.py --parts sweep --models demo --scales 1,8
Prints tables, then one JSON line; writes benchmarks/results/bench_step_<cpu|cuda>.{json,md} after each part. The
parts not measured are kept from the file's earlier run, each with the machine, commit and command it was measured
with.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import fix_malloc_mmap_threshold, peak_extra_bytes  # noqa: E402
from models import QWEN_WIDTH, qwen_width_description, qwen_width_model  # noqa: E402
from report import OUT_HELP, check_minimums, int_list, say_written  # noqa: E402

from fastrft.rollout import greedy_from_drafts as _greedy_from_drafts  # noqa: E402 (the unpatched one)

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("rollout", "reward", "reference", "refine", "update")
PART_KEYS = {"demo": ("demo", "demo_ratios"), "sweep": ("sweep", "matmul_gflops", "sweep_settings"),
             "plain": ("plain",)}
CARRIED_PARTS = "FASTRFT_BENCH_CARRIED"   # the environment variable taking measured parts across the re-execution
DEMO_ROWS = 128                  # one demo step: 16 prompts x 8 samples
MODELS = {   # name: what it is
    "demo": "the demo's tiny Llama (3 layers, hidden 96, vocabulary 24)",
    QWEN_WIDTH: qwen_width_description(4),
    "tiny-llama": "a 2-layer Llama of hidden 64 (quick checks of the script)",
}


# ----------------------------------------------------------------------------------------------- part demo

def demo_step(steps: int, reference_dir: Path, work_dir: Path) -> list[dict]:
    """The four runs (kl, refiner) x (default, dense packed) step in turn, one step each round, so that the machine's
    drift over the minutes of the measurement falls on all of them alike."""
    from fastrft.batch import SDPA, AttentionPath
    from fastrft.cli import DEMO_DEFAULTS
    from fastrft.config import load_config
    from fastrft.tasks.demo import ensure_reference
    from fastrft.trainer import make_run, run_step

    reference = ensure_reference(reference_dir)
    runs = {}
    for constraint in ("kl", "refiner"):
        for path_name in ("default", "dense packed"):
            cfg = load_config(None, [f"constraint={constraint}", "progress=false", "plots=false"],
                              **{**DEMO_DEFAULTS, "model": str(reference),
                                 "output_dir": str(work_dir / f"{constraint}_{path_name.replace(' ', '_')}")})
            run = make_run(cfg)
            if path_name == "dense packed":
                run.attention = AttentionPath(True, SDPA, 10**9)
            runs[constraint, path_name] = run
    records = {key: [] for key in runs}
    read = {key: [] for key in runs}   # per step, the token slots its forwards read (padding included)
    decoding = {key: [] for key in runs}   # per step, (the refiner's greedy decoding s, its floor s)
    with counted_batches() as slots, refiner_calls() as calls:
        for step in range(1, steps + 2):
            for key, run in runs.items():
                slots.clear()
                calls.clear()
                record = run_step(run, step)
                if step > 1:   # step 1 warms up
                    records[key].append(record)
                    read[key].append(sum(slots))
                    decoding[key].append((sum(seconds for seconds, _ in calls),
                                          sum(decoding_floor_s(*call) for _, call in calls)))
    rows = []
    for (constraint, path_name), recs in records.items():
        # Means, not medians: the phases of a mean step add up to the mean step.
        row = {"constraint": constraint, "path": path_name, "attention": runs[constraint, path_name].attention
               .description, "steps": len(recs),
               **{f"{p}_s": statistics.fmean(r.times_s[p] for r in recs) for p in PHASES},
               "step_s": statistics.fmean(r.step_time_s for r in recs),
               "micro_batches": statistics.fmean(r.update.micro_batches for r in recs),
               "response_len": statistics.fmean(r.to_dict()["response_len"] for r in recs),
               "refine_rate": statistics.fmean(r.to_dict()["refine_rate"] for r in recs),
               "tokens_read": statistics.fmean(read[constraint, path_name]),
               "decode_s": statistics.fmean(d for d, _ in decoding[constraint, path_name]),
               "decode_floor_s": statistics.fmean(f for _, f in decoding[constraint, path_name]),
               "peak_mem_gb": max(r.peak_mem_gb for r in recs)}
        row["other_s"] = row["step_s"] - sum(row[f"{p}_s"] for p in PHASES)
        print(f"demo step {constraint:8s} {path_name:13s} step {row['step_s']:.3f} s, update {row['update_s']:.3f} s",
              flush=True)
        rows.append(row)
    return rows


@contextmanager
def counted_batches():
    """The token slots (rows x width) of every batch fastrft.batch builds in the block, appended to the list it
    yields: what the reference, old log-prob and update forwards read."""
    from fastrft import batch as batch_module

    build, slots = batch_module.build_batch, []

    def counted(*args, **kwargs):
        out = build(*args, **kwargs)
        slots.append(out.input_ids.numel())
        return out

    batch_module.build_batch = counted
    try:
        yield slots
    finally:
        batch_module.build_batch = build


@contextmanager
def refiner_calls():
    """The refiner's greedy decodings (fastrft.rollout.greedy_from_drafts) in the block, appended to the list it
    yields as (seconds, (model, tokenizer, templates, refinements written, max_new_tokens, batch_size, stop_ids))."""
    from fastrft import rollout

    calls = []

    def timed_decode(model, tokenizer, prompt_ids, drafts, **kwargs):
        t0 = time.perf_counter()
        out = _greedy_from_drafts(model, tokenizer, prompt_ids, drafts, **kwargs)
        calls.append((time.perf_counter() - t0, (model, tokenizer, prompt_ids, out[0].completion_ids,
                                                 kwargs["max_new_tokens"], kwargs["batch_size"],
                                                 kwargs.get("stop_ids"))))
        return out

    rollout.greedy_from_drafts = timed_decode
    try:
        yield calls
    finally:
        rollout.greedy_from_drafts = _greedy_from_drafts


def decoding_floor_s(model, tokenizer, templates, written, max_new_tokens: int, batch_size: int,
                     stop_ids: list[int] | None = None) -> float:
    """The floor of the refiner's decoding: the same call with the refinements it wrote as the drafts, every one
    right, which the draft path verifies in one pass over the templates' common beginnings and one over the rest
    (the demo's refinements fit the first block): the cost of checking the answer, one prefill."""
    t0 = time.perf_counter()
    _greedy_from_drafts(model, tokenizer, templates, written, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        stop_ids=stop_ids)
    return time.perf_counter() - t0


def demo_ratios(rows: list[dict]) -> dict:
    step = {(r["constraint"], r["path"]): r["step_s"] for r in rows}
    refiner = next(r for r in rows if (r["constraint"], r["path"]) == ("refiner", "default"))
    ratios = {"kl_default_over_dense": step["kl", "default"] / step["kl", "dense packed"],
              "refiner_over_kl_default": step["refiner", "default"] / step["kl", "default"],
              "refiner_over_kl_dense": step["refiner", "dense packed"] / step["kl", "dense packed"]}
    if refiner["decode_floor_s"]:   # the draft path ran (refine_draft=true)
        # the refiner's step with its decoding at the floor: what the refiner's own work costs at the least
        ratios["refiner_at_floor_over_kl_default"] = \
            (refiner["step_s"] - refiner["decode_s"] + refiner["decode_floor_s"]) / step["kl", "default"]
        ratios["decode_over_floor"] = refiner["decode_s"] / refiner["decode_floor_s"]
    return ratios


# ----------------------------------------------------------------------------------------------- part sweep

def make_model(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "demo":
        from fastrft.tasks.demo import make_model as make_demo_model
        from fastrft.tasks.demo import make_tokenizer

        return make_demo_model(make_tokenizer()).to(device=device, dtype=dtype)
    if name == QWEN_WIDTH:
        return qwen_width_model(4, dtype).to(device)
    if name == "tiny-llama":   # for quick checks of the script
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4)
    else:
        raise SystemExit(f"unknown model {name!r}: {', '.join(MODELS)}")
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)


def demo_rows(n: int, vocab: int, seed: int = 0):
    """n sample rows of the demo's shape: prompt <bos>"sort " + d digits + "=", completion d digits + <eos>, d in
    3..8 (row length 7 + 2d)."""
    from fastrft.batch import Row

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        d = rng.randint(3, 8)
        rows.append(Row([rng.randrange(4, vocab) for _ in range(7 + d)], [rng.randrange(4, vocab) for _ in range(d + 1)],
                        advantage=rng.gauss(0.0, 1.0), pg=True, ref_logprobs=-torch.rand(d + 1)))
    return rows


def update_flops(model, rows) -> float:
    """Forward + backward (3x forward) FLOPs of the update: the matmuls of every layer's weights on each token, the
    causal attention of each row, and the LM head on the target tokens only (the fused loss skips the rest)."""
    cfg = model.config
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    attention = sum(2 * cfg.num_hidden_layers * cfg.hidden_size * row.length * (row.length + 1) for row in rows)
    tokens = sum(row.length for row in rows)
    targets = sum(len(row.target_ids) for row in rows)
    return 3 * (2 * body * tokens + attention + 2 * head * targets)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a 2048^3 matmul (1024^3 on the CPU), median of 5."""
    n = 2048 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return 2 * n**3 / median_seconds(lambda: a @ b, 5, device)


def sweep(model_names, scales, device, dtype, warmup: int, repeat: int, dense_limit_gb: float,
          max_tokens: int) -> list[dict]:
    from fastrft.batch import SDPA, AttentionPath, accumulate_gradients, choose_attention
    from fastrft.config import TrainConfig
    from fastrft.trainer import make_optimizer

    cfg = TrainConfig(model="unused", constraint="kl")
    rate = matmul_rate(device, dtype)
    rows_out = []
    for name in model_names:
        model = make_model(name, device, dtype)
        optimizer = make_optimizer(cfg, model, device)
        default = choose_attention("auto", model, device, max_tokens)
        paths = {"default": default}
        if default.packed:
            paths["padded buckets"] = AttentionPath(False, SDPA, max_tokens)
        paths["dense packed"] = AttentionPath(True, SDPA, 10**9)
        for path_name, path in paths.items():
            warmed = False
            for scale in scales:
                rows = demo_rows(DEMO_ROWS * scale, model.config.vocab_size)
                tokens = sum(r.length for r in rows)
                row = {"model": name, "path": path_name, "attention": path.description, "scale": scale,
                       "tokens": tokens, "rows": len(rows)}
                scores_gb = model.config.num_attention_heads * tokens**2 * 4 / 2**30
                if path_name == "dense packed" and scores_gb > dense_limit_gb:
                    row["skipped"] = f"its [H, T, T] scores alone would take {scores_gb:.0f} GB"
                    rows_out.append(row)
                    print(f"sweep {name} {path_name} {scale}x: skipped, {row['skipped']}", flush=True)
                    continue

                def update():
                    optimizer.zero_grad(set_to_none=True)
                    accumulate_gradients(model, rows, cfg, path, device, use_old=False)
                    optimizer.step()

                for _ in range(0 if warmed else warmup):
                    update()
                warmed = True
                seconds = median_seconds(update, repeat, device)
                peak = peak_extra_bytes(update, device)
                row.update(update_s=seconds, us_per_token=seconds / tokens * 1e6,
                           x_floor=seconds / (update_flops(model, rows) / rate),
                           peak_extra_mb=None if peak is None else peak / 2**20)
                print(f"sweep {name} {path_name} {scale}x: {tokens} tokens, {row['us_per_token']:.1f} us/token, "
                      f"{row['x_floor']:.1f}x floor", flush=True)
                rows_out.append(row)
        del model, optimizer
    for row in rows_out:   # time per token against the same path's smallest batch
        first = next((r for r in rows_out if r["model"] == row["model"] and r["path"] == row["path"]
                      and "us_per_token" in r), None)
        if first is not None and "us_per_token" in row:
            row["per_token_vs_smallest"] = row["us_per_token"] / first["us_per_token"]
    return rows_out, rate


# ----------------------------------------------------------------------------------------------- part plain

def update_vs_plain(name: str, device: torch.device, dtype: torch.dtype, warmup: int, repeat: int) -> dict:
    """fastrft's update on one micro-batch of the default path against the same model's plain forward+backward
    (logits materialised, a trivial loss) on the same tokens, both with activation checkpointing."""
    from fastrft.batch import Row, attention, build_batch, choose_attention, rft_loss
    from fastrft.config import TrainConfig
    from fastrft.trainer import enable_activation_checkpointing, make_optimizer

    model = make_model(name, device, dtype)
    enable_activation_checkpointing(model)
    path = choose_attention("auto", model, device, 10**9)
    # 2-4K-token sequences on the GPU (prompt 512 + completion), short ones on the CPU.
    lengths = ([(512, 1536), (512, 3584), (512, 2560), (512, 3072)] if device.type == "cuda"
               else [(32, 96), (32, 224), (32, 160), (32, 192)])
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows = [Row(torch.randint(0, vocab, (p,), generator=gen).tolist(), torch.randint(0, vocab, (c,), generator=gen)
                .tolist(), advantage=float(torch.randn(1, generator=gen)), pg=True) for p, c in lengths]
    batch = build_batch(rows, device, packed=path.packed)
    cfg = TrainConfig(model="unused", constraint="none")
    optimizer = make_optimizer(cfg, model, device)

    def fastrft_update():
        optimizer.zero_grad(set_to_none=True)
        rft_loss(model, batch, cfg, use_old=False).loss.backward()
        optimizer.step()

    def plain_update():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits.float().mean() \
            .backward()
        optimizer.step()

    out = {"model": name, "attention": path.description, "tokens": int(batch.input_ids.numel()),
           "sequences": len(rows)}
    with attention(model, path):
        for label, fn in (("plain", plain_update), ("fastrft", fastrft_update)):
            try:
                for _ in range(warmup):
                    fn()
                out[f"{label}_s"] = median_seconds(fn, repeat, device)
                out[f"{label}_tokens_per_s"] = out["tokens"] / out[f"{label}_s"]
            except torch.OutOfMemoryError as exc:
                out[f"{label}_error"] = f"out of memory: {str(exc).splitlines()[0][:100]}"
    if "plain_s" in out and "fastrft_s" in out:
        out["fastrft_over_plain"] = out["fastrft_s"] / out["plain_s"]
    return out


# ----------------------------------------------------------------------------------------------- report

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeat: int, device: torch.device) -> float:
    """Median wall time of `repeat` calls of fn, the device synchronised around each."""
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def describe_env(env: dict) -> str:
    return (f"{env['device']}, torch {env.get('torch')}, triton {env.get('triton')}, transformers "
            f"{env.get('transformers')}, commit {env['commit']}{' (dirty)' if env.get('dirty') else ''}, "
            f"{env['cpu_threads']} torch threads, MALLOC_MMAP_THRESHOLD_ "
            f"{env.get('MALLOC_MMAP_THRESHOLD_', 'not recorded')}, load average {env['load_average']}; command "
            f"`{env['command']}`")


def earlier_parts(path: Path) -> dict:
    """Every part of an earlier run's results (path), with the env each was measured with: this run replaces a part
    only once it has measured it (an interrupted run loses nothing)."""
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    earlier.setdefault("sweep_settings", {key: earlier.get(key) for key in ("dtype", "max_tokens", "models")})
    kept = {"part_env": {}}
    for part, keys in PART_KEYS.items():
        if earlier.get(keys[0]):
            kept.update({key: earlier[key] for key in keys if key in earlier})
            kept["part_env"][part] = earlier.get("part_env", {}).get(part, earlier["env"])
            kept.setdefault("part_run", {})[part] = earlier.get("part_run", {}).get(part)
    return kept


def markdown(payload: dict) -> str:
    env = payload["env"]
    lines = [f"# bench_step on {env['device']}", "", describe_env(env), ""]

    def earlier(part: str) -> list[str]:   # a part measured otherwise than the header says, says how
        part_env = payload.get("part_env", {}).get(part, env)
        if part_env == env:
            return []
        this_run = payload.get("part_run", {}).get(part) == payload.get("run")
        return [f"{'Measured in this run with' if this_run else 'Kept from an earlier run'}: "
                f"{describe_env(part_env)}", ""]

    if payload.get("demo"):
        ratios = payload["demo_ratios"]
        lines += ["## The demo step (fastrft demo's settings, 1 torch thread; mean over the steps after the first)", "",
                  "| constraint | path | step s | rollout s | reward s | reference s | refine s | update s | other s "
                  "| micro-batches | refine rate | tokens read |", "|---|---|" + "---:|" * 10]
        lines[-2:-2] = earlier("demo")
        for r in payload["demo"]:
            lines.append(f"| {r['constraint']} | {r['path']} | {r['step_s']:.3f} | "
                         + " | ".join(f"{r[f'{p}_s']:.3f}" for p in PHASES)
                         + f" | {r['other_s']:.3f} | {r['micro_batches']:.1f} | {r['refine_rate']:.2f} | "
                         + (f"{r['tokens_read']:.0f} |" if "tokens_read" in r else "- |"))
        lines += ["", f"Paths: default = {payload['demo'][0]['attention']}; dense packed = every row in one packed "
                      f"row through SDPA with a [T, T] mask (the default before packing=auto). Tokens read: the "
                      f"token slots of the reference and update forwards a step, padding included.", "",
                  f"- KL step, default / dense packed: {ratios['kl_default_over_dense']:.2f}x (target <= 0.45x)",
                  f"- refiner step / KL step, default path: {ratios['refiner_over_kl_default']:.2f}x (target <= "
                  f"1.2x; dense packed: {ratios['refiner_over_kl_dense']:.2f}x)"]
        if "decode_over_floor" in ratios:
            refiner = next(r for r in payload["demo"] if (r["constraint"], r["path"]) == ("refiner", "default"))
            lines += [f"- the refiner's greedy decoding (within refine s): {refiner['decode_s']:.3f} s a step, "
                      f"{ratios['decode_over_floor']:.2f}x its floor of {refiner['decode_floor_s']:.3f} s (the same "
                      "call with the refinements it wrote as drafts: one pass over the templates' common beginnings, "
                      "one over the rest); with its decoding at the floor, the refiner step would be "
                      f"{ratios['refiner_at_floor_over_kl_default']:.2f}x the KL step"]
        lines.append("")
    if payload.get("sweep"):
        settings = payload["sweep_settings"]
        lines += ["## The update as the batch grows (forward, backward, AdamW; "
                  f"{settings['dtype']}, micro-batches of at most {settings['max_tokens']} tokens)", "",
                  f"1x = one demo step's {DEMO_ROWS} sample rows (lengths 13-23). Floor = the update's FLOPs over the "
                  f"measured matmul rate ({payload['matmul_gflops']:.0f} GFLOP/s); peak = memory beyond what was "
                  "allocated before the update.", "",
                  "| model | path | batch | tokens | update s | us/token | vs 1x | x floor | peak extra MB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines[-2:-2] = earlier("sweep")
        for r in payload["sweep"]:
            if "skipped" in r:
                lines.append(f"| {r['model']} | {r['path']} | {r['scale']}x | {r['tokens']} | skipped: "
                             f"{r['skipped']} | | | | |")
                continue
            peak = "n/a" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f}"
            lines.append(f"| {r['model']} | {r['path']} | {r['scale']}x | {r['tokens']} | {r['update_s']:.3f} | "
                         f"{r['us_per_token']:.1f} | {r['per_token_vs_smallest']:.2f} | {r['x_floor']:.1f} | {peak} |")
        lines += ["", "Models: " + "; ".join(f"{k}: {v}" for k, v in MODELS.items() if k in settings["models"]), ""]
    if payload.get("plain"):
        p = payload["plain"]
        lines += [f"## The update vs a plain forward+backward ({p['model']}, {p['tokens']} tokens in "
                  f"{p['sequences']} sequences, {p['attention']}, activation checkpointing)", "",
                  *earlier("plain"), "| update | s | tokens/s |", "|---|---:|---:|"]
        for label in ("plain", "fastrft"):
            lines.append(f"| {label} | {p[f'{label}_s']:.4f} | {p[f'{label}_tokens_per_s']:.0f} |"
                         if f"{label}_s" in p else f"| {label} | {p[f'{label}_error']} | |")
        if "fastrft_over_plain" in p:
            lines += ["", f"fastrft update / plain forward+backward: {p['fastrft_over_plain']:.2f}x (target on the "
                          "GPU: at most 1.2x)"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=None, help="demo,sweep,plain (default: all three on the CPU, sweep,plain "
                                                      "on CUDA)")
    parser.add_argument("--steps", type=int, default=20, help="demo steps measured per run (after one warm-up)")
    parser.add_argument("--reference-dir", default="runs/demo_reference", help="the demo's reference model (trained "
                                                                               "there first if missing)")
    parser.add_argument("--models", default=f"demo,{QWEN_WIDTH}", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--scales", default="1,2,4,8", help="batches, in demo steps' tokens")
    parser.add_argument("--max-tokens", type=int, default=None, help="micro-batch budget (default: TrainConfig's)")
    parser.add_argument("--dense-limit-gb", type=float, default=4.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", default=None, help=OUT_HELP % "bench_step_<cpu|cuda>")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = (args.parts or ("sweep,plain" if device.type == "cuda" else "demo,sweep,plain")).split(",")
    unknown = [part for part in parts if part not in PART_KEYS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}: --parts takes {', '.join(PART_KEYS)}")
    check_minimums(parser, args, {"steps": 1, "repeat": 1, "warmup": 0, "max_tokens": 1})
    scales = int_list(parser, "--scales", args.scales)
    unknown = [name for name in args.models.split(",") if name not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}: --models takes {', '.join(MODELS)}")
    # The demo step is timed as users run it, with the allocator's own settings; the sweep's peak memory needs a
    # fixed mmap threshold, so the script re-executes itself for the parts after the demo (memory.py).
    if "demo" not in parts:
        fix_malloc_mmap_threshold()

    from fastrft.config import TrainConfig
    from fastrft.machine import describe_machine

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    max_tokens = args.max_tokens or TrainConfig().max_tokens_per_batch
    payload = {"env": describe_machine(device), "dtype": str(dtype).replace("torch.", ""), "max_tokens": max_tokens,
               "models": args.models.split(",")}
    tag = "cuda" if device.type == "cuda" else "cpu"
    payload["part_env"] = {}
    out = Path(args.out) if args.out else RESULTS / f"bench_step_{tag}"
    if not args.no_write:
        payload.update(earlier_parts(out.with_suffix(".json")))
    # The parts measured before this process re-executed itself (below): kept even where nothing is written.
    payload.update(json.loads(os.environ.pop(CARRIED_PARTS, "{}")))
    # One run across the re-execution below: the parts it measured are this run's, whatever their settings.
    payload["run"] = os.environ.setdefault("FASTRFT_BENCH_RUN", uuid.uuid4().hex[:12])
    payload.setdefault("part_run", {})

    def write():
        text = markdown(payload)
        if not args.no_write:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
            out.with_suffix(".md").write_text(text)
            say_written(out)
        return text

    if "demo" in parts:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # the tiny model runs fastest on one thread (README); as the demo is measured
        with tempfile.TemporaryDirectory() as tmp:
            payload["demo"] = demo_step(args.steps, Path(args.reference_dir), Path(tmp))
        payload["demo_ratios"] = demo_ratios(payload["demo"])
        payload["part_env"]["demo"] = payload["env"]
        payload["part_run"]["demo"] = payload["run"]
        torch.set_num_threads(threads)
        rest = [part for part in parts if part != "demo"]
        if rest:
            print(write(), flush=True)
            os.environ[CARRIED_PARTS] = json.dumps({key: payload[key] for key in (*PART_KEYS["demo"], "part_env",
                                                                                  "part_run")})
            fix_malloc_mmap_threshold([*sys.argv[1:], "--parts", ",".join(rest)])
    if "sweep" in parts:
        payload["sweep"], rate = sweep(payload["models"], scales, device, dtype,
                                       args.warmup, args.repeat, args.dense_limit_gb, max_tokens)
        payload["matmul_gflops"] = rate / 1e9
        payload["sweep_settings"] = {key: payload[key] for key in ("dtype", "max_tokens", "models")}
        payload["part_env"]["sweep"] = payload["env"]
        payload["part_run"]["sweep"] = payload["run"]
        write()
    if "plain" in parts:
        payload["plain"] = update_vs_plain("qwen2.5-0.5b-width" if device.type == "cuda" else "demo", device, dtype,
                                           args.warmup, args.repeat)
        payload["part_env"]["plain"] = payload["env"]
        payload["part_run"]["plain"] = payload["run"]
    print(write())
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
