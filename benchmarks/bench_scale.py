"""Does data parallelism pay: a training step's time and memory per rank at 1 and 2 ranks (FSDP2, gloo, CPU)?

The update of one `fastrft train` step (fastrft.batch.accumulate_gradients over the step's sample rows in
token-budgeted micro-batches, the fused loss in CausalLMWithFusedLoss's forward, gradient clipping, AdamW), for a
randomly initialised model of Qwen2.5-0.5B's width (hidden 896, vocabulary 151936, tied embeddings) with --layers
layers, on each of --rows counts of rows of the demo's shape:
    1 rank        one process, 2 threads, every row
    2 ranks FSDP2 torchrun, FSDP2 per decoder layer (fastrft.distributed.shard_policy), 1 thread and half the rows each
    2 ranks DDP   the other implementation fsdp=false gives: whole weights and AdamW state per rank, gradients
                  all-reduced
Per rank: the median step time over --repeat steps (after --warmup); the communication inside one step (the wall
time of FSDP2's all-gather and reduce-scatter regions, from torch.profiler, the ranks starting together; reported
for the rank that spent least in them, as the other's includes waiting for it); the bytes of the parameters and AdamW's
state it holds (its shards); its peak RSS (in a run of its own with glibc's mmap threshold fixed, memory.py; the
times with the allocator's own settings, as users run). Floor: the update's FLOPs on the rank's rows (fwd + bwd of
every layer's matmuls, attention, the LM head on target tokens) over the matmul rate its threads measure. Targets:
parameter + optimizer bytes per rank at 2 ranks (FSDP2) at most 0.55x of 1 rank's; the 2-rank step no slower than the
1-rank step.

    python benchmarks/bench_scale.py                  # about 12 minutes on the 2-core CPU
Prints a table, then one JSON line; writes benchmarks/results/bench_scale_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory import allocator_env, rss_bytes  # noqa: E402
from models import qwen_width_description, qwen_width_model  # noqa: E402
from report import OUT_HELP, check_minimums, int_list, publish  # noqa: E402

# (ranks, threads per rank, engine): the machine's 2 cores in each, 1 rank first.
CONFIGS = ((1, 2, "fsdp"), (2, 1, "fsdp"), (2, 1, "ddp"))
# The profiler regions of the collectives: FSDP2's gather and reduce-scatter, DDP's all-reduce (gloo's own op).
COMM_REGIONS = ("FSDP::all_gather", "FSDP::post_backward_reduce", "gloo:all_reduce")


def worker(args) -> None:
    """One rank's measurements; rank 0 writes them, with every rank's, to args.out."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_step import demo_rows, matmul_rate, update_flops
    from fastrft.batch import SDPA, AttentionPath, accumulate_gradients
    from fastrft.config import TrainConfig
    from fastrft.distributed import end_world, full_value, init_world, local_tensor, shard_policy
    from fastrft.trainer import make_optimizer

    torch.set_num_threads(args.threads)
    world = init_world(600, cuda=False)   # gloo on the CPU, also on a GPU machine
    device = torch.device("cpu")
    model = qwen_width_model(args.layers)
    loss_module = shard_policy(model, world, fsdp=args.engine == "fsdp")
    cfg = TrainConfig(model="unused", constraint="kl")
    optimizer = make_optimizer(cfg, model, device)   # the trainer's
    rows = [demo_rows(args.rows, model.config.vocab_size)[i] for i in world.share(args.rows)]
    path = AttentionPath(False, SDPA, args.max_tokens)

    def step():
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(loss_module, rows, cfg, path, device, use_old=False, world=world)
        full_value(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeat):
        world.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    world.barrier()   # the ranks start the profiled step together: a collective's time is its own, not a late start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    comm_us = sum(e.cpu_time_total for e in prof.key_averages() if e.key.startswith(COMM_REGIONS))
    state_bytes = {
        "parameters": sum(local_tensor(p).numel() * p.element_size() for p in model.parameters()),
        "optimizer": sum(local_tensor(t).numel() * t.element_size() for s in optimizer.state.values()
                         for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0),
    }
    flops = update_flops(model, rows)
    rate = matmul_rate(device, torch.float32)
    mine = {"rank": world.rank, "threads": args.threads, "rows": len(rows),
            "step_s": sorted(times)[len(times) // 2], "step_times_s": times, "comm_s": comm_us / 1e6,
            "flops": flops, "matmul_flops_per_s": rate, "floor_s": flops / rate,
            "param_bytes": state_bytes["parameters"], "optimizer_bytes": state_bytes["optimizer"],
            "peak_rss_bytes": rss_bytes()["VmHWM"]}
    ranks = world.gather(mine)
    if world.is_main:
        Path(args.out).write_text(json.dumps(ranks))
    end_world(exit_status=0)


def launch(ranks: int, threads: int, engine: str, rows: int, args, out: Path, measure: str) -> list[dict]:
    """Every rank's measurements of one configuration, taken for its times (measure "time": the allocator's own
    settings, as users run, over --warmup and --repeat steps) or for its peak RSS ("memory": glibc's mmap threshold
    fixed, memory.py, which makes every large allocation a page fault; one step after one warm-up)."""
    env = {**allocator_env(for_memory=measure == "memory"), "OMP_NUM_THREADS": str(threads)}
    repeat, warmup = (args.repeat, args.warmup) if measure == "time" else (1, 1)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", __file__,
               "--worker", "--threads", str(threads), "--engine", engine, "--out", str(out), "--layers",
               str(args.layers), "--rows", str(rows), "--repeat", str(repeat), "--warmup", str(warmup),
               "--max-tokens", str(args.max_tokens)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{ranks}-rank run failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def measured(ranks: int, threads: int, engine: str, rows: int, args, work: str) -> list[dict]:
    """Every rank's times from one launch and its peak RSS from another (launch says why two)."""
    timed, memory = (launch(ranks, threads, engine, rows, args, Path(work) / f"{rows}-{ranks}-{engine}-{measure}.json",
                            measure) for measure in ("time", "memory"))
    per_rank = [{**t, "peak_rss_bytes": m["peak_rss_bytes"]} for t, m in zip(timed, memory)]
    print(f"{rows} rows, {ranks} x {threads} threads, {engine if ranks > 1 else '-'}: step "
          f"{max(r['step_s'] for r in per_rank):.2f} s, peak RSS per rank "
          f"{max(r['peak_rss_bytes'] for r in per_rank) / 1e9:.2f} GB", flush=True)   # minutes pass between lines
    return per_rank


def summarize(ranks: int, threads: int, engine: str, rows: int, per_rank: list[dict]) -> dict:
    slowest = max(per_rank, key=lambda r: r["step_s"])
    return {"rows": rows, "ranks": ranks, "threads_per_rank": threads, "engine": engine if ranks > 1 else "-",
            "step_s": slowest["step_s"],
            # The rank that spent least in the collectives: the other's time there includes waiting for it.
            "comm_s": min(r["comm_s"] for r in per_rank), "floor_s": max(r["floor_s"] for r in per_rank),
            "state_bytes_per_rank": max(r["param_bytes"] + r["optimizer_bytes"] for r in per_rank),
            "peak_rss_bytes_per_rank": max(r["peak_rss_bytes"] for r in per_rank), "per_rank": per_rank}


def markdown(payload: dict) -> str:
    env = payload["machine"]
    lines = [
        "# bench_scale: one update step at 1 and 2 ranks (FSDP2, gloo)", "",
        f"Model: {payload['model']}; demo-shaped rows per step as below. Machine: "
        f"{env.get('cpu', '?')}; torch {env['torch']}, transformers {env['transformers']}, commit "
        f"{env['commit']}{' (dirty)' if env.get('dirty') else ''}; command `{env['command']}`.", "",
        "| rows | ranks x threads | engine | step s | floor s | step / floor | communication s | "
        "params + AdamW per rank GB | peak RSS per rank GB |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["configs"]:
        lines.append(f"| {r['rows']} | {r['ranks']} x {r['threads_per_rank']} | {r['engine']} | {r['step_s']:.2f} | "
                     f"{r['floor_s']:.2f} | {r['step_s'] / r['floor_s']:.2f}x | {r['comm_s']:.2f} | "
                     f"{r['state_bytes_per_rank'] / 1e9:.3f} | {r['peak_rss_bytes_per_rank'] / 1e9:.2f} |")
    lines.append("")
    for ratios in payload["ratios"]:
        lines.append(f"{ratios['rows']} rows, 2 ranks (FSDP2) over 1: step time {ratios['step_time']:.2f}x "
                     f"(target <= 1; without the communication {ratios['step_time_without_comm']:.2f}x), "
                     f"parameter + optimizer bytes per rank {ratios['state_bytes']:.3f}x (target <= 0.55), peak RSS "
                     f"per rank "
                     f"{ratios['peak_rss']:.2f}x; communication {ratios['comm_share']:.0%} of the 2-rank step. "
                     f"FSDP2 over DDP at 2 ranks: step time {ratios['fsdp_over_ddp_step_time']:.2f}x, parameter + "
                     f"optimizer bytes {ratios['fsdp_over_ddp_state_bytes']:.3f}x.  ")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", default="32,128", help="comma-separated rows per step (one size per run)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--out", default=None, help=OUT_HELP % "bench_scale_cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="fsdp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.rows = int(args.rows)
        worker(args)
        return
    check_minimums(parser, args, {"layers": 1, "repeat": 1, "warmup": 0, "max_tokens": 1})
    row_counts = int_list(parser, "--rows", args.rows)
    from fastrft.machine import describe_machine

    payload = {"machine": describe_machine(), "args": vars(args), "model": qwen_width_description(args.layers)}
    payload["machine"]["command"] = "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:])
    payload["configs"], payload["ratios"] = [], []
    with tempfile.TemporaryDirectory(prefix="bench_scale-") as work:
        for rows in row_counts:
            one, two, ddp = (summarize(ranks, threads, engine, rows, measured(ranks, threads, engine, rows, args, work))
                             for ranks, threads, engine in CONFIGS)
            payload["configs"] += [one, two, ddp]
            payload["ratios"].append({
                "rows": rows, "step_time": two["step_s"] / one["step_s"],
                "step_time_without_comm": (two["step_s"] - two["comm_s"]) / one["step_s"],
                "state_bytes": two["state_bytes_per_rank"] / one["state_bytes_per_rank"],
                "peak_rss": two["peak_rss_bytes_per_rank"] / one["peak_rss_bytes_per_rank"],
                "comm_share": two["comm_s"] / two["step_s"],
                "fsdp_over_ddp_step_time": two["step_s"] / ddp["step_s"],
                "fsdp_over_ddp_state_bytes": two["state_bytes_per_rank"] / ddp["state_bytes_per_rank"]})
    publish(payload, markdown(payload), "bench_scale_cpu", args.out)


if __name__ == "__main__":
    main()
