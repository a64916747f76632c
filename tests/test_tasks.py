"""Tasks and rewards: the demo task's tokenizer, rows, rewards and refinement format; load_task / load_rows;
the rule-based reward helpers; and a few steps of reference training saved and loaded back."""
import json
import re
import sys
import time

import pytest
import torch

from fastrft.rewards import combine_rewards, format_reward, is_degenerate, length_penalty, repetition_penalty
from fastrft.tasks import Task, check_columns, load_rows, load_task
from fastrft.tasks import demo

transformers = pytest.importorskip("transformers")


CUSTOM_TASK_MODULE = """
from fastrft.rewards import format_reward
from fastrft.tasks import Task

def make_task(greeting="hi"):
    return Task(name="custom-" + greeting, train_rows=[{"prompt": greeting}], eval_rows=[{"prompt": greeting}],
                reward_funcs=[format_reward(r"[0-9]+")], reward_weights=[1.0], refine_template="{prompt}{response}",
                parse_refinement=str.strip, max_new_tokens=4)

not_callable = 3
"""


@pytest.fixture
def custom_task_module(tmp_path, monkeypatch):
    (tmp_path / "my_custom_task.py").write_text(CUSTOM_TASK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_custom_task"


# --- demo task -------------------------------------------------------------------------------------------------

def test_tokenizer_round_trip(tmp_path):
    tokenizer = demo.make_tokenizer()
    text = demo.REFINE_TEMPLATE.format(prompt="sort 7391=", response="1739")
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1  # one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    tokenizer.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (
        tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert loaded.padding_side == "left"
    batch = loaded(["sort 12=", "sort 1234="], padding=True)["input_ids"]
    assert batch[0][:2] == [loaded.pad_token_id] * 2 and batch[1][0] == loaded.bos_token_id


def test_model_is_tiny_llama():
    tokenizer = demo.make_tokenizer()
    model = demo.make_model(tokenizer, seed=3)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    same = demo.make_model(tokenizer, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))


def test_demo_rows():
    task = load_task("demo", seed=1, n_train=500, n_eval=50)
    assert task.name == "demo" and len(task.train_rows) == 500 and len(task.eval_rows) == 50
    for row in task.train_rows[:50] + task.eval_rows:
        digits = row["prompt"][len("sort "):-1]
        assert row["prompt"] == f"sort {digits}=" and digits.isdigit()
        assert demo.MIN_DIGITS <= len(digits) <= demo.MAX_DIGITS
        assert row["answer"] == "".join(sorted(digits))
    assert not {r["prompt"] for r in task.train_rows} & {r["prompt"] for r in task.eval_rows}
    assert task.max_new_tokens >= demo.MAX_DIGITS + 1  # room for the answer and EOS
    again = load_task("demo", seed=1, n_train=500, n_eval=50)
    assert again.train_rows == task.train_rows and again.eval_rows == task.eval_rows


@pytest.mark.parametrize("completion, expected", [
    ("1379", 1.0),                 # exact
    (" 1379 ", 1.0),               # surrounding whitespace is ignored
    ("1739", 0.5 * 3 / 4),         # one swap: LCS 3 of 4, not exact
    ("137", 0.5 * 3 / 4),          # one digit dropped
    ("13799", 0.5 * 4 / 5),        # one digit too many
    ("", 0.0),                     # empty
    ("13x9", 0.0),                 # non-digit
    ("fix sort", 0.0),             # garbage
])
def test_sort_reward(completion, expected):
    task = load_task("demo", n_train=10, n_eval=10)
    rewards, per_func = combine_rewards(task.reward_funcs, task.reward_weights, ["sort 7391="], [completion],
                                        answer=["1379"])
    assert rewards[0] == pytest.approx(expected)
    assert per_func["exact_match"] == [float(expected == 1.0)]


