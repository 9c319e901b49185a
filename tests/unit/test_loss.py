"""The summed cross-entropy of dude_dist/loss.py: F.cross_entropy's value and gradient,
computed a chunk of rows at a time, keeping only the logits for the backward.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_loss.py -q
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from dude_dist.loss import IGNORE_INDEX, _SummedCrossEntropy, summed_cross_entropy


def logits_and_labels(rows: int = 13, vocab: int = 37, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(rows, vocab, generator=gen)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[[0, 5, 6]] = IGNORE_INDEX  # prompt positions, and two in a row
    return logits, labels


@pytest.mark.parametrize("chunk_elements", [1, 37 * 4, 10**9])  # a row, 4 rows (a short last chunk), all
def test_summed_cross_entropy_is_cross_entropy_in_float64(chunk_elements, test_device):
    logits, labels = logits_and_labels()
    logits, labels = logits.detach().to(test_device).requires_grad_(True), labels.to(test_device)
    reference = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    expected = torch.autograd.grad(reference * 0.7, logits)[0]
    before = logits.detach().clone()
    loss = summed_cross_entropy(logits, labels, chunk_elements)
    grad = torch.autograd.grad(loss * 0.7, logits)[0]  # an upstream gradient other than 1
    assert torch.equal(logits.detach(), before)  # the logits are worked on in copies
    assert loss.dtype == torch.float64  # float64 logits are worked on in float64
    assert loss.item() == pytest.approx(reference.item(), rel=1e-14)
    assert torch.allclose(grad, expected, rtol=1e-12, atol=1e-15)
    assert grad[[0, 5, 6]].abs().max() == 0  # ignored positions get no gradient


def test_summed_cross_entropy_passes_gradcheck_over_chunks():
    logits, labels = logits_and_labels(rows=8, vocab=7)
    assert torch.autograd.gradcheck(lambda x: summed_cross_entropy(x, labels, 14), (logits,))  # 2 rows a chunk


def test_summed_cross_entropy_in_bf16_matches_the_float32_upcast(test_device):
    logits, labels = logits_and_labels(rows=64, vocab=300, dtype=torch.bfloat16, seed=1)
    logits, labels = logits.detach().to(test_device).requires_grad_(True), labels.to(test_device)
    reference = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    expected = torch.autograd.grad(reference, logits)[0]
    loss = summed_cross_entropy(logits, labels, 300 * 5)
    # what the backward itself returns (autograd would cast a float32 gradient back to bf16,
    # after making it): the gradient is written in the logits' dtype
    grad = _SummedCrossEntropy.backward(loss.grad_fn, torch.tensor(1.0, device=test_device))[0]
    assert grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    # both round the same float32 gradient to bf16 once: equal but for a last bit here and there
    differ = (grad.float() - expected.float()).abs() > 2**-8 * expected.float().abs()
    assert differ.float().mean() < 1e-3


def test_summed_cross_entropy_keeps_only_the_logits_for_backward():
    logits, labels = logits_and_labels(rows=64, vocab=300, dtype=torch.bfloat16)

    def saved_bytes(fn) -> int:
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(saved)

    ours = saved_bytes(lambda: summed_cross_entropy(logits, labels, 300 * 5))
    # the logits (2 bytes each) and, per row, the label, its mask, the float32 maximum and log-sum-exp
    assert ours == logits.numel() * 2 + 64 * (8 + 1 + 4 + 4)


def test_summed_cross_entropy_of_no_rows_is_zero_with_a_gradient():
    logits = torch.zeros(0, 5, requires_grad=True)
    loss = summed_cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == (0, 5)


def test_summed_cross_entropy_keeps_a_confident_small_loss_precise_at_large_logits():
    # logits near 1000 (float32 spacing 6e-5 there) whose losses are ~1e-3: shifting each row
    # by its maximum before rounding keeps them; a log-sum-exp taken at 1000 would not
    gen = torch.Generator().manual_seed(2)
    logits = 1000 + torch.randn(32, 50, generator=gen)
    labels = torch.randint(0, 50, (32,), generator=gen)
    logits[torch.arange(32), labels] += 10.0
    exact = logits.double().requires_grad_(True)
    logits.requires_grad_(True)
    reference = F.cross_entropy(exact, labels, reduction="sum")
    assert 1e-3 < reference.item() / 32 < 1e-2
    loss = summed_cross_entropy(logits, labels, 50 * 8)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    # the gradient at each target, p - 1 ~ -1e-3 (a softmax shifted by max + log-sum-exp
    # rounded at 1000 would be off by 3e-5 absolute there, a few percent)
    got = torch.autograd.grad(loss, logits)[0][torch.arange(32), labels].double()
    want = torch.autograd.grad(reference, exact)[0][torch.arange(32), labels]
    assert torch.allclose(got, want, rtol=2e-4, atol=0), ((got - want) / want).abs().max()


def test_summed_cross_entropy_refuses_a_negative_label_other_than_ignore():
    logits = torch.randn(3, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="index"):
        summed_cross_entropy(logits, torch.tensor([-1, 2, 3]))  # not scored as token 0
    with pytest.raises(RuntimeError, match="index"):
        summed_cross_entropy(logits, torch.tensor([0, 5, 3]))  # beyond the vocabulary


def test_summed_cross_entropy_is_differentiated_once_only():
    logits, labels = logits_and_labels()
    (grad,) = torch.autograd.grad(summed_cross_entropy(logits, labels), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad.sum().backward()


def test_summed_cross_entropy_shifts_each_row_by_its_own_maximum():
    """Rows far apart in one chunk (rows at +1000 beside ordinary ones): a
    shift shared by the chunk would underflow every exp of the lower rows to 0."""
    logits, labels = logits_and_labels(rows=8, vocab=11)
    with torch.no_grad():
        logits[::2] += 1000.0
    reference = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    expected = torch.autograd.grad(reference, logits)[0]
    loss = summed_cross_entropy(logits, labels, 10**9)  # one chunk
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(loss, logits)[0], expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("chunk_elements", [5, 10**9])  # a row at a time, all 40 in one chunk
def test_summed_cross_entropy_covers_more_rows_than_the_vocabulary(chunk_elements):
    logits, labels = logits_and_labels(rows=40, vocab=5)
    reference = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    expected = torch.autograd.grad(reference, logits)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch resizing an `out=` buffer that was cut too short
        loss = summed_cross_entropy(logits, labels, chunk_elements)
        grad = torch.autograd.grad(loss, logits)[0]
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("chunk_elements", "rows"), [(3, 1), (7, 1), (20, 2), (21, 3), (10**9, 10**9 // 7)])
def test_summed_cross_entropy_works_whole_rows_within_the_chunk(monkeypatch, chunk_elements, rows):
    """The chunk is ``chunk_elements // vocab`` rows, at least one: the float32 working memory
    the planner counts (``planner.logit_bytes``)."""
    seen = []
    real = _SummedCrossEntropy.apply
    monkeypatch.setattr(_SummedCrossEntropy, "apply", lambda *a: seen.append(a[2]) or real(*a))
    logits, labels = logits_and_labels(rows=10, vocab=7)
    summed_cross_entropy(logits, labels, chunk_elements)
    assert seen == [rows]
