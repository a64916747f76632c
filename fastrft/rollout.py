"""Batched sampling from a causal LM with a KV cache: the rollout phase, the refiner's greedy pass and evaluation.

Prompts are strings (used as they are) or chat messages (formatted with the tokenizer's chat template). Batches are
left-padded for generate(); on CUDA the static cache lets transformers compile the decoding step.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch


@dataclass
class Samples:
    prompt_ids: list[list[int]]      # one per sample (a prompt's ids repeated for each of its samples)
    completion_ids: list[list[int]]  # the generated tokens up to and including EOS, no padding
    texts: list[str]                 # the completions decoded without special tokens
    truncated: list[bool]            # stopped by max_new_tokens before an EOS


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    encoded = []
    for prompt in prompts:
        if isinstance(prompt, str):
            encoded.append(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        elif isinstance(prompt, list):
            encoded.append(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
        else:
            raise ValueError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    return encoded


def cache_implementation(device: torch.device):
    """transformers' KV cache for generate(): on CUDA the static cache, whose fixed shapes let transformers compile
    the decoding step; elsewhere the dynamic one, which grows only as far as the batch does."""
    return "static" if device.type == "cuda" else None


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, batch_size: int = 256) -> Samples:
    """num_samples completions of each prompt (samples of one prompt are adjacent)."""
    from transformers import GenerationConfig

    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token: generation could not stop")
    pad_id = eos_id if pad_id is None else pad_id
    device = next(model.parameters()).device
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=None if greedy else temperature,
        top_p=None if greedy else top_p, top_k=None, eos_token_id=eos_id, pad_token_id=pad_id,
        cache_implementation=cache_implementation(device),
    )
    expanded = [ids for ids in prompt_ids for _ in range(num_samples)]
    samples = Samples([], [], [], [])
    was_training = model.training
    model.eval()
    for start in range(0, len(expanded), batch_size):
        batch = expanded[start:start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                generation_config=gen_config)
        for ids, new in zip(batch, output[:, width:].tolist()):
            end = new.index(eos_id) + 1 if eos_id in new else len(new)
            completion = new[:end]
            samples.prompt_ids.append(ids)
            samples.completion_ids.append(completion)
            samples.truncated.append(eos_id not in completion)
            samples.texts.append(tokenizer.decode(completion, skip_special_tokens=True))
    model.train(was_training)
    return samples


# ----------------------------------------------------------------------------------------------- drafts

@dataclass
class DraftStats:
    passes: int = 0          # forward passes of the model
    offered: int = 0         # draft tokens put up for verification
    accepted: int = 0        # of those, tokens the greedy decoding confirmed
    plain_rows: int = 0      # rows decoded without drafts (a sliding-window cache that the slots would overflow)


@torch.no_grad()
def greedy_from_drafts(model, tokenizer, prompt_ids: list[list[int]], drafts: list[list[int]], *,
                       max_new_tokens: int, batch_size: int = 256, lookahead: int = 16,
                       ngram: int = 3) -> tuple[Samples, DraftStats]:
    """The greedy completion of each prompt, token for token what generate(..., greedy=True) writes, with drafts[i]
    (a guess of completion i, such as the response a refiner corrects) verified instead of decoded:

      1. One forward pass over prompt + draft per row (left-padded, rows bucketed by length): the greedy prediction
         at each draft position accepts the draft's longest matching prefix, and the prediction after it is the
         next token. A row whose whole draft (its EOS included) is accepted is done.
      2. The other rows go on from their verified prefix's KV cache. Each pass feeds the last token and a block of
         proposed tokens: where the last `ngram` (down to 1) written tokens occur in the draft, the draft's
         continuation from there (prompt-lookup decoding), 2 tokens at first, doubling up to `lookahead` while they
         are accepted. The block's predictions accept the proposal's matching prefix, and one more token comes from
         the prediction after it.
    Rejected tokens stay in the cache, masked out of attention, so that every row of the batch keeps one cache
    length (transformers' dynamic cache, any causal LM); rows that finish leave the batch. EOS and max_new_tokens end a
    row as in generate(). Returns the completions (as generate's Samples) and what the drafts saved (DraftStats)."""
    if len(prompt_ids) != len(drafts):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(drafts)} drafts")
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token: generation could not stop")
    pad_id = eos_id if pad_id is None else pad_id
    stats = DraftStats()
    completions: list[list[int] | None] = [None] * len(prompt_ids)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(drafts[i]))
    was_training = model.training
    model.eval()
    window = _sliding_window(model)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        slots = max(len(prompt_ids[i]) + len(drafts[i]) for i in batch) + max_new_tokens * (lookahead + 1)
        if window is not None and slots >= window:
            plain = generate(model, tokenizer, [prompt_ids[i] for i in batch], max_new_tokens=max_new_tokens,
                             greedy=True, batch_size=batch_size)
            for i, ids in zip(batch, plain.completion_ids):
                completions[i] = ids
            stats.plain_rows += len(batch)
            continue
        for i, ids in zip(batch, _verify_batch(model, [prompt_ids[i] for i in batch],
                                               [drafts[i][:max_new_tokens] for i in batch], eos_id, pad_id,
                                               max_new_tokens, lookahead, ngram, stats)):
            completions[i] = ids
    model.train(was_training)
    samples = Samples([], [], [], [])
    for ids, completion in zip(prompt_ids, completions):
        samples.prompt_ids.append(ids)
        samples.completion_ids.append(completion)
        samples.truncated.append(eos_id not in completion)
        samples.texts.append(tokenizer.decode(completion, skip_special_tokens=True))
    return samples, stats


