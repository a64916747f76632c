"""fastrft's command line.

    fastrft train --config run.yaml [key=value ...]      a run, into output_dir
    fastrft train --resume RUN_DIR [key=value ...]       continue a run from its last checkpoint (e.g. steps=200)
    fastrft demo [key=value ...]                         the embedded default: tiny model, synthetic task, CPU
    fastrft plot RUN_DIR                                 redraw a run's plots
    fastrft export RUN_DIR OUT_DIR                       the run's last checkpoint as a Hugging Face model
                                                         directory (LoRA adapters merged)
    fastrft compare (--config run.yaml | --demo) --modes none,kl,refiner [--kl-coefs 0.01,0.1] [--seeds 3]
                    [--out DIR] [key=value ...]          every mode x seed, resumable; comparison.json/.md, plots
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from fastrft.distributed import end_world, launched_rank
from fastrft.machine import quiet_deepspeed_without_gpu
from fastrft.rundir import RunDir

# The embedded demo: RL from the project's own reference model on the synthetic sorting task, on the CPU.
DEMO_DEFAULTS = dict(task="demo", device="cpu", steps=100, prompts_per_step=16, group_size=8, temperature=1.0,
                     lr=3e-4, constraint="refiner", refine_coef=0.5, eval_every=10, save_every=30,
                     generation_batch_size=256, output_dir="runs/demo")


def _train(args) -> int:
    from fastrft.config import load_config, load_saved_config
    from fastrft.trainer import train

    if args.resume:
        if args.config:
            raise ValueError("--resume reads the run's own config.yaml: give --config or --resume, not both")
        run_dir = RunDir(args.resume)
        if not run_dir.holds_run():
            raise ValueError(f"--resume {run_dir.path}: not a fastrft run directory (no {run_dir.config.name})")
        moved = next((item for item in args.overrides if item.partition("=")[0] == "output_dir"), None)
        if moved:
            raise ValueError(f"override {moved!r}: --resume continues {run_dir.path} in its own folder; to continue "
                             f"it elsewhere, copy the folder and resume the copy")
        cfg = load_saved_config(run_dir.config, args.overrides, output_dir=str(run_dir.path))
    else:
        cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    if launched_rank() == 0:
        print(json.dumps(summary, indent=1))
    return _exit_status(summary, "train", cfg.output_dir)


def _demo(args) -> int:
    from fastrft.trainer import train

    t0 = time.perf_counter()
    if launched_rank() == 0:
        print("fastrft demo: reference model (trained once by fastrft.tasks.demo, then cached)", flush=True)
    cfg = _demo_config(args)
    if not args.overwrite and not any(item.startswith("output_dir=") for item in args.overrides):
        cfg.output_dir = str(_free_run_dir(Path(cfg.output_dir), cfg))
    summary = train(cfg, overwrite=args.overwrite)
    total_s = time.perf_counter() - t0
    if launched_rank() != 0:
        return _exit_status(summary, "demo", cfg.output_dir)
    rows = [
        ("held-out reward, reference model", summary["eval_reward_initial"]),
        ("held-out reward, after RL", summary["eval_reward_final"]),
        ("held-out reward, best", summary["eval_reward_best"]),
        ("refine rate, mean over steps", summary["refine_rate_mean"]),
        ("refine rate, last fifth", summary["refine_rate_last"]),
        ("KL to the reference (k3), last fifth", summary["kl_ref_last"]),
        ("steps / skipped", f"{summary['steps']} / {summary['skipped_steps']}"),
        ("wall time (reference + RL), s", total_s),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\n{'':-<{width + 14}}")
    for name, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{name:<{width}}  {shown:>12}")
    run_dir = RunDir(cfg.output_dir)
    written = [f"{p.name}/" if p.is_dir() else p.name for p in (run_dir.metrics, run_dir.summary, run_dir.plots)
               if p.exists()]   # plots=false draws no plots/
    print(f"{'':-<{width + 14}}\nrun directory: {run_dir.path} ({', '.join(written)})")
    return _exit_status(summary, "demo", cfg.output_dir)


def _exit_status(summary: dict, command: str, output_dir: str) -> int:
    """0 for a run that ran its steps. A run stopped by SIGINT/SIGTERM (its checkpoint saved) did not finish: 128 + the
    signal's number, the shell's status for a process the signal ended (130 for Ctrl-C, as fastrft compare), so that
    `fastrft train ... && next` stops there too."""
    if not summary["stopped_by"]:
        return 0
    if launched_rank() == 0:
        print(f"fastrft {command}: stopped by {summary['stopped_by']} after step {summary['steps']} (checkpoint "
              f"saved); continue it with `fastrft train --resume {output_dir}`", file=sys.stderr)
    return 128 + signal.Signals[summary["stopped_by"]]


def _free_run_dir(path: Path, cfg) -> Path:
    """path, or when it holds a run the first of path-2, path-3, ... that does not (said once): a second
    `fastrft demo` keeps the first one's run. The folder is taken (RunDir.lock) as it is chosen, so that a demo
    started at the same moment goes on to the next one. Under torchrun rank 0 chooses."""
    from fastrft.trainer import run_world

    world = run_world(cfg)
    candidate = None
    if world.is_main:
        candidate, k = path, 1
        while True:
            run_dir = RunDir(candidate)
            if not run_dir.run_files():
                try:
                    run_dir.create()
                    run_dir.lock()
                    break
                except ValueError:   # another demo's, still loading
                    pass
            k += 1
            candidate = path.with_name(f"{path.name}-{k}")
        if candidate != path:
            print(f"fastrft demo: {path} holds an earlier run (kept); this one goes to {candidate} "
                  f"(--overwrite replaces {path} instead)", flush=True)
    return Path(world.broadcast(None if candidate is None else str(candidate)))


def _plot(args) -> int:
    from fastrft.plots import plot_run

    paths = plot_run(Path(args.run_dir))
    if not paths:
        raise ValueError(f"nothing to plot: {RunDir(args.run_dir).metrics} logs no step's metrics")
    for path in paths:
        print(path)
    return 0


def _export(args) -> int:
    from fastrft.trainer import export_model

    if launched_rank() != 0:   # under torchrun (as train and compare run): one rank writes it
        return 0
    out, step = export_model(args.run_dir, args.out_dir)
    print(f"fastrft export: step {step} of {args.run_dir} written to {out}")
    return 0


def _compare(args) -> int:
    import shlex

    from fastrft.compare import check_out_dir, compare, expand_variants
    from fastrft.config import load_config

    for item in args.overrides:
        key = item.partition("=")[0]
        if key in ("constraint", "seed", "output_dir"):
            raise ValueError(f"{key} is set by the comparison (--modes, --seeds, --out), not by {item!r}")
    if args.demo == bool(args.config):
        raise ValueError("give --config RUN_YAML or --demo (one of them)")
    try:
        kl_coefs = [float(c) for c in args.kl_coefs.split(",")] if args.kl_coefs else None
    except ValueError:
        raise ValueError(f"--kl-coefs must be comma-separated numbers, got {args.kl_coefs!r}") from None
    # Mode and folder errors before the demo's reference is trained.
    expand_variants(args.modes.split(","), kl_coefs)
    check_out_dir(Path(args.out))
    if args.demo:
        cfg = _demo_config(args)
    else:
        cfg = load_config(args.config, args.overrides)
    # Every option, the demo's reference too (it decides the model compared): the command reproduces the comparison,
    # with the steps the reference it used was trained (a cached one's, not the option's default).
    if args.demo:
        from fastrft.tasks.demo import cached_reference_steps

        steps = cached_reference_steps(args.cache_dir) or args.reference_steps
        source = ["--demo", "--cache-dir", args.cache_dir, "--reference-steps", str(steps)]
    else:
        source = ["--config", args.config]
    # Under torchrun the ranks' number is part of the results (each rank samples its share of the prompts).
    launcher = ["torchrun", f"--nproc-per-node={os.environ['WORLD_SIZE']}", "-m"] \
        if os.environ.get("WORLD_SIZE", "1") != "1" else []
    command = [*launcher, "fastrft", "compare", *source, "--modes", args.modes,
               *(["--kl-coefs", args.kl_coefs] if args.kl_coefs else []), "--seeds", str(args.seeds), "--out",
               args.out, *args.overrides]
    try:
        result = compare(cfg, modes=args.modes.split(","), kl_coefs=kl_coefs, seeds=args.seeds, out_dir=args.out,
                         command=shlex.join(command))
    except KeyboardInterrupt as exc:   # (Stopped: a signal's stop) 128 + the signal's number, as fastrft train
        if launched_rank() == 0:
            print(f"fastrft compare: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 128 + signal.Signals[getattr(exc, "signal_name", "SIGINT")]
    if launched_rank() != 0:
        return 0
    print((Path(args.out) / "comparison.md").read_text())
    plots = ", ".join(Path(p).name for p in result.get("plots", []))
    print(f"written to {args.out}: comparison.json, comparison.md{', ' + plots if plots else ''}")
    return 0


def _demo_config(args):
    """The demo's config with the overrides, its model the demo's reference, trained into --cache-dir unless cached
    there (under torchrun by rank 0 alone, the others waiting within the config's dist_timeout_s)."""
    from fastrft.config import load_config
    from fastrft.distributed import rank_zero_first
    from fastrft.tasks.demo import ensure_reference
    from fastrft.trainer import resolve_device

    cfg = load_config(None, args.overrides, **DEMO_DEFAULTS)
    if not cfg.model:   # model=PATH among the overrides runs the demo from that model instead
        with rank_zero_first(cfg.dist_timeout_s, cuda=resolve_device(cfg.device).type == "cuda"):
            cfg.model = str(ensure_reference(Path(args.cache_dir), max_steps=args.reference_steps))
    return cfg


def _add_reference_args(parser) -> None:
    """The demo's reference model: where it is cached, and its training budget when it is not cached yet."""
    parser.add_argument("--cache-dir", default="runs/demo_reference", help="where the demo's reference model is kept")
    parser.add_argument("--reference-steps", type=_at_least_one, default=500,
                        help="training steps of the demo's reference model when it is not cached yet")


def _at_least_one(text: str) -> int:
    """An argparse type: an int >= 1 (a reference trained 0 steps would be cached as if complete)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """The command line: its exit status. Under torchrun, a command that returns (no error; a run stopped by a
    signal too) ends the process group and then the process itself with its status (fastrft.distributed.end_world
    says why); alone, it returns."""
    parser = argparse.ArgumentParser(prog="fastrft", description="RL fine-tuning with dynamic (refiner) constraints")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a policy")
    p_train.add_argument("--config", help="YAML file of TrainConfig keys")
    p_train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p_train.add_argument("--overwrite", action="store_true",
                         help="replace the run that output_dir holds (without it, such a folder is refused)")
    p_train.add_argument("overrides", nargs="*", metavar="key=value")
    p_train.set_defaults(func=_train)
    p_demo = sub.add_parser("demo", help="the embedded default run (tiny model, synthetic task, CPU)")
    _add_reference_args(p_demo)
    p_demo.add_argument("--overwrite", action="store_true",
                        help="replace the run in output_dir (default: a folder holding a run is kept and the demo "
                             "writes to the next free runs/demo-N)")
    p_demo.add_argument("overrides", nargs="*", metavar="key=value")
    p_demo.set_defaults(func=_demo)
    p_compare = sub.add_parser("compare", help="the same run under several constraints and seeds, side by side")
    p_compare.add_argument("--config", help="YAML file of TrainConfig keys shared by every run")
    p_compare.add_argument("--demo", action="store_true", help="the embedded demo's settings instead of --config")
    p_compare.add_argument("--modes", required=True, help="comma-separated: none, kl, refiner, kl+refiner")
    p_compare.add_argument("--kl-coefs", help="comma-separated KL coefficients: one variant per KL mode and value")
    p_compare.add_argument("--seeds", type=int, default=3, help="seeds per variant (seed, seed+1, ...)")
    p_compare.add_argument("--out", default="runs/compare", help="comparison directory (runs/ inside it)")
    _add_reference_args(p_compare)
    p_compare.add_argument("overrides", nargs="*", metavar="key=value")
    p_compare.set_defaults(func=_compare)
    p_plot = sub.add_parser("plot", help="redraw a run's plots")
    p_plot.add_argument("run_dir")
    p_plot.set_defaults(func=_plot)
    p_export = sub.add_parser("export", help="a run's last checkpoint as a Hugging Face model directory (LoRA "
                                             "adapters merged), to load with AutoModelForCausalLM or start a run")
    p_export.add_argument("run_dir")
    p_export.add_argument("out_dir", help="a new (or empty) directory")
    p_export.set_defaults(func=_export)
    args, rest = parser.parse_known_args(argv)
    # key=value after a flag (train --config x.yaml steps=1 --overwrite lr=1e-4): argparse leaves it over.
    if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in rest):
        args.overrides += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    quiet_deepspeed_without_gpu()
    try:
        status = args.func(args)
        end_world(exit_status=status or 0)   # under torchrun the process ends here
        return status
    except (ValueError, OSError, FloatingPointError) as exc:   # OSError: a full disk, a folder it may not write
        rank = f" (rank {launched_rank()})" if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"fastrft {args.command}: error{rank}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
