"""Batched sampling from a causal LM with a KV cache: the rollout phase, the refiner's greedy pass and evaluation.

Prompts are strings (used as they are) or chat messages (formatted with the tokenizer's chat template). Batches are
left-padded for generate(); on CUDA the static cache lets transformers compile the decoding step. Elsewhere the
dynamic cache's causal layers take each decoded token in place (transformers' concatenate the whole cache at every
token), and a prompt that a batch repeats (a GRPO group's samples) is read once and its KV cache copied to its rows.
"""
from __future__ import annotations

import bisect
import copy
import functools
import inspect
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fastrft.loss import beyond_causal
from fastrft.rewards import is_prefilled


@dataclass
class Samples:
    prompt_ids: list[list[int]]      # one per sample (a prompt's ids repeated for each of its samples)
    completion_ids: list[list[int]]  # the generated tokens up to and including EOS, no padding
    texts: list[str]                 # the completions decoded without special tokens
    truncated: list[bool]            # stopped by max_new_tokens before an EOS


def first_occurrences(keys) -> list[int]:
    """For each key, the index of its first occurrence among keys: identical samples (a GRPO group's repeated
    answers) are computed once, at their first index, and copied to the others."""
    first_of: dict = {}
    return [first_of.setdefault(key, i) for i, key in enumerate(keys)]


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """Each prompt's token ids: a string with the tokenizer's special tokens (its BOS), chat messages through its
    chat template (the assistant's turn begun, or, where the last message is the assistant's, that one continued).
    A prompt of no tokens (an empty string, with a tokenizer that adds no BOS) is a ValueError: its first written
    token would have nothing to follow."""
    encoded: list = [None] * len(prompts)
    strings = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            strings.append(i)
        elif isinstance(prompt, list):
            # A last assistant message is the answer's beginning, which the model continues (as TRL does).
            prefilled = is_prefilled(prompt)
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=not prefilled,
                                                continue_final_message=prefilled, tokenize=True, return_dict=False)
            encoded[i] = list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
        else:
            raise ValueError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if strings:   # one call for all the strings: a fast tokenizer encodes them as one batch
        for i, ids in zip(strings, tokenizer([prompts[i] for i in strings], add_special_tokens=True)["input_ids"]):
            encoded[i] = ids
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"the prompt {prompts[empty[0]]!r} encodes to no tokens ({len(empty)} prompts do; the "
                         f"tokenizer adds no BOS token): the first token written would follow nothing; give every "
                         f"prompt some text")
    return encoded


def cache_implementation(device: torch.device):
    """transformers' KV cache for generate(): on CUDA the static cache, whose fixed shapes let transformers compile
    the decoding step; elsewhere the dynamic one, which grows only as far as the batch does."""
    return "static" if device.type == "cuda" else None


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a completion (the ones TRL stops at): the tokenizer's EOS first, then those of the model's
    generation config (an instruct model's end of turn: Gemma's <end_of_turn>, Llama 3's <|eot_id|>)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: generation could not stop")
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return list(dict.fromkeys([eos, *configured]))


def generate_passes(completion_ids: list[list[int]], batch_size: int) -> int:
    """The forward passes generate() made to write completion_ids (in its order, batch_size rows a batch): one per
    token of each batch's longest completion."""
    return sum(max(map(len, completion_ids[i:i + batch_size]), default=0)
               for i in range(0, len(completion_ids), batch_size))


def _ended(ids: list[int], stops) -> list[int]:
    """ids up to and including the first stop id (all of them where none comes)."""
    end = next((j for j, token in enumerate(ids) if token in stops), None)
    return ids if end is None else ids[:end + 1]


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, batch_size: int = 256,
             stop_ids: list[int] | None = None) -> Samples:
    """num_samples completions of each prompt (samples of one prompt are adjacent), each ended by the first of
    stop_ids (default: stop_token_ids(model, tokenizer)) or by max_new_tokens."""
    from transformers import GenerationConfig

    stops = stop_ids or stop_token_ids(model, tokenizer)
    pad_id = stops[0] if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    device = next(model.parameters()).device
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=None if greedy else temperature,
        top_p=None if greedy else top_p, top_k=None, eos_token_id=stops, pad_token_id=pad_id,
        cache_implementation=cache_implementation(device),
    )
    expanded = [ids for ids in prompt_ids for _ in range(num_samples)]
    samples = Samples([], [], [], [])
    with eval_mode(model):
        for start in range(0, len(expanded), batch_size):
            batch = expanded[start:start + batch_size]
            input_ids, attention_mask = left_padded(batch, pad_id)
            width = input_ids.shape[1]
            cache = None if gen_config.cache_implementation else _dynamic_cache(model, batch, input_ids,
                                                                                attention_mask, device)
            given = {} if cache is None else {_cache_argument(type(model.get_decoder())): cache}
            # synced_gpus=False: transformers would keep every rank of an FSDP job decoding in lockstep, for per-layer
            # all-gathers that fastrft's gathered weights (fastrft.distributed) never make.
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=gen_config, synced_gpus=False, **given)
            for ids, new in zip(batch, output[:, width:].tolist()):
                samples.prompt_ids.append(ids)
                samples.completion_ids.append(_ended(new, stops))
    return _with_texts(samples, tokenizer, stops)


