"""Tests of fastrft.diff: the minimal token diff (C++ and Python backends) and the diff weights (Triton and torch).

References live here: an O(N*M) dynamic-programming LCS, and the weights written from the formula in float64."""
import os
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrft.diff import DEFAULT_MAX_D, cpp_available, diff_mask, diff_masks, diff_weights

BACKENDS = [
    "python",
    pytest.param("cpp", marks=pytest.mark.skipif(not cpp_available(), reason="fastrft._diff is not built")),
]
IMPLS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(
        not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
        reason="Triton needs CUDA or TRITON_INTERPRET=1")),
]


# ------------------------------------------------------------------------------------------------ references

def lcs_length(a, b) -> int:
    """O(N*M) DP, row by row: L[i+1][j+1] = L[i][j] + 1 if a[i] == b[j] else max(L[i][j+1], L[i+1][j]). Within a
    row the max over the left neighbour is a running maximum, which numpy does in one call."""
    b = np.asarray(b, dtype=np.int64)
    prev = np.zeros(len(b) + 1, dtype=np.int64)
    for token in a:
        candidate = np.maximum(prev[1:], prev[:-1] + (b == token))
        prev = np.concatenate(([0], np.maximum.accumulate(candidate)))
    return int(prev[-1])


def is_subsequence(short, long) -> bool:
    it = iter(long)
    return all(any(token == other for other in it) for token in short)


def check_minimal(sample, refined, mask):
    """The unchanged tokens are a common subsequence of both sequences, of LCS length."""
    mask = mask.tolist()
    assert len(mask) == len(refined)
    kept = [token for token, changed in zip(refined, mask) if not changed]
    assert is_subsequence(kept, sample)
    assert len(kept) == lcs_length(sample, refined)


def random_edit(rng, tokens, rate, vocab):
    """Substitutes, inserts or deletes at about rate * len(tokens) random positions."""
    out = []
    for token in tokens:
        if rng.random() >= rate:
            out.append(token)
            continue
        kind = rng.randrange(3)
        if kind == 0:
            out.append(rng.randrange(vocab))
        elif kind == 1:
            out += [token, rng.randrange(vocab)]
    return out


