"""Tasks: prompts, reward functions and the refiner's format, behind one small dataclass.

    load_task("demo")                       the embedded digit-sorting task (fastrft.tasks.demo)
    load_task("demo_proxy")                 the same, trained on a length-biased proxy reward, judged on the gold one
    load_task("code")                       APPS-format problems scored by unit tests in the sandbox (33 embedded)
    load_task("dialogue", reward_model=P)   chat prompts scored by a local reward model
    load_task("my_pkg.my_mod:make_task")    any callable returning a Task, called with the options
    load_task("path/to/my_task.py:make")    the same, from a file
    load_rows("data.jsonl")                 local rows for a task: JSONL or Parquet, each row with a "prompt"

Reward functions follow TRL's convention (see fastrft.rewards): ``f(prompts, completions, **columns)`` where every
column of the rows other than "prompt" arrives as a list aligned with the prompts, and a chat prompt's completion is
a list of one assistant message.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import math
import numbers
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastrft.config import ConfigError
from fastrft.jsonl import read_jsonl


# What fastrft passes reward functions itself: no row column.
_GIVEN_COLUMNS = {"prompts", "completions", "truncated", "completion_ids"}


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
        required = []
        for func in self.reward_funcs:
            try:
                parameters = inspect.signature(func).parameters.values()
            except (TypeError, ValueError):   # a builtin or C callable: nothing to read
                continue
            required += [p.name for p in parameters if p.default is p.empty and p.name not in _GIVEN_COLUMNS
                         and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in required]
        return tuple(required)

    def column_types(self) -> dict[str, tuple[type, ...]]:
        """The types a row's column may hold where a reward function annotates it list[X], X made of int, float,
        str, bool and None (answer: list[str]): load_rows refuses other values by file and line."""
        out = {}
        for func in self.reward_funcs:
            try:
                hints = typing.get_type_hints(func)
            except Exception:   # annotations that do not resolve, or a builtin: nothing to read
                continue
            for name, hint in hints.items():
                allowed = _plain_types(typing.get_args(hint)[0]) if typing.get_origin(hint) is list \
                    and typing.get_args(hint) else None
                if allowed and name not in _GIVEN_COLUMNS:
                    out[name] = allowed
        return out

    def check(self, source: str) -> None:
        """A ValueError naming the field (source: where the task comes from) unless the task's fields can work: a
        run would otherwise fail at its first step or its last, after the run folder is written. (The refiner's
        template and parser are checked where a run uses the refiner.)"""
        from fastrft.rewards import _func_name

        funcs = self.reward_funcs
        if not isinstance(funcs, (list, tuple)) or not funcs or not all(callable(f) for f in funcs):
            raise ValueError(f"{source}: Task.reward_funcs must be a non-empty list of callables, got {funcs!r}")
        weights = self.reward_weights
        if not isinstance(weights, (list, tuple)) or len(weights) != len(funcs):
            raise ValueError(f"{source}: Task.reward_weights must be a list of one weight per reward function "
                             f"({len(funcs)}), got {weights!r}")
        bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)]
        if bad:
            raise ValueError(f"{source}: Task.reward_weights must be finite numbers, got {bad[0]!r}")
        names = [_func_name(f) for f in funcs]
        if self.gold_reward is not None and self.gold_reward not in names:
            raise ValueError(f"{source}: Task.gold_reward={self.gold_reward!r} names no reward function (they are "
                             f"{', '.join(map(repr, names))})")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"{source}: Task.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        for name in ("train_rows", "eval_rows"):
            if not isinstance(getattr(self, name), list):
                raise ValueError(f"{source}: Task.{name} must be a list of rows (dicts), got "
                                 f"{type(getattr(self, name)).__name__}")

    def degenerate(self, completion: str, truncated: bool) -> str | None:
        """Why a completion is degenerate (the step's degenerate_frac), or None: fastrft.rewards.is_degenerate's
        kinds; a task with kinds of its own overrides this (the code task adds unparseable programs)."""
        from fastrft.rewards import is_degenerate

        return is_degenerate(completion, truncated=truncated)

    def score(self, rows: list[dict], completions: list[str], truncated: list[bool],
              completion_ids: list[list[int]] | None = None):
        """(weighted reward or None, {function name: values}) of each completion; rows[i] is completion i's prompt
        row, whose other columns, the `truncated` flags and the completions' token ids (`completion_ids`, up to and
        including EOS, as TRL passes them) reach the reward functions. A completion of a chat prompt reaches them as
        TRL gives it, [{"role": "assistant", "content": text}]."""
        from fastrft.rewards import combine_rewards

        completions = [[{"role": "assistant", "content": text}] if isinstance(row["prompt"], list) else text
                       for row, text in zip(rows, completions, strict=True)]

        # Every column any row holds (None where a row lacks it), as datasets and TRL give them.
        columns = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r) if k != "prompt"}
        columns["truncated"] = truncated   # stopped by max_new_tokens: tasks may treat it as degenerate
        if completion_ids is not None:
            columns["completion_ids"] = completion_ids
        return combine_rewards(self.reward_funcs, self.reward_weights, [r["prompt"] for r in rows], completions,
                               **columns)

    def evaluate(self, model, tokenizer, rows: list[dict], *, max_new_tokens: int, batch_size: int = 256,
                 generate=None) -> dict:
        """Held-out metrics, each named eval_*: here the weighted reward of greedy completions (eval_reward) and
        each reward function's mean, over the completions it scored (None: not scored; a metric of no scored
        completion is None). The means of
        evaluate_sums. generate: fastrft.rollout.generate or a stand-in with its signature."""
        return {name: total / count if count else None   # None: no completion was scored
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
        rewards, per_func = self.score(rows, samples.texts, samples.truncated, samples.completion_ids)
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


# The embedded tasks, imported on first use (the code task's sandbox and the dialogue task's reward model are not
# every run's business).
TASKS = {"demo": "fastrft.tasks.demo:demo_task", "demo_proxy": "fastrft.tasks.demo:demo_proxy_task",
         "code": "fastrft.tasks.code:code_task", "dialogue": "fastrft.tasks.dialogue:dialogue_task"}


def load_task(spec: str, **options) -> Task:
    """A registered task by name, or ``"package.module:function"`` (a callable returning a Task) called with
    ``options`` (fastrft train's extra.NAME=value): an option the function does not take, one it needs and was not
    given, or one of the wrong type (by the function's annotations) is a ValueError that names it."""
    if spec not in TASKS and ":" not in spec:
        raise ValueError(f"unknown task {spec!r}: known tasks are {sorted(TASKS)}, or pass 'package.module:function' "
                         f"or 'path/to/file.py:function'")
    module_name, _, func_name = TASKS.get(spec, spec).rpartition(":")
    try:
        module = _import_task_file(module_name) if module_name.endswith(".py") else _import_task_module(module_name)
    except ImportError as e:
        raise ValueError(f"task {spec!r}: cannot import module {module_name!r} ({e})") from e
    factory = getattr(module, func_name, None)
    if not callable(factory):
        local = Path.cwd() / f"{module_name}.py"
        shadowed = (f" (the module imported is {module.__file__}; for {local} give task={local.name}:{func_name})"
                    if local.is_file() and Path(getattr(module, "__file__", None) or local) != local else "")
        raise ValueError(f"task {spec!r}: module {module_name!r} has no callable {func_name!r}{shadowed}")
    _check_options(spec, factory, options)
    task = factory(**options)
    if not isinstance(task, Task):
        raise ValueError(f"task {spec!r} returned {type(task).__name__}, not a fastrft.tasks.Task")
    task.check(f"task {spec!r}")
    return task


def _import_task_file(path: str):
    """The module of a task file (path/to/file.py, inside packages or not): imported by its dotted name from the
    folder above its outermost package, which goes on sys.path (its own imports of its neighbours work)."""
    file = Path(path).expanduser().absolute()
    if not file.is_file():
        raise ImportError(f"no such file {file}")
    root, parts = file.parent, [file.stem]
    while (root / "__init__.py").is_file():
        root, parts = root.parent, [root.name, *parts]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    name = ".".join(parts)
    loaded = sys.modules.get(name)
    if len(parts) > 1 or loaded is None or Path(getattr(loaded, "__file__", None) or "") == file:
        module = importlib.import_module(name)
        if Path(getattr(module, "__file__", None) or file).resolve() != file.resolve():
            raise ImportError(f"the module {name} is imported from {module.__file__} already, not from {file}")
        return module
    # A file named as a module already imported (json.py): this file's module, beside it.
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def portable_task_spec(spec: str) -> str:
    """The spec as a run folder keeps it (config.yaml): a module found in the working directory (the `fastrft`
    command looks there) as its file's absolute path, so that the run resumes and exports from anywhere."""
    module_name, _, func_name = spec.rpartition(":")
    if spec in TASKS or not module_name or module_name.endswith(".py"):
        return str(Path(module_name).expanduser().absolute()) + ":" + func_name if module_name.endswith(".py") \
            else spec
    base = Path.cwd().joinpath(*module_name.split("."))
    file = next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)
    return f"{file}:{func_name}" if file and not _importable_elsewhere(module_name.partition(".")[0]) else spec


def _importable_elsewhere(top: str) -> bool:
    """Whether the top-level module is found without the working directory on sys.path (installed, or on the
    path): then that one is imported, not the working directory's (_import_task_module)."""
    cwd = Path.cwd().resolve()
    paths = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != cwd]
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        try:
            found = find and (find(top, paths) if finder is importlib.machinery.PathFinder else find(top, None))
        except (ImportError, ValueError, TypeError):
            continue
        if found:
            return True
    return False


