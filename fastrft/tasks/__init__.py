"""Tasks: prompts, reward functions and the refiner's format, behind one small dataclass.

    load_task("demo")                       the embedded digit-sorting task (fastrft.tasks.demo)
    load_task("code")                       APPS-format problems scored by unit tests in the sandbox (33 embedded)
    load_task("dialogue", reward_model=P)   chat prompts scored by a local reward model
    load_task("my_pkg.my_mod:make_task")    any callable returning a Task, called with the options
    load_rows("data.jsonl")                 local rows for a task: JSONL or Parquet, each row with a "prompt"

Reward functions follow TRL's convention (see fastrft.rewards): ``f(prompts, completions, **columns)`` where every
column of the rows other than "prompt" arrives as a list aligned with the prompts.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastrft.jsonl import read_jsonl


@dataclass
class Task:
    name: str
    train_rows: list[dict]        # each {"prompt": str, **columns}
    eval_rows: list[dict]         # held-out split, same format
    reward_funcs: list[Callable]  # f(prompts, completions, **columns) -> list[float | None]
    reward_weights: list[float]
    refine_template: str          # .format(prompt=..., response=...) -> the text the refiner continues greedily
    parse_refinement: Callable[[str], str | None]  # refiner continuation (decoded, up to EOS) -> response | None
    max_new_tokens: int           # generation length that fits the task

    def score(self, rows: list[dict], completions: list[str], truncated: list[bool]):
        """(weighted reward or None, {function name: values}) of each completion; rows[i] is completion i's prompt
        row, whose other columns and the `truncated` flags reach the reward functions."""
        from fastrft.rewards import combine_rewards

        columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
        columns["truncated"] = truncated   # stopped by max_new_tokens: tasks may treat it as degenerate
        return combine_rewards(self.reward_funcs, self.reward_weights, [r["prompt"] for r in rows], completions,
                               **columns)

    def evaluate(self, model, tokenizer, rows: list[dict], *, max_new_tokens: int, batch_size: int = 256,
                 generate=None) -> dict:
        """Held-out metrics, each named eval_*: here the weighted reward of greedy completions (eval_reward) and
        each reward function's mean. A task with an evaluation of its own overrides this (the code task adds
        pass@k). generate: fastrft.rollout.generate or a stand-in with its signature."""
        from fastrft.rollout import encode_prompts
        from fastrft.rollout import generate as default_generate

        samples = (generate or default_generate)(model, tokenizer,
                                                 encode_prompts(tokenizer, [r["prompt"] for r in rows]),
                                                 max_new_tokens=max_new_tokens, greedy=True, batch_size=batch_size)
        rewards, per_func = self.score(rows, samples.texts, samples.truncated)
        metrics = {"eval_reward": _mean([r for r in rewards if r is not None])}
        for name, values in per_func.items():
            metrics[f"eval_{name}"] = _mean([v for v in values if v is not None])
        return metrics


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


def _demo_task(**options) -> Task:
    from fastrft.tasks.demo import demo_task

    return demo_task(**options)


def _code_task(**options) -> Task:
    from fastrft.tasks.code import code_task

    return code_task(**options)


def _dialogue_task(**options) -> Task:
    from fastrft.tasks.dialogue import dialogue_task

    return dialogue_task(**options)


TASKS: dict[str, Callable[..., Task]] = {"demo": _demo_task, "code": _code_task, "dialogue": _dialogue_task}


def load_task(spec: str, **options) -> Task:
    """A registered task by name, or ``"package.module:function"`` (a callable returning a Task) called with
    ``options``."""
    if spec in TASKS:
        task = TASKS[spec](**options)
    elif ":" in spec:
        module_name, _, func_name = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"task {spec!r}: cannot import module {module_name!r} ({e})") from e
        factory = getattr(module, func_name, None)
        if not callable(factory):
            raise ValueError(f"task {spec!r}: module {module_name!r} has no callable {func_name!r}")
        task = factory(**options)
    else:
        raise ValueError(f"unknown task {spec!r}: known tasks are {sorted(TASKS)}, or pass 'package.module:function'")
    if not isinstance(task, Task):
        raise ValueError(f"task {spec!r} returned {type(task).__name__}, not a fastrft.tasks.Task")
    return task


def _check_row(row, path: Path, line: int) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("prompt"), str):
        raise ValueError(f"{path}:{line}: row has no string 'prompt' field (keys: {sorted(row)})")
    return row


def load_rows(path) -> list[dict]:
    """Rows of a local ``.jsonl`` (one JSON object per line, blank lines skipped) or ``.parquet`` file.

    Every row needs a string "prompt"; its other fields become reward-function columns. Errors name the file and
    the (1-based) line, or row for Parquet.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        return [_check_row(row, path, line_number) for line_number, row in read_jsonl(path)]
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading .parquet rows needs pyarrow: pip install pyarrow") from e
        records = pq.read_table(path).to_pylist()
        return [_check_row(row, path, i) for i, row in enumerate(records, start=1)]
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")
