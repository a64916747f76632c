"""The embedded demo task: sort a string of digits, with a tiny Llama that learns it in about a minute on a CPU.

    prompt      "sort 7391="           completion  "1379" then EOS
    refinement  "fix sort 7391=1739>"  continuation "1379" then EOS (the corrected answer; a correct one is copied)

Everything is built locally: a character-level tokenizer (``make_tokenizer``), a tiny ``LlamaForCausalLM``
(``make_model``), and a *reference* model trained by ``train_reference`` with plain supervised learning on both
formats. Its step budget is small on purpose: the reference sorts short strings well and long ones imperfectly, so
RL has room to improve, while it has seen enough corrupted answers to be a useful refiner.

Reward: ``sort_reward``, half partial credit (the longest common subsequence of completion and answer over the
longer of the two) and half exact match: near misses earn a smooth signal, only the exact answer earns 1.0, empty or
non-digit text earns 0.0. ``exact_match`` is logged beside it with weight 0.

``demo_proxy_task`` (task=demo_proxy) is the same task trained on a biased proxy, as a learned reward model can be:
``proxy_reward`` = sort_reward + LENGTH_BONUS per character of the completion, a length bias of the kind reward
models learn from human preferences for longer answers. It is exploitable on purpose: padding a short answer with
digits up to the length limit scores more proxy reward than the exact answer (3 digits: exact 1.75, padded to 10
digits about 2.65) while its gold reward, ``sort_reward``, falls (0.15). Evaluation reports the gold reward
(``eval_gold``) beside the proxy (``eval_reward``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import torch

from fastrft.rewards import completion_text
from fastrft.tasks import Task

PROMPT_FORMAT = "sort {digits}="
REFINE_TEMPLATE = "fix {prompt}{response}>"
MIN_DIGITS, MAX_DIGITS = 3, 8
MAX_NEW_TOKENS = MAX_DIGITS + 2  # the answer, EOS, one token of slack
LENGTH_BONUS = 0.25  # proxy reward per completion character (demo_proxy_task)
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
CHARACTERS = "0123456789 =>fiorstx"  # every character of the two templates
REFERENCE_FILE = "reference.json"


def make_tokenizer():
    """Character-level ``PreTrainedTokenizerFast``: one token per character, ``<bos>`` prepended, left padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    vocab = {token: i for i, token in enumerate(specials + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters join without separators
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", model_max_length=64,
                                   **SPECIAL_TOKENS)


def make_model(tokenizer, seed: int = 0):
    """A freshly initialised tiny ``LlamaForCausalLM`` (about 0.33M parameters) for ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------------------------------------------------------
# Rows and rewards


def _random_digits(rng: random.Random, lengths: tuple[int, int] = (MIN_DIGITS, MAX_DIGITS)) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(*lengths)))


def _row(digits: str) -> dict:
    return {"prompt": PROMPT_FORMAT.format(digits=digits), "answer": "".join(sorted(digits))}


def _lcs_length(a: str, b: str) -> int:
    previous = [0] * (len(b) + 1)
    for ca in a:
        current = [0]
        for j, cb in enumerate(b):
            current.append(previous[j] + 1 if ca == cb else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def sort_reward(prompts, completions, answer: list[str], **columns):
    """Half partial credit, half exact match, in [0, 1]: (LCS(completion, answer) / max(len(completion),
    len(answer)) + [completion == answer]) / 2. Empty or non-digit text scores 0.0."""
    rewards = []
    for completion, target in zip(map(completion_text, completions), answer):
        completion = completion.strip()
        if not completion.isdigit():
            rewards.append(0.0)
        else:
            partial = _lcs_length(completion, target) / max(len(completion), len(target))
            rewards.append(0.5 * partial + 0.5 * float(completion == target))
    return rewards


def exact_match(prompts, completions, answer: list[str], **columns):
    """1.0 when the stripped completion is exactly the sorted digits, else 0.0."""
    return [float(completion_text(completion).strip() == target) for completion, target in zip(completions, answer)]


def proxy_reward(prompts, completions, answer: list[str], **columns):
    """The biased proxy: sort_reward + LENGTH_BONUS per character of the stripped completion."""
    return [gold + LENGTH_BONUS * len(completion_text(completion).strip())
            for gold, completion in zip(sort_reward(prompts, completions, answer), completions)]


def parse_refinement(text: str) -> str | None:
    """The refiner's corrected answer: its continuation stripped, or None unless it is a non-empty digit string."""
    text = text.strip()
    return text if text.isdigit() else None


def demo_task(seed: int = 0, n_train: int = 20000, n_eval: int = 256) -> Task:
    """Digit sorting, 3 to 8 digits; the eval prompts never occur among the train prompts."""
    if n_train < 1 or n_eval < 0:
        raise ValueError(f"the demo task needs extra.n_train >= 1 and extra.n_eval >= 0 (0: no held-out prompts), "
                         f"got n_train={n_train}, n_eval={n_eval}")
    rng = random.Random(seed)
    eval_digits: list[str] = []
    seen: set[str] = set()
    while len(eval_digits) < n_eval:
        digits = _random_digits(rng)
        if digits not in seen:
            seen.add(digits)
            eval_digits.append(digits)
    train_digits = []
    while len(train_digits) < n_train:
        digits = _random_digits(rng)
        if digits not in seen:
            train_digits.append(digits)
    return Task(name="demo", train_rows=[_row(d) for d in train_digits], eval_rows=[_row(d) for d in eval_digits],
                reward_funcs=[sort_reward, exact_match], reward_weights=[1.0, 0.0], refine_template=REFINE_TEMPLATE,
                parse_refinement=parse_refinement, max_new_tokens=MAX_NEW_TOKENS)


def demo_proxy_task(seed: int = 0, n_train: int = 20000, n_eval: int = 256) -> Task:
    """demo_task's prompts trained on proxy_reward, with sort_reward the gold standard (see the module docstring)."""
    task = demo_task(seed, n_train, n_eval)
    task.name = "demo_proxy"
    task.reward_funcs = [proxy_reward, sort_reward, exact_match]
    task.reward_weights = [1.0, 0.0, 0.0]
    task.gold_reward = "sort_reward"
    return task


# ---------------------------------------------------------------------------------------------------------------
# The reference model: supervised training on answers and on refinements of corrupted answers


def corrupt(answer: str, rng: random.Random) -> str:
    """``answer`` with one or two random edits (substitute, drop, insert or swap adjacent digits); never empty."""
    chars = list(answer)
    for _ in range(rng.choice((1, 1, 2))):
        op = rng.choice(("substitute", "drop", "insert", "swap"))
        i = rng.randrange(len(chars))
        if op == "substitute":
            chars[i] = rng.choice([d for d in "0123456789" if d != chars[i]])
        elif op == "drop" and len(chars) > 1:
            del chars[i]
        elif op == "insert":
            chars.insert(i, rng.choice("0123456789"))
        elif op == "swap" and len(chars) > 1:
            j = min(i + 1, len(chars) - 1) if i + 1 < len(chars) else i - 1
            chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def _training_example(rng: random.Random, refine_share: float, copy_share: float,
                      task_lengths: tuple[int, int]) -> tuple[str, str]:
    """(context, target) for one supervised example; the loss falls on the target and EOS only."""
    if rng.random() >= refine_share:
        row = _row(_random_digits(rng, task_lengths))
        return row["prompt"], row["answer"]
    row = _row(_random_digits(rng))
    response = row["answer"] if rng.random() < copy_share else corrupt(row["answer"], rng)
    return REFINE_TEMPLATE.format(prompt=row["prompt"], response=response), row["answer"]


def _batch(tokenizer, examples: list[tuple[str, str]]):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside target + EOS)."""
    sequences, label_rows = [], []
    for context, target in examples:
        context_ids = tokenizer(context)["input_ids"]  # with <bos>
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(context_ids + target_ids)
        label_rows.append([-100] * len(context_ids) + target_ids)
    length = max(map(len, sequences))
    input_ids = torch.full((len(sequences), length), tokenizer.pad_token_id)
    labels = torch.full((len(sequences), length), -100)
    for i, (ids, row_labels) in enumerate(zip(sequences, label_rows)):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(ids)] = torch.tensor(row_labels)
    return input_ids, input_ids != tokenizer.pad_token_id, labels


@torch.no_grad()
def greedy_complete(model, tokenizer, contexts: list[str], max_new_tokens: int = MAX_NEW_TOKENS,
                    batch_size: int = 256) -> list[str]:
    """Greedy continuations of ``contexts``, decoded up to EOS without special tokens."""
    completions = []
    for start in range(0, len(contexts), batch_size):
        batch = tokenizer(contexts[start:start + batch_size], return_tensors="pt", padding=True)
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        completions += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return completions


def evaluate_reference(model, tokenizer, task: Task, seed: int = 0) -> dict:
    """Greedy task reward / exact match on the eval rows, and the refiner's behaviour on corrupted and correct
    answers to the same prompts."""
    rows = task.eval_rows
    prompts = [row["prompt"] for row in rows]
    answers = [row["answer"] for row in rows]
    completions = greedy_complete(model, tokenizer, prompts)
    rewards = sort_reward(prompts, completions, answers)
    exact = exact_match(prompts, completions, answers)

    rng = random.Random(seed + 1)
    corrupted = [corrupt(a, rng) for a in answers]
    fixed = greedy_complete(model, tokenizer, [REFINE_TEMPLATE.format(prompt=p, response=c)
                                               for p, c in zip(prompts, corrupted)])
    copied = greedy_complete(model, tokenizer, [REFINE_TEMPLATE.format(prompt=p, response=a)
                                                for p, a in zip(prompts, answers)])
    own = greedy_complete(model, tokenizer, [REFINE_TEMPLATE.format(prompt=p, response=c)
                                             for p, c in zip(prompts, completions)])
    own_parsed = [parse_refinement(r) or "" for r in own]
    n = len(rows)
    return {
        "eval_reward": sum(rewards) / n,
        "eval_exact_match": sum(exact) / n,
        "refiner_fixes_corrupted": sum(parse_refinement(f) == a for f, a in zip(fixed, answers)) / n,
        "refiner_copies_correct": sum(parse_refinement(c) == a for c, a in zip(copied, answers)) / n,
        "refined_own_reward": sum(sort_reward(prompts, own_parsed, answers)) / n,
        "refined_own_exact_match": sum(exact_match(prompts, own_parsed, answers)) / n,
        "refiner_parse_rate": sum(parse_refinement(r) is not None for r in own) / n,
    }


@contextlib.contextmanager
def _training_threads():
    """Every core this process may use while the reference trains (torch's default is the physical cores), unless
    OMP_NUM_THREADS sets the count: jobs run side by side (test workers, sweeps) keep their share. The count before
    is restored."""
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_reference(out_dir, *, seed: int = 0, max_steps: int = 500, max_seconds: float | None = None,
                    batch_size: int = 64, lr: float = 3e-3, refine_share: float = 0.75, copy_share: float = 0.3,
                    task_lengths: tuple[int, int] = (MIN_DIGITS, 5),
                    n_eval: int = 256, log_every: int = 100) -> dict:
    """Train the reference model and save it with its tokenizer under ``out_dir``.

    Supervised on fresh random examples each step: a ``refine_share`` of them are refinements of 3 to 8 digits (of
    which ``copy_share`` already hold the right answer, so the refiner learns to copy correct text verbatim), the
    rest are task prompts of ``task_lengths`` digits only: the reference then sorts short strings well and longer
    ones imperfectly, while as a refiner it has seen every length. Training
    stops at ``max_steps`` (deterministic given the seed: on a busy machine it takes longer, with the same result) or
    at ``max_seconds`` when one is given (the model then depends on the machine's speed). Returns the stats
    written to ``out_dir/reference.json``: greedy eval reward / exact match and refiner stats.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1 (the reference is cached as trained), got {max_steps!r}")
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, seed=seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup_steps = max(1, max_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))
    start = time.perf_counter()
    step = 0
    with _training_threads():
        while step < max_steps and (max_seconds is None or time.perf_counter() - start < max_seconds):
            input_ids, attention_mask, labels = _batch(
                tokenizer, [_training_example(rng, refine_share, copy_share, task_lengths) for _ in range(batch_size)])
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, L, V]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if log_every and step % log_every == 0:
                print(f"reference step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:.1f}s",
                      flush=True)
    train_time_s = time.perf_counter() - start

    model.eval()
    stats = {"seed": seed, "steps": step, "stopped_by_time": step < max_steps, "train_time_s": round(train_time_s, 2),
             "final_loss": loss.item() if step else math.nan}
    stats.update(evaluate_reference(model, tokenizer, demo_task(seed=seed, n_eval=n_eval), seed=seed))
    out_dir.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # the demo's own lines and progress bar are enough
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / REFERENCE_FILE).write_text(json.dumps(stats, indent=2) + "\n")  # written last: marks completion
    return stats


def cached_reference_steps(cache_dir) -> int | None:
    """The steps the reference cached in cache_dir was trained; None where none is cached there."""
    path = Path(cache_dir) / REFERENCE_FILE
    return json.loads(path.read_text()).get("steps") if path.is_file() else None


def ensure_reference(cache_dir, **train_options) -> Path:
    """``cache_dir`` holding a complete reference checkpoint, trained there first unless ``reference.json`` exists."""
    cache_dir = Path(cache_dir)
    if not (cache_dir / REFERENCE_FILE).is_file():
        train_reference(cache_dir, **train_options)
    elif "max_steps" in train_options:
        trained = cached_reference_steps(cache_dir)
        if trained != train_options["max_steps"]:
            from fastrft.batch import note_once

            note_once(f"the reference cached in {cache_dir} was trained {trained} steps: --reference-steps "
                      f"{train_options['max_steps']} applies to a reference trained anew (give another --cache-dir)")
    return cache_dir