def _import_task_module(name: str):
    """The module, found on sys.path or else in the working directory (where `python -m fastrft` would find it,
    and the `fastrft` command does not look)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        top = name.partition(".")[0]
        if e.name != top or not (Path.cwd() / top).exists() and not (Path.cwd() / f"{top}.py").exists():
            raise
    sys.path.insert(0, str(Path.cwd()))
    return importlib.import_module(name)


def _check_options(spec: str, factory, options: dict) -> None:
    """The task options against the factory's signature and its annotations of plain types (int, float, str, bool,
    or X | None); other annotations are the factory's own business."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):   # a builtin or C callable: nothing to read
        return
    parameters = signature.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    named = [name for name, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [name for name in options if name not in named and not takes_any]
    if unknown:
        raise ConfigError(f"extra.{unknown[0]}",
                          f"task {spec!r} takes no option {', '.join(f'extra.{n}' for n in unknown)}; its options: "
                          f"{', '.join(f'extra.{n}' for n in named) or 'none'}")
    missing = [name for name in named if parameters[name].default is inspect.Parameter.empty and name not in options]
    if missing:
        raise ValueError(f"task {spec!r} needs {', '.join(f'extra.{n}=...' for n in missing)}")
    try:
        hints = typing.get_type_hints(factory)
    except Exception:   # annotations that do not resolve: nothing to check against
        return
    for name, value in options.items():
        allowed = _plain_types(hints.get(name))
        if allowed is not None and not _is_one_of(value, allowed):
            raise ConfigError(f"extra.{name}",
                              f"task {spec!r}: extra.{name} must be {_type_names(allowed)}, got {value!r}")


def _plain_types(annotation) -> tuple[type, ...] | None:
    """The classes an option annotated so may be (an int stands for a float), or None where the annotation is not
    made of int, float, str, bool and None."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    if not options or not all(t in (int, float, str, bool, type(None)) for t in options):
        return None
    return options + ((int,) if float in options else ())


def _is_one_of(value, allowed: tuple[type, ...]) -> bool:
    """isinstance, but a bool is no number."""
    return isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))


def _type_names(allowed: tuple[type, ...]) -> str:
    return " or ".join(dict.fromkeys("None" if t is type(None) else t.__name__ for t in allowed))


def check_columns(rows: list[dict], source: str, required: tuple[str, ...] = (),
                  types: dict[str, tuple[type, ...]] | None = None) -> None:
    """A ValueError naming the first row (source: where the rows come from) that load_rows would refuse: no prompt,
    a `required` column missing, a column not of its `types`, or one fastrft passes the reward functions itself
    (prompts, completions, truncated, completion_ids), whose value would be lost or clash with fastrft's."""
    for i, row in enumerate(rows, start=1):
        _check_row(row, f"{source}, row {i}", required, types or {})


def _check_reserved(row: dict, where: str) -> None:
    reserved = sorted(_GIVEN_COLUMNS & set(row))
    if reserved:
        raise ValueError(f"{where}: column {reserved[0]!r} is reserved (fastrft passes the reward functions their "
                         f"own {', '.join(map(repr, sorted(_GIVEN_COLUMNS)))}): rename it")


def _is_prompt(prompt) -> bool:
    """A string, or chat messages (formatted with the tokenizer's chat template)."""
    return isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt))


