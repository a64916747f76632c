"""The draft-verified refiner (fastrft.rollout.greedy_from_drafts, refine(draft=True)) against the plain greedy path
(generate(greedy=True), refine(draft=False)), which is its reference: the same tokens, on real samples of the demo's
reference model and on constructed drafts, over architectures, batch layouts and budgets."""
import copy
import functools

import pytest
import torch

from fastrft.refiner import refine
from fastrft.rollout import encode_prompts, generate, greedy_from_drafts
from fastrft.tasks.demo import REFINE_TEMPLATE, demo_task, parse_refinement


@pytest.fixture(scope="module")
def reference(demo_reference):
    """The demo's reference model (conftest's short budget) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(demo_reference).eval(), AutoTokenizer.from_pretrained(demo_reference)


def both_paths(model, tokenizer, prompt_ids, drafts, max_new_tokens, batch_size=256):
    plain = generate(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, greedy=True, batch_size=batch_size)
    drafted, stats = greedy_from_drafts(model, tokenizer, prompt_ids, drafts, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size)
    return plain, drafted, stats


def assert_same(plain, drafted):
    mismatches = [i for i, (a, b) in enumerate(zip(plain.completion_ids, drafted.completion_ids)) if a != b]
    assert not mismatches, f"{len(mismatches)} rows differ, first {mismatches[0]}: " \
                           f"{plain.completion_ids[mismatches[0]]} vs {drafted.completion_ids[mismatches[0]]}"
    assert drafted.truncated == plain.truncated and drafted.texts == plain.texts


def counted_forwards(monkeypatch) -> list:
    """The [rows, tokens] shape of every forward pass the draft path (or generate's read of the prompts a batch
    repeats) makes from here on, filled as it makes them."""
    import fastrft.rollout as rollout_module

    fed, forward = [], rollout_module._forward

    def counting_forward(backbone, cache, input_ids, *args):
        fed.append(tuple(input_ids.shape))
        return forward(backbone, cache, input_ids, *args)

    monkeypatch.setattr(rollout_module, "_forward", counting_forward)
    return fed


def test_real_samples_of_training_refine_to_the_plain_greedy_tokens(reference):
    """1024 samples of the reference itself on training prompts, as the first RL step draws them (temperature 1.0
    and a hotter 1.5 for more errors), over 500 of them distinct, refined both ways: every refinement identical, and
    most of them a mix of accepted and rewritten draft tokens."""
    model, tokenizer = reference
    task = demo_task()
    rows = task.train_rows[:128]
    torch.manual_seed(0)
    samples = [generate(model, tokenizer, encode_prompts(tokenizer, [r["prompt"] for r in rows]), max_new_tokens=10,
                        num_samples=4, temperature=t) for t in (1.0, 1.5)]
    prompts = [r["prompt"] for _ in samples for r in rows for _ in range(4)]
    texts = [t for s in samples for t in s.texts]
    ids = [c for s in samples for c in s.completion_ids]
    results = [refine(model, tokenizer, template=REFINE_TEMPLATE, parse=parse_refinement, prompts=prompts,
                      completions=texts, completion_ids=ids, max_new_tokens=10, draft=draft)
               for draft in (False, True)]
    plain, drafted = results
    distinct = len(set(zip(prompts, map(tuple, ids))))   # identical samples are refined once (copies)
    assert distinct >= 500 and plain.copies == drafted.copies == len(prompts) - distinct
    for a, b in zip(plain.refinements, drafted.refinements):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.refined_ids == b.refined_ids and torch.equal(a.sft_weights, b.sft_weights)
    assert (plain.failed, plain.unchanged, plain.changed_tokens) == (drafted.failed, drafted.unchanged,
                                                                    drafted.changed_tokens)
    changed = sum(r is not None for r in plain.refinements)
    assert 50 < changed < len(prompts) - 50, "the samples should mix changed and unchanged refinements"
    assert 0 < drafted.draft.accepted < drafted.draft.offered
    # Each pass writes at least one token of every row, but those over the templates' shared beginnings (a group's
    # samples share their prompt), which every batch of 256 rows here has.
    assert drafted.draft.prefix_passes == 3
    assert drafted.passes - drafted.draft.prefix_passes <= plain.passes


def test_identical_samples_are_refined_once_and_copied(reference):
    """Samples repeated within and across prompts: each distinct (prompt, response) is written once, and every copy
    gets what refining it alone gives (its own weights tensor), counted per sample."""
    model, tokenizer = reference
    eos = tokenizer.eos_token_id
    cases = [("sort 7391=", "1739"), ("sort 7391=", "1379"), ("sort 93714=", "1739"), ("sort 7391=", "1739"),
             ("sort 7391=", "fix"), ("sort 93714=", "1739"), ("sort 7391=", "1739"), ("sort 7391=", "fix")]
    prompts, texts = [p for p, _ in cases], [t for _, t in cases]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    written = []

    def counting_generate(model, tokenizer, prompt_ids, **kwargs):
        written.extend(tokenizer.batch_decode(prompt_ids, skip_special_tokens=True))
        return generate(model, tokenizer, prompt_ids, **kwargs)

    kwargs = dict(template=REFINE_TEMPLATE, parse=parse_refinement, max_new_tokens=10)
    for draft in (False, True):
        written.clear()
        together = refine(model, tokenizer, prompts=prompts, completions=texts, completion_ids=ids, draft=draft,
                          generate=counting_generate, **kwargs)
        distinct = list(dict.fromkeys(cases))
        if draft:   # the distinct samples' drafts, verified as they would be alone
            once = refine(model, tokenizer, prompts=[p for p, _ in distinct], completions=[t for _, t in distinct],
                          completion_ids=[ids[cases.index(case)] for case in distinct], draft=True, **kwargs)
            assert (together.draft.offered, together.draft.accepted, together.passes) == \
                (once.draft.offered, once.draft.accepted, once.passes)
        else:
            assert sorted(written) == sorted(REFINE_TEMPLATE.format(prompt=p, response=t) for p, t in distinct)
        assert together.copies == 4
        alone = [refine(model, tokenizer, prompts=[p], completions=[t], completion_ids=[i], draft=draft, **kwargs)
                 for p, t, i in zip(prompts, texts, ids)]
        for mine, single in zip(together.refinements, alone):
            assert (mine is None) == (single.refinements[0] is None)
            if mine is not None:
                assert mine.refined_ids == single.refinements[0].refined_ids
                assert torch.equal(mine.sft_weights, single.refinements[0].sft_weights)
        for name in ("failed", "unchanged", "changed_tokens", "refined_tokens"):
            assert getattr(together, name) == sum(getattr(a, name) for a in alone), name
        assert sum(together.failures.values()) == together.failed
        changed = [r for r in together.refinements if r is not None]
        assert len({id(r.sft_weights) for r in changed}) == len(changed)


CONSTRUCTED = {   # response as the refiner sees it -> what the case exercises
    "1379": "unchanged (the sorted answer copied)",
    "1389": "one substitution",
    "91379": "an insertion at the start",
    "13979": "an insertion in the middle",
    "13799": "an insertion at the end",
    "379": "a deletion at the start",
    "179": "a deletion in the middle",
    "137": "a deletion at the end",
    "8642": "a wholly rewritten answer",
    "": "an empty response",
    "1379137913791379": "a draft longer than the budget",
}


@pytest.mark.parametrize("max_new_tokens", [10, 3, 1])
def test_constructed_drafts_in_one_left_padded_batch(reference, max_new_tokens):
    """Every constructed case in one batch, with prompts of different lengths (left padding), and alone; with a
    budget that cuts refinements (3, 1 tokens) too."""
    model, tokenizer = reference
    eos = tokenizer.eos_token_id
    prompts, drafts = [], []
    for digits in ("7391", "93714", "31"):
        for response in CONSTRUCTED:
            prompts.append(REFINE_TEMPLATE.format(prompt=f"sort {digits}=", response=response))
            drafts.append(tokenizer(response, add_special_tokens=False)["input_ids"] + [eos])
    prompt_ids = encode_prompts(tokenizer, prompts)
    plain, drafted, stats = both_paths(model, tokenizer, prompt_ids, drafts, max_new_tokens)
    assert_same(plain, drafted)
    if max_new_tokens < 5:
        assert any(plain.truncated)
    for i in (0, 8, 9):   # alone: no padding at all
        alone = both_paths(model, tokenizer, prompt_ids[i:i + 1], drafts[i:i + 1], max_new_tokens)
        assert alone[1].completion_ids == [plain.completion_ids[i]]
    # Batches of 4: the rows bucketed by length, each batch its own cache.
    assert_same(plain, both_paths(model, tokenizer, prompt_ids, drafts, max_new_tokens, batch_size=4)[1])


def test_eos_inside_the_draft_and_drafts_of_other_tokens(reference):
    """Drafts are only guesses: an EOS in the middle, a draft of the wrong text, an empty draft."""
    model, tokenizer = reference
    eos = tokenizer.eos_token_id

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt_ids = encode_prompts(tokenizer, [REFINE_TEMPLATE.format(prompt="sort 7391=", response="1739")] * 4)
    drafts = [ids("13") + [eos] + ids("79") + [eos], ids("fix sort"), [], ids("1379") + [eos, eos]]
    plain, drafted, _ = both_paths(model, tokenizer, prompt_ids, drafts, 10)
    assert_same(plain, drafted)


def test_unchanged_responses_cost_one_forward_pass(reference, monkeypatch):
    """Where the refiner copies the response (a correct answer), the drafts are accepted whole: each row is read in
    one pass (rows of like lengths together, _length_buckets), after one over the templates' common beginning,
    "fix sort ", read once for every row."""
    model, tokenizer = reference
    eos = tokenizer.eos_token_id
    rows = demo_task().eval_rows[:32]
    prompt_ids = encode_prompts(tokenizer, [REFINE_TEMPLATE.format(prompt=r["prompt"], response=r["answer"])
                                            for r in rows])
    copied = [i for i, text in enumerate(generate(model, tokenizer, prompt_ids, max_new_tokens=10, greedy=True).texts)
              if text == rows[i]["answer"]]
    assert len(copied) >= 8, "the reference should copy most correct answers"
    drafts = [tokenizer(rows[i]["answer"], add_special_tokens=False)["input_ids"] + [eos] for i in copied]
    fed = counted_forwards(monkeypatch)
    plain, drafted, stats = both_paths(model, tokenizer, [prompt_ids[i] for i in copied], drafts, 10)
    assert_same(plain, drafted)
    assert stats.prefix_passes == 1 and sum(n for n, _ in fed[1:]) == len(copied) and stats.passes == len(fed)
    assert stats.accepted == stats.offered == sum(map(len, drafts))


def tiny_causal_lm(kind):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=48, num_hidden_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = {
        "qwen2-gqa": lambda: Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                         num_key_value_heads=2, **common),
        "gpt2-absolute-positions": lambda: GPT2Config(n_embd=64, n_head=4, n_positions=128, **{
            k: v for k, v in common.items() if k != "num_hidden_layers"}, n_layer=2),
        "mistral-sliding-window": lambda: MistralConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                                        num_key_value_heads=4, sliding_window=16, **common),
        "llama-bf16": lambda: LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, **common),
    }[kind]()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


class IdTokenizer:
    """Token ids are the text: what the two paths need of a tokenizer."""
    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in (0, 1, 2)))

    def batch_decode(self, sequences, skip_special_tokens=True):
        return [self.decode(ids, skip_special_tokens) for ids in sequences]


def edited(ids, gen, rate):
    """ids with about rate of its tokens substituted, inserted or deleted."""
    out = []
    for token in ids:
        r = float(torch.rand(1, generator=gen))
        if r < rate / 3:
            continue
        out.append(int(torch.randint(3, 48, (1,), generator=gen)) if r < 2 * rate / 3 else token)
        if rate / 3 * 2 <= r < rate:
            out.append(int(torch.randint(3, 48, (1,), generator=gen)))
    return out


@pytest.mark.parametrize("edit, passes", [("substitution", 1), ("extra draft token", 1), ("missing draft token", 2)])
def test_a_draft_row_steps_over_a_one_token_edit(edit, passes):
    """A row whose draft is one edit away from the greedy completion is back in step with it, proposing the rest,
    after one rejected pass (a substitution, a token the draft has in excess) or two (a token the draft lacks: a
    substitution is guessed first). Verified as _verify_batch does, with the completion as the greedy tokens; its
    tokens are distinct, so no n-gram elsewhere in the draft helps or misleads."""
    from fastrft.rollout import _DraftRow

    truth = list(range(10, 60))
    draft = {"substitution": truth[:20] + [99] + truth[21:], "extra draft token": truth[:20] + [99] + truth[20:],
             "missing draft token": truth[:20] + truth[21:]}[edit]
    row = _DraftRow(draft, ngram=3, size=8)
    row.write(truth[:20], stops=frozenset({2}), max_new_tokens=64)
    row.pointer = 20
    assert rejected_passes(row, truth, block=8) == passes


def rejected_passes(row, truth: list[int], block: int) -> int:
    """Verifies the row's proposals of up to `block` tokens as _verify_batch does, with truth as the greedy
    completion, until the row proposes truth's next `block` tokens (or has written all of truth); returns the passes
    that rejected a proposal."""
    rejected = 0
    while len(row.out) < len(truth) and \
            (proposal := row.proposal(block)) != truth[len(row.out):len(row.out) + block]:
        greedy = truth[len(row.out):]
        accepted = next((j for j, (x, y) in enumerate(zip(greedy, proposal)) if x != y), len(proposal))
        row.write(greedy[:accepted + 1], stops=frozenset({2}), max_new_tokens=1000)
        row.verified(len(proposal), accepted, lookahead=64)
        rejected += 1
    return rejected


def test_a_draft_row_never_sticks_to_a_failing_start():
    """A greedy completion that repeats one token (small models fall into such loops) against a draft of it with two
    tokens inserted, verified in blocks as wide as other rows may make them: the row is back in step within a few
    passes. It never proposes again from a start rejected twice in a row at its first token (the one-edit check
    would pull it back there every pass: the written token is always the draft's before it)."""
    from fastrft.rollout import _DraftRow

    truth = [7] * 200
    draft = [6] + [7] * 7 + [12, 3] + [7] * 150
    row = _DraftRow(draft, ngram=3, size=8)
    row.write(truth[:8], stops=frozenset({2}), max_new_tokens=1000)
    row.pointer = 8
    assert rejected_passes(row, truth, block=8) <= 4


def test_a_draft_row_at_its_drafts_end_re_aligns():
    """A row whose pointer reached the end of a draft without EOS (cut at max_new_tokens) has nothing to propose
    from there: it is not in step, and re-aligns on its last tokens instead of proposing nothing every pass."""
    from fastrft.rollout import _DraftRow

    draft = [7] * 50 + [5] + [7] * 30
    row = _DraftRow(draft, ngram=3, size=8)
    row.write([7] * 40, stops=frozenset({2}), max_new_tokens=100)
    row.pointer = len(draft)
    assert row.proposal(8) == [7]


@pytest.mark.parametrize("max_new_tokens", [0, -3])
def test_a_limit_below_one_token_is_refused(max_new_tokens):
    """generate() refuses it; the verifier would never reach it and decode to EOS or without end."""
    model, tokenizer = tiny_causal_lm("qwen2-gqa"), IdTokenizer()
    with pytest.raises(ValueError, match=f"max_new_tokens must be >= 1, got {max_new_tokens}"):
        greedy_from_drafts(model, tokenizer, [[1, 5, 6]], [[7, 8]], max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("kind", ["qwen2-gqa", "gpt2-absolute-positions", "mistral-sliding-window"])
def test_other_architectures(kind):
    """Random tiny models of other families: the drafts are their own greedy completions, edited at several rates;
    the sliding-window model decodes plainly (its cache drops slots by count, masked ones included)."""
    model, tokenizer = tiny_causal_lm(kind), IdTokenizer()
    gen = torch.Generator().manual_seed(0)
    prompt_ids = [[1] + torch.randint(3, 48, (int(torch.randint(2, 12, (1,), generator=gen)),), generator=gen)
                  .tolist() for _ in range(24)]
    truth = generate(model, tokenizer, prompt_ids, max_new_tokens=24, greedy=True).completion_ids
    drafts = [edited(ids, gen, rate) for ids, rate in zip(truth, [0.0, 0.05, 0.3, 1.0] * 6)]
    plain, drafted, stats = both_paths(model, tokenizer, prompt_ids, drafts, 24)
    assert_same(plain, drafted)
    assert (stats.plain_rows > 0) == (kind == "mistral-sliding-window")
    if kind == "mistral-sliding-window":   # one batch decoded plainly: a pass per token of its longest completion
        assert stats.passes == max(map(len, plain.completion_ids)) > 0
    else:
        assert stats.passes <= 24
        unchanged = both_paths(model, tokenizer, prompt_ids[::4], drafts[::4], 24)   # the rate-0 drafts
        assert_same(*unchanged[:2])
        assert unchanged[2].passes == 2   # 16 draft tokens with the prompt, then a block of the other 8


@pytest.mark.parametrize("kind", ["qwen2-gqa", "gpt2-absolute-positions", "mistral-sliding-window"])
def test_a_groups_samples_read_their_prompt_once(kind, monkeypatch):
    """generate() with several samples a prompt (prompts of different lengths, left-padded; a one-token prompt; a
    prompt drawn twice; a group split across two batches): each batch reads each of its distinct prompts once, but
    for the last token, and copies its cache to the prompt's rows; the completions, greedy and sampled from one seed,
    are those of every row reading its prompt itself. A sliding-window model's rows read their prompts themselves."""
    from fastrft import rollout

    model, tokenizer = tiny_causal_lm(kind), IdTokenizer()
    gen = torch.Generator().manual_seed(3)
    prompts = [[1] + torch.randint(3, 48, (n,), generator=gen).tolist() for n in (6, 2, 11, 4)]
    prompts = prompts[:2] + [prompts[1]] + prompts[2:3] + [[1]] + prompts[3:]
    shared_reads = counted_forwards(monkeypatch)

    def completions(greedy: bool) -> list[list[int]]:
        torch.manual_seed(0)
        return generate(model, tokenizer, prompts, max_new_tokens=8, num_samples=3, greedy=greedy,
                        temperature=1.0, batch_size=8).completion_ids

    shared = {greedy: completions(greedy) for greedy in (True, False)}
    rows = [p for p in prompts for _ in range(3)]
    batches = [rows[i:i + 8] for i in range(0, len(rows), 8)]
    expected = [(len(set(map(tuple, b))), max(map(len, b)) - 1) for b in batches]
    assert shared_reads == ([] if kind == "mistral-sliding-window" else expected * 2)
    assert [n for n, _ in expected] == [2, 4, 1]   # prompt 1 twice in the first batch, its second group split
    monkeypatch.setattr(rollout, "_shared_prompts_cache", lambda *args: None)
    for greedy in (True, False):
        assert completions(greedy) == shared[greedy]
    monkeypatch.setattr(rollout, "_dynamic_cache", lambda *args: None)   # transformers' own cache, by concatenation
    for greedy in (True, False):
        assert completions(greedy) == shared[greedy]
    assert len(set(map(tuple, shared[False]))) > len(prompts)   # sampled: a group's samples differ


@pytest.mark.parametrize("kind", ["qwen2-gqa", "xlstm-recurrent", "static-in-generation-config"])
def test_generate_hands_over_a_growing_cache_only_where_transformers_builds_a_dynamic_one(kind, monkeypatch):
    """generate() gives transformers' generate a cache growing in place where it would build a DynamicCache itself;
    a model with recurrent states of its own (xLSTM) or whose generation config names a cache implementation gets
    none (transformers refuses a cache beside an implementation), and decodes as before, distinct prompts and a
    group's repeated ones alike."""
    from transformers import AutoModelForCausalLM, xLSTMConfig

    from fastrft import rollout

    if kind == "xlstm-recurrent":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(xLSTMConfig(
            vocab_size=48, hidden_size=64, embedding_dim=64, num_hidden_layers=2, num_heads=4, qk_dim_factor=1.0,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    else:
        model = tiny_causal_lm("qwen2-gqa")
        if kind == "static-in-generation-config":
            model.generation_config.cache_implementation = "static"
    handed = []
    generate_fn = type(model).generate

    def spy(self, *args, **kwargs):
        handed.append(kwargs.get("cache", kwargs.get("past_key_values")))
        return generate_fn(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    prompts = [[1, 5, 9, 20], [1, 44, 7]]
    for num_samples in (1, 2):
        out = generate(model, IdTokenizer(), prompts, max_new_tokens=5, num_samples=num_samples, greedy=True)
        assert len(out.completion_ids) == 2 * num_samples
    growing = rollout._growing_layer_class()
    if kind == "qwen2-gqa":
        assert all(all(type(layer) is growing for layer in cache.layers) for cache in handed)
    else:
        assert handed == [None, None]


def test_the_cache_grows_in_place():
    """The dynamic cache's plain causal layers hold what transformers' DynamicLayer holds (its torch.cat of every
    update): decoded tokens in a few buffers over hundreds of steps; keys replaced from outside (rows selected, a
    crop) are taken in, and a copy of a layer never writes into the original's buffers."""
    from transformers.cache_utils import DynamicLayer

    from fastrft.rollout import _growing_layer_class, _new_cache, _select_cache

    model = tiny_causal_lm("qwen2-gqa")
    cache = _new_cache(model)
    assert [type(layer) for layer in cache.layers] == [_growing_layer_class()] * 2
    assert all(type(layer) is not _growing_layer_class() for layer in _new_cache(tiny_causal_lm(
        "mistral-sliding-window")).layers)   # a sliding window's layers stay transformers' own
    layer, truth = cache.layers[0], DynamicLayer()
    gen = torch.Generator().manual_seed(0)

    def update(layer, truth, width):
        new = torch.randn(3, 2, width, 8, generator=gen), torch.randn(3, 2, width, 8, generator=gen)
        got, expected = layer.update(*new), truth.update(*new)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert torch.equal(layer.keys, truth.keys) and torch.equal(layer.values, truth.values)
        assert layer.get_seq_length() == truth.get_seq_length()

    update(layer, truth, 20)
    assert layer.keys.is_contiguous()   # a wide update (a prefill) is concatenated: attention reads it fastest
    buffers = set()
    for width in [1] * 300 + [7, 1, 33]:
        update(layer, truth, width)
        buffers.add(layer._buffers[0].data_ptr())
    assert len(buffers) <= 8 and not layer.keys.is_contiguous()   # decoding: in place, in buffers growing 1.5x
    rows = torch.tensor([2, 0, 2])
    cache.layers[1].update(torch.zeros(3, 2, 4, 8), torch.zeros(3, 2, 4, 8))
    _select_cache(cache, rows)
    truth.batch_select_indices(rows)
    update(layer, truth, 1)
    layer.crop(-5)
    truth.crop(-5)
    update(layer, truth, 2)
    twin, twin_truth = copy.copy(layer), copy.copy(truth)
    for _ in range(3):
        update(twin, twin_truth, 1)
        update(layer, truth, 1)
    _select_cache(cache, torch.tensor([0]))   # compacted: the old rows' buffers go at once, not at the next update
    assert layer._buffers is None and layer.keys.shape[0] == 1


@pytest.mark.parametrize("kind", ["qwen2-gqa", "gpt2-absolute-positions"])
def test_prompts_that_begin_alike_share_their_first_pass(kind, monkeypatch):
    """Groups of prompts with a common beginning (a GRPO group's refinement templates), identical prompts with
    different drafts, a prompt that is another's beginning, one-token prompts and prompts alone, in one batch: the
    beginnings are read once, in a pass of their own, and the completions are the plain greedy ones."""
    model, tokenizer = tiny_causal_lm(kind), IdTokenizer()
    gen = torch.Generator().manual_seed(2)

    def tokens(n):
        return torch.randint(3, 48, (n,), generator=gen).tolist()

    prompt_ids = []
    for beginning in ([1] + tokens(14), [1] + tokens(9)):
        prompt_ids += [beginning + tokens(n) for n in (1, 3, 6)] + [beginning, beginning, beginning[:5]]
    prompt_ids += [[1], [1] + tokens(11), [1] + tokens(2)]
    plain = generate(model, tokenizer, prompt_ids, max_new_tokens=12, greedy=True)   # (it reads repeats once too)
    drafts = [edited(ids, gen, rate) for ids, rate in zip(plain.completion_ids, [0.0, 0.1, 0.5] * 5)]
    fed = counted_forwards(monkeypatch)
    drafted, stats = greedy_from_drafts(model, tokenizer, prompt_ids, drafts, max_new_tokens=12)
    assert_same(plain, drafted)
    assert stats.prefix_passes == 1
    shared, first = fed[0], fed[1]
    assert shared[0] < len(prompt_ids) and first[0] == len(prompt_ids)
    longest = max(len(p) + min(len(d), 16) for p, d in zip(prompt_ids, drafts))
    assert shared[0] * shared[1] + first[0] * first[1] < 0.8 * len(prompt_ids) * longest   # padding included


def test_shared_prefixes_of_a_batch():
    """Which rows read their beginnings together (_shared_prefixes), and when the batch reads its prompts whole."""
    from fastrft.rollout import _shared_prefixes

    a, b = [1, 5, 6, 7, 8, 9], [1, 4, 4, 4, 4, 4, 4]
    prompts = [a + [10], b + [11, 12], a + [20, 21], a, b + [11], [3, 3]]
    cluster_of, prefixes = _shared_prefixes(prompts, min_shared=4, min_saving=0.1)
    assert cluster_of[0] == cluster_of[2] == cluster_of[3] and cluster_of[1] == cluster_of[4]
    assert prefixes[cluster_of[0]] == a[:5]            # all of a but its last token, left for the second pass
    assert prefixes[cluster_of[1]] == b                # all of the shorter prompt, b + [11], but its last token
    assert prefixes[cluster_of[5]] == [3]              # alone: all but its last token
    assert len(set(cluster_of)) == 3
    assert _shared_prefixes([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]) is None             # nothing in common
    assert _shared_prefixes([a, [1, 5, 6, 9, 9, 9]], min_shared=4) is None           # 3 tokens in common
    assert _shared_prefixes(prompts, min_shared=4, min_saving=0.9) is None         # saves too little
    assert _shared_prefixes([[], [], []]) is None                                   # nothing to read at all
    chain = list(range(3, 3003))   # 3000 prompts each the beginning of the next: as deep as the batch is long
    nested = [chain[:n] for n in range(2, 3002)]
    cluster_of, prefixes = _shared_prefixes(nested)
    assert all(prompt[:len(prefixes[c])] == prefixes[c] and len(prefixes[c]) < len(prompt)
               for prompt, c in zip(nested, cluster_of))
    assert sum(len(prefixes[c]) for c in cluster_of) - sum(map(len, prefixes)) > 0.25 * sum(map(len, nested))


@pytest.mark.parametrize("kind", ["qwen2-gqa", "gpt2-absolute-positions"])
@pytest.mark.parametrize("share_prefixes", [True, False])
def test_rows_of_unlike_lengths_read_in_buckets(kind, share_prefixes, monkeypatch):
    """Prompts of 25 to 87 tokens: the first pass reads them in buckets of like lengths (each row in one of them),
    the rows that go on are merged into one cache, and the completions are the plain greedy ones; drafts that hold
    whole (a bucket of them done in its first pass) beside edited ones, with common beginnings read apart or not."""
    import fastrft.rollout as rollout_module

    model, tokenizer = tiny_causal_lm(kind), IdTokenizer()
    gen = torch.Generator().manual_seed(3)
    beginning = [1] + torch.randint(3, 48, (23,), generator=gen).tolist()
    prompt_ids = [beginning + torch.randint(3, 48, (n,), generator=gen).tolist()
                  for n in [1, 2, 3, 4, 20, 21, 22, 23, 60, 61, 62, 63]]
    truth = generate(model, tokenizer, prompt_ids, max_new_tokens=12, greedy=True).completion_ids
    rates = [0.0, 0.0, 0.0, 0.0, 0.3, 0.5, 1.0, 0.0, 0.1, 0.0, 0.3, 0.0]
    drafts = [edited(ids, gen, rate) for ids, rate in zip(truth, rates)]
    fed = counted_forwards(monkeypatch)
    # A batch this small saves fewer tokens than a pass costs: the cut's minimum lowered.
    monkeypatch.setattr(rollout_module, "_length_buckets",
                        functools.partial(rollout_module._length_buckets, min_tokens=0))
    plain = generate(model, tokenizer, prompt_ids, max_new_tokens=12, greedy=True)
    drafted, stats = greedy_from_drafts(model, tokenizer, prompt_ids, drafts, max_new_tokens=12,
                                        share_prefixes=share_prefixes)
    assert_same(plain, drafted)
    assert stats.prefix_passes == int(share_prefixes)
    read = torch.tensor([n for n, _ in fed[stats.prefix_passes:]]).cumsum(0).tolist()
    buckets = read.index(len(prompt_ids)) + 1   # each row in one of the first passes
    assert buckets == (3 if share_prefixes else 2)


@pytest.mark.parametrize("share_prefixes", [True, False])
def test_every_token_fed_sits_at_the_count_of_the_slots_attention_sees_before_it(share_prefixes, monkeypatch):
    """In every pass (common beginnings, buckets, decoding with rejected proposals masked, compacted caches), a fed
    token's position is the number of unmasked cache slots before it: the rows' positions never count a rejected
    token, and a row's `valid` count, which decides compaction, is its unmasked slots."""
    import fastrft.rollout as rollout_module

    model, tokenizer = tiny_causal_lm("qwen2-gqa"), IdTokenizer()
    gen = torch.Generator().manual_seed(5)
    beginning = torch.randint(3, 48, (12,), generator=gen).tolist()
    prompt_ids = [beginning + torch.randint(3, 48, (n,), generator=gen).tolist() for n in [1, 3, 9, 30, 31, 44]]
    truth = generate(model, tokenizer, prompt_ids, max_new_tokens=24, greedy=True).completion_ids
    drafts = [edited(ids, gen, rate) for ids, rate in zip(truth, [0.0, 0.1, 0.3, 0.5, 1.0, 0.05])]
    monkeypatch.setattr(rollout_module, "_length_buckets",
                        functools.partial(rollout_module._length_buckets, min_tokens=0))
    forward, checked = rollout_module._forward, []

    def checking_forward(backbone, cache, input_ids, mask, positions, device):
        fed = input_ids.shape[1]
        seen_before = mask.cumsum(1)[:, -fed:] - mask[:, -fed:]
        fed_mask = mask[:, -fed:].bool()
        assert torch.equal(positions[fed_mask], seen_before[fed_mask])
        checked.append(fed_mask.sum())
        return forward(backbone, cache, input_ids, mask, positions, device)

    monkeypatch.setattr(rollout_module, "_forward", checking_forward)
    drafted, stats = greedy_from_drafts(model, tokenizer, prompt_ids, drafts, max_new_tokens=24,
                                        share_prefixes=share_prefixes)
    assert drafted.completion_ids == truth
    assert len(checked) == stats.passes and stats.passes > 4


def test_length_buckets():
    """Rows cut into groups of like lengths where a cut saves a quarter of a group's padded tokens and 1024 tokens
    (_length_buckets)."""
    from fastrft.rollout import _length_buckets

    lengths = [5, 40, 6, 41, 5, 80, 7]
    assert sorted(map(sorted, _length_buckets(lengths, min_tokens=0))) == [[0, 2, 4, 6], [1, 3], [5]]
    assert _length_buckets(lengths, min_saving=0.9, min_tokens=0) == [[0, 4, 2, 6, 1, 3, 5]]   # sorted by length
    assert _length_buckets(lengths) == [[0, 4, 2, 6, 1, 3, 5]]                  # saves less than min_tokens
    assert sorted(map(sorted, _length_buckets([lengths[i % 7] for i in range(700)]))) == \
        [[i for i in range(700) if i % 7 in group] for group in ((0, 2, 4, 6), (1, 3), (5,))]
    assert _length_buckets([10, 12, 11, 9], min_tokens=0) == [[3, 0, 2, 1]]   # too alike to cut
    assert _length_buckets([7]) == [[0]] and _length_buckets([]) == []


def test_an_empty_prompt_is_refused(reference):
    model, tokenizer = reference
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        greedy_from_drafts(model, tokenizer, [[5, 6], []], [[7], [7]], max_new_tokens=4)


def test_the_refiner_s_template_shows_the_question_of_a_chat_prompt():
    from fastrft.refiner import prompt_text

    asked = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    assert prompt_text("sort 21=") == "sort 21="
    assert prompt_text(asked) == prompt_text(asked + [{"role": "assistant", "content": "Sure: it is"}]) == \
        "Name a prime."
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Name "},
                                          {"type": "text", "text": "a prime."}]}]   # typed parts: their texts
    assert prompt_text(parts) == "Name a prime."


def test_a_prompt_that_begins_the_answer_cannot_be_refined(tiny_model, chat_model, tmp_path):
    """A chat prompt ending with an assistant message: the policy continues that answer, the refiner would write a
    whole one after it. Refused before the run folder is written (and by the TRL adapter, at its first batch)."""
    import json

    from fastrft.config import load_config
    from fastrft.refiner import check_refinable
    from fastrft.trainer import train

    with pytest.raises(ValueError, match=r"rows: the prompt .* ends with an assistant message \(an answer's "
                                         r"beginning\): the refiner rewrites whole answers .*; train without the "
                                         r"refiner \(refine_coef=0\) or drop the prefilled message"):
        check_refinable(["sort 21=", [{"role": "user", "content": "sort 21"}, {"role": "assistant", "content": "1"}]],
                        "rows", without_refiner="refine_coef=0")
    check_refinable(["sort 21=", [{"role": "user", "content": "sort 21"}]], "rows", without_refiner="refine_coef=0")
    data = tmp_path / "prefilled.jsonl"   # the prefilled row on line 3, after a blank one
    data.write_text(json.dumps({"prompt": "sort 21=", "answer": "12"}) + "\n\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "sort 21"}, {"role": "assistant",
                                                                                     "content": "1"}],
                                  "answer": "12"}) + "\n")
    cfg = load_config(None, ["steps=1", "constraint=kl+refiner", f"dataset={data}", "progress=false"],
                      model=tiny_model, output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=f"{data}:3: the prompt.*train without the refiner \\(constraint=none or kl"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    # Evaluation does not refine: such prompts may be held out (by a model with a chat template).
    from fastrft.trainer import make_run

    make_run(load_config(None, ["steps=1", "constraint=kl+refiner", f"eval_dataset={data}", "progress=false"],
                         model=chat_model, output_dir=str(tmp_path / "run")))


def test_a_model_s_own_end_of_turn_ends_a_completion_on_both_paths():
    """The ids of the model's generation config end a completion too (an instruct model's end of turn, as TRL takes
    them): in generate() and in the draft path alike, the completion not truncated."""
    from collections import Counter

    model, tokenizer = tiny_causal_lm("llama-bf16").float(), IdTokenizer()
    prompts = [[5 + i, 9, 11 + i] for i in range(6)]
    unended = generate(model, tokenizer, prompts, max_new_tokens=12, greedy=True, stop_ids=[2]).completion_ids
    turn_end = Counter(t for ids in unended for t in ids[1:]).most_common(1)[0][0]
    model.generation_config.eos_token_id = [2, turn_end]
    plain = generate(model, tokenizer, prompts, max_new_tokens=12, greedy=True)
    expected = [ids[:ids.index(turn_end) + 1] if turn_end in ids else ids for ids in unended]
    assert plain.completion_ids == expected and any(ids[-1] == turn_end for ids in expected)
    assert plain.truncated == [ids[-1] not in (2, turn_end) for ids in expected]
    drafted, _ = greedy_from_drafts(model, tokenizer, prompts, unended, max_new_tokens=12)
    assert drafted.completion_ids == plain.completion_ids and drafted.truncated == plain.truncated


def test_a_refinement_ends_with_its_sample_s_own_stop_token(reference):
    """A sample ended by an end-of-turn id (not the tokenizer's EOS): its refinement ends with that id too, and the
    refiner stops on it."""
    model, tokenizer = reference
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]   # noqa: E731
    turn_end = ids("x")[0]
    result = refine(model, tokenizer, template=REFINE_TEMPLATE, parse=parse_refinement, prompts=["sort 7391="],
                    completions=["1739"], completion_ids=[ids("1739") + [turn_end]], max_new_tokens=8,
                    kept_weight=0.5, stop_ids=[tokenizer.eos_token_id, turn_end])   # (kept tokens kept in the row)
    refined = result.refinements[0]
    assert refined is not None and refined.refined_ids == ids("1379") + [turn_end]


