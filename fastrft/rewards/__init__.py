"""Rule-based reward helpers in TRL's convention, reusable by any task.

A reward function is called as ``f(prompts, completions, **columns) -> list[float | None]``: ``prompts`` and
``completions`` are lists of strings, or, for rows whose prompt is chat messages, TRL's conversational format (the
prompt's messages, and the completion as ``[{"role": "assistant", "content": text}]``); each dataset column arrives
as a list aligned with them, and ``None`` means "no reward for this sample" (the sample is left out of the average,
not scored 0). The helpers here take either form (``completion_text``).

    format_reward(pattern)        1.0 when the completion fully matches a regex, else 0.0
    length_penalty(max_chars)     0.0 up to max_chars, then -(excess / max_chars), floored at -1
    repetition_penalty(n=3)       minus the fraction of the completion's n-grams that repeat an earlier one
    combine_rewards(...)          the weighted total and each function's values, None-aware
    is_degenerate(completion)     "empty" | "truncated" | "looping" | None
    completion_text(completion)   the text of a completion in either form
    is_prefilled(prompt)          whether a chat prompt ends with the assistant's message, which the model continues
"""
from __future__ import annotations

import asyncio
import inspect
import math
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

RewardFunc = Callable[..., list]


def message_text(content) -> str:
    """A chat message's content as text: a string as it is; typed parts ([{"type": "text", "text": ...}, ...], as
    multimodal chat templates take them) as their texts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return "".join(part["text"] for part in content if part.get("type") == "text" and isinstance(part.get("text"),
                                                                                                       str))
    raise TypeError(f"a chat message's content must be a string or a list of typed parts, got {content!r:.80}")


def is_prefilled(prompt) -> bool:
    """Whether a prompt is chat messages whose last message is the assistant's: an answer's beginning, which the
    model continues (TRL's continue_final_message) instead of starting an answer of its own."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[-1], Mapping) \
        and prompt[-1].get("role") == "assistant"


def completion_text(completion) -> str:
    """A completion's text: a string as it is, a conversational completion (a list of messages, TRL's format for chat
    prompts) as its messages' contents joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(m, dict) and "content" in m for m in completion):
        try:
            return "".join(message_text(m["content"]) for m in completion)
        except TypeError:
            pass
    raise TypeError(f"a completion must be a string or a list of chat messages with string contents, got "
                    f"{completion!r:.80}")


def format_reward(pattern: str) -> RewardFunc:
    """1.0 for a completion (stripped of surrounding whitespace) that fully matches ``pattern``, else 0.0."""
    regex = re.compile(pattern, re.DOTALL)

    def format_reward(prompts, completions, **columns):
        return [1.0 if regex.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]

    format_reward.__name__ = f"format_reward({pattern!r})"
    return format_reward


def length_penalty(max_chars: int) -> RewardFunc:
    """0.0 for completions of at most ``max_chars`` characters, then linearly down to -1.0 at twice that."""
    if max_chars <= 0:
        raise ValueError(f"length_penalty: max_chars must be positive, got {max_chars}")

    def length_penalty(prompts, completions, **columns):
        return [-min(1.0, max(0, len(completion_text(c)) - max_chars) / max_chars) for c in completions]

    length_penalty.__name__ = f"length_penalty({max_chars})"
    return length_penalty


def _repeated_ngram_fraction(tokens: Sequence, n: int) -> float:
    """Share of the n-grams of ``tokens`` that equal an earlier n-gram (0.0 when there are none)."""
    ngrams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not ngrams:
        return 0.0
    return 1.0 - len(set(ngrams)) / len(ngrams)


def repetition_penalty(n: int = 3) -> RewardFunc:
    """Minus the fraction of repeated word n-grams (characters when the completion has fewer than n words)."""
    if n < 1:
        raise ValueError(f"repetition_penalty: n must be at least 1, got {n}")

    def repetition_penalty(prompts, completions, **columns):
        values = []
        for c in map(completion_text, completions):
            words = c.split()
            values.append(-_repeated_ngram_fraction(words if len(words) >= n else c, n))
        return values

    repetition_penalty.__name__ = f"repetition_penalty({n})"
    return repetition_penalty


def _func_name(func) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


def combine_rewards(funcs: Sequence[RewardFunc], weights: Sequence[float], prompts: Sequence[str],
                    completions: Sequence[str], **columns):
    """Weighted sum of reward functions: ``(rewards, per_func)``.

    ``rewards[i]`` is ``sum_k weights[k] * funcs[k](...)[i]``, or None when any function returned None for sample i.
    A function may be async (as TRL allows): the coroutines of one call are awaited together. Values are taken as
    floats (numpy scalars, ints and bools too); a NaN or infinite value counts as None (TRL's "no reward"; in a sum
    it would poison the whole step's update), said once per function. ``per_func`` maps each function's name to its
    values, None for those (duplicate names get a ``#k`` suffix), for logging. A function that returns the wrong
    number of values, or a value that is no number, raises a ValueError naming it.
    """
    if len(funcs) != len(weights):
        raise ValueError(f"combine_rewards: {len(funcs)} reward functions but {len(weights)} weights")
    if len(prompts) != len(completions):
        raise ValueError(f"combine_rewards: {len(prompts)} prompts but {len(completions)} completions")
    for name, column in columns.items():
        if len(column) != len(completions):
            raise ValueError(f"combine_rewards: column {name!r} has {len(column)} values for {len(completions)} "
                             "completions")
    returned = [func(prompts=list(prompts), completions=list(completions), **columns) for func in funcs]
    pending = [k for k, value in enumerate(returned) if inspect.isawaitable(value)]
    for k, value in zip(pending, _awaited([returned[k] for k in pending])):
        returned[k] = value
    rewards: list[float | None] = [0.0] * len(completions)
    per_func: dict[str, list] = {}
    for k, (func, weight, values) in enumerate(zip(funcs, weights, returned)):
        name = _func_name(func)
        values = _reward_values(name, values, len(completions))
        per_func[name if name not in per_func else f"{name}#{k}"] = values
        for i, value in enumerate(values):
            if value is None or rewards[i] is None:
                rewards[i] = None
            else:
                rewards[i] += weight * value
    return rewards, per_func


def _reward_values(name: str, returned, n: int) -> list[float | None]:
    """A reward function's values as floats or None (a NaN or infinite one said once, and None)."""
    values = list(returned)
    if len(values) != n:
        raise ValueError(f"reward function {name!r} returned {len(values)} values for {n} completions")
    for i, value in enumerate(values):
        if value is None:
            continue
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            values[i] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"reward function {name!r} returned {value!r} for sample {i}: a reward must be a "
                             f"number or None") from None
    nonfinite = [i for i, value in enumerate(values) if value is not None and not math.isfinite(value)]
    if nonfinite:
        from fastrft.batch import note_once

        note_once(f"reward function {name!r} returned {values[nonfinite[0]]!r} for a sample: a NaN or infinite "
                  f"reward counts as None (the sample is not scored)")
        for i in nonfinite:
            values[i] = None
    return values


def _awaited(awaitables: list) -> list:
    """The results of async reward functions, awaited together; in a thread of its own where this one runs an event
    loop already (a notebook)."""
    if not awaitables:
        return []

    async def gathered():
        return await asyncio.gather(*awaitables)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gathered())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, gathered()).result()


