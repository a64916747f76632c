"""The online refiner: the frozen reference model writes a minimally corrected version of each sampled response,
and the tokens it changed become refined-target cross-entropy rows of the loss.

For each sample: the refinement template (holding the prompt and the response) is continued greedily by the
reference model; the task's parser extracts the corrected response; it is tokenised and diffed against the sample
(fastrft.diff_masks); changed tokens get `changed_weight` (fastrft.diff_weights). A refinement that changes nothing
costs nothing further; each one is cut after its last weighted token. An empty, unparseable or too long refinement
gives its sample no constraint and is counted as failed.

A minimal correction copies most of the response, so the response (and EOS) is the draft of the greedy continuation
(draft=True, the default): fastrft.rollout.greedy_from_drafts verifies it in one batched forward pass and decodes
only from the first token the refiner changes, re-aligning with the draft as it goes. The result is the plain greedy
continuation, token for token (draft=False decodes it with generate(), the reference path); when the policy writes
well, the refiner costs one forward pass.

Identical samples of one prompt (frequent in a GRPO group once the policy settles on an answer) have one greedy
refinement: it is written once and copied to each of them.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field, replace

import torch

from fastrft import rollout
from fastrft.diff import diff_masks, diff_weights
from fastrft.rewards import is_prefilled, message_text


@dataclass
class Refinement:
    refined_ids: list[int]           # the corrected response's tokens, cut after the last weighted one
    sft_weights: torch.Tensor        # float32 [len(refined_ids)]
    changed: int                     # tokens the refiner inserted or substituted


@dataclass
class RefineResult:
    refinements: list[Refinement | None]   # one per sample; None: unchanged or failed (no constraint)
    failed: int = 0                        # empty, unparseable or too long
    unchanged: int = 0
    changed_samples: int = 0               # samples the refiner changed (weighted in the loss or not)
    changed_tokens: int = 0
    refined_tokens: int = 0                # tokens of all parsed refinements
    failures: dict = field(default_factory=dict)   # reason -> count
    passes: int = 0                        # forward passes of the refiner
    copies: int = 0                        # samples identical to an earlier one, given its refinement unwritten
    draft: rollout.DraftStats | None = None   # what the drafts saved (draft=True)

    @classmethod
    def merged(cls, parts: list[RefineResult]) -> RefineResult:
        """Several results (the ranks' of one step, run side by side) as one: refinements in order, counts summed,
        forward passes the most any part made (the step waited for that one)."""
        out = cls(refinements=[r for part in parts for r in part.refinements])
        for part in parts:
            for name in ("failed", "unchanged", "changed_samples", "changed_tokens", "refined_tokens", "copies"):
                setattr(out, name, getattr(out, name) + getattr(part, name))
            out.passes = max(out.passes, part.passes)
            for reason, count in part.failures.items():
                out.failures[reason] = out.failures.get(reason, 0) + count
            if part.draft is not None:
                out.draft = out.draft or rollout.DraftStats()
                for name in ("offered", "accepted", "plain_rows"):
                    setattr(out.draft, name, getattr(out.draft, name) + getattr(part.draft, name))
                for name in ("passes", "prefix_passes"):
                    setattr(out.draft, name, max(getattr(out.draft, name), getattr(part.draft, name)))
        return out

    @property
    def draft_accepted(self) -> float | None:
        """The fraction of the draft tokens offered that the refiner's greedy decoding accepted; None without drafts
        or where none was offered."""
        return None if self.draft is None or not self.draft.offered else self.draft.accepted / self.draft.offered

    @property
    def changed_token_frac(self) -> float | None:
        """The share of the refinements' tokens that differ from their samples; None where no refinement was parsed
        (every one failed: nothing was measured, which 0 would read as "every token kept")."""
        return self.changed_tokens / self.refined_tokens if self.refined_tokens else None


def check_refine_template(template) -> None:
    """A ValueError unless template is a str.format template whose fields are {response} and, optionally, {prompt}
    (the refiner would see no response, or the template would fail at the first refinement)."""
    if not isinstance(template, str):
        raise ValueError(f"refine_template must be a string, got {template!r}")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:   # a lone brace
        raise ValueError(f"refine_template {template!r} is not a str.format template ({e}; write a literal brace "
                         f"as {{{{ or }}}})") from None
    if "response" not in fields or not fields <= {"prompt", "response"}:
        raise ValueError(f"refine_template must be a str.format template whose fields are {{prompt}} (optional) and "
                         f"{{response}}, got the fields {sorted(fields)} in {template!r}")


def prompt_text(prompt) -> str:
    """What the refiner's template shows as {prompt}: a string prompt; of chat messages, the last user message's
    text (its typed parts' texts joined)."""
    if isinstance(prompt, str):
        return prompt
    return message_text(next((m["content"] for m in reversed(prompt) if m.get("role") == "user"),
                             prompt[-1]["content"]))


def check_refinable(prompts: list, source: str, without_refiner: str, places: list[str] | None = None) -> None:
    """A ValueError naming source (or the prompt's own place, from places: "data.jsonl:12") unless the refiner can
    rewrite each prompt's answer whole: a chat prompt whose last message is the assistant's (an answer's beginning,
    which the policy continues) cannot be (the refinement would start the answer again after it). without_refiner:
    the caller's setting that trains without the refiner."""
    at = next((i for i, p in enumerate(prompts) if is_prefilled(p)), None)
    if at is not None:
        raise ValueError(f"{places[at] if places else source}: the prompt {prompts[at]!r:.120} ends with an "
                         f"assistant message (an answer's beginning): the refiner rewrites whole answers and cannot "
                         f"refine its continuation; train without the refiner ({without_refiner}) or drop the "
                         f"prefilled message")


def refine(ref_model, tokenizer, *, template: str, parse, prompts: list, completions: list[str],
           completion_ids: list[list[int]], max_new_tokens: int, batch_size: int = 256, changed_weight: float = 1.0,
           kept_weight: float = 0.0, context: int = 0, draft: bool = True, generate=None,
           stop_ids: list[int] | None = None) -> RefineResult:
    """Each completion's refinement (None where unchanged or failed). draft: verify the response as the draft of the
    refiner's greedy continuation (see the module docstring); else decode it with generate, fastrft.rollout.generate
    (the default) or a stand-in with its signature. stop_ids: the ids that end a completion, as the samples were
    ended (default: rollout.stop_token_ids of the refiner); a refinement ends with its sample's own. Counts are per
    sample, copies included."""
    result = RefineResult(refinements=[None] * len(completions))
    texts = [template.format(prompt=prompt_text(p), response=c) for p, c in zip(prompts, completions)]
    source = rollout.first_occurrences((text, tuple(ids)) for text, ids in zip(texts, completion_ids))
    unique = [i for i, first in enumerate(source) if first == i]
    result.copies = len(texts) - len(unique)
    stops = stop_ids or rollout.stop_token_ids(ref_model, tokenizer)
    # Each sample's own stop token (an instruct model's end of turn, say); the first stop id for one cut short.
    ends = {i: ids[-1] if ids and ids[-1] in stops else stops[0] for i, ids in enumerate(completion_ids)}
    template_ids = rollout.encode_prompts(tokenizer, [texts[i] for i in unique])
    if draft:
        drafts = [[t for t in completion_ids[i] if t not in stops] + [ends[i]] for i in unique]
        written, result.draft = rollout.greedy_from_drafts(ref_model, tokenizer, template_ids, drafts,
                                                           max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                           stop_ids=stops)
        result.passes = result.draft.passes
    else:
        written = (generate or rollout.generate)(ref_model, tokenizer, template_ids, max_new_tokens=max_new_tokens,
                                                 greedy=True, batch_size=batch_size, stop_ids=stops)
        result.passes = rollout.generate_passes(written.completion_ids, batch_size)
    # What became of each unique sample: a failure's reason, or (its refinement or None where it changed nothing,
    # its tokens, the tokens changed).
    outcomes: dict[int, str | tuple[Refinement | None, int, int]] = {}
    corrections: dict[int, str] = {}
    for i, raw, truncated in zip(unique, written.texts, written.truncated):
        corrected = None if truncated else parse(raw)
        if corrected is not None and not isinstance(corrected, str):
            raise ValueError(f"parse_refinement returned {type(corrected).__name__} for {raw!r}: it must return the "
                             f"corrected response (a str) or None")
        reason = "too_long" if truncated else "unparseable" if corrected is None else "empty" if not corrected else None
        if reason:
            outcomes[i] = reason
        else:
            corrections[i] = corrected
    if corrections:
        parsed = [(i, ids + [ends[i]]) for i, ids in zip(corrections, tokenizer(list(corrections.values()),
                                                                                add_special_tokens=False)["input_ids"])]
        masks = diff_masks([completion_ids[i] for i, _ in parsed], [ids for _, ids in parsed])
        # The weights on the refiner's device (the Triton kernel on CUDA), back once for the update's rows.
        weights = diff_weights(masks, changed_weight=changed_weight, kept_weight=kept_weight, context=context,
                               device=next(ref_model.parameters()).device)
        for (i, refined_ids), mask, row_weights, last in zip(parsed, masks, weights.weights.cpu(),
                                                              weights.last_index.tolist()):
            changed = int(mask.sum())
            outcomes[i] = (Refinement(refined_ids[:last + 1], row_weights[:last + 1], changed)
                           if changed and last >= 0 else None, len(refined_ids), changed)
    for i, first in enumerate(source):
        outcome = outcomes[first]
        if isinstance(outcome, str):
            result.failed += 1
            result.failures[outcome] = result.failures.get(outcome, 0) + 1
            continue
        refinement, refined_tokens, changed = outcome
        result.refined_tokens += refined_tokens
        result.changed_tokens += changed
        result.changed_samples += changed > 0
        result.unchanged += changed == 0
        if refinement is not None:   # each sample its own weights: the update's rows never share a tensor
            result.refinements[i] = replace(refinement, sft_weights=refinement.sft_weights.clone())
    return result
