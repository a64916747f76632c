"""How fast is the minimal token diff? fastrft.diff_masks (C++, 1 thread and all threads; the Python twin on a few
pairs) against difflib.SequenceMatcher, which is neither minimal nor fast.

Cases: 256 pairs of 2048 tokens with 5% edits (substitutions, insertions, deletions; vocabulary 32000), and 16
unrelated pairs of 4096 tokens: random tokens (caught by the multiset bound), a shuffle of the sample (same tokens,
so only the budgeted search can stop) and a 64-token vocabulary. Median of repeated runs after a warm-up.

    python benchmarks/bench_diff.py                    # all cores
    taskset -c 0 python benchmarks/bench_diff.py       # the one-core numbers
    python benchmarks/bench_diff.py --repeats 3 --out /tmp/diff   # a quick look, the committed results untouched
"""
import argparse
import difflib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import OUT_HELP, RESULTS, check_minimums, say_written  # noqa: E402

from fastrft.diff import DEFAULT_MAX_D, cpp_available, diff_masks  # noqa: E402
from fastrft.machine import describe_machine  # noqa: E402


def edited(rng, tokens, rate, vocab):
    out = []
    for token, u, kind, new in zip(tokens.tolist(), rng.random(len(tokens)), rng.integers(0, 3, len(tokens)),
                                   rng.integers(0, vocab, len(tokens)).tolist()):
        if u >= rate:
            out.append(token)
        elif kind == 0:
            out.append(new)
        elif kind == 1:
            out += [token, new]
    return np.array(out, dtype=np.int64)


def median_s(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def difflib_changed(samples, refineds):
    changed = 0
    for a, b in zip(samples, refineds):
        matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
        changed += len(b) - sum(block.size for block in matcher.get_matching_blocks())
    return changed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help=OUT_HELP % "bench_diff")
    args = parser.parse_args()
    check_minimums(parser, args, {"repeats": 1})
    out = Path(args.out) if args.out else RESULTS / "bench_diff"
    try:
        earlier_runs(out.with_suffix(".json"))
    except ValueError as e:
        parser.error(str(e))
    if not cpp_available():
        sys.exit("fastrft._diff is not built: pip install -e . first")
    rng = np.random.default_rng(0)
    vocab = 32_000
    samples = [rng.integers(0, vocab, 2048) for _ in range(256)]
    refineds = [edited(rng, s, 0.05, vocab) for s in samples]
    sample_lists, refined_lists = [s.tolist() for s in samples], [r.tolist() for r in refineds]
    unrelated = {
        "random tokens": ([rng.integers(0, vocab, 4096) for _ in range(16)],
                          [rng.integers(0, vocab, 4096) for _ in range(16)]),
    }
    base = [rng.integers(0, vocab, 4096) for _ in range(16)]
    unrelated["shuffled sample"] = (base, [rng.permutation(s) for s in base])
    unrelated["vocab 64"] = ([rng.integers(0, 64, 4096) for _ in range(16)],
                             [rng.integers(0, 64, 4096) for _ in range(16)])
    cores = len(os.sched_getaffinity(0))
    rows = []

    def add(case, provider, seconds, changed=None, note=""):
        rows.append({"case": case, "provider": provider, "ms": round(seconds * 1e3, 3),
                     "changed_tokens": changed, "note": note})

    case = "256 x 2048, 5% edits"
    changed = sum(int(m.sum()) for m in diff_masks(samples, refineds, num_threads=1))
    add(case, "fastrft C++ 1 thread (int64 arrays)",
        median_s(lambda: diff_masks(samples, refineds, num_threads=1), args.repeats), changed)
    add(case, "fastrft C++ 1 thread (lists)",
        median_s(lambda: diff_masks(sample_lists, refined_lists, num_threads=1), args.repeats), changed)
    add(case, f"fastrft C++ {cores} threads (int64 arrays)",
        median_s(lambda: diff_masks(samples, refineds), args.repeats), changed)
    few = 8
    py_s = median_s(lambda: diff_masks(sample_lists[:few], refined_lists[:few], backend="python"), 2)
    add(case, "fastrft Python twin", py_s * 256 / few, changed, f"measured on {few} pairs, scaled to 256")
    add(case, "difflib.SequenceMatcher (autojunk=False)",
        median_s(lambda: difflib_changed(sample_lists, refined_lists), 3),
        difflib_changed(sample_lists, refined_lists), "no minimality guarantee")

    for name, (a, b) in unrelated.items():
        case = f"16 x 4096 unrelated, {name}"
        masks = diff_masks(a, b, num_threads=1)
        changed = sum(int(m.sum()) for m in masks)
        add(case, "fastrft C++ 1 thread", median_s(lambda: diff_masks(a, b, num_threads=1), args.repeats), changed,
            f"max_d={DEFAULT_MAX_D}")
        add(case, f"fastrft C++ {cores} threads", median_s(lambda: diff_masks(a, b), args.repeats), changed,
            f"max_d={DEFAULT_MAX_D}")
        if name == "vocab 64":
            exact = diff_masks(a, b, num_threads=1, max_d=8192)
            add(case, "fastrft C++ 1 thread, exact (max_d=8192)",
                median_s(lambda: diff_masks(a, b, num_threads=1, max_d=8192), 3),
                sum(int(m.sum()) for m in exact), "minimal")
        add(case, "difflib.SequenceMatcher (autojunk=False)",
            median_s(lambda: difflib_changed([x.tolist() for x in a], [x.tolist() for x in b]), 1),
            difflib_changed([x.tolist() for x in a], [x.tolist() for x in b]), "no minimality guarantee")

    print(f"{'case':42s} {'provider':44s} {'ms':>10s} {'changed':>9s}  note")
    for row in rows:
        print(f"{row['case']:42s} {row['provider']:44s} {row['ms']:10.2f} {str(row['changed_tokens']):>9s}  "
              f"{row['note']}")
    meta = {**describe_machine(torch.device("cpu")), "default_max_d": DEFAULT_MAX_D}
    result = {"meta": meta, "rows": rows}
    print(json.dumps(result))
    write_results(result, out)