def test_lcs_against_brute_force():
    from itertools import combinations

    def brute(a, b):
        return max(k for k in range(len(a) + 1) for c in combinations(a, k) if _is_subsequence(c, b))

    def _is_subsequence(c, b):
        it = iter(b)
        return all(x in it for x in c)

    for a, b in [("1379", "1739"), ("", "12"), ("112233", "123123"), ("90817", "17089"), ("5", "5")]:
        assert demo._lcs_length(a, b) == brute(a, b)


@pytest.mark.parametrize("text, expected", [
    ("1379", "1379"), (" 1379\n", "1379"), ("", None), ("13 79", None), ("fix", None), ("12>", None),
])
def test_parse_refinement(text, expected):
    assert demo.parse_refinement(text) == expected


def test_refine_template_and_corruption():
    task = load_task("demo", n_train=10, n_eval=10)
    assert task.refine_template.format(prompt="sort 7391=", response="1739") == "fix sort 7391=1739>"
    import random
    rng = random.Random(0)
    corrupted = [demo.corrupt("0123456", rng) for _ in range(200)]
    assert all(c and c.isdigit() for c in corrupted)
    assert sum(c != "0123456" for c in corrupted) > 150  # a swap of equal digits can leave it unchanged


# --- load_task / load_rows -------------------------------------------------------------------------------------

def test_load_task_module_function(custom_task_module):
    task = load_task(f"{custom_task_module}:make_task", greeting="yo")
    assert task.name == "custom-yo" and task.train_rows == [{"prompt": "yo"}]
    assert task.reward_funcs[0]([task.train_rows[0]["prompt"]], ["42"]) == [1.0]


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown task 'nope': known tasks are \\['code', 'demo', 'demo_proxy', 'dialogue'\\]"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("{module}:missing", "no callable 'missing'"),
    ("{module}:not_callable", "no callable 'not_callable'"),
    ("json:dumps", "returned str, not a fastrft.tasks.Task"),
])
def test_load_task_errors(spec, message, custom_task_module):
    options = {"obj": 1} if spec == "json:dumps" else {}
    with pytest.raises(ValueError, match=message):
        load_task(spec.format(module=custom_task_module), **options)


@pytest.mark.parametrize("spec, options, message", [
    ("demo", {"foo": 1}, "task 'demo' takes no option extra.foo; its options: extra.seed, extra.n_train, extra.n_eval"),
    ("dialogue", {}, "task 'dialogue' needs extra.reward_model=..."),
    ("demo", {"n_eval": "abc"}, "task 'demo': extra.n_eval must be int, got 'abc'"),
    ("demo", {"n_eval": True}, "task 'demo': extra.n_eval must be int, got True"),
    ("code", {"unsafe": "maybe"}, "task 'code': extra.unsafe must be bool, got 'maybe'"),
    ("code", {"timeout_s": "4"}, "task 'code': extra.timeout_s must be float or int, got '4'"),
    ("demo", {"n_eval": -5}, "the demo task needs extra.n_train >= 1 and extra.n_eval >= 0"),
    ("demo", {"n_train": 0}, "the demo task needs extra.n_train >= 1"),
    ("code", {"timeout_s": 2e6}, "code_task: timeout_s must be at most 1e+06 (the sandbox's), got 2000000.0"),
])
def test_task_options_are_checked_by_name_and_type(spec, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_task(spec, **options)


@pytest.mark.parametrize("field, message", [
    ({"reward_weights": [1.0, 2.0]}, "Task.reward_weights must be a list of one weight per reward function (1)"),
    ({"reward_weights": [float("nan")]}, "Task.reward_weights must be finite numbers, got nan"),
    ({"reward_funcs": []}, "Task.reward_funcs must be a non-empty list of callables"),
    ({"gold_reward": "gold"}, "Task.gold_reward='gold' names no reward function (they are \"format_reward('[0-9]+')\")"),
    ({"max_new_tokens": 0}, "Task.max_new_tokens must be an int >= 1, got 0"),
    ({"train_rows": ({"prompt": "a"},)}, "Task.train_rows must be a list of rows (dicts), got tuple"),
])
def test_a_task_s_fields_are_checked_when_it_loads(custom_task_module, field, message):
    """Each would fail a run at its first step (or its last), after the run folder is written."""
    import dataclasses
    import importlib

    module = importlib.import_module(custom_task_module)
    module.broken = lambda: dataclasses.replace(module.make_task(), **field)
    with pytest.raises(ValueError, match=re.escape(f"task '{custom_task_module}:broken': {message}")):
        load_task(f"{custom_task_module}:broken")


def test_task_options_of_the_right_type_pass():
    assert len(load_task("demo", n_eval=3, seed=1).eval_rows) == 3
    assert load_task("code", timeout_s=3).name == "code"    # an int where a float is asked


def test_load_rows_checks_the_types_the_rewards_annotate(tmp_path):
    task = load_task("demo")
    assert task.column_types() == {"answer": (str,)}     # sort_reward(..., answer: list[str], ...)
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "sort 321=", "answer": "123"}\n{"prompt": "sort 21=", "answer": 12}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: 'answer' must be str \(the task's reward functions read it "
                                         r"so\), got 12"):
        load_rows(path, required=task.required_columns(), types=task.column_types())
    assert len(load_rows(path)) == 2    # without the task's types, any JSON value


