"""The `dialogue` task: replies scored by a reward model (a sequence classifier, score = ``logits[:, 0]``).

    task = dialogue_task("path/to/reward_model")                  embedded prompts
    task = dialogue_task("path/to/reward_model", "prompts.jsonl")  rows with a "prompt" (fastrft.tasks.load_rows)

The reward model is loaded from a local path with ``AutoModelForSequenceClassification`` the first time it is
needed and reused for every later batch: bf16 on CUDA, fp32 on the CPU. Each (prompt, reply) pair becomes a user
message (or the prompt's chat messages) and an assistant message, formatted by the reward model's chat template (a
plain "User:/Assistant:" layout when its tokenizer has none), right-padded and scored in batches.

Rewards (TRL convention; an optional per-sample ``truncated`` column or TRL's ``completion_ids`` mark replies cut
at the length limit):

    reward_model  weight 1: the reward model's score; ``degenerate_reward`` for a degenerate reply, which is not
                  scored
    degenerate_*  weight 0: 1.0 for an empty, truncated or looping reply; their means are the rates in the logs
"""
from __future__ import annotations

import os
import threading

import torch

from fastrft.rewards import completion_text, is_degenerate, is_prefilled, message_text, truncated_flags
from fastrft.tasks import Task, load_rows

DEGENERATE_KINDS = ("empty", "truncated", "looping")
REFINE_TEMPLATE = ("{prompt}\n\nA draft reply:\n{response}\n\nRewrite the draft as an improved reply: helpful, "
                   "correct and concise, keeping what is already good.\nImproved reply:\n")

# The embedded prompts (written for fastrft): everyday requests a small chat model can answer in a few sentences.
DEFAULT_PROMPTS = [
    "How do I boil an egg so that the yolk stays soft?",
    "Explain what a hash table is to someone who has just started programming.",
    "Write a short, polite email asking a colleague to review my pull request.",
    "What are three ways to fall asleep faster?",
    "Summarise the difference between weather and climate in two sentences.",
    "Suggest a name for a bakery that specialises in sourdough bread.",
    "How should I prepare for a job interview at a small company?",
    "Why does ice float on water?",
    "Give me a simple recipe for a vegetarian pasta dinner.",
    "What is the difference between a list and a tuple in Python?",
    "Write a haiku about autumn rain.",
    "How can I keep a houseplant alive while I am away for two weeks?",
    "Explain compound interest with a small numerical example.",
    "What should I pack for a weekend hiking trip?",
    "My code works on my laptop but fails on the server. Where should I start looking?",
    "Recommend a way to learn basic Spanish in three months.",
    "Why is the sky blue?",
    "Write a two-sentence story about a lost umbrella.",
    "How do I politely decline an invitation to a party?",
    "What are the pros and cons of working from home?",
    "Explain what a unit test is and why it is useful.",
    "How can I reduce the amount of plastic I use at home?",
    "Give three tips for writing a clear README file.",
    "What is photosynthesis, in simple terms?",
]


def _device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RewardModelScorer:
    """Scores (prompt, reply) pairs with a sequence-classification reward model, loaded once on first use."""

    def __init__(self, path: str, *, device=None, batch_size: int = 16, max_length: int = 2048):
        self.path, self.batch_size, self.max_length = str(path), batch_size, max_length
        self.device = _device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = self.tokenizer = None
        self._lock = threading.Lock()

    def load(self):
        with self._lock:
            if self.model is None:
                from transformers import AutoModelForSequenceClassification, AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self.path)
                tokenizer.padding_side = "right"  # positions then match an unpadded pass; the head finds the last token
                tokenizer.truncation_side = "left"  # keep the end of a long conversation: the reply
                if tokenizer.pad_token is None:
                    tokenizer.pad_token = tokenizer.eos_token
                model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=self.dtype)
                if model.config.pad_token_id is None:
                    model.config.pad_token_id = tokenizer.pad_token_id
                self.model, self.tokenizer = model.to(self.device).eval(), tokenizer
        return self.model, self.tokenizer

    def format(self, prompt, reply) -> str:
        """The scored text: the prompt (a string: one user message; or chat messages) and the reply (a string, or
        TRL's conversational completion) as a conversation; a prompt's last assistant message (an answer's
        beginning, which the policy continued) and the reply are one answer."""
        _, tokenizer = self.load()
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        begun = message_text(messages.pop()["content"]) if is_prefilled(messages) else ""
        messages.append({"role": "assistant", "content": begun + completion_text(reply)})
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)

    @torch.no_grad()
    def __call__(self, prompts: list, replies: list) -> list[float]:
        model, tokenizer = self.load()
        texts = [self.format(p, r) for p, r in zip(prompts, replies)]
        # A chat template writes its own special tokens; the plain layout gets the tokenizer's.
        add_special = not tokenizer.chat_template
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                              truncation=True, max_length=self.max_length, add_special_tokens=add_special)
            logits = model(**batch.to(self.device)).logits  # [B, num_labels]
            scores += logits[:, 0].float().tolist()
        return scores


