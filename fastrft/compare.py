"""The same run under several constraints and seeds, side by side.

    result = compare(base_cfg, modes=["none", "kl", "refiner"], kl_coefs=[0.01, 0.05], seeds=2, out_dir="cmp")

Each variant (a constraint mode, and for KL modes given `kl_coefs` one variant per coefficient, named `kl@0.05`) runs
once per seed in out_dir/runs/<variant>_seed<k>/ with the base configuration apart from constraint, kl_coef, seed and
output_dir. For a given seed every variant starts from the same weights and draws prompts in the same order (the
prompt stream is seeded by cfg.seed); with dynamic_sampling on, how many extra prompts a step draws depends on the
policy, so the streams agree until the first refill. A run whose summary.json says it finished cfg.steps steps is
not run again, a run with a checkpoint resumes from it, any other run starts afresh: running the same comparison
again picks up where an interrupted one stopped. SIGINT/SIGTERM stop the current run at a checkpoint (the trainer's
StopSignal) and the comparison raises KeyboardInterrupt before starting the next.

Written to out_dir: comparison.json (definitions, configuration, environment, per-run numbers, per-variant mean and
std over seeds, per-step curves, every call that wrote the directory), comparison.md (the table) and reward.png,
refine_rate.png, kl_ref.png, policy.png; calls.jsonl logs each call as it ends, an interrupted or failed one too.

Definitions (per run, then mean +- sample std over seeds; std is null with one seed):
    training time      cumulative step_time_s; held-out evaluation is not counted; the step-0 evaluation is at 0 s
    final / best       held-out (greedy) eval_reward at the last step / the highest one logged, step 0 included
    equal time         the eval_reward of the last evaluation at or before a shared budget T of training time,
                       T = the median total training time over the seeds of the fastest variant (the variant with
                       the smallest such median): what each variant had reached when the fastest one was done. The
                       last measured evaluation, not an interpolation, so it is a reward some checkpoint really had.
    KL at the end      mean kl_ref (k3 estimate of KL(policy || reference) on the sampled tokens) over the last 10%
                       of the steps (at least one step); the same "last 10%" window for degenerate_frac and entropy
    refine rate        share of the samples the refiner changed, per step: its mean over the first and the last
                       10% of steps (the constraint's strength early and late) and over the run
    stability          max_drop: the largest fall of eval_reward below its running best; the run is flagged
                       collapsed when max_drop exceeds COLLAPSE_FRACTION of its gain (best - initial) or when its
                       final eval_reward is below the initial one (the reference's score). With no gain at all, any
                       fall below the initial reward counts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from fastrft.config import CONSTRAINTS, REFINER_CONSTRAINTS, SEED_END, SEED_RANGE, TrainConfig, load_saved_config
from fastrft.distributed import launched_rank
from fastrft.jsonl import finite_number, json_safe, read_jsonl
from fastrft.machine import describe_machine
from fastrft.rundir import RunDir, check_writable_dir, write_atomically

COLLAPSE_FRACTION = 0.5     # a drop of more than half the gain over the initial reward is a collapse
TAIL_FRACTION = 0.1         # "at the end" = the last 10% of the steps
RUNS_DIR = "runs"
CALLS_FILE = "calls.jsonl"   # one line per call that wrote the directory, interrupted ones too
PLOT_FILES = ("reward.png", "refine_rate.png", "kl_ref.png", "policy.png")
GOLD_PLOT = "gold.png"      # only for a task trained on a proxy reward
# Keys that may differ between a run's saved config.yaml and the comparison's config for the same run.
_MAY_DIFFER = {"progress", "plots", "output_dir"}
# Per-step metrics averaged over seeds into curves.
CURVE_KEYS = ("eval_reward", "eval_gold", "reward_mean", "refine_rate", "kl_ref", "entropy", "degenerate_frac",
              "train_time_s")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str           # "refiner", "kl@0.05", ...
    constraint: str
    kl_coef: float


def expand_variants(modes, kl_coefs=None, default_kl_coef: float = 0.05) -> list[Variant]:
    """Modes -> variants: a KL mode becomes one variant per coefficient when kl_coefs is given."""
    modes = [m.strip() for m in modes if m.strip()]
    if not modes:
        raise ValueError(f"no modes given: choose among {', '.join(CONSTRAINTS)}")
    for mode in modes:
        if mode not in CONSTRAINTS:
            raise ValueError(f"unknown mode {mode!r}: choose among {', '.join(CONSTRAINTS)}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"a mode is listed twice: {', '.join(modes)}")
    kl_modes = [m for m in modes if m in ("kl", "kl+refiner")]
    if kl_coefs is not None:
        kl_coefs = [float(c) for c in kl_coefs]
        if not kl_coefs:
            raise ValueError("kl_coefs is empty")
        if any(not math.isfinite(c) or c < 0 for c in kl_coefs):
            raise ValueError(f"KL coefficients must be finite and >= 0, got {kl_coefs}")
        if len(set(kl_coefs)) != len(kl_coefs):
            raise ValueError(f"a KL coefficient is listed twice: {kl_coefs}")
        if not kl_modes:
            raise ValueError("KL coefficients were given but no mode uses KL (kl or kl+refiner)")
    variants = []
    for mode in modes:
        if mode in kl_modes and kl_coefs is not None:
            variants += [Variant(f"{mode}@{c:g}", mode, c) for c in kl_coefs]
        else:
            variants.append(Variant(mode, mode, default_kl_coef))
    names = [v.name for v in variants]
    clash = next((v for v in variants if names.count(v.name) > 1), None)
    if clash is not None:   # their runs would share one folder
        same = [f"{v.kl_coef!r}" for v in variants if v.name == clash.name]
        raise ValueError(f"KL coefficients {' and '.join(same)} both name their runs {clash.name} (6 significant "
                         f"digits): give coefficients that differ there")
    return variants


def seed_list(base_seed: int, seeds) -> list[int]:
    """seeds: a count (base_seed, base_seed + 1, ...) or explicit seeds; each a seed the trainer takes."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        if base_seed + seeds > SEED_END:
            raise ValueError(f"seed={base_seed} with {seeds} seeds would run seeds up to {base_seed + seeds - 1}, "
                             f"past the last one there is ({SEED_END - 1}): start from a lower seed")
        return [base_seed + k for k in range(seeds)]
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {seeds}")
    outside = [s for s in seeds if not 0 <= s < SEED_END]
    if outside:
        raise ValueError(f"seeds must be in {SEED_RANGE}, got {outside[0]}")
    return seeds