def test_a_parse_refinement_that_returns_no_string_is_named(reference):
    model, tokenizer = reference
    ids = [tokenizer("1739", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    with pytest.raises(ValueError, match=r"parse_refinement returned int for '.*': it must return the corrected "
                                         r"response \(a str\) or None"):
        refine(model, tokenizer, template=REFINE_TEMPLATE, parse=len, prompts=["sort 7391="], completions=["1739"],
               completion_ids=ids, max_new_tokens=8)


def test_bf16_mismatches_only_at_rounding_ties():
    """In bf16 the draft path's batched verification and generate's step-by-step decoding round differently; a
    row may differ only where the plain path's top-2 logits are within bf16 rounding of each other."""
    model, tokenizer = tiny_causal_lm("llama-bf16"), IdTokenizer()
    model = model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    prompt_ids = [[1] + torch.randint(3, 48, (8,), generator=gen).tolist() for _ in range(32)]
    truth = generate(model, tokenizer, prompt_ids, max_new_tokens=16, greedy=True).completion_ids
    drafts = [edited(ids, gen, 0.2) for ids in truth]
    plain, drafted, _ = both_paths(model, tokenizer, prompt_ids, drafts, 16)
    for prompt, a, b in zip(prompt_ids, plain.completion_ids, drafted.completion_ids):
        if a == b:
            continue
        first = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + a[:first]])).logits[0, -1].float()
        top2 = logits.topk(2).values
        assert top2[0] - top2[1] <= 2 * torch.finfo(torch.bfloat16).eps * top2[0].abs(), (a, b)