class _DraftRow:
    """One row's decoding state: what it has written, where its draft is aligned, what its cache holds, and how many
    draft tokens it proposes next (doubling while they are accepted, cut back to what was accepted when not; after
    a proposal wholly rejected, only a full n-gram match proposes again)."""

    def __init__(self, draft: list[int], valid: int, size: int):
        self.draft = draft
        self.out: list[int] = []
        self.pointer = 0           # the draft position the next written token is compared with
        self.valid = valid         # tokens in the cache that attention may see (its position counter)
        self.size = size           # tokens of the next proposal
        self.done = False

    def write(self, tokens: list[int], eos_id: int, max_new_tokens: int) -> None:
        for token in tokens:
            self.out.append(token)
            if token == eos_id or len(self.out) == max_new_tokens:
                self.done = True
                return

    def proposal(self, ngram: int, budget: int) -> list[int]:
        """The draft's continuation after the nearest occurrence (from the pointer on, else the last before it) of
        the last n written tokens, n = ngram down to 1 (only ngram after a rejection); at most budget tokens."""
        shortest = 1 if self.size else ngram
        for n in range(min(ngram, len(self.out)), shortest - 1, -1):
            tail = self.out[-n:]
            ends = [e for e in range(n, len(self.draft)) if self.draft[e - n:e] == tail]
            if ends:
                after = [e for e in ends if e >= self.pointer]
                self.pointer = after[0] if after else ends[-1]
                return self.draft[self.pointer:self.pointer + min(self.size or 2, budget)]
        return []

    def verified(self, proposed: int, accepted: int, lookahead: int) -> None:
        self.pointer += accepted
        if proposed:
            self.size = min(lookahead, 2 * max(1, self.size)) if accepted == proposed else accepted