def run_name(variant: Variant, seed: int) -> str:
    return f"{variant.name}_seed{seed}"


def run_config(base_cfg: TrainConfig, variant: Variant, seed: int, out_dir: Path) -> TrainConfig:
    return base_cfg.replaced(constraint=variant.constraint, kl_coef=variant.kl_coef, seed=seed,
                             output_dir=str(out_dir / RUNS_DIR / run_name(variant, seed)))


def run_state(cfg: TrainConfig, world_size: int = 1) -> str:
    """"finished", "resume" (a checkpoint to continue from) or "start"; ValueError when the directory holds a run
    with other settings, one that went past cfg.steps, one trained on another number of ranks than world_size
    (each rank samples its share of the prompts: runs of one comparison are trained alike), or one whose checkpoints
    were lost since it saved one (starting it again would replace its records)."""
    from fastrft.checkpoint import latest_checkpoint

    run_dir = RunDir(cfg.output_dir)
    if run_dir.holds_run():
        saved = load_saved_config(run_dir.config).with_absolute_paths().to_dict()
        wanted = cfg.with_absolute_paths().to_dict()
        differ = sorted(k for k in wanted if k not in _MAY_DIFFER and k != "steps" and saved.get(k) != wanted[k])
        if differ:
            shown = ", ".join(f"{k}: {saved.get(k)!r} there, {wanted[k]!r} now" for k in differ)
            raise ValueError(f"{run_dir.path} holds a run with other settings ({shown}); use another output "
                             f"directory")
    summary = run_dir.read_summary()
    checkpoint = latest_checkpoint(run_dir.path)
    ranks = (summary or {}).get("world_size") or _checkpoint_world_size(checkpoint)
    if ranks is not None and ranks != world_size:
        raise ValueError(f"{run_dir.path} holds a run trained on {ranks} rank{'s' * (ranks > 1)}, and this comparison "
                         f"runs on {world_size}: each rank samples its share of the prompts, so its results would not "
                         f"compare; run the comparison on {ranks}, or give another --out")
    if summary is not None:
        done = summary.get("steps")
        if done == cfg.steps:
            return "finished"
        if isinstance(done, int) and done > cfg.steps:
            raise ValueError(f"{run_dir.path} already ran {done} steps, more than steps={cfg.steps}")
    if checkpoint is None and run_dir.holds_run():   # "start" replaces what the folder holds: never a lost run's records
        from fastrft.trainer import lost_checkpoints_refusal

        refusal = lost_checkpoints_refusal(run_dir, "give another --out")
        if refusal:
            raise ValueError(refusal)
    return "resume" if checkpoint is not None else "start"


