"""The code task: code extraction, degenerate outputs, scoring through the sandbox, pass@k, the embedded problems."""
import itertools
import json

import pytest

from fastrft import sandbox
from fastrft.rewards import combine_rewards
from fastrft.tasks import Task, load_task
from fastrft.tasks import code

needs_sandbox = pytest.mark.skipif(not sandbox.sandbox_available(),
                                   reason="bubblewrap missing or not working: apt-get install bubblewrap")

SUM_TESTS = json.dumps({"inputs": ["1 2\n", "5 5\n", "0 7\n"], "outputs": ["3\n", "10\n", "7\n"], "fn_name": None})
CALL_TESTS = json.dumps({"inputs": [[[1, 2]], [[]], [[5]]], "outputs": [3, 0, [5]], "fn_name": "total"})


def fenced(body: str, tag: str = "python") -> str:
    return f"Here is my answer.\n```{tag}\n{body}\n```\nIt reads the input."


# --- extraction and degenerate outputs ------------------------------------------------------------------------

def test_extract_code():
    assert code.extract_code(fenced("print(1)")) == ("print(1)", False)
    two = "```\nnot this\n```\ntext\n```python\nprint(2)\n```\n```text\nsample output\n```"
    assert code.extract_code(two) == ("print(2)", False)  # the last python block wins over later non-python ones
    assert code.extract_code("```\nprint(3)\n```") == ("print(3)", False)
    assert code.extract_code("x = 1\nprint(x)\n") == ("x = 1\nprint(x)", False)
    assert code.extract_code("Sure:\n```python\nfor i in range(3):\n    pri") == ("for i in range(3):\n    pri", True)


@pytest.mark.parametrize("completion, truncated, kind", [
    ("", False, "empty"),
    ("   \n\t", False, "empty"),
    ("```python\n\n```", False, "empty"),
    (fenced("print(1)"), True, "truncated"),
    ("```python\nprint(1)\nprint(", False, "truncated"),
    ("print('a')\n" + "the same words again " * 40, False, "looping"),
    (fenced("def f(:\n    return"), False, "unparseable"),
    ("I think the answer is to add the two numbers.", False, "unparseable"),
    (fenced("print(sum(map(int, input().split())))"), False, None),
])
def test_degenerate_kind(completion, truncated, kind):
    assert code.degenerate_kind(completion, truncated) == kind


def test_outputs_match():
    assert code.outputs_match("3\n", "3")
    assert code.outputs_match("1 2  \n3\n\n", "1 2\n3\n")
    assert code.outputs_match("0.3333333\n", "0.33333333333")
    assert code.outputs_match("1 2 3", "1\n2\n3\n")  # token-equal
    assert not code.outputs_match("3\n", "4\n")
    assert not code.outputs_match("YES", "yes")
    assert not code.outputs_match("1 2", "1 2 3")
    assert not code.outputs_match("nan", "1.0")


def test_parse_refinement():
    assert code.parse_refinement("```python\nprint(1)\n```\nDone.") == "```python\nprint(1)\n```"
    assert code.parse_refinement("print(1)") is None          # no fence: not a refinement in the asked format
    assert code.parse_refinement("```python\nprint(1") is None  # cut off
    assert code.parse_refinement("```python\ndef (\n```") is None


def test_pass_at_k_matches_enumeration():
    for n, c, k in [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 6, 2), (7, 3, 7), (4, 1, 4)]:
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        expected = sum(any(s) for s in subsets) / len(subsets)
        assert code.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        code.pass_at_k(3, 1, 4)


