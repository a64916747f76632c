"""How many trivial programs per second does the sandbox run from a thread pool?

    python benchmarks/bench_sandbox.py [--programs 240] [--workers 8] [--repeats 3]

Each program reads a line of stdin and prints it reversed; every result is checked. Providers side by side:
the bubblewrap sandbox with 1 worker and with ``--workers``, and (for scale only) the same programs run without
isolation (``unsafe=True``). Prints a table, then one JSON line; writes benchmarks/results/bench_sandbox.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import OUT_HELP, RESULTS, check_minimums, say_written  # noqa: E402

from fastrft import sandbox  # noqa: E402
from fastrft.machine import describe_machine  # noqa: E402

SOURCE = "import sys\nprint(sys.stdin.readline().strip()[::-1])"


def _bwrap_version() -> str:
    try:
        return subprocess.run(["bwrap", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "missing"


def measure(programs: int, workers: int, repeats: int, unsafe: bool) -> dict:
    jobs = [(SOURCE, f"program {i}\n") for i in range(programs)]
    expected = [f"program {i}"[::-1] + "\n" for i in range(programs)]
    sandbox.run_many(jobs[:workers], workers=workers, unsafe=unsafe)  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        results = sandbox.run_many(jobs, workers=workers, unsafe=unsafe)
        elapsed_s = time.perf_counter() - start
        bad = [r for r, want in zip(results, expected) if r.status != "ok" or r.stdout != want]
        if bad:
            raise RuntimeError(f"{len(bad)} programs failed, first: {bad[0]}")
        rates.append(programs / elapsed_s)
    wall = [r.wall_s for r in results]
    provider = "unsafe (no isolation)" if unsafe else f"bwrap sandbox, memory by {results[0].memory_mechanism}"
    return {"provider": provider, "workers": workers,
            "programs": programs, "programs_per_s": statistics.median(rates), "runs_per_s": rates,
            "median_program_wall_ms": 1000 * statistics.median(wall)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=240)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "bench_sandbox"), help=OUT_HELP % "bench_sandbox")
    args = parser.parse_args()
    check_minimums(parser, args, {"programs": 1, "workers": 1, "repeats": 1})
    if not sandbox.sandbox_available():
        sys.exit("bubblewrap is missing or not working: apt-get install bubblewrap")

    rows = [measure(args.programs, 1, args.repeats, unsafe=False),
            measure(args.programs, args.workers, args.repeats, unsafe=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if sandbox.memory_mechanism() != "rlimit":  # what the per-program cgroup costs: the fallback beside it
            found = sandbox._memory_place
            sandbox._memory_place = ("rlimit", {}, "the benchmark's comparison")
            rows.append(measure(args.programs, args.workers, args.repeats, unsafe=False))
            sandbox._memory_place = found
        rows.append(measure(args.programs, args.workers, args.repeats, unsafe=True))

    print(f"{'provider':<40}{'workers':>8}{'programs/s':>12}{'median wall ms':>16}")
    for row in rows:
        print(f"{row['provider']:<40}{row['workers']:>8}{row['programs_per_s']:>12.1f}"
              f"{row['median_program_wall_ms']:>16.1f}")
    record = {
        "question": "trivial sandboxed programs per second from a thread pool",
        "command": "python " + " ".join([os.path.relpath(__file__, Path.cwd())] + sys.argv[1:]),
        "machine": describe_machine(),
        "sandbox": {"python": sandbox._python(), "bwrap": _bwrap_version(),
                    "memory_mechanism": sandbox.memory_mechanism()},
        "program": SOURCE,
        "repeats": args.repeats,
        "programs": args.programs,
        "results": rows,
    }
    print(json.dumps(record))
    write_results(record, Path(args.out))


def write_results(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    machine = record["machine"]
    # The floor: the same program, started the same way, without isolation (a fresh interpreter each).
    unsafe = {r["workers"]: r["programs_per_s"] for r in record["results"] if r["provider"].startswith("unsafe")}
    lines = [f"# {record['question']}", "", f"`{record['command']}` on {machine['cores_available']} CPUs "
             f"({machine['cpu']}, {machine['platform']}), {record['sandbox']['bwrap']}, "
             f"commit {machine['commit']}{' (dirty)' if machine.get('dirty') else ''}.", "",
             f"Program: `{record['program']!r}`, every output checked; median of {record['repeats']} runs of "
             f"{record['programs']} programs after a warm-up. Floor: the same programs without isolation (unsafe: a "
             f"fresh interpreter each, what any sandbox adds to); x floor = programs/s over its at as many workers.",
             "", "| provider | workers | programs/s | x floor | median wall per program (ms) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['provider']} | {r['workers']} | {r['programs_per_s']:.1f} | "
              f"{r['programs_per_s'] / unsafe[r['workers']]:.2f}x | {r['median_program_wall_ms']:.1f} |"
              if r["workers"] in unsafe else
              f"| {r['provider']} | {r['workers']} | {r['programs_per_s']:.1f} | - | "
              f"{r['median_program_wall_ms']:.1f} |"
              for r in record["results"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    say_written(out)


if __name__ == "__main__":
    main()