class Stopped(KeyboardInterrupt):
    """A comparison stopped by a signal (signal_name: SIGINT or SIGTERM), its runs checkpointed where they trained."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name


@contextmanager
def _terminated_as_interrupt():
    """SIGTERM outside a run's steps (a run loading, its first evaluation, the aggregation) as Stopped, so that the
    call is recorded; inside them the trainer's own handler checkpoints and stops. The previous handler comes
    back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped("stopped by SIGTERM between runs' steps; run the same command again to continue the comparison",
                      "SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_out_dir(out_dir: Path) -> None:
    """A ValueError naming --out unless the comparison can write its runs and reports there."""
    check_writable_dir(out_dir, "--out")
    if RunDir(out_dir).holds_run():
        raise ValueError(f"--out {out_dir} holds a training run: a comparison writes its own runs/ and reports there; "
                         f"give another --out")


def compare(base_cfg: TrainConfig, *, modes, kl_coefs=None, seeds=3, out_dir, command: str | None = None,
            train_fn=None) -> dict:
    """Run (or resume, or skip when finished) every variant x seed, then aggregate; returns what comparison.json
    holds. train_fn defaults to fastrft.trainer.train (the tests spy on it)."""
    if train_fn is None:
        from fastrft.trainer import train as train_fn

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    variants = expand_variants(modes, kl_coefs, base_cfg.kl_coef)
    seeds = seed_list(base_cfg.seed, seeds)
    plan = [(v, s, run_config(base_cfg, v, s, out_dir)) for v in variants for s in seeds]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    states = [run_state(cfg, world_size) for _, _, cfg in plan]   # every run directory checked before any training
    for (_, _, cfg), state in zip(plan, states):
        if state != "finished":   # a file of the run's layout that fastrft did not write: refused now, not runs later
            RunDir(cfg.output_dir).run_files()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Under torchrun every rank trains each run (its share of the prompts); rank 0 alone reports and writes.
    main_rank = launched_rank() == 0
    load_start = _loadavg()
    t_start = time.perf_counter()
    trained = []

    def call_record(outcome: str) -> dict:
        return {"command": command, "wall_time_s": time.perf_counter() - t_start, "runs_trained": list(trained),
                "outcome": outcome,
                "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_start": load_start,
                "load_average_end": _loadavg()}

    stopped_by = None
    try:
        with _terminated_as_interrupt():
            for i, ((variant, seed, cfg), state) in enumerate(zip(plan, states), start=1):
                name = run_name(variant, seed)
                if state == "finished":
                    if main_rank:
                        print(f"fastrft compare [{i}/{len(plan)}] {name}: finished earlier, kept", flush=True)
                    continue
                if main_rank:
                    print(f"fastrft compare [{i}/{len(plan)}] {name}: "
                          f"{'resuming from its last checkpoint' if state == 'resume' else 'training'}", flush=True)
                # "start": nothing to resume from; what an earlier attempt left there (no checkpoint) is replaced.
                summary = train_fn(cfg, resume=state == "resume", overwrite=state == "start")
                trained.append(name)
                if summary.get("stopped_by"):
                    stopped_by = summary["stopped_by"]
                    raise Stopped(f"stopped by {stopped_by} during {name} (checkpoint saved); run the same command "
                                  f"again to continue the comparison", stopped_by)
            result = aggregate(base_cfg, variants, seeds, out_dir)
    except BaseException as e:   # the call stays on record: its runs' time is in the comparison it continues
        if main_rank:
            stopped_by = stopped_by or getattr(e, "signal_name", None)
            _append_call(out_dir, call_record(f"stopped by {stopped_by}" if stopped_by else "interrupted"
                                              if isinstance(e, KeyboardInterrupt) else f"failed ({type(e).__name__})"))
        raise
    if not main_rank:
        return result
    result["command"] = command
    result["environment"] = describe_machine()
    result["calls"] = _append_call(out_dir, call_record("finished"))
    # Whole or as they were (a signal now ends the process with its default action).
    write_atomically(out_dir / "comparison.json", (json.dumps(json_safe(result), indent=1) + "\n").encode())
    write_atomically(out_dir / "comparison.md", markdown(result).encode())
    try:
        result["plots"] = [str(p) for p in plot_comparison(result, out_dir)]
    except ImportError as exc:
        print(f"fastrft compare: plots skipped: {exc}", file=sys.stderr)
    return result


# ----------------------------------------------------------------------------------------------- per run

def run_numbers(records: list[dict]) -> dict:
    """The per-run numbers of the module docstring, plus the run's curves (step -> value)."""
    train_steps = [r for r in records if r["step"] >= 1]
    if not train_steps:
        raise ValueError("the run logged no training step")
    time_at, total = {0: 0.0}, 0.0
    for r in train_steps:
        total += r.get("step_time_s", 0.0)
        time_at[r["step"]] = total
    evals = [(r["step"], time_at[r["step"]], r["eval_reward"]) for r in records
             if finite_number(r.get("eval_reward"))]
    tail = train_steps[-max(1, math.ceil(TAIL_FRACTION * len(train_steps))):]
    head = train_steps[:max(1, math.ceil(TAIL_FRACTION * len(train_steps)))]

    out = {"steps": train_steps[-1]["step"], "train_time_s": total,
           "kl_ref_end": _mean_of(tail, "kl_ref"),
           "refine_rate_first": _mean_of(head, "refine_rate"), "refine_rate_last": _mean_of(tail, "refine_rate"),
           "refine_rate_mean": _mean_of(train_steps, "refine_rate"),
           "degenerate_frac_end": _mean_of(tail, "degenerate_frac"),
           "degenerate_frac_mean": _mean_of(train_steps, "degenerate_frac"),
           "entropy_end": _mean_of(tail, "entropy"),
           "reward_mean_end": _mean_of(tail, "reward_mean")}
    if evals:
        rewards = [v for _, _, v in evals]
        initial, final = _logged_ends(records, "eval_reward")
        best_so_far, max_drop, drop_step = -math.inf, 0.0, None
        for step, _, value in evals:
            best_so_far = max(best_so_far, value)
            if best_so_far - value > max_drop:
                max_drop, drop_step = best_so_far - value, step
        out.update(eval_reward_initial=initial, eval_reward_final=final, eval_reward_best=max(rewards),
                   max_drop=max_drop, max_drop_step=drop_step)
        if initial is not None and final is not None:
            gain = max(rewards) - initial
            out["collapsed"] = final < initial or max_drop > COLLAPSE_FRACTION * gain
    gold = [r["eval_gold"] for r in records if finite_number(r.get("eval_gold"))]
    if gold:   # a task trained on a proxy reward: its gold reward, evaluated alongside
        initial, final = _logged_ends(records, "eval_gold")
        out.update(eval_gold_initial=initial, eval_gold_final=final, eval_gold_best=max(gold))
    out["curves"] = {key: {r["step"]: r[key] for r in records if finite_number(r.get(key))}
                     for key in CURVE_KEYS if key != "train_time_s"}
    out["curves"]["train_time_s"] = time_at
    out["evals"] = evals
    return out


def _logged_ends(records: list[dict], key: str) -> tuple[float | None, float | None]:
    """key's value at step 0 and at its last evaluation, each None where it was null (nothing scored) or not logged:
    never another evaluation's value in its place."""
    logged = [r for r in records if key in r]
    first = logged[0][key] if logged and logged[0]["step"] == 0 else None
    last = logged[-1][key] if logged else None
    return tuple(value if finite_number(value) else None for value in (first, last))


def eval_at_time(evals: list[tuple[int, float, float]], budget_s: float) -> float | None:
    """The eval_reward of the last evaluation at or before budget_s of training time."""
    reached = [value for _, t, value in evals if t <= budget_s * (1 + 1e-12)]
    return reached[-1] if reached else None


# ----------------------------------------------------------------------------------------------- across seeds

def mean_std(values) -> dict:
    """Mean, sample std and the half-width of the mean's 95% confidence interval (Student's t, n - 1 degrees of
    freedom) over the finite values; std and ci95 are None with fewer than two."""
    values = [float(v) for v in values if finite_number(v)]
    if not values:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    n = len(values)
    std = statistics.stdev(values) if n > 1 else None
    return {"mean": statistics.fmean(values), "std": std,
            "ci95": student_t_quantile(0.975, n - 1) * std / math.sqrt(n) if n > 1 else None, "n": n}


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):   # the fraction converges fast on this side only
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    tiny = 1e-300

    def nonzero(v):
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / nonzero(1.0 - (a + b) * x / (a + 1.0))
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / nonzero(1.0 + numerator * d)
            c = nonzero(1.0 + numerator / c)
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    return math.exp(log_front) * fraction / a