def test_trainer_logs_the_refiner_passes(tiny_model, tmp_path):
    from fastrft.config import load_config
    from fastrft.rundir import RunDir
    from fastrft.trainer import train

    for draft in (True, False):
        out = tmp_path / str(draft)
        train(load_config(None, ["steps=1", "prompts_per_step=2", "group_size=4", "eval_size=2", "progress=false",
                                 "device=cpu", "plots=false", "dynamic_sampling=false", "constraint=refiner",
                                 f"refine_draft={draft}"], model=tiny_model, output_dir=str(out)))
        record = RunDir(out).read_metrics()[-1]
        assert record["refine_passes"] >= 1
        assert ("refine_draft_accepted" in record) == draft
        if draft:
            assert 0 <= record["refine_draft_accepted"] <= 1


def test_a_draft_row_keeps_long_proposals_where_its_draft_holds():
    """_DraftRow's proposals (they decide only the cost, never the tokens): in step with its draft a row proposes the
    continuation without building its n-gram index; a rejection after long accepted runs halves the proposal, after
    short ones cuts it to what was accepted; one edit away it steps over the edit; further out of step it re-aligns on
    the written tokens' n-grams."""
    from fastrft.rollout import _DraftRow

    draft = list(range(100, 200))
    row = _DraftRow(draft, ngram=3, size=16)
    row.write(draft[:17], stops=frozenset(), max_new_tokens=1000)       # the first block accepted, and the token after it
    row.verified(16, 16, lookahead=512)
    assert row.size == 32 and row.proposal(32) == draft[17:49] and row._ends is None
    row.write(draft[17:19] + [7], stops=frozenset(), max_new_tokens=1000)   # 2 of 32 accepted, then a replacement
    row.verified(32, 2, lookahead=512)
    assert row.size == 16                                       # 18 accepted in 1 change: halved, not cut to 2
    row.write([draft[20]], stops=frozenset(), max_new_tokens=1000)      # the draft's token after the replaced one
    assert row.proposal(4) == draft[21:25] and row._ends is None   # one edit away: no n-gram looked up
    row.write(draft[21:25] + [5, 6] + draft[60:63], stops=frozenset(), max_new_tokens=1000)   # accepted, then a rewrite
    row.verified(4, 4, lookahead=512)                                                  # that rejoins the draft
    assert row.proposal(4) == draft[63:67] and row._ends is not None   # found by its last 3 tokens

    choppy = _DraftRow(draft, ngram=3, size=4)
    choppy.write([draft[0], 7], stops=frozenset(), max_new_tokens=1000)
    choppy.verified(4, 1, lookahead=512)
    assert choppy.size == 1                                     # runs of 1: cut to what was accepted


