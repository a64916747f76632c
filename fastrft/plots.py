"""Curves of a training run: run_dir/metrics.jsonl -> run_dir/plots/*.png.

    read_metrics(path)    list of dicts, one per non-blank line of a JSON-lines file
    plot_run(run_dir)     one PNG per group of metrics that the run logged; returns their paths

Groups (a figure is drawn only if the run logged at least one of its metrics; one panel per metric, x = step):
    reward.png       reward_mean with a +-reward_std band, eval_reward as points (logged on evaluated steps only)
    constraint.png   refine_rate, changed_token_frac, refine_failed, kl_ref
    losses.png       loss, pg_loss, sft_loss, kl_loss
    policy.png       entropy, clip_frac, response_len
    throughput.png   tokens_per_s, step_time_s, peak_mem_gb
    other.png        every other numeric metric

A step logged twice (a run resumed from a checkpoint older than its last logged step) keeps the later value of each
metric. matplotlib is used through its object API with the Agg canvas: no pyplot, no change to the process's backend.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from fastrft.rundir import RunDir, write_atomically
from fastrft.rundir import read_metrics  # noqa: F401  (importable from here, as it was)

# (file stem, title, metrics): one panel per metric, the metrics being on unrelated scales.
GROUPS = (
    ("constraint", "Refiner constraint", ("refine_rate", "changed_token_frac", "refine_failed", "kl_ref")),
    ("losses", "Losses", ("loss", "pg_loss", "sft_loss", "kl_loss")),
    ("policy", "Policy", ("entropy", "clip_frac", "response_len")),
    ("throughput", "Throughput", ("tokens_per_s", "step_time_s", "peak_mem_gb")),
)
REWARD_KEYS = ("reward_mean", "reward_std", "eval_reward")
_NOT_PLOTTED = {"step", "epoch", "time", "timestamp", "wall_time_s"}  # x-like counters, not curves


def plot_run(run_dir) -> list[Path]:
    """Draw run_dir/metrics.jsonl into run_dir/plots/<group>.png and return the paths written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from e

    run_dir = RunDir(run_dir)
    if not run_dir.metrics.is_file():   # a file, a typo or a folder that holds no run: said so, not an OSError
        why = ("it is a file" if run_dir.path.is_file() else
               f"it holds no {run_dir.metrics.name}" if run_dir.path.is_dir() else "no such folder")
        raise FileNotFoundError(f"{run_dir.path} is not a run directory: {why}")
    series = _series(run_dir.read_metrics(torn_end_ok=True))   # a crashed run's curves too
    run_name = run_dir.path.resolve().name
    written = []

    def save(fig, stem):
        run_dir.plots.mkdir(parents=True, exist_ok=True)
        path = run_dir.plot_file(stem)
        png = io.BytesIO()
        FigureCanvasAgg(fig)
        fig.savefig(png, format="png", dpi=100)
        write_atomically(path, png.getvalue())  # a viewer never sees a half-written PNG
        written.append(path)

    if any(k in series for k in REWARD_KEYS):
        fig = Figure(figsize=(8, 3.5), layout="constrained")
        _draw_reward(fig.add_subplot(), series)
        fig.suptitle(f"Reward - {run_name}")
        save(fig, "reward")

    grouped = set(REWARD_KEYS)
    groups = []
    for stem, title, keys in GROUPS:
        grouped.update(keys)
        groups.append((stem, title, [k for k in keys if k in series]))
    groups.append(("other", "Other metrics", sorted(k for k in series if k not in grouped and k not in _NOT_PLOTTED)))

    for stem, title, keys in groups:
        if not keys:
            continue
        fig = Figure(figsize=(8, 1.0 + 2.2 * len(keys)), layout="constrained")
        axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
        for ax, key in zip(axes, keys):
            steps, values = series[key]
            ax.plot(steps, values, marker="." if len(steps) <= 50 else None)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("step")
        fig.suptitle(f"{title} - {run_name}")
        save(fig, stem)
    return written


def _series(records: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """metric -> (steps, values), sorted by step; later records win on a repeated step; non-numbers dropped."""
    by_key: dict[str, dict[float, float]] = {}
    no_step = 0
    for record in records:
        step = record.get("step")
        if not _plottable(step):
            no_step += 1
            continue
        for key, value in record.items():
            if key != "step" and _plottable(value):
                by_key.setdefault(key, {})[step] = float(value)  # NaN/inf stay: matplotlib leaves a gap
    if no_step:
        warnings.warn(f"{no_step} metrics record(s) without a numeric 'step' were not plotted", stacklevel=3)
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in by_key.items()}


def _plottable(value) -> bool:
    return isinstance(value, (int, float))  # bools count: a flag such as refine_failed plots as 0/1


def _draw_reward(ax, series) -> None:
    if "reward_mean" in series:
        steps, mean = series["reward_mean"]
        ax.plot(steps, mean, label="reward_mean")
        if "reward_std" in series:
            std_by_step = dict(zip(*series["reward_std"]))
            band = [(s, m, std_by_step[s]) for s, m in zip(steps, mean) if s in std_by_step]
            if band:
                ax.fill_between([s for s, _, _ in band], [m - sd for _, m, sd in band], [m + sd for _, m, sd in band],
                                alpha=0.25, label="reward_mean +- reward_std")
    elif "reward_std" in series:
        ax.plot(*series["reward_std"], label="reward_std")
    if "eval_reward" in series:
        ax.plot(*series["eval_reward"], marker="o", linestyle="--", label="eval_reward")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