def student_t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    return _incomplete_beta(df / 2.0, 0.5, df / (df + t * t)) if math.isfinite(t) else 0.0


def student_t_quantile(probability: float, df: int) -> float:
    """The t with P(T <= t) = probability (> 0.5), by bisection on the two-sided tail."""
    low, high = 0.0, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_two_sided_p(middle, df) > 2 * (1 - probability) else (low, middle)
    return (low + high) / 2


def paired_test(a: dict, b: dict) -> dict | None:
    """Paired t-test of a - b over the seeds both have ({seed: value}): the mean difference, its 95% confidence
    interval, t, the two-sided p and whether p < SIGNIFICANCE_LEVEL; None with fewer than two pairs."""
    seeds = sorted(seed for seed in a if seed in b and finite_number(a[seed]) and finite_number(b[seed]))
    if len(seeds) < 2:
        return None
    differences = [a[seed] - b[seed] for seed in seeds]
    n, mean = len(differences), statistics.fmean(differences)
    std = statistics.stdev(differences)
    if mean and std <= 1e-12 * max(1.0, abs(mean)):
        # Every seed moved by the same amount (discrete rewards, few seeds): the spread is unknown, not zero, and the
        # test says nothing (t, p and significant are null). (No difference at all is p = 1.)
        return {"mean_difference": mean, "ci95": None, "t": None, "p": None, "significant": None, "n": n}
    t = mean / (std / math.sqrt(n)) if mean else 0.0
    p = student_t_two_sided_p(t, n - 1) if mean else 1.0
    return {"mean_difference": mean, "ci95": student_t_quantile(0.975, n - 1) * std / math.sqrt(n), "t": t, "p": p,
            "significant": p < SIGNIFICANCE_LEVEL, "n": n}