def test_bad_problem_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "input_output": {"inputs": ["1"], "outputs": ["1"]}}) + "\n"
                    + json.dumps({"question": "q", "input_output": {"inputs": ["1"], "outputs": []}}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*same length"):
        code.load_problems(path)
    good = {"question": "q", "input_output": {"inputs": ["1"], "outputs": ["1"]}}
    for bad, message in (({"fn_name": 5}, "fn_name must be a string naming a Python function, got 5"),
                         ({"fn_name": "not a name"}, "fn_name must be a string naming"),
                         ({"input_output": {"inputs": [[1]], "outputs": [1], "fn_name": ["f"]}},
                          "input_output's fn_name must be a string"),
                         ({"starter_code": 3}, "starter_code must be a string"),
                         ({"input_output": "[1, 2]"}, "input_output must be an object with 'inputs' and 'outputs' "
                                                      r"\(or a JSON string of one\), got list"),
                         ({"input_output": "{"}, "input_output is not valid JSON"),
                         ({"input_output": None}, "input_output must be an object")):
        path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **bad}) + "\n")
        with pytest.raises(ValueError, match=r"bad.jsonl:2: " + message):
            code.load_problems(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: code problem has no 'input_output' \(its tests"):
        code.load_problems(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no problems"):
        code.load_problems(path)


# --- scoring through the sandbox ------------------------------------------------------------------------------

@needs_sandbox
def test_scores_stdin_and_call_based_programs():
    scorer = code.CodeScorer(timeout_s=2.0, memory_mb=256)
    completions = [
        fenced("a, b = map(int, input().split())\nprint(a + b)"),       # all pass
        fenced("a, b = map(int, input().split())\nprint(a + b if a else 0)"),  # fails the third test
        fenced("import time\ntime.sleep(10)"),                            # times out
        fenced("raise SystemExit(1)"),                                    # runtime error
        "",                                                               # degenerate: not run
    ]
    scores = scorer.score(completions, [SUM_TESTS] * len(completions))
    assert [s.pass_rate for s in scores] == pytest.approx([1.0, 2 / 3, 0.0, 0.0, 0.0])
    assert [s.all_pass for s in scores] == [True, False, False, False, False]
    assert scores[2].statuses == ["timeout"] * 3 and scores[3].statuses == ["runtime_error"] * 3
    assert scores[4].degenerate == "empty" and scores[4].statuses == []

    call_based = [
        fenced("def total(xs):\n    return sum(xs)"),
        fenced("class Solution:\n    def total(self, xs):\n        print('noise')\n        return sum(xs)"),
        fenced("def total(xs):\n    return len(xs)"),                   # right on [] only (and [5] -> 1)
        fenced("def other(xs):\n    return 0"),                         # no such function
    ]
    scores = scorer.score(call_based, [CALL_TESTS] * len(call_based))
    assert [s.pass_rate for s in scores] == pytest.approx([1.0, 1.0, 1 / 3, 0.0])


@needs_sandbox
def test_reward_funcs_follow_trl_convention_and_run_each_program_once(monkeypatch):
    task = code.code_task(n_eval=3, timeout_s=2.0, memory_mb=256, max_new_tokens=64)
    assert isinstance(task, Task) and task.name == "code" and len(task.eval_rows) == 3
    calls = []
    real_run_many = sandbox.run_many
    monkeypatch.setattr(sandbox, "run_many", lambda jobs, **kw: calls.append(len(jobs)) or real_run_many(jobs, **kw))
    completions = [fenced("a, b = map(int, input().split())\nprint(a + b)"), "", "```python\nprint(",
                   fenced("a, b = map(int, input().split())\nprint(a * b + 1)")]  # right on "1 2" only
    columns = {"tests": [SUM_TESTS] * 4, "problem_id": ["p"] * 4, "completion_ids": [[1] * 5, [2], [3] * 64, [4]]}
    rewards, per_func = combine_rewards(task.reward_funcs, task.reward_weights, ["p"] * 4, completions, **columns)
    assert rewards == pytest.approx([1.0, -0.5, -0.5, 1 / 3])
    assert per_func["all_pass"] == [1.0, 0.0, 0.0, 0.0]
    assert per_func["degenerate_empty"] == [0.0, 1.0, 0.0, 0.0]
    assert per_func["degenerate_truncated"] == [0.0, 0.0, 1.0, 0.0]
    assert calls == [6, 0, 0, 0, 0, 0]  # two well-formed programs x three tests, run once for six functions
    # the trainer's own `truncated` column takes precedence over lengths
    flags = task.reward_funcs[0](["p"], [completions[0]], tests=[SUM_TESTS], truncated=[True])
    assert flags == [-0.5]


@needs_sandbox
def test_evaluate_pass_at_k():
    scorer = code.CodeScorer(timeout_s=2.0, memory_mb=256)
    good = fenced("a, b = map(int, input().split())\nprint(a + b)")
    bad = fenced("print(0)")
    rows = [{"tests": SUM_TESTS}, {"tests": SUM_TESTS}]
    metrics = code.evaluate_pass_at_k(scorer, rows, [[good, bad, bad, bad], [bad, bad, "", bad]], ks=(1, 2))
    assert metrics["pass@1"] == pytest.approx((0.25 + 0.0) / 2)
    assert metrics["pass@2"] == pytest.approx((code.pass_at_k(4, 1, 2) + 0.0) / 2)
    assert metrics["degenerate_empty"] == pytest.approx(1 / 8)


@needs_sandbox
def test_embedded_problems_reference_solutions_pass():
    problems = code.load_problems(code.DEFAULT_PROBLEMS)
    assert len(problems) >= 30 and len({p["question"] for p in problems}) == len(problems)
    assert sum(bool(code.parse_tests(p["input_output"])["fn_name"]) for p in problems) >= 5
    scorer = code.CodeScorer(timeout_s=5.0, memory_mb=512)
    rows = [code.problem_to_row(p) for p in problems]
    scores = scorer.score([fenced(p["solutions"][0]) for p in problems], [r["tests"] for r in rows])
    failing = [p["problem_id"] for p, s in zip(problems, scores) if not s.all_pass]
    assert failing == []
    # and the tests discriminate: a program that prints nothing passes none of them
    empty_output = scorer.score([fenced("pass")] * len(rows), [r["tests"] for r in rows])
    assert all(s.pass_rate == 0.0 for s in empty_output)


def test_task_rows_and_refine_template():
    task = code.code_task(n_eval=6, seed=1)
    rows = task.train_rows + task.eval_rows
    assert len(rows) >= 30 and not {r["prompt"] for r in task.train_rows} & {r["prompt"] for r in task.eval_rows}
    assert all("```python" in r["prompt"] and json.loads(r["tests"])["inputs"] for r in rows)
    call_row = next(r for r in rows if json.loads(r["tests"])["fn_name"])
    assert "Starter code" in call_row["prompt"] and "Implement the function" in call_row["prompt"]
    text = task.refine_template.format(prompt=rows[0]["prompt"], response="```python\nprint(1)\n```")
    assert text.startswith(rows[0]["prompt"]) and "corrected program" in text
    assert task.reward_weights[0] == 1.0 and sum(task.reward_weights) == 1.0


@needs_sandbox
def test_task_evaluation_reports_pass_at_k():
    """CodeTask.evaluate: the greedy scores and eval_pass@k from eval_samples sampled completions per problem (a
    stand-in generate returns known programs: the right one for the first sample of the first problem only)."""
    from fastrft.rollout import Samples

    task = code.code_task(n_eval=2, eval_samples=4)
    problems = {str(p["problem_id"]): p for p in code.load_problems(code.DEFAULT_PROBLEMS)}
    solution = fenced(problems[task.eval_rows[0]["problem_id"]]["solutions"][0])
    calls = []

    class Tokenizer:
        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[len(calls), len(text)] for text in texts]}

    def generate(model, tokenizer, prompt_ids, *, max_new_tokens, num_samples=1, greedy=False, **kwargs):
        calls.append((num_samples, greedy))
        texts = [solution if i == 0 else fenced("print(0)") for i in range(len(prompt_ids) * num_samples)]
        return Samples(prompt_ids, [[1]] * len(texts), texts, [False] * len(texts))

    metrics = task.evaluate(None, Tokenizer(), task.eval_rows, max_new_tokens=64, generate=generate)
    assert calls == [(1, True), (4, False)]
    assert metrics["eval_pass@1"] == pytest.approx((1 / 4 + 0) / 2)
    assert "eval_pass@5" not in metrics   # k larger than the samples drawn
    assert metrics["eval_all_pass"] == pytest.approx(0.5) and "eval_reward" in metrics
    with pytest.raises(ValueError, match="eval_samples must be an int >= 1"):
        code.code_task(eval_samples=0)


@pytest.mark.parametrize("option, message", [
    (dict(timeout_s=-1), "code_task: timeout_s must be a finite number > 0, got -1"),
    (dict(memory_mb=0), "code_task: memory_mb must be an int >= 1, got 0"),
    (dict(workers=0), "code_task: workers must be an int >= 1, got 0"),
    (dict(max_tests=-1), "code_task: max_tests must be an int >= 1, got -1"),
    (dict(max_tests=0), "code_task: max_tests must be an int >= 1, got 0"),
])
def test_code_task_options_are_checked_before_any_run(option, message):
    """Limits that would fail in the sandbox mid-run, or silently skip a problem's tests, fail at the task's start."""
    with pytest.raises(ValueError, match=message):
        code.code_task(**option)


def test_a_code_tasks_degenerate_completions_include_what_does_not_compile():
    """The step's degenerate_frac counts what the task calls degenerate: here unparseable programs and unclosed
    fences too, beyond the generic empty, truncated and looping."""
    task = code.code_task()
    assert task.degenerate("```python\ndef f(:\n```", False) == "unparseable"
    assert task.degenerate("```python\nprint(1)\n", False) == "truncated"
    assert task.degenerate("```python\nprint(1)\n```", False) is None
    assert load_task("demo").degenerate("", False) == "empty"
