"""Peak memory of one call, shared by the benchmarks: the CUDA allocator's peak, or on the CPU the process's peak
RSS (reset through /proc/self/clear_refs), with glibc's mmap threshold fixed so that freed buffers leave the RSS."""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path


MMAP_THRESHOLD = "65536"   # bytes: glibc serves every larger allocation by mmap, and returns it when freed


def allocator_env(for_memory: bool) -> dict:
    """This process's environment for a child that measures peak RSS (the mmap threshold fixed) or time (glibc's own
    settings, as users run: the fixed threshold makes every large allocation a page fault)."""
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_MMAP_THRESHOLD_"}
    if for_memory:
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    return env


def fix_malloc_mmap_threshold(args: list[str] | None = None) -> None:
    """Re-executes the script once (with args, default its own) with a fixed mmap threshold: large CPU buffers are
    then returned to the OS when freed, so the peak RSS measures peak memory. Call before importing torch. Times
    taken so are not what users see: every large allocation costs page faults (bench_step's demo step 1.3-1.6x
    slower), so a benchmark that times as well measures its memory in a process of its own, or its times first."""
    if sys.platform == "linux" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
        os.execv(sys.executable, [sys.executable, sys.argv[0], *(sys.argv[1:] if args is None else args)])


def rss_bytes() -> dict:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def peak_extra_bytes(fn, device, *, minus_bytes: int = 0) -> int | None:
    """Peak memory during fn() beyond what was allocated before it, less minus_bytes (e.g. the gradients it
    creates); None where the CPU peak cannot be reset."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before - minus_bytes
    if not Path("/proc/self/clear_refs").exists():
        return None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = rss_bytes()["VmRSS"]
    fn()
    return rss_bytes()["VmHWM"] - before - minus_bytes
