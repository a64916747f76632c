"""What a result was measured on: one description of the machine, the package versions, the commit and the command,
shared by `fastrft compare` and every benchmark."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "triton", "transformers", "trl", "peft", "numpy")


def quiet_deepspeed_without_gpu() -> None:
    """Without a GPU, DeepSpeed's accelerator is the CPU's, named so it is not guessed: transformers' save_pretrained
    imports DeepSpeed where it is installed (through accelerate), and its guess warns that a GPU went undetected."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def describe_machine(device=None, packages=PACKAGES) -> dict:
    """device (a torch.device, default: CUDA when present) names the accelerator or the CPU; the versions of the
    installed ones of packages; the git commit of this source tree, dirty when tracked files changed."""
    import torch

    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    env = {"device": torch.cuda.get_device_name() if cuda else cpu_name(), "cpu": cpu_name(),
           "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "cpu_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
           # set by benchmarks that measure peak RSS (benchmarks/memory.py): large allocations then cost page faults
           "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "unset"),
           "platform": platform.platform(), "python": platform.python_version()}
    for name in packages:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    env.update(_git_commit())
    env["load_average"] = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    env["command"] = " ".join(["python", *sys.argv])
    return env


def cpu_name() -> str:
    """The CPU's model name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git_commit() -> dict:
    source = Path(__file__).resolve().parent
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        return {"commit": git("rev-parse", "--short", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        # A copy without .git (a lent GPU machine gets the working tree alone): the commit its sender names, if any.
        return {"commit": os.environ.get("FASTRFT_COMMIT", "unknown"), "dirty": None}