def _verify_batch(model, prompts, drafts, eos_id, pad_id, max_new_tokens, lookahead, ngram, stats) -> list[list[int]]:
    device = next(model.parameters()).device
    backbone, head = model.get_decoder(), model.get_output_embeddings()
    cache = _new_cache(model)
    # 1. prompt + draft, left-padded: every row's draft positions end at the last column.
    width = max(len(p) + len(d) for p, d in zip(prompts, drafts))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, (p, d) in enumerate(zip(prompts, drafts)):
        input_ids[r, width - len(p) - len(d):] = torch.tensor(p + d)
        mask[r, width - len(p) - len(d):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    hidden = _forward(backbone, cache, input_ids, mask, positions, device)
    stats.passes += 1
    # The predictions after the prompt's last token and after each draft token.
    wanted = [(r, c) for r, d in enumerate(drafts) for c in range(width - len(d) - 1, width)]
    predicted = _greedy_tokens(head, hidden, wanted)
    rows, k = [], 0
    for r, (p, d) in enumerate(zip(prompts, drafts)):
        g = predicted[k:k + len(d) + 1]
        k += len(d) + 1
        accepted = next((j for j, (a, b) in enumerate(zip(g, d)) if a != b), len(d))
        row = _DraftRow(d, len(p) + accepted, 2)
        row.write(d[:accepted] + [g[accepted]], eos_id, max_new_tokens)
        row.pointer = accepted + 1   # past the draft token the prediction replaced
        stats.offered += len(d)
        stats.accepted += accepted
        mask[r, width - len(d) + accepted:] = 0          # the rejected draft tokens
        rows.append(row)
    finished: dict[int, list[int]] = {}
    active = list(range(len(rows)))
    # 2. The rows that did not finish, from their verified prefix on.
    while True:
        keep = [r for r in active if not rows[r].done]
        for r in active:
            if rows[r].done:
                finished[r] = rows[r].out
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor([active.index(r) for r in keep])
            cache.batch_select_indices(index.to(device))
            mask = mask[index]
            active = keep
        blocks = [[rows[r].out[-1]] + rows[r].proposal(ngram, max_new_tokens - len(rows[r].out) - 1)
                  for r in active]
        size = max(len(b) for b in blocks)
        input_ids = torch.full((len(active), size), pad_id, dtype=torch.long)
        new_mask = torch.zeros((len(active), size), dtype=torch.long)
        positions = torch.zeros((len(active), size), dtype=torch.long)
        for a, (r, block) in enumerate(zip(active, blocks)):
            input_ids[a, :len(block)] = torch.tensor(block)
            new_mask[a, :len(block)] = 1
            positions[a] = rows[r].valid + torch.arange(size)
        mask = torch.cat([mask, new_mask], dim=1)
        hidden = _forward(backbone, cache, input_ids, mask, positions, device)
        stats.passes += 1
        predicted = _greedy_tokens(head, hidden, [(a, c) for a, b in enumerate(blocks) for c in range(len(b))])
        k = 0
        for a, (r, block) in enumerate(zip(active, blocks)):
            g, proposal = predicted[k:k + len(block)], block[1:]
            k += len(block)
            accepted = next((j for j, (x, y) in enumerate(zip(g, proposal)) if x != y), len(proposal))
            rows[r].write(proposal[:accepted] + [g[accepted]], eos_id, max_new_tokens)
            rows[r].verified(len(proposal), accepted, lookahead)
            rows[r].valid += 1 + accepted
            stats.offered += len(proposal)
            stats.accepted += accepted
            mask[a, mask.shape[1] - size + 1 + accepted:] = 0   # the rejected proposal and the padding
    return [finished[r] for r in range(len(rows))]


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:   # transformers releases whose DynamicCache takes no config
        return DynamicCache()


def _forward(backbone, cache, input_ids, mask, positions, device) -> torch.Tensor:
    """The backbone's last hidden states for input_ids, appending their keys and values to cache."""
    out = backbone(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   use_cache=True, **{_cache_argument(type(backbone)): cache})
    return out.last_hidden_state


@functools.lru_cache
def _cache_argument(backbone_class) -> str:
    """transformers 5.x names the cache argument `cache`; earlier releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(backbone_class.forward).parameters else "past_key_values"


def _greedy_tokens(head, hidden: torch.Tensor, at: list[tuple[int, int]], chunk_elems: int = 1 << 24) -> list[int]:
    """argmax of the LM head's logits at the (row, column) positions of hidden, a chunk of positions at a time (at
    most chunk_elems logits), never the logits of every position."""
    if not at:
        return []
    rows = torch.tensor([r for r, _ in at], device=hidden.device)
    cols = torch.tensor([c for _, c in at], device=hidden.device)
    selected = hidden[rows, cols]
    chunk = max(1, chunk_elems // head.weight.shape[0])
    return torch.cat([head(part).argmax(-1) for part in selected.split(chunk)]).tolist()


def _sliding_window(model) -> int | None:
    """The attention window of a model whose cache keeps only its last tokens: masked slots would count in it."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types) \
            or getattr(config, "use_sliding_window", True) is False:
        return None
    return window
