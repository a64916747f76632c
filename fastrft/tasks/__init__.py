"""Tasks: prompts, reward functions and the refiner's format, behind one small dataclass.

    load_task("demo")                       the embedded digit-sorting task (fastrft.tasks.demo)
    load_task("demo_proxy")                 the same, trained on a length-biased proxy reward, judged on the gold one
    load_task("code")                       APPS-format problems scored by unit tests in the sandbox (33 embedded)
    load_task("dialogue", reward_model=P)   chat prompts scored by a local reward model
    load_task("my_pkg.my_mod:make_task")    any callable returning a Task, called with the options
    load_rows("data.jsonl")                 local rows for a task: JSONL or Parquet, each row with a "prompt"

Reward functions follow TRL's convention (see fastrft.rewards): ``f(prompts, completions, **columns)`` where every
column of the rows other than "prompt" arrives as a list aligned with the prompts.
"""
from __future__ import annotations

import importlib
import inspect
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
    gold_reward: str | None = None  # the reward function (by name, training weight 0) that is the gold standard
                                    # when the training reward is a proxy: evaluation reports it as eval_gold

    def required_columns(self) -> tuple[str, ...]:
        """The row columns the reward functions cannot do without: their parameters with no default, other than
        the ones fastrft passes itself (prompts, completions, truncated, completion_ids)."""
        given = {"prompts", "completions", "truncated", "completion_ids"}
        required = []
        for func in self.reward_funcs:
            try:
                parameters = inspect.signature(func).parameters.values()
            except (TypeError, ValueError):   # a builtin or C callable: nothing to read
                continue
            required += [p.name for p in parameters if p.default is p.empty and p.name not in given
                         and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in required]
        return tuple(required)

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
        each reward function's mean, over the completions it scored (None: not scored). The means of
        evaluate_sums. generate: fastrft.rollout.generate or a stand-in with its signature."""
        return {name: total / max(1, count)
                for name, (total, count) in self.evaluate_sums(model, tokenizer, rows, max_new_tokens=max_new_tokens,
                                                               batch_size=batch_size, generate=generate).items()}

    def evaluate_sums(self, model, tokenizer, rows: list[dict], *, max_new_tokens: int, batch_size: int = 256,
                      generate=None) -> dict[str, tuple[float, int]]:
        """evaluate's metrics as (sum, count) of the values each one averages: the trainer adds them up over the
        ranks' shares of the held-out rows, so that a metric does not depend on how the rows were shared. A task
        with an evaluation of its own overrides this (the code task adds pass@k)."""
        from fastrft.rollout import encode_prompts
        from fastrft.rollout import generate as default_generate

        samples = (generate or default_generate)(model, tokenizer,
                                                 encode_prompts(tokenizer, [r["prompt"] for r in rows]),
                                                 max_new_tokens=max_new_tokens, greedy=True, batch_size=batch_size)
        rewards, per_func = self.score(rows, samples.texts, samples.truncated)
        sums = {"eval_reward": _sum_count(rewards)}
        for name, values in per_func.items():
            sums[f"eval_{name}"] = _sum_count(values)
        if self.gold_reward is not None:
            sums["eval_gold"] = sums[f"eval_{self.gold_reward}"]
        return sums


def _sum_count(values: list[float | None]) -> tuple[float, int]:
    """The sum and the number of the values that are not None."""
    scored = [v for v in values if v is not None]
    return float(sum(scored)), len(scored)


def _demo_task(**options) -> Task:
    from fastrft.tasks.demo import demo_task

    return demo_task(**options)


def _demo_proxy_task(**options) -> Task:
    from fastrft.tasks.demo import demo_proxy_task

    return demo_proxy_task(**options)


def _code_task(**options) -> Task:
    from fastrft.tasks.code import code_task

    return code_task(**options)


def _dialogue_task(**options) -> Task:
    from fastrft.tasks.dialogue import dialogue_task

    return dialogue_task(**options)


TASKS: dict[str, Callable[..., Task]] = {"demo": _demo_task, "demo_proxy": _demo_proxy_task, "code": _code_task,
                                         "dialogue": _dialogue_task}


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


def _check_row(row, path: Path, line: int, required: tuple[str, ...]) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("prompt"), str):
        raise ValueError(f"{path}:{line}: row has no string 'prompt' field (keys: {sorted(row)})")
    missing = [column for column in required if row.get(column) is None]
    if missing:
        raise ValueError(f"{path}:{line}: row lacks {', '.join(map(repr, missing))}, which the task's reward "
                         f"functions need (keys: {sorted(row)})")
    return row


def load_rows(path, required: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a local ``.jsonl`` (one JSON object per line, blank lines skipped) or ``.parquet`` file.

    Every row needs a string "prompt" and each `required` column (a task's
    ``required_columns()``); its other fields become reward-function columns too. Errors name the file and the
    (1-based) line, or row for Parquet; a file without rows is an error.
    """
    path = Path(path)
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")
    if not path.is_file():
        raise ValueError(f"dataset {path} does not exist")
    if path.suffix == ".jsonl":
        rows = [_check_row(row, path, line_number, required) for line_number, row in read_jsonl(path)]
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading .parquet rows needs pyarrow: pip install pyarrow") from e
        records = pq.read_table(path).to_pylist()
        rows = [_check_row(row, path, i, required) for i, row in enumerate(records, start=1)]
    if not rows:
        raise ValueError(f"dataset {path} holds no rows")
    return rows