def earlier_runs(path: Path) -> list[dict]:
    """The runs a bench_diff results file holds (none where there is no file); a ValueError for a file that is not
    one (checked before measuring: the measurement is not lost)."""
    if not path.exists():
        return []
    try:
        runs = json.loads(path.read_text())["runs"]
        cores = [run["meta"]["cores_available"] for run in runs]
    except (ValueError, KeyError, TypeError):
        cores = None
    if cores is None or not all(isinstance(n, int) for n in cores):
        raise ValueError(f"{path} exists and is not a bench_diff result: give another --out")
    return runs


def write_results(result, out: Path):
    """out.json keeps one run per number of available cores (so the taskset -c 0 run and the all-core run sit side
    by side); out.md is rebuilt from it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    runs = {str(run["meta"]["cores_available"]): run for run in earlier_runs(path)}
    runs[str(result["meta"]["cores_available"])] = result
    ordered = [runs[key] for key in sorted(runs, key=int)]
    with open(path, "w") as f:
        json.dump({"runs": ordered}, f, indent=1)
    lines = ["# bench_diff: minimal token diff vs difflib", ""]
    for run in ordered:
        meta = run["meta"]
        lines += [f"## {meta['cores_available']} core(s) available", "",
                  f"CPU {meta['cpu']}; Python {meta['python']}, torch {meta['torch']}, numpy {meta['numpy']}; "
                  f"commit {meta['commit']}{' (dirty)' if meta.get('dirty') else ''}; default max_d {meta['default_max_d']}.", "",
                  f"Command: `{meta['command']}`", "",
                  "x difflib: time over difflib.SequenceMatcher's on the same case in this run (the implementation "
                  "one reaches for; it does not promise a minimal diff). No hardware floor is stated: the diff's work "
                  "grows with the edits (Myers: (N+M)*D), not with the bytes read.", "",
                  "| case | provider | ms (median) | x difflib | changed tokens | note |",
                  "|---|---|---:|---:|---:|---|"]
        difflib_ms = {r["case"]: r["ms"] for r in run["rows"] if r["provider"].startswith("difflib")}
        lines += [f"| {r['case']} | {r['provider']} | {r['ms']:.2f} | "
                  f"{r['ms'] / difflib_ms[r['case']]:.3f} | {r['changed_tokens']} | {r['note']} |"
                  if r["case"] in difflib_ms else
                  f"| {r['case']} | {r['provider']} | {r['ms']:.2f} | - | {r['changed_tokens']} | {r['note']} |"
                  for r in run["rows"]]
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    say_written(out)


if __name__ == "__main__":
    main()
