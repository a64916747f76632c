"""The `code` task: APPS-format programming problems, scored by running the completion's code in the sandbox.

    task = code_task()                           the embedded set: 33 small problems written for fastrft
    task = code_task("apps_train.jsonl")         any APPS-format JSONL

A problem row (APPS format) holds ``question``, ``input_output`` (a dict or its JSON string) with ``inputs`` and
``outputs``, and an optional ``fn_name``: without it the program reads each input on stdin and its stdout is
compared with the output; with it, ``fn_name(*inputs[i])`` (or ``Solution().fn_name``) must return ``outputs[i]``
(or ``[outputs[i]]``, APPS's wrapping). ``starter_code`` is shown in the prompt.

The completion's code is the last fenced ```python block (or the last fenced block, or the whole text when it has
no fence), run once per test through ``fastrft.sandbox`` (all of a batch's tests at once, from a thread pool).

Rewards (TRL convention; each called with the task's columns ``tests``, ``fn_name``, and optionally a per-sample
``truncated`` list or TRL's ``completion_ids``):

    pass_rate     weight 1: the fraction of tests passed; ``degenerate_reward`` for a degenerate completion
    all_pass      weight 0: 1.0 when every test passes (the strict metric)
    degenerate_*  weight 0: 1.0 when the completion is degenerate of that kind: empty, truncated (the length limit
                  or an unclosed fence), looping (repeated n-grams) or unparseable (the code does not compile);
                  their means are the rates in the logs

Degenerate completions are not run. ``pass_at_k`` gives the unbiased pass@k estimate over several samples per
problem (Chen et al., 2021), from the all-pass results; the task's evaluation (``CodeTask.evaluate``) reports it as
``eval_pass@k`` beside the greedy scores.
"""
from __future__ import annotations

import ast
import json
import math
import random
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from fastrft import sandbox
from fastrft.jsonl import read_jsonl
from fastrft.rewards import completion_text, is_degenerate, truncated_flags
from fastrft.tasks import Task

DEFAULT_PROBLEMS = Path(__file__).parent / "data" / "code_problems.jsonl"
DEGENERATE_KINDS = ("empty", "truncated", "looping", "unparseable")

PROMPT_FORMAT = ("Solve the following programming problem in Python 3. {io_rule} Answer with one ```python code "
                 "block.\n\n{question}\n{starter}")
STDIN_RULE = "Read the input from standard input and print the answer to standard output."
CALL_RULE = "Implement the function `{fn_name}` (as a plain function or a method of class Solution); do not read input."
REFINE_TEMPLATE = ("{prompt}\n\nA candidate answer:\n{response}\n\nWrite a corrected program that solves the problem, "
                   "in one ```python code block.\n")

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "python3", "py", "py3"}


# ---------------------------------------------------------------------------------------------------------------
# Code extraction and degenerate outputs


def extract_code(completion: str) -> tuple[str, bool]:
    """(code, fence_left_open): the last ```python block, else the last fenced block, else the whole text; a fence
    opened and never closed (the usual sign of a completion cut at the length limit) yields the text after it."""
    blocks = _FENCE.findall(completion)
    python_blocks = [body for tag, body in blocks if tag.lower() in _PYTHON_TAGS]
    if python_blocks or blocks:
        return (python_blocks or [body for _, body in blocks])[-1].strip("\n"), False
    if "```" in completion:
        after = completion.rsplit("```", 1)[1]
        return after.split("\n", 1)[1] if "\n" in after else "", True
    return completion.strip("\n"), False


def parse_refinement(text: str) -> str | None:
    """The refiner's corrected program as a fenced block, or None when its continuation holds no closed fence with
    code that compiles."""
    code, left_open = extract_code(text)
    if left_open or not code.strip() or "```" not in text or not _compiles(code):
        return None
    return f"```python\n{code}\n```"


def _compiles(code: str) -> bool:
    try:  # parse only: nothing runs in the trainer's process
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False
    return True


def degenerate_kind(completion: str, truncated: bool = False) -> str | None:
    """"empty" | "truncated" | "looping" | "unparseable" | None, checked in that order."""
    kind = is_degenerate(completion, truncated=truncated)
    if kind is not None:
        return kind
    code, left_open = extract_code(completion)
    if left_open:
        return "truncated"
    if not code.strip():
        return "empty"
    if not _compiles(code):
        return "unparseable"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Running tests


def _as_text(value) -> str:
    return "\n".join(map(str, value)) + "\n" if isinstance(value, list) else str(value)