def _check_row(row, where: str, required: tuple[str, ...], types: dict[str, tuple[type, ...]]) -> dict:
    """row, or a ValueError that names where it is (file:line)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if not _is_prompt(row.get("prompt")):
        raise ValueError(f"{where}: row has no 'prompt' field that is a string or a list of chat messages "
                         f"({{\"role\": str, \"content\": str}}) (keys: {sorted(row)})")
    _check_reserved(row, where)
    missing = [column for column in required if row.get(column) is None]
    if missing:
        raise ValueError(f"{where}: row lacks {', '.join(map(repr, missing))}, which the task's reward "
                         f"functions need (keys: {sorted(row)})")
    for column, allowed in types.items():
        if column in row and not _is_one_of(row[column], allowed):
            raise ValueError(f"{where}: {column!r} must be {_type_names(allowed)} (the task's reward functions "
                             f"read it so), got {row[column]!r}")
    return row


def load_rows(path, required: tuple[str, ...] = (), types: dict[str, tuple[type, ...]] | None = None,
              key: str = "dataset", places: list[str] | None = None) -> list[dict]:
    """Rows of a local ``.jsonl`` (one JSON object per line, blank lines skipped) or ``.parquet`` file.

    Every row needs a "prompt" (a string, or chat messages: [{"role": ..., "content": ...}, ...]) and each
    `required` column (a task's ``required_columns()``), each column of `types` (a task's ``column_types()``) a value
    of those types; its other fields become reward-function columns too. Errors name the file and the (1-based) line,
    or row for Parquet; a file without rows is an error. key: the setting that named the file, in errors about it.
    places: a list to fill with each row's place ("data.jsonl:12"), for the caller's own errors about a row.
    """
    path = Path(path)
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{key} {path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")
    if not path.is_file():
        raise ValueError(f"{key} {path} does not exist")
    if path.suffix == ".jsonl":
        placed = [(f"{path}:{line_number}", row) for line_number, row in read_jsonl(path)]
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading .parquet rows needs pyarrow: pip install pyarrow") from e
        placed = [(f"{path}:{i}", row) for i, row in enumerate(pq.read_table(path).to_pylist(), start=1)]
    rows = [_check_row(row, where, required, types or {}) for where, row in placed]
    if not rows:
        raise ValueError(f"{key} {path} holds no rows")
    if places is not None:
        places[:] = [where for where, _ in placed]
    return rows