# ------------------------------------------------------------------------------------------------ the diff

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 2, 3, 8, 50_000])
def test_random_pairs_against_dp(backend, vocab):
    rng = random.Random(vocab)
    for _ in range(150):
        sample = [rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
        if rng.random() < 0.5:
            refined = random_edit(rng, sample, rng.choice([0.05, 0.3, 1.0]), vocab)
        else:
            refined = [rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
        check_minimal(sample, refined, diff_mask(sample, refined, backend=backend, max_d=10**6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [4, 32_000])
def test_long_edited_pairs_against_dp(backend, vocab):
    rng = random.Random(7)
    for rate in (0.02, 0.1):
        sample = [rng.randrange(vocab) for _ in range(700)]
        refined = random_edit(rng, sample, rate, vocab)
        check_minimal(sample, refined, diff_mask(sample, refined, backend=backend))


@pytest.mark.skipif(not cpp_available(), reason="fastrft._diff is not built")
def test_backends_choose_the_same_alignment():
    rng = random.Random(3)
    samples, refineds = [], []
    for _ in range(300):
        vocab = rng.choice([2, 5, 1000])
        sample = [rng.randrange(vocab) for _ in range(rng.randrange(0, 60))]
        samples.append(sample)
        refineds.append(random_edit(rng, sample, rng.choice([0.1, 0.5]), vocab))
    for max_d in (4, 16, 10**6):
        cpp = diff_masks(samples, refineds, max_d=max_d, backend="cpp", num_threads=2)
        py = diff_masks(samples, refineds, max_d=max_d, backend="python")
        for a, b in zip(cpp, py):
            assert torch.equal(a, b)


@settings(max_examples=150, deadline=None)
@given(sample=st.lists(st.integers(0, 3), max_size=30), refined=st.lists(st.integers(0, 3), max_size=30),
       backend=st.sampled_from(["cpp", "python"] if cpp_available() else ["python"]))
def test_property_unchanged_tokens_are_an_lcs(sample, refined, backend):
    mask = diff_mask(sample, refined, backend=backend)
    check_minimal(sample, refined, mask)
    assert int(mask.sum()) == len(refined) - lcs_length(sample, refined)


@settings(max_examples=100, deadline=None)
@given(sample=st.lists(st.integers(0, 2), max_size=25), refined=st.lists(st.integers(0, 2), max_size=25),
       max_d=st.integers(0, 12))
def test_property_budget(sample, refined, max_d):
    """Exact when D <= max_d; otherwise common prefix and suffix kept, everything between changed."""
    d = len(sample) + len(refined) - 2 * lcs_length(sample, refined)
    for backend in (["cpp", "python"] if cpp_available() else ["python"]):
        mask = diff_mask(sample, refined, max_d=max_d, backend=backend).tolist()
        if d <= max_d:
            check_minimal(sample, refined, torch.tensor(mask, dtype=torch.bool))
        else:
            assert mask == expected_rewritten(sample, refined)


def expected_rewritten(sample, refined):
    prefix = 0
    while prefix < min(len(sample), len(refined)) and sample[prefix] == refined[prefix]:
        prefix += 1
    suffix = 0
    while (suffix < min(len(sample), len(refined)) - prefix
           and sample[len(sample) - 1 - suffix] == refined[len(refined) - 1 - suffix]):
        suffix += 1
    return [not (j < prefix or j >= len(refined) - suffix) for j in range(len(refined))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend):
    def mask(a, b):
        return diff_mask(a, b, backend=backend).tolist()

    assert mask([], []) == []
    assert mask([1, 2, 3], []) == []
    assert mask([], [1, 2]) == [True, True]
    assert mask([5, 6, 7], [5, 6, 7]) == [False] * 3
    assert mask([1, 2, 3], [4, 5, 6, 7]) == [True] * 4
    assert mask([1], [1]) == [False]
    assert mask([1], [2]) == [True]
    assert mask([1, 2, 3], [1, 9, 3]) == [False, True, False]
    assert mask([1, 2, 3], [1, 2, 9, 3]) == [False, False, True, False]
    assert mask([1, 2, 3, 4], [1, 4]) == [False, False]
    assert mask([7] * 50, [7] * 60) == [False] * 50 + [True] * 10
    # Negative and 64-bit token values compare as they are.
    assert mask([-1, 2**62, 3], [-1, 2**62 + 1, 3]) == [False, True, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_regimes(backend):
    rng = random.Random(11)
    sample = list(range(300))
    # A permutation keeps every token (the multiset bound says nothing), so only the search's budget can stop it.
    shuffled = sample[:]
    rng.shuffle(shuffled)
    refined = [900, 901] + shuffled + [950]
    d = len(sample) + len(refined) - 2 * lcs_length(sample, refined)
    assert diff_mask(sample, refined, max_d=d - 1, backend=backend).all()
    check_minimal(sample, refined, diff_mask(sample, refined, max_d=d, backend=backend))
    # Unrelated tokens: the multiset bound ends it at once; the common prefix and suffix stay unchanged.
    sample = [1, 2] + list(range(100, 400)) + [3]
    refined = [1, 2] + list(range(1000, 1500)) + [3]
    expected = [False, False] + [True] * 500 + [False]
    assert diff_mask(sample, refined, max_d=799, backend=backend).tolist() == expected
    assert diff_mask(sample, refined, max_d=800, backend=backend).tolist() == expected  # D = 800: exact, same
    # A realistic refinement stays exact under the default budget.
    sample = [rng.randrange(32_000) for _ in range(1500)]
    refined = random_edit(rng, sample, 0.2, 32_000)
    assert len(sample) + len(refined) - 2 * lcs_length(sample, refined) <= DEFAULT_MAX_D
    check_minimal(sample, refined, diff_mask(sample, refined, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_types_agree(backend):
    rng = random.Random(5)
    sample = [rng.randrange(20) for _ in range(80)]
    refined = random_edit(rng, sample, 0.2, 20)
    expected = diff_mask(sample, refined, backend=backend)
    variants = [
        (tuple(sample), tuple(refined)),
        (torch.tensor(sample), torch.tensor(refined)),
        (torch.tensor(sample, dtype=torch.int32), torch.tensor(refined, dtype=torch.int16)),
        (torch.tensor(sample)[::1], torch.tensor(refined + [0])[:-1]),
        (np.array(sample, dtype=np.int64), np.array(refined, dtype=np.int32)),
        (torch.tensor(sample).repeat_interleave(2)[::2], torch.tensor(refined)),  # non-contiguous
        (np.array(sample).repeat(2)[::2], np.array(refined + refined)[:len(refined)]),   # a strided array
    ]
    for a, b in variants:
        got = diff_mask(a, b, backend=backend)
        assert got.dtype == torch.bool and got.shape == (len(refined),)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_single(backend):
    rng = random.Random(9)
    samples = [[rng.randrange(6) for _ in range(rng.randrange(0, 50))] for _ in range(40)]
    refineds = [random_edit(rng, s, 0.3, 6) for s in samples]
    refineds[3] = []
    singles = [diff_mask(s, r, backend=backend) for s, r in zip(samples, refineds)]
    for num_threads in (None, 1, 3):
        batch = diff_masks([torch.tensor(s, dtype=torch.long) for s in samples], refineds,
                           num_threads=num_threads, backend=backend)
        assert len(batch) == len(singles)
        for got, want in zip(batch, singles):
            assert torch.equal(got, want)
    assert diff_masks([], [], backend=backend) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_problem(backend):
    with pytest.raises(ValueError, match="2 samples but 1 refinements"):
        diff_masks([[1], [2]], [[1]], backend=backend)
    with pytest.raises(ValueError, match="must be 1-D"):
        diff_mask(torch.zeros(2, 3, dtype=torch.long), [1], backend=backend)
    with pytest.raises(ValueError, match="must be 1-D"):
        diff_mask([1], np.zeros((2, 2), dtype=np.int64), backend=backend)
    with pytest.raises(ValueError, match="integer"):
        diff_mask(torch.tensor([1.0, 2.0]), [1], backend=backend)
    with pytest.raises(ValueError, match="token 1 is a float"):
        diff_mask([1, 2], [1, 2.5], backend=backend)
    with pytest.raises(ValueError, match=r"refineds\[1\]: token 0 is a str"):
        diff_masks([[1], [2]], [[1], ["a"]], backend=backend)
    with pytest.raises(ValueError, match="must hold integers"):
        diff_mask(np.array([1.0]), [1], backend=backend)
    with pytest.raises(ValueError, match="max_d"):
        diff_mask([1], [1], max_d=-1, backend=backend)
    with pytest.raises(ValueError, match="num_threads"):
        diff_masks([[1]], [[1]], num_threads=0, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        diff_mask([1], [1], backend="rust")


# ------------------------------------------------------------------------------------------------ the weights

def reference_weights(changed, lengths, changed_weight, kept_weight, context, normalize):
    """float64, straight from the formula: w = changed_weight if a change lies in t .. t + context of the row."""
    batch, width = changed.shape
    weights = torch.zeros(batch, width, dtype=torch.float64)
    for b in range(batch):
        n = int(lengths[b])
        for t in range(n):
            window = changed[b, t:min(t + context + 1, n)]
            weights[b, t] = changed_weight if bool(window.any()) else kept_weight
    if normalize == "sequence":
        sums = weights.sum(1, keepdim=True)
        weights = torch.where(sums > 0, weights / sums.clamp_min(1e-300), 0.0)
    elif normalize == "batch" and weights.sum() > 0:
        weights = weights / weights.sum()
    last = torch.full((batch,), -1, dtype=torch.int64)
    for b in range(batch):
        nonzero = torch.nonzero(weights[b]).flatten()
        if nonzero.numel():
            last[b] = nonzero[-1]
    return weights, last


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("normalize", ["none", "sequence", "batch"])
@pytest.mark.parametrize("context", [0, 1, 7])
@pytest.mark.parametrize("changed_weight,kept_weight", [(1.0, 0.0), (2.5, 0.25)])
def test_weights_against_reference(impl, normalize, context, changed_weight, kept_weight, device):
    # 1500 columns: two 1024-token tiles, so the context window crosses a tile boundary.
    batch, width = 6, 1500
    changed = torch.rand(batch, width) < 0.01
    changed[0] = False                                       # nothing changed
    changed[1, 1023] = changed[1, 1024] = True               # changes at the tile boundary
    changed[2, -1] = True                                    # a change at the very end
    lengths = torch.tensor([width, 1100, width, 0, 1, 777])
    got = diff_weights(changed, lengths, changed_weight=changed_weight, kept_weight=kept_weight, context=context,
                       normalize=normalize, impl=impl, device=device)
    want_w, want_last = reference_weights(changed, lengths, changed_weight, kept_weight, context, normalize)
    assert got.weights.dtype == torch.float32 and got.weights.shape == (batch, width)
    assert got.weights.device.type == got.last_index.device.type == device
    assert got.last_index.dtype == torch.int64
    torch.testing.assert_close(got.weights.double().cpu(), want_w, rtol=1e-6, atol=1e-9)
    assert got.last_index.tolist() == want_last.tolist()


@pytest.mark.parametrize("impl", IMPLS)
def test_weights_odd_shapes(impl, device):
    for batch, width in [(1, 1), (3, 17), (1, 1031)]:
        changed = torch.rand(batch, width) < 0.2
        got = diff_weights(changed, context=2, normalize="sequence", impl=impl, device=device)
        want_w, want_last = reference_weights(changed, torch.full((batch,), width), 1.0, 0.0, 2, "sequence")
        torch.testing.assert_close(got.weights.double().cpu(), want_w, rtol=1e-6, atol=1e-9)
        assert got.last_index.tolist() == want_last.tolist()
    empty = diff_weights(torch.zeros(2, 0, dtype=torch.bool), impl=impl, device=device)
    assert empty.weights.shape == (2, 0) and empty.last_index.tolist() == [-1, -1]


@pytest.mark.parametrize("impl", IMPLS)
def test_plain_sft_and_list_input(impl, device):
    masks = diff_masks([[1, 2, 3, 4], [5, 6], [7]], [[1, 9, 3, 4, 8], [5, 6], []])
    got = diff_weights(masks, kept_weight=1.0, impl=impl, device=device)
    assert got.weights.tolist() == [[1.0] * 5, [1.0, 1.0, 0.0, 0.0, 0.0], [0.0] * 5]
    assert got.last_index.tolist() == [4, 1, -1]
    # Only the changes: refinements that changed nothing report -1 and can be dropped.
    got = diff_weights(masks, impl=impl, device=device)
    assert got.weights.tolist() == [[0.0, 1.0, 0.0, 0.0, 1.0], [0.0] * 5, [0.0] * 5]
    assert got.last_index.tolist() == [4, -1, -1]


def test_weights_errors():
    changed = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        diff_weights(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        diff_weights(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="lengths must be 2 integers"):
        diff_weights(changed, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 4\]"):
        diff_weights(changed, torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="kept_weight"):
        diff_weights(changed, kept_weight=-1.0)
    with pytest.raises(ValueError, match="changed_weight"):
        diff_weights(changed, changed_weight=float("nan"))
    with pytest.raises(ValueError, match="context"):
        diff_weights(changed, context=-1)
    with pytest.raises(ValueError, match="normalize"):
        diff_weights(changed, normalize="token")
    with pytest.raises(ValueError, match="impl"):
        diff_weights(changed, impl="cuda")
    with pytest.raises(ValueError, match="1-D bool"):
        diff_weights([torch.zeros(3)])


@pytest.mark.parametrize("pure_python", [False, True])
def test_a_missing_extension_stops_the_import_unless_asked_for_the_twin(pure_python):
    """Without fastrft._diff (simulated in a fresh interpreter), importing fastrft.diff fails with the fix, unless
    FASTRFT_PURE_PYTHON_DIFF=1 asks for the pure-Python twin, which then serves backend='auto'."""
    import os
    import subprocess
    import sys

    script = ("import sys; sys.modules['fastrft._diff'] = None\n"
              "from fastrft.diff import diff_mask\n"
              "print(diff_mask([1, 2, 3], [1, 5, 3]).tolist())")
    env = {k: v for k, v in os.environ.items() if k != "FASTRFT_PURE_PYTHON_DIFF"}
    if pure_python:
        env["FASTRFT_PURE_PYTHON_DIFF"] = "1"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    if pure_python:
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[False, True, False]"
    else:
        assert out.returncode != 0
        assert "C++ diff extension" in out.stderr and "FASTRFT_PURE_PYTHON_DIFF=1" in out.stderr
        assert "pip install -e ." in out.stderr


def test_weights_computed_on_another_device_come_back_there():
    masks = [torch.tensor([False, True, False]), torch.tensor([True])]
    here = diff_weights(masks, context=1)
    moved = diff_weights(masks, context=1, device="cpu", impl="torch")
    assert torch.equal(here.weights, moved.weights) and torch.equal(here.last_index, moved.last_index)
    if torch.cuda.is_available():
        on_gpu = diff_weights(masks, context=1, device="cuda")
        assert on_gpu.weights.device.type == "cuda"
        assert torch.equal(on_gpu.weights.cpu(), here.weights)
