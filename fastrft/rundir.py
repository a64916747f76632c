"""A run's folder, and the one place that knows its layout (the trainer, the CLI, compare and plots ask it for paths):

    config.yaml      the resolved TrainConfig
    metrics.jsonl    one JSON object per logged step (step 0: the reference model's evaluation)
    summary.json     the run's summary, written when it stops
    plots/           PNGs drawn from metrics.jsonl (fastrft.plots)
    checkpoints/     fastrft.checkpoint's own layout
"""
from __future__ import annotations

import json
from pathlib import Path

from fastrft.jsonl import read_jsonl

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOTS_DIR = "plots"
CHECKPOINTS_DIR = "checkpoints"


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file; ValueError naming file and line on a bad line."""
    return [record for _, record in read_jsonl(path)]


class RunDir:
    def __init__(self, path):
        self.path = Path(path)
        self.config = self.path / CONFIG_FILE
        self.metrics = self.path / METRICS_FILE
        self.summary = self.path / SUMMARY_FILE
        self.plots = self.path / PLOTS_DIR
        self.checkpoints = self.path / CHECKPOINTS_DIR

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def holds_run(self) -> bool:
        return self.config.is_file()

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics)

    def write_metrics(self, records: list[dict]) -> None:
        self.metrics.write_text("".join(json.dumps(r) + "\n" for r in records))

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_steps(self) -> list[dict]:
        """metrics.jsonl as one record per step, sorted by step; a step logged twice (a resumed run) keeps the later
        values."""
        by_step: dict[int, dict] = {}
        for record in self.read_metrics():
            by_step.setdefault(record["step"], {}).update(record)
        return [by_step[s] for s in sorted(by_step)]

    def read_summary(self) -> dict | None:
        return json.loads(self.summary.read_text()) if self.summary.is_file() else None

    def write_summary(self, summary: dict) -> None:
        self.summary.write_text(json.dumps(summary, indent=1) + "\n")