def test_load_rows_jsonl(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": "2"}\n')
    assert load_rows(path) == [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]

    path.write_text('{"prompt": "a"}\n{"prompt": "b",\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: malformed JSON"):
        load_rows(path)
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"question": "c"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:3: row has no 'prompt' field that is a string or a list of "
                                         r"chat messages"):
        load_rows(path)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"}]
    path.write_text(json.dumps({"prompt": chat}) + "\n")
    assert load_rows(path) == [{"prompt": chat}]
    path.write_text('{"prompt": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:1: row has no 'prompt' field that is a string or a list"):
        load_rows(path)
    path.write_text('["prompt"]\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:1: expected a JSON object"):
        load_rows(path)
    with pytest.raises(ValueError, match="unsupported file type"):
        load_rows(tmp_path / "rows.csv")


def test_load_rows_checks_every_row_for_what_the_rewards_need(tmp_path):
    task = load_task("demo")
    assert task.required_columns() == ("answer",)       # sort_reward(prompts, completions, answer, **columns)
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:3: row lacks 'answer', which the task's reward functions"):
        load_rows(path, required=task.required_columns())
    path.write_text("")
    with pytest.raises(ValueError, match=r"rows\.jsonl holds no rows"):
        load_rows(path)
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: not UTF-8 text"):
        load_rows(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_rows(tmp_path / "missing.jsonl")


def test_load_rows_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is needed to read .parquet rows")
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", "2"]}), path)
    assert load_rows(path) == [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    pq.write_table(pa.table({"question": ["a"]}), path)
    with pytest.raises(ValueError, match=r"rows\.parquet:1: row has no 'prompt' field that is a string"):
        load_rows(path)


# --- reward helpers --------------------------------------------------------------------------------------------

def test_format_length_repetition():
    prompts = ["p"] * 4
    completions = ["123", " 45 ", "12a", "aaaaaaaaaa"]
    assert format_reward(r"\d+")(prompts, completions) == [1.0, 1.0, 0.0, 0.0]
    assert length_penalty(5)(prompts, completions) == [0.0, 0.0, 0.0, -1.0]
    assert length_penalty(4)(prompts, ["abcdef"]) == [-0.5]
    # words "a b c a b c": 4 trigrams, (a b c) repeats once -> 1/4; characters for short texts
    assert repetition_penalty(3)(["p", "p"], ["a b c a b c", "abcd"]) == [-0.25, -0.0]
    with pytest.raises(ValueError):
        length_penalty(0)


def test_combine_rewards_weights_and_none():
    def half(prompts, completions, **columns):
        return [0.5] * len(completions)

    def maybe(prompts, completions, keep, **columns):
        return [1.0 if k else None for k in keep]

    rewards, per_func = combine_rewards([half, maybe], [2.0, -1.0], ["p", "q"], ["x", "y"], keep=[True, False])
    assert rewards == [pytest.approx(0.0), None]
    assert per_func == {"half": [0.5, 0.5], "maybe": [1.0, None]}
    rewards, per_func = combine_rewards([half, half], [1.0, 1.0], ["p"], ["x"])
    assert rewards == [1.0] and set(per_func) == {"half", "half#1"}


def test_rewards_are_taken_as_floats_and_async_functions_are_awaited():
    """numpy scalars, ints and bools are numbers (metrics.jsonl could not hold a numpy float32); a string is no
    reward; async functions (TRL allows them) are awaited together, also where an event loop runs."""
    import asyncio

    import numpy as np

    def numpy_rewards(prompts, completions, **columns):
        return np.array([0.5, 1.0], dtype=np.float32)

    def mixed(prompts, completions, **columns):
        return [True, 2]

    async def slow_a(prompts, completions, **columns):
        await asyncio.sleep(0.2)
        return [1.0, None]

    async def slow_b(prompts, completions, **columns):
        await asyncio.sleep(0.2)
        return [2.0, 3.0]

    rewards, per_func = combine_rewards([numpy_rewards, mixed], [1.0, 1.0], ["p", "q"], ["x", "y"])
    assert rewards == [1.5, 3.0] and all(type(v) is float for v in per_func["numpy_rewards"] + per_func["mixed"])
    json.dumps(per_func)
    for _ in range(2):
        t0 = time.perf_counter()
        rewards, per_func = combine_rewards([slow_a, slow_b], [1.0, 1.0], ["p", "q"], ["x", "y"])
        assert rewards == [3.0, None] and per_func == {"slow_a": [1.0, None], "slow_b": [2.0, 3.0]}
        assert time.perf_counter() - t0 < 0.35   # together, not one after the other

        async def inside_a_loop():
            return combine_rewards([slow_a], [1.0], ["p", "q"], ["x", "y"])
        assert asyncio.run(inside_a_loop())[0] == [1.0, None]
    def words(prompts, completions, **columns):
        return ["good"]

    with pytest.raises(ValueError, match="reward function 'words' returned 'good' for sample 0: a reward must be a "
                                         "number or None"):
        combine_rewards([words], [1.0], ["p"], ["x"])


def test_what_json_cannot_hold_of_a_metrics_record():
    """A custom evaluation's numpy or torch scalars become numbers; NaN and inf become null."""
    import numpy as np

    from fastrft.jsonl import json_safe

    record = {"eval_a": np.float32(0.5), "eval_b": torch.tensor(2.0), "eval_c": float("nan"), 3: [np.int64(4)]}
    assert json.loads(json.dumps(json_safe(record))) == {"eval_a": 0.5, "eval_b": 2.0, "eval_c": None, "3": [4]}


def test_the_completions_token_ids_reach_the_rewards_as_trl_passes_them():
    seen = {}

    def by_length(prompts, completions, completion_ids, **columns):
        seen["ids"] = completion_ids
        return [float(len(ids)) for ids in completion_ids]

    task = Task("x", [], [], [by_length], [1.0], "{response}", str, 4)
    rewards, _ = task.score([{"prompt": "a"}, {"prompt": "b"}], ["x", "yz"], [False, False], [[5, 0], [6, 7, 0]])
    assert rewards == [2.0, 3.0] and seen["ids"] == [[5, 0], [6, 7, 0]]
    assert task.required_columns() == ()   # fastrft passes it: no dataset column needed


def test_a_nan_or_inf_reward_counts_as_none(capsys):
    """TRL's "no reward": summed in, one NaN would make a whole step's update NaN (and so skipped)."""
    def odd(prompts, completions, **columns):
        return [float("nan"), 1.0, float("inf"), None]

    rewards, per_func = combine_rewards([odd], [1.0], ["p"] * 4, ["a", "b", "c", "d"])
    assert rewards == [None, 1.0, None, None] and per_func == {"odd": [None, 1.0, None, None]}
    assert "reward function 'odd' returned nan for a sample: a NaN or infinite reward counts as None" in \
        capsys.readouterr().err


def test_every_column_any_row_holds_reaches_the_rewards():
    """A column only some rows hold arrives for every row of the batch (None where a row lacks it), whichever row
    comes first."""
    def bonus(prompts, completions, **columns):
        return [float(b or 0) for b in columns["bonus"]]

    task = Task("x", [], [], [bonus], [1.0], "{response}", str, 4)
    rows = [{"prompt": "a"}, {"prompt": "b", "bonus": 1}]
    assert task.score(rows, ["x", "y"], [False, False])[0] == [0.0, 1.0]
    assert task.score(rows[::-1], ["y", "x"], [False, False])[0] == [1.0, 0.0]


def test_a_chat_prompt_s_completion_reaches_the_rewards_as_trl_gives_it():
    """TRL's conversational format: a chat prompt's completion is [{"role": "assistant", "content": text}], a string
    prompt's the text; fastrft's own reward functions read either."""
    seen = []

    def spy(prompts, completions, **columns):
        seen.extend(completions)
        return [0.0] * len(completions)

    chat = [{"role": "user", "content": "sort 21"}]
    task = Task("x", [], [], [spy], [1.0], "{response}", str, 4)
    task.score([{"prompt": chat}, {"prompt": "sort 21="}], ["12", "12"], [False, False])
    assert seen == [[{"role": "assistant", "content": "12"}], "12"]
    texts = [" 45 ", "aaaaaaaaaa", "a b c a b c", ""]
    as_chat = [[{"role": "assistant", "content": t}] for t in texts]
    for func in (format_reward(r"\d+"), length_penalty(5), repetition_penalty(3)):
        assert func(["p"] * 4, as_chat) == func(["p"] * 4, texts)
    assert [is_degenerate(c) for c in as_chat] == [is_degenerate(t) for t in texts] == [None, "looping", None,
                                                                                         "empty"]
    demo = load_task("demo")
    answer = ["12", "12"]
    for func in demo.reward_funcs:
        assert func(["p", "p"], as_chat[:1] + [[{"role": "assistant", "content": "12"}]], answer=answer) == \
            func(["p", "p"], texts[:1] + ["12"], answer=answer)
    with pytest.raises(TypeError, match="a completion must be a string or a list of chat messages with string "
                                        "contents, got 3"):
        is_degenerate(3)
    typed = [{"role": "assistant", "content": [{"type": "text", "text": "1"}, {"type": "text", "text": "2"}]}]
    assert format_reward(r"\d+")(["p"], [typed]) == [1.0]


@pytest.mark.parametrize("column", ["completions", "prompts", "truncated", "completion_ids"])
def test_a_column_fastrft_passes_itself_is_refused(tmp_path, column):
    path = tmp_path / "rows.jsonl"
    path.write_text(f'{{"prompt": "a"}}\n{{"prompt": "b", "{column}": "mine"}}\n')
    with pytest.raises(ValueError, match=rf"rows\.jsonl:2: column '{column}' is reserved \(fastrft passes the "
                                         rf"reward functions their own"):
        load_rows(path)
    with pytest.raises(ValueError, match=rf"my rows, row 2: column '{column}' is reserved"):
        check_columns([{"prompt": "a"}, {"prompt": "b", column: 1}], "my rows")


def test_a_task_module_in_the_working_directory_loads(tmp_path, monkeypatch):
    """The `fastrft` command, unlike `python -m fastrft`, has no working directory on sys.path."""
    (tmp_path / "cwd_task_xyz.py").write_text(CUSTOM_TASK_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert load_task("cwd_task_xyz:make_task").name == "custom-hi"
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_task("no_such_module_xyz:f")


def test_a_task_from_a_file_and_a_working_directory_s_module_kept_as_its_file(tmp_path, monkeypatch):
    """path/to/file.py:function loads a task module from its file (within packages: by its dotted name); a run
    folder keeps a working directory's task module as its file, so that the run resumes from anywhere."""
    from fastrft.config import load_config
    from fastrft.tasks import portable_task_spec

    package = tmp_path / "tasks_pkg_xyz"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("GREETING = 'pkg'\n")
    (package / "mine.py").write_text(CUSTOM_TASK_MODULE + "\nfrom .helpers import GREETING\n"
                                                          "def make():\n    return make_task(GREETING)\n")
    (tmp_path / "file_task_xyz.py").write_text(CUSTOM_TASK_MODULE)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert load_task(f"{package / 'mine.py'}:make").name == "custom-pkg"   # its relative import works
    assert load_task(f"{tmp_path / 'file_task_xyz.py'}:make_task", greeting="yo").name == "custom-yo"
    with pytest.raises(ValueError, match=r"cannot import module '/nowhere/t\.py' \(no such file /nowhere/t\.py\)"):
        load_task("/nowhere/t.py:make")
    monkeypatch.chdir(tmp_path)
    assert portable_task_spec("file_task_xyz:make_task") == f"{tmp_path / 'file_task_xyz.py'}:make_task"
    assert portable_task_spec("tasks_pkg_xyz.mine:make") == f"{package / 'mine.py'}:make"
    assert portable_task_spec("json:loads") == "json:loads" and portable_task_spec("demo") == "demo"
    # A module found without the working directory (installed, or on the path) is what a run imports: kept by name.
    (tmp_path / "fastrft" / "tasks").mkdir(parents=True)
    (tmp_path / "fastrft" / "tasks" / "demo.py").write_text("")
    assert portable_task_spec("fastrft.tasks.demo:demo_task") == "fastrft.tasks.demo:demo_task"
    cfg = load_config(None, ["task=file_task_xyz:make_task"], model="m")
    assert cfg.with_absolute_paths().task == f"{tmp_path / 'file_task_xyz.py'}:make_task"
    (tmp_path / "json.py").write_text(CUSTOM_TASK_MODULE)   # a name the standard library has: its module comes first
    with pytest.raises(ValueError, match=r"module 'json' has no callable 'make_task' \(the module imported is .*json"
                                         r".*; for .*json\.py give task=json\.py:make_task\)"):
        load_task("json:make_task")
    assert load_task("json.py:make_task").name == "custom-hi"


def test_combine_rewards_errors():
    def short(prompts, completions, **columns):
        return [1.0]

    with pytest.raises(ValueError, match="'short' returned 1 values for 2"):
        combine_rewards([short], [1.0], ["p", "q"], ["x", "y"])
    with pytest.raises(ValueError, match="1 reward functions but 2 weights"):
        combine_rewards([short], [1.0, 2.0], ["p"], ["x"])
    with pytest.raises(ValueError, match="column 'answer' has 1 values"):
        combine_rewards([short], [1.0], ["p", "q"], ["x", "y"], answer=["1"])


@pytest.mark.parametrize("completion, options, expected", [
    ("", {}, "empty"),
    ("  \n", {}, "empty"),
    ("1379", {}, None),
    ("1379", {"truncated": True}, "truncated"),
    ("123456", {"max_chars": 5}, "truncated"),
    ("ababababab", {}, "looping"),
    ("the cat sat the cat sat the cat sat", {}, "looping"),
    ("the quick brown fox jumps over the lazy dog", {}, None),
    ("abab", {}, None),  # too short to call a loop
])
def test_is_degenerate(completion, options, expected):
    assert is_degenerate(completion, **options) == expected


# --- reference training ----------------------------------------------------------------------------------------

def test_train_reference_tiny_budget(tmp_path, capsys):
    stats = demo.train_reference(tmp_path / "ref", seed=1, max_steps=4, batch_size=16, n_eval=16, log_every=0)
    assert stats["steps"] == 4 and not stats["stopped_by_time"]
    saved = json.loads((tmp_path / "ref" / demo.REFERENCE_FILE).read_text())
    assert saved["steps"] == 4 and 0.0 <= saved["eval_reward"] <= 1.0 and 0.0 <= saved["refiner_parse_rate"] <= 1.0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ref")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "ref")
    assert tokenizer.eos_token_id == demo.make_tokenizer().eos_token_id
    batch = tokenizer(["sort 321=", "sort 98765="], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    # same seed, same weights; ensure_reference reuses the complete checkpoint without training
    demo.train_reference(tmp_path / "again", seed=1, max_steps=4, batch_size=16, n_eval=16, log_every=0)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    marker = (tmp_path / "ref" / "model.safetensors").stat().st_mtime_ns
    assert demo.ensure_reference(tmp_path / "ref") == tmp_path / "ref"
    assert (tmp_path / "ref" / "model.safetensors").stat().st_mtime_ns == marker
    demo.ensure_reference(tmp_path / "ref", max_steps=9)   # a budget for a reference trained anew: said, not used
    assert "was trained 4 steps: --reference-steps 9 applies to a reference trained anew" in capsys.readouterr().err
    assert (tmp_path / "ref" / "model.safetensors").stat().st_mtime_ns == marker


def test_demo_proxy_rewards_length_and_its_gold_does_not():
    """demo_proxy: the proxy adds LENGTH_BONUS per character to the gold sort_reward, so padding a short answer
    with digits beats the exact answer on the proxy and loses on the gold; evaluation reports the gold."""
    task = load_task("demo_proxy", n_train=10, n_eval=4)
    assert task.reward_weights == [1.0, 0.0, 0.0] and task.gold_reward == "sort_reward"
    answer = ["137"]
    exact, padded, wrong = "137", "1377777777", "731"
    proxy = {c: demo.proxy_reward(None, [c], answer)[0] for c in (exact, padded, wrong)}
    gold = {c: demo.sort_reward(None, [c], answer)[0] for c in (exact, padded, wrong)}
    assert proxy[exact] == pytest.approx(1.0 + 3 * demo.LENGTH_BONUS) and gold[exact] == 1.0
    assert gold[padded] == pytest.approx(0.5 * 3 / 10)                           # LCS 3 of 10 characters
    assert proxy[padded] == pytest.approx(gold[padded] + 10 * demo.LENGTH_BONUS)
    assert proxy[padded] > proxy[exact] and gold[padded] < gold[exact]         # the bias pays, the gold does not
    # The bias is the same for equal lengths: the proxy orders them as the gold does.
    assert proxy[exact] - proxy[wrong] == pytest.approx(gold[exact] - gold[wrong])
    rows = task.eval_rows[:2]

    def fake_generate(model, tokenizer, prompts, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(texts=[rows[0]["answer"], rows[1]["answer"] + "9999"], truncated=[False, False],
                               completion_ids=[[4, 0], [5, 6, 0]])

    metrics = task.evaluate(None, demo.make_tokenizer(), rows, max_new_tokens=10, generate=fake_generate)
    golds = demo.sort_reward(None, [rows[0]["answer"], rows[1]["answer"] + "9999"], [r["answer"] for r in rows])
    assert metrics["eval_gold"] == pytest.approx(sum(golds) / 2) == metrics["eval_sort_reward"]
    assert metrics["eval_reward"] > metrics["eval_gold"]
    assert "eval_gold" not in load_task("demo", n_train=10, n_eval=4).evaluate(
        None, demo.make_tokenizer(), rows, max_new_tokens=10, generate=fake_generate)


def test_the_reference_trains_on_every_core_unless_the_thread_count_is_set(monkeypatch):
    """OMP_NUM_THREADS (parallel jobs, test workers) is kept; without it every usable core; restored after."""
    import os

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        with demo._training_threads():
            assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        with demo._training_threads():
            assert torch.get_num_threads() == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