def test_rows_fill_the_block_with_their_drafts():
    """_next_blocks: the block is as long as the quarter of rows trusting their drafts most ask; every row fills it
    with as much of its draft as it holds (the padding would cost the pass's layers as much), within
    max_new_tokens, or with fill=False only a row that asks for nothing does; a finished row feeds nothing; a row
    guessing where its draft goes on after a correction does not lengthen the block."""
    from fastrft.rollout import _DraftRow, _next_blocks

    draft = list(range(100, 140))
    rows = []
    for size, written in ((8, 1), (8, 1), (2, 1), (2, 36), (0, 1), (8, 1)):
        row = _DraftRow(draft, ngram=3, size=size)
        row.write(draft[:written], stops=frozenset(), max_new_tokens=1000)
        row.pointer = written
        rows.append(row)
    rows[5].done = True
    blocks = _next_blocks(rows, max_new_tokens=1000, probe=False)
    assert blocks[0] == blocks[1] == draft[:9]    # the last token and 8 more: two of six rows ask for 8
    assert blocks[2] == draft[:9]                 # asks for 2, fills the block
    assert blocks[3] == draft[35:]                # all its draft holds
    assert blocks[4] == draft[:9]                 # distrusting, in step with its draft
    assert blocks[5] == []
    unfilled = _next_blocks(rows, max_new_tokens=1000, probe=False, fill=False)
    assert unfilled[:2] == blocks[:2] and unfilled[4:] == blocks[4:]
    assert unfilled[2] == draft[:3] and unfilled[3] == draft[35:38]   # what they ask for: 2 tokens
    # 1 token written, so 5 more at most, the last of them the pass's prediction after the block's: 4 proposed.
    assert _next_blocks(rows[:3], max_new_tokens=6, probe=False)[2] == draft[:5]
    rows[1].rejected = True   # just corrected, but in step with its draft: the evidence holds, it lengthens the block
    assert _next_blocks(rows, max_new_tokens=1000, probe=False)[:2] == [draft[:9], draft[:9]]
    rows[1].out[-1] = 7       # corrected to 7: where its draft goes on is a guess, proposed but not lengthening
    assert _next_blocks(rows, max_new_tokens=1000, probe=False)[:2] == [draft[:3], [7] + draft[1:3]]


def test_blocks_are_filled_where_the_head_costs_less_than_the_layers(reference):
    """_fills_blocks: the demo's reference (a 24-token vocabulary) fills; a model whose head outweighs its layers
    (Qwen2.5-0.5B's vocabulary on two small layers) does not."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from fastrft.rollout import _fills_blocks

    assert _fills_blocks(reference[0])
    config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    assert not _fills_blocks(AutoModelForCausalLM.from_config(config))