def outputs_match(actual: str, expected: str, float_tol: float = 1e-6) -> bool:
    """Lenient comparison: equal after stripping trailing whitespace of each line and trailing blank lines; else
    equal as whitespace-separated tokens, numbers within ``float_tol`` (absolute or relative)."""
    def lines(text):
        return [line.rstrip() for line in text.strip("\n").splitlines()]

    if lines(actual) == lines(expected):
        return True
    got, want = actual.split(), expected.split()
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if g == w:
            continue
        try:
            if not math.isclose(float(g), float(w), rel_tol=float_tol, abs_tol=float_tol):
                return False
        except ValueError:
            return False
    return True


def _call_harness(code: str, fn_name: str, sentinel: str) -> str:
    """The program for one call-based test: the completion's code, then a call of ``fn_name`` with the arguments
    read as JSON from stdin, its result printed as JSON after ``sentinel``."""
    return f"""{code}


def _fastrft_call():
    import json, sys
    args = json.loads(sys.stdin.read())
    fn = globals().get({fn_name!r})
    if fn is None:
        fn = getattr(globals()["Solution"](), {fn_name!r})
    result = fn(*args)
    sys.stdout.write("\\n" + {sentinel!r} + json.dumps(result) + "\\n")


_fastrft_call()
"""


def _call_result_matches(stdout: str, sentinel: str, expected) -> bool:
    if sentinel not in stdout:
        return False
    try:
        result = json.loads(stdout.rsplit(sentinel, 1)[1].strip())
    except ValueError:
        return False
    return result == expected or [result] == expected


def parse_tests(input_output) -> dict:
    """APPS ``input_output`` (dict or JSON string) -> {"inputs": [...], "outputs": [...], "fn_name": str | None}."""
    if isinstance(input_output, str):
        try:
            tests = json.loads(input_output)
        except ValueError as e:
            raise ValueError(f"input_output is not valid JSON ({e})") from None
    else:
        tests = input_output
    if not isinstance(tests, dict):
        raise ValueError(f"input_output must be an object with 'inputs' and 'outputs' (or a JSON string of one), got "
                         f"{type(tests).__name__}")
    inputs, outputs = tests.get("inputs"), tests.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs) or not inputs:
        raise ValueError("input_output needs non-empty 'inputs' and 'outputs' lists of the same length")
    return {"inputs": inputs, "outputs": outputs, "fn_name": tests.get("fn_name") or None}


@dataclass
class CodeScore:
    pass_rate: float        # fraction of tests passed (0.0 for degenerate completions)
    all_pass: bool
    degenerate: str | None  # one of DEGENERATE_KINDS or None
    statuses: list[str]     # sandbox status per test ([] when not run)


class CodeScorer:
    """Scores completions against their tests through the sandbox, remembering recent results so the task's
    several reward functions run each program once."""

    def __init__(self, *, timeout_s: float = 4.0, memory_mb: int = 1024, workers: int = 8,
                 max_tests: int | None = None, unsafe: bool = False, cache_size: int = 4096):
        self.limits = {"timeout_s": timeout_s, "memory_mb": memory_mb, "unsafe": unsafe}
        self.workers, self.max_tests, self.cache_size = workers, max_tests, cache_size
        self._cache: OrderedDict[tuple, CodeScore] = OrderedDict()

    def score(self, completions: list[str], tests: list, truncated: list[bool] | None = None) -> list[CodeScore]:
        truncated = truncated or [False] * len(completions)
        keys = [(c, t if isinstance(t, str) else json.dumps(t, sort_keys=True), bool(tr))
                for c, t, tr in zip(completions, tests, truncated)]
        todo = {}  # key -> (code, parsed tests, degenerate kind)
        for key in keys:
            if key in self._cache or key in todo:
                continue
            completion, tests_json, is_truncated = key
            todo[key] = (extract_code(completion)[0], parse_tests(tests_json),
                         degenerate_kind(completion, is_truncated))
        jobs, owners = [], []  # one sandbox run per (completion, test)
        sentinel = f"@@fastrft-result-{uuid.uuid4().hex}@@"
        for key, (code, spec, kind) in todo.items():
            if kind is not None:
                continue
            cases = list(zip(spec["inputs"], spec["outputs"]))[:self.max_tests]
            for test_input, expected in cases:
                if spec["fn_name"]:
                    jobs.append((_call_harness(code, spec["fn_name"], sentinel), json.dumps(test_input)))
                else:
                    jobs.append((code, _as_text(test_input)))
                owners.append((key, expected, spec["fn_name"]))
        results = sandbox.run_many(jobs, workers=self.workers, **self.limits)
        outcomes: dict[tuple, list[tuple[bool, str]]] = {key: [] for key in todo}
        for (key, expected, fn_name), result in zip(owners, results):
            if result.status != "ok":
                passed = False
            elif fn_name:
                passed = _call_result_matches(result.stdout, sentinel, expected)
            else:
                passed = outputs_match(result.stdout, _as_text(expected))
            outcomes[key].append((passed, result.status))
        for key, (_, _, kind) in todo.items():
            runs = outcomes[key]
            passed = sum(p for p, _ in runs)
            rate = passed / len(runs) if runs else 0.0
            self._cache[key] = CodeScore(rate, bool(runs) and passed == len(runs), kind, [s for _, s in runs])
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return [self._cache[key] for key in keys]