def significance(variants_out: list[dict]) -> list[dict]:
    """Paired tests over seeds of TESTED_METRICS: each constrained variant against `none`, and `refiner` against
    the KL variant with the best mean final reward: the gold reward where the task has one (the proxy's best would
    be the one that games it most), else the eval reward."""
    by_name = {v["name"]: v for v in variants_out}
    pairs = [(v["name"], "none") for v in variants_out if v["name"] != "none" and "none" in by_name]
    judged_by = "eval_gold_final" if _has_gold(variants_out) else "eval_reward_final"
    kl_variants = [v for v in variants_out if v["constraint"] == "kl" and v["summary"][judged_by]["mean"] is not None]
    if "refiner" in by_name and kl_variants:
        best_kl = max(kl_variants, key=lambda v: v["summary"][judged_by]["mean"])
        pairs.append(("refiner", best_kl["name"]))
    tests = []
    for first, second in pairs:
        for metric in TESTED_METRICS:
            values = [{run["seed"]: run.get(metric) for run in by_name[name]["runs"]} for name in (first, second)]
            result = paired_test(*values)
            if result is not None:
                tests.append({"variant": first, "against": second, "metric": metric, **result})
    return tests


SIGNIFICANCE_LEVEL = 0.05
TESTED_METRICS = ("eval_reward_final", "eval_reward_best", "eval_reward_at_equal_time", "eval_gold_final",
                  "kl_ref_end", "degenerate_frac_end")
SCALARS = ("eval_reward_initial", "eval_reward_final", "eval_reward_best", "eval_reward_at_equal_time",
           "eval_gold_initial", "eval_gold_final", "eval_gold_best",
           "kl_ref_end", "refine_rate_first", "refine_rate_last", "refine_rate_mean", "degenerate_frac_end",
           "degenerate_frac_mean", "entropy_end", "reward_mean_end", "max_drop", "train_time_s")


def aggregate(base_cfg: TrainConfig, variants: list[Variant], seeds: list[int], out_dir: Path) -> dict:
    per_variant = []
    for variant in variants:
        runs = []
        for seed in seeds:
            numbers = run_numbers(RunDir(out_dir / RUNS_DIR / run_name(variant, seed)).read_steps())
            runs.append({"name": run_name(variant, seed), "seed": seed, **numbers})
        per_variant.append((variant, runs))
    medians = {v.name: statistics.median(r["train_time_s"] for r in runs) for v, runs in per_variant}
    fastest = min(medians, key=medians.get)
    budget_s = medians[fastest]

    variants_out = []
    for variant, runs in per_variant:
        for run in runs:
            run["eval_reward_at_equal_time"] = eval_at_time(run["evals"], budget_s)
        # A mode without the refiner logs refine_rate 0: not a measurement, left out (n/a, no curve).
        refines = variant.constraint in REFINER_CONSTRAINTS
        summary = {key: mean_std(run.get(key) for run in runs if refines or not key.startswith("refine_"))
                   for key in SCALARS}
        flags = [run["collapsed"] for run in runs if "collapsed" in run]
        summary["collapsed"] = {"count": sum(flags), "n": len(flags)}
        variants_out.append({
            "name": variant.name, "constraint": variant.constraint,
            "kl_coef": variant.kl_coef if variant.constraint in ("kl", "kl+refiner") else None,
            "summary": summary, "curves": _mean_curves(runs, refines=refines),
            "runs": [{k: v for k, v in run.items() if k not in ("curves", "evals")} for run in runs],
        })
    config = base_cfg.to_dict()
    for key in ("output_dir", "constraint", "seed"):
        config.pop(key)
    return {
        "format": 1,
        "variants": variants_out,
        "significance": significance(variants_out),
        "seeds": seeds,
        "equal_time": {"budget_s": budget_s, "variant": fastest, "median_train_time_s": medians},
        "config": config,
        "varied": ["constraint", "kl_coef", "seed"],
        "definitions": {
            "train_time_s": "cumulative step_time_s (evaluation excluded)",
            "eval_reward_at_equal_time": "eval_reward of the last evaluation at or before equal_time.budget_s of "
                                         "training time; budget = median total training time of the fastest variant",
            "kl_ref_end": f"mean kl_ref over the last {TAIL_FRACTION:.0%} of steps",
            "refine_rate_first/last": f"mean refine_rate over the first/last {TAIL_FRACTION:.0%} of steps",
            "max_drop": "largest fall of eval_reward below its running best (step 0 included)",
            "eval_gold_*": "a task trained on a proxy reward: its gold reward of the held-out greedy completions "
                           "(eval_reward is then the proxy's)",
            "collapsed": f"max_drop > {COLLAPSE_FRACTION} * (best - initial) or final < initial",
            "std": "sample standard deviation over seeds (null with one seed)",
            "ci95": "half-width of the 95% confidence interval of the mean over seeds (Student's t, n - 1 degrees "
                    "of freedom)",
            "significance": f"paired t-test over seeds (same seed: same initial weights and prompt order) of the "
                            f"difference variant - against, two-sided; significant when p < {SIGNIFICANCE_LEVEL}",
        },
    }


