"""How a benchmark reports, shared by the benchmarks: the table, then one JSON line, and both written under
benchmarks/results/."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from fastrft.machine import quiet_deepspeed_without_gpu

quiet_deepspeed_without_gpu()   # every benchmark that saves a model would print DeepSpeed's guess on the CPU

RESULTS = Path(__file__).resolve().parent / "results"
OUT_HELP = ("where to write the results: a path without suffix, which gets .json and .md (default: "
            "benchmarks/results/%s)")


def publish(payload: dict, text: str, name: str, out: str | None = None) -> None:
    """Prints text (Markdown) and payload (one JSON line); writes them to out (a path without suffix), by default
    benchmarks/results/<name>, as .md and .json."""
    print(text)
    print(json.dumps(payload))
    path = Path(out) if out else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    path.with_suffix(".md").write_text(text)
    say_written(path)


def say_written(path: Path) -> None:
    """Where the results went (a quick look with the default path replaces the committed ones: --out elsewhere)."""
    print(f"written: {path.with_suffix('.json')} and .md", file=sys.stderr)


def check_minimums(parser, args, minimums: dict[str, float]) -> None:
    """parser.error naming the first option below its least value (minimums: attribute -> least; None passes)."""
    for name, least in minimums.items():
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, got {value}")


def int_list(parser, flag: str, text: str, least: int = 1) -> list[int]:
    """text as comma-separated integers >= least; else parser.error naming flag."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < least:
        parser.error(f"{flag} takes comma-separated integers >= {least}, got {text!r}")
    return values


def check_device(parser, name: str):
    """The torch device of that name, which this machine has; else parser.error."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: this machine has no CUDA device")
    return device
