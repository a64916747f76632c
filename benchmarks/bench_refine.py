"""How much does the draft-verified refiner save over plain greedy decoding, and what does it cost when it cannot?

A refinement is the model's greedy continuation R of a prompt; the refiner's draft is R with a share of its tokens
edited (substituted, inserted or deleted, a fixed seed), as a response the refiner corrects back into R. Both paths
refine the same rows side by side: plain (generate(greedy=True), one forward pass per token) and draft
(fastrft.rollout.greedy_from_drafts); every draft-path output is checked against the plain one. Floor: one forward
pass over the same tokens (prompt + R, the greedy tokens read off the LM head at R's positions), the least any path
can do to produce R. EOS is an id the models never write, so every R has its full length.

    python benchmarks/bench_refine.py                           # both models, 32/128/512 tokens, 0-100% edits
    python benchmarks/bench_refine.py --models demo --lengths 32 --edits 0,1
Prints a table, then one JSON line; writes benchmarks/results/bench_refine_<cpu|cuda>.{json,md} after each model.
Targets on the 2-core CPU: no edits, the draft path within 1.5x of the floor and at least 5x faster than plain at 128
tokens; 2% edits, at least 3x faster; 100% edits, at most 1.15x slower.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import QWEN_WIDTH, qwen_width_description, qwen_width_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "demo": "the demo's reference model (3-layer Llama, hidden 96, vocabulary 24), trained by fastrft demo",
    QWEN_WIDTH: qwen_width_description(4),
}


class IdTokenizer:
    """What the two paths need of a tokenizer; EOS is an id the models never write."""
    pad_token_id = 0

    def __init__(self, eos_token_id: int):
        self.eos_token_id = eos_token_id

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def batch_decode(self, sequences, skip_special_tokens=True):
        return [self.decode(ids, skip_special_tokens) for ids in sequences]


def load_model(name: str, reference_dir: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if name == "demo":
        from fastrft.tasks.demo import ensure_reference

        model = AutoModelForCausalLM.from_pretrained(ensure_reference(reference_dir), dtype=dtype)
    elif name == QWEN_WIDTH:
        model = qwen_width_model(4, dtype)
    else:
        raise SystemExit(f"unknown model {name!r}: {', '.join(MODELS)}")
    return model.to(device).eval()


def edit(ids: list[int], share: float, vocab: int, rng: random.Random) -> list[int]:
    """ids with round(share * len) of its positions edited: each a substitution, an insertion before it or its
    deletion, a third of each."""
    edits = dict.fromkeys(rng.sample(range(len(ids)), round(share * len(ids))))
    for position in edits:
        edits[position] = rng.choice(("substitute", "insert", "delete"))
    out = []
    for position, token in enumerate(ids):
        kind = edits.get(position)
        if kind == "insert":
            out += [rng.randrange(3, vocab), token]
        elif kind == "substitute":
            out.append(rng.randrange(3, vocab))
        elif kind is None:
            out.append(token)
    return out


def timed(fn, device, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


@torch.no_grad()
def floor_pass(model, prompt_ids, refinements):
    """One forward pass over prompt + refinement (one right-padded row each) and the greedy tokens at the
    refinement's positions."""
    from fastrft.rollout import _greedy_tokens

    width = max(len(p) + len(r) for p, r in zip(prompt_ids, refinements))
    input_ids = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompt_ids, refinements)):
        input_ids[row, :len(p) + len(r)] = torch.tensor(p + r)
    device = next(model.parameters()).device
    hidden = model.get_decoder()(input_ids=input_ids.to(device)).last_hidden_state
    return _greedy_tokens(model.get_output_embeddings(), hidden,
                          [(row, c) for row, (p, r) in enumerate(zip(prompt_ids, refinements))
                           for c in range(len(p) - 1, len(p) + len(r) - 1)])