def make_reward_funcs(scorer: CodeScorer, *, degenerate_reward: float = -0.5, max_new_tokens: int | None = None):
    """[pass_rate, all_pass, degenerate_empty, degenerate_truncated, degenerate_looping, degenerate_unparseable]."""

    def scores(completions, tests, truncated, completion_ids):
        flags = truncated_flags(len(completions), truncated, completion_ids, max_new_tokens)
        return scorer.score([completion_text(c) for c in completions], list(tests), flags)

    def pass_rate(prompts, completions, tests, truncated=None, completion_ids=None, **columns):
        return [degenerate_reward if s.degenerate else s.pass_rate
                for s in scores(completions, tests, truncated, completion_ids)]

    def all_pass(prompts, completions, tests, truncated=None, completion_ids=None, **columns):
        return [float(s.all_pass) for s in scores(completions, tests, truncated, completion_ids)]

    def indicator(kind):
        def degenerate(prompts, completions, tests, truncated=None, completion_ids=None, **columns):
            return [float(s.degenerate == kind) for s in scores(completions, tests, truncated, completion_ids)]

        degenerate.__name__ = f"degenerate_{kind}"
        return degenerate

    return [pass_rate, all_pass] + [indicator(kind) for kind in DEGENERATE_KINDS]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and k >= 1 (n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} is larger than the number of samples n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def evaluate_pass_at_k(scorer: CodeScorer, rows: list[dict], samples: list[list[str]],
                       ks: tuple[int, ...] = (1, 5)) -> dict:
    """Mean pass@k over problems (``samples[i]``: the completions for ``rows[i]``), with the mean pass rate and
    the degenerate rates over all samples."""
    flat = [(row["tests"], completion) for row, group in zip(rows, samples) for completion in group]
    scores = scorer.score([c for _, c in flat], [t for t, _ in flat])
    metrics, start = {}, 0
    per_problem = []
    for group in samples:
        group_scores = scores[start:start + len(group)]
        start += len(group)
        per_problem.append((len(group), sum(s.all_pass for s in group_scores)))
    for k in ks:
        usable = [(n, c) for n, c in per_problem if n >= k]
        metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in usable) / max(1, len(usable))
    metrics["pass_rate"] = sum(s.pass_rate for s in scores) / max(1, len(scores))
    for kind in DEGENERATE_KINDS:
        metrics[f"degenerate_{kind}"] = sum(s.degenerate == kind for s in scores) / max(1, len(scores))
    return metrics


@dataclass
class CodeTask(Task):
    """The code task, whose held-out evaluation adds pass@k to the greedy scores: eval_samples completions of each
    held-out problem at eval_temperature, all-pass results, eval_pass@k for each k in pass_ks up to eval_samples."""
    scorer: CodeScorer | None = None
    eval_samples: int = 5
    eval_temperature: float = 0.8
    pass_ks: tuple[int, ...] = field(default=(1, 5))

    def degenerate(self, completion: str, truncated: bool) -> str | None:
        return degenerate_kind(completion, truncated)

    def evaluate_sums(self, model, tokenizer, rows: list[dict], *, max_new_tokens: int, batch_size: int = 256,
                      generate=None) -> dict[str, tuple[float, int]]:
        from fastrft.rollout import encode_prompts
        from fastrft.rollout import generate as default_generate

        sums = super().evaluate_sums(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     generate=generate)
        if not rows:
            return sums
        n = self.eval_samples
        samples = (generate or default_generate)(model, tokenizer,
                                                 encode_prompts(tokenizer, [r["prompt"] for r in rows]),
                                                 max_new_tokens=max_new_tokens, num_samples=n,
                                                 temperature=self.eval_temperature, batch_size=batch_size)
        groups = [samples.texts[i * n:(i + 1) * n] for i in range(len(rows))]
        ks = tuple(k for k in self.pass_ks if k <= n)
        pass_at = evaluate_pass_at_k(self.scorer, rows, groups, ks=ks)
        # Every problem has n >= k samples, so each pass@k is a mean over all the rows.
        sums.update({f"eval_pass@{k}": (pass_at[f"pass@{k}"] * len(rows), len(rows)) for k in ks})
        return sums