def _mean_curves(runs: list[dict], refines: bool = True) -> dict:
    """key -> {"step": [...], "mean": [...], "std": [...], "n": [...]} at the steps that every seed which logged
    the key logged a value at: a mean over another subset of seeds at some steps would draw moves no seed made.
    refines: whether the runs' mode refines (else refine_rate has no curve)."""
    curves = {}
    for key in CURVE_KEYS:
        logged = [run["curves"][key] for run in runs if run["curves"][key] and (refines or key != "refine_rate")]
        steps = sorted(set.intersection(*(set(curve) for curve in logged))) if logged else []
        rows = [mean_std(curve[s] for curve in logged) for s in steps]
        curves[key] = {"step": steps, "mean": [r["mean"] for r in rows], "std": [r["std"] for r in rows],
                       "n": [r["n"] for r in rows]}
    return curves


# ----------------------------------------------------------------------------------------------- reports

TABLE = (  # (column, summary key, digits); a column no variant has a value for is left out
    ("final eval reward", "eval_reward_final", 3),
    ("final gold reward", "eval_gold_final", 3),
    ("best eval reward", "eval_reward_best", 3),
    ("eval reward @ equal time", "eval_reward_at_equal_time", 3),
    ("KL to ref (end)", "kl_ref_end", 3),
    ("refine rate first -> last 10%", ("refine_rate_first", "refine_rate_last"), 3),
    ("degenerate (end)", "degenerate_frac_end", 3),
    ("entropy (end)", "entropy_end", 3),
    ("max drop", "max_drop", 3),
    ("collapsed", "collapsed", 0),
    ("train time (s)", "train_time_s", 1),
)


def _cell(summary: dict, key, digits: int, seeds: int) -> str:
    """A summary's mean ± ci95, "n/a" where no seed measured it, and its number of seeds where some did not."""
    if isinstance(key, tuple):
        return " -> ".join(_cell(summary, k, digits, seeds) for k in key)
    if key == "collapsed":
        flags = summary[key]
        return "n/a" if not flags["n"] else f"{flags['count']}/{flags['n']}"
    stat = summary[key]
    if stat["mean"] is None:
        return "n/a"
    text = f"{stat['mean']:.{digits}f}"
    text = text if stat["ci95"] is None else f"{text} ± {stat['ci95']:.{digits}f}"
    return text if stat["n"] == seeds else f"{text} (n={stat['n']})"