def make_reward_funcs(scorer: RewardModelScorer, *, degenerate_reward: float = -5.0,
                      max_new_tokens: int | None = None):
    """[reward_model, degenerate_empty, degenerate_truncated, degenerate_looping]."""

    def kinds(completions, truncated, completion_ids):
        flags = truncated_flags(len(completions), truncated, completion_ids, max_new_tokens)
        return [is_degenerate(c, truncated=t) for c, t in zip(completions, flags)]

    def reward_model(prompts, completions, truncated=None, completion_ids=None, **columns):
        degenerate = kinds(completions, truncated, completion_ids)
        keep = [i for i, kind in enumerate(degenerate) if kind is None]
        scores = scorer([prompts[i] for i in keep], [completions[i] for i in keep]) if keep else []
        rewards = [degenerate_reward] * len(completions)
        for i, score in zip(keep, scores):
            rewards[i] = score
        return rewards

    def indicator(kind):
        def degenerate(prompts, completions, truncated=None, completion_ids=None, **columns):
            return [float(k == kind) for k in kinds(completions, truncated, completion_ids)]

        degenerate.__name__ = f"degenerate_{kind}"
        return degenerate

    return [reward_model] + [indicator(kind) for kind in DEGENERATE_KINDS]


def parse_refinement(text: str) -> str | None:
    """The refiner's improved reply: its continuation stripped, or None when that is empty or looping."""
    text = text.strip()
    return text if is_degenerate(text) is None else None


def _check_reward_model(path: str) -> None:
    """A local model directory whose architecture is a sequence classifier: a causal LM would load with a randomly
    initialised score head and score noise."""
    from fastrft.trainer import check_model_dir

    architectures = check_model_dir(path, "dialogue_task: reward_model").get("architectures") or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"dialogue_task: reward_model={path!r} is a {', '.join(architectures)}, not a sequence-"
                         f"classification reward model: its score head would be random")


def dialogue_task(reward_model: str, dataset: str | None = None, *, n_eval: int = 4, device=None,
                  batch_size: int = 16, max_length: int = 2048, degenerate_reward: float = -5.0,
                  max_new_tokens: int = 256) -> Task:
    """Replies to ``dataset``'s prompts (default: the embedded ones), scored by the reward model at the local path
    ``reward_model``; the first ``n_eval`` rows are held out. ``degenerate_reward`` is the reward of an empty,
    truncated or looping reply (set it below the reward model's usual range)."""
    reward_model, dataset = (os.path.expanduser(p) if isinstance(p, str) else p for p in (reward_model, dataset))
    _check_reward_model(reward_model)
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"dialogue_task: {name} must be an int >= 1, got {value!r}")
    try:
        scoring_device = _device(device)
    except RuntimeError:
        raise ValueError(f"dialogue_task: device must be a torch device (cpu, cuda, cuda:N), got {device!r}") from None
    if scoring_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"dialogue_task: device={device!r} but CUDA is not available")
    rows = load_rows(dataset, key="extra.dataset") if dataset else [{"prompt": p} for p in DEFAULT_PROMPTS]
    if not 0 <= n_eval < len(rows):
        raise ValueError(f"dialogue_task: n_eval={n_eval} must leave training rows out of {len(rows)}")
    scorer = RewardModelScorer(reward_model, device=device, batch_size=batch_size, max_length=max_length)
    reward_funcs = make_reward_funcs(scorer, degenerate_reward=degenerate_reward, max_new_tokens=max_new_tokens)
    return Task(name="dialogue", train_rows=rows[n_eval:], eval_rows=rows[:n_eval], reward_funcs=reward_funcs,
                reward_weights=[1.0] + [0.0] * (len(reward_funcs) - 1), refine_template=REFINE_TEMPLATE,
                parse_refinement=parse_refinement, max_new_tokens=max_new_tokens)