def is_degenerate(completion, *, max_chars: int | None = None, truncated: bool = False,
                  ngram: int = 3) -> str | None:
    """Why a completion (a string or a conversational completion) is degenerate, or None when it is not.

    "empty": nothing but whitespace. "truncated": generation hit its token limit (``truncated``) or the text is
    longer than ``max_chars``. "looping": at least half of its ``ngram``-grams (words, or characters for texts of
    few words) repeat an earlier one, over at least 4 n-grams.
    """
    completion = completion_text(completion)
    if not completion.strip():
        return "empty"
    if truncated or (max_chars is not None and len(completion) > max_chars):
        return "truncated"
    words = completion.split()
    tokens = words if len(words) >= ngram + 3 else completion
    if len(tokens) - ngram + 1 >= 4 and _repeated_ngram_fraction(tokens, ngram) >= 0.5:
        return "looping"
    return None


def truncated_flags(n: int, truncated=None, completion_ids=None, max_new_tokens: int | None = None) -> list[bool]:
    """Per-sample truncation at the length limit: the fastrft trainer's ``truncated`` column, or TRL's
    ``completion_ids`` that reached ``max_new_tokens``; none when neither is known."""
    if truncated is not None:
        return [bool(t) for t in truncated]
    if completion_ids is not None and max_new_tokens:
        return [len(ids) >= max_new_tokens for ids in completion_ids]
    return [False] * n