# ---------------------------------------------------------------------------------------------------------------
# Rows and the task


def problem_to_row(problem: dict) -> dict:
    """An APPS problem -> a task row: the prompt and the ``tests`` column (a JSON string, one type for every row)."""
    if not isinstance(problem.get("question"), str):
        raise ValueError(f"code problem has no string 'question' (keys: {sorted(problem)})")
    if "input_output" not in problem:
        raise ValueError(f"code problem has no 'input_output' (its tests; keys: {sorted(problem)})")
    spec = parse_tests(problem["input_output"])
    for key, value in (("fn_name", problem.get("fn_name")), ("input_output's fn_name", spec["fn_name"])):
        if value is not None and not (isinstance(value, str) and value.isidentifier()):
            raise ValueError(f"{key} must be a string naming a Python function, got {value!r}")
    if not isinstance(problem.get("starter_code") or "", str):
        raise ValueError(f"starter_code must be a string, got {type(problem['starter_code']).__name__}")
    fn_name = problem.get("fn_name") or spec["fn_name"]
    spec["fn_name"] = fn_name
    io_rule = CALL_RULE.format(fn_name=fn_name) if fn_name else STDIN_RULE
    starter = problem.get("starter_code") or ""
    starter = f"\nStarter code:\n```python\n{starter.rstrip()}\n```\n" if starter.strip() else ""
    return {"prompt": PROMPT_FORMAT.format(io_rule=io_rule, question=problem["question"].strip(), starter=starter),
            "tests": json.dumps(spec), "problem_id": str(problem.get("problem_id", ""))}


def load_problems(path) -> list[dict]:
    """APPS-format problems from a JSONL file; errors name the file and line."""
    path = Path(path)
    problems = []
    for line_number, problem in read_jsonl(path):
        try:
            problem_to_row(problem)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}:{line_number}: {e}") from e
        problems.append(problem)
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems


def code_task(dataset: str | None = None, *, n_eval: int = 6, seed: int = 0, timeout_s: float = 4.0,
              memory_mb: int = 1024, workers: int = 8, max_tests: int | None = None,
              degenerate_reward: float = -0.5, max_new_tokens: int = 512, unsafe: bool = False,
              eval_samples: int = 5, eval_temperature: float = 0.8) -> CodeTask:
    """The code task over ``dataset`` (an APPS-format JSONL; default: the embedded problems), ``n_eval`` problems
    held out (a seeded shuffle). ``timeout_s``/``memory_mb`` are per-test sandbox limits; ``max_tests`` caps the tests
    run per problem; ``degenerate_reward`` is the pass_rate reward of an empty, truncated, looping or unparseable
    completion (below a wrong but well-formed program's 0.0). Evaluation adds pass@1 and pass@5 from
    ``eval_samples`` completions per held-out problem at ``eval_temperature``."""
    problems = load_problems(dataset or DEFAULT_PROBLEMS)
    if not 0 <= n_eval < len(problems):
        raise ValueError(f"code_task: n_eval={n_eval} must leave training problems out of {len(problems)}")
    for name, value in (("eval_samples", eval_samples), ("memory_mb", memory_mb), ("workers", workers)) + (
            (("max_tests", max_tests),) if max_tests is not None else ()):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"code_task: {name} must be an int >= 1, got {value!r}")
    for name, value in (("eval_temperature", eval_temperature), ("timeout_s", timeout_s)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"code_task: {name} must be a finite number > 0, got {value!r}")
    if timeout_s > sandbox.MAX_TIMEOUT_S:
        raise ValueError(f"code_task: timeout_s must be at most {sandbox.MAX_TIMEOUT_S:g} (the sandbox's), got "
                         f"{timeout_s!r}")
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    rows = [problem_to_row(problems[i]) for i in order]
    scorer = CodeScorer(timeout_s=timeout_s, memory_mb=memory_mb, workers=workers, max_tests=max_tests,
                        unsafe=unsafe)
    reward_funcs = make_reward_funcs(scorer, degenerate_reward=degenerate_reward, max_new_tokens=max_new_tokens)
    return CodeTask(name="code", train_rows=rows[n_eval:], eval_rows=rows[:n_eval], reward_funcs=reward_funcs,
                    reward_weights=[1.0] + [0.0] * (len(reward_funcs) - 1), refine_template=REFINE_TEMPLATE,
                    parse_refinement=parse_refinement, max_new_tokens=max_new_tokens, scorer=scorer,
                    eval_samples=eval_samples, eval_temperature=float(eval_temperature))