def _dynamic_cache(model, batch: list[list[int]], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   device: torch.device):
    """The cache generate() goes on from where the model's attention is plain causal: its layers growing in place
    (_new_cache), holding the prompts' shared prefill where a prompt repeats (_shared_prompts_cache); else None, for
    generate() to make its own."""
    if beyond_causal(model) is not None or not _builds_dynamic_cache(model):
        return None
    cache = _new_cache(model)
    # Its layers are made from the model's config (or appended as they fill): anything but plain causal ones, or a
    # release whose cache has no layers, is left to generate().
    if any(type(layer) is not _growing_layer_class() for layer in getattr(cache, "layers", [None])):
        return None
    return _shared_prompts_cache(model, cache, batch, input_ids, attention_mask, device) or cache


def _builds_dynamic_cache(model) -> bool:
    """Whether transformers' generate() would give the model a DynamicCache of its own: not where the model keeps
    another kind (recurrent states: xLSTM, RWKV) or its generation config names a cache implementation (generate()
    refuses a cache handed to it beside one)."""
    supported = getattr(type(model), "_supports_default_dynamic_cache", None)
    if supported is not None and not supported():
        return False
    # transformers' generate() reads "hybrid" as no implementation at all.
    return getattr(getattr(model, "generation_config", None), "cache_implementation", None) in (None, "hybrid")


def _shared_prompts_cache(model, cache, batch: list[list[int]], input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, device: torch.device):
    """cache (empty, plain causal layers: _dynamic_cache) filled with the left-padded batch's prompts but their last
    column, each distinct prompt read once and copied to its rows (a GRPO group's samples share their prompt: the
    prefill would read it once per sample), for generate() to go on from; None where no prompt repeats or the
    prompts are one token wide."""
    first = first_occurrences(tuple(ids) for ids in batch)
    distinct = sorted(set(first))
    if len(distinct) == len(batch) or input_ids.shape[1] < 2:
        return None
    mask = attention_mask[distinct, :-1]
    # The positions generate() gives left-padded rows: counting from each row's first token.
    _forward(model.get_decoder(), cache, input_ids[distinct, :-1], mask, (mask.cumsum(1) - 1).clamp(min=0), device)
    slot = {row: k for k, row in enumerate(distinct)}
    return _cache_rows(cache, torch.tensor([slot[f] for f in first]))