def markdown(result: dict) -> str:
    env = result.get("environment") or {}
    seeds = result["seeds"]
    lines = ["# fastrft compare", ""]
    if result.get("command"):
        lines += ["```", result["command"], "```", ""]
    initial = result["variants"][0]["summary"]["eval_reward_initial"]["mean"]
    lines += [f"{len(result['variants'])} variants x {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
              f"({', '.join(map(str, seeds))}), "
              f"{result['config']['steps']} steps each; mean ± the half-width of its 95% confidence interval over "
              f"seeds (Student's t; the std is in comparison.json), (n=k) where only k seeds measured it; n/a where "
              f"none did or the mode has no such thing. Held-out reward of the reference (step 0): "
              f"{'n/a' if initial is None else f'{initial:.3f}'}. Equal time = "
              f"{result['equal_time']['budget_s']:.1f} s of training (median of the fastest variant, "
              f"{result['equal_time']['variant']}).", ""]
    n_seeds = len(seeds)
    columns = [(col, key, digits) for col, key, digits in TABLE
               if any(_cell(v["summary"], key, digits, n_seeds) not in ("n/a", "n/a -> n/a")
                      for v in result["variants"])]
    lines.append("| variant | " + " | ".join(col for col, _, _ in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for v in result["variants"]:
        name = v["name"] if v["kl_coef"] is None or "@" in v["name"] else f"{v['name']} (kl_coef {v['kl_coef']:g})"
        lines.append(f"| {name} | " + " | ".join(_cell(v["summary"], k, d, n_seeds) for _, k, d in columns) + " |")
    tests = result.get("significance")
    if tests:
        lines += ["", "## Differences (paired t-test over seeds)", "",
                  f"Each test on its own at p < {SIGNIFICANCE_LEVEL}, with no correction for the {len(tests)} tests "
                  f"here (by chance alone about {SIGNIFICANCE_LEVEL * len(tests):.1f} would read significant)"
                  + ("; the KL variant `refiner` is tested against is the one with the best mean final reward in "
                     "these same runs, picked after the fact"
                     if any(t["variant"] == "refiner" and t["against"] != "none" for t in tests) else "")
                  + ". n/a: every seed moved by the same amount, so there is no spread to test against.", "",
                  "| variant - against | metric | mean difference | 95% CI | t | p | significant | seeds |",
                  "|---|---|---:|---:|---:|---:|---|---:|"]
        lines += [f"| {s['variant']} - {s['against']} | {s['metric']} | {s['mean_difference']:+.3f} | "
                  + (f"± {s['ci95']:.3f} | {s['t']:.2f} | {s['p']:.3g} | {'yes' if s['significant'] else 'no'} |"
                     if s["p"] is not None else "n/a | n/a | n/a | n/a |") + f" {s['n']} |"
                  for s in tests]
    lines += ["", "![held-out reward](reward.png)", ""]
    if _has_gold(result["variants"]):
        lines += [f"![proxy and gold reward]({GOLD_PLOT})", ""]
    drawn = [f"![{title}]({name})" for name, title in (("refine_rate.png", "refine rate"),
                                                        ("kl_ref.png", "KL to the reference"))
             if _logged(result["variants"], name.removesuffix(".png"))]
    lines += [" ".join(drawn), "", "## Definitions", ""] if drawn else ["## Definitions", ""]
    lines += [f"- `{k}`: {text}" for k, text in result["definitions"].items()]
    defaults = TrainConfig().to_dict()
    varied = ", ".join(result["varied"])
    fixed = ", ".join(f"{k}={v}" for k, v in result["config"].items()
                      if k not in result["varied"] and v != defaults.get(k))
    lines += ["", "## Settings", "", f"Varied: {varied}. Shared, where not TrainConfig's default: {fixed} (all of "
              f"them in comparison.json). Runs of one seed start from the same weights and draw prompts in the "
              f"same seeded order.", ""]
    if env:
        lines += ["## Machine", ""]
        lines += [f"- {k}: {v}" for k, v in env.items()]
        lines.append("")
    lines += ["## Calls", "", "Each call that wrote this directory (the load average is the machine's, other "
              "work included: training times are only comparable under similar load).", "",
              "| ended at | outcome | wall time (s) | load average 1/5/15 min, start -> end | runs trained |",
              "|---|---|---:|---|---|"]
    lines += [f"| {c['finished_at']} | {c.get('outcome', 'finished')} | {c['wall_time_s']:.0f} | "
              f"{_load(c['load_average_start'])} -> {_load(c['load_average_end'])} | "
              f"{', '.join(c['runs_trained']) or '(no run)'} |" for c in result.get("calls", [])]
    lines.append("")
    return "\n".join(lines)


def plot_comparison(result: dict, out_dir: Path) -> list[Path]:
    """reward.png (eval reward vs step and vs training time), refine_rate.png, kl_ref.png, policy.png (entropy,
    degenerate rate): per variant the mean over seeds with a +- std band."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from e

    n_seeds = len(result["seeds"])
    written = []

    def band(ax, xs, curve, label, marker=None, floor=None):
        mean = curve["mean"]
        line, = ax.plot(xs, mean, label=label, marker=marker)
        if n_seeds > 1:
            std = [s or 0.0 for s in curve["std"]]
            low = [m - s if floor is None else max(m - s, floor) for m, s in zip(mean, std)]
            ax.fill_between(xs, low, [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.2)

    def save(fig, name):
        FigureCanvasAgg(fig)
        path, tmp = out_dir / name, out_dir / f".{name}.tmp"
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
        written.append(path)

    title = f"mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''}"

    def finish(fig, axes, heading, name):
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        fig.suptitle(f"{heading} - {title}")
        save(fig, name)

    fig = Figure(figsize=(11, 4), layout="constrained")
    by_step, by_time = fig.subplots(1, 2)
    for v in result["variants"]:
        curve = v["curves"]["eval_reward"]
        band(by_step, curve["step"], curve, v["name"], marker=".")
        times = dict(zip(v["curves"]["train_time_s"]["step"], v["curves"]["train_time_s"]["mean"]))
        band(by_time, [times[s] for s in curve["step"]], curve, v["name"], marker=".")
    by_time.axvline(result["equal_time"]["budget_s"], color="grey", linestyle=":", label="equal-time budget")
    by_step.set(xlabel="step", ylabel="held-out reward")
    by_time.set(xlabel="training time (s, mean over seeds; evaluation excluded)", ylabel="held-out reward")
    finish(fig, (by_step, by_time), "Held-out reward", "reward.png")

    if _has_gold(result["variants"]):   # a task trained on a proxy: what the proxy says beside what the gold reward says
        fig = Figure(figsize=(11, 4), layout="constrained")
        proxy_ax, gold_ax = fig.subplots(1, 2)
        for v in result["variants"]:
            band(proxy_ax, v["curves"]["eval_reward"]["step"], v["curves"]["eval_reward"], v["name"], marker=".")
            band(gold_ax, v["curves"]["eval_gold"]["step"], v["curves"]["eval_gold"], v["name"], marker=".")
        proxy_ax.set(xlabel="step", ylabel="held-out proxy reward (trained on)")
        gold_ax.set(xlabel="step", ylabel="held-out gold reward")
        finish(fig, (proxy_ax, gold_ax), "Proxy and gold reward", GOLD_PLOT)

    for key, label, name in (("refine_rate", "refine rate (share of samples changed)", "refine_rate.png"),
                             ("kl_ref", "KL(policy || reference), k3", "kl_ref.png")):
        stale = out_dir / name
        if not _logged(result["variants"], key):   # no variant has it: no empty axes (nor an earlier call's plot)
            stale.unlink(missing_ok=True)
            continue
        fig = Figure(figsize=(7, 3.5), layout="constrained")
        ax = fig.add_subplot()
        floor = None
        if key == "kl_ref":
            # KL spans decades and spikes; on a log axis a band reaching below 0 is drawn down to a floor a decade
            # under the smallest positive mean.
            positive = [m for v in result["variants"] for m in v["curves"][key]["mean"] if m > 0]
            if positive:
                floor = min(positive) / 10
                ax.set_yscale("log")
                label += ", log scale"
        for v in result["variants"]:
            if v["curves"][key]["step"]:   # (a variant without it: not in the legend either)
                band(ax, v["curves"][key]["step"], v["curves"][key], v["name"], floor=floor)
        ax.set(xlabel="step", ylabel=label)
        finish(fig, (ax,), label, name)

    fig = Figure(figsize=(11, 3.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("entropy", "degenerate_frac")):
        for v in result["variants"]:
            band(ax, v["curves"][key]["step"], v["curves"][key], v["name"])
        ax.set(xlabel="step", ylabel=key)
    finish(fig, axes, "Policy", "policy.png")
    return written


# ----------------------------------------------------------------------------------------------- helpers

def _logged(variants: list[dict], key: str) -> bool:
    """Whether any variant has a curve of key."""
    return any(v["curves"][key]["step"] for v in variants)


def _has_gold(variants: list[dict]) -> bool:
    """Whether the runs are of a task trained on a proxy reward (a gold reward was evaluated)."""
    return any(v["summary"]["eval_gold_final"]["mean"] is not None for v in variants)


def _checkpoint_world_size(checkpoint: Path | None) -> int | None:
    """The number of ranks that wrote the checkpoint (None: none, or its manifest unreadable, which a resume
    reports)."""
    from fastrft.checkpoint import read_manifest

    try:
        return read_manifest(checkpoint).get("world_size") if checkpoint is not None else None
    except (OSError, ValueError):
        return None


def _append_call(out_dir: Path, call: dict) -> list[dict]:
    """Every call that wrote out_dir (CALLS_FILE, one JSON line each, rewritten atomically with this one added),
    oldest first; a directory from before the ledger starts it with the calls its comparison.json holds."""
    ledger = out_dir / CALLS_FILE
    if ledger.is_file():
        # A torn last line (a call killed, or a full disk, while it wrote its own) is dropped, with a warning.
        earlier = [c for _, c in read_jsonl(ledger, torn_end_ok=True)]
    else:
        report = out_dir / "comparison.json"
        earlier = json.loads(report.read_text()).get("calls", []) if report.is_file() else []
    calls = [*earlier, json_safe(call)]
    write_atomically(ledger, "".join(json.dumps(c) + "\n" for c in calls).encode())
    return calls


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _load(values) -> str:
    return "n/a" if values is None else " / ".join(f"{x:.2f}" for x in values)


def _mean_of(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if finite_number(r.get(key))]
    return statistics.fmean(values) if values else None
