"""The update's batches (fastrft.batch): every layout and attention path gives the same loss and gradients, micro-
batches respect their token budget and accumulate to one big batch, and no [T, T] tensor over the whole batch is
ever made. The reference is the plain per-row computation: each row alone through the model, in float64."""
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastrft.batch import (EAGER, FLASH, FLEX, SDPA, AttentionPath, Branch, Row, accumulate_gradients, attention,
                           attention_pair_cost, build_batch, choose_attention, final_hidden, micro_batch_plan,
                           plan_lanes, plan_micro_batches, prompt_stacks, rft_loss, sequence_logprobs,
                           with_refinements)
from fastrft.config import TrainConfig

CPU = torch.device("cpu")
CFG = TrainConfig(model="unused", constraint="kl+refiner", kl_coef=0.1, entropy_coef=0.01)


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")


def make_rows(lengths, seed=0, refined_every=4):
    """Sample rows (policy gradient, KL) with every refined_every-th row a refined row (weighted cross-entropy)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, (p, t) in enumerate(lengths):
        prompt = torch.randint(4, 20, (p,), generator=gen).tolist()
        target = torch.randint(4, 20, (t,), generator=gen).tolist()
        if i % refined_every == refined_every - 1:
            rows.append(Row(prompt, target, sft_weights=(torch.rand(t, generator=gen) > 0.5).float()))
        else:
            rows.append(Row(prompt, target, advantage=float(torch.randn(1, generator=gen)), pg=True,
                            ref_logprobs=-torch.rand(t, generator=gen) * 3))
    return rows


def random_lengths(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(int(torch.randint(3, 10, (1,), generator=gen)), int(torch.randint(1, 12, (1,), generator=gen)))
            for _ in range(n)]


def loss_and_grads(model, rows, path):
    model.zero_grad()
    terms, n_batches = accumulate_gradients(model, rows, CFG, path, CPU, use_old=False)
    return terms, {n: p.grad.clone() for n, p in model.named_parameters()}, n_batches


def reference_loss_and_grads(model, rows):
    """Each row alone, unpadded, in float64, the row loss of the contract written out with materialised logits
    (on-policy: ratio 1, gradient -A per token), summed over rows and divided by the step's loss-token count."""
    reference = type(model)(model.config).double()
    reference.load_state_dict(model.state_dict())
    normalizer = sum(row.loss_tokens for row in rows)
    loss = 0.0
    for row in rows:
        batch = build_batch([row], CPU, packed=True)
        at = batch.targets[0] != -100
        logits = reference(input_ids=batch.input_ids, position_ids=batch.position_ids).logits[0, at]
        log_probs = logits.log_softmax(-1)
        targets = batch.targets[0, at]
        logp = log_probs.gather(-1, targets[:, None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        ratio = torch.exp(logp - logp.detach())
        advantage = batch.advantages[0, at].double()
        pg_term = -torch.minimum(ratio * advantage, ratio.clamp(1 - CFG.clip_low, 1 + CFG.clip_high) * advantage)
        log_ratio = batch.ref_logprobs[0, at].double() - logp
        kl = torch.exp(log_ratio) - log_ratio - 1
        pg = batch.pg_mask[0, at].double()
        row_loss = pg * (pg_term + CFG.kl_coef * kl - CFG.entropy_coef * entropy) \
            - batch.sft_weights[0, at].double() * logp
        loss = loss + row_loss.sum() / normalizer
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in reference.named_parameters()}


@pytest.mark.parametrize("packed, budget", [(True, 10**6), (False, 10**6), (False, 60), (False, 1), (True, 45)],
                         ids=["packed-one-batch-dense-sdpa", "padded-one-batch", "padded-buckets-of-60",
                              "padded-a-row-each", "packed-buckets-of-45"])
def test_every_layout_gives_the_reference_loss_and_grads(model, packed, budget):
    rows = make_rows(random_lengths(10))
    terms, grads, n_batches = loss_and_grads(model, rows, AttentionPath(packed, SDPA, budget))
    if budget == 1:
        assert n_batches == len(rows)
    elif budget < 10**6:
        assert 1 < n_batches < len(rows)
    expected_loss, expected_grads = reference_loss_and_grads(model, rows)
    assert terms["loss"] == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_micro_batches_accumulate_to_one_big_batch(model):
    """The same step in many micro-batches and in one: the same loss terms and gradients (the normaliser is the
    step's, not each micro-batch's)."""
    rows = make_rows(random_lengths(16, seed=3), seed=3)
    big, big_grads, _ = loss_and_grads(model, rows, AttentionPath(False, SDPA, 10**6))
    small, small_grads, n = loss_and_grads(model, rows, AttentionPath(False, SDPA, 40))
    assert n > 3
    for name in ("loss", "pg_loss", "sft_loss", "kl_loss", "clip_frac", "entropy"):
        assert small[name] == pytest.approx(big[name], rel=1e-5, abs=1e-7), name
    for name, grad in big_grads.items():
        torch.testing.assert_close(small_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


class LargestSquare(TorchDispatchMode):
    """The largest n such that some op made a tensor with two dimensions of at least n each."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 2:
                self.largest = max(self.largest, sorted(t.shape)[-2])
        return out


def test_no_tensor_of_the_whole_batch_squared(model):
    """The update (forward and backward) and the log-probs on the path this machine uses, refinements branching
    off their samples' rows and samples sharing their prompt's: no tensor has two dimensions as long as the batch's
    T tokens, as a [T, T] attention mask would; the dense packed layout does (the spy can tell)."""
    path = choose_attention("auto", model, CPU, max_tokens=10**6)   # the whole step in one micro-batch
    dense = AttentionPath(True, SDPA, 10**6)
    samples = make_rows(random_lengths(40, seed=1), seed=1, refined_every=10**9)
    for i, row in enumerate(samples):   # groups of 4 samples of one prompt
        row.prompt_ids = samples[i - i % 4].prompt_ids
    refined = [Row(row.prompt_ids, row.target_ids[:i % 3] + [7, 8], sft_weights=torch.ones(i % 3 + 2))
               if i % 4 == 0 else None for i, row in enumerate(samples)]
    rows = {p: with_refinements(samples, refined, p) for p in (path, dense)}
    assert path.branches and sum(row.branch is not None for row in rows[path]) == 10
    assert max(len(stack) for stack in prompt_stacks(rows[path], path)) == 4
    total = sum(row.length for row in rows[path])
    assert total > max(model.config.hidden_size, model.config.intermediate_size, model.config.vocab_size)
    for run in (lambda p: accumulate_gradients(model, rows[p], CFG, p, CPU, use_old=False),
                lambda p: sequence_logprobs(model, rows[p], CPU, path=p, temperature=1.0)):
        with LargestSquare() as spy:
            run(path)
        assert spy.largest < total, f"a tensor with two dimensions >= {spy.largest} (T = {total})"
        with LargestSquare() as spy:
            run(dense)
        assert spy.largest >= total


def test_sequence_logprobs_keep_the_rows_order(model):
    rows = make_rows(random_lengths(9, seed=2), seed=2)
    budgets = [sequence_logprobs(model, rows, CPU, path=AttentionPath(False, SDPA, budget), temperature=0.7)
               for budget in (10**6, 30)]
    for row, a, b in zip(rows, *budgets):
        alone = sequence_logprobs(model, [row], CPU, path=AttentionPath(True, SDPA, 10**6), temperature=0.7)[0]
        assert a.shape == (len(row.target_ids),)
        torch.testing.assert_close(a, alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, alone, rtol=1e-5, atol=1e-5)


def test_identical_rows_are_read_once(model, monkeypatch):
    """A group's repeated answers: sequence_logprobs reads each distinct (prompt, targets) once and gives every copy
    the same log-probs in a tensor of its own, in the rows' order; a copy with a branch is the same row to it."""
    import fastrft.batch as batch_module

    rows = make_rows(random_lengths(5, seed=3), seed=3)
    copies = [replace(rows[2]), replace(rows[0], branch=Branch(1, [5, 6], torch.ones(2))), replace(rows[2])]
    everything = [rows[0], copies[0], rows[1], rows[2], copies[1], rows[3], rows[4], copies[2]]
    read = []
    final_hidden = batch_module.final_hidden

    def counting(model, batch):
        read.append(len(batch.target_slices))
        return final_hidden(model, batch)

    monkeypatch.setattr(batch_module, "final_hidden", counting)
    path = AttentionPath(False, SDPA, 10**6)
    out = sequence_logprobs(model, everything, CPU, path=path, temperature=0.7)
    assert sum(read) == 5
    alone = sequence_logprobs(model, rows, CPU, path=path, temperature=0.7)
    for got, expected in zip(out, [alone[0], alone[2], alone[1], alone[2], alone[0], alone[3], alone[4], alone[2]]):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert len({id(t) for t in out}) == len(out)
    assert torch.equal(out[1], out[3]) and torch.equal(out[0], out[4])


def test_packed_hidden_states_do_not_attend_across_sequences(model):
    a, b = Row([5, 6, 7], [8, 9]), Row([10, 11], [12, 13, 14])
    with torch.no_grad():
        together = final_hidden(model, build_batch([a, b], CPU, packed=True))[0]
        alone = final_hidden(model, build_batch([b], CPU, packed=True))[0]
        padded = final_hidden(model, build_batch([b, a], CPU, packed=False))
    assert torch.allclose(together[4:], alone, atol=1e-5)
    assert torch.allclose(padded[0, :4], alone, atol=1e-5)   # the padded row is the longest: no padding
    assert torch.allclose(padded[1, :4], together[:4], atol=1e-5)   # its real tokens never see its padding


def test_plan_micro_batches_keeps_to_the_budget():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        lengths = torch.randint(1, 40, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen).tolist()
        budget = int(torch.randint(1, 200, (1,), generator=gen))
        for packed in (True, False):
            batches = plan_micro_batches(lengths, budget, packed=packed)
            assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
            for batch in batches:
                widths = [lengths[i] for i in batch]
                assert widths == sorted(widths, reverse=True)
                cost = sum(widths) if packed else len(batch) * widths[0]
                assert cost <= budget or len(batch) == 1
    assert plan_micro_batches([5, 9, 2, 9], 18, packed=False) == [[1, 3], [0, 2]]
    assert plan_micro_batches([5, 9, 2, 9], 18, packed=True) == [[1, 3], [0, 2]]
    assert plan_micro_batches([5, 9, 2, 9], 100, packed=False) == [[1, 3, 0, 2]]
    with pytest.raises(ValueError, match="max_tokens"):
        plan_micro_batches([3], 0, packed=False)


def sample_and_refined_rows(vocab, seed=0, group=1):
    """Sample rows (in runs of `group` with one prompt, as a GRPO group's) and the refinement of each (or None),
    forking from the sample everywhere a refinement can: at its first token, in the middle, after its last (a longer
    refinement), before its end (a shorter one), nowhere (a refinement that is a prefix of the sample), of a sample
    off the policy gradient; weights on shared tokens too."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(4, vocab, (n,), generator=gen).tolist()

    forks = [None, 0, 2, "longer", "shorter", 4, None, "prefix", "not-pg", 1]
    rows, refined = [], []
    for k, fork in enumerate(forks):
        prompt = ids(int(torch.randint(2, 7, (1,), generator=gen))) if k % group == 0 else rows[-1].prompt_ids
        sample = ids(int(torch.randint(1, 7, (1,), generator=gen))) if fork is None else ids(6)
        rows.append(Row(prompt, sample, advantage=float(torch.randn(1, generator=gen)), pg=fork != "not-pg",
                        ref_logprobs=-torch.rand(len(sample), generator=gen) * 3))
        if fork is None:
            refined.append(None)
            continue
        refinement = {"longer": sample + ids(2), "shorter": sample[:3] + ids(1), "prefix": sample[:4],
                      "not-pg": sample[:3] + ids(4)}.get(fork) or sample[:fork] + ids(3)
        weights = torch.rand(len(refinement), generator=gen) * (torch.rand(len(refinement), generator=gen) > 0.3)
        weights[-1] = 0.7
        refined.append(Row(prompt, refinement, sft_weights=weights))
    return rows, refined


BRANCH_MODELS = {"llama-sdpa": (None, SDPA), "llama-eager": (None, EAGER), "qwen2-gqa": ("qwen2", SDPA),
                 "gemma-scaled-embeddings": ("gemma", EAGER), "cohere-parallel-block": ("cohere", SDPA)}


@pytest.mark.parametrize("kind", BRANCH_MODELS)
def test_tree_rows_give_the_loss_grads_and_logprobs_of_rows_apart(model, kind):
    """Refinements in their samples' rows (the shared prefix once, a tree mask), a prompt's samples with them in
    one row (the prompt once), and rows of other prompts side by side in one tensor row (a lane): the loss terms,
    gradients and log-probs of every sequence in a row of its own, in one micro-batch and in several, with fewer
    tokens."""
    model_type, implementation = BRANCH_MODELS[kind]
    policy = model if model_type is None else tiny_causal_lm(model_type)
    if model_type is not None:
        with torch.no_grad():
            policy.get_output_embeddings().weight.div_(40.0)   # logits of a few nats, a KL of the same
    policy.set_attn_implementation(implementation)
    apart = AttentionPath(False, implementation, 10**6)
    # (group, seed): (budget, pair_cost) -> each stack's rows
    cases = {(4, 0): {(10**6, None): [1] * 10, (40, None): [1] * 10, (10**6, 0.0): [4, 4, 2], (30, 0.0): [3, 1, 4, 2]},
             (1, 2): {(10**6, 0.0): [1] * 10, (30, 0.0): [1] * 10}}
    try:
        for (group, seed), paths in cases.items():
            rows, refined = sample_and_refined_rows(policy.config.vocab_size, seed=seed, group=group)
            separate = with_refinements(rows, refined, apart)
            expected, expected_grads, _ = loss_and_grads(policy, separate, apart)
            expected_logprobs = sequence_logprobs(policy, rows, CPU, path=apart, temperature=0.7)
            for (budget, pair_cost), stack_sizes in paths.items():
                path = AttentionPath(False, implementation, budget, branches=True, pair_cost=pair_cost)
                branched = with_refinements(rows, refined, path)
                assert len(branched) == len(rows) and sum(row.branch is not None for row in branched) == 7
                assert sum(row.loss_tokens for row in branched) == sum(row.loss_tokens for row in separate)
                assert [len(stack) for stack in prompt_stacks(branched, path)] == stack_sizes
                # Group 1's plans put rows of different prompts side by side, a branched one among them.
                lanes = [lane for batch in micro_batch_plan(branched, path) for lane in batch]
                assert any(len(lane) > 1 for lane in lanes) == (group == 1)
                terms, grads, n_batches = loss_and_grads(policy, branched, path)
                assert (n_batches > 1) == (budget < 10**6)
                for name in ("loss", "pg_loss", "sft_loss", "kl_loss", "clip_frac", "entropy"):
                    assert terms[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
                for name, grad in grads.items():
                    torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
                for ours, theirs in zip(sequence_logprobs(policy, branched, CPU, path=path, temperature=0.7),
                                        expected_logprobs):
                    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    finally:
        model.set_attn_implementation(SDPA)


def test_a_branch_sees_only_its_shared_prefix(model):
    """The branch's hidden states are those of its refinement alone, the sample's are those of the sample alone,
    and the log-probs of a branched row are its sample's."""
    sample = Row([5, 6, 7], [8, 9, 10, 11], advantage=1.0, pg=True)
    refinement = Row([5, 6, 7], [8, 12, 13], sft_weights=torch.ones(3))
    path = AttentionPath(False, SDPA, 10**6, branches=True)
    [branched] = with_refinements([sample], [refinement], path)
    assert (branched.branch.at, branched.branch.target_ids, branched.length) == (1, [12, 13], 8)
    batch = build_batch([branched], CPU, packed=False)
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4]
    assert batch.targets[0].tolist() == [-100, -100, 8, 9, 10, 11, 12, 13]
    assert batch.sft_weights[0].tolist() == [0, 0, 1, 0, 0, 0, 1, 1] and batch.pg_mask[0, 2:6].all()
    with torch.no_grad():
        together = final_hidden(model, batch)[0]
        alone = {name: final_hidden(model, build_batch([row], CPU, packed=False))[0]
                 for name, row in (("sample", sample), ("refinement", refinement))}
    torch.testing.assert_close(together[:6], alone["sample"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[6:], alone["refinement"][3:], atol=1e-5, rtol=1e-5)
    [ours] = sequence_logprobs(model, [branched], CPU, path=path, temperature=1.0)
    torch.testing.assert_close(ours, sequence_logprobs(model, [sample], CPU, path=path, temperature=1.0)[0])


def test_a_prompts_samples_in_one_row_see_the_prompt_and_themselves(model):
    """Two samples of one prompt and a refinement of the second in one tree row: each sequence's hidden states are
    those it has alone."""
    prompt = [5, 6, 7]
    first, second = Row(prompt, [8, 9], advantage=1.0, pg=True), Row(prompt, [10, 11, 12], advantage=-1.0, pg=True)
    path = AttentionPath(False, SDPA, 10**6, branches=True, pair_cost=0.0)
    rows = with_refinements([first, second], [None, Row(prompt, [10, 13], sft_weights=torch.ones(2))], path)
    assert prompt_stacks(rows, path) == [[0, 1]]
    batch = build_batch(rows, CPU, packed=False, stacks=[[0, 1]])
    # prompt[:-1] | 7 8 (first) | 7 10 11 (second) | 10 (its branch, re-reading 10 at the fork)
    assert batch.input_ids[0].tolist() == [5, 6, 7, 8, 7, 10, 11, 10]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 2, 3, 4, 3]
    assert batch.targets[0].tolist() == [-100, -100, 8, 9, 10, 11, 12, 13]
    assert batch.target_slices == [(0, 2, 4), (0, 4, 7)]
    with torch.no_grad():
        together = final_hidden(model, batch)[0]
        alone = [final_hidden(model, build_batch([row], CPU, packed=False))[0]
                 for row in (first, second, Row(prompt, [10, 13]))]
    for columns, sequence, positions in (([0, 1, 2, 3], 0, slice(0, 4)), ([0, 1, 4, 5, 6], 1, slice(0, 5)),
                                         ([7], 2, slice(3, 4))):
        torch.testing.assert_close(together[columns], alone[sequence][positions], atol=1e-5, rtol=1e-5)


def test_rows_side_by_side_see_only_themselves(model):
    """Stacks of different prompts in one tensor row (a lane), positions restarting at each: each sequence's hidden
    states are those it has alone, and a lane shorter than the batch's widest is padded after its last stack."""
    prompt = [5, 6, 7]
    first, second = Row(prompt, [8, 9], advantage=1.0, pg=True), Row(prompt, [10, 11, 12], advantage=-1.0, pg=True)
    other, last = Row([14, 15], [16, 17, 18], advantage=0.5, pg=True), Row([3], [4], advantage=1.0, pg=True)
    path = AttentionPath(False, SDPA, 10**6, branches=True, pair_cost=0.0)
    rows = with_refinements([first, second, other, last],
                            [None, Row(prompt, [10, 13], sft_weights=torch.ones(2)), None, None], path)
    batch = build_batch(rows, CPU, packed=False, pad_id=0, stacks=[[0, 1], [2], [3]], lanes=[[0, 1], [2]])
    # the stack of test_a_prompts_samples_in_one_row... | 14 | 15 16 17 (other) ; 3 (last) and padding
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 7, 10, 11, 10, 14, 15, 16, 17], [3] + [0] * 11]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 3, 0, 1, 2, 3], list(range(12))]
    assert batch.targets[0].tolist() == [-100, -100, 8, 9, 10, 11, 12, 13, -100, 16, 17, 18]
    assert batch.target_slices == [(0, 2, 4), (0, 4, 7), (0, 9, 12), (1, 0, 1)]
    with torch.no_grad():
        together = final_hidden(model, batch)
        alone = [final_hidden(model, build_batch([row], CPU, packed=False))[0]
                 for row in (first, second, Row(prompt, [10, 13]), other, last)]
    for columns, sequence, positions in (([0, 1, 2, 3], 0, slice(0, 4)), ([0, 1, 4, 5, 6], 1, slice(0, 5)),
                                         ([7], 2, slice(3, 4)), ([8, 9, 10, 11], 3, slice(0, 4))):
        torch.testing.assert_close(together[0, columns], alone[sequence][positions], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1, :1], alone[4], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="padded layout"):
        build_batch([other, last], CPU, packed=True, lanes=[[0, 1]])


