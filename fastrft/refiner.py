"""The online refiner: the frozen reference model writes a minimally corrected version of each sampled response,
and the tokens it changed become refined-target cross-entropy rows of the loss.

For each sample: the refinement template (holding the prompt and the response) is continued greedily by the
reference model; the task's parser extracts the corrected response; it is tokenised and diffed against the sample
(fastrft.diff_masks); changed tokens get `changed_weight` (fastrft.diff_weights). A refinement that changes nothing
costs nothing further; each one is cut after its last weighted token. An empty, unparseable or too long refinement
gives its sample no constraint and is counted as failed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastrft.diff import diff_masks, diff_weights
from fastrft import rollout


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
    changed_tokens: int = 0
    refined_tokens: int = 0                # tokens of all parsed refinements
    failures: dict = field(default_factory=dict)   # reason -> count


def refine(ref_model, tokenizer, *, template: str, parse, prompts: list, completions: list[str],
           completion_ids: list[list[int]], max_new_tokens: int, batch_size: int = 256, changed_weight: float = 1.0,
           kept_weight: float = 0.0, context: int = 0, generate=None) -> RefineResult:
    """Each completion's refinement (None where unchanged or failed). generate: the refiner's greedy decoding,
    fastrft.rollout.generate (the default) or a stand-in with its signature."""
    result = RefineResult(refinements=[None] * len(completions))
    texts = [template.format(prompt=p if isinstance(p, str) else p[-1]["content"], response=c)
             for p, c in zip(prompts, completions)]
    written = (generate or rollout.generate)(ref_model, tokenizer, rollout.encode_prompts(tokenizer, texts),
                                             max_new_tokens=max_new_tokens, greedy=True, batch_size=batch_size)
    eos = tokenizer.eos_token_id
    parsed: list[tuple[int, list[int]]] = []
    for i, (raw, truncated) in enumerate(zip(written.texts, written.truncated)):
        corrected = None if truncated else parse(raw)
        reason = "too_long" if truncated else "unparseable" if corrected is None else "empty" if not corrected else None
        if reason:
            result.failed += 1
            result.failures[reason] = result.failures.get(reason, 0) + 1
            continue
        parsed.append((i, tokenizer(corrected, add_special_tokens=False)["input_ids"] + [eos]))
    if not parsed:
        return result
    masks = diff_masks([completion_ids[i] for i, _ in parsed], [ids for _, ids in parsed])
    weights = diff_weights(masks, changed_weight=changed_weight, kept_weight=kept_weight, context=context,
                           impl="torch")
    for (i, refined_ids), mask, row_weights, last in zip(parsed, masks, weights.weights, weights.last_index.tolist()):
        result.refined_tokens += len(refined_ids)
        changed = int(mask.sum())
        result.changed_tokens += changed
        if changed == 0 or last < 0:
            result.unchanged += 1
            continue
        result.refinements[i] = Refinement(refined_ids[:last + 1], row_weights[:last + 1].clone(), changed)
    return result