@contextmanager
def eval_mode(model):
    """model in eval mode for the block, every module of it: after, the modules that were training train again (all
    of them through model.train(), which transformers' models need: it re-selects the hub kernels' mode). A model
    in eval mode whose adapters train (PEFT injects them training into a base model in eval mode) is not in eval
    mode: their dropout would draw. A frozen reference, all in eval mode, passes through."""
    modules = list(model.modules())
    training = [m for m in modules if m.training]
    if training:
        model.eval()
    try:
        yield model
    finally:
        if len(training) == len(modules):
            model.train()
        else:
            for module in training:
                module.training = True


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows as one [len(rows), longest] tensor of ids, each row's ids ending at the last column, and its attention
    mask (1 on the ids, 0 on the padding before them); one copy of all the ids, not one per row."""
    lengths = torch.tensor([len(ids) for ids in rows])
    width = int(lengths.max())
    mask = torch.arange(width)[None] >= width - lengths[:, None]
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    input_ids[mask] = torch.tensor([t for ids in rows for t in ids], dtype=torch.long)   # row-major: rows in order
    return input_ids, mask.long()


def _with_texts(samples: Samples, tokenizer, stops) -> Samples:
    """samples with truncated (no stop id ended it) and texts (decoded in one batch) filled in from their
    completions."""
    samples.truncated = [not completion or completion[-1] not in stops for completion in samples.completion_ids]
    samples.texts = tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)
    return samples


# ----------------------------------------------------------------------------------------------- drafts

@dataclass
class DraftStats:
    passes: int = 0          # forward passes of the model
    prefix_passes: int = 0   # of those, passes over the common beginnings of prompts (no token written)
    offered: int = 0         # draft tokens put up for verification
    accepted: int = 0        # of those, tokens the greedy decoding confirmed
    plain_rows: int = 0      # rows decoded without drafts (attention beyond a causal mask)


@torch.no_grad()
def greedy_from_drafts(model, tokenizer, prompt_ids: list[list[int]], drafts: list[list[int]], *,
                       max_new_tokens: int, batch_size: int = 256, first_block: int = 16, lookahead: int = 512,
                       ngram: int = 3, share_prefixes: bool = True,
                       stop_ids: list[int] | None = None) -> tuple[Samples, DraftStats]:
    """The greedy completion of each prompt, token for token what generate(..., greedy=True) writes, with drafts[i]
    (a guess of completion i, such as the response a refiner corrects) verified instead of decoded:

      1. One forward pass over each prompt and the first `first_block` tokens of its draft (left-padded, rows
         bucketed by length): the greedy prediction at each draft position accepts the draft's longest matching
         prefix, and the prediction after it is the next token. Where prompts begin alike (share_prefixes; the
         refiner's templates of one prompt's samples), each common beginning is read once, in a pass before it,
         and its cache copied to its rows (_shared_prefixes says when that pays).
      2. Then each pass feeds every unfinished row's last token and a block of proposed draft tokens, verified the
         same way, from the KV cache of what is verified. While a row's draft is accepted, the block it asks for
         doubles (up to `lookahead`). After a change, the row re-aligns with its draft: past a one-token edit
         (substitution, insertion or deletion), else where the last `ngram` (down to 1) written tokens occur in the
         draft, the draft's continuation from there is proposed (prompt-lookup decoding), 2 tokens asked for at
         first, cut back on a rejection (_DraftRow says how far).
         The pass's block is as long as the rows trusting their drafts most ask; the others fill it with their
         drafts where that pays (_next_blocks, _fills_blocks).
    A row whose draft holds (its EOS included) finishes in about log2(len(draft) / first_block) + 1 passes, a row
    whose draft is useless decodes one token a pass, as generate() does. Rejected tokens stay in the cache, masked
    out of attention, so that every row of the batch keeps one cache length (transformers' dynamic cache, any causal
    LM), until the cache is compacted. A stop id (stop_ids, as generate() takes them) and max_new_tokens end a row
    as in generate(). A model whose attention
    goes beyond a causal mask (fastrft.loss.beyond_causal: a sliding window's cache drops slots by count) is decoded
    plainly. Returns the completions (as generate's
    Samples) and what the drafts saved (DraftStats)."""
    if len(prompt_ids) != len(drafts):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(drafts)} drafts")
    if max_new_tokens < 1:   # (generate() refuses it too: a row would never reach its limit)
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    empty = [i for i, ids in enumerate(prompt_ids) if not ids]
    if empty:
        raise ValueError(f"prompt {empty[0]} is empty ({len(empty)} empty prompts): greedy decoding continues a "
                         "prompt's last token")
    stops = stop_ids or stop_token_ids(model, tokenizer)
    pad_id = stops[0] if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    stats = DraftStats()
    completions: list[list[int] | None] = [None] * len(prompt_ids)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(drafts[i]))
    sliding = beyond_causal(model) is not None
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            if sliding:
                plain = generate(model, tokenizer, [prompt_ids[i] for i in batch], max_new_tokens=max_new_tokens,
                                 greedy=True, batch_size=batch_size, stop_ids=stops)
                for i, ids in zip(batch, plain.completion_ids):
                    completions[i] = ids
                stats.plain_rows += len(batch)
                stats.passes += generate_passes(plain.completion_ids, batch_size)
                continue
            for i, ids in zip(batch, _verify_batch(model, [prompt_ids[i] for i in batch],
                                                   [drafts[i][:max_new_tokens] for i in batch], frozenset(stops),
                                                   pad_id,
                                                   max_new_tokens, first_block, lookahead, ngram, stats,
                                                   share_prefixes)):
                completions[i] = ids
    return _with_texts(Samples(list(prompt_ids), completions, [], []), tokenizer, stops), stats


class _DraftRow:
    """One row's decoding state: what it has written, where its draft is aligned, what its cache holds, and how many
    draft tokens it asks the next block for (its trust, `size`): doubling while they are accepted; when not, cut
    back to what was accepted, or only halved where the row's drafts have held for long runs between changes (a few
    edits in a long answer: the next change is as far away), at least 2 after the first block. In step with its
    draft (its last token the draft's), it proposes the draft's continuation; one edit away (a substitution, an
    insertion or a deletion: proposal says how it tells), the draft's continuation after the edit; else it
    re-aligns, on evidence that grows as its trust falls: a 1-gram match from 4 tokens on, a 2-gram below, a full
    n-gram at 0, and then it asks for nothing, proposing only into a block that other rows make longer, or on a
    probe pass."""

    def __init__(self, draft: list[int], ngram: int, size: int):
        self.draft = draft
        self.out: list[int] = []
        self.pointer = 0           # the draft position the next written token is compared with
        self.valid = 0             # tokens in the cache that attention may see (its position counter)
        self.size = size           # tokens of the next proposal
        self.done = False
        self.accepted = 0          # draft tokens accepted so far
        self.changes = 0           # proposals rejected so far
        self.rejected = False      # whether the last written token replaced a proposed one
        self.guessing = False      # whether the proposal out for verification guesses a substitution
        self.guess_failed = False  # whether the last one did and was rejected: the edit is not a substitution
        self.failed_start = None   # the draft position of the last proposal rejected at its first token
        self.dead_end = None       # ... if the one before was too: never proposed from again while it is
        self.ngram = ngram
        self._ends: dict[tuple, list[int]] | None = None

    @property
    def ends(self) -> dict[tuple, list[int]]:
        """n-gram -> the draft positions right after each of its occurrences, in order; built on first use (a row
        whose draft holds never re-aligns)."""
        if self._ends is None:
            self._ends = {}
            for n in range(1, self.ngram + 1):
                for end in range(n, len(self.draft)):
                    self._ends.setdefault(tuple(self.draft[end - n:end]), []).append(end)
        return self._ends

    def write(self, tokens: list[int], stops: frozenset[int], max_new_tokens: int) -> None:
        for token in tokens:
            self.out.append(token)
            if token in stops or len(self.out) == max_new_tokens:
                self.done = True
                return

    def proposal(self, limit: int) -> list[int]:
        """At most limit tokens of the draft: its continuation from the pointer where the last written token is the
        draft's before it (in step); else from one position further or back where it is the draft's there (one edit
        away: the draft's token at the pointer was an extra one, or the refiner inserted one before it, learnt the
        pass after it guessed a substitution); else, right after a rejected proposal that was not itself such a
        guess, from the pointer (the written token a substitution for the draft's); else after the nearest occurrence
        (from the pointer on, else the last before it) of the last n written tokens, n = ngram down to the shortest
        the row's trust allows. Never from the draft's end (nothing to propose: the row re-aligns), nor from a dead
        end: where a completion repeats a token, the one-edit check would pull the row back to it every pass."""
        if limit <= 0:
            return []
        for at in (self.pointer, self.pointer + 1, self.pointer - 1):   # in step, then one edit away
            if 0 < at < len(self.draft) and at != self.dead_end and self.out[-1] == self.draft[at - 1]:
                self.pointer = at
                return self.draft[at:at + limit]
        if self.rejected and not self.guess_failed:   # the written token replaced the draft's: the likeliest edit
            self.guessing = True
            return self.draft[self.pointer:self.pointer + limit]
        ngram = self.ngram
        shortest = 1 if self.size >= 4 else min(2, ngram) if self.size else ngram
        for n in range(min(ngram, len(self.out)), shortest - 1, -1):
            ends = self.ends.get(tuple(self.out[-n:]))
            if ends:
                at = bisect.bisect_left(ends, self.pointer)
                start = ends[at] if at < len(ends) else ends[-1]
                if start != self.dead_end:
                    self.pointer = start
                    return self.draft[start:start + limit]
        return []

    def verified(self, proposed: int, accepted: int, lookahead: int) -> None:
        # The token written after the accepted ones stands for the next draft position: the draft's own token, or
        # (after a rejection) the most likely edit, its replacement.
        if proposed:
            start = None if accepted else self.pointer
            self.dead_end = start if start is not None and start == self.failed_start else None
            self.failed_start = start
        self.pointer += accepted + 1
        self.accepted += accepted
        self.rejected = accepted < proposed
        self.guess_failed, self.guessing = self.guessing and self.rejected, False
        if proposed and accepted == proposed:
            self.size = min(lookahead, 2 * max(1, self.size))
        elif proposed:
            self.changes += 1
            self.size = max(accepted, min(self.size // 2, self.accepted // self.changes))


def _verify_batch(model, prompts, drafts, stops, pad_id, max_new_tokens, first_block, lookahead, ngram, stats,
                  share_prefixes: bool = True, probe_every: int = 16) -> list[list[int]]:
    device = next(model.parameters()).device
    backbone, head = model.get_decoder(), model.get_output_embeddings()
    fill = _fills_blocks(model)
    # 1. prompt + the draft's first block, left-padded: every row's block positions end at the last column, rows of
    # like lengths in a pass of their own (_length_buckets). Where prompts begin alike, their common beginnings go
    # first, once each, in a pass of their own.
    blocks = [d[:first_block] for d in drafts]
    shared = _shared_prefixes(prompts) if share_prefixes else None
    if shared is None:
        read = [0] * len(prompts)
    else:
        cluster_of, prefixes = shared
        prefix_cache = _new_cache(model)
        input_ids, prefix_mask = left_padded(prefixes, pad_id)
        _forward(backbone, prefix_cache, input_ids, prefix_mask, (prefix_mask.cumsum(1) - 1).clamp(min=0), device)
        stats.passes += 1
        stats.prefix_passes += 1
        read = [len(prefixes[c]) for c in cluster_of]
    rests = [p[n:] + b for p, n, b in zip(prompts, read, blocks)]
    rows: list[_DraftRow] = [None] * len(prompts)
    parts = []   # each bucket's (cache, mask, rows)
    for bucket in _length_buckets([len(rest) for rest in rests]):
        if shared is None:
            cache, mask = _new_cache(model), torch.zeros((len(bucket), 0), dtype=torch.long)
        else:   # each row its cluster's copy
            clusters = torch.tensor([cluster_of[r] for r in bucket])
            cache, mask = _cache_rows(prefix_cache, clusters), prefix_mask[clusters]
        input_ids, rest_mask = left_padded([rests[r] for r in bucket], pad_id)
        positions = torch.tensor([read[r] for r in bucket])[:, None] + (rest_mask.cumsum(1) - 1).clamp(min=0)
        mask = torch.cat([mask, rest_mask], dim=1)
        hidden = _forward(backbone, cache, input_ids, mask, positions, device)
        stats.passes += 1
        # The predictions after the prompt's last token and after each block token.
        width = hidden.shape[1]
        block_lengths = torch.tensor([len(blocks[r]) for r in bucket])
        read_at = torch.arange(width)[None] >= width - 1 - block_lengths[:, None]
        predicted = _greedy_tokens(head, hidden[read_at.to(hidden.device)]).tolist()
        k = 0
        for a, r in enumerate(bucket):
            b = blocks[r]
            g = predicted[k:k + len(b) + 1]
            k += len(b) + 1
            accepted = next((j for j, (x, y) in enumerate(zip(g, b)) if x != y), len(b))
            row = rows[r] = _DraftRow(drafts[r], ngram, len(b))
            row.valid = len(prompts[r]) + accepted
            row.write(b[:accepted] + [g[accepted]], stops, max_new_tokens)
            row.verified(len(b), accepted, lookahead)
            if accepted < len(b):
                row.size = max(2, row.size)   # a first change, perhaps a local one: re-align and try the draft again
            stats.offered += len(b)
            stats.accepted += accepted
            mask[a, mask.shape[1] - len(b) + accepted:] = 0          # the rejected block tokens
        parts.append((cache, mask, bucket))
    cache, mask, active = parts[0] if len(parts) == 1 else _merged(parts, rows)
    # 2. The rows that did not finish, from their verified prefix on. `active` maps cache rows to rows; finished
    # rows feed masked padding until the next compaction drops them (and the masked slots, where that pays).
    probe_gap = next_probe = probe_every
    while not all(rows[r].done for r in active):
        drop_rows, drop_slots = _worth_compacting([rows[r] for r in active], mask.shape[1])
        if drop_rows or drop_slots:
            keep = torch.tensor([a for a, r in enumerate(active) if not rows[r].done])
            if drop_slots:
                mask = _compact(cache, mask, keep)
            else:   # selecting rows copies less than gathering each one's slots
                _select_cache(cache, keep)
                mask = mask[keep]
            active = [active[a] for a in keep.tolist()]
        probe = stats.passes >= next_probe
        distrusting = [r for r in active if not rows[r].done and rows[r].size == 0] if probe else []
        blocks = _next_blocks([rows[r] for r in active], max_new_tokens, probe=probe, fill=fill)
        size = max(len(b) for b in blocks)
        lengths = torch.tensor([len(b) for b in blocks])
        filled = torch.arange(size)[None] < lengths[:, None]
        input_ids = torch.full((len(active), size), pad_id, dtype=torch.long)
        input_ids[filled] = torch.tensor([t for b in blocks for t in b], dtype=torch.long)
        positions = torch.tensor([rows[r].valid for r in active])[:, None] + torch.arange(size)
        mask = torch.cat([mask, filled.long()], dim=1)
        hidden = _forward(backbone, cache, input_ids, mask, positions, device)
        stats.passes += 1
        # Each row's predictions after its block's tokens, and how many of its proposed tokens they confirm in a row.
        predicted = torch.zeros((len(active), size), dtype=torch.long)
        predicted[filled] = _greedy_tokens(head, hidden[filled.to(hidden.device)])
        accepted = ((predicted[:, :-1] == input_ids[:, 1:]) & filled[:, 1:]).cumprod(1).sum(1)
        for r, block, g, a in zip(active, blocks, predicted.tolist(), accepted.tolist()):
            if block:
                proposal = block[1:]
                rows[r].write(proposal[:a] + [g[a]], stops, max_new_tokens)
                rows[r].verified(len(proposal), a, lookahead)
                rows[r].valid += 1 + a
                stats.offered += len(proposal)
                stats.accepted += a
        # The rejected proposals and the padding leave attention: a row keeps its last token and what it accepted.
        mask[:, -size:] = torch.arange(size)[None] < torch.where(lengths > 0, 1 + accepted, 0)[:, None]
        if probe:   # a probe that won no distrusting row back (its whole probe accepted) waits twice as long
            probe_gap = probe_every if any(rows[r].size >= 2 for r in distrusting) else 2 * probe_gap
            next_probe = stats.passes + probe_gap
    return [row.out for row in rows]


def _next_blocks(rows: list[_DraftRow], max_new_tokens: int, probe: bool, fill: bool = True) -> list[list[int]]:
    """Each row's last token and its proposal; [] for finished rows. The block is as long as the proposals its rows'
    trust asks for (their sizes), those of at least a quarter of them (one row's long proposal must not multiply
    every row's compute), or a probe's 3 (every probe_every passes, the gap doubling while probes win no row back).
    A row that asks for nothing fills the block with as much of its draft as it can, and so does every row where
    `fill` (_fills_blocks): the padding would cost the pass's layers as much. A row the refiner has just corrected
    that guesses where its draft goes on past the edit (a substitution: _DraftRow.proposal) proposes into the block
    but does not lengthen it: a long guess would widen every row's pass. Back in step, one edit away or re-aligned
    on its last tokens, it does."""
    room = [max_new_tokens - len(row.out) - 1 for row in rows]
    # No block outgrows the largest ask or a probe's: no proposal needs more of its draft (a slice a row per pass).
    reach = max([2] + [row.size for row in rows if not row.done])
    proposals = [row.proposal(min(left, reach if fill else row.size)) if row.size and not row.done else None
                 for row, left in zip(rows, room)]
    lengths = sorted((min(len(p), row.size) for row, p in zip(rows, proposals) if p is not None and not row.guessing),
                     reverse=True)
    quarter = (len(rows) - 1) // 4
    size = max(1 + (lengths[quarter] if len(lengths) > quarter else 0), 3 if probe else 1)
    blocks = []
    for row, proposal, left in zip(rows, proposals, room):
        limit = min(size - 1, left)
        if row.done:
            blocks.append([])
        elif proposal is not None:
            blocks.append([row.out[-1]] + proposal[:limit if fill else min(limit, row.size)])
        else:
            blocks.append([row.out[-1]] + row.proposal(limit))
    return blocks


def _fills_blocks(model) -> bool:
    """Whether rows fill the verification blocks with their drafts beyond what they ask for: where the LM head costs a
    position less than the layers do. A padded position costs the layers, a filled one the head too (its prediction
    is read), so a filled token pays for itself if it is accepted at least half the time; a small model's large
    vocabulary (a few layers of Qwen2.5-0.5B's width: the head is 2.3x the layers) would not be paid for."""
    head = model.get_output_embeddings().weight.numel()
    layers = sum(p.numel() for p in model.get_decoder().parameters()) - model.get_input_embeddings().weight.numel()
    return head <= layers


def _worth_compacting(rows: list[_DraftRow], width: int, share: float = 0.25) -> tuple[bool, bool]:
    """Whether to drop the cache's finished rows (a quarter of its rows are) and whether to drop its masked slots
    too (that would shorten its `width` by a quarter, _compact): both cost every later pass their share of compute.
    A row's unmasked slots are its `valid` tokens."""
    longest_row = max((row.valid for row in rows if not row.done), default=0)
    return sum(row.done for row in rows) >= share * len(rows), longest_row <= (1 - share) * width


def _compact(cache, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Keep the cache's `rows`, each with only its unmasked slots (in order, gathered to the front; shorter rows
    padded with masked slots), and return the new mask. Attention does not care where a cached slot sits: its
    position is in its keys, and the causal mask only orders the new tokens after every cached one."""
    valid = mask[rows].bool()
    width = int(valid.sum(1).max())
    columns = torch.arange(mask.shape[1])
    order = torch.argsort(torch.where(valid, columns, columns + mask.shape[1]), dim=1)[:, :width]
    _select_cache(cache, rows, order)
    return valid.gather(1, order).long()


def _length_buckets(lengths: list[int], min_saving: float = 0.25, min_tokens: int = 1024) -> list[list[int]]:
    """The rows (indices of lengths) in groups of like length, each read in a left-padded pass of its own: sorted by
    length, a group is cut in two where that saves the most padding, if it saves at least min_saving of the group's
    padded tokens (rows x its longest row) and min_tokens, and its parts likewise. Padding costs a pass as much as
    real tokens where passes are compute-bound (a CPU, a long prefill); a cut costs one more pass, whose fixed cost
    (its kernel launches, its Python) small savings do not repay, and merging the caches."""
    buckets, groups = [], [sorted(range(len(lengths)), key=lengths.__getitem__)] if lengths else []
    while groups:
        group = groups.pop()
        longest = lengths[group[-1]]
        # Cut before group[i]: the first i rows padded to the longest of them instead of the group's longest.
        saving, cut = max(((i * (longest - lengths[group[i - 1]]), i) for i in range(1, len(group))), default=(0, 0))
        if saving >= max(1, min_tokens, min_saving * len(group) * longest):
            groups += [group[cut:], group[:cut]]
        else:
            buckets.append(group)
    return buckets


def _merged(parts: list[tuple], rows: list[_DraftRow]) -> tuple:
    """The buckets' (cache, mask, rows) as one holding only their unfinished rows, each row's unmasked slots gathered
    to its front (_compact) and shorter caches padded with masked slots; (None, None, []) where every row finished."""
    kept = []
    for cache, mask, bucket in parts:
        keep = [a for a, r in enumerate(bucket) if not rows[r].done]
        if keep:
            kept.append((cache, _compact(cache, mask, torch.tensor(keep)), [bucket[a] for a in keep]))
    if not kept:
        return None, None, []
    width = max(mask.shape[1] for _, mask, _ in kept)
    pad = torch.nn.functional.pad
    merged = kept[0][0]
    for i, layer in enumerate(merged.layers):
        for name in ("keys", "values"):
            setattr(layer, name, torch.cat([pad(getattr(cache.layers[i], name), (0, 0, 0, width - mask.shape[1]))
                                            for cache, mask, _ in kept]))
    return (merged, torch.cat([pad(mask, (0, width - mask.shape[1])) for _, mask, _ in kept]),
            [r for _, _, bucket in kept for r in bucket])


def _cache_rows(cache, rows: torch.Tensor):
    """A new cache holding cache's `rows` (a row may come several times), cache left as it is."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    _select_cache(out, rows)
    return out


def _select_cache(cache, rows: torch.Tensor, columns: torch.Tensor | None = None) -> None:
    """The cache's `rows` (a row may come several times: rows that share a prefix), and of each row only the slots
    in its row of `columns` (a [len(rows), width] index) where given."""
    for layer in cache.layers:
        device = layer.keys.device
        rows_d = rows.to(device)
        index = None if columns is None else columns.to(device)[:, None, :, None]
        for name in ("keys", "values"):
            kept = getattr(layer, name)[rows_d]
            if index is not None:
                kept = kept.gather(2, index.expand(-1, kept.shape[1], -1, kept.shape[3]))
            setattr(layer, name, kept)


def _shared_prefixes(prompts: list[list[int]], min_shared: int = 4,
                     min_saving: float = 0.25) -> tuple[list[int], list[list[int]]] | None:
    """Clusters of prompts that begin alike (the refiner's templates of one prompt's samples, which may share a
    system prompt with every other row too): each row's cluster and each cluster's common beginning, read once in a
    pass of its own and copied to its rows in the cache. Sorted by their ids, the rows form a tree of common
    beginnings; a run of rows is one cluster (its members but one, times the shortest common beginning between
    neighbours, read once) where that saves more than its sub-runs do, split where the common beginning is shortest,
    and at least min_shared tokens. A cluster's beginning stops before its shortest prompt's last token, and a prompt
    alone puts all but its last token in that pass too, so that the second pass is as wide as the rows' rests, not
    as their whole prompts. None where the clusters would save less than min_saving of the prompts' tokens: the
    extra pass and the copy would cost more."""
    order = sorted(range(len(prompts)), key=prompts.__getitem__)
    common = [_common_length(prompts[a], prompts[b]) for a, b in zip(order, order[1:])]
    # The runs of order, children before their parent (an explicit stack: a chain of nested prompts is as deep as
    # the batch is long): each run's best clusters, as (tokens read once, [(lo, hi, beginning)]).
    best: dict[tuple[int, int], tuple[int, list[tuple[int, int, int]]]] = {}
    stack = [(0, len(order), False)]
    while stack:
        lo, hi, children_done = stack.pop()
        if hi - lo == 1:
            best[lo, hi] = 0, [(lo, hi, max(0, len(prompts[order[lo]]) - 1))]
            continue
        least = min(common[lo:hi - 1])
        cuts = [lo] + [i + 1 for i in range(lo, hi - 1) if common[i] == least] + [hi]
        parts = list(zip(cuts, cuts[1:]))
        if not children_done:
            stack.append((lo, hi, True))
            stack += [(a, b, False) for a, b in parts]
            continue
        split_saving = sum(best[part][0] for part in parts)
        if least >= min_shared and (hi - lo - 1) * least >= split_saving:
            best[lo, hi] = (hi - lo - 1) * least, [(lo, hi, least)]
        else:
            best[lo, hi] = split_saving, [c for part in parts for c in best[part][1]]
    saving, found = best[0, len(order)]
    if saving == 0 or saving < min_saving * sum(map(len, prompts)):
        return None
    cluster_of = [0] * len(prompts)
    for c, (lo, hi, _) in enumerate(found):
        for r in order[lo:hi]:
            cluster_of[r] = c
    return cluster_of, [prompts[order[lo]][:length] for lo, _, length in found]


def _common_length(a: list[int], b: list[int]) -> int:
    """How many tokens a and b begin with alike, at most the shorter one's length - 1 (binary search over slices:
    a long template's comparison runs in C)."""
    lo, hi = 0, max(0, min(len(a), len(b)) - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _new_cache(model):
    """transformers' dynamic cache for model, its plain causal layers (DynamicLayer) growing in place
    (_growing_layer_class); the others (a sliding window, recurrent state) as transformers makes them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:   # transformers releases whose DynamicCache takes no config
        cache = DynamicCache()
    growing = _growing_layer_class()
    for layer in getattr(cache, "layers", []):
        if type(layer) is DynamicLayer:
            layer.__class__ = growing   # the layer as transformers made it (its attributes kept), growing in place
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:   # layers made as they fill
        cache.layer_class_to_replicate = growing
    return cache


@functools.cache
def _growing_layer_class():
    """A subclass of transformers' DynamicLayer whose keys and values live in buffers with room to grow: a decoded
    token is written in place, where DynamicLayer's torch.cat copies the whole cache at every step, which on the CPU
    costs decoding about as much as attention does. keys and values are views of the buffers' filled part. Where
    anything else replaces them (rows selected, slots compacted, a crop), the layer lets its buffers go at once and
    takes the new keys and values into fresh ones at its next small update (a few tokens next to what it holds:
    decoding); a wide one (a prefill, a verification block) on a layer without buffers is concatenated as
    DynamicLayer does, contiguous, as attention reads it fastest. Defined on first use: transformers is imported
    lazily."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        _layer_type = None   # never registered in transformers' layer-type mappings
        _buffers = _views = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            length = self.keys.shape[-2] if self.keys.dim() == key_states.dim() else 0
            filled = length + key_states.shape[-2]
            ours = self._buffers is not None   # (dropped whenever keys or values are replaced: __setattr__)
            if not ours and 8 * key_states.shape[-2] > length:
                self._buffers = self._views = None
                return super().update(key_states, value_states, *args, **kwargs)
            if not ours or filled > self._buffers[0].shape[-2]:
                capacity = filled + max(filled // 2, 16)   # amortised: each slot copied a few times at most
                self._buffers = tuple(_with_room(old, new, length, capacity)
                                      for old, new in ((self.keys, key_states), (self.values, value_states)))
            for buffer, new in zip(self._buffers, (key_states, value_states)):
                buffer[..., length:filled, :] = new
            self._views = tuple(buffer[..., :filled, :] for buffer in self._buffers)
            self.keys, self.values = self._views
            return self.keys, self.values

        def __setattr__(self, name, value):
            # Keys or values replaced from outside: the buffers go now, not at the next update (a compacted cache
            # must not hold its old rows meanwhile).
            if name in ("keys", "values") and self._views is not None \
                    and value is not self._views[name == "values"]:
                super().__setattr__("_buffers", None)
                super().__setattr__("_views", None)
            super().__setattr__(name, value)

        def __copy__(self):   # a copy never writes into the original's buffers: it makes its own on update
            out = type(self).__new__(type(self))
            out.__dict__.update(self.__dict__)
            out._buffers = out._views = None
            return out

    return GrowingLayer


def _with_room(old: torch.Tensor, new: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    """A [*new.shape[:-2], capacity, new.shape[-1]] buffer holding old's first `length` slots."""
    buffer = new.new_empty((*new.shape[:-2], capacity, new.shape[-1]))
    if length:
        buffer[..., :length, :] = old
    return buffer


def _forward(backbone, cache, input_ids, mask, positions, device) -> torch.Tensor:
    """The backbone's last hidden states for input_ids, appending their keys and values to cache."""
    out = backbone(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   use_cache=True, **{_cache_argument(type(backbone)): cache})
    return out.last_hidden_state


@functools.lru_cache
def _cache_argument(backbone_class) -> str:
    """transformers 5.x names the cache argument `cache`; earlier releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(backbone_class.forward).parameters else "past_key_values"


def _greedy_tokens(head, states: torch.Tensor, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """argmax of the LM head's logits for each of the hidden `states` ([positions, hidden]: the positions whose
    prediction is read, never every position's), a chunk of positions at a time (at most chunk_elems logits)."""
    chunk = max(1, chunk_elems // head.weight.shape[0])
    return torch.cat([head(part).argmax(-1) for part in states.split(chunk)]).cpu()
