"""How much does the draft-verified refiner save over plain greedy decoding, and what does it cost when it cannot?

A refinement is the model's greedy continuation R of a prompt; the refiner's draft is R with a share of its tokens
edited (substituted, inserted or deleted, a fixed seed), as a response the refiner corrects back into R. Both paths
refine the same rows side by side: plain (generate(greedy=True), one forward pass per token) and draft
(fastrft.rollout.greedy_from_drafts); every draft-path output is checked against the plain one. Floor: one forward
pass over the same tokens (prompt + R, the greedy tokens read off the LM head at R's positions), the least any path
can do to produce R. EOS is an id the models never write, so every R has its full length.

Part `shared` (--shared-len > 0): the refiner's templates of one prompt's samples begin alike (the prompt, then each
sample's own response); prompts in groups of --group rows, each group's beginning --shared-len tokens long, the
draft path with and without reading each common beginning once (greedy_from_drafts' share_prefixes). Floor there:
one forward pass over each group's beginning once and each row's own tokens.

    python benchmarks/bench_refine.py                           # both models, 32/128/512 tokens, 0-100% edits
    python benchmarks/bench_refine.py --models demo --lengths 32 --edits 0,1
    python benchmarks/bench_refine.py --parts shared --lengths 128 --edits 0,0.02 --shared-len 256
Prints a table, then one JSON line; writes benchmarks/results/bench_refine_<cpu|cuda>.{json,md} after each model
(part shared: bench_refine_shared_<cpu|cuda>.{json,md}).
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
from report import check_minimums, say_written  # noqa: E402

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
    else:
        model = qwen_width_model(4, dtype)
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
    read_at = torch.zeros(input_ids.shape, dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompt_ids, refinements)):
        read_at[row, len(p) - 1:len(p) + len(r) - 1] = True
    return _greedy_tokens(model.get_output_embeddings(), hidden[read_at.to(device)])


def measure(name, model, lengths, edit_shares, rows: int, prompt_len: int, repeat: int, seed: int) -> list[dict]:
    from fastrft.rollout import generate, greedy_from_drafts

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    tokenizer = IdTokenizer(eos_token_id=vocab - 1 if name != "demo" else 0)   # the demo never writes <pad>
    stops = [tokenizer.eos_token_id]   # alone: not the model's own EOS, which it writes
    rng = random.Random(seed)
    out = []
    for length in lengths:
        # Prompts of different lengths around prompt_len, as refinement templates of different responses are.
        prompt_ids = [[rng.randrange(3, vocab) for _ in range(rng.randint(prompt_len // 2, 3 * prompt_len // 2))]
                      for _ in range(rows)]
        plain_s, plain = timed(lambda: generate(model, tokenizer, prompt_ids, max_new_tokens=length, greedy=True,
                                                batch_size=rows, stop_ids=stops), device, repeat)
        refinements = plain.completion_ids
        floor_s, _ = timed(lambda: floor_pass(model, prompt_ids, refinements), device, repeat)
        tokens = sum(map(len, refinements))
        for share in edit_shares:
            drafts = [edit(r, share, vocab, rng) for r in refinements]
            draft_s, (drafted, stats) = timed(lambda: greedy_from_drafts(
                model, tokenizer, prompt_ids, drafts, max_new_tokens=length, batch_size=rows, stop_ids=stops), device, repeat)
            row = {"model": name, "rows": rows, "length": length, "edited": share, "tokens": tokens,
                   "plain_s": plain_s, "plain_passes": length, "draft_s": draft_s, "draft_passes": stats.passes,
                   "draft_accepted": stats.accepted / max(1, stats.offered), "floor_s": floor_s,
                   "plain_tokens_per_s": tokens / plain_s, "draft_tokens_per_s": tokens / draft_s,
                   "draft_speedup": plain_s / draft_s, "draft_over_floor": draft_s / floor_s,
                   "mismatched_rows": sum(a != b for a, b in zip(drafted.completion_ids, refinements))}
            print(f"{name} {length:4d} tokens {share:5.0%} edited: plain {plain_s:.3f} s, draft {draft_s:.3f} s "
                  f"({row['draft_speedup']:.2f}x, {stats.passes} passes, {1e3 * draft_s / stats.passes:.2f} ms a pass "
                  f"vs {1e3 * plain_s / length:.2f}), floor {floor_s:.3f} s, {row['mismatched_rows']} mismatched",
                  flush=True)
            out.append(row)
    return out


def measure_shared(name, model, lengths, edit_shares, rows: int, group: int, shared_len: int, prompt_len: int,
                   repeat: int, seed: int) -> list[dict]:
    """Rows in groups of `group` whose prompts share their first shared_len tokens (then each its own prompt_len
    tokens, as a sample's response in its refinement template): the draft path with and without shared beginnings,
    against the floor (a pass over each beginning once, then each row's rest)."""
    from fastrft.rollout import (_forward, _greedy_tokens, _new_cache, _select_cache, generate,
                                 greedy_from_drafts)

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    tokenizer = IdTokenizer(eos_token_id=vocab - 1 if name != "demo" else 0)
    stops = [tokenizer.eos_token_id]
    rng = random.Random(seed)
    out = []
    for length in lengths:
        beginnings = [[rng.randrange(3, vocab) for _ in range(shared_len)] for _ in range(-(-rows // group))]
        prompt_ids = [beginnings[r // group] + [rng.randrange(3, vocab) for _ in range(prompt_len)]
                      for r in range(rows)]
        refinements = generate(model, tokenizer, prompt_ids, max_new_tokens=length, greedy=True,
                               batch_size=rows, stop_ids=stops).completion_ids

        @torch.no_grad()
        def floor():
            cache, backbone = _new_cache(model), model.get_decoder()
            _forward(backbone, cache, torch.tensor(beginnings), torch.ones(len(beginnings), shared_len),
                     torch.arange(shared_len).repeat(len(beginnings), 1), device)
            _select_cache(cache, torch.tensor([r // group for r in range(rows)]))
            rests = torch.tensor([p[shared_len:] + r for p, r in zip(prompt_ids, refinements)])
            hidden = _forward(backbone, cache, rests, torch.ones(rows, shared_len + rests.shape[1]),
                              shared_len + torch.arange(rests.shape[1]).repeat(rows, 1), device)
            read = hidden[:, prompt_len - 1:rests.shape[1] - 1].flatten(0, 1)   # each row's refinement positions
            return _greedy_tokens(model.get_output_embeddings(), read)

        floor_s, _ = timed(floor, device, repeat)
        tokens = sum(map(len, refinements))
        for share in edit_shares:
            drafts = [edit(r, share, vocab, rng) for r in refinements]
            row = {"model": name, "rows": rows, "group": group, "shared_len": shared_len, "own_len": prompt_len,
                   "length": length, "edited": share, "tokens": tokens, "floor_s": floor_s}
            for label, share_prefixes in (("alone", False), ("shared", True)):
                seconds, (drafted, stats) = timed(lambda: greedy_from_drafts(
                    model, tokenizer, prompt_ids, drafts, max_new_tokens=length, batch_size=rows,
                    share_prefixes=share_prefixes, stop_ids=stops), device, repeat)
                row[f"{label}_s"] = seconds
                row[f"{label}_passes"] = stats.passes
                row[f"{label}_mismatched_rows"] = sum(a != b for a, b in zip(drafted.completion_ids, refinements))
            row["speedup"] = row["alone_s"] / row["shared_s"]
            row["shared_over_floor"] = row["shared_s"] / floor_s
            print(f"{name} {length:4d} tokens {share:5.0%} edited, groups of {group} sharing {shared_len}: alone "
                  f"{row['alone_s']:.3f} s, shared {row['shared_s']:.3f} s ({row['speedup']:.2f}x), floor "
                  f"{floor_s:.3f} s", flush=True)
            out.append(row)
    return out


def heading(title: str, payload: dict) -> list[str]:
    """The report's title and what it was measured on."""
    env = payload["env"]
    return [f"# {title} on {env['device']}", "",
            f"torch {env.get('torch')}, transformers {env.get('transformers')}, commit {env['commit']}"
            f"{' (dirty)' if env.get('dirty') else ''}, {env['cpu_threads']} torch threads, load average "
            f"{env['load_average']}; command `{env['command']}`", ""]


def models_line(payload: dict) -> list[str]:
    return ["", "Models: " + "; ".join(f"{k}: {v}" for k, v in MODELS.items() if k in payload["models"]), ""]


def markdown_shared(payload: dict) -> str:
    lines = [*heading("bench_refine, shared beginnings,", payload),
             f"{payload['dtype']}; median of {payload['repeat']}. Each prompt: its group's beginning, then its own "
             "tokens (a refinement template: the prompt, then the sample's response). Draft path with each common "
             "beginning read once (shared) and without (alone); floor: one pass over each beginning once and each "
             "row's own tokens and refinement.", "",
             "| model | rows | group | beginning | own | tokens each | edited | alone s | shared s | speedup "
             "| shared / floor | passes alone / shared | mismatched rows |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in payload["rows"]:
        lines.append(f"| {r['model']} | {r['rows']} | {r['group']} | {r['shared_len']} | {r['own_len']} | "
                     f"{r['length']} | {r['edited']:.0%} | {r['alone_s']:.3f} | {r['shared_s']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['shared_over_floor']:.2f}x | {r['alone_passes']} / "
                     f"{r['shared_passes']} | {r['alone_mismatched_rows'] + r['shared_mismatched_rows']} |")
    lines += models_line(payload)
    return "\n".join(lines)


def markdown(payload: dict) -> str:
    lines = [*heading("bench_refine", payload),
             f"{payload['dtype']}; prompts of {payload['prompt_len'] // 2} to {3 * payload['prompt_len'] // 2} tokens; "
             f"median of {payload['repeat']}. "
             "Floor: one forward pass over prompt + refinement with the greedy tokens at the refinement's positions. "
             "Speedup = plain time / draft time.", "",
             "| model | rows | tokens each | edited | plain s | plain passes | draft s | draft passes | draft accepted "
             "| speedup | draft / floor | plain tok/s | draft tok/s | plain ms / pass | draft ms / pass "
             "| mismatched rows |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in payload["rows"]:
        # Time per pass sets each path apart from its number of passes: on CUDA the plain path's decoder runs
        # compiled (static cache), the draft path's passes eagerly.
        lines.append(f"| {r['model']} | {r['rows']} | {r['length']} | {r['edited']:.0%} | {r['plain_s']:.3f} | "
                     f"{r['plain_passes']} | {r['draft_s']:.3f} | {r['draft_passes']} | {r['draft_accepted']:.2f} | "
                     f"{r['draft_speedup']:.2f}x | {r['draft_over_floor']:.2f}x | {r['plain_tokens_per_s']:.0f} | "
                     f"{r['draft_tokens_per_s']:.0f} | {1e3 * r['plain_s'] / r['plain_passes']:.2f} | "
                     f"{1e3 * r['draft_s'] / r['draft_passes']:.2f} | {r['mismatched_rows']} |")
    lines += models_line(payload)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="edits", help="edits (the main table), shared (shared beginnings)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--lengths", default="32,128,512", help="refinement lengths in tokens")
    parser.add_argument("--edits", default="0,0.02,0.1,0.5,1", help="shares of the draft's tokens edited")
    parser.add_argument("--rows", default="demo=64,qwen2.5-0.5b-width=8",
                        help="refinements per batch, per model: MODEL=N,...")
    parser.add_argument("--prompt-len", type=int, default=32, help="mean prompt length")
    parser.add_argument("--group", type=int, default=8, help="part shared: rows per common beginning")
    parser.add_argument("--shared-len", type=int, default=256, help="part shared: tokens of each common beginning")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="default float32 on the CPU, bfloat16 on CUDA. In bf16 a randomly initialised model's "
                             "top two logits nearly tie at many positions, so the plain path's compiled decoder and "
                             "the draft path's eager passes round to different tokens there: float32 separates "
                             "speed from rounding")
    parser.add_argument("--reference-dir", default="runs/demo_reference", help="the demo's reference model (trained "
                        "there first if missing)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", default=None, help="where to write the results: a path without suffix, which gets "
                        ".json and .md (part shared: PATH_shared.json and .md; default: "
                        "benchmarks/results/bench_refine[_shared]_<cpu|cuda>)")
    args = parser.parse_args()

    from fastrft.machine import describe_machine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        rows = {model: int(n) for model, n in (item.split("=") for item in args.rows.split(","))}
        lengths, edits = [int(n) for n in args.lengths.split(",")], [float(e) for e in args.edits.split(",")]
    except ValueError:
        parser.error("--rows takes MODEL=N,... (demo=64), --lengths integers, --edits numbers, each comma-separated")
    if min(rows.values()) < 1 or min(lengths) < 1 or not all(0 <= e <= 1 for e in edits) or args.repeat < 1:
        parser.error("rows, lengths and --repeat must be >= 1 and each share of --edits in [0, 1]")
    check_minimums(parser, args, {"prompt_len": 2})   # prompts of prompt_len/2 to 3*prompt_len/2 tokens
    # Named before anything is measured, not after the models before them.
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(map(repr, unknown))}; the models: {', '.join(MODELS)}")
    unknown = [part for part in args.parts.split(",") if part not in ("edits", "shared")]
    if unknown:
        parser.error(f"--parts: unknown {', '.join(map(repr, unknown))}; the parts: edits, shared")
    payload = {"env": describe_machine(device), "dtype": str(dtype).replace("torch.", ""),
               "prompt_len": args.prompt_len, "repeat": args.repeat, "models": args.models.split(","), "rows": []}
    if "shared" in args.parts.split(",") and not (1 <= args.shared_len and 1 <= args.group):
        raise SystemExit(f"part shared needs --shared-len >= 1 and --group >= 1, got {args.shared_len} and "
                         f"{args.group}")
    tag = "cuda" if device.type == "cuda" else "cpu"
    for part in args.parts.split(","):
        stem, render = ("bench_refine", markdown) if part == "edits" else ("bench_refine_shared", markdown_shared)
        part_payload = {**payload, "rows": []}
        if part == "shared":
            part_payload.update(group=args.group, shared_len=args.shared_len)
        for name in payload["models"]:
            model = load_model(name, Path(args.reference_dir), device, dtype)
            if part == "edits":
                part_payload["rows"] += measure(name, model, lengths, edits, int(rows.get(name, 8)),
                                                args.prompt_len, args.repeat, seed=0)
            else:
                part_payload["rows"] += measure_shared(name, model, lengths, edits, int(rows.get(name, 8)),
                                                       args.group, args.shared_len, args.prompt_len, args.repeat,
                                                       seed=0)
            if not args.no_write:
                out = Path(f"{args.out}{stem[len('bench_refine'):]}") if args.out else RESULTS / f"{stem}_{tag}"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.with_suffix(".json").write_text(json.dumps(part_payload, indent=1) + "\n")
                out.with_suffix(".md").write_text(render(part_payload))
                say_written(out)
            del model
        print(render(part_payload))
        print(json.dumps(part_payload))


if __name__ == "__main__":
    main()