def measure(name, model, lengths, edit_shares, rows: int, prompt_len: int, repeat: int, seed: int) -> list[dict]:
    from fastrft.rollout import generate, greedy_from_drafts

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    tokenizer = IdTokenizer(eos_token_id=vocab - 1 if name != "demo" else 0)   # the demo never writes <pad>
    rng = random.Random(seed)
    out = []
    for length in lengths:
        # Prompts of different lengths around prompt_len, as refinement templates of different responses are.
        prompt_ids = [[rng.randrange(3, vocab) for _ in range(rng.randint(prompt_len // 2, 3 * prompt_len // 2))]
                      for _ in range(rows)]
        plain_s, plain = timed(lambda: generate(model, tokenizer, prompt_ids, max_new_tokens=length, greedy=True,
                                                batch_size=rows), device, repeat)
        refinements = plain.completion_ids
        floor_s, _ = timed(lambda: floor_pass(model, prompt_ids, refinements), device, repeat)
        tokens = sum(map(len, refinements))
        for share in edit_shares:
            drafts = [edit(r, share, vocab, rng) for r in refinements]
            draft_s, (drafted, stats) = timed(lambda: greedy_from_drafts(
                model, tokenizer, prompt_ids, drafts, max_new_tokens=length, batch_size=rows), device, repeat)
            row = {"model": name, "rows": rows, "length": length, "edited": share, "tokens": tokens,
                   "plain_s": plain_s, "plain_passes": length, "draft_s": draft_s, "draft_passes": stats.passes,
                   "draft_accepted": stats.accepted / max(1, stats.offered), "floor_s": floor_s,
                   "plain_tokens_per_s": tokens / plain_s, "draft_tokens_per_s": tokens / draft_s,
                   "draft_speedup": plain_s / draft_s, "draft_over_floor": draft_s / floor_s,
                   "mismatched_rows": sum(a != b for a, b in zip(drafted.completion_ids, refinements))}
            print(f"{name} {length:4d} tokens {share:5.0%} edited: plain {plain_s:.3f} s, draft {draft_s:.3f} s "
                  f"({row['draft_speedup']:.2f}x, {stats.passes} passes), floor {floor_s:.3f} s, "
                  f"{row['mismatched_rows']} mismatched", flush=True)
            out.append(row)
    return out


def markdown(payload: dict) -> str:
    env = payload["env"]
    lines = [f"# bench_refine on {env['device']}", "",
             f"torch {env.get('torch')}, transformers {env.get('transformers')}, commit {env['commit']}"
             f"{' (dirty)' if env.get('dirty') else ''}, {env['cpu_threads']} torch threads, load average "
             f"{env['load_average']}; command `{env['command']}`", "",
             f"{payload['dtype']}; prompts of {payload['prompt_len'] // 2} to {3 * payload['prompt_len'] // 2} tokens; "
             f"median of {payload['repeat']}. "
             "Floor: one forward pass over prompt + refinement with the greedy tokens at the refinement's positions. "
             "Speedup = plain time / draft time.", "",
             "| model | rows | tokens each | edited | plain s | plain passes | draft s | draft passes | draft accepted "
             "| speedup | draft / floor | plain tok/s | draft tok/s | mismatched rows |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in payload["rows"]:
        lines.append(f"| {r['model']} | {r['rows']} | {r['length']} | {r['edited']:.0%} | {r['plain_s']:.3f} | "
                     f"{r['plain_passes']} | {r['draft_s']:.3f} | {r['draft_passes']} | {r['draft_accepted']:.2f} | "
                     f"{r['draft_speedup']:.2f}x | {r['draft_over_floor']:.2f}x | {r['plain_tokens_per_s']:.0f} | "
                     f"{r['draft_tokens_per_s']:.0f} | {r['mismatched_rows']} |")
    lines += ["", "Models: " + "; ".join(f"{k}: {v}" for k, v in MODELS.items() if k in payload["models"]), ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--lengths", default="32,128,512", help="refinement lengths in tokens")
    parser.add_argument("--edits", default="0,0.02,0.1,0.5,1", help="shares of the draft's tokens edited")
    parser.add_argument("--rows", default="demo=64,qwen2.5-0.5b-width=8", help="refinements per batch, per model")
    parser.add_argument("--prompt-len", type=int, default=32, help="mean prompt length")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--reference-dir", default="runs/demo_reference")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from fastrft.machine import describe_machine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = dict(item.split("=") for item in args.rows.split(","))
    payload = {"env": describe_machine(device), "dtype": str(dtype).replace("torch.", ""),
               "prompt_len": args.prompt_len, "repeat": args.repeat, "models": args.models.split(","), "rows": []}
    tag = "cuda" if device.type == "cuda" else "cpu"
    for name in payload["models"]:
        model = load_model(name, Path(args.reference_dir), device, dtype)
        payload["rows"] += measure(name, model, [int(n) for n in args.lengths.split(",")],
                                   [float(e) for e in args.edits.split(",")], int(rows.get(name, 8)),
                                   args.prompt_len, args.repeat, seed=0)
        if not args.no_write:
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"bench_refine_{tag}.json").write_text(json.dumps(payload, indent=1) + "\n")
            (RESULTS / f"bench_refine_{tag}.md").write_text(markdown(payload))
        del model
    print(markdown(payload))
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
