"""How a benchmark reports, shared by the benchmarks: the table, then one JSON line, and both written under
benchmarks/results/."""
from __future__ import annotations

import json
from pathlib import Path

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