def test_plan_lanes_keeps_to_the_budget():
    """Every sequence once; a micro-batch as wide as its first (longest) sequence, no lane fuller, lanes x width
    within the budget but for a sequence longer than it; the next sequence goes where it leaves least room."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        lengths = torch.randint(1, 40, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen).tolist()
        budget = int(torch.randint(1, 200, (1,), generator=gen))
        batches = plan_lanes(lengths, budget)
        assert sorted(i for batch in batches for lane in batch for i in lane) == list(range(len(lengths)))
        for batch in batches:
            width = lengths[batch[0][0]]
            assert all(sum(lengths[i] for i in lane) <= width for lane in batch)
            assert len(batch) * width <= budget or batch == [batch[0][:1]]
    assert plan_lanes([10, 6, 4, 3], 20) == [[[0], [1, 2]], [[3]]]
    assert plan_lanes([10, 7, 5, 3, 2], 30) == [[[0], [1, 3], [2, 4]]]   # 3 fills 7's lane exactly, 2 joins 5
    with pytest.raises(ValueError, match="max_tokens"):
        plan_lanes([3], 0)


def test_prompt_stacks_share_a_prompt_where_it_costs_less():
    """A long prompt with short answers shares a row; long answers to a short prompt do not when attention costs
    enough; never past the token budget, across prompts, or on a path without pair_cost."""
    def group(prompt_len, answer_len, n=4, prompt=None):
        prompt = prompt or list(range(4, 4 + prompt_len))
        return [Row(prompt, [3] * answer_len, advantage=1.0, pg=True) for _ in range(n)]

    sharing = AttentionPath(False, SDPA, 10**6, branches=True, pair_cost=1e-3)
    assert prompt_stacks(group(100, 5), sharing) == [[0, 1, 2, 3]]
    assert prompt_stacks(group(3, 400), sharing) == [[0], [1], [2], [3]]   # 1e-3 x the square outweighs 2 tokens
    assert prompt_stacks(group(3, 400), AttentionPath(False, SDPA, 10**6, branches=True, pair_cost=0.0)) == \
        [[0, 1, 2, 3]]
    assert prompt_stacks(group(100, 5), AttentionPath(False, SDPA, 113, branches=True, pair_cost=1e-3)) == \
        [[0, 1], [2, 3]]   # the prompt's 99 tokens and two answers' 5 each fit 113 tokens, a third would not
    assert prompt_stacks(group(20, 5, n=2) + group(20, 5, n=2, prompt=list(range(30, 50))), sharing) == \
        [[0, 1], [2, 3]]
    assert prompt_stacks(group(100, 5), AttentionPath(False, SDPA, 10**6, branches=True)) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="pair_cost"):
        AttentionPath(False, SDPA, 64, pair_cost=1e-3)


def test_with_refinements_checks_its_inputs(model):
    rows, refined = sample_and_refined_rows(50)
    path = AttentionPath(False, SDPA, 10**6, branches=True)
    with pytest.raises(ValueError, match="10 rows but 9 refinements"):
        with_refinements(rows, refined[:-1], path)
    refined[1].prompt_ids = [3]
    with pytest.raises(ValueError, match="its own sample's row"):
        with_refinements(rows, refined, path)
    with pytest.raises(ValueError, match="padded layout"):
        build_batch(with_refinements(rows[:3], [None, None, refined[2]], path), CPU, packed=True)
    for packed, implementation in ((True, FLEX), (False, FLASH)):
        with pytest.raises(ValueError, match="branches need padded rows through sdpa or eager"):
            AttentionPath(packed, implementation, 64, branches=True)


def test_branches_only_where_the_mask_is_plain_causal(model):
    """choose_attention takes tree rows on the padded path of a model whose attention reads a custom mask as it is;
    never for a sliding window (the tree mask would replace the window's), ALiBi attention (biases built from a
    [B, L] mask), an MoE router loss (which reads a [B, L] mask), in the policy or the reference, nor on a packed
    path."""
    from fastrft.batch import tree_mask_blocker

    assert choose_attention("auto", model, CPU, 512).branches and tree_mask_blocker(model) is None
    blocked = {"mistral": "a sliding attention window of 4096", "bloom": "does not take a custom mask",
               "qwen3_moe": "router loss"}
    for model_type, reason in blocked.items():
        other = tiny_causal_lm(model_type)
        assert reason in tree_mask_blocker(other), model_type
        assert not choose_attention("auto", other, CPU, 512).branches
        # nor when a separate reference model, whose forwards take the run's path too, could not take the mask
        assert choose_attention("auto", model, CPU, 512, reference=other).pair_cost is None
    assert not choose_attention("auto", model, torch.device("cuda"), 512).branches


def test_a_refinement_weighted_only_where_it_agrees_needs_no_branch():
    sample = Row([5, 6], [8, 9, 10], advantage=1.0, pg=True)
    path = AttentionPath(False, SDPA, 10**6, branches=True)
    [row] = with_refinements([sample], [Row([5, 6], [8, 9, 12, 13], sft_weights=torch.tensor([0.5, 1, 0, 0]))], path)
    assert row.branch is None and row.sft_weights.tolist() == [0.5, 1, 0] and row.loss_tokens == 5


def test_a_batch_of_branched_rows_has_the_separate_rows_own_normaliser(model):
    """rft_loss without a normaliser divides by the batch's own loss tokens, the shared tokens of a branch counted
    as in rows of their own."""
    rows, refined = sample_and_refined_rows(model.config.vocab_size, seed=1)
    losses = []
    for branches in (False, True):
        path = AttentionPath(False, SDPA, 10**6, branches=branches)
        batch = build_batch(with_refinements(rows, refined, path), CPU, packed=False)
        with torch.no_grad():
            losses.append(float(rft_loss(model, batch, CFG, use_old=False).loss))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_choose_attention_says_once_which_path(model, capsys):
    from fastrft import batch as batch_module

    batch_module._NOTED.clear()
    path = choose_attention("auto", model, CPU, 512)
    assert (path.packed, path.attn_implementation, path.max_tokens) == (False, SDPA, 512)
    choose_attention("auto", model, CPU, 512)
    err = capsys.readouterr().err
    assert err.count("packing=auto: padded length-bucketed micro-batches") == 1
    assert "flash-attn needs CUDA" in err
    assert choose_attention("true", model, CPU, 512).packed is False
    assert "packing=true, but no variable-length attention on cpu" in capsys.readouterr().err
    assert choose_attention("false", model, CPU, 512) == AttentionPath(False, SDPA, 512, branches=True,
                                                                       pair_cost=attention_pair_cost(model))
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="packing must be one of"):
        choose_attention("yes please", model, CPU, 512)


def test_choose_attention_on_cuda_tries_flash_then_flex(model, capsys):
    """The CUDA decision, without a GPU: flash-attn is tried on the model first (here it is not installed or has no
    GPU, and the reason is said), then flex_attention; the model keeps the implementation it was loaded with."""
    path = choose_attention("auto", model, torch.device("cuda"), 1024)
    assert path == AttentionPath(True, FLEX, 1024)
    assert model.config._attn_implementation == SDPA
    assert f"{FLASH}:" in capsys.readouterr().err


def test_flex_attention_packed_logprobs_match_padded(model):
    """The flex path's sequence boundaries (transformers' block mask from the packed position_ids): forward only,
    the one direction flex_attention runs on the CPU (compiled, which takes a few seconds)."""
    rows = make_rows(random_lengths(6, seed=4), seed=4)
    packed = sequence_logprobs(model, rows, CPU, path=AttentionPath(True, FLEX, 10**6), temperature=1.0)
    padded = sequence_logprobs(model, rows, CPU, path=AttentionPath(False, SDPA, 10**6), temperature=1.0)
    assert model.config._attn_implementation == SDPA   # switched back after the forwards
    for a, b in zip(packed, padded):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the varlen kernels run there only")
@pytest.mark.parametrize("implementation", [FLASH, FLEX])
def test_varlen_kernels_give_the_padded_loss_and_grads_on_cuda(tiny_model, implementation):
    from transformers import AutoModelForCausalLM

    if implementation == FLASH:
        pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    device = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").to(device)
    if implementation == FLASH:
        model = model.to(torch.bfloat16)   # flash-attn runs in 16 bits
    rows = make_rows(random_lengths(12, seed=5), seed=5)
    results = []
    for path in (AttentionPath(True, implementation, 60), AttentionPath(False, SDPA, 60)):
        model.zero_grad()
        terms, _ = accumulate_gradients(model, rows, CFG, path, device, use_old=False)
        results.append((terms["loss"], {n: p.grad.float().clone() for n, p in model.named_parameters()}))
    (varlen_loss, varlen_grads), (padded_loss, padded_grads) = results
    tolerance = dict(rtol=2e-2, atol=2e-3) if implementation == FLASH else dict(rtol=1e-4, atol=1e-5)
    assert varlen_loss == pytest.approx(padded_loss, rel=tolerance["rtol"], abs=tolerance["atol"])
    for name, grad in varlen_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], **tolerance, msg=name)


# Tiny sizes for any decoder config (each applied where the config has the attribute).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=320, head_dim=16, moe_intermediate_size=32, num_experts=4, num_local_experts=4,
            num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1, max_position_embeddings=256,
            shared_expert_intermediate_size=32, pad_token_id=0)
# The causal LMs users train, with every logit transform transformers' decoders apply: Cohere's logit_scale,
# Granite's logits_scaling, Gemma 2's soft-cap, Falcon-H1's lm_head_multiplier; MoE routers; tied heads.
ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "glm4_moe", "gpt_oss", "phi3", "olmo2", "gemma",
                 "gemma2", "gemma3_text", "cohere", "cohere2", "granite", "granitemoe", "falcon_h1"]


def tiny_causal_lm(model_type, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **overrides)
    for name, value in TINY.items():
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, value)
    if isinstance(config.__dict__.get("layer_types"), list):   # one per layer, or the saved config does not reload
        config.layer_types = config.layer_types[:config.num_hidden_layers]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():   # logits of tens, as a trained model's: where a soft-cap or a scale matters
        model.get_output_embeddings().weight.mul_(40.0)
    return model


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_logprobs_equal_the_models_own_on_every_architecture(model_type):
    """fastrft's log-probs (final hidden states, the LM head under the config's logit transform, temperature 1)
    are the model's own (log_softmax of its forward's logits), and the start-up probe agrees."""
    from fastrft.batch import check_head_matches_model

    model = tiny_causal_lm(model_type, logit_scale=0.0625) if model_type.startswith("cohere") else \
        tiny_causal_lm(model_type)
    rows = [Row([5, 9, 200, 17], [33, 250, 7, 7, 101]), Row([44], [310, 2])]
    path = choose_attention("auto", model, CPU, 10**6)   # the path fastrft train takes: padded on the CPU
    ours = sequence_logprobs(model, rows, CPU, path=path, temperature=1.0)
    batch = build_batch(rows, CPU, packed=False)
    with attention(model, path):
        update = rft_loss(model, batch, TrainConfig(model="unused"), use_old=False).logprobs   # the update's
    for (b, t0, t1), lp in zip(batch.target_slices, ours):
        torch.testing.assert_close(update[b, t0:t1], lp, atol=1e-5, rtol=1e-5)
    for row, lp in zip(rows, ours):
        ids = torch.tensor([row.prompt_ids + row.target_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(row.prompt_ids) - 1:-1].double()
        theirs = logits.log_softmax(-1).gather(-1, torch.tensor(row.target_ids)[:, None]).squeeze(-1)
        assert theirs.min() < -1.0   # a peaked, large-logit distribution, not a near-uniform one
        torch.testing.assert_close(lp.double(), theirs, atol=1e-4, rtol=1e-5)
    check_head_matches_model(model, "model")


def test_a_head_fastrft_cannot_reproduce_is_refused():
    """BERT as a causal LM transforms the hidden states (dense, GELU, LayerNorm) before its decoder: the probe
    names the key and the architecture instead of training on the wrong distribution."""
    from fastrft.batch import check_head_matches_model

    model = tiny_causal_lm("bert", is_decoder=True)
    with pytest.raises(ValueError, match="ref_model: fastrft's log-probs of BertLMHeadModel differ from the model's"):
        check_head_matches_model(model, "ref_model")


def test_moe_router_loss_is_the_models_own_and_joins_the_update():
    """An MoE model's router load-balancing loss, from its own forward, joins the update with
    router_aux_loss_coef's weight (default: the model config's); asked of a model without a router, the key is
    named."""
    from fastrft.batch import router_loss_coef

    model = tiny_causal_lm("qwen3_moe")
    rows = make_rows([(4, 6), (3, 5), (5, 2)])
    batch = build_batch(rows, CPU, packed=False)
    cfg = TrainConfig(model="unused")
    assert router_loss_coef(model, cfg) == model.config.router_aux_loss_coef > 0
    assert router_loss_coef(model, TrainConfig(model="unused", router_aux_loss_coef=0.0)) == 0.0
    plain = rft_loss(model, batch, cfg, use_old=False)
    with_router = rft_loss(model, batch, cfg, use_old=False, router_weight=0.5)
    own = model(input_ids=batch.input_ids, position_ids=batch.position_ids, output_router_logits=True).aux_loss
    own = own.detach()
    assert own > 0 and "router_loss" not in plain.metrics
    assert with_router.metrics["router_loss"] == pytest.approx(float(own), rel=1e-5)
    assert float(with_router.loss) == pytest.approx(float(plain.loss) + 0.5 * float(own), rel=1e-5)
    gate = next(p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))
    gate.grad = None
    (with_router.loss - plain.loss).backward()   # the router loss alone: the gates learn from it
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.1 but LlamaForCausalLM is not a mixture-of-experts"):
        router_loss_coef(tiny_causal_lm("llama"), TrainConfig(model="unused", router_aux_loss_coef=0.1))


@pytest.mark.parametrize("call, message", [
    (lambda m, ids: m(ids[0], ids[0], advantages=torch.ones(1)),
     r"input_ids and targets must both be \[batch, tokens\], got \(6,\)"),
    (lambda m, ids: m(ids, ids[:, :-1], advantages=torch.ones(2)),
     r"must both be \[batch, tokens\], got \(2, 6\) and \(2, 5\)"),
    (lambda m, ids: m(ids, ids, advantages=torch.ones(2), router_weight=0.1),
     "router_weight=0.1 but LlamaForCausalLM gives no router loss"),
    (lambda m, ids: m(ids, ids, advantages=torch.ones(2), clip_hgh=0.3),
     r"unknown fused_rft_loss options: \['clip_hgh'\]"),
    (lambda m, ids: m(ids, ids, advantages=torch.ones(2), bias=None), "bias is not an option of CausalLMWithFusedLoss"),
    (lambda m, ids: m(ids, ids, advantages=torch.ones(2), softcap=30.0),
     "softcap is not an option of CausalLMWithFusedLoss: it reads the model's logit transform itself"),
    (lambda m, ids: m(ids, ids, advantages=torch.ones(2), logit_scale=1.0),
     "logit_scale is not an option of CausalLMWithFusedLoss"),
])
def test_the_loss_module_names_a_bad_call(model, call, message):
    from fastrft.batch import CausalLMWithFusedLoss

    ids = torch.randint(3, model.config.vocab_size, (2, 6))
    with pytest.raises(ValueError, match=message):
        call(CausalLMWithFusedLoss(model), ids)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_the_loss_module_over_a_peft_model_is_its_adapted_model_s_loss(model_type):
    """A PEFT model (adapters wrapped around the causal LM): the loss of the adapted model under its own logit
    transform, its gradients reaching the adapters."""
    peft = pytest.importorskip("peft")
    from fastrft.batch import CausalLMWithFusedLoss

    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_causal_lm(model_type), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                           target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(3, model.config.vocab_size, (2, 8))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    out = CausalLMWithFusedLoss(model)(ids, targets, advantages=torch.ones(2, 8))
    out.loss.backward()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()   # PEFT's own forward: adapters on, the model's transform
    own = logits.log_softmax(-1)[:, :-1].gather(-1, targets[:, :-1, None])[..., 0]
    torch.testing.assert_close(out.logprobs[:, :-1].double(), own, rtol=0, atol=1e-5)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)


def test_a_peft_adapter_on_the_head_is_refused_and_a_head_trained_whole_is_not():
    """The fused loss reads the head's weight: a LoRA adapter on lm_head (its weight the base layer's) would neither
    count nor train, so it is refused; modules_to_save trains the head whole, and its log-probs are the model's."""
    peft = pytest.importorskip("peft")
    from fastrft import FusedRFTLoss
    from fastrft.batch import CausalLMWithFusedLoss

    torch.manual_seed(0)
    ids = torch.randint(3, 50, (2, 8))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    adapted = peft.get_peft_model(tiny_causal_lm("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                                           init_lora_weights=False))
    message = r"the LM head is a Linear, a PEFT adapter on it: the fused loss reads only its base weight"
    with pytest.raises(ValueError, match=f"CausalLMWithFusedLoss: {message}"):
        CausalLMWithFusedLoss(adapted)(ids, targets, advantages=torch.ones(2, 8))
    with pytest.raises(ValueError, match=f"FusedRFTLoss: {message}"):
        FusedRFTLoss(adapted.get_base_model().lm_head)
    whole = peft.get_peft_model(tiny_causal_lm("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                         modules_to_save=["lm_head"]))
    out = CausalLMWithFusedLoss(whole)(ids, targets, advantages=torch.ones(2, 8))
    with torch.no_grad():
        own = whole(input_ids=ids).logits.double().log_softmax(-1)[:, :-1].gather(-1, targets[:, :-1, None])[..., 0]
    torch.testing.assert_close(out.logprobs[:, :-1].double(), own, rtol=0, atol=1e-5)
